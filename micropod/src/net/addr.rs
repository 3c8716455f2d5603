//! Interface addresses.

use std::net::IpAddr;

use futures::TryStreamExt as _;
use ipnetwork::{IpNetwork, Ipv4Network};
use rtnetlink::packet_route::{AddressFamily, address::AddressAttribute};

use super::{Netlink, link};

#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    #[error(transparent)]
    Link(#[from] link::LinkError),
    #[error("cannot add {addr} to {name}")]
    Add {
        name: String,
        addr: IpNetwork,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot add {addr} to interface index {index}")]
    AddIndex {
        index: u32,
        addr: IpNetwork,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot list addresses")]
    List {
        #[source]
        source: rtnetlink::Error,
    },
}

/// An IPv4 address on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V4Address {
    pub index: u32,
    pub addr: Ipv4Network,
}

/// Every IPv4 address in the namespace, from one dump.
pub async fn list_v4(nl: &Netlink) -> Result<Vec<V4Address>, AddrError> {
    let messages: Vec<_> = nl
        .handle()
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|source| AddrError::List { source })?;
    Ok(messages
        .iter()
        .filter(|m| m.header.family == AddressFamily::Inet)
        .filter_map(|m| {
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on p2p links).
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })
            })?;
            Some(V4Address {
                index: m.header.index,
                addr: Ipv4Network::new(addr, m.header.prefix_len).ok()?,
            })
        })
        .collect())
}

/// Adds `addr` to link `index`; an address that is already there counts as added.
pub async fn ensure(nl: &Netlink, index: u32, addr: IpNetwork) -> Result<(), AddrError> {
    match nl
        .handle()
        .address()
        .add(index, addr.ip(), addr.prefix())
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        Err(source) => Err(AddrError::AddIndex {
            index,
            addr,
            source,
        }),
    }
}

/// Adds `addr` (address and prefix length) to the link called `name`.
pub async fn add(nl: &Netlink, name: &str, addr: IpNetwork) -> Result<(), AddrError> {
    let index = link::index(nl, name).await?;
    nl.handle()
        .address()
        .add(index, addr.ip(), addr.prefix())
        .execute()
        .await
        .map_err(|source| AddrError::Add {
            name: name.into(),
            addr,
            source,
        })
}
