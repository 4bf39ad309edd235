//! `proxy_http_call` over the network: the request goes to a cluster through Pingora's own
//! client (its connection pools), in a task on the calling worker's runtime, and the answer
//! (or the failure: refused, reset, timed out) comes back to the VM copy that made the call, on
//! the same thread. A singleton service's calls run on a runtime of their own (its thread has
//! none) and their answers are posted to the service's thread.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use abi::{HeaderMap, HttpCallRequest, HttpCallResponse, Status};
use bytes::Bytes;
use lifecycle::ServiceInbox;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use rustc_hash::FxHashSet;

use crate::admin::HostMetrics;
use crate::host::ServeHost;
use crate::proxy::ClusterState;
use crate::worker::{with_existing_workers, Listener};

thread_local! {
    /// The last token given out on this thread: tokens are unique among a thread's copies, so
    /// an answer finds its copy by token.
    static LAST_TOKEN: Cell<u32> = const { Cell::new(0) };
    /// The tokens of this thread's copies' calls that are open: the counter wraps after 2³²
    /// calls, and skips these (a long gRPC stream's, a call without a timeout), as Envoy skips
    /// tokens in use.
    static OPEN_TOKENS: RefCell<FxHashSet<u32>> = RefCell::new(FxHashSet::default());
}

/// Marks `token` as a call's of this thread that is open (see [`forget_token`]).
pub(crate) fn open_token(token: u32) {
    let _ = OPEN_TOKENS.try_with(|open| open.borrow_mut().insert(token));
}

/// Marks `token`'s call as over: the counter may give it out again.
pub(crate) fn forget_token(token: u32) {
    // Not at all while the thread ends (a copy dropped then): nothing is given out any more.
    let _ = OPEN_TOKENS.try_with(|open| open.borrow_mut().remove(&token));
}

/// The largest answer body a call takes (more fails the call), so that an upstream cannot
/// make the proxy buffer without bound.
const MAX_ANSWER_BODY: usize = 16 << 20;

/// The most one VM copy's call answers may hold at once, read and not yet delivered (more
/// fails the call whose answer would pass it): the per-answer limit alone would let slow
/// upstreams make a copy with its 1,024 calls open hold 16 GiB.
pub(crate) const MAX_ANSWER_BYTES_PER_COPY: usize = 64 << 20;

/// What a VM copy's call answers hold now, shared by its calls' tasks.
pub(crate) type AnswerBytes = Arc<AtomicUsize>;

/// An answer's share of its copy's [`AnswerBytes`], given back when dropped (once the answer
/// was delivered, or the call failed).
struct AnswerShare {
    held: AnswerBytes,
    bytes: usize,
}

impl AnswerShare {
    /// Takes `more` bytes of an answer from `cluster`; `false` (nothing taken, and a warning
    /// logged) if the copy's answers would hold more than [`MAX_ANSWER_BYTES_PER_COPY`].
    fn take(&mut self, more: usize, cluster: &str) -> bool {
        let taken = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                now.checked_add(more)
                    .filter(|total| *total <= MAX_ANSWER_BYTES_PER_COPY)
            })
            .is_ok();
        if taken {
            self.bytes += more;
        } else {
            tracing::warn!(
                cluster,
                held = self.held.load(Ordering::Relaxed),
                "the answers of a plugin's open HTTP calls would hold over 64 MiB: this call failed"
            );
        }
        taken
    }
}

impl Drop for AnswerShare {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The client all calls share (its pools are per process).
fn connector() -> &'static Connector {
    static CONNECTOR: OnceLock<Connector> = OnceLock::new();
    CONNECTOR.get_or_init(|| Connector::new(None))
}

/// Who made a call, and so where its answers go.
#[derive(Clone)]
pub(crate) enum Caller {
    /// A plugin of this listener, on the calling worker thread: answers are delivered to its
    /// VM copy there.
    Worker(Arc<Listener>),
    /// A singleton service: answers are posted to its thread through its inbox, which is
    /// published once the service has started (an answer to a call made while it starts waits
    /// for it; a service that failed to start closes the channel unpublished).
    Service(ServiceAddress),
}

/// Where a singleton service's answers go: its inbox, published once the service has started.
pub(crate) type ServiceAddress = tokio::sync::watch::Receiver<Option<ServiceInbox>>;

/// How long an answer for a singleton service waits for the service to finish starting.
const SERVICE_START_WAIT: Duration = Duration::from_secs(60);

impl Caller {
    /// The runtime the caller's calls run on: the worker's own, or the services' runtime.
    pub(crate) fn runtime(&self) -> Result<tokio::runtime::Handle, Status> {
        match self {
            Caller::Worker(_) => {
                tokio::runtime::Handle::try_current().map_err(|_| Status::InternalFailure)
            }
            Caller::Service(_) => service_runtime(),
        }
    }
}

/// The runtime of singleton services' calls (one thread: their clients only wait on I/O).
fn service_runtime() -> Result<tokio::runtime::Handle, Status> {
    static RUNTIME: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("wasm-service-calls")
                .enable_all()
                .build()
                .inspect_err(|error| {
                    tracing::error!("no runtime for singleton services' calls: {error}")
                })
                .ok()
        })
        .as_ref()
        .map(|runtime| runtime.handle().clone())
        .ok_or(Status::InternalFailure)
}

/// Starts `request` to `cluster` for `caller`; returns its token and its task (ended with the
/// copy that made the call). The request is checked here: a method, path or header that is
/// not valid HTTP (CR, LF, NUL included) is refused with `BAD_ARGUMENT`.
pub(crate) fn dispatch(
    caller: &Caller,
    cluster: &Arc<ClusterState>,
    request: HttpCallRequest,
    metrics: &Arc<HostMetrics>,
    answers: &AnswerBytes,
) -> Result<(u32, tokio::task::AbortHandle), Status> {
    let header = request_header(&request).ok_or(Status::BadArgument)?;
    if !request.trailers.is_empty() {
        // Pingora's client sends none: refused, rather than sent without them. Said once per
        // process: a plugin retrying in a loop would flood the log.
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                cluster = %cluster.name,
                "an HTTP call with request trailers is refused (BAD_ARGUMENT): the proxy's \
                 client cannot send them"
            )
        });
        return Err(Status::BadArgument);
    }
    let runtime = caller.runtime()?;
    let token = next_token();
    let (caller, cluster, metrics) = (caller.clone(), Arc::clone(cluster), Arc::clone(metrics));
    let started = Instant::now();
    let body = Bytes::from(request.body);
    let timeout = request.timeout;
    let mut share = AnswerShare {
        held: Arc::clone(answers),
        bytes: 0,
    };
    let task = runtime.spawn(async move {
        let call = send(&cluster, header, body, &mut share);
        let answer = if timeout.is_zero() {
            call.await
        } else {
            tokio::time::timeout(timeout, call).await.ok().flatten()
        };
        metrics.callout("http", &cluster.name, answer.is_some(), started.elapsed());
        deliver(&caller, token, Last::Yes, move |vm| match answer {
            Some(response) => vm.on_http_call_response(token, response),
            None => vm.on_http_call_failure(token),
        })
        .await;
    });
    Ok((token, task.abort_handle()))
}

/// A new token for a call from this thread: never 0, nor one of its open calls'.
pub(crate) fn next_token() -> u32 {
    OPEN_TOKENS.with(|open| {
        let open = open.borrow();
        LAST_TOKEN.with(|last| loop {
            let token = last.get().wrapping_add(1).max(1);
            last.set(token);
            if !open.contains(&token) {
                return token;
            }
        })
    })
}

/// The request header of a call: `:method`, `:path`, `:authority` (as `Host`) and the rest.
fn request_header(request: &HttpCallRequest) -> Option<Box<RequestHeader>> {
    let headers = &request.headers;
    let method = headers.get(b":method").unwrap_or(b"GET");
    let path = headers.get(b":path").unwrap_or(b"/");
    let method = std::str::from_utf8(method).ok()?;
    let mut header = RequestHeader::build(method, path, Some(headers.len())).ok()?;
    if let Some(authority) = headers.get(b":authority") {
        header
            .insert_header(
                http::header::HOST,
                http::HeaderValue::from_bytes(authority).ok()?,
            )
            .ok()?;
    }
    for (name, value) in headers.iter() {
        if name.starts_with(b":") || name.eq_ignore_ascii_case(b"content-length") {
            continue;
        }
        // `Host` comes from `:authority`.
        if HttpCallRequest::is_connection_header(name, value) || name.eq_ignore_ascii_case(b"host")
        {
            // The proxy frames the call and owns its connection, which the pool may hand to
            // another call next: a plugin's `transfer-encoding` beside the host's
            // `Content-Length`, or its `connection`, could desynchronise the two. Said once
            // per process: a plugin sending it on every call would flood the log.
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    header = %String::from_utf8_lossy(name),
                    "a plugin's connection header was left out of an HTTP call (the proxy \
                     frames calls and owns their connections; `host` comes from `:authority`)"
                )
            });
            continue;
        }
        let name = http::HeaderName::from_bytes(name).ok()?;
        let value = http::HeaderValue::from_bytes(value).ok()?;
        header.append_header(name, value).ok()?;
    }
    header
        .insert_header(http::header::CONTENT_LENGTH, request.body.len().to_string())
        .ok()?;
    Some(Box::new(header))
}

/// Sends the call and reads the whole answer; `None` if it failed on the way.
async fn send(
    cluster: &ClusterState,
    header: Box<RequestHeader>,
    body: Bytes,
    share: &mut AnswerShare,
) -> Option<HttpCallResponse> {
    let peer = cluster.peer();
    let head = header.method == http::Method::HEAD;
    let (mut session, _reused) = connector().get_http_session(&peer).await.ok()?;
    session.write_request_header(header).await.ok()?;
    if !body.is_empty() {
        session.write_request_body(body, true).await.ok()?;
    }
    session.finish_request_body().await.ok()?;
    // Interim answers (100 Continue, 103 Early Hints) come before the answer: skipped, as a
    // proxy does (reading a body after one would panic in Pingora, whose body reader starts
    // only with the final answer). A 101 (a switch of protocols nobody asked for) fails the
    // call.
    loop {
        session.read_response_header().await.ok()?;
        match session.response_header()?.status.as_u16() {
            101 => return None,
            100..=199 => continue,
            _ => break,
        }
    }
    let mut headers = HeaderMap::new();
    let response = session.response_header()?;
    headers.add(b":status", response.status.as_str().as_bytes());
    for (name, value) in response.headers.iter() {
        if !share.take(name.as_str().len() + value.len(), &cluster.name) {
            return None;
        }
        headers.add(name.as_str().as_bytes(), value.as_bytes());
    }
    let over_the_limit = || {
        tracing::warn!(cluster = %cluster.name, "an HTTP call's answer is over 16 MiB: failed");
    };
    // An answer announcing more than the limit is refused before any of its body is read
    // (unless it has none whatever its length says: to a `HEAD`, a 204 or a 304).
    let bodiless = head || matches!(response.status.as_u16(), 204 | 304);
    // A `Transfer-Encoding` frames the body instead of a `Content-Length` beside it.
    let announced = response
        .headers
        .get(http::header::CONTENT_LENGTH)
        .filter(|_| {
            !response
                .headers
                .contains_key(http::header::TRANSFER_ENCODING)
        })
        .and_then(|value| value.to_str().ok()?.trim().parse::<u64>().ok());
    if !bodiless && announced.is_some_and(|length| length > MAX_ANSWER_BODY as u64) {
        over_the_limit();
        return None;
    }
    let cut_short = |error: &dyn std::fmt::Display| {
        tracing::warn!(
            cluster = %cluster.name,
            %error,
            "an HTTP call's answer was cut short: failed"
        );
    };
    let mut body = Vec::new();
    loop {
        match session.read_response_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ANSWER_BODY {
                    over_the_limit();
                    return None;
                }
                if !share.take(chunk.len(), &cluster.name) {
                    return None;
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(error) => {
                cut_short(&error);
                return None;
            }
        }
    }
    // An HTTP/2 answer's trailers (e.g. a gRPC service's `grpc-status`); an HTTP/1.1 answer's
    // chunked trailers are not kept by Pingora's client.
    let mut trailers = HeaderMap::new();
    if let pingora::protocols::http::client::HttpSession::H2(h2) = &mut session {
        match h2.read_trailers().await {
            Ok(Some(received)) => {
                for (name, value) in received.iter() {
                    if !share.take(name.as_str().len() + value.len(), &cluster.name) {
                        return None;
                    }
                    trailers.add(name.as_str().as_bytes(), value.as_bytes());
                }
            }
            Ok(None) => {}
            Err(error) => {
                cut_short(&error);
                return None;
            }
        }
    }
    connector().release_http_session(session, &peer, None).await;
    Some(HttpCallResponse {
        headers,
        body,
        trailers,
    })
}

/// Whether a delivery is the last one of its call.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Last {
    /// The call is over once delivered: the copy forgets its token.
    Yes,
    /// More comes (a gRPC stream's metadata and messages).
    No,
}

/// Runs `callback` (an answer's callback) in the VM that made call `token`: for a worker's
/// plugin, in its copy on this thread; for a singleton service, on the service's thread.
/// Nothing runs if the copy is gone or forgot the call (the plugin cancelled it). `false` if
/// a service dropped the delivery unrun (it failed or stopped): a stream then ends.
pub(crate) async fn deliver(
    caller: &Caller,
    token: u32,
    last: Last,
    callback: impl FnOnce(&mut abi::Vm) -> Result<(), abi::VmError> + Send + 'static,
) -> bool {
    match caller {
        Caller::Worker(listener) => {
            deliver_here(listener, token, last, callback);
            // The plugin ran on this worker's thread without the task yielding: an upstream
            // sending message after message (each already read) would hold the worker's other
            // streams up for as long as it sends. Yielding once the task's budget is spent
            // lets them run between deliveries.
            tokio::task::coop::consume_budget().await;
            true
        }
        Caller::Service(address) => {
            let mut address = address.clone();
            let started =
                tokio::time::timeout(SERVICE_START_WAIT, address.wait_for(Option::is_some)).await;
            let Some(inbox) = started
                .ok()
                .and_then(Result::ok)
                .and_then(|inbox| inbox.clone())
            else {
                tracing::warn!(token, "a call's answer found its service never started");
                return false;
            };
            // Answered once the service ran the delivery, dropped unanswered if it did not (it
            // failed, or stopped): a stream's task reads its next message only then, so an
            // upstream sending faster than the service takes its messages is held back by
            // HTTP/2's flow control rather than queued in the service's inbox without end.
            let (processed, waited) = tokio::sync::oneshot::channel::<()>();
            inbox.post(Box::new(move |vm| {
                let ran = deliver_to_service(vm, token, last, callback);
                let _ = processed.send(());
                ran
            }));
            waited.await.is_ok()
        }
    }
}

/// Runs `callback`, an answer to call `token`, in `vm` if the call is still its; otherwise
/// hands `callback` back. A VM that failed in it ends its other calls and streams.
fn answer_in<F>(
    vm: &mut abi::Vm,
    token: u32,
    last: Last,
    callback: F,
) -> Result<Result<(), abi::VmError>, F>
where
    F: FnOnce(&mut abi::Vm) -> Result<(), abi::VmError>,
{
    let Some(host) = vm.host_as::<ServeHost>() else {
        return Err(callback);
    };
    if !host.callouts.contains(&token) {
        return Err(callback);
    }
    if last == Last::Yes {
        host.forget_call(token);
    }
    Ok(callback(vm))
}

/// [`deliver`] on a singleton service's thread: to its VM, if the call is still its.
fn deliver_to_service(
    vm: &mut abi::Vm,
    token: u32,
    last: Last,
    callback: impl FnOnce(&mut abi::Vm) -> Result<(), abi::VmError>,
) -> Result<(), abi::VmError> {
    answer_in(vm, token, last, callback).unwrap_or(Ok(()))
}

/// [`deliver`] to the copy of a plugin of `listener` on this worker thread.
fn deliver_here(
    listener: &Arc<Listener>,
    token: u32,
    last: Last,
    callback: impl FnOnce(&mut abi::Vm) -> Result<(), abi::VmError>,
) {
    // Taken by the copy whose call it answers.
    let mut callback = Some(callback);
    // A thread that let go of the listener's copies has none waiting.
    let delivered = with_existing_workers(listener, |workers| {
        workers.for_each_worker(|_, worker| {
            let mut failed = None;
            worker.for_each_copy(|_, vm, roots| {
                let Some(pending) = callback.take() else {
                    return;
                };
                match answer_in(vm, token, last, pending) {
                    Err(not_this_copys) => callback = Some(not_this_copys),
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::error!("a call's answer failed in the plugin: {error}");
                        failed = lifecycle::failing_plugin(roots, &error).map(|p| (p, error));
                    }
                }
            });
            // Counted by its cause, and its policy's clock started, as a tick's failure is.
            if let Some((plugin, error)) = failed {
                worker.root_failed(plugin, &error);
            }
        });
        callback.is_none()
    });
    if delivered != Some(true) {
        tracing::debug!(token, "a call's answer found no VM copy waiting for it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_never_0_nor_one_still_open_after_the_counter_wraps() {
        LAST_TOKEN.with(|last| last.set(u32::MAX - 1));
        open_token(u32::MAX);
        open_token(1);
        // u32::MAX is open, 0 is never one, 1 is open.
        assert_eq!(next_token(), 2);
        forget_token(1);
        forget_token(u32::MAX);
        LAST_TOKEN.with(|last| last.set(u32::MAX - 1));
        assert_eq!(next_token(), u32::MAX);
        assert_eq!(next_token(), 1);
    }
}
