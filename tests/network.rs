//! The network control plane against the kernel: `micropod network …` runs as a process inside
//! a lab's "host" namespace; results are read back with iproute2/nft (an independent reading
//! of netlink) and with real traffic.

use std::{
    collections::HashSet,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
    time::Duration,
};

use micropod::net::tap::Tap;
use micropod_tests::{
    NsGuard,
    netlab::{
        NetLab, SERVER_ADDR, UPLINK, UPLINK_ADDR, as_nobody, ip_json, ping, query, snapshot,
        tc_bpf_filters,
    },
    packets,
};
use serde_json::Value;

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);

/// Waits (up to ~2 s) until the background reaper has deleted every retired link on record,
/// then checks that the kernel agrees: no `mpr…` link is left.
#[track_caller]
fn wait_reaped(lab: &NetLab) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let status = lab.json(["network", "status", "--json"]);
        let pending = status["network"]["retired_links"]
            .as_u64()
            .expect("retired_links");
        if pending == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{pending} retired link(s) still on record after 2 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        retired_links(lab),
        Vec::<String>::new(),
        "retired links left"
    );
}

/// The `mpr…` links of the lab's host namespace.
fn retired_links(lab: &NetLab) -> Vec<String> {
    links_named(lab, |n| micropod::network::retired_link(n).is_some())
}

/// The links of the lab's host namespace whose name `recognised` accepts (read with `ip`).
fn links_named(lab: &NetLab, recognised: impl Fn(&str) -> bool) -> Vec<String> {
    ip_json(lab.host.path(), &["link", "show"])
        .as_array()
        .expect("link list")
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| recognised(n))
        .map(str::to_owned)
        .collect()
}

/// Holds the lock file `name` of the lab's state dir (waiting for a running holder to finish),
/// so that the job it belongs to (the reaper, the pool refill) does not run until it is
/// dropped.
fn hold_lock(lab: &NetLab, name: &str) -> nix::fcntl::Flock<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lab.dirs.state.join(name))
        .expect("opening the lock file");
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("taking the lock")
}

fn link<'a>(links: &'a Value, name: &str) -> Option<&'a Value> {
    links
        .as_array()
        .expect("link list")
        .iter()
        .find(|l| l["ifname"] == name)
}

fn addrs_of(ns: &std::path::Path, dev: &str) -> Vec<String> {
    ip_json(ns, &["-4", "addr", "show"])
        .as_array()
        .expect("addr list")
        .iter()
        .filter(|a| a["ifname"] == dev)
        .flat_map(|a| a["addr_info"].as_array().cloned().unwrap_or_default())
        .map(|i| format!("{}/{}", i["local"].as_str().unwrap(), i["prefixlen"]))
        .collect()
}

#[test]
fn up_creates_bridge_gateway_forwarding_and_masquerade() {
    let lab = NetLab::new("up");
    let status = lab.json(["network", "up", "--json"]);
    assert_eq!(status["outcome"], "created");
    lab.wait_pool(true);
    assert_eq!(
        status["network"]["uplink"], UPLINK,
        "auto picks the default route's device"
    );
    assert_eq!(status["network"]["datapath"], "ebpf");

    let host = lab.host.path();
    let links = ip_json(host, &["-d", "link", "show"]);
    let bridge = link(&links, "micropod0").expect("bridge exists");
    assert_eq!(bridge["linkinfo"]["info_kind"], "bridge");
    assert_eq!(
        bridge["address"], "02:6d:0a:0a:00:01",
        "fixed MAC from the gateway"
    );
    assert!(
        bridge["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "UP")
    );
    assert_eq!(addrs_of(host, "micropod0"), ["10.10.0.1/24"]);
    assert_eq!(
        query(host, "cat", &["/proc/sys/net/ipv4/ip_forward"]).trim(),
        "1"
    );
    let rules = query(host, "nft", &["list", "ruleset"]);
    assert!(
        rules.contains("ip saddr 10.10.0.0/24 oifname != \"micropod0\"")
            && rules.contains("masquerade"),
        "{rules}"
    );

    // A second identical `up` changes nothing.
    let before = snapshot(host);
    let again = lab.json(["network", "up", "--json"]);
    assert_eq!(again["outcome"], "unchanged");
    assert_eq!(snapshot(host), before);

    // `up` repairs what went missing: the bridge deleted behind micropod's back (it comes
    // back with a new ifindex, so compare without them).
    query(host, "ip", &["link", "del", "micropod0"]);
    lab.up(&[]);
    let strip = |s: String| {
        s.lines()
            .map(|l| {
                l.split(' ')
                    .filter(|w| !w.starts_with("index="))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(snapshot(host)), strip(before));
}

#[test]
fn netns_endpoint_is_wired_and_reaches_gateway_and_internet_through_masquerade() {
    let lab = NetLab::new("nsep");
    lab.up(&[]);
    let ep = NsGuard::new("ep");
    let att = lab.attach_netns("web", &ep, &[]);
    assert_eq!(
        att["ip"], "10.10.0.2",
        "first free address after the gateway"
    );
    assert_eq!(att["mac"], "02:6d:0a:0a:00:02");
    assert_eq!(att["gateway"], "10.10.0.1");
    assert_eq!(
        att["kernel_arg"],
        "ip=10.10.0.2::10.10.0.1:255.255.255.0::eth0:off"
    );
    let host_end = att["link"].as_str().unwrap().to_owned();

    // Host side: the veth end is a port of the bridge, up.
    let links = ip_json(lab.host.path(), &["-d", "link", "show"]);
    let port = link(&links, &host_end).expect("host end exists");
    assert_eq!(port["master"], "micropod0");
    assert_eq!(port["linkinfo"]["info_kind"], "veth");
    // Inside: eth0 with the MAC, the address and a default route via the gateway.
    let inside = ip_json(ep.path(), &["-d", "link", "show"]);
    let eth0 = link(&inside, "eth0").expect("eth0 inside the namespace");
    assert_eq!(eth0["address"], "02:6d:0a:0a:00:02");
    assert_eq!(addrs_of(ep.path(), "eth0"), ["10.10.0.2/24"]);
    let routes = ip_json(ep.path(), &["-4", "route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], "10.10.0.1");
    assert_eq!(routes[0]["dev"], "eth0");

    // Traffic: the gateway answers pings; a server in the internet sees the uplink address.
    assert!(ping(&ep, GATEWAY), "no echo reply from the gateway");
    assert!(
        ping(&ep, SERVER_ADDR),
        "no echo reply from the internet server"
    );
    let server = lab
        .internet
        .udp(SocketAddr::V4(SocketAddrV4::new(SERVER_ADDR, 7000)));
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let client = ep.udp("0.0.0.0:0".parse().unwrap());
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.send_to(b"hello", (SERVER_ADDR, 7000)).unwrap();
    let mut buf = [0u8; 64];
    let (n, peer) = server.recv_from(&mut buf).expect("datagram at the server");
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(peer.ip(), UPLINK_ADDR, "MASQUERADE rewrote the source");
    server.send_to(b"back", peer).unwrap();
    let (n, _) = client.recv_from(&mut buf).expect("reply through the NAT");
    assert_eq!(&buf[..n], b"back");
    // TCP too.
    let listener = lab
        .internet
        .run(|| TcpListener::bind((SERVER_ADDR, 7001)))
        .unwrap();
    let mut stream = ep
        .run(|| TcpStream::connect_timeout(&(SERVER_ADDR, 7001).into(), Duration::from_secs(5)))
        .expect("TCP connect through the NAT");
    let (mut accepted, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), UPLINK_ADDR);
    accepted.write_all(b"pong").unwrap();
    let mut got = [0u8; 4];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");

    // Detach takes the host end off the bridge at once, releases the address for the next
    // endpoint, and the reaper deletes both ends soon after.
    lab.ok(["network", "detach", "web"]);
    let links = ip_json(lab.host.path(), &["link", "show"]);
    assert!(link(&links, &host_end).is_none(), "host end still there");
    wait_reaped(&lab);
    assert!(link(&ip_json(ep.path(), &["link", "show"]), "eth0").is_none());
    let ep2 = NsGuard::new("ep2");
    assert_eq!(lab.attach_netns("web2", &ep2, &[])["ip"], "10.10.0.2");
}

/// Every bridge port micropod makes (a pooled TAP, a TAP made by the attach, a veth's host end,
/// on both data paths) has IPv6 off: no link-local address, nothing the host would send into
/// the endpoint (router solicitations, MLD, DAD). The endpoint itself still talks.
#[test]
fn bridge_ports_have_ipv6_off() {
    for (datapath, pool) in [("ebpf", "16"), ("netfilter", "0")] {
        let lab = NetLab::new(&format!("v6-{datapath}"));
        lab.up(&["--datapath", datapath, "--pool", pool]);
        let ns = NsGuard::new(&format!("v6-{datapath}-ep"));
        let tap = lab.json(["network", "attach", "vm1", "--kind", "tap", "--json"]);
        let veth = lab.attach_netns("ep", &ns, &[]);
        for att in [&tap, &veth] {
            let port = att["link"].as_str().unwrap().to_owned();
            let off = lab
                .host
                .run(|| {
                    std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{port}/disable_ipv6"))
                })
                .unwrap();
            assert_eq!(off.trim(), "1", "{datapath}: IPv6 on {port}");
            let addrs = ip_json(lab.host.path(), &["-6", "addr", "show", "dev", &port]);
            let none = addrs
                .as_array()
                .unwrap()
                .iter()
                .all(|a| a["addr_info"].as_array().is_none_or(Vec::is_empty));
            assert!(none, "{datapath}: {port} has IPv6 addresses: {addrs}");
        }
        assert!(
            ping(&ns, GATEWAY),
            "{datapath}: the endpoint still reaches the gateway"
        );
    }
}

/// A netns endpoint's interface gets no IPv6 address of its own (the network is IPv4): the
/// kernel makes no link-local address, so the endpoint sends no DAD, MLD or RS frames for the
/// bridge to flood to every port. IPv6 set up by hand still works.
#[test]
fn netns_endpoints_get_no_ipv6_link_local_address() {
    for datapath in ["ebpf", "netfilter"] {
        let lab = NetLab::new(&format!("ll-{datapath}"));
        lab.up(&["--datapath", datapath, "--pool", "0"]);
        let ns = NsGuard::new(&format!("ll-{datapath}-ep"));
        lab.attach_netns("ep", &ns, &[]);
        // The link is up and has its carrier (the kernel would have made the address by now).
        assert!(
            ping(&ns, GATEWAY),
            "{datapath}: the endpoint reaches the gateway"
        );
        let eth0 = &ip_json(ns.path(), &["-d", "link", "show", "dev", "eth0"])[0];
        assert_eq!(
            eth0["inet6_addr_gen_mode"], "none",
            "{datapath}: eth0 inside: {eth0}"
        );
        let v6 = |ns: &NsGuard| -> Vec<String> {
            ip_json(ns.path(), &["-6", "addr", "show", "dev", "eth0"])
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|a| a["addr_info"].as_array().cloned().unwrap_or_default())
                .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
                .collect()
        };
        assert_eq!(v6(&ns), Vec::<String>::new(), "{datapath}: IPv6 on eth0");
        query(
            ns.path(),
            "ip",
            &["-6", "addr", "add", "fd00:6d::2/64", "dev", "eth0", "nodad"],
        );
        assert_eq!(
            v6(&ns),
            vec!["fd00:6d::2/64".to_owned()],
            "{datapath}: an IPv6 address added by hand"
        );
    }
}

#[test]
fn tap_endpoint_answers_arp_and_ping_on_its_fd() {
    let lab = NetLab::new("tap");
    lab.up(&[]);
    let att = lab.json(["network", "attach", "vm1", "--kind", "tap", "--json"]);
    let tap_name = att["link"].as_str().unwrap().to_owned();
    assert!(tap_name.len() <= 15);
    let vm_ip: Ipv4Addr = att["ip"].as_str().unwrap().parse().unwrap();
    let vm_mac = micropod::network::Mac::for_ip(vm_ip).0;
    assert_eq!(
        att["mac"],
        micropod::network::Mac::for_ip(vm_ip).to_string()
    );

    let links = ip_json(lab.host.path(), &["-d", "link", "show"]);
    let tap = link(&links, &tap_name).expect("tap exists");
    assert_eq!(tap["master"], "micropod0");
    assert_eq!(tap["linkinfo"]["info_kind"], "tun");
    assert!(tap["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    assert_ne!(
        tap["address"], att["mac"],
        "the TAP must not share the guest's MAC"
    );

    // Be the VM: open the persistent TAP as a VMM would, resolve the gateway, ping it.
    let found = lab.host.run(|| {
        let tap = Tap::open(&tap_name).expect("opening the TAP");
        let mut buf = [0u8; 2048];
        let mut gateway_mac = None;
        for _ in 0..20 {
            tap.send(&packets::arp_request(vm_mac, vm_ip, GATEWAY))
                .unwrap();
            while let Some(n) = tap.recv(&mut buf, Duration::from_millis(200)).unwrap() {
                if let Some((mac, ip, target_mac, target_ip)) = packets::parse_arp_reply(&buf[..n])
                    && ip == GATEWAY
                {
                    assert_eq!((target_mac, target_ip), (vm_mac, vm_ip));
                    gateway_mac = Some(mac);
                }
            }
            if gateway_mac.is_some() {
                break;
            }
        }
        let gateway_mac = gateway_mac.expect("ARP reply from the gateway");
        assert_eq!(gateway_mac, [0x02, 0x6d, 10, 10, 0, 1]);
        let icmp = packets::icmp_echo(8, 0x4d50, 1, b"from the vm");
        let frame = packets::ethernet(
            gateway_mac,
            vm_mac,
            packets::ETH_P_IP,
            &packets::ipv4(vm_ip, GATEWAY, 1, &icmp),
        );
        for _ in 0..20 {
            tap.send(&frame).unwrap();
            while let Some(n) = tap.recv(&mut buf, Duration::from_millis(200)).unwrap() {
                if let Some(reply) = packets::parse_icmp_echo_reply(&buf[..n]) {
                    return Some(reply);
                }
            }
        }
        None
    });
    let (dst_mac, src, dst, id, seq) = found.expect("echo reply read back from the TAP");
    assert_eq!(
        (dst_mac, src, dst, id, seq),
        (vm_mac, GATEWAY, vm_ip, 0x4d50, 1)
    );

    lab.ok(["network", "detach", "vm1"]);
    assert!(link(&ip_json(lab.host.path(), &["link", "show"]), &tap_name).is_none());
}

#[test]
fn up_refuses_other_settings_while_endpoints_exist_and_down_needs_force() {
    let lab = NetLab::new("reconf");
    lab.up(&[]);
    let ep = NsGuard::new("ep");
    lab.attach_netns("a", &ep, &[]);
    let before = snapshot(lab.host.path());
    let out = lab.run(["network", "up", "--subnet", "10.20.0.0/24"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 endpoint(s) use it"), "{err}");
    assert_eq!(snapshot(lab.host.path()), before);

    let out = lab.run(["network", "down"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("still attached (a)"));
    assert_eq!(snapshot(lab.host.path()), before);

    lab.ok(["network", "down", "--force"]);
    assert!(link(&ip_json(ep.path(), &["link", "show"]), "eth0").is_none());

    // Without endpoints, new settings replace the old network...
    lab.up(&[]);
    let status = lab.json(["network", "up", "--subnet", "10.20.0.0/24", "--json"]);
    assert_eq!(status["outcome"], "replaced");
    lab.wait_pool(true);
    assert_eq!(addrs_of(lab.host.path(), "micropod0"), ["10.20.0.1/24"]);
    // ...even by one that contains the old subnet (the old bridge's route is not an overlap)...
    let status = lab.json(["network", "up", "--subnet", "10.20.0.0/16", "--json"]);
    assert_eq!(status["outcome"], "replaced");
    lab.wait_pool(true);
    assert_eq!(addrs_of(lab.host.path(), "micropod0"), ["10.20.0.1/16"]);
    // ...but a replacement that is refused leaves the old network as it was.
    let before = snapshot(lab.host.path());
    refused(
        &lab,
        &["network", "up", "--subnet", "203.0.113.0/25"],
        "overlaps address 203.0.113.1/24 on uplink0",
    );
    assert_eq!(snapshot(lab.host.path()), before);
}

#[test]
fn status_and_ls_report_endpoints() {
    let lab = NetLab::new("status");
    let down = lab.json(["network", "status", "--json"]);
    assert_eq!(down["up"], false);
    lab.up(&["--subnet", "10.10.0.0/29"]);
    let ep = NsGuard::new("ep");
    lab.attach_netns("c1", &ep, &["--ip", "10.10.0.5"]);
    lab.ok(["network", "attach", "vm", "--kind", "tap"]);
    let status = lab.json(["network", "status", "--json"]);
    let n = &status["network"];
    assert_eq!(n["bridge"], "micropod0");
    assert_eq!(n["subnet"], "10.10.0.0/29");
    assert_eq!(n["gateway"], "10.10.0.1");
    assert_eq!(n["bridge_present"], true);
    assert_eq!(n["ipam"]["capacity"], 5);
    assert_eq!(n["ipam"]["used"], 2);
    let ls = lab.json(["network", "ls", "--json"]);
    let names: Vec<_> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].clone())
        .collect();
    assert_eq!(names, ["c1", "vm"]);
    assert_eq!(ls[0]["ip"], "10.10.0.5");
    assert_eq!(ls[1]["ip"], "10.10.0.2");
}

#[test]
fn state_and_pin_dirs_come_from_the_environment_and_down_removes_the_pins() {
    let lab = NetLab::new("env");
    let state = lab.dirs.state.join("from-env");
    let pins = lab.dirs.pins.join("from-env");
    // Something micropod pinned (bpffs holds only directories and BPF objects).
    std::fs::create_dir_all(pins.join("links")).unwrap();
    let run = |args: &[&str]| {
        let out = lab
            .micropod_bare(args)
            .env("MICROPOD_STATE_DIR", &state)
            .env("MICROPOD_BPF_DIR", &pins)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["network", "up"]);
    assert!(
        state.join(micropod::network::STATE_DOC).is_file(),
        "state not under MICROPOD_STATE_DIR"
    );
    assert_eq!(
        lab.state_doc(),
        None,
        "the flag-less run used the lab's other dir"
    );
    let status: Value = serde_json::from_str(&run(&["network", "status", "--json"])).unwrap();
    assert_eq!(status["state_dir"], state.to_str().unwrap());
    assert_eq!(status["bpf_dir"], pins.to_str().unwrap());
    run(&["network", "down"]);
    assert!(!pins.exists(), "down left the pin dir");
    assert!(!state.join(micropod::network::STATE_DOC).exists());
}

#[test]
fn gc_releases_endpoints_whose_netns_or_link_is_gone() {
    let lab = NetLab::new("gc");
    lab.up(&[]);
    let gone = NsGuard::new("gone");
    let kept = NsGuard::new("kept");
    lab.attach_netns("gone", &gone, &[]);
    lab.attach_netns("kept", &kept, &[]);
    let vm = lab.json(["network", "attach", "vm", "--kind", "tap", "--json"]);
    drop(gone); // the namespace dies, and the veth with it
    query(
        lab.host.path(),
        "ip",
        &["link", "del", vm["link"].as_str().unwrap()],
    );
    let released = lab.json(["gc", "--json"]);
    let mut names: Vec<_> = released
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["gone", "vm"], "{released}");
    let ls = lab.json(["network", "ls", "--json"]);
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(ls[0]["name"], "kept");
    // Their addresses are free again: the next two attaches reuse them.
    let again = NsGuard::new("again");
    assert_eq!(lab.attach_netns("again", &again, &[])["ip"], "10.10.0.2");
    assert_eq!(lab.json(["gc", "--json"]), serde_json::json!([]));
}

/// Starts every command before waiting for any; each must succeed. Returns their outputs.
#[track_caller]
fn all_at_once(commands: Vec<std::process::Command>) -> Vec<std::process::Output> {
    #[expect(
        clippy::needless_collect,
        reason = "every command starts before the first wait"
    )]
    let children: Vec<_> = commands
        .into_iter()
        .map(|mut cmd| {
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            cmd.spawn().expect("spawning micropod")
        })
        .collect();
    children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            out
        })
        .collect()
}

#[test]
fn parallel_attaches_get_distinct_addresses() {
    const N: usize = 64;
    let lab = NetLab::new("par");
    lab.up(&[]);
    let namespaces: Vec<NsGuard> = (0..N).map(|i| NsGuard::new(&format!("p{i}"))).collect();
    let commands: Vec<_> = namespaces
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let mut cmd = lab.micropod([
                "network",
                "attach",
                &format!("ep{i}"),
                "--kind",
                "netns",
                "--json",
            ]);
            cmd.arg("--netns").arg(ns.path());
            cmd
        })
        .collect();
    let mut ips = HashSet::new();
    for out in all_at_once(commands) {
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            ips.insert(v["ip"].as_str().unwrap().to_owned()),
            "duplicate {}",
            v["ip"]
        );
    }
    assert_eq!(ips.len(), N);
    // And the kernel agrees: each namespace holds the address its attach printed.
    let inside: HashSet<String> = namespaces
        .iter()
        .map(|ns| {
            addrs_of(ns.path(), "eth0")[0]
                .trim_end_matches("/24")
                .to_owned()
        })
        .collect();
    assert_eq!(inside, ips);
    let status = lab.json(["network", "status", "--json"]);
    assert_eq!(status["network"]["ipam"]["used"], N);
}

#[test]
fn kill_9_during_attach_then_gc_leaves_no_orphans() {
    let lab = NetLab::new("kill");
    lab.up(&[]);
    // How long one attach takes here, so the kills can be spread over its whole length.
    let probe = NsGuard::new("probe");
    let started = std::time::Instant::now();
    lab.attach_netns("probe", &probe, &[]);
    let one = started.elapsed();
    lab.ok(["network", "detach", "probe"]);

    const RUNS: u32 = 30;
    let mut killed_mid_way = 0;
    let namespaces: Vec<NsGuard> = (0..RUNS).map(|i| NsGuard::new(&format!("k{i}"))).collect();
    for (i, ns) in (0..RUNS).zip(&namespaces) {
        let mut cmd = lab.micropod(["network", "attach", &format!("k{i}"), "--kind"]);
        cmd.arg(if i % 3 == 0 { "tap" } else { "netns" });
        if i % 3 != 0 {
            cmd.arg("--netns").arg(ns.path());
        }
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().unwrap();
        // From right after the fork to just past the end of a whole attach.
        std::thread::sleep(one * 6 / 5 * i / RUNS);
        child.kill().unwrap(); // SIGKILL, our own child, by PID
        if !child.wait().unwrap().success() {
            killed_mid_way += 1;
        }
    }
    eprintln!("one attach took {one:?}; {killed_mid_way} of {RUNS} attaches were killed");
    assert!(
        killed_mid_way > 0,
        "no attach was interrupted; the test proved nothing"
    );

    let _ = lab.json(["gc", "--json"]);
    let records = assert_consistent(&lab, &namespaces);
    // And everything detaches cleanly.
    for r in &records {
        lab.ok(["network", "detach", r["name"].as_str().unwrap()]);
    }
    lab.ok(["network", "down"]);
}

/// After a gc: every record is whole (its link exists and is a port of the bridge, its address
/// is held) and nothing exists without a record (no micropod-named link, no address in an
/// endpoint namespace). Returns the records.
#[track_caller]
/// The eBPF data plane knows exactly the recorded endpoints: micropod's ingress and egress
/// filter on every recorded port (and no link pins for ports), and one ENDPOINTS entry per
/// address.
fn assert_datapath_matches(lab: &NetLab, records: &[Value]) {
    let pins = lab.dirs.pins.join("micropod");
    let port_pins: Vec<String> = std::fs::read_dir(pins.join("links"))
        .expect("link pins")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("mpt-") || n.starts_with("mpv-"))
        .collect();
    assert_eq!(port_pins, Vec::<String>::new(), "ports pin no links");
    for r in records {
        let link = r["link"].as_str().unwrap();
        assert_eq!(
            (
                tc_bpf_filters(lab.host.path(), link, "ingress"),
                tc_bpf_filters(lab.host.path(), link, "egress")
            ),
            (
                vec!["port_ingress@1/0x6d70".to_owned()],
                vec!["port_egress@1/0x6d70".to_owned()]
            ),
            "the programs on {link}"
        );
    }
    let map = aya::maps::MapData::from_pin(pins.join("maps").join(micropod_common::ENDPOINTS_MAP))
        .expect("ENDPOINTS pin");
    let map: aya::maps::HashMap<_, micropod_common::Ipv4Key, micropod_common::Endpoint> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).expect("ENDPOINTS map");
    let mut in_map: Vec<String> = map
        .keys()
        .map(|k| Ipv4Addr::from(k.unwrap().addr).to_string())
        .collect();
    in_map.sort();
    let mut recorded: Vec<String> = records
        .iter()
        .map(|r| r["ip"].as_str().unwrap().to_owned())
        .collect();
    recorded.sort();
    assert_eq!(in_map, recorded, "ENDPOINTS entries match the records");
}

fn assert_consistent(lab: &NetLab, namespaces: &[NsGuard]) -> Vec<Value> {
    lab.wait_pool(false);
    let ls = lab.json(["network", "ls", "--json"]);
    let records: Vec<Value> = ls.as_array().unwrap().clone();
    let links = ip_json(lab.host.path(), &["-d", "link", "show"]);
    let ports: HashSet<String> = links
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| n.starts_with("mpt-") || n.starts_with("mpv-"))
        .map(str::to_owned)
        .collect();
    let recorded: HashSet<String> = records
        .iter()
        .map(|r| r["link"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ports, recorded,
        "links without records, or records without links"
    );
    assert_eq!(
        retired_links(lab),
        Vec::<String>::new(),
        "retired links left after gc"
    );
    for l in links.as_array().unwrap() {
        if recorded.contains(l["ifname"].as_str().unwrap()) {
            assert_eq!(l["master"], "micropod0", "{l}");
        }
    }
    let status = lab.json(["network", "status", "--json"]);
    assert_eq!(status["network"]["ipam"]["used"], records.len());
    // The pool on record is the pooled TAPs there are: down, on the bridge.
    let pooled: Vec<&Value> = links
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| micropod::network::pool_link(l["ifname"].as_str().unwrap()).is_some())
        .collect();
    assert_eq!(
        status["network"]["pool"]["ready"],
        pooled.len(),
        "pool records against pooled TAPs"
    );
    for l in pooled {
        assert_eq!(l["master"], "micropod0", "{l}");
        assert!(
            !l["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
            "a pooled TAP is up: {l}"
        );
    }
    if status["network"]["datapath"] == "ebpf" {
        assert_datapath_matches(lab, &records);
    }
    let recorded_ips: HashSet<String> = records
        .iter()
        .map(|r| r["cidr"].as_str().unwrap().to_owned())
        .collect();
    for ns in namespaces {
        for a in addrs_of(ns.path(), "eth0") {
            assert!(
                recorded_ips.contains(&a),
                "orphan address {a} in {}",
                ns.path().display()
            );
        }
    }
    records
}

#[test]
fn kill_9_at_every_step_of_attach_and_detach_then_gc_leaves_no_orphans() {
    use std::ffi::OsStr;
    let lab = NetLab::new("fail");
    lab.up(&[]);
    let mut namespaces = Vec::new();
    // (failpoint, endpoint kind, is the endpoint there once gc has run?); TAP attaches take a
    // pooled TAP (the default), those marked `fresh` make one (`--pool 0`).
    let cases = [
        ("attach:locked", "tap", false),
        ("attach:taken-from-pool", "tap", false),
        ("attach:link-created", "tap fresh", false),
        ("attach:recorded", "tap fresh", true),
        ("attach:locked", "netns", false),
        ("attach:intent-recorded", "tap", false),
        ("attach:intent-recorded", "netns", false),
        ("attach:link-created", "tap", false),
        ("attach:link-created", "netns", false),
        ("attach:configured", "netns", false),
        ("attach:recorded", "tap", true),
        ("attach:recorded", "netns", true),
        ("detach:intent-recorded", "tap", false),
        ("detach:intent-recorded", "netns", false),
        ("detach:retired", "tap", false),
        ("detach:retired", "netns", false),
        ("detach:recorded", "tap", false),
        ("detach:recorded", "netns", false),
    ];
    let mut pool = true;
    for (i, (point, kind, survives)) in cases.into_iter().enumerate() {
        let (kind, fresh) = match kind.split_once(' ') {
            Some((kind, _)) => (kind, true),
            None => (kind, false),
        };
        if fresh == pool {
            lab.up(&["--pool", if fresh { "0" } else { "16" }]);
            pool = !fresh;
        }
        let name = format!("f{i}");
        let ns = NsGuard::new(&name);
        let mut attach: Vec<&OsStr> = ["network", "attach", &name, "--kind", kind]
            .into_iter()
            .map(OsStr::new)
            .collect();
        if kind == "netns" {
            attach.extend([OsStr::new("--netns"), ns.path().as_os_str()]);
        }
        if point.starts_with("detach") {
            lab.ok(&attach);
            lab.kill_at(
                point,
                [
                    OsStr::new("network"),
                    OsStr::new("detach"),
                    OsStr::new(&name),
                ],
            );
        } else {
            lab.kill_at(point, &attach);
        }
        namespaces.push(ns);
        lab.ok(["gc"]);
        let records = assert_consistent(&lab, &namespaces);
        let present = records.iter().any(|r| r["name"] == name.as_str());
        assert_eq!(
            present, survives,
            "{point} ({kind}): endpoint present = {present}"
        );
    }
    // The addresses of everything that did not survive are free again.
    let status = lab.json(["network", "status", "--json"]);
    assert_eq!(status["network"]["ipam"]["used"], 3);
}

#[test]
fn kill_9_of_the_reaper_then_gc_leaves_no_orphans() {
    use std::ffi::OsStr;
    let lab = NetLab::new("reapkill");
    lab.up(&[]);
    let mut namespaces = Vec::new();
    for (i, point) in ["reap:read", "reap:deleted"].into_iter().enumerate() {
        // Retired links that no background reaper deletes while the test holds its lock.
        let held = hold_lock(&lab, micropod::network::REAPER_LOCK);
        let ns = NsGuard::new(&format!("r{i}"));
        lab.attach_netns(&format!("r{i}"), &ns, &[]);
        lab.ok(["network", "attach", &format!("t{i}"), "--kind", "tap"]);
        lab.ok(["network", "detach", &format!("r{i}")]);
        lab.ok(["network", "detach", &format!("t{i}")]);
        namespaces.push(ns);
        let status = lab.json(["network", "status", "--json"]);
        assert_eq!(status["network"]["retired_links"], 2, "{point}");
        assert_eq!(retired_links(&lab).len(), 2, "{point}");
        drop(held);
        lab.kill_at(point, [OsStr::new("network"), OsStr::new("reap")]);
        lab.ok(["gc"]);
        let records = assert_consistent(&lab, &namespaces);
        assert!(records.is_empty(), "{point}: {records:?}");
        let status = lab.json(["network", "status", "--json"]);
        assert_eq!(status["network"]["retired_links"], 0, "{point}");
    }
}

#[test]
fn detach_then_attach_again_with_the_same_ip_at_once() {
    let lab = NetLab::new("reuse");
    lab.up(&[]);
    let ep = NsGuard::new("reuse");
    for round in 0..3 {
        // The same name, address and namespace (so the same interface name inside, which
        // the retired veth's peer may still hold).
        let att = lab.attach_netns("c", &ep, &["--ip", "10.10.0.7"]);
        assert_eq!(att["ip"], "10.10.0.7", "round {round}");
        assert_eq!(
            addrs_of(ep.path(), "eth0"),
            ["10.10.0.7/24"],
            "round {round}"
        );
        let tap = lab.json([
            "network",
            "attach",
            "v",
            "--kind",
            "tap",
            "--ip",
            "10.10.0.9",
            "--json",
        ]);
        assert_eq!(tap["link"], "mpt-0a0a0009", "round {round}");
        lab.ok(["network", "detach", "c"]);
        lab.ok(["network", "detach", "v"]);
    }
    // With the reaper held off, the retired veth's peer keeps eth0 in the namespace: the
    // attach deletes it and goes on.
    let held = hold_lock(&lab, micropod::network::REAPER_LOCK);
    lab.attach_netns("c", &ep, &["--ip", "10.10.0.7"]);
    lab.ok(["network", "detach", "c"]);
    assert!(link(&ip_json(ep.path(), &["link", "show"]), "eth0").is_some());
    let att = lab.attach_netns("c", &ep, &["--ip", "10.10.0.7"]);
    assert_eq!(att["ip"], "10.10.0.7");
    assert!(
        ping(&ep, GATEWAY),
        "the re-attached endpoint reaches the gateway"
    );
    drop(held);
    lab.ok(["network", "detach", "c"]);
    wait_reaped(&lab);
    let records = assert_consistent(&lab, std::slice::from_ref(&ep));
    assert!(records.is_empty(), "{records:?}");
}

#[test]
fn the_reaper_deletes_retired_links_and_down_deletes_those_still_pending() {
    let lab = NetLab::new("reap");
    lab.up(&[]);
    let namespaces: Vec<NsGuard> = (0..2).map(|i| NsGuard::new(&format!("q{i}"))).collect();
    for round in 0..2 {
        let held = (round == 1).then(|| hold_lock(&lab, micropod::network::REAPER_LOCK));
        for (i, ns) in namespaces.iter().enumerate() {
            lab.attach_netns(&format!("n{i}"), ns, &[]);
            lab.ok(["network", "attach", &format!("t{i}"), "--kind", "tap"]);
        }
        for i in 0..namespaces.len() {
            lab.ok(["network", "detach", &format!("n{i}")]);
            lab.ok(["network", "detach", &format!("t{i}")]);
        }
        let status = lab.json(["network", "status", "--json"]);
        assert_eq!(
            status["network"]["ipam"]["used"], 0,
            "addresses freed at once"
        );
        assert!(
            lab.json(["network", "ls", "--json"])
                .as_array()
                .unwrap()
                .is_empty()
        );
        if held.is_none() {
            wait_reaped(&lab);
            continue;
        }
        assert_eq!(status["network"]["retired_links"], 4);
        let text = lab.ok(["network", "status"]);
        assert!(
            text.contains("4 detached link(s) waiting to be deleted"),
            "{text}"
        );
        // `down` deletes them as part of its teardown, with no reaper running.
        lab.ok(["network", "down"]);
        assert_eq!(retired_links(&lab), Vec::<String>::new());
        for ns in &namespaces {
            assert!(link(&ip_json(ns.path(), &["link", "show"]), "eth0").is_none());
        }
    }
}

#[test]
fn parallel_detaches_leave_nothing_behind() {
    const N: usize = 16;
    let lab = NetLab::new("pardet");
    lab.up(&[]);
    let namespaces: Vec<NsGuard> = (0..N / 2).map(|i| NsGuard::new(&format!("d{i}"))).collect();
    for (i, ns) in namespaces.iter().enumerate() {
        lab.attach_netns(&format!("n{i}"), ns, &[]);
        lab.ok(["network", "attach", &format!("t{i}"), "--kind", "tap"]);
    }
    let commands: Vec<_> = (0..N / 2)
        .flat_map(|i| [format!("n{i}"), format!("t{i}")])
        .map(|name| lab.micropod(["network", "detach", &name]))
        .collect();
    all_at_once(commands);
    wait_reaped(&lab);
    let records = assert_consistent(&lab, &namespaces);
    assert!(records.is_empty(), "{records:?}");
    for ns in &namespaces {
        assert!(link(&ip_json(ns.path(), &["link", "show"]), "eth0").is_none());
    }
}

#[test]
fn kill_9_during_up_then_up_finishes_and_down_restores_the_namespace() {
    use std::ffi::OsStr;
    let lab = NetLab::new("upkill");
    let host = lab.host.path();
    let before = snapshot(host);
    lab.up(&[]);
    let made = snapshot(host);
    lab.ok(["network", "down"]);
    for point in ["up:recorded", "up:made"] {
        lab.kill_at(point, [OsStr::new("network"), OsStr::new("up")]);
        let status = lab.json(["network", "status", "--json"]);
        assert_eq!(status["network"]["phase"], "creating", "{point}");
        // Attaching to a half-made network is refused...
        let out = lab.run(["network", "attach", "x", "--kind", "tap"]);
        assert!(
            !out.status.success(),
            "{point}: attach to a half-made network"
        );
        // ...`up` finishes it...
        assert_eq!(
            lab.json(["network", "up", "--json"])["network"]["phase"],
            "ready"
        );
        lab.wait_pool(true);
        assert_eq!(
            strip_indexes(&snapshot(host)),
            strip_indexes(&made),
            "{point}: up did not finish the network"
        );
        lab.ok(["network", "down"]);
        assert_eq!(snapshot(host), before, "{point}");
        // ...and `down` alone cleans up after a killed `up` too.
        lab.kill_at(point, [OsStr::new("network"), OsStr::new("up")]);
        lab.ok(["network", "down"]);
        assert_eq!(snapshot(host), before, "{point}: down after a killed up");
    }
}

/// A snapshot without interface indexes (a re-created bridge gets a new one).
fn strip_indexes(snapshot: &str) -> Vec<String> {
    snapshot
        .lines()
        .map(|l| {
            l.split(' ')
                .filter(|w| !w.starts_with("index="))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[test]
fn up_down_50_times_leaves_the_namespace_as_it_was() {
    let lab = NetLab::new("cycle");
    let host = lab.host.path();
    let before = snapshot(host);
    for i in 0..50 {
        lab.up(&[]);
        if i == 0 {
            assert_ne!(snapshot(host), before, "up changed nothing?");
        }
        lab.ok(["network", "down"]);
    }
    assert_eq!(snapshot(host), before);
    assert_eq!(lab.state_doc(), None);
}

// ---- bad input: a clear error, exit code != 0, and no change -------------------------------

/// Runs `args` (after `setup`) and checks: failure, `expect` in stderr, the host namespace and
/// the state document unchanged.
#[track_caller]
fn refused(lab: &NetLab, args: &[&str], expect: &str) {
    let before = (snapshot(lab.host.path()), lab.state_doc());
    let out = lab.run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{args:?} succeeded:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains(expect),
        "{args:?}: expected {expect:?} in:\n{stderr}"
    );
    assert_eq!(
        (snapshot(lab.host.path()), lab.state_doc()),
        before,
        "{args:?} changed something"
    );
}

#[test]
fn bad_subnet_malformed() {
    let lab = NetLab::new("bad1");
    refused(
        &lab,
        &["network", "up", "--subnet", "10.10.0/24x"],
        "invalid subnet",
    );
    refused(
        &lab,
        &["network", "up", "--subnet", "10.10.0.0"],
        "missing prefix length",
    );
    refused(
        &lab,
        &["network", "up", "--subnet", "10.10.0.5/24"],
        "did you mean 10.10.0.0/24",
    );
}

#[test]
fn bad_subnet_not_ipv4() {
    let lab = NetLab::new("bad2");
    refused(
        &lab,
        &["network", "up", "--subnet", "fd00::/64"],
        "only IPv4",
    );
}

#[test]
fn bad_subnet_too_small() {
    let lab = NetLab::new("bad3");
    for subnet in ["10.10.0.0/31", "10.10.0.0/32"] {
        refused(
            &lab,
            &["network", "up", "--subnet", subnet],
            &format!("subnet {subnet} is too small"),
        );
    }
}

#[test]
fn bad_subnet_overlaps_host_address_or_route() {
    let lab = NetLab::new("bad4");
    refused(
        &lab,
        &["network", "up", "--subnet", "203.0.113.0/25"],
        "overlaps address 203.0.113.1/24 on uplink0",
    );
    query(
        lab.host.path(),
        "ip",
        &["route", "add", "192.0.2.0/24", "via", "203.0.113.2"],
    );
    refused(
        &lab,
        &["network", "up", "--subnet", "192.0.2.128/25"],
        "overlaps route 192.0.2.0/24",
    );
}

/// Loopback, "this network", link-local, multicast and reserved ranges: the overlap check
/// looks at the namespace's addresses and routes (and skips loopback), which know none of them.
#[test]
fn bad_subnet_special_purpose() {
    let lab = NetLab::new("bad4s");
    for (subnet, range) in [
        ("127.0.0.0/24", "127.0.0.0/8 (loopback"),
        ("0.0.0.0/24", "0.0.0.0/8"),
        ("169.254.0.0/24", "169.254.0.0/16"),
        ("224.0.0.0/24", "224.0.0.0/4"),
        ("255.255.255.0/24", "240.0.0.0/4"),
    ] {
        refused(
            &lab,
            &["network", "up", "--subnet", subnet],
            &format!("invalid subnet \"{subnet}\": it overlaps {range}"),
        );
    }
}

#[test]
fn bad_bridge_name() {
    let lab = NetLab::new("bad5");
    refused(
        &lab,
        &["network", "up", "--bridge", "a-bridge-name-too-long"],
        "invalid bridge name",
    );
    refused(
        &lab,
        &["network", "up", "--bridge", "br/0"],
        "invalid bridge name",
    );
}

#[test]
fn bad_uplink() {
    let lab = NetLab::new("bad6");
    refused(
        &lab,
        &["network", "up", "--uplink", "nosuchdev0"],
        "uplink nosuchdev0 does not exist",
    );
}

#[test]
fn bad_ip_outside_reserved_or_taken() {
    let lab = NetLab::new("bad7");
    lab.up(&[]);
    lab.ok([
        "network",
        "attach",
        "first",
        "--kind",
        "tap",
        "--ip",
        "10.10.0.9",
    ]);
    let tap = ["network", "attach", "x", "--kind", "tap", "--ip"];
    let with = |ip: &'static str| [&tap[..], &[ip]].concat();
    refused(&lab, &with("10.10.1.9"), "outside subnet 10.10.0.0/24");
    refused(&lab, &with("10.10.0.0"), "the network address");
    refused(&lab, &with("10.10.0.1"), "the gateway address");
    refused(&lab, &with("10.10.0.255"), "the broadcast address");
    refused(&lab, &with("10.10.0.9"), "already assigned to \"first\"");
    refused(&lab, &with("not-an-ip"), "invalid value");
}

#[test]
fn bad_duplicate_endpoint_name() {
    let lab = NetLab::new("bad8");
    lab.up(&[]);
    lab.ok(["network", "attach", "dup", "--kind", "tap"]);
    refused(
        &lab,
        &["network", "attach", "dup", "--kind", "tap"],
        "already exists",
    );
}

#[test]
fn bad_detach_unknown_name() {
    let lab = NetLab::new("bad9");
    lab.up(&[]);
    refused(
        &lab,
        &["network", "detach", "nobody"],
        "no endpoint named \"nobody\"",
    );
}

#[test]
fn bad_netns_path_missing_or_not_a_netns() {
    let lab = NetLab::new("bad10");
    lab.up(&[]);
    let attach = ["network", "attach", "x", "--kind", "netns", "--netns"];
    refused(
        &lab,
        &[&attach[..], &["/run/netns/does-not-exist"]].concat(),
        "No such file",
    );
    refused(
        &lab,
        &[&attach[..], &["/etc/hostname"]].concat(),
        "is not a network namespace",
    );
    refused(
        &lab,
        &["network", "attach", "x", "--kind", "netns"],
        "needs --netns",
    );
    let own = lab.host.path().to_str().unwrap().to_owned();
    refused(
        &lab,
        &[&attach[..], &[own.as_str()]].concat(),
        "micropod's own network namespace",
    );
}

#[test]
fn bad_ifname_taken_in_the_namespace() {
    let lab = NetLab::new("bad13");
    lab.up(&[]);
    let ep = NsGuard::new("busy");
    query(
        ep.path(),
        "ip",
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
        ],
    );
    let before = snapshot(ep.path());
    let path = ep.path().to_str().unwrap().to_owned();
    refused(
        &lab,
        &[
            "network", "attach", "x", "--kind", "netns", "--netns", &path,
        ],
        "already has an interface named eth0; choose another with --ifname",
    );
    assert_eq!(
        snapshot(ep.path()),
        before,
        "the endpoint namespace changed"
    );
    // The same namespace takes the endpoint under another name.
    let att = lab.attach_netns("x", &ep, &["--ifname", "mp0"]);
    assert_eq!(att["ifname"], "mp0");
    assert_eq!(addrs_of(ep.path(), "mp0"), ["10.10.0.2/24"]);
}

#[test]
fn bad_not_root() {
    let lab = NetLab::new("bad11");
    lab.up(&[]);
    for args in [
        &["network", "up"][..],
        &["network", "attach", "x", "--kind", "tap"],
        &["network", "detach", "x"],
        &["network", "down"],
        &["gc"],
    ] {
        let before = (snapshot(lab.host.path()), lab.state_doc());
        let mut cmd = lab.micropod(args);
        as_nobody(&mut cmd);
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded as nobody");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("needs CAP_NET_ADMIN"), "{args:?}: {err}");
        assert_eq!((snapshot(lab.host.path()), lab.state_doc()), before);
    }
}

#[test]
fn bad_pool_exhausted() {
    let lab = NetLab::new("bad12");
    lab.up(&["--subnet", "10.10.0.0/30"]);
    lab.ok(["network", "attach", "only", "--kind", "tap"]);
    refused(
        &lab,
        &["network", "attach", "more", "--kind", "tap"],
        "is full",
    );
}

/// The bridge's forwarding database, from `bridge -j fdb show`.
fn bridge_fdb(lab: &NetLab) -> Value {
    let out = query(
        lab.host.path(),
        "bridge",
        &["-j", "fdb", "show", "br", "micropod0"],
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bridge fdb: bad JSON {out:?}: {e}"))
}

/// The pooled TAPs of the lab's host namespace, by name.
fn pooled_taps(lab: &NetLab) -> Vec<String> {
    links_named(lab, |n| micropod::network::pool_link(n).is_some())
}

fn ifindex_of(lab: &NetLab, name: &str) -> u64 {
    ip_json(lab.host.path(), &["link", "show", "dev", name])[0]["ifindex"]
        .as_u64()
        .expect("ifindex")
}

#[test]
fn the_pool_is_made_by_up_sized_by_pool_survives_up_again_and_is_emptied_by_down() {
    let lab = NetLab::new("pool");
    lab.up(&["--pool", "4"]);
    let status = lab.json(["network", "status", "--json"]);
    assert_eq!(
        status["network"]["pool"],
        serde_json::json!({"size": 4, "ready": 4})
    );
    let pool = pooled_taps(&lab);
    assert_eq!(pool.len(), 4, "{pool:?}");
    let indexes: Vec<u64> = pool.iter().map(|n| ifindex_of(&lab, n)).collect();
    // The refill also made the spare files that attaches write their records into (8 per
    // pooled TAP), so that an attach makes no file.
    let spares = spare_inodes(&lab);
    assert_eq!(spares.len(), 32, "spare files after the refill");
    // `up` again (same settings, no --pool): the very same TAPs, and the same size.
    lab.up(&[]);
    assert_eq!(pooled_taps(&lab), pool);
    assert_eq!(
        pool.iter().map(|n| ifindex_of(&lab, n)).collect::<Vec<_>>(),
        indexes
    );
    // An attach takes one (renamed, up, on the bridge) and nothing else changes in the pool.
    let att = lab.json(["network", "attach", "vm", "--kind", "tap", "--json"]);
    let taken = ifindex_of(&lab, att["link"].as_str().unwrap());
    assert!(
        indexes.contains(&taken),
        "the endpoint's TAP is a pooled one"
    );
    let ip = att["ip"].as_str().unwrap();
    for record in [
        format!("{}/vm.json", micropod::network::ENDPOINTS_SHELF),
        format!("{}/{ip}", micropod::network::ADDRESSES_SHELF),
    ] {
        let ino = std::fs::metadata(lab.dirs.state.join(&record))
            .unwrap()
            .ino();
        assert!(spares.contains(&ino), "{record} is not a former spare");
    }
    assert_eq!(spare_inodes(&lab).len(), 30);
    // Refilled once half used (one refill per burst of attaches, not one per attach).
    lab.wait_pool(false);
    assert_eq!(pooled_taps(&lab).len(), 3, "refilled too early");
    lab.ok(["network", "attach", "vm1", "--kind", "tap"]);
    lab.wait_pool(true);
    assert_eq!(pooled_taps(&lab).len(), 4, "refilled");
    // A smaller pool is trimmed at once; 0 turns it off, and a TAP attach makes its own.
    lab.up(&["--pool", "1"]);
    assert_eq!(pooled_taps(&lab).len(), 1);
    lab.up(&["--pool", "0"]);
    assert_eq!(pooled_taps(&lab), Vec::<String>::new());
    let fresh = lab.json(["network", "attach", "vm2", "--kind", "tap", "--json"]);
    assert_eq!(
        lab.json(["network", "status", "--json"])["network"]["pool"],
        serde_json::json!({"size": 0, "ready": 0})
    );
    assert!(!indexes.contains(&ifindex_of(&lab, fresh["link"].as_str().unwrap())));
    let too_big = lab
        .micropod(["network", "up", "--pool", "100000"])
        .output()
        .unwrap();
    assert!(!too_big.status.success());
    assert!(
        String::from_utf8_lossy(&too_big.stderr).contains("--pool 100000 is out of range"),
        "{}",
        String::from_utf8_lossy(&too_big.stderr)
    );
    // `down` removes the pool with everything else.
    lab.up(&["--pool", "3"]);
    assert_eq!(pooled_taps(&lab).len(), 3);
    lab.ok(["network", "down", "--force"]);
    assert_eq!(pooled_taps(&lab), Vec::<String>::new());
    assert!(!lab.dirs.state.join(micropod::state::SPARE_DIR).exists());
}

/// The inodes of the state dir's spare files.
fn spare_inodes(lab: &NetLab) -> std::collections::BTreeSet<u64> {
    match std::fs::read_dir(lab.dirs.state.join(micropod::state::SPARE_DIR)) {
        Ok(entries) => entries
            .map(|e| e.unwrap().metadata().unwrap().ino())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
        Err(e) => panic!("listing the spares: {e}"),
    }
}

/// The tests and the benchmark wait for refills by looking at the refill lock in
/// `/proc/locks`; taking it, even for a moment, would make a refill starting then give up.
#[test]
fn a_held_refill_lock_is_seen_without_taking_it() {
    let lab = NetLab::new("flock");
    lab.up(&["--pool", "0"]);
    let path = lab.dirs.state.join(micropod::network::REFILL_LOCK);
    let _ = std::fs::File::create(&path).unwrap();
    assert!(!micropod_tests::flock_held(&path).unwrap());
    let held = hold_lock(&lab, micropod::network::REFILL_LOCK);
    assert!(micropod_tests::flock_held(&path).unwrap());
    // Another file's lock is not this one's.
    let _state = hold_lock(&lab, "lock-probe");
    drop(held);
    assert!(!micropod_tests::flock_held(&path).unwrap());
}

#[test]
fn kill_9_during_pool_refill_then_gc_leaves_no_orphans() {
    use std::ffi::OsStr;
    let lab = NetLab::new("refill");
    lab.up(&["--pool", "0"]);
    for point in ["refill:created", "refill:made", "refill:recorded"] {
        {
            // No background refill: this one is ours, to kill.
            let _held = hold_lock(&lab, micropod::network::REFILL_LOCK);
            lab.ok(["network", "up", "--pool", "2"]);
        }
        lab.kill_at(point, [OsStr::new("network"), OsStr::new("refill")]);
        // What the killed refill made: one TAP, recorded or not.
        assert!(
            !pooled_taps(&lab).is_empty(),
            "{point}: the refill made nothing"
        );
        lab.ok(["gc"]);
        let status = lab.json(["network", "status", "--json"]);
        let ready = status["network"]["pool"]["ready"].as_u64().unwrap();
        assert_eq!(
            pooled_taps(&lab).len() as u64,
            ready,
            "{point}: pooled TAPs without a record after gc"
        );
        // A refill afterwards completes the pool, and attaches use it.
        lab.ok(["network", "refill"]);
        assert_eq!(pooled_taps(&lab).len(), 2, "{point}");
        let att = lab.json(["network", "attach", "vm", "--kind", "tap", "--json"]);
        assert_eq!(att["ip"], "10.10.0.2");
        lab.ok(["network", "detach", "vm"]);
        lab.up(&["--pool", "0"]);
        assert_consistent(&lab, &[]);
    }
    lab.ok(["network", "down"]);
    assert_eq!(pooled_taps(&lab), Vec::<String>::new());
}

/// A pooled TAP never carries a previous tenant's state. A VM uses its TAP (frames both ways,
/// so counters, a MAC learned by the bridge and a NAT flow to the internet) and is detached;
/// the next attach of the same address gets another device (index, MAC) with zeroed kernel
/// and eBPF counters, no NAT flow and no bridge entry of the old tenant.
#[test]
fn pooled_endpoints_carry_no_previous_tenants_state() {
    let lab = NetLab::new("tenant");
    lab.up(&[]);
    let status = lab.json(["network", "status", "--json"]);
    assert_eq!(status["network"]["datapath"], "ebpf", "{status}");
    let first = lab.json(["network", "attach", "vm1", "--kind", "tap", "--json"]);
    let tap1 = first["link"].as_str().unwrap().to_owned();
    let vm_ip: Ipv4Addr = first["ip"].as_str().unwrap().parse().unwrap();
    let vm_mac = micropod::network::Mac::for_ip(vm_ip).0;
    let (index1, mac1) = (
        ifindex_of(&lab, &tap1),
        ip_json(lab.host.path(), &["link", "show", "dev", &tap1])[0]["address"].clone(),
    );
    // Be the tenant: resolve the gateway, then send datagrams to the internet's server.
    let sent = lab.host.run(|| {
        let tap = Tap::open(&tap1).expect("opening the TAP");
        let mut buf = [0u8; 2048];
        for _ in 0..20 {
            tap.send(&packets::arp_request(vm_mac, vm_ip, GATEWAY))
                .unwrap();
            while let Some(n) = tap.recv(&mut buf, Duration::from_millis(200)).unwrap() {
                if let Some((gw_mac, ip, _, _)) = packets::parse_arp_reply(&buf[..n])
                    && ip == GATEWAY
                {
                    let datagram = packets::udp_ipv4(vm_ip, 40000, SERVER_ADDR, 9, b"tenant");
                    let frame = packets::ethernet(gw_mac, vm_mac, packets::ETH_P_IP, &datagram);
                    for _ in 0..5 {
                        tap.send(&frame).unwrap();
                    }
                    // While the VM holds its TAP: once it closes it, the port loses its
                    // carrier and the bridge forgets what it learned there.
                    return Some(bridge_fdb(&lab));
                }
            }
        }
        None
    });
    let fdb = sent.expect("no ARP reply from the gateway");
    let stats = lab.json(["stats", "--json"]);
    assert!(
        stats["endpoints"][0]["tx_packets"].as_u64().unwrap() >= 6,
        "{stats}"
    );
    assert!(
        stats["nat"]["entries"].as_u64().unwrap() > 0,
        "no NAT flow: {stats}"
    );
    let learned = |fdb: &Value| {
        let mac = micropod::network::Mac(vm_mac).to_string();
        fdb.as_array()
            .unwrap()
            .iter()
            .any(|e| e["mac"].as_str() == Some(mac.as_str()))
    };
    assert!(
        learned(&fdb),
        "the bridge did not learn the tenant's MAC: {fdb}"
    );

    lab.ok(["network", "detach", "vm1"]);
    let ip = vm_ip.to_string();
    let second = lab.json([
        "network", "attach", "vm2", "--kind", "tap", "--ip", &ip, "--json",
    ]);
    let tap2 = second["link"].as_str().unwrap().to_owned();
    assert_eq!(tap2, tap1, "same address, same endpoint link name");
    // The endpoint's counters first, the new device's own (zero when it was made) second: what
    // the bridge floods onto the port from now on shows in both, so the eBPF counters can never
    // exceed the device's unless they carried the old tenant's.
    let stats = lab.json(["stats", "--json"]);
    let link2 = &ip_json(lab.host.path(), &["-s", "link", "show", "dev", &tap2])[0];
    assert_ne!(
        link2["ifindex"].as_u64().unwrap(),
        index1,
        "the same device again"
    );
    assert_ne!(link2["address"], mac1, "the old TAP's MAC");
    let s = &link2["stats64"];
    let to_device = s["tx"]["packets"].as_u64().unwrap() + s["tx"]["dropped"].as_u64().unwrap();
    assert_eq!(
        s["rx"]["packets"].as_u64(),
        Some(0),
        "the new TAP has carried a VM's frames: {link2}"
    );
    let ep = &stats["endpoints"][0];
    assert_eq!(ep["name"], "vm2");
    assert_eq!(
        ep["tx_packets"].as_u64(),
        Some(0),
        "transmit counter of the old tenant (it sent at least 6): {stats}"
    );
    assert!(
        ep["rx_packets"].as_u64().unwrap() <= to_device,
        "receive counter beyond what reached the new device ({to_device}): {stats}"
    );
    assert_eq!(
        stats["nat"]["entries"], 0,
        "NAT flows of the old tenant: {stats}"
    );
    // The new VM opens its TAP (the port gets its carrier) and has sent nothing yet.
    let fdb = lab.host.run(|| {
        let _tap = Tap::open(&tap2).expect("opening the TAP");
        std::thread::sleep(Duration::from_millis(50));
        bridge_fdb(&lab)
    });
    assert!(
        !learned(&fdb),
        "the bridge still knows the old tenant's MAC: {fdb}"
    );
}

/// After a reboot the bridge's name may be someone else's link: `up` must not adopt it (add
/// the gateway, enslave ports) and `down` must not delete it.
#[test]
fn up_adopts_and_down_deletes_only_the_bridge_micropod_made() {
    let lab = NetLab::new("foreign");
    lab.up(&[]);
    let host = lab.host.path();
    // As if the machine rebooted: the records stay, the bridge is gone, and a user made a
    // link of that name: a veth, then a bridge of their own (its own MAC).
    for make in [
        &[
            "link",
            "add",
            "micropod0",
            "type",
            "veth",
            "peer",
            "name",
            "mine1",
        ][..],
        &["link", "add", "micropod0", "type", "bridge"][..],
    ] {
        query(host, "ip", &["link", "del", "micropod0"]);
        query(host, "ip", make);
        let out = lab.micropod(["network", "up"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{make:?}: up adopted it");
        assert!(
            stderr.contains("micropod did not make it"),
            "{make:?}: {stderr}"
        );
        let addrs = ip_json(host, &["addr", "show", "micropod0"]);
        assert_eq!(
            addrs[0]["addr_info"],
            serde_json::json!([]),
            "{make:?}: the gateway was added to someone else's link"
        );
        lab.ok(["network", "down", "--force"]);
        assert_eq!(
            ip_json(host, &["link", "show", "micropod0"])
                .as_array()
                .unwrap()
                .len(),
            1,
            "{make:?}: down deleted a link it did not make"
        );
        query(host, "ip", &["link", "del", "micropod0"]);
        lab.up(&[]);
    }
    // micropod's own bridge (kind and MAC) is adopted by `up` again, and deleted by `down`.
    let index = ifindex_of(&lab, "micropod0");
    lab.up(&[]);
    assert_eq!(ifindex_of(&lab, "micropod0"), index);
    lab.ok(["network", "down"]);
    assert!(
        ip_json(host, &["link", "show"])
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["ifname"] != "micropod0")
    );
}

/// A record edited to name a link micropod did not make (here the uplink) must never make it
/// rename or delete that link: not `detach`, not `gc`, not the reaper, not `down`.
#[test]
fn records_that_name_a_foreign_link_never_touch_it() {
    let lab = NetLab::new("tamper");
    lab.up(&[]);
    let ns = NsGuard::new("tamper-ep");
    let att = lab.attach_netns("ep", &ns, &[]);
    let record = lab
        .dirs
        .state
        .join(micropod::network::ENDPOINTS_SHELF)
        .join("ep.json");
    let mut ep: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    ep["link"] = UPLINK.into();
    std::fs::write(&record, serde_json::to_vec(&ep).unwrap()).unwrap();
    // A retired link on record named like the uplink, too.
    let retired = lab.dirs.state.join(micropod::network::RETIRED_SHELF);
    std::fs::create_dir_all(&retired).unwrap();
    std::fs::write(
        retired.join(UPLINK),
        serde_json::to_vec(&serde_json::json!({"name": UPLINK, "ip": att["ip"]})).unwrap(),
    )
    .unwrap();
    let uplink_index = ifindex_of(&lab, UPLINK);

    let out = lab.micropod(["network", "detach", "ep"]).output().unwrap();
    assert!(!out.status.success(), "detach used the edited record");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("names the link"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gc = lab.json(["gc", "--json"]);
    assert!(
        gc.to_string().contains("names the link"),
        "gc reports it: {gc}"
    );
    lab.ok(["network", "up"]);
    lab.ok(["network", "down", "--force"]);
    assert_eq!(
        ifindex_of(&lab, UPLINK),
        uplink_index,
        "the uplink is the same link"
    );
    let up = ip_json(lab.host.path(), &["link", "show", UPLINK]);
    assert!(
        up[0]["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
        "the uplink is still up: {up}"
    );
}

/// A bridge deleted by hand: `up` makes it again and puts every endpoint back on it (and the
/// data path's settings follow the new bridge).
#[test]
fn up_after_the_bridge_was_deleted_puts_the_endpoints_back() {
    let lab = NetLab::new("rebridge");
    lab.up(&[]);
    let ns = NsGuard::new("rebridge-ep");
    let att = lab.attach_netns("ep", &ns, &[]);
    let tap = lab.json(["network", "attach", "vm", "--kind", "tap", "--json"]);
    assert!(ping(&ns, SERVER_ADDR));
    let host = lab.host.path();
    query(host, "ip", &["link", "del", "micropod0"]);
    assert!(!ping(&ns, SERVER_ADDR), "no bridge, no way out");
    lab.up(&[]);
    for port in [att["link"].as_str().unwrap(), tap["link"].as_str().unwrap()] {
        let l = ip_json(host, &["link", "show", "dev", port]);
        assert_eq!(l[0]["master"], "micropod0", "{port} is on the bridge: {l}");
    }
    assert!(ping(&ns, SERVER_ADDR), "the endpoint reaches out again");
    assert!(ping(&ns, "10.10.0.1".parse().unwrap()), "and its gateway");
    let stats = lab.json(["stats", "--json"]);
    assert_eq!(stats["datapath"], "ebpf");
}

/// A state dir on a tmpfs of its own, unmounted on drop (the test's, not the machine's).
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount_on(path: &std::path::Path, size: &str) -> Self {
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(format!("size={size},mode=0700").as_str()),
        )
        .expect("mounting a tmpfs for the state dir");
        Self(path.to_owned())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A full disk while an attach writes its record: the attach fails, says why, and undoes its
/// own work (the TAP, its address, its intent) instead of leaving it to the next command.
#[test]
fn a_full_state_disk_fails_the_attach_and_leaves_nothing() {
    let lab = NetLab::new("enospc");
    // The comparison below spans a moment when the kernel may give the bridge its IPv6
    // link-local address on its own; the test is about what the attach leaves.
    for conf in ["all", "default"] {
        lab.host
            .run(|| std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1"))
            .unwrap();
    }
    let _fs = SmallFs::mount_on(&lab.dirs.state, "1m");
    lab.up(&["--pool", "0", "--datapath", "ebpf"]);
    // The first attach makes the shelves and the slots; its record pages exist from then on.
    lab.ok(["network", "attach", "first", "--kind", "tap"]);
    // Fill the disk, then give back exactly one page: the address record takes it, and the
    // endpoint record finds none.
    let reserve = lab.dirs.state.join("reserve");
    std::fs::write(&reserve, [0u8; 4096]).unwrap();
    let mut filler = std::fs::File::create(lab.dirs.state.join("filler")).unwrap();
    while std::io::Write::write_all(&mut filler, &[0u8; 4096]).is_ok() {}
    drop(filler);
    std::fs::remove_file(&reserve).unwrap();
    let links_before = snapshot(lab.host.path());

    let out = lab
        .micropod(["network", "attach", "full", "--kind", "tap"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the attach succeeded on a full disk");
    assert!(stderr.contains("No space left"), "{stderr}");
    assert_eq!(
        snapshot(lab.host.path()),
        links_before,
        "the failed attach left a link behind"
    );
    let ls = lab.json(["network", "ls", "--json"]);
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");

    std::fs::remove_file(lab.dirs.state.join("filler")).unwrap();
    // Nothing for gc to finish, and the address the failed attach had is handed out again.
    let gc = lab.json(["gc", "--json"]);
    assert_eq!(gc, serde_json::json!([]), "nothing left to release: {gc}");
    let again = lab.json(["network", "attach", "full", "--kind", "tap", "--json"]);
    assert_eq!(again["ip"], "10.10.0.3");
    lab.ok(["network", "down", "--force"]);
}

/// What a reboot does to a lab's network: every link micropod made, its nft table and its
/// pins go; the state dir stays.
fn reboot(lab: &NetLab) {
    let host = lab.host.path();
    let links = ip_json(host, &["link", "show"]);
    for l in links.as_array().unwrap() {
        let name = l["ifname"].as_str().unwrap();
        if name == "micropod0" || name.starts_with("mp") {
            query(host, "ip", &["link", "del", name]);
        }
    }
    query(
        host,
        "nft",
        &["delete", "table", "ip", "micropod_micropod0"],
    );
    std::fs::remove_dir_all(lab.dirs.pins.join("micropod")).unwrap();
}

/// After a reboot, `network up --restore` says which endpoints it released, one line each.
#[test]
fn up_restore_prints_a_line_per_endpoint_it_released() {
    let lab = NetLab::new("reboot-sum");
    lab.up(&["--pool", "0"]);
    lab.ok(["network", "attach", "a", "--kind", "tap"]);
    lab.ok(["network", "attach", "b", "--kind", "tap"]);
    reboot(&lab);
    let out = lab.run(["network", "up", "--restore"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for line in [
        "released endpoint a (10.10.0.2): its link vanished",
        "released endpoint b (10.10.0.3): its link vanished",
    ] {
        assert_eq!(
            stderr.lines().filter(|l| *l == line).count(),
            1,
            "{line:?} once in:\n{stderr}"
        );
    }
    assert!(
        lab.json(["network", "ls", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// A reboot keeps the state dir and loses the kernel's objects and the bpffs pins: `network
/// up --restore` (the boot unit's command) brings the network back with its recorded
/// settings, not the defaults, and releases the endpoints whose links are gone.
#[test]
fn up_restore_after_a_reboot_uses_the_recorded_settings() {
    let lab = NetLab::new("reboot");
    lab.up(&["--subnet", "10.77.0.0/24", "--pool", "2"]);
    lab.ok(["network", "attach", "vm", "--kind", "tap"]);
    lab.wait_pool(false);
    reboot(&lab);

    let conflict = lab
        .micropod(["network", "up", "--restore", "--subnet", "10.1.0.0/24"])
        .output()
        .unwrap();
    assert!(!conflict.status.success(), "--restore takes no settings");
    let up = lab.json(["network", "up", "--restore", "--json"]);
    assert_eq!(up["network"]["subnet"], "10.77.0.0/24", "{up}");
    assert_eq!(up["network"]["datapath"], "ebpf", "{up}");
    assert_eq!(
        up["released"],
        serde_json::json!([{"name": "vm", "ip": "10.77.0.2", "link": "mpt-0a4d0002", "reason": "its link vanished"}]),
        "{up}"
    );
    assert_eq!(up["vms_ended"], serde_json::json!([]), "{up}");
    let ls = lab.json(["network", "ls", "--json"]);
    assert_eq!(
        ls,
        serde_json::json!([]),
        "the endpoint's link is gone: {ls}"
    );
    lab.wait_pool(true);
    assert_eq!(
        lab.json(["network", "status", "--json"])["network"]["pool"],
        serde_json::json!({"size": 2, "ready": 2})
    );
    let att = lab.json(["network", "attach", "vm", "--kind", "tap", "--json"]);
    assert_eq!(att["ip"], "10.77.0.2");
    // No network on record: --restore is a plain `up` with the defaults.
    lab.ok(["network", "down", "--force"]);
    let up = lab.json(["network", "up", "--restore", "--json"]);
    assert_eq!(up["network"]["subnet"], "10.10.0.0/24", "{up}");
}

/// Two networks in one namespace (own state dirs, bridges and subnets): the first one's
/// `down` must not turn forwarding off under the second.
#[test]
fn down_leaves_forwarding_on_for_another_network_in_the_namespace() {
    let lab = NetLab::new("twonets");
    let host = lab.host.path();
    let forwarding = || {
        query(host, "cat", &["/proc/sys/net/ipv4/ip_forward"])
            .trim()
            .to_owned()
    };
    assert_eq!(forwarding(), "0", "a fresh namespace forwards nothing");
    lab.up(&["--pool", "0"]);
    let other = micropod_tests::TestDirs::new("twonets-b");
    let other_pins = other.pins.join("micropod");
    let second = |args: &[&str]| {
        let out = lab
            .micropod_in(&other.state, &other_pins, args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    second(&[
        "network",
        "up",
        "--bridge",
        "mpnetb",
        "--subnet",
        "10.11.0.0/24",
        "--pool",
        "0",
    ]);
    lab.ok(["network", "down"]);
    assert_eq!(forwarding(), "1", "the second network still forwards");
    second(&["network", "down"]);
}

/// `auto` with a pin dir eBPF cannot use (here a regular file, which bpffs never holds):
/// netfilter, with the reason on the data path's line of `up` and `status` and in `--json`,
/// and `down` still works and leaves the file alone.
#[test]
fn auto_with_an_unusable_pin_dir_says_why_and_down_still_works() {
    let lab = NetLab::new("badpins");
    let pins = lab.dirs.state.join("not-a-pin-dir");
    std::fs::write(&pins, b"someone's file").unwrap();
    let run = |args: &[&str]| {
        let out = lab
            .micropod_in(&lab.dirs.state, &pins, args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let pin_path = pins.display().to_string();
    let up = run(&["network", "up", "--pool", "0"]);
    assert!(
        up.contains("datapath netfilter (auto: eBPF unavailable: ") && up.contains(&pin_path),
        "{up}"
    );
    assert!(
        !up.contains("--datapath auto"),
        "no advice to use what was used: {up}"
    );
    let text = run(&["network", "status"]);
    let line = text
        .lines()
        .find(|l| l.starts_with("datapath"))
        .unwrap_or_default();
    assert!(
        line.starts_with("datapath   netfilter (auto: eBPF unavailable: ")
            && line.contains(&pin_path),
        "{text}"
    );
    let status: Value = serde_json::from_str(&run(&["network", "status", "--json"])).unwrap();
    assert_eq!(status["network"]["datapath"], "netfilter");
    assert_eq!(status["network"]["datapath_requested"], "auto");
    let note = status["network"]["datapath_note"].as_str().unwrap();
    assert!(
        note.starts_with("eBPF unavailable: ") && note.contains(&pin_path),
        "{note}"
    );
    run(&["network", "down"]);
    assert_eq!(std::fs::read(&pins).unwrap(), b"someone's file");
    assert!(lab.state_doc().is_none());
}
