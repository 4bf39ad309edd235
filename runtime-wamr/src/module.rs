//! Compiled (loaded) and linked modules.

use std::ffi::{CStr, CString};
use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use runtime_api::{
    i64_mask, resolve_imports, CompiledModule, Error, Export, ExportedFunctions, ExternKind,
    FunctionType, HostCallback, HostFunction, Import, Instance, LinkedModule, ValType, MAX_ARGS,
};
use wamrx_sys as sys;

use crate::binary;
use crate::global::{ensure_thread_env, natives, thread_env_error};
use crate::instance::WamrInstance;
use crate::Settings;

/// A module loaded by WAMR (validated and translated for the fast interpreter), with the bytes
/// WAMR keeps pointing into.
pub(crate) struct LoadedModule {
    pub(crate) module: sys::wasm_module_t,
    /// The (possibly rewritten) wasm bytes, alive and unmoved until the module is unloaded: WAMR
    /// reads, and may modify, them for as long as the module exists.
    bytes: NonNull<[u8]>,
    /// The module's imports are bound to pwhost's trampoline (done once, by the first `link`).
    symbols_resolved: AtomicBool,
}

// SAFETY: after loading, WAMR only reads the module (instantiation of the same module from
// several threads at once is supported); the one write after loading, resolving its imports,
// happens under the global registry lock before any instance exists. `bytes` is owned.
unsafe impl Send for LoadedModule {}
// SAFETY: as above.
unsafe impl Sync for LoadedModule {}

impl Drop for LoadedModule {
    fn drop(&mut self) {
        ensure_thread_env();
        let _registry = natives();
        // SAFETY: every instance holds an `Arc` to this module, so none is left; the bytes are
        // freed only after WAMR let go of them.
        unsafe {
            sys::wasm_runtime_unload(self.module);
            drop(Box::from_raw(self.bytes.as_ptr()));
        }
    }
}

impl LoadedModule {
    fn load(bytes: Vec<u8>) -> Result<Self, Error> {
        let size = u32::try_from(bytes.len())
            .map_err(|_| Error::InvalidModule("module larger than 4 GiB".into()))?;
        let bytes = NonNull::from(Box::leak(bytes.into_boxed_slice()));
        let args = sys::LoadArgs {
            name: c"".as_ptr().cast_mut(),
            clone_wasm_binary: false,
            wasm_binary_freeable: false,
            // Imports are bound when the module is linked, against pwhost's trampoline.
            no_resolve: true,
        };
        let mut error = [0 as std::ffi::c_char; 256];
        let module = {
            let _registry = natives();
            // SAFETY: `bytes` is a writable buffer of `size` bytes that outlives the module (it
            // is freed after `wasm_runtime_unload`); `args` and `error` live across the call and
            // `error`'s length is passed.
            unsafe {
                sys::wasm_runtime_load_ex(
                    bytes.as_ptr().cast(),
                    size,
                    &args,
                    error.as_mut_ptr(),
                    error.len() as u32,
                )
            }
        };
        if module.is_null() {
            // SAFETY: WAMR did not take the buffer.
            drop(unsafe { Box::from_raw(bytes.as_ptr()) });
            return Err(Error::InvalidModule(c_buffer_text(&error)));
        }
        Ok(LoadedModule {
            module,
            bytes,
            symbols_resolved: AtomicBool::new(false),
        })
    }
}

/// The text of a NUL-terminated error buffer WAMR filled in.
pub(crate) fn c_buffer_text(buffer: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = buffer
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if text.is_empty() {
        "unknown error".into()
    } else {
        text
    }
}

/// An exported function the host may call, resolved once per module.
pub(crate) struct ExportedFunction {
    /// The name in the loaded module (different for exports WAMR would run by itself).
    pub(crate) wamr_name: CString,
    pub(crate) ty: FunctionType,
    /// Bit `i` set: parameter `i` is an `i64`.
    pub(crate) i64_params: u32,
    pub(crate) i64_result: bool,
}

/// A module loaded by WAMR.
pub struct WamrModule {
    loaded: Arc<LoadedModule>,
    imports: Vec<Import>,
    exports: Vec<Export>,
    functions: Arc<ExportedFunctions<ExportedFunction>>,
    /// The export that runs the former start section, if the module had one.
    start: Option<CString>,
    settings: Arc<Settings>,
}

impl WamrModule {
    pub(crate) fn load(wasm: &[u8], settings: Arc<Settings>) -> Result<Self, Error> {
        if !ensure_thread_env() {
            return Err(Error::Config(thread_env_error()));
        }
        // WAMR allocates and fills a module's tables when it instantiates it, outside the
        // memory cap, and lets them grow to twice their size: the tables are bounded first.
        let bounded = runtime_api::binary::bound_tables(wasm).map_err(Error::InvalidModule)?;
        let wasm = bounded.as_deref().unwrap_or(wasm);
        let (bytes, start_export, renamed) = match binary::rewrite(wasm) {
            Ok(Some(rewritten)) => (rewritten.bytes, rewritten.start_export, rewritten.renamed),
            Ok(None) => (wasm.to_vec(), None, Vec::new()),
            Err(why) => return Err(Error::InvalidModule(why)),
        };
        let loaded = Arc::new(LoadedModule::load(bytes)?);
        // SAFETY: `loaded.module` is a loaded module, alive while `loaded` is.
        let imports = unsafe { module_imports(loaded.module) }?;
        // SAFETY: as above.
        let wamr_exports = unsafe { module_exports(loaded.module) }?;
        let mut exports = Vec::with_capacity(wamr_exports.len());
        let mut functions = Vec::new();
        for export in wamr_exports {
            if start_export.as_deref() == Some(export.name.as_str()) {
                continue;
            }
            let name = renamed
                .iter()
                .find(|(_, wamr)| *wamr == export.name)
                .map_or_else(|| export.name.clone(), |(original, _)| original.clone());
            if let ExternKind::Function(ty) = &export.kind {
                if ty.is_callable() {
                    let function = ExportedFunction {
                        wamr_name: CString::new(export.name.as_str()).map_err(|_| {
                            Error::InvalidModule("export name contains a NUL byte".into())
                        })?,
                        i64_params: i64_mask(&ty.params),
                        i64_result: ty.results.first() == Some(&ValType::I64),
                        ty: ty.clone(),
                    };
                    functions.push((name.clone(), function));
                }
            }
            exports.push(Export {
                name,
                kind: export.kind,
            });
        }
        let start = start_export
            .map(|name| {
                CString::new(name)
                    .map_err(|_| Error::InvalidModule("reserved name contains NUL".into()))
            })
            .transpose()?;
        Ok(WamrModule {
            loaded,
            imports,
            exports,
            functions: Arc::new(ExportedFunctions::new(functions)),
            start,
            settings,
        })
    }
}

fn val_type(kind: sys::wasm_valkind_t) -> ValType {
    match u32::from(kind) {
        sys::WASM_I32 => ValType::I32,
        sys::WASM_I64 => ValType::I64,
        sys::WASM_F32 => ValType::F32,
        sys::WASM_F64 => ValType::F64,
        _ => ValType::Other,
    }
}

/// # Safety
/// `ty` is a function type of a loaded module.
unsafe fn function_type(ty: sys::wasm_func_type_t) -> FunctionType {
    // SAFETY: per the contract; indices stay below the counts WAMR reports.
    unsafe {
        FunctionType {
            params: (0..sys::wasm_func_type_get_param_count(ty))
                .map(|i| val_type(sys::wasm_func_type_get_param_valkind(ty, i)))
                .collect(),
            results: (0..sys::wasm_func_type_get_result_count(ty))
                .map(|i| val_type(sys::wasm_func_type_get_result_valkind(ty, i)))
                .collect(),
        }
    }
}

/// # Safety
/// `func_type` is what WAMR reported beside `kind` for an import or export (the function's type
/// when `kind` is a function).
unsafe fn extern_kind(
    kind: sys::wasm_import_export_kind_t,
    func_type: sys::wasm_func_type_t,
) -> ExternKind {
    match kind {
        // SAFETY: for a function, WAMR fills in its type.
        sys::WASM_IMPORT_EXPORT_KIND_FUNC if !func_type.is_null() => {
            ExternKind::Function(unsafe { function_type(func_type) })
        }
        sys::WASM_IMPORT_EXPORT_KIND_MEMORY => ExternKind::Memory,
        sys::WASM_IMPORT_EXPORT_KIND_TABLE => ExternKind::Table,
        sys::WASM_IMPORT_EXPORT_KIND_GLOBAL => ExternKind::Global,
        _ => ExternKind::Other,
    }
}

/// # Safety
/// `text` is null or a NUL-terminated string.
unsafe fn c_text(text: *const std::ffi::c_char) -> String {
    if text.is_null() {
        return String::new();
    }
    // SAFETY: per the contract.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

/// # Safety
/// `module` is a loaded module.
unsafe fn module_imports(module: sys::wasm_module_t) -> Result<Vec<Import>, Error> {
    // SAFETY: per the contract; each index is below the count, and WAMR fills the whole
    // `wasm_import_t` (names point into the module, copied out at once).
    unsafe {
        let count = sys::wasm_runtime_get_import_count(module);
        let count = u32::try_from(count)
            .map_err(|_| Error::InvalidModule("cannot read the module's imports".into()))?;
        (0..count as i32)
            .map(|i| {
                let mut import = MaybeUninit::<sys::wasm_import_t>::zeroed();
                sys::wasm_runtime_get_import_type(module, i, import.as_mut_ptr());
                let import = import.assume_init();
                Ok(Import {
                    module: c_text(import.module_name),
                    name: c_text(import.name),
                    kind: extern_kind(import.kind, import.u.func_type),
                })
            })
            .collect()
    }
}

/// # Safety
/// `module` is a loaded module.
unsafe fn module_exports(module: sys::wasm_module_t) -> Result<Vec<Export>, Error> {
    // SAFETY: as in `module_imports`.
    unsafe {
        let count = sys::wasm_runtime_get_export_count(module);
        let count = u32::try_from(count)
            .map_err(|_| Error::InvalidModule("cannot read the module's exports".into()))?;
        (0..count as i32)
            .map(|i| {
                let mut export = MaybeUninit::<sys::wasm_export_t>::zeroed();
                sys::wasm_runtime_get_export_type(module, i, export.as_mut_ptr());
                let export = export.assume_init();
                Ok(Export {
                    name: c_text(export.name),
                    kind: extern_kind(export.kind, export.u.func_type),
                })
            })
            .collect()
    }
}

impl<S: Send + 'static> CompiledModule<S> for WamrModule {
    fn imports(&self) -> &[Import] {
        &self.imports
    }

    fn exports(&self) -> &[Export] {
        &self.exports
    }

    fn link(&self, host: &[HostFunction<S>]) -> Result<Arc<dyn LinkedModule<S>>, Error> {
        // Linking may resolve the module's imports, which needs WAMR's environment on this
        // thread like loading does (a module may be linked on a thread other than its loader's).
        if !ensure_thread_env() {
            return Err(Error::Config(thread_env_error()));
        }
        let resolved = resolve_imports(&self.imports, host)?;
        for function in &resolved {
            if function.signature.params.len() > MAX_ARGS || function.signature.results.len() > 1 {
                return Err(Error::Config(format!(
                    "host function {function:?} has too many parameters or results"
                )));
            }
        }
        let symbols = {
            let mut registry = natives();
            let symbols = registry.register(
                self.imports
                    .iter()
                    .map(|import| (import.module.as_str(), import.name.as_str())),
            )?;
            if !self.loaded.symbols_resolved.load(Ordering::Acquire) {
                // SAFETY: the module is loaded; resolving writes into it, which is why it happens
                // under the registry lock and before any instance of it exists (instances come
                // from linked modules, and this is the first link).
                if !unsafe { sys::wasm_runtime_resolve_symbols(self.loaded.module) } {
                    return Err(Error::Config(
                        "WAMR could not bind the module's imports to the host functions".into(),
                    ));
                }
                self.loaded.symbols_resolved.store(true, Ordering::Release);
            }
            symbols
        };
        let table_len = symbols.iter().max().map_or(0, |max| *max as usize + 1);
        let mut host_table = vec![None; table_len];
        for (symbol, function) in symbols.iter().zip(resolved) {
            host_table[*symbol as usize] = Some(HostEntry {
                callback: function.callback,
                slots: function.signature.params.len().max(1),
            });
        }
        Ok(Arc::new(WamrLinkedModule(Arc::new(LinkedInner {
            loaded: self.loaded.clone(),
            functions: self.functions.clone(),
            host: host_table,
            start: self.start.clone(),
            settings: self.settings.clone(),
        }))))
    }
}

/// A host function as the trampoline calls it.
pub(crate) struct HostEntry<S> {
    pub(crate) callback: HostCallback<S>,
    /// How many argument slots it sees: its parameters, or one for the result.
    pub(crate) slots: usize,
}

impl<S> Clone for HostEntry<S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S> Copy for HostEntry<S> {}

/// What every instance of a linked module shares.
pub(crate) struct LinkedInner<S> {
    pub(crate) loaded: Arc<LoadedModule>,
    pub(crate) functions: Arc<ExportedFunctions<ExportedFunction>>,
    /// The host functions by symbol number (see `global.rs`).
    pub(crate) host: Vec<Option<HostEntry<S>>>,
    pub(crate) start: Option<CString>,
    pub(crate) settings: Arc<Settings>,
}

/// A module linked against a host function table, instantiated once per VM copy.
pub struct WamrLinkedModule<S: 'static>(Arc<LinkedInner<S>>);

impl<S: Send + 'static> LinkedModule<S> for WamrLinkedModule<S> {
    fn instantiate(&self, state: S) -> Result<Box<dyn Instance<S>>, Error> {
        Ok(Box::new(WamrInstance::new(self.0.clone(), state)?))
    }
}
