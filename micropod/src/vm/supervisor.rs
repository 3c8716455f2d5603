//! The supervisor: one process per VM, the parent of its VMM (`micropod vm-supervise NAME`).
//!
//! It spawns the VMM (serial console to `console.log`, the VMM's stderr to `vmm.log`), lets the
//! driver start the VM while watching the child, records `running`, then waits. Whatever ends
//! the VMM (guest poweroff, crash, `kill -9`), `wait` returns at once: the supervisor releases
//! the endpoint and records `exited` with the exit status, then exits itself.

use std::{
    fs::File,
    os::unix::{fs::FileTypeExt as _, process::ExitStatusExt as _},
    process::{Child, ExitStatus, Stdio},
    sync::mpsc,
};

use super::{
    CONSOLE_LOG, LazyRuntime, POLL, ProcessRef, SupervisorError, VMM_LOG, VMM_START_TIMEOUT,
    VmError, VmRecord, VmState, Vms,
};
use crate::vmm;

/// How the exit reason of a VM that never ran starts.
pub(super) const FAILED_TO_START: &str = "failed to start: ";

impl Vms {
    /// Runs the supervisor of `name` until its VMM exits. Fails if the VM is not `starting`
    /// (a supervisor only ever starts a VM `run` just recorded).
    pub fn supervise(&self, name: &str) -> Result<(), VmError> {
        let me = ProcessRef::current().map_err(|source| VmError::Process {
            what: "identify",
            pid: std::process::id(),
            source,
        })?;
        let rec = {
            let lock = self.state.lock()?;
            let mut rec = self
                .read(&lock, name)?
                .ok_or_else(|| VmError::UnknownVm { name: name.into() })?;
            if rec.state != VmState::Starting || rec.supervisor.is_some() {
                return Err(VmError::NotStarting {
                    name: name.into(),
                    state: rec.state,
                });
            }
            rec.supervisor = Some(me);
            self.write(&lock, &rec)?;
            rec
        };
        if rec.stop_requested {
            // `stop` came before the VMM did: do not start it.
            return self.finish(
                name,
                None,
                format!("{FAILED_TO_START}stopped before it started"),
            );
        }
        log::info!("supervising VM {name} ({})", rec.id);

        let mut child = match spawn_vmm(&rec) {
            Ok(child) => child,
            Err(e) => {
                let reason = crate::error_chain(&e);
                log::error!("{reason}");
                self.finish(name, None, format!("{FAILED_TO_START}{reason}"))?;
                return Err(VmError::StartFailed {
                    name: name.into(),
                    reason,
                    log: String::new(),
                });
            }
        };
        // A VMM that died at once has no start time left to read; a zero one matches nothing,
        // so it counts as gone, which it is.
        let vmm_ref = ProcessRef::of(child.id()).unwrap_or_else(|_| ProcessRef {
            pid: child.id(),
            start_time: 0,
        });
        log::info!("VMM running as pid {}", child.id());
        self.update(name, |rec| rec.vmm_process = Some(vmm_ref))?;

        match start_watching(&rec, &mut child) {
            Ok(()) => {
                log::info!("VM {name} is running");
                self.update(name, |rec| {
                    if rec.state == VmState::Starting {
                        rec.state = VmState::Running;
                        rec.started_at = Some(super::record::now());
                    }
                })?;
            }
            Err(e) => {
                let reason = crate::error_chain(&e);
                log::error!("VM {name} did not start: {reason}");
                // Our own child, by its handle.
                let _ = child.kill();
                let status = child.wait().ok();
                self.finish(name, status, format!("{FAILED_TO_START}{reason}"))?;
                return Err(VmError::StartFailed {
                    name: name.into(),
                    reason,
                    log: String::new(),
                });
            }
        }

        let status = child.wait().map_err(|source| VmError::Process {
            what: "wait for",
            pid: child.id(),
            source,
        })?;
        log::info!("VMM exited: {}", describe(status));
        let stopped = self.get_unlocked(name).is_ok_and(|r| r.stop_requested);
        let reason = if stopped {
            format!("stopped ({})", describe(status))
        } else {
            describe(status)
        };
        self.finish(name, Some(status), reason)
    }

    /// Applies `change` to the record under the lock.
    fn update(&self, name: &str, change: impl FnOnce(&mut VmRecord)) -> Result<(), VmError> {
        let lock = self.state.lock()?;
        let mut rec = self
            .read(&lock, name)?
            .ok_or_else(|| VmError::UnknownVm { name: name.into() })?;
        change(&mut rec);
        self.write(&lock, &rec)
    }

    /// Records the end of the VM and releases its endpoint.
    fn finish(
        &self,
        name: &str,
        status: Option<ExitStatus>,
        reason: String,
    ) -> Result<(), VmError> {
        let lock = self.state.lock()?;
        let mut rec = self
            .read(&lock, name)?
            .ok_or_else(|| VmError::UnknownVm { name: name.into() })?;
        rec.mark_exited(
            status.and_then(|s| s.code()),
            status.and_then(|s| s.signal()),
            reason,
        );
        let released = self.release_endpoint(&mut rec, &mut LazyRuntime::default());
        self.write(&lock, &rec)?;
        // The control sockets are dead; the logs stay for `micropod logs`.
        for entry in std::fs::read_dir(rec.dir()).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_socket()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        match &released {
            Ok(()) => log::info!("released {} ({})", rec.network.tap, rec.network.ip),
            Err(e) => log::error!("{e}"),
        }
        released
    }
}

/// Spawns the VMM with the console and VMM logs as its stdout and stderr, and with
/// `PR_SET_PDEATHSIG` so that it never outlives the supervisor.
fn spawn_vmm(rec: &VmRecord) -> Result<Child, SupervisorError> {
    let driver = vmm::driver(rec.vmm);
    let binary = driver.binary().map_err(SupervisorError::Binary)?;
    let mut cmd = driver
        .command(&binary, &rec.spec)
        .map_err(SupervisorError::Command)?;
    let open = |name: &str| {
        let path = rec.dir().join(name);
        File::create(&path).map_err(|source| SupervisorError::CreateLog { path, source })
    };
    cmd.stdin(Stdio::null())
        .stdout(open(CONSOLE_LOG)?)
        .stderr(open(VMM_LOG)?);
    // Read before the fork; 0 (never a parent's pid) if it does not fit, refusing the spawn.
    let supervisor = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // If the supervisor died before the prctl took effect, the VMM does not run unsupervised.
    crate::sys::kill_on_parent_death(&mut cmd, supervisor, "the supervisor is gone");
    cmd.spawn()
        .map_err(|source| SupervisorError::Spawn { binary, source })
}

/// Runs the driver's `start` on a thread while watching the VMM, so a VMM that dies during
/// start is reported at once rather than after the start timeout.
fn start_watching(rec: &VmRecord, child: &mut Child) -> Result<(), SupervisorError> {
    let (tx, rx) = mpsc::channel();
    let spec = rec.spec.clone();
    let kind = rec.vmm;
    std::thread::spawn(move || {
        let _ = tx.send(vmm::driver(kind).start(&spec, VMM_START_TIMEOUT));
    });
    loop {
        match rx.recv_timeout(POLL) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => {
                // A VMM that exits at once (bad kernel, bad argument) usually breaks the
                // control connection first: its exit is the real news.
                let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
                while std::time::Instant::now() < deadline {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(SupervisorError::ExitedDuringStart { status });
                    }
                    std::thread::sleep(POLL);
                }
                return Err(SupervisorError::Start(e));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(SupervisorError::StartPanicked);
            }
        }
        match child.try_wait() {
            Ok(Some(status)) => return Err(SupervisorError::ExitedDuringStart { status }),
            Ok(None) => {}
            Err(e) => return Err(SupervisorError::Watch(e)),
        }
    }
}

/// An exit status in words.
pub(super) fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}
