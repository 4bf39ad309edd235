//! Keeps WAMR from running guest code inside `wasm_runtime_instantiate`.
//!
//! WAMR runs a module's start function, and exports named `__post_instantiate` or
//! `__wasm_call_ctors`, while it instantiates, on an exec env of its own: no deadline, interrupt
//! or host-function context can reach that code, and running the constructors there differs from
//! every other engine (which run only the start function; `_initialize` runs the constructors).
//! So before loading, the module is rewritten:
//!
//! * its start section becomes an export under a reserved name, which the instance calls right
//!   after instantiation as an ordinary, watched call;
//! * the two names WAMR looks for are exported under reserved names instead, and mapped back
//!   when pwhost lists or looks up exports.
//!
//! `wasmparser` reads the module and `wasm-encoder` writes the new export section, which is
//! spliced in by the section ranges wasmparser reports: every other section is copied byte for
//! byte and function indices do not change, so the code, names and tables are untouched. A module
//! wasmparser cannot read is refused, not loaded unchanged: WAMR reads some that wasmparser
//! does not (a name over 100,000 bytes, a second start section), and would run their start
//! function out of every deadline's reach.

use std::borrow::Cow;
use std::ops::Range;

use wasm_encoder::{ExportSection, Section as _, SectionId};
use wasmparser::{Encoding, ExternalKind, Parser, Payload};

/// The exports WAMR calls by itself during instantiation (with bulk memory enabled and WAMR's
/// own WASI disabled, as pwhost builds it).
const AUTO_RUN: [&str; 2] = ["__post_instantiate", "__wasm_call_ctors"];

/// The id of the export section.
const EXPORT_SECTION: u8 = SectionId::Export as u8;
/// The id of the start section.
const START_SECTION: u8 = SectionId::Start as u8;

/// A module rewritten for WAMR.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Rewritten {
    /// The module to load.
    pub(crate) bytes: Vec<u8>,
    /// The export name of the former start function.
    pub(crate) start_export: Option<String>,
    /// `(original name, name in the rewritten module)` of every renamed export.
    pub(crate) renamed: Vec<(String, String)>,
}

/// Rewrites `wasm` if WAMR would run any of its code during instantiation; `None` if it would
/// not, in which case `wasm` is loaded as it is; an error (why) if wasmparser cannot read it.
pub(crate) fn rewrite(wasm: &[u8]) -> Result<Option<Rewritten>, String> {
    let module = read(wasm)?;
    let had_export_section = module.exports.is_some();
    let mut entries = module.exports.unwrap_or_default();
    let mut renamed = Vec::new();
    for index in 0..entries.len() {
        let Some(entry) = entries.get(index) else {
            break;
        };
        let auto_run = AUTO_RUN.contains(&&*entry.name);
        if entry.kind != ExternalKind::Func || !auto_run {
            continue;
        }
        let original = entry.name.to_string();
        // Checked against the names renamed so far too, so two reserved names never clash.
        let reserved = unique_name(&entries, &format!("pwhost:hoisted:{original}"));
        if let Some(entry) = entries.get_mut(index) {
            entry.name = Cow::Owned(reserved.clone());
        }
        renamed.push((original, reserved));
    }
    let mut start_export = None;
    if let Some(function) = module.start {
        let name = unique_name(&entries, "pwhost:start");
        entries.push(Export {
            name: Cow::Owned(name.clone()),
            kind: ExternalKind::Func,
            index: function,
        });
        start_export = Some(name);
    }
    if start_export.is_none() && renamed.is_empty() {
        return Ok(None);
    }
    let new_exports = export_section(&entries)
        .ok_or("its export section would outgrow the binary format's sizes")?;
    let mut bytes = Vec::with_capacity(wasm.len().saturating_add(new_exports.len()));
    bytes.extend_from_slice(wasm.get(..module.header_end).ok_or("no header")?);
    for section in &module.sections {
        match section.id {
            EXPORT_SECTION => bytes.extend_from_slice(&new_exports),
            // The export section comes right before the start section, so a module without one
            // gets it where its start section was.
            START_SECTION if !had_export_section => bytes.extend_from_slice(&new_exports),
            START_SECTION => {}
            _ => bytes.extend_from_slice(
                wasm.get(section.range.clone())
                    .ok_or("a section past the module's end")?,
            ),
        }
    }
    Ok(Some(Rewritten {
        bytes,
        start_export,
        renamed,
    }))
}

/// `base`, with apostrophes appended until no export has that name.
fn unique_name(entries: &[Export], base: &str) -> String {
    let mut name = base.to_string();
    while entries.iter().any(|e| e.name == name) {
        name.push('\'');
    }
    name
}

/// What the rewrite needs of a module.
struct Module<'a> {
    /// Where the header (magic number and version) ends and the first section starts.
    header_end: usize,
    /// Every top-level section, in order.
    sections: Vec<Section>,
    /// The export section's entries, if the module has one.
    exports: Option<Vec<Export<'a>>>,
    /// The start function, if the module has one.
    start: Option<u32>,
}

/// One top-level section.
struct Section {
    id: u8,
    /// The whole section: its id byte, size and payload.
    range: Range<usize>,
}

/// One export entry; its name is owned once renamed.
struct Export<'a> {
    name: Cow<'a, str>,
    kind: ExternalKind,
    index: u32,
}

/// Reads `wasm` with wasmparser; an error (why) if it is no core module wasmparser can read.
/// wasmparser refuses sections out of order, and with them a second export or start section.
fn read(wasm: &[u8]) -> Result<Module<'_>, String> {
    let mut module = Module {
        header_end: 0,
        sections: Vec::new(),
        exports: None,
        start: None,
    };
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(|error| error.to_string())?;
        // wasmparser reports a section's payload; sections are contiguous, so each one's id byte
        // and size start where the previous one (or the header) ends.
        if let Some((id, payload_range)) = payload.as_section() {
            let start = module
                .sections
                .last()
                .map_or(module.header_end, |s| s.range.end);
            let end = usize::try_from(payload_range.end).map_err(|e| e.to_string())?;
            module.sections.push(Section {
                id,
                range: start..end,
            });
        }
        match payload {
            // A component is no module WAMR loads.
            Payload::Version {
                encoding: Encoding::Module,
                range,
                ..
            } => module.header_end = usize::try_from(range.end).map_err(|e| e.to_string())?,
            Payload::Version { .. } => return Err("a component, not a core module".into()),
            Payload::ExportSection(reader) => {
                let mut entries = Vec::new();
                for export in reader {
                    let export = export.map_err(|error| error.to_string())?;
                    entries.push(Export {
                        name: Cow::Borrowed(export.name),
                        kind: export.kind,
                        index: export.index,
                    });
                }
                module.exports = Some(entries);
            }
            Payload::StartSection { func, .. } => module.start = Some(func),
            _ => {}
        }
    }
    Ok(module)
}

/// `entries` encoded as an export section, id byte and size included; `None` if the section
/// could outgrow the binary format's `u32` sizes (wasm-encoder asserts they fit).
fn export_section(entries: &[Export]) -> Option<Vec<u8>> {
    // At most 5 bytes for the count, and per entry 5 for the name's length, the name, 1 for the
    // kind and 5 for the index.
    let bound = entries.iter().try_fold(5_usize, |size, e| {
        size.checked_add(e.name.len())?.checked_add(11)
    })?;
    u32::try_from(bound).ok()?;
    let mut section = ExportSection::new();
    for entry in entries {
        section.export(&entry.name, entry.kind.into(), entry.index);
    }
    let mut bytes = Vec::new();
    section.append_to(&mut bytes);
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every top-level section of `wasm`.
    fn sections(wasm: &[u8]) -> Option<Vec<Section>> {
        read(wasm).ok().map(|module| module.sections)
    }

    /// The export names of `wasm`, in order.
    fn export_names(wasm: &[u8]) -> Vec<String> {
        read(wasm)
            .unwrap()
            .exports
            .unwrap()
            .into_iter()
            .map(|e| e.name.into_owned())
            .collect()
    }

    #[test]
    fn modules_without_start_or_auto_run_exports_are_unchanged() {
        let wasm = wat::parse_str(r#"(module (func (export "f")))"#).unwrap();
        assert_eq!(rewrite(&wasm), Ok(None));
    }

    #[test]
    fn the_start_function_becomes_an_export() {
        let wasm = wat::parse_str(r#"(module (func $s) (start $s))"#).unwrap();
        let rewritten = rewrite(&wasm).unwrap().unwrap();
        assert_eq!(rewritten.start_export.as_deref(), Some("pwhost:start"));
        assert_eq!(export_names(&rewritten.bytes), ["pwhost:start"]);
        assert!(sections(&rewritten.bytes)
            .unwrap()
            .iter()
            .all(|s| s.id != START_SECTION));
        assert_sections_parse(&rewritten.bytes);
    }

    #[test]
    fn auto_run_exports_are_renamed_without_clashing() {
        let wasm = wat::parse_str(
            r#"(module
                 (func $c (export "__wasm_call_ctors") (export "pwhost:hoisted:__wasm_call_ctors"))
                 (func $s (export "other"))
                 (start $s))"#,
        )
        .unwrap();
        let rewritten = rewrite(&wasm).unwrap().unwrap();
        assert_eq!(
            rewritten.renamed,
            [(
                "__wasm_call_ctors".to_string(),
                "pwhost:hoisted:__wasm_call_ctors'".to_string()
            )]
        );
        assert_eq!(
            export_names(&rewritten.bytes),
            [
                "pwhost:hoisted:__wasm_call_ctors'",
                "pwhost:hoisted:__wasm_call_ctors",
                "other",
                "pwhost:start"
            ]
        );
        assert_sections_parse(&rewritten.bytes);
    }

    #[test]
    fn truncated_or_invalid_modules_are_refused() {
        let wasm = wat::parse_str(r#"(module (func $s) (start $s))"#).unwrap();
        for len in 0..wasm.len() {
            // Must not panic; a prefix is either unparseable or has no start section yet.
            let _ = rewrite(&wasm[..len]);
        }
        assert!(rewrite(b"\0asm\x01\0\0\0\x08\x05\xff\xff\xff\xff\xff").is_err());
    }

    /// A module WAMR would read but wasmparser does not (here a custom section's name over
    /// wasmparser's 100,000 bytes) is refused: loaded unchanged, its start function would run
    /// inside WAMR's instantiation, where no deadline reaches.
    #[test]
    fn a_module_wasmparser_cannot_read_is_refused_with_why() {
        let mut wasm = wat::parse_str(r#"(module (func $s (loop (br 0))) (start $s))"#).unwrap();
        let name = vec![b'a'; 100_001];
        let mut payload = Vec::new();
        leb128(&mut payload, name.len() as u64);
        payload.extend_from_slice(&name);
        wasm.push(0);
        leb128(&mut wasm, payload.len() as u64);
        wasm.extend_from_slice(&payload);
        let error = rewrite(&wasm).unwrap_err();
        assert!(error.contains("string size out of bounds"), "{error}");
    }

    /// Appends `value` in unsigned LEB128.
    fn leb128(out: &mut Vec<u8>, mut value: u64) {
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

    #[test]
    fn every_other_section_is_copied_byte_for_byte() {
        let wasm = wat::parse_str(
            r#"(module
                 (import "env" "g" (func $g))
                 (memory (export "memory") 1)
                 (global $x (mut i32) (i32.const 7))
                 (func $c (export "__post_instantiate") (global.set $x (i32.const 1)))
                 (func $s (call $g))
                 (start $s)
                 (data (i32.const 8) "data")
                 (@custom "c" (after code) "custom"))"#,
        )
        .unwrap();
        let rewritten = rewrite(&wasm).unwrap().unwrap();
        let kept = |wasm: &[u8]| -> Vec<(u8, Vec<u8>)> {
            sections(wasm)
                .unwrap()
                .into_iter()
                .filter(|s| s.id != EXPORT_SECTION && s.id != START_SECTION)
                .map(|s| (s.id, wasm[s.range].to_vec()))
                .collect()
        };
        assert_eq!(kept(&wasm).len(), 9);
        assert_eq!(kept(&rewritten.bytes), kept(&wasm));
        assert_eq!(rewritten.bytes[..8], wasm[..8]);
        assert_eq!(
            export_names(&rewritten.bytes),
            [
                "memory",
                "pwhost:hoisted:__post_instantiate",
                "pwhost:start"
            ]
        );
        // The start function keeps its index: 2, after the import and `$c`.
        let exports = read(&rewritten.bytes).unwrap().exports.unwrap();
        let start = exports.iter().find(|e| e.name == "pwhost:start").unwrap();
        assert_eq!((start.kind, start.index), (ExternalKind::Func, 2));
        assert_sections_parse(&rewritten.bytes);
    }

    #[test]
    fn only_function_exports_are_renamed() {
        let wasm =
            wat::parse_str(r#"(module (global (export "__wasm_call_ctors") i32 (i32.const 0)))"#)
                .unwrap();
        assert_eq!(rewrite(&wasm), Ok(None));
    }

    #[test]
    fn a_second_start_section_or_a_component_is_refused() {
        let two_starts = b"\0asm\x01\0\0\0\x01\x04\x01\x60\0\0\x03\x02\x01\0\x08\x01\0\x08\x01\0\x0a\x04\x01\x02\0\x0b";
        assert!(rewrite(two_starts).is_err());
        let mut one_start = two_starts.to_vec();
        // Without the second start section (bytes 21..24) the module is rewritten.
        one_start.drain(21..24);
        assert!(rewrite(&one_start).unwrap().is_some());
        assert!(rewrite(b"\0asm\x0d\0\x01\0").is_err());
    }

    /// Checks that the rewritten module still parses section by section and validates (WAMR
    /// itself loads rewritten modules in `tests/engine.rs`).
    fn assert_sections_parse(wasm: &[u8]) {
        read(wasm).unwrap();
        wasmparser::validate(wasm).unwrap();
    }
}
