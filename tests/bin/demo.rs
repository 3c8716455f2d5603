//! The demo behind `./dev demo`: a lab of two network namespaces joined by a veth pair, the
//! eBPF source counter attached by the real `micropod` CLI, real traffic, and the counts
//! checked against what was sent. Everything it makes is removed when it ends, on error too.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::ExitCode,
};

use anyhow::bail;
use ipnetwork::{IpNetwork, Ipv4Network};
use micropod_tests::{CountSources, VethLab, send_and_confirm, warm_up};

// TEST-NET-1 (RFC 5737): these addresses exist only inside the demo's namespaces.
const PEER_ADDRS: [Ipv4Addr; 2] = [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 3)];
const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// (source, datagrams, payload bytes)
const TRAFFIC: [(Ipv4Addr, u64, u64); 2] = [(PEER_ADDRS[0], 40, 200), (PEER_ADDRS[1], 15, 1200)];

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> anyhow::Result<()> {
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
