//! A small OpenStack client: Keystone v3 (password or application credential, service catalog,
//! re-authentication when the token expires or is refused), Cinder v3 with microversions and
//! Nova `os-volume_attachments`.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::{Error, Result, config::Credentials};

/// Cinder microversion the driver speaks (3.42: extend `in-use` volumes).
pub const VOLUME_MICROVERSION: &str = "volume 3.42";

#[derive(Clone, Debug)]
struct Session {
    token: String,
    /// Refresh before this instant.
    refresh_at: SystemTime,
    volume_url: String,
    compute_url: String,
}

/// OpenStack client shared by the controller's RPCs.
pub struct Client {
    http: reqwest::Client,
    creds: Credentials,
    session: Mutex<Option<Session>>,
}

/// A Cinder volume as the driver needs it.
#[derive(Clone, Debug, Deserialize)]
pub struct Volume {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    pub size: u64,
    pub status: String,
    #[serde(default)]
    pub availability_zone: Option<String>,
    #[serde(default)]
    pub volume_type: Option<String>,
    #[serde(default)]
    pub attachments: Vec<VolumeAttachment>,
    #[serde(default)]
    pub snapshot_id: Option<String>,
    #[serde(default)]
    pub source_volid: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct VolumeAttachment {
    pub server_id: String,
    #[serde(default)]
    pub device: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Snapshot {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    pub volume_id: String,
    pub size: u64,
    pub status: String,
    #[serde(default)]
    pub created_at: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct NovaAttachment {
    #[serde(rename = "volumeId")]
    pub volume_id: String,
    #[serde(default)]
    pub device: Option<String>,
}

/// What CreateVolume asks Cinder for.
#[derive(Clone, Debug, Default)]
pub struct NewVolume {
    pub name: String,
    pub size_gib: u64,
    pub volume_type: Option<String>,
    pub availability_zone: Option<String>,
    pub snapshot_id: Option<String>,
    pub source_volid: Option<String>,
}

#[derive(Clone, Copy)]
enum Service {
    Volume,
    Compute,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Volume => "cinder",
            Service::Compute => "nova",
        }
    }
}

/// Parses `2026-11-24T03:00:00.000000Z` (also without fraction, or with `+00:00`).
pub fn parse_iso8601(s: &str) -> Option<SystemTime> {
    let s = s.trim().trim_end_matches('Z').trim_end_matches("+00:00");
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    // days from civil (Howard Hinnant)
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    let micros: u64 = format!("{frac:0<6}")[..6].parse().ok()?;
    Some(
        UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?) + Duration::from_micros(micros),
    )
}

fn api_message(body: &Value) -> String {
    // {"itemNotFound": {"message": ...}} / {"error": {"message": ...}} / {"badRequest": ...}
    body.as_object()
        .and_then(|o| o.values().find_map(|v| v.get("message")?.as_str()))
        .map(str::to_string)
        .unwrap_or_else(|| body.to_string())
}

fn endpoint(catalog: &Value, types: &[&str], region: Option<&str>) -> Option<String> {
    let services = catalog.as_array()?;
    for ty in types {
        for svc in services {
            if svc.get("type").and_then(Value::as_str) != Some(ty) {
                continue;
            }
            for ep in svc.get("endpoints").and_then(Value::as_array)? {
                let public = ep.get("interface").and_then(Value::as_str) == Some("public");
                let region_ok = region.is_none_or(|r| {
                    ep.get("region_id").and_then(Value::as_str) == Some(r)
                        || ep.get("region").and_then(Value::as_str) == Some(r)
                });
                if public && region_ok {
                    return ep
                        .get("url")
                        .and_then(Value::as_str)
                        .map(|u| u.trim_end_matches('/').to_string());
                }
            }
        }
    }
    None
}

impl Client {
    pub fn new(creds: Credentials) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        Ok(Client {
            http,
            creds,
            session: Mutex::new(None),
        })
    }

    fn auth_body(&self) -> Value {
        let c = &self.creds;
        if let (Some(secret), true) = (
            &c.application_credential_secret,
            c.application_credential_id.is_some() || c.application_credential_name.is_some(),
        ) {
            let mut ac = json!({"secret": secret});
            if let Some(id) = &c.application_credential_id {
                ac["id"] = json!(id);
            } else {
                ac["name"] = json!(c.application_credential_name);
                let mut user = json!({});
                if let Some(id) = &c.user_id {
                    user["id"] = json!(id);
                } else {
                    user["name"] = json!(c.username);
                    user["domain"] = domain(&c.user_domain_id, &c.user_domain_name);
                }
                ac["user"] = user;
            }
            return json!({"auth": {"identity": {"methods": ["application_credential"],
                "application_credential": ac}}});
        }
        let mut user = json!({"password": c.password});
        if let Some(id) = &c.user_id {
            user["id"] = json!(id);
        } else {
            user["name"] = json!(c.username);
            user["domain"] = domain(&c.user_domain_id, &c.user_domain_name);
        }
        let project = if let Some(id) = &c.project_id {
            json!({"id": id})
        } else {
            json!({"name": c.project_name,
                   "domain": domain(&c.project_domain_id, &c.project_domain_name)})
        };
        json!({"auth": {"identity": {"methods": ["password"], "password": {"user": user}},
                        "scope": {"project": project}}})
    }

    async fn authenticate(&self) -> Result<Session> {
        let url = format!("{}/auth/tokens", self.creds.auth_url);
        let resp = self.http.post(&url).json(&self.auth_body()).send().await?;
        let status = resp.status();
        let token = resp
            .headers()
            .get("X-Subject-Token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(Error::Api {
                service: "keystone",
                status: status.as_u16(),
                message: api_message(&body),
            });
        }
        let token =
            token.ok_or_else(|| Error::Internal("Keystone sent no X-Subject-Token".into()))?;
        let t = &body["token"];
        let region = self.creds.region.as_deref();
        let volume_url = endpoint(&t["catalog"], &["volumev3", "block-storage"], region)
            .ok_or_else(|| {
                Error::Config("no volumev3/block-storage endpoint in the catalog".into())
            })?;
        let compute_url = endpoint(&t["catalog"], &["compute"], region)
            .ok_or_else(|| Error::Config("no compute endpoint in the catalog".into()))?;
        let now = SystemTime::now();
        let expires = t["expires_at"]
            .as_str()
            .and_then(parse_iso8601)
            .unwrap_or(now + Duration::from_secs(300));
        let issued = t["issued_at"]
            .as_str()
            .and_then(parse_iso8601)
            .unwrap_or(now);
        // Refresh when 90 % of the lifetime has passed (measured on our clock).
        let life = expires
            .duration_since(issued)
            .unwrap_or(Duration::from_secs(60));
        let refresh_at = now + life.mul_f64(0.9);
        tracing::debug!(volume_url, compute_url, "authenticated to Keystone");
        Ok(Session {
            token,
            refresh_at,
            volume_url,
            compute_url,
        })
    }

    async fn session(&self, force: bool) -> Result<Session> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref()
            && !force
            && SystemTime::now() < s.refresh_at
        {
            return Ok(s.clone());
        }
        let s = self.authenticate().await?;
        *guard = Some(s.clone());
        Ok(s)
    }

    /// One API call; re-authenticates once when the token is refused. Returns status and body.
    async fn call(
        &self,
        service: Service,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value)> {
        let mut retried = false;
        loop {
            let s = self.session(retried).await?;
            let base = match service {
                Service::Volume => &s.volume_url,
                Service::Compute => &s.compute_url,
            };
            let mut req = self
                .http
                .request(method.clone(), format!("{base}{path}"))
                .header("X-Auth-Token", &s.token)
                .header("Accept", "application/json");
            if let Service::Volume = service {
                req = req.header("OpenStack-API-Version", VOLUME_MICROVERSION);
            }
            if let Some(b) = &body {
                req = req.json(b);
            }
            let resp = req.send().await?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !retried {
                tracing::info!("token refused, re-authenticating");
                retried = true;
                continue;
            }
            let text = resp.text().await.unwrap_or_default();
            let value: Value = if text.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or(Value::String(text))
            };
            if !status.is_success() {
                return Err(Error::Api {
                    service: service.name(),
                    status: status.as_u16(),
                    message: api_message(&value),
                });
            }
            return Ok((status, value));
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(v: Value, key: &str) -> Result<T> {
        serde_json::from_value(v.get(key).cloned().unwrap_or(Value::Null))
            .map_err(|e| Error::Internal(format!("unexpected OpenStack answer ({key}): {e}")))
    }

    // ----- Cinder

    pub async fn create_volume(&self, v: &NewVolume) -> Result<Volume> {
        let mut body = json!({"name": v.name, "size": v.size_gib,
            "metadata": {"cinder.csi.openstack.org/cluster": "berth"}});
        if let Some(t) = &v.volume_type {
            body["volume_type"] = json!(t);
        }
        if let Some(az) = &v.availability_zone {
            body["availability_zone"] = json!(az);
        }
        if let Some(s) = &v.snapshot_id {
            body["snapshot_id"] = json!(s);
        }
        if let Some(s) = &v.source_volid {
            body["source_volid"] = json!(s);
        }
        let (_, r) = self
            .call(
                Service::Volume,
                Method::POST,
                "/volumes",
                Some(json!({"volume": body})),
            )
            .await?;
        Self::decode(r, "volume")
    }

    /// `None` when Cinder does not know the volume.
    pub async fn get_volume(&self, id: &str) -> Result<Option<Volume>> {
        match self
            .call(
                Service::Volume,
                Method::GET,
                &format!("/volumes/{id}"),
                None,
            )
            .await
        {
            Ok((_, r)) => Ok(Some(Self::decode(r, "volume")?)),
            Err(Error::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn volumes_by_name(&self, name: &str) -> Result<Vec<Volume>> {
        let q = form_query(&[("name", name)]);
        let (_, r) = self
            .call(
                Service::Volume,
                Method::GET,
                &format!("/volumes/detail?{q}"),
                None,
            )
            .await?;
        Self::decode(r, "volumes")
    }

    /// A page of volumes after `marker`.
    pub async fn list_volumes(
        &self,
        limit: Option<usize>,
        marker: Option<&str>,
    ) -> Result<Vec<Volume>> {
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(l) = limit {
            q.push(("limit", l.to_string()));
        }
        if let Some(m) = marker {
            q.push(("marker", m.to_string()));
        }
        let qs: Vec<(&str, &str)> = q.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (_, r) = self
            .call(
                Service::Volume,
                Method::GET,
                &format!("/volumes/detail?{}", form_query(&qs)),
                None,
            )
            .await?;
        Self::decode(r, "volumes")
    }

    pub async fn delete_volume(&self, id: &str) -> Result<()> {
        self.call(
            Service::Volume,
            Method::DELETE,
            &format!("/volumes/{id}"),
            None,
        )
        .await
        .map(|_| ())
    }

    pub async fn extend_volume(&self, id: &str, new_size_gib: u64) -> Result<()> {
        self.call(
            Service::Volume,
            Method::POST,
            &format!("/volumes/{id}/action"),
            Some(json!({"os-extend": {"new_size": new_size_gib}})),
        )
        .await
        .map(|_| ())
    }

    pub async fn create_snapshot(&self, volume_id: &str, name: &str) -> Result<Snapshot> {
        let (_, r) = self
            .call(
                Service::Volume,
                Method::POST,
                "/snapshots",
                Some(json!({"snapshot": {"volume_id": volume_id, "name": name, "force": true}})),
            )
            .await?;
        Self::decode(r, "snapshot")
    }

    pub async fn get_snapshot(&self, id: &str) -> Result<Option<Snapshot>> {
        match self
            .call(
                Service::Volume,
                Method::GET,
                &format!("/snapshots/{id}"),
                None,
            )
            .await
        {
            Ok((_, r)) => Ok(Some(Self::decode(r, "snapshot")?)),
            Err(Error::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn list_snapshots(&self, filters: &[(&str, &str)]) -> Result<Vec<Snapshot>> {
        let (_, r) = self
            .call(
                Service::Volume,
                Method::GET,
                &format!("/snapshots/detail?{}", form_query(filters)),
                None,
            )
            .await?;
        Self::decode(r, "snapshots")
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.call(
            Service::Volume,
            Method::DELETE,
            &format!("/snapshots/{id}"),
            None,
        )
        .await
        .map(|_| ())
    }

    // ----- Nova

    /// Whether Nova knows the instance.
    pub async fn server_exists(&self, id: &str) -> Result<bool> {
        match self
            .call(
                Service::Compute,
                Method::GET,
                &format!("/servers/{id}"),
                None,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(Error::Api { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn list_attachments(&self, server: &str) -> Result<Vec<NovaAttachment>> {
        let (_, r) = self
            .call(
                Service::Compute,
                Method::GET,
                &format!("/servers/{server}/os-volume_attachments"),
                None,
            )
            .await?;
        Self::decode(r, "volumeAttachments")
    }

    /// Asks Nova to attach; a refusal for too many disks becomes RESOURCE_EXHAUSTED.
    pub async fn attach(&self, server: &str, volume_id: &str) -> Result<NovaAttachment> {
        let r = self
            .call(
                Service::Compute,
                Method::POST,
                &format!("/servers/{server}/os-volume_attachments"),
                Some(json!({"volumeAttachment": {"volumeId": volume_id}})),
            )
            .await;
        match r {
            Ok((_, r)) => Self::decode(r, "volumeAttachment"),
            Err(Error::Api {
                status: status @ (400 | 403),
                message,
                ..
            }) if is_too_many_disks(&message) => Err(Error::ResourceExhausted(format!(
                "Nova refused to attach volume {volume_id} to instance {server}: the instance has \
                 reached its disk limit (HTTP {status}: {message})"
            ))),
            Err(e) => Err(e),
        }
    }

    pub async fn detach(&self, server: &str, volume_id: &str) -> Result<()> {
        self.call(
            Service::Compute,
            Method::DELETE,
            &format!("/servers/{server}/os-volume_attachments/{volume_id}"),
            None,
        )
        .await
        .map(|_| ())
    }
}

fn is_too_many_disks(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("maximum allowed number of disk devices")
        || m.contains("too many disk")
        || m.contains("maximum number of volumes")
}

fn domain(id: &Option<String>, name: &Option<String>) -> Value {
    match (id, name) {
        (Some(id), _) => json!({"id": id}),
        (None, Some(n)) => json!({"name": n}),
        (None, None) => json!({"id": "default"}),
    }
}

fn form_query(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_round_trip() {
        let t = parse_iso8601("2026-11-18T11:06:40.000012Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_secs(1_795_000_000) + Duration::from_micros(12)
        );
        assert!(parse_iso8601("2026-11-18T11:06:40Z").is_some());
        assert!(parse_iso8601("garbage").is_none());
    }

    #[test]
    fn catalog_lookup_prefers_public_and_region() {
        let cat = json!([{"type": "volumev3", "endpoints": [
            {"interface": "internal", "region_id": "R", "url": "http://internal"},
            {"interface": "public", "region_id": "X", "url": "http://x"},
            {"interface": "public", "region_id": "R", "url": "http://r/"}]}]);
        assert_eq!(
            endpoint(&cat, &["volumev3"], Some("R")).as_deref(),
            Some("http://r")
        );
        assert_eq!(endpoint(&cat, &["compute"], None), None);
    }

    #[test]
    fn auth_bodies() {
        let mut c = Credentials {
            auth_url: "http://k/v3".into(),
            username: Some("u".into()),
            password: Some("p".into()),
            project_name: Some("pr".into()),
            user_domain_name: Some("Default".into()),
            project_domain_name: Some("Default".into()),
            ..Default::default()
        };
        let b = Client::new(c.clone()).unwrap().auth_body();
        assert_eq!(b["auth"]["identity"]["methods"][0], "password");
        assert_eq!(b["auth"]["identity"]["password"]["user"]["name"], "u");
        assert_eq!(
            b["auth"]["identity"]["password"]["user"]["domain"]["name"],
            "Default"
        );
        assert_eq!(b["auth"]["scope"]["project"]["name"], "pr");
        c.project_id = Some("pid".into());
        let b = Client::new(c.clone()).unwrap().auth_body();
        assert_eq!(b["auth"]["scope"]["project"], json!({"id": "pid"}));
        c.application_credential_name = Some("ac".into());
        c.application_credential_secret = Some("s".into());
        let b = Client::new(c).unwrap().auth_body();
        assert_eq!(
            b["auth"]["identity"]["methods"][0],
            "application_credential"
        );
        let ac = &b["auth"]["identity"]["application_credential"];
        assert_eq!(ac["name"], "ac");
        assert_eq!(ac["user"]["name"], "u");
        assert!(
            b["auth"].get("scope").is_none(),
            "application credentials carry their scope"
        );
    }

    #[test]
    fn nova_disk_limit_messages() {
        assert!(is_too_many_disks(
            "The maximum allowed number of disk devices (26) to attach to a single instance has been exceeded."
        ));
        assert!(!is_too_many_disks(
            "Invalid volume: status must be available"
        ));
        assert_eq!(percent_encode("a b/ü"), "a%20b%2F%C3%BC");
    }
}
