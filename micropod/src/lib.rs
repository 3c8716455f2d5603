//! micropod: MicroVMs with real networking.
//!
//! The library holds everything; the `micropod` binary is a thin CLI over it.
//! - [`net`]: kernel objects, one module each (network namespaces, links, veth pairs, addresses),
//!   all configured over netlink.
//! - [`datapath`]: the eBPF programs from `micropod-ebpf`, loaded and attached with aya.

pub mod datapath;
pub mod failpoint;
pub mod ipam;
pub mod net;
pub mod network;
pub mod state;
pub mod vm;
pub mod vmm;
