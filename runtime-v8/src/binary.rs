//! What V8's C++ API does not tell about a module, read from its bytes: its imports and exports
//! with their types; whether it has a shared memory, which is refused; and the limits V8 cannot
//! set per instance, written into the module before it is compiled: the memory cap, and a bound
//! on its tables.
//!
//! Only the sections involved are decoded (types, imports, functions, tables, memories,
//! exports); every other section is skipped by its size. Every read is bounds-checked and a
//! malformed module is an error, never a panic: these bytes come from plugin authors.

use std::borrow::Cow;

use runtime_api::{Export, ExternKind, FunctionType, Import, ValType};

const TYPE_SECTION: u8 = 1;
const IMPORT_SECTION: u8 = 2;
const FUNCTION_SECTION: u8 = 3;
const TABLE_SECTION: u8 = 4;
const MEMORY_SECTION: u8 = 5;
const EXPORT_SECTION: u8 = 7;

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
/// would be "expected magic word 00 61 73 6d, found …").
pub(crate) fn check_magic(wasm: &[u8]) -> Result<(), String> {
    let magic = b"\0asm";
    let prefix = &wasm[..wasm.len().min(magic.len())];
    if prefix.is_empty() || prefix != &magic[..prefix.len()] {
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
    let mut types: Vec<Option<FunctionType>> = Vec::new();
    // The type index of every function, imported ones first.
    let mut functions: Vec<u32> = Vec::new();
    let mut interface = Interface::default();
    for section in sections(wasm)? {
        let mut reader = Reader::new(section.content);
        match section.id {
            TYPE_SECTION => {
                for _ in 0..reader.count()? {
                    types.push(Some(function_type(&mut reader)?));
                }
            }
            IMPORT_SECTION => {
                for _ in 0..reader.count()? {
                    let module = reader.name()?;
                    let name = reader.name()?;
                    let kind = match reader.byte()? {
                        0x00 => {
                            let index = reader.u32()?;
                            functions.push(index);
                            ExternKind::Function(type_at(&types, index)?)
                        }
                        0x01 => {
                            reader.val_type()?;
                            reader.limits()?;
                            ExternKind::Table
                        }
                        0x02 => {
                            reader.limits()?;
                            ExternKind::Memory
                        }
                        0x03 => {
                            reader.val_type()?;
                            reader.byte()?;
                            ExternKind::Global
                        }
                        0x04 => {
                            reader.byte()?;
                            reader.u32()?;
                            ExternKind::Other
                        }
                        other => return Err(format!("unknown import kind {other:#x}")),
                    };
                    interface.imports.push(Import { module, name, kind });
                }
            }
            FUNCTION_SECTION => {
                for _ in 0..reader.count()? {
                    functions.push(reader.u32()?);
                }
            }
            EXPORT_SECTION => {
                for _ in 0..reader.count()? {
                    let name = reader.name()?;
                    let kind = reader.byte()?;
                    let index = reader.u32()?;
                    let kind = match kind {
                        0x00 => {
                            let type_index = functions
                                .get(index as usize)
                                .copied()
                                .ok_or_else(|| format!("export of unknown function {index}"))?;
                            ExternKind::Function(type_at(&types, type_index)?)
                        }
                        0x01 => ExternKind::Table,
                        0x02 => ExternKind::Memory,
                        0x03 => ExternKind::Global,
                        _ => ExternKind::Other,
                    };
                    interface.exports.push(Export { name, kind });
                }
            }
            _ => {}
        }
    }
    Ok(interface)
}

/// Refuses a module that defines or imports a shared memory (limits flag bit 1). Only WebAssembly
/// threads use one, and V8 runs them with its threads feature off (see `platform.rs`); the check
/// here says why in words, where V8 would only report invalid limits flags.
fn refuse_shared_memories(wasm: &[u8]) -> Result<(), Refused> {
    const SHARED: u8 = 0x02;
    // Memories are numbered imports first, as the sections come.
    let mut index = 0u32;
    for section in sections(wasm)? {
        let mut reader = Reader::new(section.content);
        let mut memories = Vec::new();
        match section.id {
            IMPORT_SECTION => {
                for _ in 0..reader.count()? {
                    reader.name()?;
                    reader.name()?;
                    match reader.byte()? {
                        0x00 => {
                            reader.u32()?;
                        }
                        0x01 => {
                            reader.val_type()?;
                            reader.limits()?;
                        }
                        0x02 => memories.push(reader.limits()?),
                        0x03 => {
                            reader.val_type()?;
                            reader.byte()?;
                        }
                        0x04 => {
                            reader.byte()?;
                            reader.u32()?;
                        }
                        other => return Err(format!("unknown import kind {other:#x}").into()),
                    }
                }
            }
            MEMORY_SECTION => {
                for _ in 0..reader.count()? {
                    memories.push(reader.limits()?);
                }
            }
            _ => continue,
        }
        for memory in memories {
            if memory.flags & SHARED != 0 {
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
    let all = sections(wasm)?;
    let mut memory_sections = all.iter().filter(|s| s.id == MEMORY_SECTION);
    let Some(section) = memory_sections.next() else {
        return Ok(Capped::Unchanged);
    };
    if memory_sections.next().is_some() {
        return Err("more than one memory section".into());
    }
    let mut reader = Reader::new(section.content);
    let count = reader.count()?;
    let mut memories = Vec::with_capacity(count.min(16) as usize);
    for _ in 0..count {
        memories.push(reader.limits()?);
    }
    if !reader.is_empty() {
        return Err("trailing bytes in the memory section".into());
    }
    if let Some(too_large) = memories.iter().find(|m| m.min > cap) {
        return Ok(Capped::MinimumTooLarge {
            pages: too_large.min,
        });
    }
    if memories.iter().all(|m| m.max.is_some_and(|max| max <= cap)) {
        return Ok(Capped::Unchanged);
    }
    let mut content = Vec::with_capacity(section.content.len() + 8 * memories.len());
    write_leb(&mut content, u64::from(count));
    for memory in &memories {
        write_limits(
            &mut content,
            memory,
            memory.max.map_or(cap, |max| max.min(cap)),
        );
    }
    Ok(Capped::Rewritten(replace_section(wasm, section, &content)))
}

/// Keeps the tables of one instance within [`TABLE_ENTRY_BUDGET`] entries: refuses a module whose
/// tables start larger, and when it has several tables, lowers each one's maximum to its initial
/// size plus an equal share of the rest of the budget. One table needs nothing: V8's own limit
/// for a table is the budget. Returns the rewritten module, or `None` if nothing changed.
fn bound_tables(wasm: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let all = sections(wasm)?;
    let mut table_sections = all.iter().filter(|s| s.id == TABLE_SECTION);
    let Some(section) = table_sections.next() else {
        return Ok(None);
    };
    if table_sections.next().is_some() {
        return Err("more than one table section".into());
    }
    let mut reader = Reader::new(section.content);
    let count = reader.count()?;
    let mut tables = Vec::with_capacity(count.min(16) as usize);
    for _ in 0..count {
        let start = reader.position;
        reader.val_type()?;
        let element_type = &section.content[start..reader.position];
        tables.push((element_type, reader.limits()?));
    }
    if !reader.is_empty() {
        return Err("trailing bytes in the table section".into());
    }
    let initial = tables
        .iter()
        .fold(0u64, |sum, (_, limits)| sum.saturating_add(limits.min));
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
    let bounded = |limits: &Limits| {
        let most = limits.min + share;
        limits.max.map_or(most, |max| max.min(most))
    };
    if tables
        .iter()
        .all(|(_, limits)| limits.max == Some(bounded(limits)))
    {
        return Ok(None);
    }
    let mut content = Vec::with_capacity(section.content.len() + 8 * tables.len());
    write_leb(&mut content, u64::from(count));
    for (element_type, limits) in &tables {
        content.extend_from_slice(element_type);
        write_limits(&mut content, limits, bounded(limits));
    }
    Ok(Some(replace_section(wasm, section, &content)))
}

/// `limits` with maximum `max`.
fn write_limits(out: &mut Vec<u8>, limits: &Limits, max: u64) {
    out.push(limits.flags | 0x01);
    write_leb(out, limits.min);
    write_leb(out, max);
}

/// `wasm` with the content of `section` replaced by `content`.
fn replace_section(wasm: &[u8], section: &Section<'_>, content: &[u8]) -> Vec<u8> {
    let mut rewritten = Vec::with_capacity(wasm.len() + content.len() + 16);
    rewritten.extend_from_slice(&wasm[..section.start]);
    rewritten.push(section.id);
    write_leb(&mut rewritten, content.len() as u64);
    rewritten.extend_from_slice(content);
    rewritten.extend_from_slice(&wasm[section.end..]);
    rewritten
}

/// One section: its id, its content, and where the whole section (id included) lies.
struct Section<'a> {
    id: u8,
    content: &'a [u8],
    start: usize,
    end: usize,
}

fn sections(wasm: &[u8]) -> Result<Vec<Section<'_>>, String> {
    if wasm.len() < 8 || &wasm[..4] != b"\0asm" || wasm[4..8] != [1, 0, 0, 0] {
        return Err("not a WebAssembly 1.0 module".into());
    }
    let mut reader = Reader::new(wasm);
    reader.position = 8;
    let mut sections = Vec::new();
    while !reader.is_empty() {
        let start = reader.position;
        let id = reader.byte()?;
        let size = reader.u32()? as usize;
        let content = reader.take(size)?;
        sections.push(Section {
            id,
            content,
            start,
            end: reader.position,
        });
    }
    Ok(sections)
}

fn type_at(types: &[Option<FunctionType>], index: u32) -> Result<FunctionType, String> {
    types
        .get(index as usize)
        .cloned()
        .flatten()
        .ok_or_else(|| format!("unknown function type {index}"))
}

fn function_type(reader: &mut Reader<'_>) -> Result<FunctionType, String> {
    let form = reader.byte()?;
    if form != 0x60 {
        return Err(format!("unsupported type form {form:#x}"));
    }
    let mut ty = FunctionType::default();
    for _ in 0..reader.count()? {
        ty.params.push(reader.val_type()?);
    }
    for _ in 0..reader.count()? {
        ty.results.push(reader.val_type()?);
    }
    Ok(ty)
}

/// A memory's or table's limits as encoded.
struct Limits {
    flags: u8,
    min: u64,
    max: Option<u64>,
}

/// A bounds-checked cursor over a module's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, position: 0 }
    }

    fn is_empty(&self) -> bool {
        self.position >= self.bytes.len()
    }

    fn byte(&mut self) -> Result<u8, String> {
        let byte = *self
            .bytes
            .get(self.position)
            .ok_or("unexpected end of module")?;
        self.position += 1;
        Ok(byte)
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], String> {
        let end = self
            .position
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or("unexpected end of module")?;
        let taken = &self.bytes[self.position..end];
        self.position = end;
        Ok(taken)
    }

    /// An unsigned LEB128 number of at most `bits` bits.
    fn leb(&mut self, bits: u32) -> Result<u64, String> {
        let mut value: u64 = 0;
        let mut shift = 0;
        loop {
            let byte = self.byte()?;
            if shift >= bits || (shift > 0 && u64::from(byte & 0x7f) >> (bits - shift).min(63) != 0)
            {
                return Err("integer too large".into());
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
        }
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(self.leb(32)? as u32)
    }

    /// A vector length; bounded by the bytes left, since every element takes at least one byte.
    fn count(&mut self) -> Result<u32, String> {
        let count = self.u32()?;
        if count as usize > self.bytes.len() - self.position.min(self.bytes.len()) {
            return Err("vector longer than its section".into());
        }
        Ok(count)
    }

    fn name(&mut self) -> Result<String, String> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "name is not UTF-8".to_string())
    }

    fn val_type(&mut self) -> Result<ValType, String> {
        Ok(match self.byte()? {
            0x7f => ValType::I32,
            0x7e => ValType::I64,
            0x7d => ValType::F32,
            0x7c => ValType::F64,
            // v128, funcref, externref.
            0x7b | 0x70 | 0x6f => ValType::Other,
            // (ref ht) and (ref null ht): a heap type follows, as a signed LEB128 number.
            0x6b | 0x6c => {
                self.leb(64)?;
                ValType::Other
            }
            other => return Err(format!("unknown value type {other:#x}")),
        })
    }

    fn limits(&mut self) -> Result<Limits, String> {
        let flags = self.byte()?;
        // Bit 2: a 64-bit memory, whose limits may use 64 bits.
        let bits = if flags & 0x04 != 0 { 64 } else { 32 };
        let min = self.leb(bits)?;
        let max = if flags & 0x01 != 0 {
            Some(self.leb(bits)?)
        } else {
            None
        };
        Ok(Limits { flags, min, max })
    }
}

fn write_leb(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wasm(text: &str) -> Vec<u8> {
        wat::parse_str(text).unwrap()
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
        let sections = sections(&capped).unwrap();
        let memory = sections.iter().find(|s| s.id == MEMORY_SECTION).unwrap();
        // One memory, flags 1 (has a maximum), minimum 1, maximum 3.
        assert_eq!(memory.content, &[1, 1, 1, 3]);
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
        let sections = sections(&prepared.bytes).unwrap();
        let tables = sections.iter().find(|s| s.id == TABLE_SECTION).unwrap();
        let mut reader = Reader::new(tables.content);
        assert_eq!(reader.count().unwrap(), 3);
        let share = (TABLE_ENTRY_BUDGET - 15) / 3;
        let mut maxima = Vec::new();
        for _ in 0..3 {
            reader.val_type().unwrap();
            maxima.push(reader.limits().unwrap().max);
        }
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
}
