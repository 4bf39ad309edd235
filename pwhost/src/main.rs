//! The `pwhost` command.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use pwhost::runtimes;
use pwhost::scenario::{
    self, FailurePolicy, GrpcCallReport, HttpCallReport, HttpExchange, Report, Scenario,
};
use runtime_api::RuntimeConfig;

// The engines' own C and C++ code (WAMR, V8) keeps its own allocator; this is Rust's.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Run Proxy-Wasm plugins on any of pwhost's engines.
#[derive(Parser)]
#[command(name = "pwhost", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a plugin against scripted traffic and report what it did.
    Run(Box<RunArgs>),
    /// Time a plugin per request and per VM start on each engine compiled in (or those named).
    Bench(Box<BenchArgs>),
    /// Proxy live HTTP traffic through chains of plugins (listeners, routes, clusters and
    /// plugins from a YAML file), until SIGTERM or SIGINT.
    #[cfg(feature = "serve")]
    Serve(ServeArgs),
    /// List the engines compiled into this build.
    Runtimes,
    /// Add engines' precompiled code to a module, for hosts that load it with
    /// `allow_precompiled: true`; every other host ignores it and compiles the bytecode.
    Precompile(PrecompileArgs),
}

#[derive(Parser)]
struct PrecompileArgs {
    /// The module to precompile.
    input: PathBuf,
    /// Where to write the module with its precompiled sections.
    #[arg(short, long)]
    output: PathBuf,
    /// An engine to precompile for (repeatable): one section each, named after the engine and
    /// its version (e.g. `precompiled_wasmtime_48.0.8`).
    #[arg(long = "runtime", required = true)]
    runtimes: Vec<String>,
    /// As the host that loads it will run: precompiled code carries deadline checks or not.
    #[command(flatten)]
    limits: LimitArgs,
}

/// How engines run guests; precompiled code is made for one such setting.
#[derive(Parser)]
struct LimitArgs {
    /// Stop any single plugin callback after this many milliseconds (0: no limit), so a
    /// plugin stuck in a loop fails its VM instead of hanging the run [default: 10000 on
    /// engines that can stop a call; the null runtime cannot].
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Cap the plugin's linear memory (MiB; 0: no cap) [default: 1024, as Envoy].
    #[arg(long)]
    max_memory_mib: Option<u64>,
}

impl LimitArgs {
    /// The engines' configuration these flags ask for.
    fn runtime_config(&self) -> RuntimeConfig {
        let deadline_ms = self.deadline_ms.unwrap_or(DEFAULT_DEADLINE_MS);
        RuntimeConfig {
            max_memory_bytes: match self.max_memory_mib {
                None => Some(RuntimeConfig::DEFAULT_MAX_MEMORY_BYTES),
                Some(0) => None,
                Some(mib) => Some(mib.saturating_mul(1 << 20)),
            },
            call_deadline: (deadline_ms > 0).then(|| Duration::from_millis(deadline_ms)),
            interruptible: false,
        }
    }
}

#[cfg(feature = "serve")]
#[derive(Parser)]
struct ServeArgs {
    /// The configuration: listeners (address, routes, HTTP filter chain), clusters, services.
    #[arg(long)]
    config: PathBuf,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    caches: CacheArgs,
    /// How logs are written to standard error (level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[cfg(feature = "serve")]
#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `pwhost serve`: loads everything first (a bad configuration or plugin stops it here, with
/// the reason), then serves until told to stop.
#[cfg(feature = "serve")]
fn serve(args: &ServeArgs) -> anyhow::Result<std::convert::Infallible> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: not escape codes in a log file or a journal.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let config = serve::ServeConfig::read(&args.config)?;
    let engines = pwhost::configured::BuildEngines::new(args.limits.runtime_config());
    let caches = args.caches.directory();
    let proxy = serve::Proxy::load(config, std::sync::Arc::new(engines), caches.as_deref())?;
    Ok(proxy.run()?)
}

#[derive(Parser)]
struct BenchArgs {
    #[command(flatten)]
    plugin: PluginArgs,
    /// Engines to compare (repeatable); default: every engine compiled in.
    #[arg(long = "runtime")]
    runtimes: Vec<String>,
    /// Scenario whose first HTTP exchange is the request measured; default `GET /`.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Requests to time per engine (at least 1).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    requests: u32,
    /// VM starts to time per engine (at least 1).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..))]
    starts: u32,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Also draw the figures as an SVG picture into this file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// The same limits as `pwhost run`'s: a plugin stuck in a loop fails instead of hanging
    /// the benchmark.
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Json,
    Text,
}

/// The plugin and what it is given, shared by the subcommands that load one.
#[derive(Parser)]
struct PluginArgs {
    /// The plugin: a WebAssembly module (.wasm); on the null runtime, a compiled-in native plugin
    /// (native:NAME) or a proxy-wasm SDK plugin built as a native shared library (.so), which
    /// runs unsandboxed: native plugins are trusted code.
    #[arg(long)]
    plugin: Option<String>,
    /// The root id selecting the plugin's root context (property `plugin_root_id`).
    #[arg(long, default_value = "")]
    root_id: String,
    /// The plugin name (property `plugin_name`); defaults to the file name.
    #[arg(long)]
    name: Option<String>,
    /// The VM id scoping shared data (property `plugin_vm_id`).
    #[arg(long, default_value = "")]
    vm_id: String,
    /// VM configuration: text, or @FILE.
    #[arg(long, default_value = "")]
    vm_config: String,
    /// Plugin configuration: text, or @FILE.
    #[arg(long, default_value = "")]
    plugin_config: String,
    /// An environment variable visible to the plugin through WASI (KEY=VALUE; repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    environment: Vec<String>,
}

impl PluginArgs {
    /// The plugin named by `--plugin`.
    fn plugin(&self) -> anyhow::Result<&str> {
        self.plugin
            .as_deref()
            .context("name the plugin with --plugin FILE (or, for pwhost run, --config FILE)")
    }

    /// The plugin's configuration, reading `@FILE` values.
    fn config(&self, allow_on_headers_stop_iteration: bool) -> anyhow::Result<abi::PluginConfig> {
        let environment = self
            .environment
            .iter()
            .map(|entry| {
                entry
                    .split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .with_context(|| format!("--env {entry:?} is not KEY=VALUE"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(abi::PluginConfig {
            name: self.name.clone().unwrap_or_else(|| {
                let plugin = self.plugin.as_deref().unwrap_or_default();
                let plugin = plugin
                    .strip_prefix(pwhost::plugins::NATIVE_PREFIX)
                    .unwrap_or(plugin);
                Path::new(plugin)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }),
            root_id: self.root_id.clone(),
            vm_id: self.vm_id.clone(),
            vm_configuration: text_or_file(&self.vm_config, "VM configuration")?,
            plugin_configuration: text_or_file(&self.plugin_config, "plugin configuration")?,
            environment,
            allow_on_headers_stop_iteration,
            ..abi::PluginConfig::default()
        })
    }

    /// Loads the plugin on `runtime`.
    fn load(
        &self,
        runtime: &dyn runtime_api::WasmRuntime<abi::VmState>,
        allow_on_headers_stop_iteration: bool,
    ) -> anyhow::Result<abi::Plugin> {
        let plugin = self.plugin()?;
        let config = self.config(allow_on_headers_stop_iteration)?;
        pwhost::plugins::load(runtime, plugin, config, abi::SharedState::new())
            .with_context(|| format!("cannot load plugin {plugin}"))
    }

    /// The engine to use when none is named: the null runtime for native plugins, else the
    /// first engine compiled in.
    fn default_runtime(&self) -> anyhow::Result<String> {
        if pwhost::plugins::is_native(self.plugin()?) {
            return Ok("null".into());
        }
        Ok(runtimes::default_name()
            .context("this build has no engine")?
            .to_string())
    }
}

#[derive(Parser)]
struct RunArgs {
    #[command(flatten)]
    plugin: PluginArgs,
    /// The plugin as Envoy or Traffic Server configures it (a YAML or JSON file: an Envoy filter
    /// entry, the Wasm message, a PluginConfig; see the README), instead of --plugin and its
    /// flags.
    #[arg(long, conflicts_with_all = ["plugin", "vm_config", "plugin_config", "root_id", "vm_id", "name", "environment", "allow_on_headers_stop_iteration", "failure_policy"])]
    config: Option<PathBuf>,
    /// The engine to run it on (see `pwhost runtimes`).
    #[arg(long)]
    runtime: Option<String>,
    /// Scenario file (JSON or YAML); default: one GET /.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    format: Format,
    /// What to do with a stream when the plugin fails.
    #[arg(long, value_enum, default_value = "fail-closed")]
    failure_policy: FailurePolicy,
    /// Let a Pause (StopIteration) from a header callback hold the headers only, so body and
    /// trailer callbacks still come (Envoy's `allow_on_headers_stop_iteration`); by default it
    /// holds everything until the plugin continues, as in Envoy.
    // Not for `bench`, which times a request without a body, where it changes nothing.
    #[arg(long)]
    allow_on_headers_stop_iteration: bool,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    caches: CacheArgs,
}

/// The disk caches of a configuration's code, shared by `run --config` and `serve`.
#[derive(clap::Args)]
struct CacheArgs {
    /// With --config: where to keep fetched remote code (by sha256), so a start without
    /// network still finds it, and compiled code, so a second start skips compiling
    /// [default: $XDG_CACHE_HOME/pwhost, else ~/.cache/pwhost].
    #[arg(long, conflicts_with = "no_cache")]
    cache_dir: Option<PathBuf>,
    /// With --config: keep nothing on disk (remote code is fetched at every start).
    #[arg(long)]
    no_cache: bool,
}

impl CacheArgs {
    /// The cache directory asked for, if any.
    fn directory(&self) -> Option<PathBuf> {
        match (&self.cache_dir, self.no_cache) {
            (_, true) => None,
            (Some(dir), false) => Some(dir.clone()),
            (None, false) => pwhost::configured::default_cache_dir(),
        }
    }
}

fn text_or_file(value: &str, what: &str) -> anyhow::Result<Vec<u8>> {
    match value.strip_prefix('@') {
        Some(path) => lifecycle::files::read_regular_file(Path::new(path))
            .with_context(|| format!("cannot read {what} file {path}")),
        None => Ok(value.as_bytes().to_vec()),
    }
}

fn load_scenario(path: Option<&Path>) -> anyhow::Result<Scenario> {
    let Some(path) = path else {
        return Ok(Scenario::single_get());
    };
    let bytes = lifecycle::files::read_regular_file(path)
        .with_context(|| format!("cannot read scenario {}", path.display()))?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("cannot read scenario {}", path.display()))?;
    Scenario::parse(&text).with_context(|| format!("invalid scenario {}", path.display()))
}

/// The per-callback deadline of `pwhost run` unless `--deadline-ms` says otherwise.
const DEFAULT_DEADLINE_MS: u64 = 10_000;

fn run(args: &RunArgs) -> anyhow::Result<Report> {
    // Without --config a run reads a local file and compiles it each time: the cache flags are
    // refused there rather than taken and ignored. (Clap's `requires` cannot say this: it lets
    // a required argument be missing when a conflicting one, here --plugin, is present.)
    if args.config.is_none() && (args.caches.cache_dir.is_some() || args.caches.no_cache) {
        use clap::CommandFactory as _;
        let mut cli = Cli::command();
        // Built, so that the usage line names `pwhost run`.
        cli.build();
        let message = "--cache-dir and --no-cache go with --config <CONFIG>: without it, a run \
                       reads its plugin's file and compiles it each time";
        let kind = clap::error::ErrorKind::MissingRequiredArgument;
        match cli.find_subcommand_mut("run") {
            Some(run) => run.error(kind, message).exit(),
            None => cli.error(kind, message).exit(),
        }
    }
    let scenario = load_scenario(args.scenario.as_deref())?;
    let runtime_config = args.limits.runtime_config();
    if let Some(config) = &args.config {
        let cache_dir = args.caches.directory();
        let plugins = pwhost::configured::load(
            config,
            args.runtime.as_deref(),
            runtime_config,
            cache_dir.as_deref(),
        )?;
        for plugin in plugins
            .http_filters()
            .chain(plugins.network_filters())
            .chain(plugins.services())
        {
            let module = plugins.module(plugin);
            warn_of_unenforced_limits(&args.limits, module.runtime_name(), module.capabilities());
        }
        return Ok(scenario::run_plugins(
            &std::sync::Arc::new(plugins),
            &scenario,
        )?);
    }
    // Envoy's and Traffic Server's names too, as in a `--config` file.
    let runtime_name = match &args.runtime {
        // `resolve` reads an empty name as the default, as a configuration file's missing one.
        Some(name) if name.is_empty() => anyhow::bail!("--runtime: an empty engine name"),
        Some(name) => lifecycle::runtime_name::resolve(name, runtimes::available())
            .map_err(|message| anyhow::anyhow!("--runtime: {message}"))?
            .to_string(),
        None => args.plugin.default_runtime()?,
    };
    let runtime = runtimes::create(&runtime_name, runtime_config)?;
    warn_of_unenforced_limits(&args.limits, &runtime_name, runtime.capabilities());
    let plugin = args
        .plugin
        .load(&*runtime, args.allow_on_headers_stop_iteration)?;
    Ok(scenario::run(&plugin, &scenario, args.failure_policy)?)
}

/// Limits the user asked for that `runtime` cannot enforce (native code on the null runtime)
/// are said, not silently dropped.
fn warn_of_unenforced_limits(
    limits: &LimitArgs,
    runtime: &str,
    capabilities: runtime_api::Capabilities,
) {
    if limits.deadline_ms.is_some_and(|ms| ms > 0) && !capabilities.call_deadline {
        eprintln!("warning: the {runtime} runtime cannot enforce --deadline-ms");
    }
    if limits.max_memory_mib.is_some_and(|mib| mib > 0) && !capabilities.memory_limit {
        eprintln!("warning: the {runtime} runtime cannot enforce --max-memory-mib");
    }
}

/// What of `scenario` `pwhost bench` does not use: it times the request and response headers
/// of `exchange`, its first, only.
fn unused_by_bench(scenario: &Scenario, exchange: &HttpExchange) -> Vec<&'static str> {
    [
        ("more than one HTTP exchange", scenario.http.len() > 1),
        ("tcp", !scenario.tcp.is_empty()),
        ("vms", scenario.vms > 1),
        ("properties", !scenario.properties.is_empty()),
        ("node", scenario.node.is_some()),
        ("ticks", scenario.ticks > 0),
        ("shutdown_ticks", scenario.shutdown_ticks > 0),
        (
            "foreign_function_calls",
            !scenario.foreign_function_calls.is_empty(),
        ),
        ("reproducible", scenario.reproducible.is_some()),
        ("vm", exchange.vm > 0),
        ("request_body", !exchange.request_body.is_empty()),
        ("request_trailers", !exchange.request_trailers.is_empty()),
        ("response_body", !exchange.response_body.is_empty()),
        ("response_trailers", !exchange.response_trailers.is_empty()),
        (
            "http_call_responses",
            !exchange.http_call_responses.is_empty(),
        ),
        (
            "grpc_call_responses",
            !exchange.grpc_call_responses.is_empty(),
        ),
        ("ticks_after", exchange.ticks_after > 0),
        ("delay_ms", exchange.delay_ms > 0),
        ("route_name", exchange.route_name.is_some()),
        ("cluster_name", exchange.cluster_name.is_some()),
    ]
    .into_iter()
    .filter_map(|(field, present)| present.then_some(field))
    .collect()
}

/// Adds a precompiled section per engine named; returns what it did, a line per section.
fn precompile(args: &PrecompileArgs) -> anyhow::Result<String> {
    let mut wasm = lifecycle::files::read_regular_file(&args.input)
        .with_context(|| format!("cannot read {}", args.input.display()))?;
    let mut done = String::new();
    for name in &args.runtimes {
        let engine = lifecycle::runtime_name::resolve(name, runtimes::available())
            .map_err(|message| anyhow::anyhow!("--runtime: {message}"))?;
        let runtime = runtimes::create(engine, args.limits.runtime_config())?;
        wasm = lifecycle::compiled::precompile(&*runtime, &wasm).map_err(|message| {
            anyhow::anyhow!(
                "cannot precompile {} for {engine}: {message}",
                args.input.display()
            )
        })?;
        if let Some(identity) = runtime.artifact_identity() {
            writeln!(done, "added section {} ({engine})", identity.section_name()).ok();
        }
    }
    std::fs::write(&args.output, &wasm)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    Ok(done)
}

fn bench(args: &BenchArgs) -> anyhow::Result<Vec<pwhost::bench::EngineFigures>> {
    let scenario = load_scenario(args.scenario.as_deref())?;
    let exchange = scenario.http.first().cloned().unwrap_or_default();
    let unused = unused_by_bench(&scenario, &exchange);
    if !unused.is_empty() {
        eprintln!(
            "warning: pwhost bench times the first HTTP exchange's request and response \
             headers only; not used: {}",
            unused.join(", ")
        );
    }
    let names: Vec<String> = if args.runtimes.is_empty() {
        // Every engine that can run this kind of plugin: native code or WebAssembly.
        let native = pwhost::plugins::is_native(args.plugin.plugin()?);
        runtimes::available()
            .iter()
            .filter(|name| (**name == "null") == native)
            .map(|name| name.to_string())
            .collect()
    } else {
        args.runtimes.clone()
    };
    // Every engine named is made first, so that a wrong name fails at once, before any work.
    let engines = names
        .into_iter()
        .map(|name| {
            anyhow::ensure!(!name.is_empty(), "--runtime: an empty engine name");
            let name = lifecycle::runtime_name::resolve(&name, runtimes::available())
                .map_err(|message| anyhow::anyhow!("--runtime: {message}"))?
                .to_string();
            Ok((runtimes::create(&name, args.limits.runtime_config())?, name))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut figures = Vec::new();
    let count = engines.len();
    for (index, (runtime, name)) in engines.into_iter().enumerate() {
        // A whole matrix takes minutes (wasmer's LLVM compiler alone takes seconds per module).
        eprintln!("pwhost bench: [{}/{count}] {name}", index + 1);
        warn_of_unenforced_limits(&args.limits, &name, runtime.capabilities());
        // Bench times a request without a body: holding the headers only changes nothing.
        let plugin = args.plugin.load(&*runtime, false)?;
        pwhost::scenario::register_builtin_foreign_functions(plugin.shared_state());
        let measured = pwhost::bench::measure(&plugin, &exchange, args.requests, args.starts)
            .with_context(|| format!("the plugin failed on {name}"))?;
        if let Some(note) = &measured.note {
            eprintln!("warning: {name}: {note}");
        }
        figures.push(measured);
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "pwhost bench: {}",
            args.plugin.plugin()?.rsplit('/').next().unwrap_or_default()
        );
        pwhost::bench::plot_matrix(&figures, &title, path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("pwhost bench: drew {}", path.display());
    }
    Ok(figures)
}

/// With a chain of plugins, what each did (an exchange's own lines then show only the chain's
/// result), a level deeper.
fn render_filters(out: &mut dyn std::fmt::Write, filters: &[scenario::FilterReport]) {
    const INDENT: &str = "    ";
    for filter in filters {
        writeln!(out, "  plugin {}", filter.plugin).ok();
        render_actions(out, INDENT, &filter.actions);
        render_calls(out, INDENT, &filter.http_calls, &filter.grpc_calls);
        render_filter_state(out, INDENT, &filter.filter_state);
        if filter.route_cache_clears > 0 {
            writeln!(
                out,
                "{INDENT}route cache cleared {}×",
                filter.route_cache_clears
            )
            .ok();
        }
        if filter.bypassed {
            writeln!(out, "{INDENT}BYPASSED: it had failed (fail open)").ok();
        }
        if let Some(error) = &filter.error {
            writeln!(out, "{INDENT}error: {error}").ok();
        }
    }
}

fn render_filter_state(
    out: &mut dyn std::fmt::Write,
    indent: &str,
    filter_state: &std::collections::BTreeMap<String, scenario::FilterStateReport>,
) {
    for (key, object) in filter_state {
        writeln!(
            out,
            "{indent}filter state {key} = {:?} ({})",
            object.value, object.span
        )
        .ok();
    }
}

fn render_actions(
    out: &mut dyn std::fmt::Write,
    indent: &str,
    actions: &std::collections::BTreeMap<&'static str, &'static str>,
) {
    let actions: Vec<String> = actions.iter().map(|(k, v)| format!("{k}={v}")).collect();
    writeln!(out, "{indent}actions: {}", actions.join(" ")).ok();
}

/// One direction of an exchange: headers, body and trailers, each line marked `>` or `<`.
fn render_message(
    out: &mut dyn std::fmt::Write,
    mark: &str,
    headers: &[(String, String)],
    body: &str,
    trailers: &[(String, String)],
) {
    for (k, v) in headers {
        writeln!(out, "  {mark} {k}: {v}").ok();
    }
    if !body.is_empty() {
        writeln!(out, "  {mark} body: {body:?}").ok();
    }
    for (k, v) in trailers {
        writeln!(out, "  {mark} trailer {k}: {v}").ok();
    }
}

/// The HTTP and gRPC calls an exchange or connection made.
fn render_calls(
    out: &mut dyn std::fmt::Write,
    indent: &str,
    http: &[HttpCallReport],
    grpc: &[GrpcCallReport],
) {
    for call in http {
        writeln!(
            out,
            "{indent}http call to {} ({} ms)",
            call.upstream, call.timeout_ms
        )
        .ok();
    }
    for call in grpc {
        writeln!(
            out,
            "{indent}grpc call to {} {}/{}",
            call.upstream, call.service, call.method
        )
        .ok();
    }
}

/// Prints an error on one line, even when an engine's message spans several, and fails.
fn fail(error: &anyhow::Error) -> ExitCode {
    let message = format!("{error:#}");
    eprintln!(
        "error: {}",
        message.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    ExitCode::FAILURE
}

/// Writes `report` for people (`--format text`) to `out` as it goes, so that a report with
/// megabytes of logs is not built in memory a second time.
fn render_text(out: &mut dyn std::fmt::Write, report: &Report) {
    writeln!(
        out,
        "runtime {} · ABI {}",
        report.runtime, report.abi_version
    )
    .ok();
    writeln!(
        out,
        "vm_start {} · configure {}",
        report.vm_start, report.configure
    )
    .ok();
    if let Some(error) = &report.start_error {
        writeln!(out, "start error: {error}").ok();
    }
    for error in &report.errors {
        writeln!(out, "error: {error}").ok();
    }
    for (i, http) in report.http.iter().enumerate() {
        writeln!(out, "\nHTTP exchange {}", i + 1).ok();
        render_actions(out, "  ", &http.actions);
        render_message(
            out,
            ">",
            &http.request_headers,
            &http.request_body,
            &http.request_trailers,
        );
        render_message(
            out,
            "<",
            &http.response_headers,
            &http.response_body,
            &http.response_trailers,
        );
        if let Some(local) = &http.local_response {
            write!(out, "  local response {} {:?}", local.status, local.body).ok();
            match &local.plugin {
                Some(plugin) => writeln!(out, " from {plugin}"),
                None => writeln!(out),
            }
            .ok();
        }
        render_calls(out, "  ", &http.http_calls, &http.grpc_calls);
        render_filter_state(out, "  ", &http.filter_state);
        render_filters(out, &http.filters);
        if http.route_cache_clears > 0 {
            writeln!(out, "  route cache cleared {}×", http.route_cache_clears).ok();
        }
        if http.stalled {
            writeln!(
                out,
                "  STALLED: the plugin paused the stream and never continued it"
            )
            .ok();
        }
        if http.reset {
            writeln!(out, "  RESET: the plugin closed the stream").ok();
        }
        if let Some(error) = &http.error {
            writeln!(out, "  error: {error}").ok();
        }
        for warning in &http.warnings {
            writeln!(out, "  warning: {warning}").ok();
        }
    }
    for (i, tcp) in report.tcp.iter().enumerate() {
        writeln!(out, "\nTCP connection {}", i + 1).ok();
        render_actions(out, "  ", &tcp.actions);
        writeln!(out, "  > upstream received: {:?}", tcp.upstream_received).ok();
        writeln!(
            out,
            "  < downstream received: {:?}",
            tcp.downstream_received
        )
        .ok();
        render_calls(out, "  ", &tcp.http_calls, &tcp.grpc_calls);
        render_filter_state(out, "  ", &tcp.filter_state);
        render_filters(out, &tcp.filters);
        if tcp.closed {
            writeln!(
                out,
                "  CLOSED: the proxy closed the connection (a plugin failed)"
            )
            .ok();
        }
        if tcp.stalled {
            writeln!(
                out,
                "  STALLED: the plugin paused data and never continued it"
            )
            .ok();
        }
        if let Some(error) = &tcp.error {
            writeln!(out, "  error: {error}").ok();
        }
        for warning in &tcp.warnings {
            writeln!(out, "  warning: {warning}").ok();
        }
    }
    if !report.done {
        writeln!(
            out,
            "\nnot done: a root context did not finish at shutdown (no proxy_done)"
        )
        .ok();
    }
    if !report.logs.is_empty() {
        writeln!(out, "\nlogs").ok();
        for log in &report.logs {
            writeln!(
                out,
                "  [{}] ({}) {}",
                log.level, log.context_id, log.message
            )
            .ok();
        }
    }
    for metric in &report.metrics {
        writeln!(
            out,
            "metric {} {} = {}",
            metric.metric_type, metric.name, metric.value
        )
        .ok();
    }
    for (key, value) in &report.shared_data {
        writeln!(out, "shared {key} = {value}").ok();
    }
}

fn render_figures(figures: &[pwhost::bench::EngineFigures]) -> String {
    let mut out = String::new();
    let fastest = figures
        .iter()
        .map(|f| f.request_ns)
        .fold(f64::INFINITY, f64::min);
    writeln!(
        out,
        "{:<20} {:>14} {:>10} {:>14}",
        "runtime", "ns/request", "ratio", "µs/VM start"
    )
    .ok();
    for f in figures {
        writeln!(
            out,
            "{:<20} {:>14.0} {:>9.2}× {:>14.1}",
            f.runtime,
            f.request_ns,
            f.request_ns / fastest,
            f.vm_start_us
        )
        .ok();
    }
    out
}

/// Writes the command's output. A reader that went away (`pwhost run … | head`) is not an
/// error worth reporting.
fn emit(text: &str) -> ExitCode {
    emit_text(|out| {
        let _ = out.write_str(text);
    })
}

/// Writes `value` as JSON to stdout as it is encoded, not built whole in memory first (a
/// report can be large).
/// `std::fmt::Write` on a buffered `std::io::Write`, keeping the first I/O error.
struct TextOut<W: std::io::Write> {
    inner: W,
    error: Option<std::io::Error>,
}

impl<W: std::io::Write> std::fmt::Write for TextOut<W> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        if self.error.is_some() {
            return Err(std::fmt::Error);
        }
        self.inner.write_all(text.as_bytes()).map_err(|error| {
            self.error = Some(error);
            std::fmt::Error
        })
    }
}

/// Writes what `render` writes to stdout as it is written.
fn emit_text(render: impl FnOnce(&mut dyn std::fmt::Write)) -> ExitCode {
    let mut out = TextOut {
        inner: std::io::BufWriter::new(std::io::stdout().lock()),
        error: None,
    };
    render(&mut out);
    let written = match out.error.take() {
        Some(error) => Err(error),
        None => out.inner.flush(),
    };
    exit_after_writing(written)
}

/// Success once the output is written (or its reader went away: a closed pipe is no error).
fn exit_after_writing(written: std::io::Result<()>) -> ExitCode {
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => fail(&anyhow::anyhow!("cannot write the report: {error}")),
    }
}

fn json(value: &impl serde::Serialize) -> ExitCode {
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    let written = serde_json::to_writer_pretty(&mut stdout, value)
        .map_err(std::io::Error::from)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    exit_after_writing(written)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        #[cfg(feature = "serve")]
        Command::Serve(args) => match serve(&args) {
            Ok(never) => match never {},
            Err(error) => fail(&error),
        },
        Command::Runtimes => emit(
            &runtimes::available()
                .iter()
                .map(|name| format!("{name}\n"))
                .collect::<String>(),
        ),
        Command::Bench(args) => match bench(&args) {
            Ok(figures) => match args.format {
                Format::Json => json(&figures),
                Format::Text => emit(&render_figures(&figures)),
            },
            Err(error) => fail(&error),
        },
        Command::Precompile(args) => match precompile(&args) {
            Ok(done) => {
                eprint!("{done}");
                ExitCode::SUCCESS
            }
            Err(error) => fail(&error),
        },
        Command::Run(args) => match run(&args) {
            Ok(report) => match args.format {
                Format::Json => json(&report),
                Format::Text => emit_text(|out| render_text(out, &report)),
            },
            Err(error) => fail(&error),
        },
    }
}
