//! IPv4 address management for one subnet.
//!
//! [`Ipam`] is pure data: it knows the subnet, the gateway and which address belongs to which
//! owner (an endpoint name). It does no I/O; the caller persists it inside a state document
//! (see [`crate::state`]) and holds the state lock around every read-modify-write.
//!
//! Rules:
//! - The network, gateway and broadcast addresses are never handed out.
//! - A subnet given with host bits set (`10.10.0.5/24`) is refused with a hint
//!   ("did you mean 10.10.0.0/24?") rather than silently normalised: a typo in the subnet is
//!   more likely than an intent, and the stored document must match what the user sees.
//! - Each owner holds at most one address.
//!
//! Serialized form (JSON): `{"subnet":"10.10.0.0/24","gateway":"10.10.0.1",
//! "allocations":{"10.10.0.2":"vm1"}}`. Deserializing re-checks every invariant, so a corrupted
//! or hand-edited document is a clear error, never a panic or a silently double-assigned address.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::Ipv4Addr,
    str::FromStr,
};

use ipnetwork::{IpNetworkError, Ipv4Network};
use serde::{Deserialize, Serialize};

/// The addresses of a subnet that are never assigned to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReservedKind {
    Network,
    Gateway,
    Broadcast,
}

impl ReservedKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Network => "network",
            Self::Gateway => "gateway",
            Self::Broadcast => "broadcast",
        }
    }
}

impl fmt::Display for ReservedKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(
        "subnet {subnet} is too small: it leaves no room for a gateway and an endpoint; \
         use a prefix of /30 or shorter (e.g. /24)"
    )]
    PrefixTooLong { subnet: Ipv4Network },
    #[error("subnet {subnet} has host bits set; did you mean {network}?")]
    NotNetworkAddress {
        subnet: Ipv4Network,
        network: Ipv4Network,
    },
    #[error("gateway {gateway} is outside subnet {subnet}; choose an address inside it")]
    GatewayOutsideSubnet {
        gateway: Ipv4Addr,
        subnet: Ipv4Network,
    },
    #[error(
        "gateway {gateway} is the {what} address of {subnet}; choose a host address \
         (usually the first one)"
    )]
    GatewayReserved {
        gateway: Ipv4Addr,
        subnet: Ipv4Network,
        what: ReservedKind,
    },
    #[error("{ip} is outside subnet {subnet}; request an address inside it or none at all")]
    OutsideSubnet { ip: Ipv4Addr, subnet: Ipv4Network },
    #[error("{ip} is the {what} address and is never assigned to an endpoint")]
    Reserved { ip: Ipv4Addr, what: ReservedKind },
    #[error(
        "{ip} is already assigned to {owner:?}; detach that endpoint or request another address"
    )]
    Taken { ip: Ipv4Addr, owner: String },
    #[error(
        "subnet {subnet} is full: all {capacity} endpoint addresses are in use; detach unused \
         endpoints or use a larger subnet"
    )]
    Exhausted { subnet: Ipv4Network, capacity: u32 },
    #[error(
        "no free address left in the range {first}-{last}; release endpoints or widen the range"
    )]
    RangeExhausted { first: Ipv4Addr, last: Ipv4Addr },
    #[error("{owner:?} already holds {ip}; release it first (an endpoint has one address)")]
    DuplicateOwner { owner: String, ip: Ipv4Addr },
    #[error("{ip} is not allocated (released twice?)")]
    NotAllocated { ip: Ipv4Addr },
    #[error("the owner of an address (an endpoint name) must not be empty")]
    EmptyOwner,
    // The reasons below are part of the message, not `#[source]`: these variants mostly reach
    // the user through serde (`Error::custom` keeps only the Display text).
    #[error("invalid subnet {text:?}: {reason}; expected CIDR notation such as 10.10.0.0/24")]
    InvalidSubnet {
        text: String,
        reason: IpNetworkError,
    },
    #[error("stored allocation {ip} -> {owner:?} is invalid: {reason}")]
    InvalidAllocation {
        ip: Ipv4Addr,
        owner: String,
        reason: Box<Self>,
    },
}

/// Address allocations in one IPv4 subnet. See the module docs for the rules.
///
/// Persisted as `{"subnet":"10.10.0.0/24","gateway":…,"allocations":{ip: owner}}`: the subnet
/// through ipnetwork's own serde (its CIDR text).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(try_from = "IpamRepr")]
pub struct Ipam {
    subnet: Ipv4Network,
    gateway: Ipv4Addr,
    /// ip -> owner (endpoint name). Ordered, so "lowest free" is a walk from [`Self::next_free`].
    allocations: BTreeMap<Ipv4Addr, String>,
    /// Reverse index of `allocations` (not serialized): owner lookups stay O(1).
    #[serde(skip)]
    by_owner: HashMap<String, Ipv4Addr>,
    /// Lower bound of the lowest free host address (not serialized): every host address below
    /// it is the gateway or allocated. Keeps sequential allocation from rescanning the map.
    #[serde(skip)]
    next_free: u32,
}

/// How much of the subnet is handed out ([`Ipam::usage`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IpamUsage {
    pub capacity: u32,
    pub used: u32,
    pub free: u32,
}

impl PartialEq for Ipam {
    /// Equal when the persisted content is; the caches derive from it.
    fn eq(&self, other: &Self) -> bool {
        self.subnet == other.subnet
            && self.gateway == other.gateway
            && self.allocations == other.allocations
    }
}

impl Eq for Ipam {}

impl Ipam {
    /// An empty pool. The subnet must be given by its network address (see the module docs)
    /// with a prefix of at most /30; the gateway must be a host address of the subnet.
    pub fn new(subnet: Ipv4Network, gateway: Ipv4Addr) -> Result<Self, IpamError> {
        check_subnet(subnet)?;
        if !subnet.contains(gateway) {
            return Err(IpamError::GatewayOutsideSubnet { gateway, subnet });
        }
        let what = if gateway == subnet.network() {
            Some(ReservedKind::Network)
        } else if gateway == subnet.broadcast() {
            Some(ReservedKind::Broadcast)
        } else {
            None
        };
        if let Some(what) = what {
            return Err(IpamError::GatewayReserved {
                gateway,
                subnet,
                what,
            });
        }
        Ok(Self {
            subnet,
            gateway,
            allocations: BTreeMap::new(),
            by_owner: HashMap::new(),
            next_free: first_host(subnet),
        })
    }

    /// The conventional gateway of `subnet`: its first host address (`.1` in a /24).
    pub fn default_gateway(subnet: Ipv4Network) -> Result<Ipv4Addr, IpamError> {
        if subnet.prefix() > 30 {
            return Err(IpamError::PrefixTooLong { subnet });
        }
        Ok(Ipv4Addr::from(first_host(subnet)))
    }

    pub fn subnet(&self) -> Ipv4Network {
        self.subnet
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// Assigns an address to `owner`: the lowest free one when `requested` is `None`, else
    /// exactly `requested` or an error saying why not. Never returns the network, gateway or
    /// broadcast address.
    pub fn allocate(
        &mut self,
        owner: &str,
        requested: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, IpamError> {
        if owner.is_empty() {
            return Err(IpamError::EmptyOwner);
        }
        if let Some(&ip) = self.by_owner.get(owner) {
            return Err(IpamError::DuplicateOwner {
                owner: owner.to_owned(),
                ip,
            });
        }
        let ip = match requested {
            Some(ip) => {
                self.check_assignable(ip)?;
                ip
            }
            None => {
                let ip = self.lowest_free()?;
                self.next_free = u32::from(ip) + 1;
                ip
            }
        };
        self.allocations.insert(ip, owner.to_owned());
        self.by_owner.insert(owner.to_owned(), ip);
        Ok(ip)
    }

    /// Frees `ip` and returns who held it. Releasing a free address is an error, so a double
    /// release (two callers believing they own it) does not go unnoticed.
    pub fn release(&mut self, ip: Ipv4Addr) -> Result<String, IpamError> {
        let owner = self
            .allocations
            .remove(&ip)
            .ok_or(IpamError::NotAllocated { ip })?;
        self.by_owner.remove(&owner);
        self.next_free = self.next_free.min(u32::from(ip));
        Ok(owner)
    }

    pub fn owner(&self, ip: Ipv4Addr) -> Option<&str> {
        self.allocations.get(&ip).map(String::as_str)
    }

    pub fn address_of(&self, owner: &str) -> Option<Ipv4Addr> {
        self.by_owner.get(owner).copied()
    }

    /// Number of assignable addresses: the hosts of the subnet minus the gateway.
    pub fn capacity(&self) -> u32 {
        capacity(self.subnet)
    }

    /// Number of addresses in use.
    pub fn used(&self) -> u32 {
        // Bounded by the capacity, which is a u32.
        u32::try_from(self.allocations.len()).unwrap_or(u32::MAX)
    }

    /// Capacity, used and free addresses together, as `network status` and `stats` report them.
    #[must_use]
    pub fn usage(&self) -> IpamUsage {
        IpamUsage {
            capacity: self.capacity(),
            used: self.used(),
            free: self.capacity() - self.used(),
        }
    }

    /// All allocations, in address order.
    pub fn allocations(&self) -> impl Iterator<Item = (Ipv4Addr, &str)> {
        self.allocations
            .iter()
            .map(|(ip, owner)| (*ip, owner.as_str()))
    }

    fn check_assignable(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        self.check_reserved(ip)?;
        if let Some(owner) = self.allocations.get(&ip) {
            return Err(IpamError::Taken {
                ip,
                owner: owner.clone(),
            });
        }
        Ok(())
    }

    /// Inside the subnet, and neither its network, broadcast nor gateway address.
    fn check_reserved(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        if !self.subnet.contains(ip) {
            return Err(IpamError::OutsideSubnet {
                ip,
                subnet: self.subnet,
            });
        }
        let what = if ip == self.subnet.network() {
            Some(ReservedKind::Network)
        } else if ip == self.subnet.broadcast() {
            Some(ReservedKind::Broadcast)
        } else if ip == self.gateway {
            Some(ReservedKind::Gateway)
        } else {
            None
        };
        if let Some(what) = what {
            return Err(IpamError::Reserved { ip, what });
        }
        Ok(())
    }

    /// [`Self::allocate`]'s choice for allocations kept outside this value (one record per
    /// address, see `network::store`): `requested` if it is assignable and not `taken`, else
    /// the lowest host address from `lowest_free` up (a lower bound the caller keeps: every
    /// host address below it is taken) that is not `taken`. Ignores this value's own map.
    /// `taken` returns the owner of an address; its errors are passed through. With `range`
    /// (both ends included, inside the subnet), only addresses of the range are chosen.
    pub fn pick<E>(
        &self,
        requested: Option<Ipv4Addr>,
        lowest_free: Option<Ipv4Addr>,
        range: Option<(Ipv4Addr, Ipv4Addr)>,
        mut taken: impl FnMut(Ipv4Addr) -> Result<Option<String>, E>,
    ) -> Result<Result<Ipv4Addr, IpamError>, E> {
        if let Some(ip) = requested {
            if let Err(e) = self.check_reserved(ip) {
                return Ok(Err(e));
            }
            return Ok(match taken(ip)? {
                Some(owner) => Err(IpamError::Taken { ip, owner }),
                None => Ok(ip),
            });
        }
        let (first, last) = match range {
            Some((from, to)) => (
                u32::from(from).max(first_host(self.subnet)),
                u32::from(to).min(last_host(self.subnet)),
            ),
            None => (first_host(self.subnet), last_host(self.subnet)),
        };
        let gateway = u32::from(self.gateway);
        // Every host address below the bound is taken, so a range starting lower starts there.
        let start = lowest_free
            .map(u32::from)
            .filter(|ip| (first..=last).contains(ip))
            .unwrap_or(first);
        // From the bound up; then, in case the bound was wrong, below it.
        for candidate in (start..=last).chain(first..start) {
            if candidate != gateway && taken(Ipv4Addr::from(candidate))?.is_none() {
                return Ok(Ok(Ipv4Addr::from(candidate)));
            }
        }
        Ok(Err(match range {
            Some((first, last)) => IpamError::RangeExhausted { first, last },
            None => IpamError::Exhausted {
                subnet: self.subnet,
                capacity: self.capacity(),
            },
        }))
    }

    /// Whether `(first, last)` is a usable range of this subnet: both ends host addresses of
    /// it, in order. Says why not.
    pub fn check_range(&self, first: Ipv4Addr, last: Ipv4Addr) -> Result<(), String> {
        let hosts = first_host(self.subnet)..=last_host(self.subnet);
        for (what, ip) in [("start", first), ("end", last)] {
            if !hosts.contains(&u32::from(ip)) {
                return Err(format!(
                    "the range {what} {ip} is not a host address of {}",
                    self.subnet
                ));
            }
        }
        if first > last {
            return Err(format!("the range start {first} is above its end {last}"));
        }
        Ok(())
    }

    /// Walks the allocations upwards from `next_free` to the first gap. Everything below
    /// `next_free` is known to be taken, so filling the pool in order costs O(log n) per call.
    fn lowest_free(&self) -> Result<Ipv4Addr, IpamError> {
        let exhausted = || IpamError::Exhausted {
            subnet: self.subnet,
            capacity: self.capacity(),
        };
        if self.used() >= self.capacity() {
            return Err(exhausted());
        }
        let last = last_host(self.subnet);
        let gateway = u32::from(self.gateway);
        let mut candidate = self.next_free;
        let mut taken = self
            .allocations
            .range(Ipv4Addr::from(candidate)..)
            .map(|(ip, _)| u32::from(*ip))
            .peekable();
        while candidate <= last {
            // The gateway is never a key of the map, so testing it first skips nothing.
            if candidate == gateway || taken.next_if_eq(&candidate).is_some() {
                candidate += 1;
            } else {
                return Ok(Ipv4Addr::from(candidate));
            }
        }
        // Only reachable if the caches disagree with the map; report it as full all the same.
        Err(exhausted())
    }
}

fn check_subnet(subnet: Ipv4Network) -> Result<(), IpamError> {
    if subnet.prefix() > 30 {
        return Err(IpamError::PrefixTooLong { subnet });
    }
    if subnet.ip() != subnet.network() {
        // Cannot fail: the prefix comes from a valid network.
        let network = Ipv4Network::new(subnet.network(), subnet.prefix()).unwrap_or(subnet);
        return Err(IpamError::NotNetworkAddress { subnet, network });
    }
    Ok(())
}

fn first_host(subnet: Ipv4Network) -> u32 {
    u32::from(subnet.network()) + 1
}

fn last_host(subnet: Ipv4Network) -> u32 {
    u32::from(subnet.broadcast()) - 1
}

/// Hosts minus the gateway. Computed here because `Ipv4Network::size` saturates for /0.
fn capacity(subnet: Ipv4Network) -> u32 {
    let size = 1u64 << (32 - u32::from(subnet.prefix()));
    // At most 2^32 - 3 (prefix <= 30 is checked at construction), so it fits.
    u32::try_from(size.saturating_sub(3)).unwrap_or(u32::MAX)
}

/// The persisted form as read, checked by [`TryFrom`] before it becomes an [`Ipam`]. The
/// subnet is read as text and parsed there, not through ipnetwork's `Deserialize`, so a bad one
/// is an [`IpamError::InvalidSubnet`] that names it and says what is expected (ipnetwork's own
/// error says only "invalid prefix").
#[derive(Deserialize)]
struct IpamRepr {
    subnet: String,
    gateway: Ipv4Addr,
    #[serde(default)]
    allocations: BTreeMap<Ipv4Addr, String>,
}

impl TryFrom<IpamRepr> for Ipam {
    type Error = IpamError;

    /// Rebuilds through the same checks as `new` + `allocate`, in their order, so a document
    /// that they could not have produced is refused. The map's keys are distinct already, so it
    /// is taken as it is rather than rebuilt entry by entry: every command loads the document.
    fn try_from(repr: IpamRepr) -> Result<Self, IpamError> {
        let subnet =
            Ipv4Network::from_str(&repr.subnet).map_err(|reason| IpamError::InvalidSubnet {
                text: repr.subnet.clone(),
                reason,
            })?;
        let mut ipam = Self::new(subnet, repr.gateway)?;
        ipam.by_owner.reserve(repr.allocations.len());
        for (&ip, owner) in &repr.allocations {
            let invalid = |reason| IpamError::InvalidAllocation {
                ip,
                owner: owner.clone(),
                reason: Box::new(reason),
            };
            if owner.is_empty() {
                return Err(invalid(IpamError::EmptyOwner));
            }
            if let Some(&held) = ipam.by_owner.get(owner) {
                return Err(invalid(IpamError::DuplicateOwner {
                    owner: owner.clone(),
                    ip: held,
                }));
            }
            ipam.check_assignable(ip).map_err(invalid)?;
            ipam.by_owner.insert(owner.clone(), ip);
        }
        ipam.allocations = repr.allocations;
        // Past the run of taken addresses at the bottom, as sequential allocation left it.
        let gateway = u32::from(ipam.gateway);
        let mut next = first_host(subnet);
        for ip in ipam.allocations.keys().map(|ip| u32::from(*ip)) {
            if next == gateway {
                next += 1;
            }
            if ip != next {
                break;
            }
            next += 1;
        }
        ipam.next_free = next;
        Ok(ipam)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn pool(subnet: &str) -> Ipam {
        let subnet = net(subnet);
        Ipam::new(subnet, Ipam::default_gateway(subnet).unwrap()).unwrap()
    }

    #[test]
    fn usage_counts_what_is_handed_out() {
        let mut ipam = pool("10.10.0.0/29");
        ipam.allocate("a", None).unwrap();
        assert_eq!(
            ipam.usage(),
            IpamUsage {
                capacity: 5,
                used: 1,
                free: 4
            }
        );
    }

    #[test]
    fn lowest_free_in_order() {
        let mut ipam = pool("10.10.0.0/24");
        assert_eq!(ipam.gateway(), ip("10.10.0.1"));
        assert_eq!(ipam.capacity(), 253);
        for (i, expected) in ["10.10.0.2", "10.10.0.3", "10.10.0.4"].iter().enumerate() {
            assert_eq!(
                ipam.allocate(&format!("vm{i}"), None).unwrap(),
                ip(expected)
            );
        }
        assert_eq!(ipam.used(), 3);
        assert_eq!(ipam.owner(ip("10.10.0.3")), Some("vm1"));
        assert_eq!(ipam.address_of("vm2"), Some(ip("10.10.0.4")));
        assert_eq!(ipam.address_of("nobody"), None);
        let all: Vec<_> = ipam.allocations().collect();
        assert_eq!(
            all,
            [
                (ip("10.10.0.2"), "vm0"),
                (ip("10.10.0.3"), "vm1"),
                (ip("10.10.0.4"), "vm2")
            ]
        );
    }

    #[test]
    fn gateway_in_the_middle_is_skipped() {
        let subnet = net("10.10.0.0/29");
        let mut ipam = Ipam::new(subnet, ip("10.10.0.3")).unwrap();
        let got: Vec<_> = (0..5)
            .map(|i| ipam.allocate(&format!("vm{i}"), None).unwrap())
            .collect();
        assert_eq!(
            got,
            [
                "10.10.0.1",
                "10.10.0.2",
                "10.10.0.4",
                "10.10.0.5",
                "10.10.0.6"
            ]
            .map(ip)
        );
    }

    #[test]
    fn reuse_after_release() {
        let mut ipam = pool("10.10.0.0/24");
        for i in 0..5 {
            ipam.allocate(&format!("vm{i}"), None).unwrap();
        }
        assert_eq!(ipam.release(ip("10.10.0.4")).unwrap(), "vm2");
        assert_eq!(ipam.release(ip("10.10.0.3")).unwrap(), "vm1");
        assert_eq!(ipam.address_of("vm1"), None);
        assert_eq!(ipam.allocate("a", None).unwrap(), ip("10.10.0.3"));
        assert_eq!(ipam.allocate("b", None).unwrap(), ip("10.10.0.4"));
        assert_eq!(ipam.allocate("c", None).unwrap(), ip("10.10.0.7"));
        // The released owner may come back.
        assert_eq!(ipam.allocate("vm1", None).unwrap(), ip("10.10.0.8"));
    }

    #[test]
    fn requested_addresses() {
        let mut ipam = pool("10.10.0.0/24");
        assert_eq!(
            ipam.allocate("a", Some(ip("10.10.0.50"))).unwrap(),
            ip("10.10.0.50")
        );
        let err = ipam.allocate("b", Some(ip("10.20.0.5"))).unwrap_err();
        assert!(
            matches!(err, IpamError::OutsideSubnet { ip: i, subnet } if i == ip("10.20.0.5") && subnet == net("10.10.0.0/24")),
            "{err:?}"
        );
        for (addr, kind) in [
            ("10.10.0.0", ReservedKind::Network),
            ("10.10.0.1", ReservedKind::Gateway),
            ("10.10.0.255", ReservedKind::Broadcast),
        ] {
            let err = ipam.allocate("b", Some(ip(addr))).unwrap_err();
            assert!(
                matches!(err, IpamError::Reserved { ip: i, what } if i == ip(addr) && what == kind),
                "{err:?}"
            );
            assert!(err.to_string().contains(kind.as_str()), "{err}");
        }
        let err = ipam.allocate("b", Some(ip("10.10.0.50"))).unwrap_err();
        assert!(
            matches!(&err, IpamError::Taken { ip: i, owner } if *i == ip("10.10.0.50") && owner == "a"),
            "{err:?}"
        );
        // Failed requests left nothing behind.
        assert_eq!(ipam.used(), 1);
        assert_eq!(ipam.address_of("b"), None);
        // A requested address above the lowest free does not disturb lowest-free order.
        assert_eq!(ipam.allocate("b", None).unwrap(), ip("10.10.0.2"));
    }

    #[test]
    fn exhaustion_of_slash_30() {
        let mut ipam = pool("192.168.7.0/30");
        assert_eq!(ipam.capacity(), 1);
        assert_eq!(ipam.allocate("only", None).unwrap(), ip("192.168.7.2"));
        let err = ipam.allocate("more", None).unwrap_err();
        assert!(
            matches!(err, IpamError::Exhausted { capacity: 1, subnet } if subnet == net("192.168.7.0/30")),
            "{err:?}"
        );
        ipam.release(ip("192.168.7.2")).unwrap();
        assert_eq!(ipam.allocate("more", None).unwrap(), ip("192.168.7.2"));
    }

    #[test]
    fn exhaustion_of_slash_29() {
        let mut ipam = pool("10.0.0.8/29");
        assert_eq!(ipam.capacity(), 5);
        let got: Vec<_> = (0..5)
            .map(|i| ipam.allocate(&format!("vm{i}"), None).unwrap())
            .collect();
        assert_eq!(
            got,
            [
                "10.0.0.10",
                "10.0.0.11",
                "10.0.0.12",
                "10.0.0.13",
                "10.0.0.14"
            ]
            .map(ip)
        );
        assert_eq!(ipam.used(), 5);
        assert!(matches!(
            ipam.allocate("vm5", None),
            Err(IpamError::Exhausted { capacity: 5, .. })
        ));
        ipam.release(ip("10.0.0.12")).unwrap();
        assert_eq!(ipam.allocate("vm5", None).unwrap(), ip("10.0.0.12"));
    }

    #[test]
    fn slash_16_fills_up_fast() {
        let mut ipam = pool("10.1.0.0/16");
        assert_eq!(ipam.capacity(), 65533);
        for i in 0..ipam.capacity() {
            ipam.allocate(&format!("vm{i}"), None).unwrap();
        }
        assert_eq!(ipam.used(), 65533);
        assert!(matches!(
            ipam.allocate("x", None),
            Err(IpamError::Exhausted { .. })
        ));
        assert_eq!(ipam.release(ip("10.1.128.7")).unwrap(), "vm32773");
        assert_eq!(ipam.allocate("x", None).unwrap(), ip("10.1.128.7"));
        assert_eq!(ipam.address_of("vm65532"), Some(ip("10.1.255.254")));
    }

    #[test]
    fn double_release_is_an_error() {
        let mut ipam = pool("10.10.0.0/24");
        let a = ipam.allocate("a", None).unwrap();
        ipam.release(a).unwrap();
        let err = ipam.release(a).unwrap_err();
        assert!(
            matches!(err, IpamError::NotAllocated { ip: i } if i == a),
            "{err:?}"
        );
        assert!(matches!(
            ipam.release(ip("10.10.0.1")),
            Err(IpamError::NotAllocated { .. })
        ));
    }

    #[test]
    fn duplicate_owner() {
        let mut ipam = pool("10.10.0.0/24");
        let a = ipam.allocate("a", None).unwrap();
        for requested in [None, Some(ip("10.10.0.9")), Some(a)] {
            let err = ipam.allocate("a", requested).unwrap_err();
            assert!(
                matches!(&err, IpamError::DuplicateOwner { owner, ip: i } if owner == "a" && *i == a),
                "{err:?}"
            );
        }
        assert!(matches!(
            ipam.allocate("", None),
            Err(IpamError::EmptyOwner)
        ));
        assert_eq!(ipam.used(), 1);
    }

    #[test]
    fn tiny_subnets_refused() {
        for s in ["10.0.0.0/31", "10.0.0.0/32"] {
            let subnet = net(s);
            let err = Ipam::default_gateway(subnet).unwrap_err();
            assert!(matches!(err, IpamError::PrefixTooLong { .. }), "{err:?}");
            let err = Ipam::new(subnet, ip("10.0.0.0")).unwrap_err();
            assert!(matches!(err, IpamError::PrefixTooLong { .. }), "{err:?}");
            assert!(err.to_string().contains("/30"), "{err}");
        }
    }

    #[test]
    fn subnet_with_host_bits_refused_with_hint() {
        let err = Ipam::new(net("10.10.0.5/24"), ip("10.10.0.1")).unwrap_err();
        assert!(
            matches!(err, IpamError::NotNetworkAddress { network, .. } if network == net("10.10.0.0/24")),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("did you mean 10.10.0.0/24?"),
            "{err}"
        );
        // The default gateway only depends on the network part.
        assert_eq!(
            Ipam::default_gateway(net("10.10.0.5/24")).unwrap(),
            ip("10.10.0.1")
        );
    }

    #[test]
    fn gateway_checks() {
        let subnet = net("10.10.0.0/24");
        assert!(matches!(
            Ipam::new(subnet, ip("10.11.0.1")),
            Err(IpamError::GatewayOutsideSubnet { .. })
        ));
        assert!(matches!(
            Ipam::new(subnet, ip("10.10.0.0")),
            Err(IpamError::GatewayReserved {
                what: ReservedKind::Network,
                ..
            })
        ));
        assert!(matches!(
            Ipam::new(subnet, ip("10.10.0.255")),
            Err(IpamError::GatewayReserved {
                what: ReservedKind::Broadcast,
                ..
            })
        ));
        assert_eq!(
            Ipam::new(subnet, ip("10.10.0.254")).unwrap().gateway(),
            ip("10.10.0.254")
        );
    }

    #[test]
    fn serde_round_trip() {
        let mut ipam = pool("10.10.0.0/24");
        ipam.allocate("a", None).unwrap();
        ipam.allocate("b", Some(ip("10.10.0.77"))).unwrap();
        let json = serde_json::to_string(&ipam).unwrap();
        assert_eq!(
            json,
            r#"{"subnet":"10.10.0.0/24","gateway":"10.10.0.1","allocations":{"10.10.0.2":"a","10.10.0.77":"b"}}"#
        );
        let mut back: Ipam = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ipam);
        // The caches are rebuilt too.
        assert_eq!(back.address_of("b"), Some(ip("10.10.0.77")));
        assert_eq!(back.allocate("c", None).unwrap(), ip("10.10.0.3"));
    }

    #[test]
    fn a_loaded_pool_hands_out_the_lowest_gap() {
        // A gateway that is not the first host, and gaps at the bottom, in the middle and none.
        for (allocations, gateway, expected) in [
            (
                r#""10.10.0.1":"a","10.10.0.2":"b","10.10.0.4":"c""#,
                "10.10.0.3",
                "10.10.0.5",
            ),
            (
                r#""10.10.0.2":"a","10.10.0.3":"b","10.10.0.5":"c""#,
                "10.10.0.1",
                "10.10.0.4",
            ),
            (r#""10.10.0.5":"a""#, "10.10.0.1", "10.10.0.2"),
            (
                r#""10.10.0.1":"a","10.10.0.2":"b","10.10.0.3":"c""#,
                "10.10.0.4",
                "10.10.0.5",
            ),
            (
                r#""10.10.0.2":"a","10.10.0.3":"b""#,
                "10.10.0.4",
                "10.10.0.1",
            ),
        ] {
            let json = format!(
                r#"{{"subnet":"10.10.0.0/24","gateway":"{gateway}","allocations":{{{allocations}}}}}"#
            );
            let mut ipam: Ipam = serde_json::from_str(&json).unwrap();
            assert_eq!(ipam.allocate("new", None).unwrap(), ip(expected), "{json}");
        }
    }

    #[test]
    fn corrupted_json_refused() {
        let cases = [
            // Allocation outside the subnet.
            (
                r#"{"subnet":"10.10.0.0/24","gateway":"10.10.0.1","allocations":{"10.20.0.2":"a"}}"#,
                "outside subnet",
            ),
            // The gateway handed out.
            (
                r#"{"subnet":"10.10.0.0/24","gateway":"10.10.0.1","allocations":{"10.10.0.1":"a"}}"#,
                "gateway",
            ),
            // One owner, two addresses.
            (
                r#"{"subnet":"10.10.0.0/24","gateway":"10.10.0.1","allocations":{"10.10.0.2":"a","10.10.0.3":"a"}}"#,
                "already holds",
            ),
            (
                r#"{"subnet":"10.10.0.0/24","gateway":"10.10.0.1","allocations":{"10.10.0.2":""}}"#,
                "must not be empty",
            ),
            (
                r#"{"subnet":"10.10.0.0/33","gateway":"10.10.0.1","allocations":{}}"#,
                "invalid subnet",
            ),
            (
                r#"{"subnet":"10.10.0.0/31","gateway":"10.10.0.1","allocations":{}}"#,
                "too small",
            ),
            (
                r#"{"subnet":"10.10.0.9/24","gateway":"10.10.0.1","allocations":{}}"#,
                "did you mean",
            ),
            (
                r#"{"subnet":"10.10.0.0/24","gateway":"10.9.0.1","allocations":{}}"#,
                "outside subnet",
            ),
            (
                r#"{"subnet":"10.10.0.0/24","gateway":"10.10.0.1","allocations":{"banana":"a"}}"#,
                "",
            ),
            (r#"{"subnet":"10.10.0.0/24"}"#, "gateway"),
        ];
        for (json, needle) in cases {
            let err = serde_json::from_str::<Ipam>(json).unwrap_err();
            assert!(err.to_string().contains(needle), "{json}: {err}");
        }
    }
}
