//! `count_src`: per-IPv4-source packet and byte counters on one interface.

use std::{borrow::Borrow, collections::BTreeMap, fmt, net::Ipv4Addr, path::Path};

use aya::{
    Ebpf,
    maps::{Map, MapData, PerCpuHashMap},
    programs::{SchedClassifier, TcAttachType},
};
use aya_log::EbpfLogger;
use micropod_common::{COUNT_SRC_PROGRAM, Ipv4Key, PacketCounters, SRC_COUNTERS_MAP};

use super::DatapathError;
use crate::net::NetNs;

/// Which TC hook of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

impl From<Direction> for TcAttachType {
    fn from(d: Direction) -> Self {
        match d {
            Direction::Ingress => Self::Ingress,
            Direction::Egress => Self::Egress,
        }
    }
}

type BoxedLog = Box<dyn log::Log + Send>;

/// The `count_src` program, loaded, with its map and log. Attachments (TCX links) last as long
/// as this value.
pub struct SourceCounter {
    ebpf: Ebpf,
    logger: EbpfLogger<BoxedLog>,
}

/// Forwards records to whatever logger the process installed.
struct GlobalLog;

impl log::Log for GlobalLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        log::logger().enabled(metadata)
    }
    fn log(&self, record: &log::Record<'_>) {
        log::logger().log(record);
    }
    fn flush(&self) {
        log::logger().flush();
    }
}

impl SourceCounter {
    /// Loads the object and the program; the eBPF log goes to the process's `log` logger.
    pub fn load() -> Result<Self, DatapathError> {
        Self::load_with_logger(Box::new(GlobalLog))
    }

    /// Loads the object and the program; the eBPF log goes to `logger`.
    pub fn load_with_logger(logger: BoxedLog) -> Result<Self, DatapathError> {
        let mut ebpf = super::load()?;
        let logger =
            EbpfLogger::init_with_logger(&mut ebpf, logger).map_err(DatapathError::Logger)?;
        program(&mut ebpf)?
            .load()
            .map_err(|source| DatapathError::LoadProgram {
                name: COUNT_SRC_PROGRAM,
                source,
            })?;
        Ok(Self { ebpf, logger })
    }

    /// Attaches to `iface` in `ns` with TCX (kernel >= 6.6), next to any other programs on the
    /// hook. The link belongs to this value: dropping it, or the process ending, detaches.
    pub fn attach(
        &mut self,
        ns: &NetNs,
        iface: &str,
        direction: Direction,
    ) -> Result<(), DatapathError> {
        let program = program(&mut self.ebpf)?;
        crate::net::link::validate_name(iface)?;
        let iface_c = std::ffi::CString::new(iface).expect("validated names have no NUL");
        // The interface name and the TCX link are resolved in the namespace of the thread.
        ns.run(|| program.attach(iface_c.as_c_str(), TcAttachType::from(direction)))?
            .map_err(|source| DatapathError::Attach {
                name: COUNT_SRC_PROGRAM,
                iface: iface.into(),
                direction,
                source,
            })?;
        Ok(())
    }

    /// The counters so far, summed over CPUs, by source address.
    pub fn counters(&self) -> Result<BTreeMap<Ipv4Addr, PacketCounters>, DatapathError> {
        sum_per_cpu(&PerCpuHashMap::try_from(self.counter_map()?).map_err(map_error)?)
    }

    /// Pins the counter map at `path` (on bpffs) so other processes can read it, also after
    /// this value is gone, until the pin is removed.
    pub fn pin_counters(&self, path: &Path) -> Result<(), DatapathError> {
        self.counter_map()?
            .pin(path)
            .map_err(|source| DatapathError::Pin {
                path: path.to_path_buf(),
                source,
            })
    }

    fn counter_map(&self) -> Result<&Map, DatapathError> {
        self.ebpf
            .map(SRC_COUNTERS_MAP)
            .ok_or(DatapathError::MissingMap(SRC_COUNTERS_MAP))
    }

    /// Forwards what the programs logged since the last call.
    pub fn flush_logs(&mut self) {
        self.logger.flush();
    }
}

/// Reads a counter map pinned with [`SourceCounter::pin_counters`].
pub fn read_pinned_counters(
    path: &Path,
) -> Result<BTreeMap<Ipv4Addr, PacketCounters>, DatapathError> {
    let open_err = |source| DatapathError::OpenPinned {
        path: path.to_path_buf(),
        source,
    };
    let map = Map::from_map_data(MapData::from_pin(path).map_err(open_err)?).map_err(open_err)?;
    sum_per_cpu(&PerCpuHashMap::try_from(map).map_err(open_err)?)
}

fn map_error(source: aya::maps::MapError) -> DatapathError {
    DatapathError::Map {
        name: SRC_COUNTERS_MAP,
        source,
    }
}

/// Folds each key's per-CPU values into one total.
fn sum_per_cpu<T: Borrow<MapData>>(
    map: &PerCpuHashMap<T, Ipv4Key, PacketCounters>,
) -> Result<BTreeMap<Ipv4Addr, PacketCounters>, DatapathError> {
    map.iter()
        .map(|entry| {
            let (key, per_cpu) = entry.map_err(map_error)?;
            let total = per_cpu
                .iter()
                .fold(PacketCounters::default(), |sum, c| sum.add(*c));
            Ok((Ipv4Addr::from(key.addr), total))
        })
        .collect()
}

fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, DatapathError> {
    ebpf.program_mut(COUNT_SRC_PROGRAM)
        .ok_or(DatapathError::MissingProgram(COUNT_SRC_PROGRAM))?
        .try_into()
        .map_err(|source| DatapathError::ProgramType {
            name: COUNT_SRC_PROGRAM,
            source,
        })
}
