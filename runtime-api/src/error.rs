//! Errors of the engine interface.

use std::fmt;

/// Why loading, linking or instantiating a module failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are not a valid WebAssembly module (or precompiled artifact) for this engine.
    #[error("invalid module: {0}")]
    InvalidModule(String),
    /// The module imports a function the host does not provide.
    #[error("module imports unknown function {module}.{name}")]
    UnknownImport {
        /// Import module name.
        module: String,
        /// Import field name.
        name: String,
    },
    /// The module imports a host function with a different signature than the host's.
    #[error("module imports {module}.{name} as {found}, but the host provides {expected}")]
    ImportSignatureMismatch {
        /// Import module name.
        module: String,
        /// Import field name.
        name: String,
        /// The host's signature.
        expected: String,
        /// The module's signature.
        found: String,
    },
    /// The module imports something other than a function (memory, table, global), which no
    /// Proxy-Wasm host provides.
    #[error("module imports {kind} {module}.{name}, which the host does not provide")]
    UnsupportedImport {
        /// Import module name.
        module: String,
        /// Import field name.
        name: String,
        /// What kind of item is imported.
        kind: String,
    },
    /// The engine cannot do what was asked (e.g. load a precompiled artifact).
    #[error("{0} is not supported by this runtime")]
    Unsupported(&'static str),
    /// Instantiation failed (e.g. a start function trapped, or a resource limit was hit).
    #[error("instantiation failed: {0}")]
    Instantiation(String),
    /// The engine could not be set up with the given configuration.
    #[error("runtime configuration: {0}")]
    Config(String),
}

/// What stopped a guest call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrapKind {
    /// The guest trapped (`unreachable`, out-of-bounds access, stack overflow, …).
    Wasm,
    /// The call ran past its deadline ([`crate::RuntimeConfig::call_deadline`]).
    DeadlineExceeded,
    /// The call was stopped from another thread through an [`crate::InterruptHandle`].
    Interrupted,
    /// The guest ran out of fuel (interpreters that meter instructions).
    OutOfFuel,
    /// The guest asked to exit (WASI `proc_exit`) with this code.
    Exit(i32),
    /// A host function failed in a way that must stop the guest.
    Host,
    /// The caller asked for a call the function cannot take (wrong arity, unknown handle).
    BadCall,
}

/// Why a WebAssembly instruction trapped, in words that are the same on every engine.
///
/// Engines word their traps differently; mapping them onto these codes lets a plugin's failure read
/// the same whichever engine ran it (and lets the conformance suite expect one message).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WasmTrapCode {
    /// An `unreachable` instruction ran (Rust panics end here).
    Unreachable,
    /// A load or store outside linear memory.
    MemoryOutOfBounds,
    /// The guest's call stack overflowed.
    StackOverflow,
    /// Integer division or remainder by zero.
    IntegerDivisionByZero,
    /// Integer overflow (`i32.div_s` of `INT_MIN` by -1, or a float-to-int truncation overflow).
    IntegerOverflow,
    /// A float-to-integer conversion of NaN.
    BadConversionToInteger,
    /// `call_indirect` through a null table entry.
    IndirectCallToNull,
    /// `call_indirect` to a function of another type.
    BadSignature,
    /// An access outside a table.
    TableOutOfBounds,
}

impl WasmTrapCode {
    /// The message every engine reports for this trap (wasmtime's wording).
    pub fn message(self) -> &'static str {
        match self {
            WasmTrapCode::Unreachable => "wasm trap: wasm `unreachable` instruction executed",
            WasmTrapCode::MemoryOutOfBounds => "wasm trap: out of bounds memory access",
            WasmTrapCode::StackOverflow => "wasm trap: call stack exhausted",
            WasmTrapCode::IntegerDivisionByZero => "wasm trap: integer divide by zero",
            WasmTrapCode::IntegerOverflow => "wasm trap: integer overflow",
            WasmTrapCode::BadConversionToInteger => "wasm trap: invalid conversion to integer",
            WasmTrapCode::IndirectCallToNull => "wasm trap: uninitialized element",
            WasmTrapCode::BadSignature => "wasm trap: indirect call type mismatch",
            WasmTrapCode::TableOutOfBounds => {
                "wasm trap: undefined element: out of bounds table access"
            }
        }
    }
}

/// Why a running call was stopped from outside the guest (engines that stop calls from a watchdog
/// or another thread record it, then report [`StopReason::trap`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The call ran past [`crate::RuntimeConfig::call_deadline`].
    Deadline,
    /// An [`crate::InterruptHandle`] stopped it.
    Interrupted,
}

impl StopReason {
    /// The trap the stopped call returns.
    pub fn trap(self) -> Trap {
        match self {
            StopReason::Deadline => Trap::deadline_exceeded(),
            StopReason::Interrupted => Trap::interrupted(),
        }
    }
}

/// A guest call that did not complete normally.
///
/// Built only on the failure path, so it may carry an owned message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trap {
    /// What kind of failure this is.
    pub kind: TrapKind,
    /// A human-readable description (the engine's trap message, or the host's reason).
    pub message: String,
}

impl Trap {
    /// A trap of the given kind.
    pub fn new(kind: TrapKind, message: impl Into<String>) -> Self {
        Trap {
            kind,
            message: message.into(),
        }
    }

    /// A WebAssembly trap, with the engine-independent message of `code`.
    pub fn wasm(code: WasmTrapCode) -> Self {
        Trap::new(TrapKind::Wasm, code.message())
    }

    /// The call ran past [`crate::RuntimeConfig::call_deadline`] and was stopped.
    pub fn deadline_exceeded() -> Self {
        Trap::new(TrapKind::DeadlineExceeded, "call exceeded its deadline")
    }

    /// The call was stopped through an [`crate::InterruptHandle`] from another thread.
    pub fn interrupted() -> Self {
        Trap::new(TrapKind::Interrupted, "interrupted from another thread")
    }

    /// A host function failure that must stop the guest.
    pub fn host(message: impl Into<String>) -> Self {
        Trap::new(TrapKind::Host, message)
    }

    /// The guest asked to exit with `code`.
    pub fn exit(code: i32) -> Self {
        Trap::new(
            TrapKind::Exit(code),
            format!("guest exited with code {code}"),
        )
    }
}

impl fmt::Display for Trap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            TrapKind::Wasm => f.write_str(&self.message),
            TrapKind::DeadlineExceeded => write!(f, "call exceeded its deadline"),
            TrapKind::Interrupted => write!(f, "call interrupted"),
            TrapKind::OutOfFuel => write!(f, "guest ran out of fuel"),
            TrapKind::Exit(code) => write!(f, "guest exited with code {code}"),
            TrapKind::Host => write!(f, "host error: {}", self.message),
            TrapKind::BadCall => write!(f, "bad call: {}", self.message),
        }
    }
}

impl std::error::Error for Trap {}

/// The message of a panic's payload, if it has one: for engines and hosts that turn a panic
/// into an error instead of letting it unwind further.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("no message")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_call_reports_why_it_was_stopped() {
        let deadline = StopReason::Deadline.trap();
        assert_eq!(deadline.kind, TrapKind::DeadlineExceeded);
        assert_eq!(deadline.to_string(), "call exceeded its deadline");
        let interrupted = StopReason::Interrupted.trap();
        assert_eq!(interrupted.kind, TrapKind::Interrupted);
        assert_eq!(interrupted.to_string(), "call interrupted");
    }
}
