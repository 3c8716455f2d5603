//! The one sysctl micropod needs: IPv4 forwarding.
//!
//! `/proc/sys/net` shows the network namespace of the thread that opens it, so these act on the
//! caller's namespace.

use std::{io, path::PathBuf};

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
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
