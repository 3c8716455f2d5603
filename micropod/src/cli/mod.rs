//! Argument parsing and output. Every command's work is in the library.

mod cni;
mod count_sources;
mod metrics;
mod network;
mod vm;
mod watch;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "micropod", version, about = "MicroVMs with real networking")]
struct Cli {
    /// Log level filter (error, warn, info, debug, trace), as in RUST_LOG.
    #[arg(long, global = true, env = "MICROPOD_LOG", default_value = "info")]
    log: String,
    /// Where micropod keeps its records and lock.
    #[arg(long, global = true, env = "MICROPOD_STATE_DIR", default_value = micropod::network::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Where micropod pins BPF objects (on a bpffs mount).
    #[arg(long, global = true, env = "MICROPOD_BPF_DIR", default_value = micropod::network::DEFAULT_BPF_DIR)]
    bpf_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Count packets and bytes per IPv4 source on one interface with the eBPF counter.
    CountSources(count_sources::Args),
    /// The bridge network and its endpoints.
    #[command(subcommand)]
    Network(network::Command),
    /// Per-endpoint counters (rx/tx packets and bytes, drops by reason) and the NAT table;
    /// with --watch, their rates per second.
    Stats {
        /// Only this endpoint.
        endpoint: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        watch: watch::Args,
    },
    /// Prometheus metrics: `serve` an exporter, or `print` one scrape.
    #[command(subcommand)]
    Metrics(metrics::Command),
    #[command(flatten)]
    Vm(vm::Command),
    /// micropod as a CNI plugin for container runtimes (run as one when CNI_COMMAND is set).
    #[command(subcommand)]
    Cni(cni::Command),
    /// Release endpoints whose owner is gone (also done before every change).
    Gc {
        #[arg(long)]
        json: bool,
    },
}

/// `micropod gc`: the VM reconcile, then the network sweep. The sweep runs even when the
/// reconcile failed (it releases what it can on its own), and both failures are reported.
fn gc(network: &micropod::network::Network, json: bool) -> anyhow::Result<()> {
    let vms = vm::gc(&micropod::vm::Vms::new(network.clone()));
    let sweep = network::gc(network, json);
    match (vms, sweep) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(vms), Err(sweep)) => Err(anyhow::anyhow!(
            "gc left 2 problems; run it again once fixed:\n  - VM reconcile: {vms:#}\n  - network sweep: {sweep:#}"
        )),
    }
}

/// The width of a table's name column: its longest name (a container's is 25 characters), at
/// least `min`.
fn name_width<'a>(names: impl Iterator<Item = &'a str>, min: usize) -> usize {
    names.map(str::len).max().unwrap_or(0).max(min)
}

pub(crate) fn main() -> ExitCode {
    if cni::is_plugin_invocation() {
        return cni::plugin();
    }
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Metrics(metrics::Command::Serve { .. })
    ) {
        micropod::runtime::die_on_sigpipe();
    }
    env_logger::Builder::new()
        .parse_filters(&cli.log)
        .format_target(false)
        .init();
    // Retired links are deleted by a `network reap` of this binary, off the detach's path.
    let exe = std::env::current_exe().ok();
    let net = |state: &PathBuf, bpf: &PathBuf| {
        let network = micropod::network::Network::new(state, bpf);
        match &exe {
            Some(exe) => network.reap_in_background(exe),
            None => network,
        }
    };
    let vms = micropod::vm::Vms::new;
    let result = match cli.command {
        Command::CountSources(args) => count_sources::run(args),
        Command::Network(command) => network::run(&net(&cli.state_dir, &cli.bpf_dir), command),
        Command::Stats {
            endpoint,
            json,
            watch,
        } if watch.watch => watch::run(
            &net(&cli.state_dir, &cli.bpf_dir),
            endpoint.as_deref(),
            json,
            &watch,
        ),
        Command::Stats { endpoint, json, .. } => network::stats(
            &net(&cli.state_dir, &cli.bpf_dir),
            endpoint.as_deref(),
            json,
        ),
        Command::Metrics(command) => metrics::run(
            micropod::metrics::Exporter::new(vms(net(&cli.state_dir, &cli.bpf_dir))),
            command,
        ),
        Command::Vm(command) => vm::run(&vms(net(&cli.state_dir, &cli.bpf_dir)), command),
        Command::Gc { json } => gc(&net(&cli.state_dir, &cli.bpf_dir), json),
        Command::Cni(command) => cni::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("micropod: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
