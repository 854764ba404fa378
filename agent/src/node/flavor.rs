//! Flavor table and the reserved-resources rule.
//!
//! Reserved resources (kube-reserved + system-reserved) follow one rule for every flavor, chosen
//! so that the seed's b3-16 figure comes out exactly:
//!
//! - CPU: 90 m + 20 m per vCPU (b3-16, 4 vCPU → 170 m);
//! - memory: 0.63 GB + 6 % of RAM (b3-16, 16 GB → 1.59 GB);
//! - storage: 30 GB for images, logs and the OS (flat).
//!
//! The table gives each known flavor's vCPUs, RAM and disk; a flavor not in it uses the
//! machine's own figures (from `/proc`) with the same rule. Allocatable = capacity − reserved.
//! Sizes are decimal (1 GB = 10⁹ bytes), as OpenStack flavors are sold.

/// Machine shape of a flavor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub vcpus: u32,
    pub ram_gb: u32,
    pub disk_gb: u32,
    pub gpus: u32,
}

/// Resources in Kubernetes units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Res {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub storage_bytes: u64,
    pub pods: u32,
}

const GB: u64 = 1_000_000_000;
/// Pods per node (OVHcloud MKS: 110).
pub const MAX_PODS: u32 = 110;

/// Known flavors.
pub const FLAVORS: &[(&str, Shape)] = &[
    (
        "b3-8",
        Shape {
            vcpus: 2,
            ram_gb: 8,
            disk_gb: 50,
            gpus: 0,
        },
    ),
    (
        "b3-16",
        Shape {
            vcpus: 4,
            ram_gb: 16,
            disk_gb: 100,
            gpus: 0,
        },
    ),
    (
        "b3-32",
        Shape {
            vcpus: 8,
            ram_gb: 32,
            disk_gb: 200,
            gpus: 0,
        },
    ),
    (
        "b3-64",
        Shape {
            vcpus: 16,
            ram_gb: 64,
            disk_gb: 400,
            gpus: 0,
        },
    ),
    (
        "b3-128",
        Shape {
            vcpus: 32,
            ram_gb: 128,
            disk_gb: 400,
            gpus: 0,
        },
    ),
    (
        "r3-16",
        Shape {
            vcpus: 2,
            ram_gb: 16,
            disk_gb: 50,
            gpus: 0,
        },
    ),
    (
        "r3-32",
        Shape {
            vcpus: 4,
            ram_gb: 32,
            disk_gb: 100,
            gpus: 0,
        },
    ),
    (
        "r3-64",
        Shape {
            vcpus: 8,
            ram_gb: 64,
            disk_gb: 200,
            gpus: 0,
        },
    ),
    (
        "r3-128",
        Shape {
            vcpus: 16,
            ram_gb: 128,
            disk_gb: 400,
            gpus: 0,
        },
    ),
    (
        "t1-45",
        Shape {
            vcpus: 8,
            ram_gb: 45,
            disk_gb: 400,
            gpus: 1,
        },
    ),
    (
        "t1-90",
        Shape {
            vcpus: 18,
            ram_gb: 90,
            disk_gb: 800,
            gpus: 2,
        },
    ),
];

/// The shape of a known flavor.
pub fn lookup(flavor: &str) -> Option<Shape> {
    FLAVORS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(flavor))
        .map(|(_, s)| *s)
}

/// Capacity of a shape.
pub fn capacity(shape: Shape) -> Res {
    Res {
        cpu_millis: u64::from(shape.vcpus) * 1000,
        memory_bytes: u64::from(shape.ram_gb) * GB,
        storage_bytes: u64::from(shape.disk_gb) * GB,
        pods: MAX_PODS,
    }
}

/// The reserved-resources rule (see the module docs).
pub fn reserved(cap: Res) -> Res {
    let vcpus = cap.cpu_millis / 1000;
    Res {
        cpu_millis: 90 + 20 * vcpus,
        memory_bytes: 630_000_000 + cap.memory_bytes * 6 / 100,
        storage_bytes: (30 * GB).min(cap.storage_bytes),
        pods: 0,
    }
}

/// Capacity − reserved.
pub fn allocatable(cap: Res, reserved: Res) -> Res {
    Res {
        cpu_millis: cap.cpu_millis.saturating_sub(reserved.cpu_millis),
        memory_bytes: cap.memory_bytes.saturating_sub(reserved.memory_bytes),
        storage_bytes: cap.storage_bytes.saturating_sub(reserved.storage_bytes),
        pods: cap.pods,
    }
}

/// Capacity of this machine, for flavors not in the table: vCPUs from `/proc/cpuinfo`
/// (`processor` lines), RAM from `MemTotal` in `/proc/meminfo`, disk from `disk_bytes`.
pub fn detected_capacity(cpuinfo: &str, meminfo: &str, disk_bytes: u64) -> Res {
    let vcpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count()
        .max(1) as u64;
    let mem_kb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Res {
        cpu_millis: vcpus * 1000,
        memory_bytes: mem_kb * 1024,
        storage_bytes: disk_bytes,
        pods: MAX_PODS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b3_16_matches_the_seed() {
        let cap = capacity(lookup("b3-16").unwrap());
        let r = reserved(cap);
        assert_eq!(r.cpu_millis, 170);
        assert_eq!(r.memory_bytes, 1_590_000_000);
        assert_eq!(r.storage_bytes, 30 * GB);
        let a = allocatable(cap, r);
        assert_eq!(a.cpu_millis, 3830);
        assert_eq!(a.memory_bytes, 14_410_000_000);
        assert_eq!(a.pods, 110);
    }

    #[test]
    fn every_required_flavor_is_known() {
        for f in [
            "b3-8", "b3-16", "b3-32", "b3-64", "r3-64", "r3-128", "t1-45",
        ] {
            let s = lookup(f).unwrap_or_else(|| panic!("{f} missing"));
            let cap = capacity(s);
            let r = reserved(cap);
            assert!(
                r.cpu_millis < cap.cpu_millis && r.memory_bytes < cap.memory_bytes,
                "{f}"
            );
        }
        assert_eq!(lookup("T1-45").unwrap().gpus, 1);
        assert!(lookup("x9-1").is_none());
    }

    #[test]
    fn detection_for_unknown_flavors() {
        let cpu = "processor\t: 0\nmodel name: x\nprocessor\t: 1\n";
        let mem = "MemTotal:       24576000 kB\nMemFree: 1 kB\n";
        let cap = detected_capacity(cpu, mem, 80 * GB);
        assert_eq!(cap.cpu_millis, 2000);
        assert_eq!(cap.memory_bytes, 24_576_000 * 1024);
        assert_eq!(reserved(cap).cpu_millis, 130);
    }
}
