//! One Traffic Server transaction running through the plugins: the hooks and what they call.
//!
//! The transaction is created at the read-request-header hook (a global hook), then holds its
//! own continuation for the send-response-header and transaction-close hooks. Every handler
//! does its work with this thread's workers, lets go of them and of the transaction, and only
//! then reenables Traffic Server, which may run the next hook before `TSHttpTxnReenable`
//! returns.

use std::ffi::{c_int, c_void};
use std::sync::Arc;
use std::thread::ThreadId;

use abi::{HeadersAction, LocalResponse, Vm};
use lifecycle::{Admission, Generation, OnFailure, PluginId, StreamVm, ThreadWorkers, Worker};

use crate::headers::{HeaderKind, MimeHeaders};
use crate::host::{AtsHost, StreamSlot};
use crate::{diag, sys, with_workers};

/// One plugin's part in a transaction.
struct Filter {
    plugin: PluginId,
    name: Arc<str>,
    /// The hold on the VM copy the plugin runs in, until the transaction closes.
    stream: Option<StreamVm>,
    context: abi::ContextId,
    /// The plugin failed open during this transaction: it is not called again for it.
    bypassed: bool,
}

/// A reply sent instead of the origin's response.
struct Reply {
    status: u32,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
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

/// A transaction and its plugins.
pub(crate) struct Transaction {
    txn: sys::TSHttpTxn,
    /// The continuation of the transaction's own hooks (destroyed with it).
    cont: sys::TSCont,
    /// The deployment its plugins belong to (a reload does not move it).
    generation: Generation,
    /// The Traffic Server thread it runs on, which owns its VM copies.
    thread: ThreadId,
    filters: Vec<Filter>,
    reply: Option<Reply>,
    /// The body of a plugin's local reply, until it is handed to Traffic Server.
    pending_body: Option<Vec<u8>>,
}

/// Runs a hook handler's body, turning a panic into an error message: unwinding into Traffic
/// Server would abort it.
fn guarded(what: &str, body: impl FnOnce() -> Next) -> Next {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(next) => next,
        Err(_) => {
            diag::error(&format!(
                "{what} panicked; the transaction goes on without plugins"
            ));
            Next::Continue
        }
    }
}

/// Lets Traffic Server go on with `txn`.
///
/// # Safety
/// `txn` must be the transaction of the hook being handled, not yet reenabled.
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
    let next = guarded("the request hook", || {
        // SAFETY: `txn` is this hook's transaction.
        unsafe { start(txn) }
    });
    // SAFETY: `txn` is this hook's transaction; nothing of it is borrowed any more.
    unsafe { reenable(txn, next) };
    0
}

/// Admits the transaction to every HTTP filter and runs their request header callbacks.
///
/// # Safety
/// `txn` must be the transaction of the read-request-header hook being handled.
unsafe fn start(txn: sys::TSHttpTxn) -> Next {
    // SAFETY: `txn` is live.
    if unsafe { sys::TSHttpTxnIsInternal(txn) } != 0 {
        // The plugin's own callouts (TSFetchUrl) do not go through the plugins again.
        return Next::Continue;
    }
    let begun = with_workers(|workers| begin(workers, txn)).flatten();
    let Some(mut transaction) = begun else {
        return Next::Continue;
    };
    let next = if transaction.reply.is_some() {
        Next::Reply
    } else {
        transaction.request_headers()
    };
    if next == Next::Reply {
        transaction.send_reply_body();
    }
    // The transaction now lives with its continuation, until it closes.
    // SAFETY: a continuation without a mutex is what transaction hooks call under the
    // transaction's own lock; its data is the boxed transaction, freed at close.
    unsafe {
        let cont = sys::TSContCreate(Some(on_transaction_event), std::ptr::null_mut());
        transaction.cont = cont;
        let transaction = Box::into_raw(Box::new(transaction));
        sys::TSContDataSet(cont, transaction.cast());
        sys::TSHttpTxnHookAdd(txn, sys::TS_HTTP_SEND_RESPONSE_HDR_HOOK, cont);
        sys::TSHttpTxnHookAdd(txn, sys::TS_HTTP_TXN_CLOSE_HOOK, cont);
    }
    next
}

/// The transaction with a stream context in every plugin that admits it; `None` if no plugin
/// takes part (every one failed open).
fn begin(workers: &mut ThreadWorkers, txn: sys::TSHttpTxn) -> Option<Transaction> {
    let (generation, worker) = workers.for_new_stream();
    let mut transaction = Transaction {
        txn,
        cont: std::ptr::null_mut(),
        generation,
        thread: std::thread::current().id(),
        filters: Vec::new(),
        reply: None,
        pending_body: None,
    };
    let plugins: Vec<PluginId> = worker.plugins().http_filters().collect();
    for plugin in plugins {
        let name: Arc<str> = crate::plugin_name(worker.plugins().config(plugin)).into();
        match worker.admit(plugin) {
            Admission::Run(stream) => match open_stream(worker, &stream, &name) {
                Ok(context) => transaction.filters.push(Filter {
                    plugin,
                    name,
                    stream: Some(stream),
                    context,
                    bypassed: false,
                }),
                Err(error) => {
                    diag::error(&format!("[{name}] cannot create a stream context: {error}"));
                    worker.release(stream);
                    if worker.failed(plugin, &error) == OnFailure::FailClosed {
                        transaction.reply = Some(Reply::fail_closed());
                        break;
                    }
                }
            },
            Admission::FailClosed => {
                transaction.reply = Some(Reply::fail_closed());
                break;
            }
            Admission::FailOpen => {}
        }
    }
    if transaction.filters.is_empty() && transaction.reply.is_none() {
        workers.stream_ended(generation);
        return None;
    }
    Some(transaction)
}

/// Creates the plugin's context for a new stream and gives it a slot in the copy's host.
fn open_stream(
    worker: &mut Worker,
    stream: &StreamVm,
    name: &Arc<str>,
) -> Result<abi::ContextId, abi::VmError> {
    let vm = worker
        .vm(stream)
        .ok_or_else(|| abi::VmError::Failed("the VM copy went away".into()))?;
    let context = vm.create_http_context_for(stream.root())?;
    if let Some(host) = vm.host_as::<AtsHost>() {
        host.roots.insert(stream.root().0, Arc::clone(name));
        host.streams
            .insert(context.0, StreamSlot::new(Arc::clone(name)));
    }
    Ok(context)
}

impl Reply {
    /// Envoy's answer for a stream whose plugin failed closed: 503, no body.
    fn fail_closed() -> Reply {
        Reply {
            status: 503,
            headers: Vec::new(),
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
        sys::TS_EVENT_HTTP_SEND_RESPONSE_HDR => {
            let next = guarded("the response hook", || {
                // SAFETY: see above; nothing else holds the transaction while its hook runs.
                let transaction = unsafe { &mut *transaction };
                transaction.response_headers()
            });
            // SAFETY: the borrow of the transaction ended with the closure.
            unsafe { reenable(txn, next) };
        }
        sys::TS_EVENT_HTTP_TXN_CLOSE => {
            // SAFETY: the box is taken back exactly once, here; Traffic Server calls no more
            // hooks of this continuation after the close.
            let transaction = unsafe { Box::from_raw(transaction) };
            // SAFETY: the continuation is not used again.
            unsafe {
                sys::TSContDataSet(cont, std::ptr::null_mut());
                sys::TSContDestroy(cont);
            }
            guarded("the close hook", || {
                transaction.close();
                Next::Continue
            });
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

/// Runs `work` with the worker of deployment `generation` if this is `thread`, the thread
/// owning the transaction's VM copies.
fn in_worker<R>(
    thread: ThreadId,
    generation: Generation,
    work: impl FnOnce(&mut Worker) -> R,
) -> Option<R> {
    if std::thread::current().id() != thread {
        diag::error(
            "a transaction hook ran on another thread than its VM copies'; its plugins are skipped",
        );
        return None;
    }
    with_workers(|workers| workers.worker(generation).map(work)).flatten()
}

/// A transaction's client request or response header, if Traffic Server has it now.
fn client_header(txn: sys::TSHttpTxn, kind: HeaderKind) -> Option<MimeHeaders> {
    let mut buffer: sys::TSMBuffer = std::ptr::null_mut();
    let mut header: sys::TSMLoc = std::ptr::null_mut();
    // SAFETY: `txn` is the transaction of the hook being handled; the handles returned belong
    // to it and stay valid while the hook holds it.
    unsafe {
        let found = match kind {
            HeaderKind::Request => sys::TSHttpTxnClientReqGet(txn, &mut buffer, &mut header),
            HeaderKind::Response => sys::TSHttpTxnClientRespGet(txn, &mut buffer, &mut header),
        };
        (found == sys::TS_SUCCESS && !buffer.is_null() && !header.is_null())
            .then(|| MimeHeaders::new(buffer, header, kind))
    }
}

/// Whether a header announces no body: no `Content-Length` above 0 and no `Transfer-Encoding`
/// (for a response also: a status that never has one).
fn ends_stream(headers: &MimeHeaders, kind: HeaderKind) -> bool {
    use abi::Headers as _;
    if kind == HeaderKind::Response && matches!(headers.status(), 100..=199 | 204 | 304) {
        return true;
    }
    let length = headers
        .get(b"content-length")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    headers.get(b"transfer-encoding").is_none() && length.unwrap_or(0) == 0
}

impl Transaction {
    /// Runs `work` with the worker of the transaction's deployment, on its own thread only.
    fn with_worker<R>(&self, work: impl FnOnce(&mut Worker) -> R) -> Option<R> {
        in_worker(self.thread, self.generation, work)
    }

    /// `proxy_on_request_headers` of every plugin, in order, until one replies or holds.
    fn request_headers(&mut self) -> Next {
        let txn = self.txn;
        let filters = &mut self.filters;
        let mut reply = None;
        let next = in_worker(self.thread, self.generation, |worker| {
            for filter in filters.iter_mut() {
                let Some(stream) = filter.stream.as_ref().filter(|_| !filter.bypassed) else {
                    continue;
                };
                let Some(headers) = client_header(txn, HeaderKind::Request) else {
                    return Next::Continue;
                };
                let Some(vm) = worker.vm(stream) else {
                    continue;
                };
                let count = abi::Headers::len(&headers);
                let end_of_stream = ends_stream(&headers, HeaderKind::Request);
                lend(vm, filter.context, Some(headers), None);
                let result = vm.on_request_headers(filter.context, count, end_of_stream);
                let asked = take_requests(vm, filter.context);
                if let Some(local) = asked.local_reply {
                    reply = Some(local);
                    return Next::Reply;
                }
                match result {
                    Ok(HeadersAction::Continue) => {}
                    Ok(_) => return Next::Hold,
                    Err(error) => {
                        diag::error(&format!("[{}] {error}", filter.name));
                        match worker.failed(filter.plugin, &error) {
                            OnFailure::FailClosed => {
                                reply = Some(LocalResponse {
                                    status: 503,
                                    details: lifecycle::FAIL_STREAM_DETAILS.into(),
                                    body: Vec::new(),
                                    headers: abi::HeaderMap::new(),
                                    grpc_status: None,
                                });
                                return Next::Reply;
                            }
                            OnFailure::FailOpen => filter.bypassed = true,
                        }
                    }
                }
            }
            Next::Continue
        })
        .unwrap_or(Next::Continue);
        if let Some(local) = reply {
            self.reply = Some(Reply::from_local(&local));
            self.pending_body = Some(local.body);
        }
        if next != Next::Hold {
            self.unlend();
        }
        next
    }

    /// `proxy_on_response_headers` of every plugin, in reverse order; a reply's status and
    /// headers are put on the response first.
    fn response_headers(&mut self) -> Next {
        let txn = self.txn;
        if let Some(reply) = &self.reply {
            if let Some(mut headers) = client_header(txn, HeaderKind::Response) {
                // Traffic Server 9.2 turns a reply sent down the error path into a 500 unless
                // the status is set again as the response header goes out.
                headers.set_status(reply.status);
                for (name, value) in &reply.headers {
                    abi::Headers::replace(&mut headers, name, value);
                }
            }
        }
        let filters = &mut self.filters;
        let mut replaced = None;
        let next = in_worker(self.thread, self.generation, |worker| {
            for filter in filters.iter_mut().rev() {
                let Some(stream) = filter.stream.as_ref().filter(|_| !filter.bypassed) else {
                    continue;
                };
                let Some(headers) = client_header(txn, HeaderKind::Response) else {
                    return Next::Continue;
                };
                let Some(vm) = worker.vm(stream) else {
                    continue;
                };
                let count = abi::Headers::len(&headers);
                let end_of_stream = ends_stream(&headers, HeaderKind::Response);
                let request = client_header(txn, HeaderKind::Request);
                lend(vm, filter.context, request, Some(headers));
                let result = vm.on_response_headers(filter.context, count, end_of_stream);
                let asked = take_requests(vm, filter.context);
                if let Some(local) = asked.local_reply {
                    replaced = Some(local);
                    return Next::Continue;
                }
                match result {
                    Ok(HeadersAction::Continue) => {}
                    Ok(_) => return Next::Hold,
                    Err(error) => {
                        diag::error(&format!("[{}] {error}", filter.name));
                        match worker.failed(filter.plugin, &error) {
                            OnFailure::FailClosed => {
                                replaced = Some(LocalResponse {
                                    status: 503,
                                    details: lifecycle::FAIL_STREAM_DETAILS.into(),
                                    body: Vec::new(),
                                    headers: abi::HeaderMap::new(),
                                    grpc_status: None,
                                });
                                return Next::Continue;
                            }
                            OnFailure::FailOpen => filter.bypassed = true,
                        }
                    }
                }
            }
            Next::Continue
        })
        .unwrap_or(Next::Continue);
        if let Some(local) = replaced {
            // A reply asked for once the response is on its way replaces its status and
            // headers (its body would need the response transform).
            if let Some(mut headers) = client_header(txn, HeaderKind::Response) {
                headers.set_status(local.status);
                for (name, value) in local.headers.iter() {
                    abi::Headers::replace(&mut headers, name, value);
                }
            }
        }
        if next != Next::Hold {
            self.unlend();
        }
        next
    }

    /// Sets the reply's body (and content type) for Traffic Server's error path.
    fn send_reply_body(&mut self) {
        let Some(reply) = &self.reply else {
            return;
        };
        let body = self.pending_body.take().unwrap_or_default();
        let content_type = reply
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(b"content-type"))
            .map(|(_, value)| value.clone())
            .unwrap_or_else(|| b"text/plain".to_vec());
        // SAFETY: Traffic Server takes ownership of both buffers and frees them with TSfree,
        // so they are allocated with TSmalloc; each is written within its allocation.
        unsafe {
            sys::TSHttpTxnStatusSet(self.txn, reply.status as sys::TSHttpStatus);
            let buffer = ts_copy(&body, false);
            let mime = ts_copy(&content_type, true);
            sys::TSHttpTxnErrorBodySet(self.txn, buffer, body.len(), mime);
        }
    }

    /// The close hook: `proxy_on_log`, `proxy_on_done`, `proxy_on_delete` of every plugin, with
    /// the request and response headers readable; then every hold on a VM copy is released.
    fn close(mut self) {
        let txn = self.txn;
        let generation = self.generation;
        let filters = std::mem::take(&mut self.filters);
        let done = self.with_worker(|worker| {
            for mut filter in filters {
                let Some(stream) = filter.stream.take() else {
                    continue;
                };
                if let Some(vm) = worker.vm(&stream).filter(|vm| !vm.is_failed()) {
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
                            worker.failed(filter.plugin, &error);
                        }
                    }
                }
                if let Some(host) = worker.vm(&stream).and_then(|vm| vm.host_as::<AtsHost>()) {
                    host.streams.remove(&filter.context.0);
                }
                worker.release(stream);
            }
        });
        if done.is_some() {
            with_workers(|workers| workers.stream_ended(generation));
        }
    }

    /// Takes the lent headers back from every plugin's slot (before Traffic Server goes on).
    fn unlend(&mut self) {
        let filters = &self.filters;
        self.with_worker(|worker| {
            for filter in filters {
                if let Some(vm) = filter.stream.as_ref().and_then(|s| worker.vm(s)) {
                    lend(vm, filter.context, None, None);
                }
            }
        });
    }
}

impl Reply {
    fn from_local(local: &LocalResponse) -> Reply {
        Reply {
            status: local.status,
            headers: local
                .headers
                .iter()
                .map(|(name, value)| (name.to_vec(), value.to_vec()))
                .collect(),
        }
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

/// Lends the headers to the plugin's slot in the copy's host (`None` takes them back).
fn lend(
    vm: &mut Vm,
    context: abi::ContextId,
    request: Option<MimeHeaders>,
    response: Option<MimeHeaders>,
) {
    if let Some(slot) = vm
        .host_as::<AtsHost>()
        .and_then(|host| host.streams.get_mut(&context.0))
    {
        slot.request = request;
        slot.response = response;
    }
}

/// What the plugin asked for during the callback that just returned.
struct Requests {
    local_reply: Option<LocalResponse>,
}

fn take_requests(vm: &mut Vm, context: abi::ContextId) -> Requests {
    match vm
        .host_as::<AtsHost>()
        .and_then(|host| host.streams.get_mut(&context.0))
    {
        Some(slot) => Requests {
            local_reply: slot.local_reply.take(),
        },
        None => Requests { local_reply: None },
    }
}
