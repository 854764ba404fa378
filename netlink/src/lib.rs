//! A small synchronous rtnetlink client (netlink-packet-route messages over a netlink-sys
//! socket), without an async runtime: what the CNI plugin (veths, addresses, routes, neighbours)
//! and the agent (routes to other nodes' pod CIDRs, the VXLAN device) need. Shared so that the
//! code lives once (DESIGN §9).
//!
//! A netlink socket stays bound to the network namespace it was created in, so the plugin opens
//! one in the host namespace and one inside the pod's namespace (see [`in_netns`]).
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage, AddressScope},
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use std::{
    io,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

/// A link as the plugin cares about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// A synchronous rtnetlink connection bound to one network namespace.
pub struct Netlink {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's current network namespace.
    pub fn new() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        let _ = sock.set_ext_ack(true);
        Ok(Netlink {
            sock,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        nl.finalize();
        let mut out = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut out);
        self.sock.send(&out, 0)?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut replies = Vec::new();
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            let mut offset = 0;
            while offset < n {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[offset..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += len;
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(replies),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        replies.push(m);
                        if !dump && flags & NLM_F_ACK == 0 {
                            return Ok(replies);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn link_from(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: [0; 6],
            mtu: 0,
        };
        for a in &msg.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(m) if m.len() == 6 => link.mac.copy_from_slice(m),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                _ => {}
            }
        }
        link
    }

    /// The link called `name`, if any.
    pub fn link_by_name(&mut self, name: &str) -> io::Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(msg), NLM_F_ACK) {
            Ok(replies) => Ok(replies.iter().find_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => Some(Self::link_from(l)),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// All links of the namespace.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let replies = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => Some(Self::link_from(l)),
                _ => None,
            })
            .collect())
    }

    /// Creates a veth pair: `host_name` here, `peer_name` moved into the namespace `peer_netns`.
    pub fn create_veth(
        &mut self,
        host_name: &str,
        peer_name: &str,
        peer_netns: BorrowedFd<'_>,
        mtu: u32,
    ) -> io::Result<()> {
        let mut peer = LinkMessage::default();
        peer.attributes
            .push(LinkAttribute::IfName(peer_name.to_string()));
        peer.attributes.push(LinkAttribute::Mtu(mtu));
        peer.attributes
            .push(LinkAttribute::NetNsFd(peer_netns.as_raw_fd()));
        let mut msg = LinkMessage::default();
        msg.attributes
            .push(LinkAttribute::IfName(host_name.to_string()));
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        self.request(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Brings link `index` up.
    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(msg), NLM_F_ACK)?;
        Ok(())
    }

    /// Takes link `index` down and renames it to `new_name`.
    pub fn retire(&mut self, index: u32, new_name: &str) -> io::Result<()> {
        let mut down = LinkMessage::default();
        down.header.index = index;
        down.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(down), NLM_F_ACK)?;
        let mut rename = LinkMessage::default();
        rename.header.index = index;
        rename
            .attributes
            .push(LinkAttribute::IfName(new_name.to_string()));
        self.request(RouteNetlinkMessage::SetLink(rename), NLM_F_ACK)?;
        Ok(())
    }

    /// Deletes link `index`; `Ok(false)` when it was already gone.
    pub fn delete_link(&mut self, index: u32) -> io::Result<bool> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        match self.request(RouteNetlinkMessage::DelLink(msg), NLM_F_ACK) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes the link called `name`; `Ok(false)` when there is none.
    pub fn delete_link_by_name(&mut self, name: &str) -> io::Result<bool> {
        match self.link_by_name(name)? {
            Some(l) => self.delete_link(l.index),
            None => Ok(false),
        }
    }

    /// Adds `addr/prefix` to link `index` (replacing an identical one).
    pub fn add_address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        self.one(NlRequest::add_address(index, addr, prefix))
    }

    /// IPv4 addresses (with prefix length) on link `index`.
    pub fn addresses(&mut self, index: u32) -> io::Result<Vec<(Ipv4Addr, u8)>> {
        let mut req = AddressMessage::default();
        req.header.family = AddressFamily::Inet;
        let replies = self.request(RouteNetlinkMessage::GetAddress(req), NLM_F_DUMP)?;
        let mut out = Vec::new();
        for r in replies {
            if let RouteNetlinkMessage::NewAddress(a) = r
                && a.header.index == index
            {
                for attr in &a.attributes {
                    if let AddressAttribute::Local(IpAddr::V4(ip)) = attr {
                        out.push((*ip, a.header.prefix_len));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Adds (or replaces) an IPv4 route `dst/prefix` out of `oif`, optionally via `gateway`.
    pub fn add_route(
        &mut self,
        dst: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
        oif: u32,
    ) -> io::Result<()> {
        self.one(NlRequest::add_route(dst, prefix, gateway, oif))
    }

    /// Adds a permanent neighbour entry `ip → mac` on link `index`.
    pub fn add_neighbour(&mut self, index: u32, ip: Ipv4Addr, mac: [u8; 6]) -> io::Result<()> {
        self.one(NlRequest::add_neighbour(index, ip, mac))
    }

    /// Sends one request of the batch kind and waits for its acknowledgement.
    fn one(&mut self, req: NlRequest) -> io::Result<()> {
        self.request(req.msg, NLM_F_ACK | req.flags)?;
        Ok(())
    }
}

/// An IPv4 route as the agent manages it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: u32,
    pub src: Option<Ipv4Addr>,
}

impl Netlink {
    /// Adds or replaces route `r` in the main table, tagged with `protocol` (so that the owner can
    /// find its routes again, as routing daemons do). `onlink`: the gateway is on the link even
    /// without a matching subnet.
    pub fn replace_route(&mut self, r: &Route, protocol: u8, onlink: bool) -> io::Result<()> {
        let mut msg = Self::route_msg(r.dst, r.prefix, protocol);
        msg.header.scope = if r.gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if onlink {
            msg.header.flags = netlink_packet_route::route::RouteFlags::Onlink;
        }
        if let Some(gw) = r.gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
        }
        if let Some(src) = r.src {
            msg.attributes
                .push(RouteAttribute::PrefSource(RouteAddress::Inet(src)));
        }
        if r.oif != 0 {
            msg.attributes.push(RouteAttribute::Oif(r.oif));
        }
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        Ok(())
    }

    fn route_msg(dst: Ipv4Addr, prefix: u8, protocol: u8) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = prefix;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::from(protocol);
        msg.header.kind = RouteType::Unicast;
        if prefix > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
        }
        msg
    }

    /// Deletes the main-table route to `dst/prefix` tagged `protocol`; `Ok(false)` when absent.
    pub fn delete_route(&mut self, dst: Ipv4Addr, prefix: u8, protocol: u8) -> io::Result<bool> {
        let mut msg = Self::route_msg(dst, prefix, protocol);
        // "Any scope", as `ip route del` asks: a link-scope route is not matched otherwise.
        msg.header.scope = RouteScope::NoWhere;
        match self.request(RouteNetlinkMessage::DelRoute(msg), NLM_F_ACK) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every IPv4 route of the main table (optionally only those tagged `protocol`).
    pub fn routes(&mut self, protocol: Option<u8>) -> io::Result<Vec<(Route, u8)>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let replies = self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_DUMP)?;
        let mut out = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewRoute(m) = r else {
                continue;
            };
            if m.header.table != RouteHeader::RT_TABLE_MAIN {
                continue;
            }
            let proto = u8::from(m.header.protocol);
            if protocol.is_some_and(|p| p != proto) {
                continue;
            }
            let mut route = Route {
                dst: Ipv4Addr::UNSPECIFIED,
                prefix: m.header.destination_prefix_length,
                gateway: None,
                oif: 0,
                src: None,
            };
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => route.dst = *d,
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => route.gateway = Some(*g),
                    RouteAttribute::PrefSource(RouteAddress::Inet(s)) => route.src = Some(*s),
                    RouteAttribute::Oif(o) => route.oif = *o,
                    _ => {}
                }
            }
            out.push((route, proto));
        }
        Ok(out)
    }

    /// Every IPv4 address of every link: `(link index, address, prefix)`.
    pub fn all_addresses(&mut self) -> io::Result<Vec<(u32, Ipv4Addr, u8)>> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        let replies = self.request(RouteNetlinkMessage::GetAddress(msg), NLM_F_DUMP)?;
        let mut out = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewAddress(m) = r else {
                continue;
            };
            for a in &m.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                    out.push((m.header.index, *ip, m.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// Creates a flow-based (`external`, collect-metadata) VXLAN device on UDP `port`: one device
    /// for every remote, the remote set per packet by eBPF. No learning, no ARP.
    pub fn create_vxlan_external(&mut self, name: &str, port: u16, mtu: u32) -> io::Result<()> {
        use netlink_packet_route::link::InfoVxlan;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        msg.header.flags = LinkFlags::Noarp;
        msg.header.change_mask = LinkFlags::Noarp;
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(vec![
                InfoVxlan::CollectMetadata(true),
                InfoVxlan::Port(port),
                InfoVxlan::Learning(false),
            ])),
        ]));
        self.request(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Kind of link `index` (`"veth"`, `"vxlan"`, ...) and, for VXLAN, whether it is flow-based
    /// and its UDP port.
    pub fn link_kind(&mut self, name: &str) -> io::Result<Option<(String, bool, Option<u16>)>> {
        use netlink_packet_route::link::InfoVxlan;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        let replies = match self.request(RouteNetlinkMessage::GetLink(msg), NLM_F_ACK) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(e),
        };
        for r in replies {
            let RouteNetlinkMessage::NewLink(l) = r else {
                continue;
            };
            let mut kind = String::new();
            let (mut external, mut port) = (false, None);
            for a in &l.attributes {
                if let LinkAttribute::LinkInfo(infos) = a {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => kind = k.to_string(),
                            LinkInfo::Data(InfoData::Vxlan(v)) => {
                                for x in v {
                                    match x {
                                        InfoVxlan::CollectMetadata(c) => external = *c,
                                        InfoVxlan::Port(p) => port = Some(*p),
                                        _ => {}
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
            return Ok(Some((kind, external, port)));
        }
        Ok(None)
    }

    /// Sets the MTU of link `index`.
    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(RouteNetlinkMessage::SetLink(msg), NLM_F_ACK)?;
        Ok(())
    }

    /// Turns off IPv6 address generation on link `index` (`IFLA_INET6_ADDR_GEN_MODE` = none, as
    /// `ip link set <if> addrgenmode none`): the link gets no link-local address, so it sends no
    /// router solicitations or neighbour discovery. Works where `/proc/sys` is read-only; fails
    /// with `EAFNOSUPPORT` when the kernel has no IPv6.
    pub fn set_ipv6_addr_gen_mode_none(&mut self, index: u32) -> io::Result<()> {
        use netlink_packet_route::link::{AfSpecInet6, AfSpecUnspec};
        /// `IN6_ADDR_GEN_MODE_NONE` from `<linux/if_link.h>`.
        const IN6_ADDR_GEN_MODE_NONE: u8 = 1;
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(IN6_ADDR_GEN_MODE_NONE)],
            )]));
        self.request(RouteNetlinkMessage::SetLink(msg), NLM_F_ACK)?;
        Ok(())
    }
}

/// Runs `f` with the calling thread switched into the network namespace `netns`, then switches
/// back (also when `f` fails). Sockets created inside stay bound to that namespace.
pub fn in_netns<T>(netns: BorrowedFd<'_>, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let host = std::fs::File::open("/proc/thread-self/ns/net")?;
    nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    let result = f();
    nix::sched::setns(host.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(io::Error::from)
        .expect("cannot return to the host network namespace");
    result
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One rtnetlink request of a batch ([`Netlink::batch`]): a message and its `NLM_F_*` flags
/// (`NLM_F_REQUEST` and `NLM_F_ACK` are added).
#[derive(Debug, Clone)]
pub struct NlRequest {
    pub msg: RouteNetlinkMessage,
    pub flags: u16,
}

/// The outcome of one request of a batch: its replies (e.g. the link a `GETLINK` returns), or
/// the error the kernel answered it with.
pub type NlReply = io::Result<Vec<RouteNetlinkMessage>>;

impl NlRequest {
    /// Creates a veth pair: `host_name` (MAC `host_mac`) in the socket's namespace and `peer_name`
    /// (MAC `peer_mac`) in the namespace `peer_netns`, both with `mtu`. Fails with `EEXIST` when
    /// either name is taken.
    pub fn create_veth(
        host_name: &str,
        host_mac: [u8; 6],
        peer_name: &str,
        peer_mac: [u8; 6],
        peer_netns: BorrowedFd<'_>,
        mtu: u32,
    ) -> Self {
        let mut peer = LinkMessage::default();
        peer.attributes
            .push(LinkAttribute::IfName(peer_name.to_string()));
        peer.attributes.push(LinkAttribute::Mtu(mtu));
        peer.attributes
            .push(LinkAttribute::Address(peer_mac.to_vec()));
        peer.attributes
            .push(LinkAttribute::NetNsFd(peer_netns.as_raw_fd()));
        let mut msg = LinkMessage::default();
        msg.attributes
            .push(LinkAttribute::IfName(host_name.to_string()));
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        msg.attributes
            .push(LinkAttribute::Address(host_mac.to_vec()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        NlRequest {
            msg: RouteNetlinkMessage::NewLink(msg),
            flags: NLM_F_CREATE | NLM_F_EXCL,
        }
    }

    /// Looks up the link called `name` (answered with the link, or `ENODEV`).
    pub fn get_link_by_name(name: &str) -> Self {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        NlRequest {
            msg: RouteNetlinkMessage::GetLink(msg),
            flags: 0,
        }
    }

    /// Brings link `index` up (`up`) or down.
    pub fn set_link_up(index: u32, up: bool) -> Self {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        if up {
            msg.header.flags = LinkFlags::Up;
        }
        msg.header.change_mask = LinkFlags::Up;
        NlRequest {
            msg: RouteNetlinkMessage::SetLink(msg),
            flags: 0,
        }
    }

    /// Renames link `index` (it must be down).
    pub fn rename_link(index: u32, new_name: &str) -> Self {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes
            .push(LinkAttribute::IfName(new_name.to_string()));
        NlRequest {
            msg: RouteNetlinkMessage::SetLink(msg),
            flags: 0,
        }
    }

    /// Sets the MTU of link `index`.
    pub fn set_mtu(index: u32, mtu: u32) -> Self {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        NlRequest {
            msg: RouteNetlinkMessage::SetLink(msg),
            flags: 0,
        }
    }

    /// IPv6 address generation mode "none" on link `index` (see
    /// [`Netlink::set_ipv6_addr_gen_mode_none`]).
    pub fn ipv6_addr_gen_mode_none(index: u32) -> Self {
        use netlink_packet_route::link::{AfSpecInet6, AfSpecUnspec};
        const IN6_ADDR_GEN_MODE_NONE: u8 = 1;
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(IN6_ADDR_GEN_MODE_NONE)],
            )]));
        NlRequest {
            msg: RouteNetlinkMessage::SetLink(msg),
            flags: 0,
        }
    }

    /// Adds `addr/prefix` to link `index` (replacing an identical one).
    pub fn add_address(index: u32, addr: Ipv4Addr, prefix: u8) -> Self {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix;
        msg.header.index = index;
        msg.header.scope = AddressScope::Universe;
        msg.attributes
            .push(AddressAttribute::Local(IpAddr::V4(addr)));
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(addr)));
        NlRequest {
            msg: RouteNetlinkMessage::NewAddress(msg),
            flags: NLM_F_CREATE | NLM_F_REPLACE,
        }
    }

    /// Adds (or replaces) the main-table route `dst/prefix` out of `oif`, optionally via `gateway`
    /// (as [`Netlink::add_route`]).
    pub fn add_route(dst: Ipv4Addr, prefix: u8, gateway: Option<Ipv4Addr>, oif: u32) -> Self {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = prefix;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = if gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        msg.header.kind = RouteType::Unicast;
        if prefix > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
        }
        if let Some(gw) = gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
        }
        msg.attributes.push(RouteAttribute::Oif(oif));
        NlRequest {
            msg: RouteNetlinkMessage::NewRoute(msg),
            flags: NLM_F_CREATE | NLM_F_REPLACE,
        }
    }

    /// Adds (or replaces) a permanent neighbour entry `ip → mac` on link `index`.
    pub fn add_neighbour(index: u32, ip: Ipv4Addr, mac: [u8; 6]) -> Self {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        msg.attributes
            .push(NeighbourAttribute::LinkLocalAddress(mac.to_vec()));
        NlRequest {
            msg: RouteNetlinkMessage::NewNeighbour(msg),
            flags: NLM_F_CREATE | NLM_F_REPLACE,
        }
    }
}

impl Netlink {
    /// Sends every request in one `sendmsg` (the kernel handles them in order, each on its own:
    /// one failing does not stop the next) and collects every answer, in the requests' order.
    /// The outer error is a failure of the socket itself.
    pub fn batch(&mut self, reqs: Vec<NlRequest>) -> io::Result<Vec<NlReply>> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let first = self.seq.wrapping_add(1);
        let mut out = Vec::new();
        for req in reqs {
            self.seq = self.seq.wrapping_add(1);
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_ACK | req.flags;
            header.sequence_number = self.seq;
            let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(req.msg));
            nl.finalize();
            let start = out.len();
            out.resize(start + nl.buffer_len(), 0);
            nl.serialize(&mut out[start..]);
        }
        let count = self.seq.wrapping_sub(first).wrapping_add(1) as usize;
        self.sock.send(&out, 0)?;

        let mut results: Vec<Option<NlReply>> = (0..count).map(|_| None).collect();
        let mut replies: Vec<Vec<RouteNetlinkMessage>> = vec![Vec::new(); count];
        let mut pending = count;
        while pending > 0 {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            let mut offset = 0;
            while offset < n {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[offset..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += len;
                let i = msg.header.sequence_number.wrapping_sub(first) as usize;
                if i >= count || results[i].is_some() {
                    continue;
                }
                let done = match msg.payload {
                    NetlinkPayload::Done(_) => Some(Ok(())),
                    NetlinkPayload::Error(e) => Some(match e.code {
                        None => Ok(()),
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                    }),
                    NetlinkPayload::InnerMessage(m) => {
                        replies[i].push(m);
                        None
                    }
                    _ => None,
                };
                if let Some(r) = done {
                    results[i] = Some(r.map(|()| std::mem::take(&mut replies[i])));
                    pending -= 1;
                }
            }
        }
        Ok(results.into_iter().map(|r| r.expect("answered")).collect())
    }

    /// The link in a `GETLINK`/`NEWLINK` answer, with its `IFLA_LINK` (for a veth: the peer's
    /// index, in the peer's namespace).
    pub fn link_of_reply(replies: &[RouteNetlinkMessage]) -> Option<(Link, Option<u32>)> {
        replies.iter().find_map(|r| match r {
            RouteNetlinkMessage::NewLink(l) => {
                let peer = l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Link(i) => Some(*i),
                    _ => None,
                });
                Some((Self::link_from(l), peer))
            }
            _ => None,
        })
    }
}
