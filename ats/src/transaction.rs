//! One Traffic Server transaction running through the plugins: the hooks and what they call.
//!
//! The transaction is created at the read-request-header hook (a global hook) with a
//! continuation of its own for the send-response-header and transaction-close hooks. Every
//! handler does its work with this thread's workers, lets go of them and of the transaction,
//! and only then reenables Traffic Server, which may run the next hook before
//! `TSHttpTxnReenable` returns.
//!
//! A plugin that pauses (`StopIteration` and the like) holds the transaction in its hook: it is
//! not reenabled until the plugin continues it (`proxy_continue_stream`), answers it
//! (`proxy_send_local_response`) or closes it, from a later callback such as a callout's answer
//! or a tick. Those callbacks run outside the transaction's hooks; afterwards [`act_on`] picks
//! the held transactions up where they stopped.

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi::{HeadersAction, LocalResponse, Vm, VmError};
use lifecycle::{Admission, Generation, OnFailure, PluginId, StreamVm, Worker};

use crate::body::{self, Direction, TransactionLink};
use crate::headers::{HeaderKind, MimeHeaders};
use crate::host::{AtsHost, Holder, StreamSlot};
use crate::{callout, diag, in_worker, sys, with_thread, with_workers, ThreadState};

/// One plugin's part in a transaction.
struct Filter {
    plugin: PluginId,
    name: Arc<str>,
    /// The hold on the VM copy the plugin runs in, until the transaction closes.
    stream: Option<StreamVm>,
    context: abi::ContextId,
    /// Whether the plugin's module has a request body callback.
    request_body_callback: bool,
    /// The plugin failed open during this transaction: it is not called again for it.
    bypassed: bool,
    /// Body bytes the plugin keeps buffered (it returned `StopIterationAndBuffer`), by direction.
    request_body: Vec<u8>,
    response_body: Vec<u8>,
    /// The plugin buffered more than the limit in a direction (request, response): the body
    /// goes on past it, unchanged, from then on. The headers are gone, so Envoy's 413 or 500
    /// cannot be sent, and ending the transaction (`body::fail`) for a plugin that only
    /// buffered too much would lose what the client sent.
    over_limit: [bool; 2],
}

impl Filter {
    fn over_limit(&mut self, direction: Direction) -> &mut bool {
        match direction {
            Direction::Request => &mut self.over_limit[0],
            Direction::Response => &mut self.over_limit[1],
        }
    }

    fn buffered(&mut self, direction: Direction) -> &mut Vec<u8> {
        match direction {
            Direction::Request => &mut self.request_body,
            Direction::Response => &mut self.response_body,
        }
    }
}

/// A reply sent instead of the origin's response.
struct Reply {
    status: u32,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
    /// Why it is sent, for `response.code_details` (a plugin's own, or Envoy's).
    details: Option<String>,
}

/// How a hook handler lets the transaction go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// On to the next step.
    Continue,
    /// Down the error path: the transaction answers with its reply.
    Reply,
    /// Held until a plugin continues it.
    Hold,
}

/// Which response header the response callbacks see: the origin's, at the read-response-header
/// hook (before any body, which Traffic Server sends through the transform only after it), or
/// the one Traffic Server sends, for responses that have no origin's (local replies, Traffic
/// Server's own errors, cache hits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResponseFrom {
    Origin,
    Client,
}

/// A plugin holding the request headers while the transaction goes on and its body flows
/// (see [`Transaction::headers_held`]).
#[derive(Clone, Copy, Debug)]
struct HeaderHold {
    /// The filter holding them.
    filter: usize,
    /// Whether the body goes to its body callbacks meanwhile: it paused with
    /// `allow_on_headers_stop_iteration` (Envoy's `StopIteration`). Otherwise what reaches it
    /// waits in its buffer until it continues, as for Envoy's stop of everything.
    body_to_holder: bool,
}

/// Where `request_headers` runs: in the read-request-header hook, where a plugin that stops
/// everything holds the transaction there; or once the transaction went on with a plugin
/// holding the headers only, where every pause holds the headers, and the body, in the request
/// transform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Hook,
    Body,
}

/// How far a body chunk got through the plugins.
enum BodyStep {
    /// Through them all: what goes on (empty when a plugin keeps or drops it).
    Through(Vec<u8>),
    /// To the plugin holding the request headers, which let them go with this chunk: the
    /// plugins after it get the headers first, then `data`.
    HeadersLetGo { holder: usize, data: Vec<u8> },
}

/// Where a held transaction waits.
#[derive(Clone, Copy, Debug)]
enum Pause {
    /// In the request header hook, at filter `0`.
    Request(usize),
    /// In the response header hook, at filter `0` (filters run in reverse there).
    Response(usize),
}

/// A transaction and its plugins.
pub(crate) struct Transaction {
    txn: sys::TSHttpTxn,
    /// The deployment its plugins belong to (a reload does not move it).
    generation: Generation,
    /// The Traffic Server thread it runs on, which owns its VM copies.
    thread: sys::TSEventThread,
    filters: Vec<Filter>,
    reply: Option<Reply>,
    paused: Option<Pause>,
    /// Shared with the body transforms, which stop using the transaction once it is cleared.
    link: TransactionLink,
    /// Whether some plugin has a request or response body callback.
    wants_request_body: bool,
    wants_response_body: bool,
    /// Whether the response callbacks ran (or run), and on which header.
    response_from: Option<ResponseFrom>,
    /// No response body callback follows: the response's headers ended it (`end_of_stream`
    /// in its headers callbacks), or a reply went out in its place (see `answer_response`).
    response_ended_at_headers: bool,
    /// The header that framed the client's request body (`Content-Length` or
    /// `Transfer-Encoding`) as the client sent it, restored after the plugins.
    client_framing: Option<(Vec<u8>, Vec<u8>)>,
    /// A plugin dropped the request's framing header (Envoy's sign that it changes the body's
    /// length): the request transform withholds the body until its length is known.
    request_framing_dropped: bool,
    /// A plugin ended the body (request, response) by failing closed, answering or closing the
    /// stream: nothing more of it goes on (the transform refuses the request, or ends the
    /// transaction: see `body::fail`).
    body_cut: [bool; 2],
    /// A plugin holds the request headers while Traffic Server goes on with the transaction.
    /// Traffic Server reads a request body only past the read-request-header hook, so a plugin
    /// pausing there with `allow_on_headers_stop_iteration` (a host turning that into a stop of
    /// everything never calls its body callbacks: proxy-wasm-cpp-host#143) lets the transaction
    /// go, and the request transform withholds the body, and with it the whole request, from
    /// the origin: Traffic Server sends the origin's request header only with the transform's
    /// first bytes, whose length it needs. The plugins after the holder get the headers (the
    /// origin's request header, built by then) once it lets them go.
    headers_held: Option<HeaderHold>,
    /// The request body came to its end (it may wait in a holder's buffer).
    request_body_ended: bool,
    /// What the plugins let through when a hold on the request (its headers, or its body at its
    /// end) ended outside the request transform (in a callout's answer), or what came through
    /// the plugins before a body holder at the body's end: the transform takes it when woken.
    released_request_body: Vec<u8>,
    /// The request transform, while it lives, and whether a wake-up for it is on its way.
    request_transform: Option<sys::TSCont>,
    wake_scheduled: bool,
    /// A plugin stopped at the request body's end (e.g. while a callout checks the whole body)
    /// before any of the request went out: the filter, which keeps the body until it continues
    /// (the request transform waits for it, and with it the request: see `headers_held`).
    body_held: Option<usize>,
    /// Whether the request transform began sending the request (then a stop at the body's end
    /// cannot hold it: the body goes on, as Traffic Server's transform cannot take it back).
    request_output_open: bool,
}

/// Runs a hook handler's body, turning a panic into an error message and `on_panic`:
/// unwinding into Traffic Server would abort it.
fn guarded(what: &str, on_panic: Next, body: impl FnOnce() -> Next) -> Next {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(next) => next,
        Err(_) => {
            diag::error(&format!("{what} panicked"));
            on_panic
        }
    }
}

/// Answers `txn` with a 503 down the error path, for a transaction the plugins could not take:
/// going on without them would bypass a plugin that must not be bypassed.
///
/// # Safety
/// `txn` must be the transaction of the hook being handled.
unsafe fn fail_closed(txn: sys::TSHttpTxn) -> Next {
    // SAFETY: the caller's promise.
    unsafe { sys::TSHttpTxnStatusSet(txn, 503) };
    Next::Reply
}

/// Lets Traffic Server go on with `txn`.
///
/// # Safety
/// `txn` must be a transaction held by this plugin (in the hook being handled, or paused).
unsafe fn reenable(txn: sys::TSHttpTxn, next: Next) {
    let event = match next {
        Next::Continue => sys::TS_EVENT_HTTP_CONTINUE,
        Next::Reply => sys::TS_EVENT_HTTP_ERROR,
        Next::Hold => return,
    };
    // SAFETY: the caller's promise.
    unsafe { sys::TSHttpTxnReenable(txn, event) }
}

/// The global read-request-header hook: a new transaction meets the plugins.
///
/// # Safety
/// Called by Traffic Server with the transaction of the event as `data`.
pub(crate) unsafe extern "C" fn on_read_request(
    _cont: sys::TSCont,
    event: sys::TSEvent,
    data: *mut c_void,
) -> c_int {
    let txn = data as sys::TSHttpTxn;
    if event != sys::TS_EVENT_HTTP_READ_REQUEST_HDR {
        // SAFETY: every event of an HTTP hook carries its transaction.
        unsafe { reenable(txn, Next::Continue) };
        return 0;
    }
    let next = guarded("the request hook", Next::Reply, || {
        // SAFETY: `txn` is this hook's transaction.
        unsafe { start(txn) }
    });
    if next == Next::Reply {
        // A reply without a status set (a panic) is the failure-closed 503; the plugins' own
        // replies set theirs again below, which is harmless.
        // SAFETY: `txn` is this hook's transaction.
        if unsafe { sys::TSHttpTxnStatusGet(txn) } == 0 {
            unsafe { fail_closed(txn) };
        }
    }
    // SAFETY: `txn` is this hook's transaction; nothing of it is borrowed any more.
    unsafe { reenable(txn, next) };
    0
}

/// Whether `txn` is one of the plugin's own HTTP calls.
///
/// # Safety
/// `txn` must be the transaction of the hook being handled.
unsafe fn is_callout(txn: sys::TSHttpTxn) -> bool {
    // SAFETY: `txn` is live.
    if unsafe { sys::TSHttpTxnIsInternal(txn) } == 0 {
        return false;
    }
    client_header(txn, HeaderKind::Request).is_some_and(|headers| {
        abi::Headers::get(&headers, callout::MARKER.as_bytes())
            == Some(callout::marker_value().as_bytes())
    })
}

/// Admits the transaction to every HTTP filter and runs their request header callbacks.
///
/// # Safety
/// `txn` must be the transaction of the read-request-header hook being handled.
unsafe fn start(txn: sys::TSHttpTxn) -> Next {
    // SAFETY: `txn` is this hook's transaction.
    if unsafe { is_callout(txn) } {
        // The marker is this process's secret: it goes no further than this hook, never to
        // the upstream; nor does the call's timeout.
        if let Some(mut headers) = client_header(txn, HeaderKind::Request) {
            let number = |name: &str| {
                abi::Headers::get(&headers, name.as_bytes())
                    .and_then(|value| std::str::from_utf8(value).ok()?.parse::<u64>().ok())
            };
            let timeout_ms = number(callout::TIMEOUT_HEADER).filter(|ms| *ms > 0);
            let call = number(callout::CALL_HEADER).and_then(|call| usize::try_from(call).ok());
            abi::Headers::remove(&mut headers, callout::MARKER.as_bytes());
            abi::Headers::remove(&mut headers, callout::TIMEOUT_HEADER.as_bytes());
            abi::Headers::remove(&mut headers, callout::CALL_HEADER.as_bytes());
            if let Some(call) = call.filter(|call| *call != 0) {
                // SAFETY: `txn` is this hook's transaction.
                unsafe { crate::answer::watch(txn, call) };
            }
            if let Some(ms) = timeout_ms {
                // Traffic Server's client reads a whole answer into memory: once the plugin
                // has stopped waiting, an upstream still sending (an endless body) is cut off a
                // second after the plugin's timeout, rather than read for as long as it sends.
                // The limit is set on the call's side of its internal transaction, Traffic
                // Server's own client (9.2 does not apply one set for the upstream's side
                // here), in nanoseconds, as Traffic Server's clock counts.
                let ms = ms.min(u64::from(u32::MAX)) + 1000;
                let limit = sys::TSHRTime::try_from(ms * 1_000_000).unwrap_or(i64::MAX);
                // SAFETY: `txn` is this hook's transaction; its session and client connection
                // are live during the hook.
                unsafe {
                    let client = sys::TSHttpSsnClientVConnGet(sys::TSHttpTxnSsnGet(txn));
                    if !client.is_null() {
                        sys::TSVConnActiveTimeoutSet(client, limit);
                    }
                }
            }
        }
        // The plugin's own call goes straight to the upstream its URL names: no remap rule
        // needed, and no plugin runs on it.
        // SAFETY: as above.
        unsafe { sys::TSSkipRemappingSet(txn, 1) };
        return Next::Continue;
    }
    // SAFETY: a continuation without a mutex is what transaction hooks call under the
    // transaction's own lock.
    let cont = unsafe { sys::TSContCreate(Some(on_transaction_event), std::ptr::null_mut()) };
    let mut transaction = match with_thread(|state| begin(state, txn, cont)) {
        Some(Some(transaction)) => transaction,
        unused => {
            // SAFETY: the continuation was never handed to Traffic Server.
            unsafe { sys::TSContDestroy(cont) };
            return match unused {
                // The thread's plugins could not be reached.
                // SAFETY: `txn` is this hook's transaction.
                None => unsafe { fail_closed(txn) },
                // Every plugin failed open: the transaction goes on without them.
                _ => Next::Continue,
            };
        }
    };
    let next = if transaction.reply.is_some() {
        Next::Reply
    } else {
        transaction.request_headers(0, Stage::Hook)
    };
    if next == Next::Reply {
        transaction.send_reply_body();
    }
    let request_body = transaction.wants_request_body
        && next != Next::Reply
        && client_header(txn, HeaderKind::Request)
            .is_some_and(|headers| !ends_stream(&headers, HeaderKind::Request));
    // A response to HEAD has no body: no transform (Traffic Server would set the length of
    // what it passes, nothing, as the response's `Content-Length`).
    let response_body =
        transaction.wants_response_body && !is_head(txn) && !asks_for_websocket(txn);
    let dechunked = request_body && transaction.request_body_chunked();
    // The transaction now lives with its continuation, until it closes.
    // SAFETY: the continuation's data is the boxed transaction, freed at close; the link lets
    // the transforms reach it until then.
    unsafe {
        let link = Rc::clone(&transaction.link);
        let transaction = Box::into_raw(Box::new(transaction));
        link.set(transaction);
        sys::TSContDataSet(cont, transaction.cast());
        sys::TSHttpTxnHookAdd(txn, sys::TS_HTTP_READ_RESPONSE_HDR_HOOK, cont);
        sys::TSHttpTxnHookAdd(txn, sys::TS_HTTP_SEND_RESPONSE_HDR_HOOK, cont);
        sys::TSHttpTxnHookAdd(txn, sys::TS_HTTP_TXN_CLOSE_HOOK, cont);
        // Traffic Server following an origin's redirect itself would send the client a
        // response the plugins never saw (their response callbacks ran on the redirect), and a
        // response transform, done with the redirect's body, would pass nothing of the one
        // followed: the client gets the redirect, as the plugins saw it (Envoy follows one only
        // where a route asks).
        sys::TSHttpTxnConfigIntSet(txn, sys::TS_CONFIG_HTTP_NUMBER_OF_REDIRECTIONS, 0);
        if request_body {
            let transform = body::add(txn, Direction::Request, Rc::clone(&link));
            (*transaction).request_transform = Some(transform);
        }
        if dechunked {
            sys::TSHttpTxnHookAdd(txn, sys::TS_HTTP_SEND_REQUEST_HDR_HOOK, cont);
        }
        if request_body {
            // The cache is looked up before the body is read, while a plugin may hold the
            // headers (from here, or once a plugin holding the transaction lets it go): see
            // `on_transaction_event`.
            sys::TSHttpTxnHookAdd(txn, sys::TS_HTTP_CACHE_LOOKUP_COMPLETE_HOOK, cont);
        }
        if response_body {
            body::add(txn, Direction::Response, link);
        }
    }
    next
}

/// The transaction with a stream context in every plugin that admits it; `None` if no plugin
/// takes part (every one failed open).
fn begin(state: &mut ThreadState, txn: sys::TSHttpTxn, cont: sys::TSCont) -> Option<Transaction> {
    let (generation, worker) = state.workers.for_new_stream();
    let mut transaction = Transaction {
        txn,
        generation,
        // SAFETY: called on the event thread running the hook.
        thread: unsafe { sys::TSEventThreadSelf() },
        filters: Vec::new(),
        reply: None,
        paused: None,
        link: Rc::new(Cell::new(std::ptr::null_mut())),
        wants_request_body: false,
        wants_response_body: false,
        response_from: None,
        response_ended_at_headers: false,
        client_framing: client_header(txn, HeaderKind::Request)
            .and_then(|headers| framing_of(&headers)),
        request_framing_dropped: false,
        body_cut: [false; 2],
        headers_held: None,
        request_body_ended: false,
        released_request_body: Vec::new(),
        request_transform: None,
        wake_scheduled: false,
        body_held: None,
        request_output_open: false,
    };
    let plugins = Arc::clone(worker.plugins());
    let info = stream_info(txn);
    for plugin in plugins.http_filters() {
        let config = plugins.config(plugin);
        match worker.admit(plugin) {
            Admission::Run(stream) => {
                let opened = open_stream(worker, &stream, config, cont, &info);
                if let Some(vm) = worker.vm(&stream) {
                    // The copy may be new, or have asked for ticks since the last transaction.
                    let period = vm.tick_period_of(stream.root());
                    state
                        .ticker
                        .note(generation, stream.copy(), stream.root(), period);
                }
                match opened {
                    Ok(opened) => {
                        transaction.wants_request_body |= opened.request_body;
                        transaction.wants_response_body |= opened.response_body;
                        transaction.filters.push(Filter {
                            plugin,
                            name: opened.name,
                            stream: Some(stream),
                            context: opened.context,
                            request_body_callback: opened.request_body,
                            bypassed: false,
                            request_body: Vec::new(),
                            response_body: Vec::new(),
                            over_limit: [false; 2],
                        });
                    }
                    Err(error) => {
                        diag::error(&format!(
                            "[{}] cannot create a stream context: {error}",
                            config.display_name()
                        ));
                        worker.release(stream);
                        if crate::plugin_failed(worker, plugin, &error) == OnFailure::FailClosed {
                            transaction.reply = Some(Reply::fail_closed(config.display_name()));
                            break;
                        }
                    }
                }
            }
            Admission::FailClosed => {
                transaction.reply = Some(Reply::fail_closed(config.display_name()));
                break;
            }
            Admission::FailOpen => {}
        }
    }
    if transaction.filters.is_empty() && transaction.reply.is_none() {
        state.workers.stream_ended(generation);
        return None;
    }
    Some(transaction)
}

/// A plugin's new stream context, with what the transaction needs to know of its plugin.
struct OpenedStream {
    context: abi::ContextId,
    /// The plugin's name for logs (shared with its copy's host, made once per root context).
    name: Arc<str>,
    /// Whether the plugin's module has body callbacks.
    request_body: bool,
    response_body: bool,
}

/// Creates the plugin's context for a new stream and gives it a slot in the copy's host.
fn open_stream(
    worker: &mut Worker,
    stream: &StreamVm,
    config: &lifecycle::PluginConfig,
    cont: sys::TSCont,
    info: &abi::StreamInfo,
) -> Result<OpenedStream, VmError> {
    let vm = worker
        .vm(stream)
        .ok_or_else(|| VmError::Failed("the VM copy went away".into()))?;
    let context = vm.create_http_context_for(stream.root())?;
    // The copy's exports never change: looked up once per copy, kept in its host.
    let known = vm.host_as::<AtsHost>().and_then(|host| host.body_callbacks);
    let (request_body, response_body) = known.unwrap_or_else(|| {
        (
            vm.exports_callback("proxy_on_request_body"),
            vm.exports_callback("proxy_on_response_body"),
        )
    });
    let Some(host) = vm.host_as::<AtsHost>() else {
        return Ok(OpenedStream {
            context,
            name: config.display_name().into(),
            request_body,
            response_body,
        });
    };
    host.body_callbacks = Some((request_body, response_body));
    let name = Arc::clone(
        host.roots
            .entry(stream.root().0)
            .or_insert_with(|| config.display_name().into()),
    );
    let mut slot = StreamSlot::new(Arc::clone(&name), Holder::Transaction(cont));
    slot.info = info.clone();
    host.open_stream(context, slot);
    Ok(OpenedStream {
        context,
        name,
        request_body,
        response_body,
    })
}

impl Reply {
    /// Envoy's answer for a stream whose plugin failed closed: 503, no body, details naming
    /// the plugin.
    fn fail_closed(plugin: &str) -> Reply {
        Reply {
            status: 503,
            headers: Vec::new(),
            body: Vec::new(),
            details: Some(lifecycle::fail_stream_details(plugin)),
        }
    }

    /// The answer for a stream a plugin closed. Traffic Server's API cannot reset a client
    /// transaction: it gets a 503 and its connection is closed after it.
    fn closed() -> Reply {
        Reply {
            status: 503,
            headers: vec![(b"connection".to_vec(), b"close".to_vec())],
            body: Vec::new(),
            // Envoy resets such a stream: there are no details to follow.
            details: None,
        }
    }

    /// Envoy's answer for a request whose body passed the buffer limit before its headers went
    /// on.
    fn too_large() -> Reply {
        Reply {
            status: 413,
            headers: Vec::new(),
            body: b"Payload Too Large".to_vec(),
            details: Some("request_payload_too_large".into()),
        }
    }

    fn from_local(local: LocalResponse) -> Reply {
        Reply {
            // An informational or out-of-range status cannot end a transaction: 500, as Envoy
            // answers it.
            status: Some(local.status)
                .filter(|status| (200..=599).contains(status))
                .unwrap_or(500),
            headers: local
                .headers
                .iter()
                .map(|(name, value)| (name.to_vec(), value.to_vec()))
                .collect(),
            body: local.body,
            details: Some(String::from_utf8_lossy(&local.details).into_owned()),
        }
    }
}

/// The transaction's hooks after the request: send response header and close.
///
/// # Safety
/// Called by Traffic Server for a continuation made in [`start`], whose data is the boxed
/// transaction.
unsafe extern "C" fn on_transaction_event(
    cont: sys::TSCont,
    event: sys::TSEvent,
    data: *mut c_void,
) -> c_int {
    let txn = data as sys::TSHttpTxn;
    // SAFETY: the continuation's data is the transaction boxed in `start`, alive until the
    // close event below frees it.
    let transaction = unsafe { sys::TSContDataGet(cont) }.cast::<Transaction>();
    if transaction.is_null() {
        // SAFETY: the event's transaction.
        unsafe { reenable(txn, Next::Continue) };
        return 0;
    }
    match event {
        sys::TS_EVENT_HTTP_READ_RESPONSE_HDR | sys::TS_EVENT_HTTP_SEND_RESPONSE_HDR => {
            let next = guarded("the response hook", Next::Continue, || {
                // SAFETY: see above; nothing else holds the transaction while its hook runs.
                let transaction = unsafe { &mut *transaction };
                if interim_response(txn, event) {
                    // A 100 or 103 before the response: the plugins see the response itself.
                    return Next::Continue;
                }
                if transaction.response_from.is_some() {
                    if let (sys::TS_EVENT_HTTP_SEND_RESPONSE_HDR, Some(reply)) =
                        (event, &transaction.reply)
                    {
                        // A plugin ended the response in its body before any of it went out:
                        // Traffic Server's error path answers, with the plugin's reply.
                        put_on_response(txn, ResponseFrom::Client, reply.status, &reply.headers);
                    }
                    return Next::Continue;
                }
                transaction.response_from =
                    Some(if event == sys::TS_EVENT_HTTP_READ_RESPONSE_HDR {
                        ResponseFrom::Origin
                    } else {
                        ResponseFrom::Client
                    });
                let from = transaction.filters.len();
                transaction.response_headers(from)
            });
            // SAFETY: the borrow of the transaction ended with the closure.
            unsafe { reenable(txn, next) };
        }
        sys::TS_EVENT_HTTP_SEND_REQUEST_HDR => {
            // Only a transaction whose chunked request body the transform decodes has this
            // hook. Traffic Server frames the transformed body by the length the transform gave
            // (its Content-Length is set by now) but keeps the client's `Transfer-Encoding:
            // chunked`, which the origin would read the body by.
            guarded("the send request hook", Next::Continue, || {
                if let Some(mut request) = server_request(txn) {
                    without_chunked(&mut request);
                }
                Next::Continue
            });
            // SAFETY: the event's transaction.
            unsafe { reenable(txn, Next::Continue) };
        }
        sys::TS_EVENT_HTTP_CACHE_LOOKUP_COMPLETE => {
            guarded("the cache lookup hook", Next::Continue, || {
                // SAFETY: see above; nothing else holds the transaction while its hook runs.
                let transaction = unsafe { &*transaction };
                // A plugin holding the request headers decides after the body, which Traffic
                // Server reads only on its way to the origin (the request transform gates it),
                // so a response from the cache would go out unseen by the plugin: the
                // transaction is sent on as a miss while the hold lasts.
                if transaction.headers_held.is_some() {
                    let mut status = 0;
                    // SAFETY: the event's transaction, in its cache lookup hook.
                    let looked_up = unsafe { sys::TSHttpTxnCacheLookupStatusGet(txn, &mut status) };
                    let hit = status == sys::TS_CACHE_LOOKUP_HIT_FRESH as c_int
                        || status == sys::TS_CACHE_LOOKUP_HIT_STALE as c_int;
                    if looked_up == sys::TS_SUCCESS && hit {
                        diag::debug(
                            "a plugin holds the request headers: the cache hit goes as a miss",
                        );
                        // SAFETY: as above; a hit may be turned into a miss here.
                        unsafe {
                            sys::TSHttpTxnCacheLookupStatusSet(
                                txn,
                                sys::TS_CACHE_LOOKUP_MISS as c_int,
                            )
                        };
                    }
                }
                Next::Continue
            });
            // SAFETY: the event's transaction.
            unsafe { reenable(txn, Next::Continue) };
        }
        sys::TS_EVENT_HTTP_TXN_CLOSE => {
            // SAFETY: the box is taken back exactly once, here; Traffic Server calls no more
            // hooks of this continuation after the close.
            let transaction = unsafe { Box::from_raw(transaction) };
            // Transforms still open stop reaching the transaction, and are woken no more.
            transaction.link.set(std::ptr::null_mut());
            // SAFETY: the event's continuation; a plugin's slot still naming it finds no
            // transaction from now on (`act_on`).
            unsafe { sys::TSContDataSet(cont, std::ptr::null_mut()) };
            let slots_gone =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| transaction.close()))
                    .unwrap_or_else(|_| {
                        diag::error("the close hook panicked");
                        false
                    });
            if slots_gone {
                // SAFETY: no plugin's slot names the continuation any more, and Traffic Server
                // calls no more hooks of it after the close.
                unsafe { sys::TSContDestroy(cont) };
            } else {
                // A slot may still name it (and be acted on later): kept, without data, rather
                // than freed under it.
                diag::error(
                    "a transaction's plugin contexts could not all be ended: its continuation is \
                     kept",
                );
            }
            // SAFETY: the event's transaction.
            unsafe { reenable(txn, Next::Continue) };
        }
        _ => {
            // SAFETY: the event's transaction.
            unsafe { reenable(txn, Next::Continue) };
        }
    }
    0
}

/// A wake-up of a request transform (see [`Transaction::wake_request_transform`]): runs the
/// transform, if it and its transaction are still there, and goes.
///
/// # Safety
/// Called by Traffic Server for a continuation made there, whose data is a boxed link.
unsafe extern "C" fn on_wake(wake: sys::TSCont, _event: sys::TSEvent, _data: *mut c_void) -> c_int {
    // SAFETY: the data is the link boxed when the wake-up was scheduled; it runs once.
    let link = unsafe { Box::from_raw(sys::TSContDataGet(wake).cast::<TransactionLink>()) };
    // SAFETY: a one-shot continuation: nothing refers to it any more.
    unsafe { sys::TSContDestroy(wake) };
    let transaction = link.get();
    if transaction.is_null() {
        return 0;
    }
    // SAFETY: the transaction is open (its close clears the link) and runs on this thread; the
    // reference ends before the transform runs and reaches it again.
    let transform = unsafe {
        let transaction = &mut *transaction;
        transaction.wake_scheduled = false;
        transaction.request_transform
    };
    if let Some(transform) = transform {
        // SAFETY: the transform lives (its close clears `request_transform`), and this runs
        // under its mutex, as its own events do.
        unsafe { sys::TSContCall(transform, body::WAKE, std::ptr::null_mut()) };
    }
    0
}

/// The held transactions (and connections) of `vm`'s streams whose plugin has since
/// continued, answered or closed them (added to `out`).
pub(crate) fn pending_in(vm: &mut Vm, out: &mut Vec<Holder>) {
    // A VM that failed meanwhile (its callout's answer or tick trapped) answers for every
    // transaction it holds: they get the plugin's failure policy.
    let failed = vm.is_failed();
    let Some(host) = vm.host_as::<AtsHost>() else {
        return;
    };
    for slot in host.stream_slots() {
        let answered = slot.asked_to_end();
        // A transaction's plugin holding nothing that answers counts too: another plugin may
        // hold the transaction (see `Transaction::other_answer`). A connection acts on it at
        // its next event.
        let for_another_holder = answered && matches!(slot.holder, Holder::Transaction(_));
        if for_another_holder || (slot.held && (failed || slot.continued || answered)) {
            out.push(slot.holder);
        }
    }
}

/// What [`look_at_holds`] found still held.
pub(crate) struct Holds {
    /// Whether a transaction is still held in one of its hooks (its client is to be looked at
    /// again).
    pub(crate) in_hook: bool,
    /// When the next hold would pass the stream idle timeout.
    pub(crate) timeout_due: Option<Instant>,
}

/// Looks at every transaction of `vm` that its plugin holds (not yet continued, answered or
/// closed), as of `now`:
/// - with `look_at_clients`, one held in a hook whose client reset its connection is closed,
///   as if its plugin had closed it, so that it ends with its plugins' contexts at once:
///   Traffic Server does not tell a held hook that its client left (it ends such a transaction
///   only once the hook is let go). A client's FIN is not its leaving: an HTTP/1.1 client may
///   half-close after its request and wait for the answer, which Traffic Server allows. (Held
///   past the hooks, with its body streaming, Traffic Server meets a reset itself.)
/// - one held for `timeout` is answered 408, as Envoy's `stream_idle_timeout` does: without
///   it, a plugin that never continues would keep the transaction and its contexts for good.
///
/// The close or answer is the plugin's, as if it had asked for it, so [`pending_in`] then
/// picks the transaction up.
pub(crate) fn look_at_holds(
    vm: &mut Vm,
    now: Instant,
    timeout: Option<Duration>,
    look_at_clients: bool,
) -> Holds {
    let mut holds = Holds {
        in_hook: false,
        timeout_due: None,
    };
    let Some(host) = vm.host_as::<AtsHost>() else {
        return holds;
    };
    for slot in host.stream_slots_mut() {
        let Some(since) = slot
            .held_since
            .filter(|_| slot.held && !slot.asked_to_end())
        else {
            continue;
        };
        let client = match slot.holder {
            Holder::Transaction(cont) => held_client(cont),
            Holder::Connection(_) => None,
        };
        if let Some(fd) = client {
            if look_at_clients && crate::socket::reset(fd) {
                diag::debug(&format!(
                    "[{}] the client reset its connection while the plugin held the \
                     transaction: it ends",
                    slot.plugin
                ));
                slot.closed = true;
                continue;
            }
            holds.in_hook = true;
        }
        let Some(timeout) = timeout else {
            continue;
        };
        // A timeout too long to add to the clock never passes.
        let Some(due) = since.checked_add(timeout) else {
            continue;
        };
        if due > now {
            holds.timeout_due = Some(crate::ticker::earliest(holds.timeout_due, due));
            continue;
        }
        diag::error(&format!(
            "[{}] the plugin held the transaction for {} ms without continuing, answering or \
             closing it (the stream idle timeout): 408",
            slot.plugin,
            timeout.as_millis()
        ));
        slot.local_reply = Some(LocalResponse {
            status: 408,
            details: b"stream_idle_timeout".to_vec(),
            body: Vec::new(),
            headers: abi::HeaderMap::default(),
            grpc_status: None,
        });
    }
    holds
}

/// The client socket of the transaction of `cont` if a plugin holds it in one of its hooks;
/// `None` otherwise, or if it has none (Traffic Server's own transactions).
fn held_client(cont: sys::TSCont) -> Option<std::ffi::c_int> {
    // SAFETY: a transaction's continuation lives while a plugin's slot names it, and its data
    // is cleared by the close hook (see `act_on`), which runs on this thread.
    let transaction = unsafe { sys::TSContDataGet(cont) }.cast::<Transaction>();
    if transaction.is_null() {
        return None;
    }
    // SAFETY: as above; no hook of the transaction runs now (this runs on its thread).
    let (txn, in_hook) = unsafe { ((*transaction).txn, (*transaction).paused.is_some()) };
    if !in_hook {
        return None;
    }
    let mut fd: std::ffi::c_int = -1;
    // SAFETY: held in a hook, the transaction cannot end before it is let go; Traffic Server
    // writes the descriptor of its client session's connection to `fd` (or fails if that
    // connection is closed already).
    let found = unsafe { sys::TSHttpTxnClientFdGet(txn, &mut fd) } == sys::TS_SUCCESS;
    (found && fd >= 0).then_some(fd)
}

/// Picks up held transactions and connections after plugin code ran outside their hooks (see
/// [`pending_in`]). Called with no thread state borrowed: it reenables Traffic Server.
pub(crate) fn act_on(pending: Vec<Holder>) {
    let mut seen = rustc_hash::FxHashSet::default();
    for holder in pending {
        // A connection has a slot in each of its plugins: it is picked up once.
        if !seen.insert(holder) {
            continue;
        }
        let cont = match holder {
            Holder::Transaction(cont) => cont,
            Holder::Connection(cont) => {
                // SAFETY: taken from a slot on this thread just now (`pending_in`); a
                // connection's continuation outlives the slots that name it.
                unsafe { crate::connection::resume(cont) };
                continue;
            }
        };
        // SAFETY: a transaction's continuation lives while a plugin's slot names it: the close
        // hook clears its data, then frees it only once every slot is gone.
        let transaction = unsafe { sys::TSContDataGet(cont) }.cast::<Transaction>();
        if transaction.is_null() {
            continue;
        }
        let (txn, next) = {
            // SAFETY: as above; no hook of the transaction runs while it is held.
            let transaction = unsafe { &mut *transaction };
            // Held in a hook, Traffic Server waits for a reenable: after a panic, down the error
            // path (never on past its plugins). Held past its hooks (in the request transform),
            // it must get none: after a panic the transform refuses the request.
            let in_hook = transaction.paused.is_some();
            let next = guarded("resuming a transaction", Next::Reply, || {
                transaction.resume()
            });
            let next = match (in_hook, next) {
                (true, next) => next,
                (false, Next::Hold) => Next::Hold,
                (false, _) => {
                    transaction.refuse_request();
                    Next::Hold
                }
            };
            (transaction.txn, next)
        };
        // SAFETY: the transaction was held by this plugin until now; the borrow has ended.
        unsafe { reenable(txn, next) };
    }
}

/// What Traffic Server knows of a new transaction beyond its headers: its addresses,
/// connection, protocol and start.
fn stream_info(txn: sys::TSHttpTxn) -> abi::StreamInfo {
    // SAFETY: `txn` is the transaction of the hook being handled; the addresses Traffic Server
    // returns live as long as it.
    let (source, destination, connection, http2) = unsafe {
        let session = sys::TSHttpTxnSsnGet(txn);
        (
            socket_address(sys::TSHttpTxnClientAddrGet(txn)),
            socket_address(sys::TSHttpTxnIncomingAddrGet(txn)),
            (!session.is_null()).then(|| sys::TSHttpSsnIdGet(session)),
            !sys::TSHttpTxnClientProtocolStackContains(txn, c"h2".as_ptr()).is_null(),
        )
    };
    abi::StreamInfo {
        source_address: source,
        destination_address: destination,
        connection_id: connection.and_then(|id| u64::try_from(id).ok()),
        protocol: Some(if http2 { "HTTP/2" } else { "HTTP/1.1" }.to_string()),
        start_time: Some(std::time::SystemTime::now()),
        ..Default::default()
    }
}

/// A socket address Traffic Server handed out (IPv4 or IPv6), if any.
///
/// # Safety
/// `address` must be null or point at a `sockaddr` of its family's size.
pub(crate) unsafe fn socket_address(address: *const sys::sockaddr) -> Option<std::net::SocketAddr> {
    if address.is_null() {
        return None;
    }
    // SAFETY: the caller's promise; the family says which structure it is.
    unsafe {
        match i32::from((*address).sa_family) {
            libc::AF_INET => {
                let v4 = &*address.cast::<libc::sockaddr_in>();
                let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
                Some((ip, u16::from_be(v4.sin_port)).into())
            }
            libc::AF_INET6 => {
                let v6 = &*address.cast::<libc::sockaddr_in6>();
                let ip = std::net::Ipv6Addr::from(v6.sin6_addr.s6_addr);
                Some((ip, u16::from_be(v6.sin6_port)).into())
            }
            _ => None,
        }
    }
}

/// Records the response's status, why it is sent (`details`) and the upstream's address for
/// the plugin's attributes.
fn note_response(
    vm: &mut Vm,
    context: abi::ContextId,
    txn: sys::TSHttpTxn,
    status: u32,
    details: Option<&str>,
) {
    if let Some(slot) = slot_of(vm, context) {
        slot.info.response_code = Some(status);
        if slot.info.response_code_details.as_deref() != details {
            slot.info.response_code_details = details.map(str::to_string);
        }
        if slot.info.upstream_address.is_none() {
            // SAFETY: `txn` is held by the hook being handled.
            let upstream = unsafe { socket_address(sys::TSHttpTxnServerAddrGet(txn)) };
            slot.info.upstream_address = upstream.filter(|a| a.port() != 0);
        }
    }
}

/// Traffic Server's getters of a transaction's headers (`TSHttpTxnClientReqGet`, ...).
type HeaderGetter = unsafe extern "C" fn(
    sys::TSHttpTxn,
    *mut sys::TSMBuffer,
    *mut sys::TSMLoc,
) -> sys::TSReturnCode;

/// The header of `txn` that `get` reaches, if Traffic Server has it now.
fn txn_header(txn: sys::TSHttpTxn, get: HeaderGetter, kind: HeaderKind) -> Option<MimeHeaders> {
    let mut buffer: sys::TSMBuffer = std::ptr::null_mut();
    let mut header: sys::TSMLoc = std::ptr::null_mut();
    // SAFETY: `txn` is a transaction held by this plugin and `get` one of Traffic Server's
    // header getters; the handles returned belong to the transaction and stay valid while it
    // is held.
    unsafe {
        let found = get(txn, &mut buffer, &mut header);
        (found == sys::TS_SUCCESS && !buffer.is_null() && !header.is_null())
            .then(|| MimeHeaders::new(buffer, header, kind))
    }
}

/// A transaction's client request or response header, if Traffic Server has it now.
fn client_header(txn: sys::TSHttpTxn, kind: HeaderKind) -> Option<MimeHeaders> {
    let get: HeaderGetter = match kind {
        HeaderKind::Request => sys::TSHttpTxnClientReqGet,
        HeaderKind::Response => sys::TSHttpTxnClientRespGet,
    };
    txn_header(txn, get, kind)
}

/// The codings a `Transfer-Encoding` value lists, trimmed, empty ones left out.
fn codings(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&byte| byte == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty())
}

/// Takes `chunked` out of a request's `Transfer-Encoding`, keeping its other codings (e.g.
/// `gzip` of `gzip, chunked`); the header goes when nothing is left.
fn without_chunked(request: &mut MimeHeaders) {
    use abi::Headers as _;
    let Some(value) = request.get(b"transfer-encoding").map(<[u8]>::to_vec) else {
        return;
    };
    let kept: Vec<&[u8]> = codings(&value)
        .filter(|coding| !coding.eq_ignore_ascii_case(b"chunked"))
        .collect();
    if kept.is_empty() {
        request.remove(b"transfer-encoding");
    } else {
        request.replace(b"transfer-encoding", &kept.join(&b", "[..]));
    }
}

/// The request Traffic Server sends to the origin, once it has one.
fn server_request(txn: sys::TSHttpTxn) -> Option<MimeHeaders> {
    txn_header(txn, sys::TSHttpTxnServerReqGet, HeaderKind::Request)
}

/// The request header of a transaction that went on, as it stands (see
/// [`StreamSlot::follow_request`]).
pub(crate) fn current_request(txn: sys::TSHttpTxn) -> Option<MimeHeaders> {
    request_header(txn, Stage::Body)
}

/// The request header the request callbacks see at `stage`: the client's in the hook; once the
/// transaction went on, the origin's (built from the client's by then; what a plugin changes
/// there reaches the origin), or the client's while Traffic Server has none.
fn request_header(txn: sys::TSHttpTxn, stage: Stage) -> Option<MimeHeaders> {
    match stage {
        Stage::Hook => client_header(txn, HeaderKind::Request),
        Stage::Body => server_request(txn).or_else(|| client_header(txn, HeaderKind::Request)),
    }
}

/// Sets a reply's status and headers on the response the callbacks see.
fn put_on_response(
    txn: sys::TSHttpTxn,
    from: ResponseFrom,
    status: u32,
    headers: &[(Vec<u8>, Vec<u8>)],
) {
    if let Some(mut response) = response_header(txn, from) {
        // Traffic Server 9.2 turns a reply sent down the error path into a 500 unless the
        // status is set again as the response header goes out.
        response.set_status(status);
        // Each name's first value replaces the response's, the others are added to it.
        for (index, (name, value)) in headers.iter().enumerate() {
            let first = !headers[..index]
                .iter()
                .any(|(earlier, _)| earlier.eq_ignore_ascii_case(name));
            match first {
                true => abi::Headers::replace(&mut response, name, value),
                false => abi::Headers::add(&mut response, name, value),
            }
        }
    }
}

/// The response header the response callbacks see (see [`ResponseFrom`]).
fn response_header(txn: sys::TSHttpTxn, from: ResponseFrom) -> Option<MimeHeaders> {
    match from {
        ResponseFrom::Client => client_header(txn, HeaderKind::Response),
        ResponseFrom::Origin => txn_header(txn, sys::TSHttpTxnServerRespGet, HeaderKind::Response),
    }
}

/// What the origin's response says of its body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OriginBody {
    /// None comes, whatever `Content-Length` says (the request was a `HEAD`, or the status
    /// is 1xx, 204 or 304).
    None,
    /// Its `Content-Length`.
    Length(u64),
    /// It runs until its framing or its connection ends (chunked, or no length).
    UntilItsEnd,
}

/// What the origin's response to `txn` says of its body (held in its read-response-header
/// hook).
pub(crate) fn origin_response_body(txn: sys::TSHttpTxn) -> OriginBody {
    use abi::Headers as _;
    let Some(response) = txn_header(txn, sys::TSHttpTxnServerRespGet, HeaderKind::Response) else {
        return OriginBody::UntilItsEnd;
    };
    if is_head(txn) || bodiless_status(response.status()) {
        return OriginBody::None;
    }
    if response.get(b"transfer-encoding").is_some() {
        return OriginBody::UntilItsEnd;
    }
    content_length(&response).map_or(OriginBody::UntilItsEnd, OriginBody::Length)
}

/// Whether a response of `status` never has a body.
pub(crate) fn bodiless_status(status: u32) -> bool {
    matches!(status, 100..=199 | 204 | 304)
}

/// The length a header's `Content-Length` gives, if it has one that reads as a length.
fn content_length(headers: &MimeHeaders) -> Option<u64> {
    abi::Headers::get(headers, b"content-length")
        .and_then(|value| std::str::from_utf8(value).ok()?.trim().parse::<u64>().ok())
}

/// Whether a header announces no body: no `Content-Length` above 0 and no `Transfer-Encoding`
/// (for a response also: a status that never has one).
fn ends_stream(headers: &MimeHeaders, kind: HeaderKind) -> bool {
    use abi::Headers as _;
    if kind == HeaderKind::Response && bodiless_status(headers.status()) {
        return true;
    }
    match (kind, content_length(headers)) {
        (_, Some(length)) => length == 0 && headers.get(b"transfer-encoding").is_none(),
        // A request without either has no body; a response's runs until the connection
        // closes (RFC 9112, 6.3).
        (HeaderKind::Request, None) => headers.get(b"transfer-encoding").is_none(),
        (HeaderKind::Response, None) => false,
    }
}

/// Whether the response of the response hook `event` (the origin's being read, or the one
/// going to the client) is an interim one (1xx other than 101, which switches protocols and is
/// the response).
fn interim_response(txn: sys::TSHttpTxn, event: sys::TSEvent) -> bool {
    let response = match event {
        sys::TS_EVENT_HTTP_READ_RESPONSE_HDR => {
            txn_header(txn, sys::TSHttpTxnServerRespGet, HeaderKind::Response)
        }
        _ => client_header(txn, HeaderKind::Response),
    };
    response.is_some_and(|response| matches!(response.status(), 100 | 102..=199))
}

/// Whether the client's request is a `HEAD`, whose response has no body whatever its headers
/// say.
fn is_head(txn: sys::TSHttpTxn) -> bool {
    client_header(txn, HeaderKind::Request)
        .is_some_and(|request| abi::Headers::get(&request, b":method") == Some(&b"HEAD"[..]))
}

/// Whether the client's request is a WebSocket upgrade as Traffic Server takes one (`GET`,
/// `Upgrade: websocket`, `Connection: upgrade`, a `Sec-WebSocket-Key` and
/// `Sec-WebSocket-Version: 13`; a request with only some of these stays ordinary HTTP, whose
/// response body the plugins get). Traffic Server's own flag (`TSHttpTxnIsWebsocket`) is not
/// set yet in the read-request-header hook. Traffic Server tunnels the bytes after the
/// upstream's 101 past any transform, and a response transform on the 101 breaks the switch
/// (Traffic Server then sends the 101 as an empty response and closes the connection), so such
/// a transaction has none: its plugins see the upgrade request and the 101, each ending at its
/// headers.
fn asks_for_websocket(txn: sys::TSHttpTxn) -> bool {
    let Some(request) = client_header(txn, HeaderKind::Request) else {
        return false;
    };
    // Nearly every request has no `Upgrade`: one lookup, not a walk of every field.
    if abi::Headers::get(&request, b"upgrade").is_none() {
        return false;
    }
    let (mut websocket, mut upgrade, mut key, mut version) = (false, false, false, false);
    let mut get = false;
    abi::Headers::for_each(&request, &mut |name, value| {
        let mut tokens = value.split(|byte| *byte == b',').map(<[u8]>::trim_ascii);
        match name {
            b":method" => get = value == b"GET",
            b"upgrade" => websocket |= tokens.any(|token| token.eq_ignore_ascii_case(b"websocket")),
            b"connection" => upgrade |= tokens.any(|token| token.eq_ignore_ascii_case(b"upgrade")),
            b"sec-websocket-key" => key = true,
            b"sec-websocket-version" => version = value.trim_ascii() == b"13",
            _ => {}
        }
    });
    get && websocket && upgrade && key && version
}

/// The header that frames a request's body (`Content-Length` or `Transfer-Encoding`) and its
/// value, if there is one.
fn framing_of(headers: &MimeHeaders) -> Option<(Vec<u8>, Vec<u8>)> {
    // Transfer-Encoding first: it frames the body when both came (RFC 9112, 6.3).
    [&b"transfer-encoding"[..], b"content-length"]
        .into_iter()
        .find_map(|name| {
            abi::Headers::get(headers, name).map(|value| (name.to_vec(), value.to_vec()))
        })
}

/// What the plugin asked for its stream since the last look.
#[derive(Default)]
struct Requests {
    local_reply: Option<LocalResponse>,
    continued: bool,
    closed: bool,
}

/// The slot of the plugin's stream `context` in the copy's host.
fn slot_of(vm: &mut Vm, context: abi::ContextId) -> Option<&mut StreamSlot> {
    vm.host_as::<AtsHost>()?.stream_mut(context)
}

/// Takes what the plugin asked for its stream `context` (and ends a hold on it).
fn take_requests(vm: &mut Vm, context: abi::ContextId) -> Requests {
    match slot_of(vm, context) {
        Some(slot) => {
            slot.release();
            take_asked(slot)
        }
        None => Requests::default(),
    }
}

/// Takes what the plugin asked for its stream `context` during a body callback: a hold of a
/// header phase, if any, stays.
fn take_body_requests(vm: &mut Vm, context: abi::ContextId) -> Requests {
    slot_of(vm, context).map(take_asked).unwrap_or_default()
}

fn take_asked(slot: &mut StreamSlot) -> Requests {
    Requests {
        local_reply: slot.local_reply.take(),
        continued: std::mem::take(&mut slot.continued),
        closed: std::mem::take(&mut slot.closed),
    }
}

/// Lends a body to the plugin's slot (`None` takes it back and returns it).
fn lend_body(vm: &mut Vm, context: abi::ContextId, body: Option<Vec<u8>>) -> Option<Vec<u8>> {
    let slot = slot_of(vm, context)?;
    std::mem::replace(&mut slot.body, body)
}

/// Marks the plugin's stream as held (waiting for the plugin).
fn hold(vm: &mut Vm, context: abi::ContextId) {
    if let Some(slot) = slot_of(vm, context) {
        slot.hold();
    }
}

/// Has the plugin's slot follow the transaction's request header while the plugin holds it
/// past the hook (`None` ends that).
fn follow_request(vm: &mut Vm, context: abi::ContextId, txn: Option<sys::TSHttpTxn>) {
    if let Some(slot) = slot_of(vm, context) {
        slot.follow_request = txn;
    }
}

/// Lends the headers to the plugin's slot in the copy's host (`None` takes them back).
fn lend(
    vm: &mut Vm,
    context: abi::ContextId,
    request: Option<MimeHeaders>,
    response: Option<MimeHeaders>,
) {
    if let Some(slot) = slot_of(vm, context) {
        slot.request = request;
        slot.response = response;
    }
}

/// The reply a plugin holding the request headers asked for in its body callback (or closing
/// the stream), or its failure policy's: fail closed answers, fail open bypasses it (its
/// headers then go on).
fn held_answer(
    worker: &mut Worker,
    (plugin, name): (PluginId, &str),
    bypassed: &mut bool,
    result: &Result<abi::DataAction, VmError>,
    asked: &mut Requests,
) -> Option<Reply> {
    if let Some(local) = asked.local_reply.take() {
        return Some(Reply::from_local(local));
    }
    if asked.closed {
        return Some(Reply::closed());
    }
    if let Err(error) = result {
        diag::error(&format!("[{name}] {error}"));
        match crate::plugin_failed(worker, plugin, error) {
            OnFailure::FailClosed => return Some(Reply::fail_closed(name)),
            OnFailure::FailOpen => *bypassed = true,
        }
    }
    None
}

/// The reply for a transaction its plugin `name` held: the one it asked for, Envoy's for a
/// closed stream, or its failure policy's (fail closed) when its VM failed meanwhile.
fn held_reply(
    name: &str,
    local_reply: Option<LocalResponse>,
    closed: bool,
    failure: Option<OnFailure>,
) -> Option<Reply> {
    match (local_reply, closed, failure) {
        (_, _, Some(OnFailure::FailClosed)) => Some(Reply::fail_closed(name)),
        (Some(local), _, _) => Some(Reply::from_local(local)),
        (None, true, _) => Some(Reply::closed()),
        (None, false, _) => None,
    }
}

/// What one header callback came to.
enum Outcome {
    Continue,
    Hold,
    Reply(Reply),
}

/// Turns a header callback's result and the plugin's requests into what happens next, applying
/// the plugin's failure policy to an error.
fn outcome(
    worker: &mut Worker,
    filter: &mut Filter,
    result: Result<HeadersAction, VmError>,
    asked: Requests,
) -> Outcome {
    if let Some(local) = asked.local_reply {
        return Outcome::Reply(Reply::from_local(local));
    }
    if asked.closed {
        return Outcome::Reply(Reply::closed());
    }
    match result {
        Ok(HeadersAction::Continue) => Outcome::Continue,
        Ok(_) if asked.continued => Outcome::Continue,
        Ok(_) => Outcome::Hold,
        Err(error) => {
            diag::error(&format!("[{}] {error}", filter.name));
            match crate::plugin_failed(worker, filter.plugin, &error) {
                OnFailure::FailClosed => Outcome::Reply(Reply::fail_closed(&filter.name)),
                OnFailure::FailOpen => {
                    filter.bypassed = true;
                    Outcome::Continue
                }
            }
        }
    }
}

impl Transaction {
    /// `proxy_on_request_headers` of the plugins from filter `from` on, in order, until one
    /// replies or holds. In the hook (`Stage::Hook`) a plugin that stops everything holds the
    /// transaction there (`Next::Hold`), and one that holds the headers only, with a body
    /// coming, lets it go on with its headers held ([`Transaction::headers_held`]); once the
    /// transaction went on (`Stage::Body`) every pause is such a hold, and the plugins see the
    /// origin's request header, which Traffic Server has built by then.
    fn request_headers(&mut self, from: usize, stage: Stage) -> Next {
        let txn = self.txn;
        let body_comes = stage == Stage::Body
            || (self.wants_request_body
                && client_header(txn, HeaderKind::Request)
                    .is_some_and(|headers| !ends_stream(&headers, HeaderKind::Request)));
        let filters = &mut self.filters;
        let mut reply = None;
        let mut paused = None;
        let mut held = None;
        in_worker(self.thread, self.generation, "a transaction", |worker| {
            for (index, filter) in filters.iter_mut().enumerate().skip(from) {
                let Some(stream) = filter.stream.as_ref().filter(|_| !filter.bypassed) else {
                    continue;
                };
                let Some(vm) = worker.vm(stream) else {
                    continue;
                };
                let Some(headers) = request_header(txn, stage) else {
                    return;
                };
                let count = abi::Headers::len(&headers);
                let end_of_stream =
                    stage == Stage::Hook && ends_stream(&headers, HeaderKind::Request);
                lend(vm, filter.context, Some(headers), None);
                let result = vm.on_request_headers(filter.context, count, end_of_stream);
                let asked = take_requests(vm, filter.context);
                let headers_only =
                    matches!(result, Ok(HeadersAction::Pause)) && filter.request_body_callback;
                match outcome(worker, filter, result, asked) {
                    Outcome::Continue => {}
                    Outcome::Hold => {
                        if let Some(vm) = filter.stream.as_ref().and_then(|s| worker.vm(s)) {
                            hold(vm, filter.context);
                        }
                        if stage == Stage::Hook && !(headers_only && body_comes) {
                            paused = Some(Pause::Request(index));
                        } else {
                            held = Some(HeaderHold {
                                filter: index,
                                body_to_holder: headers_only,
                            });
                        }
                        return;
                    }
                    Outcome::Reply(answer) => {
                        reply = Some(answer);
                        return;
                    }
                }
            }
        });
        if let Some(pause) = paused {
            self.paused = Some(pause);
            return Next::Hold;
        }
        self.headers_held = held;
        self.unlend();
        if stage == Stage::Body
            && request_header(txn, stage).is_some_and(|headers| framing_of(&headers).is_none())
        {
            // As in the hook: a plugin that drops the framing header will change the body's
            // length, which then goes to the origin once known.
            self.request_framing_dropped = true;
        }
        if stage == Stage::Hook {
            if let (Some((name, value)), Some(mut headers)) = (
                &self.client_framing,
                client_header(txn, HeaderKind::Request),
            ) {
                // A plugin that drops Content-Length (because it will change the body) speaks
                // for the upstream request; Traffic Server still needs it to read the client's
                // body, and the request transform frames the changed body to the origin
                // (`body`).
                if framing_of(&headers).is_none() {
                    self.request_framing_dropped = true;
                    abi::Headers::add(&mut headers, name, value);
                }
            }
        }
        match reply {
            Some(reply) => {
                self.reply = Some(reply);
                Next::Reply
            }
            None => Next::Continue,
        }
    }

    /// `proxy_on_response_headers` of the plugins before filter `until`, in reverse order; a
    /// reply's status and headers are put on the response first.
    fn response_headers(&mut self, until: usize) -> Next {
        let txn = self.txn;
        let from = self.response_from.unwrap_or(ResponseFrom::Client);
        if until == self.filters.len() {
            if let Some(reply) = &self.reply {
                put_on_response(txn, from, reply.status, &reply.headers);
            }
        }
        // Envoy's details: a reply's own, `via_upstream` for the origin's response; Traffic
        // Server's own answers (an unreachable origin, ...) have none to follow.
        let details = match (&self.reply, from) {
            (Some(reply), _) => reply.details.as_deref(),
            (None, ResponseFrom::Origin) => Some("via_upstream"),
            (None, ResponseFrom::Client) => None,
        };
        let head = is_head(txn);
        let filters = &mut self.filters;
        let mut paused = None;
        let mut replied = None;
        let mut ended_at_headers = None;
        in_worker(self.thread, self.generation, "a transaction", |worker| {
            for (index, filter) in filters.iter_mut().enumerate().take(until).rev() {
                let Some(stream) = filter.stream.as_ref().filter(|_| !filter.bypassed) else {
                    continue;
                };
                let Some(vm) = worker.vm(stream) else {
                    continue;
                };
                let Some(headers) = response_header(txn, from) else {
                    return;
                };
                let count = abi::Headers::len(&headers);
                let end_of_stream = head || ends_stream(&headers, HeaderKind::Response);
                ended_at_headers = Some(end_of_stream);
                // Only a continue asked in this callback counts for it (one asked earlier,
                // with nothing held, is spent).
                if let Some(slot) = slot_of(vm, filter.context) {
                    slot.continued = false;
                }
                note_response(vm, filter.context, txn, headers.status(), details);
                let request = client_header(txn, HeaderKind::Request);
                lend(vm, filter.context, request, Some(headers));
                let result = vm.on_response_headers(filter.context, count, end_of_stream);
                let asked = take_requests(vm, filter.context);
                match outcome(worker, filter, result, asked) {
                    Outcome::Continue => {}
                    Outcome::Hold => {
                        if let Some(vm) = filter.stream.as_ref().and_then(|s| worker.vm(s)) {
                            hold(vm, filter.context);
                        }
                        paused = Some(Pause::Response(index));
                        return;
                    }
                    Outcome::Reply(answer) => {
                        // The reply's status and headers replace the response's before the
                        // plugins after it see the response; its body goes out once they did
                        // (see `answer_response`).
                        if let Some(vm) = filter.stream.as_ref().and_then(|s| worker.vm(s)) {
                            lend(vm, filter.context, None, None);
                        }
                        put_on_response(txn, from, answer.status, &answer.headers);
                        replied = Some(answer);
                        // As Envoy sends a reply made while the response goes through the
                        // plugins straight to the client: the plugins after it do not see it.
                        return;
                    }
                }
            }
        });
        if let Some(ended) = ended_at_headers {
            self.response_ended_at_headers = ended;
        }
        if let Some(pause) = paused {
            self.paused = Some(pause);
            return Next::Hold;
        }
        self.unlend();
        match replied {
            Some(reply) => self.answer_response(reply),
            None => Next::Continue,
        }
    }

    /// A plugin answered (or failed closed) in its response headers callback, or while it or
    /// another held the response there: the origin's response goes down Traffic Server's error
    /// path instead, so its body never reaches the client (a failing plugin guarding it must
    /// not leak it) and the reply's body goes out; the reply's status and headers are put on
    /// the error response's header as it goes out. As in Envoy, which sends such a reply
    /// straight to the client, the plugins that had not seen the response yet do not see it.
    /// Traffic Server's own responses and replies (no origin's) keep their bodies, with the
    /// reply's status and headers.
    fn answer_response(&mut self, reply: Reply) -> Next {
        // No plugin sees the body that goes out (the error response's is the reply's; Traffic
        // Server's own goes with the reply's status), as none sees what Envoy sends straight
        // to the client.
        self.response_ended_at_headers = true;
        if self.response_from != Some(ResponseFrom::Origin) {
            return Next::Continue;
        }
        self.reply = Some(reply);
        self.send_reply_body();
        Next::Reply
    }

    /// Runs a body chunk through the plugins (the request body in order, the response body in
    /// reverse) and returns what goes on. A plugin that buffers (`StopIterationAndBuffer`)
    /// keeps the bytes and the plugins after it see nothing until it lets them through; at the
    /// end of the stream whatever is buffered goes on (Traffic Server cannot hold a body once
    /// its end came), except for a request none of which went out yet: a plugin holding its
    /// headers, or stopping at its body's end while no plugin holds the headers (one hold at a
    /// time), keeps it until it continues (the request transform waits for it). A reply from a
    /// body callback before any of the request went out refuses the request.
    pub(crate) fn body_chunk(
        &mut self,
        direction: Direction,
        chunk: Vec<u8>,
        end_of_stream: bool,
    ) -> Vec<u8> {
        if direction == Direction::Request && end_of_stream {
            self.request_body_ended = true;
        }
        if let (Direction::Request, Some(hold)) = (direction, self.headers_held) {
            // The client's data is activity, whichever plugin it reaches: the hold's stream
            // idle timeout starts again (as Envoy's does with every chunk).
            self.with_slot(hold.filter, |slot| {
                slot.held_since = slot.held_since.map(|_| Instant::now());
            });
        }
        if direction == Direction::Response && self.response_ended_at_headers {
            // No body follows such headers (a 204, a 304, an answer to HEAD, a declared empty
            // one), or a reply replaced the response: what Traffic Server still passes through
            // the transform goes on, and no plugin sees it (Envoy calls no body callback then).
            // What plugins kept of a body they saw before (a cached body passes the transform
            // before the send-response-header hook) goes first.
            let mut kept = self.release_body(Direction::Response, true);
            kept.extend_from_slice(&chunk);
            return kept;
        }
        self.body_from(direction, 0, chunk, end_of_stream)
    }

    /// Runs `data` through the plugins from position `start` of the body's order on; a holder
    /// of the request headers letting them go on the way has the plugins after it get them
    /// first.
    fn body_from(
        &mut self,
        direction: Direction,
        mut start: usize,
        mut data: Vec<u8>,
        end_of_stream: bool,
    ) -> Vec<u8> {
        loop {
            if data.is_empty() && !end_of_stream {
                return data;
            }
            match self.body_through(direction, start, data, end_of_stream) {
                BodyStep::Through(data) => return data,
                BodyStep::HeadersLetGo { holder, data: rest } => {
                    self.headers_held = None;
                    if self.request_headers(holder + 1, Stage::Body) == Next::Reply {
                        self.answer_during_body(None);
                        return Vec::new();
                    }
                    start = holder + 1;
                    data = rest;
                }
            }
        }
    }

    /// [`Transaction::body_from`] up to a holder of the request headers letting them go.
    fn body_through(
        &mut self,
        direction: Direction,
        start: usize,
        chunk: Vec<u8>,
        end_of_stream: bool,
    ) -> BodyStep {
        let order = self.body_order(direction);
        let txn = self.txn;
        let hold = match direction {
            Direction::Request => self.headers_held,
            Direction::Response => None,
        };
        let filters = &mut self.filters;
        let cut = match direction {
            Direction::Request => &mut self.body_cut[0],
            Direction::Response => &mut self.body_cut[1],
        };
        if *cut {
            return BodyStep::Through(Vec::new());
        }
        let mut data = chunk;
        let mut let_go = None;
        let mut reply = None;
        let mut answered_by = None;
        // A reply for a response whose body a plugin ended (it goes out if the response did
        // not begin: Traffic Server sends its error path's response then).
        let mut late_reply = None;
        let mut held_body = None;
        // None of the request went out: a plugin's reply still refuses it, unseen by the
        // origin, whoever holds it meanwhile.
        let may_answer = direction == Direction::Request && !self.request_output_open;
        // One hold at a time: with the headers held by a plugin after it, a plugin's stop at the
        // body's end lets the body go on to the holder, as before.
        let may_hold_body = may_answer && self.headers_held.is_none();
        let limit = crate::buffer_limit_bytes();
        let ran = in_worker(self.thread, self.generation, "a transaction", |worker| {
            for index in order.into_iter().skip(start) {
                let filter = &mut filters[index];
                let Some(stream) = filter.stream.as_ref().filter(|_| !filter.bypassed) else {
                    continue;
                };
                let Some(vm) = worker.vm(stream) else {
                    continue;
                };
                let holding = hold.filter(|hold| hold.filter == index);
                if *filter.over_limit(direction) {
                    continue;
                }
                let mut buffer = std::mem::take(filter.buffered(direction));
                if buffer.len().saturating_add(data.len()) > limit {
                    if holding.is_some() {
                        // The headers have not gone on: Envoy's answer to a request body
                        // past the buffer limit before that.
                        diag::error(&format!(
                            "[{}] the plugin holds the request headers with more than {limit} \
                             bytes of the body: the request is answered 413",
                            filter.name
                        ));
                        reply = Some(Reply::too_large());
                        *cut = true;
                        return;
                    }
                    diag::error(&format!(
                        "[{}] the plugin kept more than {limit} bytes of the {} body buffered: \
                         the body goes on past it unchanged",
                        filter.name,
                        direction.name()
                    ));
                    *filter.over_limit(direction) = true;
                    // What it kept and this chunk go on to the plugins after it, in order.
                    buffer.append(&mut data);
                    data = buffer;
                    continue;
                }
                buffer.append(&mut data);
                if holding.is_some_and(|hold| !hold.body_to_holder) {
                    // Stopped on its headers without `allow_on_headers_stop_iteration`: no body
                    // callback until it continues.
                    *filter.buffered(direction) = buffer;
                    return;
                }
                let size = buffer.len();
                if holding.is_none() {
                    // Only a continue asked in this callback counts for it (an older one, from
                    // a callout's answer while nothing was held, is spent).
                    if let Some(slot) = slot_of(vm, filter.context) {
                        slot.continued = false;
                    }
                }
                lend_body(vm, filter.context, Some(buffer));
                if holding.is_some() {
                    // It holds the headers: it may read and change them meanwhile.
                    lend(vm, filter.context, request_header(txn, Stage::Body), None);
                }
                let result = match direction {
                    Direction::Request => vm.on_request_body(filter.context, size, end_of_stream),
                    Direction::Response => vm.on_response_body(filter.context, size, end_of_stream),
                };
                if holding.is_some() {
                    lend(vm, filter.context, None, None);
                }
                let buffer = lend_body(vm, filter.context, None).unwrap_or_default();
                let mut asked = take_body_requests(vm, filter.context);
                if holding.is_some() {
                    let answer = held_answer(
                        worker,
                        (filter.plugin, &filter.name),
                        &mut filter.bypassed,
                        &result,
                        &mut asked,
                    );
                    let lets_go =
                        matches!(result, Ok(abi::DataAction::Continue) | Err(_)) || asked.continued;
                    if answer.is_some() || lets_go {
                        // Its hold ends: no callout's answer is waited for any more.
                        let slot = (filter.stream.as_ref())
                            .and_then(|stream| worker.vm(stream))
                            .and_then(|vm| slot_of(vm, filter.context));
                        if let Some(slot) = slot {
                            slot.release();
                        }
                    }
                    if let Some(answer) = answer {
                        reply = Some(answer);
                        *cut = true;
                        return;
                    }
                    if lets_go {
                        // Its headers go on, and the plugins after it get them before this
                        // chunk (with what it kept before).
                        let_go = Some((index, buffer));
                        return;
                    }
                    if !matches!(result, Ok(abi::DataAction::StopNoBuffer)) {
                        // Kept, even at the body's end: the request waits for it.
                        *filter.buffered(direction) = buffer;
                    }
                    return;
                }
                if asked.local_reply.is_some() || asked.closed {
                    let answer =
                        held_reply(&filter.name, asked.local_reply.take(), asked.closed, None);
                    if may_answer {
                        // None of the request went out: it ends here, unseen by the origin
                        // (see `answer_during_body`).
                        reply = answer;
                        answered_by = Some(index);
                    } else {
                        // Some of the request went out, or this is the response: the body
                        // stops here and the transform ends the transaction (`body::fail`);
                        // a response not begun yet is answered with the reply.
                        diag::error(&format!(
                            "[{}] the plugin answered or closed the stream during its {} body, \
                             once some of it went on: the transaction is ended",
                            filter.name,
                            direction.name()
                        ));
                        late_reply = answer.filter(|_| direction == Direction::Response);
                    }
                    *cut = true;
                    return;
                }
                match result {
                    Ok(abi::DataAction::Continue) => data = buffer,
                    Ok(stop) if end_of_stream && may_hold_body && !asked.continued => {
                        // Stopped at the body's end before the request went out: held there
                        // until it continues (what it kept stays with it).
                        if stop != abi::DataAction::StopNoBuffer {
                            *filter.buffered(direction) = buffer;
                        }
                        if let Some(slot) = slot_of(vm, filter.context) {
                            slot.hold();
                        }
                        held_body = Some(index);
                        return;
                    }
                    Ok(_) if end_of_stream => data = buffer,
                    // Stopped without buffering: the bytes are not kept for the plugin.
                    Ok(abi::DataAction::StopNoBuffer) => return,
                    Ok(_) => {
                        *filter.buffered(direction) = buffer;
                        return;
                    }
                    Err(error) => {
                        diag::error(&format!("[{}] {error}", filter.name));
                        // The headers are gone: failing closed ends the body here (the request
                        // transform refuses a request the origin has not seen, or ends the
                        // transaction: `body::fail`).
                        if crate::plugin_failed(worker, filter.plugin, &error)
                            == OnFailure::FailOpen
                        {
                            filter.bypassed = true;
                            data = buffer;
                        } else {
                            // A response not begun yet gets the plugin's 503 instead.
                            if direction == Direction::Response {
                                late_reply = Some(Reply::fail_closed(&filter.name));
                            }
                            *cut = true;
                            return;
                        }
                    }
                }
            }
        });
        if let Some(reply) = reply {
            self.reply = Some(reply);
            self.answer_during_body(answered_by);
            return BodyStep::Through(Vec::new());
        }
        if let Some(reply) = late_reply {
            self.reply = Some(reply);
            self.send_reply_body();
            return BodyStep::Through(Vec::new());
        }
        if held_body.is_some() {
            self.body_held = held_body;
        }
        if let Some((holder, data)) = let_go {
            return BodyStep::HeadersLetGo { holder, data };
        }
        if ran.is_none() {
            // The plugins cannot be reached: the body goes on as it came.
            return BodyStep::Through(data);
        }
        // A plugin that kept or dropped it, or failing closed, took `data` with it.
        BodyStep::Through(data)
    }

    /// The order `direction`'s body goes through the filters: the request's in order, the
    /// response's in reverse.
    fn body_order(&self, direction: Direction) -> Vec<usize> {
        match direction {
            Direction::Request => (0..self.filters.len()).collect(),
            Direction::Response => (0..self.filters.len()).rev().collect(),
        }
    }

    /// Whether a plugin failing closed ended `direction`'s body: nothing more of it goes on.
    pub(crate) fn body_cut(&self, direction: Direction) -> bool {
        match direction {
            Direction::Request => self.body_cut[0],
            Direction::Response => self.body_cut[1],
        }
    }

    /// Whether the request body is withheld from the origin until its length is known: a
    /// plugin dropped its framing header, so it may change the body's length, and Traffic
    /// Server sends a transformed request body framed by the length the transform gives first.
    pub(crate) fn request_body_withheld(&self) -> bool {
        self.request_framing_dropped || self.headers_held.is_some()
    }

    /// Whether some plugin keeps request body bytes buffered.
    pub(crate) fn request_body_kept(&self) -> bool {
        self.filters
            .iter()
            .any(|filter| !filter.request_body.is_empty())
    }

    /// Whether a plugin holds the request (its headers, or its body at its end): the request
    /// transform sends nothing yet, not even at the body's end.
    pub(crate) fn request_held(&self) -> bool {
        self.headers_held.is_some() || self.body_held.is_some()
    }

    /// The request transform tells whether it began sending the request.
    pub(crate) fn set_request_output_open(&mut self, open: bool) {
        self.request_output_open = open;
    }

    /// What the plugins let through since a hold on the request ended outside the request
    /// transform, for the transform to send.
    pub(crate) fn take_released_request_body(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.released_request_body)
    }

    /// Puts bytes the plugins let through before a hold began ahead of what it will release.
    pub(crate) fn put_released_request_body_first(&mut self, mut earlier: Vec<u8>) {
        earlier.append(&mut self.released_request_body);
        self.released_request_body = earlier;
    }

    /// The request transform closed: it is woken up no more.
    pub(crate) fn request_transform_closed(&mut self) {
        self.request_transform = None;
    }

    /// Has the request transform run again soon, on the transaction's thread, to send what a
    /// hold's end released or to refuse the request. A one-shot continuation of its own does
    /// it (see [`on_wake`]): one that finds the transaction or its transform gone does
    /// nothing, so nothing scheduled ever needs cancelling.
    fn wake_request_transform(&mut self) {
        let Some(transform) = self.request_transform else {
            return;
        };
        if self.wake_scheduled {
            return;
        }
        self.wake_scheduled = true;
        // SAFETY: the continuation shares the transform's mutex (so Traffic Server holds it
        // when the wake-up runs, as for the transform's own events); its data is a boxed link,
        // taken back exactly once when it runs.
        unsafe {
            let wake = sys::TSContCreate(Some(on_wake), sys::TSContMutexGet(transform));
            let link: Box<TransactionLink> = Box::new(Rc::clone(&self.link));
            sys::TSContDataSet(wake, Box::into_raw(link).cast());
            sys::TSContScheduleOnThread(wake, 0, self.thread);
        }
    }

    /// A reply or close a plugin other than filter `holder` asked for from outside its
    /// callbacks (e.g. in its callout's answer) while `holder` holds the stream: the plugin's
    /// index and the reply.
    fn other_answer(&mut self, holder: usize) -> Option<(usize, Reply)> {
        let filters = &mut self.filters;
        in_worker(self.thread, self.generation, "a transaction", |worker| {
            for (index, filter) in filters.iter_mut().enumerate() {
                if index == holder || filter.bypassed {
                    continue;
                }
                let Some(vm) = filter.stream.as_ref().and_then(|stream| worker.vm(stream)) else {
                    continue;
                };
                if !slot_of(vm, filter.context).is_some_and(|slot| slot.asked_to_end()) {
                    continue;
                }
                let asked = take_body_requests(vm, filter.context);
                if let Some(reply) = held_reply(&filter.name, asked.local_reply, asked.closed, None)
                {
                    return Some((index, reply));
                }
            }
            None
        })
        .flatten()
    }

    /// Has the request transform refuse the request (none of which went out), whatever state
    /// the plugins' holds are in.
    fn refuse_request(&mut self) {
        self.body_cut[0] = true;
        self.wake_request_transform();
    }

    /// The plugins answered the request once the transaction went on (from a hold on it, or a
    /// body callback before any of it went out; `by`, when a body callback's plugin that held
    /// nothing answered): the request transform refuses the request, which the origin has not
    /// seen.
    /// Traffic Server 9.2 then ends the transaction without an answer (a failed request
    /// transform terminates it), so the client's connection closes; logged with the reply's
    /// status.
    fn answer_during_body(&mut self, by: Option<usize>) {
        if let Some(reply) = &self.reply {
            let holds = |index: usize| by.is_none_or(|by| by == index);
            let header_holder = self
                .headers_held
                .filter(|held| holds(held.filter))
                .and_then(|held| self.filters.get(held.filter));
            let body_holder = self
                .body_held
                .filter(|&index| holds(index))
                .and_then(|index| self.filters.get(index));
            let answerer = by.and_then(|index| self.filters.get(index));
            let who = match (header_holder, body_holder, answerer) {
                (Some(filter), _, _) => format!(
                    "[{}] answered the request while it held only its headers",
                    filter.name
                ),
                (None, Some(filter), _) => {
                    format!(
                        "[{}] answered the request while it held its body",
                        filter.name
                    )
                }
                (None, None, Some(filter)) => {
                    format!("[{}] answered the request during its body", filter.name)
                }
                (None, None, None) => "a plugin answered the request during its body".into(),
            };
            diag::error(&format!(
                "{who} ({}): Traffic Server ends a transaction whose request body cannot go on \
                 without an answer, so the client's connection closes; the origin has not seen \
                 the request",
                reply.status
            ));
        }
        // The holds end with the request.
        let holders = [self.headers_held.map(|held| held.filter), self.body_held];
        for holder in holders.into_iter().flatten() {
            self.release_hold(holder);
        }
        self.headers_held = None;
        self.body_held = None;
        self.unlend();
        self.send_reply_body();
        self.body_cut[0] = true;
    }

    /// What the plugin of filter `index`, holding the transaction, asked for since (which ends
    /// its hold): the reply to send, if any; whether it continued; and its failure policy if its
    /// VM failed meanwhile.
    fn held_outcome(&mut self, index: usize) -> (Option<Reply>, bool, Option<OnFailure>) {
        let (asked, failure) = self.take_held_requests(index);
        let reply = held_reply(
            &self.filters[index].name,
            asked.local_reply,
            asked.closed,
            failure,
        );
        if reply.is_some() || asked.continued || failure.is_some() {
            self.release_hold(index);
        }
        (reply, asked.continued, failure)
    }

    /// What the plugin of filter `index`, holding the transaction, asked for since, and its
    /// failure policy if its VM failed meanwhile.
    fn take_held_requests(&mut self, index: usize) -> (Requests, Option<OnFailure>) {
        let thread = self.thread;
        let generation = self.generation;
        self.filters
            .get_mut(index)
            .and_then(|filter| {
                let stream = filter.stream.as_ref()?;
                let context = filter.context;
                in_worker(thread, generation, "a transaction", |worker| {
                    let vm = worker.vm(stream)?;
                    let failed = vm.is_failed();
                    // A look: the hold ends only with what the transaction acts on.
                    let asked = take_body_requests(vm, context);
                    let failure = failed.then(|| {
                        let error =
                            VmError::Failed("the VM failed while it held the stream".into());
                        crate::plugin_failed(worker, filter.plugin, &error)
                    });
                    Some((asked, failure))
                })
                .flatten()
            })
            .unwrap_or_default()
    }

    /// Runs `work` on the stream slot of filter `index`'s plugin.
    fn with_slot(&mut self, index: usize, work: impl FnOnce(&mut StreamSlot)) {
        let Some(filter) = self.filters.get(index) else {
            return;
        };
        if let Some(stream) = filter.stream.as_ref() {
            let context = filter.context;
            in_worker(self.thread, self.generation, "a transaction", |worker| {
                if let Some(slot) = worker.vm(stream).and_then(|vm| slot_of(vm, context)) {
                    work(slot);
                }
            });
        }
    }

    /// Ends filter `index`'s hold on the transaction (it is answered, or goes on).
    fn release_hold(&mut self, index: usize) {
        self.with_slot(index, StreamSlot::release);
    }

    /// The end of filter `index`'s hold on the request after its plugin asked for something
    /// outside the transform (in a callout's answer, a tick): `None` while it holds on, or once
    /// answered (the transform woken to refuse the request); else what it kept of the body, and
    /// whether it goes on because it failed open.
    fn end_of_hold(&mut self, index: usize) -> Option<(Vec<u8>, bool)> {
        let (reply, continued, failure) = self.held_outcome(index);
        if let Some(reply) = reply {
            self.reply = Some(reply);
            self.answer_during_body(None);
            self.wake_request_transform();
            return None;
        }
        let failed_open = failure == Some(OnFailure::FailOpen);
        if !(continued || failed_open) {
            // Nothing the transaction can act on yet: the hold stays.
            return None;
        }
        let filter = &mut self.filters[index];
        filter.bypassed |= failed_open;
        Some((std::mem::take(&mut filter.request_body), failed_open))
    }

    /// A hold on the request body at its end that ends outside the transform: the body goes
    /// on from what the plugin kept to the plugins after it, for the transform to send once
    /// woken.
    fn resume_body_hold(&mut self, index: usize) {
        let Some((kept, _)) = self.end_of_hold(index) else {
            return;
        };
        self.body_held = None;
        let released = self.body_from(Direction::Request, index + 1, kept, true);
        self.released_request_body.extend(released);
        self.wake_request_transform();
    }

    /// A hold on the request headers that ends outside the transform: its headers go on with
    /// what it kept of the body, for the transform to send once woken.
    fn resume_header_hold(&mut self, held: HeaderHold) {
        let Some((kept, failed_open)) = self.end_of_hold(held.filter) else {
            return;
        };
        self.headers_held = None;
        let end = self.request_body_ended;
        // Its headers go to the plugins after it first.
        if self.request_headers(held.filter + 1, Stage::Body) == Next::Reply {
            self.answer_during_body(None);
            self.wake_request_transform();
            return;
        }
        // What it kept goes on from the plugin after it if it saw it; if it stopped everything,
        // the body reaches its own body callback first, as Envoy resumes a filter that stopped
        // all iteration.
        let from = if held.body_to_holder || failed_open {
            held.filter + 1
        } else {
            held.filter
        };
        let released = self.body_from(Direction::Request, from, kept, end);
        self.released_request_body.extend(released);
        self.wake_request_transform();
    }

    /// Whether the client's request body is chunked: the request transform decodes it for the
    /// plugins and sends it framed by its length, so the origin's request loses its
    /// `Transfer-Encoding` (see [`on_transaction_event`]).
    pub(crate) fn request_body_chunked(&self) -> bool {
        self.client_framing.as_ref().is_some_and(|(name, value)| {
            name.as_slice() == b"transfer-encoding"
                && codings(value).any(|coding| coding.eq_ignore_ascii_case(b"chunked"))
        })
    }

    /// Ends the plugins' part in `direction`'s body: each lets go of what it keeps buffered
    /// and sees no more of the body, which goes on unchanged from then on (as past the buffer
    /// limit). Returns the released bytes, in order, when `keep` (else they are dropped: the
    /// caller sends the client's own bytes in their place).
    pub(crate) fn release_body(&mut self, direction: Direction, keep: bool) -> Vec<u8> {
        let mut data = Vec::new();
        for index in self.body_order(direction) {
            let filter = &mut self.filters[index];
            *filter.over_limit(direction) = true;
            let mut buffer = std::mem::take(filter.buffered(direction));
            if keep {
                // What a plugin kept came before what the plugins ahead of it let through.
                buffer.append(&mut data);
                data = buffer;
            }
        }
        data
    }

    /// Goes on with a held transaction whose plugin continued, answered or closed it.
    fn resume(&mut self) -> Next {
        // A plugin other than the holder answered the stream meanwhile: Envoy acts on it at
        // once, whoever holds the stream.
        let holder = match (self.paused, self.headers_held, self.body_held) {
            (Some(Pause::Request(index) | Pause::Response(index)), _, _) => Some(index),
            (None, Some(held), _) => Some(held.filter),
            (None, None, Some(index)) => Some(index),
            _ => None,
        };
        if let Some((by, reply)) = holder.and_then(|holder| self.other_answer(holder)) {
            if let Some(holder) = holder {
                self.release_hold(holder);
            }
            match self.paused.take() {
                Some(Pause::Request(_)) => return self.answer_held_request(reply),
                Some(Pause::Response(_)) => return self.answer_held_response(reply),
                None => {
                    self.reply = Some(reply);
                    self.answer_during_body(Some(by));
                    self.wake_request_transform();
                    return Next::Hold;
                }
            }
        }
        let Some(pause) = self.paused.take() else {
            // Not held in a hook: a hold on the request headers ends, if the plugin asked, in
            // the request transform.
            if let Some(held) = self.headers_held {
                self.resume_header_hold(held);
            } else if let Some(index) = self.body_held {
                self.resume_body_hold(index);
            }
            return Next::Hold;
        };
        let index = match pause {
            Pause::Request(index) | Pause::Response(index) => index,
        };
        let (reply, continued, failure) = self.held_outcome(index);
        let continued = continued || failure == Some(OnFailure::FailOpen);
        if failure == Some(OnFailure::FailOpen) {
            if let Some(filter) = self.filters.get_mut(index) {
                filter.bypassed = true;
            }
        }
        match (pause, reply) {
            (Pause::Request(_), Some(reply)) => self.answer_held_request(reply),
            (Pause::Request(index), None) if continued => {
                // A plugin after the one that held the transaction may answer it: its body and
                // content type go to Traffic Server's error path, as at the first run.
                let next = self.request_headers(index + 1, Stage::Hook);
                if next == Next::Reply {
                    self.send_reply_body();
                }
                next
            }
            (Pause::Response(_), Some(reply)) => self.answer_held_response(reply),
            (Pause::Response(index), None) if continued => self.response_headers(index),
            (_, None) => {
                // Nothing the transaction can act on yet: it stays held.
                self.paused = Some(pause);
                Next::Hold
            }
        }
    }

    /// Answers a request held in its header hook with `reply`, down Traffic Server's error path.
    fn answer_held_request(&mut self, reply: Reply) -> Next {
        self.unlend();
        self.reply = Some(reply);
        self.send_reply_body();
        Next::Reply
    }

    /// Answers a response held in its header hook with `reply`, as a reply from a response
    /// headers callback (see `answer_response`).
    fn answer_held_response(&mut self, reply: Reply) -> Next {
        self.unlend();
        let from = self.response_from.unwrap_or(ResponseFrom::Client);
        put_on_response(self.txn, from, reply.status, &reply.headers);
        self.answer_response(reply)
    }

    /// Sets the reply's status, body and content type for Traffic Server's error path.
    fn send_reply_body(&mut self) {
        let Some(reply) = &mut self.reply else {
            return;
        };
        let body = std::mem::take(&mut reply.body);
        // Traffic Server writes the content type into the response as it is: one with CR, LF
        // or NUL in it would add header lines of the plugin's making.
        let content_type = reply
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(b"content-type"))
            .map(|(_, value)| value.clone())
            .filter(|value| {
                let clean = !value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0));
                if !clean {
                    crate::diag::warning(
                        "a plugin's reply content type has CR, LF or NUL in it: text/plain sent",
                    );
                }
                clean
            })
            .unwrap_or_else(|| b"text/plain".to_vec());
        // SAFETY: Traffic Server takes ownership of both buffers and frees them with TSfree,
        // so they are allocated with TSmalloc; each is written within its allocation. An empty
        // body is no buffer at all: Traffic Server 9.2 files a zero-length one under its
        // smallest pooled buffer size when it sends it (`append_xmalloced`), then reuses that
        // allocation as a 128-byte buffer, corrupting the heap. Without a buffer it sends
        // `Content-Length: 0`, with no content type but the reply's own (as Envoy's).
        unsafe {
            sys::TSHttpTxnStatusSet(self.txn, reply.status as sys::TSHttpStatus);
            match body.is_empty() {
                true => sys::TSHttpTxnErrorBodySet(
                    self.txn,
                    std::ptr::null_mut(),
                    0,
                    std::ptr::null_mut(),
                ),
                false => {
                    let buffer = ts_copy(&body, false);
                    let mime = ts_copy(&content_type, true);
                    sys::TSHttpTxnErrorBodySet(self.txn, buffer, body.len(), mime);
                }
            }
        }
    }

    /// The close hook: `proxy_on_log`, `proxy_on_done`, `proxy_on_delete` of every plugin, with
    /// the request and response headers readable; then every hold on a VM copy is released.
    /// Returns whether every plugin's slot for the transaction went (its continuation may go).
    fn close(mut self) -> bool {
        let txn = self.txn;
        let generation = self.generation;
        let filters = std::mem::take(&mut self.filters);
        let done = in_worker(self.thread, generation, "a transaction", |worker| {
            for mut filter in filters {
                let Some(stream) = filter.stream.take() else {
                    continue;
                };
                crate::last_callbacks(&filter.name, || {
                    let Some(vm) = worker.vm(&stream).filter(|vm| !vm.is_failed()) else {
                        return;
                    };
                    let request = client_header(txn, HeaderKind::Request);
                    let response = client_header(txn, HeaderKind::Response);
                    lend(vm, filter.context, request, response);
                    let ended = vm
                        .on_log(filter.context)
                        .and_then(|_| vm.on_done(filter.context))
                        .and_then(|_| vm.on_delete(filter.context));
                    if let Err(error) = ended {
                        if !filter.bypassed {
                            diag::error(&format!("[{}] {error}", filter.name));
                            crate::plugin_failed(worker, filter.plugin, &error);
                        }
                    }
                });
                if let Some(host) = worker.vm(&stream).and_then(|vm| vm.host_as::<AtsHost>()) {
                    host.close_stream(filter.context);
                }
                worker.release(stream);
            }
        });
        if done.is_some() {
            with_workers(|workers| workers.stream_ended(generation));
        }
        done.is_some()
    }

    /// Takes the lent headers back from every plugin's slot (before Traffic Server goes on),
    /// and lends the request header, as it stands, to a plugin holding it past the hook.
    fn unlend(&mut self) {
        let filters = &self.filters;
        let txn = self.txn;
        let holder = self.headers_held.map(|held| held.filter);
        in_worker(self.thread, self.generation, "a transaction", |worker| {
            for (index, filter) in filters.iter().enumerate() {
                if let Some(vm) = filter.stream.as_ref().and_then(|s| worker.vm(s)) {
                    lend(vm, filter.context, None, None);
                    follow_request(vm, filter.context, (holder == Some(index)).then_some(txn));
                }
            }
        });
    }
}

/// A copy of `bytes` in memory Traffic Server frees with `TSfree` (NUL-terminated if
/// `terminate`).
///
/// # Safety
/// Only for buffers handed to Traffic Server, which frees them.
unsafe fn ts_copy(bytes: &[u8], terminate: bool) -> *mut std::ffi::c_char {
    let len = bytes.len() + usize::from(terminate);
    // SAFETY: TSmalloc returns `len.max(1)` writable bytes (it aborts rather than return null).
    unsafe {
        let buffer = sys::_TSmalloc(len.max(1), c"pwhost_ats".as_ptr()).cast::<u8>();
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buffer, bytes.len());
        if terminate {
            *buffer.add(bytes.len()) = 0;
        }
        buffer.cast()
    }
}
