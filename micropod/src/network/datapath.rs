//! The glue between the manager and the eBPF data plane: installing it under `up`, a port
//! per endpoint under `attach`, forgetting one under `detach` and reconcile.

use super::{AttachError, NetworkError, UpError, model::*};
use crate::{
    datapath::{DataPlane, PlaneSettings, PortSpec},
    net::{Netlink, addr, link},
};

impl super::Network {
    /// Sets up the eBPF data plane if the network asks for it (repairing one that exists), and
    /// records which data path is active and why. `auto` falls back to netfilter only.
    pub(super) async fn ensure_datapath(
        &self,
        nl: &Netlink,
        doc: &mut NetworkDoc,
    ) -> Result<(), NetworkError> {
        let plane = DataPlane::new(&self.bpf_dir);
        if doc.head.config.datapath == DatapathMode::Netfilter {
            doc.head.active_datapath = ActiveDatapath::Netfilter;
            doc.head.datapath_note = None;
            return Ok(());
        }
        match self.install_datapath(nl, doc, &plane).await {
            Ok(note) => {
                doc.head.active_datapath = ActiveDatapath::Ebpf;
                doc.head.datapath_note = note;
                Ok(())
            }
            Err(err) if doc.head.config.datapath == DatapathMode::Auto => {
                // The reason, without the advice to use `auto` that `--datapath ebpf` gets.
                let why = match &err {
                    NetworkError::Up(UpError::Datapath(source)) => crate::error_chain(source),
                    other => crate::error_chain(other),
                };
                log::warn!("eBPF data path unavailable, using netfilter only: {why}");
                for p in plane.remove() {
                    log::warn!(
                        "while removing the partial eBPF data path: {}",
                        crate::error_chain(&p)
                    );
                }
                doc.head.active_datapath = ActiveDatapath::Netfilter;
                doc.head.datapath_note = Some(format!("eBPF unavailable: {why}"));
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
        let cfg = &doc.head.config;
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
            nat_ports: cfg.nat_ports(),
            no_nat: cfg.no_masquerade.clone(),
        };
        let datapath = |e| UpError::Datapath(Box::new(e));
        // Pins of another layout (made by another version of micropod) would be misread:
        // upgraded in place, while the endpoints keep running; replaced whole (counters and
        // NAT flows lost) only if that fails. Pins of this layout but another build's
        // programs (a fix in a newer micropod) get this build's programs the same way, every
        // map kept.
        let mut note = note;
        if plane.is_installed()
            && (!plane.layout_matches() || !plane.object_matches().map_err(datapath)?)
        {
            let said = self.upgrade_datapath(nl, doc, plane, &settings).await?;
            log::info!("{said}");
            note = Some(note.map_or_else(|| said.clone(), |n| format!("{n}; {said}")));
        }
        if plane.is_installed() {
            plane.configure(&settings).map_err(datapath)?;
            plane.attach_network_hooks(&settings).map_err(datapath)?;
            self.rehook_ports(nl, doc).await?;
        } else {
            plane.install(&settings).map_err(datapath)?;
            // A repair (pins removed by hand, or eBPF newly working under `auto`): the
            // endpoints' ports need their programs too.
            let probe = link::IndexProbe::new().map_err(NetworkError::Probe)?;
            for ep in doc.endpoints.values() {
                if let Some(ifindex) = probe.index(&ep.link).map_err(NetworkError::Probe)? {
                    plane
                        .attach_port(nl, &port_spec(ep, ifindex))
                        .await
                        .map_err(|source| AttachError::DatapathPort {
                            name: ep.name.clone(),
                            source: Box::new(source),
                        })?;
                }
            }
        }
        Ok(note)
    }

    /// [`DataPlane::upgrade`] with the network's ports; on failure, the data path is
    /// replaced whole. Returns what happened, in one line.
    async fn upgrade_datapath(
        &self,
        nl: &Netlink,
        doc: &NetworkDoc,
        plane: &DataPlane,
        settings: &PlaneSettings,
    ) -> Result<String, NetworkError> {
        let found = plane.installed_layout().unwrap_or(0);
        let probe = link::IndexProbe::new().map_err(NetworkError::Probe)?;
        let mut specs = Vec::new();
        let mut hooked = Vec::new();
        for ep in doc.endpoints.values() {
            if let Some(ifindex) = probe.index(&ep.link).map_err(NetworkError::Probe)? {
                specs.push(port_spec(ep, ifindex));
                hooked.push((ifindex, ep.link.clone()));
            }
        }
        for pooled in &doc.pool {
            if let Some(ifindex) = probe.index(&pooled.name).map_err(NetworkError::Probe)? {
                hooked.push((ifindex, pooled.name.clone()));
            }
        }
        match plane.upgrade(nl, settings, &specs, &hooked).await {
            Ok(r) => {
                let mut kept: Vec<&str> = r.reused.iter().chain(&r.copied).copied().collect();
                kept.retain(|m| *m != micropod_common::CONFIG_MAP);
                let mut said = if r.from == r.to {
                    format!(
                        "replaced the data path's programs with this build's in place (object {} to {}, layout {}; {} hooks moved atomically); kept: {}",
                        r.from_object.as_deref().unwrap_or("unrecorded"),
                        r.to_object,
                        r.to,
                        r.hooks,
                        kept.join(", ")
                    )
                } else {
                    format!(
                        "upgraded the data path from layout {} to {} in place ({} hooks moved atomically); kept: {}",
                        r.from,
                        r.to,
                        r.hooks,
                        kept.join(", ")
                    )
                };
                if !r.dropped.is_empty() {
                    said += &format!(
                        "; not kept (their entries changed type): {}",
                        r.dropped.join(", ")
                    );
                }
                Ok(said)
            }
            Err(err) => {
                log::warn!(
                    "cannot upgrade the data path of layout {found} in place, replacing it: {}",
                    crate::error_chain(&err)
                );
                for problem in plane.remove() {
                    log::warn!(
                        "while replacing the data path of layout {found}: {}",
                        crate::error_chain(&problem)
                    );
                }
                Ok(format!(
                    "replaced the data path of layout {found} (another micropod's; an upgrade in place failed: {}): endpoint counters and NAT flows were not kept",
                    crate::error_chain(&err)
                ))
            }
        }
    }

    /// Forgets an endpoint in the eBPF maps (a no-op on the netfilter data path); logs what
    /// failed, since the records are what counts and a later attach overwrites the entries.
    /// `ifindex` is the port's if known (a detach, which looked it up), else it is searched.
    pub(super) fn forget_datapath(
        &self,
        head: &NetworkHead,
        ip: std::net::Ipv4Addr,
        port: &str,
        ifindex: Option<u32>,
    ) {
        if head.active_datapath != ActiveDatapath::Ebpf {
            return;
        }
        for p in DataPlane::new(&self.bpf_dir).detach_port(ip, port, ifindex) {
            log::warn!("eBPF data path: {}", crate::error_chain(&p));
        }
    }

    /// Registers a new endpoint with the eBPF data plane and attaches its port programs (a
    /// no-op on the netfilter data path).
    /// Hooks the port programs again on every endpoint port that lost them: a port whose
    /// filters were removed (by hand, or by another tool replacing the qdisc) passes
    /// unaccounted and unchecked frames. `up` and `gc` run it; returns how many it hooked.
    pub(super) async fn rehook_ports(
        &self,
        nl: &Netlink,
        doc: &NetworkDoc,
    ) -> Result<usize, NetworkError> {
        let plane = DataPlane::new(&self.bpf_dir);
        let probe = link::IndexProbe::new().map_err(NetworkError::Probe)?;
        let mut hooked = 0;
        for ep in doc.endpoints.values() {
            let Some(ifindex) = probe.index(&ep.link).map_err(NetworkError::Probe)? else {
                continue;
            };
            let port_err = |source| AttachError::DatapathPort {
                name: ep.name.clone(),
                source: Box::new(source),
            };
            if !plane.port_hooked(nl, ifindex).await.map_err(port_err)? {
                log::info!("{} had lost its port programs; hooked them again", ep.link);
                plane
                    .hook_port(nl, &port_spec(ep, ifindex))
                    .await
                    .map_err(port_err)?;
                hooked += 1;
            }
        }
        Ok(hooked)
    }

    pub(super) async fn attach_datapath(
        &self,
        nl: &Netlink,
        head: &NetworkHead,
        ep: &Endpoint,
    ) -> Result<(), NetworkError> {
        if head.active_datapath != ActiveDatapath::Ebpf {
            return Ok(());
        }
        let wrap = |source| {
            NetworkError::from(AttachError::DatapathPort {
                name: ep.name.clone(),
                source: Box::new(source),
            })
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
            .attach_port(nl, &port_spec(ep, ifindex))
            .await
            .map_err(wrap)
    }
}

pub(super) fn port_spec(ep: &Endpoint, ifindex: u32) -> PortSpec<'_> {
    PortSpec {
        ip: ep.ip,
        mac: ep.mac.0,
        port: &ep.link,
        ifindex,
    }
}
