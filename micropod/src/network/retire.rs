//! Retired links: how `detach` takes an endpoint's link out of service at once and leaves its
//! deletion to the reaper.
//!
//! Deleting a link costs 16-20 ms, most of it the RCU grace periods of the kernel's unregister
//! path, and holds the RTNL lock throughout. Taking it down, off the bridge and renaming it
//! costs well under a millisecond, and from then on it passes no frame and its name and
//! address are free for the next endpoint. So detach retires the link and records it (a file
//! under `retired/`, see `store.rs`); the reaper (`micropod network reap`, started in the background
//! by the CLI, or run inline by library users) deletes every retired link in one request (a
//! device group, which the kernel unregisters as one batch) and drops their records.

use std::{collections::BTreeSet, path::PathBuf};

use super::{NetworkError, model::*};
use crate::{
    failpoint,
    net::{
        Netlink,
        link::{self, IndexProbe, LinkError},
    },
    state::StateLock,
};

/// What a command leaves for after it releases the state lock.
#[derive(Debug, Default)]
pub(super) struct Later {
    /// Retired links wait on record: start the reaper.
    pub(super) reap: bool,
    /// The pool is below its size: start a refill.
    pub(super) refill: bool,
}

/// The hidden CLI subcommand that runs a reaper: `micropod network reap`.
pub const REAP_COMMAND: &str = "reap";

/// How many taken names a detach tries before giving up (names are free unless someone made
/// `mpr…` links by hand).
const RENAME_ATTEMPTS: u32 = 16;

impl super::Network {
    /// Deletes retired links in a background `exe network reap` (the micropod binary) rather
    /// than inline at the end of the command that retired them.
    #[must_use]
    pub fn reap_in_background(mut self, exe: impl Into<PathBuf>) -> Self {
        self.reaper_exe = Some(exe.into());
        self
    }

    /// A name for a retired link of `ip` that neither the records nor the kernel use: the
    /// lowest free generation (a link of `ip` retired a moment ago may still be waiting), past
    /// `after` if given (a name the kernel just refused).
    pub(super) fn next_retired_name(
        &self,
        ip: std::net::Ipv4Addr,
        probe: &IndexProbe,
        after: Option<&str>,
    ) -> Result<String, NetworkError> {
        next_free_retired_name(ip, after, |name| {
            Ok(self.records.is_retired(name)?
                || probe.index(name).map_err(NetworkError::Probe)?.is_some())
        })
    }

    /// Detach's kernel step: the link goes down, off the bridge and into the retired group in
    /// one request, then takes the retired name (the kernel renames only links that are down).
    /// Returns whether the link is there under its retired name (false: it was gone already).
    /// A taken name makes it try the next one, recorded in the intent first.
    pub(super) async fn retire_link(
        &self,
        nl: &Netlink,
        lock: &StateLock,
        probe: &IndexProbe,
        intent: &mut DetachIntent,
    ) -> Result<bool, NetworkError> {
        let ep = &intent.endpoint;
        let Some(index) = probe.index(&ep.link).map_err(NetworkError::Probe)? else {
            return Ok(false);
        };
        let retire = |source: LinkError| NetworkError::RetireLink {
            name: ep.link.clone(),
            source: Box::new(source),
        };
        match link::set_down_nomaster(nl, &ep.link, index, RETIRED_LINK_GROUP).await {
            Ok(()) => {}
            Err(e) if e.is_gone() => return Ok(false),
            Err(e) => return Err(retire(e)),
        }
        let mut attempts = 0;
        loop {
            match link::rename(nl, &ep.link, index, &intent.retired).await {
                Ok(()) => return Ok(true),
                Err(e) if e.is_gone() => return Ok(false),
                Err(e) if e.is_exists() && attempts < RENAME_ATTEMPTS => {
                    attempts += 1;
                    intent.retired = self.next_retired_name(ep.ip, probe, Some(&intent.retired))?;
                    self.state.write_slot(lock, DETACH_INTENT, intent)?;
                }
                Err(e) => return Err(retire(e)),
            }
        }
    }

    /// Finishes a detach that died (see [`DETACH_INTENT`]), whatever step it reached: the link
    /// may have its old name, the retired one or be gone, the record may or may not be gone.
    /// Returns whether the endpoint was still recorded (and is now released).
    pub(super) async fn finish_detach(
        &self,
        nl: &Netlink,
        lock: &StateLock,
        probe: &IndexProbe,
        head: &NetworkHead,
        mut intent: DetachIntent,
    ) -> Result<bool, NetworkError> {
        let ep = intent.endpoint.clone();
        let recorded = self.records.endpoint(&ep.name)?.as_ref() == Some(&ep);
        let kept = if recorded {
            match self.retire_link(nl, lock, probe, &mut intent).await {
                Ok(kept) => {
                    kept || probe
                        .index(&intent.retired)
                        .map_err(NetworkError::Probe)?
                        .is_some()
                }
                Err(e) => {
                    // Whatever stopped the retire, deleting it outright still works.
                    log::warn!(
                        "cannot retire {}: {}; deleting it now",
                        ep.link,
                        crate::error_chain(&e)
                    );
                    super::delete_link(nl, &ep.link).await?;
                    false
                }
            }
        } else {
            probe
                .index(&intent.retired)
                .map_err(NetworkError::Probe)?
                .is_some()
        };
        if recorded {
            self.forget_datapath(head, ep.ip, &ep.link, None);
        }
        if kept {
            self.records.add_retired(
                lock,
                &RetiredLink {
                    name: intent.retired.clone(),
                    ip: ep.ip,
                },
            )?;
        }
        // Either step may be the one the detach died before.
        self.records.release_endpoint(lock, &ep)?;
        self.state.clear_slot(lock, DETACH_INTENT)?;
        log::info!("finished the interrupted detach of {}", ep.name);
        Ok(recorded)
    }

    /// Runs a command's work under the state lock (`locked` says what is left for later:
    /// retired links waiting on record, a pool below its size), then, with the lock released,
    /// starts that work.
    pub(super) async fn reaping<T>(&self, locked: impl AsyncFnOnce(&mut Later) -> T) -> T {
        let mut later = Later::default();
        let out = locked(&mut later).await;
        if later.reap {
            self.reap_later().await;
        }
        if later.refill {
            self.refill_later().await;
        }
        out
    }

    /// After a command that found or made retired links, with the state lock released: starts
    /// the background reaper, or reaps inline. Failures are logged: the detach itself is done,
    /// and `micropod gc` deletes what is left.
    pub(super) async fn reap_later(&self) {
        match &self.reaper_exe {
            Some(exe) => {
                if let Err(e) = self.spawn_job(exe, REAP_COMMAND, REAPER_LOG) {
                    log::warn!(
                        "cannot start the reaper {}: {e}; `micropod gc` deletes the retired links",
                        exe.display()
                    );
                }
            }
            None => {
                if let Err(e) = self.reap().await {
                    log::warn!(
                        "cannot delete the retired links: {}; `micropod gc` retries",
                        crate::error_chain(&e)
                    );
                }
            }
        }
    }

    /// `micropod network reap`: deletes the retired links on record until there are none.
    /// One reaper at a time (its own lock, not the state lock, which it takes only to read and
    /// update the record); returns at once if another runs. Returns how many it deleted.
    pub async fn reap(&self) -> Result<usize, NetworkError> {
        let nl = Netlink::connect().map_err(NetworkError::Netlink)?;
        let mut deleted = 0;
        // Links that would not go: left on record for `gc`, not retried in a loop.
        let mut failed = BTreeSet::new();
        loop {
            let Some(reaper) = self.state.try_lock_file(REAPER_LOCK)? else {
                return Ok(deleted);
            };
            loop {
                let names = self.retired_on_record(&failed)?;
                if names.is_empty() {
                    break;
                }
                failpoint::hit("reap:read");
                let mut gone = BTreeSet::new();
                for (name, result) in delete_retired(&nl, &names).await {
                    match result {
                        Ok(()) => {
                            gone.insert(name);
                        }
                        Err(e) => {
                            log::warn!("cannot delete {name}: {}", crate::error_chain(&e));
                            failed.insert(name);
                        }
                    }
                }
                failpoint::hit("reap:deleted");
                let Some(lock) = self.state.lock_existing()? else {
                    return Ok(deleted);
                };
                for name in &gone {
                    self.records.remove_retired(&lock, name)?;
                }
                drop(lock);
                deleted += gone.len();
            }
            drop(reaper);
            // A detach that retired a link after the last read may have started a reaper that
            // found the lock taken: look once more, now that the lock is free.
            if self.retired_on_record(&failed)?.is_empty() {
                return Ok(deleted);
            }
        }
    }

    /// The retired links on record, but for `skip`.
    fn retired_on_record(&self, skip: &BTreeSet<String>) -> Result<Vec<String>, NetworkError> {
        Ok(self
            .records
            .retired_names()?
            .into_iter()
            .filter(|n| !skip.contains(n))
            .collect())
    }

    /// Deletes the retired links on record now, under the lock (`gc`, and an attach whose
    /// interface name inside a namespace is still held by a retired veth's peer). Returns the
    /// failures; the links that went are dropped from the records and from `doc`.
    pub(super) async fn reap_now(
        &self,
        nl: &Netlink,
        lock: &StateLock,
        doc: &mut NetworkDoc,
    ) -> Result<Vec<(String, LinkError)>, NetworkError> {
        let names = self.records.retired_names()?;
        let mut failures = Vec::new();
        if names.is_empty() {
            return Ok(failures);
        }
        let mut gone = BTreeSet::new();
        for (name, result) in delete_retired(nl, &names).await {
            match result {
                Ok(()) => {
                    self.records.remove_retired(lock, &name)?;
                    gone.insert(name);
                }
                Err(e) => failures.push((name, e)),
            }
        }
        doc.retired.retain(|r| !gone.contains(&r.name));
        Ok(failures)
    }
}

/// The lowest generation of a retired name for `ip` that `taken` does not refuse, past
/// `after` if given.
fn next_free_retired_name(
    ip: std::net::Ipv4Addr,
    after: Option<&str>,
    mut taken: impl FnMut(&str) -> Result<bool, NetworkError>,
) -> Result<String, NetworkError> {
    let first = after
        .and_then(retired_link)
        .map_or(0, |(_, generation)| u32::from(generation) + 1);
    for generation in first..=u32::from(u16::MAX) {
        let generation = u16::try_from(generation).expect("in range");
        let name = retired_link_name(ip, generation);
        if !taken(&name)? {
            return Ok(name);
        }
    }
    Err(NetworkError::RetiredNamesExhausted { ip })
}

/// Deletes the links `names` (retired ones): first the whole retired group in one request,
/// then one by one whatever is still there. A link already gone counts as deleted.
pub(super) async fn delete_retired(
    nl: &Netlink,
    names: &[String],
) -> Vec<(String, Result<(), LinkError>)> {
    if let Err(e) = link::delete_group(nl, RETIRED_LINK_GROUP).await {
        log::debug!(
            "cannot delete the retired group at once: {}; one by one",
            crate::error_chain(&e)
        );
    }
    // Without the probe, a netlink lookup per name does the same.
    let probe = IndexProbe::new().ok();
    let mut results = Vec::with_capacity(names.len());
    for name in names {
        let result = match probe.as_ref().map(|p| p.index(name)) {
            Some(Ok(None)) => Ok(()),
            _ => link::delete_if_exists(nl, name).await.map(drop),
        };
        results.push((name.clone(), result));
    }
    results
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn retired_names_skip_those_taken_and_those_refused() {
        let ip = Ipv4Addr::new(10, 10, 0, 2);
        let name = |after, taken: &[&str]| {
            next_free_retired_name(ip, after, |n| Ok(taken.contains(&n))).unwrap()
        };
        assert_eq!(name(None, &[]), "mpr0a0a00020000");
        assert_eq!(name(Some("mpr0a0a00020003"), &[]), "mpr0a0a00020004");
        assert_eq!(name(None, &["mpr0a0a00020000"]), "mpr0a0a00020001");
        assert!(matches!(
            next_free_retired_name(ip, Some("mpr0a0a0002ffff"), |_| Ok(false)),
            Err(NetworkError::RetiredNamesExhausted { .. })
        ));
    }
}
