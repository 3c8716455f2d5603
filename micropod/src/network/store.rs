//! The network's records in the state dir, one file per object, so that an attach or a detach
//! reads and writes the same few small files at the 1000th endpoint as at the first:
//! - [`STATE_DOC`]: the network ([`NetworkHead`]), written by `up` only, synced;
//! - `endpoints/<name>.json`: one [`Endpoint`] each;
//! - `addresses/<ip>`: the endpoint name holding that address (the IPAM's allocations), with
//!   [`LOWEST_FREE`] a lower bound of the lowest free address, so that picking the next address
//!   stats one file rather than all of them;
//! - `retired/<link>`: a [`RetiredLink`] waiting for the reaper;
//! - `pool/<link>`: a [`PooledTap`] waiting for an attach, written once the TAP is complete.
//!
//! The records are shelves ([`crate::state::Shelf`]): atomic renames, not synced, because they
//! describe links and namespaces that a power cut destroys too. Whatever a power cut left
//! unreadable is dropped by the next full reconcile.
//!
//! Order of writes, so that every crash leaves a state the next command can finish or undo (see
//! the intents in `mod.rs`): an address is claimed before its endpoint is recorded and freed
//! after the record is removed; the bound is lowered before an address is freed.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::Deserialize;

use super::{NetworkError, model::*};
use crate::{
    ipam::{Ipam, IpamError},
    state::{Shelf, ShelfEntry, StateDir, StateLock},
};

pub const ENDPOINTS_SHELF: &str = "endpoints";
pub const ADDRESSES_SHELF: &str = "addresses";
pub const RETIRED_SHELF: &str = "retired";
pub const POOL_SHELF: &str = "pool";
/// Every host address below the one recorded here is taken (a hint; never synced).
pub const LOWEST_FREE: &str = "lowest-free";

/// A record that could not be read, for the reconcile to drop.
#[derive(Clone, Debug)]
pub(super) struct Unreadable {
    pub(super) shelf: &'static str,
    pub(super) name: String,
    pub(super) why: String,
}

/// [`STATE_DOC`] as read: version 1 documents also held the records.
#[derive(Deserialize)]
struct HeadFile {
    #[serde(flatten)]
    head: NetworkHead,
    #[serde(default)]
    ipam: Option<Ipam>,
    #[serde(default)]
    endpoints: Option<BTreeMap<String, Endpoint>>,
    #[serde(default)]
    retired: Option<Vec<RetiredLink>>,
}

impl HeadFile {
    fn is_legacy(&self) -> bool {
        self.ipam.is_some() || self.endpoints.is_some() || self.retired.is_some()
    }
}

/// The oldest [`STATE_DOC`] version this build reads (version 1 is migrated when read under
/// the lock); [`STATE_VERSION`] is the newest.
pub(super) const OLDEST_STATE_VERSION: u32 = 1;

/// Checks the version of the [`STATE_DOC`] at `path` before its fields are read: another
/// version's fields may mean something else (or not parse), and a newer micropod's document
/// must not be rewritten by an older one.
fn check_version(path: std::path::PathBuf, raw: &serde_json::Value) -> Result<(), NetworkError> {
    let found = raw.get("version").and_then(serde_json::Value::as_u64);
    let found = found.map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX));
    let (oldest, newest) = (OLDEST_STATE_VERSION, STATE_VERSION);
    if found > newest {
        Err(NetworkError::StateTooNew {
            path,
            found,
            oldest,
            newest,
        })
    } else if found < oldest {
        Err(NetworkError::StateVersionUnknown {
            path,
            found,
            oldest,
            newest,
        })
    } else {
        Ok(())
    }
}

/// The records of one state dir.
#[derive(Clone, Debug)]
pub(super) struct Records {
    state: StateDir,
    endpoints: Shelf,
    addresses: Shelf,
    retired: Shelf,
    pool: Shelf,
}

fn endpoint_file(name: &str) -> String {
    format!("{name}.json")
}

impl Records {
    pub(super) fn new(state: &StateDir) -> Self {
        let shelf = |dir| state.shelf(dir).expect("shelf names are valid");
        Self {
            state: state.clone(),
            endpoints: shelf(ENDPOINTS_SHELF),
            addresses: shelf(ADDRESSES_SHELF),
            retired: shelf(RETIRED_SHELF),
            pool: shelf(POOL_SHELF),
        }
    }

    /// [`STATE_DOC`] as it is, its version checked; `lock` if the caller holds it.
    fn head_file(&self, lock: Option<&StateLock>) -> Result<Option<HeadFile>, NetworkError> {
        let raw: Option<serde_json::Value> = match lock {
            Some(lock) => self.state.read_json(lock, STATE_DOC)?,
            None => self.state.read_json_unlocked(STATE_DOC)?,
        };
        let Some(raw) = raw else {
            return Ok(None);
        };
        let path = self.state.root().join(STATE_DOC);
        check_version(path.clone(), &raw)?;
        Ok(Some(serde_json::from_value(raw).map_err(|source| {
            crate::state::StateError::Parse { path, source }
        })?))
    }

    /// The network, under the lock; a version 1 document has its records moved out first.
    pub(super) fn head(&self, lock: &StateLock) -> Result<Option<NetworkHead>, NetworkError> {
        let Some(file) = self.head_file(Some(lock))? else {
            return Ok(None);
        };
        if !file.is_legacy() {
            return Ok(Some(file.head));
        }
        let mut head = file.head;
        for ep in file.endpoints.unwrap_or_default().values() {
            self.put_endpoint(lock, ep)?;
        }
        for (ip, owner) in file.ipam.iter().flat_map(Ipam::allocations) {
            self.claim_address(lock, ip, owner, false)?;
        }
        for r in file.retired.unwrap_or_default() {
            self.add_retired(lock, &r)?;
        }
        head.version = STATE_VERSION;
        self.write_head(lock, &head)?;
        log::info!("moved the records of {STATE_DOC} into files of their own");
        Ok(Some(head))
    }

    /// [`Self::head`] of a network whose `up` finished.
    pub(super) fn ready_head(&self, lock: &StateLock) -> Result<NetworkHead, NetworkError> {
        match self.head(lock)? {
            Some(head) if head.phase == Phase::Ready => Ok(head),
            _ => Err(NetworkError::NotUp {
                state_dir: self.state.root().to_path_buf(),
            }),
        }
    }

    pub(super) fn write_head(
        &self,
        lock: &StateLock,
        head: &NetworkHead,
    ) -> Result<(), NetworkError> {
        Ok(self.state.write_json(lock, STATE_DOC, head)?)
    }

    /// Removes the network and all its records (`down`, and `up` replacing a network).
    pub(super) fn remove_all(&self, lock: &StateLock) -> Result<(), NetworkError> {
        for shelf in [&self.endpoints, &self.addresses, &self.retired, &self.pool] {
            shelf.remove_all(lock)?;
        }
        self.state.remove_spares(lock)?;
        for file in [LOWEST_FREE, ATTACH_INTENT, DETACH_INTENT] {
            self.state.remove_unsynced(lock, file)?;
        }
        self.state.remove(lock, STATE_DOC)?;
        Ok(())
    }

    /// Everything, read without the lock (status, stats, metrics): `None` if no network is up.
    /// Unreadable records are left out, with a warning.
    pub(super) fn load_unlocked(&self) -> Result<Option<NetworkDoc>, NetworkError> {
        let Some(file) = self.head_file(None)? else {
            return Ok(None);
        };
        if file.is_legacy() {
            return Ok(Some(NetworkDoc {
                ipam: file.ipam.unwrap_or_else(|| file.head.ipam_rules()),
                endpoints: file.endpoints.unwrap_or_default(),
                retired: file.retired.unwrap_or_default(),
                pool: Vec::new(),
                head: file.head,
            }));
        }
        let (doc, unreadable) = self.load(file.head)?;
        for u in unreadable {
            log::warn!(
                "skipping the unreadable record {}/{}: {}",
                u.shelf,
                u.name,
                u.why
            );
        }
        Ok(Some(doc))
    }

    /// Every record of the network `head` (read with [`Self::head`]), under the lock, with
    /// those that could not be read.
    pub(super) fn load_locked(
        &self,
        lock: &StateLock,
        head: NetworkHead,
    ) -> Result<(NetworkDoc, Vec<Unreadable>), NetworkError> {
        for shelf in [&self.endpoints, &self.addresses, &self.retired, &self.pool] {
            shelf.remove_stale_temps(lock);
        }
        self.load(head)
    }

    fn load(&self, head: NetworkHead) -> Result<(NetworkDoc, Vec<Unreadable>), NetworkError> {
        let mut unreadable = Vec::new();
        let endpoints = read_named(
            &self.endpoints,
            ENDPOINTS_SHELF,
            |ep: &Endpoint| (endpoint_file(&ep.name), "endpoint", ep.name.clone()),
            Endpoint::foreign_link,
            &mut unreadable,
        )?
        .into_iter()
        .map(|ep| (ep.name.clone(), ep))
        .collect();
        let mut ipam = head.ipam_rules();
        for (file, entry) in self.addresses.read_all::<String>()? {
            let result = match (file.parse::<Ipv4Addr>(), entry) {
                (Ok(ip), ShelfEntry::Ok(owner)) => ipam
                    .allocate(&owner, Some(ip))
                    .map(drop)
                    .map_err(|e| e.to_string()),
                (Err(e), _) => Err(format!("not an address: {e}")),
                (_, ShelfEntry::Unreadable(e)) => Err(e.to_string()),
            };
            if let Err(why) = result {
                unreadable.push(Unreadable {
                    shelf: ADDRESSES_SHELF,
                    name: file,
                    why,
                });
            }
        }
        // A retired or pooled link is deleted by name: only names micropod gives count.
        let retired = read_named(
            &self.retired,
            RETIRED_SHELF,
            |r: &RetiredLink| (r.name.clone(), "link", r.name.clone()),
            |r| not_ours(&r.name, retired_link(&r.name).is_some()),
            &mut unreadable,
        )?;
        let pool = read_named(
            &self.pool,
            POOL_SHELF,
            |p: &PooledTap| (p.name.clone(), "link", p.name.clone()),
            |p| not_ours(&p.name, pool_link(&p.name).is_some()),
            &mut unreadable,
        )?;
        Ok((
            NetworkDoc {
                head,
                ipam,
                endpoints,
                retired,
                pool,
            },
            unreadable,
        ))
    }

    /// Drops a record [`Self::load_locked`] could not read.
    pub(super) fn drop_unreadable(
        &self,
        lock: &StateLock,
        u: &Unreadable,
    ) -> Result<(), NetworkError> {
        let shelf = match u.shelf {
            ENDPOINTS_SHELF => &self.endpoints,
            ADDRESSES_SHELF => &self.addresses,
            POOL_SHELF => &self.pool,
            _ => &self.retired,
        };
        shelf.remove(lock, &u.name)?;
        Ok(())
    }

    /// The endpoint called `name`, if recorded; an unreadable record reads as absent.
    pub(super) fn endpoint(&self, name: &str) -> Result<Option<Endpoint>, NetworkError> {
        Ok(
            match self.endpoints.read::<Endpoint>(&endpoint_file(name))? {
                Some(ShelfEntry::Ok(ep)) if ep.name == name => match ep.foreign_link() {
                    None => Some(ep),
                    Some(why) => {
                        log::warn!(
                            "ignoring the record of endpoint {name}: {why} (`micropod gc` drops it)"
                        );
                        None
                    }
                },
                _ => None,
            },
        )
    }

    pub(super) fn put_endpoint(&self, lock: &StateLock, ep: &Endpoint) -> Result<(), NetworkError> {
        Ok(self.endpoints.write(lock, &endpoint_file(&ep.name), ep)?)
    }

    pub(super) fn remove_endpoint(&self, lock: &StateLock, name: &str) -> Result<(), NetworkError> {
        self.endpoints.remove(lock, &endpoint_file(name))?;
        Ok(())
    }

    /// Who holds `ip`; an unreadable record counts as held (by nobody known), so that the
    /// address is not handed out before a reconcile looked at it.
    pub(super) fn owner(&self, ip: Ipv4Addr) -> Result<Option<String>, NetworkError> {
        Ok(match self.addresses.read::<String>(&ip.to_string())? {
            None => None,
            Some(ShelfEntry::Ok(owner)) => Some(owner),
            Some(ShelfEntry::Unreadable(_)) => Some(String::new()),
        })
    }

    /// The bound, if recorded and readable (without it the walk starts at the bottom).
    fn lowest_free(&self, lock: &StateLock) -> Option<Ipv4Addr> {
        self.state.read_hint(lock, LOWEST_FREE)?.parse().ok()
    }

    fn set_lowest_free(&self, lock: &StateLock, ip: Ipv4Addr) -> Result<(), NetworkError> {
        Ok(self.state.write_hint(lock, LOWEST_FREE, &ip.to_string())?)
    }

    /// The address an attach of `owner` gets: `requested`, or the lowest free one.
    pub(super) fn pick_address(
        &self,
        lock: &StateLock,
        head: &NetworkHead,
        requested: Option<Ipv4Addr>,
        range: Option<(Ipv4Addr, Ipv4Addr)>,
    ) -> Result<Result<Ipv4Addr, IpamError>, NetworkError> {
        let from = self.lowest_free(lock);
        head.ipam_rules()
            .pick(requested, from, range, |ip| self.owner(ip))
    }

    /// Records `owner` as the holder of `ip`. `lowest` says [`Self::pick_address`] chose it as
    /// the lowest free address: every address up to it is now taken, so the bound moves past.
    pub(super) fn claim_address(
        &self,
        lock: &StateLock,
        ip: Ipv4Addr,
        owner: &str,
        lowest: bool,
    ) -> Result<(), NetworkError> {
        self.addresses.write(lock, &ip.to_string(), &owner)?;
        if lowest {
            let next = Ipv4Addr::from(u32::from(ip).saturating_add(1));
            self.set_lowest_free(lock, next)?;
        }
        Ok(())
    }

    /// Frees `ip` if `owner` holds it; returns whether it did.
    pub(super) fn release_address(
        &self,
        lock: &StateLock,
        ip: Ipv4Addr,
        owner: &str,
    ) -> Result<bool, NetworkError> {
        match self.owner(ip)? {
            Some(held) if held == owner => self.drop_address(lock, ip),
            _ => Ok(false),
        }
    }

    /// Forgets endpoint `ep` and frees its address, in that order.
    pub(super) fn release_endpoint(
        &self,
        lock: &StateLock,
        ep: &Endpoint,
    ) -> Result<(), NetworkError> {
        self.remove_endpoint(lock, &ep.name)?;
        self.release_address(lock, ep.ip, &ep.name)?;
        Ok(())
    }

    /// Frees an address whatever its record says (a leaked or unreadable one); returns
    /// whether it was recorded. The bound goes first: it must never pass a free address.
    pub(super) fn drop_address(
        &self,
        lock: &StateLock,
        ip: Ipv4Addr,
    ) -> Result<bool, NetworkError> {
        if self.lowest_free(lock).is_some_and(|low| low > ip) {
            self.set_lowest_free(lock, ip)?;
        }
        Ok(self.addresses.remove(lock, &ip.to_string())?)
    }

    /// The network as last written, without the lock (for the refill, which takes the lock
    /// only to record a TAP it made).
    pub(super) fn head_unlocked(&self) -> Result<Option<NetworkHead>, NetworkError> {
        Ok(self.head_file(None)?.map(|f| f.head))
    }

    /// The pooled TAPs on record, by name (no lock needed); only names micropod gives.
    pub(super) fn pool_names(&self) -> Result<Vec<String>, NetworkError> {
        let mut names = self.pool.names()?;
        names.retain(|n| pool_link(n).is_some());
        Ok(names)
    }

    /// The pooled TAP `name`, if on record and readable.
    pub(super) fn pooled(&self, name: &str) -> Result<Option<PooledTap>, NetworkError> {
        Ok(match self.pool.read::<PooledTap>(name)? {
            Some(ShelfEntry::Ok(p)) if p.name == name => Some(p),
            _ => None,
        })
    }

    pub(super) fn is_pooled(&self, name: &str) -> Result<bool, NetworkError> {
        Ok(self.pool.contains(name)?)
    }

    pub(super) fn add_pooled(&self, lock: &StateLock, p: &PooledTap) -> Result<(), NetworkError> {
        Ok(self.pool.write_off_path(lock, &p.name, p)?)
    }

    pub(super) fn remove_pooled(&self, lock: &StateLock, name: &str) -> Result<(), NetworkError> {
        self.pool.remove(lock, name)?;
        Ok(())
    }

    /// The names of the retired links on record (no lock needed); only names micropod gives.
    pub(super) fn retired_names(&self) -> Result<Vec<String>, NetworkError> {
        let mut names = self.retired.names()?;
        names.retain(|n| retired_link(n).is_some());
        Ok(names)
    }

    pub(super) fn is_retired(&self, name: &str) -> Result<bool, NetworkError> {
        Ok(self.retired.contains(name)?)
    }

    pub(super) fn add_retired(
        &self,
        lock: &StateLock,
        r: &RetiredLink,
    ) -> Result<(), NetworkError> {
        Ok(self.retired.write(lock, &r.name, r)?)
    }

    pub(super) fn remove_retired(&self, lock: &StateLock, name: &str) -> Result<(), NetworkError> {
        self.retired.remove(lock, name)?;
        Ok(())
    }
}

/// Why a record naming the link `name` is refused, unless `ours` (micropod gives that name).
fn not_ours(name: &str, ours: bool) -> Option<String> {
    (!ours).then(|| format!("it names the link {name:?}, which micropod does not name so"))
}

/// The documents of `shelf` whose file is named for what they record (`file_of` gives the
/// file name, a word for what it names, and that name) and that `refused` does not refuse
/// (it says why: a record naming a link micropod did not make); the others go to
/// `unreadable`.
fn read_named<T: serde::de::DeserializeOwned>(
    shelf: &Shelf,
    shelf_name: &'static str,
    file_of: impl Fn(&T) -> (String, &'static str, String),
    refused: impl Fn(&T) -> Option<String>,
    unreadable: &mut Vec<Unreadable>,
) -> Result<Vec<T>, NetworkError> {
    let mut found = Vec::new();
    for (file, entry) in shelf.read_all::<T>()? {
        let why = match entry {
            ShelfEntry::Ok(value) => {
                let (expected, what, name) = file_of(&value);
                if expected != file {
                    format!("it records {what} {name:?}")
                } else if let Some(why) = refused(&value) {
                    why
                } else {
                    found.push(value);
                    continue;
                }
            }
            ShelfEntry::Unreadable(e) => e.to_string(),
        };
        unreadable.push(Unreadable {
            shelf: shelf_name,
            name: file,
            why,
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(tempfile::TempDir, StateDir);

    fn dir() -> Dir {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        Dir(tmp, state)
    }

    fn v1_doc() -> serde_json::Value {
        serde_json::json!({
            "version": 1,
            "phase": "ready",
            "config": {
                "bridge": "micropod0",
                "subnet": "10.10.0.0/24",
                "gateway": "10.10.0.1",
                "uplink": null,
                "datapath": "netfilter",
            },
            "active_datapath": "netfilter",
            "nft_table": "micropod_micropod0",
            "ip_forward_was_off": false,
            "ipam": {"subnet": "10.10.0.0/24", "gateway": "10.10.0.1",
                     "allocations": {"10.10.0.2": "vm1"}},
            "endpoints": {"vm1": {"name": "vm1", "kind": "tap", "ip": "10.10.0.2",
                                  "mac": "02:6d:0a:0a:00:02", "link": "mpt-0a0a0002",
                                  "netns": null}},
            "retired": [{"name": "mpr0a0a00030000", "ip": "10.10.0.3"}],
        })
    }

    #[test]
    fn a_version_1_document_has_its_records_moved_out_when_read_under_the_lock() {
        let Dir(_tmp, state) = dir();
        let lock = state.lock().unwrap();
        state.write_json(&lock, STATE_DOC, &v1_doc()).unwrap();
        let records = Records::new(&state);
        // Readers without the lock see it as it is.
        let doc = records.load_unlocked().unwrap().unwrap();
        assert_eq!(doc.endpoints.len(), 1);
        let head = records.head(&lock).unwrap().unwrap();
        assert_eq!(head.version, STATE_VERSION);
        let raw: serde_json::Value = state.read_json(&lock, STATE_DOC).unwrap().unwrap();
        assert!(raw.get("endpoints").is_none(), "{raw}");
        let (doc, unreadable) = records.load_locked(&lock, head).unwrap();
        assert!(unreadable.is_empty());
        assert_eq!(doc.endpoints["vm1"].link, "mpt-0a0a0002");
        assert_eq!(doc.ipam.owner("10.10.0.2".parse().unwrap()), Some("vm1"));
        assert_eq!(doc.retired[0].name, "mpr0a0a00030000");
    }

    #[test]
    fn a_document_of_an_unknown_version_is_refused_by_every_reader() {
        let Dir(_tmp, state) = dir();
        let lock = state.lock().unwrap();
        let records = Records::new(&state);
        let mut doc = v1_doc();
        doc["version"] = (STATE_VERSION + 1).into();
        state.write_json(&lock, STATE_DOC, &doc).unwrap();
        let understood = format!("versions {OLDEST_STATE_VERSION} to {STATE_VERSION}");
        for err in [
            records.head(&lock).map(|_| ()).unwrap_err(),
            records.head_unlocked().map(|_| ()).unwrap_err(),
            records.load_unlocked().map(|_| ()).unwrap_err(),
        ] {
            let NetworkError::StateTooNew { found, .. } = &err else {
                panic!("{err:?}")
            };
            assert_eq!(*found, STATE_VERSION + 1);
            let said = err.to_string();
            assert!(said.contains("written by a newer micropod"), "{said}");
            assert!(said.contains(&understood), "{said}");
        }
        // Nothing was migrated or rewritten.
        let raw: serde_json::Value = state.read_json(&lock, STATE_DOC).unwrap().unwrap();
        assert_eq!(raw, doc);

        // Older than any micropod wrote, or no version at all.
        doc["version"] = 0.into();
        state.write_json(&lock, STATE_DOC, &doc).unwrap();
        let err = records.head(&lock).map(|_| ()).unwrap_err();
        assert!(
            matches!(err, NetworkError::StateVersionUnknown { found: 0, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(&understood), "{err}");
        doc.as_object_mut().unwrap().remove("version");
        state.write_json(&lock, STATE_DOC, &doc).unwrap();
        let err = records.head_unlocked().map(|_| ()).unwrap_err();
        assert!(
            matches!(err, NetworkError::StateVersionUnknown { .. }),
            "{err:?}"
        );
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_are_the_lowest_free_ones_and_a_freed_one_is_reused_first() {
        let Dir(_tmp, state) = dir();
        let lock = state.lock().unwrap();
        state.write_json(&lock, STATE_DOC, &v1_doc()).unwrap();
        let records = Records::new(&state);
        let head = records.head(&lock).unwrap().unwrap();
        let take = |owner: &str| {
            let got = records
                .pick_address(&lock, &head, None, None)
                .unwrap()
                .unwrap();
            records.claim_address(&lock, got, owner, true).unwrap();
            got
        };
        // .2 is vm1's (from the old document, no bound recorded yet).
        assert_eq!(take("a"), ip("10.10.0.3"));
        assert_eq!(take("b"), ip("10.10.0.4"));
        assert!(
            records
                .release_address(&lock, ip("10.10.0.3"), "a")
                .unwrap()
        );
        assert!(
            !records
                .release_address(&lock, ip("10.10.0.4"), "a")
                .unwrap(),
            "not a's"
        );
        assert_eq!(take("c"), ip("10.10.0.3"));
        assert_eq!(take("d"), ip("10.10.0.5"));
        assert!(matches!(
            records.pick_address(&lock, &head, Some(ip("10.10.0.5")), None).unwrap(),
            Err(IpamError::Taken { owner, .. }) if owner == "d"
        ));
        assert!(matches!(
            records
                .pick_address(&lock, &head, Some(ip("10.10.0.1")), None)
                .unwrap(),
            Err(IpamError::Reserved { .. })
        ));
        // A bound past a free address (it cannot happen, but it is only a hint) is survived.
        records
            .release_address(&lock, ip("10.10.0.2"), "vm1")
            .unwrap();
        records.set_lowest_free(&lock, ip("10.10.0.254")).unwrap();
        // A garbled one reads as none.
        state.write_hint(&lock, LOWEST_FREE, "10.10.0.").unwrap();
        assert_eq!(records.lowest_free(&lock), None);
        records.set_lowest_free(&lock, ip("10.10.0.254")).unwrap();
        assert_eq!(take("e"), ip("10.10.0.254"));
        assert_eq!(take("f"), ip("10.10.0.2"));
    }

    #[test]
    fn unreadable_records_are_reported_and_an_unreadable_address_is_not_handed_out() {
        let Dir(_tmp, state) = dir();
        let lock = state.lock().unwrap();
        state.write_json(&lock, STATE_DOC, &v1_doc()).unwrap();
        let records = Records::new(&state);
        let head = records.head(&lock).unwrap().unwrap();
        // What a power cut may leave: an empty file where a record was being written.
        std::fs::write(state.root().join(ADDRESSES_SHELF).join("10.10.0.3"), b"").unwrap();
        std::fs::write(state.root().join(ENDPOINTS_SHELF).join("x.json"), b"{").unwrap();
        assert_eq!(
            records
                .pick_address(&lock, &head, None, None)
                .unwrap()
                .unwrap(),
            ip("10.10.0.4")
        );
        let (doc, unreadable) = records.load_locked(&lock, head).unwrap();
        let mut names: Vec<_> = unreadable.iter().map(|u| u.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["10.10.0.3", "x.json"]);
        assert_eq!(doc.endpoints.len(), 1);
        for u in &unreadable {
            records.drop_unreadable(&lock, u).unwrap();
        }
        assert!(records.owner(ip("10.10.0.3")).unwrap().is_none());
    }
}
