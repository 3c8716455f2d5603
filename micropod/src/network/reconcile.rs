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
        // No refill runs during the sweep, which deletes unrecorded pooled TAPs (see `up`).
        let _refill = self.state.lock_file(REFILL_LOCK)?;
        let lock = self.state.lock()?;
        let Some((doc, seen)) = self.reconcile_all(&nl, &lock, true).await? else {
            return Ok(Vec::new());
        };
        let released = seen.released;
        if doc.head.active_datapath == ActiveDatapath::Ebpf {
            if DataPlane::new(&self.bpf_dir).is_installed() {
                self.rehook_ports(&nl, &doc).await?;
            }
            match DataPlane::new(&self.bpf_dir).sweep_nat() {
                Ok(n) if n > 0 => log::info!("removed {n} expired NAT entries"),
                Ok(_) => {}
                Err(e) => log::warn!("cannot sweep the NAT table: {}", crate::error_chain(&e)),
            }
        }
        Ok(released)
    }

    /// Finishes or undoes the command that died holding the lock, if any (its intent is on
    /// record): the part of the reconcile every mutating command runs. Costs a few `stat`s
    /// however many endpoints there are; what the kernel did to the endpoints on its own
    /// (a namespace deleted, a link removed by hand) is [`Self::reconcile_all`]'s.
    pub(super) async fn recover(
        &self,
        nl: &Netlink,
        lock: &StateLock,
        head: &NetworkHead,
    ) -> Result<Vec<Released>, NetworkError> {
        let mut released = Vec::new();
        // A detach that died: finish it.
        if let Some(intent) = self.state.read_slot::<DetachIntent>(lock, DETACH_INTENT)? {
            let probe = link::IndexProbe::new().map_err(NetworkError::Probe)?;
            let (name, ip, link) = (
                intent.endpoint.name.clone(),
                intent.endpoint.ip,
                intent.endpoint.link.clone(),
            );
            if self.finish_detach(nl, lock, &probe, head, intent).await? {
                released.push(Released {
                    name,
                    ip: Some(ip),
                    link: Some(link),
                    reason: "its detach was interrupted".into(),
                });
            }
        }
        // An attach that died: undo what it made, unless it got as far as recording it.
        if let Some(intent) = self.state.read_slot::<Endpoint>(lock, ATTACH_INTENT)? {
            let recorded = self.records.endpoint(&intent.name)?.as_ref() == Some(&intent);
            if !recorded {
                super::delete_link(nl, &intent.link).await?;
                self.forget_datapath(head, intent.ip, &intent.link, None);
                self.records
                    .release_address(lock, intent.ip, &intent.name)?;
                log::info!("undid the interrupted attach of {}", intent.name);
                released.push(Released {
                    name: intent.name,
                    ip: Some(intent.ip),
                    link: Some(intent.link),
                    reason: "its attach was interrupted".into(),
                });
            }
            self.state.clear_slot(lock, ATTACH_INTENT)?;
        }
        Ok(released)
    }

    /// Brings every record in line with the kernel, and returns them all (`None`: no network
    /// on record): [`Self::recover`], then one `SIOCGIFINDEX` and one `stat` per endpoint,
    /// releasing those whose link or namespace is gone. For the commands that look at every
    /// endpoint anyway (`up`, `down`, `gc`) and for an attach that found the subnet full.
    /// `sweep` (for `micropod gc`) also deletes the retired links on record and dumps every
    /// link to find micropod-named links without a record.
    pub(super) async fn reconcile_all(
        &self,
        nl: &Netlink,
        lock: &StateLock,
        sweep: bool,
    ) -> Result<Option<(NetworkDoc, Reconciled)>, NetworkError> {
        let Some(head) = self.records.head(lock)? else {
            return Ok(None);
        };
        let mut released = self.recover(nl, lock, &head).await?;
        let (mut doc, unreadable) = self.records.load_locked(lock, head)?;
        for u in unreadable {
            // What a power cut left half-written: the objects it described died with it.
            self.records.drop_unreadable(lock, &u)?;
            log::warn!(
                "dropped the unreadable record {}/{}: {}",
                u.shelf,
                u.name,
                u.why
            );
            released.push(Released {
                name: u.name.trim_end_matches(".json").to_owned(),
                ip: u.name.parse().ok(),
                link: None,
                reason: format!(
                    "its record {}/{} was unreadable ({})",
                    u.shelf, u.name, u.why
                ),
            });
        }
        let probe = link::IndexProbe::new().map_err(NetworkError::Probe)?;
        let mut stale = Vec::new();
        for ep in doc.endpoints.values() {
            if let Some(reason) = gone_reason(&probe, ep)? {
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
            self.forget_datapath(&doc.head, ep.ip, &ep.link, None);
            self.records.release_endpoint(lock, &ep)?;
            if let Some((_, Err(e))) = doc.release_endpoint(&ep.name) {
                log::warn!("stale endpoint {}: {e}", ep.name);
            }
            log::info!("released endpoint {} ({}): {reason}", ep.name, ep.ip);
            released.push(Released {
                name: ep.name,
                ip: Some(ep.ip),
                link: Some(ep.link),
                reason: reason.into(),
            });
        }
        // Pooled TAPs deleted behind our back.
        let mut vanished = Vec::new();
        for p in &doc.pool {
            if probe.index(&p.name).map_err(NetworkError::Probe)?.is_none() {
                self.records.remove_pooled(lock, &p.name)?;
                vanished.push(p.name.clone());
            }
        }
        doc.pool.retain(|p| !vanished.contains(&p.name));
        // Addresses held by no endpoint: an attach that died between claiming the address and
        // writing its intent cannot happen (the intent comes first), but a power cut can.
        let leaked: Vec<_> = doc
            .ipam
            .allocations()
            .filter(|(_, owner)| !doc.endpoints.contains_key(*owner))
            .map(|(ip, owner)| (ip, owner.to_owned()))
            .collect();
        for (ip, owner) in leaked {
            self.records.drop_address(lock, ip)?;
            let _ = doc.ipam.release(ip);
            released.push(Released {
                name: owner,
                ip: Some(ip),
                link: None,
                reason: "its address had no endpoint record".into(),
            });
        }
        if sweep {
            for (name, e) in self.reap_now(nl, lock, &mut doc).await? {
                log::warn!("cannot delete retired {name}: {}", crate::error_chain(&e));
            }
            // Links named for an address of our subnet that no record owns (left by a crash
            // micropod could not record, or by hand), and pooled TAPs of our subnet a refill
            // killed half-way did not record (`sweep` is gc's, which holds the refill lock).
            let subnet = doc.head.config.subnet;
            let links = link::list(nl)
                .await
                .map_err(|e| NetworkError::Links(Box::new(e)))?;
            for l in links {
                let ip =
                    endpoint_link_ip(&l.name).or_else(|| retired_link(&l.name).map(|(ip, _)| ip));
                let pooled = pool_link(&l.name).is_some_and(|(net, _)| net == subnet.network());
                let ours = pooled || ip.is_some_and(|ip| subnet.contains(ip));
                let recorded = doc.endpoints.values().any(|ep| ep.link == l.name)
                    || doc.retired.iter().any(|r| r.name == l.name)
                    || doc.pool.iter().any(|p| p.name == l.name);
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
        let seen = Reconciled {
            released,
            retired_pending: !doc.retired.is_empty(),
        };
        Ok(Some((doc, seen)))
    }
}

/// Why an endpoint on record no longer exists in the kernel, if it does not.
pub(super) fn gone_reason(
    probe: &link::IndexProbe,
    ep: &Endpoint,
) -> Result<Option<&'static str>, NetworkError> {
    Ok(
        if probe
            .index(&ep.link)
            .map_err(NetworkError::Probe)?
            .is_none()
        {
            Some("its link vanished")
        } else if ep.netns.as_ref().is_some_and(|n| !netns_alive(n)) {
            Some("its network namespace is gone")
        } else {
            None
        },
    )
}

/// What a reconcile found.
pub(super) struct Reconciled {
    pub(super) released: Vec<Released>,
    /// Retired links wait on record: the command starts the reaper once it unlocks.
    pub(super) retired_pending: bool,
}
