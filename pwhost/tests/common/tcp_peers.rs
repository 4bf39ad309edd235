//! TCP upstreams (one that echoes, one that only reads, one that greets, one that floods, one
//! that never answers a connect, one taking WebSocket upgrades) and TCP clients for the
//! proxies' listeners; shared by the `pwhost serve` tests and the Traffic Server tests
//! (`#[path]` module).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A TCP server on 127.0.0.1 handing each connection to a thread of its own running `serve`,
/// until dropped (the accept loop is joined then; a connection's thread ends when its peer
/// closes or after 10 s without data).
struct Acceptor {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    fn start(serve: impl Fn(TcpStream) + Clone + Send + 'static) -> Acceptor {
        let listener = TcpListener::bind("127.0.0.1:0").expect("the server binds");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let address = listener.local_addr().expect("an address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let Ok((connection, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = connection.set_nonblocking(false);
                let _ = connection.set_read_timeout(Some(Duration::from_secs(10)));
                let serve = serve.clone();
                std::thread::spawn(move || serve(connection));
            }
        });
        Acceptor {
            address,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A TCP server that sends back whatever it receives and closes once the client has sent
/// everything (its FIN); it serves until dropped.
pub struct Echo {
    pub address: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    _acceptor: Acceptor,
}

impl Echo {
    pub fn start() -> Echo {
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        let acceptor = Acceptor::start(move |mut connection| {
            counted.fetch_add(1, Ordering::Relaxed);
            let mut buffer = [0u8; 4096];
            while let Ok(read) = connection.read(&mut buffer) {
                if read == 0 || connection.write_all(&buffer[..read]).is_err() {
                    break;
                }
            }
        });
        Echo {
            address: acceptor.address,
            connections,
            _acceptor: acceptor,
        }
    }
}

/// A TCP server that reads whatever it receives and never sends anything; it serves until
/// dropped.
pub struct Sink {
    pub address: SocketAddr,
    _acceptor: Acceptor,
}

impl Sink {
    pub fn start() -> Sink {
        let acceptor = Acceptor::start(|mut connection| {
            let mut buffer = [0u8; 4096];
            while matches!(connection.read(&mut buffer), Ok(count) if count > 0) {}
        });
        Sink {
            address: acceptor.address,
            _acceptor: acceptor,
        }
    }
}

/// A TCP server that greets each connection (`greeting`) once told to ([`Greeter::greet`]),
/// and keeps what it receives until its peer closes the connection (or 10 s pass without
/// data); it serves until dropped.
pub struct Greeter {
    pub address: SocketAddr,
    /// What each connection received, once it ended, in the order they ended.
    pub received: Arc<Mutex<Vec<String>>>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    greet: Arc<AtomicBool>,
    _acceptor: Acceptor,
}

impl Greeter {
    pub fn start(greeting: &'static str) -> Greeter {
        let received = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let greet = Arc::new(AtomicBool::new(false));
        let (kept, counted, told) = (
            Arc::clone(&received),
            Arc::clone(&accepted),
            Arc::clone(&greet),
        );
        let acceptor = Acceptor::start(move |mut connection| {
            counted.fetch_add(1, Ordering::Relaxed);
            let deadline = Instant::now() + Duration::from_secs(20);
            while !told.load(Ordering::Relaxed) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let mut bytes = Vec::new();
            if connection.write_all(greeting.as_bytes()).is_ok() {
                let _ = connection.read_to_end(&mut bytes);
            }
            kept.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&bytes).into_owned());
        });
        Greeter {
            address: acceptor.address,
            received,
            accepted,
            greet,
            _acceptor: acceptor,
        }
    }

    /// Greets every connection, those open now and those to come.
    pub fn greet(&self) {
        self.greet.store(true, Ordering::Relaxed);
    }

    /// What each connection received, once every connection accepted so far (at least one)
    /// has ended; `None` if that takes over 10 s.
    pub fn all_received(&self) -> Option<Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let received = self.received.lock().unwrap().clone();
            let accepted = self.accepted.load(Ordering::Relaxed);
            if accepted > 0 && received.len() == accepted {
                return Some(received);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Through `port`, a listener running `tcp_pass_then_close.wat` twice in front of `greeter`:
/// the client sends, the first filter holds its bytes (`wait_for_log` waits for the plugin's
/// log line), the upstream greets; its greeting passes both filters to the client and lets the
/// held bytes go on to the second filter, which closes the connection. The client must still
/// get the greeting (it went through the whole chain before the close), the upstream none of
/// the client's bytes (nor of any other connection, e.g. one that found the listener ready).
pub fn the_chunk_before_a_close_still_goes_out(
    port: u16,
    greeter: &Greeter,
    wait_for_log: impl Fn(&str),
) -> Result<(), String> {
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("the proxy accepts");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    client.write_all(b"hello").expect("sent");
    wait_for_log("tcp_pass_then_close: held");
    greeter.greet();
    let mut answer = Vec::new();
    let _ = client.read_to_end(&mut answer);
    wait_for_log("tcp_pass_then_close: closing");
    if answer != b"greeting" {
        return Err(format!(
            "the client got {:?}, not the greeting",
            String::from_utf8_lossy(&answer)
        ));
    }
    match greeter.all_received() {
        Some(received) if received.iter().all(String::is_empty) => Ok(()),
        Some(received) => Err(format!("the upstream got {received:?}")),
        None => Err("the upstream's connections did not end".into()),
    }
}

/// A TCP server that sends `size` bytes (`x`) to each connection as soon as it is accepted,
/// then sends nothing more and holds the connection open until its peer closes it (or 20 s
/// pass), or resets it; it serves until dropped.
pub struct Flood {
    pub address: SocketAddr,
    _acceptor: Acceptor,
}

impl Flood {
    pub fn start(size: usize) -> Flood {
        Flood::then(size, false)
    }

    /// A flood that resets each connection (RST) 300 ms after sending, instead of holding it.
    pub fn then_reset(size: usize) -> Flood {
        Flood::then(size, true)
    }

    fn then(size: usize, reset: bool) -> Flood {
        let acceptor = Acceptor::start(move |mut connection| {
            let _ = connection.set_read_timeout(Some(Duration::from_secs(20)));
            if connection.write_all(&vec![b'x'; size]).is_err() {
                return;
            }
            if reset {
                std::thread::sleep(Duration::from_millis(300));
                super::faulty_peers::reset(connection);
                return;
            }
            let mut buffer = [0u8; 4096];
            while matches!(connection.read(&mut buffer), Ok(count) if count > 0) {}
        });
        Flood {
            address: acceptor.address,
            _acceptor: acceptor,
        }
    }
}

/// Reads from `port`, a listener with a 1 s idle timeout in front of a [`Flood`] of `size`
/// bytes, slowly (at most 256 KiB every 50 ms, so that the proxy holds part of the flood for
/// well over the timeout, yet writes to the client often within it), and checks that all of
/// it came before the connection was closed
/// (`prefix` first, what the listener's filter puts before the upstream's first bytes): a side
/// waiting while the other is written to is not idle. With `chatty`, the client also sends a
/// few bytes after each read (which the proxy may fail to pass on). Why not, if it did not.
pub fn a_slow_reader_gets_all_of_a_flood_past_a_1s_idle_timeout(
    port: u16,
    size: usize,
    prefix: &str,
    chatty: bool,
) -> Result<(), String> {
    let mut connection = TcpStream::connect(("127.0.0.1", port)).expect("the proxy accepts");
    connection
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("a read timeout");
    // Traffic Server accepts a connection only once the client sends (`defer_accept`).
    let _ = connection.write_all(b"go");
    let started = Instant::now();
    let mut received = 0;
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        match connection.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(count) => received += count,
        }
        if received >= prefix.len() + size {
            break;
        }
        if chatty {
            // A write failing once the proxy closed its end is fine: the reading tells.
            let _ = connection.write_all(b"more");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match received == prefix.len() + size {
        true => Ok(()),
        false => Err(format!(
            "the connection was closed after {:?} with {received} of {} bytes sent",
            started.elapsed(),
            prefix.len() + size
        )),
    }
}

/// An address where a connect never completes: a listener with no room in its accept queue
/// (a backlog of none, taken by one connection it never accepts), so the kernel drops every
/// new SYN and the connecting side waits until it gives up. (Linux lets one connection into a
/// backlog of none; kernels before 6.13 do so only with SYN cookies on, Debian's default.)
pub struct Unanswering {
    pub address: SocketAddr,
    _listener: TcpListener,
    _queued: TcpStream,
}

impl Unanswering {
    pub fn start() -> Unanswering {
        let listener = TcpListener::bind("127.0.0.1:0").expect("the listener binds");
        // SAFETY: `listen` on a listening socket this value owns only sets its backlog.
        let listened = unsafe { libc::listen(listener.as_raw_fd(), 0) };
        assert_eq!(listened, 0, "listen: {}", std::io::Error::last_os_error());
        let address = listener.local_addr().expect("an address");
        let queued = TcpStream::connect(address).expect("the one connection the queue holds");
        Unanswering {
            address,
            _listener: listener,
            _queued: queued,
        }
    }
}

/// Sends `parts` (a pause between them) on a new connection to `port`, ends its side, and
/// returns everything received until the proxy closes the connection.
pub fn tcp_exchange(port: u16, parts: &[&str]) -> String {
    let mut connection = TcpStream::connect(("127.0.0.1", port)).expect("the proxy accepts");
    connection
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    // A proxy that closes the connection early may refuse what follows: what was received
    // tells.
    for part in parts {
        let _ = connection.write_all(part.as_bytes());
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = connection.shutdown(std::net::Shutdown::Write);
    let mut received = Vec::new();
    let started = Instant::now();
    if let Err(error) = connection.read_to_end(&mut received) {
        // A reset ends it too; a timeout is the proxy not ending the connection.
        assert!(
            started.elapsed() < Duration::from_secs(9),
            "the proxy did not end the connection: {error}"
        );
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// Sends a few bytes to `port`, a listener with a 1 s connect timeout in front of an upstream
/// that never answers the connect ([`Unanswering`]), and checks that the proxy closed the
/// connection after that timeout, with nothing forwarded back.
pub fn assert_closed_after_a_1s_connect_timeout(port: u16) {
    let started = Instant::now();
    assert_eq!(tcp_exchange(port, &["hello"]), "");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "closed after {waited:?}"
    );
}

/// Sends a few bytes to `port`, a listener with a 1 s idle timeout in front of an upstream that
/// never sends, every 300 ms for 2.1 s, and checks that the connection stayed open throughout
/// and was closed about one timeout after the traffic stopped.
pub fn assert_one_way_traffic_outlives_a_1s_idle_timeout(port: u16) {
    let mut connection = TcpStream::connect(("127.0.0.1", port)).expect("the proxy accepts");
    connection
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("a read timeout");
    let started = Instant::now();
    for sent in 0..8 {
        if sent > 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        // A connection closed early refuses the rest: how long it stayed open tells.
        let _ = connection.write_all(b"tick");
    }
    let quiet_since = Instant::now();
    let mut received = Vec::new();
    let _ = connection.read_to_end(&mut received);
    assert!(
        received.is_empty(),
        "the upstream sent nothing, yet {received:?} came back"
    );
    let (open_for, quiet_for) = (started.elapsed(), quiet_since.elapsed());
    assert!(
        open_for >= Duration::from_millis(2900),
        "closed while traffic went on: after {open_for:?}"
    );
    assert!(
        quiet_for >= Duration::from_millis(900) && quiet_for < Duration::from_secs(10),
        "closed {quiet_for:?} after the traffic stopped"
    );
}

/// An HTTP upstream taking WebSocket upgrades: it answers 101 to a request asking to upgrade
/// to `websocket` and then echoes every byte until the client ends; a request for `/refused`
/// (or one not asking for a WebSocket) it answers 403 instead, as an application refusing the
/// upgrade, and one for `/length` it switches with a 101 carrying `content-length: 0`. The
/// last request it got (its head, lower-cased) is in `request`. It serves until dropped.
pub struct UpgradeEcho {
    pub address: SocketAddr,
    pub request: Arc<Mutex<String>>,
    _acceptor: Acceptor,
}

impl UpgradeEcho {
    pub fn start() -> UpgradeEcho {
        let request = Arc::new(Mutex::new(String::new()));
        let seen = Arc::clone(&request);
        let acceptor = Acceptor::start(move |connection| UpgradeEcho::serve(connection, &seen));
        UpgradeEcho {
            address: acceptor.address,
            request,
            _acceptor: acceptor,
        }
    }

    fn serve(mut connection: TcpStream, seen: &Mutex<String>) {
        let Some(head) = read_head(&mut connection) else {
            return;
        };
        *seen.lock().unwrap_or_else(|e| e.into_inner()) = head.clone();
        if head.starts_with("get /refused ") || !head.contains("upgrade: websocket") {
            let _ = connection.write_all(
                b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\nconnection: close\r\n\r\nno",
            );
            return;
        }
        // For `/length`, the 101 says `content-length: 0`, which says nothing of what follows.
        let length = if head.starts_with("get /length ") {
            "content-length: 0\r\n"
        } else {
            ""
        };
        let switched = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n{length}\r\n"
        );
        let _ = connection.write_all(switched.as_bytes());
        let mut buffer = [0u8; 1024];
        while let Ok(count) = connection.read(&mut buffer) {
            if count == 0 || connection.write_all(&buffer[..count]).is_err() {
                return;
            }
        }
    }
}

/// An HTTP message's head read from `connection` up to its blank line, lower-cased; `None` if
/// the connection ends (or times out) first.
fn read_head(connection: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match connection.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).to_lowercase())
}

/// A WebSocket upgrade request for `path` (with header lines `extra`, each ending in CRLF) on a
/// new connection to `port`, and the head of the answer (lower-cased; empty if none came).
pub fn websocket_upgrade(port: u16, path: &str, extra: &str) -> (TcpStream, String) {
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: a\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n{extra}\r\n"
    );
    send_for_head(port, &request)
}

/// Sends `request` on a new connection to `port`; returns the connection and the head of the
/// answer (lower-cased; empty if none came within 10 s).
pub fn send_for_head(port: u16, request: &str) -> (TcpStream, String) {
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connects");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    client
        .write_all(request.as_bytes())
        .expect("the request sent");
    let head = read_head(&mut client).unwrap_or_default();
    (client, head)
}

/// Sends each message on the switched connection `client` and reads its echo back.
pub fn echoes(client: &mut TcpStream, messages: &[&str]) -> Result<(), String> {
    for message in messages {
        client
            .write_all(message.as_bytes())
            .map_err(|e| format!("{message:?} not sent: {e}"))?;
        let mut echoed = vec![0u8; message.len()];
        client
            .read_exact(&mut echoed)
            .map_err(|e| format!("no echo of {message:?}: {e}"))?;
        if echoed != message.as_bytes() {
            return Err(format!(
                "{message:?} came back as {:?}",
                String::from_utf8_lossy(&echoed)
            ));
        }
    }
    Ok(())
}
