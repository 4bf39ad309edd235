//! Bodies: Traffic Server transforms (`TSTransformCreate`) on the request body (on its way to
//! the origin) and the response body (on its way to the client), each chunk passed through the
//! plugins' body callbacks with `end_of_stream`, and what they let through written on.
//!
//! The transform follows Traffic Server's null-transform pattern: bytes are taken from the
//! input VIO as they come, the plugins decide what goes on (a chunk, or everything they had
//! buffered), and that is written to the output VIO, whose size is set once the input ends.

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::rc::Rc;

use crate::chunked::Dechunker;
use crate::transaction::Transaction;
use crate::{diag, sys};

/// Which body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    Request,
    Response,
}

impl Direction {
    /// The body's name in messages: "request" or "response".
    pub(crate) fn name(self) -> &'static str {
        match self {
            Direction::Request => "request",
            Direction::Response => "response",
        }
    }
}

/// The event a transaction wakes its request transform up with (see
/// `Transaction::wake_request_transform`): one Traffic Server never sends a transform, and not
/// an immediate or interval event, which Traffic Server counts against those it scheduled on
/// the continuation (it frees a closed one when that count is back to zero).
pub(crate) const WAKE: sys::TSEvent = sys::TS_EVENT_CONTINUE;

/// The transaction a transform works for; null once the transaction closed.
pub(crate) type TransactionLink = Rc<Cell<*mut Transaction>>;

/// A transform's state, owned by its continuation.
struct BodyTransform {
    direction: Direction,
    /// The transaction whose body this is (its client's connection is closed when a plugin
    /// ends a request some of which went out: see [`fail`]).
    txn: sys::TSHttpTxn,
    transaction: TransactionLink,
    output: Option<Output>,
    written: i64,
    done: bool,
    /// How a request body's length reaches the origin.
    framing: Framing,
    /// A chunked request body is decoded before the plugins see it (and goes to the origin
    /// framed by its length).
    dechunk: Option<Dechunker>,
    /// The input's end went through the plugins; the transform waits for a plugin holding the
    /// request (its headers, or its body at its end; woken by the transaction) and runs no
    /// plugin again.
    input_ended: bool,
    /// Traffic Server started the transform (its first event came): before that a wake-up
    /// has nothing to do (there is no input yet, and what a hold released waits for it).
    started: bool,
}

/// How a transformed request body is framed to the origin. Traffic Server sends it with the
/// length the transform's output write has when the write starts (its terminus reports the
/// length as soon as the write is opened, and a request transform without one is refused), so
/// the output is opened only once its length is settled, and exactly that many bytes follow:
/// fewer would leave the origin waiting, more would be read as the start of the next request on
/// the connection.
enum Framing {
    /// Not decided yet (before the first event), or a response body, which Traffic Server frames
    /// itself (chunked, or with the length set at its end).
    Open,
    /// The plugins may change the length (one dropped `Content-Length`, or the client's body
    /// is chunked), or a plugin holds the request headers: what they let through is kept here,
    /// and the output opens once the body ended (its length known), once this passes the buffer
    /// limit, or, for a body with a length that no plugin changes or keeps, as soon as a hold
    /// on the headers ended (it goes on as it comes from then on).
    Withheld(Vec<u8>),
    /// The body's length is `length` (the client's, or the withheld body's once known); the
    /// output opens with it when the first bytes go (or at the body's end, with the length of
    /// what the plugins let through, if nothing went before). Client bytes the plugins have not
    /// let through yet are kept in `behind`: once the output is open, what they let through
    /// must be as long as what it stands for, else the client's bytes go instead and the rest
    /// of the body passes the plugins by (`bypass`).
    Committed {
        length: i64,
        behind: Vec<u8>,
        bypass: bool,
    },
    /// The transaction ends: Traffic Server was made to refuse the request before the origin
    /// saw any of it (see [`refuse`]), or a plugin ended the body once it began to go on (see
    /// [`fail`]). Nothing more is written.
    Refused,
}

/// The output side: a buffer, its reader and the write to the next VConn.
struct Output {
    buffer: sys::TSIOBuffer,
    reader: sys::TSIOBufferReader,
    vio: sys::TSVIO,
}

/// Adds a transform of `direction`'s body to `txn`, for `transaction`'s plugins, and returns
/// it (the transaction wakes a request transform up when a hold on the headers ends).
///
/// # Safety
/// `txn` must be a transaction held by this plugin in one of its hooks.
pub(crate) unsafe fn add(
    txn: sys::TSHttpTxn,
    direction: Direction,
    transaction: TransactionLink,
) -> sys::TSCont {
    let state = Box::new(BodyTransform {
        direction,
        txn,
        transaction,
        output: None,
        written: 0,
        done: false,
        framing: Framing::Open,
        dechunk: None,
        input_ended: false,
        started: false,
    });
    let hook = match direction {
        Direction::Request => sys::TS_HTTP_REQUEST_TRANSFORM_HOOK,
        Direction::Response => sys::TS_HTTP_RESPONSE_TRANSFORM_HOOK,
    };
    // SAFETY: the transform's data is the boxed state, freed when Traffic Server closes the
    // transform (`on_event`).
    unsafe {
        let connection = sys::TSTransformCreate(Some(on_event), txn);
        sys::TSContDataSet(connection, Box::into_raw(state).cast());
        sys::TSHttpTxnHookAdd(txn, hook, connection);
        connection
    }
}

/// The transform's events.
unsafe extern "C" fn on_event(
    connection: sys::TSCont,
    event: sys::TSEvent,
    _data: *mut c_void,
) -> c_int {
    // SAFETY: the data is the state boxed in `add`, until freed here on close.
    let state = unsafe { sys::TSContDataGet(connection) }.cast::<BodyTransform>();
    // SAFETY: `connection` is the transform Traffic Server calls.
    if unsafe { sys::TSVConnClosedGet(connection) } != 0 {
        if !state.is_null() {
            // SAFETY: the state lives until freed just below; the transaction behind its link
            // is open (its close clears the link) and runs on this thread.
            unsafe {
                let link = (*state).transaction.get();
                if (*state).direction == Direction::Request && !link.is_null() {
                    (*link).request_transform_closed();
                }
            }
            // SAFETY: closed: no more events with this state; it is freed exactly once.
            unsafe {
                sys::TSContDataSet(connection, std::ptr::null_mut());
                free(*Box::from_raw(state));
            }
        }
        // SAFETY: Traffic Server closed the transform; its continuation goes with it.
        unsafe { sys::TSContDestroy(connection) };
        return 0;
    }
    if state.is_null() {
        return 0;
    }
    match event {
        sys::TS_EVENT_ERROR => {
            // SAFETY: the input VIO of a live transform; its continuation is told.
            unsafe {
                let input = sys::TSVConnWriteVIOGet(connection);
                sys::TSContCall(sys::TSVIOContGet(input), sys::TS_EVENT_ERROR, input.cast());
            }
        }
        sys::TS_EVENT_VCONN_WRITE_COMPLETE => {
            // The next VConn took everything: the transform's output side is done.
            // SAFETY: the output VConn of a live transform.
            unsafe { sys::TSVConnShutdown(sys::TSTransformOutputVConnGet(connection), 0, 1) };
        }
        _ => {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // SAFETY: events of the transform are serialized; this is the only reference.
                let state = unsafe { &mut *state };
                if event == WAKE && !state.started {
                    return;
                }
                state.started = true;
                // SAFETY: a live transform (not closed, checked above).
                unsafe { transfer(connection, state) };
            }));
            if outcome.is_err() {
                diag::error("a body transform panicked");
            }
        }
    }
    0
}

fn free(state: BodyTransform) {
    if let Some(output) = &state.output {
        // SAFETY: the reader and buffer were made for this transform and are used no more.
        unsafe {
            sys::TSIOBufferReaderFree(output.reader);
            sys::TSIOBufferDestroy(output.buffer);
        }
    }
}

/// Starts the transform's output write, `length` bytes long (`i64::MAX`: until its end).
///
/// # Safety
/// `connection` must be a live (not closed) transform.
unsafe fn open_output(connection: sys::TSCont, length: i64) -> Output {
    // SAFETY: the caller's promise: the transform and its output VConn live.
    unsafe {
        let buffer = sys::TSIOBufferCreate();
        let reader = sys::TSIOBufferReaderAlloc(buffer);
        let vio = sys::TSVConnWrite(
            sys::TSTransformOutputVConnGet(connection),
            connection,
            reader,
            length,
        );
        Output {
            buffer,
            reader,
            vio,
        }
    }
}

/// Makes Traffic Server refuse the request before the origin sees any of it: a request
/// transform whose output write has no length is an error to Traffic Server, which then answers
/// the client with an error (or resets it while it still sends). Only while the output is not
/// open.
///
/// # Safety
/// `connection` must be a live (not closed) request transform whose state is `state`.
unsafe fn refuse(connection: sys::TSCont, state: &mut BodyTransform) {
    if state.output.is_none() {
        // SAFETY: the caller's promise.
        state.output = Some(unsafe { open_output(connection, i64::MAX) });
    }
    state.framing = Framing::Refused;
    state.done = true;
}

/// Ends a request whose body a plugin cut: refused if none of it went out (the origin never
/// sees it, see [`refuse`]), else the transaction is ended (see [`fail`]).
///
/// # Safety
/// As [`fail`]'s, for a request transform.
unsafe fn end_cut_request(connection: sys::TSCont, state: &mut BodyTransform) {
    // SAFETY: the caller's promise.
    unsafe {
        match state.output {
            None => refuse(connection, state),
            Some(_) => fail(connection, state),
        }
    }
}

/// Ends the transaction when a plugin ended a body (it failed closed, answered or closed the
/// stream) once some of the request went to the origin, or at any point of a response: the
/// transform reports an error to the body's writer, and Traffic Server aborts the whole chain
/// it feeds, closing the origin connection and, for a response, the client's, so neither side
/// ever takes what was cut short for a whole message (nor waits for the rest of the length it
/// was given). A response none of which went out gets Traffic Server's error path, where the
/// transaction puts its reply on (`Transaction::body_through`).
///
/// Traffic Server then waits on a request's client without end (it reads no origin response
/// for the transaction and is not told the client's request failed), so an HTTP/1 client's
/// connection, which carries only this transaction, is given an active timeout that has
/// already passed: Traffic Server closes it at its next timeout check (within a second). An
/// HTTP/2 connection carries other streams and is left alone: the stream ends at its own
/// timeouts. Nothing more is written.
///
/// # Safety
/// `connection` must be a live transform whose state is `state`, of an open transaction.
unsafe fn fail(connection: sys::TSCont, state: &mut BodyTransform) {
    if state.direction == Direction::Request {
        // SAFETY: the caller's promise: the transaction is open, so its session and client
        // connection are live (until the error below, which may close them); the tag is
        // NUL-terminated.
        unsafe {
            let http1 =
                !sys::TSHttpTxnClientProtocolStackContains(state.txn, c"http/1".as_ptr()).is_null();
            let session = sys::TSHttpTxnSsnGet(state.txn);
            let client = match session.is_null() {
                true => std::ptr::null_mut(),
                false => sys::TSHttpSsnClientVConnGet(session),
            };
            if http1 && !client.is_null() {
                sys::TSVConnActiveTimeoutSet(client, 1);
            }
        }
    }
    // SAFETY: the caller's promise: the input VIO of a live transform; its continuation is told,
    // as for the transform's own errors (`on_event`). Traffic Server closes the transform with
    // an event of its own, after this handler, so `state` outlives the call; the transaction's
    // client side may be gone after it (a response's is closed at once), so nothing of the
    // transaction is used after it.
    unsafe {
        let input = sys::TSVConnWriteVIOGet(connection);
        sys::TSContCall(sys::TSVIOContGet(input), sys::TS_EVENT_ERROR, input.cast());
    }
    state.framing = Framing::Refused;
    state.done = true;
}

/// Appends `bytes` to the output.
///
/// # Safety
/// `output` must be the output of a live transform.
unsafe fn write(output: &Output, written: &mut i64, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let length = i64::try_from(bytes.len()).unwrap_or(i64::MAX);
    // SAFETY: the caller's promise; Traffic Server copies the bytes.
    unsafe { sys::TSIOBufferWrite(output.buffer, bytes.as_ptr().cast(), length) };
    *written = written.saturating_add(length);
}

/// Moves what the input has through the plugins to the output.
///
/// # Safety
/// `connection` must be a live (not closed) transform whose state is `state`.
unsafe fn transfer(connection: sys::TSCont, state: &mut BodyTransform) {
    if state.done {
        return;
    }
    // SAFETY: the caller's promise: the transform, its output VConn and its input VIO live. The
    // transaction behind `link` is open (its close clears the link) and runs on this thread; a
    // reference to it is made for one call at a time (`run`, `cut`, `release`), never kept.
    unsafe {
        let direction = state.direction;
        let input = sys::TSVConnWriteVIOGet(connection);
        let link = state.transaction.get();
        if matches!(state.framing, Framing::Open) && direction == Direction::Request {
            let transaction = (!link.is_null()).then(|| &*link);
            if transaction.is_some_and(Transaction::request_body_chunked) {
                state.dechunk = Some(Dechunker::new());
            }
            let withheld = state.dechunk.is_some()
                || transaction.is_some_and(Transaction::request_body_withheld);
            // The client's length, when its body has one (a chunked body's is its encoding's).
            let client_length =
                Some(sys::TSVIONBytesGet(input)).filter(|n| (0..i64::MAX).contains(n));
            state.framing = match client_length {
                Some(length) if !withheld => Framing::Committed {
                    length,
                    behind: Vec::new(),
                    bypass: false,
                },
                _ => Framing::Withheld(Vec::new()),
            };
        }
        // No buffer: the writer is gone; what came is all there is.
        let input_open = !sys::TSVIOBufferGet(input).is_null();
        let mut chunk = Vec::new();
        let mut consumed = false;
        if input_open {
            let todo = sys::TSVIONTodoGet(input);
            let reader = sys::TSVIOReaderGet(input);
            let available = sys::TSIOBufferReaderAvail(reader).min(todo);
            if available > 0 {
                consumed = true;
                read_into(reader, available, &mut chunk);
                sys::TSIOBufferReaderConsume(reader, available);
                sys::TSVIONDoneSet(input, sys::TSVIONDoneGet(input) + available);
            }
        }
        let all_came = input_open && sys::TSVIONTodoGet(input) <= 0;
        let mut end_of_stream = !input_open || all_came;
        // Whether the body came whole (not cut short by its client, or malformed).
        let mut whole = all_came;
        if let Some(decoder) = &mut state.dechunk {
            let mut decoded = Vec::with_capacity(chunk.len());
            match decoder.feed(&chunk, &mut decoded) {
                Ok(()) => whole = decoder.is_done(),
                Err(malformed) => {
                    // Traffic Server checked the framing on its way in: not expected.
                    diag::error(&format!(
                        "the chunked request body cannot be decoded ({}): the request is \
                         refused",
                        malformed.0
                    ));
                    whole = false;
                    end_of_stream = true;
                }
            }
            if decoder.is_done() {
                end_of_stream = true;
                if std::mem::take(&mut decoder.had_trailers) {
                    diag::warning(
                        "the chunked request body's trailers are dropped: the body goes to the \
                         origin framed by its length, which cannot carry them",
                    );
                }
            }
            chunk = decoded;
        }
        if chunk.is_empty() && !end_of_stream {
            if consumed {
                // Only chunk framing came: the writer may go on.
                sys::TSContCall(
                    sys::TSVIOContGet(input),
                    sys::TS_EVENT_VCONN_WRITE_READY,
                    input.cast(),
                );
            }
            return;
        }
        let run = |chunk: Vec<u8>| match link.is_null() {
            true => chunk,
            false => (*link).body_chunk(direction, chunk, end_of_stream),
        };
        // Whether a plugin failing closed ended the body.
        let cut = || !link.is_null() && (*link).body_cut(direction);
        let release = |keep: bool| match link.is_null() {
            true => Vec::new(),
            false => (*link).release_body(direction, keep),
        };
        let limit = crate::buffer_limit_bytes();
        let written_before = state.written;
        if !link.is_null() && direction == Direction::Request {
            // A plugin may hold the request at the body's end only while none of it went out.
            (*link).set_request_output_open(state.output.is_some());
        }
        match &mut state.framing {
            Framing::Open => {
                // A response's length is known only at its end (the plugins may change it):
                // the write starts unbounded and gets its length at the end, and Traffic
                // Server sends the response chunked unless that end came first (a body that
                // arrived at once keeps a Content-Length).
                let forward = run(chunk);
                if cut() {
                    fail(connection, state);
                    return;
                }
                let output = state
                    .output
                    .get_or_insert_with(|| open_output(connection, i64::MAX));
                write(output, &mut state.written, &forward);
            }
            Framing::Refused => return,
            Framing::Withheld(kept) => {
                if !link.is_null() {
                    // What a hold on the request (headers or body) let go of since.
                    kept.extend((*link).take_released_request_body());
                }
                if !state.input_ended {
                    kept.extend(run(chunk));
                    state.input_ended = end_of_stream;
                }
                if cut() || (end_of_stream && !whole) {
                    // A plugin failed closed, or the body did not come whole: the origin has
                    // seen none of the request, and is not sent a body cut short as if whole.
                    if !cut() {
                        diag::error(
                            "the request body ended before its end (the client went away): \
                             the request is refused",
                        );
                    }
                    refuse(connection, state);
                    return;
                }
                if end_of_stream && !link.is_null() && (*link).request_held() {
                    // The whole body is in; a plugin holding the request (its headers, or its
                    // body at its end) decides (the transaction wakes the transform up then).
                    // The input's writer is not told it is done until the body goes on.
                    return;
                }
                let client_length = Some(sys::TSVIONBytesGet(input))
                    .filter(|n| (0..i64::MAX).contains(n) && state.dechunk.is_none());
                // Withheld only while a plugin held the request headers, which it let go, and no
                // plugin keeps any of the body: it goes on from here as any body with a length,
                // what the plugins let through so far first (the plugins keep the rest of its
                // length, or it goes on unchanged: see `Committed`).
                let may_commit = !link.is_null()
                    && !(*link).request_body_withheld()
                    && !(*link).request_body_kept();
                if let (false, true, Some(client_length)) =
                    (end_of_stream, may_commit, client_length)
                {
                    let body = std::mem::take(kept);
                    let rest = (client_length - sys::TSVIONDoneGet(input)).max(0);
                    let length = i64::try_from(body.len())
                        .unwrap_or(i64::MAX)
                        .saturating_add(rest);
                    let output = state.output.insert(open_output(connection, length));
                    write(output, &mut state.written, &body);
                    state.framing = Framing::Committed {
                        length,
                        behind: Vec::new(),
                        bypass: false,
                    };
                } else if end_of_stream || kept.len() > limit {
                    let mut body = std::mem::take(kept);
                    let (length, bypass) = if end_of_stream {
                        (i64::try_from(body.len()).unwrap_or(i64::MAX), false)
                    } else if let Some(client_length) = client_length {
                        // Too much to keep: the plugins let go of what they buffer and see no
                        // more of this body, whose rest goes on unchanged, so its length is
                        // known now.
                        body.append(&mut release(true));
                        diag::error(&format!(
                            "the request body passed the buffer limit ({limit} bytes) while \
                             withheld until its length is known: the plugins see no more of \
                             it, and the rest goes on unchanged"
                        ));
                        let rest = (client_length - sys::TSVIONDoneGet(input)).max(0);
                        let body_length = i64::try_from(body.len()).unwrap_or(i64::MAX);
                        (body_length.saturating_add(rest), true)
                    } else {
                        // A chunked body cannot be framed before its end, and keeping all of
                        // it would let a client take any memory.
                        diag::error(&format!(
                            "a chunked request body passed the buffer limit ({limit} bytes) \
                             before its end, so its length cannot be sent to the origin: the \
                             request is refused"
                        ));
                        refuse(connection, state);
                        return;
                    };
                    let output = state.output.insert(open_output(connection, length));
                    write(output, &mut state.written, &body);
                    state.framing = Framing::Committed {
                        length,
                        behind: Vec::new(),
                        bypass,
                    };
                }
            }
            Framing::Committed {
                length: committed,
                behind,
                bypass,
            } => {
                let length = *committed;
                if state.input_ended {
                    // Woken after a plugin held the body at its end, before any of the
                    // request went out: what the plugins let go of now is the whole body.
                    if cut() {
                        refuse(connection, state);
                        return;
                    }
                    if link.is_null() || (*link).request_held() {
                        return;
                    }
                    let released = (*link).take_released_request_body();
                    let released_length = i64::try_from(released.len()).unwrap_or(i64::MAX);
                    *committed = released_length;
                    let output = state
                        .output
                        .insert(open_output(connection, released_length));
                    write(output, &mut state.written, &released);
                } else if *bypass {
                    let output = state
                        .output
                        .get_or_insert_with(|| open_output(connection, length));
                    write(output, &mut state.written, &chunk);
                } else if cut() {
                    // E.g. a reply decided from a hold on the headers before the body came.
                    end_cut_request(connection, state);
                    return;
                } else {
                    behind.extend_from_slice(&chunk);
                    let forward = run(chunk);
                    let too_far_behind = behind.len() > limit;
                    if cut() {
                        end_cut_request(connection, state);
                        return;
                    } else if end_of_stream && state.output.is_none() {
                        if !whole {
                            diag::error(
                                "the request body ended before its end (the client went \
                                 away): the request is refused",
                            );
                            refuse(connection, state);
                            return;
                        }
                        if !link.is_null() && (*link).request_held() {
                            // A plugin holds the body at its end (e.g. while a callout checks
                            // it) and none of the request went out: the transform waits for
                            // it (the transaction wakes it up), the input's writer not told
                            // it is done meanwhile. (What came through the plugins before it
                            // goes first then; none can, as the holder keeps what reaches it.)
                            (*link).put_released_request_body_first(forward);
                            state.input_ended = true;
                            return;
                        }
                        // Nothing went out yet: the length is the body's own, whatever the
                        // plugins did (a plugin buffering the body to its end may change it).
                        let length = i64::try_from(forward.len()).unwrap_or(i64::MAX);
                        let output = state.output.insert(open_output(connection, length));
                        write(output, &mut state.written, &forward);
                    } else if forward.len() == behind.len() && !too_far_behind {
                        if !forward.is_empty() {
                            let output = state
                                .output
                                .get_or_insert_with(|| open_output(connection, length));
                            write(output, &mut state.written, &forward);
                        }
                        behind.clear();
                    } else if !forward.is_empty() || end_of_stream || too_far_behind {
                        // The plugins changed the length of a body whose length the origin is
                        // given (or hold more of it than the buffer limit): the client's bytes
                        // go instead, and the plugins see no more of it.
                        diag::error(
                            "a plugin changed the length of a request body whose length was \
                             already sent to the origin (a plugin that changes it must remove \
                             Content-Length in its request headers), or held more of it than \
                             the buffer limit: the body goes on unchanged",
                        );
                        let output = state
                            .output
                            .get_or_insert_with(|| open_output(connection, length));
                        write(output, &mut state.written, behind);
                        behind.clear();
                        *bypass = true;
                        release(false);
                    }
                }
            }
        }
        let Some(output) = &state.output else {
            // Withheld (or nothing let through yet): nothing goes out yet; the input may go on.
            sys::TSContCall(
                sys::TSVIOContGet(input),
                sys::TS_EVENT_VCONN_WRITE_READY,
                input.cast(),
            );
            return;
        };
        let output_vio = output.vio;
        if end_of_stream {
            state.done = true;
            if let Framing::Committed { length, .. } = state.framing {
                if length != state.written && whole {
                    diag::error(&format!(
                        "the request body sent to the origin has {} bytes where its length \
                         says {length}",
                        state.written
                    ));
                }
            }
            sys::TSVIONBytesSet(output_vio, state.written);
            sys::TSVIOReenable(output_vio);
            if input_open {
                sys::TSContCall(
                    sys::TSVIOContGet(input),
                    sys::TS_EVENT_VCONN_WRITE_COMPLETE,
                    input.cast(),
                );
            }
        } else {
            if state.written != written_before {
                sys::TSVIOReenable(output_vio);
            }
            sys::TSContCall(
                sys::TSVIOContGet(input),
                sys::TS_EVENT_VCONN_WRITE_READY,
                input.cast(),
            );
        }
    }
}

/// Appends the first `length` bytes readable from `reader` to `out`, block by block.
///
/// # Safety
/// `reader` must be a live reader with at least `length` bytes available.
pub(crate) unsafe fn read_into(reader: sys::TSIOBufferReader, length: i64, out: &mut Vec<u8>) {
    let mut left = length;
    // SAFETY: the caller's promise; each block's bytes are readable while the reader is.
    unsafe {
        let mut block = sys::TSIOBufferReaderStart(reader);
        while !block.is_null() && left > 0 {
            let mut available: i64 = 0;
            let start = sys::TSIOBufferBlockReadStart(block, reader, &mut available);
            let take = available.min(left);
            if !start.is_null() && take > 0 {
                out.extend_from_slice(std::slice::from_raw_parts(
                    start.cast::<u8>(),
                    take as usize,
                ));
                left -= take;
            }
            block = sys::TSIOBufferBlockNext(block);
        }
    }
}
