//! A generator campaign: the `host_calls` and `smith_module` targets fed with seeded
//! pseudo-random inputs instead of libFuzzer's, for the volume libFuzzer's coverage collection
//! over the (instrumented) engines cannot reach on a small machine. No coverage guidance, but no
//! instrumentation either: every input is a whole plugin, every host-call plugin a differential
//! run over the engines of the build (or of `PWHOST_FUZZ_ENGINES`).
//!
//! ```sh
//! cargo run --release -p pwhost-fuzz --features all-engines --bin campaign -- SECONDS [FIRST_SEED]
//! ```
//!
//! Even seeds are host-call plugins, odd seeds `wasm-smith` modules; `PWHOST_FUZZ_TARGETS=host_calls`
//! (or `smith_module`) runs only the seeds of one target, as a run from the same first seed
//! would have (e.g. for a run of many host calls on an engine whose compiler makes `wasm-smith`
//! modules slow: their compilation, not the host calls, is most of such a run's time).
//!
//! Prints its figures every 30 s and at the end; a finding (an engine refusing a generated
//! plugin, engines disagreeing, a panic) stops it after writing the input to
//! `fuzz/artifacts/<target>/campaign-<seed>` (the fuzz targets reproduce it:
//! `cargo fuzz run <target> <file>`), and exits 1.

use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use pwhost_fuzz::host_calls::HostCallPlugin;

/// How big an input is: room for a plugin of every callback and hundreds of calls.
const INPUT_BYTES: usize = 16 * 1024;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(Ok(seconds)), first_seed) = (
        args.next().map(|s| s.parse::<u64>()),
        args.next().map(|s| s.parse::<u64>()),
    ) else {
        eprintln!("usage: campaign SECONDS [FIRST_SEED]");
        std::process::exit(2);
    };
    let first_seed = match first_seed {
        None => 0,
        Some(Ok(seed)) => seed,
        Some(Err(e)) => {
            eprintln!("campaign: FIRST_SEED: {e}");
            std::process::exit(2);
        }
    };
    let targets = match std::env::var("PWHOST_FUZZ_TARGETS").as_deref() {
        Err(_) | Ok("") | Ok("host_calls,smith_module") => Targets::Both,
        Ok("host_calls") => Targets::HostCalls,
        Ok("smith_module") => Targets::SmithModule,
        Ok(other) => {
            eprintln!(
                "campaign: PWHOST_FUZZ_TARGETS: {other:?} is not host_calls, smith_module or both"
            );
            std::process::exit(2);
        }
    };
    let engines: Vec<_> = pwhost_fuzz::engines().iter().map(|e| e.name()).collect();
    println!(
        "campaign: engines {engines:?}, {seconds} s, seeds from {first_seed}, targets {targets:?}"
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut next_report = started + Duration::from_secs(30);
    let mut figures = Figures::default();
    let mut seed = first_seed;
    while Instant::now() < deadline {
        if !targets.runs(seed) {
            seed += 1;
            continue;
        }
        let input = input(seed);
        figures.inputs += 1;
        // Even seeds: a host-call plugin; odd: a wasm-smith module.
        let finding = if seed % 2 == 0 {
            host_calls(&input, &mut figures)
        } else {
            smith_module(&input, &mut figures)
        };
        if let Some((target, finding)) = finding {
            let path = format!("fuzz/artifacts/{target}/campaign-{seed}");
            let saved = std::fs::create_dir_all(format!("fuzz/artifacts/{target}"))
                .and_then(|()| std::fs::write(&path, &input));
            eprintln!("campaign: finding at seed {seed} ({target}): {finding}");
            match saved {
                Ok(()) => eprintln!("campaign: input written to {path}"),
                Err(e) => eprintln!("campaign: could not write the input to {path}: {e}"),
            }
            figures.print(started);
            std::process::exit(1);
        }
        seed += 1;
        if Instant::now() >= next_report {
            figures.print(started);
            next_report += Duration::from_secs(30);
        }
    }
    figures.print(started);
    println!("campaign: no finding; next FIRST_SEED {seed}");
}

/// Which targets a campaign runs.
#[derive(Debug, Clone, Copy)]
enum Targets {
    Both,
    HostCalls,
    SmithModule,
}

impl Targets {
    /// Whether the input of `seed` is one of these targets' (even seeds: `host_calls`).
    fn runs(self, seed: u64) -> bool {
        match self {
            Targets::Both => true,
            Targets::HostCalls => seed % 2 == 0,
            Targets::SmithModule => seed % 2 == 1,
        }
    }
}

/// The input of `seed`: bytes of a generator seeded with it.
fn input(seed: u64) -> Vec<u8> {
    let mut random = fastrand::Rng::with_seed(seed);
    std::iter::repeat_with(|| random.u8(..))
        .take(INPUT_BYTES)
        .collect()
}

/// What the campaign has done so far.
#[derive(Default)]
struct Figures {
    inputs: u64,
    host_call_plugins: u64,
    smith_modules: u64,
    planned_calls: u64,
}

impl Figures {
    fn print(&self, started: Instant) {
        let inputs = self.inputs;
        let (loaded, runs) = pwhost_fuzz::counts();
        let elapsed = started.elapsed().as_secs_f64();
        println!(
            "campaign: {elapsed:.0} s: {inputs} inputs ({} host-call plugins, {} wasm-smith \
             inputs), {loaded} modules loaded on some engine, {runs} scenario runs, {} host \
             calls made ({} planned), {:.1} inputs/s",
            self.host_call_plugins,
            self.smith_modules,
            abi::host_calls_made(),
            self.planned_calls,
            inputs as f64 / elapsed.max(0.001),
        );
    }
}

/// The `host_calls` target on `input`: a finding is an engine refusing the plugin, or the
/// engines reporting its run differently.
fn host_calls(input: &[u8], figures: &mut Figures) -> Option<(&'static str, String)> {
    let plugin = HostCallPlugin::arbitrary_take_rest(Unstructured::new(input)).ok()?;
    figures.host_call_plugins += 1;
    figures.planned_calls += plugin.planned_calls() as u64;
    match catch(|| pwhost_fuzz::host_calls(&plugin)) {
        Ok(Ok(true)) => None,
        Ok(Ok(false)) => Some(("host_calls", "every engine refused it".to_string())),
        Ok(Err(difference)) => Some(("host_calls", difference)),
        Err(panic) => Some(("host_calls", panic)),
    }
}

/// The `smith_module` target on `input`: a finding is a panic (a crash ends the process).
fn smith_module(input: &[u8], figures: &mut Figures) -> Option<(&'static str, String)> {
    figures.smith_modules += 1;
    catch(|| pwhost_fuzz::smith_module(input))
        .err()
        .map(|panic| ("smith_module", panic))
}

/// Runs `f`, turning a panic into its message.
fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|panic| runtime_api::panic_message(&*panic).to_string())
}
