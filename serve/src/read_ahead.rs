//! A request's body read while a plugin holds its headers.
//!
//! A plugin configured with `allow_on_headers_stop_iteration` that pauses on its request
//! headers gets the body's chunks meanwhile (Envoy's `StopIteration`; a host that turns it into
//! a stop of everything never calls them, proxy-wasm-cpp-host#143), so that it can look at the
//! body before it lets the headers go on. Pingora reads a request body only once the request
//! has gone upstream, so `pwhost serve` reads ahead itself, and what it read reaches Pingora
//! again through the one place Pingora hands on a body read before: the request's retry buffer,
//! replayed to the body filter once the upstream request starts (where the plugins' version of
//! it is put instead).
//!
//! That buffer holds 64 KiB. A body read ahead past that, and ended, would never reach the
//! upstream (Pingora would find the body done and no buffer to replay), so reading ahead stops
//! short of any read that could both end the body and overflow the buffer (see
//! [`read_is_safe`]): a body whose `Content-Length` is at most 64 KiB is read whole, a longer
//! one as long as a read cannot end it, an HTTP/1.1 chunked one as long as the buffer holds
//! (Pingora ends such a body with a read that carries no bytes), an HTTP/2 one without a length
//! as long as one more DATA frame fits; the rest is read once the plugin lets the headers go.
//! This is Envoy's flow control with a smaller buffer: Envoy too stops reading a held stream's
//! body at its buffer limit.

use pingora::proxy::Session;

/// The bytes Pingora's retry buffer keeps (pingora-core's `BODY_BUF_LIMIT`, HTTP/1 and 2).
const RETRY_BUFFER_BYTES: usize = 64 * 1024;

/// The most one read can return: an HTTP/1.1 body read fills a 64 KiB buffer
/// (pingora-core's `BODY_BUFFER_SIZE`), except the first, which returns what came with the
/// headers (see [`ReadAhead::new`]); an HTTP/2 read is one DATA frame (16 KiB: Pingora
/// advertises h2's default `SETTINGS_MAX_FRAME_SIZE`).
const HTTP1_MAX_READ: usize = 64 * 1024;
const HTTP2_MAX_READ: usize = 16 * 1024;

/// Data that went through the plugins before `start` (in chain order) and goes on from there.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    /// The position in the chain it goes on from.
    pub(crate) start: usize,
    pub(crate) data: Vec<u8>,
    /// It ends the body.
    pub(crate) end: bool,
}

/// Why a read ahead failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadFailure {
    /// The client sent nothing for the stream's idle timeout.
    TimedOut,
    /// The client went away or sent a malformed body (the reader's error says which).
    Failed,
}

/// Reads a request's body ahead of Pingora while its headers are held.
pub(crate) struct ReadAhead<'s> {
    session: &'s mut Session,
    /// Reads made, and the body bytes they returned.
    reads: usize,
    read: usize,
    /// The client's `Content-Length`, when it frames the body.
    content_length: Option<usize>,
    /// HTTP/1.1 `Transfer-Encoding: chunked`.
    chunked: bool,
    /// The most the first read, and each later one, can return.
    first_read_max: usize,
    read_max: usize,
    /// No more is read ahead: the body ended, or the client's trailers follow.
    done: bool,
    /// The client waits for `100 Continue` before it sends the body (`Expect: 100-continue`).
    expects_continue: bool,
    /// `100 Continue` went to the client.
    sent_continue: bool,
    /// What went through some of the plugins and waits for the rest.
    pub(crate) pending: Option<Pending>,
    /// Why reading failed (a client gone, a malformed body): the stream ends with it as if
    /// Pingora had read it.
    error: Option<Box<pingora::Error>>,
}

/// What a read ahead left, for the proxy.
pub(crate) struct ReadAheadEnd {
    /// What went through some of the plugins and waits for the rest.
    pub(crate) pending: Option<Pending>,
    /// The bytes read ahead, if Pingora replays them to the body filter first (its retry
    /// buffer is not empty and whole).
    pub(crate) replayed: Option<usize>,
    /// `100 Continue` went to the client: the request's `Expect` must not reach the upstream
    /// (whose own `100 Continue` would be a second one), as Envoy strips it.
    pub(crate) sent_continue: bool,
    /// Why reading failed, if it did.
    pub(crate) error: Option<Box<pingora::Error>>,
}

impl<'s> ReadAhead<'s> {
    /// A reader of `session`'s body, whose request header (framed by `header`) is out of the
    /// session while the plugins hold it.
    pub(crate) fn new(session: &'s mut Session, header: &pingora::http::RequestHeader) -> Self {
        // What is read ahead must be in the buffer Pingora replays.
        session.as_mut().enable_retry_buffering();
        let http2 = session.as_ref().is_http2();
        let chunked = !http2 && header.headers.contains_key(http::header::TRANSFER_ENCODING);
        let content_length = header
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<usize>().ok())
            .filter(|_| !chunked);
        let expects_continue = header.version == http::Version::HTTP_11
            && header
                .headers
                .get(http::header::EXPECT)
                .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let (first_read_max, read_max) = if http2 {
            (HTTP2_MAX_READ, HTTP2_MAX_READ)
        } else {
            // The first HTTP/1.1 read returns the body bytes that came in the headers' buffer,
            // which grows by doubling from 4 KiB: less than the headers' own size, or 4 KiB
            // (pipelining, which could bring more, is off).
            let headers = session
                .as_ref()
                .as_http1()
                .map_or(usize::MAX / 2, |http1| http1.get_headers_raw_bytes().len());
            (HTTP1_MAX_READ.max(2 * headers), HTTP1_MAX_READ)
        };
        ReadAhead {
            session,
            reads: 0,
            read: 0,
            content_length,
            chunked,
            first_read_max,
            read_max,
            done: false,
            expects_continue,
            sent_continue: false,
            pending: None,
            error: None,
        }
    }

    /// Whether one more read is safe: see [`read_is_safe`].
    pub(crate) fn may_read(&self) -> bool {
        if self.done || self.error.is_some() {
            return false;
        }
        if self.chunked {
            // A chunked body ends with a read that carries no bytes, so only a body that is not
            // ended can overflow the buffer, and Pingora reads on after that.
            return !self.session.as_ref().retry_buffer_truncated();
        }
        let read_max = if self.reads == 0 {
            self.first_read_max
        } else {
            self.read_max
        };
        read_is_safe(self.read, self.content_length, read_max)
    }

    /// Answers `100 Continue` to a client waiting for it, once, before the first read: the
    /// client sends its body only once asked to (Envoy answers it itself too). Not to be
    /// raced against anything: a write abandoned half-way would corrupt the response.
    pub(crate) async fn send_continue(&mut self) -> Result<(), ReadFailure> {
        if !self.expects_continue {
            return Ok(());
        }
        self.expects_continue = false;
        match self.session.write_continue_response().await {
            Ok(()) => {
                self.sent_continue = true;
                Ok(())
            }
            Err(error) => {
                self.error = Some(error.into_down());
                Err(ReadFailure::Failed)
            }
        }
    }

    /// Reads the next chunk: its bytes and whether it ends the body; `None` when no more is to
    /// be read ahead though the body has not ended (HTTP/2 trailers follow: Pingora reads on).
    pub(crate) async fn read(&mut self) -> Result<Option<(Vec<u8>, bool)>, ReadFailure> {
        loop {
            let chunk = match self.session.read_request_body().await {
                Ok(chunk) => chunk,
                Err(error) => return Err(self.failed(error)),
            };
            self.reads += 1;
            // As Pingora's own body loop says it.
            let end = self.session.is_body_done();
            let Some(chunk) = chunk else {
                self.done = true;
                return Ok(end.then(|| (Vec::new(), true)));
            };
            if chunk.is_empty() && !end {
                // Pingora's chunked reader between a chunk's parts: no data for the plugins
                // (Envoy calls no filter with empty data that does not end the body).
                continue;
            }
            self.read += chunk.len();
            self.done = end;
            return Ok(Some((chunk.to_vec(), end)));
        }
    }

    /// Resolves once the client is known to have gone ([`crate::proxy::client_gone`]),
    /// keeping the error the stream ends with: for a wait that reads no more.
    pub(crate) async fn client_gone(&mut self) {
        self.error = Some(crate::proxy::client_gone(self.session).await);
    }

    fn failed(&mut self, error: Box<pingora::Error>) -> ReadFailure {
        match error.etype() {
            // The client sent nothing for the stream's idle timeout (the session's read
            // timeout): the stream's own timeout, a 408.
            pingora::ErrorType::ReadTimedout => {
                self.done = true;
                ReadFailure::TimedOut
            }
            _ => {
                self.error = Some(error.into_down());
                ReadFailure::Failed
            }
        }
    }

    /// What the proxy needs to know of the read.
    pub(crate) fn finish(self) -> ReadAheadEnd {
        let replayed =
            (self.read > 0 && !self.session.as_ref().retry_buffer_truncated()).then_some(self.read);
        ReadAheadEnd {
            pending: self.pending,
            replayed,
            sent_continue: self.sent_continue,
            error: self.error,
        }
    }
}

/// Whether a read of up to `read_max` bytes, after `read` bytes of a body of `content_length`
/// (if known), leaves what was read replayable: it cannot overflow the retry buffer, or the
/// body's length says it cannot end the body (a body that is not ended is read on by Pingora
/// itself, so an overflowed buffer loses nothing then).
fn read_is_safe(read: usize, content_length: Option<usize>, read_max: usize) -> bool {
    let fits = read.saturating_add(read_max) <= RETRY_BUFFER_BYTES;
    let cannot_end_or_fits = content_length.is_some_and(|length| {
        length <= RETRY_BUFFER_BYTES || length.saturating_sub(read) > read_max
    });
    fits || cannot_end_or_fits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_of_known_length_that_fits_the_retry_buffer_is_read_whole() {
        for read in [0, 1, 40_000, 65_535] {
            assert!(read_is_safe(read, Some(65_536), HTTP1_MAX_READ));
            assert!(read_is_safe(read, Some(65_536), usize::MAX));
        }
    }

    #[test]
    fn a_longer_body_is_read_only_while_no_read_can_end_it() {
        let length = 200 * 1024;
        assert!(read_is_safe(0, Some(length), HTTP1_MAX_READ));
        assert!(read_is_safe(
            length - HTTP1_MAX_READ - 1,
            Some(length),
            HTTP1_MAX_READ
        ));
        assert!(!read_is_safe(
            length - HTTP1_MAX_READ,
            Some(length),
            HTTP1_MAX_READ
        ));
        // A first read that may bring more with large headers.
        assert!(!read_is_safe(0, Some(length), length));
    }

    #[test]
    fn an_http2_body_without_length_is_read_while_one_more_frame_fits() {
        assert!(read_is_safe(48 * 1024, None, HTTP2_MAX_READ));
        assert!(!read_is_safe(48 * 1024 + 1, None, HTTP2_MAX_READ));
    }
}
