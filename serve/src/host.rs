//! What a plugin's VM copy sees of the proxy: the [`abi::Host`] of one VM copy on one worker
//! thread.
//!
//! Each stream running through a plugin has a [`StreamSlot`] in the host of the plugin's VM
//! copy, keyed by the plugin's stream context. The stream lends its headers to the slot for
//! each callback and reads back afterwards what the plugin asked for (a local reply, continuing
//! or closing the stream). A plugin may ask from a later callback (a timer tick): the slot's
//! [`Notify`] wakes the stream waiting for it.

use std::sync::Arc;

use abi::{
    BufferType, ContextId, GrpcRequest, Headers, Host, HttpCallRequest, LocalResponse, LogLevel,
    MapType, Status, StreamInfo, StreamType,
};
use pingora::http::{RequestHeader, ResponseHeader};
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::admin::{HostMetrics, VmOwnerLabel};
use crate::callout::{self, AnswerBytes, Caller, ServiceAddress};
use crate::grpc;
use crate::headers::Lent;
use crate::proxy::ClusterState;
use crate::routing::SharedRouting;
use crate::worker::Listener;

/// A stream's place in a VM copy's host, for one plugin.
pub(crate) struct StreamSlot {
    /// The plugin's name, for its logs.
    pub(crate) plugin: Arc<str>,
    /// Wakes the stream when the plugin asks for something outside the stream's callbacks.
    pub(crate) wake: Arc<Notify>,
    /// The request header, while a callback has it.
    pub(crate) request: Option<Lent<RequestHeader>>,
    /// The response header, while a callback has it.
    pub(crate) response: Option<Lent<ResponseHeader>>,
    /// The response trailers, while a callback has them.
    pub(crate) trailers: Option<Lent<http::HeaderMap>>,
    /// The body (chunk and what the plugin buffered) while its callback runs.
    pub(crate) body: Option<Vec<u8>>,
    /// What is known of the stream beyond its headers, for Envoy's attributes.
    pub(crate) info: StreamInfo,
    /// What the plugin asked for.
    pub(crate) asked: Asked,
}

/// What a plugin asked for its stream.
#[derive(Default)]
pub(crate) struct Asked {
    /// A local reply (`proxy_send_local_response`).
    pub(crate) local_reply: Option<LocalResponse>,
    /// To continue the stream it paused.
    pub(crate) continued: bool,
    /// Which directions it continued, by [`crate::stream::Direction::index`] (an HTTP
    /// stream's request or response; a TCP connection's downstream or upstream data).
    pub(crate) continued_sides: [bool; 2],
    /// To close the stream.
    pub(crate) closed: bool,
}

/// The host of one VM copy.
pub(crate) struct ServeHost {
    /// Who this copy's calls are from: a listener's plugins on a worker, or a singleton
    /// service.
    caller: Caller,
    /// Where its calls may go (the clusters of the routing in force when it calls).
    routing: SharedRouting,
    /// The proxy's metrics (the copy counts itself in `vm_copies` while it lives).
    metrics: Arc<HostMetrics>,
    /// Whose copy it is, for `vm_copies`.
    owner: VmOwnerLabel,
    /// What its calls' answers hold now (see [`callout::MAX_ANSWER_BYTES_PER_COPY`]).
    answers: AnswerBytes,
    /// The tokens of this copy's HTTP and gRPC calls still waiting for (more of) an answer.
    pub(crate) callouts: FxHashSet<u32>,
    /// The tasks of its gRPC calls and streams, by token (cancelled with them).
    grpc_tasks: FxHashMap<u32, AbortHandle>,
    /// The tasks of its HTTP calls, by token (ended with the copy).
    http_tasks: FxHashMap<u32, AbortHandle>,
    /// Its open gRPC streams, by token, with where their messages go until they are
    /// half-closed (`None` after).
    grpc_senders: FxHashMap<u32, Option<grpc::StreamSender>>,
    /// The streams running through this copy, by the plugin's stream context.
    pub(crate) streams: FxHashMap<u32, StreamSlot>,
    /// Plugin names by root context, for logs of root contexts.
    pub(crate) roots: FxHashMap<u32, Arc<str>>,
    /// The worker thread, for logs.
    pub(crate) worker: String,
}

impl ServeHost {
    /// The host of a new VM copy of `listener`'s plugins on the calling worker thread.
    pub(crate) fn new(listener: Arc<Listener>) -> ServeHost {
        let routing = Arc::clone(&listener.routing);
        let metrics = Arc::clone(&listener.metrics);
        let owner = listener.owner.clone();
        ServeHost::with_caller(Caller::Worker(listener), routing, metrics, owner)
    }

    /// The host of singleton service `name`, calling the clusters of `routing`, whose answers
    /// go to the service's inbox at `address` (published once the service has started).
    pub(crate) fn for_service(
        name: &str,
        routing: SharedRouting,
        address: ServiceAddress,
        metrics: Arc<HostMetrics>,
    ) -> ServeHost {
        let owner = format!("service/{name}");
        ServeHost::with_caller(Caller::Service(address), routing, metrics, owner)
    }

    fn with_caller(
        caller: Caller,
        routing: SharedRouting,
        metrics: Arc<HostMetrics>,
        owner: String,
    ) -> Self {
        let owner = VmOwnerLabel { owner };
        metrics.vm_copies.get_or_create(&owner).inc();
        ServeHost {
            caller,
            routing,
            metrics,
            owner,
            callouts: FxHashSet::default(),
            answers: AnswerBytes::default(),
            grpc_tasks: FxHashMap::default(),
            http_tasks: FxHashMap::default(),
            grpc_senders: FxHashMap::default(),
            streams: FxHashMap::default(),
            roots: FxHashMap::default(),
            // Pingora names its threads after the service: the id tells workers apart.
            worker: format!("{:?}", std::thread::current().id()),
        }
    }

    /// Records call `token` as this copy's, open.
    fn open_call(&mut self, token: u32) {
        self.callouts.insert(token);
        callout::open_token(token);
    }

    /// Wakes every stream waiting on this copy.
    fn wake_all(&self) {
        for slot in self.streams.values() {
            slot.wake.notify_one();
        }
    }

    /// Forgets call `token`: it is over, or cancelled (its task, if still running, stops).
    pub(crate) fn forget_call(&mut self, token: u32) {
        if self.callouts.remove(&token) {
            callout::forget_token(token);
        }
        self.grpc_senders.remove(&token);
        self.http_tasks.remove(&token);
        if let Some(task) = self.grpc_tasks.remove(&token) {
            task.abort();
        }
    }

    /// Ends every call of a copy whose VM failed (their answers could only fail again, and a
    /// gRPC stream would keep its upstream, and log, for as long as the upstream sends), or
    /// that goes.
    pub(crate) fn abandon_calls(&mut self) {
        for task in self.grpc_tasks.values().chain(self.http_tasks.values()) {
            task.abort();
        }
        self.grpc_tasks.clear();
        self.http_tasks.clear();
        self.grpc_senders.clear();
        for token in self.callouts.drain() {
            callout::forget_token(token);
        }
    }

    /// The cluster a new call from this copy names, checked (`BAD_ARGUMENT` if unknown; `abi`
    /// has already checked that the copy has room for another call, `abi::MAX_OPEN_CALLS`).
    fn cluster(&self, upstream: &[u8]) -> Result<(&Caller, Arc<ClusterState>), Status> {
        let name = String::from_utf8_lossy(upstream);
        let Some(cluster) = self.routing.load().clusters.get(name.as_ref()).cloned() else {
            tracing::debug!(cluster = %name, "a call to an unknown cluster");
            return Err(Status::BadArgument);
        };
        Ok((&self.caller, cluster))
    }

    fn name_of(&self, context: ContextId) -> Option<&str> {
        self.streams
            .get(&context.0)
            .map(|slot| &*slot.plugin)
            .or_else(|| self.roots.get(&context.0).map(|name| &**name))
    }

    /// Records a request of the plugin for stream `context` and wakes the stream.
    fn ask(&mut self, context: ContextId, asking: impl FnOnce(&mut Asked)) -> Status {
        match self.streams.get_mut(&context.0) {
            Some(slot) => {
                asking(&mut slot.asked);
                slot.wake.notify_one();
                Status::Ok
            }
            None => Status::NotFound,
        }
    }
}

impl Host for ServeHost {
    fn log(&mut self, context: ContextId, level: LogLevel, message: &str) {
        let plugin = self.name_of(context).unwrap_or("");
        let worker = &self.worker;
        let context = context.0;
        match level {
            LogLevel::Trace => tracing::trace!(plugin, worker, context, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, worker, context, "{message}"),
            LogLevel::Info => tracing::info!(plugin, worker, context, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, worker, context, "{message}"),
            _ => tracing::error!(plugin, worker, context, "{message}"),
        }
    }

    fn log_level(&self) -> LogLevel {
        use tracing::level_filters::LevelFilter;
        match LevelFilter::current() {
            LevelFilter::TRACE => LogLevel::Trace,
            LevelFilter::DEBUG => LogLevel::Debug,
            LevelFilter::INFO => LogLevel::Info,
            LevelFilter::WARN => LogLevel::Warn,
            _ => LogLevel::Error,
        }
    }

    /// Every stream waiting on the copy wakes, to get the plugin's failure policy instead of
    /// waiting forever, and its calls end, since their answers could only fail again (a gRPC
    /// stream would keep its upstream for as long as the copy lives, which for a copy failed
    /// closed, or a singleton service's, is for good; a call without a timeout, for as long as
    /// its upstream sends within the cluster's request timeout).
    fn vm_failed(&mut self) {
        self.wake_all();
        self.abandon_calls();
    }

    fn header_map(&mut self, context: ContextId, map: MapType) -> Option<&mut dyn Headers> {
        let slot = self.streams.get_mut(&context.0)?;
        match map {
            MapType::HttpRequestHeaders => Some(slot.request.as_mut()?),
            MapType::HttpResponseHeaders => Some(slot.response.as_mut()?),
            MapType::HttpResponseTrailers => Some(slot.trailers.as_mut()?),
            _ => None,
        }
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
        self.ask(context, |asked| {
            asked.local_reply.get_or_insert(response);
        })
    }

    fn continue_stream(&mut self, context: ContextId, stream: StreamType) -> Status {
        // Which side it continues: Envoy continues decoding for the request and encoding for
        // the response, and reading from downstream or upstream for a connection; a continue of
        // a side the plugin does not hold does nothing there.
        let sides = match stream {
            StreamType::HttpRequest | StreamType::Downstream => [true, false],
            StreamType::HttpResponse | StreamType::Upstream => [false, true],
        };
        self.ask(context, |asked| {
            asked.continued = true;
            for (side, continued) in asked.continued_sides.iter_mut().zip(sides) {
                *side |= continued;
            }
        })
    }

    fn close_stream(&mut self, context: ContextId, _stream: StreamType) -> Status {
        self.ask(context, |asked| asked.closed = true)
    }

    fn http_call(&mut self, _context: ContextId, request: HttpCallRequest) -> Result<u32, Status> {
        let (caller, cluster) = self.cluster(&request.upstream)?;
        let (token, task) =
            callout::dispatch(caller, &cluster, request, &self.metrics, &self.answers)?;
        self.open_call(token);
        self.http_tasks.insert(token, task);
        Ok(token)
    }

    fn grpc_call(&mut self, _context: ContextId, request: GrpcRequest) -> Result<u32, Status> {
        let (caller, cluster) = self.cluster(&request.upstream)?;
        let (token, task) = grpc::call(caller, &cluster, request, &self.metrics)?;
        self.open_call(token);
        self.grpc_tasks.insert(token, task);
        Ok(token)
    }

    fn grpc_stream(&mut self, _context: ContextId, request: GrpcRequest) -> Result<u32, Status> {
        let (caller, cluster) = self.cluster(&request.upstream)?;
        let (token, task, sender) = grpc::open(caller, &cluster, request)?;
        self.open_call(token);
        self.grpc_tasks.insert(token, task);
        self.grpc_senders.insert(token, Some(sender));
        Ok(token)
    }

    fn grpc_send(
        &mut self,
        _context: ContextId,
        token: u32,
        message: &[u8],
        end_of_stream: bool,
    ) -> Status {
        let Some(open) = self.grpc_senders.get_mut(&token) else {
            return Status::NotFound;
        };
        let Some(sender) = open else {
            // Half-closed already: nothing more may be sent.
            return Status::BadArgument;
        };
        // A stream that ended, or is being reset, takes no more: the message is dropped and
        // the close reaches the plugin (RESOURCE_EXHAUSTED for a reset), as Envoy answers OK to
        // a send on a stream whose close it has not delivered yet (the SDKs panic on an error).
        let _sent = sender.send(message);
        if end_of_stream {
            // No more messages: the request side half-closes (once this one went out).
            if let Some(sender) = open.take() {
                sender.half_close();
            }
        }
        Status::Ok
    }

    fn grpc_cancel(&mut self, _context: ContextId, token: u32) -> Status {
        // Only a gRPC call's token (not an HTTP call's) names something to cancel.
        if !self.grpc_tasks.contains_key(&token) {
            return Status::NotFound;
        }
        self.forget_call(token);
        Status::Ok
    }

    fn grpc_close(&mut self, _context: ContextId, token: u32) -> Status {
        if !self.grpc_tasks.contains_key(&token) {
            return Status::NotFound;
        }
        match self.grpc_senders.get_mut(&token) {
            // A stream: its request side half-closes; the answer still comes.
            Some(open) => {
                if let Some(sender) = open.take() {
                    sender.half_close();
                }
            }
            // A unary call: closing it cancels it, as in Envoy.
            None => self.forget_call(token),
        }
        Status::Ok
    }
}

impl Drop for ServeHost {
    fn drop(&mut self) {
        // A copy that goes (replaced, failed) takes its calls with it.
        self.abandon_calls();
        self.metrics.vm_copies.get_or_create(&self.owner).dec();
    }
}
