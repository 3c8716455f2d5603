//! Ctrl-C for the benchmarks: the handler only raises a flag; a benchmark checks it between
//! steps and unwinds, so its guards remove what it made. Children run in a process group of
//! their own, so a Ctrl-C in the terminal does not kill one half-way: the step in flight
//! finishes, then the benchmark stops.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: std::ffi::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the SIGINT, SIGTERM and SIGHUP handlers; call once, from the binary's `main`.
pub fn catch() -> anyhow::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe, and it
        // replaces no handler anyone else relies on (benchmark binaries call this from main).
        unsafe { sigaction(signal, &action) }
            .with_context(|| format!("installing a {signal} handler"))?;
    }
    Ok(())
}

/// An error once a signal has arrived.
pub fn check() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; removing everything the benchmark made");
    }
    Ok(())
}
