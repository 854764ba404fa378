#!/usr/bin/env bash
# Builds Berth's two container images from this workspace with buildah (vfs storage driver, a
# private storage directory, no daemon, no registry) and writes them as OCI archives:
#   berth-agent_<version>.oci.tar  berth-agent, berthctl, the CNI plugin and its conflist, the
#                                  init container's install-cni-plugin (DaemonSet image)
#   berth-csi_<version>.oci.tar    berth-csi on a trimmed Debian bookworm root with its tools
# Each archive names its image docker.io/library/<name>:<version>, which is what the manifests'
# `berth-agent:<version>` / `berth-csi:<version>` resolve to once imported into a node's containerd
# (`ctr -n k8s.io images import`); `skopeo copy oci-archive:<file> docker://<registry>/<name>:<tag>`
# pushes it to a registry instead.
#
# Usage: packaging/container/build-images.sh [--profile release|dev] [--out DIR] [--no-cargo]
#                                            [--only agent|csi]
# Needs buildah, debootstrap (for the CSI base, cached by packaging/bookworm-root.sh), busybox-static.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
profile=release out="" cargo=1 only=""
while (($#)); do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --no-cargo) cargo=0; shift ;;
    --only) only=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "build-images.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$profile" in
  release) bindir=target/release ;;
  dev|debug) profile=dev bindir=target/debug ;;
  *) echo "build-images.sh: --profile must be release or dev" >&2; exit 2 ;;
esac
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
out="$(realpath -m "${out:-target/images}")"
command -v buildah >/dev/null || { echo "build-images.sh: buildah missing (scripts/bootstrap.sh)" >&2; exit 1; }
if ((cargo)); then
  cargo build --locked --profile "$profile" -p berth-agent -p berth-cni -p berth-csi --bins
fi
mkdir -p "$out"
work="$(mktemp -d "$ROOT/target/images-work.XXXXXX")"
B=(buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs)
cleanup() {
  "${B[@]}" rm -a >/dev/null 2>&1 || true
  "${B[@]}" rmi -a -f >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
epoch="$(git log -1 --format=%ct 2>/dev/null || date +%s)"
mktar() { # root-dir tarball: reproducible, root-owned
  tar -C "$1" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" -cf "$2" .
}
build() { # name containerfile context
  local name=$1 file=$2 ctx=$3 ref="docker.io/library/$1:$version"
  "${B[@]}" bud --quiet --layers=false --isolation chroot --timestamp "$epoch" \
    -f "$file" -t "$ref" "$ctx" >/dev/null
  rm -f "$out/${name}_$version.oci.tar"
  "${B[@]}" push --quiet "$ref" "oci-archive:$out/${name}_$version.oci.tar:$ref"
  echo "$out/${name}_$version.oci.tar"
}

if [[ -z "$only" || "$only" == agent ]]; then
  ctx="$work/agent" base="$work/agent-base"
  mkdir -p "$ctx" "$base"/{bin,etc,tmp,usr/share/doc} 
  chmod 1777 "$base/tmp"
  for b in berth-agent berthctl berth; do
    [[ -x "$bindir/$b" ]] || { echo "build-images.sh: $bindir/$b missing" >&2; exit 1; }
    cp "$bindir/$b" "$ctx/"
    strip --strip-unneeded "$ctx/$b"
  done
  # The shared libraries the binaries need, from this build system (the ones they were linked to).
  while read -r lib; do
    install -D -m "$(stat -L -c %a "$lib")" "$(readlink -f "$lib")" "$base$lib"
  done < <(ldd "$ctx"/berth-agent "$ctx"/berthctl "$ctx"/berth |
             awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*ld-linux/ {print $1}' | sort -u)
  for pkg in libc6 libgcc-s1; do
    install -D -m 0644 "/usr/share/doc/$pkg/copyright" "$base/usr/share/doc/$pkg/copyright"
  done
  # busybox-static: the shell and tools of the init container's script.
  install -m 0755 /bin/busybox "$base/bin/busybox"
  install -D -m 0644 /usr/share/doc/busybox-static/copyright "$base/usr/share/doc/busybox-static/copyright"
  for applet in sh cp mv cmp chmod sync rm echo cat ls; do ln -s busybox "$base/bin/$applet"; done
  printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$base/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$base/etc/group"
  mktar "$base" "$ctx/base.tar"
  cp packaging/container/install-cni-plugin packaging/cni/05-berth.conflist "$ctx/"
  cp packaging/debian/copyright "$ctx/copyright"
  build berth-agent packaging/container/agent.Containerfile "$ctx"
fi

if [[ -z "$only" || "$only" == csi ]]; then
  ctx="$work/csi" base="$work/csi-base"
  mkdir -p "$ctx" "$base"
  [[ -x "$bindir/berth-csi" ]] || { echo "build-images.sh: $bindir/berth-csi missing" >&2; exit 1; }
  cp "$bindir/berth-csi" "$ctx/" && strip --strip-unneeded "$ctx/berth-csi"
  rootfs="$(bash packaging/bookworm-root.sh)"
  # Trimmed: no init system, package caches, manuals, locales or docs (copyright files stay).
  tar -C "$base" -xf "$rootfs" \
    --exclude=./usr/share/man --exclude=./usr/share/info --exclude=./usr/share/locale \
    --exclude=./var/cache/apt --exclude=./var/lib/apt/lists --exclude=./var/log/\* \
    --exclude=./usr/lib/systemd --exclude=./usr/share/doc/\*/changelog\*
  mktar "$base" "$ctx/base.tar"
  cp packaging/debian/copyright "$ctx/copyright"
  build berth-csi packaging/container/csi.Containerfile "$ctx"
fi
