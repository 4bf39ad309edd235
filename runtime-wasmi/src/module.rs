//! Compiled and linked modules.

use std::sync::Arc;

use runtime_api::{
    resolve_imports, CompiledModule, Error, Export, ExportedFunctions, ExternKind, FunctionType,
    HostFunction, Import, Instance, LinkedModule, RuntimeConfig, ValType,
};

use crate::fuel::FuelPolicy;
use crate::host::define_host_function;
use crate::instance::{StoreData, WasmiInstance};

/// The size of a WebAssembly page (wasmi's custom page sizes are off).
const WASM_PAGE_BYTES: u64 = 65536;

/// A module compiled by wasmi, with its own engine.
pub struct WasmiModule {
    module: wasmi::Module,
    has_start: bool,
    min_memory_pages: u64,
    imports: Vec<Import>,
    exports: Vec<Export>,
    functions: Arc<ExportedFunctions<ExportedFunction>>,
    config: RuntimeConfig,
    fuel: Option<FuelPolicy>,
}

/// An exported function the host may call, described once per module so that each instance
/// resolves its exports without type queries.
pub(crate) struct ExportedFunction {
    pub(crate) ty: FunctionType,
}

/// The callable exports of `module`.
fn exported_functions(module: &wasmi::Module) -> ExportedFunctions<ExportedFunction> {
    module
        .exports()
        .filter_map(|e| {
            let ty = function_type(e.ty().func()?);
            ty.is_callable()
                .then(|| (e.name().to_string(), ExportedFunction { ty }))
        })
        .collect()
}

impl WasmiModule {
    pub(crate) fn new(
        module: wasmi::Module,
        has_start: bool,
        config: RuntimeConfig,
        fuel: Option<FuelPolicy>,
    ) -> Self {
        let imports = module
            .imports()
            .map(|i| Import {
                module: i.module().to_string(),
                name: i.name().to_string(),
                kind: extern_kind(i.ty()),
            })
            .collect();
        let exports = module
            .exports()
            .map(|e| Export {
                name: e.name().to_string(),
                kind: extern_kind(e.ty()),
            })
            .collect();
        let functions = Arc::new(exported_functions(&module));
        let min_memory_pages = module
            .exports()
            .filter_map(|e| e.ty().memory().map(|m| m.minimum()))
            .max()
            .unwrap_or(0);
        WasmiModule {
            module,
            has_start,
            min_memory_pages,
            imports,
            exports,
            functions,
            config,
            fuel,
        }
    }
}

/// Whether a module (already validated) has a start section. wasmi does not say, and only builds
/// that bound the native stack need to know.
pub(crate) fn has_start_section(wasm: &[u8]) -> bool {
    const START_SECTION: u8 = 8;
    // Sections follow the 4-byte magic and the 4-byte version: an id byte, a LEB128 size.
    let mut rest = wasm.get(8..).unwrap_or_default();
    while let Some((&id, after_id)) = rest.split_first() {
        if id == START_SECTION {
            return true;
        }
        let Some((size, after_size)) = read_leb128_u32(after_id) else {
            return false;
        };
        rest = after_size.get(size as usize..).unwrap_or_default();
    }
    false
}

/// An unsigned LEB128 number of at most 32 bits, and what follows it.
fn read_leb128_u32(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let mut value: u32 = 0;
    for (i, &byte) in bytes.iter().enumerate().take(5) {
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, bytes.get(i + 1..)?));
        }
    }
    None
}

pub(crate) fn val_type(ty: wasmi::ValType) -> ValType {
    match ty {
        wasmi::ValType::I32 => ValType::I32,
        wasmi::ValType::I64 => ValType::I64,
        wasmi::ValType::F32 => ValType::F32,
        wasmi::ValType::F64 => ValType::F64,
        _ => ValType::Other,
    }
}

pub(crate) fn function_type(ty: &wasmi::FuncType) -> FunctionType {
    FunctionType {
        params: ty.params().iter().map(|t| val_type(*t)).collect(),
        results: ty.results().iter().map(|t| val_type(*t)).collect(),
    }
}

fn extern_kind(ty: &wasmi::ExternType) -> ExternKind {
    match ty {
        wasmi::ExternType::Func(f) => ExternKind::Function(function_type(f)),
        wasmi::ExternType::Memory(_) => ExternKind::Memory,
        wasmi::ExternType::Table(_) => ExternKind::Table,
        wasmi::ExternType::Global(_) => ExternKind::Global,
    }
}

impl<S: Send + 'static> CompiledModule<S> for WasmiModule {
    fn imports(&self) -> &[Import] {
        &self.imports
    }

    fn exports(&self) -> &[Export] {
        &self.exports
    }

    fn link(&self, host: &[HostFunction<S>]) -> Result<Arc<dyn LinkedModule<S>>, Error> {
        let mut linker = wasmi::Linker::<StoreData<S>>::new(self.module.engine());
        // A module may import the same function twice; both imports get the same definition.
        linker.allow_shadowing(true);
        for function in resolve_imports(&self.imports, host)? {
            define_host_function(&mut linker, function)?;
        }
        Ok(Arc::new(WasmiLinkedModule {
            linker,
            module: self.module.clone(),
            has_start: self.has_start,
            min_memory_pages: self.min_memory_pages,
            functions: self.functions.clone(),
            config: self.config.clone(),
            fuel: self.fuel,
        }))
    }
}

/// A module linked against a host function table, instantiated once per VM copy.
pub struct WasmiLinkedModule<S: 'static> {
    linker: wasmi::Linker<StoreData<S>>,
    module: wasmi::Module,
    has_start: bool,
    /// The largest initial size of the module's exported memories.
    min_memory_pages: u64,
    functions: Arc<ExportedFunctions<ExportedFunction>>,
    config: RuntimeConfig,
    fuel: Option<FuelPolicy>,
}

impl<S: Send + 'static> LinkedModule<S> for WasmiLinkedModule<S> {
    fn instantiate(&self, state: S) -> Result<Box<dyn Instance<S>>, Error> {
        // wasmi's resource limiter refuses such a memory too, in its own words; say it the way
        // every engine does.
        if let Some(max) = self.config.max_memory_bytes {
            if self.min_memory_pages.saturating_mul(WASM_PAGE_BYTES) > max {
                return Err(Error::Instantiation(format!(
                    "memory minimum size of {} pages exceeds memory limits",
                    self.min_memory_pages
                )));
            }
        }
        Ok(Box::new(WasmiInstance::new(
            &self.linker,
            &self.module,
            self.functions.clone(),
            &self.config,
            self.has_start,
            self.fuel,
            state,
        )?))
    }
}
