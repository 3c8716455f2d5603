//! The reconcile that precedes every mutating command, and `micropod gc`.

use super::{NetworkError, Released, check_privileges, endpoint::netns_alive, model::*};
use crate::{
    datapath::DataPlane,
    net::{Netlink, link},
    state::StateLock,
};

impl super::Network {
    /// `micropod gc`: releases endpoints whose command died, whose link vanished or whose
    /// namespace is gone, deletes the retired links on record, and deletes links named like
    /// endpoints or retired links of our subnet that no record owns.
    pub async fn gc(&self) -> Result<Vec<Released>, NetworkError> {
        check_privileges()?;
        let nl = Netlink::connect().map_err(NetworkError::Netlink)?;
        let lock = self.state.lock()?;
        let Some(mut doc) = self.state.read_json::<NetworkDoc>(&lock, STATE_DOC)? else {
            return Ok(Vec::new());
        };
        let released = self.reconcile(&nl, &lock, &mut doc, true).await?.released;
        if doc.active_datapath == ActiveDatapath::Ebpf {
            match DataPlane::new(&self.bpf_dir).sweep_nat() {
                Ok(n) if n > 0 => log::info!("removed {n} expired NAT entries"),
                Ok(_) => {}
                Err(e) => log::warn!("cannot sweep the NAT table: {}", crate::error_chain(&e)),
            }
        }
        Ok(released)
    }

    pub(super) fn load_ready(&self, lock: &StateLock) -> Result<NetworkDoc, NetworkError> {
        match self.state.read_json::<NetworkDoc>(lock, STATE_DOC)? {
            Some(doc) if doc.phase == Phase::Ready => Ok(doc),
            _ => Err(NetworkError::NotUp {
                state_dir: self.state.root().to_path_buf(),
            }),
        }
    }

    /// Brings the record in line with the kernel; writes it back if anything changed. Cheap
    /// enough for every command: one `SIOCGIFINDEX` and one `stat` per endpoint. `sweep` (for
    /// `micropod gc`) also deletes the retired links on record and dumps every link to find
    /// micropod-named links without a record.
    pub(super) async fn reconcile(
        &self,
        nl: &Netlink,
        lock: &StateLock,
        doc: &mut NetworkDoc,
        sweep: bool,
    ) -> Result<Reconciled, NetworkError> {
        let probe = link::IndexProbe::new().map_err(NetworkError::Probe)?;
        let exists = |name: &str| probe.index(name).map_err(NetworkError::Probe);
        let mut released = Vec::new();
        let mut changed = false;
        // A detach that died: finish it, before the checks below take its renamed link for a
        // vanished one.
        if let Some(intent) = self.state.read_json::<DetachIntent>(lock, DETACH_INTENT)? {
            let (name, ip, link) = (
                intent.endpoint.name.clone(),
                intent.endpoint.ip,
                intent.endpoint.link.clone(),
            );
            if self.finish_detach(nl, lock, &probe, doc, intent).await? {
                released.push(Released {
                    name,
                    ip: Some(ip),
                    link: Some(link),
                    reason: "its detach was interrupted".into(),
                });
            }
        }
        // An attach that died: undo what it made, unless it got as far as recording it.
        if let Some(intent) = self.state.read_json::<Endpoint>(lock, ATTACH_INTENT)? {
            let recorded = doc.endpoints.get(&intent.name) == Some(&intent);
            if !recorded {
                link::delete_if_exists(nl, &intent.link)
                    .await
                    .map_err(|source| NetworkError::DeleteLink {
                        name: intent.link.clone(),
                        source: Box::new(source),
                    })?;
                self.forget_datapath(doc, intent.ip, &intent.link);
                log::info!("undid the interrupted attach of {}", intent.name);
                released.push(Released {
                    name: intent.name,
                    ip: Some(intent.ip),
                    link: Some(intent.link),
                    reason: "its attach was interrupted".into(),
                });
            }
            self.state.remove_unsynced(lock, ATTACH_INTENT)?;
        }
        let mut stale = Vec::new();
        for ep in doc.endpoints.values() {
            let reason = if exists(&ep.link)?.is_none() {
                Some("its link vanished")
            } else if ep.netns.as_ref().is_some_and(|n| !netns_alive(n)) {
                Some("its network namespace is gone")
            } else {
                None
            };
            if let Some(reason) = reason {
                stale.push((ep.clone(), reason));
            }
        }
        for (ep, reason) in stale {
            if let Err(e) = link::delete_if_exists(nl, &ep.link).await {
                // Keep the record so the next reconcile tries again.
                log::warn!(
                    "cannot delete {} of stale endpoint {}: {}",
                    ep.link,
                    ep.name,
                    crate::error_chain(&e)
                );
                continue;
            }
            self.forget_datapath(doc, ep.ip, &ep.link);
            if let Some((_, Err(e))) = doc.release_endpoint(&ep.name) {
                log::warn!("stale endpoint {}: {e}", ep.name);
            }
            changed = true;
            log::info!("released endpoint {} ({}): {reason}", ep.name, ep.ip);
            released.push(Released {
                name: ep.name,
                ip: Some(ep.ip),
                link: Some(ep.link),
                reason: reason.into(),
            });
        }
        // Addresses held by no endpoint (cannot happen with atomic writes, but cheap to check).
        let leaked: Vec<_> = doc
            .ipam
            .allocations()
            .filter(|(_, owner)| !doc.endpoints.contains_key(*owner))
            .map(|(ip, owner)| (ip, owner.to_owned()))
            .collect();
        for (ip, owner) in leaked {
            let _ = doc.ipam.release(ip);
            changed = true;
            released.push(Released {
                name: owner,
                ip: Some(ip),
                link: None,
                reason: "its address had no endpoint record".into(),
            });
        }
        if sweep {
            let before = doc.retired.len();
            for (name, e) in self.reap_now(nl, doc).await {
                log::warn!("cannot delete retired {name}: {}", crate::error_chain(&e));
            }
            changed |= doc.retired.len() != before;
        }
        // The intents never touched the document (the detach intent's finish wrote its own
        // change); anything else did.
        if changed {
            self.state.write_json(lock, STATE_DOC, doc)?;
        }
        if sweep {
            // Links named for an address of our subnet that no record owns (left by a crash
            // micropod could not record, or by hand).
            let subnet = doc.config.subnet;
            let links = link::list(nl)
                .await
                .map_err(|e| NetworkError::Links(Box::new(e)))?;
            for l in links {
                let ip =
                    endpoint_link_ip(&l.name).or_else(|| retired_link(&l.name).map(|(ip, _)| ip));
                let ours = ip.is_some_and(|ip| subnet.contains(ip));
                let recorded = doc.endpoints.values().any(|ep| ep.link == l.name)
                    || doc.retired.iter().any(|r| r.name == l.name);
                if ours && !recorded {
                    match link::delete_if_exists(nl, &l.name).await {
                        Ok(_) => released.push(Released {
                            name: l.name.clone(),
                            ip,
                            link: Some(l.name.clone()),
                            reason: "a micropod-named link without a record".into(),
                        }),
                        Err(e) => log::warn!(
                            "cannot delete orphan {}: {}",
                            l.name,
                            crate::error_chain(&e)
                        ),
                    }
                }
            }
        }
        Ok(Reconciled {
            released,
            bridge_index: exists(&doc.config.bridge)?,
            retired_pending: !doc.retired.is_empty(),
        })
    }
}

/// What a reconcile found.
pub(super) struct Reconciled {
    pub(super) released: Vec<Released>,
    pub(super) bridge_index: Option<u32>,
    /// Retired links wait on record: the command starts the reaper once it unlocks.
    pub(super) retired_pending: bool,
}
