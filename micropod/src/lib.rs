//! micropod: MicroVMs with real networking.
//!
//! The library holds everything; the `micropod` binary is a thin CLI over it. Layers, each
//! using only the ones before it:
//! - [`net`]: kernel objects, one module each (network namespaces, links, veth pairs, addresses,
//!   nf_tables), all configured over netlink, and [`net::naming`]: endpoint link names and MACs.
//! - [`datapath`]: the eBPF programs from `micropod-ebpf`, loaded, pinned and attached with aya;
//!   [`vmm`]: the QEMU and Firecracker drivers.
//! - [`network`]: the manager (up, down, attach, detach, gc, reconcile) over its state document.
//! - [`vm`]: the VM lifecycle; [`stats`]: counters and rates read from a network's maps.
//! - [`metrics`]: the Prometheus exporter; then the binary's CLI.
//!
//! Beside them, used from any layer: [`state`] (lock and atomic documents), [`ipam`] (addresses
//! of one subnet), [`failpoint`] (test hooks), [`runtime`] (the current-thread tokio runtime
//! that netlink calls run on), and `sys`: the raw system calls (ioctls, pidfds, `bpf()`,
//! `pre_exec` hooks) behind safe functions, where the crate's `unsafe` lives.

// The library reports through its return values and `log`; only the binary's CLI (and tests)
// print.
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod cni;
pub mod datapath;
pub mod failpoint;
pub mod ipam;
pub mod metrics;
pub mod net;
pub mod network;
pub mod runtime;
pub mod state;
pub mod stats;
pub(crate) mod sys;
pub mod vm;
pub mod vmm;

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
