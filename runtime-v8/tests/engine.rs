//! V8 behind `runtime-api`: linking, calls in both directions, memory, limits, interrupts, and
//! instances moving between threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime_api::{
    Caller, CompiledModule, Error, HostFunction, Instance, RuntimeConfig, Signature, Trap,
    TrapKind, ValType, WasmRuntime, WasmTrapCode,
};
use runtime_contract::fixture::{self, compile, Fixture, FixtureState};
use runtime_v8::V8Runtime;

/// Returns its i64 argument plus one, as an i64.
fn increment(_caller: &mut dyn Caller<FixtureState>, args: &mut [u64]) -> Result<(), Trap> {
    args[0] = args[0].wrapping_add(1);
    Ok(())
}

/// The shared fixture with what only these tests call: i64 values in both directions, a
/// panicking host function, a guest spinning inside a host function, and deep recursion.
const FIXTURE: Fixture = Fixture {
    imports: r#"
      (import "env" "increment" (func $increment (param i64) (result i64)))
      (import "env" "panics" (func $panics))
      (import "env" "call_spin" (func $call_spin))"#,
    functions: r#"
      (func (export "increment_twice") (param $x i64) (result i64)
        (call $increment (call $increment (local.get $x))))
      (func $recurse (export "recurse") (call $recurse))
      (func (export "call_panics") (call $panics))
      (func (export "call_call_spin") (call $call_spin))"#,
    host: &[
        HostFunction {
            module: "env",
            name: "increment",
            signature: Signature::new(&[ValType::I64], &[ValType::I64]),
            callback: increment,
        },
        fixture::PANICS,
        fixture::CALL_SPIN,
    ],
};

fn default_runtime() -> V8Runtime {
    V8Runtime::new(RuntimeConfig::default()).unwrap()
}

#[test]
fn calls_cross_in_slots_and_host_functions_see_grown_memory() {
    runtime_contract::calls_cross_in_slots_and_host_functions_see_grown_memory(
        &V8Runtime::new(RuntimeConfig::default()).unwrap(),
    );
}

#[test]
fn i64_values_cross_in_both_directions() {
    let mut instance = FIXTURE.instance(&default_runtime());
    let f = instance.function("increment_twice").unwrap();
    let mut result = [0];
    instance.call(f, &[u64::MAX - 5], &mut result).unwrap();
    assert_eq!(result, [u64::MAX - 3]);
    instance.call(f, &[u64::MAX], &mut result).unwrap();
    assert_eq!(result, [1], "i64 arithmetic wraps like the guest's");
}

#[test]
fn calls_with_the_wrong_arity_or_a_foreign_handle_are_refused() {
    let runtime = default_runtime();
    let mut instance = FIXTURE.instance(&runtime);
    let f = instance.function("call_record").unwrap();
    let error = instance.call(f, &[], &mut [0]).unwrap_err();
    assert_eq!(error.kind, TrapKind::BadCall);
    let mut other = FIXTURE.instance(&runtime);
    let foreign = other.function("trap").unwrap();
    assert_eq!(
        instance.call(foreign, &[], &mut []).unwrap_err().kind,
        TrapKind::BadCall
    );
    assert!(instance.function("no_such_export").is_none());
    assert!(
        instance.function("memory").is_none(),
        "not a function export"
    );
}

#[test]
fn traps_and_exits_are_reported_and_the_instance_stays_usable() {
    runtime_contract::traps_have_canonical_codes_and_leave_the_instance_usable(
        &V8Runtime::new(RuntimeConfig::default()).unwrap(),
        &[
            WasmTrapCode::BadConversionToInteger,
            WasmTrapCode::IndirectCallToNull,
            WasmTrapCode::BadSignature,
        ],
    );
}

#[test]
fn a_panicking_host_function_is_a_trap() {
    let mut instance = FIXTURE.instance(&default_runtime());
    let f = instance.function("call_panics").unwrap();
    let error = instance.call(f, &[], &mut []).unwrap_err();
    assert_eq!(error.kind, TrapKind::Host);
    assert!(error.message.contains("panicked"), "{error}");
}

#[test]
fn unknown_imports_and_mismatched_signatures_are_link_errors() {
    runtime_contract::bad_modules_and_imports_fail_with_errors_that_say_why(
        &V8Runtime::new(RuntimeConfig::default()).unwrap(),
    );
}

#[test]
fn imports_and_exports_are_listed_with_their_types() {
    runtime_contract::imports_and_exports_are_listed_with_their_types(
        &V8Runtime::new(RuntimeConfig::default()).unwrap(),
    );
}

#[test]
fn a_start_function_trap_fails_instantiation() {
    let runtime = default_runtime();
    let module = compile(
        &runtime,
        r#"(module (func $start unreachable) (start $start))"#,
    );
    let linked = module.link(fixture::HOST).unwrap();
    match linked.instantiate(FixtureState::default()) {
        Err(Error::Instantiation(message)) => assert!(message.contains("unreachable"), "{message}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("instantiation should fail"),
    }
}

#[test]
fn the_memory_cap_makes_memory_grow_fail() {
    runtime_contract::the_memory_cap_makes_memory_grow_fail(|config| {
        V8Runtime::new(config).unwrap()
    });
    // The exported memory is what was capped: the module still lists it.
    let runtime = V8Runtime::new(RuntimeConfig {
        max_memory_bytes: Some(2 * 65536),
        ..Default::default()
    })
    .unwrap();
    let module = FIXTURE.compile(&runtime);
    assert!(module.exports().iter().any(|e| e.name == "memory"));
}

#[test]
fn a_memory_larger_than_the_cap_at_start_fails_instantiation() {
    let runtime = V8Runtime::new(RuntimeConfig {
        max_memory_bytes: Some(65536),
        ..Default::default()
    })
    .unwrap();
    let module = compile(&runtime, r#"(module (memory 2))"#);
    let result = module
        .link(fixture::HOST)
        .unwrap()
        .instantiate(FixtureState::default());
    assert!(matches!(result, Err(Error::Instantiation(_))));
}

#[test]
fn huge_memory_growth_without_a_cap_fails_in_the_guest() {
    let mut instance = FIXTURE.instance(&default_runtime());
    let grow = instance.function("grow").unwrap();
    let mut result = [0];
    // 65535 more pages would make 4 GiB; the process has no such memory to commit, or V8
    // refuses; either way the guest sees -1 or success, and the host survives.
    instance.call(grow, &[65535], &mut result).unwrap();
    assert!(result[0] as u32 == u32::MAX || result[0] == 1, "{result:?}");
    instance.call(grow, &[70000], &mut result).unwrap();
    assert_eq!(result[0] as u32, u32::MAX, "beyond 4 GiB is refused");
}

#[test]
fn tables_cannot_outgrow_their_budget() {
    let runtime = default_runtime();
    // Ten tables that each ask for V8's per-table maximum: together they would fill 800 MB of the
    // isolate's heap in one loop-free call.
    let mut text = String::from("(module");
    for i in 0..10 {
        text.push_str(&format!(" (table $t{i} 0 funcref)"));
    }
    text.push_str(r#" (func (export "grow") (param $table i32) (param $entries i32) (result i32)"#);
    for i in 0..10 {
        text.push_str(&format!(
            " (if (i32.eq (local.get $table) (i32.const {i})) (then                (return (table.grow $t{i} (ref.null func) (local.get $entries)))))"
        ));
    }
    text.push_str(" (i32.const -2)))");
    let mut instance = compile(&runtime, &text)
        .link(fixture::HOST)
        .unwrap()
        .instantiate(FixtureState::default())
        .unwrap();
    let grow = instance.function("grow").unwrap();
    let mut result = [0];
    for table in 0..10 {
        instance
            .call(grow, &[table, 10_000_000], &mut result)
            .unwrap();
        assert_eq!(
            result[0] as u32,
            u32::MAX,
            "table {table} cannot take it all"
        );
        instance.call(grow, &[table, 1000], &mut result).unwrap();
        assert_eq!(result[0], 0, "table {table} grows within its share");
    }
    let too_large: Result<Arc<dyn CompiledModule<FixtureState>>, _> = runtime.compile(
        &wat::parse_str("(module (table 6000000 funcref) (table 6000000 funcref))").unwrap(),
    );
    assert!(matches!(too_large, Err(Error::InvalidModule(_))));
}

/// A runtime whose calls may run `deadline`.
fn with_deadline(deadline: Duration) -> V8Runtime {
    V8Runtime::new(RuntimeConfig {
        call_deadline: Some(deadline),
        ..Default::default()
    })
    .unwrap()
}

/// Calls `instance`'s `spin` (a loop without end): its deadline stops it, within 5 s.
fn assert_spin_is_stopped(instance: &mut dyn Instance<FixtureState>) {
    let spin = instance.function("spin").unwrap();
    let started = Instant::now();
    assert_eq!(
        instance.call(spin, &[], &mut []).unwrap_err().kind,
        TrapKind::DeadlineExceeded
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn a_call_deadline_stops_a_spinning_guest() {
    let mut instance = FIXTURE.instance(&with_deadline(Duration::from_millis(30)));
    assert_spin_is_stopped(&mut *instance);
    // The next call gets a fresh deadline.
    let record = instance.function("call_record").unwrap();
    instance.call(record, &[1], &mut [0]).unwrap();
}

/// Deadlines of very different lengths in one process: an instance with an hour's deadline
/// alive does not make a 30 ms deadline wait for the watchdog's long tick.
#[test]
fn a_short_deadline_is_kept_beside_an_instance_with_a_long_one() {
    let _long = FIXTURE.instance(&with_deadline(Duration::from_secs(3600)));
    // Let the watchdog settle on the long instance's tick.
    std::thread::sleep(Duration::from_millis(50));
    let mut instance = FIXTURE.instance(&with_deadline(Duration::from_millis(30)));
    assert_spin_is_stopped(&mut *instance);
}

#[test]
fn a_call_deadline_stops_a_guest_spinning_in_a_nested_call() {
    let runtime = V8Runtime::new(RuntimeConfig {
        call_deadline: Some(Duration::from_millis(30)),
        ..Default::default()
    })
    .unwrap();
    let mut instance = FIXTURE.instance(&runtime);
    // The host function `call_spin` calls the guest function in the callee slot: point it at
    // `spin`.
    let spin = instance.function("spin");
    instance.state().callee = spin;
    let f = instance.function("call_call_spin").unwrap();
    assert_eq!(
        instance.call(f, &[], &mut []).unwrap_err().kind,
        TrapKind::DeadlineExceeded
    );
    let record = instance.function("call_record").unwrap();
    instance.call(record, &[1], &mut [0]).unwrap();
}

#[test]
fn a_call_deadline_stops_a_spinning_start_function() {
    let runtime = V8Runtime::new(RuntimeConfig {
        call_deadline: Some(Duration::from_millis(30)),
        ..Default::default()
    })
    .unwrap();
    let module = compile(
        &runtime,
        r#"(module (func $start (loop $forever (br $forever))) (start $start))"#,
    );
    match module
        .link(fixture::HOST)
        .unwrap()
        .instantiate(FixtureState::default())
    {
        Err(Error::Instantiation(message)) => {
            assert!(message.contains("deadline"), "{message}")
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("instantiation should fail"),
    }
}

#[test]
fn an_interrupt_stops_a_running_call_from_another_thread() {
    let runtime = V8Runtime::new(RuntimeConfig {
        interruptible: true,
        ..Default::default()
    })
    .unwrap();
    assert!(WasmRuntime::<FixtureState>::capabilities(&runtime).interrupt);
    let mut instance = FIXTURE.instance(&runtime);
    let handle = instance.interrupt_handle().unwrap();
    let spin = instance.function("spin").unwrap();
    let interrupter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        handle.interrupt();
    });
    assert_eq!(
        instance.call(spin, &[], &mut []).unwrap_err().kind,
        TrapKind::Interrupted
    );
    interrupter.join().unwrap();
    let record = instance.function("call_record").unwrap();
    instance.call(record, &[1], &mut [0]).unwrap();
    // An interrupt while no call runs stops the next call, once.
    instance.interrupt_handle().unwrap().interrupt();
    assert_eq!(
        instance.call(record, &[1], &mut [0]).unwrap_err().kind,
        TrapKind::Interrupted
    );
    instance.call(record, &[1], &mut [0]).unwrap();
}

#[test]
fn interrupts_racing_with_short_calls_never_outlive_their_call() {
    let runtime = V8Runtime::new(RuntimeConfig {
        interruptible: true,
        call_deadline: Some(Duration::from_secs(10)),
        ..Default::default()
    })
    .unwrap();
    let mut instance = FIXTURE.instance(&runtime);
    let handle = instance.interrupt_handle().unwrap();
    let record = instance.function("call_record").unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let interrupter = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                handle.interrupt();
                sent += 1;
                std::thread::sleep(Duration::from_micros(u64::from(sent % 7) * 10));
            }
            sent
        })
    };
    let mut interrupted = 0;
    for i in 0..20_000u64 {
        match instance.call(record, &[i], &mut [0]) {
            Ok(()) => {}
            Err(trap) => {
                assert_eq!(trap.kind, TrapKind::Interrupted, "{trap}");
                interrupted += 1;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = interrupter.join().unwrap();
    assert!(
        interrupted > 0 && interrupted <= sent,
        "{interrupted} of {sent}"
    );
    // At most one interrupt is still pending; after it, calls succeed again.
    let _ = instance.call(record, &[0], &mut [0]);
    instance.call(record, &[0], &mut [0]).unwrap();
}

#[test]
fn an_interrupt_landing_as_a_call_starts_stops_that_call() {
    let runtime = V8Runtime::new(RuntimeConfig {
        interruptible: true,
        ..Default::default()
    })
    .unwrap();
    let mut instance = FIXTURE.instance(&runtime);
    let spin = instance.function("spin").unwrap();
    // Each round calls from a new thread, whose V8 thread state is set up as the call takes the
    // isolate's lock, and interrupts it after a delay that sweeps over that moment. However the
    // two meet, the spinning call is stopped (or never starts): it does not spin on.
    for round in 0..300u32 {
        let handle = instance.interrupt_handle().unwrap();
        let start = Arc::new(std::sync::Barrier::new(2));
        let (done, finished) = std::sync::mpsc::channel();
        let caller = {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let result = instance.call(spin, &[], &mut []);
                // The receiver may be gone if the test already failed.
                let _ = done.send(());
                (instance, result)
            })
        };
        start.wait();
        let delay = Duration::from_nanos(u64::from(round % 60) * 500);
        let begun = Instant::now();
        while begun.elapsed() < delay {
            std::hint::spin_loop();
        }
        handle.interrupt();
        if finished.recv_timeout(Duration::from_secs(10)).is_err() {
            panic!("round {round}: the interrupt was lost and the guest spins on");
        }
        let (returned, result) = caller.join().unwrap();
        instance = returned;
        assert_eq!(
            result.unwrap_err().kind,
            TrapKind::Interrupted,
            "round {round}"
        );
    }
    // No stop outlives its call.
    let record = instance.function("call_record").unwrap();
    instance.call(record, &[1], &mut [0]).unwrap();
}

#[test]
fn a_module_with_a_shared_memory_is_refused() {
    // A guest waiting on a shared memory with no timeout would use no CPU time, so its call
    // deadline would never come: such modules are not run at all.
    let runtime = V8Runtime::new(RuntimeConfig {
        call_deadline: Some(Duration::from_millis(30)),
        ..Default::default()
    })
    .unwrap();
    let waits_forever = wat::parse_str(
        r#"(module
             (memory (export "memory") 1 1 shared)
             (func (export "wait") (result i32)
               (memory.atomic.wait32 (i32.const 0) (i32.const 0) (i64.const -1))))"#,
    )
    .unwrap();
    let result: Result<Arc<dyn CompiledModule<FixtureState>>, _> = runtime.compile(&waits_forever);
    match result {
        Err(Error::InvalidModule(message)) => assert!(message.contains("shared"), "{message}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a module with a shared memory compiled"),
    }
    // Atomic instructions are refused as well, shared memory or not.
    let atomics = wat::parse_str(
        r#"(module (memory 1) (func (export "f") (result i32) (i32.atomic.load (i32.const 0))))"#,
    )
    .unwrap();
    let result: Result<Arc<dyn CompiledModule<FixtureState>>, _> = runtime.compile(&atomics);
    assert!(matches!(result, Err(Error::InvalidModule(_))));
}

#[test]
fn a_module_using_exception_handling_is_refused() {
    // A host function's trap unwinds the guest as an exception: a guest that could catch it would
    // run on after the host stopped it (after proc_exit, for one).
    let runtime = default_runtime();
    let swallows_exit = wat::parse_str(
        r#"(module
             (import "env" "exit" (func $exit (param i32)))
             (func (export "exit_and_go_on") (result i32)
               try
                 (call $exit (i32.const 0))
               catch_all
               end
               (i32.const 1)))"#,
    )
    .unwrap();
    let result: Result<Arc<dyn CompiledModule<FixtureState>>, _> = runtime.compile(&swallows_exit);
    match result {
        Err(Error::InvalidModule(message)) => assert!(!message.is_empty()),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a module using exception handling compiled"),
    }
}

#[test]
fn one_linked_module_instantiates_on_many_threads() {
    runtime_contract::one_linked_module_instantiates_on_many_threads(
        &V8Runtime::new(RuntimeConfig::default()).unwrap(),
    );
}

#[test]
fn an_instance_moves_between_threads() {
    let mut instance = FIXTURE.instance(&default_runtime());
    let record = instance.function("call_record").unwrap();
    let recurse = instance.function("recurse").unwrap();
    for round in 0..6u64 {
        instance = std::thread::spawn(move || {
            instance.call(record, &[round], &mut [0]).unwrap();
            // Each thread's stack gets its own limit: overflowing it is a trap, not a crash.
            assert_eq!(
                instance.call(recurse, &[], &mut []).unwrap_err(),
                Trap::wasm(WasmTrapCode::StackOverflow)
            );
            instance
        })
        .join()
        .unwrap();
        instance.call(record, &[round], &mut [0]).unwrap();
    }
    let seen = &instance.state().seen;
    assert_eq!(seen.len(), 24);
    // An instance can also be dropped on another thread than the one that made it.
    std::thread::spawn(move || drop(instance)).join().unwrap();
}

#[test]
fn a_small_thread_stack_overflows_as_a_trap() {
    let runtime = default_runtime();
    let linked = FIXTURE.link(&runtime);
    let result = std::thread::Builder::new()
        .stack_size(512 * 1024)
        .spawn(move || {
            let mut instance = linked.instantiate(FixtureState::default()).unwrap();
            let recurse = instance.function("recurse").unwrap();
            instance.call(recurse, &[], &mut [])
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(result.unwrap_err(), Trap::wasm(WasmTrapCode::StackOverflow));
}

#[test]
fn capabilities_follow_the_configuration() {
    let runtime = V8Runtime::new(RuntimeConfig {
        call_deadline: Some(Duration::from_secs(1)),
        ..Default::default()
    })
    .unwrap();
    let capabilities = WasmRuntime::<FixtureState>::capabilities(&runtime);
    assert!(capabilities.call_deadline && capabilities.memory_limit && capabilities.sandboxed);
    assert!(!capabilities.interrupt && !capabilities.precompiled_modules);
    assert_eq!(WasmRuntime::<FixtureState>::name(&runtime), "v8");
}

#[test]
fn the_contract_against_hostile_guests_holds() {
    let runtime = V8Runtime::new(RuntimeConfig::default()).unwrap();
    runtime_contract::handles_of_another_instance_are_refused(&runtime);
    runtime_contract::tables_cannot_grow_without_bound(&runtime);
    runtime_contract::tables_hold_at_most_the_table_entry_limit_in_all(&runtime);
}
