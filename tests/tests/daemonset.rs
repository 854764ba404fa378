//! The container images and the DaemonSet, run as a kubelet would run them: the images are built
//! by `packaging/container/build-images.sh` (buildah, no daemon) and imported into containerd;
//! the test plays kubelet for one node (a network namespace with an uplink) and starts the
//! DaemonSet's init container and agent container with `ctr`, translating the pod template
//! itself — command, args, env (spec.nodeName), the security context's capabilities and
//! read-only root, host network, every volume mount (host paths under a directory the test owns
//! as the node's file system; the ConfigMap from the manifest; the service-account token),
//! /proc/sys read-only as the runtime mounts it. The agent talks to a Kubernetes API server
//! through in-cluster configuration (TLS, token) under the manifest's ClusterRole: the API server
//! answers 403 to anything else. Checked: the CNI binary installed by the init container; nothing
//! for the runtime (no conflist, no /healthz) until the Node object gives the pod CIDR; then the
//! conflist appears, /healthz answers the readiness probe's request, pods are networked with
//! addresses from that Node's CIDR; the agent holds exactly the DaemonSet's capabilities and
//! says clearly that forwarding is off instead of crashing; RBAC covered every request and
//! granted nothing unused. The CSI image runs the driver and its file-system tools.
use berth_tests::apiserver::{Access, ApiServer, RbacRule};
use berth_tests::containerd::Containerd;
use berth_tests::manifests::{object, repo_root};
use berth_tests::netns::{NetNs, run_ok};
use berth_tests::packaging::{profile, script};
use berth_tests::tunnel::Pki;
use serde_json::{Value, json};
use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

const NODE_IP: &str = "192.168.77.10";
const POD_CIDR: &str = "10.2.77.0/24";

/// containerd's default capability set (what `ctr run` starts from): dropping ALL means these.
const RUNTIME_DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

fn cap_bit(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other} not mapped in this test"),
    }
}

fn wait_until(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> bool,
    diag: impl Fn() -> String,
) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} not within {within:?}\n{}",
            diag()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A bpffs instance of the test's own, unmounted on drop.
struct Bpffs(PathBuf);
impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A container started with `ctr run` (attached, output to a log file); killed on drop.
struct Running {
    child: Child,
    ctd: Arc<Containerd>,
    id: String,
    log: PathBuf,
}
impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn pid(&self) -> Option<i32> {
        let out = self.ctd.ctr().args(["task", "ls"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(self.id.as_str()))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    }
}
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self
            .ctd
            .ctr()
            .args(["task", "kill", "-s", "SIGKILL", &self.id])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
        let _ = self
            .ctd
            .ctr()
            .args(["task", "rm", "-f", &self.id])
            .stderr(Stdio::null())
            .status();
        let _ = self
            .ctd
            .ctr()
            .args(["container", "rm", &self.id])
            .stderr(Stdio::null())
            .status();
    }
}

/// The kubelet of this test: the node's file system under `host`, volume sources resolved there.
struct Kubelet {
    ctd: Arc<Containerd>,
    node: NetNs,
    node_name: String,
    host: PathBuf,
    volumes: Vec<Value>,
    configmap_dir: PathBuf,
    sa_dir: PathBuf,
    api_port: u16,
    work: PathBuf,
    image: String,
}

impl Kubelet {
    fn host_path(&self, p: &str) -> PathBuf {
        self.host.join(p.trim_start_matches('/'))
    }

    /// `ctr run` arguments for one container of the pod template, as CRI would build its spec.
    fn ctr_args(&self, c: &Value, id: &str) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "run".into(),
            "--rm".into(),
            "--snapshotter".into(),
            "native".into(),
        ];
        // hostNetwork: the node's network namespace.
        a.push("--with-ns".into());
        a.push(format!("network:{}", self.node.path().display()));
        let sc = &c["securityContext"];
        assert_ne!(
            sc["privileged"], true,
            "privileged containers are not emulated here"
        );
        if sc["readOnlyRootFilesystem"] == true {
            a.push("--read-only".into());
        }
        let drop_all = sc["capabilities"]["drop"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x == "ALL"));
        assert!(
            drop_all,
            "{}: the test expects capabilities.drop [ALL]",
            c["name"]
        );
        let add: Vec<String> = sc["capabilities"]["add"]
            .as_array()
            .map(|v| v.iter().map(|x| x.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        for cap in RUNTIME_DEFAULT_CAPS
            .iter()
            .filter(|c| !add.iter().any(|a| a == *c))
        {
            a.push("--cap-drop".into());
            a.push(format!("CAP_{cap}"));
        }
        for cap in &add {
            a.push("--cap-add".into());
            a.push(format!("CAP_{cap}"));
        }
        for e in c["env"].as_array().into_iter().flatten() {
            let value = match (&e["value"], &e["valueFrom"]["fieldRef"]["fieldPath"]) {
                (Value::String(v), _) => v.clone(),
                (_, Value::String(p)) if p == "spec.nodeName" => self.node_name.clone(),
                other => panic!("env {e} ({other:?}) not emulated"),
            };
            a.push("--env".into());
            a.push(format!("{}={value}", e["name"].as_str().unwrap()));
        }
        // What kubelet adds: the API server's address and the service-account token.
        a.push("--env".into());
        a.push("KUBERNETES_SERVICE_HOST=127.0.0.1".into());
        a.push("--env".into());
        a.push(format!("KUBERNETES_SERVICE_PORT={}", self.api_port));
        a.push("--mount".into());
        a.push(format!(
            "type=bind,src={},dst=/var/run/secrets/kubernetes.io/serviceaccount,options=rbind:ro",
            self.sa_dir.display()
        ));
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let name = m["name"].as_str().unwrap();
            let vol = self
                .volumes
                .iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("volume {name} not declared"));
            let src = if let Some(p) = vol["hostPath"]["path"].as_str() {
                let hp = self.host_path(p);
                match vol["hostPath"]["type"].as_str() {
                    Some("DirectoryOrCreate") => std::fs::create_dir_all(&hp).unwrap(),
                    Some("Directory") => assert!(hp.is_dir(), "hostPath {p} must exist"),
                    other => panic!("hostPath type {other:?} not emulated"),
                }
                hp
            } else if vol["configMap"].is_object() {
                self.configmap_dir.clone()
            } else {
                panic!("volume {vol} not emulated")
            };
            let propagation = match m["mountPropagation"].as_str() {
                None | Some("None") => "rprivate",
                Some("HostToContainer") => "rslave",
                Some(other) => panic!("mountPropagation {other} not emulated (not privileged)"),
            };
            let mode = if m["readOnly"] == true { "ro" } else { "rw" };
            a.push("--mount".into());
            a.push(format!(
                "type=bind,src={},dst={},options=rbind:{mode}:{propagation}",
                src.display(),
                m["mountPath"].as_str().unwrap()
            ));
        }
        a.push(self.image.clone());
        a.push(id.into());
        for part in ["command", "args"] {
            for x in c[part].as_array().into_iter().flatten() {
                a.push(x.as_str().unwrap().into());
            }
        }
        a
    }

    fn start(&self, c: &Value) -> Running {
        let id = berth_tests::netns::unique_name("bds");
        let log = self.work.join(format!("{id}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = self
            .ctd
            .ctr()
            .args(self.ctr_args(c, &id))
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("ctr run");
        Running {
            child,
            ctd: self.ctd.clone(),
            id,
            log,
        }
    }
}

/// GET `path` from `host:port` inside the node's network namespace.
fn http_get_in(ns: &NetNs, host: &str, port: u16, path: &str) -> Option<String> {
    let (host, path) = (host.to_string(), path.to_string());
    berth_tests::cni::in_netns(ns, move || {
        let mut s = TcpStream::connect((host.as_str(), port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
}

/// A TLS front for the test API server, listening inside the node's network namespace (where a
/// hostNetwork pod finds the Kubernetes service) and relaying to the plain server.
fn tls_front(
    rt: &tokio::runtime::Runtime,
    ns: &NetNs,
    pki: &Pki,
    backend: std::net::SocketAddr,
) -> u16 {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs = vec![CertificateDer::from_pem_file(&pki.server_cert).unwrap()];
    let key = PrivateKeyDer::from_pem_file(&pki.server_key).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let std_listener = berth_tests::cni::in_netns(ns, || {
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap()
    });
    std_listener.set_nonblocking(true).unwrap();
    let port = std_listener.local_addr().unwrap().port();
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    port
}

fn cni(plugin: &Path, conf: &Value, env: &[(&str, &str)], ns: &NetNs) -> Value {
    let mut cmd = ns.command(plugin.to_str().unwrap());
    cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // VERSION does not read its input: a closed pipe is no error.
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "CNI {env:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

#[test]
fn agent_image_runs_as_the_daemonset_says_and_networks_pods() {
    berth_tests::netns::require_root();
    let work = tempfile::Builder::new()
        .prefix("berth-ds-")
        .tempdir_in(repo_root().join("target"))
        .unwrap();
    let w = work.path().to_path_buf();
    let archive = script(
        "packaging/container/build-images.sh",
        &[
            "--no-cargo",
            "--profile",
            profile(),
            "--only",
            "agent",
            "--out",
            w.join("images").to_str().unwrap(),
        ],
    );
    let archive = PathBuf::from(archive.lines().last().unwrap());

    let file = repo_root().join("packaging/kubernetes/berth-agent.yaml");
    let ds = object(&file, "DaemonSet", "berth-agent");
    let role = object(&file, "ClusterRole", "berth-agent");
    let cm = object(&file, "ConfigMap", "berth-agent-config");
    let pod = ds["spec"]["template"]["spec"].clone();
    assert_eq!(pod["hostNetwork"], true);
    let rules: Vec<RbacRule> = serde_json::from_value(role["rules"].clone()).unwrap();

    // The node: a network namespace with an uplink holding the node's address.
    let node = NetNs::new("bdn");
    node.exec_ok(&[
        "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up0p",
    ]);
    node.exec_ok(&["ip", "addr", "add", &format!("{NODE_IP}/24"), "dev", "up0"]);
    node.exec_ok(&["ip", "link", "set", "up0", "up"]);
    node.exec_ok(&["ip", "link", "set", "up0p", "up"]);
    let node_name = format!("ds-node-{}", std::process::id());

    // The API server, reachable from the node as the in-cluster service, with RBAC.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let api = rt.block_on(ApiServer::start());
    api.enforce_rbac(rules.clone());
    let pki = Pki::new(&w, "apiserver", IpAddr::V4(Ipv4Addr::LOCALHOST));
    let api_port = tls_front(&rt, &node, &pki, api.addr());
    let sa_dir = w.join("serviceaccount");
    std::fs::create_dir_all(&sa_dir).unwrap();
    std::fs::copy(&pki.ca, sa_dir.join("ca.crt")).unwrap();
    std::fs::write(sa_dir.join("token"), berth_tests::apiserver::TOKEN).unwrap();
    std::fs::write(sa_dir.join("namespace"), "kube-system").unwrap();
    let configmap_dir = w.join("configmap");
    std::fs::create_dir_all(&configmap_dir).unwrap();
    for (k, v) in cm["data"].as_object().unwrap() {
        std::fs::write(configmap_dir.join(k), v.as_str().unwrap()).unwrap();
    }
    // The node's file system, with its own bpffs at /sys/fs/bpf.
    let host = w.join("host");
    let bpffs = host.join("sys/fs/bpf");
    std::fs::create_dir_all(&bpffs).unwrap();
    run_ok(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs));
    let _bpffs = Bpffs(bpffs);

    let ctd = Arc::new(Containerd::start());
    run_ok(
        ctd.ctr()
            .args(["images", "import", "--snapshotter", "native"])
            .arg(&archive),
    );
    let image = format!(
        "docker.io/library/{}",
        pod["containers"][0]["image"].as_str().unwrap()
    );
    let images = run_ok(ctd.ctr().args(["images", "ls", "-q"]));
    assert!(
        images.lines().any(|l| l == image),
        "{image} not in {images}"
    );
    let kubelet = Kubelet {
        ctd: ctd.clone(),
        node,
        node_name: node_name.clone(),
        host: host.clone(),
        volumes: pod["volumes"].as_array().unwrap().clone(),
        configmap_dir,
        sa_dir,
        api_port,
        work: w.clone(),
        image,
    };

    // Init containers run to completion, in order.
    for c in pod["initContainers"].as_array().unwrap() {
        let mut r = kubelet.start(c);
        let st = r.child.wait().unwrap();
        assert!(
            st.success(),
            "init container {} failed: {st}\n{}",
            c["name"],
            r.log()
        );
    }
    let plugin = host.join("opt/cni/bin/berth");
    let version = cni(
        &plugin,
        &json!({}),
        &[("CNI_COMMAND", "VERSION")],
        &kubelet.node,
    );
    assert!(
        version["supportedVersions"].to_string().contains("1.1.0"),
        "{version}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(host.join("opt/cni/bin"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "install-cni-plugin left files behind: {leftovers:?}"
    );

    // The agent starts; without its Node object it has no pod CIDR, so nothing is offered.
    let agent_spec = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "agent")
        .unwrap();
    let agent = kubelet.start(agent_spec);
    let conflist = host.join("etc/cni/net.d/05-berth.conflist");
    let probe = &agent_spec["readinessProbe"]["httpGet"];
    let probe_host = probe["host"].as_str().unwrap();
    let probe_port = agent_spec["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == probe["port"])
        .unwrap()["containerPort"]
        .as_u64()
        .unwrap() as u16;
    let probe_path = probe["path"].as_str().unwrap();
    let listed_nodes: Access = ("watch".into(), "".into(), "nodes".into());
    wait_until(
        "the agent watching Nodes",
        Duration::from_secs(60),
        || api.requests().contains(&listed_nodes),
        || format!("requests {:?}\nagent:\n{}", api.requests(), agent.log()),
    );
    assert!(agent.pid().is_some(), "the agent exited:\n{}", agent.log());
    assert!(
        !conflist.exists(),
        "conflist installed before the agent was ready"
    );
    assert!(
        http_get_in(&kubelet.node, probe_host, probe_port, probe_path).is_none(),
        "ready without a pod CIDR"
    );

    // The Node object arrives with this node's pod CIDR.
    api.apply(berth_tests::cluster::node_manifest(
        &node_name, NODE_IP, POD_CIDR,
    ));
    wait_until(
        "the conflist",
        Duration::from_secs(60),
        || conflist.exists(),
        || agent.log(),
    );
    let health = std::cell::RefCell::new(None);
    wait_until(
        "/healthz 200",
        Duration::from_secs(30),
        || {
            let h = http_get_in(&kubelet.node, probe_host, probe_port, probe_path);
            let ok = h
                .as_deref()
                .is_some_and(|h| h.starts_with("HTTP/1.0 200") || h.starts_with("HTTP/1.1 200"));
            *health.borrow_mut() = h;
            ok
        },
        || format!("{:?}\n{}", health.borrow(), agent.log()),
    );
    assert!(health.into_inner().unwrap().ends_with("ok\n"));
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "pod CIDR from the Node object pod_cidr={POD_CIDR}"
        )),
        "{log}"
    );
    // A fresh node namespace forwards nothing and /proc/sys is read-only: a warning, no crash.
    assert!(
        log.contains("IPv4 forwarding is OFF") && log.contains("read-only"),
        "{log}"
    );

    // The agent process: exactly the DaemonSet's capabilities, no privilege escalation,
    // /proc/sys read-only.
    let pid = agent.pid().expect("agent task");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status.lines().find(|l| l.starts_with(k)).unwrap()[k.len()..]
            .trim()
            .to_string()
    };
    let want: u64 = agent_spec["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| 1u64 << cap_bit(c.as_str().unwrap()))
        .sum();
    assert_eq!(
        u64::from_str_radix(&field("CapEff:"), 16).unwrap(),
        want,
        "{status}"
    );
    assert_eq!(
        u64::from_str_radix(&field("CapBnd:"), 16).unwrap(),
        want,
        "{status}"
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let proc_sys = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/proc/sys"))
        .unwrap_or_else(|| panic!("no /proc/sys mount:\n{mountinfo}"));
    assert!(
        proc_sys
            .split_whitespace()
            .nth(5)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"),
        "{proc_sys}"
    );
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .unwrap();
    assert!(
        root.split_whitespace()
            .nth(5)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"),
        "root not read-only: {root}"
    );

    // Pods, wired by the installed plugin with the installed conflist, as a runtime would (the
    // node's paths live under the test's directory).
    let list: Value = serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
    assert_eq!(
        list["plugins"].as_array().unwrap().len(),
        1,
        "the default conflist needs only berth"
    );
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = "1.1.0".into();
    conf["name"] = list["name"].clone();
    for key in ["agentSocket", "stateDir", "logFile"] {
        let p = conf[key].as_str().unwrap().to_string();
        conf[key] = kubelet.host_path(&p).display().to_string().into();
    }
    let pods: Vec<NetNs> = (0..2).map(|_| NetNs::new("bdp")).collect();
    let mut ips = vec![];
    for (i, p) in pods.iter().enumerate() {
        let cid = format!("ds-{}-{i}", std::process::id());
        let netns = p.path().display().to_string();
        let r = cni(
            &plugin,
            &conf,
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", &cid),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/opt/cni/bin"),
            ],
            &kubelet.node,
        );
        let ip = r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let net: ipnet::Ipv4Net = POD_CIDR.parse().unwrap();
        assert!(
            net.contains(&ip.parse::<Ipv4Addr>().unwrap()),
            "{ip} outside the Node's {POD_CIDR}"
        );
        ips.push((cid, netns, ip));
    }
    pods[0].exec_ok(&["ping", "-c", "1", "-W", "5", &ips[1].2]);
    kubelet
        .node
        .exec_ok(&["ping", "-c", "1", "-W", "5", &ips[0].2]);
    for (cid, netns, _) in &ips {
        cni(
            &plugin,
            &conf,
            &[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/opt/cni/bin"),
            ],
            &kubelet.node,
        );
    }

    // RBAC: every request was allowed (the agent synced), and every grant was used.
    let requests = api.requests();
    for r in &requests {
        assert!(
            rules.iter().any(|rule| rule.allows(r)),
            "the agent asked for {r:?}, which the ClusterRole forbids"
        );
    }
    for rule in &rules {
        for g in &rule.api_groups {
            for res in &rule.resources {
                for v in &rule.verbs {
                    let a: Access = (v.clone(), g.clone(), res.clone());
                    assert!(
                        requests.contains(&a),
                        "the ClusterRole grants {a:?}, which the agent never uses"
                    );
                }
            }
        }
    }
    drop(agent);
    drop(kubelet);
}

#[test]
fn csi_image_runs_the_driver_and_its_tools() {
    berth_tests::netns::require_root();
    let work = tempfile::Builder::new()
        .prefix("berth-csi-img-")
        .tempdir_in(repo_root().join("target"))
        .unwrap();
    let out = script(
        "packaging/container/build-images.sh",
        &[
            "--no-cargo",
            "--profile",
            profile(),
            "--only",
            "csi",
            "--out",
            work.path().join("images").to_str().unwrap(),
        ],
    );
    let archive = PathBuf::from(out.lines().last().unwrap());
    let node = object(
        &repo_root().join("packaging/csi/node.yaml"),
        "DaemonSet",
        "berth-csi-node",
    );
    let plugin = node["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "berth-csi")
        .unwrap()
        .clone();
    let ctd = Containerd::start();
    run_ok(
        ctd.ctr()
            .args(["images", "import", "--snapshotter", "native"])
            .arg(&archive),
    );
    let image = format!("docker.io/library/{}", plugin["image"].as_str().unwrap());
    let id = berth_tests::netns::unique_name("bcsi");
    let out = run_ok(ctd.ctr().args(["run", "--rm", "--snapshotter", "native", &image, &id, "/bin/sh", "-ec",
        "berth-csi --version; berth-csi --help >/dev/null; mkfs.ext4 -V 2>&1; mkfs.xfs -V; \
         resize2fs -P /dev/null 2>&1 | head -1; xfs_growfs -V; blkid -V; blockdev --help 2>&1 | head -1; \
         mount --version; umount --version"]));
    for tool in [
        "berth-csi",
        "mke2fs",
        "mkfs.xfs",
        "resize2fs",
        "xfs_growfs",
        "blkid",
        "mount from util-linux",
    ] {
        assert!(
            out.contains(tool),
            "{tool} missing in the CSI image:\n{out}"
        );
    }
}
