//! Envoy's `connection.id`: one number per downstream connection, counted from 1 across the
//! process's listeners, HTTP and TCP alike, and never given to two connections (unlike a file
//! descriptor, which the next connection may reuse).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

use pingora::protocols::SocketDigest;
use rustc_hash::FxHashMap;

static NEXT: AtomicU64 = AtomicU64::new(1);

/// A new connection's id.
pub(crate) fn next_id() -> u64 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The ids given to the HTTP connections served, by the address of their socket digest:
/// Pingora makes one per accepted connection and shares it between the connection's streams
/// (the requests of an HTTP/1.1 keep-alive connection, the streams of an HTTP/2 one). Each
/// entry holds a weak reference to its digest, which keeps the digest's memory allocated, so no
/// other connection's digest can have that address while the entry lives. One table for the
/// process, not one per thread: Pingora runs an HTTP/2 connection's streams on any of a
/// listener's threads, even without work stealing. It is locked once per stream.
struct Seen {
    ids: FxHashMap<usize, (Weak<SocketDigest>, u64)>,
    /// How many entries there may be before those of closed connections go.
    prune_at: usize,
}

static SEEN: LazyLock<Mutex<Seen>> = LazyLock::new(|| {
    Mutex::new(Seen {
        ids: FxHashMap::default(),
        prune_at: 64,
    })
});

/// The id of the HTTP connection whose socket digest is `digest`: a new one for a connection
/// not seen before, the same for all its streams.
pub(crate) fn of(digest: &Arc<SocketDigest>) -> u64 {
    // Nothing under the lock can panic halfway through an update.
    let mut seen = SEEN.lock().unwrap_or_else(PoisonError::into_inner);
    let key = Arc::as_ptr(digest) as usize;
    if let Some((_, id)) = seen.ids.get(&key) {
        return *id;
    }
    if seen.ids.len() >= seen.prune_at {
        // The entries of closed connections go; what is left may double before the next
        // look, so each entry costs a bounded share of one.
        seen.ids.retain(|_, (digest, _)| digest.strong_count() > 0);
        seen.prune_at = (seen.ids.len() * 2).max(64);
    }
    let id = next_id();
    seen.ids.insert(key, (Arc::downgrade(digest), id));
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_keeps_its_id_and_the_next_one_gets_another_even_at_the_same_address() {
        let first = Arc::new(SocketDigest::from_raw_fd(7));
        let id = of(&first);
        assert_eq!(of(&Arc::clone(&first)), id);
        let second = Arc::new(SocketDigest::from_raw_fd(8));
        assert_ne!(of(&second), id);
        // A closed connection's digest stays allocated while its entry lives: the next
        // connection's cannot take its address and its id.
        drop(first);
        let third = Arc::new(SocketDigest::from_raw_fd(7));
        let third_id = of(&third);
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
        assert_eq!(of(&third), third_id);
    }
}
