//! `micropod metrics serve`, scraped over HTTP like Prometheus does, in namespaces the tests
//! make: the exporter runs in the lab's "host" namespace and every scrape is parsed with a
//! Prometheus text parser (prometheus-parse), then checked against the traffic the test sent
//! and the ports' kernel statistics.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::{Child, Stdio},
    thread,
    time::Duration,
};

use micropod_tests::{
    NsGuard,
    netlab::{NetLab, SERVER_ADDR, ip_json, query},
};
use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;

const UDP_PORT: u16 = 5353;
/// Ethernet + IPv4 + UDP headers: what a datagram adds to its payload on the wire.
const UDP_OVERHEAD: u64 = 14 + 20 + 8;

/// A running `micropod metrics serve` inside the lab's host namespace, ended by its PID.
struct Exporter {
    child: Child,
    addr: SocketAddr,
}

impl Exporter {
    fn start(lab: &NetLab) -> Self {
        let mut child = lab
            .micropod(["metrics", "serve", "--listen", "127.0.0.1:0"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the exporter");
        let mut line = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .expect("reading the exporter's first line");
        let addr = line
            .trim()
            .strip_prefix("micropod: serving metrics on http://")
            .and_then(|rest| rest.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("unexpected first line from the exporter: {line:?}"))
            .parse()
            .expect("the exporter's address");
        Self { child, addr }
    }

    /// `GET path` from inside `ns`: (status line, content type, body).
    fn get(&self, ns: &NsGuard, request: &str) -> (String, String, String) {
        let addr = self.addr;
        let mut stream = ns.run(|| TcpStream::connect(addr)).expect("connecting");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            stream,
            "{request}\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("reading");
        let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
        let status = head.lines().next().unwrap().to_owned();
        let content_type = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Type: "))
            .unwrap_or_default()
            .to_owned();
        (status, content_type, body.to_owned())
    }

    /// One scrape, parsed.
    fn scrape(&self, ns: &NsGuard) -> Metrics {
        let (status, content_type, body) = self.get(ns, "GET /metrics HTTP/1.1");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            content_type.starts_with("application/openmetrics-text; version=1.0.0"),
            "{content_type}"
        );
        Metrics::parse(body)
    }

    /// Resident memory in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix(" kB"))
            .and_then(|v| v.trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        // Our own child, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Metrics {
    text: String,
    scrape: Scrape,
}

impl Metrics {
    fn parse(text: String) -> Self {
        assert!(
            text.ends_with("# EOF\n"),
            "an OpenMetrics exposition ends with # EOF"
        );
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parsing");
        Self { text, scrape }
    }

    /// The value of `name` whose labels include `labels`; `None` if there is no such series.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self
            .scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                ref other => panic!("{name}: unexpected value {other:?}"),
            })
            .collect();
        assert!(found.len() <= 1, "{name} {labels:?} matches {found:?}");
        found.first().copied()
    }

    #[track_caller]
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let v = self
            .get(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{}", self.text));
        assert!(v >= 0.0 && v.fract() == 0.0, "{name} = {v}");
        v as u64
    }

    /// Every series name in the scrape.
    fn names(&self) -> BTreeSet<&str> {
        self.scrape
            .samples
            .iter()
            .map(|s| s.metric.as_str())
            .collect()
    }

    /// Names of the endpoints with a `micropod_endpoint_info` series.
    fn endpoints(&self) -> BTreeSet<String> {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == "micropod_endpoint_info")
            .map(|s| s.labels.get("endpoint").unwrap().to_owned())
            .collect()
    }

    /// An endpoint's [tx packets, tx bytes, rx packets, rx bytes].
    fn counters(&self, endpoint: &str) -> [u64; 4] {
        let l = [("endpoint", endpoint)];
        [
            self.value("micropod_endpoint_transmit_packets_total", &l),
            self.value("micropod_endpoint_transmit_bytes_total", &l),
            self.value("micropod_endpoint_receive_packets_total", &l),
            self.value("micropod_endpoint_receive_bytes_total", &l),
        ]
    }
}

/// Scrapes until `ep`'s counters equal its port's statistics read just before and after the
/// scrape: the host itself may still send a frame (an MLD report when the port came up)
/// between two reads.
#[track_caller]
fn assert_matches_port(lab: &NetLab, exporter: &Exporter, ep: &Ep) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let before = lab.port_stats(&ep.port);
        let ours = exporter.scrape(&lab.host).counters(&ep.name);
        let after = lab.port_stats(&ep.port);
        if before == after && ours == after {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}: scraped {ours:?}, port {} says {after:?}",
            ep.name,
            ep.port
        );
        thread::sleep(Duration::from_millis(200));
    }
}

fn delta(after: [u64; 4], before: [u64; 4]) -> [u64; 4] {
    std::array::from_fn(|i| after[i] - before[i])
}

struct Ep {
    name: String,
    ns: NsGuard,
    ip: Ipv4Addr,
    port: String,
}

/// Attaches a netns endpoint whose namespace sends nothing on its own: no IPv6, and static
/// neighbours for the gateway and the `peers`, so no ARP frame lands between two scrapes.
fn endpoint(lab: &NetLab, name: &str, extra: &[&str]) -> Ep {
    let ns = NsGuard::new(name);
    ns.run(|| std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1"))
        .expect("disabling IPv6 in the endpoint");
    let att = lab.attach_netns(name, &ns, extra);
    Ep {
        name: name.to_owned(),
        ip: att["ip"].as_str().unwrap().parse().unwrap(),
        port: att["link"].as_str().unwrap().to_owned(),
        ns,
    }
}

fn static_neighbour(ns: &NsGuard, ip: Ipv4Addr, mac: &str) {
    query(
        ns.path(),
        "ip",
        &[
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            mac,
            "nud",
            "permanent",
            "dev",
            "eth0",
        ],
    );
}

fn mac_of(ns: &std::path::Path, dev: &str) -> String {
    ip_json(ns, &["link", "show", "dev", dev])[0]["address"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A UDP echo server in the internet namespace.
fn udp_echo(ns: &NsGuard) {
    let sock = ns.udp(SocketAddr::from((SERVER_ADDR, UDP_PORT)));
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
}

fn send_echoes(sock: &UdpSocket, count: usize, payload: usize) {
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for i in 0..count {
        sock.send_to(&vec![i as u8; payload], (SERVER_ADDR, UDP_PORT))
            .unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = sock.recv_from(&mut buf).expect("the echo");
        assert_eq!(n, payload);
    }
}

/// A lab whose host sends no frames of its own to the endpoints: with IPv6 on, the bridge's
/// router solicitations and MLD reports (seconds after it comes up) would land in the
/// measured windows.
fn lab_with(tag: &str, datapath: &str) -> NetLab {
    let lab = NetLab::new(tag);
    lab.host.run(|| {
        for conf in ["all", "default"] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1")
                .expect("disabling IPv6 in the lab's host");
        }
    });
    lab.up(&["--datapath", datapath]);
    lab
}

#[test]
fn scraped_counters_match_the_traffic_sent_and_the_ports_statistics() {
    let lab = lab_with("metrics", "ebpf");
    udp_echo(&lab.internet);
    let a = endpoint(&lab, "alpha", &[]);
    let b = endpoint(&lab, "beta", &[]);
    let gateway_mac = mac_of(lab.host.path(), "micropod0");
    for (ep, peer) in [(&a, &b), (&b, &a)] {
        static_neighbour(&ep.ns, Ipv4Addr::new(10, 10, 0, 1), &gateway_mac);
        static_neighbour(&ep.ns, peer.ip, &mac_of(peer.ns.path(), "eth0"));
    }
    let exporter = Exporter::start(&lab);

    // Warm up: the NAT flow exists before the measured window.
    let a_sock = a.ns.udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    send_echoes(&a_sock, 1, 10);
    let a_rx = a.ns.udp(SocketAddr::from((a.ip, 7000)));
    let b_sock = b.ns.udp(SocketAddr::from((b.ip, 0)));

    let before = exporter.scrape(&lab.host);
    let (a0, b0) = (before.counters("alpha"), before.counters("beta"));
    let nat_out0 = before.value("micropod_nat_packets_total", &[("direction", "outbound")]);
    let nat_in0 = before.value("micropod_nat_packets_total", &[("direction", "inbound")]);

    // Known traffic: alpha ⇄ internet, 40 echoes of 200 bytes; beta → alpha, 30 datagrams of
    // 300 bytes.
    send_echoes(&a_sock, 40, 200);
    a_rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for _ in 0..30 {
        b_sock.send_to(&[7u8; 300], (a.ip, 7000)).unwrap();
        let mut buf = [0u8; 2048];
        assert_eq!(a_rx.recv_from(&mut buf).expect("beta → alpha").0, 300);
    }

    let after = exporter.scrape(&lab.host);
    let echo = 40 * (200 + UDP_OVERHEAD);
    let datagrams = 30 * (300 + UDP_OVERHEAD);
    assert_eq!(
        delta(after.counters("alpha"), a0),
        [40, echo, 40 + 30, echo + datagrams],
        "alpha: [tx packets, tx bytes, rx packets, rx bytes] over the window"
    );
    assert_eq!(
        delta(after.counters("beta"), b0),
        [30, datagrams, 0, 0],
        "beta over the window"
    );
    assert_eq!(
        after.value("micropod_nat_packets_total", &[("direction", "outbound")]) - nat_out0,
        40
    );
    assert_eq!(
        after.value("micropod_nat_packets_total", &[("direction", "inbound")]) - nat_in0,
        40
    );

    // Absolute values equal the kernel's own statistics of each port (endpoint tx = port rx).
    for ep in [&a, &b] {
        assert_matches_port(&lab, &exporter, ep);
    }

    // Labels, the other families, and the exposition's metadata.
    let ip = a.ip.to_string();
    let info = [
        ("endpoint", "alpha"),
        ("ip", ip.as_str()),
        ("kind", "netns"),
    ];
    assert_eq!(
        after.value(
            "micropod_endpoint_info",
            &[info[0], info[1], info[2], ("link", &a.port)]
        ),
        1
    );
    assert!(
        after
            .scrape
            .samples
            .iter()
            .all(|s| s.labels.get("vm").is_none()),
        "no VM here, so no vm label"
    );
    assert_eq!(
        after.value("micropod_endpoint_receive_bytes_total", &info),
        after.counters("alpha")[3]
    );
    for reason in [
        "spoofed_mac",
        "spoofed_ip",
        "spoofed_arp",
        "nat_table_full",
        "nat_no_port",
        "stacked_vlan",
    ] {
        let l = [("endpoint", "alpha"), ("reason", reason)];
        assert_eq!(
            after.value("micropod_endpoint_drops_total", &l),
            0,
            "{reason}"
        );
    }
    assert_eq!(after.value("micropod_up", &[]), 1);
    assert_eq!(after.value("micropod_datapath", &[("datapath", "ebpf")]), 1);
    assert_eq!(
        after.value("micropod_datapath", &[("datapath", "netfilter")]),
        0
    );
    assert_eq!(after.value("micropod_ipam_addresses_used", &[]), 2);
    assert_eq!(after.value("micropod_ipam_addresses_limit", &[]), 253);
    assert!(after.value("micropod_nat_flows", &[]) >= 1);
    assert!(after.value("micropod_nat_entries", &[]) >= 2);
    assert_eq!(after.value("micropod_nat_entries_limit", &[]), 131_072);
    assert!(after.value("micropod_nat_flows_created_total", &[]) >= 1);
    for reason in ["table_full", "no_port"] {
        let l = [("reason", reason)];
        assert_eq!(after.value("micropod_nat_allocation_failures_total", &l), 0);
    }
    let took = after
        .get("micropod_scrape_duration_seconds", &[])
        .expect("scrape duration");
    assert!(took > 0.0 && took < 1.0, "scrape took {took} s");
    for (family, kind) in [
        ("micropod_endpoint_receive_bytes", "counter"),
        ("micropod_endpoint_transmit_packets", "counter"),
        ("micropod_endpoint_drops", "counter"),
        ("micropod_endpoint", "info"),
        ("micropod_nat_entries", "gauge"),
        ("micropod_up", "gauge"),
    ] {
        assert!(
            after.text.contains(&format!("\n# TYPE {family} {kind}\n")),
            "TYPE line of {family}"
        );
        assert!(
            after.text.contains(&format!("# HELP {family} ")),
            "HELP of {family}"
        );
    }
    assert!(
        after
            .text
            .contains("# UNIT micropod_endpoint_receive_bytes bytes\n")
    );

    // The names the dashboard and the docs use all exist.
    dashboard_names_exist(&after);

    // Other paths and methods.
    let (status, _, _) = exporter.get(&lab.host, "GET /nope HTTP/1.1");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = exporter.get(&lab.host, "POST /metrics HTTP/1.1");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");

    // A long-running exporter stays small (the bench measures the release build).
    let rss = exporter.rss_kib();
    assert!(rss < 20 * 1024, "exporter RSS {rss} KiB");
}

/// Every `micropod_*` name in docs/grafana/micropod-dashboard.json and docs/metrics.md is a
/// series of the scrape (or a family name whose samples carry a suffix).
fn dashboard_names_exist(scrape: &Metrics) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let names = scrape.names();
    for doc in ["docs/grafana/micropod-dashboard.json", "docs/metrics.md"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap_or_else(|e| panic!("{doc}: {e}"));
        let mut rest = text.as_str();
        while let Some(at) = rest.find("micropod_") {
            rest = &rest[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            rest = &rest[end..];
            assert!(
                names.contains(name)
                    || ["_total", "_info", "_bytes", "_seconds"]
                        .iter()
                        .any(|suffix| names.contains(format!("{name}{suffix}").as_str()))
                    || ["micropod_nat_", "micropod_endpoint_"].contains(&name),
                "{doc} uses {name}, which the exporter does not serve"
            );
        }
    }
}

#[test]
fn series_follow_endpoint_churn_and_the_network_going_down_and_up() {
    let lab = lab_with("metrics-churn", "ebpf");
    udp_echo(&lab.internet);
    let a = endpoint(&lab, "alpha", &[]);
    let b = endpoint(&lab, "beta", &[]);
    let exporter = Exporter::start(&lab);
    let sock = b.ns.udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    send_echoes(&sock, 50, 500);
    let busy = exporter.scrape(&lab.host);
    assert_eq!(
        busy.endpoints(),
        BTreeSet::from(["alpha".into(), "beta".into()])
    );
    let old = busy.counters("beta");
    assert!(
        old[0] >= 50 && old[2] >= 50,
        "beta's traffic counted: {old:?}"
    );

    // Detached: its series vanish at once.
    lab.ok(["network", "detach", "beta"]);
    drop(b);
    let gone = exporter.scrape(&lab.host);
    assert_eq!(gone.endpoints(), BTreeSet::from(["alpha".into()]));
    assert!(
        !gone.text.contains("endpoint=\"beta\""),
        "no series of beta is left:\n{}",
        gone.text
    );
    assert_eq!(gone.value("micropod_ipam_addresses_used", &[]), 1);

    // The same address again, for a new endpoint: it starts from its own zero.
    let ip = busy
        .scrape
        .samples
        .iter()
        .find(|s| s.metric == "micropod_endpoint_info" && s.labels.get("endpoint") == Some("beta"))
        .and_then(|s| s.labels.get("ip"))
        .unwrap()
        .to_owned();
    let c = endpoint(&lab, "gamma", &["--ip", &ip]);
    assert_eq!(c.ip.to_string(), ip);
    assert_matches_port(&lab, &exporter, &c);
    let fresh = exporter.scrape(&lab.host);
    let counters = fresh.counters("gamma");
    assert!(
        counters[0] < old[0] && counters[2] < old[2],
        "gamma {counters:?} did not inherit beta's {old:?}"
    );
    assert_eq!(
        fresh.value(
            "micropod_endpoint_info",
            &[("endpoint", "gamma"), ("ip", &ip)]
        ),
        1
    );

    // Network down: a valid exposition that says so, from the same exporter.
    lab.ok(["network", "detach", "alpha"]);
    lab.ok(["network", "detach", "gamma"]);
    drop((a, c));
    lab.ok(["network", "down"]);
    let down = exporter.scrape(&lab.host);
    assert_eq!(down.value("micropod_up", &[]), 0);
    assert_eq!(
        down.names(),
        BTreeSet::from(["micropod_up", "micropod_scrape_duration_seconds"]),
        "only the exporter's own series while down"
    );

    // And back up, on the other data path: endpoints listed, no BPF counters.
    lab.up(&["--datapath", "netfilter"]);
    let d = endpoint(&lab, "delta", &[]);
    let up = exporter.scrape(&lab.host);
    assert_eq!(up.value("micropod_up", &[]), 1);
    assert_eq!(
        up.value("micropod_datapath", &[("datapath", "netfilter")]),
        1
    );
    assert_eq!(up.endpoints(), BTreeSet::from(["delta".into()]));
    assert!(
        up.get(
            "micropod_endpoint_transmit_packets_total",
            &[("endpoint", "delta")]
        )
        .is_none()
            && up.get("micropod_nat_entries", &[]).is_none(),
        "the netfilter data path has no BPF counters or NAT map"
    );
    lab.ok(["network", "detach", "delta"]);
    drop(d);
}

#[test]
fn bad_listen_addresses_are_refused_clearly() {
    let lab = NetLab::new("metrics-bad");
    let check = |args: &[&str], code: i32, says: &str| {
        let mut full = vec!["metrics", "serve"];
        full.extend_from_slice(args);
        let out = lab.micropod(&full).output().expect("running the exporter");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{full:?}: {stderr}");
        assert!(
            stderr.contains(says),
            "{full:?} says {stderr:?}, not {says:?}"
        );
    };
    // Someone already listens there (in the lab's host namespace).
    let taken = lab
        .host
        .run(|| TcpListener::bind("127.0.0.1:0"))
        .expect("a listener");
    let port = taken.local_addr().unwrap().to_string();
    check(&["--listen", &port], 1, "already in use");
    for bad in ["127.0.0.1", "localhost:9464", "1.2.3.4:99999", ":9464", ""] {
        check(&["--listen", bad], 2, "expected IP:PORT");
    }
    // Not an address of this namespace.
    check(
        &["--listen", "192.0.2.7:9464"],
        1,
        "cannot listen on 192.0.2.7:9464",
    );
    // No network at all: `print` still answers, with micropod_up 0.
    let out = lab.ok(["metrics", "print"]);
    let m = Metrics::parse(out);
    assert_eq!(m.value("micropod_up", &[]), 0);
    drop(taken);
    let _ = Json::Null;
}

/// The NAT map is read in batches of 1024: 5000 entries take several, and every entry is
/// counted once. The entries are written straight into the pinned map (the test is about the
/// reading; real flows are counted in the test above).
#[test]
fn a_nat_table_larger_than_one_batch_is_counted_exactly() {
    use aya::maps::{HashMap, MapData};
    use micropod_common::{NAT_INBOUND, NAT_MAP, NAT_OUTBOUND, NatEntry, NatKey};

    let lab = lab_with("metrics-nat", "ebpf");
    let exporter = Exporter::start(&lab);
    let pin = lab.dirs.pins.join("micropod/maps").join(NAT_MAP);
    let mut nat: HashMap<MapData, NatKey, NatEntry> = HashMap::try_from(aya::maps::Map::HashMap(
        MapData::from_pin(&pin).expect("NAT pin"),
    ))
    .expect("the NAT map");
    let keys: Vec<NatKey> = (0..5000u16)
        .map(|i| NatKey {
            src_ip: [192, 0, 2, (i % 250) as u8],
            dst_ip: [198, 51, 100, 10],
            src_port: (10_000 + i).to_be(),
            dst_port: 80u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        })
        .collect();
    for (i, key) in keys.iter().enumerate() {
        let entry = NatEntry {
            last_seen_ns: 0,
            addr: [203, 0, 113, 1],
            port: key.src_port,
            direction: if i % 2 == 0 {
                NAT_INBOUND
            } else {
                NAT_OUTBOUND
            },
            tcp_state: 0,
        };
        nat.insert(key, &entry, 0).expect("inserting");
    }
    let full = exporter.scrape(&lab.host);
    assert_eq!(full.value("micropod_nat_entries", &[]), 5000);
    assert_eq!(full.value("micropod_nat_flows", &[]), 2500);
    for key in &keys {
        nat.remove(key).expect("removing");
    }
    let empty = exporter.scrape(&lab.host);
    assert_eq!(empty.value("micropod_nat_entries", &[]), 0);
    assert_eq!(empty.value("micropod_nat_flows", &[]), 0);
}

/// An endpoint on record whose counters entry is missing (as between the two reads of an
/// attach or detach in flight; here the entry is deleted by hand) has no counter series for
/// that scrape: zeros would read as a counter reset.
#[test]
fn an_endpoint_without_its_map_entry_gets_no_counter_series_not_zeros() {
    use aya::maps::{MapData, PerCpuHashMap};
    use micropod_common::{ENDPOINT_COUNTERS_MAP, EndpointCounters, Ipv4Key};

    let lab = lab_with("metrics-gap", "ebpf");
    let a = endpoint(&lab, "alpha", &[]);
    let exporter = Exporter::start(&lab);
    let sock = a.ns.udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    sock.send_to(b"hello", (SERVER_ADDR, UDP_PORT)).unwrap();
    let before = exporter.scrape(&lab.host);
    assert!(before.counters("alpha")[0] >= 1, "alpha sent a datagram");

    let pin = lab
        .dirs
        .pins
        .join("micropod/maps")
        .join(ENDPOINT_COUNTERS_MAP);
    let mut counters: PerCpuHashMap<MapData, Ipv4Key, EndpointCounters> = PerCpuHashMap::try_from(
        aya::maps::Map::PerCpuHashMap(MapData::from_pin(&pin).expect("EP_COUNTERS pin")),
    )
    .expect("the counters map");
    counters
        .remove(&Ipv4Key {
            addr: a.ip.octets(),
        })
        .expect("removing alpha's entry");
    let gap = exporter.scrape(&lab.host);
    assert_eq!(
        gap.endpoints(),
        BTreeSet::from(["alpha".into()]),
        "still on record"
    );
    for name in [
        "micropod_endpoint_receive_packets_total",
        "micropod_endpoint_transmit_bytes_total",
        "micropod_endpoint_drops_total",
    ] {
        assert!(
            gap.get(name, &[("endpoint", "alpha"), ("reason", "spoofed_ip")])
                .is_none()
                && gap.get(name, &[("endpoint", "alpha")]).is_none(),
            "{name} of alpha while its entry is missing:\n{}",
            gap.text
        );
    }
}
