//! `foreign_call`: `proxy_call_foreign_function`.
//!
//! On request headers (returns Continue):
//! - calls foreign function `reverse` with argument bytes `abc`; on success adds request header
//!   `x-foreign: <result as UTF-8, lossy>` (a host implementing `reverse` gives `x-foreign: cba`;
//!   empty value if the host returned no data); on error adds
//!   `x-foreign-error: <Status as Debug>` (e.g. `NotFound` when the host has no `reverse`);
//! - calls `no_such_function` (no arguments) and adds `x-foreign-missing: <Status as Debug>`, i.e.
//!   `x-foreign-missing: NotFound` from a correct host (`x-foreign-missing: Ok` if it succeeds).
//!
//! The SDK traps (panics) if the host answers with a status other than Ok, NotFound,
//! BadArgument, SerializationFailure or InternalFailure.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(ForeignCall) });
}}

struct ForeignCall;

impl Context for ForeignCall {}

impl HttpContext for ForeignCall {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.call_foreign_function("reverse", Some(b"abc")) {
            Ok(result) => self.add_http_request_header(
                "x-foreign",
                &String::from_utf8_lossy(&result.unwrap_or_default()),
            ),
            Err(status) => {
                self.add_http_request_header("x-foreign-error", &format!("{:?}", status))
            }
        }
        let missing = match self.call_foreign_function("no_such_function", None) {
            Ok(_) => "Ok".to_string(),
            Err(status) => format!("{:?}", status),
        };
        self.add_http_request_header("x-foreign-missing", &missing);
        Action::Continue
    }
}
