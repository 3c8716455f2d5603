//! The network manager's errors, grouped by the step that failed: checking a request, `up`,
//! `attach`, and teardown (which reports every failure, not the first). Errors that any command
//! can meet (the state dir, netlink, reading the namespace) stay at the top level.

use std::{net::Ipv4Addr, path::PathBuf};

use super::{BR_MAX_PORTS, model::MIN_NAT_PORTS};
use crate::{
    datapath::{DatapathError, RemoveError},
    ipam::IpamError,
    net::{
        NetlinkError, NetnsError, addr::AddrError, bridge::BridgeError, link::LinkError,
        naming::InvalidName, nftables::NftError, ports::PortRange, route::RouteError,
        sysctl::SysctlError, tap::TapError, veth::VethError,
    },
    state::StateError,
};

/// What the network manager's commands fail with. Kept small, since every result of the
/// manager and the VM manager's errors carry it: source errors of 80 bytes or more are boxed
/// (clippy::result_large_err warns at 128).
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "this needs CAP_NET_ADMIN (run as root): micropod configures links, addresses and netfilter"
    )]
    NotPrivileged,
    /// The request is invalid; nothing was changed.
    #[error(transparent)]
    Input(#[from] InputError),
    /// `network up` refused or failed.
    #[error(transparent)]
    Up(#[from] UpError),
    /// `network attach` refused or failed.
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("no network is up in {state_dir}; run `micropod network up` first")]
    NotUp { state_dir: PathBuf },
    #[error(
        "{count} endpoint(s) still attached ({names}); detach them or use `network down --force`"
    )]
    EndpointsExist { count: usize, names: String },
    #[error("no endpoint named {name:?}; `micropod network ls` lists them")]
    UnknownEndpoint { name: String },
    #[error("cannot read the eBPF data path's maps; `micropod network up` repairs missing pins")]
    ReadDatapath(#[source] Box<DatapathError>),
    #[error("cannot release {ip}")]
    Release {
        ip: Ipv4Addr,
        #[source]
        source: IpamError,
    },
    #[error(
        "cannot take link {name} out of service for deletion; the next micropod command finishes the detach"
    )]
    RetireLink {
        name: String,
        #[source]
        source: Box<LinkError>,
    },
    #[error("every retired-link name for {ip} is taken; run `micropod gc` to delete retired links")]
    RetiredNamesExhausted { ip: Ipv4Addr },
    #[error("every pooled-TAP name is taken; run `micropod gc` to delete unrecorded ones")]
    PoolNamesExhausted,
    #[error("cannot make the pooled TAP {name}: cannot {step}")]
    Pool {
        name: String,
        step: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot delete link {name}")]
    DeleteLink {
        name: String,
        #[source]
        source: Box<LinkError>,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "{path} is of state version {found}, written by a newer micropod (this one understands versions {oldest} to {newest}); use that micropod, or the newest one"
    )]
    StateTooNew {
        path: PathBuf,
        found: u32,
        oldest: u32,
        newest: u32,
    },
    #[error(
        "{path} has the unknown state version {found} (this micropod understands versions {oldest} to {newest}); restore the document, or move the state dir aside to start afresh"
    )]
    StateVersionUnknown {
        path: PathBuf,
        found: u32,
        oldest: u32,
        newest: u32,
    },
    #[error("cannot talk to the kernel over netlink")]
    Netlink(#[source] NetlinkError),
    #[error("cannot read this namespace's links")]
    Links(#[source] Box<LinkError>),
    #[error("cannot read this namespace's addresses")]
    Addresses(#[source] Box<AddrError>),
    #[error("cannot read this namespace's routes")]
    Routes(#[source] Box<RouteError>),
    #[error("cannot look up interfaces (SIOCGIFINDEX)")]
    Probe(#[source] std::io::Error),
    /// Every step of a teardown that failed, one per line.
    #[error(
        "teardown left {} problem(s); run the command again once fixed:\n  - {}",
        .0.len(),
        chains(.0)
    )]
    Teardown(Vec<TeardownError>),
}

const _: () = assert!(size_of::<NetworkError>() <= 80);

/// A request that cannot be carried out as given, found before anything changes.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("invalid bridge name")]
    BridgeName(#[source] Box<LinkError>),
    #[error("invalid subnet {input:?}: {reason}")]
    InvalidSubnet { input: String, reason: String },
    #[error("invalid subnet")]
    Subnet(#[source] IpamError),
    #[error("uplink {name} does not exist; name an existing interface or use --uplink auto")]
    UnknownUplink { name: String },
    #[error("--nat-table-size {value} is out of range; use {min}..={max} entries (two per flow)")]
    NatEntries { value: u32, min: u32, max: u32 },
    #[error("--nat-ports {ports} holds {len} port(s); give at least {min}")]
    NatPortsTooFew {
        ports: PortRange,
        len: u32,
        min: u32,
    },
    #[error(
        "--nat-ports {ports} overlaps the host's own ephemeral ports {ephemeral} (net.ipv4.ip_local_port_range): the eBPF data path's translated flows could take a host connection's addresses and ports; choose ports outside them (with --datapath netfilter, conntrack keeps them apart and any ports will do)"
    )]
    NatPortsEphemeral {
        ports: PortRange,
        ephemeral: PortRange,
    },
    #[error(
        "--nat-ports {ports} overlaps {theirs}, the NAT ports of network {bridge} in this namespace: flows of both would collide on the uplink's address; choose ports apart from them"
    )]
    NatPortsTaken {
        ports: PortRange,
        bridge: String,
        theirs: PortRange,
    },
    #[error("--pool {value} is out of range; use 0 (no pool) to {max} TAPs")]
    Pool { value: u32, max: u32 },
    #[error(transparent)]
    InvalidEndpointName(#[from] InvalidName),
    #[error("invalid interface name for inside the namespace")]
    InvalidIfname(#[source] Box<LinkError>),
    #[error("a netns endpoint needs --netns PATH (e.g. /run/netns/NAME)")]
    NetnsRequired,
    #[error("--netns and --ifname only apply to --kind netns")]
    NetnsNotForTap,
    #[error("an MTU only applies to netns endpoints (a VM's MTU is its guest's)")]
    MtuNotForTap,
    #[error("MTU {value} is out of range: use 68 to 65535")]
    Mtu { value: u32 },
    #[error("invalid address range: {reason}")]
    Range { reason: String },
    #[error("cannot use {path} as the endpoint's namespace")]
    EndpointNetns {
        path: PathBuf,
        #[source]
        source: NetnsError,
    },
    #[error(
        "{path} is micropod's own network namespace; a netns endpoint must live in another one"
    )]
    HostNetns { path: PathBuf },
}

/// `network up`: what it refused, and the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("subnet {subnet} overlaps {what} in this network namespace; choose another --subnet")]
    SubnetOverlap { subnet: String, what: String },
    #[error(
        "a link named {name} already exists and micropod did not create it; choose another --bridge"
    )]
    BridgeExists { name: String },
    #[error(
        "a link named {name} exists but micropod did not make it ({why}); micropod adopts only the bridge it made (kind bridge, the gateway's MAC {mac}). Rename or delete that link, or choose another --bridge"
    )]
    ForeignBridge {
        name: String,
        why: String,
        mac: String,
    },
    #[error("cannot put the link {link} of endpoint {endpoint} back on the bridge")]
    PortBack {
        endpoint: String,
        link: String,
        #[source]
        source: Box<LinkError>,
    },
    #[error(
        "the network is up with {current}, and {endpoints} endpoint(s) use it; detach them (or `network down --force`) before changing it to {requested}"
    )]
    Reconfigure {
        current: String,
        requested: String,
        endpoints: usize,
    },
    #[error(
        "the network is up with other settings: {differences}; use the network's settings, or another state dir for another network"
    )]
    OtherSettings { differences: String },
    #[error(
        "no run of {min} free ports is left for NAT above 1023: the host's ephemeral ports are {ephemeral} (net.ipv4.ip_local_port_range){others}; give --nat-ports MIN-MAX (at least {MIN_NAT_PORTS} ports) or narrow that sysctl"
    )]
    NoNatPorts {
        min: u32,
        ephemeral: PortRange,
        others: String,
    },
    #[error("cannot read the host's ephemeral port range")]
    EphemeralPorts(#[source] SysctlError),
    #[error("cannot record the NAT ports on bridge {bridge}")]
    BridgeAlias {
        bridge: String,
        #[source]
        source: Box<LinkError>,
    },
    #[error("cannot create bridge {name}")]
    CreateBridge {
        name: String,
        #[source]
        source: Box<BridgeError>,
    },
    #[error("cannot bring bridge {name} up")]
    BridgeUp {
        name: String,
        #[source]
        source: Box<LinkError>,
    },
    #[error("cannot add the gateway address {gateway} to {bridge}")]
    GatewayAddress {
        bridge: String,
        gateway: Ipv4Addr,
        #[source]
        source: Box<AddrError>,
    },
    #[error("cannot enable IPv4 forwarding")]
    Forwarding(#[source] SysctlError),
    #[error("cannot install the MASQUERADE fallback")]
    Masquerade(#[source] Box<NftError>),
    #[error(
        "cannot set up the eBPF data path; use `--datapath auto` to fall back to netfilter when eBPF is unavailable"
    )]
    Datapath(#[source] Box<DatapathError>),
}

/// `network attach`: what it refused, and the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("an endpoint named {name:?} already exists (address {ip}); pick another name")]
    DuplicateEndpoint { name: String, ip: Ipv4Addr },
    #[error(
        "the bridge holds at most {BR_MAX_PORTS} ports (BR_MAX_PORTS) and all are in use; more endpoints need a second network"
    )]
    BridgeFull,
    #[error("bridge {name} is missing; run `micropod network up` to repair the network")]
    BridgeMissing { name: String },
    #[error("cannot allocate an address for {name:?}")]
    Allocate {
        name: String,
        #[source]
        source: Box<IpamError>,
    },
    #[error("cannot create TAP {name}")]
    CreateTap {
        name: String,
        #[source]
        source: TapError,
    },
    #[error("cannot create veth {name}")]
    CreateVeth {
        name: String,
        #[source]
        source: Box<VethError>,
    },
    #[error("{netns} already has an interface named {ifname}; choose another with --ifname")]
    IfnameTaken { ifname: String, netns: PathBuf },
    #[error("cannot attach {name} to the bridge")]
    Enslave {
        name: String,
        #[source]
        source: Box<LinkError>,
    },
    #[error("cannot turn IPv6 off on bridge port {name}")]
    PortIpv6 {
        name: String,
        #[source]
        source: SysctlError,
    },
    /// Also met by `up`, when it repairs the data plane of a network with endpoints.
    #[error("cannot attach endpoint {name} to the eBPF data path")]
    DatapathPort {
        name: String,
        #[source]
        source: Box<DatapathError>,
    },
    #[error("cannot configure {ifname} in {netns}: {}", .step.name())]
    ConfigureNetns {
        netns: PathBuf,
        ifname: String,
        #[source]
        step: NetnsStep,
    },
}

/// The steps of configuring an endpoint inside its namespace; each shows as its source error,
/// since [`AttachError::ConfigureNetns`] names the step.
#[derive(Debug, thiserror::Error)]
pub enum NetnsStep {
    #[error(transparent)]
    Netlink(Box<NetlinkError>),
    #[error(transparent)]
    FindInterface(Box<LinkError>),
    #[error(transparent)]
    NoLinkLocal(Box<LinkError>),
    #[error(transparent)]
    BringUp(Box<LinkError>),
    #[error(transparent)]
    AddAddress(Box<AddrError>),
    #[error(transparent)]
    AddDefaultRoute(Box<RouteError>),
}

impl NetnsStep {
    /// What the step does, as the error message says it.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Netlink(_) => "netlink",
            Self::FindInterface(_) => "find the interface",
            Self::NoLinkLocal(_) => "stop its IPv6 link-local address",
            Self::BringUp(_) => "bring it up",
            Self::AddAddress(_) => "add the address",
            Self::AddDefaultRoute(_) => "add the default route",
        }
    }
}

/// One failed step of a teardown. Teardown runs every step, so there is a list of these.
#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    #[error("endpoint {name}")]
    EndpointLink {
        name: String,
        #[source]
        source: LinkError,
    },
    #[error("retired link {name}")]
    RetiredLink {
        name: String,
        #[source]
        source: LinkError,
    },
    #[error("pooled TAP {name}")]
    PooledLink {
        name: String,
        #[source]
        source: LinkError,
    },
    #[error("listing the pooled TAPs")]
    PoolList(#[source] Box<NetworkError>),
    #[error("bridge {name}")]
    Bridge {
        name: String,
        #[source]
        source: LinkError,
    },
    #[error("nf_tables table {table}")]
    NftTable {
        table: String,
        #[source]
        source: NftError,
    },
    #[error("ip_forward")]
    IpForward(#[source] SysctlError),
    #[error("BPF pins")]
    BpfPins(#[source] RemoveError),
}

/// Each error with its causes, one per line (after the first, which follows the message).
fn chains(errors: &[TeardownError]) -> String {
    errors
        .iter()
        .map(|e| crate::error_chain(e))
        .collect::<Vec<_>>()
        .join("\n  - ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn not_found(name: &str) -> LinkError {
        LinkError::NotFound { name: name.into() }
    }

    #[test]
    fn teardown_lists_every_failure_with_its_causes() {
        let err = NetworkError::Teardown(vec![
            TeardownError::EndpointLink {
                name: "a".into(),
                source: not_found("mpt-0a0a0002"),
            },
            TeardownError::BpfPins(RemoveError::Unpin {
                path: "/sys/fs/bpf/x/maps/NAT".into(),
                source: std::io::Error::from_raw_os_error(libc::EBUSY),
            }),
        ]);
        let text = err.to_string();
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("teardown left 2 problem(s); run the command again once fixed:")
        );
        assert_eq!(
            lines.next(),
            Some("  - endpoint a: no interface named mpt-0a0a0002")
        );
        let pins = lines.next().unwrap();
        assert!(
            pins.starts_with("  - BPF pins: /sys/fs/bpf/x/maps/NAT: "),
            "{text}"
        );
        assert_eq!(lines.next(), None, "{text}");
    }

    #[test]
    fn configure_netns_names_the_step_and_keeps_its_source() {
        let err = NetworkError::from(AttachError::ConfigureNetns {
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            step: NetnsStep::BringUp(Box::new(not_found("eth0"))),
        });
        assert_eq!(
            err.to_string(),
            "cannot configure eth0 in /run/netns/x: bring it up"
        );
        assert_eq!(
            crate::error_chain(&err),
            "cannot configure eth0 in /run/netns/x: bring it up: no interface named eth0"
        );
    }
}
