//! `micropod stats --watch`: per-second rates from two successive [`Stats`] reads.
//!
//! [`Rates::between`] is the arithmetic (pure, unit-tested); [`Watch`] takes the reads at a
//! steady interval. An endpoint is the same endpoint in both reads when its name *and* address
//! match. Rates are unknown (`None`) when there is nothing to compare: on the netfilter data path
//! (no counters), and for an endpoint that the previous read did not have. When any counter of an
//! endpoint went backwards, the endpoint was detached and attached again in between and its
//! counters started from zero: the interval's increase is then the current value, as
//! Prometheus' `rate()` takes it, and [`EndpointRates::counters_reset`] says so.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::Stats;
use crate::{
    datapath::{EndpointStats, NatTableStats},
    network::{ActiveDatapath, CniOwner, EndpointKind, Network, NetworkError},
};

/// The longest `--interval`: beyond an hour a rate says little, and a typo (`--interval 1000000`)
/// would look like a hang.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("{input:?} is not a number of seconds greater than 0 and at most 3600 (e.g. 0.5)")]
    Interval { input: String },
    #[error("cannot read the counters")]
    Read(#[source] NetworkError),
}

/// Parses `--interval SECS`: a decimal number of seconds in (0, 3600].
pub fn parse_interval(input: &str) -> Result<Duration, WatchError> {
    let bad = || WatchError::Interval {
        input: input.to_owned(),
    };
    let secs: f64 = input.trim().parse().map_err(|_| bad())?;
    // Written so that NaN fails too.
    if !(secs > 0.0 && secs <= MAX_INTERVAL.as_secs_f64()) {
        return Err(bad());
    }
    let interval = Duration::from_secs_f64(secs);
    // Rounds to nothing below a nanosecond (`1e-12`): that is not a usable interval either.
    if interval.is_zero() {
        return Err(bad());
    }
    Ok(interval)
}

/// One interval's rates, per second.
#[derive(Clone, Debug, Serialize)]
pub struct Rates {
    /// The time between the two reads, as measured (not as asked for).
    pub interval_seconds: f64,
    pub datapath: ActiveDatapath,
    pub endpoints: Vec<EndpointRates>,
    /// The NAT table as of the second read (gauges and totals, not rates); absent on the
    /// netfilter data path.
    pub nat: Option<NatTableStats>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EndpointRates {
    pub name: String,
    pub kind: EndpointKind,
    pub ip: Ipv4Addr,
    pub link: String,
    /// The container's attachment, for endpoints made by the CNI plugin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniOwner>,
    /// `None` when unknown; [`EndpointRates::unknown`] says why.
    pub rates: Option<CounterRates>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown: Option<Unknown>,
    /// The counters went backwards (detached and attached again): `rates` count from zero.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub counters_reset: bool,
}

/// Why an endpoint has no rate for an interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unknown {
    /// The netfilter data path counts nothing per endpoint.
    NoCounters,
    /// The previous read did not have this endpoint (name and address): the next interval has
    /// a rate.
    NewEndpoint,
}

/// Per-second rates of one endpoint's counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CounterRates {
    pub rx_packets: f64,
    pub rx_bytes: f64,
    pub tx_packets: f64,
    pub tx_bytes: f64,
    /// All drop reasons together.
    pub drops: f64,
    pub drops_by_reason: BTreeMap<&'static str, f64>,
}

impl Rates {
    /// The rates from `previous` to `current`, read `elapsed` apart, in `current`'s endpoint
    /// order.
    #[must_use]
    pub fn between(previous: &Stats, current: &Stats, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64();
        let endpoints = current
            .endpoints
            .iter()
            .map(|ep| {
                let before = previous
                    .endpoints
                    .iter()
                    .find(|p| p.name == ep.name && p.ip == ep.ip)
                    .and_then(|p| p.counters.as_ref());
                let (rates, unknown, counters_reset) = match (&ep.counters, before) {
                    (None, _) => (None, Some(Unknown::NoCounters), false),
                    // Not in the previous read, or without counters there (the network was
                    // brought up again with eBPF in between): nothing to subtract.
                    (Some(_), None) => (None, Some(Unknown::NewEndpoint), false),
                    (Some(now), Some(then)) => {
                        let reset = went_backwards(then, now);
                        let zero = EndpointStats::default();
                        let base = if reset { &zero } else { then };
                        (per_second(base, now, secs), None, reset)
                    }
                };
                EndpointRates {
                    name: ep.name.clone(),
                    kind: ep.kind,
                    ip: ep.ip,
                    link: ep.link.clone(),
                    cni: ep.cni.clone(),
                    rates,
                    unknown,
                    counters_reset,
                }
            })
            .collect();
        Self {
            interval_seconds: secs,
            datapath: current.datapath,
            endpoints,
            nat: current.nat.clone(),
        }
    }
}

/// Whether any counter is below its previous value. The counters only grow while the endpoint
/// exists, so this means its map entry was recreated.
fn went_backwards(then: &EndpointStats, now: &EndpointStats) -> bool {
    now.rx_packets < then.rx_packets
        || now.rx_bytes < then.rx_bytes
        || now.tx_packets < then.tx_packets
        || now.tx_bytes < then.tx_bytes
        || then
            .drops
            .iter()
            .any(|(reason, n)| now.drops.get(reason).copied().unwrap_or(0) < *n)
}

/// `None` for a zero interval: no rate can be told.
fn per_second(then: &EndpointStats, now: &EndpointStats, secs: f64) -> Option<CounterRates> {
    if secs <= 0.0 {
        return None;
    }
    // `as f64` is exact below 2^53, far beyond what one interval adds.
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    let drops_by_reason: BTreeMap<&'static str, f64> = now
        .drops
        .iter()
        .map(|(reason, n)| {
            (
                *reason,
                rate(then.drops.get(reason).copied().unwrap_or(0), *n),
            )
        })
        .collect();
    Some(CounterRates {
        rx_packets: rate(then.rx_packets, now.rx_packets),
        rx_bytes: rate(then.rx_bytes, now.rx_bytes),
        tx_packets: rate(then.tx_packets, now.tx_packets),
        tx_bytes: rate(then.tx_bytes, now.tx_bytes),
        drops: drops_by_reason.values().sum(),
        drops_by_reason,
    })
}

/// Successive reads of [`super::read`] at a steady interval.
pub struct Watch<'a> {
    network: &'a Network,
    endpoint: Option<String>,
    interval: Duration,
    previous: Stats,
    previous_at: Instant,
    /// When the next read is due: a fixed schedule, so the time spent reading and printing does
    /// not make the intervals drift.
    due: Instant,
}

impl<'a> Watch<'a> {
    /// Takes the first read, so that a network that is down or an unknown endpoint fails here,
    /// before anything is printed.
    pub fn start(
        network: &'a Network,
        endpoint: Option<&str>,
        interval: Duration,
    ) -> Result<Self, WatchError> {
        let previous = super::read(network, endpoint).map_err(WatchError::Read)?;
        let previous_at = Instant::now();
        Ok(Self {
            network,
            endpoint: endpoint.map(str::to_owned),
            interval,
            previous,
            previous_at,
            due: previous_at + interval,
        })
    }

    /// Sleeps until the next read is due, reads, and returns the rates since the last read.
    pub fn next_rates(&mut self) -> Result<Rates, WatchError> {
        let now = Instant::now();
        if let Some(wait) = self.due.checked_duration_since(now) {
            std::thread::sleep(wait);
        }
        let current =
            super::read(self.network, self.endpoint.as_deref()).map_err(WatchError::Read)?;
        let at = Instant::now();
        let rates = Rates::between(&self.previous, &current, at - self.previous_at);
        self.previous = current;
        self.previous_at = at;
        self.due += self.interval;
        // Fell behind (a slow read, or the process was stopped): start the schedule afresh
        // rather than firing the missed reads back to back.
        if self.due < at {
            self.due = at + self.interval;
        }
        Ok(rates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ipam::IpamUsage, stats::EndpointStatsView};

    fn counters(rx: u64, tx: u64, spoofed_ip: u64) -> EndpointStats {
        EndpointStats {
            rx_packets: rx,
            rx_bytes: rx * 100,
            tx_packets: tx,
            tx_bytes: tx * 100,
            drops: BTreeMap::from([("spoofed_ip", spoofed_ip), ("spoofed_mac", 0)]),
        }
    }

    fn ep(name: &str, ip: [u8; 4], c: Option<EndpointStats>) -> EndpointStatsView {
        EndpointStatsView {
            cni: None,
            name: name.into(),
            kind: EndpointKind::Netns,
            ip: Ipv4Addr::from(ip),
            link: format!("mpv-{name}"),
            counters: c,
        }
    }

    fn ebpf(endpoints: Vec<EndpointStatsView>) -> Stats {
        Stats {
            ipam: IpamUsage::default(),
            datapath: ActiveDatapath::Ebpf,
            endpoints,
            nat: Some(NatTableStats {
                entries: 4,
                capacity: 1024,
                flows: 2,
                ..Default::default()
            }),
        }
    }

    fn only(rates: &Rates, name: &str) -> EndpointRates {
        rates
            .endpoints
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no {name} in {rates:?}"))
            .clone()
    }

    #[test]
    fn rates_are_differences_over_the_elapsed_time() {
        let a = ebpf(vec![ep("a", [10, 0, 0, 2], Some(counters(10, 20, 1)))]);
        let b = ebpf(vec![ep("a", [10, 0, 0, 2], Some(counters(110, 420, 5)))]);
        let r = Rates::between(&a, &b, Duration::from_millis(500));
        assert_eq!(r.interval_seconds, 0.5);
        let a = only(&r, "a");
        assert_eq!(a.unknown, None);
        assert!(!a.counters_reset);
        let c = a.rates.expect("a rate");
        assert_eq!(c.rx_packets, 200.0);
        assert_eq!(c.rx_bytes, 20_000.0);
        assert_eq!(c.tx_packets, 800.0);
        assert_eq!(c.tx_bytes, 80_000.0);
        assert_eq!(c.drops, 8.0);
        assert_eq!(c.drops_by_reason["spoofed_ip"], 8.0);
        assert_eq!(c.drops_by_reason["spoofed_mac"], 0.0);
        assert_eq!(r.nat.expect("nat").entries, 4);
    }

    #[test]
    fn drops_sum_over_every_reason() {
        let mut then = counters(0, 0, 0);
        let mut now = counters(0, 0, 3);
        then.drops.insert("nat_no_port", 1);
        now.drops.insert("nat_no_port", 2);
        now.drops.insert("spoofed_arp", 6);
        let a = ebpf(vec![ep("a", [10, 0, 0, 2], Some(then))]);
        let b = ebpf(vec![ep("a", [10, 0, 0, 2], Some(now))]);
        let c = only(&Rates::between(&a, &b, Duration::from_secs(1)), "a")
            .rates
            .unwrap();
        assert_eq!(c.drops, 3.0 + 1.0 + 6.0);
        assert_eq!(c.drops_by_reason["spoofed_arp"], 6.0);
        assert_eq!(c.drops_by_reason["nat_no_port"], 1.0);
    }

    #[test]
    fn idle_endpoint_has_a_zero_rate_not_an_unknown_one() {
        let a = ebpf(vec![ep("a", [10, 0, 0, 2], Some(counters(7, 7, 0)))]);
        let r = Rates::between(&a, &a.clone(), Duration::from_secs(1));
        let c = only(&r, "a").rates.expect("known");
        assert_eq!(
            c,
            CounterRates {
                drops_by_reason: BTreeMap::from([("spoofed_ip", 0.0), ("spoofed_mac", 0.0)]),
                ..Default::default()
            }
        );
    }

    #[test]
    fn new_endpoint_is_unknown_for_its_first_interval() {
        let a = ebpf(vec![ep("a", [10, 0, 0, 2], Some(counters(1, 1, 0)))]);
        let b = ebpf(vec![
            ep("a", [10, 0, 0, 2], Some(counters(2, 2, 0))),
            ep("b", [10, 0, 0, 3], Some(counters(50, 50, 0))),
        ]);
        let c = ebpf(vec![
            ep("a", [10, 0, 0, 2], Some(counters(2, 2, 0))),
            ep("b", [10, 0, 0, 3], Some(counters(60, 50, 0))),
        ]);
        let first = Rates::between(&a, &b, Duration::from_secs(1));
        assert_eq!(first.endpoints.len(), 2);
        let b1 = only(&first, "b");
        assert_eq!(b1.rates, None);
        assert_eq!(b1.unknown, Some(Unknown::NewEndpoint));
        assert!(only(&first, "a").rates.is_some());
        let second = Rates::between(&b, &c, Duration::from_secs(1));
        assert_eq!(only(&second, "b").rates.unwrap().rx_packets, 10.0);
    }

    #[test]
    fn same_name_with_another_address_is_a_new_endpoint() {
        let a = ebpf(vec![ep("a", [10, 0, 0, 2], Some(counters(1, 1, 0)))]);
        let b = ebpf(vec![ep("a", [10, 0, 0, 9], Some(counters(5, 5, 0)))]);
        let r = only(&Rates::between(&a, &b, Duration::from_secs(1)), "a");
        assert_eq!(r.unknown, Some(Unknown::NewEndpoint));
        assert_eq!(r.rates, None);
    }

    #[test]
    fn detached_endpoints_vanish() {
        let a = ebpf(vec![
            ep("a", [10, 0, 0, 2], Some(counters(1, 1, 0))),
            ep("b", [10, 0, 0, 3], Some(counters(1, 1, 0))),
        ]);
        let b = ebpf(vec![ep("b", [10, 0, 0, 3], Some(counters(1, 1, 0)))]);
        let r = Rates::between(&a, &b, Duration::from_secs(1));
        let names: Vec<_> = r.endpoints.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["b"]);
    }

    #[test]
    fn counters_going_backwards_count_from_zero() {
        // Detached and attached again with the same name and address: the map entry is new.
        let a = ebpf(vec![ep("a", [10, 0, 0, 2], Some(counters(1000, 1000, 0)))]);
        let b = ebpf(vec![ep("a", [10, 0, 0, 2], Some(counters(30, 2000, 0)))]);
        let r = only(&Rates::between(&a, &b, Duration::from_secs(2)), "a");
        assert!(r.counters_reset);
        let c = r.rates.expect("a rate from zero");
        assert_eq!(c.rx_packets, 15.0);
        // Every counter counts from zero, also the one that happened to grow past its old value.
        assert_eq!(c.tx_packets, 1000.0);
    }

    #[test]
    fn a_drop_counter_going_backwards_is_a_reset_too() {
        let a = ebpf(vec![ep("a", [10, 0, 0, 2], Some(counters(5, 5, 9)))]);
        let b = ebpf(vec![ep("a", [10, 0, 0, 2], Some(counters(6, 6, 1)))]);
        let r = only(&Rates::between(&a, &b, Duration::from_secs(1)), "a");
        assert!(r.counters_reset);
        assert_eq!(r.rates.unwrap().rx_packets, 6.0);
    }

    #[test]
    fn netfilter_lists_endpoints_without_rates() {
        let nf = Stats {
            ipam: IpamUsage::default(),
            datapath: ActiveDatapath::Netfilter,
            endpoints: vec![ep("a", [10, 0, 0, 2], None)],
            nat: None,
        };
        let r = Rates::between(&nf, &nf.clone(), Duration::from_secs(1));
        assert_eq!(r.datapath, ActiveDatapath::Netfilter);
        let a = only(&r, "a");
        assert_eq!(a.rates, None);
        assert_eq!(a.unknown, Some(Unknown::NoCounters));
        assert!(r.nat.is_none());
    }

    #[test]
    fn switching_to_ebpf_in_between_has_no_rate_yet() {
        let nf = Stats {
            ipam: IpamUsage::default(),
            datapath: ActiveDatapath::Netfilter,
            endpoints: vec![ep("a", [10, 0, 0, 2], None)],
            nat: None,
        };
        let b = ebpf(vec![ep("a", [10, 0, 0, 2], Some(counters(3, 3, 0)))]);
        let a = only(&Rates::between(&nf, &b, Duration::from_secs(1)), "a");
        assert_eq!(a.unknown, Some(Unknown::NewEndpoint));
    }

    #[test]
    fn zero_elapsed_time_gives_no_rate() {
        let a = ebpf(vec![ep("a", [10, 0, 0, 2], Some(counters(1, 1, 0)))]);
        let r = Rates::between(&a, &a.clone(), Duration::ZERO);
        assert_eq!(only(&r, "a").rates, None);
    }

    #[test]
    fn json_shape() {
        let a = ebpf(vec![
            ep("a", [10, 0, 0, 2], Some(counters(0, 0, 0))),
            ep("b", [10, 0, 0, 3], None),
        ]);
        let mut b = a.clone();
        b.endpoints[0].counters = Some(counters(4, 0, 0));
        let v = serde_json::to_value(Rates::between(&a, &b, Duration::from_secs(2))).unwrap();
        assert_eq!(v["interval_seconds"], 2.0);
        assert_eq!(v["datapath"], "ebpf");
        assert_eq!(v["endpoints"][0]["name"], "a");
        assert_eq!(v["endpoints"][0]["ip"], "10.0.0.2");
        assert_eq!(v["endpoints"][0]["rates"]["rx_packets"], 2.0);
        assert_eq!(
            v["endpoints"][0]["rates"]["drops_by_reason"]["spoofed_ip"],
            0.0
        );
        assert!(v["endpoints"][0].get("unknown").is_none());
        assert!(v["endpoints"][0].get("counters_reset").is_none());
        assert!(v["endpoints"][1]["rates"].is_null());
        assert_eq!(v["endpoints"][1]["unknown"], "no_counters");
        assert_eq!(v["nat"]["entries"], 4);
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_interval("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_interval("3600").unwrap(), MAX_INTERVAL);
        for bad in [
            "0", "-1", "3600.5", "nan", "inf", "", "abc", "1s", "1e-12", "-0",
        ] {
            let err = parse_interval(bad).expect_err(bad);
            assert!(err.to_string().contains("at most 3600"), "{err}");
        }
    }
}
