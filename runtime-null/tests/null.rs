//! The null runtime runs native functions as a module: host calls reach the running instance,
//! re-enter it, and report failures without unwinding native code.

use std::sync::Arc;

use runtime_api::{
    Caller, Error, Export, ExternKind, FunctionType, HostFunction, Import, Signature, Trap,
    TrapKind, ValType, WasmRuntime,
};
use runtime_null::{call_host, with_state, NativeInstance, NativeModule, NullRuntime};

const I32: ValType = ValType::I32;

fn function(params: usize, results: usize) -> ExternKind {
    ExternKind::Function(FunctionType {
        params: vec![I32; params],
        results: vec![I32; results],
    })
}

/// Exports `run(x) -> i32`, which calls host import 0 (`env.add_state`) with `x` and returns its
/// result, `double(x) -> i32`, `call_missing() -> i32` and the typed host calls of [`Typed`];
/// and `reach_directly(_) -> i32`, which calls import 2; imports `env.add_state`, `env.missing`
/// and `env.reach_directly`.
struct TestModule {
    imports: Vec<Import>,
    exports: Vec<Export>,
}

impl TestModule {
    fn new() -> Arc<Self> {
        Arc::new(TestModule {
            imports: ["add_state", "missing", "reach_directly"]
                .into_iter()
                .map(|name| Import {
                    module: "env".into(),
                    name: name.into(),
                    kind: function(1, 1),
                })
                .collect(),
            exports: vec![
                Export {
                    name: "run".into(),
                    kind: function(1, 1),
                },
                Export {
                    name: "double".into(),
                    kind: function(1, 1),
                },
                Export {
                    name: "call_missing".into(),
                    kind: function(0, 1),
                },
                Export {
                    name: "typed".into(),
                    kind: function(1, 1),
                },
                Export {
                    name: "reach_directly".into(),
                    kind: function(1, 1),
                },
            ],
        })
    }
}

impl NativeModule for TestModule {
    fn imports(&self) -> &[Import] {
        &self.imports
    }

    fn exports(&self) -> &[Export] {
        &self.exports
    }

    fn instantiate(&self) -> Result<Box<dyn NativeInstance>, Error> {
        Ok(Box::new(TestInstance))
    }
}

struct TestInstance;

impl NativeInstance for TestInstance {
    fn call(&self, index: u32, args: &[u64], results: &mut [u64]) -> Result<(), Trap> {
        match index {
            0 => {
                let mut slots = [args[0]];
                results[0] = match call_host(0, &mut slots) {
                    Ok(()) => slots[0],
                    Err(_) => u64::from(u32::MAX),
                };
            }
            1 => results[0] = args[0] * 2,
            2 => {
                let mut slots = [0];
                results[0] = u64::from(call_host(1, &mut slots).is_err());
            }
            3 => results[0] = Typed::from(args[0]).run(),
            _ => {
                let mut slots = [0];
                results[0] = match call_host(2, &mut slots) {
                    Ok(()) => slots[0],
                    Err(_) => u64::from(u32::MAX),
                };
            }
        }
        Ok(())
    }
}

/// What export `typed(what)` does with [`with_state`]; it returns 1 for a failure it was meant to
/// meet (0 if the call succeeded when it should not have), or the state it read.
#[derive(Clone, Copy)]
enum Typed {
    /// Adds 1 to the state and returns the new state.
    Increment,
    /// Asks for the state as a type it is not.
    WrongType,
    /// Calls `with_state` from within `with_state`.
    Nested,
    /// Calls a host function while the state is lent.
    HostCallWhileLent,
    /// Returns a trap from the typed call, then tries a host call and a typed call.
    Trap,
    /// Panics in the typed call (the host's code): returns 1 if the panic came back as the
    /// call's failure.
    Panic,
}

impl From<u64> for Typed {
    fn from(what: u64) -> Self {
        [
            Typed::Increment,
            Typed::WrongType,
            Typed::Nested,
            Typed::HostCallWhileLent,
            Typed::Trap,
            Typed::Panic,
        ][what as usize]
    }
}

impl Typed {
    fn run(self) -> u64 {
        let failed = |failed: bool| u64::from(failed);
        match self {
            Typed::Increment => with_state(|state: &mut u64| {
                *state += 1;
                Ok(*state)
            })
            .unwrap_or(u64::MAX),
            Typed::WrongType => failed(with_state(|_: &mut u32| Ok(())).is_err()),
            Typed::Nested => {
                let inner = with_state(|_: &mut u64| Ok(with_state(|_: &mut u64| Ok(()))))
                    .expect("the outer typed call runs");
                failed(inner.is_err())
            }
            Typed::HostCallWhileLent => {
                let host_call = with_state(|_: &mut u64| Ok(call_host(0, &mut [1])))
                    .expect("the typed call runs");
                failed(host_call.is_err())
            }
            Typed::Trap => {
                let trap = with_state(|_: &mut u64| -> Result<(), Trap> {
                    Err(Trap::host("typed call trapped"))
                });
                assert_eq!(trap, Err(Trap::host("typed call trapped")));
                let after = (call_host(0, &mut [1]), with_state(|_: &mut u64| Ok(())));
                failed(after.0.is_err() && after.1.is_err())
            }
            Typed::Panic => {
                let panicked = with_state(|_: &mut u64| -> Result<(), Trap> {
                    panic!("the host's typed code panicked")
                });
                failed(panicked.is_err())
            }
        }
    }
}

/// `add_state(x)`: adds `double(x)` (a re-entrant call into the instance) to the state and
/// returns the new state; traps when `x` is 0, panics when it is 7.
fn add_state(caller: &mut dyn Caller<u64>, args: &mut [u64]) -> Result<(), Trap> {
    if args[0] == 0 {
        return Err(Trap::host("zero is not allowed"));
    }
    if args[0] == 7 {
        panic!("seven is unlucky");
    }
    let double = runtime_api::GuestFunction::new(
        1,
        &FunctionType {
            params: vec![I32],
            results: vec![I32],
        },
    );
    let mut doubled = [0];
    caller.call(double, &[args[0]], &mut doubled)?;
    *caller.state() += doubled[0];
    args[0] = *caller.state();
    Ok(())
}

/// `reach_directly(_)`: tries to reach the state past its caller, with `with_state` and with a
/// host call of its own; returns 1 if both were refused.
fn reach_directly(_: &mut dyn Caller<u64>, args: &mut [u64]) -> Result<(), Trap> {
    let typed = with_state(|_: &mut u64| Ok(())).is_err();
    let host_call = call_host(0, &mut [1]).is_err();
    args[0] = u64::from(typed && host_call);
    Ok(())
}

fn host() -> Vec<HostFunction<u64>> {
    vec![
        HostFunction {
            module: "env",
            name: "add_state",
            signature: Signature::new(&[I32], &[I32]),
            callback: add_state,
        },
        HostFunction {
            module: "env",
            name: "reach_directly",
            signature: Signature::new(&[I32], &[I32]),
            callback: reach_directly,
        },
    ]
}

fn instance() -> Box<dyn runtime_api::Instance<u64>> {
    let runtime = NullRuntime::new(Default::default()).unwrap();
    let module = runtime.load::<u64>(TestModule::new());
    module.link(&host()).unwrap().instantiate(10).unwrap()
}

#[test]
fn host_calls_reach_the_running_instance_and_may_reenter_it() {
    let mut instance = instance();
    let run = instance.function("run").unwrap();
    let mut result = [0];
    instance.call(run, &[5], &mut result).unwrap();
    assert_eq!(result[0], 20);
    assert_eq!(*instance.state(), 20);
}

#[test]
fn a_host_trap_ends_the_call_with_that_trap_after_the_native_code_returns() {
    let mut instance = instance();
    let run = instance.function("run").unwrap();
    let error = instance.call(run, &[0], &mut [0]).unwrap_err();
    assert_eq!(error, Trap::host("zero is not allowed"));
    // The instance is still usable for the next call.
    let mut result = [0];
    instance.call(run, &[1], &mut result).unwrap();
    assert_eq!(result[0], 12);
}

/// A host function that panics fails as one that traps: the panic is not unwound through the
/// native code that called it (an SDK library calls through `extern "C"` symbols, where an
/// unwind aborts the process); the native code gets the failure back, and the call ends with
/// the panic as its trap.
#[test]
fn a_panicking_host_function_is_its_trap_not_an_unwind_through_native_code() {
    let mut instance = instance();
    let run = instance.function("run").unwrap();
    let error = instance.call(run, &[7], &mut [0]).unwrap_err();
    assert_eq!(
        error,
        Trap::host("a host function panicked: seven is unlucky"),
        "{error}"
    );
    let mut result = [0];
    instance.call(run, &[1], &mut result).unwrap();
    assert_eq!(result[0], 12);
}

#[test]
fn an_import_the_host_lacks_fails_when_called_not_when_linked() {
    let mut instance = instance();
    let call_missing = instance.function("call_missing").unwrap();
    let mut failed = [0];
    let error = instance.call(call_missing, &[], &mut failed);
    assert_eq!(failed[0], 1);
    assert!(
        matches!(
            error,
            Err(Trap {
                kind: TrapKind::BadCall,
                ..
            })
        ),
        "{error:?}"
    );
}

#[test]
fn host_calls_outside_a_call_fail() {
    let error = call_host(0, &mut [1]).unwrap_err();
    assert_eq!(error.kind, TrapKind::BadCall);
}

#[test]
fn a_signature_mismatch_is_a_link_error_and_webassembly_is_refused() {
    let runtime = NullRuntime::new(Default::default()).unwrap();
    let module = runtime.load::<u64>(TestModule::new());
    let wrong = vec![HostFunction {
        module: "env",
        name: "add_state",
        signature: Signature::new(&[ValType::I64], &[I32]),
        callback: add_state,
    }];
    assert!(matches!(
        module.link(&wrong).err(),
        Some(Error::ImportSignatureMismatch { .. })
    ));
    let compiled = WasmRuntime::<u64>::compile(&runtime, b"\0asm\x01\0\0\0");
    assert!(matches!(compiled.err(), Some(Error::Unsupported(_))));
    assert!(!WasmRuntime::<u64>::capabilities(&runtime).sandboxed);
}

fn typed(instance: &mut dyn runtime_api::Instance<u64>, what: Typed) -> Result<u64, Trap> {
    let typed = instance.function("typed").unwrap();
    let mut result = [0];
    instance.call(typed, &[what as u64], &mut result)?;
    Ok(result[0])
}

#[test]
fn a_typed_host_call_gets_the_running_instance_s_state() {
    let mut instance = instance();
    assert_eq!(typed(&mut *instance, Typed::Increment), Ok(11));
    assert_eq!(typed(&mut *instance, Typed::Increment), Ok(12));
    assert_eq!(*instance.state(), 12);
}

#[test]
fn a_typed_host_call_for_another_state_type_fails() {
    assert_eq!(typed(&mut *instance(), Typed::WrongType), Ok(1));
}

#[test]
fn the_state_is_lent_once_at_a_time() {
    let mut instance = instance();
    assert_eq!(typed(&mut *instance, Typed::Nested), Ok(1));
    assert_eq!(typed(&mut *instance, Typed::HostCallWhileLent), Ok(1));
    // Lent states come back: the next call reaches it again.
    assert_eq!(typed(&mut *instance, Typed::Increment), Ok(11));
}

#[test]
fn a_host_function_reaches_the_state_only_through_its_caller() {
    let mut instance = instance();
    let reach = instance.function("reach_directly").unwrap();
    let mut refused = [0];
    instance.call(reach, &[0], &mut refused).unwrap();
    assert_eq!(refused[0], 1);
    // Through its caller it may re-enter the instance, which may use the state again.
    let run = instance.function("run").unwrap();
    let mut result = [0];
    instance.call(run, &[5], &mut result).unwrap();
    assert_eq!(result[0], 20);
}

#[test]
fn a_typed_host_call_s_trap_ends_the_call_like_a_host_function_s() {
    let mut instance = instance();
    assert_eq!(
        typed(&mut *instance, Typed::Trap),
        Err(Trap::host("typed call trapped"))
    );
    assert_eq!(typed(&mut *instance, Typed::Increment), Ok(11));
}

/// A panic in the host's code lent to a typed call is that call's trap, as a host function's
/// is: the native code gets the failure back, and the call ends with the panic.
#[test]
fn a_panic_in_a_typed_host_call_is_its_trap() {
    let mut instance = instance();
    assert_eq!(
        typed(&mut *instance, Typed::Panic),
        Err(Trap::host(
            "a host function panicked: the host's typed code panicked"
        ))
    );
    assert_eq!(typed(&mut *instance, Typed::Increment), Ok(11));
}

#[test]
fn typed_host_calls_outside_a_call_fail() {
    let error = with_state(|_: &mut u64| Ok(())).unwrap_err();
    assert_eq!(error.kind, TrapKind::BadCall);
}
