//! A real container runtime drives Berth: containerd + runc (Debian packages) run a container from
//! an image built here out of busybox-static, with `ctr run --cni` and Berth's conflist. The
//! container gets its address from berth-agent and reaches another pod over the eBPF datapath.
use berth_tests::cni::{Node, Pod};
use berth_tests::containerd::{Containerd, IMAGE, InstalledFile};
use berth_tests::netns::workspace_bin;
use std::{
    io::{Read, Write},
    net::TcpListener,
    path::Path,
};

#[test]
fn containerd_container_gets_an_address_and_reaches_a_pod() {
    let node = Node::new();
    let peer = Pod::new();
    let peer_ip = node.add(&peer);

    // A one-shot HTTP server in the peer pod.
    let listener = berth_tests::cni::in_netns(&peer.ns, || TcpListener::bind("0.0.0.0:0").unwrap());
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, from) = listener.accept().expect("accept from container");
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 13\r\n\r\nberth-peer-ok")
            .unwrap();
        from.ip().to_string()
    });

    // ctr's --cni reads the standard locations: install Berth there for the test's duration.
    // containerd 1.6's libcni predates CNI 1.1: newer runtimes pick 1.1.0 from cniVersions.
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["1.0.0", "1.1.0"],
        "name": "berth",
        "plugins": [{"type": "berth", "agentSocket": node.socket(), "stateDir": node.cni_state_dir()}],
    });
    let _bin = InstalledFile::install(
        Path::new("/opt/cni/bin/berth"),
        &std::fs::read(workspace_bin("berth")).unwrap(),
        0o755,
    );
    let _conf = InstalledFile::install(
        Path::new("/etc/cni/net.d/05-berth.conflist"),
        conflist.to_string().as_bytes(),
        0o644,
    );
    let first_conf = std::fs::read_dir("/etc/cni/net.d")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".conf") || n.ends_with(".conflist") || n.ends_with(".json"))
        .min()
        .unwrap();
    assert_eq!(
        first_conf, "05-berth.conflist",
        "another CNI config sorts before Berth's in /etc/cni/net.d"
    );

    let ctd = Containerd::start();
    ctd.import_busybox();
    let id = format!("berth-ctr-{}", std::process::id());
    // ctr runs the CNI plugin itself, so it runs inside the node's network namespace.
    let out = node
        .ns
        .command("ctr")
        .arg("--address")
        .arg(ctd.socket())
        .args(["run", "--rm", "--cni", "--snapshotter", "native", IMAGE, &id])
        .args(["/bin/sh", "-c", &format!(
            // (busybox-static's wget crashes in Debian's build; nc does the HTTP request.)
            "ip -4 -o addr show eth0 && ping -c 2 -W 2 {peer_ip} && printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {peer_ip} {port}"
        )])
        .output()
        .expect("run ctr");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ctr run failed: {}\nstdout: {stdout}\nstderr: {}\ncontainerd:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        ctd.log()
    );
    assert!(
        stdout.contains("berth-peer-ok"),
        "container did not reach the peer pod: {stdout}"
    );
    let container_ip = server.join().unwrap();
    assert!(
        stdout.contains(&format!("inet {container_ip}/32")),
        "the peer saw {container_ip}, which is not the container's eth0 address: {stdout}"
    );
    assert!(
        container_ip.starts_with("10.2.0."),
        "address {container_ip} not from the pod CIDR"
    );

    // ctr ran CNI DEL when the container exited: only the peer remains.
    let status = node.berthctl(&["status"]);
    assert_eq!(
        status["ipam"]["allocated"], 1,
        "container's address not released: {status}"
    );
}
