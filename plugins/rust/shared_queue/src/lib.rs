//! `shared_queue`: shared queues (`proxy_register_shared_queue`, `proxy_resolve_shared_queue`,
//! `proxy_enqueue_shared_queue`, `proxy_dequeue_shared_queue`, `proxy_on_queue_ready`).
//!
//! - Root `on_vm_start`: registers queue `events` and logs `registered queue events: <id>`
//!   (info, id in decimal).
//! - Request headers: resolves the queue with vm_id `""` (the default vm id) and name `events`,
//!   enqueues the request's `:path` and adds request header `x-enqueued: <path>`. If the queue
//!   does not resolve it adds `x-enqueue-error: NotFound` instead; if the enqueue fails,
//!   `x-enqueue-error: <Status as Debug>`. Returns Continue.
//! - Root `on_queue_ready(queue_id)`: dequeues until empty, logging `dequeued: <item>` (info) for
//!   each item. So one request to `/a` produces `dequeued: /a` once the host delivers
//!   `proxy_on_queue_ready` to the registering root context.

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(SharedQueueRoot) });
}}

const QUEUE: &str = "events";

struct SharedQueueRoot;

impl Context for SharedQueueRoot {}

impl RootContext for SharedQueueRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        let id = self.register_shared_queue(QUEUE);
        info!("registered queue {}: {}", QUEUE, id);
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(item)) = self.dequeue_shared_queue(queue_id) {
            info!("dequeued: {}", String::from_utf8_lossy(&item));
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(SharedQueue))
    }
}

struct SharedQueue;

impl Context for SharedQueue {}

impl HttpContext for SharedQueue {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        match self.resolve_shared_queue("", QUEUE) {
            None => self.add_http_request_header("x-enqueue-error", "NotFound"),
            Some(queue_id) => match self.enqueue_shared_queue(queue_id, Some(path.as_bytes())) {
                Ok(()) => self.add_http_request_header("x-enqueued", &path),
                Err(status) => {
                    self.add_http_request_header("x-enqueue-error", &format!("{:?}", status))
                }
            },
        }
        Action::Continue
    }
}
