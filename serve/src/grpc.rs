//! `proxy_grpc_call` and `proxy_grpc_stream` over the network: HTTP/2 to a cluster with
//! tonic's client (its gRPC framing, `grpc-timeout`, status and metadata handling), messages
//! as the plugin's own bytes. Each call is a task on the caller's runtime (see
//! [`Caller::runtime`]); what comes back goes to the VM that made the call (for a worker's
//! plugin, its copy on the same thread), as Envoy delivers it:
//!
//! - a unary call: its reply (`proxy_on_grpc_receive`), or `proxy_on_grpc_close` with the
//!   failure's status (14 UNAVAILABLE for an unreachable cluster, 4 DEADLINE_EXCEEDED past its
//!   timeout);
//! - a stream: the initial metadata, each message, the trailing metadata, then the close with
//!   the stream's status, until the plugin cancels it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use abi::{GrpcRequest, HeaderMap, Status};
use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{
    AsciiMetadataKey, AsciiMetadataValue, BinaryMetadataKey, BinaryMetadataValue, MetadataMap,
};
use tonic::transport::{Channel, Endpoint};

use crate::admin::HostMetrics;
use crate::callout::{deliver, next_token, Caller, Last};
use crate::proxy::ClusterState;

/// gRPC's DEADLINE_EXCEEDED, for a call past its timeout.
const DEADLINE_EXCEEDED: tonic::Code = tonic::Code::DeadlineExceeded;

/// The most a gRPC stream holds of messages its plugin sent that the upstream has not taken
/// yet (HTTP/2 flow control stops taking them while the upstream does not read). Past it the
/// stream is reset and the plugin told, RESOURCE_EXHAUSTED: a plugin sending without end must
/// not grow the host's memory without end.
pub(crate) const MAX_UNSENT_BYTES: usize = 16 << 20;

/// Where a plugin's messages for its stream go. [`StreamSender::half_close`] ends the request
/// side cleanly; dropping it otherwise (the plugin cancelled the stream, or its VM copy went)
/// resets the stream.
pub(crate) struct StreamSender {
    messages: mpsc::UnboundedSender<Bytes>,
    unsent: Arc<Unsent>,
    /// Resets the stream (RST_STREAM) unless it closed gracefully.
    cancel: tonic::CancellationHandle,
    /// The plugin half-closed the stream: dropped, the sender ends the request side cleanly.
    half_closed: bool,
}

/// What a stream's plugin sent that the upstream has not taken yet.
struct Unsent {
    bytes: AtomicUsize,
    /// Wakes the stream's task to reset it, once `bytes` would pass [`MAX_UNSENT_BYTES`].
    over_limit: tokio::sync::Notify,
    /// The limit was passed: the stream is being reset and takes no more messages.
    resetting: AtomicBool,
}

/// What became of a message given to [`StreamSender::send`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// On its way.
    Queued,
    /// The stream ended meanwhile.
    Ended,
    /// It would pass [`MAX_UNSENT_BYTES`], or an earlier one did: not sent, and the stream is
    /// being reset (its close reaches the plugin with RESOURCE_EXHAUSTED).
    OverLimit,
}

impl Drop for StreamSender {
    fn drop(&mut self) {
        if self.half_closed {
            return;
        }
        // Cancelled: neither what is queued nor a clean END_STREAM may go out (closing the
        // channel alone would let the request body's own task send both before the stream's
        // task is stopped, and the reset after a clean end does nothing), so the outgoing
        // messages stop here and the stream is reset.
        self.unsent.resetting.store(true, Ordering::Relaxed);
        self.cancel.clone().cancel();
    }
}

impl StreamSender {
    /// Ends the request side cleanly (END_STREAM once what was queued went out); the answer
    /// still comes.
    pub(crate) fn half_close(mut self) {
        self.half_closed = true;
    }

    /// Sends `message` on the stream, unless the stream already holds too much unsent.
    pub(crate) fn send(&self, message: &[u8]) -> Sent {
        if self.unsent.resetting.load(Ordering::Relaxed) {
            return Sent::OverLimit;
        }
        let unsent = self.unsent.bytes.load(Ordering::Relaxed);
        if unsent.saturating_add(message.len()) > MAX_UNSENT_BYTES {
            self.unsent.resetting.store(true, Ordering::Relaxed);
            // The task learns of the limit before the cancellation fails the call, so the
            // plugin's close says RESOURCE_EXHAUSTED rather than the CANCELLED the reset
            // makes (the task's `select!` looks at the limit first).
            self.unsent.over_limit.notify_one();
            // No more of the stream goes out, and it never ends cleanly: the upstream must not
            // take what it got for a whole stream.
            self.cancel.clone().cancel();
            return Sent::OverLimit;
        }
        self.unsent
            .bytes
            .fetch_add(message.len(), Ordering::Relaxed);
        match self.messages.send(Bytes::copy_from_slice(message)) {
            Ok(()) => Sent::Queued,
            Err(_) => {
                self.unsent
                    .bytes
                    .fetch_sub(message.len(), Ordering::Relaxed);
                Sent::Ended
            }
        }
    }
}

/// The plugin's messages as tonic takes them. They end (a clean END_STREAM) only when the
/// plugin half-closes; once the stream is being reset none come and they never end (the
/// cancellation resets the stream), and the reset drops what was queued.
struct Outgoing {
    messages: Arc<std::sync::Mutex<Option<mpsc::UnboundedReceiver<Bytes>>>>,
    unsent: Arc<Unsent>,
}

impl tokio_stream::Stream for Outgoing {
    type Item = Bytes;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Bytes>> {
        if self.unsent.resetting.load(Ordering::Relaxed) {
            return std::task::Poll::Pending;
        }
        let mut messages = self
            .messages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(receiver) = messages.as_mut() else {
            return std::task::Poll::Pending;
        };
        let next = receiver.poll_recv(cx);
        if let std::task::Poll::Ready(Some(message)) = &next {
            self.unsent
                .bytes
                .fetch_sub(message.len(), Ordering::Relaxed);
        }
        next
    }
}

/// Resets a stream that is still open when its task ends (done, or aborted by the plugin's
/// cancel or its VM copy's end): dropping the call alone sends no RST_STREAM once the
/// upstream's headers came, and the plugin's queued messages would still go out.
struct ResetOnDrop {
    cancel: tonic::CancellationHandle,
    messages: Arc<std::sync::Mutex<Option<mpsc::UnboundedReceiver<Bytes>>>>,
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        self.cancel.clone().cancel();
        self.messages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

/// Messages as the plugin gives and takes them, framed by tonic: the codec leaves the bytes
/// as they are (the plugin encodes and decodes its protobufs itself).
#[derive(Clone, Copy, Debug, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

thread_local! {
    /// This thread's HTTP/2 channels, by cluster name, with the cluster they were made for:
    /// calls to a cluster share its connections until a reload changes the cluster. A channel
    /// whose cluster no reload kept (only this map holds it) goes when the thread makes its
    /// next one, with its connections.
    static CHANNELS: RefCell<HashMap<String, (Arc<ClusterState>, Channel)>> =
        RefCell::new(HashMap::new());
}

/// This thread's channel to `cluster` (made on first use, connecting when first needed), its
/// connections driven by `runtime`.
fn channel(
    cluster: &Arc<ClusterState>,
    runtime: &tokio::runtime::Handle,
) -> Result<Channel, Status> {
    CHANNELS.with(|channels| {
        if let Some((made_for, channel)) = channels.borrow().get(&cluster.name) {
            if Arc::ptr_eq(made_for, cluster) {
                return Ok(channel.clone());
            }
        }
        let mut endpoints = Vec::new();
        for address in &cluster.cluster.endpoints {
            let endpoint = Endpoint::from_shared(format!("http://{address}"))
                .map_err(|_| Status::BadArgument)?
                .connect_timeout(cluster.cluster.connect_timeout);
            endpoints.push(endpoint);
        }
        // The channel's balancer is a task: it lives on the caller's runtime.
        let _runtime = runtime.enter();
        let channel = Channel::balance_list(endpoints.into_iter());
        let mut channels = channels.borrow_mut();
        channels.retain(|_, (made_for, _)| Arc::strong_count(made_for) > 1);
        channels.insert(cluster.name.clone(), (Arc::clone(cluster), channel.clone()));
        Ok(channel)
    })
}

/// What a call needs before it goes: checked here, so that a bad service, method or
/// metadata name is the plugin's `BAD_ARGUMENT`, not a failed call.
struct Prepared {
    path: PathAndQuery,
    metadata: MetadataMap,
    channel: Channel,
    runtime: tokio::runtime::Handle,
    token: u32,
}

fn prepare(
    caller: &Caller,
    cluster: &Arc<ClusterState>,
    request: &GrpcRequest,
) -> Result<Prepared, Status> {
    let service = std::str::from_utf8(&request.service).map_err(|_| Status::BadArgument)?;
    let method = std::str::from_utf8(&request.method).map_err(|_| Status::BadArgument)?;
    if service.is_empty() || method.is_empty() {
        return Err(Status::BadArgument);
    }
    let path =
        PathAndQuery::try_from(format!("/{service}/{method}")).map_err(|_| Status::BadArgument)?;
    let metadata = metadata_of(&request.initial_metadata).ok_or(Status::BadArgument)?;
    let runtime = caller.runtime()?;
    Ok(Prepared {
        path,
        metadata,
        channel: channel(cluster, &runtime)?,
        runtime,
        token: next_token(),
    })
}

/// Starts unary call `request` to `cluster`; returns its token and its task.
pub(crate) fn call(
    caller: &Caller,
    cluster: &Arc<ClusterState>,
    request: GrpcRequest,
    metrics: &Arc<HostMetrics>,
) -> Result<(u32, AbortHandle), Status> {
    let prepared = prepare(caller, cluster, &request)?;
    let token = prepared.token;
    let caller = caller.clone();
    let (cluster, metrics) = (Arc::clone(cluster), Arc::clone(metrics));
    let started = std::time::Instant::now();
    let message = Bytes::from(request.message.unwrap_or_default());
    let timeout = request.timeout.filter(|t| !t.is_zero());
    let task = prepared.runtime.spawn(async move {
        let mut client = tonic::client::Grpc::new(prepared.channel);
        let mut outgoing = tonic::Request::new(message);
        *outgoing.metadata_mut() = prepared.metadata;
        if let Some(timeout) = timeout {
            outgoing.set_timeout(timeout);
        }
        let path = prepared.path;
        let answer = within(timeout, async move {
            client.ready().await.map_err(unavailable)?;
            client.unary(outgoing, path, RawCodec).await
        })
        .await;
        metrics.callout("grpc", &cluster.name, answer.is_ok(), started.elapsed());
        deliver(&caller, token, Last::Yes, move |vm| match answer {
            Ok(reply) => vm.on_grpc_call_reply(token, reply.into_inner().to_vec()),
            Err(status) => vm.on_grpc_close(token, code(&status), status.message().into()),
        })
        .await;
    });
    Ok((token, task.abort_handle()))
}

/// Opens stream `request` to `cluster`; returns its token, its task and where the plugin's
/// messages go.
pub(crate) fn open(
    caller: &Caller,
    cluster: &Arc<ClusterState>,
    request: GrpcRequest,
) -> Result<(u32, AbortHandle, StreamSender), Status> {
    let prepared = prepare(caller, cluster, &request)?;
    let token = prepared.token;
    let caller = caller.clone();
    let (sender, messages) = mpsc::unbounded_channel::<Bytes>();
    let unsent = Arc::new(Unsent {
        bytes: AtomicUsize::new(0),
        over_limit: tokio::sync::Notify::new(),
        resetting: AtomicBool::new(false),
    });
    let queue = Arc::new(std::sync::Mutex::new(Some(messages)));
    let mut outgoing = tonic::Request::new(Outgoing {
        messages: Arc::clone(&queue),
        unsent: Arc::clone(&unsent),
    });
    let cancel = outgoing.cancellation_handle();
    let sender = StreamSender {
        messages: sender,
        unsent: Arc::clone(&unsent),
        cancel: cancel.clone(),
        half_closed: false,
    };
    let reset = ResetOnDrop {
        cancel,
        messages: queue,
    };
    let reset_caller = caller.clone();
    let stream = async move {
        let mut client = tonic::client::Grpc::new(prepared.channel);
        *outgoing.metadata_mut() = prepared.metadata;
        let opened = async {
            client.ready().await.map_err(unavailable)?;
            client.streaming(outgoing, prepared.path, RawCodec).await
        }
        .await;
        let response = match opened {
            Ok(response) => response,
            Err(status) => {
                close(&caller, token, &status).await;
                return;
            }
        };
        let (metadata, mut incoming, _) = response.into_parts();
        let metadata = map_of(&metadata);
        deliver(&caller, token, Last::No, move |vm| {
            vm.on_grpc_receive_initial_metadata(token, metadata)
        })
        .await;
        loop {
            match incoming.message().await {
                Ok(Some(message)) => {
                    let delivered = deliver(&caller, token, Last::No, move |vm| {
                        vm.on_grpc_receive(token, message.to_vec())
                    })
                    .await;
                    if !delivered {
                        // Its service can take no more: the stream ends (and is reset).
                        return;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    close(&caller, token, &status).await;
                    return;
                }
            }
        }
        if let Ok(Some(trailers)) = incoming.trailers().await {
            let trailers = map_of(&trailers);
            deliver(&caller, token, Last::No, move |vm| {
                vm.on_grpc_receive_trailing_metadata(token, trailers)
            })
            .await;
        }
        deliver(&caller, token, Last::Yes, move |vm| {
            vm.on_grpc_close(token, 0, Vec::new())
        })
        .await;
    };
    let task = prepared.runtime.spawn(async move {
        let _reset = reset;
        tokio::select! {
            // The limit first: once passed, the cancellation that follows it also fails the
            // call, and that CANCELLED must not be the close the plugin hears.
            biased;
            () = unsent.over_limit.notified() => {
                // The send that passed the limit cancelled the request (RST_STREAM); the
                // queued messages go with `_reset` at the task's end.
                tracing::warn!(
                    token,
                    "a gRPC stream's plugin sent more than {MAX_UNSENT_BYTES} bytes the \
                     upstream has not taken: the stream is reset"
                );
                let status = tonic::Status::resource_exhausted(format!(
                    "the plugin sent more than {MAX_UNSENT_BYTES} bytes the upstream has not taken"
                ));
                close(&reset_caller, token, &status).await;
            }
            () = stream => {}
        }
    });
    Ok((token, task.abort_handle(), sender))
}

/// Ends stream `token` with `status`: its trailing metadata (if any), then the close.
async fn close(caller: &Caller, token: u32, status: &tonic::Status) {
    if !status.metadata().is_empty() {
        let trailers = map_of(status.metadata());
        deliver(caller, token, Last::No, move |vm| {
            vm.on_grpc_receive_trailing_metadata(token, trailers)
        })
        .await;
    }
    let (code, message) = (code(status), status.message().as_bytes().to_vec());
    deliver(caller, token, Last::Yes, move |vm| {
        vm.on_grpc_close(token, code, message)
    })
    .await;
}

/// `call`'s outcome, or DEADLINE_EXCEEDED once `timeout` (if any) has passed.
async fn within<T>(
    timeout: Option<Duration>,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match timeout {
        Some(timeout) => tokio::time::timeout(timeout, call)
            .await
            .unwrap_or_else(|_| Err(tonic::Status::new(DEADLINE_EXCEEDED, "timed out"))),
        None => call.await,
    }
}

/// A channel that cannot take the call: UNAVAILABLE, as gRPC reports an unreachable server.
fn unavailable(error: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::unavailable(error.to_string())
}

fn code(status: &tonic::Status) -> u32 {
    status.code() as u32
}

/// The plugin's metadata for tonic (`-bin` names carry raw bytes); `None` if a name or value
/// is not valid metadata.
fn metadata_of(map: &HeaderMap) -> Option<MetadataMap> {
    let mut metadata = MetadataMap::new();
    for (name, value) in map.iter() {
        if name.ends_with(b"-bin") {
            let key = BinaryMetadataKey::from_bytes(name).ok()?;
            metadata.append_bin(key, BinaryMetadataValue::from_bytes(value));
        } else {
            let key = AsciiMetadataKey::from_bytes(name).ok()?;
            let value = AsciiMetadataValue::try_from(value).ok()?;
            metadata.append(key, value);
        }
    }
    Some(metadata)
}

/// Metadata as the plugin reads it (binary values decoded).
fn map_of(metadata: &MetadataMap) -> HeaderMap {
    let mut map = HeaderMap::new();
    for entry in metadata.iter() {
        match entry {
            tonic::metadata::KeyAndValueRef::Ascii(key, value) => {
                map.add(key.as_str().as_bytes(), value.as_bytes());
            }
            tonic::metadata::KeyAndValueRef::Binary(key, value) => {
                if let Ok(bytes) = value.to_bytes() {
                    map.add(key.as_str().as_bytes(), &bytes);
                }
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str) -> Arc<ClusterState> {
        let cluster = crate::config::Cluster {
            endpoints: vec!["127.0.0.1:9".parse().expect("an address")],
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            http2: true,
        };
        Arc::new(ClusterState::new(name.to_string(), cluster))
    }

    fn cached() -> Vec<String> {
        let mut names: Vec<String> = CHANNELS.with(|c| c.borrow().keys().cloned().collect());
        names.sort();
        names
    }

    #[test]
    fn a_threads_channel_to_a_cluster_no_reload_kept_goes_when_it_makes_the_next() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let (kept, dropped) = (cluster("kept"), cluster("dropped"));
        channel(&kept, runtime.handle()).expect("a channel");
        channel(&dropped, runtime.handle()).expect("a channel");
        assert_eq!(cached(), ["dropped", "kept"]);
        // A reload without `dropped`, and a call to a new cluster: `dropped`'s channel goes,
        // the others stay, and a call to `kept` still shares its channel.
        drop(dropped);
        let new = cluster("new");
        channel(&new, runtime.handle()).expect("a channel");
        assert_eq!(cached(), ["kept", "new"]);
        channel(&kept, runtime.handle()).expect("a channel");
        assert_eq!(cached(), ["kept", "new"]);
        // A reload that changes `kept` (same name, a new cluster): its channel is made anew.
        let changed = cluster("kept");
        drop(kept);
        channel(&changed, runtime.handle()).expect("a channel");
        let made_for = CHANNELS.with(|c| {
            c.borrow()
                .get("kept")
                .map(|(made_for, _)| Arc::clone(made_for))
        });
        assert!(made_for.is_some_and(|made_for| Arc::ptr_eq(&made_for, &changed)));
    }
}
