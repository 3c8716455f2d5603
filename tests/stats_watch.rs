//! `micropod stats --watch`, end to end: a lab with two netns endpoints on the eBPF data path,
//! one sending a steady, known UDP stream to the lab's internet, the other idle; the watch runs
//! with its stdout piped (plain lines, JSON lines) and on a pty (`script`), and must report the
//! rate that was sent. Bad input and a network that is down, or goes down mid-watch, fail
//! clearly.

use std::{
    ffi::OsStr,
    fs::File,
    io::{BufRead as _, BufReader, Read as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use micropod_tests::{
    NsGuard,
    netlab::{NetLab, SERVER_ADDR, in_netns},
    warm_up,
};
use serde_json::Value;

const UDP_PORT: u16 = 5400;
/// The sender's pace, and how long it keeps it up: longer than the watches below take
/// (start-up, a first read, 4 × 0.5 s).
const RATE: u64 = 200;
const SEND_FOR: Duration = Duration::from_secs(4);
const PAYLOAD: usize = 100;
/// Ethernet + IPv4 + UDP headers: the counters count whole L2 frames.
const FRAME: f64 = (14 + 20 + 8 + PAYLOAD) as f64;

/// Lets a watch at most this long before it counts as hung (it is killed by its PID).
const WATCH_DEADLINE: Duration = Duration::from_secs(30);

struct Lab {
    net: NetLab,
    /// (name, namespace, address)
    eps: Vec<(String, NsGuard, Ipv4Addr)>,
}

impl Lab {
    fn new(tag: &str, datapath: &str, names: &[&str]) -> Self {
        let net = NetLab::new(tag);
        // No IPv6 on the host side either: the bridge's multicast listener reports and
        // neighbour discovery would reach the idle endpoint in the first second.
        net.host
            .run(|| {
                ["all", "default"].iter().try_for_each(|conf| {
                    std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1")
                })
            })
            .expect("disabling IPv6 in the lab's host");
        net.up(&["--datapath", datapath]);
        let eps = names
            .iter()
            .map(|name| {
                let ns = NsGuard::new(&format!("{tag}-{name}"));
                // No IPv6: router solicitations and MLD reports would make the idle endpoint
                // send.
                ns.run(|| std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1"))
                    .expect("disabling IPv6 in the endpoint");
                let att = net.attach_netns(name, &ns, &[]);
                let ip = att["ip"].as_str().unwrap().parse().unwrap();
                ((*name).to_owned(), ns, ip)
            })
            .collect();
        Self { net, eps }
    }

    fn ep(&self, name: &str) -> &(String, NsGuard, Ipv4Addr) {
        self.eps.iter().find(|e| e.0 == name).unwrap()
    }
}

/// A paced UDP stream from `ns` to the lab's server: `RATE` datagrams a second for `SEND_FOR`,
/// on a fixed schedule (a late wake-up sends the missed datagrams at once, so every window of
/// a few hundred milliseconds holds the right number). Returns once the path is warm (ARP
/// resolved, NAT flow made) and the stream has started.
struct Stream {
    sender: Option<thread::JoinHandle<u64>>,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    receiver: Option<thread::JoinHandle<()>>,
}

impl Stream {
    fn start(lab: &Lab, from: &NsGuard) -> Self {
        let server = SocketAddr::V4(SocketAddrV4::new(SERVER_ADDR, UDP_PORT));
        let to = lab.net.internet.udp(server);
        let from = from.udp(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)));
        warm_up(&from, &to);
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let receiver = {
            let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
            to.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, _)) = to.recv_from(&mut buf)
                        && n == PAYLOAD
                    {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let sender = thread::spawn(move || {
            let data = [0x5au8; PAYLOAD];
            let start = Instant::now();
            let total = RATE * SEND_FOR.as_secs();
            for i in 0..total {
                let due = start + Duration::from_secs(i) / RATE as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
                from.send_to(&data, server).expect("sending a datagram");
            }
            total
        });
        Self {
            sender: Some(sender),
            received,
            stop,
            receiver: Some(receiver),
        }
    }

    /// Waits for the end of the stream; returns (sent, received).
    fn finish(mut self) -> (u64, u64) {
        let sent = self.sender.take().unwrap().join().expect("sender thread");
        thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        self.receiver
            .take()
            .unwrap()
            .join()
            .expect("receiver thread");
        (sent, self.received.load(Ordering::Relaxed))
    }
}

/// Waits for `child` until [`WATCH_DEADLINE`]; kills it (our own child, by PID) if it is still
/// running then. Returns its output.
#[track_caller]
fn finish(mut child: Child, what: &str) -> Output {
    let deadline = Instant::now() + WATCH_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the watch") {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().expect("killing a hung watch");
            child.wait().expect("reaping it");
            panic!("{what} still running after {WATCH_DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    // Absent when the caller reads it.
    if let Some(mut out) = child.stdout.take() {
        out.read_to_end(&mut stdout).unwrap();
    }
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut stderr)
        .unwrap();
    Output {
        status,
        stdout,
        stderr,
    }
}

#[track_caller]
fn success(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}): {stderr}",
        out.status
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 output")
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting micropod")
}

/// `micropod ARGS` on a pty: `script -qec CMD /dev/null` (util-linux), inside the lab's host
/// namespace. The file must stay open until the command is spawned (its setns hook uses it).
fn on_pty(lab: &NetLab, args: &[&str]) -> (Command, File) {
    let inner = lab.micropod(args);
    let quote = |s: &OsStr| format!("'{}'", s.to_str().unwrap().replace('\'', r"'\''"));
    let line: Vec<String> = std::iter::once(inner.get_program())
        .chain(inner.get_args())
        .map(quote)
        .collect();
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &line.join(" "), "/dev/null"])
        .env("MICROPOD_LOG", "warn")
        .stdin(Stdio::null());
    let host = File::open(lab.host.path()).expect("opening the host namespace");
    in_netns(&mut cmd, &host);
    (cmd, host)
}

/// The 24-character UTC timestamp of the plain lines: `2025-06-01T12:00:00.250Z`.
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b[23] == b'Z'
        && b[10] == b'T'
        && [4, 7].iter().all(|&i| b[i] == b'-')
        && [13, 16].iter().all(|&i| b[i] == b':')
        && b[19] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 13, 16, 19, 23].contains(&i) || c.is_ascii_digit())
}

/// The sender's rate as one interval reports it: within 25 % of what was sent.
fn assert_sender_rate(pps: f64, what: &str) {
    let (lo, hi) = (RATE as f64 * 0.75, RATE as f64 * 1.25);
    assert!(
        (lo..=hi).contains(&pps),
        "{what}: sender tx {pps} pps, sent {RATE}/s"
    );
}

/// Idle: a stray frame or two at most (ARP refresh).
fn assert_idle(pps: f64, what: &str) {
    assert!(pps <= 6.0, "{what}: idle endpoint at {pps} pps");
}

#[test]
fn watch_reports_the_rate_that_was_sent_as_lines_json_and_on_a_terminal() {
    let lab = Lab::new("watch", "ebpf", &["sender", "idle"]);
    let (_, sender_ns, sender_ip) = lab.ep("sender");
    let (_, _, idle_ip) = lab.ep("idle");
    let stream = Stream::start(&lab, sender_ns);
    thread::sleep(Duration::from_millis(300));

    let watch = ["stats", "--watch", "--interval", "0.5", "--count", "4"];
    let lines = spawn(&mut lab.net.micropod(watch));
    let json = spawn(&mut lab.net.micropod(watch.iter().chain(&["--json"])));
    let (mut pty, _host) = on_pty(
        &lab.net,
        &["stats", "--watch", "--interval", "0.5", "--count", "2"],
    );
    let pty = spawn(&mut pty);
    let lines = success(&finish(lines, "plain watch"), "plain watch");
    let json = success(&finish(json, "JSON watch"), "JSON watch");
    let pty = success(&finish(pty, "watch on a pty"), "watch on a pty");
    let (sent, received) = stream.finish();
    assert!(
        received * 10 >= sent * 9,
        "only {received} of {sent} datagrams reached the server"
    );

    // Plain lines: per interval one line per endpoint, then the NAT line.
    let rows: Vec<Vec<&str>> = lines.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(
        rows.len(),
        4 * 3,
        "4 intervals × (2 endpoints + nat):\n{lines}"
    );
    let mut stamps = Vec::new();
    for (i, interval) in rows.chunks(3).enumerate() {
        let what = format!("plain interval {i}:\n{lines}");
        assert!(is_timestamp(interval[0][0]), "{what}");
        assert!(interval.iter().all(|r| r[0] == interval[0][0]), "{what}");
        stamps.push(interval[0][0]);
        let by_ip = |ip: Ipv4Addr| {
            interval
                .iter()
                .find(|r| r[1] == "endpoint" && r[3] == ip.to_string())
                .unwrap_or_else(|| panic!("no line for {ip}: {what}"))
        };
        for (ip, name) in [(*sender_ip, "sender"), (*idle_ip, "idle")] {
            let row = by_ip(ip);
            assert_eq!(row.len(), 9, "{what}");
            assert_eq!(row[2], name, "{what}");
        }
        let num = |row: &Vec<&str>, col: usize| -> f64 {
            row[col]
                .parse()
                .unwrap_or_else(|e| panic!("column {col} of {row:?}: {e}: {what}"))
        };
        let sender = by_ip(*sender_ip);
        assert_sender_rate(num(sender, 6), &what);
        let bytes_per_frame = num(sender, 7) / num(sender, 6);
        assert!(
            // Above FRAME only by the rounding of the printed rates.
            (FRAME * 0.9..=FRAME + 0.5).contains(&bytes_per_frame),
            "{bytes_per_frame} bytes a frame: {what}"
        );
        // The server does not answer.
        assert_idle(num(sender, 4), &what);
        assert_eq!(num(sender, 8), 0.0, "{what}");
        let idle = by_ip(*idle_ip);
        for col in [4, 6] {
            assert_idle(num(idle, col), &what);
        }
        let nat = &interval[2];
        assert_eq!(nat[1], "nat", "{what}");
        assert_eq!(nat.len(), 5, "{what}");
        // The sender's one flow: two entries.
        assert!(num(nat, 2) >= 2.0 && num(nat, 3) >= 1.0, "{what}");
    }
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");

    // JSON lines.
    let objects: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect();
    assert_eq!(objects.len(), 4, "{json}");
    for v in &objects {
        let what = format!("JSON line {v}");
        assert!(is_timestamp(v["at"].as_str().unwrap()), "{what}");
        let interval = v["interval_seconds"].as_f64().unwrap();
        assert!((0.45..1.5).contains(&interval), "{what}");
        assert_eq!(v["datapath"], "ebpf", "{what}");
        let eps = v["endpoints"].as_array().unwrap();
        assert_eq!(eps.len(), 2, "{what}");
        let ep = |ip: Ipv4Addr| {
            eps.iter()
                .find(|e| e["ip"] == ip.to_string())
                .unwrap_or_else(|| panic!("no {ip}: {what}"))
        };
        let rate = |ip, field: &str| ep(ip)["rates"][field].as_f64().unwrap();
        assert_eq!(ep(*sender_ip)["name"], "sender");
        assert_eq!(ep(*sender_ip)["kind"], "netns");
        assert_sender_rate(rate(*sender_ip, "tx_packets"), &what);
        assert_idle(rate(*idle_ip, "tx_packets"), &what);
        assert_idle(rate(*idle_ip, "rx_packets"), &what);
        let by_reason = ep(*sender_ip)["rates"]["drops_by_reason"]
            .as_object()
            .unwrap();
        assert!(by_reason.contains_key("spoofed_ip"), "{what}");
        assert_eq!(rate(*sender_ip, "drops"), 0.0, "{what}");
        assert!(v["nat"]["entries"].as_u64().unwrap() >= 2, "{what}");
        assert!(v["nat"]["capacity"].as_u64().unwrap() > 0, "{what}");
    }

    // A terminal: the table is redrawn in place, in human units.
    assert_eq!(pty.matches("\x1b[H\x1b[2J").count(), 2, "{pty:?}");
    assert!(pty.contains("ENDPOINT"), "{pty:?}");
    let sender_row = pty
        .lines()
        .rfind(|l| l.starts_with("sender"))
        .unwrap_or_else(|| panic!("no sender row: {pty:?}"));
    assert!(sender_row.contains(" pps"), "{sender_row:?}");
    assert!(sender_row.contains("kB/s"), "{sender_row:?}");
}

#[track_caller]
fn refused(lab: &NetLab, args: &[&str], code: i32, expect: &str) {
    let out = lab.run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert!(
        stderr.contains(expect),
        "{args:?}: {stderr:?} lacks {expect:?}"
    );
    assert!(out.stdout.is_empty(), "{args:?} printed {:?}", out.stdout);
}

#[test]
fn watch_refuses_bad_input_and_a_network_that_is_down_or_goes_down() {
    let lab = NetLab::new("watchbad");
    refused(&lab, &["stats", "--watch"], 1, "no network is up");
    refused(&lab, &["stats", "--watch", "--json"], 1, "no network is up");
    lab.up(&["--datapath", "netfilter"]);
    let ns = NsGuard::new("watchbad-ep");
    lab.attach_netns("ep", &ns, &[]);

    refused(
        &lab,
        &["stats", "nope", "--watch"],
        1,
        "no endpoint named \"nope\"",
    );
    for (args, expect) in [
        (&["--count", "0"][..], "at least 1"),
        (&["--count=-3"], "not a whole number"),
        (&["--count", "many"], "not a whole number"),
        (&["--interval", "0"], "greater than 0"),
        (&["--interval=-1"], "greater than 0"),
        (&["--interval", "3601"], "at most 3600"),
        (&["--interval", "fast"], "at most 3600"),
    ] {
        let mut full = vec!["stats", "--watch"];
        full.extend_from_slice(args);
        refused(&lab, &full, 2, expect);
    }
    refused(&lab, &["stats", "--count", "2"], 2, "--watch");
    refused(&lab, &["stats", "--interval", "2"], 2, "--watch");

    // Netfilter: no counters, the endpoint is listed with unknown rates and there is no NAT line.
    let out = lab.ok(["stats", "--watch", "--interval", "0.2", "--count", "1"]);
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0][1..3], ["endpoint", "ep"], "{out}");
    assert_eq!(rows[0][4..], ["-"; 5], "{out}");
    let v: Value = serde_json::from_str(&lab.ok([
        "stats",
        "--watch",
        "--interval",
        "0.2",
        "--count",
        "1",
        "--json",
    ]))
    .unwrap();
    assert!(v["endpoints"][0]["rates"].is_null(), "{v}");
    assert_eq!(v["endpoints"][0]["unknown"], "no_counters", "{v}");
    assert!(v["nat"].is_null(), "{v}");

    // The network goes away mid-watch: the error, and exit status 1.
    let mut child = spawn(&mut lab.micropod(["stats", "--watch", "--interval", "0.2"]));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(WATCH_DEADLINE);
    if first.is_err() {
        child.kill().expect("killing the watch");
        child.wait().expect("reaping it");
        panic!("the watch printed nothing");
    }
    lab.ok(["network", "down", "--force"]);
    let out = finish(child, "watch across network down");
    reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no network is up"), "{stderr}");
}
