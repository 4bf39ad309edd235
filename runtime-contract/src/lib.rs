//! Checks of the [`runtime_api`] contract that hold on every engine, written once and run by each
//! engine crate's own tests against that engine (`runtime-*/tests/engine.rs`). Each check panics
//! with a message naming the engine when the engine breaks the contract.
//!
//! Engine-specific behaviour (how deadlines are enforced, what is precompiled) stays in the
//! engine's own tests; what a hostile guest must not be able to do to any host lives here. The
//! guest and host functions the checks and the engines' own tests share are in [`fixture`].

pub mod fixture;

use std::sync::Arc;

use runtime_api::{
    CompiledModule, Instance, RuntimeConfig, Trap, TrapKind, ValType, WasmRuntime, WasmTrapCode,
};

use fixture::{compile, instantiate, FixtureState, CALL_SPIN, HOST, PANICS, REENTER, SHARED};

/// A handle is only good on the instance that gave it out: one of another instance, at an index
/// this instance uses for a function of another type, is refused as a bad call (engines that
/// trusted the index would call with the wrong number of values).
pub fn handles_of_another_instance_are_refused(runtime: &dyn WasmRuntime<FixtureState>) {
    let name = runtime.name();
    let wat = r#"(module
                   (func (export "nothing"))
                   (func (export "double") (param i32) (result i32)
                     (i32.add (local.get 0) (local.get 0))))"#;
    let mut one = instantiate(runtime, wat, &[]);
    let mut other = instantiate(runtime, wat, &[]);
    // Resolved in different orders, so the same index stands for different functions.
    let nothing = one.function("nothing").expect("export nothing");
    let double = other.function("double").expect("export double");
    assert_eq!(
        nothing.index(),
        double.index(),
        "{name}: handles share an index"
    );
    let error = one.call(double, &[1], &mut [0]).unwrap_err();
    assert_eq!(error.kind, TrapKind::BadCall, "{name}: {error}");
    one.call(nothing, &[], &mut [])
        .unwrap_or_else(|e| panic!("{name}: the instance's own handle works: {e}"));
}

/// `table.grow` fails (returns -1) past a bound of the host's, instead of taking as much host
/// memory as the guest asks for; modest growth still works.
pub fn tables_cannot_grow_without_bound(runtime: &dyn WasmRuntime<FixtureState>) {
    let name = runtime.name();
    let mut instance = instantiate(
        runtime,
        r#"(module
             (table 1 funcref)
             (func (export "grow") (param i32) (result i32)
               (table.grow (ref.null func) (local.get 0))))"#,
        &[],
    );
    let grow = instance.function("grow").expect("export grow");
    let mut result = [0];
    instance
        .call(grow, &[0x7fff_ffff], &mut result)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        result[0] as u32 as i32, -1,
        "{name}: huge growth is refused"
    );
    instance
        .call(grow, &[10], &mut result)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(result[0], 1, "{name}: modest growth works");
}

/// An instance's tables hold at most [`runtime_api::MAX_TABLE_ENTRIES`] entries in all: a module
/// declaring more is refused with an error (at compile, link or instantiation) instead of taking
/// gigabytes of host memory, and growth past it fails (-1) whichever table grows.
pub fn tables_hold_at_most_the_table_entry_limit_in_all(runtime: &dyn WasmRuntime<FixtureState>) {
    let name = runtime.name();
    let limit = runtime_api::MAX_TABLE_ENTRIES;
    let declared_past = [
        // One table of 520,093,696 entries (about 4 GiB at 8 bytes each).
        "(module (table 0x1F000000 funcref))".to_string(),
        format!(
            "(module (table {} funcref) (table {} funcref))",
            limit / 2 + 1,
            limit / 2
        ),
    ];
    for wat in &declared_past {
        let wasm = wat::parse_str(wat).expect("the module is valid text");
        let instance = runtime
            .compile(&wasm)
            .and_then(|module| module.link(&[]))
            .and_then(|linked| linked.instantiate(FixtureState::default()));
        assert!(instance.is_err(), "{name}: {wat} is refused");
    }
    let mut instance = instantiate(
        runtime,
        r#"(module
             (table $a 1 funcref)
             (table $b 1 funcref)
             (func (export "grow_a") (param i32) (result i32)
               (table.grow $a (ref.null func) (local.get 0)))
             (func (export "grow_b") (param i32) (result i32)
               (table.grow $b (ref.null func) (local.get 0))))"#,
        &[],
    );
    let grow_a = instance.function("grow_a").expect("export grow_a");
    let grow_b = instance.function("grow_b").expect("export grow_b");
    let mut grow = |function, by: u64| {
        let mut result = [0];
        instance
            .call(function, &[by], &mut result)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        result[0] as u32 as i32
    };
    assert_eq!(grow(grow_a, limit), -1, "{name}: one table past the limit");
    // Each table grown in steps (an engine metering fuel may refuse one large step) until it
    // can grow no more: together they stay within the limit. (An engine may stop a table
    // sooner, by its own rules.)
    for function in [grow_a, grow_b] {
        while grow(function, 10_000) != -1 {}
    }
    let total = grow(grow_a, 0) as u64 + grow(grow_b, 0) as u64;
    assert!(
        total <= limit,
        "{name}: the tables hold {total} entries, more than {limit}"
    );
}

/// A guest recursing through a host function (the allocator calling a host function that calls
/// the allocator …) is stopped with a stack-overflow trap after eight nested levels, before the
/// native stack runs out; the count is of levels in progress, so the next call nests as deep.
pub fn guest_calls_from_host_functions_nest_at_most_eight_levels(
    runtime: &dyn WasmRuntime<FixtureState>,
) {
    let name = runtime.name();
    let mut instance = instantiate(
        runtime,
        r#"(module
             (import "env" "reenter" (func $reenter (result i32)))
             (func (export "enter") (result i32) (call $reenter)))"#,
        &[REENTER],
    );
    for round in ["first call", "second call"] {
        assert_nests_eight_levels(&mut *instance, &format!("{name}, {round}"));
    }
}

/// Calls `instance`'s export `enter`, which recurses through the host (`env.reenter`), and
/// checks that the top-level call and eight nested ones reached the host before a
/// stack-overflow trap stopped it.
fn assert_nests_eight_levels(instance: &mut dyn Instance<FixtureState>, what: &str) {
    let enter = instance.function("enter").expect("export enter");
    instance.state().callee = Some(enter);
    instance.state().entries = 0;
    let error = instance.call(enter, &[], &mut [0]).unwrap_err();
    assert_eq!(error, Trap::wasm(WasmTrapCode::StackOverflow), "{what}");
    assert_eq!(
        instance.state().entries,
        9,
        "{what}: the top-level call and eight nested ones reached the host"
    );
}

/// A host function panicking inside a nested call (the top-level call fails, or the panic
/// reaches the embedder, which catches it; the process goes on) leaves the nesting count as it
/// was: after more such panics than the nesting limit, a guest still recurses through the host
/// eight levels deep.
pub fn a_panic_in_a_nested_call_leaves_the_nesting_count_as_it_was(
    runtime: &dyn WasmRuntime<FixtureState>,
) {
    let name = runtime.name();
    let mut instance = instantiate(
        runtime,
        r#"(module
             (import "env" "reenter" (func $reenter (result i32)))
             (import "env" "call_spin" (func $call_callee))
             (import "env" "panics" (func $panics))
             (func (export "enter") (result i32) (call $reenter))
             (func (export "panic_nested") (call $call_callee))
             (func (export "panic") (call $panics)))"#,
        &[REENTER, CALL_SPIN, PANICS],
    );
    let panic_nested = instance.function("panic_nested").expect("export");
    instance.state().callee = instance.function("panic");
    for _ in 0..10 {
        let call = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            instance.call(panic_nested, &[], &mut [])
        }));
        assert!(
            !matches!(call, Ok(Ok(()))),
            "{name}: the call with the panic fails"
        );
    }
    assert_nests_eight_levels(&mut *instance, &format!("{name}, after the panics"));
}

/// With [`RuntimeConfig::max_memory_bytes`] set, `memory.grow` fails (returns -1) past the cap,
/// however much is asked (and the instance reports its cap and, if the engine can tell, the
/// refusal), and a module whose initial memory is already above the cap does not instantiate.
/// `make` creates the engine with the configuration given. Returns what the instance said of
/// the refusal ([`Instance::memory_grow_refused`]), for engines that must tell it.
pub fn the_memory_cap_makes_memory_grow_fail<R: WasmRuntime<FixtureState>>(
    make: impl Fn(RuntimeConfig) -> R,
) -> Option<bool> {
    const PAGE: u64 = 65536;
    let runtime = make(RuntimeConfig {
        max_memory_bytes: Some(2 * PAGE),
        ..Default::default()
    });
    let name = runtime.name();
    let mut instance = instantiate(
        &runtime,
        r#"(module
             (memory (export "memory") 1)
             (func (export "grow") (param i32) (result i32)
               (memory.grow (local.get 0))))"#,
        &[],
    );
    let grow = instance.function("grow").expect("export grow");
    let mut result = [0];
    let mut grow_by = |pages: u64, instance: &mut Box<dyn Instance<FixtureState>>| {
        instance
            .call(grow, &[pages], &mut result)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        result[0] as u32 as i32
    };
    assert_eq!(
        grow_by(1, &mut instance),
        1,
        "{name}: growing to the cap succeeds"
    );
    assert_eq!(
        instance.memory_limit(),
        Some(2 * PAGE as usize),
        "{name}: the instance knows its cap"
    );
    assert_ne!(
        instance.memory_grow_refused(),
        Some(true),
        "{name}: nothing refused yet"
    );
    assert_eq!(
        grow_by(1, &mut instance),
        -1,
        "{name}: growing past it returns -1"
    );
    let refused = instance.memory_grow_refused();
    assert_ne!(
        refused,
        Some(false),
        "{name}: an engine that tells refusals tells this one"
    );
    assert_eq!(
        grow_by(0x7fff_ffff, &mut instance),
        -1,
        "{name}: so does a huge growth"
    );
    assert_eq!(instance.memory_size() as u64, 2 * PAGE, "{name}");
    let linked = compile(&runtime, r#"(module (memory (export "memory") 3))"#)
        .link(&[])
        .unwrap_or_else(|e| panic!("{name}: link: {e}"));
    assert!(
        matches!(
            linked.instantiate(FixtureState::default()),
            Err(runtime_api::Error::Instantiation(_))
        ),
        "{name}: an initial memory above the cap is refused"
    );
    refused
}

/// Linking and compiling fail with errors that say what is wrong: an import the host does not
/// have names it, one with another signature is a mismatch, an imported memory is unsupported,
/// and bytes that are not a module are an invalid module.
pub fn bad_modules_and_imports_fail_with_errors_that_say_why(
    runtime: &dyn WasmRuntime<FixtureState>,
) {
    use runtime_api::Error;
    let name = runtime.name();
    let link = |wat: &str| compile(runtime, wat).link(HOST).err();
    let error = link(r#"(module (import "env" "nope" (func)))"#);
    assert!(
        matches!(&error, Some(Error::UnknownImport { name, .. }) if name == "nope"),
        "{name}: {error:?}"
    );
    let error = link(r#"(module (import "env" "record" (func (param i32))))"#);
    assert!(
        matches!(&error, Some(Error::ImportSignatureMismatch { .. })),
        "{name}: {error:?}"
    );
    let error = link(r#"(module (import "env" "memory" (memory 1)))"#);
    assert!(
        matches!(&error, Some(Error::UnsupportedImport { kind, .. }) if kind == "memory"),
        "{name}: {error:?}"
    );
    let not_modules = [
        &b"\0asm\x01\0\0\0\xff"[..],
        b"",
        b"\0asm",
        b"(module)",
        b"not wasm at all",
    ];
    for bytes in not_modules {
        let result: Result<Arc<dyn CompiledModule<FixtureState>>, _> = runtime.compile(bytes);
        assert!(
            matches!(result, Err(Error::InvalidModule(_))),
            "{name}: {bytes:?}"
        );
    }
}

/// Every kind of WebAssembly trap comes back with its canonical code (the same words on every
/// engine), a host function's own trap comes back unchanged, and the instance stays usable after
/// each, a stack overflow included.
///
/// `indistinct` lists the codes an engine cannot tell apart from others (V8 words a NaN
/// conversion and an out-of-range one alike, and a null entry and a signature mismatch alike):
/// those must still be WebAssembly traps, in the engine's own words.
pub fn traps_have_canonical_codes_and_leave_the_instance_usable(
    runtime: &dyn WasmRuntime<FixtureState>,
    indistinct: &[WasmTrapCode],
) {
    let name = runtime.name();
    let mut instance = instantiate(
        runtime,
        r#"(module
             (import "env" "exit" (func $exit (param i32)))
             (memory 1)
             (table 2 funcref)
             (type $t (func (param i32)))
             (elem (i32.const 0) $f)
             (func $f)
             (func (export "unreachable") unreachable)
             (func (export "oob") (drop (i32.load (i32.const 65535))))
             (func (export "div") (drop (i32.div_s (i32.const 1) (i32.const 0))))
             (func (export "overflow") (drop (i32.div_s (i32.const 0x80000000) (i32.const -1))))
             (func (export "convert") (drop (i32.trunc_f32_s (f32.const nan))))
             (func (export "null") (call_indirect (i32.const 1)))
             (func (export "signature") (call_indirect (type $t) (i32.const 0) (i32.const 0)))
             (func (export "table") (call_indirect (i32.const 5)))
             (func $deep (export "recurse") (call $deep))
             (func (export "exit_with_3") (call $exit (i32.const 3)))
             (func (export "divide") (param i32 i32) (result i32)
               (i32.div_s (local.get 0) (local.get 1))))"#,
        HOST,
    );
    let divide = instance.function("divide").expect("export divide");
    let still_usable = |instance: &mut Box<dyn Instance<FixtureState>>, after: &str| {
        let mut quotient = [0];
        instance
            .call(divide, &[9, 3], &mut quotient)
            .unwrap_or_else(|e| panic!("{name}: usable after {after}: {e}"));
        assert_eq!(quotient, [3], "{name}: after {after}");
    };
    for (export, code) in [
        ("unreachable", WasmTrapCode::Unreachable),
        ("oob", WasmTrapCode::MemoryOutOfBounds),
        ("div", WasmTrapCode::IntegerDivisionByZero),
        ("overflow", WasmTrapCode::IntegerOverflow),
        ("convert", WasmTrapCode::BadConversionToInteger),
        ("null", WasmTrapCode::IndirectCallToNull),
        ("signature", WasmTrapCode::BadSignature),
        ("table", WasmTrapCode::TableOutOfBounds),
        ("recurse", WasmTrapCode::StackOverflow),
    ] {
        let function = instance.function(export).expect("export");
        let error = instance.call(function, &[], &mut []).unwrap_err();
        if indistinct.contains(&code) {
            assert_eq!(error.kind, TrapKind::Wasm, "{name}: {export}: {error}");
            assert!(error.message.starts_with("wasm trap: "), "{name}: {error}");
        } else {
            assert_eq!(error, Trap::wasm(code), "{name}: {export}");
        }
        still_usable(&mut instance, export);
    }
    let exit = instance
        .function("exit_with_3")
        .expect("export exit_with_3");
    assert_eq!(
        instance.call(exit, &[], &mut []).unwrap_err(),
        Trap::exit(3),
        "{name}: a host function's trap comes back unchanged"
    );
    still_usable(&mut instance, "an exit");
}

/// Values cross in 64-bit slots both ways (`i32` zero-extended, `i64` as its bits, the result
/// in slot 0), and a host function that calls the guest's allocator sees the memory it grew.
pub fn calls_cross_in_slots_and_host_functions_see_grown_memory(
    runtime: &dyn WasmRuntime<FixtureState>,
) {
    let name = runtime.name();
    let mut instance = SHARED.instance(runtime);
    let call_record = instance
        .function("call_record")
        .expect("export call_record");
    let mut result = [0];
    instance
        .call(call_record, &[0xffff_fffe], &mut result)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(result, [7], "{name}");
    assert_eq!(instance.state().seen, [0xffff_fffe, u64::MAX], "{name}");
    let add64 = instance.function("add64").expect("export add64");
    instance
        .call(add64, &[u64::MAX - 1, 1], &mut result)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(result, [u64::MAX], "{name}: i64 values keep all their bits");
    let mix = instance.function("mix").expect("export mix");
    let (a, b, c) = (0xffff_fffe_u64, (1_u64 << 40) + 1, 3_u64);
    instance
        .call(mix, &[a, b, c], &mut result)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        result,
        [a.wrapping_add(b.wrapping_mul(2)).wrapping_add(c << 32)],
        "{name}: i32 and i64 parameters mixed each keep their own slot"
    );

    assert_eq!(instance.memory_size(), 65536, "{name}");
    let call_allocate = instance
        .function("call_allocate")
        .expect("export call_allocate");
    let mut pointer = [0];
    instance
        .call(call_allocate, &[], &mut pointer)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(pointer[0], 65536, "{name}: the new page");
    assert_eq!(instance.memory_size(), 2 * 65536, "{name}");
    let read = instance.function("read").expect("export read");
    instance
        .call(read, &[pointer[0]], &mut result)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        result[0].to_le_bytes(),
        *b"written!",
        "{name}: the guest sees the write"
    );
}

/// A compiled module lists its imports with their types in declaration order, and its exports
/// with their types (in an order of the engine's choosing).
pub fn imports_and_exports_are_listed_with_their_types(runtime: &dyn WasmRuntime<FixtureState>) {
    use runtime_api::{ExternKind, FunctionType};
    let name = runtime.name();
    let module = SHARED.compile(runtime);
    let imports: Vec<(&str, &str, &ExternKind)> = module
        .imports()
        .iter()
        .map(|i| (i.module.as_str(), i.name.as_str(), &i.kind))
        .collect();
    let function = |params: &[ValType], results: &[ValType]| {
        ExternKind::Function(FunctionType {
            params: params.to_vec(),
            results: results.to_vec(),
        })
    };
    use ValType::{I32, I64};
    assert_eq!(
        imports,
        [
            ("env", "record", &function(&[I32, I64], &[I32])),
            ("env", "allocate_and_write", &function(&[], &[I32])),
            ("env", "exit", &function(&[I32], &[])),
        ],
        "{name}"
    );
    let mut exports: Vec<(&str, &ExternKind)> = module
        .exports()
        .iter()
        .map(|e| (e.name.as_str(), &e.kind))
        .collect();
    exports.sort_by_key(|(export, _)| *export);
    assert_eq!(
        exports,
        [
            ("add64", &function(&[I64, I64], &[I64])),
            ("allocate", &function(&[I32], &[I32])),
            ("call_allocate", &function(&[], &[I32])),
            ("call_record", &function(&[I32], &[I32])),
            ("exit_with", &function(&[I32], &[])),
            ("grow", &function(&[I32], &[I32])),
            ("memory", &ExternKind::Memory),
            ("mix", &function(&[I32, I64, I32], &[I64])),
            ("read", &function(&[I32], &[I64])),
            ("spin", &function(&[], &[])),
            ("trap", &function(&[], &[])),
        ],
        "{name}"
    );
}

/// One linked module instantiates on several threads at once, each instance with its own state,
/// and runs calls in both directions there.
pub fn one_linked_module_instantiates_on_many_threads(runtime: &dyn WasmRuntime<FixtureState>) {
    let name = runtime.name();
    let linked = SHARED.link(runtime);
    let threads: Vec<_> = (0..4u64)
        .map(|i| {
            let linked = linked.clone();
            std::thread::spawn(move || {
                let mut instance = linked
                    .instantiate(FixtureState::default())
                    .unwrap_or_else(|e| panic!("{name}: instantiate: {e}"));
                instance.state().allocator = instance.function("allocate");
                let record = instance
                    .function("call_record")
                    .expect("export call_record");
                let call_allocate = instance.function("call_allocate").expect("export");
                for _ in 0..100 {
                    instance
                        .call(record, &[i], &mut [0])
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                }
                instance
                    .call(call_allocate, &[], &mut [0])
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                instance.state().seen[0]
            })
        })
        .collect();
    let seen: Vec<u64> = threads
        .into_iter()
        .map(|thread| thread.join().expect("the thread finished"))
        .collect();
    assert_eq!(seen, [0, 1, 2, 3], "{name}");
}
