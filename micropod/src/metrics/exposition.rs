//! The OpenMetrics text of one [`Sample`], written by `prometheus-client`.
//!
//! The values come from outside this process (maps and records), so they are encoded as
//! constant metrics by a [`Collector`] built per scrape, not kept in long-lived registered
//! metrics that would have to be mirrored and pruned.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric, text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use super::{NetworkSample, Sample};
use crate::{datapath::EndpointStats, network::ActiveDatapath, stats::EndpointStatsView};

/// What `/metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(super) fn render(sample: Sample) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SampleCollector(sample)));
    let mut out = String::with_capacity(64 * 1024);
    // Writing into a String cannot fail; an encoder error would be a bug in the label values.
    text::encode(&mut out, &registry).expect("encoding into a String");
    out
}

#[derive(Debug)]
struct SampleCollector(Sample);

type Labels = Vec<(&'static str, String)>;

fn gauge<N: EncodeGaugeValue + Copy>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: &[(Labels, N)],
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for SampleCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let sample = &self.0;
        gauge(
            &mut encoder,
            "micropod_up",
            "1 when the network is up and its records and maps were read in this scrape",
            None,
            &[(Vec::new(), u32::from(sample.network.is_some()))],
        )?;
        gauge(
            &mut encoder,
            "micropod_scrape_duration",
            "Time this scrape spent reading the records and the BPF maps",
            Some(&Unit::Seconds),
            &[(Vec::new(), sample.duration.as_secs_f64())],
        )?;
        if let Some(network) = &sample.network {
            encode_network(&mut encoder, network)?;
        }
        Ok(())
    }
}

fn encode_network(encoder: &mut DescriptorEncoder<'_>, net: &NetworkSample) -> std::fmt::Result {
    let stats = &net.stats;
    gauge(
        encoder,
        "micropod_datapath",
        "1 for the data path in use, 0 for the other",
        None,
        &[ActiveDatapath::Ebpf, ActiveDatapath::Netfilter].map(|d| {
            (
                vec![("datapath", d.to_string())],
                u32::from(d == stats.datapath),
            )
        }),
    )?;
    gauge(
        encoder,
        "micropod_ipam_addresses_used",
        "Addresses of the subnet handed out to endpoints",
        None,
        &[(Vec::new(), stats.ipam.used)],
    )?;
    gauge(
        encoder,
        "micropod_ipam_addresses_limit",
        "Addresses of the subnet that can be handed out (without network, gateway and broadcast)",
        None,
        &[(Vec::new(), stats.ipam.capacity)],
    )?;

    let labelled: Vec<(Labels, &EndpointStatsView)> = stats
        .endpoints
        .iter()
        .map(|ep| {
            let mut labels = vec![
                ("endpoint", ep.name.clone()),
                ("ip", ep.ip.to_string()),
                ("kind", ep.kind.to_string()),
            ];
            if let Some(vm) = net.vms.get(&ep.name) {
                labels.push(("vm", vm.clone()));
            }
            if let Some(cni) = &ep.cni {
                labels.push(("container_id", cni.container_id.clone()));
                if let Some(ns) = &cni.pod_namespace {
                    labels.push(("pod_namespace", ns.clone()));
                }
                if let Some(pod) = &cni.pod_name {
                    labels.push(("pod", pod.clone()));
                }
            }
            (labels, ep)
        })
        .collect();

    {
        let mut family = encoder.encode_descriptor(
            "micropod_endpoint",
            "An endpoint on the bridge; link is its host-side port",
            None,
            MetricType::Info,
        )?;
        for (labels, ep) in &labelled {
            let mut labels = labels.clone();
            labels.push(("link", ep.link.clone()));
            family.encode_info(&labels)?;
        }
    }

    let counted: Vec<(&Labels, &EndpointStats)> = labelled
        .iter()
        .filter_map(|(labels, ep)| ep.counters.as_ref().map(|c| (labels, c)))
        .collect();
    if counted.is_empty() && stats.nat.is_none() {
        return Ok(());
    }
    let per_endpoint = |f: fn(&EndpointStats) -> u64| -> Vec<(Labels, u64)> {
        counted
            .iter()
            .map(|(labels, c)| ((*labels).clone(), f(c)))
            .collect()
    };
    counter(
        encoder,
        "micropod_endpoint_receive_packets",
        "Packets delivered to the endpoint",
        None,
        &per_endpoint(|c| c.rx_packets),
    )?;
    counter(
        encoder,
        "micropod_endpoint_receive",
        "Bytes (whole frames) delivered to the endpoint",
        Some(&Unit::Bytes),
        &per_endpoint(|c| c.rx_bytes),
    )?;
    counter(
        encoder,
        "micropod_endpoint_transmit_packets",
        "Packets the endpoint sent, dropped ones included",
        None,
        &per_endpoint(|c| c.tx_packets),
    )?;
    counter(
        encoder,
        "micropod_endpoint_transmit",
        "Bytes (whole frames) the endpoint sent, dropped ones included",
        Some(&Unit::Bytes),
        &per_endpoint(|c| c.tx_bytes),
    )?;
    let drops: Vec<(Labels, u64)> = counted
        .iter()
        .flat_map(|(labels, c)| {
            c.drops.iter().map(|(reason, n)| {
                let mut labels = (*labels).clone();
                labels.push(("reason", (*reason).to_owned()));
                (labels, *n)
            })
        })
        .collect();
    counter(
        encoder,
        "micropod_endpoint_drops",
        "Frames from the endpoint the data path dropped, by reason",
        None,
        &drops,
    )?;

    if let Some(nat) = &stats.nat {
        gauge(
            encoder,
            "micropod_nat_entries",
            "Entries in the NAT table (two per flow)",
            None,
            &[(Vec::new(), nat.entries)],
        )?;
        gauge(
            encoder,
            "micropod_nat_entries_limit",
            "Capacity of the NAT table",
            None,
            &[(Vec::new(), nat.capacity)],
        )?;
        gauge(
            encoder,
            "micropod_nat_flows",
            "Translated flows in the NAT table",
            None,
            &[(Vec::new(), nat.flows)],
        )?;
        counter(
            encoder,
            "micropod_nat_flows_created",
            "Flows the eBPF fast path translated",
            None,
            &[(Vec::new(), nat.counters.flows_created)],
        )?;
        counter(
            encoder,
            "micropod_nat_flows_reclaimed",
            "New flows that took over the slot of an expired flow",
            None,
            &[(Vec::new(), nat.counters.reclaimed)],
        )?;
        counter(
            encoder,
            "micropod_nat_allocation_failures",
            "New flows refused: table_full (no room) or no_port (no free source port)",
            None,
            &[
                (
                    vec![("reason", "table_full".to_owned())],
                    nat.counters.table_full,
                ),
                (vec![("reason", "no_port".to_owned())], nat.counters.no_port),
            ],
        )?;
        counter(
            encoder,
            "micropod_nat_packets",
            "Packets translated by the eBPF fast path, by direction",
            None,
            &[
                (
                    vec![("direction", "outbound".to_owned())],
                    nat.counters.outbound_packets,
                ),
                (
                    vec![("direction", "inbound".to_owned())],
                    nat.counters.inbound_packets,
                ),
            ],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, HashMap},
        time::Duration,
    };

    use micropod_common::NatStats;

    use super::*;
    use crate::{datapath::NatTableStats, ipam::IpamUsage, network::EndpointKind, stats::Stats};

    fn endpoint(name: &str, ip: [u8; 4], counters: Option<EndpointStats>) -> EndpointStatsView {
        EndpointStatsView {
            cni: None,
            name: name.into(),
            kind: EndpointKind::Tap,
            ip: ip.into(),
            link: format!("tap-{name}"),
            counters,
        }
    }

    #[test]
    fn down_is_a_valid_exposition_with_up_zero_only() {
        let text = render(Sample {
            network: None,
            duration: Duration::from_micros(250),
        });
        assert_eq!(
            text,
            "# HELP micropod_up 1 when the network is up and its records and maps were read in \
             this scrape\n\
             # TYPE micropod_up gauge\n\
             micropod_up 0\n\
             # HELP micropod_scrape_duration_seconds Time this scrape spent reading the records \
             and the BPF maps\n\
             # TYPE micropod_scrape_duration_seconds gauge\n\
             # UNIT micropod_scrape_duration_seconds seconds\n\
             micropod_scrape_duration_seconds 0.00025\n\
             # EOF\n"
        );
    }

    #[test]
    fn ebpf_endpoints_get_counters_and_the_vm_label_only_where_there_is_a_vm() {
        let counters = EndpointStats {
            rx_packets: 3,
            rx_bytes: 300,
            tx_packets: 5,
            tx_bytes: 500,
            drops: BTreeMap::from([("spoofed_ip", 2), ("spoofed_mac", 0)]),
        };
        let text = render(Sample {
            network: Some(NetworkSample {
                stats: Stats {
                    datapath: ActiveDatapath::Ebpf,
                    ipam: IpamUsage {
                        capacity: 253,
                        used: 2,
                        free: 251,
                    },
                    endpoints: vec![
                        endpoint("web", [10, 10, 0, 2], Some(counters)),
                        endpoint("ns1", [10, 10, 0, 3], Some(EndpointStats::default())),
                    ],
                    nat: Some(NatTableStats {
                        entries: 4,
                        capacity: 16,
                        flows: 2,
                        counters: NatStats {
                            table_full: 7,
                            ..NatStats::default()
                        },
                    }),
                },
                vms: HashMap::from([("web".to_owned(), "web".to_owned())]),
            }),
            duration: Duration::ZERO,
        });
        for line in [
            "micropod_up 1\n",
            "micropod_datapath{datapath=\"ebpf\"} 1\n",
            "micropod_datapath{datapath=\"netfilter\"} 0\n",
            "micropod_endpoint_info{endpoint=\"web\",ip=\"10.10.0.2\",kind=\"tap\",vm=\"web\",link=\"tap-web\"} 1\n",
            "micropod_endpoint_info{endpoint=\"ns1\",ip=\"10.10.0.3\",kind=\"tap\",link=\"tap-ns1\"} 1\n",
            "micropod_endpoint_receive_bytes_total{endpoint=\"web\",ip=\"10.10.0.2\",kind=\"tap\",vm=\"web\"} 300\n",
            "micropod_endpoint_transmit_packets_total{endpoint=\"web\",ip=\"10.10.0.2\",kind=\"tap\",vm=\"web\"} 5\n",
            "micropod_endpoint_drops_total{endpoint=\"web\",ip=\"10.10.0.2\",kind=\"tap\",vm=\"web\",reason=\"spoofed_ip\"} 2\n",
            "micropod_endpoint_receive_packets_total{endpoint=\"ns1\",ip=\"10.10.0.3\",kind=\"tap\"} 0\n",
            "micropod_nat_entries 4\n",
            "micropod_nat_entries_limit 16\n",
            "micropod_nat_allocation_failures_total{reason=\"table_full\"} 7\n",
            "micropod_ipam_addresses_used 2\n",
            "micropod_ipam_addresses_limit 253\n",
            "# TYPE micropod_endpoint_receive_bytes counter\n",
            "# UNIT micropod_endpoint_receive_bytes bytes\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn netfilter_lists_endpoints_without_counters_or_nat() {
        let text = render(Sample {
            network: Some(NetworkSample {
                stats: Stats {
                    datapath: ActiveDatapath::Netfilter,
                    ipam: IpamUsage {
                        capacity: 253,
                        used: 1,
                        free: 252,
                    },
                    endpoints: vec![endpoint("web", [10, 10, 0, 2], None)],
                    nat: None,
                },
                vms: HashMap::new(),
            }),
            duration: Duration::ZERO,
        });
        assert!(text.contains("micropod_datapath{datapath=\"netfilter\"} 1\n"));
        assert!(text.contains("micropod_endpoint_info{endpoint=\"web\""));
        assert!(!text.contains("_total"), "{text}");
        assert!(!text.contains("micropod_nat_"), "{text}");
    }
}
