//! `pwhost bench`: how long a plugin takes per request and per VM start on each engine.
//!
//! The request loop is the first HTTP exchange of the scenario (default `GET /`) through the full
//! lifecycle: create the context, request headers, response headers, `on_log`, `on_done`,
//! `on_delete`. It runs on the same in-memory host as `pwhost run`, so the figures include that
//! host's bookkeeping; `cargo bench -p pwhost-bench` measures the ABI alone against a floor.
//!
//! [`plot_matrix`] draws figures as an SVG picture (`pwhost bench --plot FILE.svg`); the
//! benchmark crate's `matrix` binary fills in each engine's floor and draws with it too.

mod plot;

pub use plot::plot_matrix;

use std::time::{Duration, Instant};

use abi::{HeaderMap, InMemoryHost, Plugin, Vm, VmError};
use serde::{Deserialize, Serialize};

use crate::scenario::{in_memory_host, HttpExchange};

/// One engine's figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EngineFigures {
    /// The engine.
    pub runtime: String,
    /// Mean time per request, in nanoseconds.
    pub request_ns: f64,
    /// Mean time to create, start and configure a VM copy (and drop it), in microseconds.
    pub vm_start_us: f64,
    /// The same request on the engine's floor (a host written by hand on the engine's own API
    /// for one plugin), in nanoseconds, when one was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor_request_ns: Option<f64>,
    /// The floor's VM start, in microseconds, when one was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor_vm_start_us: Option<f64>,
    /// Why the request timed is not the plugin's whole request, if it is not: it paused the
    /// request, answered it itself, or made calls, which `bench` does not answer (so the
    /// figures time that path, and past 1024 open calls the refusal of each new one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl EngineFigures {
    /// pwhost's time per request over the floor's, when there is a floor.
    pub fn request_ratio(&self) -> Option<f64> {
        self.floor_request_ns.map(|floor| self.request_ns / floor)
    }

    /// pwhost's VM start over the floor's, when there is a floor.
    pub fn vm_start_ratio(&self) -> Option<f64> {
        self.floor_vm_start_us.map(|floor| self.vm_start_us / floor)
    }
}

fn headers(list: &Option<Vec<(String, String)>>, default: &[(&str, &str)]) -> HeaderMap {
    match list {
        Some(list) => list
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
            .collect(),
        None => default
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
            .collect(),
    }
}

/// Runs one request through `vm`; why it did not run straight through the plugin, if it did
/// not (see [`EngineFigures::note`]).
fn request(
    vm: &mut Vm,
    request_headers: &HeaderMap,
    response_headers: &HeaderMap,
) -> Result<Option<&'static str>, VmError> {
    let context = vm.create_http_context()?;
    let host = in_memory_host(vm);
    host.stream(context).request_headers = request_headers.clone();
    let calls_before = host.http_calls.len() + host.grpc_calls.len();
    let on_request = vm.on_request_headers(context, request_headers.len(), true)?;
    let host = in_memory_host(vm);
    host.stream(context).response_headers = response_headers.clone();
    let on_response = vm.on_response_headers(context, response_headers.len(), true)?;
    vm.on_log(context)?;
    vm.on_done(context)?;
    vm.on_delete(context)?;
    let host = in_memory_host(vm);
    let answered_itself = host
        .streams
        .remove(&context)
        .is_some_and(|stream| stream.local_response.is_some());
    let called = host.http_calls.len() + host.grpc_calls.len() > calls_before;
    // Keep the log, and the calls nothing answers, from growing over millions of requests.
    host.logs.clear();
    host.http_calls.clear();
    host.grpc_calls.clear();
    let continued = |action| action == abi::HeadersAction::Continue;
    Ok(if called {
        Some("the plugin makes calls, which bench does not answer")
    } else if answered_itself {
        Some("the plugin answers the request itself")
    } else if !continued(on_request) || !continued(on_response) {
        Some("the plugin pauses the request, which bench does not resume")
    } else {
        None
    })
}

fn started_vm(plugin: &Plugin) -> Result<Vm, VmError> {
    let mut vm = Vm::new(plugin, Box::new(InMemoryHost::new()))?;
    vm.start()?;
    vm.configure()?;
    Ok(vm)
}

/// Measures `plugin` with `exchange`: `requests` requests on one VM after a warm-up, and
/// `starts` VM starts.
pub fn measure(
    plugin: &Plugin,
    exchange: &HttpExchange,
    requests: u32,
    starts: u32,
) -> Result<EngineFigures, VmError> {
    let request_headers = headers(
        &exchange.request_headers,
        &[
            (":method", "GET"),
            (":path", "/"),
            (":authority", "localhost"),
            (":scheme", "http"),
        ],
    );
    let response_headers = headers(&exchange.response_headers, &[(":status", "200")]);
    let mut vm = started_vm(plugin)?;
    let mut note = None;
    for _ in 0..requests.div_ceil(10) {
        note = note.or(request(&mut vm, &request_headers, &response_headers)?);
    }
    let begin = Instant::now();
    for _ in 0..requests {
        request(&mut vm, &request_headers, &response_headers)?;
    }
    let request_time = begin.elapsed();
    let begin = Instant::now();
    for _ in 0..starts {
        drop(started_vm(plugin)?);
    }
    let start_time = begin.elapsed();
    let mean = |total: Duration, count: u32| total.as_secs_f64() / f64::from(count.max(1));
    Ok(EngineFigures {
        runtime: plugin.runtime_name().to_string(),
        request_ns: mean(request_time, requests) * 1e9,
        vm_start_us: mean(start_time, starts) * 1e6,
        floor_request_ns: None,
        floor_vm_start_us: None,
        note: note.map(|why| {
            format!("{why}: the figures time that, not the whole request (`pwhost run` shows it)")
        }),
    })
}
