//! Map keys, values and names shared by the eBPF programs (`micropod-ebpf`) and userspace
//! (`micropod`).
//!
//! Every type is `#[repr(C)]`, has no implicit padding, and has its size pinned by a `const`
//! assertion: the kernel copies these as raw bytes between the two sides.
#![no_std]

mod dataplane;

pub use dataplane::*;

/// Name of the TC classifier that counts packets and bytes per IPv4 source address.
pub const COUNT_SRC_PROGRAM: &str = "count_src";
/// Name of the per-CPU hash map [`Ipv4Key`] source address -> [`PacketCounters`], filled by
/// [`COUNT_SRC_PROGRAM`].
pub const SRC_COUNTERS_MAP: &str = "SRC_COUNTERS";
/// Capacity of [`SRC_COUNTERS_MAP`]; sources beyond it are not counted.
pub const SRC_COUNTERS_MAX_ENTRIES: u32 = 4096;

/// A packet and byte count. In per-CPU maps each CPU holds its own copy; readers sum them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCounters {
    pub packets: u64,
    /// Bytes as the TC hook sees them: the whole frame from the Ethernet header on.
    pub bytes: u64,
}

const _: () = assert!(size_of::<PacketCounters>() == 16);

impl PacketCounters {
    /// Sums two counters, as when folding per-CPU values.
    #[must_use]
    pub const fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], plain integers, no padding (size asserted above): every bit pattern
    // is a valid value.
    unsafe impl aya::Pod for super::PacketCounters {}
    // SAFETY: as above, for each data plane type (sizes asserted in `dataplane`).
    unsafe impl aya::Pod for super::Ipv4Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EndpointCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DatapathConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_sums_fields() {
        let a = PacketCounters {
            packets: 2,
            bytes: 100,
        };
        let b = PacketCounters {
            packets: 3,
            bytes: 50,
        };
        assert_eq!(
            a.add(b),
            PacketCounters {
                packets: 5,
                bytes: 150
            }
        );
    }

    #[test]
    fn key_keeps_network_order() {
        let key = Ipv4Key {
            addr: [10, 0, 0, 1],
        };
        assert_eq!(u32::from_be_bytes(key.addr), 0x0a00_0001);
    }
}
