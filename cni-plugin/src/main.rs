//! `berth` — the CNI plugin binary (installed as /opt/cni/bin/berth).
use berth_cni::{
    config::{CURRENT_VERSION, Command, Env},
    plugin,
};
use std::io::{Read, Write};

const HELP: &str = "berth — Berth's CNI 1.1 plugin

Run by the container runtime, not by hand. The verb comes from CNI_COMMAND
(ADD, DEL, CHECK, VERSION, STATUS, GC), the network configuration from stdin,
the result or a CNI error JSON goes to stdout.

Configuration keys (besides cniVersion, name, type):
  agentSocket  berth-agent's socket (default /run/berth/agent.sock; env BERTH_AGENT_SOCKET)
  stateDir     plugin state, incl. the delete queue (default /run/berth/cni; env BERTH_CNI_STATE_DIR)
  logFile      append log lines here as well as to stderr

Error codes: the CNI spec's 1-7, 11 (agent unreachable), 50 (STATUS: not available),
and Berth's own: 100 agent error, 101 interface exists, 102 addresses exhausted, 103 check failed.";

fn main() {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    if command.is_empty() {
        let arg = std::env::args().nth(1).unwrap_or_default();
        if arg == "--help" || arg == "-h" || arg == "--version" {
            println!(
                "{HELP}\n\nberth {} (CNI {CURRENT_VERSION})",
                env!("CARGO_PKG_VERSION")
            );
            return;
        }
    }
    let code = run(&command);
    std::process::exit(code);
}

fn run(command: &str) -> i32 {
    let mut version = CURRENT_VERSION.to_string();
    let mut log_file = None;
    let result = (|| {
        let cmd = Command::parse(command)?;
        if cmd == Command::Version {
            return Ok(Some(plugin::version_json()));
        }
        let env = Env::from_vars(cmd, |k| std::env::var(k).ok())?;
        let mut input = Vec::new();
        std::io::stdin()
            .read_to_end(&mut input)
            .map_err(|e| berth_cni::Error::io("read stdin", e))?;
        // What the error JSON and the log need, even when the config itself is invalid.
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&input) {
            if let Some(s) = v.get("cniVersion").and_then(|s| s.as_str()) {
                version = s.to_string();
            }
            log_file = v.get("logFile").and_then(|s| s.as_str()).map(String::from);
        }
        let started = std::time::Instant::now();
        let out = plugin::run(cmd, &env, &input);
        log(
            log_file.as_deref(),
            &format!(
                "{command} container={} ifname={} -> {} in {:?}",
                env.container_id,
                env.ifname,
                match &out {
                    Ok(_) => "ok".to_string(),
                    Err(e) => format!("error {}: {e}", e.code()),
                },
                started.elapsed()
            ),
        );
        out
    })();
    let stdout = std::io::stdout();
    let mut stdout = stdout.lock();
    match result {
        Ok(Some(v)) => {
            let _ = writeln!(stdout, "{v}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            eprintln!("berth: {e}");
            let _ = writeln!(stdout, "{}", e.to_json(&version));
            e.code() as i32
        }
    }
}

/// Appends a line to the configured `logFile`, if any (never stdout).
fn log(path: Option<&str>, line: &str) {
    let Some(path) = path else {
        return;
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let _ = writeln!(f, "{now:.3} {line}");
    }
}
