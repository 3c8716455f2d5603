//! Linux bridges.

use rtnetlink::LinkBridge;

use super::{Netlink, link};

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Link(#[from] link::LinkError),
    #[error("cannot create bridge {name}")]
    Create {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot find bridge {name} right after creating it")]
    Vanished { name: String },
}

/// Creates bridge `name` with a fixed MAC, up, and returns its index.
///
/// A bridge without an explicit MAC takes the lowest MAC of its ports, so it would change as
/// VMs come and go and break every neighbour cache that knows the gateway.
pub async fn create(nl: &Netlink, name: &str, mac: [u8; 6]) -> Result<u32, BridgeError> {
    link::validate_name(name)?;
    let message = LinkBridge::new(name).address(mac.to_vec()).up().build();
    nl.handle()
        .link()
        .add(message)
        .execute()
        .await
        .map_err(|source| BridgeError::Create {
            name: name.into(),
            source,
        })?;
    let made = link::find(nl, name).await?;
    made.map(|l| l.header.index)
        .ok_or_else(|| BridgeError::Vanished { name: name.into() })
}
