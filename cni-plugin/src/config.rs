//! CNI inputs: environment variables and the network configuration on stdin.
use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;

/// CNI versions this plugin implements (all share the 0.3+ result shape).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The version the plugin speaks natively.
pub const CURRENT_VERSION: &str = "1.1.0";

/// Default agent socket (DESIGN §5).
pub const DEFAULT_AGENT_SOCKET: &str = "/run/berth/agent.sock";
/// Default CNI state directory (delete queue lives below it).
pub const DEFAULT_STATE_DIR: &str = "/run/berth/cni";

/// The CNI verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(Error::InvalidEnv(format!(
                    "CNI_COMMAND={other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"
                )));
            }
        })
    }
}

/// The CNI_* environment of one invocation, validated for the verb.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub container_id: String,
    pub netns: Option<String>,
    pub ifname: String,
    pub args: BTreeMap<String, String>,
    pub path: Vec<String>,
}

/// Kubernetes pod identity from CNI_ARGS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub infra_container_id: String,
}

impl Env {
    /// Reads and validates the environment for `cmd` from `get` (std::env::var in production).
    pub fn from_vars(cmd: Command, get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
        let required: &[&str] = match cmd {
            Command::Add | Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Command::Gc => &["CNI_PATH"],
            Command::Version | Command::Status => &[],
        };
        let missing: Vec<&str> = required
            .iter()
            .copied()
            .filter(|k| nonempty(k).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(Error::InvalidEnv(format!(
                "required for {cmd:?} but missing or empty: {}",
                missing.join(", ")
            )));
        }
        let mut env = Env {
            container_id: nonempty("CNI_CONTAINERID").unwrap_or_default(),
            netns: nonempty("CNI_NETNS"),
            ifname: nonempty("CNI_IFNAME").unwrap_or_default(),
            args: BTreeMap::new(),
            path: nonempty("CNI_PATH")
                .map(|p| {
                    p.split(':')
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
        };
        if !env.container_id.is_empty() {
            validate_container_id(&env.container_id)?;
        }
        if !env.ifname.is_empty() {
            validate_ifname(&env.ifname)?;
        }
        if let Some(args) = nonempty("CNI_ARGS") {
            env.args = parse_args(&args)?;
        }
        Ok(env)
    }

    /// Pod identity from `K8S_POD_*` arguments (empty fields when absent).
    pub fn pod(&self) -> PodArgs {
        let get = |k: &str| self.args.get(k).cloned().unwrap_or_default();
        PodArgs {
            namespace: get("K8S_POD_NAMESPACE"),
            name: get("K8S_POD_NAME"),
            uid: get("K8S_POD_UID"),
            infra_container_id: get("K8S_POD_INFRA_CONTAINER_ID"),
        }
    }
}

/// CNI_CONTAINERID: alphanumeric first, then alphanumerics, `_`, `.`, `-`.
pub fn validate_container_id(id: &str) -> Result<()> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(Error::InvalidEnv(format!(
            "CNI_CONTAINERID={id:?} must start with a letter or digit and contain only letters, \
             digits, '_', '.' and '-'"
        )))
    }
}

/// CNI_IFNAME: a valid Linux interface name.
pub fn validate_ifname(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidEnv(format!(
            "CNI_IFNAME={name:?} is not a valid interface name (1-15 characters, no '/', ':' or \
             whitespace)"
        )))
    }
}

/// CNI_ARGS: `K=V;K=V`.
pub fn parse_args(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(Error::InvalidEnv(format!(
                "CNI_ARGS element {pair:?} is not of the form KEY=VALUE"
            )));
        };
        if k.is_empty() {
            return Err(Error::InvalidEnv(format!(
                "CNI_ARGS element {pair:?} has an empty key"
            )));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// One `{containerID, ifname}` of a GC request.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct GcAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration berth reads from stdin.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// Path of the agent's socket.
    #[serde(default)]
    pub agent_socket: Option<String>,
    /// Directory for the plugin's state (the delete queue).
    #[serde(default)]
    pub state_dir: Option<String>,
    /// Optional log file (the plugin never logs to stdout).
    #[serde(default)]
    pub log_file: Option<String>,
    #[serde(default)]
    pub ipam: Option<serde_json::Value>,
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<GcAttachment>>,
    #[serde(rename = "cni.dev/attachments", default)]
    pub attachments: Option<Vec<GcAttachment>>,
}

impl NetConf {
    /// Parses and validates stdin.
    pub fn parse(input: &[u8]) -> Result<Self> {
        if input.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(Error::Decode(
                "stdin is empty; expected the network configuration JSON".into(),
            ));
        }
        let conf: NetConf =
            serde_json::from_slice(input).map_err(|e| Error::Decode(e.to_string()))?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(Error::IncompatibleVersion {
                version: conf.cni_version.clone(),
                supported: SUPPORTED_VERSIONS.join(", "),
            });
        }
        if conf.name.is_empty() {
            return Err(Error::InvalidConfig("\"name\" is missing or empty".into()));
        }
        if conf.plugin_type.is_empty() {
            return Err(Error::InvalidConfig("\"type\" is missing or empty".into()));
        }
        if let Some(ipam) = &conf.ipam {
            let t = ipam.get("type").and_then(|t| t.as_str()).unwrap_or("");
            if !t.is_empty() {
                return Err(Error::UnsupportedField {
                    key: "ipam.type".into(),
                    value: t.into(),
                    why: "berth allocates pod addresses in berth-agent; remove the ipam section"
                        .into(),
                });
            }
        }
        if let Some(s) = &conf.agent_socket
            && !s.starts_with('/')
        {
            return Err(Error::InvalidConfig(format!(
                "agentSocket {s:?} must be an absolute path"
            )));
        }
        Ok(conf)
    }

    pub fn agent_socket(&self) -> String {
        std::env::var("BERTH_AGENT_SOCKET")
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| self.agent_socket.clone())
            .unwrap_or_else(|| DEFAULT_AGENT_SOCKET.into())
    }

    pub fn state_dir(&self) -> String {
        std::env::var("BERTH_CNI_STATE_DIR")
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| self.state_dir.clone())
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into())
    }

    /// GC's valid attachments, from either key (older runtimes send `cni.dev/attachments`).
    pub fn gc_valid(&self) -> Vec<GcAttachment> {
        let mut v: Vec<GcAttachment> = self
            .valid_attachments
            .iter()
            .chain(self.attachments.iter())
            .flatten()
            .cloned()
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// True when the result should use the pre-1.0 shape (`ips[].version`).
    pub fn legacy_result(&self) -> bool {
        self.cni_version.starts_with("0.")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(kv: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            kv.iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn add_requires_netns_and_names_missing_vars() {
        let e = Env::from_vars(Command::Add, vars(&[("CNI_CONTAINERID", "abc")])).unwrap_err();
        assert_eq!(e.code(), 4);
        let s = e.to_string();
        assert!(s.contains("CNI_NETNS") && s.contains("CNI_IFNAME"), "{s}");
    }

    #[test]
    fn del_does_not_need_netns() {
        let env = Env::from_vars(
            Command::Del,
            vars(&[("CNI_CONTAINERID", "a1"), ("CNI_IFNAME", "eth0")]),
        )
        .unwrap();
        assert!(env.netns.is_none());
    }

    #[test]
    fn container_id_and_ifname_are_validated() {
        assert!(validate_container_id("abc-1.2_3").is_ok());
        assert_eq!(validate_container_id("-abc").unwrap_err().code(), 4);
        assert_eq!(validate_container_id("a/b").unwrap_err().code(), 4);
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("a-very-long-interface").is_err());
        assert!(validate_ifname("a/b").is_err());
    }

    #[test]
    fn cni_args_parse_kubernetes_keys() {
        let env = Env::from_vars(
            Command::Add,
            vars(&[
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", "/run/netns/x"),
                ("CNI_IFNAME", "eth0"),
                (
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u1",
                ),
            ]),
        )
        .unwrap();
        let pod = env.pod();
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str(), pod.uid.as_str()),
            ("default", "web-0", "u1")
        );
        assert_eq!(parse_args("novalue").unwrap_err().code(), 4);
    }

    #[test]
    fn netconf_errors_have_spec_codes() {
        assert_eq!(NetConf::parse(b"").unwrap_err().code(), 6);
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code(), 6);
        let e = NetConf::parse(br#"{"cniVersion":"9.9.9","name":"n","type":"berth"}"#).unwrap_err();
        assert_eq!(e.code(), 1);
        let e = NetConf::parse(br#"{"cniVersion":"1.1.0","type":"berth"}"#).unwrap_err();
        assert_eq!(e.code(), 7);
        let e = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"berth","ipam":{"type":"host-local"}}"#,
        )
        .unwrap_err();
        assert_eq!(e.code(), 2);
        assert!(e.to_string().contains("ipam.type=host-local"));
    }

    #[test]
    fn gc_accepts_both_attachment_keys() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"berth",
                "cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}],
                "cni.dev/attachments":[{"containerID":"b","ifname":"eth0"},{"containerID":"a","ifname":"eth0"}]}"#,
        )
        .unwrap();
        let v = c.gc_valid();
        assert_eq!(v.len(), 2);
    }

    /// The packaged conflist's berth entry is what the plugin accepts (the runtime adds
    /// cniVersion and name to each plugin's config).
    #[test]
    fn packaged_conflist_is_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../packaging/cni/05-berth.conflist"
        );
        let list: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let mut plugin = list["plugins"][0].clone();
        assert_eq!(plugin["type"], "berth");
        plugin["cniVersion"] = list["cniVersion"].clone();
        plugin["name"] = list["name"].clone();
        let conf = NetConf::parse(plugin.to_string().as_bytes()).unwrap();
        assert_eq!(conf.agent_socket.as_deref(), Some(DEFAULT_AGENT_SOCKET));
        for v in list["cniVersions"].as_array().unwrap() {
            assert!(SUPPORTED_VERSIONS.contains(&v.as_str().unwrap()));
        }
    }
}
