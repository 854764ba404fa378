#!/usr/bin/env bash
# Makes (once) a tarball of a Debian bookworm root: debootstrap --variant=minbase plus the packages
# Berth's packaging test and the CSI image need (systemd to boot it in systemd-nspawn, adduser,
# util-linux, mount, e2fsprogs, xfsprogs, iproute2, procps, iputils-ping). Cached: an existing tarball built
# from the same package list is reused (cold: about 3 minutes, mostly downloads).
# Usage: packaging/bookworm-root.sh <tarball>   (default target/bookworm/root.tar)
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-target/bookworm/root.tar}")"
mirror="${BERTH_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
include=systemd,systemd-sysv,dbus,adduser,util-linux,mount,e2fsprogs,xfsprogs,iproute2,procps,iputils-ping
stamp="$out.packages"
if [[ -f "$out" && "$(cat "$stamp" 2>/dev/null)" == "$include" ]]; then
  echo "$out"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "bookworm-root.sh: debootstrap missing (scripts/bootstrap.sh)" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
work="$(mktemp -d "$(dirname "$out")/debootstrap.XXXXXX")"
trap 'rm -rf "$work"' EXIT
if ! debootstrap --variant=minbase --include="$include" bookworm "$work/root" "$mirror" \
    >"$work/debootstrap.log" 2>&1; then
  echo "bookworm-root.sh: debootstrap failed:" >&2
  tail -n 30 "$work/debootstrap.log" >&2
  exit 1
fi
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
tar -C "$work/root" --numeric-owner -cf "$out.tmp" .
mv -f "$out.tmp" "$out"
echo "$include" >"$stamp"
echo "$out"
