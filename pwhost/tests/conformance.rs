//! The conformance suite: every case in `conformance/*.yaml` runs on every engine compiled in,
//! against every build of its plugin (Rust SDK plugins for wasm32-unknown-unknown and
//! wasm32-wasip1), and must produce the same report.
//!
//! A case names a plugin under `plugins/dist/` (built by `bash plugins/build.sh`) and its
//! configuration — or gives a whole `config` as `pwhost run --config` takes it (Envoy's or Traffic
//! Server's YAML: a filter chain, VM sharing, failure policies), code file names relative to
//! `plugins/dist/` — a scenario, and either `expect` — a subset of the `pwhost run` JSON report
//! that must match (objects: the keys given; lists: same length, element by element;
//! `{contains: s}`: a string containing `s`; `{includes: [...]}`: a list with these entries, in
//! this order, among others) — or `expect_load_error`, a substring of the load
//! error, or `expect_run_error`, a substring of the error that ends the run (e.g. a VM that
//! cannot start).
//!
//! A `config` case runs on every engine (its `vm_config.runtime` replaced); on the null runtime
//! it runs when every plugin it names (`rust/NAME.wasm`) is compiled in, as `inline_string: NAME`.
//! With `serve`, the test runs an HTTP server on 127.0.0.1 for the case's remote code: `{url}`
//! in the config stands for the file's address and `{sha256}` for its digest. With
//! `precompiled: FILE`, the case runs on each engine that can precompile, with `{precompiled}`
//! in the config standing for FILE with that engine's precompiled section added (as
//! `pwhost precompile` adds it, for the engine configuration the case runs with); with
//! `precompiled_artifact_of: FILE2` too, the section carries FILE2's code instead, so that
//! what runs shows whether the section or the bytecode was loaded.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pwhost::runtimes;
use pwhost::scenario::{self, FailurePolicy, Scenario};
use runtime_api::RuntimeConfig;
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    description: String,
    #[serde(default)]
    plugin: String,
    /// A whole configuration instead of `plugin` and its settings.
    #[serde(default)]
    config: Option<serde_yaml::Value>,
    /// A file served over HTTP for the configuration's remote code.
    #[serde(default)]
    serve: Option<Serve>,
    /// A module (under `plugins/dist/`) to precompile for the engine under test.
    #[serde(default)]
    precompiled: Option<String>,
    /// Another module whose code goes into `precompiled`'s section instead of its own.
    #[serde(default)]
    precompiled_artifact_of: Option<String>,
    #[serde(default)]
    plugin_config: String,
    #[serde(default)]
    vm_config: String,
    #[serde(default)]
    root_id: String,
    #[serde(default)]
    deadline_ms: Option<u64>,
    /// The engines' memory cap in MiB (default: proxy-wasm-cpp-host's 1 GiB).
    #[serde(default)]
    max_memory_mib: Option<u64>,
    /// Envoy's `allow_on_headers_stop_iteration` for the plugin.
    #[serde(default)]
    allow_on_headers_stop_iteration: bool,
    /// Environment variables for WASI, as `KEY=VALUE`.
    #[serde(default)]
    environment: Vec<String>,
    #[serde(default)]
    scenario: Scenario,
    #[serde(default)]
    expect: Option<Value>,
    #[serde(default)]
    expect_load_error: Option<String>,
    #[serde(default)]
    expect_run_error: Option<String>,
    /// Why the case cannot run on a proxy-wasm SDK library (`.so`) on the null runtime; its
    /// compiled-in build (`native:NAME`) still runs it.
    #[serde(default)]
    not_on_sdk_libraries: Option<String>,
}

impl Case {
    /// How the engines run the case's plugin: its deadline (10 s unless it says) and memory cap
    /// (proxy-wasm-cpp-host's 1 GiB unless it says).
    fn runtime_config(&self) -> RuntimeConfig {
        RuntimeConfig {
            call_deadline: Some(Duration::from_millis(self.deadline_ms.unwrap_or(10_000))),
            max_memory_bytes: Some(
                self.max_memory_mib
                    .map_or(RuntimeConfig::DEFAULT_MAX_MEMORY_BYTES, |mib| mib << 20),
            ),
            ..RuntimeConfig::default()
        }
    }
}

/// What the case's HTTP server serves: `file` (under `plugins/dist/`), answering request `i`
/// as `answers[i]` says (the last one after that).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Serve {
    file: String,
    #[serde(default)]
    answers: Vec<ServeAnswer>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeAnswer {
    #[serde(default = "ok_status")]
    status: u16,
    #[serde(default)]
    delay_ms: u64,
}

fn ok_status() -> u16 {
    200
}

/// An HTTP server on 127.0.0.1 for one case; stopped when dropped.
struct CodeServer {
    url: String,
    sha256: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CodeServer {
    fn start(serve: &Serve) -> Result<CodeServer, String> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let body = std::fs::read(root().join("plugins/dist").join(&serve.file))
            .map_err(|e| format!("{}: {e}", serve.file))?;
        let sha256 = lifecycle::remote::sha256_hex(&body);
        let server = tiny_http::Server::http("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = server.server_addr().to_ip().ok_or("no IP address")?.port();
        let answers = if serve.answers.is_empty() {
            vec![ServeAnswer {
                status: 200,
                delay_ms: 0,
            }]
        } else {
            serve.answers.clone()
        };
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopping = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut served = 0;
            while !stopping.load(Ordering::Relaxed) {
                let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(20)) else {
                    continue;
                };
                let answer = answers[served.min(answers.len() - 1)].clone();
                served += 1;
                let body = body.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(answer.delay_ms));
                    let response =
                        tiny_http::Response::from_data(body).with_status_code(answer.status);
                    let _ = request.respond(response);
                });
            }
        });
        Ok(CodeServer {
            url: format!("http://127.0.0.1:{port}/plugin.wasm"),
            sha256,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for CodeServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

/// The builds of a case's plugin that `runtime` runs.
///
/// On WebAssembly engines: both targets for Rust SDK plugins, the one module otherwise; a case
/// that names a file (`rust/NAME.wasip1.wasm`) runs that build only. On the null runtime: the
/// same Rust SDK plugin built as a native library, and compiled in from the same source
/// (`native:NAME`) where `native-plugins` includes it;
/// other plugins are WebAssembly only.
fn plugin_builds(case: &Case, runtime: &str) -> Vec<String> {
    let dist = root().join("plugins/dist");
    let plugin = &case.plugin;
    let mut builds: Vec<PathBuf> = Vec::new();
    if runtime == "null" {
        let Some(name) = plugin.strip_prefix("rust/") else {
            return Vec::new();
        };
        if name.ends_with(".wasm") {
            return Vec::new();
        }
        if case.not_on_sdk_libraries.is_none() {
            builds.push(dist.join(format!("native/lib{name}.so")));
        }
        if pwhost::plugins::native_plugins().contains(&name) {
            builds.push(PathBuf::from(format!("native:{name}")));
        }
    } else if plugin.ends_with(".wasm") {
        builds.push(dist.join(plugin));
    } else {
        builds.push(dist.join(format!("{plugin}.wasm")));
        if plugin.starts_with("rust/") {
            builds.push(dist.join(format!("{plugin}.wasip1.wasm")));
        }
    }
    for build in &builds {
        assert!(
            build.to_string_lossy().starts_with("native:") || build.exists(),
            "{} is missing: run `bash plugins/build.sh` first",
            build.display()
        );
    }
    builds
        .into_iter()
        .map(|b| b.to_string_lossy().into_owned())
        .collect()
}

/// Checks that `actual` contains everything in `expected`; returns where it differs.
fn check(expected: &Value, actual: &Value, at: &str) -> Result<(), String> {
    match (expected, actual) {
        (Value::Object(e), Value::String(a)) if e.len() == 1 && e.contains_key("contains") => {
            let needle = e["contains"].as_str().unwrap_or_default();
            if a.contains(needle) {
                Ok(())
            } else {
                Err(format!("{at}: {a:?} does not contain {needle:?}"))
            }
        }
        (Value::Object(e), Value::Array(a)) if e.len() == 1 && e.contains_key("includes") => {
            let wanted = e["includes"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            let mut rest = a.iter();
            for (i, entry) in wanted.iter().enumerate() {
                if !rest.any(|actual| check(entry, actual, at).is_ok()) {
                    return Err(format!(
                        "{at}: no entry {entry} (entry {i}) in order in {actual}"
                    ));
                }
            }
            Ok(())
        }
        (Value::Object(e), Value::Object(a)) => {
            e.iter().try_for_each(|(key, value)| match a.get(key) {
                Some(actual) => check(value, actual, &format!("{at}.{key}")),
                None => Err(format!("{at}.{key}: missing from the report")),
            })
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                return Err(format!(
                    "{at}: expected {} entries, got {}: {}",
                    e.len(),
                    a.len(),
                    actual
                ));
            }
            e.iter()
                .zip(a)
                .enumerate()
                .try_for_each(|(i, (e, a))| check(e, a, &format!("{at}[{i}]")))
        }
        // YAML numbers and JSON numbers compare by value.
        (Value::Number(e), Value::Number(a)) if e.as_f64() == a.as_f64() => Ok(()),
        _ if expected == actual => Ok(()),
        _ => Err(format!("{at}: expected {expected}, got {actual}")),
    }
}

/// The deployment of a `config` case for `runtime`: every plugin on that engine; on the null
/// runtime, each `rust/NAME.wasm` as compiled-in plugin NAME (`None` if one is not compiled in).
fn deployment_for(
    case: &Case,
    runtime: &str,
    server: Option<&CodeServer>,
    precompiled: Option<&Path>,
) -> Result<Option<lifecycle::Deployment>, String> {
    let config = case.config.as_ref().ok_or("no config")?;
    let mut text = serde_yaml::to_string(config).map_err(|e| e.to_string())?;
    if let Some(server) = server {
        text = text
            .replace("{url}", &server.url)
            .replace("{sha256}", &server.sha256);
    }
    if let Some(precompiled) = precompiled {
        text = text.replace("{precompiled}", &precompiled.to_string_lossy());
    }
    let mut deployment = match lifecycle::parse(&text) {
        Ok(deployment) => deployment,
        // A configuration error is what some cases check.
        Err(error) => return Err(format!("config error: {error}")),
    };
    let plugins = deployment
        .http_filters
        .iter_mut()
        .chain(&mut deployment.network_filters)
        .chain(deployment.services.iter_mut().map(|s| &mut s.plugin));
    let available = runtimes::available();
    for plugin in plugins {
        // A runtime name no engine stands for stays, for the error it is to give.
        if plugin.vm.runtime.is_empty()
            || lifecycle::runtime_name::resolve(&plugin.vm.runtime, available).is_ok()
        {
            plugin.vm.runtime = runtime.to_string();
        }
        if runtime != "null" {
            continue;
        }
        // Fetched code is WebAssembly.
        let lifecycle::CodeSource::File(path) = &plugin.vm.code else {
            return Ok(None);
        };
        let path = path.to_string_lossy();
        let native = path
            .strip_prefix("rust/")
            .and_then(|file| file.strip_suffix(".wasm"))
            .filter(|name| pwhost::plugins::native_plugins().contains(name));
        match native {
            Some(name) => plugin.vm.code = lifecycle::CodeSource::String(name.to_string()),
            None => return Ok(None),
        }
    }
    Ok(Some(deployment))
}

/// Runs a `config` case on `runtime_name`; `None` if it does not run there.
fn run_config_case(name: &str, case: &Case, runtime_name: &str) -> Option<Result<(), String>> {
    let context = format!("{name} on {runtime_name}");
    // A server per run; the first run fetches, later ones find a module that was fetched in
    // the process's memory cache (as another Envoy listener would), while failures fetch again.
    let server = match case.serve.as_ref().map(CodeServer::start).transpose() {
        Ok(server) => server,
        Err(error) => return Some(Err(format!("{context}: cannot serve: {error}"))),
    };
    let runtime_config = case.runtime_config();
    let scratch = tempfile::tempdir().map_err(|e| e.to_string());
    let precompiled = match (&case.precompiled, &scratch) {
        (None, _) => None,
        (Some(file), Ok(scratch)) => {
            let artifact_of = case.precompiled_artifact_of.as_deref();
            let config = runtime_config.clone();
            match precompile_for(file, artifact_of, runtime_name, config, scratch.path()) {
                Ok(Some(path)) => Some(path),
                Ok(None) => return None,
                Err(error) => return Some(Err(format!("{context}: cannot precompile: {error}"))),
            }
        }
        (Some(_), Err(error)) => return Some(Err(format!("{context}: {error}"))),
    };
    let deployment =
        match deployment_for(case, runtime_name, server.as_ref(), precompiled.as_deref()) {
            Ok(Some(deployment)) => deployment,
            Ok(None) => return None,
            Err(error) => return Some(expect_load_error(case, &context, error)),
        };
    let engines = pwhost::configured::BuildEngines::new(runtime_config);
    let options = lifecycle::LoadOptions {
        base_dir: root().join("plugins/dist"),
        // In memory only (a fetched module stays for the process, as in Envoy).
        code_cache: lifecycle::CodeCache::default(),
        compilation_cache: None,
    };
    let loaded = lifecycle::Plugins::load(&deployment, &engines, &options, abi::SharedState::new());
    let plugins = match loaded {
        Ok(plugins) => std::sync::Arc::new(plugins),
        Err(error) => return Some(expect_load_error(case, &context, error.to_string())),
    };
    if case.expect_load_error.is_some() {
        return Some(Err(format!(
            "{context}: loaded, but the case expects a load error"
        )));
    }
    let outcome = scenario::run_plugins(&plugins, &case.scenario);
    Some(check_outcome(name, case, &context, outcome))
}

/// `file` (under `plugins/dist/`) with `runtime_name`'s precompiled section (of `artifact_of`'s
/// code if given), written into `directory`; `None` if that engine cannot precompile.
fn precompile_for(
    file: &str,
    artifact_of: Option<&str>,
    runtime_name: &str,
    config: RuntimeConfig,
    directory: &Path,
) -> Result<Option<PathBuf>, String> {
    let runtime = runtimes::create(runtime_name, config).map_err(|e| e.to_string())?;
    let Some(identity) = runtime.artifact_identity() else {
        return Ok(None);
    };
    let read = |file: &str| {
        std::fs::read(root().join("plugins/dist").join(file)).map_err(|e| format!("{file}: {e}"))
    };
    let wasm = read(file)?;
    let precompiled = match artifact_of {
        None => lifecycle::compiled::precompile(&*runtime, &wasm)?,
        Some(other) => {
            let other = lifecycle::compiled::precompile(&*runtime, &read(other)?)?;
            let name = identity.section_name();
            let payload = lifecycle::compiled::custom_section(&other, &name)?
                .ok_or("precompile added no section")?;
            lifecycle::compiled::with_custom_section(&wasm, &name, payload)?
        }
    };
    let path = directory.join("precompiled.wasm");
    std::fs::write(&path, precompiled).map_err(|e| e.to_string())?;
    Ok(Some(path))
}

fn expect_load_error(case: &Case, context: &str, message: String) -> Result<(), String> {
    match &case.expect_load_error {
        Some(expected) if message.contains(expected.as_str()) => Ok(()),
        Some(expected) => Err(format!(
            "{context}: load error {message:?} does not contain {expected:?}"
        )),
        None => Err(format!("{context}: cannot load: {message}")),
    }
}

fn check_outcome(
    name: &str,
    case: &Case,
    context: &str,
    outcome: Result<scenario::Report, abi::VmError>,
) -> Result<(), String> {
    let report = match (&case.expect_run_error, outcome) {
        (Some(expected), Err(error)) => {
            let message = error.to_string();
            return if message.contains(expected.as_str()) {
                Ok(())
            } else {
                Err(format!(
                    "{context}: run error {message:?} does not contain {expected:?}"
                ))
            };
        }
        (Some(_), Ok(_)) => {
            return Err(format!("{context}: ran, but the case expects a run error"))
        }
        (None, outcome) => outcome.map_err(|e| format!("{context}: {e}"))?,
    };
    let actual = serde_json::to_value(&report).map_err(|e| e.to_string())?;
    let expected = case
        .expect
        .as_ref()
        .ok_or_else(|| format!("{name}: no expect, expect_load_error or expect_run_error"))?;
    check(expected, &actual, "report").map_err(|diff| format!("{context}:\n  {diff}"))
}

/// Runs `case` on `runtime_name` with plugin `build`; a WebAssembly build's code is compiled
/// through `cache` (see [`load_plugin`]).
fn run_case(
    name: &str,
    case: &Case,
    runtime_name: &str,
    build: &str,
    cache: &lifecycle::CompilationCache,
) -> Result<(), String> {
    let config = case.runtime_config();
    let runtime = runtimes::create(runtime_name, config).map_err(|e| e.to_string())?;
    let plugin_config = abi::PluginConfig {
        // `rust/NAME.wasip1.wasm` is plugin NAME.
        name: case
            .plugin
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .split('.')
            .next()
            .unwrap_or_default()
            .to_string(),
        root_id: case.root_id.clone(),
        vm_configuration: case.vm_config.clone().into_bytes(),
        plugin_configuration: case.plugin_config.clone().into_bytes(),
        environment: case
            .environment
            .iter()
            .filter_map(|entry| entry.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        allow_on_headers_stop_iteration: case.allow_on_headers_stop_iteration,
        ..abi::PluginConfig::default()
    };
    let loaded = load_plugin(&*runtime, build, plugin_config, cache);
    let context = format!("{name} on {runtime_name} with {build}");
    match loaded {
        Err(error) => expect_load_error(case, &context, error),
        Ok(_) if case.expect_load_error.is_some() => Err(format!(
            "{context}: loaded, but the case expects a load error"
        )),
        Ok(plugin) => {
            let outcome = scenario::run(&plugin, &case.scenario, FailurePolicy::FailClosed);
            check_outcome(name, case, &context, outcome)
        }
    }
}

/// Loads plugin `build` on `runtime`. A WebAssembly module goes through the compilation cache
/// an embedder would use (`lifecycle::compiled::compile`), so each module is compiled once per
/// engine and code-changing configuration and its artifact loaded for the other cases (the
/// LLVM engine alone took over three quarters of the suite's time compiling the same modules
/// again); native plugins load as `pwhost run` loads them.
fn load_plugin(
    runtime: &dyn runtime_api::WasmRuntime<abi::VmState>,
    build: &str,
    config: abi::PluginConfig,
    cache: &lifecycle::CompilationCache,
) -> Result<abi::Plugin, String> {
    let shared = abi::SharedState::new();
    if runtime.name() == "null" || pwhost::plugins::is_native(build) {
        return pwhost::plugins::load(runtime, build, config, shared)
            .map_err(|error| format!("{error:#}"));
    }
    // The error with its causes, as `pwhost run` shows it.
    fn shown(error: impl std::error::Error + Send + Sync + 'static) -> String {
        format!("{:#}", anyhow::Error::new(error))
    }
    let wasm = std::fs::read(build).map_err(|error| format!("cannot read {build}: {error}"))?;
    let compiled = lifecycle::compiled::compile(runtime, &wasm, false, Some(cache))
        .map_err(|error| shown(abi::LoadError::from(error)))?;
    abi::Plugin::from_module(runtime, compiled.module, config, shared).map_err(shown)
}

/// One run of a case, as the thread that ran it reports it.
struct Ran {
    /// Its place among the planned runs (the cases' order).
    index: usize,
    engine: &'static str,
    took: Duration,
    /// `None`: the engine cannot run this configuration case, which is then no run.
    outcome: Option<Result<(), String>>,
}

#[test]
fn every_case_passes_on_every_engine_and_build() {
    let directory = root().join("conformance");
    let mut paths: Vec<_> = std::fs::read_dir(&directory)
        .expect("conformance directory")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 30,
        "expected the whole suite, found {} cases",
        paths.len()
    );
    let mut failures = Vec::new();
    let mut cases = Vec::new();
    for path in &paths {
        let name = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(path).expect("readable case");
        let case: Case = match serde_yaml::from_str(&text) {
            Ok(case) => case,
            Err(error) => {
                failures.push(format!("{name}: invalid case: {error}"));
                continue;
            }
        };
        assert!(
            !case.description.is_empty(),
            "{name}: every case says what it checks"
        );
        assert!(
            case.plugin.is_empty() != case.config.is_none(),
            "{name}: a case names a plugin or gives a config"
        );
        cases.push((name, case));
    }
    // Every case on every engine, with each build of its plugin (a configuration case loads
    // what its configuration names: no build).
    let mut planned: Vec<(&str, &Case, &'static str, Option<String>)> = Vec::new();
    for (name, case) in &cases {
        for &runtime_name in runtimes::available() {
            if case.config.is_some() {
                planned.push((name, case, runtime_name, None));
                continue;
            }
            for build in plugin_builds(case, runtime_name) {
                planned.push((name, case, runtime_name, Some(build)));
            }
        }
    }
    // The runs are independent (each makes its own runtime, VMs and shared state, on the
    // thread that runs it), so they are spread over the machine's cores: run one after
    // another, they were the longest part of the test suite.
    let cache_dir = tempfile::tempdir().expect("a directory for the compilation cache");
    let cache = lifecycle::CompilationCache::new(cache_dir.path().join("compiled"));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let mut outcomes: Vec<Ran> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((name, case, runtime_name, build)) = planned.get(index) else {
                            return done;
                        };
                        let started = std::time::Instant::now();
                        // A panic fails its run, named, and the others go on.
                        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| match build {
                            None => run_config_case(name, case, runtime_name),
                            Some(build) => Some(run_case(name, case, runtime_name, build, &cache)),
                        }))
                        .unwrap_or_else(|_| {
                            Some(Err(format!("{name} on {runtime_name}: panicked")))
                        });
                        done.push(Ran {
                            index,
                            engine: runtime_name,
                            took: started.elapsed(),
                            outcome,
                        });
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| worker.join().expect("runs catch their panics"))
            .collect()
    });
    // Reported in the cases' order, whichever thread ran them.
    outcomes.sort_by_key(|ran| ran.index);
    let mut runs = 0;
    let mut runs_per_engine = std::collections::BTreeMap::<&str, (usize, Duration)>::new();
    let mut cases_run = std::collections::BTreeSet::<&str>::new();
    for ran in outcomes {
        // A configuration case an engine cannot run (e.g. no precompiled code) is not a run.
        let Some(outcome) = ran.outcome else {
            continue;
        };
        runs += 1;
        cases_run.insert(planned[ran.index].0);
        let engine = runs_per_engine.entry(ran.engine).or_default();
        engine.0 += 1;
        engine.1 += ran.took;
        if let Err(failure) = outcome {
            failures.push(failure);
        }
    }
    println!(
        "{} passed, {} failed; runs and time per engine: {runs_per_engine:?}",
        runs - failures.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {runs} conformance runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // A case no engine of this build could run checked nothing: with every engine built (as
    // the project's tests are run), each case runs somewhere.
    if cfg!(all(feature = "wasmtime", feature = "null")) {
        let never: Vec<&str> = cases
            .iter()
            .map(|(name, _)| name.as_str())
            .filter(|name| !cases_run.contains(name))
            .collect();
        assert!(never.is_empty(), "cases that ran on no engine: {never:?}");
    }
}

#[test]
fn the_subset_check_rejects_differences() {
    let actual = serde_json::json!({"a": [1, 2], "b": {"c": "hello world"}});
    assert!(check(&serde_json::json!({"a": [1, 2]}), &actual, "r").is_ok());
    assert!(check(&serde_json::json!({"a": [1]}), &actual, "r").is_err());
    assert!(check(
        &serde_json::json!({"b": {"c": {"contains": "world"}}}),
        &actual,
        "r"
    )
    .is_ok());
    assert!(check(
        &serde_json::json!({"b": {"c": {"contains": "moon"}}}),
        &actual,
        "r"
    )
    .is_err());
    assert!(check(&serde_json::json!({"z": 1}), &actual, "r").is_err());
}
