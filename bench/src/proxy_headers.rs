//! [`ProxyHeaders`]: header storage owned by the embedder, shaped like a proxy's own (Traffic
//! Server's MIME heap, Envoy's header map): every name and value lives in one byte arena with
//! an index of spans, lent to pwhost through [`abi::Headers`].
//!
//! The benchmarks use it to measure what a proxy pays: pwhost reads and edits the proxy's map in
//! place, and the floors write their replies from the same storage. Once warm it allocates
//! nothing: restoring, reading, adding and removing reuse the arena and the index.

use abi::Headers;

/// One entry: where its name and value lie in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    name_start: u32,
    name_len: u32,
    value_start: u32,
    value_len: u32,
}

impl Entry {
    /// Whether the entry is named `name` (stored lower-case; ASCII case of `name` ignored). The
    /// length is compared before any byte is sliced, as a proxy's field lookup does. Always
    /// inlined: the floors' lookups inline it, and pwhost's (through `dyn Headers`) must not pay
    /// a call per entry that they do not.
    #[inline(always)]
    fn is_named(&self, arena: &[u8], name: &[u8]) -> bool {
        self.name_len as usize == name.len() && self.name(arena).eq_ignore_ascii_case(name)
    }

    #[inline(always)]
    fn name<'a>(&self, arena: &'a [u8]) -> &'a [u8] {
        let start = self.name_start as usize;
        &arena[start..start + self.name_len as usize]
    }

    #[inline(always)]
    fn value<'a>(&self, arena: &'a [u8]) -> &'a [u8] {
        let start = self.value_start as usize;
        &arena[start..start + self.value_len as usize]
    }
}

/// An ordered header multimap in one byte arena, names lower-cased, lookups ignoring ASCII
/// case.
///
/// Removing an entry drops it from the index and leaves its bytes in the arena until the next
/// [`ProxyHeaders::set_from`] or [`Headers::clear`], as arena-backed proxy maps do.
#[derive(Clone, Debug, Default)]
pub struct ProxyHeaders {
    arena: Vec<u8>,
    entries: Vec<Entry>,
}

impl ProxyHeaders {
    /// A map holding `pairs`, in order.
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        let mut map = ProxyHeaders::default();
        map.set_from(pairs);
        map
    }

    /// Makes the map hold exactly `pairs`, reusing its storage (no allocation once the arena and
    /// the index have grown to fit).
    pub fn set_from(&mut self, pairs: &[(&str, &str)]) {
        self.clear();
        for (name, value) in pairs {
            self.add(name.as_bytes(), value.as_bytes());
        }
    }

    /// Makes the map equal to `template`, reusing its storage (a derived `clone_from` would
    /// allocate anew).
    pub fn restore_from(&mut self, template: &ProxyHeaders) {
        self.arena.clone_from(&template.arena);
        self.entries.clone_from(&template.entries);
    }

    /// The position of the first entry named `name` (ASCII case ignored) and its value's
    /// length: a proxy's field handle.
    #[inline]
    pub fn find(&self, name: &[u8]) -> Option<(usize, usize)> {
        let arena = &self.arena;
        self.entries
            .iter()
            .position(|entry| entry.is_named(arena, name))
            .map(|index| (index, self.entries[index].value_len as usize))
    }

    /// The value of the entry at `index`.
    #[inline]
    pub fn value_at(&self, index: usize) -> Option<&[u8]> {
        self.entries
            .get(index)
            .map(|entry| entry.value(&self.arena))
    }

    /// The entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries
            .iter()
            .map(|entry| (entry.name(&self.arena), entry.value(&self.arena)))
    }

    /// Appends `bytes` to the arena, lower-cased if `lower`, and returns where they start.
    fn push(&mut self, bytes: &[u8], lower: bool) -> u32 {
        let start = self.arena.len();
        if lower {
            self.arena.extend(bytes.iter().map(u8::to_ascii_lowercase));
        } else {
            self.arena.extend_from_slice(bytes);
        }
        // Header blocks are bounded far below 4 GiB by every proxy; the benchmarks' are tiny.
        u32::try_from(start).expect("header arena under 4 GiB")
    }
}

impl Headers for ProxyHeaders {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|entry| entry.is_named(&self.arena, name))
            .map(|entry| entry.value(&self.arena))
    }

    fn for_each(&self, visit: &mut dyn FnMut(&[u8], &[u8])) {
        for entry in &self.entries {
            visit(entry.name(&self.arena), entry.value(&self.arena));
        }
    }

    fn add(&mut self, name: &[u8], value: &[u8]) {
        let name_start = self.push(name, true);
        let value_start = self.push(value, false);
        self.entries.push(Entry {
            name_start,
            name_len: name.len() as u32,
            value_start,
            value_len: value.len() as u32,
        });
    }

    fn replace(&mut self, name: &[u8], value: &[u8]) {
        let arena = &self.arena;
        match self
            .entries
            .iter()
            .position(|entry| entry.is_named(arena, name))
        {
            Some(first) => {
                let value_start = self.push(value, false);
                self.entries[first].value_start = value_start;
                self.entries[first].value_len = value.len() as u32;
                let arena = &self.arena;
                let mut index = 0;
                self.entries.retain(|entry| {
                    index += 1;
                    index - 1 <= first || !entry.is_named(arena, name)
                });
            }
            None => self.add(name, value),
        }
    }

    fn remove(&mut self, name: &[u8]) {
        let arena = &self.arena;
        self.entries.retain(|entry| !entry.is_named(arena, name));
    }

    fn clear(&mut self) {
        self.arena.clear();
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(map: &ProxyHeaders) -> Vec<(String, String)> {
        map.iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn behaves_as_the_abi_header_map() {
        let mut proxy = ProxyHeaders::from_pairs(&[("Accept", "a"), ("x", "1"), ("accept", "b")]);
        let mut reference: abi::HeaderMap = [("Accept", "a"), ("x", "1"), ("accept", "b")]
            .into_iter()
            .collect();
        let edits: [(&str, &[u8], &[u8]); 6] = [
            ("replace", b"ACCEPT", b"c"),
            ("add", b"Y", b"2"),
            ("replace", b"z", b"3"),
            ("remove", b"x", b""),
            ("add", b"y", b"4"),
            ("remove", b"missing", b""),
        ];
        for (op, name, value) in edits {
            for map in [&mut proxy as &mut dyn Headers, &mut reference] {
                match op {
                    "add" => map.add(name, value),
                    "replace" => map.replace(name, value),
                    _ => map.remove(name),
                }
            }
            let expected: Vec<(String, String)> = reference
                .iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(k).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .collect();
            assert_eq!(pairs(&proxy), expected, "after {op} {name:?}");
            assert_eq!(proxy.get(b"Y"), reference.get(b"y"));
        }
    }

    #[test]
    fn set_from_reuses_its_storage() {
        let mut map = ProxyHeaders::from_pairs(&[("a", "1"), ("b", "2")]);
        map.add(b"c", b"3");
        let (arena, entries) = (map.arena.capacity(), map.entries.capacity());
        map.set_from(&[("a", "1"), ("b", "2")]);
        assert_eq!(pairs(&map).len(), 2);
        assert_eq!(
            (map.arena.capacity(), map.entries.capacity()),
            (arena, entries)
        );
    }
}
