//! V8 behind `runtime-api`: linking, calls in both directions, memory, limits, interrupts, and
//! instances moving between threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime_api::{
    Caller, CompiledModule, Error, HostFunction, Instance, RuntimeConfig, Signature, Trap,
    TrapKind, ValType, WasmRuntime, WasmTrapCode,
};
use runtime_v8::V8Runtime;

/// Host state for these tests: what the host functions saw.
#[derive(Default)]
struct State {
    seen: Vec<u64>,
    allocator: Option<runtime_api::GuestFunction>,
}

const I32: ValType = ValType::I32;
const I64: ValType = ValType::I64;

fn record(caller: &mut dyn Caller<State>, args: &mut [u64]) -> Result<(), Trap> {
    caller.state().seen.extend_from_slice(&args[..2]);
    args[0] = 7;
    Ok(())
}

/// Allocates 8 bytes through the guest (which grows memory) and writes a marker there.
fn allocate_and_write(caller: &mut dyn Caller<State>, args: &mut [u64]) -> Result<(), Trap> {
    let allocator = caller
        .state()
        .allocator
        .ok_or_else(|| Trap::host("no allocator"))?;
    let mut pointer = [0];
    caller.call(allocator, &[8], &mut pointer)?;
    let mut memory = caller.memory();
    memory
        .write(pointer[0], b"written!")
        .map_err(|e| Trap::host(e.to_string()))?;
    args[0] = pointer[0];
    Ok(())
}

fn exit(_caller: &mut dyn Caller<State>, args: &mut [u64]) -> Result<(), Trap> {
    Err(Trap::exit(args[0] as i32))
}

/// Returns its i64 argument plus one, as an i64.
fn increment(_caller: &mut dyn Caller<State>, args: &mut [u64]) -> Result<(), Trap> {
    args[0] = args[0].wrapping_add(1);
    Ok(())
}

fn panics(_caller: &mut dyn Caller<State>, _args: &mut [u64]) -> Result<(), Trap> {
    panic!("a host function bug");
}

/// Calls the guest's `spin` export: a nested call that never returns on its own.
fn call_spin(caller: &mut dyn Caller<State>, _args: &mut [u64]) -> Result<(), Trap> {
    let spin = caller
        .state()
        .allocator
        .ok_or_else(|| Trap::host("no spin"))?;
    caller.call(spin, &[], &mut [])
}

static HOST: &[HostFunction<State>] = &[
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
        callback: allocate_and_write,
    },
    HostFunction {
        module: "env",
        name: "exit",
        signature: Signature::new(&[I32], &[]),
        callback: exit,
    },
    HostFunction {
        module: "env",
        name: "increment",
        signature: Signature::new(&[I64], &[I64]),
        callback: increment,
    },
    HostFunction {
        module: "env",
        name: "panics",
        signature: Signature::new(&[], &[]),
        callback: panics,
    },
    HostFunction {
        module: "env",
        name: "call_spin",
        signature: Signature::new(&[], &[]),
        callback: call_spin,
    },
];

const MODULE: &str = r#"
(module
  (import "env" "record" (func $record (param i32 i64) (result i32)))
  (import "env" "allocate_and_write" (func $allocate_and_write (result i32)))
  (import "env" "exit" (func $exit (param i32)))
  (import "env" "increment" (func $increment (param i64) (result i64)))
  (import "env" "panics" (func $panics))
  (import "env" "call_spin" (func $call_spin))
  (memory (export "memory") 1)
  ;; Every allocation grows memory by a page and returns the start of the new page, so the host
  ;; must re-read the memory after calling it.
  (func (export "allocate") (param $size i32) (result i32)
    (i32.mul (memory.grow (i32.const 1)) (i32.const 65536)))
  (func (export "call_record") (param $a i32) (result i32)
    (call $record (local.get $a) (i64.const -1)))
  (func (export "call_allocate") (result i32) (call $allocate_and_write))
  (func (export "grow") (param $pages i32) (result i32) (memory.grow (local.get $pages)))
  (func (export "spin") (loop $forever (br $forever)))
  (func (export "exit_with") (param $code i32) (call $exit (local.get $code)))
  (func (export "trap") unreachable)
  (func (export "increment_twice") (param $x i64) (result i64)
    (call $increment (call $increment (local.get $x))))
  (func (export "load") (param $address i32) (result i32) (i32.load (local.get $address)))
  (func (export "divide") (param $a i32) (param $b i32) (result i32)
    (i32.div_u (local.get $a) (local.get $b)))
  (func $recurse (export "recurse") (call $recurse))
  (func (export "call_panics") (call $panics))
  (func (export "call_call_spin") (call $call_spin)))
"#;

fn compile(runtime: &V8Runtime, text: &str) -> Arc<dyn CompiledModule<State>> {
    runtime.compile(&wat::parse_str(text).unwrap()).unwrap()
}

fn instance(runtime: &V8Runtime) -> Box<dyn Instance<State>> {
    let mut instance = compile(runtime, MODULE)
        .link(HOST)
        .unwrap()
        .instantiate(State::default())
        .unwrap();
    let allocator = instance.function("allocate");
    instance.state().allocator = allocator;
    instance
}

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
    let mut instance = instance(&default_runtime());
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
    let mut instance = instance(&runtime);
    let f = instance.function("call_record").unwrap();
    let error = instance.call(f, &[], &mut [0]).unwrap_err();
    assert_eq!(error.kind, TrapKind::BadCall);
    let mut other = self::instance(&runtime);
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
    let mut instance = instance(&default_runtime());
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
    let linked = module.link(HOST).unwrap();
    match linked.instantiate(State::default()) {
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
    let module = compile(&runtime, MODULE);
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
    let result = module.link(HOST).unwrap().instantiate(State::default());
    assert!(matches!(result, Err(Error::Instantiation(_))));
}

#[test]
fn huge_memory_growth_without_a_cap_fails_in_the_guest() {
    let mut instance = instance(&default_runtime());
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
        .link(HOST)
        .unwrap()
        .instantiate(State::default())
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
    let too_large: Result<Arc<dyn CompiledModule<State>>, _> = runtime.compile(
        &wat::parse_str("(module (table 6000000 funcref) (table 6000000 funcref))").unwrap(),
    );
    assert!(matches!(too_large, Err(Error::InvalidModule(_))));
}

#[test]
fn a_call_deadline_stops_a_spinning_guest() {
    let runtime = V8Runtime::new(RuntimeConfig {
        call_deadline: Some(Duration::from_millis(30)),
        ..Default::default()
    })
    .unwrap();
    let mut instance = instance(&runtime);
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
}

#[test]
fn a_call_deadline_stops_a_guest_spinning_in_a_nested_call() {
    let runtime = V8Runtime::new(RuntimeConfig {
        call_deadline: Some(Duration::from_millis(30)),
        ..Default::default()
    })
    .unwrap();
    let mut instance = instance(&runtime);
    // The host function `call_spin` calls the guest's allocator slot: point it at `spin`.
    let spin = instance.function("spin");
    instance.state().allocator = spin;
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
    match module.link(HOST).unwrap().instantiate(State::default()) {
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
    assert!(WasmRuntime::<State>::capabilities(&runtime).interrupt);
    let mut instance = instance(&runtime);
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
    let mut instance = instance(&runtime);
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
    let mut instance = instance(&runtime);
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
    let result: Result<Arc<dyn CompiledModule<State>>, _> = runtime.compile(&waits_forever);
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
    let result: Result<Arc<dyn CompiledModule<State>>, _> = runtime.compile(&atomics);
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
    let result: Result<Arc<dyn CompiledModule<State>>, _> = runtime.compile(&swallows_exit);
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
    let mut instance = instance(&default_runtime());
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
    let linked = compile(&runtime, MODULE).link(HOST).unwrap();
    let result = std::thread::Builder::new()
        .stack_size(512 * 1024)
        .spawn(move || {
            let mut instance = linked.instantiate(State::default()).unwrap();
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
    let capabilities = WasmRuntime::<State>::capabilities(&runtime);
    assert!(capabilities.call_deadline && capabilities.memory_limit && capabilities.sandboxed);
    assert!(!capabilities.interrupt && !capabilities.precompiled_modules);
    assert_eq!(WasmRuntime::<State>::name(&runtime), "v8");
}

#[test]
fn the_contract_against_hostile_guests_holds() {
    let runtime = V8Runtime::new(RuntimeConfig::default()).unwrap();
    runtime_contract::handles_of_another_instance_are_refused(&runtime);
}
