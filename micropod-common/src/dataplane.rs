//! The data plane's maps: endpoints, per-endpoint counters, the NAT table and its settings.
//!
//! Addresses and ports are kept in network byte order (as on the wire) so the per-packet path
//! never swaps bytes; userspace converts.

/// TC program on each endpoint port's ingress (frames the endpoint sends): counts,
/// anti-spoofing, SNAT of flows to the outside.
pub const PORT_INGRESS_PROGRAM: &str = "port_ingress";
/// TC program on each endpoint port's egress (frames to the endpoint): counts.
pub const PORT_EGRESS_PROGRAM: &str = "port_egress";
/// TC program on the uplink's ingress: reverse SNAT of replies.
pub const UPLINK_INGRESS_PROGRAM: &str = "uplink_ingress";

/// `u32` port ifindex → [`Endpoint`].
pub const PORTS_MAP: &str = "PORTS";
/// [`Ipv4Key`] endpoint address → [`Endpoint`].
pub const ENDPOINTS_MAP: &str = "ENDPOINTS";
/// Per-CPU [`Ipv4Key`] endpoint address → [`EndpointCounters`].
pub const ENDPOINT_COUNTERS_MAP: &str = "EP_COUNTERS";
/// [`NatKey`] → [`NatEntry`], both directions of every translated flow.
pub const NAT_MAP: &str = "NAT";
/// Array of one [`DatapathConfig`].
pub const CONFIG_MAP: &str = "CONFIG";
/// Per-CPU array of one [`NatStats`].
pub const NAT_STATS_MAP: &str = "NAT_STATS";
/// LPM trie of destinations never translated (`no_masquerade`): key an IPv4 prefix (the
/// address in network order), value unused (1). Read only when [`DatapathConfig::flags`] has
/// [`CONFIG_NO_NAT`].
pub const NO_NAT_MAP: &str = "NO_NAT";
/// Destinations [`NO_NAT_MAP`] holds at most.
pub const MAX_NO_NAT: u32 = 64;
/// [`DatapathConfig::flags`]: the network has destinations that are never translated.
pub const CONFIG_NO_NAT: u8 = 1;

/// Endpoints the maps can hold: one bridge's ports (BR_MAX_PORTS is 1023).
pub const MAX_ENDPOINTS: u32 = 1024;
/// Default capacity of [`NAT_MAP`], in entries (two per flow).
pub const NAT_DEFAULT_ENTRIES: u32 = 131_072;

/// The data path's layout: the maps' names, kinds, key and value types shared with the
/// programs. Recorded with the pins by `network up`; a micropod whose layout differs refuses
/// to open them (it would misread them) and `network up` replaces them. Bump it with any
/// change to a map or a type below that is not a spare field taking a meaning.
/// 2: [`DatapathConfig`] gained the NAT port range (48 bytes).
/// 3: [`NO_NAT_MAP`], and [`DatapathConfig::flags`] in a byte that was padding.
pub const DATAPATH_LAYOUT: u32 = 3;

/// An IPv4 address as a map key, network order (as on the wire): the key of the endpoint maps
/// and of [`SRC_COUNTERS_MAP`](crate::SRC_COUNTERS_MAP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Key {
    pub addr: [u8; 4],
}

const _: () = assert!(size_of::<Ipv4Key>() == 4);

/// One endpoint as the data plane sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// The endpoint's address, network order.
    pub ip: [u8; 4],
    /// Its port on the bridge (TAP or host-side veth).
    pub ifindex: u32,
    /// The MAC the endpoint must send from and receives at.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

const _: () = assert!(size_of::<Endpoint>() == 16);

/// Why the data plane dropped a frame. The value indexes [`EndpointCounters::drops`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Source MAC is not the endpoint's.
    SpoofedMac = 0,
    /// IPv4 source address is not the endpoint's.
    SpoofedIp = 1,
    /// ARP sender address (hardware or protocol) is not the endpoint's.
    SpoofedArp = 2,
    /// A new flow found the NAT table full.
    NatTableFull = 3,
    /// A new flow found no free port (or echo id) after the bounded probe.
    NatNoPort = 4,
    /// A frame with stacked VLAN tags (802.1ad or 802.1Q in 802.1Q). The kernel strips the
    /// outer tag before TC; what is left starts with another tag, which the port program does
    /// not parse, so it cannot check the addresses inside.
    StackedVlan = 5,
}

impl DropReason {
    pub const COUNT: usize = 6;
    pub const ALL: [Self; Self::COUNT] = [
        Self::SpoofedMac,
        Self::SpoofedIp,
        Self::SpoofedArp,
        Self::NatTableFull,
        Self::NatNoPort,
        Self::StackedVlan,
    ];

    /// A stable name for output and metrics labels.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::SpoofedMac => "spoofed_mac",
            Self::SpoofedIp => "spoofed_ip",
            Self::SpoofedArp => "spoofed_arp",
            Self::NatTableFull => "nat_table_full",
            Self::NatNoPort => "nat_no_port",
            Self::StackedVlan => "stacked_vlan",
        }
    }
}

/// Per-endpoint counters (one copy per CPU; readers sum). "tx" is what the endpoint sent
/// (frames entering its port, dropped ones included), "rx" what was delivered to it. Bytes are
/// whole frames from the Ethernet header on, as the port's interface statistics count them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: [u64; DropReason::COUNT],
    /// Room for more reasons without changing the map's value size (a reason added takes a
    /// slot that older programs left zero).
    pub _pad: [u64; 2],
}

const _: () = assert!(size_of::<EndpointCounters>() == 96);

impl EndpointCounters {
    /// Sums two counters, as when folding per-CPU values.
    #[must_use]
    pub fn plus(mut self, other: &Self) -> Self {
        self.rx_packets = self.rx_packets.wrapping_add(other.rx_packets);
        self.rx_bytes = self.rx_bytes.wrapping_add(other.rx_bytes);
        self.tx_packets = self.tx_packets.wrapping_add(other.tx_packets);
        self.tx_bytes = self.tx_bytes.wrapping_add(other.tx_bytes);
        let mut i = 0;
        while i < DropReason::COUNT {
            self.drops[i] = self.drops[i].wrapping_add(other.drops[i]);
            i += 1;
        }
        self
    }
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// A flow as it appears in one packet: an outbound packet (endpoint → remote) is looked up as
/// is; a reply (remote → uplink address) too. For ICMP echo the identifier is the endpoint's
/// "port": `src_port` outbound, `dst_port` in replies, the other one zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatKey {
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    /// Network order.
    pub src_port: u16,
    /// Network order.
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

const _: () = assert!(size_of::<NatKey>() == 16);

impl NatKey {
    /// The reply key of the flow whose outbound entry is `(outbound, translated)`: the reply
    /// comes from the remote's port (ICMP: none) to the translated address and port.
    #[inline(always)]
    #[must_use]
    pub fn reply_of(outbound: &Self, translated: &NatEntry) -> Self {
        Self {
            src_ip: outbound.dst_ip,
            dst_ip: translated.addr,
            src_port: if outbound.proto == IPPROTO_ICMP {
                0
            } else {
                outbound.dst_port
            },
            dst_port: translated.port,
            proto: outbound.proto,
            _pad: [0; 3],
        }
    }

    /// The outbound key of the flow whose reply entry is `(reply, original)`.
    #[inline(always)]
    #[must_use]
    pub fn outbound_of(reply: &Self, original: &NatEntry) -> Self {
        Self {
            src_ip: original.addr,
            dst_ip: reply.src_ip,
            src_port: original.port,
            dst_port: if reply.proto == IPPROTO_ICMP {
                0
            } else {
                reply.src_port
            },
            proto: reply.proto,
            _pad: [0; 3],
        }
    }
}

/// [`NatEntry::direction`] of an entry keyed by the outbound packet.
pub const NAT_OUTBOUND: u8 = 0;
/// [`NatEntry::direction`] of an entry keyed by the reply.
pub const NAT_INBOUND: u8 = 1;

/// TCP flow state in [`NatEntry::tcp_state`].
pub const TCP_OPEN: u8 = 0;
/// A FIN or RST was seen: the entry expires after the short closing timeout.
pub const TCP_CLOSING: u8 = 1;

/// The other side of a translation. Outbound entries hold the translated source (uplink address
/// and port); inbound entries hold the original (endpoint address and port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    /// `bpf_ktime_get_coarse_ns` of the last packet in this entry's direction.
    pub last_seen_ns: u64,
    pub addr: [u8; 4],
    /// Network order.
    pub port: u16,
    pub direction: u8,
    pub tcp_state: u8,
}

const _: () = assert!(size_of::<NatEntry>() == 16);

/// The data plane's settings, written by `network up`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Subnet address and mask, network order.
    pub subnet: [u8; 4],
    pub mask: [u8; 4],
    /// The uplink's IPv4 address, the SNAT source; zero disables the fast path.
    pub uplink_ip: [u8; 4],
    pub uplink_ifindex: u32,
    pub bridge_ifindex: u32,
    /// Source MAC of frames the data plane delivers to endpoints (the bridge's).
    pub bridge_mac: [u8; 6],
    /// [`CONFIG_NO_NAT`], or 0.
    pub flags: u8,
    pub _pad: u8,
    /// Idle timeouts in seconds; an entry idle longer is free for reuse.
    pub tcp_timeout_s: u32,
    pub tcp_closing_timeout_s: u32,
    pub udp_timeout_s: u32,
    pub icmp_timeout_s: u32,
    /// The ports TCP and UDP flows are translated to, inclusive, host order: a range the
    /// host's own sockets do not pick from (`ip_local_port_range`) and no other network in
    /// the namespace uses, so a translated flow never takes a host connection's 5-tuple.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
}

const _: () = assert!(size_of::<DatapathConfig>() == 48);

impl DatapathConfig {
    /// Whether `port` (network order) is one flows may be translated to.
    #[inline(always)]
    #[must_use]
    pub fn nat_port_ok(&self, port: u16) -> bool {
        let port = u16::from_be(port);
        self.nat_port_min <= port && port <= self.nat_port_max
    }

    /// The translated port for the random number `r`, host order.
    #[inline(always)]
    #[must_use]
    pub fn nat_port(&self, r: u32) -> u16 {
        // `max < min` never comes from userspace; the span is then 1 and `min` is used.
        let span = u32::from(self.nat_port_max.saturating_sub(self.nat_port_min)) + 1;
        (self.nat_port_min as u32 + r % span) as u16
    }
}

/// Default idle timeouts (seconds). TCP follows RFC 5382's "not less than 2 h 4 min"; UDP
/// RFC 4787's 2 min; a closed TCP flow lingers briefly for its last ACKs and retransmissions.
pub const TCP_TIMEOUT_S: u32 = 7440;
pub const TCP_CLOSING_TIMEOUT_S: u32 = 10;
pub const UDP_TIMEOUT_S: u32 = 120;
pub const ICMP_TIMEOUT_S: u32 = 30;

/// Global NAT counters (one copy per CPU; readers sum). Userspace reports the sum as is (its
/// JSON field names are these).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct NatStats {
    /// Packets translated on the way out and redirected to the uplink.
    pub outbound_packets: u64,
    /// Replies translated back and redirected to an endpoint.
    pub inbound_packets: u64,
    /// Translations created.
    pub flows_created: u64,
    /// New flows refused: table full.
    pub table_full: u64,
    /// New flows refused: no free port.
    pub no_port: u64,
    /// Stale entries taken over by a new flow.
    pub reclaimed: u64,
    #[cfg_attr(feature = "user", serde(skip))]
    pub _pad: [u64; 2],
}

const _: () = assert!(size_of::<NatStats>() == 64);

impl NatStats {
    #[must_use]
    pub fn plus(mut self, o: &Self) -> Self {
        self.outbound_packets = self.outbound_packets.wrapping_add(o.outbound_packets);
        self.inbound_packets = self.inbound_packets.wrapping_add(o.inbound_packets);
        self.flows_created = self.flows_created.wrapping_add(o.flows_created);
        self.table_full = self.table_full.wrapping_add(o.table_full);
        self.no_port = self.no_port.wrapping_add(o.no_port);
        self.reclaimed = self.reclaimed.wrapping_add(o.reclaimed);
        self
    }
}

impl NatEntry {
    /// Whether the entry has been idle longer than its timeout at `now_ns`.
    #[must_use]
    pub fn is_stale(&self, proto: u8, now_ns: u64, cfg: &DatapathConfig) -> bool {
        let timeout_s = match proto {
            IPPROTO_TCP if self.tcp_state == TCP_CLOSING => cfg.tcp_closing_timeout_s,
            IPPROTO_TCP => cfg.tcp_timeout_s,
            IPPROTO_UDP => cfg.udp_timeout_s,
            _ => cfg.icmp_timeout_s,
        };
        now_ns.saturating_sub(self.last_seen_ns) > u64::from(timeout_s) * 1_000_000_000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys the programs write for one flow, built here the way `outbound_port` does.
    fn flow(proto: u8) -> (NatKey, NatEntry, NatKey, NatEntry) {
        let (ep, remote, uplink) = ([10, 10, 0, 2], [198, 51, 100, 10], [203, 0, 113, 1]);
        let (sport, dport, nat_port) = (40000u16.to_be(), 80u16.to_be(), 51234u16.to_be());
        let icmp = proto == IPPROTO_ICMP;
        let outbound = NatKey {
            src_ip: ep,
            dst_ip: remote,
            src_port: sport,
            dst_port: if icmp { 0 } else { dport },
            proto,
            _pad: [0; 3],
        };
        let translated = NatEntry {
            last_seen_ns: 1,
            addr: uplink,
            port: nat_port,
            direction: NAT_OUTBOUND,
            tcp_state: 0,
        };
        let reply = NatKey {
            src_ip: remote,
            dst_ip: uplink,
            src_port: if icmp { 0 } else { dport },
            dst_port: nat_port,
            proto,
            _pad: [0; 3],
        };
        let original = NatEntry {
            last_seen_ns: 1,
            addr: ep,
            port: sport,
            direction: NAT_INBOUND,
            tcp_state: 0,
        };
        (outbound, translated, reply, original)
    }

    #[test]
    fn a_flows_two_keys_lead_to_each_other() {
        for proto in [IPPROTO_TCP, IPPROTO_ICMP] {
            let (outbound, translated, reply, original) = flow(proto);
            assert_eq!(
                NatKey::outbound_of(&reply, &original),
                outbound,
                "proto {proto}"
            );
            assert_eq!(
                NatKey::reply_of(&outbound, &translated),
                reply,
                "proto {proto}"
            );
        }
    }

    #[test]
    fn staleness_follows_the_protocol_and_tcp_state() {
        let cfg = DatapathConfig {
            tcp_timeout_s: 100,
            tcp_closing_timeout_s: 10,
            udp_timeout_s: 50,
            icmp_timeout_s: 5,
            ..Default::default()
        };
        let s = 1_000_000_000u64;
        let mut e = NatEntry {
            last_seen_ns: 0,
            ..Default::default()
        };
        assert!(!e.is_stale(IPPROTO_TCP, 99 * s, &cfg));
        assert!(e.is_stale(IPPROTO_TCP, 101 * s, &cfg));
        e.tcp_state = TCP_CLOSING;
        assert!(e.is_stale(IPPROTO_TCP, 11 * s, &cfg));
        assert!(!e.is_stale(IPPROTO_UDP, 49 * s, &cfg));
        assert!(e.is_stale(IPPROTO_ICMP, 6 * s, &cfg));
    }

    #[test]
    fn nat_ports_stay_in_the_range() {
        let cfg = DatapathConfig {
            nat_port_min: 1024,
            nat_port_max: 32767,
            ..Default::default()
        };
        for r in [0, 1, 31_743, 31_744, u32::MAX, 0x8000_0000] {
            let p = cfg.nat_port(r);
            assert!((1024..=32767).contains(&p), "{r} gave {p}");
            assert!(cfg.nat_port_ok(p.to_be()));
        }
        assert_eq!(cfg.nat_port(31_744), 1024);
        assert!(!cfg.nat_port_ok(40_000u16.to_be()));
        assert!(!cfg.nat_port_ok(1023u16.to_be()));
        let one = DatapathConfig {
            nat_port_min: 5000,
            nat_port_max: 5000,
            ..Default::default()
        };
        assert_eq!(one.nat_port(12345), 5000);
    }
}
