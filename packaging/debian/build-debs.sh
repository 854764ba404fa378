#!/usr/bin/env bash
# Builds Berth's worker-image packages from this workspace with cargo + debhelper:
#   berth-agent (berth-agent, berthctl, systemd unit, /etc/berth/agent.toml, /etc/default/berth-agent,
#                sysctl.d for IPv4 forwarding), berth-cni (/opt/cni/bin/berth + conflist),
#   berth-csi (berth-csi), and a -dbgsym package with the detached debug symbols of each.
#
# Usage: packaging/debian/build-debs.sh [--dist bookworm|jammy] [--version V] [--profile release|dev]
#                                       [--out DIR] [--no-cargo]
#   --dist      target distribution: Debian 12 (default) or Ubuntu 22.04. The binaries must not
#               need a newer glibc than the target has (2.36 / 2.35): checked, not assumed.
#   --version   Debian version (default: the workspace version + "-1", "~ubuntu22.04" for jammy)
#   --profile   cargo profile of the binaries (default release; the tests package dev builds)
#   --no-cargo  package binaries already built for that profile
# Needs: debhelper, dpkg-dev, binutils (scripts/bootstrap.sh installs them). Output: DIR (default
# target/debian/<dist>) gets the .debs, the dbgsym packages and the .changes file.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"

dist=bookworm profile=release version="" out="" cargo=1
while (($#)); do
  case "$1" in
    --dist) dist=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --profile) profile=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --no-cargo) cargo=0; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "build-debs.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$dist" in
  bookworm) glibc_max=2.36 suffix="" ;;
  jammy) glibc_max=2.35 suffix="~ubuntu22.04" ;;
  *) echo "build-debs.sh: --dist must be bookworm or jammy, not $dist" >&2; exit 2 ;;
esac
case "$profile" in
  release) bindir=target/release compress="-Zxz" ;;
  dev|debug) profile=dev bindir=target/debug compress="-Zgzip -z1" ;;
  *) echo "build-debs.sh: --profile must be release or dev" >&2; exit 2 ;;
esac
upstream="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
version="${version:-${upstream}-1${suffix}}"
out="$(realpath -m "${out:-target/debian/$dist}")"
for tool in dpkg-buildpackage dh objdump; do
  command -v "$tool" >/dev/null || { echo "build-debs.sh: $tool missing (run scripts/bootstrap.sh)" >&2; exit 1; }
done

bins=(berth-agent berthctl berth berth-csi)
if ((cargo)); then
  cargo build --locked --profile "$profile" -p berth-agent -p berth-cni -p berth-csi --bins
fi

# The newest glibc symbol version any binary needs must exist on the target.
for b in "${bins[@]}"; do
  [[ -x "$bindir/$b" ]] || { echo "build-debs.sh: $bindir/$b missing (build it, or drop --no-cargo)" >&2; exit 1; }
  need="$(objdump -T "$bindir/$b" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)"
  if [[ "$(printf '%s\n%s\n' "$need" "$glibc_max" | sort -V | tail -n1)" != "$glibc_max" ]]; then
    echo "build-debs.sh: $b needs glibc $need, $dist has $glibc_max: build on an older system" >&2
    exit 1
  fi
done

# A source tree debhelper can work in: debian/ from this folder, the files to ship in bin/ and etc/.
stage="$ROOT/target/debian/stage-$dist"
src="$stage/berth-$upstream"
rm -rf "$stage"
mkdir -p "$src/bin" "$src/etc" "$out"
cp -r packaging/debian "$src/debian"
rm -f "$src/debian/build-debs.sh"
trap 'rm -rf "$stage"' EXIT
for b in "${bins[@]}"; do
  cp "$bindir/$b" "$src/bin/"
  # Unoptimised builds carry hundreds of MB of DWARF: compressed, they stay a fraction of it on
  # disk (dh_strip moves compressed sections to the -dbgsym package as they are).
  if [[ "$profile" == dev ]]; then objcopy --compress-debug-sections=zlib "$src/bin/$b"; fi
done
cp packaging/etc/agent.toml packaging/cni/05-berth.conflist packaging/sysctl/60-berth.conf \
  packaging/csi/cloud.conf.example "$src/etc/"
cp packaging/systemd/berth-agent.service "$src/debian/berth-agent.service"
cp packaging/default/berth-agent "$src/debian/berth-agent.default"
cp README.md "$src/README.md"

# One changelog entry for this build; the date is the last commit's (reproducible builds).
epoch="$(git log -1 --format=%ct 2>/dev/null || date +%s)"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
cat >"$src/debian/changelog" <<CHANGELOG
berth ($version) $dist; urgency=medium

  * Build of commit $commit for $dist.

 -- Berth maintainers <berth@example.org>  $(date -R -u -d "@$epoch")
CHANGELOG

(
  cd "$src"
  export SOURCE_DATE_EPOCH="$epoch" BERTH_DEB_COMPRESS="$compress" DEB_BUILD_OPTIONS="${DEB_BUILD_OPTIONS:-} nocheck"
  dpkg-buildpackage -b -us -uc --no-sign >"$stage/build.log" 2>&1 || {
    echo "build-debs.sh: dpkg-buildpackage failed:" >&2; tail -n 40 "$stage/build.log" >&2; exit 1; }
)
files=()
for f in "$stage"/*.deb "$stage"/*.ddeb "$stage"/*.changes "$stage"/*.buildinfo; do
  [[ -e "$f" ]] || continue
  mv -f "$f" "$out/"
  files+=("$out/$(basename "$f")")
done
printf '%s\n' "${files[@]}"
