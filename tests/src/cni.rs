//! A simulated node for CNI/datapath tests: a network namespace running berth-agent (with its own
//! socket, state, delete queue and pin root), pods as further namespaces, and the real `berth`
//! binary invoked the way a container runtime does.
use crate::netns::{NetNs, require_root, unique_name, workspace_bin};
use serde_json::Value;
use std::{
    io::Write,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Address every test node puts on its loopback (the "node IP"; only inside the node namespace).
pub const NODE_IP: &str = "10.99.0.1";

/// Output of one CNI invocation.
#[derive(Debug)]
pub struct CniOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CniOut {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?} / stderr {:?}",
                self.stdout, self.stderr
            )
        })
    }
    /// The CNI error code in the error JSON (and checks the exit status is non-zero).
    pub fn error_code(&self) -> u64 {
        assert_ne!(
            self.code, 0,
            "expected failure, got success: {}",
            self.stdout
        );
        self.json()["code"].as_u64().expect("error JSON has a code")
    }
}

/// A node: network namespace + agent.
pub struct Node {
    pub ns: NetNs,
    pub dir: tempfile::TempDir,
    pub pin_root: PathBuf,
    pub pod_cidr: String,
    agent: Option<Child>,
    /// Extra `berth-agent` arguments, passed on every (re)start.
    extra_args: Vec<String>,
    /// `--node-name` of the agent.
    pub node_name: String,
}

impl Node {
    /// A node namespace with `NODE_IP` on loopback and a running agent.
    pub fn new() -> Self {
        Self::with_cidr("10.2.0.0/24")
    }

    pub fn with_cidr(pod_cidr: &str) -> Self {
        Self::with_args(pod_cidr, &[])
    }

    /// A node whose agent also gets `args` (e.g. `&["--allocation-lease", "2"]`) on every start.
    pub fn with_args(pod_cidr: &str, args: &[&str]) -> Self {
        require_root();
        let ns = NetNs::new("bn");
        ns.exec_ok(&["ip", "addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"]);
        let name = ns.name.clone();
        Self::build(ns, &name, Some(pod_cidr), args)
    }

    /// A node in the prepared namespace `ns`, its agent named `node_name`; `pod_cidr` `None`: the
    /// agent takes it from its Node object (the state source must be among `args`).
    pub fn build(ns: NetNs, node_name: &str, pod_cidr: Option<&str>, args: &[&str]) -> Self {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("berth-node-")
            .tempdir()
            .expect("tempdir");
        let pin_root = PathBuf::from("/sys/fs/bpf").join(unique_name("berth-t"));
        let mut node = Node {
            ns,
            dir,
            pin_root,
            pod_cidr: pod_cidr.unwrap_or_default().into(),
            agent: None,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            node_name: node_name.into(),
        };
        node.start_agent();
        node
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }
    pub fn cni_state_dir(&self) -> PathBuf {
        self.dir.path().join("cni")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn agent_log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// Starts berth-agent inside the node namespace and waits until it serves its socket.
    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log())
            .expect("agent log");
        let child = self
            .ns
            .command(workspace_bin("berth-agent").to_str().unwrap())
            .args(["--config", "/dev/null", "--socket"])
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--cni-state-dir")
            .arg(self.cni_state_dir())
            .arg("--pin-root")
            .arg(&self.pin_root)
            .args(["--housekeeping-interval", "1"])
            .args(["--node-name", &self.node_name, "--log", "info"])
            .args(
                (!self.pod_cidr.is_empty())
                    .then_some(["--pod-cidr", self.pod_cidr.as_str()])
                    .into_iter()
                    .flatten(),
            )
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn berth-agent");
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            if let Some(status) = self.agent.as_mut().unwrap().try_wait().unwrap() {
                panic!("berth-agent exited with {status}:\n{}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "berth-agent did not come up:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sets `flag` to `value` among the extra agent arguments (replacing an earlier value, else
    /// appending both), for the next [`Node::start_agent`]: restarts with another setting.
    pub fn set_agent_arg(&mut self, flag: &str, value: &str) {
        match self.extra_args.iter().position(|a| a == flag) {
            Some(i) if i + 1 < self.extra_args.len() => self.extra_args[i + 1] = value.into(),
            _ => self
                .extra_args
                .extend([flag.to_string(), value.to_string()]),
        }
    }

    /// PID of the running agent.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// True while the agent process has not exited.
    pub fn agent_running(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("try_wait agent").is_none())
    }

    /// One request of the agent's framed local protocol (what the CNI plugin speaks), for tests
    /// that play a plugin stopped half-way through ADD.
    pub fn local(
        &self,
        op: berth_proto::agent::local_request::Op,
    ) -> berth_proto::agent::local_response::Result {
        use prost::Message;
        use std::io::Read;
        let mut s = std::os::unix::net::UnixStream::connect(self.socket()).expect("agent socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let body = berth_proto::agent::LocalRequest { op: Some(op) }.encode_to_vec();
        let mut frame = b"BRT1".to_vec();
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        s.write_all(&frame).expect("send request");
        let mut head = [0u8; 8];
        s.read_exact(&mut head).expect("read response header");
        assert_eq!(&head[..4], b"BRT1", "bad frame magic");
        let mut resp = vec![0u8; u32::from_be_bytes(head[4..].try_into().unwrap()) as usize];
        s.read_exact(&mut resp).expect("read response");
        berth_proto::agent::LocalResponse::decode(resp.as_slice())
            .expect("decode response")
            .result
            .expect("response has a result")
    }

    /// Kills the agent with `signal` and waits for it.
    pub fn stop_agent(&mut self, signal: nix::sys::signal::Signal) {
        if let Some(mut child) = self.agent.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal);
            let _ = child.wait();
        }
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.agent_log()).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The network configuration the runtime would pass (one plugin of the conflist).
    pub fn conf(&self) -> String {
        serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "berth",
            "type": "berth",
            "agentSocket": self.socket(),
            "stateDir": self.cni_state_dir(),
        })
        .to_string()
    }

    /// Runs the CNI plugin inside the node namespace, as a runtime would.
    pub fn cni(&self, env: &[(&str, &str)], stdin: &str) -> CniOut {
        let mut cmd = self.ns.command(workspace_bin("berth").to_str().unwrap());
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn berth");
        // The plugin may answer (e.g. VERSION, bad environment) without reading stdin.
        let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        let out = child.wait_with_output().expect("wait berth");
        CniOut {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs verb `cmd` for `(cid, ifname)` in `netns` with the node's config.
    pub fn verb(&self, cmd: &str, cid: &str, netns: Option<&str>, ifname: &str) -> CniOut {
        self.verb_with_args(
            cmd,
            cid,
            netns,
            ifname,
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=test",
        )
    }

    /// [`Node::verb`] with the given `CNI_ARGS`.
    pub fn verb_with_args(
        &self,
        cmd: &str,
        cid: &str,
        netns: Option<&str>,
        ifname: &str,
        cni_args: &str,
    ) -> CniOut {
        let mut env = vec![
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", cid),
            ("CNI_IFNAME", ifname),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_ARGS", cni_args),
        ];
        if let Some(n) = netns {
            env.push(("CNI_NETNS", n));
        }
        self.cni(&env, &self.conf())
    }

    /// ADD for a pod; panics unless it succeeds; returns the pod's IPv4 address.
    pub fn add(&self, pod: &Pod) -> String {
        self.add_with_args(
            pod,
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=test",
        )
    }

    /// [`Node::add`] with the given `CNI_ARGS` (pod identity, `IP=`).
    pub fn add_with_args(&self, pod: &Pod, cni_args: &str) -> String {
        let out = self.verb_with_args(
            "ADD",
            &pod.cid,
            Some(pod.ns.path().to_str().unwrap()),
            "eth0",
            cni_args,
        );
        assert_eq!(
            out.code,
            0,
            "ADD {} failed: {} {}\nagent:\n{}",
            pod.cid,
            out.stdout,
            out.stderr,
            self.log_tail()
        );
        let v = out.json();
        let addr = v["ips"][0]["address"]
            .as_str()
            .expect("result has an address");
        addr.split('/').next().unwrap().to_string()
    }

    /// DEL for a pod; panics unless it succeeds.
    pub fn del(&self, pod: &Pod) {
        let out = self.verb(
            "DEL",
            &pod.cid,
            Some(pod.ns.path().to_str().unwrap()),
            "eth0",
        );
        assert_eq!(
            out.code, 0,
            "DEL {} failed: {} {}",
            pod.cid, out.stdout, out.stderr
        );
    }

    /// `berthctl --json <args>`.
    pub fn berthctl(&self, args: &[&str]) -> Value {
        let out = Command::new(workspace_bin("berthctl"))
            .arg("--socket")
            .arg(self.socket())
            .arg("--json")
            .args(args)
            .output()
            .expect("spawn berthctl");
        assert!(
            out.status.success(),
            "berthctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("berthctl JSON")
    }

    /// Names of Berth's host-side interfaces in the node namespace.
    pub fn host_links(&self) -> Vec<String> {
        let out = self.ns.exec_ok(&["ip", "-o", "link", "show"]);
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_string())
            .filter(|n| n.starts_with("bth"))
            .collect()
    }

    /// Berth's host-side interfaces once the agent's background deletions have settled (polls up
    /// to 15 s for the count to reach `expected`, then returns what is there).
    pub fn settled_host_links(&self, expected: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let links = self.host_links();
            if links.len() == expected || Instant::now() > deadline {
                return links;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Packets counted by the datapath under `(endpoint_id, kind)` in the pinned metrics map,
    /// summed over CPUs (read with bpftool, independently of the agent).
    pub fn metric_packets(&self, endpoint_id: u32, kind: u32) -> u64 {
        let pin = self
            .pin_root
            .join("maps")
            .join(berth_ebpf_common::MAP_METRICS);
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&pin)
            .output()
            .expect("run bpftool (installed by scripts/bootstrap.sh)");
        assert!(
            out.status.success(),
            "bpftool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
        let bytes = |a: &Value| -> Vec<u8> {
            a.as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
                })
                .collect()
        };
        let mut want = endpoint_id.to_le_bytes().to_vec();
        want.extend_from_slice(&kind.to_le_bytes());
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| bytes(&e["key"]) == want)
            .flat_map(|e| e["values"].as_array().cloned().unwrap_or_default())
            .map(|cpu| {
                let b = bytes(&cpu["value"]);
                u64::from_le_bytes(b[..8].try_into().unwrap())
            })
            .sum()
    }

    /// Number of entries in the pinned endpoint map (read with bpftool).
    pub fn endpoint_map_entries(&self) -> usize {
        let pin = self
            .pin_root
            .join("maps")
            .join(berth_ebpf_common::MAP_ENDPOINTS);
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&pin)
            .output()
            .expect("run bpftool (installed by scripts/bootstrap.sh)");
        assert!(
            out.status.success(),
            "bpftool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
        v.as_array().map_or(0, Vec::len)
    }
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- berth-agent log ({}) ---\n{}",
                self.ns.name,
                self.log_tail()
            );
        }
        self.stop_agent(nix::sys::signal::Signal::SIGKILL);
        // Deleting the node namespace removes every veth in it; then the pins.
        let _ = std::fs::remove_dir_all(&self.pin_root);
    }
}

/// A pod: a network namespace plus a container ID.
pub struct Pod {
    pub ns: NetNs,
    pub cid: String,
}

impl Pod {
    pub fn new() -> Self {
        let ns = NetNs::new("bp");
        let cid = format!("c{}", ns.name);
        Pod { ns, cid }
    }

    /// `ping -c <count>` from this pod; true when every reply came back.
    pub fn ping(&self, ip: &str) -> bool {
        self.ns
            .exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", ip])
            .status
            .success()
    }

    /// Runs `f` on a thread inside this pod's namespace (sockets created there stay there).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.ns, f)
    }
}

impl Default for Pod {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `f` on a fresh thread switched into `ns`.
pub fn in_netns<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    let path = ns.path();
    std::thread::scope(|s| {
        s.spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread in netns panicked")
    })
}
