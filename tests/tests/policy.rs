//! NetworkPolicy enforced by the eBPF datapath, on real packets (privileged).
//!
//! Three nodes (network namespaces on one bridge, as in the cluster networking tests) laid out as
//! the shared scenarios expect (`n1`-`n3`, 192.168.50.1-3, pod CIDRs 10.2.1-3.0/24); the pods of
//! the e2e matrix (x, y, z × a, b, c) are real pods created through the CNI plugin with the
//! addresses the scenarios give them (`IP=` in `CNI_ARGS`), each serving TCP 80/81 and UDP 80/81
//! (accept / echo) and counting SCTP 80/81 packets with a raw socket: this kernel has no SCTP
//! module, so SCTP probes are single INIT packets, which is all a policy decision looks at.
//! Objects go to the agents' manifest directory; each step waits until every agent reports the
//! step's model applied, then probes every ordered pair (the nine pods and each node's own stack
//! as sources; the pods as destinations) on the six ports, all at once with short timeouts, and
//! compares every cell with the independent reference evaluator (`berth_tests::policy_ref`).
//! A cell that failed to connect where the reference allows is probed once more with a long
//! timeout before it counts (CPU steal), never the other way round.
use berth_tests::cluster::{Cluster, Mode, spawn_in};
use berth_tests::cni::Pod;
use berth_tests::netns::require_root;
use berth_tests::policy_ref::{Objects, Party};
use berth_tests::policy_scenarios::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU16, Ordering},
};
use std::time::{Duration, Instant};

const SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(3);

type ObjKey = (String, String, String);

fn obj_key(v: &Value) -> ObjKey {
    (
        v["kind"].as_str().unwrap().to_string(),
        v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        v["metadata"]["name"].as_str().unwrap().to_string(),
    )
}

/// SCTP packets seen by a pod: (source address, source port, destination port).
type Seen = Arc<Mutex<HashSet<(Ipv4Addr, u16, u16)>>>;

/// A pod of the matrix: its namespace, servers and where it lives.
struct LivePod {
    node: usize,
    ip: Ipv4Addr,
    pod: Pod,
    stop: Arc<AtomicBool>,
    sctp: Seen,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for LivePod {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn raw_sctp_socket() -> OwnedFd {
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, 132) };
    assert!(
        fd >= 0,
        "raw SCTP socket: {}",
        std::io::Error::last_os_error()
    );
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Servers in `pod`: TCP 80/81 accept and close, UDP 80/81 echo, raw SCTP counter.
fn start_servers(
    pod: &Pod,
    stop: &Arc<AtomicBool>,
    sctp: &Seen,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut threads = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let st = stop.clone();
    threads.push(spawn_in(&pod.ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            for port in [80u16, 81] {
                let l = tokio::net::TcpListener::bind(("0.0.0.0", port))
                    .await
                    .unwrap();
                tokio::spawn(async move {
                    loop {
                        if let Ok((s, _)) = l.accept().await {
                            drop(s);
                        }
                    }
                });
                let u = tokio::net::UdpSocket::bind(("0.0.0.0", port))
                    .await
                    .unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    loop {
                        if let Ok((n, from)) = u.recv_from(&mut buf).await {
                            let _ = u.send_to(&buf[..n], from).await;
                        }
                    }
                });
            }
            ready_tx.send(()).unwrap();
            while !st.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }));
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("servers up");
    let st = stop.clone();
    let seen = sctp.clone();
    threads.push(spawn_in(&pod.ns, move || {
        let fd = raw_sctp_socket();
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        let mut buf = [0u8; 2048];
        while !st.load(Ordering::Relaxed) {
            let n = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 24 {
                continue;
            }
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            if (n as usize) < ihl + 4 {
                continue;
            }
            let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
            let sport = u16::from_be_bytes([buf[ihl], buf[ihl + 1]]);
            let dport = u16::from_be_bytes([buf[ihl + 2], buf[ihl + 3]]);
            seen.lock().unwrap().insert((src, sport, dport));
        }
    }));
    threads
}

/// An SCTP INIT header (common header + INIT chunk), enough for a policy decision.
fn sctp_init(sport: u16, dport: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0; 8]); // verification tag 0 (INIT), checksum (not checked here)
    p.extend_from_slice(&[1, 0, 0, 20]); // INIT chunk, length 20
    p.extend_from_slice(&[0x12, 0x34, 0x56, 0x78]); // initiate tag
    p.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&[0, 1, 0, 1]); // streams
    p.extend_from_slice(&1u32.to_be_bytes()); // initial TSN
    p
}

static SCTP_PORT: AtomicU16 = AtomicU16::new(20000);

/// One probe to send.
#[derive(Clone, Copy, Debug)]
struct Probe {
    dst: Ipv4Addr,
    proto: &'static str,
    port: u16,
    /// SCTP source port (identifies the probe at the receiver).
    sctp_sport: u16,
}

/// Sends every probe from the current thread's namespace at once; returns, per probe, whether it
/// got through (SCTP: `None`, the receiver decides).
fn run_probes(probes: &[Probe], within: Duration) -> Vec<Option<bool>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let raw = raw_sctp_socket();
    rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for (i, p) in probes.iter().copied().enumerate() {
            match p.proto {
                "TCP" => {
                    set.spawn(async move {
                        let ok = tokio::time::timeout(
                            within,
                            tokio::net::TcpStream::connect(SocketAddr::from((p.dst, p.port))),
                        )
                        .await
                        .is_ok_and(|r| r.is_ok());
                        (i, Some(ok))
                    });
                }
                "UDP" => {
                    set.spawn(async move {
                        let s = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
                        let _ = s.send_to(b"probe", (p.dst, p.port)).await;
                        let mut buf = [0u8; 16];
                        let ok = tokio::time::timeout(within, s.recv_from(&mut buf))
                            .await
                            .is_ok_and(|r| r.is_ok());
                        (i, Some(ok))
                    });
                }
                _ => {
                    let pkt = sctp_init(p.sctp_sport, p.port);
                    let sa = libc::sockaddr_in {
                        sin_family: libc::AF_INET as u16,
                        sin_port: 0,
                        sin_addr: libc::in_addr {
                            s_addr: u32::from_ne_bytes(p.dst.octets()),
                        },
                        sin_zero: [0; 8],
                    };
                    unsafe {
                        libc::sendto(
                            raw.as_raw_fd(),
                            pkt.as_ptr() as *const libc::c_void,
                            pkt.len(),
                            0,
                            &sa as *const _ as *const libc::sockaddr,
                            std::mem::size_of::<libc::sockaddr_in>() as u32,
                        );
                    }
                }
            }
        }
        let mut out = vec![None; probes.len()];
        while let Some(r) = set.join_next().await {
            let (i, v) = r.unwrap();
            out[i] = v;
        }
        if probes.iter().any(|p| p.proto == "SCTP") {
            // Time for the INITs to arrive where they are allowed.
            tokio::time::sleep(Duration::from_millis(300).min(within)).await;
        }
        out
    })
}

struct Env {
    /// Declared first: the pods go before their nodes.
    pods: BTreeMap<(String, String), LivePod>,
    c: Cluster,
    objects: BTreeMap<ObjKey, Value>,
    /// Files written, by object key.
    files: BTreeMap<ObjKey, std::path::PathBuf>,
}

fn node_pos(name: &str) -> usize {
    NODES.iter().position(|(n, _)| *n == name).expect("node")
}

impl Env {
    fn new(mode: Mode) -> Env {
        require_root();
        let layout: Vec<(String, String, String)> = NODES
            .iter()
            .enumerate()
            .map(|(i, (n, ip))| {
                (
                    n.to_string(),
                    ip.to_string(),
                    format!("10.2.{}.0/24", i + 1),
                )
            })
            .collect();
        let c = Cluster::with_layout(mode, &layout, &[]);
        Env {
            c,
            objects: BTreeMap::new(),
            pods: BTreeMap::new(),
            files: BTreeMap::new(),
        }
    }

    fn file_for(&self, k: &ObjKey) -> std::path::PathBuf {
        self.c
            .manifests
            .path()
            .join(format!("{}-{}-{}.json", k.0.to_lowercase(), k.1, k.2))
    }

    fn revisions(&self) -> Vec<(u64, u64)> {
        self.c
            .nodes
            .iter()
            .map(|n| {
                let st = n.node.berthctl(&["status"]);
                (
                    st["policy"]["seenModelRevision"].as_u64().unwrap_or(0),
                    st["policy"]["appliedModelRevision"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    /// Waits until every agent has seen a model newer than `before` and applied the newest.
    fn wait_applied(&self, before: &[(u64, u64)]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.revisions();
            let done = |r: &[(u64, u64)]| {
                r.iter()
                    .zip(before)
                    .all(|((seen, applied), (b, _))| seen > b && applied == seen)
            };
            if done(&now) {
                std::thread::sleep(Duration::from_millis(150));
                let again = self.revisions();
                if again == now {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "agents did not apply the step: before {before:?}, now {now:?}"
            );
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    fn ensure_pod(&mut self, v: &Value) {
        let ns = v["metadata"]["namespace"].as_str().unwrap().to_string();
        let name = v["metadata"]["name"].as_str().unwrap().to_string();
        let uid = v["metadata"]["uid"].as_str().unwrap_or("").to_string();
        let node = node_pos(v["spec"]["nodeName"].as_str().unwrap());
        let ip: Ipv4Addr = v["status"]["podIP"].as_str().unwrap().parse().unwrap();
        let key = (ns.clone(), name.clone());
        if let Some(p) = self.pods.get(&key)
            && p.node == node
            && p.ip == ip
        {
            return;
        }
        self.remove_pod(&key);
        let pod = Pod::new();
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID={uid};IP={ip}"
        );
        let got = self.c.nodes[node].node.add_with_args(&pod, &args);
        assert_eq!(got, ip.to_string(), "requested address");
        let stop = Arc::new(AtomicBool::new(false));
        let sctp: Seen = Default::default();
        let threads = start_servers(&pod, &stop, &sctp);
        self.pods.insert(
            key,
            LivePod {
                node,
                ip,
                pod,
                stop,
                sctp,
                threads,
            },
        );
    }

    fn remove_pod(&mut self, key: &(String, String)) {
        if let Some(p) = self.pods.remove(key) {
            self.c.nodes[p.node].node.del(&p.pod);
        }
    }

    /// Applies changes (files and pods) and waits for every agent.
    fn step(&mut self, changes: &[Change]) {
        let before = self.revisions();
        let mut wrote = false;
        for ch in changes {
            match ch {
                Change::Apply(v) => {
                    let k = obj_key(v);
                    if k.0 == "Node" {
                        // The cluster wrote its Node objects.
                        continue;
                    }
                    if k.0 == "Pod" {
                        self.ensure_pod(v);
                    }
                    let path = self.file_for(&k);
                    let tmp = path.with_extension("tmp");
                    std::fs::write(&tmp, serde_json::to_vec(v).unwrap()).unwrap();
                    std::fs::rename(&tmp, &path).unwrap();
                    self.files.insert(k.clone(), path);
                    self.objects.insert(k, v.clone());
                    wrote = true;
                }
                Change::Delete(kind, ns, name) => {
                    let k = (kind.to_string(), ns.clone(), name.clone());
                    if let Some(path) = self.files.remove(&k) {
                        std::fs::remove_file(path).unwrap();
                        wrote = true;
                    }
                    self.objects.remove(&k);
                    if *kind == "Pod" {
                        self.remove_pod(&(ns.clone(), name.clone()));
                    }
                }
            }
        }
        if wrote {
            self.wait_applied(&before);
        }
    }

    fn reference(&self) -> Objects {
        let mut o = Objects {
            nodes: NODES
                .iter()
                .map(|(n, ip)| (n.to_string(), ip.parse().unwrap()))
                .collect(),
            ..Default::default()
        };
        for v in self.objects.values() {
            match v["kind"].as_str().unwrap() {
                "Pod" => o.pods.push(serde_json::from_value(v.clone()).unwrap()),
                "Namespace" => o
                    .namespaces
                    .push(serde_json::from_value(v.clone()).unwrap()),
                "NetworkPolicy" => o.policies.push(serde_json::from_value(v.clone()).unwrap()),
                _ => {}
            }
        }
        o
    }

    /// Probes every (source, destination pod, protocol/port) at once: `(source, dst, proto,
    /// port) → got through`.
    fn matrix(
        &self,
        cells: &[(Party, (String, String), &'static str, u16)],
        within: Duration,
    ) -> Vec<bool> {
        // Group by source.
        let mut by_src: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, (src, ..)) in cells.iter().enumerate() {
            by_src.entry(src.to_string()).or_default().push(i);
        }
        let mut probes: Vec<Probe> = cells
            .iter()
            .map(|(_, dst, proto, port)| Probe {
                dst: self.pods[dst].ip,
                proto,
                port: *port,
                sctp_sport: 0,
            })
            .collect();
        for p in probes.iter_mut().filter(|p| p.proto == "SCTP") {
            let mut sp = SCTP_PORT.fetch_add(1, Ordering::Relaxed);
            if sp < 20000 {
                SCTP_PORT.store(20001, Ordering::Relaxed);
                sp = 20000;
            }
            p.sctp_sport = sp;
        }
        let mut handles = Vec::new();
        for idx in by_src.values() {
            let ns = match &cells[idx[0]].0 {
                Party::Pod { namespace, name } => {
                    &self.pods[&(namespace.clone(), name.clone())].pod.ns
                }
                Party::Host(n) => &self.c.nodes[node_pos(n)].node.ns,
                Party::Ip(_) => unreachable!(),
            };
            let mine: Vec<Probe> = idx.iter().map(|&i| probes[i]).collect();
            let idx = idx.clone();
            handles.push((idx, spawn_in(ns, move || run_probes(&mine, within))));
        }
        let mut out = vec![false; cells.len()];
        for (idx, h) in handles {
            let res = h.join().expect("prober");
            for (j, &i) in idx.iter().enumerate() {
                if let Some(ok) = res[j] {
                    out[i] = ok;
                }
            }
        }
        // SCTP: the receivers say.
        for (i, (src, dst, proto, port)) in cells.iter().enumerate() {
            if *proto != "SCTP" {
                continue;
            }
            let src_ip = match src {
                Party::Pod { namespace, name } => self.pods[&(namespace.clone(), name.clone())].ip,
                Party::Host(n) => NODES[node_pos(n)].1.parse().unwrap(),
                Party::Ip(_) => unreachable!(),
            };
            let seen = self.pods[dst].sctp.lock().unwrap();
            out[i] = seen.contains(&(src_ip, probes[i].sctp_sport, *port));
        }
        out
    }

    /// Every cell against the reference; returns the number of cells.
    fn check(&self, label: &str) -> usize {
        let reference = self.reference();
        let mut cells = Vec::new();
        let mut sources: Vec<Party> = self.pods.keys().map(|(ns, n)| Party::pod(ns, n)).collect();
        for (n, _) in NODES {
            sources.push(Party::Host(n.into()));
        }
        for src in &sources {
            for dst in self.pods.keys() {
                // A pod's packets to its own address never leave it (the kernel loops them back
                // inside the pod): "pods cannot block localhost access" (Kubernetes docs).
                if *src == Party::pod(&dst.0, &dst.1) {
                    continue;
                }
                for (proto, port) in PROBES {
                    cells.push((src.clone(), dst.clone(), proto.as_k8s(), port));
                }
            }
        }
        let got = self.matrix(&cells, SHORT);
        let want: Vec<bool> = cells
            .iter()
            .map(|(src, (ns, n), proto, port)| {
                reference.allowed(src, &Party::pod(ns, n), proto, *port)
            })
            .collect();
        // Allowed cells that did not get through: once more, slowly.
        let retry: Vec<usize> = (0..cells.len()).filter(|&i| want[i] && !got[i]).collect();
        let mut got = got;
        if !retry.is_empty() {
            let again: Vec<_> = retry.iter().map(|&i| cells[i].clone()).collect();
            let res = self.matrix(&again, LONG);
            for (k, &i) in retry.iter().enumerate() {
                got[i] = res[k];
            }
        }
        let bad: Vec<String> = (0..cells.len())
            .filter(|&i| got[i] != want[i])
            .map(|i| {
                let (src, (ns, n), proto, port) = &cells[i];
                format!(
                    "{src} -> {ns}/{n} {proto}/{port}: reference {}, datapath {}",
                    want[i], got[i]
                )
            })
            .collect();
        if !bad.is_empty() {
            for n in &self.c.nodes {
                let eps = n.node.berthctl(&["endpoints"]);
                eprintln!("{} endpoints: {eps}", n.name);
                eprintln!(
                    "{}",
                    n.node.ns.exec_ok(&[
                        "bpftool",
                        "map",
                        "dump",
                        "pinned",
                        n.node.pin_root.join("maps/BERTH_IPCACHE").to_str().unwrap()
                    ])
                );
            }
        }
        assert!(
            bad.is_empty(),
            "{label}: {} of {} cells differ:\n{}",
            bad.len(),
            cells.len(),
            bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
        );
        cells.len()
    }

    /// Back to the base objects: every policy and every pod outside the base removed, base pods
    /// and namespaces as they were.
    fn reset(&mut self) {
        let base = base();
        let base_keys: BTreeSet<ObjKey> = base
            .iter()
            .filter_map(|c| match c {
                Change::Apply(v) => Some(obj_key(v)),
                _ => None,
            })
            .collect();
        let mut changes: Vec<Change> = self
            .objects
            .keys()
            .filter(|k| !base_keys.contains(k))
            .map(|(k, ns, n)| {
                Change::Delete(
                    if k == "Pod" {
                        "Pod"
                    } else if k == "Namespace" {
                        "Namespace"
                    } else {
                        "NetworkPolicy"
                    },
                    ns.clone(),
                    n.clone(),
                )
            })
            .collect();
        changes.extend(
            base.into_iter().filter(
                |c| matches!(c, Change::Apply(v) if self.objects.get(&obj_key(v)) != Some(v)),
            ),
        );
        if !changes.is_empty() {
            self.step(&changes);
        }
    }
}

fn run_matrix(mode: Mode) {
    let mut env = Env::new(mode);
    env.step(&base());
    // BERTH_POLICY_SCENARIOS=substring runs only the matching scenarios (while debugging).
    let filter = std::env::var("BERTH_POLICY_SCENARIOS").unwrap_or_default();
    let all: Vec<Scenario> = scenarios()
        .into_iter()
        .filter(|s| s.name.contains(filter.as_str()))
        .collect();
    let started = Instant::now();
    let mut cells = 0;
    let mut steps = 0;
    for s in &all {
        env.reset();
        for (i, changes) in s.steps.iter().enumerate() {
            env.step(changes);
            cells += env.check(&format!("{:?}: {} (step {})", mode, s.name, i + 1));
            steps += 1;
        }
    }
    eprintln!(
        "{mode:?}: {} scenarios, {steps} steps, {cells} probes in {:?}",
        all.len(),
        started.elapsed()
    );
    assert!(
        filter.is_empty() || !all.is_empty(),
        "no scenario matches {filter:?}"
    );
    assert!(
        !filter.is_empty() || all.len() >= 50,
        "{} scenarios",
        all.len()
    );
}

#[test]
fn matrix_native() {
    run_matrix(Mode::Native);
}

#[test]
fn matrix_vxlan() {
    run_matrix(Mode::Vxlan);
}

impl Env {
    fn pod(&self, ns: &str, name: &str) -> &LivePod {
        &self.pods[&(ns.to_string(), name.to_string())]
    }

    /// Probes the given (source pod, destination pod, TCP port) cells with short timeouts.
    fn tcp(&self, cells: &[TcpCell]) -> Vec<bool> {
        let cells: Vec<_> = cells
            .iter()
            .map(|(s, d, port)| {
                (
                    Party::pod(s.0, s.1),
                    (d.0.to_string(), d.1.to_string()),
                    "TCP",
                    *port,
                )
            })
            .collect();
        self.matrix(&cells, SHORT)
    }
}

/// (source pod, destination pod, TCP port), pods as (namespace, name).
type TcpCell<'a> = ((&'a str, &'a str), (&'a str, &'a str), u16);

/// Whether a stream has stopped: nothing more arrives over 2 s (after 1 s for what was in
/// flight).
fn stalled(s: &berth_tests::cluster::Stream) -> bool {
    std::thread::sleep(Duration::from_secs(1));
    let a = s.received();
    std::thread::sleep(Duration::from_secs(2));
    s.received() == a
}

/// A policy change while long TCP connections run: the one the new policy still allows goes on,
/// the one it denies stops (its conntrack entry is checked again under the new revision), and a
/// new connection of the denied kind is refused. Across nodes and on one node.
#[test]
fn policy_change_stops_only_newly_denied_connections() {
    use berth_tests::cluster::Stream;
    let mut env = Env::new(Mode::Native);
    env.step(&base());
    // x/a on n1; x/b on n2 (allowed later), y/a on n2 (denied later), z/b on n1 (same node,
    // denied later).
    let xa = env.pod("x", "a");
    let allowed = Stream::start(&xa.pod, &env.pod("x", "b").pod, &xa.ip.to_string());
    let denied = Stream::start(&xa.pod, &env.pod("y", "a").pod, &xa.ip.to_string());
    let denied_local = Stream::start(&xa.pod, &env.pod("z", "b").pod, &xa.ip.to_string());
    assert!(allowed.grows() && denied.grows() && denied_local.grows());
    env.step(&[np(
        "x",
        "only-b",
        serde_json::json!({"podSelector": pod_a(), "ingress": [{"from": [
            {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    )]);
    assert!(
        stalled(&denied),
        "the newly denied cross-node stream goes on"
    );
    assert!(
        stalled(&denied_local),
        "the newly denied same-node stream goes on"
    );
    assert!(allowed.grows(), "the allowed stream stopped");
    assert_eq!(
        env.tcp(&[(("y", "a"), ("x", "a"), 80), (("x", "b"), ("x", "a"), 80)]),
        vec![false, true]
    );
    // The policy goes away: new connections of the denied kind work again.
    env.step(&[del_np("x", "only-b")]);
    assert_eq!(env.tcp(&[(("y", "a"), ("x", "a"), 80)]), vec![true]);
}

/// `kill -9` of an agent under a policy, and its restart: enforcement never lapses (the pinned
/// maps hold it) and the restarted agent adopts it without rewriting anything; probed
/// continuously.
#[test]
fn agent_restart_keeps_enforcement() {
    let mut env = Env::new(Mode::Vxlan);
    env.step(&base());
    env.step(&[np(
        "x",
        "only-b",
        serde_json::json!({"podSelector": pod_a(), "ingress": [{"from": [
            {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    )]);
    let cells = [
        (("y", "a"), ("x", "a"), 80),
        (("z", "b"), ("x", "a"), 81),
        (("x", "b"), ("x", "a"), 80),
        (("x", "c"), ("x", "a"), 81),
    ];
    let want = vec![false, false, true, false];
    assert_eq!(env.tcp(&cells), want);
    let n1 = node_pos("n1");
    env.c.nodes[n1]
        .node
        .stop_agent(nix::sys::signal::Signal::SIGKILL);
    for _ in 0..3 {
        assert_eq!(env.tcp(&cells), want, "without the agent");
    }
    env.c.nodes[n1].node.start_agent();
    // Probed while the agent starts and reconciles.
    for _ in 0..3 {
        assert_eq!(env.tcp(&cells), want, "while the agent restarts");
    }
    let st = env.c.nodes[n1].node.berthctl(&["status"]);
    assert!(
        st["policy"]["isolatedEndpoints"].as_u64().unwrap() >= 1,
        "{st}"
    );
    let log = std::fs::read_to_string(env.c.nodes[n1].node.agent_log()).unwrap();
    let restart = log.rsplit("berth-agent starting").next().unwrap();
    let line = restart
        .lines()
        .find(|l| l.contains("policy at start"))
        .unwrap_or_else(|| panic!("no start-up policy line:\n{restart}"));
    assert!(
        line.contains("writes=0") && !restart.contains("policy applied"),
        "the restarted agent rewrote policy it should have adopted:\n{restart}"
    );
    assert_eq!(env.tcp(&cells), want, "after the restart");
}

/// `berthctl monitor` shows a denied probe with the pod, the direction and the reason.
#[test]
fn monitor_shows_the_drop() {
    let mut env = Env::new(Mode::Native);
    env.step(&base());
    env.step(&[np(
        "y",
        "deny-in",
        serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    )]);
    // y/b lives on n3 (namespace y, pod b: (1 + 1) % 3).
    let node = &env.c.nodes[node_pos("n3")].node;
    let mut mon = node
        .ns
        .command(
            berth_tests::netns::workspace_bin("berthctl")
                .to_str()
                .unwrap(),
        )
        .arg("--socket")
        .arg(node.socket())
        .args([
            "monitor",
            "--json",
            "--verdict",
            "denied",
            "--pod",
            "y/b",
            "--count",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("berthctl monitor");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        assert_eq!(env.tcp(&[(("x", "a"), ("y", "b"), 80)]), vec![false]);
        if let Some(s) = mon.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = mon.kill();
            panic!("berthctl monitor printed no event");
        }
    };
    let out = mon.wait_with_output().unwrap();
    assert!(status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON event");
    assert_eq!(v["verdict"], "DENIED", "{v}");
    assert_eq!(v["reason"], "policy-denied-ingress", "{v}");
    assert_eq!(v["direction"], "ingress", "{v}");
    assert_eq!(v["pod"], "y/b", "{v}");
    assert_eq!(v["destinationPod"], "y/b", "{v}");
    assert_eq!(v["source"], env.pod("x", "a").ip.to_string(), "{v}");
    assert_eq!(v["protocol"], "TCP", "{v}");
    assert_eq!(v["destinationPort"], 80, "{v}");
    // The drop is counted on the node's /metrics, by reason and direction.
    let text = spawn_in(&node.ns, || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9962").expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .join()
    .unwrap();
    let dropped = text
        .lines()
        .find(|l| {
            l.starts_with("berth_dropped_packets_total{")
                && l.contains("reason=\"policy-denied-ingress\"")
                && l.contains("direction=\"ingress\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no policy drop counter in:\n{text}"));
    assert!(dropped >= 1, "{text}");
    for name in [
        "berth_conntrack_entries",
        "berth_policy_entries",
        "berth_policy_identities",
        "berth_endpoints",
        "berth_forwarded_packets_total",
        "berth_policy_reconcile_duration_seconds",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
}
