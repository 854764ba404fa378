//! Control-plane replicas as real processes (`berth-controlplane serve` on loopback ports the
//! test picks) sharing one etcd, and the cloud the tests play: every replica's
//! `--provision-hook` appends the request to a spool file the test reads. Processes are killed
//! on drop, also when a test fails.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    etcd::free_port,
    netns::workspace_bin,
    tunnel::{Proc, TOKEN, token_file},
};

/// The tests' timers (each can be overridden through `extra`).
const TEST_TIMERS: [(&str, &str); 5] = [
    ("--lease-ttl-secs", "2"),
    ("--heartbeat-interval-ms", "200"),
    ("--heartbeat-grace-ms", "2000"),
    ("--tick-ms", "100"),
    ("--pod-start-ms", "200"),
];

/// One replica.
pub struct Replica {
    pub id: String,
    pub agent: SocketAddr,
    pub status: SocketAddr,
    pub connect_uds: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Replica {
    pub fn running(&self) -> bool {
        self.proc.is_some()
    }

    pub fn pid(&self) -> Option<i32> {
        self.proc
            .as_ref()
            .and_then(|p| p.child.as_ref())
            .map(|c| c.id() as i32)
    }
}

/// The replicas of one cluster's control plane.
pub struct Replicas {
    pub list: Vec<Replica>,
    pub spool: PathBuf,
}

impl Replicas {
    /// Starts `n` replicas (`cp-0` …) on `etcd_endpoints` under `prefix`, each telling agents
    /// `--server-count server_count`; `extra` flags go to every replica (a flag of the shortened
    /// test timers given there replaces the test's value).
    pub fn start(
        dir: &Path,
        n: usize,
        server_count: u32,
        etcd_endpoints: &str,
        prefix: &str,
        extra: &[&str],
    ) -> Self {
        std::fs::create_dir_all(dir).expect("replica directory");
        let tokens = token_file(dir, TOKEN);
        let spool = dir.join("provision.spool");
        std::fs::write(&spool, "").expect("spool");
        let hook = format!(
            "printf '%s %s %s %s %s %s\\n' \"$BERTH_REQUEST_ID\" \"$BERTH_ACTION\" \
             \"$BERTH_INSTANCE_ID\" \"$BERTH_NODE_NAME\" \"${{BERTH_POOL:--}}\" \
             \"${{BERTH_VERSION:--}}\" >> {}",
            spool.display()
        );
        let mut list = Vec::new();
        for i in 0..n {
            let id = format!("cp-{i}");
            let agent: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let status: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let connect_uds = dir.join(format!("{id}-connect.sock"));
            let mut args: Vec<String> = [
                "serve",
                "--agent-listen",
                &agent.to_string(),
                "--status-listen",
                &status.to_string(),
                "--connect-uds",
                connect_uds.to_str().expect("utf8"),
                "--server-id",
                &id,
                "--server-count",
                &server_count.to_string(),
                "--token-file",
                tokens.to_str().expect("utf8"),
                "--etcd-endpoints",
                etcd_endpoints,
                "--etcd-prefix",
                prefix,
                "--provision-hook",
                &hook,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            // Shortened timers, unless `extra` sets them.
            for (flag, value) in TEST_TIMERS {
                if !extra.contains(&flag) {
                    args.extend([flag.to_string(), value.to_string()]);
                }
            }
            args.extend(extra.iter().map(|s| s.to_string()));
            list.push(Replica {
                log: dir.join(format!("{id}.log")),
                id,
                agent,
                status,
                connect_uds,
                args,
                proc: None,
            });
        }
        let mut r = Replicas { list, spool };
        for i in 0..n {
            r.spawn(i);
        }
        r
    }

    fn spawn(&mut self, i: usize) {
        let rep = &mut self.list[i];
        let _ = std::fs::remove_file(&rep.connect_uds);
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&rep.log)
            .expect("replica log");
        let child = Command::new(workspace_bin("berth-controlplane"))
            .args(&rep.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn berth-controlplane");
        let mut proc = Proc {
            child: Some(child),
            log: rep.log.clone(),
        };
        let end = Instant::now() + Duration::from_secs(30);
        while !rep.connect_uds.exists() || std::net::TcpStream::connect(rep.status).is_err() {
            if let Some(Ok(Some(st))) = proc.child.as_mut().map(|c| c.try_wait()) {
                panic!("{} exited: {st}\n{}", rep.id, proc.log_tail());
            }
            assert!(
                Instant::now() < end,
                "{} did not start:\n{}",
                rep.id,
                proc.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        rep.proc = Some(proc);
    }

    /// Kills replica `i` (SIGKILL: a crash; its lease is left to expire).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.list[i].proc.take() {
            p.kill();
        }
    }

    /// Starts a killed replica again with the same flags and ports (it answers at once;
    /// [`Replicas::wait_loaded`] waits for its copy of the registry).
    pub fn restart(&mut self, i: usize) {
        assert!(!self.list[i].running(), "replica {i} is running");
        self.spawn(i);
    }

    /// Waits until replica `i` has loaded its copy of the registry from etcd.
    pub async fn wait_loaded(&self, i: usize) {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = self.status(i).await
                && v["registry"]["store"]["copy"]["following"] == true
                && v["registry"]["store"]["registry_id"].is_string()
            {
                return;
            }
            assert!(
                Instant::now() < end,
                "{} never loaded the registry:\n{}",
                self.list[i].id,
                self.log_tail(i)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `sig` to replica `i` (SIGSTOP/SIGCONT: a replica that stalls and wakes up).
    pub fn signal(&self, i: usize, sig: nix::sys::signal::Signal) {
        let pid = self.list[i].pid().expect("running replica");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal");
    }

    /// Agent addresses of every replica (the agents' load-balanced list).
    pub fn agent_addrs(&self) -> Vec<String> {
        self.list.iter().map(|r| r.agent.to_string()).collect()
    }

    /// `GET /v1/status` of replica `i`; `None` when it does not answer within 2 s.
    pub async fn status(&self, i: usize) -> Option<serde_json::Value> {
        if !self.list[i].running() {
            return None;
        }
        let req = berth_controlplane::status::http_request(
            self.list[i].status,
            "GET",
            "/v1/status",
            None,
        );
        match tokio::time::timeout(Duration::from_secs(2), req).await {
            Ok(Ok((200, body))) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// The replica that says it leads (and is not paused), if any.
    pub async fn leader(&self) -> Option<usize> {
        for i in 0..self.list.len() {
            if let Some(v) = self.status(i).await
                && v["registry"]["controller"]["role"] == "leader"
            {
                return Some(i);
            }
        }
        None
    }

    /// `POST` an admin request to replica `i`: (status code, body).
    pub async fn admin(&self, i: usize, path: &str, body: serde_json::Value) -> (u16, String) {
        berth_controlplane::status::http_request(
            self.list[i].status,
            "POST",
            path,
            Some(body.to_string()),
        )
        .await
        .expect("admin request")
    }

    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.list[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.list[i].log).unwrap_or_default()
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for r in &mut self.list {
            if let Some(pid) = r.pid() {
                // A stopped process must run again to die cleanly.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGCONT,
                );
            }
            r.proc.take();
        }
    }
}

/// A provisioning request as the hook wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvisionLine {
    pub id: String,
    pub action: String,
    pub instance: String,
    pub name: String,
    pub pool: String,
    pub version: String,
}

/// Reads the spool the replicas' hooks append to.
pub struct Spool {
    path: PathBuf,
    offset: usize,
}

impl Spool {
    pub fn new(path: &Path) -> Self {
        Spool {
            path: path.to_path_buf(),
            offset: 0,
        }
    }

    /// Whole lines written since the last call.
    pub fn take_new(&mut self) -> Vec<ProvisionLine> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let Some(end) = text.rfind('\n').map(|e| e + 1) else {
            return Vec::new();
        };
        if end <= self.offset {
            return Vec::new();
        }
        let fresh = &text[self.offset..end];
        self.offset = end;
        fresh
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 6).then(|| ProvisionLine {
                    id: f[0].into(),
                    action: f[1].into(),
                    instance: f[2].into(),
                    name: f[3].into(),
                    pool: f[4].into(),
                    version: f[5].into(),
                })
            })
            .collect()
    }
}
