//! The eBPF datapath: loads Berth's tc programs, pins programs and maps under the pin root, adopts
//! existing pins on restart, attaches programs to pods' host-side veths, and reads counters.
//!
//! Pins: `<pin root>/maps/<MAP>` (maps declared `pinned` in the object, reused by name),
//! `<pin root>/progs/<program>` and, with TCX, `<pin root>/links/<ifname>:<ingress|egress>`
//! (bpffs refuses dots in names, so a `.` of the interface name is written `:`, which interface
//! names cannot contain).
//!
//! tc programs attach in one of two ways ([`TcAttach`], DESIGN §8):
//! - TCX (kernel ≥ 6.6): one bpf_link per hook, created first in the hook's order and pinned, so
//!   it outlives this process; a restarted agent adopts it, and after a program reload it is
//!   re-pointed at the new program with `BPF_LINK_UPDATE` (atomic: no moment without a program).
//! - netlink tc (the fallback, down to the 5.15 floor): a clsact filter with a fixed priority and
//!   handle, owned by the interface; replaced atomically (`NLM_F_REPLACE`) after a reload.
//!
//! Either way a killed agent leaves the datapath running. Switching from one to the other attaches
//! the new program before removing the old one (a TCX program that returns a verdict makes the
//! kernel skip the clsact filters, so the overlap is harmless), leaving one program per hook. Link
//! pins of interfaces that were deleted (the link is then defunct, ifindex 0) are removed by
//! [`prune_link_pins`] in the daemon's housekeeping.
use crate::error::{Error, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuHashMap,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        LinkOrder, MultiProgLink, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
    },
};
use berth_ebpf_common::{
    ALL_MAPS, ALL_PROGRAMS, CidrKey, DatapathConfig, EndpointInfo, EndpointPolicy, IpcacheEntry,
    LAYOUT_VERSION, MAP_CONFIG, MAP_CONNTRACK, MAP_ENDPOINTS, MAP_IPCACHE, MAP_METRICS, MAP_POLICY,
    MAP_POLICY_CIDR, MAP_POLICY_STATE, MetricKey, MetricValue, PROG_FROM_NETDEV, PROG_FROM_OVERLAY,
    PROG_FROM_POD, PROG_TO_OVERLAY, PROG_TO_POD, PolicyKey, PolicyValue, drop_reason, metric,
};
use ipnet::Ipv4Net;
use std::{
    collections::BTreeMap,
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

/// The compiled kernel object (built by agent/build.rs from ebpf/berth-ebpf).
pub static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/berth.bpf.o"));

/// tc priority and handle of Berth's filters.
const TC_PRIORITY: u16 = 1;
const TC_HANDLE: u32 = 1;

/// How tc programs are attached (`--tc-attach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TcAttach {
    /// TCX when the kernel has it (6.6+), netlink tc otherwise.
    Auto,
    /// TCX bpf_links only; start-up fails on a kernel without TCX.
    Tcx,
    /// netlink tc (clsact filters): the default. Creating a TCX link costs 7-10 ms here (an RCU
    /// grace period per attach), which two hooks per pod would add to every CNI ADD (measured:
    /// ADD 2.8x bridge+host-local with TCX, 0.35-0.65x with netlink), so TCX stays opt-in until
    /// pod attachment is batched or moved off the ADD path.
    #[default]
    Netlink,
}

impl std::fmt::Display for TcAttach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TcAttach::Auto => "auto",
            TcAttach::Tcx => "tcx",
            TcAttach::Netlink => "netlink",
        })
    }
}

/// The attachment mechanism in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Tcx,
    Netlink,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Tcx => "tcx",
            Mechanism::Netlink => "netlink",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "tcx" => Some(Mechanism::Tcx),
            "netlink" => Some(Mechanism::Netlink),
            _ => None,
        }
    }
}

/// File in the state directory naming the mechanism every pod hook was last switched to
/// completely (absent: an agent from before TCX, i.e. netlink).
pub const TC_ATTACH_FILE: &str = "datapath-tc-attach";
/// The mechanism a starting agent switches to; renamed to [`TC_ATTACH_FILE`] by the first
/// housekeeping pass (start-up has then re-attached every endpoint), so a switch interrupted by a
/// crash is redone at the next start.
const TC_ATTACH_PENDING: &str = "datapath-tc-attach.pending";

/// Directory of TCX link pins under the pin root.
const LINKS_DIR: &str = "links";

/// Serialises changes to link pins: housekeeping's prune must not remove a pin that an attach has
/// just re-created at the same path (a new pod whose veth has a deleted one's name).
static LINK_PINS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// True for errors that mean "this kernel has no TCX" (rather than a failure of this attach).
fn is_unsupported(e: &io::Error) -> bool {
    const ENOTSUPP: i32 = 524; // the kernel's internal "not supported", seen by user space
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | ENOTSUPP)
    )
}

/// Decides the mechanism for `setting` by asking the kernel for the TCX programs of `lo`'s ingress
/// (no side effects; kernels before 6.6 refuse the attach type with EINVAL). Returns the mechanism
/// and why it was chosen.
fn choose_mechanism(setting: TcAttach) -> Result<(Mechanism, String)> {
    decide_mechanism(setting, || {
        match SchedClassifier::query_tcx("lo", TcAttachType::Ingress) {
            Ok(_) => Ok(()),
            Err(aya::programs::ProgramError::SyscallError(e)) => Err(e.io_error),
            Err(e) => Err(io::Error::other(e.to_string())),
        }
    })
}

/// [`choose_mechanism`] with the kernel probe given (unit tests fake an old kernel).
fn decide_mechanism(
    setting: TcAttach,
    probe: impl FnOnce() -> io::Result<()>,
) -> Result<(Mechanism, String)> {
    match setting {
        TcAttach::Netlink => Ok((
            Mechanism::Netlink,
            "netlink tc forced by --tc-attach netlink".into(),
        )),
        TcAttach::Tcx => match probe() {
            Ok(()) => Ok((Mechanism::Tcx, "TCX forced by --tc-attach tcx".into())),
            Err(e) => Err(Error::Config(format!(
                "--tc-attach tcx: this kernel does not attach tc programs as bpf_links ({e}); \
                 TCX needs Linux 6.6 (use --tc-attach auto or netlink)"
            ))),
        },
        TcAttach::Auto => match probe() {
            Ok(()) => Ok((Mechanism::Tcx, "TCX supported by this kernel".into())),
            Err(e) if is_unsupported(&e) => Ok((
                Mechanism::Netlink,
                format!("TCX unsupported: {e}; using netlink tc"),
            )),
            Err(e) => Ok((
                Mechanism::Netlink,
                format!("TCX probe failed: {e}; using netlink tc"),
            )),
        },
    }
}

/// Raw `bpf(2)` commands aya 0.13 does not expose publicly (its own wrappers are crate-private).
mod sys {
    use std::{
        io,
        os::fd::{AsRawFd, BorrowedFd},
    };

    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_DETACH: libc::c_long = 34;
    /// `enum bpf_attach_type`'s BPF_TCX_INGRESS and BPF_TCX_EGRESS.
    pub const BPF_TCX_INGRESS: u32 = 46;
    pub const BPF_TCX_EGRESS: u32 = 47;

    /// The head of `struct bpf_link_info` up to the `tcx` member of its union (the kernel copies
    /// no more than the length given).
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct TcxLinkInfo {
        pub link_type: u32,
        pub id: u32,
        pub prog_id: u32,
        _pad: u32,
        /// 0 once the interface is gone (the link is defunct).
        pub ifindex: u32,
        pub attach_type: u32,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
        // SAFETY: `attr` is a fully initialised prefix of `union bpf_attr` for `cmd`, and its size
        // is passed along; the kernel zero-extends the rest.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T,
                std::mem::size_of::<T>() as libc::c_uint,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// `BPF_OBJ_GET_INFO_BY_FD` on a link.
    pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<TcxLinkInfo> {
        #[repr(C)]
        struct Attr {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        let mut info = TcxLinkInfo::default();
        let mut attr = Attr {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: std::mem::size_of::<TcxLinkInfo>() as u32,
            info: &mut info as *mut TcxLinkInfo as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        Ok(info)
    }

    /// `BPF_LINK_DETACH`: detaches the link at once (a pin's removal would only release it once
    /// the last reference goes, later).
    pub fn link_detach(fd: BorrowedFd<'_>) -> io::Result<()> {
        #[repr(C)]
        struct Attr {
            link_fd: u32,
        }
        bpf(
            BPF_LINK_DETACH,
            &mut Attr {
                link_fd: fd.as_raw_fd() as u32,
            },
        )
    }
}

fn hook_name(attach_type: TcAttachType) -> &'static str {
    match attach_type {
        TcAttachType::Egress => "egress",
        _ => "ingress",
    }
}

fn tcx_attach_type(attach_type: TcAttachType) -> u32 {
    match attach_type {
        TcAttachType::Egress => sys::BPF_TCX_EGRESS,
        _ => sys::BPF_TCX_INGRESS,
    }
}

/// Name of the pin of the TCX link of `ifname`'s hook: `<ifname>:<ingress|egress>`. bpffs
/// reserves names with a dot (lookups fail with EPERM), and interface names may hold dots (VLANs)
/// but never a colon, so dots become colons.
pub fn link_pin_name(ifname: &str, attach_type: TcAttachType) -> String {
    format!("{}:{}", ifname.replace('.', ":"), hook_name(attach_type))
}

/// Pin of the TCX link of `ifname`'s hook.
pub fn link_pin_path(pin_root: &Path, ifname: &str, attach_type: TcAttachType) -> PathBuf {
    pin_root
        .join(LINKS_DIR)
        .join(link_pin_name(ifname, attach_type))
}

/// A pinned TCX link, opened.
struct OpenLink {
    link: SchedClassifierLink,
    info: sys::TcxLinkInfo,
}

/// Opens the link pinned at `pin`: `Ok(None)` when there is no pin, an error when the pin is not a
/// TCX link.
fn open_link_pin(pin: &Path) -> Result<Option<OpenLink>> {
    let pinned = match PinnedLink::from_pin(pin) {
        Ok(p) => p,
        Err(aya::programs::links::LinkError::SyscallError(e))
            if e.io_error.kind() == io::ErrorKind::NotFound =>
        {
            return Ok(None);
        }
        Err(e) => {
            return Err(Error::Datapath(format!(
                "open link pin {}: {e}",
                pin.display()
            )));
        }
    };
    let link = SchedClassifierLink::try_from(FdLink::from(pinned))
        .map_err(|e| Error::Datapath(format!("{} is not a TCX link: {e}", pin.display())))?;
    let fd = MultiProgLink::fd(&link)
        .map_err(|e| Error::Datapath(format!("link pin {}: {e}", pin.display())))?;
    let info =
        sys::link_info(fd).map_err(|e| Error::io(format!("link info of {}", pin.display()), e))?;
    Ok(Some(OpenLink { link, info }))
}

/// Detaches the link pinned at `pin` (if it is still attached) and removes the pin.
fn remove_link_pin(pin: &Path) -> Result<()> {
    match open_link_pin(pin) {
        Ok(Some(open)) if open.info.ifindex != 0 => {
            let fd = MultiProgLink::fd(&open.link)
                .map_err(|e| Error::Datapath(format!("link pin {}: {e}", pin.display())))?;
            sys::link_detach(fd)
                .map_err(|e| Error::io(format!("detach link {}", pin.display()), e))?;
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(pin = %pin.display(), error = %e, "removing an unreadable link pin")
        }
    }
    match std::fs::remove_file(pin) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(Error::io(format!("remove {}", pin.display()), e))
        }
        _ => Ok(()),
    }
}

/// True when some link pin under `pin_root` holds a link that is still attached.
fn live_link_pins(pin_root: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(pin_root.join(LINKS_DIR)) else {
        return false;
    };
    entries
        .flatten()
        .any(|e| matches!(open_link_pin(&e.path()), Ok(Some(l)) if l.info.ifindex != 0))
}

/// Removes the pins of TCX links whose interface is gone (a deleted pod's veth: the kernel keeps
/// the link, defunct with ifindex 0, and with it the program, for as long as the pin exists).
/// Also completes a recorded switch of attachment mechanism (see [`TC_ATTACH_FILE`]); call it from
/// housekeeping, after start-up. Returns the names of the pins removed.
pub fn prune_link_pins(pin_root: &Path, state_dir: &Path) -> Result<Vec<String>> {
    let pending = state_dir.join(TC_ATTACH_PENDING);
    if pending.exists() {
        std::fs::rename(&pending, state_dir.join(TC_ATTACH_FILE))
            .map_err(|e| Error::io(format!("rename {}", pending.display()), e))?;
    }
    let pruned = prune_defunct(pin_root)?;
    if !pruned.is_empty() {
        tracing::info!(?pruned, "removed pins of TCX links whose interface is gone");
    }
    Ok(pruned)
}

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
    /// True when existing endpoints need [`Datapath::attach`] again at start-up: programs were
    /// freshly loaded (not adopted), so hooks must be re-pointed at them, or the attachment
    /// mechanism changed, so hooks must move to it.
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
    for d in [
        pin_root.join("maps"),
        pin_root.join("progs"),
        pin_root.join(LINKS_DIR),
    ] {
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
///
/// `ct_max` is the conntrack table's capacity this agent wants (it is sized at load time, not in
/// the object): a pinned table of another capacity is re-created too.
pub fn check_map_layouts(pin_root: &Path, state_dir: &Path, ct_max: u32) -> Result<Vec<String>> {
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
                    if name == MAP_CONNTRACK {
                        ct_max
                    } else {
                        def.max_entries()
                    },
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

/// Conntrack capacity for a node with `mem_bytes` of memory: 0.25 % of it at ~128 bytes per entry
/// (key, value and the kernel's per-element overhead), as Cilium sizes its tables, between 64 Ki
/// and 4 Mi entries, rounded to a power of two.
pub fn conntrack_capacity(mem_bytes: u64) -> u32 {
    let raw = (mem_bytes / 400 / 128).clamp(1 << 16, 1 << 22);
    1u32 << (63 - raw.leading_zeros())
}

/// The node's memory from `/proc/meminfo` (`MemTotal`), in bytes.
pub fn node_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn open_pinned(pin_root: &Path, name: &str) -> Result<MapData> {
    Ok(MapData::from_pin(pin_root.join("maps").join(name))?)
}

fn absent_ok(r: std::result::Result<(), MapError>) -> Result<()> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The policy maps, opened from their pins: written by the identities-and-policy reconciler
/// ([`crate::policy::reconcile`]).
pub struct PolicyMapsEbpf {
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    cidr: LpmTrie<MapData, CidrKey, u32>,
    states: HashMap<MapData, u32, EndpointPolicy>,
    ipcache: LpmTrie<MapData, u32, IpcacheEntry>,
    config: Array<MapData, DatapathConfig>,
}

impl PolicyMapsEbpf {
    pub fn open(pin_root: &Path) -> Result<Self> {
        Ok(PolicyMapsEbpf {
            policy: LpmTrie::try_from(aya::maps::Map::LpmTrie(open_pinned(pin_root, MAP_POLICY)?))?,
            cidr: LpmTrie::try_from(aya::maps::Map::LpmTrie(open_pinned(
                pin_root,
                MAP_POLICY_CIDR,
            )?))?,
            states: HashMap::try_from(aya::maps::Map::HashMap(open_pinned(
                pin_root,
                MAP_POLICY_STATE,
            )?))?,
            ipcache: LpmTrie::try_from(aya::maps::Map::LpmTrie(open_pinned(
                pin_root,
                MAP_IPCACHE,
            )?))?,
            config: Array::try_from(aya::maps::Map::Array(open_pinned(pin_root, MAP_CONFIG)?))?,
        })
    }
}

impl crate::policy::reconcile::PolicyMaps for PolicyMapsEbpf {
    fn read_policy(&self) -> Result<std::collections::BTreeSet<(PolicyKey, u32)>> {
        let mut out = std::collections::BTreeSet::new();
        for kv in self.policy.iter() {
            let (k, _) = kv?;
            out.insert((k.data(), k.prefix_len()));
        }
        Ok(out)
    }
    fn read_cidr(&self) -> Result<BTreeMap<(CidrKey, u32), u32>> {
        let mut out = BTreeMap::new();
        for kv in self.cidr.iter() {
            let (k, v) = kv?;
            out.insert((k.data(), k.prefix_len()), v);
        }
        Ok(out)
    }
    fn read_states(&self) -> Result<BTreeMap<u32, EndpointPolicy>> {
        let mut out = BTreeMap::new();
        for kv in self.states.iter() {
            let (k, v) = kv?;
            out.insert(k, v);
        }
        Ok(out)
    }
    fn read_hosts(&self) -> Result<BTreeMap<Ipv4Addr, IpcacheEntry>> {
        let mut out = BTreeMap::new();
        for kv in self.ipcache.iter() {
            let (k, v) = kv?;
            if k.prefix_len() == 32 {
                out.insert(Ipv4Addr::from(k.data().to_ne_bytes()), v);
            }
        }
        Ok(out)
    }
    fn put_policy(&mut self, key: &(PolicyKey, u32)) -> Result<()> {
        self.policy
            .insert(&Key::new(key.1, key.0), PolicyValue::default(), 0)?;
        Ok(())
    }
    fn del_policy(&mut self, key: &(PolicyKey, u32)) -> Result<()> {
        absent_ok(self.policy.remove(&Key::new(key.1, key.0)))
    }
    fn put_cidr(&mut self, key: &(CidrKey, u32), id: u32) -> Result<()> {
        self.cidr.insert(&Key::new(key.1, key.0), id, 0)?;
        Ok(())
    }
    fn del_cidr(&mut self, key: &(CidrKey, u32)) -> Result<()> {
        absent_ok(self.cidr.remove(&Key::new(key.1, key.0)))
    }
    fn put_state(&mut self, ep: u32, state: EndpointPolicy) -> Result<()> {
        self.states.insert(ep, state, 0)?;
        Ok(())
    }
    fn del_state(&mut self, ep: u32) -> Result<()> {
        absent_ok(self.states.remove(&ep))
    }
    fn put_host(&mut self, addr: Ipv4Addr, entry: IpcacheEntry) -> Result<()> {
        self.ipcache
            .insert(&Key::new(32, u32::from_ne_bytes(addr.octets())), entry, 0)?;
        Ok(())
    }
    fn del_host(&mut self, addr: Ipv4Addr) -> Result<()> {
        absent_ok(
            self.ipcache
                .remove(&Key::new(32, u32::from_ne_bytes(addr.octets()))),
        )
    }
    fn revision(&self) -> Result<u32> {
        Ok(self.config.get(&0, 0)?.policy_revision)
    }
    fn set_revision(&mut self, revision: u32) -> Result<()> {
        let mut c = self.config.get(&0, 0)?;
        c.policy_revision = revision;
        self.config.set(0, c, 0)?;
        Ok(())
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
    /// How tc programs are attached.
    mechanism: Mechanism,
    /// Kernel ids of the current programs (a TCX link running another one is updated).
    prog_ids: BTreeMap<&'static str, u32>,
    /// The mechanism of the pod hooks changed since the last complete start (or may have).
    mechanism_changed: bool,
}

impl EbpfDatapath {
    /// Loads or adopts the datapath under `pin_root`. `state_dir` remembers which object the pinned
    /// programs came from: pins of the same object are adopted; otherwise the programs are loaded
    /// again and the pins replaced. Maps are kept across upgrades when their layout is unchanged;
    /// a pinned map of another layout (see [`check_map_layouts`]) is unpinned and re-created, and
    /// the programs are then reloaded too, so that nothing ever reads a map with the wrong layout.
    /// Programs already attached keep the maps they were loaded with until the agent re-points
    /// their hooks (after repopulating the new maps), so traffic keeps flowing meanwhile.
    ///
    /// `tc_attach` chooses how programs attach (see [`TcAttach`]); `auto` asks the kernel.
    ///
    /// `ct_max`: capacity of the conntrack table (see [`conntrack_capacity`]).
    pub fn load(
        pin_root: &Path,
        state_dir: &Path,
        config: DatapathConfig,
        tc_attach: TcAttach,
        ct_max: u32,
    ) -> Result<Self> {
        let maps_dir = pin_root.join("maps");
        let progs_dir = pin_root.join("progs");
        prepare_pin_root(pin_root)?;
        std::fs::create_dir_all(state_dir)
            .map_err(|e| Error::io(format!("create {}", state_dir.display()), e))?;
        let recreated = check_map_layouts(pin_root, state_dir, ct_max)?;
        let (mechanism, why) = choose_mechanism(tc_attach)?;
        tracing::info!(tc_attach = %tc_attach, mechanism = mechanism.as_str(), "{why}");
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(&maps_dir)
            .set_max_entries(MAP_CONNTRACK, ct_max)
            .load(BPF_OBJECT)?;

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
        let mut prog_ids = BTreeMap::new();
        for name in ALL_PROGRAMS {
            let prog = SchedClassifier::from_pin(progs_dir.join(name))?;
            prog_ids.insert(name, prog.info()?.id());
            progs.insert(name, prog);
        }

        // Pod hooks move to another mechanism when the last complete start used another one (no
        // record: an agent from before TCX, netlink), or when TCX links are still attached while
        // netlink is wanted.
        let recorded = std::fs::read_to_string(state_dir.join(TC_ATTACH_FILE))
            .ok()
            .and_then(|s| Mechanism::parse(&s))
            .unwrap_or(Mechanism::Netlink);
        let _ = prune_defunct(pin_root);
        let links_left = mechanism == Mechanism::Netlink && live_link_pins(pin_root);
        let mechanism_changed = recorded != mechanism || links_left;
        let pending = state_dir.join(TC_ATTACH_PENDING);
        if mechanism_changed {
            tracing::info!(
                from = if links_left { "tcx" } else { recorded.as_str() },
                to = mechanism.as_str(),
                "moving every tc hook to the chosen mechanism (new program first, then the old one \
                 removed)"
            );
            std::fs::write(&pending, mechanism.as_str())
                .map_err(|e| Error::io(format!("write {}", pending.display()), e))?;
        } else {
            let _ = std::fs::remove_file(&pending);
        }

        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| Error::Datapath(format!("map {name} missing from object")))
        };
        let endpoints = HashMap::try_from(take(&mut ebpf, MAP_ENDPOINTS)?)?;
        let metrics = PerCpuHashMap::try_from(take(&mut ebpf, MAP_METRICS)?)?;
        let mut cfg: Array<MapData, DatapathConfig> =
            Array::try_from(take(&mut ebpf, MAP_CONFIG)?)?;
        // The policy revision continues from the pinned configuration (conntrack entries carry
        // it); everything else is this agent's.
        let old_revision = cfg.get(&0, 0).map(|c| c.policy_revision).unwrap_or(0);
        cfg.set(
            0,
            DatapathConfig {
                policy_revision: old_revision,
                ..config
            },
            0,
        )?;
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
            mechanism,
            prog_ids,
            mechanism_changed,
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

    /// The mechanism tc programs are attached with.
    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    fn attach_programs(
        &mut self,
        ifname: &str,
        progs: &[(&'static str, TcAttachType)],
    ) -> Result<()> {
        let _pins = LINK_PINS.lock().unwrap_or_else(|e| e.into_inner());
        for &(name, attach_type) in progs {
            match self.mechanism {
                Mechanism::Tcx => {
                    self.attach_tcx(ifname, name, attach_type)?;
                    // A filter of an older agent or of netlink mode goes once the link runs.
                    remove_netlink_filter(ifname, attach_type)?;
                }
                Mechanism::Netlink => {
                    self.attach_netlink(ifname, name, attach_type)?;
                    // A TCX link (from TCX mode) goes once the filter is in place.
                    remove_link_pin(&link_pin_path(&self.pin_root, ifname, attach_type))?;
                }
            }
        }
        Ok(())
    }

    /// Attaches `name` to `ifname`'s hook as a pinned TCX link: adopts the pinned link when it
    /// already runs this program, updates it atomically when it runs another one, and replaces a
    /// pin left by a deleted interface of the same name.
    fn attach_tcx(
        &mut self,
        ifname: &str,
        name: &'static str,
        attach_type: TcAttachType,
    ) -> Result<()> {
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .map_err(|e| Error::io(format!("find interface {ifname}"), e.into()))?;
        let pin = link_pin_path(&self.pin_root, ifname, attach_type);
        let want_id = self.prog_ids[name];
        let prog = self.progs.get_mut(name).expect("program loaded");
        match open_link_pin(&pin) {
            Ok(Some(open))
                if open.info.ifindex == ifindex
                    && open.info.attach_type == tcx_attach_type(attach_type) =>
            {
                if open.info.prog_id == want_id {
                    return Ok(()); // adopted
                }
                let old = open.info.prog_id;
                let id = prog.attach_to_link(open.link).map_err(|e| {
                    Error::Datapath(format!("update the TCX link of {ifname} to {name}: {e}"))
                })?;
                // Our descriptor closes; the pin keeps the link.
                drop(prog.take_link(id)?);
                tracing::debug!(
                    ifname,
                    program = name,
                    old,
                    new = want_id,
                    "TCX link updated"
                );
                return Ok(());
            }
            Ok(Some(open)) => {
                tracing::info!(
                    ifname,
                    pin = %pin.display(),
                    link_ifindex = open.info.ifindex,
                    ifindex,
                    "link pin belongs to an earlier interface of this name; replacing it"
                );
                drop(open);
                remove_link_pin(&pin)?;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(pin = %pin.display(), error = %e, "replacing an unreadable link pin");
                remove_link_pin(&pin)?;
            }
        }
        // First in the hook's order, as priority 1 is among clsact filters.
        let id = prog
            .attach_with_options(
                ifname,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(|e| Error::Datapath(format!("attach {name} to {ifname} (TCX): {e}")))?;
        let link = FdLink::try_from(prog.take_link(id)?)
            .map_err(|e| Error::Datapath(format!("TCX link of {ifname}: {e}")))?;
        // Should pinning fail, the link is dropped here, which detaches it: nothing half-done.
        link.pin(&pin)
            .map_err(|e| Error::Datapath(format!("pin {}: {e}", pin.display())))?;
        Ok(())
    }

    /// Attaches `name` to `ifname`'s hook as a clsact filter (priority 1, handle 1), replacing an
    /// existing one atomically.
    fn attach_netlink(
        &mut self,
        ifname: &str,
        name: &'static str,
        attach_type: TcAttachType,
    ) -> Result<()> {
        // EEXIST when the interface already has the qdisc.
        let _ = tc::qdisc_add_clsact(ifname);
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
        Ok(())
    }
}

/// Removes Berth's clsact filter (priority 1, handle 1) from `ifname`'s hook, if there is one.
fn remove_netlink_filter(ifname: &str, attach_type: TcAttachType) -> Result<()> {
    use aya::programs::Link as _;
    let link = SchedClassifierLink::attached(ifname, attach_type, TC_PRIORITY, TC_HANDLE)
        .map_err(|e| Error::io(format!("find interface {ifname}"), e))?;
    match link.detach() {
        Ok(()) => {
            tracing::info!(
                ifname,
                hook = hook_name(attach_type),
                "netlink tc filter removed (the TCX link runs now)"
            );
            Ok(())
        }
        // ENOENT: no such filter; EINVAL: no clsact qdisc at all.
        Err(aya::programs::ProgramError::TcError(tc::TcError::NetlinkError { io_error }))
            if matches!(io_error.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) =>
        {
            Ok(())
        }
        Err(e) => Err(Error::Datapath(format!(
            "remove the netlink tc filter of {ifname}: {e}"
        ))),
    }
}

/// Removes the pins of defunct TCX links (see [`prune_link_pins`]); pins that cannot be read are
/// left alone.
fn prune_defunct(pin_root: &Path) -> Result<Vec<String>> {
    let _pins = LINK_PINS.lock().unwrap_or_else(|e| e.into_inner());
    let Ok(entries) = std::fs::read_dir(pin_root.join(LINKS_DIR)) else {
        return Ok(Vec::new());
    };
    let mut pruned = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let defunct = match open_link_pin(&path) {
            Ok(Some(l)) => l.info.ifindex == 0,
            Ok(None) => false,
            Err(err) => {
                tracing::warn!(pin = %path.display(), error = %err, "unreadable link pin left alone");
                false
            }
        };
        if defunct {
            std::fs::remove_file(&path)
                .map_err(|err| Error::io(format!("remove {}", path.display()), err))?;
            pruned.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(pruned)
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
        !self.adopted || self.mechanism_changed
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

    /// Link pins are valid bpffs names (no dots) and distinct per interface and hook.
    #[test]
    fn link_pin_names_avoid_dots() {
        assert_eq!(link_pin_name("eth0", TcAttachType::Ingress), "eth0:ingress");
        assert_eq!(
            link_pin_name("bond0.100", TcAttachType::Egress),
            "bond0:100:egress"
        );
        assert_ne!(
            link_pin_name("bth1a", TcAttachType::Ingress),
            link_pin_name("bth1a", TcAttachType::Egress)
        );
        assert!(!link_pin_name("a.b.c", TcAttachType::Ingress).contains('.'));
    }

    #[test]
    fn attach_setting_and_record_parse() {
        assert_eq!(TcAttach::default(), TcAttach::Netlink);
        for (s, m) in [("tcx", Mechanism::Tcx), ("netlink\n", Mechanism::Netlink)] {
            assert_eq!(Mechanism::parse(s), Some(m));
            assert_eq!(Mechanism::parse(m.as_str()), Some(m));
        }
        assert_eq!(Mechanism::parse("auto"), None);
        #[derive(serde::Deserialize)]
        struct F {
            v: TcAttach,
        }
        let f: F = toml::from_str("v = \"netlink\"").unwrap();
        assert_eq!(f.v, TcAttach::Netlink);
        assert_eq!(TcAttach::Tcx.to_string(), "tcx");
    }

    /// Kernels before 6.6 answer a TCX query or attach with EINVAL; ENOTSUPP (524) and EOPNOTSUPP
    /// also mean "no TCX"; a permission error does not.
    #[test]
    fn unsupported_errors() {
        for errno in [libc::EINVAL, libc::EOPNOTSUPP, 524, libc::ENOSYS] {
            assert!(
                is_unsupported(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        assert!(!is_unsupported(&io::Error::from_raw_os_error(libc::EPERM)));
        assert!(!is_unsupported(&io::Error::other("x")));
    }

    /// The fallback: `auto` on a kernel without TCX (5.15 answers EINVAL) uses netlink and says
    /// why; forced `tcx` there is a start-up error; forced `netlink` never asks the kernel.
    #[test]
    fn mechanism_decision() {
        let old_kernel = || Err(io::Error::from_raw_os_error(libc::EINVAL));
        let (m, why) = decide_mechanism(TcAttach::Auto, old_kernel).unwrap();
        assert_eq!(m, Mechanism::Netlink);
        assert!(
            why.starts_with("TCX unsupported: ") && why.ends_with("; using netlink tc"),
            "{why}"
        );
        let err = decide_mechanism(TcAttach::Tcx, old_kernel).unwrap_err();
        assert!(err.to_string().contains("6.6"), "{err}");
        let (m, _) = decide_mechanism(TcAttach::Auto, || Ok(())).unwrap();
        assert_eq!(m, Mechanism::Tcx);
        let (m, _) = decide_mechanism(TcAttach::Tcx, || Ok(())).unwrap();
        assert_eq!(m, Mechanism::Tcx);
        let (m, _) = decide_mechanism(TcAttach::Netlink, || panic!("probed")).unwrap();
        assert_eq!(m, Mechanism::Netlink);
        // Any other probe failure also falls back under auto, with the error in the reason.
        let (m, why) = decide_mechanism(TcAttach::Auto, || {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        })
        .unwrap();
        assert_eq!(m, Mechanism::Netlink);
        assert!(why.contains("TCX probe failed"), "{why}");
    }

    /// The head of `struct bpf_link_info` as the kernel lays it out: the union starts at 16.
    #[test]
    fn link_info_layout() {
        assert_eq!(std::mem::size_of::<sys::TcxLinkInfo>(), 24);
        assert_eq!(std::mem::offset_of!(sys::TcxLinkInfo, ifindex), 16);
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
