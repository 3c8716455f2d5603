//! What the VM lifecycle can fail at.

use std::{io, path::PathBuf, process::ExitStatus, time::Duration};

use super::{MAX_CMDLINE, MAX_CPUS, MIN_MEMORY_MIB, VmState, supervisor::describe};
use crate::{
    net::naming::InvalidName,
    network::NetworkError,
    state::StateError,
    vmm::{SUN_PATH_MAX, VmmError},
};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    #[error(
        "a VM named {name:?} already exists ({state}); remove it with `micropod rm {name}` or pick another --name"
    )]
    NameTaken { name: String, state: VmState },
    #[error("no VM named {name:?}; `micropod ps --all` lists them")]
    UnknownVm { name: String },
    #[error("cannot use {path} as the {what}{}", file_hint(source))]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a regular file; --{what} needs one")]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("--cpus {cpus} is out of range: use 1 to {MAX_CPUS}")]
    Cpus { cpus: u8 },
    #[error(
        "--memory {mib} MiB is out of range: use {MIN_MEMORY_MIB} to {max} MiB (the host's memory)"
    )]
    Memory { mib: u32, max: u32 },
    #[error(
        "the kernel command line would be {len} bytes, more than the kernel's {MAX_CMDLINE}; shorten --cmdline"
    )]
    CmdlineTooLong { len: usize },
    #[error("--cmdline must not contain control characters (newlines, NUL)")]
    CmdlineChars,
    #[error(
        "the VM's control socket path {path} is longer than a unix socket allows ({SUN_PATH_MAX} bytes); use a shorter --state-dir"
    )]
    SocketPath { path: PathBuf },
    #[error("cannot use the {vmm} VMM")]
    Vmm {
        vmm: &'static str,
        #[source]
        source: VmmError,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot create the VM directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the network is not up and bringing it up failed; fix what follows, or run `micropod network up` with settings that work here"
    )]
    NetworkUp {
        #[source]
        source: NetworkError,
    },
    #[error("cannot attach the network endpoint of VM {name}")]
    Attach {
        name: String,
        #[source]
        source: NetworkError,
    },
    #[error("cannot release the network endpoint of VM {name}; `micropod gc` retries")]
    Release {
        name: String,
        #[source]
        source: NetworkError,
    },
    #[error(transparent)]
    Privileges(NetworkError),
    #[error("cannot create an async runtime for netlink")]
    Runtime(#[source] io::Error),
    #[error("cannot start the supervisor {exe}")]
    SpawnSupervisor {
        exe: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("VM {name} did not start: {reason}{}", log_excerpt(log))]
    StartFailed {
        name: String,
        reason: String,
        /// The end of the VMM's (or the supervisor's) own log.
        log: String,
    },
    #[error(
        "VM {name} was not running after {timeout:?}; gave up and cleaned up{}",
        log_excerpt(log)
    )]
    StartTimeout {
        name: String,
        timeout: Duration,
        log: String,
    },
    #[error(
        "endpoint {endpoint} is the network of VM {vm} ({state}): `micropod stop {vm}` or `micropod rm --force {vm}` ends the VM and releases it; `network detach --force {endpoint}` takes it and leaves the VM running without a network"
    )]
    EndpointInUse {
        endpoint: String,
        vm: String,
        state: VmState,
    },
    /// `network detach` itself failed (or refused): the network's error as it is.
    #[error(transparent)]
    Detach(NetworkError),
    #[error("VM {name} is {state}; stop it first or use `rm --force`")]
    Running { name: String, state: VmState },
    #[error("VM {name} is not starting (it is {state}); a supervisor only starts a new VM")]
    NotStarting { name: String, state: VmState },
    #[error("cannot {what} process {pid}")]
    Process {
        what: &'static str,
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("the VMM of {name} (pid {pid}) is still alive after SIGKILL")]
    Unkillable { name: String, pid: u32 },
    #[error("VM {name}'s endpoint was not released within {timeout:?}; `micropod gc` retries")]
    NotReleased { name: String, timeout: Duration },
    #[error("cannot read or follow {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {path}")]
    RemoveDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn file_hint(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::NotFound => " (no such file)",
        io::ErrorKind::PermissionDenied => " (permission denied)",
        _ => "",
    }
}

fn log_excerpt(log: &str) -> String {
    if log.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- last lines of its log ---\n{}", log.trim_end())
    }
}

/// What the supervisor can fail at while it starts the VMM. Its chain (`error_chain`) is the
/// reason recorded in the VM's exit and shown by `run`.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The VMM binary is missing (the message says how to install it).
    #[error(transparent)]
    Binary(VmmError),
    /// The driver cannot build the VMM's command line.
    #[error(transparent)]
    Command(VmmError),
    #[error("cannot create {}", path.display())]
    CreateLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The driver's `start` failed (its message names the step).
    #[error(transparent)]
    Start(VmmError),
    #[error("the driver's start panicked")]
    StartPanicked,
    #[error("the VMM exited during start ({})", describe(*status))]
    ExitedDuringStart { status: ExitStatus },
    #[error("cannot watch the VMM")]
    Watch(#[source] io::Error),
}
