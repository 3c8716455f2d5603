//! `micropod count-sources`: attach the per-source counter to an interface for a while and
//! print what it saw.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use micropod::{
    datapath::{Direction, SourceCounter},
    net::NetNs,
};

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Interface to attach to.
    #[arg(long)]
    iface: String,
    /// Network namespace of the interface (e.g. /run/netns/NAME); default: our own.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// TC hook to attach to.
    #[arg(long, value_enum, default_value = "ingress")]
    direction: DirectionArg,
    /// How long to count, in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum DirectionArg {
    Ingress,
    Egress,
}

impl From<DirectionArg> for Direction {
    fn from(d: DirectionArg) -> Self {
        match d {
            DirectionArg::Ingress => Self::Ingress,
            DirectionArg::Egress => Self::Egress,
        }
    }
}

pub(super) fn run(args: Args) -> anyhow::Result<()> {
    if !(args.duration.is_finite() && args.duration > 0.0 && args.duration <= 86_400.0) {
        anyhow::bail!(
            "--duration must be between 0 and 86400 seconds, got {}",
            args.duration
        );
    }
    let ns = match &args.netns {
        Some(path) => NetNs::open(path)?,
        None => NetNs::current()?,
    };
    let direction = Direction::from(args.direction);
    let mut counter = SourceCounter::load()?;
    counter.attach(&ns, &args.iface, direction)?;
    eprintln!(
        "counting IPv4 sources on {} ({direction}) for {}s...",
        args.iface, args.duration
    );

    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        counter.flush_logs();
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
    counter.flush_logs();

    let counters = counter.counters().context("reading the counters")?;
    if args.json {
        let sources: Vec<_> = counters
            .iter()
            .map(|(addr, c)| serde_json::json!({"addr": addr, "packets": c.packets, "bytes": c.bytes}))
            .collect();
        let out = serde_json::json!({
            "iface": args.iface,
            "netns": ns.path(),
            "direction": direction,
            "sources": sources,
        });
        println!("{out}");
    } else {
        println!("{:<16} {:>12} {:>14}", "SOURCE", "PACKETS", "BYTES");
        for (addr, c) in &counters {
            println!("{:<16} {:>12} {:>14}", addr.to_string(), c.packets, c.bytes);
        }
    }
    Ok(())
}
