//! `shared_data`: VM-wide key/value store (`proxy_get_shared_data` / `proxy_set_shared_data`)
//! with compare-and-swap.
//!
//! - Root `on_vm_start`: `set_shared_data("vm_started", Some(b"yes"), None)`.
//! - Each request (request headers): reads key `counter` with its CAS, parses it as decimal
//!   (missing or unparsable = 0), and writes `value + 1` back with that CAS (`None`, i.e. CAS 0 =
//!   unconditional, when the key was missing or the host returned CAS 0). On `CasMismatch` it
//!   re-reads and retries, at most 3 retries (4 attempts). Then adds request header
//!   `x-counter: <new value>` — so the 1st request through the VM sees `x-counter: 1`, the 2nd
//!   `2`, ... — or, if every attempt hit a CAS mismatch, `x-counter-error: CasMismatch`.
//! - Also reads key `vm_started` into request header `x-vm-started` (`yes`; `missing` if the key
//!   does not exist). Both headers are visible in the forwarded request.
//! - Logs `counter: <old> -> <new> (attempt <n>)` at info for the successful write.
//!
//! A host test can also preset `counter` to a decimal value before the request, or run several
//! plugins/VMs sharing the same vm_id to observe the store being shared.

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(SharedDataRoot) });
}}

const MAX_RETRIES: u32 = 3;

struct SharedDataRoot;

impl Context for SharedDataRoot {}

impl RootContext for SharedDataRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        self.set_shared_data("vm_started", Some(b"yes"), None)
            .is_ok()
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(SharedData))
    }
}

struct SharedData;

impl SharedData {
    /// Increments `counter` with CAS; returns the new value, or None after too many mismatches.
    fn increment_counter(&self) -> Option<u64> {
        for attempt in 1..=MAX_RETRIES + 1 {
            let (value, cas) = self.get_shared_data("counter");
            let old = value
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let new = old + 1;
            match self.set_shared_data("counter", Some(new.to_string().as_bytes()), cas) {
                Ok(()) => {
                    info!("counter: {} -> {} (attempt {})", old, new, attempt);
                    return Some(new);
                }
                Err(Status::CasMismatch) => continue,
                Err(_) => return None,
            }
        }
        None
    }
}

impl Context for SharedData {}

impl HttpContext for SharedData {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.increment_counter() {
            Some(value) => self.add_http_request_header("x-counter", &value.to_string()),
            None => self.add_http_request_header("x-counter-error", "CasMismatch"),
        }
        let vm_started = match self.get_shared_data("vm_started").0 {
            Some(value) => String::from_utf8_lossy(&value).into_owned(),
            None => "missing".to_string(),
        };
        self.add_http_request_header("x-vm-started", &vm_started);
        Action::Continue
    }
}
