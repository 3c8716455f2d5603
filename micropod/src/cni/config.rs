//! What the runtime gives the plugin: the `CNI_*` environment and the network configuration on
//! stdin, parsed and checked before anything changes.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use ipnetwork::Ipv4Network;
use serde::Deserialize;
use serde_json::Value;

use super::CniError;
use crate::network::{
    DEFAULT_BPF_DIR, DEFAULT_BRIDGE, DEFAULT_STATE_DIR, DEFAULT_SUBNET, DatapathMode, PortRange,
    UpRequest, UplinkChoice,
};

/// The spec versions this plugin speaks, oldest first: 0.4.0 (CHECK, `prevResult` on DEL),
/// 1.0.0 (no `version` in results), 1.1.0 (STATUS, GC, an interface's MTU in results).
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// How long a command waits for another's state lock unless the configuration says: longer
/// than any command holds it in practice, shorter than runtimes wait for a plugin.
pub const DEFAULT_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A spec version this plugin speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    pub fn parse(s: &str) -> Result<Self, CniError> {
        match s {
            "0.4.0" => Ok(Self::V0_4_0),
            "1.0.0" => Ok(Self::V1_0_0),
            "1.1.0" => Ok(Self::V1_1_0),
            other => Err(CniError::IncompatibleVersion {
                version: other.to_owned(),
            }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }
}

/// The verbs of spec 1.1.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

/// The `CNI_*` variables, as given (validated per command by [`Invocation::require`]).
#[derive(Clone, Debug, Default)]
pub struct Invocation {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl Invocation {
    /// From the process environment.
    #[must_use]
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// From any source of variables (tests pass a map).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name| get(name).filter(|v| !v.is_empty());
        Self {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            path: get("CNI_PATH"),
        }
    }

    pub fn command(&self) -> Result<Command, CniError> {
        match self.command.as_deref() {
            Some("ADD") => Ok(Command::Add),
            Some("DEL") => Ok(Command::Del),
            Some("CHECK") => Ok(Command::Check),
            Some("STATUS") => Ok(Command::Status),
            Some("GC") => Ok(Command::Gc),
            Some("VERSION") => Ok(Command::Version),
            Some(other) => Err(CniError::Env {
                var: "CNI_COMMAND",
                why: format!("{other:?} is not ADD, DEL, CHECK, STATUS, GC or VERSION"),
            }),
            None => Err(CniError::Env {
                var: "CNI_COMMAND",
                why: "is not set".into(),
            }),
        }
    }

    /// The attachment's key and namespace, as `command` needs them: ADD and CHECK need all
    /// three, DEL no namespace (runtimes send DEL with an empty one once the sandbox is gone).
    pub fn attachment(&self, command: Command) -> Result<AttachmentKey, CniError> {
        let container_id = self.container_id.clone().ok_or(CniError::Env {
            var: "CNI_CONTAINERID",
            why: "is not set".into(),
        })?;
        if !valid_container_id(&container_id) {
            return Err(CniError::Env {
                var: "CNI_CONTAINERID",
                why: format!(
                    "{container_id:?} must start with a letter or digit, followed by letters, digits, '_', '.' or '-'"
                ),
            });
        }
        let ifname = self.ifname.clone().ok_or(CniError::Env {
            var: "CNI_IFNAME",
            why: "is not set".into(),
        })?;
        crate::net::link::validate_name(&ifname).map_err(|e| CniError::Env {
            var: "CNI_IFNAME",
            why: crate::error_chain(&e),
        })?;
        let netns = self.netns.clone().map(PathBuf::from);
        if netns.is_none() && command != Command::Del {
            return Err(CniError::Env {
                var: "CNI_NETNS",
                why: "is not set".into(),
            });
        }
        let args = parse_args(self.args.as_deref().unwrap_or_default())?;
        Ok(AttachmentKey {
            container_id,
            ifname,
            netns,
            pod_namespace: args.get("K8S_POD_NAMESPACE").cloned(),
            pod_name: args.get("K8S_POD_NAME").cloned(),
            ip: args
                .get("IP")
                .map(|ip| {
                    ip.parse::<Ipv4Addr>().map_err(|_| CniError::Env {
                        var: "CNI_ARGS",
                        why: format!("IP={ip} is not an IPv4 address"),
                    })
                })
                .transpose()?,
        })
    }
}

/// The spec's rule for container ids.
fn valid_container_id(id: &str) -> bool {
    id.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
fn parse_args(args: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(CniError::Env {
                var: "CNI_ARGS",
                why: format!("{pair:?} is not KEY=VALUE"),
            });
        };
        out.insert(key.to_owned(), value.to_owned());
    }
    Ok(out)
}

/// Who an ADD, DEL or CHECK is for.
#[derive(Clone, Debug)]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
    pub netns: Option<PathBuf>,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    /// `IP=` in `CNI_ARGS` (the convention host-local follows): this address, not the next.
    pub ip: Option<Ipv4Addr>,
}

/// The network configuration as written (`"type": "micropod"`), with the spec's own fields.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: Option<String>,
    /// A conflist's list of versions (1.1.0); the runtime picks one and passes `cniVersion`.
    #[serde(default)]
    cni_versions: Vec<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    bridge: Option<String>,
    subnet: Option<String>,
    gateway: Option<String>,
    range_start: Option<String>,
    range_end: Option<String>,
    datapath: Option<String>,
    ip_masq: Option<bool>,
    #[serde(default)]
    no_masquerade: Vec<String>,
    mtu: Option<u32>,
    nat_table_size: Option<u32>,
    nat_ports: Option<String>,
    uplink: Option<String>,
    state_dir: Option<PathBuf>,
    bpf_dir: Option<PathBuf>,
    lock_wait_seconds: Option<f64>,
    dns: Option<Value>,
    ipam: Option<Value>,
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<GcAttachment>>,
    /// The spelling of texts before spec 1.1.0's final one (libcni sends both).
    #[serde(rename = "cni.dev/attachments")]
    attachments: Option<Vec<GcAttachment>>,
}

/// One entry of GC's list of attachments to keep.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct GcAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// A checked network configuration.
#[derive(Clone, Debug)]
pub struct NetConf {
    pub version: Version,
    pub name: String,
    pub up: UpRequest,
    pub range: Option<(Ipv4Addr, Ipv4Addr)>,
    pub mtu: Option<u32>,
    pub state_dir: PathBuf,
    pub bpf_dir: PathBuf,
    /// How long a command waits for another's state lock before answering "try again later".
    pub lock_wait: std::time::Duration,
    pub dns: Option<Value>,
    pub prev_result: Option<Value>,
    /// GC's attachments to keep (`None`: not given).
    pub valid_attachments: Option<Vec<GcAttachment>>,
}

/// The `cniVersion` of a configuration, for answering in it before the rest is checked
/// (VERSION, and errors of a configuration that is otherwise bad).
#[must_use]
pub(super) fn version_of(stdin: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "cniVersion")]
        cni_version: Option<String>,
    }
    serde_json::from_slice::<Probe>(stdin)
        .ok()
        .and_then(|p| p.cni_version)
}

impl NetConf {
    /// Parses and checks the configuration on stdin.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let raw: RawConf = serde_json::from_slice(stdin).map_err(CniError::Decode)?;
        let version = Version::parse(
            raw.cni_version
                .as_deref()
                .ok_or_else(|| CniError::Config("cniVersion is missing".into()))?,
        )?;
        for v in &raw.cni_versions {
            if v.split('.').count() != 3 || v.split('.').any(|p| p.parse::<u32>().is_err()) {
                return Err(CniError::Config(format!(
                    "cniVersions holds {v:?}, which is not a version such as 1.0.0"
                )));
            }
        }
        let name = raw
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| CniError::Config("name is missing".into()))?;
        if raw.kind.as_deref().is_none_or(str::is_empty) {
            return Err(CniError::Config("type is missing".into()));
        }
        if let Some(ipam) = &raw.ipam {
            // An empty object is what some tools write when there is nothing to say.
            if ipam.as_object().is_none_or(|o| !o.is_empty()) {
                return Err(CniError::UnsupportedField {
                    field: "ipam".into(),
                    why: "micropod allocates addresses itself, from the network's subnet (set \
                          subnet, and rangeStart/rangeEnd for a part of it) and shares them with \
                          its VMs; remove the ipam section"
                        .into(),
                });
            }
        }
        let ip = |field: &str, value: Option<String>| -> Result<Option<Ipv4Addr>, CniError> {
            value
                .map(|v| {
                    v.parse::<Ipv4Addr>().map_err(|_| {
                        CniError::Config(format!("{field} {v:?} is not an IPv4 address"))
                    })
                })
                .transpose()
        };
        let subnet = raw.subnet.unwrap_or_else(|| DEFAULT_SUBNET.into());
        let parsed_subnet = crate::network::parse_subnet(&subnet)
            .map_err(|e| CniError::Config(crate::error_chain(&e)))?;
        let gateway = ip("gateway", raw.gateway)?;
        let range = match (
            ip("rangeStart", raw.range_start)?,
            ip("rangeEnd", raw.range_end)?,
        ) {
            (None, None) => None,
            (first, last) => {
                let first =
                    first.unwrap_or_else(|| Ipv4Addr::from(u32::from(parsed_subnet.network()) + 1));
                let last = last
                    .unwrap_or_else(|| Ipv4Addr::from(u32::from(parsed_subnet.broadcast()) - 1));
                let rules = crate::ipam::Ipam::new(
                    parsed_subnet,
                    gateway
                        .map_or_else(|| crate::ipam::Ipam::default_gateway(parsed_subnet), Ok)
                        .map_err(|e| CniError::Config(e.to_string()))?,
                )
                .map_err(|e| CniError::Config(e.to_string()))?;
                rules.check_range(first, last).map_err(CniError::Config)?;
                Some((first, last))
            }
        };
        let datapath = match raw.datapath.as_deref() {
            None | Some("auto") => DatapathMode::Auto,
            Some("ebpf") => DatapathMode::Ebpf,
            Some("netfilter") => DatapathMode::Netfilter,
            Some(other) => {
                return Err(CniError::Config(format!(
                    "datapath {other:?} is not auto, ebpf or netfilter"
                )));
            }
        };
        let no_masquerade = if raw.ip_masq == Some(false) {
            // No translation for any destination: the same rule, for everything.
            vec![Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0")]
        } else {
            raw.no_masquerade
                .iter()
                .map(|cidr| {
                    cidr.parse::<Ipv4Network>()
                        .ok()
                        .filter(|_| cidr.contains('/'))
                        .ok_or_else(|| {
                            CniError::Config(format!(
                                "noMasquerade holds {cidr:?}, which is not an IPv4 CIDR such as 10.244.0.0/16"
                            ))
                        })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let nat_ports = raw
            .nat_ports
            .map(|p| {
                p.parse::<PortRange>()
                    .map_err(|e| CniError::Config(format!("natPorts: {e}")))
            })
            .transpose()?;
        if let Some(bridge) = &raw.bridge {
            crate::net::link::validate_name(bridge)
                .map_err(|e| CniError::Config(format!("bridge: {}", crate::error_chain(&e))))?;
        }
        let lock_wait = match raw.lock_wait_seconds {
            None => DEFAULT_LOCK_WAIT,
            Some(s) if s.is_finite() && (0.0..=3600.0).contains(&s) => {
                std::time::Duration::from_secs_f64(s)
            }
            Some(s) => {
                return Err(CniError::Config(format!(
                    "lockWaitSeconds {s} is out of range: use 0 to 3600"
                )));
            }
        };
        let valid_attachments = match (raw.valid_attachments, raw.attachments) {
            (Some(a), _) | (None, Some(a)) => Some(a),
            (None, None) => None,
        };
        Ok(Self {
            version,
            name,
            up: UpRequest {
                bridge: raw.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.into()),
                subnet,
                gateway,
                uplink: raw.uplink.map_or(UplinkChoice::Auto, |u| {
                    u.parse().expect("UplinkChoice parses any string")
                }),
                datapath,
                nat_entries: raw.nat_table_size,
                pool: None,
                nat_ports,
                no_masquerade,
            },
            range,
            mtu: raw.mtu,
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            bpf_dir: raw
                .bpf_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BPF_DIR)),
            lock_wait,
            dns: raw.dns,
            prev_result: raw.prev_result,
            valid_attachments,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> Result<NetConf, CniError> {
        NetConf::parse(
            format!(r#"{{"cniVersion":"1.0.0","name":"mp","type":"micropod"{extra}}}"#).as_bytes(),
        )
    }

    #[test]
    fn defaults_are_the_cli_defaults() {
        let c = conf("").unwrap();
        assert_eq!(c.version, Version::V1_0_0);
        assert_eq!(c.up.bridge, DEFAULT_BRIDGE);
        assert_eq!(c.up.subnet, DEFAULT_SUBNET);
        assert_eq!(c.up.datapath, DatapathMode::Auto);
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert!(c.up.no_masquerade.is_empty());
        assert!(c.range.is_none());
    }

    #[test]
    fn bad_configurations_say_what_is_wrong() {
        for (extra, code, words) in [
            (r#","subnet":"10.1.0.0""#, 7, "prefix"),
            (
                r#","subnet":"10.1.0.0/24","rangeStart":"10.2.0.5""#,
                7,
                "not a host address",
            ),
            (
                r#","rangeStart":"10.10.0.9","rangeEnd":"10.10.0.5""#,
                7,
                "above its end",
            ),
            (r#","datapath":"xdp""#, 7, "auto, ebpf or netfilter"),
            (r#","noMasquerade":["10.0.0.1"]"#, 7, "CIDR"),
            (r#","ipam":{"type":"host-local"}"#, 2, "ipam"),
            (r#","gateway":"ten""#, 7, "gateway"),
            (r#","cniVersions":["one"]"#, 7, "cniVersions"),
        ] {
            let err = conf(extra).expect_err(extra);
            assert_eq!(err.code(), code, "{extra}: {err}");
            assert!(err.to_string().contains(words), "{extra}: {err}");
        }
        let err =
            NetConf::parse(br#"{"cniVersion":"0.3.1","name":"mp","type":"micropod"}"#).unwrap_err();
        assert_eq!(err.code(), 1);
        let err = NetConf::parse(b"{not json").unwrap_err();
        assert_eq!(err.code(), 6);
    }

    #[test]
    fn ip_masq_false_means_no_destination_is_translated() {
        let c = conf(r#","ipMasq":false,"noMasquerade":["10.244.0.0/16"]"#).unwrap();
        assert_eq!(c.up.no_masquerade, vec!["0.0.0.0/0".parse().unwrap()]);
    }

    #[test]
    fn gc_lists_are_read_under_both_names() {
        let list = r#"[{"containerID":"c1","ifname":"eth0"}]"#;
        for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
            let c = conf(&format!(r#","{key}":{list}"#)).unwrap();
            assert_eq!(
                c.valid_attachments.unwrap(),
                vec![GcAttachment {
                    container_id: "c1".into(),
                    ifname: "eth0".into()
                }]
            );
        }
    }

    #[test]
    fn environment_is_checked_per_command() {
        let inv = |vars: &[(&str, &str)]| {
            let vars: BTreeMap<String, String> = vars
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            Invocation::from_vars(|k| vars.get(k).cloned())
        };
        let del = inv(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ]);
        assert!(del.attachment(Command::Del).unwrap().netns.is_none());
        let err = del.attachment(Command::Add).unwrap_err();
        assert!(err.to_string().contains("CNI_NETNS"), "{err}");
        assert_eq!(err.code(), 4);
        let bad = inv(&[("CNI_CONTAINERID", "-x"), ("CNI_IFNAME", "eth0")]);
        assert_eq!(bad.attachment(Command::Del).unwrap_err().code(), 4);
        let long = inv(&[
            ("CNI_CONTAINERID", "x"),
            ("CNI_IFNAME", "a-name-too-long-for-linux"),
        ]);
        assert!(
            long.attachment(Command::Del)
                .unwrap_err()
                .to_string()
                .contains("CNI_IFNAME")
        );
        let pod = inv(&[
            ("CNI_CONTAINERID", "x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/proc/1/ns/net"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
            ),
        ]);
        let key = pod.attachment(Command::Add).unwrap();
        assert_eq!(key.pod_namespace.as_deref(), Some("default"));
        assert_eq!(key.pod_name.as_deref(), Some("web-0"));
        assert_eq!(
            inv(&[("CNI_COMMAND", "PING")])
                .command()
                .unwrap_err()
                .code(),
            4
        );
    }
}
