//! What the plugin prints: ADD's result, VERSION's answer and errors, each in the spec version
//! the runtime asked for.

use serde_json::{Map, Value, json};

use super::{CniError, config::Version};
use crate::network::Attachment;

/// ADD's result for `att`, in `version`, appended to `prev` (a chained plugin's `prevResult`)
/// if there is one: its interfaces, addresses and routes come first and ours point past them.
#[must_use]
pub(super) fn add_result(
    version: Version,
    att: &Attachment,
    sandbox: &str,
    dns: Option<&Value>,
    prev: Option<&Value>,
) -> Value {
    let mut out = prev.and_then(Value::as_object).cloned().unwrap_or_default();
    out.insert("cniVersion".into(), json!(version.as_str()));
    let mut interfaces = take_array(&mut out, "interfaces");
    // The host end: its MAC is the kernel's random one, which nothing needs.
    interfaces.push(json!({ "name": att.link }));
    let mut inside = json!({
        "name": att.ifname.as_deref().unwrap_or("eth0"),
        "mac": att.mac.to_string(),
        "sandbox": sandbox,
    });
    if version >= Version::V1_1_0 {
        inside["mtu"] = json!(att.mtu.unwrap_or(DEFAULT_MTU));
    }
    interfaces.push(inside);
    let index = interfaces.len() - 1;
    let mut ip = json!({
        "address": att.cidr,
        "gateway": att.gateway.to_string(),
        "interface": index,
    });
    if version == Version::V0_4_0 {
        ip["version"] = json!("4");
    }
    let mut ips = take_array(&mut out, "ips");
    ips.push(ip);
    let mut routes = take_array(&mut out, "routes");
    routes.push(json!({ "dst": "0.0.0.0/0", "gw": att.gateway.to_string() }));
    out.insert("interfaces".into(), Value::Array(interfaces));
    out.insert("ips".into(), Value::Array(ips));
    out.insert("routes".into(), Value::Array(routes));
    if let Some(dns) = dns {
        out.insert("dns".into(), dns.clone());
    }
    Value::Object(out)
}

/// A veth's MTU when the configuration sets none.
const DEFAULT_MTU: u32 = 1500;

fn take_array(obj: &mut Map<String, Value>, key: &str) -> Vec<Value> {
    match obj.remove(key) {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    }
}

/// VERSION's answer.
#[must_use]
pub(super) fn version_info(version: Option<&str>) -> Value {
    // The version asked for when we speak it, else the newest.
    let current = version
        .and_then(|v| Version::parse(v).ok())
        .unwrap_or(Version::V1_1_0);
    json!({
        "cniVersion": current.as_str(),
        "supportedVersions": super::config::SUPPORTED_VERSIONS,
    })
}

/// The spec's error object.
#[must_use]
pub(super) fn error(version: Option<&str>, err: &CniError) -> Value {
    let version = version
        .filter(|v| Version::parse(v).is_ok())
        .unwrap_or(Version::V1_1_0.as_str());
    let mut out = json!({
        "cniVersion": version,
        "code": err.code(),
        "msg": err.to_string(),
    });
    if let Some(details) = err.details() {
        out["details"] = json!(details);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::network::{EndpointKind, Mac};

    fn attachment() -> Attachment {
        let ip = Ipv4Addr::new(10, 10, 0, 7);
        Attachment {
            name: "cni-x".into(),
            kind: EndpointKind::Netns,
            link: "mpv-0a0a0007".into(),
            bridge: "micropod0".into(),
            ip,
            prefix: 24,
            cidr: "10.10.0.7/24".into(),
            gateway: Ipv4Addr::new(10, 10, 0, 1),
            mac: Mac::for_ip(ip),
            kernel_arg: String::new(),
            netns: None,
            ifname: Some("eth1".into()),
            mtu: None,
        }
    }

    #[test]
    fn results_follow_the_version_asked_for() {
        let r = add_result(Version::V0_4_0, &attachment(), "/proc/9/ns/net", None, None);
        assert_eq!(r["cniVersion"], "0.4.0");
        assert_eq!(r["ips"][0]["version"], "4");
        assert!(r["interfaces"][1].get("mtu").is_none());
        let r = add_result(Version::V1_0_0, &attachment(), "/proc/9/ns/net", None, None);
        assert!(r["ips"][0].get("version").is_none());
        assert!(r["interfaces"][1].get("mtu").is_none());
        let r = add_result(Version::V1_1_0, &attachment(), "/proc/9/ns/net", None, None);
        assert_eq!(r["interfaces"][1]["mtu"], 1500);
        assert_eq!(r["interfaces"][1]["sandbox"], "/proc/9/ns/net");
        assert_eq!(r["interfaces"][1]["name"], "eth1");
        assert_eq!(r["interfaces"][1]["mac"], "02:6d:0a:0a:00:07");
        assert_eq!(r["ips"][0]["interface"], 1);
        assert_eq!(r["ips"][0]["address"], "10.10.0.7/24");
        assert_eq!(r["routes"][0]["gw"], "10.10.0.1");
    }

    #[test]
    fn a_chained_result_keeps_what_came_before() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "lo", "sandbox": "/proc/9/ns/net"}],
            "ips": [{"address": "192.0.2.5/32", "interface": 0}],
            "dns": {"nameservers": ["192.0.2.53"]}
        });
        let r = add_result(
            Version::V1_0_0,
            &attachment(),
            "/proc/9/ns/net",
            None,
            Some(&prev),
        );
        assert_eq!(r["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(r["ips"][0]["address"], "192.0.2.5/32");
        assert_eq!(r["ips"][1]["interface"], 2);
        assert_eq!(r["dns"]["nameservers"][0], "192.0.2.53");
    }
}
