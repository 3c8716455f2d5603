//! The sysctls micropod needs: IPv4 forwarding (written), the host's ephemeral ports (read)
//! and IPv6 off on the bridge ports micropod makes (written).
//!
//! `/proc/sys/net` shows the network namespace of the thread that opens it, so these act on the
//! caller's namespace.

use std::{io, path::PathBuf};

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const IP_LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot understand {path}: {value:?}")]
    Parse { path: PathBuf, value: String },
    #[error("cannot write {path} (needs root in this network namespace)")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Whether `net.ipv4.ip_forward` is on.
pub fn ip_forward() -> Result<bool, SysctlError> {
    std::fs::read_to_string(IP_FORWARD)
        .map(|v| v.trim() != "0")
        .map_err(|source| SysctlError::Read {
            path: IP_FORWARD.into(),
            source,
        })
}

/// Sets `net.ipv4.ip_forward`.
pub fn set_ip_forward(on: bool) -> Result<(), SysctlError> {
    std::fs::write(IP_FORWARD, if on { "1\n" } else { "0\n" }).map_err(|source| {
        SysctlError::Write {
            path: IP_FORWARD.into(),
            source,
        }
    })
}

/// Turns IPv6 off on `ifname` (`net.ipv6.conf.<ifname>.disable_ipv6`), before it comes up: a
/// bridge port is only a port, the host's addresses live on the bridge. Otherwise the host
/// gives every TAP and veth host end a link-local address, routes, multicast memberships and
/// timers, and sends router solicitations, MLD reports and DAD probes into each VM and
/// container. Frames of the endpoints' own IPv6 are bridged as before. A kernel without IPv6
/// has nothing to turn off.
pub fn disable_ipv6(ifname: &str) -> Result<(), SysctlError> {
    let path = PathBuf::from(format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"));
    match std::fs::write(&path, "1\n") {
        Ok(()) => Ok(()),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound && !std::path::Path::new(IPV6_CONF).exists() =>
        {
            Ok(())
        }
        Err(source) => Err(SysctlError::Write { path, source }),
    }
}

const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";

/// `net.ipv4.ip_local_port_range`: the ports the host's own sockets are given when they do
/// not bind one.
pub fn ip_local_port_range() -> Result<super::ports::PortRange, SysctlError> {
    let value =
        std::fs::read_to_string(IP_LOCAL_PORT_RANGE).map_err(|source| SysctlError::Read {
            path: IP_LOCAL_PORT_RANGE.into(),
            source,
        })?;
    value.parse().map_err(|_| SysctlError::Parse {
        path: IP_LOCAL_PORT_RANGE.into(),
        value,
    })
}
