//! `pwhost_ats.so` in a real Traffic Server: each test starts `traffic_manager` (which runs
//! `traffic_server` and answers `traffic_ctl`) in a private run root with its own ports on
//! 127.0.0.1 and no cache, in front of an origin server started by the test, and sends real
//! HTTP requests through it. Every server is bounded in time and stopped by the test.
//!
//! The plugins are the corpus's Rust SDK plugins, unchanged, on every engine the plugin was
//! built with among wasmtime, WAMR and V8.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The engines this build of the plugin has, as Traffic Server's YAML names them.
fn engines() -> Vec<&'static str> {
    let mut engines = Vec::new();
    if cfg!(feature = "wasmtime") {
        engines.push("ats.wasm.runtime.wasmtime");
    }
    if cfg!(feature = "wamr") {
        engines.push("ats.wasm.runtime.wamr");
    }
    if cfg!(feature = "v8") {
        engines.push("ats.wasm.runtime.v8");
    }
    engines
}

/// The workspace's root (plugins are in `plugins/dist`).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate is in the workspace")
        .to_path_buf()
}

fn corpus_plugin(name: &str) -> PathBuf {
    let path = workspace()
        .join("plugins/dist/rust")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup.sh (it builds the plugin corpus)",
        path.display()
    );
    path
}

/// The plugin library cargo built with this test: `cargo test` leaves the cdylib beside the
/// test executable in `target/<profile>/deps` (only `cargo build` copies it one level up).
fn plugin_library() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let library = exe
        .parent()
        .expect("the test executable is in a directory")
        .join("libpwhost_ats.so");
    assert!(
        library.exists(),
        "{} is missing: cargo builds it with the tests of pwhost-ats",
        library.display()
    );
    library
}

#[path = "../../pwhost/tests/common/free_port.rs"]
mod ports;
use ports::{free_port, wait_for_listener};

// Shared with the serve suite, which uses all of it (this suite reads a status only).
#[allow(dead_code)]
#[path = "../../pwhost/tests/common/faulty_peers.rs"]
mod faulty_peers;
use faulty_peers::{chunked_post, Misbehaving, Misbehaviour};

#[path = "../../pwhost/tests/common/tcp_peers.rs"]
mod tcp_peers;
use tcp_peers::{
    a_slow_reader_gets_all_of_a_flood_past_a_1s_idle_timeout,
    assert_closed_after_a_1s_connect_timeout, assert_one_way_traffic_outlives_a_1s_idle_timeout,
    echoes, tcp_exchange, the_chunk_before_a_close_still_goes_out, websocket_upgrade, Echo, Flood,
    Greeter, Sink, Unanswering, UpgradeEcho,
};

/// How much a flooding TCP upstream sends at once: more than loopback's socket buffers take
/// (about 4 MiB here), so that a slow client leaves the rest in the proxy.
const FLOOD: usize = 16 << 20;

/// An origin server answering every request with 200, `server: origin`, and a body listing the
/// request line and headers it received (`name: value` lines), an empty line, the request body
/// and a last line `hello from origin`, so tests see what the plugins forwarded.
struct Origin {
    address: SocketAddr,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Origin {
    fn start() -> Origin {
        Origin::answering_with(&[])
    }

    /// An origin adding `headers` to every answer.
    fn answering_with(headers: &[(&str, &str)]) -> Origin {
        Origin::serving(headers, None)
    }

    /// An origin adding `headers` to every answer and refusing (403, with its usual body)
    /// every request whose path is `refused`.
    fn serving(headers: &[(&str, &str)], refused: Option<&'static str>) -> Origin {
        let extra: Vec<tiny_http::Header> = headers
            .iter()
            .map(|(name, value)| tiny_http::Header::from_bytes(*name, *value).expect("header"))
            .collect();
        let server = tiny_http::Server::http("127.0.0.1:0").expect("the origin binds");
        let address = server
            .server_addr()
            .to_ip()
            .expect("the origin listens on IP");
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (Arc::clone(&requests), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let Ok(Some(mut request)) = server.recv_timeout(Duration::from_millis(50)) else {
                    continue;
                };
                let mut request_body = String::new();
                let _ = request.as_reader().read_to_string(&mut request_body);
                count.fetch_add(1, Ordering::Relaxed);
                let mut body = format!("{} {}\n", request.method(), request.url());
                for header in request.headers() {
                    body.push_str(&format!(
                        "{}: {}\n",
                        header.field.as_str().as_str().to_ascii_lowercase(),
                        header.value
                    ));
                }
                body.push_str(&format!("\n{request_body}\nhello from origin\n"));
                let status = if refused == Some(request.url()) {
                    403
                } else {
                    200
                };
                let mut response = tiny_http::Response::from_string(body)
                    .with_status_code(status)
                    .with_header(
                        tiny_http::Header::from_bytes("server", "origin").expect("header"),
                    );
                for header in &extra {
                    response.add_header(header.clone());
                }
                let _ = request.respond(response);
            }
        });
        Origin {
            address,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A Traffic Server in a private run root: `traffic_manager` and the `traffic_server` it runs,
/// in a process group of their own that is killed when the value is dropped.
struct TrafficServer {
    root: tempfile::TempDir,
    port: u16,
    manager: Child,
}

/// One plugin of a test configuration: a YAML file's content.
struct PluginFile {
    name: &'static str,
    yaml: String,
}

/// Traffic Server's YAML for corpus plugin `plugin` on `runtime` with `configuration` and extra
/// plugin fields (`failurePolicy: ...`, unindented).
fn plugin_yaml(plugin: &str, runtime: &str, configuration: &str, extra: &str) -> String {
    format!(
        "config:\n  name: {plugin}\n  rootId: \"\"\n  vmConfig:\n    vmId: {plugin}\n    \
         runtime: {runtime}\n    code:\n      local:\n        filename: {}\n  \
         configuration:\n    \"@type\": type.googleapis.com/google.protobuf.StringValue\n    \
         value: \"{configuration}\"\n{}",
        corpus_plugin(plugin).display(),
        extra
            .lines()
            .map(|line| format!("  {line}\n"))
            .collect::<String>()
    )
}

/// The corpus's `http_call` on `runtime`, with more `config` lines, calling its `auth_cluster`
/// at `auth`.
fn http_call_yaml(runtime: &str, config: &str, auth: SocketAddr) -> String {
    format!(
        "{}upstreams:\n  auth_cluster: {auth}\n",
        plugin_yaml("http_call", runtime, "", config)
    )
}

/// The file in the run root's log directory that takes the standard output and error of
/// `traffic_manager` and of the `traffic_server` processes it starts.
const MANAGER_OUTPUT: &str = "manager.output";

/// Where `manager.log` of a start that failed before traffic_server opened its logs is put
/// aside (see [`TrafficServer::start_prepared`]).
const FIRST_MANAGER_LOG: &str = "manager.first-attempt.log";

/// The longest a Traffic Server of a test lives, even if the test dies without stopping it.
const SERVER_LIFETIME_SECONDS: &str = "600";

const RECORDS: &str = "\
CONFIG proxy.config.admin.user_id STRING #-1
CONFIG proxy.config.exec_thread.autoconfig INT 0
CONFIG proxy.config.exec_thread.limit INT 2
CONFIG proxy.config.accept_threads INT 0
CONFIG proxy.config.task_threads INT 1
CONFIG proxy.config.http.cache.http INT 0
CONFIG proxy.config.cache.ram_cache.size INT 0
CONFIG proxy.config.url_remap.remap_required INT 1
CONFIG proxy.config.reverse_proxy.enabled INT 1
CONFIG proxy.config.http.insert_response_via_str INT 0
CONFIG proxy.config.http.insert_request_via_str INT 0
CONFIG proxy.config.http.response_server_enabled INT 0
CONFIG proxy.config.diags.debug.enabled INT 1
CONFIG proxy.config.diags.debug.tags STRING pwhost_ats
CONFIG proxy.config.diags.output.debug STRING L
CONFIG proxy.config.diags.output.diag STRING L
CONFIG proxy.config.log.logging_enabled INT 0
CONFIG proxy.config.http.transaction_active_timeout_in INT 30
";

impl TrafficServer {
    /// Writes the run root for `plugins` in front of `origin`; `traffic_server` (not the
    /// manager) when `direct`, which is how a start that must fail is observed.
    fn prepare(origin: &Origin, plugins: &[PluginFile]) -> (tempfile::TempDir, u16) {
        assert!(
            Path::new("/usr/bin/traffic_manager").exists(),
            "Traffic Server is not installed: run scripts/setup.sh (apt-get install trafficserver)"
        );
        let root = tempfile::tempdir().expect("a temporary run root");
        let dir = root.path();
        for sub in ["etc", "log", "run", "cache"] {
            std::fs::create_dir_all(dir.join(sub)).expect("run root directories");
        }
        let at = |sub: &str| dir.join(sub).display().to_string();
        // What `traffic_layout init` writes, with every writable directory inside the root and
        // the programs and plugins where Debian installs them.
        let runroot = format!(
            "prefix: {}\nexec_prefix: /usr\nbindir: /usr/bin\nsbindir: /usr/sbin\nsysconfdir: {}\n\
             datadir: {}\nincludedir: /usr/include\nlibdir: /usr/lib/trafficserver\n\
             libexecdir: /usr/lib/trafficserver/modules\nlocalstatedir: {}\nruntimedir: {}\n\
             logdir: {}\ncachedir: {}\n",
            dir.display(),
            at("etc"),
            at("cache"),
            at("run"),
            at("run"),
            at("log"),
            at("cache")
        );
        std::fs::write(dir.join("runroot.yaml"), runroot).expect("runroot.yaml");
        let port = free_port();
        let etc = dir.join("etc");
        let records = format!(
            "{RECORDS}CONFIG proxy.config.http.server_ports STRING {port}:ip-in=127.0.0.1\n"
        );
        std::fs::write(etc.join("records.config"), records).expect("records.config");
        std::fs::write(
            etc.join("remap.config"),
            format!("map / http://{}/\n", origin.address),
        )
        .expect("remap.config");
        std::fs::copy(
            "/etc/trafficserver/ip_allow.yaml",
            etc.join("ip_allow.yaml"),
        )
        .expect("ip_allow.yaml");
        for empty in [
            "storage.config",
            "logging.yaml",
            "cache.config",
            "hosting.config",
        ] {
            std::fs::write(etc.join(empty), "").expect("empty configuration file");
        }
        let mut line = plugin_library().display().to_string();
        for plugin in plugins {
            let file = format!("{}.yaml", plugin.name);
            std::fs::write(etc.join(&file), &plugin.yaml).expect("plugin YAML");
            // Relative names are taken from Traffic Server's configuration directory.
            line.push(' ');
            line.push_str(&file);
        }
        std::fs::write(etc.join("plugin.config"), format!("{line}\n")).expect("plugin.config");
        (root, port)
    }

    fn start(origin: &Origin, plugins: &[PluginFile]) -> TrafficServer {
        let (root, port) = Self::prepare(origin, plugins);
        Self::start_prepared(root, port)
    }

    /// As [`TrafficServer::start`], with `edit` applied to the run root's `etc/<file>` first.
    fn start_edited(
        origin: &Origin,
        plugins: &[PluginFile],
        file: &str,
        edit: impl FnOnce(String) -> String,
    ) -> TrafficServer {
        let (root, port) = Self::prepare(origin, plugins);
        let path = root.path().join("etc").join(file);
        let text = std::fs::read_to_string(&path).expect("a configuration file of the run root");
        std::fs::write(&path, edit(text)).expect("the edited configuration file");
        Self::start_prepared(root, port)
    }

    /// Starts the server of a run root made by [`TrafficServer::prepare`].
    fn start_prepared(root: tempfile::TempDir, port: u16) -> TrafficServer {
        let mut server = TrafficServer {
            manager: Self::spawn_manager(&root),
            root,
            port,
        };
        // The manager listens for Traffic Server from the start: ready is what Traffic Server
        // says once its plugins are loaded. A start takes 2-5 s on an idle machine (the plugin
        // library loads every engine and compiles the plugins); on a machine loaded with other
        // work and tests beside, one start in seven suite runs failed within 30 s, so the
        // deadline is generous and the failures say which they are.
        let mut started = Instant::now();
        let mut started_again = false;
        loop {
            let diagnostics = server.diagnostics();
            if diagnostics.contains("traffic server running")
                && TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                return server;
            }
            assert!(
                !diagnostics.contains("EMERGENCY"),
                "Traffic Server failed to start after {:?}:\n{diagnostics}",
                started.elapsed()
            );
            // Once in CI, every traffic_server the manager launched exited before opening its
            // own logs, so before any plugin was loaded, until the deadline. That is the
            // machine's doing, not a plugin's: the server is started once more, and the
            // first attempt's output stays in the diagnostics.
            if server.relaunches_before_its_logs() >= 2 {
                assert!(
                    !started_again,
                    "traffic_server exited twice before opening its logs:\n{diagnostics}"
                );
                eprintln!("traffic_server exited before opening its logs; starting again:");
                eprintln!("{diagnostics}");
                server.kill();
                let log = server.root.path().join("log");
                std::fs::rename(log.join("manager.log"), log.join(FIRST_MANAGER_LOG))
                    .expect("the first manager's log put aside");
                server.manager = Self::spawn_manager(&server.root);
                started_again = true;
                started = Instant::now();
                continue;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "Traffic Server did not start (or listen on {port}) within 90 s:\n{diagnostics}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts `traffic_manager` on `root`, its output (and that of the `traffic_server`
    /// processes it runs) appended to [`MANAGER_OUTPUT`].
    fn spawn_manager(root: &tempfile::TempDir) -> Child {
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.path().join("log").join(MANAGER_OUTPUT))
            .expect("the manager's output file");
        // `timeout` bounds the server's life even if the test process dies before its drop: it
        // leads the process group, and its KILL reaches every process in it.
        Command::new("timeout")
            .args(["-s", "KILL", SERVER_LIFETIME_SECONDS, "traffic_manager"])
            .arg(format!("--run-root={}", root.path().display()))
            // What traffic_server prints before its own logs open (a refused lock, a bad
            // record) goes to the output it inherits from the manager.
            .stdout(
                output
                    .try_clone()
                    .expect("a second handle on the output file"),
            )
            .stderr(output)
            .process_group(0)
            .spawn()
            .expect("traffic_manager starts")
    }

    /// How often the manager has relaunched a traffic_server while none has opened
    /// `diags.log`, which traffic_server does first thing, before loading any plugin (0 once
    /// one has).
    fn relaunches_before_its_logs(&self) -> usize {
        let log = self.root.path().join("log");
        if log.join("diags.log").exists() {
            return 0;
        }
        std::fs::read_to_string(log.join("manager.log"))
            .unwrap_or_default()
            .matches("Relaunching proxy")
            .count()
    }

    /// Kills the manager's process group (the manager, traffic_server and their helpers) and
    /// waits for the manager.
    fn kill(&mut self) {
        // SAFETY: `kill` with a negative pid signals the process group the manager leads
        // (made with `process_group(0)`), which holds traffic_server and its helpers; it
        // touches no memory of this process.
        unsafe { libc::kill(-(self.manager.id() as i32), libc::SIGKILL) };
        let _ = self.manager.wait();
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Traffic Server's diagnostics so far (`diags.log` and `traffic.out`).
    fn diagnostics(&self) -> String {
        let log = self.root.path().join("log");
        // With the crash logs Traffic Server writes (`crash-*.log`: the signal and a backtrace).
        let mut crashes: Vec<String> = std::fs::read_dir(&log)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .filter(|name| name.starts_with("crash-"))
                    .collect()
            })
            .unwrap_or_default();
        crashes.sort();
        [
            "diags.log",
            "traffic.out",
            "manager.log",
            FIRST_MANAGER_LOG,
            MANAGER_OUTPUT,
        ]
        .iter()
        .map(|name| name.to_string())
        .chain(crashes)
        .map(|name| std::fs::read_to_string(log.join(name)).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
    }

    /// Waits (at most 20 s) until the diagnostics contain `text`.
    fn wait_for_log(&self, text: &str) {
        self.wait_for_log_line(&format!("{text:?}"), |line| line.contains(text));
    }

    /// Writes `yaml` as the plugin file `name`, reloads, and waits (at most 20 s) until this
    /// server has reloaded `reloads` times.
    fn reload_plugin_file(&self, name: &str, yaml: &str, reloads: usize) {
        std::fs::write(self.etc().join(format!("{name}.yaml")), yaml).expect("new YAML");
        self.ctl(&["config", "reload"]);
        self.wait_for_log_count("reloaded the configuration", reloads);
    }

    /// Waits (at most 20 s) until the diagnostics hold `text` `count` times.
    fn wait_for_log_count(&self, text: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.diagnostics().matches(text).count() < count {
            assert!(
                Instant::now() < deadline,
                "{text:?} not {count} times:\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (at most 20 s) for a line of the diagnostics that `matches` accepts (`wanted` says
    /// which, when none comes), and returns it.
    fn wait_for_log_line(&self, wanted: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.diagnostics();
            if let Some(line) = log.lines().find(|line| matches(line)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no {wanted} in the log within 20 s:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stat `name`'s `name value` line once it has a value `wanted` accepts, asked for until
    /// `deadline`; else what `traffic_ctl` showed last. The plugin publishes its stats once a
    /// second: until the first time, Traffic Server does not know the stat.
    fn metric_by(
        &self,
        name: &str,
        deadline: Instant,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<String, Result<String, String>> {
        loop {
            let shown = self.try_ctl(&["metric", "get", name]);
            if let Ok(line) = shown.as_deref().map(str::trim) {
                if wanted(line) {
                    return Ok(line.to_string());
                }
            }
            if Instant::now() >= deadline {
                return Err(shown);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether stat `name` comes to be as `wanted` within `limit`.
    fn metric_within(&self, name: &str, limit: Duration, wanted: impl Fn(&str) -> bool) -> bool {
        self.metric_by(name, Instant::now() + limit, wanted).is_ok()
    }

    /// Waits (until `deadline`) for stat `name` to have a value `wanted` accepts, and returns its
    /// `name value` line (see [`TrafficServer::metric_by`]).
    fn wait_for_metric(
        &self,
        name: &str,
        deadline: Instant,
        wanted: impl Fn(&str) -> bool,
    ) -> String {
        self.metric_by(name, deadline, wanted)
            .unwrap_or_else(|shown| {
                panic!(
                    "stat {name} never as wanted: {shown:?}\n{}",
                    self.diagnostics()
                )
            })
    }

    fn etc(&self) -> PathBuf {
        self.root.path().join("etc")
    }

    /// `traffic_ctl ARGS` against this server.
    fn ctl(&self, args: &[&str]) -> String {
        self.try_ctl(args)
            .unwrap_or_else(|e| panic!("traffic_ctl {args:?} failed: {e}"))
    }

    /// `traffic_ctl ARGS`: its output, or its error output if it failed.
    fn try_ctl(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new("traffic_ctl")
            .arg(format!("--run-root={}", self.root.path().display()))
            .args(args)
            .output()
            .expect("traffic_ctl runs");
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }
}

impl Drop for TrafficServer {
    fn drop(&mut self) {
        // traffic_manager restarts a traffic_server that crashed, which would hide the crash
        // from a test that only looks at answers: every test also checks there was none.
        let log = self.root.path().join("log");
        let crashed = std::fs::read_to_string(log.join("manager.log"))
            .unwrap_or_default()
            .contains("Server Process was reset")
            || std::fs::read_dir(&log)
                .map(|entries| {
                    entries
                        .flatten()
                        .any(|entry| entry.file_name().to_string_lossy().starts_with("crash-"))
                })
                .unwrap_or(false);
        let diagnostics = crashed.then(|| self.diagnostics());
        if std::env::var_os("PWHOST_KEEP_RUNROOT").is_some() {
            eprintln!("run root kept: {}", self.root.path().display());
            let root = std::mem::replace(&mut self.root, tempfile::tempdir().expect("tempdir"));
            let _ = root.keep();
        }
        self.kill();
        if let Some(diagnostics) = diagnostics.filter(|_| !std::thread::panicking()) {
            panic!("traffic_server crashed during the test:\n{diagnostics}");
        }
    }
}

/// A response as the tests look at it.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `GET url` with `headers` on a new connection.
fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    try_get(url, headers).unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

fn try_get(url: &str, headers: &[(&str, &str)]) -> Result<Reply, ureq::Error> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into();
    let mut request = agent.get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut response = request.call()?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut body = String::new();
    // A response cut short (the upstream reset mid-body) is an error, not a panic.
    response.body_mut().as_reader().read_to_string(&mut body)?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// Sends `POST url` with `body` on a new connection.
fn post(url: &str, body: &str) -> Result<Reply, ureq::Error> {
    post_with(url, &[], body.as_bytes(), false)
}

/// A POST with `headers`, its body sent with a length, or `chunked`.
fn post_with(
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    chunked: bool,
) -> Result<Reply, ureq::Error> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into();
    let mut request = agent.post(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut response = if chunked {
        let mut reader = body;
        request.send(ureq::SendBody::from_reader(&mut reader))?
    } else {
        request.send(body)?
    };
    let mut text = String::new();
    response.body_mut().as_reader().read_to_string(&mut text)?;
    Ok(Reply {
        status: response.status().as_u16(),
        headers: Vec::new(),
        body: text,
    })
}

const KEY: (&str, &str) = ("x-api-key", "secret");

#[test]
fn plugins_rewrite_headers_answer_locally_share_data_and_fail_closed_on_every_engine() {
    let engines = engines();
    assert!(!engines.is_empty(), "built without wasmtime, WAMR or V8");
    for runtime in engines {
        let origin = Origin::start();
        let reload = "failurePolicy: FAIL_RELOAD\nreloadConfig:\n  backoff:\n    \
                      baseInterval: 0.1s\n    maxInterval: 0.2s\n";
        let server = TrafficServer::start(
            &origin,
            &[
                PluginFile {
                    name: "panics",
                    yaml: plugin_yaml("panics", runtime, "", reload),
                },
                PluginFile {
                    name: "http_headers",
                    yaml: plugin_yaml("http_headers", runtime, "", ""),
                },
                PluginFile {
                    name: "local_response",
                    yaml: plugin_yaml("local_response", runtime, "secret", ""),
                },
                PluginFile {
                    name: "shared_data",
                    yaml: plugin_yaml("shared_data", runtime, "", ""),
                },
            ],
        );
        let context = |what: &str| format!("{runtime}: {what}\n{}", server.diagnostics());

        // Header rewrite both ways, in Traffic Server's own headers.
        let reply = try_get(
            &server.url("/hello?x=1"),
            &[KEY, ("user-agent", "test-agent"), ("x-remove-me", "1")],
        )
        .unwrap_or_else(|e| panic!("{}", context(&e.to_string())));
        assert_eq!(reply.status, 200, "{}", context(&reply.body));
        let forwarded = &reply.body;
        assert!(forwarded.starts_with("GET /hello?x=1\n"), "{forwarded}");
        for line in [
            "x-pwhost-plugin: http_headers",
            "user-agent: pwhost-test",
            "x-panics: no",
            "x-vm-started: yes",
        ] {
            assert!(
                forwarded.contains(line),
                "{runtime}: no {line:?} in\n{forwarded}"
            );
        }
        assert!(!forwarded.contains("x-remove-me"), "{forwarded}");
        assert_eq!(reply.header("x-powered-by"), Some("pwhost"), "{runtime}");
        assert_eq!(
            reply.header("server"),
            None,
            "{runtime}: the plugin removes it"
        );

        // A local reply: the origin never sees the request; the reply still goes through the
        // response callbacks, as in Envoy.
        let before = origin.requests();
        let reply = get(&server.url("/private"), &[]);
        assert_eq!(reply.status, 403, "{}", context(&reply.body));
        assert_eq!(reply.body, "access denied\n", "{runtime}");
        assert_eq!(reply.header("x-denied-by"), Some("pwhost"), "{runtime}");
        assert_eq!(reply.header("x-powered-by"), Some("pwhost"), "{runtime}");
        assert_eq!(
            origin.requests(),
            before,
            "{runtime}: the origin saw a denied request"
        );

        // Shared data is one store for the VM copies of every Traffic Server thread: each
        // request, on a connection of its own, counts one more.
        let mut counts = Vec::new();
        for _ in 0..6 {
            let reply = get(&server.url("/count"), &[KEY]);
            assert_eq!(reply.status, 200, "{}", context(&reply.body));
            let count = reply
                .body
                .lines()
                .find_map(|line| line.strip_prefix("x-counter: "))
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or_else(|| panic!("{runtime}: no x-counter in {}", reply.body));
            counts.push(count);
        }
        assert!(
            counts.windows(2).all(|pair| pair[1] == pair[0] + 1),
            "{runtime}: the counter did not count up across threads: {counts:?}"
        );

        // A plugin that traps fails the transaction closed (503) and Traffic Server goes on;
        // FAIL_RELOAD gives the next transactions a fresh VM copy.
        let reply = get(&server.url("/boom"), &[KEY, ("x-panic", "boom")]);
        assert_eq!(reply.status, 503, "{}", context(&reply.body));
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..4 {
            let reply = get(&server.url("/after"), &[KEY]);
            assert_eq!(reply.status, 200, "{}", context("after the trap"));
        }
        let diagnostics = server.diagnostics();
        assert!(
            diagnostics.contains("pwhost test panic: boom"),
            "{runtime}: the plugin's panic message is not in the log:\n{diagnostics}"
        );
        assert!(
            diagnostics.contains("[http_headers] done: /hello?x=1"),
            "{runtime}: on_log did not run with the request headers readable:\n{diagnostics}"
        );
    }
}

#[test]
fn the_example_plugin_file_runs_where_the_package_installs_it() {
    // examples/traffic_server.yaml as the Debian package lays it out: the plugin it names by a
    // relative path one directory up, in plugins/dist/rust/ (here: beside the run root's etc/).
    let origin = Origin::start();
    let example = std::fs::read_to_string(workspace().join("examples/traffic_server.yaml"))
        .expect("examples/traffic_server.yaml");
    let (root, port) = TrafficServer::prepare(
        &origin,
        &[PluginFile {
            name: "traffic_server",
            yaml: example,
        }],
    );
    let plugins = root.path().join("plugins/dist/rust");
    std::fs::create_dir_all(&plugins).expect("the plugins' directory");
    std::fs::copy(
        corpus_plugin("http_headers"),
        plugins.join("http_headers.wasm"),
    )
    .expect("the example's plugin");
    let server = TrafficServer::start_prepared(root, port);
    let reply = get(&server.url("/"), &[]);
    assert_eq!(reply.status, 200, "{}", server.diagnostics());
    assert_eq!(reply.header("x-powered-by"), Some("pwhost"));
    assert!(
        reply.body.contains("x-pwhost-plugin: http_headers"),
        "{}",
        reply.body
    );
}

/// `--cache-dir=DIR` keeps each plugin's compiled code there (and remote code) for the next
/// start, as `pwhost run --config` and `pwhost serve` do; without it nothing is written.
#[cfg(feature = "wasmtime")]
#[test]
fn a_cache_directory_keeps_the_compiled_code_for_the_next_start() {
    let origin = Origin::start();
    let (root, port) = TrafficServer::prepare(
        &origin,
        &[PluginFile {
            name: "http_headers",
            yaml: plugin_yaml("http_headers", "ats.wasm.runtime.wasmtime", "", ""),
        }],
    );
    let cache = root.path().join("cache");
    let plugin_config = root.path().join("etc/plugin.config");
    let line = std::fs::read_to_string(&plugin_config).expect("plugin.config");
    let line = line.replacen(".so ", &format!(".so --cache-dir={} ", cache.display()), 1);
    std::fs::write(&plugin_config, line).expect("plugin.config");
    let server = TrafficServer::start_prepared(root, port);
    let reply = get(&server.url("/"), &[]);
    assert_eq!(reply.status, 200, "{}", server.diagnostics());
    assert_eq!(reply.header("x-powered-by"), Some("pwhost"));
    let compiled: Vec<String> = std::fs::read_dir(cache.join("compiled"))
        .unwrap_or_else(|e| panic!("{e}\n{}", server.diagnostics()))
        .filter_map(|entry| Some(entry.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    assert_eq!(compiled.len(), 1, "{compiled:?}");
    assert!(compiled[0].starts_with("wasmtime"), "{compiled:?}");
}

#[test]
fn reload_puts_a_changed_configuration_in_force_for_new_transactions() {
    let runtime = engines()[0];
    let origin = Origin::start();
    let server = TrafficServer::start(
        &origin,
        &[PluginFile {
            name: "local_response",
            yaml: plugin_yaml("local_response", runtime, "first", ""),
        }],
    );
    assert_eq!(get(&server.url("/"), &[("x-api-key", "first")]).status, 200);
    std::fs::write(
        server.etc().join("local_response.yaml"),
        plugin_yaml("local_response", runtime, "second", ""),
    )
    .expect("the changed configuration");
    server.ctl(&["config", "reload"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&server.url("/"), &[("x-api-key", "second")]).status != 200 {
        assert!(
            Instant::now() < deadline,
            "the new key was not in force within 20 s:\n{}",
            server.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(get(&server.url("/"), &[("x-api-key", "first")]).status, 403);
    assert!(server.diagnostics().contains("reloaded the configuration"));
    // A file whose plugin cannot load (its code is missing) is refused as a whole, with the
    // reason; the configuration in force keeps serving.
    let missing = plugin_yaml("local_response", runtime, "third", "").replace(
        &corpus_plugin("local_response").display().to_string(),
        "/nonexistent/local_response.wasm",
    );
    std::fs::write(server.etc().join("local_response.yaml"), missing).expect("a broken file");
    server.ctl(&["config", "reload"]);
    server.wait_for_log("reload failed, the previous configuration stays in force");
    assert!(
        server
            .diagnostics()
            .contains("/nonexistent/local_response.wasm"),
        "{}",
        server.diagnostics()
    );
    assert_eq!(
        get(&server.url("/"), &[("x-api-key", "second")]).status,
        200
    );
    assert_eq!(get(&server.url("/"), &[("x-api-key", "third")]).status, 403);
}

#[test]
fn a_configuration_error_stops_traffic_server_with_the_field_and_the_problem() {
    let origin = Origin::start();
    let bad = plugin_yaml("http_headers", engines()[0], "", "").replace("vmId:", "vmIdd:");
    let output = refused_start(&origin, bad);
    assert!(
        output.contains("bad.yaml") && output.contains("vmIdd"),
        "the error does not name the file and the field:\n{output}"
    );
    // Code named by a FIFO (or a device) is refused, not waited on: Traffic Server would never
    // start.
    let fifos = tempfile::tempdir().expect("a directory");
    let fifo = fifos.path().join("plugin.wasm");
    let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: `name` is a NUL-terminated path that lives through the call.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0, "mkfifo");
    let from_fifo = plugin_yaml("http_headers", engines()[0], "", "").replace(
        &corpus_plugin("http_headers").display().to_string(),
        &fifo.display().to_string(),
    );
    let output = refused_start(&origin, from_fifo);
    assert!(
        output.contains(&format!(
            "config.vm_config.code: cannot read {}: not a regular file (a FIFO)",
            fifo.display()
        )),
        "the error does not name the field, the file and the problem:\n{output}"
    );
    // A network filter without a TCP listener would never run: refused, not left idle.
    let network = network_filter_yaml("tcp_filter", engines()[0], "");
    let output = refused_start(&origin, network);
    assert!(
        output.contains("bad.yaml")
            && output.contains("network filter \"tcp_filter\" needs a TCP listener"),
        "the error does not name the file and the filter:\n{output}"
    );
    // A listener's fields are checked as the plugins' are.
    let bad_listener = format!(
        "tcp: {{listen: 127.0.0.1:{}, upstream: nowhere}}\n{}",
        free_port(),
        network_filter_yaml("tcp_filter", engines()[0], "")
    );
    let output = refused_start(&origin, bad_listener);
    assert!(
        output.contains("bad.yaml: tcp.upstream: \"nowhere\" is neither a name in upstreams"),
        "the error does not name the file and the field:\n{output}"
    );
    // Two files cannot listen on one address.
    let port = free_port();
    let listener = |name| {
        let filter = network_filter_yaml("tcp_filter", engines()[0], "");
        tcp_listener_file(name, port, "127.0.0.1:9", &filter, "")
    };
    let output = refused_start_with(&origin, &[listener("first"), listener("second")]);
    assert!(
        output.contains(&format!(
            "second.yaml: tcp.listen: 127.0.0.1:{port} is already the listener of"
        )) && output.contains("first.yaml"),
        "the error does not name both files and the address:\n{output}"
    );
    // A listener whose port is taken stops Traffic Server, naming the file and the address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to take");
    let port = taken.local_addr().expect("its address").port();
    let filter = network_filter_yaml("tcp_filter", engines()[0], "");
    let output = refused_start_with(
        &origin,
        &[tcp_listener_file("taken", port, "127.0.0.1:9", &filter, "")],
    );
    assert!(
        output.contains(&format!(
            "taken.yaml: tcp.listen: cannot listen on 127.0.0.1:{port}"
        )),
        "the error does not name the file and the address:\n{output}"
    );
}

/// Envoy's network filter block for corpus plugin `plugin` on `runtime` with `configuration`.
fn network_filter_yaml(plugin: &str, runtime: &str, configuration: &str) -> String {
    network_filter_yaml_at(plugin, &corpus_plugin(plugin), runtime, configuration)
}

/// As [`network_filter_yaml`], for plugin `name` whose code is at `code`.
fn network_filter_yaml_at(name: &str, code: &Path, runtime: &str, configuration: &str) -> String {
    format!(
        "name: envoy.filters.network.wasm\ntyped_config:\n  \
         \"@type\": type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm\n  \
         config:\n    name: {name}\n    configuration: \"{configuration}\"\n    \
         vm_config:\n      vm_id: {name}\n      runtime: {runtime}\n      \
         code: {{local: {{filename: {}}}}}\n",
        code.display()
    )
}

/// Network filter blocks as the items of a listener's `filters:` list, in order.
fn filter_list(blocks: &[String]) -> String {
    blocks
        .iter()
        .map(|block| {
            let mut lines = block.lines();
            let first = lines.next().unwrap_or_default();
            let rest: String = lines.map(|line| format!("    {line}\n")).collect();
            format!("  - {first}\n{rest}")
        })
        .collect()
}

/// A plugin file with a TCP listener on `port` in front of `upstream` (a name in `upstreams`
/// or an address), running `filter` (a network filter block), with more top-level `extra`.
fn tcp_listener_file(
    name: &'static str,
    port: u16,
    upstream: &str,
    filter: &str,
    extra: &str,
) -> PluginFile {
    PluginFile {
        name,
        yaml: format!(
            "tcp:\n  listen: 127.0.0.1:{port}\n  upstream: \"{upstream}\"\n{extra}{filter}"
        ),
    }
}

/// Sends `data` on a new connection to `port` while reading what comes back (a client that
/// wrote everything before reading would stall any proxy that limits its buffers), ends its
/// side, and returns everything received until the proxy closes the connection.
fn tcp_stream_both_ways(port: u16, data: &[u8]) -> Vec<u8> {
    let mut connection = TcpStream::connect(("127.0.0.1", port)).expect("the proxy accepts");
    connection
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("a read timeout");
    let mut writer = connection.try_clone().expect("a second handle");
    let data = data.to_vec();
    let sender = std::thread::spawn(move || {
        writer.write_all(&data).expect("the proxy reads on");
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("a half-close");
    });
    let mut received = Vec::new();
    connection
        .read_to_end(&mut received)
        .expect("the proxy ends the connection");
    sender.join().expect("the sender");
    received
}

/// Waits (at most 20 s) until Traffic Server accepts connections on `port`.
fn wait_for_port(server: &TrafficServer, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_for_listener(port, deadline, || server.diagnostics());
}

#[test]
fn tcp_listeners_run_network_filters_both_ways_on_every_engine() {
    let origin = Origin::start();
    let echo = Echo::start();
    let listeners: Vec<(&str, u16)> = engines().into_iter().map(|e| (e, free_port())).collect();
    let names = ["tcp_a", "tcp_b", "tcp_c"];
    let files: Vec<PluginFile> = listeners
        .iter()
        .zip(names)
        .map(|((engine, port), name)| {
            let filter = network_filter_yaml("tcp_filter", engine, "");
            // Timeouts of centuries are as good as none (Traffic Server's clock would wrap
            // past them into the past, where every check finds them expired).
            let limit = "  buffer_limit_bytes: 65536\n  idle_timeout: 10000000000s\n  \
                         connect_timeout: 10000000000s\n";
            tcp_listener_file(name, *port, &echo.address.to_string(), &filter, limit)
        })
        .collect();
    let server = TrafficServer::start(&origin, &files);
    for (engine, port) in &listeners {
        wait_for_port(&server, *port);
        // The plugin upper-cases what the client sends and puts `[up] ` before the first
        // bytes coming back: the echo server sends back the upper-cased bytes.
        assert_eq!(tcp_exchange(*port, &["hello"]), "[up] HELLO", "on {engine}");
        // A connection quiet for a while is not closed (its idle timeout is centuries).
        let mut quiet = std::net::TcpStream::connect(("127.0.0.1", *port)).expect("connects");
        quiet.write_all(b"hel").expect("writes");
        std::thread::sleep(Duration::from_millis(2500));
        quiet.write_all(b"lo").expect("writes after a pause");
        quiet
            .shutdown(std::net::Shutdown::Write)
            .expect("half-closes");
        quiet
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("a read timeout");
        let mut received = String::new();
        let _ = quiet.read_to_string(&mut received);
        assert_eq!(
            received, "[up] HELLO",
            "on {engine}: a quiet connection was closed"
        );
        // Several chunks on one connection, half-closed by the client: nothing is lost, the
        // prefix comes once.
        assert_eq!(
            tcp_exchange(*port, &["ab", "cd", "ef"]),
            "[up] ABCDEF",
            "on {engine}"
        );
        // Connections at once, on both net threads.
        let clients: Vec<_> = (0..8)
            .map(|i| {
                let port = *port;
                std::thread::spawn(move || tcp_exchange(port, &[&format!("client {i}")]))
            })
            .collect();
        for (i, client) in clients.into_iter().enumerate() {
            let received = client.join().expect("a client");
            assert_eq!(received, format!("[up] CLIENT {i}"), "on {engine}");
        }
        // Sixteen times the listener's buffer limit, both ways at once: every byte arrives,
        // in order (the proxy stops reading a side while the other is slow to take it).
        let sent: Vec<u8> = (0..1 << 20).map(|i| b'a' + (i % 26) as u8).collect();
        let received = tcp_stream_both_ways(*port, &sent);
        assert_eq!(received.len(), sent.len() + 5, "on {engine}");
        assert!(received.starts_with(b"[up] "), "on {engine}");
        assert!(
            received[5..] == sent.to_ascii_uppercase()[..],
            "the data changed on the way on {engine}"
        );
    }
    // The plugin saw each connection start and both of its sides close, the client's first.
    server.wait_for_log("new connection");
    server.wait_for_log("downstream closed by Remote");
    server.wait_for_log("upstream closed by Remote");
    // And read, at each connection's end, what it received and sent: `hello` in, `[up] HELLO`
    // out.
    server.wait_for_log("connection ended: 5 bytes from the client, 10 to it");
    assert!(echo.connections.load(Ordering::Relaxed) >= 10 * listeners.len());
    // Every connection's contexts went with it.
    server.wait_for_metric(
        "plugin.pwhost_ats.live_stream_contexts",
        Instant::now() + Duration::from_secs(20),
        |line| line.ends_with(" 0"),
    );
    // A network filter's failure counters are stats, as an HTTP filter's are.
    server.wait_for_metric(
        "plugin.pwhost_ats.tcp_filter.failed_by_trap",
        Instant::now() + Duration::from_secs(10),
        |line| line == "plugin.pwhost_ats.tcp_filter.failed_by_trap 0",
    );
    // HTTP traffic goes on beside.
    assert_eq!(get(&server.url("/"), &[]).status, 200);
}

#[test]
fn network_filters_hold_for_callouts_fail_by_policy_reload_and_close_dead_or_idle_connections() {
    let origin = Origin::start();
    let echo = Echo::start();
    let engine = engines()[0];
    let nowhere = format!("127.0.0.1:{}", free_port());
    let (gated, dead, idle, denied) = (free_port(), free_port(), free_port(), free_port());
    let (trap_closed, trap_open, chain, held) =
        (free_port(), free_port(), free_port(), free_port());
    let (unanswered, one_way, slow_reader, reset_after) =
        (free_port(), free_port(), free_port(), free_port());
    let (stale, pass_then_close) = (free_port(), free_port());
    let (unanswering, sink) = (Unanswering::start(), Sink::start());
    let greeter = Greeter::start("greeting");
    let (flood, resetting_flood) = (Flood::start(FLOOD), Flood::then_reset(FLOOD));
    // Two network filters on one listener, as a `filters:` list: the second a plugin of its
    // own (its own VM).
    let second = network_filter_yaml("tcp_filter", engine, "")
        .replace("name: tcp_filter\n", "name: second\n")
        .replace("vm_id: tcp_filter\n", "vm_id: second\n");
    let chained = filter_list(&[network_filter_yaml("tcp_filter", engine, ""), second]);
    // A plugin that traps when a connection's context is made, failing closed (Envoy's
    // default) and open.
    let trapping = workspace().join("plugins/dist/wat/trap_in_context_create.wasm");
    let trapping_filter = |fail_open: bool| {
        format!(
            "name: envoy.filters.network.wasm\ntyped_config:\n  \
             \"@type\": type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm\n  \
             config:\n    name: trapping\n    fail_open: {fail_open}\n    vm_config:\n      \
             runtime: {engine}\n      code: {{local: {{filename: {}}}}}\n",
            trapping.display()
        )
    };
    // A filter continuing its connection from a tick while it holds nothing of it, as the
    // filter after it holds the new connection for 100–200 ms, then pausing all data.
    let stale_chain = filter_list(&[
        network_filter_yaml_at(
            "tcp_stale_continue",
            &workspace().join("plugins/dist/wat/tcp_stale_continue.wasm"),
            engine,
            "",
        ),
        network_filter_yaml_at(
            "tcp_hold",
            &workspace().join("plugins/dist/wat/tcp_hold.wasm"),
            engine,
            "",
        ),
    ]);
    // Twice the same filter: the first holds the client's bytes until the upstream's greeting,
    // which releases them to the second, which closes the connection.
    let pass_then_close_chain = filter_list(&["pass_a", "pass_b"].map(|name| {
        network_filter_yaml_at(
            name,
            &workspace().join("plugins/dist/wat/tcp_pass_then_close.wasm"),
            engine,
            "",
        )
    }));
    let files = [
        tcp_listener_file(
            "gated",
            gated,
            "echo",
            &network_filter_yaml("tcp_filter", engine, "gate gate"),
            &format!(
                "upstreams:\n  echo: \"{}\"\n  gate: \"{}\"\n",
                echo.address, origin.address
            ),
        ),
        tcp_listener_file(
            "dead",
            dead,
            &nowhere,
            &network_filter_yaml("tcp_filter", engine, ""),
            "",
        ),
        tcp_listener_file(
            "idle",
            idle,
            &echo.address.to_string(),
            &network_filter_yaml("tcp_filter", engine, ""),
            "  idle_timeout: 1s\n",
        ),
        tcp_listener_file(
            "denied",
            denied,
            &echo.address.to_string(),
            &network_filter_yaml("tcp_filter", engine, "gate gone"),
            &format!("upstreams:\n  gone: \"{nowhere}\"\n"),
        ),
        tcp_listener_file(
            "trap_closed",
            trap_closed,
            &echo.address.to_string(),
            &trapping_filter(false),
            "",
        ),
        tcp_listener_file(
            "trap_open",
            trap_open,
            &echo.address.to_string(),
            &trapping_filter(true),
            "",
        ),
        tcp_listener_file(
            "chain",
            chain,
            &echo.address.to_string(),
            &format!("filters:\n{chained}"),
            "",
        ),
        tcp_listener_file(
            "held",
            held,
            &echo.address.to_string(),
            &network_filter_yaml_at(
                "tcp_hold",
                &workspace().join("plugins/dist/wat/tcp_hold.wasm"),
                engine,
                "",
            ),
            "",
        ),
        tcp_listener_file(
            "stale",
            stale,
            &echo.address.to_string(),
            &format!("filters:\n{stale_chain}"),
            "  idle_timeout: 1s\n",
        ),
        tcp_listener_file(
            "unanswered",
            unanswered,
            &unanswering.address.to_string(),
            &network_filter_yaml("tcp_filter", engine, ""),
            "  connect_timeout: 1s\n",
        ),
        tcp_listener_file(
            "one_way",
            one_way,
            &sink.address.to_string(),
            &network_filter_yaml("tcp_filter", engine, ""),
            "  idle_timeout: 1s\n",
        ),
        tcp_listener_file(
            "slow_reader",
            slow_reader,
            &flood.address.to_string(),
            &network_filter_yaml("tcp_filter", engine, ""),
            "  idle_timeout: 1s\n  buffer_limit_bytes: 33554432\n",
        ),
        tcp_listener_file(
            "reset_after",
            reset_after,
            &resetting_flood.address.to_string(),
            // Named for its log lines.
            &network_filter_yaml("tcp_filter", engine, "")
                .replace("name: tcp_filter\n", "name: reset_after\n"),
            "  idle_timeout: 1s\n  buffer_limit_bytes: 33554432\n",
        ),
        tcp_listener_file(
            "pass_then_close",
            pass_then_close,
            &greeter.address.to_string(),
            &format!("filters:\n{pass_then_close_chain}"),
            "",
        ),
    ];
    let server = TrafficServer::start(&origin, &files);
    for port in [
        gated,
        dead,
        idle,
        denied,
        trap_closed,
        trap_open,
        chain,
        held,
        stale,
        unanswered,
        one_way,
        slow_reader,
        reset_after,
        pass_then_close,
    ] {
        wait_for_port(&server, port);
    }
    // The first bytes wait for the gate's answer (an HTTP call through Traffic Server); the
    // ones sent meanwhile wait with them.
    assert_eq!(
        tcp_exchange(gated, &["let ", "me ", "in"]),
        "[up] LET ME IN"
    );
    server.wait_for_log("gate answered 200");
    assert_eq!(origin.requests(), 1);
    // A gate that cannot be reached (Traffic Server's client answers 502): the plugin closes
    // the connection whose data it held, from the callout's answer, outside the connection's
    // own events; nothing it held went on.
    assert_eq!(tcp_exchange(denied, &["let me in"]), "");
    server.wait_for_log("gate answered 502");
    // A plugin that pauses its new-connection callback holds the connection (the upstream is
    // not dialled, the client's bytes wait) until it continues it from a tick.
    assert_eq!(tcp_exchange(held, &["wait ", "for ", "me"]), "wait for me");
    server.wait_for_log("tcp_hold: held");
    server.wait_for_log("tcp_hold: released");
    // A continue asked while the plugin held nothing of its connection is spent: the data
    // it pauses later stays held (the upstream gets none of it) until the idle timeout.
    assert_eq!(tcp_exchange(stale, &["held ", "for good"]), "");
    server.wait_for_log("tcp_stale_continue: continued while holding nothing");
    // What went through the whole chain is still sent when a plugin closes the connection
    // later in the same step: the upstream's greeting passes both filters to the client and
    // lets the client's bytes the first filter held go on to the second, which closes.
    if let Err(error) = the_chunk_before_a_close_still_goes_out(pass_then_close, &greeter, |line| {
        server.wait_for_log(line)
    }) {
        panic!("{error}\n{}", server.diagnostics());
    }
    // A chain: the client's data through both in order, the upstream's in reverse order,
    // each filter putting its prefix before the first bytes coming back.
    assert_eq!(tcp_exchange(chain, &["chain"]), "[up] [up] CHAIN");
    // A plugin that fails: the connection is closed (fail closed), or goes on without it
    // (fail open); Traffic Server goes on either way.
    assert_eq!(tcp_exchange(trap_closed, &["hello"]), "");
    assert_eq!(tcp_exchange(trap_open, &["hello"]), "hello");
    server.wait_for_log("unreachable");
    // An upstream nobody listens on: the client's connection is closed, the plugin hears that
    // its upstream was never reached.
    assert_eq!(tcp_exchange(dead, &["hello"]), "");
    server.wait_for_log("upstream closed by Unknown");
    server.wait_for_log("downstream closed by Local");
    // A connection without traffic is closed after the listener's idle timeout. (It sends
    // first: Traffic Server's default `proxy.config.net.defer_accept` accepts a connection
    // only once the client sends something.)
    let mut quiet = TcpStream::connect(("127.0.0.1", idle)).expect("the listener accepts");
    quiet
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("a read timeout");
    quiet.write_all(b"ping").expect("the listener reads");
    let started = Instant::now();
    let mut received = Vec::new();
    let _ = quiet.read_to_end(&mut received);
    let waited = started.elapsed();
    assert_eq!(String::from_utf8_lossy(&received), "[up] PING");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "closed after {waited:?}"
    );
    // Traffic one way only (to an upstream that never sends) keeps a connection open past the
    // idle timeout; once it stops, the connection is closed after the timeout. (Here each side
    // sees traffic of its own: the client's is read, the upstream's written.)
    assert_one_way_traffic_outlives_a_1s_idle_timeout(one_way);
    // Nor is a connection idle while the proxy writes to a slow client what a quiet upstream
    // sent it long before.
    if let Err(error) =
        a_slow_reader_gets_all_of_a_flood_past_a_1s_idle_timeout(slow_reader, FLOOD, "[up] ", false)
    {
        panic!("{error}\n{}", server.diagnostics());
    }
    // An upstream that resets its connection after sending, found when the client's next
    // bytes cannot be passed on: the client still gets all it sent (what the proxy read of it
    // before the reset), then the close, as Envoy's `tcp_proxy` flushes the other side.
    if let Err(error) =
        a_slow_reader_gets_all_of_a_flood_past_a_1s_idle_timeout(reset_after, FLOOD, "[up] ", true)
    {
        panic!("{error}\n{}", server.diagnostics());
    }
    // Its plugin hears of the close once that flush ended: the bytes it is told were sent
    // are all the client got, not what was written when the upstream's reset was found.
    // (Not the connection `wait_for_port` made, which sent nothing.)
    let line = server.wait_for_log_line("end of the slow reader's connection", |line| {
        line.contains("[reset_after] connection ended:") && !line.contains("ended: 0 bytes")
    });
    assert!(line.ends_with(&format!(", {} to it", FLOOD + 5)), "{line}");
    // An upstream that never answers the connect: the client's connection is closed after the
    // listener's connect timeout (1 s here; 5 s unless set).
    assert_closed_after_a_1s_connect_timeout(unanswered);
    // A reload puts a changed network filter in force for new connections: no gate now.
    let ungated = tcp_listener_file(
        "gated",
        gated,
        "echo",
        &network_filter_yaml("tcp_filter", engine, ""),
        &format!("upstreams:\n  echo: \"{}\"\n", echo.address),
    );
    std::fs::write(server.etc().join("gated.yaml"), &ungated.yaml).expect("a changed file");
    server.ctl(&["config", "reload"]);
    server.wait_for_log("reloaded the configuration");
    assert_eq!(tcp_exchange(gated, &["no gate"]), "[up] NO GATE");
    assert_eq!(origin.requests(), 1);
    // A reload that moves a listener is refused (Traffic Server cannot close a plugin's
    // port): the configuration in force stays.
    let moved = tcp_listener_file(
        "idle",
        free_port(),
        &echo.address.to_string(),
        &network_filter_yaml("tcp_filter", engine, ""),
        "",
    );
    std::fs::write(server.etc().join("idle.yaml"), &moved.yaml).expect("a changed file");
    server.ctl(&["config", "reload"]);
    server.wait_for_log("the TCP listeners changed");
    assert_eq!(tcp_exchange(gated, &["still"]), "[up] STILL");
    // Nothing of the refused file is in force: the listener it moves still serves where it
    // was.
    assert_eq!(tcp_exchange(idle, &["still here"]), "[up] STILL HERE");
    server.wait_for_metric(
        "plugin.pwhost_ats.live_stream_contexts",
        Instant::now() + Duration::from_secs(20),
        |line| line.ends_with(" 0"),
    );
}

/// A client that leaves a transaction a plugin holds in a hook, or a new TCP connection a
/// network filter holds, is not told to its plugins by Traffic Server (which reads neither the
/// transaction's connection nor, past the buffer limit, the held one, and reports a reset it
/// reads as the end of the data): one that resets its connection ends it and its plugin
/// contexts at once, long before the stream idle timeout (5 min) or the connection's idle
/// timeout (1 h), and the origin or upstream is never asked; one that only half-closes stays
/// held, as it may wait for the answer.
#[test]
fn a_client_resetting_a_held_transaction_or_tcp_connection_ends_it_and_a_half_close_does_not() {
    let origin = Origin::start();
    let echo = Echo::start();
    let port = free_port();
    let engine = engines()[0];
    let holds = workspace().join("plugins/dist/wat/holds_for_good.wasm");
    let filter = network_filter_yaml_at("holds_for_good", &holds, engine, "");
    // `panics` holds a request with `x-hold` for good in its request headers callback.
    let server = TrafficServer::start(
        &origin,
        &[
            tcp_listener_file("held", port, &echo.address.to_string(), &filter, ""),
            PluginFile {
                name: "panics",
                yaml: plugin_yaml("panics", engine, "", ""),
            },
        ],
    );
    wait_for_port(&server, port);
    let contexts = "plugin.pwhost_ats.live_stream_contexts";
    let count = |line: &str| -> Option<usize> { line.rsplit(' ').next()?.parse().ok() };
    let live = |wanted: usize| move |line: &str| count(line) == Some(wanted);
    let deadline = || Instant::now() + Duration::from_secs(10);
    // The readiness probes may have left a held connection (a probe only closes: a FIN): the
    // count is taken once two looks 1.5 s apart agree (the stat is published every second).
    let mut looks = Vec::new();
    let before = loop {
        let line = server.wait_for_metric(contexts, deadline(), |line| count(line).is_some());
        looks.push(count(&line));
        if let [.., earlier, last] = looks[..] {
            if earlier == last {
                break last.unwrap_or_default();
            }
        }
        assert!(
            looks.len() < 10,
            "the live contexts never settled: {looks:?}"
        );
        std::thread::sleep(Duration::from_millis(1500));
    };
    let origin_before = origin.requests();
    let connect = |port: u16| TcpStream::connect(("127.0.0.1", port)).expect("connects");
    let request = b"GET /held HTTP/1.1\r\nhost: a\r\nx-hold: 1\r\n\r\n";

    let mut tcp_half_closed = connect(port);
    tcp_half_closed
        .write_all(b"sent, then the end")
        .expect("sent");
    let mut http_half_closed = connect(server.port);
    http_half_closed.write_all(request).expect("sent");
    for client in [&tcp_half_closed, &http_half_closed] {
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("half-closed");
    }
    server.wait_for_metric(contexts, deadline(), live(before + 2));
    let mut tcp_resetting = connect(port);
    tcp_resetting
        .write_all(b"sent, then a reset")
        .expect("sent");
    let mut http_resetting = connect(server.port);
    http_resetting.write_all(request).expect("sent");
    server.wait_for_metric(contexts, deadline(), live(before + 4));
    faulty_peers::reset(tcp_resetting);
    faulty_peers::reset(http_resetting);
    server.wait_for_metric(contexts, deadline(), live(before + 2));
    server.wait_for_log(
        "[panics] the client reset its connection while the plugin held the transaction",
    );

    // The half-closed ones are still held, a while later: nothing answered or closed them.
    std::thread::sleep(Duration::from_millis(1500));
    for (what, client) in [
        ("the TCP connection", &mut tcp_half_closed),
        ("the HTTP request", &mut http_half_closed),
    ] {
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("a read timeout");
        let mut byte = [0u8; 1];
        match client.read(&mut byte) {
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => panic!(
                "{what} that half-closed was not held: {other:?}\n{}",
                server.diagnostics()
            ),
        }
    }
    assert_eq!(origin.requests(), origin_before, "the origin was asked");
    assert_eq!(
        echo.connections.load(Ordering::Relaxed),
        0,
        "the upstream was dialled for a held connection"
    );
}

/// A WebSocket goes through Traffic Server with plugins in front: they see (and may change)
/// the upgrade request and see the 101, each ending at its headers, and Traffic Server tunnels
/// the bytes after the switch past them (it carries no transform there: one on the 101 broke
/// the switch). The remap rule is Traffic Server's for WebSockets (`ws://`).
#[test]
fn a_websocket_goes_through_with_plugins_seeing_its_upgrade_and_its_101() {
    let origin = Origin::start();
    let upstream = UpgradeEcho::start();
    // `stream_recorder` logs each callback and whether it ends its side ("more" or "end"); it
    // exports the body callbacks, for which Traffic Server's plugin adds transforms.
    let recorder = workspace().join("plugins/dist/wat/stream_recorder.wasm");
    let recorder = plugin_yaml("http_headers", "wasmtime", "", "")
        .replace("name: http_headers", "name: recorder")
        .replace("vmId: http_headers", "vmId: recorder")
        .replace(
            &corpus_plugin("http_headers").display().to_string(),
            &recorder.display().to_string(),
        );
    let (root, port) = TrafficServer::prepare(
        &origin,
        &[
            PluginFile {
                name: "headers",
                yaml: plugin_yaml("http_headers", "wasmtime", "", ""),
            },
            PluginFile {
                name: "recorder",
                yaml: recorder,
            },
        ],
    );
    let remap = root.path().join("etc/remap.config");
    let rules = std::fs::read_to_string(&remap).expect("remap.config");
    let rules = format!("map ws://a/ ws://{}/\n{rules}", upstream.address);
    std::fs::write(&remap, rules).expect("remap.config");
    let server = TrafficServer::start_prepared(root, port);

    let (mut client, head) = websocket_upgrade(server.port, "/chat", "");
    assert!(
        head.starts_with("http/1.1 101") && head.contains("upgrade: websocket"),
        "not switched: {head:?}\n{}",
        server.diagnostics()
    );
    if let Err(error) = echoes(&mut client, &["ping", "and a longer message"]) {
        panic!("{error}\n{}", server.diagnostics());
    }
    let request = upstream.request.lock().unwrap().clone();
    assert!(
        request.contains("x-pwhost-plugin: http_headers"),
        "the plugin did not see the upgrade request: {request}"
    );
    drop(client);
    server.wait_for_log("[recorder] response headers, end");
    let log = server.diagnostics();
    assert!(
        log.contains("[recorder] request headers, end") && !log.contains("body,"),
        "the plugins saw more than the upgrade and the 101:\n{log}"
    );
}

/// Starts `traffic_server` with the plugin file `bad.yaml` holding `yaml`, which it must refuse
/// to start with; returns what it printed and logged.
fn refused_start(origin: &Origin, yaml: String) -> String {
    refused_start_with(origin, &[PluginFile { name: "bad", yaml }])
}

/// As [`refused_start`], with plugin files `files`.
fn refused_start_with(origin: &Origin, files: &[PluginFile]) -> String {
    let (root, _port) = TrafficServer::prepare(origin, files);
    let mut server = Command::new("timeout")
        .args(["-s", "KILL", SERVER_LIFETIME_SECONDS, "traffic_server"])
        .arg(format!("--run-root={}", root.path().display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("traffic_server starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.try_wait().expect("traffic_server's status") {
            break status;
        }
        if Instant::now() > deadline {
            // SAFETY: signals the process group made above.
            unsafe { libc::kill(-(server.id() as i32), libc::SIGKILL) };
            let _ = server.wait();
            panic!("traffic_server kept running on a bad configuration");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let mut output = String::new();
    for stream in [
        server
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read>),
        server
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut stream = stream;
        let _ = stream.read_to_string(&mut output);
    }
    let log = std::fs::read_to_string(root.path().join("log/diags.log")).unwrap_or_default();
    output.push_str(&log);
    output
}

#[test]
fn a_held_transaction_waits_for_an_http_call_and_timers_tick_on_every_engine() {
    for runtime in engines() {
        let origin = Origin::start();
        let auth = Origin::answering_with(&[("x-auth-user", "alice")]);
        let http_call = http_call_yaml(runtime, "", auth.address);
        let server = TrafficServer::start(
            &origin,
            &[
                PluginFile {
                    name: "http_call",
                    yaml: http_call,
                },
                PluginFile {
                    name: "timers",
                    yaml: plugin_yaml("timers", runtime, "", ""),
                },
            ],
        );
        let context = |what: &str| format!("{runtime}: {what}\n{}", server.diagnostics());

        // The plugin holds the request, asks the auth server through Traffic Server's own
        // client, and continues it with what the answer said.
        let reply = try_get(&server.url("/account"), &[])
            .unwrap_or_else(|e| panic!("{}", context(&e.to_string())));
        assert_eq!(reply.status, 200, "{}", context(&reply.body));
        assert!(
            reply.body.contains("x-auth-user: alice"),
            "{}",
            context(&reply.body)
        );
        assert_eq!(auth.requests(), 1, "{runtime}: one callout per request");

        // An upstream that never answers: the call times out after the plugin's 5 s, the
        // plugin gets the failure and answers 503 itself. The new upstream comes with a reload.
        let silent = TcpListener::bind("127.0.0.1:0").expect("a listener that never answers");
        let http_call = http_call_yaml(runtime, "", silent.local_addr().expect("its address"));
        server.reload_plugin_file("http_call", &http_call, 1);
        let before = origin.requests();
        let started = Instant::now();
        let reply = get(&server.url("/account"), &[]);
        assert_eq!(reply.status, 503, "{}", context(&reply.body));
        assert_eq!(reply.body, "auth callout failed\n", "{runtime}");
        // Traffic Server's event loop keeps a coarse clock: its timers may fire a few
        // milliseconds before the client's own clock says 5 s.
        assert!(
            started.elapsed() >= Duration::from_millis(4_900),
            "{}",
            context(&format!(
                "failed after {:?}, before the timeout",
                started.elapsed()
            ))
        );
        assert_eq!(
            origin.requests(),
            before,
            "{runtime}: a denied request went upstream"
        );
        if runtime == engines()[0] {
            // An upstream that answers with a body that never ends: the plugin gives up at
            // its 5 s, and Traffic Server stops reading a second later (its client would read
            // the body into memory for as long as it came: here 25 s, until the test's
            // records' 30 s active timeout).
            let endless = Misbehaving::start(Misbehaviour::Endless);
            server.reload_plugin_file(
                "http_call",
                &http_call_yaml(runtime, "", endless.address),
                2,
            );
            let reply = get(&server.url("/account"), &[]);
            assert_eq!(reply.status, 503, "{}", context(&reply.body));
            assert!(
                endless.ended_within(Duration::from_secs(5)),
                "{}",
                context("the endless answer was still being read 5 s after the timeout")
            );

            // An answer after an interim 103 is the answer the plugin gets.
            let interim = Misbehaving::start(Misbehaviour::Interim);
            server.reload_plugin_file(
                "http_call",
                &http_call_yaml(runtime, "", interim.address),
                3,
            );
            let reply = get(&server.url("/account"), &[]);
            assert_eq!(reply.status, 200, "{}", context(&reply.body));
            assert!(
                reply.body.contains("x-auth-user: alice"),
                "{}",
                context(&reply.body)
            );

            // A trap in the plugin's answer callback fails the request closed and is counted
            // by its cause.
            let panicking = Origin::answering_with(&[("x-panic", "1")]);
            server.reload_plugin_file(
                "http_call",
                &http_call_yaml(runtime, "", panicking.address),
                4,
            );
            let reply = get(&server.url("/account"), &[]);
            assert_eq!(reply.status, 503, "{}", context(&reply.body));
            server.wait_for_metric(
                "plugin.pwhost_ats.http_call.failed_by_trap",
                Instant::now() + Duration::from_secs(10),
                |line| line == "plugin.pwhost_ats.http_call.failed_by_trap 1",
            );
        }

        // Ticks: every 100 ms, stopped by the plugin after the third.
        std::thread::sleep(Duration::from_millis(800));
        let diagnostics = server.diagnostics();
        assert!(
            diagnostics.contains("[timers] tick 3"),
            "{}",
            context("no third tick")
        );
        assert!(
            !diagnostics.contains("tick 4"),
            "{}",
            context("a tick after the plugin stopped them")
        );
    }
}

/// A plugin opening calls without end (none answered: its upstream never accepts them) is
/// refused once its VM copy has 1024 open, as Envoy's circuit breaker refuses one, with a
/// warning; Traffic Server goes on answering.
#[test]
fn a_plugin_opening_calls_without_end_is_refused_past_1024_open() {
    let origin = Origin::start();
    // Never accepts: the calls stay open (they have no timeout).
    let silent = TcpListener::bind("127.0.0.1:0").expect("a listener that never accepts");
    let yaml = format!(
        "{}upstreams:\n  cluster: {}\n",
        plugin_yaml("../wat/call_flood", "wasmtime", "", ""),
        silent.local_addr().expect("its address")
    );
    let server = TrafficServer::start(
        &origin,
        &[PluginFile {
            name: "call_flood",
            yaml,
        }],
    );
    let reply = get(&server.url("/flood"), &[]);
    assert_eq!(reply.status, 200, "{}", server.diagnostics());
    assert_eq!(
        reply.body,
        "opened 1024, then status 10",
        "{}",
        server.diagnostics()
    );
    server.wait_for_log(
        "this VM has 1024 HTTP or gRPC calls open: more are refused (INTERNAL_FAILURE)",
    );
    // Another request is answered as well (by this copy, refused at once, or another's).
    let again = get(&server.url("/flood"), &[]);
    assert_eq!(again.status, 200, "{}", server.diagnostics());
    assert!(again.body.ends_with("then status 10"), "{}", again.body);
    assert_eq!(origin.requests(), 0);
}

/// Traffic Server's client reads a call's whole answer into memory and reports what came even
/// when its upstream stopped early: an answer over 16 MiB (announced by its length or not) and
/// one cut short fail the call, with a warning saying why, and the upstream is not read to the
/// end; an answer without a length under the limit still arrives whole. A call with request
/// trailers, which its HTTP/1.0 request cannot carry, is refused rather than sent without them.
#[test]
fn a_call_that_cannot_be_carried_whole_fails_with_a_warning() {
    let origin = Origin::start();
    let auth = Origin::answering_with(&[("x-auth-user", "alice")]);
    let server = TrafficServer::start(
        &origin,
        &[PluginFile {
            name: "http_call",
            yaml: http_call_yaml("wasmtime", "", auth.address),
        }],
    );
    let context = |what: &str| format!("{what}\n{}", server.diagnostics());
    let cases = [
        (
            Misbehaviour::Large {
                bytes: 32 << 20,
                announced: true,
            },
            "was refused (its body is over 16 MiB): the call fails",
        ),
        (
            Misbehaviour::Large {
                bytes: 32 << 20,
                announced: false,
            },
            "was refused (its body is over 16 MiB): the call fails",
        ),
        (
            Misbehaviour::CutMidBody,
            "announced 100000 bytes of body and 1000 came: the call fails",
        ),
        (
            Misbehaviour::CutMidChunks,
            "was refused (its upstream ended it before its end): the call fails",
        ),
    ];
    // A `HEAD` to the same large resource is answered: its length announces a body that
    // never comes.
    let large = Misbehaving::start(Misbehaviour::Large {
        bytes: 32 << 20,
        announced: true,
    });
    server.reload_plugin_file(
        "http_call",
        &http_call_yaml("wasmtime", "", large.address),
        1,
    );
    let reply = get(&server.url("/account"), &[("x-call-head", "1")]);
    assert_eq!(reply.status, 200, "{}", context(&reply.body));
    let mut reloads = 1;
    for (misbehaviour, warning) in cases {
        let upstream = Misbehaving::start(misbehaviour);
        reloads += 1;
        server.reload_plugin_file(
            "http_call",
            &http_call_yaml("wasmtime", "", upstream.address),
            reloads,
        );
        let warnings = server.diagnostics().matches(warning).count();
        let before = origin.requests();
        let reply = get(&server.url("/account"), &[]);
        assert_eq!(
            reply.status,
            503,
            "{misbehaviour:?}: {}",
            context(&reply.body)
        );
        assert_eq!(reply.body, "auth callout failed\n", "{misbehaviour:?}");
        server.wait_for_log_count(warning, warnings + 1);
        assert!(
            upstream.ended_within(Duration::from_secs(5)),
            "{}",
            context(&format!(
                "{misbehaviour:?}: the answer was still being read"
            ))
        );
        assert_eq!(
            origin.requests(),
            before,
            "{misbehaviour:?}: a denied request went on"
        );
    }

    // Under the limit, an answer without a length passes the count whole.
    let upstream = Misbehaving::start(Misbehaviour::Large {
        bytes: 4 << 20,
        announced: false,
    });
    server.reload_plugin_file(
        "http_call",
        &http_call_yaml("wasmtime", "", upstream.address),
        reloads + 1,
    );
    let reply = get(&server.url("/account"), &[]);
    assert_eq!(reply.status, 200, "{}", context(&reply.body));
    server.wait_for_log(&format!("body {} bytes", 4 << 20));

    let reply = get(&server.url("/account"), &[("x-call-trailer", "t")]);
    assert_eq!(reply.status, 503, "{}", context(&reply.body));
    assert_eq!(reply.body, "auth callout failed\n");
    server.wait_for_log("an HTTP call with request trailers is refused (BAD_ARGUMENT)");
}

/// A plugin answering a transaction that an earlier plugin held and then continued: its own
/// status and body reach the client (not Traffic Server's error page).
#[test]
fn a_reply_after_a_resumed_hold_goes_out_with_its_own_status_and_body() {
    let origin = Origin::start();
    let auth = Origin::answering_with(&[("x-auth-user", "alice")]);
    let http_call = http_call_yaml("wasmtime", "", auth.address);
    let server = TrafficServer::start(
        &origin,
        &[
            PluginFile {
                name: "http_call",
                yaml: http_call,
            },
            PluginFile {
                name: "local_response",
                yaml: plugin_yaml("local_response", "wasmtime", "secret", ""),
            },
        ],
    );
    // `http_call` holds the request for its callout and continues it; `local_response` then
    // answers it, the key missing.
    let reply = get(&server.url("/account"), &[]);
    let context = format!(
        "{} {:?}\n{}",
        reply.status,
        reply.body,
        server.diagnostics()
    );
    assert_eq!(reply.status, 403, "{context}");
    assert_eq!(reply.body, "access denied\n", "{context}");
    assert_eq!(auth.requests(), 1, "{context}");
    assert_eq!(origin.requests(), 0, "{context}");
}

/// `lines` numbered lines, each ending in a newline: a body whose every byte is checkable.
fn numbered_body(lines: usize) -> String {
    (0..lines).map(|line| format!("line {line:06}\n")).collect()
}

/// A plugin with `allow_on_headers_stop_iteration` that holds the request headers gets the
/// body's callbacks meanwhile (a host turning that stop into a stop of everything never calls
/// them: proxy-wasm-cpp-host#143), and the origin hears of the request only once the plugin
/// lets the headers go: a whole body checked with a callout, with a header added from the
/// callout's answer; headers let go from the first chunk's callback, by returning `Continue`
/// or by `proxy_continue_stream`, the rest of a body past the buffer limit streaming on;
/// headers let go by a callout's answer while the body comes; a failed check answered by the
/// plugin, the origin never reached.
#[test]
fn a_plugin_allowed_to_hold_the_request_headers_gets_the_body_meanwhile() {
    let origin = Origin::start();
    let auth = Origin::answering_with(&[("x-auth-user", "alice")]);
    let http_call =
        |auth: SocketAddr| http_call_yaml("wasmtime", "allowOnHeadersStopIteration: true", auth);
    // `http_headers` after it logs the request headers it gets: only once the holder let them
    // go.
    let server = TrafficServer::start(
        &origin,
        &[
            PluginFile {
                name: "http_call",
                yaml: http_call(auth.address),
            },
            PluginFile {
                name: "http_headers",
                yaml: plugin_yaml("http_headers", "wasmtime", "", ""),
            },
        ],
    );
    let context = |what: &str| format!("{what}\n{}", server.diagnostics());
    let upload = |mode: &str, body: &str, chunked: bool| {
        post_with(
            &server.url("/upload"),
            &[("x-check-body", mode)],
            body.as_bytes(),
            chunked,
        )
        .unwrap_or_else(|e| panic!("{}", context(&format!("{mode}, chunked {chunked}: {e}"))))
    };
    // An upload in `mode` that reaches the origin whole, with the request header line
    // `header` (or one beginning so) added by the plugin: the origin's echo.
    let passes = |mode: &str, body: &str, chunked: bool, header: &str| {
        let reply = upload(mode, body, chunked);
        let what = format!("{mode}, {} bytes, chunked {chunked}", body.len());
        assert_eq!(reply.status, 200, "{}", context(&what));
        assert!(
            reply.body.contains(&format!("\n{header}")),
            "{}",
            context(&format!("{what}: no {header:?} from the plugin"))
        );
        assert!(
            reply
                .body
                .contains(&format!("\n\n{body}\nhello from origin")),
            "{}",
            context(&format!("{what}: the origin did not get the body whole"))
        );
        reply
    };

    // The whole body checked before the headers go on: with a length and chunked, short and
    // longer than one read (300 KB, under the 1 MiB buffer limit). The plugin after the holder
    // gets the headers only after the check (with its header), and the check the whole body.
    for chunked in [false, true] {
        for lines in [2, 25_000] {
            let body = numbered_body(lines);
            let checks = auth.requests();
            passes("before-headers", &body, chunked, "x-body-checked: alice\n");
            assert_eq!(auth.requests(), checks + 1, "{}", context("one check"));
            let log = server.diagnostics();
            assert!(
                log.contains("[http_headers] request header: x-body-checked: alice"),
                "{}",
                context("the plugin after the holder got no headers")
            );
            assert!(
                log.lines()
                    .any(|line| line.contains("dispatched body check")
                        && line.ends_with(&format!(" {} bytes", body.len()))),
                "{}",
                context(&format!("no check of {} bytes", body.len()))
            );
        }
    }

    // The headers go on, the body is checked at its end (the plugin stops there until the
    // check's answer): the request reaches the origin only after the check.
    for chunked in [false, true] {
        for lines in [2, 25_000] {
            let body = numbered_body(lines);
            let checks = auth.requests();
            let reply = upload("after-headers", &body, chunked);
            let what = format!("after-headers, {lines} lines, chunked {chunked}");
            assert_eq!(reply.status, 200, "{}", context(&what));
            assert!(
                reply
                    .body
                    .contains(&format!("\n\n{body}\nhello from origin")),
                "{}",
                context(&format!("{what}: the origin did not get the body whole"))
            );
            assert_eq!(auth.requests(), checks + 1, "{}", context(&what));
        }
    }

    // The headers held for a callout made on them, the body buffered meanwhile: the answer
    // lets them go, before, during or after the body (a short body and a longer one).
    for chunked in [false, true] {
        for lines in [2, 25_000] {
            let body = numbered_body(lines);
            passes("headers-held", &body, chunked, "x-auth-user: alice\n");
        }
    }

    // The headers let go from the first chunk's callback, which adds a header to them (with
    // the chunk's size). A body with a length of 2 MB goes on past the 1 MiB buffer limit once
    // they are let go; a chunked one (its length known only at its end: see the README) stays
    // under it.
    for mode in ["first-chunk", "first-chunk-resume"] {
        for (chunked, lines) in [(false, 175_000), (true, 25_000)] {
            let body = numbered_body(lines);
            let reply = passes(mode, &body, chunked, "x-first-chunk: ");
            assert!(
                !server.diagnostics().contains("buffer limit"),
                "{}",
                context(&format!("{mode}: the body was kept to the buffer limit"))
            );
            let first_chunk = reply
                .body
                .lines()
                .find_map(|line| line.strip_prefix("x-first-chunk: "))
                .and_then(|size| size.parse::<usize>().ok());
            assert!(
                first_chunk.is_some_and(|size| size > 0 && size <= body.len()),
                "{}",
                context(&format!("{mode}: the first chunk's size: {first_chunk:?}"))
            );
        }
    }

    // A body past the 1 MiB buffer limit while its headers are held: Envoy's 413, which
    // Traffic Server cannot send from there either (the connection closes); the origin never
    // sees the request.
    let requests = origin.requests();
    if let Ok(reply) = post_with(
        &server.url("/upload"),
        &[("x-check-body", "before-headers")],
        numbered_body(175_000).as_bytes(),
        false,
    ) {
        assert!(reply.status >= 400, "{}", context(&format!("{reply:?}")));
    }
    server.wait_for_log("[http_call] answered the request while it held only its headers (413)");
    assert_eq!(
        origin.requests(),
        requests,
        "{}",
        context("a request over the buffer limit while held reached the origin")
    );

    // A client going away while the plugin holds the headers for the rest of the body: the
    // transaction ends, and its plugin contexts with it.
    let mut client = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    client
        .write_all(
            b"POST /upload HTTP/1.1\r\nhost: a\r\nx-check-body: before-headers\r\n\
              content-length: 100000\r\n\r\nthe first bytes of a body that never ends",
        )
        .expect("a request begun");
    server.wait_for_metric(
        "plugin.pwhost_ats.live_stream_contexts",
        Instant::now() + Duration::from_secs(20),
        |line| !line.ends_with(" 0"),
    );
    drop(client);
    server.wait_for_metric(
        "plugin.pwhost_ats.live_stream_contexts",
        Instant::now() + Duration::from_secs(20),
        |line| line.ends_with(" 0"),
    );
    assert_eq!(
        upload("before-headers", "after the client that left\n", false).status,
        200,
        "{}",
        context("the next request")
    );

    // The check fails (its upstream is unreachable, so Traffic Server's client answers 502):
    // the plugin answers 401. Traffic Server ends a transaction whose request transform fails
    // without an answer, so the client's connection closes; the origin never hears of the
    // request.
    let unreachable: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("an address");
    std::fs::write(server.etc().join("http_call.yaml"), http_call(unreachable)).expect("YAML");
    server.ctl(&["config", "reload"]);
    server.wait_for_log("reloaded the configuration");
    let requests = origin.requests();
    let started = Instant::now();
    for mode in ["before-headers", "after-headers"] {
        for chunked in [false, true] {
            let answer = post_with(
                &server.url("/upload"),
                &[("x-check-body", mode)],
                b"a body that does not pass\n",
                chunked,
            );
            if let Ok(reply) = &answer {
                assert!(
                    reply.status >= 400 && !reply.body.contains("hello from origin"),
                    "{}",
                    context(&format!(
                        "a failed {mode} check, chunked {chunked}: {reply:?}"
                    ))
                );
            }
        }
    }
    // Answered at once, not at a timeout; each one logged.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{}",
        context(&format!("the failed checks took {:?}", started.elapsed()))
    );
    for held in ["only its headers", "its body"] {
        let line = format!("answered the request while it held {held} (401)");
        server.wait_for_log(&line);
        assert_eq!(
            server.diagnostics().matches(&line).count(),
            2,
            "{}",
            context(&format!("one line per failed check: {line}"))
        );
    }
    assert_eq!(
        origin.requests(),
        requests,
        "{}",
        context("a request whose check failed reached the origin")
    );

    // A reply from the body callback itself (no upstream to check with: the call cannot be
    // made, the plugin answers 503 there), none of the request gone out: it ends there too.
    std::fs::write(
        server.etc().join("http_call.yaml"),
        plugin_yaml(
            "http_call",
            "wasmtime",
            "",
            "allowOnHeadersStopIteration: true",
        ),
    )
    .expect("YAML");
    server.ctl(&["config", "reload"]);
    server.wait_for_log("reloaded the configuration (deployment 2)");
    if let Ok(reply) = post_with(
        &server.url("/upload"),
        &[("x-check-body", "after-headers")],
        b"a body that cannot be checked\n",
        false,
    ) {
        assert!(reply.status >= 400, "{}", context(&format!("{reply:?}")));
    }
    server.wait_for_log("[http_call] answered the request during its body (503)");
    assert_eq!(
        origin.requests(),
        requests,
        "{}",
        context("a request answered from its body callback reached the origin")
    );
}

/// Asserts that `origin` had no request since it had `before` (`context` says why it matters,
/// with the server's log).
fn assert_no_request_since(origin: &Origin, before: usize, context: impl Fn(&str) -> String) {
    assert_eq!(
        origin.requests(),
        before,
        "{}",
        context("a request a plugin refused reached the origin")
    );
}

/// Waits up to 10 s for `origin` to have had `count` requests.
fn wait_for_requests(origin: &Origin, count: usize, context: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin.requests() < count {
        assert!(
            Instant::now() < deadline,
            "{} requests, not {count}: {}",
            origin.requests(),
            context()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A request is held by one plugin at a time: a plugin that stops at a request body's end,
/// while a plugin after it holds the headers, lets the body go on to that plugin, which lets
/// the request go when its callout answers (two holds at once could lose the body's end or
/// never end). And only a continue a plugin asks for in the callback that stops at the body's
/// end lets that body go: one it asked for earlier, with nothing held, is spent.
#[test]
fn a_request_is_held_by_one_plugin_at_a_time_and_only_a_fresh_continue_lets_it_go() {
    let origin = Origin::start();
    let auth = Origin::answering_with(&[("x-auth-user", "alice")]);
    // Two copies of `http_call`, each told its mode by its own request header.
    let copy = |name: &str, extra: &str, auth: SocketAddr| {
        http_call_yaml("wasmtime", extra, auth)
            .replacen("name: http_call", &format!("name: {name}"), 1)
            .replacen("vmId: http_call", &format!("vmId: {name}"), 1)
    };
    let server = TrafficServer::start(
        &origin,
        &[
            PluginFile {
                name: "body_check",
                yaml: copy("body_check", "", auth.address),
            },
            PluginFile {
                name: "holder",
                yaml: copy("holder", "allowOnHeadersStopIteration: true", auth.address),
            },
        ],
    );
    let context = |what: &str| format!("{what}\n{}", server.diagnostics());
    for chunked in [false, true] {
        for lines in [2, 25_000] {
            let body = numbered_body(lines);
            let what = format!("{lines} lines, chunked {chunked}");
            let calls = auth.requests();
            let reply = post_with(
                &server.url("/upload"),
                &[
                    ("x-check-body-body_check", "after-headers"),
                    ("x-check-body-holder", "headers-held"),
                ],
                body.as_bytes(),
                chunked,
            )
            .unwrap_or_else(|e| panic!("{}", context(&format!("{what}: {e}"))));
            assert_eq!(reply.status, 200, "{}", context(&what));
            assert!(
                reply.body.contains("\nx-auth-user: alice\n"),
                "{}",
                context(&format!(
                    "{what}: the holder's callout did not let the request go"
                ))
            );
            assert!(
                reply
                    .body
                    .contains(&format!("\n\n{body}\nhello from origin")),
                "{}",
                context(&format!("{what}: the origin did not get the body whole"))
            );
            // The holder's `GET /auth`, and the first plugin's check of the whole body.
            wait_for_requests(&auth, calls + 2, || context(&what));
            assert!(
                server
                    .diagnostics()
                    .lines()
                    .any(|line| line.contains("[body_check]")
                        && line.contains("dispatched body check")
                        && line.ends_with(&format!(" {} bytes", body.len()))),
                "{}",
                context(&format!("{what}: the first plugin checked no whole body"))
            );
        }
    }
    drop(server);

    // The first plugin answers 403 from its body callback while the second holds the headers
    // for a callout that does not answer: none of the request went out, so the answer refuses
    // it at once (the connection closes; see the README), whoever holds it.
    let silent = TcpListener::bind("127.0.0.1:0").expect("a listener that never answers");
    let server = TrafficServer::start(
        &origin,
        &[
            PluginFile {
                name: "body_check",
                yaml: copy("body_check", "", silent.local_addr().expect("its address")),
            },
            PluginFile {
                name: "holder",
                yaml: copy(
                    "holder",
                    "allowOnHeadersStopIteration: true",
                    silent.local_addr().expect("its address"),
                ),
            },
        ],
    );
    let context = |what: &str| format!("{what}\n{}", server.diagnostics());
    let requests = origin.requests();
    let answer = post_with(
        &server.url("/upload"),
        &[
            ("x-check-body-body_check", "refuse-body"),
            ("x-check-body-holder", "headers-held"),
        ],
        b"a body the first plugin refuses\n",
        false,
    );
    if let Ok(reply) = &answer {
        assert!(
            reply.status >= 400 && !reply.body.contains("POST /upload"),
            "{}",
            context(&format!("{reply:?}"))
        );
    }
    server.wait_for_log("[body_check] answered the request during its body (403)");
    assert_no_request_since(&origin, requests, context);
    drop(server);

    // The first plugin answers from its callout's answer (its `GET /auth` is refused: 401)
    // while the second holds the headers until the body's end, which never comes: the answer
    // refuses the request at once, as Envoy would answer it, not once the holder lets go.
    let refusing = Origin::serving(&[], Some("/auth"));
    let server = TrafficServer::start(
        &origin,
        &[
            PluginFile {
                name: "gate",
                yaml: copy("gate", "", refusing.address),
            },
            PluginFile {
                name: "holder",
                yaml: copy(
                    "holder",
                    "allowOnHeadersStopIteration: true",
                    refusing.address,
                ),
            },
        ],
    );
    let context = |what: &str| format!("{what}\n{}", server.diagnostics());
    let requests = origin.requests();
    let mut client = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    client
        .write_all(
            b"POST /upload HTTP/1.1\r\nhost: a\r\nx-check-body-gate: notify-then-body\r\n\
              x-check-body-holder: before-headers\r\ncontent-length: 100\r\n\r\nthe first part",
        )
        .expect("a request begun");
    server.wait_for_log("[gate] answered the request during its body (401)");
    assert_no_request_since(&origin, requests, context);
    drop(client);
    // The same for a request without a body, which the second plugin holds in its hook: there
    // the answer goes out.
    let reply = get(
        &server.url("/no-body"),
        &[
            ("x-check-body-gate", "notify-then-body"),
            ("x-check-body-holder", "before-headers"),
        ],
    );
    assert_eq!(reply.status, 401, "{}", context(&format!("{reply:?}")));
    // The 401's body is the callout's answer: the auth server's echo of what it got, without
    // the marker that tells the plugin's own calls apart (a secret of the process).
    assert!(
        reply.body.contains("GET /auth") && !reply.body.contains("x-pwhost-ats-callout"),
        "{}",
        context(&reply.body)
    );
    assert_no_request_since(&origin, requests, context);
    drop(server);

    // A callout the headers do not wait for, whose answer continues the stream while nothing
    // is held; then a check of the whole body that fails: the request never reaches the
    // origin. The body's end is sent only after that answer came.
    let strict = Origin::serving(&[("x-auth-user", "alice")], Some("/check"));
    let server = TrafficServer::start(
        &origin,
        &[PluginFile {
            name: "http_call",
            yaml: copy("http_call", "", strict.address),
        }],
    );
    let context = |what: &str| format!("{what}\n{}", server.diagnostics());
    let requests = origin.requests();
    let mut client = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("a read timeout");
    client
        .write_all(
            b"POST /upload HTTP/1.1\r\nhost: a\r\nx-check-body: notify-then-body\r\n\
              content-length: 26\r\n\r\na body that ",
        )
        .expect("a request begun");
    wait_for_requests(&strict, 1, || context("no GET /auth"));
    server.wait_for_log("[http_call] http call response");
    client
        .write_all(b"does not pass\n")
        .expect("the body's end");
    // Refused: Traffic Server closes the connection (see the README); nothing from the origin
    // (whose echo would begin with the request line).
    let mut answer = Vec::new();
    let _ = client.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.contains("POST /upload"),
        "{}",
        context(&format!("the origin answered: {answer}"))
    );
    server.wait_for_log("[http_call] answered the request while it held its body (401)");
    wait_for_requests(&strict, 2, || context("no body check"));
    assert_no_request_since(&origin, requests, context);
}

/// A plugin after one holding the request headers gets them when the holder lets them go;
/// if it then drops the body's length (as a plugin that will change the body does), the body
/// waits until its new length is known, as when it drops it in the hook, and the origin gets
/// the changed body framed by that length.
#[test]
fn a_plugin_after_a_header_holder_that_drops_the_length_has_the_body_framed_anew() {
    let origin = Origin::start();
    let server = TrafficServer::start(
        &origin,
        &[
            PluginFile {
                name: "http_call",
                yaml: plugin_yaml(
                    "http_call",
                    "wasmtime",
                    "",
                    "allowOnHeadersStopIteration: true",
                ),
            },
            PluginFile {
                name: "body_rewrite",
                yaml: plugin_yaml("body_rewrite", "wasmtime", "", ""),
            },
        ],
    );
    let context = |what: &str| format!("{what}\n{}", server.diagnostics());
    // `body_rewrite` upper-cases the body: "ﬀ" (3 bytes) becomes "FF" (2), "ŉ" (2 bytes)
    // becomes "ʼN" (3). The holder lets the headers go from the first chunk's callback.
    for (sent, expected) in [
        ("hello ﬀ ﬀ".to_string(), "HELLO FF FF".to_string()),
        ("hello ŉ ŉ".to_string(), "HELLO ʼN ʼN".to_string()),
        ("hello ŉ ".repeat(20_000), "HELLO ʼN ".repeat(20_000)),
    ] {
        for chunked in [false, true] {
            let what = format!("{} bytes, chunked {chunked}", sent.len());
            let reply = post_with(
                &server.url("/echo"),
                &[("x-check-body", "first-chunk")],
                sent.as_bytes(),
                chunked,
            )
            .unwrap_or_else(|e| panic!("{}", context(&format!("{what}: {e}"))));
            assert_eq!(reply.status, 200, "{}", context(&what));
            assert!(
                reply.body.contains("\nx-first-chunk: "),
                "{}",
                context(&format!("{what}: the holder did not let the headers go"))
            );
            assert!(
                reply
                    .body
                    .contains(&format!("content-length: {}\n", expected.len()))
                    && reply
                        .body
                        .contains(&format!("\n{expected}\nhowdy from origin")),
                "{}",
                context(&format!(
                    "{what}: not the changed body, framed anew: {reply:?}"
                ))
            );
        }
    }
}

/// A transaction a plugin holds, when another transaction's callback traps the same VM copy:
/// the held one gets the plugin's failure policy (fail closed: 503) at once, instead of waiting
/// for a continue that cannot come.
#[test]
fn a_held_transaction_fails_closed_when_another_transaction_fails_its_copy() {
    let origin = Origin::start();
    // One net thread: both transactions on the same VM copy of `panics`, which holds a
    // transaction with `x-hold` for ever and traps on `x-panic`.
    let server = TrafficServer::start_edited(
        &origin,
        &[PluginFile {
            name: "panics",
            yaml: plugin_yaml("panics", "wasmtime", "", ""),
        }],
        "records.config",
        |text| {
            text.replace(
                "proxy.config.exec_thread.limit INT 2",
                "proxy.config.exec_thread.limit INT 1",
            )
        },
    );
    let url = server.url("/held");
    let held = {
        let url = url.clone();
        std::thread::spawn(move || try_get(&url, &[("x-hold", "1")]).map(|reply| reply.status))
    };
    // The held transaction reached the plugin (else the trap would come first, and it would
    // be refused at admission instead of woken).
    server.wait_for_metric(
        "plugin.pwhost_ats.live_stream_contexts",
        Instant::now() + Duration::from_secs(20),
        |line| !line.ends_with(" 0"),
    );
    let trapped = get(&url, &[("x-panic", "now")]);
    let context = |what: &str| format!("{what}\n{}", server.diagnostics());
    assert_eq!(
        trapped.status,
        503,
        "{}",
        context("the trapping transaction")
    );
    let status = held
        .join()
        .expect("the held client")
        .unwrap_or_else(|e| panic!("{}", context(&e.to_string())));
    assert_eq!(status, 503, "{}", context("the held transaction"));
    assert_eq!(
        origin.requests(),
        0,
        "{}",
        context("a request went upstream")
    );
}

/// A plugin's reply with a status out of range and a content type smuggling a header line in:
/// the client gets a 500 (as from Envoy) and no header line of the plugin's making.
#[test]
fn a_reply_with_no_http_status_or_a_content_type_with_a_line_break_is_not_passed_on() {
    let origin = Origin::start();
    let server = TrafficServer::start(
        &origin,
        &[PluginFile {
            name: "bad_reply",
            yaml: plugin_yaml("../wat/bad_reply", "wasmtime", "", ""),
        }],
    );
    let reply = get(&server.url("/"), &[]);
    let context = format!(
        "{} {:?} {:?}\n{}",
        reply.status,
        reply.headers,
        reply.body,
        server.diagnostics()
    );
    assert_eq!(reply.status, 500, "{context}");
    assert_eq!(reply.body, "bad reply\n", "{context}");
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain"),
        "{context}"
    );
    assert_eq!(reply.header("set-cookie"), None, "{context}");
    assert_eq!(origin.requests(), 0, "{context}");
}

#[test]
fn request_and_response_bodies_pass_through_the_plugins_on_every_engine() {
    for runtime in engines() {
        let origin = Origin::start();
        let server = TrafficServer::start(
            &origin,
            &[PluginFile {
                name: "body_rewrite",
                yaml: plugin_yaml("body_rewrite", runtime, "", ""),
            }],
        );
        let context = |what: &str| format!("{runtime}: {what}\n{}", server.diagnostics());
        // The plugin buffers the request body to its end and upper-cases it on its way to the
        // origin, and replaces `hello` by `howdy` in the whole response body.
        let reply = post(&server.url("/echo"), "hello world")
            .unwrap_or_else(|e| panic!("{}", context(&e.to_string())));
        assert_eq!(reply.status, 200, "{}", context(&reply.body));
        assert!(
            reply.body.contains("\nHELLO WORLD\n"),
            "{}",
            context(&reply.body)
        );
        assert!(
            reply.body.ends_with("howdy from origin\n"),
            "{}",
            context(&reply.body)
        );
        // A body larger than one buffer block arrives whole.
        let large = "hello ".repeat(20_000);
        let reply = post(&server.url("/echo"), &large)
            .unwrap_or_else(|e| panic!("{}", context(&e.to_string())));
        assert_eq!(reply.status, 200, "{}", context("large body"));
        assert!(
            reply.body.contains(&"HELLO ".repeat(20_000)),
            "{runtime}: the large body was not upper-cased whole"
        );
        assert!(reply.body.ends_with("howdy from origin\n"), "{runtime}");
    }
}

/// A plugin that changes the length of a request body: Traffic Server sends a transformed
/// request body framed by the length the transform has when its first bytes come, so the body
/// is withheld until its length is known (the plugin dropped `Content-Length`, Envoy's sign of
/// a body that changes; or the client's body is chunked, decoded for the plugin) and the origin
/// gets the new body with its new length. A plugin that changes the length of a body already
/// on its way without having dropped it cannot be followed: the client's body goes on
/// unchanged, rather than a body the origin would wait on or read past, and the next request
/// on the pooled origin connection is answered.
#[test]
fn a_request_body_a_plugin_changes_in_length_reaches_the_origin_framed_by_its_new_length() {
    let origin = Origin::start();
    let server = TrafficServer::start(
        &origin,
        &[PluginFile {
            name: "body_rewrite",
            yaml: plugin_yaml("body_rewrite", "wasmtime", "", ""),
        }],
    );
    let context = |what: &str| format!("{what}\n{}", server.diagnostics());
    // `body_rewrite` upper-cases the body: "ﬀ" (3 bytes) becomes "FF" (2), "ŉ" (2 bytes)
    // becomes "ʼN" (3).
    let shorter = ("hello ﬀ ﬀ".to_string(), "HELLO FF FF".to_string());
    let longer = ("hello ŉ ŉ".to_string(), "HELLO ʼN ʼN".to_string());
    // Sent chunked, in many chunks.
    let large = ("hello ŉ ".repeat(20_000), "HELLO ʼN ".repeat(20_000));
    for (sent, expected) in [shorter.clone(), longer, large] {
        for chunked in [false, true] {
            let what = format!("{} bytes, chunked: {chunked}", sent.len());
            let reply = post_with(&server.url("/echo"), &[], sent.as_bytes(), chunked)
                .unwrap_or_else(|e| panic!("{}", context(&format!("{what}: {e}"))));
            assert_eq!(
                reply.status,
                200,
                "{}",
                context(&format!("{what}: {reply:?}"))
            );
            assert!(
                reply
                    .body
                    .contains(&format!("content-length: {}\n", expected.len())),
                "{}",
                context(&format!(
                    "{what}: the origin did not get the new length: {reply:?}"
                ))
            );
            assert!(
                reply
                    .body
                    .contains(&format!("\n{expected}\nhowdy from origin")),
                "{}",
                context(&format!("{what}: {reply:?}"))
            );
        }
    }
    // Changed without dropping Content-Length, but buffered to its end: nothing went to the
    // origin before the new length was known, in one read or many.
    let many = ("hello ﬀ ".repeat(20_000), "HELLO FF ".repeat(20_000));
    for (sent, expected) in [shorter, many] {
        let reply = post_with(
            &server.url("/echo"),
            &[("x-keep-content-length", "1")],
            sent.as_bytes(),
            false,
        )
        .unwrap_or_else(|e| panic!("{}", context(&e.to_string())));
        assert!(
            reply
                .body
                .contains(&format!("content-length: {}\n", expected.len()))
                && reply
                    .body
                    .contains(&format!("\n{expected}\nhowdy from origin")),
            "{}",
            context(&format!(
                "{} bytes kept their length: {reply:?}",
                sent.len()
            ))
        );
    }

    // A chunked body its client leaves unfinished is not sent to the origin as if whole.
    let before = origin.requests();
    let mut unfinished =
        TcpStream::connect(("127.0.0.1", server.port)).expect("Traffic Server accepts");
    std::io::Write::write_all(
        &mut unfinished,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .expect("part of a request");
    std::thread::sleep(Duration::from_millis(300));
    drop(unfinished);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        origin.requests(),
        before,
        "{}",
        context("the unfinished chunked body reached the origin")
    );
    drop(server);

    // `envoy_rules`' `set-buffer` probe edits every chunk as it streams, each one byte longer,
    // without dropping Content-Length: once the first chunk went out with the client's length,
    // the client's bytes go on instead of the plugin's.
    let server = TrafficServer::start(
        &origin,
        &[PluginFile {
            name: "envoy_rules",
            yaml: plugin_yaml("envoy_rules", "wasmtime", "", ""),
        }],
    );
    let context = |what: &str| format!("{what}\n{}", server.diagnostics());
    let probe = [("x-probe", "set-buffer")];
    // One chunk: the plugin's edits, with their length ("abcdefgh" -> "[bcdefgh>": the edit in
    // the middle is refused, as Envoy refuses it).
    let reply = post_with(&server.url("/echo"), &probe, b"abcdefgh", false)
        .unwrap_or_else(|e| panic!("{}", context(&e.to_string())));
    assert!(
        reply.body.contains("content-length: 9\n")
            && reply.body.contains("\n[bcdefgh>\nhello from origin"),
        "{}",
        context(&format!("{reply:?}"))
    );
    // Many chunks: the client's body, whole and unchanged, with its length.
    let sent = "0123456789".repeat(30_000);
    let reply = post_with(&server.url("/echo"), &probe, sent.as_bytes(), false)
        .unwrap_or_else(|e| panic!("{}", context(&e.to_string())));
    assert_eq!(reply.status, 200, "{}", context("the streamed body"));
    assert!(
        reply
            .body
            .contains(&format!("content-length: {}\n", sent.len()))
            && reply.body.contains(&format!("\n{sent}\nhello from origin")),
        "{}",
        context("the client's body did not reach the origin whole and unchanged")
    );
    server.wait_for_log("a plugin changed the length of a request body whose length was");
    // The pooled origin connection read exactly that body: the next request is answered.
    let reply = post_with(&server.url("/echo"), &[], b"next", false)
        .unwrap_or_else(|e| panic!("{}", context(&e.to_string())));
    assert!(
        reply.body.contains("\nnext\nhello from origin"),
        "{}",
        context(&format!("{reply:?}"))
    );
}

/// A plugin failing closed in its request body callback: its request body is withheld from the
/// origin (the plugin may change it) and never goes on, so Traffic Server refuses the request
/// before the origin sees any of it, instead of sending it headers and a body cut short.
#[test]
fn a_plugin_failing_closed_in_a_request_body_keeps_the_request_from_the_origin() {
    let origin = Origin::start();
    let trap = workspace().join("plugins/dist/wat/trap_in_request_body.wasm");
    let yaml = plugin_yaml("http_headers", "wasmtime", "", "failurePolicy: FAIL_CLOSED")
        .replace("name: http_headers", "name: trap")
        .replace("vmId: http_headers", "vmId: trap")
        .replace(
            &corpus_plugin("http_headers").display().to_string(),
            &trap.display().to_string(),
        );
    // One net thread: every transaction meets the one VM copy, which the first body fails.
    let server = TrafficServer::start_edited(
        &origin,
        &[PluginFile { name: "trap", yaml }],
        "records.config",
        |text| {
            text.replace(
                "proxy.config.exec_thread.limit INT 2",
                "proxy.config.exec_thread.limit INT 1",
            )
        },
    );
    let context = |what: &str| format!("{what}\n{}", server.diagnostics());
    for chunked in [false, true] {
        let before = origin.requests();
        match post_with(
            &server.url("/echo"),
            &[],
            b"a body the plugin traps on",
            chunked,
        ) {
            Ok(reply) => assert!(reply.status >= 500, "{}", context(&format!("{reply:?}"))),
            Err(error) => eprintln!("the refused request: {error}"),
        }
        assert_eq!(
            origin.requests(),
            before,
            "{}",
            context(&format!("chunked: {chunked}: the origin saw the request"))
        );
    }
    // The failed VM fails closed for the next request too, and Traffic Server serves it.
    let reply = get(&server.url("/after"), &[]);
    assert_eq!(reply.status, 503, "{}", context(&format!("{reply:?}")));
}

/// An origin that answers every request with `size` bytes, counting what it managed to write
/// (a client of the proxy that does not read holds the writes up only if the proxy does not
/// read ahead for it without end).
struct LargeOrigin {
    origin: Origin,
    written: Arc<AtomicUsize>,
}

impl LargeOrigin {
    fn start(size: usize) -> LargeOrigin {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("the origin binds");
        listener.set_nonblocking(true).expect("nonblocking accept");
        let address = listener.local_addr().expect("an address");
        let written = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (Arc::clone(&written), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            while !stopped.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                let Ok((mut connection, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = connection.set_nonblocking(false);
                let _ = connection.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = connection.set_write_timeout(Some(Duration::from_secs(20)));
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                while !request.ends_with(b"\r\n\r\n") {
                    match connection.read(&mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n");
                if connection.write_all(head.as_bytes()).is_err() {
                    continue;
                }
                let block = vec![b'x'; 64 * 1024];
                let mut left = size;
                while left > 0 && !stopped.load(Ordering::Relaxed) {
                    let n = left.min(block.len());
                    if connection.write_all(&block[..n]).is_err() {
                        break;
                    }
                    count.fetch_add(n, Ordering::Relaxed);
                    left -= n;
                }
            }
        });
        LargeOrigin {
            origin: Origin {
                address,
                requests: Arc::new(AtomicUsize::new(0)),
                stop,
                thread: Some(thread),
            },
            written,
        }
    }
}

/// A client that stops reading a large response that passes a plugin's response body callback:
/// with Traffic Server's flow control on, the response transform leaves it in force, so the
/// origin is held up after a few MiB (measured: 9.7 MiB through the transform, 8.9 MiB with no
/// transform), instead of the whole response being kept in memory for the client; once the
/// client reads again, all of it arrives. (With flow control off, Traffic Server's default,
/// Traffic Server itself reads the whole response ahead, with or without a plugin.)
#[test]
fn a_client_that_stops_reading_holds_the_origin_up_through_a_body_plugin() {
    use std::io::{Read, Write};
    const SIZE: usize = 64 << 20;
    let large = LargeOrigin::start(SIZE);
    let server = TrafficServer::start_edited(
        &large.origin,
        &[PluginFile {
            name: "envoy_rules",
            yaml: plugin_yaml("envoy_rules", "wasmtime", "", ""),
        }],
        "records.config",
        |text| {
            format!(
                "{text}\nCONFIG proxy.config.http.flow_control.enabled INT 1\n\
                 CONFIG proxy.config.http.flow_control.high_water INT 1048576\n\
                 CONFIG proxy.config.http.flow_control.low_water INT 524288\n"
            )
        },
    );
    let mut client =
        TcpStream::connect(("127.0.0.1", server.port)).expect("Traffic Server accepts");
    client
        .write_all(b"GET /large HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("the request");
    std::thread::sleep(Duration::from_secs(3));
    let written = large.written.load(Ordering::Relaxed);
    eprintln!("the origin wrote {written} bytes while the client read nothing");
    assert!(
        written < SIZE / 2,
        "the origin wrote {written} of {SIZE} bytes while the client read nothing\n{}",
        server.diagnostics()
    );
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("a read timeout");
    let mut received = 0usize;
    let mut buffer = vec![0u8; 256 * 1024];
    let mut head = Vec::new();
    loop {
        match client.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if head.len() < 4096 {
                    head.extend_from_slice(&buffer[..n.min(4096)]);
                }
                received += n;
            }
        }
        if received > SIZE {
            break;
        }
    }
    let text = String::from_utf8_lossy(&head);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert!(received >= SIZE, "{received} bytes of {SIZE}");
}

/// A plugin buffering a body larger than `--buffer-limit-bytes`: past the limit the body goes on
/// unchanged (its headers are gone, so no 413 can be sent, and a body cut short would leave the
/// origin waiting), so the memory a client's upload takes stays bounded and nothing it sent is
/// lost; a chunked upload that long, whose length the origin would need before its end, is
/// refused; the next transaction is buffered and rewritten whole again.
#[test]
fn a_body_a_plugin_buffers_past_the_buffer_limit_goes_on_unchanged() {
    let origin = Origin::start();
    let library = plugin_library().display().to_string();
    let server = TrafficServer::start_edited(
        &origin,
        &[PluginFile {
            name: "body_rewrite",
            yaml: plugin_yaml("body_rewrite", "wasmtime", "", ""),
        }],
        "plugin.config",
        |line| {
            line.replacen(
                &library,
                &format!("{library} --buffer-limit-bytes=65536"),
                1,
            )
        },
    );
    let context = |what: &str| format!("{what}\n{}", server.diagnostics());
    // 240,000 bytes, which `body_rewrite` would buffer to its end to upper-case them.
    let large = "hello ".repeat(40_000);
    let reply = post(&server.url("/echo"), &large)
        .unwrap_or_else(|e| panic!("{}", context(&e.to_string())));
    assert_eq!(reply.status, 200, "{}", context("the large body"));
    assert!(
        reply.body.contains(&large),
        "{}",
        context("the large body did not reach the origin whole and unchanged")
    );
    server.wait_for_log("kept more than 65536 bytes of the request body buffered");
    // Chunked, the body has no length to send the origin until its end, which is too far:
    // Traffic Server refuses the request (an error, or a reset while the client still sends),
    // the origin sees nothing of it, and Traffic Server goes on serving.
    let before = origin.requests();
    match post_with(&server.url("/echo"), &[], large.as_bytes(), true) {
        Ok(reply) => assert!(reply.status >= 400, "{}", context(&format!("{reply:?}"))),
        Err(error) => eprintln!("the refused upload: {error}"),
    }
    server.wait_for_log("a chunked request body passed the buffer limit");
    assert_eq!(
        origin.requests(),
        before,
        "{}",
        context("the refused upload")
    );
    // The next transaction's body is buffered and rewritten whole.
    let reply = post(&server.url("/echo"), "hello world")
        .unwrap_or_else(|e| panic!("{}", context(&e.to_string())));
    assert_eq!(reply.status, 200, "{}", context(&reply.body));
    assert!(
        reply.body.contains("\nHELLO WORLD\n"),
        "{}",
        context(&reply.body)
    );
}

#[test]
fn plugin_metrics_are_traffic_server_stats_and_attributes_come_from_the_transaction() {
    let runtime = engines()[0];
    let origin = Origin::start();
    let probes = "request source/address string\\nrequest destination/port int\\n\
                  request request/path string\\nresponse response/code int\\n\
                  response response/code_details string\\nlog request/protocol string\\n\
                  log response/code_details string";
    let server = TrafficServer::start(
        &origin,
        &[
            PluginFile {
                name: "metrics",
                yaml: plugin_yaml("metrics", runtime, "", ""),
            },
            PluginFile {
                name: "envoy_attributes",
                yaml: plugin_yaml("envoy_attributes", runtime, probes, ""),
            },
        ],
    );
    for _ in 0..2 {
        assert_eq!(get(&server.url("/attributes?x=1"), &[]).status, 200);
    }
    // The plugin's counter, a Traffic Server stat.
    server.wait_for_metric(
        "plugin.pwhost_ats.requests_total",
        Instant::now() + Duration::from_secs(10),
        |line| line == "plugin.pwhost_ats.requests_total 2",
    );
    let failures = server.ctl(&["metric", "get", "plugin.pwhost_ats.metrics.failed_by_trap"]);
    assert_eq!(
        failures.trim(),
        "plugin.pwhost_ats.metrics.failed_by_trap 0"
    );
    let diagnostics = server.diagnostics();
    let port = server.port;
    for line in [
        "request source/address: 127.0.0.1:".to_string(),
        format!("request destination/port: {port}"),
        "request request/path: /attributes?x=1".to_string(),
        "response response/code: 200".to_string(),
        // Envoy's details for the origin's response.
        "response response/code_details: via_upstream".to_string(),
        "log request/protocol: HTTP/1.1".to_string(),
        "log response/code_details: via_upstream".to_string(),
    ] {
        assert!(diagnostics.contains(&line), "no {line:?} in\n{diagnostics}");
    }
}

#[test]
fn a_plugin_stuck_in_a_loop_is_stopped_by_its_deadline_and_traffic_server_goes_on() {
    let runtime = engines()[0];
    let origin = Origin::start();
    let looping = workspace().join("plugins/dist/wat/infinite_loop.wasm");
    assert!(
        looping.exists(),
        "run scripts/setup.sh (it builds the plugin corpus)"
    );
    let yaml = format!(
        "config:\n  name: looping\n  vmConfig:\n    vmId: looping\n    runtime: {runtime}\n    \
         code:\n      local:\n        filename: {}\n  failurePolicy: FAIL_RELOAD\n  \
         reloadConfig:\n    backoff:\n      baseInterval: 0.1s\n      maxInterval: 0.2s\n",
        looping.display()
    );
    let (root, port) = TrafficServer::prepare(
        &origin,
        &[PluginFile {
            name: "looping",
            yaml,
        }],
    );
    // A 200 ms deadline instead of the default second keeps the test short.
    let plugin_config = root.path().join("etc/plugin.config");
    let line = std::fs::read_to_string(&plugin_config).expect("plugin.config");
    let line = line.replacen(".so ", ".so --deadline-ms=200 ", 1);
    std::fs::write(&plugin_config, line).expect("plugin.config");
    let server = TrafficServer::start_prepared(root, port);
    for _ in 0..3 {
        let started = Instant::now();
        let reply = get(&server.url("/"), &[]);
        let took = started.elapsed();
        assert_eq!(reply.status, 503, "{}", server.diagnostics());
        assert!(
            took < Duration::from_secs(5),
            "the stuck request took {took:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Traffic Server itself still answers (the request hook never held a thread for good),
    // and the failures are counted as deadline failures.
    assert!(
        server.diagnostics().contains("deadline"),
        "{}",
        server.diagnostics()
    );
    server.wait_for_metric(
        "plugin.pwhost_ats.looping.failed_by_deadline",
        Instant::now() + Duration::from_secs(20),
        |line| line.ends_with(" 3"),
    );
    assert_eq!(origin.requests(), 0, "a request went past the stuck plugin");
}

/// Traffic Server with the `timers` plugin as a service, and an HTTP filter if `with_filter`.
fn start_with_timers_service(
    origin: &Origin,
    runtime: &str,
    singleton: bool,
    with_filter: bool,
) -> TrafficServer {
    let mut files = vec![PluginFile {
        name: "timers_service",
        yaml: format!(
            "{}singleton: {singleton}\n",
            plugin_yaml("timers", runtime, "", "")
        ),
    }];
    if with_filter {
        files.insert(
            0,
            PluginFile {
                name: "http_headers",
                yaml: plugin_yaml("http_headers", runtime, "", ""),
            },
        );
    }
    TrafficServer::start(origin, &files)
}

#[test]
fn a_singleton_service_alone_ticks_on_a_thread_of_its_own_without_traffic() {
    let runtime = engines()[0];
    let origin = Origin::start();
    // A configuration of services only, as an Envoy bootstrap with no HTTP filter.
    let server = start_with_timers_service(&origin, runtime, true, false);
    // No request is sent: the service started with Traffic Server and ticks on its own, three
    // times 100 ms apart, then stops its timer.
    server.wait_for_log("tick 3");
    std::thread::sleep(Duration::from_millis(500));
    let diagnostics = server.diagnostics();
    assert!(!diagnostics.contains("tick 4"), "{diagnostics}");
    assert_eq!(get(&server.url("/"), &[]).status, 200);
}

#[test]
fn a_service_without_singleton_runs_on_every_net_thread_from_the_start_and_after_a_reload() {
    let runtime = engines()[0];
    let origin = Origin::start();
    // Envoy's default for a WasmService: one VM copy per worker, here per net thread (two).
    let server = start_with_timers_service(&origin, runtime, false, true);
    // No request is sent: each thread's copy started with Traffic Server and ticks three
    // times on its own thread, then stops its timer.
    let threads_that_ticked = || {
        let log =
            std::fs::read_to_string(server.root.path().join("log/diags.log")).unwrap_or_default();
        let mut threads: Vec<String> = log
            .lines()
            .filter(|line| line.contains("tick 3"))
            .filter_map(|line| Some(line.split("] [").nth(1)?.split(']').next()?.to_string()))
            .collect();
        threads.sort();
        threads
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while threads_that_ticked().len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let diagnostics = server.diagnostics();
    assert_eq!(
        threads_that_ticked(),
        ["ET_NET 0", "ET_NET 1"],
        "one copy ticking on each net thread:\n{diagnostics}"
    );
    assert!(!diagnostics.contains("tick 4"), "{diagnostics}");
    // The thread's copies serve transactions as before.
    assert_eq!(get(&server.url("/"), &[]).status, 200);

    // A reload with the service in a new VM starts it again on every thread, traffic or not.
    std::fs::write(
        server.etc().join("timers_service.yaml"),
        format!(
            "{}singleton: false\n",
            plugin_yaml("timers", runtime, "", "").replace("vmId: timers", "vmId: timers_2")
        ),
    )
    .expect("the changed configuration");
    server.ctl(&["config", "reload"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while threads_that_ticked().len() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        threads_that_ticked(),
        ["ET_NET 0", "ET_NET 0", "ET_NET 1", "ET_NET 1"],
        "the reloaded service's copy ticking on each net thread:\n{}",
        server.diagnostics()
    );
}

#[test]
fn an_item_enqueued_by_a_transaction_reaches_the_registering_copy_on_its_net_thread() {
    let runtime = engines()[0];
    let origin = Origin::start();
    // Each net thread's copy of the filter registers queue `events` as it starts (the last to
    // register owns the notifications, as in Envoy); every request enqueues its path, and the
    // owner's root context dequeues and logs each item when its thread is told.
    let server = TrafficServer::start(
        &origin,
        &[PluginFile {
            name: "shared_queue",
            yaml: plugin_yaml("shared_queue", runtime, "", ""),
        }],
    );
    let paths: Vec<String> = (1..=6).map(|n| format!("/queued-{n}")).collect();
    for path in &paths {
        let reply = get(&server.url(path), &[]);
        assert_eq!(reply.status, 200);
    }
    for path in &paths {
        server.wait_for_log(&format!("dequeued: {path}"));
    }
    // Time for a duplicate to show, were any delivered twice.
    std::thread::sleep(Duration::from_millis(300));
    let log = std::fs::read_to_string(server.root.path().join("log/diags.log")).unwrap_or_default();
    for line in log.lines().filter(|line| line.contains("dequeued: ")) {
        assert!(
            line.contains("[ET_NET "),
            "delivered on a net thread, the owner's: {line}"
        );
    }
    assert_eq!(
        log.matches("dequeued: ").count(),
        paths.len(),
        "each item delivered once:\n{log}"
    );
}

#[test]
fn a_plugin_that_refills_its_own_queue_does_not_freeze_its_net_thread() {
    let runtime = engines()[0];
    let origin = Origin::start();
    // `queue_echo` enqueues an item when configured and enqueues it again from every
    // `proxy_on_queue_ready`: its thread is woken again at once, every time. Transactions must
    // still be served between the deliveries.
    let echo = workspace().join("plugins/dist/wat/queue_echo.wasm");
    let echo_yaml = plugin_yaml("http_headers", runtime, "", "")
        .replace("name: http_headers", "name: echo")
        .replace("vmId: http_headers", "vmId: echo")
        .replace(
            &corpus_plugin("http_headers").display().to_string(),
            &echo.display().to_string(),
        );
    let server = TrafficServer::start(
        &origin,
        &[
            PluginFile {
                name: "echo",
                yaml: echo_yaml,
            },
            PluginFile {
                name: "http_headers",
                yaml: plugin_yaml("http_headers", runtime, "", ""),
            },
        ],
    );
    for _ in 0..8 {
        let reply = try_get(&server.url("/while-echoing"), &[])
            .unwrap_or_else(|e| panic!("{e}: the thread froze"));
        assert_eq!(reply.status, 200);
    }
    server.wait_for_log("[echo] ready");
}

#[test]
fn root_contexts_and_singleton_services_call_upstreams_when_they_start_on_every_engine() {
    for runtime in engines() {
        let origin = Origin::start();
        let config_server = Origin::start();
        let upstreams = format!("upstreams:\n  config_cluster: {}\n", config_server.address);
        let with_vm_id = |yaml: String, vm_id: &str| {
            yaml.replace("vmId: root_http_call", &format!("vmId: {vm_id}"))
        };
        // A singleton service fetching at start-up, and a filter in the same VM id reading what
        // it fetched (shared data); a filter whose every VM copy fetches on its own thread when
        // the copy starts.
        let service = format!(
            "{}singleton: true\n{upstreams}",
            with_vm_id(
                plugin_yaml("root_http_call", runtime, "config_cluster", ""),
                "service_vm"
            )
        );
        let reader = with_vm_id(
            plugin_yaml("root_http_call", runtime, "- x-from-service", ""),
            "service_vm",
        )
        .replace("name: root_http_call", "name: reader");
        let filter = format!(
            "{}{upstreams}",
            with_vm_id(
                plugin_yaml("root_http_call", runtime, "config_cluster x-from-copy", ""),
                "filter_vm"
            )
            .replace("name: root_http_call", "name: fetching_filter")
        );
        let server = TrafficServer::start(
            &origin,
            &[
                PluginFile {
                    name: "service",
                    yaml: service,
                },
                PluginFile {
                    name: "reader",
                    yaml: reader,
                },
                PluginFile {
                    name: "filter",
                    yaml: filter,
                },
            ],
        );
        let context = |what: &str| format!("{runtime}: {what}\n{}", server.diagnostics());
        // The copies start with the first transaction on their thread, so their answer may
        // come after that transaction's response: ask until both answers show.
        let deadline = Instant::now() + Duration::from_secs(20);
        let reply = loop {
            let reply = try_get(&server.url("/"), &[])
                .unwrap_or_else(|e| panic!("{}", context(&e.to_string())));
            assert_eq!(reply.status, 200, "{}", context(&reply.body));
            let fetched = |header| reply.header(header) == Some("200 GET /config");
            if (fetched("x-from-service") && fetched("x-from-copy")) || Instant::now() > deadline {
                break reply;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(
            reply.header("x-from-service"),
            Some("200 GET /config"),
            "{}",
            context("the service's answer")
        );
        assert_eq!(
            reply.header("x-from-copy"),
            Some("200 GET /config"),
            "{}",
            context("a VM copy's answer")
        );
        let diagnostics = server.diagnostics();
        assert!(
            diagnostics.contains("[root_http_call] root http call response"),
            "{}",
            context("the service logs its answer under its name")
        );
        // One call from the service, one from each thread's copy (Traffic Server has two).
        let calls = config_server.requests();
        assert!(
            (2..=3).contains(&calls),
            "{}",
            context(&format!("{calls} calls"))
        );

        // A reload restarts the service on a new thread, which calls again (the old thread
        // ended and left Traffic Server cleanly: the server's drop checks it did not crash).
        server.ctl(&["config", "reload"]);
        server.wait_for_log("reloaded the configuration");
        let deadline = Instant::now() + Duration::from_secs(20);
        while server
            .diagnostics()
            .matches("[root_http_call] root http call response")
            .count()
            < 2
        {
            assert!(Instant::now() < deadline, "{}", context("no second answer"));
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(config_server.requests() > calls);
    }
}

/// An HTTP callout target answering 200 with `x-auth-user: load`, but each `stall_every`-th
/// call only after `stall`.
fn flaky_checker(stall_every: usize, stall: Duration) -> Origin {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("the checker binds");
    let address = server.server_addr().to_ip().expect("an IP address");
    let requests = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (count, stopped) = (Arc::clone(&requests), Arc::clone(&stop));
    let thread = std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(50)) else {
                continue;
            };
            let call = count.fetch_add(1, Ordering::Relaxed) + 1;
            let answer = move |request: tiny_http::Request| {
                let response = tiny_http::Response::from_string("ok").with_header(
                    tiny_http::Header::from_bytes("x-auth-user", "load").expect("header"),
                );
                let _ = request.respond(response);
            };
            if call % stall_every == 0 {
                std::thread::spawn(move || {
                    std::thread::sleep(stall);
                    answer(request);
                });
            } else {
                answer(request);
            }
        }
    });
    Origin {
        address,
        requests,
        stop,
        thread: Some(thread),
    }
}

/// One kind of request of the fault-injection load.
#[derive(Clone, Copy, Debug, PartialEq)]
enum FaultyRequest {
    /// To the origin.
    Healthy,
    /// To an upstream nobody listens on.
    Refused,
    /// To an upstream that resets before answering.
    UpstreamReset,
    /// To an upstream that never answers (Traffic Server's inactivity timeout here: 1 s).
    UpstreamStall,
    /// To an upstream that resets mid-body.
    UpstreamCutMidBody,
    /// A client that gives up while its upstream stalls.
    ClientAbort,
    /// A chunked body, through the plugin that traps in its body callback.
    TrapMidBody,
}

impl FaultyRequest {
    const ALL: [FaultyRequest; 7] = [
        FaultyRequest::Healthy,
        FaultyRequest::Refused,
        FaultyRequest::UpstreamReset,
        FaultyRequest::UpstreamStall,
        FaultyRequest::UpstreamCutMidBody,
        FaultyRequest::ClientAbort,
        FaultyRequest::TrapMidBody,
    ];

    /// Sends it; `Ok(status)` for a whole response, `Err` for none (a reset, a cut response, a
    /// client that gave up).
    fn send(self, port: u16) -> Result<u16, String> {
        let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
        let status = |reply: Result<Reply, ureq::Error>| match reply {
            Ok(reply) => Ok(reply.status),
            Err(error) => Err(error.to_string()),
        };
        match self {
            FaultyRequest::Healthy => status(try_get(&url("/healthy"), &[])),
            FaultyRequest::Refused => status(try_get(&url("/refused"), &[])),
            FaultyRequest::UpstreamReset => status(try_get(&url("/reset"), &[])),
            FaultyRequest::UpstreamStall => status(try_get(&url("/stall"), &[])),
            FaultyRequest::UpstreamCutMidBody => status(try_get(&url("/cut"), &[])),
            FaultyRequest::ClientAbort => {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_millis(50)))
                    .build()
                    .into();
                match agent.get(&url("/stall")).call() {
                    Ok(response) => Ok(response.status().as_u16()),
                    Err(error) => Err(error.to_string()),
                }
            }
            FaultyRequest::TrapMidBody => chunked_post(
                port,
                &format!("127.0.0.1:{port}"),
                "/trapped",
                &["first part", "second part"],
            )
            .map(|response| response.status),
        }
    }

    /// Whether `outcome` is one this request may end in. Every request also goes through the
    /// callout plugin, whose call may fail (its 503) or be answered by Traffic Server's own 504
    /// when the checker stalls past the inactivity timeout (the plugin's 401 for a non-200
    /// answer), and through the trapping plugin, whose copy may be failed and waiting for its
    /// reload (FAIL_RELOAD: 503).
    fn may_end_in(self, outcome: &Result<u16, String>) -> bool {
        if matches!(outcome, Ok(401 | 503)) {
            return true;
        }
        matches!(
            (self, outcome),
            (FaultyRequest::Healthy, Ok(200))
                | (
                    FaultyRequest::Refused | FaultyRequest::UpstreamReset,
                    Ok(502)
                )
                | (FaultyRequest::UpstreamStall, Ok(504))
                | (
                    FaultyRequest::UpstreamCutMidBody
                        | FaultyRequest::ClientAbort
                        | FaultyRequest::TrapMidBody,
                    Err(_)
                )
        )
    }
}

/// A bounded load of requests meeting every fault at once (upstreams refusing, resetting,
/// stalling and cutting responses, callouts timing out, a plugin trapping mid-body, clients
/// giving up), `PWHOST_FAULT_REQUESTS` of them (default 140): each ends as it may, no plugin
/// stream context is left live, and Traffic Server serves on.
#[test]
fn under_a_load_of_faults_every_transaction_ends_and_no_plugin_context_is_left_live() {
    let requests = std::env::var("PWHOST_FAULT_REQUESTS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(140);
    let runtime = engines()[0];
    let origin = Origin::start();
    let (resetting, stalling, cutting) = (
        Misbehaving::start(Misbehaviour::Reset),
        Misbehaving::start(Misbehaviour::Stall),
        Misbehaving::start(Misbehaviour::CutMidBody),
    );
    // Its stalls outlast Traffic Server's inactivity timeout (1 s here), which ends the call.
    let checker = flaky_checker(25, Duration::from_secs(2));
    let trap = workspace().join("plugins/dist/wat/trap_in_request_body.wasm");
    let trap_yaml = plugin_yaml(
        "http_headers",
        runtime,
        "",
        "failurePolicy: FAIL_RELOAD\nreloadConfig: {backoff: {baseInterval: 0.05s, maxInterval: 0.2s}}",
    )
    .replace("name: http_headers", "name: trap")
    .replace("vmId: http_headers", "vmId: trap")
    .replace(
        &corpus_plugin("http_headers").display().to_string(),
        &trap.display().to_string(),
    );
    let (root, port) = TrafficServer::prepare(
        &origin,
        &[
            PluginFile {
                name: "http_headers",
                yaml: plugin_yaml("http_headers", runtime, "", ""),
            },
            PluginFile {
                name: "http_call",
                yaml: http_call_yaml(runtime, "", checker.address),
            },
            PluginFile {
                name: "trap",
                yaml: trap_yaml,
            },
        ],
    );
    let etc = root.path().join("etc");
    let host = format!("http://127.0.0.1:{port}");
    std::fs::write(
        etc.join("remap.config"),
        format!(
            "map {host}/refused http://127.0.0.1:{}/refused\n\
             map {host}/reset http://{}/reset\n\
             map {host}/stall http://{}/stall\n\
             map {host}/cut http://{}/cut\n\
             map / http://{}/\n",
            free_port(),
            resetting.address,
            stalling.address,
            cutting.address,
            origin.address
        ),
    )
    .expect("remap.config");
    let mut records = std::fs::read_to_string(etc.join("records.config")).expect("records");
    records.push_str(
        "CONFIG proxy.config.http.transaction_no_activity_timeout_out INT 1\n\
         CONFIG proxy.config.http.connect_attempts_max_retries INT 0\n",
    );
    std::fs::write(etc.join("records.config"), records).expect("records.config");
    let server = TrafficServer::start_prepared(root, port);

    let clients = 8;
    let started = Instant::now();
    let outcomes: Vec<(FaultyRequest, Result<u16, String>)> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|client| {
                scope.spawn(move || {
                    (client..requests)
                        .step_by(clients)
                        .map(|index| {
                            let kind = FaultyRequest::ALL[index % FaultyRequest::ALL.len()];
                            (kind, kind.send(port))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|thread| thread.join().expect("a client"))
            .collect()
    });
    assert_eq!(outcomes.len(), requests);
    let mut summary = format!(
        "{requests} requests in {:.1} s\n",
        started.elapsed().as_secs_f64()
    );
    for kind in FaultyRequest::ALL {
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for (_, outcome) in outcomes.iter().filter(|(sent, _)| *sent == kind) {
            let class = match outcome {
                Ok(status) => status.to_string(),
                Err(_) => "no whole response".to_string(),
            };
            *seen.entry(class).or_default() += 1;
        }
        summary.push_str(&format!("  {kind:?}: {seen:?}\n"));
    }
    eprintln!("{summary}");
    let unexpected: Vec<_> = outcomes
        .iter()
        .filter(|(kind, outcome)| !kind.may_end_in(outcome))
        .collect();
    assert!(
        unexpected.is_empty(),
        "{unexpected:?}\n{summary}{}",
        server.diagnostics()
    );
    // Healthy requests are served, not all failed closed: during the load, or, where the whole
    // load fell within the trapping plugin's reload backoff (it failed at once, and the load took
    // 0.1 s), once the plugin is back.
    let served = |outcome: &Result<u16, String>| *outcome == Ok(200);
    if !outcomes
        .iter()
        .any(|(kind, outcome)| *kind == FaultyRequest::Healthy && served(outcome))
    {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !served(&FaultyRequest::Healthy.send(port)) {
            assert!(
                Instant::now() < deadline,
                "no healthy request served:\n{summary}{}",
                server.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // Every transaction closed and took its plugin contexts along, and the trapping plugin
    // failed (and was reloaded); a load may end before the stats' first publication. Stalled
    // upstream connections are cut by the inactivity timeout.
    let deadline = Instant::now() + Duration::from_secs(15);
    server.wait_for_metric("plugin.pwhost_ats.live_stream_contexts", deadline, |line| {
        line.ends_with(" 0")
    });
    server.wait_for_metric("plugin.pwhost_ats.trap.failed_by_trap", deadline, |line| {
        !line.ends_with(" 0")
    });
    // (A healthy request still goes through the callout, which may meet the stalling checker.)
    let after = try_get(&server.url("/healthy"), &[])
        .map(|r| r.status)
        .map_err(|e| e.to_string());
    assert!(
        FaultyRequest::Healthy.may_end_in(&after),
        "after the load: {after:?}\n{}",
        server.diagnostics()
    );
}

/// How an origin received one request's body, whose length the request gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyArrival {
    /// All of it came (answered 200).
    Whole(usize),
    /// The proxy closed or reset the connection after this many bytes of it.
    Cut(usize),
    /// Nothing more came for 10 s after this many bytes of it.
    Stalled(usize),
}

/// An origin that reads each request's head and as much of its `Content-Length` body as comes,
/// recording how the body of each path arrived, and answers 200 to a whole request only, with
/// a body of `x` as long as the path's `?size=N` says (5 bytes without), `Content-Length`
/// framed (the header alone for `HEAD`), after a `103 Early Hints` for a path with
/// `early-hints` in it; a path with `redirect` in it is answered 302 to `/target`. A connection
/// per request, one at a time.
struct BodyOrigin {
    origin: Origin,
    arrivals: Arc<std::sync::Mutex<Vec<(String, BodyArrival)>>>,
    /// The request being read: its path and how many bytes of its body came so far.
    reading: Arc<std::sync::Mutex<Option<(String, usize)>>>,
}

impl BodyOrigin {
    fn start() -> BodyOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").expect("the origin binds");
        listener.set_nonblocking(true).expect("nonblocking accept");
        let address = listener.local_addr().expect("an address");
        let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
        let reading = Arc::new(std::sync::Mutex::new(None));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, count, stopped, progress) = (
            Arc::clone(&arrivals),
            Arc::clone(&requests),
            Arc::clone(&stop),
            Arc::clone(&reading),
        );
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            while !stopped.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                let Ok((connection, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                if let Some((path, arrival)) = BodyOrigin::serve(connection, &progress) {
                    count.fetch_add(1, Ordering::Relaxed);
                    seen.lock().expect("the arrivals").push((path, arrival));
                }
            }
        });
        BodyOrigin {
            origin: Origin {
                address,
                requests,
                stop,
                thread: Some(thread),
            },
            arrivals,
            reading,
        }
    }

    /// Whether the origin is reading a request for `path` and has `bytes` of its body or more.
    fn has_received(&self, path: &str, bytes: usize) -> bool {
        self.reading
            .lock()
            .expect("the request being read")
            .as_ref()
            .is_some_and(|(at, received)| at == path && *received >= bytes)
    }

    /// Reads one request from `connection` and answers it if it came whole: its path and how
    /// its body arrived (nothing without a whole head).
    fn serve(
        mut connection: TcpStream,
        reading: &std::sync::Mutex<Option<(String, usize)>>,
    ) -> Option<(String, BodyArrival)> {
        let _ = connection.set_nonblocking(false);
        let _ = connection.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = connection.set_write_timeout(Some(Duration::from_secs(20)));
        let mut received = Vec::new();
        let mut buffer = [0u8; 16 * 1024];
        let head_end = loop {
            if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            match connection.read(&mut buffer) {
                Ok(0) | Err(_) => return None,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        };
        let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
        let path = head.split(' ').nth(1).unwrap_or_default().to_string();
        let method_head = head.starts_with("head ");
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0);
        let mut body = received.len() - head_end;
        let arrival = loop {
            *reading.lock().expect("the request being read") = Some((path.clone(), body));
            if body >= length {
                break BodyArrival::Whole(body);
            }
            match connection.read(&mut buffer) {
                Ok(0) => break BodyArrival::Cut(body),
                Ok(n) => body += n,
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break BodyArrival::Stalled(body)
                }
                Err(_) => break BodyArrival::Cut(body),
            }
        };
        if let BodyArrival::Whole(_) = arrival {
            let size: usize = path
                .split_once("?size=")
                .and_then(|(_, size)| size.parse().ok())
                .unwrap_or(5);
            if path.contains("redirect") {
                let _ = connection.write_all(
                    b"HTTP/1.1 302 Found\r\nlocation: /target\r\ncontent-length: 3\r\n\
                      connection: close\r\n\r\nfar",
                );
                return Some((path, arrival));
            }
            let early = match path.contains("early-hints") {
                true => "HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n",
                false => "",
            };
            let head = format!(
                "{early}HTTP/1.1 200 OK\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n"
            );
            if connection.write_all(head.as_bytes()).is_ok() {
                let block = vec![b'x'; 64 * 1024];
                let mut left = if method_head { 0 } else { size };
                while left > 0 {
                    let n = left.min(block.len());
                    if connection.write_all(&block[..n]).is_err() {
                        break;
                    }
                    left -= n;
                }
            }
        }
        Some((path, arrival))
    }

    /// How the body of each request for `path` arrived, in order.
    fn arrivals_at(&self, path: &str) -> Vec<BodyArrival> {
        self.arrivals
            .lock()
            .expect("the arrivals")
            .iter()
            .filter(|(at, _)| at == path)
            .map(|(_, arrival)| *arrival)
            .collect()
    }
}

/// What a client got from a raw HTTP/1.1 exchange: every byte until the proxy closed, or why
/// the reading stopped before that.
struct RawExchange {
    received: Vec<u8>,
    /// `None` when the proxy closed the connection (or reset it); a timeout's error otherwise.
    timed_out: Option<std::io::Error>,
}

impl RawExchange {
    /// Sends `request` on a connection of its own to the proxy at `port` (the rest of it,
    /// `later`, 300 ms after, so the proxy may pass the first part on before the rest comes),
    /// and reads until the proxy closes, at most 20 s.
    fn run(port: u16, request: &str, later: &str) -> RawExchange {
        RawExchange::run_paced(port, &[request, later], Duration::from_millis(300))
    }

    /// Sends the `parts` of a request on a connection of its own to the proxy at `port`, each
    /// `pause` after the one before, and reads until the proxy closes, at most 20 s.
    fn run_paced(port: u16, parts: &[&str], pause: Duration) -> RawExchange {
        let mut connection =
            TcpStream::connect(("127.0.0.1", port)).expect("connects to the proxy");
        for (index, part) in parts
            .iter()
            .enumerate()
            .filter(|(_, part)| !part.is_empty())
        {
            if index > 0 {
                std::thread::sleep(pause);
            }
            // A write failing once the proxy ended the exchange is fine: the reading says
            // what came.
            let _ = connection.write_all(part.as_bytes());
        }
        RawExchange::read_to_close(connection)
    }

    /// Reads from `connection` until the proxy closes it, at most 20 s.
    fn read_to_close(mut connection: TcpStream) -> RawExchange {
        connection
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("a read timeout");
        let mut received = Vec::new();
        let mut buffer = [0u8; 64 * 1024];
        let timed_out = loop {
            match connection.read(&mut buffer) {
                Ok(0) => break None,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break Some(error)
                }
                Err(_) => break None,
            }
        };
        RawExchange {
            received,
            timed_out,
        }
    }

    /// A POST to `path` with `headers` (`name: value\r\n` lines) whose body, `first` then
    /// `rest`, comes in two parts.
    /// A POST whose body's `rest` is sent once `origin` has received its `first` part (or
    /// after 20 s): a body that began to go on, however long the proxy took to pass it.
    fn post_in_two_parts(
        port: u16,
        origin: &BodyOrigin,
        path: &str,
        headers: &str,
        first: &str,
        rest: &str,
    ) -> RawExchange {
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: localhost\r\n{headers}content-length: {}\r\n\
             connection: close\r\n\r\n",
            first.len() + rest.len()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        RawExchange::run_when(port, &format!("{head}{first}"), rest, || {
            origin.has_received(path, first.len()) || Instant::now() > deadline
        })
    }

    /// Sends `request`, then `later` once `ready` says so (asked every 10 ms), and reads until
    /// the proxy closes, at most 20 s.
    fn run_when(port: u16, request: &str, later: &str, ready: impl Fn() -> bool) -> RawExchange {
        let mut connection =
            TcpStream::connect(("127.0.0.1", port)).expect("connects to the proxy");
        let _ = connection.write_all(request.as_bytes());
        while !ready() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = connection.write_all(later.as_bytes());
        RawExchange::read_to_close(connection)
    }

    fn get(port: u16, path: &str) -> RawExchange {
        RawExchange::run(
            port,
            &format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"),
            "",
        )
    }

    /// The status line's code, if a response head came.
    fn status(&self) -> Option<u16> {
        let text = String::from_utf8_lossy(&self.received);
        text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }

    /// The last response head that came (past any interim ones), lower-cased, from its status
    /// code on.
    fn last_head(&self) -> String {
        let text = String::from_utf8_lossy(&self.received);
        let last = text.rsplit("HTTP/1.1 ").next().unwrap_or_default();
        last.split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    }

    /// Whether a whole chunked message came (its last chunk and the empty line after it).
    fn ends_chunked(&self) -> bool {
        self.received.ends_with(b"\r\n0\r\n\r\n")
    }

    fn describe(&self) -> String {
        let text = String::from_utf8_lossy(&self.received);
        let head = text.split("\r\n\r\n").next().unwrap_or_default();
        format!(
            "{} bytes, head {head:?}, ending {:?}, timed out: {:?}",
            self.received.len(),
            String::from_utf8_lossy(&self.received[self.received.len().saturating_sub(10)..]),
            self.timed_out
        )
    }
}

/// Once some of a body went on, a plugin can no longer answer in its place, so a plugin that
/// fails closed, answers or closes the stream in a body callback then ends the transaction
/// (Envoy resets the stream then): the origin's request is cut short, never left waiting for
/// the rest of the length it was given, nor completed; the client's connection closes without
/// a success, at once; a response body cut short never reaches the client as if whole. A
/// response none of which went out is answered with the plugin's reply (503 for a failure).
#[test]
fn a_plugin_ending_a_stream_in_a_body_that_began_to_go_on_cuts_both_sides_short() {
    let origin = BodyOrigin::start();
    let auth = Origin::answering_with(&[("x-auth-user", "alice")]);
    let gate =
        http_call_yaml("wasmtime", "", auth.address).replace("name: http_call", "name: gate");
    let trap = plugin_yaml(
        "http_headers",
        "wasmtime",
        "",
        "failurePolicy: FAIL_RELOAD\nreloadConfig: {backoff: {baseInterval: 0.05s, maxInterval: 0.2s}}",
    )
    .replace("name: http_headers", "name: trap")
    .replace("vmId: http_headers", "vmId: trap")
    .replace(
        &corpus_plugin("http_headers").display().to_string(),
        &workspace()
            .join("plugins/dist/wat/trap_at_body_end.wasm")
            .display()
            .to_string(),
    );
    let server = TrafficServer::start(
        &origin.origin,
        &[
            PluginFile {
                name: "gate",
                yaml: gate,
            },
            PluginFile {
                name: "trap",
                yaml: trap,
            },
        ],
    );
    let context = |what: String| format!("{what}\n{}", server.diagnostics());
    let (first, rest) = ("the first part;", " the rest of the body");

    // `gate` lets each chunk go on and answers 403 at the body's end; `trap`, after it in the
    // chain, traps at the ends of bodies (FAIL_RELOAD: a fresh copy for the next transaction).
    let refused = RawExchange::post_in_two_parts(
        server.port,
        &origin,
        "/refused",
        "x-check-body: refuse-at-end\r\n",
        first,
        rest,
    );
    let failed = RawExchange::post_in_two_parts(server.port, &origin, "/failed", "", first, rest);
    for (exchange, path) in [(&refused, "/refused"), (&failed, "/failed")] {
        assert!(
            exchange.timed_out.is_none() && exchange.status().is_none_or(|status| status >= 500),
            "{}",
            context(format!(
                "{path}: the client is not left waiting, nor told of a success: {}",
                exchange.describe()
            ))
        );
        // The origin's thread records the cut once it reads the close, which can come a
        // moment after the client's exchange ended.
        let deadline = Instant::now() + Duration::from_secs(10);
        while origin.arrivals_at(path).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            origin.arrivals_at(path),
            [BodyArrival::Cut(first.len())],
            "{}",
            context(format!("{path}: the origin's request is cut short at once"))
        );
    }
    server.wait_for_log("[gate] the plugin answered or closed the stream during its request body");

    // Responses: one whose body went on before its end traps, one that comes whole at once.
    std::thread::sleep(Duration::from_millis(500));
    let size = 4 << 20;
    let large = RawExchange::get(server.port, &format!("/large?size={size}"));
    assert!(
        large.status() == Some(200)
            && large.timed_out.is_none()
            && !large.ends_chunked()
            && large.received.len() < size,
        "{}",
        context(format!(
            "a response cut short does not reach the client whole: {}",
            large.describe()
        ))
    );
    std::thread::sleep(Duration::from_millis(500));
    let small = RawExchange::get(server.port, "/small?size=1000");
    assert_eq!(
        small.status(),
        Some(503),
        "{}",
        context(format!(
            "a response none of which went on is answered: {}",
            small.describe()
        ))
    );
}

/// A callout target answering every call 403 (`denied`), each only after `delay`.
fn slow_refuser(delay: Duration) -> Origin {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("the refuser binds");
    let address = server.server_addr().to_ip().expect("an IP address");
    let requests = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (count, stopped) = (Arc::clone(&requests), Arc::clone(&stop));
    let thread = std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(50)) else {
                continue;
            };
            count.fetch_add(1, Ordering::Relaxed);
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let _ = request
                    .respond(tiny_http::Response::from_string("denied").with_status_code(403));
            });
        }
    });
    Origin {
        address,
        requests,
        stop,
        thread: Some(thread),
    }
}

/// While one plugin holds a response in its headers callback, another plugin's reply (here
/// from its callout's answer) is acted on at once, as Envoy does, instead of waiting for a
/// holder that may never let go: the reply's status goes out.
#[test]
fn a_reply_from_another_plugin_ends_a_response_a_plugin_holds() {
    let origin = Origin::start();
    // The callout's answer comes after the origin's response, which `panics` holds for good.
    let auth = slow_refuser(Duration::from_secs(1));
    let http_call = http_call_yaml("wasmtime", "", auth.address);
    let server = TrafficServer::start(
        &origin,
        &[
            PluginFile {
                name: "panics",
                yaml: plugin_yaml("panics", "wasmtime", "", ""),
            },
            PluginFile {
                name: "http_call",
                yaml: http_call,
            },
        ],
    );
    let context = |what: String| format!("{what}\n{}", server.diagnostics());
    // `http_call` lets the headers go on while its call is out (`notify-then-body`), and
    // answers 401 with the callout's body when it is refused.
    let reply = try_get(
        &server.url("/held"),
        &[
            ("x-hold-response", "1"),
            ("x-check-body", "notify-then-body"),
        ],
    )
    .unwrap_or_else(|error| panic!("{}", context(error.to_string())));
    assert_eq!(reply.status, 401, "{}", context(format!("{reply:?}")));
    assert_eq!(origin.requests(), 1, "the origin answered before the reply");
    assert_eq!(auth.requests(), 1);
}

/// A callout target for body checks: 200 with `x-auth-user: alice`, or 403 for a body with
/// `refuse` in it.
fn body_checker() -> Origin {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("the checker binds");
    let address = server.server_addr().to_ip().expect("an IP address");
    let requests = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (count, stopped) = (Arc::clone(&requests), Arc::clone(&stop));
    let thread = std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            let Ok(Some(mut request)) = server.recv_timeout(Duration::from_millis(50)) else {
                continue;
            };
            count.fetch_add(1, Ordering::Relaxed);
            let mut body = String::new();
            let _ = request.as_reader().read_to_string(&mut body);
            let response = match body.contains("refuse") {
                true => tiny_http::Response::from_string("refused").with_status_code(403),
                false => tiny_http::Response::from_string("ok").with_header(
                    tiny_http::Header::from_bytes("x-auth-user", "alice").expect("header"),
                ),
            };
            let _ = request.respond(response);
        }
    });
    Origin {
        address,
        requests,
        stop,
        thread: Some(thread),
    }
}

/// With Traffic Server's cache on, a plugin holding the request headers (to check the body
/// first) is not bypassed by a cached response: Traffic Server looks the cache up before it
/// reads the body, so while the hold lasts the lookup is taken as a miss, and the request goes
/// the way the hold gates.
#[test]
fn a_cached_response_does_not_pass_a_plugin_holding_the_request_headers() {
    let origin = Origin::answering_with(&[("cache-control", "max-age=300")]);
    let checker = body_checker();
    let http_call = http_call_yaml(
        "wasmtime",
        "allowOnHeadersStopIteration: true",
        checker.address,
    );
    // `envoy_rules` before it holds a transaction with `x-probe: hold` in its hook until a
    // call to `cluster` answers.
    let hold_answerer = Origin::start();
    let envoy_rules = format!(
        "{}upstreams:\n  cluster: {}\n",
        plugin_yaml("envoy_rules", "wasmtime", "", ""),
        hold_answerer.address
    );
    let (root, port) = TrafficServer::prepare(
        &origin,
        &[
            PluginFile {
                name: "envoy_rules",
                yaml: envoy_rules,
            },
            PluginFile {
                name: "http_call",
                yaml: http_call,
            },
        ],
    );
    let etc = root.path().join("etc");
    let records = std::fs::read_to_string(etc.join("records.config")).expect("records.config");
    let records = records
        .replace(
            "proxy.config.http.cache.http INT 0",
            "proxy.config.http.cache.http INT 1",
        )
        .replace(
            "proxy.config.cache.ram_cache.size INT 0",
            "proxy.config.cache.ram_cache.size INT 4194304",
        )
        + "CONFIG proxy.config.http.cache.post_method INT 1\n";
    std::fs::write(etc.join("records.config"), records).expect("records.config");
    std::fs::write(
        etc.join("storage.config"),
        format!("{} 256M\n", root.path().join("cache").display()),
    )
    .expect("storage.config");
    let server = TrafficServer::start_prepared(root, port);
    let context = |what: &str| format!("{what}\n{}", server.diagnostics());
    let upload_with = |extra: &[(&'static str, &'static str)], mode: Option<&str>, body: &str| {
        let mut headers: Vec<(&str, &str)> = mode
            .map(|mode| ("x-check-body", mode))
            .into_iter()
            .collect();
        headers.extend_from_slice(extra);
        post_with(&server.url("/cached"), &headers, body.as_bytes(), false)
    };
    let upload = |mode: Option<&str>, body: &str| upload_with(&[], mode, body);

    // Checked and passed: the origin's answer is cached. Traffic Server writes the cache after
    // the response went out, and only once its cache is ready (it opens the cache's storage
    // as it starts): sent again until a write is counted.
    let mut cached = false;
    for _ in 0..4 {
        let first = upload(Some("before-headers"), "a fine body")
            .unwrap_or_else(|error| panic!("{}", context(&error.to_string())));
        assert_eq!(first.status, 200, "{}", context(&format!("{first:?}")));
        cached = server.metric_within(
            "proxy.process.cache.write.success",
            Duration::from_secs(8),
            |line| !line.ends_with(" 0"),
        );
        if cached {
            break;
        }
    }
    assert!(
        cached,
        "{}",
        context("the origin's answer was never cached")
    );
    let (origin_seen, checks) = (origin.requests(), checker.requests());
    // A request whose headers the plugin lets go (to check the body on its way): the cache
    // answers, as a cache filter after the plugin would in Envoy; the body is never checked.
    let from_cache = upload(Some("on-its-way"), "any body")
        .unwrap_or_else(|error| panic!("{}", context(&error.to_string())));
    assert_eq!(
        from_cache.status,
        200,
        "{}",
        context(&format!("{from_cache:?}"))
    );
    assert_eq!(
        origin.requests(),
        origin_seen,
        "{}",
        context("the second answer did not come from the cache")
    );
    assert_eq!(
        checker.requests(),
        checks,
        "{}",
        context("a body checked on its way")
    );
    // A body the check refuses, while the headers are held: not the cached 200 (the plugin's
    // refusal closes the connection; see the hold tests above).
    let refused_not_cached = |extra: &[(&'static str, &'static str)], body: &str| {
        let refused = upload_with(extra, Some("before-headers"), body);
        assert!(
            refused.as_ref().is_err() || refused.as_ref().is_ok_and(|reply| reply.status != 200),
            "{}",
            context(&format!(
                "a refused body ({extra:?}) got the cached answer: {refused:?}"
            ))
        );
    };
    refused_not_cached(&[], "please refuse this body");
    assert_eq!(
        origin.requests(),
        origin_seen,
        "{}",
        context("the origin saw a refused body")
    );
    assert_eq!(
        checker.requests(),
        checks + 1,
        "{}",
        context("the refused body was checked")
    );
    // The same when the headers hold begins only once another plugin, holding the whole
    // transaction in its hook for a call, let it go.
    refused_not_cached(&[("x-probe", "hold")], "please refuse this body too");
    assert_eq!(
        hold_answerer.requests(),
        1,
        "{}",
        context("the hook's hold")
    );
    assert_eq!(
        (origin.requests(), checker.requests()),
        (origin_seen, checks + 2),
        "{}",
        context("the body refused after a hold reached the origin, or was not checked")
    );
}

/// A plugin named `trap` that traps in every response headers callback (and has no body
/// callback), failing closed.
fn response_trap_yaml() -> String {
    plugin_yaml("http_headers", "wasmtime", "", "failurePolicy: FAIL_CLOSED")
        .replace("name: http_headers", "name: trap")
        .replace("vmId: http_headers", "vmId: trap")
        .replace(
            &corpus_plugin("http_headers").display().to_string(),
            &workspace()
                .join("plugins/dist/wat/trap_in_response_headers.wasm")
                .display()
                .to_string(),
        )
}

/// The origin's response is what the plugins see and change, whatever comes before or without
/// it: an interim `103` before it is not taken for it; a response without a body (to `HEAD`)
/// gets `end_of_stream` in its headers callback, no body callback, and keeps its
/// `Content-Length`; a redirect goes to the client as the plugins saw it (Traffic Server does
/// not follow it, even when told to: the client would get a response the plugins never saw);
/// and a plugin failing closed in its response headers callback has a 503 sent instead of the
/// response, none of whose body reaches the client.
#[test]
fn the_plugins_see_the_response_itself_and_a_failure_there_keeps_its_body_from_the_client() {
    let origin = BodyOrigin::start();
    let server = TrafficServer::start_edited(
        &origin.origin,
        &[
            PluginFile {
                name: "http_headers",
                yaml: plugin_yaml("http_headers", "wasmtime", "", ""),
            },
            PluginFile {
                name: "body_rewrite",
                yaml: plugin_yaml("body_rewrite", "wasmtime", "", ""),
            },
        ],
        "records.config",
        |records| {
            records
                + "CONFIG proxy.config.http.number_of_redirections INT 1\n\
                   CONFIG proxy.config.http.redirect.actions STRING \
                   self:follow,loopback:follow,private:follow,routable:follow\n"
        },
    );
    let context = |what: String| format!("{what}\n{}", server.diagnostics());
    let head = RawExchange::run(
        server.port,
        "HEAD /head?size=5 HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
        "",
    );
    assert_eq!(head.status(), Some(200), "{}", context(head.describe()));
    assert!(
        head.last_head().contains("content-length: 5"),
        "{}",
        context(format!(
            "the HEAD response lost its length: {}",
            head.describe()
        ))
    );
    let log = server.diagnostics();
    assert!(
        !log.contains("response body:"),
        "{}",
        context("a body callback came for a response without a body".into())
    );

    let hinted = RawExchange::get(server.port, "/early-hints?size=5");
    let last = hinted.last_head();
    assert!(
        last.starts_with("200") && last.contains("x-powered-by: pwhost"),
        "{}",
        context(format!(
            "the plugins did not see the final response: {}",
            hinted.describe()
        ))
    );

    let redirected = RawExchange::get(server.port, "/redirect");
    let last = redirected.last_head();
    assert!(
        redirected.timed_out.is_none()
            && last.starts_with("302")
            && last.contains("x-powered-by: pwhost"),
        "{}",
        context(format!(
            "the redirect did not reach the client: {}",
            redirected.describe()
        ))
    );
    drop(server);

    // A plugin trapping in every response headers callback (and with no body callback).
    let trap = response_trap_yaml();
    let server = TrafficServer::start(
        &origin.origin,
        &[PluginFile {
            name: "trap",
            yaml: trap,
        }],
    );
    let context = |what: String| format!("{what}\n{}", server.diagnostics());
    let failed = RawExchange::get(server.port, "/guarded?size=5");
    assert_eq!(failed.status(), Some(503), "{}", context(failed.describe()));
    assert!(
        !String::from_utf8_lossy(&failed.received).contains("xxxxx"),
        "{}",
        context(format!(
            "the failed plugin's response leaked: {}",
            failed.describe()
        ))
    );
}

/// A plugin may hold a transaction for at most the stream idle timeout
/// (`--stream-idle-timeout-ms`, Envoy's `stream_idle_timeout`) without continuing, answering or
/// closing it: past it the client gets a 408, held in the request hook or the response's, and
/// the transaction ends with its plugin contexts, also when its client left meanwhile (Traffic
/// Server tells no held hook of that). A plugin holding the request headers while the body
/// comes sees the stream busy with each chunk, however long the whole body takes.
#[test]
fn a_transaction_held_past_the_stream_idle_timeout_is_answered_408_and_ends() {
    let origin = Origin::start();
    let auth = Origin::answering_with(&[("x-auth-user", "alice")]);
    // `panics` holds for good a request with `x-hold` and the response of one with
    // `x-hold-response`; `http_call` checks a body before its headers go on with
    // `x-check-body: before-headers`.
    let (root, port) = TrafficServer::prepare(
        &origin,
        &[
            PluginFile {
                name: "panics",
                yaml: plugin_yaml("panics", "wasmtime", "", ""),
            },
            PluginFile {
                name: "http_call",
                yaml: http_call_yaml(
                    "wasmtime",
                    "allowOnHeadersStopIteration: true",
                    auth.address,
                ),
            },
        ],
    );
    let timeout = Duration::from_millis(1500);
    let plugin_config = root.path().join("etc/plugin.config");
    let line = std::fs::read_to_string(&plugin_config).expect("plugin.config");
    let line = line.replacen(
        ".so ",
        &format!(".so --stream-idle-timeout-ms={} ", timeout.as_millis()),
        1,
    );
    std::fs::write(&plugin_config, line).expect("plugin.config");
    let server = TrafficServer::start_prepared(root, port);
    let context = |what: &str| format!("{what}\n{}", server.diagnostics());
    let contexts = "plugin.pwhost_ats.live_stream_contexts";

    // Held in the request hook: a 408 once the timeout passed, and the origin never asked.
    let started = Instant::now();
    let held = try_get(&server.url("/held"), &[("x-hold", "1")])
        .unwrap_or_else(|e| panic!("{}", context(&e.to_string())));
    let took = started.elapsed();
    assert_eq!(held.status, 408, "{}", context("the held request"));
    // (Traffic Server runs a timer up to 5 ms early.)
    assert!(
        took + Duration::from_millis(10) >= timeout,
        "answered after {took:?}, before the timeout"
    );
    assert_eq!(
        origin.requests(),
        0,
        "{}",
        context("the held request went on")
    );
    assert!(
        server
            .diagnostics()
            .contains("[panics] the plugin held the transaction for 1500 ms"),
        "{}",
        context("no log line says why")
    );

    // Held in the response hook: the 408 replaces the origin's response.
    let held = try_get(&server.url("/held-response"), &[("x-hold-response", "1")])
        .unwrap_or_else(|e| panic!("{}", context(&e.to_string())));
    assert_eq!(held.status, 408, "{}", context("the held response"));
    assert!(
        !held.body.contains("hello from origin"),
        "{}",
        context("the origin's body passed the held response")
    );
    assert_eq!(
        origin.requests(),
        1,
        "{}",
        context("the held response's request")
    );

    // A client leaving a held transaction: its contexts go at the timeout. The hold is seen
    // by its 408's log line (the stat can miss a hold of 1.5 s: Traffic Server publishes stats
    // with a lag, longer under load), and contexts left behind by the count that ends this
    // test, once the stats have caught up.
    let held = "[panics] the plugin held the transaction for 1500 ms";
    let held_before = server.diagnostics().matches(held).count();
    let mut client = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    client
        .write_all(b"GET /left HTTP/1.1\r\nhost: a\r\nx-hold: 1\r\n\r\n")
        .expect("a request sent");
    // Left well within the timeout (had Traffic Server not read the request by then, it
    // reads it with the end of the connection, and holds a transaction whose client is gone).
    std::thread::sleep(timeout / 5);
    drop(client);
    server.wait_for_log_count(held, held_before + 1);

    // The headers held while a body comes in parts 600 ms apart, over twice the timeout in
    // all: each part is activity, so the check passes and the origin gets the whole body.
    let parts = [
        "part one\n",
        "part two\n",
        "part three\n",
        "part four\n",
        "part five\n",
    ];
    let body: String = parts.concat();
    let head = format!(
        "POST /slow-upload HTTP/1.1\r\nhost: localhost\r\nx-check-body: before-headers\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let mut request = vec![head.as_str()];
    request.extend(parts);
    let slow = RawExchange::run_paced(server.port, &request, Duration::from_millis(600));
    let text = String::from_utf8_lossy(&slow.received);
    assert_eq!(slow.status(), Some(200), "{}", context(&slow.describe()));
    assert!(
        text.contains("x-body-checked: alice") && text.contains(&body),
        "{}",
        context(&format!("the slow upload did not pass whole: {text}"))
    );
    server.wait_for_metric(contexts, Instant::now() + Duration::from_secs(10), |line| {
        line.ends_with(" 0")
    });
    // The 408s have no body: Traffic Server stays whole through the traffic after them (an
    // empty error body handed to it as a buffer once corrupted its heap).
    for round in 0..40 {
        let reply = try_get(&server.url(&format!("/after-{round}")), &[])
            .unwrap_or_else(|e| panic!("{}", context(&e.to_string())));
        assert_eq!(reply.status, 200, "{}", context("traffic after the 408s"));
    }
}

/// A plugin may hold a response in its headers callback, e.g. to check it with a callout, and
/// let it go from the callout's answer: the client gets the origin's response with what the
/// plugin changed meanwhile, body and all (a HEAD response keeps its length and gets no body).
/// A reply made in the response headers callbacks goes to the client as it is, as Envoy sends
/// it straight to the client: the plugins that had not seen the response see none (none holds
/// it), and none of the origin's header fields or body go out with it.
#[test]
fn a_plugin_holding_the_response_for_a_callout_lets_it_go_with_its_changes() {
    let origin = BodyOrigin::start();
    let auth = Origin::answering_with(&[("x-auth-user", "alice")]);
    let http_call = http_call_yaml("wasmtime", "", auth.address);
    let checked = |method: &str, path: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\nx-check-response: 1\r\n\
             connection: close\r\n\r\n"
        )
    };
    let server = TrafficServer::start(
        &origin.origin,
        &[PluginFile {
            name: "http_call",
            yaml: http_call.clone(),
        }],
    );
    let context = |what: String| format!("{what}\n{}", server.diagnostics());
    for size in [5, 300_000] {
        let got = RawExchange::run(
            server.port,
            &checked("GET", &format!("/checked?size={size}")),
            "",
        );
        let head = got.last_head();
        assert!(
            got.status() == Some(200) && head.contains("x-response-checked: alice"),
            "{}",
            context(format!("the checked response: {}", got.describe()))
        );
        // The body's bytes, whether framed by the length or chunked (chunk sizes have no
        // `x`).
        let head_end = got
            .received
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(0);
        let body = got.received[head_end..]
            .iter()
            .filter(|b| **b == b'x')
            .count();
        assert!(
            body == size
                && (head.contains(&format!("content-length: {size}")) || got.ends_chunked()),
            "{}",
            context(format!("the body did not come whole: {}", got.describe()))
        );
    }
    let headed = RawExchange::run(server.port, &checked("HEAD", "/checked?size=5"), "");
    assert!(
        headed.timed_out.is_none()
            && headed.status() == Some(200)
            && headed.last_head().contains("content-length: 5")
            && headed.last_head().contains("x-response-checked: alice")
            && headed.received.ends_with(b"\r\n\r\n"),
        "{}",
        context(format!("the checked HEAD response: {}", headed.describe()))
    );
    assert_eq!(
        auth.requests(),
        3,
        "{}",
        context("one check per response".into())
    );
    drop(server);

    // The plugin after it in the chain (before it in the response's order) fails closed in
    // its response headers callback: the 503 goes out, and the checking plugin never sees the
    // response, so it makes no call and holds nothing.
    let trap = response_trap_yaml();
    let guarded = Origin::answering_with(&[("x-origin-secret", "s3cret")]);
    let server = TrafficServer::start(
        &guarded,
        &[
            PluginFile {
                name: "http_call",
                yaml: http_call,
            },
            PluginFile {
                name: "trap",
                yaml: trap,
            },
        ],
    );
    let context = |what: String| format!("{what}\n{}", server.diagnostics());
    let failed = RawExchange::run(server.port, &checked("GET", "/guarded"), "");
    let text = String::from_utf8_lossy(&failed.received);
    assert!(
        failed.status() == Some(503)
            && !failed.last_head().contains("x-response-checked")
            && !text.contains("x-origin-secret")
            && !text.contains("hello from origin"),
        "{}",
        context(format!(
            "the failed plugin's response: {}",
            failed.describe()
        ))
    );
    assert_eq!(
        auth.requests(),
        3,
        "{}",
        context("a check after the reply".into())
    );
}

/// What plugins keep in shared data is bounded per VM id (`--shared-data-bytes-per-vm-id`,
/// 256 MiB unless set): a set past the bound is refused with INTERNAL_FAILURE, and the plugin's
/// log, in Traffic Server's, says why. The Rust SDK panics on that status (it expects only OK
/// or CAS_MISMATCH), so its plugin traps and fails closed, as at its memory cap.
#[test]
fn shared_data_past_its_limit_is_refused_and_the_plugin_told_why() {
    let origin = Origin::start();
    let (root, port) = TrafficServer::prepare(
        &origin,
        &[PluginFile {
            name: "shared_data",
            yaml: plugin_yaml("shared_data", "wasmtime", "", ""),
        }],
    );
    // `shared_data` keeps `vm_started` from its start (its VM id, key and value, and 128
    // bytes: 152); 200 bytes leave no room for `counter` (147) beside it.
    let plugin_config = root.path().join("etc/plugin.config");
    let line = std::fs::read_to_string(&plugin_config).expect("plugin.config");
    let line = line.replacen(".so ", ".so --shared-data-bytes-per-vm-id=200 ", 1);
    std::fs::write(&plugin_config, line).expect("plugin.config");
    let server = TrafficServer::start_prepared(root, port);
    let context = |what: &str| format!("{what}\n{}", server.diagnostics());

    let reply = try_get(&server.url("/count"), &[])
        .unwrap_or_else(|e| panic!("{}", context(&e.to_string())));
    assert_eq!(reply.status, 503, "{}", context(&reply.body));
    assert_eq!(origin.requests(), 0, "{}", context("the request went on"));
    server.wait_for_log(
        "[shared_data] pwhost limit: proxy_set_shared_data: the shared data of a VM id is at \
         most 200 bytes",
    );
}

/// A proxy-wasm SDK plugin built as a native library runs in Traffic Server on the null
/// runtime, as it runs in `pwhost run`: its calls into the host (`proxy_*`, defined by
/// `pwhost_ats.so`) resolve although Traffic Server loads `pwhost_ats.so` without making its
/// symbols global.
#[test]
fn a_native_sdk_library_runs_on_the_null_runtime() {
    let library = workspace().join("plugins/dist/native/libhttp_headers.so");
    assert!(library.exists(), "{} is missing", library.display());
    let origin = Origin::start();
    let yaml = plugin_yaml("http_headers", "envoy.wasm.runtime.null", "", "").replace(
        &corpus_plugin("http_headers").display().to_string(),
        &library.display().to_string(),
    );
    let server = TrafficServer::start(
        &origin,
        &[PluginFile {
            name: "http_headers",
            yaml,
        }],
    );
    let reply = try_get(&server.url("/native"), &[("user-agent", "test-agent")])
        .unwrap_or_else(|e| panic!("{e}\n{}", server.diagnostics()));
    assert_eq!(
        reply.status,
        200,
        "{}\n{}",
        reply.body,
        server.diagnostics()
    );
    assert!(
        reply.body.contains("x-pwhost-plugin: http_headers")
            && reply.body.contains("user-agent: pwhost-test"),
        "{}",
        reply.body
    );
    assert_eq!(reply.header("x-powered-by"), Some("pwhost"));
    // Native code runs outside the limits Traffic Server's plugins are given: said at load.
    server.wait_for_log(
        "plugin \"http_headers\": the null runtime cannot keep the call deadline or the \
         memory cap set for plugins",
    );
}

/// A plugin's connection headers are left out of its HTTP calls, whose framing and connection
/// are the host's: the corpus's `holds_for_good` calls with `transfer-encoding: chunked` (and
/// no body), which made Traffic Server wait for a chunked body that never came, so the call
/// never reached its upstream.
#[test]
fn a_calls_connection_headers_are_left_out_and_the_call_goes_out() {
    use std::io::Write;
    let runtime = engines()[0];
    let origin = Origin::start();
    let checker = Origin::start();
    let holding = workspace().join("plugins/dist/wat/holds_for_good.wasm");
    assert!(
        holding.exists(),
        "run scripts/setup.sh (it builds the plugin corpus)"
    );
    let yaml = format!(
        "config:\n  name: holding\n  vmConfig:\n    vmId: holding\n    runtime: {runtime}\n    \
         code:\n      local:\n        filename: {}\nupstreams:\n  auth_cluster: {}\n",
        holding.display(),
        checker.address
    );
    let server = TrafficServer::start(
        &origin,
        &[PluginFile {
            name: "holding",
            yaml,
        }],
    );
    // The transaction is held for good; only its call goes anywhere.
    let mut client = TcpStream::connect(("127.0.0.1", server.port)).expect("connects");
    client
        .write_all(b"GET /held HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("the request goes out");
    let deadline = Instant::now() + Duration::from_secs(20);
    while checker.requests() == 0 {
        assert!(
            Instant::now() < deadline,
            "the call did not reach its upstream:\n{}",
            server.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server.wait_for_log("left out of an HTTP call");
    assert_eq!(origin.requests(), 0);
}
