//! The benchmark behind `cargo xtask bench attach`: the time to attach and detach one network
//! endpoint, as a whole `micropod` process, against the reference CNI `bridge` plugin with
//! `host-local` IPAM doing ADD/DEL of the same kind of endpoint (a veth into a network
//! namespace), in the same run.
//!
//! Everything happens in namespaces the benchmark makes and removes (on errors, panics and
//! Ctrl-C too): a "host" namespace holding both bridges, which the main thread enters before
//! it starts any child, and one namespace per endpoint. The machine's own network namespace is
//! never configured.
//!
//! Usage: `micropod-bench [--count N] [--quick] [--json]` (as root).

use std::{
    collections::HashSet,
    ffi::OsStr,
    fs,
    io::Write as _,
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use ipnetwork::Ipv4Network;
use micropod::net::{NetNs, Netlink, link};
use micropod_tests::{
    NsGuard, TestDirs,
    bench::{Percentile, ScratchDir, ms, ms_each, percentile, round_to},
    block_on, micropod_bin,
};
use nix::sched::{CloneFlags, setns};
use serde_json::{Value, json};

const MICROPOD_BRIDGE: &str = "mpbench0";
const MICROPOD_SUBNET: &str = "10.20.0.0/16";
const CNI_BRIDGE: &str = "cnibench0";
const CNI_SUBNET: &str = "10.30.0.0/16";
const CNI_NETWORK: &str = "mpbench";
const CNI_DIR: &str = "/usr/lib/cni";
const IFNAME: &str = "eth0";

/// Endpoints per side in a real run, at least.
const MIN_COUNT: usize = 200;
/// Endpoints per side of a `--quick` smoke run, by default.
const QUICK_COUNT: usize = 20;
/// Both sides put every endpoint on one Linux bridge, which holds at most 1023 ports.
const MAX_COUNT: usize = 1000;
/// The growth check compares the median of the first attaches with that of the last ones.
const GROWTH_WINDOW: usize = 20;
/// Goals from the issue.
const SPEEDUP_GOAL: f64 = 10.0;
const GROWTH_GOAL: f64 = 1.5;
/// Runs of each binary doing nothing, for the process start-up floor.
const FLOOR_RUNS: usize = 20;

/// Times one endpoint attach+detach as a whole `micropod` process against the CNI bridge plugin
/// with host-local IPAM (ADD/DEL), N endpoints each, interleaved, in namespaces of its own.
/// Run as root (cargo xtask bench attach builds and runs it).
#[derive(Parser)]
#[command(name = "micropod-bench", verbatim_doc_comment)]
struct Cli {
    /// Endpoints per side (default 200; at least 200 unless --quick; at most 1000)
    #[arg(long, value_name = "N")]
    count: Option<usize>,
    /// A development smoke run: allows fewer endpoints (default 20)
    #[arg(long)]
    quick: bool,
    /// Print the figures as one JSON object instead of the table
    #[arg(long)]
    json: bool,
}

struct Args {
    count: usize,
    json: bool,
}

fn resolve(cli: Cli) -> anyhow::Result<Args> {
    let quick = cli.quick;
    let count = cli
        .count
        .unwrap_or(if quick { QUICK_COUNT } else { MIN_COUNT });
    ensure!(count >= 1, "--count must be at least 1");
    ensure!(
        quick || count >= MIN_COUNT,
        "--count {count}: a real run needs at least {MIN_COUNT} endpoints per side (use --quick for a smoke run)"
    );
    ensure!(
        count <= MAX_COUNT,
        "--count {count}: at most {MAX_COUNT}, since one Linux bridge holds at most 1023 ports"
    );
    Ok(Args {
        count,
        json: cli.json,
    })
}

fn main() -> ExitCode {
    micropod_tests::interrupt::main("micropod-bench", resolve, bench)
}

// ---------------------------------------------------------------------------------------------
// Guards, beyond NsGuard, TestDirs and ScratchDir from the support library.

/// The calling thread moved into another network namespace; moved back on drop (before the
/// namespace's own guard unmounts it).
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

/// The micropod network in the host namespace; `network down --force` on drop unless it was
/// taken down already, so its BPF pins (bpffs is not per namespace) never outlive the run.
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
            eprintln!("warning: micropod network down --force: {e:#}");
        }
    }
}

/// The CNI bridge (made by the first ADD); deleted on drop if it is still there. Needs the
/// calling thread in the host namespace.
struct CniBridge {
    deleted: bool,
}

impl CniBridge {
    fn delete(mut self) -> anyhow::Result<()> {
        self.deleted = true;
        block_on(async {
            let nl = Netlink::connect()?;
            link::delete(&nl, CNI_BRIDGE).await?;
            anyhow::Ok(())
        })
        .with_context(|| format!("deleting the CNI bridge {CNI_BRIDGE}"))
    }
}

impl Drop for CniBridge {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        let gone = block_on(async {
            let nl = Netlink::connect()?;
            link::delete_if_exists(&nl, CNI_BRIDGE).await?;
            anyhow::Ok(())
        });
        if let Err(e) = gone {
            eprintln!("warning: cannot delete {CNI_BRIDGE}: {e:#}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The two sides.

/// Spawns `cmd` with `stdin` and waits for it: the timed section. Children get a process group
/// of their own (see above). Returns the wall time and the output; the exit status is checked
/// by the caller, outside the timed section.
fn timed(cmd: &mut Command, stdin: Option<&[u8]>) -> anyhow::Result<(Duration, Output)> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
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

/// The `micropod` CLI with the bench's own state and pin dirs.
struct Micropod {
    bin: PathBuf,
    /// `network down` removes micropod's pin dir, so micropod gets a subdirectory of the
    /// guard's, which the guard then removes.
    bpf_dir: PathBuf,
    dirs: TestDirs,
}

impl Micropod {
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
        let (_, output) = timed(&mut cmd, None)?;
        check_success(&format!("{cmd:?}"), &output)?;
        Ok(output)
    }

    fn status(&self) -> anyhow::Result<Value> {
        let out = self.run(["network", "status", "--json"])?;
        serde_json::from_slice(&out.stdout).context("parsing `micropod network status --json`")
    }

    /// Timed `micropod network attach NAME --kind netns --netns PATH --json`; checks the
    /// answer and returns the endpoint's address.
    fn attach(&self, name: &str, netns: &Path) -> anyhow::Result<(Duration, Ipv4Addr)> {
        let mut cmd = self.command(["network", "attach", name, "--kind", "netns", "--json"]);
        cmd.arg("--netns").arg(netns);
        let (took, out) = timed(&mut cmd, None)?;
        check_success(&format!("micropod network attach {name}"), &out)?;
        let att: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("parsing the attach answer for {name}"))?;
        let ip: Ipv4Addr = att["ip"]
            .as_str()
            .and_then(|ip| ip.parse().ok())
            .with_context(|| format!("attach {name}: no IPv4 address in {att}"))?;
        ensure!(
            att["name"] == name
                && att["kind"] == "netns"
                && att["ifname"] == IFNAME
                && att["netns"].as_str() == netns.to_str(),
            "attach {name}: unexpected answer {att}"
        );
        Ok((took, ip))
    }

    /// Timed `micropod network detach NAME`.
    fn detach(&self, name: &str) -> anyhow::Result<Duration> {
        let mut cmd = self.command(["network", "detach", name]);
        let (took, out) = timed(&mut cmd, None)?;
        check_success(&format!("micropod network detach {name}"), &out)?;
        Ok(took)
    }
}

/// The reference CNI `bridge` plugin with `host-local` IPAM.
struct Cni {
    config: Vec<u8>,
    data_dir: ScratchDir,
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
        }
    }

    fn command(&self, verb: &str, id: &str, netns: &Path) -> Command {
        let mut cmd = Command::new(Path::new(CNI_DIR).join("bridge"));
        cmd.env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", IFNAME)
            .env("CNI_PATH", CNI_DIR);
        cmd
    }

    /// Timed ADD; checks that stdout is a CNI result for the endpoint and returns its address.
    fn add(&self, id: &str, netns: &Path) -> anyhow::Result<(Duration, Ipv4Addr)> {
        let (took, out) = timed(&mut self.command("ADD", id, netns), Some(&self.config))?;
        check_success(&format!("CNI bridge ADD {id}"), &out)?;
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
        Ok((took, cidr.ip()))
    }

    /// Timed DEL.
    fn del(&self, id: &str, netns: &Path) -> anyhow::Result<Duration> {
        let (took, out) = timed(&mut self.command("DEL", id, netns), Some(&self.config))?;
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

/// One side's timings, per endpoint index.
struct Side {
    attach: Vec<Duration>,
    detach: Vec<Duration>,
}

struct SideStats {
    attach: Stats,
    detach: Stats,
    both: Stats,
}

impl Side {
    fn stats(&self) -> SideStats {
        let both: Vec<Duration> = self
            .attach
            .iter()
            .zip(&self.detach)
            .map(|(a, d)| *a + *d)
            .collect();
        SideStats {
            attach: stats(&self.attach),
            detach: stats(&self.detach),
            both: stats(&both),
        }
    }

    /// Does the n-th attach (with n-1 endpoints already there) cost more than the first?
    fn growth(&self, window: usize) -> Growth {
        let n = self.attach.len();
        let first = percentile(&ms_each(&self.attach[..window]), Percentile::P50);
        let last = percentile(&ms_each(&self.attach[n - window..]), Percentile::P50);
        let nth = n.min(MIN_COUNT);
        Growth {
            first_median: first,
            last_median: last,
            ratio: last / first,
            first: ms(self.attach[0]),
            nth,
            nth_ms: ms(self.attach[nth - 1]),
            last: ms(self.attach[n - 1]),
        }
    }
}

impl SideStats {
    fn json(&self) -> Value {
        json!({
            "attach": self.attach.json(),
            "detach": self.detach.json(),
            "attach_detach": self.both.json(),
        })
    }
}

struct Growth {
    first_median: f64,
    last_median: f64,
    ratio: f64,
    first: f64,
    /// 1-based index of the literal "200th" attach (the last one in a smaller run).
    nth: usize,
    nth_ms: f64,
    last: f64,
}

impl Growth {
    fn json(&self, window: usize, count: usize) -> Value {
        json!({
            "window": window,
            "first_window_median_ms": round_to(self.first_median, 3),
            "last_window_median_ms": round_to(self.last_median, 3),
            "ratio": round_to(self.ratio, 3),
            "attach_1_ms": round_to(self.first, 3),
            "nth": self.nth,
            "attach_nth_ms": round_to(self.nth_ms, 3),
            "last_index": count,
            "attach_last_ms": round_to(self.last, 3),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The run.

fn bench(args: &Args) -> anyhow::Result<()> {
    let count = args.count;
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

    // Guards, in the order they must go away reversed: the micropod network and the CNI bridge
    // first (from inside the host namespace), then back to our own namespace, then the
    // namespaces, then the directories.
    let dirs = TestDirs::new("bench");
    let mp = Micropod {
        bin,
        bpf_dir: dirs.pins.join("micropod"),
        dirs,
    };
    let cni = Cni::new(ScratchDir::new("bench-cni")?);
    eprintln!(
        "making 1 host namespace and {} endpoint namespaces (not timed)",
        2 * (count + 1)
    );
    let host = NsGuard::new("bench-host");
    // One namespace per endpoint and side, plus one per side for the warm-up.
    let mut mp_ns = Vec::with_capacity(count + 1);
    let mut cni_ns = Vec::with_capacity(count + 1);
    for _ in 0..=count {
        micropod_tests::interrupt::check()?;
        mp_ns.push(NsGuard::new("mp"));
        cni_ns.push(NsGuard::new("cni"));
    }
    micropod_tests::interrupt::check()?;
    // Every child from here on inherits the host namespace from this thread.
    let _entered = Entered::enter(&host)?;
    let cni_bridge = CniBridge { deleted: false };

    let up_started = Instant::now();
    let up_out = mp.run([
        "network",
        "up",
        "--bridge",
        MICROPOD_BRIDGE,
        "--subnet",
        MICROPOD_SUBNET,
        "--json",
    ])?;
    let network = MicropodNet { mp: &mp, up: true };
    let up_ms = ms(up_started.elapsed());
    let up: Value =
        serde_json::from_slice(&up_out.stdout).context("parsing `network up --json`")?;
    let datapath = up["network"]["datapath"].as_str().unwrap_or("?").to_owned();
    eprintln!(
        "micropod network up: bridge {MICROPOD_BRIDGE} {MICROPOD_SUBNET}, datapath {datapath}, {up_ms:.1} ms (once, not timed per attach)"
    );

    // Warm-up, not counted: both binaries in the page cache, and the CNI bridge made by its
    // first ADD (micropod made its bridge at `up`), so no timed attach pays for a bridge.
    let (warm_mp, warm_cni) = (&mp_ns[count], &cni_ns[count]);
    mp.attach("warm-up", warm_mp.path())?;
    mp.detach("warm-up")?;
    cni.add("mpbench-warm-up", warm_cni.path())?;
    cni.del("mpbench-warm-up", warm_cni.path())?;
    let floor = process_floor(&mp, &cni)?;
    micropod_tests::interrupt::check()?;

    // Interleaved per endpoint index, and which side goes first alternates with the index, so
    // drift in machine load (other jobs, frequency scaling, kernel work queues such as netns
    // cleanup) lands on both sides alike instead of on one phase.
    eprintln!("attaching {count} endpoints per side (interleaved)");
    let mut micropod = Side {
        attach: Vec::with_capacity(count),
        detach: Vec::with_capacity(count),
    };
    let mut reference = Side {
        attach: Vec::with_capacity(count),
        detach: Vec::with_capacity(count),
    };
    let mut mp_ips = HashSet::new();
    let mut cni_ips = HashSet::new();
    for i in 0..count {
        micropod_tests::interrupt::check()?;
        let name = format!("ep{i}");
        let id = format!("mpbench-{i}");
        let mut run_mp = || -> anyhow::Result<()> {
            let (took, ip) = mp.attach(&name, mp_ns[i].path())?;
            ensure!(mp_ips.insert(ip), "micropod gave {ip} twice (at {name})");
            micropod.attach.push(took);
            Ok(())
        };
        let mut run_cni = || -> anyhow::Result<()> {
            let (took, ip) = cni.add(&id, cni_ns[i].path())?;
            ensure!(cni_ips.insert(ip), "host-local gave {ip} twice (at {id})");
            reference.attach.push(took);
            Ok(())
        };
        in_turn(i, &mut run_mp, &mut run_cni)?;
        if (i + 1) % 50 == 0 {
            eprintln!("  {} attached", i + 1);
        }
    }

    // Correctness between the phases (not timed): distinct addresses in the subnet, and
    // micropod's own count agrees.
    let subnet: Ipv4Network = MICROPOD_SUBNET.parse()?;
    ensure!(mp_ips.len() == count, "micropod addresses are not distinct");
    ensure!(
        mp_ips.iter().all(|ip| subnet.contains(*ip)),
        "a micropod address is outside {MICROPOD_SUBNET}"
    );
    let status = mp.status()?;
    let used = status["network"]["ipam"]["used"].as_u64();
    let endpoints = status["network"]["endpoints"].as_array().map(Vec::len);
    ensure!(
        used == Some(u64::try_from(count)?) && endpoints == Some(count),
        "after {count} attaches micropod status shows {used:?} addresses used and {endpoints:?} endpoints"
    );
    ensure!(
        cni.held()?.len() == count,
        "host-local does not hold {count} addresses"
    );

    eprintln!("detaching them (interleaved)");
    for (i, ns) in cni_ns.iter().enumerate().take(count) {
        micropod_tests::interrupt::check()?;
        let name = format!("ep{i}");
        let id = format!("mpbench-{i}");
        let mut run_mp = || -> anyhow::Result<()> {
            micropod.detach.push(mp.detach(&name)?);
            Ok(())
        };
        let mut run_cni = || -> anyhow::Result<()> {
            reference.detach.push(cni.del(&id, ns.path())?);
            Ok(())
        };
        in_turn(i, &mut run_mp, &mut run_cni)?;
    }

    // Everything released, on both sides.
    let status = mp.status()?;
    let used = status["network"]["ipam"]["used"].as_u64();
    let endpoints = status["network"]["endpoints"].as_array().map(Vec::len);
    ensure!(
        used == Some(0) && endpoints == Some(0),
        "after detaching everything micropod status shows {used:?} addresses used and {endpoints:?} endpoints"
    );
    let held = cni.held()?;
    ensure!(held.is_empty(), "host-local still holds {held:?}");
    let leftovers: Vec<String> = block_on(async {
        let nl = Netlink::connect()?;
        let links = link::list(&nl).await?;
        anyhow::Ok(links.into_iter().map(|l| l.name).collect::<Vec<_>>())
    })?
    .into_iter()
    .filter(|n| n.starts_with("mpv-") || n.starts_with("veth"))
    .collect();
    ensure!(
        leftovers.is_empty(),
        "endpoint links left in the host namespace: {leftovers:?}"
    );
    network.down()?;
    cni_bridge.delete()?;
    let remaining = mp.status()?;
    ensure!(
        remaining["up"] == false,
        "micropod network still up after `down`: {remaining}"
    );

    report(
        args,
        &micropod,
        &reference,
        &floor,
        &datapath,
        &cni_version,
        started,
    );
    Ok(())
}

/// How long each binary takes to start and exit doing nothing: `micropod --version` and the
/// bridge plugin's VERSION command. Not part of the comparison; it shows how much of each
/// figure is process start-up. Returns the p50s (micropod, CNI).
/// Runs both sides for endpoint `i`, alternating which goes first, so drift in the machine's
/// load hits both alike.
fn in_turn(
    i: usize,
    micropod: &mut dyn FnMut() -> anyhow::Result<()>,
    cni: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if i.is_multiple_of(2) {
        micropod()?;
        cni()
    } else {
        cni()?;
        micropod()
    }
}

fn process_floor(mp: &Micropod, cni: &Cni) -> anyhow::Result<(f64, f64)> {
    let (mut mp_runs, mut cni_runs) = (Vec::new(), Vec::new());
    for _ in 0..FLOOR_RUNS {
        let (took, out) = timed(&mut mp.command(["--version"]), None)?;
        check_success("micropod --version", &out)?;
        mp_runs.push(took);
        let mut cmd = Command::new(Path::new(CNI_DIR).join("bridge"));
        cmd.env("CNI_COMMAND", "VERSION");
        let (took, out) = timed(&mut cmd, Some(&cni.config))?;
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

fn report(
    args: &Args,
    micropod: &Side,
    reference: &Side,
    floor: &(f64, f64),
    datapath: &str,
    cni_version: &str,
    started: Instant,
) {
    let count = args.count;
    let window = GROWTH_WINDOW.min(count.div_ceil(10)).max(1);
    let mp = micropod.stats();
    let cni = reference.stats();
    let attach_ratio = cni.attach.p50 / mp.attach.p50;
    let both_ratio = cni.both.p50 / mp.both.p50;
    let detach_ratio = cni.detach.p50 / mp.detach.p50;
    let mp_growth = micropod.growth(window);
    let cni_growth = reference.growth(window);
    let speed_met = attach_ratio >= SPEEDUP_GOAL;
    let growth_met = mp_growth.ratio <= GROWTH_GOAL;
    let literal_met = mp_growth.nth_ms <= GROWTH_GOAL * mp_growth.first;
    let wall = started.elapsed().as_secs_f64();

    if args.json {
        let out = json!({
            "count": count,
            "interleaved": true,
            "micropod": mp.json(),
            "cni": cni.json(),
            "ratio_cni_over_micropod": {
                "attach_p50": round_to(attach_ratio, 3),
                "detach_p50": round_to(detach_ratio, 3),
                "attach_detach_p50": round_to(both_ratio, 3),
            },
            "growth": {
                "micropod": mp_growth.json(window, count),
                "cni": cni_growth.json(window, count),
            },
            "goals": {
                "attach_speedup_min": SPEEDUP_GOAL,
                "attach_speedup_met": speed_met,
                "growth_max": GROWTH_GOAL,
                "growth_met": growth_met,
                "literal_nth_vs_first_met": literal_met,
            },
            "process_floor_p50_ms": {
                "micropod_version": round_to(floor.0, 3),
                "cni_bridge_version": round_to(floor.1, 3),
            },
            "micropod_datapath": datapath,
            "cni_plugins_version": cni_version,
            "wall_s": round_to(wall, 3),
        });
        println!("{out}");
        return;
    }

    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!();
    println!(
        "endpoint attach/detach, one whole process each: N = {count} endpoints per side, interleaved"
    );
    println!(
        "  micropod: network attach --kind netns / network detach (bridge {MICROPOD_BRIDGE}, {MICROPOD_SUBNET}, datapath {datapath})"
    );
    println!(
        "  CNI:      bridge plugin + host-local IPAM, ADD / DEL (containernetworking-plugins {cni_version}, bridge {CNI_BRIDGE}, {CNI_SUBNET})"
    );
    println!();
    println!(
        "{:<10} {:<14} {:>9} {:>9} {:>9}",
        "", "", "p50 ms", "p95 ms", "mean ms"
    );
    for (side, s) in [("micropod", &mp), ("CNI", &cni)] {
        for (what, st) in [
            ("attach", s.attach),
            ("detach", s.detach),
            ("attach+detach", s.both),
        ] {
            println!(
                "{side:<10} {what:<14} {:>9.2} {:>9.2} {:>9.2}",
                st.p50, st.p95, st.mean
            );
        }
    }
    println!();
    println!(
        "ratio CNI/micropod (p50): attach {attach_ratio:.1}x, detach {detach_ratio:.1}x, attach+detach {both_ratio:.1}x"
    );
    println!(
        "  goal: micropod >= {SPEEDUP_GOAL:.0}x faster per attach: {}",
        met(speed_met)
    );
    println!();
    for (side, g) in [("micropod", &mp_growth), ("CNI", &cni_growth)] {
        println!(
            "growth, {side} attach: median of first {window} {:.2} ms, of last {window} {:.2} ms, ratio {:.2}; attach #1 {:.2} ms, #{} {:.2} ms{}",
            g.first_median,
            g.last_median,
            g.ratio,
            g.first,
            g.nth,
            g.nth_ms,
            if g.nth == count {
                String::new()
            } else {
                format!(", #{count} {:.2} ms", g.last)
            }
        );
    }
    println!(
        "  goal: micropod's last attaches no slower than {GROWTH_GOAL}x its first (medians): {}; literal #{} vs #1: {}",
        met(growth_met),
        mp_growth.nth,
        met(literal_met)
    );
    println!();
    println!("notes:");
    println!(
        "  - each figure is the wall time from spawning the process to reaping it (micropod's --json answer, CNI's result on stdout, both parsed and checked afterwards)"
    );
    println!(
        "  - the CNI side runs with ipMasq false: with it the plugin would run iptables on every ADD/DEL; micropod installs its NAT once, at `network up` ({datapath}), not per attach"
    );
    println!(
        "  - process start-up floor (p50 of {FLOOR_RUNS}, not part of the figures above): `micropod --version` {:.2} ms, CNI bridge VERSION {:.2} ms",
        floor.0, floor.1
    );
    println!(
        "  - not timed: namespace creation, `network up`, one warm-up attach/detach per side (which also makes the CNI bridge)"
    );
    println!(
        "  - checked: {count} distinct addresses per side, every exit status and answer, 0 used after the detaches (micropod status, host-local files), no endpoint links left; then `micropod network down` and the CNI bridge deleted"
    );
    println!("  - percentiles are nearest-rank; wall time of the whole run {wall:.1} s");
}
