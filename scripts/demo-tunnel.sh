#!/usr/bin/env bash
# Demo of the Konnectivity-compatible tunnel and node registration.
#
# A "control plane" network namespace runs berth-controlplane; a "node" namespace (joined to it by
# a veth pair, behind which nothing else is reachable) runs berth-agent with its tunnel and a
# kubelet-like HTTPS server on :10250. The node registers itself, then a page is fetched from the
# kubelet-like server through controlplane → tunnel → agent, exactly as kube-apiserver's egress
# selector would do (HTTP CONNECT). Everything is removed on exit.
#
# Usage: scripts/demo-tunnel.sh [BIN_DIR]   (default target/debug; needs root)
set -euo pipefail

BIN=${1:-target/debug}
BIN=$(cd "$BIN" && pwd)
[ "$(id -u)" = 0 ] || { echo "demo-tunnel: run as root (network namespaces, eBPF)" >&2; exit 1; }
for b in berth-controlplane berth-agent berthctl; do
  [ -x "$BIN/$b" ] || { echo "demo-tunnel: $BIN/$b missing (cargo build --bins)" >&2; exit 1; }
done
for t in ip nsenter openssl curl; do
  command -v "$t" >/dev/null || { echo "demo-tunnel: $t missing (scripts/bootstrap.sh)" >&2; exit 1; }
done

TMP=$(mktemp -d /tmp/berth-demo-tunnel.XXXXXX)
CP=bdtcp$$
NODE=bdtnd$$
PIN=/sys/fs/bpf/berth-demo-tunnel-$$
PIDS=()
cleanup() {
  set +e
  # The agent drains on the first SIGTERM and stops on the second.
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
  ip netns del "$CP" 2>/dev/null
  ip netns del "$NODE" 2>/dev/null
  rm -rf "$PIN" "$TMP"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_cp() { nsenter --net="/run/netns/$CP" "$@"; }

step "network: control plane 10.199.0.1 <-veth-> node 10.199.0.2"
ip netns add "$CP"
ip netns add "$NODE"
ip link add "vc$$" netns "$CP" type veth peer name "vn$$" netns "$NODE"
ip -n "$CP" addr add 10.199.0.1/24 dev "vc$$"
ip -n "$NODE" addr add 10.199.0.2/24 dev "vn$$"
for ns in "$CP" "$NODE"; do ip -n "$ns" link set lo up; done
ip -n "$CP" link set "vc$$" up
ip -n "$NODE" link set "vn$$" up
# The node is "behind NAT": nothing may connect into it from the control plane's side; only
# connections the node opens itself (the tunnel) pass.
in_node_fw() { ip netns exec "$NODE" "$@"; }
if command -v iptables >/dev/null; then
  { in_node_fw iptables -A INPUT -i "vn$$" -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT &&
    in_node_fw iptables -A INPUT -i "vn$$" -j DROP; } || echo "(iptables unavailable: node not firewalled)"
fi

# A random agent token (never printed).
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$TMP/token"
chmod 600 "$TMP/token"

step "kubelet-like HTTPS server on the node (:10250)"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=node-demo \
  -addext "subjectAltName=IP:10.199.0.2,IP:127.0.0.1" \
  -keyout "$TMP/kubelet.key" -out "$TMP/kubelet.crt" 2>/dev/null
mkdir -p "$TMP/www"
echo "hello from the kubelet on node-demo ($(date -u +%H:%M:%S))" > "$TMP/www/index.html"
# Background processes are started with nsenter directly (it execs the program), so $! is the
# program's own PID and the cleanup trap can stop it.
nsenter --net="/run/netns/$NODE" --wd="$TMP/www" openssl s_server -quiet -accept 10250 \
  -cert "$TMP/kubelet.crt" -key "$TMP/kubelet.key" -WWW >"$TMP/kubelet.log" 2>&1 &
PIDS+=($!)

step "control plane (tunnel server, node API, lifecycle controller)"
nsenter --net="/run/netns/$CP" "$BIN/berth-controlplane" serve \
  --agent-listen 10.199.0.1:8091 --status-listen 127.0.0.1:8092 \
  --connect-uds "$TMP/konnectivity-connect.sock" --proxy-uds "$TMP/konnectivity-grpc.sock" \
  --connect-listen 127.0.0.1:8090 \
  --token-file "$TMP/token" --server-id cp-demo --heartbeat-interval-ms 1000 \
  >"$TMP/controlplane.log" 2>&1 &
PIDS+=($!)

step "berth-agent on the node, with its tunnel"
nsenter --net="/run/netns/$NODE" "$BIN/berth-agent" \
  --pod-cidr 10.2.9.0/24 --node-name node-demo \
  --socket "$TMP/agent.sock" --state-dir "$TMP/agent-state" --cni-state-dir "$TMP/cni" \
  --pin-root "$PIN" --no-fsync \
  --tunnel-server 10.199.0.1:8091 --tunnel-token-file "$TMP/token" \
  --node-ip 10.199.0.2 --node-instance-id 7d1c1f9e-demo --node-pool demo-pool \
  --node-flavor b3-16 --node-zone demo-a --node-label env=demo \
  --node-taint dedicated=demo:NoSchedule \
  --node-kubelet-healthz none --node-runtime-socket none --node-datapath-pin "$PIN" \
  --node-state-file "$TMP/node.json" --node-disk-path "$TMP" \
  >"$TMP/agent.log" 2>&1 &
PIDS+=($!)

step "waiting for the node to register and turn Ready"
for _ in $(seq 1 150); do
  if in_cp "$BIN/berth-controlplane" status --status-addr 127.0.0.1:8092 2>/dev/null | grep -q 'node-demo.*Ready'; then
    break
  fi
  sleep 0.2
done
in_cp "$BIN/berth-controlplane" status --status-addr 127.0.0.1:8092
in_cp "$BIN/berth-controlplane" status --status-addr 127.0.0.1:8092 | grep -q 'node-demo.*Ready' \
  || { echo "node did not register; agent log:" >&2; tail -20 "$TMP/agent.log" >&2; exit 1; }

step "berthctl node (the node's own view)"
"$BIN/berthctl" node --state-file "$TMP/node.json"

step "GET https://10.199.0.2:10250/index.html through controlplane -> tunnel -> agent (HTTP CONNECT)"
in_cp curl -sS --max-time 10 --cacert "$TMP/kubelet.crt" -p -x http://127.0.0.1:8090 \
  https://10.199.0.2:10250/index.html

step "the same URL straight from the control plane's network does not get through (node behind NAT)"
in_cp curl -sS --max-time 3 --cacert "$TMP/kubelet.crt" https://10.199.0.2:10250/index.html 2>&1 | tail -1 || true

step "a destination outside the agent's allow-list is refused"
in_cp curl -sS --max-time 10 -p -x http://127.0.0.1:8090 https://10.199.0.2:22/ 2>&1 | tail -1 || true
grep -h 'dial refused' "$TMP/agent.log" | tail -1 || true

step "done (everything is cleaned up on exit)"
