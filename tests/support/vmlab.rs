//! A lab for VMs: a [`NetLab`] with the network up, the test guest from `cargo xtask guest`,
//! a guard that kills every VM the lab's state dir knows of (by pid and start time) when the
//! test ends however it ends, and a tiny HTTP server and client for traffic checks.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use micropod::vm::{ProcessRef, VMS_DIR, VmRecord};
use serde_json::Value;

use crate::{NsGuard, netlab::NetLab};

/// The test guest's kernel and initramfs.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// `$MICROPOD_GUEST_DIR`, else `<workspace>/target/guest` (where `cargo xtask guest` puts it).
pub fn guest() -> Guest {
    let dir = std::env::var_os("MICROPOD_GUEST_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest"),
        PathBuf::from,
    );
    // Shorter in what tests and the demo print; unchanged if it does not exist yet.
    let dir = dir.canonicalize().unwrap_or(dir);
    let guest = Guest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
    };
    for file in [&guest.kernel, &guest.initrd] {
        assert!(
            file.is_file(),
            "no test guest at {}: run `cargo xtask guest` first (or set MICROPOD_GUEST_DIR)",
            file.display()
        );
    }
    guest
}

/// A [`NetLab`] with the network up and VMs in it. Dropping it kills every VMM and supervisor
/// its state dir records (only processes this lab's micropod started), then the lab goes.
pub struct VmLab {
    pub net: NetLab,
    pub guest: Guest,
}

impl VmLab {
    /// A lab whose network is up with `--datapath datapath`.
    pub fn new(tag: &str, datapath: &str) -> Self {
        let lab = Self::without_network(tag);
        lab.net.up(&["--datapath", datapath]);
        lab
    }

    /// A lab whose network is not up yet.
    pub fn without_network(tag: &str) -> Self {
        Self {
            guest: guest(),
            net: NetLab::new(tag),
        }
    }

    /// `micropod run --kernel K --initrd I --name NAME --json EXTRA…`, not yet spawned.
    pub fn run_command(&self, name: &str, extra: &[&str]) -> Command {
        let mut cmd = self.net.micropod(["run", "--kernel"]);
        cmd.arg(&self.guest.kernel)
            .arg("--initrd")
            .arg(&self.guest.initrd)
            .args(["--name", name, "--json"])
            .args(extra);
        cmd
    }

    /// Runs a VM and returns `run --json`.
    #[track_caller]
    pub fn run_vm(&self, name: &str, extra: &[&str]) -> Value {
        let out = self
            .run_command(name, extra)
            .output()
            .expect("running micropod run");
        assert!(
            out.status.success(),
            "micropod run {name} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("run --json output")
    }

    /// `micropod logs NAME`.
    pub fn console(&self, name: &str) -> String {
        self.net.ok(["logs", name])
    }

    /// Waits until the VM's console shows `needle`; returns the console.
    #[track_caller]
    pub fn wait_console(&self, name: &str, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.console(name);
            if console.contains(needle) {
                return console;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} not on {name}'s console within {timeout:?}:\n{console}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `micropod inspect NAME`.
    #[track_caller]
    pub fn inspect(&self, name: &str) -> Value {
        self.net.json(["inspect", name])
    }

    /// The endpoints `network ls --json` lists, by name.
    #[track_caller]
    pub fn endpoint_names(&self) -> Vec<String> {
        self.net
            .json(["network", "ls", "--json"])
            .as_array()
            .expect("endpoint list")
            .iter()
            .map(|e| e["name"].as_str().expect("name").to_owned())
            .collect()
    }

    /// Whether the host namespace has a link named `name`.
    pub fn link_exists(&self, name: &str) -> bool {
        crate::netlab::ip_json(self.net.host.path(), &["link", "show"])
            .as_array()
            .expect("link list")
            .iter()
            .any(|l| l["ifname"] == name)
    }

    /// The VM records in the state dir, read directly.
    pub fn records(&self) -> Vec<VmRecord> {
        let dir = self.net.dirs.state.join(VMS_DIR);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
            .collect()
    }
}

impl Drop for VmLab {
    fn drop(&mut self) {
        // Every process recorded in this lab's own state dir was started by this test's
        // micropod; ProcessRef only signals the very process recorded (pid and start time).
        for rec in self.records() {
            for process in [rec.supervisor, rec.vmm_process].into_iter().flatten() {
                if matches!(process.signal(nix::libc::SIGKILL), Ok(true)) {
                    eprintln!("killed {} of VM {} left running", process.pid, rec.name);
                }
            }
        }
        // Give the kernel a moment to close the TAPs before the lab deletes the namespace.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.records().iter().any(|r| {
            [r.supervisor, r.vmm_process]
                .iter()
                .flatten()
                .any(ProcessRef::is_alive)
        }) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A tiny HTTP/1.0 server in a namespace: answers every request with `body` and records who
/// asked. Stops on drop.
pub struct HttpServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl HttpServer {
    pub fn start(ns: &NsGuard, addr: SocketAddrV4, body: &str) -> Self {
        let listener = ns
            .run(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("binding {addr} in {}: {e}", ns.path().display()));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let response = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let thread = {
            let stop = Arc::clone(&stop);
            let peers = Arc::clone(&peers);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            peers.lock().unwrap().push(peer);
                            let _ = serve_one(stream, response.as_bytes());
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                }
            })
        };
        Self {
            stop,
            thread: Some(thread),
            peers,
        }
    }

    /// Who has connected so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

fn serve_one(mut stream: TcpStream, response: &[u8]) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    stream.write_all(response)
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `GET /` from inside `ns`; the response body.
pub fn http_get(ns: &NsGuard, addr: SocketAddrV4) -> io::Result<String> {
    let mut stream =
        ns.run(|| TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(3)))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET / HTTP/1.0\r\nHost: {}\r\n\r\n", addr.ip())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no HTTP response: {response:?}")))?;
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        return Err(io::Error::other(format!("not a 200: {head:?}")));
    }
    Ok(body.to_owned())
}

/// [`http_get`], retried until it works or `timeout` passes.
#[track_caller]
pub fn http_get_retry(ns: &NsGuard, addr: SocketAddrV4, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        match http_get(ns, addr) {
            Ok(body) => return body,
            Err(e) if Instant::now() >= deadline => {
                panic!("GET http://{addr}/ failed for {timeout:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
