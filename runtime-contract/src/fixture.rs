//! The fixture that the checks of this crate and the engines' own tests share: a host state, host
//! functions that record their arguments and call back into the guest, and a module importing
//! them, written once so that every engine is tested against the same guest.
//!
//! An engine's tests that need more (a host function of a shape only that engine treats apart, an
//! export only they call) describe it in a [`Fixture`] of their own, added to [`SHARED`]; what
//! stays in the engine's file is only what is particular to that engine.

use std::sync::Arc;

use runtime_api::{
    Caller, CompiledModule, GuestFunction, HostFunction, Instance, InterruptHandle, LinkedModule,
    Signature, Trap, ValType, WasmRuntime,
};

/// The host state of the fixture: what host functions saw, and the guest functions they call
/// back.
#[derive(Default)]
pub struct FixtureState {
    /// The arguments host functions received, in order.
    pub seen: Vec<u64>,
    /// The guest's allocator, which `env.allocate_and_write` calls ([`Fixture::instance`] sets it
    /// to the module's `allocate`).
    pub allocator: Option<GuestFunction>,
    /// The guest function other host functions call back: that of [`REENTER`] and [`CALL_SPIN`],
    /// or of an engine test's own host function.
    pub callee: Option<GuestFunction>,
    /// Entries into [`REENTER`].
    pub entries: u32,
    /// The instance's interrupt handle, for host functions that interrupt their own call.
    pub interrupt: Option<Arc<dyn InterruptHandle>>,
}

/// `env.record`, `(i32, i64) -> i32`: keeps its arguments and returns 7.
fn record(caller: &mut dyn Caller<FixtureState>, args: &mut [u64]) -> Result<(), Trap> {
    caller.state().seen.extend_from_slice(&args[..2]);
    args[0] = 7;
    Ok(())
}

/// `env.allocate_and_write`, `() -> i32`: allocates 8 bytes through the guest (whose allocator
/// grows memory) and writes a marker there, through a view of memory taken after the call.
fn allocate_and_write(caller: &mut dyn Caller<FixtureState>, args: &mut [u64]) -> Result<(), Trap> {
    let allocate = caller
        .state()
        .allocator
        .ok_or_else(|| Trap::host("no allocator"))?;
    let mut pointer = [0];
    caller.call(allocate, &[8], &mut pointer)?;
    caller
        .memory()
        .write(pointer[0], b"written!")
        .map_err(|e| Trap::host(e.to_string()))?;
    args[0] = pointer[0];
    Ok(())
}

/// `env.exit`, `(i32) -> ()`: asks to exit with its argument.
fn exit(_caller: &mut dyn Caller<FixtureState>, args: &mut [u64]) -> Result<(), Trap> {
    Err(Trap::exit(args[0] as i32))
}

/// Calls [`FixtureState::callee`] with no arguments, as the host functions that call back a
/// guest function other than the allocator do.
fn call_callee(caller: &mut dyn Caller<FixtureState>, results: &mut [u64]) -> Result<(), Trap> {
    let callee = caller
        .state()
        .callee
        .ok_or_else(|| Trap::host("no callee"))?;
    caller.call(callee, &[], results)
}

/// `env.reenter`, `() -> i32`: counts an entry and calls [`FixtureState::callee`], which calls
/// this again (a guest recursing through the host); returns the depth reached below it.
fn reenter(caller: &mut dyn Caller<FixtureState>, args: &mut [u64]) -> Result<(), Trap> {
    caller.state().entries += 1;
    let mut depth = [0];
    call_callee(caller, &mut depth)?;
    args[0] = depth[0] + 1;
    Ok(())
}

/// `env.call_spin`, `() -> ()`: calls [`FixtureState::callee`], a guest function that never
/// returns by itself, so what stops it has to reach into a nested call.
fn call_spin(caller: &mut dyn Caller<FixtureState>, _args: &mut [u64]) -> Result<(), Trap> {
    call_callee(caller, &mut [])
}

/// `env.panics`, `() -> ()`: a host function with a bug.
fn panics(_caller: &mut dyn Caller<FixtureState>, _args: &mut [u64]) -> Result<(), Trap> {
    panic!("a host function bug");
}

/// The host functions the shared module imports: `env.record`, `env.allocate_and_write` and
/// `env.exit`.
pub static HOST: &[HostFunction<FixtureState>] = &[
    HostFunction {
        module: "env",
        name: "record",
        signature: Signature::new(&[ValType::I32, ValType::I64], &[ValType::I32]),
        callback: record,
    },
    HostFunction {
        module: "env",
        name: "allocate_and_write",
        signature: Signature::new(&[], &[ValType::I32]),
        callback: allocate_and_write,
    },
    HostFunction {
        module: "env",
        name: "exit",
        signature: Signature::new(&[ValType::I32], &[]),
        callback: exit,
    },
];

/// `env.reenter`, `() -> i32`, for modules that recurse through the host: several engines stop
/// such recursion themselves, and each must stop it before the native stack runs out.
pub const REENTER: HostFunction<FixtureState> = HostFunction {
    module: "env",
    name: "reenter",
    signature: Signature::new(&[], &[ValType::I32]),
    callback: reenter,
};

/// `env.call_spin`, `() -> ()`, for modules whose spinning guest code runs inside a host
/// function: a deadline or interrupt must stop the nested call too.
pub const CALL_SPIN: HostFunction<FixtureState> = HostFunction {
    module: "env",
    name: "call_spin",
    signature: Signature::new(&[], &[]),
    callback: call_spin,
};

/// `env.panics`, `() -> ()`, for modules calling a host function that panics: the engines differ
/// in what they make of the panic, but none may lose the process to it.
pub const PANICS: HostFunction<FixtureState> = HostFunction {
    module: "env",
    name: "panics",
    signature: Signature::new(&[], &[]),
    callback: panics,
};

/// The imports of the shared module; a [`Fixture`]'s own follow them (the text format puts
/// imports before definitions).
const IMPORTS: &str = r#"
  (import "env" "record" (func $record (param i32 i64) (result i32)))
  (import "env" "allocate_and_write" (func $allocate_and_write (result i32)))
  (import "env" "exit" (func $exit (param i32)))"#;

/// The definitions of the shared module; a [`Fixture`]'s own follow them.
const DEFINITIONS: &str = r#"
  (memory (export "memory") 1)
  ;; Every allocation grows memory by a page and returns the start of the new page, so the host
  ;; must look at memory afresh after calling it.
  (func (export "allocate") (param $size i32) (result i32)
    (i32.mul (memory.grow (i32.const 1)) (i32.const 65536)))
  (func (export "call_record") (param $a i32) (result i32)
    (call $record (local.get $a) (i64.const -1)))
  (func (export "call_allocate") (result i32) (call $allocate_and_write))
  (func (export "exit_with") (param $code i32) (call $exit (local.get $code)))
  (func (export "grow") (param $pages i32) (result i32) (memory.grow (local.get $pages)))
  (func (export "spin") (loop $forever (br $forever)))
  (func (export "trap") unreachable)
  (func (export "add64") (param i64 i64) (result i64) (i64.add (local.get 0) (local.get 1)))
  ;; zext(a) + 2b + (zext(c) << 32): each slot's type and bits show in the result.
  (func (export "mix") (param $a i32) (param $b i64) (param $c i32) (result i64)
    (i64.add
      (i64.add (i64.extend_i32_u (local.get $a)) (i64.shl (local.get $b) (i64.const 1)))
      (i64.shl (i64.extend_i32_u (local.get $c)) (i64.const 32))))
  (func (export "read") (param i32) (result i64) (i64.load (local.get 0)))"#;

/// The shared module and host functions, with what one engine's tests add to them: the shared
/// part stays written once however many engines extend it.
pub struct Fixture {
    /// Imports added after the shared ones, in the text format.
    pub imports: &'static str,
    /// Functions (or other definitions) added after the shared ones, in the text format.
    pub functions: &'static str,
    /// The host functions behind `imports`, added to [`HOST`].
    pub host: &'static [HostFunction<FixtureState>],
}

/// The shared fixture alone, for the checks of this crate and the engines whose tests need
/// nothing more.
pub const SHARED: Fixture = Fixture {
    imports: "",
    functions: "",
    host: &[],
};

impl Fixture {
    /// The module in the text format. Besides what the fixture adds, it imports [`HOST`] and
    /// exports `memory` (one page), `allocate` (`(i32) -> i32`: grows memory by a page and
    /// returns the new page), `call_record` (`(i32) -> i32`: calls `env.record` with its argument
    /// and -1), `call_allocate` (`() -> i32`: calls `env.allocate_and_write`), `exit_with`
    /// (`(i32) -> ()`: calls `env.exit`), `grow` (`memory.grow`), `spin` (loops forever), `trap`
    /// (`unreachable`), `add64` (`(i64, i64) -> i64`), `mix` (`(i32, i64, i32) -> i64`: `a + 2b +
    /// (c << 32)`, the `i32`s unsigned) and `read` (the `i64` at an address).
    pub fn module(&self) -> String {
        format!(
            "(module{IMPORTS}{}{DEFINITIONS}{})",
            self.imports, self.functions
        )
    }

    /// [`HOST`] followed by the fixture's own host functions.
    pub fn host(&self) -> Vec<HostFunction<FixtureState>> {
        [HOST, self.host].concat()
    }

    /// The module compiled on `runtime`.
    pub fn compile(
        &self,
        runtime: &dyn WasmRuntime<FixtureState>,
    ) -> Arc<dyn CompiledModule<FixtureState>> {
        compile(runtime, &self.module())
    }

    /// The module compiled on `runtime` and linked against [`Fixture::host`].
    pub fn link(
        &self,
        runtime: &dyn WasmRuntime<FixtureState>,
    ) -> Arc<dyn LinkedModule<FixtureState>> {
        let name = runtime.name();
        self.compile(runtime)
            .link(&self.host())
            .unwrap_or_else(|e| panic!("{name}: link: {e}"))
    }

    /// A new instance of the linked module, with [`FixtureState::allocator`] set to its
    /// `allocate`.
    pub fn instance(
        &self,
        runtime: &dyn WasmRuntime<FixtureState>,
    ) -> Box<dyn Instance<FixtureState>> {
        let name = runtime.name();
        let mut instance = self
            .link(runtime)
            .instantiate(FixtureState::default())
            .unwrap_or_else(|e| panic!("{name}: instantiate: {e}"));
        instance.state().allocator = instance.function("allocate");
        instance
    }
}

/// Compiles `wat` (a module in the text format) on `runtime`; a failure panics naming the engine,
/// so that a test says where it broke without unwrapping.
pub fn compile(
    runtime: &dyn WasmRuntime<FixtureState>,
    wat: &str,
) -> Arc<dyn CompiledModule<FixtureState>> {
    let name = runtime.name();
    let wasm = wat::parse_str(wat).expect("the module is valid text");
    runtime
        .compile(&wasm)
        .unwrap_or_else(|e| panic!("{name}: compile: {e}"))
}

/// Instantiates `wat` on `runtime`, linked against `host`, with a fresh state (and no function
/// looked up yet, so the instance's handles are numbered in the order its user asks for them).
pub fn instantiate(
    runtime: &dyn WasmRuntime<FixtureState>,
    wat: &str,
    host: &[HostFunction<FixtureState>],
) -> Box<dyn Instance<FixtureState>> {
    let name = runtime.name();
    compile(runtime, wat)
        .link(host)
        .unwrap_or_else(|e| panic!("{name}: link: {e}"))
        .instantiate(FixtureState::default())
        .unwrap_or_else(|e| panic!("{name}: instantiate: {e}"))
}
