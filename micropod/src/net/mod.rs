//! Kernel network objects, one module each, configured over netlink (never by running `ip`),
//! and [`naming`]: the names and MACs micropod gives an endpoint's objects.

pub mod addr;
pub mod bridge;
pub mod link;
pub mod naming;
pub mod netlink;
pub mod netns;
pub mod nftables;
pub mod ports;
pub mod route;
pub mod sysctl;
pub mod tap;
pub mod tc;
pub mod veth;

pub use naming::Mac;
pub use netlink::{Netlink, NetlinkError};
pub use netns::{NetNs, NetnsError, NetnsId};
