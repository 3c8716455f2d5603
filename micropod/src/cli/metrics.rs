//! `micropod metrics …`: the Prometheus exporter around [`micropod::metrics::Exporter`].

use std::net::SocketAddr;

use micropod::metrics::{DEFAULT_LISTEN, Exporter, Server};

#[derive(Debug, clap::Subcommand)]
pub(super) enum Command {
    /// Serve Prometheus metrics at http://ADDR/metrics until SIGINT/SIGTERM.
    ///
    /// Per-endpoint counters, the NAT table, IPAM and the data path, in OpenMetrics text, read
    /// from the BPF maps and records on every scrape. A network that is down is served as
    /// `micropod_up 0`.
    Serve {
        /// IP:PORT to listen on, e.g. 127.0.0.1:9464, 0.0.0.0:9464 or [::1]:9464.
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN, value_parser = parse_listen)]
        listen: SocketAddr,
    },
    /// Print one scrape's exposition (OpenMetrics text) on stdout.
    Print,
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("expected IP:PORT, such as {DEFAULT_LISTEN}, 0.0.0.0:9464 or [::1]:9464")
    })
}

pub(super) fn run(exporter: Exporter, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { listen } => {
            let server = Server::bind(listen, exporter)?;
            eprintln!(
                "micropod: serving metrics on http://{}/metrics",
                server.local_addr()
            );
            server.run()?;
        }
        Command::Print => print!("{}", exporter.scrape()),
    }
    Ok(())
}
