//! Peers that misbehave on purpose, for the fault-injection tests of the `pwhost serve` suite
//! and the Traffic Server suite (a `#[path]` module of both): upstreams that reset, stall, cut
//! a response short or never end it, and a client sending a chunked body in parts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// What a misbehaving upstream does with each connection once it has read a request's head.
#[derive(Clone, Copy, Debug)]
pub enum Misbehaviour {
    /// Resets the connection (RST) before answering anything.
    Reset,
    /// Never answers; holds the connection until the upstream is dropped.
    Stall,
    /// Sends a 200 announcing 100,000 bytes of body, 1,000 of them, then resets.
    CutMidBody,
    /// Sends a chunked 200, one chunk of 1,000 bytes, then resets.
    CutMidChunks,
    /// Sends a 200 without a length, then 16 KiB of body every 10 ms for as long as the peer
    /// keeps the connection (or the upstream stops).
    Endless,
    /// Sends an interim 103 Early Hints, then a 200 with `x-auth-user: alice` and body `ok`.
    Interim,
    /// Sends a 200 with `bytes` of body as fast as the peer takes them, announced by its
    /// `content-length` or (`announced: false`) not, then ending with the connection; to a
    /// `HEAD`, the head alone (with the same length).
    Large { bytes: usize, announced: bool },
}

/// An upstream on 127.0.0.1 treating every connection as its misbehaviour says, until dropped.
pub struct Misbehaving {
    /// Where it listens.
    pub address: SocketAddr,
    /// Connections it is done with (the peer went, or the misbehaviour ended).
    ended: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Misbehaving {
    /// Binds a port of its own and starts misbehaving on it.
    pub fn start(misbehaviour: Misbehaviour) -> Misbehaving {
        let listener = TcpListener::bind("127.0.0.1:0").expect("the upstream binds");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let address = listener.local_addr().expect("its address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let ended = Arc::new(AtomicUsize::new(0));
        let ending = Arc::clone(&ended);
        let thread = std::thread::spawn(move || {
            let mut connections = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                // A thread per connection, so a slow one holds up no other; each ends soon
                // after the upstream stops, and is joined then.
                let (stopped, ending) = (Arc::clone(&stopped), Arc::clone(&ending));
                connections.push(std::thread::spawn(move || {
                    misbehave(stream, misbehaviour, &stopped);
                    ending.fetch_add(1, Ordering::Relaxed);
                }));
            }
            for connection in connections {
                let _ = connection.join();
            }
        });
        Misbehaving {
            address,
            ended,
            stop,
            thread: Some(thread),
        }
    }

    /// Whether it is done with a connection within `limit` (polled every 50 ms).
    pub fn ended_within(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while self.ended.load(Ordering::Relaxed) == 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }
}

/// Reads a request's head from `stream` (for at most 5 s, or until the upstream stops) and
/// misbehaves.
fn misbehave(mut stream: TcpStream, misbehaviour: Misbehaviour, stopped: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let started = std::time::Instant::now();
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(count) => head.extend_from_slice(&buffer[..count]),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) && !stopped.load(Ordering::Relaxed)
                    && started.elapsed() < Duration::from_secs(5) => {}
            Err(_) => return,
        }
    }
    match misbehaviour {
        Misbehaviour::Reset => reset(stream),
        Misbehaviour::Stall => {
            // Held open, unanswered, until the upstream stops.
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Misbehaviour::CutMidBody => {
            let mut response = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n".to_vec();
            response.resize(response.len() + 1000, b'x');
            let _ = stream.write_all(&response);
            // Long enough for the proxy to have sent the response on its way.
            std::thread::sleep(Duration::from_millis(200));
            reset(stream);
        }
        Misbehaviour::CutMidChunks => {
            let mut response =
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3e8\r\n".to_vec();
            response.resize(response.len() + 1000, b'x');
            response.extend_from_slice(b"\r\n");
            let _ = stream.write_all(&response);
            std::thread::sleep(Duration::from_millis(200));
            reset(stream);
        }
        Misbehaviour::Interim => {
            let _ = stream.write_all(
                b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n\
                  HTTP/1.1 200 OK\r\nx-auth-user: alice\r\ncontent-length: 2\r\n\
                  connection: close\r\n\r\nok",
            );
        }
        Misbehaviour::Large { bytes, announced } => {
            let asked_head = head.starts_with(b"HEAD ");
            let head = match announced {
                true => format!("HTTP/1.1 200 OK\r\ncontent-length: {bytes}\r\n\r\n"),
                false => "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_string(),
            };
            let _ = stream.set_write_timeout(Some(Duration::from_millis(50)));
            if !write_until_stopped(&mut stream, head.as_bytes(), stopped) {
                return;
            }
            if asked_head {
                return;
            }
            let chunk = [b'x'; 64 * 1024];
            let mut left = bytes;
            while left > 0 {
                let part = left.min(chunk.len());
                if !write_until_stopped(&mut stream, &chunk[..part], stopped) {
                    return;
                }
                left -= part;
            }
        }
        Misbehaviour::Endless => {
            if stream
                .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
                .is_err()
            {
                return;
            }
            let chunk = [b'x'; 16 * 1024];
            while !stopped.load(Ordering::Relaxed) {
                if stream.write_all(&chunk).is_err() {
                    // The peer is gone.
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Writes all of `bytes` to `stream` (whose writes time out), waiting on a peer that does not
/// read for as long as the upstream runs; `false` if the peer went or the upstream stopped.
fn write_until_stopped(stream: &mut TcpStream, mut bytes: &[u8], stopped: &AtomicBool) -> bool {
    while !bytes.is_empty() {
        if stopped.load(Ordering::Relaxed) {
            return false;
        }
        match stream.write(bytes) {
            Ok(0) => return false,
            Ok(count) => bytes = &bytes[count..],
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return false,
        }
    }
    true
}

impl Drop for Misbehaving {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Closes `stream` with a reset (RST) rather than an orderly close.
pub fn reset(stream: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: sets an option on a socket this function owns, from a value that lives through
    // the call, with its exact size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

/// A response read to the end of its connection.
#[derive(Debug)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// The head, status line and header lines.
    pub head: String,
    /// Every byte after the head, as text.
    pub body: String,
}

impl RawResponse {
    /// The value of header `name` (any case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (header, value) = line.split_once(':')?;
            header.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

impl RawResponse {
    /// The status, if the body came whole: as long as its `content-length` says, or a chunked
    /// body up to its last chunk. A response framed by the close alone cannot show it was cut,
    /// so it does not count as whole.
    pub fn whole_status(&self) -> Result<u16, String> {
        if let Some(length) = self.header("content-length") {
            let length: usize = length
                .parse()
                .map_err(|_| format!("a bad content-length in {:?}", self.head))?;
            if length != self.body.len() {
                return Err(format!("{} of {length} body bytes", self.body.len()));
            }
            return Ok(self.status);
        }
        let chunked = self
            .header("transfer-encoding")
            .is_some_and(|coding| coding.eq_ignore_ascii_case("chunked"));
        if chunked && self.body.ends_with("0\r\n\r\n") {
            return Ok(self.status);
        }
        Err(format!("no whole body to be seen in {:?}", self.head))
    }
}

/// `POST` of `chunks` to `path` as a chunked body on a connection of its own (with `Host:
/// host`), with a pause after each chunk so the plugins see the body in parts; the response,
/// read until the peer closes (the request asks for `connection: close`), else why none came.
pub fn chunked_post(
    port: u16,
    host: &str,
    path: &str,
    chunks: &[&str],
) -> Result<RawResponse, String> {
    let mut connection = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    connection
        .set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ntransfer-encoding: chunked\r\n\
         connection: close\r\n\r\n"
    );
    // A write failing once the proxy has answered early is fine: its answer is read below.
    let _ = connection.write_all(head.as_bytes());
    for chunk in chunks {
        let _ = connection.write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes());
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = connection.write_all(b"0\r\n\r\n");
    let mut received = Vec::new();
    connection
        .read_to_end(&mut received)
        .map_err(|e| format!("reading the response: {e}"))?;
    let text = String::from_utf8_lossy(&received);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no whole response head in {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok(RawResponse {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}
