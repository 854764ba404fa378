#!/usr/bin/env bash
# Idempotent set-up for building, testing and benchmarking Berth on a fresh Debian machine.
# Installs: Debian packages, the nightly toolchain's rust-src, and bpf-linker built against the
# nightly's own LLVM (version detected, not hard-coded). Safe to run repeatedly.
set -euo pipefail

log() { printf '[bootstrap] %s\n' "$*" >&2; }

APT_PACKAGES=(
  iproute2 containernetworking-plugins containerd runc iperf3 e2fsprogs xfsprogs
  bpftool busybox-static hyperfine jq util-linux protobuf-compiler procps
  python3-venv iputils-ping tar gzip libprotobuf-dev
  iptables openssl curl
  # packaging (issue 12): .debs, lintian, a bookworm root booted by nspawn, OCI images, man pages
  debootstrap lintian debhelper dpkg-dev binutils systemd-container buildah help2man
  # the control plane's registry (issue 14): real etcd for the tests and the benchmark
  etcd-server etcd-client
)

need_apt=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_apt+=("$p")
done
if ((${#need_apt[@]})); then
  log "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
else
  log "Debian packages present"
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
for comp in rust-src clippy rustfmt; do
  if ! rustup component list --toolchain nightly --installed | grep -q "^$comp"; then
    log "adding $comp to nightly"
    rustup component add "$comp" --toolchain nightly
  fi
done
for comp in clippy rustfmt; do
  if ! rustup component list --installed | grep -q "^$comp"; then
    log "adding $comp to the default toolchain"
    rustup component add "$comp"
  fi
done

# bpf-linker must link against the same LLVM major version the nightly rustc uses.
NIGHTLY_SYSROOT="$(rustc +nightly --print sysroot)"
LLVM_MAJOR="$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
[[ -n "$LLVM_MAJOR" ]] || { log "cannot detect nightly LLVM version"; exit 1; }
# Pick the real ELF shared object (some toolchains also ship a linker-script stub named *.so).
LLVM_LIB=""
for f in "$NIGHTLY_SYSROOT"/lib/libLLVM*.so*; do
  [[ -f "$f" ]] || continue
  if [[ "$(head -c4 "$f" | od -An -c | tr -d ' ')" == '177ELF' ]]; then LLVM_LIB="$f"; break; fi
done
[[ -n "$LLVM_LIB" ]] || { log "nightly has no libLLVM in $NIGHTLY_SYSROOT/lib"; exit 1; }

stamp="$HOME/.cargo/bin/.bpf-linker-llvm"
if command -v bpf-linker >/dev/null && [[ "$(cat "$stamp" 2>/dev/null)" == "$LLVM_MAJOR" ]]; then
  log "bpf-linker present (LLVM $LLVM_MAJOR)"
else
  log "building bpf-linker against nightly LLVM $LLVM_MAJOR ($LLVM_LIB)"
  prefix="$HOME/.cache/berth/llvm-$LLVM_MAJOR"
  mkdir -p "$prefix/lib"
  ln -sf "$LLVM_LIB" "$prefix/lib/libLLVM.so"
  ln -sf "$LLVM_LIB" "$prefix/lib/libLLVM-$LLVM_MAJOR.so"
  ln -sf "$LLVM_LIB" "$prefix/lib/$(basename "$LLVM_LIB")"
  LLVM_PREFIX="$prefix" LD_LIBRARY_PATH="$NIGHTLY_SYSROOT/lib" \
    cargo +nightly install bpf-linker --version '^0.13' --locked --force \
      --no-default-features --features "llvm-$LLVM_MAJOR"
  echo "$LLVM_MAJOR" >"$stamp"
fi

# Python openstacksdk for the CSI test that runs a real OpenStack client against the simulator
# (tests/tests/csi_openstacksdk.rs fails, never skips, when this venv is missing).
VENV="$HOME/.cache/berth/venv"
if "$VENV/bin/python" -c 'import openstack' 2>/dev/null; then
  log "openstacksdk venv present ($VENV)"
else
  log "installing openstacksdk into $VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check openstacksdk
fi
# kubernetes-validate: the manifests against the Kubernetes OpenAPI schemas (tests/tests/manifests.rs).
if [[ -x "$VENV/bin/kubernetes-validate" ]]; then
  log "kubernetes-validate present"
else
  log "installing kubernetes-validate into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check kubernetes-validate
fi
log "done"
