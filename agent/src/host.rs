//! What the agent does to the node around the datapath: IPv4 forwarding, and the CNI
//! configuration it installs once it serves (the DaemonSet's way of telling the runtime that the
//! node's network is ready).
use crate::error::{Error, Result};
use std::{io::Write, path::Path};

/// The forwarding switch, as the kernel exposes it.
pub const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// What [`ensure_ip_forward`] found or did.
#[derive(Debug, PartialEq, Eq)]
pub enum Forwarding {
    /// Already on: nothing written (a read-only /proc/sys is then no problem).
    AlreadyOn,
    /// Was off, the agent switched it on.
    Enabled,
    /// Off, and it cannot be switched on from here; `reason` says why.
    Off { reason: String },
}

/// Makes sure IPv4 forwarding is on, writing the switch only when it is off: a container whose
/// /proc/sys is read-only (kubelet mounts it so) starts fine on a node that forwards already.
pub fn ensure_ip_forward(path: &Path) -> Forwarding {
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => return Forwarding::AlreadyOn,
        Ok(_) => {}
        Err(e) => {
            return Forwarding::Off {
                reason: format!("cannot read {}: {e}", path.display()),
            };
        }
    }
    match std::fs::write(path, "1") {
        Ok(()) => Forwarding::Enabled,
        Err(e) => Forwarding::Off {
            reason: match e.raw_os_error() {
                Some(libc::EROFS) => format!(
                    "{} is on a read-only file system (a container without a writable /proc/sys)",
                    path.display()
                ),
                Some(libc::EACCES) | Some(libc::EPERM) => format!(
                    "writing {} is not permitted ({e}; it needs CAP_NET_ADMIN)",
                    path.display()
                ),
                _ => format!("writing {}: {e}", path.display()),
            },
        },
    }
}

/// Logs the outcome of [`ensure_ip_forward`] in words an operator can act on.
pub fn log_forwarding(f: &Forwarding) {
    match f {
        Forwarding::AlreadyOn => tracing::info!("IPv4 forwarding is on (net.ipv4.ip_forward=1)"),
        Forwarding::Enabled => tracing::info!("enabled IPv4 forwarding (net.ipv4.ip_forward=1)"),
        Forwarding::Off { reason } => tracing::warn!(
            %reason,
            "IPv4 forwarding is OFF and the agent cannot switch it on: pods reach this node and \
             each other on it, but not other nodes or anything beyond; set \
             net.ipv4.ip_forward=1 on the node (the berth-agent package ships \
             /usr/lib/sysctl.d/60-berth.conf; a node image can add it to /etc/sysctl.d), or \
             start the agent with --no-ip-forward to silence this"
        ),
    }
}

/// Installs the CNI configuration `src` as `dest` once the agent serves: validated first (it must
/// chain the `berth` plugin and name this agent's socket), written to a temporary file in the
/// same directory, synced and renamed over `dest`, so the runtime never reads half a file.
/// Returns whether `dest` changed (an identical file is left alone: no needless events for the
/// runtime's directory watch).
pub fn install_cni_conf(src: &Path, dest: &Path, agent_socket: &Path) -> Result<bool> {
    let bytes = std::fs::read(src)
        .map_err(|e| Error::io(format!("read CNI config {}", src.display()), e))?;
    check_conflist(&bytes, agent_socket)
        .map_err(|why| Error::Config(format!("CNI config {}: {why}", src.display())))?;
    if std::fs::read(dest).is_ok_and(|cur| cur == bytes) {
        return Ok(false);
    }
    let dir = dest
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest.file_name().ok_or_else(|| {
        Error::Config(format!(
            "CNI config target {} has no file name",
            dest.display()
        ))
    })?;
    // A dot file without a .conf/.conflist/.json suffix: runtimes never load it.
    let tmp = dir.join(format!(".{}.berth-tmp", name.to_string_lossy()));
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(format!("install CNI config {}", dest.display()), e)
    })?;
    Ok(true)
}

/// The plugin's default socket when a conflist names none.
const PLUGIN_DEFAULT_SOCKET: &str = "/run/berth/agent.sock";

fn check_conflist(bytes: &[u8], agent_socket: &Path) -> std::result::Result<(), String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let plugins = v
        .get("plugins")
        .and_then(|p| p.as_array())
        .ok_or("no \"plugins\" list (a .conflist is expected)")?;
    let berth = plugins
        .iter()
        .find(|p| p.get("type").and_then(|t| t.as_str()) == Some("berth"))
        .ok_or("no plugin of type \"berth\"")?;
    let socket = berth
        .get("agentSocket")
        .and_then(|s| s.as_str())
        .unwrap_or(PLUGIN_DEFAULT_SOCKET);
    if Path::new(socket) != agent_socket {
        return Err(format!(
            "its agentSocket {socket} is not this agent's socket {} (every ADD would fail)",
            agent_socket.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn forwarding_is_written_only_when_off() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ip_forward");
        std::fs::write(&f, "1\n").unwrap();
        // Read-only and already on: nothing to do, no write attempted.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o444)).unwrap();
        assert_eq!(ensure_ip_forward(&f), Forwarding::AlreadyOn);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&f, "0\n").unwrap();
        assert_eq!(ensure_ip_forward(&f), Forwarding::Enabled);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "1");
        let missing = dir.path().join("nope");
        assert!(matches!(
            ensure_ip_forward(&missing),
            Forwarding::Off { .. }
        ));
    }

    #[test]
    fn forwarding_off_on_a_read_only_proc_sys_is_reported_not_fatal() {
        // A read-only bind mount of a file holding "0", as kubelet's read-only /proc/sys.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ip_forward");
        std::fs::write(&f, "0\n").unwrap();
        nix::mount::mount(
            Some(&f),
            &f,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let ro = nix::mount::mount(
            None::<&str>,
            &f,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND
                | nix::mount::MsFlags::MS_REMOUNT
                | nix::mount::MsFlags::MS_RDONLY,
            None::<&str>,
        );
        let got = ensure_ip_forward(&f);
        nix::mount::umount(&f).unwrap();
        ro.unwrap();
        match got {
            Forwarding::Off { reason } => assert!(reason.contains("read-only"), "{reason}"),
            other => panic!("expected Off, got {other:?}"),
        }
    }

    #[test]
    fn cni_conf_is_checked_and_installed_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let sock = Path::new("/run/berth/agent.sock");
        let src = dir.path().join("src.conflist");
        let dest = dir.path().join("net.d/05-berth.conflist");
        let good = r#"{"cniVersion":"1.0.0","name":"berth","plugins":[{"type":"berth"}]}"#;
        std::fs::write(&src, good).unwrap();
        assert!(install_cni_conf(&src, &dest, sock).unwrap());
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), good);
        // Identical: untouched.
        assert!(!install_cni_conf(&src, &dest, sock).unwrap());
        let names: Vec<_> = std::fs::read_dir(dest.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "temporary file left behind: {names:?}");
        // Another agent's socket, no berth plugin, not JSON: refused, the installed file stays.
        for (bad, why) in [
            (
                r#"{"plugins":[{"type":"berth","agentSocket":"/elsewhere.sock"}]}"#,
                "agentSocket",
            ),
            (r#"{"plugins":[{"type":"bridge"}]}"#, "berth"),
            ("{", "JSON"),
        ] {
            std::fs::write(&src, bad).unwrap();
            let e = install_cni_conf(&src, &dest, sock).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
            assert_eq!(std::fs::read_to_string(&dest).unwrap(), good);
        }
        // The shipped conflist names the default socket.
        let shipped = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../packaging/cni/05-berth.conflist"
        );
        assert!(install_cni_conf(Path::new(shipped), &dest, sock).unwrap());
    }
}
