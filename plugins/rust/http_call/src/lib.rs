//! `http_call`: asynchronous HTTP callout gating a request.
//!
//! On request headers, dispatches `GET /auth` (authority `auth.local`, no body, 5 s timeout) to
//! upstream `auth_cluster` and returns Pause. In `on_http_call_response` (the SDK first calls
//! `proxy_set_effective_context` back to this stream):
//! - `:status` == `200`: adds request header `x-auth-user: <value of the callout's x-auth-user
//!   response header>` (empty if absent) and resumes the request (`proxy_continue_stream`).
//! - otherwise: sends a local response 401 whose body is the callout's response body.
//! - no headers at all: the call failed (reset, timeout, no upstream); its response maps do not
//!   exist then (Envoy answers BAD_ARGUMENT, on which the SDK's getters panic), so the plugin
//!   answers 503 `auth callout failed` without reading them.
//!
//! Each trailer of a 200 answer is added to the request as `x-auth-trailer-<name>: <value>`
//! (headers mode). With request header `x-call-trailer: <value>` the call is sent with request
//! trailer `x-call-trailer: <value>`; with `x-call-head` it is a `HEAD /auth` instead of a
//! `GET`.
//!
//! Logs `dispatched http call: token {token}` and `http call response: token {token}, body
//! {n} bytes`. If dispatch fails (e.g. unknown upstream) the plugin answers 503 locally. An
//! answer carrying header `x-panic` makes the plugin panic (a trap in its answer callback).
//!
//! With request header `x-check-body` the call checks the request body instead: the headers
//! go on, the body is buffered (StopIterationAndBuffer) until `end_of_stream`, then sent as
//! `POST /check` to `auth_cluster` while the plugin holds the request (Pause on the last
//! chunk). A 200 answer continues the request with its body unchanged; any other answers
//! 401 with the callout's body, and a failed call 503 as above.
//!
//! With `x-check-body: before-headers` the plugin checks the body the same way before the
//! headers go on: it holds the headers (Pause, which the host turns into StopIteration only
//! with `allow_on_headers_stop_iteration`; otherwise no body callback comes until they go
//! on), buffers the body to its end and sends it to `/check`. A 200 answer adds request
//! header `x-body-checked: <the answer's x-auth-user>` and continues; other answers as above.
//! So the upstream hears of a request only once its body passed.
//!
//! With `x-check-body: first-chunk` the plugin holds the headers until the first body chunk,
//! adds request header `x-first-chunk: <its size>` from the body callback and lets the chunk
//! (and so the headers) go on with Continue; later chunks pass untouched. With
//! `first-chunk-resume` it does the same but lets them go by calling `proxy_continue_stream`
//! from inside that body callback, which returns Pause (StopIterationAndBuffer).
//!
//! With `x-check-body: headers-held` the plugin makes the `GET /auth` call of the headers mode
//! and holds the headers while the body comes (Pause from every body callback, so the body is
//! buffered), until the answer adds `x-auth-user` and continues: the answer may come before,
//! during or after the body.
//!
//! With `x-check-body: notify-then-body` the plugin makes the `GET /auth` call of the headers
//! mode but lets the headers go on at once (Continue); the call's answer calls
//! `proxy_continue_stream` with nothing held (a continue the host must not keep for later).
//! The body is then checked at its end as with any other `x-check-body` value.
//!
//! With `x-check-body: refuse-body` the headers go on, the body is buffered to its end, and
//! the body callback of its end answers 403 `refused by its body` itself (no callout). With
//! `x-check-body: refuse-at-end` it does the same without buffering: every chunk before the
//! end goes on at once (Continue), as a plugin scanning a stream would let it, so the upstream
//! may have part of the body when the refusal comes.
//!
//! With request header `x-check-response` the request goes on unchecked (Continue) and the
//! response is checked instead: on response headers the plugin sends the `GET /auth` call and
//! holds the response (Pause); a 200 answer adds response header `x-response-checked: <the
//! answer's x-auth-user>` and resumes the response (`proxy_continue_stream`), other answers
//! 401 with the callout's body, and a failed call 503, as above (a reply in place of the
//! response the plugin holds).
//!
//! A request header `x-check-body-<plugin name>` (the plugin's `name` in its configuration)
//! comes before `x-check-body`, so two copies of this plugin in one chain can gate a request
//! in two ways.

use log::{info, warn};
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> {
        Box::new(HttpCall {
            mode: Mode::Headers,
            call_trailer: None,
            call_head: false,
        })
    });
}}

/// What the plugin gates, from header `x-check-body`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The headers, with a `GET /auth` (no `x-check-body`).
    Headers,
    /// The whole body, after the headers went on (`x-check-body` with any other value).
    Body,
    /// The whole body, while the headers wait (`before-headers`).
    BodyBeforeHeaders,
    /// The first body chunk's size, while the headers wait (`first-chunk`).
    FirstChunk,
    /// The same, let go with `proxy_continue_stream` (`first-chunk-resume`).
    FirstChunkResume,
    /// The headers, with a `GET /auth`, the body held meanwhile (`headers-held`).
    HeadersHeld,
    /// A `GET /auth` the headers do not wait for, then the whole body (`notify-then-body`).
    NotifyThenBody,
    /// The whole body, answered 403 from its last callback (`refuse-body`).
    RefuseBody,
    /// The body streamed on, answered 403 from its last callback (`refuse-at-end`).
    RefuseAtEnd,
    /// The response headers, with a `GET /auth` (`x-check-response`).
    Response,
    /// Nothing more (the first chunk went on, or the call's answer continued).
    Passed,
}

struct HttpCall {
    mode: Mode,
    /// A trailer to send with the call (`x-call-trailer`).
    call_trailer: Option<String>,
    /// The call is a `HEAD` (`x-call-head`).
    call_head: bool,
}

impl HttpContext for HttpCall {
    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if matches!(self.mode, Mode::FirstChunk | Mode::FirstChunkResume) {
            let resume = self.mode == Mode::FirstChunkResume;
            self.mode = Mode::Passed;
            self.add_http_request_header("x-first-chunk", &body_size.to_string());
            info!("first chunk: {} bytes, end {}", body_size, end_of_stream);
            if resume {
                self.resume_http_request();
                return Action::Pause;
            }
            return Action::Continue;
        }
        if matches!(self.mode, Mode::RefuseBody | Mode::RefuseAtEnd) {
            if end_of_stream {
                info!("refusing a body of {} bytes", body_size);
                self.send_http_response(403, vec![], Some(b"refused by its body\n"));
                return Action::Pause;
            }
            return match self.mode {
                Mode::RefuseAtEnd => Action::Continue,
                _ => Action::Pause,
            };
        }
        if self.mode == Mode::HeadersHeld {
            info!("body held: {} bytes, end {}", body_size, end_of_stream);
            return Action::Pause;
        }
        if !matches!(
            self.mode,
            Mode::Body | Mode::BodyBeforeHeaders | Mode::NotifyThenBody
        ) {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        match self.dispatch_http_call(
            "auth_cluster",
            vec![
                (":method", "POST"),
                (":path", "/check"),
                (":authority", "auth.local"),
            ],
            Some(&body),
            vec![],
            Duration::from_secs(5),
        ) {
            Ok(token) => {
                info!(
                    "dispatched body check: token {}, {} bytes",
                    token,
                    body.len()
                );
                Action::Pause
            }
            Err(status) => {
                warn!("dispatch_http_call failed: {:?}", status);
                self.send_http_response(503, vec![], Some(b"auth callout failed\n"));
                Action::Pause
            }
        }
    }

    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let own = self
            .get_property(vec!["plugin_name"])
            .map(|name| format!("x-check-body-{}", String::from_utf8_lossy(&name)))
            .and_then(|header| self.get_http_request_header(&header));
        self.call_trailer = self.get_http_request_header("x-call-trailer");
        self.call_head = self.get_http_request_header("x-call-head").is_some();
        if self.get_http_request_header("x-check-response").is_some() {
            self.mode = Mode::Response;
            return Action::Continue;
        }
        let mode = own.or_else(|| self.get_http_request_header("x-check-body"));
        match mode.as_deref() {
            Some("before-headers") => {
                self.mode = Mode::BodyBeforeHeaders;
                return Action::Pause;
            }
            Some("first-chunk") => {
                self.mode = Mode::FirstChunk;
                return Action::Pause;
            }
            Some("first-chunk-resume") => {
                self.mode = Mode::FirstChunkResume;
                return Action::Pause;
            }
            Some("headers-held") => self.mode = Mode::HeadersHeld,
            Some("notify-then-body") => self.mode = Mode::NotifyThenBody,
            Some("refuse-body") => {
                self.mode = Mode::RefuseBody;
                return Action::Continue;
            }
            Some("refuse-at-end") => {
                self.mode = Mode::RefuseAtEnd;
                return Action::Continue;
            }
            Some(_) => {
                self.mode = Mode::Body;
                return Action::Continue;
            }
            None => {}
        }
        match self.dispatch_auth() {
            Some(_) if self.mode == Mode::NotifyThenBody => Action::Continue,
            _ => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.mode != Mode::Response {
            return Action::Continue;
        }
        self.dispatch_auth();
        Action::Pause
    }
}

impl HttpCall {
    /// Sends `GET /auth` to `auth_cluster`; if it cannot be sent, answers 503 instead
    /// (`None`).
    fn dispatch_auth(&mut self) -> Option<u32> {
        let trailer = self.call_trailer.clone();
        let trailers = match &trailer {
            Some(value) => vec![("x-call-trailer", value.as_str())],
            None => vec![],
        };
        let method = if self.call_head { "HEAD" } else { "GET" };
        match self.dispatch_http_call(
            "auth_cluster",
            vec![
                (":method", method),
                (":path", "/auth"),
                (":authority", "auth.local"),
            ],
            None,
            trailers,
            Duration::from_secs(5),
        ) {
            Ok(token) => {
                info!("dispatched http call: token {}", token);
                Some(token)
            }
            Err(status) => {
                warn!("dispatch_http_call failed: {:?}", status);
                self.send_http_response(503, vec![], Some(b"auth callout failed\n"));
                None
            }
        }
    }
}

impl Context for HttpCall {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if num_headers == 0 {
            info!("http call failed: token {}", token_id);
            self.send_http_response(503, vec![], Some(b"auth callout failed\n"));
            return;
        }
        if let Some(value) = self.get_http_call_response_header("x-panic") {
            panic!("the call's answer asked for a panic: {}", value);
        }
        let user = self.get_http_call_response_header("x-auth-user");
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        info!(
            "http call response: token {}, body {} bytes",
            token_id,
            body.len()
        );
        if self.get_http_call_response_header(":status").as_deref() == Some("200") {
            if self.mode == Mode::Response {
                self.mode = Mode::Passed;
                self.add_http_response_header("x-response-checked", user.as_deref().unwrap_or(""));
                self.resume_http_response();
                return;
            }
            match self.mode {
                Mode::Headers | Mode::HeadersHeld => {
                    self.add_http_request_header("x-auth-user", user.as_deref().unwrap_or(""));
                    for (name, value) in self.get_http_call_response_trailers() {
                        self.add_http_request_header(&format!("x-auth-trailer-{name}"), &value);
                    }
                    if self.mode == Mode::HeadersHeld {
                        self.mode = Mode::Passed;
                    }
                }
                Mode::BodyBeforeHeaders => {
                    self.add_http_request_header("x-body-checked", user.as_deref().unwrap_or(""))
                }
                Mode::Body
                | Mode::NotifyThenBody
                | Mode::RefuseBody
                | Mode::RefuseAtEnd
                | Mode::FirstChunk
                | Mode::FirstChunkResume
                | Mode::Response
                | Mode::Passed => {}
            }
            self.resume_http_request();
        } else {
            self.send_http_response(401, vec![], Some(&body));
        }
    }
}
