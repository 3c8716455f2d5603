//! A lab for the network control plane: a "host" namespace where micropod runs (bridge, NAT),
//! joined by an uplink veth to an "internet" namespace that holds a server address. The
//! internet has no route back to the micropod subnet, so only NATed traffic gets answers.

use std::{
    ffi::OsStr,
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use ipnetwork::{IpNetwork, Ipv4Network};
use micropod::net::{addr, link, route, veth};
use serde_json::Value;

use crate::{NsGuard, TestDirs, block_on, micropod_bin};

/// The host's end of the uplink, and its address (what MASQUERADE rewrites sources to).
pub const UPLINK: &str = "uplink0";
pub const UPLINK_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The internet's end of the uplink.
pub const WAN: &str = "wan0";
pub const WAN_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// A server address in the internet namespace, one routing hop behind the uplink.
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

pub struct NetLab {
    pub host: NsGuard,
    pub internet: NsGuard,
    pub dirs: TestDirs,
    /// Kept open for the children's `setns`.
    host_file: File,
}

impl NetLab {
    pub fn new(tag: &str) -> Self {
        let host = NsGuard::new(&format!("{tag}-host"));
        let internet = NsGuard::new(&format!("{tag}-inet"));
        // No IPv6 duplicate address detection: link-local addresses are final at once, so
        // namespace snapshots do not change under the test's feet.
        for ns in [&host, &internet] {
            ns.run(|| {
                std::fs::write("/proc/sys/net/ipv6/conf/default/accept_dad", "0")
                    .expect("disabling IPv6 DAD in the lab");
            });
        }
        block_on(async {
            let h = host.netlink();
            let i = internet.netlink();
            veth::create(
                &h,
                UPLINK,
                WAN,
                Some(std::os::fd::AsFd::as_fd(internet.ns())),
            )
            .await
            .expect("creating the uplink veth");
            addr::add(
                &h,
                UPLINK,
                IpNetwork::V4(Ipv4Network::new(UPLINK_ADDR, 24).unwrap()),
            )
            .await
            .expect("uplink address");
            link::set_up(&h, UPLINK).await.expect("uplink up");
            addr::add(
                &i,
                WAN,
                IpNetwork::V4(Ipv4Network::new(WAN_ADDR, 24).unwrap()),
            )
            .await
            .expect("wan address");
            addr::add(
                &i,
                "lo",
                IpNetwork::V4(Ipv4Network::new(SERVER_ADDR, 32).unwrap()),
            )
            .await
            .expect("server address");
            link::set_up(&i, WAN).await.expect("wan up");
            let uplink_index = link::index(&h, UPLINK).await.expect("uplink index");
            route::add_default(&h, WAN_ADDR, uplink_index)
                .await
                .expect("host default route");
        });
        let host_file = File::open(host.path()).expect("opening the host namespace");
        Self {
            host,
            internet,
            dirs: TestDirs::new(tag),
            host_file,
        }
    }

    /// The host namespace, open (for a child's `setns`, see [`in_netns`]).
    pub fn host_file(&self) -> &File {
        &self.host_file
    }

    /// Starts `micropod ARGS` with failpoint `point` armed, waits until it is frozen there and
    /// kills it with SIGKILL (our own child, by PID).
    #[track_caller]
    pub fn kill_at<I, S>(&self, point: &str, args: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let mut child = self
            .micropod(&args)
            .env(micropod::failpoint::ENV, point)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        kill_at_failpoint(&mut child, &format!("micropod {args:?}"), point);
    }

    /// `micropod ARGS` inside the host namespace, with no state or pin dir given at all.
    pub fn micropod_bare<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(micropod_bin());
        cmd.args(args)
            .env_remove("MICROPOD_STATE_DIR")
            .env_remove("MICROPOD_BPF_DIR")
            .env("MICROPOD_LOG", "warn")
            .stdin(Stdio::null());
        in_netns(&mut cmd, &self.host_file);
        cmd
    }

    /// `micropod` with this lab's state and pin dirs, run inside the host namespace.
    pub fn micropod<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.micropod_in(&self.dirs.state, &self.dirs.pins.join("micropod"), args)
    }

    /// `micropod` with the given state and pin dirs, inside the host namespace: another
    /// network next to the lab's, or a pin dir of the test's own.
    pub fn micropod_in<I, S>(&self, state: &Path, pins: &Path, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.micropod_bare([
            OsStr::new("--state-dir"),
            state.as_os_str(),
            OsStr::new("--bpf-dir"),
            pins.as_os_str(),
        ]);
        cmd.args(args);
        cmd
    }

    /// Runs micropod and returns its output, whatever the exit status.
    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.micropod(args).output().expect("running micropod")
    }

    /// Runs micropod, asserts success, returns stdout.
    #[track_caller]
    pub fn ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.run(&args);
        assert!(
            out.status.success(),
            "micropod {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs micropod with `--json` output expected on stdout.
    #[track_caller]
    pub fn json<I, S>(&self, args: I) -> Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON {out:?}: {e}"))
    }

    /// `network up` with defaults plus `extra`, then waits until its background refill has
    /// made the TAP pool, so that no refill is still making links when the test looks.
    #[track_caller]
    pub fn up(&self, extra: &[&str]) {
        let mut args = vec!["network", "up"];
        args.extend_from_slice(extra);
        self.ok(args);
        // `up` always starts a refill, which fills the pool.
        self.wait_pool(true);
    }

    /// Waits (up to 10 s) until no refill runs or is about to: the pool is full (`full`, or
    /// after an attach took it to half or less, which starts a refill), or above half with
    /// the refill lock free.
    #[track_caller]
    pub fn wait_pool(&self, full: bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let pool = crate::PoolState::read(&self.dirs.state).expect("reading the pool");
            if pool.settled(full) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the TAP pool is not settled after 10 s: {pool:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Attaches a netns endpoint in `ns`, returns the attach JSON.
    #[track_caller]
    pub fn attach_netns(&self, name: &str, ns: &NsGuard, extra: &[&str]) -> Value {
        let fixed = ["network", "attach", name, "--kind", "netns", "--json"];
        let mut args: Vec<&OsStr> = fixed.iter().map(OsStr::new).collect();
        args.push(OsStr::new("--netns"));
        args.push(ns.path().as_os_str());
        args.extend(extra.iter().map(OsStr::new));
        self.json(args)
    }

    /// Flows to the internet server in the host's conntrack table (the eBPF fast path's
    /// flows are never there).
    pub fn conntrack_flows_to_server(&self) -> usize {
        query(self.host.path(), "cat", &["/proc/net/nf_conntrack"])
            .lines()
            .filter(|l| l.contains(&format!("dst={SERVER_ADDR} ")))
            .count()
    }

    /// A port's kernel statistics, from the host side: [rx packets, rx bytes, tx packets, tx
    /// bytes]. The port receives what the endpoint transmits.
    pub fn port_stats(&self, port: &str) -> [u64; 4] {
        let v = ip_json(self.host.path(), &["-s", "link", "show", "dev", port]);
        let s = &v[0]["stats64"];
        [
            s["rx"]["packets"].as_u64().unwrap(),
            s["rx"]["bytes"].as_u64().unwrap(),
            s["tx"]["packets"].as_u64().unwrap(),
            s["tx"]["bytes"].as_u64().unwrap(),
        ]
    }

    /// The network's records, raw: the state document and every record file beside it, each
    /// as `path: content` (or `None` when no network is recorded). Lock files, logs and temp
    /// files are left out.
    pub fn state_doc(&self) -> Option<String> {
        let root = &self.dirs.state;
        let mut out = std::fs::read_to_string(root.join(micropod::network::STATE_DOC)).ok()?;
        for shelf in [
            micropod::network::ENDPOINTS_SHELF,
            micropod::network::ADDRESSES_SHELF,
            micropod::network::RETIRED_SHELF,
        ] {
            let Ok(entries) = std::fs::read_dir(root.join(shelf)) else {
                continue;
            };
            let mut files: Vec<_> = entries
                .map(|e| e.unwrap().path())
                .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
                .collect();
            files.sort();
            for f in files {
                let content = std::fs::read_to_string(&f).unwrap_or_default();
                out += &format!("{}: {content}", f.strip_prefix(root).unwrap().display());
            }
        }
        Some(out)
    }
}

/// Waits until `child` (started with failpoint `point` armed and its stderr piped) says it is
/// frozen there, then kills it with SIGKILL (our own child, by PID). `what` names it if it
/// ends before.
#[track_caller]
pub fn kill_at_failpoint(child: &mut std::process::Child, what: &str, point: &str) {
    use std::io::BufRead as _;
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr is piped"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            let status = child.wait().unwrap();
            panic!("{what} ended ({status}) before failpoint {point}:\n{seen}");
        }
        if line.trim() == format!("micropod: failpoint {point}") {
            break;
        }
        seen += &line;
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Makes `cmd`'s child enter the namespace `ns` before it execs.
pub fn in_netns(cmd: &mut Command, ns: &File) {
    let fd = ns.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only makes the setns
    // syscall, which is async-signal-safe; `fd` stays open in the parent (and so in the child)
    // for as long as the Command can spawn, because the lab owns the File.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::setns(fd, nix::libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Makes `cmd`'s child drop to uid/gid 65534 with no capabilities, after [`in_netns`] (std
/// would switch uid before the setns hook, and setns needs CAP_SYS_ADMIN).
pub fn as_nobody(cmd: &mut Command) {
    // SAFETY: runs in the forked child before exec; setgroups/setgid/setuid are plain
    // async-signal-safe syscalls and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            use nix::libc;
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs an iproute2/nft query in a namespace and returns its stdout. Tests use these tools as
/// an independent reading of the kernel; micropod itself never runs them.
#[track_caller]
pub fn query(ns: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .arg(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `ip -j …` in a namespace, parsed.
#[track_caller]
pub fn ip_json(ns: &Path, args: &[&str]) -> Value {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let out = query(ns, "ip", &full);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip {args:?}: bad JSON {out:?}: {e}"))
}

/// The names of the `cls_bpf` programs on `iface`'s `ingress` or `egress` hook in namespace
/// `ns`, each as `name@pref/handle` (read with `tc -j filter show`, independently of
/// micropod's own netlink code); empty without a `clsact` qdisc.
pub fn tc_bpf_filters(ns: &Path, iface: &str, hook: &str) -> Vec<String> {
    bpf_filters(ns, iface, hook)
        .iter()
        .map(|f| {
            format!(
                "{}@{}/{}",
                f["options"]["bpf_name"].as_str().unwrap_or("?"),
                f["pref"],
                f["options"]["handle"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

/// The program ids of the same filters as [`tc_bpf_filters`].
pub fn tc_bpf_program_ids(ns: &Path, iface: &str, hook: &str) -> Vec<u64> {
    bpf_filters(ns, iface, hook)
        .iter()
        .filter_map(|f| f["options"]["prog"]["id"].as_u64())
        .collect()
}

/// The `cls_bpf` filters of `tc -j filter show` (those with options: one entry per filter).
fn bpf_filters(ns: &Path, iface: &str, hook: &str) -> Vec<Value> {
    let out = query(ns, "tc", &["-j", "filter", "show", "dev", iface, hook]);
    if out.trim().is_empty() {
        return Vec::new();
    }
    let filters: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("tc filter show dev {iface} {hook}: bad JSON {out:?}: {e}"));
    filters
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["kind"] == "bpf" && f.get("options").is_some())
        .cloned()
        .collect()
}

/// Everything micropod might change in a namespace, in a comparable form: links (name, kind,
/// controller, flags, MAC), addresses, IPv4 and IPv6 routes, the nf_tables ruleset and
/// ip_forward; taken once the namespace has settled (IPv6 link-local addresses and their
/// routes appear a moment after a link comes up), so two snapshots differ only if something
/// was really changed.
pub fn snapshot(ns: &Path) -> String {
    let mut last = snapshot_now(ns);
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        let now = snapshot_now(ns);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("namespace {} never settled:\n{last}", ns.display());
}

/// [`snapshot`] as it is right now.
fn snapshot_now(ns: &Path) -> String {
    let links = ip_json(ns, &["-d", "link", "show"]);
    let mut out = String::new();
    for l in links.as_array().expect("link list") {
        // Configuration flags only: carrier and operational state (NO-CARRIER, LOWER_UP, …)
        // follow a link's peer or its users, and the kernel reports them up to a second late.
        let flags: Vec<&str> = l["flags"]
            .as_array()
            .expect("link flags")
            .iter()
            .filter_map(|f| f.as_str())
            .filter(|f| !matches!(*f, "NO-CARRIER" | "LOWER_UP" | "DORMANT" | "M-DOWN"))
            .collect();
        // A pooled TAP is made afresh whenever the pool is (its MAC is the kernel's random
        // one); what matters is that it is there, down, on the bridge.
        let pooled = l["ifname"]
            .as_str()
            .is_some_and(|n| micropod::network::pool_link(n).is_some());
        out += &format!(
            "link {} index={} kind={} master={} flags={flags:?} mac={} mtu={}\n",
            l["ifname"],
            l["ifindex"],
            l["linkinfo"]["info_kind"],
            l["master"],
            if pooled { &Value::Null } else { &l["address"] },
            l["mtu"]
        );
    }
    for a in ip_json(ns, &["addr", "show"])
        .as_array()
        .expect("addr list")
    {
        for info in a["addr_info"].as_array().into_iter().flatten() {
            out += &format!(
                "addr {} {}/{} scope={}\n",
                a["ifname"], info["local"], info["prefixlen"], info["scope"]
            );
        }
    }
    for family in ["-4", "-6"] {
        for table in ["main", "local"] {
            // "linkdown" marks routes of a link without carrier: state, not configuration.
            let routes = query(ns, "ip", &[family, "route", "show", "table", table])
                .replace(" linkdown", "");
            out += &format!("routes {family} {table}:\n{routes}");
        }
    }
    out += &format!("nft:\n{}", query(ns, "nft", &["list", "ruleset"]));
    let forward = query(ns, "cat", &["/proc/sys/net/ipv4/ip_forward"]);
    out += &format!("ip_forward={forward}");
    out
}

/// A raw ICMP echo from inside `ns` to `dst`; true when the matching reply arrives in time.
pub fn ping(ns: &NsGuard, dst: Ipv4Addr) -> bool {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    ns.run(|| {
        let sock =
            Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).expect("raw socket");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let id = (std::process::id() & 0xffff) as u16;
        for seq in 0..15u16 {
            let request = crate::packets::icmp_echo(8, id, seq, b"micropod ping");
            sock.send_to(&request, &SockAddr::from(SocketAddrV4::new(dst, 0)))
                .expect("sending echo");
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                // SAFETY: recv_from initialised the first n bytes.
                let packet: Vec<u8> = buf[..n]
                    .iter()
                    .map(|b| unsafe { b.assume_init() })
                    .collect();
                let from = from.as_socket_ipv4().map(|a| *a.ip());
                let Some(icmp) = crate::packets::ipv4_payload(&packet) else {
                    continue;
                };
                if from == Some(dst)
                    && icmp.len() >= 8
                    && icmp[0] == 0
                    && icmp[4..6] == id.to_be_bytes()
                {
                    return true;
                }
            }
        }
        false
    })
}
