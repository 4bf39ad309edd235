//! A plugin's HTTP call seen from its internal transaction: the answer on its way back to
//! Traffic Server's client is bounded, and one cut short is told from a whole one.
//!
//! Traffic Server's client (`TSFetchUrl`) reads a whole answer into memory before it reports
//! it, and reports what came as the answer even when its upstream stopped early. So the
//! internal transaction watches the answer on its way and gives the call a verdict
//! ([`verdict`]) by the time it closes: an answer announcing more than [`MAX_ANSWER_BODY`] is
//! refused at its header (Traffic Server reads none of its body); one without a length passes
//! through a transform that counts it, refused once it passes the limit (the transaction is
//! ended) or when the transform closes before the body ended (its upstream cut it short, e.g.
//! a chunked body without its last chunk). An answer with a length that stops short of it is
//! caught where it is read (`crate::callout`'s `decode`).

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::{Mutex, OnceLock};

use crate::{diag, sys};

/// The largest answer body a call takes (more fails the call), so that an upstream cannot
/// make Traffic Server buffer without bound; as `pwhost serve`'s.
pub(crate) const MAX_ANSWER_BODY: i64 = 16 << 20;

/// Where the watch of a call's answer stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watch {
    /// The internal transaction is open; `counting`: its answer passes the counting transform,
    /// `ended`: which saw the answer's body end.
    Open { counting: bool, ended: bool },
    /// The answer was refused, for this reason.
    Refused(&'static str),
    /// The transaction closed with nothing against the answer.
    Closed,
}

/// The watches of calls in flight, by call number. An entry is made when the call's internal
/// transaction starts and goes when the call takes its verdict ([`verdict`]) or ends
/// ([`forget`]); the transaction only updates an entry that is there, so none is left behind
/// by a call that ended first.
fn watches() -> &'static Mutex<HashMap<usize, Watch>> {
    static WATCHES: OnceLock<Mutex<HashMap<usize, Watch>>> = OnceLock::new();
    WATCHES.get_or_init(Mutex::default)
}

/// Changes call `call`'s watch, if it has one, with `change`.
fn update(call: usize, change: impl FnOnce(Watch) -> Watch) {
    // A poisoned lock only means a panic elsewhere while holding it; the map is still whole.
    let mut watches = watches().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(watch) = watches.get_mut(&call) {
        *watch = change(*watch);
    }
}

/// Refuses call `call`'s answer (a first refusal's reason stays).
fn refuse(call: usize, why: &'static str) {
    update(call, |watch| match watch {
        Watch::Refused(_) => watch,
        _ => Watch::Refused(why),
    });
}

/// What a call's internal transaction says of the answer Traffic Server's client reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing against it: the transaction closed with the answer whole (or the call was
    /// never watched).
    Whole,
    /// Refused, for this reason: the call fails.
    Refused(&'static str),
    /// The answer's body was being counted and had not ended: it is judged when its
    /// transform or transaction closes. Ask again shortly.
    Pending,
}

/// The verdict on call `call`'s answer, once Traffic Server's client reported it; once given
/// (not [`Verdict::Pending`]), the watch goes. The client reports an answer only after the
/// transaction's response header hook (which refuses one over the limit by its length, or
/// starts counting one without), and after all of a counted body went through the transform
/// when it ended whole; so only a counted body that has not ended is left to judge.
pub(crate) fn verdict(call: usize) -> Verdict {
    let mut watches = watches().lock().unwrap_or_else(|e| e.into_inner());
    match watches.get(&call).copied() {
        None => Verdict::Whole,
        Some(Watch::Open {
            counting: true,
            ended: false,
        }) => Verdict::Pending,
        Some(Watch::Open { .. }) => {
            watches.remove(&call);
            Verdict::Whole
        }
        Some(Watch::Refused(why)) => {
            watches.remove(&call);
            Verdict::Refused(why)
        }
        Some(Watch::Closed) => {
            watches.remove(&call);
            Verdict::Whole
        }
    }
}

/// Drops call `call`'s watch (the call ended).
pub(crate) fn forget(call: usize) {
    let mut watches = watches().lock().unwrap_or_else(|e| e.into_inner());
    watches.remove(&call);
}

/// Why an answer is refused: over [`MAX_ANSWER_BODY`].
const OVER_THE_LIMIT: &str = "its body is over 16 MiB";

/// Why an answer is refused: its body did not end (its upstream, or Traffic Server, cut it).
const CUT_SHORT: &str = "its upstream ended it before its end";

/// Why an answer is refused: watching it panicked (a bug of this plugin), so it is not known
/// whole.
const NOT_WATCHED: &str = "watching it failed";

/// Runs a handler's `body`; a panic (unwinding into Traffic Server would abort it) is logged
/// and refuses call `call`'s answer.
fn guarded<T>(call: usize, on_panic: T, body: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(_) => {
            diag::error("watching an HTTP call's answer panicked");
            refuse(call, NOT_WATCHED);
            on_panic
        }
    }
}

/// Watches the answer of call `call` from now (before its request is sent): the watch is made
/// here, so that one is never left behind by a call that ends before its transaction starts
/// (the call forgets it, [`forget`]), and its transaction only updates it.
pub(crate) fn expect(call: usize) {
    let mut watches = watches().lock().unwrap_or_else(|e| e.into_inner());
    watches.insert(
        call,
        Watch::Open {
            counting: false,
            ended: false,
        },
    );
}

/// Watches the answer of call `call` (see [`expect`]) on its internal transaction `txn`.
///
/// # Safety
/// `txn` must be the transaction of the read-request-header hook being handled.
pub(crate) unsafe fn watch(txn: sys::TSHttpTxn, call: usize) {
    // SAFETY: a continuation without a mutex is called under the transaction's own lock; its
    // data is the call's number (not a pointer), and it goes at the transaction's close.
    unsafe {
        let cont = sys::TSContCreate(Some(on_transaction_event), std::ptr::null_mut());
        sys::TSContDataSet(cont, call as *mut c_void);
        sys::TSHttpTxnHookAdd(txn, sys::TS_HTTP_READ_RESPONSE_HDR_HOOK, cont);
        sys::TSHttpTxnHookAdd(txn, sys::TS_HTTP_TXN_CLOSE_HOOK, cont);
    }
}

/// The internal transaction's response header (refused over the limit, or given a counting
/// transform without a length) and close.
unsafe extern "C" fn on_transaction_event(
    cont: sys::TSCont,
    event: sys::TSEvent,
    data: *mut c_void,
) -> c_int {
    let txn = data as sys::TSHttpTxn;
    // SAFETY: the continuation's data is the call's number, set in `watch`.
    let call = unsafe { sys::TSContDataGet(cont) } as usize;
    if event == sys::TS_EVENT_HTTP_TXN_CLOSE {
        update(call, closed);
        // SAFETY: the transaction's last event of this continuation; nothing else holds it.
        unsafe {
            sys::TSContDestroy(cont);
            sys::TSHttpTxnReenable(txn, sys::TS_EVENT_HTTP_CONTINUE);
        }
        return 0;
    }
    let mut next = sys::TS_EVENT_HTTP_CONTINUE;
    if event == sys::TS_EVENT_HTTP_READ_RESPONSE_HDR {
        use crate::transaction::OriginBody;
        // Traffic Server's error path (on a refusal, or a panic): none of the body is read, the
        // upstream's connection is closed, and its client gets an error of Traffic Server's own.
        next = guarded(call, sys::TS_EVENT_HTTP_ERROR, || {
            match crate::transaction::origin_response_body(txn) {
                OriginBody::Length(length) if length > MAX_ANSWER_BODY as u64 => {
                    refuse(call, OVER_THE_LIMIT);
                    return sys::TS_EVENT_HTTP_ERROR;
                }
                // Checked against its length where it is read.
                OriginBody::Length(_) | OriginBody::None => {}
                // SAFETY: `txn` is held by this hook, where a response transform may be added.
                OriginBody::UntilItsEnd => unsafe { add_counter(txn, call) },
            }
            sys::TS_EVENT_HTTP_CONTINUE
        });
    }
    // SAFETY: every event of an HTTP hook carries its transaction, held until reenabled.
    unsafe { sys::TSHttpTxnReenable(txn, next) };
    0
}

/// A watch once its transaction or its counting transform closed: an answer still being
/// counted was cut short.
fn closed(watch: Watch) -> Watch {
    match watch {
        Watch::Open {
            counting: true,
            ended: false,
        } => Watch::Refused(CUT_SHORT),
        Watch::Open { .. } => Watch::Closed,
        done => done,
    }
}

/// A counting transform's state, owned by its continuation.
struct Counter {
    /// The call whose answer this is.
    call: usize,
    /// What went on so far.
    passed: i64,
    /// The output's buffer, its reader and the write to the next VConn, once started.
    output: Option<(sys::TSIOBuffer, sys::TSIOBufferReader, sys::TSVIO)>,
    /// Refused: nothing more passes.
    done: bool,
}

/// Adds a transform counting the answer's body to `txn`.
///
/// # Safety
/// `txn` must be held in its read-response-header hook.
unsafe fn add_counter(txn: sys::TSHttpTxn, call: usize) {
    update(call, |watch| match watch {
        Watch::Open { ended, .. } => Watch::Open {
            counting: true,
            ended,
        },
        other => other,
    });
    let state = Box::new(Counter {
        call,
        passed: 0,
        output: None,
        done: false,
    });
    // SAFETY: the transform's data is the boxed state, freed when Traffic Server closes the
    // transform (`on_counter_event`).
    unsafe {
        let connection = sys::TSTransformCreate(Some(on_counter_event), txn);
        sys::TSContDataSet(connection, Box::into_raw(state).cast());
        sys::TSHttpTxnHookAdd(txn, sys::TS_HTTP_RESPONSE_TRANSFORM_HOOK, connection);
    }
}

/// The counting transform's events (Traffic Server's null-transform pattern, as in
/// `crate::body`).
unsafe extern "C" fn on_counter_event(
    connection: sys::TSCont,
    event: sys::TSEvent,
    _data: *mut c_void,
) -> c_int {
    // SAFETY: the data is the state boxed in `add_counter`, until freed here on close.
    let state = unsafe { sys::TSContDataGet(connection) }.cast::<Counter>();
    // SAFETY: `connection` is the transform Traffic Server calls.
    if unsafe { sys::TSVConnClosedGet(connection) } != 0 {
        if !state.is_null() {
            // SAFETY: as below; the state is read before it is freed.
            let call = unsafe { (*state).call };
            // Closed before the body ended (and before its transaction closed): the chain was
            // aborted, the upstream's side first.
            update(call, |watch| match watch {
                Watch::Open { counting: true, .. } => closed(watch),
                other => other,
            });
            // SAFETY: closed: no more events with this state; it is freed exactly once, with
            // the output's buffer and reader made for it.
            unsafe {
                sys::TSContDataSet(connection, std::ptr::null_mut());
                let state = Box::from_raw(state);
                if let Some((buffer, reader, _)) = state.output {
                    sys::TSIOBufferReaderFree(reader);
                    sys::TSIOBufferDestroy(buffer);
                }
            }
        }
        // SAFETY: Traffic Server closed the transform; its continuation goes with it.
        unsafe { sys::TSContDestroy(connection) };
        return 0;
    }
    if state.is_null() {
        return 0;
    }
    // SAFETY: events of the transform are serialized; this is the only reference.
    let state = unsafe { &mut *state };
    match event {
        sys::TS_EVENT_ERROR => {
            if state.done {
                // The transform refused the answer itself and told its writer already.
                return 0;
            }
            // A side of the transform failed: what reaches the call is not the whole answer.
            refuse(state.call, CUT_SHORT);
            // SAFETY: the input VIO of a live transform; its continuation is told.
            unsafe {
                let input = sys::TSVConnWriteVIOGet(connection);
                sys::TSContCall(sys::TSVIOContGet(input), sys::TS_EVENT_ERROR, input.cast());
            }
        }
        sys::TS_EVENT_VCONN_WRITE_COMPLETE => {
            // The client's side took everything: the transform's output is done.
            // SAFETY: the output VConn of a live transform.
            unsafe { sys::TSVConnShutdown(sys::TSTransformOutputVConnGet(connection), 0, 1) };
        }
        // SAFETY: a live transform (not closed, checked above).
        _ => guarded(state.call, (), || unsafe { pass(connection, state) }),
    }
    0
}

/// Passes what came of the body on, counting it; past [`MAX_ANSWER_BODY`] the call is refused
/// and the transaction ended as `crate::body` ends one (an error to the body's writer, which
/// aborts the chain: the upstream's connection closes, and so does the client's).
///
/// # Safety
/// `connection` must be a live (not closed) transform whose state is `state`.
unsafe fn pass(connection: sys::TSCont, state: &mut Counter) {
    if state.done {
        return;
    }
    // SAFETY: the caller's promise: the transform, its output VConn and its input VIO live.
    unsafe {
        let input = sys::TSVConnWriteVIOGet(connection);
        let (buffer, _, output) = *state.output.get_or_insert_with(|| {
            let buffer = sys::TSIOBufferCreate();
            let reader = sys::TSIOBufferReaderAlloc(buffer);
            let vio = sys::TSVConnWrite(
                sys::TSTransformOutputVConnGet(connection),
                connection,
                reader,
                i64::MAX,
            );
            (buffer, reader, vio)
        });
        if sys::TSVIOBufferGet(input).is_null() {
            // The writer is gone: what came is all there is (an answer without a length ends
            // with its connection).
            ended(state.call);
            sys::TSVIONBytesSet(output, state.passed);
            sys::TSVIOReenable(output);
            return;
        }
        let reader = sys::TSVIOReaderGet(input);
        let available = sys::TSIOBufferReaderAvail(reader).min(sys::TSVIONTodoGet(input));
        if available > 0 {
            if state.passed.saturating_add(available) > MAX_ANSWER_BODY {
                refuse(state.call, OVER_THE_LIMIT);
                state.done = true;
                sys::TSContCall(sys::TSVIOContGet(input), sys::TS_EVENT_ERROR, input.cast());
                return;
            }
            sys::TSIOBufferCopy(buffer, reader, available, 0);
            sys::TSIOBufferReaderConsume(reader, available);
            sys::TSVIONDoneSet(input, sys::TSVIONDoneGet(input) + available);
            state.passed += available;
        }
        if sys::TSVIONTodoGet(input) > 0 {
            if available > 0 {
                sys::TSVIOReenable(output);
                sys::TSContCall(
                    sys::TSVIOContGet(input),
                    sys::TS_EVENT_VCONN_WRITE_READY,
                    input.cast(),
                );
            }
        } else {
            ended(state.call);
            sys::TSVIONBytesSet(output, state.passed);
            sys::TSVIOReenable(output);
            sys::TSContCall(
                sys::TSVIOContGet(input),
                sys::TS_EVENT_VCONN_WRITE_COMPLETE,
                input.cast(),
            );
        }
    }
}

/// Records that the answer's body ended whole.
fn ended(call: usize) {
    update(call, |watch| match watch {
        Watch::Open { counting, .. } => Watch::Open {
            counting,
            ended: true,
        },
        other => other,
    });
}

/// Logs why call `token`'s answer was refused, for its plugin's operator.
pub(crate) fn log_refusal(token: u32, upstream: std::net::SocketAddr, why: &str) {
    diag::warning(&format!(
        "the answer to HTTP call {token} from {upstream} was refused ({why}): the call fails"
    ));
}
