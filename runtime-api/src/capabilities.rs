//! What an engine can do, and how it is asked to run.

use std::time::Duration;

/// Engine features that differ between engines, reported as data so the ABI can adapt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// A running call can be stopped from another thread ([`crate::InterruptHandle`]).
    pub interrupt: bool,
    /// A deadline per call ([`RuntimeConfig::call_deadline`]) is enforced.
    pub call_deadline: bool,
    /// The guest's memory can be capped ([`RuntimeConfig::max_memory_bytes`]).
    pub memory_limit: bool,
    /// Modules can be saved as and loaded from precompiled artifacts.
    pub precompiled_modules: bool,
    /// Guest memory accesses are bounds-checked (false only for native plugins).
    pub sandboxed: bool,
}

/// How an engine runs guests. Engines ignore what they cannot do and say so in [`Capabilities`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// The most linear memory one instance may have; `memory.grow` beyond it fails. Default:
    /// [`RuntimeConfig::DEFAULT_MAX_MEMORY_BYTES`]; `None` removes the cap.
    pub max_memory_bytes: Option<u64>,
    /// The longest one top-level guest call may run before it is stopped. Engines measure it
    /// as their timers allow: elapsed time (wasmtime, wasmer, wasmi, WAMR) or the calling
    /// thread's CPU time (V8); either way within a few milliseconds.
    pub call_deadline: Option<Duration>,
    /// Prepare every instance for [`crate::Instance::interrupt_handle`]; may cost a little speed.
    pub interruptible: bool,
}

impl RuntimeConfig {
    /// The memory cap unless configured otherwise: 1 GiB, proxy-wasm-cpp-host's
    /// (`PROXY_WASM_HOST_MAX_WASM_MEMORY_SIZE_BYTES`), so a guest that needs more fails here as it
    /// would in Envoy instead of passing here and failing there.
    pub const DEFAULT_MAX_MEMORY_BYTES: u64 = 1 << 30;

    /// What this configuration asks for that an engine with `capabilities` cannot keep, as
    /// words for a warning ("call deadline", "interruption", "memory cap"); empty if it keeps
    /// everything.
    pub fn unkept_by(&self, capabilities: Capabilities) -> Vec<&'static str> {
        [
            (
                "call deadline",
                self.call_deadline.is_some() && !capabilities.call_deadline,
            ),
            (
                "interruption",
                self.interruptible && !capabilities.interrupt,
            ),
            (
                "memory cap",
                self.max_memory_bytes.is_some() && !capabilities.memory_limit,
            ),
        ]
        .into_iter()
        .filter_map(|(limit, unkept)| unkept.then_some(limit))
        .collect()
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_memory_bytes: Some(Self::DEFAULT_MAX_MEMORY_BYTES),
            call_deadline: None,
            interruptible: false,
        }
    }
}

#[cfg(test)]
mod unkept_tests {
    use super::*;

    #[test]
    fn a_configuration_names_the_limits_an_engine_cannot_keep() {
        let asked = RuntimeConfig {
            max_memory_bytes: Some(1 << 20),
            call_deadline: Some(Duration::from_secs(1)),
            interruptible: true,
        };
        assert_eq!(
            asked.unkept_by(Capabilities::default()),
            ["call deadline", "interruption", "memory cap"]
        );
        let able = Capabilities {
            interrupt: true,
            call_deadline: true,
            memory_limit: true,
            ..Capabilities::default()
        };
        assert!(asked.unkept_by(able).is_empty());
        let nothing_asked = RuntimeConfig {
            max_memory_bytes: None,
            call_deadline: None,
            interruptible: false,
        };
        assert!(nothing_asked.unkept_by(Capabilities::default()).is_empty());
    }
}
