//! HTTP front of the simulator: Keystone v3, Cinder v3, Nova os-volume_attachments, the metadata
//! service and a small admin API (`/sim/...`) for fault injection.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};

use super::{
    Sim,
    clock::iso8601,
    model::{Attachment, Faults, Snapshot, Volume},
};

/// Lowest and highest Cinder v3 microversions served.
pub const VOLUME_MIN_MICROVERSION: (u32, u32) = (3, 0);
pub const VOLUME_MAX_MICROVERSION: (u32, u32) = (3, 70);
/// First microversion that extends an attached (`in-use`) volume.
pub const ONLINE_EXTEND_MICROVERSION: (u32, u32) = (3, 42);

/// An OpenStack-style error answer: `{"<kind>": {"code": N, "message": "..."}}`.
#[derive(Debug)]
pub struct ApiFault {
    status: StatusCode,
    body: Value,
}

impl ApiFault {
    fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        ApiFault {
            status,
            body: json!({ kind: { "code": status.as_u16(), "message": message } }),
        }
    }
    fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "badRequest", m)
    }
    fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "itemNotFound", m)
    }
    fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "computeFault", m)
    }
    fn unauthorized() -> Self {
        ApiFault {
            status: StatusCode::UNAUTHORIZED,
            body: json!({"error": {"code": 401, "title": "Unauthorized",
                "message": "The request you have made requires authentication."}}),
        }
    }
}

impl IntoResponse for ApiFault {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

type ApiResult = Result<Response, ApiFault>;
type S = State<Arc<Sim>>;

fn ok_json(status: StatusCode, v: Value) -> ApiResult {
    Ok((status, axum::Json(v)).into_response())
}

fn parse_body(body: &Bytes) -> Result<Value, ApiFault> {
    serde_json::from_slice(body)
        .map_err(|e| ApiFault::bad_request(format!("Malformed request body: {e}")))
}

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/identity", get(keystone_versions))
        .route("/identity/", get(keystone_versions))
        .route("/identity/v3", get(keystone_version))
        .route("/identity/v3/", get(keystone_version))
        .route("/identity/v3/auth/tokens", post(issue_token))
        .route("/volume", get(cinder_versions))
        .route("/volume/", get(cinder_versions))
        .route("/volume/v3", get(cinder_versions))
        .route("/volume/v3/", get(cinder_versions))
        .route(
            "/volume/v3/{project}/volumes",
            post(create_volume).get(list_volumes_summary),
        )
        .route(
            "/volume/v3/{project}/volumes/detail",
            get(list_volumes_detail),
        )
        .route(
            "/volume/v3/{project}/volumes/{id}",
            get(show_volume).delete(delete_volume),
        )
        .route(
            "/volume/v3/{project}/volumes/{id}/action",
            post(volume_action),
        )
        .route(
            "/volume/v3/{project}/snapshots",
            post(create_snapshot).get(list_snapshots),
        )
        .route("/volume/v3/{project}/snapshots/detail", get(list_snapshots))
        .route(
            "/volume/v3/{project}/snapshots/{id}",
            get(show_snapshot).delete(delete_snapshot),
        )
        .route("/volume/v3/{project}/types", get(list_types))
        .route("/compute", get(nova_versions))
        .route("/compute/", get(nova_versions))
        .route("/compute/v2.1", get(nova_version))
        .route("/compute/v2.1/", get(nova_version))
        .route("/compute/v2.1/servers/{id}", get(show_server))
        .route(
            "/compute/v2.1/servers/{id}/os-volume_attachments",
            get(list_attachments).post(attach),
        )
        .route(
            "/compute/v2.1/servers/{id}/os-volume_attachments/{volume}",
            get(show_attachment).delete(detach),
        )
        .route("/openstack/latest/meta_data.json", get(default_metadata))
        .route(
            "/metadata/{instance}/openstack/latest/meta_data.json",
            get(instance_metadata),
        )
        .route("/sim/faults", post(set_faults).get(get_faults))
        .route("/sim/stats", get(stats))
        .route("/sim/revoke-tokens", post(revoke_tokens))
        .with_state(sim)
}

async fn root(State(sim): S) -> ApiResult {
    ok_json(
        StatusCode::OK,
        json!({"berth-openstack-simulator": {
            "identity": format!("{}/identity/v3", sim.base_url),
            "volume": format!("{}/volume/v3", sim.base_url),
            "compute": format!("{}/compute/v2.1", sim.base_url),
        }}),
    )
}

// ---------------------------------------------------------------- Keystone

fn keystone_version_doc(sim: &Sim) -> Value {
    json!({
        "id": "v3.14",
        "status": "stable",
        "updated": "2020-04-07T00:00:00Z",
        "links": [{"rel": "self", "href": format!("{}/identity/v3/", sim.base_url)}],
        "media-types": [{"base": "application/json",
            "type": "application/vnd.openstack.identity-v3+json"}],
    })
}

async fn keystone_versions(State(sim): S) -> ApiResult {
    ok_json(
        StatusCode::MULTIPLE_CHOICES,
        json!({"versions": {"values": [keystone_version_doc(&sim)]}}),
    )
}

async fn keystone_version(State(sim): S) -> ApiResult {
    ok_json(
        StatusCode::OK,
        json!({"version": keystone_version_doc(&sim)}),
    )
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

fn domain_matches(v: &Value, domain: &str) -> bool {
    // Absent domain: Keystone would refuse a name without one; accept the id or name we serve.
    match v.get("domain") {
        None => v.get("id").is_some(),
        Some(d) => {
            d.get("id").and_then(Value::as_str) == Some("default") && domain == "Default"
                || d.get("name").and_then(Value::as_str) == Some(domain)
                || d.get("id").and_then(Value::as_str) == Some(domain)
        }
    }
}

async fn issue_token(State(sim): S, body: Bytes) -> ApiResult {
    let req = parse_body(&body)?;
    let auth = req
        .get("auth")
        .ok_or_else(|| ApiFault::bad_request("Expecting to find auth in request body"))?;
    let methods: Vec<&str> = auth
        .pointer("/identity/methods")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let c = &sim.cfg;
    let method;
    if methods.contains(&"password") {
        let user = auth
            .pointer("/identity/password/user")
            .ok_or_else(|| ApiFault::bad_request("Expecting to find user in password"))?;
        let name_ok = str_at(user, &["name"]) == Some(c.username.as_str())
            && domain_matches(user, &c.domain)
            || str_at(user, &["id"]) == Some(c.user_id.as_str());
        if !name_ok || str_at(user, &["password"]) != Some(c.password.as_str()) {
            return Err(ApiFault::unauthorized());
        }
        let project = auth.pointer("/scope/project");
        let project_ok = match project {
            None => false,
            Some(p) => {
                str_at(p, &["id"]) == Some(c.project_id.as_str())
                    || str_at(p, &["name"]) == Some(c.project_name.as_str())
                        && domain_matches(p, &c.domain)
            }
        };
        if !project_ok {
            return Err(ApiFault::unauthorized());
        }
        method = "password";
    } else if methods.contains(&"application_credential") {
        let ac = auth
            .pointer("/identity/application_credential")
            .ok_or_else(|| ApiFault::bad_request("Expecting to find application_credential"))?;
        let id_ok = str_at(ac, &["id"]) == Some(c.app_cred_id.as_str())
            || str_at(ac, &["name"]) == Some(c.app_cred_name.as_str());
        if !id_ok || str_at(ac, &["secret"]) != Some(c.app_cred_secret.as_str()) {
            return Err(ApiFault::unauthorized());
        }
        method = "application_credential";
    } else {
        return Err(ApiFault::unauthorized());
    }

    let token = uuid::Uuid::new_v4().simple().to_string();
    let now = SystemTime::now();
    let expires = now + c.token_ttl;
    {
        let mut st = sim.state.lock().expect("sim lock");
        st.tokens
            .insert(token.clone(), Instant::now() + c.token_ttl);
        st.stats.tokens_issued += 1;
    }
    let ep = |kind: &str, url: String| {
        json!({"id": format!("ep-{kind}"), "interface": "public", "region": c.region,
               "region_id": c.region, "url": url})
    };
    let b = &sim.base_url;
    let catalog = json!([
        {"type": "identity", "name": "keystone", "id": "svc-identity",
         "endpoints": [ep("identity", format!("{b}/identity"))]},
        {"type": "volumev3", "name": "cinderv3", "id": "svc-volumev3",
         "endpoints": [ep("volumev3", format!("{b}/volume/v3/{}", c.project_id))]},
        {"type": "block-storage", "name": "cinder", "id": "svc-block-storage",
         "endpoints": [ep("block-storage", format!("{b}/volume/v3/{}", c.project_id))]},
        {"type": "compute", "name": "nova", "id": "svc-compute",
         "endpoints": [ep("compute", format!("{b}/compute/v2.1"))]},
    ]);
    let dom = json!({"id": "default", "name": c.domain});
    let body = json!({"token": {
        "methods": [method],
        "user": {"id": c.user_id, "name": c.username, "domain": dom, "password_expires_at": null},
        "project": {"id": c.project_id, "name": c.project_name, "domain": dom},
        "roles": [{"id": "role-member", "name": "member"}],
        "is_domain": false,
        "issued_at": iso8601(now),
        "expires_at": iso8601(expires),
        "audit_ids": [uuid::Uuid::new_v4().simple().to_string()],
        "catalog": catalog,
    }});
    let mut resp = (StatusCode::CREATED, axum::Json(body)).into_response();
    resp.headers_mut().insert(
        "X-Subject-Token",
        HeaderValue::from_str(&token).expect("token is ascii"),
    );
    Ok(resp)
}

/// Checks `X-Auth-Token` (and the project in the path, when given).
fn authorize(sim: &Sim, headers: &HeaderMap, project: Option<&str>) -> Result<(), ApiFault> {
    let token = headers
        .get("X-Auth-Token")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(ApiFault::unauthorized)?;
    let st = sim.state.lock().expect("sim lock");
    match st.tokens.get(token) {
        Some(exp) if *exp > Instant::now() => {}
        _ => return Err(ApiFault::unauthorized()),
    }
    if let Some(p) = project
        && p != sim.cfg.project_id
    {
        return Err(ApiFault::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("Token is not scoped to project {p}"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- Cinder

fn cinder_version_doc(sim: &Sim) -> Value {
    json!({
        "id": "v3.0",
        "status": "CURRENT",
        "version": format!("{}.{}", VOLUME_MAX_MICROVERSION.0, VOLUME_MAX_MICROVERSION.1),
        "min_version": format!("{}.{}", VOLUME_MIN_MICROVERSION.0, VOLUME_MIN_MICROVERSION.1),
        "updated": "2023-03-01T00:00:00Z",
        "links": [{"rel": "self", "href": format!("{}/volume/v3/", sim.base_url)}],
        "media-types": [{"base": "application/json",
            "type": "application/vnd.openstack.volume+json;version=3"}],
    })
}

async fn cinder_versions(State(sim): S) -> ApiResult {
    ok_json(
        StatusCode::OK,
        json!({"versions": [cinder_version_doc(&sim)]}),
    )
}

/// Parses `OpenStack-API-Version: volume 3.X` (also the older `X-OpenStack-Volume-API-Version`).
fn volume_microversion(headers: &HeaderMap) -> Result<(u32, u32), ApiFault> {
    let raw = headers
        .get("OpenStack-API-Version")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| {
            let mut it = s.split_whitespace();
            (it.next()? == "volume").then(|| it.next().unwrap_or("").to_string())
        })
        .or_else(|| {
            headers
                .get("X-OpenStack-Volume-API-Version")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
    let Some(raw) = raw else {
        return Ok(VOLUME_MIN_MICROVERSION);
    };
    if raw == "latest" {
        return Ok(VOLUME_MAX_MICROVERSION);
    }
    let parsed = raw
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .ok_or_else(|| ApiFault::bad_request(format!("Invalid API version string {raw:?}")))?;
    if parsed < VOLUME_MIN_MICROVERSION || parsed > VOLUME_MAX_MICROVERSION {
        return Err(ApiFault::new(
            StatusCode::NOT_ACCEPTABLE,
            "computeFault",
            format!(
                "Version {}.{} is not supported by the API. Minimum is 3.0 and maximum is 3.70.",
                parsed.0, parsed.1
            ),
        ));
    }
    Ok(parsed)
}

fn with_microversion(mut resp: Response, mv: (u32, u32)) -> Response {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("volume {}.{}", mv.0, mv.1)) {
        h.insert("OpenStack-API-Version", v);
    }
    h.insert("Vary", HeaderValue::from_static("OpenStack-API-Version"));
    resp
}

fn cinder_guard(sim: &Sim, headers: &HeaderMap, project: &str) -> Result<(u32, u32), ApiFault> {
    authorize(sim, headers, Some(project))?;
    let mv = volume_microversion(headers)?;
    if mv > VOLUME_MIN_MICROVERSION {
        let mut st = sim.state.lock().expect("sim lock");
        let seen = &mut st.stats.max_volume_microversion;
        let prev = seen
            .split_once('.')
            .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
            .unwrap_or((0, 0));
        if mv > prev {
            *seen = format!("{}.{}", mv.0, mv.1);
        }
    }
    Ok(mv)
}

async fn list_types(State(sim): S, Path(project): Path<String>, headers: HeaderMap) -> ApiResult {
    let mv = cinder_guard(&sim, &headers, &project)?;
    let types: Vec<Value> = sim
        .cfg
        .volume_types
        .iter()
        .map(|t| json!({"id": t, "name": t, "is_public": true, "extra_specs": {}}))
        .collect();
    Ok(with_microversion(
        ok_json(StatusCode::OK, json!({"volume_types": types}))?,
        mv,
    ))
}

async fn create_volume(
    State(sim): S,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let mv = cinder_guard(&sim, &headers, &project)?;
    let req = parse_body(&body)?;
    let v = req.get("volume").ok_or_else(|| {
        ApiFault::bad_request("Missing required element 'volume' in request body.")
    })?;
    let c = &sim.cfg;
    let mut st = sim.state.lock().expect("sim lock");
    st.stats.cinder_create_requests += 1;
    if st.take_500("create_volume") {
        return Err(ApiFault::internal("Injected fault: create_volume"));
    }
    let snapshot_id = v
        .get("snapshot_id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let source_volid = v
        .get("source_volid")
        .and_then(Value::as_str)
        .map(str::to_string);
    let source_size = if let Some(s) = &snapshot_id {
        let snap = st
            .snapshots
            .get(s)
            .ok_or_else(|| ApiFault::not_found(format!("Snapshot {s} could not be found.")))?;
        if snap.status != "available" {
            return Err(ApiFault::bad_request(
                "Invalid snapshot: Originating snapshot status must be one of 'available' values",
            ));
        }
        Some(snap.size)
    } else if let Some(s) = &source_volid {
        let src = st
            .volumes
            .get(s)
            .ok_or_else(|| ApiFault::not_found(format!("Volume {s} could not be found.")))?;
        if !matches!(src.status.as_str(), "available" | "in-use") {
            return Err(ApiFault::bad_request(format!(
                "Invalid volume: Source volume status must be available or in-use, but is {}",
                src.status
            )));
        }
        Some(src.size)
    } else {
        None
    };
    let size = match v.get("size") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.parse::<i64>().ok(),
        None => source_size.map(|s| s as i64),
        _ => None,
    };
    let size = match size {
        Some(n) if n > 0 => n as u64,
        _ => {
            return Err(ApiFault::bad_request(
                "Invalid input received: 'size' must be an integer greater than 0.",
            ));
        }
    };
    if let Some(min) = source_size
        && size < min
    {
        return Err(ApiFault::bad_request(format!(
            "Invalid input received: Volume size '{size}'GB cannot be smaller than the source size '{min}'GB."
        )));
    }
    let volume_type = v
        .get("volume_type")
        .and_then(Value::as_str)
        .unwrap_or(&c.volume_types[0])
        .to_string();
    if !c.volume_types.contains(&volume_type) {
        return Err(ApiFault::not_found(format!(
            "Volume type with name {volume_type} could not be found."
        )));
    }
    let az = v
        .get("availability_zone")
        .and_then(Value::as_str)
        .unwrap_or(&c.default_zone)
        .to_string();
    if !c.zones().contains(&az) {
        return Err(ApiFault::bad_request(format!(
            "Invalid input received: Availability zone '{az}' is invalid."
        )));
    }
    if st.volumes.len() >= c.quota_volumes {
        return Err(ApiFault::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "overLimit",
            format!(
                "VolumeLimitExceeded: Maximum number of volumes allowed ({}) exceeded for quota 'volumes'.",
                c.quota_volumes
            ),
        ));
    }
    if st.gigabytes_used() + size > c.quota_gigabytes {
        return Err(ApiFault::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "overLimit",
            format!(
                "VolumeSizeExceedsAvailableQuota: Requested volume or snapshot exceeds allowed gigabytes quota. Requested {size}G, quota is {}G and {}G has been consumed.",
                c.quota_gigabytes,
                st.gigabytes_used()
            ),
        ));
    }
    let id = uuid::Uuid::new_v4().to_string();
    let now = SystemTime::now();
    let metadata = v
        .get("metadata")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let vol = Volume {
        seq: st.next_seq(),
        id: id.clone(),
        name: v
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        description: v
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_string),
        size,
        status: "creating".into(),
        volume_type,
        availability_zone: az,
        created_at: now,
        updated_at: now,
        snapshot_id: snapshot_id.clone(),
        source_volid: source_volid.clone(),
        metadata,
        attachment: None,
        loop_dev: None,
    };
    let out = vol.to_json(&c.project_id);
    st.volumes.insert(id.clone(), vol);
    st.inflight += 1;
    drop(st);

    let source = snapshot_id
        .map(|s| sim.backend.snapshot_file(&s))
        .or_else(|| source_volid.map(|s| sim.backend.volume_file(&s)));
    let sim2 = sim.clone();
    tokio::spawn(async move {
        tokio::time::sleep(sim2.cfg.transition_delay).await;
        let backend = sim2.backend.clone();
        let id2 = id.clone();
        let res = tokio::task::spawn_blocking(move || {
            backend.create_volume(&id2, size, source.as_deref())
        })
        .await;
        let mut st = sim2.state.lock().expect("sim lock");
        st.inflight -= 1;
        if let Some(v) = st.volumes.get_mut(&id) {
            v.updated_at = SystemTime::now();
            v.status = match res {
                Ok(Ok(())) => "available".into(),
                other => {
                    tracing::error!(volume = %id, ?other, "simulated volume creation failed");
                    "error".into()
                }
            };
        }
    });
    Ok(with_microversion(
        ok_json(StatusCode::ACCEPTED, json!({"volume": out}))?,
        mv,
    ))
}

fn page<T, F: Fn(&T) -> &str>(
    items: Vec<T>,
    q: &HashMap<String, String>,
    id_of: F,
) -> Result<Vec<T>, ApiFault> {
    let mut items = items;
    if let Some(marker) = q.get("marker") {
        let pos = items
            .iter()
            .position(|i| id_of(i) == marker)
            .ok_or_else(|| ApiFault::bad_request(format!("Marker {marker} could not be found.")))?;
        items.drain(..=pos);
    }
    if let Some(limit) = q.get("limit") {
        let n: usize = limit
            .parse()
            .map_err(|_| ApiFault::bad_request(format!("Invalid limit {limit:?}")))?;
        items.truncate(n);
    }
    Ok(items)
}

fn filtered_volumes(sim: &Sim, q: &HashMap<String, String>) -> Result<Vec<Volume>, ApiFault> {
    let st = sim.state.lock().expect("sim lock");
    let mut vols: Vec<Volume> = st
        .volumes
        .values()
        .filter(|v| q.get("name").is_none_or(|n| &v.name == n))
        .filter(|v| q.get("status").is_none_or(|s| &v.status == s))
        .cloned()
        .collect();
    vols.sort_by_key(|v| v.seq);
    page(vols, q, |v| v.id.as_str())
}

async fn list_volumes_detail(
    State(sim): S,
    Path(project): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult {
    let mv = cinder_guard(&sim, &headers, &project)?;
    let vols: Vec<Value> = filtered_volumes(&sim, &q)?
        .iter()
        .map(|v| v.to_json(&sim.cfg.project_id))
        .collect();
    Ok(with_microversion(
        ok_json(StatusCode::OK, json!({"volumes": vols}))?,
        mv,
    ))
}

async fn list_volumes_summary(
    State(sim): S,
    Path(project): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult {
    let mv = cinder_guard(&sim, &headers, &project)?;
    let vols: Vec<Value> = filtered_volumes(&sim, &q)?
        .iter()
        .map(|v| json!({"id": v.id, "name": v.name, "links": []}))
        .collect();
    Ok(with_microversion(
        ok_json(StatusCode::OK, json!({"volumes": vols}))?,
        mv,
    ))
}

async fn show_volume(
    State(sim): S,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let mv = cinder_guard(&sim, &headers, &project)?;
    let mut st = sim.state.lock().expect("sim lock");
    if st.take_500("get_volume") {
        return Err(ApiFault::internal("Injected fault: get_volume"));
    }
    let v = st
        .volumes
        .get(&id)
        .ok_or_else(|| ApiFault::not_found(format!("Volume {id} could not be found.")))?;
    let out = v.to_json(&sim.cfg.project_id);
    drop(st);
    Ok(with_microversion(
        ok_json(StatusCode::OK, json!({"volume": out}))?,
        mv,
    ))
}

/// Completes a deletion the way Cinder does, after the simulated transition delay: removes the
/// backing file on the blocking pool, then `finish(state, id, succeeded)` drops the record or marks
/// it `error_deleting`. The caller has set the record to `deleting` and counted it in flight.
fn finish_deletion_later(
    sim: Arc<Sim>,
    id: String,
    what: &'static str,
    remove_backing: impl FnOnce(&super::Backend, &str) -> crate::Result<()> + Send + 'static,
    finish: impl FnOnce(&mut super::model::State, &str, bool) + Send + 'static,
) {
    tokio::spawn(async move {
        tokio::time::sleep(sim.cfg.transition_delay).await;
        let backend = sim.backend.clone();
        let id2 = id.clone();
        let res = tokio::task::spawn_blocking(move || remove_backing(&backend, &id2)).await;
        let mut st = sim.state.lock().expect("sim lock");
        st.inflight -= 1;
        let ok = matches!(res, Ok(Ok(())));
        if !ok {
            tracing::error!(%what, %id, ?res, "simulated deletion failed");
        }
        finish(&mut st, &id, ok);
    });
}

async fn delete_volume(
    State(sim): S,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let mv = cinder_guard(&sim, &headers, &project)?;
    let mut st = sim.state.lock().expect("sim lock");
    if st.take_500("delete_volume") {
        return Err(ApiFault::internal("Injected fault: delete_volume"));
    }
    let snaps = st.snapshot_count_of(&id);
    let v = st
        .volumes
        .get_mut(&id)
        .ok_or_else(|| ApiFault::not_found(format!("Volume {id} could not be found.")))?;
    if !matches!(
        v.status.as_str(),
        "available" | "error" | "error_restoring" | "error_extending"
    ) {
        return Err(ApiFault::bad_request(format!(
            "Invalid volume: Volume status must be available or error or error_restoring or error_extending or error_managing and must not be migrating, attached, belong to a group, have snapshots or be disassociated from snapshots after volume transfer. (status {})",
            v.status
        )));
    }
    if snaps > 0 {
        return Err(ApiFault::bad_request(format!(
            "Invalid volume: Volume {id} still has {snaps} dependent snapshots."
        )));
    }
    v.status = "deleting".into();
    st.inflight += 1;
    drop(st);
    finish_deletion_later(
        sim,
        id,
        "volume",
        |backend, id| backend.delete_volume(id),
        |st, id, ok| {
            if ok {
                st.volumes.remove(id);
            } else if let Some(v) = st.volumes.get_mut(id) {
                v.status = "error_deleting".into();
            }
        },
    );
    Ok(with_microversion(StatusCode::ACCEPTED.into_response(), mv))
}

async fn volume_action(
    State(sim): S,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let mv = cinder_guard(&sim, &headers, &project)?;
    let req = parse_body(&body)?;
    let Some(ext) = req.get("os-extend") else {
        return Err(ApiFault::bad_request(
            "Unsupported volume action (the simulator serves os-extend)",
        ));
    };
    let new_size = match ext.get("new_size") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .filter(|n| *n > 0)
    .ok_or_else(|| {
        ApiFault::bad_request("Invalid input received: new_size must be a positive integer")
    })?;
    let mut st = sim.state.lock().expect("sim lock");
    if st.take_500("extend") {
        return Err(ApiFault::internal("Injected fault: extend"));
    }
    let used = st.gigabytes_used();
    let quota = sim.cfg.quota_gigabytes;
    let v = st
        .volumes
        .get_mut(&id)
        .ok_or_else(|| ApiFault::not_found(format!("Volume {id} could not be found.")))?;
    let online = v.status == "in-use";
    if !(v.status == "available" || online && mv >= ONLINE_EXTEND_MICROVERSION) {
        return Err(ApiFault::bad_request(format!(
            "Invalid volume: Volume {id} status must be 'available' or 'in-use' (in-use requires microversion 3.42), but current status is: {} (requested microversion {}.{})",
            v.status, mv.0, mv.1
        )));
    }
    if new_size <= v.size {
        return Err(ApiFault::bad_request(format!(
            "Invalid input received: New size for extend must be greater than current size. (current: {}, extended: {new_size}).",
            v.size
        )));
    }
    if used + new_size - v.size > quota {
        return Err(ApiFault::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "overLimit",
            format!(
                "VolumeSizeExceedsAvailableQuota: Requested {new_size}G, quota is {quota}G and {used}G has been consumed."
            ),
        ));
    }
    let back_to = v.status.clone();
    v.status = "extending".into();
    let loop_dev = v.loop_dev.clone();
    st.inflight += 1;
    drop(st);
    let sim2 = sim.clone();
    tokio::spawn(async move {
        tokio::time::sleep(sim2.cfg.transition_delay).await;
        let backend = sim2.backend.clone();
        let id2 = id.clone();
        let res = tokio::task::spawn_blocking(move || {
            backend.extend(&id2, new_size, loop_dev.as_deref())
        })
        .await;
        let mut st = sim2.state.lock().expect("sim lock");
        st.inflight -= 1;
        if let Some(v) = st.volumes.get_mut(&id) {
            v.updated_at = SystemTime::now();
            match res {
                Ok(Ok(())) => {
                    v.size = new_size;
                    v.status = back_to;
                }
                other => {
                    tracing::error!(volume = %id, ?other, "simulated extend failed");
                    v.status = "error_extending".into();
                }
            }
        }
    });
    Ok(with_microversion(StatusCode::ACCEPTED.into_response(), mv))
}

async fn create_snapshot(
    State(sim): S,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let mv = cinder_guard(&sim, &headers, &project)?;
    let req = parse_body(&body)?;
    let s = req.get("snapshot").ok_or_else(|| {
        ApiFault::bad_request("Missing required element 'snapshot' in request body.")
    })?;
    let volume_id = s
        .get("volume_id")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiFault::bad_request("Invalid input received: 'volume_id' is required"))?
        .to_string();
    let force = match s.get("force") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(x)) => x.eq_ignore_ascii_case("true"),
        _ => false,
    } || mv >= (3, 66);
    let mut st = sim.state.lock().expect("sim lock");
    if st.take_500("create_snapshot") {
        return Err(ApiFault::internal("Injected fault: create_snapshot"));
    }
    let v = st
        .volumes
        .get(&volume_id)
        .ok_or_else(|| ApiFault::not_found(format!("Volume {volume_id} could not be found.")))?;
    if !(v.status == "available" || v.status == "in-use" && force) {
        return Err(ApiFault::bad_request(format!(
            "Invalid volume: Volume {volume_id} status must be available, but current status is: {}",
            v.status
        )));
    }
    let size = v.size;
    if st.gigabytes_used() + size > sim.cfg.quota_gigabytes {
        return Err(ApiFault::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "overLimit",
            "SnapshotLimitExceeded: gigabytes quota exceeded",
        ));
    }
    let snap = Snapshot {
        seq: st.next_seq(),
        id: uuid::Uuid::new_v4().to_string(),
        name: s
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        volume_id: volume_id.clone(),
        size,
        status: "creating".into(),
        created_at: SystemTime::now(),
    };
    let out = snap.to_json();
    let id = snap.id.clone();
    st.snapshots.insert(id.clone(), snap);
    st.inflight += 1;
    drop(st);
    let sim2 = sim.clone();
    tokio::spawn(async move {
        tokio::time::sleep(sim2.cfg.transition_delay).await;
        let backend = sim2.backend.clone();
        let id2 = id.clone();
        let res = tokio::task::spawn_blocking(move || backend.snapshot(&volume_id, &id2)).await;
        let mut st = sim2.state.lock().expect("sim lock");
        st.inflight -= 1;
        if let Some(s) = st.snapshots.get_mut(&id) {
            s.status = match res {
                Ok(Ok(())) => "available".into(),
                other => {
                    tracing::error!(snapshot = %id, ?other, "simulated snapshot failed");
                    "error".into()
                }
            };
        }
    });
    Ok(with_microversion(
        ok_json(StatusCode::ACCEPTED, json!({"snapshot": out}))?,
        mv,
    ))
}

async fn list_snapshots(
    State(sim): S,
    Path(project): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult {
    let mv = cinder_guard(&sim, &headers, &project)?;
    let snaps = {
        let st = sim.state.lock().expect("sim lock");
        let mut s: Vec<Snapshot> = st
            .snapshots
            .values()
            .filter(|s| q.get("name").is_none_or(|n| &s.name == n))
            .filter(|s| q.get("volume_id").is_none_or(|n| &s.volume_id == n))
            .filter(|s| q.get("status").is_none_or(|n| &s.status == n))
            .cloned()
            .collect();
        s.sort_by_key(|s| s.seq);
        s
    };
    let snaps: Vec<Value> = page(snaps, &q, |s| s.id.as_str())?
        .iter()
        .map(Snapshot::to_json)
        .collect();
    Ok(with_microversion(
        ok_json(StatusCode::OK, json!({"snapshots": snaps}))?,
        mv,
    ))
}

async fn show_snapshot(
    State(sim): S,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let mv = cinder_guard(&sim, &headers, &project)?;
    let st = sim.state.lock().expect("sim lock");
    let s = st
        .snapshots
        .get(&id)
        .ok_or_else(|| ApiFault::not_found(format!("Snapshot {id} could not be found.")))?;
    let out = s.to_json();
    drop(st);
    Ok(with_microversion(
        ok_json(StatusCode::OK, json!({"snapshot": out}))?,
        mv,
    ))
}

async fn delete_snapshot(
    State(sim): S,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let mv = cinder_guard(&sim, &headers, &project)?;
    let mut st = sim.state.lock().expect("sim lock");
    let s = st
        .snapshots
        .get_mut(&id)
        .ok_or_else(|| ApiFault::not_found(format!("Snapshot {id} could not be found.")))?;
    if !matches!(s.status.as_str(), "available" | "error") {
        return Err(ApiFault::bad_request(format!(
            "Invalid snapshot: Snapshot status must be available or error, but is {}",
            s.status
        )));
    }
    s.status = "deleting".into();
    st.inflight += 1;
    drop(st);
    finish_deletion_later(
        sim,
        id,
        "snapshot",
        |backend, id| backend.delete_snapshot(id),
        |st, id, ok| {
            if ok {
                st.snapshots.remove(id);
            } else if let Some(s) = st.snapshots.get_mut(id) {
                s.status = "error_deleting".into();
            }
        },
    );
    Ok(with_microversion(StatusCode::ACCEPTED.into_response(), mv))
}

// ---------------------------------------------------------------- Nova

fn nova_version_doc(sim: &Sim) -> Value {
    json!({
        "id": "v2.1", "status": "CURRENT", "version": "2.96", "min_version": "2.1",
        "updated": "2013-07-23T11:33:21Z",
        "links": [{"rel": "self", "href": format!("{}/compute/v2.1/", sim.base_url)}],
    })
}

async fn nova_versions(State(sim): S) -> ApiResult {
    ok_json(
        StatusCode::OK,
        json!({"versions": [nova_version_doc(&sim)]}),
    )
}

async fn nova_version(State(sim): S) -> ApiResult {
    ok_json(StatusCode::OK, json!({"version": nova_version_doc(&sim)}))
}

fn instance<'a>(sim: &'a Sim, id: &str) -> Result<&'a super::Instance, ApiFault> {
    sim.cfg
        .instances
        .iter()
        .find(|i| i.id == id)
        .ok_or_else(|| ApiFault::not_found(format!("Instance {id} could not be found.")))
}

async fn show_server(State(sim): S, Path(id): Path<String>, headers: HeaderMap) -> ApiResult {
    authorize(&sim, &headers, None)?;
    let i = instance(&sim, &id)?;
    let st = sim.state.lock().expect("sim lock");
    let vols: Vec<Value> = st
        .attachments_of(&id)
        .iter()
        .filter(|v| v.status != "attaching")
        .map(|v| json!({"id": v.id, "delete_on_termination": false}))
        .collect();
    drop(st);
    ok_json(
        StatusCode::OK,
        json!({"server": {
            "id": i.id, "name": i.name, "status": "ACTIVE",
            "OS-EXT-AZ:availability_zone": i.availability_zone,
            "os-extended-volumes:volumes_attached": vols,
            "tenant_id": sim.cfg.project_id,
        }}),
    )
}

fn attachment_json(v: &Volume) -> Value {
    let a = v.attachment.as_ref().expect("attachment");
    json!({"id": v.id, "volumeId": v.id, "serverId": a.server_id, "device": a.device,
           "tag": null, "delete_on_termination": false})
}

async fn list_attachments(State(sim): S, Path(id): Path<String>, headers: HeaderMap) -> ApiResult {
    authorize(&sim, &headers, None)?;
    instance(&sim, &id)?;
    let st = sim.state.lock().expect("sim lock");
    let list: Vec<Value> = st
        .attachments_of(&id)
        .into_iter()
        .map(attachment_json)
        .collect();
    drop(st);
    ok_json(StatusCode::OK, json!({"volumeAttachments": list}))
}

async fn show_attachment(
    State(sim): S,
    Path((id, volume)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&sim, &headers, None)?;
    instance(&sim, &id)?;
    let st = sim.state.lock().expect("sim lock");
    let v = st
        .volumes
        .get(&volume)
        .filter(|v| v.attachment.as_ref().is_some_and(|a| a.server_id == id))
        .ok_or_else(|| {
            ApiFault::not_found(format!("volume_id not found: {volume} on instance {id}"))
        })?;
    let out = attachment_json(v);
    drop(st);
    ok_json(StatusCode::OK, json!({"volumeAttachment": out}))
}

async fn attach(
    State(sim): S,
    Path(server): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    authorize(&sim, &headers, None)?;
    let req = parse_body(&body)?;
    let volume_id = req
        .pointer("/volumeAttachment/volumeId")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ApiFault::bad_request("Invalid input for field/attribute volumeAttachment.")
        })?
        .to_string();
    instance(&sim, &server)?;
    let max = sim.cfg.max_attachments_per_instance;
    let mut st = sim.state.lock().expect("sim lock");
    st.stats.nova_attach_requests += 1;
    if st.take_500("attach") {
        return Err(ApiFault::internal(
            "Unexpected API Error. Please report this at http://bugs.launchpad.net/nova/ (injected fault: attach)",
        ));
    }
    let count = st.attachments_of(&server).len();
    let device = st.next_device(&server);
    let v = st
        .volumes
        .get(&volume_id)
        .ok_or_else(|| ApiFault::not_found(format!("Volume {volume_id} could not be found.")))?;
    if v.status != "available" {
        let on = v
            .attachment
            .as_ref()
            .map(|a| format!(" (attached to {})", a.server_id))
            .unwrap_or_default();
        return Err(ApiFault::bad_request(format!(
            "Invalid volume: volume {volume_id} status must be 'available', but current status is '{}'{on}",
            v.status
        )));
    }
    if v.availability_zone != instance(&sim, &server)?.availability_zone && !sim.cfg.cross_az_attach
    {
        return Err(ApiFault::bad_request(format!(
            "Invalid volume: Server and volumes are not in the same availability zone. Server is in: {}. Volumes are in: {}",
            instance(&sim, &server)?.availability_zone,
            v.availability_zone
        )));
    }
    if count >= max {
        return Err(ApiFault::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "The maximum allowed number of disk devices ({max}) to attach to a single instance has been exceeded."
            ),
        ));
    }
    let lose = if st.faults.lose_attach > 0 {
        st.faults.lose_attach -= 1;
        true
    } else {
        false
    };
    let slow = Duration::from_millis(st.faults.slow_attach_ms);
    let v = st.volumes.get_mut(&volume_id).expect("checked above");
    v.status = "attaching".into();
    v.attachment = Some(Attachment {
        id: uuid::Uuid::new_v4().to_string(),
        server_id: server.clone(),
        device: device.clone(),
        attached_at: SystemTime::now(),
    });
    let out = attachment_json(v);
    st.inflight += 1;
    drop(st);

    let sim2 = sim.clone();
    tokio::spawn(async move {
        tokio::time::sleep(sim2.cfg.transition_delay + slow).await;
        loop {
            let held = {
                let st = sim2.state.lock().expect("sim lock");
                st.faults.hold_attach && !st.closed
            };
            if !held {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let res = if lose {
            None
        } else {
            let backend = sim2.backend.clone();
            let id2 = volume_id.clone();
            Some(tokio::task::spawn_blocking(move || backend.attach(&id2)).await)
        };
        let mut st = sim2.state.lock().expect("sim lock");
        st.inflight -= 1;
        let closed = st.closed;
        let Some(v) = st.volumes.get_mut(&volume_id) else {
            return;
        };
        match res {
            Some(Ok(Ok(dev))) if !closed => {
                v.loop_dev = Some(dev);
                v.status = "in-use".into();
                st.stats.attached_loop_devices += 1;
            }
            Some(Ok(Ok(dev))) => {
                let _ = sim2.backend.detach(&volume_id, &dev);
            }
            None => {
                tracing::warn!(volume = %volume_id, "fault injected: attachment lost");
                v.attachment = None;
                v.status = "available".into();
            }
            Some(other) => {
                tracing::error!(volume = %volume_id, ?other, "simulated attach failed");
                v.attachment = None;
                v.status = "available".into();
            }
        }
    });
    ok_json(StatusCode::OK, json!({"volumeAttachment": out}))
}

async fn detach(
    State(sim): S,
    Path((server, volume_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&sim, &headers, None)?;
    instance(&sim, &server)?;
    let mut st = sim.state.lock().expect("sim lock");
    st.stats.nova_detach_requests += 1;
    if st.take_500("detach") {
        return Err(ApiFault::internal(
            "Unexpected API Error. Please report this at http://bugs.launchpad.net/nova/ (injected fault: detach)",
        ));
    }
    let v = st
        .volumes
        .get_mut(&volume_id)
        .filter(|v| v.attachment.as_ref().is_some_and(|a| a.server_id == server))
        .ok_or_else(|| {
            ApiFault::not_found(format!(
                "volume_id not found: {volume_id} on instance {server}"
            ))
        })?;
    if v.status != "in-use" {
        return Err(ApiFault::new(
            StatusCode::CONFLICT,
            "conflictingRequest",
            format!(
                "Cannot 'detach_volume' instance {server} while volume {volume_id} is in status {}",
                v.status
            ),
        ));
    }
    v.status = "detaching".into();
    let dev = v.loop_dev.clone();
    st.inflight += 1;
    drop(st);
    let sim2 = sim.clone();
    tokio::spawn(async move {
        tokio::time::sleep(sim2.cfg.transition_delay).await;
        let backend = sim2.backend.clone();
        let id2 = volume_id.clone();
        let res = tokio::task::spawn_blocking(move || match dev {
            Some(d) => backend.detach(&id2, &d),
            None => Ok(()),
        })
        .await;
        let mut st = sim2.state.lock().expect("sim lock");
        st.inflight -= 1;
        let detached = matches!(res, Ok(Ok(())));
        if let Some(v) = st.volumes.get_mut(&volume_id) {
            if detached {
                v.loop_dev = None;
                v.attachment = None;
                v.status = "available".into();
            } else {
                tracing::error!(volume = %volume_id, ?res, "simulated detach failed");
                v.status = "in-use".into();
            }
        }
        if detached {
            st.stats.attached_loop_devices -= 1;
        }
    });
    Ok(StatusCode::ACCEPTED.into_response())
}

// ---------------------------------------------------------------- metadata service

fn metadata_doc(sim: &Sim, id: &str) -> ApiResult {
    let i = instance(sim, id)?;
    let st = sim.state.lock().expect("sim lock");
    let devices: Vec<Value> = st
        .attachments_of(id)
        .iter()
        .filter(|v| v.status == "in-use")
        .map(
            |v| json!({"type": "disk", "bus": "virtio", "serial": v.id, "address": "", "tags": []}),
        )
        .collect();
    drop(st);
    ok_json(
        StatusCode::OK,
        json!({
            "uuid": i.id, "name": i.name, "hostname": i.name,
            "availability_zone": i.availability_zone,
            "project_id": sim.cfg.project_id, "launch_index": 0,
            "devices": devices, "meta": {}, "public_keys": {},
        }),
    )
}

async fn default_metadata(State(sim): S) -> ApiResult {
    let id = sim.cfg.instances[0].id.clone();
    metadata_doc(&sim, &id)
}

async fn instance_metadata(State(sim): S, Path(id): Path<String>) -> ApiResult {
    metadata_doc(&sim, &id)
}

// ---------------------------------------------------------------- admin

async fn set_faults(State(sim): S, body: Bytes) -> ApiResult {
    let f: Faults = serde_json::from_slice(&body)
        .map_err(|e| ApiFault::bad_request(format!("bad faults document: {e}")))?;
    sim.state.lock().expect("sim lock").faults = f.clone();
    ok_json(
        StatusCode::OK,
        serde_json::to_value(f).expect("serializable"),
    )
}

async fn get_faults(State(sim): S) -> ApiResult {
    let f = sim.state.lock().expect("sim lock").faults.clone();
    ok_json(
        StatusCode::OK,
        serde_json::to_value(f).expect("serializable"),
    )
}

async fn stats(State(sim): S) -> ApiResult {
    ok_json(
        StatusCode::OK,
        serde_json::to_value(sim.stats()).expect("serializable"),
    )
}

async fn revoke_tokens(State(sim): S) -> ApiResult {
    sim.revoke_tokens();
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert("OpenStack-API-Version", HeaderValue::from_str(v).unwrap());
        m
    }

    #[test]
    fn microversion_header() {
        assert_eq!(volume_microversion(&HeaderMap::new()).unwrap(), (3, 0));
        assert_eq!(volume_microversion(&h("volume 3.42")).unwrap(), (3, 42));
        assert_eq!(volume_microversion(&h("volume latest")).unwrap(), (3, 70));
        assert_eq!(volume_microversion(&h("compute 2.90")).unwrap(), (3, 0));
        assert_eq!(
            volume_microversion(&h("volume 3.71")).unwrap_err().status,
            StatusCode::NOT_ACCEPTABLE
        );
        assert_eq!(
            volume_microversion(&h("volume x")).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
