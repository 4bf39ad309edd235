//! What a plugin's VM copy sees of Traffic Server: the [`abi::Host`] of one VM copy on one
//! Traffic Server thread.
//!
//! Each transaction running through a plugin has a [`StreamSlot`] in the host of the plugin's VM
//! copy, keyed by the plugin's context id. The transaction lends its headers to the slot for
//! the hook it is in and reads back, after each callback, what the plugin asked for (a local
//! reply, continuing or closing the stream): the host never drives Traffic Server itself from
//! inside a callback, because Traffic Server may re-enter the plugin synchronously.

use std::sync::Arc;

use abi::{
    BufferType, ContextId, Headers, Host, LocalResponse, LogLevel, MapType, Status, StreamType,
};
use rustc_hash::FxHashMap;

use crate::diag;
use crate::headers::MimeHeaders;

/// A transaction's place in a VM copy's host, for one plugin.
pub(crate) struct StreamSlot {
    /// The plugin's name, for its logs.
    pub(crate) plugin: Arc<str>,
    /// The client request header, while a hook lends it.
    pub(crate) request: Option<MimeHeaders>,
    /// The client response header, while a hook lends it.
    pub(crate) response: Option<MimeHeaders>,
    /// A local reply the plugin asked for (`proxy_send_local_response`).
    pub(crate) local_reply: Option<LocalResponse>,
    /// The plugin asked to continue the stream it had paused.
    pub(crate) continued: bool,
    /// The plugin asked to close the stream.
    pub(crate) closed: bool,
}

impl StreamSlot {
    pub(crate) fn new(plugin: Arc<str>) -> StreamSlot {
        StreamSlot {
            plugin,
            request: None,
            response: None,
            local_reply: None,
            continued: false,
            closed: false,
        }
    }
}

/// The host of one VM copy.
#[derive(Default)]
pub(crate) struct AtsHost {
    /// The transactions running through this copy, by the plugin's stream context.
    pub(crate) streams: FxHashMap<u32, StreamSlot>,
    /// Plugin names by root context, for logs of root contexts.
    pub(crate) roots: FxHashMap<u32, Arc<str>>,
}

// SAFETY: the only non-`Send` parts are the Traffic Server header handles lent to slots. A VM
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
    }
}

impl Host for AtsHost {
    fn log(&mut self, context: ContextId, level: LogLevel, message: &str) {
        let line = match self.name_of(context) {
            Some(name) => format!("[{name}] {message}"),
            None => format!("[context {}] {message}", context.0),
        };
        match level {
            LogLevel::Trace | LogLevel::Debug | LogLevel::Info => diag::debug(&line),
            LogLevel::Warn => diag::warning(&line),
            LogLevel::Error | LogLevel::Critical => diag::error(&line),
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
            MapType::HttpRequestHeaders => slot.request.as_mut()?,
            MapType::HttpResponseHeaders => slot.response.as_mut()?,
            _ => return None,
        };
        Some(headers)
    }

    fn buffer(&mut self, _context: ContextId, _buffer: BufferType) -> Option<&mut Vec<u8>> {
        None
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

    fn continue_stream(&mut self, context: ContextId, _stream: StreamType) -> Status {
        match self.streams.get_mut(&context.0) {
            Some(slot) => {
                slot.continued = true;
                Status::Ok
            }
            None => Status::NotFound,
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
