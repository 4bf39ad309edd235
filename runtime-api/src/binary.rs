//! Reading a module's sections and rewriting one of them, for the engines whose own API cannot
//! bound what a module declares (feature `binary`).
//!
//! Module bytes come from plugin authors, so a malformed module is an error here, never a
//! panic. `wasmparser` splits the sections (skipping function bodies by their size) and decodes
//! the ones involved; a rewritten section is encoded by `wasm-encoder` and spliced in where the
//! old one was, every other section staying byte-identical.

use std::ops::Range;

use wasm_encoder::reencode::{Reencode, RoundtripReencoder};
use wasmparser::{Chunk, Encoding, Parser, Payload, WasmFeatures};

use crate::MAX_TABLE_ENTRIES;

/// One section of a module, as `wasmparser` found it.
pub struct Section<'a> {
    /// The section, its entries not yet decoded.
    pub payload: Payload<'a>,
    /// Where the whole section (id and size included) lies in the module.
    pub range: Range<usize>,
}

/// Splits a WebAssembly 1.0 module into its sections, in order, except the code section, which is
/// skipped by its size: nothing here reads function bodies.
pub fn sections(wasm: &[u8]) -> Result<Vec<Section<'_>>, String> {
    const TRUNCATED: &str = "unexpected end of module";
    let mut parser = Parser::new(0);
    // No engine pwhost runs plugins on takes a 64-bit memory or table from a plugin, and
    // without the feature wasmparser reads every memory or table limit as a 32-bit number, as
    // the engines read a 32-bit one's. A limit that does not fit in 32 bits is then malformed;
    // read as 64 bits, it would be capped into a module an engine accepts.
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

/// The one section `pick` selects (a memory or table section), with the bytes it spans; `None`
/// if the module has none. The rewrites replace a single section, so a second one is an error
/// (`wasmparser` reports it as out of order before this could see it, but the rewrite must not
/// depend on that).
pub fn only_section<'a, T>(
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
pub fn collect_section<'a, T: wasmparser::FromReader<'a>>(
    reader: wasmparser::SectionLimited<'a, T>,
) -> Result<Vec<T>, String> {
    reader
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(malformed)
}

/// `wasm` with the bytes of one section (`range`, its id and size included) replaced by
/// `section`.
pub fn splice(
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

/// A `wasmparser` error in words.
pub fn malformed(error: wasmparser::BinaryReaderError) -> String {
    error.to_string()
}

/// A `wasm-encoder` error in words: a malformed table initializer, in practice, since the
/// reencoder reads those.
pub fn reencoding(error: wasm_encoder::reencode::Error) -> String {
    match error {
        wasm_encoder::reencode::Error::ParseError(error) => malformed(error),
        other => other.to_string(),
    }
}

/// Keeps the tables of one instance within [`MAX_TABLE_ENTRIES`] entries in all: refuses a
/// module whose tables start larger, and lowers each table's maximum to its initial size plus
/// an equal share of the rest (or to its own maximum, if lower), so that no growth takes the
/// tables past it. Returns the rewritten module, or `None` if every maximum was within bounds
/// already. Imported tables are left alone: no Proxy-Wasm host provides one, so linking
/// refuses them anyway.
pub fn bound_tables(wasm: &[u8]) -> Result<Option<Vec<u8>>, String> {
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
    if initial > MAX_TABLE_ENTRIES {
        return Err(format!(
            "the module's tables start with {initial} entries, more than the \
             {MAX_TABLE_ENTRIES} an instance may have"
        ));
    }
    let share = (MAX_TABLE_ENTRIES - initial) / tables.len().max(1) as u64;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn wasm(text: &str) -> Vec<u8> {
        wat::parse_str(text).unwrap()
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
    fn several_tables_share_the_entry_budget() {
        let module = wasm(
            r#"(module (table 10 funcref) (table 0 20 funcref) (table 5 externref)
                 (func (export "f")))"#,
        );
        let bounded = bound_tables(&module).unwrap().expect("rewritten");
        let tables = table_section(&bounded);
        assert_eq!(tables.len(), 3);
        let share = (MAX_TABLE_ENTRIES - 15) / 3;
        let maxima: Vec<_> = tables.iter().map(|table| table.maximum).collect();
        assert_eq!(maxima, vec![Some(10 + share), Some(20), Some(5 + share)]);
    }

    #[test]
    fn one_table_gets_the_whole_budget_and_a_bounded_module_is_left_alone() {
        let module = wasm(r#"(module (table 10 funcref))"#);
        let bounded = bound_tables(&module).unwrap().expect("rewritten");
        assert_eq!(table_section(&bounded)[0].maximum, Some(MAX_TABLE_ENTRIES));
        assert_eq!(bound_tables(&bounded).unwrap(), None);
        assert_eq!(bound_tables(&wasm("(module)")).unwrap(), None);
    }

    #[test]
    fn tables_starting_past_the_budget_are_refused() {
        let huge = wasm(r#"(module (table 600000 funcref) (table 600000 funcref))"#);
        let error = bound_tables(&huge).unwrap_err();
        assert!(error.contains("start with 1200000 entries"), "{error}");
        let one = wasm(r#"(module (table 0x1F000000 funcref))"#);
        assert!(bound_tables(&one).is_err());
    }

    #[test]
    fn bounded_tables_keep_their_element_types_and_other_sections() {
        let module = wasm(
            r#"(module (table 1 funcref) (table 2 3 externref)
                 (memory 1) (@custom "notes" "kept as is"))"#,
        );
        let bounded = bound_tables(&module).unwrap().expect("rewritten");
        let before = table_section(&module);
        let after = table_section(&bounded);
        assert_eq!(before.len(), after.len());
        for (before, after) in before.iter().zip(&after) {
            assert_eq!(before.element_type, after.element_type);
            assert_eq!(before.initial, after.initial);
        }
        assert_eq!(after[1].maximum, Some(3));
        assert!(bounded.ends_with(&module[module.len() - 20..]));
    }

    #[test]
    fn damaged_modules_are_errors_not_panics() {
        let module = wasm(r#"(module (table 1 funcref) (memory 1))"#);
        for len in 0..module.len() {
            let _ = bound_tables(&module[..len]);
        }
        assert!(bound_tables(b"\0asm\x01\0\0\0\x04\x05\xff\xff\xff\xff\x0f").is_err());
    }
}
