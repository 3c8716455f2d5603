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

/// A benchmark binary's `main`: parses its arguments with clap (which prints `--help` and
/// exits 2 on a malformed command line), `resolve`s them (an error exits 2 as a clap usage
/// error), installs the handlers, then runs `bench`. A panic unwinds through `bench`, so its
/// guards remove everything on that path too.
pub fn main<C: clap::Parser, A>(
    name: &str,
    resolve: fn(C) -> anyhow::Result<A>,
    bench: fn(&A) -> anyhow::Result<()>,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let args = match resolve(C::parse()) {
        Ok(args) => args,
        Err(e) => C::command()
            .error(clap::error::ErrorKind::ValueValidation, format!("{e:#}"))
            .exit(),
    };
    if let Err(e) = catch() {
        eprintln!("{name}: {e:#}");
        return ExitCode::FAILURE;
    }
    match bench(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name} failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
