//! micropod: MicroVMs with real networking.
//!
//! The library holds everything; the `micropod` binary is a thin CLI over it.
//! - [`net`]: kernel objects, one module each (network namespaces, links, veth pairs, addresses),
//!   all configured over netlink.
//! - [`datapath`]: the eBPF programs from `micropod-ebpf`, loaded and attached with aya.
//! - `sys`: the raw system calls (ioctls, pidfds, `bpf()`, `pre_exec` hooks) behind safe
//!   functions; the crate's `unsafe` lives there.

pub mod datapath;
pub mod failpoint;
pub mod ipam;
pub mod metrics;
pub mod net;
pub mod network;
pub mod runtime;
pub mod state;
pub(crate) mod sys;
pub mod vm;
pub mod vmm;
pub mod watch;

/// An error and its causes on one line (`what: because: because`), for logs and reports that
/// collect several failures.
#[must_use]
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}
