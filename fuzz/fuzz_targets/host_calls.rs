//! Fuzzed host calls from generated plugins on every engine, whose reports must agree (see
//! `pwhost_fuzz::host_calls`).
#![no_main]

use std::sync::atomic::{AtomicUsize, Ordering};

use pwhost_fuzz::host_calls::HostCallPlugin;

/// Host calls the plugins so far plan, for the campaign's statistics.
static PLANNED_CALLS: AtomicUsize = AtomicUsize::new(0);

libfuzzer_sys::fuzz_target!(
    init: pwhost_fuzz::let_known_engine_panics_unwind(),
    |plugin: HostCallPlugin| {
        // The generator makes valid plugins: an engine refusing one is a finding too.
        match pwhost_fuzz::host_calls(&plugin) {
            Ok(true) => {}
            Ok(false) => panic!("every engine refused {plugin:?}"),
            Err(difference) => panic!("{difference}\nthe plugin: {plugin:?}"),
        }
        let calls = plugin.planned_calls();
        let planned = PLANNED_CALLS.fetch_add(calls, Ordering::Relaxed) + calls;
        pwhost_fuzz::report_stats("host_calls", || format!(", {planned} host calls planned"));
    }
);
