//! A minimal HTTP/1.1 client over a unix socket, enough for Firecracker's API server: one
//! request per connection, JSON bodies with `Content-Length`, and answers that are either
//! `204 No Content` or carry `Content-Length` (anything else is read to end of stream).
//!
//! A whole exchange (connect, write, read) shares one deadline, so a stuck VMM cannot hold the
//! caller longer than it asked.

use std::{
    io::{self, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use super::api::Request;

/// Larger answers than these are not Firecracker's; refusing them bounds memory.
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;
const MAX_HEADERS: usize = 32;

#[derive(Debug)]
pub(super) struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum HttpError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("{0}")]
    Malformed(String),
}

/// Sends `request` to the server on `socket` and reads its answer, all within `timeout`.
pub(super) fn send(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let deadline = Instant::now() + timeout;
    let mut stream = UnixStream::connect(socket)?;
    stream.set_write_timeout(Some(remaining(deadline, timeout)?))?;
    stream
        .write_all(&encode(request))
        .map_err(|e| timed_out(e, timeout))?;
    read_response(&mut stream, deadline, timeout)
}

/// The request's bytes: head and body in one buffer, so it goes out in one write.
fn encode(request: &Request) -> Vec<u8> {
    let mut out = format!(
        "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n",
        request.method.as_str(),
        request.path
    )
    .into_bytes();
    match &request.body {
        Some(body) => {
            let body = body.to_string();
            out.extend_from_slice(
                format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(body.as_bytes());
        }
        None => out.extend_from_slice(b"\r\n"),
    }
    out
}

fn read_response(
    stream: &mut UnixStream,
    deadline: Instant,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let (status, head_len, framing) = loop {
        if read_some(stream, &mut buf, deadline, timeout)? == 0 {
            return Err(HttpError::Malformed(format!(
                "the connection closed after {} bytes, before a complete response head",
                buf.len()
            )));
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let status = response.code.unwrap_or_default();
                break (status, head_len, framing(status, response.headers)?);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(HttpError::Malformed(format!(
                    "the response head is longer than {MAX_HEAD} bytes"
                )));
            }
            Err(e) => {
                return Err(HttpError::Malformed(format!(
                    "bad response head ({e}): {:?}",
                    String::from_utf8_lossy(&buf[..buf.len().min(200)])
                )));
            }
        }
    };
    let mut body = buf.split_off(head_len);
    match framing {
        Framing::Empty => body.clear(),
        Framing::Length(len) => {
            while body.len() < len {
                if read_some(stream, &mut body, deadline, timeout)? == 0 {
                    return Err(HttpError::Malformed(format!(
                        "the connection closed after {} of {len} body bytes",
                        body.len()
                    )));
                }
            }
            body.truncate(len);
        }
        Framing::ToEof => while read_some(stream, &mut body, deadline, timeout)? != 0 {},
    }
    Ok(Response { status, body })
}

enum Framing {
    Empty,
    Length(usize),
    ToEof,
}

fn framing(status: u16, headers: &[httparse::Header<'_>]) -> Result<Framing, HttpError> {
    // RFC 9112 6.3: these never have a body, whatever the headers say.
    if status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(Framing::Empty);
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
    };
    if let Some(encoding) = header("transfer-encoding") {
        return Err(HttpError::Malformed(format!(
            "unsupported Transfer-Encoding {encoding:?}"
        )));
    }
    match header("content-length") {
        Some(len) => match len.parse::<usize>() {
            Ok(len) if len <= MAX_BODY => Ok(Framing::Length(len)),
            Ok(len) => Err(HttpError::Malformed(format!(
                "a {len}-byte body is larger than {MAX_BODY} bytes"
            ))),
            Err(_) => Err(HttpError::Malformed(format!("bad Content-Length {len:?}"))),
        },
        None => Ok(Framing::ToEof),
    }
}

/// One `read` into `buf`'s spare room, bounded by the deadline; 0 means end of stream.
fn read_some(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    timeout: Duration,
) -> Result<usize, HttpError> {
    if buf.len() > MAX_HEAD + MAX_BODY {
        return Err(HttpError::Malformed(format!(
            "the response is longer than {} bytes",
            MAX_HEAD + MAX_BODY
        )));
    }
    stream.set_read_timeout(Some(remaining(deadline, timeout)?))?;
    let mut chunk = [0u8; 4096];
    let n = loop {
        match stream.read(&mut chunk) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timed_out(e, timeout).into()),
        }
    };
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Time left before `deadline`, or a timeout error when none is.
fn remaining(deadline: Instant, timeout: Duration) -> io::Result<Duration> {
    match deadline.checked_duration_since(Instant::now()) {
        // A zero timeout means "block forever" to set_read_timeout: never pass one.
        Some(left) if !left.is_zero() => Ok(left),
        _ => Err(no_answer(timeout)),
    }
}

/// Socket timeouts surface as `WouldBlock` ("Resource temporarily unavailable"); say what
/// they mean.
fn timed_out(e: io::Error, timeout: Duration) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => no_answer(timeout),
        _ => e,
    }
}

fn no_answer(timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no complete answer within {timeout:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::firecracker::api::{ActionType, action};

    #[test]
    fn encodes_a_put_with_its_length() {
        let bytes = encode(&action(ActionType::InstanceStart));
        let text = String::from_utf8(bytes).unwrap();
        let body = r#"{"action_type":"InstanceStart"}"#;
        assert_eq!(
            text,
            format!(
                "PUT /actions HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        );
    }

    #[test]
    fn encodes_a_get_without_body_headers() {
        let text = String::from_utf8(encode(&Request::get("/"))).unwrap();
        assert_eq!(
            text,
            "GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
        );
    }

    #[test]
    fn framing_follows_status_and_headers() {
        let len = [httparse::Header {
            name: "Content-Length",
            value: b" 12 ",
        }];
        assert!(matches!(framing(204, &len), Ok(Framing::Empty)));
        assert!(matches!(framing(400, &len), Ok(Framing::Length(12))));
        assert!(matches!(framing(200, &[]), Ok(Framing::ToEof)));
        let chunked = [httparse::Header {
            name: "transfer-encoding",
            value: b"chunked",
        }];
        assert!(matches!(
            framing(200, &chunked),
            Err(HttpError::Malformed(_))
        ));
        let huge = [httparse::Header {
            name: "content-length",
            value: b"99999999",
        }];
        assert!(matches!(framing(200, &huge), Err(HttpError::Malformed(_))));
    }
}
