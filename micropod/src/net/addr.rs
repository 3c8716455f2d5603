//! Interface addresses.

use ipnetwork::IpNetwork;

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
