//! Host functions: [`HostFunction`]s registered in a wasmi `Linker`.
//!
//! wasmi calls a typed closure (`Linker::func_wrap`) with its arguments as native values and no
//! allocation, while its untyped form (`Linker::func_new`) clones a boxed argument buffer on every
//! call. So every signature shape that Proxy-Wasm and WASI preview 1 use gets a typed closure
//! (generated per shape below), and only other shapes fall back to `func_new`.

use std::fmt;

use runtime_api::{Error, HostCallback, HostFunction, Trap, ValType, MAX_ARGS};
use wasmi::{Val, WasmTy};

use crate::instance::{StoreData, WasmiCaller};

/// A host function's [`Trap`], carried through wasmi to the host call that started the guest.
#[derive(Debug)]
pub(crate) struct HostTrap(pub(crate) Trap);

impl fmt::Display for HostTrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl wasmi::errors::HostError for HostTrap {}

/// Wraps a host function's trap for wasmi (boxed: this is the failure path only).
#[cold]
pub(crate) fn host_error(trap: Trap) -> wasmi::Error {
    wasmi::Error::host(HostTrap(trap))
}

/// Runs a host function. A panic in it is its trap: wasmi's executor cannot unwind (the panic
/// would abort the process, "panic in a function that cannot unwind"), where every other engine
/// carries it, or its trap, to the call that started the guest.
#[inline]
fn run<S>(
    callback: HostCallback<S>,
    caller: &mut WasmiCaller<'_, S>,
    slots: &mut [u64],
) -> Result<(), wasmi::Error> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| callback(caller, slots))) {
        Ok(result) => result.map_err(host_error),
        Err(panic) => Err(host_error(Trap::host(format!(
            "a host function panicked: {}",
            runtime_api::panic_message(&*panic)
        )))),
    }
}

/// An integer parameter type of a typed host closure, and how it maps to a 64-bit slot.
trait Slot: WasmTy {
    const TYPE: ValType;
    fn into_slot(self) -> u64;
}

impl Slot for u32 {
    const TYPE: ValType = ValType::I32;
    #[inline]
    fn into_slot(self) -> u64 {
        u64::from(self)
    }
}

impl Slot for u64 {
    const TYPE: ValType = ValType::I64;
    #[inline]
    fn into_slot(self) -> u64 {
        self
    }
}

/// The result type of a typed host closure: nothing, `i32` or `i64`, read from slot 0.
trait ResultSlot {
    const TYPES: &'static [ValType];
    fn from_slot(slot: u64) -> Self;
}

impl ResultSlot for () {
    const TYPES: &'static [ValType] = &[];
    #[inline]
    fn from_slot(_slot: u64) -> Self {}
}

impl ResultSlot for u32 {
    const TYPES: &'static [ValType] = &[ValType::I32];
    #[inline]
    fn from_slot(slot: u64) -> Self {
        slot as u32
    }
}

impl ResultSlot for u64 {
    const TYPES: &'static [ValType] = &[ValType::I64];
    #[inline]
    fn from_slot(slot: u64) -> Self {
        slot
    }
}

/// Defines `function` in `linker`: as a typed closure if its shape is listed below, otherwise
/// through `func_new`.
pub(crate) fn define_host_function<S: Send + 'static>(
    linker: &mut wasmi::Linker<StoreData<S>>,
    function: &HostFunction<S>,
) -> Result<(), Error> {
    let signature = function.signature;
    if signature.params.len() > MAX_ARGS
        || signature.results.len() > 1
        || signature
            .params
            .iter()
            .chain(signature.results)
            .any(|t| *t == ValType::Other)
    {
        return Err(Error::Config(format!(
            "host function {function:?} has a signature wasmi cannot pass in slots"
        )));
    }
    let callback = function.callback;
    // Each entry: a closure of that shape that puts its arguments in slots, calls the callback
    // and returns slot 0. `slots` has one spare element so that slot 0 exists for a result even
    // when there are no arguments.
    macro_rules! typed_shapes {
        ($( ($($arg:ident: $ty:ty),*) -> $ret:ty; )*) => {
            $({
                const PARAMS: &[ValType] = &[$(<$ty as Slot>::TYPE),*];
                if signature.params == PARAMS && signature.results == <$ret as ResultSlot>::TYPES {
                    linker
                        .func_wrap(
                            function.module,
                            function.name,
                            move |caller: wasmi::Caller<'_, StoreData<S>>,
                                  $($arg: $ty),*|
                                  -> Result<$ret, wasmi::Error> {
                                let mut slots = [$(Slot::into_slot($arg),)* 0u64];
                                let used = PARAMS.len().max(1);
                                let mut caller = WasmiCaller { caller };
                                run(callback, &mut caller, &mut slots[..used])?;
                                Ok(<$ret as ResultSlot>::from_slot(slots[0]))
                            },
                        )
                        .map_err(|e| Error::Config(e.to_string()))?;
                    return Ok(());
                }
            })*
        };
    }
    typed_shapes! {
        // Proxy-Wasm and most of WASI: i32 parameters, an i32 status.
        () -> u32;
        (a: u32) -> u32;
        (a: u32, b: u32) -> u32;
        (a: u32, b: u32, c: u32) -> u32;
        (a: u32, b: u32, c: u32, d: u32) -> u32;
        (a: u32, b: u32, c: u32, d: u32, e: u32) -> u32;
        (a: u32, b: u32, c: u32, d: u32, e: u32, f: u32) -> u32;
        (a: u32, b: u32, c: u32, d: u32, e: u32, f: u32, g: u32) -> u32;
        (a: u32, b: u32, c: u32, d: u32, e: u32, f: u32, g: u32, h: u32) -> u32;
        (a: u32, b: u32, c: u32, d: u32, e: u32, f: u32, g: u32, h: u32, i: u32) -> u32;
        (a: u32, b: u32, c: u32, d: u32, e: u32, f: u32, g: u32, h: u32, i: u32, j: u32) -> u32;
        (a: u32, b: u32, c: u32, d: u32, e: u32, f: u32, g: u32, h: u32, i: u32, j: u32,
         k: u32) -> u32;
        (a: u32, b: u32, c: u32, d: u32, e: u32, f: u32, g: u32, h: u32, i: u32, j: u32,
         k: u32, l: u32) -> u32;
        // No result: `proc_exit` and the like.
        () -> ();
        (a: u32) -> ();
        (a: u32, b: u32) -> ();
        // i64 parameters: Proxy-Wasm metrics, WASI offsets, lengths, rights and timestamps.
        (a: u32, b: u64) -> u32;
        (a: u32, b: u64, c: u32) -> u32;
        (a: u32, b: u64, c: u32, d: u32) -> u32;
        (a: u32, b: u64, c: u64) -> u32;
        (a: u32, b: u64, c: u64, d: u32) -> u32;
        (a: u32, b: u32, c: u32, d: u64, e: u32) -> u32;
        (a: u32, b: u32, c: u32, d: u32, e: u64, f: u64, g: u32) -> u32;
        (a: u32, b: u32, c: u32, d: u32, e: u32, f: u64, g: u64, h: u32, i: u32) -> u32;
    }
    define_untyped(linker, function, callback)
}

/// Defines a host function of an unlisted shape with `func_new`, which allocates a little on
/// every call.
fn define_untyped<S: Send + 'static>(
    linker: &mut wasmi::Linker<StoreData<S>>,
    function: &HostFunction<S>,
    callback: HostCallback<S>,
) -> Result<(), Error> {
    let signature = function.signature;
    let ty = wasmi::FuncType::new(
        signature.params.iter().map(|t| wasmi_val_type(*t)),
        signature.results.iter().map(|t| wasmi_val_type(*t)),
    );
    let result_type = signature.results.first().copied();
    let trampoline = move |caller: wasmi::Caller<'_, StoreData<S>>,
                           params: &[Val],
                           results: &mut [Val]|
          -> Result<(), wasmi::Error> {
        let mut slots = [0u64; MAX_ARGS];
        for (slot, value) in slots.iter_mut().zip(params) {
            *slot = val_to_slot(value);
        }
        let Some(args) = slots.get_mut(..params.len().max(1)) else {
            return Err(host_error(Trap::host("too many host function arguments")));
        };
        let mut caller = WasmiCaller { caller };
        run(callback, &mut caller, args)?;
        if let (Some(result), Some(ty)) = (results.first_mut(), result_type) {
            *result = slot_to_val(ty, args[0]);
        }
        Ok(())
    };
    linker
        .func_new(function.module, function.name, ty, trampoline)
        .map_err(|e| Error::Config(e.to_string()))?;
    Ok(())
}

/// The wasmi type of a host signature's type (`Other` was refused before).
fn wasmi_val_type(ty: ValType) -> wasmi::ValType {
    match ty {
        ValType::I64 => wasmi::ValType::I64,
        ValType::F32 => wasmi::ValType::F32,
        ValType::F64 => wasmi::ValType::F64,
        ValType::I32 | ValType::Other => wasmi::ValType::I32,
    }
}

/// A value as a slot: integers zero-extended from their unsigned value, floats as their bits.
pub(crate) fn val_to_slot(value: &Val) -> u64 {
    match value {
        Val::I32(v) => u64::from(*v as u32),
        Val::I64(v) => *v as u64,
        Val::F32(v) => u64::from(v.to_bits()),
        Val::F64(v) => v.to_bits(),
        _ => 0,
    }
}

/// A slot as a value of type `ty`.
pub(crate) fn slot_to_val(ty: ValType, slot: u64) -> Val {
    match ty {
        ValType::I64 => Val::I64(slot as i64),
        ValType::F32 => Val::F32(wasmi::F32::from_bits(slot as u32)),
        ValType::F64 => Val::F64(wasmi::F64::from_bits(slot)),
        ValType::I32 | ValType::Other => Val::I32(slot as u32 as i32),
    }
}
