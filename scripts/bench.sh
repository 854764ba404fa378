#!/usr/bin/env bash
# Runs Berth's benchmarks (release build) and writes bench/results/*.json.
# Usage: sudo scripts/bench.sh [cni|tunnel|csi|cluster|controlplane ...]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[[ -f "$HOME/.cargo/env" ]] && . "$HOME/.cargo/env"
bash scripts/bootstrap.sh
cargo build --release --workspace --bins --locked
benches=("$@")
if ((${#benches[@]} == 0)); then
  benches=()
  for b in cni tunnel csi cluster controlplane; do [[ -x target/release/$b ]] && benches+=("$b"); done
fi
for b in "${benches[@]}"; do
  echo "==> bench $b" >&2
  "target/release/$b"
done
