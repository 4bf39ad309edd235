//! A request's body read while a plugin holds its headers.
//!
//! A plugin configured with `allow_on_headers_stop_iteration` that pauses on its request
//! headers gets the body's chunks meanwhile (Envoy's `StopIteration`; proxy-wasm-cpp-host#143 is
//! the host that forgot to), so that it can look at the body before it lets the headers go on.
//! Pingora reads a request body only once the request has gone upstream, so
//! `pwhost serve` reads ahead itself, and what it read reaches Pingora again through the one
//! place Pingora hands a body it read before: the request's retry buffer, replayed to the body
//! filter once the upstream request starts (where the plugins' version of it is put instead).
//!
//! That buffer holds 64 KiB. A body read ahead past that, and ended, would reach the upstream
//! never (Pingora would find the body done and no buffer to replay), so reading ahead stops
//! short of any read that could both end the body and overflow the buffer: a body whose
//! `Content-Length` is at most 64 KiB is read whole; a longer one, or one without a length (HTTP/1.1
//! chunked; HTTP/2 without `content-length`), as far as that rule allows, and the rest once
//! the plugin continues. This is Envoy's flow control with a smaller buffer: Envoy too stops
//! reading a paused stream's body at its buffer limit.

use pingora::proxy::Session;

/// The bytes Pingora's retry buffer keeps (pingora-core's `BODY_BUF_LIMIT`, HTTP/1 and 2).
const RETRY_BUFFER_BYTES: usize = 64 * 1024;

/// The most one read can return: an HTTP/1.1 body read fills a 64 KiB buffer
/// (pingora-core's `BODY_BUFFER_SIZE`), an HTTP/2 read one DATA frame (16 KiB: Pingora
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

/// Reads a request's body ahead of Pingora while its headers are held.
pub(crate) struct ReadAhead<'s> {
    session: &'s mut Session,
    /// Body bytes read so far.
    read: usize,
    /// The client's `Content-Length`, when it frames the body.
    content_length: Option<usize>,
    max_read: usize,
    /// The body has been read to its end.
    done: bool,
    /// The client waits for `100 Continue` before it sends the body (`Expect: 100-continue`).
    expects_continue: bool,
    /// `100 Continue` went to the client.
    sent_continue: bool,
    /// What went through some of the plugins and waits for the rest.
    pub(crate) pending: Option<Pending>,
    /// Why reading failed (a client gone, a malformed body, a read timeout): the stream ends
    /// with it as if Pingora had read it.
    pub(crate) error: Option<Box<pingora::Error>>,
}

/// Why a read ahead failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadFailure {
    /// The client sent nothing for the stream's idle timeout.
    TimedOut,
    /// The client went away or sent a malformed body ([`ReadAhead::error`] says which).
    Failed,
}

/// What a read ahead left for the body filter.
#[derive(Debug, Default)]
pub(crate) struct EarlyBody {
    /// The bytes read ahead, which Pingora replays to the body filter first (its retry
    /// buffer), if it does: that copy is not the client's body a second time.
    pub(crate) replayed: Option<usize>,
    /// What went through some of the plugins and waits for the rest.
    pub(crate) pending: Option<Pending>,
    /// `100 Continue` went to the client: the request's `Expect` must not reach the upstream
    /// (whose own `100 Continue` would be a second one), as Envoy strips it.
    pub(crate) sent_continue: bool,
}

impl<'s> ReadAhead<'s> {
    /// A reader of `session`'s body, whose request header (framed by `header`) is out of the
    /// session while the plugins hold it.
    pub(crate) fn new(session: &'s mut Session, header: &pingora::http::RequestHeader) -> Self {
        // What is read ahead must be in the buffer Pingora replays.
        session.as_mut().enable_retry_buffering();
        let chunked = header.headers.contains_key(http::header::TRANSFER_ENCODING);
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
        let max_read = if session.as_ref().is_http2() {
            HTTP2_MAX_READ
        } else {
            HTTP1_MAX_READ
        };
        ReadAhead {
            session,
            read: 0,
            content_length,
            max_read,
            done: false,
            expects_continue,
            sent_continue: false,
            pending: None,
            error: None,
        }
    }

    /// Whether one more read is safe: it cannot overflow the retry buffer, or it cannot end
    /// the body.
    pub(crate) fn may_read(&self) -> bool {
        !self.done
            && self.error.is_none()
            && read_is_safe(self.read, self.content_length, self.max_read)
    }

    /// Reads the next chunk: its bytes and whether it ends the body.
    pub(crate) async fn read(&mut self) -> Result<(Vec<u8>, bool), ReadFailure> {
        if self.expects_continue {
            // The client sends its body only once asked to (Envoy answers `100 Continue`
            // itself too).
            self.expects_continue = false;
            if let Err(error) = self.session.write_continue_response().await {
                self.error = Some(error.into_down());
                return Err(ReadFailure::Failed);
            }
            self.sent_continue = true;
        }
        match self.session.read_request_body().await {
            Ok(chunk) => {
                let data = chunk.as_deref().map(<[u8]>::to_vec).unwrap_or_default();
                self.read += data.len();
                self.done = chunk.is_none() || self.session.is_body_done();
                Ok((data, self.done))
            }
            // The client sent nothing for the stream's idle timeout (the session's read
            // timeout): the stream's own timeout, a 408.
            Err(error) if *error.etype() == pingora::ErrorType::ReadTimedout => {
                self.done = true;
                Err(ReadFailure::TimedOut)
            }
            Err(error) => {
                self.error = Some(error.into_down());
                Err(ReadFailure::Failed)
            }
        }
    }

    /// What the body filter needs to know of the read.
    pub(crate) fn finish(self) -> (EarlyBody, Option<Box<pingora::Error>>) {
        let replayed =
            (self.read > 0 && !self.session.as_ref().retry_buffer_truncated()).then_some(self.read);
        (
            EarlyBody {
                replayed,
                pending: self.pending,
                sent_continue: self.sent_continue,
            },
            self.error,
        )
    }
}

/// Whether a read of up to `max_read` bytes, after `read` bytes of a body of
/// `content_length` (if known), leaves what was read replayable: it cannot overflow the retry
/// buffer, or the body's length says it cannot end the body (a body that is not ended is read
/// on by Pingora itself, so an overflowed buffer loses nothing).
fn read_is_safe(read: usize, content_length: Option<usize>, max_read: usize) -> bool {
    let fits = read + max_read <= RETRY_BUFFER_BYTES;
    let cannot_end_or_fits = content_length.is_some_and(|length| {
        length <= RETRY_BUFFER_BYTES || length.saturating_sub(read) > max_read
    });
    fits || cannot_end_or_fits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn may_read(read: usize, content_length: Option<usize>, max_read: usize) -> bool {
        read_is_safe(read, content_length, max_read)
    }

    #[test]
    fn a_body_of_known_length_that_fits_the_retry_buffer_is_read_whole() {
        for read in [0, 1, 40_000, 65_535] {
            assert!(may_read(read, Some(65_536), HTTP1_MAX_READ));
        }
    }

    #[test]
    fn a_longer_body_is_read_only_while_no_read_can_end_it() {
        let length = 200 * 1024;
        assert!(may_read(0, Some(length), HTTP1_MAX_READ));
        assert!(may_read(
            length - HTTP1_MAX_READ - 1,
            Some(length),
            HTTP1_MAX_READ
        ));
        assert!(!may_read(
            length - HTTP1_MAX_READ,
            Some(length),
            HTTP1_MAX_READ
        ));
    }

    #[test]
    fn a_body_without_length_is_read_while_no_read_can_overflow_the_buffer() {
        // HTTP/1.1 chunked: one read; HTTP/2: four frames.
        assert!(may_read(0, None, HTTP1_MAX_READ));
        assert!(!may_read(1, None, HTTP1_MAX_READ));
        assert!(may_read(48 * 1024, None, HTTP2_MAX_READ));
        assert!(!may_read(48 * 1024 + 1, None, HTTP2_MAX_READ));
    }
}
