//! What a native module provides: its interface and its instances.

use runtime_api::{Error, Export, Import, Trap};

/// Native functions presented as a module.
///
/// `exports` lists the callable functions (with the WebAssembly types the embedder's ABI
/// expects) and any other items the embedder checks for (such as a memory); `imports` lists the
/// host functions the native code may call with [`crate::call_host`], by their position in
/// this list.
pub trait NativeModule: Send + Sync {
    /// The host functions the module may call, in the order [`crate::call_host`] numbers them.
    fn imports(&self) -> &[Import];

    /// The module's exports. A function export's position is its index in
    /// [`NativeInstance::call`].
    fn exports(&self) -> &[Export];

    /// A new instance with its own state.
    fn instantiate(&self) -> Result<Box<dyn NativeInstance>, Error>;
}

/// One instance of a [`NativeModule`].
pub trait NativeInstance: Send {
    /// Calls export number `index` with `args`, writing `results`. Slot counts match the
    /// export's type (the runtime checks).
    ///
    /// Takes `&self` because it may be re-entered: a host function running inside a call may call
    /// back into the instance (e.g. its allocator). Instances keep mutable state in cells and must
    /// not hold a borrow of it across a host call.
    fn call(&self, index: u32, args: &[u64], results: &mut [u64]) -> Result<(), Trap>;
}
