//! The simulator's storage backend: volumes are sparse files, an attachment is a real loop device
//! plus the `virtio-<first 20 chars of the volume id>` link a udev rule would have made.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{Error, Result};

const GIB: u64 = 1 << 30;

/// Where the simulator keeps its files and links.
#[derive(Clone, Debug)]
pub struct Backend {
    /// Directory holding `volume-<id>.img` and `snapshot-<id>.img` sparse files.
    pub data_dir: PathBuf,
    /// Directory standing in for `/dev/disk/by-id` (this machine has no udev).
    pub by_id_dir: PathBuf,
}

/// The by-id name a virtio disk with this volume as serial gets: Nova passes the volume id as
/// the serial, and virtio-blk truncates serials to 20 bytes.
pub fn by_id_name(volume_id: &str) -> String {
    let n = volume_id.len().min(20);
    format!("virtio-{}", &volume_id[..n])
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| Error::Backend(format!("spawn {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(Error::Backend(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Backend {
    /// Creates the directories.
    pub fn prepare(&self) -> Result<()> {
        std::fs::create_dir_all(&self.data_dir)?;
        std::fs::create_dir_all(&self.by_id_dir)?;
        Ok(())
    }

    pub fn volume_file(&self, id: &str) -> PathBuf {
        self.data_dir.join(format!("volume-{id}.img"))
    }

    pub fn snapshot_file(&self, id: &str) -> PathBuf {
        self.data_dir.join(format!("snapshot-{id}.img"))
    }

    pub fn link_path(&self, volume_id: &str) -> PathBuf {
        self.by_id_dir.join(by_id_name(volume_id))
    }

    /// A new sparse volume of `size_gb` GiB, optionally with the content of `source` (a snapshot
    /// or another volume), copied sparsely.
    pub fn create_volume(&self, id: &str, size_gb: u64, source: Option<&Path>) -> Result<()> {
        let path = self.volume_file(id);
        if let Some(src) = source {
            copy_sparse(src, &path)?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        f.set_len(size_gb * GIB)?;
        Ok(())
    }

    pub fn delete_volume(&self, id: &str) -> Result<()> {
        remove_if_exists(&self.volume_file(id))
    }

    pub fn snapshot(&self, volume_id: &str, snapshot_id: &str) -> Result<()> {
        copy_sparse(
            &self.volume_file(volume_id),
            &self.snapshot_file(snapshot_id),
        )
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        remove_if_exists(&self.snapshot_file(id))
    }

    /// Grows the file; when attached, tells the loop driver to pick up the new size (the guest
    /// sees a capacity change, as with a virtio disk resized by Nova).
    pub fn extend(&self, id: &str, size_gb: u64, loop_dev: Option<&str>) -> Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.volume_file(id))?;
        f.set_len(size_gb * GIB)?;
        if let Some(dev) = loop_dev {
            run(Command::new("losetup").args(["--set-capacity", dev]))?;
        }
        Ok(())
    }

    /// Attaches: a loop device over the volume file, and the by-id link to it. Returns the loop
    /// device path.
    pub fn attach(&self, volume_id: &str) -> Result<String> {
        let file = self.volume_file(volume_id);
        let dev = run(Command::new("losetup")
            .args(["--find", "--show", "--direct-io=off"])
            .arg(&file))?;
        let link = self.link_path(volume_id);
        remove_if_exists(&link)?;
        if let Err(e) = std::os::unix::fs::symlink(&dev, &link) {
            let _ = self.detach_device(&dev);
            return Err(e.into());
        }
        Ok(dev)
    }

    /// Detaches: removes the link and the loop device.
    pub fn detach(&self, volume_id: &str, loop_dev: &str) -> Result<()> {
        remove_if_exists(&self.link_path(volume_id))?;
        self.detach_device(loop_dev)
    }

    fn detach_device(&self, dev: &str) -> Result<()> {
        // A loop device still open (mounted) is detached lazily by the kernel once released
        // (autoclear), which is what a forced Nova detach looks like from the guest.
        run(Command::new("losetup").args(["-d", dev])).map(|_| ())
    }
}

fn copy_sparse(src: &Path, dst: &Path) -> Result<()> {
    run(Command::new("cp").arg("--sparse=always").arg(src).arg(dst)).map(|_| ())
}

fn remove_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_id_name_truncates_to_twenty() {
        assert_eq!(
            by_id_name("0f2b1f9e-6a3c-4c52-9a8f-1b2c3d4e5f60"),
            "virtio-0f2b1f9e-6a3c-4c52-9"
        );
        assert_eq!(by_id_name("short"), "virtio-short");
    }
}
