//! Controlling a VM once it runs: `micropod stop`, `rm` and `logs`.

use std::{
    fs::{self, File},
    io::{self, Read as _, Seek as _, Write},
    time::{Duration, Instant},
};

use super::{LazyRuntime, POLL, ProcessRef, VmError, VmRecord, VmState, Vms};
use crate::vmm;

/// How long `stop` waits for the supervisor to release the endpoint after the VMM died.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

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

impl Vms {
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
        if let Err(e) = self.release_endpoint(&mut rec, &mut LazyRuntime::default()) {
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
        let path = rec.spec.console_log;
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

/// SIGKILL to `process` (if it still runs) and a bounded wait for it to be gone.
pub(super) fn kill_and_wait(name: &str, process: &ProcessRef) -> Result<(), VmError> {
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
