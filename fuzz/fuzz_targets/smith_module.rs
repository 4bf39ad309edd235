//! `wasm-smith` plugins on every engine (see `pwhost_fuzz::smith_module`).
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: pwhost_fuzz::let_known_engine_panics_unwind(),
    |data: &[u8]| {
        let _ = pwhost_fuzz::smith_module(data);
        pwhost_fuzz::report_stats("smith_module", String::new);
    }
);
