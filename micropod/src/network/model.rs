//! What micropod records about a network and its endpoints (the state document), and the
//! values derived from it: the nf_tables table, the guest kernel's `ip=` argument. Endpoint
//! names, link names and MACs are [`crate::net::naming`]'s, re-exported here.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, path::PathBuf, str::FromStr};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

pub use crate::net::naming::{
    EndpointKind, Mac, RETIRED_LINK_GROUP, endpoint_link_ip, link_name, pool_group, pool_link,
    pool_link_name, retired_link, retired_link_name, valid_endpoint_name,
};
pub use crate::net::ports::PortRange;
use crate::{
    ipam::{Ipam, IpamError},
    net::NetnsId,
};

pub const DEFAULT_BRIDGE: &str = "micropod0";
pub const DEFAULT_SUBNET: &str = "10.10.0.0/24";
/// The network's own document ([`NetworkHead`]), under the state dir.
pub const STATE_DOC: &str = "network.json";
/// The endpoint an attach is making (a slot, see [`crate::state::StateDir::write_slot`]),
/// recorded before its first kernel object exists and cleared once the endpoint's record is
/// written.
pub const ATTACH_INTENT: &str = "attach-intent.json";
/// The endpoint a detach is retiring and the name its link takes, recorded before the first
/// kernel change and cleared once the endpoint is released and its link is recorded as
/// retired (a slot, like [`ATTACH_INTENT`]).
pub const DETACH_INTENT: &str = "detach-intent.json";
/// The reaper's own lock file (not a document): whoever holds it deletes the retired links.
pub const REAPER_LOCK: &str = "reaper.lock";
/// Where background reapers write their log, under the state dir.
pub const REAPER_LOG: &str = "reaper.log";
/// The refill's own lock file: whoever holds it makes pooled TAPs.
pub const REFILL_LOCK: &str = "refill.lock";
/// Where background refills write their log, under the state dir.
pub const REFILL_LOG: &str = "refill.log";
/// TAPs kept ready for attaches, unless `network up --pool` says otherwise.
pub const DEFAULT_POOL: u32 = 16;
/// The most `--pool` accepts (each pooled TAP is a bridge port, of at most 1023).
pub const MAX_POOL: u32 = 256;

/// Spare state files the refill keeps per pooled TAP ([`crate::state::StateDir::make_spares`]):
/// an attach writes two records (its address and itself) and a detach one, so 8 per TAP lets
/// a burst of four times the pool's size write its records without making a file.
pub(super) const SPARES_PER_POOLED_TAP: usize = 8;

/// At most this many spares (64 attaches' records): a bigger spare dir outgrows one block,
/// and ext4 then hashes every name of a block on each listing.
pub(super) const MAX_SPARES: usize = 128;

/// How many spare files a network with a pool of `pool` TAPs keeps ready.
pub(super) fn spare_target(pool: u32) -> usize {
    (pool as usize * SPARES_PER_POOLED_TAP).min(MAX_SPARES)
}
/// A Linux bridge holds at most this many ports (`BR_MAX_PORTS` in net/bridge/br_private.h).
pub const BR_MAX_PORTS: usize = 1023;
/// Bumped when the document's meaning changes.
/// Version 1 kept the records inside the document; they are moved out when read.
pub(super) const STATE_VERSION: u32 = 2;

/// Which NAT data path the user asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathMode {
    /// eBPF when it loads and attaches, else netfilter.
    #[default]
    Auto,
    Ebpf,
    Netfilter,
}

impl fmt::Display for DatapathMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Ebpf => "ebpf",
            Self::Netfilter => "netfilter",
        })
    }
}

/// The data path actually in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActiveDatapath {
    /// MASQUERADE in nf_tables only.
    Netfilter,
    /// The eBPF programs (counters, anti-spoofing, SNAT fast path), with the MASQUERADE
    /// fallback for what the fast path leaves to the stack.
    Ebpf,
}

impl fmt::Display for ActiveDatapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Netfilter => "netfilter",
            Self::Ebpf => "ebpf",
        })
    }
}

/// Which uplink the user asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UplinkChoice {
    /// The device of the main table's default route, if there is one.
    Auto,
    Named(String),
}

impl FromStr for UplinkChoice {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "auto" {
            Self::Auto
        } else {
            Self::Named(s.to_owned())
        })
    }
}

/// The settings of a network, as `up` resolved them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    pub bridge: String,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub uplink: Option<String>,
    pub datapath: DatapathMode,
    /// Capacity of the eBPF NAT table, in entries (two per flow).
    #[serde(default = "default_nat_entries")]
    pub nat_entries: u32,
    /// How many TAPs to keep ready ([`PooledTap`]); 0: none, every attach makes its own.
    #[serde(default = "default_pool")]
    pub pool: u32,
    /// The source ports flows are translated to (both data paths); `None` only in records
    /// from before ranges were recorded, until the next `up` chooses one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_ports: Option<PortRange>,
    /// Destinations never translated, on both data paths (sorted, no duplicates).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub no_masquerade: Vec<Ipv4Network>,
}

impl NetworkConfig {
    /// [`Self::nat_ports`], or what micropod used before ranges were recorded.
    #[must_use]
    pub fn nat_ports(&self) -> PortRange {
        self.nat_ports.unwrap_or(LEGACY_NAT_PORTS)
    }
}

/// The translated ports before they were kept apart from the host's: all above 1023.
pub(super) const LEGACY_NAT_PORTS: PortRange = PortRange {
    min: 1024,
    max: u16::MAX,
};
/// Fewest ports `--nat-ports` may name: each is one flow per remote address and port.
pub(super) const MIN_NAT_PORTS: u32 = 64;
/// Fewest ports `up` chooses by itself, else it asks for `--nat-ports`.
pub(super) const MIN_AUTO_NAT_PORTS: u32 = 1024;
/// Translated ports start above the well-known ones.
pub(super) const NAT_PORTS_FLOOR: u16 = 1024;
/// Where a netfilter network's ports start by default: the usual ephemeral ports and above,
/// so that conntrack can keep clients' own ports.
pub(super) const CONNTRACK_NAT_PORTS_FLOOR: u16 = 32768;

fn default_pool() -> u32 {
    DEFAULT_POOL
}

fn default_nat_entries() -> u32 {
    micropod_common::NAT_DEFAULT_ENTRIES
}

impl fmt::Display for NetworkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bridge {} subnet {} gateway {} uplink {} datapath {}",
            self.bridge,
            self.subnet,
            self.gateway,
            self.uplink.as_deref().unwrap_or("none"),
            self.datapath
        )?;
        if !self.no_masquerade.is_empty() {
            let list: Vec<String> = self.no_masquerade.iter().map(ToString::to_string).collect();
            write!(f, " no-masquerade {}", list.join(","))?;
        }
        Ok(())
    }
}

/// Progress of `network up`. A document still `Creating` when someone else holds the state lock
/// belongs to an `up` that died half-way (it would still hold the lock otherwise): the next
/// `up` finishes it, `down` removes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Creating,
    Ready,
}

/// The network itself, persisted as [`STATE_DOC`]: what `up` made and how. Its endpoints,
/// their addresses and the retired links are records of their own (see `store.rs`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetworkHead {
    pub version: u32,
    pub phase: Phase,
    pub config: NetworkConfig,
    pub active_datapath: ActiveDatapath,
    /// Why the data path is what it is when that is not what was asked for (`auto` fell back
    /// to netfilter) or when part of it is off (no uplink address for SNAT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datapath_note: Option<String>,
    /// The nf_tables table holding the MASQUERADE fallback.
    pub nft_table: String,
    /// `down` turns forwarding back off only if `up` turned it on.
    pub ip_forward_was_off: bool,
}

impl NetworkHead {
    /// The address rules of this network's subnet (no allocations: those are records).
    pub fn ipam_rules(&self) -> Ipam {
        Ipam::new(self.config.subnet, self.config.gateway)
            .expect("the subnet and gateway were checked by `up`")
    }
}

/// Everything micropod owns in one network namespace, as read from the state dir: the network
/// and all its records.
#[derive(Clone, Debug)]
pub struct NetworkDoc {
    pub head: NetworkHead,
    pub ipam: Ipam,
    pub endpoints: BTreeMap<String, Endpoint>,
    /// Links of detached endpoints, down, off the bridge and renamed, that the kernel has yet
    /// to delete (the reaper does it, off the detach's critical path).
    pub retired: Vec<RetiredLink>,
    /// TAPs made ahead of need, waiting for an attach.
    pub pool: Vec<PooledTap>,
}

/// A TAP made ahead of need: a port of the bridge, down, with the port programs if `hooked`
/// (the eBPF data path). It has never carried a frame; an attach renames it, fills the maps
/// for its address and brings it up. Never returned to the pool after a detach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PooledTap {
    pub name: String,
    pub hooked: bool,
}

impl NetworkDoc {
    /// Forgets endpoint `name` and frees its address; the one place both happen together.
    pub fn release_endpoint(&mut self, name: &str) -> Option<(Endpoint, Result<(), IpamError>)> {
        let ep = self.endpoints.remove(name)?;
        let freed = self.ipam.release(ep.ip).map(drop);
        Some((ep, freed))
    }
}

/// A retired link waiting to be deleted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredLink {
    pub name: String,
    /// The address its endpoint had (already free for another endpoint).
    pub ip: Ipv4Addr,
}

/// What a detach is doing: [`DETACH_INTENT`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachIntent {
    pub endpoint: Endpoint,
    /// The name its link takes.
    pub retired: String,
}

/// The namespace a `netns` endpoint lives in: its path and identity when attached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsRef {
    pub path: PathBuf,
    pub id: NetnsId,
    /// The interface name inside the namespace.
    pub ifname: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub name: String,
    pub kind: EndpointKind,
    pub ip: Ipv4Addr,
    /// The guest's MAC (the VM's NIC, or the veth end inside the namespace).
    pub mac: Mac,
    /// The host-side link: the TAP, or the bridge's end of the veth pair.
    pub link: String,
    pub netns: Option<NetnsRef>,
    /// Set for an endpoint a container runtime made through the CNI plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniOwner>,
}

/// Who asked for an endpoint through the CNI plugin: the spec's key for an attachment
/// (network name, container id, interface name) and the pod it belongs to, if the runtime said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniOwner {
    /// The `name` of the network configuration.
    pub network: String,
    pub container_id: String,
    /// `CNI_IFNAME`, the interface inside the sandbox.
    pub ifname: String,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME` from `CNI_ARGS`, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
}

impl Endpoint {
    /// Why the record's link is not one micropod names (and so may rename or delete), if it
    /// is not: every endpoint's link is `link_name(kind, ip)`. A record edited by hand to
    /// name another link (the uplink, say) must not make micropod touch that link.
    pub fn foreign_link(&self) -> Option<String> {
        let expected = link_name(self.kind, self.ip);
        (self.link != expected).then(|| {
            format!(
                "it names the link {:?}, and micropod names the link of a {} endpoint at {} {expected:?}",
                self.link,
                self.kind,
                self.ip
            )
        })
    }
}

/// The nf_tables table of the network on `bridge`.
pub fn nft_table_name(bridge: &str) -> String {
    format!("micropod_{bridge}")
}

/// The kernel's `ip=` argument for a guest: `ip=<addr>::<gw>:<mask>::eth0:off`.
pub fn kernel_ip_arg(ip: Ipv4Addr, subnet: Ipv4Network, gateway: Ipv4Addr) -> String {
    format!("ip={ip}::{gateway}:{}::eth0:off", subnet.mask())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_argument() {
        let subnet: Ipv4Network = "10.10.0.0/24".parse().unwrap();
        assert_eq!(
            kernel_ip_arg(
                Ipv4Addr::new(10, 10, 0, 2),
                subnet,
                Ipv4Addr::new(10, 10, 0, 1)
            ),
            "ip=10.10.0.2::10.10.0.1:255.255.255.0::eth0:off"
        );
    }
}
