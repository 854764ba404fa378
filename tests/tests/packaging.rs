//! The Debian packages as an administrator meets them: built by `packaging/debian/build-debs.sh`
//! from this workspace, checked by lintian (no error; every warning overridden with a reason),
//! then installed into a throw-away Debian bookworm machine booted with systemd (nspawn):
//! files where promised, every file under /etc a conffile, the agent enabled and running as the
//! unprivileged user `berth` with three capabilities, pods wired through the installed CNI
//! plugin; an admin's conffile edits survive an upgrade to a newer build, which restarts the
//! agent without losing its pods; `systemd-analyze verify` and `security` on the unit; remove
//! leaves nothing running and keeps state and conffiles, purge removes them.
use berth_tests::packaging::{Machine, bookworm_root_tar, build_debs};
use std::{path::PathBuf, process::Command, time::Duration};

fn lintian(debs: &[PathBuf]) {
    let out = Command::new("lintian")
        .args(["--pedantic", "--fail-on", "error,warning"])
        .args(debs)
        .output()
        .expect("run lintian (scripts/bootstrap.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .collect();
    assert!(
        out.status.success() && problems.is_empty(),
        "lintian: {}\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn deb(debs: &[PathBuf], name: &str) -> String {
    debs.iter()
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{name}_"))
        })
        .unwrap_or_else(|| panic!("no {name} package in {debs:?}"))
        .display()
        .to_string()
}

/// The CNI plugin as a runtime calls it, inside the machine: ADD into a new netns `pod`.
fn cni_add(m: &Machine, pod: &str) -> String {
    m.exec_ok(&["ip", "netns", "add", pod]);
    let conf = m.exec_ok(&["cat", "/etc/cni/net.d/05-berth.conflist"]);
    let list: serde_json::Value = serde_json::from_str(&conf).unwrap();
    let mut plugin = list["plugins"][0].clone();
    plugin["cniVersion"] = "1.1.0".into();
    plugin["name"] = list["name"].clone();
    let out = m
        .command(&[
            "env",
            "CNI_COMMAND=ADD",
            &format!("CNI_CONTAINERID=ctr-{pod}"),
            &format!("CNI_NETNS=/run/netns/{pod}"),
            "CNI_IFNAME=eth0",
            "CNI_PATH=/opt/cni/bin",
            "/opt/cni/bin/berth",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(plugin.to_string().as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "CNI ADD {pod}: {}\n{}\njournal:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        m.journal()
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ip = result["ips"][0]["address"].as_str().unwrap();
    ip.split('/').next().unwrap().to_string()
}

fn agent_pid(m: &Machine) -> String {
    m.exec_ok(&[
        "systemctl",
        "show",
        "-p",
        "MainPID",
        "--value",
        "berth-agent.service",
    ])
    .trim()
    .to_string()
}

#[test]
fn packages_pass_lintian_install_upgrade_keep_edits_remove_and_purge() {
    berth_tests::netns::require_root();
    let work = tempfile::tempdir().unwrap();
    let v1 = build_debs("0.1.0-1", &work.path().join("v1"));
    let v2 = build_debs("0.1.0-2", &work.path().join("v2"));
    for name in [
        "berth-agent",
        "berth-cni",
        "berth-csi",
        "berth-agent-dbgsym",
    ] {
        deb(&v1, name);
    }
    lintian(&v1);

    let m = Machine::boot(&bookworm_root_tar());
    let inside = m.root().join("root/debs");
    std::fs::create_dir_all(&inside).unwrap();
    let copy = |debs: &[PathBuf], tag: &str| -> Vec<String> {
        ["berth-agent", "berth-cni", "berth-csi"]
            .iter()
            .map(|n| {
                let src = PathBuf::from(deb(debs, n));
                let name = format!("{tag}-{}", src.file_name().unwrap().to_string_lossy());
                std::fs::copy(&src, inside.join(&name)).unwrap();
                format!("/root/debs/{name}")
            })
            .collect()
    };
    let (p1, p2) = (copy(&v1, "v1"), copy(&v2, "v2"));
    let dpkg = |args: &[&str], debs: &[String]| {
        let mut argv = vec!["dpkg"];
        argv.extend_from_slice(args);
        argv.extend(debs.iter().map(String::as_str));
        m.exec_ok(&argv)
    };

    // Install.
    dpkg(&["-i"], &p1);
    for f in [
        "/usr/bin/berth-agent",
        "/usr/bin/berthctl",
        "/usr/bin/berth-csi",
        "/usr/lib/cni/berth",
        "/etc/cni/net.d/05-berth.conflist",
        "/etc/berth/agent.toml",
        "/etc/default/berth-agent",
        "/lib/systemd/system/berth-agent.service",
        "/usr/lib/sysctl.d/60-berth.conf",
        "/usr/share/man/man8/berth-agent.8.gz",
        "/usr/share/man/man8/berthctl.8.gz",
        "/usr/share/man/man8/berth-csi.8.gz",
        "/usr/share/doc/berth-agent/copyright",
        "/usr/share/doc/berth-agent/changelog.Debian.gz",
    ] {
        m.exec_ok(&["test", "-f", f]);
    }
    assert_eq!(
        m.sh("readlink /opt/cni/bin/berth").trim(),
        "/usr/lib/cni/berth"
    );
    // Every file the packages put under /etc is a conffile.
    for pkg in ["berth-agent", "berth-cni", "berth-csi"] {
        let conffiles = m.exec_ok(&["dpkg-query", "-W", "-f=${Conffiles}", pkg]);
        for f in m.exec_ok(&["dpkg", "-L", pkg]).lines() {
            if f.starts_with("/etc/") && m.exec(&["test", "-f", f]).status.success() {
                assert!(
                    conffiles.contains(f),
                    "{pkg}: {f} is not a conffile: {conffiles}"
                );
            }
        }
    }
    // The agent: enabled, started, unprivileged, three capabilities, forwarding from sysctl.d.
    assert_eq!(
        m.exec_ok(&["systemctl", "is-enabled", "berth-agent"])
            .trim(),
        "enabled"
    );
    m.wait_ok(&["berthctl", "status"], Duration::from_secs(60));
    assert_eq!(
        m.exec_ok(&["systemctl", "is-active", "berth-agent"]).trim(),
        "active"
    );
    let pid = agent_pid(&m);
    let status = m.exec_ok(&["cat", &format!("/proc/{pid}/status")]);
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .map(|l| l[k.len()..].trim().to_string())
            .unwrap()
    };
    let berth_uid = m.exec_ok(&["id", "-u", "berth"]).trim().to_string();
    assert!(
        field("Uid:").starts_with(&berth_uid),
        "agent not running as berth: {status}"
    );
    assert_ne!(berth_uid, "0");
    // CAP_NET_ADMIN (12) | CAP_PERFMON (38) | CAP_BPF (39)
    let caps = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
    assert_eq!(caps, (1 << 12) | (1 << 38) | (1 << 39), "CapEff {caps:x}");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(
        m.exec_ok(&["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(),
        "1"
    );
    assert!(
        m.journal().contains("IPv4 forwarding is on"),
        "{}",
        m.journal()
    );
    let health = m.exec_ok(&[
        "bash",
        "-c",
        "exec 3<>/dev/tcp/127.0.0.1/9962; printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3",
    ]);
    assert!(
        health.starts_with("HTTP/1.0 200") || health.starts_with("HTTP/1.1 200"),
        "{health}"
    );

    // Pods through the packaged plugin and conflist, served by the packaged agent.
    let a = cni_add(&m, "poda");
    let b = cni_add(&m, "podb");
    assert!(
        a.starts_with("10.2.0.") && b.starts_with("10.2.0."),
        "{a} {b}"
    );
    m.exec_ok(&[
        "ip", "netns", "exec", "poda", "ping", "-c", "1", "-W", "5", &b,
    ]);

    // systemd's own checks of the unit.
    let verify = m.exec(&["systemd-analyze", "verify", "berth-agent.service"]);
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = m.exec_ok(&[
        "systemd-analyze",
        "security",
        "--no-pager",
        "berth-agent.service",
    ]);
    let exposure: f64 = security
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for berth-agent.service:")
                .nth(1)
        })
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{security}"));
    println!("systemd-analyze security: berth-agent.service exposure {exposure}");
    assert!(
        exposure <= 2.0,
        "exposure {exposure} (README promises 2.0 or better):\n{security}"
    );

    // The admin edits both conffiles; a newer build is installed over them.
    m.sh("echo '# admin: keep me' >> /etc/berth/agent.toml");
    m.sh("sed -i 's|/var/log/berth-cni.log|/var/log/berth-cni-admin.log|' /etc/cni/net.d/05-berth.conflist");
    let agent_toml = m.exec_ok(&["cat", "/etc/berth/agent.toml"]);
    let conflist = m.exec_ok(&["cat", "/etc/cni/net.d/05-berth.conflist"]);
    let before = agent_pid(&m);
    dpkg(&["-i", "--force-confold"], &p2);
    assert_eq!(
        m.exec_ok(&["dpkg-query", "-W", "-f=${Version}", "berth-agent"]),
        "0.1.0-2"
    );
    assert_eq!(m.exec_ok(&["cat", "/etc/berth/agent.toml"]), agent_toml);
    assert_eq!(
        m.exec_ok(&["cat", "/etc/cni/net.d/05-berth.conflist"]),
        conflist
    );
    m.wait_ok(&["berthctl", "status"], Duration::from_secs(60));
    let after = agent_pid(&m);
    assert_ne!(before, after, "the upgrade did not restart the agent");
    let st: serde_json::Value =
        serde_json::from_str(&m.exec_ok(&["berthctl", "status", "--json"])).unwrap();
    assert_eq!(st["endpoints"], 2, "pods lost across the upgrade: {st}");
    assert_eq!(st["datapath"]["adopted"], true, "{st}");
    m.exec_ok(&[
        "ip", "netns", "exec", "podb", "ping", "-c", "1", "-W", "5", &a,
    ]);

    // Remove: stopped, nothing running, state and conffiles kept.
    m.exec_ok(&["dpkg", "-r", "berth-cni", "berth-csi", "berth-agent"]);
    let running = m.exec(&["pgrep", "-x", "berth-agent"]);
    assert!(
        !running.status.success(),
        "berth-agent still running after remove"
    );
    assert!(
        !m.exec(&["systemctl", "is-active", "berth-agent"])
            .status
            .success()
    );
    for gone in [
        "/usr/bin/berth-agent",
        "/usr/lib/cni/berth",
        "/lib/systemd/system/berth-agent.service",
    ] {
        assert!(
            !m.exec(&["test", "-e", gone]).status.success(),
            "{gone} left after remove"
        );
    }
    assert!(
        !m.exec(&["test", "-L", "/opt/cni/bin/berth"])
            .status
            .success()
    );
    for kept in [
        "/etc/berth/agent.toml",
        "/etc/cni/net.d/05-berth.conflist",
        "/var/lib/berth/state.json",
    ] {
        m.exec_ok(&["test", "-e", kept]);
    }
    // Purge: conffiles and state go too.
    m.exec_ok(&["dpkg", "-P", "berth-cni", "berth-csi", "berth-agent"]);
    for gone in [
        "/etc/berth",
        "/etc/default/berth-agent",
        "/etc/cni/net.d/05-berth.conflist",
        "/var/lib/berth",
        "/run/berth",
        "/sys/fs/bpf/berth",
    ] {
        assert!(
            !m.exec(&["test", "-e", gone]).status.success(),
            "{gone} left after purge"
        );
    }
    let listed = m.exec(&["dpkg-query", "-W", "berth-agent"]);
    assert!(
        !listed.status.success(),
        "berth-agent still known to dpkg after purge"
    );
}
