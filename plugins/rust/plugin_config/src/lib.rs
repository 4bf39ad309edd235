//! `plugin_config`: VM and plugin configuration handling.
//!
//! - `on_vm_start` reads the VM configuration and logs `vm config: {text}` (empty text if none).
//! - `on_configure` parses the plugin configuration as JSON `{"header": NAME, "value": VALUE}`
//!   and returns false (configure failure) when it is absent or does not parse; a host must
//!   then refuse to start the plugin (or report the failure) rather than run it.
//! - Each HTTP stream adds request header `NAME: VALUE`.
//!
//! Uses `get_type` + `create_http_context` on the root context (no `set_http_context`).

use log::{error, info};
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use serde::Deserialize;
use std::sync::Arc; // Arc, not Rc: the same source compiles into pwhost, whose contexts are Send

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(PluginConfigRoot { config: None })
    });
}}

#[derive(Deserialize)]
struct Config {
    header: String,
    value: String,
}

struct PluginConfigRoot {
    config: Option<Arc<Config>>,
}

impl Context for PluginConfigRoot {}

impl RootContext for PluginConfigRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        let vm_config = self.get_vm_configuration().unwrap_or_default();
        info!("vm config: {}", String::from_utf8_lossy(&vm_config));
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice::<Config>(&raw) {
            Ok(config) => {
                info!("plugin config: {}: {}", config.header, config.value);
                self.config = Some(Arc::new(config));
                true
            }
            Err(err) => {
                error!("invalid plugin configuration: {}", err);
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(PluginConfig {
            config: self.config.clone(),
        }))
    }
}

struct PluginConfig {
    config: Option<Arc<Config>>,
}

impl Context for PluginConfig {}

impl HttpContext for PluginConfig {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(config) = &self.config {
            self.add_http_request_header(&config.header, &config.value);
        }
        Action::Continue
    }
}
