//! Arbitrary text as configuration and scenario (see `pwhost_fuzz::config`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pwhost_fuzz::config(data));
