//! `wasi_calls`: WASI use from an SDK plugin, meant for the `wasm32-wasip1` build.
//!
//! On request headers (returns Continue):
//! - `println!("hello from stdout")` and `eprintln!("hello from stderr")` (`fd_write` to fd 1 and
//!   fd 2; a host should route them to its log or discard them, never fail);
//! - adds `x-env: <value of env var PWHOST_GREETING>` or `x-env: unset` (`environ_sizes_get` /
//!   `environ_get`);
//! - `std::fs::read_to_string("/etc/hostname")`: adds `x-fs: ok` if it succeeds, else
//!   `x-fs: error`. wasi-libc resolves the path against the preopened directories, so with no
//!   preopens (the sane default for a proxy) it fails, possibly without calling `path_open`;
//! - `SystemTime::now()` (`clock_time_get` realtime): `x-time: set` if it is after UNIX_EPOCH,
//!   else `x-time: unset`;
//! - hashes a value with a fresh `std::collections::hash_map::RandomState` and adds
//!   `x-random: ok`. std seeds RandomState once per thread from `random_get` (the SDK's
//!   HashMaps already do so during `_initialize`); if `random_get` fails, std panics (trap).
//! - logs `wasi_calls: env <x-env value>, fs <x-fs value>, time <x-time value>` at info.
//!
//! The `wasm32-unknown-unknown` build imports no WASI: the prints are no-ops and it adds
//! `x-env: unset`, `x-fs: error`, `x-time: unsupported` (std has no clock there; `now()` would
//! panic, so it is not called) and `x-random: ok`.

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(WasiCalls) });
}}

struct WasiCalls;

impl Context for WasiCalls {}

#[cfg(target_os = "wasi")]
fn time_header() -> &'static str {
    use std::time::{SystemTime, UNIX_EPOCH};
    if SystemTime::now() > UNIX_EPOCH {
        "set"
    } else {
        "unset"
    }
}

#[cfg(not(target_os = "wasi"))]
fn time_header() -> &'static str {
    "unsupported"
}

impl HttpContext for WasiCalls {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        println!("hello from stdout");
        eprintln!("hello from stderr");

        let env = std::env::var("PWHOST_GREETING").unwrap_or_else(|_| "unset".to_string());
        self.add_http_request_header("x-env", &env);

        let fs = match std::fs::read_to_string("/etc/hostname") {
            Ok(_) => "ok",
            Err(_) => "error",
        };
        self.add_http_request_header("x-fs", fs);

        let time = time_header();
        self.add_http_request_header("x-time", time);

        let _hash = RandomState::new().hash_one("pwhost");
        self.add_http_request_header("x-random", "ok");

        info!("wasi_calls: env {}, fs {}, time {}", env, fs, time);
        Action::Continue
    }
}
