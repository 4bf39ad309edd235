//! `proxy_http_call` through Traffic Server's own client (`TSFetchUrl`): the request enters
//! Traffic Server as an internal transaction for the upstream's address (remapping skipped, so
//! no remap rule is needed), and the answer comes back to the VM copy that asked, on its
//! thread.
//!
//! Each call has a continuation of its own whose data is the [`Callout`]. The fetch's events
//! and the call's timeout both arrive there, under the continuation's mutex; whichever comes
//! first is delivered, the other is dropped. An answer that arrives on another thread than the
//! VM copy's is passed to that thread first.
//!
//! A singleton service's VM runs on a thread of its own, not one of Traffic Server's event
//! threads: its calls are launched on a net thread, and their answers are handed to the
//! service's thread through its [`ServiceInbox`].

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use abi::{HeaderMap, HttpCallRequest, HttpCallResponse, Status};
use lifecycle::ServiceInbox;

use crate::{diag, sys, with_thread};

/// A singleton service's inbox, set once the service has started (`None`: it did not start,
/// and an answer for it has nowhere to go). A call made while it starts may be answered before.
pub(crate) type ServiceSlot = Arc<OnceLock<Option<ServiceInbox>>>;

/// Where a call's answer goes.
#[derive(Clone)]
pub(crate) enum AnswerTo {
    /// The VM copy that made the call, on the Traffic Server thread it was made on.
    ThisThread,
    /// A singleton service, through its inbox.
    Service(ServiceSlot),
}

/// The header marking a callout's internal transaction, so the request hook skips remapping
/// and the plugins for it; its value is [`marker_value`], a secret of this process, so that a
/// request someone else sends with the header is not mistaken for one.
pub(crate) const MARKER: &str = "x-pwhost-ats-callout";

/// The header telling the request hook how long the plugin waits for the call (milliseconds),
/// so that Traffic Server stops the transfer then (see [`crate::transaction`]'s `start`).
pub(crate) const TIMEOUT_HEADER: &str = "x-pwhost-ats-callout-timeout-ms";

/// The header carrying the call's number (see [`next_call`]), so that its internal
/// transaction can record a refused answer against it (`crate::answer`).
pub(crate) const CALL_HEADER: &str = "x-pwhost-ats-callout-call";

/// A number for a new call, unique in the process (never 0).
fn next_call() -> usize {
    static LAST: AtomicUsize = AtomicUsize::new(0);
    LAST.fetch_add(1, Ordering::Relaxed).wrapping_add(1).max(1)
}

/// This process's value of [`MARKER`]: random, made once.
pub(crate) fn marker_value() -> &'static str {
    static VALUE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VALUE.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // std's hasher keys are random per process; two of them make 128 random bits.
        let mut value = String::new();
        for _ in 0..2 {
            let hasher = std::collections::hash_map::RandomState::new().build_hasher();
            value.push_str(&format!("{:016x}", hasher.finish()));
        }
        value
    })
}

/// How often a verdict still pending is asked for (milliseconds).
const JUDGING_STEP: sys::TSHRTime = 10;

/// How many times a pending verdict is asked for before the answer is given up: its internal
/// transaction closes as its client finishes reading, so a verdict pending for 2 s means the
/// transaction is stuck, and its answer not to be trusted.
const JUDGING_TRIES: u32 = 200;

/// Fetch event numbers (Traffic Server leaves them to the plugin).
const FETCH_SUCCESS: c_int = 61_001;
const FETCH_FAILURE: c_int = 61_002;
const FETCH_TIMEOUT: c_int = 61_003;

/// Where a call stands.
enum Progress {
    /// Sent; nothing back yet.
    Waiting,
    /// Answered (or failed, `None`) on another thread; to be delivered on the VM's.
    Arrived(Option<HttpCallResponse>),
    /// Answered, but the call's internal transaction has not given its verdict on the answer
    /// yet (`crate::answer`): asked again every [`JUDGING_STEP`], `asked` times so far.
    Judging {
        answer: Option<HttpCallResponse>,
        asked: u32,
    },
    /// Delivered (the answer or the timeout); later events are dropped.
    Delivered,
}

/// One HTTP call, owned by its continuation.
struct Callout {
    token: u32,
    /// The call's number in the process (its internal transaction's [`CALL_HEADER`]).
    call: usize,
    /// The call is a `HEAD`, whose answer has no body whatever its `Content-Length` says.
    head: bool,
    /// Where the call went, for messages about its answer.
    upstream: SocketAddr,
    /// When the plugin stops waiting (its timeout; `None`: never): an answer still being
    /// judged then fails as the timeout would have failed it.
    expires: Option<std::time::Instant>,
    answer_to: AnswerTo,
    /// The thread of the VM copy that made the call.
    thread: sys::TSEventThread,
    progress: Progress,
    /// Whether the fetch has finished (its last event came): the continuation may then go.
    fetch_done: bool,
    /// Whether a timeout is scheduled and has not fired.
    timeout: Option<sys::TSAction>,
    /// The last event is scheduled: the continuation goes when it comes.
    closing: bool,
}

/// Sends `request` to `address` for the VM copy on the calling thread (a Traffic Server event
/// thread) and returns at once; `token` identifies the answer. The request is checked here:
/// names and values with CR, LF or NUL would let a plugin smuggle requests, and are refused
/// with `BAD_ARGUMENT`.
pub(crate) fn dispatch(token: u32, address: SocketAddr, request: &HttpCallRequest) -> Status {
    let call = next_call();
    let Some(bytes) = encode(address, request, call) else {
        return Status::BadArgument;
    };
    if c_int::try_from(bytes.len()).is_err() {
        return Status::BadArgument;
    }
    let sent = Sent {
        token,
        call,
        head: is_head(request),
        upstream: address,
        timeout: request.timeout,
        answer_to: AnswerTo::ThisThread,
    };
    // SAFETY: called on a Traffic Server event thread (from a plugin callback).
    unsafe { launch(sent, &bytes) };
    Status::Ok
}

/// Whether Traffic Server has finished starting (its ports are open). Services start with the
/// plugin, before that, and Traffic Server's client crashes if used earlier: their calls wait.
static TRAFFIC_SERVER_READY: AtomicBool = AtomicBool::new(false);

/// Arms [`TRAFFIC_SERVER_READY`]; called once from the plugin's initialisation.
pub(crate) fn watch_for_readiness() {
    unsafe extern "C" fn on_ready(_: sys::TSCont, _: sys::TSEvent, _: *mut c_void) -> c_int {
        TRAFFIC_SERVER_READY.store(true, Ordering::Release);
        0
    }
    // SAFETY: the handler is an `extern "C"` function of the right type; the continuation
    // lives for the process.
    unsafe {
        let cont = sys::TSContCreate(Some(on_ready), std::ptr::null_mut());
        sys::TSLifecycleHookAdd(sys::TS_LIFECYCLE_PORTS_READY_HOOK, cont);
    }
}

/// What a call keeps of its request once sent.
struct Sent {
    /// The plugin's token for the call.
    token: u32,
    /// The call's number in the process.
    call: usize,
    /// The call is a `HEAD`.
    head: bool,
    /// Where it goes.
    upstream: SocketAddr,
    /// The plugin's timeout (zero: none).
    timeout: Duration,
    /// Where the answer goes.
    answer_to: AnswerTo,
}

/// Whether `request` is a `HEAD`.
fn is_head(request: &HttpCallRequest) -> bool {
    request
        .headers
        .get(b":method")
        .is_some_and(|method| method.eq_ignore_ascii_case(b"HEAD"))
}

/// A singleton service's call, on its way to a net thread.
struct Launch {
    /// The call.
    sent: Sent,
    /// Its request, encoded.
    bytes: Vec<u8>,
}

/// Sends `request` to `address` for a singleton service, from the service's own thread: the
/// request is checked here (as by [`dispatch`]), then launched on one of Traffic Server's net
/// threads, since its client works only there. The answer goes to `inbox`.
pub(crate) fn dispatch_from_service(
    token: u32,
    address: SocketAddr,
    request: &HttpCallRequest,
    inbox: ServiceSlot,
) -> Status {
    let call = next_call();
    let Some(bytes) = encode(address, request, call) else {
        return Status::BadArgument;
    };
    if c_int::try_from(bytes.len()).is_err() {
        return Status::BadArgument;
    }
    if !ensure_traffic_server_thread() {
        return Status::InternalFailure;
    }
    let sent = Sent {
        token,
        call,
        head: is_head(request),
        upstream: address,
        timeout: request.timeout,
        answer_to: AnswerTo::Service(inbox),
    };
    let launch = Box::into_raw(Box::new(Launch { sent, bytes }));
    // SAFETY: this thread is known to Traffic Server (`TSThreadInit`), which its continuation
    // and scheduling calls need; the continuation's data is the boxed launch, taken back (and
    // the continuation destroyed) by its one event.
    unsafe {
        let cont = sys::TSContCreate(Some(on_launch), sys::TSMutexCreate());
        sys::TSContDataSet(cont, launch.cast());
        sys::TSContScheduleOnPool(cont, 0, sys::TS_THREAD_POOL_NET);
    }
    Status::Ok
}

/// Makes the calling thread (a singleton service's) known to Traffic Server once, for as long
/// as it runs, unless it already is (one of Traffic Server's own); `false` if Traffic Server
/// refused.
pub(crate) fn ensure_traffic_server_thread() -> bool {
    /// The thread's registration, undone when the thread ends.
    struct Registered(Cell<sys::TSThread>);
    impl Drop for Registered {
        fn drop(&mut self) {
            let thread = self.0.get();
            if !thread.is_null() {
                // SAFETY: made by `TSThreadInit` on this very thread, which is ending; nothing
                // of the plugin uses it any more.
                unsafe { sys::TSThreadDestroy(thread) };
            }
        }
    }
    thread_local! {
        static REGISTERED: Registered = const { Registered(Cell::new(std::ptr::null_mut())) };
    }
    // SAFETY: reads the calling thread's Traffic Server thread, null for a foreign thread.
    if !unsafe { sys::TSThreadSelf() }.is_null() {
        return true;
    }
    REGISTERED.with(|registered| {
        if registered.0.get().is_null() {
            // SAFETY: called on a thread Traffic Server did not make, once.
            registered.0.set(unsafe { sys::TSThreadInit() });
        }
        !registered.0.get().is_null()
    })
}

/// A singleton service's call arriving on a net thread: sent from here once Traffic Server is
/// ready (until then, the launch waits in 50 ms steps).
unsafe extern "C" fn on_launch(
    cont: sys::TSCont,
    _event: sys::TSEvent,
    _data: *mut c_void,
) -> c_int {
    if !TRAFFIC_SERVER_READY.load(Ordering::Acquire) {
        // SAFETY: the continuation and its data live until the launch; on a net thread.
        unsafe { sys::TSContScheduleOnPool(cont, 50, sys::TS_THREAD_POOL_NET) };
        return 0;
    }
    // SAFETY: the data is the boxed launch `dispatch_from_service` left, taken once; this is
    // the continuation's last event, so it may go now.
    let raw = unsafe {
        let raw = sys::TSContDataGet(cont).cast::<Launch>();
        sys::TSContDataSet(cont, std::ptr::null_mut());
        sys::TSContDestroy(cont);
        raw
    };
    if raw.is_null() {
        return 0;
    }
    // SAFETY: as above, ours alone now.
    let call = unsafe { Box::from_raw(raw) };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let Launch { sent, bytes } = *call;
        // SAFETY: on a Traffic Server net thread; `bytes` was checked to fit.
        unsafe { launch(sent, &bytes) }
    }));
    if outcome.is_err() {
        diag::error("launching a service's HTTP call panicked");
    }
    0
}

/// Sends the encoded request with Traffic Server's client and arms the call's timeout.
///
/// # Safety
/// Must run on a Traffic Server event thread; `bytes` fits a `c_int`.
unsafe fn launch(sent: Sent, bytes: &[u8]) {
    let len = c_int::try_from(bytes.len()).unwrap_or(c_int::MAX);
    // SAFETY: the caller's promise.
    let thread = unsafe { sys::TSEventThreadSelf() };
    let Sent {
        token,
        call,
        head,
        upstream,
        timeout,
        answer_to,
    } = sent;
    let expires = (!timeout.is_zero())
        .then(|| std::time::Instant::now().checked_add(timeout))
        .flatten();
    // Watched from before the request goes (see `crate::answer::expect`).
    crate::answer::expect(call);
    let callout = Box::new(Callout {
        token,
        call,
        head,
        upstream,
        expires,
        answer_to,
        thread,
        progress: Progress::Waiting,
        fetch_done: false,
        timeout: None,
        closing: false,
    });
    // The internal transaction appears to come from the loopback address (Traffic Server
    // insists on a port, which names no real socket).
    let client: SocketAddr = ([127, 0, 0, 1], 1).into();
    let client = socket_address(client);
    // SAFETY: the continuation's data is the boxed callout, freed in `finish` once both the
    // fetch and the timeout are over; the request bytes and the address are copied by
    // Traffic Server during the call.
    unsafe {
        let cont = sys::TSContCreate(Some(on_event), sys::TSMutexCreate());
        let callout = Box::into_raw(callout);
        sys::TSContDataSet(cont, callout.cast());
        if !timeout.is_zero() {
            let ms = sys::TSHRTime::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
            (*callout).timeout = Some(sys::TSContScheduleOnThread(cont, ms, thread));
        }
        let events = sys::TSFetchEvent {
            success_event_id: FETCH_SUCCESS,
            failure_event_id: FETCH_FAILURE,
            timeout_event_id: FETCH_TIMEOUT,
        };
        sys::TSFetchUrl(
            bytes.as_ptr().cast(),
            len,
            (&client as *const libc::sockaddr_in).cast(),
            cont,
            sys::AFTER_BODY,
            events,
        );
    }
}

fn socket_address(address: SocketAddr) -> libc::sockaddr_in {
    let (ip, port) = match address {
        SocketAddr::V4(v4) => (*v4.ip(), v4.port()),
        SocketAddr::V6(_) => ([127, 0, 0, 1].into(), 0),
    };
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn is_clean(bytes: &[u8]) -> bool {
    !bytes.iter().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// The request as Traffic Server's client takes it: HTTP/1.0 (so the answer is never chunked),
/// an absolute URL naming the upstream's address, the plugin's `:authority` as `Host`.
fn encode(address: SocketAddr, request: &HttpCallRequest, call: usize) -> Option<Vec<u8>> {
    if !request.trailers.is_empty() {
        // An HTTP/1.0 request carries none: refused, rather than sent without them. Said once
        // per process: a plugin retrying in a loop would flood the log.
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            diag::warning(
                "an HTTP call with request trailers is refused (BAD_ARGUMENT): Traffic Server's \
                 client cannot send them",
            )
        });
        return None;
    }
    let headers = &request.headers;
    let method = headers.get(b":method").unwrap_or(b"GET");
    let path = headers.get(b":path").unwrap_or(b"/");
    let authority = headers
        .get(b":authority")
        .map(<[u8]>::to_vec)
        .unwrap_or_else(|| address.to_string().into_bytes());
    if !method.iter().all(u8::is_ascii_alphabetic) || !path.starts_with(b"/") || !is_clean(path) {
        return None;
    }
    let mut out = Vec::with_capacity(256 + request.body.len());
    out.extend_from_slice(method);
    out.extend_from_slice(format!(" http://{address}").as_bytes());
    out.extend_from_slice(path);
    out.extend_from_slice(b" HTTP/1.0\r\nHost: ");
    if !is_clean(&authority) {
        return None;
    }
    out.extend_from_slice(&authority);
    out.extend_from_slice(format!("\r\n{MARKER}: {}\r\n", marker_value()).as_bytes());
    out.extend_from_slice(
        format!(
            "{TIMEOUT_HEADER}: {}\r\n{CALL_HEADER}: {call}\r\n",
            request.timeout.as_millis()
        )
        .as_bytes(),
    );
    for (name, value) in headers.iter() {
        if name.starts_with(b":")
            || name.eq_ignore_ascii_case(b"host")
            || name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(MARKER.as_bytes())
            || name.eq_ignore_ascii_case(TIMEOUT_HEADER.as_bytes())
            || name.eq_ignore_ascii_case(CALL_HEADER.as_bytes())
        {
            continue;
        }
        // The call's framing and connection are the host's: a `transfer-encoding` would make
        // Traffic Server wait for a chunked body that never comes. Said once per process.
        if HttpCallRequest::is_connection_header(name, value) {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                diag::warning(
                    "a plugin's connection header was left out of an HTTP call (the host \
                     frames calls and owns their connections)",
                )
            });
            continue;
        }
        if name.is_empty() || !is_clean(name) || name.contains(&b':') || !is_clean(value) {
            return None;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if !request.body.is_empty() || method.eq_ignore_ascii_case(b"POST") {
        out.extend_from_slice(format!("Content-Length: {}\r\n", request.body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&request.body);
    Some(out)
}

/// The answer Traffic Server's client read: status line and headers parsed with `httparse`,
/// the rest is the body. `None` for an answer that is not one, or not whole: Traffic Server's
/// client reports what came when its upstream stopped early, so a body shorter (or longer) than
/// its `Content-Length` fails the call rather than pass for the answer (`head`: the call was a
/// `HEAD`, whose answer has none). Messages name the answer's `upstream`.
fn decode(mut bytes: &[u8], head: bool, upstream: SocketAddr) -> Option<HttpCallResponse> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let (response, length) = loop {
        let mut response = httparse::Response::new(&mut headers);
        let length = match response.parse(bytes) {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) => {
                diag::warning(&format!(
                    "an HTTP call's answer from {upstream} ended before its header did: the call \
                     fails"
                ));
                return None;
            }
            Err(error) => {
                // Traffic Server checked the upstream's header; what is left is, e.g., more
                // than 128 fields.
                diag::warning(&format!(
                    "an HTTP call's answer header from {upstream} cannot be read ({error}): the \
                     call fails"
                ));
                return None;
            }
        };
        match response.code? {
            // A switch of protocols nobody asked for fails the call.
            101 => {
                diag::warning(&format!(
                    "an HTTP call to {upstream} was answered 101 (a switch of protocols): it fails"
                ));
                return None;
            }
            // An interim answer (100 Continue, 103 Early Hints) comes before the answer.
            100..=199 => bytes = &bytes[length..],
            _ => break (response, length),
        }
    };
    let code = response.code?;
    let body = &bytes[length..];
    let bodiless = head || crate::transaction::bodiless_status(u32::from(code));
    let mut map = HeaderMap::new();
    map.add(b":status", code.to_string().as_bytes());
    for header in response.headers.iter() {
        if !bodiless && header.name.eq_ignore_ascii_case("content-length") {
            let announced = std::str::from_utf8(header.value)
                .ok()
                .and_then(|value| value.trim().parse::<usize>().ok());
            if announced != Some(body.len()) {
                diag::warning(&format!(
                    "an HTTP call's answer from {upstream} announced {} bytes of body and {} \
                     came: the call fails",
                    String::from_utf8_lossy(header.value),
                    body.len()
                ));
                return None;
            }
        }
        map.add(header.name.to_ascii_lowercase().as_bytes(), header.value);
    }
    Some(HttpCallResponse {
        headers: map,
        body: body.to_vec(),
        trailers: HeaderMap::new(),
    })
}

/// The call's continuation: fetch events, the timeout, and an answer passed over from another
/// thread.
unsafe extern "C" fn on_event(cont: sys::TSCont, event: sys::TSEvent, data: *mut c_void) -> c_int {
    // SAFETY: the continuation's data is its callout until `finish` frees both.
    let callout = unsafe { sys::TSContDataGet(cont) }.cast::<Callout>();
    if callout.is_null() {
        return 0;
    }
    let event = event as c_int;
    let from_fetch = matches!(event, FETCH_SUCCESS | FETCH_FAILURE | FETCH_TIMEOUT);
    // SAFETY: the callout lives until `finish`.
    if !from_fetch && unsafe { (*callout).closing } {
        // SAFETY: the closing event is the continuation's last.
        unsafe { free(cont, callout) };
        return 0;
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: the callout lives until `finish`; events of this continuation are serialized
        // by its mutex, so this is the only reference.
        let callout = unsafe { &mut *callout };
        match event {
            FETCH_SUCCESS | FETCH_FAILURE | FETCH_TIMEOUT => {
                callout.fetch_done = true;
                let answer = if event == FETCH_SUCCESS {
                    let mut len: c_int = 0;
                    // SAFETY: on success the event's data is the fetch, whose response stays
                    // readable during this event.
                    let raw = unsafe { sys::TSFetchRespGet(data as sys::TSHttpTxn, &mut len) };
                    let bytes = if raw.is_null() || len <= 0 {
                        &[][..]
                    } else {
                        // SAFETY: as above, `len` bytes at `raw`.
                        unsafe { std::slice::from_raw_parts(raw.cast::<u8>(), len as usize) }
                    };
                    decode(bytes, callout.head, callout.upstream)
                } else {
                    None
                };
                if matches!(callout.progress, Progress::Waiting) {
                    if let Some(timeout) = callout.timeout.take() {
                        // SAFETY: the timeout is scheduled and has not fired (it clears
                        // `timeout` when it does).
                        unsafe { sys::TSActionCancel(timeout) };
                    }
                    callout.progress = judged(callout, answer, 0);
                    if let Progress::Judging { .. } = callout.progress {
                        // SAFETY: the continuation lives until delivered.
                        unsafe { sys::TSContScheduleOnThread(cont, JUDGING_STEP, callout.thread) };
                        return;
                    }
                    // SAFETY: called on an event thread.
                    if unsafe { sys::TSEventThreadSelf() } != callout.thread {
                        // SAFETY: the continuation lives until delivered (not finished
                        // while an answer is pending).
                        unsafe { sys::TSContScheduleOnThread(cont, 0, callout.thread) };
                        return;
                    }
                    deliver(cont, callout);
                }
            }
            _ => {
                // The timeout, or an answer passed over to this thread.
                callout.timeout = None;
                match std::mem::replace(&mut callout.progress, Progress::Delivered) {
                    Progress::Waiting => {
                        callout.progress = Progress::Arrived(None);
                        deliver(cont, callout);
                    }
                    Progress::Arrived(answer) => {
                        callout.progress = Progress::Arrived(answer);
                        deliver(cont, callout);
                    }
                    Progress::Judging { answer, asked } => {
                        callout.progress = judged(callout, answer, asked + 1);
                        if let Progress::Judging { .. } = callout.progress {
                            // SAFETY: the continuation lives until delivered.
                            unsafe {
                                sys::TSContScheduleOnThread(cont, JUDGING_STEP, callout.thread)
                            };
                        } else {
                            deliver(cont, callout);
                        }
                    }
                    Progress::Delivered => {}
                }
            }
        }
    }));
    if outcome.is_err() {
        diag::error("an HTTP call's answer panicked");
    }
    // SAFETY: as above.
    unsafe { finish(cont, callout, from_fetch) };
    0
}

/// Where a call stands once Traffic Server's client reported `answer` (`None`: it failed),
/// by its internal transaction's verdict, asked for the `asked`th time after the first.
fn judged(callout: &Callout, answer: Option<HttpCallResponse>, asked: u32) -> Progress {
    if answer.is_none() {
        crate::answer::forget(callout.call);
        return Progress::Arrived(None);
    }
    match crate::answer::verdict(callout.call) {
        crate::answer::Verdict::Whole => Progress::Arrived(answer),
        crate::answer::Verdict::Refused(why) => {
            crate::answer::log_refusal(callout.token, callout.upstream, why);
            Progress::Arrived(None)
        }
        crate::answer::Verdict::Pending
            if callout
                .expires
                .is_some_and(|at| std::time::Instant::now() >= at) =>
        {
            // The plugin's timeout passed meanwhile: the call fails as it would have then.
            crate::answer::forget(callout.call);
            Progress::Arrived(None)
        }
        crate::answer::Verdict::Pending if asked < JUDGING_TRIES => {
            Progress::Judging { answer, asked }
        }
        crate::answer::Verdict::Pending => {
            crate::answer::forget(callout.call);
            crate::answer::log_refusal(
                callout.token,
                callout.upstream,
                "its internal transaction did not close within 2 s of it",
            );
            Progress::Arrived(None)
        }
    }
}

/// Ends the call once its fetch and timeout are both over and its answer delivered. Traffic
/// Server's fetch still uses the continuation after its last event returns, so the
/// continuation goes in an event of its own after that.
///
/// # Safety
/// `callout` must be `cont`'s data, not used after this returns if it frees them.
unsafe fn finish(cont: sys::TSCont, callout: *mut Callout, from_fetch: bool) {
    // SAFETY: the caller's promise.
    let callout_ref = unsafe { &mut *callout };
    let done = callout_ref.fetch_done
        && callout_ref.timeout.is_none()
        && matches!(callout_ref.progress, Progress::Delivered);
    if !done {
        return;
    }
    if from_fetch {
        callout_ref.closing = true;
        // SAFETY: the continuation lives until that event frees it.
        unsafe { sys::TSContScheduleOnThread(cont, 0, callout_ref.thread) };
    } else {
        // SAFETY: the caller's promise; this is the continuation's own scheduled event.
        unsafe { free(cont, callout) };
    }
}

/// Frees the call and its continuation.
///
/// # Safety
/// Nothing may refer to either afterwards: the fetch has sent its last event and no event of
/// the continuation is scheduled.
unsafe fn free(cont: sys::TSCont, callout: *mut Callout) {
    // SAFETY: the caller's promise.
    let callout = unsafe {
        sys::TSContDataSet(cont, std::ptr::null_mut());
        sys::TSContDestroy(cont);
        Box::from_raw(callout)
    };
    // A watch still there (the call's fetch failed, or it timed out first) goes with the call.
    crate::answer::forget(callout.call);
}

/// Delivers the call's answer (or failure) to the VM copy that made it, on this thread, then
/// acts on what the plugin asked for its held transactions.
fn deliver(cont: sys::TSCont, callout: &mut Callout) {
    let Progress::Arrived(mut answer) =
        std::mem::replace(&mut callout.progress, Progress::Delivered)
    else {
        return;
    };
    let token = callout.token;
    if let AnswerTo::Service(inbox) = &callout.answer_to {
        match inbox.get() {
            Some(Some(inbox)) => inbox.post(Box::new(move |vm| {
                // The call is over: it no longer counts against the service's open calls.
                if let Some(host) = vm.host_as::<crate::host::AtsHost>() {
                    host.callouts.remove(&token);
                }
                match answer {
                    Some(response) => vm.on_http_call_response(token, response),
                    None => vm.on_http_call_failure(token),
                }
            })),
            // The service failed to start (its configuration refused, say): the answer is
            // dropped, and the call freed.
            Some(None) => {}
            None => {
                // The service is still starting: try again shortly.
                callout.progress = Progress::Arrived(answer);
                // SAFETY: the continuation lives until its answer is delivered.
                unsafe { sys::TSContScheduleOnThread(cont, 10, callout.thread) };
            }
        }
        return;
    }
    let delivered = with_thread(|state| {
        let mut pending = Vec::new();
        let mut found = false;
        state.workers.for_each_worker(|_, worker| {
            if found {
                return;
            }
            let mut failed = None;
            worker.for_each_copy(|_, vm, roots| {
                if found {
                    return;
                }
                let Some(host) = vm.host_as::<crate::host::AtsHost>() else {
                    return;
                };
                if !host.callouts.remove(&token) {
                    return;
                }
                found = true;
                let result = match answer.take() {
                    Some(response) => vm.on_http_call_response(token, response),
                    None => vm.on_http_call_failure(token),
                };
                if let Err(error) = result {
                    diag::error(&format!("proxy_on_http_call_response: {error}"));
                    failed = lifecycle::failing_plugin(roots, &error).map(|p| (p, error));
                }
                crate::transaction::pending_in(vm, &mut pending);
            });
            // Counted by its cause, and its policy's clock started, as a tick's failure is.
            if let Some((plugin, error)) = failed {
                worker.root_failed(plugin, &error);
            }
        });
        pending
    });
    match delivered {
        Some(pending) => crate::transaction::act_on(pending),
        None => {
            // The thread's plugins are busy (the answer came back inside one of their
            // callbacks): deliver it in an event of its own.
            callout.progress = Progress::Arrived(answer);
            // SAFETY: the continuation lives until its answer is delivered.
            unsafe { sys::TSContScheduleOnThread(cont, 0, callout.thread) };
        }
    }
}
