//! Plugins made to fuzz the host functions.
//!
//! A [`HostCallPlugin`] imports every host function of ABI 0.2.1 (WASI included), starts
//! with a memory image the fuzzer chooses, and has callbacks that each call a fuzzed sequence
//! of host functions with fuzzed arguments: pointers into and out of memory, lengths, enum
//! values, the callback's own context id. Its allocator misbehaves as the fuzzer chooses
//! (out-of-bounds, zero or overlapping pointers, growing memory under the host, trapping,
//! calling the host back), since every reply of a host call goes through it.

use abi::AbiVersion;
use arbitrary::{Arbitrary, Unstructured};
use runtime_api::{Signature, ValType};
use wasm_encoder::{
    BlockType, CodeSection, ConstExpr, DataSection, ExportKind, ExportSection, Function,
    FunctionSection, GlobalSection, GlobalType, ImportSection, InstructionSink, MemorySection,
    MemoryType, Module, TypeSection,
};

/// The most memory image a plugin starts with (the first page).
const MAX_IMAGE: usize = 1 << 16;
/// The most callbacks a plugin plans (as many as the ABI has).
const MAX_CALLBACKS: usize = 25;
/// The most host calls one callback makes, so that one input stays quick.
const MAX_CALLS: usize = 32;
/// Where the well-behaved allocators start handing out memory (above the image).
const HEAP_START: i32 = 1 << 16;

/// A fuzzed plugin; [`HostCallPlugin::to_wasm`] makes the module.
#[derive(Debug)]
pub struct HostCallPlugin {
    /// Initial memory in pages, 1 to 4 (the image lies in the first).
    pub pages: u8,
    /// How the plugin's allocator behaves.
    pub allocator: Allocator,
    /// What the callbacks do; the first plan for a callback counts.
    pub callbacks: Vec<CallbackPlan>,
    /// The bytes at address 0 (at most 64 KiB).
    pub image: Vec<u8>,
}

// By hand rather than derived: a derived `Vec` ends at each element with even odds, so random
// inputs would make plugins of one or two calls; these draw their counts up to the limits.
impl<'a> Arbitrary<'a> for HostCallPlugin {
    fn arbitrary(input: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let pages = input.arbitrary()?;
        let allocator = input.arbitrary()?;
        let callbacks = several(input, 1, MAX_CALLBACKS)?;
        let image = input.bytes(input.len().min(MAX_IMAGE))?.to_vec();
        Ok(HostCallPlugin {
            pages,
            allocator,
            callbacks,
            image,
        })
    }
}

/// Between `min` and `max` values drawn from `input`, the count drawn first.
fn several<'a, T: Arbitrary<'a>>(
    input: &mut Unstructured<'a>,
    min: usize,
    max: usize,
) -> arbitrary::Result<Vec<T>> {
    let count = input.int_in_range(min..=max)?;
    (0..count).map(|_| input.arbitrary()).collect()
}

/// How the plugin's allocator (`proxy_on_memory_allocate`) behaves.
#[derive(Arbitrary, Debug)]
pub enum Allocator {
    /// Hands out memory above the image, growing memory when it runs out.
    Bump,
    /// Always this address: out of bounds, zero, or overlapping what the host reads.
    Fixed(u32),
    /// Grows memory by a page on every call, then bumps: the memory moves under the host.
    Grow,
    /// Traps.
    Trap,
    /// Calls a host function (by index, with zero arguments) before bumping: the host must
    /// refuse the re-entry.
    Reenter(u16),
}

/// What one callback does.
#[derive(Debug)]
pub struct CallbackPlan {
    /// Which callback (an index into the ABI's callbacks).
    pub callback: u8,
    /// The host calls it makes, in order (at most 32).
    pub calls: Vec<HostCall>,
    /// What it returns, if it returns anything (an action, a bool, or a value neither knows).
    pub result: u8,
}

impl<'a> Arbitrary<'a> for CallbackPlan {
    fn arbitrary(input: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let callback = input.arbitrary()?;
        let result = input.arbitrary()?;
        let calls = several(input, 0, MAX_CALLS)?;
        Ok(CallbackPlan {
            callback,
            calls,
            result,
        })
    }
}

/// One host call.
#[derive(Arbitrary, Debug)]
pub struct HostCall {
    /// Which host function (an index into the ABI's table).
    pub function: u16,
    /// Its arguments (as many as it takes are used).
    pub args: [Argument; 12],
}

/// Where an argument comes from.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Argument {
    /// Any value.
    Any(i64),
    /// A small value: enum values, short lengths.
    Small(u8),
    /// An address inside the image.
    Image(u16),
    /// The callback's context id (its first parameter).
    Context,
}

impl HostCallPlugin {
    /// How many host calls the plugin's callbacks make if none ends early (a trap, or a
    /// callback the traffic never reaches, ends a plan early).
    pub fn planned_calls(&self) -> usize {
        let callbacks = abi::callback_exports(AbiVersion::V0_2_1).count();
        self.plans(callbacks)
            .map(|(_, plan)| plan.calls.len())
            .sum()
    }

    /// The plans that count, with the index of their callback among `callbacks`: the first
    /// plan for each.
    fn plans(&self, callbacks: usize) -> impl Iterator<Item = (usize, &CallbackPlan)> {
        let mut planned = vec![false; callbacks];
        self.callbacks.iter().filter_map(move |plan| {
            let which = usize::from(plan.callback) % callbacks;
            (!std::mem::replace(&mut planned[which], true)).then_some((which, plan))
        })
    }

    /// The module: every host function imported, memory with the image, the allocator, the
    /// ABI marker and one export per planned callback.
    pub fn to_wasm(&self) -> Vec<u8> {
        let host = abi::host_functions(AbiVersion::V0_2_1);
        let callbacks: Vec<_> = abi::callback_exports(AbiVersion::V0_2_1).collect();
        let mut types = TypeSection::new();
        let mut imports = ImportSection::new();
        let imported = crate::import_host_functions(&mut types, &mut imports);
        let mut next_type = imported;
        let mut add_type = |types: &mut TypeSection, signature: Signature| {
            crate::declare_type(types, signature);
            next_type += 1;
            next_type - 1
        };

        let mut functions = FunctionSection::new();
        let mut code = CodeSection::new();
        let mut exports = ExportSection::new();
        exports.export("memory", ExportKind::Memory, 0);

        // The ABI marker.
        let marker = add_type(&mut types, Signature::new(&[], &[]));
        functions.function(marker);
        let mut body = Function::new([]);
        body.instructions().end();
        code.function(&body);
        exports.export("proxy_abi_version_0_2_1", ExportKind::Func, imported);

        // The allocator.
        let allocator = add_type(&mut types, Signature::new(&[ValType::I32], &[ValType::I32]));
        functions.function(allocator);
        code.function(&self.allocator_body(host));
        exports.export("proxy_on_memory_allocate", ExportKind::Func, imported + 1);

        // The callbacks, each once, as the functions after the marker and the allocator.
        for (function, (which, plan)) in (imported + 2..).zip(self.plans(callbacks.len())) {
            let (name, signature) = callbacks[which];
            functions.function(add_type(&mut types, signature));
            code.function(&plan.body(host, !signature.results.is_empty()));
            exports.export(name, ExportKind::Func, function);
        }

        let mut memories = MemorySection::new();
        memories.memory(MemoryType {
            minimum: u64::from(self.pages % 4 + 1),
            maximum: None,
            memory64: false,
            shared: false,
            page_size_log2: None,
        });
        let mut globals = GlobalSection::new();
        globals.global(
            GlobalType {
                val_type: wasm_encoder::ValType::I32,
                mutable: true,
                shared: false,
            },
            &ConstExpr::i32_const(HEAP_START),
        );
        let mut data = DataSection::new();
        let image = &self.image[..self.image.len().min(MAX_IMAGE)];
        data.active(0, &ConstExpr::i32_const(0), image.iter().copied());

        let mut module = Module::new();
        module
            .section(&types)
            .section(&imports)
            .section(&functions)
            .section(&memories)
            .section(&globals)
            .section(&exports)
            .section(&code)
            .section(&data);
        module.finish()
    }

    fn allocator_body(&self, host: &[runtime_api::HostFunction<abi::VmState>]) -> Function {
        let mut body = Function::new([]);
        let mut sink = body.instructions();
        match self.allocator {
            Allocator::Fixed(address) => {
                sink.i32_const(address as i32);
            }
            Allocator::Trap => {
                sink.unreachable();
            }
            Allocator::Bump => bump(&mut sink),
            Allocator::Grow => {
                sink.i32_const(1).memory_grow(0).drop();
                bump(&mut sink);
            }
            Allocator::Reenter(function) => {
                let index = usize::from(function) % host.len();
                for param in host[index].signature.params {
                    push_constant(&mut sink, *param, 0);
                }
                sink.call(index as u32);
                for _ in host[index].signature.results {
                    sink.drop();
                }
                bump(&mut sink);
            }
        }
        sink.end();
        body
    }
}

impl CallbackPlan {
    fn body(&self, host: &[runtime_api::HostFunction<abi::VmState>], result: bool) -> Function {
        let mut body = Function::new([]);
        let mut sink = body.instructions();
        for call in &self.calls {
            let index = usize::from(call.function) % host.len();
            let signature = host[index].signature;
            for (param, argument) in signature.params.iter().zip(call.args) {
                match argument {
                    Argument::Any(value) => push_constant(&mut sink, *param, value),
                    Argument::Small(value) => push_constant(&mut sink, *param, value.into()),
                    Argument::Image(address) => push_constant(&mut sink, *param, address.into()),
                    Argument::Context => {
                        sink.local_get(0);
                        if *param == ValType::I64 {
                            sink.i64_extend_i32_u();
                        }
                    }
                }
            }
            sink.call(index as u32);
            for _ in signature.results {
                sink.drop();
            }
        }
        if result {
            // Any value, the ABI's actions and the ones it does not define.
            sink.i32_const(i32::from(self.result));
        }
        sink.end();
        body
    }
}

/// A bump allocator over global 0, growing memory when the block would pass its end (and
/// handing out the block anyway if it cannot: the host must check the pointer it gets).
fn bump(sink: &mut InstructionSink<'_>) {
    sink.global_get(0)
        .local_get(0)
        .i32_add()
        .memory_size(0)
        .i32_const(16)
        .i32_shl()
        .i32_gt_u()
        .if_(BlockType::Empty)
        .local_get(0)
        .i32_const(16)
        .i32_shr_u()
        .i32_const(1)
        .i32_add()
        .memory_grow(0)
        .drop()
        .end();
    sink.global_get(0)
        .global_get(0)
        .local_get(0)
        .i32_add()
        .global_set(0);
}

/// Pushes `value` as a constant of type `ty`.
fn push_constant(sink: &mut InstructionSink<'_>, ty: ValType, value: i64) {
    match ty {
        ValType::I64 => sink.i64_const(value),
        ValType::F32 => sink.f32_const((value as f32).into()),
        ValType::F64 => sink.f64_const((value as f64).into()),
        ValType::I32 | ValType::Other => sink.i32_const(value as i32),
    };
}
