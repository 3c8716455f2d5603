//! The network manager: one bridge with its subnet, its endpoints (TAPs for VMMs, veths into
//! other namespaces), their addresses and the NAT fallback, all in the caller's network namespace.
//!
//! Crash safety rests on two rules. Every change happens under the state dir's lock, so no
//! command ever sees another's half-made objects. A change that spans several kernel objects
//! is recorded before the first object is made and completed after the last, so whoever takes
//! the lock next and finds an unfinished record knows its command died (it would still hold the
//! lock otherwise) and undoes it:
//! - attach writes the endpoint it is about to make to a small intent document, claims its
//!   address, makes the links, writes the endpoint's record, then removes the intent;
//! - detach writes the endpoint and the name its link will take to a detach intent, takes
//!   the link down and off the bridge and renames it (`mpr…`, see `retire.rs`), forgets it in
//!   the data path, records the retired link, removes the endpoint's record and address, and
//!   removes the intent; the deletion itself (16-20 ms of kernel time) is the reaper's, after
//!   the lock is released. A command that finds the intent finishes the detach from wherever it
//!   stopped;
//! - `up` records the network first (phase `creating`) and marks it `ready` when done.
//!
//! Every mutating command finishes or undoes a dead command's intent first
//! ([`Network::recover`]): a few `stat`s, whatever the number of endpoints, as are the records
//! themselves (one file per object, see `store.rs`). The reconcile that looks at every endpoint
//! (links or namespaces gone on their own) runs in `up`, `down`, `gc` and an attach that finds
//! the subnet full; [`Network::gc`] also deletes the retired links on record at once and sweeps
//! for links named like micropod's endpoints (`mpv-`/`mpt-` + the address in hex) or retired
//! links (`mpr` + the address and a generation in hex) for an address of our subnet that no
//! record owns.
//!
//! The intents and records are written without a disk sync: they only have to survive the
//! death of the process (the page cache is shared), since after a power cut the links they
//! describe are gone too. The network's own document is synced.

mod check;
mod datapath;
mod endpoint;
mod error;
mod model;
mod pool;
mod reconcile;
mod retire;
mod store;
mod up;

use std::{net::Ipv4Addr, path::PathBuf};

use ipnetwork::Ipv4Network;

pub use error::{AttachError, InputError, NetnsStep, NetworkError, TeardownError, UpError};
pub use model::{
    ATTACH_INTENT, ActiveDatapath, BR_MAX_PORTS, CniOwner, DEFAULT_BRIDGE, DEFAULT_POOL,
    DEFAULT_SUBNET, DETACH_INTENT, DatapathMode, DetachIntent, Endpoint, EndpointKind, MAX_POOL,
    Mac, NetnsRef, NetworkConfig, NetworkDoc, NetworkHead, Phase, PooledTap, PortRange,
    REAPER_LOCK, REAPER_LOG, REFILL_LOCK, REFILL_LOG, RETIRED_LINK_GROUP, RetiredLink, STATE_DOC,
    UplinkChoice, endpoint_link_ip, kernel_ip_arg, link_name, nft_table_name, pool_group,
    pool_link, pool_link_name, retired_link, retired_link_name, valid_endpoint_name,
};
pub use pool::REFILL_COMMAND;
pub use retire::REAP_COMMAND;
use serde::Serialize;
pub use store::{ADDRESSES_SHELF, ENDPOINTS_SHELF, LOWEST_FREE, POOL_SHELF, RETIRED_SHELF};

use crate::{ipam::IpamUsage, state::StateDir};

/// Default state dir, overridable with `--state-dir` / `MICROPOD_STATE_DIR`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/micropod";
/// Default BPF pin dir, overridable with `--bpf-dir` / `MICROPOD_BPF_DIR`.
pub const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/micropod";

/// One micropod network: its state dir and BPF pin dir. Acts on the caller's namespace.
#[derive(Clone, Debug)]
pub struct Network {
    state: StateDir,
    records: store::Records,
    bpf_dir: PathBuf,
    /// Set by [`Network::reap_in_background`]: the executable whose `network reap` deletes
    /// retired links; `None` deletes them inline.
    reaper_exe: Option<PathBuf>,
}

/// What `network up` was asked for, as typed.
#[derive(Clone, Debug)]
pub struct UpRequest {
    pub bridge: String,
    pub subnet: String,
    /// The bridge's address; `None`: the subnet's first host address.
    pub gateway: Option<Ipv4Addr>,
    pub uplink: UplinkChoice,
    pub datapath: DatapathMode,
    /// Capacity of the eBPF NAT table in entries (two per flow); `None` for the default.
    pub nat_entries: Option<u32>,
    /// TAPs to keep ready; `None` keeps the network's current size (16 for a new one).
    pub pool: Option<u32>,
    /// The ports translated flows get; `None` keeps the network's (a new one takes the
    /// largest run above 1023 that the host's ephemeral ports and the other networks here
    /// leave free).
    pub nat_ports: Option<PortRange>,
    /// Destinations endpoints reach with their own addresses, never translated (other
    /// nodes' pod subnets, a cluster's service range); `0.0.0.0/0` turns NAT off.
    pub no_masquerade: Vec<Ipv4Network>,
}

impl Default for UpRequest {
    fn default() -> Self {
        Self {
            bridge: DEFAULT_BRIDGE.into(),
            subnet: DEFAULT_SUBNET.into(),
            gateway: None,
            uplink: UplinkChoice::Auto,
            datapath: DatapathMode::Auto,
            nat_entries: None,
            pool: None,
            nat_ports: None,
            no_masquerade: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpOutcome {
    /// Made from nothing.
    Created,
    /// Already up with these settings; missing pieces (if any) were put back.
    Unchanged,
    /// Was up with other settings and no endpoints: torn down and made again.
    Replaced,
}

/// What `network up` did.
#[derive(Clone, Debug)]
pub struct UpDone {
    pub outcome: UpOutcome,
    pub config: NetworkConfig,
    /// The endpoints its reconcile released: owners gone, links vanished (a reboot).
    pub released: Vec<Released>,
}

/// What `network attach` was asked for.
#[derive(Clone, Debug)]
pub struct AttachRequest {
    pub name: String,
    pub kind: EndpointKind,
    pub netns: Option<PathBuf>,
    pub ip: Option<Ipv4Addr>,
    /// Interface name inside the namespace (netns endpoints).
    pub ifname: Option<String>,
    /// The MTU of both ends of a netns endpoint's veth pair; `None`: the kernel's (1500).
    pub mtu: Option<u32>,
    /// Take the address from this range of the subnet (both ends included) unless `ip` names
    /// one: a CNI configuration's `rangeStart`/`rangeEnd`.
    pub range: Option<(Ipv4Addr, Ipv4Addr)>,
    /// The CNI attachment this endpoint is, when the plugin makes it.
    pub cni: Option<CniOwner>,
}

impl AttachRequest {
    /// A request for endpoint `name` of `kind`, with everything else left to micropod.
    #[must_use]
    pub fn new(name: impl Into<String>, kind: EndpointKind) -> Self {
        Self {
            name: name.into(),
            kind,
            netns: None,
            ip: None,
            ifname: None,
            mtu: None,
            range: None,
            cni: None,
        }
    }
}

/// What a VMM or a container runtime needs to know about a new endpoint.
#[derive(Clone, Debug, Serialize)]
pub struct Attachment {
    pub name: String,
    pub kind: EndpointKind,
    /// The TAP (for the VMM) or the bridge's end of the veth pair.
    pub link: String,
    pub bridge: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub cidr: String,
    pub gateway: Ipv4Addr,
    pub mac: Mac,
    pub kernel_arg: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// The MTU of a netns endpoint's interfaces, when the request set one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// An endpoint reconcile released, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Released {
    pub name: String,
    pub ip: Option<Ipv4Addr>,
    pub link: Option<String>,
    pub reason: String,
}

/// `network status`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub up: bool,
    pub state_dir: PathBuf,
    pub bpf_dir: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NetworkStatus {
    pub phase: Phase,
    pub bridge: String,
    pub bridge_present: bool,
    pub subnet: String,
    pub gateway: Ipv4Addr,
    pub uplink: Option<String>,
    pub datapath_requested: DatapathMode,
    pub datapath: ActiveDatapath,
    /// Why the data path differs from the request, or what part of it is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datapath_note: Option<String>,
    /// On eBPF, the id of the object whose programs run (`up` replaces programs of another
    /// build's; `None` for pins made before ids were recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datapath_object: Option<String>,
    pub nat_table_size: u32,
    /// The source ports translated flows get, `MIN-MAX`.
    pub nat_ports: String,
    pub nft_table: String,
    pub ipam: IpamUsage,
    pub endpoints: Vec<EndpointView>,
    /// Links of detached endpoints that are still waiting to be deleted.
    pub retired_links: usize,
    /// The TAPs made ahead of need.
    pub pool: PoolStatus,
}

/// `network status`'s view of the TAP pool.
#[derive(Clone, Debug, Serialize)]
pub struct PoolStatus {
    /// How many `network up --pool` asked for.
    pub size: u32,
    /// How many are ready now.
    pub ready: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct EndpointView {
    pub name: String,
    pub kind: EndpointKind,
    pub ip: Ipv4Addr,
    pub cidr: String,
    pub mac: Mac,
    pub link: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    pub kernel_arg: String,
    /// The CNI attachment, for endpoints of containers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniOwner>,
}

impl EndpointView {
    fn new(ep: &Endpoint, doc: &NetworkDoc) -> Self {
        let subnet = doc.head.config.subnet;
        Self {
            name: ep.name.clone(),
            kind: ep.kind,
            ip: ep.ip,
            cidr: format!("{}/{}", ep.ip, subnet.prefix()),
            mac: ep.mac,
            link: ep.link.clone(),
            netns: ep.netns.as_ref().map(|n| n.path.clone()),
            ifname: ep.netns.as_ref().map(|n| n.ifname.clone()),
            kernel_arg: kernel_ip_arg(ep.ip, subnet, doc.head.config.gateway),
            cni: ep.cni.clone(),
        }
    }
}

impl Network {
    pub fn new(state_dir: impl Into<PathBuf>, bpf_dir: impl Into<PathBuf>) -> Self {
        let state = StateDir::new(state_dir);
        Self {
            records: store::Records::new(&state),
            state,
            bpf_dir: bpf_dir.into(),
            reaper_exe: None,
        }
    }

    /// Commands give up waiting for another command's state lock after `wait`
    /// ([`crate::state::StateError::LockBusy`]) instead of waiting as long as it takes.
    #[must_use]
    pub fn lock_wait(mut self, wait: std::time::Duration) -> Self {
        self.state = self.state.with_lock_wait(wait);
        self.records = store::Records::new(&self.state);
        self
    }

    pub fn state_dir(&self) -> &std::path::Path {
        self.state.root()
    }

    pub fn bpf_dir(&self) -> &std::path::Path {
        &self.bpf_dir
    }

    /// `network status`: what the state says, and whether the bridge is really there. Needs no
    /// privileges beyond reading the state dir, and takes no lock (writes are atomic renames).
    pub async fn status(&self) -> Result<Status, NetworkError> {
        let network = match self.records.load_unlocked()? {
            None => None,
            Some(doc) => {
                let nl = crate::net::Netlink::connect().map_err(NetworkError::Netlink)?;
                let bridge_present = crate::net::link::find(&nl, &doc.head.config.bridge)
                    .await
                    .map_err(|e| NetworkError::Links(Box::new(e)))?
                    .is_some();
                Some(NetworkStatus {
                    phase: doc.head.phase,
                    bridge: doc.head.config.bridge.clone(),
                    bridge_present,
                    subnet: doc.head.config.subnet.to_string(),
                    gateway: doc.head.config.gateway,
                    uplink: doc.head.config.uplink.clone(),
                    datapath_requested: doc.head.config.datapath,
                    datapath: doc.head.active_datapath,
                    datapath_note: doc.head.datapath_note.clone(),
                    datapath_object: (doc.head.active_datapath == ActiveDatapath::Ebpf)
                        .then(|| crate::datapath::DataPlane::new(&self.bpf_dir).installed_object())
                        .flatten(),
                    nat_table_size: doc.head.config.nat_entries,
                    nat_ports: doc.head.config.nat_ports().to_string(),
                    nft_table: doc.head.nft_table.clone(),
                    ipam: doc.ipam.usage(),
                    endpoints: doc
                        .endpoints
                        .values()
                        .map(|ep| EndpointView::new(ep, &doc))
                        .collect(),
                    retired_links: doc.retired.len(),
                    pool: PoolStatus {
                        size: doc.head.config.pool,
                        ready: doc.pool.len(),
                    },
                })
            }
        };
        Ok(Status {
            up: network.is_some(),
            state_dir: self.state.root().to_path_buf(),
            bpf_dir: self.bpf_dir.clone(),
            network,
        })
    }

    /// The state document as last written, read without the lock (writes are atomic renames);
    /// [`NetworkError::NotUp`] when no network is up. For readers such as `micropod stats`.
    pub fn read_doc(&self) -> Result<NetworkDoc, NetworkError> {
        self.records
            .load_unlocked()?
            .ok_or_else(|| NetworkError::NotUp {
                state_dir: self.state.root().to_path_buf(),
            })
    }

    /// Endpoint `name` as on record, read without the lock; `None` if there is none (or no
    /// network).
    pub fn endpoint(&self, name: &str) -> Result<Option<Endpoint>, NetworkError> {
        self.records.endpoint(name)
    }

    /// `network ls`: the endpoints on record.
    pub fn list(&self) -> Result<Vec<EndpointView>, NetworkError> {
        Ok(self
            .records
            .load_unlocked()?
            .map(|doc| {
                doc.endpoints
                    .values()
                    .map(|ep| EndpointView::new(ep, &doc))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// Deletes the link `name` if it exists (`Ok(false)`: it did not).
pub(super) async fn delete_link(
    nl: &crate::net::Netlink,
    name: &str,
) -> Result<bool, NetworkError> {
    crate::net::link::delete_if_exists(nl, name)
        .await
        .map_err(|source| NetworkError::DeleteLink {
            name: name.to_owned(),
            source: Box::new(source),
        })
}

/// Fails unless the process has CAP_NET_ADMIN in its effective set.
pub fn check_privileges() -> Result<(), NetworkError> {
    const CAP_NET_ADMIN: u32 = 12;
    let effective = crate::sys::effective_capabilities().unwrap_or(0);
    if effective & (1 << CAP_NET_ADMIN) != 0 {
        Ok(())
    } else {
        Err(NetworkError::NotPrivileged)
    }
}

/// Parses a `--subnet`: IPv4 CIDR, network address, room for a gateway and an endpoint.
pub fn parse_subnet(input: &str) -> Result<Ipv4Network, NetworkError> {
    let invalid = |reason: &str| {
        NetworkError::from(InputError::InvalidSubnet {
            input: input.into(),
            reason: reason.into(),
        })
    };
    if !input.contains('/') {
        return Err(invalid(
            "missing prefix length; use CIDR notation such as 10.10.0.0/24",
        ));
    }
    match input.parse::<ipnetwork::IpNetwork>() {
        Ok(ipnetwork::IpNetwork::V4(net)) => {
            if let Some(why) = special_purpose(net) {
                return Err(invalid(&format!(
                    "it overlaps {why}; use a private range such as 10.10.0.0/24"
                )));
            }
            // Ipam::new checks the prefix size and that this is the network address.
            crate::ipam::Ipam::new(
                net,
                crate::ipam::Ipam::default_gateway(net).map_err(InputError::Subnet)?,
            )
            .map_err(InputError::Subnet)?;
            Ok(net)
        }
        Ok(ipnetwork::IpNetwork::V6(_)) => Err(invalid("only IPv4 subnets are supported")),
        Err(_) => Err(invalid("not CIDR notation such as 10.10.0.0/24")),
    }
}

/// The IPv4 ranges an endpoint subnet must not touch, and why (RFC 6890). The overlap check of
/// `up` looks at this namespace's addresses and routes, which say nothing about these (and
/// skips loopback): a bridge on one of them either breaks the host or never forwards.
const SPECIAL_PURPOSE: [(Ipv4Addr, u8, &str); 5] = [
    (
        Ipv4Addr::new(0, 0, 0, 0),
        8,
        "0.0.0.0/8 (\"this network\": not a source or destination address)",
    ),
    (
        Ipv4Addr::new(127, 0, 0, 0),
        8,
        "127.0.0.0/8 (loopback: never leaves the host)",
    ),
    (
        Ipv4Addr::new(169, 254, 0, 0),
        16,
        "169.254.0.0/16 (link-local: not routed, and home of the cloud metadata service)",
    ),
    (
        Ipv4Addr::new(224, 0, 0, 0),
        4,
        "224.0.0.0/4 (multicast: not a unicast address)",
    ),
    (
        Ipv4Addr::new(240, 0, 0, 0),
        4,
        "240.0.0.0/4 (reserved, with the broadcast address 255.255.255.255)",
    ),
];

/// The special-purpose range `subnet` overlaps, in words, if any.
fn special_purpose(subnet: Ipv4Network) -> Option<&'static str> {
    SPECIAL_PURPOSE.iter().find_map(|&(ip, prefix, why)| {
        let range = Ipv4Network::new(ip, prefix).expect("a valid constant range");
        (range.contains(subnet.network()) || subnet.contains(range.network())).then_some(why)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_purpose_subnets_are_refused_with_the_range_they_overlap() {
        for (input, range) in [
            ("127.0.0.0/24", "127.0.0.0/8 (loopback"),
            ("127.255.255.0/24", "127.0.0.0/8"),
            ("0.0.0.0/24", "0.0.0.0/8"),
            ("169.254.0.0/24", "169.254.0.0/16"),
            ("224.0.0.0/24", "224.0.0.0/4"),
            ("239.255.0.0/16", "224.0.0.0/4"),
            ("240.0.0.0/24", "240.0.0.0/4"),
            ("255.255.255.0/24", "240.0.0.0/4"),
            // Wider than the range, and containing it.
            ("0.0.0.0/4", "0.0.0.0/8"),
            ("169.254.0.0/15", "169.254.0.0/16"),
        ] {
            let err = parse_subnet(input).expect_err(input).to_string();
            assert!(err.contains(range), "{input}: {err}");
            assert!(err.contains("use a private range"), "{input}: {err}");
        }
    }

    #[test]
    fn ordinary_subnets_are_accepted() {
        for input in [
            "10.10.0.0/24",
            "172.16.0.0/12",
            "192.168.100.0/24",
            "100.64.0.0/24",
            "1.0.0.0/24",
            "126.255.255.0/24",
            "128.0.0.0/24",
            "169.253.0.0/16",
            "169.255.0.0/16",
            "223.255.255.0/24",
        ] {
            assert!(parse_subnet(input).is_ok(), "{input}");
        }
    }
}
