#!/usr/bin/env bash
# Berth CSI demo: the OpenStack simulator (real sparse files + loop devices) and berth-csi on this
# machine. Creates a Cinder volume, attaches it through Nova, stages it (mkfs.ext4 + mount),
# publishes it into a "pod" directory, writes a file, unmounts everything, mounts it again into
# another pod and shows the file survived. Everything is cleaned up on exit.
#
# Usage (as root): scripts/demo-csi.sh [BIN_DIR]      BIN_DIR defaults to target/debug and must
# hold berth-controlplane, berth-csi and berth-csi-client
# (cargo build -p berth-controlplane -p berth-csi).
set -euo pipefail

BIN_DIR="${1:-${BIN_DIR:-target/debug}}"
PORT="${BERTH_SIM_PORT:-0}"   # 0: any free port (read back from clouds.yaml)
NODE_ID="7d6b5c2e-1f0a-4e3b-9c8d-2a1b0c9d8e7f"   # the simulator's default instance (node-1)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { echo "demo-csi: $*" >&2; exit 1; }

[[ $EUID -eq 0 ]] || die "run as root (loop devices and mounts)"
for b in berth-controlplane berth-csi berth-csi-client; do
  [[ -x "$BIN_DIR/$b" ]] || die "$BIN_DIR/$b missing: cargo build -p berth-controlplane -p berth-csi"
done
BIN_DIR="$(cd "$BIN_DIR" && pwd)"

WORK="$(mktemp -d /tmp/berth-csi-demo.XXXXXX)"
SIM_PID=""; CSI_PID=""
cleanup() {
  set +e
  [[ -n "$CSI_PID" ]] && kill "$CSI_PID" 2>/dev/null && wait "$CSI_PID" 2>/dev/null
  # Unmount whatever is left under the work dir, deepest first.
  awk -v w="$WORK" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
  # SIGTERM lets the simulator detach its loop devices and remove its by-id links.
  [[ -n "$SIM_PID" ]] && kill "$SIM_PID" 2>/dev/null && wait "$SIM_PID" 2>/dev/null
  losetup -n -l -O NAME,BACK-FILE | awk -v w="$WORK" 'index($2, w) == 1 {print $1}' |
    while read -r d; do losetup -d "$d"; done
  rm -rf "$WORK"
  echo "demo-csi: cleaned up $WORK"
}
trap cleanup EXIT

say "starting the OpenStack simulator (Keystone, Cinder, Nova, metadata)"
"$BIN_DIR/berth-controlplane" openstack --listen "127.0.0.1:$PORT" --state-dir "$WORK/sim" \
  --write-clouds-yaml "$WORK/clouds.yaml" >"$WORK/sim.log" 2>&1 &
SIM_PID=$!
for _ in $(seq 100); do [[ -s "$WORK/clouds.yaml" ]] && break; sleep 0.05; done
[[ -s "$WORK/clouds.yaml" ]] || { cat "$WORK/sim.log"; die "simulator did not start"; }
SIM_URL="$(sed -n 's|^ *auth_url: \(http://[^/]*\)/.*|\1|p' "$WORK/clouds.yaml")"
echo "simulator at $SIM_URL"

say "starting berth-csi (controller + node) on $WORK/csi.sock"
SOCK="unix://$WORK/csi.sock"
"$BIN_DIR/berth-csi" --endpoint "$SOCK" --clouds-yaml "$WORK/clouds.yaml" --cloud berth-sim \
  --device-dir "$WORK/sim/by-id" --metadata-url "$SIM_URL" \
  --metadata-search-order metadataService >"$WORK/csi.log" 2>&1 &
CSI_PID=$!
for _ in $(seq 100); do [[ -S "$WORK/csi.sock" ]] && break; sleep 0.05; done
[[ -S "$WORK/csi.sock" ]] || { cat "$WORK/csi.log"; die "berth-csi did not start"; }
csi() { "$BIN_DIR/berth-csi-client" --endpoint "$SOCK" "$@"; }

csi info

say "CreateVolume (1 GiB, type high-speed): a sparse file in the simulator"
VOL="$(csi create --name demo-data --size-gib 1 --type high-speed)"
echo "volume $VOL"

say "ControllerPublishVolume: Nova attaches it (a real loop device + by-id link)"
csi attach --volume "$VOL" --node "$NODE_ID"
ls -l "$WORK/sim/by-id/"

say "NodeStageVolume: blank device → mkfs.ext4 → mounted at the staging path"
STAGING="$WORK/kubelet/plugins/kubernetes.io/csi/staging/$VOL"
mkdir -p "$STAGING"
csi stage --volume "$VOL" --staging "$STAGING"
findmnt -n -o SOURCE,FSTYPE,TARGET "$STAGING"

say "NodePublishVolume into pod-1, write a file"
POD1="$WORK/kubelet/pods/pod-1/volumes/kubernetes.io~csi/data/mount"
csi publish --volume "$VOL" --staging "$STAGING" --target "$POD1"
echo "written by pod-1 at $(date -u +%H:%M:%S)" >"$POD1/hello.txt"
cat "$POD1/hello.txt"
csi stats --volume "$VOL" --path "$POD1"

say "NodeUnpublish + NodeUnstage: nothing mounted any more"
csi unpublish --volume "$VOL" --target "$POD1"
csi unstage --volume "$VOL" --staging "$STAGING"
if findmnt "$STAGING" >/dev/null; then die "still mounted"; else echo "staging path unmounted"; fi

say "stage again (no reformat: the disk already holds ext4) and publish into pod-2"
csi stage --volume "$VOL" --staging "$STAGING"
POD2="$WORK/kubelet/pods/pod-2/volumes/kubernetes.io~csi/data/mount"
csi publish --volume "$VOL" --staging "$STAGING" --target "$POD2"
echo "pod-2 reads: $(cat "$POD2/hello.txt")"

say "tear down through CSI: unpublish, unstage, detach, delete"
csi unpublish --volume "$VOL" --target "$POD2"
csi unstage --volume "$VOL" --staging "$STAGING"
csi detach --volume "$VOL" --node "$NODE_ID"
csi delete --volume "$VOL"
echo "demo complete: the file survived an unmount/remount"
