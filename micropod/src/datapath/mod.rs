//! The eBPF data path: micropod-ebpf's object, loaded and attached with aya.

mod batch;
mod counter;
mod plane;

pub use counter::{Direction, SourceCounter, read_pinned_counters};
pub use plane::{
    DataPlane, EndpointStats, LAYOUT_ENV, LAYOUT_PREFIX, NatTableStats, OBJECT_ENV, OBJECT_PREFIX,
    PORT_FILTER, PlaneSettings, PortSpec, RemoveError, UpgradeReport, object_id, own_object,
};

use aya::{Ebpf, EbpfLoader};

/// The eBPF object built from `micropod-ebpf` by build.rs (empty with `AYA_BUILD_SKIP=1`).
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/micropod"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this micropod was built with AYA_BUILD_SKIP=1 and carries no eBPF object; rebuild it without AYA_BUILD_SKIP (scripts/setup.sh installs the nightly and bpf-linker)"
    )]
    NotBuilt,
    #[error(
        "cannot load the eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN, and a kernel with BTF)"
    )]
    Load(#[source] aya::EbpfError),
    #[error(
        "the data path pinned in {dir} has layout {found} and this micropod uses layout {expected} (another version of micropod made it); run `micropod network up` to replace it"
    )]
    Layout {
        dir: std::path::PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("cannot move the pinned map {path} aside for the upgrade")]
    MoveAside {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove the pin {path}")]
    Unpin {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot move the hook pinned at {path} to the new program")]
    UpdateLink {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot record the data path's layout in {path}")]
    WriteLayout {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error(
        "{count} destinations are never to be translated, and the eBPF data path holds at most {max}; merge them into wider prefixes"
    )]
    TooManyNoNat { count: usize, max: u32 },
    #[error("program {name} is not a TC classifier")]
    ProgramType {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("the kernel refused program {name}")]
    LoadProgram {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot attach {name} to {iface} ({direction})")]
    Attach {
        name: &'static str,
        iface: String,
        direction: Direction,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot read the entries of map {name}")]
    ReadMap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot pin a map at {path} (is bpffs mounted at /sys/fs/bpf?)")]
    Pin {
        path: std::path::PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot open the pinned map {path}")]
    OpenPinned {
        path: std::path::PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot read the eBPF object {path} (named by MICROPOD_BPF_OBJECT)")]
    ReadObject {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the BPF pin dir {path} (is bpffs mounted at /sys/fs/bpf?)")]
    PinDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find the endpoint's port")]
    Probe(#[source] std::io::Error),
    #[error("cannot count the possible CPUs")]
    Cpus(#[source] std::io::Error),
    #[error(
        "cannot open the pinned program {path}; run `micropod network up` to repair the data plane"
    )]
    OpenProgram {
        path: std::path::PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "the kernel attached the program to {iface} without a BPF link (TCX needs Linux 6.6 or later)"
    )]
    LinkKind {
        iface: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("cannot set up forwarding of the eBPF programs' log")]
    Logger(#[source] aya_log::Error),
    #[error("cannot hook the port programs")]
    PortHook(#[from] crate::net::tc::TcError),
    #[error(transparent)]
    Interface(#[from] crate::net::link::LinkError),
    #[error(transparent)]
    Netns(#[from] crate::net::NetnsError),
}

/// Loads the object, with its maps created fresh (not pinned).
fn load() -> Result<Ebpf, DatapathError> {
    if OBJECT.is_empty() {
        return Err(DatapathError::NotBuilt);
    }
    EbpfLoader::new().load(OBJECT).map_err(DatapathError::Load)
}
