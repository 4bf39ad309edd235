//! `metrics`: `proxy_define_metric`, `proxy_increment_metric`, `proxy_record_metric`,
//! `proxy_get_metric`.
//!
//! - Root `on_vm_start` defines counter `requests_total`, gauge `active_requests` and histogram
//!   `request_header_count`, and logs `metrics defined: <counter id> <gauge id> <histogram id>`.
//! - Request headers: counter += 1, gauge += 1, records the number of request headers (the
//!   `num_headers` argument) in the histogram, then reads the counter with `get_metric` and adds
//!   request header `x-requests-total: <value>` (1 on the first request, 2 on the second, ...).
//!   If `get_metric` fails it adds `x-requests-total-error: <Status as Debug>`.
//! - `on_log`: gauge -= 1 if this stream incremented it (so `active_requests` is back to 0 once a request finished).
//!
//! A host test can read the three metrics from the host side after some requests.

use log::info;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::sync::Arc; // Arc, not Rc: the same source compiles into pwhost, whose contexts are Send

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(MetricsRoot { ids: None }) });
}}

struct MetricIds {
    requests_total: u32,
    active_requests: u32,
    request_header_count: u32,
}

struct MetricsRoot {
    ids: Option<Arc<MetricIds>>,
}

impl Context for MetricsRoot {}

impl RootContext for MetricsRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        let ids = MetricIds {
            requests_total: hostcalls::define_metric(MetricType::Counter, "requests_total")
                .unwrap(),
            active_requests: hostcalls::define_metric(MetricType::Gauge, "active_requests")
                .unwrap(),
            request_header_count: hostcalls::define_metric(
                MetricType::Histogram,
                "request_header_count",
            )
            .unwrap(),
        };
        info!(
            "metrics defined: {} {} {}",
            ids.requests_total, ids.active_requests, ids.request_header_count
        );
        self.ids = Some(Arc::new(ids));
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Metrics {
            ids: self.ids.clone().expect("on_vm_start defines the metrics"),
            active: false,
        }))
    }
}

struct Metrics {
    ids: Arc<MetricIds>,
    /// Whether this stream incremented the gauge (so on_log only undoes its own increment).
    active: bool,
}

impl Context for Metrics {}

impl HttpContext for Metrics {
    fn on_http_request_headers(&mut self, num_headers: usize, _end_of_stream: bool) -> Action {
        hostcalls::increment_metric(self.ids.requests_total, 1).unwrap();
        hostcalls::increment_metric(self.ids.active_requests, 1).unwrap();
        self.active = true;
        hostcalls::record_metric(self.ids.request_header_count, num_headers as u64).unwrap();
        match hostcalls::get_metric(self.ids.requests_total) {
            Ok(value) => self.add_http_request_header("x-requests-total", &value.to_string()),
            Err(status) => {
                self.add_http_request_header("x-requests-total-error", &format!("{:?}", status))
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if std::mem::take(&mut self.active) {
            hostcalls::increment_metric(self.ids.active_requests, -1).unwrap();
        }
    }
}
