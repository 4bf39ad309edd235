//! WAMR's exception strings as `runtime_api` traps.

use std::ffi::CStr;

use runtime_api::{Trap, TrapKind, WasmTrapCode};
use wamrx_sys as sys;

/// The exception pwhost raises to unwind the guest after a host function failed; the host's own
/// [`Trap`] is kept beside it and returned instead.
pub(crate) const HOST_TRAP: &CStr = c"host function trapped";

/// The instance's current exception as a trap.
///
/// # Safety
/// `module_inst` is a live instance, and no other thread may set its exception meanwhile (the
/// caller holds the instance's stop protocol, see `watchdog.rs`).
pub(crate) unsafe fn current_exception(module_inst: sys::wasm_module_inst_t) -> Trap {
    // SAFETY: per the contract; WAMR returns null or a NUL-terminated string inside the
    // instance, which is copied out before anything can change it.
    let message = unsafe {
        let raw = sys::wasm_runtime_get_exception(module_inst);
        if raw.is_null() {
            return Trap::new(TrapKind::Wasm, "wasm trap: unknown failure");
        }
        CStr::from_ptr(raw).to_string_lossy().into_owned()
    };
    from_exception(&message)
}

/// Maps WAMR's exception text (`Exception: <what>`) onto the engine-independent trap codes.
pub(crate) fn from_exception(message: &str) -> Trap {
    let what = message.strip_prefix("Exception: ").unwrap_or(message);
    let code = match what {
        "unreachable" => WasmTrapCode::Unreachable,
        "out of bounds memory access" | "data segment out of bounds" => {
            WasmTrapCode::MemoryOutOfBounds
        }
        "native stack overflow"
        | "wasm operand stack overflow"
        | "wasm auxiliary stack overflow" => WasmTrapCode::StackOverflow,
        "integer divide by zero" => WasmTrapCode::IntegerDivisionByZero,
        "integer overflow" => WasmTrapCode::IntegerOverflow,
        "invalid conversion to integer" => WasmTrapCode::BadConversionToInteger,
        "uninitialized element" | "null function reference" => WasmTrapCode::IndirectCallToNull,
        "indirect call type mismatch" => WasmTrapCode::BadSignature,
        // `call_indirect` past the end of the table is "undefined element" in WAMR.
        "undefined element" | "out of bounds table access" => WasmTrapCode::TableOutOfBounds,
        _ => return Trap::new(TrapKind::Wasm, format!("wasm trap: {what}")),
    };
    Trap::wasm(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_exceptions_get_the_canonical_messages() {
        assert_eq!(
            from_exception("Exception: unreachable"),
            Trap::wasm(WasmTrapCode::Unreachable)
        );
        assert_eq!(
            from_exception("Exception: out of bounds memory access"),
            Trap::wasm(WasmTrapCode::MemoryOutOfBounds)
        );
        assert_eq!(
            from_exception("Exception: undefined element"),
            Trap::wasm(WasmTrapCode::TableOutOfBounds)
        );
        assert_eq!(
            from_exception("Exception: wasm operand stack overflow"),
            Trap::wasm(WasmTrapCode::StackOverflow)
        );
    }

    #[test]
    fn other_exceptions_keep_their_text() {
        let trap = from_exception("Exception: allocate memory failed");
        assert_eq!(trap.kind, TrapKind::Wasm);
        assert_eq!(trap.message, "wasm trap: allocate memory failed");
    }
}
