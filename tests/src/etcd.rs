//! Real etcd (Debian's `etcd-server`, checked with its `etcdctl`) for the registry tests: a
//! cluster of N members on loopback ports the test picks, its data on a tmpfs the test owns.
//! Members are killed and the data removed on drop, also when a test fails.
use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    netns::unique_name,
    tunnel::{Pki, Proc, TestDisk},
};

/// A free loopback port (bound and released: the test owns it from here on).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free loopback port")
        .port()
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    proc: Option<Proc>,
}

/// TLS of the client URLs: the members' certificate and the CA that signs client certificates.
struct Tls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// An etcd cluster owned by a test.
pub struct Etcd {
    members: Vec<Member>,
    token: String,
    tls: Option<Tls>,
    // Dropped after the members (fields drop in order): the processes die before the unmount.
    disk: TestDisk,
}

impl Etcd {
    /// Starts `n` members and waits until the cluster answers.
    pub fn start(n: usize) -> Self {
        Self::start_with(n, None)
    }

    /// Starts `n` members whose client URLs require TLS with client certificates from `pki`
    /// (its server certificate must name 127.0.0.1).
    pub fn start_tls(n: usize, pki: &Pki) -> Self {
        Self::start_with(
            n,
            Some(Tls {
                ca: pki.ca.clone(),
                cert: pki.server_cert.clone(),
                key: pki.server_key.clone(),
                client_cert: pki.client_cert.clone(),
                client_key: pki.client_key.clone(),
            }),
        )
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// etcdctl with the cluster's TLS flags.
    fn etcdctl(&self) -> Command {
        let mut c = Command::new("etcdctl");
        c.env("ETCDCTL_API", "3");
        if let Some(t) = &self.tls {
            c.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        c
    }

    fn start_with(n: usize, tls: Option<Tls>) -> Self {
        crate::netns::require_root();
        for (bin, arg) in [("etcd", "--version"), ("etcdctl", "version")] {
            assert!(
                Command::new(bin)
                    .arg(arg)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()),
                "{bin} is missing: scripts/bootstrap.sh installs etcd-server and etcd-client"
            );
        }
        let token = unique_name("etcd");
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                proc: None,
            })
            .collect();
        let mut e = Etcd {
            members,
            token,
            tls,
            disk: TestDisk::mount(512),
        };
        for i in 0..n {
            e.spawn(i);
        }
        e.wait_healthy(&(0..n).collect::<Vec<_>>());
        e
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.disk.path().join(&self.members[i].name)
    }

    fn spawn(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect();
        let m = &self.members[i];
        let log = self.disk.path().join(format!("{}.log", m.name));
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("etcd log");
        let client = format!("{}://127.0.0.1:{}", self.scheme(), m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let mut cmd = Command::new("etcd");
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-token", &self.token])
            // Ignored when the data directory exists (a restart).
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn etcd");
        self.members[i].proc = Some(Proc {
            child: Some(child),
            log,
        });
    }

    /// Client URLs of every member (stopped ones too: clients skip them).
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client))
            .collect()
    }

    /// `--etcd-endpoints` value.
    pub fn endpoints_arg(&self) -> String {
        self.endpoints().join(",")
    }

    /// Kills member `i` (SIGKILL: a crash); its data stays for a restart.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill();
        }
    }

    /// Restarts a stopped member from its data directory.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].proc.is_none(), "member {i} is running");
        self.spawn(i);
    }

    /// Waits until each of `members` reports healthy (it has a leader and answers reads).
    pub fn wait_healthy(&self, members: &[usize]) {
        let end = Instant::now() + Duration::from_secs(60);
        for &i in members {
            let ep = self.endpoints()[i].clone();
            loop {
                let ok = self
                    .etcdctl()
                    .args(["--endpoints", &ep, "--command-timeout", "2s"])
                    .args(["endpoint", "health"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    break;
                }
                assert!(
                    Instant::now() < end,
                    "etcd member {i} not healthy:\n{}",
                    self.log_tail(i)
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The cluster's current revision (every write transaction adds one).
    pub fn revision(&self) -> i64 {
        let i = self
            .members
            .iter()
            .position(|m| m.proc.is_some())
            .expect("a running member");
        let ep = self.endpoints()[i].clone();
        let out = self
            .etcdctl()
            .args(["--endpoints", &ep, "endpoint", "status", "-w", "json"])
            .output()
            .expect("etcdctl endpoint status");
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("etcdctl status JSON");
        v[0]["Status"]["header"]["revision"]
            .as_i64()
            .expect("revision")
    }

    /// Every write under `prefix` in revisions `(from, to]`: (revision, `PUT`/`DELETE`, key),
    /// read from etcd's history (nothing is compacted in the tests' clusters).
    pub fn history(&self, prefix: &str, from: i64, to: i64) -> Vec<(i64, String, String)> {
        // `etcdctl watch` replays the history and then follows: stop it after the replay.
        let out = Command::new("timeout")
            .arg("2")
            .arg("etcdctl")
            .args(self.etcdctl().get_args())
            .args([
                "--endpoints",
                &self.endpoints_arg(),
                "watch",
                "--prefix",
                prefix,
            ])
            .args(["--rev", &(from + 1).to_string(), "-w", "json"])
            .env("ETCDCTL_API", "3")
            .output()
            .expect("etcdctl watch");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut writes = Vec::new();
        for resp in serde_json::Deserializer::from_str(&text).into_iter::<serde_json::Value>() {
            let Ok(resp) = resp else { break };
            for e in resp["Events"].as_array().into_iter().flatten() {
                let rev = e["kv"]["mod_revision"].as_i64().unwrap_or(0);
                if rev <= from || rev > to {
                    continue;
                }
                let op = if e["type"].as_i64() == Some(1) {
                    "DELETE"
                } else {
                    "PUT"
                };
                let key = e["kv"]["key"]
                    .as_str()
                    .map(base64_decode)
                    .unwrap_or_default();
                writes.push((rev, op.to_string(), key));
            }
        }
        writes
    }

    /// All keys and values under `prefix`, as `etcdctl get --prefix` prints them.
    pub fn dump(&self, prefix: &str) -> String {
        let out = self
            .etcdctl()
            .args([
                "--endpoints",
                &self.endpoints_arg(),
                "get",
                "--prefix",
                prefix,
            ])
            .output()
            .expect("etcdctl get");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn log_tail(&self, i: usize) -> String {
        self.members[i]
            .proc
            .as_ref()
            .map(Proc::log_tail)
            .unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut p) = m.proc.take() {
                p.kill();
            }
        }
    }
}

/// Standard base64 (what etcdctl's JSON output uses for keys).
fn base64_decode(s: &str) -> String {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let Some(v) = val(c) else { continue };
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_keys() {
        assert_eq!(super::base64_decode("L2JlcnRoL3Yx"), "/berth/v1");
        assert_eq!(super::base64_decode("YQ=="), "a");
    }
}
