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
//! Function indices do not change, so the code, names and tables are untouched. A module this
//! parser cannot read is loaded unchanged, for WAMR to reject (or run as it would anyway).

/// The exports WAMR calls by itself during instantiation (with bulk memory enabled and WAMR's
/// own WASI disabled, as pwhost builds it).
const AUTO_RUN: [&str; 2] = ["__post_instantiate", "__wasm_call_ctors"];

const EXPORT_SECTION: u8 = 7;
const START_SECTION: u8 = 8;
const FUNCTION_KIND: u8 = 0;

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
/// not (or the module cannot be parsed), in which case `wasm` is loaded as it is.
pub(crate) fn rewrite(wasm: &[u8]) -> Option<Rewritten> {
    let sections = sections(wasm)?;
    let mut export_section = None;
    let mut start_function = None;
    for section in &sections {
        let payload = &wasm[section.payload.clone()];
        match section.id {
            EXPORT_SECTION if export_section.is_none() => {
                export_section = Some(exports(payload)?);
            }
            START_SECTION if start_function.is_none() => {
                let mut reader = Reader::new(payload);
                start_function = Some(reader.u32()?);
                reader.end()?;
            }
            // A second export or start section: invalid, WAMR will say so.
            EXPORT_SECTION | START_SECTION => return None,
            _ => {}
        }
    }
    let had_export_section = export_section.is_some();
    let mut entries = export_section.unwrap_or_default();
    let mut renamed = Vec::new();
    for index in 0..entries.len() {
        let entry = &entries[index];
        let auto_run = AUTO_RUN.iter().any(|name| entry.name == name.as_bytes());
        if entry.kind != FUNCTION_KIND || !auto_run {
            continue;
        }
        let original = String::from_utf8(entry.name.clone()).ok()?;
        let reserved = unique_name(&entries, &format!("pwhost:hoisted:{original}"));
        entries[index].name = reserved.clone().into_bytes();
        renamed.push((original, reserved));
    }
    let mut start_export = None;
    if let Some(function) = start_function {
        let name = unique_name(&entries, "pwhost:start");
        entries.push(Export {
            name: name.clone().into_bytes(),
            kind: FUNCTION_KIND,
            index: function,
        });
        start_export = Some(name);
    }
    if start_export.is_none() && renamed.is_empty() {
        return None;
    }
    let new_exports = export_section_bytes(&entries)?;
    let mut bytes = Vec::with_capacity(wasm.len() + new_exports.len());
    bytes.extend_from_slice(&wasm[..HEADER.len()]);
    for section in &sections {
        match section.id {
            EXPORT_SECTION => bytes.extend_from_slice(&new_exports),
            // The export section comes right before the start section, so a module without one
            // gets it where its start section was.
            START_SECTION if !had_export_section => bytes.extend_from_slice(&new_exports),
            START_SECTION => {}
            _ => bytes.extend_from_slice(&wasm[section.start..section.payload.end]),
        }
    }
    Some(Rewritten {
        bytes,
        start_export,
        renamed,
    })
}

/// `base`, with apostrophes appended until no export has that name.
fn unique_name(entries: &[Export], base: &str) -> String {
    let mut name = base.to_string();
    while entries.iter().any(|e| e.name == name.as_bytes()) {
        name.push('\'');
    }
    name
}

/// The magic number and version 1.
const HEADER: [u8; 8] = *b"\0asm\x01\0\0\0";

/// One top-level section.
struct Section {
    id: u8,
    /// Where the section (its id byte) starts.
    start: usize,
    /// Where its payload lies.
    payload: std::ops::Range<usize>,
}

fn sections(wasm: &[u8]) -> Option<Vec<Section>> {
    if !wasm.starts_with(&HEADER) {
        return None;
    }
    let mut reader = Reader::new(wasm);
    reader.pos = HEADER.len();
    let mut sections = Vec::new();
    while !reader.at_end() {
        let start = reader.pos;
        let id = reader.byte()?;
        let len = reader.u32()? as usize;
        let payload_start = reader.pos;
        reader.take(len)?;
        sections.push(Section {
            id,
            start,
            payload: payload_start..reader.pos,
        });
    }
    Some(sections)
}

/// One export entry.
struct Export {
    name: Vec<u8>,
    kind: u8,
    index: u32,
}

fn exports(payload: &[u8]) -> Option<Vec<Export>> {
    let mut reader = Reader::new(payload);
    let count = reader.u32()?;
    let mut entries = Vec::new();
    for _ in 0..count {
        let len = reader.u32()? as usize;
        let name = reader.take(len)?.to_vec();
        let kind = reader.byte()?;
        let index = reader.u32()?;
        entries.push(Export { name, kind, index });
    }
    reader.end()?;
    Some(entries)
}

fn export_section_bytes(entries: &[Export]) -> Option<Vec<u8>> {
    let mut payload = Vec::new();
    write_u32(&mut payload, u32::try_from(entries.len()).ok()?);
    for entry in entries {
        write_u32(&mut payload, u32::try_from(entry.name.len()).ok()?);
        payload.extend_from_slice(&entry.name);
        payload.push(entry.kind);
        write_u32(&mut payload, entry.index);
    }
    let mut section = vec![EXPORT_SECTION];
    write_u32(&mut section, u32::try_from(payload.len()).ok()?);
    section.extend_from_slice(&payload);
    Some(section)
}

fn write_u32(out: &mut Vec<u8>, mut value: u32) {
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

/// A cursor over bytes whose every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn end(&self) -> Option<()> {
        self.at_end().then_some(())
    }

    fn byte(&mut self) -> Option<u8> {
        let byte = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(byte)
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(len)?;
        let bytes = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    /// An unsigned LEB128 `u32` (at most 5 bytes, no bits beyond 32).
    fn u32(&mut self) -> Option<u32> {
        let mut value: u32 = 0;
        for shift in (0..35).step_by(7) {
            let byte = self.byte()?;
            let bits = u32::from(byte & 0x7f);
            if shift == 28 && bits > 0x0f {
                return None;
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export_names(wasm: &[u8]) -> Vec<String> {
        let sections = sections(wasm).unwrap();
        let section = sections.iter().find(|s| s.id == EXPORT_SECTION).unwrap();
        exports(&wasm[section.payload.clone()])
            .unwrap()
            .into_iter()
            .map(|e| String::from_utf8(e.name).unwrap())
            .collect()
    }

    #[test]
    fn modules_without_start_or_auto_run_exports_are_unchanged() {
        let wasm = wat::parse_str(r#"(module (func (export "f")))"#).unwrap();
        assert_eq!(rewrite(&wasm), None);
    }

    #[test]
    fn the_start_function_becomes_an_export() {
        let wasm = wat::parse_str(r#"(module (func $s) (start $s))"#).unwrap();
        let rewritten = rewrite(&wasm).unwrap();
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
        let rewritten = rewrite(&wasm).unwrap();
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
    fn truncated_or_invalid_modules_are_left_alone() {
        let wasm = wat::parse_str(r#"(module (func $s) (start $s))"#).unwrap();
        for len in 0..wasm.len() {
            // Must not panic; a prefix is either unparseable or has no start section yet.
            let _ = rewrite(&wasm[..len]);
        }
        assert_eq!(
            rewrite(b"\0asm\x01\0\0\0\x08\x05\xff\xff\xff\xff\xff"),
            None
        );
    }

    /// Checks that the rewritten module still parses section by section (WAMR itself loads
    /// rewritten modules in `tests/engine.rs`).
    fn assert_sections_parse(wasm: &[u8]) {
        let sections = sections(wasm).unwrap();
        for section in sections.iter().filter(|s| s.id == EXPORT_SECTION) {
            exports(&wasm[section.payload.clone()]).unwrap();
        }
    }
}
