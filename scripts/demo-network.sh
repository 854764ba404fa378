#!/usr/bin/env bash
# Pod networking demo: a simulated node (network namespace) running berth-agent, three pods
# (network namespaces) wired by the real `berth` CNI binary, traffic between them over the eBPF
# datapath, and `berthctl endpoints`. Cleans up everything on exit.
# Usage: scripts/demo-network.sh [bin-dir]   (bin-dir defaults to target/debug)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/debug}"
BIN="$(cd "$BIN" && pwd)"
TAG="bd$$"
NODE="${TAG}node"
WORK="$(mktemp -d /tmp/berth-demo.XXXXXX)"
PIN="/sys/fs/bpf/berth-demo-$$"
AGENT_PID=""
PODS=()

cleanup() {
  set +e
  [[ -n "$AGENT_PID" ]] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
  for p in "${PODS[@]}"; do ip netns del "$p" 2>/dev/null; done
  ip netns del "$NODE" 2>/dev/null
  rm -rf "$PIN" "$WORK"
}
trap cleanup EXIT INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_node() { nsenter --net="/run/netns/$NODE" "$@"; }

say "node: network namespace $NODE with node IP 10.99.0.1, berth-agent inside"
ip netns add "$NODE"
in_node ip link set lo up
in_node ip addr add 10.99.0.1/32 dev lo
# (nsenter itself, not the in_node function: a backgrounded function would be a subshell and $!
# would not be the agent.)
nsenter --net="/run/netns/$NODE" "$BIN/berth-agent" --config /dev/null --socket "$WORK/agent.sock" \
  --state-dir "$WORK/state" --cni-state-dir "$WORK/cni" --pin-root "$PIN" \
  --pod-cidr 10.2.0.0/24 --node-name demo-node >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 1 100); do [[ -S "$WORK/agent.sock" ]] && break; sleep 0.1; done
[[ -S "$WORK/agent.sock" ]] || { cat "$WORK/agent.log"; exit 1; }
"$BIN/berthctl" --socket "$WORK/agent.sock" status

CONF="{\"cniVersion\":\"1.1.0\",\"name\":\"berth\",\"type\":\"berth\",\"agentSocket\":\"$WORK/agent.sock\",\"stateDir\":\"$WORK/cni\"}"
declare -A IP
for name in web api db; do
  pod="${TAG}$name"
  ip netns add "$pod"; PODS+=("$pod")
  nsenter --net="/run/netns/$pod" ip link set lo up
  say "CNI ADD for pod default/$name (netns $pod)"
  result=$(echo "$CONF" | CNI_COMMAND=ADD CNI_CONTAINERID="ctr-$name" CNI_NETNS="/run/netns/$pod" \
    CNI_IFNAME=eth0 CNI_PATH=/opt/cni/bin \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=$name" in_node "$BIN/berth")
  echo "$result" | jq -c '{ips, routes}'
  IP[$name]=$(echo "$result" | jq -r '.ips[0].address' | cut -d/ -f1)
done

say "traffic: web → api, api → db, db → web (pod to pod, redirected in eBPF: ttl stays 64)"
nsenter --net="/run/netns/${TAG}web" ping -c 3 -i 0.2 "${IP[api]}" | grep -E "ttl|loss"
nsenter --net="/run/netns/${TAG}api" ping -c 3 -i 0.2 "${IP[db]}" | grep -E "ttl|loss"
nsenter --net="/run/netns/${TAG}db" ping -c 3 -i 0.2 "${IP[web]}" | grep -E "ttl|loss"
say "TCP: iperf3 web → db for 2 s"
nsenter --net="/run/netns/${TAG}db" iperf3 -s -1 >/dev/null 2>&1 &
sleep 0.3
nsenter --net="/run/netns/${TAG}web" iperf3 -c "${IP[db]}" -t 2 | grep -E "sender|receiver"
say "pod → node and node → pod"
nsenter --net="/run/netns/${TAG}api" ping -c 2 -i 0.2 10.99.0.1 | grep loss
in_node ping -c 2 -i 0.2 "${IP[api]}" | grep loss

say "berthctl endpoints"
"$BIN/berthctl" --socket "$WORK/agent.sock" endpoints

say "CNI DEL for all pods"
for name in web api db; do
  echo "$CONF" | CNI_COMMAND=DEL CNI_CONTAINERID="ctr-$name" CNI_NETNS="/run/netns/${TAG}$name" \
    CNI_IFNAME=eth0 CNI_PATH=/opt/cni/bin in_node "$BIN/berth"
done
"$BIN/berthctl" --socket "$WORK/agent.sock" status | grep ipam
