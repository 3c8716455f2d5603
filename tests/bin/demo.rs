//! The demo behind `./dev demo`, in two parts, each in namespaces of its own:
//! 1. the network control plane: `micropod network up` in a "host" namespace with an uplink to
//!    an "internet" namespace, a container-style endpoint that serves HTTP to the host and
//!    reaches the internet through the NAT, a TAP endpoint for a VMM, then `down`;
//! 2. the eBPF source counter attached by the CLI, real traffic, and the counts checked
//!    against what was sent.
//!
//! Everything it makes is removed when it ends, on error too.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, bail};
use ipnetwork::{IpNetwork, Ipv4Network};
use micropod_tests::{
    CountSources, NsGuard, VethLab,
    netlab::{NetLab, SERVER_ADDR, UPLINK_ADDR},
    send_and_confirm, warm_up,
};

// TEST-NET-1 (RFC 5737): these addresses exist only inside the demo's namespaces.
const PEER_ADDRS: [Ipv4Addr; 2] = [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 3)];
const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// (source, datagrams, payload bytes)
const TRAFFIC: [(Ipv4Addr, u64, u64); 2] = [(PEER_ADDRS[0], 40, 200), (PEER_ADDRS[1], 15, 1200)];

fn main() -> ExitCode {
    match network_demo().and_then(|()| demo()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `micropod ARGS` in the lab's host namespace, echoing the command and its output.
fn show(lab: &NetLab, args: &[&str]) -> anyhow::Result<String> {
    println!("$ micropod {}", args.join(" "));
    let out = lab.run(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in stdout.lines() {
        println!("  {line}");
    }
    if !out.status.success() {
        bail!(
            "micropod {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

fn network_demo() -> anyhow::Result<()> {
    println!("Part 1: the network control plane\n");
    println!(
        "Building a lab: namespace 'host' (uplink {UPLINK_ADDR}) --veth-- namespace 'internet' (server {SERVER_ADDR})"
    );
    let lab = NetLab::new("demo");
    let web = NsGuard::new("web");
    println!(
        "  host: {}\n  endpoint namespace 'web': {}\n",
        lab.host.path().display(),
        web.path().display()
    );

    show(&lab, &["network", "up"])?;
    let web_path = web.path().display().to_string();
    let attach = show(
        &lab,
        &[
            "network", "attach", "web", "--kind", "netns", "--netns", &web_path,
        ],
    )?;
    let web_ip: Ipv4Addr = attach
        .lines()
        .find_map(|l| l.trim().strip_prefix("address"))
        .and_then(|a| a.trim().split('/').next()?.parse().ok())
        .context("attach printed no address")?;
    show(&lab, &["network", "attach", "vm1", "--kind", "tap"])?;

    // A web server inside the endpoint's namespace, asked from the host like `curl` would.
    let listener = web.run(|| TcpListener::bind((web_ip, 80)))?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, _) = listener.accept()?;
        let mut request = [0u8; 1024];
        let _ = conn.read(&mut request)?;
        conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 15\r\n\r\nhello from web\n")
    });
    let mut response = String::new();
    lab.host.run(|| -> anyhow::Result<()> {
        let mut conn = TcpStream::connect_timeout(
            &SocketAddr::new(web_ip.into(), 80),
            Duration::from_secs(5),
        )?;
        conn.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        conn.read_to_string(&mut response)?;
        Ok(())
    })?;
    server.join().expect("server thread")?;
    println!(
        "\nFrom the host, GET http://{web_ip}/ answers:\n  {}",
        response.lines().last().unwrap_or("")
    );

    // The endpoint reaches the internet; the server sees the uplink address (MASQUERADE).
    let outside = lab
        .internet
        .run(|| TcpListener::bind((SERVER_ADDR, 8080)))?;
    let _client = web.run(|| {
        TcpStream::connect_timeout(
            &SocketAddr::new(SERVER_ADDR.into(), 8080),
            Duration::from_secs(5),
        )
    })?;
    let (_, peer) = outside.accept()?;
    println!(
        "From 'web' ({web_ip}), a connection to {SERVER_ADDR}:8080 arrives from {}",
        peer.ip()
    );
    if peer.ip() != std::net::IpAddr::V4(UPLINK_ADDR) {
        bail!(
            "expected the uplink address {UPLINK_ADDR} after NAT, saw {}",
            peer.ip()
        );
    }
    println!("  (the NAT rewrote {web_ip} to the uplink address)\n");

    show(&lab, &["network", "status"])?;
    show(&lab, &["network", "down", "--force"])?;
    println!("\nRemoving the lab.\n");
    Ok(())
}

fn demo() -> anyhow::Result<()> {
    println!("Part 2: the eBPF source counter\n");
    let net = |ip| IpNetwork::V4(Ipv4Network::new(ip, 24).expect("valid /24"));
    println!(
        "Building a lab: namespace 'peer' ({}, {}) --veth-- namespace 'host' ({HOST_ADDR})",
        PEER_ADDRS[0], PEER_ADDRS[1]
    );
    let lab = VethLab::new(&PEER_ADDRS.map(net), &[net(HOST_ADDR)]);
    println!(
        "  peer: {}\n  host: {}",
        lab.a.path().display(),
        lab.b.path().display()
    );

    let rx = lab.b.udp(SocketAddr::new(HOST_ADDR.into(), 9000));
    let senders: Vec<_> = TRAFFIC
        .iter()
        .map(|(src, ..)| lab.a.udp(SocketAddr::new((*src).into(), 0)))
        .collect();
    for tx in &senders {
        warm_up(tx, &rx);
    }

    println!(
        "\n$ micropod count-sources --netns {} --iface {} --duration 3",
        lab.b.path().display(),
        VethLab::B_IF
    );
    let run = CountSources::start(lab.b.path(), VethLab::B_IF, 3, false)?;
    for line in &run.started {
        eprint!("  {line}");
    }
    for ((src, count, payload), tx) in TRAFFIC.iter().zip(&senders) {
        println!("  sending {count} UDP datagrams of {payload} bytes from {src}");
        send_and_confirm(
            tx,
            &rx,
            usize::try_from(*count)?,
            usize::try_from(*payload)?,
        );
    }
    let (out, logs) = run.finish()?;
    for line in logs {
        eprintln!("  {line}");
    }
    if !out.status.success() {
        bail!("micropod count-sources failed: {}", out.status);
    }
    println!("\n{}", String::from_utf8_lossy(&out.stdout));

    println!("Expected (bytes = packets x (14 Ethernet + 20 IPv4 + 8 UDP + payload)):");
    let report = String::from_utf8_lossy(&out.stdout);
    let mut all_match = true;
    for (src, count, payload) in TRAFFIC {
        let bytes = count * (14 + 20 + 8 + payload);
        let matched = report.lines().any(|l| {
            let cols: Vec<_> = l.split_whitespace().collect();
            cols == [src.to_string(), count.to_string(), bytes.to_string()]
        });
        all_match &= matched;
        println!(
            "  {src:<14} {count:>6} packets {bytes:>8} bytes  {}",
            if matched { "matches" } else { "MISMATCH" }
        );
    }
    println!("\nRemoving the lab.");
    drop(lab);
    if !all_match {
        bail!("the eBPF counters disagree with the traffic sent");
    }
    println!("Done: the eBPF program counted every packet and byte.");
    Ok(())
}
