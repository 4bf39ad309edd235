//! `chain_probe`: shows where a plugin runs in a filter chain, which VM it shares, and which root
//! context serves it. Configured by JSON (every field optional):
//! `{"name": N, "reject": bool, "deny_on": HEADER, "panic_on": HEADER,
//!   "enqueue": {"vm_id": V, "queue": Q}, "register_queue": Q, "tick_ms": MS,
//!   "panic_at_tick": N}`.
//!
//! - `on_vm_start` logs `vm start <root_id>`; `on_configure` logs `configure <name> (root id
//!   <root_id>)` and returns false when `reject` is true. `name` defaults to the root id.
//! - With `register_queue`, the root registers that queue at configure; `on_queue_ready`
//!   dequeues every item and logs `<name> dequeued <item>`; an item `tick_ms=MS` (or
//!   `/tick_ms=MS`, a path) sets the tick period to MS. With `tick_ms`, it sets that tick
//!   period and logs `<name> tick <n>` on each tick; with `panic_at_tick` too, tick N panics
//!   (a trap) instead.
//! - Request headers: appends its name to request header `x-chain` (`a,b` after plugins `a`
//!   and `b`); adds `x-<name>-root: <root id>`; reads shared data key `seen` of its VM id into
//!   `x-<name>-saw` (`none` when missing) and appends its name to `seen`. With `enqueue`, it
//!   enqueues the request's `:path` into that queue and adds `x-<name>-enqueued: <status>`. A
//!   request carrying the `deny_on` header gets a local 403 (`x-denied-by: <name>`, body
//!   `denied by <name>`); one carrying `panic_on` makes the plugin panic (a trap).
//! - Response headers: appends its name to response header `x-chain` (reverse chain order).

use std::sync::Arc; // Arc, not Rc: the same source compiles into pwhost, whose contexts are Send
use std::time::Duration;

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(ProbeRoot { config: Arc::new(Config::default()), root_id: String::new(), ticks: 0 })
    });
}}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Queue {
    vm_id: String,
    queue: String,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    name: String,
    #[serde(default)]
    reject: bool,
    #[serde(default)]
    deny_on: Option<String>,
    #[serde(default)]
    panic_on: Option<String>,
    #[serde(default)]
    enqueue: Option<Queue>,
    #[serde(default)]
    register_queue: Option<String>,
    #[serde(default)]
    tick_ms: Option<u64>,
    #[serde(default)]
    panic_at_tick: Option<u32>,
    #[serde(skip)]
    root_id: String,
}

struct ProbeRoot {
    config: Arc<Config>,
    root_id: String,
    ticks: u32,
}

impl ProbeRoot {
    fn root_id(&self) -> String {
        self.get_property(vec!["plugin_root_id"])
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    }
}

impl Context for ProbeRoot {}

impl RootContext for ProbeRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        info!("vm start {}", self.root_id());
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        self.root_id = self.root_id();
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let mut config: Config = if raw.is_empty() {
            Config::default()
        } else {
            match serde_json::from_slice(&raw) {
                Ok(config) => config,
                Err(error) => {
                    info!("bad configuration: {}", error);
                    return false;
                }
            }
        };
        if config.name.is_empty() {
            config.name = self.root_id.clone();
        }
        config.root_id = self.root_id.clone();
        info!("configure {} (root id {})", config.name, self.root_id);
        if let Some(queue) = &config.register_queue {
            let id = self.register_shared_queue(queue);
            info!("{} registered queue {}", config.name, id);
        }
        if let Some(ms) = config.tick_ms {
            self.set_tick_period(Duration::from_millis(ms));
        }
        let reject = config.reject;
        self.config = Arc::new(config);
        !reject
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        if self.config.panic_at_tick == Some(self.ticks) {
            panic!(
                "{} was asked to panic at tick {}",
                self.config.name, self.ticks
            );
        }
        info!("{} tick {}", self.config.name, self.ticks);
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(item)) = self.dequeue_shared_queue(queue_id) {
            let item = String::from_utf8_lossy(&item);
            info!("{} dequeued {}", self.config.name, item);
            let period = item.trim_start_matches('/').strip_prefix("tick_ms=");
            if let Some(ms) = period.and_then(|ms| ms.parse().ok()) {
                self.set_tick_period(Duration::from_millis(ms));
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe {
            config: Arc::clone(&self.config),
        }))
    }
}

struct Probe {
    config: Arc<Config>,
}

impl Context for Probe {}

impl Probe {
    fn has_request_header(&self, name: &Option<String>) -> bool {
        name.as_ref()
            .is_some_and(|name| self.get_http_request_header(name).is_some())
    }
}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let name = self.config.name.clone();
        if self.has_request_header(&self.config.panic_on) {
            panic!("{} was asked to panic", name);
        }
        let chain = match self.get_http_request_header("x-chain") {
            Some(before) => format!("{},{}", before, name),
            None => name.clone(),
        };
        self.set_http_request_header("x-chain", Some(&chain));
        self.add_http_request_header(&format!("x-{}-root", name), &self.config.root_id);
        let (seen, cas) = self.get_shared_data("seen");
        let seen = seen.map(|v| String::from_utf8_lossy(&v).into_owned());
        self.add_http_request_header(
            &format!("x-{}-saw", name),
            seen.as_deref().unwrap_or("none"),
        );
        let now_seen = match seen {
            Some(before) if !before.is_empty() => format!("{},{}", before, name),
            _ => name.clone(),
        };
        let _ = self.set_shared_data("seen", Some(now_seen.as_bytes()), cas);
        if let Some(queue) = &self.config.enqueue {
            let path = self.get_http_request_header(":path").unwrap_or_default();
            let status = match self.resolve_shared_queue(&queue.vm_id, &queue.queue) {
                None => "not found".to_string(),
                Some(id) => match self.enqueue_shared_queue(id, Some(path.as_bytes())) {
                    Ok(()) => "ok".to_string(),
                    Err(status) => format!("{:?}", status),
                },
            };
            self.add_http_request_header(&format!("x-{}-enqueued", name), &status);
        }
        if self.has_request_header(&self.config.deny_on) {
            self.send_http_response(
                403,
                vec![("x-denied-by", name.as_str())],
                Some(format!("denied by {}", name).as_bytes()),
            );
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let name = &self.config.name;
        let chain = match self.get_http_response_header("x-chain") {
            Some(before) => format!("{},{}", before, name),
            None => name.clone(),
        };
        self.set_http_response_header("x-chain", Some(&chain));
        Action::Continue
    }
}
