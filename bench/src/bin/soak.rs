//! Soak runs on one engine: what the process holds (resident set, threads, open files, memory
//! mappings) over many requests through one VM copy, and over many VM failures under
//! `FAIL_RELOAD`.
//!
//! ```sh
//! cargo run --release -p pwhost-bench --features all-engines --bin soak -- requests ENGINE [N]
//! cargo run --release -p pwhost-bench --features all-engines --bin soak -- failures ENGINE [N]
//! ```
//!
//! * `requests`: N requests (default 1,000,000) through one worker's VM copy of
//!   `lifecycle_bench`, each the whole lifecycle (context, request and response headers, log,
//!   done, delete). Fails if the resident set grew by 1% or more after the warm-up (the first
//!   tenth), or threads, files or mappings leaked.
//! * `failures` (every engine but null): N failures (default 10,000) of a plugin whose request
//!   headers callback traps (`plugins/wat/trap_in_request_headers.wat`) under `FAIL_RELOAD`:
//!   each stream gets a new VM copy (the failed one goes away), fails in it and is failed
//!   closed. The worker's clock is moved past the reload backoff instead of waiting it out.
//!   Fails if the resident set grew by 2% or more after the warm-up, or threads, files or
//!   mappings leaked.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi::VmError;
use lifecycle::{Admission, LoadOptions, OnFailure, PluginId, Plugins, Worker};
use pwhost::configured::BuildEngines;
use pwhost_bench::memory::Footprint;
use pwhost_bench::{plugin_path, pwhost_request, BenchHost, RequestOutcome};
use runtime_api::RuntimeConfig;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, engine, count) = match args.as_slice() {
        [mode, engine] => (mode.as_str(), engine.as_str(), None),
        [mode, engine, count] => match count.parse::<usize>() {
            Ok(count) if count >= 10 => (mode.as_str(), engine.as_str(), Some(count)),
            _ => return usage(),
        },
        _ => return usage(),
    };
    let result = match mode {
        "requests" => requests(engine, count.unwrap_or(1_000_000)),
        "failures" => failures(engine, count.unwrap_or(10_000)),
        _ => return usage(),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: soak requests|failures ENGINE [N (at least 10)]");
    ExitCode::FAILURE
}

/// A worker of one plugin (Envoy's plugin configuration `yaml`) on `engine`, with `clock`.
fn worker(yaml: &str, engine: &str, clock: lifecycle::plugins::Clock) -> anyhow::Result<Worker> {
    let mut deployment = lifecycle::parse(yaml)?;
    deployment.http_filters[0].vm.runtime = engine.to_string();
    let engines = BuildEngines::new(RuntimeConfig::default());
    let plugins = Plugins::load(
        &deployment,
        &engines,
        &LoadOptions::default(),
        abi::SharedState::new(),
    )?;
    Ok(Worker::new(Arc::new(plugins), || Box::new(BenchHost::new())).with_clock(clock))
}

/// One stream through the plugin's VM copy on `worker`: admitted, the whole request
/// ([`pwhost_request`]), released. `None`: no VM copy was admitted (the plugin failed).
fn stream(worker: &mut Worker) -> Option<Result<RequestOutcome, VmError>> {
    let Admission::Run(held) = worker.admit(PluginId(0)) else {
        return None;
    };
    let vm = worker.vm(&held).expect("the stream's own VM copy");
    let outcome = pwhost_request(vm);
    worker.release(held);
    Some(outcome)
}

fn requests(engine: &str, count: usize) -> anyhow::Result<bool> {
    // The null runtime runs the plugin's native build (a proxy-wasm SDK library).
    let plugin = if engine == "null" {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../plugins/dist/native/liblifecycle_bench.so")
    } else {
        plugin_path("lifecycle_bench")
    };
    let yaml = format!(
        "name: soak\nvm_config:\n  code: {{local: {{filename: {:?}}}}}\n",
        plugin.to_string_lossy()
    );
    let mut worker = worker(&yaml, engine, Arc::new(Instant::now))?;
    let warm_up = count / 10;
    let mut after_warm_up = None;
    for request in 1..=count {
        match stream(&mut worker) {
            None => anyhow::bail!("the plugin failed to start"),
            Some(Err(e)) => anyhow::bail!("request {request} failed: {e}"),
            Some(Ok(_)) => {}
        }
        if request == warm_up {
            after_warm_up = Some(Footprint::now());
        }
    }
    let counters = worker.plugins().counters(PluginId(0)).snapshot();
    anyhow::ensure!(
        counters.iter().all(|(_, value)| *value == 0),
        "the one VM copy failed or was replaced: {counters:?}"
    );
    let start = after_warm_up.expect("the warm-up is part of the run");
    Ok(report(
        engine,
        &format!("{count} requests"),
        warm_up,
        start,
        1.0,
    ))
}

fn failures(engine: &str, count: usize) -> anyhow::Result<bool> {
    anyhow::ensure!(
        engine != "null",
        "the failures soak needs a plugin that traps (a WebAssembly module); the null runtime runs native plugins"
    );
    let plugin = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist/wat/trap_in_request_headers.wasm");
    let yaml = format!(
        "name: soak\nfailure_policy: FAIL_RELOAD\n\
         reload_config: {{backoff: {{base_interval: 1s, max_interval: 1s}}}}\n\
         vm_config:\n  code: {{local: {{filename: {:?}}}}}\n",
        plugin.to_string_lossy()
    );
    // The worker's clock, moved past the backoff (at most 1.5 s with jitter) after each failure.
    let start = Instant::now();
    let skipped_ms = Arc::new(AtomicU64::new(0));
    let clock = {
        let skipped_ms = Arc::clone(&skipped_ms);
        Arc::new(move || start + Duration::from_millis(skipped_ms.load(Ordering::Relaxed)))
    };
    let mut worker = worker(&yaml, engine, clock)?;
    let warm_up = count / 10;
    let mut after_warm_up = None;
    for failure in 1..=count {
        let error = match stream(&mut worker) {
            None => anyhow::bail!("failure {failure}: no new VM copy after the backoff"),
            Some(Ok(_)) => anyhow::bail!("failure {failure}: the request did not trap"),
            Some(Err(error)) => error,
        };
        let outcome = worker.failed(PluginId(0), &error);
        anyhow::ensure!(
            outcome == OnFailure::FailClosed,
            "failure {failure}: the stream was not failed closed"
        );
        // Within the backoff, streams are failed closed without a VM.
        anyhow::ensure!(
            matches!(worker.admit(PluginId(0)), Admission::FailClosed),
            "failure {failure}: a stream within the backoff was not failed closed"
        );
        skipped_ms.fetch_add(2_000, Ordering::Relaxed);
        if failure == warm_up {
            after_warm_up = Some(Footprint::now());
        }
    }
    let counters = worker.plugins().counters(PluginId(0)).snapshot();
    println!("{engine}: counters {counters:?}");
    let counter = |name| {
        counters
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v as usize)
    };
    anyhow::ensure!(
        counter("failed_by_trap") == Some(count)
            && counter("reloads") == Some(count - 1)
            && counter("closed") == Some(2 * count),
        "the counters do not add up to {count} failures"
    );
    let start = after_warm_up.expect("the warm-up is part of the run");
    Ok(report(
        engine,
        &format!("{count} VM failures under FAIL_RELOAD"),
        warm_up,
        start,
        2.0,
    ))
}

/// Prints the footprint after the warm-up and now, and says whether the resident set grew by
/// less than `limit_percent` and nothing leaked.
fn report(engine: &str, what: &str, warm_up: usize, start: Footprint, limit_percent: f64) -> bool {
    let end = Footprint::now();
    let growth = end.rss_growth_percent(&start);
    println!(
        "{engine}: {what}; after {warm_up}: {start:?}; at the end: {end:?}; RSS growth {growth:+.2}%"
    );
    let mut ok = true;
    if growth >= limit_percent {
        eprintln!("{engine}: the resident set grew by {growth:.2}% (limit {limit_percent}%)");
        ok = false;
    }
    if end.leaked_since(&start) {
        eprintln!("{engine}: threads, files or mappings leaked");
        ok = false;
    }
    ok
}
