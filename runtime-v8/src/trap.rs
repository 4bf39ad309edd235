//! V8's exceptions as engine-neutral traps.
//!
//! A wasm trap reaches the host as a JavaScript exception: `RuntimeError: unreachable`,
//! `RangeError: Maximum call stack size exceeded`, …. The message is all V8's API tells, so it
//! is matched against V8 10.2's trap messages; a message naming several traps (V8 reports a NaN
//! and an out-of-range float-to-int conversion alike, and a null entry and a signature mismatch
//! in `call_indirect` alike) keeps V8's words.

use runtime_api::{Trap, TrapKind, WasmTrapCode};

/// The trap for a call V8 terminated without a stop reason: the instance's JS heap ran out.
pub(crate) fn heap_exhausted() -> Trap {
    Trap::host("the guest exhausted the JS heap of its V8 isolate")
}

/// The trap for a JavaScript exception that left guest code, given its text
/// (`String(exception)`).
pub(crate) fn from_exception(text: &str) -> Trap {
    if let Some(code) = wasm_trap_code(text) {
        return Trap::wasm(code);
    }
    match text.strip_prefix("RuntimeError: ") {
        // A trap V8 words in a way that does not say which code it is.
        Some(message) => Trap::new(TrapKind::Wasm, format!("wasm trap: {message}")),
        // Something other than a trap: a wasm exception that nothing caught, a type error.
        None => Trap::new(TrapKind::Wasm, format!("uncaught exception: {text}")),
    }
}

fn wasm_trap_code(text: &str) -> Option<WasmTrapCode> {
    if text == "RangeError: Maximum call stack size exceeded" {
        return Some(WasmTrapCode::StackOverflow);
    }
    Some(match text.strip_prefix("RuntimeError: ")? {
        "unreachable" => WasmTrapCode::Unreachable,
        "memory access out of bounds" => WasmTrapCode::MemoryOutOfBounds,
        // `memory.init` from a dropped segment: wasmtime reports the same out-of-bounds access.
        "data segment has been dropped" => WasmTrapCode::MemoryOutOfBounds,
        "divide by zero" | "remainder by zero" => WasmTrapCode::IntegerDivisionByZero,
        "divide result unrepresentable" => WasmTrapCode::IntegerOverflow,
        "table index is out of bounds" => WasmTrapCode::TableOutOfBounds,
        // `table.init` from a dropped segment, likewise.
        "element segment has been dropped" => WasmTrapCode::TableOutOfBounds,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v8_trap_messages_map_to_trap_codes() {
        let cases = [
            ("RuntimeError: unreachable", WasmTrapCode::Unreachable),
            (
                "RuntimeError: memory access out of bounds",
                WasmTrapCode::MemoryOutOfBounds,
            ),
            (
                "RuntimeError: divide by zero",
                WasmTrapCode::IntegerDivisionByZero,
            ),
            (
                "RuntimeError: remainder by zero",
                WasmTrapCode::IntegerDivisionByZero,
            ),
            (
                "RuntimeError: divide result unrepresentable",
                WasmTrapCode::IntegerOverflow,
            ),
            (
                "RuntimeError: table index is out of bounds",
                WasmTrapCode::TableOutOfBounds,
            ),
            (
                "RangeError: Maximum call stack size exceeded",
                WasmTrapCode::StackOverflow,
            ),
        ];
        for (text, code) in cases {
            assert_eq!(from_exception(text), Trap::wasm(code), "{text}");
        }
    }

    #[test]
    fn ambiguous_and_unknown_exceptions_keep_v8s_words() {
        let trap = from_exception("RuntimeError: float unrepresentable in integer range");
        assert_eq!(trap.kind, TrapKind::Wasm);
        assert_eq!(
            trap.message,
            "wasm trap: float unrepresentable in integer range"
        );
        let other = from_exception("TypeError: type incompatibility when transforming");
        assert_eq!(other.kind, TrapKind::Wasm);
        assert!(other.message.contains("TypeError"), "{other}");
    }
}
