//! Berth's Kubernetes manifests are what the API server accepts: every object against the OpenAPI
//! schemas of every supported Kubernetes version (`kubernetes-validate --strict`, from PyPI,
//! installed by scripts/bootstrap.sh), then the API server's own rules that schemas cannot say
//! (Bidirectional propagation needs a privileged container, probes name declared ports, the
//! selector selects the template, ...), and what makes the objects work together (references,
//! images, RBAC that only reads, the pod CIDR left to each Node object).
use berth_tests::manifests::{
    SUPPORTED_VERSIONS, load, manifest_files, object, pod_template_errors, repo_root,
};
use serde_json::{Value, json};
use std::{path::PathBuf, process::Command};

fn kubernetes_validate() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = PathBuf::from(home).join(".cache/berth/venv/bin/kubernetes-validate");
    assert!(
        p.exists(),
        "{} is missing: run scripts/bootstrap.sh (it installs kubernetes-validate into that venv)",
        p.display()
    );
    p
}

fn workspace_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

#[test]
fn every_manifest_passes_the_schemas_of_every_supported_version() {
    let files = manifest_files();
    assert!(files.len() >= 6, "manifests missing: {files:?}");
    for v in SUPPORTED_VERSIONS {
        let out = Command::new(kubernetes_validate())
            .args(["--strict", "--quiet", "-k", v])
            .args(&files)
            .output()
            .expect("run kubernetes-validate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "Kubernetes {v} rejects a manifest:\n{text}"
        );
        // The only kind without a schema in Kubernetes itself is the snapshot CRD's.
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                line.contains("Couldn't find schema for kind VolumeSnapshotClass"),
                "unexpected output for Kubernetes {v}: {line}"
            );
        }
    }
    // The CRD object, by the external-snapshotter CRD's rules.
    let snap = object(
        &repo_root().join("packaging/csi/storageclasses.yaml"),
        "VolumeSnapshotClass",
        "csi-cinder-snapclass",
    );
    assert_eq!(snap["apiVersion"], "snapshot.storage.k8s.io/v1");
    assert_eq!(snap["driver"], "cinder.csi.openstack.org");
    assert!(["Delete", "Retain"].contains(&snap["deletionPolicy"].as_str().unwrap_or("")));
}

#[test]
fn workloads_follow_the_api_servers_rules() {
    let mut checked = 0;
    for f in manifest_files() {
        for d in load(&f) {
            if ["DaemonSet", "Deployment"].contains(&d["kind"].as_str().unwrap_or("")) {
                let errs = pod_template_errors(&d);
                assert!(errs.is_empty(), "{}: {errs:#?}", f.display());
                checked += 1;
            }
        }
    }
    assert_eq!(
        checked, 3,
        "agent DaemonSet, CSI controller Deployment, CSI node DaemonSet"
    );

    // The checker catches what the API server refuses (so a green run means something).
    let ds = object(
        &repo_root().join("packaging/kubernetes/berth-agent.yaml"),
        "DaemonSet",
        "berth-agent",
    );
    let broken = |f: &dyn Fn(&mut Value)| {
        let mut d = ds.clone();
        f(&mut d);
        pod_template_errors(&d).join("\n")
    };
    let in_agent = |f: &dyn Fn(&mut Value)| {
        broken(&|d: &mut Value| f(&mut d["spec"]["template"]["spec"]["containers"][0]))
    };
    let e = in_agent(&|c| c["volumeMounts"][0]["mountPropagation"] = json!("Bidirectional"));
    assert!(e.contains("Bidirectional mount propagation"), "{e}");
    let e = in_agent(&|c| c["securityContext"]["capabilities"]["add"][0] = json!("CAP_NET_ADMIN"));
    assert!(e.contains("CAP_NET_ADMIN"), "{e}");
    let e = in_agent(&|c| c["readinessProbe"]["httpGet"]["port"] = json!("healthz"));
    assert!(e.contains("does not declare"), "{e}");
    let e = broken(&|d| {
        d["spec"]["template"]["spec"]["initContainers"][0]["readinessProbe"] =
            json!({"exec": {"command": ["true"]}})
    });
    assert!(e.contains("not allowed in an init container"), "{e}");
    let e = broken(&|d| d["spec"]["selector"]["matchLabels"] = json!({"app": "other"}));
    assert!(e.contains("does not match"), "{e}");
    let e = broken(&|d| {
        d["spec"]["updateStrategy"]["rollingUpdate"] = json!({"maxUnavailable": 0, "maxSurge": 0})
    });
    assert!(e.contains("both be 0"), "{e}");
}

#[test]
fn agent_daemonset_is_least_privilege_and_leaves_the_pod_cidr_to_each_node() {
    let file = repo_root().join("packaging/kubernetes/berth-agent.yaml");
    let ds = object(&file, "DaemonSet", "berth-agent");
    let pod = &ds["spec"]["template"]["spec"];
    let agent = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "agent")
        .unwrap();
    let sc = &agent["securityContext"];
    assert_ne!(sc["privileged"], true, "the agent must not be privileged");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        sc["capabilities"]["add"],
        json!(["NET_ADMIN", "BPF", "PERFMON"])
    );
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);

    // No pod CIDR anywhere: each agent reads its own Node.spec.podCIDRs.
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains("pod-cidr") && !text.contains("POD_CIDR"),
        "a pod CIDR is hard-coded"
    );
    let cm = object(&file, "ConfigMap", "berth-agent-config");
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("agent.toml");
    std::fs::write(&toml, cm["data"]["agent.toml"].as_str().unwrap()).unwrap();
    let settings = berth_agent::config::AgentArgs {
        config: toml,
        ..Default::default()
    }
    .resolve()
    .expect("the ConfigMap's agent.toml is a valid agent configuration");
    assert_eq!(settings.pod_cidr, None);
    // The readiness probe asks the agent's own /healthz, where the configuration serves it.
    let probe = &agent["readinessProbe"]["httpGet"];
    let port = agent["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == probe["port"])
        .unwrap()["containerPort"]
        .as_u64()
        .unwrap();
    assert_eq!(probe["path"], "/healthz");
    assert_eq!(
        settings.metrics_addr,
        Some(
            format!("{}:{port}", probe["host"].as_str().unwrap())
                .parse()
                .unwrap()
        )
    );
    // The node name comes from the pod's node.
    assert!(
        agent["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "BERTH_NODE_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")
    );
    // Rolling update: old agent out, new one in, one node at a time, no PodDisruptionBudget.
    assert_eq!(
        ds["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}})
    );
    assert!(
        load(&file)
            .iter()
            .all(|d| d["kind"] != "PodDisruptionBudget")
    );

    // RBAC reads, and only the kinds the agent watches.
    let role = object(&file, "ClusterRole", "berth-agent");
    for rule in role["rules"].as_array().unwrap() {
        for verb in rule["verbs"].as_array().unwrap() {
            assert!(
                ["list", "watch"].contains(&verb.as_str().unwrap()),
                "{rule}"
            );
        }
    }
    let binding = object(&file, "ClusterRoleBinding", "berth-agent");
    assert_eq!(binding["roleRef"]["name"], "berth-agent");
    assert_eq!(binding["subjects"][0]["name"], pod["serviceAccountName"]);
    object(
        &file,
        "ServiceAccount",
        pod["serviceAccountName"].as_str().unwrap(),
    );

    // Images are the ones packaging/container/build-images.sh builds.
    let image = format!("berth-agent:{}", workspace_version());
    for c in pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["containers"].as_array().unwrap())
    {
        assert_eq!(c["image"], image.as_str());
    }
}

#[test]
fn csi_manifests_have_sidecars_leader_election_probes_and_the_three_classes() {
    let dir = repo_root().join("packaging/csi");
    let ctl = object(
        &dir.join("controller.yaml"),
        "Deployment",
        "berth-csi-controller",
    );
    let containers = ctl["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    for sidecar in [
        "csi-provisioner",
        "csi-attacher",
        "csi-snapshotter",
        "csi-resizer",
    ] {
        let c = containers
            .iter()
            .find(|c| c["name"] == sidecar)
            .unwrap_or_else(|| panic!("{sidecar} missing"));
        let args = c["args"].to_string();
        assert!(args.contains("--leader-election=true"), "{sidecar}: {args}");
    }
    let node = object(&dir.join("node.yaml"), "DaemonSet", "berth-csi-node");
    let containers = node["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert!(
        containers
            .iter()
            .any(|c| c["name"] == "node-driver-registrar")
    );
    let plugin = containers
        .iter()
        .find(|c| c["name"] == "berth-csi")
        .unwrap();
    assert!(plugin["livenessProbe"].is_object());
    let image = format!("berth-csi:{}", workspace_version());
    assert_eq!(plugin["image"], image.as_str());
    let classes: Vec<String> = load(&dir.join("storageclasses.yaml"))
        .iter()
        .filter(|d| d["kind"] == "StorageClass")
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        classes,
        [
            "csi-cinder-classic",
            "csi-cinder-high-speed",
            "csi-cinder-high-speed-gen2"
        ]
    );
}
