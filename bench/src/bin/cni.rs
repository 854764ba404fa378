//! CNI benchmark: Berth (berth + berth-agent + eBPF datapath) against the reference `bridge` +
//! `host-local` plugins from Debian's containernetworking-plugins, interleaved in one run.
//!
//! Measures ADD and DEL latency (per call, fresh pod namespace each round), wall time of 32
//! concurrent ADDs, pod↔pod TCP throughput with iperf3, and the plugin's VERSION call.
//! Run as root: `scripts/bench.sh cni` (or target/release/cni [rounds]); `cni ROUNDS latency`
//! measures ADD/DEL latency only and writes no result file. BERTH_BENCH_TC_ATTACH=netlink|tcx
//! picks the agent's tc attachment (default: the agent's own default).
use anyhow::{Context, Result, bail};
use berth_bench::{median, percentile, write_result};
use berth_tests::{
    cni::{Node, Pod},
    netns::{NetNs, workspace_bin},
};
use serde_json::json;
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const REF_DIR: &str = "/usr/lib/cni";

/// One CNI implementation under test, living in its own node namespace.
trait Plugin: Sync {
    fn name(&self) -> &'static str;
    fn node(&self) -> &NetNs;
    fn binary(&self) -> PathBuf;
    fn conf(&self) -> String;
    fn cni_path(&self) -> String;

    /// Runs one verb; returns the elapsed wall time and the stdout.
    fn call(&self, verb: &str, cid: &str, netns: &Path) -> Result<(Duration, String)> {
        let mut cmd = self.node().command(self.binary().to_str().unwrap());
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", cid)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", self.cni_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn()?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(self.conf().as_bytes())?;
        let out = child.wait_with_output()?;
        let elapsed = start.elapsed();
        if !out.status.success() {
            bail!(
                "{} {verb} {cid}: {} {}",
                self.name(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((elapsed, String::from_utf8_lossy(&out.stdout).into_owned()))
    }
}

struct Berth(Node);
impl Plugin for Berth {
    fn name(&self) -> &'static str {
        "berth"
    }
    fn node(&self) -> &NetNs {
        &self.0.ns
    }
    fn binary(&self) -> PathBuf {
        workspace_bin("berth")
    }
    fn conf(&self) -> String {
        self.0.conf()
    }
    fn cni_path(&self) -> String {
        "/opt/cni/bin".into()
    }
}

struct Bridge {
    ns: NetNs,
    dir: tempfile::TempDir,
}
impl Plugin for Bridge {
    fn name(&self) -> &'static str {
        "bridge+host-local"
    }
    fn node(&self) -> &NetNs {
        &self.ns
    }
    fn binary(&self) -> PathBuf {
        PathBuf::from(REF_DIR).join("bridge")
    }
    fn conf(&self) -> String {
        json!({
            "cniVersion": "1.0.0", "name": "bench-bridge", "type": "bridge",
            "bridge": "cnibench0", "isGateway": true, "ipMasq": false,
            "ipam": {"type": "host-local", "subnet": "10.5.0.0/16",
                     "dataDir": self.dir.path().join("host-local")}
        })
        .to_string()
    }
    fn cni_path(&self) -> String {
        REF_DIR.into()
    }
}

fn ip_of(result: &str) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(result)?;
    let a = v["ips"][0]["address"]
        .as_str()
        .context("no address in result")?;
    Ok(a.split('/').next().unwrap().to_string())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// iperf3 from pod a to pod b (`secs` seconds); bits per second.
fn iperf(a: &Pod, b: &Pod, b_ip: &str, secs: u32) -> Result<f64> {
    let mut server =
        b.ns.command("iperf3")
            .args(["-s", "-1", "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let out =
        a.ns.command("iperf3")
            .args(["-c", b_ip, "-p", "5201", "-t", &secs.to_string(), "-J"])
            .output()?;
    let _ = server.wait();
    if !out.status.success() {
        bail!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON without sum_received")
}

fn main() -> Result<()> {
    berth_tests::netns::require_root();
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(60);
    if !Path::new(REF_DIR).join("bridge").exists() {
        bail!("{REF_DIR}/bridge missing: run scripts/bootstrap.sh (containernetworking-plugins)");
    }
    // The agent's tc attachment (`--tc-attach`): its default unless BERTH_BENCH_TC_ATTACH says.
    let tc_attach = std::env::var("BERTH_BENCH_TC_ATTACH").ok();
    let berth = Berth(match &tc_attach {
        Some(t) => Node::with_args("10.2.0.0/24", &["--tc-attach", t]),
        None => Node::new(),
    });
    let tc_attach = tc_attach.unwrap_or_else(|| "auto (default)".into());
    println!("berth-agent --tc-attach {tc_attach}");
    let bridge = Bridge {
        ns: NetNs::new("bb"),
        dir: tempfile::tempdir()?,
    };
    let plugins: [&dyn Plugin; 2] = [&berth, &bridge];

    // ADD/DEL latency, interleaved; the order alternates every round.
    let mut add = [Vec::new(), Vec::new()];
    let mut del = [Vec::new(), Vec::new()];
    for r in 0..rounds {
        let pods = [Pod::new(), Pod::new()];
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for &i in &order {
            let (t, _) = plugins[i].call("ADD", &format!("lat{r}"), &pods[i].ns.path())?;
            add[i].push(ms(t));
        }
        for &i in &order {
            let (t, _) = plugins[i].call("DEL", &format!("lat{r}"), &pods[i].ns.path())?;
            del[i].push(ms(t));
        }
    }

    if std::env::args().nth(2).as_deref() == Some("latency") {
        // `cni ROUNDS latency`: ADD/DEL latency only (quick comparisons while tuning; no file).
        println!("| verb | berth median | berth p90 | reference median | reference p90 | ratio |");
        println!("|---|---|---|---|---|---|");
        for (name, v) in [("ADD", &add), ("DEL", &del)] {
            println!(
                "| {name} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.3} |",
                median(&v[0]),
                percentile(&v[0], 90.0),
                median(&v[1]),
                percentile(&v[1], 90.0),
                median(&v[0]) / median(&v[1])
            );
        }
        return Ok(());
    }

    // 32 concurrent ADDs, wall time, 3 rounds each, interleaved.
    let mut conc = [Vec::new(), Vec::new()];
    for r in 0..3 {
        for (i, p) in plugins.iter().enumerate() {
            let pods: Vec<Pod> = (0..32).map(|_| Pod::new()).collect();
            let start = Instant::now();
            std::thread::scope(|s| -> Result<()> {
                let hs: Vec<_> = pods
                    .iter()
                    .enumerate()
                    .map(|(k, pod)| {
                        s.spawn(move || p.call("ADD", &format!("conc{r}-{k}"), &pod.ns.path()))
                    })
                    .collect();
                for h in hs {
                    h.join().expect("thread")?;
                }
                Ok(())
            })?;
            conc[i].push(ms(start.elapsed()));
            for (k, pod) in pods.iter().enumerate() {
                p.call("DEL", &format!("conc{r}-{k}"), &pod.ns.path())?;
            }
        }
    }

    // Pod↔pod TCP throughput.
    let mut tput = [Vec::new(), Vec::new()];
    let pairs: Vec<(Pod, Pod, String)> = plugins
        .iter()
        .enumerate()
        .map(|(i, p)| -> Result<_> {
            let a = Pod::new();
            let b = Pod::new();
            p.call("ADD", &format!("tp-a{i}"), &a.ns.path())?;
            let (_, out) = p.call("ADD", &format!("tp-b{i}"), &b.ns.path())?;
            Ok((a, b, ip_of(&out)?))
        })
        .collect::<Result<_>>()?;
    for _ in 0..3 {
        for (i, (a, b, ip)) in pairs.iter().enumerate() {
            tput[i].push(iperf(a, b, ip, 4)?);
        }
    }

    // VERSION: process start to answer.
    let mut version = Vec::new();
    for _ in 0..200 {
        let start = Instant::now();
        let out = Command::new(workspace_bin("berth"))
            .env("CNI_COMMAND", "VERSION")
            .output()?;
        version.push(ms(start.elapsed()));
        assert!(out.status.success());
    }

    let m = |v: &Vec<f64>| median(v);
    let add_ratio = m(&add[0]) / m(&add[1]);
    let del_ratio = m(&del[0]) / m(&del[1]);
    let conc_ratio = m(&conc[0]) / m(&conc[1]);
    let tput_ratio = m(&tput[0]) / m(&tput[1]);
    println!("CNI benchmark ({rounds} interleaved rounds; 32-way concurrency x3; iperf3 4 s x3)");
    println!(
        "| metric | berth median | berth p90 | bridge+host-local median | bridge p90 | ratio berth/ref |"
    );
    println!("|---|---|---|---|---|---|");
    let row = |name: &str, a: &Vec<f64>, b: &Vec<f64>, unit: &str, scale: f64| {
        println!(
            "| {name} | {:.2} {unit} | {:.2} {unit} | {:.2} {unit} | {:.2} {unit} | {:.2} |",
            m(a) * scale,
            percentile(a, 90.0) * scale,
            m(b) * scale,
            percentile(b, 90.0) * scale,
            m(a) / m(b)
        );
    };
    row("ADD latency", &add[0], &add[1], "ms", 1.0);
    row("DEL latency", &del[0], &del[1], "ms", 1.0);
    row("32 concurrent ADDs (wall)", &conc[0], &conc[1], "ms", 1.0);
    row("pod↔pod TCP throughput", &tput[0], &tput[1], "Gbit/s", 1e-9);
    println!(
        "| berth VERSION call | {:.2} ms | {:.2} ms | | | |",
        median(&version),
        percentile(&version, 90.0)
    );

    let path = write_result(
        "cni",
        &json!({
            "rounds": rounds,
            "tc_attach": tc_attach,
            "add_median_ratio": add_ratio,
            "del_median_ratio": del_ratio,
            "concurrent_add_ratio": conc_ratio,
            "throughput_ratio": tput_ratio,
            "version_median_ms": median(&version),
            "berth": {"add_ms_median": m(&add[0]), "add_ms_p90": percentile(&add[0], 90.0),
                      "del_ms_median": m(&del[0]), "del_ms_p90": percentile(&del[0], 90.0),
                      "concurrent_add_ms_median": m(&conc[0]), "throughput_bps_median": m(&tput[0])},
            "reference": {"name": "bridge+host-local (containernetworking-plugins)",
                      "add_ms_median": m(&add[1]), "add_ms_p90": percentile(&add[1], 90.0),
                      "del_ms_median": m(&del[1]), "del_ms_p90": percentile(&del[1], 90.0),
                      "concurrent_add_ms_median": m(&conc[1]), "throughput_bps_median": m(&tput[1])},
        }),
    )?;
    println!("wrote {}", path.display());
    drop(pairs);
    drop(bridge);
    drop(berth);
    Ok(())
}
