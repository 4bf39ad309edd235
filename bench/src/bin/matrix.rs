//! The runtime matrix: `lifecycle_bench` through pwhost on every engine compiled in, each beside
//! its own floor, as data (JSON) and as a picture (SVG).
//!
//! ```text
//! cargo run --release -p pwhost-bench --features all-engines --bin matrix -- \
//!     --json bench/matrix.json --plot bench/matrix.svg
//! ```
//!
//! Each figure is a median: pwhost and the floor run in alternating batches (pwhost, floor,
//! pwhost, …) so that a burst of other work on a shared machine hits both alike, and the median
//! of the batches' means is kept. The headers live in storage the embedder owns
//! ([`ProxyHeaders`]), as in the `engines` criterion bench. Progress goes to stderr.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use abi::{HeadersAction, PluginConfig, SharedState, Vm};
use anyhow::Context;
use clap::Parser;
use pwhost::bench::EngineFigures;
use pwhost_bench::floor::{engine_floor, FloorEngine, FloorInstance};
use pwhost_bench::{
    plugin_path, pwhost_request_in, pwhost_vm_in, read_plugin, ProxyHeaders, LIFECYCLE_PLUGIN,
};
use runtime_api::RuntimeConfig;

#[derive(Parser)]
#[command(about = "pwhost against each engine's floor, on lifecycle_bench")]
struct Args {
    /// Engines to measure (comma-separated); default: every engine compiled in.
    #[arg(long, value_delimiter = ',')]
    engines: Vec<String>,
    /// Requests per batch.
    #[arg(long, default_value_t = 20_000)]
    requests: u32,
    /// VM starts per batch.
    #[arg(long, default_value_t = 100)]
    starts: u32,
    /// Batches of each kind (pwhost's and the floor's alternate).
    #[arg(long, default_value_t = 7)]
    batches: u32,
    /// Write the figures as JSON to this file (else to stdout).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the figures into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Put the figures of earlier runs (JSON written by `--json`) first: builds with different
    /// engine features then make one matrix. An engine measured in this run replaces its
    /// included figures.
    #[arg(long)]
    include: Vec<PathBuf>,
}

/// The median of `values` (not empty).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs `pwhost` and `floor` (each doing `count` operations per call) in alternating batches;
/// returns each one's median time per operation, in nanoseconds.
fn alternate(
    batches: u32,
    count: u32,
    mut pwhost: impl FnMut(u32) -> anyhow::Result<()>,
    mut floor: Option<&mut dyn FnMut(u32) -> anyhow::Result<()>>,
) -> anyhow::Result<(f64, Option<f64>)> {
    // A warm-up batch of each, untimed.
    pwhost(count.div_ceil(10))?;
    if let Some(floor) = floor.as_mut() {
        floor(count.div_ceil(10))?;
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..batches.max(1) {
        let start = Instant::now();
        pwhost(count)?;
        ours.push(start.elapsed().as_nanos() as f64 / f64::from(count));
        if let Some(floor) = floor.as_mut() {
            let start = Instant::now();
            floor(count)?;
            theirs.push(start.elapsed().as_nanos() as f64 / f64::from(count));
        }
    }
    let theirs = (!theirs.is_empty()).then(|| median(theirs));
    Ok((median(ours), theirs))
}

fn requests_on(vm: &mut Vm, count: u32) -> anyhow::Result<()> {
    for _ in 0..count {
        black_box(pwhost_request_in::<ProxyHeaders>(vm)?);
    }
    Ok(())
}

fn floor_requests_on(vm: &mut dyn FloorInstance<ProxyHeaders>, count: u32) -> anyhow::Result<()> {
    for _ in 0..count {
        black_box(vm.request()?);
    }
    Ok(())
}

/// The figures of one engine (label: the engine, or `null-native` for the compiled-in port).
fn measure(args: &Args, engine: &str, wasm: &[u8]) -> anyhow::Result<EngineFigures> {
    let (label, plugin) = if engine == "null" {
        (
            "null-native".to_string(),
            "native:lifecycle_bench".to_string(),
        )
    } else {
        let path = plugin_path(LIFECYCLE_PLUGIN);
        (engine.to_string(), path.to_string_lossy().into_owned())
    };
    let runtime = pwhost::runtimes::create(engine, RuntimeConfig::default())?;
    let plugin = pwhost::plugins::load(
        &*runtime,
        &plugin,
        PluginConfig::default(),
        SharedState::new(),
    )?;
    let floor: Option<Box<dyn FloorEngine<ProxyHeaders>>> =
        engine_floor::<ProxyHeaders>(engine, wasm).transpose()?;

    let mut vm = pwhost_vm_in::<ProxyHeaders>(&plugin)?;
    let outcome = pwhost_request_in::<ProxyHeaders>(&mut vm)?;
    anyhow::ensure!(
        outcome.request == HeadersAction::Continue,
        "{label}: the plugin did not run"
    );
    let mut floor_vm = floor
        .as_ref()
        .map(|floor| floor.instantiate())
        .transpose()?;
    let mut floor_requests = |count: u32| match floor_vm.as_mut() {
        Some(vm) => floor_requests_on(&mut **vm, count),
        None => Ok(()),
    };
    eprintln!("matrix: {label}: requests");
    let (request_ns, floor_request_ns) = alternate(
        args.batches,
        args.requests,
        |count| requests_on(&mut vm, count),
        floor.is_some().then_some(&mut floor_requests as _),
    )?;
    drop(vm);

    let mut floor_starts = |count: u32| -> anyhow::Result<()> {
        if let Some(floor) = floor.as_ref() {
            for _ in 0..count {
                drop(black_box(floor.instantiate()?));
            }
        }
        Ok(())
    };
    eprintln!("matrix: {label}: VM starts");
    let (vm_start_ns, floor_vm_start_ns) = alternate(
        args.batches,
        args.starts,
        |count| {
            for _ in 0..count {
                drop(black_box(pwhost_vm_in::<ProxyHeaders>(&plugin)?));
            }
            Ok(())
        },
        floor.is_some().then_some(&mut floor_starts as _),
    )?;
    let figures = EngineFigures {
        runtime: label,
        request_ns,
        vm_start_us: vm_start_ns / 1e3,
        floor_request_ns,
        floor_vm_start_us: floor_vm_start_ns.map(|ns| ns / 1e3),
        note: None,
    };
    eprintln!(
        "matrix: {}: {:.0} ns/request ({}), {:.1} µs/VM start ({})",
        figures.runtime,
        figures.request_ns,
        figures
            .request_ratio()
            .map_or("no floor".into(), |r| format!("{r:.2}× floor")),
        figures.vm_start_us,
        figures
            .vm_start_ratio()
            .map_or("no floor".into(), |r| format!("{r:.2}× floor")),
    );
    Ok(figures)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let wasm = read_plugin(LIFECYCLE_PLUGIN)?;
    let engines: Vec<String> = if args.engines.is_empty() {
        pwhost::runtimes::available()
            .iter()
            .map(|e| e.to_string())
            .collect()
    } else {
        args.engines.clone()
    };
    let mut matrix = Vec::new();
    for path in &args.include {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let earlier: Vec<EngineFigures> = serde_json::from_str(&text)
            .with_context(|| format!("{}: not figures written by --json", path.display()))?;
        matrix.extend(earlier);
    }
    for (index, engine) in engines.iter().enumerate() {
        eprintln!("matrix: [{}/{}] {engine}", index + 1, engines.len());
        let figures = measure(&args, engine, &wasm).with_context(|| format!("engine {engine}"))?;
        // A figure measured now replaces an included one of the same engine, in its place.
        match matrix.iter_mut().find(|f| f.runtime == figures.runtime) {
            Some(earlier) => *earlier = figures,
            None => matrix.push(figures),
        }
    }
    let json = serde_json::to_string_pretty(&matrix)? + "\n";
    match &args.json {
        Some(path) => std::fs::write(path, json)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => print!("{json}"),
    }
    if let Some(path) = &args.plot {
        let title = "pwhost beside each engine's floor (lifecycle_bench, embedder-owned headers)";
        pwhost::bench::plot_matrix(&matrix, title, path)?;
        eprintln!("matrix: drew {}", path.display());
    }
    Ok(())
}
