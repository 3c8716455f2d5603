//! Persistent TAPs through `/dev/net/tun`, checked against the kernel with iproute2's JSON
//! output, each test in namespaces of its own.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use micropod::net::{
    addr, link,
    tap::{self, Tap, TapError},
};
use micropod_tests::{NsGuard, block_on, netlab::ip_json};
use nix::{errno::Errno, unistd::User};
use serde_json::{Map, Value};

const TAP: &str = "mp-tap0";

/// What the kernel reports about a link, as `ip -d -j link show` prints it.
#[derive(Debug, PartialEq)]
struct Seen {
    index: u64,
    /// `flags`: "BROADCAST", "MULTICAST", "UP", …
    flags: Vec<String>,
    mac: Vec<u8>,
    /// `linkinfo.info_kind`.
    kind: Option<String>,
    /// `linkinfo.info_data`: the tun attributes ("type", "pi", "vnet_hdr", "multi_queue",
    /// "persist", "user", …); empty for links without any.
    tun: Map<String, Value>,
}

impl Seen {
    fn is_up(&self) -> bool {
        self.flags.iter().any(|f| f == "UP")
    }

    fn tun_str(&self, key: &str) -> Option<&str> {
        self.tun.get(key)?.as_str()
    }

    fn tun_bool(&self, key: &str) -> Option<bool> {
        self.tun.get(key)?.as_bool()
    }

    /// The owner uid. iproute2 prints a user name when the uid has a passwd entry and the
    /// number otherwise; a name is mapped back to its uid here.
    fn owner(&self) -> Option<u32> {
        match self.tun.get("user")? {
            Value::Number(n) => {
                let n = n
                    .as_u64()
                    .unwrap_or_else(|| panic!("owner {n} in {self:?}"));
                Some(u32::try_from(n).unwrap_or_else(|_| panic!("owner {n} in {self:?}")))
            }
            Value::String(name) => {
                let user = User::from_name(name)
                    .unwrap_or_else(|e| panic!("looking up user {name:?}: {e}"))
                    .unwrap_or_else(|| panic!("no user {name:?} for {self:?}"));
                Some(user.uid.as_raw())
            }
            other => panic!("owner {other} in {self:?}"),
        }
    }
}

/// Looks `name` up in `guard`'s namespace with `ip -d -j link show` (the full listing, so a
/// missing link is `None` rather than a failing command).
fn lookup(guard: &NsGuard, name: &str) -> Option<Seen> {
    let links = ip_json(guard.path(), &["-d", "link", "show"]);
    let link = links
        .as_array()
        .unwrap_or_else(|| panic!("link list: {links}"))
        .iter()
        .find(|l| l["ifname"] == name)?;
    let flags = link["flags"]
        .as_array()
        .unwrap_or_else(|| panic!("no flags: {link}"))
        .iter()
        .map(|f| f.as_str().unwrap_or_else(|| panic!("flag {f}")).to_owned())
        .collect();
    let mac = link["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address: {link}"))
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|e| panic!("{b:?} in {link}: {e}")))
        .collect();
    let tun = match &link["linkinfo"]["info_data"] {
        Value::Object(data) => data.clone(),
        Value::Null => Map::new(),
        other => panic!("info_data {other} in {link}"),
    };
    Some(Seen {
        index: link["ifindex"]
            .as_u64()
            .unwrap_or_else(|| panic!("no ifindex: {link}")),
        flags,
        mac,
        kind: link["linkinfo"]["info_kind"].as_str().map(str::to_owned),
        tun,
    })
}

/// Every interface in `guard`'s namespace, by name, from `ip -j link show`.
fn all_links(guard: &NsGuard) -> Vec<String> {
    let links = ip_json(guard.path(), &["link", "show"]);
    let mut names: Vec<String> = links
        .as_array()
        .unwrap_or_else(|| panic!("link list: {links}"))
        .iter()
        .map(|l| {
            l["ifname"]
                .as_str()
                .unwrap_or_else(|| panic!("no ifname: {l}"))
                .to_owned()
        })
        .collect();
    names.sort();
    names
}

fn create_in(guard: &NsGuard, name: &str, owner: Option<u32>) -> Result<(), TapError> {
    guard.run(|| tap::create_persistent(name, owner))
}

fn assert_is_persistent_tap(seen: &Seen) {
    assert_eq!(seen.kind.as_deref(), Some("tun"), "{seen:?}");
    assert_eq!(seen.tun_str("type"), Some("tap"), "{seen:?}");
    assert_eq!(seen.tun_bool("persist"), Some(true), "{seen:?}");
    assert_eq!(seen.tun_bool("pi"), Some(false), "IFF_NO_PI: {seen:?}");
    assert_eq!(seen.tun_bool("multi_queue"), Some(false), "{seen:?}");
    assert_eq!(seen.mac.len(), 6, "{seen:?}");
}

#[test]
fn created_tap_persists_in_its_namespace_only() {
    let guard = NsGuard::new("tapmk");
    create_in(&guard, TAP, None).expect("creating the TAP");
    // The creating fd was closed and its thread has ended: only persistence keeps it.
    let seen = lookup(&guard, TAP).expect("the TAP exists after its creator let go");
    assert_is_persistent_tap(&seen);
    assert_eq!(seen.tun_bool("vnet_hdr"), Some(true), "{seen:?}");
    assert_eq!(seen.owner(), None, "no owner asked: {seen:?}");
    assert!(!seen.is_up(), "a new TAP is down: {seen:?}");
    assert_eq!(all_links(&guard), ["lo", TAP]);

    let other = NsGuard::new("tapother");
    assert!(
        lookup(&other, TAP).is_none(),
        "the TAP leaked into another namespace"
    );
    assert_eq!(all_links(&other), ["lo"]);
}

#[test]
fn owner_is_set_when_asked() {
    let guard = NsGuard::new("tapown");
    create_in(&guard, TAP, Some(4242)).expect("creating the TAP");
    let seen = lookup(&guard, TAP).expect("TAP exists");
    assert_is_persistent_tap(&seen);
    assert_eq!(seen.owner(), Some(4242), "{seen:?}");
}

#[test]
fn existing_names_are_refused_and_left_alone() {
    let guard = NsGuard::new("tapdup");
    create_in(&guard, TAP, Some(1000)).expect("creating the TAP");
    let before = lookup(&guard, TAP).expect("TAP exists");

    let err = create_in(&guard, TAP, None).expect_err("second create succeeded");
    assert!(
        matches!(&err, TapError::Exists { name } if name == TAP),
        "{err:?}"
    );
    assert_eq!(
        lookup(&guard, TAP).as_ref(),
        Some(&before),
        "the first TAP changed"
    );

    // Attached (as by a VMM): still refused, and the attachment stays.
    let attached = open_fresh(&guard, TAP);
    let err = create_in(&guard, TAP, None).expect_err("create over an attached TAP succeeded");
    assert!(matches!(err, TapError::Exists { .. }), "{err:?}");
    assert_eq!(lookup(&guard, TAP).map(|s| s.index), Some(before.index));
    let err = guard
        .run(|| Tap::open(TAP))
        .expect_err("the attachment was lost");
    assert!(matches!(err, TapError::Busy { .. }), "{err:?}");
    drop(attached);

    // Not a TAP at all.
    let err = create_in(&guard, "lo", None).expect_err("create over lo succeeded");
    assert!(matches!(err, TapError::Exists { .. }), "{err:?}");
    assert_eq!(all_links(&guard), ["lo", TAP]);
}

#[test]
fn invalid_names_are_refused_and_create_nothing() {
    let guard = NsGuard::new("tapbad");
    // "" and "%d" would let the kernel pick a name (tap0, mp-0); too long would be cut.
    for bad in ["", "mp-0123456789abcdef", "mp/tap", "mp-%d", "mp tap"] {
        let err = create_in(&guard, bad, None).expect_err(bad);
        assert!(
            matches!(&err, TapError::InvalidName { name } if name == bad),
            "{bad:?}: {err:?}"
        );
        let err = guard.run(|| Tap::open(bad)).expect_err(bad);
        assert!(
            matches!(err, TapError::InvalidName { .. }),
            "{bad:?}: {err:?}"
        );
    }
    assert_eq!(all_links(&guard), ["lo"], "something was created");
}

#[test]
fn open_attaches_only_to_existing_taps() {
    let guard = NsGuard::new("tapopen");
    let err = guard
        .run(|| Tap::open(TAP))
        .expect_err("opened a missing TAP");
    assert!(matches!(err, TapError::NotFound { .. }), "{err:?}");
    assert_eq!(
        all_links(&guard),
        ["lo"],
        "opening a missing TAP created one"
    );

    let err = guard
        .run(|| Tap::open("lo"))
        .expect_err("opened lo as a TAP");
    assert!(matches!(err, TapError::NotATap { .. }), "{err:?}");

    create_in(&guard, TAP, None).expect("creating the TAP");
    let first = open_fresh(&guard, TAP);
    assert_eq!(first.name(), TAP);
    // Single-queue: one fd at a time, as a VMM would find it.
    let err = guard.run(|| Tap::open(TAP)).expect_err("attached twice");
    assert!(matches!(err, TapError::Busy { .. }), "{err:?}");
    drop(first);
    // Closing the attached fd leaves the device.
    assert!(
        lookup(&guard, TAP).is_some(),
        "TAP gone after its user closed"
    );
    guard
        .run(|| Tap::open(TAP))
        .expect("re-attaching after close");
}

const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const PEER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const TAP_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const ETHERTYPE_ARP: u16 = 0x0806;

/// An ARP request (Ethernet broadcast) from `PEER_MAC`/`PEER_IP` asking for `TAP_IP`.
fn arp_request() -> Vec<u8> {
    let mut frame = Vec::with_capacity(42);
    frame.extend_from_slice(&[0xff; 6]); // destination: broadcast
    frame.extend_from_slice(&PEER_MAC);
    frame.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    frame.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    frame.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    frame.extend_from_slice(&[6, 4]); // address lengths
    frame.extend_from_slice(&1u16.to_be_bytes()); // opcode: request
    frame.extend_from_slice(&PEER_MAC);
    frame.extend_from_slice(&PEER_IP.octets());
    frame.extend_from_slice(&[0; 6]); // target MAC: unknown
    frame.extend_from_slice(&TAP_IP.octets());
    frame
}

/// The fields of an Ethernet ARP frame.
#[derive(Debug)]
struct Arp {
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    opcode: u16,
    sender_mac: [u8; 6],
    sender_ip: Ipv4Addr,
    target_mac: [u8; 6],
    target_ip: Ipv4Addr,
}

/// `frame` as an IPv4-over-Ethernet ARP packet, or `None` for anything else.
fn parse_arp(frame: &[u8]) -> Option<Arp> {
    let mac = |at: usize| -> [u8; 6] { frame[at..at + 6].try_into().unwrap() };
    let ip = |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
    let u16_at = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    if frame.len() < 42 || u16_at(12) != ETHERTYPE_ARP || u16_at(14) != 1 || u16_at(16) != 0x0800 {
        return None;
    }
    Some(Arp {
        eth_dst: mac(0),
        eth_src: mac(6),
        opcode: u16_at(20),
        sender_mac: mac(22),
        sender_ip: ip(28),
        target_mac: mac(32),
        target_ip: ip(38),
    })
}

/// Attaches to a TAP this process has just created. The creating fd is closed by then, but a
/// child that a concurrently running test forks in that instant holds a copy until it execs
/// (`O_CLOEXEC` acts at exec), and meanwhile the kernel reports the single queue busy.
fn open_fresh(guard: &NsGuard, name: &str) -> Tap {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match guard.run(|| Tap::open(name)) {
            Err(TapError::Busy { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other.expect("attaching"),
        }
    }
}

#[test]
fn kernel_answers_arp_through_the_tap_fd() {
    let guard = NsGuard::new("tapfrm");
    create_in(&guard, TAP, None).expect("creating the TAP");
    let tap = open_fresh(&guard, TAP);
    // The kernel refuses frames while the link is down.
    let err = tap
        .send(&arp_request())
        .expect_err("sent through a down TAP");
    assert!(
        matches!(
            err,
            TapError::Send {
                source: Errno::EIO,
                ..
            }
        ),
        "{err:?}"
    );
    // Nor does anything come out: recv waits the whole timeout and reports none.
    let mut buf = [0u8; 2048];
    let start = Instant::now();
    let got = tap.recv(&mut buf, Duration::from_millis(100));
    assert_eq!(got.expect("reading from a down TAP"), None);
    assert!(
        start.elapsed() >= Duration::from_millis(100),
        "recv returned early"
    );

    block_on(async {
        let nl = guard.netlink();
        addr::add(&nl, TAP, format!("{TAP_IP}/24").parse().unwrap())
            .await
            .expect("adding the address");
        link::set_up(&nl, TAP).await.expect("bringing the TAP up");
    });
    let seen = lookup(&guard, TAP).expect("TAP exists");
    assert!(seen.is_up(), "the TAP did not come up: {seen:?}");
    let tap_mac = seen.mac;

    tap.send(&arp_request()).expect("sending the ARP request");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut skipped = Vec::new();
    let reply = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(n) = tap.recv(&mut buf, left).expect("reading from the TAP") else {
            panic!("no ARP reply within 5 s; other frames: {skipped:02x?}");
        };
        match parse_arp(&buf[..n]) {
            Some(arp) if arp.opcode == 2 => break arp,
            // IPv6 router solicitations, MLD reports, …
            _ => skipped.push(buf[..n.min(20)].to_vec()),
        }
    };
    assert_eq!(reply.sender_ip, TAP_IP, "{reply:?}");
    assert_eq!(reply.target_ip, PEER_IP, "{reply:?}");
    assert_eq!(reply.target_mac, PEER_MAC, "{reply:?}");
    assert_eq!(
        reply.eth_dst, PEER_MAC,
        "reply is unicast to the asker: {reply:?}"
    );
    assert_eq!(reply.sender_mac.as_slice(), tap_mac, "{reply:?}");
    assert_eq!(reply.eth_src.as_slice(), tap_mac, "{reply:?}");
}

#[test]
fn netlink_delete_removes_the_tap() {
    let guard = NsGuard::new("tapdel");
    create_in(&guard, TAP, None).expect("creating the TAP");
    assert!(lookup(&guard, TAP).is_some());
    block_on(async {
        let nl = guard.netlink();
        link::delete(&nl, TAP).await.expect("deleting over netlink");
    });
    assert!(
        lookup(&guard, TAP).is_none(),
        "TAP still there after delete"
    );
    assert_eq!(all_links(&guard), ["lo"]);
    // The name is free again.
    create_in(&guard, TAP, None).expect("re-creating after delete");
}

#[test]
fn make_transient_removes_the_tap() {
    let guard = NsGuard::new("taptr");
    create_in(&guard, TAP, None).expect("creating the TAP");
    let attached = open_fresh(&guard, TAP);
    let err = guard
        .run(|| tap::make_transient(TAP))
        .expect_err("made transient while attached");
    assert!(matches!(err, TapError::Busy { .. }), "{err:?}");
    drop(attached);
    guard
        .run(|| tap::make_transient(TAP))
        .expect("making it transient");
    assert!(lookup(&guard, TAP).is_none(), "TAP still there");
}
