//! `wasm-smith` configured for Proxy-Wasm plugins: generated modules may import exactly the
//! host functions of ABI 0.2.1 (WASI included) and must export the ABI marker, the allocator,
//! a linear memory and the callbacks, so that they load as plugins and their generated code
//! calls the host.

use std::sync::OnceLock;

use abi::AbiVersion;
use arbitrary::{Arbitrary, Result, Unstructured};
use runtime_api::Signature;
use runtime_api::ValType::I32;
use wasm_encoder::{
    CodeSection, ExportKind, ExportSection, Function, FunctionSection, ImportSection,
    MemorySection, MemoryType, Module, TypeSection,
};

/// A plugin module drawn from `input`: generated with [`config`], its loops bounded so that
/// the fuzzer spends its time on the host rather than on the deadline (which other tests
/// cover).
pub fn module(input: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let mut module = wasm_smith::Module::new(config(input)?, input)?;
    module
        .ensure_termination(10_000)
        .map_err(|_| arbitrary::Error::IncorrectFormat)?;
    Ok(module.to_bytes())
}

/// A swarm-testing configuration drawn from `input`, narrowed to what a Proxy-Wasm plugin is:
/// 32-bit memory, no threads, the features SDKs emit, the host's imports and the ABI's
/// exports.
pub fn config(input: &mut Unstructured<'_>) -> Result<wasm_smith::Config> {
    let mut config = wasm_smith::Config::arbitrary(input)?;
    config.available_imports = Some(imports().to_vec());
    config.exports = Some(exports().to_vec());
    // What the SDKs emit and every engine runs (MVP, bulk memory, multi-value, sign
    // extension, saturating conversions): proposals some engines do not enable would only
    // exercise their loaders' refusals, which `module_bytes` covers.
    config.memory64_enabled = false;
    config.threads_enabled = false;
    config.shared_everything_threads_enabled = false;
    config.compact_imports_enabled = false;
    config.gc_enabled = false;
    config.exceptions_enabled = false;
    config.simd_enabled = false;
    config.relaxed_simd_enabled = false;
    config.tail_call_enabled = false;
    config.wide_arithmetic_enabled = false;
    config.custom_page_sizes_enabled = false;
    config.extended_const_enabled = false;
    // Typed function references come with them in wasm-smith, and wasmtime refuses those
    // without GC.
    config.reference_types_enabled = false;
    config.max_memories = 1;
    config.max_memory32_bytes = config.max_memory32_bytes.min(64 << 20);
    config.max_instructions = config.max_instructions.min(1_000);
    Ok(config)
}

/// A module importing every host function.
fn imports() -> &'static [u8] {
    static IMPORTS: OnceLock<Vec<u8>> = OnceLock::new();
    IMPORTS.get_or_init(|| {
        let mut types = TypeSection::new();
        let mut imports = ImportSection::new();
        crate::import_host_functions(&mut types, &mut imports);
        let mut module = Module::new();
        module.section(&types).section(&imports);
        module.finish()
    })
}

/// A module exporting what a plugin must: the ABI marker, its allocator, a memory and every
/// callback of the ABI.
fn exports() -> &'static [u8] {
    static EXPORTS: OnceLock<Vec<u8>> = OnceLock::new();
    EXPORTS.get_or_init(|| {
        let mut types = TypeSection::new();
        let mut functions = FunctionSection::new();
        let mut code = CodeSection::new();
        let mut exports = ExportSection::new();
        let mut unreachable = Function::new([]);
        unreachable.instructions().unreachable().end();
        let abi = AbiVersion::V0_2_1;
        let allocator = ("proxy_on_memory_allocate", Signature::new(&[I32], &[I32]));
        let marker = ("proxy_abi_version_0_2_1", Signature::new(&[], &[]));
        let every = [marker, allocator]
            .into_iter()
            .chain(abi::callback_exports(abi));
        for (index, (name, signature)) in every.enumerate() {
            crate::declare_type(&mut types, signature);
            functions.function(index as u32);
            code.function(&unreachable);
            exports.export(name, ExportKind::Func, index as u32);
        }
        let mut memories = MemorySection::new();
        memories.memory(MemoryType {
            minimum: 1,
            maximum: None,
            memory64: false,
            shared: false,
            page_size_log2: None,
        });
        exports.export("memory", ExportKind::Memory, 0);
        let mut module = Module::new();
        module
            .section(&types)
            .section(&functions)
            .section(&memories)
            .section(&exports)
            .section(&code);
        module.finish()
    })
}
