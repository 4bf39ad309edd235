//! Starting V8: once per process, on first use.

use std::sync::OnceLock;

use runtime_api::Error;

use crate::ffi;

/// V8 flags set before V8 initialises (V8's command-line syntax). Two wasm features V8 10.2
/// ships are turned off, so that modules using them fail to compile:
///
/// * threads: a guest could block in `memory.atomic.wait32` on a shared memory with no timeout,
///   using no CPU time, so its CPU deadline would never come (`binary::prepare` refuses shared
///   memories too, with a clearer message);
/// * exception handling: a host function's trap unwinds the guest as a JS exception, which a
///   guest's `catch_all` could catch and run on after, even after `proc_exit`.
///
/// V8's trap handler needs no flag: it stays off because the shim never calls
/// `V8::EnableWebAssemblyTrapHandler`, so wasm memory accesses are bounds-checked in code and V8
/// installs no signal handler that could conflict with another engine's in the same process.
pub(crate) const FLAGS: &str = "--no-experimental-wasm-threads --no-experimental-wasm-eh";

/// Initialises V8 (platform, then V8 itself) the first time it is called; later calls return the
/// first outcome.
pub(crate) fn ensure_initialized() -> Result<(), Error> {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            let workers = thread_pool_size();
            let mut message = ffi::Message::new();
            // SAFETY: FLAGS is a valid (pointer, length) pair; the shim copies what it needs
            // and initialises V8 at most once (guarded on its side as well as by this OnceLock).
            let status = unsafe {
                ffi::pwv8_initialize(
                    FLAGS.as_ptr().cast(),
                    FLAGS.len(),
                    workers,
                    message.as_out(),
                )
            };
            if status == ffi::OK {
                Ok(())
            } else {
                Err(message.text_or("V8 failed to initialise"))
            }
        })
        .clone()
        .map_err(Error::Config)
}

/// The platform's worker threads: background compilation and GC helpers (wasm compiles on them
/// too), one per core, two to four.
pub(crate) fn thread_pool_size() -> u32 {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 4) as u32
}
