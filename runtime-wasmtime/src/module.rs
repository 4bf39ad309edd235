//! Compiled and linked modules.

use std::mem::MaybeUninit;
use std::sync::Arc;

use runtime_api::{
    i64_mask, resolve_imports, CompiledModule, Error, Export, ExportedFunctions, ExternKind,
    FunctionType, HostCallback, HostFunction, Import, Instance, LinkedModule, RuntimeConfig, Trap,
    ValType, WasmTrapCode, MAX_ARGS,
};
use wasmtime::{Caller, ValRaw};

use crate::epoch::EpochTicker;
use crate::instance::{StoreData, WasmtimeCaller, WasmtimeInstance};

/// A module compiled by wasmtime.
pub struct WasmtimeModule {
    module: wasmtime::Module,
    imports: Vec<Import>,
    exports: Vec<Export>,
    functions: Arc<ExportedFunctions<ExportedFunction>>,
    config: RuntimeConfig,
    epoch: Option<Arc<EpochTicker>>,
}

/// An exported function the host may call, resolved once per module so that each new instance
/// finds its exports without name hashing, type queries or allocation.
pub(crate) struct ExportedFunction {
    pub(crate) export: wasmtime::ModuleExport,
    pub(crate) ty: FunctionType,
    pub(crate) i64_params: u32,
    pub(crate) i64_result: bool,
}

/// The callable exports of `module`.
fn exported_functions(module: &wasmtime::Module) -> ExportedFunctions<ExportedFunction> {
    module
        .exports()
        .filter_map(|e| {
            let ty = function_type(e.ty().func()?);
            if !ty.is_callable() {
                return None;
            }
            let function = ExportedFunction {
                export: module.get_export_index(e.name())?,
                i64_params: i64_mask(&ty.params),
                i64_result: ty.results.first() == Some(&ValType::I64),
                ty,
            };
            Some((e.name().to_string(), function))
        })
        .collect()
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
        let functions = Arc::new(exported_functions(&module));
        WasmtimeModule {
            module,
            imports,
            exports,
            functions,
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
            if define_typed(&mut linker, function)? {
                continue;
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
            let shape = HostShape::of(function);
            let callback = function.callback;
            let trampoline = move |caller: Caller<'_, StoreData<S>>,
                                   slots: &mut [MaybeUninit<ValRaw>]| {
                call_host(callback, shape, caller, slots)
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
            functions: self.functions.clone(),
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

/// Defines the common shape, `i32` parameters and one `i32` result, as a typed wasmtime host
/// function: wasm then calls it with native arguments, without spilling them into a slot array.
/// Returns `false` for other shapes, which go through `func_new_unchecked`.
fn define_typed<S: Send + 'static>(
    linker: &mut wasmtime::Linker<StoreData<S>>,
    function: &HostFunction<S>,
) -> Result<bool, Error> {
    let signature = function.signature;
    if signature.results != [ValType::I32] || signature.params.iter().any(|t| *t != ValType::I32) {
        return Ok(false);
    }
    let callback = function.callback;
    // Each arm: a closure of that arity that puts its arguments in slots, calls the callback and
    // returns slot 0.
    macro_rules! typed {
        ($($arg:ident),*) => {
            linker.func_wrap(
                function.module,
                function.name,
                move |caller: Caller<'_, StoreData<S>>, $($arg: u32),*| -> wasmtime::Result<u32> {
                    let mut args = [$(u64::from($arg),)* 0u64];
                    let mut caller = WasmtimeCaller { caller };
                    callback(&mut caller, &mut args).map_err(wasmtime::Error::new)?;
                    Ok(args[0] as u32)
                },
            )
        };
    }
    let defined = match signature.params.len() {
        0 => typed!(),
        1 => typed!(a),
        2 => typed!(a, b),
        3 => typed!(a, b, c),
        4 => typed!(a, b, c, d),
        5 => typed!(a, b, c, d, e),
        6 => typed!(a, b, c, d, e, f),
        7 => typed!(a, b, c, d, e, f, g),
        8 => typed!(a, b, c, d, e, f, g, h),
        9 => typed!(a, b, c, d, e, f, g, h, i),
        10 => typed!(a, b, c, d, e, f, g, h, i, j),
        11 => typed!(a, b, c, d, e, f, g, h, i, j, k),
        12 => typed!(a, b, c, d, e, f, g, h, i, j, k, l),
        _ => return Ok(false),
    };
    defined.map_err(|e| Error::Config(format!("{e:#}")))?;
    Ok(true)
}

/// What `call_host` needs to know of a host function's type, computed once at link time.
#[derive(Clone, Copy)]
struct HostShape {
    params: usize,
    /// Bit `i` set: parameter `i` is an `i64`.
    i64_params: u32,
    /// `None`: no result; `Some(true)`: an `i64` result.
    result_i64: Option<bool>,
}

impl HostShape {
    fn of<S>(function: &HostFunction<S>) -> Self {
        let params = function.signature.params;
        HostShape {
            params: params.len(),
            i64_params: i64_mask(params),
            result_i64: function
                .signature
                .results
                .first()
                .map(|t| *t == ValType::I64),
        }
    }
}

/// The body of every host function: slots in, callback, slot 0 out.
fn call_host<S: 'static>(
    callback: HostCallback<S>,
    shape: HostShape,
    caller: Caller<'_, StoreData<S>>,
    slots: &mut [MaybeUninit<ValRaw>],
) -> wasmtime::Result<()> {
    let mut args = [0u64; MAX_ARGS];
    for (i, arg) in args.iter_mut().enumerate().take(shape.params) {
        // SAFETY: wasmtime initialises one slot per parameter, typed as declared at link time.
        let raw = unsafe { slots[i].assume_init_ref() };
        *arg = if shape.i64_params & (1 << i) != 0 {
            raw.get_u64()
        } else {
            u64::from(raw.get_u32())
        };
    }
    let mut caller = WasmtimeCaller { caller };
    callback(&mut caller, &mut args[..shape.params.max(1)]).map_err(wasmtime::Error::new)?;
    match shape.result_i64 {
        Some(true) => slots[0] = MaybeUninit::new(ValRaw::u64(args[0])),
        Some(false) => slots[0] = MaybeUninit::new(ValRaw::u32(args[0] as u32)),
        None => {}
    }
    Ok(())
}

/// A module linked against a host function table, instantiated once per VM copy.
pub struct WasmtimeLinkedModule<S: 'static> {
    pre: wasmtime::InstancePre<StoreData<S>>,
    functions: Arc<ExportedFunctions<ExportedFunction>>,
    config: RuntimeConfig,
    epoch: Option<Arc<EpochTicker>>,
}

impl<S: Send + 'static> LinkedModule<S> for WasmtimeLinkedModule<S> {
    fn instantiate(&self, state: S) -> Result<Box<dyn Instance<S>>, Error> {
        Ok(Box::new(WasmtimeInstance::new(
            &self.pre,
            self.functions.clone(),
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
        Some(trap) => match wasm_trap_code(*trap) {
            Some(code) => Trap::wasm(code),
            // The trap itself is the message; the backtrace wasmtime attaches is for debugging.
            None => Trap::new(runtime_api::TrapKind::Wasm, trap.to_string()),
        },
        None => Trap::new(runtime_api::TrapKind::Wasm, format!("{error:#}")),
    }
}

fn wasm_trap_code(trap: wasmtime::Trap) -> Option<WasmTrapCode> {
    use wasmtime::Trap as T;
    Some(match trap {
        T::UnreachableCodeReached => WasmTrapCode::Unreachable,
        T::MemoryOutOfBounds => WasmTrapCode::MemoryOutOfBounds,
        T::StackOverflow => WasmTrapCode::StackOverflow,
        T::IntegerDivisionByZero => WasmTrapCode::IntegerDivisionByZero,
        T::IntegerOverflow => WasmTrapCode::IntegerOverflow,
        T::BadConversionToInteger => WasmTrapCode::BadConversionToInteger,
        T::IndirectCallToNull => WasmTrapCode::IndirectCallToNull,
        T::BadSignature => WasmTrapCode::BadSignature,
        T::TableOutOfBounds => WasmTrapCode::TableOutOfBounds,
        _ => return None,
    })
}
