//! The `count_src` TC program counts real packets per IPv4 source, exactly.
//!
//! Needs root and a micropod built with its eBPF object (`cargo xtask test`).

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    sync::{Arc, Mutex},
};

use ipnetwork::{IpNetwork, Ipv4Network};
use micropod::datapath::{Direction, SourceCounter, read_pinned_counters};
use micropod_common::PacketCounters;
use micropod_tests::{CountSources, TestDirs, VethLab, micropod_bin, send_and_confirm, warm_up};

// TEST-NET-1 (RFC 5737): only ever inside the test's own namespaces.
const A1: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const A2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
const B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// Ethernet + IPv4 + UDP headers: what the TC hook sees around each payload.
const FRAME_OVERHEAD: u64 = 14 + 20 + 8;

fn lab() -> VethLab {
    let net = |ip: Ipv4Addr| IpNetwork::V4(Ipv4Network::new(ip, 24).unwrap());
    VethLab::new(&[net(A1), net(A2)], &[net(B)])
}

fn expected(packets: u64, payload: u64) -> PacketCounters {
    PacketCounters {
        packets,
        bytes: packets * (FRAME_OVERHEAD + payload),
    }
}

/// Collects log records so the test can see what the eBPF program logged.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

#[test]
fn counts_packets_and_bytes_per_source_exactly() {
    let lab = lab();
    let rx = lab.b.udp(SocketAddr::new(B.into(), 9000));
    let tx1 = lab.a.udp(SocketAddr::new(A1.into(), 0));
    let tx2 = lab.a.udp(SocketAddr::new(A2.into(), 0));
    // ARP and link activation happen before the program is attached, so they are not counted.
    warm_up(&tx1, &rx);
    warm_up(&tx2, &rx);

    let logs = Capture::default();
    let mut counter =
        SourceCounter::load_with_logger(Box::new(logs.clone())).expect("loading count_src");
    counter
        .attach(lab.b.ns(), VethLab::B_IF, Direction::Ingress)
        .expect("attaching count_src");

    send_and_confirm(&tx1, &rx, 100, 200);
    send_and_confirm(&tx2, &rx, 37, 1000);

    let counters = counter.counters().expect("reading the map");
    let seen: Vec<_> = counters.iter().map(|(a, c)| (*a, *c)).collect();
    assert_eq!(
        seen,
        vec![(A1, expected(100, 200)), (A2, expected(37, 1000))],
        "per-source counters differ from the traffic sent"
    );

    // The program logs each new source once; aya-log brings that to userspace.
    counter.flush_logs();
    let logs = logs.0.lock().unwrap().clone();
    for src in [A1, A2] {
        let line = format!("counting new IPv4 source {src}");
        assert_eq!(
            logs.iter().filter(|l| **l == line).count(),
            1,
            "expected one log line {line:?}, got {logs:?}"
        );
    }
}

#[test]
fn egress_counts_what_leaves_the_interface() {
    let lab = lab();
    let rx = lab.b.udp(SocketAddr::new(B.into(), 9000));
    let tx = lab.a.udp(SocketAddr::new(A1.into(), 0));
    warm_up(&tx, &rx);

    let mut counter = SourceCounter::load().expect("loading count_src");
    // On A's side the datagrams leave through egress.
    counter
        .attach(lab.a.ns(), VethLab::A_IF, Direction::Egress)
        .expect("attaching count_src");
    send_and_confirm(&tx, &rx, 50, 64);

    let counters = counter.counters().expect("reading the map");
    assert_eq!(counters.get(&A1), Some(&expected(50, 64)), "{counters:?}");
    assert_eq!(counters.len(), 1, "only A1 sent IPv4: {counters:?}");
}

#[test]
fn detaches_when_dropped() {
    let lab = lab();
    let rx = lab.b.udp(SocketAddr::new(B.into(), 9000));
    let tx = lab.a.udp(SocketAddr::new(A1.into(), 0));
    warm_up(&tx, &rx);

    let mut first = SourceCounter::load().expect("loading count_src");
    first
        .attach(lab.b.ns(), VethLab::B_IF, Direction::Ingress)
        .expect("attaching count_src");
    drop(first);

    // A fresh instance sees only its own traffic: the dropped one left no program behind
    // (a leftover one would count into its own, now unreachable, map and do no harm, so check
    // the kernel's view too).
    let mut second = SourceCounter::load().expect("loading count_src");
    second
        .attach(lab.b.ns(), VethLab::B_IF, Direction::Ingress)
        .expect("attaching count_src again");
    send_and_confirm(&tx, &rx, 10, 10);
    assert_eq!(second.counters().unwrap().get(&A1), Some(&expected(10, 10)));
    assert_eq!(
        tcx_ingress_programs(&lab),
        1,
        "exactly one program on veth-b ingress"
    );
}

fn tcx_ingress_programs(lab: &VethLab) -> usize {
    let attached = lab.b.run(|| {
        aya::programs::SchedClassifier::query_tcx(c"veth-b", aya::programs::TcAttachType::Ingress)
    });
    attached.expect("querying TCX programs").1.len()
}

#[test]
fn killed_cli_leaves_no_program_behind() {
    let lab = lab();
    let run =
        CountSources::start(lab.b.path(), VethLab::B_IF, 60, false).expect("starting micropod");
    assert_eq!(
        tcx_ingress_programs(&lab),
        1,
        "count_src attached while the CLI runs"
    );
    run.kill().expect("killing micropod");
    // The TCX link is an fd of the process: the kernel detaches when the process dies.
    assert_eq!(
        tcx_ingress_programs(&lab),
        0,
        "program left on veth-b after kill -9"
    );
}

#[test]
fn pinned_counters_outlive_the_loader() {
    let lab = lab();
    let dirs = TestDirs::new("pin");
    let rx = lab.b.udp(SocketAddr::new(B.into(), 9000));
    let tx = lab.a.udp(SocketAddr::new(A2.into(), 0));
    warm_up(&tx, &rx);

    let pin = dirs.pins.join("src_counters");
    let mut counter = SourceCounter::load().expect("loading count_src");
    counter
        .attach(lab.b.ns(), VethLab::B_IF, Direction::Ingress)
        .expect("attaching count_src");
    counter.pin_counters(&pin).expect("pinning the map");
    send_and_confirm(&tx, &rx, 20, 300);
    drop(counter);

    // Another reader, after the program is detached, sees the same numbers through the pin;
    // traffic sent now is not counted.
    send_and_confirm(&tx, &rx, 5, 300);
    let counters = read_pinned_counters(&pin).expect("reading the pinned map");
    assert_eq!(
        counters.into_iter().collect::<Vec<_>>(),
        vec![(A2, expected(20, 300))]
    );
}

#[test]
fn cli_reports_counts_as_json() {
    let lab = lab();
    let rx = lab.b.udp(SocketAddr::new(B.into(), 9000));
    let tx = lab.a.udp(SocketAddr::new(A1.into(), 0));
    warm_up(&tx, &rx);

    // Traffic starts only once the CLI says it is counting.
    let run = CountSources::start(lab.b.path(), VethLab::B_IF, 3, true).expect("starting micropod");
    send_and_confirm(&tx, &rx, 25, 100);
    let (out, _) = run.finish().expect("waiting for micropod");
    assert!(out.status.success(), "micropod failed: {out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(
        json["sources"],
        serde_json::json!([{"addr": "192.0.2.1", "packets": 25, "bytes": 25 * (FRAME_OVERHEAD + 100)}]),
        "{json}"
    );
}

#[test]
fn cli_rejects_unknown_interface_and_namespace() {
    let out = Command::new(micropod_bin())
        .args([
            "count-sources",
            "--iface",
            "no-such-if0",
            "--netns",
            "/nonexistent/ns",
            "--duration",
            "1",
        ])
        .output()
        .expect("running micropod");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot open network namespace /nonexistent/ns"),
        "{err}"
    );

    let lab = lab();
    let out = Command::new(micropod_bin())
        .args([
            "count-sources",
            "--iface",
            "no-such-if0",
            "--duration",
            "1",
            "--netns",
        ])
        .arg(lab.b.path())
        .output()
        .expect("running micropod");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot attach count_src to no-such-if0"),
        "{err}"
    );
}
