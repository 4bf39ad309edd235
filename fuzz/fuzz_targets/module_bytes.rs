//! Arbitrary bytes as a plugin module on every engine (see `pwhost_fuzz::module_bytes`).
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: pwhost_fuzz::let_known_engine_panics_unwind(),
    |data: &[u8]| {
        let _ = pwhost_fuzz::module_bytes(data);
        pwhost_fuzz::report_stats("module_bytes", String::new);
    }
);
