//! The CNI plugin driven the way libcni drives it (exec, `CNI_*` environment, configuration on
//! stdin, in the namespace where the bridge lives), through every verb and spec version: the
//! results, the chained case, each error code, DEL's idempotence, CHECK after tampering, GC
//! and STATUS. Each test builds its own lab of namespaces (see `NetLab`).

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use micropod_tests::{
    NsGuard, block_on,
    cniexec::{env, exec, exec_bin, lab_conf, result_ip, with_prev},
    netlab::{NetLab, SERVER_ADDR, UPLINK_ADDR, ip_json, ping, snapshot},
};
use serde_json::{Value, json};

const VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

fn path(ns: &NsGuard) -> String {
    ns.path().display().to_string()
}

/// The endpoint records of the lab's network, from `network ls --json`.
fn endpoints(lab: &NetLab) -> Vec<Value> {
    lab.json(["network", "ls", "--json"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The host ends of veths on the lab's bridge.
fn bridge_ports(lab: &NetLab) -> Vec<String> {
    ip_json(lab.host.path(), &["link", "show", "master", "micropod0"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_owned())
        .filter(|n| n.starts_with("mpv-"))
        .collect()
}

#[test]
fn version_lists_the_supported_versions_in_the_version_asked_for() {
    let lab = NetLab::new("cniver");
    for v in VERSIONS {
        let out = exec(
            &lab,
            &[("CNI_COMMAND", "VERSION")],
            &json!({ "cniVersion": v }),
        )
        .ok();
        assert_eq!(out["cniVersion"], v);
        assert_eq!(out["supportedVersions"], json!(VERSIONS));
    }
    // A version it does not speak: the answer is in the newest, and still lists them.
    let out = exec(
        &lab,
        &[("CNI_COMMAND", "VERSION")],
        &json!({ "cniVersion": "0.3.1" }),
    )
    .ok();
    assert_eq!(out["supportedVersions"], json!(VERSIONS));
}

#[test]
fn add_check_del_in_every_version_on_both_data_paths() {
    for datapath in ["ebpf", "netfilter"] {
        let lab = NetLab::new(&format!("cniadd-{datapath}"));
        for (n, v) in VERSIONS.iter().enumerate() {
            let ns = NsGuard::new("c");
            let id = format!("ctr-{datapath}-{n}");
            let conf = lab_conf(&lab, v, json!({ "datapath": datapath, "mtu": 1400 }));
            let result = exec(&lab, &env("ADD", &id, &path(&ns), "eth0"), &conf).ok();
            assert_eq!(result["cniVersion"], *v);
            let ifs = result["interfaces"].as_array().unwrap();
            assert_eq!(ifs.len(), 2, "{result}");
            assert!(ifs[0]["name"].as_str().unwrap().starts_with("mpv-"));
            assert_eq!(ifs[1]["name"], "eth0");
            assert_eq!(ifs[1]["sandbox"], path(&ns));
            let ip = &result["ips"][0];
            assert_eq!(ip["interface"], 1);
            assert_eq!(ip["gateway"], "10.10.0.1");
            assert_eq!(ip.get("version").is_some(), *v == "0.4.0", "{result}");
            assert_eq!(ifs[1].get("mtu").is_some(), *v == "1.1.0", "{result}");
            let addr = result_ip(&result);

            // What the result says is what the sandbox has.
            let inside = ip_json(ns.path(), &["addr", "show", "dev", "eth0"]);
            assert_eq!(inside[0]["address"], ifs[1]["mac"]);
            assert_eq!(inside[0]["mtu"], 1400);
            assert_eq!(inside[0]["addr_info"][0]["local"], addr.to_string());
            // It reaches the gateway and, through the NAT, the internet.
            assert!(ping(&ns, Ipv4Addr::new(10, 10, 0, 1)));
            let server = lab.internet.udp(SocketAddr::V4(SocketAddrV4::new(
                SERVER_ADDR,
                7100 + n as u16,
            )));
            server
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let client = ns.udp("0.0.0.0:0".parse().unwrap());
            client
                .send_to(b"cni", (SERVER_ADDR, 7100 + n as u16))
                .unwrap();
            let mut buf = [0u8; 8];
            let (_, peer) = server
                .recv_from(&mut buf)
                .expect("datagram through the NAT");
            assert_eq!(peer.ip(), UPLINK_ADDR);

            // Recorded under the attachment's key, next to VMs and hand-made endpoints.
            let eps = endpoints(&lab);
            let ep = eps
                .iter()
                .find(|e| e["cni"]["container_id"] == id.as_str())
                .unwrap_or_else(|| panic!("no endpoint of {id} in {eps:?}"));
            assert_eq!(ep["cni"]["network"], "mpt");
            assert_eq!(ep["cni"]["ifname"], "eth0");
            assert_eq!(ep["ip"], addr.to_string());

            let with = with_prev(&conf, &result);
            exec(&lab, &env("CHECK", &id, &path(&ns), "eth0"), &with).ok();
            exec(&lab, &env("DEL", &id, &path(&ns), "eth0"), &with).ok();
            // DEL twice, the second without the namespace or prevResult.
            exec(&lab, &env("DEL", &id, "", "eth0"), &conf).ok();
            assert!(
                endpoints(&lab)
                    .iter()
                    .all(|e| e["cni"]["container_id"] != id.as_str())
            );
            // A runtime must not CHECK after DEL; if one does, the container is unknown.
            exec(&lab, &env("CHECK", &id, &path(&ns), "eth0"), &with).err(3);
        }
        // DEL takes the host end off the bridge at once (the kernel deletes it later).
        assert_eq!(bridge_ports(&lab), Vec::<String>::new());
    }
}

#[test]
fn a_chained_add_appends_to_the_previous_result_and_keeps_dns() {
    let lab = NetLab::new("cnichain");
    let ns = NsGuard::new("c");
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{ "name": "lo", "sandbox": path(&ns) }],
        "ips": [{ "address": "192.0.2.9/32", "interface": 0 }],
    });
    let conf = with_prev(
        &lab_conf(
            &lab,
            "1.0.0",
            json!({ "dns": { "nameservers": ["192.0.2.53"], "search": ["lab"] } }),
        ),
        &prev,
    );
    let result = exec(&lab, &env("ADD", "chained", &path(&ns), "net1"), &conf).ok();
    assert_eq!(result["interfaces"][0]["name"], "lo");
    assert_eq!(result["interfaces"][2]["name"], "net1");
    assert_eq!(result["ips"][0]["address"], "192.0.2.9/32");
    assert_eq!(result["ips"][1]["interface"], 2);
    assert_eq!(result["dns"]["nameservers"][0], "192.0.2.53");
    let with = with_prev(&lab_conf(&lab, "1.0.0", json!({})), &result);
    exec(&lab, &env("CHECK", "chained", &path(&ns), "net1"), &with).ok();
    exec(&lab, &env("DEL", "chained", &path(&ns), "net1"), &with).ok();
}

#[test]
fn each_error_has_its_code_and_a_bad_request_changes_nothing() {
    let lab = NetLab::new("cnierr");
    let ns = NsGuard::new("c");
    let good = lab_conf(&lab, "1.0.0", json!({}));
    // The network is up (first ADD), so "nothing changed" has something to compare with.
    let first = exec(&lab, &env("ADD", "first", &path(&ns), "eth0"), &good).ok();
    // Its `up` started the TAP pool's refill: let it finish before taking the snapshot.
    lab.wait_pool(true);
    let before = (snapshot(lab.host.path()), lab.state_doc());
    let other = NsGuard::new("c2");
    let other_path = path(&other);
    let add = env("ADD", "second", &other_path, "eth0");

    let msg = exec(&lab, &add, &lab_conf(&lab, "0.3.1", json!({}))).err(1);
    assert!(msg.contains("0.3.1"), "{msg}");
    let msg = exec(
        &lab,
        &add,
        &lab_conf(&lab, "1.0.0", json!({ "ipam": { "type": "host-local" } })),
    )
    .err(2);
    assert!(msg.contains("ipam"), "{msg}");
    let msg = exec(&lab, &env("ADD", "second", "", "eth0"), &good).err(4);
    assert!(msg.contains("CNI_NETNS"), "{msg}");
    let msg = exec(&lab, &env("ADD", "-bad id", &path(&other), "eth0"), &good).err(4);
    assert!(msg.contains("CNI_CONTAINERID"), "{msg}");
    let msg = exec(
        &lab,
        &env("ADD", "second", "/proc/self/ns/nonexistent", "eth0"),
        &good,
    )
    .err(4);
    assert!(msg.contains("nonexistent"), "{msg}");
    exec(&lab, &[("CNI_COMMAND", "FROB")], &good).err(4);
    exec_bin(
        &lab,
        &micropod_tests::micropod_bin(),
        &add,
        b"{\"cniVersion\": \"1.0.0\", ",
    )
    .err(6);
    let msg = exec(
        &lab,
        &add,
        &lab_conf(&lab, "1.0.0", json!({ "subnet": "10.10.0.0/33" })),
    )
    .err(7);
    assert!(msg.contains("subnet") || msg.contains("CIDR"), "{msg}");
    // The network is up with other settings: refused, not changed under its endpoints.
    let msg = exec(
        &lab,
        &add,
        &lab_conf(&lab, "1.0.0", json!({ "subnet": "10.20.0.0/24" })),
    )
    .err(micropod::cni::codes::OTHER_SETTINGS.into());
    assert!(
        msg.contains("10.20.0.0/24") && msg.contains("10.10.0.0/24"),
        "{msg}"
    );
    // ADD of an attachment that exists.
    let msg = exec(&lab, &env("ADD", "first", &path(&ns), "eth0"), &good)
        .err(micropod::cni::codes::EXISTS.into());
    assert!(msg.contains("first"), "{msg}");
    // CHECK of a container never added.
    exec(
        &lab,
        &env("CHECK", "never", &path(&other), "eth0"),
        &with_prev(&good, &first),
    )
    .err(3);
    // STATUS and GC need a 1.1.0 configuration.
    exec(&lab, &[("CNI_COMMAND", "STATUS")], &good).err(1);
    // Stdin that cannot be read (a directory).
    let dir = std::fs::File::open("/").unwrap();
    micropod_tests::cniexec::exec_stdio(&lab, &add, std::process::Stdio::from(dir)).err(5);
    // Another command holds the state lock for longer than the configuration waits: try
    // again later.
    let held = {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(lab.dirs.state.join(micropod::state::LOCK_FILE))
            .unwrap();
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .unwrap()
    };
    let msg = exec(
        &lab,
        &add,
        &lab_conf(&lab, "1.0.0", json!({ "lockWaitSeconds": 0.2 })),
    )
    .err(11);
    assert!(msg.contains("try again"), "{msg}");
    drop(held);
    assert_eq!(
        before,
        (snapshot(lab.host.path()), lab.state_doc()),
        "a refused request changed something"
    );
}

#[test]
fn del_succeeds_when_the_namespace_is_gone_and_after_a_failed_add() {
    let lab = NetLab::new("cnidel");
    let conf = lab_conf(&lab, "1.0.0", json!({}));
    let ns = NsGuard::new("c");
    let id = "gone";
    exec(&lab, &env("ADD", id, &path(&ns), "eth0"), &conf).ok();
    drop(ns);
    // The runtime deleted the sandbox first, then sends DEL with an empty netns.
    exec(&lab, &env("DEL", id, "", "eth0"), &conf).ok();
    assert!(endpoints(&lab).is_empty());
    exec(&lab, &env("DEL", id, "", "eth0"), &conf).ok();

    // An ADD that fails (the sandbox already has an eth0) leaves nothing; DEL after it works.
    let ns = NsGuard::new("c");
    block_on(async {
        let nl = ns.netlink();
        micropod::net::veth::create(&nl, "eth0", "eth0peer", None)
            .await
            .unwrap();
    });
    let before = lab.state_doc();
    exec(&lab, &env("ADD", "taken", &path(&ns), "eth0"), &conf)
        .err(micropod::cni::codes::EXISTS.into());
    assert_eq!(lab.state_doc(), before, "the failed ADD left records");
    exec(&lab, &env("DEL", "taken", &path(&ns), "eth0"), &conf).ok();
    assert!(endpoints(&lab).is_empty());
    // DEL of a container on a network that was never brought up.
    let fresh = NetLab::new("cnidel2");
    exec(
        &fresh,
        &env("DEL", "x", "", "eth0"),
        &lab_conf(&fresh, "1.0.0", json!({})),
    )
    .ok();
}

#[test]
fn check_names_what_was_tampered_with() {
    let lab = NetLab::new("cnichk");
    let conf = lab_conf(&lab, "1.0.0", json!({ "datapath": "ebpf" }));
    let ns = NsGuard::new("c");
    let sandbox = path(&ns);
    let run = |verb| env(verb, "tamper", &sandbox, "eth0");
    let result = exec(&lab, &run("ADD"), &conf).ok();
    let with = with_prev(&conf, &result);
    exec(&lab, &run("CHECK"), &with).ok();
    let cidr = result["ips"][0]["address"].as_str().unwrap().to_owned();
    let ip = result_ip(&result);
    let host = result["interfaces"][0]["name"].as_str().unwrap().to_owned();

    // The address removed inside the sandbox.
    micropod_tests::netlab::query(ns.path(), "ip", &["addr", "del", &cidr, "dev", "eth0"]);
    let msg = exec(&lab, &run("CHECK"), &with).err(micropod::cni::codes::CHECK_FAILED.into());
    assert!(msg.contains(&cidr), "{msg}");
    micropod_tests::netlab::query(ns.path(), "ip", &["addr", "add", &cidr, "dev", "eth0"]);
    micropod_tests::netlab::query(
        ns.path(),
        "ip",
        &[
            "route",
            "replace",
            "default",
            "via",
            "10.10.0.1",
            "dev",
            "eth0",
        ],
    );
    exec(&lab, &run("CHECK"), &with).ok();

    // The endpoint's entry deleted from the eBPF endpoint map.
    let map = lab
        .dirs
        .pins
        .join("micropod")
        .join("maps")
        .join(micropod_common::ENDPOINTS_MAP);
    let mut endpoints: aya::maps::HashMap<_, micropod_common::Ipv4Key, micropod_common::Endpoint> =
        aya::maps::Map::HashMap(aya::maps::MapData::from_pin(&map).unwrap())
            .try_into()
            .unwrap();
    endpoints
        .remove(&micropod_common::Ipv4Key { addr: ip.octets() })
        .unwrap();
    let msg = exec(&lab, &run("CHECK"), &with).err(micropod::cni::codes::CHECK_FAILED.into());
    assert!(msg.contains("ENDPOINTS"), "{msg}");

    // The host end deleted (the sandbox's end goes with it).
    micropod_tests::netlab::query(lab.host.path(), "ip", &["link", "del", &host]);
    let msg = exec(&lab, &run("CHECK"), &with).err(micropod::cni::codes::CHECK_FAILED.into());
    assert!(
        msg.contains(&host) && msg.contains("eth0 is missing"),
        "{msg}"
    );
    exec(&lab, &run("DEL"), &with).ok();
    assert!(self::endpoints(&lab).is_empty());
}

#[test]
fn gc_releases_the_attachments_left_out_and_status_tells_exhaustion() {
    let lab = NetLab::new("cnigc");
    // A /29: six host addresses, one the gateway's, five for endpoints.
    let conf = lab_conf(&lab, "1.1.0", json!({ "subnet": "10.10.0.0/29" }));
    exec(&lab, &[("CNI_COMMAND", "STATUS")], &conf).ok();
    let spaces: Vec<NsGuard> = (0..5).map(|_| NsGuard::new("c")).collect();
    for (n, ns) in spaces.iter().enumerate() {
        exec(
            &lab,
            &env("ADD", &format!("c{n}"), &path(ns), "eth0"),
            &conf,
        )
        .ok();
    }
    let msg = exec(&lab, &[("CNI_COMMAND", "STATUS")], &conf).err(50);
    assert!(msg.contains("no free address"), "{msg}");
    let extra = NsGuard::new("c");
    exec(&lab, &env("ADD", "c5", &path(&extra), "eth0"), &conf)
        .err(micropod::cni::codes::NO_ADDRESS.into());

    let mut keep = conf.clone();
    keep["cni.dev/valid-attachments"] = json!([
        { "containerID": "c0", "ifname": "eth0" },
        { "containerID": "c3", "ifname": "eth0" },
    ]);
    exec(&lab, &[("CNI_COMMAND", "GC")], &keep).ok();
    let left = |lab: &NetLab| {
        let mut names: Vec<String> = endpoints(lab)
            .iter()
            .map(|e| {
                e["cni"]["container_id"]
                    .as_str()
                    .unwrap_or_else(|| e["name"].as_str().unwrap())
                    .to_owned()
            })
            .collect();
        names.sort();
        names
    };
    assert_eq!(left(&lab), ["c0", "c3"]);
    exec(&lab, &[("CNI_COMMAND", "STATUS")], &conf).ok();
    // An endpoint made by hand (or a VM's) is not GC's to release; the older spelling of
    // the list works too.
    let other = NsGuard::new("o");
    lab.attach_netns("handmade", &other, &[]);
    let mut keep = conf.clone();
    keep["cni.dev/attachments"] = json!([{ "containerID": "c3", "ifname": "eth0" }]);
    exec(&lab, &[("CNI_COMMAND", "GC")], &keep).ok();
    assert_eq!(left(&lab), ["c3", "handmade"]);
    // GC without a list is refused rather than taken as "release everything".
    exec(&lab, &[("CNI_COMMAND", "GC")], &conf).err(7);
    // The NAT table gone: existing containers have no way out (51).
    micropod_tests::netlab::query(
        lab.host.path(),
        "nft",
        &["delete", "table", "ip", "micropod_micropod0"],
    );
    let msg = exec(&lab, &[("CNI_COMMAND", "STATUS")], &conf).err(51);
    assert!(msg.contains("micropod_micropod0"), "{msg}");
}

#[test]
fn pods_carry_their_kubernetes_labels_and_a_range_bounds_their_addresses() {
    let lab = NetLab::new("cnipod");
    let conf = lab_conf(
        &lab,
        "1.0.0",
        json!({ "rangeStart": "10.10.0.100", "rangeEnd": "10.10.0.101" }),
    );
    let ns = NsGuard::new("c");
    let sandbox = path(&ns);
    let mut vars = env("ADD", "pod1", &sandbox, "eth0");
    vars.push((
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=pod1",
    ));
    let result = exec(&lab, &vars, &conf).ok();
    assert_eq!(result["ips"][0]["address"], "10.10.0.100/24");
    let eps = endpoints(&lab);
    assert_eq!(eps[0]["cni"]["pod_namespace"], "shop");
    assert_eq!(eps[0]["cni"]["pod_name"], "web-0");
    // Next to VMs in `stats` and the exporter, with the pod's labels.
    assert!(ping(&ns, Ipv4Addr::new(10, 10, 0, 1)));
    let stats = lab.json(["stats", "--json"]);
    let pod = &stats["endpoints"][0];
    assert_eq!(pod["cni"]["container_id"], "pod1");
    assert!(pod["tx_packets"].as_u64().unwrap() > 0, "{stats}");
    let scrape = lab.ok(["metrics", "print"]);
    assert!(
        scrape.lines().any(
            |l| l.starts_with("micropod_endpoint_transmit_packets_total{")
                && l.contains("container_id=\"pod1\"")
                && l.contains("pod_namespace=\"shop\"")
                && l.contains("pod=\"web-0\"")
        ),
        "{scrape}"
    );
    let ns2 = NsGuard::new("c");
    let result = exec(&lab, &env("ADD", "pod2", &path(&ns2), "eth0"), &conf).ok();
    assert_eq!(result["ips"][0]["address"], "10.10.0.101/24");
    let ns3 = NsGuard::new("c");
    exec(&lab, &env("ADD", "pod3", &path(&ns3), "eth0"), &conf)
        .err(micropod::cni::codes::NO_ADDRESS.into());
    // A VM (or any endpoint without the range) still gets the subnet's lowest address.
    let vm = NsGuard::new("v");
    let att = lab.attach_netns("vm-like", &vm, &[]);
    assert_eq!(att["ip"], "10.10.0.2");
}

/// Two "nodes", each a namespace where the plugin runs with its own node subnet of one
/// cluster range, on one underlay (the lab's "internet" namespace routes between them, as the
/// network of a cluster would; pod subnets are routed to their nodes, as a routing daemon
/// would set up). Pods reach each other with their own addresses — their traffic leaves by the
/// uplink, where the eBPF SNAT would otherwise translate it — and the internet through their
/// node's NAT, on both data paths.
#[test]
fn pods_on_two_nodes_reach_each_other_untranslated_and_the_internet_translated() {
    use std::{
        io::{Read as _, Write as _},
        net::{TcpListener, TcpStream},
    };

    use ipnetwork::{IpNetwork, Ipv4Network};
    use micropod::net::{addr, link, veth};
    use micropod_tests::{TestDirs, netlab::query};

    for (n, datapath) in ["ebpf", "netfilter"].into_iter().enumerate() {
        // Node A is the lab's host, its uplink to the underlay; node B has an uplink of its
        // own to it. Node A's default route (via the underlay) covers node B's pods.
        let lab = NetLab::new(&format!("cnimn-{datapath}"));
        let node_b = NsGuard::new("nodeb");
        let b_dirs = TestDirs::new("nodeb");
        let underlay = |last: u8| Ipv4Network::new(Ipv4Addr::new(192, 168, 77, last), 24).unwrap();
        block_on(async {
            let i = lab.internet.netlink();
            let b = node_b.netlink();
            veth::create(
                &i,
                "nodeb0",
                "eth0",
                Some(std::os::fd::AsFd::as_fd(node_b.ns())),
            )
            .await
            .unwrap();
            addr::add(&i, "nodeb0", IpNetwork::V4(underlay(1)))
                .await
                .unwrap();
            addr::add(&b, "eth0", IpNetwork::V4(underlay(2)))
                .await
                .unwrap();
            link::set_up(&i, "nodeb0").await.unwrap();
            link::set_up(&b, "eth0").await.unwrap();
        });
        query(
            node_b.path(),
            "ip",
            &["route", "add", "default", "via", "192.168.77.1"],
        );
        query(
            lab.internet.path(),
            "sysctl",
            &["-qw", "net.ipv4.ip_forward=1"],
        );
        query(
            lab.internet.path(),
            "ip",
            &["route", "add", "10.244.1.0/24", "via", &netlab_uplink()],
        );
        query(
            lab.internet.path(),
            "ip",
            &["route", "add", "10.244.2.0/24", "via", "192.168.77.2"],
        );
        let conf = |subnet: &str, state: &std::path::Path, pins: &std::path::Path| {
            json!({
                "cniVersion": "1.0.0",
                "name": "cluster",
                "type": "micropod",
                "bridge": "cni0",
                "subnet": subnet,
                "datapath": datapath,
                "noMasquerade": ["10.244.0.0/16"],
                "stateDir": state,
                "bpfDir": pins.join("micropod"),
            })
        };
        let conf_a = conf("10.244.1.0/24", &lab.dirs.state, &lab.dirs.pins);
        let conf_b = conf("10.244.2.0/24", &b_dirs.state, &b_dirs.pins);
        let pod_a = NsGuard::new("poda");
        let pod_b = NsGuard::new("podb");
        let (pa, pb) = (path(&pod_a), path(&pod_b));
        let ra = exec(&lab, &env("ADD", "pod-a", &pa, "eth0"), &conf_a).ok();
        let b_file = std::fs::File::open(node_b.path()).unwrap();
        let rb = micropod_tests::cniexec::exec_at(
            &b_file,
            &micropod_tests::micropod_bin(),
            &env("ADD", "pod-b", &pb, "eth0"),
            conf_b.to_string().as_bytes(),
        )
        .ok();
        let (ip_a, ip_b) = (result_ip(&ra), result_ip(&rb));
        // Pod A to pod B: the server sees pod A's own address.
        let port = 7200 + n as u16;
        let listener = pod_b.run(|| TcpListener::bind((ip_b, port))).unwrap();
        let mut stream = pod_a
            .run(|| TcpStream::connect_timeout(&(ip_b, port).into(), Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("{datapath}: pod A cannot reach pod B: {e}"));
        let (mut accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), ip_a, "{datapath}: pod B saw a translated source");
        accepted.write_all(b"from b").unwrap();
        let mut buf = [0u8; 6];
        stream.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"from b");
        // Pod A to the internet: translated to node A's uplink address.
        let server = lab
            .internet
            .run(|| TcpListener::bind((SERVER_ADDR, port)))
            .unwrap();
        let _out = pod_a
            .run(|| TcpStream::connect_timeout(&(SERVER_ADDR, port).into(), Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("{datapath}: pod A cannot reach the internet: {e}"));
        let (_, peer) = server.accept().unwrap();
        assert_eq!(
            peer.ip(),
            UPLINK_ADDR,
            "{datapath}: not translated to the node's address"
        );
        exec(&lab, &env("DEL", "pod-a", "", "eth0"), &conf_a).ok();
        drop(b_dirs);
    }
}

fn netlab_uplink() -> String {
    UPLINK_ADDR.to_string()
}

/// Entries of a pinned hash map of the lab's data path.
fn map_len(lab: &NetLab, name: &str) -> usize {
    let pin = lab.dirs.pins.join("micropod").join("maps").join(name);
    let data = aya::maps::MapData::from_pin(&pin).unwrap_or_else(|e| panic!("{name}: {e}"));
    let map: aya::maps::HashMap<_, [u8; 4], [u8; 16]> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
    map.keys().count()
}

#[test]
fn kill_9_at_every_step_of_add_and_del_then_gc_or_the_next_add_leaves_no_orphan() {
    use micropod_tests::cniexec::kill_at;
    let lab = NetLab::new("cnikill");
    let conf = lab_conf(&lab, "1.1.0", json!({ "datapath": "ebpf" }));
    let spaces: Vec<NsGuard> = (0..12).map(|_| NsGuard::new("k")).collect();
    let paths: Vec<String> = spaces.iter().map(path).collect();
    // The very first ADD brings the network up: killed there too.
    let steps = [
        ("up:recorded", "ADD"),
        ("up:made", "ADD"),
        ("attach:locked", "ADD"),
        ("attach:intent-recorded", "ADD"),
        ("attach:link-created", "ADD"),
        ("attach:configured", "ADD"),
        ("attach:recorded", "ADD"),
        ("detach:intent-recorded", "DEL"),
        ("detach:retired", "DEL"),
        ("detach:recorded", "DEL"),
    ];
    for (i, (point, verb)) in steps.into_iter().enumerate() {
        let id = format!("k{i}");
        let add = env("ADD", &id, &paths[i], "eth0");
        if point.starts_with("up:") {
            // Only an ADD that finds no network brings one up.
            lab.ok(["network", "down", "--force"]);
        }
        if verb == "DEL" {
            exec(&lab, &add, &conf).ok();
            kill_at(&lab, point, &env("DEL", &id, &paths[i], "eth0"), &conf);
        } else {
            kill_at(&lab, point, &add, &conf);
        }
        // Half the time the runtime does what the spec asks after a failed ADD, a DEL, and
        // tries again; the next command finishes or undoes what the dead one left. Then GC
        // with an empty list releases everything.
        if i % 2 == 0 && verb == "ADD" {
            exec(&lab, &env("DEL", &id, &paths[i], "eth0"), &conf).ok();
            exec(&lab, &add, &conf).ok();
        }
        let mut gc = conf.clone();
        gc["cni.dev/valid-attachments"] = json!([]);
        exec(&lab, &[("CNI_COMMAND", "GC")], &gc).ok();
        assert_eq!(endpoints(&lab), Vec::<Value>::new(), "{point}");
        assert_eq!(bridge_ports(&lab), Vec::<String>::new(), "{point}");
        let links = ip_json(lab.host.path(), &["link", "show"]);
        let orphans: Vec<&str> = links
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l["ifname"].as_str())
            .filter(|n| n.starts_with("mpv-") || n.starts_with("mpr"))
            .collect();
        assert!(orphans.is_empty(), "{point}: links left {orphans:?}");
        let status = lab.json(["network", "status", "--json"]);
        assert_eq!(status["network"]["ipam"]["used"], 0, "{point}");
        // A cleared intent is a slot of blanks.
        for slot in [
            micropod::network::ATTACH_INTENT,
            micropod::network::DETACH_INTENT,
        ] {
            let text = std::fs::read(lab.dirs.state.join(slot)).unwrap_or_default();
            assert!(
                text.iter().all(u8::is_ascii_whitespace),
                "{point}: {slot} holds {}",
                String::from_utf8_lossy(&text)
            );
        }
        assert_eq!(map_len(&lab, micropod_common::ENDPOINTS_MAP), 0, "{point}");
        assert_eq!(map_len(&lab, micropod_common::PORTS_MAP), 0, "{point}");
        // Nothing is left in the sandbox either.
        let inside = ip_json(spaces[i].path(), &["link", "show"]);
        assert!(
            inside
                .as_array()
                .unwrap()
                .iter()
                .all(|l| l["ifname"] == "lo"),
            "{point}: {inside}"
        );
    }
}

/// On a node where only the plugin brings the network up, the first ADD of an upgraded
/// micropod (pins of another data path layout) upgrades the data path in place and attaches;
/// the container attached before keeps its entries.
#[test]
fn the_first_add_of_another_layout_upgrades_the_data_path_in_place() {
    let lab = NetLab::new("cnilayout");
    let conf = lab_conf(&lab, "1.0.0", json!({ "datapath": "ebpf" }));
    let (old, new) = (NsGuard::new("old"), NsGuard::new("new"));
    let old_path = path(&old);
    let mut vars = env("ADD", "old", &old_path, "eth0");
    // The micropod of before: another layout.
    vars.push((micropod::datapath::LAYOUT_ENV, "7"));
    exec(&lab, &vars, &conf).ok();
    let layout = |lab: &NetLab| -> Vec<String> {
        std::fs::read_dir(lab.dirs.pins.join("micropod"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("layout-"))
            .collect()
    };
    assert_eq!(layout(&lab), ["layout-7"]);
    let result = exec(&lab, &env("ADD", "new", &path(&new), "eth0"), &conf).ok();
    assert_eq!(
        layout(&lab),
        [format!("layout-{}", micropod_common::DATAPATH_LAYOUT)]
    );
    let ip = result["ips"][0]["address"].as_str().unwrap().to_owned();
    assert!(ping(&new, Ipv4Addr::new(10, 10, 0, 1)), "{ip}");
    assert!(ping(&old, Ipv4Addr::new(10, 10, 0, 1)));
    let stats = lab.json(["stats", "--json"]);
    assert_eq!(stats["endpoints"].as_array().unwrap().len(), 2, "{stats}");
    assert!(
        stats["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["tx_packets"].as_u64().unwrap_or(0) > 0),
        "{stats}"
    );
}

#[test]
fn cni_install_puts_the_plugin_and_an_example_where_runtimes_look() {
    let lab = NetLab::new("cniinst");
    let root = lab.dirs.state.join("install");
    let (bin, conf) = (root.join("bin"), root.join("net.d"));
    let install = |force: bool| {
        let mut args = vec![
            "cni".to_owned(),
            "install".to_owned(),
            "--bin-dir".to_owned(),
            bin.display().to_string(),
            "--conf-dir".to_owned(),
            conf.display().to_string(),
            "--json".to_owned(),
        ];
        if force {
            args.push("--force".to_owned());
        }
        lab.json(&args)
    };
    let done = install(false);
    let plugin = bin.join("micropod");
    let conflist = conf.join(micropod::cni::EXAMPLE_CONFLIST);
    assert_eq!(done["plugin"], plugin.display().to_string());
    assert_eq!(done["conflist"], conflist.display().to_string());
    assert_eq!(
        std::fs::read(&plugin).unwrap(),
        std::fs::read(micropod_tests::micropod_bin()).unwrap(),
        "the plugin is the micropod binary"
    );
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
    assert_eq!(written, micropod::cni::example_conflist());
    assert_eq!(written["plugins"][0]["type"], "micropod");
    // The installed plugin answers as a plugin (VERSION in the list's version).
    let out = exec_bin(
        &lab,
        &plugin,
        &[("CNI_COMMAND", "VERSION")],
        json!({ "cniVersion": written["cniVersion"] })
            .to_string()
            .as_bytes(),
    )
    .ok();
    assert_eq!(out["cniVersion"], written["cniVersion"]);
    // An edited configuration is kept, unless --force.
    std::fs::write(&conflist, "{}").unwrap();
    assert!(install(false)["conflist"].is_null());
    assert_eq!(std::fs::read_to_string(&conflist).unwrap(), "{}");
    install(true);
    assert_ne!(std::fs::read_to_string(&conflist).unwrap(), "{}");
}

/// `ipMasq: false`: nothing is translated, on either data path (an LPM prefix /0 in the eBPF
/// map, an accept for every destination in nftables): the server sees the pod's own address.
#[test]
fn ip_masq_false_leaves_every_destination_untranslated() {
    for (n, datapath) in ["ebpf", "netfilter"].into_iter().enumerate() {
        let lab = NetLab::new(&format!("cninomasq-{datapath}"));
        let conf = lab_conf(
            &lab,
            "1.0.0",
            json!({ "datapath": datapath, "ipMasq": false }),
        );
        let ns = NsGuard::new("c");
        let result = exec(&lab, &env("ADD", "plain", &path(&ns), "eth0"), &conf).ok();
        let ip = result_ip(&result).to_string();
        let port = 7300 + n as u16;
        let server = lab
            .internet
            .udp(SocketAddr::V4(SocketAddrV4::new(SERVER_ADDR, port)));
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let client = ns.udp("0.0.0.0:0".parse().unwrap());
        client.send_to(b"plain", (SERVER_ADDR, port)).unwrap();
        let mut buf = [0u8; 8];
        let (_, peer) = server.recv_from(&mut buf).expect("datagram at the server");
        assert_eq!(
            peer.ip().to_string(),
            ip,
            "{datapath}: the source was translated"
        );
    }
}
