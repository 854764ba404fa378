//! [`KubeSource`]: the cluster state from the Kubernetes API, one kube-rs watcher per watched kind
//! (every Node, Pod, Namespace and NetworkPolicy; pods of other nodes are reduced to their policy
//! view as they arrive, so a relist of 10 000 pods never holds 10 000 whole pods).
//!
//! kube-rs's watcher lists, then watches from the list's resourceVersion, follows bookmarks, and
//! relists after a `410 Gone` ERROR event; it reconnects with back-off after connection errors.
//! One case it does not relist for is a watch request answered by HTTP 410 (it retries the same
//! version forever): a 410 in any form here restarts the watcher, which relists.
//!
//! Events of all kinds go through one channel to one task that owns the model: a list replaces
//! its kind's objects when complete (`InitDone`), watch events update them, and changes arriving
//! within [`COALESCE`](super::COALESCE) are published together.
use super::model::{ClusterModel, Kind, Object};
use super::{COALESCE, Publisher, StateSource};
use crate::error::{Error, Result};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use kube::{Api, Client, Config};
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// The Kubernetes API source.
pub struct KubeSource {
    client: Client,
    node: String,
}

impl KubeSource {
    /// Builds the client from the kubeconfig file(s) at `kubeconfig` (`:`-separated, merged as
    /// kubectl does), or else infers it (`~/.kube/config`, then the in-cluster service account).
    /// Does not contact the API server: an unreachable server is retried by the watchers.
    pub async fn connect(kubeconfig: Option<&Path>, node_name: &str) -> Result<KubeSource> {
        let config = match kubeconfig.filter(|p| !p.as_os_str().is_empty()) {
            Some(paths) => {
                let mut merged: Option<Kubeconfig> = None;
                for path in std::env::split_paths(paths.as_os_str()) {
                    if path.as_os_str().is_empty() {
                        continue;
                    }
                    let kc = Kubeconfig::read_from(&path).map_err(|e| {
                        Error::Config(format!("kubeconfig {}: {e}", path.display()))
                    })?;
                    merged = Some(match merged {
                        None => kc,
                        Some(m) => m.merge(kc).map_err(|e| {
                            Error::Config(format!("kubeconfig {}: {e}", path.display()))
                        })?,
                    });
                }
                let kc = merged.ok_or_else(|| Error::Config("empty kubeconfig path".into()))?;
                Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                    .await
                    .map_err(|e| Error::Config(format!("kubeconfig {}: {e}", paths.display())))?
            }
            None => Config::infer()
                .await
                .map_err(|e| Error::Config(format!("Kubernetes client configuration: {e}")))?,
        };
        info!(server = %config.cluster_url, node = node_name, "Kubernetes source");
        let client = Client::try_from(config)
            .map_err(|e| Error::Config(format!("Kubernetes client: {e}")))?;
        Ok(KubeSource {
            client,
            node: node_name.to_string(),
        })
    }

    /// Starts the watcher of one kind: the one place that maps a [`Kind`] to its API.
    fn spawn_kind(&self, kind: Kind, tx: mpsc::Sender<KindEvent>) -> JoinHandle<()> {
        let mut cfg = watcher::Config::default().any_semantic();
        if let Some(sel) = kind.field_selector(&self.node) {
            cfg = cfg.fields(&sel);
        }
        let c = self.client.clone();
        let n = self.node.clone();
        match kind {
            Kind::Node => tokio::spawn(watch_kind(
                Api::<Node>::all(c),
                kind,
                cfg,
                Object::Node,
                n,
                tx,
            )),
            Kind::Pod => tokio::spawn(watch_kind(
                Api::<Pod>::all(c),
                kind,
                cfg,
                Object::Pod,
                n,
                tx,
            )),
            Kind::Namespace => tokio::spawn(watch_kind(
                Api::<Namespace>::all(c),
                kind,
                cfg,
                Object::Namespace,
                n,
                tx,
            )),
            Kind::NetworkPolicy => tokio::spawn(watch_kind(
                Api::<NetworkPolicy>::all(c),
                kind,
                cfg,
                Object::NetworkPolicy,
                n,
                tx,
            )),
        }
    }

    async fn run_loop(self, out: Publisher) {
        let (tx, mut rx) = mpsc::channel(1024);
        let tasks = AbortOnDrop(
            Kind::ALL
                .iter()
                .map(|&k| self.spawn_kind(k, tx.clone()))
                .collect(),
        );
        drop(tx);
        let mut state = ModelState::new(self.node.clone());
        let mut publish_at: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = out.closed() => break,
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    if state.apply(ev) && publish_at.is_none() {
                        publish_at = Some(Instant::now() + COALESCE);
                    }
                }
                _ = sleep_until(publish_at), if publish_at.is_some() => {
                    publish_at = None;
                    if out.publish(&state.model) {
                        debug!(revision = out.current().revision, nodes = state.model.nodes.len(),
                            local_pods = state.model.local_pods.len(), pods = state.model.pods.len(),
                            namespaces = state.model.namespaces.len(),
                            network_policies = state.model.network_policies.len(),
                            "cluster model published");
                    }
                }
            }
        }
        drop(tasks);
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await
    }
}

impl StateSource for KubeSource {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn run(self: Box<Self>, out: Publisher) -> BoxFuture<'static, ()> {
        Box::pin(self.run_loop(out))
    }
}

struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// What a kind's watcher reports to the model task.
#[derive(Debug)]
enum Ev {
    /// A (re)list starts.
    Init,
    InitApply(Object),
    /// The list is complete: it replaces the kind's objects.
    InitDone,
    Apply(Object),
    Delete(Object),
    /// The watch failed; it is retried with back-off (`relist`: from a fresh list).
    Failed {
        error: String,
        relist: bool,
    },
}

#[derive(Debug)]
struct KindEvent {
    kind: Kind,
    ev: Ev,
}

/// Runs the watcher of one kind until the model task is gone.
async fn watch_kind<K>(
    api: Api<K>,
    kind: Kind,
    cfg: watcher::Config,
    wrap: fn(K) -> Object,
    node: String,
    tx: mpsc::Sender<KindEvent>,
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut restart_delay = Duration::ZERO;
    let mut last_restart: Option<Instant> = None;
    loop {
        let mut stream = watcher(api.clone(), cfg.clone()).default_backoff().boxed();
        loop {
            let ev = match stream.try_next().await {
                Ok(Some(e)) => match e {
                    watcher::Event::Init => Ev::Init,
                    watcher::Event::InitApply(o) => Ev::InitApply(wrap(o).slim(&node)),
                    watcher::Event::InitDone => Ev::InitDone,
                    watcher::Event::Apply(o) => Ev::Apply(wrap(o).slim(&node)),
                    watcher::Event::Delete(o) => Ev::Delete(wrap(o)),
                },
                // The watcher never ends by itself; if it did, start a new one.
                Ok(None) => break,
                Err(e) => {
                    // kube-rs relists by itself after a 410 ERROR event, not after a watch request
                    // refused with HTTP 410 or a 410 Status in the stream.
                    let relist = is_gone(&e) && !matches!(e, watcher::Error::WatchError(_));
                    let ev = Ev::Failed {
                        error: e.to_string(),
                        relist: relist || is_gone(&e),
                    };
                    if tx.send(KindEvent { kind, ev }).await.is_err() {
                        return;
                    }
                    if relist {
                        break;
                    }
                    continue;
                }
            };
            if tx.send(KindEvent { kind, ev }).await.is_err() {
                return;
            }
        }
        // Restarting lists at once; repeated restarts back off (200 ms doubling to 30 s).
        restart_delay = match last_restart {
            Some(t) if t.elapsed() < Duration::from_secs(60) => {
                (restart_delay * 2).clamp(Duration::from_millis(200), Duration::from_secs(30))
            }
            _ => Duration::ZERO,
        };
        last_restart = Some(Instant::now());
        tokio::time::sleep(restart_delay).await;
    }
}

/// Whether the error is a `410 Gone` (the resourceVersion is no longer available).
fn is_gone(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(s) => s.code == 410,
        watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::InitialListFailed(kube::Error::Api(s)) => s.code == 410,
        _ => false,
    }
}

/// The model as the watch events build it.
struct ModelState {
    node: String,
    model: ClusterModel,
    /// Objects of lists in progress, by kind.
    pending: BTreeMap<Kind, Vec<Object>>,
    /// Kinds listed at least once.
    listed: BTreeSet<Kind>,
    /// Kinds whose watch is failing (for the "resumed" log line).
    failing: BTreeSet<Kind>,
}

impl ModelState {
    fn new(node: String) -> ModelState {
        ModelState {
            node,
            model: ClusterModel::default(),
            pending: BTreeMap::new(),
            listed: BTreeSet::new(),
            failing: BTreeSet::new(),
        }
    }

    /// Applies one event; returns whether the model may have changed.
    fn apply(&mut self, KindEvent { kind, ev }: KindEvent) -> bool {
        let what = kind.plural();
        if !matches!(ev, Ev::Failed { .. }) && self.failing.remove(&kind) {
            info!("watch of {what} resumed");
        }
        match ev {
            Ev::Init => {
                if self.listed.contains(&kind) {
                    info!("relisting {what}");
                } else {
                    debug!("listing {what}");
                }
                self.pending.insert(kind, Vec::new());
                false
            }
            Ev::InitApply(obj) => {
                self.pending.entry(kind).or_default().push(obj);
                false
            }
            Ev::InitDone => {
                let objs = self.pending.remove(&kind).unwrap_or_default();
                self.model.replace_kind(kind, objs, &self.node);
                let first = self.listed.insert(kind);
                info!(
                    count = self.model.count(kind),
                    "{} {what}",
                    if first { "listed" } else { "relisted" }
                );
                if !self.model.synced && self.listed.len() == Kind::ALL.len() {
                    self.model.synced = true;
                    info!(
                        nodes = self.model.nodes.len(),
                        local_pods = self.model.local_pods.len(),
                        pods = self.model.pods.len(),
                        namespaces = self.model.namespaces.len(),
                        network_policies = self.model.network_policies.len(),
                        "cluster model synced"
                    );
                }
                true
            }
            Ev::Apply(obj) => {
                debug!("{} {} applied", kind.kind(), obj.display_name());
                self.model.upsert(obj, &self.node);
                true
            }
            Ev::Delete(obj) => {
                debug!("{} {} deleted", kind.kind(), obj.display_name());
                self.model.remove(&obj);
                true
            }
            Ev::Failed { error, relist } => {
                self.failing.insert(kind);
                if relist {
                    info!(error, "watch of {what} expired; relisting");
                } else {
                    warn!(error, "watch of {what} failed; retrying with back-off");
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: &str) -> Object {
        Object::Node(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name}, "spec": {"podCIDR": cidr}
            }))
            .unwrap(),
        )
    }

    fn pod(ns: &str, name: &str, node: &str) -> Object {
        Object::Pod(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
                "spec": {"nodeName": node, "containers": []}
            }))
            .unwrap(),
        )
    }

    fn ev(kind: Kind, ev: Ev) -> KindEvent {
        KindEvent { kind, ev }
    }

    #[test]
    fn lists_replace_and_events_update() {
        let mut s = ModelState::new("n1".into());
        assert!(!s.apply(ev(Kind::Node, Ev::Init)));
        assert!(!s.apply(ev(Kind::Node, Ev::InitApply(node("a", "10.2.1.0/24")))));
        assert!(s.apply(ev(Kind::Node, Ev::InitDone)));
        assert!(!s.model.synced, "pods not listed yet");
        s.apply(ev(Kind::Pod, Ev::Init));
        s.apply(ev(Kind::Pod, Ev::InitApply(pod("ns", "p1", "n1"))));
        s.apply(ev(Kind::Pod, Ev::InitApply(pod("ns", "p2", "other"))));
        s.apply(ev(Kind::Pod, Ev::InitDone));
        assert!(!s.model.synced, "namespaces and policies not listed yet");
        for k in [Kind::Namespace, Kind::NetworkPolicy] {
            s.apply(ev(k, Ev::Init));
            s.apply(ev(k, Ev::InitDone));
        }
        assert!(s.model.synced);
        assert_eq!(s.model.local_pods.len(), 1);
        assert_eq!(s.model.pods.len(), 2, "every pod in the policy view");
        assert!(s.model.local_pod_by_uid("uid-p1").is_some());

        // Delete and re-create under the same name.
        s.apply(ev(Kind::Node, Ev::Delete(node("a", "10.2.1.0/24"))));
        assert!(s.model.nodes.is_empty());
        s.apply(ev(Kind::Node, Ev::Apply(node("a", "10.2.9.0/24"))));
        assert_eq!(
            s.model.node_view("a").unwrap().pod_cidrs,
            vec!["10.2.9.0/24".parse().unwrap()]
        );

        // A relist in progress leaves the model alone until complete, then replaces the kind.
        s.apply(ev(Kind::Node, Ev::Init));
        s.apply(ev(Kind::Node, Ev::InitApply(node("b", "10.2.2.0/24"))));
        assert!(s.model.nodes.contains_key("a"));
        s.apply(ev(Kind::Node, Ev::InitDone));
        assert_eq!(s.model.nodes.keys().collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(
            s.model.local_pods.len(),
            1,
            "pods untouched by a node relist"
        );

        // Namespaces and policies: events, then a relist that drops what vanished meanwhile.
        let ns = |name: &str| {
            Object::Namespace(
                serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap(),
            )
        };
        let np = |ns: &str, name: &str| {
            Object::NetworkPolicy(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "namespace": ns}, "spec": {"podSelector": {}}
                }))
                .unwrap(),
            )
        };
        assert!(s.apply(ev(Kind::Namespace, Ev::Apply(ns("x")))));
        assert!(s.apply(ev(Kind::NetworkPolicy, Ev::Apply(np("x", "p1")))));
        s.apply(ev(Kind::NetworkPolicy, Ev::Apply(np("x", "p2"))));
        s.apply(ev(Kind::NetworkPolicy, Ev::Delete(np("x", "p1"))));
        assert_eq!(s.model.network_policies.len(), 1);
        s.apply(ev(
            Kind::NetworkPolicy,
            Ev::Failed {
                error: "gone".into(),
                relist: true,
            },
        ));
        s.apply(ev(Kind::NetworkPolicy, Ev::Init));
        s.apply(ev(Kind::NetworkPolicy, Ev::InitApply(np("y", "p3"))));
        assert_eq!(s.model.network_policies.len(), 1, "old list until done");
        s.apply(ev(Kind::NetworkPolicy, Ev::InitDone));
        assert_eq!(
            s.model.network_policies.keys().cloned().collect::<Vec<_>>(),
            [("y".to_string(), "p3".to_string())]
        );
        assert_eq!(s.model.namespaces.len(), 1);
        // A pod of another node relisted: in the policy view only.
        s.apply(ev(Kind::Pod, Ev::Init));
        s.apply(ev(Kind::Pod, Ev::InitApply(pod("ns", "p9", "other"))));
        s.apply(ev(Kind::Pod, Ev::InitDone));
        assert!(s.model.local_pods.is_empty());
        assert_eq!(s.model.pods.len(), 1);
    }

    #[test]
    fn gone_detection() {
        let status = |code| {
            let mut s = kube::core::Status::failure("too old", "Expired");
            s.code = code;
            Box::new(s)
        };
        assert!(is_gone(&watcher::Error::WatchError(status(410))));
        assert!(is_gone(&watcher::Error::WatchStartFailed(
            kube::Error::Api(status(410))
        )));
        assert!(!is_gone(&watcher::Error::WatchStartFailed(
            kube::Error::Api(status(500))
        )));
        assert!(!is_gone(&watcher::Error::NoResourceVersion));
    }
}
