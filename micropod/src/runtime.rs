//! The tokio runtime micropod's synchronous callers run their futures on (netlink requests, the
//! metrics server): one thread, the caller's, with the I/O and time drivers.

use std::io;

use tokio::runtime::{Builder, Runtime};

/// A current-thread runtime with every driver enabled (I/O, which signals need, and time).
pub fn current_thread() -> io::Result<Runtime> {
    Builder::new_current_thread().enable_all().build()
}
