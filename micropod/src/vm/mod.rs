//! The VM lifecycle: `run`, `ps`, `stop`, `rm`, `logs`, `inspect`, and the supervisor.
//!
//! Layout under `<state>/vms/` (a [`StateDir`] of its own, so its lock is separate from the
//! network's; the order is always VM lock, then network lock):
//! - `<name>.json`: the [`VmRecord`], replaced atomically under the VM lock;
//! - `<id>/`: the VM's directory: `console.log` (serial console), `vmm.log` (the VMM's own
//!   stderr), `supervisor.log`, and the VMM's control socket.
//!
//! `run` checks everything it can before it allocates anything, then attaches a TAP endpoint
//! named after the VM, records the VM as `starting` and spawns a detached supervisor
//! (`micropod vm-supervise NAME`, in a session of its own). The supervisor spawns the VMM as
//! its child, with `PR_SET_PDEATHSIG` so the VMM never outlives it, drives the driver's
//! `start` and records `running`, which is what `run` waits for. When the VMM exits for any
//! reason, the supervisor (its parent, so it knows at once) releases the endpoint and records
//! `exited`. If the supervisor itself dies, its VMM dies with it, and the next micropod command
//! that takes the VM lock finds a record whose supervisor and VMM are both gone ([`ProcessRef`]
//! compares start times, so a reused pid does not count) and does the release instead.

mod control;
mod detach;
mod error;
mod process;
mod reconcile;
mod record;
mod run;
mod supervisor;

use std::{fs, io, path::PathBuf, time::Duration};

pub use control::StopOutcome;
pub use detach::EndpointDetached;
pub use error::{SupervisorError, VmError};
pub use process::ProcessRef;
pub use reconcile::Reconciled;
pub use record::{RECORD_VERSION, VmExit, VmNetwork, VmRecord, VmState, now as unix_now};
pub use run::RunRequest;

use crate::{
    network::Network,
    state::{StateDir, StateError, StateLock},
    vmm::VmmKind,
};

/// The directory under the state dir that holds VM records and VM directories.
pub const VMS_DIR: &str = "vms";
/// The hidden CLI subcommand that runs a supervisor: `micropod vm-supervise NAME`.
pub const SUPERVISE_COMMAND: &str = "vm-supervise";
pub const CONSOLE_LOG: &str = "console.log";
pub const VMM_LOG: &str = "vmm.log";
pub const SUPERVISOR_LOG: &str = "supervisor.log";
/// In a VM's run dir until its record is written: the name its endpoint is attached under,
/// so that a reconcile can release the endpoint of a `run` that died before recording it.
pub const ATTACHING_FILE: &str = "attaching";
pub const DEFAULT_CPUS: u8 = 1;
pub const DEFAULT_MEMORY_MIB: u32 = 256;
pub const MAX_CPUS: u8 = 64;
pub const MIN_MEMORY_MIB: u32 = 32;
/// The x86 kernel's `COMMAND_LINE_SIZE`, including the terminating NUL.
pub const MAX_CMDLINE: usize = 2048;
/// How long the supervisor gives the driver's `start`.
const VMM_START_TIMEOUT: Duration = Duration::from_secs(45);
/// How often waits look again.
const POLL: Duration = Duration::from_millis(25);

/// The VMs of one micropod state dir.
#[derive(Clone, Debug)]
pub struct Vms {
    network: Network,
    state: StateDir,
    supervisor_exe: PathBuf,
}

impl Vms {
    /// The VMs next to `network`'s state. Supervisors are started from this executable.
    pub fn new(network: Network) -> Self {
        let state = StateDir::new(network.state_dir().join(VMS_DIR));
        let supervisor_exe = std::env::current_exe().unwrap_or_else(|_| "micropod".into());
        Self {
            network,
            state,
            supervisor_exe,
        }
    }

    pub fn network(&self) -> &Network {
        &self.network
    }

    fn doc(name: &str) -> String {
        format!("{name}.json")
    }

    fn read(&self, lock: &StateLock, name: &str) -> Result<Option<VmRecord>, VmError> {
        Ok(self.state.read_json(lock, &Self::doc(name))?)
    }

    fn write(&self, lock: &StateLock, rec: &VmRecord) -> Result<(), VmError> {
        Ok(self.state.write_json(lock, &Self::doc(&rec.name), rec)?)
    }

    /// Every record, by name.
    fn read_all(&self, lock: Option<&StateLock>) -> Result<Vec<VmRecord>, VmError> {
        let entries = match fs::read_dir(self.state.root()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.state.root().to_path_buf(),
                    source,
                }
                .into());
            }
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|f| !f.starts_with('.'))
            .filter_map(|f| f.strip_suffix(".json").map(str::to_owned))
            .collect();
        names.sort();
        let mut out = Vec::new();
        for name in names {
            let rec = match lock {
                Some(lock) => self.read(lock, &name)?,
                None => self.state.read_json_unlocked(&Self::doc(&name))?,
            };
            out.extend(rec);
        }
        Ok(out)
    }

    /// The record of `name`, without the lock (records are replaced atomically).
    pub fn get_unlocked(&self, name: &str) -> Result<VmRecord, VmError> {
        self.state
            .read_json_unlocked(&Self::doc(name))?
            .ok_or_else(|| VmError::UnknownVm { name: name.into() })
    }

    /// Every record as it is on disk, without the lock or a reconcile (records are replaced
    /// atomically): for readers that must not change anything, such as the metrics exporter.
    pub fn list_unlocked(&self) -> Result<Vec<VmRecord>, VmError> {
        self.read_all(None)
    }

    /// `inspect`: the record of `name`, after a reconcile.
    pub fn get(&self, name: &str) -> Result<VmRecord, VmError> {
        self.reconcile_best_effort();
        self.get_unlocked(name)
    }

    /// `ps`: every record (only those not exited unless `all`), after a reconcile.
    pub fn list(&self, all: bool) -> Result<Vec<VmRecord>, VmError> {
        self.reconcile_best_effort();
        let mut recs = self.read_all(None)?;
        if !all {
            recs.retain(|r| r.state != VmState::Exited);
        }
        Ok(recs)
    }
}

/// The VMM's name as the CLI spells it.
pub fn vmm_name(kind: VmmKind) -> &'static str {
    match kind {
        VmmKind::Qemu => "qemu",
        VmmKind::Firecracker => "firecracker",
    }
}

/// A current-thread runtime for netlink futures, built on first use and then reused: a
/// reconcile with nothing to detach builds none, one that releases many endpoints builds one.
#[derive(Default)]
struct LazyRuntime(Option<tokio::runtime::Runtime>);

impl LazyRuntime {
    fn block_on<F: Future>(&mut self, f: F) -> Result<F::Output, VmError> {
        let rt = match self.0.take() {
            Some(rt) => rt,
            None => crate::runtime::current_thread().map_err(VmError::Runtime)?,
        };
        let out = rt.block_on(f);
        self.0 = Some(rt);
        Ok(out)
    }
}
