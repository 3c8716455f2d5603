//! Generic link operations: look up, list, bring up, enslave, retire (down, off the bridge,
//! renamed), delete one or a whole group.

use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
};

use futures::TryStreamExt as _;
use rtnetlink::{
    LinkUnspec,
    packet_route::link::{
        AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
    },
};

use super::Netlink;
use crate::sys;

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
    #[error("cannot stop IPv6 address generation on interface {name}")]
    NoLinkLocal {
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
    #[error("cannot set the alias of interface index {index}")]
    SetAlias {
        index: u32,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot list interfaces")]
    List {
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot take interface {name} down and off its bridge")]
    SetDownNomaster {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot rename interface {name} to {to}")]
    Rename {
        name: String,
        to: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot delete the interfaces of group {group}")]
    DeleteGroup {
        group: u32,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot attach interface {name} to bridge index {controller} and bring it up")]
    SetController {
        name: String,
        controller: u32,
        #[source]
        source: rtnetlink::Error,
    },
}

impl LinkError {
    /// Whether the kernel refused because the name asked for is taken.
    pub fn is_exists(&self) -> bool {
        matches!(self, Self::Rename { source: rtnetlink::Error::NetlinkError(e), .. }
            if e.raw_code() == -libc::EEXIST)
    }

    /// Whether the bridge refused a port because all its port numbers are in use.
    pub fn is_bridge_full(&self) -> bool {
        matches!(self, Self::SetController { source: rtnetlink::Error::NetlinkError(e), .. }
            | Self::Rename { source: rtnetlink::Error::NetlinkError(e), .. }
            if e.raw_code() == -libc::EXFULL)
    }

    /// Whether the kernel refused because the link is gone.
    pub fn is_gone(&self) -> bool {
        matches!(self, Self::NotFound { .. })
            || matches!(self,
                Self::SetDownNomaster { source: rtnetlink::Error::NetlinkError(e), .. }
                | Self::Rename { source: rtnetlink::Error::NetlinkError(e), .. }
                | Self::Delete { source: rtnetlink::Error::NetlinkError(e), .. }
                if e.raw_code() == -libc::ENODEV)
    }
}

/// What micropod needs to know about a link from a dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkSummary {
    pub index: u32,
    pub name: String,
    /// Index of the bridge (or other controller) the link is a port of.
    pub controller: Option<u32>,
    /// `rtnl_link_ops` kind: "bridge", "veth", "tun", ...; `None` for physical devices and `lo`.
    pub kind: Option<String>,
    pub mac: Option<[u8; 6]>,
    pub up: bool,
    /// `IFLA_IFALIAS`, if set.
    pub alias: Option<String>,
}

impl LinkSummary {
    pub fn from_message(msg: &LinkMessage) -> Self {
        let mut summary = Self {
            index: msg.header.index,
            name: String::new(),
            controller: None,
            kind: None,
            mac: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            alias: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => summary.name.clone_from(name),
                LinkAttribute::Controller(index) => summary.controller = Some(*index),
                LinkAttribute::Address(mac) => summary.mac = <[u8; 6]>::try_from(&mac[..]).ok(),
                LinkAttribute::IfAlias(alias) => summary.alias = Some(alias.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    summary.kind = infos.iter().find_map(|info| match info {
                        LinkInfo::Kind(kind) => Some(kind.to_string()),
                        _ => None,
                    });
                }
                _ => {}
            }
        }
        summary
    }
}

/// Every link in the namespace, from one dump.
pub async fn list(nl: &Netlink) -> Result<Vec<LinkSummary>, LinkError> {
    nl.handle()
        .link()
        .get()
        .execute()
        .map_ok(|msg| LinkSummary::from_message(&msg))
        .try_collect()
        .await
        .map_err(|source| LinkError::List { source })
}

/// Sets the link's alias (`IFLA_IFALIAS`).
pub async fn set_alias(nl: &Netlink, index: u32, alias: &str) -> Result<(), LinkError> {
    nl.handle()
        .link()
        .set(LinkUnspec::new_with_index(index).alias(alias).build())
        .execute()
        .await
        .map_err(|source| LinkError::SetAlias { index, source })
}

/// Makes the link called `name` a port of `controller` and brings it up, in one request
/// (addressed by name, so no lookup first).
pub async fn set_controller_up(nl: &Netlink, name: &str, controller: u32) -> Result<(), LinkError> {
    validate_name(name)?;
    nl.handle()
        .link()
        .set(
            LinkUnspec::new_with_name(name)
                .controller(controller)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(|source| LinkError::SetController {
            name: name.into(),
            controller,
            source,
        })
}

/// Takes the link `name` (at `index`) out of service in one request: admin down (it stops
/// passing frames), no controller (it leaves its bridge) and into device group `group`.
/// Cheap, unlike a delete, whose unregister waits for RCU grace periods.
pub async fn set_down_nomaster(
    nl: &Netlink,
    name: &str,
    index: u32,
    group: u32,
) -> Result<(), LinkError> {
    nl.handle()
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .down()
                .nocontroller()
                .link_group(group)
                .build(),
        )
        .execute()
        .await
        .map_err(|source| LinkError::SetDownNomaster {
            name: name.into(),
            source,
        })
}

/// Renames the link `name` (at `index`) to `to`. The kernel renames only links that are down.
pub async fn rename(nl: &Netlink, name: &str, index: u32, to: &str) -> Result<(), LinkError> {
    validate_name(to)?;
    nl.handle()
        .link()
        .set(LinkUnspec::new_with_index(index).name(to).build())
        .execute()
        .await
        .map_err(|source| LinkError::Rename {
            name: name.into(),
            to: to.into(),
            source,
        })
}

/// Puts the link `name` on bridge `controller` and into device group `group`, leaving it down
/// (a pooled TAP: a port that passes no frame until an attach brings it up).
pub async fn set_controller(
    nl: &Netlink,
    name: &str,
    controller: u32,
    group: u32,
) -> Result<(), LinkError> {
    validate_name(name)?;
    nl.handle()
        .link()
        .set(
            LinkUnspec::new_with_name(name)
                .controller(controller)
                .link_group(group)
                .build(),
        )
        .execute()
        .await
        .map_err(|source| LinkError::SetController {
            name: name.into(),
            controller,
            source,
        })
}

/// Renames the (down) link at `index` to `to`, puts it on bridge `controller` (a no-op if it
/// is there already), back into the default device group, and brings it up, in one request:
/// the kernel renames before it changes the flags.
pub async fn adopt(
    nl: &Netlink,
    name: &str,
    index: u32,
    to: &str,
    controller: u32,
) -> Result<(), LinkError> {
    validate_name(to)?;
    nl.handle()
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .name(to)
                .controller(controller)
                .link_group(0)
                .up()
                .build(),
        )
        .execute()
        .await
        // Reported as the rename (one more variant would cost `LinkError` its niche); the
        // errno says which part the kernel refused.
        .map_err(|source| LinkError::Rename {
            name: name.into(),
            to: to.into(),
            source,
        })
}

/// Deletes every link of device group `group` in one request, which the kernel unregisters
/// as one batch (one set of RCU grace periods for all); `Ok(false)` when the group is empty.
pub async fn delete_group(nl: &Netlink, group: u32) -> Result<bool, LinkError> {
    let mut message = LinkMessage::default();
    message.attributes.push(LinkAttribute::Group(group));
    match nl.handle().link().del_with_message(message).execute().await {
        Ok(()) => Ok(true),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(false),
        Err(source) => Err(LinkError::DeleteGroup { group, source }),
    }
}

/// Deletes the link called `name` if it exists; `Ok(false)` when there was none.
pub async fn delete_if_exists(nl: &Netlink, name: &str) -> Result<bool, LinkError> {
    let Some(link) = find(nl, name).await? else {
        return Ok(false);
    };
    match nl.handle().link().del(link.header.index).execute().await {
        Ok(()) => Ok(true),
        // Gone between the lookup and the delete (a veth whose peer's namespace died).
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(false),
        Err(source) => Err(LinkError::Delete {
            name: name.into(),
            source,
        }),
    }
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
    validate_name(name)?;
    nl.handle()
        .link()
        .set(LinkUnspec::new_with_name(name).up().build())
        .execute()
        .await
        .map_err(|source| LinkError::SetUp {
            name: name.into(),
            source,
        })
}

/// Makes the kernel give the link called `name` no IPv6 address of its own when it comes up
/// (`addrgenmode none`): no link-local address, so none of the DAD probes, MLD reports and
/// router solicitations that follow one. Sent before the link comes up; once it is up, the
/// address is made already. Done over netlink rather than with `disable_ipv6` in
/// `/proc/sys`: every namespace whose `/proc/sys/net` was opened leaves dentries that each
/// later path walk there, in any namespace, compares (opening a file there took 4.5 µs, and
/// 68 µs once 500 namespaces had read one). A kernel without IPv6 has nothing to stop.
pub async fn no_link_local(nl: &Netlink, name: &str) -> Result<(), LinkError> {
    validate_name(name)?;
    let mode = AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)]);
    let result = nl
        .handle()
        .link()
        .set(
            LinkUnspec::new_with_name(name)
                .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![mode]))
                .build(),
        )
        .execute()
        .await;
    match result {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EAFNOSUPPORT => Ok(()),
        other => other.map_err(|source| LinkError::NoLinkLocal {
            name: name.into(),
            source,
        }),
    }
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

/// Looks interfaces up by name with `SIOCGIFINDEX` on one socket of the caller's namespace:
/// a syscall per name instead of a netlink round trip (and no dump of every link), for checks
/// that run over all of micropod's links before every command.
#[derive(Debug)]
pub struct IndexProbe {
    sock: OwnedFd,
}

impl IndexProbe {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            sock: sys::inet_dgram_socket()?,
        })
    }

    /// The index of the link called `name`, or `None` if there is none.
    pub fn index(&self, name: &str) -> io::Result<Option<u32>> {
        // validate_name guarantees at most IFNAMSIZ - 1 bytes, so the name stays NUL-terminated.
        let Some(mut req) = validate_name(name)
            .ok()
            .and_then(|()| sys::IfReq::new(name))
        else {
            return Ok(None);
        };
        match sys::if_index(self.sock.as_fd(), &mut req) {
            Ok(index) => Ok(u32::try_from(index).ok()),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_probe_finds_lo_and_not_a_missing_name() {
        let probe = IndexProbe::new().unwrap();
        assert_eq!(probe.index("lo").unwrap(), Some(1));
        assert_eq!(probe.index("mp-no-such-if").unwrap(), None);
        assert_eq!(probe.index("bad/name").unwrap(), None);
    }

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
