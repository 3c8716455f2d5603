//! Prometheus metrics read from the network's records and the pinned BPF maps.
//!
//! Every scrape reads afresh: the network's records for the endpoints and addresses, the VM
//! records for the `vm` label, and (on the eBPF data path) the counter and NAT maps. Nothing is cached, so a
//! detached endpoint's series are gone from the next scrape and a re-attached address starts
//! from the zeroed map entry its attach wrote.
//!
//! A network that is down, or maps that cannot be read, are not errors: the scrape still
//! answers a valid exposition with `micropod_up 0`, so a long-running exporter rides through
//! `network down` / `up` and Prometheus sees the gap as data, not as a dead target.

mod exposition;
mod server;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

pub use server::{DEFAULT_LISTEN, MetricsError, Server};

use crate::{
    network::NetworkError,
    stats::{self, Stats},
    vm::Vms,
};

/// What one scrape read.
#[derive(Debug)]
pub struct Sample {
    /// `None` when the network is down or could not be read.
    pub network: Option<NetworkSample>,
    /// Time spent reading state and maps.
    pub duration: Duration,
}

#[derive(Debug)]
pub struct NetworkSample {
    pub stats: Stats,
    /// Endpoint name → the name of the VM it belongs to.
    pub vms: HashMap<String, String>,
}

/// Reads the network, its VMs and its maps. Never modifies anything and takes no lock, so it
/// can run as often as scrapers ask without slowing down `run` or `attach`.
pub struct Exporter {
    vms: Vms,
}

impl Exporter {
    #[must_use]
    pub fn new(vms: Vms) -> Self {
        Self { vms }
    }

    /// Reads everything a scrape needs.
    #[must_use]
    pub fn sample(&self) -> Sample {
        let started = Instant::now();
        let network = match stats::read(self.vms.network(), None) {
            Ok(stats) => Some(NetworkSample {
                vms: self.vm_owners(),
                stats,
            }),
            Err(NetworkError::NotUp { .. }) => None,
            Err(e) => {
                log::warn!(
                    "cannot read the network for this scrape (micropod_up 0): {}",
                    crate::error_chain(&e)
                );
                None
            }
        };
        Sample {
            network,
            duration: started.elapsed(),
        }
    }

    /// The OpenMetrics text of a fresh sample.
    #[must_use]
    pub fn scrape(&self) -> String {
        exposition::render(self.sample())
    }

    fn vm_owners(&self) -> HashMap<String, String> {
        match self.vms.list_unlocked() {
            Ok(records) => records
                .into_iter()
                .filter(|r| !r.network.released)
                .map(|r| (r.network.endpoint, r.name))
                .collect(),
            Err(e) => {
                // The counters are still right; only the `vm` label is missing.
                log::warn!(
                    "cannot read the VM records (no vm labels in this scrape): {}",
                    crate::error_chain(&e)
                );
                HashMap::new()
            }
        }
    }
}

pub use exposition::CONTENT_TYPE;
