#!/usr/bin/env bash
# Pod networking demo: a three-node cluster on this machine. Every node is a network namespace
# with its own berth-agent (socket, state, pin root), joined to the others by a "private network"
# (a bridge in a namespace of its own); a directory of Kubernetes manifests (one Node object per
# node) plays the API server. Pods (network namespaces) are wired by the real `berth` CNI binary
# and talk across nodes by native routing or through the VXLAN overlay. Then a node leaves the
# cluster and comes back, and an agent is killed with -9 and restarted under live traffic.
# Everything stays inside namespaces made here and is removed on exit (checked at the end).
#
# Usage: scripts/demo-network.sh [bin-dir] [native|vxlan]
#   bin-dir defaults to target/debug; the mode defaults to $BERTH_DEMO_ROUTING, else native.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/debug}"
BIN="$(cd "$BIN" && pwd)"
MODE="${2:-${BERTH_DEMO_ROUTING:-native}}"
case "$MODE" in
  native | vxlan) ;;
  *) echo "demo-network: routing mode must be native or vxlan, not '$MODE'" >&2; exit 2 ;;
esac
[[ $EUID -eq 0 ]] || { echo "demo-network: run as root (network namespaces, eBPF)" >&2; exit 1; }
for b in berth-agent berth berthctl; do
  [[ -x "$BIN/$b" ]] || { echo "demo-network: $BIN/$b missing (cargo build --bins)" >&2; exit 1; }
done
for t in ip nsenter jq ping iperf3; do
  command -v "$t" >/dev/null || { echo "demo-network: $t missing (scripts/bootstrap.sh)" >&2; exit 1; }
done

N=3
TAG="berthdemo-$$"              # prefix of every namespace, pin directory and temp directory
NET="$TAG-net"                  # the private network: bridge br0
WORK="$(mktemp -d "/tmp/$TAG.XXXXXX")"
MANIFESTS="$WORK/manifests"
NODES=(node-a node-b node-c)
NODE_NS=() NODE_IP=() POD_CIDR=() PIN=() DIR=() SOCK=() AGENT_PID=()
for i in $(seq 0 $((N - 1))); do
  NODE_NS[i]="$TAG-n$i"
  NODE_IP[i]="192.168.77.$((10 + i))"
  POD_CIDR[i]="10.2.$((10 + i)).0/24"
  PIN[i]="/sys/fs/bpf/$TAG-n$i"
  DIR[i]="$WORK/${NODES[i]}"
  SOCK[i]="${DIR[i]}/agent.sock"
  AGENT_PID[i]=""
done
NAMESPACES=()                   # every namespace made here, deleted in reverse order
BG=()                           # background helpers (iperf3 servers, clients)
declare -A POD_NODE POD_IP      # pod name -> node index / address

cleanup() {
  local rc=$? leftover=""
  set +e
  trap - EXIT INT TERM
  for p in "${BG[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${AGENT_PID[@]}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null; done
  for _ in $(seq 1 50); do
    local alive=""
    for p in "${AGENT_PID[@]}" "${BG[@]}"; do [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null && alive=1; done
    [[ -z "$alive" ]] && break
    sleep 0.1
  done
  for p in "${AGENT_PID[@]}" "${BG[@]}"; do [[ -n "$p" ]] && kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
  for ((k = ${#NAMESPACES[@]} - 1; k >= 0; k--)); do ip netns del "${NAMESPACES[k]}" 2>/dev/null; done
  rm -rf "${PIN[@]}" "$WORK"
  # Nothing of this run may be left: namespaces, pins, temp files, processes.
  leftover="$(
    ip netns list | grep -E "^$TAG-" | sed 's/^/netns /'
    find /sys/fs/bpf /tmp -maxdepth 1 \( -name "$TAG-*" -o -name "$TAG.*" \) 2>/dev/null | sed 's/^/path /'
    pgrep -a -f -- "${TAG}[-.]" | sed 's/^/process /'
  )"
  if [[ -n "$leftover" ]]; then
    printf '\033[1;31mcleanup incomplete:\033[0m\n%s\n' "$leftover" >&2
    exit 1
  fi
  if [[ $rc -eq 0 ]]; then
    say "cleanup: agents stopped; namespaces, pins under /sys/fs/bpf and $WORK removed; none left"
  else
    echo "demo-network: failed (exit $rc); everything it created has been removed" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
note() { printf '   \033[2m%s\033[0m\n' "$*"; }
in_ns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" "$@"; }
in_node() { local i=$1; shift; in_ns "${NODE_NS[i]}" "$@"; }
in_pod() { local p=$1; shift; in_ns "$TAG-$p" "$@"; }
ctl() { local i=$1; shift; "$BIN/berthctl" --socket "${SOCK[i]}" "$@"; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
new_ns() { ip netns add "$1"; NAMESPACES+=("$1"); ip -n "$1" link set lo up; }
# Berth's routes (proto 190) on node $1, destinations only, sorted, one line.
routes_of() { in_node "$1" ip -4 route show proto 190 | awk '{print $1}' | sort | tr '\n' ' ' | sed 's/ $//'; }
# Every other node's pod CIDR as node $1 should route them (the format of routes_of).
remote_cidrs() {
  local j
  for j in $(seq 0 $((N - 1))); do if [[ $j -ne $1 ]]; then echo "${POD_CIDR[j]}"; fi; done |
    sort | tr '\n' ' ' | sed 's/ $//'
}
# Polls (every 20 ms, up to 10 s) until node $1's routes are "$2"; prints the milliseconds it took.
wait_routes() {
  local start; start=$(now_ms)
  for _ in $(seq 1 500); do
    [[ "$(routes_of "$1")" == "$2" ]] && { echo $(($(now_ms) - start)); return 0; }
    sleep 0.02
  done
  echo "node ${NODES[$1]}: routes are '$(routes_of "$1")', expected '$2'" >&2
  return 1
}
# Node object as the API server would serve it (written atomically: temp file + rename).
write_node() {
  local i=$1 f="$MANIFESTS/${NODES[$1]}.yaml"
  cat >"$MANIFESTS/.${NODES[i]}.tmp" <<EOF
apiVersion: v1
kind: Node
metadata:
  name: ${NODES[i]}
  labels: {kubernetes.io/hostname: ${NODES[i]}}
spec:
  podCIDR: ${POD_CIDR[i]}
  podCIDRs: [${POD_CIDR[i]}]
status:
  addresses:
    - {type: InternalIP, address: ${NODE_IP[i]}}
    - {type: Hostname, address: ${NODES[i]}}
  conditions:
    - {type: Ready, status: "True"}
EOF
  mv "$MANIFESTS/.${NODES[i]}.tmp" "$f"
}
start_agent() {
  local i=$1
  # nsenter --net changes only the network namespace, so the agent sees the host's bpffs at
  # /sys/fs/bpf (`ip netns exec` would remount /sys). nsenter itself, not in_node: a backgrounded
  # function would be a subshell and $! would not be the agent.
  nsenter --net="/run/netns/${NODE_NS[i]}" "$BIN/berth-agent" --config /dev/null \
    --socket "${SOCK[i]}" --state-dir "${DIR[i]}/state" --cni-state-dir "${DIR[i]}/cni" \
    --pin-root "${PIN[i]}" --node-name "${NODES[i]}" --manifests "$MANIFESTS" --routing "$MODE" \
    --log info >>"${DIR[i]}/agent.log" 2>&1 &
  AGENT_PID[i]=$!
  for _ in $(seq 1 300); do
    [[ -S "${SOCK[i]}" ]] && ctl "$i" status >/dev/null 2>&1 && return 0
    kill -0 "${AGENT_PID[i]}" 2>/dev/null || break
    sleep 0.1
  done
  echo "berth-agent on ${NODES[i]} did not come up:" >&2
  tail -n 30 "${DIR[i]}/agent.log" >&2
  return 1
}
cni_conf() {
  printf '{"cniVersion":"1.1.0","name":"berth","type":"berth","agentSocket":"%s","stateDir":"%s"}' \
    "${SOCK[$1]}" "${DIR[$1]}/cni"
}
# CNI ADD of pod $2 (default/$2, netns $TAG-$2) on node $1, by the berth binary run in the node.
add_pod() {
  local i=$1 name=$2 result
  new_ns "$TAG-$name"
  result=$(cni_conf "$i" | CNI_COMMAND=ADD CNI_CONTAINERID="ctr-$name" CNI_NETNS="/run/netns/$TAG-$name" \
    CNI_IFNAME=eth0 CNI_PATH=/opt/cni/bin \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=$name" in_node "$i" "$BIN/berth")
  POD_NODE[$name]=$i
  POD_IP[$name]=$(jq -r '.ips[0].address' <<<"$result" | cut -d/ -f1)
  printf '   %-6s on %s: %-11s mtu %s\n' "$name" "${NODES[i]}" "${POD_IP[$name]}" \
    "$(in_pod "$name" ip -o link show eth0 | grep -o 'mtu [0-9]*' | cut -d' ' -f2)"
}
del_pod() {
  local name=$1 i=${POD_NODE[$1]}
  cni_conf "$i" | CNI_COMMAND=DEL CNI_CONTAINERID="ctr-$name" CNI_NETNS="/run/netns/$TAG-$name" \
    CNI_IFNAME=eth0 CNI_PATH=/opt/cni/bin in_node "$i" "$BIN/berth"
}
# One ping line: "web (node-a) → api (node-b) 10.2.11.2: 3/3 replies, ttl=62, rtt avg 0.1 ms".
ping_line() {
  local from=$1 to=$2 out ttl ok
  out=$(in_pod "$from" ping -c 3 -i 0.2 -W 1 "${POD_IP[$to]}" 2>&1 || true)
  ok=$(grep -o '[0-9]* received' <<<"$out" | cut -d' ' -f1 || true)
  ttl=$(grep -o 'ttl=[0-9]*' <<<"$out" | head -n1 || true)
  printf '   %-5s (%s) → %-5s (%s) %-11s %s/3 replies, %s, rtt avg %s ms\n' "$from" \
    "${NODES[${POD_NODE[$from]}]}" "$to" "${NODES[${POD_NODE[$to]}]}" "${POD_IP[$to]}" "${ok:-0}" \
    "${ttl:-no reply}" "$(grep -o 'rtt [^=]*= [0-9.]*/[0-9.]*' <<<"$out" | awk -F/ '{print $NF}')"
  [[ "${ok:-0}" -gt 0 ]]
}
# Pings until one reply (up to $3 s); true if one came.
ping_until() {
  local deadline=$(($(now_ms) + $3 * 1000))
  while (($(now_ms) < deadline)); do
    in_pod "$1" ping -c 1 -W 1 "${POD_IP[$2]}" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

T0=$(now_ms)
say "cluster: $N nodes on a private network 192.168.77.0/24, routing mode '$MODE'"
new_ns "$NET"
in_ns "$NET" ip link add br0 type bridge
in_ns "$NET" ip link set br0 up
mkdir -p "$MANIFESTS"
for i in $(seq 0 $((N - 1))); do
  mkdir -p "${DIR[i]}"
  new_ns "${NODE_NS[i]}"
  ip -n "$NET" link add "v$i" type veth peer name eth0 netns "${NODE_NS[i]}"
  ip -n "$NET" link set "v$i" master br0 up
  ip -n "${NODE_NS[i]}" addr add "${NODE_IP[i]}/24" dev eth0
  ip -n "${NODE_NS[i]}" link set eth0 up
  # The kubelet registers the node before the CNI runs: every Node object exists before any agent.
  write_node "$i"
  printf '   %s: netns %s, eth0 %s, Node object %s (podCIDR %s)\n' "${NODES[i]}" "${NODE_NS[i]}" \
    "${NODE_IP[i]}/24" "manifests/${NODES[i]}.yaml" "${POD_CIDR[i]}"
done
note "the manifest directory plays the API server; ${NODES[0]}'s Node object:"
sed 's/^/      /' "$MANIFESTS/${NODES[0]}.yaml"

say "berth-agent on every node: --manifests <dir> --routing $MODE (no --pod-cidr: it comes from the Node object)"
for i in $(seq 0 $((N - 1))); do start_agent "$i"; done
for i in $(seq 0 $((N - 1))); do
  echo "-- berthctl status on ${NODES[i]}"
  ctl "$i" status | grep -E '^(agent|datapath|ipam)'
  # The routing mode, pod MTU and uplink are in the agent's start-up line.
  grep -m1 'node networking ready' "${DIR[i]}/agent.log" | sed 's/\x1b\[[0-9;]*m//g' |
    grep -oE '(mode|mtu|uplink|node_ip)=[^ ]*' | sed -E 's/Some\("?([^")]*)"?\)/\1/' |
    tr '\n' ' ' | sed 's/^/routing    /; s/ $/\n/'
done

say "routes to the other nodes' pods on ${NODES[0]} (ip route show proto 190)"
for i in $(seq 0 $((N - 1))); do
  wait_routes "$i" "$(remote_cidrs "$i")" >/dev/null
done
in_node 0 ip route show proto 190 | sed 's/^/   /'
if [[ $MODE == vxlan ]]; then
  note "one flow-based VXLAN device; the eBPF datapath sets the tunnel key (remote node IP) per packet:"
  in_node 0 ip -d -j link show berth_vxlan | jq -r '.[0] | "   berth_vxlan: mtu \(.mtu), " +
    (if .linkinfo.info_data.external then "external (flow-based)" else "NOT external" end) +
    ", UDP port \(.linkinfo.info_data.port)"'
else
  note "native: routes via each node's InternalIP on the private network, no encapsulation"
  in_node 0 ip link show berth_vxlan >/dev/null 2>&1 || note "(and no berth_vxlan device on the node)"
fi

say "CNI ADD: pods web + cache on ${NODES[0]}, api on ${NODES[1]}, db on ${NODES[2]}"
add_pod 0 web
add_pod 0 cache
add_pod 1 api
add_pod 2 db
note "pod MTU: $( [[ $MODE == vxlan ]] && echo "1450 = 1500-byte uplink - 50 bytes of VXLAN" || echo "1500 = the uplink's")"

say "ping: same node (redirected in eBPF, ttl stays 64) and across nodes (ttl 62: routed once by each node, in eBPF)"
for _ in $(seq 1 3); do ping_until web api 5 && ping_until web db 5 && break; done
ping_line web cache
ping_line web api
ping_line web db
ping_line api db
ping_line db web
printf '   %-5s (%s) → %-5s (%s) %-11s %s\n' "node" "${NODES[0]}" "api" "${NODES[1]}" "${POD_IP[api]}" \
  "$(in_node 0 ping -c 2 -i 0.2 -W 1 "${POD_IP[api]}" | grep -o '[0-9]* received.*loss')"
mtu=$([[ $MODE == vxlan ]] && echo 1450 || echo 1500)
if in_pod web ping -c 1 -W 2 -M "do" -s $((mtu - 28)) "${POD_IP[db]}" >/dev/null 2>&1; then
  echo "   DF ping web → db with $mtu-byte packets: passes"
else
  echo "   DF ping web → db with $mtu-byte packets: FAILED"; exit 1
fi

say "TCP: iperf3 web (${NODES[0]}) → api (${NODES[1]}) for 2 s, across nodes"
in_pod api iperf3 -s -1 >/dev/null 2>&1 &
BG+=($!)
sleep 0.3
in_pod web iperf3 -c "${POD_IP[api]}" -t 2 | grep -E "sender|receiver" | sed 's/^/   /'

say "berthctl endpoints on ${NODES[0]} (per-pod counters, from eBPF maps)"
ctl 0 endpoints

if [[ $MODE == vxlan ]]; then
  in_node 0 ip -s -j link show berth_vxlan | jq -r '.[0].stats64 |
    "   berth_vxlan on node-a: TX \(.tx.packets) packets / \(.tx.bytes) bytes, RX \(.rx.packets) packets (encapsulated on eth0, UDP 8472)"'
fi

say "NetworkPolicy in eBPF: only api may reach db"
write_pod() {
  local name=$1
  cat >"$MANIFESTS/.pod-$name.tmp" <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name, namespace: default, labels: {app: $name}}
spec: {nodeName: ${NODES[${POD_NODE[$name]}]}, containers: [{name: c, image: demo}]}
status: {phase: Running, podIP: ${POD_IP[$name]}, podIPs: [{ip: ${POD_IP[$name]}}]}
EOF
  mv "$MANIFESTS/.pod-$name.tmp" "$MANIFESTS/pod-$name.yaml"
}
for p in web cache api db; do write_pod "$p"; done
cat >"$MANIFESTS/.policy.tmp" <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-api, namespace: default}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: api}}}]}]
EOF
mv "$MANIFESTS/.policy.tmp" "$MANIFESTS/policy-db-from-api.yaml"
sed 's/^/      /' "$MANIFESTS/policy-db-from-api.yaml"
for _ in $(seq 1 100); do
  [[ $(ctl 2 --json status | jq '.policy.isolatedEndpoints') -ge 1 ]] && break
  sleep 0.1
done
ctl 2 status | grep '^policy' | sed 's/^/   /'
MONITOR_OUT="$WORK/monitor.txt"
in_node 2 "$BIN/berthctl" --socket "${SOCK[2]}" monitor --verdict denied --pod default/db --count 1 \
  >"$MONITOR_OUT" 2>/dev/null &
MON=$!
BG+=("$MON")
sleep 0.3
if in_pod api ping -c 2 -i 0.2 -W 1 "${POD_IP[db]}" >/dev/null 2>&1; then
  echo "   api → db: allowed (replies pass through conntrack)"
else
  echo "   api → db: FAILED (should be allowed)"; exit 1
fi
if in_pod web ping -c 2 -i 0.2 -W 1 "${POD_IP[db]}" >/dev/null 2>&1; then
  echo "   web → db: NOT refused (the policy should deny it)"; exit 1
else
  echo "   web → db: refused by db's ingress policy, dropped in eBPF on ${NODES[2]}"
fi
for _ in $(seq 1 30); do kill -0 "$MON" 2>/dev/null || break; sleep 0.1; done
note "berthctl monitor --verdict denied --pod default/db on ${NODES[2]}:"
sed 's/^/      /' "$MONITOR_OUT"
grep -q DENIED "$MONITOR_OUT" || { echo "   monitor showed no drop"; exit 1; }
rm "$MANIFESTS/policy-db-from-api.yaml"
note "policy removed: web → db again $(ping_until web db 5 && echo reachable || echo UNREACHABLE)"

say "${NODES[2]} leaves: its Node object is removed from the manifest directory"
ping_until web db 5
rm "$MANIFESTS/${NODES[2]}.yaml"
ms=$(wait_routes 0 "${POD_CIDR[1]}")
echo "   ${NODES[0]}'s route to ${POD_CIDR[2]} gone after ${ms} ms; routes now: $(routes_of 0)"
if in_pod web ping -c 2 -i 0.2 -W 1 "${POD_IP[db]}" >/dev/null 2>&1; then
  echo "   web → db still answered: FAILED"; exit 1
fi
echo "   web → db ${POD_IP[db]}: no reply (node unknown to the cluster)"
say "${NODES[2]} comes back: its Node object is written again"
write_node 2
ms=$(wait_routes 0 "$(remote_cidrs 0)")
echo "   route to ${POD_CIDR[2]} back after ${ms} ms"
ping_until web db 5
ping_line web db

say "kill -9 of ${NODES[0]}'s agent under a live cross-node TCP stream (web → api, 4 s)"
in_pod api iperf3 -s -1 >/dev/null 2>&1 &
BG+=($!)
sleep 0.3
in_pod web iperf3 -c "${POD_IP[api]}" -t 4 -i 1 --forceflush >"$WORK/iperf-kill.txt" 2>&1 &
IPERF=$!
BG+=("$IPERF")
T_IPERF=$(now_ms)
sleep 1.2
kill -9 "${AGENT_PID[0]}"
wait "${AGENT_PID[0]}" 2>/dev/null || true
echo "   t=$(awk -v ms=$(($(now_ms) - T_IPERF)) 'BEGIN{printf "%.1f", ms/1000}') s: agent (pid ${AGENT_PID[0]}) killed with -9"
AGENT_PID[0]=""
sleep 0.8
start_agent 0
echo "   t=$(awk -v ms=$(($(now_ms) - T_IPERF)) 'BEGIN{printf "%.1f", ms/1000}') s: new agent (pid ${AGENT_PID[0]}) serving"
wait "$IPERF" || true
grep -E '^\[ *[0-9]+\] +[0-9.]+-[0-9.]+ +sec' "$WORK/iperf-kill.txt" | grep -v -E 'sender|receiver' | sed 's/^/   /'
grep -E "sender|receiver" "$WORK/iperf-kill.txt" | sed 's/^/   /'
echo "-- berthctl status on ${NODES[0]} after the restart"
ctl 0 status | grep -E '^(datapath|ipam|endpoints)'
note "the new agent adopted the pinned programs and maps; a pod added now works at once:"
add_pod 0 worker
ping_until worker db 5
ping_line worker db

say "CNI DEL for all pods"
for name in web cache worker api db; do del_pod "$name"; done
for i in $(seq 0 $((N - 1))); do echo "   ${NODES[i]}: $(ctl "$i" status | grep '^ipam')"; done
say "network demo took $((($(now_ms) - T0) / 1000)) s"
