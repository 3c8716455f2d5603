//! micropod as a CNI plugin (spec 1.1.0; configurations of 0.4.0, 1.0.0 and 1.1.0): a container
//! runtime's ADD is a netns endpoint of the same network `micropod run`'s VMs use — the same
//! bridge, IPAM, NAT and eBPF programs — recorded under the spec's key (network name,
//! `CNI_CONTAINERID`, `CNI_IFNAME`); DEL releases it from micropod's own records, CHECK reads
//! back what ADD made, GC releases the attachments the runtime no longer knows, STATUS says
//! whether an ADD would succeed.
//!
//! The runtime runs the plugin in the namespace where the bridge lives (its own), so the
//! network manager is used exactly as the CLI uses it. Answers and errors go to stdout as the
//! spec's JSON; libcni reads stderr only when stdout is empty, so logs go there.

mod config;
mod error;
mod result;

use std::path::{Path, PathBuf};

pub use config::{
    AttachmentKey, Command, DEFAULT_LOCK_WAIT, GcAttachment, Invocation, NetConf,
    SUPPORTED_VERSIONS, Version,
};
pub use error::{CniError, codes};
use serde_json::Value;

use crate::network::{
    AttachError, AttachRequest, CniOwner, Endpoint, EndpointKind, Network, NetworkError,
};

/// What the plugin prints on stdout and whether it succeeded (exit status 0, else 1).
#[derive(Clone, Debug)]
pub struct Reply {
    pub stdout: Option<String>,
    pub success: bool,
}

/// Carries out one invocation: `inv` from the environment, `stdin` the configuration. `exe` is
/// the executable that deletes retired links in the background (`network reap`), if any.
#[must_use]
pub fn run(inv: &Invocation, stdin: &[u8], exe: Option<&Path>) -> Reply {
    match dispatch(inv, stdin, exe) {
        Ok(out) => Reply {
            stdout: out.map(|v| v.to_string()),
            success: true,
        },
        Err(err) => {
            log::debug!("CNI {:?} failed: {}", inv.command, crate::error_chain(&err));
            let version = config::version_of(stdin);
            Reply {
                stdout: Some(result::error(version.as_deref(), &err).to_string()),
                success: false,
            }
        }
    }
}

/// The error reply for a configuration that could not even be read.
#[must_use]
pub fn io_error(err: std::io::Error) -> Reply {
    Reply {
        stdout: Some(result::error(None, &CniError::Io(err)).to_string()),
        success: false,
    }
}

fn dispatch(inv: &Invocation, stdin: &[u8], exe: Option<&Path>) -> Result<Option<Value>, CniError> {
    let command = inv.command()?;
    if command == Command::Version {
        return Ok(Some(result::version_info(
            config::version_of(stdin).as_deref(),
        )));
    }
    let conf = NetConf::parse(stdin)?;
    if matches!(command, Command::Status | Command::Gc) && conf.version < Version::V1_1_0 {
        return Err(CniError::IncompatibleVersion {
            version: format!(
                "{} (STATUS and GC need cniVersion 1.1.0)",
                conf.version.as_str()
            ),
        });
    }
    let mut network = Network::new(&conf.state_dir, &conf.bpf_dir).lock_wait(conf.lock_wait);
    if let Some(exe) = exe {
        network = network.reap_in_background(exe);
    }
    let rt = crate::runtime::current_thread().map_err(CniError::Runtime)?;
    match command {
        Command::Add => {
            let key = inv.attachment(command)?;
            rt.block_on(add(&network, &conf, &key)).map(Some)
        }
        Command::Del => {
            let key = inv.attachment(command)?;
            rt.block_on(del(&network, &conf, &key)).map(|()| None)
        }
        Command::Check => {
            let key = inv.attachment(command)?;
            rt.block_on(check(&network, &conf, &key)).map(|()| None)
        }
        Command::Status => status(&network, &conf).map(|()| None),
        Command::Gc => rt.block_on(gc(&network, &conf)).map(|()| None),
        Command::Version => unreachable!("answered above"),
    }
}

/// The endpoint name of an attachment: `cni-`, the container id's first 12 characters, and a
/// hash of the whole key, so that it is short, readable in `network ls`, and the same for
/// every command about the attachment (DEL and CHECK find it with one read).
#[must_use]
pub fn endpoint_name(network: &str, container_id: &str, ifname: &str) -> String {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [network, container_id, ifname] {
        for b in part.bytes().chain([0]) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    let short: String = container_id.chars().take(12).collect();
    // "cni-ab-…", not "cni-ab--…", for an id whose 12th character is a separator.
    let short = short.trim_end_matches(['-', '_', '.']);
    format!("cni-{short}-{:08x}", (hash >> 32) as u32 ^ hash as u32)
}

/// Whether `ep` is this attachment's (a VM or a hand-made endpoint could bear the name).
fn owned(ep: &Endpoint, network: &str, key: &AttachmentKey) -> bool {
    ep.cni.as_ref().is_some_and(|c| {
        c.network == network && c.container_id == key.container_id && c.ifname == key.ifname
    })
}

async fn add(network: &Network, conf: &NetConf, key: &AttachmentKey) -> Result<Value, CniError> {
    let netns = key
        .netns
        .clone()
        .expect("ADD's environment carries CNI_NETNS");
    network.join(&conf.up).await?;
    let name = endpoint_name(&conf.name, &key.container_id, &key.ifname);
    let req = AttachRequest {
        netns: Some(netns.clone()),
        ip: key.ip,
        ifname: Some(key.ifname.clone()),
        mtu: conf.mtu,
        range: conf.range,
        cni: Some(CniOwner {
            network: conf.name.clone(),
            container_id: key.container_id.clone(),
            ifname: key.ifname.clone(),
            pod_namespace: key.pod_namespace.clone(),
            pod_name: key.pod_name.clone(),
        }),
        ..AttachRequest::new(name, EndpointKind::Netns)
    };
    let att = match network.attach(&req).await {
        Ok(att) => att,
        Err(NetworkError::Attach(AttachError::DuplicateEndpoint { ip, .. })) => {
            return Err(CniError::AttachmentExists {
                container_id: key.container_id.clone(),
                ifname: key.ifname.clone(),
                network: conf.name.clone(),
                ip,
            });
        }
        Err(e) => return Err(e.into()),
    };
    Ok(result::add_result(
        conf.version,
        &att,
        &netns.to_string_lossy(),
        conf.dns.as_ref(),
        conf.prev_result.as_ref(),
    ))
}

/// DEL: from micropod's own records alone (no namespace, no `prevResult` needed); success when
/// there is nothing left to release.
async fn del(network: &Network, conf: &NetConf, key: &AttachmentKey) -> Result<(), CniError> {
    let name = endpoint_name(&conf.name, &key.container_id, &key.ifname);
    let ep = match network.endpoint(&name) {
        Ok(Some(ep)) => ep,
        Ok(None) | Err(NetworkError::NotUp { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if !owned(&ep, &conf.name, key) {
        log::warn!(
            "endpoint {name} is not container {}'s {} on network {}: left alone",
            key.container_id,
            key.ifname,
            conf.name
        );
        return Ok(());
    }
    match network.detach(&name).await {
        Ok(_) | Err(NetworkError::UnknownEndpoint { .. } | NetworkError::NotUp { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// CHECK: the attachment on record, as `prevResult` describes it, and everything ADD made
/// still in place.
async fn check(network: &Network, conf: &NetConf, key: &AttachmentKey) -> Result<(), CniError> {
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::Config("CHECK needs prevResult, the result of the ADD".into()))?;
    let name = endpoint_name(&conf.name, &key.container_id, &key.ifname);
    let unknown = || CniError::UnknownContainer {
        container_id: key.container_id.clone(),
        ifname: key.ifname.clone(),
        network: conf.name.clone(),
    };
    let ep = match network.endpoint(&name) {
        Ok(Some(ep)) if owned(&ep, &conf.name, key) => ep,
        Ok(_) | Err(NetworkError::NotUp { .. }) => return Err(unknown()),
        Err(e) => return Err(e.into()),
    };
    let mut problems = prev_result_problems(prev, &ep, &key.ifname, network)?;
    let netns = key
        .netns
        .as_deref()
        .expect("CHECK's environment carries CNI_NETNS");
    problems.extend(network.check_endpoint(&ep, netns).await?);
    if let Err(e) = network.settings_match(&conf.up) {
        problems.push(crate::error_chain(&e));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::Check { problems })
    }
}

/// Where `prevResult` disagrees with the record: our interface and its address must be there.
fn prev_result_problems(
    prev: &Value,
    ep: &Endpoint,
    ifname: &str,
    network: &Network,
) -> Result<Vec<String>, CniError> {
    let config = network.config()?.ok_or_else(|| NetworkError::NotUp {
        state_dir: network.state_dir().to_path_buf(),
    })?;
    let cidr = format!("{}/{}", ep.ip, config.subnet.prefix());
    let interfaces = prev["interfaces"].as_array().cloned().unwrap_or_default();
    let Some(index) = interfaces
        .iter()
        .position(|i| i["name"] == ifname && i.get("sandbox").is_some_and(|s| s != ""))
    else {
        return Ok(vec![format!(
            "prevResult lists no interface {ifname} in a sandbox"
        )]);
    };
    let mut problems = Vec::new();
    if interfaces[index]["mac"] != ep.mac.to_string() {
        problems.push(format!(
            "prevResult gives {ifname} the MAC {}, the record {}",
            interfaces[index]["mac"], ep.mac
        ));
    }
    let ours = prev["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|ip| ip["interface"] == index && ip["address"] == cidr.as_str());
    if !ours {
        problems.push(format!("prevResult lists no address {cidr} on {ifname}"));
    }
    Ok(problems)
}

/// STATUS: whether an ADD would succeed (50 if not, with the reason); 51 when existing
/// containers are affected too.
fn status(network: &Network, conf: &NetConf) -> Result<(), CniError> {
    let doc = match network.read_doc() {
        Ok(doc) => doc,
        // The first ADD brings the network up.
        Err(NetworkError::NotUp { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if let Err(e) = network.settings_match(&conf.up) {
        return Err(CniError::Unavailable {
            reason: crate::error_chain(&e),
        });
    }
    if !crate::net::nftables::exists(&doc.head.nft_table).unwrap_or(true) {
        return Err(CniError::Degraded {
            reason: format!(
                "the NAT table {} is missing; `micropod network up --restore` makes it again",
                doc.head.nft_table
            ),
        });
    }
    if doc.head.active_datapath == crate::network::ActiveDatapath::Ebpf
        && !crate::datapath::DataPlane::new(network.bpf_dir()).is_installed()
    {
        return Err(CniError::Unavailable {
            reason: format!(
                "the eBPF data path's pins are missing from {}; `micropod network up --restore` repairs them",
                network.bpf_dir().display()
            ),
        });
    }
    let free = match conf.range {
        Some((first, last)) => (u32::from(first)..=u32::from(last))
            .map(std::net::Ipv4Addr::from)
            .filter(|&ip| ip != doc.head.config.gateway && doc.ipam.owner(ip).is_none())
            .count(),
        None => (doc.ipam.capacity() - doc.ipam.used()) as usize,
    };
    if free == 0 {
        return Err(CniError::Unavailable {
            reason: match conf.range {
                Some((first, last)) => format!("no free address is left in {first}-{last}"),
                None => format!(
                    "no free address is left in {} ({} in use)",
                    doc.head.config.subnet,
                    doc.ipam.used()
                ),
            },
        });
    }
    Ok(())
}

/// GC: releases this network's attachments that the runtime's list leaves out, then what
/// `micropod gc` releases (endpoints whose namespace is gone, half-done commands).
async fn gc(network: &Network, conf: &NetConf) -> Result<(), CniError> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::Config(
            "GC needs cni.dev/valid-attachments, the attachments to keep (an empty list releases them all)"
                .into(),
        )
    })?;
    let endpoints = network.list()?;
    let mut problems = Vec::new();
    for ep in endpoints {
        let Some(owner) = &ep.cni else { continue };
        if owner.network != conf.name
            || valid
                .iter()
                .any(|v| v.container_id == owner.container_id && v.ifname == owner.ifname)
        {
            continue;
        }
        match network.detach(&ep.name).await {
            Ok(_) => log::info!(
                "GC released container {}'s {} ({})",
                owner.container_id,
                owner.ifname,
                ep.ip
            ),
            Err(NetworkError::UnknownEndpoint { .. }) => {}
            Err(e) => problems.push(format!(
                "container {}'s {}: {}",
                owner.container_id,
                owner.ifname,
                crate::error_chain(&e)
            )),
        }
    }
    match network.gc().await {
        Ok(released) => {
            for r in released {
                log::info!("GC released {}: {}", r.name, r.reason);
            }
        }
        Err(NetworkError::NotUp { .. }) => {}
        Err(e) => problems.push(crate::error_chain(&e)),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::Gc { problems })
    }
}

/// Where `micropod cni install` puts things unless told otherwise.
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
/// The example configuration list `cni install` writes.
pub const EXAMPLE_CONFLIST: &str = "10-micropod.conflist";

/// What `cni install` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Installed {
    pub plugin: PathBuf,
    /// The example configuration, if written (an existing one is kept).
    pub conflist: Option<PathBuf>,
}

/// `micropod cni install`: copies `exe` to `bin_dir/micropod` (atomically: a runtime may exec
/// it at any moment) and writes an example configuration list to `conf_dir` unless one of that
/// name exists (or `force`).
pub fn install(
    exe: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    force: bool,
) -> Result<Installed, std::io::Error> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(bin_dir)?;
    let plugin = bin_dir.join("micropod");
    let tmp = bin_dir.join(".micropod.tmp");
    std::fs::copy(exe, &tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &plugin)?;
    std::fs::create_dir_all(conf_dir)?;
    let path = conf_dir.join(EXAMPLE_CONFLIST);
    let conflist = if force || !path.exists() {
        let mut text =
            serde_json::to_string_pretty(&example_conflist()).expect("a JSON value serializes");
        text.push('\n');
        let tmp = conf_dir.join(".micropod.conflist.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)?;
        Some(path)
    } else {
        None
    };
    Ok(Installed { plugin, conflist })
}

/// The configuration list `cni install` writes: the defaults of `micropod network up`, so
/// containers join the network VMs get without settings.
#[must_use]
pub fn example_conflist() -> Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["1.0.0", "1.1.0"],
        "name": "micropod",
        "plugins": [{
            "type": "micropod",
            "bridge": crate::network::DEFAULT_BRIDGE,
            "subnet": crate::network::DEFAULT_SUBNET,
            "datapath": "auto",
            "ipMasq": true
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_names_are_valid_stable_and_keyed_by_all_three() {
        let id = "3f6940ab5ab43bc522569d15b23f8c1bbde1d7678b080398506924fc01d72755";
        let a = endpoint_name("mp", id, "eth0");
        assert!(crate::network::valid_endpoint_name(&a), "{a}");
        assert!(a.starts_with("cni-3f6940ab5ab4-"), "{a}");
        assert_eq!(a, endpoint_name("mp", id, "eth0"));
        assert_ne!(a, endpoint_name("mp", id, "eth1"));
        assert_ne!(a, endpoint_name("other", id, "eth0"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(endpoint_name("m", "ab", "c"), endpoint_name("m", "a", "bc"));
    }

    #[test]
    fn version_answers_in_the_version_asked_for() {
        let reply = run(
            &Invocation {
                command: Some("VERSION".into()),
                ..Invocation::default()
            },
            br#"{"cniVersion":"0.4.0"}"#,
            None,
        );
        assert!(reply.success);
        let v: Value = serde_json::from_str(&reply.stdout.unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(SUPPORTED_VERSIONS)
        );
    }

    #[test]
    fn errors_are_the_spec_json_on_stdout() {
        let reply = run(
            &Invocation {
                command: Some("ADD".into()),
                ..Invocation::default()
            },
            br#"{"cniVersion":"1.0.0","name":"mp","type":"micropod","datapath":"xdp"}"#,
            None,
        );
        assert!(!reply.success);
        let v: Value = serde_json::from_str(&reply.stdout.unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 7);
        assert!(v["msg"].as_str().unwrap().contains("datapath"), "{v}");
    }
}
