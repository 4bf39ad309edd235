//! Checks of the [`runtime_api`] contract that hold on every engine, written once and run by each
//! engine crate's own tests against that engine (`runtime-*/tests/engine.rs`). Each check panics
//! with a message naming the engine when the engine breaks the contract.
//!
//! Engine-specific behaviour (how deadlines are enforced, what is precompiled) stays in the
//! engine's own tests; what a hostile guest must not be able to do to any host lives here.

use std::sync::Arc;

use runtime_api::{
    Caller, CompiledModule, GuestFunction, HostFunction, Instance, RuntimeConfig, Signature, Trap,
    TrapKind, ValType, WasmRuntime, WasmTrapCode,
};

/// The host state of these checks: how often the host function ran, and the guest function it
/// calls back.
#[derive(Default)]
pub struct State {
    /// Entries into the `reenter` host function.
    pub entries: u32,
    /// The guest function `reenter` calls.
    pub callee: Option<GuestFunction>,
}

/// Instantiates `wat` on `runtime`, linked against `host`.
fn instantiate(
    runtime: &dyn WasmRuntime<State>,
    wat: &str,
    host: &[HostFunction<State>],
) -> Box<dyn Instance<State>> {
    let name = runtime.name();
    let wasm = wat::parse_str(wat).expect("the check's module is valid text");
    let module: Arc<dyn CompiledModule<State>> = runtime
        .compile(&wasm)
        .unwrap_or_else(|e| panic!("{name}: compile: {e}"));
    module
        .link(host)
        .unwrap_or_else(|e| panic!("{name}: link: {e}"))
        .instantiate(State::default())
        .unwrap_or_else(|e| panic!("{name}: instantiate: {e}"))
}

/// A handle is only good on the instance that gave it out: one of another instance, at an index
/// this instance uses for a function of another type, is refused as a bad call (engines that
/// trusted the index would call with the wrong number of values).
pub fn handles_of_another_instance_are_refused(runtime: &dyn WasmRuntime<State>) {
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
pub fn tables_cannot_grow_without_bound(runtime: &dyn WasmRuntime<State>) {
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

/// Calls the guest's `enter` (kept in [`State::callee`]), which calls this again.
fn reenter(caller: &mut dyn Caller<State>, _args: &mut [u64]) -> Result<(), Trap> {
    caller.state().entries += 1;
    let enter = caller
        .state()
        .callee
        .ok_or_else(|| Trap::host("no callee"))?;
    caller.call(enter, &[], &mut [])
}

/// A guest recursing through a host function (the allocator calling a host function that calls
/// the allocator …) is stopped with a stack-overflow trap after eight nested levels, before the
/// native stack runs out; the count is of levels in progress, so the next call nests as deep.
pub fn guest_calls_from_host_functions_nest_at_most_eight_levels(runtime: &dyn WasmRuntime<State>) {
    let name = runtime.name();
    let host = [HostFunction {
        module: "env",
        name: "reenter",
        signature: Signature::new(&[], &[]),
        callback: reenter,
    }];
    let mut instance = instantiate(
        runtime,
        r#"(module
             (import "env" "reenter" (func $reenter))
             (func (export "enter") (call $reenter)))"#,
        &host,
    );
    let enter = instance.function("enter").expect("export enter");
    instance.state().callee = Some(enter);
    for round in ["first", "second"] {
        instance.state().entries = 0;
        let error = instance.call(enter, &[], &mut []).unwrap_err();
        assert_eq!(
            error,
            Trap::wasm(WasmTrapCode::StackOverflow),
            "{name}, {round} call"
        );
        assert_eq!(
            instance.state().entries,
            9,
            "{name}, {round} call: the top-level call and eight nested ones reached the host"
        );
    }
}

/// With [`RuntimeConfig::max_memory_bytes`] set, `memory.grow` fails (returns -1) past the cap,
/// however much is asked, and a module whose initial memory is already above the cap does not
/// instantiate. `make` creates the engine with the configuration given.
pub fn the_memory_cap_makes_memory_grow_fail<R: WasmRuntime<State>>(
    make: impl Fn(RuntimeConfig) -> R,
) {
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
    let mut grow_by = |pages: u64, instance: &mut Box<dyn Instance<State>>| {
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
        grow_by(1, &mut instance),
        -1,
        "{name}: growing past it returns -1"
    );
    assert_eq!(
        grow_by(0x7fff_ffff, &mut instance),
        -1,
        "{name}: so does a huge growth"
    );
    assert_eq!(instance.memory_size() as u64, 2 * PAGE, "{name}");
    let above = wat::parse_str("(module (memory (export \"memory\") 3))").expect("valid text");
    let module: Arc<dyn CompiledModule<State>> = runtime
        .compile(&above)
        .unwrap_or_else(|e| panic!("{name}: compile: {e}"));
    let linked = module
        .link(&[])
        .unwrap_or_else(|e| panic!("{name}: link: {e}"));
    assert!(
        matches!(
            linked.instantiate(State::default()),
            Err(runtime_api::Error::Instantiation(_))
        ),
        "{name}: an initial memory above the cap is refused"
    );
}

/// A host function these checks link against: `env.answer`, `(i32, i64) -> i32`.
fn answer(_caller: &mut dyn Caller<State>, args: &mut [u64]) -> Result<(), Trap> {
    args[0] = 42;
    Ok(())
}

/// Linking and compiling fail with errors that say what is wrong: an import the host does not
/// have names it, one with another signature is a mismatch, an imported memory is unsupported,
/// and bytes that are not a module are an invalid module.
pub fn bad_modules_and_imports_fail_with_errors_that_say_why(runtime: &dyn WasmRuntime<State>) {
    use runtime_api::Error;
    let name = runtime.name();
    let host = [HostFunction {
        module: "env",
        name: "answer",
        signature: Signature::new(&[ValType::I32, ValType::I64], &[ValType::I32]),
        callback: answer,
    }];
    let link = |wat: &str| {
        let wasm = wat::parse_str(wat).expect("valid text");
        let module: Arc<dyn CompiledModule<State>> = runtime
            .compile(&wasm)
            .unwrap_or_else(|e| panic!("{name}: compile: {e}"));
        module.link(&host).err()
    };
    let error = link(r#"(module (import "env" "nope" (func)))"#);
    assert!(
        matches!(&error, Some(Error::UnknownImport { name, .. }) if name == "nope"),
        "{name}: {error:?}"
    );
    let error = link(r#"(module (import "env" "answer" (func (param i32))))"#);
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
        let result: Result<Arc<dyn CompiledModule<State>>, _> = runtime.compile(bytes);
        assert!(
            matches!(result, Err(Error::InvalidModule(_))),
            "{name}: {bytes:?}"
        );
    }
}

/// A host function that asks to exit with its argument: `env.exit`, `(i32) -> ()`.
fn exit(_caller: &mut dyn Caller<State>, args: &mut [u64]) -> Result<(), Trap> {
    Err(Trap::exit(args[0] as i32))
}

/// Every kind of WebAssembly trap comes back with its canonical code (the same words on every
/// engine), a host function's own trap comes back unchanged, and the instance stays usable after
/// each, a stack overflow included.
///
/// `indistinct` lists the codes an engine cannot tell apart from others (V8 words a NaN
/// conversion and an out-of-range one alike, and a null entry and a signature mismatch alike):
/// those must still be WebAssembly traps, in the engine's own words.
pub fn traps_have_canonical_codes_and_leave_the_instance_usable(
    runtime: &dyn WasmRuntime<State>,
    indistinct: &[WasmTrapCode],
) {
    let name = runtime.name();
    let host = [HostFunction {
        module: "env",
        name: "exit",
        signature: Signature::new(&[ValType::I32], &[]),
        callback: exit,
    }];
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
        &host,
    );
    let divide = instance.function("divide").expect("export divide");
    let still_usable = |instance: &mut Box<dyn Instance<State>>, after: &str| {
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
