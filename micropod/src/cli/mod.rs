//! Argument parsing and output. Every command's work is in the library.

mod count_sources;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "micropod", version, about = "MicroVMs with real networking")]
struct Cli {
    /// Log level filter (error, warn, info, debug, trace), as in RUST_LOG.
    #[arg(long, global = true, env = "MICROPOD_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Count packets and bytes per IPv4 source on one interface with the eBPF counter.
    CountSources(count_sources::Args),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log)
        .format_target(false)
        .init();
    let result = match cli.command {
        Command::CountSources(args) => count_sources::run(args),
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
