//! The eBPF data plane, end to end, in namespaces the tests make: a "host" with the bridge and
//! an uplink to an "internet" namespace, and endpoint namespaces attached with `micropod
//! network attach`. Checksum offload is off on every veth, so the kernel verifies every
//! checksum the NAT rewrites.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use micropod_tests::{
    NsGuard,
    netlab::{
        NetLab, SERVER_ADDR, UPLINK, UPLINK_ADDR, WAN, ip_json, ping, query, tc_bpf_filters,
        tc_bpf_program_ids,
    },
    packets,
};
use serde_json::Value;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const HTTP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
const DOWNLOAD: usize = 4 << 20;

/// A lab with `n` netns endpoints on the given data path, offloads off everywhere.
struct Lab {
    net: NetLab,
    eps: Vec<Ep>,
}

struct Ep {
    name: String,
    ns: NsGuard,
    ip: Ipv4Addr,
    mac: [u8; 6],
    port: String,
}

impl Lab {
    fn new(tag: &str, datapath: &str, n: usize, extra: &[&str]) -> Self {
        let net = NetLab::new(tag);
        let mut args = vec!["--datapath", datapath];
        args.extend_from_slice(extra);
        net.up(&args);
        let mut eps = Vec::new();
        for i in 0..n {
            let ns = NsGuard::new(&format!("{tag}-ep{i}"));
            // No IPv6: its router solicitations would add frames the counters tests don't send.
            ns.run(|| std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1"))
                .expect("disabling IPv6 in the endpoint");
            let name = format!("ep{i}");
            let att = net.attach_netns(&name, &ns, &[]);
            offload_off(ns.path(), "eth0");
            let port = att["link"].as_str().unwrap().to_owned();
            offload_off(net.host.path(), &port);
            eps.push(Ep {
                name,
                ip: att["ip"].as_str().unwrap().parse().unwrap(),
                mac: parse_mac(att["mac"].as_str().unwrap()),
                port,
                ns,
            });
        }
        offload_off(net.host.path(), UPLINK);
        offload_off(net.internet.path(), WAN);
        Self { net, eps }
    }

    fn stats(&self) -> Value {
        self.net.json(["stats", "--json"])
    }

    /// The counters of endpoint `name` from `micropod stats`.
    fn counters(&self, name: &str) -> Value {
        self.stats()["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no stats for {name}"))
    }
}

fn offload_off(ns: &std::path::Path, dev: &str) {
    query(ns, "ethtool", &["-K", dev, "rx", "off", "tx", "off"]);
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

fn counter(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
}

/// The byte at `i` of the download: a pattern that catches reordering and corruption.
fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 11)) as u8
}

/// An HTTP-ish server in the internet namespace: reads a request line, answers with DOWNLOAD
/// bytes of `pattern`, records each peer.
fn http_server(ns: &NsGuard) -> Arc<Mutex<Vec<SocketAddr>>> {
    let listener = ns
        .run(|| TcpListener::bind(SocketAddrV4::new(SERVER_ADDR, HTTP_PORT)))
        .expect("binding the HTTP server");
    let peers = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&peers);
    thread::spawn(move || {
        let body: Vec<u8> = (0..DOWNLOAD).map(pattern).collect();
        let body = Arc::new(body);
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            seen.lock().unwrap().push(stream.peer_addr().unwrap());
            let body = Arc::clone(&body);
            thread::spawn(move || {
                let mut req = [0u8; 512];
                let _ = stream.read(&mut req);
                let head = format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            });
        }
    });
    peers
}

/// Downloads from the server from inside `ns`; returns the body.
fn download(ns: &NsGuard) -> Vec<u8> {
    let mut stream = ns
        .run(|| {
            TcpStream::connect_timeout(
                &SocketAddr::from((SERVER_ADDR, HTTP_PORT)),
                Duration::from_secs(5),
            )
        })
        .expect("connecting to the internet server");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut all = Vec::new();
    stream.read_to_end(&mut all).expect("reading the download");
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP header");
    all.split_off(split + 4)
}

/// A UDP echo server in the internet namespace that records each peer.
fn udp_echo(ns: &NsGuard) -> Arc<Mutex<Vec<SocketAddr>>> {
    let sock = ns.udp(SocketAddr::from((SERVER_ADDR, UDP_PORT)));
    let peers = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&peers);
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            seen.lock().unwrap().push(from);
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    peers
}

/// Sends `count` datagrams from `sock` to the echo server and checks each comes back.
fn udp_roundtrips(sock: &UdpSocket, count: usize) -> usize {
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut ok = 0;
    for i in 0..count {
        let msg = format!("datagram {i} from {:?}", sock.local_addr().unwrap());
        sock.send_to(msg.as_bytes(), (SERVER_ADDR, UDP_PORT))
            .unwrap();
        let mut buf = [0u8; 2048];
        if let Ok((n, _)) = sock.recv_from(&mut buf)
            && buf[..n] == *msg.as_bytes()
        {
            ok += 1;
        }
    }
    ok
}

/// A probe in the host namespace: counters in the IPv4 PREROUTING hook (which bridged frames
/// also pass when br_netfilter is loaded) for packets to and from the internet server.
fn prerouting_probe(lab: &NetLab) {
    let rules = format!(
        "table ip mptest {{\n  chain pre {{\n    type filter hook prerouting priority -400;\n    \
         ip daddr {SERVER_ADDR} counter\n    ip saddr {SERVER_ADDR} counter\n  }}\n}}\n"
    );
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", lab.host.path().display()))
        .args(["nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(rules.as_bytes())?;
            c.wait_with_output()
        })
        .expect("running nft");
    assert!(out.status.success(), "adding the probe table");
}

/// Packets the probe counted: (to the server, from the server).
fn prerouting_packets(lab: &NetLab) -> (u64, u64) {
    let v: Value = serde_json::from_str(&query(
        lab.host.path(),
        "nft",
        &["-j", "list", "table", "ip", "mptest"],
    ))
    .unwrap();
    let counts: Vec<u64> = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["rule"]["expr"].as_array())
        .filter_map(|e| e.iter().find_map(|x| x["counter"]["packets"].as_u64()))
        .collect();
    (counts[0], counts[1])
}

fn reach_the_internet(datapath: &str) {
    let lab = Lab::new(&format!("reach-{datapath}"), datapath, 1, &[]);
    let status = lab.net.json(["network", "status", "--json"]);
    assert_eq!(status["network"]["datapath"], datapath);
    prerouting_probe(&lab.net);
    let http_peers = http_server(&lab.net.internet);
    let udp_peers = udp_echo(&lab.net.internet);
    let ep = &lab.eps[0];

    let body = download(&ep.ns);
    assert_eq!(body.len(), DOWNLOAD, "the whole download arrives");
    assert!(
        body.iter().enumerate().all(|(i, b)| *b == pattern(i)),
        "the download arrives intact"
    );
    let sock = ep.ns.udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    assert_eq!(udp_roundtrips(&sock, 20), 20, "every UDP datagram echoed");
    assert!(ping(&ep.ns, SERVER_ADDR), "ICMP echo through the NAT");

    for peer in http_peers
        .lock()
        .unwrap()
        .iter()
        .chain(udp_peers.lock().unwrap().iter())
    {
        assert_eq!(
            peer.ip(),
            std::net::IpAddr::V4(UPLINK_ADDR),
            "the server sees the uplink address"
        );
    }
    let tracked = lab.net.conntrack_flows_to_server();
    let (to_server, from_server) = prerouting_packets(&lab.net);
    if datapath == "ebpf" {
        assert_eq!(tracked, 0, "fast-path flows never enter conntrack");
        assert_eq!(
            (to_server, from_server),
            (0, 0),
            "fast-path packets never reach netfilter's PREROUTING, bridged or routed"
        );
        let nat = &lab.stats()["nat"];
        assert!(
            counter(nat, "flows_created") >= 3,
            "TCP, UDP and ICMP were translated by eBPF: {nat}"
        );
        assert!(counter(nat, "inbound_packets") > 0);
    } else {
        // The control: the same checks see MASQUERADE's flows.
        assert!(tracked >= 3, "netfilter tracks its flows ({tracked})");
        assert!(
            to_server > 100 && from_server > 100,
            "{to_server} {from_server}"
        );
    }
}

#[test]
fn tcp_udp_and_ping_reach_the_internet_through_ebpf_snat_without_conntrack() {
    reach_the_internet("ebpf");
}

#[test]
fn tcp_udp_and_ping_reach_the_internet_through_netfilter_masquerade() {
    reach_the_internet("netfilter");
}

/// A TCP socket in `ns` bound to `port`, connected to the server.
fn connect_from(ns: &NsGuard, port: u16) -> TcpStream {
    ns.run(|| {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.bind(&SockAddr::from(SocketAddrV4::new(
            Ipv4Addr::UNSPECIFIED,
            port,
        )))?;
        s.connect_timeout(
            &SockAddr::from(SocketAddrV4::new(SERVER_ADDR, HTTP_PORT + 1)),
            Duration::from_secs(5),
        )?;
        Ok::<_, std::io::Error>(TcpStream::from(s))
    })
    .unwrap_or_else(|e| panic!("connecting from port {port}: {e}"))
}

#[test]
fn parallel_connections_from_two_endpoints_on_the_same_ports_do_not_collide() {
    let lab = Lab::new("collide", "ebpf", 2, &[]);
    // An echo server: each connection sends a token and expects it back.
    let peers = tcp_echo(&lab.net.internet, HTTP_PORT + 1);
    // Inside the network's NAT ports (1024-32767 here), so that one endpoint can keep them.
    const PORTS: std::ops::Range<u16> = 20000..20024;
    let streams: Vec<(String, TcpStream)> = PORTS
        .flat_map(|port| lab.eps.iter().map(move |ep| (ep, port)))
        .map(|(ep, port)| {
            (
                format!("{} port {port}", ep.name),
                connect_from(&ep.ns, port),
            )
        })
        .collect();
    thread::scope(|s| {
        for (token, stream) in &streams {
            s.spawn(move || {
                let mut stream = stream;
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                for round in 0..5 {
                    let msg = format!("{token} round {round}");
                    stream.write_all(msg.as_bytes()).unwrap();
                    let mut buf = vec![0u8; msg.len()];
                    stream.read_exact(&mut buf).unwrap();
                    assert_eq!(
                        buf,
                        msg.as_bytes(),
                        "each connection gets its own bytes back"
                    );
                }
            });
        }
    });
    let peers: BTreeSet<SocketAddr> = peers.lock().unwrap().iter().copied().collect();
    assert_eq!(
        peers.len(),
        2 * PORTS.len(),
        "every connection has its own translated port"
    );
    assert!(
        peers
            .iter()
            .all(|p| p.ip() == std::net::IpAddr::V4(UPLINK_ADDR))
    );
    let kept = peers.iter().filter(|p| PORTS.contains(&p.port())).count();
    assert_eq!(
        kept,
        PORTS.len(),
        "one endpoint keeps each source port, the other gets a free one"
    );
}

#[test]
fn counters_match_the_ports_interface_statistics() {
    let lab = Lab::new("counters", "ebpf", 2, &[]);
    let _peers = http_server(&lab.net.internet);
    let _udp = udp_echo(&lab.net.internet);
    let (a, b) = (&lab.eps[0], &lab.eps[1]);
    // To the outside, to the host, and endpoint to endpoint, both ways.
    assert_eq!(download(&a.ns).len(), DOWNLOAD);
    let sock = a.ns.udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    assert_eq!(udp_roundtrips(&sock, 10), 10);
    assert!(ping(&a.ns, Ipv4Addr::new(10, 10, 0, 1)), "gateway answers");
    let rb = b.ns.udp(SocketAddr::from((b.ip, 7000)));
    let ra = a.ns.udp(SocketAddr::from((a.ip, 7000)));
    rb.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    ra.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for i in 0..25u32 {
        ra.send_to(&vec![i as u8; 100 + i as usize], (b.ip, 7000))
            .unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = rb.recv_from(&mut buf).expect("a → b");
        assert_eq!(n, 100 + i as usize);
        rb.send_to(&buf[..n], from).unwrap();
        ra.recv_from(&mut buf).expect("b → a");
    }
    // Compare once the links are quiet (the kernel may still send an ARP refresh).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut all_equal = true;
        let mut report = String::new();
        for ep in &lab.eps {
            let before = lab.net.port_stats(&ep.port);
            let c = lab.counters(&ep.name);
            let after = lab.net.port_stats(&ep.port);
            let ours = [
                counter(&c, "tx_packets"),
                counter(&c, "tx_bytes"),
                counter(&c, "rx_packets"),
                counter(&c, "rx_bytes"),
            ];
            report += &format!("{}: ours {ours:?} kernel {after:?}\n", ep.name);
            all_equal &= before == after && ours == after;
        }
        if all_equal {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counters (endpoint tx = port rx, endpoint rx = port tx) differ:\n{report}"
        );
        thread::sleep(Duration::from_millis(300));
    }
    let c = lab.counters(&a.name);
    assert!(
        counter(&c, "rx_bytes") > DOWNLOAD as u64,
        "the download counted"
    );
}

/// Sends raw frames out of `eth0` inside `ns`.
fn send_frames(ns: &NsGuard, frames: &[Vec<u8>]) {
    ns.run(|| {
        let sock = Socket::new(
            Domain::PACKET,
            Type::RAW,
            Some(Protocol::from(i32::from(0x0003_u16.to_be()))),
        )
        .expect("packet socket");
        let index = micropod::net::link::IndexProbe::new()
            .and_then(|p| p.index("eth0"))
            .expect("probing eth0")
            .expect("eth0 exists") as i32;
        for frame in frames {
            let mut storage = socket2::SockAddrStorage::zeroed();
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_ll, and a
            // zeroed sockaddr_ll is valid; the length passed below is that of a sockaddr_ll.
            let addr = unsafe {
                let ll = storage.view_as::<nix::libc::sockaddr_ll>();
                ll.sll_family = nix::libc::AF_PACKET as u16;
                ll.sll_ifindex = index;
                ll.sll_halen = 6;
                ll.sll_addr[..6].copy_from_slice(&frame[..6]);
                SockAddr::new(
                    storage,
                    size_of::<nix::libc::sockaddr_ll>() as nix::libc::socklen_t,
                )
            };
            sock.send_to(frame, &addr).expect("sending a raw frame");
        }
    });
}

fn udp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&4444u16.to_be_bytes());
    udp.extend_from_slice(&UDP_PORT.to_be_bytes());
    udp.extend_from_slice(&(8u16 + 6).to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // no checksum
    udp.extend_from_slice(b"spoof!");
    packets::ethernet(dst_mac, src_mac, 0x0800, &packets::ipv4(src, dst, 17, &udp))
}

/// `frame` with two VLAN tags after its MACs: `outer`, then an 802.1Q one.
fn stack_vlans(frame: Vec<u8>, outer: u16) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    for (tpid, vid) in [(outer, 100u16), (0x8100, 200)] {
        out.extend_from_slice(&tpid.to_be_bytes());
        out.extend_from_slice(&vid.to_be_bytes());
    }
    out.extend_from_slice(&frame[12..]);
    out
}

#[test]
fn spoofed_ip_mac_and_arp_are_dropped_and_counted_and_the_victim_is_unaffected() {
    let lab = Lab::new("spoof", "ebpf", 2, &[]);
    let udp_peers = udp_echo(&lab.net.internet);
    let (attacker, victim) = (&lab.eps[0], &lab.eps[1]);
    let gateway_mac = [0x02, 0x6d, 10, 10, 0, 1];
    // The victim talks first, so the bridge and the gateway know where it is.
    let vs = victim.ns.udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    assert_eq!(udp_roundtrips(&vs, 3), 3);
    let before = lab.counters(&attacker.name);

    let spoofed_ip: Vec<_> = (0..10)
        .map(|_| udp_frame(attacker.mac, gateway_mac, victim.ip, SERVER_ADDR))
        .collect();
    let spoofed_mac: Vec<_> = (0..7)
        .map(|_| udp_frame(victim.mac, gateway_mac, victim.ip, SERVER_ADDR))
        .collect();
    // Gratuitous ARP claiming the victim's address for the attacker's MAC.
    let spoofed_arp: Vec<_> = (0..5)
        .map(|_| packets::arp_request(attacker.mac, victim.ip, victim.ip))
        .collect();
    // The attacker's own MAC, the victim's address inside stacked VLAN tags: the kernel
    // strips the outer 802.1Q/802.1ad tag before TC, the inner one hides the IPv4 header.
    // 0x9100 (pre-standard QinQ) is not stripped at all. One of each to the gateway (for the
    // server) and to the victim's MAC directly.
    let stacked: Vec<_> = [0x88a8u16, 0x8100, 0x9100]
        .into_iter()
        .flat_map(|outer| {
            [gateway_mac, victim.mac]
                .map(|dst| stack_vlans(udp_frame(attacker.mac, dst, victim.ip, SERVER_ADDR), outer))
        })
        .collect();
    send_frames(&attacker.ns, &spoofed_ip);
    send_frames(&attacker.ns, &spoofed_mac);
    send_frames(&attacker.ns, &spoofed_arp);
    send_frames(&attacker.ns, &stacked);
    thread::sleep(Duration::from_millis(300));

    let after = lab.counters(&attacker.name);
    let drops = |v: &Value, reason: &str| v["drops"][reason].as_u64().unwrap();
    assert_eq!(
        drops(&after, "spoofed_ip") - drops(&before, "spoofed_ip"),
        10
    );
    assert_eq!(
        drops(&after, "spoofed_mac") - drops(&before, "spoofed_mac"),
        7
    );
    assert_eq!(
        drops(&after, "spoofed_arp") - drops(&before, "spoofed_arp"),
        5
    );
    // All six were shot at the attacker's own port, before the bridge: none reached the host
    // or the victim. (The victim's rx counters are no witness: the host talks to it too.)
    assert_eq!(
        drops(&after, "stacked_vlan") - drops(&before, "stacked_vlan"),
        6
    );
    assert_eq!(
        udp_peers.lock().unwrap().len(),
        3,
        "no spoofed datagram reached the server"
    );
    // The gateway still has the victim's MAC for its address, and the bridge still has the
    // victim's MAC on the victim's port.
    let neigh = ip_json(
        lab.net.host.path(),
        &["neigh", "show", &victim.ip.to_string()],
    );
    for n in neigh.as_array().unwrap() {
        if let Some(ll) = n["lladdr"].as_str() {
            assert_eq!(parse_mac(ll), victim.mac, "ARP poisoning failed: {neigh}");
        }
    }
    let fdb: Value = serde_json::from_str(&query(
        lab.net.host.path(),
        "bridge",
        &["-j", "fdb", "show", "br", "micropod0"],
    ))
    .unwrap();
    let victim_mac = victim
        .mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    for e in fdb.as_array().unwrap() {
        if e["mac"] == victim_mac {
            assert_eq!(
                e["ifname"], victim.port,
                "the victim's MAC stays on its port"
            );
        }
    }
    assert_eq!(
        udp_roundtrips(&vs, 5),
        5,
        "the victim's traffic is unaffected"
    );
    assert!(ping(&victim.ns, SERVER_ADDR));
}

#[test]
fn auto_falls_back_to_netfilter_when_the_object_cannot_load_and_ebpf_refuses() {
    let net = NetLab::new("fallback");
    let bogus = net.dirs.state.join("bogus.o");
    std::fs::write(&bogus, b"this is not an ELF object").unwrap();
    let env = micropod::datapath::OBJECT_ENV;

    // --datapath ebpf: refused, and nothing is left behind.
    let before = micropod_tests::netlab::snapshot(net.host.path());
    let out = net
        .micropod(["network", "up", "--datapath", "ebpf"])
        .env(env, &bogus)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("eBPF data path"), "{err}");
    assert!(err.contains("--datapath auto"), "says what to do: {err}");
    assert_eq!(micropod_tests::netlab::snapshot(net.host.path()), before);
    assert!(net.state_doc().is_none(), "no record of a network");

    // auto: falls back, says why, and NAT still works.
    let out = net
        .micropod(["network", "up", "--json"])
        .env(env, &bogus)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["network"]["datapath"], "netfilter");
    let note = status["network"]["datapath_note"].as_str().unwrap();
    assert!(note.contains("eBPF unavailable"), "{note}");
    let text = net.ok(["network", "status"]);
    assert!(text.contains("eBPF unavailable"), "{text}");
    let pins = net.dirs.pins.join("micropod");
    assert!(
        !pins.exists() || std::fs::read_dir(&pins).unwrap().next().is_none(),
        "no pins left from the failed load"
    );
    let ns = NsGuard::new("fallback-ep");
    net.attach_netns("ep", &ns, &[]);
    assert!(ping(&ns, SERVER_ADDR), "MASQUERADE serves");
    let stats = net.json(["stats", "--json"]);
    assert_eq!(stats["datapath"], "netfilter");
}

#[test]
fn a_full_nat_table_refuses_new_flows_with_a_counted_reason_and_keeps_the_others() {
    // 16 entries: 8 flows.
    let lab = Lab::new("natfull", "ebpf", 1, &["--nat-table-size", "16"]);
    let _udp = udp_echo(&lab.net.internet);
    let ep = &lab.eps[0];
    let socks: Vec<UdpSocket> = (0..12)
        .map(|_| ep.ns.udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))))
        .collect();
    let answered: Vec<bool> = socks.iter().map(|s| udp_roundtrips(s, 1) == 1).collect();
    assert_eq!(
        answered,
        [vec![true; 8], vec![false; 4]].concat(),
        "the first 8 flows fit, the rest are refused"
    );
    let c = lab.counters(&ep.name);
    assert!(c["drops"]["nat_table_full"].as_u64().unwrap() >= 4, "{c}");
    let nat = &lab.stats()["nat"];
    assert_eq!(counter(nat, "entries"), 16);
    assert_eq!(counter(nat, "capacity"), 16);
    assert!(counter(nat, "table_full") >= 4);
    for s in &socks[..8] {
        assert_eq!(udp_roundtrips(s, 3), 3, "existing flows keep working");
    }
    let out = lab.net.run(["network", "up", "--nat-table-size", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nat-table-size"));
}

fn tcx_programs(ns: &NsGuard, iface: &str, direction: aya::programs::TcAttachType) -> usize {
    tcx_program_ids(ns, iface, direction).len()
}

/// The ids of the TCX programs on `iface`'s `direction`.
fn tcx_program_ids(ns: &NsGuard, iface: &str, direction: aya::programs::TcAttachType) -> Vec<u32> {
    let name = std::ffi::CString::new(iface).unwrap();
    ns.run(|| aya::programs::SchedClassifier::query_tcx(name.as_c_str(), direction))
        .map(|(_, progs)| progs.iter().map(aya::programs::ProgramInfo::id).collect())
        .unwrap_or_else(|e| panic!("querying TCX on {iface}: {e}"))
}

/// The names of the pin dir's markers that start with `prefix` (`layout-`, `object-`).
fn pin_markers(pins: &std::path::Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(pins)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[test]
fn up_and_gc_hook_again_a_port_that_lost_its_programs() {
    let lab = Lab::new("rehook", "ebpf", 2, &[]);
    let host = &lab.net.host;
    let (lost, kept) = (&lab.eps[0], &lab.eps[1]);
    for hook in ["ingress", "egress"] {
        query(
            host.path(),
            "tc",
            &[
                "filter", "del", "dev", &lost.port, hook, "pref", "1", "handle", "0x6d70", "bpf",
            ],
        );
        assert_eq!(
            tc_bpf_filters(host.path(), &lost.port, hook),
            Vec::<String>::new()
        );
    }
    // Without its programs the port counts nothing.
    let before = counter(&lab.counters(&lost.name), "tx_packets");
    assert!(ping(&lost.ns, SERVER_ADDR));
    assert_eq!(counter(&lab.counters(&lost.name), "tx_packets"), before);

    // The same `up` again puts them back, and leaves the other port's filters as they were.
    lab.net.up(&["--datapath", "ebpf"]);
    let hooked = |port: &str| {
        (
            tc_bpf_filters(host.path(), port, "ingress"),
            tc_bpf_filters(host.path(), port, "egress"),
        )
    };
    let expected = (
        vec!["port_ingress@1/0x6d70".to_owned()],
        vec!["port_egress@1/0x6d70".to_owned()],
    );
    assert_eq!(hooked(&lost.port), expected);
    assert_eq!(hooked(&kept.port), expected);
    assert!(ping(&lost.ns, SERVER_ADDR));
    assert!(
        counter(&lab.counters(&lost.name), "tx_packets") > before,
        "the port counts again"
    );

    // `gc` does the same.
    for hook in ["ingress", "egress"] {
        query(
            host.path(),
            "tc",
            &[
                "filter", "del", "dev", &lost.port, hook, "pref", "1", "handle", "0x6d70", "bpf",
            ],
        );
    }
    lab.net.ok(["gc"]);
    assert_eq!(hooked(&lost.port), expected);
    assert_eq!(hooked(&kept.port), expected);
}

#[test]
fn detach_and_down_remove_exactly_what_they_added() {
    use aya::programs::TcAttachType::{Egress, Ingress};
    let lab = Lab::new("remove", "ebpf", 2, &[]);
    let host = &lab.net.host;
    // Someone else's program on the uplink, which micropod must leave alone.
    let mut other = micropod::datapath::SourceCounter::load().expect("loading count_src");
    other
        .attach(host.ns(), UPLINK, micropod::datapath::Direction::Ingress)
        .expect("attaching count_src");
    assert_eq!(tcx_programs(host, UPLINK, Ingress), 2);
    assert_eq!(
        tcx_programs(host, "micropod0", Ingress),
        0,
        "the bridge needs no program"
    );
    // The ports' programs are cls_bpf filters on clsact (no TCX link, no pin), in micropod's
    // slot (priority 1, handle 0x6d70).
    let filters = |port: &str| {
        (
            tc_bpf_filters(host.path(), port, "ingress"),
            tc_bpf_filters(host.path(), port, "egress"),
        )
    };
    let hooked = (
        vec!["port_ingress@1/0x6d70".to_owned()],
        vec!["port_egress@1/0x6d70".to_owned()],
    );
    for ep in &lab.eps {
        assert_eq!(tcx_programs(host, &ep.port, Ingress), 0);
        assert_eq!(tcx_programs(host, &ep.port, Egress), 0);
        assert_eq!(filters(&ep.port), hooked, "{}", ep.port);
    }
    let links = lab.net.dirs.pins.join("micropod/links");
    let port_pins = || {
        std::fs::read_dir(&links)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with(UPLINK))
            .collect::<Vec<_>>()
    };
    assert_eq!(port_pins(), Vec::<String>::new(), "ports pin no links");
    let (a, b) = (&lab.eps[0], &lab.eps[1]);

    lab.net.ok(["network", "detach", &a.name]);
    let port_links = ip_json(host.path(), &["link", "show"]);
    assert!(
        !port_links
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["ifname"] == a.port.as_str()),
        "{} is no longer a port: {port_links}",
        a.port
    );
    assert_eq!(filters(&b.port), hooked, "{}", b.port);
    let stats = lab.stats();
    assert_eq!(stats["endpoints"].as_array().unwrap().len(), 1);

    // The same address again starts from zero.
    assert!(ping(&b.ns, SERVER_ADDR));
    let again = NsGuard::new("remove-again");
    let att = lab
        .net
        .attach_netns("again", &again, &["--ip", &a.ip.to_string()]);
    assert_eq!(att["ip"], a.ip.to_string());
    let c = lab.counters("again");
    assert!(
        counter(&c, "tx_packets") < 10 && counter(&c, "rx_bytes") < 2000,
        "a reused address does not inherit counts: {c}"
    );

    lab.net.ok(["network", "down", "--force"]);
    assert_eq!(
        tcx_programs(host, UPLINK, Ingress),
        1,
        "only the other program stays"
    );
    assert!(!lab.net.dirs.pins.join("micropod").exists(), "no pins left");
    drop(other);
    assert_eq!(tcx_programs(host, UPLINK, Ingress), 0);
}

/// A TCP echo server in the internet namespace on `port`; records each peer.
fn tcp_echo(ns: &NsGuard, port: u16) -> Arc<Mutex<Vec<SocketAddr>>> {
    let listener = ns
        .run(|| TcpListener::bind(SocketAddrV4::new(SERVER_ADDR, port)))
        .expect("binding the echo server");
    let peers = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&peers);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            seen.lock().unwrap().push(s.peer_addr().unwrap());
            thread::spawn(move || {
                let mut buf = [0u8; 256];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    peers
}

/// One short exchange on a new connection from `port`, closed by the client.
fn exchange(ns: &NsGuard, port: u16) {
    let mut s = connect_from(ns, port);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    s.shutdown(std::net::Shutdown::Both).unwrap();
}

#[test]
fn closed_tcp_flows_expire_are_reclaimed_by_new_flows_and_swept_by_gc() {
    let lab = Lab::new("expire", "ebpf", 2, &[]);
    let peers = tcp_echo(&lab.net.internet, HTTP_PORT + 1);
    let (a, b) = (&lab.eps[0], &lab.eps[1]);
    // Ports inside the network's NAT ports (1024-32767 here), which a flow may keep.
    exchange(&a.ns, 21000);
    exchange(&a.ns, 21001);
    // Let the FINs through, then wait out the closing timeout (10 s).
    thread::sleep(Duration::from_millis(500));
    let nat = &lab.stats()["nat"];
    assert_eq!(counter(nat, "flows"), 2, "{nat}");
    thread::sleep(Duration::from_secs(11));

    // b on a's old port: the reply slot is a's stale flow, which b takes over, keeping the port.
    exchange(&b.ns, 21000);
    let nat = &lab.stats()["nat"];
    assert_eq!(counter(nat, "reclaimed"), 1, "{nat}");
    let last = *peers.lock().unwrap().last().unwrap();
    assert_eq!(
        last.port(),
        21000,
        "the stale slot was reused, so b kept its port"
    );

    // gc sweeps what is left of a's second flow; b's closed flow is too fresh to go.
    lab.net.ok(["gc"]);
    let nat = &lab.stats()["nat"];
    assert_eq!(counter(nat, "flows"), 1, "{nat}");
    assert_eq!(counter(nat, "entries"), 2, "{nat}");
}

#[test]
fn a_new_default_route_moves_the_uplink_program_and_the_snat_address() {
    use aya::programs::TcAttachType::Ingress;
    let lab = Lab::new("moveup", "ebpf", 1, &[]);
    let (host, internet) = (lab.net.host.path(), lab.net.internet.path());
    let udp = udp_echo(&lab.net.internet);
    // A second way out: uplink1 198.51.100.1/30 <-> wan1 198.51.100.2/30, and the default
    // route moved to it.
    let wan1 = internet.to_str().unwrap();
    query(
        host,
        "ip",
        &[
            "link", "add", "uplink1", "type", "veth", "peer", "name", "wan1", "netns", wan1,
        ],
    );
    query(
        host,
        "ip",
        &["addr", "add", "198.51.100.1/30", "dev", "uplink1"],
    );
    query(host, "ip", &["link", "set", "uplink1", "up"]);
    query(
        internet,
        "ip",
        &["addr", "add", "198.51.100.2/30", "dev", "wan1"],
    );
    query(internet, "ip", &["link", "set", "wan1", "up"]);
    offload_off(host, "uplink1");
    offload_off(internet, "wan1");
    query(
        host,
        "ip",
        &[
            "route",
            "replace",
            "default",
            "via",
            "198.51.100.2",
            "dev",
            "uplink1",
        ],
    );

    let status = lab
        .net
        .json(["network", "up", "--datapath", "ebpf", "--json"]);
    assert_eq!(
        status["outcome"], "unchanged",
        "auto follows the default route"
    );
    assert_eq!(status["network"]["uplink"], "uplink1");
    assert_eq!(tcx_programs(&lab.net.host, "uplink1", Ingress), 1);
    assert_eq!(
        tcx_programs(&lab.net.host, UPLINK, Ingress),
        0,
        "the old link is gone"
    );
    let sock = lab.eps[0]
        .ns
        .udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    assert_eq!(udp_roundtrips(&sock, 5), 5);
    let seen = udp.lock().unwrap().last().copied().unwrap();
    assert_eq!(
        seen.ip(),
        std::net::IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1))
    );
    let nat = &lab.stats()["nat"];
    assert!(
        counter(nat, "flows_created") >= 1,
        "through the eBPF SNAT: {nat}"
    );
}

/// `network up` is idempotent: run again and again under `auto` it keeps the uplink's TCX
/// link as it is (the kernel releases a replaced link later, on a workqueue, and attaching
/// the program again before that failed with EEXIST, which `auto` took as "eBPF does not
/// work here" and fell back to netfilter under running endpoints).
#[test]
fn repeated_up_keeps_the_ebpf_data_path_and_the_uplink_link() {
    use aya::programs::TcAttachType::Ingress;
    let net = NetLab::new("repeat");
    net.up(&[]);
    let ns = NsGuard::new("repeat-ep");
    net.attach_netns("ep", &ns, &[]);
    let link_pin = net
        .dirs
        .pins
        .join("micropod/links")
        .join(format!("{UPLINK}-ingress"));
    let pinned =
        |what: &str| std::fs::metadata(&link_pin).unwrap_or_else(|e| panic!("{what}: {e}"));
    use std::os::unix::fs::MetadataExt as _;
    let first = pinned("after the first up").ino();
    for i in 0..20 {
        let status = net.json(["network", "up", "--json"]);
        assert_eq!(status["network"]["datapath"], "ebpf", "up #{i}: {status}");
        assert!(
            status["network"]["datapath_note"].is_null(),
            "up #{i}: {status}"
        );
        assert_eq!(tcx_programs(&net.host, UPLINK, Ingress), 1, "up #{i}");
        assert_eq!(
            pinned("after up").ino(),
            first,
            "up #{i} replaced the uplink's link"
        );
    }
    assert!(ping(&ns, SERVER_ADDR), "SNAT still serves");
}

/// A micropod of another data path layout (another version) must not misread the pins: every
/// command that opens them refuses and says to run `network up`, which replaces them while the
/// endpoints stay attached and keep working.
/// Pins of another layout are refused by every reader, and `up` upgrades them in place while
/// an endpoint streams UDP through the NAT: one paced datagram every 2 ms, the longest gap
/// at the server < 100 ms, the same translated port throughout (the NAT flow was kept), the
/// endpoint's counters carried over. The test layout (`MICROPOD_TEST_LAYOUT`) also changes a
/// map's definition (the counters' capacity), so the upgrade copies that map and reuses the
/// others. Then a downgrade, in place too.
#[test]
fn pins_of_another_layout_are_refused_and_upgraded_in_place_by_up() {
    let net = NetLab::new("layout");
    net.up(&[]);
    let ns = NsGuard::new("layout-ep");
    ns.run(|| std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1"))
        .unwrap();
    net.attach_netns("ep", &ns, &[]);
    assert!(ping(&ns, SERVER_ADDR));
    let env = micropod::datapath::LAYOUT_ENV;
    let own = micropod_common::DATAPATH_LAYOUT;
    let newer = (own + 1).to_string();
    let pins = net.dirs.pins.join("micropod");
    let layout = || pin_markers(&pins, micropod::datapath::LAYOUT_PREFIX);
    assert_eq!(layout(), [format!("layout-{own}")]);
    let refused = |layout: &str, args: &[&str], found: u32| {
        let out = net.micropod(args).env(env, layout).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} with layout {layout} succeeded"
        );
        assert!(
            stderr.contains(&format!("has layout {found}")) && stderr.contains("network up"),
            "{args:?}: {stderr}"
        );
    };
    // A newer micropod meets the pins of this one.
    refused(&newer, &["stats", "--json"], own);
    refused(&newer, &["network", "attach", "b", "--kind", "tap"], own);
    let names: Vec<Value> = net
        .json(["network", "ls", "--json"])
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(names.len(), 1, "the refused attach left nothing: {names:?}");

    // The stream: from a port outside the NAT ports, so its flow has a random translated
    // port, which a flow made anew would not keep.
    let server = net.internet.udp(SocketAddr::from((SERVER_ADDR, UDP_PORT)));
    server
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let client = ns.udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 40000)));
    const SENT: u32 = 1500;
    const PACE: Duration = Duration::from_millis(2);
    let (arrivals, up, upgrade_took) = thread::scope(|s| {
        let receiver = s.spawn(|| {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = server.recv_from(&mut buf) {
                if n == 4 {
                    let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
                    got.push((seq, Instant::now(), from));
                }
            }
            got
        });
        let sender = s.spawn(|| {
            let start = Instant::now();
            for seq in 0..SENT {
                let due = start + PACE * seq;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
                client
                    .send_to(&seq.to_be_bytes(), (SERVER_ADDR, UDP_PORT))
                    .unwrap();
            }
        });
        thread::sleep(Duration::from_secs(1));
        let started = Instant::now();
        let out = net
            .micropod(["network", "up", "--json"])
            .env(env, &newer)
            .output()
            .unwrap();
        let took = started.elapsed();
        sender.join().unwrap();
        (receiver.join().unwrap(), out, took)
    });
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let up: Value = serde_json::from_slice(&up.stdout).unwrap();
    let note = up["network"]["datapath_note"].as_str().unwrap_or_default();
    assert_eq!(up["network"]["datapath"], "ebpf", "{up}");
    assert!(
        note.contains(&format!(
            "upgraded the data path from layout {own} to {newer} in place"
        )) && note.contains("NAT")
            && note.contains("EP_COUNTERS")
            && !note.contains("not kept"),
        "{up}"
    );
    assert_eq!(layout(), [format!("layout-{newer}")]);

    let gap = arrivals.windows(2).map(|w| w[1].1 - w[0].1).max().unwrap();
    let peers: BTreeSet<SocketAddr> = arrivals.iter().map(|a| a.2).collect();
    // The interruption is the longest run of datagrams that never arrived, at the pace they
    // were sent; gaps between arrivals also count the threads' scheduling on a busy machine.
    let seqs: BTreeSet<u32> = arrivals.iter().map(|a| a.0).collect();
    let mut run = 0u32;
    let mut longest = 0u32;
    for seq in 0..SENT {
        run = if seqs.contains(&seq) { 0 } else { run + 1 };
        longest = longest.max(run);
    }
    let interruption = PACE * longest;
    eprintln!(
        "upgrade in place: `up` took {upgrade_took:?}; {} of {SENT} datagrams arrived; interruption {interruption:?} (longest gap between arrivals {gap:?}); translated as {peers:?}",
        arrivals.len()
    );
    assert!(
        interruption < Duration::from_millis(100),
        "the stream stopped for {interruption:?}"
    );
    assert!(
        arrivals.len() as u32 >= SENT - 50,
        "{} of {SENT} arrived",
        arrivals.len()
    );
    assert_eq!(peers.len(), 1, "one NAT flow throughout: {peers:?}");
    assert_ne!(
        peers.first().unwrap().port(),
        40000,
        "outside the NAT ports, the client's port is translated"
    );

    let out = net
        .micropod(["stats", "--json"])
        .env(env, &newer)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ep = &stats["endpoints"][0];
    assert_eq!(ep["name"], "ep");
    assert!(
        counter(ep, "tx_packets") >= u64::from(SENT) - 50,
        "the counters carried over the upgrade: {ep}"
    );
    assert!(
        counter(&stats["nat"], "flows") >= 1,
        "the flow is in the new NAT table: {stats}"
    );

    // The older micropod (a downgrade) refuses the newer pins, and its `up` puts its own back.
    refused(&own.to_string(), &["stats", "--json"], own + 1);
    net.up(&[]);
    assert_eq!(layout(), [format!("layout-{own}")]);
    assert!(ping(&ns, SERVER_ADDR));
    let ep = &net.json(["stats", "--json"])["endpoints"][0];
    assert!(counter(ep, "tx_packets") >= u64::from(SENT), "{ep}");
}

#[test]
fn programs_of_another_build_are_replaced_in_place_by_up() {
    let net = NetLab::new("object");
    net.up(&[]);
    let ns = NsGuard::new("object-ep");
    ns.run(|| std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1"))
        .unwrap();
    let att = net.attach_netns("ep", &ns, &[]);
    let port = att["link"].as_str().unwrap().to_owned();
    assert!(ping(&ns, SERVER_ADDR));
    let pins = net.dirs.pins.join("micropod");
    let recorded = || pin_markers(&pins, micropod::datapath::OBJECT_PREFIX);
    let own_bytes = micropod::datapath::own_object().unwrap();
    let own = micropod::datapath::object_id(&own_bytes);
    assert_eq!(recorded(), [format!("object-{own}")]);
    let status = net.json(["network", "status", "--json"]);
    assert_eq!(status["network"]["datapath_object"], own.as_str());
    assert!(
        net.ok(["network", "status"])
            .contains(&format!("object {own}"))
    );

    // Another build of the same layout: the same object with bytes of its own after it (an
    // ELF reader ignores them), so its id differs and its programs load as new ones.
    let mut other_bytes = own_bytes;
    other_bytes.extend_from_slice(b"\0another build");
    let other = micropod::datapath::object_id(&other_bytes);
    let other_object = net.dirs.state.join("other.o");
    std::fs::write(&other_object, &other_bytes).unwrap();
    let env = micropod::datapath::OBJECT_ENV;
    let programs = || {
        (
            tc_bpf_program_ids(net.host.path(), &port, "ingress"),
            tc_bpf_program_ids(net.host.path(), &port, "egress"),
            tcx_program_ids(&net.host, UPLINK, aya::programs::TcAttachType::Ingress),
        )
    };
    let before = programs();
    assert!(
        before.0.len() == 1 && before.1.len() == 1 && before.2.len() == 1,
        "{before:?}"
    );
    let tx_before = counter(&net.json(["stats", "--json"])["endpoints"][0], "tx_packets");

    // Other commands use the pins as they are: the layout is the same.
    let out = net
        .micropod(["stats", "--json"])
        .env(env, &other_object)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(programs(), before, "stats changed no hook");

    let up = |object: &std::path::Path| -> Value {
        let out = net
            .micropod(["network", "up", "--json"])
            .env(env, object)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let status = up(&other_object);
    let note = status["network"]["datapath_note"]
        .as_str()
        .unwrap_or_default();
    assert!(
        note.contains(&format!(
            "replaced the data path's programs with this build's in place (object {own} to {other}"
        )) && note.contains("NAT")
            && note.contains("EP_COUNTERS")
            && !note.contains("not kept"),
        "{status}"
    );
    assert_eq!(status["network"]["datapath"], "ebpf");
    assert_eq!(status["network"]["datapath_object"], other.as_str());
    assert_eq!(recorded(), [format!("object-{other}")]);
    let after = programs();
    for (what, b, a) in [
        ("port ingress", &before.0, &after.0),
        ("port egress", &before.1, &after.1),
    ] {
        assert!(a.len() == 1 && a != b, "{what}: {b:?} -> {a:?}");
    }
    assert!(
        after.2.len() == 1 && after.2 != before.2,
        "uplink: {:?} -> {:?}",
        before.2,
        after.2
    );
    assert!(
        ping(&ns, SERVER_ADDR),
        "traffic goes on through the new programs"
    );
    let ep = &net.json(["stats", "--json"])["endpoints"][0];
    assert!(counter(ep, "tx_packets") > tx_before, "counters kept: {ep}");

    // The same build again changes nothing; this build's `up` puts its own programs back.
    let status = up(&other_object);
    assert!(
        !status["network"]["datapath_note"]
            .as_str()
            .unwrap_or_default()
            .contains("replaced"),
        "{status}"
    );
    assert_eq!(programs(), after, "a repeated up keeps the hooks");
    net.up(&[]);
    assert_eq!(recorded(), [format!("object-{own}")]);
    assert_ne!(programs(), after);
    assert!(ping(&ns, SERVER_ADDR));
}

/// Sends `msg` on a connection to the echo server and checks it comes back within 5 s.
fn echo(s: &mut TcpStream, msg: &str) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(msg.as_bytes()).unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("{msg}: {e}"));
    assert_eq!(buf, msg.as_bytes());
}

/// The NAT ports `network status` reports.
fn nat_ports(net: &NetLab) -> std::ops::RangeInclusive<u16> {
    let status = net.json(["network", "status", "--json"]);
    let text = status["network"]["nat_ports"].as_str().unwrap().to_owned();
    let (a, b) = text.split_once('-').unwrap();
    a.parse().unwrap()..=b.parse().unwrap()
}

/// A host connection to the server from its ephemeral port P, then an endpoint connecting to
/// the same server port from P too: both connections keep working, and the endpoint's flow
/// is translated to another port. On eBPF that is a port of the network's NAT range, apart
/// from the host's ephemeral ports (the SNAT kept P before, taking the host connection's
/// 5-tuple: the host's connection died); on netfilter conntrack sees the host's connection
/// and picks another port itself.
fn translated_flows_keep_off_the_hosts_ports(datapath: &str) {
    let lab = Lab::new(&format!("hostports-{datapath}"), datapath, 1, &[]);
    let ports = nat_ports(&lab.net);
    let ephemeral: Vec<u16> = query(
        lab.net.host.path(),
        "cat",
        &["/proc/sys/net/ipv4/ip_local_port_range"],
    )
    .split_whitespace()
    .map(|p| p.parse().unwrap())
    .collect();
    assert_eq!(ephemeral, [32768, 60999], "the kernel's default");
    if datapath == "ebpf" {
        assert_eq!(
            ports,
            1024..=32767,
            "the largest run the host's ports leave"
        );
    } else {
        assert_eq!(
            ports,
            32768..=65535,
            "conntrack keeps clients' ports where it can"
        );
    }
    let peers = tcp_echo(&lab.net.internet, HTTP_PORT + 1);
    let mut host = lab
        .net
        .host
        .run(|| {
            TcpStream::connect_timeout(
                &SocketAddr::from((SERVER_ADDR, HTTP_PORT + 1)),
                Duration::from_secs(5),
            )
        })
        .expect("the host connects to the server");
    let p = host.local_addr().unwrap().port();
    assert!((32768..=60999).contains(&p), "an ephemeral port: {p}");
    let mut ep = connect_from(&lab.eps[0].ns, p);
    for (what, s) in [("host", &mut host), ("endpoint", &mut ep)] {
        for round in 0..3 {
            echo(s, &format!("{what}'s connection, round {round}"));
        }
    }
    let peers = peers.lock().unwrap().clone();
    assert_eq!(peers.len(), 2, "{peers:?}");
    assert_eq!(
        peers[0],
        SocketAddr::from((UPLINK_ADDR, p)),
        "the host's own"
    );
    assert_eq!(peers[1].ip(), std::net::IpAddr::V4(UPLINK_ADDR));
    assert_ne!(
        peers[1].port(),
        p,
        "the endpoint's flow took the host's port"
    );
    assert!(
        ports.contains(&peers[1].port()),
        "the endpoint's flow got port {}, outside the NAT ports {ports:?}",
        peers[1].port()
    );
}

#[test]
fn ebpf_translated_flows_keep_off_the_hosts_ports() {
    translated_flows_keep_off_the_hosts_ports("ebpf");
}

#[test]
fn netfilter_translated_flows_keep_off_the_hosts_ports() {
    translated_flows_keep_off_the_hosts_ports("netfilter");
}

/// Two eBPF networks in one namespace translate to the same uplink address, each with its
/// own NAT table: their NAT ports are disjoint, so endpoints of both connecting from the same
/// port to the same server both get through.
#[test]
fn two_networks_on_one_uplink_translate_to_disjoint_ports() {
    let lab = Lab::new("twonat", "ebpf", 1, &[]);
    let other = micropod_tests::TestDirs::new("twonat-b");
    let other_pins = other.pins.join("micropod");
    let second_cmd = |args: &[&str]| lab.net.micropod_in(&other.state, &other_pins, args);
    let second = |args: &[&str]| -> Value {
        let out = second_cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    // Asking for ports of the first network is refused, naming it.
    let out = second_cmd(&[
        "network",
        "up",
        "--bridge",
        "mpnetb",
        "--subnet",
        "10.11.0.0/24",
        "--nat-ports",
        "30000-31000",
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("overlaps 1024-32767, the NAT ports of network micropod0"),
        "{err}"
    );
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
    let status = second(&["network", "status", "--json"]);
    assert_eq!(status["network"]["nat_ports"], "61000-65535");
    assert_eq!(status["network"]["datapath"], "ebpf");
    assert_eq!(nat_ports(&lab.net), 1024..=32767);

    let b_ns = NsGuard::new("twonat-b-ep");
    b_ns.run(|| std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1"))
        .unwrap();
    second(&[
        "network",
        "attach",
        "b0",
        "--kind",
        "netns",
        "--netns",
        b_ns.path().to_str().unwrap(),
        "--json",
    ]);
    let peers = tcp_echo(&lab.net.internet, HTTP_PORT + 1);
    // A port inside the first network's range, which its endpoint keeps; the second
    // network's endpoint must not get it too.
    let mut a = connect_from(&lab.eps[0].ns, 22000);
    let mut b = connect_from(&b_ns, 22000);
    for (what, s) in [("a", &mut a), ("b", &mut b)] {
        echo(s, &format!("{what}'s connection"));
    }
    let peers = peers.lock().unwrap().clone();
    assert_eq!(peers.len(), 2, "{peers:?}");
    assert_eq!(peers[0], SocketAddr::from((UPLINK_ADDR, 22000)));
    assert!(
        (61000..=65535).contains(&peers[1].port()),
        "the second network's flow: {}",
        peers[1]
    );
    drop((a, b));
    second(&["network", "down", "--force"]);
}
