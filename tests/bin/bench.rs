//! The benchmark behind `cargo xtask bench attach`: the time to attach and detach one network
//! endpoint, as a whole `micropod` process, on the eBPF data path and on netfilter, for TAP and
//! netns endpoints, against the reference CNI `bridge` plugin with `host-local` IPAM doing
//! ADD/DEL of a veth into a network namespace, all in the same run; then bursts of attach and
//! detach processes started at once, for the throughput.
//!
//! Everything happens in namespaces the benchmark makes and removes (on errors, panics and
//! Ctrl-C too): a "host" namespace per network (micropod on eBPF, micropod on netfilter, the
//! CNI bridge), which the main thread enters around each spawn of that network's children,
//! and one namespace per netns endpoint. The machine's own network namespace is never
//! configured.
//!
//! A host per network, as on three machines: a network's figures then carry its own kernel
//! objects only (its bridge's ports, its routes), not the other networks'. The CNI plugin
//! leaves IPv6 on on its ports, so every later IPv6 route walk in a shared namespace (each
//! `disable_ipv6` write, each link going up or away) went through its routes too.
//!
//! Usage: `micropod-bench [--count N] [--burst N] [--quick] [--json]` (as root).

use std::{
    collections::HashSet,
    ffi::OsStr,
    fs,
    io::Write as _,
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use ipnetwork::Ipv4Network;
use micropod::net::{
    NetNs, link,
    naming::{NETNS_LINK_PREFIX, TAP_LINK_PREFIX},
};
use micropod_tests::{
    NsGuard, TestDirs,
    bench::{Percentile, ScratchDir, ms, ms_each, percentile, round_to},
    block_on, micropod_bin,
};
use nix::sched::{CloneFlags, setns};
use serde_json::{Map, Value, json};

const CNI_BRIDGE: &str = "cnibench0";
const CNI_SUBNET: &str = "10.28.0.0/22";
const CNI_NETWORK: &str = "mpbench";
const CNI_DIR: &str = "/usr/lib/cni";
/// micropod's own CNI plugin's network: its bridge, subnet and CNI network name.
const PLUGIN_BRIDGE: &str = "mpbench2";
const PLUGIN_SUBNET: &str = "10.32.0.0/22";
const PLUGIN_NETWORK: &str = "mpbench-plugin";
const IFNAME: &str = "eth0";

/// Endpoints per side in a real run, by default.
const DEFAULT_COUNT: usize = 200;
/// Endpoints per side in a real run, at least (the growth windows need room).
const MIN_COUNT: usize = 100;
/// Endpoints per side of a `--quick` smoke run, by default.
const QUICK_COUNT: usize = 10;
/// A Linux bridge holds at most 1023 ports; each micropod network holds the TAP and the netns
/// endpoints of its data path, so 2 × N of them.
const MAX_PER_NETWORK: usize = 1000;
const MAX_COUNT: usize = MAX_PER_NETWORK / 2;
/// Processes per burst, by default, and in a `--quick` run.
const DEFAULT_BURST: usize = 64;
const QUICK_BURST: usize = 8;
/// Bursts per side; the figures are their medians (one burst's rate moves by ±15 % here).
const DEFAULT_ROUNDS: usize = 3;
const MAX_ROUNDS: usize = 15;
/// A burst goes into an empty network; keep it (and its namespaces) within reason.
const MAX_BURST: usize = 500;
/// The growth check compares the median of the first attaches with that of the last ones.
const GROWTH_WINDOW: usize = 20;
/// Runs of each binary doing nothing, for the process start-up floor.
const FLOOR_RUNS: usize = 20;
const QUICK_FLOOR_RUNS: usize = 5;

/// Goals from issue 13, all p50 of whole processes, for the eBPF sides.
const TAP_ATTACH_GOAL: f64 = 4.0;
const TAP_DETACH_GOAL: f64 = 2.0;
const NETNS_ATTACH_GOAL: f64 = 2.0;
const GROWTH_GOAL: f64 = 1.2;
/// The growth goal is stated for the 1000th attach into one network.
const GROWTH_GOAL_AT: usize = 1000;
/// Goals from issue 14: micropod's CNI plugin against the reference bridge + host-local.
const PLUGIN_ADD_GOAL: f64 = 4.0;
const PLUGIN_DEL_GOAL: f64 = 2.0;
const BURST_ATTACH_GOAL: f64 = 250.0;
const BURST_DETACH_GOAL: f64 = 150.0;
/// The burst goals are stated for this many processes at once.
const BURST_GOAL_AT: usize = 64;

/// Times one endpoint attach and detach as a whole process: micropod on the eBPF data path and
/// on netfilter, TAP and netns endpoints, against the CNI bridge plugin with host-local IPAM
/// (ADD/DEL of a veth into a namespace), N endpoints per side, the sides rotated per endpoint
/// index; then bursts of attach and detach processes started at once, per micropod side.
/// Everything happens in network namespaces of its own. Run as root (`cargo xtask bench attach`
/// builds and runs it).
///
/// Each data path gets one micropod network (a bridge and a /22) holding its TAP and its netns
/// endpoints, so 2 × N endpoints at the end of the attaches: `--count 500` fills each network
/// with 1000, which is how the goal on the 1000th attach is measured.
#[derive(Parser)]
#[command(name = "micropod-bench", verbatim_doc_comment)]
struct Cli {
    /// Endpoints per side (default 200; at least 100 unless --quick; at most 500, as each
    /// network holds 2 × N and a bridge at most 1023 ports). --count 500 measures the growth
    /// goal at the 1000th attach.
    #[arg(long, value_name = "N")]
    count: Option<usize>,
    /// Processes started at once in each burst (default 64, 8 with --quick; at most 500)
    #[arg(long, value_name = "N")]
    burst: Option<usize>,
    /// Bursts per side, rotated across the sides; the figures are the medians (default 3, 1
    /// with --quick; at most 15)
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
    /// A development smoke run: 10 endpoints per side and bursts of 8 unless given
    #[arg(long)]
    quick: bool,
    /// Print the figures as one JSON object instead of the table
    #[arg(long)]
    json: bool,
}

struct Args {
    count: usize,
    burst: usize,
    rounds: usize,
    floor_runs: usize,
    json: bool,
}

fn resolve(cli: Cli) -> anyhow::Result<Args> {
    let quick = cli.quick;
    let count = cli
        .count
        .unwrap_or(if quick { QUICK_COUNT } else { DEFAULT_COUNT });
    ensure!(count >= 1, "--count must be at least 1");
    ensure!(
        quick || count >= MIN_COUNT,
        "--count {count}: a real run needs at least {MIN_COUNT} endpoints per side (use --quick for a smoke run)"
    );
    ensure!(
        count <= MAX_COUNT,
        "--count {count}: at most {MAX_COUNT}, since each micropod network holds 2 × N endpoints and one Linux bridge at most 1023 ports"
    );
    let burst = cli
        .burst
        .unwrap_or(if quick { QUICK_BURST } else { DEFAULT_BURST });
    ensure!(
        (1..=MAX_BURST).contains(&burst),
        "--burst {burst}: between 1 and {MAX_BURST}"
    );
    let rounds = cli.rounds.unwrap_or(if quick { 1 } else { DEFAULT_ROUNDS });
    ensure!(
        (1..=MAX_ROUNDS).contains(&rounds),
        "--rounds {rounds}: between 1 and {MAX_ROUNDS}"
    );
    Ok(Args {
        count,
        burst,
        rounds,
        floor_runs: if quick { QUICK_FLOOR_RUNS } else { FLOOR_RUNS },
        json: cli.json,
    })
}

fn main() -> ExitCode {
    micropod_tests::interrupt::main("micropod-bench", resolve, bench)
}

// ---------------------------------------------------------------------------------------------
// The sides.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Datapath {
    Ebpf,
    Netfilter,
}

impl Datapath {
    const ALL: [Self; 2] = [Self::Ebpf, Self::Netfilter];

    /// The `--datapath` value, and what `network status --json` says once it is active.
    fn arg(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Netfilter => "netfilter",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Ebpf => "eBPF",
            Self::Netfilter => "netfilter",
        }
    }

    fn bridge(self) -> &'static str {
        match self {
            Self::Ebpf => "mpbench0",
            Self::Netfilter => "mpbench1",
        }
    }

    /// A /22 each: room for 1000 endpoints besides the gateway.
    fn subnet(self) -> &'static str {
        match self {
            Self::Ebpf => "10.20.0.0/22",
            Self::Netfilter => "10.24.0.0/22",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tap,
    Netns,
}

impl Kind {
    fn arg(self) -> &'static str {
        match self {
            Self::Tap => "tap",
            Self::Netns => "netns",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Tap => "TAP",
            Self::Netns => "netns",
        }
    }
}

/// Who attaches: micropod on one data path with one kind of endpoint, or the CNI plugin (a
/// veth into a namespace, like micropod's netns kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Micropod(Datapath, Kind),
    /// micropod's CNI plugin (eBPF data path), exec'd as the reference plugin is.
    Plugin,
    Cni,
}

impl Who {
    /// In the order of the table; the rotation starts from each in turn.
    const ALL: [Self; 6] = [
        Self::Micropod(Datapath::Ebpf, Kind::Tap),
        Self::Micropod(Datapath::Ebpf, Kind::Netns),
        Self::Micropod(Datapath::Netfilter, Kind::Tap),
        Self::Micropod(Datapath::Netfilter, Kind::Netns),
        Self::Plugin,
        Self::Cni,
    ];

    /// The key in the JSON output.
    fn key(self) -> String {
        match self {
            Self::Micropod(dp, kind) => format!("{}_{}", dp.arg(), kind.arg()),
            Self::Plugin => "micropod_cni".into(),
            Self::Cni => "cni_netns".into(),
        }
    }

    fn label(self) -> String {
        match self {
            Self::Micropod(dp, kind) => format!("{} {}", dp.label(), kind.label()),
            Self::Plugin => "micropod CNI".into(),
            Self::Cni => "CNI netns".into(),
        }
    }

    fn needs_netns(self) -> bool {
        !matches!(self, Self::Micropod(_, Kind::Tap))
    }

    /// The endpoint name (micropod) or container ID (CNI) for `tag`; TAP and netns endpoints
    /// of one data path share a network, so their names differ by kind.
    fn name(self, tag: &str) -> String {
        match self {
            Self::Micropod(_, Kind::Tap) => format!("tap-{tag}"),
            Self::Micropod(_, Kind::Netns) => format!("ns-{tag}"),
            Self::Plugin | Self::Cni => format!("mpbench-{tag}"),
        }
    }
}

/// One side of the sequential phases: its namespaces (netns kinds) and its timings, per
/// endpoint index.
struct Side {
    who: Who,
    /// One per endpoint, plus one for the warm-up (last); empty for TAP endpoints.
    ns: Vec<NsGuard>,
    ips: HashSet<Ipv4Addr>,
    attach: Vec<Duration>,
    detach: Vec<Duration>,
}

impl Side {
    fn new(who: Who, count: usize) -> anyhow::Result<Self> {
        let mut ns = Vec::new();
        if who.needs_netns() {
            for _ in 0..=count {
                micropod_tests::interrupt::check()?;
                ns.push(NsGuard::new(match who {
                    Who::Cni => "cni",
                    Who::Plugin => "plugin",
                    Who::Micropod(..) => "mp",
                }));
            }
        }
        Ok(Self {
            who,
            ns,
            ips: HashSet::with_capacity(count),
            attach: Vec::with_capacity(count),
            detach: Vec::with_capacity(count),
        })
    }

    fn netns(&self, i: usize) -> Option<&Path> {
        self.ns.get(i).map(NsGuard::path)
    }

    fn warm_netns(&self) -> Option<&Path> {
        self.ns.last().map(NsGuard::path)
    }
}

/// One micropod side's burst: `burst` attach processes at once, then `burst` detaches.
struct Burst {
    who: Who,
    /// One per process (netns endpoints), or empty.
    ns: Vec<NsGuard>,
    /// Per round, then (after the last) their medians in `attach`, `detach`, `reaped`.
    rounds: Vec<BurstRound>,
    attach: Duration,
    detach: Duration,
    /// From the last detach's exit until the reaper had deleted every retired link.
    reaped: Duration,
}

#[derive(Clone, Copy)]
struct BurstRound {
    attach: Duration,
    detach: Duration,
    reaped: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Runs `step` on every side for endpoint `i`, starting with side `i mod K` and going round,
/// so each side goes first equally often and drift in the machine's load (other jobs,
/// frequency scaling, kernel work queues such as netns cleanup) hits all alike.
fn in_turn(
    i: usize,
    sides: &mut [Side],
    mut step: impl FnMut(&mut Side) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let k = sides.len();
    for j in 0..k {
        step(&mut sides[(i + j) % k])?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Guards, beyond NsGuard, TestDirs and ScratchDir from the support library.

/// The calling thread moved into another network namespace, so that the children it spawns
/// start there (a child inherits its parent thread's namespace); moved back on drop. Entered
/// around each spawn rather than with a `pre_exec` hook, which would make std fork instead of
/// using `posix_spawn` and so slow every spawn down (by about 0.5 ms here, and a burst's
/// spawns one after another).
struct Entered {
    original: NetNs,
}

impl Entered {
    fn enter(ns: &NsGuard) -> anyhow::Result<Self> {
        let original = NetNs::current().context("opening the current network namespace")?;
        setns(ns.ns(), CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {}", ns.path().display()))?;
        Ok(Self { original })
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.original, CloneFlags::CLONE_NEWNET) {
            eprintln!("warning: cannot return to the original network namespace: {e}");
        }
    }
}

/// A micropod network in its host namespace; `network down --force` on drop unless it was
/// taken down already, so its BPF pins (bpffs is not per namespace) never outlive the run.
/// Made before `up` runs, so a half-done `up` is undone too.
struct MicropodNet<'a> {
    mp: &'a Micropod,
    up: bool,
}

impl MicropodNet<'_> {
    /// `network down`; if that fails, the drop still tries `down --force`.
    fn down(mut self) -> anyhow::Result<()> {
        self.mp.run(["network", "down"])?;
        self.up = false;
        Ok(())
    }
}

impl Drop for MicropodNet<'_> {
    fn drop(&mut self) {
        if self.up
            && let Err(e) = self.mp.run(["network", "down", "--force"])
        {
            eprintln!(
                "warning: micropod network down --force ({}): {e:#}",
                self.mp.datapath.arg()
            );
        }
    }
}

/// The CNI bridge (made by the first ADD) in the CNI host namespace; deleted on drop if it is
/// still there.
struct CniBridge<'a> {
    host: &'a NsGuard,
    deleted: bool,
}

impl CniBridge<'_> {
    fn delete(mut self) -> anyhow::Result<()> {
        self.deleted = true;
        block_on(async {
            let nl = self.host.netlink();
            link::delete(&nl, CNI_BRIDGE).await?;
            anyhow::Ok(())
        })
        .with_context(|| format!("deleting the CNI bridge {CNI_BRIDGE}"))
    }
}

impl Drop for CniBridge<'_> {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        let gone = block_on(async {
            let nl = self.host.netlink();
            link::delete_if_exists(&nl, CNI_BRIDGE).await?;
            anyhow::Ok(())
        });
        if let Err(e) = gone {
            eprintln!("warning: cannot delete {CNI_BRIDGE}: {e:#}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running the two programs.

/// Pipes and a process group of the child's own: a Ctrl-C in the terminal reaches only the
/// benchmark, which lets the step in flight finish (see `interrupt`).
fn configure(cmd: &mut Command, stdin: bool) {
    cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
}

/// Spawns `cmd` with `stdin` and waits for it: the timed section. Returns the wall time and
/// the output; the exit status is checked by the caller, outside the timed section.
fn timed(
    host: &NsGuard,
    cmd: &mut Command,
    stdin: Option<&[u8]>,
) -> anyhow::Result<(Duration, Output)> {
    configure(cmd, stdin.is_some());
    let _in = Entered::enter(host)?;
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    if let Some(input) = stdin {
        // Far below a pipe's capacity, so this cannot block on the child.
        let mut pipe = child.stdin.take().context("stdin is piped")?;
        pipe.write_all(input).context("writing the child's stdin")?;
    }
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for {cmd:?}"))?;
    Ok((started.elapsed(), output))
}

/// Spawns every command, then waits for every child: the wall time from the first spawn to
/// the last exit, and the outputs in order. Children already started are waited for on every
/// path, so none outlives the step (and the guards' teardown does not race them).
fn all_at_once(host: &NsGuard, cmds: &mut [Command]) -> anyhow::Result<(Duration, Vec<Output>)> {
    for cmd in cmds.iter_mut() {
        configure(cmd, false);
    }
    let _in = Entered::enter(host)?;
    let mut children: Vec<Child> = Vec::with_capacity(cmds.len());
    let mut failed = None;
    let started = Instant::now();
    for cmd in cmds.iter_mut() {
        match cmd.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                failed = Some(anyhow::Error::new(e).context(format!("starting {cmd:?}")));
                break;
            }
        }
    }
    // Outputs are far below a pipe's capacity, so waiting in order blocks no child.
    let mut outputs = Vec::with_capacity(children.len());
    for child in children {
        match child.wait_with_output() {
            Ok(out) => outputs.push(out),
            Err(e) => {
                failed.get_or_insert_with(|| {
                    anyhow::Error::new(e).context("waiting for a burst child")
                });
            }
        }
    }
    let took = started.elapsed();
    match failed {
        Some(e) => Err(e),
        None => Ok((took, outputs)),
    }
}

fn check_success(what: &str, output: &Output) -> anyhow::Result<()> {
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n--- stdout\n{}--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The `micropod` CLI for one data path's network, with its own host namespace, state and pin
/// dirs.
struct Micropod {
    bin: PathBuf,
    datapath: Datapath,
    host: NsGuard,
    /// `network down` removes micropod's pin dir, so micropod gets a subdirectory of the
    /// guard's, which the guard then removes.
    bpf_dir: PathBuf,
    dirs: TestDirs,
    /// How long each sequential detach's background deletion of the retired link took after
    /// the detach returned (waited for, untimed, before anything else runs).
    reaped: std::cell::RefCell<Vec<Duration>>,
}

impl Micropod {
    fn new(bin: PathBuf, datapath: Datapath) -> Self {
        let dirs = TestDirs::new(&format!("bench-{}", datapath.arg()));
        Self {
            bin,
            datapath,
            host: NsGuard::new(&format!("bench-host-{}", datapath.arg())),
            bpf_dir: dirs.pins.join("micropod"),
            dirs,
            reaped: std::cell::RefCell::new(Vec::new()),
        }
    }

    /// Waits until the network's reaper has deleted every retired link (the detach returned
    /// before the kernel deleted it), so that this background work never lands inside another
    /// side's timed command; returns how long that took. Reads the retired links' records.
    fn wait_reaped(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let shelf = self.dirs.state.join(micropod::network::RETIRED_SHELF);
        loop {
            let pending: Vec<String> = match fs::read_dir(&shelf) {
                Ok(entries) => entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| !n.starts_with('.'))
                    .collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e).with_context(|| format!("reading {}", shelf.display())),
            };
            if pending.is_empty() {
                return Ok(started.elapsed());
            }
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "the reaper left {pending:?} after 30 s"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Waits until no pool refill runs or is about to (the refill an attach starts once the
    /// pool is half used makes TAPs in the background), so that it never lands inside another
    /// side's timed command either; returns how long that took.
    fn wait_refilled(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let pool = micropod_tests::PoolState::read(&self.dirs.state)?;
            if pool.settled(false) {
                return Ok(started.elapsed());
            }
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "the pool refill has not finished after 30 s ({pool:?}); its log: {}",
                fs::read_to_string(self.dirs.state.join(micropod::network::REFILL_LOG))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--state-dir")
            .arg(&self.dirs.state)
            .arg("--bpf-dir")
            .arg(&self.bpf_dir)
            .args(args);
        cmd
    }

    /// Runs an untimed command; fails unless it succeeds.
    fn run<I, S>(&self, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(args);
        let (_, output) = timed(&self.host, &mut cmd, None)?;
        check_success(&format!("{cmd:?}"), &output)?;
        Ok(output)
    }

    /// `network up` on this data path; fails unless `status` then says it is active.
    fn up(&self) -> anyhow::Result<(f64, Option<String>)> {
        let dp = self.datapath;
        let started = Instant::now();
        self.run([
            "network",
            "up",
            "--bridge",
            dp.bridge(),
            "--subnet",
            dp.subnet(),
            "--datapath",
            dp.arg(),
            "--json",
        ])?;
        let took = ms(started.elapsed());
        self.wait_refilled()?;
        let status = self.status()?;
        let active = &status["network"]["datapath"];
        let note = status["network"]["datapath_note"]
            .as_str()
            .map(str::to_owned);
        ensure!(
            active == dp.arg(),
            "`network up --datapath {}` left the {} data path active, not {} ({}): the figures would not be the {}'s",
            dp.arg(),
            active,
            dp.arg(),
            note.as_deref().unwrap_or("no note"),
            dp.label(),
        );
        Ok((took, note))
    }

    fn status(&self) -> anyhow::Result<Value> {
        let out = self.run(["network", "status", "--json"])?;
        serde_json::from_slice(&out.stdout).context("parsing `micropod network status --json`")
    }

    /// Checks that the network holds `n` endpoints and addresses.
    fn expect_endpoints(&self, n: usize, when: &str) -> anyhow::Result<()> {
        let status = self.status()?;
        let used = status["network"]["ipam"]["used"].as_u64();
        let endpoints = status["network"]["endpoints"].as_array().map(Vec::len);
        ensure!(
            used == Some(u64::try_from(n)?) && endpoints == Some(n),
            "{when}, the {} network's status shows {used:?} addresses used and {endpoints:?} endpoints, not {n}",
            self.datapath.label()
        );
        Ok(())
    }

    /// `micropod network attach NAME --kind KIND [--netns PATH] --json`.
    fn attach_command(&self, name: &str, kind: Kind, netns: Option<&Path>) -> Command {
        let mut cmd = self.command(["network", "attach", name, "--kind", kind.arg(), "--json"]);
        if let Some(path) = netns {
            cmd.arg("--netns").arg(path);
        }
        cmd
    }

    /// Checks an attach's exit status and answer; returns the endpoint's address.
    fn check_attach(
        &self,
        name: &str,
        kind: Kind,
        netns: Option<&Path>,
        out: &Output,
    ) -> anyhow::Result<Ipv4Addr> {
        check_success(&format!("micropod network attach {name}"), out)?;
        let att: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("parsing the attach answer for {name}"))?;
        let ip: Ipv4Addr = att["ip"]
            .as_str()
            .and_then(|ip| ip.parse().ok())
            .with_context(|| format!("attach {name}: no IPv4 address in {att}"))?;
        let subnet: Ipv4Network = self.datapath.subnet().parse()?;
        let placed = match kind {
            Kind::Tap => att["link"]
                .as_str()
                .is_some_and(|l| l.starts_with(TAP_LINK_PREFIX)),
            Kind::Netns => {
                att["ifname"] == IFNAME
                    && netns.is_some()
                    && att["netns"].as_str() == netns.and_then(Path::to_str)
            }
        };
        ensure!(
            att["name"] == name
                && att["kind"] == kind.arg()
                && att["bridge"] == self.datapath.bridge()
                && subnet.contains(ip)
                && placed,
            "attach {name}: unexpected answer {att}"
        );
        Ok(ip)
    }

    /// Timed attach; returns the endpoint's address.
    fn attach(
        &self,
        name: &str,
        kind: Kind,
        netns: Option<&Path>,
    ) -> anyhow::Result<(Duration, Ipv4Addr)> {
        let (took, out) = timed(
            &self.host,
            &mut self.attach_command(name, kind, netns),
            None,
        )?;
        let ip = self.check_attach(name, kind, netns, &out)?;
        self.wait_refilled()?;
        Ok((took, ip))
    }

    fn detach_command(&self, name: &str) -> Command {
        self.command(["network", "detach", name])
    }

    /// Timed `micropod network detach NAME`.
    fn detach(&self, name: &str) -> anyhow::Result<Duration> {
        let (took, out) = timed(&self.host, &mut self.detach_command(name), None)?;
        check_success(&format!("micropod network detach {name}"), &out)?;
        self.reaped.borrow_mut().push(self.wait_reaped()?);
        Ok(took)
    }
}

/// The reference CNI `bridge` plugin with `host-local` IPAM, in a host namespace of its own.
struct Cni {
    config: Vec<u8>,
    data_dir: ScratchDir,
    host: NsGuard,
}

impl Cni {
    fn new(data_dir: ScratchDir) -> Self {
        // ipMasq false: with it the plugin would run iptables on every ADD and DEL, while
        // micropod installs its NAT once, at `network up`.
        let config = json!({
            "cniVersion": "1.0.0",
            "name": CNI_NETWORK,
            "type": "bridge",
            "bridge": CNI_BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "subnet": CNI_SUBNET,
                "dataDir": data_dir.path(),
            },
        });
        Self {
            config: config.to_string().into_bytes(),
            data_dir,
            host: NsGuard::new("bench-host-cni"),
        }
    }

    fn command(&self, verb: &str, id: &str, netns: &Path) -> Command {
        cni_command(&Path::new(CNI_DIR).join("bridge"), verb, id, netns)
    }

    /// Timed ADD; checks that stdout is a CNI result for the endpoint and returns its address.
    fn add(&self, id: &str, netns: &Path) -> anyhow::Result<(Duration, Ipv4Addr)> {
        let (took, out) = timed(
            &self.host,
            &mut self.command("ADD", id, netns),
            Some(&self.config),
        )?;
        check_success(&format!("CNI bridge ADD {id}"), &out)?;
        Ok((took, cni_result_address(id, netns, &out)?))
    }

    /// Timed DEL.
    fn del(&self, id: &str, netns: &Path) -> anyhow::Result<Duration> {
        let (took, out) = timed(
            &self.host,
            &mut self.command("DEL", id, netns),
            Some(&self.config),
        )?;
        check_success(&format!("CNI bridge DEL {id}"), &out)?;
        Ok(took)
    }

    /// Addresses host-local still holds (one file per address in its data dir).
    fn held(&self) -> anyhow::Result<Vec<String>> {
        let dir = self.data_dir.path().join(CNI_NETWORK);
        let mut held = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.parse::<Ipv4Addr>().is_ok() {
                held.push(name);
            }
        }
        Ok(held)
    }
}

/// micropod's CNI plugin: the micropod binary exec'd as a runtime execs a plugin (the
/// `CNI_*` environment, the configuration on stdin, no arguments), in a host namespace of its
/// own; its first ADD (the warm-up) brings its network up.
struct Plugin {
    /// The network it makes: its host namespace, state and pin dirs, for waiting and teardown.
    mp: Micropod,
    config: Vec<u8>,
}

impl Plugin {
    fn new(bin: PathBuf) -> Self {
        let mp = Micropod::new(bin, Datapath::Ebpf);
        let config = json!({
            "cniVersion": "1.0.0",
            "name": PLUGIN_NETWORK,
            "type": "micropod",
            "bridge": PLUGIN_BRIDGE,
            "subnet": PLUGIN_SUBNET,
            "datapath": "ebpf",
            "stateDir": mp.dirs.state,
            "bpfDir": mp.bpf_dir,
        });
        Self {
            mp,
            config: config.to_string().into_bytes(),
        }
    }

    fn command(&self, verb: &str, id: &str, netns: &Path) -> Command {
        cni_command(&self.mp.bin, verb, id, netns)
    }

    /// Timed ADD; checks the CNI result and returns its address.
    fn add(&self, id: &str, netns: &Path) -> anyhow::Result<(Duration, Ipv4Addr)> {
        let (took, out) = timed(
            &self.mp.host,
            &mut self.command("ADD", id, netns),
            Some(&self.config),
        )?;
        check_success(&format!("micropod CNI ADD {id}"), &out)?;
        let ip = cni_result_address(id, netns, &out)?;
        let subnet: Ipv4Network = PLUGIN_SUBNET.parse()?;
        ensure!(
            subnet.contains(ip),
            "ADD {id}: {ip} is outside {PLUGIN_SUBNET}"
        );
        // The first ADD brought the network up and started the TAP pool's refill: like the
        // CLI sides' `up`, it must not run inside another side's timed command.
        self.mp.wait_refilled()?;
        Ok((took, ip))
    }

    /// Timed DEL, then (untimed) the background deletion of its link, as for micropod's
    /// detach.
    fn del(&self, id: &str, netns: &Path) -> anyhow::Result<Duration> {
        let (took, out) = timed(
            &self.mp.host,
            &mut self.command("DEL", id, netns),
            Some(&self.config),
        )?;
        check_success(&format!("micropod CNI DEL {id}"), &out)?;
        self.mp.reaped.borrow_mut().push(self.mp.wait_reaped()?);
        Ok(took)
    }
}

/// A CNI plugin `bin` as runtimes run it: the `CNI_*` environment, no arguments (the
/// configuration goes on stdin).
fn cni_command(bin: &Path, verb: &str, id: &str, netns: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env("CNI_COMMAND", verb)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", IFNAME)
        .env("CNI_PATH", CNI_DIR);
    cmd
}

/// The address of `IFNAME` in `netns` from a CNI ADD's stdout.
fn cni_result_address(id: &str, netns: &Path, out: &Output) -> anyhow::Result<Ipv4Addr> {
    let result: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ADD {id}: stdout is not JSON"))?;
    let cidr: Ipv4Network = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("ADD {id}: no IPv4 address in the CNI result {result}"))?;
    let sandboxed = result["interfaces"].as_array().is_some_and(|ifs| {
        ifs.iter()
            .any(|i| i["name"] == IFNAME && i["sandbox"].as_str() == netns.to_str())
    });
    ensure!(
        sandboxed,
        "ADD {id}: no {IFNAME} in {} in the CNI result {result}",
        netns.display()
    );
    Ok(cidr.ip())
}

/// Both micropod networks, micropod's CNI plugin and the reference CNI plugin.
struct Lab {
    ebpf: Micropod,
    netfilter: Micropod,
    plugin: Plugin,
    cni: Cni,
}

impl Lab {
    fn micropod(&self, dp: Datapath) -> &Micropod {
        match dp {
            Datapath::Ebpf => &self.ebpf,
            Datapath::Netfilter => &self.netfilter,
        }
    }

    /// One timed attach (CNI: ADD) of `who`'s endpoint `name`; returns its address.
    fn attach(
        &self,
        who: Who,
        name: &str,
        netns: Option<&Path>,
    ) -> anyhow::Result<(Duration, Ipv4Addr)> {
        match who {
            Who::Micropod(dp, kind) => self.micropod(dp).attach(name, kind, netns),
            Who::Plugin => self
                .plugin
                .add(name, netns.context("a CNI endpoint needs a netns")?),
            Who::Cni => self
                .cni
                .add(name, netns.context("a CNI endpoint needs a netns")?),
        }
    }

    /// One timed detach (CNI: DEL).
    fn detach(&self, who: Who, name: &str, netns: Option<&Path>) -> anyhow::Result<Duration> {
        match who {
            Who::Micropod(dp, _) => self.micropod(dp).detach(name),
            Who::Plugin => self
                .plugin
                .del(name, netns.context("a CNI endpoint needs a netns")?),
            Who::Cni => self
                .cni
                .del(name, netns.context("a CNI endpoint needs a netns")?),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run.

fn bench(args: &Args) -> anyhow::Result<()> {
    let (count, burst) = (args.count, args.burst);
    let started = Instant::now();
    let bin = micropod_bin();
    let bridge = Path::new(CNI_DIR).join("bridge");
    ensure!(
        bridge.is_file() && Path::new(CNI_DIR).join("host-local").is_file(),
        "the CNI reference plugins are not in {CNI_DIR} (Debian package containernetworking-plugins)"
    );
    let cni_version = cni_package_version();
    eprintln!("micropod:   {}", bin.display());
    eprintln!(
        "CNI:        {} (containernetworking-plugins {cni_version})",
        bridge.display()
    );

    // Guards, in the order they must go away reversed: the micropod networks and the CNI
    // bridge first (each from inside its host namespace), then the namespaces, then the
    // directories.
    let lab = Lab {
        ebpf: Micropod::new(bin.clone(), Datapath::Ebpf),
        netfilter: Micropod::new(bin.clone(), Datapath::Netfilter),
        plugin: Plugin::new(bin),
        cni: Cni::new(ScratchDir::new("bench-cni")?),
    };
    let netns_sides = Who::ALL.iter().filter(|w| w.needs_netns()).count();
    let burst_netns = 2 * burst;
    eprintln!(
        "making 4 host namespaces (one per network) and {} endpoint namespaces (not timed)",
        netns_sides * (count + 1) + burst_netns
    );
    let mut sides = Vec::with_capacity(Who::ALL.len());
    for who in Who::ALL {
        sides.push(Side::new(who, count)?);
    }
    let mut bursts = Vec::new();
    for who in Who::ALL {
        if let Who::Micropod(_, kind) = who {
            let mut ns = Vec::new();
            if kind == Kind::Netns {
                for _ in 0..burst {
                    micropod_tests::interrupt::check()?;
                    ns.push(NsGuard::new("burst"));
                }
            }
            bursts.push(Burst {
                who,
                ns,
                rounds: Vec::new(),
                attach: Duration::ZERO,
                detach: Duration::ZERO,
                reaped: Duration::ZERO,
            });
        }
    }
    micropod_tests::interrupt::check()?;
    let cni_bridge = CniBridge {
        host: &lab.cni.host,
        deleted: false,
    };

    let mut networks = Vec::new();
    let mut ups = Vec::new();
    for dp in Datapath::ALL {
        micropod_tests::interrupt::check()?;
        let mp = lab.micropod(dp);
        networks.push(MicropodNet { mp, up: true });
        let (up_ms, note) = mp.up()?;
        eprintln!(
            "micropod network up --datapath {}: bridge {} {}, {up_ms:.1} ms (once, not timed per attach){}",
            dp.arg(),
            dp.bridge(),
            dp.subnet(),
            note.map(|n| format!("; note: {n}")).unwrap_or_default()
        );
        ups.push((dp, up_ms));
    }

    // micropod's plugin brings its network up at its first ADD, the warm-up's.
    let plugin_net = MicropodNet {
        mp: &lab.plugin.mp,
        up: true,
    };

    // Warm-up, not counted: the binaries in the page cache, and the CNI bridges made by their
    // first ADD (micropod's CLI made its bridges at `up`), so no timed attach pays for a
    // bridge.
    for side in &sides {
        let name = side.who.name("warm-up");
        lab.attach(side.who, &name, side.warm_netns())?;
        lab.detach(side.who, &name, side.warm_netns())?;
    }
    let floor = process_floor(&lab, args.floor_runs)?;
    micropod_tests::interrupt::check()?;

    eprintln!(
        "attaching {count} endpoints per side, {} sides rotated per index",
        sides.len()
    );
    for i in 0..count {
        micropod_tests::interrupt::check()?;
        let tag = i.to_string();
        in_turn(i, &mut sides, |side| {
            let name = side.who.name(&tag);
            let (took, ip) = lab.attach(side.who, &name, side.netns(i))?;
            ensure!(
                side.ips.insert(ip),
                "{} gave {ip} twice (at {name})",
                side.who.label()
            );
            side.attach.push(took);
            Ok(())
        })?;
        if (i + 1) % 50 == 0 {
            eprintln!("  {} attached", i + 1);
        }
    }

    // Correctness between the phases (not timed): distinct addresses (checked as they came,
    // and in the subnet by check_attach), and micropod's and host-local's own counts agree.
    for dp in Datapath::ALL {
        lab.micropod(dp)
            .expect_endpoints(2 * count, &format!("after {count} attaches per kind"))?;
    }
    lab.plugin
        .mp
        .expect_endpoints(count, &format!("after {count} CNI ADDs"))?;
    let cni_subnet: Ipv4Network = CNI_SUBNET.parse()?;
    let cni_side = sides
        .iter()
        .find(|s| s.who == Who::Cni)
        .context("the CNI side")?;
    ensure!(
        cni_side.ips.iter().all(|ip| cni_subnet.contains(*ip)),
        "a host-local address is outside {CNI_SUBNET}"
    );
    ensure!(
        lab.cni.held()?.len() == count,
        "host-local does not hold {count} addresses"
    );

    eprintln!("detaching them (rotated)");
    for i in 0..count {
        micropod_tests::interrupt::check()?;
        let tag = i.to_string();
        in_turn(i, &mut sides, |side| {
            let took = lab.detach(side.who, &side.who.name(&tag), side.netns(i))?;
            side.detach.push(took);
            Ok(())
        })?;
    }
    for dp in Datapath::ALL {
        lab.micropod(dp)
            .expect_endpoints(0, "after detaching everything")?;
    }
    lab.plugin.mp.expect_endpoints(0, "after the CNI DELs")?;
    let held = lab.cni.held()?;
    ensure!(held.is_empty(), "host-local still holds {held:?}");

    // Round r starts with side r: each side goes first as often as the others.
    let (rounds, sides_n) = (args.rounds, bursts.len());
    for round in 0..rounds {
        for k in 0..sides_n {
            let b = &mut bursts[(k + round) % sides_n];
            micropod_tests::interrupt::check()?;
            let Who::Micropod(dp, kind) = b.who else {
                continue;
            };
            eprintln!(
                "burst {}/{rounds}: {burst} {} attaches at once, then detaches",
                round + 1,
                b.who.label()
            );
            let mp = lab.micropod(dp);
            let names: Vec<String> = (0..burst)
                .map(|i| b.who.name(&format!("burst-{i}")))
                .collect();
            let netns = |i: usize| b.ns.get(i).map(NsGuard::path);
            let mut cmds: Vec<Command> = names
                .iter()
                .enumerate()
                .map(|(i, name)| mp.attach_command(name, kind, netns(i)))
                .collect();
            let (took, outs) = all_at_once(&mp.host, &mut cmds)?;
            let mut ips = HashSet::with_capacity(burst);
            for (i, (name, out)) in names.iter().zip(&outs).enumerate() {
                let ip = mp.check_attach(name, kind, netns(i), out)?;
                ensure!(
                    ips.insert(ip),
                    "{} gave {ip} twice in a burst (at {name})",
                    b.who.label()
                );
            }
            mp.expect_endpoints(burst, &format!("after a burst of {burst} attaches"))?;
            let attach = took;
            mp.wait_refilled()?;

            micropod_tests::interrupt::check()?;
            let mut cmds: Vec<Command> = names.iter().map(|n| mp.detach_command(n)).collect();
            let (took, outs) = all_at_once(&mp.host, &mut cmds)?;
            for (name, out) in names.iter().zip(&outs) {
                check_success(&format!("micropod network detach {name}"), out)?;
            }
            mp.expect_endpoints(0, &format!("after a burst of {burst} detaches"))?;
            let reaped = mp.wait_reaped()?;
            b.rounds.push(BurstRound {
                attach,
                detach: took,
                reaped,
            });
        }
    }
    for b in &mut bursts {
        b.attach = median(b.rounds.iter().map(|r| r.attach).collect());
        b.detach = median(b.rounds.iter().map(|r| r.detach).collect());
        b.reaped = median(b.rounds.iter().map(|r| r.reaped).collect());
    }

    // Everything released: no endpoint link left, then each network down and the CNI bridge.
    for host in [
        &lab.ebpf.host,
        &lab.netfilter.host,
        &lab.plugin.mp.host,
        &lab.cni.host,
    ] {
        let leftovers: Vec<String> = block_on(async {
            let links = link::list(&host.netlink()).await?;
            anyhow::Ok(links.into_iter().map(|l| l.name).collect::<Vec<_>>())
        })?
        .into_iter()
        .filter(|n| {
            n.starts_with(NETNS_LINK_PREFIX)
                || n.starts_with(TAP_LINK_PREFIX)
                || n.starts_with("veth")
        })
        .collect();
        ensure!(
            leftovers.is_empty(),
            "endpoint links left in {}: {leftovers:?}",
            host.path().display()
        );
    }
    for network in networks.drain(..).rev() {
        let mp = network.mp;
        network.down()?;
        let remaining = mp.status()?;
        ensure!(
            remaining["up"] == false,
            "micropod {} network still up after `down`: {remaining}",
            mp.datapath.arg()
        );
    }
    plugin_net.down()?;
    ensure!(
        lab.plugin.mp.status()?["up"] == false,
        "micropod's CNI network still up after `down`"
    );
    cni_bridge.delete()?;

    // Each network: its `up` time and the p50 of its background link deletions.
    let networks: Vec<(Datapath, f64, f64)> = ups
        .iter()
        .map(|&(dp, up_ms)| {
            let reaped = lab.micropod(dp).reaped.borrow();
            let p50 = if reaped.is_empty() {
                0.0
            } else {
                stats(&reaped).p50
            };
            (dp, up_ms, p50)
        })
        .collect();
    report(
        args,
        &sides,
        &bursts,
        &networks,
        &floor,
        &cni_version,
        started,
    );
    Ok(())
}

/// How long each binary takes to start and exit doing nothing: `micropod --version` and the
/// bridge plugin's VERSION command. Not part of the comparison; it shows how much of each
/// figure is process start-up. Returns the p50s (micropod, CNI).
fn process_floor(lab: &Lab, runs: usize) -> anyhow::Result<(f64, f64)> {
    let (mut mp_runs, mut cni_runs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (took, out) = timed(&lab.ebpf.host, &mut lab.ebpf.command(["--version"]), None)?;
        check_success("micropod --version", &out)?;
        mp_runs.push(took);
        let mut cmd = Command::new(Path::new(CNI_DIR).join("bridge"));
        cmd.env("CNI_COMMAND", "VERSION");
        let (took, out) = timed(&lab.cni.host, &mut cmd, Some(&lab.cni.config))?;
        check_success("CNI bridge VERSION", &out)?;
        cni_runs.push(took);
    }
    Ok((
        percentile(&ms_each(&mp_runs), Percentile::P50),
        percentile(&ms_each(&cni_runs), Percentile::P50),
    ))
}

fn cni_package_version() -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "containernetworking-plugins"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown version".into())
}

// ---------------------------------------------------------------------------------------------
// Figures.

#[derive(Clone, Copy)]
struct Stats {
    p50: f64,
    p95: f64,
    mean: f64,
}

fn stats(samples: &[Duration]) -> Stats {
    let ms = ms_each(samples);
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    Stats {
        p50: percentile(&ms, Percentile::P50),
        p95: percentile(&ms, Percentile::P95),
        mean,
    }
}

impl Stats {
    fn json(self) -> Value {
        json!({"p50_ms": round_to(self.p50, 3), "p95_ms": round_to(self.p95, 3), "mean_ms": round_to(self.mean, 3)})
    }
}

/// Does the last attach (with the network nearly full) cost more than the first?
struct Growth {
    window: usize,
    first_median: f64,
    last_median: f64,
    ratio: f64,
    first: f64,
    last: f64,
}

impl Growth {
    fn of(attach: &[Duration], window: usize) -> Self {
        let n = attach.len();
        let first = percentile(&ms_each(&attach[..window]), Percentile::P50);
        let last = percentile(&ms_each(&attach[n - window..]), Percentile::P50);
        Self {
            window,
            first_median: first,
            last_median: last,
            ratio: last / first,
            first: ms(attach[0]),
            last: ms(attach[n - 1]),
        }
    }

    fn json(&self) -> Value {
        json!({
            "window": self.window,
            "first_window_median_ms": round_to(self.first_median, 3),
            "last_window_median_ms": round_to(self.last_median, 3),
            "ratio": round_to(self.ratio, 3),
            "attach_first_ms": round_to(self.first, 3),
            "attach_last_ms": round_to(self.last, 3),
        })
    }
}

/// One side's figures.
struct Figures {
    who: Who,
    attach: Stats,
    detach: Stats,
    growth: Growth,
    /// CNI ADD p50 / this side's attach p50, and CNI DEL p50 / detach p50.
    attach_ratio: f64,
    detach_ratio: f64,
}

struct Goal {
    /// A stable name for the JSON output.
    key: String,
    text: String,
    value: f64,
    /// `value` must be at least (true) or at most (false) `target`.
    at_least: bool,
    target: f64,
    unit: &'static str,
    /// When the run is smaller than the one the goal is stated for.
    caveat: Option<String>,
}

impl Goal {
    fn met(&self) -> bool {
        if self.at_least {
            self.value >= self.target
        } else {
            self.value <= self.target
        }
    }

    fn json(&self) -> Value {
        json!({
            "key": self.key,
            "goal": self.text,
            "value": round_to(self.value, 3),
            "target": self.target,
            "unit": self.unit,
            "at_least": self.at_least,
            "met": self.met(),
            "caveat": self.caveat,
        })
    }
}

fn report(
    args: &Args,
    sides: &[Side],
    bursts: &[Burst],
    ups: &[(Datapath, f64, f64)],
    floor: &(f64, f64),
    cni_version: &str,
    started: Instant,
) {
    let (count, burst) = (args.count, args.burst);
    let window = GROWTH_WINDOW.min(count.div_ceil(10)).max(1);
    let cni = sides
        .iter()
        .find(|s| s.who == Who::Cni)
        .expect("the CNI side is always there");
    let (cni_attach, cni_detach) = (stats(&cni.attach), stats(&cni.detach));
    let figures: Vec<Figures> = sides
        .iter()
        .map(|s| {
            let (attach, detach) = (stats(&s.attach), stats(&s.detach));
            Figures {
                who: s.who,
                attach,
                detach,
                growth: Growth::of(&s.attach, window),
                attach_ratio: cni_attach.p50 / attach.p50,
                detach_ratio: cni_detach.p50 / detach.p50,
            }
        })
        .collect();
    let of = |who: Who| {
        figures
            .iter()
            .find(|f| f.who == who)
            .expect("every side has figures")
    };
    let rate = |d: Duration| burst as f64 / d.as_secs_f64();
    let per_network = 2 * count;

    let ebpf_tap = Who::Micropod(Datapath::Ebpf, Kind::Tap);
    let ebpf_netns = Who::Micropod(Datapath::Ebpf, Kind::Netns);
    let growth_caveat = (per_network < GROWTH_GOAL_AT).then(|| {
        format!(
            "measured with {per_network} endpoints per network; the goal is stated for the {GROWTH_GOAL_AT}th: run --count {}",
            GROWTH_GOAL_AT / 2
        )
    });
    let burst_caveat = (burst != BURST_GOAL_AT)
        .then(|| format!("bursts of {burst}; the goal is stated for {BURST_GOAL_AT}"));
    let mut goals = vec![
        Goal {
            key: "ebpf_tap_attach_speedup".into(),
            text: format!("eBPF TAP attach >= {TAP_ATTACH_GOAL}x faster than CNI ADD (p50)"),
            value: of(ebpf_tap).attach_ratio,
            at_least: true,
            target: TAP_ATTACH_GOAL,
            unit: "x",
            caveat: None,
        },
        Goal {
            key: "ebpf_tap_detach_speedup".into(),
            text: format!("eBPF TAP detach >= {TAP_DETACH_GOAL}x faster than CNI DEL (p50)"),
            value: of(ebpf_tap).detach_ratio,
            at_least: true,
            target: TAP_DETACH_GOAL,
            unit: "x",
            caveat: None,
        },
        Goal {
            key: "ebpf_netns_attach_speedup".into(),
            text: format!("eBPF netns attach >= {NETNS_ATTACH_GOAL}x faster than CNI ADD (p50)"),
            value: of(ebpf_netns).attach_ratio,
            at_least: true,
            target: NETNS_ATTACH_GOAL,
            unit: "x",
            caveat: None,
        },
    ];
    goals.push(Goal {
        key: "micropod_cni_add_speedup".into(),
        text: format!(
            "micropod CNI ADD >= {PLUGIN_ADD_GOAL}x faster than bridge + host-local ADD (p50)"
        ),
        value: of(Who::Plugin).attach_ratio,
        at_least: true,
        target: PLUGIN_ADD_GOAL,
        unit: "x",
        caveat: None,
    });
    goals.push(Goal {
        key: "micropod_cni_del_speedup".into(),
        text: format!(
            "micropod CNI DEL >= {PLUGIN_DEL_GOAL}x faster than bridge + host-local DEL (p50)"
        ),
        value: of(Who::Plugin).detach_ratio,
        at_least: true,
        target: PLUGIN_DEL_GOAL,
        unit: "x",
        caveat: None,
    });
    for who in [ebpf_tap, ebpf_netns] {
        goals.push(Goal {
            key: format!("{}_growth", who.key()),
            text: format!(
                "{} last attaches <= {GROWTH_GOAL}x the first (median of last {window} / first {window})",
                who.label()
            ),
            value: of(who).growth.ratio,
            at_least: false,
            target: GROWTH_GOAL,
            unit: "x",
            caveat: growth_caveat.clone(),
        });
    }
    for b in bursts
        .iter()
        .filter(|b| matches!(b.who, Who::Micropod(Datapath::Ebpf, _)))
    {
        goals.push(Goal {
            key: format!("{}_burst_attach_rate", b.who.key()),
            text: format!(
                "{} burst: {burst} attaches at once >= {BURST_ATTACH_GOAL}/s",
                b.who.label()
            ),
            value: rate(b.attach),
            at_least: true,
            target: BURST_ATTACH_GOAL,
            unit: "/s",
            caveat: burst_caveat.clone(),
        });
        goals.push(Goal {
            key: format!("{}_burst_detach_rate", b.who.key()),
            text: format!(
                "{} burst: {burst} detaches at once >= {BURST_DETACH_GOAL}/s",
                b.who.label()
            ),
            value: rate(b.detach),
            at_least: true,
            target: BURST_DETACH_GOAL,
            unit: "/s",
            caveat: burst_caveat.clone(),
        });
    }
    let wall = started.elapsed().as_secs_f64();

    if args.json {
        let mut side_json = Map::new();
        for f in &figures {
            side_json.insert(
                f.who.key(),
                json!({
                    "attach": f.attach.json(),
                    "detach": f.detach.json(),
                    "growth": f.growth.json(),
                    "ratio_cni_add_over_attach_p50": round_to(f.attach_ratio, 3),
                    "ratio_cni_del_over_detach_p50": round_to(f.detach_ratio, 3),
                }),
            );
        }
        let mut burst_json = Map::new();
        for b in bursts {
            burst_json.insert(
                b.who.key(),
                json!({
                    "processes": burst,
                    "attach_wall_ms": round_to(ms(b.attach), 3),
                    "attach_per_s": round_to(rate(b.attach), 1),
                    "detach_wall_ms": round_to(ms(b.detach), 3),
                    "detach_per_s": round_to(rate(b.detach), 1),
                    "links_deleted_after_ms": round_to(ms(b.reaped), 3),
                    "rounds": b.rounds.iter().map(|r| json!({
                        "attach_per_s": round_to(rate(r.attach), 1),
                        "detach_per_s": round_to(rate(r.detach), 1),
                    })).collect::<Vec<_>>(),
                }),
            );
        }
        let networks: Map<String, Value> = ups
            .iter()
            .map(|(dp, up_ms, reap_p50)| {
                (
                    dp.arg().to_owned(),
                    json!({
                        "bridge": dp.bridge(),
                        "subnet": dp.subnet(),
                        "up_ms": round_to(*up_ms, 3),
                        "background_link_deletion_p50_ms": round_to(*reap_p50, 3),
                        "endpoints_at_most": per_network,
                    }),
                )
            })
            .collect();
        let out = json!({
            "count": count,
            "burst": burst,
            "rotated": true,
            "networks": networks,
            "cni": {"bridge": CNI_BRIDGE, "subnet": CNI_SUBNET, "plugins_version": cni_version},
            "micropod_cni": {"bridge": PLUGIN_BRIDGE, "subnet": PLUGIN_SUBNET, "datapath": "ebpf"},
            "sides": side_json,
            "bursts": burst_json,
            "goals": goals.iter().map(Goal::json).collect::<Vec<_>>(),
            "all_goals_met": goals.iter().all(Goal::met),
            "process_floor_p50_ms": {
                "micropod_version": round_to(floor.0, 3),
                "cni_bridge_version": round_to(floor.1, 3),
            },
            "wall_s": round_to(wall, 3),
        });
        println!("{out}");
        return;
    }

    println!();
    println!(
        "endpoint attach/detach, one whole process each: N = {count} endpoints per side, {} sides rotated per endpoint index",
        figures.len()
    );
    for (dp, up_ms, _) in ups {
        println!(
            "  micropod {:<10} network up --datapath {}, bridge {} {}: TAP and netns endpoints share it, {per_network} at the most ({up_ms:.0} ms, not timed)",
            dp.label(),
            dp.arg(),
            dp.bridge(),
            dp.subnet(),
        );
    }
    println!(
        "  micropod CNI        micropod's CNI plugin, ADD / DEL (eBPF data path, bridge {PLUGIN_BRIDGE}, {PLUGIN_SUBNET}; its first ADD brought it up, not timed)"
    );
    println!(
        "  CNI                 bridge plugin + host-local IPAM, ADD / DEL (containernetworking-plugins {cni_version}, bridge {CNI_BRIDGE}, {CNI_SUBNET})"
    );
    println!();
    println!(
        "{:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "", "attach", "", "detach", "", "growth", "CNI ADD/", "CNI DEL/"
    );
    println!(
        "{:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "side (ms)", "p50", "p95", "p50", "p95", "last/1st", "attach", "detach"
    );
    for f in &figures {
        println!(
            "{:<16} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7.2}x {:>8.1}x {:>8.1}x",
            f.who.label(),
            f.attach.p50,
            f.attach.p95,
            f.detach.p50,
            f.detach.p95,
            f.growth.ratio,
            f.attach_ratio,
            f.detach_ratio
        );
    }
    println!(
        "  growth: median of the last {window} attaches over the first {window}; single attaches #1 and #{count}: {}",
        figures
            .iter()
            .map(|f| format!(
                "{} {:.2}/{:.2} ms",
                f.who.label(),
                f.growth.first,
                f.growth.last
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    println!(
        "burst: {burst} processes started at once (spawn all, then wait all), first spawn to last exit; median of {} round(s) per side",
        args.rounds
    );
    println!(
        "{:<16} {:>10} {:>10} {:>10} {:>10} {:>14}",
        "side", "attach ms", "attach/s", "detach ms", "detach/s", "links gone +ms"
    );
    for b in bursts {
        println!(
            "{:<16} {:>10.1} {:>10.0} {:>10.1} {:>10.0} {:>14.1}",
            b.who.label(),
            ms(b.attach),
            rate(b.attach),
            ms(b.detach),
            rate(b.detach),
            ms(b.reaped)
        );
    }
    if args.rounds > 1 {
        for b in bursts {
            let each: Vec<String> = b
                .rounds
                .iter()
                .map(|r| format!("{:.0}/{:.0}", rate(r.attach), rate(r.detach)))
                .collect();
            println!(
                "  {} per round, attaches/s / detaches/s: {}",
                b.who.label(),
                each.join(", ")
            );
        }
    }
    println!();
    println!("goals (the eBPF sides; netfilter above for comparison):");
    for g in &goals {
        println!(
            "  {}: {:.2}{} {}{}",
            g.text,
            g.value,
            g.unit,
            if g.met() { "met" } else { "NOT met" },
            g.caveat
                .as_ref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        );
    }
    println!();
    println!("notes:");
    println!(
        "  - each figure is the wall time from spawning the process to reaping it (micropod's --json answer, CNI's result on stdout, both parsed and checked afterwards)"
    );
    println!(
        "  - each network (micropod eBPF, micropod netfilter, CNI) has a host namespace of its own, as on three machines, so its figures carry its own ports and routes only; what the kernel shares between namespaces (rtnl, the dentries of every namespace's /proc/sys/net, the list of tc blocks) is still shared"
    );
    println!(
        "  - micropod's detach returns before the kernel deletes the (retired) link; its reaper does that in the background. The benchmark waits for it after every micropod detach and burst, untimed, so that work never lands in another command's figure: p50 {} after a detach",
        ups.iter()
            .map(|(dp, _, p50)| format!("{} {p50:.1} ms", dp.label()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  - micropod runs with its default TAP pool ({} TAPs made ahead of need, down ports of the bridge): a TAP attach takes one, and the attach that leaves it half full starts a background refill, which the benchmark waits for after each attach, untimed, like the reaper; in a burst, the attaches after the pool ran dry make their own TAPs while the refill runs beside them",
        micropod::network::DEFAULT_POOL
    );
    println!(
        "  - the CNI side runs with ipMasq false: with it the plugin would run iptables on every ADD/DEL; micropod installs its NAT once, at `network up`, not per attach"
    );
    println!(
        "  - process start-up floor (p50 of {}, not part of the figures above): `micropod --version` {:.2} ms, CNI bridge VERSION {:.2} ms",
        args.floor_runs, floor.0, floor.1
    );
    println!(
        "  - not timed: namespace creation, `network up`, one warm-up attach/detach per side (which also makes the CNI bridge)"
    );
    println!(
        "  - checked: distinct addresses in the subnet per side and per burst, every exit status and answer, the networks' endpoint and address counts after each phase, host-local's files, no endpoint links left; then both `micropod network down` and the CNI bridge deleted"
    );
    println!("  - percentiles are nearest-rank; wall time of the whole run {wall:.1} s");
}
