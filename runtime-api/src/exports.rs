//! A module's callable function exports, by name.

/// The functions of a module the host can call, found by name for [`crate::Instance::function`].
///
/// Built once per module; sorted, so a lookup is a binary search without hashing. `T` is what the
/// engine keeps to call each one (its type, its engine-side handle).
#[derive(Debug)]
pub struct ExportedFunctions<T> {
    by_name: Vec<(String, T)>,
}

impl<T> ExportedFunctions<T> {
    /// The exports, as `(name, what the engine keeps)`, in any order.
    pub fn new(functions: impl IntoIterator<Item = (String, T)>) -> Self {
        let mut by_name: Vec<(String, T)> = functions.into_iter().collect();
        by_name.sort_by(|a, b| a.0.cmp(&b.0));
        ExportedFunctions { by_name }
    }

    /// The export called `name`.
    pub fn get(&self, name: &str) -> Option<&T> {
        let index = self
            .by_name
            .binary_search_by(|(exported, _)| exported.as_str().cmp(name))
            .ok()?;
        self.by_name.get(index).map(|(_, function)| function)
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

impl<T> FromIterator<(String, T)> for ExportedFunctions<T> {
    fn from_iter<I: IntoIterator<Item = (String, T)>>(functions: I) -> Self {
        ExportedFunctions::new(functions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_are_found_by_name_whatever_their_order() {
        let functions: ExportedFunctions<u32> =
            [("malloc", 1), ("_start", 2), ("proxy_on_tick", 3)]
                .into_iter()
                .map(|(name, value)| (name.to_string(), value))
                .collect();
        assert_eq!(functions.len(), 3);
        assert_eq!(functions.get("malloc"), Some(&1));
        assert_eq!(functions.get("_start"), Some(&2));
        assert_eq!(functions.get("proxy_on_tick"), Some(&3));
        assert_eq!(functions.get("free"), None);
    }
}
