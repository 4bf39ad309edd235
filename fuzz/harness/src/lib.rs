//! What pwhost's fuzz targets run (the cargo-fuzz binaries in `fuzz/fuzz_targets` are one
//! line each), so that the workspace's tests run the very same code on seeds (`tests/smoke.rs`):
//! [`module_bytes`], [`smith_module`], [`host_calls`] and [`config`], over the engines under test
//! and the traffic every module that loads is put through; [`host_calls`] compares the
//! engines' reports of each run ([`differential`]).
//!
//! Every target checks the same promise: whatever the input, pwhost answers with a clean
//! error or a trap, and never crashes, hangs or grows without bound. A looping guest is
//! stopped by the engines' call deadline ([`DEADLINE`]), a memory bomb by their memory cap
//! ([`MAX_MEMORY_BYTES`]); anything else is libFuzzer's finding (a crash, a panic, a timeout,
//! or the process passing its memory limit).

pub mod host_calls;
pub mod smith;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use abi::{Plugin, PluginConfig, SharedState, VmState};
use pwhost::scenario::{FailurePolicy, Report, Scenario};
use runtime_api::{RuntimeConfig, Signature, ValType, WasmRuntime};

/// The longest one callback may run: a looping guest is stopped here, as a proxy's deadline
/// would stop it, so that the fuzzer moves on.
pub const DEADLINE: Duration = Duration::from_millis(100);

/// The most linear memory one guest may have.
pub const MAX_MEMORY_BYTES: u64 = 64 << 20;

/// The Wasm engines of this build (the null runtime runs native code, not modules), or those
/// of them `PWHOST_FUZZ_ENGINES` names (comma-separated; a name that is not one of them is a
/// panic with the list), each made once with [`DEADLINE`] and [`MAX_MEMORY_BYTES`].
pub fn engines() -> &'static [Arc<dyn WasmRuntime<VmState>>] {
    static ENGINES: OnceLock<Vec<Arc<dyn WasmRuntime<VmState>>>> = OnceLock::new();
    ENGINES.get_or_init(|| {
        let config = RuntimeConfig {
            max_memory_bytes: Some(MAX_MEMORY_BYTES),
            call_deadline: Some(DEADLINE),
            interruptible: false,
        };
        let available = engines::runtimes::available();
        let chosen: Option<Vec<String>> = std::env::var("PWHOST_FUZZ_ENGINES").ok().map(|names| {
            names
                .split(',')
                .map(|name| name.trim().to_string())
                .collect()
        });
        // A misspelt name must not quietly leave its engine out of a campaign.
        for name in chosen.iter().flatten() {
            assert!(
                available.contains(&name.as_str()) && name != "null",
                "PWHOST_FUZZ_ENGINES names {name:?}, not a Wasm engine of this build ({:?})",
                available
                    .iter()
                    .filter(|n| **n != "null")
                    .collect::<Vec<_>>()
            );
        }
        available
            .iter()
            .filter(|name| **name != "null")
            .filter(|name| {
                chosen
                    .as_ref()
                    .is_none_or(|chosen| chosen.iter().any(|c| c == *name))
            })
            .map(|name| {
                engines::runtimes::create(name, config.clone())
                    .unwrap_or_else(|e| panic!("engine {name} cannot be made: {e:#}"))
            })
            .collect()
    })
}

/// The traffic a module that loads gets, offering it every callback of the ABI: VM start and
/// configuration, timer ticks (if it sets a period), an HTTP exchange with bodies and
/// trailers both ways and answers to an HTTP call and a gRPC call (if it makes them), a TCP
/// connection with data both ways, a foreign function call, and shutdown; its clocks and
/// random bytes are the same on every run (`reproducible`), so runs compare.
pub fn scenario() -> &'static Scenario {
    static SCENARIO: OnceLock<Scenario> = OnceLock::new();
    SCENARIO.get_or_init(|| Scenario::parse(SCENARIO_YAML).expect("the fuzz scenario parses"))
}

const SCENARIO_YAML: &str = r#"
reproducible: {}
ticks: 2
shutdown_ticks: 1
foreign_function_calls: [{function_id: 1, arguments: "arguments"}]
http:
  - request_headers: [[":method", "POST"], [":path", "/fuzz?q=1"], [":authority", "example.com"],
                      ["content-type", "text/plain"], ["x-one", "1"]]
    request_body: ["first chunk, ", "last chunk"]
    request_trailers: [["x-request-trailer", "one"]]
    response_headers: [[":status", "200"], ["content-type", "text/plain"]]
    response_body: ["answer", ""]
    response_trailers: [["grpc-status", "0"]]
    http_call_responses:
      - headers: [[":status", "200"]]
        body: "called"
        trailers: [["x-call-trailer", "t"]]
    grpc_call_responses:
      - initial_metadata: [["x-init", "i"]]
        messages: ["reply"]
        trailing_metadata: [["x-end", "e"]]
        status: 0
    ticks_after: 2
tcp:
  - downstream: ["hello, ", "world"]
    upstream: ["answer"]
    ticks_after: 1
"#;

/// Declares every host function of ABI 0.2.1 (WASI included) as an import, one type each:
/// type `i` and function `i` are the host's function `i`. Returns how many there are.
pub(crate) fn import_host_functions(
    types: &mut wasm_encoder::TypeSection,
    imports: &mut wasm_encoder::ImportSection,
) -> u32 {
    let host = abi::host_functions(abi::AbiVersion::V0_2_1);
    for (index, function) in host.iter().enumerate() {
        declare_type(types, function.signature);
        imports.import(
            function.module,
            function.name,
            wasm_encoder::EntityType::Function(index as u32),
        );
    }
    host.len() as u32
}

/// Adds the function type `signature` to `types`.
pub(crate) fn declare_type(types: &mut wasm_encoder::TypeSection, signature: Signature) {
    types.ty().function(
        signature.params.iter().map(|t| wasm_type(*t)),
        signature.results.iter().map(|t| wasm_type(*t)),
    );
}

fn wasm_type(ty: ValType) -> wasm_encoder::ValType {
    match ty {
        ValType::I64 => wasm_encoder::ValType::I64,
        ValType::F32 => wasm_encoder::ValType::F32,
        ValType::F64 => wasm_encoder::ValType::F64,
        ValType::I32 | ValType::Other => wasm_encoder::ValType::I32,
    }
}

/// Lets the one panic pwhost catches on purpose unwind to where it is caught, under a fuzzer
/// whose panic hook aborts on every panic (libFuzzer's, set by `libfuzzer-sys`): wasmi 2.0.0's
/// translator panics on some valid modules, which runtime-wasmi turns into a load error
/// (fuzz/RESULTS.md). Every other panic goes to the previous hook, and a translator panic that
/// escaped runtime-wasmi would still abort at the fuzz target's edge. Call once, in a target's
/// `init`.
pub fn let_known_engine_panics_unwind() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_wasmi_translator = info.location().is_some_and(|location| {
            let file = location.file();
            file.contains("/wasmi-") && file.contains("/engine/translator/")
        });
        if !in_wasmi_translator {
            previous(info);
        }
    }));
}

/// Target `module_bytes`: arbitrary bytes as a plugin module, on every engine: a clean load
/// error, or (for the rare input that is a Proxy-Wasm module) a run of [`scenario`].
pub fn module_bytes(data: &[u8]) -> usize {
    load_and_run(data)
}

/// Target `smith_module`: a `wasm-smith` module drawn from `data` (see [`smith`]), loaded and
/// run on every engine.
pub fn smith_module(data: &[u8]) -> usize {
    match smith::module(&mut arbitrary::Unstructured::new(data)) {
        Ok(wasm) => load_and_run(&wasm),
        Err(_) => 0,
    }
}

/// Target `host_calls`: every host function called with fuzzed arguments over a fuzzed memory
/// image, from every callback, with a misbehaving allocator (see [`host_calls`]), as a
/// [`differential`] run (the scenario's clocks and random bytes are the same on every run).
/// Says whether every engine ran the plugin (`false`: every engine refused it), or how two
/// engines differed.
pub fn host_calls(plugin: &host_calls::HostCallPlugin) -> Result<bool, String> {
    differential(&plugin.to_wasm())
}

/// Target `config`: arbitrary text as a plugin configuration (YAML or JSON, Envoy's and Traffic
/// Server's shapes) and as a `pwhost run` scenario: a value, or an error naming the field.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = lifecycle::config::parse(text);
    let _ = Scenario::parse(text);
}

/// What [`scenario`] came to on one engine.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The engine refused the module (each engine words its validation errors its own way, so
    /// only the refusal is compared).
    Refused,
    /// The run's report.
    Ran(Box<Report>),
    /// The run failed as a whole.
    Failed(String),
}

impl Outcome {
    /// Whether a call ran into the deadline: wall-clock time, which one engine may reach and
    /// another not on a busy machine, so such runs are not compared.
    fn hit_deadline(&self) -> bool {
        match self {
            Outcome::Ran(report) => report
                .plugins
                .iter()
                .any(|plugin| plugin.counters.get("failed_by_deadline") > Some(&0)),
            Outcome::Refused | Outcome::Failed(_) => false,
        }
    }

    /// The outcome with what may differ between engines erased: the engine's name, in the
    /// report and in each plugin's (`fuzz/README.md` keeps the list of what is not compared).
    fn comparable(self) -> Outcome {
        match self {
            Outcome::Ran(mut report) => {
                report.runtime.clear();
                for plugin in &mut report.plugins {
                    plugin.runtime.clear();
                }
                Outcome::Ran(report)
            }
            other => other,
        }
    }
}

/// Modules that loaded on at least one engine, and runs of them, since the process started.
static LOADED: AtomicU64 = AtomicU64::new(0);
static RUNS: AtomicU64 = AtomicU64::new(0);

/// Loads `wasm` as a plugin on `runtime` and, if it loads, runs [`scenario`] through it.
fn run_on(runtime: &dyn WasmRuntime<VmState>, wasm: &[u8]) -> Outcome {
    match Plugin::load(
        runtime,
        wasm,
        PluginConfig::default(),
        SharedState::default(),
    ) {
        Err(_) => Outcome::Refused,
        Ok(plugin) => {
            RUNS.fetch_add(1, Ordering::Relaxed);
            match pwhost::scenario::run(&plugin, scenario(), FailurePolicy::FailClosed) {
                Ok(report) => Outcome::Ran(Box::new(report)),
                Err(e) => Outcome::Failed(e.to_string()),
            }
        }
    }
}

/// Runs `wasm` on every engine; counts it as loaded if some engine loaded it.
fn run_everywhere(wasm: &[u8]) -> Vec<(&'static str, Outcome)> {
    let outcomes: Vec<_> = engines()
        .iter()
        .map(|runtime| (runtime.name(), run_on(&**runtime, wasm)))
        .collect();
    if outcomes
        .iter()
        .any(|(_, outcome)| *outcome != Outcome::Refused)
    {
        LOADED.fetch_add(1, Ordering::Relaxed);
    }
    outcomes
}

/// Loads `wasm` as a plugin on every engine and, where it loads, runs [`scenario`] through
/// it; returns on how many engines it loaded. Errors and traps are expected answers; only a
/// crash, a hang or a panic is a finding.
pub fn load_and_run(wasm: &[u8]) -> usize {
    run_everywhere(wasm)
        .iter()
        .filter(|(_, outcome)| *outcome != Outcome::Refused)
        .count()
}

/// Differential run: loads `wasm` on every engine and runs [`scenario`] through it. Every
/// engine must refuse the module, or every engine run it to the same report but for what
/// [`Outcome::comparable`] erases (runs that hit the deadline somewhere are not compared).
/// Returns whether the engines ran it, or the first difference found: both engines and what
/// each did.
pub fn differential(wasm: &[u8]) -> Result<bool, String> {
    compare(run_everywhere(wasm))
}

/// The comparison of [`differential`], over what each engine did with one module.
fn compare(outcomes: Vec<(&'static str, Outcome)>) -> Result<bool, String> {
    let ran = outcomes
        .iter()
        .any(|(_, outcome)| *outcome != Outcome::Refused);
    if outcomes.iter().any(|(_, outcome)| outcome.hit_deadline()) {
        if outcomes
            .iter()
            .any(|(_, outcome)| *outcome == Outcome::Refused)
        {
            return Err("some engines refused the module, others ran it".to_string());
        }
        return Ok(true);
    }
    let mut outcomes = outcomes
        .into_iter()
        .map(|(name, outcome)| (name, outcome.comparable()));
    let Some((first, expected)) = outcomes.next() else {
        return Ok(false);
    };
    for (name, outcome) in outcomes {
        if outcome != expected {
            return Err(format!(
                "{first} and {name} differ:\n{first}: {expected:#?}\n{name}: {outcome:#?}"
            ));
        }
    }
    Ok(ran)
}

/// `(modules loaded on some engine, scenario runs)` so far in this process, for campaign
/// statistics.
pub fn counts() -> (u64, u64) {
    (LOADED.load(Ordering::Relaxed), RUNS.load(Ordering::Relaxed))
}

/// Prints campaign statistics to standard error every 2^k inputs when `PWHOST_FUZZ_STATS` is
/// set: inputs seen, modules loaded, scenario runs and the target's own `extra` figures.
pub fn report_stats(target: &str, extra: impl FnOnce() -> String) {
    static INPUTS: AtomicU64 = AtomicU64::new(0);
    static ENABLED: OnceLock<bool> = OnceLock::new();
    let inputs = INPUTS.fetch_add(1, Ordering::Relaxed) + 1;
    if !*ENABLED.get_or_init(|| std::env::var_os("PWHOST_FUZZ_STATS").is_some()) {
        return;
    }
    if inputs.is_power_of_two() || inputs % 100_000 == 0 {
        let (loaded, runs) = counts();
        eprintln!(
            "pwhost-fuzz {target}: {inputs} inputs, {loaded} modules loaded, {runs} runs{}",
            extra()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real run's report: the corpus's header plugin through [`scenario`] on the first engine.
    fn report() -> Report {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../plugins/dist/rust/http_headers.wasm"
        );
        let wasm = std::fs::read(path).expect("plugins/dist is built (scripts/setup.sh)");
        match run_on(&*engines()[0], &wasm) {
            Outcome::Ran(report) => *report,
            other => panic!("the header plugin did not run: {other:?}"),
        }
    }

    fn ran(report: &Report, engine: &str) -> Outcome {
        let mut report = report.clone();
        report.runtime = engine.to_string();
        for plugin in &mut report.plugins {
            plugin.runtime = engine.to_string();
        }
        Outcome::Ran(Box::new(report))
    }

    #[test]
    fn the_host_calls_plugins_make_are_counted() {
        let before = abi::host_calls_made();
        let report = report();
        assert!(!report.logs.is_empty());
        // At least one host call per log line.
        let made = abi::host_calls_made() - before;
        assert!(
            made >= report.logs.len() as u64,
            "{made} host calls counted"
        );
    }

    #[test]
    fn reports_alike_but_for_the_engine_name_are_no_difference() {
        let report = report();
        assert!(
            !report.http.is_empty() && !report.logs.is_empty(),
            "{report:#?}"
        );
        assert_eq!(
            compare(vec![
                ("one", ran(&report, "one")),
                ("two", ran(&report, "two"))
            ]),
            Ok(true)
        );
        assert_eq!(
            compare(vec![("one", Outcome::Refused), ("two", Outcome::Refused)]),
            Ok(false)
        );
    }

    #[test]
    fn any_other_difference_in_a_report_is_found_and_shows_both_engines() {
        let report = report();
        type Change = fn(&mut Report);
        let changes: [(&str, Change); 5] = [
            ("a forwarded header", |r| {
                r.http[0].request_headers[0].1.push('!')
            }),
            ("a response body", |r| r.http[0].response_body.push('!')),
            ("a log line", |r| {
                r.logs.pop();
            }),
            ("a failure counter", |r| {
                *r.plugins[0].counters.entry("failed_by_trap").or_default() += 1;
            }),
            ("shared data", |r| {
                r.shared_data.insert("key".to_string(), "value".to_string());
            }),
        ];
        for (what, change) in changes {
            let mut changed = report.clone();
            change(&mut changed);
            let found = compare(vec![
                ("one", ran(&report, "one")),
                ("two", ran(&report, "two")),
                ("three", ran(&changed, "three")),
            ]);
            let Err(difference) = found else {
                panic!("{what}: not found");
            };
            assert!(
                difference.starts_with("one and three differ"),
                "{what}: {difference}"
            );
        }
    }

    #[test]
    fn a_module_one_engine_refuses_and_another_runs_is_a_difference() {
        let report = report();
        let found = compare(vec![
            ("one", Outcome::Refused),
            ("two", ran(&report, "two")),
        ]);
        assert!(found.is_err_and(|e| e.starts_with("one and two differ")));
        let failed = compare(vec![
            ("one", Outcome::Failed("the run failed".to_string())),
            ("two", ran(&report, "two")),
        ]);
        assert!(failed.is_err());
    }

    #[test]
    fn runs_that_hit_the_deadline_are_not_compared_but_a_refusal_beside_them_is() {
        let mut slow = report();
        slow.plugins[0].counters.insert("failed_by_deadline", 1);
        let mut other = report();
        other.logs.clear();
        assert_eq!(
            compare(vec![
                ("one", ran(&slow, "one")),
                ("two", ran(&other, "two"))
            ]),
            Ok(true)
        );
        assert!(compare(vec![("one", ran(&slow, "one")), ("two", Outcome::Refused)]).is_err());
    }
}
