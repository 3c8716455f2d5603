//! VMM drivers: how to start, configure and stop one MicroVM with a given VMM.
//!
//! The VM lifecycle (`crate::vm`) attaches the TAP endpoint, builds a [`VmSpec`] and runs the
//! VMM process under a supervisor; a driver only knows its VMM's command line and API.
//! - [`qemu`]: QEMU's `microvm` machine, KVM when usable, else TCG; QMP for stop.
//! - [`firecracker`]: Firecracker, configured over its API socket.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::net::Mac;

pub mod firecracker;
pub mod qemu;

/// The longest path a unix socket can have: `sun_path` holds 108 bytes, the terminating NUL
/// included.
pub const SUN_PATH_MAX: usize = 107;

/// Which VMM runs a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum VmmKind {
    Qemu,
    Firecracker,
}

/// How the guest gets its root file system.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Boot {
    /// An initramfs; the guest runs from it.
    Initrd(PathBuf),
    /// A raw ext4 (or other) disk image, attached read-write as the root device.
    Rootfs(PathBuf),
}

/// Everything a driver needs to start one VM. Paths are absolute.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub kernel: PathBuf,
    pub boot: Boot,
    pub cpus: u8,
    pub memory_mib: u32,
    /// The whole guest kernel command line, `ip=` argument included.
    pub cmdline: String,
    /// The TAP the VM's virtio-net device uses (already a bridge port, up).
    pub tap: String,
    /// The guest's MAC: the endpoint's MAC, which anti-spoofing enforces.
    pub mac: Mac,
    pub ip: Ipv4Addr,
    /// A directory of this VM's own: sockets (QMP, Firecracker API) live here.
    pub run_dir: PathBuf,
    /// Where the serial console goes.
    pub console_log: PathBuf,
}

/// What a driver can fail at. Each variant says which step and what to do.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("the {vmm} binary `{binary}` is not installed or not on PATH; {install}")]
    NotInstalled {
        vmm: &'static str,
        binary: String,
        install: &'static str,
    },
    #[error("{vmm} did not open its control socket {} within {timeout:?}", socket.display())]
    SocketTimeout {
        vmm: &'static str,
        socket: PathBuf,
        timeout: Duration,
    },
    #[error("talking to {vmm} over {}", socket.display())]
    Io {
        vmm: &'static str,
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{vmm} refused `{request}`: {status} {fault}")]
    Api {
        vmm: &'static str,
        request: String,
        status: u16,
        fault: String,
    },
    #[error("{vmm} sent a reply micropod cannot read for `{request}`: {detail}")]
    Protocol {
        vmm: &'static str,
        request: String,
        detail: String,
    },
    #[error("{vmm} does not support {what}")]
    Unsupported { vmm: &'static str, what: String },
    /// One API request could not be delivered or answered (connection refused, timeout).
    #[error("sending `{request}` to {vmm} over {}", socket.display())]
    Request {
        vmm: &'static str,
        request: String,
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One VMM. The supervisor spawns [`Vmm::command`], then calls [`Vmm::start`]; `stop` asks the
/// guest to power off (the lifecycle kills the process if that does not work in time).
pub trait Vmm {
    fn kind(&self) -> VmmKind;
    /// The VMM binary, or [`VmmError::NotInstalled`] saying how to install it.
    fn binary(&self) -> Result<PathBuf, VmmError>;
    /// The file name of the VMM's control socket (QMP, API) in the VM's run dir.
    fn control_socket_name(&self) -> &'static str;
    /// Arguments this VMM needs on the guest kernel's command line, appended to the VM's
    /// (recorded in the spec, so `inspect` shows the command line the guest really got).
    fn kernel_args(&self) -> Result<Vec<String>, VmmError> {
        Ok(Vec::new())
    }
    /// The VMM process to spawn, in the foreground. Its stdout/stderr are the caller's to
    /// redirect (stdout to the console log, stderr to the VMM's own log).
    fn command(&self, binary: &Path, spec: &VmSpec) -> Result<Command, VmmError>;
    /// After the spawn: configures the VM if the VMM needs it and returns once the guest runs.
    fn start(&self, spec: &VmSpec, timeout: Duration) -> Result<(), VmmError>;
    /// Asks the guest to shut down gracefully. Returns when the request was delivered.
    fn request_stop(&self, spec: &VmSpec, timeout: Duration) -> Result<(), VmmError>;
}

/// The driver for `kind`.
#[must_use]
pub fn driver(kind: VmmKind) -> Box<dyn Vmm> {
    match kind {
        VmmKind::Qemu => Box::new(qemu::Qemu),
        VmmKind::Firecracker => Box::new(firecracker::Firecracker),
    }
}
