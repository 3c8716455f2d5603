//! Whether an endpoint is still what attach made: read back from the kernel, the data path
//! and the NAT table, independently of the records (the CNI plugin's CHECK).

use std::path::Path;

use super::{NetworkError, model::*};
use crate::{
    datapath::{DataPlane, PortSpec},
    net::{NetNs, Netlink, addr, link, nftables, route},
};

impl super::Network {
    /// What is missing or wrong about endpoint `ep` (a netns endpoint, whose namespace is at
    /// `netns`), one line each; empty when everything attach made is in place: the host end on
    /// the bridge and up, the interface inside with its MAC, address and default route, on eBPF
    /// the map entries and port programs, and the network's NAT table.
    pub async fn check_endpoint(
        &self,
        ep: &Endpoint,
        netns: &Path,
    ) -> Result<Vec<String>, NetworkError> {
        let head = self
            .records
            .head_unlocked()?
            .ok_or_else(|| NetworkError::NotUp {
                state_dir: self.state.root().to_path_buf(),
            })?;
        let cfg = &head.config;
        let mut problems = Vec::new();
        let nl = Netlink::connect().map_err(NetworkError::Netlink)?;
        let links = link::list(&nl)
            .await
            .map_err(|e| NetworkError::Links(Box::new(e)))?;
        let bridge = links.iter().find(|l| l.name == cfg.bridge);
        let port = links.iter().find(|l| l.name == ep.link);
        match (bridge, port) {
            (None, _) => problems.push(format!("the bridge {} is missing", cfg.bridge)),
            (_, None) => problems.push(format!("the host end {} is missing", ep.link)),
            (Some(bridge), Some(port)) => {
                if port.controller != Some(bridge.index) {
                    problems.push(format!(
                        "the host end {} is not a port of {}",
                        ep.link, cfg.bridge
                    ));
                }
                if !port.up {
                    problems.push(format!("the host end {} is down", ep.link));
                }
            }
        }

        let inside = ep.netns.as_ref();
        let ifname = inside.map_or("eth0", |n| n.ifname.as_str());
        match NetNs::open(netns) {
            Err(e) => problems.push(format!(
                "cannot open the namespace {}: {}",
                netns.display(),
                crate::error_chain(&e)
            )),
            Ok(ns) => {
                if let (Some(recorded), Ok(id)) = (inside, ns.id())
                    && recorded.id != id
                {
                    problems.push(format!(
                        "{} is not the namespace the endpoint was attached in",
                        netns.display()
                    ));
                }
                problems.extend(check_inside(&ns, ep, ifname, &head).await?);
            }
        }

        if head.active_datapath == ActiveDatapath::Ebpf
            && let Some(port) = port
        {
            let plane = DataPlane::new(&self.bpf_dir);
            let spec = PortSpec {
                ip: ep.ip,
                mac: ep.mac.0,
                port: &ep.link,
                ifindex: port.index,
            };
            let datapath = |e| NetworkError::ReadDatapath(Box::new(e));
            if let Some(p) = plane.port_entries_problem(&spec).map_err(datapath)? {
                problems.push(p);
            }
            if !plane.port_hooked(&nl, port.index).await.map_err(datapath)? {
                problems.push(format!(
                    "the host end {} lacks the data path's port programs",
                    ep.link
                ));
            }
        }
        match nftables::exists(&head.nft_table) {
            Ok(true) => {}
            Ok(false) => problems.push(format!(
                "the NAT table {} (ip family) is missing",
                head.nft_table
            )),
            Err(e) => problems.push(format!(
                "cannot read the NAT table {}: {}",
                head.nft_table,
                crate::error_chain(&e)
            )),
        }
        Ok(problems)
    }
}

/// Inside the endpoint's namespace: the interface with its MAC, up, its address, and the
/// default route via the gateway.
async fn check_inside(
    ns: &NetNs,
    ep: &Endpoint,
    ifname: &str,
    head: &NetworkHead,
) -> Result<Vec<String>, NetworkError> {
    let mut problems = Vec::new();
    let nl = Netlink::connect_in(ns).map_err(NetworkError::Netlink)?;
    let links = link::list(&nl)
        .await
        .map_err(|e| NetworkError::Links(Box::new(e)))?;
    let Some(iface) = links.iter().find(|l| l.name == ifname) else {
        problems.push(format!(
            "the interface {ifname} is missing in the namespace"
        ));
        return Ok(problems);
    };
    if iface.mac != Some(ep.mac.0) {
        problems.push(format!(
            "the interface {ifname} has the MAC {} instead of {}",
            iface
                .mac
                .map_or_else(|| "none".to_owned(), |m| Mac(m).to_string()),
            ep.mac
        ));
    }
    if !iface.up {
        problems.push(format!("the interface {ifname} is down"));
    }
    let prefix = head.config.subnet.prefix();
    let addrs = addr::list_v4(&nl)
        .await
        .map_err(|e| NetworkError::Addresses(Box::new(e)))?;
    if !addrs
        .iter()
        .any(|a| a.index == iface.index && a.addr.ip() == ep.ip && a.addr.prefix() == prefix)
    {
        problems.push(format!(
            "the interface {ifname} lacks the address {}/{prefix}",
            ep.ip
        ));
    }
    let routes = route::list(&nl)
        .await
        .map_err(|e| NetworkError::Routes(Box::new(e)))?;
    if !routes.iter().any(|r| {
        r.is_default() && r.gateway == Some(head.config.gateway) && r.oif == Some(iface.index)
    }) {
        problems.push(format!(
            "there is no default route via {} on {ifname}",
            head.config.gateway
        ));
    }
    Ok(problems)
}
