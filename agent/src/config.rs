//! Agent settings: command-line flags and `BERTH_*` environment variables override the TOML file
//! (`/etc/berth/agent.toml` by default), which overrides built-in defaults (DESIGN §5).
use crate::{
    datapath::TcAttach,
    error::{Error, Result},
    routing::RoutingMode,
};
use ipnet::Ipv4Net;
use serde::Deserialize;
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

pub const DEFAULT_CONFIG: &str = "/etc/berth/agent.toml";
pub const DEFAULT_SOCKET: &str = "/run/berth/agent.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/berth";
pub const DEFAULT_CNI_STATE_DIR: &str = "/run/berth/cni";
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/berth";
/// The node's slice of the MKS pod range 10.2.0.0/16 (REFERENCE §6).
pub const DEFAULT_POD_CIDR: &str = "10.2.0.0/24";
/// Where the container image keeps the conflist that `--install-cni-conf` installs.
pub const DEFAULT_CNI_CONF_SOURCE: &str = "/usr/share/berth/05-berth.conflist";

/// Where `/metrics` and `/healthz` listen by default (Cilium's agent uses port 9962 too; only
/// this node can reach it).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9962";

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
    /// This node's pod CIDR; must not overlap 10.3.0.0/16 (services) or 172.17.0.0/16. Overrides
    /// the node's own `Node.spec.podCIDRs` from the state source. [default: from the Node object;
    /// without a state source 10.2.0.0/24]
    #[arg(long, env = "BERTH_POD_CIDR")]
    pub pod_cidr: Option<Ipv4Net>,
    /// MTU of pod interfaces. [default: the uplink's MTU; minus 50 bytes with --routing vxlan]
    #[arg(long, env = "BERTH_MTU")]
    pub mtu: Option<u32>,
    /// How pods reach other nodes' pods: `native` (routes via each node's InternalIP on the shared
    /// private network) or `vxlan` (overlay on UDP 8472). [default: native]
    #[arg(long, env = "BERTH_ROUTING", value_enum)]
    pub routing: Option<RoutingMode>,
    /// The node's device to the private network. [default: the link holding the node IP, else the
    /// link of the default route]
    #[arg(long, env = "BERTH_UPLINK")]
    pub uplink: Option<String>,
    /// This node's address on the private network (the `--node-ip` flag is shared with the
    /// tunnel's options; the binary fills this in). [default: the Node object's InternalIP, else
    /// the uplink's first address]
    #[arg(skip)]
    pub node_ip: Option<Ipv4Addr>,
    /// Node name reported in status. [default: the host name]
    #[arg(long, env = "BERTH_NODE_NAME")]
    pub node_name: Option<String>,
    /// How tc programs attach: `netlink` (clsact filters; every kernel), `tcx` (bpf_links, Linux
    /// 6.6+) or `auto` (TCX when the kernel has it). TCX adds 7-10 ms per hook to every CNI ADD
    /// on current kernels, so it is opt-in. [default: netlink]
    #[arg(long, env = "BERTH_TC_ATTACH", value_enum)]
    pub tc_attach: Option<TcAttach>,
    /// Capacity of the connection-tracking table (shared by NetworkPolicy, Services and
    /// masquerade). A full table evicts the least recently used connection, which is then
    /// checked against the policy again at its next packet. [default: 0.25 % of the node's
    /// memory at 128 bytes an entry, 64 Ki to 4 Mi entries]
    #[arg(long, env = "BERTH_CONNTRACK_MAX")]
    pub conntrack_max: Option<u32>,
    /// Also report every new connection the policy allows on the event ring buffer (`berthctl
    /// monitor` shows them); denied packets are always reported.
    #[arg(long, env = "BERTH_MONITOR_ALLOWED")]
    pub monitor_allowed: bool,
    /// Address of the Prometheus `/metrics` and `/healthz` endpoint; `none` turns it off. It
    /// listens beyond loopback only when given such an address. [default: 127.0.0.1:9962]
    #[arg(long, env = "BERTH_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Do not fsync the state file after each change (faster, not power-loss safe).
    #[arg(long)]
    pub no_fsync: bool,
    /// Do not enable IPv4 forwarding (pods then reach only this host).
    #[arg(long)]
    pub no_ip_forward: bool,
    /// Once the agent serves, install the CNI configuration (--cni-conf-source) at this path,
    /// atomically: runtimes then see the node's network as ready only when ADD can work (the
    /// DaemonSet's way; a package ships the file itself). [default: off]
    #[arg(long, env = "BERTH_INSTALL_CNI_CONF")]
    pub install_cni_conf: Option<PathBuf>,
    /// The CNI configuration that --install-cni-conf installs (checked first: it must chain the
    /// `berth` plugin and name this agent's socket).
    #[arg(long, env = "BERTH_CNI_CONF_SOURCE", default_value = DEFAULT_CNI_CONF_SOURCE)]
    pub cni_conf_source: PathBuf,
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
    routing: Option<RoutingMode>,
    uplink: Option<String>,
    node_ip: Option<Ipv4Addr>,
    tc_attach: Option<TcAttach>,
    conntrack_max: Option<u32>,
    monitor_allowed: Option<bool>,
    metrics_addr: Option<String>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub cni_state_dir: PathBuf,
    pub pin_root: PathBuf,
    /// Given by flag or file; `None`: from the Node object (or the default without a source).
    pub pod_cidr: Option<Ipv4Net>,
    /// Given by flag or file; `None`: derived from the uplink and the routing mode.
    pub mtu: Option<u32>,
    pub node_name: String,
    pub fsync: bool,
    pub ip_forward: bool,
    pub routing: RoutingMode,
    pub uplink: Option<String>,
    pub node_ip: Option<Ipv4Addr>,
    pub tc_attach: TcAttach,
    /// `None`: sized from the node's memory.
    pub conntrack_max: Option<u32>,
    pub monitor_allowed: bool,
    /// `None`: no metrics endpoint.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// (source, target) of the CNI configuration installed once the agent serves.
    pub install_cni_conf: Option<(PathBuf, PathBuf)>,
}

impl AgentArgs {
    /// Merges flags, the config file and defaults.
    pub fn resolve(&self) -> Result<Settings> {
        let file = load_file(&self.config)?;
        let pod_cidr = match (&self.pod_cidr, &file.pod_cidr) {
            (Some(c), _) => Some(*c),
            (None, Some(s)) => Some(s.parse().map_err(|e| {
                Error::Config(format!("{}: pod-cidr {s:?}: {e}", self.config.display()))
            })?),
            (None, None) => None,
        };
        if let Some(c) = &pod_cidr {
            crate::ipam::validate_pod_cidr(c)?;
        }
        let mtu = self.mtu.or(file.mtu);
        if let Some(mtu) = mtu
            && !(576..=65535).contains(&mtu)
        {
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
            routing: self.routing.or(file.routing).unwrap_or_default(),
            uplink: self.uplink.clone().or(file.uplink),
            node_ip: self.node_ip.or(file.node_ip),
            tc_attach: self.tc_attach.or(file.tc_attach).unwrap_or_default(),
            conntrack_max: match self.conntrack_max.or(file.conntrack_max) {
                Some(n) if !(1024..=(1 << 24)).contains(&n) => {
                    return Err(Error::Config(format!(
                        "conntrack-max {n} is outside 1024..=16777216"
                    )));
                }
                other => other,
            },
            monitor_allowed: self.monitor_allowed || file.monitor_allowed.unwrap_or(false),
            metrics_addr: match self
                .metrics_addr
                .clone()
                .or(file.metrics_addr)
                .as_deref()
                .unwrap_or(DEFAULT_METRICS_ADDR)
            {
                "none" | "" => None,
                a => Some(a.parse().map_err(|_| {
                    Error::Config(format!(
                        "metrics-addr {a:?} is not an address:port (or none)"
                    ))
                })?),
            },
            install_cni_conf: self.install_cni_conf.clone().map(|dest| {
                let src = if self.cni_conf_source.as_os_str().is_empty() {
                    DEFAULT_CNI_CONF_SOURCE.into()
                } else {
                    self.cni_conf_source.clone()
                };
                (src, dest)
            }),
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
        assert_eq!(s.pod_cidr.unwrap().to_string(), "10.2.5.0/24");
        assert_eq!(s.mtu, Some(9000));
        std::fs::write(&f, "pod-cidr = \"10.3.0.0/24\"\n").unwrap();
        assert!(
            args.resolve()
                .unwrap_err()
                .to_string()
                .contains("10.3.0.0/16")
        );
        std::fs::write(&f, "tc-attach = \"netlink\"\n").unwrap();
        assert_eq!(args.resolve().unwrap().tc_attach, TcAttach::Netlink);
        let forced = AgentArgs {
            tc_attach: Some(TcAttach::Tcx),
            ..args.clone()
        };
        assert_eq!(forced.resolve().unwrap().tc_attach, TcAttach::Tcx);
        std::fs::write(&f, "tc-attach = \"sometimes\"\n").unwrap();
        assert!(args.resolve().is_err());
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
        assert_eq!(
            s.pod_cidr, None,
            "the pod CIDR comes from the Node object by default"
        );
        assert_eq!(s.routing, RoutingMode::Native);
        assert_eq!(s.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(s.pin_root, PathBuf::from(DEFAULT_PIN_ROOT));
        assert!(s.fsync && s.ip_forward);
        assert_eq!(s.tc_attach, TcAttach::Netlink);
        assert_eq!(
            s.metrics_addr,
            Some("127.0.0.1:9962".parse().unwrap()),
            "the packaged agent serves /healthz on localhost"
        );
    }
}
