//! `timers`: `proxy_set_tick_period_milliseconds` / `proxy_on_tick`.
//!
//! Root `on_configure` sets a 100 ms tick period and logs `tick period set: 100 ms`. Each
//! `on_tick` logs `tick <n>` (info; n = 1, 2, 3). On the 3rd tick the plugin sets the period to
//! 0, which stops the timer: a host test waiting e.g. 1 s sees exactly `tick 1`, `tick 2`,
//! `tick 3` and no `tick 4`. Also an HTTP filter that does nothing (Continue), so the plugin can
//! be loaded into an HTTP chain.

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Timers { ticks: 0 }) });
}}

const STOP_AFTER: u32 = 3;

struct Timers {
    ticks: u32,
}

impl Context for Timers {}

impl RootContext for Timers {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        self.set_tick_period(Duration::from_millis(100));
        info!("tick period set: 100 ms");
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        info!("tick {}", self.ticks);
        if self.ticks == STOP_AFTER {
            self.set_tick_period(Duration::ZERO);
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Passthrough))
    }
}

struct Passthrough;

impl Context for Passthrough {}

impl HttpContext for Passthrough {}
