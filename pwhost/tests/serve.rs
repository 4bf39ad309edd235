//! `pwhost serve` end to end: a real proxy process on loopback ports of its own, an origin
//! started by the test, real HTTP clients, the corpus's Rust SDK plugins unchanged.
#![cfg(all(feature = "serve", feature = "wasmtime"))]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A plugin of the corpus: `name` of the Rust SDK's, or `wat/<name>` of the WAT modules.
fn corpus_plugin(name: &str) -> PathBuf {
    let file = match name.contains('/') {
        true => format!("{name}.wasm"),
        false => format!("rust/{name}.wasm"),
    };
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist")
        .join(file);
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup.sh (plugins/build.sh)",
        path.display()
    );
    path
}

#[path = "common/free_port.rs"]
mod ports;
use ports::{free_port, wait_for_listener};

#[path = "common/faulty_peers.rs"]
mod faulty_peers;
use faulty_peers::{chunked_post, Misbehaving, Misbehaviour};

#[path = "common/tcp_peers.rs"]
mod tcp_peers;
use tcp_peers::{
    a_slow_reader_gets_all_of_a_flood_past_a_1s_idle_timeout,
    assert_closed_after_a_1s_connect_timeout, assert_one_way_traffic_outlives_a_1s_idle_timeout,
    echoes, send_for_head, tcp_exchange, the_chunk_before_a_close_still_goes_out,
    websocket_upgrade, Echo, Flood, Greeter, Sink, Unanswering, UpgradeEcho,
};

/// An origin that answers every request with what it received: request line, headers (lower
/// case), body, then `hello from origin`; a request for `/slow...` after 1.5 s.
/// A server on 127.0.0.1 on a thread of its own (a current-thread runtime), stopped and joined
/// when dropped.
struct Background {
    address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Binds a port and runs `serve(listener, stopped)` on it; `stopped` resolves on drop.
    fn start<F>(
        serve: impl FnOnce(tokio::net::TcpListener, tokio::sync::oneshot::Receiver<()>) -> F
            + Send
            + 'static,
    ) -> Background
    where
        F: std::future::Future<Output = ()>,
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a test server binds");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let address = listener.local_addr().expect("an address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                serve(listener, stopped).await;
            });
        });
        Background {
            address,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The next connection to `listener`, or `None` once `stopped` fires.
async fn next_connection(
    listener: &tokio::net::TcpListener,
    stopped: &mut tokio::sync::oneshot::Receiver<()>,
) -> Option<tokio::net::TcpStream> {
    loop {
        tokio::select! {
            _ = &mut *stopped => return None,
            accepted = listener.accept() => if let Ok((stream, _)) = accepted {
                return Some(stream);
            },
        }
    }
}

struct Origin {
    address: SocketAddr,
    /// Whole requests answered.
    requests: Arc<AtomicUsize>,
    /// Connections accepted (a request abandoned before its body ended counts here only).
    connections: Arc<AtomicUsize>,
    last_body: Arc<Mutex<String>>,
    _server: Background,
}

impl Origin {
    fn start() -> Origin {
        Origin::answering_with(&[])
    }

    /// Waits (at most 10 s) until a request has reached the origin.
    fn wait_for_a_request(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.requests.load(Ordering::Relaxed) == 0 {
            assert!(
                Instant::now() < deadline,
                "the request never reached the origin"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// An origin (hyper's HTTP/1.1 server) answering every request with its request line,
    /// headers and body, adding `headers`; `/slow...` answers after 1.5 s.
    fn answering_with(headers: &[(&str, &str)]) -> Origin {
        Origin::serving(headers, None)
    }

    /// An origin adding `headers` to every answer and refusing (403, with its usual body)
    /// every request whose path is `refused`.
    fn serving(headers: &[(&str, &str)], refused: Option<&'static str>) -> Origin {
        let extra: Arc<Vec<(http::HeaderName, http::HeaderValue)>> = Arc::new(
            headers
                .iter()
                .map(|(name, value)| {
                    (
                        http::HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
                        http::HeaderValue::from_str(value).expect("a header value"),
                    )
                })
                .collect(),
        );
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let last_body = Arc::new(Mutex::new(String::new()));
        let (count, body_seen) = (Arc::clone(&requests), Arc::clone(&last_body));
        let accepted = Arc::clone(&connections);
        let server = Background::start(move |listener, mut stopped| async move {
            loop {
                let Some(stream) = next_connection(&listener, &mut stopped).await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let (count, body_seen, extra) = (
                    Arc::clone(&count),
                    Arc::clone(&body_seen),
                    Arc::clone(&extra),
                );
                let service = hyper::service::service_fn(move |request| {
                    let (count, body_seen, extra) = (
                        Arc::clone(&count),
                        Arc::clone(&body_seen),
                        Arc::clone(&extra),
                    );
                    async move { echo(request, &count, &body_seen, &extra, refused).await }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Origin {
            address: server.address,
            requests,
            connections,
            last_body,
            _server: server,
        }
    }
}

/// The size of the origin's answer to `/big`: more than loopback's socket buffers hold.
const BIG_RESPONSE: usize = 64 << 20;

/// The origin's answer: the request line, the headers (`name: value`), a blank line, the body
/// and `hello from origin`, after 1.5 s to `/slow...`, after 30 s to `/stalled...`; to `/big...`,
/// 64 MiB of `x`; to the path `refused`, the same with status 403.
async fn echo(
    request: http::Request<hyper::body::Incoming>,
    count: &AtomicUsize,
    body_seen: &Mutex<String>,
    extra: &[(http::HeaderName, http::HeaderValue)],
    refused: Option<&str>,
) -> Result<http::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    use http_body_util::BodyExt;
    let (parts, body) = request.into_parts();
    // Only whole requests count: one the proxy abandons mid-body is not answered.
    let Ok(body) = body.collect().await.map(|collected| collected.to_bytes()) else {
        return Ok(http::Response::new(http_body_util::Full::default()));
    };
    let request_body = String::from_utf8_lossy(&body).into_owned();
    count.fetch_add(1, Ordering::Relaxed);
    *body_seen.lock().unwrap() = request_body.clone();
    if parts.uri.path().starts_with("/slow") {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    if parts.uri.path().starts_with("/stalled") {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    if parts.uri.path().starts_with("/big") {
        let big = bytes::Bytes::from(vec![b'x'; BIG_RESPONSE]);
        return Ok(http::Response::new(http_body_util::Full::new(big)));
    }
    let mut text = format!("{} {}\n", parts.method, parts.uri);
    for (name, value) in &parts.headers {
        text.push_str(&format!(
            "{}: {}\n",
            name,
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    text.push_str(&format!("\n{request_body}\nhello from origin\n"));
    let mut response = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(text)));
    if refused == Some(parts.uri.path()) {
        *response.status_mut() = http::StatusCode::FORBIDDEN;
    }
    let headers = response.headers_mut();
    headers.insert("server", http::HeaderValue::from_static("origin"));
    for (name, value) in extra {
        headers.append(name.clone(), value.clone());
    }
    Ok(response)
}

/// A server of a plugin's code for `vm_config.code.remote`, answering every request with it
/// after `delay`.
struct CodeServer {
    url: String,
    sha256: String,
    /// Requests received (counted before the delay).
    requests: Arc<AtomicUsize>,
    _server: Background,
}

impl CodeServer {
    fn start(plugin: &str, delay: Duration) -> CodeServer {
        let code = bytes::Bytes::from(std::fs::read(corpus_plugin(plugin)).expect("the plugin"));
        let sha256 = lifecycle::remote::sha256_hex(&code);
        let requests = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&requests);
        let server = Background::start(move |listener, mut stopped| async move {
            loop {
                let Some(stream) = next_connection(&listener, &mut stopped).await else {
                    return;
                };
                let (code, count) = (code.clone(), Arc::clone(&count));
                let service = hyper::service::service_fn(move |_request| {
                    count.fetch_add(1, Ordering::Relaxed);
                    let code = code.clone();
                    async move {
                        tokio::time::sleep(delay).await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(code),
                        ))
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        CodeServer {
            url: format!("http://{}/plugin.wasm", server.address),
            sha256,
            requests,
            _server: server,
        }
    }

    /// A `vm_config.code` block (YAML, one line) fetching the code from this server.
    fn code_block(&self) -> String {
        format!(
            "{{remote: {{http_uri: {{uri: \"{}\", timeout: 20s}}, sha256: {}, \
             retry_policy: {{num_retries: 0}}}}}}",
            self.url, self.sha256
        )
    }

    /// Waits (at most 10 s) until a request for the code has come.
    fn wait_for_a_request(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.requests.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the code was never asked for");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A `pwhost serve` process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Serve {
    _dir: tempfile::TempDir,
    port: u16,
    admin_port: u16,
    config: PathBuf,
    child: Child,
    log: PathBuf,
}

/// A plugin block in Envoy's filter format.
fn envoy_filter(name: &str, plugin: &str, configuration: &str) -> String {
    envoy_filter_with(name, plugin, configuration, "")
}

/// As [`envoy_filter`], with more fields of the plugin's `config` (YAML, one line).
fn envoy_filter_with(name: &str, plugin: &str, configuration: &str, fields: &str) -> String {
    let fields = if fields.is_empty() {
        String::new()
    } else {
        format!("            {fields}\n")
    };
    format!(
        "      - name: envoy.filters.http.wasm\n        typed_config:\n          \
         \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm\n          \
         config:\n            name: {name}\n{fields}            configuration:\n              \
         \"@type\": type.googleapis.com/google.protobuf.StringValue\n              \
         value: \"{configuration}\"\n            vm_config:\n              \
         runtime: envoy.wasm.runtime.wasmtime\n              \
         code: {{local: {{filename: {}}}}}\n",
        corpus_plugin(plugin).display()
    )
}

impl Serve {
    /// Starts the proxy with `filters` (plugin blocks) in front of `upstream`.
    fn start(upstream: SocketAddr, filters: &[String]) -> Serve {
        Serve::start_with(upstream, filters, &[])
    }

    /// As [`Serve::start`], with more clusters (name, address) for the plugins' calls.
    fn start_with(
        upstream: SocketAddr,
        filters: &[String],
        clusters: &[(&str, SocketAddr)],
    ) -> Serve {
        Serve::start_configured(upstream, "", filters, clusters)
    }

    /// As [`Serve::start`], with `http_call` asking cluster `auth_cluster` (at `auth`) about
    /// every request.
    fn gated_by_http_call(upstream: SocketAddr, auth: SocketAddr) -> Serve {
        Serve::start_with(
            upstream,
            &[envoy_filter("auth", "http_call", "")],
            &[("auth_cluster", auth)],
        )
    }

    /// As [`Serve::start`], with the corpus's `grpc_stream` streaming to `grpc` (its
    /// `grpc_cluster`).
    fn streaming_grpc(upstream: SocketAddr, grpc: &GrpcUpstream) -> Serve {
        Serve::start_with(
            upstream,
            &[envoy_filter("stream", "grpc_stream", "")],
            &[("grpc_cluster", grpc.address)],
        )
    }

    /// As [`Serve::start`], with more fields (YAML lines) for the listener.
    fn start_with_fields(upstream: SocketAddr, fields: &str, filters: &[String]) -> Serve {
        Serve::start_configured(upstream, fields, filters, &[])
    }

    fn start_configured(
        upstream: SocketAddr,
        fields: &str,
        filters: &[String],
        clusters: &[(&str, SocketAddr)],
    ) -> Serve {
        Serve::start_configured_raw(upstream, fields, filters, &cluster_lines(clusters))
    }

    /// As [`Serve::start_with`], on one worker: every stream reaches the same VM copy of each
    /// plugin (Pingora runs an HTTP/2 connection's streams on any worker).
    fn start_with_one_worker(
        upstream: SocketAddr,
        filters: &[String],
        clusters: &[(&str, SocketAddr)],
    ) -> Serve {
        Serve::start_on_workers(1, upstream, "", filters, &cluster_lines(clusters))
    }

    /// As [`Serve::start_configured`], with the clusters beside `backend` as YAML lines.
    fn start_configured_raw(
        upstream: SocketAddr,
        fields: &str,
        filters: &[String],
        clusters: &str,
    ) -> Serve {
        Serve::start_on_workers(2, upstream, fields, filters, clusters)
    }

    /// As [`Serve::start_configured_raw`], with `workers` worker threads.
    fn start_on_workers(
        workers: usize,
        upstream: SocketAddr,
        fields: &str,
        filters: &[String],
        clusters: &str,
    ) -> Serve {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = free_port();
        let admin_port = free_port();
        let config = format!(
            "workers: {workers}\nadmin: {{address: 127.0.0.1:{admin_port}}}\nlisteners:\n  - name: main\n    address: 127.0.0.1:{port}\n{fields}    \
             routes: [{{prefix: /, cluster: backend}}]\n    http_filters:\n{}\
             clusters:\n  backend: {{endpoints: [\"{upstream}\"], connect_timeout: 1s, \
             request_timeout: 5s}}\n{}",
            filters.concat(),
            clusters
        );
        Serve::launch(dir, port, admin_port, &config)
    }

    /// Starts the proxy with `filters` in front of the gRPC server `upstream` (an HTTP/2
    /// cluster).
    fn in_front_of_grpc(upstream: &GrpcUpstream, filters: &[String]) -> Serve {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (port, admin_port) = (free_port(), free_port());
        let config = format!(
            "admin: {{address: 127.0.0.1:{admin_port}}}\nlisteners:\n  - name: main\n    \
             address: 127.0.0.1:{port}\n    routes: [{{prefix: /, cluster: grpc}}]\n    \
             http_filters:\n{}clusters:\n  grpc: {{endpoints: [\"{}\"], http2: true}}\n",
            filters.concat(),
            upstream.address
        );
        Serve::launch(dir, port, admin_port, &config)
    }

    /// Starts the proxy with the configuration `config`, whose first listener is on `port`
    /// and admin listener on `admin_port`.
    fn launch(dir: tempfile::TempDir, port: u16, admin_port: u16, config: &str) -> Serve {
        Serve::launch_listening(dir, &[port], admin_port, config)
    }

    /// Starts `pwhost serve` with `config` and waits until each of `ports` (the first being
    /// [`Serve::url`]'s) and the admin listen.
    fn launch_listening(
        dir: tempfile::TempDir,
        ports: &[u16],
        admin_port: u16,
        config: &str,
    ) -> Serve {
        Serve::launch_then(dir, ports, admin_port, config, |_| {})
    }

    /// As [`Serve::launch_listening`], running `while_loading` once the process runs, before
    /// its listeners are waited for.
    fn launch_then(
        dir: tempfile::TempDir,
        ports: &[u16],
        admin_port: u16,
        config: &str,
        while_loading: impl FnOnce(&Serve),
    ) -> Serve {
        let port = ports[0];
        let config_path = dir.path().join("serve.yaml");
        std::fs::write(&config_path, config).expect("the configuration");
        let log = dir.path().join("serve.log");
        // No disk cache: the user's would be written to, and compiled code from another run
        // could hide a compilation problem.
        let child = Command::new(env!("CARGO_BIN_EXE_pwhost"))
            .args(["serve", "--no-cache", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("the log file"))
            .spawn()
            .expect("pwhost starts");
        let serve = Serve {
            _dir: dir,
            port,
            admin_port,
            config: config_path,
            child,
            log,
        };
        while_loading(&serve);
        // Pingora starts its listeners one after another, so the test waits for each (every
        // configuration here has an admin).
        let deadline = Instant::now() + Duration::from_secs(30);
        for &listening in ports.iter().chain([&admin_port]) {
            wait_for_listener(listening, deadline, || serve.log());
        }
        serve
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most 10 s) until no plugin stream or connection context is live: a stream's
    /// contexts end just after its client has its answer.
    fn wait_for_no_live_contexts(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let metrics = get(&self.admin_url("/stats/prometheus"), &[]).body;
            if sample(&metrics, "pwhost_live_stream_contexts") == Some(0.0) {
                return;
            }
            assert!(Instant::now() < deadline, "contexts left live:\n{metrics}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most 20 s) until each metric sample of `expected` (name with labels, value)
    /// is the admin listener's.
    fn wait_for_samples(&self, expected: &[(&str, f64)]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let metrics = get(&self.admin_url("/stats/prometheus"), &[]).body;
            if expected
                .iter()
                .all(|(name, value)| sample(&metrics, name) == Some(*value))
            {
                return;
            }
            assert!(Instant::now() < deadline, "not {expected:?} in:\n{metrics}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (at most 10 s) until the log contains `text`.
    fn wait_for_log(&self, text: &str) {
        self.wait_for_log_count(text, 1);
    }

    /// Waits (at most 10 s) until the log contains `text` `count` times.
    fn wait_for_log_count(&self, text: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log().matches(text).count() < count {
            assert!(
                Instant::now() < deadline,
                "not {count} times {text:?} in:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
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

fn send(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> Reply {
    assert_eq!(method, if body.is_some() { "POST" } else { "GET" });
    try_send(url, headers, body).unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// `POST` with `body`, or `GET` without one, on a connection of its own; or why it failed (no
/// panic: for client threads).
fn try_send(url: &str, headers: &[(&str, &str)], body: Option<&str>) -> Result<Reply, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into();
    let response = match body {
        Some(body) => {
            let mut request = agent.post(url);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            request.send(body)
        }
        None => {
            let mut request = agent.get(url);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            request.call()
        }
    }
    .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = response
        .into_body()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    send("GET", url, headers, None)
}

#[test]
fn a_chain_of_two_plugins_rewrites_headers_both_ways_and_answers_locally() {
    let origin = Origin::start();
    let serve = Serve::start(
        origin.address,
        &[
            envoy_filter("headers", "http_headers", ""),
            envoy_filter("api_key", "local_response", "secret"),
        ],
    );
    let reply = get(
        &serve.url("/hello?x=1"),
        &[
            ("x-api-key", "secret"),
            ("user-agent", "curl/8"),
            ("x-remove-me", "1"),
        ],
    );
    assert_eq!(reply.status, 200, "{}", serve.log());
    // The request as the origin saw it: the first plugin's edits.
    assert!(reply.body.starts_with("GET /hello?x=1\n"), "{}", reply.body);
    assert!(
        reply.body.contains("x-pwhost-plugin: http_headers"),
        "{}",
        reply.body
    );
    assert!(
        reply.body.contains("user-agent: pwhost-test"),
        "{}",
        reply.body
    );
    assert!(!reply.body.contains("x-remove-me"), "{}", reply.body);
    // The response as the client sees it.
    assert_eq!(reply.header("x-powered-by"), Some("pwhost"));
    assert_eq!(reply.header("server"), None);

    // The second plugin answers without the key; the reply still goes back through the first
    // plugin's response callback, and the origin never sees the request.
    let before = origin.requests.load(Ordering::Relaxed);
    let denied = get(&serve.url("/secret"), &[]);
    assert_eq!(denied.status, 403);
    assert_eq!(denied.body, "access denied\n");
    assert_eq!(denied.header("x-powered-by"), Some("pwhost"));
    assert_eq!(origin.requests.load(Ordering::Relaxed), before);
    // `proxy_on_log` reads the request headers.
    serve.wait_for_log("done: /secret");
}

#[test]
fn bodies_are_rewritten_on_the_way_up_and_down() {
    let origin = Origin::start();
    let serve = Serve::start(
        origin.address,
        &[envoy_filter("bodies", "body_rewrite", "")],
    );
    let reply = send("POST", &serve.url("/upload"), &[], Some("hello world"));
    assert_eq!(reply.status, 200, "{}", serve.log());
    assert_eq!(*origin.last_body.lock().unwrap(), "HELLO WORLD");
    // The origin's echo of the (upper-cased) body, then its greeting rewritten.
    assert!(reply.body.contains("HELLO WORLD"), "{}", reply.body);
    assert!(
        reply.body.ends_with("howdy from origin\n"),
        "{}",
        reply.body
    );
}

#[test]
fn an_unreachable_upstream_is_a_503_and_a_trapping_plugin_fails_closed() {
    let closed = free_port();
    let serve = Serve::start(
        ([127, 0, 0, 1], closed).into(),
        &[
            envoy_filter("headers", "http_headers", ""),
            envoy_filter("panics", "panics", ""),
        ],
    );
    let reply = get(&serve.url("/nowhere"), &[]);
    assert_eq!(reply.status, 503, "{}", serve.log());
    // The plugins saw the stream to its end.
    assert_eq!(reply.header("x-powered-by"), Some("pwhost"));
    serve.wait_for_log("done: /nowhere");

    let trapped = get(&serve.url("/"), &[("x-panic", "boom")]);
    assert_eq!(trapped.status, 503);
    serve.wait_for_log("pwhost test panic: boom");
    // The 503 is the plugin's failure policy (closed), not the unreachable upstream's: failing
    // open would have been counted as a bypass.
    let streams = |outcome: &str| {
        format!(
            "pwhost_plugin_streams_total{{listener=\"main\",plugin=\"panics\",outcome=\"{outcome}\"}}"
        )
    };
    serve.wait_for_samples(&[(&streams("failed_by_trap"), 1.0), (&streams("closed"), 1.0)]);
    let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
    assert_eq!(
        sample(&metrics, &streams("bypassed")).unwrap_or(0.0),
        0.0,
        "{metrics}"
    );
}

#[test]
fn a_paused_request_waits_for_an_http_call_and_timers_tick_on_every_worker() {
    let origin = Origin::start();
    let auth = Origin::answering_with(&[("x-auth-user", "alice")]);
    let serve = Serve::start_with(
        origin.address,
        &[
            envoy_filter("auth", "http_call", ""),
            envoy_filter("timers", "timers", ""),
        ],
        &[("auth_cluster", auth.address)],
    );
    // The plugin holds the request, asks the auth server, and lets it go on with the answer.
    let reply = get(&serve.url("/account"), &[]);
    assert_eq!(reply.status, 200, "{}", serve.log());
    assert!(reply.body.contains("x-auth-user: alice"), "{}", reply.body);
    assert_eq!(auth.requests.load(Ordering::Relaxed), 1);
    assert!(auth.last_body.lock().unwrap().is_empty());
    // Each worker's copy of the timer plugin ticks, three times, once made (on the worker's
    // first stream; connections go to the workers at random): requests go on until `tick 3`
    // came from both workers.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = serve.log();
        let workers: std::collections::BTreeSet<&str> = log
            .lines()
            .filter(|line| line.contains("tick 3"))
            .filter_map(|line| line.split("ThreadId(").nth(1)?.split(')').next())
            .collect();
        if workers.len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "ticks on {workers:?}:\n{log}");
        let _ = try_get(&serve.url("/again"), &[]);
        std::thread::sleep(Duration::from_millis(100));
    }
    // The call's latency, by kind, cluster and outcome.
    let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
    let calls = "pwhost_callout_duration_seconds_count{kind=\"http\",cluster=\"auth_cluster\",\
                 outcome=\"answered\"}";
    let answered = auth.requests.load(Ordering::Relaxed) as f64;
    assert_eq!(sample(&metrics, calls), Some(answered), "{metrics}");
}

#[test]
fn an_item_a_stream_enqueues_reaches_the_worker_copy_that_registered_the_queue() {
    let origin = Origin::start();
    // Each worker's copy of the filter registers queue `events` as it starts (the last to
    // register owns the notifications, as in Envoy); every request enqueues its path, and the
    // owner's root context, on its worker, dequeues and logs each item.
    let serve = Serve::start(origin.address, &[envoy_filter("queue", "shared_queue", "")]);
    let paths: Vec<String> = (1..=4).map(|n| format!("/queued-{n}")).collect();
    for path in &paths {
        let reply = get(&serve.url(path), &[]);
        assert_eq!(reply.status, 200, "{}", serve.log());
        assert!(
            reply.body.contains(&format!("x-enqueued: {path}")),
            "{}",
            reply.body
        );
        // One at a time, so that each item is delivered before another copy may register.
        serve.wait_for_log(&format!("dequeued: {path}"));
    }
    // Time for a duplicate to show, were any delivered twice.
    std::thread::sleep(Duration::from_millis(300));
    let log = serve.log();
    assert_eq!(
        log.matches("dequeued: ").count(),
        paths.len(),
        "each item delivered once:\n{log}"
    );
    // Each item came to the copy that registered the queue last before it, on that copy's
    // worker.
    let thread = |line: &str| {
        line.split("ThreadId(")
            .nth(1)?
            .split(')')
            .next()
            .map(str::to_string)
    };
    let mut owner = None;
    for line in log.lines() {
        if line.contains("registered queue events") {
            owner = thread(line);
        } else if line.contains("dequeued: ") {
            assert!(
                owner.is_some() && thread(line) == owner,
                "{line} (owner {owner:?}):\n{log}"
            );
        }
    }
}

#[test]
fn a_plugin_that_refills_its_own_queue_does_not_freeze_its_worker() {
    let origin = Origin::start();
    // `queue_echo` enqueues an item when configured and enqueues it again from every
    // `proxy_on_queue_ready`: its worker is woken again at once, every time, for as long as the
    // proxy runs. The worker's streams must still be served between the deliveries.
    let echo = corpus_plugin("wat/queue_echo");
    let serve = Serve::start(
        origin.address,
        &[
            format!(
                "      - name: echo\n        vm_config: {{runtime: wasmtime, code: {{local: \
                 {{filename: {}}}}}}}\n",
                echo.display()
            ),
            envoy_filter("headers", "http_headers", ""),
        ],
    );
    for _ in 0..8 {
        let reply = try_get(&serve.url("/while-echoing"), &[]).unwrap_or_else(|e| {
            let log = serve.log();
            panic!("{e}\n{}", &log[log.len().saturating_sub(4000)..])
        });
        assert_eq!(reply.status, 200);
    }
    assert!(serve.log().matches("ready").count() >= 2, "no deliveries");
}

#[test]
fn a_call_to_an_unreachable_cluster_fails_and_the_plugin_answers_itself() {
    let origin = Origin::start();
    let closed = free_port();
    let serve = Serve::gated_by_http_call(origin.address, ([127, 0, 0, 1], closed).into());
    let reply = get(&serve.url("/account"), &[]);
    assert_eq!(reply.status, 503, "{}", serve.log());
    assert_eq!(reply.body, "auth callout failed\n");
    assert_eq!(origin.requests.load(Ordering::Relaxed), 0);
}

#[test]
fn a_trap_in_a_calls_answer_fails_the_stream_and_is_counted_by_its_cause() {
    let origin = Origin::start();
    let auth = Origin::answering_with(&[("x-panic", "1")]);
    let serve = Serve::gated_by_http_call(origin.address, auth.address);
    // FAIL_CLOSED: the held request gets a 503.
    assert_eq!(
        get(&serve.url("/account"), &[]).status,
        503,
        "{}",
        serve.log()
    );
    serve.wait_for_samples(&[(
        "pwhost_plugin_streams_total{listener=\"main\",plugin=\"auth\",outcome=\"failed_by_trap\"}",
        1.0,
    )]);
    assert_eq!(origin.requests.load(Ordering::Relaxed), 0);
}

#[test]
fn a_call_answered_after_an_interim_answer_gets_the_final_one() {
    let origin = Origin::start();
    let auth = Misbehaving::start(Misbehaviour::Interim);
    let serve = Serve::gated_by_http_call(origin.address, auth.address);
    let reply = get(&serve.url("/account"), &[]);
    assert_eq!(reply.status, 200, "{}", serve.log());
    assert!(reply.body.contains("x-auth-user: alice"), "{}", reply.body);
}

#[test]
fn a_call_whose_answer_never_ends_fails_at_the_timeout_and_is_cut_off() {
    let origin = Origin::start();
    let endless = Misbehaving::start(Misbehaviour::Endless);
    let serve = Serve::gated_by_http_call(origin.address, endless.address);
    // The plugin waits 5 s for the answer, then answers itself.
    let reply = get(&serve.url("/account"), &[]);
    assert_eq!(reply.status, 503, "{}", serve.log());
    assert_eq!(reply.body, "auth callout failed\n");
    // And the upstream's connection is not read any further.
    assert!(
        endless.ended_within(Duration::from_secs(5)),
        "the endless answer was still being read 5 s after the timeout\n{}",
        serve.log()
    );
    assert_eq!(origin.requests.load(Ordering::Relaxed), 0);
}

/// An HTTP/2 upstream without TLS (hyper's server) answering every request 200 with
/// `x-auth-user: alice`, body `ok` and trailer `x-check: passed`.
fn trailing_upstream() -> Background {
    Background::start(move |listener, mut stopped| async move {
        loop {
            let Some(stream) = next_connection(&listener, &mut stopped).await else {
                return;
            };
            let service = hyper::service::service_fn(|_request| async {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("x-check", http::HeaderValue::from_static("passed"));
                let frames: Vec<
                    Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
                > = vec![
                    Ok(hyper::body::Frame::data(bytes::Bytes::from_static(b"ok"))),
                    Ok(hyper::body::Frame::trailers(trailers)),
                ];
                let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
                let mut response = http::Response::new(body);
                response
                    .headers_mut()
                    .insert("x-auth-user", http::HeaderValue::from_static("alice"));
                Ok::<_, std::convert::Infallible>(response)
            });
            tokio::spawn(async move {
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    })
}

/// A call's answer over HTTP/2 brings its trailers to the plugin; a call with request trailers,
/// which Pingora's client cannot send, is refused (`BAD_ARGUMENT`) rather than sent without them.
#[test]
fn an_http_calls_answer_trailers_reach_the_plugin_and_request_trailers_are_refused() {
    let origin = Origin::start();
    let upstream = trailing_upstream();
    let serve = Serve::start_configured_raw(
        origin.address,
        "",
        &[envoy_filter("auth", "http_call", "")],
        &format!(
            "  auth_cluster: {{endpoints: [\"{}\"], http2: true}}\n",
            upstream.address
        ),
    );
    let reply = get(&serve.url("/account"), &[]);
    assert_eq!(reply.status, 200, "{}\n{}", reply.body, serve.log());
    assert!(reply.body.contains("x-auth-user: alice"), "{}", reply.body);
    assert!(
        reply.body.contains("x-auth-trailer-x-check: passed"),
        "{}\n{}",
        reply.body,
        serve.log()
    );
    let reply = get(&serve.url("/account"), &[("x-call-trailer", "t")]);
    assert_eq!(reply.status, 503, "{}\n{}", reply.body, serve.log());
    assert_eq!(reply.body, "auth callout failed\n");
    serve.wait_for_log("an HTTP call with request trailers is refused (BAD_ARGUMENT)");
    assert_eq!(origin.requests.load(Ordering::Relaxed), 1);
}

/// A plugin opening calls without end (none answered: the cluster never accepts them) is
/// refused once its VM copy has 1024 open, as Envoy's circuit breaker refuses one, with a
/// warning; the proxy goes on answering.
#[test]
fn a_plugin_opening_calls_without_end_is_refused_past_1024_open() {
    let origin = Origin::start();
    // Never accepts: the calls stay open (they have no timeout).
    let silent = TcpListener::bind("127.0.0.1:0").expect("a listener that never accepts");
    let serve = Serve::start_with(
        origin.address,
        &[envoy_filter("flood", "wat/call_flood", "")],
        &[("cluster", silent.local_addr().expect("its address"))],
    );
    let reply = get(&serve.url("/flood"), &[]);
    assert_eq!(reply.status, 200, "{}", serve.log());
    assert_eq!(reply.body, "opened 1024, then status 10", "{}", serve.log());
    serve.wait_for_log(
        "this VM has 1024 HTTP or gRPC calls open: more are refused (INTERNAL_FAILURE)",
    );
    // Another request is answered as well (by this copy, refused at once, or another's).
    let again = get(&serve.url("/flood"), &[]);
    assert_eq!(again.status, 200, "{}", serve.log());
    assert!(again.body.ends_with("then status 10"), "{}", again.body);
    assert_eq!(origin.requests.load(Ordering::Relaxed), 0);
}

/// A call's answer over 16 MiB (announced by its length or not) or cut short of its length
/// fails the call, with a warning saying why, and the upstream is not read to the end.
#[test]
fn a_calls_answer_over_16_mib_or_cut_short_fails_the_call() {
    let origin = Origin::start();
    let cases = [
        (
            Misbehaviour::Large {
                bytes: 32 << 20,
                announced: true,
            },
            "an HTTP call's answer is over 16 MiB: failed",
        ),
        (
            Misbehaviour::Large {
                bytes: 32 << 20,
                announced: false,
            },
            "an HTTP call's answer is over 16 MiB: failed",
        ),
        (
            Misbehaviour::CutMidBody,
            "an HTTP call's answer was cut short: failed",
        ),
        (
            Misbehaviour::CutMidChunks,
            "an HTTP call's answer was cut short: failed",
        ),
    ];
    // A `HEAD` to a large resource is answered: its length announces a body that never comes.
    let large = Misbehaving::start(Misbehaviour::Large {
        bytes: 32 << 20,
        announced: true,
    });
    let serve = Serve::gated_by_http_call(origin.address, large.address);
    let reply = get(&serve.url("/account"), &[("x-call-head", "1")]);
    assert_eq!(reply.status, 200, "{}\n{}", reply.body, serve.log());
    drop(serve);
    for (misbehaviour, warning) in cases {
        let upstream = Misbehaving::start(misbehaviour);
        let serve = Serve::gated_by_http_call(origin.address, upstream.address);
        let reply = get(&serve.url("/account"), &[]);
        assert_eq!(reply.status, 503, "{misbehaviour:?}: {}", serve.log());
        assert_eq!(reply.body, "auth callout failed\n", "{misbehaviour:?}");
        serve.wait_for_log(warning);
        assert!(
            upstream.ended_within(Duration::from_secs(5)),
            "{misbehaviour:?}: the answer was still being read\n{}",
            serve.log()
        );
    }
    // Only the request whose call was a `HEAD` went on.
    assert_eq!(origin.requests.load(Ordering::Relaxed), 1);
}

#[test]
fn http2_clients_without_tls_are_served_through_the_same_chain() {
    let origin = Origin::start();
    let serve = Serve::start(
        origin.address,
        &[envoy_filter("headers", "http_headers", "")],
    );
    let output = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-D",
            "-",
            "-H",
            "x-remove-me: 1",
        ])
        .arg(serve.url("/h2"))
        .output()
        .expect("curl runs (apt-get install curl)");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}\n{}", serve.log());
    assert!(text.starts_with("HTTP/2 200"), "{text}");
    assert!(text.contains("x-powered-by: pwhost"), "{text}");
    assert!(text.contains("x-pwhost-plugin: http_headers"), "{text}");
    assert!(!text.contains("x-remove-me"), "{text}");
    serve.wait_for_log("done: /h2");
}

/// A route with a `host` takes the requests for that host, whatever the case and port the
/// client wrote it with: HTTP/1.1's `Host`, HTTP/2's `:authority`; other hosts go on to the
/// next route.
#[test]
fn a_route_for_a_host_takes_that_hosts_requests_in_http1_and_http2() {
    let origin = Origin::start();
    let api = Origin::answering_with(&[("x-origin", "api")]);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (port, admin_port) = (free_port(), free_port());
    let config = format!(
        "workers: 1\nadmin: {{address: 127.0.0.1:{admin_port}}}\nlisteners:\n  - name: main\n    \
         address: 127.0.0.1:{port}\n    routes: [{{host: api.example, cluster: api}}, \
         {{prefix: /, cluster: backend}}]\n    http_filters:\n{}clusters:\n  \
         backend: {{endpoints: [\"{}\"]}}\n  api: {{endpoints: [\"{}\"]}}\n",
        envoy_filter("headers", "http_headers", ""),
        origin.address,
        api.address
    );
    let serve = Serve::launch(dir, port, admin_port, &config);
    // Written by hand: an HTTP client library sets `Host` from the URL.
    let http1 = |host: &str| {
        use std::io::{Read, Write};
        let mut connection = TcpStream::connect(("127.0.0.1", port)).expect("connects");
        let _ = connection.set_read_timeout(Some(Duration::from_secs(10)));
        let request = format!("GET /h1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        connection.write_all(request.as_bytes()).expect("sent");
        let mut received = Vec::new();
        let _ = connection.read_to_end(&mut received);
        String::from_utf8_lossy(&received).to_ascii_lowercase()
    };
    let to_api = http1("API.Example:8080");
    assert!(to_api.starts_with("http/1.1 200"), "{to_api}");
    assert!(to_api.contains("x-origin: api"), "{to_api}");
    let elsewhere = http1("www.example");
    assert!(elsewhere.starts_with("http/1.1 200"), "{elsewhere}");
    assert!(!elsewhere.contains("x-origin"), "{elsewhere}");
    let http2 = |host: &str| {
        let output = Command::new("curl")
            .args([
                "-sS",
                "--http2-prior-knowledge",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "-H",
            ])
            .arg(format!("host: {host}"))
            .arg(serve.url("/h2"))
            .output()
            .expect("curl runs (apt-get install curl)");
        assert!(output.status.success(), "{}", serve.log());
        String::from_utf8_lossy(&output.stdout).to_ascii_lowercase()
    };
    let to_api = http2("api.example");
    assert!(to_api.starts_with("http/2 200"), "{to_api}");
    assert!(to_api.contains("x-origin: api"), "{to_api}");
    assert!(!http2("www.example").contains("x-origin"));
    assert_eq!(api.requests.load(Ordering::Relaxed), 2);
    assert_eq!(origin.requests.load(Ordering::Relaxed), 2);
}

/// With `--cache-dir`, the compiled code of one start is the next start's: the log says
/// how each plugin's code was made ready.
#[test]
fn a_second_start_with_a_cache_directory_skips_compiling() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let cache = dir.path().join("cache");
    let config = dir.path().join("serve.yaml");
    let text = format!(
        "workers: 1\nlisteners:\n  - name: main\n    address: 127.0.0.1:{}\n    \
         routes: [{{cluster: backend}}]\n    http_filters:\n{}clusters:\n  \
         backend: {{endpoints: [\"127.0.0.1:1\"]}}\n",
        free_port(),
        envoy_filter("headers", "http_headers", "")
    );
    std::fs::write(&config, text).expect("the configuration");
    let start = |run: &str| -> String {
        let log = dir.path().join(format!("{run}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_pwhost"))
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--cache-dir")
            .arg(&cache)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("the log file"))
            .spawn()
            .expect("pwhost starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("plugin loaded") || Instant::now() > deadline {
                break text;
            }
            if let Ok(Some(exit)) = child.try_wait() {
                panic!("{run} start ended ({exit}):\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
        text
    };
    let loaded = |log: &str| {
        log.lines()
            .find(|line| line.contains("plugin loaded"))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no plugin loaded:\n{log}"))
    };
    let first = loaded(&start("first"));
    assert!(first.contains("compiled_from=\"bytecode\""), "{first}");
    assert!(first.contains("runtime=\"wasmtime\""), "{first}");
    let second = loaded(&start("second"));
    assert!(
        second.contains("compiled_from=\"compilation_cache\""),
        "{second}"
    );
}

/// A continue names the side it continues: a plugin holding the response that continues the
/// *request* (from a call's answer) leaves the response held, as in Envoy, until the stream's
/// idle timeout (408), instead of sending a response it never approved.
#[test]
fn continuing_the_request_does_not_release_a_held_response() {
    let origin = Origin::start();
    let auth = Origin::start();
    let plugin = corpus_plugin("wat/continue_other_side");
    let serve = Serve::start_configured(
        origin.address,
        "    stream_idle_timeout: 1s\n",
        &[format!(
            "      - name: other_side\n        vm_config: {{runtime: wasmtime, code: {{local: \
             {{filename: {}}}}}}}\n",
            plugin.display()
        )],
        &[("auth_cluster", auth.address)],
    );
    let reply = get(&serve.url("/held"), &[]);
    assert_eq!(reply.status, 408, "{}", serve.log());
    assert_eq!(
        auth.requests.load(Ordering::Relaxed),
        1,
        "the call was answered"
    );
}

/// A plugin that gives a chunked request a `Content-Length` does not send the upstream both
/// framings (the shape requests are smuggled in): the body goes chunked, whole.
#[test]
fn a_request_never_goes_upstream_with_two_framings() {
    let origin = Origin::start();
    let serve = Serve::start(
        origin.address,
        &[plugin_block(
            "length",
            "plugin_config",
            r#"{"header": "content-length", "value": "3"}"#,
            &[],
        )],
    );
    use std::io::Write;
    let mut client = TcpStream::connect(("127.0.0.1", serve.port)).expect("the proxy accepts");
    client
        .write_all(
            b"POST /framed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
              Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        .expect("the request");
    let (received, _) = read_until_closed(&mut client, Duration::from_secs(15));
    let answer = String::from_utf8_lossy(&received).to_ascii_lowercase();
    assert!(
        answer.starts_with("http/1.1 200"),
        "{answer}\n{}",
        serve.log()
    );
    assert!(answer.contains("transfer-encoding: chunked"), "{answer}");
    assert!(!answer.contains("content-length: 3"), "{answer}");
    assert_eq!(*origin.last_body.lock().unwrap(), "hello");
}

/// A client that stops sending its body is answered 408 at the stream's idle timeout, as
/// Envoy answers a stream idle past its timeout (it was a 504, the upstream's timeout).
#[test]
fn a_client_that_stops_sending_its_body_gets_a_408() {
    use std::io::Write;
    let origin = Origin::start();
    let serve = Serve::start_with_fields(
        origin.address,
        "    stream_idle_timeout: 1s\n",
        &[envoy_filter("headers", "http_headers", "")],
    );
    let mut client = TcpStream::connect(("127.0.0.1", serve.port)).expect("the proxy accepts");
    let _ = client.set_read_timeout(Some(Duration::from_secs(15)));
    // Past what the proxy reads ahead, so that the rest is read on the upstream's way.
    client
        .write_all(b"POST /stalled-body HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n")
        .expect("the request headers");
    client
        .write_all(&vec![b'a'; 150_000])
        .expect("most of the body");
    let (received, _) = read_until_closed(&mut client, Duration::from_secs(15));
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "{text:?}\n{}",
        serve.log()
    );
}

/// A plugin failed open while it buffered a body (its VM failed by another stream's trap while
/// a later plugin held the stream) is bypassed from then on, but what it had buffered still
/// goes on, before the rest: nothing the client sent is lost.
#[test]
fn a_plugin_bypassed_while_it_buffered_passes_on_what_it_kept() {
    use std::io::{Read, Write};
    let origin = Origin::start();
    // The gate's calls are answered by hand, once the test is ready.
    let auth = TcpListener::bind("127.0.0.1:0").expect("a listener");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (port, admin_port) = (free_port(), free_port());
    let buffer = corpus_plugin("wat/buffer_or_trap");
    // One worker: the trapping request fails the same VM copy the held one buffered in.
    let config = format!(
        "workers: 1\nadmin: {{address: 127.0.0.1:{admin_port}}}\nlisteners:\n  - name: main\n    \
         address: 127.0.0.1:{port}\n    routes: [{{cluster: backend}}]\n    http_filters:\n      \
         - name: buffer\n        vm_config: {{runtime: wasmtime, code: {{local: {{filename: {}}}}}}}\n        \
         failure_policy: FAIL_OPEN\n{}clusters:\n  backend: {{endpoints: [\"{}\"]}}\n  \
         auth_cluster: {{endpoints: [\"{}\"]}}\n",
        buffer.display(),
        envoy_filter_with("gate", "http_call", "", "allow_on_headers_stop_iteration: true"),
        origin.address,
        auth.local_addr().expect("its address")
    );
    let serve = Serve::launch(dir, port, admin_port, &config);
    // The held request: its headers wait for the gate's call; its first chunk reaches the
    // buffering plugin meanwhile (the gate lets the body come while it holds the headers).
    let mut held = TcpStream::connect(("127.0.0.1", port)).expect("the proxy accepts");
    let _ = held.set_read_timeout(Some(Duration::from_secs(15)));
    held.write_all(
        b"POST /kept HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\r\n5\r\nhello\r\n",
    )
    .expect("the head and a first chunk");
    let (mut call, _) = auth.accept().expect("the gate's call");
    let _ = call.set_read_timeout(Some(Duration::from_secs(10)));
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") && call.read(&mut byte).is_ok_and(|n| n == 1) {
        request.push(byte[0]);
    }
    // Time for the first chunk to reach the buffering plugin.
    std::thread::sleep(Duration::from_millis(300));
    // Another request traps the buffering plugin's VM copy (it fails open: bypassed).
    let mut trapping = TcpStream::connect(("127.0.0.1", port)).expect("the proxy accepts");
    trapping
        .write_all(b"GET /trap HTTP/1.1\r\nHost: x\r\nx-trap: 1\r\nConnection: close\r\n\r\n")
        .expect("the trapping request");
    serve.wait_for_samples(&[(
        "pwhost_plugin_streams_total{listener=\"main\",plugin=\"buffer\",outcome=\"failed_by_trap\"}",
        1.0,
    )]);
    // The gate lets the held request go; the rest of its body follows.
    call.write_all(b"HTTP/1.1 200 OK\r\nx-auth-user: alice\r\ncontent-length: 0\r\n\r\n")
        .expect("the call's answer");
    held.write_all(b"5\r\nworld\r\n0\r\n\r\n")
        .expect("the rest of the body");
    let (received, _) = read_until_closed(&mut held, Duration::from_secs(15));
    let answer = String::from_utf8_lossy(&received);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{answer}\n{}",
        serve.log()
    );
    assert_eq!(
        *origin.last_body.lock().unwrap(),
        "helloworld",
        "{}",
        serve.log()
    );
    drop(trapping);
}

#[test]
fn an_upstream_that_does_not_answer_in_time_is_a_504_and_the_plugins_see_it() {
    // Accepts connections (the kernel does) but never answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("a listener");
    let serve = Serve::start(
        silent.local_addr().expect("its address"),
        &[envoy_filter("headers", "http_headers", "")],
    );
    let started = Instant::now();
    let reply = get(&serve.url("/slow"), &[]);
    assert_eq!(reply.status, 504, "{}", serve.log());
    // The cluster's request timeout is 5 s.
    assert!(started.elapsed() >= Duration::from_millis(4900));
    assert_eq!(reply.header("x-powered-by"), Some("pwhost"));
    serve.wait_for_log("done: /slow");
}

#[test]
fn the_admin_listener_shows_plugin_and_proxy_metrics_readiness_and_the_configuration() {
    let origin = Origin::start();
    let serve = Serve::start(origin.address, &[envoy_filter("metrics", "metrics", "")]);
    for _ in 0..3 {
        assert_eq!(get(&serve.url("/"), &[]).status, 200, "{}", serve.log());
    }
    // The plugin's counter, gauge and histogram (Envoy's names), and the proxy's own counts;
    // responses are counted once logged, just after they went out.
    let expected = [
        "envoy_wasmcustom_requests_total 3",
        "envoy_wasmcustom_active_requests 0",
        "envoy_wasmcustom_request_header_count_count 3",
        "pwhost_requests_total{listener=\"main\"} 3",
        "pwhost_responses_total{listener=\"main\",code=\"200\"} 3",
        "pwhost_plugin_streams_total{listener=\"main\",plugin=\"metrics\",outcome=\"closed\"} 0",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = get(&serve.admin_url("/stats/prometheus"), &[]);
        assert_eq!(metrics.status, 200);
        let missing: Vec<_> = expected
            .iter()
            .filter(|line| !metrics.body.lines().any(|l| l == **line))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing {missing:?} in:\n{}",
            metrics.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // One VM copy per worker that served a stream (at most the two workers).
    let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
    let copies = sample(&metrics, "pwhost_vm_copies{owner=\"listener/main\"}");
    assert!(
        matches!(copies, Some(n) if (1.0..=2.0).contains(&n)),
        "{metrics}"
    );
    let ready = get(&serve.admin_url("/ready"), &[]);
    assert_eq!((ready.status, ready.body.as_str()), (200, "LIVE\n"));
    let config = get(&serve.admin_url("/config_dump"), &[]);
    assert!(
        config.body.contains("envoy.filters.http.wasm"),
        "{}",
        config.body
    );
    assert_eq!(get(&serve.admin_url("/nothing"), &[]).status, 404);
    // Reading is GET or HEAD, reloading is POST: any other method is 405, with `Allow`.
    for (request, allow) in [
        (
            &b"DELETE /config_dump HTTP/1.1\r\nhost: a\r\n\r\n"[..],
            "GET, HEAD",
        ),
        (
            b"PUT /ready HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n",
            "GET, HEAD",
        ),
        (b"GET /reload HTTP/1.1\r\nhost: a\r\n\r\n", "POST"),
    ] {
        let reply = raw_reply(serve.admin_port, request);
        assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
        assert!(
            reply
                .to_ascii_lowercase()
                .contains(&format!("allow: {}", allow.to_ascii_lowercase())),
            "{reply}"
        );
    }
}

/// Sends `request` on a connection of its own (closing after it) and returns everything the
/// proxy answered, as text.
fn raw_reply(port: u16, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut connection = TcpStream::connect(("127.0.0.1", port)).expect("connects");
    let _ = connection.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = connection.write_all(request);
    let _ = connection.shutdown(std::net::Shutdown::Write);
    let mut received = Vec::new();
    let _ = connection.read_to_end(&mut received);
    String::from_utf8_lossy(&received).into_owned()
}

#[test]
fn sighup_puts_new_chains_in_force_and_a_bad_configuration_is_refused() {
    let origin = Origin::start();
    let serve = Serve::start(
        origin.address,
        &[envoy_filter("api_key", "local_response", "first")],
    );
    assert_eq!(get(&serve.url("/"), &[("x-api-key", "first")]).status, 200);
    let text = std::fs::read_to_string(&serve.config).expect("the configuration");
    std::fs::write(
        &serve.config,
        text.replace("value: \"first\"", "value: \"second\""),
    )
    .expect("the changed configuration");
    let status = Command::new("kill")
        .args(["-HUP", &serve.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&serve.url("/"), &[("x-api-key", "second")]).status != 200 {
        assert!(Instant::now() < deadline, "not reloaded:\n{}", serve.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get(&serve.url("/"), &[("x-api-key", "first")]).status, 403);

    // A configuration that does not parse is refused; the one in force keeps serving.
    std::fs::write(&serve.config, "listeners: [").expect("a broken configuration");
    let refused = send("POST", &serve.admin_url("/reload"), &[], Some(""));
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(refused.body.contains("serve.yaml"), "{}", refused.body);
    assert_eq!(get(&serve.url("/"), &[("x-api-key", "second")]).status, 200);
    let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
    for line in [
        "pwhost_reloads_total{outcome=\"done\"} 1",
        "pwhost_reloads_total{outcome=\"refused\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    assert!(serve.log().contains("reload refused"), "{}", serve.log());
}

/// One request on an open HTTP/1.1 connection, and its response (head and body, as text),
/// read to its `Content-Length`.
fn on_connection(connection: &mut TcpStream, request: &str) -> String {
    use std::io::{Read, Write};
    connection.write_all(request.as_bytes()).expect("sent");
    let mut received = Vec::new();
    let mut byte = [0u8; 1];
    while !received.ends_with(b"\r\n\r\n") {
        match connection.read(&mut byte) {
            Ok(1) => received.push(byte[0]),
            _ => panic!(
                "the connection ended: {:?}",
                String::from_utf8_lossy(&received)
            ),
        }
    }
    let head = String::from_utf8_lossy(&received).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    let mut body = vec![0u8; length];
    connection.read_exact(&mut body).expect("the body");
    head + &String::from_utf8_lossy(&body)
}

/// A reload that leaves a listener listening as it did keeps its connections: the next
/// request on a kept-alive connection runs the new chain.
#[test]
fn a_kept_alive_connection_goes_on_across_a_reload_with_the_new_chain() {
    let origin = Origin::start();
    let serve = Serve::start(
        origin.address,
        &[envoy_filter("api_key", "local_response", "first")],
    );
    let mut connection = TcpStream::connect(("127.0.0.1", serve.port)).expect("connects");
    let _ = connection.set_read_timeout(Some(Duration::from_secs(10)));
    let request = |key: &str| format!("GET / HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\n\r\n");
    let first = on_connection(&mut connection, &request("first"));
    assert!(first.starts_with("http/1.1 200"), "{first}");
    let text = std::fs::read_to_string(&serve.config).expect("the configuration");
    std::fs::write(
        &serve.config,
        text.replace("value: \"first\"", "value: \"second\""),
    )
    .expect("the changed configuration");
    let reloaded = send("POST", &serve.admin_url("/reload"), &[], Some(""));
    assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    let second = on_connection(&mut connection, &request("second"));
    assert!(
        second.starts_with("http/1.1 200"),
        "{second}\n{}",
        serve.log()
    );
    let refused = on_connection(&mut connection, &request("first"));
    assert!(refused.starts_with("http/1.1 403"), "{refused}");
}

/// A configuration of one worker (so the admin listener has one thread) whose listener runs
/// `local_response` with API key `key`, its code from `code` (a `vm_config.code` block).
fn one_worker_api_key(
    port: u16,
    admin_port: u16,
    upstream: SocketAddr,
    key: &str,
    code: &str,
) -> String {
    format!(
        "workers: 1\nadmin: {{address: 127.0.0.1:{admin_port}}}\nlisteners:\n  - name: main\n    \
         address: 127.0.0.1:{port}\n    routes: [{{prefix: /, cluster: backend}}]\n    \
         http_filters:\n      - name: api_key\n        configuration: \"{key}\"\n        \
         vm_config: {{runtime: wasmtime, code: {code}}}\nclusters:\n  \
         backend: {{endpoints: [\"{upstream}\"]}}\n"
    )
}

#[test]
fn a_sighup_while_the_plugins_load_reloads_once_serving_instead_of_stopping_the_proxy() {
    let origin = Origin::start();
    // The plugin's code takes 2 s to come: the proxy is loading meanwhile.
    let code = CodeServer::start("local_response", Duration::from_secs(2));
    let (port, admin_port) = (free_port(), free_port());
    let config = one_worker_api_key(
        port,
        admin_port,
        origin.address,
        "first",
        &code.code_block(),
    );
    let serve = Serve::launch_then(
        tempfile::tempdir().expect("a temporary directory"),
        &[port],
        admin_port,
        &config,
        |serve| {
            code.wait_for_a_request();
            std::fs::write(&serve.config, config.replace("\"first\"", "\"second\""))
                .expect("the changed configuration");
            let hangup = Command::new("kill")
                .args(["-HUP", &serve.child.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(hangup.success());
        },
    );
    serve.wait_for_log("SIGHUP came while loading: reloading");
    serve.wait_for_samples(&[("pwhost_reloads_total{outcome=\"done\"}", 1.0)]);
    assert_eq!(get(&serve.url("/"), &[("x-api-key", "second")]).status, 200);
    assert_eq!(get(&serve.url("/"), &[("x-api-key", "first")]).status, 403);
    // Fetched once: the reload found the code in the process's cache.
    assert_eq!(code.requests.load(Ordering::Relaxed), 1);
}

#[test]
fn a_long_reload_leaves_the_admin_listener_answering_and_the_old_configuration_in_force() {
    let origin = Origin::start();
    let (port, admin_port) = (free_port(), free_port());
    let local = format!(
        "{{local: {{filename: {}}}}}",
        corpus_plugin("local_response").display()
    );
    let serve = Serve::launch(
        tempfile::tempdir().expect("a temporary directory"),
        port,
        admin_port,
        &one_worker_api_key(port, admin_port, origin.address, "first", &local),
    );
    // The new configuration's code takes 3 s to come, all of it inside the reload.
    let code = CodeServer::start("local_response", Duration::from_secs(3));
    std::fs::write(
        &serve.config,
        one_worker_api_key(
            port,
            admin_port,
            origin.address,
            "second",
            &code.code_block(),
        ),
    )
    .expect("the changed configuration");
    let reload_url = serve.admin_url("/reload");
    let reload = std::thread::spawn(move || try_send(&reload_url, &[], Some("")));
    code.wait_for_a_request();
    let ready = get(&serve.admin_url("/ready"), &[]);
    let dump = get(&serve.admin_url("/config_dump"), &[]);
    assert!(
        !reload.is_finished(),
        "the admin listener answered only once the reload was over"
    );
    assert_eq!((ready.status, ready.body.as_str()), (200, "LIVE\n"));
    assert!(dump.body.contains("\"first\""), "{}", dump.body);
    assert_eq!(get(&serve.url("/"), &[("x-api-key", "first")]).status, 200);
    let reloaded = reload
        .join()
        .expect("the client thread")
        .expect("an answer");
    assert_eq!(
        (reloaded.status, reloaded.body.as_str()),
        (200, "reloaded\n")
    );
    assert_eq!(get(&serve.url("/"), &[("x-api-key", "second")]).status, 200);
    assert!(get(&serve.admin_url("/config_dump"), &[])
        .body
        .contains("\"second\""));
}

#[test]
fn a_plugin_that_closes_the_stream_resets_it_and_the_upstream_never_sees_it() {
    let origin = Origin::start();
    let serve = Serve::start(origin.address, &[envoy_filter("calls", "abi_coverage", "")]);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let outcome = agent.get(&serve.url("/")).header("x-close", "1").call();
    assert!(
        outcome.is_err(),
        "a closed stream gets no response: {:?}",
        outcome.map(|r| r.status())
    );
    serve.wait_for_log("close_stream status: 0");
    assert_eq!(origin.requests.load(Ordering::Relaxed), 0);
    // The connection went; the next request is served.
    assert_eq!(get(&serve.url("/"), &[]).status, 200);
}

#[test]
fn a_plugin_holding_the_last_request_body_chunk_checks_the_whole_body_before_it_goes_up() {
    let origin = Origin::start();
    let auth = Origin::start();
    let filter = envoy_filter("body_check", "http_call", "");
    let (_serve, _) = a_body_check_passing(&origin, &auth, filter, "1");
    assert_eq!(*origin.last_body.lock().unwrap(), "the whole body");

    // With the checker unreachable, the plugin answers itself: the body never reached the
    // upstream (whose request, opened with the headers, is abandoned, as Envoy resets it).
    let connections = origin.connections.load(Ordering::Relaxed);
    let _serve = a_body_check_failing(&origin, envoy_filter("body_check", "http_call", ""), "1");
    assert!(origin.connections.load(Ordering::Relaxed) > connections);
    assert_eq!(*origin.last_body.lock().unwrap(), "the whole body");
}

/// A continue a plugin asks for while it holds nothing (from its callout's answer, the headers
/// having gone on without waiting for it) is spent: it does not let the body's end, where the
/// plugin stops for a check, past that check.
#[test]
fn a_continue_asked_while_nothing_is_held_does_not_let_a_later_check_pass() {
    use std::io::{Read as _, Write as _};
    let origin = Origin::start();
    let checker = Origin::serving(&[("x-auth-user", "alice")], Some("/check"));
    let serve = Serve::start_with(
        origin.address,
        &[envoy_filter("gate", "http_call", "")],
        &[("auth_cluster", checker.address)],
    );
    // The headers and the body's beginning; its end once the plugin's `GET /auth` (which
    // continues the stream) was answered.
    let mut client = TcpStream::connect(("127.0.0.1", serve.port)).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("a read timeout");
    client
        .write_all(
            b"POST /upload HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\
              x-check-body: notify-then-body\r\ncontent-length: 26\r\n\r\na body that ",
        )
        .expect("a request begun");
    serve.wait_for_log("http call response: token 1");
    client
        .write_all(b"does not pass\n")
        .expect("the body's end");
    let mut answer = String::new();
    let _ = client.read_to_string(&mut answer);
    // The check refused the body (403), so the plugin answered 401: the upstream's request,
    // opened with the headers, was abandoned without its body.
    assert!(
        answer.starts_with("HTTP/1.1 401"),
        "{answer}\n{}",
        serve.log()
    );
    assert_eq!(
        *checker.last_body.lock().unwrap(),
        "a body that does not pass\n"
    );
    assert_eq!(checker.requests.load(Ordering::Relaxed), 2);
    assert_eq!(
        origin.requests.load(Ordering::Relaxed),
        0,
        "{}",
        serve.log()
    );
}

/// A plugin that answers from outside its callbacks (its callout's answer) while another
/// plugin holds the stream is answered at once, as in Envoy, not once the holder lets go.
#[test]
fn a_reply_from_a_plugin_that_holds_nothing_ends_a_stream_another_plugin_holds() {
    use std::io::{Read as _, Write as _};
    let origin = Origin::start();
    let checker = Origin::serving(&[], Some("/auth"));
    let serve = Serve::start_with(
        origin.address,
        &[
            envoy_filter("gate", "http_call", ""),
            envoy_filter_with(
                "holder",
                "http_call",
                "",
                "allow_on_headers_stop_iteration: true",
            ),
        ],
        &[("auth_cluster", checker.address)],
    );
    // `gate` lets the headers go on and asks `GET /auth`, which is refused: it answers 401.
    // `holder` holds the headers until the body's end, which never comes.
    let mut client = TcpStream::connect(("127.0.0.1", serve.port)).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    client
        .write_all(
            b"POST /upload HTTP/1.1\r\nhost: a\r\nx-check-body-gate: notify-then-body\r\n\
              x-check-body-holder: before-headers\r\ncontent-length: 100\r\n\r\nthe first part",
        )
        .expect("a request begun");
    let mut answer = [0; 12];
    let read = client.read_exact(&mut answer);
    assert!(
        read.is_ok() && answer.starts_with(b"HTTP/1.1 401"),
        "{read:?} {:?}\n{}",
        String::from_utf8_lossy(&answer),
        serve.log()
    );
    assert_eq!(origin.requests.load(Ordering::Relaxed), 0);
    drop(client);
    serve.wait_for_no_live_contexts();
}

/// Sends `body` with curl (`args` choose the protocol and framing; no `Expect` unless they
/// ask for it) and returns what came back.
fn curl_upload(args: &[&str], url: &str, body: &[u8]) -> String {
    use std::io::Write;
    let mut curl = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-H", "expect:"])
        .args(args)
        .arg(url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl runs (apt-get install curl)");
    curl.stdin
        .take()
        .expect("curl's input")
        .write_all(body)
        .expect("the body reaches curl");
    let output = curl.wait_with_output().expect("curl ends");
    assert!(output.status.success(), "curl failed: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A body whose every line says where it is, so that a lost, doubled or misplaced part shows.
fn numbered_body(bytes: usize) -> String {
    (0..)
        .map(|line| format!("{line:015}\n"))
        .take(bytes / 16)
        .collect()
}

#[test]
fn a_plugin_allowed_to_hold_the_request_headers_gets_the_body_meanwhile() {
    let origin = Origin::start();
    let checker = Origin::answering_with(&[("x-auth-user", "alice")]);
    let allowed = "allow_on_headers_stop_iteration: true";

    // The plugin holds the headers, checks the whole body with a callout, adds a header from
    // the answer and lets the request go on: headers and body reach the upstream together.
    let filter = envoy_filter_with("body_check", "http_call", "", allowed);
    let (serve, reply) = a_body_check_passing(&origin, &checker, filter, "before-headers");
    assert!(
        reply.body.contains("x-body-checked: alice"),
        "{}",
        reply.body
    );
    assert!(reply.body.contains("\nthe whole body\n"), "{}", reply.body);
    assert_eq!(origin.requests.load(Ordering::Relaxed), 1);

    // The same for every framing of a body that fits what is read ahead: HTTP/2 with and
    // without a length (frames of at most 16 KiB), HTTP/1.1 chunked (whose end comes in a read
    // of its own), and a client waiting for `100 Continue`.
    let framings: [(&str, &[&str], usize); 4] = [
        (
            "h2, no length",
            &["--http2-prior-knowledge", "-T", "-"],
            40 * 1024,
        ),
        (
            "h2, content-length",
            &["--http2-prior-knowledge", "--data-binary", "@-"],
            64 * 1024,
        ),
        (
            "chunked",
            &["--data-binary", "@-", "-H", "transfer-encoding: chunked"],
            60 * 1024,
        ),
        (
            "100-continue",
            &[
                "--data-binary",
                "@-",
                "-H",
                "expect: 100-continue",
                "--expect100-timeout",
                "30",
            ],
            30 * 1024,
        ),
    ];
    for (framing, args, size) in framings {
        let body = numbered_body(size);
        let mut args = args.to_vec();
        args.extend(["-H", "x-check-body: before-headers"]);
        let text = curl_upload(&args, &serve.url("/upload"), body.as_bytes());
        let headers = &text[..text.find("\n\n").unwrap_or(text.len())];
        assert!(
            headers.contains("x-body-checked: alice"),
            "{framing}: {headers}"
        );
        assert!(!headers.contains("expect:"), "{framing}: {headers}");
        assert!(
            *checker.last_body.lock().unwrap() == body,
            "{framing}: checked"
        );
        assert!(
            *origin.last_body.lock().unwrap() == body,
            "{framing}: forwarded"
        );
    }

    // A chunk the plugin lets through (`Continue` from its body callback, having edited the
    // held headers there) lets the headers go first. A body longer than what is read ahead
    // arrives whole and in order, read ahead in part and the rest after.
    for (framing, size) in [("content-length", 300 * 1024), ("chunked", 200 * 1024)] {
        let body = numbered_body(size);
        let mut args = vec!["-H", "x-check-body: first-chunk", "--data-binary", "@-"];
        if framing == "chunked" {
            args.extend(["-H", "transfer-encoding: chunked"]);
        }
        let text = curl_upload(&args, &serve.url("/first-chunk"), body.as_bytes());
        let headers = &text[..text.find("\n\n").unwrap_or(text.len())];
        assert!(headers.contains("x-first-chunk: "), "{framing}: {headers}");
        assert!(!headers.contains("expect:"), "{framing}: {headers}");
        let upstream = origin.last_body.lock().unwrap().clone();
        assert_eq!(upstream.len(), body.len(), "{framing}");
        assert!(
            upstream == body,
            "{framing}: the body reached the upstream changed"
        );
    }
    serve.wait_for_log("first chunk: ");

    // Held for a call made on the headers alone, the body buffered meanwhile (a stop from
    // every body callback): the call's answer lets the headers go with a header from it,
    // while or after the body comes, and the body follows whole.
    for size in [40 * 1024, 300 * 1024] {
        let body = numbered_body(size);
        let args = ["-H", "x-check-body: headers-held", "--data-binary", "@-"];
        let text = curl_upload(&args, &serve.url("/held"), body.as_bytes());
        let headers = &text[..text.find("\n\n").unwrap_or(text.len())];
        assert!(headers.contains("x-auth-user: alice"), "{size}: {headers}");
        assert!(
            *origin.last_body.lock().unwrap() == body,
            "{size}: the body reached the upstream changed"
        );
    }

    // The same when it lets them go with `proxy_continue_stream` from inside that callback,
    // which returns a stop: here on the body's only chunk (sent with the headers), so that
    // nothing but that continue can let the request go.
    let status = raw_status_line(
        serve.port,
        b"POST /resume HTTP/1.1\r\nhost: a\r\nx-check-body: first-chunk-resume\r\n\
          content-length: 5\r\nconnection: close\r\n\r\nhello",
    );
    assert_eq!(status, "HTTP/1.1 200 OK", "{}", serve.log());
    assert_eq!(*origin.last_body.lock().unwrap(), "hello");

    // A client that goes away while its body is read ahead leaves no plugin context behind.
    use std::io::Write;
    let mut client = TcpStream::connect(("127.0.0.1", serve.port)).expect("connects");
    client
        .write_all(
            b"POST /gone HTTP/1.1\r\nhost: a\r\nx-check-body: before-headers\r\n\
              content-length: 1000\r\n\r\n0123456789",
        )
        .expect("the request goes out");
    serve.wait_for_samples(&[("pwhost_live_stream_contexts", 1.0)]);
    drop(client);
    serve.wait_for_no_live_contexts();

    // In a chain: a plugin before the holder rewrites the body it buffered to its end before
    // the holder checks it; one after it gets the body the holder let go.
    for (chain, checked) in [
        (["rewrite", "body_check"], "THE WHOLE BODY"),
        (["body_check", "rewrite"], "the whole body"),
    ] {
        let filters: Vec<String> = chain
            .iter()
            .map(|name| match *name {
                "rewrite" => envoy_filter("rewrite", "body_rewrite", ""),
                _ => envoy_filter_with("body_check", "http_call", "", allowed),
            })
            .collect();
        let serve = Serve::start_with(
            origin.address,
            &filters,
            &[("auth_cluster", checker.address)],
        );
        let reply = send(
            "POST",
            &serve.url("/chain"),
            &[("x-check-body", "before-headers")],
            Some("the whole body"),
        );
        assert_eq!(reply.status, 200, "{chain:?}: {}", serve.log());
        assert_eq!(*checker.last_body.lock().unwrap(), checked, "{chain:?}");
        assert_eq!(
            *origin.last_body.lock().unwrap(),
            "THE WHOLE BODY",
            "{chain:?}"
        );
        assert!(
            reply.body.contains("x-body-checked: alice"),
            "{}",
            reply.body
        );
    }

    // Until the body passed, the upstream heard nothing: a check that fails answers the
    // client and the upstream is not even connected to.
    let connections = origin.connections.load(Ordering::Relaxed);
    let filter = envoy_filter_with("body_check", "http_call", "", allowed);
    let _serve = a_body_check_failing(&origin, filter, "before-headers");
    assert_eq!(origin.connections.load(Ordering::Relaxed), connections);
}

/// `pwhost serve` in front of `origin` with `filter` (`http_call`) checking bodies with
/// `checker`, after a request whose body it checks (`x-check-body: mode`), and its reply: a
/// 200, the checker having seen the whole body.
fn a_body_check_passing(
    origin: &Origin,
    checker: &Origin,
    filter: String,
    mode: &str,
) -> (Serve, Reply) {
    let serve = Serve::start_with(
        origin.address,
        &[filter],
        &[("auth_cluster", checker.address)],
    );
    let reply = send(
        "POST",
        &serve.url("/upload"),
        &[("x-check-body", mode)],
        Some("the whole body"),
    );
    assert_eq!(reply.status, 200, "{}", serve.log());
    assert_eq!(*checker.last_body.lock().unwrap(), "the whole body");
    (serve, reply)
}

/// `pwhost serve` in front of `origin` with `filter` (`http_call`), whose checker cannot be
/// reached, after a request whose body it checks (`x-check-body: mode`): the plugin answered
/// 503 itself, the stream ended, and no whole request reached `origin`.
fn a_body_check_failing(origin: &Origin, filter: String, mode: &str) -> Serve {
    let unreachable = free_port();
    let serve = Serve::start_with(
        origin.address,
        &[filter],
        &[("auth_cluster", ([127, 0, 0, 1], unreachable).into())],
    );
    let before = origin.requests.load(Ordering::Relaxed);
    let reply = send(
        "POST",
        &serve.url("/upload"),
        &[("x-check-body", mode)],
        Some("unchecked"),
    );
    assert_eq!(reply.status, 503, "{}", serve.log());
    assert_eq!(reply.body, "auth callout failed\n");
    serve.wait_for_no_live_contexts();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(origin.requests.load(Ordering::Relaxed), before);
    serve
}

/// A request a test sends: path, headers, body (a `GET` if empty, else a `POST`).
type TestRequest = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

/// Where `http_call` holds a stream for its call to `auth_cluster`, chosen by request headers:
/// the request headers, the request body at its end, the request headers while the body is
/// read ahead (with `allow_on_headers_stop_iteration`), the response headers.
const HOLDS: [TestRequest; 4] = [
    ("/held-headers", &[], ""),
    ("/held-body", &[("x-check-body", "1")], "a body to check"),
    (
        "/held-before-headers",
        &[("x-check-body", "before-headers")],
        "a body to check before the headers go on",
    ),
    ("/held-response", &[("x-check-response", "1")], ""),
];

#[test]
fn a_client_that_leaves_a_held_stream_ends_it_and_its_plugin_contexts_at_once() {
    // `auth` may hold the request headers while the body is read ahead.
    leaving_held_streams(
        [
            envoy_filter("headers", "http_headers", ""),
            envoy_filter_with("auth", "http_call", "", ALLOWED_TO_HOLD_HEADERS),
        ],
        &HOLDS,
        Some(drop),
    );
    // Another plugin may, so the body is read ahead, while `auth` holds the headers with
    // everything else (its pause made `StopAllIterationAndWatermark`): watched over HTTP/2,
    // and over HTTP/1.1 for a reset (a client's close is noticed only once its body was read:
    // the connection is not read before).
    leaving_held_streams(
        [
            envoy_filter_with("headers", "http_headers", "", ALLOWED_TO_HOLD_HEADERS),
            envoy_filter("auth", "http_call", ""),
        ],
        &[("/held-post-headers", &[], "a body held with its headers")],
        Some(faulty_peers::reset),
    );
}

/// An HTTP/1.1 client that resets its connection while a plugin holds its request's headers,
/// the body still unread (nothing reads the connection then: a close would show only once the
/// body is read), ends the stream and its plugin contexts at once.
#[test]
fn an_http1_client_that_resets_a_held_request_with_its_body_unread_ends_it_at_once() {
    use std::io::Write;
    let origin = Origin::start();
    let checker = SilentChecker::start();
    let serve = Serve::start_with(
        origin.address,
        &[envoy_filter("gate", "wat/holds_for_good", "")],
        &[("auth_cluster", checker.server.address)],
    );
    let mut client = TcpStream::connect(("127.0.0.1", serve.port)).expect("connects");
    client
        .write_all(b"POST /held HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\npart of it")
        .expect("the request goes out");
    // Held for its call, which the checker never answers.
    wait_until(|| !checker.heads.lock().unwrap().is_empty(), "the call");
    faulty_peers::reset(client);
    serve.wait_for_no_live_contexts();
    assert_eq!(origin.requests.load(Ordering::Relaxed), 0);
}

/// Envoy's field that lets a plugin hold the request headers while the body comes.
const ALLOWED_TO_HOLD_HEADERS: &str = "allow_on_headers_stop_iteration: true";

/// Sends each of `holds` (see [`HOLDS`]) through `filters` (`http_headers`, then `http_call`
/// as `auth`), leaving each stream once held: over HTTP/1.1 (if `http1` says how the client
/// leaves its connection: closes or resets it) and over HTTP/2 (RST_STREAM); each stream must
/// end at once.
fn leaving_held_streams(filters: [String; 2], holds: &[TestRequest], http1: Option<fn(TcpStream)>) {
    let origin = Origin::start();
    // A checker that reads what it is sent and never answers: the plugin's calls would fail
    // after their 5 s, so a stream held for one lasts until its client leaves. It counts the
    // calls that reached it, each on a connection of its own: one more means one more stream
    // is held.
    let calls = Arc::new(AtomicUsize::new(0));
    let silent = {
        let calls = Arc::clone(&calls);
        Background::start(move |listener, mut stopped| async move {
            while let Some(mut connection) = next_connection(&listener, &mut stopped).await {
                calls.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut connection, &mut tokio::io::sink()).await;
                });
            }
        })
    };
    let serve = Serve::start_with(
        origin.address,
        &filters,
        &[("auth_cluster", silent.address)],
    );
    // The stream's contexts ended while its call was pending: the plugin never heard of the
    // call's end (its failure, 5 s on, which it logs while its context lives).
    let ended_while_held = |path: &str| {
        serve.wait_for_log(&format!("done: {path}"));
        let log = serve.log();
        assert!(!log.contains("http call failed"), "{log}");
    };
    // HTTP/1.1: the client leaves its connection while the stream is held.
    let http1_holds = if http1.is_some() { holds } else { &[] };
    for (held, &(path, headers, body)) in http1_holds.iter().enumerate() {
        use std::io::Write;
        let mut client = TcpStream::connect(("127.0.0.1", serve.port)).expect("connects");
        let mut request = format!(
            "{} {path} HTTP/1.1\r\nhost: a\r\ncontent-length: {}\r\n",
            if body.is_empty() { "GET" } else { "POST" },
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        client
            .write_all(request.as_bytes())
            .expect("the request goes out");
        wait_until(|| calls.load(Ordering::Relaxed) > held, "the call");
        if let Some(leave) = http1 {
            leave(client);
        }
        serve.wait_for_no_live_contexts();
        ended_while_held(path);
    }
    // HTTP/2: the client resets each held stream (RST_STREAM) on one connection, which stays
    // open and carries the next: without an end to a stream reset while held, a client could
    // open and reset streams without end, each keeping its contexts.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", serve.port))
            .await
            .expect("connects");
        let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(connection);
        for (held, &(path, headers, body)) in holds.iter().enumerate() {
            let mut request = http::Request::builder()
                .method(if body.is_empty() { "GET" } else { "POST" })
                .uri(format!("http://a{path}"));
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            client = client.ready().await.expect("the connection takes a stream");
            let (response, mut sending) = client
                .send_request(request.body(()).expect("a request"), body.is_empty())
                .expect("the stream opens");
            if !body.is_empty() {
                sending
                    .send_data(bytes::Bytes::from_static(body.as_bytes()), true)
                    .expect("the body goes out");
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while calls.load(Ordering::Relaxed) < http1_holds.len() + held + 1 {
                assert!(Instant::now() < deadline, "no call:\n{}", serve.log());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Dropping both ends of a stream the server has not ended resets it (CANCEL).
            drop((response, sending));
            live_contexts_come_to(&serve, 0.0).await;
            ended_while_held(path);
        }
    });
    // Only /held-response went to the origin, once per protocol.
    let responses = holds.iter().filter(|(path, ..)| *path == "/held-response");
    assert_eq!(
        origin.requests.load(Ordering::Relaxed),
        responses.count() * (1 + usize::from(http1.is_some()))
    );
    assert_eq!(
        sample(
            &get(&serve.admin_url("/stats/prometheus"), &[]).body,
            "pwhost_resets_total{listener=\"main\",cause=\"client\"}"
        ),
        Some((holds.len() + http1_holds.len()) as f64)
    );
    // Each is the client's doing, no proxy error to log: resets in a flood would flood it.
    let log = serve.log();
    assert!(!log.contains("ERROR"), "{log}");
}

/// Waits (at most 10 s) until `done`, which waits for `what`.
fn wait_until(done: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "no {what} within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (at most 10 s) until `serve` has `count` plugin stream contexts live, letting the
/// runtime's other tasks (an HTTP/2 client's connection) run meanwhile.
async fn live_contexts_come_to(serve: &Serve, count: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
        if sample(&metrics, "pwhost_live_stream_contexts") == Some(count) {
            return;
        }
        assert!(Instant::now() < deadline, "not {count} live:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The YAML lines of `clusters` (name, one endpoint each).
fn cluster_lines(clusters: &[(&str, SocketAddr)]) -> String {
    clusters
        .iter()
        .map(|(name, address)| format!("  {name}: {{endpoints: [\"{address}\"]}}\n"))
        .collect()
}

/// A checker that reads each call's request head and never answers, keeping the heads and
/// counting the connections the proxy closed.
struct SilentChecker {
    server: Background,
    heads: Arc<Mutex<Vec<String>>>,
    closed: Arc<AtomicUsize>,
}

impl SilentChecker {
    fn start() -> SilentChecker {
        let heads = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicUsize::new(0));
        let (kept, counted) = (Arc::clone(&heads), Arc::clone(&closed));
        let server = Background::start(move |listener, mut stopped| async move {
            use tokio::io::AsyncReadExt;
            while let Some(mut connection) = next_connection(&listener, &mut stopped).await {
                let (kept, counted) = (Arc::clone(&kept), Arc::clone(&counted));
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match connection.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => break,
                        }
                    }
                    kept.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&head).into_owned());
                    let _ = tokio::io::copy(&mut connection, &mut tokio::io::sink()).await;
                    counted.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        SilentChecker {
            server,
            heads,
            closed,
        }
    }
}

/// A plugin's calls end when its VM copy fails, wherever it fails (here in a stream's
/// request callback, and at a stream's end, not in a call's answer): a failed copy's answers could only fail again, and a
/// call without a timeout would keep its upstream for good. And a call goes out with the
/// proxy's own framing and connection headers, whatever the plugin wrote.
#[test]
fn a_failed_copy_ends_its_calls_and_a_call_keeps_the_proxys_connection_headers() {
    // Where the copy fails: the second request's headers, and what that request gets.
    let failures: [(&[(&str, &str)], u16); 2] = [
        // In its request headers callback.
        (&[("x-trap", "1")], 503),
        // In its `proxy_on_log`, once it had its response.
        (&[("x-pass", "1"), ("x-trap-at-end", "1")], 200),
    ];
    for (failing, answered) in failures {
        a_failed_copy_ends_its_calls(failing, answered);
    }
}

/// See [`a_failed_copy_ends_its_calls_and_a_call_keeps_the_proxys_connection_headers`].
fn a_failed_copy_ends_its_calls(failing: &[(&str, &str)], answered: u16) {
    let origin = Origin::start();
    let checker = SilentChecker::start();
    let serve = Serve::start_with_one_worker(
        origin.address,
        &[envoy_filter("gate", "wat/holds_for_good", "")],
        &[("auth_cluster", checker.server.address)],
    );
    // The first request is held for good, for a call that never ends on its own; the second
    // fails the copy, and the first gets the failure policy.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let (trapped, held) = runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", serve.port))
            .await
            .expect("connects");
        let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(connection);
        let send = |path: &str, headers: &[(&str, &str)]| {
            let mut request = http::Request::builder().uri(format!("http://a{path}"));
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let client = client.clone();
            let request = request.body(()).expect("a request");
            async move {
                let mut client = client.ready().await.expect("the connection takes a stream");
                let (response, _) = client.send_request(request, true).expect("a stream");
                response.await.map(|response| response.status().as_u16())
            }
        };
        let held = tokio::spawn(send("/held", &[]));
        let deadline = Instant::now() + Duration::from_secs(10);
        while checker.heads.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "no call:\n{}", serve.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let head = checker.heads.lock().unwrap()[0].to_ascii_lowercase();
        assert!(head.starts_with("get / http/1.1\r\n"), "{head}");
        let hosts: Vec<&str> = head.lines().filter(|l| l.starts_with("host:")).collect();
        assert_eq!(hosts, ["host: a"], "{head}");
        assert!(head.contains("content-length: 0\r\n"), "{head}");
        for header in [
            "connection:",
            "transfer-encoding:",
            "keep-alive:",
            "upgrade:",
        ] {
            assert!(!head.contains(&format!("\n{header}")), "{header} in {head}");
        }
        // But a gRPC server's `te: trailers`.
        assert!(head.contains("\nte: trailers\r\n"), "{head}");
        let trapped = send("/trap", failing).await;
        (trapped.ok(), held.await.expect("the held stream").ok())
    });
    serve.wait_for_log("left out of an HTTP call");
    assert_eq!(trapped, Some(answered));
    assert_eq!(held, Some(503));
    // And the failed copy's call ends with it.
    wait_until(
        || checker.closed.load(Ordering::Relaxed) == 1,
        "the failed copy's call ended",
    );
    assert_eq!(
        origin.requests.load(Ordering::Relaxed),
        usize::from(answered == 200)
    );
}

/// A WebSocket goes through the proxy as Envoy carries an upgrade: the plugins see the upgrade
/// request's headers (and may change them) not ending the stream, the 101's headers, then each
/// side's bytes as that side's body, and the client's end as the request's end; an upgrade the
/// upstream refuses is answered as it answered.
#[test]
fn a_websocket_upgrade_passes_the_plugins_then_carries_bytes_both_ways_as_bodies() {
    use std::io::Read;
    let upstream = UpgradeEcho::start();
    // `stream_recorder` logs each callback and whether it ends its side ("more" or "end").
    let serve = Serve::start(
        upstream.address,
        &[
            envoy_filter("headers", "http_headers", ""),
            envoy_filter("recorder", "wat/stream_recorder", ""),
        ],
    );
    let (mut client, head) = websocket_upgrade(serve.port, "/chat", "");
    assert!(
        head.starts_with("http/1.1 101"),
        "not switched: {head:?}\n{}",
        serve.log()
    );
    let request = upstream.request.lock().unwrap().clone();
    assert!(
        request.contains("x-pwhost-plugin: http_headers"),
        "the plugin did not see the upgrade request: {request}"
    );
    if let Err(error) = echoes(&mut client, &["ping", "and a longer message, twice over"]) {
        panic!("{error}\n{}", serve.log());
    }
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("half-closed");
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("the proxy closes");
    serve.wait_for_log("request body, end");
    let log = serve.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("plugin=\"recorder\""))
        .collect();
    let seen = |what: &str| lines.iter().filter(|line| line.contains(what)).count();
    assert_eq!(
        (seen("request headers, more"), seen("request headers, end")),
        (1, 0),
        "the upgrade request's headers ended the stream:\n{log}"
    );
    assert_eq!(seen("response headers, more"), 1, "{log}");
    assert!(
        seen("request body, more") >= 1 && seen("response body, more") >= 1,
        "the plugins did not see the bytes as bodies:\n{log}"
    );
    let last_more = lines
        .iter()
        .rposition(|line| line.contains("request body, more"));
    let end = lines
        .iter()
        .position(|line| line.contains("request body, end"));
    assert!(
        last_more < end && seen("request body, end") == 1,
        "the request's body went on after its end:\n{log}"
    );

    // Refused: the upstream's answer, its body whole; the request was not ended for it.
    let (mut refused, head) = websocket_upgrade(serve.port, "/refused", "");
    assert!(
        head.starts_with("http/1.1 403"),
        "not the upstream's answer: {head:?}\n{}",
        serve.log()
    );
    let mut body = [0u8; 2];
    refused.read_exact(&mut body).expect("the answer's body");
    assert_eq!(&body, b"no");
    serve.wait_for_log("response body, end");
    assert_eq!(
        serve.log().matches("request headers, end").count(),
        0,
        "{}",
        serve.log()
    );

    // `Upgrade: h2c` (curl's `--http2` on an http:// URL) is no switch here, as in Envoy, which
    // drops it: the request's body ends as any body does (a plugin buffering it would
    // otherwise hold it for ever), and a bodiless one ends with its headers.
    let h2c =
        "upgrade: h2c\r\nconnection: upgrade, http2-settings\r\nhttp2-settings: AAMAAABkAAQAAP__";
    let (_, head) = send_for_head(
        serve.port,
        &format!("POST /h2c HTTP/1.1\r\nhost: a\r\n{h2c}\r\ncontent-length: 5\r\n\r\nhello"),
    );
    assert!(
        head.starts_with("http/1.1 403"),
        "{head:?}\n{}",
        serve.log()
    );
    serve.wait_for_log_count("request body, end", 2);
    let (_, head) = send_for_head(
        serve.port,
        &format!("GET /h2c HTTP/1.1\r\nhost: a\r\n{h2c}\r\n\r\n"),
    );
    assert!(
        head.starts_with("http/1.1 403"),
        "{head:?}\n{}",
        serve.log()
    );
    serve.wait_for_log("request headers, end");

    // A `Content-Length: 0` on the upgrade request, or on the 101, tells nothing of the bytes
    // after the switch.
    for (path, extra) in [("/chat", "content-length: 0\r\n"), ("/length", "")] {
        let (mut client, head) = websocket_upgrade(serve.port, path, extra);
        assert!(
            head.starts_with("http/1.1 101"),
            "{path}: {head:?}\n{}",
            serve.log()
        );
        if let Err(error) = echoes(&mut client, &["over a length of 0"]) {
            panic!("{path}: {error}\n{}", serve.log());
        }
    }
    assert_eq!(
        serve.log().matches("response headers, end").count(),
        0,
        "a 101 ended the response at its headers:\n{}",
        serve.log()
    );
}

/// A WebSocket silent for longer than its cluster's `request_timeout` goes on, as in Envoy,
/// whose route timeout counts from the end of the request (an upgrade's comes at its close):
/// its upstream is waited on as long as its client, the listener's stream idle timeout.
#[test]
fn a_websocket_outlives_its_clusters_request_timeout() {
    let upstream = UpgradeEcho::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (port, admin_port) = (free_port(), free_port());
    let config = format!(
        "admin: {{address: 127.0.0.1:{admin_port}}}\nlisteners:\n  - name: main\n    \
         address: 127.0.0.1:{port}\n    routes: [{{prefix: /, cluster: backend}}]\n    \
         http_filters:\n{}clusters:\n  backend: {{endpoints: [\"{}\"], request_timeout: 1s}}\n",
        envoy_filter("headers", "http_headers", ""),
        upstream.address
    );
    let serve = Serve::launch(dir, port, admin_port, &config);
    let (mut client, head) = websocket_upgrade(serve.port, "/chat", "");
    assert!(
        head.starts_with("http/1.1 101"),
        "not switched: {head:?}\n{}",
        serve.log()
    );
    for message in ["before a silence", "after it"] {
        if let Err(error) = echoes(&mut client, &[message]) {
            panic!("{error}\n{}", serve.log());
        }
        std::thread::sleep(Duration::from_millis(1600));
    }
}

/// A plugin may hold a WebSocket's upgrade request in its headers callback (here for a callout,
/// allowed to stop there): no body is read ahead meanwhile (it comes only after the switch),
/// and once the plugin lets the request go, the bytes flow.
#[test]
fn a_websocket_upgrade_a_plugin_holds_for_a_callout_goes_on_once_let_go() {
    let upstream = UpgradeEcho::start();
    let auth = Origin::answering_with(&[("x-auth-user", "alice")]);
    let serve = Serve::start_with(
        upstream.address,
        &[
            envoy_filter_with(
                "gate",
                "http_call",
                "",
                "allow_on_headers_stop_iteration: true",
            ),
            envoy_filter("recorder", "wat/stream_recorder", ""),
        ],
        &[("auth_cluster", auth.address)],
    );
    let (mut client, head) = websocket_upgrade(serve.port, "/chat", "");
    assert!(
        head.starts_with("http/1.1 101"),
        "not switched: {head:?}\n{}",
        serve.log()
    );
    assert!(
        upstream
            .request
            .lock()
            .unwrap()
            .contains("x-auth-user: alice"),
        "the upgrade went on before the callout's answer"
    );
    if let Err(error) = echoes(&mut client, &["ping", "pong"]) {
        panic!("{error}\n{}", serve.log());
    }
    assert_eq!(
        serve.log().matches("request body, end").count(),
        0,
        "the request ended before the client did:\n{}",
        serve.log()
    );
}

/// `pwhost serve` with one TCP listener whose network filter is `plugin` (configured with
/// `configuration`), in front of `upstream`, with more `clusters` for the plugin's calls.
fn serve_tcp(
    upstream: SocketAddr,
    plugin: &str,
    configuration: &str,
    clusters: &[(&str, SocketAddr)],
) -> Serve {
    serve_tcp_with(upstream, plugin, configuration, clusters, "")
}

/// As [`serve_tcp`], with more settings (`listener`: YAML lines) for the TCP listener.
fn serve_tcp_with(
    upstream: SocketAddr,
    plugin: &str,
    configuration: &str,
    clusters: &[(&str, SocketAddr)],
    listener: &str,
) -> Serve {
    serve_tcp_chain(upstream, &[(plugin, configuration)], clusters, listener)
}

/// As [`serve_tcp_with`], with a chain of network filters: corpus plugins with their
/// configurations, in order (the first named `upper`, the others after their plugin).
fn serve_tcp_chain(
    upstream: SocketAddr,
    filters: &[(&str, &str)],
    clusters: &[(&str, SocketAddr)],
    listener: &str,
) -> Serve {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (port, admin_port) = (free_port(), free_port());
    let filters: String = filters
        .iter()
        .enumerate()
        .map(|(index, (plugin, configuration))| {
            let name = match index {
                0 => "upper",
                _ => plugin.rsplit('/').next().unwrap_or(plugin),
            };
            format!(
                "      - name: envoy.filters.network.wasm\n        typed_config:\n          \
                 \"@type\": type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm\n          \
                 config:\n            name: {name}\n            configuration: \"{configuration}\"\n            \
                 vm_config:\n              runtime: envoy.wasm.runtime.wasmtime\n              \
                 code: {{local: {{filename: {}}}}}\n",
                corpus_plugin(plugin).display()
            )
        })
        .collect();
    let config = format!(
        "workers: 2\nadmin: {{address: 127.0.0.1:{admin_port}}}\nlisteners:\n  - name: tcp\n    \
         address: 127.0.0.1:{port}\n    protocol: tcp\n    cluster: echo\n{listener}    \
         network_filters:\n{filters}clusters:\n  echo: {{endpoints: [\"{upstream}\"], \
         connect_timeout: 1s}}\n{}",
        clusters
            .iter()
            .map(|(name, address)| format!("  {name}: {{endpoints: [\"{address}\"]}}\n"))
            .collect::<String>()
    );
    Serve::launch(dir, port, admin_port, &config)
}

/// The value of the Prometheus sample `name` (with its labels, as exposed), if there is one.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

#[test]
fn a_tcp_listener_runs_each_connection_through_its_network_filter_both_ways() {
    let echo = Echo::start();
    let serve = serve_tcp(echo.address, "tcp_filter", "", &[]);
    // The plugin upper-cases what the client sends and puts `[up] ` before the first bytes
    // coming back: the echo server sends back the upper-cased bytes.
    assert_eq!(tcp_exchange(serve.port, &["hello"]), "[up] HELLO");
    // Several chunks on one connection, half-closed by the client: nothing is lost, the
    // prefix comes once.
    assert_eq!(tcp_exchange(serve.port, &["ab", "cd", "ef"]), "[up] ABCDEF");
    // Connections at once, on both workers.
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let port = serve.port;
            std::thread::spawn(move || tcp_exchange(port, &[&format!("client {i}")]))
        })
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        assert_eq!(client.join().expect("a client"), format!("[up] CLIENT {i}"));
    }
    // The plugin saw each connection start and both of its sides close, the client's first.
    serve.wait_for_log("new connection");
    serve.wait_for_log("downstream closed by Remote");
    serve.wait_for_log("upstream closed by Remote");
    let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
    let connections = sample(&metrics, "pwhost_connections_total{listener=\"tcp\"}")
        .expect("a connection counter");
    assert!(connections >= 10.0, "{connections} in\n{metrics}");
    assert!(echo.connections.load(Ordering::Relaxed) >= 10);
    // Every connection's context went with it.
    serve.wait_for_no_live_contexts();
}

#[test]
fn a_network_filter_that_pauses_a_new_connection_holds_the_dial_until_a_tick_continues_it() {
    let echo = Echo::start();
    let serve = serve_tcp(echo.address, "wat/tcp_hold", "", &[]);
    // The client's bytes wait with the connection, then go on unchanged.
    assert_eq!(
        tcp_exchange(serve.port, &["wait ", "for ", "me"]),
        "wait for me"
    );
    serve.wait_for_log("tcp_hold: held");
    serve.wait_for_log("tcp_hold: released");
    serve.wait_for_no_live_contexts();
}

/// A client that resets a new connection a network filter holds ends it, and its plugin
/// contexts, at once (nothing reads a held connection, so only its TCP state tells); one that
/// half-closes it is still there (a TCP client may send its end and wait for the answer).
#[test]
fn a_client_that_resets_a_held_new_connection_ends_it_and_one_that_half_closes_does_not() {
    use std::io::Write;
    let echo = Echo::start();
    let serve = serve_tcp(echo.address, "wat/holds_for_good", "", &[]);
    let live_contexts = || {
        let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
        sample(&metrics, "pwhost_live_stream_contexts")
    };
    // The connection that found the listener ready is held too (it only closed: a FIN).
    wait_until(|| live_contexts() == Some(1.0), "the first connection held");
    let mut client = std::net::TcpStream::connect(("127.0.0.1", serve.port)).expect("connects");
    wait_until(|| live_contexts() == Some(2.0), "a second connection held");
    client.write_all(b"sent, then the end").expect("sent");
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("half-closed");
    // Two looks at the connection's state later (one every 500 ms), it is still held.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(live_contexts(), Some(2.0));
    faulty_peers::reset(client);
    wait_until(
        || live_contexts() == Some(1.0),
        "the reset connection's end",
    );
    // The upstream was never dialled.
    assert_eq!(echo.connections.load(Ordering::Relaxed), 0);
}

/// What the chain let through still goes out when a plugin closes the connection later in the
/// same step: here the upstream's first chunk passes both filters to the client and, from the
/// first filter's callback, lets the client's bytes it held go on to the second, which closes
/// the connection. As in Envoy, where the chunk is in the client's write buffer by then and the
/// close flushes it.
#[test]
fn a_close_after_a_chunk_went_through_the_chain_still_sends_the_chunk() {
    let upstream = Greeter::start("greeting");
    let serve = serve_tcp_chain(
        upstream.address,
        &[
            ("wat/tcp_pass_then_close", ""),
            ("wat/tcp_pass_then_close", ""),
        ],
        &[],
        "",
    );
    if let Err(error) = the_chunk_before_a_close_still_goes_out(serve.port, &upstream, |line| {
        serve.wait_for_log(line)
    }) {
        panic!("{error}\n{}", serve.log());
    }
}

/// A continue a network filter asks for while it holds nothing of its connection (here from a
/// tick, while the filter after it holds the new connection) is spent, as Envoy's
/// `continueReading` on a connection not stopped: the data it pauses later stays held, and the
/// upstream gets none of it before the idle timeout closes the connection.
#[test]
fn a_continue_asked_while_a_network_filter_held_nothing_does_not_pass_its_later_pause() {
    let echo = Echo::start();
    let serve = serve_tcp_chain(
        echo.address,
        &[("wat/tcp_stale_continue", ""), ("wat/tcp_hold", "")],
        &[],
        "    idle_timeout: 1s\n",
    );
    assert_eq!(tcp_exchange(serve.port, &["held ", "for good"]), "");
    serve.wait_for_log("tcp_stale_continue: continued while holding nothing");
    serve.wait_for_log("tcp_hold: released");
    serve.wait_for_no_live_contexts();
}

#[test]
fn a_tcp_connection_whose_upstream_is_unreachable_is_closed_and_the_plugin_hears_of_it() {
    let nowhere: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("an address");
    let serve = serve_tcp(nowhere, "tcp_filter", "", &[]);
    assert_eq!(tcp_exchange(serve.port, &["hello"]), "");
    serve.wait_for_log("upstream closed by Unknown");
    serve.wait_for_log("downstream closed by Local");
}

#[test]
fn a_tcp_connection_whose_upstream_never_answers_is_closed_after_the_connect_timeout() {
    let unanswering = Unanswering::start();
    // The cluster's connect timeout is 1 s (5 s unless set).
    let serve = serve_tcp(unanswering.address, "tcp_filter", "", &[]);
    assert_closed_after_a_1s_connect_timeout(serve.port);
    serve.wait_for_log("upstream closed by Unknown");
    serve.wait_for_no_live_contexts();
}

#[test]
fn a_network_filter_holds_a_connection_until_an_http_call_lets_it_through() {
    let echo = Echo::start();
    let gate = Origin::start();
    let serve = serve_tcp(
        echo.address,
        "tcp_filter",
        "gate gate",
        &[("gate", gate.address)],
    );
    // The first bytes wait for the gate's answer; the ones sent meanwhile wait with them.
    assert_eq!(
        tcp_exchange(serve.port, &["let ", "me ", "in"]),
        "[up] LET ME IN"
    );
    serve.wait_for_log("gate answered 200");
    assert_eq!(gate.requests.load(Ordering::Relaxed), 1);
    // The call carried the first chunk as the client sent it.
    assert_eq!(*gate.last_body.lock().unwrap(), "let ");
    serve.wait_for_no_live_contexts();
}

#[test]
fn a_network_filter_whose_gate_cannot_be_reached_closes_the_connection_unforwarded() {
    let echo = Echo::start();
    let nowhere: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("an address");
    let serve = serve_tcp(
        echo.address,
        "tcp_filter",
        "gate gate",
        &[("gate", nowhere)],
    );
    assert_eq!(tcp_exchange(serve.port, &["let me in"]), "");
    serve.wait_for_log("gate answered nothing");
    serve.wait_for_log("downstream closed by Local");
    serve.wait_for_no_live_contexts();
}

/// Sends `request` as is on a new connection to `port`; returns the response's status line
/// (empty if the proxy closed the connection without answering within 5 s).
fn raw_status_line(port: u16, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut connection = TcpStream::connect(("127.0.0.1", port)).expect("the proxy accepts");
    connection
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a read timeout");
    let _ = connection.write_all(request);
    let mut received = Vec::new();
    let mut buffer = [0u8; 1024];
    while !received.windows(2).any(|w| w == b"\r\n") {
        match connection.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(count) => received.extend_from_slice(&buffer[..count]),
        }
    }
    let text = String::from_utf8_lossy(&received);
    text.lines().next().unwrap_or("").to_string()
}

#[test]
fn malformed_or_oversized_requests_are_refused_before_any_plugin_or_upstream_sees_them() {
    let origin = Origin::start();
    // The plugin answers 403 to any request without the key: a 400 or 431 shows it never ran.
    let serve = Serve::start(
        origin.address,
        &[envoy_filter("api_key", "local_response", "secret")],
    );
    let many_headers: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let big_header = format!("x-big: {}\r\n", "a".repeat(61 * 1024));
    let cases: [(&str, Vec<u8>); 4] = [
        (
            "HTTP/1.1 400",
            b"GET / HTTP/1.1\r\nHost: x\r\nthis is no header\r\n\r\n".to_vec(),
        ),
        (
            "HTTP/1.1 400",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n\r\n".to_vec(),
        ),
        // Envoy's limits: 100 headers, 60 KiB of headers.
        (
            "HTTP/1.1 431",
            format!("GET / HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n").into_bytes(),
        ),
        (
            "HTTP/1.1 431",
            format!("GET / HTTP/1.1\r\nHost: x\r\n{big_header}\r\n").into_bytes(),
        ),
    ];
    for (expected, request) in cases {
        let status = raw_status_line(serve.port, &request);
        assert!(
            status.starts_with(expected),
            "{status:?} for {:?}",
            String::from_utf8_lossy(&request[..40])
        );
    }
    assert_eq!(origin.requests.load(Ordering::Relaxed), 0);
    // Just under the limits, the plugin decides.
    let fine_headers: String = (0..90).map(|i| format!("x-h{i}: v\r\n")).collect();
    let status = raw_status_line(
        serve.port,
        format!("GET / HTTP/1.1\r\nHost: x\r\n{fine_headers}\r\n").as_bytes(),
    );
    assert!(status.starts_with("HTTP/1.1 403"), "{status:?}");
}

/// Starts a slow request, sends `signal` to the proxy while it is at the origin, and checks the
/// drain: no new connection is accepted, the request still gets its whole answer, the process
/// exits 0 once it is done.
fn drains_on(signal: &str) {
    let origin = Origin::start();
    let mut serve = Serve::start(
        origin.address,
        &[envoy_filter("api_key", "local_response", "secret")],
    );
    let url = serve.url("/slow");
    let in_flight = std::thread::spawn(move || get(&url, &[("x-api-key", "secret")]));
    // The request is at the origin (which takes 1.5 s) when the proxy is told to stop.
    origin.wait_for_a_request();
    let status = Command::new("kill")
        .args([signal, &serve.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    // It stops accepting at once, while the request is still in flight.
    assert!(
        refuses_connections(serve.port, Duration::from_secs(1)),
        "still accepting:\n{}",
        serve.log()
    );
    assert!(
        !in_flight.is_finished(),
        "the request ended before the listener closed"
    );
    let reply = in_flight.join().expect("the client");
    assert_eq!(reply.status, 200, "{}", serve.log());
    assert!(reply.body.contains("hello from origin"), "{}", reply.body);
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = serve.child.try_wait().expect("the process") {
            break exit;
        }
        assert!(Instant::now() < deadline, "still running:\n{}", serve.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}:\n{}", serve.log());
    assert!(serve.log().contains("drained: exiting"), "{}", serve.log());
}

/// The proxy of [`drains_on`], with `drain_timeout` written, and a slow request in flight
/// at its origin.
fn draining_with(
    drain_timeout: &str,
) -> (
    Origin,
    Serve,
    std::thread::JoinHandle<Result<Reply, String>>,
) {
    let origin = Origin::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (port, admin_port) = (free_port(), free_port());
    let config = format!(
        "workers: 1\ndrain_timeout: {drain_timeout}\nadmin: {{address: 127.0.0.1:{admin_port}}}\n\
         listeners:\n  - name: main\n    address: 127.0.0.1:{port}\n    \
         routes: [{{cluster: backend}}]\n    http_filters:\n{}clusters:\n  \
         backend: {{endpoints: [\"{}\"]}}\n",
        envoy_filter("headers", "http_headers", ""),
        origin.address
    );
    let serve = Serve::launch(dir, port, admin_port, &config);
    let url = serve.url("/stalled");
    let in_flight = std::thread::spawn(move || try_get(&url, &[]));
    // The request is at the origin, which answers after 30 s, long after any drain here.
    origin.wait_for_a_request();
    (origin, serve, in_flight)
}

/// Waits (at most 20 s) for the proxy to exit.
fn exit_of(serve: &mut Serve) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(exit) = serve.child.try_wait().expect("the process") {
            return exit;
        }
        assert!(Instant::now() < deadline, "still running:\n{}", serve.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_stream_outlasting_the_drain_timeout_is_cut_and_the_proxy_exits() {
    // 0.3 s to drain, a request that needs 30 s.
    let (_origin, mut serve, in_flight) = draining_with("0.3s");
    let pid = serve.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let exit = exit_of(&mut serve);
    assert!(exit.success(), "{exit:?}:\n{}", serve.log());
    assert_cut(
        &serve,
        in_flight,
        "drain timeout: exiting with streams in flight",
    );
}

/// The proxy logged `why` it exited, and the request `in_flight` never got its whole answer.
fn assert_cut(serve: &Serve, in_flight: std::thread::JoinHandle<Result<Reply, String>>, why: &str) {
    assert!(serve.log().contains(why), "{}", serve.log());
    let reply = in_flight.join().expect("the client");
    assert!(
        reply
            .as_ref()
            .map_or(true, |reply| !reply.body.contains("hello from origin")),
        "the stream in flight was not cut: {reply:?}"
    );
}

#[test]
fn a_second_signal_while_draining_exits_at_once() {
    // The default 10 s to drain, a request that needs 30 s: the second signal does not wait.
    let (_origin, mut serve, in_flight) = draining_with("10s");
    let pid = serve.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    assert!(
        refuses_connections(serve.port, Duration::from_secs(1)),
        "still accepting:\n{}",
        serve.log()
    );
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill")
        .success());
    let exit = exit_of(&mut serve);
    assert_eq!(exit.code(), Some(1), "{exit:?}:\n{}", serve.log());
    assert_cut(
        &serve,
        in_flight,
        "second signal while draining: exiting now",
    );
}

#[test]
fn sigterm_stops_accepting_lets_streams_in_flight_finish_then_exits_cleanly() {
    drains_on("-TERM");
}

#[test]
fn sigint_drains_as_sigterm_does() {
    drains_on("-INT");
}

/// A gRPC server (tonic) for the plugins' calls, on a thread of its own until dropped:
/// `pwhost.Auth/Check` answers `checked <message> (x-meta <value>)`, or PERMISSION_DENIED
/// (7, `not you`) while `deny` is set; `pwhost.Echo/Stream` answers with initial metadata
/// `x-init: ready`, then `echo: <first message>`, then ends with status OK;
/// `pwhost.Echo/Hold` answers with the same initial metadata and nothing more, reads the
/// client's messages one every 50 ms and notes in `held` how many came before their stream
/// ended.
struct GrpcUpstream {
    address: SocketAddr,
    deny: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    held: Arc<std::sync::Mutex<Option<String>>>,
    _server: Background,
}

mod grpc_upstream {
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use tonic::codegen::{http, BoxFuture, Service};
    use tonic::{Request, Response, Status, Streaming};

    #[derive(Clone)]
    pub struct Upstream {
        pub deny: Arc<AtomicBool>,
        pub calls: Arc<AtomicUsize>,
        pub held: Arc<std::sync::Mutex<Option<String>>>,
    }

    impl Service<http::Request<tonic::body::Body>> for Upstream {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
            let upstream = self.clone();
            Box::pin(async move {
                upstream.calls.fetch_add(1, Ordering::Relaxed);
                let mut grpc = tonic::server::Grpc::new(serve::RawCodec);
                Ok(match request.uri().path() {
                    "/pwhost.Auth/Check" => grpc.unary(Check(upstream.deny), request).await,
                    "/pwhost.Echo/Stream" => grpc.streaming(Echo, request).await,
                    "/pwhost.Echo/Hold" => grpc.streaming(Hold(upstream.held), request).await,
                    _ => Status::unimplemented("no such method").into_http(),
                })
            })
        }
    }

    struct Check(Arc<AtomicBool>);

    impl tonic::server::UnaryService<Bytes> for Check {
        type Response = Bytes;
        type Future = BoxFuture<Response<Bytes>, Status>;

        fn call(&mut self, request: Request<Bytes>) -> Self::Future {
            let deny = self.0.load(Ordering::Relaxed);
            Box::pin(async move {
                if deny {
                    return Err(Status::permission_denied("not you"));
                }
                let meta = request
                    .metadata()
                    .get("x-meta")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_string();
                let message = String::from_utf8_lossy(request.get_ref()).into_owned();
                Ok(Response::new(Bytes::from(format!(
                    "checked {message} (x-meta {meta})"
                ))))
            })
        }
    }

    struct Echo;

    type Replies = Pin<Box<dyn tokio_stream::Stream<Item = Result<Bytes, Status>> + Send>>;

    impl tonic::server::StreamingService<Bytes> for Echo {
        type Response = Bytes;
        type ResponseStream = Replies;
        type Future = BoxFuture<Response<Replies>, Status>;

        fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
            Box::pin(async move {
                let mut incoming = request.into_inner();
                let first = incoming.message().await?.unwrap_or_default();
                let reply = Bytes::from([b"echo: ".as_slice(), &first].concat());
                let replies: Replies = Box::pin(tokio_stream::iter([Ok(reply)]));
                let mut response = Response::new(replies);
                response.metadata_mut().insert(
                    "x-init",
                    tonic::metadata::MetadataValue::from_static("ready"),
                );
                Ok(response)
            })
        }
    }
    /// Answers with initial metadata and no message, never ends, and reads slowly.
    struct Hold(Arc<std::sync::Mutex<Option<String>>>);

    impl tonic::server::StreamingService<Bytes> for Hold {
        type Response = Bytes;
        type ResponseStream = Replies;
        type Future = BoxFuture<Response<Replies>, Status>;

        fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
            let held = Arc::clone(&self.0);
            Box::pin(async move {
                let mut incoming = request.into_inner();
                tokio::spawn(async move {
                    let mut messages = 0;
                    // (A reset shows as an end here too: hyper ends a request body reset with
                    // CANCEL as if it ended cleanly.)
                    let outcome = loop {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        match incoming.message().await {
                            Ok(Some(_)) => messages += 1,
                            Ok(None) => break format!("ended after {messages} messages"),
                            Err(status) => break format!("failed after {messages}: {status}"),
                        }
                    };
                    *held.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
                });
                let replies: Replies = Box::pin(tokio_stream::pending());
                let mut response = Response::new(replies);
                response.metadata_mut().insert(
                    "x-init",
                    tonic::metadata::MetadataValue::from_static("ready"),
                );
                Ok(response)
            })
        }
    }
}

impl GrpcUpstream {
    /// How the request stream of a `/pwhost.Echo/Hold` call ended, once it did (waiting at most
    /// `within`).
    fn held_outcome(&self, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            let outcome = self.held.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if outcome.is_some() || Instant::now() >= deadline {
                return outcome;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start() -> GrpcUpstream {
        let deny = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(std::sync::Mutex::new(None));
        let upstream = grpc_upstream::Upstream {
            deny: Arc::clone(&deny),
            calls: Arc::clone(&calls),
            held: Arc::clone(&held),
        };
        let server = Background::start(move |listener, stopped| async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(upstream, incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        GrpcUpstream {
            address: server.address,
            deny,
            calls,
            held,
            _server: server,
        }
    }
}

#[test]
fn a_unary_grpc_call_holds_the_request_until_its_reply_or_failure_comes() {
    let origin = Origin::start();
    let upstream = GrpcUpstream::start();
    let serve = Serve::start_with(
        origin.address,
        &[envoy_filter("grpc", "grpc_call", "")],
        &[("grpc_cluster", upstream.address)],
    );
    // The reply (over HTTP/2, gRPC framing) reaches the plugin, which puts it on the request.
    let reply = get(&serve.url("/checked"), &[]);
    assert_eq!(reply.status, 200, "{}\n{}", reply.body, serve.log());
    assert!(
        reply
            .body
            .contains("x-grpc-reply: checked request-bytes (x-meta 1)"),
        "{}",
        reply.body
    );
    // A failure status goes to the plugin's close callback with its message.
    upstream.deny.store(true, Ordering::Relaxed);
    let denied = get(&serve.url("/denied"), &[]);
    assert_eq!(denied.status, 503);
    assert_eq!(denied.body, "grpc failed: 7 not you");
    assert_eq!(upstream.calls.load(Ordering::Relaxed), 2);
    // A reload that moves the cluster to another server: the workers' channels to the old
    // endpoint are not used again.
    let moved = GrpcUpstream::start();
    let text = std::fs::read_to_string(&serve.config).expect("the configuration");
    let text = text.replace(&upstream.address.to_string(), &moved.address.to_string());
    std::fs::write(&serve.config, text).expect("the moved cluster");
    let reloaded = send("POST", &serve.admin_url("/reload"), &[], Some(""));
    assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    for _ in 0..4 {
        let reply = get(&serve.url("/checked"), &[]);
        assert_eq!(reply.status, 200, "{}\n{}", reply.body, serve.log());
    }
    assert_eq!(moved.calls.load(Ordering::Relaxed), 4);
    assert_eq!(upstream.calls.load(Ordering::Relaxed), 2);
    serve.wait_for_no_live_contexts();
}

#[test]
fn a_grpc_call_to_an_unreachable_cluster_closes_with_unavailable() {
    let origin = Origin::start();
    let nowhere: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("an address");
    let serve = Serve::start_with(
        origin.address,
        &[envoy_filter("grpc", "grpc_call", "")],
        &[("grpc_cluster", nowhere)],
    );
    let reply = get(&serve.url("/"), &[]);
    assert_eq!(reply.status, 503);
    assert!(reply.body.starts_with("grpc failed: 14"), "{}", reply.body);
    assert_eq!(origin.requests.load(Ordering::Relaxed), 0);
}

#[test]
fn a_grpc_stream_delivers_metadata_messages_and_its_close_to_the_plugin() {
    let origin = Origin::start();
    let upstream = GrpcUpstream::start();
    let serve = Serve::streaming_grpc(origin.address, &upstream);
    let reply = get(&serve.url("/streamed"), &[]);
    assert_eq!(reply.status, 200, "{}\n{}", reply.body, serve.log());
    // The plugin resumed the request from the stream's close, with its status.
    assert!(reply.body.contains("x-stream-status: 0"), "{}", reply.body);
    serve.wait_for_log("initial metadata x-init: ready");
    serve.wait_for_log("stream message: echo: hello");
    serve.wait_for_log("trailing metadata count");
    // A plugin ending its side with its last message (end_of_stream) sends that message and a
    // clean end: the stream closes OK, not reset.
    let reply = get(&serve.url("/last"), &[("x-last", "1")]);
    assert_eq!(reply.status, 200, "{}\n{}", reply.body, serve.log());
    assert!(
        reply.body.contains("x-stream-status: 0"),
        "{}\n{}",
        reply.body,
        serve.log()
    );
}

/// A plugin sending on a gRPC stream faster than the upstream takes its messages, once the
/// upstream answered: past 16 MiB unsent the stream is reset and the plugin gets its close with
/// RESOURCE_EXHAUSTED (8), so a plugin cannot grow the proxy's memory without end; the sends
/// after it are dropped without an error the SDKs would panic on, and what was queued is
/// dropped with the stream instead of still going to the upstream.
#[test]
fn a_grpc_stream_whose_plugin_sends_faster_than_the_upstream_takes_is_reset() {
    let origin = Origin::start();
    let upstream = GrpcUpstream::start();
    let serve = Serve::streaming_grpc(origin.address, &upstream);
    // 24 messages of 1 MiB in one callback, to an upstream taking one every 50 ms.
    let reply = get(&serve.url("/flood"), &[("x-flood", "24")]);
    assert_eq!(reply.status, 200, "{}\n{}", reply.body, serve.log());
    assert!(
        reply.body.contains("x-stream-status: 8"),
        "{}\n{}",
        reply.body,
        serve.log()
    );
    serve.wait_for_log("bytes the upstream has not taken: the stream is reset");
    // `hello` and the first 16 MiB were queued before the limit; of them, only what was on
    // its way when the stream was reset reaches the upstream.
    let (messages, held) = held_messages(&upstream, &serve);
    assert!(messages <= 8, "{held}: the queued messages still went out");
    // A stream within the bound goes on as before.
    let reply = get(&serve.url("/streamed"), &[]);
    assert!(reply.body.contains("x-stream-status: 0"), "{}", reply.body);
}

/// A plugin cancelling its stream ends it with nothing more sent: the messages it queued in the
/// same callback do not reach the upstream. (The test upstream cannot tell a reset from a clean
/// end: hyper ends a request body reset with CANCEL as if it ended cleanly.)
#[test]
fn a_grpc_stream_its_plugin_cancels_sends_nothing_more() {
    let origin = Origin::start();
    let upstream = GrpcUpstream::start();
    let serve = Serve::streaming_grpc(origin.address, &upstream);
    let reply = get(&serve.url("/cancel"), &[("x-cancel", "5")]);
    assert_eq!(reply.status, 200, "{}\n{}", reply.body, serve.log());
    assert!(reply.body.contains("x-cancelled: 5"), "{}", reply.body);
    // `hello` may have gone out before the cancel; none of the five queued with it.
    let (messages, held) = held_messages(&upstream, &serve);
    assert!(messages <= 1, "{held}: the queued messages still went out");
}

/// How many messages a `/pwhost.Echo/Hold` call of `upstream` took before its stream ended
/// (waiting at most 20 s), with how it ended.
fn held_messages(upstream: &GrpcUpstream, serve: &Serve) -> (usize, String) {
    let held = upstream
        .held_outcome(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the upstream's stream never ended\n{}", serve.log()));
    // "ended after N messages" or "failed after N: <status>"
    let messages = held
        .split_whitespace()
        .nth(2)
        .and_then(|count| count.trim_end_matches(':').parse().ok())
        .unwrap_or_else(|| panic!("{held}"));
    (messages, held)
}

/// Sends a gRPC-shaped request (HTTP/2 without TLS, `content-type: application/grpc`) with
/// `headers`; returns the response's status line and headers as curl prints them.
fn grpc_request(url: &str, headers: &[&str]) -> String {
    let mut command = Command::new("curl");
    command.args([
        "-sS",
        "--http2-prior-knowledge",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        "content-type: application/grpc",
        "--data-binary",
        "",
    ]);
    for header in headers {
        command.args(["-H", header]);
    }
    let output = command
        .arg(url)
        .output()
        .expect("curl runs (apt-get install curl)");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A unary call from a gRPC client (tonic's, HTTP/2 without TLS) to `base` + `path`, with an
/// empty message.
fn grpc_client_call(base: &str, path: &str) -> Result<bytes::Bytes, tonic::Status> {
    grpc_unary(base, path, "", &[]).map(|(message, _)| message)
}

/// A unary call from tonic's gRPC client with `message` and `metadata`: the reply and its
/// metadata (headers and trailers: tonic merges them for a unary call).
fn grpc_unary(
    base: &str,
    path: &str,
    message: &str,
    metadata: &[(&'static str, &'static str)],
) -> Result<(bytes::Bytes, tonic::metadata::MetadataMap), tonic::Status> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(base.to_string())
            .expect("an endpoint")
            .connect()
            .await
            .expect("the proxy accepts");
        let mut client = tonic::client::Grpc::new(channel);
        client.ready().await.expect("a ready channel");
        let path = tonic::codegen::http::uri::PathAndQuery::try_from(path).expect("a path");
        let mut request = tonic::Request::new(bytes::Bytes::from(message.to_string()));
        for (name, value) in metadata {
            request
                .metadata_mut()
                .insert(*name, tonic::metadata::MetadataValue::from_static(value));
        }
        client
            .unary(request, path, serve::RawCodec)
            .await
            .map(|response| {
                let (metadata, message, _) = response.into_parts();
                (message, metadata)
            })
    })
}

/// A stream held by one plugin times out at the stream idle timeout from the start of the hold,
/// even while another plugin of the chain keeps continuing its own part of the stream from a
/// timer: a wake-up that decides nothing is no activity on the stream.
#[test]
fn a_held_stream_times_out_whatever_another_plugin_continues_meanwhile() {
    let origin = Origin::start();
    // Never answers: the call would fail only at the plugin's 5 s.
    let silent = TcpListener::bind("127.0.0.1:0").expect("a listener that never answers");
    let serve = Serve::start_configured(
        origin.address,
        "    stream_idle_timeout: 1s\n",
        &[
            envoy_filter("auth", "http_call", ""),
            envoy_filter("ticker", "wat/continue_ticker", ""),
        ],
        &[("auth_cluster", silent.local_addr().expect("its address"))],
    );
    let reply = get(&serve.url("/held"), &[]);
    assert_eq!(reply.status, 408, "{}\n{}", reply.body, serve.log());
    serve.wait_for_log("continue_ticker: continued");
    assert_eq!(origin.requests.load(Ordering::Relaxed), 0);
}

#[test]
fn a_held_request_whose_body_does_not_come_ends_at_the_stream_idle_timeout_with_nothing_sent_up() {
    let origin = Origin::start();
    let checker = Origin::start();
    let serve = Serve::start_configured(
        origin.address,
        "    stream_idle_timeout: 1s\n    max_request_headers_kb: 200\n",
        &[envoy_filter_with(
            "body_check",
            "http_call",
            "",
            "allow_on_headers_stop_iteration: true",
        )],
        &[("auth_cluster", checker.address)],
    );
    // A client that stops half-way through its body while the plugin waits for its end.
    let stalled = raw_status_line(
        serve.port,
        b"POST /stalled HTTP/1.1\r\nhost: a\r\nx-check-body: before-headers\r\n\
          content-length: 100\r\n\r\nhalf",
    );
    assert!(
        stalled.starts_with("HTTP/1.1 408"),
        "{stalled}\n{}",
        serve.log()
    );
    // Headers so large that the body bytes which came with them could overflow what Pingora
    // replays: that body is not read ahead (it could be lost), so a plugin waiting for its end
    // waits for the timeout too, and nothing goes upstream.
    let mut request = format!(
        "POST /large HTTP/1.1\r\nhost: a\r\nx-check-body: before-headers\r\n\
         x-filler: {}\r\ncontent-length: 100000\r\n\r\n",
        "x".repeat(150 * 1024)
    )
    .into_bytes();
    request.extend_from_slice(numbered_body(100_000).as_bytes());
    let large = raw_status_line(serve.port, &request);
    assert!(
        large.starts_with("HTTP/1.1 408"),
        "{large}\n{}",
        serve.log()
    );
    serve.wait_for_no_live_contexts();
    assert_eq!(origin.requests.load(Ordering::Relaxed), 0);
    assert_eq!(checker.requests.load(Ordering::Relaxed), 0);
}

#[test]
fn a_body_read_ahead_while_the_headers_were_held_reaches_an_http2_upstream_whole() {
    let upstream = GrpcUpstream::start();
    let serve = Serve::in_front_of_grpc(
        &upstream,
        &[envoy_filter_with(
            "first_chunk",
            "http_call",
            "",
            "allow_on_headers_stop_iteration: true",
        )],
    );
    // The plugin holds the headers until the first chunk (one frame: the message is read
    // ahead whole), then past what is read ahead (the rest comes after the replay).
    for size in [10, 200 * 1024] {
        let message = numbered_body(size.max(16));
        let (reply, _) = grpc_unary(
            &serve.url(""),
            "/pwhost.Auth/Check",
            &message,
            &[("x-check-body", "first-chunk"), ("x-meta", "1")],
        )
        .unwrap_or_else(|status| panic!("the call failed: {status:?}\n{}", serve.log()));
        assert!(
            reply[..] == *format!("checked {message} (x-meta 1)").as_bytes(),
            "{size} bytes: the message changed on its way"
        );
    }
    serve.wait_for_log("first chunk: ");
}

#[test]
fn grpc_through_the_proxy_reaches_the_plugins_with_its_bodies_and_trailers() {
    let upstream = GrpcUpstream::start();
    let serve = Serve::in_front_of_grpc(
        &upstream,
        &[
            envoy_filter("headers", "http_headers", ""),
            envoy_filter("rewrite", "body_rewrite", ""),
        ],
    );
    let (message, metadata) = grpc_unary(
        &serve.url(""),
        "/pwhost.Auth/Check",
        "hello",
        &[("x-meta", "hello")],
    )
    .unwrap_or_else(|status| panic!("the call failed: {status:?}\n{}", serve.log()));
    // Up: the request body upper-cased by `rewrite`. Down: the reply has no last body chunk
    // (its trailers end it), so `rewrite` buffered it until its trailers callback, rewrote it
    // there, and it went on to the client before the trailers.
    assert_eq!(&message[..], b"checked HELLO (x-meta howdy)");
    let trailer = |name: &str| {
        metadata
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
    };
    // Both plugins changed the upstream's trailers, in response order: `rewrite` first
    // (5-byte gRPC frame header and 28 bytes of message), then `headers`, which saw that.
    assert_eq!(trailer("x-body-rewritten").as_deref(), Some("33"));
    assert_eq!(trailer("x-pwhost-trailer").as_deref(), Some("seen"));
    assert_eq!(trailer("x-powered-by").as_deref(), Some("pwhost"));
    serve.wait_for_log("response trailer: x-body-rewritten: 33");
    serve.wait_for_log("response trailer: grpc-status: 0");
    // The trailers stay readable in `proxy_on_log`.
    serve.wait_for_log("done: /pwhost.Auth/Check (grpc-status 0)");
    // Written in order, without Pingora (or pwhost) complaining about it.
    let log = serve.log();
    assert!(!log.contains("WARN") && !log.contains("ERROR"), "{log}");
    // An HTTP/1.1 client gets no trailers (Pingora writes none to it), but the whole body.
    let plain = send(
        "POST",
        &serve.url("/pwhost.Auth/Check"),
        &[("content-type", "application/grpc"), ("x-meta", "hello")],
        Some("\0\0\0\0\x05hello"),
    );
    assert_eq!(plain.status, 200);
    assert_eq!(plain.body, "\0\0\0\0\x1cchecked HELLO (x-meta howdy)");
    // A plugin resetting the stream at its trailers: the client sees the stream reset, not a
    // reply without its status; the proxy logs no error of its own for it.
    let reset = grpc_unary(
        &serve.url(""),
        "/pwhost.Auth/Check",
        "hello",
        &[("x-reset-at-trailers", "1")],
    )
    .expect_err("the stream is reset");
    assert!(
        matches!(reset.code(), tonic::Code::Internal | tonic::Code::Unknown),
        "{reset:?}"
    );
    serve.wait_for_log("resetting the stream at its trailers");
    let log = serve.log();
    assert!(!log.contains("ERROR"), "{log}");
    // Counted as what it is: a reset, by a plugin.
    serve.wait_for_samples(&[(
        "pwhost_resets_total{listener=\"main\",cause=\"plugin\"}",
        1.0,
    )]);
    // A failed call's status comes back as the upstream's trailers said, through the plugins.
    upstream.deny.store(true, Ordering::Relaxed);
    let status = grpc_unary(&serve.url(""), "/pwhost.Auth/Check", "hi", &[])
        .expect_err("the upstream denies");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "not you");
    serve.wait_for_no_live_contexts();
}

#[test]
fn a_grpc_client_gets_local_replies_and_failures_as_grpc_statuses() {
    let closed = free_port();
    let serve = Serve::start(
        ([127, 0, 0, 1], closed).into(),
        &[
            envoy_filter("api_key", "local_response", "secret"),
            envoy_filter("panics", "panics", ""),
        ],
    );
    // A gRPC client (tonic's) reads the plugin's 403 as PERMISSION_DENIED with the body as
    // the message.
    let status = grpc_client_call(&serve.url(""), "/pwhost.Auth/Check").expect_err("a failed call");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "access denied\n");
    // On the wire: 200, then the status and the percent-encoded message.
    let denied = grpc_request(&serve.url("/pwhost.Auth/Check"), &[]);
    assert!(denied.starts_with("HTTP/2 200"), "{denied}");
    assert!(denied.contains("grpc-status: 7\r\n"), "{denied}");
    assert!(
        denied.contains("grpc-message: access denied%0A\r\n"),
        "{denied}"
    );
    assert!(
        denied.contains("content-type: application/grpc"),
        "{denied}"
    );
    // An unreachable upstream and a plugin failing closed are UNAVAILABLE, as in Envoy.
    let unreachable = grpc_request(&serve.url("/pwhost.Auth/Check"), &["x-api-key: secret"]);
    assert!(unreachable.contains("grpc-status: 14\r\n"), "{unreachable}");
    // A plain HTTP client still gets the plain reply.
    let plain = get(&serve.url("/"), &[]);
    assert_eq!(plain.status, 403);
    assert_eq!(plain.header("content-type"), Some("text/plain"));
    let failed = grpc_request(
        &serve.url("/pwhost.Auth/Check"),
        &["x-api-key: secret", "x-panic: boom"],
    );
    assert!(failed.starts_with("HTTP/2 200"), "{failed}");
    assert!(failed.contains("grpc-status: 14\r\n"), "{failed}");
}

#[test]
fn a_large_transfer_both_ways_at_once_neither_stalls_nor_loses_a_byte() {
    use std::io::{Read, Write};
    let echo = Echo::start();
    // A small buffer limit: the proxy must pace each side by the other, not buffer it all.
    let serve = serve_tcp_with(
        echo.address,
        "tcp_filter",
        "",
        &[],
        "    per_connection_buffer_limit_bytes: 65536\n",
    );
    let size = 8 << 20;
    let connection = TcpStream::connect(("127.0.0.1", serve.port)).expect("the proxy accepts");
    connection
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("a read timeout");
    let mut writer = connection.try_clone().expect("a second handle");
    let sending = std::thread::spawn(move || {
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..size / chunk.len() {
            writer.write_all(&chunk).expect("the proxy keeps reading");
        }
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("a half-close");
    });
    let mut received = Vec::new();
    (&connection)
        .read_to_end(&mut received)
        .expect("the whole echo comes back");
    sending.join().expect("the sender");
    assert_eq!(received.len(), size + "[up] ".len());
    assert!(received.starts_with(b"[up] A"));
    assert!(received[5..].iter().all(|&b| b == b'A'));
    serve.wait_for_no_live_contexts();
}

#[test]
fn a_tcp_connection_without_traffic_is_closed_after_the_idle_timeout() {
    use std::io::Read;
    let echo = Echo::start();
    let serve = serve_tcp_with(
        echo.address,
        "tcp_filter",
        "",
        &[],
        "    idle_timeout: 0.3s\n",
    );
    let mut connection = TcpStream::connect(("127.0.0.1", serve.port)).expect("the proxy accepts");
    connection
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    let started = Instant::now();
    let mut received = Vec::new();
    let _ = connection.read_to_end(&mut received);
    assert!(received.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    serve.wait_for_log("downstream closed by Local");
    serve.wait_for_no_live_contexts();
}

#[test]
fn traffic_one_way_keeps_a_tcp_connection_open_past_the_idle_timeout() {
    let sink = Sink::start();
    let serve = serve_tcp_with(
        sink.address,
        "tcp_filter",
        "",
        &[],
        "    idle_timeout: 1s\n",
    );
    // To an upstream that never sends: the connection's idle timer restarts on traffic either
    // way. Once the traffic stops, the connection is closed after the timeout.
    assert_one_way_traffic_outlives_a_1s_idle_timeout(serve.port);
    serve.wait_for_log("downstream closed by Local");
    serve.wait_for_no_live_contexts();
}

#[test]
fn a_slow_client_keeps_a_tcp_connection_open_past_the_idle_timeout_while_it_reads() {
    const FLOOD: usize = 16 << 20;
    // An upstream that sends everything at once and falls quiet: the proxy writes it to the
    // client as fast as the client reads, which takes several timeouts. Then one that resets
    // its connection after sending, found when the client's next bytes cannot be passed on:
    // the client still gets all it sent, then the close.
    for (upstream, chatty) in [
        (Flood::start(FLOOD), false),
        (Flood::then_reset(FLOOD), true),
    ] {
        let serve = serve_tcp_with(
            upstream.address,
            "tcp_filter",
            "",
            &[],
            "    idle_timeout: 1s\n    per_connection_buffer_limit_bytes: 33554432\n",
        );
        if let Err(error) = a_slow_reader_gets_all_of_a_flood_past_a_1s_idle_timeout(
            serve.port, FLOOD, "[up] ", chatty,
        ) {
            panic!("{error}\n{}", serve.log());
        }
        serve.wait_for_no_live_contexts();
        // The bytes the plugin reads as sent at the end are all the client got, what the
        // proxy flushed after the upstream's reset included.
        let log = serve.log();
        let line = log
            .lines()
            // Not the connection that found the port open, which sent nothing.
            .find(|line| line.contains("connection ended:") && !line.contains("ended: 0 bytes"))
            .unwrap_or_default();
        assert!(line.contains(&format!(", {} to it", FLOOD + 5)), "{line}");
    }
}

/// A singleton service block (Envoy's `envoy.bootstrap.wasm`) running `plugin` in VM `vm_id`
/// (`singleton: true`, which a test may replace).
fn envoy_service(name: &str, vm_id: &str, plugin: &str, configuration: &str) -> String {
    format!(
        "  - name: envoy.bootstrap.wasm\n    typed_config:\n      \
         \"@type\": type.googleapis.com/envoy.extensions.wasm.v3.WasmService\n      \
         singleton: true\n      config:\n        name: {name}\n        \
         configuration: {{\"@type\": type.googleapis.com/google.protobuf.StringValue, \
         value: \"{configuration}\"}}\n        vm_config:\n          vm_id: {vm_id}\n          \
         runtime: envoy.wasm.runtime.wasmtime\n          \
         code: {{local: {{filename: {}}}}}\n",
        corpus_plugin(plugin).display()
    )
}

/// The first reply to `GET /` (within 10 s) in which each of `headers` shows what a service
/// fetched (the filter shows `nothing yet` until the service's answer is in shared data).
fn reply_once_fetched(serve: &Serve, headers: &[&str]) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = get(&serve.url("/"), &[]);
        let fetched = |name: &&str| reply.header(name).is_some_and(|v| v != "nothing yet");
        if headers.iter().all(fetched) {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "the services' answers did not arrive: {reply:?}\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn singleton_services_call_clusters_over_http_and_grpc_and_the_workers_read_what_they_fetched() {
    let origin = Origin::start();
    let grpc = GrpcUpstream::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (port, admin_port) = (free_port(), free_port());
    // Each service calls while it starts (from `proxy_on_configure`) and stores the answer in
    // shared data of its VM id; a filter of the same VM id shows it on every response.
    let filter = |name: &str, vm_id: &str, configuration: &str| {
        format!(
            "      - name: {name}\n        vm_config: {{vm_id: {vm_id}, runtime: wasmtime, \
             code: {{local: {{filename: {}}}}}}}\n        configuration: \"{configuration}\"\n",
            corpus_plugin("root_http_call").display()
        )
    };
    let config =
        format!(
        "workers: 2\nadmin: {{address: 127.0.0.1:{admin_port}}}\nlisteners:\n  - name: main\n    \
         address: 127.0.0.1:{port}\n    routes: [{{prefix: /, cluster: backend}}]\n    \
         http_filters:\n{}{}clusters:\n  backend: {{endpoints: [\"{origin}\"]}}\n  \
         config_cluster: {{endpoints: [\"{origin}\"]}}\n  \
         grpc_cluster: {{endpoints: [\"{grpc}\"], http2: true}}\nservices:\n{}{}",
        filter("show_http", "http_fetch", "- x-fetched"),
        filter("show_grpc", "grpc_fetch", "- x-grpc-fetched"),
        envoy_service("fetch_http", "http_fetch", "root_http_call", "config_cluster"),
        envoy_service("fetch_grpc", "grpc_fetch", "root_http_call", "grpc grpc_cluster"),
        origin = origin.address,
        grpc = grpc.address,
    );
    let serve = Serve::launch(dir, port, admin_port, &config);
    let reply = reply_once_fetched(&serve, &["x-fetched", "x-grpc-fetched"]);
    assert_eq!(reply.status, 200);
    // The origin's answer to the service's `GET /config`: status and first line.
    assert_eq!(reply.header("x-fetched"), Some("200 GET /config"));
    // The gRPC server's reply to the service's unary call, status 0.
    assert_eq!(
        reply.header("x-grpc-fetched"),
        Some("grpc 0 checked root (x-meta none)")
    );
    assert!(
        serve.log().contains("root grpc call response"),
        "{}",
        serve.log()
    );
    // Each service is one VM; its calls are timed as the workers' are.
    let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
    for (name, value) in [
        ("pwhost_vm_copies{owner=\"service/fetch_http\"}", 1.0),
        ("pwhost_vm_copies{owner=\"service/fetch_grpc\"}", 1.0),
        (
            "pwhost_callout_duration_seconds_count{kind=\"http\",cluster=\"config_cluster\",\
             outcome=\"answered\"}",
            1.0,
        ),
        (
            "pwhost_callout_duration_seconds_count{kind=\"grpc\",cluster=\"grpc_cluster\",\
             outcome=\"answered\"}",
            1.0,
        ),
    ] {
        assert_eq!(sample(&metrics, name), Some(value), "{name} in:\n{metrics}");
    }
}

/// A singleton service whose VM fails ends its calls: a call without a timeout would otherwise
/// keep its upstream connection until the cluster's request timeout (2 minutes here), and a
/// gRPC stream for as long as the failed VM lives, which for a singleton service is for good.
#[test]
fn a_failed_singleton_service_ends_its_calls() {
    let origin = Origin::start();
    let checker = SilentChecker::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (port, admin_port) = (free_port(), free_port());
    let config = format!(
        "workers: 1\nadmin: {{address: 127.0.0.1:{admin_port}}}\nlisteners:\n  - name: main\n    \
         address: 127.0.0.1:{port}\n    routes: [{{prefix: /, cluster: backend}}]\n\
         clusters:\n  backend: {{endpoints: [\"{origin}\"]}}\n  auth_cluster: {{endpoints: \
         [\"{checker}\"], request_timeout: 120s}}\nservices:\n{}",
        envoy_service("failing", "failing", "wat/service_call_then_trap", ""),
        origin = origin.address,
        checker = checker.server.address,
    );
    let serve = Serve::launch(dir, port, admin_port, &config);
    // The call (made while the service starts) reaches the checker, which never answers; the
    // service's VM fails at its sixth tick, about 3 s later.
    wait_until(
        || !checker.heads.lock().unwrap().is_empty(),
        "service's call at the checker",
    );
    serve.wait_for_log("service: trapping");
    wait_until(
        || checker.closed.load(Ordering::Relaxed) == 1,
        "end of the failed service's call",
    );
    let log = serve.log();
    assert!(log.contains("service: called"), "{log}");
    assert!(!log.contains("service: answered"), "{log}");
    // The proxy itself goes on serving.
    assert_eq!(get(&serve.url("/"), &[]).status, 200);
}

#[test]
fn a_service_without_singleton_has_a_copy_on_every_worker_that_ticks_and_calls_clusters() {
    let origin = Origin::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (port, admin_port) = (free_port(), free_port());
    // Envoy's default for a WasmService: one VM copy per worker (two here), each ticking and
    // calling on its own; the fetching service stores the answer in shared data of its VM id,
    // which a filter of the same VM id shows on every response.
    let on_workers = |block: String| block.replace("singleton: true", "singleton: false");
    let config = format!(
        "workers: 2\nadmin: {{address: 127.0.0.1:{admin_port}}}\nlisteners:\n  - name: main\n    \
         address: 127.0.0.1:{port}\n    routes: [{{prefix: /, cluster: backend}}]\n    \
         http_filters:\n      - name: show_http\n        vm_config: {{vm_id: http_fetch, \
         runtime: wasmtime, code: {{local: {{filename: {}}}}}}}\n        configuration: \"- x-fetched\"\n\
         clusters:\n  backend: {{endpoints: [\"{origin}\"]}}\n  \
         config_cluster: {{endpoints: [\"{origin}\"]}}\nservices:\n{}{}",
        corpus_plugin("root_http_call").display(),
        on_workers(envoy_service("fetch_http", "http_fetch", "root_http_call", "config_cluster")),
        on_workers(envoy_service("ticking", "timers", "timers", "")),
        origin = origin.address,
    );
    let serve = Serve::launch(dir, port, admin_port, &config);
    // No request is needed for the services: each copy ticks three times, then stops.
    let deadline = Instant::now() + Duration::from_secs(10);
    while serve.log().matches("tick 3").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "two copies did not tick:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let reply = reply_once_fetched(&serve, &["x-fetched"]);
    assert_eq!(reply.header("x-fetched"), Some("200 GET /config"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(serve.log().matches("tick 4").count(), 0, "{}", serve.log());
    let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
    for (name, value) in [
        // Two services on two workers, besides the listener's own copies.
        ("pwhost_vm_copies{owner=\"services\"}", 4.0),
        (
            "pwhost_callout_duration_seconds_count{kind=\"http\",cluster=\"config_cluster\",\
             outcome=\"answered\"}",
            2.0,
        ),
    ] {
        assert_eq!(sample(&metrics, name), Some(value), "{name} in:\n{metrics}");
    }
}

/// A plain plugin block (the lifecycle layer's `PluginConfig`) for `plugin` with `extra`
/// fields (each a YAML line at the block's indentation).
fn plugin_block(name: &str, plugin: &str, configuration: &str, extra: &[&str]) -> String {
    let mut block = format!(
        "      - name: {name}\n        vm_config: {{runtime: wasmtime, code: {{local: \
         {{filename: {}}}}}}}\n        configuration: '{configuration}'\n",
        corpus_plugin(plugin).display()
    );
    for line in extra {
        block.push_str(&format!("        {line}\n"));
    }
    block
}

/// `GET` on a connection of its own, or why it failed (no panic: for client threads).
fn try_get(url: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    try_send(url, headers, None)
}

/// The value of `name` in an origin's echo of the request headers.
fn echoed<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
}

#[test]
fn shared_data_is_one_store_for_every_worker() {
    let origin = Origin::start();
    let serve = Serve::start(
        origin.address,
        &[plugin_block("count", "shared_data", "", &[])],
    );
    // A first stream makes the counter: the plugin's first write, to a key not there yet, is
    // unconditional (CAS 0), so two first streams at once could both write 1.
    let first = get(&serve.url("/"), &[]);
    assert_eq!(echoed(&first.body, "x-counter"), Some("1"), "{first:?}");
    // 40 streams on connections of their own, 8 at a time: the workers' copies count in one
    // store, with compare-and-swap, so every stream gets a number of its own.
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let url = serve.url("/");
            std::thread::spawn(move || {
                (0..5)
                    .map(|_| {
                        let reply = try_get(&url, &[])?;
                        echoed(&reply.body, "x-counter")
                            .and_then(|n| n.parse::<u32>().ok())
                            .ok_or_else(|| format!("no x-counter in {reply:?}"))
                    })
                    .collect::<Result<Vec<u32>, String>>()
            })
        })
        .collect();
    let mut counts: Vec<u32> = clients
        .into_iter()
        .flat_map(|client| {
            let counts = client.join().expect("a client");
            counts.unwrap_or_else(|e| panic!("{e}\n{}", serve.log()))
        })
        .collect();
    counts.sort_unstable();
    assert_eq!(counts, (2..=41).collect::<Vec<_>>());
    // The streams ran on both workers (connections go to the workers at random).
    let log = serve.log();
    let workers: std::collections::BTreeSet<&str> = log
        .lines()
        .filter(|line| line.contains("counter: "))
        .filter_map(|line| line.split("ThreadId(").nth(1)?.split(')').next())
        .collect();
    assert_eq!(workers.len(), 2, "{log}");
}

#[test]
fn each_failure_policy_holds_under_live_traffic() {
    let origin = Origin::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (admin_port, ports) = (free_port(), [free_port(), free_port(), free_port()]);
    let policies = [
        ("closed", "failure_policy: FAIL_CLOSED"),
        ("open", "failure_policy: FAIL_OPEN"),
        (
            "reload",
            "failure_policy: FAIL_RELOAD\n        \
             reload_config: {backoff: {base_interval: 0.2s, max_interval: 1s}}",
        ),
    ];
    let mut config =
        format!("workers: 2\nadmin: {{address: 127.0.0.1:{admin_port}}}\nlisteners:\n");
    for ((name, policy), port) in policies.iter().zip(ports) {
        config.push_str(&format!(
            "  - name: {name}\n    address: 127.0.0.1:{port}\n    \
             routes: [{{prefix: /, cluster: backend}}]\n    http_filters:\n{}",
            plugin_block("panics", "panics", "", &[policy])
        ));
    }
    config.push_str(&format!(
        "clusters:\n  backend: {{endpoints: [\"{}\"]}}\n",
        origin.address
    ));
    let serve = Serve::launch_listening(dir, &ports, admin_port, &config);
    let url = |index: usize| format!("http://127.0.0.1:{}/", ports[index]);
    // Two clients per listener send requests all along, each on a connection of its own.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|client| {
            let (url, stop) = (url(client % 3), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    statuses.push(try_get(&url, &[]).map(|reply| reply.status));
                }
                statuses
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // A trap in the plugin, on each listener.
    let trapped: Vec<u16> = (0..3)
        .map(|index| get(&url(index), &[("x-panic", "boom")]).status)
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let statuses: Vec<Vec<Result<u16, String>>> = clients
        .into_iter()
        .map(|client| client.join().expect("a client"))
        .collect();
    // FAIL_CLOSED and FAIL_RELOAD fail the stream in flight; FAIL_OPEN lets it through.
    assert_eq!(trapped, [503, 200, 503], "{}", serve.log());
    for (client, statuses) in statuses.iter().enumerate() {
        let (policy, _) = policies[client % 3];
        assert!(statuses.len() > 5, "{policy}: {statuses:?}");
        for status in statuses {
            match (policy, status) {
                // Streams on the other copies go on; streams on the failed copy are refused
                // (closed; reload until its backoff has passed) or bypass the plugin (open);
                // no stream hangs. A stream whose response was under way on the copy when it
                // failed is cut (as in Envoy: its VM is gone), except under FAIL_OPEN.
                (_, Ok(200)) | ("closed" | "reload", Ok(503) | Err(_)) => {}
                other => panic!("{policy}: {other:?} in {statuses:?}\n{}", serve.log()),
            }
        }
    }
    // Past the backoff, FAIL_RELOAD serves from a fresh copy on every worker again, and
    // FAIL_OPEN still bypasses its failed copy.
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..10 {
        assert_eq!(get(&url(2), &[]).status, 200, "{}", serve.log());
        assert_eq!(get(&url(1), &[]).status, 200, "{}", serve.log());
    }
    let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
    let count = |listener: &str, outcome: &str| {
        let name = format!(
            "pwhost_plugin_streams_total{{listener=\"{listener}\",plugin=\"panics\",\
             outcome=\"{outcome}\"}}"
        );
        sample(&metrics, &name).unwrap_or(0.0)
    };
    for listener in ["closed", "open", "reload"] {
        assert_eq!(
            count(listener, "failed_by_trap"),
            1.0,
            "{listener}:\n{metrics}"
        );
    }
    assert!(count("open", "bypassed") >= 1.0, "{metrics}");
    assert!(count("closed", "closed") >= 1.0, "{metrics}");
    assert!(count("reload", "reloads") >= 1.0, "{metrics}");
    // Each policy kept to itself: only FAIL_RELOAD made a fresh copy, only FAIL_OPEN bypassed.
    assert_eq!(count("closed", "reloads"), 0.0, "{metrics}");
    assert_eq!(count("open", "reloads"), 0.0, "{metrics}");
    assert_eq!(count("closed", "bypassed"), 0.0, "{metrics}");
    assert_eq!(count("reload", "bypassed"), 0.0, "{metrics}");
    serve.wait_for_no_live_contexts();
}

#[test]
fn plugins_of_one_name_in_one_chain_count_in_one_series() {
    let origin = Origin::start();
    // Two `panics` under one name, each in a VM of its own (two vm_ids), both failing open: a
    // request that makes both trap fails each once. Two samples with one set of labels would
    // make every scraper refuse the page, so the name's series holds both.
    let block = |vm_id: &str| {
        format!(
            "      - name: twice\n        vm_config: {{vm_id: {vm_id}, runtime: wasmtime, \
             code: {{local: {{filename: {}}}}}}}\n        failure_policy: FAIL_OPEN\n",
            corpus_plugin("panics").display()
        )
    };
    let serve = Serve::start(origin.address, &[block("first"), block("second")]);
    let reply = get(&serve.url("/"), &[("x-panic", "boom")]);
    assert_eq!(reply.status, 200, "both fail open\n{}", serve.log());
    let failed = "pwhost_plugin_streams_total{listener=\"main\",plugin=\"twice\",\
                  outcome=\"failed_by_trap\"}";
    serve.wait_for_samples(&[(failed, 2.0)]);
    let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
    let series = metrics
        .lines()
        .filter(|line| line.starts_with(failed))
        .count();
    assert_eq!(series, 1, "{metrics}");
}

#[test]
fn reloads_under_load_fail_no_request_and_new_streams_run_the_new_chain() {
    let origin = Origin::start();
    let configuration =
        |generation: u32| format!("{{\"header\": \"x-generation\", \"value\": \"{generation}\"}}");
    let serve = Serve::start(
        origin.address,
        &[plugin_block(
            "generation",
            "plugin_config",
            &configuration(1),
            &[],
        )],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (url, stop) = (serve.url("/"), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let reply = try_get(&url, &[]);
                    seen.push(reply.map(|reply| {
                        let generation =
                            echoed(&reply.body, "x-generation").and_then(|g| g.parse::<u32>().ok());
                        (reply.status, generation)
                    }));
                }
                seen
            })
        })
        .collect();
    // Three reloads while the clients run, each with the next generation's configuration.
    let mut text = std::fs::read_to_string(&serve.config).expect("the configuration");
    for generation in 2..=4 {
        std::thread::sleep(Duration::from_millis(300));
        text = text.replace(&configuration(generation - 1), &configuration(generation));
        std::fs::write(&serve.config, &text).expect("the next configuration");
        let reloaded = send("POST", &serve.admin_url("/reload"), &[], Some(""));
        assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let seen = client.join().expect("a client");
        let mut last = 1;
        for reply in &seen {
            // Every request answered by the origin, through one chain or the next: a client's
            // later stream never runs an older chain than its earlier one did.
            let (status, generation) = reply.clone().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(status, 200, "{seen:?}");
            let generation = generation.unwrap_or_else(|| panic!("no generation: {seen:?}"));
            assert!(generation >= last, "{seen:?}");
            last = generation;
        }
        assert_eq!(last, 4, "{seen:?}");
    }
    let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
    assert_eq!(
        sample(&metrics, "pwhost_reloads_total{outcome=\"done\"}"),
        Some(3.0),
        "{metrics}"
    );
    serve.wait_for_no_live_contexts();
}

#[test]
fn a_reload_puts_new_routes_and_clusters_in_force_and_refuses_what_needs_a_restart() {
    let (first, second) = (
        Origin::start(),
        Origin::answering_with(&[("x-origin", "second")]),
    );
    let serve = Serve::start(
        first.address,
        &[envoy_filter("headers", "http_headers", "")],
    );
    let from_second = |path: &str| get(&serve.url(path), &[]).header("x-origin") == Some("second");
    assert!(!from_second("/b"));
    // A new route, to a new cluster, ahead of the one there was.
    let text = std::fs::read_to_string(&serve.config).expect("the configuration");
    let routed = text.replace(
        "routes: [{prefix: /, cluster: backend}]",
        "routes: [{prefix: /b, cluster: other}, {prefix: /, cluster: backend}]",
    ) + &format!("  other: {{endpoints: [\"{}\"]}}\n", second.address);
    std::fs::write(&serve.config, &routed).expect("the new routes");
    let reloaded = send("POST", &serve.admin_url("/reload"), &[], Some(""));
    assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    assert!(from_second("/b/page"));
    assert!(!from_second("/a"));
    // A cluster's endpoints changed: its traffic goes to the new ones.
    std::fs::write(
        &serve.config,
        routed.replacen(&first.address.to_string(), &second.address.to_string(), 1),
    )
    .expect("the new endpoints");
    let reloaded = send("POST", &serve.admin_url("/reload"), &[], Some(""));
    assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    assert!(from_second("/a"));
    // More workers need a restart: refused, and what is in force stays.
    std::fs::write(&serve.config, routed.replace("workers: 2", "workers: 3"))
        .expect("more workers");
    let refused = send("POST", &serve.admin_url("/reload"), &[], Some(""));
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(refused.body.contains("workers changed"), "{}", refused.body);
    assert!(from_second("/a"));
    let reply = get(&serve.url("/b"), &[]);
    assert_eq!(reply.header("x-powered-by"), Some("pwhost"), "{reply:?}");
}

/// An HTTP listener `name` on `port` routing everything to `backend`, with `filters`.
fn http_listener(name: &str, port: u16, filters: &[String]) -> String {
    let filters = match filters {
        [] => " []\n".to_string(),
        filters => format!("\n{}", filters.concat()),
    };
    format!(
        "  - name: {name}\n    address: 127.0.0.1:{port}\n    \
         routes: [{{prefix: /, cluster: backend}}]\n    http_filters:{filters}"
    )
}

/// Whether nothing accepts connections on `port` any more, at the latest after `within`.
fn refuses_connections(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn a_reload_starts_moves_replaces_and_stops_listeners_and_no_stream_in_flight_is_cut() {
    let origin = Origin::start();
    let [main, extra, moved, added, raw, admin] = std::array::from_fn(|_| free_port());
    let config = |listeners: String| {
        format!(
            "workers: 2\nadmin: {{address: 127.0.0.1:{admin}}}\nlisteners:\n{listeners}\
             clusters:\n  backend: {{endpoints: [\"{}\"], connect_timeout: 1s, \
             request_timeout: 5s}}\n",
            origin.address
        )
    };
    let headers = envoy_filter("headers", "http_headers", "");
    let api_key = envoy_filter("api_key", "local_response", "secret");
    let first = config(
        http_listener("main", main, std::slice::from_ref(&headers))
            + &http_listener("extra", extra, std::slice::from_ref(&headers)),
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let serve = Serve::launch_listening(dir, &[main, extra], admin, &first);
    let url = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");
    let reload = || send("POST", &serve.admin_url("/reload"), &[], Some(""));

    // A request on "extra" is at the origin (which takes 1.5 s) when "extra" goes away.
    let slow = url(extra, "/slow");
    let in_flight = std::thread::spawn(move || get(&slow, &[]));
    origin.wait_for_a_request();
    // "main" moves, "extra" goes, "added" comes with a chain of its own, and "raw", a TCP
    // listener, passes bytes to the origin as they are.
    let tcp_listener = format!(
        "  - name: raw\n    address: 127.0.0.1:{raw}\n    protocol: tcp\n    cluster: backend\n    \
         network_filters: []\n"
    );
    let second = config(
        http_listener("main", moved, std::slice::from_ref(&headers))
            + &http_listener("added", added, std::slice::from_ref(&api_key))
            + &tcp_listener,
    );
    std::fs::write(&serve.config, &second).expect("the second configuration");
    let reloaded = reload();
    assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    let reply = get(&url(moved, "/"), &[]);
    assert_eq!(reply.status, 200, "{}", serve.log());
    assert_eq!(reply.header("x-powered-by"), Some("pwhost"), "{reply:?}");
    assert_eq!(get(&url(added, "/"), &[]).status, 403);
    let reply = get(&url(added, "/"), &[("x-api-key", "secret")]);
    assert_eq!(reply.status, 200, "{}", serve.log());
    assert_eq!(
        reply.header("x-powered-by"),
        None,
        "not the headers plugin's"
    );
    let reply = get(&url(raw, "/"), &[]);
    assert_eq!(reply.status, 200, "{}", serve.log());
    assert!(reply.body.contains("hello from origin"), "{}", reply.body);
    assert!(
        refuses_connections(main, Duration::from_secs(5)),
        "{}",
        serve.log()
    );
    assert!(
        refuses_connections(extra, Duration::from_secs(5)),
        "{}",
        serve.log()
    );
    let reply = in_flight.join().expect("the client");
    assert_eq!(reply.status, 200, "{}", serve.log());
    assert!(reply.body.contains("hello from origin"), "{}", reply.body);
    // The retired listener's VM copies go once its streams ended; the moved one has its own.
    serve.wait_for_samples(&[("pwhost_vm_copies{owner=\"listener/extra\"}", 0.0)]);

    // A listener whose address another process has: the whole reload is refused, and what is
    // in force stays.
    let taken = TcpListener::bind("127.0.0.1:0").expect("a listener");
    let taken_port = taken.local_addr().expect("its address").port();
    let third = config(
        http_listener("main", moved, std::slice::from_ref(&headers))
            + &http_listener("added", added, &[])
            + &http_listener("blocked", taken_port, &[]),
    );
    std::fs::write(&serve.config, &third).expect("the third configuration");
    let refused = reload();
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(
        refused.body.contains(&format!(
            "listeners[2] (blocked): cannot listen on 127.0.0.1:{taken_port}"
        )),
        "{}",
        refused.body
    );
    assert_eq!(
        get(&url(added, "/"), &[]).status,
        403,
        "the old chain stays"
    );
    drop(taken);

    // A listener renamed on the same address starts anew on the same socket: clients
    // connecting all along are never refused, and the new chain serves from the reload on.
    let fourth = config(
        http_listener("main", moved, std::slice::from_ref(&headers))
            + &http_listener("renamed", added, &[]),
    );
    std::fs::write(&serve.config, &fourth).expect("the fourth configuration");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut refused = 0;
            while !stop.load(Ordering::Relaxed) {
                if TcpStream::connect(("127.0.0.1", added)).is_err() {
                    refused += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            refused
        })
    };
    let reloaded = reload();
    assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    let reply = get(&url(added, "/"), &[]);
    assert_eq!(reply.status, 200, "no api key needed now: {}", serve.log());
    stop.store(true, Ordering::Relaxed);
    assert_eq!(prober.join().expect("the prober"), 0, "connections refused");
    assert!(
        refuses_connections(raw, Duration::from_secs(5)),
        "the TCP listener went with the fourth file"
    );
    let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
    assert!(
        metrics.contains("pwhost_requests_total{listener=\"renamed\"}"),
        "{metrics}"
    );
}

/// A one-worker proxy whose TCP listener `tcp` (drain timeout 1 s) runs a network filter in
/// front of an echo server, a connection to it (10 s read timeout), and the configuration that
/// moves the listener from `port` to `moved`, retiring it.
struct RetiringTcp {
    _echo: Echo,
    serve: Serve,
    connection: TcpStream,
    port: u16,
    moved: u16,
    moved_config: String,
}

/// [`RetiringTcp`] with corpus plugin `plugin` as the network filter.
fn retiring_tcp(plugin: &str) -> RetiringTcp {
    let echo = Echo::start();
    let [port, moved, admin] = std::array::from_fn(|_| free_port());
    let config = |port: u16| {
        format!(
            "workers: 1\ndrain_timeout: 1s\nadmin: {{address: 127.0.0.1:{admin}}}\nlisteners:\n  \
             - name: tcp\n    address: 127.0.0.1:{port}\n    protocol: tcp\n    cluster: echo\n    \
             network_filters:\n      - name: filter\n        vm_config:\n          \
             runtime: envoy.wasm.runtime.wasmtime\n          \
             code: {{local: {{filename: {}}}}}\nclusters:\n  echo: {{endpoints: [\"{}\"], \
             connect_timeout: 1s}}\n",
            corpus_plugin(plugin).display(),
            echo.address
        )
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let serve = Serve::launch_listening(dir, &[port], admin, &config(port));
    let connection = TcpStream::connect(("127.0.0.1", port)).expect("a connection");
    connection
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    RetiringTcp {
        moved_config: config(moved),
        _echo: echo,
        serve,
        connection,
        port,
        moved,
    }
}

/// Asserts that the proxy closed `connection`: it ends, or is reset (a read timeout is not).
fn assert_closed(connection: &mut TcpStream, serve: &Serve) {
    use std::io::Read;
    let mut rest = [0u8; 16];
    let end = connection.read(&mut rest);
    let closed = match &end {
        Ok(read) => *read == 0,
        Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "{end:?}\n{}", serve.log());
}

/// The answers of one VM copy's calls hold at most 64 MiB at once: of five calls whose 15 MiB
/// answers all come at once, at least one fails (the plugin answers 503), and the others go
/// on; a slow upstream cannot make a copy with 1,024 calls open hold 16 GiB.
#[test]
fn a_copys_call_answers_hold_at_most_64_mib_at_once() {
    const ANSWER: usize = 15 << 20;
    const CALLS: usize = 5;
    let origin = Origin::start();
    // A checker that sends each answer but its last byte, and that byte once every call has
    // come (or 3 s on), so that all answers are held at once.
    let arrived = Arc::new(AtomicUsize::new(0));
    let checker = {
        let arrived = Arc::clone(&arrived);
        Background::start(move |listener, mut stopped| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Some(mut connection) = next_connection(&listener, &mut stopped).await {
                let arrived = Arc::clone(&arrived);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match connection.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {ANSWER}\r\n\r\n");
                    let body = vec![b'a'; ANSWER - 1];
                    if connection.write_all(answer.as_bytes()).await.is_err()
                        || connection.write_all(&body).await.is_err()
                    {
                        return;
                    }
                    arrived.fetch_add(1, Ordering::Relaxed);
                    let deadline = Instant::now() + Duration::from_secs(3);
                    while arrived.load(Ordering::Relaxed) < CALLS && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let _ = connection.write_all(b"a").await;
                    let _ = tokio::io::copy(&mut connection, &mut tokio::io::sink()).await;
                });
            }
        })
    };
    let serve = Serve::start_with_one_worker(
        origin.address,
        &[envoy_filter("auth", "http_call", "")],
        &[("auth_cluster", checker.address)],
    );
    let calls: Vec<_> = (0..CALLS)
        .map(|call| {
            let url = serve.url(&format!("/call{call}"));
            std::thread::spawn(move || try_get(&url, &[]).map(|reply| reply.status))
        })
        .collect();
    let statuses: Vec<Result<u16, String>> = calls
        .into_iter()
        .map(|call| call.join().expect("a caller thread"))
        .collect();
    let failed = statuses.iter().filter(|status| **status == Ok(503)).count();
    let answered = statuses.iter().filter(|status| **status == Ok(200)).count();
    assert!(
        failed >= 1 && answered >= 1,
        "{statuses:?}\n{}",
        serve.log()
    );
    assert_eq!(failed + answered, CALLS, "{statuses:?}");
    serve.wait_for_log("would hold over 64 MiB");
}

/// A connection a network filter holds before the upstream is dialled is also closed once
/// its listener retired and the drain timeout passed, not held until the idle timeout (an
/// hour by default), which would keep the retired listener's VM copies as long.
#[test]
fn a_retired_tcp_listeners_held_new_connection_closes_after_the_drain_timeout() {
    let RetiringTcp {
        _echo,
        serve,
        mut connection,
        moved_config,
        ..
    } = retiring_tcp("wat/holds_for_good");
    // Held (with the connection that found the listener ready, held too).
    wait_until(
        || {
            let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
            sample(&metrics, "pwhost_live_stream_contexts").is_some_and(|live| live >= 1.0)
        },
        "a held connection",
    );
    std::fs::write(&serve.config, moved_config).expect("the moved listener");
    let reloaded = send("POST", &serve.admin_url("/reload"), &[], Some(""));
    assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    assert_closed(&mut connection, &serve);
    serve.wait_for_no_live_contexts();
}

#[test]
fn a_retired_tcp_listeners_connection_goes_on_for_the_drain_timeout_then_closes() {
    use std::io::{Read, Write};
    let RetiringTcp {
        _echo,
        serve,
        mut connection,
        port,
        moved,
        moved_config,
    } = retiring_tcp("tcp_filter");
    let mut exchange = |sent: &str, expected: &str| {
        connection.write_all(sent.as_bytes()).expect("sent");
        let mut received = vec![0; expected.len()];
        connection.read_exact(&mut received).expect("echoed");
        assert_eq!(String::from_utf8_lossy(&received), expected);
    };
    exchange("ping", "[up] PING");
    // The listener moves: its connection goes on for the drain timeout, then closes.
    std::fs::write(&serve.config, moved_config).expect("the moved listener");
    let reloaded = send("POST", &serve.admin_url("/reload"), &[], Some(""));
    assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    let retired = Instant::now();
    exchange("pong", "PONG");
    assert_closed(&mut connection, &serve);
    let after = retired.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(8)).contains(&after),
        "closed after {after:?}"
    );
    // The plugin heard that the proxy closed both sides.
    serve.wait_for_log("downstream closed by Local");
    serve.wait_for_log("upstream closed by Local");
    serve.wait_for_no_live_contexts();
    assert!(
        refuses_connections(port, Duration::from_secs(5)),
        "{}",
        serve.log()
    );
    assert_eq!(tcp_exchange(moved, &["again"]), "[up] AGAIN");
}

#[test]
fn a_listener_address_another_process_has_stops_the_proxy_at_start_naming_the_listener() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("a listener");
    let port = taken.local_addr().expect("its address").port();
    let free = free_port();
    // A listener's address taken, then the admin listener's.
    let cases = [
        (
            format!("listeners:\n{}", http_listener("web", port, &[])),
            format!("listeners[0] (web): cannot listen on 127.0.0.1:{port}"),
        ),
        (
            format!(
                "admin: {{address: 127.0.0.1:{port}}}\nlisteners:\n{}",
                http_listener("web", free, &[])
            ),
            format!("admin: cannot listen on 127.0.0.1:{port}"),
        ),
    ];
    for (listeners, expected) in cases {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = dir.path().join("serve.yaml");
        let text = format!(
            "workers: 1\n{listeners}clusters:\n  backend: {{endpoints: [\"127.0.0.1:1\"]}}\n"
        );
        std::fs::write(&config, text).expect("the configuration");
        let mut child = Command::new(env!("CARGO_BIN_EXE_pwhost"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pwhost starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        let exit = loop {
            if let Some(exit) = child.try_wait().expect("the process") {
                break exit;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("still running with the address of {expected:?} taken");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .expect("its standard error")
            .read_to_string(&mut stderr)
            .expect("readable");
        assert!(!exit.success(), "{stderr}");
        assert!(stderr.contains(&expected), "{expected:?} in: {stderr}");
    }
    drop(taken);
}

/// `GET path` on `connection`, which stays open for the next request: the status and body
/// (the proxy's responses have a `content-length`).
fn get_kept_alive(connection: &mut TcpStream, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    connection
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes())
        .expect("the request goes out");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        connection.read_exact(&mut byte).expect("a response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok());
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    let (Some(status), Some(length)) = (status, length) else {
        panic!("no status or content-length in {head:?}");
    };
    let mut body = vec![0; length];
    connection.read_exact(&mut body).expect("the response body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// What the `envoy_attributes` plugin logged for `probe` (`<when> <path>`) in the first such
/// line after the one containing `after` (each stream's lines follow one another), or a panic
/// showing the log.
fn probed(log: &str, after: &str, probe: &str) -> String {
    let wanted = format!("{probe}: ");
    log.lines()
        .skip_while(|line| !line.contains(after))
        .find_map(|line| {
            let value = &line[line.find(&wanted)? + wanted.len()..];
            // The message ends where tracing's fields (`plugin=...`, maybe coloured) begin.
            let end = [" plugin=", " \u{1b}["]
                .iter()
                .filter_map(|fields| value.find(fields))
                .min()
                .unwrap_or(value.len());
            Some(value[..end].to_string())
        })
        .unwrap_or_else(|| panic!("no {probe:?} after {after:?} in:\n{log}"))
}

#[test]
fn a_plugin_reads_envoys_connection_route_upstream_and_response_attributes_on_live_streams() {
    let origin = Origin::start();
    let closed = free_port();
    let probes = [
        "request request/path string",
        "request connection/id uint",
        "request connection/mtls bool",
        "request request/time int",
        "request request/duration size",
        "request source/address string",
        "request destination/address string",
        "request upstream/address string",
        "request xds/cluster_name string",
        "request xds/route_name string",
        "response upstream/address string",
        "response response/code int",
        "response response/code_details string",
        "log request/path string",
        "log connection/id uint",
        "log upstream/address string",
        "log upstream/port int",
        "log xds/cluster_name string",
        "log xds/route_name string",
        "log response/code int",
        "log response/code_details string",
        "log request/duration int",
        "log request/size int",
        "log response/size int",
    ];
    let (dir, port, failing_port, admin_port) = (
        tempfile::tempdir().expect("a temporary directory"),
        free_port(),
        free_port(),
        free_port(),
    );
    let attributes = envoy_filter("attributes", "envoy_attributes", &probes.join("\\n"));
    // A second listener whose chain fails closed in its second plugin.
    let config = format!(
        "workers: 2\nadmin: {{address: 127.0.0.1:{admin_port}}}\nlisteners:\n  - name: main\n    \
         address: 127.0.0.1:{port}\n    routes: [{{prefix: /down, cluster: down}}, \
         {{name: main_route, prefix: /, cluster: backend}}]\n    http_filters:\n{attributes}  \
         - name: failing\n    address: 127.0.0.1:{failing_port}\n    \
         routes: [{{prefix: /, cluster: backend}}]\n    http_filters:\n{attributes}{}\
         clusters:\n  backend: {{endpoints: [\"{}\"], connect_timeout: 1s, request_timeout: 5s}}\n  \
         down: {{endpoints: [\"127.0.0.1:{closed}\"], connect_timeout: 1s}}\n",
        envoy_filter("trapper", "wat/trap_in_request_headers", ""),
        origin.address,
    );
    let serve = Serve::launch(dir, port, admin_port, &config);
    let since_epoch = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("a clock after 1970")
            .as_nanos()
    };
    let before = since_epoch();
    let logged = |count: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while serve.log().matches("log response/size: ").count() < count {
            assert!(
                Instant::now() < deadline,
                "no log of stream {count}:\n{}",
                serve.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // Two requests on one keep-alive connection, one at a time.
    let mut connection = TcpStream::connect(("127.0.0.1", port)).expect("a connection");
    connection
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("a read timeout");
    let client = connection.local_addr().expect("the client's address");
    let (status, first_body) = get_kept_alive(&mut connection, "/first");
    assert_eq!(status, 200, "{}", serve.log());
    logged(1);
    let (status, _) = get_kept_alive(&mut connection, "/second");
    assert_eq!(status, 200, "{}", serve.log());
    logged(2);
    // A chunked body (no content-length) on a connection of its own.
    let posted = chunked_post(port, "localhost", "/third", &["hello", " world"])
        .expect("an answer to the chunked POST");
    assert_eq!(posted.status, 200, "{}", serve.log());
    logged(3);
    // A route to a cluster that refuses connections.
    let down = get(&serve.url("/down/x"), &[]);
    assert_eq!(down.status, 503, "{}", serve.log());
    logged(4);
    // A plugin failing closed after the probe.
    let failed = get(&format!("http://127.0.0.1:{failing_port}/trap"), &[]);
    assert_eq!(failed.status, 503, "{}", serve.log());
    logged(5);
    // Sixteen streams on one HTTP/2 connection (raw frames: Debian's curl 7.88 cannot reuse an
    // h2c connection, curl#10634), which Pingora may run on either worker thread.
    let mut conversation = H2_PREFACE.to_vec();
    conversation.extend(h2_frame(H2_SETTINGS, 0, 0, &[]));
    for i in 1..=16u32 {
        let block = h2_request_block("GET", &format!("/h2/{i:02}"), &[]);
        conversation.extend(h2_frame(
            H2_HEADERS,
            END_HEADERS | END_STREAM,
            2 * i - 1,
            &block,
        ));
    }
    let ended = raw_h2_exchange(port, &conversation, Duration::from_secs(1));
    assert!(ended.starts_with("answered"), "{ended}\n{}", serve.log());
    logged(21);
    drop(connection);
    let log = serve.log();
    let at = |after: &str, probe: &str| probed(&log, after, probe);

    // As the request headers come: the connection, the time, the route; no upstream yet.
    let first = "request request/path: /first";
    assert_eq!(at(first, "request connection/mtls"), "false");
    // When the stream began, in nanoseconds since the epoch.
    let time: u128 = at(first, "request request/time").parse().expect("a time");
    assert!(before < time && time < since_epoch(), "{before} {time}");
    assert_eq!(at(first, "request request/duration"), "status 1");
    assert_eq!(at(first, "request source/address"), client.to_string());
    assert_eq!(
        at(first, "request destination/address"),
        format!("127.0.0.1:{port}")
    );
    assert_eq!(at(first, "request upstream/address"), "status 1");
    assert_eq!(at(first, "request xds/cluster_name"), "backend");
    assert_eq!(at(first, "request xds/route_name"), "main_route");
    // The upstream's response.
    assert_eq!(
        at(first, "response upstream/address"),
        origin.address.to_string()
    );
    assert_eq!(at(first, "response response/code"), "200");
    assert_eq!(at(first, "response response/code_details"), "via_upstream");
    // On `proxy_on_log`: all of it, the duration and the body sizes too.
    let logged_first = "log request/path: /first";
    assert_eq!(
        at(logged_first, "log upstream/address"),
        origin.address.to_string()
    );
    assert_eq!(
        at(logged_first, "log upstream/port"),
        origin.address.port().to_string()
    );
    assert_eq!(at(logged_first, "log xds/cluster_name"), "backend");
    assert_eq!(at(logged_first, "log xds/route_name"), "main_route");
    assert_eq!(at(logged_first, "log response/code"), "200");
    assert_eq!(
        at(logged_first, "log response/code_details"),
        "via_upstream"
    );
    let duration: u64 = at(logged_first, "log request/duration")
        .parse()
        .expect("a duration");
    assert!(0 < duration && duration < 10_000_000_000, "{duration} ns");
    assert_eq!(at(logged_first, "log request/size"), "0");
    assert_eq!(
        at(logged_first, "log response/size"),
        first_body.len().to_string()
    );

    // One id per connection: the keep-alive connection's two streams share it, in every
    // phase; the other connections have ids of their own.
    let id = at(first, "request connection/id");
    assert!(id.parse::<u64>().is_ok(), "{id}");
    assert_eq!(at(logged_first, "log connection/id"), id);
    assert_eq!(
        at("request request/path: /second", "request connection/id"),
        id
    );
    assert_eq!(at("log request/path: /second", "log connection/id"), id);
    let third = at("log request/path: /third", "log connection/id");
    let fourth = at("log request/path: /down/x", "log connection/id");
    assert!(
        third != id && fourth != id && third != fourth,
        "{id} {third} {fourth}"
    );

    // A body without content-length: its size is what was received.
    assert_eq!(at("log request/path: /third", "log request/size"), "11");
    assert_eq!(
        at("log request/path: /third", "log response/size"),
        posted.body.len().to_string()
    );

    // The proxy's own 503 for an unreachable upstream, with Envoy's details; the route has
    // no name.
    let details = "upstream_reset_before_response_started{remote_connection_failure}";
    assert_eq!(
        at("request request/path: /down/x", "response response/code"),
        "503"
    );
    assert_eq!(
        at(
            "request request/path: /down/x",
            "response response/code_details"
        ),
        details
    );
    let logged_down = "log request/path: /down/x";
    assert_eq!(at(logged_down, "log response/code_details"), details);
    assert_eq!(at(logged_down, "log xds/cluster_name"), "down");
    assert_eq!(at(logged_down, "log xds/route_name"), "");
    assert_eq!(
        at(logged_down, "log upstream/address"),
        format!("127.0.0.1:{closed}")
    );

    // The streams of one HTTP/2 connection share its id, whichever thread ran them.
    let h2_id = at("log request/path: /h2/01", "log connection/id");
    for i in 2..=16 {
        assert_eq!(
            at(
                &format!("log request/path: /h2/{i:02}"),
                "log connection/id"
            ),
            h2_id,
            "stream {i}"
        );
    }
    assert!(h2_id != id && h2_id != third && h2_id != fourth, "{h2_id}");

    // The 503 of a plugin failing closed goes back through the plugins before it, with
    // Envoy's details naming the plugin.
    let logged_trap = "log request/path: /trap";
    assert_eq!(at(logged_trap, "log response/code"), "503");
    assert_eq!(
        at(logged_trap, "log response/code_details"),
        "wasm_fail_stream{trapper}"
    );
}

/// The count in environment variable `name` (for longer runs by hand), or `default`.
fn count_from_env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|count| count.parse().ok())
        .unwrap_or(default)
}

/// Runs `send(0)` to `send(count - 1)` on `clients` threads (each taking every
/// `clients`-th index, in order), and collects what each returned.
fn on_clients<T: Send>(clients: usize, count: usize, send: impl Fn(usize) -> T + Sync) -> Vec<T> {
    std::thread::scope(|scope| {
        let send = &send;
        let threads: Vec<_> = (0..clients)
            .map(|client| {
                scope.spawn(move || {
                    (client..count)
                        .step_by(clients)
                        .map(send)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|thread| thread.join().expect("a client"))
            .collect()
    })
}

/// A callout target answering `200` with `x-auth-user: load` to every call but each
/// `stall_every`-th, which it never answers.
fn flaky_checker(stall_every: usize) -> Background {
    let calls = Arc::new(AtomicUsize::new(0));
    Background::start(move |listener, mut stopped| async move {
        loop {
            let Some(stream) = next_connection(&listener, &mut stopped).await else {
                return;
            };
            let calls = Arc::clone(&calls);
            let service = hyper::service::service_fn(move |_request| {
                let call = calls.fetch_add(1, Ordering::Relaxed) + 1;
                async move {
                    if call % stall_every == 0 {
                        tokio::time::sleep(Duration::from_secs(120)).await;
                    }
                    let mut response = http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"ok"),
                    ));
                    response
                        .headers_mut()
                        .insert("x-auth-user", http::HeaderValue::from_static("load"));
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// One kind of request of the fault-injection load, and what it may end in.
#[derive(Clone, Copy, Debug, PartialEq)]
enum FaultyRequest {
    /// To the origin: a whole 200.
    Healthy,
    /// To the origin with a body: a whole 200 that echoes it.
    HealthyWithBody,
    /// To a cluster nobody listens on: 503.
    Refused,
    /// To an upstream that resets before answering: 503.
    UpstreamReset,
    /// To an upstream that never answers, past its `request_timeout`: 504.
    UpstreamStall,
    /// To an upstream that resets mid-body: the client's response is cut.
    UpstreamCutMidBody,
    /// A client that gives up while its upstream stalls: it sees nothing more.
    ClientAbort,
    /// Through a plugin whose HTTP call is answered, or times out: 200, or the plugin's 503.
    Callout,
    /// A body through a plugin that traps in its body callback (FAIL_RELOAD): 503 (or a
    /// reset, when the proxy closes before the client has sent it all).
    TrapMidBody,
    /// Through that plugin without a body: 200, 503 while its VM copy is failed, or a reset.
    BesideTraps,
    /// A client that sends half its headers and waits: 408 at the listener's
    /// `request_headers_timeout`.
    SlowHeaders,
}

impl FaultyRequest {
    const ALL: [FaultyRequest; 11] = [
        FaultyRequest::Healthy,
        FaultyRequest::HealthyWithBody,
        FaultyRequest::Refused,
        FaultyRequest::UpstreamReset,
        FaultyRequest::UpstreamStall,
        FaultyRequest::UpstreamCutMidBody,
        FaultyRequest::ClientAbort,
        FaultyRequest::Callout,
        FaultyRequest::TrapMidBody,
        FaultyRequest::BesideTraps,
        FaultyRequest::SlowHeaders,
    ];

    /// Which listener it goes to (an index into the test's three).
    fn listener(self) -> usize {
        match self {
            FaultyRequest::Callout => 1,
            FaultyRequest::TrapMidBody | FaultyRequest::BesideTraps => 2,
            _ => 0,
        }
    }

    /// Sends it; `Ok(status)` for a whole response, `Err` for none (a reset, a cut response,
    /// a client that gave up).
    fn send(self, ports: [u16; 3], index: usize) -> Result<u16, String> {
        let url = |path: &str| format!("http://127.0.0.1:{}{path}", ports[self.listener()]);
        let expect_body = |reply: Reply, text: &str| {
            if reply.status == 200 && !reply.body.contains(text) {
                return Err(format!("a 200 without {text:?}: {reply:?}"));
            }
            Ok(reply.status)
        };
        match self {
            FaultyRequest::Healthy => {
                expect_body(try_get(&url("/healthy"), &[])?, "hello from origin")
            }
            FaultyRequest::HealthyWithBody => {
                let body = format!("request {index}");
                expect_body(try_send(&url("/healthy"), &[], Some(&body))?, &body)
            }
            FaultyRequest::Refused => Ok(try_get(&url("/refused"), &[])?.status),
            FaultyRequest::UpstreamReset => Ok(try_get(&url("/reset"), &[])?.status),
            FaultyRequest::UpstreamStall => Ok(try_get(&url("/stall"), &[])?.status),
            FaultyRequest::UpstreamCutMidBody => Ok(try_get(&url("/cut"), &[])?.status),
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
            FaultyRequest::Callout => {
                expect_body(try_get(&url("/checked"), &[])?, "x-auth-user: load")
            }
            FaultyRequest::TrapMidBody => {
                chunked_post(ports[2], "load", "/trapped", &["first part", "second part"])
                    .and_then(|response| response.whole_status())
            }
            FaultyRequest::BesideTraps => Ok(try_get(&url("/beside"), &[])?.status),
            FaultyRequest::SlowHeaders => {
                use std::io::Write;
                let mut connection = TcpStream::connect(("127.0.0.1", ports[0]))
                    .map_err(|error| error.to_string())?;
                connection
                    .write_all(b"GET /slow-headers HTTP/1.1\r\nHost: x\r\n")
                    .map_err(|error| error.to_string())?;
                let (received, _) = read_until_closed(&mut connection, Duration::from_secs(10));
                let text = String::from_utf8_lossy(&received);
                text.strip_prefix("HTTP/1.1 ")
                    .and_then(|rest| rest.get(..3)?.parse().ok())
                    .ok_or_else(|| format!("no status line: {text:?}"))
            }
        }
    }

    /// Whether `outcome` is one this request may end in.
    fn may_end_in(self, outcome: &Result<u16, String>) -> bool {
        matches!(
            (self, outcome),
            (
                FaultyRequest::Healthy | FaultyRequest::HealthyWithBody,
                Ok(200)
            ) | (
                FaultyRequest::Refused | FaultyRequest::UpstreamReset,
                Ok(503)
            ) | (FaultyRequest::UpstreamStall, Ok(504))
                | (
                    FaultyRequest::UpstreamCutMidBody | FaultyRequest::ClientAbort,
                    Err(_)
                )
                | (FaultyRequest::Callout, Ok(200 | 503))
                | (FaultyRequest::TrapMidBody, Ok(503) | Err(_))
                | (FaultyRequest::BesideTraps, Ok(200 | 503) | Err(_))
                | (FaultyRequest::SlowHeaders, Ok(408))
        )
    }
}

/// A bounded load of requests meeting every fault at once (upstreams refusing, resetting,
/// stalling and cutting responses, callouts timing out, a plugin trapping mid-body, clients
/// giving up, clients too slow with their headers), `PWHOST_FAULT_REQUESTS` of them (default 200): each ends as it may, the proxy's
/// counters add up (requests in = whole responses out + resets), every plugin stream context
/// ends, and the proxy serves on.
#[test]
fn under_a_load_of_faults_every_request_ends_in_a_response_or_a_reset_and_the_counts_add_up() {
    let requests = count_from_env("PWHOST_FAULT_REQUESTS", 200);
    let origin = Origin::start();
    let (resetting, stalling, cutting) = (
        Misbehaving::start(Misbehaviour::Reset),
        Misbehaving::start(Misbehaviour::Stall),
        Misbehaving::start(Misbehaviour::CutMidBody),
    );
    let checker = flaky_checker(10);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (admin_port, ports) = (free_port(), [free_port(), free_port(), free_port()]);
    let trap_plugin = corpus_plugin("wat/trap_in_request_body");
    let config = format!(
        "workers: 2\nadmin: {{address: 127.0.0.1:{admin_port}}}\nlisteners:\n  \
         - name: edge\n    address: 127.0.0.1:{}\n    request_headers_timeout: 1s\n    \
         routes: [{{prefix: /refused, cluster: \
         refused}}, {{prefix: /reset, cluster: resetting}}, {{prefix: /stall, cluster: \
         stalling}}, {{prefix: /cut, cluster: cutting}}, {{prefix: /, cluster: backend}}]\n    \
         http_filters:\n{}  \
         - name: callout\n    address: 127.0.0.1:{}\n    routes: [{{prefix: /, cluster: \
         backend}}]\n    http_filters:\n{}  \
         - name: trap\n    address: 127.0.0.1:{}\n    routes: [{{prefix: /, cluster: \
         backend}}]\n    http_filters:\n      - name: trap\n        vm_config: {{runtime: \
         wasmtime, code: {{local: {{filename: {}}}}}}}\n        failure_policy: FAIL_RELOAD\n        \
         reload_config: {{backoff: {{base_interval: 0.05s, max_interval: 0.2s}}}}\n\
         clusters:\n  backend: {{endpoints: [\"{}\"]}}\n  refused: {{endpoints: \
         [\"127.0.0.1:{}\"]}}\n  resetting: {{endpoints: [\"{}\"]}}\n  stalling: {{endpoints: \
         [\"{}\"], request_timeout: 0.3s}}\n  cutting: {{endpoints: [\"{}\"]}}\n  \
         auth_cluster: {{endpoints: [\"{}\"]}}\n",
        ports[0],
        envoy_filter("headers", "http_headers", ""),
        ports[1],
        envoy_filter("auth", "http_call", ""),
        ports[2],
        trap_plugin.display(),
        origin.address,
        free_port(),
        resetting.address,
        stalling.address,
        cutting.address,
        checker.address,
    );
    let serve = Serve::launch_listening(dir, &ports, admin_port, &config);
    // Eight clients, each sending every eighth request of the load, one connection each.
    let clients = 8;
    let started = Instant::now();
    let outcomes = on_clients(clients, requests, |index| {
        let kind = FaultyRequest::ALL[index % FaultyRequest::ALL.len()];
        (kind, kind.send(ports, index))
    });
    assert_eq!(outcomes.len(), requests);
    let unexpected: Vec<_> = outcomes
        .iter()
        .filter(|(kind, outcome)| !kind.may_end_in(outcome))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}\n{}", serve.log());
    // Every stream has ended: no plugin context, nothing in flight.
    serve.wait_for_no_live_contexts();
    let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
    assert_eq!(sample(&metrics, "pwhost_in_flight"), Some(0.0), "{metrics}");
    // The proxy's counts: each request it received ended as a whole response or a reset.
    let total = |prefix: &str, listener: &str| -> u64 {
        let labels = format!("{{listener=\"{listener}\"");
        metrics
            .lines()
            .filter(|line| line.starts_with(prefix) && line[prefix.len()..].starts_with(&labels))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|value| value as u64)
            .sum()
    };
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
        summary.push_str(&format!("  {:?}: {seen:?}\n", kind));
    }
    for (index, listener) in ["edge", "callout", "trap"].into_iter().enumerate() {
        let sent = outcomes
            .iter()
            .filter(|(kind, _)| kind.listener() == index)
            .count() as u64;
        let whole = outcomes
            .iter()
            .filter(|(kind, outcome)| kind.listener() == index && outcome.is_ok())
            .count() as u64;
        let received = total("pwhost_requests_total", listener);
        let responses = total("pwhost_responses_total", listener);
        let resets = total("pwhost_resets_total", listener);
        assert_eq!(received, sent, "{listener}: requests in\n{metrics}");
        assert_eq!(
            responses + resets,
            received,
            "{listener}: responses + resets\n{metrics}"
        );
        // A client sees a whole response only if the proxy sent one (not conversely: a client
        // that left, or whose unsent body made its connection reset, may miss one).
        assert!(whole <= responses, "{listener}: {whole} seen\n{metrics}");
        summary.push_str(&format!(
            "{listener}: {received} requests, {responses} whole responses, {resets} resets; \
             clients saw {whole} whole\n"
        ));
    }
    for line in metrics.lines() {
        if line.starts_with("pwhost_resets_total{") {
            summary.push_str(&format!("  {line}\n"));
        }
    }
    // Both the upstream cut mid-body and the client's own abort show up as resets.
    assert!(
        total("pwhost_resets_total", "edge") >= (requests / FaultyRequest::ALL.len()) as u64,
        "{metrics}"
    );
    // The trapping plugin's streams: each one it failed (a trap in its body callback, or its
    // VM found failed) or refused (its copy failed, within the backoff) was failed closed once,
    // and ended as a 503 or, when its response had begun, a reset.
    let trap_streams = |outcome: &str| {
        let name = format!(
            "pwhost_plugin_streams_total{{listener=\"trap\",plugin=\"trap\",outcome=\"{outcome}\"}}"
        );
        sample(&metrics, &name).unwrap_or(0.0) as u64
    };
    assert!(trap_streams("failed_by_trap") >= 1, "{metrics}");
    assert_eq!(
        trap_streams("closed"),
        sample(
            &metrics,
            "pwhost_responses_total{listener=\"trap\",code=\"503\"}"
        )
        .unwrap_or(0.0) as u64
            + total("pwhost_resets_total", "trap"),
        "{metrics}"
    );
    // Each edge stream's plugin saw its end (`proxy_on_log`), whatever ended it; a request
    // whose headers never came whole reached no plugin, and was answered 408.
    let timed_out = total("pwhost_request_header_timeouts_total", "edge");
    let slow = outcomes
        .iter()
        .filter(|(kind, _)| *kind == FaultyRequest::SlowHeaders)
        .count() as u64;
    assert_eq!(timed_out, slow, "{metrics}");
    let logged = serve.log().matches("done: /").count() as u64;
    assert_eq!(
        logged,
        total("pwhost_requests_total", "edge") - timed_out,
        "{summary}"
    );
    // And the proxy serves on: the edge at once, the trapping plugin's listener from a fresh
    // VM copy once its backoff (at most 0.2 s) has passed.
    assert_eq!(get(&serve.url("/healthy"), &[]).status, 200);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..4 {
        let reply = get(&format!("http://127.0.0.1:{}/", ports[2]), &[]);
        let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
        assert_eq!(reply.status, 200, "{reply:?}\n{metrics}\n{}", serve.log());
    }
    println!("{summary}");
}

/// Valid HTTP/1.x requests the fuzzer mutates: framings, methods, versions, pipelining.
const HTTP_SEEDS: [&[u8]; 7] = [
    b"GET /seed?q=1 HTTP/1.1\r\nHost: fuzz\r\nUser-Agent: seed\r\nX-Remove-Me: 1\r\n\r\n",
    b"POST /upload HTTP/1.1\r\nHost: fuzz\r\nContent-Length: 11\r\n\r\nhello world",
    b"POST /chunked HTTP/1.1\r\nHost: fuzz\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    b"GET /old HTTP/1.0\r\n\r\n",
    b"GET /one HTTP/1.1\r\nHost: fuzz\r\n\r\nGET /two HTTP/1.1\r\nHost: fuzz\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: fuzz\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
];

/// What HTTP parsers trip on, spliced in by the mutator.
const HTTP_TOKENS: [&[u8]; 14] = [
    b"\r\n",
    b"\n",
    b"\r\n\r\n",
    b": ",
    b" ",
    b"\0",
    b"\xff\xfe",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 18446744073709551616\r\n",
    b"Content-Length: -1\r\n",
    b"ffffffffffffffff\r\n",
    b"0\r\n\r\n",
    b"HTTP/9.9",
    H2_PREFACE,
];

/// A mutant of a seed: a few byte flips, insertions of tokens or random bytes, deletions,
/// duplications or a cut, drawn from `random`.
fn mutate_http(random: &mut fastrand::Rng) -> Vec<u8> {
    let mut bytes = HTTP_SEEDS[random.usize(..HTTP_SEEDS.len())].to_vec();
    for _ in 0..random.usize(1..=4) {
        let at = random.usize(..=bytes.len());
        match random.u8(..6) {
            0 if !bytes.is_empty() => {
                let at = random.usize(..bytes.len());
                bytes[at] = random.u8(..);
            }
            1 => {
                let token = HTTP_TOKENS[random.usize(..HTTP_TOKENS.len())];
                bytes.splice(at..at, token.iter().copied());
            }
            2 => {
                let end = random.usize(at..=bytes.len());
                bytes.drain(at..end);
            }
            3 => {
                let end = random.usize(at..=bytes.len().min(at + 64));
                let copy = bytes[at..end].repeat(random.usize(1..=64));
                bytes.splice(at..at, copy);
            }
            4 => bytes.truncate(at),
            _ => {
                let noise: Vec<u8> = (0..random.usize(1..16)).map(|_| random.u8(..)).collect();
                bytes.splice(at..at, noise);
            }
        }
    }
    bytes
}

/// Sends `request` on a connection of its own, half-closes it, and reads until the proxy
/// closes: the first status line, if any, or how the exchange ended.
fn raw_exchange(port: u16, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let Ok(mut connection) = TcpStream::connect(("127.0.0.1", port)) else {
        return "not accepted".to_string();
    };
    let _ = connection.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = connection.write_all(request);
    let _ = connection.shutdown(std::net::Shutdown::Write);
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let end = loop {
        match connection.read(&mut buffer) {
            Ok(0) => break "closed",
            Ok(count) => received.extend_from_slice(&buffer[..count]),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break "timed out",
            Err(_) => break "reset",
        }
    };
    match received.split(|b| *b == b'\n').next() {
        Some(line) if line.starts_with(b"HTTP/") => {
            String::from_utf8_lossy(&line[..line.len().min(12)]).into_owned()
        }
        _ => end.to_string(),
    }
}

/// The proxy the mutation tests send their inputs through: two Rust SDK plugins under
/// FAIL_RELOAD. (The Rust SDK's `get_http_request_headers` panics on a header value that is not
/// UTF-8 — proxy-wasm 0.2.5 unwraps it; it would in Envoy too — and mutants have such values:
/// the plugin's VM copy fails, and FAIL_RELOAD brings a fresh one after the backoff.)
fn serve_for_fuzzing(origin: &Origin) -> Serve {
    let reload = [
        "failure_policy: FAIL_RELOAD",
        "reload_config: {backoff: {base_interval: 0.05s, max_interval: 0.2s}}",
    ];
    Serve::start(
        origin.address,
        &[
            plugin_block("headers", "http_headers", "", &reload),
            plugin_block("bodies", "body_rewrite", "", &reload),
        ],
    )
}

/// What every mutation run must leave: no input hung or was refused a connection, the proxy
/// is up, every stream that reached the plugins ended and the counts add up, and past the
/// plugins' backoff every worker serves through both plugins again. Prints what the inputs
/// got (`summary` names them).
fn assert_no_hang_and_serving_on(
    serve: &mut Serve,
    summary: &str,
    started: Instant,
    outcomes: &[(usize, String)],
) {
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    for (_, outcome) in outcomes {
        *seen.entry(outcome.as_str()).or_default() += 1;
    }
    println!(
        "{summary} in {:.1} s: {seen:?}",
        started.elapsed().as_secs_f64()
    );
    let hung: Vec<_> = outcomes
        .iter()
        .filter(|(_, outcome)| outcome == "timed out" || outcome == "not accepted")
        .collect();
    assert!(hung.is_empty(), "seeds {hung:?}\n{}", serve.log());
    assert!(
        matches!(serve.child.try_wait(), Ok(None)),
        "the proxy exited:\n{}",
        serve.log()
    );
    serve.wait_for_no_live_contexts();
    let metrics = get(&serve.admin_url("/stats/prometheus"), &[]).body;
    assert_eq!(sample(&metrics, "pwhost_in_flight"), Some(0.0), "{metrics}");
    let sum = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|line| line.starts_with(prefix))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        sum("pwhost_responses_total{") + sum("pwhost_resets_total{"),
        sum("pwhost_requests_total{"),
        "{metrics}"
    );
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..4 {
        let reply = get(&serve.url("/after"), &[]);
        assert_eq!(reply.status, 200, "{reply:?}\n{}", serve.log());
        assert_eq!(reply.header("x-powered-by"), Some("pwhost"));
    }
}

/// Mutated HTTP/1.x requests (`PWHOST_HTTP_FUZZ_INPUTS`, default 400, from fixed seeds) on
/// raw connections through a chain of plugins: each gets a status line or its connection
/// closed within a bounded time, never a hang; the proxy stays up, every stream that reached
/// the plugins ends, and a valid request is served afterwards.
#[test]
fn mutated_http_requests_get_an_answer_or_a_close_and_the_proxy_serves_on() {
    let inputs = count_from_env("PWHOST_HTTP_FUZZ_INPUTS", 400);
    let origin = Origin::start();
    let mut serve = serve_for_fuzzing(&origin);
    let port = serve.port;
    let started = Instant::now();
    let outcomes = on_clients(4, inputs, |seed| {
        let request = mutate_http(&mut fastrand::Rng::with_seed(seed as u64));
        (seed, raw_exchange(port, &request))
    });
    let summary = format!("{inputs} mutated requests");
    assert_no_hang_and_serving_on(&mut serve, &summary, started, &outcomes);
}

/// An HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = payload.len() as u32;
    let mut frame = length.to_be_bytes()[1..].to_vec();
    frame.push(kind);
    frame.push(flags);
    frame.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The connection preface an h2c client with prior knowledge opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/2 frame types and flags the seeds use.
const H2_DATA: u8 = 0x0;
const H2_HEADERS: u8 = 0x1;
const H2_RST_STREAM: u8 = 0x3;
const H2_SETTINGS: u8 = 0x4;
const H2_PING: u8 = 0x6;
const H2_GOAWAY: u8 = 0x7;
const H2_WINDOW_UPDATE: u8 = 0x8;
const H2_CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// A request header block in HPACK without Huffman coding or the dynamic table: `method` and
/// `path` as literals with indexed names (static table: `:method` 2, `:path` 4, `:authority`
/// 1), `:scheme: http` indexed (6), then `extra` literal names and values.
fn h2_request_block(method: &str, path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let literal = |block: &mut Vec<u8>, text: &str| {
        block.push(text.len() as u8);
        block.extend_from_slice(text.as_bytes());
    };
    let mut block = vec![0x02];
    literal(&mut block, method);
    block.push(0x86);
    block.push(0x04);
    literal(&mut block, path);
    block.push(0x01);
    literal(&mut block, "fuzz");
    for (name, value) in extra {
        block.push(0x00);
        literal(&mut block, name);
        literal(&mut block, value);
    }
    block
}

/// Valid h2c (prior knowledge) conversations the fuzzer mutates, as lists of frames after the
/// connection preface: a GET, a POST in two DATA frames, two concurrent streams, a header
/// block split over CONTINUATION, and a body followed by trailers.
fn h2_seeds() -> Vec<Vec<Vec<u8>>> {
    let settings = h2_frame(H2_SETTINGS, 0, 0, &[]);
    let get = h2_request_block("GET", "/h2-seed", &[("x-remove-me", "1")]);
    let post = h2_request_block("POST", "/h2-upload", &[("content-type", "text/plain")]);
    let (first, rest) = get.split_at(get.len() / 2);
    vec![
        vec![
            settings.clone(),
            h2_frame(H2_HEADERS, END_HEADERS | END_STREAM, 1, &get),
        ],
        vec![
            settings.clone(),
            h2_frame(H2_HEADERS, END_HEADERS, 1, &post),
            h2_frame(H2_DATA, 0, 1, b"hello "),
            h2_frame(H2_DATA, END_STREAM, 1, b"world"),
        ],
        vec![
            settings.clone(),
            h2_frame(H2_HEADERS, END_HEADERS | END_STREAM, 1, &get),
            h2_frame(H2_HEADERS, END_HEADERS | END_STREAM, 3, &get),
        ],
        vec![
            settings.clone(),
            h2_frame(H2_HEADERS, END_STREAM, 1, first),
            h2_frame(H2_CONTINUATION, END_HEADERS, 1, rest),
        ],
        vec![
            settings,
            h2_frame(H2_HEADERS, END_HEADERS, 1, &post),
            h2_frame(H2_DATA, 0, 1, b"body"),
            h2_frame(
                H2_HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &[
                    0x00, 9, b'x', b'-', b't', b'r', b'a', b'i', b'l', b'e', b'r', 1, b't',
                ],
            ),
        ],
    ]
}

/// Frames HTTP/2 implementations trip on, inserted by the mutator: resets, GOAWAY, window
/// overflows, pings, bogus settings, a CONTINUATION without its HEADERS, an empty DATA on
/// stream 0, and a frame of an unknown type.
fn h2_tokens() -> Vec<Vec<u8>> {
    vec![
        h2_frame(H2_RST_STREAM, 0, 1, &8u32.to_be_bytes()),
        h2_frame(H2_GOAWAY, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0]),
        h2_frame(H2_WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes()),
        h2_frame(H2_WINDOW_UPDATE, 0, 1, &0u32.to_be_bytes()),
        h2_frame(H2_PING, 0, 0, &[7; 8]),
        h2_frame(H2_SETTINGS, 0, 0, &[0, 4, 0xff, 0xff, 0xff, 0xff]),
        h2_frame(H2_SETTINGS, 0, 0, &[0, 5, 0, 0, 0, 1]),
        h2_frame(H2_CONTINUATION, 0, 5, &[0x82; 64]),
        h2_frame(H2_DATA, END_STREAM, 0, &[]),
        h2_frame(0x42, 0xff, 7, b"unknown"),
    ]
}

/// A mutant of an HTTP/2 seed: frames dropped, duplicated, reordered or inserted, and bytes
/// flipped, cut or inserted (lengths, types, flags and stream ids included), drawn from
/// `random`; the connection preface stays in front unless a byte mutation hits it.
fn mutate_h2(random: &mut fastrand::Rng) -> Vec<u8> {
    let seeds = h2_seeds();
    let mut frames = seeds[random.usize(..seeds.len())].clone();
    let tokens = h2_tokens();
    for _ in 0..random.usize(1..=2) {
        let at = random.usize(..=frames.len());
        match random.u8(..4) {
            0 if !frames.is_empty() => {
                frames.remove(random.usize(..frames.len()));
            }
            1 if !frames.is_empty() => {
                let frame = frames[random.usize(..frames.len())].clone();
                for _ in 0..random.usize(1..=40) {
                    frames.insert(at.min(frames.len()), frame.clone());
                }
            }
            2 if frames.len() > 1 => {
                let (a, b) = (random.usize(..frames.len()), random.usize(..frames.len()));
                frames.swap(a, b);
            }
            _ => frames.insert(at, tokens[random.usize(..tokens.len())].clone()),
        }
    }
    let mut bytes = H2_PREFACE.to_vec();
    bytes.extend(frames.concat());
    // Byte damage in one mutant of three, so that most reach the plugins as frames.
    let damage = if random.u8(..3) == 0 {
        random.usize(1..=3)
    } else {
        0
    };
    for _ in 0..damage {
        let at = random.usize(24..=bytes.len());
        match random.u8(..3) {
            0 if at < bytes.len() => bytes[at] = random.u8(..),
            1 => bytes.truncate(at),
            _ => {
                let noise: Vec<u8> = (0..random.usize(1..9)).map(|_| random.u8(..)).collect();
                bytes.splice(at..at, noise);
            }
        }
    }
    bytes
}

/// Sends an HTTP/2 `conversation` on a connection of its own, reads the server's frames until
/// it has been quiet for `quiet` (an HTTP/2 server keeps a connection open for more streams,
/// and closing ours at once would cut the answers short), half-closes the connection and reads
/// until the server closes it: whether a response (a HEADERS frame) came, or how the exchange
/// ended ("timed out" if the server neither answered nor closed within 10 s of the half-close).
fn raw_h2_exchange(port: u16, conversation: &[u8], quiet: Duration) -> String {
    use std::io::{ErrorKind, Read, Write};
    let Ok(mut connection) = TcpStream::connect(("127.0.0.1", port)) else {
        return "not accepted".to_string();
    };
    let _ = connection.write_all(conversation);
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let _ = connection.set_read_timeout(Some(quiet));
    let mut end = None;
    while end.is_none() {
        match connection.read(&mut buffer) {
            Ok(0) => end = Some("closed"),
            Ok(count) => received.extend_from_slice(&buffer[..count]),
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break
            }
            Err(_) => end = Some("reset"),
        }
    }
    if end.is_none() {
        let _ = connection.shutdown(std::net::Shutdown::Write);
        let _ = connection.set_read_timeout(Some(Duration::from_secs(10)));
        end = Some(loop {
            match connection.read(&mut buffer) {
                Ok(0) => break "closed",
                Ok(count) => received.extend_from_slice(&buffer[..count]),
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    break "timed out"
                }
                Err(_) => break "reset",
            }
        });
    }
    let end = end.unwrap_or("closed");
    // Walk the server's frames: a HEADERS frame is a response (or its trailers).
    let (mut at, mut answered, mut goaway) = (0, false, false);
    while at + 9 <= received.len() {
        let length = u32::from_be_bytes([0, received[at], received[at + 1], received[at + 2]]);
        match received[at + 3] {
            H2_HEADERS => answered = true,
            H2_GOAWAY => goaway = true,
            _ => {}
        }
        at += 9 + length as usize;
    }
    match (answered, goaway, end) {
        (_, _, "timed out") => "timed out".to_string(),
        (true, _, _) => "answered".to_string(),
        (false, true, _) => "GOAWAY".to_string(),
        (false, false, end) => end.to_string(),
    }
}

/// Mutated HTTP/2 conversations (`PWHOST_H2_FUZZ_INPUTS`, default 300, from fixed seeds) on
/// raw h2c connections through a chain of plugins: each is answered, refused with GOAWAY or
/// closed within a bounded time, never hung; the proxy stays up, every stream that reached the
/// plugins ends and the counts add up, and valid requests are served afterwards.
#[test]
fn mutated_http2_conversations_get_an_answer_or_a_close_and_the_proxy_serves_on() {
    let inputs = count_from_env("PWHOST_H2_FUZZ_INPUTS", 300);
    let origin = Origin::start();
    let mut serve = serve_for_fuzzing(&origin);
    let port = serve.port;
    // The seeds themselves are valid: each is answered.
    for (index, seed) in h2_seeds().iter().enumerate() {
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend(seed.concat());
        assert_eq!(
            raw_h2_exchange(port, &bytes, Duration::from_millis(500)),
            "answered",
            "seed {index}\n{}",
            serve.log()
        );
    }
    let started = Instant::now();
    let outcomes = on_clients(4, inputs, |seed| {
        let conversation = mutate_h2(&mut fastrand::Rng::with_seed(seed as u64));
        (
            seed,
            raw_h2_exchange(port, &conversation, Duration::from_millis(100)),
        )
    });
    let summary = format!("{inputs} mutated HTTP/2 conversations");
    assert_no_hang_and_serving_on(&mut serve, &summary, started, &outcomes);
}

/// Reads from `connection` until it closes or `within` passes: what came, and whether it
/// closed.
fn read_until_closed(connection: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    use std::io::Read;
    let deadline = Instant::now() + within;
    let mut received = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (received, false);
        }
        connection
            .set_read_timeout(Some(left))
            .expect("a read timeout");
        match connection.read(&mut buffer) {
            Ok(0) => return (received, true),
            Ok(count) => received.extend_from_slice(&buffer[..count]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
                return (received, true)
            }
            Err(_) => return (received, false),
        }
    }
}

/// Sends a request in `parts` (300 ms apart) on a kept-alive `connection` and reads its whole
/// answer (the origin's answers have a `content-length`): the status line.
fn keep_alive_get(connection: &mut TcpStream, parts: &[&[u8]]) -> String {
    use std::io::{Read, Write};
    for (index, part) in parts.iter().enumerate() {
        if index > 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        connection.write_all(part).expect("the request goes");
    }
    connection
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&received).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .expect("a content-length");
            if received.len() >= end + 4 + length {
                return text.lines().next().unwrap_or("").to_string();
            }
        }
        match connection.read(&mut buffer) {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&received).to_string(),
            Ok(count) => received.extend_from_slice(&buffer[..count]),
        }
    }
}

/// `request_headers_timeout: 0s` turns the deadline off: a client may take its time with its
/// headers (Pingora's own 60 s per read still holds).
#[test]
fn a_request_headers_timeout_of_0s_lets_a_slow_client_finish_its_headers() {
    use std::io::Write;
    let origin = Origin::start();
    let serve = Serve::start_with_fields(
        origin.address,
        "    request_headers_timeout: 0s\n",
        &[envoy_filter("api_key", "local_response", "secret")],
    );
    let mut slow = TcpStream::connect(("127.0.0.1", serve.port)).expect("the proxy accepts");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .expect("half a request");
    // Past the default test deadline (1 s elsewhere) and then some: nothing came back.
    slow.set_read_timeout(Some(Duration::from_millis(2500)))
        .expect("a read timeout");
    match slow.peek(&mut [0u8; 1]) {
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("the slow client was answered or cut: {other:?}"),
    }
    let status = keep_alive_get(&mut slow, &[b"x-api-key: secret\r\n\r\n"]);
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "{status:?}\n{}",
        serve.log()
    );
}

/// A request answered before its body was all read (here a plugin's 403 to an upload without
/// its key) ends its connection: the rest of the body is not read as the next request, and the
/// client is not kept waiting to send it.
#[test]
fn a_request_answered_before_its_body_was_read_ends_its_connection() {
    let origin = Origin::start();
    let serve = Serve::start_with(
        origin.address,
        &[envoy_filter("api_key", "local_response", "secret")],
        &[],
    );
    let mut upload = TcpStream::connect(("127.0.0.1", serve.port)).expect("the proxy accepts");
    let status = keep_alive_get(
        &mut upload,
        &[b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nGET / HTTP"],
    );
    assert!(status.starts_with("HTTP/1.1 403"), "{status:?}");
    let (received, closed) = read_until_closed(&mut upload, Duration::from_secs(10));
    assert!(
        closed && received.is_empty(),
        "{:?}, closed: {closed}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(origin.requests.load(Ordering::Relaxed), 0);
}

/// The admin listener has the same headers deadline as an HTTP listener (its own
/// `request_headers_timeout`, 60 s unless set): a client that connects and sends nothing, or
/// too little, no longer holds a connection for ever; a keep-alive client between requests is
/// not cut.
#[test]
fn the_admin_listener_times_out_clients_too_slow_with_their_headers() {
    use std::io::Write;
    let origin = Origin::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (port, admin_port) = (free_port(), free_port());
    let config = format!(
        "admin: {{address: 127.0.0.1:{admin_port}, request_headers_timeout: 1s}}\n\
         listeners:\n  - name: main\n    address: 127.0.0.1:{port}\n    \
         routes: [{{prefix: /, cluster: backend}}]\n\
         clusters:\n  backend: {{endpoints: [\"{}\"]}}\n",
        origin.address
    );
    let serve = Serve::launch(dir, port, admin_port, &config);
    let connect = || TcpStream::connect(("127.0.0.1", admin_port)).expect("the admin accepts");

    let mut silent = connect();
    let (received, closed) = read_until_closed(&mut silent, Duration::from_secs(10));
    assert!(
        closed && received.is_empty(),
        "{received:?}, closed: {closed}\n{}",
        serve.log()
    );

    let mut cut_short = connect();
    cut_short
        .write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\n")
        .expect("a request line");
    let (received, closed) = read_until_closed(&mut cut_short, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&received);
    assert!(closed && text.starts_with("HTTP/1.1 408 "), "{text:?}");

    // Two requests on one connection, idle longer than the deadline between them.
    let mut keep_alive = connect();
    for _ in 0..2 {
        let status = keep_alive_get(
            &mut keep_alive,
            &[b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"],
        );
        assert!(status.starts_with("HTTP/1.1 200 "), "{status:?}");
        std::thread::sleep(Duration::from_millis(1500));
    }
}

#[test]
fn a_client_too_slow_with_its_headers_gets_a_408_and_a_silent_connection_is_closed() {
    use std::io::Write;
    let origin = Origin::start();
    let serve = Serve::start_with_fields(
        origin.address,
        "    request_headers_timeout: 1s\n",
        &[envoy_filter("api_key", "local_response", "secret")],
    );
    let port = serve.port;
    let connect = || TcpStream::connect(("127.0.0.1", port)).expect("the proxy accepts");

    // A connection that sends nothing is closed without an answer (before, Pingora waited for
    // its first 24 bytes for ever).
    let mut silent = connect();
    let (received, closed) = read_until_closed(&mut silent, Duration::from_secs(10));
    assert!(
        closed && received.is_empty(),
        "{received:?}, closed: {closed}"
    );

    // A whole HTTP/1.0 request shorter than those 24 bytes is answered (the plugin's 403: no
    // key), not left to the deadline.
    let mut short_request = connect();
    short_request
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("18 bytes");
    let (received, _) = read_until_closed(&mut short_request, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 403 "), "{text:?}");

    // A request line cut short, under 24 bytes: 408.
    let mut cut_short = connect();
    cut_short.write_all(b"GET / HT").expect("a few bytes");
    let (received, closed) = read_until_closed(&mut cut_short, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&received);
    assert!(closed && text.starts_with("HTTP/1.1 408 "), "{text:?}");

    // Headers dripped a byte every 100 ms, each read far within Pingora's own 60 s: the
    // deadline counts from the first byte, so the drip is cut with a 408 long before it ends.
    let mut dripping = connect();
    let started = Instant::now();
    let header = b"GET / HTTP/1.1\r\nHost: x\r\nx-api-key: secret\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut sent = 0;
    for byte in header {
        if dripping.write_all(&[*byte]).is_err() {
            break;
        }
        sent += 1;
        // Stop at the first sign of an answer (writing on would make the proxy's side reset).
        dripping
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("a read timeout");
        match dripping.peek(&mut [0u8; 1]) {
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            _ => break,
        }
    }
    let (received, closed) = read_until_closed(&mut dripping, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&received);
    assert!(closed && text.starts_with("HTTP/1.1 408 "), "{text:?}");
    assert!(
        sent < header.len(),
        "all {sent} bytes went in over {:?}: the drip was not cut",
        started.elapsed()
    );

    // A kept-alive connection has no deadline between requests, and each request has one of
    // its own from its first byte: idle for 2.5 s after its first answer, it is served again,
    // the second request sent in two parts 300 ms apart (the first request's deadline long
    // past); its third request, begun and left unfinished, gets the 408.
    let mut kept = connect();
    let request = b"GET / HTTP/1.1\r\nHost: x\r\nx-api-key: secret\r\n\r\n";
    assert!(keep_alive_get(&mut kept, &[request]).starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(2500));
    let (first, second) = request.split_at(20);
    assert!(keep_alive_get(&mut kept, &[first, second]).starts_with("HTTP/1.1 200"));
    kept.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .expect("half a request");
    let (received, closed) = read_until_closed(&mut kept, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&received);
    assert!(closed && text.starts_with("HTTP/1.1 408 "), "{text:?}");

    // An HTTP/2 connection is exempt once its preface came: idle past the timeout, its next
    // stream is answered.
    let mut h2 = connect();
    h2.write_all(H2_PREFACE).expect("the preface");
    h2.write_all(&h2_frame(H2_SETTINGS, 0, 0, &[]))
        .expect("settings");
    std::thread::sleep(Duration::from_millis(2500));
    h2.write_all(&h2_frame(
        H2_HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &h2_request_block("GET", "/", &[("x-api-key", "secret")]),
    ))
    .expect("a request");
    assert!(
        h2_response_headers_come(&mut h2, 1),
        "no response on stream 1"
    );

    // No plugin saw a timed-out request; each is counted as a request answered 408 (once the
    // last stream has ended: its response is counted when it is whole).
    assert_eq!(origin.requests.load(Ordering::Relaxed), 3);
    let expected = [
        (
            "pwhost_request_header_timeouts_total{listener=\"main\"}",
            3.0,
        ),
        (
            "pwhost_responses_total{listener=\"main\",code=\"408\"}",
            3.0,
        ),
        (
            "pwhost_responses_total{listener=\"main\",code=\"403\"}",
            1.0,
        ),
        (
            "pwhost_responses_total{listener=\"main\",code=\"200\"}",
            3.0,
        ),
        ("pwhost_requests_total{listener=\"main\"}", 7.0),
    ];
    serve.wait_for_samples(&expected);
    serve.wait_for_no_live_contexts();
}

/// Whether a HEADERS frame for `stream` comes on the HTTP/2 `connection` within 10 s.
fn h2_response_headers_come(connection: &mut TcpStream, stream: u32) -> bool {
    use std::io::Read;
    connection
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    let mut header = [0u8; 9];
    while connection.read_exact(&mut header).is_ok() {
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; length];
        if connection.read_exact(&mut payload).is_err() {
            return false;
        }
        let id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        if header[3] == H2_HEADERS && id == stream {
            return true;
        }
    }
    false
}

#[test]
fn a_client_that_stops_reading_is_reset_after_the_stream_idle_timeout_and_leaves_nothing_behind() {
    use std::io::{Read, Write};
    let origin = Origin::start();
    let serve = Serve::start_with_fields(
        origin.address,
        "    stream_idle_timeout: 1s\n",
        &[envoy_filter("headers", "http_headers", "")],
    );
    let port = serve.port;
    // 64 MiB asked for, a few KiB read, then nothing: the proxy's writes stop going anywhere.
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("the proxy accepts");
    client
        .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("the request");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    let mut buffer = vec![0u8; 64 * 1024];
    let first = client.read(&mut buffer).expect("the response begins");
    assert!(String::from_utf8_lossy(&buffer[..first]).starts_with("HTTP/1.1 200"));
    // The stream is reset a second after the writes stall: the proxy counts it and ends its
    // plugin context, with the client still not reading.
    let client_resets = "pwhost_resets_total{listener=\"main\",cause=\"client\"}";
    serve.wait_for_samples(&[(client_resets, 1.0), ("pwhost_in_flight", 0.0)]);
    serve.wait_for_no_live_contexts();
    // What the client reads now ends short of the 64 MiB.
    let mut received = first;
    loop {
        match client.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(count) => received += count,
        }
    }
    assert!(received < BIG_RESPONSE, "{received} bytes");
    // The plugin saw the stream's end.
    serve.wait_for_log("done: /big");

    // The same over HTTP/2, where the client stops reading by giving no flow-control window
    // beyond the first 64 KiB: that stream is reset too.
    let mut h2 = TcpStream::connect(("127.0.0.1", port)).expect("the proxy accepts");
    h2.write_all(H2_PREFACE).expect("the preface");
    h2.write_all(&h2_frame(H2_SETTINGS, 0, 0, &[]))
        .expect("settings");
    h2.write_all(&h2_frame(
        H2_HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &h2_request_block("GET", "/big", &[]),
    ))
    .expect("a request");
    serve.wait_for_samples(&[(client_resets, 2.0), ("pwhost_in_flight", 0.0)]);
    serve.wait_for_no_live_contexts();
}

#[test]
fn a_held_stream_gets_its_plugins_failure_policy_when_another_stream_fails_the_copy_or_a_408_past_the_idle_timeout(
) {
    let origin = Origin::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (port, admin_port) = (free_port(), free_port());
    // One worker: every stream on the same VM copy of `panics`, which holds a stream with
    // `x-hold` for ever and traps on `x-panic`.
    let config = format!(
        "workers: 1\nadmin: {{address: 127.0.0.1:{admin_port}}}\nlisteners:\n  - name: main\n    \
         address: 127.0.0.1:{port}\n    stream_idle_timeout: 2s\n    \
         routes: [{{prefix: /, cluster: backend}}]\n    http_filters:\n{}\
         clusters:\n  backend: {{endpoints: [\"{}\"]}}\n",
        envoy_filter("panics", "panics", ""),
        origin.address
    );
    let serve = Serve::launch(dir, port, admin_port, &config);
    let url = serve.url("/held");

    // Held and left alone: Envoy's answer to a stream idle that long.
    let reply = get(&url, &[("x-hold", "1")]);
    assert_eq!(reply.status, 408, "{reply:?}");
    serve.wait_for_no_live_contexts();

    // Held, then another stream's callback traps the copy holding it: the held stream gets the
    // plugin's failure policy (fail closed: 503) at once, not the idle timeout's 408.
    let held = {
        let url = url.clone();
        std::thread::spawn(move || try_get(&url, &[("x-hold", "1")]))
    };
    serve.wait_for_samples(&[("pwhost_live_stream_contexts", 1.0)]);
    let trapped = get(&url, &[("x-panic", "now")]);
    assert_eq!(trapped.status, 503, "{trapped:?}");
    let reply = held.join().expect("the held client").expect("an answer");
    assert_eq!(reply.status, 503, "{reply:?}");
    serve.wait_for_no_live_contexts();
    assert_eq!(origin.requests.load(Ordering::Relaxed), 0);
}

#[test]
fn a_plugin_whose_tick_traps_fails_closed_and_leaves_its_worker_idle() {
    let origin = Origin::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (port, admin_port) = (free_port(), free_port());
    let plugin = corpus_plugin("wat/trap_in_tick");
    let config = format!(
        "workers: 1\nadmin: {{address: 127.0.0.1:{admin_port}}}\nlisteners:\n  - name: main\n    \
         address: 127.0.0.1:{port}\n    routes: [{{prefix: /, cluster: backend}}]\n    \
         http_filters:\n      - name: ticking\n        vm_config: {{runtime: wasmtime, code: \
         {{local: {{filename: {}}}}}}}\n\
         clusters:\n  backend: {{endpoints: [\"{}\"]}}\n",
        plugin.display(),
        origin.address
    );
    let serve = Serve::launch(dir, port, admin_port, &config);
    // The first stream makes the worker's copy, whose 10 ms tick traps: the copy fails (fail
    // closed, Envoy's default), and the streams after it get 503.
    get(&serve.url("/"), &[]);
    serve.wait_for_log("proxy_on_tick failed");
    assert_eq!(get(&serve.url("/"), &[]).status, 503);
    // The failed copy's timer is gone: the worker waits, it does not spin on a tick that is
    // always due (the process's CPU time over a second stays far below a second's).
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", serve.child.id()))
            .expect("the proxy's /proc stat");
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        // utime and stime, fields 14 and 15 of stat (12 and 13 after the command's `)`).
        fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0)
    };
    let before = cpu();
    std::thread::sleep(Duration::from_secs(1));
    let ticks = cpu() - before;
    assert!(
        ticks < 30,
        "{ticks} clock ticks of CPU in an idle second: a spin"
    );
    serve.wait_for_no_live_contexts();
}

/// An upstream on 127.0.0.1 that answers its one connection as soon as it has the request's
/// headers, before its body: a 200 whose chunked body begins (`early`) and does not end while
/// the connection lasts (the whole at most 10 s).
fn answering_early() -> (SocketAddr, JoinHandle<()>) {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").expect("a listener");
    let address = listener.local_addr().expect("its address");
    let server = std::thread::spawn(move || {
        // At most 10 s for the proxy to come, and for the connection to last.
        let deadline = Instant::now() + Duration::from_secs(10);
        let _ = listener.set_nonblocking(true);
        let mut connection = loop {
            match listener.accept() {
                Ok((connection, _)) => break connection,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(_) => return,
            }
        };
        let _ = connection.set_nonblocking(false);
        let _ = connection.set_read_timeout(Some(Duration::from_secs(10)));
        let mut received = Vec::new();
        let mut buffer = [0u8; 16 * 1024];
        while !received.windows(4).any(|w| w == b"\r\n\r\n") {
            match connection.read(&mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(count) => received.extend_from_slice(&buffer[..count]),
            }
        }
        let _ = connection.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n\
              5\r\nearly\r\n",
        );
        while Instant::now() < deadline {
            match connection.read(&mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    (address, server)
}

/// A plugin that buffers a body (`StopIterationAndBuffer`) past
/// `per_connection_buffer_limit_bytes` fails the stream as Envoy does: a request with a 413
/// (before the upstream answers), a response by ending it (a 500 if its headers have not gone
/// out, else cut): the client never gets what the plugin could not hold.
#[test]
fn a_body_buffered_past_the_limit_is_a_413_for_a_request_and_ends_a_response() {
    let origin = Origin::start();
    let serve = Serve::start_with_fields(
        origin.address,
        "    per_connection_buffer_limit_bytes: 65536\n",
        &[envoy_filter("body_rewrite", "body_rewrite", "")],
    );
    // A first chunk of 100 KiB, and no more: the plugin buffers it, waiting for the body's
    // end, past the limit. (Nothing sent is left unread when the proxy answers, so no reset
    // of unread bytes can overtake the answer.)
    let mut request =
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n19000\r\n".to_vec();
    request.extend(std::iter::repeat_n(b'a', 100 * 1024));
    request.extend_from_slice(b"\r\n");
    let status = raw_status_line(serve.port, &request);
    assert!(
        status.starts_with("HTTP/1.1 413"),
        "{status:?}\n{}",
        serve.log()
    );
    assert_eq!(
        origin.requests.load(Ordering::Relaxed),
        0,
        "no whole request went upstream"
    );
    // The response: 64 MiB the plugin would buffer to its end.
    match try_get(&serve.url("/big"), &[]) {
        Ok(reply) => assert!(
            reply.status == 500 || reply.body.len() < BIG_RESPONSE,
            "{} with {} bytes",
            reply.status,
            reply.body.len()
        ),
        Err(_cut) => {}
    }
    serve.wait_for_no_live_contexts();
}

#[test]
fn a_plugins_reply_after_the_response_began_resets_the_stream_instead_of_joining_its_body() {
    use std::io::Write;
    let (upstream, _server) = answering_early();
    // `body_rewrite` buffers the request body to its end: past the 64 KiB limit, the proxy
    // asks for Envoy's 413, by then too late, the upstream's 200 being on its way.
    let serve = Serve::start_with_fields(
        upstream,
        "    per_connection_buffer_limit_bytes: 65536\n",
        &[envoy_filter("body_rewrite", "body_rewrite", "")],
    );
    let mut client = TcpStream::connect(("127.0.0.1", serve.port)).expect("the proxy accepts");
    client
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
        .expect("the request headers");
    // The body in 16 KiB pieces, slowly enough for the upstream's answer to begin first.
    let piece = vec![b'a'; 16 * 1024];
    for _ in 0..64 {
        if client.write_all(&piece).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (received, _) = read_until_closed(&mut client, Duration::from_secs(15));
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert!(
        !text.contains("413"),
        "the 413 joined the 200's body: {text:?}"
    );
    serve.wait_for_samples(&[(
        "pwhost_resets_total{listener=\"main\",cause=\"plugin\"}",
        1.0,
    )]);
    serve.wait_for_no_live_contexts();
}

/// A plugin failing closed in a request body ends the stream on an HTTP/2 upstream too, which
/// has the request's headers by then (they go first): the upstream's stream is reset at once,
/// not left waiting for the rest of the body until the cluster's request timeout (60 s here),
/// and the client is not left waiting either. (Pingora goes on with an HTTP/2 upstream's
/// response after a body filter's error unless it is marked as the client's.)
#[test]
fn a_plugin_failing_in_a_request_body_resets_an_http2_upstreams_stream_at_once() {
    let upstream = GrpcUpstream::start();
    let trap = corpus_plugin("wat/trap_at_body_end");
    let filter = envoy_filter("trap", "http_headers", "").replace(
        &corpus_plugin("http_headers").display().to_string(),
        &trap.display().to_string(),
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (port, admin_port) = (free_port(), free_port());
    let config = format!(
        "admin: {{address: 127.0.0.1:{admin_port}}}\nlisteners:\n  - name: main\n    \
         address: 127.0.0.1:{port}\n    routes: [{{prefix: /, cluster: grpc}}]\n    \
         http_filters:\n{filter}clusters:\n  grpc: {{endpoints: [\"{}\"], http2: true, \
         request_timeout: 60s}}\n",
        upstream.address
    );
    let serve = Serve::launch(dir, port, admin_port, &config);
    // `Hold` answers its headers at once and reads the request's messages until it ends.
    let started = Instant::now();
    let client = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "--max-time",
            "20",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            "content-type: application/grpc",
            "--data-binary",
            "@-",
        ])
        .arg(serve.url("/pwhost.Echo/Hold"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl runs (apt-get install curl)");
    let mut client = client;
    if let Some(mut stdin) = client.stdin.take() {
        // One empty gRPC message: the body's end, where the plugin traps.
        std::io::Write::write_all(&mut stdin, &[0, 0, 0, 0, 0]).expect("the message");
    }
    let output = client.wait_with_output().expect("curl ends");
    let ended = upstream
        .held_outcome(Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "the upstream's stream was not ended: it waits for the rest of the body\n{}",
                serve.log()
            )
        });
    assert_eq!(
        ended, "ended after 0 messages",
        "the message reached the upstream"
    );
    // curl's exit 28 is its own timeout: the client left waiting.
    assert_ne!(
        output.status.code(),
        Some(28),
        "the client was left waiting ({:?} after the start)\n{}",
        started.elapsed(),
        serve.log()
    );
    serve.wait_for_log("proxy_on_request_body trapped");
}

/// A plugin that changes a body's length but leaves its `Content-Length` (Envoy's plugins must
/// remove it) cannot have the body cut to the old length, or padded out, and passed on as
/// whole: the stream is reset once the bytes no longer match, with an error that says why, so
/// neither the upstream nor the client takes a different body for the one it was told of.
#[test]
fn a_body_whose_length_a_plugin_changes_under_its_content_length_is_reset_not_cut() {
    let origin = Origin::start();
    let serve = Serve::start(
        origin.address,
        &[envoy_filter("bodies", "body_rewrite", "")],
    );
    // 10 bytes, 15 once upper-cased; the plugin keeps the request's length of 10.
    let request = try_send(
        &serve.url("/upload"),
        &[("x-keep-content-length", "1")],
        Some("ŉŉŉŉŉ"),
    );
    assert!(
        request.as_ref().is_err() || request.as_ref().is_ok_and(|reply| reply.status >= 500),
        "{request:?}\n{}",
        serve.log()
    );
    assert_eq!(
        origin.requests.load(Ordering::Relaxed),
        0,
        "the upstream took a body cut to its old length for a whole one: {:?}\n{}",
        origin.last_body.lock().unwrap(),
        serve.log()
    );
    serve.wait_for_log("a plugin changed the length of a request body");
    // The origin's answer grows by 6 bytes under its own length.
    let response = try_send(&serve.url("/grow"), &[("x-grow-response", "1")], None);
    assert!(
        response.is_err(),
        "the client took a response cut to its old length for a whole one: {response:?}\n{}",
        serve.log()
    );
    serve.wait_for_log("a plugin changed the length of a response body");
}

/// A plugin may hold a response in its headers callback, e.g. to check it with a callout, and
/// let it go from the callout's answer with what it changed meanwhile, body and all. A reply
/// made in the response headers callbacks (here a failure answered 503) goes to the client as
/// it is, as in Envoy: the plugins that had not seen the response see none, and none of the
/// origin's header fields or body go out with it.
#[test]
fn a_plugin_holding_the_response_for_a_callout_lets_it_go_with_its_changes() {
    let origin = Origin::answering_with(&[("x-origin-secret", "s3cret")]);
    let auth = Origin::answering_with(&[("x-auth-user", "alice")]);
    let serve = Serve::start_with(
        origin.address,
        &[envoy_filter("check", "http_call", "")],
        &[("auth_cluster", auth.address)],
    );
    let checked = get(&serve.url("/checked"), &[("x-check-response", "1")]);
    assert_eq!(checked.status, 200, "{}", serve.log());
    assert_eq!(checked.header("x-response-checked"), Some("alice"));
    assert!(
        checked.body.contains("hello from origin"),
        "{}",
        checked.body
    );
    assert_eq!(auth.requests.load(Ordering::Relaxed), 1);
    drop(serve);

    let serve = Serve::start_with(
        origin.address,
        &[
            envoy_filter("check", "http_call", ""),
            envoy_filter("trap", "wat/trap_in_response_headers", ""),
        ],
        &[("auth_cluster", auth.address)],
    );
    let failed = get(&serve.url("/guarded"), &[("x-check-response", "1")]);
    assert_eq!(failed.status, 503, "{}", serve.log());
    assert_eq!(failed.header("x-response-checked"), None);
    assert_eq!(failed.header("x-origin-secret"), None);
    assert!(
        !failed.body.contains("hello from origin"),
        "{}",
        failed.body
    );
    assert_eq!(
        auth.requests.load(Ordering::Relaxed),
        1,
        "a check after the reply"
    );
}

/// A proxy-wasm SDK plugin built as a native library runs in `pwhost serve` on the null
/// runtime, and the proxy says at load that its code runs without the call deadline and memory
/// cap its plugins are given.
#[test]
fn a_native_sdk_library_runs_with_a_warning_of_the_limits_it_runs_without() {
    let library =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist/native/libhttp_headers.so");
    assert!(library.exists(), "{} is missing", library.display());
    let origin = Origin::start();
    let filter = envoy_filter("headers", "http_headers", "")
        .replace("envoy.wasm.runtime.wasmtime", "envoy.wasm.runtime.null")
        .replace(
            &corpus_plugin("http_headers").display().to_string(),
            &library.display().to_string(),
        );
    let serve = Serve::start(origin.address, &[filter]);
    serve.wait_for_log(
        "plugin \"headers\": the null runtime cannot keep the call deadline or the memory cap \
         set for plugins",
    );
    let reply = get(&serve.url("/native"), &[]);
    assert_eq!(reply.status, 200, "{}", serve.log());
    assert!(
        reply.body.contains("x-pwhost-plugin: http_headers"),
        "{}",
        reply.body
    );
    assert_eq!(reply.header("x-powered-by"), Some("pwhost"));
}
