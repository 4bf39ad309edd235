//! `properties`: `proxy_get_property` / `proxy_set_property`.
//!
//! On request headers, reads these properties and adds each one that is present as a request
//! header (value bytes taken as UTF-8, lossily):
//!
//! | property                  | header                  |
//! |---------------------------|-------------------------|
//! | `request.path`            | `x-prop-request-path`   |
//! | `plugin_root_id`          | `x-prop-root-id`        |
//! | `plugin_name`             | `x-prop-plugin-name`    |
//! | `source.address`          | `x-prop-source-address` |
//!
//! Reads `no.such.property` and adds `x-prop-missing: none` when it is absent (the host must
//! answer NOT_FOUND, not an error). Sets `pwhost_test` = `set-by-plugin` and reads it back into
//! `x-prop-roundtrip` (expected `set-by-plugin`). The SDK panics (trap) if `proxy_set_property`
//! returns anything but OK, so a host that rejects the write shows up as a trapped request.
//! (The name is one path segment: Envoy stores a property under its whole path and reads by the
//! first segment, so a property set at `pwhost.test`, two segments, cannot be read back.)

use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Properties) });
}}

const PROPERTY_HEADERS: [(&[&str], &str); 4] = [
    (&["request", "path"], "x-prop-request-path"),
    (&["plugin_root_id"], "x-prop-root-id"),
    (&["plugin_name"], "x-prop-plugin-name"),
    (&["source", "address"], "x-prop-source-address"),
];

struct Properties;

impl Context for Properties {}

impl HttpContext for Properties {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for (path, header) in PROPERTY_HEADERS {
            if let Some(value) = self.get_property(path.to_vec()) {
                self.add_http_request_header(header, &String::from_utf8_lossy(&value));
            }
        }

        if self.get_property(vec!["no", "such", "property"]).is_none() {
            self.add_http_request_header("x-prop-missing", "none");
        }

        self.set_property(vec!["pwhost_test"], Some(b"set-by-plugin"));
        if let Some(value) = self.get_property(vec!["pwhost_test"]) {
            self.add_http_request_header("x-prop-roundtrip", &String::from_utf8_lossy(&value));
        }
        Action::Continue
    }
}
