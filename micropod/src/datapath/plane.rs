//! The data plane: micropod-ebpf's TC programs on each endpoint's port and on the uplink, and
//! the maps they share, all pinned under the network's BPF pin dir so that they
//! outlive the command that made them.
//!
//! Layout of the pin dir:
//! - `maps/<NAME>`: PORTS, ENDPOINTS, EP_COUNTERS, NAT, CONFIG, NAT_STATS;
//! - `progs/<program>`: the three loaded programs, so later commands attach them to new ports;
//! - `links/<ifname>-<ingress|egress>`: the uplink's TCX link (bpffs refuses dots in names).
//!   Removing the pin releases the link, which detaches the program.
//!
//! Endpoint ports carry no link: their programs are `cls_bpf` filters in [`PORT_FILTER`] on
//! the port's `clsact` qdisc, which live as long as the port (see [`DataPlane::attach_port`]).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{SchedClassifier, TcAttachType, links::FdLink},
    util::nr_cpus,
};
use ipnetwork::Ipv4Network;
use micropod_common::{
    CONFIG_MAP, CONFIG_NO_NAT, DATAPATH_LAYOUT, DatapathConfig, ENDPOINT_COUNTERS_MAP,
    ENDPOINTS_MAP, Endpoint, EndpointCounters, ICMP_TIMEOUT_S, Ipv4Key, MAX_ENDPOINTS, MAX_NO_NAT,
    NAT_INBOUND, NAT_MAP, NAT_OUTBOUND, NAT_STATS_MAP, NO_NAT_MAP, NatEntry, NatKey, NatStats,
    PORT_EGRESS_PROGRAM, PORT_INGRESS_PROGRAM, PORTS_MAP, TCP_CLOSING_TIMEOUT_S, TCP_TIMEOUT_S,
    UDP_TIMEOUT_S, UPLINK_INGRESS_PROGRAM,
};
use serde::Serialize;

use super::{DatapathError, Direction, batch};
use crate::net::{
    Netlink,
    ports::PortRange,
    tc::{self, FilterSlot, Hook},
};

/// Where the port programs sit on each port's `clsact` hooks: priority 1, so they run before
/// any other `cls_bpf` or classic filter there, with a handle that names micropod (`mp`).
pub const PORT_FILTER: FilterSlot = FilterSlot {
    priority: 1,
    handle: 0x6d70,
};

const MAPS: [&str; 7] = [
    PORTS_MAP,
    ENDPOINTS_MAP,
    ENDPOINT_COUNTERS_MAP,
    NAT_MAP,
    CONFIG_MAP,
    NAT_STATS_MAP,
    NO_NAT_MAP,
];
const PROGRAMS: [&str; 3] = [
    PORT_INGRESS_PROGRAM,
    PORT_EGRESS_PROGRAM,
    UPLINK_INGRESS_PROGRAM,
];

/// Environment variable naming an eBPF object file to load instead of the built-in one (for
/// debugging, and for tests that need a load to fail).
pub const OBJECT_ENV: &str = "MICROPOD_BPF_OBJECT";

/// What `network up` tells the data plane.
#[derive(Clone, Debug)]
pub struct PlaneSettings {
    pub subnet: Ipv4Network,
    /// The bridge: the FIB lookup's input interface, and the source MAC of frames the data
    /// plane delivers to endpoints.
    pub bridge_ifindex: u32,
    pub bridge_mac: [u8; 6],
    /// The uplink and its IPv4 address; without one the SNAT fast path is off (the counters
    /// and anti-spoofing still work, and the MASQUERADE fallback handles NAT).
    pub uplink: Option<(String, u32, Ipv4Addr)>,
    /// Capacity of the NAT table in entries (two per flow).
    pub nat_entries: u32,
    /// The ports TCP and UDP flows are translated to.
    pub nat_ports: PortRange,
    /// Destinations never translated: flows to them are left to the stack (at most
    /// [`MAX_NO_NAT`]).
    pub no_nat: Vec<Ipv4Network>,
}

/// One endpoint as `network attach` hands it to the data plane.
#[derive(Clone, Debug)]
pub struct PortSpec<'a> {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// The endpoint's port on the bridge (TAP or host-side veth), in the caller's namespace.
    pub port: &'a str,
    pub ifindex: u32,
}

/// One step of removing (part of) a data plane that failed. Removal runs every step, so
/// [`DataPlane::remove`] and [`DataPlane::detach_port`] return a list of these. The
/// [`DatapathError`]s are boxed: one takes 128 bytes (clippy::result_large_err).
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("{path}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    ReadPinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    RemovePinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("port entry of {ip}")]
    PortEntry {
        ip: Ipv4Addr,
        #[source]
        source: Box<DatapathError>,
    },
    #[error("endpoint entry of {ip}")]
    EndpointEntry {
        ip: Ipv4Addr,
        #[source]
        source: Box<DatapathError>,
    },
    #[error("counters of {ip}")]
    Counters {
        ip: Ipv4Addr,
        #[source]
        source: Box<DatapathError>,
    },
    #[error("NAT flows of {ip}")]
    NatFlows {
        ip: Ipv4Addr,
        #[source]
        source: Box<DatapathError>,
    },
}

/// The data plane of one network, by its pin dir.
#[derive(Clone, Debug)]
pub struct DataPlane {
    dir: PathBuf,
    /// Set once the pinned layout was found to be this build's (see [`Self::check_layout`]).
    layout_ok: std::cell::OnceCell<()>,
}

/// The pin dir records the data path's layout ([`DATAPATH_LAYOUT`]) as an empty directory
/// `layout-<N>`: bpffs holds pins and directories, not regular files.
pub const LAYOUT_PREFIX: &str = "layout-";

/// The pin dir records the object its programs were loaded from as an empty directory
/// `object-<id>` ([`object_id`]): the same layout with other programs (a fix in a newer
/// micropod) must still reach the hooks at the next `up`.
pub const OBJECT_PREFIX: &str = "object-";

/// Test-only: makes this process believe its data path has another layout (for upgrade
/// tests, which need two builds whose layouts differ).
#[doc(hidden)]
pub const LAYOUT_ENV: &str = "MICROPOD_TEST_LAYOUT";

/// The layout this process uses: [`DATAPATH_LAYOUT`], unless [`LAYOUT_ENV`] says otherwise.
fn own_layout() -> u32 {
    std::env::var(LAYOUT_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DATAPATH_LAYOUT)
}

/// The two halves of carrying a map's entries over in [`DataPlane::upgrade`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    BeforeSwap,
    AfterSwap,
}

/// `BPF_NOEXIST`: an update that only adds.
const BPF_NOEXIST: u64 = 1;

/// What [`DataPlane::upgrade`] kept of the data path it replaced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpgradeReport {
    pub from: u32,
    pub to: u32,
    /// The objects' ids ([`object_id`]); the old one is `None` for pins made before they
    /// were recorded.
    pub from_object: Option<String>,
    pub to_object: String,
    /// Maps used as they were, entries untouched.
    pub reused: Vec<&'static str>,
    /// Maps recreated with the old entries copied in (the settings map is written anew).
    pub copied: Vec<&'static str>,
    /// Maps recreated empty: their entry types changed, so the old entries could not be kept.
    pub dropped: Vec<&'static str>,
    /// Hooks moved to the new programs.
    pub hooks: usize,
}

/// Counters of one endpoint, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EndpointStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Drops by reason name (see `micropod_common::DropReason`).
    pub drops: BTreeMap<&'static str, u64>,
}

/// NAT table occupancy and counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NatTableStats {
    /// Entries in use (two per flow) and the table's capacity.
    pub entries: u64,
    pub capacity: u32,
    pub flows: u64,
    /// The programs' counters (`NAT_STATS`), as fields of this object in JSON.
    #[serde(flatten)]
    pub counters: NatStats,
}

impl DataPlane {
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            layout_ok: std::cell::OnceCell::new(),
        }
    }

    /// The layout of the data path pinned here: what `up` recorded, 1 for pins made before
    /// layouts were recorded, `None` if nothing is installed.
    #[must_use]
    pub fn installed_layout(&self) -> Option<u32> {
        // One `stat` when it is ours; a listing only when it is not.
        let own = own_layout();
        if self.dir.join(format!("{LAYOUT_PREFIX}{own}")).is_dir() {
            return Some(own);
        }
        let recorded = std::fs::read_dir(&self.dir).ok()?.flatten().find_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix(LAYOUT_PREFIX)
                .map(|n| n.parse().unwrap_or(0))
        });
        recorded.or_else(|| self.is_installed().then_some(1))
    }

    /// The id of the object whose programs are pinned here, if recorded (pins made before
    /// object ids were recorded have none).
    #[must_use]
    pub fn installed_object(&self) -> Option<String> {
        std::fs::read_dir(&self.dir).ok()?.flatten().find_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix(OBJECT_PREFIX)
                .map(str::to_owned)
        })
    }

    /// Whether the programs pinned here were loaded from this build's object (`up` asks, not
    /// the per-endpoint commands: the maps of the same layout are all they use).
    pub fn object_matches(&self) -> Result<bool, DatapathError> {
        Ok(self.installed_object() == Some(own_object_id()?))
    }

    /// Whether what is pinned here (if anything) has this build's layout.
    #[must_use]
    pub fn layout_matches(&self) -> bool {
        self.installed_layout().is_none_or(|l| l == own_layout())
    }

    /// Refuses pins of another layout: they would be misread. Checked once per value.
    fn check_layout(&self) -> Result<(), DatapathError> {
        if self.layout_ok.get().is_some() {
            return Ok(());
        }
        match self.installed_layout() {
            Some(found) if found != own_layout() => Err(DatapathError::Layout {
                dir: self.dir.clone(),
                found,
                expected: own_layout(),
            }),
            _ => {
                let _ = self.layout_ok.set(());
                Ok(())
            }
        }
    }

    /// Whether a data plane is installed here (its programs are pinned).
    #[must_use]
    pub fn is_installed(&self) -> bool {
        PROGRAMS.iter().all(|p| self.prog_path(p).exists())
            && MAPS.iter().all(|m| self.map_path(m).exists())
    }

    /// Loads the programs, pins them and their maps, writes the settings and attaches the
    /// uplink hook. On failure, removes whatever it pinned.
    pub fn install(&self, settings: &PlaneSettings) -> Result<(), DatapathError> {
        let result = self.try_install(settings);
        if result.is_err() {
            for problem in self.remove() {
                log::warn!(
                    "while undoing a failed data plane install: {}",
                    crate::error_chain(&problem)
                );
            }
        }
        result
    }

    fn try_install(&self, settings: &PlaneSettings) -> Result<(), DatapathError> {
        self.make_dirs()?;
        // Maps left pinned (a repair) are used if they fit; those that do not start afresh.
        let (mut ebpf, moved) = self.load_pinned(settings)?;
        for name in moved {
            if let Err(e) = remove_pin(&self.old_map_path(name)) {
                log::warn!("{}", crate::error_chain(&e));
            }
        }
        for name in PROGRAMS {
            let program = classifier(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| DatapathError::LoadProgram { name, source })?;
            let path = self.prog_path(name);
            program
                .pin(&path)
                .map_err(|source| DatapathError::Pin { path, source })?;
        }
        self.record_layout()?;
        self.configure(settings)?;
        self.attach_network_hooks(settings)
    }

    fn make_dirs(&self) -> Result<(), DatapathError> {
        for dir in ["maps", "progs", "links"] {
            let path = self.dir.join(dir);
            std::fs::create_dir_all(&path).map_err(|source| DatapathError::PinDir {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Marks the pins as this build's layout and object, and only these.
    fn record_layout(&self) -> Result<(), DatapathError> {
        let layout = format!("{LAYOUT_PREFIX}{}", own_layout());
        let object = format!("{OBJECT_PREFIX}{}", own_object_id()?);
        for own in [&layout, &object] {
            let path = self.dir.join(own);
            std::fs::create_dir_all(&path)
                .map_err(|source| DatapathError::WriteLayout { path, source })?;
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let marker = name.starts_with(LAYOUT_PREFIX) || name.starts_with(OBJECT_PREFIX);
                if marker && name != layout && name != object {
                    let path = entry.path();
                    std::fs::remove_dir(&path)
                        .map_err(|source| DatapathError::WriteLayout { path, source })?;
                }
            }
        }
        let _ = self.layout_ok.set(());
        Ok(())
    }

    /// Loads the object with every map at its pin: a pinned map that fits the object's
    /// definition is used as it is, a missing one is created and pinned. A pinned map that
    /// does not fit (another layout's) is moved to `maps/old-<NAME>` first, for
    /// [`Self::upgrade`] to copy from; the names moved are returned.
    fn load_pinned(
        &self,
        settings: &PlaneSettings,
    ) -> Result<(aya::Ebpf, Vec<&'static str>), DatapathError> {
        let object = object()?;
        let mut moved = Vec::new();
        loop {
            let mut loader = EbpfLoader::new();
            loader.map_max_entries(NAT_MAP, settings.nat_entries);
            if own_layout() != DATAPATH_LAYOUT {
                // The test layout differs in a map's definition too, so that an upgrade
                // between it and this build's has a map to migrate.
                loader.map_max_entries(ENDPOINT_COUNTERS_MAP, MAX_ENDPOINTS + own_layout());
            }
            for name in MAPS {
                loader.map_pin_path(name, self.map_path(name));
            }
            match loader.load(&object) {
                Ok(ebpf) => return Ok((ebpf, moved)),
                Err(aya::EbpfError::MapError(MapError::IncompatiblePinnedMap { name, .. })) => {
                    let Some(name) = MAPS.iter().copied().find(|m| *m == name) else {
                        return Err(DatapathError::MissingMap("(unknown)"));
                    };
                    if moved.contains(&name) {
                        return Err(DatapathError::MissingMap(name));
                    }
                    let (from, to) = (self.map_path(name), self.old_map_path(name));
                    std::fs::rename(&from, &to)
                        .map_err(|source| DatapathError::MoveAside { path: from, source })?;
                    moved.push(name);
                }
                Err(e) => return Err(DatapathError::Load(e)),
            }
        }
    }

    /// Upgrades (or downgrades) a data path of another layout in place, while its endpoints
    /// keep running: loads this build's object onto the pinned maps that still fit, recreates
    /// the others and copies their entries over where the entry types are the same, then
    /// moves every hook to the new programs atomically (the uplink's TCX link by
    /// `BPF_LINK_UPDATE`, each port's filter by a netlink replace of the same slot), and
    /// only then pins the new programs and records the layout. `ports` are the endpoints
    /// (their map entries are written again if those maps could not be kept); `hooked` are
    /// all ports carrying the port programs (endpoints and pooled TAPs): (ifindex, name).
    /// A failure leaves the old programs running on every hook not yet moved; a later `up`
    /// tries again.
    pub async fn upgrade(
        &self,
        nl: &Netlink,
        settings: &PlaneSettings,
        ports: &[PortSpec<'_>],
        hooked: &[(u32, String)],
    ) -> Result<UpgradeReport, DatapathError> {
        let mut report = UpgradeReport {
            from: self.installed_layout().unwrap_or(0),
            to: own_layout(),
            from_object: self.installed_object(),
            to_object: own_object_id()?,
            ..UpgradeReport::default()
        };
        self.make_dirs()?;
        // Copies an upgrade that died left behind are the maps' previous contents.
        let mut aside: Vec<&'static str> = MAPS
            .iter()
            .copied()
            .filter(|m| self.old_map_path(m).exists())
            .collect();
        let (mut ebpf, moved) = self.load_pinned(settings)?;
        for m in moved {
            if !aside.contains(&m) {
                aside.push(m);
            }
        }
        // The maps are this build's from here on (the layout is recorded at the end).
        let _ = self.layout_ok.set(());
        for name in MAPS {
            if !aside.contains(&name) {
                report.reused.push(name);
            } else if name == CONFIG_MAP || self.migrate(name, Phase::BeforeSwap)? {
                report.copied.push(name);
            } else {
                report.dropped.push(name);
            }
        }
        if report.dropped.contains(&ENDPOINTS_MAP) || report.dropped.contains(&PORTS_MAP) {
            for spec in ports {
                self.write_entries(spec)?;
            }
        }
        self.configure(settings)?;
        for name in PROGRAMS {
            let program = classifier(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| DatapathError::LoadProgram { name, source })?;
        }
        let mut fd = |name: &'static str| -> Result<_, DatapathError> {
            let open_err = |source| DatapathError::OpenProgram {
                path: self.prog_path(name),
                source,
            };
            classifier(&mut ebpf, name)?
                .fd()
                .map_err(open_err)?
                .try_clone()
                .map_err(|e| open_err(aya::programs::ProgramError::IOError(e)))
        };
        let uplink = fd(UPLINK_INGRESS_PROGRAM)?;
        let ingress = fd(PORT_INGRESS_PROGRAM)?;
        let egress = fd(PORT_EGRESS_PROGRAM)?;
        if let Ok(entries) = std::fs::read_dir(self.dir.join("links")) {
            for entry in entries.flatten() {
                let path = entry.path();
                crate::sys::bpf::update_pinned_link(&path, uplink.as_fd())
                    .map_err(|source| DatapathError::UpdateLink { path, source })?;
                report.hooks += 1;
            }
        }
        for (ifindex, name) in hooked {
            hook_filters(nl, *ifindex, ingress.as_fd(), egress.as_fd()).await?;
            report.hooks += 2;
            log::debug!("{name}: port programs replaced");
        }
        // What the old programs counted and created until their hooks moved.
        for name in aside {
            if report.copied.contains(&name) && name != CONFIG_MAP {
                self.migrate(name, Phase::AfterSwap)?;
            }
            unpin(&self.old_map_path(name))?;
        }
        for name in PROGRAMS {
            let path = self.prog_path(name);
            unpin(&path)?;
            let program = classifier(&mut ebpf, name)?;
            program
                .pin(&path)
                .map_err(|source| DatapathError::Pin { path, source })?;
        }
        self.record_layout()?;
        Ok(report)
    }

    /// Carries the entries of `maps/old-<name>` over into the map `name`, in two phases
    /// around the hooks' move: before it, what the new programs need to find (endpoints,
    /// ports, NAT flows, and zeroed counters, which they add to); after it, what the old
    /// programs wrote meanwhile (flows they created; their counters, added in). Entries
    /// already in the new map are kept (a retried upgrade). `false` if the entry types differ
    /// (another layout changed them), so the entries cannot be kept.
    fn migrate(&self, name: &'static str, phase: Phase) -> Result<bool, DatapathError> {
        let old = self.old_map_path(name);
        let open_old = || -> Result<Map, DatapathError> {
            let data = MapData::from_pin(&old).map_err(|source| DatapathError::OpenPinned {
                path: old.clone(),
                source,
            })?;
            Map::from_map_data(data).map_err(|source| DatapathError::OpenPinned {
                path: old.clone(),
                source,
            })
        };
        let cpus = nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?.get() as usize;
        macro_rules! copy_missing {
            ($k:ty, $v:ty) => {{
                let Ok(from) = HashMap::<MapData, $k, $v>::try_from(open_old()?) else {
                    return Ok(false);
                };
                let mut to: HashMap<MapData, $k, $v> = self.open(name)?;
                for item in from.iter() {
                    let (k, v) = item.map_err(map_err(name))?;
                    ignore_exists(to.insert(&k, &v, BPF_NOEXIST)).map_err(map_err(name))?;
                }
            }};
        }
        match (name, phase) {
            (PORTS_MAP, Phase::BeforeSwap) => copy_missing!(u32, Endpoint),
            (ENDPOINTS_MAP, Phase::BeforeSwap) => copy_missing!(Ipv4Key, Endpoint),
            (NAT_MAP, _) => copy_missing!(NatKey, NatEntry),
            (ENDPOINT_COUNTERS_MAP, phase) => {
                let Ok(from) =
                    PerCpuHashMap::<MapData, Ipv4Key, EndpointCounters>::try_from(open_old()?)
                else {
                    return Ok(false);
                };
                let mut to: PerCpuHashMap<MapData, Ipv4Key, EndpointCounters> = self.open(name)?;
                for item in from.iter() {
                    let (k, old) = item.map_err(map_err(name))?;
                    let values: Vec<EndpointCounters> = match phase {
                        Phase::BeforeSwap => vec![EndpointCounters::default(); cpus],
                        Phase::AfterSwap => {
                            let now = to.get(&k, 0).map_err(map_err(name))?;
                            now.iter().zip(old.iter()).map(|(n, o)| n.plus(o)).collect()
                        }
                    };
                    let values = PerCpuValues::try_from(values).map_err(DatapathError::Cpus)?;
                    let flags = match phase {
                        Phase::BeforeSwap => BPF_NOEXIST,
                        Phase::AfterSwap => 0,
                    };
                    ignore_exists(to.insert(&k, values, flags)).map_err(map_err(name))?;
                }
            }
            (NAT_STATS_MAP, phase) => {
                let Ok(from) = PerCpuArray::<MapData, NatStats>::try_from(open_old()?) else {
                    return Ok(false);
                };
                if phase == Phase::AfterSwap {
                    let mut to: PerCpuArray<MapData, NatStats> = self.open(name)?;
                    let now = to.get(&0, 0).map_err(map_err(name))?;
                    let old = from.get(&0, 0).map_err(map_err(name))?;
                    let sum: Vec<NatStats> =
                        now.iter().zip(old.iter()).map(|(n, o)| n.plus(o)).collect();
                    let sum = PerCpuValues::try_from(sum).map_err(DatapathError::Cpus)?;
                    to.set(0, sum, 0).map_err(map_err(name))?;
                }
            }
            (PORTS_MAP | ENDPOINTS_MAP, Phase::AfterSwap) => {}
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn old_map_path(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(format!("old-{name}"))
    }

    /// Writes the settings map; the programs read it on every packet.
    pub fn configure(&self, settings: &PlaneSettings) -> Result<(), DatapathError> {
        let (uplink_ifindex, uplink_ip) = settings
            .uplink
            .as_ref()
            .map_or((0, [0; 4]), |(_, index, ip)| (*index, ip.octets()));
        let config = DatapathConfig {
            subnet: settings.subnet.network().octets(),
            mask: settings.subnet.mask().octets(),
            uplink_ip,
            uplink_ifindex,
            bridge_ifindex: settings.bridge_ifindex,
            bridge_mac: settings.bridge_mac,
            flags: if settings.no_nat.is_empty() {
                0
            } else {
                CONFIG_NO_NAT
            },
            _pad: 0,
            tcp_timeout_s: TCP_TIMEOUT_S,
            tcp_closing_timeout_s: TCP_CLOSING_TIMEOUT_S,
            udp_timeout_s: UDP_TIMEOUT_S,
            icmp_timeout_s: ICMP_TIMEOUT_S,
            nat_port_min: settings.nat_ports.min,
            nat_port_max: settings.nat_ports.max,
        };
        // The destinations first: the flag that has the programs read them comes after.
        let mut trie: LpmTrie<MapData, [u8; 4], u32> = self.open(NO_NAT_MAP)?;
        let wanted: Vec<Key<[u8; 4]>> = settings
            .no_nat
            .iter()
            .map(|n| Key::new(u32::from(n.prefix()), n.network().octets()))
            .collect();
        if wanted.len() > MAX_NO_NAT as usize {
            return Err(DatapathError::TooManyNoNat {
                count: wanted.len(),
                max: MAX_NO_NAT,
            });
        }
        let stale: Vec<Key<[u8; 4]>> = trie
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                !wanted
                    .iter()
                    .any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data())
            })
            .collect();
        for key in &stale {
            ignore_missing(trie.remove(key)).map_err(map_err(NO_NAT_MAP))?;
        }
        for key in &wanted {
            trie.insert(key, &1, 0).map_err(map_err(NO_NAT_MAP))?;
        }
        let mut map: Array<MapData, DatapathConfig> = self.open(CONFIG_MAP)?;
        map.set(0, &config, 0).map_err(map_err(CONFIG_MAP))
    }

    /// (Re)attaches the uplink program, replacing an earlier link of this network, and drops
    /// the link of a former uplink (`--uplink auto` follows the default route).
    pub fn attach_network_hooks(&self, settings: &PlaneSettings) -> Result<(), DatapathError> {
        let current = settings
            .uplink
            .as_ref()
            .map(|(name, _, _)| self.link_path(name, Direction::Ingress));
        if let Ok(entries) = std::fs::read_dir(self.dir.join("links")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let port = name
                    .rsplit_once('-')
                    .and_then(|(link, _)| crate::net::naming::endpoint_link_ip(link))
                    .is_some();
                if !port
                    && Some(entry.path()) != current
                    && let Err(e) = remove_file(&entry.path())
                {
                    log::warn!("former uplink's link: {e}");
                }
            }
        }
        if let Some((name, index, _)) = &settings.uplink {
            self.attach(UPLINK_INGRESS_PROGRAM, name, *index, Direction::Ingress)?;
        }
        Ok(())
    }

    /// Registers an endpoint (map entries first, so its first frame is already counted) and
    /// hooks the port programs on its port: the `clsact` qdisc and a direct-action `cls_bpf`
    /// filter on each side, in [`PORT_FILTER`] (replacing what is there, so a repair can run it
    /// again). Not TCX: a TCX attach waits for an RCU grace period with rtnl held (see
    /// `net::tc`). The port must still be down, for the counters to see its first frame.
    pub async fn attach_port(
        &self,
        nl: &Netlink,
        spec: &PortSpec<'_>,
    ) -> Result<(), DatapathError> {
        self.register_port(spec)?;
        self.hook_port(nl, spec).await
    }

    /// The map entries of an endpoint on its port ([`Self::attach_port`] without the hooks, for
    /// a port that carries them already: a pooled TAP). Its counters start from zero.
    pub fn register_port(&self, spec: &PortSpec<'_>) -> Result<(), DatapathError> {
        let ep = Endpoint {
            ip: spec.ip.octets(),
            ifindex: spec.ifindex,
            mac: spec.mac,
            _pad: [0; 2],
        };
        let key = Ipv4Key { addr: ep.ip };
        let cpus = nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?.get() as usize;
        let zero = PerCpuValues::try_from(vec![EndpointCounters::default(); cpus])
            .map_err(DatapathError::Cpus)?;
        // Replacing (not adding to) the counters: a reused address starts from zero.
        let mut counters: PerCpuHashMap<MapData, Ipv4Key, EndpointCounters> =
            self.open(ENDPOINT_COUNTERS_MAP)?;
        counters
            .insert(&key, zero, 0)
            .map_err(map_err(ENDPOINT_COUNTERS_MAP))?;
        self.write_entries(spec)
    }

    /// An endpoint's entries in the endpoint and port maps (its counters untouched).
    fn write_entries(&self, spec: &PortSpec<'_>) -> Result<(), DatapathError> {
        let ep = Endpoint {
            ip: spec.ip.octets(),
            ifindex: spec.ifindex,
            mac: spec.mac,
            _pad: [0; 2],
        };
        let key = Ipv4Key { addr: ep.ip };
        let mut endpoints: HashMap<MapData, Ipv4Key, Endpoint> = self.open(ENDPOINTS_MAP)?;
        endpoints
            .insert(&key, &ep, 0)
            .map_err(map_err(ENDPOINTS_MAP))?;
        let mut ports: HashMap<MapData, u32, Endpoint> = self.open(PORTS_MAP)?;
        ports
            .insert(&spec.ifindex, &ep, 0)
            .map_err(map_err(PORTS_MAP))?;
        Ok(())
    }

    /// Hooks the port programs on an endpoint's port (the second half of
    /// [`DataPlane::attach_port`]), replacing what is in [`PORT_FILTER`]; `network up` runs it
    /// again on a port that lost them.
    pub async fn hook_port(&self, nl: &Netlink, spec: &PortSpec<'_>) -> Result<(), DatapathError> {
        // A port hooked by an older micropod with TCX links would run both programs.
        for direction in [Direction::Ingress, Direction::Egress] {
            if let Err(e) = remove_file(&self.link_path(spec.port, direction)) {
                log::warn!("removing a TCX link pin of {}: {e}", spec.port);
            }
        }
        let ingress = self.program(PORT_INGRESS_PROGRAM)?;
        let egress = self.program(PORT_EGRESS_PROGRAM)?;
        let open_err = |name| {
            move |source| DatapathError::OpenProgram {
                path: self.prog_path(name),
                source,
            }
        };
        hook_filters(
            nl,
            spec.ifindex,
            ingress
                .fd()
                .map_err(open_err(PORT_INGRESS_PROGRAM))?
                .as_fd(),
            egress.fd().map_err(open_err(PORT_EGRESS_PROGRAM))?.as_fd(),
        )
        .await
    }

    /// What is wrong with an endpoint's entries in the port and endpoint maps, if anything
    /// (an independent read-back of [`DataPlane::register_port`], for the CNI plugin's CHECK).
    pub fn port_entries_problem(
        &self,
        spec: &PortSpec<'_>,
    ) -> Result<Option<String>, DatapathError> {
        let key = Ipv4Key {
            addr: spec.ip.octets(),
        };
        let endpoints: HashMap<MapData, Ipv4Key, Endpoint> = self.open(ENDPOINTS_MAP)?;
        let ports: HashMap<MapData, u32, Endpoint> = self.open(PORTS_MAP)?;
        let wanted =
            |ep: &Endpoint| ep.ip == key.addr && ep.ifindex == spec.ifindex && ep.mac == spec.mac;
        for (map, found) in [
            (ENDPOINTS_MAP, endpoints.get(&key, 0)),
            (PORTS_MAP, ports.get(&spec.ifindex, 0)),
        ] {
            match found {
                Ok(ep) if wanted(&ep) => {}
                Ok(ep) => {
                    return Ok(Some(format!(
                        "the {map} map's entry for {} names {} on ifindex {} instead of ifindex {}",
                        spec.port,
                        Ipv4Addr::from(ep.ip),
                        ep.ifindex,
                        spec.ifindex
                    )));
                }
                Err(MapError::KeyNotFound) => {
                    return Ok(Some(format!(
                        "the {map} map has no entry for {} ({})",
                        spec.port, spec.ip
                    )));
                }
                Err(e) => return Err(map_err(map)(e)),
            }
        }
        Ok(None)
    }

    /// Whether the port carries both port programs in [`PORT_FILTER`] (an independent check
    /// of what [`DataPlane::attach_port`] made; `network up` repairs ports that do not).
    pub async fn port_hooked(&self, nl: &Netlink, ifindex: u32) -> Result<bool, DatapathError> {
        for (name, hook) in [
            (PORT_INGRESS_PROGRAM, Hook::Ingress),
            (PORT_EGRESS_PROGRAM, Hook::Egress),
        ] {
            let filters = tc::bpf_filters(nl, ifindex, hook).await?;
            if !filters.iter().any(|f| {
                f.slot == PORT_FILTER && f.direct_action && f.name.as_deref() == Some(name)
            }) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Forgets an endpoint: its port's links, map entries, counters and NAT flows. Runs every
    /// step; returns what failed.
    /// `ifindex` is the port's, if known: its entry is removed directly; otherwise the whole
    /// port map is searched for entries of `ip` (a reconcile after a crash).
    pub fn detach_port(&self, ip: Ipv4Addr, port: &str, ifindex: Option<u32>) -> Vec<RemoveError> {
        let mut problems = Vec::new();
        for direction in [Direction::Ingress, Direction::Egress] {
            if let Err(e) = remove_pin(&self.link_path(port, direction)) {
                problems.push(e);
            }
        }
        let key = Ipv4Key { addr: ip.octets() };
        let steps = [
            self.open::<HashMap<MapData, u32, Endpoint>>(PORTS_MAP)
                .and_then(|mut ports| {
                    let stale: Vec<u32> = match ifindex {
                        Some(index) => vec![index],
                        None => ports
                            .iter()
                            .filter_map(Result::ok)
                            .filter(|(_, ep)| ep.ip == key.addr)
                            .map(|(index, _)| index)
                            .collect(),
                    };
                    for index in stale {
                        ignore_missing(ports.remove(&index)).map_err(map_err(PORTS_MAP))?;
                    }
                    Ok(())
                })
                .map_err(|source| RemoveError::PortEntry {
                    ip,
                    source: Box::new(source),
                }),
            self.open::<HashMap<MapData, Ipv4Key, Endpoint>>(ENDPOINTS_MAP)
                .and_then(|mut m| ignore_missing(m.remove(&key)).map_err(map_err(ENDPOINTS_MAP)))
                .map_err(|source| RemoveError::EndpointEntry {
                    ip,
                    source: Box::new(source),
                }),
            self.open::<PerCpuHashMap<MapData, Ipv4Key, EndpointCounters>>(ENDPOINT_COUNTERS_MAP)
                .and_then(|mut m| {
                    ignore_missing(m.remove(&key)).map_err(map_err(ENDPOINT_COUNTERS_MAP))
                })
                .map_err(|source| RemoveError::Counters {
                    ip,
                    source: Box::new(source),
                }),
            self.remove_nat(|k, v| {
                (v.direction == NAT_INBOUND && v.addr == key.addr) || k.src_ip == key.addr
            })
            .map(drop)
            .map_err(|source| RemoveError::NatFlows {
                ip,
                source: Box::new(source),
            }),
        ];
        problems.extend(steps.into_iter().filter_map(Result::err));
        problems
    }

    /// Deletes the NAT flows idle past their timeout in both directions, both entries at once
    /// (the programs also reclaim such a flow's slot when a new flow probes it). Returns how
    /// many entries were removed.
    pub fn sweep_nat(&self) -> Result<usize, DatapathError> {
        let config: Array<MapData, DatapathConfig> = self.open(CONFIG_MAP)?;
        let config = config.get(&0, 0).map_err(map_err(CONFIG_MAP))?;
        let now = monotonic_coarse_ns();
        let mut nat: HashMap<MapData, NatKey, NatEntry> = self.open(NAT_MAP)?;
        let entries: std::collections::HashMap<NatKey, NatEntry> =
            nat.iter().filter_map(Result::ok).collect();
        let stale = |k: &NatKey| {
            entries
                .get(k)
                .is_none_or(|v| v.is_stale(k.proto, now, &config))
        };
        let mut doomed = Vec::new();
        for (key, entry) in &entries {
            if entry.direction != NAT_INBOUND {
                continue;
            }
            let outbound = NatKey::outbound_of(key, entry);
            if stale(key) && stale(&outbound) {
                doomed.push(*key);
                if entries.contains_key(&outbound) {
                    doomed.push(outbound);
                }
            }
        }
        // Outbound entries whose reply entry is gone: left by a flow that lost its slot.
        for (key, entry) in &entries {
            if entry.direction == NAT_OUTBOUND
                && !entries.contains_key(&NatKey::reply_of(key, entry))
                && stale(key)
            {
                doomed.push(*key);
            }
        }
        for k in &doomed {
            ignore_missing(nat.remove(k)).map_err(map_err(NAT_MAP))?;
        }
        Ok(doomed.len())
    }

    fn remove_nat(
        &self,
        doomed: impl Fn(&NatKey, &NatEntry) -> bool,
    ) -> Result<usize, DatapathError> {
        let mut nat: HashMap<MapData, NatKey, NatEntry> = self.open(NAT_MAP)?;
        let keys: Vec<NatKey> = nat
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| doomed(k, v))
            .map(|(k, _)| k)
            .collect();
        for k in &keys {
            ignore_missing(nat.remove(k)).map_err(map_err(NAT_MAP))?;
        }
        Ok(keys.len())
    }

    /// Per-endpoint counters by address, summed over CPUs (one batched read of the map).
    pub fn endpoint_stats(&self) -> Result<BTreeMap<Ipv4Addr, EndpointStats>, DatapathError> {
        let data = self.open_data(ENDPOINT_COUNTERS_MAP)?;
        let cpus = nr_cpus()
            .map_err(|(_, source)| DatapathError::Cpus(source))?
            .get() as usize;
        let per_cpu = size_of::<EndpointCounters>().next_multiple_of(8);
        let mut out = BTreeMap::new();
        batch::for_each::<Ipv4Key>(data.fd().as_fd(), per_cpu * cpus, |key, values| {
            let total = values
                .chunks_exact(per_cpu)
                .map(batch::read::<EndpointCounters>)
                .fold(EndpointCounters::default(), |acc, c| acc.plus(&c));
            out.insert(Ipv4Addr::from(key.addr), EndpointStats::from(total));
        })
        .map_err(|source| DatapathError::ReadMap {
            name: ENDPOINT_COUNTERS_MAP,
            source,
        })?;
        Ok(out)
    }

    /// NAT occupancy and counters.
    pub fn nat_stats(&self) -> Result<NatTableStats, DatapathError> {
        let path = self.map_path(NAT_MAP);
        let nat = self.open_data(NAT_MAP)?;
        let capacity = nat
            .info()
            .map_err(|source| DatapathError::OpenPinned { path, source })?
            .max_entries();
        let mut entries = 0;
        let mut flows = 0;
        batch::for_each::<NatKey>(nat.fd().as_fd(), size_of::<NatEntry>(), |_, value| {
            entries += 1;
            flows += u64::from(batch::read::<NatEntry>(value).direction == NAT_INBOUND);
        })
        .map_err(|source| DatapathError::ReadMap {
            name: NAT_MAP,
            source,
        })?;
        let stats: PerCpuArray<MapData, NatStats> = self.open(NAT_STATS_MAP)?;
        let total = stats
            .get(&0, 0)
            .map_err(map_err(NAT_STATS_MAP))?
            .iter()
            .fold(NatStats::default(), |acc, s| acc.plus(s));
        Ok(NatTableStats {
            entries,
            capacity,
            flows,
            counters: total,
        })
    }

    /// Removes every link, program and map pin, and the pin dir. Runs every step; returns what
    /// failed (a missing pin is not a failure).
    pub fn remove(&self) -> Vec<RemoveError> {
        let mut problems = Vec::new();
        // Links first, so no program runs on a half-removed plane.
        for sub in ["links", "progs", "maps"] {
            let dir = self.dir.join(sub);
            match std::fs::read_dir(&dir) {
                Ok(entries) => {
                    for entry in entries.flatten() {
                        if let Err(e) = remove_pin(&entry.path()) {
                            problems.push(e);
                        }
                    }
                }
                // Not a directory: the pin dir is some other file (an unusable `--bpf-dir`
                // under `auto`, which fell back to netfilter), not ours to remove.
                Err(e) if is_absent(&e) => {}
                Err(source) => problems.push(RemoveError::ReadPinDir { path: dir, source }),
            }
        }
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if is_absent(&e) => {}
            Err(source) => problems.push(RemoveError::RemovePinDir {
                path: self.dir.clone(),
                source,
            }),
        }
        problems
    }

    /// Attaches a pinned program to `iface` with TCX and pins the link, replacing a link this
    /// plane pinned there before.
    fn attach(
        &self,
        name: &'static str,
        iface: &str,
        ifindex: u32,
        direction: Direction,
    ) -> Result<(), DatapathError> {
        let link_path = self.link_path(iface, direction);
        let mut program = self.program(name)?;
        // The link this plane pinned there before, if it still runs this very program on this
        // device: kept. Replacing it would leave the device without the program for a moment
        // and, since the kernel releases an unpinned link later, on a workqueue, could find
        // the program still attached (EEXIST).
        let tcx_type = match direction {
            Direction::Ingress => BPF_TCX_INGRESS,
            Direction::Egress => BPF_TCX_EGRESS,
        };
        if let Ok(info) = program.info()
            && crate::sys::bpf::pinned_link(&link_path).ok() == Some((info.id(), ifindex, tcx_type))
        {
            return Ok(());
        }
        if let Err(e) = remove_file(&link_path) {
            log::warn!("replacing link pin: {e}");
        }
        let attach_err = |source| DatapathError::Attach {
            name,
            iface: iface.into(),
            direction,
            source,
        };
        // An older link of the same program that is on its way out (see above): wait for the
        // kernel to release it, a few milliseconds, rather than fail.
        let mut tries = 0;
        let id = loop {
            match program.attach(ifindex, TcAttachType::from(direction)) {
                Err(e) if tries < ATTACH_RETRIES && is_exists(&e) => {
                    tries += 1;
                    std::thread::sleep(ATTACH_RETRY_WAIT);
                }
                other => break other.map_err(attach_err)?,
            }
        };
        let link = program.take_link(id).map_err(attach_err)?;
        let link = FdLink::try_from(link).map_err(|source| DatapathError::LinkKind {
            iface: iface.into(),
            source,
        })?;
        link.pin(&link_path)
            .map_err(|source| DatapathError::Pin {
                path: link_path,
                source,
            })
            .map(drop)
    }

    fn program(&self, name: &'static str) -> Result<SchedClassifier, DatapathError> {
        self.check_layout()?;
        let path = self.prog_path(name);
        SchedClassifier::from_pin(&path)
            .map_err(|source| DatapathError::OpenProgram { path, source })
    }

    fn open_data(&self, name: &'static str) -> Result<MapData, DatapathError> {
        self.check_layout()?;
        let path = self.map_path(name);
        MapData::from_pin(&path).map_err(|source| DatapathError::OpenPinned { path, source })
    }

    fn open<M>(&self, name: &'static str) -> Result<M, DatapathError>
    where
        M: TryFrom<Map, Error = MapError>,
    {
        self.check_layout()?;
        let path = self.map_path(name);
        let open_err = |source| DatapathError::OpenPinned {
            path: path.clone(),
            source,
        };
        let data = MapData::from_pin(&path).map_err(open_err)?;
        let map = Map::from_map_data(data).map_err(open_err)?;
        M::try_from(map).map_err(open_err)
    }

    fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    fn prog_path(&self, name: &str) -> PathBuf {
        self.dir.join("progs").join(name)
    }

    fn link_path(&self, iface: &str, direction: Direction) -> PathBuf {
        self.dir.join("links").join(format!("{iface}-{direction}"))
    }
}

impl From<EndpointCounters> for EndpointStats {
    fn from(c: EndpointCounters) -> Self {
        Self {
            rx_packets: c.rx_packets,
            rx_bytes: c.rx_bytes,
            tx_packets: c.tx_packets,
            tx_bytes: c.tx_bytes,
            drops: micropod_common::DropReason::ALL
                .iter()
                .map(|r| (r.name(), c.drops[*r as usize]))
                .collect(),
        }
    }
}

/// The eBPF object: the built-in one, or the file named by [`OBJECT_ENV`].
fn object() -> Result<std::borrow::Cow<'static, [u8]>, DatapathError> {
    if let Some(path) = std::env::var_os(OBJECT_ENV) {
        let path = PathBuf::from(path);
        return std::fs::read(&path)
            .map(std::borrow::Cow::Owned)
            .map_err(|source| DatapathError::ReadObject { path, source });
    }
    if super::OBJECT.is_empty() {
        return Err(DatapathError::NotBuilt);
    }
    Ok(std::borrow::Cow::Borrowed(super::OBJECT))
}

/// The id of an object: its FNV-1a hash, 16 hex digits. Not a defence against anyone (whoever
/// can write the pin dir owns the data path anyway), only a way to tell builds apart.
#[must_use]
pub fn object_id(object: &[u8]) -> String {
    let hash = object.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// [`object_id`] of the object this process loads, hashed once per process.
fn own_object_id() -> Result<String, DatapathError> {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(id) = ID.get() {
        return Ok(id.clone());
    }
    let id = object_id(&object()?);
    Ok(ID.get_or_init(|| id).clone())
}

/// The bytes of the object this process loads (for tests that make a second build of it).
#[doc(hidden)]
pub fn own_object() -> Result<Vec<u8>, DatapathError> {
    object().map(std::borrow::Cow::into_owned)
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// Treats "already there" as done: a migration keeps what the new map holds.
fn ignore_exists(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// Treats "no such key" as done: removal is idempotent.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn remove_file(path: &Path) -> Result<(), String> {
    remove_pin(path).map_err(|e| crate::error_chain(&e))
}

/// `enum bpf_attach_type` in linux/bpf.h.
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
/// How often, and how far apart, a TCX attach that found its program still attached (by a
/// link being released) is tried again: 1 s in all.
const ATTACH_RETRIES: u32 = 100;
const ATTACH_RETRY_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// Whether a program attach failed because the program is attached there already.
fn is_exists(e: &aya::programs::ProgramError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(libc::EEXIST)
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// Whether a pin dir lookup failed because there is no such directory.
fn is_absent(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// The TC classifier `name` of a loaded object.
fn classifier<'e>(
    ebpf: &'e mut aya::Ebpf,
    name: &'static str,
) -> Result<&'e mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DatapathError::ProgramType { name, source })
}

/// Puts the port programs on a port's `clsact` hooks, in [`PORT_FILTER`], replacing what is
/// in that slot (a netlink replace: the hook never runs neither program).
async fn hook_filters(
    nl: &Netlink,
    ifindex: u32,
    ingress: std::os::fd::BorrowedFd<'_>,
    egress: std::os::fd::BorrowedFd<'_>,
) -> Result<(), DatapathError> {
    // All three in flight at once on the one socket: the kernel takes them in the order sent
    // (the qdisc before its filters), and no request waits for the answer to the one before.
    let (qdisc, ingress, egress) = tokio::join!(
        tc::add_clsact(nl, ifindex),
        tc::replace_bpf(
            nl,
            ifindex,
            Hook::Ingress,
            PORT_FILTER,
            ingress,
            PORT_INGRESS_PROGRAM
        ),
        tc::replace_bpf(
            nl,
            ifindex,
            Hook::Egress,
            PORT_FILTER,
            egress,
            PORT_EGRESS_PROGRAM
        ),
    );
    qdisc?;
    ingress?;
    egress?;
    Ok(())
}

/// [`remove_pin`] for a step that must not go on if it fails.
fn unpin(path: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_file(path) {
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => Err(DatapathError::Unpin {
            path: path.to_path_buf(),
            source,
        }),
        _ => Ok(()),
    }
}

/// Removes a pin; one that is not there is removed already.
fn remove_pin(path: &Path) -> Result<(), RemoveError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RemoveError::Unpin {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The clock `bpf_ktime_get_coarse_ns` reads.
fn monotonic_coarse_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE exists on Linux");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}
