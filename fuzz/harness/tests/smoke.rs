//! The fuzz targets on their seeds and on a fixed set of generated inputs, in the workspace's
//! test run (so on every engine CI builds, sharing its build). Campaigns run the same targets
//! under libFuzzer (`scripts/fuzz.sh`); this run shows they hold on known inputs and that each
//! generator makes what it should.

use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};
use pwhost_fuzz::host_calls::HostCallPlugin;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The files of `dirs` (relative to the workspace) with extension `ext`, sorted.
fn seeds_of(dirs: &[&str], ext: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|dir| {
            std::fs::read_dir(workspace().join(dir))
                .into_iter()
                .flatten()
        })
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).expect("a readable seed");
            (path.display().to_string(), bytes)
        })
        .collect()
}

/// Deterministic pseudo-random bytes, so every run tries the same inputs.
struct Bytes(fastrand::Rng);

impl Bytes {
    fn seeded(seed: u64) -> Bytes {
        Bytes(fastrand::Rng::with_seed(seed))
    }

    fn fill(&mut self, len: usize) -> Vec<u8> {
        std::iter::repeat_with(|| self.0.u8(..)).take(len).collect()
    }

    /// `seed` changed as libFuzzer's mutators would: bytes overwritten, cut short, or
    /// random bytes spliced in.
    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut mutant = seed.to_vec();
        if mutant.is_empty() {
            return self.fill(16);
        }
        match self.0.u8(..3) {
            0 => {
                for _ in 0..=self.0.u8(..4) {
                    let at = self.0.usize(..mutant.len());
                    mutant[at] = self.0.u8(..);
                }
            }
            1 => mutant.truncate(self.0.usize(..mutant.len())),
            _ => {
                let at = self.0.usize(..mutant.len());
                let len = self.0.usize(..16);
                let spliced = self.fill(len);
                mutant.splice(at..at, spliced);
            }
        }
        mutant
    }
}

#[test]
fn module_bytes_loads_the_corpus_plugins_and_refuses_their_mutants_cleanly() {
    let engines = pwhost_fuzz::engines().len();
    assert!(engines > 0, "no Wasm engine in this build");
    let seeds = seeds_of(
        &[
            "plugins/dist/wat",
            "plugins/dist/c",
            "plugins/dist/assemblyscript",
        ],
        "wasm",
    );
    assert!(
        seeds.len() >= 30,
        "the plugin corpus is built (scripts/setup.sh)"
    );
    let mut bytes = Bytes::seeded(1);
    for (name, seed) in &seeds {
        let loaded = pwhost_fuzz::module_bytes(seed);
        if name.ends_with("/minimal.wasm") || name.ends_with("/http_headers.wasm") {
            assert_eq!(loaded, engines, "{name} loads on every engine");
        }
        for _ in 0..4 {
            pwhost_fuzz::module_bytes(&bytes.mutate(seed));
        }
    }
}

#[test]
fn host_call_plugins_load_on_every_engine_survive_their_calls_and_run_alike() {
    let mut bytes = Bytes::seeded(2);
    let mut calls = 0;
    for input in 0..150 {
        let data = bytes.fill(4096);
        // As libFuzzer hands inputs to the target.
        let plugin = HostCallPlugin::arbitrary_take_rest(Unstructured::new(&data))
            .expect("4 KiB make a plugin");
        calls += plugin
            .callbacks
            .iter()
            .map(|c| c.calls.len())
            .sum::<usize>();
        // The generator makes valid plugins: what they do to the host is the test, and every
        // engine must report the same run (clocks and random bytes included: the fuzz scenario
        // is reproducible).
        assert_eq!(
            pwhost_fuzz::host_calls(&plugin),
            Ok(true),
            "generated plugin {input}: {plugin:?}"
        );
    }
    assert!(calls > 1_000, "the plugins call the host ({calls} calls)");
}

#[test]
fn every_engine_reports_the_same_run_of_each_corpus_plugin() {
    // The plugins of every SDK (the Rust ones built once: their wasip1 builds differ only in WASI
    // calls, which the generated plugins of the test above make too) and the WAT edge cases.
    let mut plugins = seeds_of(
        &[
            "plugins/dist/rust",
            "plugins/dist/c",
            "plugins/dist/assemblyscript",
            "plugins/dist/wat",
        ],
        "wasm",
    );
    plugins.retain(|(name, _)| !name.ends_with(".wasip1.wasm"));
    assert!(
        plugins.len() >= 60,
        "the corpus is built (scripts/setup.sh)"
    );
    assert!(pwhost_fuzz::engines().len() >= 2, "engines to compare");
    let mut refused = Vec::new();
    let mut differences = Vec::new();
    for (name, wasm) in &plugins {
        match pwhost_fuzz::differential(wasm) {
            Ok(true) => {}
            Ok(false) => refused.push(name),
            Err(difference) => differences.push(format!("{name}: {difference}")),
        }
    }
    assert!(
        differences.is_empty(),
        "{} of {} plugins ran differently:\n{}",
        differences.len(),
        plugins.len(),
        differences.join("\n")
    );
    // Only WAT cases made to be refused (bad ABI versions, imports, exports) are refused.
    assert!(
        refused.iter().all(|name| name.contains("/wat/")) && refused.len() <= 10,
        "refused on every engine: {refused:?}"
    );
}

#[test]
fn smith_modules_load_as_plugins_and_run() {
    let mut bytes = Bytes::seeded(3);
    let mut loaded = 0;
    let runs = 40;
    for _ in 0..runs {
        if pwhost_fuzz::smith_module(&bytes.fill(8192)) > 0 {
            loaded += 1;
        }
    }
    // The configuration makes plugins (the ABI's exports, the host's imports), not modules
    // that every loader refuses.
    assert!(
        loaded * 2 >= runs,
        "{loaded} of {runs} generated modules loaded"
    );
}

#[test]
fn configuration_and_scenario_text_parses_or_is_refused_cleanly() {
    // Seeds: the example scenario and plugin configuration (`config:`, Traffic Server's file),
    // and the scenarios and plugin configurations inside the conformance cases; the scenarios
    // are valid, the configurations are valid or refused on purpose.
    let mut seeds = Vec::new();
    for (name, text) in seeds_of(&["examples", "conformance"], "yaml") {
        let case: serde_yaml::Value = serde_yaml::from_slice(&text).expect("a YAML file");
        let scenario = match case.get("scenario") {
            Some(scenario) => serde_yaml::to_string(scenario).expect("YAML"),
            None if name.contains("examples/")
                && !name.ends_with("serve.yaml")
                && case.get("config").is_none() =>
            {
                String::from_utf8(text.clone()).expect("UTF-8")
            }
            None => String::new(),
        };
        if !scenario.is_empty() {
            let parsed = pwhost::scenario::Scenario::parse(&scenario);
            assert!(parsed.is_ok(), "{name}: {parsed:?}");
            seeds.push(scenario.into_bytes());
        }
        if let Some(config) = case.get("config") {
            seeds.push(serde_yaml::to_string(config).expect("YAML").into_bytes());
        }
    }
    assert!(seeds.len() >= 100, "{} seeds", seeds.len());
    let mut bytes = Bytes::seeded(4);
    for seed in &seeds {
        pwhost_fuzz::config(seed);
        for _ in 0..4 {
            pwhost_fuzz::config(&bytes.mutate(seed));
        }
    }
}
