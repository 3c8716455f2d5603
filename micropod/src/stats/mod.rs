//! `micropod stats`: the counters of a network's endpoints and its NAT table, read from the
//! pinned maps of the data plane, and ([`watch`]) per-second rates from successive reads.
//!
//! Above [`crate::network`]: a read takes the network's state document for the endpoints and
//! its pin dir for the maps, and changes neither. The errors are the network's (`NotUp`,
//! `UnknownEndpoint`, `ReadDatapath`), so callers tell a network that is down apart as they do
//! for every other command.

pub mod watch;

use std::net::Ipv4Addr;

use serde::Serialize;

use crate::{
    datapath::{DataPlane, EndpointStats, NatTableStats},
    ipam::IpamUsage,
    network::{ActiveDatapath, CniOwner, EndpointKind, Network, NetworkError},
};

/// `micropod stats`: counters of the endpoints and the NAT table, read from the pinned maps.
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub datapath: ActiveDatapath,
    pub ipam: IpamUsage,
    pub endpoints: Vec<EndpointStatsView>,
    /// Absent on the netfilter data path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatTableStats>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EndpointStatsView {
    pub name: String,
    pub kind: EndpointKind,
    pub ip: Ipv4Addr,
    pub link: String,
    /// The container's attachment, for endpoints made by the CNI plugin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniOwner>,
    /// Absent on the netfilter data path (nothing counts there), and for the moment an
    /// endpoint is being attached or detached (its map entry is not there).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub counters: Option<EndpointStats>,
}

/// `micropod stats [ENDPOINT]`: per-endpoint counters and NAT occupancy from the pinned maps.
/// Read-only and lock-free, like `network status`.
pub fn read(network: &Network, endpoint: Option<&str>) -> Result<Stats, NetworkError> {
    let doc = network.read_doc()?;
    if let Some(name) = endpoint
        && !doc.endpoints.contains_key(name)
    {
        return Err(NetworkError::UnknownEndpoint { name: name.into() });
    }
    let ebpf = doc.head.active_datapath == ActiveDatapath::Ebpf;
    let plane = DataPlane::new(network.bpf_dir());
    let datapath = |e| NetworkError::ReadDatapath(Box::new(e));
    let mut counters = if ebpf {
        plane.endpoint_stats().map_err(datapath)?
    } else {
        Default::default()
    };
    let endpoints = doc
        .endpoints
        .values()
        .filter(|ep| endpoint.is_none_or(|n| n == ep.name))
        .map(|ep| EndpointStatsView {
            name: ep.name.clone(),
            kind: ep.kind,
            ip: ep.ip,
            link: ep.link.clone(),
            cni: ep.cni.clone(),
            // No entry: the endpoint is being attached or detached right now. Zeros would
            // read as a counter reset, so there are no counters for this read instead.
            counters: counters.remove(&ep.ip),
        })
        .collect();
    Ok(Stats {
        datapath: doc.head.active_datapath,
        ipam: doc.ipam.usage(),
        endpoints,
        nat: if ebpf {
            Some(plane.nat_stats().map_err(datapath)?)
        } else {
            None
        },
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use micropod_common::NatStats;

    use super::*;

    /// The field names `micropod stats --json` has always written: the NAT counters sit beside
    /// the table's occupancy, and an endpoint's counters beside its name.
    #[test]
    fn json_field_names() {
        let stats = Stats {
            datapath: ActiveDatapath::Ebpf,
            ipam: IpamUsage {
                capacity: 253,
                used: 1,
                free: 252,
            },
            endpoints: vec![EndpointStatsView {
                cni: None,
                name: "web".into(),
                kind: EndpointKind::Tap,
                ip: Ipv4Addr::new(10, 10, 0, 2),
                link: "mpt-0a0a0002".into(),
                counters: Some(EndpointStats {
                    rx_packets: 1,
                    rx_bytes: 2,
                    tx_packets: 3,
                    tx_bytes: 4,
                    drops: BTreeMap::from([("spoofed_ip", 5)]),
                }),
            }],
            nat: Some(NatTableStats {
                entries: 4,
                capacity: 16,
                flows: 2,
                counters: NatStats {
                    outbound_packets: 10,
                    inbound_packets: 11,
                    flows_created: 12,
                    table_full: 13,
                    no_port: 14,
                    reclaimed: 15,
                    _pad: [99; 2],
                },
            }),
        };
        assert_eq!(
            serde_json::to_string(&stats).unwrap(),
            r#"{"datapath":"ebpf","ipam":{"capacity":253,"used":1,"free":252},"endpoints":[{"name":"web","kind":"tap","ip":"10.10.0.2","link":"mpt-0a0a0002","rx_packets":1,"rx_bytes":2,"tx_packets":3,"tx_bytes":4,"drops":{"spoofed_ip":5}}],"nat":{"entries":4,"capacity":16,"flows":2,"outbound_packets":10,"inbound_packets":11,"flows_created":12,"table_full":13,"no_port":14,"reclaimed":15}}"#
        );
    }

    #[test]
    fn netfilter_has_no_nat_and_no_counters() {
        let stats = Stats {
            datapath: ActiveDatapath::Netfilter,
            ipam: IpamUsage::default(),
            endpoints: vec![EndpointStatsView {
                cni: None,
                name: "web".into(),
                kind: EndpointKind::Netns,
                ip: Ipv4Addr::new(10, 10, 0, 2),
                link: "mpv-0a0a0002".into(),
                counters: None,
            }],
            nat: None,
        };
        let v = serde_json::to_value(&stats).unwrap();
        assert!(v.get("nat").is_none(), "{v}");
        assert!(v["endpoints"][0].get("rx_packets").is_none(), "{v}");
    }
}
