//! The eBPF datapath: loads Berth's tc programs, pins programs and maps under the pin root, adopts
//! existing pins on restart, attaches programs to pods' host-side veths, and reads counters.
//!
//! Pins: `<pin root>/maps/<MAP>` (maps declared `pinned` in the object, reused by name) and
//! `<pin root>/progs/<program>`. tc filters are attached through netlink (clsact, fixed priority
//! and handle), so they belong to the interface, not to this process: a killed agent leaves the
//! datapath running, and the restarted agent adopts the pinned programs and maps.
use crate::error::{Error, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuHashMap,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
    },
};
use berth_ebpf_common::{
    ALL_MAPS, ALL_PROGRAMS, DatapathConfig, EndpointInfo, IpcacheEntry, LAYOUT_VERSION, MAP_CONFIG,
    MAP_ENDPOINTS, MAP_IPCACHE, MAP_METRICS, MetricKey, MetricValue, PROG_FROM_NETDEV,
    PROG_FROM_OVERLAY, PROG_FROM_POD, PROG_TO_OVERLAY, PROG_TO_POD, drop_reason, metric,
};
use ipnet::Ipv4Net;
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

/// The compiled kernel object (built by agent/build.rs from ebpf/berth-ebpf).
pub static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/berth.bpf.o"));

/// tc priority and handle of Berth's filters.
const TC_PRIORITY: u16 = 1;
const TC_HANDLE: u32 = 1;

/// Counters of one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub drops: BTreeMap<String, u64>,
}

/// What `berthctl status` shows about the datapath.
#[derive(Debug, Clone, Default)]
pub struct Info {
    pub loaded: bool,
    pub pin_root: String,
    pub programs: Vec<String>,
    pub maps: Vec<String>,
    pub adopted: bool,
}

/// The operations the agent needs from a datapath (a fake implements it in unit tests).
pub trait Datapath: Send {
    /// Writes (or rewrites) the endpoint entry for `ip`.
    fn upsert_endpoint(&mut self, ip: Ipv4Addr, info: EndpointInfo) -> Result<()>;
    /// Removes the endpoint entry and its counters (absent entries are fine).
    fn remove_endpoint(&mut self, ip: Ipv4Addr, endpoint_id: u32) -> Result<()>;
    /// Attaches the pod programs to host-side interface `ifname` (replacing older ones).
    fn attach(&mut self, ifname: &str) -> Result<()>;
    /// Counters of an endpoint.
    fn stats(&self, endpoint_id: u32) -> Stats;
    /// Status.
    fn info(&self) -> Info;
    /// True when programs were freshly loaded (not adopted), so existing endpoints need their
    /// filters re-pointed at the new programs.
    fn needs_reattach(&self) -> bool;
    /// True while the host-side interface `ifname` with index `ifindex` exists. A pod's veth pair
    /// disappears when its network namespace is destroyed, so a missing interface means the pod
    /// is gone.
    fn link_present(&self, ifname: &str, ifindex: u32) -> bool {
        nix::net::if_::if_nametoindex(ifname).ok() == Some(ifindex)
    }
}

/// A 64-bit FNV-1a digest (identifies the kernel object whose programs are pinned).
fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11; // statfs f_type of bpffs

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|st| st.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes sure the pin root can live on a bpf filesystem: mounts bpffs at /sys/fs/bpf when the
/// pin root is below it and nothing is mounted there yet (as Cilium does), then creates the
/// directories.
fn prepare_pin_root(pin_root: &Path) -> Result<()> {
    let sysfs_bpf = Path::new("/sys/fs/bpf");
    if pin_root.starts_with(sysfs_bpf) && sysfs_bpf.is_dir() && !is_bpffs(sysfs_bpf) {
        nix::mount::mount(
            Some("bpf"),
            sysfs_bpf,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| Error::io("mount bpffs at /sys/fs/bpf", e.into()))?;
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    for d in [pin_root.join("maps"), pin_root.join("progs")] {
        std::fs::create_dir_all(&d).map_err(|e| Error::io(format!("create {}", d.display()), e))?;
    }
    if !is_bpffs(pin_root) {
        return Err(Error::Config(format!(
            "pin root {} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)",
            pin_root.display()
        )));
    }
    Ok(())
}

/// What a node device is to the datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRole {
    /// The native device to the private network: `berth_from_netdev` on ingress.
    Uplink,
    /// The flow-based VXLAN device: `berth_from_overlay` on ingress, `berth_to_overlay` on egress.
    Overlay,
}

/// File in the state directory that records the [`LAYOUT_VERSION`] of the pinned maps (bpffs holds
/// only pins).
pub const LAYOUT_FILE: &str = "datapath-layout";

/// Checks every pinned map against this object's definition of it (map type, key and value size,
/// capacity, flags) and the recorded [`LAYOUT_VERSION`]; unpins the ones that differ so that the
/// loader creates them afresh (aya would otherwise reuse a pin of any layout and the programs would
/// misread it). Returns the names of the maps that will be re-created.
pub fn check_map_layouts(pin_root: &Path, state_dir: &Path) -> Result<Vec<String>> {
    let obj = aya_obj::Object::parse(BPF_OBJECT)
        .map_err(|e| Error::Datapath(format!("parse the datapath object: {e}")))?;
    let maps_dir = pin_root.join("maps");
    let recorded = std::fs::read_to_string(state_dir.join(LAYOUT_FILE))
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok());
    let mut recreated = Vec::new();
    for name in ALL_MAPS {
        let pin = maps_dir.join(name);
        if !pin.exists() {
            continue;
        }
        let def = obj
            .maps
            .get(name)
            .ok_or_else(|| Error::Datapath(format!("map {name} missing from object")))?;
        let why = match aya::maps::MapInfo::from_pin(&pin) {
            Err(e) => Some(format!("unreadable pin: {e}")),
            Ok(_) if recorded != Some(LAYOUT_VERSION) => Some(format!(
                "pins written by layout {recorded:?}, this agent uses {LAYOUT_VERSION}"
            )),
            Ok(info) => {
                let have = (
                    info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
                    info.key_size(),
                    info.value_size(),
                    info.max_entries(),
                    info.map_flags(),
                );
                let want = (
                    def.map_type(),
                    def.key_size(),
                    def.value_size(),
                    def.max_entries(),
                    def.map_flags(),
                );
                (have != want).then(|| {
                    format!("pinned (type, key, value, entries, flags) {have:?}, object {want:?}")
                })
            }
        };
        if let Some(why) = why {
            tracing::warn!(map = name, reason = %why, "map layout differs; re-creating it");
            std::fs::remove_file(&pin)
                .map_err(|e| Error::io(format!("unpin {}", pin.display()), e))?;
            recreated.push(name.to_string());
        }
    }
    Ok(recreated)
}

/// The ipcache, opened from its pin: written by the routing reconciler (remote pod CIDRs → the
/// node that hosts them).
pub struct Ipcache {
    map: LpmTrie<MapData, u32, IpcacheEntry>,
}

impl Ipcache {
    pub fn open(pin_root: &Path) -> Result<Self> {
        let data = MapData::from_pin(pin_root.join("maps").join(MAP_IPCACHE))?;
        let map = LpmTrie::try_from(aya::maps::Map::LpmTrie(data))?;
        Ok(Ipcache { map })
    }

    fn key(cidr: &Ipv4Net) -> Key<u32> {
        Key::new(
            u32::from(cidr.prefix_len()),
            u32::from_ne_bytes(cidr.network().octets()),
        )
    }

    pub fn upsert(&mut self, cidr: &Ipv4Net, entry: IpcacheEntry) -> Result<()> {
        self.map.insert(&Self::key(cidr), entry, 0)?;
        Ok(())
    }

    pub fn remove(&mut self, cidr: &Ipv4Net) -> Result<()> {
        match self.map.remove(&Self::key(cidr)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every entry, by CIDR.
    pub fn entries(&self) -> Result<BTreeMap<Ipv4Net, IpcacheEntry>> {
        let mut out = BTreeMap::new();
        for kv in self.map.iter() {
            let (k, v) = kv?;
            let addr = Ipv4Addr::from(k.data().to_ne_bytes());
            let net = Ipv4Net::new(addr, k.prefix_len() as u8)
                .map_err(|e| Error::Datapath(format!("bad ipcache key: {e}")))?;
            out.insert(net, v);
        }
        Ok(out)
    }
}

/// The real datapath.
pub struct EbpfDatapath {
    _ebpf: Ebpf,
    progs: BTreeMap<&'static str, SchedClassifier>,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    metrics: PerCpuHashMap<MapData, MetricKey, MetricValue>,
    pin_root: PathBuf,
    adopted: bool,
}

impl EbpfDatapath {
    /// Loads or adopts the datapath under `pin_root`. `state_dir` remembers which object the pinned
    /// programs came from: pins of the same object are adopted; otherwise the programs are loaded
    /// again and the pins replaced. Maps are kept across upgrades when their layout is unchanged;
    /// a pinned map of another layout (see [`check_map_layouts`]) is unpinned and re-created, and
    /// the programs are then reloaded too, so that nothing ever reads a map with the wrong layout.
    /// Programs already attached keep the maps they were loaded with until the agent re-points
    /// their filters (after repopulating the new maps), so traffic keeps flowing meanwhile.
    pub fn load(pin_root: &Path, state_dir: &Path, config: DatapathConfig) -> Result<Self> {
        let maps_dir = pin_root.join("maps");
        let progs_dir = pin_root.join("progs");
        prepare_pin_root(pin_root)?;
        std::fs::create_dir_all(state_dir)
            .map_err(|e| Error::io(format!("create {}", state_dir.display()), e))?;
        let recreated = check_map_layouts(pin_root, state_dir)?;
        let mut ebpf = EbpfLoader::new().map_pin_path(&maps_dir).load(BPF_OBJECT)?;

        let digest = format!("{:016x}", fnv64(BPF_OBJECT));
        let digest_file = state_dir.join("datapath-object");
        let same_object = std::fs::read_to_string(&digest_file).is_ok_and(|d| d.trim() == digest);
        let all_pinned = ALL_PROGRAMS.iter().all(|p| progs_dir.join(p).exists());
        let adopted = same_object && all_pinned && recreated.is_empty();
        if !adopted {
            for name in ALL_PROGRAMS {
                let prog: &mut SchedClassifier = ebpf
                    .program_mut(name)
                    .ok_or_else(|| Error::Datapath(format!("program {name} missing from object")))?
                    .try_into()?;
                prog.load()?;
                let pin = progs_dir.join(name);
                if pin.exists() {
                    std::fs::remove_file(&pin)
                        .map_err(|e| Error::io(format!("remove old pin {}", pin.display()), e))?;
                }
                prog.pin(&pin)?;
            }
            std::fs::write(&digest_file, &digest)
                .map_err(|e| Error::io(format!("write {}", digest_file.display()), e))?;
        }
        let mut progs = BTreeMap::new();
        for name in ALL_PROGRAMS {
            progs.insert(name, SchedClassifier::from_pin(progs_dir.join(name))?);
        }

        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| Error::Datapath(format!("map {name} missing from object")))
        };
        let endpoints = HashMap::try_from(take(&mut ebpf, MAP_ENDPOINTS)?)?;
        let metrics = PerCpuHashMap::try_from(take(&mut ebpf, MAP_METRICS)?)?;
        let mut cfg: Array<MapData, DatapathConfig> =
            Array::try_from(take(&mut ebpf, MAP_CONFIG)?)?;
        cfg.set(0, config, 0)?;
        let layout_file = state_dir.join(LAYOUT_FILE);
        std::fs::write(&layout_file, LAYOUT_VERSION.to_string())
            .map_err(|e| Error::io(format!("write {}", layout_file.display()), e))?;
        tracing::info!(
            pin_root = %pin_root.display(),
            adopted,
            recreated_maps = ?recreated,
            "datapath {}",
            if adopted { "adopted from pins" } else { "loaded and pinned" }
        );
        Ok(EbpfDatapath {
            _ebpf: ebpf,
            progs,
            endpoints,
            metrics,
            pin_root: pin_root.into(),
            adopted,
        })
    }

    /// Attaches a device program (`berth_from_netdev` on the uplink's ingress, the overlay pair on
    /// the VXLAN device), replacing an older one.
    pub fn attach_device(&mut self, ifname: &str, role: DeviceRole) -> Result<()> {
        let progs: &[(&'static str, TcAttachType)] = match role {
            DeviceRole::Uplink => &[(PROG_FROM_NETDEV, TcAttachType::Ingress)],
            DeviceRole::Overlay => &[
                (PROG_FROM_OVERLAY, TcAttachType::Ingress),
                (PROG_TO_OVERLAY, TcAttachType::Egress),
            ],
        };
        self.attach_programs(ifname, progs)
    }

    fn attach_programs(
        &mut self,
        ifname: &str,
        progs: &[(&'static str, TcAttachType)],
    ) -> Result<()> {
        // EEXIST when the interface already has the qdisc.
        let _ = tc::qdisc_add_clsact(ifname);
        for &(name, attach_type) in progs {
            let prog = self.progs.get_mut(name).expect("program loaded");
            let opts = TcAttachOptions::Netlink(NlOptions {
                priority: TC_PRIORITY,
                handle: TC_HANDLE,
            });
            let id = match prog.attach_with_options(ifname, attach_type, opts) {
                Ok(id) => id,
                Err(create_err) => {
                    // Already attached (agent restart, retry): atomically replace the program.
                    let link =
                        SchedClassifierLink::attached(ifname, attach_type, TC_PRIORITY, TC_HANDLE)
                            .map_err(|e| Error::io(format!("find interface {ifname}"), e))?;
                    prog.attach_to_link(link).map_err(|e| {
                        Error::Datapath(format!(
                            "attach {name} to {ifname}: {create_err}; replace: {e}"
                        ))
                    })?
                }
            };
            // The filter belongs to the interface: it must outlive this process (and goes away
            // with the interface), so the link handle is deliberately not dropped (drop detaches).
            std::mem::forget(prog.take_link(id)?);
        }
        Ok(())
    }
}

/// Removes pins this version of the datapath does not use (maps and programs of older layouts).
/// Call once every filter points at the current programs.
pub fn retire_unused_pins(pin_root: &Path) -> Result<Vec<String>> {
    {
        let mut removed = Vec::new();
        for (dir, keep) in [
            (pin_root.join("maps"), &ALL_MAPS[..]),
            (pin_root.join("progs"), &ALL_PROGRAMS[..]),
        ] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name.as_str()) {
                    std::fs::remove_file(e.path())
                        .map_err(|err| Error::io(format!("remove {}", e.path().display()), err))?;
                    removed.push(name);
                }
            }
        }
        if !removed.is_empty() {
            tracing::info!(?removed, "retired pins of an older datapath");
        }
        Ok(removed)
    }
}

impl EbpfDatapath {
    fn sum(&self, endpoint_id: u32, kind: u32) -> MetricValue {
        match self.metrics.get(&MetricKey { endpoint_id, kind }, 0) {
            Ok(per_cpu) => per_cpu
                .iter()
                .fold(MetricValue::default(), |acc, v| MetricValue {
                    packets: acc.packets + v.packets,
                    bytes: acc.bytes + v.bytes,
                }),
            Err(_) => MetricValue::default(),
        }
    }
}

impl Datapath for EbpfDatapath {
    fn upsert_endpoint(&mut self, ip: Ipv4Addr, info: EndpointInfo) -> Result<()> {
        self.endpoints
            .insert(u32::from_ne_bytes(ip.octets()), info, 0)?;
        Ok(())
    }

    fn remove_endpoint(&mut self, ip: Ipv4Addr, endpoint_id: u32) -> Result<()> {
        // Endpoints that never became ready have no entry; aya reports ENOENT as a syscall error.
        match self.endpoints.remove(&u32::from_ne_bytes(ip.octets())) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let kinds = [metric::TX, metric::RX]
            .into_iter()
            .chain((1..drop_reason::COUNT).map(|r| metric::DROP_BASE + r));
        for kind in kinds {
            let _ = self.metrics.remove(&MetricKey { endpoint_id, kind });
        }
        Ok(())
    }

    fn attach(&mut self, ifname: &str) -> Result<()> {
        self.attach_programs(
            ifname,
            &[
                (PROG_FROM_POD, TcAttachType::Ingress),
                (PROG_TO_POD, TcAttachType::Egress),
            ],
        )
    }

    fn stats(&self, endpoint_id: u32) -> Stats {
        let tx = self.sum(endpoint_id, metric::TX);
        let rx = self.sum(endpoint_id, metric::RX);
        let mut drops = BTreeMap::new();
        for r in 1..drop_reason::COUNT {
            let d = self.sum(endpoint_id, metric::DROP_BASE + r);
            if d.packets > 0 {
                drops.insert(drop_reason::name(r).to_string(), d.packets);
            }
        }
        Stats {
            tx_packets: tx.packets,
            tx_bytes: tx.bytes,
            rx_packets: rx.packets,
            rx_bytes: rx.bytes,
            drops,
        }
    }

    fn info(&self) -> Info {
        Info {
            loaded: true,
            pin_root: self.pin_root.display().to_string(),
            programs: ALL_PROGRAMS.iter().map(|s| s.to_string()).collect(),
            maps: ALL_MAPS.iter().map(|s| s.to_string()).collect(),
            adopted: self.adopted,
        }
    }

    fn needs_reattach(&self) -> bool {
        !self.adopted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names userspace relies on exist in the built object (DESIGN §7).
    #[test]
    fn object_contains_the_names_userspace_uses() {
        let obj = aya_obj_names(BPF_OBJECT);
        for m in ALL_MAPS {
            assert!(
                obj.contains(&m.to_string()),
                "map {m} missing from object ({obj:?})"
            );
        }
        for p in ALL_PROGRAMS {
            assert!(
                obj.contains(&p.to_string()),
                "program {p} missing from object ({obj:?})"
            );
        }
    }

    /// Parses the object with aya's loader-side parser and lists its map and program names.
    fn aya_obj_names(data: &[u8]) -> Vec<String> {
        let obj = aya_obj::Object::parse(data).expect("parse object");
        obj.maps
            .keys()
            .cloned()
            .chain(obj.programs.keys().cloned())
            .collect()
    }
}
