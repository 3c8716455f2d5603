//! `micropod network …` and `micropod gc`: printing around [`micropod::network::Network`].

use std::{net::Ipv4Addr, path::PathBuf};

use micropod::{
    ipam::Ipam,
    network::{
        AttachRequest, Attachment, BR_MAX_PORTS, DEFAULT_BRIDGE, DEFAULT_SUBNET, DatapathMode,
        EndpointKind, EndpointView, Network, Released, UpDone, UpOutcome, UpRequest, UplinkChoice,
    },
};

#[derive(Debug, clap::Subcommand)]
pub(super) enum Command {
    /// Create the bridge, gateway address, forwarding and the NAT fallback (idempotent).
    Up(UpArgs),
    /// Remove everything micropod made in this namespace, and nothing else.
    Down {
        /// Also detach endpoints that are still attached.
        #[arg(long)]
        force: bool,
    },
    /// Bridge, subnet, gateway, uplink, data path, address usage and endpoints.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Give a VMM a TAP, or a network namespace a veth, with an address on the bridge.
    Attach(AttachArgs),
    /// Release an endpoint's address and take its link off the bridge; the kernel deletes
    /// the link in the background (`network status` counts those still waiting).
    Detach {
        name: String,
        /// Also take the endpoint of a VM that runs: the VM runs on without a network
        /// (`micropod ps` says so); `micropod stop` or `rm --force` is the way to end a VM.
        #[arg(long)]
        force: bool,
    },
    /// List endpoints.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Internal: deletes retired links in the background, started by `detach`.
    #[command(name = micropod::network::REAP_COMMAND, hide = true)]
    Reap,
    /// Internal: makes pooled TAPs in the background, started by `up` and `attach`.
    #[command(name = micropod::network::REFILL_COMMAND, hide = true)]
    Refill,
}

#[derive(Debug, clap::Args)]
pub(super) struct UpArgs {
    /// Bridge name (at most 15 bytes).
    #[arg(long, default_value = DEFAULT_BRIDGE)]
    bridge: String,
    /// IPv4 subnet in CIDR notation; the gateway is its first address.
    #[arg(long, default_value = DEFAULT_SUBNET)]
    subnet: String,
    /// The bridge's address, a host address of the subnet; omitted: its first one.
    #[arg(long)]
    gateway: Option<Ipv4Addr>,
    /// A destination (CIDR) endpoints reach untranslated, on both data paths: other nodes'
    /// pod subnets, a service range. Repeatable; `0.0.0.0/0` turns NAT off.
    #[arg(long, value_name = "CIDR")]
    no_masquerade: Vec<ipnetwork::Ipv4Network>,
    /// Uplink device for NAT, or `auto` for the default route's device.
    #[arg(long, default_value = "auto")]
    uplink: UplinkChoice,
    /// NAT data path.
    #[arg(long, value_enum, default_value = "auto")]
    datapath: DatapathArg,
    /// Capacity of the eBPF NAT table, in entries (two per flow).
    #[arg(long, value_name = "ENTRIES")]
    nat_table_size: Option<u32>,
    /// Source ports translated flows get, MIN-MAX; apart from the host's ephemeral ports
    /// (net.ipv4.ip_local_port_range) and other micropod networks' here. Omitted: the
    /// network's own, or for a new one the longest free run above 1023 (1024-32767 with
    /// the kernel's default sysctl).
    #[arg(long, value_name = "MIN-MAX")]
    nat_ports: Option<micropod::network::PortRange>,
    /// TAPs to keep ready for attaches (0: none); omitted, a network keeps its size
    /// (16 for a new one).
    #[arg(long, value_name = "N")]
    pool: Option<u32>,
    /// Bring up the network on record with its recorded settings (after a reboot the
    /// records survive, the kernel's objects do not), or with the defaults if none is on
    /// record: for boot units. Takes no settings of its own.
    #[arg(long, conflicts_with_all = ["bridge", "subnet", "gateway", "no_masquerade", "uplink", "datapath", "nat_table_size", "nat_ports", "pool"])]
    restore: bool,
    /// Print the resulting status as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum DatapathArg {
    Auto,
    Ebpf,
    Netfilter,
}

#[derive(Debug, clap::Args)]
pub(super) struct AttachArgs {
    /// Endpoint name (a VM or container name).
    name: String,
    #[arg(long, value_enum)]
    kind: KindArg,
    /// Network namespace for a netns endpoint (e.g. /run/netns/NAME, /proc/PID/ns/net).
    #[arg(long)]
    netns: Option<PathBuf>,
    /// Interface name inside the namespace (netns endpoints; default eth0).
    #[arg(long)]
    ifname: Option<String>,
    /// A specific address instead of the next free one.
    #[arg(long)]
    ip: Option<Ipv4Addr>,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum KindArg {
    Tap,
    Netns,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(micropod::runtime::current_thread()?)
}

pub(super) fn run(network: &Network, command: Command) -> anyhow::Result<()> {
    let rt = runtime()?;
    match command {
        Command::Up(args) if args.restore => {
            let req = network.recorded_request()?.unwrap_or_default();
            let done = rt.block_on(network.up_reporting(&req))?;
            // After a reboot the VMs on record are gone too: record their end (and say so).
            let ended = micropod::vm::Vms::new(network.clone()).reconcile();
            // The network is up whatever the VM reconcile says: its report first.
            up_report(
                network,
                &rt,
                &done,
                ended.as_deref().unwrap_or_default(),
                args.json,
            )?;
            ended?;
        }
        Command::Up(args) => {
            let req = UpRequest {
                bridge: args.bridge,
                subnet: args.subnet,
                uplink: args.uplink,
                datapath: match args.datapath {
                    DatapathArg::Auto => DatapathMode::Auto,
                    DatapathArg::Ebpf => DatapathMode::Ebpf,
                    DatapathArg::Netfilter => DatapathMode::Netfilter,
                },
                nat_entries: args.nat_table_size,
                pool: args.pool,
                nat_ports: args.nat_ports,
                gateway: args.gateway,
                no_masquerade: args.no_masquerade,
            };
            let done = rt.block_on(network.up_reporting(&req))?;
            up_report(network, &rt, &done, &[], args.json)?;
        }
        Command::Down { force } => {
            if rt.block_on(network.down(force))? {
                println!("network down");
            } else {
                println!("no network is up in {}", network.state_dir().display());
            }
        }
        Command::Status { json } => {
            let status = rt.block_on(network.status())?;
            if json {
                println!("{}", serde_json::to_string(&status)?);
            } else if let Some(n) = &status.network {
                println!(
                    "bridge     {}{}",
                    n.bridge,
                    if n.bridge_present {
                        ""
                    } else {
                        " (MISSING: run `micropod network up` to repair)"
                    }
                );
                println!("subnet     {} (gateway {})", n.subnet, n.gateway);
                println!("uplink     {}", n.uplink.as_deref().unwrap_or("none"));
                match (fallback(n), &n.datapath_note) {
                    (Some(why), _) => println!("datapath   {} ({why})", n.datapath),
                    (None, note) => {
                        let object = n
                            .datapath_object
                            .as_deref()
                            .map(|id| format!(", object {id}"))
                            .unwrap_or_default();
                        println!(
                            "datapath   {} (requested {}{object})",
                            n.datapath, n.datapath_requested
                        );
                        if let Some(note) = note {
                            println!("           {note}");
                        }
                    }
                }
                println!("nat table  ip {}", n.nft_table);
                println!("nat ports  {}", n.nat_ports);
                println!(
                    "addresses  {} used, {} free of {}",
                    n.ipam.used, n.ipam.free, n.ipam.capacity
                );
                println!("endpoints  {}", n.endpoints.len());
                println!("tap pool   {} of {} ready", n.pool.ready, n.pool.size);
                if n.retired_links > 0 {
                    println!(
                        "retired    {} detached link(s) waiting to be deleted",
                        n.retired_links
                    );
                }
                print_endpoints(&n.endpoints);
            } else {
                println!("network is down (state dir {})", status.state_dir.display());
            }
        }
        Command::Attach(args) => {
            let req = AttachRequest {
                netns: args.netns,
                ip: args.ip,
                ifname: args.ifname,
                ..AttachRequest::new(
                    args.name,
                    match args.kind {
                        KindArg::Tap => EndpointKind::Tap,
                        KindArg::Netns => EndpointKind::Netns,
                    },
                )
            };
            let att = rt.block_on(network.attach(&req))?;
            if args.json {
                println!("{}", serde_json::to_string(&att)?);
            } else {
                print_attachment(&att);
            }
        }
        Command::Detach { name, force } => {
            // Through the VMs, which know whether a running VM owns the endpoint.
            let done = micropod::vm::Vms::new(network.clone()).detach_endpoint(&name, force)?;
            match (&done.gone, &done.vm) {
                (Some(gone), _) => println!("{name} was already gone ({}); released", gone.reason),
                (None, Some(vm)) => println!(
                    "detached {name} from VM {vm}, which runs on without a network (`micropod ps` shows it)"
                ),
                (None, None) => println!("detached {name}"),
            }
        }
        Command::Reap => {
            let deleted = rt.block_on(network.reap())?;
            log::debug!("reaper deleted {deleted} retired link(s)");
        }
        Command::Refill => {
            let made = rt.block_on(network.refill())?;
            log::debug!("refill made {made} pooled TAP(s)");
        }
        Command::Ls { json } => {
            let endpoints = network.list()?;
            if json {
                println!("{}", serde_json::to_string(&endpoints)?);
            } else {
                print_endpoints(&endpoints);
            }
        }
    }
    Ok(())
}

pub(super) fn gc(network: &Network, json: bool) -> anyhow::Result<()> {
    let released: Vec<Released> = runtime()?.block_on(network.gc())?;
    if json {
        println!("{}", serde_json::to_string(&released)?);
    } else if released.is_empty() {
        println!("nothing to collect");
    } else {
        for r in &released {
            let ip = r.ip.map(|ip| ip.to_string()).unwrap_or_else(|| "-".into());
            println!("released {} ({ip}): {}", r.name, r.reason);
        }
    }
    Ok(())
}

fn print_attachment(a: &Attachment) {
    println!("attached {} ({})", a.name, a.kind);
    match a.kind {
        EndpointKind::Tap => println!("  tap         {} on {}", a.link, a.bridge),
        EndpointKind::Netns => println!(
            "  veth        {} on {} <-> {} in {}",
            a.link,
            a.bridge,
            a.ifname.as_deref().unwrap_or("?"),
            a.netns
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
    }
    println!("  address     {}", a.cidr);
    println!("  gateway     {}", a.gateway);
    println!("  mac         {}", a.mac);
    println!("  kernel arg  {}", a.kernel_arg);
}

fn print_endpoints(endpoints: &[EndpointView]) {
    if endpoints.is_empty() {
        return;
    }
    let w = super::name_width(endpoints.iter().map(|e| e.name.as_str()), 20);
    println!(
        "{:<w$} {:<6} {:<18} {:<18} {:<13} WHERE",
        "NAME", "KIND", "ADDRESS", "MAC", "LINK"
    );
    for e in endpoints {
        let place = match (&e.cni, &e.netns, &e.ifname) {
            (Some(c), _, _) => {
                let short: String = c.container_id.chars().take(12).collect();
                let short = short.trim_end_matches(['-', '_', '.']);
                match (&c.pod_namespace, &c.pod_name) {
                    (Some(ns), Some(pod)) => {
                        format!("{} of container {short} (pod {ns}/{pod})", c.ifname)
                    }
                    _ => format!("{} of container {short} ({})", c.ifname, c.network),
                }
            }
            (None, Some(ns), Some(ifname)) => format!("{ifname} in {}", ns.display()),
            _ => "-".into(),
        };
        println!(
            "{:<w$} {:<6} {:<18} {:<18} {:<13} {place}",
            e.name,
            e.kind.to_string(),
            e.cidr,
            e.mac.to_string(),
            e.link
        );
    }
}

/// `micropod stats [ENDPOINT] [--json]`.
pub(super) fn stats(network: &Network, endpoint: Option<&str>, json: bool) -> anyhow::Result<()> {
    let stats = micropod::stats::read(network, endpoint)?;
    if json {
        println!("{}", serde_json::to_string(&stats)?);
        return Ok(());
    }
    println!("datapath {}", stats.datapath);
    if stats.datapath != micropod::network::ActiveDatapath::Ebpf {
        println!("(no counters: the netfilter data path does not count per endpoint)");
    }
    let w = super::name_width(stats.endpoints.iter().map(|e| e.name.as_str()), 16);
    println!(
        "{:<w$} {:<15} {:>10} {:>12} {:>10} {:>12}  drops",
        "ENDPOINT", "IP", "RX PKTS", "RX BYTES", "TX PKTS", "TX BYTES"
    );
    for ep in &stats.endpoints {
        let Some(c) = &ep.counters else {
            // Netfilter, or an attach/detach in flight: nothing to show, not zeros.
            println!(
                "{:<w$} {:<15} {:>10} {:>12} {:>10} {:>12}  -",
                ep.name, ep.ip, "-", "-", "-", "-"
            );
            continue;
        };
        let drops: Vec<String> = c
            .drops
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(reason, n)| format!("{reason}={n}"))
            .collect();
        println!(
            "{:<w$} {:<15} {:>10} {:>12} {:>10} {:>12}  {}",
            ep.name,
            ep.ip,
            c.rx_packets,
            c.rx_bytes,
            c.tx_packets,
            c.tx_bytes,
            if drops.is_empty() {
                "-".into()
            } else {
                drops.join(" ")
            }
        );
    }
    if let Some(nat) = &stats.nat {
        println!(
            "nat: {} flows ({} of {} entries), {} created, {} reclaimed, refused: {} table full, {} no port; {} packets out, {} in",
            nat.flows,
            nat.entries,
            nat.capacity,
            nat.counters.flows_created,
            nat.counters.reclaimed,
            nat.counters.table_full,
            nat.counters.no_port,
            nat.counters.outbound_packets,
            nat.counters.inbound_packets
        );
    }
    Ok(())
}

/// The report of a `network up` (text or `--json`): the network, then one line (on stderr)
/// per endpoint its reconcile released and per VM whose end `--restore` recorded (`ended`);
/// a VM's endpoint gets its VM's line only.
fn up_report(
    network: &Network,
    rt: &tokio::runtime::Runtime,
    done: &UpDone,
    ended: &[micropod::vm::Reconciled],
    json: bool,
) -> anyhow::Result<()> {
    let UpDone {
        outcome, config, ..
    } = done;
    let status = rt.block_on(network.status())?;
    if json {
        let mut value = serde_json::to_value(status)?;
        value["outcome"] = serde_json::to_value(outcome)?;
        value["released"] = serde_json::to_value(&done.released)?;
        value["vms_ended"] = serde_json::to_value(ended)?;
        println!("{value}");
    } else {
        let what = match outcome {
            UpOutcome::Created => "up",
            UpOutcome::Unchanged => "already up",
            UpOutcome::Replaced => "reconfigured",
        };
        println!(
            "network {what}: bridge {} gateway {}/{} uplink {}",
            config.bridge,
            config.gateway,
            config.subnet.prefix(),
            config
                .uplink
                .as_deref()
                .unwrap_or("none (no default route)")
        );
        if let Some(n) = &status.network {
            match (fallback(n), &n.datapath_note) {
                (Some(why), _) => println!("datapath {} ({why})", n.datapath),
                (None, note) => {
                    println!("datapath {}", n.datapath);
                    if let Some(note) = note {
                        println!("  {note}");
                    }
                }
            }
        }
    }
    for r in &done.released {
        if ended
            .iter()
            .any(|vm| vm.name == r.name && Some(vm.ip) == r.ip)
        {
            continue;
        }
        let ip = r.ip.map_or_else(|| "-".into(), |ip| ip.to_string());
        eprintln!("released endpoint {} ({ip}): {}", r.name, r.reason);
    }
    for r in ended {
        eprintln!("VM {} ({}): {}", r.name, r.ip, r.reason);
    }
    let capacity = Ipam::new(config.subnet, config.gateway)?.capacity();
    if capacity as usize > BR_MAX_PORTS {
        eprintln!(
            "note: {} has {capacity} addresses, but one bridge holds at most {BR_MAX_PORTS} endpoints",
            config.subnet
        );
    }
    Ok(())
}

/// `auto: <why>` when `auto` fell back to netfilter (its note says why), for the data path's
/// line: the reason belongs with the choice, not on a line of its own.
fn fallback(n: &micropod::network::NetworkStatus) -> Option<String> {
    (n.datapath_requested == DatapathMode::Auto
        && n.datapath == micropod::network::ActiveDatapath::Netfilter)
        .then(|| n.datapath_note.as_ref().map(|note| format!("auto: {note}")))
        .flatten()
}
