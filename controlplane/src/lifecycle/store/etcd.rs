//! The etcd v3 store (the `etcd-client` crate over tonic). Every call has a deadline, so an etcd
//! that lost its quorum makes calls fail instead of hang; `require_leader` makes members without a
//! leader refuse at once (and cancels their watches) instead of answering from a stale copy.
use std::time::Duration;

use etcd_client::{
    Client, Compare as ECompare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions,
    TxnOp, WatchOptions,
};
use tokio::sync::mpsc;

use super::{
    Compare, Kv, Op, Store, Txn, TxnOutcome, WATCH_BUFFER, WatchEvent, WatchMessage, WatchReceiver,
    prefix_end,
};
use crate::{Error, Result};

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// `http://host:port` (or `host:port`) of the members.
    pub endpoints: Vec<String>,
    /// Deadline of each call.
    pub timeout: Duration,
    /// TLS: CA of the members' certificates, and the client certificate and key for mTLS.
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

/// See the module documentation.
pub struct EtcdStore {
    client: Client,
    config: EtcdConfig,
}

fn err(what: &str, e: etcd_client::Error) -> Error {
    Error::Store(format!("etcd {what}: {e}"))
}

fn kv_of(kv: &etcd_client::KeyValue) -> Kv {
    Kv {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

impl EtcdStore {
    /// Connects lazily: an unreachable etcd is not an error here (calls fail and the registry
    /// retries), a malformed endpoint or unreadable TLS file is.
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        if config.endpoints.is_empty() {
            return Err(Error::Config("no etcd endpoint".into()));
        }
        let tls = config.ca.is_some() || config.cert.is_some();
        let endpoints: Vec<String> = config
            .endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else if tls {
                    format!("https://{e}")
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        let mut opts = ConnectOptions::new()
            .with_timeout(config.timeout)
            .with_connect_timeout(config.timeout)
            .with_keep_alive(Duration::from_secs(5), config.timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if tls {
            let read = |p: &std::path::PathBuf| {
                std::fs::read(p).map_err(|e| Error::Config(format!("{}: {e}", p.display())))
            };
            let mut t = etcd_client::TlsOptions::new();
            if let Some(ca) = &config.ca {
                t = t.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            }
            match (&config.cert, &config.key) {
                (Some(c), Some(k)) => {
                    t = t.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
                }
                (None, None) => {}
                _ => {
                    return Err(Error::Config(
                        "--etcd-cert and --etcd-key go together".into(),
                    ));
                }
            }
            opts = opts.with_tls(t);
        }
        let client = Client::connect(&endpoints, Some(opts))
            .await
            .map_err(|e| Error::Config(format!("etcd endpoints {endpoints:?}: {e}")))?;
        Ok(Self { client, config })
    }

    async fn deadline<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.config.timeout, f).await {
            Ok(r) => r.map_err(|e| err(what, e)),
            Err(_) => Err(Error::Store(format!(
                "etcd {what}: no answer within {:?}",
                self.config.timeout
            ))),
        }
    }
}

fn compare(c: &Compare) -> ECompare {
    match c {
        Compare::ModRevision { key, rev } => {
            ECompare::mod_revision(key.as_bytes(), CompareOp::Equal, *rev)
        }
        Compare::CreateRevision { key, rev } => {
            ECompare::create_revision(key.as_bytes(), CompareOp::Equal, *rev)
        }
        // Every key of the range must hold (a range without keys compares as revision 0).
        Compare::PrefixUnchangedSince { prefix, rev } => {
            ECompare::mod_revision(prefix.as_bytes(), CompareOp::Less, rev + 1)
                .with_range(prefix_end(prefix))
        }
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd {}", self.config.endpoints.join(","))
    }

    fn shared(&self) -> bool {
        true
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<Kv>, i64)> {
        let mut kv = self.client.kv_client();
        let resp = self
            .deadline(
                "range",
                kv.get(prefix, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        Ok((resp.kvs().iter().map(kv_of).collect(), rev))
    }

    async fn get(&self, key: &str) -> Result<Option<Kv>> {
        let mut kv = self.client.kv_client();
        let resp = self.deadline("get", kv.get(key, None)).await?;
        Ok(resp.kvs().first().map(kv_of))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        let compares: Vec<ECompare> = txn.compares.iter().map(compare).collect();
        let ops: Vec<TxnOp> = txn
            .ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => {
                    let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
                    TxnOp::put(key, value, opts)
                }
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        let mut kv = self.client.kv_client();
        let resp = self
            .deadline(
                "txn",
                kv.txn(etcd_client::Txn::new().when(compares).and_then(ops)),
            )
            .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        Ok(if resp.succeeded() {
            TxnOutcome::Committed(rev)
        } else {
            TxnOutcome::Conflict(rev)
        })
    }

    async fn watch(&self, prefix: &str, from: i64) -> Result<WatchReceiver> {
        let mut wc = self.client.watch_client();
        let opts = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = self.deadline("watch", wc.watch(prefix, Some(opts))).await?;
        // The first answer confirms the watch (or says the revision was compacted).
        let first = self.deadline("watch", stream.message()).await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        match first {
            Some(r) if r.canceled() => {
                if r.compact_revision() > 0 {
                    let _ = tx.try_send(Ok(WatchMessage::Compacted));
                    return Ok(rx);
                }
                return Err(Error::Store(format!(
                    "etcd watch refused: {}",
                    r.cancel_reason()
                )));
            }
            Some(_) => {}
            None => return Err(Error::Store("etcd watch: stream closed".into())),
        }
        tokio::spawn(async move {
            loop {
                let msg = match stream.message().await {
                    Ok(Some(r)) if r.canceled() => {
                        if r.compact_revision() > 0 {
                            Ok(WatchMessage::Compacted)
                        } else {
                            Err(Error::Store(format!(
                                "etcd watch cancelled: {}",
                                r.cancel_reason()
                            )))
                        }
                    }
                    Ok(Some(r)) => {
                        let events: Vec<WatchEvent> = r
                            .events()
                            .iter()
                            .filter_map(|e| {
                                let kv = e.kv()?;
                                Some(match e.event_type() {
                                    EventType::Put => WatchEvent::Put(kv_of(kv)),
                                    EventType::Delete => WatchEvent::Delete {
                                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                                        mod_revision: kv.mod_revision(),
                                    },
                                })
                            })
                            .collect();
                        if events.is_empty() {
                            continue;
                        }
                        Ok(WatchMessage::Events(events))
                    }
                    Ok(None) => Err(Error::Store("etcd watch: stream ended".into())),
                    Err(e) => Err(err("watch", e)),
                };
                let last = !matches!(msg, Ok(WatchMessage::Events(_)));
                // Bounded: a slow reader holds back the stream (gRPC flow control), never memory.
                if tx.send(msg).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn grant(&self, ttl_secs: i64) -> Result<i64> {
        let mut lc = self.client.lease_client();
        let resp = self
            .deadline("lease grant", lc.grant(ttl_secs, None))
            .await?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: i64) -> Result<bool> {
        let mut lc = self.client.lease_client();
        match tokio::time::timeout(self.config.timeout, lc.keep_alive(lease)).await {
            Ok(Ok(_)) => Ok(true),
            // The client reports a TTL of 0 (lease gone) as this error.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => {
                Ok(false)
            }
            Ok(Err(e)) => Err(err("lease keep-alive", e)),
            Err(_) => Err(Error::Store(format!(
                "etcd lease keep-alive: no answer within {:?}",
                self.config.timeout
            ))),
        }
    }

    async fn revoke(&self, lease: i64) -> Result<()> {
        let mut lc = self.client.lease_client();
        match self.deadline("lease revoke", lc.revoke(lease)).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }
}
