//! Cluster networking benchmark (issue 7 §5): three-node topologies on one machine (network
//! namespaces joined by a "private network" bridge), every comparison interleaved in one run.
//!
//! 1. **Native routing** (Berth, `--routing native`): cross-node pod↔pod TCP throughput (iperf3)
//!    and 1-byte TCP request/response latency against the same measurements between the two node
//!    namespaces directly (node IP to node IP over the private network). For reference, a pod
//!    wired the classic way (veth pair, kernel routes, no eBPF) on the same nodes.
//! 2. **VXLAN in eBPF** (Berth, `--routing vxlan`) against the flannel-style kernel VXLAN a Canal
//!    node uses, built here with iproute2: `flannel.1` (VNI 1, UDP 8472, nolearning) with per-peer
//!    FDB, neighbour and onlink route entries, pods on a `cni0` bridge, MTU 1450. For reference,
//!    the same flannel setup with outer UDP checksums on.
//! 3. **Convergence**: a running native-mode agent; 100 and then 1000 Node objects appear at once
//!    in the manifest directory (one file, atomic rename), time until the kernel holds all their
//!    routes, and until they are gone again after the file is removed.
//!
//! Placement: throughput is measured where the scheduler puts iperf3 (the primary figure) and with
//! client and server on one CPU, each with the CPU time it took per GB (iperf3 client + server +
//! ksoftirqd: what the path costs, hardly moved by other load on a shared machine, unlike the
//! rate); request/response latency with client and server pinned to one CPU (the whole path runs
//! in the sender's context: the datapath's own cost) and to two CPUs (adds the VM's cross-CPU
//! wake-up, the same for every variant). Left to the scheduler, RR is bimodal per connection
//! (~7 µs or ~80 µs depending on where the threads land), which makes medians of a few rounds
//! meaningless.
//!
//! Run as root: `scripts/bench.sh cluster` (or `target/release/cluster [rounds]`). Traffic stays
//! inside the namespaces made here; everything is removed on drop (also on panic). Writes
//! `bench/results/cluster.json`.
use anyhow::{Context, Result, bail, ensure};
use berth_bench::{median, percentile, write_result};
use berth_tests::{
    cluster::{Cluster, Mode, PRIVATE_NET, node_manifest, ping_until, recv_raw_frame},
    cni::in_netns,
    netns::{NetNs, run_ok, unique_name},
};
use serde_json::json;
use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// iperf3 seconds per round.
const IPERF_SECS: u32 = 3;
/// Request/response round trips per round (after [`RR_WARMUP`]).
const RR_TRIPS: usize = 5000;
const RR_WARMUP: usize = 300;
/// Convergence repetitions per size.
const CONVERGE_REPS: usize = 3;
/// Route protocol of Berth's routes (`ip route … proto 190`).
const BERTH_PROTO: u8 = 190;
/// How often the convergence probe reads the routing table.
const POLL: Duration = Duration::from_millis(3);

/// Where the two ends of a measurement run: `None` leaves it to the scheduler.
#[derive(Clone, Copy, Debug)]
struct Placement {
    client: Option<usize>,
    server: Option<usize>,
}

const FREE: Placement = Placement {
    client: None,
    server: None,
};
const ONE_CPU: Placement = Placement {
    client: Some(0),
    server: Some(0),
};
const TWO_CPUS: Placement = Placement {
    client: Some(0),
    server: Some(1),
};

/// Pins the calling thread to `cpu` (`taskset -p` on its thread ID).
fn pin_current_thread(cpu: Option<usize>) -> Result<()> {
    let Some(cpu) = cpu else { return Ok(()) };
    let link = std::fs::read_link("/proc/thread-self")?;
    let tid = link
        .file_name()
        .and_then(|t| t.to_str())
        .context("thread id")?
        .to_string();
    run_ok(
        Command::new("taskset")
            .args(["-p", "-c", &cpu.to_string(), &tid])
            .stdout(Stdio::null()),
    );
    Ok(())
}

/// `prog` in `ns`, under `taskset -c <cpu>` when pinned.
fn pinned_command(ns: &NetNs, cpu: Option<usize>, prog: &str) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = ns.command("taskset");
            cmd.args(["-c", &c.to_string(), prog]);
            cmd
        }
        None => ns.command(prog),
    }
}

/// A child process killed (and reaped) on drop, so a failing round leaves no iperf3 behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One side of a measured path: the namespace a process runs in and the address it is reached on.
#[derive(Clone, Copy)]
struct End<'a> {
    ns: &'a NetNs,
    ip: &'a str,
}

/// CPU time (clock ticks) the kernel's softirq threads have used so far: network work that no
/// iperf3 process is charged for.
fn ksoftirqd_ticks() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .map(|stat| {
            // Fields after "(comm) ": state is field 3, utime 14, stime 15.
            let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
        })
        .sum()
}

/// Kernel clock ticks per second in /proc (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// Result of one iperf3 run.
struct IperfRun {
    bps: f64,
    /// CPU seconds per GB received: iperf3 client and server (user + system, which with tick
    /// accounting includes the softirq work done in their context) plus ksoftirqd. Unlike the
    /// rate, it hardly depends on what else runs on the machine.
    cpu_s_per_gb: f64,
}

/// One iperf3 run from `client` to a server at `server`.
fn iperf(client: End, server: End, at: Placement) -> Result<IperfRun> {
    let port = "5201";
    let mut last_err = String::new();
    for _attempt in 0..3 {
        let _server = ChildGuard(
            pinned_command(server.ns, at.server, "iperf3")
                .args(["-s", "-1", "-p", port])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawn iperf3 -s")?,
        );
        std::thread::sleep(Duration::from_millis(300));
        let soft_before = ksoftirqd_ticks();
        let out = pinned_command(client.ns, at.client, "iperf3")
            .args(["-c", server.ip, "-p", port, "-t", &IPERF_SECS.to_string()])
            .args(["-J", "--connect-timeout", "3000"])
            .stdin(Stdio::null())
            .output()
            .context("spawn iperf3 -c")?;
        let soft = (ksoftirqd_ticks().saturating_sub(soft_before)) as f64 / USER_HZ;
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let end = &v["end"];
            let field = |a: &str, b: &str| {
                end[a][b]
                    .as_f64()
                    .with_context(|| format!("iperf3 JSON without end.{a}.{b}"))
            };
            let secs = field("sum_received", "seconds")?;
            let gb = field("sum_received", "bytes")? / 1e9;
            let cpu = (field("cpu_utilization_percent", "host_total")?
                + field("cpu_utilization_percent", "remote_total")?)
                / 100.0
                * secs
                + soft;
            return Ok(IperfRun {
                bps: field("sum_received", "bits_per_second")?,
                cpu_s_per_gb: cpu / gb,
            });
        }
        last_err = String::from_utf8_lossy(&out.stdout).into_owned();
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("iperf3 {} -> {} failed: {last_err}", client.ip, server.ip)
}

/// 1-byte TCP ping-pong (TCP_NODELAY, one connection): `RR_TRIPS` round-trip times in µs.
fn rr(client: End, server: End, at: Placement) -> Result<Vec<f64>> {
    let (port_tx, port_rx) = mpsc::channel::<u16>();
    std::thread::scope(|s| {
        let srv = s.spawn(move || -> Result<()> {
            in_netns(server.ns, move || -> Result<()> {
                pin_current_thread(at.server)?;
                let l = TcpListener::bind("0.0.0.0:0")?;
                port_tx.send(l.local_addr()?.port())?;
                // Never block forever: the client may have failed to connect.
                l.set_nonblocking(true)?;
                let deadline = Instant::now() + Duration::from_secs(15);
                let mut sock = loop {
                    match l.accept() {
                        Ok((sock, _)) => break sock,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            ensure!(Instant::now() < deadline, "no client connected");
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                sock.set_nonblocking(false)?;
                sock.set_nodelay(true)?;
                sock.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut b = [0u8; 1];
                loop {
                    match sock.read(&mut b)? {
                        0 => return Ok(()),
                        _ => sock.write_all(&b)?,
                    }
                }
            })
        });
        let port = port_rx.recv_timeout(Duration::from_secs(10))?;
        let addr: SocketAddr = format!("{}:{port}", server.ip).parse()?;
        let client_result = in_netns(client.ns, move || -> Result<Vec<f64>> {
            pin_current_thread(at.client)?;
            let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            sock.set_nodelay(true)?;
            sock.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut b = [0x5au8; 1];
            let mut out = Vec::with_capacity(RR_TRIPS);
            for i in 0..RR_WARMUP + RR_TRIPS {
                let t = Instant::now();
                sock.write_all(&b)?;
                sock.read_exact(&mut b)?;
                if i >= RR_WARMUP {
                    out.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
            Ok(out)
        });
        let server_result = srv.join().expect("rr server thread");
        let samples = client_result?;
        server_result?;
        Ok(samples)
    })
}

/// A path under test: its name and the two ends.
struct Variant<'a> {
    name: &'static str,
    client: End<'a>,
    server: End<'a>,
}

/// The samples of one variant. RR vectors pool every round's round trips.
#[derive(Default)]
struct Samples {
    tput: Vec<f64>,
    tput_1cpu: Vec<f64>,
    cpu: Vec<f64>,
    cpu_1cpu: Vec<f64>,
    rr_1cpu: Vec<f64>,
    rr_2cpu: Vec<f64>,
    rr_1cpu_round_medians: Vec<f64>,
    rr_2cpu_round_medians: Vec<f64>,
}

/// Which measurement a table row or ratio is about.
#[derive(Clone, Copy)]
enum Metric {
    Tput,
    Tput1Cpu,
    CpuPerGb,
    CpuPerGb1Cpu,
    Rr1CpuMedian,
    Rr1CpuP99,
    Rr2CpuMedian,
    Rr2CpuP99,
}

impl Samples {
    fn value(&self, m: Metric) -> f64 {
        match m {
            Metric::Tput => median(&self.tput),
            Metric::Tput1Cpu => median(&self.tput_1cpu),
            Metric::CpuPerGb => median(&self.cpu),
            Metric::CpuPerGb1Cpu => median(&self.cpu_1cpu),
            Metric::Rr1CpuMedian => median(&self.rr_1cpu),
            Metric::Rr1CpuP99 => percentile(&self.rr_1cpu, 99.0),
            Metric::Rr2CpuMedian => median(&self.rr_2cpu),
            Metric::Rr2CpuP99 => percentile(&self.rr_2cpu, 99.0),
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "throughput_bps_median": median(&self.tput),
            "throughput_bps_p90": percentile(&self.tput, 90.0),
            "throughput_bps_rounds": self.tput,
            "throughput_one_cpu_bps_median": median(&self.tput_1cpu),
            "throughput_one_cpu_bps_rounds": self.tput_1cpu,
            "cpu_seconds_per_gb_median": median(&self.cpu),
            "cpu_seconds_per_gb_rounds": self.cpu,
            "cpu_seconds_per_gb_one_cpu_median": median(&self.cpu_1cpu),
            "cpu_seconds_per_gb_one_cpu_rounds": self.cpu_1cpu,
            "rr_one_cpu_us_median": median(&self.rr_1cpu),
            "rr_one_cpu_us_p90": percentile(&self.rr_1cpu, 90.0),
            "rr_one_cpu_us_p99": percentile(&self.rr_1cpu, 99.0),
            "rr_one_cpu_us_round_medians": self.rr_1cpu_round_medians,
            "rr_two_cpus_us_median": median(&self.rr_2cpu),
            "rr_two_cpus_us_p90": percentile(&self.rr_2cpu, 90.0),
            "rr_two_cpus_us_p99": percentile(&self.rr_2cpu, 99.0),
            "rr_two_cpus_us_round_medians": self.rr_2cpu_round_medians,
        })
    }
}

/// One interleaved comparison: variant 0 is Berth, 1 the baseline, further ones references.
struct Section {
    names: Vec<&'static str>,
    samples: Vec<Samples>,
}

impl Section {
    /// `rounds` rounds; within each, every measurement runs once per variant, the order rotating
    /// every round.
    fn measure(rounds: usize, label: &str, variants: &[Variant]) -> Result<Section> {
        let n = variants.len();
        let mut samples: Vec<Samples> = (0..n).map(|_| Samples::default()).collect();
        let two_cpus = std::thread::available_parallelism().map_or(1, |p| p.get()) >= 2;
        for r in 0..rounds {
            let order: Vec<usize> = (0..n).map(|k| (k + r) % n).collect();
            for &i in &order {
                let v = &variants[i];
                let run = iperf(v.client, v.server, FREE)?;
                samples[i].tput.push(run.bps);
                samples[i].cpu.push(run.cpu_s_per_gb);
            }
            for &i in &order {
                let v = &variants[i];
                let run = iperf(v.client, v.server, ONE_CPU)?;
                samples[i].tput_1cpu.push(run.bps);
                samples[i].cpu_1cpu.push(run.cpu_s_per_gb);
            }
            for &i in &order {
                let v = &variants[i];
                let rr1 = rr(v.client, v.server, ONE_CPU)
                    .with_context(|| format!("{label}: RR {}", v.name))?;
                samples[i].rr_1cpu_round_medians.push(median(&rr1));
                samples[i].rr_1cpu.extend(rr1);
                if two_cpus {
                    let rr2 = rr(v.client, v.server, TWO_CPUS)
                        .with_context(|| format!("{label}: RR {}", v.name))?;
                    samples[i].rr_2cpu_round_medians.push(median(&rr2));
                    samples[i].rr_2cpu.extend(rr2);
                }
            }
            let line: Vec<String> = variants
                .iter()
                .zip(&samples)
                .map(|(v, s)| {
                    format!(
                        "{}: {:.2}/{:.2} Gbit/s ({:.2}/{:.2} CPU s/GB), RR {:.1}/{:.1} µs",
                        v.name,
                        s.tput.last().unwrap() / 1e9,
                        s.tput_1cpu.last().unwrap() / 1e9,
                        s.cpu.last().unwrap(),
                        s.cpu_1cpu.last().unwrap(),
                        s.rr_1cpu_round_medians.last().unwrap(),
                        s.rr_2cpu_round_medians.last().unwrap_or(&f64::NAN),
                    )
                })
                .collect();
            eprintln!(
                "{label} round {}/{rounds} (free/one-CPU throughput, one/two-CPU RR): {}",
                r + 1,
                line.join("; ")
            );
        }
        Ok(Section {
            names: variants.iter().map(|v| v.name).collect(),
            samples,
        })
    }

    /// Median of variant `a` over median of variant `b`.
    fn ratio(&self, a: usize, b: usize, m: Metric) -> f64 {
        self.samples[a].value(m) / self.samples[b].value(m)
    }

    fn json(&self) -> serde_json::Value {
        let variants: serde_json::Map<String, serde_json::Value> = self
            .names
            .iter()
            .zip(&self.samples)
            .map(|(n, s)| (n.to_string(), s.json()))
            .collect();
        let ratios = |a: usize, b: usize| {
            json!({
                "throughput": self.ratio(a, b, Metric::Tput),
                "throughput_one_cpu": self.ratio(a, b, Metric::Tput1Cpu),
                "cpu_per_gb": self.ratio(a, b, Metric::CpuPerGb),
                "cpu_per_gb_one_cpu": self.ratio(a, b, Metric::CpuPerGb1Cpu),
                "rr_one_cpu_median": self.ratio(a, b, Metric::Rr1CpuMedian),
                "rr_one_cpu_p99": self.ratio(a, b, Metric::Rr1CpuP99),
                "rr_two_cpus_median": self.ratio(a, b, Metric::Rr2CpuMedian),
                "rr_two_cpus_p99": self.ratio(a, b, Metric::Rr2CpuP99),
            })
        };
        let mut out = json!({
            "berth": self.names[0],
            "baseline": self.names[1],
            "variants": variants,
            "berth_over_baseline": ratios(0, 1),
        });
        for (k, name) in self.names.iter().enumerate().skip(2) {
            out[format!("{name}_over_baseline")] = ratios(k, 1);
            out[format!("berth_over_{name}")] = ratios(0, k);
        }
        out
    }
}

/// The flannel-style kernel VXLAN baseline (what a Canal node runs), three nodes on a private
/// network of its own. Fields drop in order: pods, nodes, then the bridge namespace.
struct Flannel {
    /// `(pod namespace, pod IP, node index)`.
    pods: Vec<(NetNs, String, usize)>,
    nodes: Vec<NetNs>,
    net: NetNs,
}

const FLANNEL_MTU: &str = "1450";

fn flannel_vtep_mac(i: usize) -> String {
    format!("0e:b7:00:00:00:{:02x}", i + 1)
}
fn flannel_node_ip(i: usize) -> String {
    format!("{PRIVATE_NET}.{}", 10 + i)
}
/// Node `i`'s pod CIDR is `10.2.<10+i>.0/24` (as in the Berth cluster, in other namespaces).
fn flannel_subnet(i: usize) -> String {
    format!("10.2.{}", 10 + i)
}

impl Flannel {
    /// `udpcsum`: UDP checksums on the outer header (flanneld leaves them off).
    fn new(n: usize, udpcsum: bool) -> Flannel {
        let net = NetNs::new("fnet");
        net.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        net.exec_ok(&["ip", "link", "set", "br0", "up"]);
        let mut f = Flannel {
            pods: Vec::new(),
            nodes: Vec::new(),
            net,
        };
        for i in 0..n {
            let ns = NetNs::new("fk");
            let ip = flannel_node_ip(i);
            let sub = flannel_subnet(i);
            berth_tests::cluster::plug_into_bridge(&f.net, &ns, &ip);
            f.nodes.push(ns);
            let ns = &f.nodes[i];
            ns.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            // flanneld's vxlan backend: VNI 1, port 8472, local node IP, no learning; the VTEP
            // holds the subnet's .0 address as /32.
            ns.exec_ok(&[
                "ip",
                "link",
                "add",
                "flannel.1",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &ip,
                "dev",
                "eth0",
                "dstport",
                "8472",
                "nolearning",
                if udpcsum { "udpcsum" } else { "noudpcsum" },
            ]);
            ns.exec_ok(&[
                "ip",
                "link",
                "set",
                "flannel.1",
                "address",
                &flannel_vtep_mac(i),
                "mtu",
                FLANNEL_MTU,
                "up",
            ]);
            ns.exec_ok(&[
                "ip",
                "addr",
                "add",
                &format!("{sub}.0/32"),
                "dev",
                "flannel.1",
            ]);
            // The bridge plugin's cni0 with the gateway address.
            ns.exec_ok(&["ip", "link", "add", "cni0", "type", "bridge"]);
            ns.exec_ok(&["ip", "link", "set", "cni0", "mtu", FLANNEL_MTU, "up"]);
            ns.exec_ok(&["ip", "addr", "add", &format!("{sub}.1/24"), "dev", "cni0"]);
        }
        // Per remote node: FDB (VTEP MAC → node IP), neighbour (gateway → VTEP MAC), route.
        for (i, ns) in f.nodes.iter().enumerate() {
            for j in (0..n).filter(|&j| j != i) {
                let mac = flannel_vtep_mac(j);
                let gw = format!("{}.0", flannel_subnet(j));
                ns.exec_ok(&[
                    "bridge",
                    "fdb",
                    "append",
                    &mac,
                    "dev",
                    "flannel.1",
                    "dst",
                    &flannel_node_ip(j),
                ]);
                ns.exec_ok(&[
                    "ip",
                    "neigh",
                    "replace",
                    &gw,
                    "lladdr",
                    &mac,
                    "dev",
                    "flannel.1",
                    "nud",
                    "permanent",
                ]);
                ns.exec_ok(&[
                    "ip",
                    "route",
                    "replace",
                    &format!("{}.0/24", flannel_subnet(j)),
                    "via",
                    &gw,
                    "dev",
                    "flannel.1",
                    "onlink",
                ]);
            }
        }
        f
    }

    /// A pod on node `i` attached the way the bridge plugin does under flannel: a veth pair into
    /// `cni0`, default route via the bridge address.
    fn pod(&mut self, i: usize) -> (usize, String) {
        let pod = NetNs::new("fp");
        let node = &self.nodes[i];
        let host_side = unique_name("veth");
        let sub = flannel_subnet(i);
        let ip = format!(
            "{sub}.{}",
            2 + self.pods.iter().filter(|p| p.2 == i).count()
        );
        node.exec_ok(&[
            "ip",
            "link",
            "add",
            &host_side,
            "mtu",
            FLANNEL_MTU,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "mtu",
            FLANNEL_MTU,
            "netns",
            &pod.name,
        ]);
        node.exec_ok(&["ip", "link", "set", &host_side, "master", "cni0", "up"]);
        pod.exec_ok(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        pod.exec_ok(&["ip", "link", "set", "eth0", "up"]);
        pod.exec_ok(&["ip", "route", "add", "default", "via", &format!("{sub}.1")]);
        self.pods.push((pod, ip.clone(), i));
        (self.pods.len() - 1, ip)
    }

    fn vxlan_tx_bytes(&self, i: usize) -> u64 {
        let out = self.nodes[i].exec_ok(&["ip", "-j", "-s", "link", "show", "flannel.1"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v[0]["stats64"]["tx"]["bytes"].as_u64().unwrap_or(0)
    }
}

/// Pods wired the classic way on existing node namespaces (a veth pair, /32 routes, kernel
/// forwarding, no eBPF on the pod's veth): what a pod costs without Berth's datapath. Node `i`'s
/// pod is `10.9.<10+i>.2`; every node routes the others' `10.9.<10+j>.0/24` via their node IP.
struct RoutedPods {
    pods: Vec<(NetNs, String)>,
}

impl RoutedPods {
    fn new(nodes: &[(&NetNs, String)]) -> RoutedPods {
        let mut pods = Vec::new();
        for (i, (node, _)) in nodes.iter().enumerate() {
            let pod = NetNs::new("rp");
            let host_side = unique_name("krh");
            let gw = format!("10.9.{}.1", 10 + i);
            let ip = format!("10.9.{}.2", 10 + i);
            node.exec_ok(&[
                "ip", "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns",
                &pod.name,
            ]);
            node.exec_ok(&["ip", "link", "set", &host_side, "up"]);
            node.exec_ok(&["ip", "addr", "add", &format!("{gw}/32"), "dev", &host_side]);
            node.exec_ok(&["ip", "route", "add", &format!("{ip}/32"), "dev", &host_side]);
            node.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            pod.exec_ok(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
            pod.exec_ok(&["ip", "link", "set", "eth0", "up"]);
            pod.exec_ok(&["ip", "route", "add", &gw, "dev", "eth0"]);
            pod.exec_ok(&["ip", "route", "add", "default", "via", &gw, "dev", "eth0"]);
            pods.push((pod, ip));
        }
        for (i, (node, _)) in nodes.iter().enumerate() {
            for (j, (_, node_ip)) in nodes.iter().enumerate().filter(|(j, _)| *j != i) {
                node.exec_ok(&[
                    "ip",
                    "route",
                    "add",
                    &format!("10.9.{}.0/24", 10 + j),
                    "via",
                    node_ip,
                    "dev",
                    "eth0",
                ]);
            }
        }
        RoutedPods { pods }
    }
}

fn pod_mtu(ns: &NetNs) -> u32 {
    let out = ns.exec_ok(&["ip", "-o", "link", "show", "eth0"]);
    let mut words = out.split_whitespace();
    words.find(|w| *w == "mtu");
    words.next().and_then(|m| m.parse().ok()).unwrap_or(0)
}

/// The outer UDP checksum field of the first VXLAN datagram (UDP 8472) seen on `rx_node`'s eth0
/// while `from` pings `to` (0: no checksum).
fn vxlan_udp_checksum(rx_node: &NetNs, from: &NetNs, to: &str) -> Option<u16> {
    let is_vxlan = |f: &[u8]| -> Option<usize> {
        if f.len() < 14 + 20 + 8 || f[12..14] != [0x08, 0x00] || f[23] != 17 {
            return None;
        }
        let udp = 14 + usize::from(f[14] & 0x0f) * 4;
        (f.len() >= udp + 8 && f[udp + 2..udp + 4] == 8472u16.to_be_bytes()).then_some(udp)
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            from.exec(&["ping", "-c", "4", "-i", "0.2", "-W", "1", to]);
        });
        let frame = recv_raw_frame(rx_node, "eth0", Duration::from_secs(3), None, |f| {
            is_vxlan(f).is_some()
        })?;
        let udp = is_vxlan(&frame)?;
        Some(u16::from_be_bytes([frame[udp + 6], frame[udp + 7]]))
    })
}

/// Part 1: native routing vs node↔node (and a classic veth pod, for reference).
fn native(rounds: usize) -> Result<Section> {
    let c = Cluster::new(Mode::Native, 3);
    for i in 0..3 {
        let want = c.remote_cidrs(i);
        let have = c.wait_routes(i, &want, Duration::from_secs(10));
        ensure!(have.len() == want.len(), "node {i} routes: {have:?}");
    }
    let (p0, ip0) = c.pod(0);
    let (p1, ip1) = c.pod(1);
    ensure!(
        ping_until(&p0.ns, &ip1, Duration::from_secs(5)),
        "native: pod on node 0 cannot reach pod on node 1"
    );
    let nodes: Vec<(&NetNs, String)> = c.nodes.iter().map(|n| (&n.node.ns, n.ip.clone())).collect();
    let routed = RoutedPods::new(&nodes);
    let (r0, r1) = (&routed.pods[0], &routed.pods[1]);
    ensure!(
        ping_until(&r0.0, &r1.1, Duration::from_secs(5)),
        "kernel-routed pod on node 0 cannot reach the one on node 1"
    );
    let (n0, n1) = (&c.nodes[0], &c.nodes[1]);
    let variants = [
        Variant {
            name: "berth_native",
            client: End {
                ns: &p0.ns,
                ip: &ip0,
            },
            server: End {
                ns: &p1.ns,
                ip: &ip1,
            },
        },
        Variant {
            name: "node_to_node",
            client: End {
                ns: &n0.node.ns,
                ip: &n0.ip,
            },
            server: End {
                ns: &n1.node.ns,
                ip: &n1.ip,
            },
        },
        Variant {
            name: "kernel_routed_veth_pod",
            client: End {
                ns: &r0.0,
                ip: &r0.1,
            },
            server: End {
                ns: &r1.0,
                ip: &r1.1,
            },
        },
    ];
    Section::measure(rounds, "native", &variants)
}

/// Part 2: Berth VXLAN vs flannel's kernel VXLAN (and flannel with outer UDP checksums).
fn vxlan(rounds: usize) -> Result<(Section, serde_json::Value)> {
    let c = Cluster::new(Mode::Vxlan, 3);
    for i in 0..3 {
        let want = c.remote_cidrs(i);
        let have = c.wait_routes(i, &want, Duration::from_secs(10));
        ensure!(have.len() == want.len(), "node {i} routes: {have:?}");
    }
    let (p0, ip0) = c.pod(0);
    let (p1, ip1) = c.pod(1);
    ensure!(pod_mtu(&p0.ns) == 1450, "berth vxlan pod MTU");
    ensure!(
        ping_until(&p0.ns, &ip1, Duration::from_secs(5)),
        "vxlan: pod on node 0 cannot reach pod on node 1"
    );
    let mut flannels = Vec::new();
    let mut fpods = Vec::new();
    for udpcsum in [false, true] {
        let mut f = Flannel::new(3, udpcsum);
        let (a, ip_a) = f.pod(0);
        let (b, ip_b) = f.pod(1);
        ensure!(
            ping_until(&f.pods[a].0, &ip_b, Duration::from_secs(5)),
            "flannel: pod on node 0 cannot reach pod on node 1\n{}",
            f.nodes[0].exec_ok(&["ip", "route"])
        );
        // The baseline really goes through flannel.1.
        let before = f.vxlan_tx_bytes(0);
        ensure!(
            f.pods[a]
                .0
                .exec(&["ping", "-c", "3", "-i", "0.1", "-s", "1000", &ip_b])
                .status
                .success(),
            "flannel ping"
        );
        ensure!(
            f.vxlan_tx_bytes(0) >= before + 3 * 1000,
            "flannel traffic did not leave through flannel.1"
        );
        fpods.push((a, ip_a, b, ip_b));
        flannels.push(f);
    }
    let csum = json!({
        "berth": vxlan_udp_checksum(&c.nodes[1].node.ns, &p0.ns, &ip1),
        "flannel": vxlan_udp_checksum(&flannels[0].nodes[1], &flannels[0].pods[fpods[0].0].0, &fpods[0].3),
        "flannel_udpcsum": vxlan_udp_checksum(&flannels[1].nodes[1], &flannels[1].pods[fpods[1].0].0, &fpods[1].3),
    });
    eprintln!("outer UDP checksum field of a VXLAN datagram (0 = none): {csum}");
    let fl = |k: usize| {
        let (a, ip_a, b, ip_b) = &fpods[k];
        (
            End {
                ns: &flannels[k].pods[*a].0,
                ip: ip_a,
            },
            End {
                ns: &flannels[k].pods[*b].0,
                ip: ip_b,
            },
        )
    };
    let variants = [
        Variant {
            name: "berth_vxlan",
            client: End {
                ns: &p0.ns,
                ip: &ip0,
            },
            server: End {
                ns: &p1.ns,
                ip: &ip1,
            },
        },
        Variant {
            name: "flannel_kernel_vxlan",
            client: fl(0).0,
            server: fl(0).1,
        },
        Variant {
            name: "flannel_udpcsum",
            client: fl(1).0,
            server: fl(1).1,
        },
    ];
    let section = Section::measure(rounds, "vxlan", &variants)?;
    Ok((section, csum))
}

/// Convergence samples (seconds) for one size.
#[derive(Default)]
struct Converge {
    add: Vec<f64>,
    remove: Vec<f64>,
}

/// Routes of the main table inside 10.4.0.0/16 (the bench's Node objects' pod CIDRs), read from
/// `/proc/thread-self/net/route` of the calling thread's network namespace: one read, no process
/// spawned, so polling every few ms leaves the CPU to the agent. (Only Berth installs routes
/// there; [`berth_routes`] confirms with `ip route show proto 190` outside the timing.)
fn bench_route_count() -> Result<usize> {
    let text = std::fs::read_to_string("/proc/thread-self/net/route")?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|d| u32::from_str_radix(d, 16).ok())
        // The kernel prints the big-endian address as a host-order integer.
        .filter(|d| d.to_ne_bytes()[..2] == [10, 4])
        .count())
}

/// Berth's routes (`ip -4 route show proto 190`) in `ns`.
fn berth_routes(ns: &NetNs) -> usize {
    ns.exec_ok(&[
        "ip",
        "-4",
        "route",
        "show",
        "proto",
        &BERTH_PROTO.to_string(),
    ])
    .lines()
    .count()
}

/// Runs `change` (the file operation) and polls the routing table of `ns` until it holds `want`
/// routes in 10.4.0.0/16; returns the seconds from just before `change` until then.
fn time_to_count(
    ns: &NetNs,
    want: usize,
    change: impl FnOnce() -> Result<()> + Send,
) -> Result<f64> {
    in_netns(ns, move || -> Result<f64> {
        let start = Instant::now();
        change()?;
        let deadline = start + Duration::from_secs(60);
        loop {
            let n = bench_route_count()?;
            if n == want {
                return Ok(start.elapsed().as_secs_f64());
            }
            ensure!(
                Instant::now() < deadline,
                "still {n} routes after 60 s (want {want})"
            );
            std::thread::sleep(POLL);
        }
    })
}

/// Part 3: one native-mode node; `sizes` Node objects appear at once, then disappear.
fn convergence(sizes: &[usize]) -> Result<Vec<(usize, Converge)>> {
    let c = Cluster::new(Mode::Native, 1);
    let ns = &c.nodes[0].node.ns;
    let dir = c.manifests.path().to_path_buf();
    ensure!(
        in_netns(ns, bench_route_count)? == 0,
        "routes in 10.4.0.0/16 already"
    );
    let base = berth_routes(ns);
    let mut out: Vec<(usize, Converge)> = sizes.iter().map(|&s| (s, Converge::default())).collect();
    let prefix = unique_name("bulk");
    for rep in 0..CONVERGE_REPS {
        for (n, samples) in out.iter_mut() {
            let n = *n;
            ensure!(n <= 1024, "10.4.0.0/16 holds 1024 /26s");
            // Pod CIDRs 10.4.0.0/16 in /26s, InternalIPs 192.168.80.1… (onlink routes: they
            // need not exist).
            let items: Vec<serde_json::Value> = (0..n)
                .map(|k| {
                    node_manifest(
                        &format!("{prefix}-{k}"),
                        &format!("192.168.{}.{}", 80 + k / 250, 1 + k % 250),
                        &format!("10.4.{}.{}/26", k / 4, (k % 4) * 64),
                    )
                })
                .collect();
            let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
            let tmp = dir.join(format!(".{prefix}.tmp"));
            let file = dir.join(format!("{prefix}.json"));
            std::fs::write(&tmp, serde_json::to_vec(&list)?)?;
            let f2 = file.clone();
            let t_add = time_to_count(ns, n, move || {
                std::fs::rename(&tmp, &f2)?;
                Ok(())
            })
            .with_context(|| format!("{n} nodes appear\n{}", c.nodes[0].node.log_tail()))?;
            let have = berth_routes(ns);
            ensure!(
                have == base + n,
                "proto {BERTH_PROTO} routes: {have}, want {}",
                base + n
            );
            std::thread::sleep(Duration::from_millis(500));
            let t_rm = time_to_count(ns, 0, move || {
                std::fs::remove_file(&file)?;
                Ok(())
            })
            .with_context(|| format!("{n} nodes disappear\n{}", c.nodes[0].node.log_tail()))?;
            let have = berth_routes(ns);
            ensure!(
                have == base,
                "proto {BERTH_PROTO} routes: {have}, want {base}"
            );
            eprintln!(
                "convergence rep {}/{CONVERGE_REPS}: {n} nodes appear {:.3} s, disappear {:.3} s",
                rep + 1,
                t_add,
                t_rm
            );
            samples.add.push(t_add);
            samples.remove.push(t_rm);
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    Ok(out)
}

fn mark(ok: bool) -> &'static str {
    if ok { "✓" } else { "✗" }
}

/// Table rows of one comparison: `(metric, label, unit, scale)`.
const ROWS: [(Metric, &str, &str, f64); 7] = [
    (Metric::Tput, "TCP throughput", "Gbit/s", 1e-9),
    (Metric::Tput1Cpu, "TCP throughput, one CPU", "Gbit/s", 1e-9),
    (Metric::CpuPerGb, "CPU per GB transferred", "ms", 1e3),
    (
        Metric::CpuPerGb1Cpu,
        "CPU per GB transferred, one CPU",
        "ms",
        1e3,
    ),
    (
        Metric::Rr1CpuMedian,
        "RR latency median, one CPU",
        "µs",
        1.0,
    ),
    (Metric::Rr1CpuP99, "RR latency p99, one CPU", "µs", 1.0),
    (
        Metric::Rr2CpuMedian,
        "RR latency median, two CPUs",
        "µs",
        1.0,
    ),
];

/// Prints variant `a` against variant `b` of `sec`, one row per metric.
fn print_rows(
    sec: &Section,
    a: usize,
    b: usize,
    what: &str,
    target: impl Fn(Metric, f64) -> String,
) {
    for (m, label, unit, scale) in ROWS {
        let r = sec.ratio(a, b, m);
        let prec = match unit {
            "µs" => 1,
            "ms" => 0,
            _ => 2,
        };
        println!(
            "| {what}: {label} | {:.prec$} {unit} | {:.prec$} {unit} | {r:.2} | {} |",
            sec.samples[a].value(m) * scale,
            sec.samples[b].value(m) * scale,
            target(m, r)
        );
    }
}

fn main() -> Result<()> {
    berth_tests::netns::require_root();
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(7);
    let started = Instant::now();
    // Other work on the machine moves every rate; the load average documents it.
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let load_start = loadavg();

    let nat = native(rounds)?;
    let (vx, vx_csum) = vxlan(rounds)?;
    let conv = convergence(&[100, 1000])?;

    println!(
        "Cluster networking benchmark (3 nodes; {rounds} interleaved rounds: iperf3 {IPERF_SECS} s, \
         {RR_TRIPS} 1-byte TCP round trips; convergence {CONVERGE_REPS}x per size)"
    );
    println!(
        "(load average at start: {load_start}; at the end: {})",
        loadavg()
    );
    println!("| metric | berth median | baseline median | ratio | target |");
    println!("|---|---|---|---|---|");
    let none = |_: Metric, _: f64| String::new();
    print_rows(&nat, 0, 1, "native pod↔pod vs node↔node", |m, r| match m {
        Metric::Tput => format!("≥ 0.95 {}", mark(r >= 0.95)),
        _ => String::new(),
    });
    print_rows(
        &nat,
        2,
        1,
        "(reference) kernel-routed veth pod↔pod vs node↔node",
        none,
    );
    print_rows(
        &vx,
        0,
        1,
        "VXLAN eBPF vs flannel kernel VXLAN",
        |m, r| match m {
            Metric::Tput => format!("≥ 1.0 {}", mark(r >= 1.0)),
            Metric::Rr1CpuMedian | Metric::Rr2CpuMedian => format!("≤ 1.0 {}", mark(r <= 1.0)),
            _ => String::new(),
        },
    );
    print_rows(
        &vx,
        2,
        1,
        "(reference) flannel with outer UDP checksums vs flannel",
        none,
    );
    let mut conv_json = serde_json::Map::new();
    let mut converge_1000 = f64::NAN;
    let mut converge_1000_rm = f64::NAN;
    for (n, s) in &conv {
        let add = median(&s.add);
        let rm = median(&s.remove);
        if *n == 1000 {
            converge_1000 = add;
            converge_1000_rm = rm;
        }
        let target = |v: f64| {
            if *n == 1000 {
                format!("≤ 1 s {}", mark(v <= 1.0))
            } else {
                String::new()
            }
        };
        println!(
            "| converge: {n} Node objects appear → routes installed | {add:.3} s (max {:.3}) | | | {} |",
            percentile(&s.add, 100.0),
            target(add)
        );
        println!(
            "| converge: {n} Node objects removed → routes gone | {rm:.3} s (max {:.3}) | | | {} |",
            percentile(&s.remove, 100.0),
            target(rm)
        );
        conv_json.insert(
            n.to_string(),
            json!({"add_seconds": s.add, "add_seconds_median": add,
                   "remove_seconds": s.remove, "remove_seconds_median": rm}),
        );
    }

    let path = write_result(
        "cluster",
        &json!({
            "native_over_baseline_throughput": nat.ratio(0, 1, Metric::Tput),
            "native_over_baseline_rr_latency": nat.ratio(0, 1, Metric::Rr1CpuMedian),
            "vxlan_over_kernel_vxlan_throughput": vx.ratio(0, 1, Metric::Tput),
            "vxlan_over_kernel_vxlan_rr_latency": vx.ratio(0, 1, Metric::Rr1CpuMedian),
            "vxlan_over_kernel_vxlan_rr_latency_two_cpus": vx.ratio(0, 1, Metric::Rr2CpuMedian),
            "converge_1000_nodes_seconds": converge_1000,
            "converge_1000_nodes_removed_seconds": converge_1000_rm,
            "definitions": {
                "throughput": "median of iperf3 -t 3 sum_received over the rounds, placement left to the scheduler (one_cpu: client and server pinned to CPU 0)",
                "cpu_per_gb": "CPU seconds per GB received during the same iperf3 runs: iperf3 client + server CPU (cpu_utilization_percent x duration; tick accounting charges softirq work done in their context to them) + ksoftirqd; robust to other load on the machine",
                "rr_latency": "median of the pooled 1-byte TCP_NODELAY round trips, client and server pinned to CPU 0 (two_cpus: client CPU 0, server CPU 1)",
                "converge": "median seconds from the atomic rename (or unlink) of one List file with N Node objects to the last route installed (removed)",
            },
            "targets": {
                "native_over_baseline_throughput": ">= 0.95",
                "vxlan_over_kernel_vxlan_throughput": ">= 1.0",
                "vxlan_over_kernel_vxlan_rr_latency": "<= 1.0",
                "converge_1000_nodes_seconds": "<= 1.0",
            },
            "rounds": rounds,
            "iperf3_seconds": IPERF_SECS,
            "rr_round_trips_per_round": RR_TRIPS,
            "rr_warmup_round_trips": RR_WARMUP,
            "native": nat.json(),
            "vxlan": vx.json(),
            "vxlan_outer_udp_checksum_field": vx_csum,
            "baselines": {
                "node_to_node": "iperf3/RR between the two node namespaces (node IP to node IP over the private network; Berth's uplink program sees these packets too)",
                "kernel_routed_veth_pod": "reference: pods on a veth pair with /32 routes and kernel forwarding on the same nodes, no eBPF on the pod veth",
                "flannel_kernel_vxlan": "flannel.1 (vxlan id 1 dstport 8472 nolearning, local node IP, dev eth0), per peer FDB + permanent neighbour + onlink route, cni0 bridge, pods via veth, MTU 1450, ip_forward=1; no outer UDP checksum (flanneld's default)",
                "flannel_udpcsum": "reference: the same with udpcsum",
            },
            "convergence": {
                "setup": "one native-mode node (berth-agent with --manifests; a one-node cluster, so no other agent competes for the CPUs); N Node objects in one kind: List JSON file (pod CIDRs 10.4.0.0/16 in /26s, InternalIPs 192.168.80.1…), atomic rename; the node namespace's main table polled every 3 ms (/proc/thread-self/net/route, routes in 10.4.0.0/16) and confirmed with ip route show proto 190 after each step; removal = unlink of the file",
                "repetitions": CONVERGE_REPS,
                "sizes": conv_json,
            },
            "machine": {
                "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
                "loadavg_start": load_start,
                "loadavg_end": loadavg(),
                "kernel": String::from_utf8_lossy(&Command::new("uname").arg("-r").output()?.stdout).trim(),
                "notes": "one VM with CPU steal; every endpoint is a network namespace on this machine and the private network a veth bridge, so every path is CPU-bound (no NIC); absolute numbers move 2-4x between runs, ratios much less",
            },
            "wall_seconds": started.elapsed().as_secs_f64(),
        }),
    )?;
    println!("wrote {}", path.display());
    Ok(())
}
