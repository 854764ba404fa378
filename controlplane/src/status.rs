//! The control plane's status view and admin API over HTTP (axum), and the small HTTP client the
//! `status` / `admin` subcommands use.
use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::IntoResponse,
    routing::{get, post},
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    Error, Result,
    lifecycle::{
        Registry, Strategy, UpgradeRequest,
        machine::{Pdb, Pod},
    },
    tunnel::TunnelServer,
};

#[derive(Clone)]
struct AppState {
    tunnel: Arc<TunnelServer>,
    registry: Arc<Registry>,
}

#[derive(Deserialize)]
struct NodeReq {
    node: String,
    #[serde(default)]
    terminate: bool,
}

fn lifecycle_err(e: Error) -> (StatusCode, String) {
    let code = match e {
        // Nothing was written; the request can be retried.
        Error::Store(_) | Error::Schema { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    };
    (code, format!("{e}\n"))
}

/// Serves the status/admin API until `shutdown` changes.
pub async fn serve(
    listener: TcpListener,
    tunnel: Arc<TunnelServer>,
    registry: Arc<Registry>,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/v1/status",
            get(|State(s): State<AppState>| async move {
                Json(serde_json::json!({
                    "server_id": s.tunnel.config.server_id,
                    "server_count": s.tunnel.config.server_count,
                    "agents": s.tunnel.agents(),
                    "registry": s.registry.status(),
                }))
            }),
        )
        .route(
            "/v1/pods",
            post(
                |State(s): State<AppState>, Json(pods): Json<Vec<Pod>>| async move {
                    s.registry
                        .set_pods(pods)
                        .await
                        .map(|()| "ok\n")
                        .map_err(lifecycle_err)
                },
            ),
        )
        .route(
            "/v1/pdbs",
            post(
                |State(s): State<AppState>, Json(pdbs): Json<Vec<Pdb>>| async move {
                    s.registry
                        .set_pdbs(pdbs)
                        .await
                        .map(|()| "ok\n")
                        .map_err(lifecycle_err)
                },
            ),
        )
        .route(
            "/v1/upgrade",
            post(
                |State(s): State<AppState>, Json(req): Json<UpgradeRequest>| async move {
                    s.registry
                        .upgrade(req)
                        .await
                        .map(|()| "ok\n")
                        .map_err(lifecycle_err)
                },
            ),
        )
        .route(
            "/v1/drain",
            post(
                |State(s): State<AppState>, Json(req): Json<NodeReq>| async move {
                    s.registry
                        .drain(&req.node, req.terminate)
                        .await
                        .map(|()| "ok\n")
                        .map_err(lifecycle_err)
                },
            ),
        )
        .route(
            "/v1/cordon",
            post(
                |State(s): State<AppState>, Json(req): Json<NodeReq>| async move {
                    s.registry
                        .cordon(&req.node, true)
                        .await
                        .map(|()| "ok\n")
                        .map_err(lifecycle_err)
                },
            ),
        )
        .route(
            "/v1/uncordon",
            post(
                |State(s): State<AppState>, Json(req): Json<NodeReq>| async move {
                    s.registry
                        .cordon(&req.node, false)
                        .await
                        .map(|()| "ok\n")
                        .map_err(lifecycle_err)
                },
            ),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n").into_response() })
        .with_state(AppState { tunnel, registry });
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await;
    if let Err(e) = r {
        tracing::error!("status server: {e}");
    }
}

/// A one-shot HTTP/1.1 request to `addr`; returns the status code and body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Error::Http(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| Error::Http(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Error::Http(e.to_string()))?;
    let code = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Error::Http(e.to_string()))?
        .to_bytes();
    Ok((code, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Flags of `berth-controlplane status`.
#[derive(clap::Args, Clone, Debug)]
pub struct StatusArgs {
    /// Status endpoint of the control plane.
    #[arg(long, default_value = "127.0.0.1:8092")]
    pub status_addr: SocketAddr,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
}

/// Fetches and formats the status view.
pub async fn run_status(args: &StatusArgs) -> Result<String> {
    let (code, body) = http_request(args.status_addr, "GET", "/v1/status", None).await?;
    if code != 200 {
        return Err(Error::Http(format!("status {code}: {body}")));
    }
    if args.json {
        return Ok(body + "\n");
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| Error::Http(format!("bad status JSON: {e}")))?;
    Ok(format_status(&v))
}

/// Renders the status JSON as tables.
pub fn format_status(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let s = |x: &serde_json::Value| x.as_str().unwrap_or("").to_string();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "server {} (count {}), plan {}",
        s(&v["server_id"]),
        v["server_count"],
        s(&v["registry"]["plan"])
    );
    let st = &v["registry"]["store"];
    let _ = writeln!(
        out,
        "store {} prefix {} (registry {}, revision {}){}",
        s(&st["backend"]),
        s(&st["prefix"]),
        s(&st["registry_id"]),
        st["revision"],
        if st["reachable"] == false {
            format!(" UNREACHABLE: {}", s(&st["last_error"]))
        } else {
            String::new()
        }
    );
    let c = &v["registry"]["controller"];
    let _ = writeln!(
        out,
        "controller: this replica {}; leader {} (term {}){}",
        s(&c["role"]),
        c["leader"].as_str().unwrap_or("none"),
        c["term"],
        match c["paused"].as_str() {
            Some(r) => format!("; decisions PAUSED: {r}"),
            None => String::new(),
        }
    );
    for r in v["registry"]["replicas"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  replica {:<20} {:<16} report {} ms ago, {} nodes heard",
            s(&r["server_id"]),
            s(&r["role"]),
            r["report_age_ms"],
            r["nodes_heard"]
        );
    }
    let _ = writeln!(out, "\nAGENTS");
    for a in v["agents"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<24} streams={:<5} draining={}",
            s(&a["agent_id"]),
            a["open_streams"],
            a["draining"]
        );
    }
    let _ = writeln!(
        out,
        "\n{:<22} {:<10} {:<8} {:<11} {:<9} {:<8} {:<7} PENDING COMMANDS",
        "NODE", "POOL", "FLAVOR", "STATE", "VERSION", "CORDON", "HB(ms)"
    );
    for n in v["registry"]["nodes"].as_array().into_iter().flatten() {
        let pending: Vec<String> = n["pending_commands"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| s(&c["kind"]))
            .collect();
        let _ = writeln!(
            out,
            "{:<22} {:<10} {:<8} {:<11} {:<9} {:<8} {:<7} {}",
            s(&n["node_name"]),
            s(&n["pool"]),
            s(&n["flavor"]),
            s(&n["state"]),
            s(&n["version"]),
            n["cordoned"],
            n["last_heartbeat_ms_ago"],
            pending.join(",")
        );
    }
    let actions = v["registry"]["pending_actions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let _ = writeln!(out, "\nPENDING ACTIONS ({})", actions.len());
    for a in actions {
        let _ = writeln!(out, "  {a}");
    }
    if !v["registry"]["upgrade"].is_null() {
        let _ = writeln!(out, "\nUPGRADE {}", v["registry"]["upgrade"]);
    }
    out
}

/// Flags of `berth-controlplane admin`.
#[derive(clap::Args, Clone, Debug)]
pub struct AdminArgs {
    #[arg(long, default_value = "127.0.0.1:8092")]
    pub status_addr: SocketAddr,
    #[command(subcommand)]
    pub action: AdminAction,
}

/// Admin actions.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum AdminAction {
    /// Upgrade a node pool.
    Upgrade {
        #[arg(long)]
        pool: String,
        #[arg(long)]
        version: String,
        /// in-place or rolling
        #[arg(long, default_value = "in-place")]
        strategy: String,
        #[arg(long, default_value_t = 1)]
        max_surge: usize,
        #[arg(long, default_value_t = 0)]
        max_unavailable: usize,
    },
    /// Drain a node (respecting PodDisruptionBudgets up to the drain timeout).
    Drain {
        node: String,
        #[arg(long)]
        terminate: bool,
    },
    Cordon {
        node: String,
    },
    Uncordon {
        node: String,
    },
    /// Replace the workload model's pods with a JSON file.
    Pods {
        file: PathBuf,
    },
    /// Replace the PodDisruptionBudgets with a JSON file.
    Pdbs {
        file: PathBuf,
    },
}

/// Sends an admin request.
pub async fn run_admin(args: &AdminArgs) -> Result<String> {
    let (path, body) = match &args.action {
        AdminAction::Upgrade {
            pool,
            version,
            strategy,
            max_surge,
            max_unavailable,
        } => {
            let strategy = match strategy.as_str() {
                "in-place" => Strategy::InPlace,
                "rolling" => Strategy::Rolling {
                    max_surge: *max_surge,
                    max_unavailable: *max_unavailable,
                },
                other => return Err(Error::Config(format!("unknown strategy {other:?}"))),
            };
            let req = UpgradeRequest {
                pool: pool.clone(),
                version: version.clone(),
                strategy,
            };
            ("/v1/upgrade", serde_json::to_string(&req).expect("json"))
        }
        AdminAction::Drain { node, terminate } => (
            "/v1/drain",
            serde_json::json!({"node": node, "terminate": terminate}).to_string(),
        ),
        AdminAction::Cordon { node } => (
            "/v1/cordon",
            serde_json::json!({ "node": node }).to_string(),
        ),
        AdminAction::Uncordon { node } => (
            "/v1/uncordon",
            serde_json::json!({ "node": node }).to_string(),
        ),
        AdminAction::Pods { file } => ("/v1/pods", std::fs::read_to_string(file)?),
        AdminAction::Pdbs { file } => ("/v1/pdbs", std::fs::read_to_string(file)?),
    };
    let (code, text) = http_request(args.status_addr, "POST", path, Some(body)).await?;
    if code != 200 {
        return Err(Error::Http(format!("{code}: {}", text.trim())));
    }
    Ok(text.trim().to_string())
}
