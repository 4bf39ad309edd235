//! WAMR behind `runtime-api`: linking, calls in both directions, memory, limits, interrupts, and
//! what WAMR's process-wide registry and exec envs make engine-specific (several host tables,
//! threads, start functions).

use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime_api::{
    Caller, CompiledModule, Error, HostFunction, RuntimeConfig, Signature, Trap, TrapKind, ValType,
    WasmRuntime,
};
use runtime_contract::fixture::{self, FixtureState};
use runtime_wamr::{WamrOptions, WamrRuntime};

const I32: ValType = ValType::I32;
const I64: ValType = ValType::I64;

/// Calls the guest's `trap` export (kept in [`FixtureState::callee`]), ignores its failure, and
/// returns 5.
fn survive_guest_trap(caller: &mut dyn Caller<FixtureState>, args: &mut [u64]) -> Result<(), Trap> {
    let trap = caller
        .state()
        .callee
        .ok_or_else(|| Trap::host("no trap function"))?;
    let error = caller.call(trap, &[], &mut []).unwrap_err();
    caller
        .state()
        .seen
        .push(u64::from(error.kind == TrapKind::Wasm));
    args[0] = 5;
    Ok(())
}

fn default_runtime() -> WamrRuntime {
    WamrRuntime::new(RuntimeConfig::default()).unwrap()
}

#[test]
fn calls_cross_in_slots_and_host_functions_see_grown_memory() {
    runtime_contract::calls_cross_in_slots_and_host_functions_see_grown_memory(
        &WamrRuntime::new(RuntimeConfig::default()).unwrap(),
    );
}

#[test]
fn i64_arguments_and_results_pass_through_guest_calls() {
    let mut instance = fixture::SHARED.instance(&default_runtime());
    let add = instance.function("add64").unwrap();
    let mut result = [0];
    instance
        .call(add, &[0x1_0000_0001, u64::MAX - 1], &mut result)
        .unwrap();
    assert_eq!(result, [0xffff_ffff], "wrapping i64 addition");
}

#[test]
fn calls_with_the_wrong_arity_are_refused() {
    let mut instance = fixture::SHARED.instance(&default_runtime());
    let f = instance.function("call_record").unwrap();
    let error = instance.call(f, &[], &mut [0]).unwrap_err();
    assert_eq!(error.kind, TrapKind::BadCall);
}

#[test]
fn traps_and_exits_are_reported_and_the_instance_stays_usable() {
    runtime_contract::traps_have_canonical_codes_and_leave_the_instance_usable(
        &WamrRuntime::new(RuntimeConfig::default()).unwrap(),
        &[],
    );
}

#[test]
fn a_host_function_may_recover_from_a_trap_in_a_nested_call() {
    let host = [HostFunction {
        module: "env",
        name: "survive",
        signature: Signature::new(&[], &[I32]),
        callback: survive_guest_trap,
    }];
    let wasm = wat::parse_str(
        r#"(module
             (import "env" "survive" (func $survive (result i32)))
             (func (export "trap") unreachable)
             (func (export "outer") (result i32) (i32.add (call $survive) (i32.const 1))))"#,
    )
    .unwrap();
    let module: Arc<dyn CompiledModule<FixtureState>> = default_runtime().compile(&wasm).unwrap();
    let mut instance = module
        .link(&host)
        .unwrap()
        .instantiate(FixtureState::default())
        .unwrap();
    instance.state().callee = instance.function("trap");
    let outer = instance.function("outer").unwrap();
    let mut result = [0];
    instance.call(outer, &[], &mut result).unwrap();
    assert_eq!(result, [6], "the guest ran on after the host recovered");
    assert_eq!(instance.state().seen, [1]);
}

#[test]
fn a_panicking_host_function_fails_the_call_not_the_process() {
    let wasm = wat::parse_str(
        r#"(module (import "env" "panics" (func $panics)) (func (export "f") (call $panics)))"#,
    )
    .unwrap();
    let module: Arc<dyn CompiledModule<FixtureState>> = default_runtime().compile(&wasm).unwrap();
    let mut instance = module
        .link(&[fixture::PANICS])
        .unwrap()
        .instantiate(FixtureState::default())
        .unwrap();
    let f = instance.function("f").unwrap();
    let error = instance.call(f, &[], &mut []).unwrap_err();
    assert_eq!(error.kind, TrapKind::Host);
    assert!(error.message.contains("panicked"), "{error}");
}

#[test]
fn unknown_imports_and_mismatched_signatures_are_link_errors() {
    runtime_contract::bad_modules_and_imports_fail_with_errors_that_say_why(
        &WamrRuntime::new(RuntimeConfig::default()).unwrap(),
    );
}

#[test]
fn imports_and_exports_are_listed_with_their_types() {
    runtime_contract::imports_and_exports_are_listed_with_their_types(
        &WamrRuntime::new(RuntimeConfig::default()).unwrap(),
    );
}

#[test]
fn the_memory_cap_makes_memory_grow_fail() {
    runtime_contract::the_memory_cap_makes_memory_grow_fail(|config| {
        WamrRuntime::new(config).unwrap()
    });
}

#[test]
fn a_module_whose_initial_memory_exceeds_the_cap_does_not_instantiate() {
    let runtime = WamrRuntime::new(RuntimeConfig {
        max_memory_bytes: Some(65536),
        ..Default::default()
    })
    .unwrap();
    // The cap applies to the module's memory however it is exported, if at all.
    for text in [
        r#"(module (memory (export "memory") 3))"#,
        r#"(module (memory (export "heap") 3))"#,
        r#"(module (memory 3))"#,
    ] {
        let module: Arc<dyn CompiledModule<FixtureState>> =
            runtime.compile(&wat::parse_str(text).unwrap()).unwrap();
        let result = module
            .link(&[])
            .unwrap()
            .instantiate(FixtureState::default());
        assert!(
            matches!(&result, Err(Error::Instantiation(m)) if m.contains("exceeds memory limits")),
            "{text}: {:?}",
            result.err()
        );
    }
    let fits = wat::parse_str(r#"(module (memory 1))"#).unwrap();
    let module: Arc<dyn CompiledModule<FixtureState>> = runtime.compile(&fits).unwrap();
    assert!(module
        .link(&[])
        .unwrap()
        .instantiate(FixtureState::default())
        .is_ok());
    let below_a_page = WamrRuntime::new(RuntimeConfig {
        max_memory_bytes: Some(1000),
        ..Default::default()
    });
    assert!(matches!(below_a_page, Err(Error::Config(_))));
}

#[test]
fn a_call_deadline_stops_a_spinning_guest() {
    let runtime = WamrRuntime::new(RuntimeConfig {
        call_deadline: Some(Duration::from_millis(30)),
        ..Default::default()
    })
    .unwrap();
    let mut instance = fixture::SHARED.instance(&runtime);
    let spin = instance.function("spin").unwrap();
    let started = Instant::now();
    assert_eq!(
        instance.call(spin, &[], &mut []).unwrap_err().kind,
        TrapKind::DeadlineExceeded
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The next call gets a fresh deadline.
    let record = instance.function("call_record").unwrap();
    instance.call(record, &[1], &mut [0]).unwrap();
    assert_eq!(
        instance.call(spin, &[], &mut []).unwrap_err().kind,
        TrapKind::DeadlineExceeded,
        "and is stopped again"
    );
}

/// A module WAMR would read but wasmparser (which pwhost reads it with first) would not, here a
/// custom section named with 100,001 bytes, is refused: loaded as it is, its spinning start
/// function would run inside WAMR's instantiation, out of every deadline's reach.
#[test]
fn a_module_pwhost_cannot_read_is_refused_not_run_unwatched() {
    let mut wasm = wat::parse_str(r#"(module (func $s (loop (br 0))) (start $s))"#).unwrap();
    let name = vec![b'a'; 100_001];
    // Custom section 0: the name's length (LEB128), the name.
    let mut payload = vec![0xa1, 0x8d, 0x06];
    payload.extend_from_slice(&name);
    wasm.push(0);
    wasm.extend_from_slice(&[0xa4, 0x8d, 0x06]);
    wasm.extend_from_slice(&payload);
    assert_eq!(payload.len(), 100_004);
    let runtime = WamrRuntime::new(RuntimeConfig {
        call_deadline: Some(Duration::from_millis(30)),
        ..Default::default()
    })
    .unwrap();
    let compiled: Result<Arc<dyn CompiledModule<FixtureState>>, _> = runtime.compile(&wasm);
    let Err(runtime_api::Error::InvalidModule(why)) = compiled else {
        panic!("refused");
    };
    assert!(why.contains("string size out of bounds"), "{why}");
}

#[test]
fn a_deadline_reaches_a_guest_spinning_inside_a_nested_call() {
    fn call_spin(caller: &mut dyn Caller<FixtureState>, _args: &mut [u64]) -> Result<(), Trap> {
        let spin = caller.state().callee.ok_or_else(|| Trap::host("none"))?;
        // Ignoring the trap must not let the guest escape its deadline.
        let _ = caller.call(spin, &[], &mut []);
        Ok(())
    }
    let host = [HostFunction {
        module: "env",
        name: "call_spin",
        signature: Signature::new(&[], &[]),
        callback: call_spin,
    }];
    let wasm = wat::parse_str(
        r#"(module
             (import "env" "call_spin" (func $call_spin))
             (func (export "spin") (loop $forever (br $forever)))
             (func (export "outer") (call $call_spin) (loop $forever (br $forever))))"#,
    )
    .unwrap();
    let runtime = WamrRuntime::new(RuntimeConfig {
        call_deadline: Some(Duration::from_millis(30)),
        ..Default::default()
    })
    .unwrap();
    let module: Arc<dyn CompiledModule<FixtureState>> = runtime.compile(&wasm).unwrap();
    let mut instance = module
        .link(&host)
        .unwrap()
        .instantiate(FixtureState::default())
        .unwrap();
    instance.state().callee = instance.function("spin");
    let outer = instance.function("outer").unwrap();
    assert_eq!(
        instance.call(outer, &[], &mut []).unwrap_err().kind,
        TrapKind::DeadlineExceeded
    );
}

#[test]
fn an_interrupt_from_another_thread_stops_a_call_and_the_instance_stays_usable() {
    let runtime = WamrRuntime::new(RuntimeConfig {
        interruptible: true,
        ..Default::default()
    })
    .unwrap();
    assert!(WasmRuntime::<FixtureState>::capabilities(&runtime).interrupt);
    let mut instance = fixture::SHARED.instance(&runtime);
    let handle = instance.interrupt_handle().expect("WAMR can interrupt");
    let spin = instance.function("spin").unwrap();
    let interrupter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        handle.interrupt();
        handle
    });
    assert_eq!(
        instance.call(spin, &[], &mut []).unwrap_err().kind,
        TrapKind::Interrupted
    );
    let handle = interrupter.join().unwrap();
    let record = instance.function("call_record").unwrap();
    instance.call(record, &[1], &mut [0]).unwrap();
    // An interrupt between calls stops the next one.
    handle.interrupt();
    assert_eq!(
        instance.call(record, &[1], &mut [0]).unwrap_err().kind,
        TrapKind::Interrupted
    );
    instance.call(record, &[1], &mut [0]).unwrap();
    // A handle that outlives its instance does nothing.
    drop(instance);
    handle.interrupt();
}

#[test]
fn an_interrupt_that_comes_after_a_deadline_stopped_the_call_does_not_stop_the_next_one() {
    /// Outlasts the deadline (the watchdog stops the call meanwhile), then interrupts the call
    /// that is already stopped.
    fn sleep_then_interrupt(
        caller: &mut dyn Caller<FixtureState>,
        _args: &mut [u64],
    ) -> Result<(), Trap> {
        std::thread::sleep(Duration::from_millis(300));
        let handle = caller.state().interrupt.clone();
        handle.ok_or_else(|| Trap::host("no handle"))?.interrupt();
        Ok(())
    }
    let host = [HostFunction {
        module: "env",
        name: "sleep_then_interrupt",
        signature: Signature::new(&[], &[]),
        callback: sleep_then_interrupt,
    }];
    let wasm = wat::parse_str(
        r#"(module
             (import "env" "sleep_then_interrupt" (func $late))
             (func (export "late") (call $late))
             (func (export "quick")))"#,
    )
    .unwrap();
    let runtime = WamrRuntime::new(RuntimeConfig {
        call_deadline: Some(Duration::from_millis(30)),
        interruptible: true,
        ..Default::default()
    })
    .unwrap();
    let module: Arc<dyn CompiledModule<FixtureState>> = runtime.compile(&wasm).unwrap();
    let mut instance = module
        .link(&host)
        .unwrap()
        .instantiate(FixtureState::default())
        .unwrap();
    instance.state().interrupt = instance.interrupt_handle();
    let late = instance.function("late").unwrap();
    assert_eq!(
        instance.call(late, &[], &mut []).unwrap_err().kind,
        TrapKind::DeadlineExceeded
    );
    let quick = instance.function("quick").unwrap();
    instance
        .call(quick, &[], &mut [])
        .expect("the late interrupt was for the call that ended");
}

#[test]
fn instances_without_a_deadline_or_interrupts_have_no_handle() {
    let instance = fixture::SHARED.instance(&default_runtime());
    assert!(instance.interrupt_handle().is_none());
    let caps = WasmRuntime::<FixtureState>::capabilities(&default_runtime());
    assert!(caps.memory_limit && caps.sandboxed && !caps.interrupt && !caps.call_deadline);
    assert!(!caps.precompiled_modules);
}

#[test]
fn the_start_function_runs_at_instantiation_under_the_deadline() {
    fn started(caller: &mut dyn Caller<FixtureState>, args: &mut [u64]) -> Result<(), Trap> {
        caller.state().seen.push(args[0]);
        Ok(())
    }
    let host = [HostFunction {
        module: "env",
        name: "started",
        signature: Signature::new(&[I32], &[]),
        callback: started,
    }];
    let wasm = wat::parse_str(
        r#"(module
             (import "env" "started" (func $started (param i32)))
             (func $start (call $started (i32.const 42)))
             (start $start)
             (func (export "__wasm_call_ctors") (call $started (i32.const 7))))"#,
    )
    .unwrap();
    let runtime = WamrRuntime::new(RuntimeConfig {
        call_deadline: Some(Duration::from_millis(30)),
        ..Default::default()
    })
    .unwrap();
    let module: Arc<dyn CompiledModule<FixtureState>> = runtime.compile(&wasm).unwrap();
    // The start function is not listed; the constructors keep their name.
    let names: Vec<&str> = module.exports().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["__wasm_call_ctors"]);
    let mut instance = module
        .link(&host)
        .unwrap()
        .instantiate(FixtureState::default())
        .unwrap();
    assert_eq!(
        instance.state().seen,
        [42],
        "the start function ran once, the constructors did not run by themselves"
    );
    let ctors = instance.function("__wasm_call_ctors").unwrap();
    instance.call(ctors, &[], &mut []).unwrap();
    assert_eq!(instance.state().seen, [42, 7]);

    let spinning =
        wat::parse_str(r#"(module (func $start (loop $forever (br $forever))) (start $start))"#)
            .unwrap();
    let module: Arc<dyn CompiledModule<FixtureState>> = runtime.compile(&spinning).unwrap();
    let error = module
        .link(&[])
        .unwrap()
        .instantiate(FixtureState::default());
    assert!(
        matches!(&error, Err(Error::Instantiation(m)) if m.contains("deadline")),
        "{:?}",
        error.err()
    );
}

/// A second host table with the same import names but other behaviour and another state type.
mod other_host {
    use super::*;

    #[derive(Default)]
    pub struct OtherState {
        pub calls: u32,
    }

    fn record(caller: &mut dyn Caller<OtherState>, args: &mut [u64]) -> Result<(), Trap> {
        caller.state().calls += 1;
        args[0] = 1000;
        Ok(())
    }

    fn nothing(_caller: &mut dyn Caller<OtherState>, args: &mut [u64]) -> Result<(), Trap> {
        args[0] = 0;
        Ok(())
    }

    pub static HOST: &[HostFunction<OtherState>] = &[
        HostFunction {
            module: "env",
            name: "record",
            signature: Signature::new(&[I32, I64], &[I32]),
            callback: record,
        },
        HostFunction {
            module: "env",
            name: "allocate_and_write",
            signature: Signature::new(&[], &[I32]),
            callback: nothing,
        },
        HostFunction {
            module: "env",
            name: "exit",
            signature: Signature::new(&[I32], &[]),
            callback: |_, _| Ok(()),
        },
    ];
}

#[test]
fn modules_linked_against_different_host_tables_each_call_their_own() {
    let runtime = default_runtime();
    let wasm = wat::parse_str(fixture::SHARED.module()).unwrap();
    let mut first = fixture::SHARED.instance(&runtime);
    let module: Arc<dyn CompiledModule<other_host::OtherState>> = runtime.compile(&wasm).unwrap();
    let mut second = module
        .link(other_host::HOST)
        .unwrap()
        .instantiate(other_host::OtherState::default())
        .unwrap();
    // The same compiled module, linked twice.
    let same: Arc<dyn CompiledModule<FixtureState>> = runtime.compile(&wasm).unwrap();
    let linked_twice = [
        same.link(fixture::HOST).unwrap(),
        same.link(fixture::HOST).unwrap(),
    ];
    let mut third = linked_twice[1]
        .instantiate(FixtureState::default())
        .unwrap();
    for _ in 0..3 {
        let f = first.function("call_record").unwrap();
        let mut result = [0];
        first.call(f, &[1], &mut result).unwrap();
        assert_eq!(result, [7]);
        let f = second.function("call_record").unwrap();
        second.call(f, &[1], &mut result).unwrap();
        assert_eq!(result, [1000]);
        let f = third.function("call_record").unwrap();
        third.call(f, &[2], &mut result).unwrap();
        assert_eq!(result, [7]);
    }
    assert_eq!(first.state().seen.len(), 6);
    assert_eq!(second.state().calls, 3);
    assert_eq!(third.state().seen[0], 2);
}

#[test]
fn one_linked_module_instantiates_and_runs_on_many_threads() {
    let runtime = WamrRuntime::with_options(
        RuntimeConfig {
            call_deadline: Some(Duration::from_secs(10)),
            ..Default::default()
        },
        WamrOptions {
            stack_size: 64 * 1024,
        },
    )
    .unwrap();
    let linked = fixture::SHARED.link(&runtime);
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let linked = linked.clone();
            std::thread::spawn(move || {
                let mut sum = 0;
                for round in 0..50 {
                    let mut instance = linked.instantiate(FixtureState::default()).unwrap();
                    instance.state().allocator = instance.function("allocate");
                    let record = instance.function("call_record").unwrap();
                    instance.call(record, &[i], &mut [0]).unwrap();
                    let allocate = instance.function("call_allocate").unwrap();
                    let mut pointer = [0];
                    instance.call(allocate, &[], &mut pointer).unwrap();
                    assert_eq!(pointer[0], 65536, "round {round}");
                    sum += instance.state().seen[0];
                }
                sum
            })
        })
        .collect();
    let sums: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(sums, vec![0, 50, 100, 150]);
}

#[test]
fn an_instance_moves_between_threads() {
    let mut instance = fixture::SHARED.instance(&default_runtime());
    for i in 0..3 {
        instance = std::thread::spawn(move || {
            let record = instance.function("call_record").unwrap();
            instance.call(record, &[i], &mut [0]).unwrap();
            instance
        })
        .join()
        .unwrap();
    }
    assert_eq!(
        instance.state().seen,
        [0, u64::MAX, 1, u64::MAX, 2, u64::MAX]
    );
}

#[test]
fn the_contract_against_hostile_guests_holds() {
    let runtime = WamrRuntime::new(RuntimeConfig::default()).unwrap();
    runtime_contract::handles_of_another_instance_are_refused(&runtime);
    runtime_contract::tables_cannot_grow_without_bound(&runtime);
    runtime_contract::tables_hold_at_most_the_table_entry_limit_in_all(&runtime);
    runtime_contract::guest_calls_from_host_functions_nest_at_most_eight_levels(&runtime);
    runtime_contract::a_panic_in_a_nested_call_leaves_the_nesting_count_as_it_was(&runtime);
}
