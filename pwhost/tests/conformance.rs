//! The conformance suite: every case in `conformance/*.yaml` runs on every engine compiled in,
//! against every build of its plugin (Rust SDK plugins for wasm32-unknown-unknown and
//! wasm32-wasip1), and must produce the same report.
//!
//! A case names a plugin under `plugins/dist/` (built by `bash plugins/build.sh`), its
//! configuration, a scenario, and either `expect` — a subset of the `pwhost run` JSON report that
//! must match (objects: the keys given; lists: same length, element by element; `{contains: s}`:
//! a string containing `s`) — or `expect_load_error`, a substring of the load error, or
//! `expect_run_error`, a substring of the error that ends the run (e.g. a VM that cannot start).

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
    plugin: String,
    #[serde(default)]
    plugin_config: String,
    #[serde(default)]
    vm_config: String,
    #[serde(default)]
    root_id: String,
    #[serde(default)]
    deadline_ms: Option<u64>,
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

fn run_case(name: &str, case: &Case, runtime_name: &str, build: &str) -> Result<(), String> {
    let config = RuntimeConfig {
        call_deadline: Some(Duration::from_millis(case.deadline_ms.unwrap_or(10_000))),
        ..RuntimeConfig::default()
    };
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
    let loaded = pwhost::plugins::load(&*runtime, build, plugin_config, abi::SharedState::new());
    let context = format!("{name} on {runtime_name} with {build}");
    match (&case.expect_load_error, loaded) {
        (Some(expected), Err(error)) => {
            let message = format!("{error:#}");
            if message.contains(expected.as_str()) {
                Ok(())
            } else {
                Err(format!(
                    "{context}: load error {message:?} does not contain {expected:?}"
                ))
            }
        }
        (Some(_), Ok(_)) => Err(format!(
            "{context}: loaded, but the case expects a load error"
        )),
        (None, Err(error)) => Err(format!("{context}: cannot load: {error}")),
        (None, Ok(plugin)) => {
            let outcome = scenario::run(&plugin, &case.scenario, FailurePolicy::FailClosed);
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
            let expected = case.expect.as_ref().ok_or_else(|| {
                format!("{name}: no expect, expect_load_error or expect_run_error")
            })?;
            check(expected, &actual, "report").map_err(|diff| format!("{context}:\n  {diff}"))
        }
    }
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
    let mut runs = 0;
    let mut runs_per_engine = std::collections::BTreeMap::<&str, usize>::new();
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
        for runtime_name in runtimes::available() {
            for build in plugin_builds(&case, runtime_name) {
                runs += 1;
                *runs_per_engine.entry(runtime_name).or_default() += 1;
                if let Err(failure) = run_case(&name, &case, runtime_name, &build) {
                    failures.push(failure);
                }
            }
        }
    }
    println!(
        "{} passed, {} failed; runs per engine: {runs_per_engine:?}",
        runs - failures.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {runs} conformance runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
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
