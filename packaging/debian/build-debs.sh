#!/usr/bin/env bash
# Builds the worker-image packages from release binaries with dpkg-deb:
#   berth-agent (berth-agent, berthctl, systemd unit, /etc/berth/agent.toml)
#   berth-cni   (/opt/cni/bin/berth, /etc/cni/net.d/05-berth.conflist)
#   berth-csi   (berth-csi), when built
# Usage: packaging/debian/build-debs.sh [out-dir]   (after cargo build --release --workspace --bins)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-target/debian}"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
REL=target/release
mkdir -p "$OUT"

pkg() { # name description depends files...
  local name=$1 desc=$2 deps=$3; shift 3
  local root; root="$(mktemp -d)"
  mkdir -p "$root/DEBIAN"
  while (($#)); do
    install -D -m "$3" "$1" "$root/$2"; shift 3
  done
  cat >"$root/DEBIAN/control" <<CONTROL
Package: $name
Version: $VERSION
Architecture: amd64
Maintainer: Berth <berth@example.invalid>
Depends: $deps
Section: net
Priority: optional
Description: $desc
CONTROL
  if [[ -f "$root/etc/berth/agent.toml" ]]; then echo /etc/berth/agent.toml >"$root/DEBIAN/conffiles"; fi
  dpkg-deb --root-owner-group --build "$root" "$OUT/${name}_${VERSION}_amd64.deb" >/dev/null
  rm -rf "$root"
  echo "$OUT/${name}_${VERSION}_amd64.deb"
}

pkg berth-agent "Berth node agent: eBPF datapath, IPAM, local API, control-plane tunnel" "libc6" \
  "$REL/berth-agent" usr/bin/berth-agent 0755 \
  "$REL/berthctl" usr/bin/berthctl 0755 \
  packaging/systemd/berth-agent.service lib/systemd/system/berth-agent.service 0644 \
  packaging/etc/agent.toml etc/berth/agent.toml 0644 \
  README.md usr/share/doc/berth-agent/README.md 0644
pkg berth-cni "Berth CNI 1.1 plugin" "berth-agent (= $VERSION)" \
  "$REL/berth" opt/cni/bin/berth 0755 \
  packaging/cni/05-berth.conflist etc/cni/net.d/05-berth.conflist 0644
if [[ -x "$REL/berth-csi" ]]; then
  pkg berth-csi "Berth Cinder CSI driver (cinder.csi.openstack.org)" "libc6, e2fsprogs, xfsprogs, util-linux" \
    "$REL/berth-csi" usr/bin/berth-csi 0755
fi
