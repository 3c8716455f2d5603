//! Port ranges: the host's ephemeral ports (`net.ipv4.ip_local_port_range`) and the ports a
//! network's NAT translates flows to, which must stay apart (a translated flow on a port the
//! host also picks for its own connections can take a host connection's 5-tuple).

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Ports `min..=max`, host order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

/// The alias micropod gives a network's bridge, naming its NAT ports, so that another
/// network's `up` in the same namespace can choose ports apart from them.
pub const BRIDGE_ALIAS_PREFIX: &str = "micropod nat-ports ";

impl PortRange {
    /// `None` unless `1 <= min <= max`.
    #[must_use]
    pub const fn new(min: u16, max: u16) -> Option<Self> {
        if min == 0 || min > max {
            None
        } else {
            Some(Self { min, max })
        }
    }

    /// How many ports it holds.
    #[must_use]
    pub fn count(self) -> u32 {
        u32::from(self.max) - u32::from(self.min) + 1
    }

    #[must_use]
    pub const fn overlaps(self, other: Self) -> bool {
        self.min <= other.max && other.min <= self.max
    }

    /// The bridge alias that records it (see [`BRIDGE_ALIAS_PREFIX`]).
    #[must_use]
    pub fn bridge_alias(self) -> String {
        format!("{BRIDGE_ALIAS_PREFIX}{self}")
    }

    /// The range a bridge alias records, if it is one of micropod's.
    #[must_use]
    pub fn from_bridge_alias(alias: &str) -> Option<Self> {
        alias.strip_prefix(BRIDGE_ALIAS_PREFIX)?.parse().ok()
    }
}

/// The longest run of ports from `floor` to 65535 that none of `taken` touches (the lowest
/// such run on a tie), if there is any.
#[must_use]
pub fn largest_free(floor: u16, taken: &[PortRange]) -> Option<PortRange> {
    let mut taken: Vec<PortRange> = taken.to_vec();
    taken.sort_unstable();
    let mut best: Option<PortRange> = None;
    let mut start = u32::from(floor.max(1));
    let mut consider = |min: u32, max: u32| {
        if min <= max {
            // Both bounds are ≤ 65535 here.
            let run = PortRange {
                min: min as u16,
                max: max as u16,
            };
            if best.is_none_or(|b| run.count() > b.count()) {
                best = Some(run);
            }
        }
    };
    for t in &taken {
        if u32::from(t.min) > start {
            consider(start, u32::from(t.min) - 1);
        }
        start = start.max(u32::from(t.max) + 1);
    }
    consider(start, u32::from(u16::MAX));
    best
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid port range {0:?}: expected MIN-MAX with 1 <= MIN <= MAX <= 65535")]
pub struct InvalidPortRange(pub String);

impl FromStr for PortRange {
    type Err = InvalidPortRange;

    /// `MIN-MAX`, or the whitespace-separated pair `/proc/sys/net/ipv4/ip_local_port_range`
    /// holds.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidPortRange(s.to_owned());
        let t = s.trim();
        let (a, b) = t
            .split_once('-')
            .or_else(|| t.split_once(char::is_whitespace))
            .ok_or_else(bad)?;
        let min = a.trim().parse().map_err(|_| bad())?;
        let max = b.trim().parse().map_err(|_| bad())?;
        Self::new(min, max).ok_or_else(bad)
    }
}

/// A transport protocol a port can be published for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number.
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// A published port as a user writes it (`docker run -p`'s form):
/// `[HOST_IP:]HOST_PORT:PORT[/tcp|/udp]`, TCP unless said.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublishSpec {
    /// Only connections to this address of the host; `None`: any of its addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<std::net::Ipv4Addr>,
    pub host_port: u16,
    /// The endpoint's port.
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for PublishSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        write!(f, "{}:{}/{}", self.host_port, self.port, self.proto)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid published port {input:?}: {reason}; use [HOST_IP:]HOST_PORT:PORT[/tcp|/udp], e.g. 8080:80"
)]
pub struct InvalidPublish {
    pub input: String,
    pub reason: &'static str,
}

impl FromStr for PublishSpec {
    type Err = InvalidPublish;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| InvalidPublish {
            input: s.to_owned(),
            reason,
        };
        let (ports, proto) = match s.split_once('/') {
            None => (s, Proto::Tcp),
            Some((ports, "tcp")) => (ports, Proto::Tcp),
            Some((ports, "udp")) => (ports, Proto::Udp),
            Some(_) => return Err(bad("the protocol must be tcp or udp")),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (host_ip, host_port, port) = match parts[..] {
            [host_port, port] => (None, host_port, port),
            [ip, host_port, port] => (
                Some(
                    ip.parse()
                        .map_err(|_| bad("the host address must be an IPv4 address"))?,
                ),
                host_port,
                port,
            ),
            _ => return Err(bad("it needs a host port and a port")),
        };
        let port_of = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("a port must be a number from 1 to 65535"))
        };
        Ok(Self {
            host_ip,
            host_port: port_of(host_port)?,
            port: port_of(port)?,
            proto,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_ports_parse_as_docker_writes_them() {
        let p = |s: &str| s.parse::<PublishSpec>();
        assert_eq!(
            p("8080:80").unwrap(),
            PublishSpec {
                host_ip: None,
                host_port: 8080,
                port: 80,
                proto: Proto::Tcp
            }
        );
        let udp = p("203.0.113.1:5353:53/udp").unwrap();
        assert_eq!(udp.host_ip, Some(std::net::Ipv4Addr::new(203, 0, 113, 1)));
        assert_eq!((udp.host_port, udp.port, udp.proto), (5353, 53, Proto::Udp));
        assert_eq!(udp.to_string(), "203.0.113.1:5353:53/udp");
        assert_eq!(p(&udp.to_string()).unwrap(), udp);
        assert_eq!(p("80:80/tcp").unwrap().to_string(), "80:80/tcp");
        for (bad, why) in [
            ("8080", "a host port and a port"),
            ("0:80", "1 to 65535"),
            ("8080:65536", "1 to 65535"),
            ("8080:80/sctp", "tcp or udp"),
            ("::1:8080:80", "a host port and a port"),
            ("host:8080:80", "IPv4"),
            ("a:b", "1 to 65535"),
            ("1:2:3:4", "a host port and a port"),
        ] {
            let err = p(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
            assert!(err.contains("HOST_PORT:PORT"), "{bad}: {err}");
        }
    }

    fn r(min: u16, max: u16) -> PortRange {
        PortRange::new(min, max).unwrap()
    }

    #[test]
    fn parses_both_spellings_and_refuses_nonsense() {
        assert_eq!("1024-32767".parse(), Ok(r(1024, 32767)));
        assert_eq!("32768\t60999\n".parse(), Ok(r(32768, 60999)));
        for bad in ["", "5", "0-10", "10-5", "1-65536", "a-b", "-5"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad:?}");
        }
        assert_eq!(r(7, 7).count(), 1);
        assert_eq!(r(1, 65535).to_string(), "1-65535");
    }

    #[test]
    fn the_largest_free_run_avoids_every_taken_range() {
        let ephemeral = r(32768, 60999);
        assert_eq!(largest_free(1024, &[ephemeral]), Some(r(1024, 32767)));
        // A second network in the namespace gets what is left.
        assert_eq!(
            largest_free(1024, &[r(1024, 32767), ephemeral]),
            Some(r(61000, 65535))
        );
        assert_eq!(largest_free(1024, &[r(1024, 65535)]), None);
        assert_eq!(largest_free(1024, &[r(1, 65535)]), None);
        assert_eq!(largest_free(1024, &[]), Some(r(1024, 65535)));
        // Overlapping and unsorted ranges.
        assert_eq!(
            largest_free(1024, &[r(40000, 65535), r(2000, 30000), r(1024, 2500)]),
            Some(r(30001, 39999))
        );
    }

    #[test]
    fn the_bridge_alias_round_trips() {
        let p = r(61000, 65535);
        assert_eq!(PortRange::from_bridge_alias(&p.bridge_alias()), Some(p));
        assert_eq!(PortRange::from_bridge_alias("someone else's bridge"), None);
        assert!(r(1, 10).overlaps(r(10, 20)));
        assert!(!r(1, 10).overlaps(r(11, 20)));
    }
}
