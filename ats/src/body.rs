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

use crate::transaction::Transaction;
use crate::{diag, sys};

/// Which body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    Request,
    Response,
}

/// The transaction a transform works for; null once the transaction closed.
pub(crate) type TransactionLink = Rc<Cell<*mut Transaction>>;

/// A transform's state, owned by its continuation.
struct BodyTransform {
    direction: Direction,
    transaction: TransactionLink,
    output: Option<Output>,
    written: i64,
    done: bool,
}

/// The output side: a buffer, its reader and the write to the next VConn.
struct Output {
    buffer: sys::TSIOBuffer,
    reader: sys::TSIOBufferReader,
    vio: sys::TSVIO,
}

/// Adds a transform of `direction`'s body to `txn`, for `transaction`'s plugins.
///
/// # Safety
/// `txn` must be a transaction held by this plugin in one of its hooks.
pub(crate) unsafe fn add(txn: sys::TSHttpTxn, direction: Direction, transaction: TransactionLink) {
    let state = Box::new(BodyTransform {
        direction,
        transaction,
        output: None,
        written: 0,
        done: false,
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

/// Moves what the input has through the plugins to the output.
///
/// # Safety
/// `connection` must be a live (not closed) transform whose state is `state`.
unsafe fn transfer(connection: sys::TSCont, state: &mut BodyTransform) {
    if state.done {
        return;
    }
    // SAFETY: the caller's promise: the transform, its output VConn and its input VIO live.
    unsafe {
        let direction = state.direction;
        let output = state.output.get_or_insert_with(|| {
            let buffer = sys::TSIOBufferCreate();
            let reader = sys::TSIOBufferReaderAlloc(buffer);
            // A response's length is known only at its end (the plugins may change it): the
            // write starts unbounded and gets its length at the end, and Traffic Server sends
            // the response chunked unless that end came first (a body that arrived at once
            // keeps a Content-Length). A request body goes to the origin framed by a length
            // Traffic Server takes from this write, so it starts as the client's (and is set
            // to what was written at the end).
            let length = match direction {
                Direction::Response => i64::MAX,
                Direction::Request => sys::TSVIONBytesGet(sys::TSVConnWriteVIOGet(connection)),
            };
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
        });
        let output_vio = output.vio;
        let output_buffer = output.buffer;
        let input = sys::TSVConnWriteVIOGet(connection);
        // No buffer: the writer is gone; what came is all there is.
        let input_open = !sys::TSVIOBufferGet(input).is_null();
        let mut chunk = Vec::new();
        if input_open {
            let todo = sys::TSVIONTodoGet(input);
            let reader = sys::TSVIOReaderGet(input);
            let available = sys::TSIOBufferReaderAvail(reader).min(todo);
            if available > 0 {
                read_into(reader, available, &mut chunk);
                sys::TSIOBufferReaderConsume(reader, available);
                sys::TSVIONDoneSet(input, sys::TSVIONDoneGet(input) + available);
            }
        }
        let end_of_stream = !input_open || sys::TSVIONTodoGet(input) <= 0;
        if chunk.is_empty() && !end_of_stream {
            return;
        }
        let forward = match state.transaction.get() {
            link if link.is_null() => chunk,
            // The transaction is open (its close clears the link) and runs on this thread.
            link => (*link).body_chunk(state.direction, chunk, end_of_stream),
        };
        if !forward.is_empty() {
            sys::TSIOBufferWrite(
                output_buffer,
                forward.as_ptr().cast(),
                i64::try_from(forward.len()).unwrap_or(i64::MAX),
            );
            state.written += i64::try_from(forward.len()).unwrap_or(i64::MAX);
        }
        if end_of_stream {
            state.done = true;
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
            if !forward.is_empty() {
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
