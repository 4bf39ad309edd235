//! What a host function sees of the guest that called it.

use crate::{GuestFunction, GuestMemory, Trap};

/// The guest instance calling a host function, as the host function sees it.
///
/// Engines implement this over their own caller handle (wasmtime's `Caller`, wasmer's
/// `FunctionEnvMut`, WAMR's exec env, V8's callback info, or the null runtime's instance). It is
/// built on the stack for each host call; nothing is allocated.
pub trait Caller<S> {
    /// The embedder's per-instance state.
    fn state(&mut self) -> &mut S;

    /// The guest memory, fetched fresh (it may have moved since the last call into the guest).
    fn memory(&mut self) -> GuestMemory<'_>;

    /// The state and the memory at once, for host functions that copy between them.
    fn state_and_memory(&mut self) -> (&mut S, GuestMemory<'_>);

    /// Calls a guest function re-entrantly, e.g. the plugin's allocator to place a reply.
    ///
    /// `args.len()` and `results.len()` must match the function's type.
    fn call(
        &mut self,
        function: GuestFunction,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), Trap>;
}
