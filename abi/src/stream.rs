//! What a plugin may reach on an HTTP stream or TCP connection at a given moment.
//!
//! Envoy hands a plugin each header map, body and trailer map only while the callback that
//! delivered it holds it: once `proxy_on_request_headers` returns `Continue` the request headers
//! have gone on upstream, and reading them answers `BAD_ARGUMENT`; response headers do not exist
//! while the request is still in the plugin's hands. The rules are applied here, once, so every
//! embedder (and `pwhost run`) behaves as Envoy does without re-implementing them.

use crate::filter_state::FilterState;
use crate::{BufferType, ContextId, MapType};

/// A part of a stream the plugin may be holding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub(crate) enum Part {
    RequestHeaders = 1 << 0,
    RequestBody = 1 << 1,
    RequestTrailers = 1 << 2,
    ResponseHeaders = 1 << 3,
    ResponseBody = 1 << 4,
    ResponseTrailers = 1 << 5,
    DownstreamData = 1 << 6,
    UpstreamData = 1 << 7,
}

/// Beside the parts: the last request (response) body chunk seen ended its direction, so the
/// plugin may add trailers while it still holds that body (Envoy's `addDecodedTrailers`).
const REQUEST_BODY_ENDED: u16 = 1 << 8;
const RESPONSE_BODY_ENDED: u16 = 1 << 9;
/// The plugin returned from its trailers callback: trailers exist and are no longer created.
const REQUEST_TRAILERS_SEEN: u16 = 1 << 10;
const RESPONSE_TRAILERS_SEEN: u16 = 1 << 11;

/// What a context is besides a root context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamKind {
    /// An HTTP stream.
    Http,
    /// A TCP connection.
    Tcp,
}

/// How a host function wants to use a header map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// `proxy_get_header_map_value`, `proxy_get_header_map_pairs`.
    Read,
    /// Every call that changes the map, and `proxy_get_header_map_size` (which Envoy answers
    /// from the mutable map).
    Write,
}

/// The state of one HTTP stream or TCP connection context.
#[derive(Debug)]
pub(crate) struct StreamState {
    /// The root context it belongs to.
    pub(crate) root: ContextId,
    /// An HTTP stream or a TCP connection.
    pub(crate) kind: StreamKind,
    /// [`Part`]s the plugin holds now, and the flags above.
    held: u16,
    /// Whether the plugin sent a local reply on it: a second one does not replace the first.
    pub(crate) local_reply_sent: bool,
    /// The properties and Envoy objects the plugin set on it.
    pub(crate) filter_state: FilterState,
    /// Its plugin's `allow_on_headers_stop_iteration`, copied at creation (a root context's
    /// configuration never changes) so that a headers callback needs no second lookup.
    pub(crate) allow_on_headers_stop_iteration: bool,
    /// Bytes of names and values the plugin wrote into its header maps so far.
    header_bytes_written: u64,
}

/// The most bytes of names and values a plugin may write into one stream's header maps
/// (headers and trailers, both directions, over all its callbacks): twice the largest header
/// block Envoy can be set to accept (`max_request_headers_kb` at most 8 MiB). Past it a write is
/// `INTERNAL_FAILURE`, so a plugin adding values in a loop cannot grow the proxy's memory, which
/// no VM memory cap covers.
pub const MAX_HEADER_BYTES_WRITTEN: u64 = 16 << 20;

impl StreamState {
    pub(crate) fn new(root: ContextId, kind: StreamKind) -> Self {
        StreamState {
            root,
            kind,
            held: 0,
            local_reply_sent: false,
            filter_state: FilterState::default(),
            allow_on_headers_stop_iteration: false,
            header_bytes_written: 0,
        }
    }

    /// Counts `bytes` the plugin writes into a header map; `false` (nothing counted) if they
    /// would take the stream past [`MAX_HEADER_BYTES_WRITTEN`].
    pub(crate) fn charge_header_bytes(&mut self, bytes: u64) -> bool {
        match self.header_bytes_written.checked_add(bytes) {
            Some(total) if total <= MAX_HEADER_BYTES_WRITTEN => {
                self.header_bytes_written = total;
                true
            }
            _ => false,
        }
    }

    /// Gives back `bytes` counted for a write that did not happen.
    pub(crate) fn refund_header_bytes(&mut self, bytes: u64) {
        self.header_bytes_written = self.header_bytes_written.saturating_sub(bytes);
    }

    /// Whether this is an HTTP stream (local replies, routes and the HTTP maps exist only there).
    pub(crate) fn is_http(&self) -> bool {
        self.kind == StreamKind::Http
    }

    /// The plugin changes `map`, which it may: trailers it adds during the last body chunk
    /// exist from then on (readable and writable, as Envoy's new trailer map is).
    pub(crate) fn note_change(&mut self, map: MapType) {
        match map {
            MapType::HttpRequestTrailers => self.held |= Part::RequestTrailers as u16,
            MapType::HttpResponseTrailers => self.held |= Part::ResponseTrailers as u16,
            _ => {}
        }
    }

    /// A callback delivers `part` to the plugin.
    pub(crate) fn deliver(&mut self, part: Part) {
        self.held |= part as u16;
        match part {
            Part::RequestTrailers => self.held |= REQUEST_TRAILERS_SEEN,
            Part::ResponseTrailers => self.held |= RESPONSE_TRAILERS_SEEN,
            _ => {}
        }
    }

    /// A body chunk is delivered; `end_of_stream` says it is the last of its direction.
    pub(crate) fn deliver_body(&mut self, part: Part, end_of_stream: bool) {
        self.deliver(part);
        let ended = match part {
            Part::RequestBody => REQUEST_BODY_ENDED,
            Part::ResponseBody => RESPONSE_BODY_ENDED,
            _ => 0,
        };
        if end_of_stream {
            self.held |= ended;
        } else {
            self.held &= !ended;
        }
    }

    /// The plugin let `part` go on (its callback returned `Continue`).
    pub(crate) fn release(&mut self, part: Part) {
        self.held &= !(part as u16);
    }

    /// `proxy_continue_stream` on the request or the response: Envoy lets go of the request's
    /// headers, body and trailers either way (never the response's).
    pub(crate) fn release_request(&mut self) {
        self.held &= !(Part::RequestHeaders as u16
            | Part::RequestBody as u16
            | Part::RequestTrailers as u16);
    }

    fn holds(&self, part: Part) -> bool {
        self.held & part as u16 != 0
    }

    /// Whether the plugin may use header map `map` of this stream in this way now. `in_log`: the
    /// running callback is `proxy_on_log`, where the request and response headers and the
    /// response trailers stay readable (Envoy's access-log phase).
    pub(crate) fn map_available(&self, map: MapType, access: Access, in_log: bool) -> bool {
        // In Envoy's access-log phase (an HTTP stream's on_log, not a connection's) reads go to
        // the logged request headers, response headers and response trailers, and only those.
        if in_log && access == Access::Read && self.is_http() {
            return matches!(
                map,
                MapType::HttpRequestHeaders
                    | MapType::HttpResponseHeaders
                    | MapType::HttpResponseTrailers
            );
        }
        match map {
            MapType::HttpRequestHeaders => self.holds(Part::RequestHeaders),
            MapType::HttpResponseHeaders => self.holds(Part::ResponseHeaders),
            MapType::HttpResponseTrailers => {
                self.holds(Part::ResponseTrailers)
                    || (access == Access::Write
                        && self.holds(Part::ResponseBody)
                        && self.held & RESPONSE_BODY_ENDED != 0
                        && self.held & RESPONSE_TRAILERS_SEEN == 0)
            }
            MapType::HttpRequestTrailers => {
                self.holds(Part::RequestTrailers)
                    || (access == Access::Write
                        && self.holds(Part::RequestBody)
                        && self.held & REQUEST_BODY_ENDED != 0
                        && self.held & REQUEST_TRAILERS_SEEN == 0)
            }
            _ => false,
        }
    }

    /// Whether the plugin holds the body or data in `buffer` now.
    pub(crate) fn buffer_available(&self, buffer: BufferType) -> bool {
        match buffer {
            BufferType::HttpRequestBody => self.holds(Part::RequestBody),
            BufferType::HttpResponseBody => self.holds(Part::ResponseBody),
            BufferType::DownstreamData => self.holds(Part::DownstreamData),
            BufferType::UpstreamData => self.holds(Part::UpstreamData),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_headers_are_held_until_the_plugin_lets_them_go() {
        let mut stream = StreamState::new(ContextId(1), StreamKind::Http);
        let map = MapType::HttpRequestHeaders;
        assert!(!stream.map_available(map, Access::Read, false));
        stream.deliver(Part::RequestHeaders);
        assert!(stream.map_available(map, Access::Write, false));
        stream.release(Part::RequestHeaders);
        assert!(!stream.map_available(map, Access::Read, false));
        assert!(
            stream.map_available(map, Access::Read, true),
            "readable again in on_log"
        );
        assert!(!stream.map_available(map, Access::Write, true));
    }

    #[test]
    fn continuing_either_direction_lets_go_of_the_request_only() {
        let mut stream = StreamState::new(ContextId(1), StreamKind::Http);
        stream.deliver(Part::RequestHeaders);
        stream.deliver(Part::ResponseHeaders);
        stream.release_request();
        assert!(!stream.map_available(MapType::HttpRequestHeaders, Access::Read, false));
        assert!(stream.map_available(MapType::HttpResponseHeaders, Access::Read, false));
    }

    #[test]
    fn trailers_may_be_added_during_the_last_body_chunk_only() {
        let mut stream = StreamState::new(ContextId(1), StreamKind::Http);
        let trailers = MapType::HttpRequestTrailers;
        stream.deliver_body(Part::RequestBody, false);
        assert!(!stream.map_available(trailers, Access::Write, false));
        stream.deliver_body(Part::RequestBody, true);
        assert!(stream.map_available(trailers, Access::Write, false));
        assert!(
            !stream.map_available(trailers, Access::Read, false),
            "there are no trailers to read yet"
        );
        stream.release(Part::RequestBody);
        assert!(!stream.map_available(trailers, Access::Write, false));
    }

    #[test]
    fn request_trailers_are_not_readable_in_on_log() {
        let stream = StreamState::new(ContextId(1), StreamKind::Http);
        assert!(!stream.map_available(MapType::HttpRequestTrailers, Access::Read, true));
        assert!(stream.map_available(MapType::HttpResponseTrailers, Access::Read, true));
    }
}
