//! Host operations of the node plugin (blkid, mkfs, mount, resize, statvfs) as plain blocking
//! functions behind a small trait, so the staging logic can be unit-tested with a fake.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{Error, Result};

/// One line of `/proc/self/mountinfo` that the driver cares about.
#[derive(Clone, Debug, PartialEq)]
pub struct MountEntry {
    pub target: PathBuf,
    pub source: String,
    pub fs_type: String,
    pub read_only: bool,
    /// Root of the mount within its filesystem (`/` for a plain mount).
    pub root: String,
    pub major_minor: String,
}

/// Space and inode usage of a mounted filesystem.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FsUsage {
    pub bytes_total: i64,
    pub bytes_available: i64,
    pub bytes_used: i64,
    pub inodes_total: i64,
    pub inodes_free: i64,
    pub inodes_used: i64,
}

/// What the node plugin needs from the host.
pub trait Host: Send + Sync {
    /// Filesystem signature on a device (`None` when blank).
    fn fs_type(&self, device: &Path) -> Result<Option<String>>;
    fn format(&self, device: &Path, fs_type: &str) -> Result<()>;
    fn mount(
        &self,
        source: &Path,
        target: &Path,
        fs_type: Option<&str>,
        options: &[String],
    ) -> Result<()>;
    fn unmount(&self, target: &Path) -> Result<()>;
    fn mounts(&self) -> Result<Vec<MountEntry>>;
    fn device_size(&self, device: &Path) -> Result<u64>;
    /// Grows a mounted filesystem to its device (online).
    fn resize_fs(&self, device: &Path, mount_path: &Path, fs_type: &str) -> Result<()>;
    /// Size of an unmounted ext2/3/4 filesystem in bytes (`None` for other types).
    fn fs_size(&self, device: &Path, fs_type: &str) -> Result<Option<u64>>;
    /// Checks and grows an unmounted ext2/3/4 filesystem to its device (offline).
    fn grow_offline(&self, device: &Path, fs_type: &str) -> Result<()>;
    fn usage(&self, path: &Path) -> Result<FsUsage>;
}

/// The real host.
pub struct RealHost;

fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let name = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| Error::Command {
        command: name.clone(),
        message: e.to_string(),
    })?;
    Ok(out)
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let name = format!("{cmd:?}");
    let out = run(cmd)?;
    if !out.status.success() {
        return Err(Error::Command {
            command: name,
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Decodes the octal escapes of mountinfo (`\040` for a space ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo`.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 2 {
                return None;
            }
            Some(MountEntry {
                major_minor: l[2].to_string(),
                root: unescape(l[3]),
                target: PathBuf::from(unescape(l[4])),
                read_only: l[5].split(',').any(|o| o == "ro"),
                fs_type: r[0].to_string(),
                source: unescape(r[1]),
            })
        })
        .collect()
}

impl Host for RealHost {
    fn fs_type(&self, device: &Path) -> Result<Option<String>> {
        // -p: probe the device itself (no cache); exit 2 = nothing found.
        let out = run(Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "TYPE"])
            .arg(device))?;
        match out.status.code() {
            Some(0) => {
                let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
                Ok(if t.is_empty() { None } else { Some(t) })
            }
            Some(2) => {
                // blkid finds nothing on a blank device, but also on a partition table or an
                // unknown signature; only a device whose first MiB is zero is "blank" to us.
                let mut buf = vec![0u8; 1 << 20];
                let mut f = std::fs::File::open(device)?;
                let n = std::io::Read::read(&mut f, &mut buf)?;
                if buf[..n].iter().all(|b| *b == 0) {
                    Ok(None)
                } else {
                    Ok(Some("unknown".into()))
                }
            }
            _ => Err(Error::Command {
                command: format!("blkid -p {}", device.display()),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }),
        }
    }

    fn format(&self, device: &Path, fs_type: &str) -> Result<()> {
        let mut cmd = match fs_type {
            "ext4" => {
                let mut c = Command::new("mkfs.ext4");
                // lazy init keeps formatting fast; the kernel zeroes tables in the background.
                c.args(["-F", "-q", "-E", "lazy_itable_init=1,lazy_journal_init=1"]);
                c
            }
            "xfs" => {
                let mut c = Command::new("mkfs.xfs");
                c.args(["-q"]);
                c
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unsupported fsType {other:?} (ext4 or xfs)"
                )));
            }
        };
        run_ok(cmd.arg(device)).map(|_| ())
    }

    fn mount(
        &self,
        source: &Path,
        target: &Path,
        fs_type: Option<&str>,
        options: &[String],
    ) -> Result<()> {
        let mut cmd = Command::new("mount");
        if let Some(t) = fs_type {
            cmd.args(["-t", t]);
        }
        if !options.is_empty() {
            cmd.arg("-o").arg(options.join(","));
        }
        run_ok(cmd.arg(source).arg(target)).map(|_| ())
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        run_ok(Command::new("umount").arg(target)).map(|_| ())
    }

    fn mounts(&self) -> Result<Vec<MountEntry>> {
        Ok(parse_mountinfo(&std::fs::read_to_string(
            "/proc/self/mountinfo",
        )?))
    }

    fn device_size(&self, device: &Path) -> Result<u64> {
        let s = run_ok(Command::new("blockdev").arg("--getsize64").arg(device))?;
        s.parse()
            .map_err(|_| Error::Internal(format!("blockdev --getsize64 said {s:?}")))
    }

    fn resize_fs(&self, device: &Path, mount_path: &Path, fs_type: &str) -> Result<()> {
        match fs_type {
            "ext4" | "ext3" | "ext2" => match run_ok(Command::new("resize2fs").arg(device)) {
                Ok(_) => Ok(()),
                Err(Error::Command { message, .. }) if message.contains("Permission denied") => {
                    Err(Error::FailedPrecondition(format!(
                        "the kernel refused to grow the mounted {fs_type} filesystem on {} online \
                         (EXT4_IOC_RESIZE_FS needs CAP_SYS_RESOURCE, which this node plugin \
                         lacks); it grows offline at the next NodeStageVolume",
                        device.display()
                    )))
                }
                Err(e) => Err(e),
            },
            "xfs" => run_ok(Command::new("xfs_growfs").arg(mount_path)).map(|_| ()),
            other => Err(Error::FailedPrecondition(format!(
                "cannot grow a {other} filesystem online"
            ))),
        }
    }

    fn fs_size(&self, device: &Path, fs_type: &str) -> Result<Option<u64>> {
        if !matches!(fs_type, "ext4" | "ext3" | "ext2") {
            return Ok(None);
        }
        let out = run_ok(Command::new("dumpe2fs").arg("-h").arg(device))?;
        let field = |name: &str| -> Option<u64> {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        match (field("Block count:"), field("Block size:")) {
            (Some(n), Some(bs)) => Ok(Some(n * bs)),
            _ => Err(Error::Internal(format!(
                "dumpe2fs -h {}: no block count/size",
                device.display()
            ))),
        }
    }

    fn grow_offline(&self, device: &Path, fs_type: &str) -> Result<()> {
        if !matches!(fs_type, "ext4" | "ext3" | "ext2") {
            return Ok(());
        }
        // resize2fs insists on a fresh check; -p repairs only what is safe. Exit 1 = fixed.
        let out = run(Command::new("e2fsck").args(["-f", "-p"]).arg(device))?;
        if !matches!(out.status.code(), Some(0 | 1)) {
            return Err(Error::FailedPrecondition(format!(
                "e2fsck found problems on {} it cannot fix unattended: {}",
                device.display(),
                String::from_utf8_lossy(&out.stdout).trim()
            )));
        }
        run_ok(Command::new("resize2fs").arg(device)).map(|_| ())
    }

    fn usage(&self, path: &Path) -> Result<FsUsage> {
        let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
        let frsize = s.fragment_size() as i64;
        let total = s.blocks() as i64 * frsize;
        let avail = s.blocks_available() as i64 * frsize;
        let free = s.blocks_free() as i64 * frsize;
        Ok(FsUsage {
            bytes_total: total,
            bytes_available: avail,
            bytes_used: total - free,
            inodes_total: s.files() as i64,
            inodes_free: s.files_free() as i64,
            inodes_used: s.files() as i64 - s.files_free() as i64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 35 7:3 / /var/lib/k/staging ro,relatime shared:5 - xfs /dev/loop3 ro,nouuid\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].target, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].root, "/mnt1");
        assert!(!m[0].read_only);
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[1].fs_type, "xfs");
        assert!(m[1].read_only);
        assert_eq!(m[1].major_minor, "7:3");
    }
}
