//! A multi-node cluster on one machine: every node is a network namespace with its own
//! `berth-agent` (socket, state directory, pin root), joined by a "private network" — a bridge in a
//! namespace of its own; a manifest directory plays the API server for all of them. Everything is
//! owned by guards and removed on drop; traffic stays inside the namespaces made here.
use crate::{
    cni::{Node, Pod},
    netns::{NetNs, run_ok, unique_name},
};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// The private network's prefix (inside the test's own namespaces only).
pub const PRIVATE_NET: &str = "192.168.77";

/// Routing mode of a test cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Native,
    Vxlan,
}

impl Mode {
    pub fn flag(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Vxlan => "vxlan",
        }
    }
    /// The pod MTU the agent must derive from a 1500-byte uplink.
    pub fn pod_mtu(self) -> u32 {
        match self {
            Mode::Native => 1500,
            Mode::Vxlan => 1450,
        }
    }
}

/// One node of a [`Cluster`].
pub struct ClusterNode {
    pub node: Node,
    pub name: String,
    pub ip: String,
    pub pod_cidr: String,
}

/// The cluster: private network, manifest directory, nodes.
pub struct Cluster {
    pub mode: Mode,
    pub nodes: Vec<ClusterNode>,
    pub manifests: tempfile::TempDir,
    /// Declared last: dropped after the nodes (their veths go with their namespaces).
    pub net: NetNs,
}

/// Node `i`'s address on the private network.
pub fn node_ip(i: usize) -> String {
    format!("{PRIVATE_NET}.{}", 10 + i)
}

/// Node `i`'s pod CIDR (as the controller manager would allocate it).
pub fn pod_cidr(i: usize) -> String {
    format!("10.2.{}.0/24", 10 + i)
}

/// A Node object as the API server would serve it.
pub fn node_manifest(name: &str, ip: &str, cidr: &str) -> serde_json::Value {
    node_manifest_with(name, ip, cidr, true)
}

/// [`node_manifest`] with the Ready condition's status.
pub fn node_manifest_with(name: &str, ip: &str, cidr: &str, ready: bool) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": ip},
                {"type": "Hostname", "address": name}
            ],
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
        }
    })
}

impl Cluster {
    /// `n` nodes in routing mode `mode`, each with a running agent that takes its pod CIDR from
    /// its Node object.
    pub fn new(mode: Mode, n: usize) -> Cluster {
        Self::with_agent_args(mode, n, &[])
    }

    pub fn with_agent_args(mode: Mode, n: usize, extra: &[&str]) -> Cluster {
        let prefix = unique_name("k");
        let layout: Vec<(String, String, String)> = (0..n)
            .map(|i| (format!("{prefix}-n{i}"), node_ip(i), pod_cidr(i)))
            .collect();
        Self::with_layout(mode, &layout, extra)
    }

    /// Nodes named, addressed and given pod CIDRs as `layout` says: `(name, ip, pod CIDR)`;
    /// node addresses are on one /24.
    pub fn with_layout(mode: Mode, layout: &[(String, String, String)], extra: &[&str]) -> Cluster {
        let net = NetNs::new("bnet");
        net.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        net.exec_ok(&["ip", "link", "set", "br0", "up"]);
        let manifests = tempfile::Builder::new()
            .prefix("berth-manifests-")
            .tempdir()
            .expect("manifest dir");
        // Every Node object exists before any agent starts (as on a real cluster, where the
        // kubelet registers the node first).
        let mut cluster = Cluster {
            mode,
            nodes: Vec::new(),
            manifests,
            net,
        };
        for (name, ip, cidr) in layout {
            cluster.write_node(name, ip, cidr);
        }
        for (name, ip, cidr) in layout.iter().cloned() {
            let ns = NetNs::new("bk");
            plug_into_bridge(&cluster.net, &ns, &ip);
            let mut args: Vec<String> = vec![
                "--manifests".into(),
                cluster.manifests.path().display().to_string(),
                "--routing".into(),
                mode.flag().into(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let node = Node::build(ns, &name, None, &args);
            cluster.nodes.push(ClusterNode {
                node,
                name,
                ip,
                pod_cidr: cidr,
            });
        }
        cluster
    }

    fn manifest_path(&self, name: &str) -> PathBuf {
        self.manifests.path().join(format!("{name}.yaml"))
    }

    /// Writes (atomically) the Node object of `name`.
    pub fn write_node(&self, name: &str, ip: &str, cidr: &str) {
        self.write_node_with(name, ip, cidr, true);
    }

    /// Writes (atomically) the Node object of `name` with its readiness.
    pub fn write_node_with(&self, name: &str, ip: &str, cidr: &str, ready: bool) {
        let tmp = self.manifests.path().join(format!(".{name}.tmp"));
        let yaml =
            serde_json::to_string_pretty(&node_manifest_with(name, ip, cidr, ready)).unwrap();
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.manifest_path(name)).unwrap();
    }

    /// Removes node `i`'s Node object from the source.
    pub fn remove_node_object(&self, i: usize) {
        std::fs::remove_file(self.manifest_path(&self.nodes[i].name)).unwrap();
    }

    /// Puts node `i`'s Node object back.
    pub fn restore_node_object(&self, i: usize) {
        let n = &self.nodes[i];
        self.write_node(&n.name, &n.ip, &n.pod_cidr);
    }

    /// Berth's routes (`proto 190`) in node `i`'s namespace, as `dst` strings.
    pub fn berth_routes(&self, i: usize) -> Vec<String> {
        let out = self.nodes[i]
            .node
            .ns
            .exec_ok(&["ip", "-4", "route", "show", "proto", "190"]);
        out.lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }

    /// Polls until node `i` has exactly the routes to `cidrs` (sorted compare), up to `within`.
    pub fn wait_routes(&self, i: usize, cidrs: &[String], within: Duration) -> Vec<String> {
        let mut want: Vec<String> = cidrs.to_vec();
        want.sort();
        let deadline = Instant::now() + within;
        loop {
            let mut have = self.berth_routes(i);
            have.sort();
            if have == want || Instant::now() > deadline {
                return have;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Every other node's pod CIDR, as node `i` should route them.
    pub fn remote_cidrs(&self, i: usize) -> Vec<String> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| n.pod_cidr.clone())
            .collect()
    }

    /// A pod on node `i`: returns it and its address.
    pub fn pod(&self, i: usize) -> (Pod, String) {
        let pod = Pod::new();
        let ip = self.nodes[i].node.add(&pod);
        (pod, ip)
    }
}

/// Gives node namespace `ns` an `eth0` with `ip`/24, plugged into the `br0` of the private network
/// namespace `net`.
pub fn plug_into_bridge(net: &NetNs, ns: &NetNs, ip: &str) {
    let bridge_side = unique_name("bv");
    run_ok(Command::new("ip").args([
        "-n",
        &net.name,
        "link",
        "add",
        &bridge_side,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &ns.name,
    ]));
    net.exec_ok(&["ip", "link", "set", &bridge_side, "master", "br0", "up"]);
    ns.exec_ok(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
}

/// TTL of the first reply of `ping -c 1` from `from` to `ip`, if any.
pub fn ping_ttl(from: &NetNs, ip: &str) -> Option<u32> {
    let out = from.exec(&["ping", "-c", "1", "-W", "2", ip]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("ttl="))
        .and_then(|t| t.parse().ok())
}

/// Pings until one reply comes back or `within` passes.
pub fn ping_until(from: &NetNs, ip: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if from
            .exec(&["ping", "-c", "1", "-W", "1", ip])
            .status
            .success()
        {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An AF_PACKET socket for every ethertype, bound to `ifname` (in the calling thread's network
/// namespace), with a 200 ms receive timeout; and the link-layer address to send with.
fn packet_socket(ifname: &str) -> (std::os::fd::OwnedFd, libc::sockaddr_ll) {
    use std::os::fd::FromRawFd;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let index = nix::net::if_::if_nametoindex(ifname).expect("interface index");
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
    let rc = unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&addr as *const libc::sockaddr_ll).cast(),
            len,
        )
    };
    assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    (fd, addr)
}

/// Sends `frame` on a packet socket (to the frame's own destination MAC).
fn send_frame(fd: &std::os::fd::OwnedFd, addr: &libc::sockaddr_ll, frame: &[u8]) {
    let mut to = *addr;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&frame[..6]);
    let n = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(fd),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        n as usize,
        frame.len(),
        "sendto: {}",
        std::io::Error::last_os_error()
    );
}

/// Sends one raw Ethernet frame out of `ifname` inside `ns` (AF_PACKET), as a misbehaving pod
/// would.
pub fn send_raw_frame(ns: &NetNs, ifname: &str, frame: &[u8]) {
    let frame = frame.to_vec();
    let ifname = ifname.to_string();
    crate::cni::in_netns(ns, move || {
        let (fd, addr) = packet_socket(&ifname);
        send_frame(&fd, &addr, &frame);
    });
}

/// Receives frames on `ifname` inside `ns` for up to `within` (after sending `send_first`, if
/// given, from the same socket), returning the first one `accept` takes.
pub fn recv_raw_frame(
    ns: &NetNs,
    ifname: &str,
    within: Duration,
    send_first: Option<Vec<u8>>,
    accept: impl Fn(&[u8]) -> bool + Send,
) -> Option<Vec<u8>> {
    let ifname = ifname.to_string();
    crate::cni::in_netns(ns, move || {
        let (fd, addr) = packet_socket(&ifname);
        if let Some(frame) = send_first {
            send_frame(&fd, &addr, &frame);
        }
        let deadline = Instant::now() + within;
        let mut buf = vec![0u8; 2048];
        while Instant::now() < deadline {
            let n = unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n > 0 && accept(&buf[..n as usize]) {
                return Some(buf[..n as usize].to_vec());
            }
        }
        None
    })
}

/// MAC address of `ifname` in `ns`.
pub fn mac_of(ns: &NetNs, ifname: &str) -> [u8; 6] {
    // Not /sys/class/net: sysfs shows the namespace of whoever mounted it.
    let out = ns.exec_ok(&["ip", "-o", "link", "show", ifname]);
    let mut words = out.split_whitespace();
    words.find(|w| *w == "link/ether");
    let v: Vec<u8> = words
        .next()
        .expect("link/ether")
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// An ARP frame (`oper` 1 request, 2 reply) from `sha`/`spa` asking for `tpa`.
pub fn arp_frame(oper: u16, sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&oper.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa);
    f
}

/// An ICMPv6 router advertisement frame from `src_mac` (checksum not computed: the datapath must
/// drop it whatever it holds).
pub fn ipv6_router_advertisement(src_mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]); // all-nodes multicast
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    let payload = [134u8, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]); // ICMPv6, hop limit 255
    let mut src = [0u8; 16];
    src[0] = 0xfe;
    src[1] = 0x80;
    src[15] = 1;
    f.extend_from_slice(&src);
    let mut dst = [0u8; 16];
    dst[0] = 0xff;
    dst[1] = 0x02;
    dst[15] = 1;
    f.extend_from_slice(&dst);
    f.extend_from_slice(&payload);
    f
}

/// An IPv4 ICMP echo request from `src` to `dst` with a correct header checksum.
pub fn ipv4_echo(dst_mac: [u8; 6], src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let icmp = [8u8, 0, 0xf7, 0xff, 0, 0, 0, 0];
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 1, 0, 0];
    let total = (20 + icmp.len()) as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// The Internet checksum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Spawns `f` on a thread inside `ns` (sockets it creates stay there).
pub fn spawn_in<T: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = ns.path();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Sends `len` bytes from `client` to a server in `server` at `ip` and checks they arrive intact.
pub fn transfer_exact(server: &Pod, client: &Pod, ip: &str, len: usize) {
    let listener_ready = std::sync::mpsc::channel::<u16>();
    let srv = spawn_in(&server.ns, move || {
        let l = TcpListener::bind("0.0.0.0:0").unwrap();
        listener_ready
            .0
            .send(l.local_addr().unwrap().port())
            .unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut h = Sha256::new();
        let mut n = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let r = s.read(&mut buf).unwrap();
            if r == 0 {
                break;
            }
            h.update(&buf[..r]);
            n += r;
        }
        (n, h.finalize().to_vec())
    });
    let port = listener_ready
        .1
        .recv_timeout(Duration::from_secs(10))
        .unwrap();
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let data = pattern(len);
    let want = Sha256::digest(&data).to_vec();
    spawn_in(&client.ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
        s.write_all(&data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    })
    .join()
    .unwrap();
    let (n, got) = srv.join().unwrap();
    assert_eq!(n, len, "bytes received");
    assert_eq!(got, want, "payload changed in transit");
}

/// A TCP stream from `client` to `server` that keeps flowing until stopped; counts bytes
/// received.
pub struct Stream {
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Stream {
    pub fn start(server: &Pod, client: &Pod, ip: &str) -> Stream {
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<u16>();
        let (r, st) = (received.clone(), stop.clone());
        let srv = spawn_in(&server.ns, move || {
            let l = TcpListener::bind("0.0.0.0:0").unwrap();
            tx.send(l.local_addr().unwrap().port()).unwrap();
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            while !st.load(Ordering::Relaxed) {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        r.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let st = stop.clone();
        let cli = spawn_in(&client.ns, move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
            s.set_write_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let chunk = vec![0x5au8; 16 * 1024];
            while !st.load(Ordering::Relaxed) {
                let _ = s.write(&chunk);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Stream {
            received,
            stop,
            threads: vec![srv, cli],
        }
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Waits until more bytes than now have arrived (up to 10 s); true if they did.
    pub fn grows(&self) -> bool {
        let before = self.received();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.received() > before + 64 * 1024 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
