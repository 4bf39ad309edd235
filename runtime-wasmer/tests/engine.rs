//! wasmer behind `runtime-api`, with every compiler built in: linking, calls in both directions,
//! memory, limits, deadlines, interrupts, precompiled modules and threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime_api::{
    Caller, CompiledModule, Error, HostFunction, Instance, RuntimeConfig, Signature, Trap,
    TrapKind, ValType, WasmRuntime, WasmTrapCode,
};
use runtime_contract::fixture::{self, Fixture, FixtureState};
use runtime_wasmer::{Compiler, WasmerRuntime};

const I32: ValType = ValType::I32;
const I64: ValType = ValType::I64;

/// Every compiler this build has.
fn compilers() -> Vec<Compiler> {
    vec![
        #[cfg(feature = "cranelift")]
        Compiler::Cranelift,
        #[cfg(feature = "singlepass")]
        Compiler::Singlepass,
        #[cfg(feature = "llvm")]
        Compiler::Llvm,
    ]
}

/// Takes every argument shape the typed fast path does not cover: an `i64` in the middle and an
/// `i64` result.
fn mixed(caller: &mut dyn Caller<FixtureState>, args: &mut [u64]) -> Result<(), Trap> {
    caller.state().seen.extend_from_slice(&args[..3]);
    args[0] = u64::MAX - 1;
    Ok(())
}

/// The shared fixture with what only these tests call: host and guest functions of shapes the
/// typed fast paths do not cover, and guest code that a deadline must stop however it spins.
const FIXTURE: Fixture = Fixture {
    imports: r#"
      (import "env" "mixed" (func $mixed (param i32 i64 i32) (result i64)))
      (import "env" "call_spin" (func $call_spin))"#,
    functions: r#"
      (func (export "call_mixed") (result i64)
        (call $mixed (i32.const -2) (i64.const 0x123456789) (i32.const 3)))
      (func (export "spin_nested") (local $i i32)
        (loop $outer
          (local.set $i (i32.const 0))
          (loop $inner (local.set $i (i32.add (local.get $i) (i32.const 1))) (br $inner))
          (br $outer)))
      ;; No loop at all: two recursive calls per level, 2^60 calls in total.
      (func $fan (export "fan") (param $depth i32)
        (if (local.get $depth)
          (then
            (call $fan (i32.sub (local.get $depth) (i32.const 1)))
            (call $fan (i32.sub (local.get $depth) (i32.const 1))))))
      (func (export "spin_in_host") (call $call_spin))
      (func (export "add_u32") (param i64 i32) (result i64)
        (i64.add (local.get 0) (i64.extend_i32_u (local.get 1))))
      (func (export "nine") (param i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
        (i32.add (local.get 0) (local.get 8)))"#,
    host: &[
        HostFunction {
            module: "env",
            name: "mixed",
            signature: Signature::new(&[I32, I64, I32], &[I64]),
            callback: mixed,
        },
        fixture::CALL_SPIN,
    ],
};

fn runtime(compiler: Compiler, config: RuntimeConfig) -> WasmerRuntime {
    WasmerRuntime::new(compiler, config).unwrap()
}

fn default_instance(compiler: Compiler) -> Box<dyn Instance<FixtureState>> {
    FIXTURE.instance(&runtime(compiler, RuntimeConfig::default()))
}

#[test]
fn names_follow_the_compiler() {
    for compiler in compilers() {
        let runtime = runtime(compiler, RuntimeConfig::default());
        let name = WasmRuntime::<FixtureState>::name(&runtime);
        assert_eq!(name, compiler.runtime_name());
        assert!(name.starts_with("wasmer-"), "{name}");
    }
}

#[test]
fn calls_cross_in_slots_and_host_functions_see_grown_memory() {
    for compiler in compilers() {
        runtime_contract::calls_cross_in_slots_and_host_functions_see_grown_memory(&runtime(
            compiler,
            RuntimeConfig::default(),
        ));
    }
}

#[test]
fn host_functions_of_other_shapes_take_the_dynamic_path() {
    for compiler in compilers() {
        let mut instance = default_instance(compiler);
        let f = instance.function("call_mixed").unwrap();
        let mut result = [0];
        instance.call(f, &[], &mut result).unwrap();
        assert_eq!(result, [u64::MAX - 1], "{compiler:?}");
        assert_eq!(
            instance.state().seen,
            vec![0xffff_fffe, 0x1_2345_6789, 3],
            "{compiler:?}"
        );
    }
}

#[test]
fn guest_functions_of_any_integer_shape_can_be_called() {
    for compiler in compilers() {
        let mut instance = default_instance(compiler);
        let add_u32 = instance.function("add_u32").unwrap();
        let mut result = [0];
        instance
            .call(add_u32, &[u64::MAX - 5, 0xffff_ffff], &mut result)
            .unwrap();
        assert_eq!(result[0], (u64::MAX - 5).wrapping_add(0xffff_ffff));
        let nine = instance.function("nine").unwrap();
        instance
            .call(nine, &[1, 0, 0, 0, 0, 0, 0, 0, 0xffff_ffff], &mut result)
            .unwrap();
        assert_eq!(result[0], 0, "{compiler:?}: 1 + u32::MAX wraps");
        assert!(instance.function("no_such_function").is_none());
        assert!(instance.function("memory").is_none(), "not a function");
    }
}

#[test]
fn calls_with_the_wrong_arity_are_refused() {
    for compiler in compilers() {
        let mut instance = default_instance(compiler);
        let f = instance.function("call_record").unwrap();
        let error = instance.call(f, &[], &mut [0]).unwrap_err();
        assert_eq!(error.kind, TrapKind::BadCall);
    }
}

#[test]
fn traps_and_exits_are_reported_and_the_instance_stays_usable() {
    for compiler in compilers() {
        runtime_contract::traps_have_canonical_codes_and_leave_the_instance_usable(
            &runtime(compiler, RuntimeConfig::default()),
            &[],
        );
    }
}

#[test]
fn unknown_imports_and_mismatched_signatures_are_link_errors() {
    for compiler in compilers() {
        runtime_contract::bad_modules_and_imports_fail_with_errors_that_say_why(&runtime(
            compiler,
            RuntimeConfig::default(),
        ));
    }
}

#[test]
fn imports_and_exports_are_listed_with_their_types() {
    // With a deadline: the stop flag and start function the checks add are not listed.
    for compiler in compilers() {
        runtime_contract::imports_and_exports_are_listed_with_their_types(&runtime(
            compiler,
            RuntimeConfig {
                call_deadline: Some(Duration::from_secs(1)),
                ..Default::default()
            },
        ));
    }
}

#[test]
fn a_start_function_trap_fails_instantiation() {
    for compiler in compilers() {
        let runtime = runtime(compiler, RuntimeConfig::default());
        let wasm = wat::parse_str(r#"(module (func $s unreachable) (start $s))"#).unwrap();
        let module: Arc<dyn CompiledModule<FixtureState>> = runtime.compile(&wasm).unwrap();
        let linked = module.link(fixture::HOST).unwrap();
        let Err(Error::Instantiation(message)) = linked.instantiate(FixtureState::default()) else {
            panic!("{compiler:?}: the start function trapped");
        };
        assert!(message.contains("unreachable"), "{message}");
    }
}

#[test]
fn the_memory_cap_makes_memory_grow_fail() {
    for compiler in compilers() {
        runtime_contract::the_memory_cap_makes_memory_grow_fail(|config| runtime(compiler, config));
    }
}

#[test]
fn a_call_deadline_stops_spinning_and_recursing_guests() {
    for compiler in compilers() {
        let runtime = runtime(
            compiler,
            RuntimeConfig {
                call_deadline: Some(Duration::from_millis(30)),
                ..Default::default()
            },
        );
        let mut instance = FIXTURE.instance(&runtime);
        for name in ["spin", "spin_nested", "fan"] {
            let f = instance.function(name).unwrap();
            let args: &[u64] = if name == "fan" { &[60] } else { &[] };
            let start = Instant::now();
            let error = instance.call(f, args, &mut []).unwrap_err();
            assert_eq!(
                error.kind,
                TrapKind::DeadlineExceeded,
                "{compiler:?} {name}"
            );
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{compiler:?} {name}"
            );
            // Measured by the clock from the ticker's first sight of the call: never early.
            assert!(
                start.elapsed() >= Duration::from_millis(30),
                "{compiler:?} {name} stopped after {:?}",
                start.elapsed()
            );
            // The next call gets a fresh deadline.
            let record = instance.function("call_record").unwrap();
            instance.call(record, &[1], &mut [0]).unwrap();
        }
        // A deadline that expires inside a nested call (guest → host → guest) is reported by
        // the top-level call as a deadline, however the host function passed it on.
        let spin = instance.function("spin").unwrap();
        instance.state().callee = Some(spin);
        let spin_in_host = instance.function("spin_in_host").unwrap();
        let error = instance.call(spin_in_host, &[], &mut []).unwrap_err();
        assert_eq!(
            error.kind,
            TrapKind::DeadlineExceeded,
            "{compiler:?} nested"
        );
    }
}

#[test]
fn genuine_traps_under_a_deadline_stay_traps() {
    for compiler in compilers() {
        let runtime = runtime(
            compiler,
            RuntimeConfig {
                call_deadline: Some(Duration::from_secs(10)),
                interruptible: true,
                ..Default::default()
            },
        );
        let mut instance = FIXTURE.instance(&runtime);
        let trap = instance.function("trap").unwrap();
        let error = instance.call(trap, &[], &mut []).unwrap_err();
        assert_eq!(error, Trap::wasm(WasmTrapCode::Unreachable), "{compiler:?}");
        let record = instance.function("call_record").unwrap();
        instance.call(record, &[1], &mut [0]).unwrap();
    }
}

#[test]
fn an_interrupt_from_another_thread_stops_a_running_call() {
    for compiler in compilers() {
        let runtime = runtime(
            compiler,
            RuntimeConfig {
                interruptible: true,
                ..Default::default()
            },
        );
        let caps = WasmRuntime::<FixtureState>::capabilities(&runtime);
        assert!(caps.interrupt && !caps.call_deadline && caps.memory_limit);
        let mut instance = FIXTURE.instance(&runtime);
        let handle = instance.interrupt_handle().expect("interruptible");
        let spin = instance.function("spin_nested").unwrap();
        let interrupter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            handle.interrupt();
        });
        let error = instance.call(spin, &[], &mut []).unwrap_err();
        interrupter.join().unwrap();
        assert_eq!(error.kind, TrapKind::Interrupted, "{compiler:?}");
        // The instance keeps working, and an interrupt raised between calls stops the next one.
        let record = instance.function("call_record").unwrap();
        instance.call(record, &[1], &mut [0]).unwrap();
        instance.interrupt_handle().unwrap().interrupt();
        assert_eq!(
            instance.call(record, &[1], &mut [0]).unwrap_err().kind,
            TrapKind::Interrupted,
            "{compiler:?}: pending interrupt"
        );
        instance.call(record, &[1], &mut [0]).unwrap();
    }
}

#[test]
fn without_stop_configuration_there_is_no_interrupt_handle() {
    for compiler in compilers() {
        let instance = default_instance(compiler);
        assert!(instance.interrupt_handle().is_none());
    }
}

#[cfg(feature = "llvm")]
#[test]
fn llvm_refuses_deadlines_for_modules_without_memory() {
    let runtime = runtime(
        Compiler::Llvm,
        RuntimeConfig {
            call_deadline: Some(Duration::from_secs(1)),
            ..Default::default()
        },
    );
    let wasm = wat::parse_str(r#"(module (func (export "spin") (loop (br 0))))"#).unwrap();
    let result: Result<Arc<dyn CompiledModule<FixtureState>>, _> = runtime.compile(&wasm);
    assert!(
        matches!(result, Err(Error::Config(_))),
        "{:?}",
        result.err()
    );
    // Without a deadline the same module compiles.
    let runtime = self::runtime(Compiler::Llvm, RuntimeConfig::default());
    let result: Result<Arc<dyn CompiledModule<FixtureState>>, _> = runtime.compile(&wasm);
    assert!(result.is_ok());
}

#[test]
fn precompiled_modules_round_trip() {
    for compiler in compilers() {
        for config in [
            RuntimeConfig::default(),
            RuntimeConfig {
                call_deadline: Some(Duration::from_millis(30)),
                ..Default::default()
            },
        ] {
            let runtime = runtime(compiler, config.clone());
            let module = FIXTURE.compile(&runtime);
            let artifact = module.serialize().unwrap();
            // SAFETY: the artifact was produced just above by the same engine.
            let loaded: Arc<dyn CompiledModule<FixtureState>> =
                unsafe { runtime.load_precompiled(&artifact) }.unwrap();
            assert_eq!(loaded.exports(), module.exports());
            assert_eq!(loaded.imports(), module.imports());
            let mut instance = loaded
                .link(&FIXTURE.host())
                .unwrap()
                .instantiate(FixtureState::default())
                .unwrap();
            let record = instance.function("call_record").unwrap();
            instance.call(record, &[5], &mut [0]).unwrap();
            if config.call_deadline.is_some() {
                let spin = instance.function("spin").unwrap();
                let error = instance.call(spin, &[], &mut []).unwrap_err();
                assert_eq!(error.kind, TrapKind::DeadlineExceeded, "{compiler:?}");
            }
        }
    }
}

#[test]
fn precompiled_modules_only_load_where_they_fit() {
    let plain = runtime(compilers()[0], RuntimeConfig::default());
    let with_deadline = runtime(
        compilers()[0],
        RuntimeConfig {
            call_deadline: Some(Duration::from_secs(1)),
            ..Default::default()
        },
    );
    let wasm = wat::parse_str(FIXTURE.module()).unwrap();
    let without_checks = WasmRuntime::<FixtureState>::compile(&plain, &wasm)
        .unwrap()
        .serialize()
        .unwrap();
    let with_checks = WasmRuntime::<FixtureState>::compile(&with_deadline, &wasm)
        .unwrap()
        .serialize()
        .unwrap();
    // SAFETY (all loads below): the artifacts come from this test, or are not artifacts at all,
    // which the header check refuses before wasmer sees them.
    let load = |runtime: &WasmerRuntime, artifact: &[u8]| {
        unsafe { WasmRuntime::<FixtureState>::load_precompiled(runtime, artifact) }.map(|_| ())
    };
    assert!(matches!(
        load(&with_deadline, &without_checks),
        Err(Error::InvalidModule(_))
    ));
    load(&plain, &with_checks).unwrap();
    load(&with_deadline, &with_checks).unwrap();
    assert!(matches!(load(&plain, &wasm), Err(Error::InvalidModule(_))));
    assert!(matches!(load(&plain, b""), Err(Error::InvalidModule(_))));
    let mut truncated = without_checks.clone();
    truncated.truncate(without_checks.len() / 2);
    assert!(load(&plain, &truncated).is_err());
    for other in compilers().into_iter().skip(1) {
        let other = runtime(other, RuntimeConfig::default());
        assert!(
            matches!(load(&other, &without_checks), Err(Error::InvalidModule(_))),
            "another compiler's artifact"
        );
    }
}

#[test]
fn one_linked_module_instantiates_on_many_threads() {
    for compiler in compilers() {
        runtime_contract::one_linked_module_instantiates_on_many_threads(&runtime(
            compiler,
            RuntimeConfig::default(),
        ));
    }
}

#[test]
fn an_instance_moves_between_threads_between_calls() {
    for compiler in compilers() {
        let mut instance = default_instance(compiler);
        let record = instance.function("call_record").unwrap();
        instance.call(record, &[1], &mut [0]).unwrap();
        let mut instance = std::thread::spawn(move || {
            instance.call(record, &[2], &mut [0]).unwrap();
            instance
        })
        .join()
        .unwrap();
        instance.call(record, &[3], &mut [0]).unwrap();
        let seen: Vec<u64> = instance.state().seen.iter().step_by(2).copied().collect();
        assert_eq!(seen, vec![1, 2, 3], "{compiler:?}");
    }
}

#[test]
fn the_start_function_runs_at_instantiation_under_the_deadline() {
    let wasm = |body: &str| {
        wat::parse_str(format!(
            r#"(module
                 (import "env" "record" (func $record (param i32)))
                 (memory (export "memory") 1)
                 (func $start {body})
                 (start $start))"#
        ))
        .unwrap()
    };
    fn started(caller: &mut dyn Caller<FixtureState>, args: &mut [u64]) -> Result<(), Trap> {
        caller.state().seen.push(args[0]);
        Ok(())
    }
    let host = &[HostFunction {
        module: "env",
        name: "record",
        signature: Signature::new(&[I32], &[]),
        callback: started,
    }];
    for compiler in compilers() {
        let runtime = runtime(
            compiler,
            RuntimeConfig {
                call_deadline: Some(Duration::from_millis(30)),
                ..Default::default()
            },
        );
        // A start function that returns runs once, and sees the host functions.
        let module: Arc<dyn CompiledModule<FixtureState>> = runtime
            .compile(&wasm("(call $record (i32.const 42))"))
            .unwrap();
        let names: Vec<&str> = module.exports().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["memory"], "{compiler:?}: no private exports listed");
        let mut instance = module
            .link(host)
            .unwrap()
            .instantiate(FixtureState::default())
            .unwrap();
        assert_eq!(instance.state().seen, [42], "{compiler:?}");
        // A start function that never returns is stopped by the deadline.
        let module: Arc<dyn CompiledModule<FixtureState>> = runtime
            .compile(&wasm("(loop $forever (br $forever))"))
            .unwrap();
        let started = Instant::now();
        let error = module
            .link(host)
            .unwrap()
            .instantiate(FixtureState::default())
            .err()
            .expect("a spinning start function fails instantiation");
        assert!(matches!(error, Error::Instantiation(_)), "{compiler:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{compiler:?}");
    }
}

#[test]
fn float_values_travel_as_their_bits_on_the_dynamic_path() {
    fn halve(_caller: &mut dyn Caller<FixtureState>, args: &mut [u64]) -> Result<(), Trap> {
        args[0] = (f64::from_bits(args[0]) / 2.0).to_bits();
        Ok(())
    }
    let host = [HostFunction {
        module: "env",
        name: "halve",
        signature: Signature::new(&[ValType::F64], &[ValType::F64]),
        callback: halve,
    }];
    let wasm = wat::parse_str(
        r#"(module
             (import "env" "halve" (func $halve (param f64) (result f64)))
             ;; Guest exports the host calls are integer-typed: the float goes in as its bits.
             (func (export "quarter") (param i64) (result i64)
               (i64.reinterpret_f64
                 (call $halve (call $halve (f64.reinterpret_i64 (local.get 0)))))))"#,
    )
    .unwrap();
    for compiler in compilers() {
        let runtime = runtime(compiler, RuntimeConfig::default());
        let module: Arc<dyn CompiledModule<FixtureState>> = runtime.compile(&wasm).unwrap();
        let mut instance = module
            .link(&host)
            .unwrap()
            .instantiate(FixtureState::default())
            .unwrap();
        let quarter = instance.function("quarter").unwrap();
        let mut result = [0];
        instance
            .call(quarter, &[10.0f64.to_bits()], &mut result)
            .unwrap();
        assert_eq!(f64::from_bits(result[0]), 2.5, "{compiler:?}");
    }
}

#[test]
fn a_memory_cap_above_four_gibibytes_leaves_32_bit_memories_usable() {
    for compiler in compilers() {
        let runtime = runtime(
            compiler,
            RuntimeConfig {
                max_memory_bytes: Some(8 << 30),
                ..Default::default()
            },
        );
        let mut instance = FIXTURE.instance(&runtime);
        let grow = instance.function("grow").unwrap();
        let mut result = [0];
        instance.call(grow, &[1], &mut result).unwrap();
        assert_eq!(result[0], 1, "{compiler:?}");
    }
}

#[test]
fn a_host_function_panicking_through_a_call_leaves_no_deadline_armed() {
    let host = [fixture::PANICS];
    let wasm = wat::parse_str(
        r#"(module
             (import "env" "panics" (func $panics))
             (memory 1)
             (func (export "panic") (call $panics))
             (func (export "work")))"#,
    )
    .unwrap();
    for compiler in compilers() {
        let runtime = runtime(
            compiler,
            RuntimeConfig {
                call_deadline: Some(Duration::from_millis(20)),
                ..Default::default()
            },
        );
        let module: Arc<dyn CompiledModule<FixtureState>> = runtime.compile(&wasm).unwrap();
        let mut instance = module
            .link(&host)
            .unwrap()
            .instantiate(FixtureState::default())
            .unwrap();
        let panic = instance.function("panic").unwrap();
        let work = instance.function("work").unwrap();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            instance.call(panic, &[], &mut [])
        }));
        assert!(
            unwound.is_err(),
            "{compiler:?}: the panic reaches the embedder"
        );
        // Long past the panicked call's deadline, later calls run normally.
        std::thread::sleep(Duration::from_millis(100));
        for _ in 0..3 {
            instance.call(work, &[], &mut []).unwrap();
        }
    }
}

#[test]
fn the_contract_against_hostile_guests_holds() {
    for compiler in compilers() {
        let runtime = runtime(compiler, RuntimeConfig::default());
        runtime_contract::handles_of_another_instance_are_refused(&runtime);
        runtime_contract::tables_hold_at_most_the_table_entry_limit_in_all(&runtime);
        runtime_contract::tables_cannot_grow_without_bound(&runtime);
        runtime_contract::guest_calls_from_host_functions_nest_at_most_eight_levels(&runtime);
        runtime_contract::a_panic_in_a_nested_call_leaves_the_nesting_count_as_it_was(&runtime);
    }
}

#[test]
fn modules_with_a_shared_memory_are_refused() {
    // The threads proposal is off: `memory.atomic.wait32` could block where no deadline reaches.
    let shared = wat::parse_str(r#"(module (memory 1 1 shared))"#).unwrap();
    for compiler in compilers() {
        let runtime = runtime(compiler, RuntimeConfig::default());
        assert!(
            matches!(
                WasmRuntime::<FixtureState>::compile(&runtime, &shared),
                Err(Error::InvalidModule(_))
            ),
            "{compiler:?}"
        );
    }
}
