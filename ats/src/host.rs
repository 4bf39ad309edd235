//! What a plugin's VM copy sees of Traffic Server: the [`abi::Host`] of one VM copy on one
//! Traffic Server thread.
//!
//! Each transaction running through a plugin has a [`StreamSlot`] in the host of the plugin's VM
//! copy, keyed by the plugin's context id. The transaction lends its headers to the slot for
//! the hook it is in and reads back, after each callback, what the plugin asked for (a local
//! reply, continuing or closing the stream): the host never drives Traffic Server itself from
//! inside a callback, because Traffic Server may re-enter the plugin synchronously.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use abi::{
    BufferType, ContextId, Headers, Host, HttpCallRequest, LocalResponse, LogLevel, MapType,
    Status, StreamInfo, StreamType,
};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::headers::MimeHeaders;
use crate::{callout, diag, sys, Upstreams};

/// What a stream slot is the place of, by its continuation: to act on it after a callback
/// outside its hooks or events (a tick, a callout's answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Holder {
    /// An HTTP transaction ([`crate::transaction`]).
    Transaction(sys::TSCont),
    /// A TCP connection ([`crate::connection`]).
    Connection(sys::TSCont),
}

/// A transaction's (or TCP connection's) place in a VM copy's host, for one plugin.
pub(crate) struct StreamSlot {
    /// The plugin's name, for its logs.
    pub(crate) plugin: Arc<str>,
    /// The continuation of the transaction or connection.
    pub(crate) holder: Holder,
    /// Whether the transaction waits in a hook for this plugin to continue it (a connection's
    /// slot is always: anything its plugin asks outside a callback wakes it).
    pub(crate) held: bool,
    /// When the transaction's current hold by this plugin began, or last saw the client's
    /// data (a body chunk while the plugin holds the headers): past the stream idle timeout
    /// it is answered 408 ([`crate::transaction::look_at_holds`]). `None` for connections, which
    /// have idle timeouts of their own.
    pub(crate) held_since: Option<Instant>,
    /// The client request header, while a hook lends it.
    pub(crate) request: Option<MimeHeaders>,
    /// While the plugin holds the request headers past the read-request-header hook: the
    /// transaction, whose request header as it stands (the origin's, once Traffic Server built
    /// it from the client's) each access finds afresh, so that what the plugin changes from a
    /// callout's answer reaches the origin whenever the answer comes.
    pub(crate) follow_request: Option<sys::TSHttpTxn>,
    /// The client response header, while a hook lends it.
    pub(crate) response: Option<MimeHeaders>,
    /// The body (chunk and what the plugin buffered) while its callback runs; a connection's
    /// data in its data callbacks.
    pub(crate) body: Option<Vec<u8>>,
    /// What Traffic Server knows of the transaction beyond its headers, for Envoy's attributes.
    pub(crate) info: StreamInfo,
    /// A local reply the plugin asked for (`proxy_send_local_response`).
    pub(crate) local_reply: Option<LocalResponse>,
    /// The plugin asked to continue the stream it had paused.
    pub(crate) continued: bool,
    /// A connection's directions the plugin continued: `[downstream, upstream]`.
    pub(crate) continued_sides: [bool; 2],
    /// The plugin asked to close the stream.
    pub(crate) closed: bool,
}

impl StreamSlot {
    pub(crate) fn new(plugin: Arc<str>, holder: Holder) -> StreamSlot {
        StreamSlot {
            plugin,
            holder,
            held: matches!(holder, Holder::Connection(_)),
            held_since: None,
            request: None,
            follow_request: None,
            response: None,
            body: None,
            info: StreamInfo::default(),
            local_reply: None,
            continued: false,
            continued_sides: [false; 2],
            closed: false,
        }
    }

    /// Marks the transaction as held by the plugin (waiting for it), from now on unless it
    /// already was, and has this thread's ticker look at it (its client's connection, and
    /// later the stream idle timeout).
    pub(crate) fn hold(&mut self) {
        self.held = true;
        if self.held_since.is_none() {
            let now = Instant::now();
            self.held_since = Some(now);
            crate::hold_began(now);
        }
    }

    /// Ends the plugin's hold on the transaction.
    pub(crate) fn release(&mut self) {
        self.held = false;
        self.held_since = None;
    }

    /// Whether the plugin asked to end its stream: a local reply or a close.
    pub(crate) fn asked_to_end(&self) -> bool {
        self.closed || self.local_reply.is_some()
    }
}

/// The host of one VM copy.
pub(crate) struct AtsHost {
    /// The transactions running through this copy, by the plugin's stream context. Private:
    /// [`LIVE_STREAMS`] counts its entries, so only `open_stream`/`close_stream` change it.
    streams: FxHashMap<u32, StreamSlot>,
    /// Plugin names by root context, for logs of root contexts.
    pub(crate) roots: FxHashMap<u32, Arc<str>>,
    /// Where `proxy_http_call` may go (the deployment's `upstreams:`).
    upstreams: Arc<Upstreams>,
    /// The tokens of this copy's HTTP calls still waiting for an answer.
    pub(crate) callouts: FxHashSet<u32>,
    /// For a singleton service (whose thread is not one of Traffic Server's), where the
    /// answers to its calls go.
    service: Option<crate::callout::ServiceSlot>,
    /// The name for logs of contexts not in `streams` or `roots` (a service's one plugin).
    fallback_name: Option<Arc<str>>,
    /// Whether the copy's module has request and response body callbacks, once looked up.
    pub(crate) body_callbacks: Option<(bool, bool)>,
}

thread_local! {
    /// The last HTTP call token given out on this thread: tokens are unique among the copies of
    /// a thread, so an answer finds its copy by token.
    static LAST_TOKEN: Cell<u32> = const { Cell::new(0) };
}

impl AtsHost {
    /// The host of a new VM copy whose plugins may call `upstreams`.
    pub(crate) fn new(upstreams: Arc<Upstreams>) -> AtsHost {
        AtsHost {
            streams: FxHashMap::default(),
            roots: FxHashMap::default(),
            upstreams,
            callouts: FxHashSet::default(),
            service: None,
            fallback_name: None,
            body_callbacks: None,
        }
    }

    /// The host of singleton service `name`, whose plugin may call `upstreams`; the answers go
    /// to `inbox` once the service has started.
    pub(crate) fn for_service(
        name: &str,
        upstreams: Arc<Upstreams>,
        inbox: crate::callout::ServiceSlot,
    ) -> AtsHost {
        let mut host = AtsHost::new(upstreams);
        host.service = Some(inbox);
        host.fallback_name = Some(name.into());
        host
    }

    /// Gives the transaction of stream context `context` its slot.
    pub(crate) fn open_stream(&mut self, context: ContextId, slot: StreamSlot) {
        if self.streams.insert(context.0, slot).is_none() {
            LIVE_STREAMS.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes the slot of stream context `context` away (its transaction closed).
    pub(crate) fn close_stream(&mut self, context: ContextId) {
        if self.streams.remove(&context.0).is_some() {
            LIVE_STREAMS.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The slot of stream context `context`, if its transaction is running through this copy.
    pub(crate) fn stream_mut(&mut self, context: ContextId) -> Option<&mut StreamSlot> {
        self.streams.get_mut(&context.0)
    }

    /// The slots of every transaction running through this copy.
    pub(crate) fn stream_slots(&self) -> impl Iterator<Item = &StreamSlot> {
        self.streams.values()
    }

    /// Every stream slot of the copy, to change.
    pub(crate) fn stream_slots_mut(&mut self) -> impl Iterator<Item = &mut StreamSlot> {
        self.streams.values_mut()
    }
}

/// The stream slots alive in every copy's host: the plugins' stream contexts of the
/// transactions and TCP connections in flight, published as a stat
/// (`plugin.pwhost_ats.live_stream_contexts`), so that a context left behind shows.
pub(crate) static LIVE_STREAMS: AtomicI64 = AtomicI64::new(0);

impl Drop for AtsHost {
    fn drop(&mut self) {
        // A copy going away takes the slots still in it along.
        LIVE_STREAMS.fetch_sub(self.streams.len() as i64, Ordering::Relaxed);
    }
}

// SAFETY: the only non-`Send` parts are Traffic Server handles: header handles lent to slots
// and the transactions' continuations. A VM
// copy (and so its host) is made, used and dropped on the one Traffic Server thread whose worker
// owns it (a thread-local), and headers are lent only for the duration of a hook of a
// transaction running on that thread; the host is never used from another thread.
unsafe impl Send for AtsHost {}

impl AtsHost {
    fn name_of(&self, context: ContextId) -> Option<&str> {
        self.streams
            .get(&context.0)
            .map(|slot| &*slot.plugin)
            .or_else(|| self.roots.get(&context.0).map(|name| &**name))
            .or(self.fallback_name.as_deref())
    }
}

impl Host for AtsHost {
    fn log(&mut self, context: ContextId, level: LogLevel, message: &str) {
        let debug = matches!(level, LogLevel::Trace | LogLevel::Debug | LogLevel::Info);
        if debug && !diag::debug_enabled() {
            // Nothing shows it: no formatting, no copy.
            return;
        }
        let line = match self.name_of(context) {
            Some(name) => format!("[{name}] {message}"),
            None => format!("[context {}] {message}", context.0),
        };
        match level {
            _ if debug => diag::debug(&line),
            LogLevel::Warn => diag::warning(&line),
            _ => diag::error(&line),
        }
    }

    fn log_level(&self) -> LogLevel {
        if diag::debug_enabled() {
            LogLevel::Trace
        } else {
            LogLevel::Warn
        }
    }

    fn header_map(&mut self, context: ContextId, map: MapType) -> Option<&mut dyn Headers> {
        let slot = self.streams.get_mut(&context.0)?;
        let headers = match map {
            MapType::HttpRequestHeaders => {
                if let Some(txn) = slot.follow_request {
                    slot.request = crate::transaction::current_request(txn);
                }
                slot.request.as_mut()?
            }
            MapType::HttpResponseHeaders => slot.response.as_mut()?,
            _ => return None,
        };
        Some(headers)
    }

    fn buffer(&mut self, context: ContextId, buffer: BufferType) -> Option<&mut Vec<u8>> {
        match buffer {
            BufferType::HttpRequestBody
            | BufferType::HttpResponseBody
            | BufferType::DownstreamData
            | BufferType::UpstreamData => self.streams.get_mut(&context.0)?.body.as_mut(),
            _ => None,
        }
    }

    fn stream_info(&mut self, context: ContextId) -> Option<&StreamInfo> {
        self.streams.get(&context.0).map(|slot| &slot.info)
    }

    fn send_local_response(&mut self, context: ContextId, response: LocalResponse) -> Status {
        match self.streams.get_mut(&context.0) {
            Some(slot) => {
                slot.local_reply.get_or_insert(response);
                Status::Ok
            }
            None => Status::NotFound,
        }
    }

    fn continue_stream(&mut self, context: ContextId, stream: StreamType) -> Status {
        match self.streams.get_mut(&context.0) {
            Some(slot) => {
                slot.continued = true;
                let sides = match stream {
                    StreamType::Downstream => [true, false],
                    StreamType::Upstream => [false, true],
                    _ => [true, true],
                };
                for (side, continued) in slot.continued_sides.iter_mut().zip(sides) {
                    *side |= continued;
                }
                Status::Ok
            }
            None => Status::NotFound,
        }
    }

    fn http_call(&mut self, _context: ContextId, request: HttpCallRequest) -> Result<u32, Status> {
        let name = String::from_utf8_lossy(&request.upstream);
        let Some(address) = self.upstreams.get(name.as_ref()).copied() else {
            diag::debug(&format!(
                "proxy_http_call to {name:?}: not in the configuration's upstreams"
            ));
            return Err(Status::BadArgument);
        };
        let token = LAST_TOKEN.with(|last| {
            let token = last.get().wrapping_add(1).max(1);
            last.set(token);
            token
        });
        let status = match &self.service {
            Some(inbox) => {
                callout::dispatch_from_service(token, address, &request, Arc::clone(inbox))
            }
            None => callout::dispatch(token, address, &request),
        };
        match status {
            Status::Ok => {
                self.callouts.insert(token);
                Ok(token)
            }
            status => Err(status),
        }
    }

    fn close_stream(&mut self, context: ContextId, _stream: StreamType) -> Status {
        match self.streams.get_mut(&context.0) {
            Some(slot) => {
                slot.closed = true;
                Status::Ok
            }
            None => Status::NotFound,
        }
    }
}
