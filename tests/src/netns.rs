//! Network namespaces owned by a test.
use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique name for something a test creates: `<prefix><pid-hex><n>` (≤ 15 chars for links).
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{:x}{n}", std::process::id());
    assert!(name.len() <= 15, "name {name} too long for an interface");
    name
}

/// Fails the test loudly unless it runs as root: privileged tests never skip silently.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "Berth's privileged end-to-end tests must run as root (network namespaces, eBPF, loop \
         devices); run them through the README's test command"
    );
}

/// A named network namespace (`/run/netns/<name>`), deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates `/run/netns/<unique name>` and brings its loopback up.
    pub fn new(prefix: &str) -> Self {
        require_root();
        let name = unique_name(prefix);
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Path of the namespace's bind mount, as CNI_NETNS expects it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that runs inside this namespace. Only the network namespace changes (unlike `ip
    /// netns exec`, the mount namespace and so /sys/fs/bpf stay as they are).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let path = self.path();
        unsafe {
            cmd.pre_exec(move || {
                let f = std::fs::File::open(&path)?;
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        cmd
    }

    /// Runs `argv` inside the namespace and returns its output.
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.command(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"))
    }

    /// Runs `argv` inside the namespace and panics with its output unless it succeeds.
    pub fn exec_ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "{argv:?} in netns {} failed: {}\nstdout: {}\nstderr: {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs a command and panics with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Path of a binary built in this workspace, next to the running executable: tests live in
/// `target/<profile>/deps/`, benchmarks in `target/<profile>/`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let candidates = [dir.join(name), dir.parent().expect("target dir").join(name)];
    candidates.iter().find(|p| p.exists()).cloned().unwrap_or_else(|| {
        panic!(
            "{name} is missing next to {}: build the workspace binaries first (`cargo build --workspace --bins`)",
            exe.display()
        )
    })
}
