//! A YAML document's size once its aliases are expanded, checked before it is parsed.
//!
//! An alias repeats what its anchor names, so a small file can stand for a huge document: an
//! anchored list of a hundred thousand items named by a hundred thousand aliases is ten billion
//! nodes from under a megabyte of text, and an anchored string of a megabyte named a hundred
//! thousand times is a hundred gigabytes. `serde_yaml` stops aliases nested in aliases (its
//! repetition limit) but not these, and would build all of it. So the document is walked first,
//! counting nodes and scalar bytes without keeping any, and refused past bounds far above any
//! real configuration's (and above what its own text could hold without aliases).

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};

/// The most nodes (scalars, lists and maps, counted as expanded) a configuration may have, or
/// its text's length in bytes if that is more.
pub const MAX_YAML_NODES: usize = 1_000_000;

/// The most bytes its scalars may hold in all, counted as expanded, or twice its text's length
/// if that is more (a configuration may carry a plugin's code inline).
pub const MAX_YAML_SCALAR_BYTES: usize = 256 << 20;

/// `Err` saying why if `text`, a YAML (or JSON) document, expands to more nodes or scalar bytes
/// than [`MAX_YAML_NODES`] and [`MAX_YAML_SCALAR_BYTES`] allow; a document that does not parse
/// is left to the parser's own error.
pub fn check_yaml_expansion(text: &str) -> Result<(), String> {
    let budget = Budget {
        nodes: Cell::new(MAX_YAML_NODES.max(text.len())),
        bytes: Cell::new(MAX_YAML_SCALAR_BYTES.max(text.len().saturating_mul(2))),
        spent: Cell::new(false),
    };
    let _ = Count(&budget).deserialize(serde_yaml::Deserializer::from_str(text));
    match budget.spent.get() {
        true => Err(format!(
            "the document expands to more than {} nodes or {} bytes of scalars (aliases \
             repeating large parts of it?)",
            MAX_YAML_NODES.max(text.len()),
            MAX_YAML_SCALAR_BYTES.max(text.len().saturating_mul(2))
        )),
        false => Ok(()),
    }
}

/// What a document may still expand to, and whether it went past it.
struct Budget {
    /// Nodes left.
    nodes: Cell<usize>,
    /// Scalar bytes left.
    bytes: Cell<usize>,
    /// The document went past one of them.
    spent: Cell<bool>,
}

/// Counts the nodes of what it deserializes against `.0`, failing once it is spent.
struct Count<'a>(&'a Budget);

impl Count<'_> {
    /// One more node, of `bytes` scalar bytes.
    fn tick<E: de::Error>(&self, bytes: usize) -> Result<(), E> {
        let budget = self.0;
        match (
            budget.nodes.get().checked_sub(1),
            budget.bytes.get().checked_sub(bytes),
        ) {
            (Some(nodes), Some(bytes)) => {
                budget.nodes.set(nodes);
                budget.bytes.set(bytes);
                Ok(())
            }
            _ => {
                budget.spent.set(true);
                Err(E::custom("the document expands too far"))
            }
        }
    }
}

impl<'de> DeserializeSeed<'de> for Count<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Count<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.tick(1)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.tick(8)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.tick(8)
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.tick(16)
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.tick(16)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.tick(8)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<(), E> {
        self.tick(text.len())
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<(), E> {
        self.tick(bytes.len())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.tick(0)
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.tick(0)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.tick(0)?;
        Count(self.0).deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.tick(0)?;
        while seq.next_element_seed(Count(self.0))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.tick(0)?;
        while map.next_key_seed(Count(self.0))?.is_some() {
            map.next_value_seed(Count(self.0))?;
        }
        Ok(())
    }

    /// A tagged node (`!Tag value`).
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        use serde::de::VariantAccess as _;
        self.tick(0)?;
        let ((), variant) = data.variant_seed(Count(self.0))?;
        variant.newtype_variant_seed(Count(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ordinary_document_with_aliases_passes() {
        let text = "base: &base {runtime: wasmtime, code: {local: {filename: a.wasm}}}\n\
                    plugins:\n  - {name: a, vm: *base}\n  - {name: b, vm: *base}\n  \
                    - !Tagged {x: [1, 2.5, true, null, \"s\"]}\n";
        assert_eq!(check_yaml_expansion(text), Ok(()));
    }

    #[test]
    fn aliases_repeating_a_large_anchor_are_refused_without_building_it() {
        // 2,000 items named 1,000 times: two million nodes from 18 KB of text.
        let mut text = String::from("items: &items [");
        text.push_str(&"1,".repeat(2000));
        text.push_str("]\nrepeats:\n");
        text.push_str(&"  - *items\n".repeat(1000));
        let error = check_yaml_expansion(&text).expect_err("refused");
        assert!(error.contains("more than 1000000 nodes"), "{error}");
    }

    #[test]
    fn an_anchored_string_named_many_times_is_refused() {
        // 64 KiB named 5,000 times: 320 MiB of scalars from 85 KB of text.
        let mut text = format!("big: &big \"{}\"\nrepeats:\n", "x".repeat(64 << 10));
        text.push_str(&"  - *big\n".repeat(5000));
        let error = check_yaml_expansion(&text).expect_err("refused");
        assert!(error.contains("bytes of scalars"), "{error}");
    }

    #[test]
    fn a_large_document_without_aliases_passes() {
        // Two million small nodes in about 8 MB: bounded by its own text, not refused.
        let mut text = String::from("allow:\n");
        text.push_str(&"  - 12\n".repeat(2_000_000 / 2));
        text.push_str("more: [");
        text.push_str(&"1,".repeat(1_000_000));
        text.push_str("]\n");
        assert_eq!(check_yaml_expansion(&text), Ok(()));
    }

    #[test]
    fn a_document_that_does_not_parse_is_left_to_the_parser() {
        assert_eq!(check_yaml_expansion("a: [1, 2"), Ok(()));
    }
}
