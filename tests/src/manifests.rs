//! Berth's Kubernetes manifests as the API server would see them: the files, parsed, and the
//! validation rules of kube-apiserver that the OpenAPI schemas do not encode (the schemas
//! themselves are checked with `kubernetes-validate`, see tests/tests/manifests.rs).
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Kubernetes versions Berth supports (and validates its manifests against).
pub const SUPPORTED_VERSIONS: &[&str] = &["1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0"];

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// Every Kubernetes manifest Berth ships (kustomization.yaml is kustomize's, not the API's).
pub fn manifest_files() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for dir in ["packaging/kubernetes", "packaging/csi"] {
        for e in std::fs::read_dir(repo_root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".yaml") && name != "kustomization.yaml" {
                v.push(p);
            }
        }
    }
    v.sort();
    v
}

/// The documents of a YAML file.
pub fn load(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// The object of `kind` named `name` in `path`.
pub fn object(path: &Path, kind: &str, name: &str) -> Value {
    load(path)
        .into_iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {}", path.display()))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Capabilities as the runtime knows them (names without `CAP_`, which the runtime adds).
const CAPABILITIES: &[&str] = &[
    "ALL",
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYSLOG",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "WAKE_ALARM",
];

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// kube-apiserver's validation of a pod template that the schemas cannot express (ValidatePodSpec
/// and friends), plus what makes a DaemonSet/Deployment valid. Returns every violation.
pub fn pod_template_errors(workload: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    let kind = workload["kind"].as_str().unwrap_or("");
    let name = workload["metadata"]["name"].as_str().unwrap_or("");
    let at = format!("{kind} {name}");
    let mut err = |m: String| errs.push(format!("{at}: {m}"));
    let spec = &workload["spec"];
    let tmpl = &spec["template"];
    // The selector must select the template's labels.
    let labels = tmpl["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    match spec["selector"]["matchLabels"].as_object() {
        Some(sel) if !sel.is_empty() => {
            for (k, v) in sel {
                if labels.get(k) != Some(v) {
                    err(format!(
                        "selector {k}={v} does not match the template's labels"
                    ));
                }
            }
        }
        _ => err("spec.selector.matchLabels is empty".into()),
    }
    if kind == "DaemonSet" {
        let ru = &spec["updateStrategy"]["rollingUpdate"];
        let zero = |v: &Value| v.is_null() || v == 0 || v == "0%" || v == "0";
        if spec["updateStrategy"]["type"] == "RollingUpdate"
            && zero(&ru["maxSurge"])
            && !ru["maxUnavailable"].is_null()
            && zero(&ru["maxUnavailable"])
        {
            err("maxUnavailable and maxSurge may not both be 0".into());
        }
    }
    let pod = &tmpl["spec"];
    let host_network = pod["hostNetwork"] == true;
    let volumes: Vec<String> = pod["volumes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let mut seen_vol = std::collections::BTreeSet::new();
    for v in pod["volumes"].as_array().into_iter().flatten() {
        let vn = v["name"].as_str().unwrap_or("");
        if !is_dns_label(vn) || !seen_vol.insert(vn.to_string()) {
            err(format!("volume name {vn:?} invalid or repeated"));
        }
        if let Some(t) = v["hostPath"]["type"].as_str()
            && ![
                "",
                "DirectoryOrCreate",
                "Directory",
                "FileOrCreate",
                "File",
                "Socket",
                "CharDevice",
                "BlockDevice",
            ]
            .contains(&t)
        {
            err(format!(
                "volume {vn}: hostPath type {t:?} is not one of the allowed values"
            ));
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for (section, is_init) in [("initContainers", true), ("containers", false)] {
        for c in pod[section].as_array().into_iter().flatten() {
            let cn = c["name"].as_str().unwrap_or("");
            let cat = format!("{section} {cn}");
            if !is_dns_label(cn) || !names.insert(cn.to_string()) {
                err(format!("{cat}: container name invalid or repeated"));
            }
            if c["image"].as_str().unwrap_or("").is_empty() {
                err(format!("{cat}: no image"));
            }
            let sc = &c["securityContext"];
            let privileged = sc["privileged"] == true;
            let adds = strs(&sc["capabilities"]["add"]);
            for cap in adds.iter().chain(strs(&sc["capabilities"]["drop"]).iter()) {
                if !CAPABILITIES.contains(&cap.as_str()) {
                    err(format!(
                        "{cat}: capability {cap:?} unknown (the runtime prefixes CAP_ itself)"
                    ));
                }
            }
            if sc["allowPrivilegeEscalation"] == false
                && (privileged || adds.iter().any(|a| a == "SYS_ADMIN"))
            {
                err(format!(
                    "{cat}: allowPrivilegeEscalation false cannot go with privileged or CAP_SYS_ADMIN"
                ));
            }
            let port_names: Vec<String> = c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["name"].as_str().map(String::from))
                .collect();
            for p in c["ports"].as_array().into_iter().flatten() {
                if let Some(n) = p["name"].as_str()
                    && (n.len() > 15
                        || !n.bytes().any(|b| b.is_ascii_alphabetic())
                        || !is_dns_label(n))
                {
                    err(format!(
                        "{cat}: port name {n:?} is not an IANA service name"
                    ));
                }
                if host_network && !p["hostPort"].is_null() && p["hostPort"] != p["containerPort"] {
                    err(format!(
                        "{cat}: with hostNetwork hostPort must equal containerPort"
                    ));
                }
            }
            for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
                let pr = &c[probe];
                if pr.is_null() {
                    continue;
                }
                if is_init && c["restartPolicy"] != "Always" {
                    err(format!(
                        "{cat}: {probe} is not allowed in an init container"
                    ));
                }
                for handler in ["httpGet", "tcpSocket", "grpc"] {
                    if let Some(port) = pr[handler]["port"].as_str()
                        && !port_names.iter().any(|n| n == port)
                    {
                        err(format!(
                            "{cat}: {probe} names port {port:?}, which the container does not declare"
                        ));
                    }
                }
            }
            let mut paths = std::collections::BTreeSet::new();
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                let mn = m["name"].as_str().unwrap_or("");
                if !volumes.iter().any(|v| v == mn) {
                    err(format!("{cat}: volumeMount {mn:?} names no volume"));
                }
                let path = m["mountPath"].as_str().unwrap_or("");
                if !paths.insert(path.to_string()) {
                    err(format!("{cat}: mountPath {path} used twice"));
                }
                match m["mountPropagation"].as_str() {
                    None | Some("None") | Some("HostToContainer") => {}
                    Some("Bidirectional") if privileged => {}
                    Some("Bidirectional") => err(format!(
                        "{cat}: volumeMount {mn}: Bidirectional mount propagation is available only to privileged containers"
                    )),
                    Some(o) => err(format!("{cat}: mountPropagation {o:?} is not supported")),
                }
            }
            for e in c["env"].as_array().into_iter().flatten() {
                if let Some(fp) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str()
                    && ![
                        "metadata.name",
                        "metadata.namespace",
                        "metadata.uid",
                        "spec.nodeName",
                        "spec.serviceAccountName",
                        "status.hostIP",
                        "status.hostIPs",
                        "status.podIP",
                        "status.podIPs",
                    ]
                    .contains(&fp)
                    && !fp.starts_with("metadata.labels[")
                    && !fp.starts_with("metadata.annotations[")
                {
                    err(format!("{cat}: env fieldPath {fp:?} is not supported"));
                }
            }
        }
    }
    if pod["containers"].as_array().is_none_or(|a| a.is_empty()) {
        err("no containers".into());
    }
    errs
}
