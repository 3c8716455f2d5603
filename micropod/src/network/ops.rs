//! The mutating commands: up, down, attach, detach, gc, and the reconcile that precedes each.

use std::{os::fd::AsFd as _, path::Path};

use ipnetwork::{IpNetwork, Ipv4Network};
use micropod_common::NAT_DEFAULT_ENTRIES;

use super::{
    AttachRequest, Attachment, NetworkError, Released, UpOutcome, UpRequest, check_privileges,
    model::*, parse_subnet,
};
use crate::{
    datapath::{DataPlane, PlaneSettings, PortSpec},
    failpoint,
    ipam::Ipam,
    net::{NetNs, Netlink, addr, bridge, link, nftables, route, sysctl, tap, veth},
    state::StateLock,
};

impl super::Network {
    /// `network up`: the bridge with the gateway address, forwarding, the MASQUERADE fallback.
    /// Idempotent; refuses to change the settings of a network that has endpoints.
    pub async fn up(&self, req: &UpRequest) -> Result<(UpOutcome, NetworkConfig), NetworkError> {
        check_privileges()?;
        link::validate_name(&req.bridge).map_err(|e| NetworkError::BridgeName(Box::new(e)))?;
        let subnet = parse_subnet(&req.subnet)?;
        let gateway =
            Ipam::default_gateway(subnet).map_err(|e| NetworkError::Subnet(Box::new(e)))?;
        let nat_entries = req.nat_entries.unwrap_or(NAT_DEFAULT_ENTRIES);
        if !NAT_ENTRIES_RANGE.contains(&nat_entries) {
            return Err(NetworkError::NatEntries {
                value: nat_entries,
                min: *NAT_ENTRIES_RANGE.start(),
                max: *NAT_ENTRIES_RANGE.end(),
            });
        }
        let nl = Netlink::connect().map_err(NetworkError::Netlink)?;
        let lock = self.state.lock()?;
        let mut existing: Option<NetworkDoc> = self.state.read_json(&lock, STATE_DOC)?;
        if let Some(doc) = existing.as_mut() {
            self.reconcile(&nl, &lock, doc, false).await?;
        }
        let uplink = resolve_uplink(&nl, &req.uplink).await?;
        let config = NetworkConfig {
            bridge: req.bridge.clone(),
            subnet,
            gateway,
            uplink,
            datapath: req.datapath,
            nat_entries,
        };

        if let Some(doc) = &existing {
            // `--uplink auto` follows the default route, so it is not a change of settings.
            let same = NetworkConfig {
                uplink: config.uplink.clone(),
                ..doc.config.clone()
            } == config
                && (req.uplink == UplinkChoice::Auto || doc.config.uplink == config.uplink);
            if same {
                // Same settings: put back whatever is missing (a crashed `up`, a deleted bridge).
                let mut doc = doc.clone();
                self.ensure(&nl, &doc).await?;
                let before = (doc.active_datapath, doc.datapath_note.clone());
                doc.config = config.clone();
                self.ensure_datapath(&nl, &mut doc).await?;
                if doc.phase != Phase::Ready
                    || existing.as_ref().is_some_and(|old| old.config != config)
                    || before != (doc.active_datapath, doc.datapath_note.clone())
                {
                    doc.phase = Phase::Ready;
                    self.state.write_json(&lock, STATE_DOC, &doc)?;
                }
                return Ok((UpOutcome::Unchanged, config));
            }
            if !doc.endpoints.is_empty() {
                return Err(NetworkError::Reconfigure {
                    current: doc.config.to_string(),
                    requested: config.to_string(),
                    endpoints: doc.endpoints.len(),
                });
            }
        }

        // Everything that can refuse runs before the first change (the network being replaced,
        // if any, is not in the way of its successor).
        let old_bridge = existing.as_ref().map(|d| d.config.bridge.as_str());
        check_overlap(&nl, subnet, old_bridge).await?;
        if old_bridge != Some(config.bridge.as_str())
            && link::find(&nl, &config.bridge)
                .await
                .map_err(|e| NetworkError::Links(Box::new(e)))?
                .is_some()
        {
            return Err(NetworkError::BridgeExists {
                name: config.bridge,
            });
        }
        let mut outcome = UpOutcome::Created;
        if let Some(doc) = existing {
            let problems = self.teardown(&nl, &doc).await;
            if !problems.is_empty() {
                return Err(NetworkError::Teardown(problems));
            }
            self.state.remove(&lock, STATE_DOC)?;
            outcome = UpOutcome::Replaced;
        }
        let ip_forward_was_off = !sysctl::ip_forward().map_err(NetworkError::Forwarding)?;
        let mut doc = NetworkDoc {
            version: STATE_VERSION,
            phase: Phase::Creating,
            nft_table: nft_table_name(&config.bridge),
            active_datapath: ActiveDatapath::Netfilter,
            datapath_note: None,
            ip_forward_was_off,
            ipam: Ipam::new(subnet, gateway).map_err(|e| NetworkError::Subnet(Box::new(e)))?,
            endpoints: Default::default(),
            config: config.clone(),
        };
        // Recorded first: if we die half-way, the next `up` or `down` knows what is ours.
        self.state.write_json(&lock, STATE_DOC, &doc)?;
        failpoint::hit("up:recorded");
        let made = match self.ensure(&nl, &doc).await {
            Ok(()) => self.ensure_datapath(&nl, &mut doc).await,
            Err(err) => Err(err),
        };
        if let Err(err) = made {
            let problems = self.teardown(&nl, &doc).await;
            for p in &problems {
                log::warn!("while undoing a failed `up`: {p}");
            }
            if problems.is_empty() {
                self.state.remove(&lock, STATE_DOC)?;
            }
            return Err(err);
        }
        failpoint::hit("up:made");
        doc.phase = Phase::Ready;
        self.state.write_json(&lock, STATE_DOC, &doc)?;
        Ok((outcome, config))
    }

    /// Makes the kernel match `doc` (network level); creates only what is missing.
    async fn ensure(&self, nl: &Netlink, doc: &NetworkDoc) -> Result<(), NetworkError> {
        let cfg = &doc.config;
        let index = match link::find(nl, &cfg.bridge)
            .await
            .map_err(|e| NetworkError::Links(Box::new(e)))?
        {
            Some(found) => {
                link::set_up(nl, &cfg.bridge)
                    .await
                    .map_err(|source| NetworkError::BridgeUp {
                        name: cfg.bridge.clone(),
                        source: Box::new(source),
                    })?;
                found.header.index
            }
            None => bridge::create(nl, &cfg.bridge, Mac::for_ip(cfg.gateway).0)
                .await
                .map_err(|source| NetworkError::CreateBridge {
                    name: cfg.bridge.clone(),
                    source: Box::new(source),
                })?,
        };
        let gateway = Ipv4Network::new(cfg.gateway, cfg.subnet.prefix())
            .expect("the prefix comes from a valid subnet");
        addr::ensure(nl, index, IpNetwork::V4(gateway))
            .await
            .map_err(|source| NetworkError::GatewayAddress {
                bridge: cfg.bridge.clone(),
                gateway: cfg.gateway,
                source: Box::new(source),
            })?;
        sysctl::set_ip_forward(true).map_err(NetworkError::Forwarding)?;
        nftables::apply(&nftables::Masquerade {
            table: &doc.nft_table,
            subnet: cfg.subnet,
            bridge: &cfg.bridge,
        })
        .map_err(|e| NetworkError::Masquerade(Box::new(e)))?;
        Ok(())
    }

    /// `network down`: removes everything micropod made and nothing else. Returns false when
    /// no network was up.
    pub async fn down(&self, force: bool) -> Result<bool, NetworkError> {
        check_privileges()?;
        let nl = Netlink::connect().map_err(NetworkError::Netlink)?;
        let lock = self.state.lock()?;
        let Some(mut doc) = self.state.read_json::<NetworkDoc>(&lock, STATE_DOC)? else {
            return Ok(false);
        };
        self.reconcile(&nl, &lock, &mut doc, false).await?;
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
        self.state.remove(&lock, STATE_DOC)?;
        Ok(true)
    }

    /// Removes every kernel object and pin of `doc`; runs every step and returns all failures.
    async fn teardown(&self, nl: &Netlink, doc: &NetworkDoc) -> Vec<String> {
        let mut problems = Vec::new();
        for ep in doc.endpoints.values() {
            if let Err(e) = link::delete_if_exists(nl, &ep.link).await {
                problems.push(format!("endpoint {}: {}", ep.name, crate::error_chain(&e)));
            }
        }
        if let Err(e) = link::delete_if_exists(nl, &doc.config.bridge).await {
            problems.push(format!(
                "bridge {}: {}",
                doc.config.bridge,
                crate::error_chain(&e)
            ));
        }
        if let Err(e) = nftables::delete(&doc.nft_table) {
            problems.push(format!(
                "nf_tables table {}: {}",
                doc.nft_table,
                crate::error_chain(&e)
            ));
        }
        if doc.ip_forward_was_off
            && let Err(e) = sysctl::set_ip_forward(false)
        {
            problems.push(format!("ip_forward: {}", crate::error_chain(&e)));
        }
        problems.extend(
            DataPlane::new(&self.bpf_dir)
                .remove()
                .into_iter()
                .map(|p| format!("BPF pins: {p}")),
        );
        problems
    }

    /// Sets up the eBPF data plane if the network asks for it (repairing one that exists), and
    /// records which data path is active and why. `auto` falls back to netfilter only.
    async fn ensure_datapath(
        &self,
        nl: &Netlink,
        doc: &mut NetworkDoc,
    ) -> Result<(), NetworkError> {
        let plane = DataPlane::new(&self.bpf_dir);
        if doc.config.datapath == DatapathMode::Netfilter {
            doc.active_datapath = ActiveDatapath::Netfilter;
            doc.datapath_note = None;
            return Ok(());
        }
        match self.install_datapath(nl, doc, &plane).await {
            Ok(note) => {
                doc.active_datapath = ActiveDatapath::Ebpf;
                doc.datapath_note = note;
                Ok(())
            }
            Err(err) if doc.config.datapath == DatapathMode::Auto => {
                let why = crate::error_chain(&err);
                log::warn!("eBPF data path unavailable, using netfilter only: {why}");
                for p in plane.remove() {
                    log::warn!("while removing the partial eBPF data path: {p}");
                }
                doc.active_datapath = ActiveDatapath::Netfilter;
                doc.datapath_note = Some(format!("eBPF unavailable: {why}"));
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    /// Installs (or repairs) the programs and maps; returns a note if SNAT is off.
    async fn install_datapath(
        &self,
        nl: &Netlink,
        doc: &NetworkDoc,
        plane: &DataPlane,
    ) -> Result<Option<String>, NetworkError> {
        let cfg = &doc.config;
        let links = |e| NetworkError::Links(Box::new(e));
        let bridge_ifindex = link::index(nl, &cfg.bridge).await.map_err(links)?;
        let (uplink, note) = match &cfg.uplink {
            None => (
                None,
                Some("no uplink: the SNAT fast path is off".to_owned()),
            ),
            Some(name) => {
                let index = link::index(nl, name).await.map_err(links)?;
                let addrs = addr::list_v4(nl)
                    .await
                    .map_err(|e| NetworkError::Addresses(Box::new(e)))?;
                match addrs.iter().find(|a| a.index == index) {
                    Some(a) => (Some((name.clone(), index, a.addr.ip())), None),
                    None => (
                        None,
                        Some(format!(
                            "uplink {name} has no IPv4 address: the SNAT fast path is off"
                        )),
                    ),
                }
            }
        };
        let settings = PlaneSettings {
            subnet: cfg.subnet,
            bridge_ifindex,
            bridge_mac: Mac::for_ip(cfg.gateway).0,
            uplink,
            nat_entries: cfg.nat_entries,
        };
        let datapath = |e| NetworkError::Datapath(Box::new(e));
        if plane.is_installed() {
            plane.configure(&settings).map_err(datapath)?;
            plane.attach_network_hooks(&settings).map_err(datapath)?;
        } else {
            plane.install(&settings).map_err(datapath)?;
            // A repair (pins removed by hand, or eBPF newly working under `auto`): the
            // endpoints' ports need their programs too.
            let probe = link::IndexProbe::new().map_err(NetworkError::Probe)?;
            for ep in doc.endpoints.values() {
                if let Some(ifindex) = probe.index(&ep.link).map_err(NetworkError::Probe)? {
                    plane
                        .attach_port(&port_spec(ep, ifindex))
                        .map_err(|source| NetworkError::DatapathPort {
                            name: ep.name.clone(),
                            source: Box::new(source),
                        })?;
                }
            }
        }
        Ok(note)
    }

    /// Forgets an endpoint in the eBPF maps (a no-op on the netfilter data path); logs what
    /// failed, since the records are what counts and a later attach overwrites the entries.
    fn forget_datapath(&self, doc: &NetworkDoc, ip: std::net::Ipv4Addr, port: &str) {
        if doc.active_datapath != ActiveDatapath::Ebpf {
            return;
        }
        for p in DataPlane::new(&self.bpf_dir).detach_port(ip, port) {
            log::warn!("eBPF data path: {p}");
        }
    }

    /// `network attach`: a TAP for a VMM, or a veth into a namespace, with an address.
    pub async fn attach(&self, req: &AttachRequest) -> Result<Attachment, NetworkError> {
        check_privileges()?;
        if !valid_endpoint_name(&req.name) {
            return Err(NetworkError::InvalidEndpointName {
                name: req.name.clone(),
            });
        }
        let target = match (req.kind, &req.netns) {
            (EndpointKind::Netns, None) => return Err(NetworkError::NetnsRequired),
            (EndpointKind::Tap, Some(_)) => return Err(NetworkError::NetnsNotForTap),
            (EndpointKind::Tap, None) if req.ifname.is_some() => {
                return Err(NetworkError::NetnsNotForTap);
            }
            (EndpointKind::Tap, None) => None,
            (EndpointKind::Netns, Some(path)) => Some(open_endpoint_netns(path)?),
        };
        let ifname = req.ifname.clone().unwrap_or_else(|| "eth0".into());
        link::validate_name(&ifname).map_err(|e| NetworkError::InvalidIfname(Box::new(e)))?;

        let nl = Netlink::connect().map_err(NetworkError::Netlink)?;
        let lock = self.state.lock()?;
        let mut doc = self.load_ready(&lock)?;
        let seen = self.reconcile(&nl, &lock, &mut doc, false).await?;
        failpoint::hit("attach:locked");
        if let Some(ep) = doc.endpoints.get(&req.name) {
            return Err(NetworkError::DuplicateEndpoint {
                name: req.name.clone(),
                ip: ep.ip,
            });
        }
        if doc.endpoints.len() >= BR_MAX_PORTS {
            return Err(NetworkError::BridgeFull);
        }
        let bridge_index = seen
            .bridge_index
            .ok_or_else(|| NetworkError::BridgeMissing {
                name: doc.config.bridge.clone(),
            })?;
        let ip = doc
            .ipam
            .allocate(&req.name, req.ip)
            .map_err(|source| NetworkError::Allocate {
                name: req.name.clone(),
                source: Box::new(source),
            })?;
        let ep = Endpoint {
            name: req.name.clone(),
            kind: req.kind,
            ip,
            mac: Mac::for_ip(ip),
            link: link_name(req.kind, ip),
            netns: target.as_ref().map(|(ns, id)| NetnsRef {
                path: ns.path().to_path_buf(),
                id: *id,
                ifname: ifname.clone(),
            }),
        };
        // The intent, recorded before the first kernel object exists; see the module docs.
        self.state.write_json_unsynced(&lock, ATTACH_INTENT, &ep)?;
        failpoint::hit("attach:intent-recorded");
        let plumbed = self
            .plumb(
                &nl,
                &doc,
                &ep,
                bridge_index,
                target.as_ref().map(|(ns, _)| ns),
            )
            .await;
        if let Err(err) = plumbed {
            self.forget_datapath(&doc, ep.ip, &ep.link);
            // Removing the link undoes everything (a veth's peer and its addresses and routes
            // go with it); if that fails, the intent stays for reconcile.
            match link::delete_if_exists(&nl, &ep.link).await {
                Ok(_) => {
                    self.state.remove_unsynced(&lock, ATTACH_INTENT)?;
                }
                Err(e) => log::warn!(
                    "while undoing a failed attach: {}; `micropod gc` will retry",
                    crate::error_chain(&e)
                ),
            }
            return Err(err);
        }
        doc.endpoints.insert(ep.name.clone(), ep.clone());
        self.state.write_json(&lock, STATE_DOC, &doc)?;
        failpoint::hit("attach:recorded");
        self.state.remove_unsynced(&lock, ATTACH_INTENT)?;

        let subnet = doc.config.subnet;
        Ok(Attachment {
            name: ep.name,
            kind: ep.kind,
            link: ep.link,
            bridge: doc.config.bridge.clone(),
            ip,
            prefix: subnet.prefix(),
            cidr: format!("{ip}/{}", subnet.prefix()),
            gateway: doc.config.gateway,
            mac: ep.mac,
            kernel_arg: kernel_ip_arg(ip, subnet, doc.config.gateway),
            netns: ep.netns.as_ref().map(|n| n.path.clone()),
            ifname: ep.netns.map(|n| n.ifname),
        })
    }

    /// Registers a new endpoint with the eBPF data plane and attaches its port programs (a
    /// no-op on the netfilter data path).
    fn attach_datapath(&self, doc: &NetworkDoc, ep: &Endpoint) -> Result<(), NetworkError> {
        if doc.active_datapath != ActiveDatapath::Ebpf {
            return Ok(());
        }
        let wrap = |source| NetworkError::DatapathPort {
            name: ep.name.clone(),
            source: Box::new(source),
        };
        let ifindex = link::IndexProbe::new()
            .and_then(|p| p.index(&ep.link))
            .map_err(|e| wrap(crate::datapath::DatapathError::Probe(e)))?
            .ok_or_else(|| {
                wrap(crate::datapath::DatapathError::Probe(std::io::Error::from(
                    std::io::ErrorKind::NotFound,
                )))
            })?;
        DataPlane::new(&self.bpf_dir)
            .attach_port(&port_spec(ep, ifindex))
            .map_err(wrap)
    }

    /// Creates and wires the kernel objects of an endpoint, in as few requests as the kernel
    /// allows: a veth is created with its peer inside the namespace (MAC set) and its host end
    /// on the bridge and up in one request; inside, link up, address and default route.
    async fn plumb(
        &self,
        nl: &Netlink,
        doc: &NetworkDoc,
        ep: &Endpoint,
        bridge_index: u32,
        target: Option<&NetNs>,
    ) -> Result<(), NetworkError> {
        match (ep.kind, target, &ep.netns) {
            (EndpointKind::Tap, _, _) => {
                // The TAP keeps the kernel's random MAC: the guest's MAC (ep.mac) is the VM's
                // NIC, and a port sharing it would make the bridge deliver the VM's frames
                // to itself.
                tap::create_persistent(&ep.link, None).map_err(|source| {
                    NetworkError::CreateTap {
                        name: ep.link.clone(),
                        source,
                    }
                })?;
                failpoint::hit("attach:link-created");
                // Programs first, link up second: the counters see the port's first frame.
                self.attach_datapath(doc, ep)?;
                link::set_controller_up(nl, &ep.link, bridge_index)
                    .await
                    .map_err(|source| NetworkError::Enslave {
                        name: ep.link.clone(),
                        source: Box::new(source),
                    })
            }
            (EndpointKind::Netns, Some(ns), Some(ns_ref)) => {
                // With eBPF the host end comes up only once its programs are attached, so that
                // the counters see its first frame; otherwise in the creating request.
                let ebpf = doc.active_datapath == ActiveDatapath::Ebpf;
                let spec = veth::PairSpec {
                    peer_ns: Some(ns.as_fd()),
                    peer_mac: Some(ep.mac.0),
                    controller: Some(bridge_index),
                    up: !ebpf,
                };
                if let Err(source) = veth::create_pair(nl, &ep.link, &ns_ref.ifname, &spec).await {
                    // EEXIST names neither end; the host end's name is ours and was free (we
                    // hold the lock and reconciled), so it is the name inside the namespace.
                    if source.is_exists() {
                        return Err(NetworkError::IfnameTaken {
                            ifname: ns_ref.ifname.clone(),
                            netns: ns_ref.path.clone(),
                        });
                    }
                    return Err(NetworkError::CreateVeth {
                        name: ep.link.clone(),
                        source: Box::new(source),
                    });
                }
                failpoint::hit("attach:link-created");
                if ebpf {
                    self.attach_datapath(doc, ep)?;
                    link::set_up(nl, &ep.link)
                        .await
                        .map_err(|source| NetworkError::Enslave {
                            name: ep.link.clone(),
                            source: Box::new(source),
                        })?;
                }
                configure_inside(ns, ns_ref, ep, doc).await?;
                failpoint::hit("attach:configured");
                Ok(())
            }
            (EndpointKind::Netns, _, _) => unreachable!("netns endpoints carry their namespace"),
        }
    }

    /// `network detach`: deletes the endpoint's link and releases its address. Returns the
    /// reconcile note if the endpoint had already gone away on its own.
    pub async fn detach(&self, name: &str) -> Result<Option<Released>, NetworkError> {
        check_privileges()?;
        let nl = Netlink::connect().map_err(NetworkError::Netlink)?;
        let lock = self.state.lock()?;
        let mut doc = self.load_ready(&lock)?;
        let released = self.reconcile(&nl, &lock, &mut doc, false).await?.released;
        if let Some(gone) = released.into_iter().find(|r| r.name == name) {
            return Ok(Some(gone));
        }
        let Some(ep) = doc.endpoints.get(name).cloned() else {
            return Err(NetworkError::UnknownEndpoint { name: name.into() });
        };
        link::delete_if_exists(&nl, &ep.link)
            .await
            .map_err(|source| NetworkError::DeleteLink {
                name: ep.link.clone(),
                source: Box::new(source),
            })?;
        failpoint::hit("detach:link-deleted");
        self.forget_datapath(&doc, ep.ip, &ep.link);
        if let Some((_, Err(source))) = doc.release_endpoint(name) {
            return Err(NetworkError::Release {
                ip: ep.ip,
                source: Box::new(source),
            });
        }
        self.state.write_json(&lock, STATE_DOC, &doc)?;
        Ok(None)
    }

    /// `micropod gc`: releases endpoints whose command died, whose link vanished or whose
    /// namespace is gone, and deletes links named like endpoints of our subnet that no record
    /// owns.
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

    fn load_ready(&self, lock: &StateLock) -> Result<NetworkDoc, NetworkError> {
        match self.state.read_json::<NetworkDoc>(lock, STATE_DOC)? {
            Some(doc) if doc.phase == Phase::Ready => Ok(doc),
            _ => Err(NetworkError::NotUp {
                state_dir: self.state.root().to_path_buf(),
            }),
        }
    }

    /// Brings the record in line with the kernel; writes it back if anything changed. Cheap
    /// enough for every command: one `SIOCGIFINDEX` and one `stat` per endpoint. `sweep` (for
    /// `micropod gc`) also dumps every link to find micropod-named links without a record.
    async fn reconcile(
        &self,
        nl: &Netlink,
        lock: &StateLock,
        doc: &mut NetworkDoc,
        sweep: bool,
    ) -> Result<Reconciled, NetworkError> {
        let probe = link::IndexProbe::new().map_err(NetworkError::Probe)?;
        let exists = |name: &str| probe.index(name).map_err(NetworkError::Probe);
        let mut released = Vec::new();
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
        let undone_intents = released.len();
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
            released.push(Released {
                name: owner,
                ip: Some(ip),
                link: None,
                reason: "its address had no endpoint record".into(),
            });
        }
        // The intent never touched the document; anything else did.
        if released.len() > undone_intents {
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
                let ours = endpoint_link_ip(&l.name).is_some_and(|ip| subnet.contains(ip));
                if ours && !doc.endpoints.values().any(|ep| ep.link == l.name) {
                    match link::delete_if_exists(nl, &l.name).await {
                        Ok(_) => released.push(Released {
                            name: l.name.clone(),
                            ip: endpoint_link_ip(&l.name),
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
        })
    }
}

/// What a reconcile found.
struct Reconciled {
    released: Vec<Released>,
    bridge_index: Option<u32>,
}

/// Valid `--nat-table-size` values: enough for a few flows, at most what a hash map of
/// 16-byte keys and values can sensibly hold (≈ 200 MiB at the top).
pub const NAT_ENTRIES_RANGE: std::ops::RangeInclusive<u32> = 16..=4_194_304;

fn port_spec(ep: &Endpoint, ifindex: u32) -> PortSpec<'_> {
    PortSpec {
        ip: ep.ip,
        mac: ep.mac.0,
        port: &ep.link,
        ifindex,
    }
}

/// Opens `--netns` and refuses micropod's own namespace.
fn open_endpoint_netns(path: &Path) -> Result<(NetNs, crate::net::NetnsId), NetworkError> {
    let wrap = |source| NetworkError::EndpointNetns {
        path: path.to_path_buf(),
        source,
    };
    let ns = NetNs::open(path).map_err(wrap)?;
    let id = ns.id().map_err(wrap)?;
    let own = NetNs::current().and_then(|n| n.id()).map_err(wrap)?;
    if id == own {
        return Err(NetworkError::HostNetns {
            path: path.to_path_buf(),
        });
    }
    Ok((ns, id))
}

/// Whether the namespace recorded for an endpoint is still the one at its path.
fn netns_alive(ns: &NetnsRef) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(&ns.path).is_ok_and(|m| m.dev() == ns.id.dev && m.ino() == ns.id.ino)
}

/// Inside the endpoint's namespace: link up, address, default route via the gateway.
async fn configure_inside(
    ns: &NetNs,
    ns_ref: &NetnsRef,
    ep: &Endpoint,
    doc: &NetworkDoc,
) -> Result<(), NetworkError> {
    let fail = |step: &'static str, source: Box<dyn std::error::Error + Send + Sync>| {
        NetworkError::ConfigureNetns {
            netns: ns_ref.path.clone(),
            ifname: ns_ref.ifname.clone(),
            step,
            source,
        }
    };
    let inner = Netlink::connect_in(ns).map_err(|e| fail("netlink", Box::new(e)))?;
    let index = link::index(&inner, &ns_ref.ifname)
        .await
        .map_err(|e| fail("find the interface", Box::new(e)))?;
    // Up first: IPv4 adds the subnet route (which the gateway route needs) only on a live link.
    link::set_up(&inner, &ns_ref.ifname)
        .await
        .map_err(|e| fail("bring it up", Box::new(e)))?;
    let cidr = Ipv4Network::new(ep.ip, doc.config.subnet.prefix())
        .expect("the prefix comes from a valid subnet");
    addr::ensure(&inner, index, IpNetwork::V4(cidr))
        .await
        .map_err(|e| fail("add the address", Box::new(e)))?;
    route::add_default(&inner, doc.config.gateway, index)
        .await
        .map_err(|e| fail("add the default route", Box::new(e)))?;
    Ok(())
}

/// Resolves `--uplink`.
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
                None => Err(NetworkError::UnknownUplink { name: name.clone() }),
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
            return Err(NetworkError::SubnetOverlap {
                subnet: subnet.to_string(),
                what: format!("address {} on {}", a.addr, name_of(a.index)),
            });
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
            return Err(NetworkError::SubnetOverlap {
                subnet: subnet.to_string(),
                what: format!("route {} dev {dev}", r.destination),
            });
        }
    }
    Ok(())
}
