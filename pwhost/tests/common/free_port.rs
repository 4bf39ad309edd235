//! Ports for the servers tests start by number (the proxy under test), and waiting until they
//! listen; shared by the `pwhost serve` tests and the Traffic Server tests (`#[path]` module).

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// A port for a server the test starts by number (the proxy under test), outside the kernel's
/// ephemeral range (32768-60999 by default): a server bound to port 0 (the origins and upstreams
/// of tests running beside) is never given it between this call and the proxy's own bind, which
/// a port picked by binding port 0 could not promise. Each process tries ports of a block of its
/// own in turn, skipping any in use.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let block = 10_000 + (std::process::id() % 110) as u16 * 200;
    for _ in 0..200 {
        let port = block + NEXT.fetch_add(1, Ordering::Relaxed) % 200;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port on 127.0.0.1")
}

/// Waits until something accepts connections on 127.0.0.1:`port`; past `deadline`, fails the
/// test with `context()` (the server's log).
pub fn wait_for_listener(port: u16, deadline: Instant, context: impl Fn() -> String) {
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on port {port}:\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
