//! Reconcile: records the end of VMs whose supervisor and VMM are both gone, and releases
//! their endpoints.

use std::{collections::HashSet, fs, net::Ipv4Addr};

use super::{ATTACHING_FILE, LazyRuntime, VmError, VmRecord, VmState, Vms};
use crate::{net::naming::EndpointKind, network::NetworkError, state::StateLock};

/// Whether `name` looks like a run dir's name ([`super::run`]'s `new_id`: lowercase hex).
fn is_run_id(name: &str) -> bool {
    name.len() >= 16
        && name
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

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
        let records = self.read_all(Some(lock))?;
        let ids: HashSet<String> = records.iter().map(|r| r.id.clone()).collect();
        for mut rec in records {
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
        self.reconcile_unrecorded(&ids, &mut rt, &mut done)?;
        Ok(done)
    }

    /// Run dirs without a record: a `micropod run` that died between making its dir and
    /// writing its record (a live one would hold the lock we hold). Releases the endpoint it
    /// attached, if it got that far (a TAP endpoint under the name it left in
    /// [`ATTACHING_FILE`]), and removes the dir.
    /// `ids`: the run dirs the records name; call with the VM lock held.
    fn reconcile_unrecorded(
        &self,
        ids: &HashSet<String>,
        rt: &mut LazyRuntime,
        done: &mut Vec<Reconciled>,
    ) -> Result<(), VmError> {
        let Ok(entries) = fs::read_dir(self.state.root()) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let Ok(id) = entry.file_name().into_string() else {
                continue;
            };
            if ids.contains(&id) || !entry.file_type().is_ok_and(|t| t.is_dir()) || !is_run_id(&id)
            {
                continue;
            }
            let dir = entry.path();
            let name = fs::read_to_string(dir.join(ATTACHING_FILE)).ok();
            let mut ip = None;
            if let Some(name) = &name {
                let fail = |source| VmError::Release {
                    name: name.clone(),
                    source,
                };
                let endpoint = self
                    .network
                    .list()
                    .map_err(fail)?
                    .into_iter()
                    .find(|ep| &ep.name == name && ep.kind == EndpointKind::Tap);
                if let Some(ep) = endpoint {
                    match rt.block_on(self.network.detach(name))? {
                        Ok(_)
                        | Err(NetworkError::UnknownEndpoint { .. } | NetworkError::NotUp { .. }) => {
                        }
                        Err(e) => return Err(fail(e)),
                    }
                    ip = Some(ep.ip);
                }
            }
            if let Err(e) = fs::remove_dir_all(&dir) {
                log::warn!("cannot remove {}: {e}", dir.display());
                continue;
            }
            log::info!(
                "removed the run dir {} of a `micropod run` that died before recording its VM",
                dir.display()
            );
            if let (Some(name), Some(ip)) = (name, ip) {
                done.push(Reconciled {
                    name,
                    ip,
                    reason: "the `micropod run` starting it died before recording it (found by reconcile)".into(),
                });
            }
        }
        Ok(())
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
