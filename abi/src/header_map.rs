//! Header maps: what the ABI needs of one ([`Headers`]), pwhost's in-memory map
//! ([`HeaderMap`]), and the wire format.

/// A header map as the ABI reads and edits it while a plugin runs: the embedding proxy's own
/// storage, lent for one host call ([`crate::Host::header_map`]), so that nothing is copied into
/// a map of pwhost's and back. [`HeaderMap`] is the in-memory implementation.
///
/// Names come from the plugin in any ASCII case: lookups ignore case, and names added may be
/// stored lower-cased (HTTP/2 semantics, as Envoy stores them). Entries keep their order and a
/// name may occur several times. None of the methods may allocate for a map whose storage
/// needs none: the ABI itself allocates nothing to read or edit a map.
pub trait Headers {
    /// The number of entries (counting repeated names).
    fn len(&self) -> usize;

    /// Whether the map has no entries.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first value of `name`.
    fn get(&self, name: &[u8]) -> Option<&[u8]>;

    /// Calls `visit` with every entry, in order.
    fn for_each(&self, visit: &mut dyn FnMut(&[u8], &[u8]));

    /// Appends an entry, keeping any existing ones of the same name.
    fn add(&mut self, name: &[u8], value: &[u8]);

    /// Sets `name` to `value`: the first entry of that name gets the value and later ones are
    /// removed; if there is none, an entry is appended.
    fn replace(&mut self, name: &[u8], value: &[u8]);

    /// Removes every entry of `name`.
    fn remove(&mut self, name: &[u8]);

    /// Removes every entry.
    fn clear(&mut self);
}

impl Headers for HeaderMap {
    fn len(&self) -> usize {
        HeaderMap::len(self)
    }

    fn get(&self, name: &[u8]) -> Option<&[u8]> {
        HeaderMap::get(self, name)
    }

    fn for_each(&self, visit: &mut dyn FnMut(&[u8], &[u8])) {
        for (name, value) in self.iter() {
            visit(name, value);
        }
    }

    fn add(&mut self, name: &[u8], value: &[u8]) {
        HeaderMap::add(self, name, value);
    }

    fn replace(&mut self, name: &[u8], value: &[u8]) {
        HeaderMap::replace(self, name, value);
    }

    fn remove(&mut self, name: &[u8]) {
        HeaderMap::remove(self, name);
    }

    fn clear(&mut self) {
        HeaderMap::clear(self);
    }
}

/// An ordered multimap of header names to values, as HTTP carries them.
///
/// Names are stored lower-cased (HTTP/2 semantics, as Envoy does); lookups ignore ASCII case.
/// Order is preserved and a name may occur several times.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderMap {
    entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl HeaderMap {
    /// An empty map.
    pub fn new() -> Self {
        HeaderMap::default()
    }

    /// The number of entries (counting repeated names).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the map has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All entries in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&[u8], &[u8])> + Clone {
        self.entries
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// The first value of `name`.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Appends an entry, keeping any existing ones of the same name.
    pub fn add(&mut self, name: &[u8], value: &[u8]) {
        self.entries
            .push((name.to_ascii_lowercase(), value.to_vec()));
    }

    /// Sets `name` to `value`: the first entry of that name gets the value and later ones are
    /// removed; if there is none, an entry is appended.
    pub fn replace(&mut self, name: &[u8], value: &[u8]) {
        match self
            .entries
            .iter()
            .position(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            Some(first) => {
                self.entries[first].1 = value.to_vec();
                let mut index = 0;
                self.entries.retain(|(k, _)| {
                    let keep = index <= first || !k.eq_ignore_ascii_case(name);
                    index += 1;
                    keep
                });
            }
            None => self.add(name, value),
        }
    }

    /// Removes every entry of `name`.
    pub fn remove(&mut self, name: &[u8]) {
        self.entries.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Entries as UTF-8 strings (invalid sequences replaced), for reports.
    pub fn to_string_pairs(&self) -> Vec<(String, String)> {
        self.iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }
}

impl<K: AsRef<[u8]>, V: AsRef<[u8]>> FromIterator<(K, V)> for HeaderMap {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut map = HeaderMap::new();
        for (k, v) in iter {
            map.add(k.as_ref(), v.as_ref());
        }
        map
    }
}

/// The Proxy-Wasm serialization of header pairs: a little-endian `u32` count, then a `u32` key
/// length and `u32` value length per pair, then each key and value followed by a NUL byte.
pub mod wire {
    use crate::Status;

    /// The encoded size of `pairs`, or `None` if it does not fit in a guest's 32-bit size.
    pub fn encoded_len<'a>(
        pairs: impl ExactSizeIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Option<u64> {
        let count = pairs.len() as u64;
        let mut len = 4 + 8 * count;
        for (k, v) in pairs {
            len += k.len() as u64 + v.len() as u64 + 2;
        }
        (len <= u32::MAX as u64).then_some(len)
    }

    /// Encodes `pairs` into `out`, which must be exactly `encoded_len` bytes long.
    pub fn encode_into<'a>(
        pairs: impl ExactSizeIterator<Item = (&'a [u8], &'a [u8])> + Clone,
        out: &mut [u8],
    ) {
        let count = pairs.len();
        out[..4].copy_from_slice(&(count as u32).to_le_bytes());
        let mut sizes = 4;
        let mut data = 4 + 8 * count;
        for (k, v) in pairs {
            out[sizes..sizes + 4].copy_from_slice(&(k.len() as u32).to_le_bytes());
            out[sizes + 4..sizes + 8].copy_from_slice(&(v.len() as u32).to_le_bytes());
            sizes += 8;
            for part in [k, v] {
                out[data..data + part.len()].copy_from_slice(part);
                out[data + part.len()] = 0;
                data += part.len() + 1;
            }
        }
    }

    /// The encoded size of `map`, or `None` if it does not fit in a guest's 32-bit size.
    pub fn encoded_len_of(map: &dyn super::Headers) -> Option<u64> {
        let mut count = 0u64;
        let mut len = 4u64;
        map.for_each(&mut |k, v| {
            count += 1;
            len += 8 + k.len() as u64 + v.len() as u64 + 2;
        });
        (count == map.len() as u64 && len <= u32::MAX as u64).then_some(len)
    }

    /// Encodes `map` into `out`, which must be exactly [`encoded_len_of`] bytes long. Returns
    /// false, with `out` unspecified, if the map does not fit `out` (its entries changed, or it
    /// reports another length than it has).
    pub fn encode_headers_into(map: &dyn super::Headers, out: &mut [u8]) -> bool {
        let count = map.len();
        let (Some(head), Ok(count32), Some(first_data)) = (
            out.get_mut(..4),
            u32::try_from(count),
            count.checked_mul(8).and_then(|n| n.checked_add(4)),
        ) else {
            return false;
        };
        head.copy_from_slice(&count32.to_le_bytes());
        let mut sizes = 4;
        let mut data = first_data;
        let mut fits = true;
        map.for_each(&mut |k, v| {
            let Some(size) = out.get_mut(sizes..sizes + 8) else {
                fits = false;
                return;
            };
            size[..4].copy_from_slice(&(k.len() as u32).to_le_bytes());
            size[4..].copy_from_slice(&(v.len() as u32).to_le_bytes());
            sizes += 8;
            for part in [k, v] {
                let Some(slot) = out.get_mut(data..data + part.len() + 1) else {
                    fits = false;
                    return;
                };
                slot[..part.len()].copy_from_slice(part);
                slot[part.len()] = 0;
                data += part.len() + 1;
            }
        });
        fits && sizes == first_data && data == out.len()
    }

    /// Encodes `pairs` into a new vector.
    pub fn encode<'a>(
        pairs: impl ExactSizeIterator<Item = (&'a [u8], &'a [u8])> + Clone,
    ) -> Vec<u8> {
        let len = encoded_len(pairs.clone()).unwrap_or(0) as usize;
        let mut out = vec![0; len];
        if len > 0 {
            encode_into(pairs, &mut out);
        }
        out
    }

    /// Header pairs borrowed from serialized data.
    pub type Pairs<'a> = Vec<(&'a [u8], &'a [u8])>;

    /// The most pairs a serialized map may carry: far more than any proxy lets through
    /// (Envoy's default `max_headers_count` is 100), few enough that a plugin cannot make the
    /// host allocate more for the pairs than the map's own bytes.
    pub const MAX_PAIRS: usize = 8192;

    /// Decodes serialized pairs. An empty input is an empty map (the SDKs send nothing for no
    /// headers); anything malformed, or over [`MAX_PAIRS`] pairs, is [`Status::BadArgument`].
    pub fn decode(bytes: &[u8]) -> Result<Pairs<'_>, Status> {
        if bytes.is_empty() {
            return Ok(Vec::new());
        }
        let read_u32 = |at: usize| -> Result<usize, Status> {
            let b = bytes.get(at..at + 4).ok_or(Status::BadArgument)?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let count = read_u32(0)?;
        // Each pair needs at least 8 size bytes and 2 NULs: reject absurd counts before
        // allocating for them.
        if count > bytes.len() / 10 || count > MAX_PAIRS {
            return Err(Status::BadArgument);
        }
        let mut pairs = Vec::with_capacity(count);
        let mut data = 4 + 8 * count;
        for i in 0..count {
            let key_len = read_u32(4 + 8 * i)?;
            let value_len = read_u32(8 + 8 * i)?;
            let key = bytes
                .get(data..data.checked_add(key_len).ok_or(Status::BadArgument)?)
                .ok_or(Status::BadArgument)?;
            data += key_len + 1;
            let value = bytes
                .get(data..data.checked_add(value_len).ok_or(Status::BadArgument)?)
                .ok_or(Status::BadArgument)?;
            data += value_len + 1;
            if data > bytes.len() {
                return Err(Status::BadArgument);
            }
            pairs.push((key, value));
        }
        Ok(pairs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An embedder's map whose `len` disagrees with what it visits.
    struct Lying {
        map: HeaderMap,
        claimed: usize,
    }

    impl Headers for Lying {
        fn len(&self) -> usize {
            self.claimed
        }
        fn get(&self, name: &[u8]) -> Option<&[u8]> {
            self.map.get(name)
        }
        fn for_each(&self, visit: &mut dyn FnMut(&[u8], &[u8])) {
            Headers::for_each(&self.map, visit)
        }
        fn add(&mut self, name: &[u8], value: &[u8]) {
            self.map.add(name, value)
        }
        fn replace(&mut self, name: &[u8], value: &[u8]) {
            self.map.replace(name, value)
        }
        fn remove(&mut self, name: &[u8]) {
            self.map.remove(name)
        }
        fn clear(&mut self) {
            self.map.clear()
        }
    }

    #[test]
    fn a_lent_map_encodes_as_the_in_memory_one() {
        let map: HeaderMap = [(":path", "/"), ("a", "1"), ("a", "2")]
            .into_iter()
            .collect();
        let len = wire::encoded_len_of(&map).unwrap();
        assert_eq!(Some(len), wire::encoded_len(map.iter()));
        let mut out = vec![0; len as usize];
        assert!(wire::encode_headers_into(&map, &mut out));
        assert_eq!(out, wire::encode(map.iter()));
    }

    #[test]
    fn a_map_that_misreports_its_length_is_refused_without_a_panic() {
        let map: HeaderMap = [("a", "1"), ("b", "2")].into_iter().collect();
        let real = wire::encoded_len(map.iter()).unwrap() as usize;
        for claimed in [0, 1, 3, 1000, usize::MAX / 4, usize::MAX] {
            let lying = Lying {
                map: map.clone(),
                claimed,
            };
            assert_eq!(wire::encoded_len_of(&lying), None, "claimed {claimed}");
            for size in [0, 4, real, real + 16] {
                let mut out = vec![0; size];
                assert!(
                    !wire::encode_headers_into(&lying, &mut out),
                    "claimed {claimed}"
                );
            }
        }
    }

    #[test]
    fn names_are_case_insensitive_and_stored_lower_case() {
        let mut map = HeaderMap::new();
        map.add(b"Content-Type", b"text/plain");
        assert_eq!(map.get(b"content-type"), Some(&b"text/plain"[..]));
        assert_eq!(map.iter().next().unwrap().0, b"content-type");
    }

    #[test]
    fn replace_keeps_the_first_position_and_drops_repeats() {
        let mut map: HeaderMap = [("a", "1"), ("b", "2"), ("a", "3")].into_iter().collect();
        map.replace(b"a", b"x");
        assert_eq!(
            map.to_string_pairs(),
            vec![("a".into(), "x".into()), ("b".into(), "2".into())]
        );
        map.replace(b"c", b"new");
        assert_eq!(map.get(b"c"), Some(&b"new"[..]));
    }

    #[test]
    fn remove_drops_every_entry_of_the_name() {
        let mut map: HeaderMap = [("a", "1"), ("b", "2"), ("A", "3")].into_iter().collect();
        map.remove(b"a");
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn wire_format_round_trips() {
        let map: HeaderMap = [(":path", "/"), ("x", "")].into_iter().collect();
        let bytes = wire::encode(map.iter());
        assert_eq!(bytes.len() as u64, wire::encoded_len(map.iter()).unwrap());
        assert_eq!(&bytes[..4], &2u32.to_le_bytes());
        assert_eq!(
            wire::decode(&bytes).unwrap(),
            vec![(&b":path"[..], &b"/"[..]), (&b"x"[..], &b""[..])]
        );
    }

    #[test]
    fn malformed_wire_data_is_a_bad_argument() {
        assert_eq!(wire::decode(&[1, 0, 0]), Err(crate::Status::BadArgument));
        // Empty pairs, as many as the bytes allow, but more than a map may have.
        let too_many = (wire::MAX_PAIRS + 1) as u32;
        let mut many = too_many.to_le_bytes().to_vec();
        many.resize(4 + 10 * too_many as usize, 0);
        assert_eq!(wire::decode(&many), Err(crate::Status::BadArgument));
        many[..4].copy_from_slice(&(wire::MAX_PAIRS as u32).to_le_bytes());
        many.truncate(4 + 10 * wire::MAX_PAIRS);
        assert_eq!(
            wire::decode(&many).map(|pairs| pairs.len()),
            Ok(wire::MAX_PAIRS)
        );
        let mut lying = 1000u32.to_le_bytes().to_vec();
        lying.extend_from_slice(&[0; 4]);
        assert_eq!(wire::decode(&lying), Err(crate::Status::BadArgument));
        let mut truncated = wire::encode([(&b"key"[..], &b"value"[..])].into_iter());
        truncated.truncate(truncated.len() - 3);
        assert_eq!(wire::decode(&truncated), Err(crate::Status::BadArgument));
        assert!(wire::decode(&[]).unwrap().is_empty());
    }
}
