//! Test support: namespace guards and small labs built from them.
//!
//! Every privileged test builds its own namespaces through [`NsGuard`], so tests run in
//! parallel and never touch the machine's own network namespace. Guards remove their namespace
//! on drop, on the panic path too.

use std::{
    io::{self, BufRead as _, BufReader},
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, ChildStderr, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub mod bench;
pub mod cniexec;
pub mod exporter;
pub mod interrupt;
pub mod netlab;
pub mod packets;
pub mod runtimes;
pub mod vmlab;

use ipnetwork::IpNetwork;
use micropod::net::{NetNs, Netlink, addr, link, veth};

/// A named network namespace for one test, with `lo` up; removed on drop.
pub struct NsGuard {
    ns: Option<NetNs>,
}

impl NsGuard {
    /// Creates `/run/netns/mpt-<pid>-<n>-<tag>` and brings its loopback up.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("mpt-{}-{n}-{tag}", std::process::id());
        let ns = NetNs::create(&name).unwrap_or_else(|e| panic!("creating netns {name}: {e:?}"));
        let guard = Self { ns: Some(ns) };
        block_on(async {
            let nl = guard.netlink();
            link::set_up(&nl, "lo").await.expect("bringing lo up");
        });
        guard
    }

    pub fn ns(&self) -> &NetNs {
        self.ns.as_ref().expect("namespace present until drop")
    }

    pub fn path(&self) -> &Path {
        self.ns().path()
    }

    /// A netlink connection into this namespace; call inside a tokio runtime.
    pub fn netlink(&self) -> Netlink {
        Netlink::connect_in(self.ns()).expect("netlink connection into the test namespace")
    }

    /// Runs `f` inside the namespace (on a thread that entered it with setns).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.ns().run(f).expect("entering the test namespace")
    }

    /// A UDP socket bound to `addr` inside the namespace.
    pub fn udp(&self, addr: SocketAddr) -> UdpSocket {
        self.run(|| UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("binding UDP {addr} in {}: {e}", self.path().display()))
    }
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        if let Some(ns) = self.ns.take() {
            let path = ns.path().to_path_buf();
            if let Err(e) = ns.remove() {
                eprintln!(
                    "warning: cannot remove test namespace {}: {e:?}",
                    path.display()
                );
            }
        }
    }
}

/// A state dir and a BPF pin dir of one test's own, so tests never share state or pins;
/// both are removed on drop.
pub struct TestDirs {
    pub state: PathBuf,
    pub pins: PathBuf,
}

impl TestDirs {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("micropod-test-{}-{n}-{tag}", std::process::id());
        let dirs = Self {
            state: std::env::temp_dir().join(&id),
            pins: Path::new("/sys/fs/bpf").join(&id),
        };
        for dir in [&dirs.state, &dirs.pins] {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("creating {} (is bpffs mounted?): {e}", dir.display()));
        }
        dirs
    }
}

impl Drop for TestDirs {
    fn drop(&mut self) {
        for dir in [&self.state, &self.pins] {
            // A background reaper or refill that is still finishing may open its lock file in
            // the state dir while it is being removed: try again until it has exited (≤ 2 s).
            let mut attempts = 0;
            loop {
                match std::fs::remove_dir_all(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) if attempts < 40 => {
                        attempts += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => {
                        eprintln!("warning: cannot remove {}: {e}", dir.display());
                        break;
                    }
                }
            }
        }
    }
}

/// The TAP pool of the network recorded in a state dir, read from its files (no process
/// started): how many pooled TAPs are recorded, how many the network asks for, and whether no
/// refill holds the refill lock.
#[derive(Debug)]
pub struct PoolState {
    pub ready: u64,
    pub size: u64,
    pub refill_idle: bool,
}

impl PoolState {
    pub fn read(state: &Path) -> io::Result<Self> {
        let size = match std::fs::read(state.join(micropod::network::STATE_DOC)) {
            Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)?["config"]["pool"]
                .as_u64()
                .unwrap_or(0),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let ready = match std::fs::read_dir(state.join(micropod::network::POOL_SHELF)) {
            Ok(entries) => entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.'))
                .count() as u64,
            Err(_) => 0,
        };
        let refill_idle = !flock_held(&state.join(micropod::network::REFILL_LOCK))?;
        Ok(Self {
            ready,
            size,
            refill_idle,
        })
    }

    /// No refill runs or is about to: the pool is full (`full`: after `up`, which always
    /// starts one), or, after attaches, above half (an attach that leaves it at half or less
    /// starts one), with the refill lock free.
    pub fn settled(&self, full: bool) -> bool {
        self.refill_idle && (self.ready >= self.size || (!full && self.ready > self.size / 2))
    }
}

/// Whether some process holds a `flock` on `path`, read from `/proc/locks` without taking
/// the lock: a reader that took it, even for a moment, would make a refill that starts in
/// that moment believe another one runs, and exit.
pub fn flock_held(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    // Lines read "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF" (major:minor in hex).
    let id = format!(
        "{:02x}:{:02x}:{}",
        nix::sys::stat::major(meta.dev()),
        nix::sys::stat::minor(meta.dev()),
        meta.ino()
    );
    Ok(std::fs::read_to_string("/proc/locks")?.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some("FLOCK") && fields.nth(3) == Some(id.as_str())
    }))
}

/// Runs a future to completion on a fresh current-thread runtime.
pub fn block_on<F: Future>(f: F) -> F::Output {
    micropod::runtime::current_thread()
        .expect("tokio runtime")
        .block_on(f)
}

/// Two namespaces joined by a veth pair: `a`'s `veth-a` <-> `b`'s `veth-b`, both up, with the
/// given addresses.
pub struct VethLab {
    pub a: NsGuard,
    pub b: NsGuard,
}

impl VethLab {
    pub const A_IF: &'static str = "veth-a";
    pub const B_IF: &'static str = "veth-b";

    pub fn new(a_addrs: &[IpNetwork], b_addrs: &[IpNetwork]) -> Self {
        let lab = Self {
            a: NsGuard::new("a"),
            b: NsGuard::new("b"),
        };
        block_on(async {
            let nl_a = lab.a.netlink();
            let nl_b = lab.b.netlink();
            veth::create(
                &nl_a,
                Self::A_IF,
                Self::B_IF,
                Some(std::os::fd::AsFd::as_fd(lab.b.ns())),
            )
            .await
            .expect("creating the veth pair");
            for (nl, name, addrs) in [(&nl_a, Self::A_IF, a_addrs), (&nl_b, Self::B_IF, b_addrs)] {
                for &ip in addrs {
                    addr::add(nl, name, ip).await.expect("adding an address");
                }
                link::set_up(nl, name).await.expect("bringing the veth up");
            }
        });
        lab
    }
}

/// Sends datagrams from `from` to `to` until one arrives (ARP resolved, link running), then
/// drains `to`. Use before measuring, so warm-up traffic is not part of the measurement.
pub fn warm_up(from: &UdpSocket, to: &UdpSocket) {
    let dest = to.local_addr().expect("receiver address");
    to.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 2048];
    loop {
        from.send_to(b"warm-up", dest)
            .expect("sending warm-up datagram");
        if to.recv_from(&mut buf).is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no datagram reached {dest} within 10 s"
        );
    }
    // Anything else still in flight from the retries.
    while to.recv_from(&mut buf).is_ok() {}
}

/// Sends `count` datagrams of `payload` bytes and checks that `to` receives all of them.
pub fn send_and_confirm(from: &UdpSocket, to: &UdpSocket, count: usize, payload: usize) {
    let dest = to.local_addr().expect("receiver address");
    to.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let data = vec![0xa5u8; payload];
    let mut buf = vec![0u8; payload + 1];
    for i in 0..count {
        from.send_to(&data, dest).expect("sending datagram");
        // One at a time: never overflows a queue, so "sent" really means "on the wire".
        let (n, _) = to
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i} of {count} to {dest} lost: {e}"));
        assert_eq!(n, payload, "datagram {i} truncated");
    }
}

/// The `micropod` binary next to the test executable (`cargo xtask test` builds it);
/// `MICROPOD_BIN` overrides.
pub fn micropod_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("MICROPOD_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("micropod");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "no micropod binary near {}; run `cargo build -p micropod` first (cargo xtask test does) or set MICROPOD_BIN",
        exe.display()
    );
}

/// `micropod count-sources` running in the background, past its "counting" line, so traffic
/// sent from now on is counted.
pub struct CountSources {
    child: Child,
    stderr: BufReader<ChildStderr>,
    /// What it printed on stderr up to and including the "counting" line.
    pub started: Vec<String>,
}

impl CountSources {
    pub fn start(netns: &Path, iface: &str, seconds: u32, json: bool) -> io::Result<Self> {
        let mut cmd = Command::new(micropod_bin());
        cmd.args([
            "count-sources",
            "--iface",
            iface,
            "--duration",
            &seconds.to_string(),
        ])
        .arg("--netns")
        .arg(netns)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd.spawn()?;
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr is piped"));
        let mut started = Vec::new();
        loop {
            let mut line = String::new();
            if stderr.read_line(&mut line)? == 0 {
                let status = child.wait()?;
                return Err(io::Error::other(format!(
                    "micropod count-sources exited ({status}) before counting: {}",
                    started.concat()
                )));
            }
            let counting = line.starts_with("counting");
            started.push(line);
            if counting {
                return Ok(Self {
                    child,
                    stderr,
                    started,
                });
            }
        }
    }

    /// Ends it with SIGKILL (our own child, by PID) and reaps it.
    pub fn kill(mut self) -> io::Result<()> {
        self.child.kill()?;
        self.child.wait().map(drop)
    }

    /// Waits for the end; returns its output (stdout) and the rest of its stderr.
    pub fn finish(self) -> io::Result<(Output, Vec<String>)> {
        let Self { child, stderr, .. } = self;
        let output = child.wait_with_output()?;
        let rest = stderr.lines().collect::<io::Result<_>>()?;
        Ok((output, rest))
    }
}
