//! Agent settings: command-line flags and `BERTH_*` environment variables override the TOML file
//! (`/etc/berth/agent.toml` by default), which overrides built-in defaults (DESIGN §5).
use crate::error::{Error, Result};
use ipnet::Ipv4Net;
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG: &str = "/etc/berth/agent.toml";
pub const DEFAULT_SOCKET: &str = "/run/berth/agent.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/berth";
pub const DEFAULT_CNI_STATE_DIR: &str = "/run/berth/cni";
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/berth";
/// The node's slice of the MKS pod range 10.2.0.0/16 (REFERENCE §6).
pub const DEFAULT_POD_CIDR: &str = "10.2.0.0/24";
pub const DEFAULT_MTU: u32 = 1500;

/// Datapath and local API flags of `berth-agent`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AgentArgs {
    /// TOML configuration file; keys as the long flags in kebab-case (pod-cidr = "10.2.1.0/24").
    #[arg(long, env = "BERTH_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Local API socket for the CNI plugin and berthctl (created mode 0600). [default: /run/berth/agent.sock]
    #[arg(long, env = "BERTH_AGENT_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Persistent state: IPAM allocations and endpoints. [default: /var/lib/berth]
    #[arg(long, env = "BERTH_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// The CNI plugin's state directory, whose delete queue the agent drains. [default: /run/berth/cni]
    #[arg(long, env = "BERTH_CNI_STATE_DIR")]
    pub cni_state_dir: Option<PathBuf>,
    /// Where programs and maps are pinned (must be on bpffs). [default: /sys/fs/bpf/berth]
    #[arg(long, env = "BERTH_PIN_ROOT")]
    pub pin_root: Option<PathBuf>,
    /// This node's pod CIDR; must not overlap 10.3.0.0/16 (services) or 172.17.0.0/16. [default: 10.2.0.0/24]
    #[arg(long, env = "BERTH_POD_CIDR")]
    pub pod_cidr: Option<Ipv4Net>,
    /// MTU of pod interfaces. [default: 1500]
    #[arg(long, env = "BERTH_MTU")]
    pub mtu: Option<u32>,
    /// Node name reported in status. [default: the host name]
    #[arg(long, env = "BERTH_NODE_NAME")]
    pub node_name: Option<String>,
    /// Do not fsync the state file after each change (faster, not power-loss safe).
    #[arg(long)]
    pub no_fsync: bool,
    /// Do not enable IPv4 forwarding (pods then reach only this host).
    #[arg(long)]
    pub no_ip_forward: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    cni_state_dir: Option<PathBuf>,
    pin_root: Option<PathBuf>,
    pod_cidr: Option<String>,
    mtu: Option<u32>,
    node_name: Option<String>,
    fsync: Option<bool>,
    ip_forward: Option<bool>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub cni_state_dir: PathBuf,
    pub pin_root: PathBuf,
    pub pod_cidr: Ipv4Net,
    pub mtu: u32,
    pub node_name: String,
    pub fsync: bool,
    pub ip_forward: bool,
}

impl AgentArgs {
    /// Merges flags, the config file and defaults.
    pub fn resolve(&self) -> Result<Settings> {
        let file = load_file(&self.config)?;
        let pod_cidr = match (&self.pod_cidr, &file.pod_cidr) {
            (Some(c), _) => *c,
            (None, Some(s)) => s.parse().map_err(|e| {
                Error::Config(format!("{}: pod-cidr {s:?}: {e}", self.config.display()))
            })?,
            (None, None) => DEFAULT_POD_CIDR.parse().expect("default CIDR"),
        };
        crate::ipam::validate_pod_cidr(&pod_cidr)?;
        let mtu = self.mtu.or(file.mtu).unwrap_or(DEFAULT_MTU);
        if !(576..=65535).contains(&mtu) {
            return Err(Error::Config(format!("mtu {mtu} is outside 576..=65535")));
        }
        let node_name = self
            .node_name
            .clone()
            .or(file.node_name)
            .or_else(|| {
                nix::unistd::gethostname()
                    .ok()
                    .map(|h| h.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        Ok(Settings {
            socket: self
                .socket
                .clone()
                .or(file.socket)
                .unwrap_or_else(|| DEFAULT_SOCKET.into()),
            state_dir: self
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            cni_state_dir: self
                .cni_state_dir
                .clone()
                .or(file.cni_state_dir)
                .unwrap_or_else(|| DEFAULT_CNI_STATE_DIR.into()),
            pin_root: self
                .pin_root
                .clone()
                .or(file.pin_root)
                .unwrap_or_else(|| DEFAULT_PIN_ROOT.into()),
            pod_cidr,
            mtu,
            node_name,
            fsync: !self.no_fsync && file.fsync.unwrap_or(true),
            ip_forward: !self.no_ip_forward && file.ip_forward.unwrap_or(true),
        })
    }
}

fn load_file(path: &Path) -> Result<FileConfig> {
    match std::fs::read_to_string(path) {
        Ok(s) => toml::from_str(&s).map_err(|e| Error::Config(format!("{}: {e}", path.display()))),
        // The default file is optional; an explicitly named one must exist.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == Path::new(DEFAULT_CONFIG) => {
            Ok(FileConfig::default())
        }
        Err(e) => Err(Error::io(format!("read config {}", path.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent.toml");
        std::fs::write(&f, "pod-cidr = \"10.2.5.0/24\"\nmtu = 1400\n").unwrap();
        let args = AgentArgs {
            config: f.clone(),
            mtu: Some(9000),
            ..Default::default()
        };
        let s = args.resolve().unwrap();
        assert_eq!(s.pod_cidr.to_string(), "10.2.5.0/24");
        assert_eq!(s.mtu, 9000);
        std::fs::write(&f, "pod-cidr = \"10.3.0.0/24\"\n").unwrap();
        assert!(
            args.resolve()
                .unwrap_err()
                .to_string()
                .contains("10.3.0.0/16")
        );
        std::fs::write(&f, "bogus = 1\n").unwrap();
        assert!(args.resolve().is_err());
        let missing = AgentArgs {
            config: dir.path().join("nope.toml"),
            ..Default::default()
        };
        assert!(missing.resolve().is_err());
    }

    #[test]
    fn packaged_config_is_valid_and_matches_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/etc/agent.toml");
        let s = AgentArgs {
            config: path.into(),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(s.pod_cidr.to_string(), DEFAULT_POD_CIDR);
        assert_eq!(s.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(s.pin_root, PathBuf::from(DEFAULT_PIN_ROOT));
        assert!(s.fsync && s.ip_forward);
    }
}
