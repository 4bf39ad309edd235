//! Calls in both directions with native arguments: guest functions through wasmer's own call
//! trampoline, resolved once per instance, and typed host functions for the shapes Proxy-Wasm
//! uses, with a dynamic path for any other host shape.
//!
//! # Why guest calls bypass `TypedFunction::call`
//!
//! Each `TypedFunction::call` (wasmer 7.4.2, `sys` backend) looks the function up in the store,
//! pushes the store on wasmer's thread-local store-context stack and pauses it, and only then
//! enters `wasmer_call_trampoline`, which runs the guest on a coroutine stack under a trap
//! handler. The lookups and the typed wrapper cost about as much as the trampoline itself
//! (callgrind: 611 instructions for a call to an empty function, 305–429 through the trampoline
//! directly). [`GuestCall`] resolves the function's trampoline, body and context once, and
//! [`GuestCall::call`] installs the store context with `StoreMut::parked` — "the same thing
//! `Function::call` does before entering Wasm", in its documentation — and calls the public
//! `wasmer::sys::vm::wasmer_call_trampoline`, which is what `TypedFunction::call` calls.

use runtime_api::{
    FunctionType, HostCallback, HostFunction, Trap, TrapKind, ValType, WasmTrapCode, MAX_ARGS,
};
use wasmer::sys::vm::{
    wasmer_call_trampoline, TrapCode, TrapHandlerFn, VMCallerCheckedAnyfunc, VMExtern,
};
use wasmer::sys::NativeEngineExt;
use wasmer::{
    AsStoreMut, AsStoreRef, Extern, Function, FunctionEnv, FunctionEnvMut, RuntimeError, Store,
    Type, Value,
};
use wasmer_types::RawValue;

use crate::instance::{Env, WasmerCaller};

/// A guest function resolved for calls from the host: its entry points in the instance, and
/// its type as the slots need it. Only functions of [`FunctionType::is_callable`] types (at most
/// [`MAX_ARGS`] integer parameters, at most one integer result) are resolved.
#[derive(Clone, Copy)]
pub(crate) struct GuestCall {
    /// The function's body, trampoline and instance context.
    anyfunc: VMCallerCheckedAnyfunc,
    /// The store's custom signal handler (wasmer passes it to every call; none by default).
    handler: Option<*const TrapHandlerFn<'static>>,
    /// The engine's guest stack size (`Tunables::vmconfig`).
    stack_size: Option<usize>,
    /// Bit `i` set where parameter `i` is an `i64` (else it is an `i32`).
    i64_params: u32,
    params: u8,
    /// The result, if any: `Some(true)` for an `i64`.
    result_is_i64: Option<bool>,
}

// SAFETY: the pointers lead into the instance's `VMContext` and the engine's code, owned by the
// store whose `Env` holds this value; they are only used by whoever holds that store mutably
// (the `Env`, like the store, moves between threads only while no call runs).
unsafe impl Send for GuestCall {}

impl GuestCall {
    /// `function`, an export of an instance in `store`, of callable type `ty`.
    pub(crate) fn new(store: &mut Store, function: &Function, ty: &FunctionType) -> Option<Self> {
        if !ty.is_callable() {
            return None;
        }
        let VMExtern::Function(handle) = Extern::Function(function.clone())
            .to_vm_extern()
            .unwrap_sys()
        else {
            return None;
        };
        // SAFETY: the handle belongs to this store (the instance's exports), whose objects hold
        // the function's `anyfunc` record; it is copied out, and what it points to (the
        // instance's `VMContext`, the compiled body and trampoline) lives as long as the store.
        let anyfunc = unsafe {
            *handle
                .get(store.objects_mut().as_sys())
                .anyfunc
                .as_ptr()
                .as_ref()
        };
        Some(GuestCall {
            anyfunc,
            handler: store.as_store_ref().signal_handler(),
            stack_size: store.engine().tunables().vmconfig().wasm_stack_size,
            i64_params: runtime_api::i64_mask(&ty.params),
            params: ty.params.len() as u8,
            result_is_i64: ty.results.first().map(|t| *t == ValType::I64),
        })
    }

    /// Calls the function with `args` (zero-extended `i32`s or `i64` bits, by its type) and
    /// writes its result, if it has one, into `results[0]`. The caller has checked the arity
    /// against the function's type.
    ///
    /// # Safety
    /// `store` must be the store the function was resolved in, alive and not otherwise borrowed:
    /// the call runs the guest code it owns and installs it as the thread's current store for the
    /// host functions the guest calls.
    #[inline]
    pub(crate) unsafe fn call(
        &self,
        store: &mut impl AsStoreMut,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), RuntimeError> {
        let mut slots = [RawValue { u128: 0 }; MAX_ARGS];
        let params = usize::from(self.params);
        for (i, (slot, arg)) in slots.iter_mut().zip(args).take(params).enumerate() {
            if self.i64_params & (1 << i) != 0 {
                slot.i64 = *arg as i64;
            } else {
                slot.i32 = *arg as u32 as i32;
            }
        }
        let config = wasmer::sys::vm::VMConfig {
            wasm_stack_size: self.stack_size,
        };
        store.as_store_mut().parked(|| {
            // SAFETY: `new` resolved the record in this store (the caller's contract), which is
            // alive, held by us and, through `parked`, installed as the thread's store for as
            // long as the guest runs, as `TypedFunction::call` installs it. The function takes `params`
            // integers and returns at most one, so its trampoline reads and writes within
            // `slots` (`MAX_ARGS` of wasmer's own `RawValue`s), each parameter written above as
            // the type the function declares.
            unsafe {
                wasmer_call_trampoline(
                    self.handler,
                    &config,
                    self.anyfunc.vmctx,
                    self.anyfunc.call_trampoline,
                    self.anyfunc.func_ptr,
                    slots.as_mut_ptr().cast(),
                )
            }
        })?;
        if let (Some(is_i64), Some(result)) = (self.result_is_i64, results.first_mut()) {
            // SAFETY: the trampoline wrote the result into slot 0 as the declared type (and any
            // bit pattern is a valid integer).
            *result = unsafe {
                if is_i64 {
                    slots[0].i64 as u64
                } else {
                    u64::from(slots[0].i32 as u32)
                }
            };
        }
        Ok(())
    }
}

/// A 64-bit slot as a value of type `ty` (floats travel as their bits).
fn to_value(ty: Type, slot: u64) -> Value {
    match ty {
        Type::I64 => Value::I64(slot as i64),
        Type::F32 => Value::F32(f32::from_bits(slot as u32)),
        Type::F64 => Value::F64(f64::from_bits(slot)),
        _ => Value::I32(slot as u32 as i32),
    }
}

/// A value as a 64-bit slot (floats travel as their bits; references have no slot form).
fn from_value(value: &Value) -> u64 {
    match value {
        Value::I32(v) => u64::from(*v as u32),
        Value::I64(v) => *v as u64,
        Value::F32(v) => u64::from(v.to_bits()),
        Value::F64(v) => v.to_bits(),
        _ => 0,
    }
}

/// The wasmer type of a host signature's value type.
fn wasmer_type(ty: ValType) -> Type {
    match ty {
        ValType::I64 => Type::I64,
        ValType::F32 => Type::F32,
        ValType::F64 => Type::F64,
        // Host functions are declared with integer types; `Other` cannot reach this point because
        // `resolve_imports` matched the module's type against the host's.
        ValType::I32 | ValType::Other => Type::I32,
    }
}

/// A host-function argument as its 64-bit slot: `i32` zero-extended from its unsigned value,
/// `i64` as its bits.
trait Slot {
    fn slot(self) -> u64;
}

impl Slot for i32 {
    #[inline]
    fn slot(self) -> u64 {
        u64::from(self as u32)
    }
}

impl Slot for i64 {
    #[inline]
    fn slot(self) -> u64 {
        self as u64
    }
}

/// Creates `host` as a function of the store behind `env`: typed (native arguments, no value
/// vectors, no allocation) for every shape Proxy-Wasm and the WASI subset use on hot paths —
/// `i32` parameters with one `i32` result or none, and the `i64`-carrying metrics and clock
/// calls — and dynamic otherwise.
pub(crate) fn host_function<S: Send + 'static>(
    store: &mut impl AsStoreMut,
    env: &FunctionEnv<Env<S>>,
    host: &HostFunction<S>,
) -> Function {
    use ValType::{I32, I64};
    let signature = host.signature;
    let callback = host.callback;
    // Each use: a closure with these parameters that puts them in slots, calls the callback and
    // returns slot 0 (or nothing).
    macro_rules! typed {
        (($($arg:ident: $ty:ty),*) -> i32) => {
            return Function::new_typed_with_env(
                store,
                env,
                move |env: FunctionEnvMut<'_, Env<S>>, $($arg: $ty),*| -> Result<i32, Trap> {
                    let mut args = [$(Slot::slot($arg),)* 0u64];
                    callback(&mut WasmerCaller::new(env), &mut args)?;
                    Ok(args[0] as u32 as i32)
                },
            )
        };
        (($($arg:ident: $ty:ty),*) -> ()) => {
            return Function::new_typed_with_env(
                store,
                env,
                move |env: FunctionEnvMut<'_, Env<S>>, $($arg: $ty),*| -> Result<(), Trap> {
                    let mut args = [$(Slot::slot($arg),)* 0u64];
                    callback(&mut WasmerCaller::new(env), &mut args)
                },
            )
        };
    }
    let all_i32 = signature.params.iter().all(|t| *t == I32);
    match (signature.params.len(), signature.results) {
        (0, [I32]) if all_i32 => typed!(() -> i32),
        (1, [I32]) if all_i32 => typed!((a: i32) -> i32),
        (2, [I32]) if all_i32 => typed!((a: i32, b: i32) -> i32),
        (3, [I32]) if all_i32 => typed!((a: i32, b: i32, c: i32) -> i32),
        (4, [I32]) if all_i32 => typed!((a: i32, b: i32, c: i32, d: i32) -> i32),
        (5, [I32]) if all_i32 => typed!((a: i32, b: i32, c: i32, d: i32, e: i32) -> i32),
        (6, [I32]) if all_i32 => {
            typed!((a: i32, b: i32, c: i32, d: i32, e: i32, f: i32) -> i32)
        }
        (7, [I32]) if all_i32 => {
            typed!((a: i32, b: i32, c: i32, d: i32, e: i32, f: i32, g: i32) -> i32)
        }
        (8, [I32]) if all_i32 => {
            typed!((a: i32, b: i32, c: i32, d: i32, e: i32, f: i32, g: i32, h: i32) -> i32)
        }
        (9, [I32]) if all_i32 => typed!((
            a: i32, b: i32, c: i32, d: i32, e: i32, f: i32, g: i32, h: i32, i: i32
        ) -> i32),
        (10, [I32]) if all_i32 => typed!((
            a: i32, b: i32, c: i32, d: i32, e: i32, f: i32, g: i32, h: i32, i: i32, j: i32
        ) -> i32),
        (11, [I32]) if all_i32 => typed!((
            a: i32, b: i32, c: i32, d: i32, e: i32, f: i32, g: i32, h: i32, i: i32, j: i32,
            k: i32
        ) -> i32),
        (12, [I32]) if all_i32 => typed!((
            a: i32, b: i32, c: i32, d: i32, e: i32, f: i32, g: i32, h: i32, i: i32, j: i32,
            k: i32, l: i32
        ) -> i32),
        (0, []) => typed!(() -> ()),
        (1, []) if all_i32 => typed!((a: i32) -> ()),
        (2, []) if all_i32 => typed!((a: i32, b: i32) -> ()),
        (3, []) if all_i32 => typed!((a: i32, b: i32, c: i32) -> ()),
        (4, []) if all_i32 => typed!((a: i32, b: i32, c: i32, d: i32) -> ()),
        _ => {}
    }
    match (signature.params, signature.results) {
        // proxy_increment_metric, proxy_record_metric
        ([I32, I64], [I32]) => typed!((a: i32, b: i64) -> i32),
        // clock_time_get
        ([I32, I64, I32], [I32]) => typed!((a: i32, b: i64, c: i32) -> i32),
        // fd_seek
        ([I32, I64, I32, I32], [I32]) => typed!((a: i32, b: i64, c: i32, d: i32) -> i32),
        _ => dynamic_host_function(store, env, callback, signature),
    }
}

/// A host function of any integer shape, through wasmer's value vectors.
fn dynamic_host_function<S: Send + 'static>(
    store: &mut impl AsStoreMut,
    env: &FunctionEnv<Env<S>>,
    callback: HostCallback<S>,
    signature: runtime_api::Signature,
) -> Function {
    let ty = wasmer::FunctionType::new(
        signature
            .params
            .iter()
            .map(|t| wasmer_type(*t))
            .collect::<Vec<_>>(),
        signature
            .results
            .iter()
            .map(|t| wasmer_type(*t))
            .collect::<Vec<_>>(),
    );
    let result_type = signature.results.first().map(|t| wasmer_type(*t));
    Function::new_with_env(
        store,
        env,
        ty,
        move |env: FunctionEnvMut<'_, Env<S>>, values: &[Value]| {
            let mut args = [0u64; MAX_ARGS];
            for (slot, value) in args.iter_mut().zip(values) {
                *slot = from_value(value);
            }
            let used = values.len().max(1);
            callback(&mut WasmerCaller::new(env), &mut args[..used])
                .map_err(|trap| RuntimeError::user(Box::new(trap)))?;
            Ok(match result_type {
                Some(ty) => vec![to_value(ty, args[0])],
                None => Vec::new(),
            })
        },
    )
}

/// A wasmer error as the engine-neutral trap.
pub(crate) fn convert_error(error: RuntimeError) -> Trap {
    if let Some(trap) = error.downcast_ref::<Trap>() {
        return trap.clone();
    }
    let message = error.message();
    match error.to_trap() {
        Some(code) => match wasm_trap_code(code) {
            Some(code) => Trap::wasm(code),
            // wasmtime's wording, which has no canonical code either.
            None if matches!(code, TrapCode::HeapMisaligned | TrapCode::UnalignedAtomic) => {
                Trap::new(TrapKind::Wasm, "wasm trap: misaligned memory access")
            }
            None => Trap::new(TrapKind::Wasm, format!("wasm trap: {message}")),
        },
        None => Trap::new(TrapKind::Wasm, message),
    }
}

fn wasm_trap_code(code: TrapCode) -> Option<WasmTrapCode> {
    use TrapCode as T;
    Some(match code {
        T::UnreachableCodeReached => WasmTrapCode::Unreachable,
        T::HeapAccessOutOfBounds => WasmTrapCode::MemoryOutOfBounds,
        T::StackOverflow => WasmTrapCode::StackOverflow,
        T::IntegerDivisionByZero => WasmTrapCode::IntegerDivisionByZero,
        T::IntegerOverflow => WasmTrapCode::IntegerOverflow,
        T::BadConversionToInteger => WasmTrapCode::BadConversionToInteger,
        T::IndirectCallToNull => WasmTrapCode::IndirectCallToNull,
        T::BadSignature => WasmTrapCode::BadSignature,
        T::TableAccessOutOfBounds => WasmTrapCode::TableOutOfBounds,
        _ => return None,
    })
}
