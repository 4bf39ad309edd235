//! wasmtime behind `runtime-api`: linking, calls in both directions, memory, limits, interrupts.

use std::sync::Arc;
use std::time::Duration;

use runtime_api::{CompiledModule, RuntimeConfig, TrapKind, WasmRuntime};
use runtime_contract::fixture::{self, FixtureState};
use runtime_wasmtime::{WasmtimeOptions, WasmtimeRuntime};

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
    let mut instance = fixture::SHARED.instance(&default_runtime());
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
    let refused = runtime_contract::the_memory_cap_makes_memory_grow_fail(|config| {
        WasmtimeRuntime::new(config).unwrap()
    });
    assert_eq!(
        refused,
        Some(true),
        "its resource limiter tells the refusal"
    );
}

#[test]
fn a_call_deadline_stops_a_spinning_guest() {
    let runtime = WasmtimeRuntime::new(RuntimeConfig {
        call_deadline: Some(Duration::from_millis(30)),
        ..Default::default()
    })
    .unwrap();
    let mut instance = fixture::SHARED.instance(&runtime);
    let spin = instance.function("spin").unwrap();
    for _ in 0..3 {
        let start = std::time::Instant::now();
        assert_eq!(
            instance.call(spin, &[], &mut []).unwrap_err().kind,
            TrapKind::DeadlineExceeded
        );
        // Measured by the clock from before the call's first tick: never stopped early.
        assert!(start.elapsed() >= Duration::from_millis(30));
    }
    // The next call gets a fresh deadline.
    let record = instance.function("call_record").unwrap();
    instance.call(record, &[1], &mut [0]).unwrap();
}

#[test]
fn precompiled_modules_round_trip() {
    let runtime = default_runtime();
    let module = fixture::SHARED.compile(&runtime);
    let artifact = module.serialize().unwrap();
    // SAFETY: the artifact was produced just above by the same engine.
    let loaded: Arc<dyn CompiledModule<FixtureState>> =
        unsafe { runtime.load_precompiled(&artifact) }.unwrap();
    assert_eq!(loaded.exports().len(), module.exports().len());
    let mut instance = loaded
        .link(fixture::HOST)
        .unwrap()
        .instantiate(FixtureState::default())
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
    runtime_contract::tables_hold_at_most_the_table_entry_limit_in_all(&runtime);
    runtime_contract::tables_cannot_grow_without_bound(&runtime);
}

#[test]
fn imports_and_exports_are_listed_with_their_types() {
    runtime_contract::imports_and_exports_are_listed_with_their_types(
        &WasmtimeRuntime::new(RuntimeConfig::default()).unwrap(),
    );
}
