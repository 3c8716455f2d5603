//! `micropod stats --watch`: printing around [`micropod::stats::watch::Watch`].

use std::{
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use micropod::{
    network::{ActiveDatapath, Network},
    stats::watch::{CounterRates, EndpointRates, Rates, Unknown, Watch},
};
use serde::Serialize;

/// The `--watch` flags of `micropod stats`.
#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Print per-second rates every --interval until interrupted. On a terminal the table is
    /// redrawn in place. Otherwise one line per endpoint per interval:
    /// `TIME endpoint NAME IP RX_PKT/S RX_BYTES/S TX_PKT/S TX_BYTES/S DROPS/S`, then
    /// `TIME nat ENTRIES FLOWS CAPACITY` on the eBPF data path (`-` for a rate not known yet).
    /// With --json, one JSON object per interval.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between refreshes (a decimal number, greater than 0, at most 3600).
    #[arg(
        long,
        value_name = "SECS",
        default_value = "1",
        value_parser = parse_interval,
        requires = "watch"
    )]
    pub interval: Duration,
    /// Stop after N refreshes.
    #[arg(long, value_name = "N", value_parser = parse_count, requires = "watch")]
    pub count: Option<u64>,
}

fn parse_interval(input: &str) -> Result<Duration, String> {
    micropod::stats::watch::parse_interval(input).map_err(|e| e.to_string())
}

fn parse_count(input: &str) -> Result<u64, String> {
    match input.parse::<u64>() {
        Ok(0) => Err("the count must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{input:?} is not a whole number of refreshes: {e}")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    /// A terminal: clear it and redraw the table.
    Screen,
    /// A pipe or file: plain lines, one per endpoint.
    Lines,
    /// JSON lines, one object per interval.
    Json,
}

/// `micropod stats [ENDPOINT] --watch [--interval SECS] [--count N] [--json]`.
pub(super) fn run(
    network: &Network,
    endpoint: Option<&str>,
    json: bool,
    args: &Args,
) -> anyhow::Result<()> {
    // The first read fails here for a network that is down or an unknown endpoint, before
    // anything is printed.
    let mut watch = Watch::start(network, endpoint, args.interval)?;
    let stdout = std::io::stdout();
    let style = if json {
        Style::Json
    } else if stdout.is_terminal() {
        Style::Screen
    } else {
        Style::Lines
    };
    let mut out = stdout.lock();
    let mut refreshes = 0u64;
    while args.count.is_none_or(|n| refreshes < n) {
        let rates = watch.next_rates()?;
        let at = SystemTime::now();
        let text = match style {
            Style::Screen => screen(&rates, at, args.interval),
            Style::Lines => lines(&rates, at),
            Style::Json => json_line(&rates, at)?,
        };
        // Flushed every interval: a pipe would otherwise hold the lines back.
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            // The reader is gone (`| head -n 3`): that ends the watch, it is no failure.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            result => result.context("cannot write to stdout")?,
        }
        refreshes += 1;
    }
    Ok(())
}

/// Cursor home and clear screen, then the table.
const REDRAW: &str = "\x1b[H\x1b[2J";

fn screen(rates: &Rates, at: SystemTime, interval: Duration) -> String {
    let mut s = String::from(REDRAW);
    let _ = writeln!(
        s,
        "micropod stats  every {}s  {}  datapath {}",
        interval.as_secs_f64(),
        rfc3339(at),
        rates.datapath
    );
    if rates.datapath != ActiveDatapath::Ebpf {
        s.push_str("(no rates: the netfilter data path does not count per endpoint)\n");
    }
    let w = super::name_width(rates.endpoints.iter().map(|e| e.name.as_str()), 16);
    let _ = writeln!(
        s,
        "{:<w$} {:<15} {:>10} {:>11} {:>10} {:>11} {:>9}  NOTE",
        "ENDPOINT", "IP", "RX PKT/S", "RX BYTES/S", "TX PKT/S", "TX BYTES/S", "DROPS/S"
    );
    for ep in &rates.endpoints {
        let r = ep.rates.as_ref();
        let shown = |f: fn(&CounterRates) -> f64, unit: fn(f64) -> String| {
            r.map_or_else(|| "-".to_owned(), |r| unit(f(r)))
        };
        let _ = writeln!(
            s,
            "{:<w$} {:<15} {:>10} {:>11} {:>10} {:>11} {:>9}  {}",
            ep.name,
            ep.ip.to_string(),
            shown(|r| r.rx_packets, packets),
            shown(|r| r.rx_bytes, bytes),
            shown(|r| r.tx_packets, packets),
            shown(|r| r.tx_bytes, bytes),
            shown(|r| r.drops, per_second),
            note(ep),
        );
    }
    if let Some(nat) = &rates.nat {
        let _ = writeln!(
            s,
            "nat: {} flows, {} of {} entries",
            nat.flows, nat.entries, nat.capacity
        );
    }
    s
}

fn note(ep: &EndpointRates) -> &'static str {
    match (ep.unknown, ep.counters_reset) {
        (Some(Unknown::NewEndpoint), _) => "new",
        (_, true) => "counters restarted",
        _ => "",
    }
}

/// Packets per second in human units (1000-based, as network rates are).
fn packets(rate: f64) -> String {
    scaled(rate, &["pps", "kpps", "Mpps", "Gpps"])
}

/// Bytes per second in human units (1000-based).
fn bytes(rate: f64) -> String {
    scaled(rate, &["B/s", "kB/s", "MB/s", "GB/s", "TB/s"])
}

fn per_second(rate: f64) -> String {
    scaled(rate, &["/s", "k/s", "M/s", "G/s"])
}

fn scaled(mut value: f64, units: &[&str]) -> String {
    let mut unit = 0;
    while value >= 999.95 && unit + 1 < units.len() {
        value /= 1000.0;
        unit += 1;
    }
    // Whole numbers stay whole (`0 pps`, `200 pps`); fractions keep one decimal.
    if unit == 0 && value.fract() == 0.0 {
        format!("{value:.0} {}", units[unit])
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

fn lines(rates: &Rates, at: SystemTime) -> String {
    let at = rfc3339(at);
    let mut s = String::new();
    let num = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    for ep in &rates.endpoints {
        let r = ep.rates.as_ref();
        let _ = writeln!(
            s,
            "{at} endpoint {} {} {} {} {} {} {}",
            ep.name,
            ep.ip,
            num(r.map(|r| r.rx_packets)),
            num(r.map(|r| r.rx_bytes)),
            num(r.map(|r| r.tx_packets)),
            num(r.map(|r| r.tx_bytes)),
            num(r.map(|r| r.drops)),
        );
    }
    if let Some(nat) = &rates.nat {
        let _ = writeln!(s, "{at} nat {} {} {}", nat.entries, nat.flows, nat.capacity);
    }
    s
}

#[derive(Serialize)]
struct JsonLine<'a> {
    at: String,
    #[serde(flatten)]
    rates: &'a Rates,
}

fn json_line(rates: &Rates, at: SystemTime) -> anyhow::Result<String> {
    let mut line = serde_json::to_string(&JsonLine {
        at: rfc3339(at),
        rates,
    })?;
    line.push('\n');
    Ok(line)
}

/// `at` in RFC 3339, UTC, to the millisecond: `2025-06-01T12:00:00.250Z`.
fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`,
/// for days ≥ 0).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use micropod::{datapath::NatTableStats, network::EndpointKind};

    use super::*;

    fn rates() -> Rates {
        let ep = |name: &str, last: u8, rates, unknown| EndpointRates {
            name: name.into(),
            kind: EndpointKind::Netns,
            ip: Ipv4Addr::new(10, 10, 0, last),
            link: format!("mpv-{name}"),
            cni: None,
            rates,
            unknown,
            counters_reset: false,
        };
        Rates {
            interval_seconds: 0.5,
            datapath: ActiveDatapath::Ebpf,
            endpoints: vec![
                ep(
                    "sender",
                    2,
                    Some(CounterRates {
                        rx_packets: 0.0,
                        rx_bytes: 0.0,
                        tx_packets: 200.0,
                        tx_bytes: 1_234_000.0,
                        drops: 2.0,
                        drops_by_reason: BTreeMap::from([("spoofed_ip", 2.0)]),
                    }),
                    None,
                ),
                ep("fresh", 3, None, Some(Unknown::NewEndpoint)),
            ],
            nat: Some(NatTableStats {
                entries: 4,
                flows: 2,
                capacity: 1024,
                ..Default::default()
            }),
        }
    }

    fn at() -> SystemTime {
        // 2024-02-29T23:59:58.250Z
        UNIX_EPOCH + Duration::from_millis(1_709_251_198_250)
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at()), "2024-02-29T23:59:58.250Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(4_102_444_799)),
            "2099-12-31T23:59:59.000Z"
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(packets(0.0), "0 pps");
        assert_eq!(packets(200.0), "200 pps");
        assert_eq!(packets(0.5), "0.5 pps");
        assert_eq!(packets(3_400.0), "3.4 kpps");
        assert_eq!(packets(999.96), "1.0 kpps");
        assert_eq!(bytes(1_234_000.0), "1.2 MB/s");
        assert_eq!(bytes(5e15), "5000.0 TB/s");
        assert_eq!(per_second(2.0), "2 /s");
    }

    #[test]
    fn plain_lines_have_stable_columns() {
        let text = lines(&rates(), at());
        let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
        assert_eq!(rows.len(), 3, "{text}");
        assert_eq!(
            rows[0],
            [
                "2024-02-29T23:59:58.250Z",
                "endpoint",
                "sender",
                "10.10.0.2",
                "0.0",
                "0.0",
                "200.0",
                "1234000.0",
                "2.0"
            ]
        );
        assert_eq!(
            rows[1][2..],
            ["fresh", "10.10.0.3", "-", "-", "-", "-", "-"]
        );
        assert_eq!(rows[2][1..], ["nat", "4", "2", "1024"]);
    }

    #[test]
    fn screen_redraws_with_human_units() {
        let text = screen(&rates(), at(), Duration::from_millis(500));
        assert!(text.starts_with(REDRAW));
        assert!(text.contains("every 0.5s"), "{text}");
        let sender = text.lines().find(|l| l.starts_with("sender")).unwrap();
        assert!(
            sender.contains("200 pps") && sender.contains("1.2 MB/s"),
            "{sender}"
        );
        let fresh = text.lines().find(|l| l.starts_with("fresh")).unwrap();
        assert!(fresh.trim_end().ends_with("new"), "{fresh}");
        assert!(text.contains("nat: 2 flows, 4 of 1024 entries"), "{text}");
    }

    #[test]
    fn json_line_is_one_object_with_a_timestamp() {
        let text = json_line(&rates(), at()).unwrap();
        assert_eq!(text.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["at"], "2024-02-29T23:59:58.250Z");
        assert_eq!(v["interval_seconds"], 0.5);
        assert_eq!(v["endpoints"][0]["rates"]["tx_packets"], 200.0);
        assert!(v["endpoints"][1]["rates"].is_null());
        assert_eq!(v["nat"]["entries"], 4);
    }

    #[test]
    fn counts() {
        assert_eq!(parse_count("3"), Ok(3));
        assert!(parse_count("0").unwrap_err().contains("at least 1"));
        assert!(parse_count("-1").is_err());
        assert!(parse_count("x").is_err());
    }
}
