//! wasmi behind `runtime-api`: linking, calls in both directions, memory, limits, deadlines and
//! interrupts through fuel slices.

use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime_api::{
    Caller, CompiledModule, Error, HostFunction, Instance, RuntimeConfig, Signature, Trap,
    TrapKind, ValType, WasmRuntime,
};
use runtime_contract::fixture::{self, Fixture, FixtureState};
use runtime_wasmi::WasmiRuntime;

/// A shape no Proxy-Wasm or WASI function has, so it goes through wasmi's untyped host functions.
fn add_i64(caller: &mut dyn Caller<FixtureState>, args: &mut [u64]) -> Result<(), Trap> {
    caller.state().seen.extend_from_slice(&args[..3]);
    args[0] = args[0].wrapping_add(args[1]).wrapping_add(args[2]);
    Ok(())
}

/// The shared fixture with what only these tests call: host and guest functions of unusual
/// shapes, guest code spinning where fuel slices must stop it, and recursion through the host.
const FIXTURE: Fixture = Fixture {
    imports: r#"
      (import "env" "add_i64" (func $add_i64 (param i64 i64 i32) (result i64)))
      (import "env" "reenter" (func $reenter (result i32)))"#,
    functions: r#"
      (func (export "reenter") (result i32) (call $reenter))
      ;; An allocator that never returns, for a host function to call.
      (func (export "spinning_allocate") (param $size i32) (result i32)
        (loop $forever (br $forever))
        (i32.const 0))
      (func (export "call_add_i64") (param $a i64) (param $b i64) (param $c i32) (result i64)
        (call $add_i64 (local.get $a) (local.get $b) (local.get $c)))
      (func (export "spin_with_result") (param i32 i32 i32) (result i32)
        (loop $forever (br $forever))
        (i32.const 0))
      (func (export "divide") (param $a i32) (param $b i32) (result i32)
        (i32.div_u (local.get $a) (local.get $b)))
      (func (export "sum8") (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
        (i32.add
          (i32.add (i32.add (local.get 0) (local.get 1)) (i32.add (local.get 2) (local.get 3)))
          (i32.add (i32.add (local.get 4) (local.get 5)) (i32.add (local.get 6) (local.get 7)))))"#,
    host: &[
        HostFunction {
            module: "env",
            name: "add_i64",
            signature: Signature::new(&[ValType::I64, ValType::I64, ValType::I32], &[ValType::I64]),
            callback: add_i64,
        },
        fixture::REENTER,
    ],
};

fn default_runtime() -> WasmiRuntime {
    WasmiRuntime::new(RuntimeConfig::default()).unwrap()
}

fn runtime_with_deadline(deadline: Duration) -> WasmiRuntime {
    WasmiRuntime::new(RuntimeConfig {
        call_deadline: Some(deadline),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn calls_cross_in_slots_and_host_functions_see_grown_memory() {
    runtime_contract::calls_cross_in_slots_and_host_functions_see_grown_memory(
        &WasmiRuntime::new(RuntimeConfig::default()).unwrap(),
    );
}

#[test]
fn unusual_shapes_pass_through_untyped_calls_in_both_directions() {
    let mut instance = FIXTURE.instance(&default_runtime());
    let f = instance.function("call_add_i64").unwrap();
    let mut result = [0];
    instance
        .call(f, &[u64::MAX, 3, 0xffff_ffff], &mut result)
        .unwrap();
    assert_eq!(result, [u64::MAX.wrapping_add(3).wrapping_add(0xffff_ffff)]);
    assert_eq!(instance.state().seen, vec![u64::MAX, 3, 0xffff_ffff]);
}

#[test]
fn typed_guest_calls_pass_all_their_arguments() {
    let mut instance = FIXTURE.instance(&default_runtime());
    let sum8 = instance.function("sum8").unwrap();
    let mut result = [0];
    instance
        .call(sum8, &[1, 2, 3, 4, 5, 6, 7, 0xffff_ffff], &mut result)
        .unwrap();
    assert_eq!(result, [27], "the last argument wraps around as an i32");
}

#[test]
fn calls_with_the_wrong_arity_or_a_foreign_handle_are_refused() {
    let runtime = default_runtime();
    let mut instance = FIXTURE.instance(&runtime);
    let f = instance.function("call_record").unwrap();
    let error = instance.call(f, &[], &mut [0]).unwrap_err();
    assert_eq!(error.kind, TrapKind::BadCall);
    // A handle of another instance, at an index this instance has not given out.
    let mut other = FIXTURE
        .link(&runtime)
        .instantiate(FixtureState::default())
        .unwrap();
    for _ in 0..3 {
        other.function("divide").unwrap();
    }
    let foreign = other.function("divide").unwrap();
    let error = instance.call(foreign, &[1, 1], &mut [0]).unwrap_err();
    assert_eq!(error.kind, TrapKind::BadCall);
    assert!(instance.function("no_such_export").is_none());
    assert!(instance.function("memory").is_none(), "not a function");
}

#[test]
fn traps_and_exits_are_reported_and_the_instance_stays_usable() {
    runtime_contract::traps_have_canonical_codes_and_leave_the_instance_usable(
        &WasmiRuntime::new(RuntimeConfig::default()).unwrap(),
        &[],
    );
}

#[test]
fn unknown_imports_and_mismatched_signatures_are_link_errors() {
    runtime_contract::bad_modules_and_imports_fail_with_errors_that_say_why(
        &WasmiRuntime::new(RuntimeConfig::default()).unwrap(),
    );
}

#[test]
fn malformed_bytes_and_the_text_format_are_invalid_modules() {
    let runtime = default_runtime();
    for bytes in [
        &b"\0asm\x01\0\0\0\xff"[..],
        b"",
        b"this is not a wasm module",
        b"(module)",
    ] {
        let result: Result<Arc<dyn CompiledModule<FixtureState>>, _> = runtime.compile(bytes);
        assert!(
            matches!(result, Err(Error::InvalidModule(_))),
            "{bytes:?} compiled"
        );
    }
}

/// Found by the generator campaign (`fuzz/`, wasm-smith seed 10165): wasmi 2.0.0's
/// translator has no instruction for `i32.store8` whose address and value are the same
/// register and whose offset needs more than 16 bits, and panics (`unreachable!`). The module
/// is valid; pwhost translates every function when it compiles the module, so wasmi's failure
/// refuses the module at load with a clear error instead of panicking in a plugin's callback.
#[test]
fn a_module_wasmi_cannot_translate_is_refused_at_load_without_a_panic() {
    let wasm = wat::parse_str(
        r#"(module
             (memory 1)
             (func (export "store") (param i32)
               (local.tee 0 (i32.load16_s (local.get 0)))
               (local.get 0)
               (i32.store8 offset=1599648856)))"#,
    )
    .expect("valid text");
    let result: Result<Arc<dyn CompiledModule<FixtureState>>, _> = default_runtime().compile(&wasm);
    let Err(Error::InvalidModule(message)) = result else {
        panic!("wasmi compiled a module it cannot translate");
    };
    assert!(message.contains("wasmi"), "{message}");
    // The engine goes on compiling other modules.
    let fine = wat::parse_str(r#"(module (func (export "nothing")))"#).expect("valid text");
    let compiled: Result<Arc<dyn CompiledModule<FixtureState>>, _> =
        default_runtime().compile(&fine);
    assert!(compiled.is_ok());
}

#[test]
fn imports_and_exports_are_listed_with_their_types() {
    runtime_contract::imports_and_exports_are_listed_with_their_types(
        &WasmiRuntime::new(RuntimeConfig::default()).unwrap(),
    );
}

#[test]
fn the_memory_cap_makes_memory_grow_fail() {
    let refused = runtime_contract::the_memory_cap_makes_memory_grow_fail(|config| {
        WasmiRuntime::new(config).unwrap()
    });
    assert_eq!(
        refused,
        Some(true),
        "its resource limiter tells the refusal"
    );
}

#[test]
fn a_module_whose_initial_memory_exceeds_the_cap_does_not_instantiate() {
    let runtime = WasmiRuntime::new(RuntimeConfig {
        max_memory_bytes: Some(65536),
        ..Default::default()
    })
    .unwrap();
    let wasm = wat::parse_str(r#"(module (memory (export "memory") 2))"#).unwrap();
    let module: Arc<dyn CompiledModule<FixtureState>> = runtime.compile(&wasm).unwrap();
    match module
        .link(fixture::HOST)
        .unwrap()
        .instantiate(FixtureState::default())
    {
        Err(Error::Instantiation(message)) => assert_eq!(
            message,
            "memory minimum size of 2 pages exceeds memory limits"
        ),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("instantiated past the memory cap"),
    }
    // A memory that is not exported is refused by wasmi's limiter itself.
    let hidden = wat::parse_str("(module (memory 2))").unwrap();
    let module: Arc<dyn CompiledModule<FixtureState>> = runtime.compile(&hidden).unwrap();
    let result = module
        .link(fixture::HOST)
        .unwrap()
        .instantiate(FixtureState::default());
    assert!(matches!(result, Err(Error::Instantiation(_))));
}

#[test]
fn a_call_deadline_stops_a_spinning_guest() {
    let runtime = runtime_with_deadline(Duration::from_millis(30));
    assert!(WasmRuntime::<FixtureState>::capabilities(&runtime).call_deadline);
    let mut instance = FIXTURE.instance(&runtime);
    let spin = instance.function("spin").unwrap();
    let started = Instant::now();
    assert_eq!(
        instance.call(spin, &[], &mut []).unwrap_err().kind,
        TrapKind::DeadlineExceeded
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(30), "stopped early: {took:?}");
    assert!(took < Duration::from_secs(2), "stopped late: {took:?}");
    // The next call gets a fresh deadline.
    let record = instance.function("call_record").unwrap();
    instance.call(record, &[1], &mut [0]).unwrap();
    let spin_with_result = instance.function("spin_with_result").unwrap();
    assert_eq!(
        instance
            .call(spin_with_result, &[1, 2, 3], &mut [0])
            .unwrap_err()
            .kind,
        TrapKind::DeadlineExceeded
    );
}

#[test]
fn a_call_deadline_stops_a_guest_spinning_inside_a_nested_call() {
    let runtime = runtime_with_deadline(Duration::from_millis(30));
    let mut instance = FIXTURE.instance(&runtime);
    instance.state().allocator = instance.function("spinning_allocate");
    // The host function calls the (now spinning) allocator from inside the guest.
    let call_allocate = instance.function("call_allocate").unwrap();
    assert_eq!(
        instance
            .call(call_allocate, &[], &mut [0])
            .unwrap_err()
            .kind,
        TrapKind::DeadlineExceeded
    );
    let record = instance.function("call_record").unwrap();
    instance.call(record, &[1], &mut [0]).unwrap();
}

#[test]
fn calls_within_the_deadline_run_to_completion() {
    let runtime = runtime_with_deadline(Duration::from_secs(10));
    let mut instance = FIXTURE.instance(&runtime);
    let call_allocate = instance.function("call_allocate").unwrap();
    let mut pointer = [0];
    instance.call(call_allocate, &[], &mut pointer).unwrap();
    assert_eq!(pointer[0], 65536);
    let exit = instance.function("exit_with").unwrap();
    assert_eq!(
        instance.call(exit, &[4], &mut []).unwrap_err(),
        Trap::exit(4)
    );
    let call_add = instance.function("call_add_i64").unwrap();
    let mut sum = [0];
    instance.call(call_add, &[1, 2, 3], &mut sum).unwrap();
    assert_eq!(sum, [6]);
}

#[test]
fn an_interrupt_from_another_thread_stops_a_spinning_guest() {
    let runtime = WasmiRuntime::new(RuntimeConfig {
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
    let started = Instant::now();
    let error = instance.call(spin, &[], &mut []).unwrap_err();
    assert_eq!(error.kind, TrapKind::Interrupted);
    assert!(started.elapsed() < Duration::from_secs(5));
    interrupter.join().unwrap();
    // The interrupt was consumed: the instance works again.
    let record = instance.function("call_record").unwrap();
    instance.call(record, &[1], &mut [0]).unwrap();
}

#[test]
fn an_interrupt_between_calls_stops_the_next_call() {
    let runtime = WasmiRuntime::new(RuntimeConfig {
        interruptible: true,
        ..Default::default()
    })
    .unwrap();
    let mut instance = FIXTURE.instance(&runtime);
    let record = instance.function("call_record").unwrap();
    instance.interrupt_handle().unwrap().interrupt();
    assert_eq!(
        instance.call(record, &[1], &mut [0]).unwrap_err().kind,
        TrapKind::Interrupted
    );
    instance.call(record, &[1], &mut [0]).unwrap();
}

#[test]
fn without_deadline_or_interruption_there_is_no_interrupt_handle() {
    let runtime = default_runtime();
    let capabilities = WasmRuntime::<FixtureState>::capabilities(&runtime);
    assert!(!capabilities.interrupt && !capabilities.call_deadline);
    assert!(capabilities.memory_limit && capabilities.sandboxed);
    assert!(!capabilities.precompiled_modules);
    assert!(FIXTURE.instance(&runtime).interrupt_handle().is_none());
}

#[test]
fn a_start_function_runs_at_instantiation_and_its_traps_fail_it() {
    let runtime = default_runtime();
    let wasm = wat::parse_str(
        r#"(module
             (memory (export "memory") 1)
             (func $start (i32.store (i32.const 0) (i32.const 42)))
             (start $start)
             (func (export "read") (result i32) (i32.load (i32.const 0))))"#,
    )
    .unwrap();
    let module: Arc<dyn CompiledModule<FixtureState>> = runtime.compile(&wasm).unwrap();
    let mut instance = module
        .link(fixture::HOST)
        .unwrap()
        .instantiate(FixtureState::default())
        .unwrap();
    let read = instance.function("read").unwrap();
    let mut value = [0];
    instance.call(read, &[], &mut value).unwrap();
    assert_eq!(value, [42]);

    let trapping = wat::parse_str("(module (func $start unreachable) (start $start))").unwrap();
    let module: Arc<dyn CompiledModule<FixtureState>> = runtime.compile(&trapping).unwrap();
    match module
        .link(fixture::HOST)
        .unwrap()
        .instantiate(FixtureState::default())
    {
        Err(Error::Instantiation(message)) => assert!(message.contains("unreachable"), "{message}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a trapping start function instantiated"),
    }
}

#[test]
fn a_spinning_start_function_is_stopped_by_its_fuel_budget() {
    let runtime = runtime_with_deadline(Duration::from_millis(20));
    let wasm = wat::parse_str("(module (func $start (loop $l (br $l))) (start $start))").unwrap();
    let module: Arc<dyn CompiledModule<FixtureState>> = runtime.compile(&wasm).unwrap();
    let started = Instant::now();
    let result = module
        .link(fixture::HOST)
        .unwrap()
        .instantiate(FixtureState::default());
    assert!(matches!(result, Err(Error::Instantiation(_))));
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Counts down from its argument: seven units of fuel per iteration.
const COUNTER: &str = r#"
(module
  (global $started (mut i32) (i32.const 0))
  (func $count (export "count") (param $n i32) (result i32)
    (loop $again
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br_if $again (local.get $n)))
    (local.get $n))
  (func $start (global.set $started (call $count (i32.const 50000))))
  (start $start))
"#;

#[test]
fn long_calls_and_start_functions_run_to_completion_in_every_configuration() {
    // Builds with debug assertions keep a native frame per executed instruction between returns
    // to the host; fuel slices must keep long calls from overflowing the native stack.
    for config in [
        RuntimeConfig::default(),
        RuntimeConfig {
            call_deadline: Some(Duration::from_secs(60)),
            interruptible: true,
            ..Default::default()
        },
    ] {
        let runtime = WasmiRuntime::new(config).unwrap();
        let module: Arc<dyn CompiledModule<FixtureState>> =
            runtime.compile(&wat::parse_str(COUNTER).unwrap()).unwrap();
        let mut instance = module
            .link(fixture::HOST)
            .unwrap()
            .instantiate(FixtureState::default())
            .unwrap();
        let count = instance.function("count").unwrap();
        let mut left = [1];
        instance.call(count, &[5_000_000], &mut left).unwrap();
        assert_eq!(left, [0]);
    }
}

#[test]
fn a_guest_recursing_through_a_host_function_gets_a_stack_overflow_trap() {
    for runtime in [
        default_runtime(),
        runtime_with_deadline(Duration::from_secs(10)),
    ] {
        let mut instance = FIXTURE.instance(&runtime);
        let reenter = instance.function("reenter").unwrap();
        instance.state().callee = Some(reenter);
        let error = instance.call(reenter, &[], &mut [0]).unwrap_err();
        assert_eq!(error, Trap::wasm(runtime_api::WasmTrapCode::StackOverflow));
        assert!(
            instance.state().entries > 1,
            "the host calls back at least once"
        );
        // The nesting count unwound with the calls: the host may call back again.
        let call_allocate = instance.function("call_allocate").unwrap();
        instance.call(call_allocate, &[], &mut [0]).unwrap();
    }
}

#[test]
fn deep_recursion_is_a_stack_overflow_trap() {
    let runtime = default_runtime();
    let wasm = wat::parse_str(
        r#"(module (func $f (export "recurse") (param i32) (result i32)
             (i32.add (call $f (local.get 0)) (i32.const 1))))"#,
    )
    .unwrap();
    let module: Arc<dyn CompiledModule<FixtureState>> = runtime.compile(&wasm).unwrap();
    let mut instance = module
        .link(fixture::HOST)
        .unwrap()
        .instantiate(FixtureState::default())
        .unwrap();
    let recurse = instance.function("recurse").unwrap();
    let error = instance.call(recurse, &[0], &mut [0]).unwrap_err();
    assert_eq!(error, Trap::wasm(runtime_api::WasmTrapCode::StackOverflow));
}

#[test]
fn instances_move_between_threads_and_modules_are_shared() {
    fn assert_send<T: Send>() {}
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send::<Box<dyn Instance<FixtureState>>>();
    assert_send::<runtime_wasmi::WasmiInstance<FixtureState>>();
    assert_send_sync::<runtime_wasmi::WasmiLinkedModule<FixtureState>>();
    assert_send_sync::<runtime_wasmi::WasmiModule>();

    let mut instance = FIXTURE.instance(&default_runtime());
    let record = instance.function("call_record").unwrap();
    let mut instance = std::thread::spawn(move || {
        instance.call(record, &[9], &mut [0]).unwrap();
        instance
    })
    .join()
    .unwrap();
    instance.call(record, &[10], &mut [0]).unwrap();
    assert_eq!(instance.state().seen, vec![9, u64::MAX, 10, u64::MAX]);
}

#[test]
fn one_linked_module_instantiates_on_many_threads() {
    runtime_contract::one_linked_module_instantiates_on_many_threads(&runtime_with_deadline(
        Duration::from_secs(10),
    ));
}

#[test]
fn the_contract_against_hostile_guests_holds() {
    let runtime = WasmiRuntime::new(RuntimeConfig::default()).unwrap();
    runtime_contract::handles_of_another_instance_are_refused(&runtime);
    runtime_contract::tables_hold_at_most_the_table_entry_limit_in_all(&runtime);
    runtime_contract::tables_cannot_grow_without_bound(&runtime);
    runtime_contract::guest_calls_from_host_functions_nest_at_most_eight_levels(&runtime);
    runtime_contract::a_panic_in_a_nested_call_leaves_the_nesting_count_as_it_was(&runtime);
}
