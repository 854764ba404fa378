//! End-to-end tests of the Konnectivity-compatible tunnel: a control plane in one network
//! namespace, a node (agent + kubelet-like HTTPS server) in another, joined by a veth pair; the
//! client reaches the kubelet through the control plane's frontends (HTTP CONNECT and gRPC
//! ProxyService on unix sockets) → tunnel → agent. Privileged: needs root (namespaces).
use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use berth_agent::tunnel::Shutdown;
use berth_proto::konnectivity::{
    CloseRequest, Data, DialRequest, DialResponse, Packet, PacketType,
    agent_service_server::{AgentService, AgentServiceServer},
    packet::Payload,
};
use berth_tests::{
    netns::require_root,
    tunnel::{
        AgentGuard, CHATTER_PORT, CP_IP, CP_IPS, NODE_IP, NsRuntime, Pki, TOKEN, Tls, Topology,
        agent_args, check_pattern, connect_via_http, cp_status, dial_via_grpc, http_get_pattern,
        http_post_pattern, proxy_channel, spawn_controlplane, start_chatter, start_kubelet,
        token_file, wait_until_async,
    },
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(60);
const MB100: u64 = 100 * 1024 * 1024;

/// Bounds a step of a test so a regression fails instead of hanging (not a timing assertion).
async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(300), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish"))
}

fn kubelet_addrs() -> Vec<SocketAddr> {
    vec![
        SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 10250),
        SocketAddr::new(IpAddr::V4(NODE_IP), 10250),
    ]
}

async fn wait_agents(cp_rt: &NsRuntime, status: SocketAddr, n: usize) {
    wait_until_async("agent connected to the control plane", LIMIT, || async {
        let v = cp_rt.run(cp_status(status)).await;
        v["agents"].as_array().map_or(0, |a| a.len()) == n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_through_both_frontends_100mb_byte_exact() {
    require_root();
    let topo = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let (cp, addrs) = spawn_controlplane(&topo.cp, CP_IP, "cp-1", 1, dir.path(), &[]);
    let cp_rt = NsRuntime::new(Some(&topo.cp.path()));
    let node_rt = NsRuntime::new(Some(&topo.node.path()));
    let tls = Tls::new();
    node_rt
        .run(start_kubelet(kubelet_addrs(), tls.server.clone()))
        .await;
    let token = token_file(dir.path(), TOKEN);
    let agent = AgentGuard::start(
        &node_rt.handle,
        agent_args(vec![addrs.agent.to_string()], &token, dir.path(), vec![]),
        "node-1",
    );
    wait_agents(&cp_rt, addrs.status, 1).await;

    // The node registered over the same authenticated endpoint and turned Ready.
    wait_until_async("node Ready in the registry", LIMIT, || async {
        let v = cp_rt.run(cp_status(addrs.status)).await;
        v["registry"]["nodes"][0]["state"] == "Ready"
    })
    .await;
    let v = cp_rt.run(cp_status(addrs.status)).await;
    let node = &v["registry"]["nodes"][0];
    assert_eq!(node["node_name"], "node-1");
    assert_eq!(node["flavor"], "b3-16");
    assert_eq!(node["reserved_cpu_millis"], 170);
    assert_eq!(node["reserved_memory_bytes"], 1_590_000_000u64);
    assert_eq!(v["agents"][0]["identifiers"]["ips"][0], NODE_IP.to_string());
    assert_eq!(v["agents"][0]["flow_control"], true);

    // HTTP CONNECT frontend, via the node IP and via 127.0.0.1.
    for target in [format!("{NODE_IP}:10250"), "127.0.0.1:10250".to_string()] {
        let s = connect_via_http(&addrs.connect_uds, &target)
            .await
            .expect("CONNECT");
        let ip: IpAddr = target.rsplit_once(':').unwrap().0.parse().unwrap();
        let mut t = tls.connect(s, ip).await.expect("TLS through the tunnel");
        t.write_all(b"GET /healthz HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        t.read_to_string(&mut out).await.ok();
        assert!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("ok"),
            "{out:?}"
        );
    }
    let s = connect_via_http(&addrs.connect_uds, &format!("{NODE_IP}:10250"))
        .await
        .unwrap();
    let mut t = tls.connect(s, IpAddr::V4(NODE_IP)).await.unwrap();
    let (n, bad) = http_get_pattern(&mut t, MB100)
        .await
        .expect("100 MB over CONNECT");
    assert_eq!((n, bad), (MB100, None), "download over HTTP CONNECT");

    // gRPC ProxyService frontend: 100 MB down and 100 MB up.
    let ch = proxy_channel(&addrs.proxy_uds).await;
    let io = dial_via_grpc(ch.clone(), &format!("{NODE_IP}:10250"))
        .await
        .expect("Proxy dial");
    let mut t = tls.connect(io, IpAddr::V4(NODE_IP)).await.unwrap();
    let (n, bad) = http_get_pattern(&mut t, MB100)
        .await
        .expect("100 MB over ProxyService");
    assert_eq!((n, bad), (MB100, None), "download over gRPC ProxyService");
    let io = dial_via_grpc(ch, "127.0.0.1:10250")
        .await
        .expect("Proxy dial");
    let mut t = tls
        .connect(io, IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
        .await
        .unwrap();
    let verdict = within("100 MB upload", http_post_pattern(&mut t, MB100))
        .await
        .expect("upload");
    assert_eq!(
        verdict,
        format!("match {MB100}"),
        "upload over gRPC ProxyService"
    );

    agent.stop().await;
    drop(cp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_failover_and_reconnect() {
    require_root();
    let topo = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let mut cps = Vec::new();
    // Only replica 0 drives the lifecycle; the others still register and show the node.
    let standby: &[&str] = &["--no-lifecycle-controller"];
    for (i, ip) in CP_IPS.iter().enumerate() {
        cps.push(spawn_controlplane(
            &topo.cp,
            *ip,
            &format!("cp-{i}"),
            3,
            dir.path(),
            if i == 0 { &[] } else { standby },
        ));
    }
    let cp_rt = NsRuntime::new(Some(&topo.cp.path()));
    let node_rt = NsRuntime::new(Some(&topo.node.path()));
    let tls = Tls::new();
    node_rt
        .run(start_kubelet(kubelet_addrs(), tls.server.clone()))
        .await;
    let token = token_file(dir.path(), TOKEN);
    // The agent knows the replicas only as a list of addresses to try in turn (the load balancer).
    let servers: Vec<String> = cps.iter().map(|(_, a)| a.agent.to_string()).collect();
    let agent = AgentGuard::start(
        &node_rt.handle,
        agent_args(servers, &token, dir.path(), vec![]),
        "node-ha",
    );
    wait_until_async("agent holds three connections", LIMIT, || async {
        agent.handle.connected_servers().len() == 3
    })
    .await;
    assert_eq!(
        agent.handle.connected_servers(),
        vec!["cp-0", "cp-1", "cp-2"]
    );
    for (_, a) in &cps {
        wait_agents(&cp_rt, a.status, 1).await;
    }

    async fn fetch(tls: &Tls, uds: &std::path::Path) -> Result<(), String> {
        let s = connect_via_http(uds, &format!("{NODE_IP}:10250")).await?;
        let mut t = tls
            .connect(s, IpAddr::V4(NODE_IP))
            .await
            .map_err(|e| e.to_string())?;
        let (n, bad) = http_get_pattern(&mut t, 1 << 20).await?;
        (n == 1 << 20 && bad.is_none())
            .then_some(())
            .ok_or(format!("got {n} bytes, mismatch {bad:?}"))
    }
    for (_, a) in &cps {
        fetch(&tls, &a.connect_uds)
            .await
            .expect("dial through every replica");
    }

    // Kill replica 1: dials through the others keep working.
    cps[1].0.kill();
    wait_until_async("agent notices the lost replica", LIMIT, || async {
        agent.handle.connected_servers().len() == 2
    })
    .await;
    for i in [0, 2] {
        fetch(&tls, &cps[i].1.connect_uds)
            .await
            .expect("dial with one replica down");
    }

    // Restart it: the agent reconnects by itself.
    let (p, a) = spawn_controlplane(&topo.cp, CP_IPS[1], "cp-1", 3, dir.path(), standby);
    cps[1] = (p, a);
    wait_until_async(
        "agent reconnects to the restarted replica",
        LIMIT,
        || async { agent.handle.connected_servers().len() == 3 },
    )
    .await;
    wait_agents(&cp_rt, cps[1].1.status, 1).await;
    fetch(&tls, &cps[1].1.connect_uds)
        .await
        .expect("dial through the restarted replica");
    // The restarted replica also got the node's registration again.
    wait_until_async(
        "node registered on the restarted replica",
        LIMIT,
        || async {
            let v = cp_rt.run(cp_status(cps[1].1.status)).await;
            v["registry"]["nodes"][0]["state"] == "Ready"
        },
    )
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_streams_with_one_stalled_reader() {
    require_root();
    const STREAMS: usize = 1000;
    const SMALL: u64 = 64 * 1024;
    const STALLED: u64 = 64 * 1024 * 1024;
    let topo = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let (_cp, addrs) = spawn_controlplane(&topo.cp, CP_IP, "cp-1", 1, dir.path(), &[]);
    let cp_rt = NsRuntime::new(Some(&topo.cp.path()));
    let node_rt = NsRuntime::new(Some(&topo.node.path()));
    let chatter = node_rt
        .run(start_chatter(SocketAddr::new(
            IpAddr::V4(NODE_IP),
            CHATTER_PORT,
        )))
        .await;
    let token = token_file(dir.path(), TOKEN);
    let agent = AgentGuard::start(
        &node_rt.handle,
        agent_args(
            vec![addrs.agent.to_string()],
            &token,
            dir.path(),
            vec![format!("{NODE_IP}:{CHATTER_PORT}")],
        ),
        "node-many",
    );
    wait_agents(&cp_rt, addrs.status, 1).await;
    let target = format!("{NODE_IP}:{CHATTER_PORT}");

    // The stalled stream: asks for 64 MB and reads nothing.
    let mut stalled = connect_via_http(&addrs.connect_uds, &target)
        .await
        .expect("CONNECT");
    stalled
        .write_all(format!("stalled {STALLED}\n").as_bytes())
        .await
        .unwrap();
    wait_until_async("the stalled stream is sending", LIMIT, || async {
        chatter
            .written
            .lock()
            .unwrap()
            .get("stalled")
            .copied()
            .unwrap_or(0)
            > 0
    })
    .await;

    // 999 others, all concurrently, each byte-checked.
    let mut tasks = Vec::new();
    for i in 0..STREAMS - 1 {
        let uds = addrs.connect_uds.clone();
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = connect_via_http(&uds, &target).await?;
            s.write_all(format!("s{i} {SMALL}\n").as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut got = Vec::with_capacity(SMALL as usize);
            s.read_to_end(&mut got).await.map_err(|e| e.to_string())?;
            if got.len() as u64 != SMALL || check_pattern(0, &got).is_some() {
                return Err(format!(
                    "stream s{i}: {} bytes, mismatch {:?}",
                    got.len(),
                    check_pattern(0, &got)
                ));
            }
            Ok::<_, String>(())
        }));
    }
    within("999 streams beside the stalled one", async {
        for t in tasks {
            t.await.unwrap().expect("stream completes byte-exact");
        }
    })
    .await;
    // Every other stream finished while the stalled one is still held back by its reader.
    let written = chatter
        .written
        .lock()
        .unwrap()
        .get("stalled")
        .copied()
        .unwrap_or(0);
    assert!(
        written < STALLED,
        "the stalled stream was not held back ({written} bytes written)"
    );
    assert!(
        !chatter
            .finished
            .lock()
            .unwrap()
            .contains(&"stalled".to_string())
    );
    assert_eq!(chatter.finished.lock().unwrap().len(), STREAMS - 1);

    // It was only paused: reading it now yields the whole 64 MB, byte-exact.
    let mut off = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let k = within("reading the stalled stream", stalled.read(&mut buf))
            .await
            .unwrap();
        if k == 0 {
            break;
        }
        assert_eq!(check_pattern(off, &buf[..k]), None);
        off += k as u64;
    }
    assert_eq!(off, STALLED);
    assert_eq!(
        agent
            .handle
            .stats
            .streams_closed_bad_input
            .load(Ordering::Relaxed),
        0
    );
    // No leaked streams on either end once the clients are done.
    drop(stalled);
    wait_until_async("every stream released", LIMIT, || async {
        let v = cp_rt.run(cp_status(addrs.status)).await;
        agent.handle.stats.open_streams.load(Ordering::Relaxed) == 0
            && v["agents"][0]["open_streams"] == 0
    })
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_bad_token_allow_list_closed_port_malformed_frames() {
    require_root();
    let topo = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let (_cp, addrs) = spawn_controlplane(&topo.cp, CP_IP, "cp-1", 1, dir.path(), &[]);
    let cp_rt = NsRuntime::new(Some(&topo.cp.path()));
    let node_rt = NsRuntime::new(Some(&topo.node.path()));
    let chatter = node_rt
        .run(start_chatter(SocketAddr::new(
            IpAddr::V4(NODE_IP),
            CHATTER_PORT,
        )))
        .await;

    // 1. Bad token: the agent is never accepted, and the frontends say no agent serves the node.
    let bad = token_file(dir.path(), "not-the-token");
    let bad_dir = tempfile::tempdir().unwrap();
    let intruder = AgentGuard::start(
        &node_rt.handle,
        agent_args(vec![addrs.agent.to_string()], &bad, bad_dir.path(), vec![]),
        "intruder",
    );
    wait_until_async("the intruder was refused repeatedly", LIMIT, || async {
        intruder
            .handle
            .stats
            .connect_failures
            .load(Ordering::Relaxed)
            >= 3
    })
    .await;
    assert!(intruder.handle.connected_servers().is_empty());
    let v = cp_rt.run(cp_status(addrs.status)).await;
    assert_eq!(v["agents"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(v["registry"]["nodes"].as_array().unwrap().len(), 0, "{v}");
    let err = connect_via_http(&addrs.connect_uds, &format!("{NODE_IP}:10250"))
        .await
        .unwrap_err();
    assert!(
        err.contains("503") && err.contains("no agent available"),
        "{err}"
    );
    intruder.stop().await;
    // The token never shows up in the server's log.
    assert!(
        !std::fs::read_to_string(dir.path().join("cp-1.log"))
            .unwrap()
            .contains(TOKEN)
    );

    // A good agent whose allow-list holds the chatter port and the default kubelet entries.
    let token = token_file(dir.path(), TOKEN);
    let agent = AgentGuard::start(
        &node_rt.handle,
        agent_args(
            vec![addrs.agent.to_string()],
            &token,
            dir.path(),
            vec![
                format!("{NODE_IP}:{CHATTER_PORT}"),
                "127.0.0.1:10250".into(),
            ],
        ),
        "node-r",
    );
    wait_agents(&cp_rt, addrs.status, 1).await;

    // 2. Outside the allow-list: refused with a DIAL_RSP error, on both frontends.
    let err = connect_via_http(&addrs.connect_uds, &format!("{NODE_IP}:22"))
        .await
        .unwrap_err();
    assert!(err.contains("502") && err.contains("allow-list"), "{err}");
    let ch = proxy_channel(&addrs.proxy_uds).await;
    let err = dial_via_grpc(ch.clone(), "127.0.0.1:2379")
        .await
        .unwrap_err();
    assert!(err.contains("allow-list"), "{err}");
    assert!(agent.handle.stats.dials_refused.load(Ordering::Relaxed) >= 2);

    // 3. Allowed but closed port: a prompt DIAL_RSP error.
    let err = dial_via_grpc(ch.clone(), "127.0.0.1:10250")
        .await
        .unwrap_err();
    assert!(err.contains("refused"), "{err}");

    // 4. Malformed frames on the gRPC frontend close that stream only.
    for bad_packet in [
        // DATA for a connection that is not this stream's
        |id: i64| Packet {
            r#type: PacketType::Data as i32,
            payload: Some(Payload::Data(Data {
                connect_id: id + 1000,
                error: String::new(),
                data: vec![1].into(),
            })),
        },
        // oversized DATA (2 MiB)
        |id: i64| Packet {
            r#type: PacketType::Data as i32,
            payload: Some(Payload::Data(Data {
                connect_id: id,
                error: String::new(),
                data: vec![0; 2 << 20].into(),
            })),
        },
        // type and payload disagree
        |id: i64| Packet {
            r#type: PacketType::Data as i32,
            payload: Some(Payload::CloseRequest(CloseRequest { connect_id: id })),
        },
    ] {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(Packet {
            r#type: PacketType::DialReq as i32,
            payload: Some(Payload::DialRequest(DialRequest {
                protocol: "tcp".into(),
                address: format!("{NODE_IP}:{CHATTER_PORT}"),
                random: 7,
            })),
        })
        .await
        .unwrap();
        let mut client =
            berth_proto::konnectivity::proxy_service_client::ProxyServiceClient::new(ch.clone())
                .max_encoding_message_size(16 << 20);
        let mut inbound = client
            .proxy(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let rsp = inbound.message().await.unwrap().unwrap();
        let Some(Payload::DialResponse(DialResponse {
            connect_id, error, ..
        })) = rsp.payload
        else {
            panic!("expected DIAL_RSP");
        };
        assert!(error.is_empty(), "{error}");
        tx.send(bad_packet(connect_id)).await.unwrap();
        let mut closed_with = None;
        while let Ok(Some(p)) = inbound.message().await {
            if let Some(Payload::CloseResponse(c)) = p.payload {
                closed_with = Some(c.error);
                break;
            }
        }
        let e = closed_with.expect("stream closed with CLOSE_RSP");
        assert!(!e.is_empty(), "CLOSE_RSP carries the reason");
    }
    // The server and the agent are still fine: a normal exchange works.
    let mut s = connect_via_http(&addrs.connect_uds, &format!("{NODE_IP}:{CHATTER_PORT}"))
        .await
        .unwrap();
    s.write_all(b"after 1000\n").await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!((got.len(), check_pattern(0, &got)), (1000, None));
    assert!(
        chatter
            .finished
            .lock()
            .unwrap()
            .contains(&"after".to_string())
    );
    assert_eq!(agent.handle.connected_servers(), vec!["cp-1"]);

    // 5. Direct refusal at the AgentService: no token → Unauthenticated.
    let status = cp_rt
        .run(async move {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", addrs.agent))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let (_tx, rx) = tokio::sync::mpsc::channel::<Packet>(1);
            let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            req.metadata_mut()
                .insert("agentid", "sneaky".parse().unwrap());
            let r = berth_proto::konnectivity::agent_service_client::AgentServiceClient::new(ch)
                .connect(req)
                .await;
            r.err().map(|s| s.code())
        })
        .await;
    assert_eq!(status, Some(tonic::Code::Unauthenticated));
    agent.stop().await;
}

/// A scripted tunnel server built from the proto alone: the agent speaks to it exactly as to the
/// upstream server. It sends malformed packets and checks the agent closes only that stream.
struct ScriptedServer {
    to_agent: tokio::sync::mpsc::Sender<Packet>,
    from_agent: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Packet>>>,
    conns: Arc<std::sync::atomic::AtomicUsize>,
    md: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    out_rx: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Packet>>>,
    in_tx: tokio::sync::mpsc::Sender<Packet>,
}

#[tonic::async_trait]
impl AgentService for ScriptedServer {
    type ConnectStream = tokio_stream::wrappers::ReceiverStream<Result<Packet, tonic::Status>>;
    async fn connect(
        &self,
        req: tonic::Request<tonic::Streaming<Packet>>,
    ) -> Result<tonic::Response<Self::ConnectStream>, tonic::Status> {
        let mut md = Vec::new();
        for k in ["agentid", "agentidentifiers", "authorization"] {
            if let Some(v) = req.metadata().get(k) {
                md.push((k.to_string(), v.to_str().unwrap_or("").to_string()));
            }
        }
        *self.md.lock().unwrap() = md;
        self.conns.fetch_add(1, Ordering::Relaxed);
        let Some(mut out_rx) = self.out_rx.lock().unwrap().take() else {
            return Err(tonic::Status::unavailable("one connection only"));
        };
        let mut inbound = req.into_inner();
        let in_tx = self.in_tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(p)) = inbound.message().await {
                let _ = in_tx.send(p).await;
            }
        });
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(p) = out_rx.recv().await {
                if tx.send(Ok(p)).await.is_err() {
                    break;
                }
            }
        });
        // Upstream-style server: no credit extension offered.
        let mut resp = tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        resp.metadata_mut()
            .insert("serverid", "scripted".parse().unwrap());
        resp.metadata_mut()
            .insert("servercount", "1".parse().unwrap());
        Ok(resp)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_closes_only_the_stream_of_a_malformed_frame() {
    // Runs on loopback only; no namespace needed, but the suite is privileged as a whole.
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(64);
    let (in_tx, in_rx) = tokio::sync::mpsc::channel(64);
    let server = Arc::new(ScriptedServer {
        to_agent: out_tx,
        from_agent: Arc::new(tokio::sync::Mutex::new(in_rx)),
        conns: Arc::new(Default::default()),
        md: Arc::new(Default::default()),
        out_rx: std::sync::Mutex::new(Some(out_rx)),
        in_tx,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = AgentServiceServer::from_arc(server.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let srv = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
    });
    let token = token_file(dir.path(), TOKEN);
    let mut args = agent_args(
        vec![addr.to_string()],
        &token,
        dir.path(),
        vec![echo_addr.to_string()],
    );
    args.node_ip = None;
    let agent = AgentGuard::start(&tokio::runtime::Handle::current(), args, "node-s");
    wait_until_async("agent connects to the scripted server", LIMIT, || async {
        agent.handle.connected_servers() == vec!["scripted".to_string()]
    })
    .await;
    // Request metadata exactly as upstream expects it.
    let md = server.md.lock().unwrap().clone();
    assert!(md.contains(&("agentid".into(), "node-s".into())), "{md:?}");
    assert!(
        md.contains(&("authorization".into(), format!("Bearer {TOKEN}"))),
        "{md:?}"
    );
    let ids = md
        .iter()
        .find(|(k, _)| k == "agentidentifiers")
        .unwrap()
        .1
        .clone();
    assert!(
        ids.contains("host=node-s") && ids.contains("cidr=10.2.7.0%2F24"),
        "{ids}"
    );

    let mut from_agent = server.from_agent.lock().await;
    async fn recv_kind(rx: &mut tokio::sync::mpsc::Receiver<Packet>, want: PacketType) -> Packet {
        loop {
            let p = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("packet from agent")
                .expect("agent stream open");
            if p.r#type == want as i32 {
                return p;
            }
        }
    }
    let dial = |random: i64, address: String| Packet {
        r#type: PacketType::DialReq as i32,
        payload: Some(Payload::DialRequest(DialRequest {
            protocol: "tcp".into(),
            address,
            random,
        })),
    };
    let mut ids = Vec::new();
    for r in 1..=4 {
        server
            .to_agent
            .send(dial(r, echo_addr.to_string()))
            .await
            .unwrap();
        let p = recv_kind(&mut from_agent, PacketType::DialRsp).await;
        let Some(Payload::DialResponse(d)) = p.payload else {
            panic!()
        };
        assert_eq!((d.random, d.error.as_str()), (r, ""));
        ids.push(d.connect_id);
    }
    assert_eq!(ids, vec![1, 2, 3, 4], "connectIDs are assigned from 1");
    // malformed: DATA type with a CloseResponse payload for stream 1
    server
        .to_agent
        .send(Packet {
            r#type: PacketType::Data as i32,
            payload: Some(Payload::CloseResponse(
                berth_proto::konnectivity::CloseResponse {
                    error: String::new(),
                    connect_id: 1,
                },
            )),
        })
        .await
        .unwrap();
    let p = recv_kind(&mut from_agent, PacketType::CloseRsp).await;
    let Some(Payload::CloseResponse(c)) = p.payload else {
        panic!()
    };
    assert_eq!(c.connect_id, 1);
    assert!(c.error.contains("malformed"), "{}", c.error);
    // oversized DATA for stream 2
    server
        .to_agent
        .send(Packet {
            r#type: PacketType::Data as i32,
            payload: Some(Payload::Data(Data {
                connect_id: 2,
                error: String::new(),
                data: vec![0; 2 << 20].into(),
            })),
        })
        .await
        .unwrap();
    let p = recv_kind(&mut from_agent, PacketType::CloseRsp).await;
    let Some(Payload::CloseResponse(c)) = p.payload else {
        panic!()
    };
    assert_eq!(c.connect_id, 2);
    assert!(c.error.contains("oversized"), "{}", c.error);
    // DATA for an unknown connection → CLOSE_RSP with an error
    server
        .to_agent
        .send(Packet {
            r#type: PacketType::Data as i32,
            payload: Some(Payload::Data(Data {
                connect_id: 99,
                error: String::new(),
                data: vec![1].into(),
            })),
        })
        .await
        .unwrap();
    let p = recv_kind(&mut from_agent, PacketType::CloseRsp).await;
    let Some(Payload::CloseResponse(c)) = p.payload else {
        panic!()
    };
    assert_eq!(c.connect_id, 99);
    assert!(!c.error.is_empty());
    // Stream 3 still relays (echo), on the same agent connection.
    server
        .to_agent
        .send(Packet {
            r#type: PacketType::Data as i32,
            payload: Some(Payload::Data(Data {
                connect_id: 3,
                error: String::new(),
                data: b"hello".to_vec().into(),
            })),
        })
        .await
        .unwrap();
    let p = recv_kind(&mut from_agent, PacketType::Data).await;
    let Some(Payload::Data(d)) = p.payload else {
        panic!()
    };
    assert_eq!((d.connect_id, &d.data[..]), (3, &b"hello"[..]));
    // CLOSE_REQ → CLOSE_RSP without error.
    server
        .to_agent
        .send(Packet {
            r#type: PacketType::CloseReq as i32,
            payload: Some(Payload::CloseRequest(CloseRequest { connect_id: 4 })),
        })
        .await
        .unwrap();
    let p = recv_kind(&mut from_agent, PacketType::CloseRsp).await;
    let Some(Payload::CloseResponse(c)) = p.payload else {
        panic!()
    };
    assert_eq!((c.connect_id, c.error.as_str()), (4, ""));
    // Outside the allow-list → DIAL_RSP error.
    server
        .to_agent
        .send(dial(50, "127.0.0.1:1".into()))
        .await
        .unwrap();
    let p = recv_kind(&mut from_agent, PacketType::DialRsp).await;
    let Some(Payload::DialResponse(d)) = p.payload else {
        panic!()
    };
    assert_eq!(d.random, 50);
    assert!(d.error.contains("allow-list"), "{}", d.error);
    assert_eq!(
        server.conns.load(Ordering::Relaxed),
        1,
        "the agent never reconnected"
    );
    assert_eq!(
        agent
            .handle
            .stats
            .streams_closed_bad_input
            .load(Ordering::Relaxed),
        2
    );

    // DRAIN: on the first signal the agent sends DRAIN and refuses new dials.
    agent.shutdown.send(Shutdown::Drain).unwrap();
    recv_kind(&mut from_agent, PacketType::Drain).await;
    server
        .to_agent
        .send(dial(60, echo_addr.to_string()))
        .await
        .unwrap();
    let p = recv_kind(&mut from_agent, PacketType::DialRsp).await;
    let Some(Payload::DialResponse(d)) = p.payload else {
        panic!()
    };
    assert!(d.error.contains("draining"), "{}", d.error);
    // ... while the open stream 3 keeps relaying.
    server
        .to_agent
        .send(Packet {
            r#type: PacketType::Data as i32,
            payload: Some(Payload::Data(Data {
                connect_id: 3,
                error: String::new(),
                data: b"still".to_vec().into(),
            })),
        })
        .await
        .unwrap();
    let p = recv_kind(&mut from_agent, PacketType::Data).await;
    let Some(Payload::Data(d)) = p.payload else {
        panic!()
    };
    assert_eq!(&d.data[..], b"still");
    drop(from_agent);
    agent.stop().await;
    let _ = stop_tx.send(());
    let _ = srv.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_open_streams_and_refuses_new_dials() {
    require_root();
    let topo = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let (_cp, addrs) = spawn_controlplane(&topo.cp, CP_IP, "cp-1", 1, dir.path(), &[]);
    let cp_rt = NsRuntime::new(Some(&topo.cp.path()));
    let node_rt = NsRuntime::new(Some(&topo.node.path()));
    let chatter = node_rt
        .run(start_chatter(SocketAddr::new(
            IpAddr::V4(NODE_IP),
            CHATTER_PORT,
        )))
        .await;
    let token = token_file(dir.path(), TOKEN);
    let agent = AgentGuard::start(
        &node_rt.handle,
        agent_args(
            vec![addrs.agent.to_string()],
            &token,
            dir.path(),
            vec![format!("{NODE_IP}:{CHATTER_PORT}")],
        ),
        "node-d",
    );
    wait_agents(&cp_rt, addrs.status, 1).await;
    let target = format!("{NODE_IP}:{CHATTER_PORT}");
    const BIG: u64 = 16 * 1024 * 1024;
    let mut open = connect_via_http(&addrs.connect_uds, &target).await.unwrap();
    open.write_all(format!("open {BIG}\n").as_bytes())
        .await
        .unwrap();
    let mut first = vec![0u8; 1024];
    open.read_exact(&mut first).await.unwrap();

    agent.shutdown.send(Shutdown::Drain).unwrap();
    wait_until_async("server sees the agent draining", LIMIT, || async {
        let v = cp_rt.run(cp_status(addrs.status)).await;
        v["agents"][0]["draining"] == true
    })
    .await;
    let err = connect_via_http(&addrs.connect_uds, &target)
        .await
        .unwrap_err();
    assert!(err.contains("draining"), "{err}");
    // The open stream finishes, byte-exact.
    let mut rest = Vec::new();
    within("the open stream during drain", open.read_to_end(&mut rest))
        .await
        .unwrap();
    let mut all = first;
    all.extend(rest);
    assert_eq!((all.len() as u64, check_pattern(0, &all)), (BIG, None));
    assert!(
        chatter
            .finished
            .lock()
            .unwrap()
            .contains(&"open".to_string())
    );
    // The state file shows the drain; the second signal stops the agent.
    let state = berth_agent::node::read_state(&dir.path().join("node.json")).unwrap();
    assert!(state.draining_tunnel);
    agent.stop().await;
    wait_agents(&cp_rt, addrs.status, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_agents_are_accepted_and_foreign_certificates_refused() {
    require_root();
    let topo = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "good", IpAddr::V4(CP_IP));
    let foreign = Pki::new(dir.path(), "foreign", IpAddr::V4(CP_IP));
    let p = |x: &std::path::Path| x.to_str().unwrap().to_string();
    let (cert, key, ca) = (p(&pki.server_cert), p(&pki.server_key), p(&pki.ca));
    let (_cp, addrs) = spawn_controlplane(
        &topo.cp,
        CP_IP,
        "cp-1",
        1,
        dir.path(),
        &["--tls-cert", &cert, "--tls-key", &key, "--client-ca", &ca],
    );
    let cp_rt = NsRuntime::new(Some(&topo.cp.path()));
    let node_rt = NsRuntime::new(Some(&topo.node.path()));
    let chatter = node_rt
        .run(start_chatter(SocketAddr::new(
            IpAddr::V4(NODE_IP),
            CHATTER_PORT,
        )))
        .await;
    let token = token_file(dir.path(), TOKEN);
    let allow = vec![format!("{NODE_IP}:{CHATTER_PORT}")];

    // A certificate from another CA, and TLS with the right token but no client certificate:
    // both refused during the handshake.
    let d1 = tempfile::tempdir().unwrap();
    let mut a1 = agent_args(
        vec![addrs.agent.to_string()],
        &token,
        d1.path(),
        allow.clone(),
    );
    a1.tunnel_token_file = None;
    a1.tunnel_ca_file = Some(pki.ca.clone());
    a1.tunnel_cert_file = Some(foreign.client_cert.clone());
    a1.tunnel_key_file = Some(foreign.client_key.clone());
    let intruder = AgentGuard::start(&node_rt.handle, a1, "intruder");
    let d2 = tempfile::tempdir().unwrap();
    let mut a2 = agent_args(
        vec![addrs.agent.to_string()],
        &token,
        d2.path(),
        allow.clone(),
    );
    a2.tunnel_ca_file = Some(pki.ca.clone());
    let token_only = AgentGuard::start(&node_rt.handle, a2, "token-only");
    // The good agent: client certificate, no token.
    let mut a3 = agent_args(vec![addrs.agent.to_string()], &token, dir.path(), allow);
    a3.tunnel_token_file = None;
    a3.tunnel_ca_file = Some(pki.ca.clone());
    a3.tunnel_cert_file = Some(pki.client_cert.clone());
    a3.tunnel_key_file = Some(pki.client_key.clone());
    let agent = AgentGuard::start(&node_rt.handle, a3, "node-m");
    wait_until_async("mTLS agent connected", LIMIT, || async {
        agent.handle.connected_servers() == vec!["cp-1".to_string()]
    })
    .await;
    wait_until_async("node registered over mTLS", LIMIT, || async {
        let v = cp_rt.run(cp_status(addrs.status)).await;
        v["registry"]["nodes"][0]["state"] == "Ready"
    })
    .await;
    let mut s = connect_via_http(&addrs.connect_uds, &format!("{NODE_IP}:{CHATTER_PORT}"))
        .await
        .unwrap();
    s.write_all(b"m 4096\n").await.unwrap();
    let mut got = Vec::new();
    within("mTLS stream", s.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!((got.len(), check_pattern(0, &got)), (4096, None));
    assert!(chatter.finished.lock().unwrap().contains(&"m".to_string()));
    // The others keep trying and keep being refused.
    wait_until_async("refused agents retried", LIMIT, || async {
        intruder
            .handle
            .stats
            .connect_failures
            .load(Ordering::Relaxed)
            >= 3
            && token_only
                .handle
                .stats
                .connect_failures
                .load(Ordering::Relaxed)
                >= 3
    })
    .await;
    assert!(intruder.handle.connected_servers().is_empty());
    assert!(token_only.handle.connected_servers().is_empty());
    let v = cp_rt.run(cp_status(addrs.status)).await;
    let ids: Vec<&str> = v["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["node-m"]);
    intruder.stop().await;
    token_only.stop().await;
    agent.stop().await;
}

/// Removes a bpffs pin directory on drop.
struct PinDir(std::path::PathBuf);
impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_agent_binary_first_sigterm_drains_second_exits() {
    require_root();
    let topo = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let (_cp, addrs) = spawn_controlplane(&topo.cp, CP_IP, "cp-1", 1, dir.path(), &[]);
    let cp_rt = NsRuntime::new(Some(&topo.cp.path()));
    let node_rt = NsRuntime::new(Some(&topo.node.path()));
    let chatter = node_rt
        .run(start_chatter(SocketAddr::new(
            IpAddr::V4(NODE_IP),
            CHATTER_PORT,
        )))
        .await;
    let token = token_file(dir.path(), TOKEN);
    let pins = PinDir(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        berth_tests::netns::unique_name("btun")
    )));
    let bin = berth_tests::netns::workspace_bin("berth-agent");
    let d = dir.path();
    let s = |p: &str| d.join(p).to_str().unwrap().to_string();
    let log = std::fs::File::create(d.join("agent.log")).unwrap();
    let child = topo
        .node
        .command(bin.to_str().unwrap())
        .args([
            "--config",
            "/dev/null",
            "--pod-cidr",
            "10.2.7.0/24",
            "--node-name",
            "node-bin",
        ])
        .args(["--socket", &s("agent.sock"), "--state-dir", &s("state")])
        .args([
            "--cni-state-dir",
            &s("cni"),
            "--pin-root",
            pins.0.to_str().unwrap(),
        ])
        .args(["--no-fsync", "--tunnel-server", &addrs.agent.to_string()])
        .args(["--tunnel-token-file", token.to_str().unwrap()])
        .args([
            "--node-ip",
            &NODE_IP.to_string(),
            "--node-state-file",
            &s("node.json"),
        ])
        .args(["--tunnel-allow", &format!("{NODE_IP}:{CHATTER_PORT}")])
        .args([
            "--node-kubelet-healthz",
            "none",
            "--node-runtime-socket",
            "none",
        ])
        .args(["--node-datapath-pin", "none", "--node-disk-path", &s("")])
        // The machine's own disk: its free space is not the test's to control.
        .args(["--node-disk-min-free-percent", "0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn berth-agent");
    let mut agent = berth_tests::tunnel::Proc {
        child: Some(child),
        log: d.join("agent.log"),
    };
    let pid = nix::unistd::Pid::from_raw(agent.child.as_ref().unwrap().id() as i32);
    wait_until_async("berth-agent connected and registered", LIMIT, || async {
        let v = cp_rt.run(cp_status(addrs.status)).await;
        v["registry"]["nodes"][0]["state"] == "Ready"
    })
    .await;
    // The two CLIs: berthctl node on the node side, berth-controlplane status on the provider side.
    let ctl = berth_tests::netns::workspace_bin("berthctl");
    let out = std::process::Command::new(&ctl)
        .args(["node", "--state-file", &s("node.json")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("node-bin") && text.contains("Ready (control plane cp-1)"),
        "{text}"
    );
    assert!(
        text.contains("reserved   cpu 170m, memory 1.59 GB"),
        "{text}"
    );
    let cp_bin = berth_tests::netns::workspace_bin("berth-controlplane");
    let status = topo.cp.exec_ok(&[
        cp_bin.to_str().unwrap(),
        "status",
        "--status-addr",
        &addrs.status.to_string(),
    ]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("node-bin") && l.contains("Ready")),
        "{status}"
    );
    let target = format!("{NODE_IP}:{CHATTER_PORT}");
    const BIG: u64 = 8 * 1024 * 1024;
    let mut open = connect_via_http(&addrs.connect_uds, &target).await.unwrap();
    open.write_all(format!("bin {BIG}\n").as_bytes())
        .await
        .unwrap();
    let mut first = vec![0u8; 1024];
    open.read_exact(&mut first).await.unwrap();

    // First SIGTERM: DRAIN, new dials refused, the process keeps running.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_until_async("server sees the agent draining", LIMIT, || async {
        let v = cp_rt.run(cp_status(addrs.status)).await;
        v["agents"][0]["draining"] == true
    })
    .await;
    let err = connect_via_http(&addrs.connect_uds, &target)
        .await
        .unwrap_err();
    assert!(err.contains("draining"), "{err}");
    let mut rest = Vec::new();
    within("open stream during drain", open.read_to_end(&mut rest))
        .await
        .unwrap();
    let mut all = first;
    all.extend(rest);
    assert_eq!((all.len() as u64, check_pattern(0, &all)), (BIG, None));
    assert!(
        chatter
            .finished
            .lock()
            .unwrap()
            .contains(&"bin".to_string())
    );
    assert!(
        agent.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "still running after the first SIGTERM:\n{}",
        agent.log_tail()
    );
    let state = berth_agent::node::read_state(&d.join("node.json")).unwrap();
    assert!(state.draining_tunnel);

    // Second SIGTERM: exit.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut status = None;
    for _ in 0..600 {
        if let Some(st) = agent.child.as_mut().unwrap().try_wait().unwrap() {
            status = Some(st);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status =
        status.unwrap_or_else(|| panic!("berth-agent did not exit:\n{}", agent.log_tail()));
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        agent.log_tail()
    );
    wait_agents(&cp_rt, addrs.status, 0).await;
    let log = std::fs::read_to_string(d.join("agent.log")).unwrap();
    assert!(!log.contains(TOKEN), "the token never reaches the log");
    agent.kill();
}

/// Encodes raw bytes as a gRPC message (to send frames no real peer would), decodes `Packet`s.
#[derive(Default)]
struct RawCodec;
struct RawEncoder;
struct PacketDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for PacketDecoder {
    type Item = Packet;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Packet>, tonic::Status> {
        use prost::Message;
        Packet::decode(buf)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Packet;
    type Encoder = RawEncoder;
    type Decoder = PacketDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> PacketDecoder {
        PacketDecoder
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_frame_does_not_end_the_agent_stream() {
    use prost::Message;
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let (mut args, tokens) = berth_controlplane::serve::ServeArgs::local(TOKEN);
    let uds = dir.path().join("connect.sock");
    args.connect_uds = Some(uds.clone());
    let (cp, _prov) = berth_controlplane::serve::start(&args, tokens)
        .await
        .unwrap();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.agent_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("agentid", "raw-agent".parse().unwrap());
    req.metadata_mut().insert(
        "agentidentifiers",
        "host=raw-node&default-route=true".parse().unwrap(),
    );
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let mut inbound = grpc
        .streaming(
            req,
            tonic::codegen::http::uri::PathAndQuery::from_static("/AgentService/Connect"),
            RawCodec,
        )
        .await
        .expect("Connect accepted")
        .into_inner();
    // Garbage that is not a protobuf message at all, then a packet whose type has no payload.
    tx.send(vec![0xff, 0xff, 0xff, 0xff, 0x0f]).await.unwrap();
    tx.send(vec![0x08, 0x04]).await.unwrap();
    // The agent connection is still up: a dial through the frontend reaches this agent.
    let uds2 = uds.clone();
    let dial = tokio::spawn(async move { connect_via_http(&uds2, "10.1.2.3:10250").await });
    let p = within("DIAL_REQ after the garbage", inbound.message())
        .await
        .unwrap()
        .unwrap();
    let Some(Payload::DialRequest(d)) = p.payload else {
        panic!("expected DIAL_REQ, got {p:?}")
    };
    assert_eq!(d.address, "10.1.2.3:10250");
    let rsp = Packet {
        r#type: PacketType::DialRsp as i32,
        payload: Some(Payload::DialResponse(DialResponse {
            error: "scripted refusal".into(),
            connect_id: 0,
            random: d.random,
        })),
    };
    tx.send(rsp.encode_to_vec()).await.unwrap();
    let err = within("frontend answer", dial).await.unwrap().unwrap_err();
    assert!(err.contains("scripted refusal"), "{err}");
    assert_eq!(cp.tunnel.agents().len(), 1);
    drop(tx);
    cp.stop().await;
}

/// Answers every connection with its own name, then closes.
async fn name_server(addr: SocketAddr, name: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let local = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(name.as_bytes()).await;
            let _ = s.shutdown().await;
        }
    });
    local
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dials_are_routed_to_the_agent_serving_the_destination() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let (mut args, tokens) = berth_controlplane::serve::ServeArgs::local(TOKEN);
    let uds = dir.path().join("connect.sock");
    args.connect_uds = Some(uds.clone());
    let (cp, _prov) = berth_controlplane::serve::start(&args, tokens)
        .await
        .unwrap();
    // Node A: node IP 127.0.0.2; node B: node IP 127.0.0.3 and pod CIDR 127.9.0.0/16 (loopback
    // addresses stand in for the node network).
    let a_addr = name_server("127.0.0.2:0".parse().unwrap(), "node-a").await;
    let port = a_addr.port();
    let b_addr = name_server(
        SocketAddr::new("127.0.0.3".parse().unwrap(), port),
        "node-b",
    )
    .await;
    let pod = name_server(
        SocketAddr::new("127.9.0.5".parse().unwrap(), port),
        "pod-on-b",
    )
    .await;
    let token = token_file(dir.path(), TOKEN);
    let handle = tokio::runtime::Handle::current();
    let start = |name: &str, ip: &str, cidr: &str, allow: Vec<String>| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let mut a = agent_args(vec![cp.agent_addr.to_string()], &token, &d, allow);
        a.tunnel_default_route = false;
        a.node_ip = Some(ip.parse().unwrap());
        AgentGuard::start_with_cidr(&handle, a, name, cidr)
    };
    let agent_a = start(
        "node-a",
        "127.0.0.2",
        "10.2.1.0/24",
        vec![format!("127.0.0.2:{port}")],
    );
    let agent_b = start(
        "node-b",
        "127.0.0.3",
        "127.9.0.0/16",
        vec![format!("127.0.0.3:{port}"), format!("127.9.0.0/16:{port}")],
    );
    wait_until_async("both agents connected", LIMIT, || async {
        cp.tunnel.agents().len() == 2
    })
    .await;
    async fn fetch(uds: &std::path::Path, target: String) -> Result<String, String> {
        let mut s = connect_via_http(uds, &target).await?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .await
            .map_err(|e| e.to_string())?;
        Ok(out)
    }
    // By node IP, by host name, by pod CIDR.
    assert_eq!(
        fetch(&uds, format!("127.0.0.2:{port}")).await.unwrap(),
        "node-a"
    );
    assert_eq!(
        fetch(&uds, format!("127.0.0.3:{port}")).await.unwrap(),
        "node-b"
    );
    assert_eq!(
        fetch(&uds, format!("node-b:{port}")).await.unwrap(),
        "node-b"
    );
    assert_eq!(
        fetch(&uds, format!("node-a:{port}")).await.unwrap(),
        "node-a"
    );
    assert_eq!(
        fetch(&uds, format!("127.9.0.5:{port}")).await.unwrap(),
        "pod-on-b"
    );
    // Nobody serves 127.0.0.9: a clear error, no dial anywhere.
    let err = fetch(&uds, format!("127.0.0.9:{port}")).await.unwrap_err();
    assert!(
        err.contains("503") && err.contains("no agent available for destination 127.0.0.9"),
        "{err}"
    );
    // These servers speak first: DATA follows DIAL_RSP at once and must never be lost.
    within("100 server-first dials", async {
        for _ in 0..100 {
            assert_eq!(
                fetch(&uds, format!("127.0.0.3:{port}")).await.unwrap(),
                "node-b"
            );
        }
    })
    .await;
    assert_eq!(agent_a.handle.stats.dials_ok.load(Ordering::Relaxed), 2);
    assert_eq!(agent_b.handle.stats.dials_ok.load(Ordering::Relaxed), 103);
    let _ = (b_addr, pod);
    agent_a.stop().await;
    agent_b.stop().await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_the_frontend_gives_up_on_is_cancelled_with_dial_cls() {
    require_root();
    let topo = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    // The server waits 1 s for DIAL_RSP; the agent's own dial timeout is far longer.
    let (_cp, addrs) = spawn_controlplane(
        &topo.cp,
        CP_IP,
        "cp-1",
        1,
        dir.path(),
        &["--dial-timeout-ms", "1000"],
    );
    let cp_rt = NsRuntime::new(Some(&topo.cp.path()));
    let node_rt = NsRuntime::new(Some(&topo.node.path()));
    // SYNs to :10260 on the node vanish, so the agent's connect hangs.
    topo.node.exec_ok(&[
        "iptables", "-A", "OUTPUT", "-p", "tcp", "--dport", "10260", "-j", "DROP",
    ]);
    let token = token_file(dir.path(), TOKEN);
    let mut args = agent_args(
        vec![addrs.agent.to_string()],
        &token,
        dir.path(),
        vec![format!("{NODE_IP}:10260")],
    );
    args.tunnel_dial_timeout_ms = 120_000;
    let agent = AgentGuard::start(&node_rt.handle, args, "node-c");
    wait_agents(&cp_rt, addrs.status, 1).await;
    let err = within(
        "dial",
        connect_via_http(&addrs.connect_uds, &format!("{NODE_IP}:10260")),
    )
    .await
    .unwrap_err();
    assert!(err.contains("502") && err.contains("timed out"), "{err}");
    wait_until_async("the agent dropped the pending dial", LIMIT, || async {
        agent.handle.stats.dials_cancelled.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(agent.handle.stats.dials_ok.load(Ordering::Relaxed), 0);
    assert_eq!(agent.handle.stats.dials_failed.load(Ordering::Relaxed), 0);
    agent.stop().await;
}
