#!/usr/bin/env bash
# Berth's test command: set-up (bootstrap), format check, clippy with warnings denied, unit tests
# and the privileged end-to-end tests (network namespaces, eBPF, loop devices, mounts).
# Must run as root; privileged tests fail (never skip) when they cannot run.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[[ -f "$HOME/.cargo/env" ]] && . "$HOME/.cargo/env"

if [[ $EUID -ne 0 ]]; then
  echo "scripts/test.sh must run as root (privileged end-to-end tests)" >&2
  exit 1
fi

step() { printf '\n==> %s\n' "$*" >&2; }

step "bootstrap"
bash scripts/bootstrap.sh

step "format check"
cargo fmt --all --check
rustfmt --edition 2024 --check ebpf/berth-ebpf/src/main.rs

step "clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings
(cd ebpf/berth-ebpf && env -u RUSTC -u RUSTC_WRAPPER cargo +nightly clippy --locked --release \
  -Z build-std=core --target bpfel-unknown-none --target-dir ../../target/ebpf -- -D warnings)

step "build binaries used by the end-to-end tests"
cargo build --workspace --bins --locked

step "unit and end-to-end tests"
cargo test --workspace --locked --no-fail-fast -- --test-threads="${BERTH_TEST_THREADS:-2}"
