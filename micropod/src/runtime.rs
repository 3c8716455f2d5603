//! How micropod's processes run: the tokio runtime its synchronous callers run their futures on
//! (netlink requests, the metrics server: one thread, the caller's, with the I/O and time
//! drivers), and the `SIGPIPE` disposition of its command-line processes.

use std::io;

use tokio::runtime::{Builder, Runtime};

/// A current-thread runtime with every driver enabled (I/O, which signals need, and time).
pub fn current_thread() -> io::Result<Runtime> {
    Builder::new_current_thread().enable_all().build()
}

/// For a command-line process that prints and exits: a closed stdout (`| head`) ends it
/// quietly, as it would any Unix tool, instead of a panic in `println!`. Not for servers.
pub fn die_on_sigpipe() {
    crate::sys::die_on_sigpipe();
}
