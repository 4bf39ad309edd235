//! Envoy's `connection.id`: one number per downstream connection, counted from 1 across the
//! process's listeners, HTTP and TCP alike, and never given to two connections (unlike a file
//! descriptor, which the next connection may reuse), and what else a connection's streams
//! share: its request headers deadline ([`HeaderClock`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

use pingora::protocols::SocketDigest;
use rustc_hash::FxHashMap;

use crate::header_timeout::HeaderClock;

static NEXT: AtomicU64 = AtomicU64::new(1);

/// A new connection's id.
pub(crate) fn next_id() -> u64 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// An HTTP connection as its streams see it.
#[derive(Debug, Clone)]
pub(crate) struct Connection {
    /// Envoy's `connection.id`.
    pub(crate) id: u64,
    /// Its request headers deadline, where its listener has one.
    pub(crate) headers: Option<Arc<HeaderClock>>,
}

/// The HTTP connections served, by the address of their socket digest:
/// Pingora makes one per accepted connection and shares it between the connection's streams
/// (the requests of an HTTP/1.1 keep-alive connection, the streams of an HTTP/2 one). Each
/// entry holds a weak reference to its digest, which keeps the digest's memory allocated, so no
/// other connection's digest can have that address while the entry lives. One table for the
/// process, not one per thread: Pingora runs an HTTP/2 connection's streams on any of a
/// listener's threads, even without work stealing. It is locked once per stream.
struct Seen {
    ids: FxHashMap<usize, (Weak<SocketDigest>, Connection)>,
    /// How many entries there may be before those of closed connections go.
    prune_at: usize,
}

static SEEN: LazyLock<Mutex<Seen>> = LazyLock::new(|| {
    Mutex::new(Seen {
        ids: FxHashMap::default(),
        prune_at: 64,
    })
});

/// Registers a connection as it opens, with its request headers deadline.
pub(crate) fn opened(digest: &Arc<SocketDigest>, headers: Option<Arc<HeaderClock>>) {
    let mut seen = lock();
    let connection = Connection {
        id: next_id(),
        headers,
    };
    seen.insert(digest, connection);
}

/// The HTTP connection whose socket digest is `digest`: the one registered when it opened, or
/// (for a connection not registered) a new id, the same for all its streams.
pub(crate) fn of(digest: &Arc<SocketDigest>) -> Connection {
    let mut seen = lock();
    if let Some((_, connection)) = seen.ids.get(&key(digest)) {
        return connection.clone();
    }
    let connection = Connection {
        id: next_id(),
        headers: None,
    };
    seen.insert(digest, connection.clone());
    connection
}

fn lock() -> std::sync::MutexGuard<'static, Seen> {
    // Nothing under the lock can panic halfway through an update.
    SEEN.lock().unwrap_or_else(PoisonError::into_inner)
}

fn key(digest: &Arc<SocketDigest>) -> usize {
    Arc::as_ptr(digest) as usize
}

impl Seen {
    fn insert(&mut self, digest: &Arc<SocketDigest>, connection: Connection) {
        if self.ids.len() >= self.prune_at {
            // The entries of closed connections go; what is left may double before the next
            // look, so each entry costs a bounded share of one.
            self.ids.retain(|_, (digest, _)| digest.strong_count() > 0);
            self.prune_at = (self.ids.len() * 2).max(64);
        }
        self.ids
            .insert(key(digest), (Arc::downgrade(digest), connection));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_keeps_its_id_and_the_next_one_gets_another_even_at_the_same_address() {
        let first = Arc::new(SocketDigest::from_raw_fd(7));
        let id = of(&first).id;
        assert_eq!(of(&Arc::clone(&first)).id, id);
        let second = Arc::new(SocketDigest::from_raw_fd(8));
        assert_ne!(of(&second).id, id);
        // A closed connection's digest stays allocated while its entry lives: the next
        // connection's cannot take its address and its id.
        drop(first);
        let third = Arc::new(SocketDigest::from_raw_fd(7));
        let third_id = of(&third).id;
        assert_ne!(third_id, id);
        // Closed connections' entries go as new ones come.
        let mut digests = Vec::new();
        for fd in 0..200 {
            let digest = Arc::new(SocketDigest::from_raw_fd(fd));
            of(&digest);
            if fd % 2 == 0 {
                digests.push(digest);
            }
        }
        let seen = SEEN.lock().unwrap();
        assert!(seen.ids.len() <= seen.prune_at);
        drop(seen);
        assert_eq!(of(&third).id, third_id);
    }

    #[test]
    fn a_connection_registered_as_it_opened_gives_its_streams_its_id_and_its_headers_deadline() {
        let digest = Arc::new(SocketDigest::from_raw_fd(9));
        let clock = Arc::new(HeaderClock::default());
        opened(&digest, Some(Arc::clone(&clock)));
        let first = of(&digest);
        let second = of(&digest);
        assert_eq!(first.id, second.id);
        let headers = first.headers.expect("the deadline registered");
        assert!(Arc::ptr_eq(&headers, &clock));
        // One opened later at the same address (the first one's digest gone) is another.
        drop((digest, headers, second));
        let digest = Arc::new(SocketDigest::from_raw_fd(9));
        opened(&digest, None);
        let next = of(&digest);
        assert_ne!(next.id, first.id);
        assert!(next.headers.is_none());
    }
}
