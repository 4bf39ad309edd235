//! Resident memory over many configuration updates of a plugin serving requests: each update
//! loads the plugin with a new configuration (its module reused, as its VM key is unchanged),
//! puts it in force while a stream is in flight on the old VM copy, serves requests on the new
//! copy, then finishes the old stream, whose copy then goes away.
//!
//! Run with `cargo run --release -p pwhost-bench --bin reconfigure [-- RUNTIME [UPDATES]]`
//! (default: wasmtime, 1000 updates). Prints the resident set, threads, open files and memory
//! mappings after a warm-up of a tenth of the updates and at the end, and fails if the resident
//! set grew by more than 2% or threads, files or mappings leaked.

use std::process::ExitCode;
use std::sync::Arc;

use abi::{ContextId, Vm};
use lifecycle::{Admission, LivePlugins, LoadOptions, PluginId, Plugins, ThreadWorkers, Worker};
use pwhost::configured::BuildEngines;
use pwhost_bench::memory::Footprint;
use pwhost_bench::{plugin_path, BenchHost, REQUEST_HEADERS, RESPONSE_HEADERS};
use runtime_api::RuntimeConfig;

/// Requests served on each new deployment before the old stream finishes.
const REQUESTS_PER_UPDATE: usize = 10;

fn deployment(configuration: &str) -> lifecycle::Deployment {
    let yaml = format!(
        "name: bench\nconfiguration: {configuration:?}\nvm_config:\n  vm_id: bench\n  code: {{local: {{filename: {:?}}}}}\n",
        plugin_path("lifecycle_bench").to_string_lossy()
    );
    lifecycle::parse(&yaml).expect("the benchmark's configuration is valid")
}

/// Starts a stream on the deployment in force and runs its request headers.
fn begin(vm: &mut Vm, root: ContextId) -> ContextId {
    let context = vm.create_http_context_for(root).expect("stream context");
    vm.host_as::<BenchHost>()
        .expect("a BenchHost")
        .stream
        .begin(context.0);
    vm.on_request_headers(context, REQUEST_HEADERS.len(), false)
        .expect("request headers");
    context
}

/// Runs the rest of a stream.
fn finish(vm: &mut Vm, context: ContextId) {
    vm.host_as::<BenchHost>()
        .expect("a BenchHost")
        .stream
        .begin(context.0);
    vm.on_response_headers(context, RESPONSE_HEADERS.len(), false)
        .expect("response headers");
    vm.on_log(context).expect("log");
    vm.on_done(context).expect("done");
    vm.on_delete(context).expect("delete");
}

/// One request start to end on the deployment in force.
fn request(threads: &mut ThreadWorkers) {
    let (generation, worker) = threads.for_new_stream();
    let Admission::Run(held) = worker.admit(PluginId(0)) else {
        panic!("the plugin failed");
    };
    let vm = worker.vm(&held).expect("the stream's VM");
    let context = begin(vm, held.root());
    finish(vm, context);
    worker.release(held);
    threads.stream_ended(generation);
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = args.first().map_or("wasmtime", String::as_str);
    let updates: usize = args
        .get(1)
        .map_or(Ok(1000), |n| n.parse())
        .expect("UPDATES must be a number");
    let engines = BuildEngines::new(RuntimeConfig::default());
    let options = LoadOptions::default();
    let mut first = deployment("update 0");
    first.http_filters[0].vm.runtime = runtime.to_string();
    let plugins = Plugins::load(&first, &engines, &options, abi::SharedState::new())
        .expect("the plugin loads");
    let live = Arc::new(LivePlugins::new(plugins));
    let mut threads = ThreadWorkers::new(
        Arc::clone(&live),
        Box::new(|plugins| Worker::new(plugins, || Box::new(BenchHost::new()))),
    );
    let warm_up = (updates / 10).max(1);
    let mut after_warm_up = None;
    for update in 1..=updates {
        // A stream in flight across the update.
        let (old, worker) = threads.for_new_stream();
        let Admission::Run(held) = worker.admit(PluginId(0)) else {
            panic!("the plugin failed");
        };
        let context = begin(worker.vm(&held).expect("the stream's VM"), held.root());

        let mut next = deployment(&format!("update {update}"));
        next.http_filters[0].vm.runtime = runtime.to_string();
        let (_, current) = live.current();
        let plugins =
            Plugins::load_replacing(&current, &next, &engines, &options).expect("the update loads");
        drop(current);
        live.replace(plugins);

        for _ in 0..REQUESTS_PER_UPDATE {
            request(&mut threads);
        }
        let worker = threads.worker(old).expect("the old deployment drains");
        finish(worker.vm(&held).expect("the old copy"), context);
        worker.release(held);
        threads.stream_ended(old);
        assert_eq!(threads.draining(), 0, "the old copy went with its stream");
        if update == warm_up {
            after_warm_up = Some(Footprint::now());
        }
    }
    let end = Footprint::now();
    let start = after_warm_up.expect("warm-up done");
    let growth = end.rss_growth_percent(&start);
    println!(
        "{runtime}: {updates} updates, {} requests; after {warm_up} updates: {start:?}; at the end: {end:?}; RSS growth {growth:+.2}%",
        updates * (REQUESTS_PER_UPDATE + 1)
    );
    if growth > 2.0 || end.leaked_since(&start) {
        eprintln!("reconfigure: memory, threads, files or mappings grew");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
