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

mod process;
mod record;
mod supervisor;

use std::{
    fs::{self, DirBuilder, File},
    io::{self, Read as _, Seek as _, Write},
    net::Ipv4Addr,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub use process::ProcessRef;
pub use record::{RECORD_VERSION, VmExit, VmNetwork, VmRecord, VmState, now as unix_now};

use crate::{
    network::{AttachRequest, EndpointKind, Network, NetworkError, valid_endpoint_name},
    state::{StateDir, StateError, StateLock},
    vmm::{self, Boot, VmSpec, VmmError, VmmKind},
};

/// The directory under the state dir that holds VM records and VM directories.
pub const VMS_DIR: &str = "vms";
/// The hidden CLI subcommand that runs a supervisor: `micropod vm-supervise NAME`.
pub const SUPERVISE_COMMAND: &str = "vm-supervise";
pub const CONSOLE_LOG: &str = "console.log";
pub const VMM_LOG: &str = "vmm.log";
pub const SUPERVISOR_LOG: &str = "supervisor.log";
pub const DEFAULT_CPUS: u8 = 1;
pub const DEFAULT_MEMORY_MIB: u32 = 256;
pub const MAX_CPUS: u8 = 64;
pub const MIN_MEMORY_MIB: u32 = 32;
/// The x86 kernel's `COMMAND_LINE_SIZE`, including the terminating NUL.
pub const MAX_CMDLINE: usize = 2048;
/// The longest `ip=` argument micropod can generate.
const MAX_IP_ARG: usize = "ip=255.255.255.255::255.255.255.255:255.255.255.255::eth0:off".len();
/// What the lifecycle itself puts on the kernel command line, besides `ip=`.
const CONSOLE_ARG: &str = "console=ttyS0";
const ROOTFS_ARGS: &str = "root=/dev/vda rw";
/// Room for the control socket's name in the VM dir (sun_path holds 108 bytes with the NUL).
const SOCKET_NAME_BUDGET: usize = 24;
const SUN_PATH_MAX: usize = 107;
/// How long `run` waits for the supervisor to report the VMM running.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the supervisor gives the driver's `start`.
const VMM_START_TIMEOUT: Duration = Duration::from_secs(45);
/// How long `stop` waits for the supervisor to release the endpoint after the VMM died.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often waits look again.
const POLL: Duration = Duration::from_millis(25);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "invalid VM name {name:?}: use 1-64 characters from [A-Za-z0-9_.-], starting with a letter or digit"
    )]
    InvalidName { name: String },
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

/// What `micropod run` was asked for.
#[derive(Clone, Debug)]
pub struct RunRequest {
    /// Default: `vm-` and the first 8 characters of the id.
    pub name: Option<String>,
    pub kernel: PathBuf,
    pub boot: Boot,
    pub vmm: VmmKind,
    pub ip: Option<Ipv4Addr>,
    pub cpus: u8,
    pub memory_mib: u32,
    /// Appended to the kernel command line micropod builds.
    pub cmdline: Option<String>,
}

impl RunRequest {
    /// A request with the defaults: QEMU, 1 vCPU, 256 MiB, any address, a generated name.
    pub fn new(kernel: impl Into<PathBuf>, boot: Boot) -> Self {
        Self {
            name: None,
            kernel: kernel.into(),
            boot,
            vmm: VmmKind::Qemu,
            ip: None,
            cpus: DEFAULT_CPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            cmdline: None,
        }
    }
}

/// How `stop` went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StopOutcome {
    /// The guest powered off when asked.
    Graceful,
    /// The VMM was killed after the timeout.
    Killed,
    /// It was not running.
    AlreadyExited,
}

/// A VM whose end a reconcile recorded.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Reconciled {
    pub name: String,
    pub ip: Ipv4Addr,
    pub reason: String,
}

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

    /// Starts supervisors from `exe` (a `micropod` binary) instead of this executable.
    #[must_use]
    pub fn with_supervisor_exe(mut self, exe: impl Into<PathBuf>) -> Self {
        self.supervisor_exe = exe.into();
        self
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

    /// Reconciles if it can; read-only commands still work for users who cannot (no
    /// privileges), they just see the records as they are.
    fn reconcile_best_effort(&self) {
        if !self.state.root().exists() {
            return;
        }
        if let Err(e) = self.reconcile() {
            log::warn!("cannot reconcile VM records: {e}");
        }
    }

    /// Records the end of VMs whose supervisor and VMM are both gone, and releases their
    /// endpoints (also retries releases that failed before). Run by every VM command and by
    /// `micropod gc`.
    pub fn reconcile(&self) -> Result<Vec<Reconciled>, VmError> {
        if !self.state.root().exists() {
            return Ok(Vec::new());
        }
        let lock = self.state.lock()?;
        self.reconcile_locked(&lock)
    }

    fn reconcile_locked(&self, lock: &StateLock) -> Result<Vec<Reconciled>, VmError> {
        let mut done = Vec::new();
        for mut rec in self.read_all(Some(lock))? {
            if rec.state == VmState::Exited && rec.network.released {
                continue;
            }
            if rec.state != VmState::Exited {
                if rec.owner_alive() || rec.vmm_alive() {
                    continue;
                }
                let who = if rec.supervisor.is_some() {
                    "its supervisor and VMM are gone"
                } else {
                    "the `micropod run` starting it is gone"
                };
                log::info!("VM {}: {who}; recording its end", rec.name);
                rec.mark_exited(None, None, format!("{who} (found by reconcile)"));
            }
            let released = self.release_endpoint(&mut rec);
            self.write(lock, &rec)?;
            match released {
                Ok(()) => done.push(Reconciled {
                    name: rec.name.clone(),
                    ip: rec.network.ip,
                    reason: rec
                        .exit
                        .as_ref()
                        .map(|e| e.reason.clone())
                        .unwrap_or_default(),
                }),
                Err(e) => log::warn!("{e}"),
            }
        }
        Ok(done)
    }

    /// Detaches the VM's endpoint if it is still the one the VM got, and notes it released.
    /// Call with the VM lock held.
    fn release_endpoint(&self, rec: &mut VmRecord) -> Result<(), VmError> {
        if rec.network.released {
            return Ok(());
        }
        let fail = |source| VmError::Release {
            name: rec.name.clone(),
            source,
        };
        // Someone may have detached it by hand (or `network down --force`): only release
        // the endpoint if it is still this VM's (same TAP).
        let ours = self
            .network
            .list()
            .map_err(fail)?
            .into_iter()
            .any(|ep| ep.name == rec.network.endpoint && ep.link == rec.network.tap);
        if ours {
            match block_on(self.network.detach(&rec.network.endpoint))? {
                Ok(_) | Err(NetworkError::UnknownEndpoint { .. } | NetworkError::NotUp { .. }) => {}
                Err(e) => return Err(fail(e)),
            }
        }
        rec.network.released = true;
        Ok(())
    }

    /// `micropod run`: see the module docs. Returns once the VMM runs (not once the guest
    /// has booted).
    pub fn run(&self, req: &RunRequest) -> Result<VmRecord, VmError> {
        let Checked {
            kernel,
            boot,
            fixed_args,
            extra,
        } = check_request(req)?;
        crate::network::check_privileges().map_err(VmError::Privileges)?;
        let id = new_id();
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| format!("vm-{}", &id[..8]));
        let dir = self.state.root().join(&id);
        if dir.as_os_str().len() + 1 + SOCKET_NAME_BUDGET > SUN_PATH_MAX {
            return Err(VmError::SocketPath {
                path: dir.join(vmm::qemu::QMP_SOCKET),
            });
        }

        let lock = self.state.lock()?;
        if let Err(e) = self.reconcile_locked(&lock) {
            log::warn!("cannot reconcile VM records: {e}");
        }
        if let Some(existing) = self.read(&lock, &name)? {
            return Err(VmError::NameTaken {
                name,
                state: existing.state,
            });
        }
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| VmError::CreateDir {
                path: dir.clone(),
                source,
            })?;
        let attached = block_on(self.network.attach(&AttachRequest {
            name: name.clone(),
            kind: EndpointKind::Tap,
            netns: None,
            ip: req.ip,
            ifname: None,
        }))
        .and_then(|r| {
            r.map_err(|source| VmError::Attach {
                name: name.clone(),
                source,
            })
        });
        let attachment = match attached {
            Ok(a) => a,
            Err(e) => {
                remove_dir(&dir);
                return Err(e);
            }
        };
        let mut cmdline = vec![CONSOLE_ARG.to_owned(), attachment.kernel_arg.clone()];
        cmdline.extend(fixed_args);
        if !extra.is_empty() {
            cmdline.push(extra);
        }
        let rec = VmRecord {
            version: RECORD_VERSION,
            name: name.clone(),
            id,
            vmm: req.vmm,
            state: VmState::Starting,
            spec: VmSpec {
                name: name.clone(),
                kernel,
                boot,
                cpus: req.cpus,
                memory_mib: req.memory_mib,
                cmdline: cmdline.join(" "),
                tap: attachment.link.clone(),
                mac: attachment.mac,
                ip: attachment.ip,
                run_dir: dir.clone(),
                console_log: dir.join(CONSOLE_LOG),
            },
            network: VmNetwork {
                endpoint: attachment.name.clone(),
                tap: attachment.link.clone(),
                bridge: attachment.bridge.clone(),
                ip: attachment.ip,
                cidr: attachment.cidr.clone(),
                gateway: attachment.gateway,
                mac: attachment.mac,
                released: false,
            },
            created_at: record::now(),
            started_at: None,
            creator: ProcessRef::current().map_err(|source| VmError::Process {
                what: "identify",
                pid: std::process::id(),
                source,
            })?,
            supervisor: None,
            vmm_process: None,
            stop_requested: false,
            exit: None,
        };
        if let Err(e) = self.write(&lock, &rec) {
            let mut rec = rec;
            if let Err(e) = self.release_endpoint(&mut rec) {
                log::warn!("{e}");
            }
            remove_dir(&dir);
            return Err(e);
        }
        drop(lock);

        let child = match self.spawn_supervisor(&rec) {
            Ok(child) => child,
            Err(e) => {
                self.discard(&name);
                return Err(e);
            }
        };
        self.wait_running(&rec, child)
    }

    /// `micropod --state-dir S --bpf-dir B vm-supervise NAME`, detached: a session of its own,
    /// stdio on `supervisor.log` (so it holds none of the caller's pipes).
    fn spawn_supervisor(&self, rec: &VmRecord) -> Result<Child, VmError> {
        let spawn_err = |source| VmError::SpawnSupervisor {
            exe: self.supervisor_exe.clone(),
            source,
        };
        let log = File::create(rec.dir().join(SUPERVISOR_LOG)).map_err(spawn_err)?;
        let mut cmd = Command::new(&self.supervisor_exe);
        cmd.arg("--state-dir")
            .arg(self.network.state_dir())
            .arg("--bpf-dir")
            .arg(self.network.bpf_dir())
            .arg(SUPERVISE_COMMAND)
            .arg(&rec.name)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(spawn_err)?)
            .stderr(log);
        crate::sys::setsid_on_exec(&mut cmd);
        cmd.spawn().map_err(spawn_err)
    }

    /// Waits for the supervisor to report the VMM running; on any failure cleans up (kills
    /// what was started, releases the endpoint, removes the record and directory).
    fn wait_running(&self, rec: &VmRecord, mut supervisor: Child) -> Result<VmRecord, VmError> {
        let name = rec.name.clone();
        let deadline = Instant::now() + RUN_TIMEOUT;
        let vmm_log = || tail(&rec.dir().join(VMM_LOG), 20);
        let failure = loop {
            let now: Option<VmRecord> = self.state.read_json_unlocked(&Self::doc(&name))?;
            match now {
                Some(now) if now.state == VmState::Running => return Ok(now),
                Some(now) if now.state == VmState::Exited => {
                    let reason = now.exit.map(|e| e.reason).unwrap_or_default();
                    let reason = reason
                        .strip_prefix(supervisor::FAILED_TO_START)
                        .map_or(reason.clone(), str::to_owned);
                    break VmError::StartFailed {
                        name: name.clone(),
                        reason,
                        log: vmm_log(),
                    };
                }
                Some(_) => {}
                None => {
                    break VmError::StartFailed {
                        name: name.clone(),
                        reason: "its record vanished (removed by another command?)".into(),
                        log: String::new(),
                    };
                }
            }
            if let Ok(Some(status)) = supervisor.try_wait() {
                // It may have recorded its last word just before exiting.
                let last: Option<VmRecord> = self.state.read_json_unlocked(&Self::doc(&name))?;
                if let Some(last) = last
                    && last.state != VmState::Starting
                {
                    continue;
                }
                break VmError::StartFailed {
                    name: name.clone(),
                    reason: format!("its supervisor exited ({status})"),
                    log: tail(&rec.dir().join(SUPERVISOR_LOG), 20),
                };
            }
            if Instant::now() >= deadline {
                // Our own child; its VMM dies with it (PR_SET_PDEATHSIG), killed below too.
                let _ = supervisor.kill();
                let _ = supervisor.wait();
                break VmError::StartTimeout {
                    name: name.clone(),
                    timeout: RUN_TIMEOUT,
                    log: vmm_log(),
                };
            }
            std::thread::sleep(POLL);
        };
        let _ = supervisor.try_wait();
        self.discard(&name);
        Err(failure)
    }

    /// Undoes a VM that failed to start: kills its VMM if one runs, releases the endpoint,
    /// removes the record and the directory. Best effort; what fails is logged and left to
    /// reconcile (the record is then kept, marked exited).
    fn discard(&self, name: &str) {
        let result = (|| -> Result<(), VmError> {
            let lock = self.state.lock()?;
            let Some(mut rec) = self.read(&lock, name)? else {
                return Ok(());
            };
            if let Some(vmm) = rec.vmm_process {
                kill_and_wait(name, &vmm)?;
            }
            if rec.state != VmState::Exited {
                rec.mark_exited(None, None, "failed to start".into());
            }
            if let Err(e) = self.release_endpoint(&mut rec) {
                self.write(&lock, &rec)?;
                return Err(e);
            }
            self.state.remove(&lock, &Self::doc(name))?;
            remove_dir(rec.dir());
            Ok(())
        })();
        if let Err(e) = result {
            log::warn!("while cleaning up VM {name}: {e}");
        }
    }

    /// `micropod stop`: asks the guest to power off, kills the VMM after `timeout`, and
    /// returns once the endpoint is released.
    pub fn stop(&self, name: &str, timeout: Duration) -> Result<StopOutcome, VmError> {
        let rec = {
            let lock = self.state.lock()?;
            if let Err(e) = self.reconcile_locked(&lock) {
                log::warn!("cannot reconcile VM records: {e}");
            }
            let mut rec = self
                .read(&lock, name)?
                .ok_or_else(|| VmError::UnknownVm { name: name.into() })?;
            if rec.state == VmState::Exited {
                return Ok(StopOutcome::AlreadyExited);
            }
            rec.stop_requested = true;
            self.write(&lock, &rec)?;
            rec
        };
        let mut outcome = StopOutcome::Graceful;
        match rec.vmm_process {
            Some(vmm) => {
                if rec.state == VmState::Running && !timeout.is_zero() {
                    let driver = vmm::driver(rec.vmm);
                    match driver.request_stop(&rec.spec, timeout.min(Duration::from_secs(5))) {
                        Ok(()) => wait_until(timeout, || !vmm.is_alive()),
                        Err(e) => {
                            log::warn!("VM {name}: the graceful stop failed ({e}); killing the VMM")
                        }
                    }
                }
                if vmm.is_alive() {
                    log::info!("VM {name}: killing the VMM (pid {})", vmm.pid);
                    kill_and_wait(name, &vmm)?;
                    outcome = StopOutcome::Killed;
                }
            }
            // Still starting, no VMM yet: end the supervisor (nothing of the VM runs yet).
            None => {
                outcome = StopOutcome::Killed;
                if let Some(supervisor) = rec.supervisor {
                    kill_and_wait(name, &supervisor)?;
                }
            }
        }
        self.wait_released(name)?;
        Ok(outcome)
    }

    /// Waits until the record says exited and released: the supervisor's job, or reconcile's
    /// if the supervisor is gone too.
    fn wait_released(&self, name: &str) -> Result<(), VmError> {
        let deadline = Instant::now() + RELEASE_TIMEOUT;
        loop {
            let rec = self.get_unlocked(name)?;
            if rec.state == VmState::Exited && rec.network.released {
                return Ok(());
            }
            if !rec.owner_alive() && !rec.vmm_alive() {
                self.reconcile()?;
                let rec = self.get_unlocked(name)?;
                if rec.state == VmState::Exited && rec.network.released {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(VmError::NotReleased {
                    name: name.into(),
                    timeout: RELEASE_TIMEOUT,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// `micropod rm`: removes an exited VM's record and directory; `force` stops a running
    /// one first (at once, with SIGKILL).
    pub fn remove(&self, name: &str, force: bool) -> Result<(), VmError> {
        let rec = self.get(name)?;
        if rec.state != VmState::Exited {
            if !force {
                return Err(VmError::Running {
                    name: name.into(),
                    state: rec.state,
                });
            }
            self.stop(name, Duration::ZERO)?;
        }
        let lock = self.state.lock()?;
        let mut rec = self
            .read(&lock, name)?
            .ok_or_else(|| VmError::UnknownVm { name: name.into() })?;
        if rec.state != VmState::Exited {
            return Err(VmError::Running {
                name: name.into(),
                state: rec.state,
            });
        }
        if let Err(e) = self.release_endpoint(&mut rec) {
            self.write(&lock, &rec)?;
            return Err(e);
        }
        self.state.remove(&lock, &Self::doc(name))?;
        match fs::remove_dir_all(rec.dir()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(VmError::RemoveDir {
                path: rec.dir().clone(),
                source,
            }),
        }
    }

    /// `micropod logs`: copies the serial console to `out`; with `follow`, keeps copying
    /// until the VM exits (or the caller is interrupted).
    pub fn logs(&self, name: &str, follow: bool, out: &mut dyn Write) -> Result<(), VmError> {
        let rec = self.get_unlocked(name)?;
        let path = rec.spec.console_log.clone();
        let log_err = |source| VmError::Log {
            path: path.clone(),
            source,
        };
        let mut file = match File::open(&path) {
            Ok(file) => Some(file),
            // Not created yet (the supervisor is about to) or removed with the VM.
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(log_err(source)),
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if file.is_none() {
                file = File::open(&path).ok();
            }
            // Read the state before draining, so nothing written before the exit is missed.
            let exited = match self
                .state
                .read_json_unlocked::<VmRecord>(&Self::doc(name))?
            {
                Some(now) => now.state == VmState::Exited,
                None => true,
            };
            if let Some(file) = file.as_mut() {
                loop {
                    let n = file.read(&mut buf).map_err(log_err)?;
                    if n == 0 {
                        break;
                    }
                    out.write_all(&buf[..n]).map_err(log_err)?;
                }
                out.flush().map_err(log_err)?;
                // A truncated file (cannot happen today) would otherwise stall the follow.
                if file.stream_position().map_err(log_err)?
                    > file.metadata().map_err(log_err)?.len()
                {
                    file.rewind().map_err(log_err)?;
                }
            }
            if !follow || exited {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A request that passed every check that needs no allocation.
struct Checked {
    /// Absolute.
    kernel: PathBuf,
    /// With an absolute path.
    boot: Boot,
    /// The kernel arguments after `console=` and `ip=`: the rootfs's and the driver's.
    fixed_args: Vec<String>,
    /// `--cmdline`, trimmed.
    extra: String,
}

/// Everything `run` can refuse without allocating: name syntax, files, sizes, the VMM, the
/// command line's length.
fn check_request(req: &RunRequest) -> Result<Checked, VmError> {
    if let Some(name) = &req.name
        && !valid_endpoint_name(name)
    {
        return Err(VmError::InvalidName { name: name.clone() });
    }
    let kernel = check_file("kernel", &req.kernel, false)?;
    let boot = match &req.boot {
        Boot::Initrd(p) => Boot::Initrd(check_file("initrd", p, false)?),
        Boot::Rootfs(p) => Boot::Rootfs(check_file("rootfs", p, true)?),
    };
    if !(1..=MAX_CPUS).contains(&req.cpus) {
        return Err(VmError::Cpus { cpus: req.cpus });
    }
    let max_memory = host_memory_mib().unwrap_or(u32::MAX);
    if !(MIN_MEMORY_MIB..=max_memory).contains(&req.memory_mib) {
        return Err(VmError::Memory {
            mib: req.memory_mib,
            max: max_memory,
        });
    }
    let driver = vmm::driver(req.vmm);
    let vmm_err = |source| VmError::Vmm {
        vmm: vmm_name(req.vmm),
        source,
    };
    driver.binary().map_err(vmm_err)?;
    let mut fixed_args = Vec::new();
    if matches!(boot, Boot::Rootfs(_)) {
        fixed_args.push(ROOTFS_ARGS.to_owned());
    }
    fixed_args.extend(driver.kernel_args().map_err(vmm_err)?);
    let extra = req.cmdline.as_deref().map(str::trim).unwrap_or_default();
    if extra.chars().any(char::is_control) {
        return Err(VmError::CmdlineChars);
    }
    // The longest it can get once the address is known; the kernel needs room for a NUL.
    let worst = [CONSOLE_ARG, extra]
        .into_iter()
        .chain(fixed_args.iter().map(String::as_str))
        .map(|a| a.len() + 1)
        .sum::<usize>()
        + MAX_IP_ARG;
    if worst >= MAX_CMDLINE {
        return Err(VmError::CmdlineTooLong { len: worst });
    }
    Ok(Checked {
        kernel,
        boot,
        fixed_args,
        extra: extra.to_owned(),
    })
}

/// The VMM's name as the CLI spells it.
pub fn vmm_name(kind: VmmKind) -> &'static str {
    match kind {
        VmmKind::Qemu => "qemu",
        VmmKind::Firecracker => "firecracker",
    }
}

/// Runs a netlink future on a fresh current-thread runtime.
fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, VmError> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(VmError::Runtime)?
        .block_on(f))
}

/// Checks that `path` is a regular file micropod can read (and write, for a rootfs), and
/// returns it absolute (the supervisor and the VMM run elsewhere).
fn check_file(what: &'static str, path: &Path, write: bool) -> Result<PathBuf, VmError> {
    let err = |source| VmError::File {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = File::options()
        .read(true)
        .write(write)
        .open(path)
        .map_err(err)?;
    if !file.metadata().map_err(err)?.is_file() {
        return Err(VmError::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    fs::canonicalize(path).map_err(err)
}

/// The host's memory in MiB (`MemTotal`).
fn host_memory_mib() -> Option<u32> {
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    u32::try_from(kib / 1024).ok()
}

/// 16 random hex digits.
fn new_id() -> String {
    let mut bytes = [0u8; 8];
    let n = crate::sys::getrandom(&mut bytes);
    if n.ok() != Some(bytes.len()) {
        // Unique enough without the entropy pool: time and pid.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        #[expect(clippy::cast_possible_truncation, reason = "mixing bits, loss is fine")]
        let mixed = (nanos as u64) ^ (u64::from(std::process::id()) << 40);
        bytes = mixed.to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SIGKILL to `process` (if it still runs) and a bounded wait for it to be gone.
fn kill_and_wait(name: &str, process: &ProcessRef) -> Result<(), VmError> {
    process
        .signal(libc::SIGKILL)
        .map_err(|source| VmError::Process {
            what: "kill",
            pid: process.pid,
            source,
        })?;
    wait_until(Duration::from_secs(5), || !process.is_alive());
    if process.is_alive() {
        return Err(VmError::Unkillable {
            name: name.into(),
            pid: process.pid,
        });
    }
    Ok(())
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
}

fn remove_dir(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        log::warn!("cannot remove {}: {e}", dir.display());
    }
}

/// The last `lines` lines of a (small) log file; empty if unreadable.
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_and_distinct() {
        let a = new_id();
        let b = new_id();
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn host_memory_is_known() {
        assert!(host_memory_mib().is_some_and(|m| m >= MIN_MEMORY_MIB));
    }

    #[test]
    fn ip_arg_bound_is_the_longest() {
        let subnet: ipnetwork::Ipv4Network = "255.255.255.0/32".parse().unwrap();
        let arg = crate::network::kernel_ip_arg(
            Ipv4Addr::new(255, 255, 255, 255),
            subnet,
            Ipv4Addr::new(255, 255, 255, 255),
        );
        assert_eq!(arg.len(), MAX_IP_ARG);
    }

    #[test]
    fn check_file_refuses_missing_dirs_and_returns_absolute_paths() {
        let missing = check_file("kernel", Path::new("/nonexistent/vmlinuz"), false).unwrap_err();
        assert!(missing.to_string().contains("no such file"), "{missing}");
        let dir = check_file("kernel", Path::new("/"), false).unwrap_err();
        assert!(
            matches!(dir, VmError::NotAFile { .. } | VmError::File { .. }),
            "{dir}"
        );
        let exe = std::env::current_exe().unwrap();
        let ok = check_file("kernel", &exe, false).unwrap();
        assert!(ok.is_absolute());
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let path = std::env::temp_dir().join(format!("micropod-tail-{}", std::process::id()));
        fs::write(&path, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&path, 2), "c\nd");
        assert_eq!(tail(&path, 10), "a\nb\nc\nd");
        fs::remove_file(&path).unwrap();
        assert_eq!(tail(&path, 2), "");
    }
}
