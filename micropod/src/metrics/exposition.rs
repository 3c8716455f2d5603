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
use crate::{datapath::EndpointStats, network::ActiveDatapath};

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

/// A metric family being written: one descriptor, then one sample per label set.
fn family<'a>(
    encoder: &'a mut DescriptorEncoder<'_>,
    name: &'a str,
    help: &str,
    unit: Option<&'a Unit>,
    kind: MetricType,
) -> Result<prometheus_client::encoding::MetricEncoder<'a>, std::fmt::Error> {
    encoder.encode_descriptor(name, help, unit, kind)
}

fn gauge<N: EncodeGaugeValue + Copy>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: &[(Labels, N)],
) -> std::fmt::Result {
    let mut family = family(encoder, name, help, unit, MetricType::Gauge)?;
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
    let mut family = family(encoder, name, help, unit, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for SampleCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
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

    let labelled: Vec<(Labels, &crate::network::EndpointStatsView)> = stats
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
            (labels, ep)
        })
        .collect();

    {
        let mut family = family(
            encoder,
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
            &[(Vec::new(), nat.flows_created)],
        )?;
        counter(
            encoder,
            "micropod_nat_flows_reclaimed",
            "New flows that took over the slot of an expired flow",
            None,
            &[(Vec::new(), nat.reclaimed)],
        )?;
        counter(
            encoder,
            "micropod_nat_allocation_failures",
            "New flows refused: table_full (no room) or no_port (no free source port)",
            None,
            &[
                (vec![("reason", "table_full".to_owned())], nat.table_full),
                (vec![("reason", "no_port".to_owned())], nat.no_port),
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
                    nat.outbound_packets,
                ),
                (
                    vec![("direction", "inbound".to_owned())],
                    nat.inbound_packets,
                ),
            ],
        )?;
    }
    Ok(())
}
