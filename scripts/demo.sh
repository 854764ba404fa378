#!/usr/bin/env bash
# Berth's demo command: a simulated node on this machine, no cluster needed.
#  1. pod networking: berth-agent + eBPF datapath, pods wired by the `berth` CNI binary, traffic;
#  2. the node registers with a local control plane and is reached through the Konnectivity tunnel;
#  3. storage: a Cinder volume (OpenStack simulator on loop devices) staged, mounted into a pod,
#     written, and still there after an unmount/remount.
# Does all of its own set-up (scripts/bootstrap.sh + build) and cleans up on exit. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[[ -f "$HOME/.cargo/env" ]] && . "$HOME/.cargo/env"
if [[ $EUID -ne 0 ]]; then echo "scripts/demo.sh must run as root" >&2; exit 1; fi
# Usage: scripts/demo.sh [native|vxlan]: how the demo cluster routes pods between its three nodes
# (default $BERTH_DEMO_ROUTING, else native).
MODE="${1:-${BERTH_DEMO_ROUTING:-native}}"
case "$MODE" in
  native | vxlan) ;;
  *) echo "usage: scripts/demo.sh [native|vxlan]" >&2; exit 2 ;;
esac

bash scripts/bootstrap.sh
cargo build --workspace --bins --locked
BIN="$(pwd)/target/debug"

bash scripts/demo-network.sh "$BIN" "$MODE"
for part in tunnel csi; do
  if [[ -x scripts/demo-$part.sh ]]; then
    printf '\n\033[1m######## %s ########\033[0m\n' "$part"
    bash "scripts/demo-$part.sh" "$BIN"
  fi
done
printf '\n\033[1mdemo finished; everything it created has been removed\033[0m\n'
