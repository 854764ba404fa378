//! The instance's identity (Nova UUID, availability zone) from the config drive or the metadata
//! service, in the configured search order.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{Error, Result};

/// The fields of `openstack/latest/meta_data.json` the driver uses.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct InstanceMetadata {
    pub uuid: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub availability_zone: String,
}

/// Where to look.
#[derive(Clone, Debug)]
pub struct MetadataSource {
    /// `configDrive`, `metadataService`, in order.
    pub search_order: Vec<String>,
    /// A mounted config drive directory, or the config-drive block device (mounted read-only
    /// on demand).
    pub config_drive: PathBuf,
    /// Base URL of the metadata service.
    pub metadata_url: String,
}

const META_PATH: &str = "openstack/latest/meta_data.json";

fn parse(text: &str, from: &str) -> Result<InstanceMetadata> {
    let m: InstanceMetadata = serde_json::from_str(text)
        .map_err(|e| Error::Internal(format!("{from}: bad meta_data.json: {e}")))?;
    if m.uuid.is_empty() {
        return Err(Error::Internal(format!(
            "{from}: meta_data.json has no uuid"
        )));
    }
    Ok(m)
}

fn from_config_drive(path: &Path) -> Result<InstanceMetadata> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::Internal(format!("config drive {}: {e}", path.display())))?;
    if meta.is_dir() {
        let f = path.join(META_PATH);
        let text = std::fs::read_to_string(&f)
            .map_err(|e| Error::Internal(format!("{}: {e}", f.display())))?;
        return parse(&text, &f.display().to_string());
    }
    if !meta.file_type().is_block_device() {
        return Err(Error::Internal(format!(
            "config drive {} is neither a directory nor a block device",
            path.display()
        )));
    }
    let dir = std::env::temp_dir().join(format!("berth-csi-config-drive-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mounted = std::process::Command::new("mount")
        .args(["-o", "ro"])
        .arg(path)
        .arg(&dir)
        .status()?;
    if !mounted.success() {
        let _ = std::fs::remove_dir(&dir);
        return Err(Error::Internal(format!(
            "mount config drive {}",
            path.display()
        )));
    }
    let res = std::fs::read_to_string(dir.join(META_PATH))
        .map_err(Error::from)
        .and_then(|t| parse(&t, "config drive"));
    let _ = std::process::Command::new("umount").arg(&dir).status();
    let _ = std::fs::remove_dir(&dir);
    res
}

async fn from_metadata_service(base: &str) -> Result<InstanceMetadata> {
    let url = format!("{}/{META_PATH}", base.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut last = None;
    // The metadata service can lag at boot: a few bounded tries.
    for attempt in 0..5u32 {
        match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => {
                let text = r.text().await?;
                return parse(&text, &url);
            }
            Ok(r) => last = Some(format!("HTTP {}", r.status())),
            Err(e) => last = Some(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(200 * (1 << attempt))).await;
    }
    Err(Error::Unavailable(format!(
        "metadata service {url}: {}",
        last.unwrap_or_default()
    )))
}

impl MetadataSource {
    /// Tries each source in order and returns the first answer.
    pub async fn fetch(&self) -> Result<InstanceMetadata> {
        let mut errors = Vec::new();
        for s in &self.search_order {
            let r = match s.as_str() {
                "configDrive" => {
                    let p = self.config_drive.clone();
                    tokio::task::spawn_blocking(move || from_config_drive(&p))
                        .await
                        .map_err(|e| Error::Internal(e.to_string()))?
                }
                "metadataService" => from_metadata_service(&self.metadata_url).await,
                other => Err(Error::Config(format!("unknown metadata source {other:?}"))),
            };
            match r {
                Ok(m) => return Ok(m),
                Err(e) => errors.push(format!("{s}: {e}")),
            }
        }
        Err(Error::Unavailable(format!(
            "no instance metadata: {}",
            errors.join("; ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_config_drive_directory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("openstack/latest")).unwrap();
        std::fs::write(
            d.path().join(META_PATH),
            r#"{"uuid":"abc","name":"n1","availability_zone":"GRA1","devices":[]}"#,
        )
        .unwrap();
        let m = from_config_drive(d.path()).unwrap();
        assert_eq!(m.uuid, "abc");
        assert_eq!(m.availability_zone, "GRA1");
        assert!(from_config_drive(&d.path().join("missing")).is_err());
    }
}
