//! Validation of CSI volume capabilities and capacity ranges: RWO only, ext4/xfs, GiB sizes.
use berth_proto::csi::{
    CapacityRange, VolumeCapability,
    volume_capability::{AccessType, access_mode::Mode},
};

use crate::{Error, Result};

pub const GIB: i64 = 1 << 30;
/// Filesystems the driver formats and mounts.
pub const FS_TYPES: &[&str] = &["ext4", "xfs"];
pub const DEFAULT_FS: &str = "ext4";

/// The access type of a validated capability.
#[derive(Clone, Debug, PartialEq)]
pub enum Access {
    Block,
    Mount { fs_type: String, flags: Vec<String> },
}

/// Why a capability is refused (`None`: supported).
pub fn unsupported_reason(cap: &VolumeCapability) -> Option<String> {
    let Some(mode) = cap.access_mode.as_ref() else {
        return Some("volume capability has no access_mode".into());
    };
    match Mode::try_from(mode.mode) {
        Ok(Mode::SingleNodeWriter | Mode::SingleNodeReaderOnly) => {}
        Ok(
            m @ (Mode::MultiNodeReaderOnly
            | Mode::MultiNodeSingleWriter
            | Mode::MultiNodeMultiWriter),
        ) => {
            return Some(format!(
                "access mode {} is not supported: Cinder block volumes attach to one node \
                 (ReadWriteOnce); ReadWriteMany/ReadOnlyMany volumes belong on File Storage (NFS)",
                m.as_str_name()
            ));
        }
        Ok(m @ (Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter)) => {
            return Some(format!(
                "access mode {} is not supported (use SINGLE_NODE_WRITER)",
                m.as_str_name()
            ));
        }
        Ok(Mode::Unknown) | Err(_) => {
            return Some(format!("unknown access mode {}", mode.mode));
        }
    }
    match &cap.access_type {
        None => Some("volume capability has neither block nor mount access type".into()),
        Some(AccessType::Block(_)) => None,
        Some(AccessType::Mount(m)) => {
            if m.fs_type.is_empty() || FS_TYPES.contains(&m.fs_type.as_str()) {
                None
            } else {
                Some(format!(
                    "unsupported fsType {:?}: berth-csi formats ext4 or xfs",
                    m.fs_type
                ))
            }
        }
    }
}

/// Checks one capability and returns its access type.
pub fn check(cap: Option<&VolumeCapability>) -> Result<Access> {
    let cap = cap.ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?;
    if let Some(reason) = unsupported_reason(cap) {
        return Err(Error::InvalidArgument(reason));
    }
    Ok(match cap.access_type.as_ref().expect("checked") {
        AccessType::Block(_) => Access::Block,
        AccessType::Mount(m) => Access::Mount {
            fs_type: if m.fs_type.is_empty() {
                DEFAULT_FS.to_string()
            } else {
                m.fs_type.clone()
            },
            flags: m.mount_flags.clone(),
        },
    })
}

/// Checks a list of capabilities (CreateVolume).
pub fn check_all(caps: &[VolumeCapability]) -> Result<()> {
    if caps.is_empty() {
        return Err(Error::InvalidArgument(
            "volume_capabilities is required".into(),
        ));
    }
    for c in caps {
        check(Some(c))?;
    }
    Ok(())
}

/// Cinder size in GiB for a capacity range: the required size rounded up (1 GiB when absent).
pub fn size_gib(range: Option<&CapacityRange>, max_gib: i64) -> Result<i64> {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if req < 0 || lim < 0 {
        return Err(Error::InvalidArgument(format!(
            "capacity_range must not be negative (required_bytes {req}, limit_bytes {lim})"
        )));
    }
    if lim > 0 && req > lim {
        return Err(Error::InvalidArgument(format!(
            "capacity_range: required_bytes {req} is above limit_bytes {lim}"
        )));
    }
    let gib = if req == 0 {
        1
    } else {
        (req as u64).div_ceil(GIB as u64) as i64
    };
    if lim > 0 && gib * GIB > lim {
        return Err(Error::OutOfRange(format!(
            "Cinder allocates whole GiB: {gib} GiB (from required_bytes {req}) exceeds limit_bytes {lim}"
        )));
    }
    if gib > max_gib {
        return Err(Error::OutOfRange(format!(
            "{gib} GiB is above the largest volume this driver creates ({max_gib} GiB)"
        )));
    }
    Ok(gib)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(mode: Mode, fs: Option<&str>) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(match fs {
                None => AccessType::Block(BlockVolume {}),
                Some(f) => AccessType::Mount(MountVolume {
                    fs_type: f.into(),
                    ..Default::default()
                }),
            }),
        }
    }

    #[test]
    fn rwo_only() {
        assert_eq!(
            check(Some(&cap(Mode::SingleNodeWriter, None))).unwrap(),
            Access::Block
        );
        assert!(matches!(
            check(Some(&cap(Mode::SingleNodeWriter, Some("")))).unwrap(),
            Access::Mount { fs_type, .. } if fs_type == "ext4"
        ));
        let e = check(Some(&cap(Mode::MultiNodeMultiWriter, Some("xfs")))).unwrap_err();
        assert!(e.to_string().contains("File Storage (NFS)"), "{e}");
        assert!(check(Some(&cap(Mode::SingleNodeWriter, Some("btrfs")))).is_err());
        assert!(check(None).is_err());
        assert!(check_all(&[]).is_err());
    }

    #[test]
    fn sizes() {
        let r = |req, lim| CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        };
        assert_eq!(size_gib(None, 100).unwrap(), 1);
        assert_eq!(size_gib(Some(&r(1, 0)), 100).unwrap(), 1);
        assert_eq!(size_gib(Some(&r(GIB + 1, 0)), 100).unwrap(), 2);
        assert!(matches!(
            size_gib(Some(&r(-1, 0)), 100),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            size_gib(Some(&r(GIB + 1, GIB + 2)), 100),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            size_gib(Some(&r(200 * GIB, 0)), 100),
            Err(Error::OutOfRange(_))
        ));
    }
}
