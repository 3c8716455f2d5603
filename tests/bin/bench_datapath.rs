//! The benchmark behind `cargo xtask bench datapath`: the same topology three ways, in one run
//! and in alternating order:
//! - `routed`: the bridge and forwarding, no NAT (the internet routes the subnet back);
//! - `masquerade`: the netfilter data path (nf_tables MASQUERADE, conntrack);
//! - `ebpf`: the eBPF data path (SNAT at the endpoint's port, reverse SNAT on the uplink).
//!
//! Each mode gets a lab of its own (a "host" namespace with micropod's bridge and an uplink to
//! an "internet" namespace running nginx and iperf3, and one endpoint namespace), built once
//! and measured in turn: single-stream TCP throughput (iperf3) and the short-connection rate
//! (wrk, a new TCP connection per request with `Connection: close`), and for each the CPU time
//! the machine spent (/proc/stat: user, system, interrupts; not idle, not stolen), giving
//! requests and bits per CPU-second: client, server and the whole packet path run here, so
//! that is the data path's cost. Rates on these shared VMs swing by ±30 % from one second to
//! the next; the per-CPU-second figures far less. Each round measures every mode back to back
//! and each ratio is the median over rounds of the per-round ratio (paired samples cancel slow
//! drift); the medians of the raw figures are printed too.
//!
//! Usage: `micropod-bench-datapath [--rounds N] [--seconds S] [--quick] [--json]` (as root).

use std::{
    fs::File,
    path::Path,
    process::{Child, Command, ExitCode, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use micropod_tests::{
    NsGuard,
    bench::{ScratchDir, median, round_to},
    netlab::{NetLab, SERVER_ADDR, UPLINK_ADDR, in_netns},
};
use nix::libc;
use serde_json::{Value, json};

/// Goals from the issue, as ratios of medians.
const CONN_RATE_GOAL: f64 = 1.15;
const THROUGHPUT_GOAL: f64 = 1.0;
/// wrk's connections and threads: enough to keep a core busy, few enough for 2 cores.
const WRK_CONNECTIONS: &str = "16";
const SUBNET_ROUTE: &str = "10.10.0.0/24";
/// What each round measures per mode: (JSON name, column label).
const METRICS: [(&str, &str); 4] = [
    ("conn_per_s", "conn/s"),
    ("conn_per_cpu_s", "conn/CPU-s"),
    ("gbit_per_s", "Gbit/s"),
    ("gbit_per_cpu_s", "Gbit/CPU-s"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Routed,
    Masquerade,
    Ebpf,
}

const MODES: [Mode; 3] = [Mode::Routed, Mode::Masquerade, Mode::Ebpf];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Routed => "routed",
            Self::Masquerade => "masquerade",
            Self::Ebpf => "ebpf",
        }
    }
}

/// Routed, MASQUERADE and eBPF SNAT side by side: single-stream TCP throughput (iperf3) and the
/// short-connection rate (wrk), with the CPU time each costs. In namespaces of its own; run as
/// root (cargo xtask bench datapath builds and runs it).
#[derive(Parser)]
#[command(name = "micropod-bench-datapath", verbatim_doc_comment)]
struct Cli {
    /// Measurement rounds; each round measures every mode once, in rotating order (default 7)
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
    /// Duration of each iperf3 and wrk run, 1..=30 (default 2)
    #[arg(long, value_name = "S")]
    seconds: Option<u32>,
    /// One round of one second, unless --rounds or --seconds say otherwise: a smoke run
    #[arg(long)]
    quick: bool,
    /// Machine-readable output on stdout
    #[arg(long)]
    json: bool,
}

struct Args {
    rounds: usize,
    seconds: u32,
    json: bool,
}

fn resolve(cli: Cli) -> anyhow::Result<Args> {
    let (rounds, seconds) = if cli.quick { (1, 1) } else { (7, 2) };
    let args = Args {
        rounds: cli.rounds.unwrap_or(rounds),
        seconds: cli.seconds.unwrap_or(seconds),
        json: cli.json,
    };
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(
        (1..=30).contains(&args.seconds),
        "--seconds must be 1..=30 (the load is bounded)"
    );
    Ok(args)
}

fn main() -> ExitCode {
    micropod_tests::interrupt::main("micropod-bench-datapath", resolve, bench)
}

/// One mode's lab and servers; everything is stopped and removed on drop.
struct ModeLab {
    mode: Mode,
    lab: NetLab,
    _endpoint: NsGuard,
    endpoint_file: File,
    servers: Vec<Child>,
    scratch: ScratchDir,
}

impl Drop for ModeLab {
    fn drop(&mut self) {
        for child in &mut self.servers {
            // Our own children, by PID.
            let _ = child.kill();
            let _ = child.wait();
        }
        let out = self.lab.run(["network", "down", "--force"]);
        if !out.status.success() {
            eprintln!(
                "warning: network down in the {} lab: {}",
                self.mode.name(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl ModeLab {
    fn new(mode: Mode) -> anyhow::Result<Self> {
        let lab = NetLab::new(&format!("bd-{}", mode.name()));
        let datapath = if mode == Mode::Ebpf {
            "ebpf"
        } else {
            "netfilter"
        };
        let up = lab.run(["network", "up", "--datapath", datapath]);
        ensure!(
            up.status.success(),
            "network up ({}): {}",
            mode.name(),
            String::from_utf8_lossy(&up.stderr)
        );
        if mode == Mode::Routed {
            // No NAT: drop micropod's MASQUERADE table and let the internet route back.
            let table = micropod::network::nft_table_name(micropod::network::DEFAULT_BRIDGE);
            lab.host
                .run(|| micropod::net::nftables::delete(&table))
                .context("deleting the MASQUERADE table")?;
            let internet = lab.internet.path().to_path_buf();
            run_quiet(
                Command::new("nsenter")
                    .arg(format!("--net={}", internet.display()))
                    .args(["ip", "route", "add", SUBNET_ROUTE, "via"])
                    .arg(UPLINK_ADDR.to_string()),
            )?;
        }
        let endpoint = NsGuard::new(&format!("bd-{}-ep", mode.name()));
        let att = lab.run([
            std::ffi::OsStr::new("network"),
            "attach".as_ref(),
            "ep".as_ref(),
            "--kind".as_ref(),
            "netns".as_ref(),
            "--netns".as_ref(),
            endpoint.path().as_os_str(),
        ]);
        ensure!(
            att.status.success(),
            "attach: {}",
            String::from_utf8_lossy(&att.stderr)
        );
        let endpoint_file = File::open(endpoint.path())?;
        let scratch = ScratchDir::new(&format!("bench-datapath-{}", mode.name()))?;
        let mut me = Self {
            mode,
            lab,
            _endpoint: endpoint,
            endpoint_file,
            servers: Vec::new(),
            scratch,
        };
        me.start_servers()?;
        Ok(me)
    }

    fn start_servers(&mut self) -> anyhow::Result<()> {
        let dir = self.scratch.path().to_path_buf();
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(&dir))?;
        let internet = File::open(self.lab.internet.path())?;
        let mut nginx = Command::new("nginx");
        nginx
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        in_netns(&mut nginx, &internet);
        self.servers.push(
            nginx
                .spawn()
                .context("starting nginx (scripts/setup.sh installs nginx-light)")?,
        );
        let mut iperf = Command::new("iperf3");
        iperf
            .args(["-s", "-B"])
            .arg(SERVER_ADDR.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        in_netns(&mut iperf, &internet);
        self.servers.push(
            iperf
                .spawn()
                .context("starting iperf3 (scripts/setup.sh installs it)")?,
        );
        // Both listen within moments; wait until a request goes through.
        for _ in 0..50 {
            if self.wrk_once().is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("nginx in the {} lab does not answer", self.mode.name())
    }

    fn in_endpoint(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.stdin(Stdio::null());
        in_netns(&mut cmd, &self.endpoint_file);
        cmd
    }

    fn wrk_once(&self) -> anyhow::Result<()> {
        let out = self
            .in_endpoint("curl")
            .args(["-s", "-o", "/dev/null", "--max-time", "1", "-f"])
            .arg(format!("http://{SERVER_ADDR}/"))
            .output()?;
        ensure!(out.status.success(), "curl failed");
        Ok(())
    }

    /// Requests per second with a new connection each, and requests per CPU-second.
    fn connection_rate(&self, seconds: u32) -> anyhow::Result<(f64, f64)> {
        let busy = CpuBusy::start()?;
        let out = self
            .in_endpoint("wrk")
            .args(["-t1", "-c", WRK_CONNECTIONS, "--timeout", "2s"])
            .arg(format!("-d{seconds}s"))
            .args(["-H", "Connection: close"])
            .arg(format!("http://{SERVER_ADDR}/"))
            .output()
            .context("running wrk (scripts/setup.sh installs it)")?;
        let cpu_s = busy.seconds()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success(), "wrk failed: {text}");
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        {
            eprintln!("  note ({}): wrk {}", self.mode.name(), line.trim());
        }
        let requests: f64 = text
            .lines()
            .find_map(|l| l.split_once("requests in").map(|(n, _)| n.trim()))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no request count in wrk's output:\n{text}"))?;
        let per_s: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
        Ok((per_s, requests / cpu_s))
    }

    /// Single-stream TCP throughput, endpoint → internet: Gbit/s and Gbit per CPU-second.
    fn throughput(&self, seconds: u32) -> anyhow::Result<(f64, f64)> {
        let busy = CpuBusy::start()?;
        let out = self
            .in_endpoint("iperf3")
            .args(["-J", "-c"])
            .arg(SERVER_ADDR.to_string())
            .arg("-t")
            .arg(seconds.to_string())
            .output()
            .context("running iperf3")?;
        let cpu_s = busy.seconds()?;
        let v: Value = serde_json::from_slice(&out.stdout).context("iperf3's JSON")?;
        ensure!(out.status.success(), "iperf3 failed: {}", v["error"]);
        let received = &v["end"]["sum_received"];
        let bps = received["bits_per_second"]
            .as_f64()
            .context("no sum_received in iperf3's output")?;
        let bytes = received["bytes"]
            .as_f64()
            .context("no bytes in iperf3's output")?;
        Ok((bps / 1e9, bytes * 8.0 / 1e9 / cpu_s))
    }
}

/// CPU time the whole machine spent working (user, system, interrupts; not idle, not stolen by
/// the hypervisor) over a measurement, from /proc/stat. Client, server and every packet's path
/// run on this machine, so work per request or per byte is the data path's cost — a figure
/// the hypervisor's noisy neighbours move far less than the rates.
struct CpuBusy(u64);

impl CpuBusy {
    fn now() -> anyhow::Result<u64> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .context("no cpu line in /proc/stat")?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        // user nice system idle iowait irq softirq steal …
        ensure!(fields.len() >= 8, "short cpu line in /proc/stat");
        Ok(fields[0] + fields[1] + fields[2] + fields[5] + fields[6])
    }

    fn start() -> anyhow::Result<Self> {
        Ok(Self(Self::now()?))
    }

    fn seconds(&self) -> anyhow::Result<f64> {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        ensure!(hz > 0, "no clock tick rate");
        let busy = (Self::now()? - self.0) as f64 / hz as f64;
        ensure!(busy > 0.0, "no CPU time measured");
        Ok(busy)
    }
}

fn nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           server {{ listen {SERVER_ADDR}:80; location / {{ return 200 \"micropod bench\\n\"; }} }}\n}}\n"
    )
}

fn run_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn bench(args: &Args) -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "run as root (it makes network namespaces)"
    );
    eprintln!("setting up three labs (routed, masquerade, ebpf)…");
    let labs = MODES
        .iter()
        .map(|m| ModeLab::new(*m))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // samples[metric][mode]
    let mut samples: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); MODES.len()]; METRICS.len()];
    for round in 0..args.rounds {
        // Rotate the order each round, so no mode always runs first (or last).
        let order: Vec<usize> = (0..MODES.len())
            .map(|i| (i + round) % MODES.len())
            .collect();
        for &i in &order {
            micropod_tests::interrupt::check()?;
            let lab = &labs[i];
            let (rate, rate_cpu) = lab.connection_rate(args.seconds)?;
            let (gbps, gbps_cpu) = lab.throughput(args.seconds)?;
            eprintln!(
                "round {}/{}  {:<10}  {:>7.0} conn/s ({:>6.0} per CPU-s)  {:>6.2} Gbit/s ({:>5.2} per CPU-s)",
                round + 1,
                args.rounds,
                MODES[i].name(),
                rate,
                rate_cpu,
                gbps,
                gbps_cpu
            );
            for (m, v) in [rate, rate_cpu, gbps, gbps_cpu].into_iter().enumerate() {
                samples[m][i].push(v);
            }
        }
    }
    if let Some(ebpf) = labs.iter().find(|l| l.mode == Mode::Ebpf) {
        let stats = ebpf.lab.run(["stats", "--json"]);
        if let Ok(v) = serde_json::from_slice::<Value>(&stats.stdout) {
            eprintln!("ebpf lab NAT table after the run: {}", v["nat"]);
        }
    }
    drop(labs);

    let idx = |m: Mode| MODES.iter().position(|x| *x == m).expect("a mode");
    let med = |metric: usize, m: Mode| median(&samples[metric][idx(m)]);
    // The median of the per-round ratios: each round measured every mode back to back.
    let ratio = |metric: usize, a: Mode, b: Mode| {
        let per_round: Vec<f64> = samples[metric][idx(a)]
            .iter()
            .zip(&samples[metric][idx(b)])
            .map(|(x, y)| x / y)
            .collect();
        median(&per_round)
    };
    let by_mode = |metric: usize| {
        MODES
            .iter()
            .map(|m| (m.name().to_owned(), json!(round_to(med(metric, *m), 3))))
            .collect::<serde_json::Map<_, _>>()
    };
    let mut medians = serde_json::Map::new();
    let mut ratios = serde_json::Map::new();
    let mut raw = serde_json::Map::new();
    for (metric, (name, _)) in METRICS.iter().enumerate() {
        medians.insert((*name).to_owned(), json!(by_mode(metric)));
        raw.insert(
            (*name).to_owned(),
            json!(
                MODES
                    .iter()
                    .zip(&samples[metric])
                    .map(|(m, v)| (m.name().to_owned(), json!(v)))
                    .collect::<serde_json::Map<_, _>>()
            ),
        );
        for other in [Mode::Masquerade, Mode::Routed] {
            ratios.insert(
                format!("{name}_ebpf_vs_{}", other.name()),
                json!(round_to(ratio(metric, Mode::Ebpf, other), 3)),
            );
        }
    }
    let report = json!({
        "rounds": args.rounds,
        "seconds": args.seconds,
        "wrk_connections": WRK_CONNECTIONS,
        "medians": medians,
        "ratios": ratios,
        "samples": raw,
        "goals": {
            "conn_per_s_ebpf_vs_masquerade": CONN_RATE_GOAL,
            "gbit_per_s_ebpf_vs_masquerade": THROUGHPUT_GOAL,
            "ebpf_vs_routed": 1.0,
        },
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "data path benchmark: {} round(s) of {} s per measurement, modes in rotating order",
        args.rounds, args.seconds
    );
    print!("{:<12}", "mode (p50)");
    for (_, label) in METRICS {
        print!(" {label:>18}");
    }
    println!();
    for m in MODES {
        print!("{:<12}", m.name());
        for metric in 0..METRICS.len() {
            print!(" {:>18.2}", med(metric, m));
        }
        println!();
    }
    println!("ratios, the median of the per-round ratios:");
    for other in [Mode::Masquerade, Mode::Routed] {
        print!("  ebpf / {:<10}", other.name());
        for (metric, (_, label)) in METRICS.iter().enumerate() {
            print!("  {label} {:.2}x", ratio(metric, Mode::Ebpf, other));
        }
        println!();
    }
    let verdict = |x: f64, goal: f64| if x >= goal { "met" } else { "NOT met" };
    let r = ratio(0, Mode::Ebpf, Mode::Masquerade);
    let t = ratio(2, Mode::Ebpf, Mode::Masquerade);
    let floor = [0, 2].map(|m| ratio(m, Mode::Ebpf, Mode::Routed));
    println!(
        "goals: connection rate ≥ {CONN_RATE_GOAL}x MASQUERADE: {}; throughput ≥ {THROUGHPUT_GOAL}x MASQUERADE: {}; not below routed: {}",
        verdict(r, CONN_RATE_GOAL),
        verdict(t, THROUGHPUT_GOAL),
        verdict(floor[0].min(floor[1]), 1.0)
    );
    Ok(())
}
