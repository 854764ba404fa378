//! `/metrics` (Prometheus text exposition) and `/healthz` of the agent (DESIGN §9).
//!
//! Metrics are read at scrape time: packet and drop counters from the datapath's per-CPU metrics
//! map (summed over CPUs and endpoints), conntrack occupancy by walking the table's keys, and the
//! agent's own status (endpoints, policy in force, reconcile duration). Names follow Prometheus
//! conventions: the `berth_` prefix, `_total` counters, base units.
use crate::core::AgentCore;
use crate::error::{Error, Result};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap};
use berth_ebpf_common::{
    CtKey, CtValue, MAP_CONNTRACK, MAP_METRICS, MetricKey, MetricValue, drop_reason, metric,
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

/// Counters of the datapath, summed over CPUs and endpoints: kind → (packets, bytes).
#[derive(Debug, Default, Clone)]
pub struct DatapathCounters {
    pub kinds: BTreeMap<u32, (u64, u64)>,
    pub conntrack_entries: u64,
}

/// Reads the datapath's counters from the pins under `pin_root`.
pub fn read_datapath(pin_root: &Path) -> Result<DatapathCounters> {
    let maps = pin_root.join("maps");
    let m: PerCpuHashMap<MapData, MetricKey, MetricValue> = PerCpuHashMap::try_from(
        aya::maps::Map::PerCpuHashMap(MapData::from_pin(maps.join(MAP_METRICS))?),
    )?;
    let mut out = DatapathCounters::default();
    for kv in m.iter() {
        let (k, values) = kv?;
        let e = out.kinds.entry(k.kind).or_default();
        for v in values.iter() {
            e.0 += v.packets;
            e.1 += v.bytes;
        }
    }
    let ct: BpfHashMap<MapData, CtKey, CtValue> = BpfHashMap::try_from(
        aya::maps::Map::LruHashMap(MapData::from_pin(maps.join(MAP_CONNTRACK))?),
    )?;
    out.conntrack_entries = ct.keys().filter(|k| k.is_ok()).count() as u64;
    Ok(out)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: String,
    direction: String,
}

/// The direction a drop reason belongs to (seen from the pod).
fn drop_direction(reason: u32) -> &'static str {
    match reason {
        drop_reason::POLICY_DENIED_INGRESS | drop_reason::ENDPOINT_NOT_READY => "ingress",
        drop_reason::POLICY_FRAGMENT => "any",
        _ => "egress",
    }
}

/// The exposition text for one scrape.
pub fn render(dp: &DatapathCounters, status: &berth_proto::agent::StatusResponse) -> String {
    let mut reg = Registry::with_prefix("berth");
    let get = |k: u32| dp.kinds.get(&k).copied().unwrap_or_default();

    let packets = Family::<DirectionLabel, Counter>::default();
    let bytes = Family::<DirectionLabel, Counter>::default();
    for (dir, kind) in [("egress", metric::TX), ("ingress", metric::RX)] {
        let l = DirectionLabel {
            direction: dir.into(),
        };
        packets.get_or_create(&l).inc_by(get(kind).0);
        bytes.get_or_create(&l).inc_by(get(kind).1);
    }
    reg.register(
        "forwarded_packets",
        "Packets pods sent (egress) and packets delivered to pods (ingress)",
        packets,
    );
    reg.register(
        "forwarded_bytes",
        "Bytes pods sent (egress) and bytes delivered to pods (ingress)",
        bytes,
    );
    let drops = Family::<DropLabels, Counter>::default();
    for r in 1..drop_reason::COUNT {
        drops
            .get_or_create(&DropLabels {
                reason: drop_reason::name(r).into(),
                direction: drop_direction(r).into(),
            })
            .inc_by(get(metric::DROP_BASE + r).0);
    }
    reg.register(
        "dropped_packets",
        "Packets the datapath dropped, by reason",
        drops,
    );
    let counter = |v: u64| {
        let c = Counter::<u64, AtomicU64>::default();
        c.inc_by(v);
        c
    };
    reg.register(
        "policy_allowed_connections",
        "New connections the NetworkPolicy verdict allowed",
        counter(get(metric::POLICY_ALLOWED).0),
    );
    reg.register(
        "conntrack_insert_failures",
        "Connections the conntrack table could not record",
        counter(get(metric::CT_INSERT_FAILED).0),
    );
    reg.register(
        "policy_events_lost",
        "Policy events lost because the ring buffer was full",
        counter(get(metric::EVENTS_LOST).0),
    );
    let gauge = |v: i64| {
        let g = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        g.set(v);
        g
    };
    let pol = status.policy.clone().unwrap_or_default();
    reg.register(
        "conntrack_entries",
        "Connections in the conntrack table",
        gauge(dp.conntrack_entries as i64),
    );
    reg.register(
        "conntrack_capacity",
        "Capacity of the conntrack table",
        gauge(i64::from(pol.conntrack_max)),
    );
    reg.register(
        "endpoints",
        "Local endpoints",
        gauge(i64::from(status.endpoints)),
    );
    reg.register(
        "policy_entries",
        "Entries in the policy map",
        gauge(i64::from(pol.entries)),
    );
    reg.register(
        "policy_identities",
        "Security identities in use",
        gauge(i64::from(pol.identities)),
    );
    reg.register(
        "policy_isolated_endpoints",
        "Local endpoints with ingress or egress isolation",
        gauge(i64::from(pol.isolated_endpoints)),
    );
    reg.register(
        "policy_rejected",
        "NetworkPolicies rejected as invalid",
        gauge(pol.rejected.len() as i64),
    );
    reg.register(
        "policy_revision",
        "Policy revision (bumped on every change written to the maps)",
        gauge(i64::from(pol.revision)),
    );
    let secs = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    secs.set(pol.last_apply_seconds);
    reg.register(
        "policy_reconcile_duration_seconds",
        "Duration of the last policy reconcile pass that wrote to the maps",
        secs,
    );
    let mut text = String::new();
    encode(&mut text, &reg).expect("writing to a String");
    text
}

/// Serves `/metrics` and `/healthz` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, core: Arc<AgentCore>, pin_root: PathBuf) -> Result<()> {
    use http_body_util::Full;
    use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("bind metrics address {addr}"), e))?;
    tracing::info!(%addr, "serving /metrics and /healthz");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let core = core.clone();
        let pin_root = pin_root.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let core = core.clone();
                let pin_root = pin_root.clone();
                async move {
                    let (code, ctype, body) = match req.uri().path() {
                        "/metrics" => {
                            let status = core.status();
                            let dp = tokio::task::spawn_blocking(move || read_datapath(&pin_root))
                                .await
                                .map_err(|e| Error::Datapath(e.to_string()))
                                .and_then(|r| r);
                            match dp {
                                Ok(dp) => (
                                    200,
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                    render(&dp, &status),
                                ),
                                Err(e) => (500, "text/plain", format!("datapath: {e}\n")),
                            }
                        }
                        "/healthz" => {
                            let st = core.status();
                            if st.datapath.is_some_and(|d| d.loaded) {
                                (200, "text/plain", "ok\n".to_string())
                            } else {
                                (503, "text/plain", "datapath not loaded\n".to_string())
                            }
                        }
                        _ => (404, "text/plain", "not found\n".to_string()),
                    };
                    Response::builder()
                        .status(code)
                        .header("content-type", ctype)
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = http1::Builder::new().serve_connection(io, svc).await;
        });
    }
}
