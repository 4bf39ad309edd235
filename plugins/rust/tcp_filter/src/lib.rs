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
//!
//! All logs at info.

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(TcpFilterRoot) });
}}

struct TcpFilterRoot;

impl Context for TcpFilterRoot {}

impl RootContext for TcpFilterRoot {
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(TcpFilter {
            seen_upstream: false,
        }))
    }
}

struct TcpFilter {
    seen_upstream: bool,
}

impl Context for TcpFilter {}

impl StreamContext for TcpFilter {
    fn on_new_connection(&mut self) -> Action {
        info!("new connection");
        Action::Continue
    }

    fn on_downstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        if let Some(data) = self.get_downstream_data(0, data_size) {
            self.set_downstream_data(0, data_size, &data.to_ascii_uppercase());
        }
        Action::Continue
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
}
