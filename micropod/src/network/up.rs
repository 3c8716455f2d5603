//! `network up` and `network down`: the network-level kernel objects, made (`ensure`) and
//! removed (`teardown`).

use std::net::Ipv4Addr;

use ipnetwork::{IpNetwork, Ipv4Network};
use micropod_common::NAT_DEFAULT_ENTRIES;

use super::{
    InputError, NetworkError, TeardownError, UpDone, UpError, UpOutcome, UpRequest,
    check_privileges, model::*, parse_subnet,
};
use crate::{
    datapath::DataPlane,
    failpoint,
    ipam::Ipam,
    net::{Netlink, addr, bridge, link, nftables, route, sysctl},
};

impl super::Network {
    /// `network up`: the bridge with the gateway address, forwarding, the MASQUERADE fallback.
    /// Idempotent; refuses to change the settings of a network that has endpoints.
    pub async fn up(&self, req: &UpRequest) -> Result<(UpOutcome, NetworkConfig), NetworkError> {
        let done = self.up_reporting(req).await?;
        Ok((done.outcome, done.config))
    }

    /// [`Self::up`], with the endpoints its reconcile released (after a reboot: all of them).
    pub async fn up_reporting(&self, req: &UpRequest) -> Result<UpDone, NetworkError> {
        self.reaping(async |later| self.up_locked(req, later).await)
            .await
    }

    /// [`Self::up`] under the state lock; sets `reap` if retired links wait on record.
    async fn up_locked(
        &self,
        req: &UpRequest,
        later: &mut super::retire::Later,
    ) -> Result<UpDone, NetworkError> {
        check_privileges()?;
        link::validate_name(&req.bridge).map_err(|e| InputError::BridgeName(Box::new(e)))?;
        let subnet = parse_subnet(&req.subnet)?;
        let gateway = gateway_of(subnet, req.gateway)?;
        let no_masquerade = normalize_destinations(&req.no_masquerade);
        let nat_entries = req.nat_entries.unwrap_or(NAT_DEFAULT_ENTRIES);
        if !NAT_ENTRIES_RANGE.contains(&nat_entries) {
            return Err(InputError::NatEntries {
                value: nat_entries,
                min: *NAT_ENTRIES_RANGE.start(),
                max: *NAT_ENTRIES_RANGE.end(),
            }
            .into());
        }
        if let Some(value) = req.pool
            && value > MAX_POOL
        {
            return Err(InputError::Pool {
                value,
                max: MAX_POOL,
            }
            .into());
        }
        let nl = Netlink::connect().map_err(NetworkError::Netlink)?;
        // No refill starts while `up` may delete the pool (a new bridge, a replaced network);
        // one already running is not waited for: it records a TAP only for the network it
        // made it for, and deletes it otherwise. The refill lock comes before the state lock.
        let _refill = self.state.try_lock_file(REFILL_LOCK)?;
        let lock = self.state.lock()?;
        let mut released = Vec::new();
        let existing: Option<NetworkDoc> = match self.reconcile_all(&nl, &lock, false).await? {
            Some((doc, seen)) => {
                later.reap = seen.retired_pending;
                released = seen.released;
                Some(doc)
            }
            None => None,
        };
        let uplink = resolve_uplink(&nl, &req.uplink).await?;
        let recorded_ports = existing
            .as_ref()
            .filter(|d| {
                d.head.config.bridge == req.bridge && d.head.config.datapath == req.datapath
            })
            .and_then(|d| d.head.config.nat_ports);
        let nat_ports = choose_nat_ports(
            &nl,
            &req.bridge,
            req.datapath,
            req.nat_ports,
            recorded_ports,
        )
        .await?;
        let config = NetworkConfig {
            bridge: req.bridge.clone(),
            subnet,
            gateway,
            uplink,
            datapath: req.datapath,
            nat_entries,
            pool: req
                .pool
                .or_else(|| existing.as_ref().map(|d| d.head.config.pool))
                .unwrap_or(DEFAULT_POOL),
            nat_ports: Some(nat_ports),
            no_masquerade,
        };
        // The pool's size is not a setting of the network's shape: it changes in place.
        later.refill = config.pool > 0;

        if let Some(doc) = &existing {
            // `--uplink auto` follows the default route, so it is not a change of settings;
            // nor are the pool's size and the NAT ports (both change in place).
            let same = NetworkConfig {
                uplink: config.uplink.clone(),
                pool: config.pool,
                nat_ports: config.nat_ports,
                ..doc.head.config.clone()
            } == config
                && (req.uplink == UplinkChoice::Auto || doc.head.config.uplink == config.uplink);
            if same {
                // Same settings: put back whatever is missing (a crashed `up`, a deleted bridge).
                let mut doc = doc.clone();
                if self.ensure(&nl, &doc.head).await? {
                    // A new bridge: the pooled TAPs were ports of the old one. Made afresh.
                    self.trim_pool(&nl, &lock, &doc.pool, 0).await?;
                    doc.pool.clear();
                }
                let before = (doc.head.active_datapath, doc.head.datapath_note.clone());
                doc.head.config = config.clone();
                self.ensure_datapath(&nl, &mut doc).await?;
                if doc.head.phase != Phase::Ready
                    || existing
                        .as_ref()
                        .is_some_and(|old| old.head.config != config)
                    || before != (doc.head.active_datapath, doc.head.datapath_note.clone())
                {
                    doc.head.phase = Phase::Ready;
                    self.records.write_head(&lock, &doc.head)?;
                }
                self.trim_pool(&nl, &lock, &doc.pool, config.pool as usize)
                    .await?;
                self.ports_back_on_bridge(&nl, &doc).await?;
                return Ok(UpDone {
                    outcome: UpOutcome::Unchanged,
                    config,
                    released,
                });
            }
            if !doc.endpoints.is_empty() {
                return Err(UpError::Reconfigure {
                    current: doc.head.config.to_string(),
                    requested: config.to_string(),
                    endpoints: doc.endpoints.len(),
                }
                .into());
            }
        }

        // Everything that can refuse runs before the first change (the network being replaced,
        // if any, is not in the way of its successor).
        let old_bridge = existing.as_ref().map(|d| d.head.config.bridge.as_str());
        check_overlap(&nl, subnet, old_bridge).await?;
        if old_bridge != Some(config.bridge.as_str())
            && link::find(&nl, &config.bridge)
                .await
                .map_err(|e| NetworkError::Links(Box::new(e)))?
                .is_some()
        {
            return Err(UpError::BridgeExists {
                name: config.bridge,
            }
            .into());
        }
        let outcome = if let Some(doc) = existing {
            let problems = self.teardown(&nl, &doc).await;
            if !problems.is_empty() {
                return Err(NetworkError::Teardown(problems));
            }
            self.records.remove_all(&lock)?;
            later.reap = false;
            UpOutcome::Replaced
        } else {
            UpOutcome::Created
        };
        let ip_forward_was_off = !sysctl::ip_forward().map_err(UpError::Forwarding)?;
        let mut doc = NetworkDoc {
            head: NetworkHead {
                version: STATE_VERSION,
                phase: Phase::Creating,
                nft_table: nft_table_name(&config.bridge),
                active_datapath: ActiveDatapath::Netfilter,
                datapath_note: None,
                ip_forward_was_off,
                config: config.clone(),
            },
            ipam: Ipam::new(subnet, gateway).map_err(InputError::Subnet)?,
            endpoints: Default::default(),
            retired: Vec::new(),
            pool: Vec::new(),
        };
        // Recorded first: if we die half-way, the next `up` or `down` knows what is ours.
        self.records.write_head(&lock, &doc.head)?;
        failpoint::hit("up:recorded");
        let made = match self.ensure(&nl, &doc.head).await {
            Ok(_) => self.ensure_datapath(&nl, &mut doc).await,
            Err(err) => Err(err),
        };
        if let Err(err) = made {
            let problems = self.teardown(&nl, &doc).await;
            for p in &problems {
                log::warn!("while undoing a failed `up`: {}", crate::error_chain(p));
            }
            if problems.is_empty() {
                self.records.remove_all(&lock)?;
            }
            return Err(err);
        }
        failpoint::hit("up:made");
        doc.head.phase = Phase::Ready;
        self.records.write_head(&lock, &doc.head)?;
        Ok(UpDone {
            outcome,
            config,
            released,
        })
    }

    /// For commands that need the network (`micropod run`): brings it up when it is not —
    /// with the defaults when none is on record, with the recorded settings when its bridge
    /// is gone (a reboot: the records survive, the kernel's objects do not). Returns what it
    /// did, in one line, or `None` if the network was up (one read and one `ioctl`).
    pub async fn ensure_up(&self) -> Result<Option<String>, NetworkError> {
        if self.live_head()?.is_some() {
            return Ok(None);
        }
        let req = self.recorded_request()?.unwrap_or_default();
        let (outcome, config) = self.up(&req).await?;
        let active = self.records.head_unlocked()?.map_or_else(
            || "?".to_owned(),
            |h| match (h.active_datapath, &h.datapath_note) {
                // `auto` fell back: say why here too, `micropod run` prints no status.
                (ActiveDatapath::Netfilter, Some(note))
                    if h.config.datapath == DatapathMode::Auto =>
                {
                    format!("netfilter (auto: {note})")
                }
                (active, _) => active.to_string(),
            },
        );
        Ok(Some(match outcome {
            UpOutcome::Created => format!(
                "the network was not up: brought it up with the defaults ({config}, data path {active}); `micropod network up --help` to choose"
            ),
            UpOutcome::Unchanged | UpOutcome::Replaced => format!(
                "the network on record was not in the kernel (a reboot?): brought it up again ({config}, data path {active})"
            ),
        }))
    }

    /// For the CNI plugin's ADD: brings the network up as `req` says unless it is up already
    /// (one read and one `ioctl` then), and refuses a network that is up with other settings:
    /// one configuration's ADD must not change a network others' endpoints use.
    pub async fn join(&self, req: &UpRequest) -> Result<(), NetworkError> {
        if let Some(head) = self.live_head()? {
            let differences = differences(&head.config, req)?;
            if !differences.is_empty() {
                return Err(UpError::OtherSettings {
                    differences: differences.join("; "),
                }
                .into());
            }
            // Pins of another micropod's layout (this binary was upgraded): `up` upgrades
            // them in place, as an administrator's `network up` would.
            if head.active_datapath != ActiveDatapath::Ebpf
                || DataPlane::new(&self.bpf_dir).layout_matches()
            {
                return Ok(());
            }
        }
        // None up, or on record but not in the kernel (a reboot): `up` with the request, which
        // keeps what it can and refuses to change a network that still has endpoints on record.
        self.up(req).await.map(drop)
    }

    /// The network on record if it is up: ready, and its bridge in the kernel (one read and
    /// one `ioctl`).
    fn live_head(&self) -> Result<Option<NetworkHead>, NetworkError> {
        let Some(head) = self.records.head_unlocked()? else {
            return Ok(None);
        };
        let probe = link::IndexProbe::new().map_err(NetworkError::Probe)?;
        let bridge = probe
            .index(&head.config.bridge)
            .map_err(NetworkError::Probe)?;
        Ok((head.phase == Phase::Ready && bridge.is_some()).then_some(head))
    }

    /// The settings of the network on record, read without the lock; `None` if there is none.
    pub fn config(&self) -> Result<Option<NetworkConfig>, NetworkError> {
        Ok(self.records.head_unlocked()?.map(|h| h.config))
    }

    /// Whether the network on record has the settings `req` asks for ([`Self::join`]'s test,
    /// without bringing anything up).
    pub fn settings_match(&self, req: &UpRequest) -> Result<(), NetworkError> {
        let Some(head) = self.records.head_unlocked()? else {
            return Err(NetworkError::NotUp {
                state_dir: self.state.root().to_path_buf(),
            });
        };
        let differences = differences(&head.config, req)?;
        if differences.is_empty() {
            Ok(())
        } else {
            Err(UpError::OtherSettings {
                differences: differences.join("; "),
            }
            .into())
        }
    }

    /// The `up` request that brings the network on record back as it was (`network up
    /// --restore`, after a reboot); `None` when there is none on record.
    pub fn recorded_request(&self) -> Result<Option<UpRequest>, NetworkError> {
        Ok(self.records.head_unlocked()?.map(|head| {
            let cfg = head.config;
            UpRequest {
                bridge: cfg.bridge,
                subnet: cfg.subnet.to_string(),
                uplink: cfg.uplink.map_or(UplinkChoice::Auto, UplinkChoice::Named),
                datapath: cfg.datapath,
                nat_entries: Some(cfg.nat_entries),
                pool: Some(cfg.pool),
                nat_ports: cfg.nat_ports,
                gateway: Some(cfg.gateway),
                no_masquerade: cfg.no_masquerade,
            }
        }))
    }

    /// Puts every endpoint's link that is not a port of the bridge (the bridge was deleted
    /// and made anew, or a link was released by hand) back on it, and up: one link dump.
    async fn ports_back_on_bridge(
        &self,
        nl: &Netlink,
        doc: &NetworkDoc,
    ) -> Result<(), NetworkError> {
        if doc.endpoints.is_empty() {
            return Ok(());
        }
        let links = link::list(nl)
            .await
            .map_err(|e| NetworkError::Links(Box::new(e)))?;
        let Some(bridge) = links.iter().find(|l| l.name == doc.head.config.bridge) else {
            return Ok(());
        };
        let mut moved = 0;
        for ep in doc.endpoints.values() {
            let Some(port) = links.iter().find(|l| l.name == ep.link) else {
                continue;
            };
            if port.controller == Some(bridge.index) {
                continue;
            }
            link::set_controller_up(nl, &ep.link, bridge.index)
                .await
                .map_err(|source| UpError::PortBack {
                    endpoint: ep.name.clone(),
                    link: ep.link.clone(),
                    source: Box::new(source),
                })?;
            moved += 1;
        }
        if moved > 0 {
            log::info!(
                "put {moved} endpoint link(s) back on {}",
                doc.head.config.bridge
            );
        }
        Ok(())
    }

    /// Makes the kernel match `doc` (network level); creates only what is missing.
    /// Returns whether the bridge had to be made (anew, if it was deleted behind our back).
    async fn ensure(&self, nl: &Netlink, head: &NetworkHead) -> Result<bool, NetworkError> {
        let cfg = &head.config;
        let mut made = false;
        let index = match link::find(nl, &cfg.bridge)
            .await
            .map_err(|e| NetworkError::Links(Box::new(e)))?
        {
            Some(found) => {
                // After a reboot (or a hand edit) the name may belong to someone else's link.
                if let Err(why) = made_by_us(&found, cfg.gateway) {
                    return Err(UpError::ForeignBridge {
                        name: cfg.bridge.clone(),
                        why,
                        mac: Mac::for_ip(cfg.gateway).to_string(),
                    }
                    .into());
                }
                link::set_up(nl, &cfg.bridge)
                    .await
                    .map_err(|source| UpError::BridgeUp {
                        name: cfg.bridge.clone(),
                        source: Box::new(source),
                    })?;
                found.header.index
            }
            None => {
                made = true;
                bridge::create(nl, &cfg.bridge, Mac::for_ip(cfg.gateway).0)
                    .await
                    .map_err(|source| UpError::CreateBridge {
                        name: cfg.bridge.clone(),
                        source: Box::new(source),
                    })?
            }
        };
        // The alias tells another network's `up` here which ports this one translates to.
        link::set_alias(nl, index, &cfg.nat_ports().bridge_alias())
            .await
            .map_err(|source| UpError::BridgeAlias {
                bridge: cfg.bridge.clone(),
                source: Box::new(source),
            })?;
        let gateway = Ipv4Network::new(cfg.gateway, cfg.subnet.prefix())
            .expect("the prefix comes from a valid subnet");
        addr::ensure(nl, index, IpNetwork::V4(gateway))
            .await
            .map_err(|source| UpError::GatewayAddress {
                bridge: cfg.bridge.clone(),
                gateway: cfg.gateway,
                source: Box::new(source),
            })?;
        sysctl::set_ip_forward(true).map_err(UpError::Forwarding)?;
        nftables::apply(&nftables::Masquerade {
            table: &head.nft_table,
            subnet: cfg.subnet,
            bridge: &cfg.bridge,
            ports: cfg.nat_ports(),
            keep: &cfg.no_masquerade,
            forwards: &[],
        })
        .map_err(|e| UpError::Masquerade(Box::new(e)))?;
        Ok(made)
    }

    /// `network down`: removes everything micropod made and nothing else. Returns false when
    /// no network was up.
    pub async fn down(&self, force: bool) -> Result<bool, NetworkError> {
        check_privileges()?;
        let nl = Netlink::connect().map_err(NetworkError::Netlink)?;
        // No refill may make TAPs while the pool is deleted (see `up`).
        let _refill = self.state.lock_file(REFILL_LOCK)?;
        let lock = self.state.lock()?;
        let Some((doc, _)) = self.reconcile_all(&nl, &lock, false).await? else {
            return Ok(false);
        };
        if !doc.endpoints.is_empty() && !force {
            return Err(NetworkError::EndpointsExist {
                count: doc.endpoints.len(),
                names: doc.endpoints.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
        let problems = self.teardown(&nl, &doc).await;
        if !problems.is_empty() {
            // The record stays, so running `down` again finishes the job.
            return Err(NetworkError::Teardown(problems));
        }
        self.records.remove_all(&lock)?;
        Ok(true)
    }

    /// Removes every kernel object and pin of `doc`; runs every step and returns all failures.
    async fn teardown(&self, nl: &Netlink, doc: &NetworkDoc) -> Vec<TeardownError> {
        let mut problems = Vec::new();
        if !doc.retired.is_empty() {
            let names: Vec<String> = doc.retired.iter().map(|r| r.name.clone()).collect();
            let results = super::retire::delete_retired(nl, &names).await;
            problems.extend(results.into_iter().filter_map(|(name, r)| {
                r.err()
                    .map(|source| TeardownError::RetiredLink { name, source })
            }));
        }
        for ep in doc.endpoints.values() {
            if let Err(source) = link::delete_if_exists(nl, &ep.link).await {
                problems.push(TeardownError::EndpointLink {
                    name: ep.name.clone(),
                    source,
                });
            }
        }
        // The pool: its group in one request, then (in case) on record and what a refill killed
        // half-way left unrecorded.
        let _ = link::delete_group(nl, pool_group(doc.head.config.subnet.network())).await;
        match self.pool_links(nl, doc).await {
            Ok(names) => {
                for name in names {
                    if let Err(source) = link::delete_if_exists(nl, &name).await {
                        problems.push(TeardownError::PooledLink { name, source });
                    }
                }
            }
            Err(e) => problems.push(TeardownError::PoolList(Box::new(e))),
        }
        let bridge = &doc.head.config.bridge;
        match link::find(nl, bridge).await {
            Ok(Some(found)) => {
                if let Err(why) = made_by_us(&found, doc.head.config.gateway) {
                    log::warn!("left the link {bridge} alone: micropod did not make it ({why})");
                } else if let Err(source) = link::delete_if_exists(nl, bridge).await {
                    problems.push(TeardownError::Bridge {
                        name: bridge.clone(),
                        source,
                    });
                }
            }
            Ok(None) => {}
            Err(source) => problems.push(TeardownError::Bridge {
                name: bridge.clone(),
                source,
            }),
        }
        if let Err(source) = nftables::delete(&doc.head.nft_table) {
            problems.push(TeardownError::NftTable {
                table: doc.head.nft_table.clone(),
                source,
            });
        }
        // Forwarding is per namespace: another micropod network here (its own state dir,
        // bridge and subnet) still needs it.
        if doc.head.ip_forward_was_off {
            match other_networks_here(nl, &doc.head.config.bridge).await {
                Ok(others) if !others.is_empty() => log::info!(
                    "left ip_forward on: {} in this namespace still route(s) through it",
                    others.join(", ")
                ),
                _ => {
                    if let Err(source) = sysctl::set_ip_forward(false) {
                        problems.push(TeardownError::IpForward(source));
                    }
                }
            }
        }
        problems.extend(
            DataPlane::new(&self.bpf_dir)
                .remove()
                .into_iter()
                .map(TeardownError::BpfPins),
        );
        problems
    }
}

impl super::Network {
    /// Deletes the pooled TAPs of `pool` beyond the first `keep` (after `up --pool` made the
    /// pool smaller, or all of them when the bridge was made anew).
    async fn trim_pool(
        &self,
        nl: &Netlink,
        lock: &crate::state::StateLock,
        pool: &[PooledTap],
        keep: usize,
    ) -> Result<(), NetworkError> {
        for pooled in pool.iter().skip(keep) {
            self.records.remove_pooled(lock, &pooled.name)?;
            super::delete_link(nl, &pooled.name).await?;
        }
        Ok(())
    }

    /// The links of this network's pool: recorded ones, and every link named for its subnet
    /// (a refill killed before it recorded its TAP).
    pub(super) async fn pool_links(
        &self,
        nl: &Netlink,
        doc: &NetworkDoc,
    ) -> Result<Vec<String>, NetworkError> {
        let network = doc.head.config.subnet.network();
        let mut names: Vec<String> = doc.pool.iter().map(|p| p.name.clone()).collect();
        for l in link::list(nl)
            .await
            .map_err(|e| NetworkError::Links(Box::new(e)))?
        {
            if pool_link(&l.name).is_some_and(|(net, _)| net == network) && !names.contains(&l.name)
            {
                names.push(l.name);
            }
        }
        Ok(names)
    }
}

/// Valid `--nat-table-size` values: enough for a few flows, at most what a hash map of
/// 16-byte keys and values can sensibly hold (≈ 200 MiB at the top).
pub(super) const NAT_ENTRIES_RANGE: std::ops::RangeInclusive<u32> = 16..=4_194_304;

/// Resolves `--uplink`.
/// How the settings `req` asks for differ from the network's, one phrase each. The pool's
/// size is not compared (it changes in place), nor the uplink or NAT settings `req` leaves out.
fn differences(cfg: &NetworkConfig, req: &UpRequest) -> Result<Vec<String>, NetworkError> {
    let subnet = parse_subnet(&req.subnet)?;
    let gateway = gateway_of(subnet, req.gateway)?;
    let mut out = Vec::new();
    let mut differ = |what: &str, current: String, asked: String| {
        if current != asked {
            out.push(format!(
                "{what} is {current}, the configuration says {asked}"
            ));
        }
    };
    differ("the bridge", cfg.bridge.clone(), req.bridge.clone());
    differ("the subnet", cfg.subnet.to_string(), subnet.to_string());
    differ("the gateway", cfg.gateway.to_string(), gateway.to_string());
    differ(
        "the data path",
        cfg.datapath.to_string(),
        req.datapath.to_string(),
    );
    if let Some(entries) = req.nat_entries {
        differ(
            "the NAT table size",
            cfg.nat_entries.to_string(),
            entries.to_string(),
        );
    }
    if let UplinkChoice::Named(name) = &req.uplink {
        differ(
            "the uplink",
            cfg.uplink.clone().unwrap_or_else(|| "none".into()),
            name.clone(),
        );
    }
    if let Some(ports) = req.nat_ports {
        differ(
            "the NAT ports",
            cfg.nat_ports().to_string(),
            ports.to_string(),
        );
    }
    let list = |l: &[Ipv4Network]| {
        let v: Vec<String> = l.iter().map(ToString::to_string).collect();
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(",")
        }
    };
    differ(
        "the no-masquerade list",
        list(&cfg.no_masquerade),
        list(&normalize_destinations(&req.no_masquerade)),
    );
    Ok(out)
}

/// The gateway `up` gives `subnet`: the one asked for, checked, or the first host address.
fn gateway_of(subnet: Ipv4Network, asked: Option<Ipv4Addr>) -> Result<Ipv4Addr, NetworkError> {
    Ok(match asked {
        Some(gateway) => {
            Ipam::new(subnet, gateway).map_err(InputError::Subnet)?;
            gateway
        }
        None => Ipam::default_gateway(subnet).map_err(InputError::Subnet)?,
    })
}

/// Destinations sorted, without duplicates, each by its network address.
pub(super) fn normalize_destinations(list: &[Ipv4Network]) -> Vec<Ipv4Network> {
    let mut out: Vec<Ipv4Network> = list
        .iter()
        .map(|n| Ipv4Network::new(n.network(), n.prefix()).expect("the prefix is valid"))
        .collect();
    out.sort_by_key(|n| (u32::from(n.network()), n.prefix()));
    out.dedup();
    out
}

async fn resolve_uplink(
    nl: &Netlink,
    choice: &UplinkChoice,
) -> Result<Option<String>, NetworkError> {
    match choice {
        UplinkChoice::Named(name) => {
            let found = match link::validate_name(name) {
                Ok(()) => link::find(nl, name)
                    .await
                    .map_err(|e| NetworkError::Links(Box::new(e)))?,
                Err(_) => None,
            };
            match found {
                Some(_) => Ok(Some(name.clone())),
                None => Err(InputError::UnknownUplink { name: name.clone() }.into()),
            }
        }
        UplinkChoice::Auto => {
            let routes = route::list(nl)
                .await
                .map_err(|e| NetworkError::Routes(Box::new(e)))?;
            let Some(oif) = routes.iter().find(|r| r.is_default()).and_then(|r| r.oif) else {
                return Ok(None);
            };
            let links = link::list(nl)
                .await
                .map_err(|e| NetworkError::Links(Box::new(e)))?;
            Ok(links.into_iter().find(|l| l.index == oif).map(|l| l.name))
        }
    }
}

/// Refuses a subnet that overlaps an address or a (non-default) route of this namespace,
/// other than those of `replacing` (the bridge of the network about to be replaced).
async fn check_overlap(
    nl: &Netlink,
    subnet: Ipv4Network,
    replacing: Option<&str>,
) -> Result<(), NetworkError> {
    let overlaps = |other: Ipv4Network| {
        let other = Ipv4Network::new(other.network(), other.prefix()).unwrap_or(other);
        subnet.contains(other.network()) || other.contains(subnet.network())
    };
    let links = link::list(nl)
        .await
        .map_err(|e| NetworkError::Links(Box::new(e)))?;
    let name_of = |index: u32| {
        links
            .iter()
            .find(|l| l.index == index)
            .map_or_else(|| format!("#{index}"), |l| l.name.clone())
    };
    let ignored = replacing.and_then(|name| links.iter().find(|l| l.name == name).map(|l| l.index));
    for a in addr::list_v4(nl)
        .await
        .map_err(|e| NetworkError::Addresses(Box::new(e)))?
    {
        if a.addr.ip().is_loopback() || Some(a.index) == ignored {
            continue;
        }
        if overlaps(a.addr) {
            return Err(UpError::SubnetOverlap {
                subnet: subnet.to_string(),
                what: format!("address {} on {}", a.addr, name_of(a.index)),
            }
            .into());
        }
    }
    for r in route::list(nl)
        .await
        .map_err(|e| NetworkError::Routes(Box::new(e)))?
    {
        if r.is_default() || (r.oif.is_some() && r.oif == ignored) {
            continue;
        }
        if overlaps(r.destination) {
            let dev = r.oif.map(name_of).unwrap_or_default();
            return Err(UpError::SubnetOverlap {
                subnet: subnet.to_string(),
                what: format!("route {} dev {dev}", r.destination),
            }
            .into());
        }
    }
    Ok(())
}

/// Whether `link` is the bridge micropod made for the network with `gateway`: a bridge whose
/// MAC is the one `up` gives it (`02:6d:` and the gateway's address); otherwise why not.
fn made_by_us(
    link: &rtnetlink::packet_route::link::LinkMessage,
    gateway: Ipv4Addr,
) -> Result<(), String> {
    let found = link::LinkSummary::from_message(link);
    let kind = found.kind.as_deref().unwrap_or("no kind");
    if kind != "bridge" {
        return Err(format!("it is a {kind} link, not a bridge"));
    }
    if found.mac != Some(Mac::for_ip(gateway).0) {
        return Err(format!(
            "its MAC is {}",
            found
                .mac
                .map_or_else(|| "unknown".into(), |m| Mac(m).to_string())
        ));
    }
    Ok(())
}

/// The bridges of other micropod networks in this namespace (bridges with micropod's MAC
/// prefix `02:6d`, which `up` gives every bridge it makes), other than `own`.
async fn other_networks_here(nl: &Netlink, own: &str) -> Result<Vec<String>, link::LinkError> {
    Ok(other_bridges(nl, own)
        .await?
        .into_iter()
        .map(|l| l.name)
        .collect())
}

/// The bridges of the other micropod networks in this namespace.
async fn other_bridges(nl: &Netlink, own: &str) -> Result<Vec<link::LinkSummary>, link::LinkError> {
    Ok(link::list(nl)
        .await?
        .into_iter()
        .filter(|l| {
            l.name != own
                && l.kind.as_deref() == Some("bridge")
                && l.mac.is_some_and(|m| m[..2] == [0x02, 0x6d])
        })
        .collect())
}

/// The ports the network's flows are translated to: those asked for, else those on record,
/// else chosen apart from the other micropod networks in this namespace (their bridges'
/// aliases), whose NAT tables know nothing of this one's flows on the same uplink address.
///
/// The eBPF SNAT also keeps apart from the host's ephemeral ports: the kernel does not know
/// its flows, so a host connection could take a translated flow's 5-tuple, or the reverse.
/// It takes the longest run above 1023 left free (1024-32767 with the default sysctl).
/// conntrack (`--datapath netfilter`) knows both the host's connections and its own
/// translations and keeps them apart itself; there the range starts at 32768 so that
/// clients' usual ports can be kept (a narrow range would run out under TIME_WAIT).
async fn choose_nat_ports(
    nl: &Netlink,
    own_bridge: &str,
    datapath: DatapathMode,
    asked: Option<PortRange>,
    recorded: Option<PortRange>,
) -> Result<PortRange, NetworkError> {
    let conntrack = datapath == DatapathMode::Netfilter;
    let ephemeral = sysctl::ip_local_port_range().map_err(UpError::EphemeralPorts)?;
    let others: Vec<(String, PortRange)> = other_bridges(nl, own_bridge)
        .await
        .map_err(|e| NetworkError::Links(Box::new(e)))?
        .into_iter()
        .filter_map(|l| {
            let ports = l.alias.as_deref().and_then(PortRange::from_bridge_alias)?;
            Some((l.name, ports))
        })
        .collect();
    let taken_by = |p: PortRange| others.iter().find(|(_, o)| o.overlaps(p));
    if let Some(ports) = asked {
        if ports.count() < MIN_NAT_PORTS {
            return Err(InputError::NatPortsTooFew {
                ports,
                len: ports.count(),
                min: MIN_NAT_PORTS,
            }
            .into());
        }
        if !conntrack && ports.overlaps(ephemeral) {
            return Err(InputError::NatPortsEphemeral { ports, ephemeral }.into());
        }
        if let Some((bridge, theirs)) = taken_by(ports) {
            return Err(InputError::NatPortsTaken {
                ports,
                bridge: bridge.clone(),
                theirs: *theirs,
            }
            .into());
        }
        return Ok(ports);
    }
    if let Some(ports) = recorded
        && taken_by(ports).is_none()
    {
        if !conntrack && ports.overlaps(ephemeral) {
            log::warn!(
                "the NAT ports {ports} overlap the host's ephemeral ports {ephemeral} (net.ipv4.ip_local_port_range changed?); `network up --nat-ports` chooses others"
            );
        }
        return Ok(ports);
    }
    let mut taken: Vec<PortRange> = others.iter().map(|(_, o)| *o).collect();
    if conntrack {
        if let Some(upper) = PortRange::new(CONNTRACK_NAT_PORTS_FLOOR, u16::MAX)
            && taken_by(upper).is_none()
        {
            return Ok(upper);
        }
    } else {
        taken.push(ephemeral);
    }
    crate::net::ports::largest_free(NAT_PORTS_FLOOR, &taken)
        .filter(|p| p.count() >= MIN_AUTO_NAT_PORTS)
        .ok_or_else(|| {
            UpError::NoNatPorts {
                min: MIN_AUTO_NAT_PORTS,
                ephemeral,
                others: others
                    .iter()
                    .map(|(b, p)| format!(", network {b} uses {p}"))
                    .collect(),
            }
            .into()
        })
}
