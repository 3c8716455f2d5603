//! A minimal QMP client: connect, negotiate, run one command at a time.
//!
//! QMP is line-delimited JSON over a unix socket. The server greets first; after
//! `qmp_capabilities` every command gets exactly one `return` or `error` reply, and
//! asynchronous `event` objects may arrive in between (they are skipped).

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::vmm::VmmError;

const VMM: &str = "qemu";

/// One negotiated QMP session.
pub(super) struct Qmp {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `socket`, retrying until it accepts (QEMU creates it shortly after start)
    /// or `timeout` passes, then reads the greeting and enters command mode.
    pub(super) fn connect(socket: &Path, timeout: Duration) -> Result<Self, VmmError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                // Not there yet, or there but not listening yet.
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(VmmError::SocketTimeout {
                            vmm: VMM,
                            socket: socket.to_path_buf(),
                            timeout,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => return Err(io_err(socket, source)),
            }
        };
        // Every read and write is bounded: a wedged QEMU must not hang micropod.
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        stream
            .set_read_timeout(Some(remaining))
            .and_then(|()| stream.set_write_timeout(Some(remaining)))
            .map_err(|source| io_err(socket, source))?;
        let writer = stream
            .try_clone()
            .map_err(|source| io_err(socket, source))?;
        let mut qmp = Self {
            socket: socket.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message("greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol("greeting", format!("not a QMP greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` and returns its `return` value.
    pub(super) fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| io_err(&self.socket, source))?;
        loop {
            let reply = self.read_message(command)?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = reply.get("error") {
                return Err(VmmError::Api {
                    vmm: VMM,
                    request: command.to_owned(),
                    // QMP has no status codes; its error class says what kind of failure.
                    status: 0,
                    fault: format!(
                        "{}: {}",
                        error["class"].as_str().unwrap_or("Error"),
                        error["desc"].as_str().unwrap_or("")
                    ),
                });
            }
            return Err(self.protocol(command, format!("unexpected reply {reply}")));
        }
    }

    fn read_message(&mut self, request: &str) -> Result<Value, VmmError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| io_err(&self.socket, source))?;
        if n == 0 {
            return Err(self.protocol(request, "QEMU closed the connection".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| self.protocol(request, format!("bad JSON {line:?}: {e}")))
    }

    fn protocol(&self, request: &str, detail: String) -> VmmError {
        VmmError::Protocol {
            vmm: VMM,
            request: request.to_owned(),
            detail,
        }
    }
}

fn io_err(socket: &Path, source: io::Error) -> VmmError {
    VmmError::Io {
        vmm: VMM,
        socket: socket.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::net::UnixListener, thread};

    use super::*;

    /// A scripted QMP server: greets, then answers each request line with the next reply
    /// (several lines per reply allowed, to interleave events).
    fn serve(dir: &Path, replies: Vec<Vec<Value>>) -> (PathBuf, thread::JoinHandle<Vec<Value>>) {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            writeln!(
                writer,
                "{}",
                json!({"QMP": {"version": {}, "capabilities": []}})
            )
            .unwrap();
            let mut seen = Vec::new();
            for reply in replies {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                seen.push(serde_json::from_str(&line).unwrap());
                for message in reply {
                    writeln!(writer, "{message}").unwrap();
                }
            }
            seen
        });
        (path, handle)
    }

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("micropod-qmp-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn negotiates_skips_events_and_reports_errors() {
        let dir = tempdir("ok");
        let (path, server) = serve(
            &dir,
            vec![
                vec![json!({"return": {}})],
                vec![
                    json!({"event": "RESUME", "timestamp": {}}),
                    json!({"return": {"running": true, "status": "running"}}),
                ],
                vec![json!({"error": {"class": "GenericError", "desc": "no way"}})],
            ],
        );
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let status = qmp.execute("query-status", None).unwrap();
        assert_eq!(status["status"], "running");
        let err = qmp.execute("system_powerdown", None).unwrap_err();
        assert!(err.to_string().contains("GenericError: no way"), "{err}");
        let seen = server.join().unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert_eq!(seen[1]["execute"], "query-status");
        assert_eq!(seen[2]["execute"], "system_powerdown");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_socket_times_out() {
        let dir = tempdir("missing");
        let started = Instant::now();
        let err = Qmp::connect(&dir.join("nope.sock"), Duration::from_millis(200))
            .err()
            .expect("no socket, no session");
        assert!(matches!(err, VmmError::SocketTimeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
