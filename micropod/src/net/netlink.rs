//! A route-netlink connection bound to one network namespace.
//!
//! A netlink socket talks to the namespace it was created in, so [`Netlink::connect_in`]
//! creates it on a thread inside the target namespace; the socket then serves from anywhere.

use std::{io, path::PathBuf};

use rtnetlink::Handle;

use super::netns::{NetNs, NetnsError};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a route-netlink socket")]
    Connect {
        #[source]
        source: io::Error,
    },
    #[error("cannot open a route-netlink socket in {path}")]
    ConnectIn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// An rtnetlink handle whose connection task runs on the current tokio runtime.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Connects to the calling thread's namespace. Must run inside a tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetlinkError::Connect { source })?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// Connects to `ns`. Must run inside a tokio runtime.
    pub fn connect_in(ns: &NetNs) -> Result<Self, NetlinkError> {
        // The socket is made in `ns` and keeps it; the thread is back in its own at once
        // (making it on a thread of its own cost a third of a millisecond per attach).
        let made = ns.run_here(rtnetlink::new_connection)?;
        let (connection, handle, _) = made.map_err(|source| NetlinkError::ConnectIn {
            path: ns.path().to_path_buf(),
            source,
        })?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}
