//! A minimal HTTP/1.x server for `--http ADDR`: `GET /metrics` and `GET /status`, nothing else.
//!
//! It runs on its own thread with blocking sockets and answers one request per connection,
//! each bounded (`REQUEST_BYTES_MAX`, `REQUEST_TIMEOUT`), so a slow or hostile client holds it
//! up for at most that long and can never reach the replication path. No dependency is worth
//! it for two read-only endpoints.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::status::Status;

/// The most bytes of a request read (the request line and headers).
pub const REQUEST_BYTES_MAX: usize = 8192;
/// How long a client may take to send its request or read the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

pub type StatusFn = Arc<dyn Fn() -> Status + Send + Sync>;

pub struct HttpServer {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serves `status()` on `addr` until dropped.
    pub fn start(addr: SocketAddr, status: StatusFn) -> io::Result<HttpServer> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot listen for HTTP on {addr}: {e}"))
        })?;
        let local_addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ferry-http".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        match conn {
                            Ok(c) => {
                                if let Err(e) = answer(c, &status) {
                                    tracing::debug!("http: {e}");
                                }
                            }
                            Err(e) => tracing::debug!("http accept: {e}"),
                        }
                    }
                })?
        };
        Ok(HttpServer {
            local_addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.local_addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(mut conn: TcpStream, status: &StatusFn) -> io::Result<()> {
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    conn.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && !request.windows(2).any(|w| w == b"\n\n")
    {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
        if request.len() > REQUEST_BYTES_MAX {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request over REQUEST_BYTES_MAX\n",
            );
        }
    }
    let line = String::from_utf8_lossy(&request);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(
            &mut conn,
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n",
        );
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => respond(
            &mut conn,
            "200 OK",
            "text/plain; version=0.0.4",
            &status().prometheus(),
        ),
        "/status" => respond(&mut conn, "200 OK", "application/json", &status().json()),
        _ => respond(
            &mut conn,
            "404 Not Found",
            "text/plain",
            "try /metrics or /status\n",
        ),
    }
}

fn respond(conn: &mut TcpStream, code: &str, content_type: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())
}

/// GETs `path` from `base` (`http://host:port` or `host:port`); the body of a 200 answer.
pub fn get(base: &str, path: &str) -> io::Result<String> {
    let host = base.trim_start_matches("http://").trim_end_matches('/');
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)?
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} resolves to no address"),
            )
        })?;
    let mut conn = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot connect to {host}: {e}")))?;
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{host}: not an HTTP answer"),
        )
    })?;
    let status_line = head.lines().next().unwrap_or("");
    if !status_line.contains(" 200 ") {
        return Err(io::Error::other(format!("{host}{path}: {status_line}")));
    }
    Ok(body.to_string())
}
