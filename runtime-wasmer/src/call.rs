//! Calls in both directions with native arguments: typed guest functions for the all-`i32` shapes
//! Proxy-Wasm uses, typed host functions likewise, and a dynamic path for anything else.

use runtime_api::{HostCallback, HostFunction, Trap, TrapKind, ValType, WasmTrapCode, MAX_ARGS};
use wasmer::sys::vm::TrapCode;
use wasmer::{
    AsStoreMut, Function, FunctionEnv, FunctionEnvMut, FunctionType, RuntimeError, Type,
    TypedFunction, Value,
};

use crate::instance::{Env, WasmerCaller};

/// `i32` parameter lists of the typed guest calls, by arity.
type I32x5 = (i32, i32, i32, i32, i32);
type I32x6 = (i32, i32, i32, i32, i32, i32);
type I32x7 = (i32, i32, i32, i32, i32, i32, i32);
type I32x8 = (i32, i32, i32, i32, i32, i32, i32, i32);

/// A guest function resolved once per instance, called without type checks or allocation when
/// its shape is all-`i32` with at most one result.
#[derive(Clone)]
pub(crate) enum GuestCall {
    /// `i32` parameters (as many as the variant says), no result.
    V0(TypedFunction<(), ()>),
    V1(TypedFunction<i32, ()>),
    V2(TypedFunction<(i32, i32), ()>),
    V3(TypedFunction<(i32, i32, i32), ()>),
    V4(TypedFunction<(i32, i32, i32, i32), ()>),
    V5(TypedFunction<I32x5, ()>),
    V6(TypedFunction<I32x6, ()>),
    V7(TypedFunction<I32x7, ()>),
    V8(TypedFunction<I32x8, ()>),
    /// `i32` parameters, one `i32` result.
    R0(TypedFunction<(), i32>),
    R1(TypedFunction<i32, i32>),
    R2(TypedFunction<(i32, i32), i32>),
    R3(TypedFunction<(i32, i32, i32), i32>),
    R4(TypedFunction<(i32, i32, i32, i32), i32>),
    R5(TypedFunction<I32x5, i32>),
    R6(TypedFunction<I32x6, i32>),
    R7(TypedFunction<I32x7, i32>),
    R8(TypedFunction<I32x8, i32>),
    /// Any other integer shape: values built per call.
    Dynamic(Function, FunctionType),
}

impl GuestCall {
    /// The fastest way to call `function` of type `ty` (integer types only).
    pub(crate) fn new(
        store: &impl wasmer::AsStoreRef,
        function: &Function,
        ty: &FunctionType,
    ) -> Self {
        let all_i32 = ty.params().iter().all(|t| *t == Type::I32);
        let results = ty.results();
        macro_rules! typed {
            ($variant:ident) => {
                match function.typed(store) {
                    Ok(typed) => return GuestCall::$variant(typed),
                    Err(_) => {}
                }
            };
        }
        if all_i32 && results.is_empty() {
            match ty.params().len() {
                0 => typed!(V0),
                1 => typed!(V1),
                2 => typed!(V2),
                3 => typed!(V3),
                4 => typed!(V4),
                5 => typed!(V5),
                6 => typed!(V6),
                7 => typed!(V7),
                8 => typed!(V8),
                _ => {}
            }
        } else if all_i32 && results == [Type::I32] {
            match ty.params().len() {
                0 => typed!(R0),
                1 => typed!(R1),
                2 => typed!(R2),
                3 => typed!(R3),
                4 => typed!(R4),
                5 => typed!(R5),
                6 => typed!(R6),
                7 => typed!(R7),
                8 => typed!(R8),
                _ => {}
            }
        }
        GuestCall::Dynamic(function.clone(), ty.clone())
    }

    /// Calls the function; the caller has checked the arity against the function's type.
    #[inline]
    pub(crate) fn call(
        &self,
        store: &mut impl AsStoreMut,
        args: &[u64],
        results: &mut [u64],
    ) -> Result<(), RuntimeError> {
        // Arguments are zero-extended `i32` values: take the low 32 bits back.
        let a = |i: usize| args[i] as u32 as i32;
        let mut set = |value: i32| results[0] = u64::from(value as u32);
        match self {
            GuestCall::V0(f) => f.call(store),
            GuestCall::V1(f) => f.call(store, a(0)),
            GuestCall::V2(f) => f.call(store, a(0), a(1)),
            GuestCall::V3(f) => f.call(store, a(0), a(1), a(2)),
            GuestCall::V4(f) => f.call(store, a(0), a(1), a(2), a(3)),
            GuestCall::V5(f) => f.call(store, a(0), a(1), a(2), a(3), a(4)),
            GuestCall::V6(f) => f.call(store, a(0), a(1), a(2), a(3), a(4), a(5)),
            GuestCall::V7(f) => f.call(store, a(0), a(1), a(2), a(3), a(4), a(5), a(6)),
            GuestCall::V8(f) => f.call(store, a(0), a(1), a(2), a(3), a(4), a(5), a(6), a(7)),
            GuestCall::R0(f) => f.call(store).map(&mut set),
            GuestCall::R1(f) => f.call(store, a(0)).map(&mut set),
            GuestCall::R2(f) => f.call(store, a(0), a(1)).map(&mut set),
            GuestCall::R3(f) => f.call(store, a(0), a(1), a(2)).map(&mut set),
            GuestCall::R4(f) => f.call(store, a(0), a(1), a(2), a(3)).map(&mut set),
            GuestCall::R5(f) => f.call(store, a(0), a(1), a(2), a(3), a(4)).map(&mut set),
            GuestCall::R6(f) => f
                .call(store, a(0), a(1), a(2), a(3), a(4), a(5))
                .map(&mut set),
            GuestCall::R7(f) => f
                .call(store, a(0), a(1), a(2), a(3), a(4), a(5), a(6))
                .map(&mut set),
            GuestCall::R8(f) => f
                .call(store, a(0), a(1), a(2), a(3), a(4), a(5), a(6), a(7))
                .map(&mut set),
            GuestCall::Dynamic(f, ty) => {
                let values: Vec<Value> = ty
                    .params()
                    .iter()
                    .zip(args)
                    .map(|(t, arg)| to_value(*t, *arg))
                    .collect();
                let returned = f.call(store, &values)?;
                for (slot, value) in results.iter_mut().zip(returned.iter()) {
                    *slot = from_value(value);
                }
                Ok(())
            }
        }
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
    let ty = FunctionType::new(
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
