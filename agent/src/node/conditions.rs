//! Node condition probes reported in heartbeats: kubelet health (`GET /healthz` on its healthz
//! port), container runtime (its socket accepts a connection), datapath (the eBPF pin directory
//! exists), disk pressure (free space under a threshold).
use std::{net::SocketAddr, path::Path, time::Duration};

use berth_proto::node::Condition;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the probes look.
#[derive(Clone, Debug)]
pub struct Probes {
    pub kubelet_healthz: Option<SocketAddr>,
    pub runtime_socket: Option<std::path::PathBuf>,
    pub datapath_pin: Option<std::path::PathBuf>,
    pub disk_path: std::path::PathBuf,
    /// DiskPressure when the free fraction is below this (0.10 = 10 %).
    pub disk_min_free: f64,
}

fn cond(t: &str, status: bool, message: String) -> Condition {
    Condition {
        r#type: t.into(),
        status,
        message,
    }
}

/// Whether an HTTP response head is a 200.
pub fn is_http_ok(head: &str) -> bool {
    head.lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .is_some_and(|c| c == "200")
}

async fn http_healthz(addr: SocketAddr) -> Result<(), String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 512];
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        let head = String::from_utf8_lossy(&buf[..n]);
        if is_http_ok(&head) {
            Ok(())
        } else {
            Err(format!(
                "healthz answered {:?}",
                head.lines().next().unwrap_or("")
            ))
        }
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .map_err(|_| "healthz timed out".to_string())?
}

/// Free fraction of the filesystem holding `path`.
pub fn free_fraction(path: &Path) -> Result<f64, String> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| e.to_string())?;
    let total = st.blocks() as f64;
    if total == 0.0 {
        return Ok(1.0);
    }
    Ok(st.blocks_available() as f64 / total)
}

/// Runs every probe.
pub async fn probe(p: &Probes) -> Vec<Condition> {
    let kubelet = match p.kubelet_healthz {
        None => cond("KubeletHealthy", true, "not probed".into()),
        Some(addr) => match http_healthz(addr).await {
            Ok(()) => cond("KubeletHealthy", true, format!("{addr} healthz ok")),
            Err(e) => cond("KubeletHealthy", false, format!("{addr}: {e}")),
        },
    };
    let runtime = match &p.runtime_socket {
        None => cond("ContainerRuntimeHealthy", true, "not probed".into()),
        Some(path) => match tokio::net::UnixStream::connect(path).await {
            Ok(_) => cond(
                "ContainerRuntimeHealthy",
                true,
                format!("{} accepts", path.display()),
            ),
            Err(e) => cond(
                "ContainerRuntimeHealthy",
                false,
                format!("{}: {e}", path.display()),
            ),
        },
    };
    let datapath = match &p.datapath_pin {
        None => cond("DatapathLoaded", true, "not probed".into()),
        Some(path) if path.exists() => {
            cond("DatapathLoaded", true, format!("{} pinned", path.display()))
        }
        Some(path) => cond(
            "DatapathLoaded",
            false,
            format!("{} missing", path.display()),
        ),
    };
    let disk = match free_fraction(&p.disk_path) {
        Ok(f) => cond(
            "DiskPressure",
            f < p.disk_min_free,
            format!("{:.1}% free on {}", f * 100.0, p.disk_path.display()),
        ),
        Err(e) => cond(
            "DiskPressure",
            true,
            format!("{}: {e}", p.disk_path.display()),
        ),
    };
    vec![kubelet, runtime, datapath, disk]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_status_line() {
        assert!(is_http_ok("HTTP/1.1 200 OK\r\n\r\nok"));
        assert!(!is_http_ok("HTTP/1.1 500 Internal\r\n"));
        assert!(!is_http_ok(""));
    }

    #[test]
    fn free_space_of_root() {
        let f = free_fraction(Path::new("/")).unwrap();
        assert!((0.0..=1.0).contains(&f));
    }
}
