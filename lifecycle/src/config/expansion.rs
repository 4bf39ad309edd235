//! A YAML document's size once its aliases are expanded, checked before it is parsed.
//!
//! An alias repeats what its anchor names, so a small file can stand for a huge document: an
//! anchored list of a hundred thousand items named by a hundred thousand aliases is ten billion
//! nodes from under a megabyte of text. `serde_yaml` stops aliases nested in aliases (its
//! repetition limit) but not that, and would build every node. So the document is walked first,
//! counting nodes without keeping any, and refused past a bound far above any real
//! configuration's.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};

/// The most nodes (scalars, lists and maps, counted as expanded) a configuration may have.
pub const MAX_YAML_NODES: usize = 1_000_000;

/// `Err` saying why if `text`, a YAML (or JSON) document, expands to more than
/// [`MAX_YAML_NODES`] nodes; a document that does not parse is left to the parser's own
/// error.
pub fn check_yaml_expansion(text: &str) -> Result<(), String> {
    let nodes = Cell::new(0);
    match Count(&nodes).deserialize(serde_yaml::Deserializer::from_str(text)) {
        Err(_) if nodes.get() > MAX_YAML_NODES => Err(format!(
            "the document expands to more than {MAX_YAML_NODES} nodes (aliases repeating large \
             parts of it?)"
        )),
        _ => Ok(()),
    }
}

/// Counts the nodes of what it deserializes into `.0`, failing past [`MAX_YAML_NODES`].
struct Count<'a>(&'a Cell<usize>);

impl Count<'_> {
    fn tick<E: de::Error>(&self) -> Result<(), E> {
        let nodes = self.0.get() + 1;
        self.0.set(nodes);
        if nodes > MAX_YAML_NODES {
            return Err(E::custom("too many nodes"));
        }
        Ok(())
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
        self.tick()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.tick()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.tick()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.tick()
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.tick()
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<(), E> {
        self.tick()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.tick()
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.tick()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.tick()?;
        Count(self.0).deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.tick()?;
        while seq.next_element_seed(Count(self.0))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.tick()?;
        while map.next_key_seed(Count(self.0))?.is_some() {
            map.next_value_seed(Count(self.0))?;
        }
        Ok(())
    }

    /// A tagged node (`!Tag value`).
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        use serde::de::VariantAccess as _;
        self.tick()?;
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
    fn a_document_that_does_not_parse_is_left_to_the_parser() {
        assert_eq!(check_yaml_expansion("a: [1, 2"), Ok(()));
    }
}
