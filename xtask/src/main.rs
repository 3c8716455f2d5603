//! `cargo xtask setup | test | demo | run | bench attach|datapath|metrics|soak | guest`: the
//! project's tasks.
//!
//! `setup` installs toolchains, bpf-linker and Debian packages (scripts/setup.sh, which `./dev`
//! also runs before anything else, since cargo itself may not exist yet).

use std::{
    borrow::BorrowMut,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};

mod guest;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install toolchains, bpf-linker and Debian packages (idempotent).
    Setup,
    /// Format check, clippy (host and bpf), unit tests, privileged integration tests.
    Test {
        /// Extra arguments for the integration test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        filter: Vec<String>,
    },
    /// Build micropod and run the demo in a lab of network namespaces.
    Demo,
    /// Release build, then a benchmark in network namespaces of its own (as root).
    Bench {
        what: BenchWhat,
        /// Arguments for the benchmark binary (`--help` lists them; `--quick`, `--json` for each).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the eBPF object and the CLI, then run `micropod ARGS` as root (via sudo when not
    /// root): the development loop, as in aya's project template.
    Run {
        /// Arguments for micropod (`cargo xtask run -- network status`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the test guest (Debian kernel + busybox initramfs) into target/guest/, cached.
    Guest,
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchWhat {
    /// One endpoint attach+detach, eBPF and netfilter, TAP and netns, against the CNI bridge
    /// plugin with host-local, and bursts of 64 at once (`--count 500`: the 1000th attach).
    Attach,
    /// Connection rate and throughput through the NAT: routed, MASQUERADE and eBPF SNAT.
    Datapath,
    /// `metrics serve` scraped over HTTP with 1000 endpoints in the maps, and its memory.
    Metrics,
    /// 1000 attach/detach and 50 VM run/stop cycles with traffic, then every count (fds,
    /// exporter memory, map and NAT entries, nft rules, links, pins) back to its start.
    Soak,
}

fn main() -> anyhow::Result<()> {
    let root = project_root();
    std::env::set_current_dir(&root)?;
    match Cli::parse().task {
        Task::Setup => run(Command::new("bash").arg(root.join("scripts/setup.sh"))),
        Task::Test { filter } => test(&root, &filter),
        Task::Demo => demo(&root),
        Task::Bench { what, args } => bench(&root, what, &args),
        Task::Run { args } => run_micropod(&root, &args),
        Task::Guest => guest::build(&root).map(drop),
    }
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The channel pinned in a rust-toolchain.toml.
fn pinned_channel(file: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("channel")?.trim().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_owned())
        })
        .with_context(|| format!("no channel in {}", file.display()))
}

fn step(name: &str) {
    eprintln!("\n==> {name}");
}

fn run(mut cmd: impl BorrowMut<Command>) -> anyhow::Result<()> {
    let cmd = cmd.borrow_mut();
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("cargo");
    cmd.args(args);
    cmd
}

/// `cargo xtask run -- ARGS`: the debug build (micropod's build script builds the eBPF
/// object), then `micropod ARGS` as root; its exit status is ours.
fn run_micropod(root: &Path, args: &[String]) -> anyhow::Result<()> {
    step("building micropod (and its eBPF object)");
    let bin = build_micropod(root, false)?;
    let mut cmd = if is_root() {
        Command::new(&bin)
    } else {
        let mut sudo = Command::new("sudo");
        // Keep where the state and pins are, if the caller chose.
        sudo.args(["--preserve-env=MICROPOD_STATE_DIR,MICROPOD_BPF_DIR,MICROPOD_LOG"])
            .arg(&bin);
        sudo
    };
    cmd.args(args);
    let status = cmd
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// Cargo's target dir: `CARGO_TARGET_DIR` if set (relative to the workspace, as cargo takes
/// it), else `target/`.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |d| root.join(d))
}

/// The target micropod ships for: static musl, so a command starts without the dynamic
/// loader and glibc's start-up (about half of a short command's time on these machines).
const SHIPPED_TARGET: &str = "x86_64-unknown-linux-musl";

/// Builds the `micropod` binary as it ships (debug or release) and returns its path; tests,
/// the demo and the benchmarks run it through `MICROPOD_BIN`.
fn build_micropod(root: &Path, release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo([
        "build",
        "-p",
        "micropod",
        "--bins",
        "--target",
        SHIPPED_TARGET,
    ]);
    if release {
        cmd.arg("--release");
    }
    run(cmd)?;
    let profile = if release { "release" } else { "debug" };
    Ok(target_dir(root)
        .join(SHIPPED_TARGET)
        .join(profile)
        .join("micropod"))
}

/// One of micropod-tests' programs (`profile` is `debug` or `release`), told which micropod
/// binary to run.
fn test_program(root: &Path, profile: &str, name: &str, micropod: &Path) -> Command {
    let mut cmd = Command::new(target_dir(root).join(profile).join(name));
    cmd.env("MICROPOD_BIN", micropod);
    cmd
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn test(root: &Path, filter: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    step("cargo fmt --check");
    run(cargo(["fmt", "--all", "--check"]))?;

    step("clippy: host crates");
    run(cargo([
        "clippy",
        "--workspace",
        "--exclude",
        "micropod-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;

    step("clippy: micropod for the shipped target (static musl)");
    run(cargo([
        "clippy",
        "-p",
        "micropod",
        "--bins",
        "--target",
        SHIPPED_TARGET,
        "--",
        "-D",
        "warnings",
    ]))?;

    step("clippy: eBPF crate on bpfel-unknown-none");
    let nightly = pinned_channel(&root.join("micropod-ebpf/rust-toolchain.toml"))?;
    run(Command::new("rustup")
        .args([
            "run",
            &nightly,
            "cargo",
            "clippy",
            "--package",
            "micropod-ebpf",
            "--release",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--target-dir", "target/bpf-clippy", "--", "-D", "warnings"])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        )
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC"))?;

    step("unit tests, unprivileged and without the eBPF object (AYA_BUILD_SKIP=1)");
    // A target dir of their own, so the skip build and the real build do not evict each other.
    run(cargo(["test", "--target-dir", "target/skip-ebpf"]).env("AYA_BUILD_SKIP", "1"))?;

    step("Grafana dashboard and docs/metrics.md: every query names a served series");
    run(Command::new("python3").arg("scripts/check-dashboard.py"))?;

    step("privileged integration tests (tests/), each in namespaces it creates");
    if !is_root() {
        bail!("the integration tests create network namespaces and load eBPF: run as root");
    }
    // The tests run the binary as it ships (static musl); the test programs link the library.
    let bin = build_micropod(root, false)?;
    // The VM tests boot it (cached: well under a second when nothing changed).
    guest::build(root)?;
    run(cargo(["test", "--package", "micropod-tests", "--"])
        .args(filter)
        .env("MICROPOD_BIN", &bin))?;

    if filter.is_empty() {
        // Keeps the benchmark working; its figures come from `cargo xtask bench attach`.
        step(
            "benchmark smoke run (debug build, 10 endpoints per side, bursts of 8; figures not meaningful)",
        );
        run(test_program(root, "debug", "micropod-bench", &bin).arg("--quick"))?;
        step(
            "data path benchmark smoke run (debug build, one second per mode; figures not meaningful)",
        );
        run(test_program(root, "debug", "micropod-bench-datapath", &bin).arg("--quick"))?;
        step(
            "metrics benchmark smoke run (debug build, 50 endpoints, 10 scrapes; figures not meaningful)",
        );
        run(test_program(root, "debug", "micropod-bench-metrics", &bin).arg("--quick"))?;
        // A leak check, not a benchmark: it fails if anything is not back to its start.
        step("soak smoke run (debug build, 50 attach/detach cycles, 2 VMs; about 25 s)");
        run(test_program(root, "debug", "micropod-bench-soak", &bin).arg("--quick"))?;
    }

    eprintln!("\nall checks passed in {:.0?}", started.elapsed());
    Ok(())
}

fn demo(root: &Path) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo creates network namespaces and loads eBPF: run it as root");
    }
    step("the test guest (cached after the first build)");
    guest::build(root)?;
    step("building micropod and the demo");
    let bin = build_micropod(root, false)?;
    run(cargo(["build", "--package", "micropod-tests", "--bins"]))?;
    step("running the demo");
    run(test_program(root, "debug", "micropod-demo", &bin))
}

fn bench(root: &Path, what: BenchWhat, args: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmark creates network namespaces and bridges in them: run it as root");
    }
    if matches!(what, BenchWhat::Soak) {
        step("the test guest for the VM cycles (cached after the first build)");
        guest::build(root)?;
    }
    step("building micropod and the benchmark (release)");
    let bin = build_micropod(root, true)?;
    run(cargo([
        "build",
        "--release",
        "-p",
        "micropod-tests",
        "--bins",
    ]))?;
    match what {
        BenchWhat::Attach => {
            step(
                "benchmark: endpoint attach/detach, micropod (eBPF, netfilter) against the CNI bridge plugin",
            );
            run(test_program(root, "release", "micropod-bench", &bin).args(args))
        }
        BenchWhat::Datapath => {
            step("benchmark: routed, MASQUERADE and eBPF SNAT side by side (wrk, iperf3)");
            run(test_program(root, "release", "micropod-bench-datapath", &bin).args(args))
        }
        BenchWhat::Metrics => {
            step("benchmark: the metrics exporter scraped with 1000 endpoints in the maps");
            run(test_program(root, "release", "micropod-bench-metrics", &bin).args(args))
        }
        BenchWhat::Soak => {
            step(
                "soak: attach/detach and VM run/stop cycles with traffic, then every count back to its start",
            );
            run(test_program(root, "release", "micropod-bench-soak", &bin).args(args))
        }
    }
}
