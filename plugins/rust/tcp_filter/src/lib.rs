//! `tcp_filter`: a network (TCP) filter, i.e. a StreamContext plugin (`proxy_on_new_connection`,
//! `proxy_on_downstream_data`, `proxy_on_upstream_data`, `proxy_on_downstream_connection_close`,
//! `proxy_on_upstream_connection_close`, buffer types DownstreamData/UpstreamData).
//!
//! Root `get_type` returns StreamContext and `create_stream_context` creates the filter.
//! - `on_new_connection`: logs `new connection`, Continue.
//! - `on_downstream_data(size, eos)`: reads the chunk (`DownstreamData` 0..size), replaces it
//!   with its ASCII upper-cased copy (`set_downstream_data(0, size, upper)`), Continue. The
//!   upstream receives `HELLO` for `hello`.
//! - `on_upstream_data(size, eos)`: on the first upstream chunk only, prepends `[up] `
//!   (`set_upstream_data(0, 0, b"[up] ")`, an insertion at offset 0); Continue. The client
//!   receives `[up] <upstream bytes...>`, and later chunks unchanged.
//! - `on_downstream_close(peer)` / `on_upstream_close(peer)`: log `downstream closed by <peer>` /
//!   `upstream closed by <peer>` with the PeerType as Debug (`Unknown`, `Local` or `Remote`).
//! - `on_log`: logs `connection ended: <received> bytes from the client, <sent> to it`, the
//!   connection's `request.size` and `response.size` (Envoy's bytes received from and sent to
//!   the downstream; `unknown` where the host has none).
//!
//! Configured `gate CLUSTER`, the filter also holds each connection's data from downstream
//! (upper-cased as above, and pausing) until an HTTP call answers whether it may go on: on the
//! first downstream chunk it sends `POST /gate` (`:authority gate`, the chunk as the body) to
//! `CLUSTER`, logs `gate answered <status>` when the answer comes (`nothing` for a call that
//! failed), and continues the connection (`resume_downstream`) on 200, else closes it
//! (`close_downstream`). A call that cannot be made closes the connection at once; a connection
//! that ends before sending anything goes on unjudged.
//!
//! All logs at info.

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(TcpFilterRoot { gate: None })
    });
}}

struct TcpFilterRoot {
    /// The cluster that says whether a connection may go on (`gate CLUSTER`).
    gate: Option<String>,
}

impl Context for TcpFilterRoot {}

impl RootContext for TcpFilterRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let configuration = self
            .get_plugin_configuration()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        self.gate = configuration
            .trim()
            .strip_prefix("gate ")
            .map(|cluster| cluster.trim().to_string());
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(TcpFilter {
            seen_upstream: false,
            gate: self.gate.clone().map(|cluster| Gate {
                cluster,
                asked: false,
                open: false,
            }),
        }))
    }
}

struct TcpFilter {
    seen_upstream: bool,
    gate: Option<Gate>,
}

/// Where a gated connection stands.
struct Gate {
    cluster: String,
    /// The call went out.
    asked: bool,
    /// The answer let the connection go on.
    open: bool,
}

impl Context for TcpFilter {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        // A call that failed has no answer to read (reading one is an error, as in Envoy).
        let status = if headers == 0 {
            String::from("nothing")
        } else {
            self.get_http_call_response_header(":status")
                .unwrap_or_default()
        };
        info!("gate answered {status}");
        if status == "200" {
            if let Some(gate) = &mut self.gate {
                gate.open = true;
            }
            self.resume_downstream();
        } else {
            self.close_downstream();
        }
    }
}

impl StreamContext for TcpFilter {
    fn on_new_connection(&mut self) -> Action {
        info!("new connection");
        Action::Continue
    }

    fn on_downstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        let data = self.get_downstream_data(0, data_size).unwrap_or_default();
        if !data.is_empty() {
            self.set_downstream_data(0, data_size, &data.to_ascii_uppercase());
        }
        let Some(gate) = &mut self.gate else {
            return Action::Continue;
        };
        // Nothing to judge yet (a connection that ends before sending anything goes on).
        if gate.open || (!gate.asked && data.is_empty()) {
            return Action::Continue;
        }
        if !gate.asked {
            gate.asked = true;
            let cluster = gate.cluster.clone();
            let called = self.dispatch_http_call(
                &cluster,
                vec![
                    (":method", "POST"),
                    (":path", "/gate"),
                    (":authority", "gate"),
                ],
                Some(&data),
                vec![],
                Duration::from_secs(5),
            );
            if called.is_err() {
                info!("gate call failed");
                self.close_downstream();
            }
        }
        Action::Pause
    }

    fn on_upstream_data(&mut self, _data_size: usize, _end_of_stream: bool) -> Action {
        if !self.seen_upstream {
            self.seen_upstream = true;
            self.set_upstream_data(0, 0, b"[up] ");
        }
        Action::Continue
    }

    fn on_downstream_close(&mut self, peer_type: PeerType) {
        info!("downstream closed by {:?}", peer_type);
    }

    fn on_upstream_close(&mut self, peer_type: PeerType) {
        info!("upstream closed by {:?}", peer_type);
    }

    fn on_log(&mut self) {
        // An int property is 8 bytes, little-endian.
        let size = |path: Vec<&str>| {
            self.get_property(path)
                .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                .map_or_else(
                    || "unknown".to_string(),
                    |bytes| i64::from_le_bytes(bytes).to_string(),
                )
        };
        let received = size(vec!["request", "size"]);
        let sent = size(vec!["response", "size"]);
        info!("connection ended: {received} bytes from the client, {sent} to it");
    }
}
