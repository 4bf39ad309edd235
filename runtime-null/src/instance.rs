//! Instances of native modules.

use std::sync::Arc;

use runtime_api::{ExternKind, GuestFunction, HostFunction, Instance, Trap, TrapKind};

use crate::frame::{Frame, FrameGuard};
use crate::{NativeInstance, NativeModule};

/// An instance of a [`NativeModule`] with the embedder's state.
pub struct NullInstance<S> {
    state: S,
    native: Box<dyn NativeInstance>,
    module: Arc<dyn NativeModule>,
    host: Arc<[Option<HostFunction<S>>]>,
}

impl<S> NullInstance<S> {
    pub(crate) fn new(
        state: S,
        native: Box<dyn NativeInstance>,
        module: Arc<dyn NativeModule>,
        host: Arc<[Option<HostFunction<S>>]>,
    ) -> Self {
        NullInstance {
            state,
            native,
            module,
            host,
        }
    }
}

impl<S: Send + 'static> Instance<S> for NullInstance<S> {
    fn state(&mut self) -> &mut S {
        &mut self.state
    }

    fn function(&mut self, name: &str) -> Option<GuestFunction> {
        self.module
            .exports()
            .iter()
            .enumerate()
            .find_map(|(index, export)| match &export.kind {
                ExternKind::Function(ty) if export.name == name => {
                    Some(GuestFunction::new(index as u32, ty))
                }
                _ => None,
            })
    }

    fn call(
        &mut self,
        function: GuestFunction,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), Trap> {
        function.check_arity(args.len(), results.len())?;
        if function.index() as usize >= self.module.exports().len() {
            return Err(Trap::new(TrapKind::BadCall, "no such function"));
        }
        let frame = Frame::new(
            &mut self.state,
            &self.host,
            self.module.imports(),
            &*self.native,
        );
        // SAFETY: the guard is a local dropped below, before any other guard of this thread
        // (calls nested in `native.call` drop theirs before it returns).
        let guard = unsafe { FrameGuard::enter(&frame) };
        let result = self.native.call(function.index(), args, results);
        drop(guard);
        // A host function's trap wins: the native code only saw an error status.
        match frame.take_trap() {
            Some(trap) => Err(trap),
            None => result,
        }
    }

    fn memory_size(&mut self) -> usize {
        // Native code uses the process's memory; it has no linear memory of its own.
        0
    }
}
