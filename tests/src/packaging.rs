//! Helpers for the packaging tests: the repository's build scripts run as a user would run them,
//! and a throw-away Debian bookworm machine (a debootstrapped root owned by the test, booted with
//! systemd in `systemd-nspawn`, private network, its own bpffs) to install packages into.
use crate::netns::run_ok;
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// The cargo profile the running test was built with (its binaries are next to it).
pub fn profile_dir() -> PathBuf {
    let bin = crate::netns::workspace_bin("berth-agent");
    bin.parent().unwrap().into()
}

/// `dev` or `release`, as the build scripts name the profile of the binaries next to the test.
pub fn profile() -> &'static str {
    if profile_dir().ends_with("release") {
        "release"
    } else {
        "dev"
    }
}

/// Runs a repository script (bash) with arguments; panics with its output unless it succeeds.
pub fn script(path: &str, args: &[&str]) -> String {
    run_ok(
        Command::new("bash")
            .arg(repo_root().join(path))
            .args(args)
            .current_dir(repo_root()),
    )
}

/// Builds the .debs into `out` with `packaging/debian/build-debs.sh` from the test's binaries.
pub fn build_debs(version: &str, out: &Path) -> Vec<PathBuf> {
    let listed = script(
        "packaging/debian/build-debs.sh",
        &[
            "--no-cargo",
            "--profile",
            profile(),
            "--version",
            version,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    listed.lines().map(PathBuf::from).collect()
}

/// The cached bookworm root tarball (made by `packaging/bookworm-root.sh` under target/).
pub fn bookworm_root_tar() -> PathBuf {
    let tar = repo_root().join("target/bookworm/root.tar");
    script("packaging/bookworm-root.sh", &[tar.to_str().unwrap()]);
    tar
}

/// A Debian machine booted with systemd in `systemd-nspawn`: its own root directory (extracted
/// from the bookworm tarball), network namespace, PID namespace and bpffs instance. Everything
/// goes on drop.
pub struct Machine {
    pub dir: tempfile::TempDir,
    nspawn: Child,
    /// Host PID of the machine's systemd (PID 1 inside).
    leader: i32,
}

impl Machine {
    pub fn boot(root_tar: &Path) -> Machine {
        crate::netns::require_root();
        let dir = tempfile::Builder::new()
            .prefix("berth-machine-")
            .tempdir_in(repo_root().join("target"))
            .unwrap();
        let root = dir.path().join("root");
        let bpffs = dir.path().join("bpffs");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&bpffs).unwrap();
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-xf")
                .arg(root_tar),
        );
        // A bpffs of its own: each mount of bpf is a new instance, so pins stay in the test.
        run_ok(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs));
        let log = std::fs::File::create(dir.path().join("nspawn.log")).unwrap();
        let nspawn = Command::new("systemd-nspawn")
            // No host systemd here: no machine registration, no scope; nspawn's seccomp filter
            // would refuse bpf(2), which the agent needs.
            .env("SYSTEMD_SECCOMP", "0")
            .args([
                "--quiet",
                "--register=no",
                "--keep-unit",
                "--boot",
                "--private-network",
            ])
            .args([
                "--console=pipe",
                "--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN",
            ])
            .arg(format!("--machine=berth{}", std::process::id()))
            .arg(format!("--bind={}:/sys/fs/bpf", bpffs.display()))
            .arg("-D")
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn systemd-nspawn (systemd-container, scripts/bootstrap.sh)");
        let mut m = Machine {
            dir,
            nspawn,
            leader: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let pid = m.nspawn.id() as i32;
        while m.leader == 0 {
            m.leader = descendants(pid)
                .into_iter()
                .find(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim() == "systemd")
                })
                .unwrap_or(0);
            assert!(
                Instant::now() < deadline,
                "the machine's systemd did not start:\n{}",
                m.log()
            );
            if let Ok(Some(st)) = m.nspawn.try_wait() {
                panic!("systemd-nspawn exited ({st}):\n{}", m.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // systemctl answers only once systemd's private socket exists: ask until it does.
        let deadline = Instant::now() + Duration::from_secs(120);
        let state = loop {
            let out = m.exec(&["systemctl", "is-system-running", "--wait"]);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !state.is_empty() && state != "starting" && state != "initializing" {
                break state;
            }
            assert!(
                Instant::now() < deadline,
                "the machine did not finish booting: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                m.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(
            state == "running",
            "the machine booted {state:?}; failed units:\n{}",
            String::from_utf8_lossy(&m.exec(&["systemctl", "--failed", "--no-pager"]).stdout)
        );
        m
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nspawn.log")).unwrap_or_default()
    }

    /// A command run inside the machine (all its namespaces, its root).
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.leader.to_string(), "-a", "--"])
            .arg("/usr/bin/env")
            .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
            .arg("DEBIAN_FRONTEND=noninteractive")
            .args(argv)
            .stdin(Stdio::null());
        c
    }

    pub fn exec(&self, argv: &[&str]) -> Output {
        self.command(argv)
            .output()
            .unwrap_or_else(|e| panic!("nsenter {argv:?}: {e}"))
    }

    /// Runs `argv` inside; panics with its output (and the agent's journal) unless it succeeds.
    pub fn exec_ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "{argv:?} in the machine failed: {}\nstdout: {}\nstderr: {}\njournal:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.journal()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A shell line run inside.
    pub fn sh(&self, line: &str) -> String {
        self.exec_ok(&["sh", "-ec", line])
    }

    /// The agent unit's journal (for failure messages).
    pub fn journal(&self) -> String {
        let out = self.exec(&[
            "journalctl",
            "--no-pager",
            "-n",
            "60",
            "-u",
            "berth-agent.service",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until `argv` succeeds inside (at most `within`).
    pub fn wait_ok(&self, argv: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let out = self.exec(argv);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            if Instant::now() > deadline {
                panic!(
                    "{argv:?} still fails after {within:?}: {}\njournal:\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    self.journal()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Every descendant of `pid`.
fn descendants(pid: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if let Some(pp) = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|s| s.parse::<i32>().ok())
        {
            parent_of.push((p, pp));
        }
    }
    let mut out = vec![];
    let mut frontier = vec![pid];
    while let Some(x) = frontier.pop() {
        for (p, pp) in &parent_of {
            if *pp == x {
                out.push(*p);
                frontier.push(*p);
            }
        }
    }
    out
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SIGTERM: nspawn shuts the machine down in order; then make sure nothing is left.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.nspawn.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for p in descendants(self.nspawn.id() as i32) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let prefix = self.dir.path().display().to_string();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
