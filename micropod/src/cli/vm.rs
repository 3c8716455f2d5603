//! `micropod run | ps | stop | rm | logs | inspect` and the hidden `vm-supervise`: printing
//! around [`micropod::vm::Vms`].

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use micropod::{
    vm::{DEFAULT_CPUS, DEFAULT_MEMORY_MIB, RunRequest, StopOutcome, VmRecord, VmState, Vms},
    vmm::{Boot, VmmKind},
};
use serde::Serialize;

#[derive(Debug, clap::Subcommand)]
pub(super) enum Command {
    /// Boot a MicroVM on the bridge network; returns once the VMM runs.
    Run(RunArgs),
    /// List VMs (running and starting ones; --all adds exited ones).
    Ps {
        #[arg(long, short)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Ask a VM to power off; kill its VMM if it has not after --timeout seconds.
    Stop {
        name: String,
        /// Seconds to wait for the guest to power off before the VMM is killed (0: at once).
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Remove an exited VM (its record and logs).
    Rm {
        name: String,
        /// Kill the VM first if it runs.
        #[arg(long, short)]
        force: bool,
    },
    /// Print a VM's serial console.
    Logs {
        name: String,
        /// Keep printing until the VM exits (or Ctrl-C).
        #[arg(long, short)]
        follow: bool,
    },
    /// A VM's record as JSON: spec, processes, state, network.
    Inspect { name: String },
    /// Internal: the per-VM supervisor `micropod run` starts.
    #[command(name = micropod::vm::SUPERVISE_COMMAND, hide = true)]
    VmSupervise { name: String },
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("root").required(true).args(["initrd", "rootfs"])))]
pub(super) struct RunArgs {
    /// The guest kernel (bzImage or vmlinuz).
    #[arg(long)]
    kernel: PathBuf,
    /// An initramfs to run from.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// A raw disk image to use as the root file system (/dev/vda, read-write).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "qemu")]
    vmm: VmmKind,
    /// The VM's name (default: vm-<id>).
    #[arg(long)]
    name: Option<String>,
    /// A specific address instead of the next free one.
    #[arg(long)]
    ip: Option<Ipv4Addr>,
    #[arg(long, default_value_t = DEFAULT_CPUS)]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB)]
    memory: u32,
    /// Extra kernel command-line arguments, after the ones micropod sets.
    #[arg(long)]
    cmdline: Option<String>,
    #[arg(long)]
    json: bool,
}

/// A VM in one line: what `run --json` and `ps --json` print.
#[derive(Serialize)]
struct Summary<'a> {
    name: &'a str,
    id: &'a str,
    state: VmState,
    vmm: VmmKind,
    ip: Ipv4Addr,
    cidr: &'a str,
    gateway: Ipv4Addr,
    mac: String,
    tap: &'a str,
    bridge: &'a str,
    pid: Option<u32>,
    supervisor_pid: Option<u32>,
    cpus: u8,
    memory_mib: u32,
    created_at: u64,
    /// When `network detach --force` took the VM's endpoint while it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    network_detached_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit: Option<&'a micropod::vm::VmExit>,
    console_log: &'a std::path::Path,
}

impl<'a> Summary<'a> {
    fn of(r: &'a VmRecord) -> Self {
        Self {
            name: &r.name,
            id: &r.id,
            state: r.state,
            vmm: r.vmm,
            ip: r.network.ip,
            cidr: &r.network.cidr,
            gateway: r.network.gateway,
            mac: r.network.mac.to_string(),
            tap: &r.network.tap,
            bridge: &r.network.bridge,
            pid: r.vmm_process.map(|p| p.pid),
            supervisor_pid: r.supervisor.map(|p| p.pid),
            cpus: r.spec.cpus,
            memory_mib: r.spec.memory_mib,
            created_at: r.created_at,
            network_detached_at: r.network.detached_at,
            exit: r.exit.as_ref(),
            console_log: &r.spec.console_log,
        }
    }
}

pub(super) fn run(vms: &Vms, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => {
            let boot = match (args.initrd, args.rootfs) {
                (Some(initrd), None) => Boot::Initrd(initrd),
                (None, Some(rootfs)) => Boot::Rootfs(rootfs),
                // The argument group admits exactly one.
                _ => anyhow::bail!("give exactly one of --initrd and --rootfs"),
            };
            let req = RunRequest {
                name: args.name,
                kernel: args.kernel,
                boot,
                vmm: args.vmm,
                ip: args.ip,
                cpus: args.cpus,
                memory_mib: args.memory,
                cmdline: args.cmdline,
            };
            let rec = vms.run(&req)?;
            if args.json {
                println!("{}", serde_json::to_string(&Summary::of(&rec))?);
            } else {
                println!("started {} (id {})", rec.name, rec.id);
                println!(
                    "  address  {} (gateway {})",
                    rec.network.cidr, rec.network.gateway
                );
                println!("  tap      {} on {}", rec.network.tap, rec.network.bridge);
                println!("  mac      {}", rec.network.mac);
                println!(
                    "  vmm      {}, pid {}",
                    micropod::vm::vmm_name(rec.vmm),
                    rec.vmm_process
                        .map_or_else(|| "-".into(), |p| p.pid.to_string())
                );
                println!("  console  micropod logs -f {}", rec.name);
            }
        }
        Command::Ps { all, json } => {
            let recs = vms.list(all)?;
            if json {
                let summaries: Vec<_> = recs.iter().map(Summary::of).collect();
                println!("{}", serde_json::to_string(&summaries)?);
            } else {
                print_table(&recs);
            }
        }
        Command::Stop { name, timeout } => match vms.stop(&name, Duration::from_secs(timeout))? {
            StopOutcome::Graceful => println!("stopped {name}"),
            StopOutcome::Killed => println!("stopped {name} (VMM killed)"),
            StopOutcome::AlreadyExited => println!("{name} is not running"),
        },
        Command::Rm { name, force } => {
            vms.remove(&name, force)?;
            println!("removed {name}");
        }
        Command::Logs { name, follow } => {
            vms.logs(&name, follow, &mut std::io::stdout().lock())?;
        }
        Command::Inspect { name } => {
            let rec = vms.get(&name)?;
            let mut value = serde_json::to_value(&rec)?;
            value["supervisor_alive"] = rec.supervisor.is_some_and(|p| p.is_alive()).into();
            value["vmm_alive"] = rec.vmm_alive().into();
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        Command::VmSupervise { name } => vms.supervise(&name)?,
    }
    Ok(())
}

/// `micropod gc`'s VM part: records the end of VMs whose supervisor and VMM are gone and
/// releases their endpoints (logged; the network gc that follows prints its own report).
pub(super) fn gc(vms: &Vms) -> anyhow::Result<()> {
    for r in vms.reconcile()? {
        log::info!("VM {} ({}): {}", r.name, r.ip, r.reason);
    }
    Ok(())
}

fn print_table(recs: &[VmRecord]) {
    println!(
        "{:<20} {:<16} {:<9} {:<18} {:<13} {:<6} {:<8} STATUS",
        "NAME", "ID", "STATE", "ADDRESS", "TAP", "VMM", "PID"
    );
    let now = micropod::vm::unix_now();
    for r in recs {
        let status = match (&r.state, &r.exit) {
            (VmState::Exited, Some(exit)) => {
                format!("{} ago: {}", ago(now, exit.at), exit.reason)
            }
            (VmState::Running, _) => {
                format!("up {}", ago(now, r.started_at.unwrap_or(r.created_at)))
            }
            _ => String::new(),
        };
        let status = match r.network.detached_at {
            Some(at) if r.state != VmState::Exited => {
                let detached = format!("network detached {} ago", ago(now, at));
                if status.is_empty() {
                    detached
                } else {
                    format!("{status}, {detached}")
                }
            }
            _ => status,
        };
        println!(
            "{:<20} {:<16} {:<9} {:<18} {:<13} {:<6} {:<8} {status}",
            r.name,
            r.id,
            r.state.to_string(),
            r.network.cidr,
            r.network.tap,
            micropod::vm::vmm_name(r.vmm),
            r.vmm_process
                .filter(|_| r.state != VmState::Exited)
                .map_or_else(|| "-".into(), |p| p.pid.to_string()),
        );
    }
}

fn ago(now: u64, then: u64) -> String {
    let s = now.saturating_sub(then);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}
