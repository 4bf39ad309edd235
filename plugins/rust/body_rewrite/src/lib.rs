//! `body_rewrite`: buffered request/response body rewriting.
//!
//! - Request headers: removes `content-length` (the body may change size), returns Continue;
//!   a request with `x-keep-content-length` keeps it, to test how a host frames a body whose
//!   length a plugin changes without saying so.
//! - Request body: returns Pause (StopIterationAndBuffer) until `end_of_stream`, then reads the
//!   whole buffered body and replaces it with the same text upper-cased (Unicode upper-casing when
//!   the body is UTF-8, ASCII-only otherwise). Upstream should receive e.g. `HELLO WORLD`.
//! - Response body: likewise buffers until `end_of_stream`, then replaces every `hello` with
//!   `howdy`. The client should receive e.g. `howdy world`. For a request with
//!   `x-grow-response`, `hello` becomes `hello there` instead, and the response's
//!   `Content-Length` is left as it was, to test how a host treats a response body whose length
//!   a plugin changes without saying so.
//! - Response trailers: the body ended without an `end_of_stream` chunk (as a gRPC response
//!   does), so the buffered body is rewritten here the same way, and a trailer
//!   `x-body-rewritten: {n}` tells how many bytes were buffered.
//!
//! A host test should check that the body callbacks see the accumulated body size, that chunks
//! are buffered (not forwarded) while Pause is returned, and that `proxy_set_buffer_bytes` with
//! start 0 and size = whole buffer replaces the complete body.

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> {
        Box::new(BodyRewrite {
            grow_response: false,
        })
    });
}}

struct BodyRewrite {
    /// The request asked for a longer response body (`x-grow-response`).
    grow_response: bool,
}

impl Context for BodyRewrite {}

impl HttpContext for BodyRewrite {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self
            .get_http_request_header("x-keep-content-length")
            .is_none()
        {
            self.remove_http_request_header("content-length");
        }
        self.grow_response = self.get_http_request_header("x-grow-response").is_some();
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        if let Some(body) = self.get_http_request_body(0, body_size) {
            let upper = match String::from_utf8(body) {
                Ok(text) => text.to_uppercase().into_bytes(),
                Err(err) => err.into_bytes().to_ascii_uppercase(),
            };
            info!("request body: {} -> {} bytes", body_size, upper.len());
            self.set_http_request_body(0, body_size, &upper);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        if let Some(body) = self.get_http_response_body(0, body_size) {
            let rewritten = match self.grow_response {
                true => replace_all(&body, b"hello", b"hello there"),
                false => replace_all(&body, b"hello", b"howdy"),
            };
            info!("response body: {} bytes rewritten", body_size);
            self.set_http_response_body(0, body_size, &rewritten);
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        let body = self
            .get_http_response_body(0, usize::MAX)
            .unwrap_or_default();
        if !body.is_empty() {
            let rewritten = replace_all(&body, b"hello", b"howdy");
            self.set_http_response_body(0, body.len(), &rewritten);
        }
        info!(
            "response body at the trailers: {} bytes rewritten",
            body.len()
        );
        self.add_http_response_trailer("x-body-rewritten", &body.len().to_string());
        Action::Continue
    }
}

fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}
