//! The soak test behind `cargo xtask bench soak`: many endpoint attach/detach cycles and VM
//! run/stop cycles with traffic, then a check that everything micropod holds is back to where
//! it started.
//!
//! The lab: a "host" namespace with micropod's bridge on the eBPF data path and an uplink to an
//! "internet" namespace with an HTTP server and a UDP echo server (the support library's
//! `NetLab`), its own state and BPF pin dirs, and a few namespaces for netns endpoints. The
//! exporter (`micropod metrics serve`) runs in the host namespace for the whole run and is
//! scraped every 50 cycles.
//!
//! 1. Warm-up: one netns and one TAP endpoint with traffic, a few scrapes (and one VM when VMs
//!    are asked for), so files and buffers made once on first use are in the baseline.
//! 2. Baseline: the exporter's fds and VmRSS; the entries of every endpoint and NAT map (read
//!    from the pins directly) and what `stats --json` says; nft rules and chains, links in the
//!    host and the endpoint namespaces, pins, state files, micropod processes of this lab.
//! 3. N attach/detach cycles, netns and TAP alternating, up to 4 attached at once (so
//!    addresses are reused out of order). Each netns endpoint pings the gateway and fetches a
//!    page from the internet server through the SNAT; each TAP endpoint writes a UDP datagram
//!    to the echo server through the SNAT, as its VM would.
//! 4. M VM run/stop cycles (the test guest from `cargo xtask guest`, a few at once): the host
//!    fetches each guest's page, each guest fetches a page from the internet through the SNAT,
//!    then `stop` and `rm`.
//! 5. Everything detached, the reaper and refill finished: the same counts, a table of
//!    baseline against end, and a failure exit status if any count did not come back.
//!
//! Everything is removed on every path (errors, panics, Ctrl-C): VMs by `rm --force` and then
//! by their recorded PIDs, the exporter by its PID, the network taken down, the namespaces and
//! dirs removed by their guards.
//!
//! Usage: `micropod-bench-soak [--cycles N] [--vms N] [--vm-parallel P] [--quick] [--json]`
//! (as root).

use std::{
    collections::{BTreeSet, HashSet},
    ffi::OsStr,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use micropod::{
    net::{Netlink, link, tap::Tap},
    network::Mac,
};
use micropod_tests::{
    NsGuard,
    bench::{Percentile, percentile, round_to},
    block_on,
    exporter::{Exporter, http_get},
    flock_held,
    interrupt::check as interrupted,
    netlab::{NetLab, SERVER_ADDR, UPLINK_ADDR, ip_json, ping, query},
    packets,
    vmlab::{self, Guest, HttpServer, VmLab},
};
use serde_json::{Value, json};

/// The default subnet's 253 addresses are plenty for [`WINDOW`] endpoints and a few VMs.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
/// Endpoints attached at once during the cycles: cycle i attaches one and, once this many are
/// attached, detaches the oldest.
const WINDOW: usize = 4;
/// Namespaces the netns endpoints take turns in.
const NETNS_COUNT: usize = 4;
/// Scrape the exporter every this many cycles.
const SCRAPE_EVERY: usize = 50;
const HTTP_PORT: u16 = 80;
const ECHO_PORT: u16 = 7;
const BODY: &str = "hello from the internet\n";
const READY: &str = "micropod-guest: ready";
const BOOT: Duration = Duration::from_secs(120);
/// Exporter VmRSS may end this much above its baseline (docs/operations.md, "Soak test"): the
/// allocator keeps freed pages and the kernel counts each page once touched. Below it is fine.
const RSS_SLACK_KIB: u64 = 2048;
const KIB_PER_MIB: f64 = 1024.0;

/// Many endpoint attach/detach cycles and VM run/stop cycles with traffic, while the exporter
/// runs; then checks that fds, exporter memory, map and NAT entries, nft rules, links, pins,
/// state files and processes are back to their starting counts. In namespaces of its own; run
/// as root (cargo xtask bench soak).
#[derive(Parser)]
#[command(name = "micropod-bench-soak", verbatim_doc_comment)]
struct Cli {
    /// Attach/detach cycles, netns and TAP alternating (default 1000)
    #[arg(long, value_name = "N")]
    cycles: Option<usize>,
    /// VM run/stop cycles with the test guest (default 50; 0: no VMs, no guest needed)
    #[arg(long, value_name = "N")]
    vms: Option<usize>,
    /// VMs booting at once
    #[arg(long, value_name = "P", default_value_t = 2)]
    vm_parallel: usize,
    /// A smoke run: 50 cycles and 2 VMs unless given
    #[arg(long)]
    quick: bool,
    /// Print the figures as one JSON object instead of the table
    #[arg(long)]
    json: bool,
}

struct Args {
    cycles: usize,
    vms: usize,
    vm_parallel: usize,
    json: bool,
}

fn resolve(cli: Cli) -> anyhow::Result<Args> {
    let quick = cli.quick;
    let args = Args {
        cycles: cli.cycles.unwrap_or(if quick { 50 } else { 1000 }),
        vms: cli.vms.unwrap_or(if quick { 2 } else { 50 }),
        vm_parallel: cli.vm_parallel,
        json: cli.json,
    };
    ensure!(
        (1..=8).contains(&args.vm_parallel),
        "--vm-parallel {}: 1..=8",
        args.vm_parallel
    );
    Ok(args)
}

fn main() -> ExitCode {
    micropod_tests::interrupt::main("micropod-bench-soak", resolve, bench)
}

// ---------------------------------------------------------------------------------------------
// The lab.

/// A `VmLab` (its guard kills recorded VMs by PID) whose network is up on the eBPF data path.
/// On drop: `rm --force` of every recorded VM, then `network down --force` (BPF pins are not
/// per namespace and would outlive it); the lab's own guards then remove the rest.
struct Lab {
    vm: VmLab,
}

impl Lab {
    fn new(guest: Guest) -> anyhow::Result<Self> {
        let lab = Self {
            vm: VmLab {
                net: NetLab::new("soak"),
                guest,
            },
        };
        lab.run(["network", "up", "--datapath", "ebpf"])?;
        Ok(lab)
    }

    fn net(&self) -> &NetLab {
        &self.vm.net
    }

    fn state(&self) -> &Path {
        &self.net().dirs.state
    }

    /// `micropod ARGS` with the lab's dirs, in the host namespace and a process group of its
    /// own (a Ctrl-C in the terminal does not kill it half-way).
    fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.net().micropod(args);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        cmd
    }

    fn run<I, S>(&self, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(args);
        let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
        check_success(&cmd, &out)?;
        Ok(out)
    }

    fn json<I, S>(&self, args: I) -> anyhow::Result<Value>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.run(args)?;
        serde_json::from_slice(&out.stdout).context("parsing micropod's JSON output")
    }

    /// The bridge's MAC: where TAP endpoints send routed frames.
    fn bridge_mac(&self, bridge: &str) -> anyhow::Result<[u8; 6]> {
        block_on(async {
            let nl = Netlink::connect_in(self.net().host.ns())?;
            let msg = link::find(&nl, bridge)
                .await?
                .with_context(|| format!("no bridge {bridge} in the lab"))?;
            link::LinkSummary::from_message(&msg)
                .mac
                .with_context(|| format!("the bridge {bridge} has no MAC"))
        })
    }

    /// Waits (up to 30 s) until no reaper or refill runs and none is due: no retired link on
    /// record, the pool full, both locks free.
    fn settle(&self) -> anyhow::Result<()> {
        let state = self.state();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let retired = count_files(&state.join(micropod::network::RETIRED_SHELF));
            let reaping = flock_held(&state.join(micropod::network::REAPER_LOCK))?;
            let pool = micropod_tests::PoolState::read(state)?;
            // `settled(false)`: an attach that leaves the pool above half starts no refill, so
            // the pool's size varies by design; the counts leave pooled TAPs out.
            if retired == 0 && !reaping && pool.settled(false) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "not settled after 30 s: {retired} retired link(s) on record, reaper running: {reaping}, pool {pool:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `micropod logs NAME`.
    fn console(&self, name: &str) -> anyhow::Result<String> {
        let out = self.run(["logs", name])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until the VM's console shows `needle`; returns the console.
    fn wait_console(&self, name: &str, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            interrupted()?;
            let console = self.console(name)?;
            if console.contains(needle) {
                return Ok(console);
            }
            ensure!(
                Instant::now() < deadline,
                "{needle:?} not on {name}'s console within {timeout:?}:\n{console}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for rec in self.vm.records() {
            if let Err(e) = self.run(["rm", "--force", &rec.name]) {
                eprintln!("warning: micropod rm --force {}: {e:#}", rec.name);
            }
        }
        if let Err(e) = self.run(["network", "down", "--force"]) {
            eprintln!("warning: micropod network down --force: {e:#}");
        }
    }
}

fn check_success(cmd: &Command, out: &Output) -> anyhow::Result<()> {
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Regular files under `dir`, recursively (0 if it does not exist).
fn count_files(dir: &Path) -> u64 {
    list_files(dir, dir).len() as u64
}

/// Regular files (and symlinks) under `dir`, recursively, as paths relative to `root`.
fn list_files(root: &Path, dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => out.extend(list_files(root, &path)),
            Ok(_) => {
                out.insert(
                    path.strip_prefix(root)
                        .unwrap_or(&path)
                        .display()
                        .to_string(),
                );
            }
            Err(_) => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The exporter.

/// One scrape from inside the host namespace: the `micropod_endpoint_info` series, after
/// checking `micropod_up 1`.
fn endpoint_series(exporter: &Exporter, lab: &Lab) -> anyhow::Result<u64> {
    let addr = exporter.addr;
    let body = lab.net().host.run(|| get_200(addr, "/metrics"))?;
    ensure!(
        body.lines().any(|l| l == "micropod_up 1"),
        "the exporter says it cannot read the network (no `micropod_up 1`)"
    );
    Ok(body
        .lines()
        .filter(|l| l.starts_with("micropod_endpoint_info{"))
        .count() as u64)
}

/// One scrape, checked: one `micropod_endpoint_info` per attached endpoint.
fn scrape_checked(exporter: &Exporter, lab: &Lab, endpoints: usize) -> anyhow::Result<()> {
    let info = endpoint_series(exporter, lab)?;
    ensure!(
        info == endpoints as u64,
        "the exporter lists {info} endpoints, {endpoints} are attached"
    );
    Ok(())
}

/// The body of a 200 answer to `GET path`. Call from a thread inside the server's namespace.
fn get_200(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let (status, _, body) = http_get(addr, path)?;
    ensure!(status.starts_with("HTTP/1.1 200 "), "GET {path}: {status}");
    String::from_utf8(body).context("a non-UTF-8 body")
}

// ---------------------------------------------------------------------------------------------
// Traffic.

/// A UDP echo server in the internet namespace; records the payloads that arrived. Stopped
/// and joined on drop.
struct EchoServer {
    arrived: Arc<Mutex<HashSet<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl EchoServer {
    fn start(ns: &NsGuard) -> anyhow::Result<Self> {
        // Bound inside the internet namespace; the socket stays there whichever thread uses it.
        let sock = ns
            .run(|| UdpSocket::bind((SERVER_ADDR, ECHO_PORT)))
            .context("binding the echo server in the internet namespace")?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let arrived = Arc::new(Mutex::new(HashSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (arrived, stop) = (Arc::clone(&arrived), Arc::clone(&stop));
            thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    let (n, from) = match sock.recv_from(&mut buf) {
                        Ok(got) => got,
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock
                                    | std::io::ErrorKind::TimedOut
                                    // A socket timeout makes any caught signal interrupt
                                    // the call, SA_RESTART or not.
                                    | std::io::ErrorKind::Interrupted
                            ) =>
                        {
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    arrived
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(buf[..n].to_vec());
                    // The echo takes the reverse NAT back to the endpoint.
                    sock.send_to(&buf[..n], from)?;
                }
                Ok(())
            })
        };
        Ok(Self {
            arrived,
            stop,
            thread: Some(thread),
        })
    }

    fn has(&self, payload: &[u8]) -> bool {
        self.arrived
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(payload)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("warning: the echo server failed: {e}"),
                Err(_) => eprintln!("warning: the echo server panicked"),
            }
        }
    }
}

/// Retries `f` every 50 ms until it succeeds or `timeout` passes: the first packets after an
/// attach can meet a port whose carrier the kernel has not processed yet.
fn retry<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("{what}: failed for {timeout:?}")));
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A netns endpoint's traffic: a ping to the gateway, and a page from the internet server
/// through the SNAT.
fn netns_traffic(ns: &NsGuard) -> anyhow::Result<()> {
    ensure!(
        ping(ns, GATEWAY),
        "no echo reply from the gateway {GATEWAY}"
    );
    let server = SocketAddrV4::new(SERVER_ADDR, HTTP_PORT);
    let body = retry(
        "GET from the internet server",
        Duration::from_secs(5),
        || Ok(vmlab::http_get(ns, server)?),
    )?;
    ensure!(body == BODY, "unexpected page from the internet: {body:?}");
    Ok(())
}

/// A TAP endpoint's traffic: a UDP datagram written on its TAP, as its VM would, until the
/// echo server has it (so it went through the SNAT).
fn tap_traffic(
    lab: &Lab,
    echo: &EchoServer,
    link: &str,
    ip: Ipv4Addr,
    bridge_mac: [u8; 6],
    cycle: usize,
) -> anyhow::Result<()> {
    let payload = format!("micropod-bench-soak {cycle}").into_bytes();
    let ip_packet = packets::udp_ipv4(ip, 40_000, SERVER_ADDR, ECHO_PORT, &payload);
    let frame = packets::ethernet(bridge_mac, Mac::for_ip(ip).0, packets::ETH_P_IP, &ip_packet);
    // TAP devices are looked up by name in the calling thread's namespace.
    lab.net().host.run(|| -> anyhow::Result<()> {
        let tap = Tap::open(link).with_context(|| format!("opening the TAP {link}"))?;
        for _ in 0..50 {
            tap.send(&frame)
                .with_context(|| format!("writing a frame on {link}"))?;
            let deadline = Instant::now() + Duration::from_millis(100);
            while Instant::now() < deadline {
                if echo.has(&payload) {
                    return Ok(());
                }
                thread::sleep(Duration::from_millis(2));
            }
        }
        bail!("no datagram from {link} ({ip}) reached the echo server in 5 s")
    })
}

// ---------------------------------------------------------------------------------------------
// Counts.

/// One count taken at the baseline and at the end.
struct Count {
    name: &'static str,
    value: u64,
    /// How far above the baseline the end may be.
    slack: u64,
    /// Whether ending below the baseline is fine (memory; a count below its start means
    /// something was removed that micropod had made before the run).
    may_shrink: bool,
    /// What was counted, where names help to say what leaked.
    items: BTreeSet<String>,
}

fn count(name: &'static str, value: u64) -> Count {
    Count {
        name,
        value,
        slack: 0,
        may_shrink: false,
        items: BTreeSet::new(),
    }
}

fn listed(name: &'static str, items: BTreeSet<String>) -> Count {
    Count {
        name,
        value: items.len() as u64,
        slack: 0,
        may_shrink: false,
        items,
    }
}

/// Entries of a pinned BPF hash map (per-CPU or not), counted through its keys.
fn map_keys<K: aya::Pod, V: aya::Pod>(pins: &Path, name: &str) -> anyhow::Result<u64> {
    let path = pins.join("maps").join(name);
    let data = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let map: aya::maps::HashMap<_, K, V> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))
            .with_context(|| format!("{} as a hash map", path.display()))?;
    Ok(map.keys().filter(Result::is_ok).count() as u64)
}

fn percpu_map_keys<K: aya::Pod, V: aya::Pod>(pins: &Path, name: &str) -> anyhow::Result<u64> {
    let path = pins.join("maps").join(name);
    let data = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let map: aya::maps::PerCpuHashMap<_, K, V> =
        aya::maps::PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data))
            .with_context(|| format!("{} as a per-CPU hash map", path.display()))?;
    Ok(map.keys().filter(Result::is_ok).count() as u64)
}

/// Processes whose command line names the lab's state dir (reapers, refills, supervisors,
/// VMMs), but the exporter.
fn lab_processes(state: &Path, exporter: u32) -> BTreeSet<String> {
    let needle = state.as_os_str().as_encoded_bytes();
    let mut out = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == exporter || pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            let words: Vec<String> = cmdline
                .split(|&b| b == 0)
                .filter(|w| !w.is_empty())
                .map(|w| String::from_utf8_lossy(w).into_owned())
                .collect();
            out.insert(format!("{pid} {}", words.join(" ")));
        }
    }
    out
}

/// Rules and chains in every nf_tables table of the host namespace (only micropod's are
/// there), read with `nft -j`.
fn nft_counts(host: &Path) -> anyhow::Result<(u64, u64)> {
    let out = query(host, "nft", &["-j", "list", "ruleset"]);
    let v: Value = serde_json::from_str(&out).context("nft -j list ruleset: bad JSON")?;
    let objects = v["nftables"].as_array().context("no nftables array")?;
    let n = |kind: &str| objects.iter().filter(|o| o.get(kind).is_some()).count() as u64;
    Ok((n("rule"), n("chain")))
}

fn link_names(ns: &Path) -> BTreeSet<String> {
    ip_json(ns, &["link", "show"])
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .collect()
}

/// Everything that must come back to its baseline, with the exporter idle.
fn take_counts(
    lab: &Lab,
    exporter: &Exporter,
    namespaces: &[NsGuard],
) -> anyhow::Result<Vec<Count>> {
    use micropod_common::{
        ENDPOINT_COUNTERS_MAP, ENDPOINTS_MAP, Endpoint, EndpointCounters, Ipv4Key, NAT_MAP,
        NatEntry, NatKey, PORTS_MAP,
    };
    let net = lab.net();
    let pins = net.dirs.pins.join("micropod");
    let stats = lab.json(["stats", "--json"])?;
    let (rules, chains) = nft_counts(net.host.path())?;
    let (rss, _) = exporter.memory_kib()?;
    let mut peer_links = BTreeSet::new();
    for (i, ns) in namespaces.iter().enumerate() {
        peer_links.extend(
            link_names(ns.path())
                .into_iter()
                .map(|l| format!("ns{i}:{l}")),
        );
    }
    // Pooled TAPs come and go by design (a refill starts only once an attach leaves half the
    // pool or less): counted apart, and only checked against their records.
    let (pooled, host_links): (BTreeSet<String>, BTreeSet<String>) = link_names(net.host.path())
        .into_iter()
        .partition(|l| micropod::network::pool_link(l).is_some());
    let pool_dir = net.dirs.state.join(micropod::network::POOL_SHELF);
    let pool_records: BTreeSet<String> = list_files(&pool_dir, &pool_dir)
        .into_iter()
        .filter(|f| !f.starts_with('.'))
        .map(|f| f.split('.').next().unwrap_or_default().to_owned())
        .collect();
    let unrecorded_pool = pooled
        .symmetric_difference(&pool_records)
        .cloned()
        .collect();
    // Spare files (taken by record writes, so that a full disk cannot stop a record) are
    // restocked in the background like the pool: left out too.
    let stocked = [
        format!("{}/", micropod::network::POOL_SHELF),
        format!("{}/", micropod::state::SPARE_DIR),
    ];
    let state_files = list_files(&net.dirs.state, &net.dirs.state)
        .into_iter()
        .filter(|f| !stocked.iter().any(|s| f.starts_with(s)))
        .collect();
    let mut rss = count("exporter VmRSS (KiB)", rss);
    rss.slack = RSS_SLACK_KIB;
    rss.may_shrink = true;
    Ok(vec![
        count("exporter fds", exporter.fds()?),
        rss,
        count("exporter: endpoint series", endpoint_series(exporter, lab)?),
        count(
            "ENDPOINTS map entries",
            map_keys::<Ipv4Key, Endpoint>(&pins, ENDPOINTS_MAP)?,
        ),
        count(
            "PORTS map entries",
            map_keys::<u32, Endpoint>(&pins, PORTS_MAP)?,
        ),
        count(
            "EP_COUNTERS map entries",
            percpu_map_keys::<Ipv4Key, EndpointCounters>(&pins, ENDPOINT_COUNTERS_MAP)?,
        ),
        count(
            "NAT map entries",
            map_keys::<NatKey, NatEntry>(&pins, NAT_MAP)?,
        ),
        count(
            "stats: endpoints",
            stats["endpoints"].as_array().map_or(0, Vec::len) as u64,
        ),
        count(
            "stats: NAT entries",
            stats["nat"]["entries"]
                .as_u64()
                .context("no nat.entries in `stats --json` (is the eBPF data path active?)")?,
        ),
        count(
            "stats: IPAM used",
            stats["ipam"]["used"].as_u64().context("no ipam.used")?,
        ),
        count("nft rules", rules),
        count("nft chains", chains),
        listed("links (host, but pool)", host_links),
        listed("pooled TAPs without record", unrecorded_pool),
        listed("links (endpoint netns)", peer_links),
        listed("pins", list_files(&pins, &pins)),
        listed("state files (but stocks)", state_files),
        listed(
            "lab processes",
            lab_processes(&net.dirs.state, exporter.pid()),
        ),
    ])
}

/// Whether a count is back to its baseline at the end.
fn back(baseline: &Count, end: &Count) -> bool {
    end.value <= baseline.value + baseline.slack
        && (baseline.may_shrink || end.value >= baseline.value)
}

// ---------------------------------------------------------------------------------------------
// The cycles.

/// An endpoint attached during the cycles.
struct Attached {
    name: String,
}

/// How the exporter and the counts fared over the run: every scrape also takes all counts,
/// so the table can show that the run really filled the maps (a peak above the baseline).
struct Watch<'a> {
    namespaces: &'a [NsGuard],
    scrapes: usize,
    rss_peak_kib: u64,
    fds_peak: u64,
    /// The largest value of each count, in [`take_counts`]'s order.
    peaks: Vec<u64>,
}

impl<'a> Watch<'a> {
    fn new(namespaces: &'a [NsGuard]) -> Self {
        Self {
            namespaces,
            scrapes: 0,
            rss_peak_kib: 0,
            fds_peak: 0,
            peaks: Vec::new(),
        }
    }

    fn scrape(&mut self, lab: &Lab, exporter: &Exporter, endpoints: usize) -> anyhow::Result<()> {
        scrape_checked(exporter, lab, endpoints)?;
        self.scrapes += 1;
        let (rss, hwm) = exporter.memory_kib()?;
        self.rss_peak_kib = self.rss_peak_kib.max(rss).max(hwm);
        self.fds_peak = self.fds_peak.max(exporter.fds()?);
        let counts = take_counts(lab, exporter, self.namespaces)?;
        self.peaks.resize(counts.len(), 0);
        for (peak, c) in self.peaks.iter_mut().zip(&counts) {
            *peak = (*peak).max(c.value);
        }
        Ok(())
    }
}

struct Traffic<'a> {
    echo: &'a EchoServer,
    bridge_mac: [u8; 6],
    namespaces: &'a [NsGuard],
}

/// Attaches endpoint `cycle` (netns on even cycles, TAP on odd ones) and gives it traffic.
fn attach_one(lab: &Lab, t: &Traffic<'_>, cycle: usize) -> anyhow::Result<Attached> {
    let name = format!("soak{cycle:05}");
    if cycle.is_multiple_of(2) {
        let ns = &t.namespaces[(cycle / 2) % t.namespaces.len()];
        // A name of its own: the peer of a detached veth stays in the namespace until the
        // reaper deletes the pair.
        let ifname = format!("s{cycle}");
        lab.json([
            OsStr::new("network"),
            OsStr::new("attach"),
            OsStr::new(&name),
            OsStr::new("--kind"),
            OsStr::new("netns"),
            OsStr::new("--netns"),
            ns.path().as_os_str(),
            OsStr::new("--ifname"),
            OsStr::new(&ifname),
            OsStr::new("--json"),
        ])?;
        netns_traffic(ns).with_context(|| format!("traffic of {name}"))?;
    } else {
        let att = lab.json(["network", "attach", &name, "--kind", "tap", "--json"])?;
        let ip: Ipv4Addr = att["ip"]
            .as_str()
            .and_then(|ip| ip.parse().ok())
            .with_context(|| format!("attach {name}: no IPv4 address in {att}"))?;
        let link = att["link"]
            .as_str()
            .with_context(|| format!("attach {name}: no link in {att}"))?;
        tap_traffic(lab, t.echo, link, ip, t.bridge_mac, cycle)
            .with_context(|| format!("traffic of {name}"))?;
    }
    Ok(Attached { name })
}

fn detach(lab: &Lab, ep: &Attached) -> anyhow::Result<()> {
    lab.run(["network", "detach", &ep.name]).map(drop)
}

/// `cycles` attach/detach cycles; returns how long they took.
fn endpoint_cycles(
    lab: &Lab,
    exporter: &Exporter,
    watch: &mut Watch<'_>,
    t: &Traffic<'_>,
    cycles: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut attached: std::collections::VecDeque<Attached> = Default::default();
    for cycle in 0..cycles {
        interrupted()?;
        attached.push_back(attach_one(lab, t, cycle)?);
        if attached.len() >= WINDOW
            && let Some(oldest) = attached.pop_front()
        {
            detach(lab, &oldest)?;
        }
        if (cycle + 1).is_multiple_of(SCRAPE_EVERY) {
            watch.scrape(lab, exporter, attached.len())?;
        }
        if (cycle + 1).is_multiple_of(100) || cycle + 1 == cycles {
            eprintln!(
                "  cycle {}/{cycles} ({:.0} s)",
                cycle + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    while let Some(ep) = attached.pop_front() {
        detach(lab, &ep)?;
    }
    Ok(started.elapsed())
}

/// What one VM cycle measured.
struct VmTimes {
    /// From `micropod run` to the guest's ready line.
    boot: Duration,
    /// The whole cycle: run, traffic, stop, rm.
    cycle: Duration,
}

/// `vms` VM cycles, `parallel` at once: run, page from the host, the guest's fetch from the
/// internet through the SNAT, stop, rm.
fn vm_cycles(
    lab: &Lab,
    exporter: &Exporter,
    watch: &mut Watch<'_>,
    first: usize,
    vms: usize,
    parallel: usize,
) -> anyhow::Result<Vec<VmTimes>> {
    let mut times = Vec::with_capacity(vms);
    let fetch = format!("micropod.fetch=http://{SERVER_ADDR}/");
    let mut next = first;
    while next < first + vms {
        interrupted()?;
        let batch: Vec<usize> = (next..(next + parallel).min(first + vms)).collect();
        next += batch.len();
        let started = Instant::now();
        let children: Vec<(String, Child)> = batch
            .iter()
            .map(|i| {
                let name = format!("soakvm{i:03}");
                let mut cmd = lab
                    .vm
                    .run_command(&name, &["--memory", "128", "--cmdline", &fetch]);
                cmd.stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .process_group(0);
                let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
                Ok((name, child))
            })
            .collect::<anyhow::Result<_>>()?;
        let mut running = Vec::new();
        let mut failed = None;
        for (name, child) in children {
            let out = child.wait_with_output()?;
            if !out.status.success() {
                failed.get_or_insert_with(|| {
                    format!(
                        "micropod run {name} failed ({}):\n{}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    )
                });
                continue;
            }
            let run: Value = serde_json::from_slice(&out.stdout).context("run --json output")?;
            let ip: Ipv4Addr = run["ip"]
                .as_str()
                .and_then(|ip| ip.parse().ok())
                .with_context(|| format!("run {name}: no IPv4 address in {run}"))?;
            running.push((name, ip));
        }
        if let Some(failed) = failed {
            bail!(failed);
        }
        for (name, ip) in &running {
            lab.wait_console(name, READY, BOOT)?;
            let boot = started.elapsed();
            let page = retry(
                &format!("GET http://{ip}/ from the host"),
                Duration::from_secs(20),
                || {
                    Ok(vmlab::http_get(
                        &lab.net().host,
                        SocketAddrV4::new(*ip, 80),
                    )?)
                },
            )?;
            ensure!(
                page.contains(&ip.to_string()),
                "{name}'s page does not name its address {ip}: {page:?}"
            );
            let console =
                lab.wait_console(name, "micropod-guest: fetch ", Duration::from_secs(60))?;
            ensure!(
                console.contains(&format!("micropod-guest: fetch ok {}", BODY.len())),
                "{name} could not fetch from the internet:\n{console}"
            );
            times.push(VmTimes {
                boot,
                cycle: Duration::ZERO,
            });
        }
        watch.scrape(lab, exporter, running.len())?;
        for (name, _) in &running {
            let out = lab.run(["stop", name, "--timeout", "30"])?;
            let said = String::from_utf8_lossy(&out.stdout);
            ensure!(
                said.trim() == format!("stopped {name}"),
                "{name} did not power off when asked: {said:?}"
            );
            lab.run(["rm", name])?;
        }
        let cycle = started.elapsed();
        let n = times.len();
        for t in &mut times[n - running.len()..] {
            t.cycle = cycle;
        }
        eprintln!(
            "  VMs {}/{} ({} at once: ready after {:.1} s, cycle {:.1} s)",
            next - first,
            vms,
            running.len(),
            times[n - 1].boot.as_secs_f64(),
            cycle.as_secs_f64()
        );
    }
    Ok(times)
}

// ---------------------------------------------------------------------------------------------
// The run.

fn bench(args: &Args) -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "run as root (it makes network namespaces and loads eBPF)"
    );
    let overall = Instant::now();
    let guest = if args.vms > 0 {
        std::panic::catch_unwind(vmlab::guest)
            .map_err(|_| anyhow::anyhow!("no test guest: run `cargo xtask guest` first"))?
    } else {
        // Never booted: no VM is asked for.
        Guest {
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
        }
    };
    // Made before the lab, so they outlive it: `network down --force` on the lab's drop
    // detaches endpoints into them.
    let namespaces: Vec<NsGuard> = (0..NETNS_COUNT)
        .map(|i| NsGuard::new(&format!("soak-ep{i}")))
        .collect();
    eprintln!("setting up the lab (network up, eBPF data path)…");
    let lab = Lab::new(guest)?;
    let status = lab.json(["network", "status", "--json"])?;
    let net = &status["network"];
    ensure!(
        net["datapath"] == "ebpf",
        "the eBPF data path is not active: {}",
        net["datapath_note"]
    );
    let bridge = net["bridge"].as_str().context("no bridge in the status")?;
    let echo = EchoServer::start(&lab.net().internet)?;
    let traffic = Traffic {
        echo: &echo,
        bridge_mac: lab.bridge_mac(bridge)?,
        namespaces: &namespaces,
    };
    let http = HttpServer::start(
        &lab.net().internet,
        SocketAddrV4::new(SERVER_ADDR, HTTP_PORT),
        BODY,
    );
    let exporter = Exporter::start(lab.command(["metrics", "serve", "--listen", "127.0.0.1:0"]))?;
    let mut watch = Watch::new(&namespaces);
    lab.net().host.run(|| {
        retry(
            "the exporter's first answer",
            Duration::from_secs(10),
            || get_200(exporter.addr, "/"),
        )
    })?;

    eprintln!("warm-up (files and buffers made on first use)…");
    let warm_cycles = 2;
    for cycle in 0..warm_cycles {
        let ep = attach_one(&lab, &traffic, cycle)?;
        watch.scrape(&lab, &exporter, 1)?;
        detach(&lab, &ep)?;
    }
    if args.vms > 0 {
        vm_cycles(&lab, &exporter, &mut watch, 0, 1, 1)?;
    }
    lab.settle()?;
    for _ in 0..3 {
        watch.scrape(&lab, &exporter, 0)?;
    }
    let baseline = take_counts(&lab, &exporter, &namespaces)?;
    let baseline_rss = baseline[1].value;
    // Peaks of the run proper, from the baseline on.
    watch.peaks = baseline.iter().map(|c| c.value).collect();

    eprintln!(
        "{} attach/detach cycles (netns and TAP alternating, up to {WINDOW} attached)…",
        args.cycles
    );
    let endpoint_time = endpoint_cycles(&lab, &exporter, &mut watch, &traffic, args.cycles)?;
    let attach_rss = exporter.memory_kib()?.0;
    let vm_started = Instant::now();
    let vm_times = if args.vms > 0 {
        eprintln!(
            "{} VM run/stop cycles, {} at once…",
            args.vms, args.vm_parallel
        );
        vm_cycles(&lab, &exporter, &mut watch, 1, args.vms, args.vm_parallel)?
    } else {
        Vec::new()
    };
    let vm_time = vm_started.elapsed();

    eprintln!("settling (reaper, refill) and counting…");
    lab.settle()?;
    // Not `watch.scrape`: an endpoint left attached is for the table to show, not an error.
    let end = take_counts(&lab, &exporter, &namespaces)?;
    let (end_rss, hwm) = exporter.memory_kib()?;
    let peers = http.peers();
    drop(http);
    ensure!(
        peers
            .iter()
            .all(|p| p.ip() == std::net::IpAddr::V4(UPLINK_ADDR)),
        "the internet server saw sources other than the uplink address (no SNAT?): {peers:?}"
    );
    let total = overall.elapsed();

    let mut leaks = Vec::new();
    for (b, e) in baseline.iter().zip(&end) {
        if !back(b, e) {
            let gone: Vec<_> = b.items.difference(&e.items).collect();
            let new: Vec<_> = e.items.difference(&b.items).collect();
            let what = if new.is_empty() && gone.is_empty() {
                String::new()
            } else {
                format!(" (new: {new:?}; gone: {gone:?})")
            };
            leaks.push(format!(
                "{}: {} at the start, {} at the end{what}",
                b.name, b.value, e.value
            ));
        }
    }
    let boots: Vec<f64> = vm_times.iter().map(|t| t.boot.as_secs_f64()).collect();
    let cycles_s: Vec<f64> = vm_times.iter().map(|t| t.cycle.as_secs_f64()).collect();
    let mib = |kib: u64| round_to(kib as f64 / KIB_PER_MIB, 2);

    if args.json {
        let rows: Vec<Value> = baseline
            .iter()
            .zip(&end)
            .zip(&watch.peaks)
            .map(|((b, e), peak)| {
                json!({
                    "name": b.name,
                    "baseline": b.value,
                    "peak": peak,
                    "end": e.value,
                    "slack": b.slack,
                    "ok": back(b, e),
                })
            })
            .collect();
        let report = json!({
            "cycles": args.cycles,
            "vms": args.vms,
            "vm_parallel": args.vm_parallel,
            "total_s": round_to(total.as_secs_f64(), 1),
            "attach_phase_s": round_to(endpoint_time.as_secs_f64(), 1),
            "vm_phase_s": round_to(vm_time.as_secs_f64(), 1),
            "vm_ready_s": if boots.is_empty() { Value::Null } else { json!({
                "p50": round_to(percentile(&boots, Percentile::P50), 1),
                "max": round_to(percentile(&boots, Percentile::MAX), 1),
            }) },
            "vm_cycle_s_p50": if cycles_s.is_empty() { Value::Null } else {
                json!(round_to(percentile(&cycles_s, Percentile::P50), 1))
            },
            "http_fetches_through_nat": peers.len(),
            "exporter": {
                "scrapes": watch.scrapes,
                "rss_mib": { "baseline": mib(baseline_rss), "after_cycles": mib(attach_rss), "peak": mib(watch.rss_peak_kib.max(hwm)), "end": mib(end_rss) },
                "fds": { "baseline": baseline[0].value, "peak": watch.fds_peak, "end": end[0].value },
            },
            "counts": rows,
            "leaks": leaks,
            "ok": leaks.is_empty(),
        });
        println!("{report}");
    } else {
        println!(
            "soak: {} attach/detach cycles in {:.1} s ({:.1} ms per cycle), {} VM cycles in {:.1} s ({} at once); {:.1} s in all",
            args.cycles,
            endpoint_time.as_secs_f64(),
            endpoint_time.as_secs_f64() * 1e3 / args.cycles.max(1) as f64,
            args.vms,
            vm_time.as_secs_f64(),
            args.vm_parallel,
            total.as_secs_f64()
        );
        if !boots.is_empty() {
            println!(
                "  VM ready after run: p50 {:.1} s, max {:.1} s; whole batch (run, traffic, stop, rm) p50 {:.1} s",
                percentile(&boots, Percentile::P50),
                percentile(&boots, Percentile::MAX),
                percentile(&cycles_s, Percentile::P50)
            );
        }
        println!(
            "  {} pages fetched from the internet server, all from the uplink address (SNAT); {} exporter scrapes",
            peers.len(),
            watch.scrapes
        );
        println!(
            "  exporter VmRSS: baseline {:.2} MiB, after the cycles {:.2} MiB, peak {:.2} MiB, end {:.2} MiB; fds: baseline {}, peak {}, end {}",
            mib(baseline_rss),
            mib(attach_rss),
            mib(watch.rss_peak_kib.max(hwm)),
            mib(end_rss),
            baseline[0].value,
            watch.fds_peak,
            end[0].value
        );
        println!(
            "  {:<28} {:>10} {:>10} {:>10} {:>8}",
            "", "baseline", "peak", "end", "slack"
        );
        for ((b, e), peak) in baseline.iter().zip(&end).zip(&watch.peaks) {
            let ok = back(b, e);
            println!(
                "  {:<28} {:>10} {:>10} {:>10} {:>8}  {}",
                b.name,
                b.value,
                peak,
                e.value,
                b.slack,
                if ok { "ok" } else { "NOT BACK" }
            );
        }
    }
    drop(exporter);
    drop(lab);
    if !leaks.is_empty() {
        bail!(
            "not back to the start after the soak:\n  {}",
            leaks.join("\n  ")
        );
    }
    Ok(())
}
