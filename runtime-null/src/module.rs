//! Native modules as compiled and linked modules of the null runtime.

use std::sync::Arc;

use runtime_api::{
    CompiledModule, Error, Export, ExternKind, HostFunction, Import, Instance, LinkedModule,
};

use crate::{NativeModule, NullInstance};

/// A [`NativeModule`] as a [`CompiledModule`].
pub struct NullModule {
    native: Arc<dyn NativeModule>,
}

impl NullModule {
    /// Wraps `native`.
    pub fn new(native: Arc<dyn NativeModule>) -> Self {
        NullModule { native }
    }
}

impl<S: Send + 'static> CompiledModule<S> for NullModule {
    fn imports(&self) -> &[Import] {
        self.native.imports()
    }

    fn exports(&self) -> &[Export] {
        self.native.exports()
    }

    /// Resolves the imports by module and name. Unlike a WebAssembly module, which imports only
    /// what it calls, a native module declares every host function it *might* call; so an import
    /// the host lacks is not an error here, and calling it fails instead. A host function of the
    /// same name with another signature is still an error.
    fn link(&self, host: &[HostFunction<S>]) -> Result<Arc<dyn LinkedModule<S>>, Error> {
        let mut resolved = Vec::with_capacity(self.native.imports().len());
        for import in self.native.imports() {
            let ExternKind::Function(ty) = &import.kind else {
                return Err(Error::UnsupportedImport {
                    module: import.module.clone(),
                    name: import.name.clone(),
                    kind: import.kind.describe().to_string(),
                });
            };
            let function = host
                .iter()
                .find(|f| f.module == import.module && f.name == import.name);
            if let Some(function) = function {
                if !function.signature.matches(ty) {
                    return Err(Error::ImportSignatureMismatch {
                        module: import.module.clone(),
                        name: import.name.clone(),
                        expected: function.signature.to_string(),
                        found: ty.to_string(),
                    });
                }
            }
            resolved.push(function.copied());
        }
        Ok(Arc::new(NullLinkedModule {
            native: self.native.clone(),
            host: resolved.into(),
        }))
    }
}

/// A native module with its host functions resolved.
pub struct NullLinkedModule<S> {
    native: Arc<dyn NativeModule>,
    host: Arc<[Option<HostFunction<S>>]>,
}

impl<S: Send + 'static> LinkedModule<S> for NullLinkedModule<S> {
    fn instantiate(&self, state: S) -> Result<Box<dyn Instance<S>>, Error> {
        let native = self.native.instantiate()?;
        Ok(Box::new(NullInstance::new(
            state,
            native,
            self.native.clone(),
            self.host.clone(),
        )))
    }
}
