//! First start against cached start of a large plugin, per engine that can serialize compiled
//! code: the time `lifecycle::Plugins::load` takes (compile or load from the compilation cache,
//! link, and the start check) with an empty cache, then with the cache the first start filled.
//!
//! The module is generated (a Proxy-Wasm plugin of the given size, default 2 MiB, made of many
//! functions of integer arithmetic and loops), so every engine compiles the same code.
//!
//! Run with `cargo run --release -p pwhost-bench --features all-engines --bin compile_cache
//! [-- SIZE_KIB]`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use lifecycle::{CompilationCache, CompiledFrom, LoadOptions, PluginId, Plugins};
use pwhost::configured::BuildEngines;
use pwhost::runtimes;
use runtime_api::RuntimeConfig;

/// A Proxy-Wasm module of about `size` bytes.
fn large_module(size: usize) -> Vec<u8> {
    // Text to binary is about 7:1; one correction makes it close.
    let first = module_from_text_of(size * 7);
    module_from_text_of((size as f64 / first.len() as f64 * (size * 7) as f64) as usize)
}

/// A Proxy-Wasm module whose text is about `text_size` bytes.
fn module_from_text_of(text_size: usize) -> Vec<u8> {
    let mut wat = String::from(
        r#"(module
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (global.get $heap)
    (global.set $heap (i32.add (global.get $heap) (local.get $size))))
  (func (export "proxy_on_context_create") (param i32 i32))
"#,
    );
    let mut functions = 0;
    while wat.len() < text_size {
        // Each function mixes its argument with constants in a loop and calls the one before.
        write!(
            wat,
            "  (func $f{functions} (export \"f{functions}\") (param $x i32) (result i32) (local $i i32)\n    (loop $again\n"
        )
        .ok();
        for op in 0..40 {
            let instruction = ["i32.add", "i32.mul", "i32.xor", "i32.sub"][op % 4];
            writeln!(
                wat,
                "      (local.set $x ({instruction} (local.get $x) (i32.const {})))",
                functions * 131 + op * 7 + 1
            )
            .ok();
        }
        wat.push_str(
            "      (local.set $i (i32.add (local.get $i) (i32.const 1)))\n      (br_if $again (i32.lt_u (local.get $i) (i32.const 8))))\n",
        );
        if functions > 0 {
            writeln!(wat, "    (call $f{} (local.get $x)))", functions - 1).ok();
        } else {
            wat.push_str("    (local.get $x))\n");
        }
        functions += 1;
    }
    wat.push(')');
    wat::parse_str(&wat).expect("the generated module is valid")
}

/// Loads the plugin at `path` on `engine` with `cache`; how long it took and where the code
/// came from.
fn start(
    engine: &str,
    path: &std::path::Path,
    cache: &CompilationCache,
) -> (Duration, CompiledFrom) {
    let yaml = format!(
        "name: large\nvm_config:\n  runtime: {engine}\n  code: {{local: {{filename: {:?}}}}}\n",
        path.to_string_lossy()
    );
    let deployment = lifecycle::parse(&yaml).expect("valid configuration");
    let engines = BuildEngines::new(RuntimeConfig::default());
    let options = LoadOptions {
        compilation_cache: Some(cache.clone()),
        ..LoadOptions::default()
    };
    let began = Instant::now();
    let plugins = Plugins::load(&deployment, &engines, &options, abi::SharedState::new())
        .expect("the plugin loads");
    (began.elapsed(), plugins.compiled_from(PluginId(0)))
}

fn main() {
    let size_kib: usize = std::env::args()
        .nth(1)
        .map_or(Ok(2048), |n| n.parse())
        .expect("SIZE_KIB must be a number");
    let wasm = large_module(size_kib * 1024);
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let path = scratch.path().join("large.wasm");
    std::fs::write(&path, &wasm).expect("write the module");
    println!("module: {} bytes", wasm.len());
    println!("| engine | first start (compile) | cached start | ratio |");
    println!("|---|---|---|---|");
    for engine in runtimes::available() {
        let runtime = runtimes::create(engine, RuntimeConfig::default()).expect("engine");
        let cache = CompilationCache::new(scratch.path().join(format!("cache-{engine}")));
        if runtime.artifact_identity().is_none() {
            // Nothing to keep (the null runtime has no module to load): the compile alone.
            if *engine != "null" {
                let (first, _) = start(engine, &path, &cache);
                println!(
                    "| {engine} | {:.1} ms | (keeps no compiled code) | |",
                    first.as_secs_f64() * 1e3
                );
            }
            continue;
        }
        let (first, from) = start(engine, &path, &cache);
        assert_eq!(from, CompiledFrom::Bytecode);
        // The best of three cached starts (the file is in the page cache after the first).
        let cached = (0..3)
            .map(|_| {
                let (took, from) = start(engine, &path, &cache);
                assert_eq!(from, CompiledFrom::CompilationCache);
                took
            })
            .min()
            .unwrap_or_default();
        println!(
            "| {engine} | {:.1} ms | {:.1} ms | {:.1}x |",
            first.as_secs_f64() * 1e3,
            cached.as_secs_f64() * 1e3,
            first.as_secs_f64() / cached.as_secs_f64()
        );
    }
}
