//! veth pairs, optionally with the peer created directly in another namespace.

use std::os::fd::{AsRawFd as _, BorrowedFd};

use rtnetlink::{
    LinkMessageBuilder, LinkUnspec, LinkVeth,
    packet_route::link::{InfoData, InfoKind, InfoVeth},
};

use super::{Netlink, link};

#[derive(Debug, thiserror::Error)]
pub enum VethError {
    #[error(transparent)]
    Name(#[from] link::LinkError),
    #[error("cannot create veth pair {name} <-> {peer}")]
    Create {
        name: String,
        peer: String,
        #[source]
        source: rtnetlink::Error,
    },
}

impl VethError {
    /// Whether the kernel refused because one of the two names is taken.
    pub fn is_exists(&self) -> bool {
        matches!(self, Self::Create { source: rtnetlink::Error::NetlinkError(e), .. }
            if e.raw_code() == -libc::EEXIST)
    }

    /// Whether the bridge refused the host end because all its port numbers are in use.
    pub fn is_bridge_full(&self) -> bool {
        matches!(self, Self::Create { source: rtnetlink::Error::NetlinkError(e), .. }
            if e.raw_code() == -libc::EXFULL)
    }
}

/// Creates the veth pair `name` <-> `peer` in `nl`'s namespace; `peer_ns` moves the peer into
/// another namespace as part of the same request, so no half-made pair is ever visible.
pub async fn create(
    nl: &Netlink,
    name: &str,
    peer: &str,
    peer_ns: Option<BorrowedFd<'_>>,
) -> Result<(), VethError> {
    let spec = PairSpec {
        peer_ns,
        ..PairSpec::default()
    };
    create_pair(nl, name, peer, &spec).await
}

/// Everything about a new veth pair that one RTM_NEWLINK request can carry.
#[derive(Clone, Copy, Debug, Default)]
pub struct PairSpec<'a> {
    /// Create the peer directly in this namespace.
    pub peer_ns: Option<BorrowedFd<'a>>,
    pub peer_mac: Option<[u8; 6]>,
    /// Make `name` a port of this bridge.
    pub controller: Option<u32>,
    /// Bring the main end up. (Not the peer: the kernel opens it before the pair is linked and
    /// answers ENOTCONN; bring it up afterwards in its own namespace.)
    pub up: bool,
    /// The MTU of both ends; `None`: the kernel's default.
    pub mtu: Option<u32>,
}

/// Creates `name` <-> `peer` as `spec` says, in a single request: the kernel applies the
/// peer's namespace and MAC, and the main end's controller and flags, while creating.
pub async fn create_pair(
    nl: &Netlink,
    name: &str,
    peer: &str,
    spec: &PairSpec<'_>,
) -> Result<(), VethError> {
    link::validate_name(name)?;
    link::validate_name(peer)?;
    let mut peer_msg = LinkMessageBuilder::<LinkUnspec>::new().name(peer.to_owned());
    if let Some(fd) = spec.peer_ns {
        peer_msg = peer_msg.setns_by_fd(fd.as_raw_fd());
    }
    if let Some(mac) = spec.peer_mac {
        peer_msg = peer_msg.address(mac.to_vec());
    }
    if let Some(mtu) = spec.mtu {
        peer_msg = peer_msg.mtu(mtu);
    }
    let mut main = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(name.to_owned())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())));
    if let Some(controller) = spec.controller {
        main = main.controller(controller);
    }
    if spec.up {
        main = main.up();
    }
    if let Some(mtu) = spec.mtu {
        main = main.mtu(mtu);
    }
    let message = main.build();
    nl.handle()
        .link()
        .add(message)
        .execute()
        .await
        .map_err(|source| VethError::Create {
            name: name.into(),
            peer: peer.into(),
            source,
        })
}
