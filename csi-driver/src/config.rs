//! OpenStack credentials, read as every OpenStack tool does: a cinder-csi-plugin style
//! `cloud.conf` (`[Global]`), a `clouds.yaml` entry, or `OS_*` environment variables.
use std::{collections::HashMap, path::Path};

use serde::Deserialize;

use crate::{Error, Result};

/// Where to authenticate and as whom. `Debug` never prints secrets.
#[derive(Clone, Default, PartialEq)]
pub struct Credentials {
    /// Keystone v3 URL (normalised to end in `/v3`).
    pub auth_url: String,
    pub username: Option<String>,
    pub user_id: Option<String>,
    pub password: Option<String>,
    pub user_domain_name: Option<String>,
    pub user_domain_id: Option<String>,
    pub project_name: Option<String>,
    pub project_id: Option<String>,
    pub project_domain_name: Option<String>,
    pub project_domain_id: Option<String>,
    pub application_credential_id: Option<String>,
    pub application_credential_name: Option<String>,
    pub application_credential_secret: Option<String>,
    pub region: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |o: &Option<String>| o.as_ref().map(|_| "<redacted>");
        f.debug_struct("Credentials")
            .field("auth_url", &self.auth_url)
            .field("username", &self.username)
            .field("user_id", &self.user_id)
            .field("password", &redact(&self.password))
            .field("project_name", &self.project_name)
            .field("project_id", &self.project_id)
            .field("application_credential_id", &self.application_credential_id)
            .field(
                "application_credential_secret",
                &redact(&self.application_credential_secret),
            )
            .field("region", &self.region)
            .finish()
    }
}

/// Settings of a cinder-csi style `cloud.conf` beyond the credentials.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CloudConf {
    pub credentials: Credentials,
    /// `[BlockStorage] node-volume-attach-limit`.
    pub node_volume_attach_limit: Option<i64>,
    /// `[Metadata] search-order`, e.g. `configDrive,metadataService`.
    pub metadata_search_order: Option<String>,
}

fn normalise_auth_url(u: &str) -> String {
    let u = u.trim_end_matches('/');
    if u.ends_with("/v3") {
        u.to_string()
    } else {
        format!("{u}/v3")
    }
}

impl Credentials {
    /// Checks that one authentication method is complete.
    pub fn validate(mut self) -> Result<Self> {
        if self.auth_url.is_empty() {
            return Err(Error::Config(
                "no auth URL (auth-url / auth_url / OS_AUTH_URL)".into(),
            ));
        }
        self.auth_url = normalise_auth_url(&self.auth_url);
        let app = self.application_credential_secret.is_some()
            && (self.application_credential_id.is_some()
                || self.application_credential_name.is_some());
        let pw = self.password.is_some()
            && (self.username.is_some() || self.user_id.is_some())
            && (self.project_id.is_some() || self.project_name.is_some());
        if !app && !pw {
            return Err(Error::Config(
                "incomplete credentials: need an application credential (id or name + secret) or \
                 a user, password and project"
                    .into(),
            ));
        }
        Ok(self)
    }

    /// From `OS_*` variables (an explicit map, so tests need not touch the process environment).
    pub fn from_env_map(env: &HashMap<String, String>) -> Result<Self> {
        let g = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        Credentials {
            auth_url: g("OS_AUTH_URL").unwrap_or_default(),
            username: g("OS_USERNAME"),
            user_id: g("OS_USER_ID"),
            password: g("OS_PASSWORD"),
            user_domain_name: g("OS_USER_DOMAIN_NAME").or_else(|| g("OS_DOMAIN_NAME")),
            user_domain_id: g("OS_USER_DOMAIN_ID").or_else(|| g("OS_DOMAIN_ID")),
            project_name: g("OS_PROJECT_NAME").or_else(|| g("OS_TENANT_NAME")),
            project_id: g("OS_PROJECT_ID").or_else(|| g("OS_TENANT_ID")),
            project_domain_name: g("OS_PROJECT_DOMAIN_NAME").or_else(|| g("OS_DOMAIN_NAME")),
            project_domain_id: g("OS_PROJECT_DOMAIN_ID").or_else(|| g("OS_DOMAIN_ID")),
            application_credential_id: g("OS_APPLICATION_CREDENTIAL_ID"),
            application_credential_name: g("OS_APPLICATION_CREDENTIAL_NAME"),
            application_credential_secret: g("OS_APPLICATION_CREDENTIAL_SECRET"),
            region: g("OS_REGION_NAME"),
        }
        .validate()
    }

    /// From the process's `OS_*` variables.
    pub fn from_env() -> Result<Self> {
        Self::from_env_map(&std::env::vars().collect())
    }

    /// Entry `cloud` of a clouds.yaml document.
    pub fn from_clouds_yaml(text: &str, cloud: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Doc {
            clouds: HashMap<String, Cloud>,
        }
        #[derive(Deserialize)]
        struct Cloud {
            #[serde(default)]
            auth: HashMap<String, String>,
            region_name: Option<String>,
        }
        let doc: Doc =
            serde_saphyr::from_str(text).map_err(|e| Error::Config(format!("clouds.yaml: {e}")))?;
        let c = doc
            .clouds
            .get(cloud)
            .ok_or_else(|| Error::Config(format!("clouds.yaml has no cloud named {cloud:?}")))?;
        let a = |k: &str| c.auth.get(k).cloned();
        Credentials {
            auth_url: a("auth_url").unwrap_or_default(),
            username: a("username"),
            user_id: a("user_id"),
            password: a("password"),
            user_domain_name: a("user_domain_name").or_else(|| a("domain_name")),
            user_domain_id: a("user_domain_id").or_else(|| a("domain_id")),
            project_name: a("project_name").or_else(|| a("tenant_name")),
            project_id: a("project_id").or_else(|| a("tenant_id")),
            project_domain_name: a("project_domain_name").or_else(|| a("domain_name")),
            project_domain_id: a("project_domain_id").or_else(|| a("domain_id")),
            application_credential_id: a("application_credential_id"),
            application_credential_name: a("application_credential_name"),
            application_credential_secret: a("application_credential_secret"),
            region: c.region_name.clone(),
        }
        .validate()
    }
}

impl CloudConf {
    /// Parses a cinder-csi-plugin `cloud.conf`.
    pub fn parse(text: &str) -> Result<Self> {
        let ini =
            ini::Ini::load_from_str(text).map_err(|e| Error::Config(format!("cloud.conf: {e}")))?;
        let global = ini
            .section(Some("Global"))
            .ok_or_else(|| Error::Config("cloud.conf has no [Global] section".into()))?;
        let g = |k: &str| {
            global
                .get(k)
                .map(|v| v.trim().trim_matches('"').to_string())
        };
        let credentials = Credentials {
            auth_url: g("auth-url").unwrap_or_default(),
            username: g("username"),
            user_id: g("user-id"),
            password: g("password"),
            user_domain_name: g("user-domain-name").or_else(|| g("domain-name")),
            user_domain_id: g("user-domain-id").or_else(|| g("domain-id")),
            project_name: g("tenant-name").or_else(|| g("project-name")),
            project_id: g("tenant-id").or_else(|| g("project-id")),
            project_domain_name: g("tenant-domain-name")
                .or_else(|| g("project-domain-name"))
                .or_else(|| g("domain-name")),
            project_domain_id: g("tenant-domain-id")
                .or_else(|| g("project-domain-id"))
                .or_else(|| g("domain-id")),
            application_credential_id: g("application-credential-id"),
            application_credential_name: g("application-credential-name"),
            application_credential_secret: g("application-credential-secret"),
            region: g("region"),
        }
        .validate()?;
        let node_volume_attach_limit = ini
            .section(Some("BlockStorage"))
            .and_then(|s| s.get("node-volume-attach-limit"))
            .map(|v| {
                v.trim().parse::<i64>().map_err(|_| {
                    Error::Config(format!("node-volume-attach-limit {v:?} is not a number"))
                })
            })
            .transpose()?;
        let metadata_search_order = ini
            .section(Some("Metadata"))
            .and_then(|s| s.get("search-order"))
            .map(|s| s.trim().to_string());
        Ok(CloudConf {
            credentials,
            node_volume_attach_limit,
            metadata_search_order,
        })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("read {}: {e}", path.display())))?;
        Self::parse(&text)
    }
}

/// Loads credentials: `cloud.conf` if given, else `clouds.yaml` (explicit path, `OS_CLIENT_CONFIG_FILE`
/// or the usual locations) when a cloud name is known, else `OS_*` variables.
pub fn load_credentials(
    cloud_conf: Option<&Path>,
    clouds_yaml: Option<&Path>,
    cloud: Option<&str>,
) -> Result<(Credentials, CloudConf)> {
    if let Some(p) = cloud_conf {
        let c = CloudConf::load(p)?;
        return Ok((c.credentials.clone(), c));
    }
    let cloud = cloud
        .map(str::to_string)
        .or_else(|| std::env::var("OS_CLOUD").ok().filter(|s| !s.is_empty()));
    if let Some(cloud) = cloud {
        let mut candidates: Vec<std::path::PathBuf> = Vec::new();
        if let Some(p) = clouds_yaml {
            candidates.push(p.to_path_buf());
        } else {
            if let Ok(p) = std::env::var("OS_CLIENT_CONFIG_FILE") {
                candidates.push(p.into());
            }
            candidates.push("clouds.yaml".into());
            if let Ok(h) = std::env::var("HOME") {
                candidates.push(Path::new(&h).join(".config/openstack/clouds.yaml"));
            }
            candidates.push("/etc/openstack/clouds.yaml".into());
        }
        for p in &candidates {
            if let Ok(text) = std::fs::read_to_string(p) {
                let c = Credentials::from_clouds_yaml(&text, &cloud)?;
                return Ok((c, CloudConf::default()));
            }
        }
        return Err(Error::Config(format!(
            "cloud {cloud:?} requested but no clouds.yaml found (looked in {candidates:?})"
        )));
    }
    Ok((Credentials::from_env()?, CloudConf::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_conf_global_and_limits() {
        let c = CloudConf::parse(
            "[Global]\nauth-url = https://auth.example/v3/\nusername = u\npassword = \"p w\"\n\
             tenant-id = t1\ndomain-name = Default\nregion = GRA7\n\n[BlockStorage]\n\
             node-volume-attach-limit = 50\n[Metadata]\nsearch-order = configDrive,metadataService\n",
        )
        .unwrap();
        assert_eq!(c.credentials.auth_url, "https://auth.example/v3");
        assert_eq!(c.credentials.password.as_deref(), Some("p w"));
        assert_eq!(c.credentials.project_id.as_deref(), Some("t1"));
        assert_eq!(c.credentials.user_domain_name.as_deref(), Some("Default"));
        assert_eq!(c.node_volume_attach_limit, Some(50));
        assert_eq!(
            c.metadata_search_order.as_deref(),
            Some("configDrive,metadataService")
        );
        assert!(
            !format!("{:?}", c.credentials).contains("p w"),
            "secret leaked in Debug"
        );
    }

    #[test]
    fn cloud_conf_application_credential_and_errors() {
        let c = CloudConf::parse(
            "[Global]\nauth-url=http://k:5000\napplication-credential-id=ac\n\
             application-credential-secret=s\n",
        )
        .unwrap();
        assert_eq!(c.credentials.auth_url, "http://k:5000/v3");
        assert!(CloudConf::parse("[Global]\nauth-url=http://k\nusername=u\n").is_err());
        assert!(CloudConf::parse("[Other]\nx=1\n").is_err());
    }

    #[test]
    fn clouds_yaml_entry() {
        let y = "clouds:\n  mine:\n    auth:\n      auth_url: http://k/identity\n      username: u\n      \
                 password: p\n      project_name: pr\n      user_domain_name: Default\n    region_name: R\n";
        let c = Credentials::from_clouds_yaml(y, "mine").unwrap();
        assert_eq!(c.auth_url, "http://k/identity/v3");
        assert_eq!(c.region.as_deref(), Some("R"));
        assert!(Credentials::from_clouds_yaml(y, "other").is_err());
    }

    #[test]
    fn env_variables() {
        let env: HashMap<String, String> = [
            ("OS_AUTH_URL", "http://k/v3"),
            ("OS_APPLICATION_CREDENTIAL_ID", "id"),
            ("OS_APPLICATION_CREDENTIAL_SECRET", "s"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let c = Credentials::from_env_map(&env).unwrap();
        assert_eq!(c.application_credential_id.as_deref(), Some("id"));
        assert!(Credentials::from_env_map(&HashMap::new()).is_err());
    }
}
