//! `network attach` and `network detach`: an endpoint's links, address and namespace.

use std::{os::fd::AsFd as _, path::Path};

use ipnetwork::{IpNetwork, Ipv4Network};

use super::{
    AttachError, AttachRequest, Attachment, InputError, NetnsStep, NetworkError, Released,
    check_privileges, model::*,
};
use crate::{
    failpoint,
    ipam::IpamError,
    net::{NetNs, Netlink, addr, link, naming::check_endpoint_name, route, tap, veth},
};

impl super::Network {
    /// `network attach`: a TAP for a VMM, or a veth into a namespace, with an address.
    pub async fn attach(&self, req: &AttachRequest) -> Result<Attachment, NetworkError> {
        self.reaping(async |later| self.attach_locked(req, later).await)
            .await
    }

    /// [`Self::attach`] under the state lock; says in `later` what is left for after it.
    async fn attach_locked(
        &self,
        req: &AttachRequest,
        later: &mut super::retire::Later,
    ) -> Result<Attachment, NetworkError> {
        check_privileges()?;
        check_endpoint_name("endpoint", &req.name).map_err(InputError::from)?;
        let target = match (req.kind, &req.netns) {
            (EndpointKind::Netns, None) => return Err(InputError::NetnsRequired.into()),
            (EndpointKind::Tap, Some(_)) => return Err(InputError::NetnsNotForTap.into()),
            (EndpointKind::Tap, None) if req.ifname.is_some() => {
                return Err(InputError::NetnsNotForTap.into());
            }
            (EndpointKind::Tap, None) => None,
            (EndpointKind::Netns, Some(path)) => Some(open_endpoint_netns(path)?),
        };
        let ifname = req.ifname.clone().unwrap_or_else(|| "eth0".into());
        link::validate_name(&ifname).map_err(|e| InputError::InvalidIfname(Box::new(e)))?;
        if let Some(mtu) = req.mtu {
            if req.kind != EndpointKind::Netns {
                return Err(InputError::MtuNotForTap.into());
            }
            if !MTU_RANGE.contains(&mtu) {
                return Err(InputError::Mtu { value: mtu }.into());
            }
        }
        if req.cni.is_some() && req.kind != EndpointKind::Netns {
            return Err(InputError::NetnsRequired.into());
        }

        let nl = Netlink::connect().map_err(NetworkError::Netlink)?;
        let lock = self.state.lock()?;
        let head = self.records.ready_head(&lock)?;
        if let Some((first, last)) = req.range {
            head.ipam_rules()
                .check_range(first, last)
                .map_err(|reason| InputError::Range { reason })?;
        }
        self.recover(&nl, &lock, &head).await?;
        failpoint::hit("attach:locked");
        let probe = link::IndexProbe::new().map_err(NetworkError::Probe)?;
        if let Some(ep) = self.records.endpoint(&req.name)? {
            // The name is free again if what it named is gone (a reconcile would say so).
            match super::reconcile::gone_reason(&probe, &ep)? {
                Some(reason) => self.release_gone(&nl, &lock, &head, &ep, reason).await?,
                None => {
                    return Err(AttachError::DuplicateEndpoint {
                        name: req.name.clone(),
                        ip: ep.ip,
                    }
                    .into());
                }
            }
        }
        let bridge_index = probe
            .index(&head.config.bridge)
            .map_err(NetworkError::Probe)?
            .ok_or_else(|| AttachError::BridgeMissing {
                name: head.config.bridge.clone(),
            })?;
        let allocate = |source| AttachError::Allocate {
            name: req.name.clone(),
            source: Box::new(source),
        };
        let ip = match self.records.pick_address(&lock, &head, req.ip, req.range)? {
            Ok(ip) => ip,
            // Endpoints that went away on their own may hold addresses: look at them all.
            Err(
                IpamError::Exhausted { .. }
                | IpamError::RangeExhausted { .. }
                | IpamError::Taken { .. },
            ) => {
                self.reconcile_all(&nl, &lock, false).await?;
                self.records
                    .pick_address(&lock, &head, req.ip, req.range)?
                    .map_err(allocate)?
            }
            Err(e) => return Err(allocate(e).into()),
        };
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
            cni: req.cni.clone(),
        };
        // The intent, recorded before the address is claimed and the first kernel object
        // exists; see the module docs.
        self.state.write_slot(&lock, ATTACH_INTENT, &ep)?;
        failpoint::hit("attach:intent-recorded");
        // A pick from a range is not the subnet's lowest free address: the bound stays.
        self.records
            .claim_address(&lock, ip, &ep.name, req.ip.is_none() && req.range.is_none())?;
        let target = target.as_ref().map(|(ns, _)| Target { ns, mtu: req.mtu });
        let mut plumbed = self
            .plumb(&nl, &lock, &head, &ep, bridge_index, target.as_ref())
            .await;
        if matches!(
            plumbed,
            Err(NetworkError::Attach(AttachError::IfnameTaken { .. }))
        ) && !self.records.retired_names()?.is_empty()
        {
            // The name inside the namespace may be held by the peer of a veth detached a
            // moment ago and not yet deleted: delete the retired links now and try again.
            let names = self.records.retired_names()?;
            for (name, result) in super::retire::delete_retired(&nl, &names).await {
                match result {
                    Ok(()) => self.records.remove_retired(&lock, &name)?,
                    Err(e) => {
                        log::warn!("cannot delete retired {name}: {}", crate::error_chain(&e));
                    }
                }
            }
            plumbed = self
                .plumb(&nl, &lock, &head, &ep, bridge_index, target.as_ref())
                .await;
        }
        if let Err(err) = plumbed {
            self.undo_attach(&nl, &lock, &head, &ep).await;
            return Err(err);
        }
        // The record can fail too (a full disk): the command undoes its own work then, rather
        // than leave the link and its map entries to the next one.
        if let Err(err) = self.records.put_endpoint(&lock, &ep) {
            self.undo_attach(&nl, &lock, &head, &ep).await;
            return Err(err);
        }
        failpoint::hit("attach:recorded");
        self.state.clear_slot(&lock, ATTACH_INTENT)?;
        later.reap = !self.records.retired_names()?.is_empty();
        // Refilled once half used, so that a burst of attaches starts one refill, not one each.
        later.refill = head.config.pool > 0
            && (self.records.pool_names()?.len() <= (head.config.pool as usize) / 2
                || self.state.spares_ran_out());

        let subnet = head.config.subnet;
        Ok(Attachment {
            name: ep.name,
            kind: ep.kind,
            link: ep.link,
            bridge: head.config.bridge.clone(),
            ip,
            prefix: subnet.prefix(),
            cidr: format!("{ip}/{}", subnet.prefix()),
            gateway: head.config.gateway,
            mac: ep.mac,
            kernel_arg: kernel_ip_arg(ip, subnet, head.config.gateway),
            netns: ep.netns.as_ref().map(|n| n.path.clone()),
            ifname: ep.netns.map(|n| n.ifname),
            mtu: req.mtu,
        })
    }

    /// Releases an endpoint on record whose link or namespace is gone (`reason`), as a
    /// reconcile would: its link (a veth's host end may outlive its peer's namespace briefly),
    /// its data path entries, its records.
    async fn release_gone(
        &self,
        nl: &Netlink,
        lock: &crate::state::StateLock,
        head: &NetworkHead,
        ep: &Endpoint,
        reason: &str,
    ) -> Result<(), NetworkError> {
        super::delete_link(nl, &ep.link).await?;
        self.forget_datapath(head, ep.ip, &ep.link, None);
        self.records.release_endpoint(lock, ep)?;
        log::info!("released endpoint {} ({}): {reason}", ep.name, ep.ip);
        Ok(())
    }

    /// Creates and wires the kernel objects of an endpoint, in as few requests as the kernel
    /// allows: a veth is created with its peer inside the namespace (MAC set) and its host end
    /// on the bridge and up in one request; inside, link up, address and default route.
    async fn plumb(
        &self,
        nl: &Netlink,
        lock: &crate::state::StateLock,
        head: &NetworkHead,
        ep: &Endpoint,
        bridge_index: u32,
        target: Option<&Target<'_>>,
    ) -> Result<(), NetworkError> {
        match (ep.kind, target, &ep.netns) {
            (EndpointKind::Tap, _, _) => {
                if self.take_pooled(nl, lock, head, ep, bridge_index).await? {
                    return Ok(());
                }
                // The TAP keeps the kernel's random MAC: the guest's MAC (ep.mac) is the VM's
                // NIC, and a port sharing it would make the bridge deliver the VM's frames
                // to itself.
                tap::create_persistent(&ep.link, None).map_err(|source| {
                    AttachError::CreateTap {
                        name: ep.link.clone(),
                        source,
                    }
                })?;
                failpoint::hit("attach:link-created");
                port_without_ipv6(&ep.link)?;
                // Programs first, link up second: the counters see the port's first frame.
                self.attach_datapath(nl, head, ep).await?;
                link::set_controller_up(nl, &ep.link, bridge_index)
                    .await
                    .map_err(|source| {
                        if source.is_bridge_full() {
                            return AttachError::BridgeFull.into();
                        }
                        AttachError::Enslave {
                            name: ep.link.clone(),
                            source: Box::new(source),
                        }
                        .into()
                    })
            }
            (EndpointKind::Netns, Some(&Target { ns, mtu }), Some(ns_ref)) => {
                // The host end comes up only once IPv6 is off on it and, with eBPF, its
                // programs are attached, so that the counters see its first frame.
                let ebpf = head.active_datapath == ActiveDatapath::Ebpf;
                let spec = veth::PairSpec {
                    peer_ns: Some(ns.as_fd()),
                    peer_mac: Some(ep.mac.0),
                    controller: Some(bridge_index),
                    up: false,
                    mtu,
                };
                if let Err(source) = veth::create_pair(nl, &ep.link, &ns_ref.ifname, &spec).await {
                    // EEXIST names neither end; the host end's name is ours and was free (we
                    // hold the lock and reconciled), so it is the name inside the namespace.
                    if source.is_bridge_full() {
                        return Err(AttachError::BridgeFull.into());
                    }
                    if source.is_exists() {
                        return Err(AttachError::IfnameTaken {
                            ifname: ns_ref.ifname.clone(),
                            netns: ns_ref.path.clone(),
                        }
                        .into());
                    }
                    return Err(AttachError::CreateVeth {
                        name: ep.link.clone(),
                        source: Box::new(source),
                    }
                    .into());
                }
                failpoint::hit("attach:link-created");
                port_without_ipv6(&ep.link)?;
                // The host end and the inside, each on its own socket, at once: neither waits
                // for the other's answers. The inside's frames go nowhere until the host end
                // is up (no carrier), which is after its programs.
                let host = async {
                    if ebpf {
                        self.attach_datapath(nl, head, ep).await?;
                    }
                    link::set_up(nl, &ep.link).await.map_err(|source| {
                        NetworkError::from(AttachError::Enslave {
                            name: ep.link.clone(),
                            source: Box::new(source),
                        })
                    })
                };
                let (host, inside) = tokio::join!(host, configure_inside(ns, ns_ref, ep, head));
                host?;
                inside?;
                failpoint::hit("attach:configured");
                Ok(())
            }
            (EndpointKind::Netns, _, _) => unreachable!("netns endpoints carry their namespace"),
        }
    }

    /// Undoes an attach of `ep` that failed after its intent was recorded: map entries, the
    /// link (a veth's peer, addresses and routes go with it), the address, the intent. What
    /// fails is logged and left to the intent, which the next command (or `gc`) finishes.
    async fn undo_attach(
        &self,
        nl: &Netlink,
        lock: &crate::state::StateLock,
        head: &NetworkHead,
        ep: &Endpoint,
    ) {
        self.forget_datapath(head, ep.ip, &ep.link, None);
        if let Err(e) = link::delete_if_exists(nl, &ep.link).await {
            log::warn!(
                "while undoing a failed attach: {}; `micropod gc` will retry",
                crate::error_chain(&e)
            );
            return;
        }
        let cleared = self
            .records
            .release_address(lock, ep.ip, &ep.name)
            .map(drop)
            .and_then(|()| Ok(self.state.clear_slot(lock, ATTACH_INTENT)?));
        if let Err(e) = cleared {
            log::warn!(
                "while undoing a failed attach: {}; `micropod gc` will finish it",
                crate::error_chain(&e)
            );
        }
    }

    /// `network detach`: takes the endpoint's link out of service and releases its address;
    /// the link itself is deleted after the lock is released (see `retire.rs`). Returns the
    /// reconcile note if the endpoint had already gone away on its own.
    pub async fn detach(&self, name: &str) -> Result<Option<Released>, NetworkError> {
        self.reaping(async |later| self.detach_locked(name, later).await)
            .await
    }

    /// [`Self::detach`] under the state lock; says in `later` what is left for after it.
    async fn detach_locked(
        &self,
        name: &str,
        later: &mut super::retire::Later,
    ) -> Result<Option<Released>, NetworkError> {
        check_privileges()?;
        let nl = Netlink::connect().map_err(NetworkError::Netlink)?;
        let lock = self.state.lock()?;
        let head = self.records.ready_head(&lock)?;
        let recovered = self.recover(&nl, &lock, &head).await?;
        let done = |later: &mut super::retire::Later| -> Result<(), NetworkError> {
            later.reap = !self.records.retired_names()?.is_empty();
            Ok(())
        };
        if let Some(gone) = recovered.into_iter().find(|r| r.name == name) {
            done(later)?;
            return Ok(Some(gone));
        }
        let Some(ep) = self.records.endpoint(name)? else {
            done(later)?;
            return Err(NetworkError::UnknownEndpoint { name: name.into() });
        };
        let probe = link::IndexProbe::new().map_err(NetworkError::Probe)?;
        if let Some(reason) = super::reconcile::gone_reason(&probe, &ep)? {
            self.release_gone(&nl, &lock, &head, &ep, reason).await?;
            done(later)?;
            return Ok(Some(Released {
                name: ep.name,
                ip: Some(ep.ip),
                link: Some(ep.link),
                reason: reason.into(),
            }));
        }
        // Looked up before the rename, for the data path (its port entry is keyed by it).
        let ifindex = probe.index(&ep.link).map_err(NetworkError::Probe)?;
        let mut intent = DetachIntent {
            retired: self.next_retired_name(ep.ip, &probe, None)?,
            endpoint: ep.clone(),
        };
        // The intent, recorded before the first kernel change; see the module docs.
        self.state.write_slot(&lock, DETACH_INTENT, &intent)?;
        failpoint::hit("detach:intent-recorded");
        let kept = self.retire_link(&nl, &lock, &probe, &mut intent).await?;
        failpoint::hit("detach:retired");
        self.forget_datapath(&head, ep.ip, &ep.link, ifindex);
        if kept {
            self.records.add_retired(
                &lock,
                &RetiredLink {
                    name: intent.retired,
                    ip: ep.ip,
                },
            )?;
        }
        self.records.release_endpoint(&lock, &ep)?;
        failpoint::hit("detach:recorded");
        self.state.clear_slot(&lock, DETACH_INTENT)?;
        later.reap = kept || !self.records.retired_names()?.is_empty();
        Ok(None)
    }
}

/// The MTUs a netns endpoint may ask for: IPv4's minimum up to what a veth takes.
const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;

/// The namespace a netns endpoint's far end goes into, and the MTU of its pair.
struct Target<'a> {
    ns: &'a NetNs,
    mtu: Option<u32>,
}

/// See [`crate::net::sysctl::disable_ipv6`].
fn port_without_ipv6(link: &str) -> Result<(), NetworkError> {
    crate::net::sysctl::disable_ipv6(link).map_err(|source| {
        AttachError::PortIpv6 {
            name: link.to_owned(),
            source,
        }
        .into()
    })
}

/// Opens `--netns` and refuses micropod's own namespace.
fn open_endpoint_netns(path: &Path) -> Result<(NetNs, crate::net::NetnsId), NetworkError> {
    let wrap = |source| InputError::EndpointNetns {
        path: path.to_path_buf(),
        source,
    };
    let ns = NetNs::open(path).map_err(wrap)?;
    let id = ns.id().map_err(wrap)?;
    let own = NetNs::current().and_then(|n| n.id()).map_err(wrap)?;
    if id == own {
        return Err(InputError::HostNetns {
            path: path.to_path_buf(),
        }
        .into());
    }
    Ok((ns, id))
}

/// Whether the namespace recorded for an endpoint is still the one at its path.
pub(super) fn netns_alive(ns: &NetnsRef) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(&ns.path).is_ok_and(|m| m.dev() == ns.id.dev && m.ino() == ns.id.ino)
}

/// Inside the endpoint's namespace: link up, address, default route via the gateway.
async fn configure_inside(
    ns: &NetNs,
    ns_ref: &NetnsRef,
    ep: &Endpoint,
    head: &NetworkHead,
) -> Result<(), NetworkError> {
    let fail = |step| AttachError::ConfigureNetns {
        netns: ns_ref.path.clone(),
        ifname: ns_ref.ifname.clone(),
        step,
    };
    let inner = Netlink::connect_in(ns).map_err(|e| fail(NetnsStep::Netlink(Box::new(e))))?;
    let cidr = Ipv4Network::new(ep.ip, head.config.subnet.prefix())
        .expect("the prefix comes from a valid subnet");
    // No IPv6 address of its own, then up, then the address, all in flight together (one
    // socket: the kernel takes them in the order sent); all must be done before the gateway
    // route, which needs the subnet route that IPv4 adds only for an address on a live link.
    // The network is IPv4: a link-local address would only send DAD, MLD and RS frames that
    // the bridge floods to every port, work that grows with the endpoints (as Docker turns
    // IPv6 off on its IPv4-only networks' interfaces). IPv6 set up by hand still works.
    let quiet = async {
        link::no_link_local(&inner, &ns_ref.ifname)
            .await
            .map_err(|e| fail(NetnsStep::NoLinkLocal(Box::new(e))))
    };
    let up = async {
        link::set_up(&inner, &ns_ref.ifname)
            .await
            .map_err(|e| fail(NetnsStep::BringUp(Box::new(e))))
    };
    let address = async {
        let index = link::index(&inner, &ns_ref.ifname)
            .await
            .map_err(|e| fail(NetnsStep::FindInterface(Box::new(e))))?;
        addr::ensure(&inner, index, IpNetwork::V4(cidr))
            .await
            .map_err(|e| fail(NetnsStep::AddAddress(Box::new(e))))?;
        Ok::<_, NetworkError>(index)
    };
    let (quiet, up, index) = tokio::join!(quiet, up, address);
    quiet?;
    up?;
    let index = index?;
    route::add_default(&inner, head.config.gateway, index)
        .await
        .map_err(|e| fail(NetnsStep::AddDefaultRoute(Box::new(e))))?;
    Ok(())
}
