//! Compiled and linked modules.

use std::mem::MaybeUninit;
use std::sync::Arc;

use runtime_api::{
    resolve_imports, CompiledModule, Error, Export, ExternKind, FunctionType, HostFunction, Import,
    Instance, LinkedModule, RuntimeConfig, Trap, ValType, MAX_ARGS,
};
use wasmtime::{Caller, ValRaw};

use crate::epoch::EpochTicker;
use crate::instance::{StoreData, WasmtimeCaller, WasmtimeInstance};

/// A module compiled by wasmtime.
pub struct WasmtimeModule {
    module: wasmtime::Module,
    imports: Vec<Import>,
    exports: Vec<Export>,
    config: RuntimeConfig,
    epoch: Option<Arc<EpochTicker>>,
}

impl WasmtimeModule {
    pub(crate) fn new(
        module: wasmtime::Module,
        config: RuntimeConfig,
        epoch: Option<Arc<EpochTicker>>,
    ) -> Self {
        let imports = module
            .imports()
            .map(|i| Import {
                module: i.module().to_string(),
                name: i.name().to_string(),
                kind: extern_kind(&i.ty()),
            })
            .collect();
        let exports = module
            .exports()
            .map(|e| Export {
                name: e.name().to_string(),
                kind: extern_kind(&e.ty()),
            })
            .collect();
        WasmtimeModule {
            module,
            imports,
            exports,
            config,
            epoch,
        }
    }
}

pub(crate) fn val_type(ty: &wasmtime::ValType) -> ValType {
    match ty {
        wasmtime::ValType::I32 => ValType::I32,
        wasmtime::ValType::I64 => ValType::I64,
        wasmtime::ValType::F32 => ValType::F32,
        wasmtime::ValType::F64 => ValType::F64,
        _ => ValType::Other,
    }
}

pub(crate) fn function_type(ty: &wasmtime::FuncType) -> FunctionType {
    FunctionType {
        params: ty.params().map(|t| val_type(&t)).collect(),
        results: ty.results().map(|t| val_type(&t)).collect(),
    }
}

fn extern_kind(ty: &wasmtime::ExternType) -> ExternKind {
    match ty {
        wasmtime::ExternType::Func(f) => ExternKind::Function(function_type(f)),
        wasmtime::ExternType::Memory(_) => ExternKind::Memory,
        wasmtime::ExternType::Table(_) => ExternKind::Table,
        wasmtime::ExternType::Global(_) => ExternKind::Global,
        _ => ExternKind::Other,
    }
}

fn wasmtime_val_type(ty: ValType) -> wasmtime::ValType {
    match ty {
        ValType::I64 => wasmtime::ValType::I64,
        ValType::F32 => wasmtime::ValType::F32,
        ValType::F64 => wasmtime::ValType::F64,
        // Host functions are declared with integer types only; `Other` cannot be produced here
        // because `resolve_imports` already matched the module's type against the host's.
        ValType::I32 | ValType::Other => wasmtime::ValType::I32,
    }
}

impl<S: Send + 'static> CompiledModule<S> for WasmtimeModule {
    fn imports(&self) -> &[Import] {
        &self.imports
    }

    fn exports(&self) -> &[Export] {
        &self.exports
    }

    fn link(&self, host: &[HostFunction<S>]) -> Result<Arc<dyn LinkedModule<S>>, Error> {
        let engine = self.module.engine();
        let mut linker = wasmtime::Linker::<StoreData<S>>::new(engine);
        for function in resolve_imports(&self.imports, host)? {
            if function.signature.params.len() > MAX_ARGS || function.signature.results.len() > 1 {
                return Err(Error::Config(format!(
                    "host function {function:?} has too many parameters or results"
                )));
            }
            let ty = wasmtime::FuncType::new(
                engine,
                function
                    .signature
                    .params
                    .iter()
                    .map(|t| wasmtime_val_type(*t)),
                function
                    .signature
                    .results
                    .iter()
                    .map(|t| wasmtime_val_type(*t)),
            );
            let host_function = *function;
            let trampoline = move |caller: Caller<'_, StoreData<S>>,
                                   slots: &mut [MaybeUninit<ValRaw>]| {
                call_host(&host_function, caller, slots)
            };
            // SAFETY: `call_host` reads exactly the parameters of `ty` with their declared types
            // and writes a result of the declared type only when `ty` has one, as
            // `func_new_unchecked` requires.
            unsafe { linker.func_new_unchecked(function.module, function.name, ty, trampoline) }
                .map_err(|e| Error::Config(format!("{e:#}")))?;
        }
        let pre = linker
            .instantiate_pre(&self.module)
            .map_err(|e| Error::Instantiation(format!("{e:#}")))?;
        Ok(Arc::new(WasmtimeLinkedModule {
            pre,
            config: self.config.clone(),
            epoch: self.epoch.clone(),
        }))
    }

    fn serialize(&self) -> Result<Vec<u8>, Error> {
        self.module
            .serialize()
            .map_err(|e| Error::Config(format!("{e:#}")))
    }
}

/// The body of every host function: slots in, callback, slot 0 out.
fn call_host<S: 'static>(
    function: &HostFunction<S>,
    caller: Caller<'_, StoreData<S>>,
    slots: &mut [MaybeUninit<ValRaw>],
) -> wasmtime::Result<()> {
    let params = function.signature.params;
    let mut args = [0u64; MAX_ARGS];
    for (i, ty) in params.iter().enumerate() {
        // SAFETY: wasmtime initialises one slot per parameter, typed as declared in `ty`.
        let raw = unsafe { slots[i].assume_init_ref() };
        args[i] = match ty {
            ValType::I64 => raw.get_u64(),
            _ => u64::from(raw.get_u32()),
        };
    }
    let mut caller = WasmtimeCaller { caller };
    let used = params.len().max(1);
    (function.callback)(&mut caller, &mut args[..used]).map_err(wasmtime::Error::new)?;
    if let Some(result) = function.signature.results.first() {
        slots[0] = MaybeUninit::new(match result {
            ValType::I64 => ValRaw::u64(args[0]),
            _ => ValRaw::u32(args[0] as u32),
        });
    }
    Ok(())
}

/// A module linked against a host function table, instantiated once per VM copy.
pub struct WasmtimeLinkedModule<S: 'static> {
    pre: wasmtime::InstancePre<StoreData<S>>,
    config: RuntimeConfig,
    epoch: Option<Arc<EpochTicker>>,
}

impl<S: Send + 'static> LinkedModule<S> for WasmtimeLinkedModule<S> {
    fn instantiate(&self, state: S) -> Result<Box<dyn Instance<S>>, Error> {
        Ok(Box::new(WasmtimeInstance::new(
            &self.pre,
            &self.config,
            self.epoch.as_deref(),
            state,
        )?))
    }
}

pub(crate) fn convert_error(error: wasmtime::Error) -> Trap {
    if let Some(trap) = error.downcast_ref::<Trap>() {
        return trap.clone();
    }
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::OutOfFuel) => {
            Trap::new(runtime_api::TrapKind::OutOfFuel, "out of fuel")
        }
        // The trap itself is the message; the backtrace wasmtime attaches is for debugging.
        Some(trap) => Trap::new(runtime_api::TrapKind::Wasm, trap.to_string()),
        None => Trap::new(runtime_api::TrapKind::Wasm, format!("{error:#}")),
    }
}
