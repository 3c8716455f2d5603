//! Generic link operations: look up, bring up, delete.

use futures::TryStreamExt as _;
use rtnetlink::{LinkUnspec, packet_route::link::LinkMessage};

use super::Netlink;

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(
        "invalid interface name {name:?}: 1-{IFNAME_MAX} bytes, no '/', ':', NUL or whitespace"
    )]
    InvalidName { name: String },
    #[error("no interface named {name}")]
    NotFound { name: String },
    #[error("cannot look up interface {name}")]
    Lookup {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot bring interface {name} up")]
    SetUp {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot delete interface {name}")]
    Delete {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
}

/// Checks an interface name the way the kernel's `dev_valid_name` does.
pub fn validate_name(name: &str) -> Result<(), LinkError> {
    let ok = !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(LinkError::InvalidName { name: name.into() })
    }
}

/// The link called `name`, or `None` if there is none.
pub async fn find(nl: &Netlink, name: &str) -> Result<Option<LinkMessage>, LinkError> {
    validate_name(name)?;
    let mut links = nl
        .handle()
        .link()
        .get()
        .match_name(name.to_owned())
        .execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(source) => Err(LinkError::Lookup {
            name: name.into(),
            source,
        }),
    }
}

/// The index of the link called `name`.
pub async fn index(nl: &Netlink, name: &str) -> Result<u32, LinkError> {
    find(nl, name)
        .await?
        .map(|link| link.header.index)
        .ok_or_else(|| LinkError::NotFound { name: name.into() })
}

/// Brings the link called `name` up.
pub async fn set_up(nl: &Netlink, name: &str) -> Result<(), LinkError> {
    let index = index(nl, name).await?;
    nl.handle()
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|source| LinkError::SetUp {
            name: name.into(),
            source,
        })
}

/// Deletes the link called `name` (for a veth, its peer goes too).
pub async fn delete(nl: &Netlink, name: &str) -> Result<(), LinkError> {
    let index = index(nl, name).await?;
    nl.handle()
        .link()
        .del(index)
        .execute()
        .await
        .map_err(|source| LinkError::Delete {
            name: name.into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "sixteen-chars-xx"] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["micropod0", "mp-0a0a0002", "fifteen-chars-x"] {
            assert!(validate_name(good).is_ok(), "{good:?} refused");
        }
    }
}
