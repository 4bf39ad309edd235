//! wasmtime behind `runtime-api`: linking, calls in both directions, memory, limits, interrupts.

use std::sync::Arc;
use std::time::Duration;

use runtime_api::{
    Caller, CompiledModule, HostFunction, Instance, RuntimeConfig, Signature, Trap, TrapKind,
    ValType, WasmRuntime,
};
use runtime_wasmtime::{WasmtimeOptions, WasmtimeRuntime};

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
];

const MODULE: &str = r#"
(module
  (import "env" "record" (func $record (param i32 i64) (result i32)))
  (import "env" "allocate_and_write" (func $allocate_and_write (result i32)))
  (import "env" "exit" (func $exit (param i32)))
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
  (func (export "trap") unreachable))
"#;

fn instance(runtime: &WasmtimeRuntime) -> Box<dyn Instance<State>> {
    let module: Arc<dyn CompiledModule<State>> =
        runtime.compile(&wat::parse_str(MODULE).unwrap()).unwrap();
    let mut instance = module
        .link(HOST)
        .unwrap()
        .instantiate(State::default())
        .unwrap();
    let allocator = instance.function("allocate");
    instance.state().allocator = allocator;
    instance
}

fn default_runtime() -> WasmtimeRuntime {
    WasmtimeRuntime::new(RuntimeConfig::default()).unwrap()
}

#[test]
fn calls_cross_in_slots_and_host_functions_see_grown_memory() {
    runtime_contract::calls_cross_in_slots_and_host_functions_see_grown_memory(
        &WasmtimeRuntime::new(RuntimeConfig::default()).unwrap(),
    );
}

#[test]
fn calls_with_the_wrong_arity_are_refused() {
    let mut instance = instance(&default_runtime());
    let f = instance.function("call_record").unwrap();
    let error = instance.call(f, &[], &mut [0]).unwrap_err();
    assert_eq!(error.kind, TrapKind::BadCall);
}

#[test]
fn traps_and_exits_are_reported_and_the_instance_stays_usable() {
    runtime_contract::traps_have_canonical_codes_and_leave_the_instance_usable(
        &WasmtimeRuntime::new(RuntimeConfig::default()).unwrap(),
        &[],
    );
}

#[test]
fn unknown_imports_and_mismatched_signatures_are_link_errors() {
    runtime_contract::bad_modules_and_imports_fail_with_errors_that_say_why(
        &WasmtimeRuntime::new(RuntimeConfig::default()).unwrap(),
    );
}

#[test]
fn the_memory_cap_makes_memory_grow_fail() {
    runtime_contract::the_memory_cap_makes_memory_grow_fail(|config| {
        WasmtimeRuntime::new(config).unwrap()
    });
}

#[test]
fn a_call_deadline_stops_a_spinning_guest() {
    let runtime = WasmtimeRuntime::new(RuntimeConfig {
        call_deadline: Some(Duration::from_millis(30)),
        ..Default::default()
    })
    .unwrap();
    let mut instance = instance(&runtime);
    let spin = instance.function("spin").unwrap();
    assert_eq!(
        instance.call(spin, &[], &mut []).unwrap_err().kind,
        TrapKind::DeadlineExceeded
    );
    // The next call gets a fresh deadline.
    let record = instance.function("call_record").unwrap();
    instance.call(record, &[1], &mut [0]).unwrap();
}

#[test]
fn precompiled_modules_round_trip() {
    let runtime = default_runtime();
    let module: Arc<dyn CompiledModule<State>> =
        runtime.compile(&wat::parse_str(MODULE).unwrap()).unwrap();
    let artifact = module.serialize().unwrap();
    // SAFETY: the artifact was produced just above by the same engine.
    let loaded: Arc<dyn CompiledModule<State>> =
        unsafe { runtime.load_precompiled(&artifact) }.unwrap();
    assert_eq!(loaded.exports().len(), module.exports().len());
    let mut instance = loaded
        .link(HOST)
        .unwrap()
        .instantiate(State::default())
        .unwrap();
    let record = instance.function("call_record").unwrap();
    instance.call(record, &[5], &mut [0]).unwrap();
}

#[test]
fn one_linked_module_instantiates_on_many_threads() {
    runtime_contract::one_linked_module_instantiates_on_many_threads(
        &WasmtimeRuntime::with_options(
            RuntimeConfig::default(),
            WasmtimeOptions {
                pooling_instances: Some(16),
            },
        )
        .unwrap(),
    );
}

#[test]
fn the_contract_against_hostile_guests_holds() {
    let runtime = WasmtimeRuntime::new(RuntimeConfig::default()).unwrap();
    runtime_contract::handles_of_another_instance_are_refused(&runtime);
    runtime_contract::tables_cannot_grow_without_bound(&runtime);
}

#[test]
fn imports_and_exports_are_listed_with_their_types() {
    runtime_contract::imports_and_exports_are_listed_with_their_types(
        &WasmtimeRuntime::new(RuntimeConfig::default()).unwrap(),
    );
}
