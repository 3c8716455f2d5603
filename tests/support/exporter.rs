//! `micropod metrics serve` as the benchmarks run it: started on a free port, its address read
//! from its first line, its fds and memory read from /proc, stopped by its PID on drop.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};

/// A running exporter.
pub struct Exporter {
    child: Child,
    pub addr: SocketAddr,
    /// Drains its stderr (so a chatty exporter never blocks on a full pipe); yields the lines.
    stderr: Option<JoinHandle<Vec<String>>>,
}

impl Exporter {
    /// Starts `cmd`, a `micropod metrics serve --listen 127.0.0.1:0` with stderr piped, and
    /// waits for the line that says where it serves.
    pub fn start(mut cmd: Command) -> anyhow::Result<Self> {
        cmd.stdout(Stdio::null());
        let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let mut stderr = BufReader::new(child.stderr.take().context("stderr is piped")?);
        let mut me = Self {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            stderr: None,
        };
        let mut line = String::new();
        stderr
            .read_line(&mut line)
            .context("reading the exporter's first line")?;
        me.addr = line
            .trim()
            .strip_prefix("micropod: serving metrics on http://")
            .and_then(|rest| rest.strip_suffix("/metrics"))
            .and_then(|addr| addr.parse().ok())
            .with_context(|| format!("unexpected first line from the exporter: {line:?}"))?;
        me.stderr = Some(thread::spawn(move || {
            stderr.lines().map_while(Result::ok).collect()
        }));
        Ok(me)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open file descriptors.
    pub fn fds(&self) -> anyhow::Result<u64> {
        let dir = format!("/proc/{}/fd", self.pid());
        Ok(std::fs::read_dir(&dir)
            .with_context(|| format!("reading {dir}"))?
            .count() as u64)
    }

    /// VmRSS and VmHWM (peak), in KiB.
    pub fn memory_kib(&self) -> anyhow::Result<(u64, u64)> {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().strip_suffix(" kB"))
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("no {name} in {path}"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// SIGTERM, then waits; the contract says it exits 0. SIGKILL if it is still there after
    /// `patience`. Returns what it printed on stderr after its first line.
    pub fn terminate(&mut self, patience: Duration) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + patience;
        if self.child.try_wait()?.is_none() {
            let pid = Pid::from_raw(i32::try_from(self.pid())?);
            signal::kill(pid, Signal::SIGTERM).context("sending SIGTERM to the exporter")?;
        }
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                // Our own child, by its PID.
                self.child.kill()?;
                self.child.wait()?;
                bail!("the exporter ignored SIGTERM for {patience:?}; killed it");
            }
            thread::sleep(Duration::from_millis(10));
        };
        let lines = self
            .stderr
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        ensure!(
            status.success(),
            "the exporter ended with {status} on SIGTERM:\n{}",
            lines.join("\n")
        );
        Ok(lines)
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None))
            && let Err(e) = self.terminate(Duration::from_secs(2))
        {
            eprintln!("warning: stopping the exporter: {e:#}");
        }
    }
}

/// One HTTP/1.1 GET with `Connection: close`, read to EOF: (status line, head, body). Call from
/// a thread inside the exporter's namespace.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(String, String, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::with_capacity(1 << 20);
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading the answer to GET {path}"))?;
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("no end of head in the answer to GET {path}"))?;
    let head = String::from_utf8(response[..end].to_vec()).context("a non-UTF-8 head")?;
    let body = response[end + 4..].to_vec();
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, head, body))
}
