//! The data plane: per-endpoint counters, anti-spoofing and SNAT on each endpoint's port,
//! reverse SNAT on the uplink.
//!
//! Headers are parsed once with direct packet access; changes go through the skb helpers
//! (`bpf_skb_store_bytes`, `bpf_l3/l4_csum_replace`), which keep `CHECKSUM_PARTIAL` and GSO
//! packets right. Only the plain case takes the fast path (IPv4 without options or
//! fragmentation, TCP, UDP, ICMP echo); everything else returns `TC_ACT_UNSPEC` and goes through
//! the stack, where the MASQUERADE fallback serves it.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_ANY, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_NOEXIST, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_redirect,
        bpf_redirect_neigh,
    },
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::TcContext,
};
use micropod_common::{
    CONFIG_NO_NAT, DatapathConfig, DropReason, Endpoint, EndpointCounters, IPPROTO_ICMP,
    IPPROTO_TCP, IPPROTO_UDP, Ipv4Key, MAX_ENDPOINTS, MAX_NO_NAT, NAT_DEFAULT_ENTRIES, NAT_INBOUND,
    NAT_OUTBOUND, NatEntry, NatKey, NatStats, TCP_CLOSING, TCP_OPEN,
};

#[map]
static PORTS: HashMap<u32, Endpoint> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);
#[map]
static ENDPOINTS: HashMap<Ipv4Key, Endpoint> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);
#[map]
static EP_COUNTERS: PerCpuHashMap<Ipv4Key, EndpointCounters> =
    PerCpuHashMap::with_max_entries(MAX_ENDPOINTS, 0);
// A plain hash, not LRU: an LRU would evict live flows silently when full; here a full table
// refuses the new flow with a counted reason, and stale entries are reclaimed when probed or
// swept from userspace.
#[map]
static NAT: HashMap<NatKey, NatEntry> = HashMap::with_max_entries(NAT_DEFAULT_ENTRIES, 0);
#[map]
static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);
#[map]
static NAT_STATS: PerCpuArray<NatStats> = PerCpuArray::with_max_entries(1, 0);
/// Destinations reached untranslated (other nodes' pods, a service range): left to the stack,
/// where the MASQUERADE fallback excludes them too.
#[map]
static NO_NAT: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_NO_NAT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
/// VLAN tag protocol identifiers: 802.1Q, 802.1ad, and the pre-standard QinQ one.
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_QINQ1: u16 = 0x9100;
const IP_OFF: usize = ETH_HLEN;
const IP_HLEN: usize = 20;
const L4_OFF: usize = IP_OFF + IP_HLEN;
const IP_TTL_OFF: usize = IP_OFF + 8;
const IP_CSUM_OFF: usize = IP_OFF + 10;
const IP_SRC_OFF: usize = IP_OFF + 12;
const IP_DST_OFF: usize = IP_OFF + 16;
const TCP_CSUM_OFF: usize = L4_OFF + 16;
const UDP_CSUM_OFF: usize = L4_OFF + 6;
const ICMP_CSUM_OFF: usize = L4_OFF + 2;
const ICMP_ID_OFF: usize = L4_OFF + 4;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
/// ARP for IPv4 over Ethernet: sender hardware and protocol addresses.
const ARP_SHA_OFF: usize = ETH_HLEN + 8;
const ARP_SPA_OFF: usize = ARP_SHA_OFF + 6;
/// New flows try the endpoint's own port first, then this many random ones.
const NAT_PROBES: u32 = 8;
/// Last-seen stamps are refreshed at most this often, so that a busy flow does not write its
/// entry's cache line on every packet.
const TOUCH_NS: u64 = 1_000_000_000;
const AF_INET: u8 = 2;

// ---------------------------------------------------------------------------------------------
// Endpoint ports

/// Frames an endpoint sends: counted, checked for spoofing, and — for a flow to the outside —
/// translated and handed to the uplink right here, before the frame enters the bridge. (On a
/// host with br_netfilter loaded, as these machines and Kubernetes nodes have, every frame
/// that enters a bridge goes through the IPv4 PREROUTING hooks and conntrack before the
/// bridge device's own TC hook runs; only the port's hook comes earlier.)
#[classifier]
fn port_ingress(ctx: TcContext) -> i32 {
    let Some(ep) = port_endpoint(&ctx) else {
        return TC_ACT_UNSPEC;
    };
    let counters = EP_COUNTERS.get_ptr_mut(&Ipv4Key { addr: ep.ip });
    if let Some(c) = counters {
        // SAFETY: this CPU's slot of a per-CPU value; TC runs with migration disabled.
        unsafe {
            (*c).tx_packets += 1;
            (*c).tx_bytes += u64::from(ctx.len());
        }
    }
    match from_endpoint(&ctx, &ep) {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop(reason) => {
            if let Some(c) = counters {
                // SAFETY: as above.
                unsafe { (*c).drops[reason as usize] += 1 };
            }
            TC_ACT_SHOT
        }
        Verdict::Outbound(flow, cfg) => snat(&ctx, &flow, cfg),
    }
}

#[classifier]
fn port_egress(ctx: TcContext) -> i32 {
    if let Some(ep) = port_endpoint(&ctx)
        && let Some(c) = EP_COUNTERS.get_ptr_mut(&Ipv4Key { addr: ep.ip })
    {
        // SAFETY: this CPU's slot of a per-CPU value; TC runs with migration disabled.
        unsafe {
            (*c).rx_packets += 1;
            (*c).rx_bytes += u64::from(ctx.len());
        }
    }
    TC_ACT_UNSPEC
}

/// The endpoint behind the port this packet crosses.
#[inline(always)]
fn port_endpoint(ctx: &TcContext) -> Option<Endpoint> {
    // SAFETY: the context of a TC program is the kernel's `__sk_buff`.
    let ifindex = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex };
    // SAFETY: the value is copied out at once; entries are only replaced whole by userspace.
    unsafe { PORTS.get(&ifindex) }.copied()
}

enum Verdict {
    /// Leave it to the bridge and the stack.
    Pass,
    Drop(DropReason),
    /// A flow for the SNAT fast path.
    Outbound(Flow, &'static DatapathConfig),
}

/// What to do with a frame from `ep`, parsing each header once.
#[inline(always)]
fn from_endpoint(ctx: &TcContext, ep: &Endpoint) -> Verdict {
    let Some(start) = headers(ctx, ETH_HLEN) else {
        return Verdict::Pass;
    };
    // SAFETY: `headers` checked that ETH_HLEN bytes from `start` are in the packet.
    let (dst_mac, src_mac, proto) = unsafe {
        (
            read::<[u8; 6]>(start),
            read::<[u8; 6]>(start + 6),
            u16::from_be_bytes(read::<[u8; 2]>(start + 12)),
        )
    };
    if src_mac != ep.mac {
        return Verdict::Drop(DropReason::SpoofedMac);
    }
    match proto {
        ETH_P_IP => {
            let Some(ip) = ipv4(ctx) else {
                return Verdict::Drop(DropReason::SpoofedIp);
            };
            if ip.src != ep.ip {
                return Verdict::Drop(DropReason::SpoofedIp);
            }
            // Routed traffic is addressed to the gateway, the bridge's MAC.
            let Some(cfg) = CONFIG.get(0) else {
                return Verdict::Pass;
            };
            if dst_mac != cfg.bridge_mac
                || cfg.uplink_ip == [0; 4]
                || !ip.plain
                || ip.ttl <= 1
                || in_subnet(ip.dst, cfg)
                || (cfg.flags & CONFIG_NO_NAT != 0 && NO_NAT.get(&Key::new(32, ip.dst)).is_some())
            {
                return Verdict::Pass;
            }
            match transport(ctx, ip, ICMP_ECHO_REQUEST) {
                Some(flow) => Verdict::Outbound(flow, cfg),
                None => Verdict::Pass,
            }
        }
        ETH_P_ARP => {
            let Some(start) = headers(ctx, ARP_SPA_OFF + 4) else {
                return Verdict::Drop(DropReason::SpoofedArp);
            };
            // SAFETY: checked by `headers`.
            let (sha, spa) = unsafe {
                (
                    read::<[u8; 6]>(start + ARP_SHA_OFF),
                    read::<[u8; 4]>(start + ARP_SPA_OFF),
                )
            };
            // A sender address of 0.0.0.0 is an ARP probe (RFC 5227), not a claim.
            if sha != ep.mac || (spa != ep.ip && spa != [0; 4]) {
                Verdict::Drop(DropReason::SpoofedArp)
            } else {
                Verdict::Pass
            }
        }
        // The kernel took the outer tag off before TC; another one means stacked tags,
        // whose inner addresses this program does not check.
        ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ1 => Verdict::Drop(DropReason::StackedVlan),
        _ => Verdict::Pass,
    }
}

// ---------------------------------------------------------------------------------------------
// SNAT

/// The fixed IPv4 header fields the data plane needs.
#[derive(Clone, Copy)]
struct Ipv4 {
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    ttl: u8,
    tos: u8,
    /// No options and not a fragment: the only packets the fast path takes.
    plain: bool,
}

/// The parts of an IPv4 packet the NAT needs, read once.
struct Flow {
    ip: Ipv4,
    /// TCP/UDP ports, or for ICMP echo the identifier in the endpoint's "port" slot.
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    /// UDP without a checksum (zero) keeps it zero.
    l4_csum: bool,
}

/// Translates an outbound flow to the uplink's address and hands it to the uplink, if the FIB
/// sends it there; otherwise leaves it to the stack.
#[inline(always)]
fn snat(ctx: &TcContext, flow: &Flow, cfg: &DatapathConfig) -> i32 {
    // The route as the stack would see it: arriving on the bridge.
    let Some(nexthop) = route(ctx, flow, cfg.bridge_ifindex, cfg.uplink_ifindex) else {
        return TC_ACT_UNSPEC;
    };
    let Some(port) = outbound_port(flow, cfg) else {
        return TC_ACT_SHOT;
    };
    if rewrite(ctx, flow, Rewrite::Source(cfg.uplink_ip, port)).is_none() {
        return TC_ACT_SHOT;
    }
    stat(|s| s.outbound_packets += 1);
    let mut nh = bpf_redir_neigh {
        nh_family: u32::from(AF_INET),
        __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
            ipv4_nh: u32::from_ne_bytes(nexthop),
        },
    };
    // SAFETY: `nh` is a valid bpf_redir_neigh of the size passed.
    unsafe {
        bpf_redirect_neigh(
            cfg.uplink_ifindex,
            &mut nh,
            size_of::<bpf_redir_neigh>() as i32,
            0,
        ) as i32
    }
}

/// Replies arriving on the uplink for a translated flow: translated back and handed to the
/// endpoint's port with the endpoint's MAC.
#[classifier]
fn uplink_ingress(ctx: TcContext) -> i32 {
    let Some(cfg) = CONFIG.get(0) else {
        return TC_ACT_UNSPEC;
    };
    let Some(start) = headers(&ctx, ETH_HLEN) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: checked by `headers`.
    let proto = unsafe { u16::from_be_bytes(read::<[u8; 2]>(start + 12)) };
    if proto != ETH_P_IP {
        return TC_ACT_UNSPEC;
    }
    let Some(ip) = ipv4(&ctx) else {
        return TC_ACT_UNSPEC;
    };
    if ip.dst != cfg.uplink_ip || !ip.plain || ip.ttl <= 1 {
        return TC_ACT_UNSPEC;
    }
    let Some(flow) = transport(&ctx, ip, ICMP_ECHO_REPLY) else {
        return TC_ACT_UNSPEC;
    };
    // In replies the echo id sits in the "destination port" slot; see NatKey.
    let (sport, dport) = if flow.ip.proto == IPPROTO_ICMP {
        (0, flow.sport)
    } else {
        (flow.sport, flow.dport)
    };
    let key = NatKey {
        src_ip: flow.ip.src,
        dst_ip: flow.ip.dst,
        src_port: sport,
        dst_port: dport,
        proto: flow.ip.proto,
        _pad: [0; 3],
    };
    let Some(entry) = NAT.get_ptr_mut(&key) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: a pointer into the map value, valid for this program run; concurrent writers
    // only store whole fields (stamps, state), a benign race.
    let (addr, port) = unsafe {
        touch(&mut *entry, flow.ip.proto, flow.tcp_flags);
        ((*entry).addr, (*entry).port)
    };
    // SAFETY: the value is copied out at once.
    let Some(ep) = (unsafe { ENDPOINTS.get(&Ipv4Key { addr }) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    if rewrite(&ctx, &flow, Rewrite::Destination(addr, port)).is_none() {
        return TC_ACT_SHOT;
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&ep.mac);
    macs[6..].copy_from_slice(&cfg.bridge_mac);
    if ctx.store(0, &macs, 0).is_err() {
        return TC_ACT_SHOT;
    }
    stat(|s| s.inbound_packets += 1);
    // SAFETY: plain helper call; a bad ifindex makes the redirect fail (packet dropped).
    unsafe { bpf_redirect(ep.ifindex, 0) as i32 }
}

/// The IPv4 header of an Ethernet frame known to carry IPv4.
#[inline(always)]
fn ipv4(ctx: &TcContext) -> Option<Ipv4> {
    let start = headers(ctx, L4_OFF)?;
    // SAFETY: `headers` checked that L4_OFF bytes from `start` are in the packet.
    let (vihl, tos, frag, ttl, proto, src, dst) = unsafe {
        (
            read::<u8>(start + IP_OFF),
            read::<u8>(start + IP_OFF + 1),
            u16::from_be_bytes(read::<[u8; 2]>(start + IP_OFF + 6)),
            read::<u8>(start + IP_TTL_OFF),
            read::<u8>(start + IP_OFF + 9),
            read::<[u8; 4]>(start + IP_SRC_OFF),
            read::<[u8; 4]>(start + IP_DST_OFF),
        )
    };
    Some(Ipv4 {
        src,
        dst,
        proto,
        ttl,
        tos,
        plain: vihl == 0x45 && frag & 0x3fff == 0,
    })
}

/// The TCP/UDP ports or the ICMP echo id (`icmp_type`) of a plain IPv4 packet.
#[inline(always)]
fn transport(ctx: &TcContext, ip: Ipv4, icmp_type: u8) -> Option<Flow> {
    let (sport, dport, tcp_flags, l4_csum) = match ip.proto {
        IPPROTO_TCP => {
            let s = headers(ctx, L4_OFF + 20)?;
            // SAFETY: checked by `headers`.
            unsafe {
                (
                    read::<u16>(s + L4_OFF),
                    read::<u16>(s + L4_OFF + 2),
                    read::<u8>(s + L4_OFF + 13),
                    true,
                )
            }
        }
        IPPROTO_UDP => {
            let s = headers(ctx, L4_OFF + 8)?;
            // SAFETY: checked by `headers`.
            unsafe {
                (
                    read::<u16>(s + L4_OFF),
                    read::<u16>(s + L4_OFF + 2),
                    0,
                    read::<u16>(s + UDP_CSUM_OFF) != 0,
                )
            }
        }
        IPPROTO_ICMP => {
            let s = headers(ctx, L4_OFF + 8)?;
            // SAFETY: checked by `headers`.
            let (ty, code, id) = unsafe {
                (
                    read::<u8>(s + L4_OFF),
                    read::<u8>(s + L4_OFF + 1),
                    read::<u16>(s + ICMP_ID_OFF),
                )
            };
            if ty != icmp_type || code != 0 {
                return None;
            }
            (id, 0, 0, true)
        }
        _ => return None,
    };
    Some(Flow {
        ip,
        sport,
        dport,
        tcp_flags,
        l4_csum,
    })
}

#[inline(always)]
fn in_subnet(addr: [u8; 4], cfg: &DatapathConfig) -> bool {
    u32::from_ne_bytes(addr) & u32::from_ne_bytes(cfg.mask) == u32::from_ne_bytes(cfg.subnet)
}

/// The next hop if the FIB sends this flow out of `uplink`; `None` sends it to the stack.
#[inline(always)]
fn route(ctx: &TcContext, flow: &Flow, ifindex: u32, uplink: u32) -> Option<[u8; 4]> {
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of them).
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = flow.ip.proto;
    fib.sport = flow.sport;
    fib.dport = flow.dport;
    // tot_len stays 0: the kernel then checks the skb itself against the MTU, GSO included.
    fib.ifindex = ifindex;
    fib.__bindgen_anon_2.tos = flow.ip.tos;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(flow.ip.src);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(flow.ip.dst);
    // SAFETY: `fib` is a valid bpf_fib_lookup of the size passed; ctx is the skb.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let ok =
        rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) || rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH);
    // SAFETY: after a lookup the kernel has written the next hop into ipv4_dst.
    (ok && fib.ifindex == uplink).then(|| unsafe { fib.__bindgen_anon_4.ipv4_dst }.to_ne_bytes())
}

/// The translated source port (or echo id) of an outbound flow, creating the translation if
/// the flow is new. `None` means the packet must be dropped (counted).
#[inline(always)]
fn outbound_port(flow: &Flow, cfg: &DatapathConfig) -> Option<u16> {
    let key = NatKey {
        src_ip: flow.ip.src,
        dst_ip: flow.ip.dst,
        src_port: flow.sport,
        dst_port: flow.dport,
        proto: flow.ip.proto,
        _pad: [0; 3],
    };
    if let Some(entry) = NAT.get_ptr_mut(&key) {
        // SAFETY: a pointer into the map value, valid for this program run (see uplink_ingress).
        unsafe {
            touch(&mut *entry, flow.ip.proto, flow.tcp_flags);
            return Some((*entry).port);
        }
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let state = tcp_state(TCP_OPEN, flow.ip.proto, flow.tcp_flags);
    let original = NatEntry {
        last_seen_ns: now,
        addr: flow.ip.src,
        port: flow.sport,
        direction: NAT_INBOUND,
        tcp_state: state,
    };
    // The reply slot for our own port first, if it is one we may use (ICMP ids are not
    // ranged: the host's ping sockets pick theirs from the whole space anyway).
    let own_ok = flow.ip.proto == IPPROTO_ICMP || cfg.nat_port_ok(flow.sport);
    let mut translated = NatEntry {
        last_seen_ns: now,
        addr: cfg.uplink_ip,
        port: flow.sport,
        direction: NAT_OUTBOUND,
        tcp_state: state,
    };
    let mut reply = NatKey::reply_of(&key, &translated);
    let mut found = false;
    for i in 0..=NAT_PROBES {
        if i > 0 || !own_ok {
            // SAFETY: plain helper call.
            let r = unsafe { bpf_get_prandom_u32() };
            reply.dst_port = if flow.ip.proto == IPPROTO_ICMP {
                r as u16
            } else {
                cfg.nat_port(r)
            }
            .to_be();
        }
        match NAT.insert(&reply, &original, u64::from(BPF_NOEXIST)) {
            Ok(()) => {
                found = true;
                break;
            }
            Err(e) if e == -EEXIST => {
                if claim(&reply, &original, now, cfg) {
                    found = true;
                    break;
                }
            }
            Err(_) => {
                drop_new_flow(flow.ip.src, DropReason::NatTableFull);
                return None;
            }
        }
    }
    if !found {
        drop_new_flow(flow.ip.src, DropReason::NatNoPort);
        return None;
    }
    translated.port = reply.dst_port;
    if NAT.insert(&key, &translated, u64::from(BPF_ANY)).is_err() {
        let _ = NAT.remove(&reply);
        drop_new_flow(flow.ip.src, DropReason::NatTableFull);
        return None;
    }
    stat(|s| s.flows_created += 1);
    Some(reply.dst_port)
}

const EEXIST: i32 = 17;

/// Whether the taken reply slot `reply` can be ours: it already is (another CPU created the
/// same flow first), or its flow is idle past its timeout in both directions, in which case we
/// take it over and drop the old flow's outbound entry.
#[inline(always)]
fn claim(reply: &NatKey, original: &NatEntry, now: u64, cfg: &DatapathConfig) -> bool {
    // SAFETY: copied out at once.
    let Some(held) = (unsafe { NAT.get(reply) }).copied() else {
        return false;
    };
    if held.addr == original.addr && held.port == original.port {
        return true;
    }
    if !held.is_stale(reply.proto, now, cfg) {
        return false;
    }
    let old_outbound = NatKey::outbound_of(reply, &held);
    // SAFETY: copied out at once.
    if let Some(out) = unsafe { NAT.get(&old_outbound) }
        && !out.is_stale(reply.proto, now, cfg)
    {
        return false;
    }
    let _ = NAT.remove(&old_outbound);
    if NAT.insert(reply, original, u64::from(BPF_ANY)).is_err() {
        return false;
    }
    stat(|s| s.reclaimed += 1);
    true
}

#[inline(always)]
fn drop_new_flow(endpoint: [u8; 4], reason: DropReason) {
    if let Some(c) = EP_COUNTERS.get_ptr_mut(&Ipv4Key { addr: endpoint }) {
        // SAFETY: this CPU's slot of a per-CPU value.
        unsafe { (*c).drops[reason as usize] += 1 };
    }
    match reason {
        DropReason::NatNoPort => stat(|s| s.no_port += 1),
        _ => stat(|s| s.table_full += 1),
    }
}

#[inline(always)]
fn tcp_state(current: u8, proto: u8, flags: u8) -> u8 {
    if proto != IPPROTO_TCP {
        current
    } else if flags & (TCP_FIN | TCP_RST) != 0 {
        TCP_CLOSING
    } else if flags & TCP_SYN != 0 {
        // A new connection on a reused tuple (after TIME_WAIT) opens the entry again: the
        // SYN its outbound entry, the SYN-ACK its reply entry.
        TCP_OPEN
    } else {
        current
    }
}

/// Refreshes an entry's stamp (at most every TOUCH_NS) and its TCP state.
#[inline(always)]
fn touch(entry: &mut NatEntry, proto: u8, flags: u8) {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.wrapping_sub(entry.last_seen_ns) > TOUCH_NS {
        entry.last_seen_ns = now;
    }
    let state = tcp_state(entry.tcp_state, proto, flags);
    if state != entry.tcp_state {
        entry.tcp_state = state;
        entry.last_seen_ns = now;
    }
}

enum Rewrite {
    /// New source address and port (outbound).
    Source([u8; 4], u16),
    /// New destination address and port (replies).
    Destination([u8; 4], u16),
}

/// Rewrites one address and port (ICMP: echo id) and decrements the TTL, fixing the IPv4
/// checksum and the L4 checksum (pseudo-header included).
#[inline(always)]
fn rewrite(ctx: &TcContext, flow: &Flow, change: Rewrite) -> Option<()> {
    let (old_ip, old_port, new_ip, new_port, ip_off, port_off) = match change {
        Rewrite::Source(ip, port) => (flow.ip.src, flow.sport, ip, port, IP_SRC_OFF, L4_OFF),
        Rewrite::Destination(ip, port) => {
            (flow.ip.dst, flow.dport, ip, port, IP_DST_OFF, L4_OFF + 2)
        }
    };
    let (csum_off, port_off, pseudo, old_port) = match flow.ip.proto {
        IPPROTO_TCP => (TCP_CSUM_OFF, port_off, true, old_port),
        IPPROTO_UDP => (UDP_CSUM_OFF, port_off, true, old_port),
        // The echo id was parsed into `sport` for both directions.
        _ => (ICMP_CSUM_OFF, ICMP_ID_OFF, false, flow.sport),
    };
    let (old_ip32, new_ip32) = (
        u64::from(u32::from_ne_bytes(old_ip)),
        u64::from(u32::from_ne_bytes(new_ip)),
    );
    if flow.l4_csum {
        if pseudo {
            ctx.l4_csum_replace(
                csum_off,
                old_ip32,
                new_ip32,
                u64::from(BPF_F_PSEUDO_HDR) | 4,
            )
            .ok()?;
        }
        if old_port != new_port {
            ctx.l4_csum_replace(csum_off, u64::from(old_port), u64::from(new_port), 2)
                .ok()?;
        }
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, old_ip32, new_ip32, 4)
        .ok()?;
    // TTL and protocol share a 16-bit word of the header checksum.
    let old_word = u16::from_ne_bytes([flow.ip.ttl, flow.ip.proto]);
    let new_word = u16::from_ne_bytes([flow.ip.ttl - 1, flow.ip.proto]);
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_word), u64::from(new_word), 2)
        .ok()?;
    ctx.store(IP_TTL_OFF, &(flow.ip.ttl - 1), 0).ok()?;
    ctx.store(ip_off, &new_ip, 0).ok()?;
    if old_port != new_port {
        ctx.store(port_off, &new_port, 0).ok()?;
    }
    Some(())
}

#[inline(always)]
fn stat(f: impl FnOnce(&mut NatStats)) {
    if let Some(s) = NAT_STATS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array.
        f(unsafe { &mut *s });
    }
}

/// Start of the packet if its first `len` bytes are in the linear area, pulling them in once
/// if they are not (rare: TC usually sees the headers linear).
#[inline(always)]
fn headers(ctx: &TcContext, len: usize) -> Option<usize> {
    if ctx.data() + len <= ctx.data_end() {
        return Some(ctx.data());
    }
    if (ctx.len() as usize) < len {
        return None;
    }
    ctx.pull_data(len as u32).ok()?;
    (ctx.data() + len <= ctx.data_end()).then(|| ctx.data())
}

/// Reads a `T` at `addr`.
///
/// # Safety
/// `addr..addr + size_of::<T>()` must lie inside the packet (checked against `data_end`).
#[inline(always)]
unsafe fn read<T: Copy>(addr: usize) -> T {
    // SAFETY: guaranteed by the caller; unaligned reads are fine for packet data.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}
