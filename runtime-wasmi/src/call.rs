//! Calls from the host into the guest, and what their failures become.
//!
//! Proxy-Wasm callbacks take `i32` arguments and return nothing or an `i32`, so those shapes (up
//! to eight arguments) are resolved once per instance into wasmi `TypedFunc`s, which take their
//! arguments natively without a type check per call. Other shapes go through `Func` with values
//! on the stack. With fuel slicing on, calls are resumable: when a slice runs out,
//! [`FuelSlices`](crate::fuel::FuelSlices) decides whether the call goes on; without it they are
//! plain calls.

use runtime_api::{Trap, TrapKind, ValType, WasmTrapCode, MAX_ARGS};
use wasmi::{
    Func, ResumableCall, StoreContextMut, TypedFunc, TypedResumableCall, Val, WasmParams,
    WasmResults,
};

use crate::host::{slot_to_val, val_to_slot, HostTrap};
use crate::instance::StoreData;
use crate::module::ExportedFunction;

/// A guest function of other than the typed shapes: its handle and how to pass its values.
#[derive(Clone, Copy)]
pub(crate) struct DynamicCall {
    func: Func,
    /// Bit `i` set: parameter `i` is an `i64`.
    i64_params: u32,
    result: Option<ValType>,
}

/// The type of a typed guest function's parameter: every one is an `i32`, passed as `u32`.
macro_rules! u32_param {
    ($index:literal) => {
        u32
    };
}

/// Generates [`GuestCall`] with one variant per typed shape: `$void` returns nothing, `$ret` an
/// `i32`; `$index` lists the argument positions.
macro_rules! guest_shapes {
    ($( $count:literal => $void:ident, $ret:ident: ($($index:literal),*); )*) => {
        /// A guest function resolved once, ready to be called by the host.
        #[derive(Clone, Copy)]
        pub(crate) enum GuestCall {
            $(
                $void(TypedFunc<($(u32_param!($index),)*), ()>),
                $ret(TypedFunc<($(u32_param!($index),)*), u32>),
            )*
            /// Any other integer shape.
            Dynamic(DynamicCall),
        }

        impl GuestCall {
            /// A typed handle for `func` if its shape has one.
            fn typed<S>(
                store: &wasmi::Store<StoreData<S>>,
                func: Func,
                params: usize,
                i32_result: bool,
            ) -> Option<Self> {
                match (params, i32_result) {
                    $(
                        ($count, false) => func.typed(store).ok().map(GuestCall::$void),
                        ($count, true) => func.typed(store).ok().map(GuestCall::$ret),
                    )*
                    _ => None,
                }
            }

            /// Calls the function; `args` and `results` were checked against its arity.
            pub(crate) fn call<S>(
                self,
                ctx: StoreContextMut<'_, StoreData<S>>,
                args: &[u64],
                results: &mut [u64],
            ) -> Result<(), Trap> {
                match self {
                    $(
                        GuestCall::$void(func) => {
                            run_typed(ctx, func, ($(arg(args, $index),)*))
                        }
                        GuestCall::$ret(func) => {
                            let result = run_typed(ctx, func, ($(arg(args, $index),)*))?;
                            if let Some(slot) = results.first_mut() {
                                *slot = u64::from(result);
                            }
                            Ok(())
                        }
                    )*
                    GuestCall::Dynamic(call) => run_dynamic(ctx, call, args, results),
                }
            }
        }
    };
}

guest_shapes! {
    0 => V0, R0: ();
    1 => V1, R1: (0);
    2 => V2, R2: (0, 1);
    3 => V3, R3: (0, 1, 2);
    4 => V4, R4: (0, 1, 2, 3);
    5 => V5, R5: (0, 1, 2, 3, 4);
    6 => V6, R6: (0, 1, 2, 3, 4, 5);
    7 => V7, R7: (0, 1, 2, 3, 4, 5, 6);
    8 => V8, R8: (0, 1, 2, 3, 4, 5, 6, 7);
}

impl GuestCall {
    /// Resolves `func`, an export of type `exported.ty` (integer types only, at most one result).
    pub(crate) fn resolve<S>(
        store: &wasmi::Store<StoreData<S>>,
        func: Func,
        exported: &ExportedFunction,
    ) -> Self {
        let ty = &exported.ty;
        let all_i32 = ty.params.iter().all(|t| *t == ValType::I32);
        let result = ty.results.first().copied();
        if all_i32 && matches!(result, None | Some(ValType::I32)) {
            let typed = GuestCall::typed(store, func, ty.params.len(), result.is_some());
            if let Some(typed) = typed {
                return typed;
            }
        }
        let i64_params = ty
            .params
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == ValType::I64)
            .fold(0, |mask, (i, _)| mask | (1 << i));
        GuestCall::Dynamic(DynamicCall {
            func,
            i64_params,
            result,
        })
    }
}

/// Argument `index` as an `i32` (arity was checked, so it exists).
#[inline]
fn arg(args: &[u64], index: usize) -> u32 {
    args.get(index).copied().unwrap_or(0) as u32
}

/// Runs a typed call to completion, giving it more fuel slices while the fuel policy allows.
#[inline]
fn run_typed<S, Params: WasmParams, Results: WasmResults>(
    mut ctx: StoreContextMut<'_, StoreData<S>>,
    func: TypedFunc<Params, Results>,
    params: Params,
) -> Result<Results, Trap> {
    if ctx.data().fuel.is_none() {
        // Without fuel a call cannot be suspended; the plain call is a little cheaper.
        return func.call(&mut ctx, params).map_err(|e| convert_error(&e));
    }
    let mut call = func
        .call_resumable(&mut ctx, params)
        .map_err(|e| convert_error(&e))?;
    loop {
        call = match call {
            TypedResumableCall::Finished(results) => return Ok(results),
            TypedResumableCall::HostTrap(trap) => return Err(convert_error(trap.host_error())),
            TypedResumableCall::OutOfFuel(paused) => {
                refuel(&mut ctx, paused.required_fuel())?;
                paused.resume(&mut ctx).map_err(|e| convert_error(&e))?
            }
        };
    }
}

/// Runs a call of any other shape with its values on the stack.
fn run_dynamic<S>(
    ctx: StoreContextMut<'_, StoreData<S>>,
    call: DynamicCall,
    args: &[u64],
    results: &mut [u64],
) -> Result<(), Trap> {
    let mut inputs: [Val; MAX_ARGS] = std::array::from_fn(|_| Val::I32(0));
    for (i, (input, arg)) in inputs.iter_mut().zip(args).enumerate() {
        let ty = if call.i64_params & (1 << i) != 0 {
            ValType::I64
        } else {
            ValType::I32
        };
        *input = slot_to_val(ty, *arg);
    }
    let mut outputs = [slot_to_val(call.result.unwrap_or(ValType::I32), 0)];
    let (Some(inputs), Some(outputs)) =
        (inputs.get(..args.len()), outputs.get_mut(..results.len()))
    else {
        return Err(Trap::new(
            TrapKind::BadCall,
            "too many arguments or results",
        ));
    };
    execute_dynamic(ctx, call.func, inputs, outputs)?;
    for (result, output) in results.iter_mut().zip(outputs.iter()) {
        *result = val_to_slot(output);
    }
    Ok(())
}

/// Runs an untyped call to completion, giving it more fuel slices while the fuel policy allows.
fn execute_dynamic<S>(
    mut ctx: StoreContextMut<'_, StoreData<S>>,
    func: Func,
    inputs: &[Val],
    outputs: &mut [Val],
) -> Result<(), Trap> {
    if ctx.data().fuel.is_none() {
        return func
            .call(&mut ctx, inputs, outputs)
            .map_err(|e| convert_error(&e));
    }
    let mut call = func
        .call_resumable(&mut ctx, inputs, outputs)
        .map_err(|e| convert_error(&e))?;
    loop {
        call = match call {
            ResumableCall::Finished => return Ok(()),
            ResumableCall::HostTrap(trap) => return Err(convert_error(trap.host_error())),
            ResumableCall::OutOfFuel(paused) => {
                refuel(&mut ctx, paused.required_fuel())?;
                paused
                    .resume(&mut ctx, outputs)
                    .map_err(|e| convert_error(&e))?
            }
        };
    }
}

/// A slice of fuel ran out: gives the call the next one, or stops it.
#[cold]
fn refuel<S>(ctx: &mut StoreContextMut<'_, StoreData<S>>, required: u64) -> Result<(), Trap> {
    let fuel = match ctx.data_mut().fuel.as_mut() {
        Some(slices) => slices.next_slice(required)?,
        // Fuel metering is on only with a fuel policy, so this is not expected.
        None => return Err(Trap::new(TrapKind::OutOfFuel, "out of fuel")),
    };
    ctx.set_fuel(fuel).map_err(|e| convert_error(&e))
}

/// What a wasmi error means for the host: a host function's trap unchanged, a Wasm trap in the
/// words every engine uses, or the engine's message.
#[cold]
pub(crate) fn convert_error(error: &wasmi::Error) -> Trap {
    if let Some(HostTrap(trap)) = error.downcast_ref::<HostTrap>() {
        return trap.clone();
    }
    if let Some(code) = error.i32_exit_status() {
        return Trap::exit(code);
    }
    match error.as_trap_code() {
        Some(wasmi::TrapCode::OutOfFuel) => Trap::new(TrapKind::OutOfFuel, "out of fuel"),
        Some(code) => match wasm_trap_code(code) {
            Some(code) => Trap::wasm(code),
            None => Trap::new(TrapKind::Wasm, format!("wasm trap: {code}")),
        },
        None => Trap::new(TrapKind::Wasm, error.to_string()),
    }
}

fn wasm_trap_code(code: wasmi::TrapCode) -> Option<WasmTrapCode> {
    use wasmi::TrapCode as T;
    Some(match code {
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
