//! micropod's TC classifiers.
//!
//! `count_src` counts packets and bytes per IPv4 source address in a per-CPU hash map. It never
//! changes a packet's fate: it returns `TC_ACT_UNSPEC` (`TCX_NEXT`), so the next program, or the
//! stack, decides.
#![no_std]
#![no_main]

mod dataplane;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::PerCpuHashMap,
    programs::TcContext,
};
use aya_log_ebpf::info;
use micropod_common::{Ipv4Key, PacketCounters, SRC_COUNTERS_MAX_ENTRIES};

const ETH_HLEN: usize = 14;
const ETH_P_IP: [u8; 2] = 0x0800_u16.to_be_bytes();
/// Offset of the IPv4 source address in an Ethernet frame.
const IPV4_SRC_OFFSET: usize = ETH_HLEN + 12;
/// Bytes that must be readable to see both the EtherType and the IPv4 source address.
const NEEDED: usize = IPV4_SRC_OFFSET + 4;

#[map]
static SRC_COUNTERS: PerCpuHashMap<Ipv4Key, PacketCounters> =
    PerCpuHashMap::with_max_entries(SRC_COUNTERS_MAX_ENTRIES, 0);

// Not `pub`: the macro's exported entry point takes the kernel's raw `__sk_buff` pointer, and
// clippy flags public functions that do. `no_mangle` keeps the symbol either way.
#[classifier]
fn count_src(ctx: TcContext) -> i32 {
    if let Some(addr) = ipv4_source(&ctx) {
        count(&ctx, Ipv4Key { addr });
    }
    TC_ACT_UNSPEC
}

/// The IPv4 source address of an Ethernet frame, or `None` for anything else.
#[inline(always)]
fn ipv4_source(ctx: &TcContext) -> Option<[u8; 4]> {
    let start = linear_headers(ctx)?;
    // SAFETY: `linear_headers` checked that NEEDED bytes from `start` lie inside the packet;
    // both reads are unaligned byte arrays within that range.
    let (ether_type, src) = unsafe {
        (
            core::ptr::read_unaligned((start + 12) as *const [u8; 2]),
            core::ptr::read_unaligned((start + IPV4_SRC_OFFSET) as *const [u8; 4]),
        )
    };
    (ether_type == ETH_P_IP).then_some(src)
}

/// Start of the packet if its first NEEDED bytes are in the linear area, pulling them in once
/// if they are not (rare: TC usually sees the headers linear).
#[inline(always)]
fn linear_headers(ctx: &TcContext) -> Option<usize> {
    if ctx.data() + NEEDED <= ctx.data_end() {
        return Some(ctx.data());
    }
    ctx.pull_data(NEEDED as u32).ok()?;
    (ctx.data() + NEEDED <= ctx.data_end()).then(|| ctx.data())
}

#[inline(always)]
fn count(ctx: &TcContext, key: Ipv4Key) {
    let bytes = u64::from(ctx.len());
    if bump(&key, bytes) {
        return;
    }
    let first = PacketCounters { packets: 1, bytes };
    match SRC_COUNTERS.insert(&key, &first, u64::from(BPF_NOEXIST)) {
        Ok(()) => info!(ctx, "counting new IPv4 source {:i}", key.addr),
        // Another CPU inserted the key first (EEXIST): our CPU's slot exists now. If the map is
        // full the packet stays uncounted, which is the documented limit.
        Err(_) => {
            bump(&key, bytes);
        }
    }
}

/// Adds one packet of `bytes` to this CPU's counters for `key`; false if the key is absent.
#[inline(always)]
fn bump(key: &Ipv4Key, bytes: u64) -> bool {
    match SRC_COUNTERS.get_ptr_mut(key) {
        Some(counters) => {
            // SAFETY: the pointer is this CPU's slot of a per-CPU map value; TC programs run
            // with migration disabled, so nothing else writes it concurrently.
            unsafe {
                (*counters).packets += 1;
                (*counters).bytes += bytes;
            }
            true
        }
        None => false,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
