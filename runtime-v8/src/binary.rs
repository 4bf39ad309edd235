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
use std::ops::Range;

use runtime_api::{Export, ExternKind, FunctionType, Import, ValType};
use wasm_encoder::reencode::{Reencode, RoundtripReencoder};
use wasmparser::{
    Chunk, CompositeInnerType, Encoding, ExternalKind, Parser, Payload, SubType, TypeRef,
    WasmFeatures,
};

/// The most pages a 32-bit memory can have in V8 10.2 (4 GiB); a larger maximum is invalid.
const V8_MAX_MEMORY_PAGES: u64 = 65536;

/// The size of a WebAssembly page.
pub(crate) const PAGE_SIZE: u64 = 65536;

/// The most table entries one instance may ever have, all tables together: V8's own limit for
/// one table (80 MB of JS heap). Tables live on the isolate's JS heap, and growing one is a single
/// runtime call that no termination interrupts, so a module with many tables could otherwise
/// exhaust the process's memory before its deadline or the heap limit could stop it.
const TABLE_ENTRY_BUDGET: u64 = 10_000_000;

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

/// Keeps the tables of one instance within [`TABLE_ENTRY_BUDGET`] entries: refuses a module whose
/// tables start larger, and when it has several tables, lowers each one's maximum to its initial
/// size plus an equal share of the rest of the budget. One table needs nothing: V8's own limit
/// for a table is the budget. Returns the rewritten module, or `None` if nothing changed.
fn bound_tables(wasm: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let Some((range, reader)) = only_section(wasm, "table", |payload| match payload {
        Payload::TableSection(reader) => Some(reader),
        _ => None,
    })?
    else {
        return Ok(None);
    };
    let tables = collect_section(reader)?;
    let initial = tables
        .iter()
        .fold(0u64, |sum, table| sum.saturating_add(table.ty.initial));
    if initial > TABLE_ENTRY_BUDGET {
        return Err(format!(
            "the module's tables start with {initial} entries, more than the {TABLE_ENTRY_BUDGET} \
             an instance may have"
        ));
    }
    if tables.len() < 2 {
        return Ok(None);
    }
    let share = (TABLE_ENTRY_BUDGET - initial) / tables.len() as u64;
    let bounded = |ty: &wasmparser::TableType| {
        let most = ty.initial + share;
        ty.maximum.map_or(most, |max| max.min(most))
    };
    if tables
        .iter()
        .all(|table| table.ty.maximum == Some(bounded(&table.ty)))
    {
        return Ok(None);
    }
    let mut section = wasm_encoder::TableSection::new();
    for mut table in tables {
        table.ty.maximum = Some(bounded(&table.ty));
        // Element type, flags and any initializer are kept as they were.
        RoundtripReencoder
            .parse_table(&mut section, table)
            .map_err(reencoding)?;
    }
    splice(wasm, range, &section).map(Some)
}

/// The one section `pick` selects (a memory or table section), with the bytes it spans; `None`
/// if the module has none. The rewrites replace a single section, so a second one is an error
/// (`wasmparser` reports it as out of order before this could see it, but the rewrite must not
/// depend on that).
fn only_section<'a, T>(
    wasm: &'a [u8],
    what: &str,
    pick: impl Fn(Payload<'a>) -> Option<T>,
) -> Result<Option<(Range<usize>, T)>, String> {
    let mut found = None;
    for section in sections(wasm)? {
        if let Some(reader) = pick(section.payload) {
            if found.is_some() {
                return Err(format!("more than one {what} section"));
            }
            found = Some((section.range, reader));
        }
    }
    Ok(found)
}

/// Every entry of a memory or table section; an error if one is malformed or if bytes follow
/// the last.
fn collect_section<'a, T: wasmparser::FromReader<'a>>(
    reader: wasmparser::SectionLimited<'a, T>,
) -> Result<Vec<T>, String> {
    reader
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(malformed)
}

/// `wasm` with the bytes of one section (`range`, its id and size included) replaced by
/// `section`.
fn splice(
    wasm: &[u8],
    range: Range<usize>,
    section: &impl wasm_encoder::Section,
) -> Result<Vec<u8>, String> {
    let (Some(before), Some(after)) = (wasm.get(..range.start), wasm.get(range.end..)) else {
        return Err("section outside the module".into());
    };
    let mut rewritten = Vec::with_capacity(wasm.len() + 16);
    rewritten.extend_from_slice(before);
    section.append_to(&mut rewritten);
    rewritten.extend_from_slice(after);
    Ok(rewritten)
}

/// One section of a module, as `wasmparser` found it.
struct Section<'a> {
    /// The section, its entries not yet decoded.
    payload: Payload<'a>,
    /// Where the whole section (id and size included) lies in the module.
    range: Range<usize>,
}

/// Splits a WebAssembly 1.0 module into its sections, in order, except the code section, which is
/// skipped by its size: nothing here reads function bodies.
fn sections(wasm: &[u8]) -> Result<Vec<Section<'_>>, String> {
    const TRUNCATED: &str = "unexpected end of module";
    let mut parser = Parser::new(0);
    // V8 10.2 runs no 64-bit memories (memory64 is an experimental flag, off), and without the
    // feature wasmparser reads every memory or table limit as a 32-bit number, as V8 reads a
    // 32-bit memory's. A limit that does not fit in 32 bits is then malformed; read as 64 bits,
    // it would be capped into a module V8 accepts. (V8 refuses a memory flagged 64-bit anyway.)
    parser.set_features(WasmFeatures::all().difference(WasmFeatures::MEMORY64));
    let mut sections = Vec::new();
    let mut offset = 0usize;
    loop {
        let rest = wasm.get(offset..).ok_or(TRUNCATED)?;
        // `eof` is true: the whole module is here, so a section cut short is an error, never a
        // request for more data.
        let Chunk::Parsed { consumed, payload } = parser.parse(rest, true).map_err(malformed)?
        else {
            return Err(TRUNCATED.into());
        };
        let start = offset;
        offset += consumed;
        match payload {
            Payload::Version { encoding, .. } => {
                if encoding != Encoding::Module {
                    return Err("not a WebAssembly 1.0 module".into());
                }
            }
            Payload::CodeSectionStart { size, .. } => {
                parser.skip_section();
                offset = offset
                    .checked_add(size as usize)
                    .filter(|end| *end <= wasm.len())
                    .ok_or(TRUNCATED)?;
            }
            Payload::End(_) => return Ok(sections),
            payload => sections.push(Section {
                payload,
                range: start..offset,
            }),
        }
    }
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

/// A `wasmparser` error in words (with the offset it happened at).
fn malformed(error: wasmparser::BinaryReaderError) -> String {
    error.to_string()
}

/// A `wasm-encoder` error in words: a malformed table initializer, in practice, since the
/// reencoder reads those.
fn reencoding(error: wasm_encoder::reencode::Error) -> String {
    match error {
        wasm_encoder::reencode::Error::ParseError(error) => malformed(error),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
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

    /// The types of the module's defined tables.
    fn table_section(wasm: &[u8]) -> Vec<wasmparser::TableType> {
        sections(wasm)
            .unwrap()
            .into_iter()
            .find_map(|section| match section.payload {
                Payload::TableSection(reader) => Some(reader),
                _ => None,
            })
            .unwrap()
            .into_iter()
            .map(|table| table.unwrap().ty)
            .collect()
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
    fn several_tables_share_the_entry_budget() {
        let module = wasm(
            r#"(module (table 10 funcref) (table 0 20 funcref) (table 5 externref)
                 (func (export "f")))"#,
        );
        let prepared = prepare(&module, None).unwrap();
        let tables = table_section(&prepared.bytes);
        assert_eq!(tables.len(), 3);
        let share = (TABLE_ENTRY_BUDGET - 15) / 3;
        let maxima: Vec<_> = tables.iter().map(|table| table.maximum).collect();
        assert_eq!(maxima, vec![Some(10 + share), Some(20), Some(5 + share)]);
        assert_eq!(
            interface(&prepared.bytes).unwrap(),
            interface(&module).unwrap()
        );
    }

    #[test]
    fn one_table_is_left_to_v8s_own_limit() {
        let module = wasm(r#"(module (table 10 funcref))"#);
        assert!(matches!(
            prepare(&module, None).unwrap().bytes,
            Cow::Borrowed(_)
        ));
        let huge = wasm(r#"(module (table 6000000 funcref) (table 6000000 funcref))"#);
        assert!(prepare(&huge, None).is_err());
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
    fn bounded_tables_keep_their_element_types() {
        let module = wasm(r#"(module (table 1 funcref) (table 2 3 externref))"#);
        let prepared = prepare(&module, None).unwrap();
        let before = table_section(&module);
        let after = table_section(&prepared.bytes);
        assert_eq!(before.len(), after.len());
        for (before, after) in before.iter().zip(&after) {
            assert_eq!(before.element_type, after.element_type);
            assert_eq!(before.initial, after.initial);
        }
        assert_eq!(after[1].maximum, Some(3));
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
