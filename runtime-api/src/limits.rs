//! Bookkeeping of limits for engines whose resource limiter sees one table at a time.

use crate::MAX_TABLE_ENTRIES;

/// The entries of an instance's tables, all together, for an engine's resource limiter (wasmtime
/// and wasmi ask about one table at a time): each table alone within the limit, a module's many
/// tables could still hold it many times over.
#[derive(Debug, Default)]
pub struct TableEntries {
    total: u64,
    /// `total` before the last growth allowed, for a growth that then fails.
    before_growth: u64,
}

impl TableEntries {
    /// Whether a table of `current` entries may grow to `desired` within
    /// [`MAX_TABLE_ENTRIES`] in all; if so, the growth is counted.
    pub fn growing(&mut self, current: usize, desired: usize) -> bool {
        let (current, desired) = (current as u64, desired as u64);
        let total = (self.total - current.min(self.total)).saturating_add(desired);
        if total > MAX_TABLE_ENTRIES {
            return false;
        }
        self.before_growth = self.total;
        self.total = total;
        true
    }

    /// The growth last allowed did not happen (the engine failed to grow the table).
    pub fn growth_failed(&mut self) {
        self.total = self.before_growth;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_counted_together_and_a_failed_growth_is_taken_back() {
        let limit = MAX_TABLE_ENTRIES as usize;
        let mut entries = TableEntries::default();
        assert!(entries.growing(0, 10), "a table made");
        assert!(entries.growing(0, limit - 20), "another");
        assert!(!entries.growing(10, 21), "past the limit in all");
        assert!(entries.growing(10, 20), "up to it");
        entries.growth_failed();
        assert!(entries.growing(10, 20), "the failed growth was taken back");
        assert!(!entries.growing(0, 1), "and the limit is reached");
    }
}
