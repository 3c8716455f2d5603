//! What micropod records about one VM: `<state>/vms/<name>.json`.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::process::ProcessRef;
use crate::{
    network::Mac,
    vmm::{VmSpec, VmmKind},
};

/// Bumped when the record's meaning changes.
pub const RECORD_VERSION: u32 = 1;

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Recorded with its endpoint; the supervisor is starting the VMM.
    Starting,
    /// The VMM reported the guest running.
    Running,
    /// The VMM is gone and the endpoint released (unless `network.released` says otherwise).
    Exited,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Exited => "exited",
        })
    }
}

/// The VM's endpoint on the bridge network, as attached.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmNetwork {
    /// The endpoint's name in `micropod network ls` (the VM's name).
    pub endpoint: String,
    pub tap: String,
    pub bridge: String,
    pub ip: Ipv4Addr,
    pub cidr: String,
    pub gateway: Ipv4Addr,
    pub mac: Mac,
    /// Whether the endpoint (TAP and address) has been given back.
    pub released: bool,
    /// When `network detach --force` took the endpoint from the VM while it ran (Unix
    /// seconds): it runs on without a network, and its address may be someone else's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached_at: Option<u64>,
}

/// How the VM ended.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmExit {
    /// Unix seconds.
    pub at: u64,
    /// The VMM's exit code, if it exited normally.
    pub code: Option<i32>,
    /// The signal that killed the VMM, if one did.
    pub signal: Option<i32>,
    /// In words: "exit code 0", "killed by signal 9", "failed to start: …", …
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmRecord {
    pub version: u32,
    pub name: String,
    pub id: String,
    pub vmm: VmmKind,
    pub state: VmState,
    pub spec: VmSpec,
    pub network: VmNetwork,
    /// Unix seconds.
    pub created_at: u64,
    pub started_at: Option<u64>,
    /// The `micropod run` that made the record; it answers for the VM until a supervisor does.
    pub creator: ProcessRef,
    pub supervisor: Option<ProcessRef>,
    /// The VMM process, once spawned.
    pub vmm_process: Option<ProcessRef>,
    /// `stop` asked for the VM to end (so its exit is not a crash).
    pub stop_requested: bool,
    pub exit: Option<VmExit>,
}

impl VmRecord {
    /// The VM's own directory: console log, VMM log, supervisor log, control sockets.
    pub fn dir(&self) -> &PathBuf {
        &self.spec.run_dir
    }

    /// Whether someone still answers for the VM: its supervisor, or (before there is one) the
    /// `micropod run` that is starting it.
    pub fn owner_alive(&self) -> bool {
        match &self.supervisor {
            Some(supervisor) => supervisor.is_alive(),
            None => self.creator.is_alive(),
        }
    }

    pub fn vmm_alive(&self) -> bool {
        self.vmm_process.as_ref().is_some_and(ProcessRef::is_alive)
    }

    /// Marks the VM exited (the endpoint's release is recorded separately).
    pub fn mark_exited(&mut self, code: Option<i32>, signal: Option<i32>, reason: String) {
        self.state = VmState::Exited;
        self.exit = Some(VmExit {
            at: now(),
            code,
            signal,
            reason,
        });
    }
}

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
