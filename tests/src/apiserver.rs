//! A small Kubernetes API server for tests: HTTP/1.1 on 127.0.0.1:<ephemeral>, speaking the real
//! list/watch protocol (REFERENCE §10) for core/v1 Nodes, Pods and Namespaces and
//! networking.k8s.io/v1 NetworkPolicies.
//!
//! * `GET /api/v1/<plural>` and `GET /api/v1/namespaces/<ns>/<plural>` (and
//!   `/apis/<group>/<version>/…` for grouped kinds): a `<Kind>List` with
//!   `metadata.resourceVersion`; items without `apiVersion`/`kind`, as the real server writes them.
//!   `fieldSelector` (`a.b=v`, `a.b==v`, `a.b!=v`, comma-joined) and `labelSelector` (`k=v`,
//!   `k!=v`, `k`, `!k`) are honoured; `limit` is ignored (everything in one page).
//! * `?watch=1|true&resourceVersion=<rv>&allowWatchBookmarks=true&timeoutSeconds=<s>`: a chunked
//!   stream of JSON lines `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":{…}}`.
//!   Events after `<rv>` are replayed from history, then live ones follow; `rv` empty or `0`
//!   starts with an ADDED per existing object. An object that starts or stops matching the field
//!   selector shows up as ADDED / DELETED, as on the real server. A `resourceVersion` older than
//!   the compacted history answers `410 Gone`: by default an ERROR event whose object is a `Status`
//!   with `code: 410, reason: "Expired"` (what the real server sends), or, with
//!   [`ApiServer::set_gone_as_http`], an HTTP 410 response with that `Status` body.
//! * `GET /version`, `GET /api`, and `GET` of single objects.
//!
//! Test controls: [`ApiServer::apply`] / [`ApiServer::delete`] (pushed to open watches),
//! [`ApiServer::expire_history`], [`ApiServer::bookmark`], [`ApiServer::stop`] /
//! [`ApiServer::resume`] / [`ApiServer::restart`] (drop every connection, listen again on the same
//! port), and counters of list and watch requests.
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};

/// The resources the server knows: (plural, kind, namespaced, apiVersion).
const RESOURCES: &[(&str, &str, bool, &str)] = &[
    ("nodes", "Node", false, "v1"),
    ("pods", "Pod", true, "v1"),
    ("namespaces", "Namespace", false, "v1"),
    (
        "networkpolicies",
        "NetworkPolicy",
        true,
        "networking.k8s.io/v1",
    ),
];

fn resource_of_kind(kind: &str) -> Option<(&'static str, &'static str, bool)> {
    RESOURCES
        .iter()
        .find(|r| r.1 == kind)
        .map(|r| (r.0, r.1, r.2))
}

fn resource_of_plural(plural: &str) -> Option<(&'static str, &'static str, bool)> {
    RESOURCES
        .iter()
        .find(|r| r.0 == plural)
        .map(|r| (r.0, r.1, r.2))
}

/// `apiVersion` of a known plural.
fn api_version_of(plural: &str) -> &'static str {
    RESOURCES
        .iter()
        .find(|r| r.0 == plural)
        .map_or("v1", |r| r.3)
}

/// The bearer token written into the kubeconfig (the server accepts any or none).
pub const TOKEN: &str = "berth-test-apiserver-token";

type Body = BoxBody<Bytes, Infallible>;

/// Identity of a stored object: (plural, namespace or "", name).
type Key = (&'static str, String, String);

/// One change, kept for replay to watches that resume from an older resourceVersion.
#[derive(Clone)]
struct Change {
    rv: u64,
    plural: &'static str,
    /// The object before (None: created).
    old: Option<Value>,
    /// The object after (None: deleted; the deletion's resourceVersion is then in `old`).
    new: Option<Value>,
}

struct Watch {
    plural: &'static str,
    namespace: Option<String>,
    selector: Selector,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

struct State {
    rv: u64,
    /// History before and at this version is gone: watching from an older version is 410.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    watches: Vec<Watch>,
    lists: BTreeMap<&'static str, u64>,
    watch_requests: BTreeMap<&'static str, u64>,
    gone_as_http: bool,
    uid_seq: u64,
    /// Every (verb, API group, resource) asked for, allowed or not.
    requests: std::collections::BTreeSet<Access>,
    /// When set, requests outside these rules get 403 Forbidden, as with RBAC.
    rbac: Option<Vec<RbacRule>>,
}

/// One resource request as RBAC sees it: (verb: get|list|watch, API group ("" for core),
/// resource plural).
pub type Access = (String, String, String);

/// A ClusterRole rule (`apiGroups`, `resources`, `verbs`; `*` matches anything).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RbacRule {
    #[serde(default)]
    pub api_groups: Vec<String>,
    #[serde(default)]
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
}

impl RbacRule {
    pub fn allows(&self, (verb, group, resource): &Access) -> bool {
        let has = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        has(&self.verbs, verb) && has(&self.api_groups, group) && has(&self.resources, resource)
    }
}

struct Serving {
    accept: JoinHandle<()>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
}

/// The test API server. Dropping it stops it.
pub struct ApiServer {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    serving: Mutex<Option<Serving>>,
}

impl ApiServer {
    /// Starts listening on 127.0.0.1 with an ephemeral port.
    pub async fn start() -> ApiServer {
        let state = Arc::new(Mutex::new(State {
            rv: 100,
            compacted: 100,
            objects: BTreeMap::new(),
            history: Vec::new(),
            watches: Vec::new(),
            lists: BTreeMap::new(),
            watch_requests: BTreeMap::new(),
            gone_as_http: false,
            uid_seq: 0,
            requests: Default::default(),
            rbac: None,
        }));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await;
        let addr = listener.local_addr().unwrap();
        let server = ApiServer {
            state,
            addr,
            serving: Mutex::new(None),
        };
        server.serve(listener);
        server
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at this server (plain HTTP, a dummy bearer token).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n\
             users:\n- name: test\n  user:\n    token: {TOKEN}\ncontexts:\n- name: test\n  context:\n    \
             cluster: test\n    user: test\ncurrent-context: test\n",
            self.url()
        )
    }

    /// Writes [`ApiServer::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) {
        std::fs::write(path, self.kubeconfig()).unwrap();
    }

    /// Creates or replaces an object (by kind, namespace, name): ADDED or MODIFIED. Sets
    /// `metadata.resourceVersion`, and `uid` and `creationTimestamp` on creation unless given.
    /// Returns the new resourceVersion.
    pub fn apply(&self, obj: impl serde::Serialize) -> u64 {
        let mut obj = serde_json::to_value(obj).unwrap();
        let kind = obj["kind"]
            .as_str()
            .expect("object without kind")
            .to_string();
        let (plural, _, namespaced) =
            resource_of_kind(&kind).unwrap_or_else(|| panic!("unsupported kind {kind}"));
        obj["apiVersion"] = json!(api_version_of(plural));
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("object without metadata.name")
            .to_string();
        let ns = if namespaced {
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            obj["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            String::new()
        };
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let key = (plural, ns, name);
        let old = st.objects.get(&key).cloned();
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        match &old {
            Some(o) => {
                if meta.get("uid").is_none() {
                    meta["uid"] = o["metadata"]["uid"].clone();
                }
                if meta.get("creationTimestamp").is_none() {
                    meta["creationTimestamp"] = o["metadata"]["creationTimestamp"].clone();
                }
            }
            None => {
                if meta.get("uid").is_none() {
                    st.uid_seq += 1;
                    meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012}", st.uid_seq));
                }
                if meta.get("creationTimestamp").is_none() {
                    meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                }
            }
        }
        st.objects.insert(key, obj.clone());
        st.record(Change {
            rv,
            plural,
            old,
            new: Some(obj),
        });
        rv
    }

    /// Deletes an object: DELETED. Returns false when it did not exist.
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> bool {
        let (plural, _, namespaced) =
            resource_of_kind(kind).unwrap_or_else(|| panic!("unsupported kind {kind}"));
        let ns = if namespaced {
            namespace.unwrap_or("default").to_string()
        } else {
            String::new()
        };
        let mut st = self.state.lock().unwrap();
        let Some(mut old) = st.objects.remove(&(plural, ns, name.to_string())) else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.record(Change {
            rv,
            plural,
            old: Some(old),
            new: None,
        });
        true
    }

    /// The stored object, if any.
    pub fn get(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let (plural, _, namespaced) = resource_of_kind(kind)?;
        let ns = if namespaced {
            namespace.unwrap_or("default").to_string()
        } else {
            String::new()
        };
        let st = self.state.lock().unwrap();
        st.objects.get(&(plural, ns, name.to_string())).cloned()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state.lock().unwrap().rv
    }

    /// Compacts the history: every watch from an older version now gets 410 Gone. Open watches
    /// receive an ERROR event (`410`, `Expired`) and end, as when the real server's watch cache
    /// falls too far behind.
    pub fn expire_history(&self) {
        let mut st = self.state.lock().unwrap();
        st.compacted = st.rv;
        st.history.clear();
        let line = event_line("ERROR", &gone_status());
        for w in st.watches.drain(..) {
            let _ = w.tx.send(line.clone());
        }
    }

    /// Answer watches from a compacted version with HTTP 410 (true) or with a 200 and an ERROR
    /// event (false, the default, what the real server does).
    pub fn set_gone_as_http(&self, http: bool) {
        self.state.lock().unwrap().gone_as_http = http;
    }

    /// Sends a BOOKMARK with the current resourceVersion to every open watch that allowed them.
    /// Returns how many watches got one.
    pub fn bookmark(&self) -> usize {
        let mut st = self.state.lock().unwrap();
        let rv = st.rv.to_string();
        st.watches.retain(|w| !w.tx.is_closed());
        let mut n = 0;
        for w in &st.watches {
            if !w.bookmarks {
                continue;
            }
            let (_, kind, _) = resource_of_plural(w.plural).unwrap();
            let obj = json!({"kind": kind, "apiVersion": api_version_of(w.plural),
                "metadata": {"resourceVersion": rv,
                    "annotations": {"k8s.io/initial-events-end": "false"}}});
            if w.tx.send(event_line("BOOKMARK", &obj)).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// List requests received for `plural` (`"nodes"`, `"pods"`).
    pub fn list_count(&self, plural: &str) -> u64 {
        let st = self.state.lock().unwrap();
        st.lists.get(plural).copied().unwrap_or(0)
    }

    /// Watch requests received for `plural`.
    pub fn watch_count(&self, plural: &str) -> u64 {
        let st = self.state.lock().unwrap();
        st.watch_requests.get(plural).copied().unwrap_or(0)
    }

    /// Watches of `plural` currently open.
    pub fn open_watches(&self, plural: &str) -> usize {
        let mut st = self.state.lock().unwrap();
        st.watches.retain(|w| !w.tx.is_closed());
        st.watches.iter().filter(|w| w.plural == plural).count()
    }

    /// Enforces `rules` from now on: a request they do not allow gets 403 Forbidden (the real
    /// server's RBAC answer), and is still recorded in [`ApiServer::requests`].
    pub fn enforce_rbac(&self, rules: Vec<RbacRule>) {
        self.state.lock().unwrap().rbac = Some(rules);
    }

    /// Every resource request so far, as (verb, API group, resource).
    pub fn requests(&self) -> Vec<Access> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .cloned()
            .collect()
    }

    /// Stops listening and drops every connection (open watches break mid-stream). The state
    /// (objects, history, resourceVersion) is kept.
    pub async fn stop(&self) {
        let accept = self.abort_all();
        if let Some(accept) = accept {
            // Wait until the listener is closed, so the port can be bound again.
            let _ = accept.await;
        }
    }

    fn abort_all(&self) -> Option<JoinHandle<()>> {
        let s = self.serving.lock().unwrap().take()?;
        s.accept.abort();
        for c in s.conns.lock().unwrap().drain(..) {
            c.abort();
        }
        self.state.lock().unwrap().watches.clear();
        Some(s.accept)
    }

    /// Listens again on the same port (after [`ApiServer::stop`]).
    pub async fn resume(&self) {
        if self.serving.lock().unwrap().is_some() {
            return;
        }
        let listener = bind(self.addr).await;
        self.serve(listener);
    }

    /// [`ApiServer::stop`], then [`ApiServer::resume`]: an API server restart.
    pub async fn restart(&self) {
        self.stop().await;
        self.resume().await;
    }

    fn serve(&self, listener: TcpListener) {
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let state = self.state.clone();
        let conns2 = conns.clone();
        let accept = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        eprintln!("apiserver: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let state = state.clone();
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(&state, req)) }
                });
                let conn = tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                let mut conns = conns2.lock().unwrap();
                conns.retain(|c| !c.is_finished());
                conns.push(conn.abort_handle());
            }
        });
        *self.serving.lock().unwrap() = Some(Serving { accept, conns });
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.abort_all();
    }
}

async fn bind(addr: SocketAddr) -> TcpListener {
    // SO_REUSEADDR: listen again on the port right after a restart (connections in TIME_WAIT).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        match socket.bind(addr).and_then(|()| socket.listen(128)) {
            Ok(l) => return l,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("apiserver: binding {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("apiserver: binding {addr}: {e}"),
        }
    }
}

impl State {
    /// Records a change and pushes it to the open watches.
    fn record(&mut self, change: Change) {
        self.watches.retain(|w| {
            let Some(line) = w.line_for(&change) else {
                return !w.tx.is_closed();
            };
            w.tx.send(line).is_ok()
        });
        self.history.push(change);
    }
}

impl Watch {
    /// The event this watch sees for `change`, if any.
    fn line_for(&self, change: &Change) -> Option<Bytes> {
        if change.plural != self.plural {
            return None;
        }
        let matches = |o: &Option<Value>| {
            o.as_ref().is_some_and(|o| {
                self.namespace
                    .as_ref()
                    .is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
                    && self.selector.matches(o)
            })
        };
        let (was, is) = (matches(&change.old), matches(&change.new));
        let (typ, obj) = match (&change.new, was, is) {
            (None, true, _) => ("DELETED", change.old.as_ref()?),
            (None, false, _) => return None,
            (Some(new), false, true) => ("ADDED", new),
            (Some(new), true, true) => ("MODIFIED", new),
            (Some(new), true, false) => ("DELETED", new),
            (Some(_), false, false) => return None,
        };
        Some(event_line(typ, obj))
    }
}

fn event_line(typ: &str, obj: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": typ, "object": obj})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

fn gone_status() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version", "reason": "Expired", "code": 410})
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    json_response(code, &body)
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed())
        .unwrap()
}

/// Field or label selector terms: (path or label, operator, value).
#[derive(Default, Clone)]
struct Selector {
    fields: Vec<(Vec<String>, bool, String)>,
    labels: Vec<(String, LabelOp)>,
}

#[derive(Clone)]
enum LabelOp {
    Eq(String),
    Ne(String),
    Exists,
    NotExists,
}

impl Selector {
    fn parse(fields: Option<&str>, labels: Option<&str>) -> Result<Selector, String> {
        let mut sel = Selector::default();
        for term in fields.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
            let (path, eq, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once("==") {
                (p, true, v)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            let path = path.trim().split('.').map(str::to_string).collect();
            sel.fields.push((path, eq, value.trim().to_string()));
        }
        for term in labels.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
            let term = term.trim();
            let (key, op) = if let Some((k, v)) = term.split_once("!=") {
                (k, LabelOp::Ne(v.trim().into()))
            } else if let Some((k, v)) = term.split_once("==") {
                (k, LabelOp::Eq(v.trim().into()))
            } else if let Some((k, v)) = term.split_once('=') {
                (k, LabelOp::Eq(v.trim().into()))
            } else if let Some(k) = term.strip_prefix('!') {
                (k, LabelOp::NotExists)
            } else {
                (term, LabelOp::Exists)
            };
            sel.labels.push((key.trim().to_string(), op));
        }
        Ok(sel)
    }

    fn matches(&self, obj: &Value) -> bool {
        self.fields.iter().all(|(path, eq, value)| {
            let mut v = obj;
            for p in path {
                v = &v[p.as_str()];
            }
            // A missing field compares as the empty string (spec.nodeName of an unscheduled pod).
            let actual = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (actual == *value) == *eq
        }) && self.labels.iter().all(|(k, op)| {
            let actual = obj["metadata"]["labels"][k.as_str()].as_str();
            match op {
                LabelOp::Eq(v) => actual == Some(v.as_str()),
                LabelOp::Ne(v) => actual != Some(v.as_str()),
                LabelOp::Exists => actual.is_some(),
                LabelOp::NotExists => actual.is_none(),
            }
        })
    }
}

fn query_params(query: Option<&str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(percent_decode(k), percent_decode(v));
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let params = query_params(req.uri().query());
    if req.method() != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "only GET is served",
        );
    }
    if path == "/version" {
        return json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-berth-test",
                "platform": "linux/amd64"}),
        );
    }
    if path == "/api" {
        return json_response(
            StatusCode::OK,
            &json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": []}),
        );
    }
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    // api/v1/… (core) or apis/<group>/<version>/… (named groups), then
    // <plural>[/<name>] or namespaces/<ns>/<plural>[/<name>]
    let (group_version, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => (String::new(), &segs[..0]),
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
    };
    let Some((plural, kind, namespaced)) =
        resource_of_plural(plural).filter(|r| api_version_of(r.0) == group_version)
    else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if namespace.is_some() && !namespaced {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "not a namespaced resource",
        );
    }
    let watch = matches!(params.get("watch").map(String::as_str), Some("1" | "true"));
    {
        let verb = match (name.is_some(), watch) {
            (true, _) => "get",
            (false, true) => "watch",
            (false, false) => "list",
        };
        let group = group_version.rsplit_once('/').map_or("", |(g, _)| g);
        let access: Access = (verb.into(), group.into(), plural.into());
        let mut st = state.lock().unwrap();
        st.requests.insert(access.clone());
        if st
            .rbac
            .as_ref()
            .is_some_and(|rules| !rules.iter().any(|r| r.allows(&access)))
        {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!(
                    "{plural} is forbidden: cannot {verb} resource \"{plural}\" in API group \"{group}\""
                ),
            );
        }
    }
    if let Some(name) = name {
        let st = state.lock().unwrap();
        let key = (
            plural,
            namespace.unwrap_or("").to_string(),
            name.to_string(),
        );
        return match st.objects.get(&key) {
            Some(o) => json_response(StatusCode::OK, o),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{plural} \"{name}\" not found"),
            ),
        };
    }
    let selector = match Selector::parse(
        params.get("fieldSelector").map(String::as_str),
        params.get("labelSelector").map(String::as_str),
    ) {
        Ok(s) => s,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    let in_scope = |o: &Value| {
        namespace.is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
            && selector.matches(o)
    };
    let mut st = state.lock().unwrap();
    if !watch {
        *st.lists.entry(plural).or_default() += 1;
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|(k, o)| k.0 == plural && in_scope(o))
            .map(|(_, o)| {
                let mut o = o.clone();
                let m = o.as_object_mut().unwrap();
                m.remove("kind");
                m.remove("apiVersion");
                o
            })
            .collect();
        let body = json!({"kind": format!("{kind}List"), "apiVersion": group_version,
            "metadata": {"resourceVersion": st.rv.to_string()}, "items": items});
        return json_response(StatusCode::OK, &body);
    }

    *st.watch_requests.entry(plural).or_default() += 1;
    let from = params
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or("");
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let w = Watch {
        plural,
        namespace: namespace.map(str::to_string),
        selector: selector.clone(),
        bookmarks: matches!(
            params.get("allowWatchBookmarks").map(String::as_str),
            Some("true" | "1")
        ),
        tx,
    };
    if from.is_empty() || from == "0" {
        for (_, o) in st
            .objects
            .iter()
            .filter(|(k, o)| k.0 == plural && in_scope(o))
        {
            let _ = w.tx.send(event_line("ADDED", o));
        }
        st.watches.push(w);
    } else {
        let Ok(from) = from.parse::<u64>() else {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("invalid resourceVersion {from:?}"),
            );
        };
        if from < st.compacted {
            if st.gone_as_http {
                return json_response(StatusCode::GONE, &gone_status());
            }
            // The real server: 200, one ERROR event, end of stream.
            let _ = w.tx.send(event_line("ERROR", &gone_status()));
            drop(w);
        } else {
            for c in st.history.iter().filter(|c| c.rv > from) {
                if let Some(line) = w.line_for(c) {
                    let _ = w.tx.send(line);
                }
            }
            st.watches.push(w);
        }
    }
    drop(st);
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1800);
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
        .take_until(tokio::time::sleep(Duration::from_secs(timeout)))
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}
