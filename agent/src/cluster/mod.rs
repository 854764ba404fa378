//! Where the desired state comes from (DESIGN §4): one [`StateSource`] seam with two
//! implementations, the Kubernetes API ([`KubeSource`], kube-rs watchers) and a watched directory
//! of manifests ([`ManifestSource`]), both feeding one typed [`ClusterModel`] that the rest of the
//! agent reads from a `tokio::sync::watch` channel without knowing which source fed it.
//!
//! The watched kinds are listed once, in [`Kind`].
mod kube_source;
mod manifest;
mod model;
#[cfg(test)]
mod tests;

pub use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
pub use k8s_openapi::api::networking::v1::NetworkPolicy;
pub use kube_source::KubeSource;
pub use manifest::{ManifestSource, parse_manifest};
pub use model::{ClusterModel, Kind, NamedPort, NodeView, Object, PodInfo};

use crate::error::{Error, Result};
use futures::future::BoxFuture;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Which source feeds the model.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SourceKind {
    /// `kubernetes` when a kubeconfig is given or the agent runs in a pod
    /// (`KUBERNETES_SERVICE_HOST`), else `manifests` when a directory is given, else `none`.
    #[default]
    Auto,
    /// The Kubernetes API (kubeconfig or in-cluster service account).
    Kubernetes,
    /// A watched directory of Kubernetes manifests.
    Manifests,
    /// No source: an empty model (the node serves only its own pods).
    None,
}

/// Where the cluster state comes from: flags of `berth-agent`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SourceArgs {
    /// Source of the cluster state (Nodes, Pods, Namespaces, NetworkPolicies): auto, kubernetes, manifests or none. `auto`
    /// picks kubernetes with a kubeconfig or in a pod, else manifests with --manifests, else none.
    #[arg(long = "source", env = "BERTH_SOURCE", value_enum, default_value_t = SourceKind::Auto)]
    pub source: SourceKind,
    /// Kubeconfig file(s) for the Kubernetes source (`:`-separated as in KUBECONFIG); default:
    /// the in-cluster service account.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Directory of Kubernetes manifests (*.yaml, *.yml, *.json), watched for changes.
    #[arg(long, env = "BERTH_MANIFESTS")]
    pub manifests: Option<PathBuf>,
}

impl SourceArgs {
    /// The source `auto` stands for (other choices unchanged).
    pub fn resolved(&self) -> SourceKind {
        match self.source {
            SourceKind::Auto => {
                if self
                    .kubeconfig
                    .as_ref()
                    .is_some_and(|p| !p.as_os_str().is_empty())
                    || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty())
                {
                    SourceKind::Kubernetes
                } else if self.manifests.is_some() {
                    SourceKind::Manifests
                } else {
                    SourceKind::None
                }
            }
            other => other,
        }
    }
}

/// Publishing end of the model channel, shared by the sources: numbers revisions and drops
/// publications that change nothing.
pub struct Publisher {
    tx: watch::Sender<Arc<ClusterModel>>,
}

impl Publisher {
    fn new(initial: ClusterModel) -> (Publisher, watch::Receiver<Arc<ClusterModel>>) {
        let (tx, rx) = watch::channel(Arc::new(initial));
        (Publisher { tx }, rx)
    }

    /// Publishes `model` as the next revision unless its content equals the current one.
    /// Returns whether it published.
    pub fn publish(&self, model: &ClusterModel) -> bool {
        let revision = {
            let cur = self.tx.borrow();
            if cur.same_content(model) {
                return false;
            }
            cur.revision + 1
        };
        let mut next = model.clone();
        next.revision = revision;
        self.tx.send_replace(Arc::new(next));
        true
    }

    /// The latest published model.
    pub fn current(&self) -> Arc<ClusterModel> {
        self.tx.borrow().clone()
    }

    /// Completes when every receiver is gone: the source should stop.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// How long a source gathers changes before publishing them: bursts (a relist of 1000 nodes, a
/// directory rewritten file by file) cost one publication, and latency stays far below a second.
pub const COALESCE: Duration = Duration::from_millis(30);

/// A source of cluster state. The agent never knows which one fed the model.
pub trait StateSource: Send + 'static {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// Feeds the model through `out` until every receiver is gone.
    fn run(self: Box<Self>, out: Publisher) -> BoxFuture<'static, ()>;
}

/// Starts the configured source on the current tokio runtime and returns the model channel.
///
/// `none`: a channel holding an empty, synced model. Errors (a bad kubeconfig, a missing
/// manifest directory) are returned.
pub async fn start(
    args: &SourceArgs,
    node_name: &str,
) -> Result<watch::Receiver<Arc<ClusterModel>>> {
    if node_name.is_empty() {
        return Err(Error::Config("cluster source: empty node name".into()));
    }
    let kind = args.resolved();
    let (source, initial): (Box<dyn StateSource>, ClusterModel) = match kind {
        SourceKind::Kubernetes => {
            let source = KubeSource::connect(args.kubeconfig.as_deref(), node_name).await?;
            (Box::new(source), ClusterModel::default())
        }
        SourceKind::Manifests => {
            let dir = args.manifests.as_deref().ok_or_else(|| {
                Error::Config("--source manifests needs --manifests <dir>".into())
            })?;
            let (source, initial) = ManifestSource::open(dir, node_name)?;
            (Box::new(source), initial)
        }
        SourceKind::None | SourceKind::Auto => {
            tracing::info!("cluster source: none (empty model)");
            let (out, rx) = Publisher::new(ClusterModel {
                synced: true,
                revision: 1,
                ..Default::default()
            });
            // Keep the sender alive so receivers wait for changes instead of seeing a closed
            // channel.
            tokio::spawn(async move { out.closed().await });
            return Ok(rx);
        }
    };
    let (out, rx) = Publisher::new(initial);
    tracing::info!(
        source = source.name(),
        node = node_name,
        "cluster source started"
    );
    tokio::spawn(source.run(out));
    Ok(rx)
}
