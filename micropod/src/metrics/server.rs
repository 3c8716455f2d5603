//! `micropod metrics serve`: a small HTTP/1.1 server for `/metrics`.
//!
//! One thread, one connection per request (`Connection: close`): a scraper asks every few
//! seconds, so keep-alive and parallel scrapes buy nothing, and a single-threaded runtime keeps
//! the exporter's memory small. Each scrape reads the maps inline; it takes milliseconds.

use std::{
    io,
    net::{SocketAddr, TcpListener as StdListener},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    signal::unix::{SignalKind, signal},
};

use super::{CONTENT_TYPE, Exporter};

/// Where `micropod metrics serve` listens unless told otherwise (9464 is the port
/// OpenTelemetry's Prometheus exporter uses; loopback because the counters name every VM).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

/// A request head larger than this is refused; a scrape's is a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;
/// A client that does not finish its request head in this time is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot listen on {addr}: the address is already in use (another exporter?); \
         stop it or choose another address with --listen"
    )]
    AddressInUse {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr}; check that the address is one of this host's")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the exporter's event loop")]
    Runtime(#[source] io::Error),
    #[error("cannot install the SIGINT/SIGTERM handlers")]
    Signals(#[source] io::Error),
}

/// A bound exporter, ready to serve.
pub struct Server {
    listener: StdListener,
    addr: SocketAddr,
    exporter: Exporter,
}

impl Server {
    /// Binds `addr` now, so a taken port is reported before anything else happens.
    pub fn bind(addr: SocketAddr, exporter: Exporter) -> Result<Self, MetricsError> {
        let listener = StdListener::bind(addr).map_err(|source| {
            if source.kind() == io::ErrorKind::AddrInUse {
                MetricsError::AddressInUse { addr, source }
            } else {
                MetricsError::Bind { addr, source }
            }
        })?;
        let addr = listener
            .local_addr()
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self {
            listener,
            addr,
            exporter,
        })
    }

    /// The address actually bound (port 0 picks one).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until SIGINT or SIGTERM.
    pub fn run(self) -> Result<(), MetricsError> {
        let runtime = crate::runtime::current_thread().map_err(MetricsError::Runtime)?;
        runtime.block_on(self.serve())
    }

    async fn serve(self) -> Result<(), MetricsError> {
        self.listener
            .set_nonblocking(true)
            .map_err(MetricsError::Runtime)?;
        let listener = TcpListener::from_std(self.listener).map_err(MetricsError::Runtime)?;
        let mut terminate = signal(SignalKind::terminate()).map_err(MetricsError::Signals)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(MetricsError::Signals)?;
        let exporter = Arc::new(self.exporter);
        loop {
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let exporter = Arc::clone(&exporter);
                        tokio::spawn(async move {
                            if let Err(e) = handle(stream, &exporter).await {
                                log::debug!("metrics request from {peer}: {e}");
                            }
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        log::warn!("cannot accept a metrics connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        Ok(())
    }
}

struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
    allow: bool,
}

impl Response {
    fn text(status: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            allow: false,
        }
    }
}

async fn handle(mut stream: TcpStream, exporter: &Exporter) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let request = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream, &mut head))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request head not received"))??;
    let (response, send_body) = match request {
        Some((method, path)) => (route(&method, &path, exporter), method != "HEAD"),
        None => (Response::text("400 Bad Request", "bad request\n"), true),
    };
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    if response.allow {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(out.as_bytes()).await?;
        if send_body {
            stream.write_all(response.body.as_bytes()).await?;
        }
        stream.shutdown().await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "response not taken"))?
}

/// Reads up to the end of the request head; `None` for a head that does not parse.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> io::Result<Option<(String, String)>> {
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the request head ended",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(_)) => {
                return Ok(match (req.method, req.path) {
                    (Some(m), Some(p)) => Some((m.to_owned(), p.to_owned())),
                    _ => None,
                });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) | Err(_) => return Ok(None),
        }
    }
}

fn route(method: &str, target: &str, exporter: &Exporter) -> Response {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if method != "GET" && method != "HEAD" {
        return Response {
            allow: true,
            ..Response::text("405 Method Not Allowed", "only GET and HEAD\n")
        };
    }
    match path {
        "/metrics" => Response {
            status: "200 OK",
            content_type: CONTENT_TYPE,
            body: exporter.scrape(),
            allow: false,
        },
        "/" => Response::text(
            "200 OK",
            "micropod metrics exporter\n\nGET /metrics for the OpenMetrics exposition.\n",
        ),
        _ => Response::text("404 Not Found", "not found; the metrics are at /metrics\n"),
    }
}
