//! Reconcile: records the end of VMs whose supervisor and VMM are both gone, and releases
//! their endpoints.

use std::net::Ipv4Addr;

use super::{LazyRuntime, VmError, VmRecord, VmState, Vms};
use crate::{network::NetworkError, state::StateLock};

/// A VM whose end a reconcile recorded.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Reconciled {
    pub name: String,
    pub ip: Ipv4Addr,
    pub reason: String,
}

impl Vms {
    /// Reconciles if it can; read-only commands still work for users who cannot (no
    /// privileges), they just see the records as they are.
    pub(super) fn reconcile_best_effort(&self) {
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

    pub(super) fn reconcile_locked(&self, lock: &StateLock) -> Result<Vec<Reconciled>, VmError> {
        let mut done = Vec::new();
        // One runtime for every release of this pass.
        let mut rt = LazyRuntime::default();
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
            let released = self.release_endpoint(&mut rec, &mut rt);
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
    /// Call with the VM lock held; `rt` runs the detach.
    pub(super) fn release_endpoint(
        &self,
        rec: &mut VmRecord,
        rt: &mut LazyRuntime,
    ) -> Result<(), VmError> {
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
            match rt.block_on(self.network.detach(&rec.network.endpoint))? {
                Ok(_) | Err(NetworkError::UnknownEndpoint { .. } | NetworkError::NotUp { .. }) => {}
                Err(e) => return Err(fail(e)),
            }
        }
        rec.network.released = true;
        Ok(())
    }
}
