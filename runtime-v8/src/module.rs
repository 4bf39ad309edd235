//! Compiled and linked modules.

use std::sync::Arc;
use std::time::Duration;

use runtime_api::{
    i64_mask, resolve_imports, CompiledModule, Error, Export, ExportedFunctions, ExternKind,
    FunctionType, HostCallback, HostFunction, Import, Instance, LinkedModule, ValType, MAX_ARGS,
};

use crate::ffi;
use crate::instance::V8Instance;

/// A compiled module of the shim, shared by every instance made from it.
pub(crate) struct CompiledCode(*mut ffi::RawModule);

// SAFETY: the shim's module is a `v8::CompiledWasmModule`, a handle to a NativeModule of V8's
// process-wide wasm engine. It is never modified after compilation, and the only use of it,
// `WasmModuleObject::FromCompiledModule`, reads it (copying a `shared_ptr`), which V8 supports
// from any thread: that is how V8 shares modules between workers.
unsafe impl Send for CompiledCode {}
// SAFETY: as above.
unsafe impl Sync for CompiledCode {}

impl CompiledCode {
    /// Compiles `wasm`, or says why V8 refused it.
    pub(crate) fn compile(wasm: &[u8]) -> Result<Self, Error> {
        let mut message = ffi::Message::new();
        // SAFETY: `wasm` is a valid (pointer, length) pair for the duration of the call; the shim
        // copies what it keeps.
        let raw = unsafe { ffi::pwv8_compile(wasm.as_ptr(), wasm.len(), message.as_out()) };
        if raw.is_null() {
            return Err(Error::InvalidModule(
                message.text_or("V8 refused the module"),
            ));
        }
        Ok(CompiledCode(raw))
    }

    pub(crate) fn raw(&self) -> *const ffi::RawModule {
        self.0
    }
}

impl Drop for CompiledCode {
    fn drop(&mut self) {
        // SAFETY: the module came from `pwv8_compile` and is deleted once; instances made from it
        // hold their own reference to the compiled code inside V8.
        unsafe { ffi::pwv8_module_delete(self.0) };
    }
}

/// How instances of a module run, from the engine's configuration.
#[derive(Clone, Debug)]
pub(crate) struct InstanceSettings {
    pub(crate) call_deadline: Option<Duration>,
    pub(crate) interruptible: bool,
    /// Why instances cannot be created: a memory's initial size exceeds the memory limit.
    pub(crate) over_memory_limit: Option<String>,
    /// The memory cap in bytes (written into the module's memory maximum), if any.
    pub(crate) memory_limit: Option<usize>,
}

/// An exported function the host may call: its type, and how the shim passes its values.
pub(crate) struct ExportedFunction {
    pub(crate) ty: FunctionType,
    pub(crate) shape: ffi::Shape,
}

/// The exports of a module that the shim can call.
fn exported_functions(exports: &[Export]) -> ExportedFunctions<ExportedFunction> {
    exports
        .iter()
        .filter_map(|export| {
            let ExternKind::Function(ty) = &export.kind else {
                return None;
            };
            let shape = shape(&ty.params, &ty.results)?;
            let ty = ty.clone();
            Some((export.name.clone(), ExportedFunction { ty, shape }))
        })
        .collect()
}

/// How the shim passes the values of a function of this type; `None` if it cannot (more than
/// [`MAX_ARGS`] parameters, several results, or a non-integer type).
pub(crate) fn shape(params: &[ValType], results: &[ValType]) -> Option<ffi::Shape> {
    let integer = |t: &ValType| matches!(t, ValType::I32 | ValType::I64);
    if params.len() > MAX_ARGS || results.len() > 1 || !params.iter().chain(results).all(integer) {
        return None;
    }
    let i64_params = i64_mask(params);
    let result = match results.first() {
        None => -1,
        Some(ValType::I32) => 0,
        Some(_) => 1,
    };
    Some(ffi::Shape {
        params: params.len() as u32,
        i64_params,
        result,
    })
}

/// What a module's instances share: the compiled code, the exports, the settings.
pub(crate) struct ModuleShared {
    pub(crate) code: CompiledCode,
    pub(crate) functions: ExportedFunctions<ExportedFunction>,
    pub(crate) settings: InstanceSettings,
}

/// A module compiled by V8.
pub struct V8Module {
    shared: Arc<ModuleShared>,
    imports: Vec<Import>,
    exports: Vec<Export>,
}

impl V8Module {
    pub(crate) fn new(
        code: CompiledCode,
        imports: Vec<Import>,
        exports: Vec<Export>,
        settings: InstanceSettings,
    ) -> Self {
        let functions = exported_functions(&exports);
        V8Module {
            shared: Arc::new(ModuleShared {
                code,
                functions,
                settings,
            }),
            imports,
            exports,
        }
    }
}

/// A host function import as the shim gets it at instantiation.
pub(crate) struct LinkedImport {
    pub(crate) module: String,
    pub(crate) name: String,
    pub(crate) shape: ffi::Shape,
}

impl<S: Send + 'static> CompiledModule<S> for V8Module {
    fn imports(&self) -> &[Import] {
        &self.imports
    }

    fn exports(&self) -> &[Export] {
        &self.exports
    }

    fn link(&self, host: &[HostFunction<S>]) -> Result<Arc<dyn LinkedModule<S>>, Error> {
        let resolved = resolve_imports(&self.imports, host)?;
        let mut callbacks = Vec::with_capacity(resolved.len());
        let mut imports = Vec::with_capacity(resolved.len());
        for (import, function) in self.imports.iter().zip(resolved) {
            let signature = function.signature;
            let shape = shape(signature.params, signature.results).ok_or_else(|| {
                Error::Config(format!(
                    "host function {function:?} has too many parameters or results, or \
                     non-integer ones"
                ))
            })?;
            callbacks.push(function.callback);
            imports.push(LinkedImport {
                module: import.module.clone(),
                name: import.name.clone(),
                shape,
            });
        }
        Ok(Arc::new(V8LinkedModule {
            shared: self.shared.clone(),
            callbacks: callbacks.into(),
            imports,
        }))
    }
}

/// A module linked against a host function table, instantiated once per VM copy.
pub struct V8LinkedModule<S> {
    pub(crate) shared: Arc<ModuleShared>,
    /// The host function of each import, in import order.
    pub(crate) callbacks: Arc<[HostCallback<S>]>,
    pub(crate) imports: Vec<LinkedImport>,
}

impl<S: Send + 'static> LinkedModule<S> for V8LinkedModule<S> {
    fn instantiate(&self, state: S) -> Result<Box<dyn Instance<S>>, Error> {
        Ok(Box::new(V8Instance::new(self, state)?))
    }
}
