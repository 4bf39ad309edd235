//! What V8's C++ API does not tell about a module, read from its bytes: its imports and exports
//! with their types; whether it has a shared memory, which is refused; and the limits V8 cannot
//! set per instance, written into the module before it is compiled: the memory cap, and a bound
//! on its tables.
//!
//! These bytes come from plugin authors, so a malformed module must be an error, never a panic.
//! `wasmparser` reads them: it splits the sections (skipping function bodies by their size) and
//! decodes the ones involved (types, imports, functions, tables, memories, exports). A rewritten
//! section is encoded by `wasm-encoder` and spliced in where the old one was; every other section
//! stays byte-identical.

use std::borrow::Cow;

use runtime_api::binary::{
    bound_tables, collect_section, malformed, only_section, reencoding, sections, splice,
};
use runtime_api::{Export, ExternKind, FunctionType, Import, ValType};
use wasm_encoder::reencode::{Reencode, RoundtripReencoder};
use wasmparser::{CompositeInnerType, ExternalKind, Payload, SubType, TypeRef};

/// The most pages a 32-bit memory can have in V8 10.2 (4 GiB); a larger maximum is invalid.
const V8_MAX_MEMORY_PAGES: u64 = 65536;

/// The size of a WebAssembly page.
pub(crate) const PAGE_SIZE: u64 = 65536;

/// A module ready for V8, with the limits it needs written in.
pub(crate) struct Prepared<'a> {
    /// The module to compile (rewritten if a limit required it).
    pub(crate) bytes: Cow<'a, [u8]>,
    /// The initial size in pages of a memory that alone exceeds the memory cap.
    pub(crate) memory_too_large: Option<u64>,
}

/// Why [`prepare`] refused a module.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The bytes are malformed where `prepare` reads them (V8 can tell how more precisely).
    Malformed(String),
    /// The module is well-formed, but uses what this engine does not run.
    Unsupported(String),
}

impl From<String> for Refused {
    fn from(reason: String) -> Self {
        Refused::Malformed(reason)
    }
}

/// Refuses a module with a shared memory, then writes the memory cap (if any) and the table
/// budget into `wasm`.
pub(crate) fn prepare(wasm: &[u8], max_memory_bytes: Option<u64>) -> Result<Prepared<'_>, Refused> {
    refuse_shared_memories(wasm)?;
    let mut prepared = Prepared {
        bytes: Cow::Borrowed(wasm),
        memory_too_large: None,
    };
    if let Some(max) = max_memory_bytes {
        match cap_memories(&prepared.bytes, max)? {
            Capped::Unchanged => {}
            Capped::Rewritten(bytes) => prepared.bytes = Cow::Owned(bytes),
            Capped::MinimumTooLarge { pages } => prepared.memory_too_large = Some(pages),
        }
    }
    if let Some(bytes) = bound_tables(&prepared.bytes)? {
        prepared.bytes = Cow::Owned(bytes);
    }
    Ok(prepared)
}

/// Refuses bytes that do not even start like a module, in the words other engines use (V8's
/// would be "expected magic word 00 61 73 6d, found …"). A prefix of the magic word passes: V8
/// says better that the module is truncated.
pub(crate) fn check_magic(wasm: &[u8]) -> Result<(), String> {
    if wasm.is_empty() || wasm.iter().zip(b"\0asm").any(|(byte, magic)| byte != magic) {
        return Err("magic header not detected".into());
    }
    Ok(())
}

/// A module's imports and exports, in declaration order.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Interface {
    pub(crate) imports: Vec<Import>,
    pub(crate) exports: Vec<Export>,
}

/// Reads the imports and exports of a module V8 has already validated.
pub(crate) fn interface(wasm: &[u8]) -> Result<Interface, String> {
    let mut types: Vec<FunctionType> = Vec::new();
    // The type index of every function, imported ones first.
    let mut functions: Vec<u32> = Vec::new();
    let mut interface = Interface::default();
    for section in sections(wasm)? {
        match section.payload {
            Payload::TypeSection(reader) => {
                for group in reader {
                    for ty in group.map_err(malformed)?.into_types() {
                        types.push(function_type(ty)?);
                    }
                }
            }
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.map_err(malformed)?;
                    let kind = match import.ty {
                        TypeRef::Func(index) | TypeRef::FuncExact(index) => {
                            functions.push(index);
                            ExternKind::Function(type_at(&types, index)?)
                        }
                        TypeRef::Table(_) => ExternKind::Table,
                        TypeRef::Memory(_) => ExternKind::Memory,
                        TypeRef::Global(_) => ExternKind::Global,
                        TypeRef::Tag(_) => ExternKind::Other,
                    };
                    interface.imports.push(Import {
                        module: import.module.into(),
                        name: import.name.into(),
                        kind,
                    });
                }
            }
            Payload::FunctionSection(reader) => {
                for type_index in reader {
                    functions.push(type_index.map_err(malformed)?);
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export = export.map_err(malformed)?;
                    let kind = match export.kind {
                        ExternalKind::Func | ExternalKind::FuncExact => {
                            let index = export.index;
                            let type_index = functions
                                .get(index as usize)
                                .copied()
                                .ok_or_else(|| format!("export of unknown function {index}"))?;
                            ExternKind::Function(type_at(&types, type_index)?)
                        }
                        ExternalKind::Table => ExternKind::Table,
                        ExternalKind::Memory => ExternKind::Memory,
                        ExternalKind::Global => ExternKind::Global,
                        ExternalKind::Tag => ExternKind::Other,
                    };
                    interface.exports.push(Export {
                        name: export.name.into(),
                        kind,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(interface)
}

/// Refuses a module that defines or imports a shared memory. Only WebAssembly threads use one,
/// and V8 runs them with its threads feature off (see `platform.rs`); the check here says why in
/// words, where V8 would only report invalid limits flags.
fn refuse_shared_memories(wasm: &[u8]) -> Result<(), Refused> {
    // Memories are numbered imports first, as the sections come.
    let mut index = 0u32;
    for section in sections(wasm)? {
        let memories = match section.payload {
            Payload::ImportSection(reader) => reader
                .into_imports()
                .filter_map(|import| match import {
                    Ok(import) => match import.ty {
                        TypeRef::Memory(memory) => Some(Ok(memory)),
                        _ => None,
                    },
                    Err(error) => Some(Err(error)),
                })
                .collect::<Result<Vec<_>, _>>(),
            Payload::MemorySection(reader) => reader.into_iter().collect(),
            _ => continue,
        }
        .map_err(malformed)?;
        for memory in memories {
            if memory.shared {
                return Err(Refused::Unsupported(format!(
                    "memory {index} is shared, and the V8 engine does not run WebAssembly \
                     threads: a guest waiting on a shared memory uses no CPU time, so no call \
                     deadline could stop it"
                )));
            }
            index += 1;
        }
    }
    Ok(())
}

/// What capping a module's memories did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Capped {
    /// No memory needed a lower maximum.
    Unchanged,
    /// The module with every defined memory's maximum lowered to the cap.
    Rewritten(Vec<u8>),
    /// A memory's initial size alone exceeds the cap: instances must not be created.
    MinimumTooLarge {
        /// The memory's initial size in pages.
        pages: u64,
    },
}

/// Lowers the maximum of every memory the module defines to `max_bytes` (rounded down to whole
/// pages), so that `memory.grow` beyond it fails in the guest. Imported memories are left alone:
/// no Proxy-Wasm host provides one, so linking rejects them anyway.
pub(crate) fn cap_memories(wasm: &[u8], max_bytes: u64) -> Result<Capped, String> {
    let cap = (max_bytes / PAGE_SIZE).min(V8_MAX_MEMORY_PAGES);
    let Some((range, reader)) = only_section(wasm, "memory", |payload| match payload {
        Payload::MemorySection(reader) => Some(reader),
        _ => None,
    })?
    else {
        return Ok(Capped::Unchanged);
    };
    let memories = collect_section(reader)?;
    if let Some(too_large) = memories.iter().find(|memory| memory.initial > cap) {
        return Ok(Capped::MinimumTooLarge {
            pages: too_large.initial,
        });
    }
    if memories
        .iter()
        .all(|memory| memory.maximum.is_some_and(|max| max <= cap))
    {
        return Ok(Capped::Unchanged);
    }
    let mut section = wasm_encoder::MemorySection::new();
    for memory in memories {
        let maximum = memory.maximum.map_or(cap, |max| max.min(cap));
        // Everything else about the memory (flags, page size) is kept as it was.
        let mut memory = RoundtripReencoder.memory_type(memory).map_err(reencoding)?;
        memory.maximum = Some(maximum);
        section.memory(memory);
    }
    splice(wasm, range, &section).map(Capped::Rewritten)
}

/// The function type at `index` of the type section.
fn type_at(types: &[FunctionType], index: u32) -> Result<FunctionType, String> {
    types
        .get(index as usize)
        .cloned()
        .ok_or_else(|| format!("unknown function type {index}"))
}

/// A type section entry as a function type: V8 10.2 runs no other kind (struct and array types
/// come with garbage collection, an experimental flag).
fn function_type(ty: SubType) -> Result<FunctionType, String> {
    let CompositeInnerType::Func(function) = &ty.composite_type.inner else {
        return Err(format!("unsupported type {ty}"));
    };
    Ok(FunctionType {
        params: function.params().iter().map(val_type).collect(),
        results: function.results().iter().map(val_type).collect(),
    })
}

/// The host's view of a value type: only numbers are told apart, since only they cross the
/// Proxy-Wasm ABI.
fn val_type(ty: &wasmparser::ValType) -> ValType {
    match ty {
        wasmparser::ValType::I32 => ValType::I32,
        wasmparser::ValType::I64 => ValType::I64,
        wasmparser::ValType::F32 => ValType::F32,
        wasmparser::ValType::F64 => ValType::F64,
        wasmparser::ValType::V128 | wasmparser::ValType::Ref(_) => ValType::Other,
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use super::*;

    fn wasm(text: &str) -> Vec<u8> {
        wat::parse_str(text).unwrap()
    }

    /// The range of the module's memory section, id and size included.
    fn memory_section_range(wasm: &[u8]) -> Range<usize> {
        sections(wasm)
            .unwrap()
            .into_iter()
            .find(|section| matches!(section.payload, Payload::MemorySection(_)))
            .unwrap()
            .range
    }

    /// The content of the module's memory section: what follows its id and size.
    fn memory_section_content(wasm: &[u8]) -> &[u8] {
        let range = sections(wasm)
            .unwrap()
            .into_iter()
            .find_map(|section| match section.payload {
                Payload::MemorySection(reader) => Some(reader.range()),
                _ => None,
            })
            .unwrap();
        &wasm[range.start as usize..range.end as usize]
    }

    #[test]
    fn imports_and_exports_are_listed_with_their_types() {
        let module = wasm(
            r#"(module
                 (type (func (param i32 i64) (result i32)))
                 (import "env" "f" (func (type 0)))
                 (import "env" "m" (memory 1))
                 (func (export "g") (param f32) (result f64) f64.const 0)
                 (global (export "x") i32 (i32.const 0))
                 (export "f_again" (func 0)))"#,
        );
        let interface = interface(&module).unwrap();
        let f = FunctionType {
            params: vec![ValType::I32, ValType::I64],
            results: vec![ValType::I32],
        };
        assert_eq!(
            interface.imports,
            vec![
                Import {
                    module: "env".into(),
                    name: "f".into(),
                    kind: ExternKind::Function(f.clone()),
                },
                Import {
                    module: "env".into(),
                    name: "m".into(),
                    kind: ExternKind::Memory,
                },
            ]
        );
        let g = FunctionType {
            params: vec![ValType::F32],
            results: vec![ValType::F64],
        };
        assert_eq!(
            interface.exports,
            vec![
                Export {
                    name: "g".into(),
                    kind: ExternKind::Function(g),
                },
                Export {
                    name: "x".into(),
                    kind: ExternKind::Global,
                },
                Export {
                    name: "f_again".into(),
                    kind: ExternKind::Function(f),
                },
            ]
        );
    }

    #[test]
    fn bytes_that_are_not_a_module_fail_the_magic_check() {
        assert!(check_magic(b"not wasm").is_err());
        assert!(check_magic(b"").is_err());
        assert!(
            check_magic(b"\0as").is_ok(),
            "truncated: left to V8 to describe"
        );
        assert!(check_magic(b"\0asm\x01\0\0\0").is_ok());
    }

    #[test]
    fn malformed_modules_are_errors() {
        assert!(interface(b"").is_err());
        assert!(interface(b"\0asm\x01\0\0\0\x07\x05\x01").is_err());
        // An export section claiming 2^32-1 exports in two bytes.
        assert!(interface(b"\0asm\x01\0\0\0\x07\x05\xff\xff\xff\xff\x0f").is_err());
        // A LEB128 number with too many bytes.
        assert!(interface(b"\0asm\x01\0\0\0\x01\x80\x80\x80\x80\x80\x01").is_err());
    }

    #[test]
    fn memories_get_the_cap_as_their_maximum() {
        let module = wasm(r#"(module (memory (export "memory") 1) (func (export "f")))"#);
        let Capped::Rewritten(capped) = cap_memories(&module, 3 * PAGE_SIZE + 100).unwrap() else {
            panic!("expected a rewrite");
        };
        // One memory, flags 1 (has a maximum), minimum 1, maximum 3.
        assert_eq!(memory_section_content(&capped), &[1, 1, 1, 3]);
        // The rest of the module is unchanged.
        assert_eq!(interface(&capped).unwrap(), interface(&module).unwrap());
    }

    #[test]
    fn memories_within_the_cap_are_left_alone() {
        let module = wasm(r#"(module (memory 1 2))"#);
        assert_eq!(
            cap_memories(&module, 2 * PAGE_SIZE).unwrap(),
            Capped::Unchanged
        );
        let lower = wasm(r#"(module (memory 1 4))"#);
        assert!(matches!(
            cap_memories(&lower, 2 * PAGE_SIZE).unwrap(),
            Capped::Rewritten(_)
        ));
        let no_memory = wasm(r#"(module)"#);
        assert_eq!(cap_memories(&no_memory, 0).unwrap(), Capped::Unchanged);
    }

    #[test]
    fn shared_memories_are_refused_as_unsupported() {
        for (text, index) in [
            (r#"(module (memory 1 1 shared))"#, 0),
            (
                r#"(module (import "env" "f" (func)) (import "env" "m" (memory 1 1 shared)))"#,
                0,
            ),
            (
                r#"(module (import "env" "m" (memory 1)) (memory 1 1 shared))"#,
                1,
            ),
        ] {
            match prepare(&wasm(text), None) {
                Err(Refused::Unsupported(reason)) => {
                    assert!(
                        reason.starts_with(&format!("memory {index} is shared")),
                        "{reason}"
                    )
                }
                _ => panic!("{text}: not refused as unsupported"),
            }
        }
        assert!(prepare(&wasm(r#"(module (memory 1 1))"#), None).is_ok());
        // A memory section cut short is malformed, not unsupported.
        assert!(matches!(
            prepare(b"\0asm\x01\0\0\0\x05\x01\x01", None),
            Err(Refused::Malformed(_))
        ));
    }

    #[test]
    fn a_minimum_above_the_cap_is_reported() {
        let module = wasm(r#"(module (memory 5))"#);
        assert_eq!(
            cap_memories(&module, 2 * PAGE_SIZE).unwrap(),
            Capped::MinimumTooLarge { pages: 5 }
        );
    }

    #[test]
    fn a_rewrite_leaves_every_other_section_byte_identical() {
        let module = wasm(
            r#"(module
                 (type (func (param i32) (result i32)))
                 (import "env" "f" (func (type 0)))
                 (memory (export "memory") 2)
                 (func (export "g") (type 0) local.get 0 call 0)
                 (data (i32.const 8) "hello")
                 (@custom "notes" "kept as is"))"#,
        );
        let Capped::Rewritten(capped) = cap_memories(&module, 5 * PAGE_SIZE).unwrap() else {
            panic!("expected a rewrite");
        };
        let (old, new) = (memory_section_range(&module), memory_section_range(&capped));
        assert_eq!(new.start, old.start);
        assert_eq!(capped[..new.start], module[..old.start]);
        assert_eq!(capped[new.end..], module[old.end..]);
        // One memory, flags 1, minimum 2, maximum 5.
        assert_eq!(memory_section_content(&capped), &[1, 1, 2, 5]);
    }

    #[test]
    fn memory_limits_are_32_bit_numbers() {
        let header = b"\0asm\x01\0\0\0";
        // A maximum of 2^32 pages: too large for the 32 bits V8 reads; capping it must not turn
        // the module into one V8 accepts.
        let too_large = [
            header.as_slice(),
            b"\x05\x08\x01\x01\x01\x80\x80\x80\x80\x10",
        ]
        .concat();
        // A minimum of 1 in six bytes, one more than a 32-bit number may take.
        let too_long = [
            header.as_slice(),
            b"\x05\x08\x01\x00\x81\x80\x80\x80\x80\x00",
        ]
        .concat();
        for module in [too_large, too_long] {
            assert!(cap_memories(&module, PAGE_SIZE).is_err());
            assert!(matches!(
                prepare(&module, Some(PAGE_SIZE)),
                Err(Refused::Malformed(_))
            ));
        }
    }

    #[test]
    fn components_are_not_modules() {
        let component = b"\0asm\x0d\0\x01\0";
        assert!(interface(component).is_err());
        assert!(matches!(
            prepare(component, None),
            Err(Refused::Malformed(_))
        ));
    }

    #[test]
    fn damaged_modules_are_errors_not_panics() {
        let module = wasm(
            r#"(module
                 (type (func (param i32 i64) (result i32)))
                 (import "env" "f" (func (type 0)))
                 (import "env" "t" (table 1 funcref))
                 (table 2 externref)
                 (memory (export "memory") 1 3)
                 (global (export "x") i32 (i32.const 7))
                 (func (export "g") (type 0) local.get 0 local.get 1 call 0)
                 (data (i32.const 8) "hello"))"#,
        );
        let mut damaged = module.clone();
        for len in 0..module.len() {
            let cut = &module[..len];
            let _ = prepare(cut, Some(PAGE_SIZE));
            let _ = interface(cut);
            damaged[len] ^= 0xff;
            let _ = prepare(&damaged, Some(PAGE_SIZE));
            let _ = interface(&damaged);
            damaged[len] ^= 0xff;
        }
    }
}
