//! The names and addresses micropod gives an endpoint's kernel objects: the host-side link
//! name, the guest's MAC, and which endpoint names are allowed. Pure functions, so every layer
//! (the data plane telling its port links apart, the VMM drivers, the network manager) derives
//! them the same way.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use serde::{Deserialize, Serialize};

/// Link name prefix of a [`EndpointKind::Tap`] endpoint (`mpt-<address in hex>`).
pub const TAP_LINK_PREFIX: &str = "mpt-";
/// Link name prefix of a [`EndpointKind::Netns`] endpoint (`mpv-<address in hex>`).
pub const NETNS_LINK_PREFIX: &str = "mpv-";
/// Link name prefix of a retired endpoint link: detached, down, off the bridge and waiting for
/// the kernel to delete it (`mpr<address in hex><generation in hex>`).
pub const RETIRED_LINK_PREFIX: &str = "mpr";
/// The device group retired links join (`ip link show group 1836085760`), so that the reaper
/// deletes them all in one request, which the kernel unregisters as one batch (those of every
/// micropod network in the namespace: all are waiting to be deleted). "mpr\0" in ASCII: far
/// from the small numbers of `/etc/iproute2/group`.
pub const RETIRED_LINK_GROUP: u32 = 0x6d70_7200;
/// Link name prefix of a pooled TAP, made ahead of need and waiting for an attach
/// (`mpp<subnet's network address in hex><serial in hex>`).
pub const POOL_LINK_PREFIX: &str = "mpp";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    /// A persistent TAP on the bridge, for a VMM.
    Tap,
    /// A veth pair whose far end lives in another network namespace.
    Netns,
}

impl EndpointKind {
    pub const ALL: [Self; 2] = [Self::Tap, Self::Netns];

    /// The prefix of this kind's host-side link names.
    #[must_use]
    pub const fn link_prefix(self) -> &'static str {
        match self {
            Self::Tap => TAP_LINK_PREFIX,
            Self::Netns => NETNS_LINK_PREFIX,
        }
    }
}

impl fmt::Display for EndpointKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tap => "tap",
            Self::Netns => "netns",
        })
    }
}

/// A MAC address, written `02:6d:0a:0a:00:02`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The locally administered, unicast MAC micropod gives `ip`: `02:6d` ("m") and the four
    /// address bytes, so a MAC seen in a capture names its endpoint.
    #[must_use]
    pub fn for_ip(ip: Ipv4Addr) -> Self {
        let [a, b, c, d] = ip.octets();
        Self([0x02, 0x6d, a, b, c, d])
    }
}

impl Mac {
    /// The text form in a buffer of its own: every attach writes the whole state document,
    /// one MAC per endpoint, and `format_args!` costs several times this.
    fn text(self) -> [u8; 17] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b':'; 17];
        for (i, byte) in self.0.into_iter().enumerate() {
            out[3 * i] = HEX[usize::from(byte >> 4)];
            out[3 * i + 1] = HEX[usize::from(byte & 0x0f)];
        }
        out
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.text()).expect("hex digits and colons are ASCII"))
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(|| format!("bad MAC {s:?}"))?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| format!("bad MAC {s:?}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("bad MAC {s:?}"));
        }
        Ok(Self(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(std::str::from_utf8(&self.text()).expect("hex digits and colons are ASCII"))
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Parses the text where the deserializer has it, without a `String` of its own.
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Mac;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a MAC address such as 02:6d:0a:0a:00:02")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Mac, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Text)
    }
}

/// Host-side link name for an endpoint: `mpt-`/`mpv-` and the address in hex, 12 bytes, so
/// names are unique per namespace (subnets of two networks never overlap) and fit IFNAMSIZ.
#[must_use]
pub fn link_name(kind: EndpointKind, ip: Ipv4Addr) -> String {
    format!("{}{:08x}", kind.link_prefix(), u32::from(ip))
}

/// The kind and address an endpoint link name was made for, if it is a name micropod gives
/// endpoints.
#[must_use]
pub fn endpoint_link(name: &str) -> Option<(EndpointKind, Ipv4Addr)> {
    let (kind, hex) = EndpointKind::ALL
        .into_iter()
        .find_map(|kind| Some((kind, name.strip_prefix(kind.link_prefix())?)))?;
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16)
        .ok()
        .map(|ip| (kind, Ipv4Addr::from(ip)))
}

/// The address an endpoint link name was made for, if it is a name micropod gives endpoints.
#[must_use]
pub fn endpoint_link_ip(name: &str) -> Option<Ipv4Addr> {
    endpoint_link(name).map(|(_, ip)| ip)
}

/// The name a detached endpoint's link takes while it waits to be deleted: `mpr`, the address
/// in 8 hex digits and a generation in 4 (15 bytes, IFNAMSIZ - 1). It never collides with an
/// endpoint's name, so the address can be attached again at once; the generation tells apart
/// links of one address retired one after the other.
#[must_use]
pub fn retired_link_name(ip: Ipv4Addr, generation: u16) -> String {
    format!("{RETIRED_LINK_PREFIX}{:08x}{generation:04x}", u32::from(ip))
}

/// The address and generation a retired link name was made for, if it is one.
#[must_use]
pub fn retired_link(name: &str) -> Option<(Ipv4Addr, u16)> {
    address_and_serial(name, RETIRED_LINK_PREFIX)
}

/// `<prefix><address in 8 hex digits><number in 4>`, the shape of retired and pooled names.
fn address_and_serial(name: &str, prefix: &str) -> Option<(Ipv4Addr, u16)> {
    let hex = name.strip_prefix(prefix)?;
    if hex.len() != 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let (ip, serial) = hex.split_at(8);
    Some((
        Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?),
        u16::from_str_radix(serial, 16).ok()?,
    ))
}

/// The name of a pooled TAP of the network whose subnet starts at `network`: `mpp`, the
/// network address in 8 hex digits and a serial in 4 (15 bytes). Two networks of one namespace
/// never share a subnet, so the name says whose pool it belongs to.
#[must_use]
pub fn pool_link_name(network: Ipv4Addr, serial: u16) -> String {
    format!("{POOL_LINK_PREFIX}{:08x}{serial:04x}", u32::from(network))
}

/// The device group of the pooled TAPs of the network whose subnet starts at `network`: the
/// address as a number, so that each network's pool is its own group (subnets of one namespace
/// never share a network address) and `down` deletes it in one request, one unregister batch.
#[must_use]
pub fn pool_group(network: Ipv4Addr) -> u32 {
    u32::from(network)
}

/// The network address and serial a pooled TAP's name was made for, if it is one.
#[must_use]
pub fn pool_link(name: &str) -> Option<(Ipv4Addr, u16)> {
    address_and_serial(name, POOL_LINK_PREFIX)
}

/// Endpoint names: what a user would call a VM or container.
#[must_use]
pub fn valid_endpoint_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A name that breaks [`valid_endpoint_name`]'s rule. A VM's endpoint takes the VM's name, so
/// the one rule (and its wording) serves both; `kind` says whose name it was.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {kind} name {name:?}: use 1-64 characters from [A-Za-z0-9_.-], starting with a letter or digit"
)]
pub struct InvalidName {
    /// "endpoint" or "VM".
    pub kind: &'static str,
    pub name: String,
}

/// [`valid_endpoint_name`] as a `Result`, for callers that refuse the name.
pub fn check_endpoint_name(kind: &'static str, name: &str) -> Result<(), InvalidName> {
    if valid_endpoint_name(name) {
        Ok(())
    } else {
        Err(InvalidName {
            kind,
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_from_ip_is_local_unicast_and_round_trips() {
        let mac = Mac::for_ip(Ipv4Addr::new(10, 10, 0, 2));
        assert_eq!(mac.to_string(), "02:6d:0a:0a:00:02");
        assert_eq!(mac.0[0] & 0x01, 0, "unicast");
        assert_eq!(mac.0[0] & 0x02, 0x02, "locally administered");
        assert_eq!(mac.to_string().parse::<Mac>().unwrap(), mac);
        assert_eq!(
            serde_json::to_string(&mac).unwrap(),
            "\"02:6d:0a:0a:00:02\""
        );
        for bad in ["", "02:6d", "02:6d:0a:0a:00:02:03", "zz:6d:0a:0a:00:02"] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn link_names_fit_ifnamsiz_and_are_recognised() {
        let ip = Ipv4Addr::new(10, 10, 255, 254);
        for kind in EndpointKind::ALL {
            let name = link_name(kind, ip);
            assert!(name.len() <= crate::net::link::IFNAME_MAX, "{name}");
            assert_eq!(endpoint_link_ip(&name), Some(ip));
            // The prefix names the kind: a TAP's name never reads as a veth's.
            assert_eq!(endpoint_link(&name), Some((kind, ip)), "{name}");
        }
        assert_eq!(link_name(EndpointKind::Tap, ip), "mpt-0a0afffe");
        assert_eq!(link_name(EndpointKind::Netns, ip), "mpv-0a0afffe");
        for other in ["micropod0", "mpv-", "mpv-0a0a00zz", "eth0", "mpx-0a0a0002"] {
            assert_eq!(endpoint_link_ip(other), None, "{other}");
        }
    }

    #[test]
    fn pool_names_fit_ifnamsiz_round_trip_and_are_no_other_kind() {
        let network = Ipv4Addr::new(10, 10, 0, 0);
        for serial in [0, 1, 0xabcd, u16::MAX] {
            let name = pool_link_name(network, serial);
            assert_eq!(name.len(), crate::net::link::IFNAME_MAX, "{name}");
            assert_eq!(pool_link(&name), Some((network, serial)), "{name}");
            assert_eq!((endpoint_link_ip(&name), retired_link(&name)), (None, None));
        }
        assert_eq!(pool_link_name(network, 0x12), "mpp0a0a00000012");
        for other in [
            "mpp",
            "mpp0a0a0000001",
            "mpr0a0a00000012",
            "mpp0a0a000000zz",
        ] {
            assert_eq!(pool_link(other), None, "{other}");
        }
    }

    #[test]
    fn retired_names_fit_ifnamsiz_round_trip_and_are_not_endpoint_names() {
        let ip = Ipv4Addr::new(10, 10, 255, 254);
        for generation in [0, 1, 0xabcd, u16::MAX] {
            let name = retired_link_name(ip, generation);
            assert_eq!(name.len(), crate::net::link::IFNAME_MAX, "{name}");
            assert!(crate::net::link::validate_name(&name).is_ok(), "{name}");
            assert_eq!(retired_link(&name), Some((ip, generation)), "{name}");
            assert_eq!(endpoint_link_ip(&name), None, "{name}");
        }
        assert_eq!(retired_link_name(ip, 0x12), "mpr0a0afffe0012");
        for kind in EndpointKind::ALL {
            assert_eq!(retired_link(&link_name(kind, ip)), None);
        }
        for other in [
            "mpr",
            "mpr0a0afffe",
            "mpr0a0afffe001",
            "mpr0a0afffe00123",
            "mpr0a0afffe00zz",
            "mpq0a0afffe0012",
            "micropod0",
        ] {
            assert_eq!(retired_link(other), None, "{other}");
        }
    }

    #[test]
    fn endpoint_names() {
        for good in ["vm1", "web-1", "a.b_c", &"x".repeat(64)] {
            assert!(valid_endpoint_name(good), "{good:?}");
        }
        for bad in ["", "-x", "a/b", "a b", &"x".repeat(65), "é"] {
            assert!(!valid_endpoint_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn one_rule_names_whose_name_it_was() {
        assert_eq!(check_endpoint_name("VM", "web-1"), Ok(()));
        let err = check_endpoint_name("VM", "bad/name").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid VM name \"bad/name\": use 1-64 characters from [A-Za-z0-9_.-], starting with a letter or digit"
        );
        assert!(
            check_endpoint_name("endpoint", "")
                .unwrap_err()
                .to_string()
                .starts_with("invalid endpoint name \"\"")
        );
    }
}
