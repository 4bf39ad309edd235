//! `pwhost serve`: a proxy on [Pingora](https://github.com/cloudflare/pingora) whose every
//! HTTP stream and TCP connection goes through a chain of Proxy-Wasm plugins, with Envoy's
//! worker model.
//!
//! - Each HTTP listener has its routes (path prefix, optional host → cluster) and its HTTP
//!   filter chain (plugin blocks as Envoy and Traffic Server write them, through the lifecycle
//!   layer); each TCP listener its cluster and its network filter chain (see the `tcp` module).
//! - Workers: `workers` threads serve every listener (see the `listening` module, which also
//!   lets a reload start, stop and replace listeners). Pingora runs one single-threaded runtime
//!   per worker thread (no work stealing), so a stream stays on one thread from start to end,
//!   and each thread has its own VM copy of every plugin, made on the thread's first stream.
//!   Shared data and queues are one store for the process.
//! - Pingora's phases map onto the callbacks: `request_filter` → `proxy_on_request_headers`
//!   (a paused stream waits there, asynchronously, for the plugin to continue it),
//!   `request_body_filter` → `proxy_on_request_body`, `response_filter` →
//!   `proxy_on_response_headers`, `response_body_filter` → `proxy_on_response_body`,
//!   `response_trailer_filter` → `proxy_on_response_trailers`, `logging` → `proxy_on_log`,
//!   `proxy_on_done`, `proxy_on_delete`.
//!
//! Callouts go to the configuration's clusters: HTTP through Pingora's client, gRPC through
//! tonic's (messages as the plugins' own bytes, see [`RawCodec`]). Singleton services run each
//! on a thread of their own (lifecycle's `SingletonService`); their calls run on a runtime of
//! their own and the answers are posted to the service's thread. A service without `singleton`
//! (Envoy's default) has a VM copy per worker, as in Envoy, on `workers` threads of their own,
//! each an event loop like a listener's worker thread (ticks, queue notifications, calls
//! answered on the thread).

mod admin;
mod callout;
pub mod config;
mod connections;
mod drain;
mod grpc;
mod header_timeout;
mod headers;
mod host;
mod listening;
mod proxy;
mod read_ahead;
mod reload;
mod routing;
mod stream;
mod tcp;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lifecycle::{Engines, LivePlugins, LoadOptions, PluginId, Plugins, SingletonService, Ticking};
use pingora::apps::HttpServerOptions;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;

use crate::listening::{Listening, Workers};

pub use config::{ConfigError, Limits, ServeConfig};
pub use grpc::RawCodec;

/// Why the proxy did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A plugin did not load or start.
    #[error("{0}")]
    Plugins(String),
    /// A listener's address could not be listened on (e.g. another process has it).
    #[error("{0}")]
    Listen(String),
}

/// A listener ready to serve: its plugins and the Pingora application that runs them.
pub(crate) struct ListenerService {
    name: String,
    address: std::net::SocketAddr,
    shared: Arc<worker::Listener>,
    front: Front,
}

/// What serves a listener's clients.
enum Front {
    Http(proxy::ListenerProxy),
    Tcp(tcp::TcpProxy),
}

impl ListenerService {
    /// Listener `listener` of the configuration, in slot `slot`, running `plugins`; its TCP
    /// connections close `drain_timeout` after it stopped.
    pub(crate) fn new(
        slot: usize,
        listener: &config::Listener,
        drain_timeout: Duration,
        plugins: Plugins,
        routing: &routing::SharedRouting,
        metrics: &Arc<admin::HostMetrics>,
    ) -> ListenerService {
        let shared = Arc::new(worker::Listener::new(
            slot,
            format!("listener/{}", listener.name),
            Arc::new(LivePlugins::new(plugins)),
            Arc::clone(routing),
            Arc::clone(metrics),
        ));
        let front = match &listener.cluster {
            Some(_) => Front::Tcp(tcp::TcpProxy {
                listener: Arc::clone(&shared),
                name: listener.name.clone(),
                buffer_limit: listener.limits.buffer_limit_bytes,
                idle_timeout: listener.idle_timeout,
                drain_timeout,
                metrics: Arc::clone(metrics),
            }),
            None => Front::Http(proxy::ListenerProxy {
                listener: Arc::clone(&shared),
                name: listener.name.clone(),
                limits: listener.limits,
                metrics: Arc::clone(metrics),
            }),
        };
        ListenerService {
            name: listener.name.clone(),
            address: listener.address,
            shared,
            front,
        }
    }

    /// The application serving the listener's connections, for a server of configuration
    /// `server`.
    pub(crate) fn app(self, server: &Arc<ServerConf>) -> listening::App {
        match self.front {
            Front::Http(proxy) => {
                let timeout = proxy.limits.request_headers_timeout;
                let counters = header_timeout::TimeoutCounters {
                    metrics: Arc::clone(&proxy.metrics),
                    listener: self.name,
                };
                let mut proxy = pingora::proxy::http_proxy(server, proxy);
                let mut options = HttpServerOptions::default();
                options.h2c = true;
                // An HTTP/2 connection without streams is closed after Envoy's default idle
                // timeout (Pingora drops it without a GOAWAY, so not much sooner: a client's
                // stream sent just then would be lost).
                options.h2_idle_timeout = Some(Duration::from_secs(3600));
                proxy.server_options = Some(options);
                listening::App::Http(header_timeout::WithHeaderTimeout {
                    app: Arc::new(proxy),
                    timeout,
                    counters,
                })
            }
            Front::Tcp(proxy) => listening::App::Tcp(proxy),
        }
    }
}

/// Says which engine runs each plugin of `owner` (a listener, or the services) and how its code
/// was made ready (compiled from bytecode, or taken from a precompiled section or the
/// compilation cache), after the warnings of its loading and the limits `engines` cannot keep
/// for it. Called once the plugins are in force: a refused reload's plugins were never loaded
/// as far as the log is concerned.
pub(crate) fn log_loaded(plugins: &Plugins, owner: &str, engines: &dyn Engines) {
    let warnings = plugins.warnings().iter().cloned();
    for warning in warnings.chain(engines.unenforced_limits(plugins)) {
        tracing::warn!(owner, "{warning}");
    }
    let every = plugins
        .http_filters()
        .chain(plugins.network_filters())
        .chain(plugins.services());
    for plugin in every {
        tracing::info!(
            owner,
            plugin = plugins.config(plugin).display_name(),
            runtime = plugins.module(plugin).runtime_name(),
            compiled_from = plugins.compiled_from(plugin).as_str(),
            "plugin loaded"
        );
    }
}

/// The proxy, loaded and ready to run.
pub struct Proxy {
    config: ServeConfig,
    engines: Arc<dyn Engines>,
    /// The store of shared data, queues and metrics of every plugin.
    shared: abi::SharedState,
    metrics: Arc<admin::HostMetrics>,
    listeners: Vec<ListenerService>,
    services: Vec<SingletonService>,
    /// The services without `singleton` (run on every worker, see [`Proxy::run`]), with the
    /// listener-like view their copies' hosts share.
    worker_services: Option<(Arc<worker::Listener>, Vec<PluginId>)>,
    routing: routing::SharedRouting,
    /// Where code comes from, for reloads too.
    options: LoadOptions,
}

impl Proxy {
    /// Loads every plugin of `config` (compiled once, checked by starting them) and starts its
    /// singleton services; nothing listens yet. For a configuration read from a file, a SIGHUP
    /// from here on no longer terminates the process: one that comes while loading reloads
    /// the file once [`Proxy::run`] serves.
    ///
    /// With `cache_dir`, remote code (by sha256) and compiled code are kept there for the next
    /// start and for reloads, so a start without network still finds the code and a second
    /// start skips compiling (`lifecycle`'s caches); without it, remote code is kept in memory
    /// only and every start compiles.
    pub fn load(
        config: ServeConfig,
        engines: Arc<dyn Engines>,
        cache_dir: Option<&Path>,
    ) -> Result<Proxy, ServeError> {
        if config.path.is_some() {
            reload::hold_early_hangups();
        }
        // Relative file names were made absolute from the configuration's directory.
        let options = LoadOptions::cached_in(PathBuf::from("/"), cache_dir);
        let shared = abi::SharedState::with_limits(config.shared_limits);
        // Listener `i` has slot `i`; the services' view the next one, and listeners a reload
        // starts the ones after (see `reload`).
        let slots: Vec<usize> = (0..config.listeners.len()).collect();
        let routing: routing::SharedRouting = Arc::new(arc_swap::ArcSwap::from_pointee(
            routing::Routing::of(&config, &slots, &[], None),
        ));
        let metrics = Arc::new(admin::HostMetrics::default());
        let mut listeners = Vec::new();
        for (index, listener) in config.listeners.iter().enumerate() {
            let plugins = Plugins::load(&listener.plugins, &*engines, &options, shared.clone())
                .map_err(|e| {
                    let field = listener.filters_field();
                    ServeError::Plugins(format!("listeners[{index}].{field}: {e}"))
                })?;
            log_loaded(&plugins, &listener.name, &*engines);
            listeners.push(ListenerService::new(
                index,
                listener,
                config.drain_timeout,
                plugins,
                &routing,
                &metrics,
            ));
        }
        let mut services = Vec::new();
        let mut worker_services = None;
        if !config.services.services.is_empty() {
            let plugins = Arc::new(
                Plugins::load(&config.services, &*engines, &options, shared.clone())
                    .map_err(|e| ServeError::Plugins(format!("services: {e}")))?,
            );
            log_loaded(&plugins, "services", &*engines);
            let on_workers: Vec<PluginId> = plugins.worker_services().collect();
            if !on_workers.is_empty() {
                let view = Arc::new(worker::Listener::new(
                    // A slot of its own in each thread's workers, after the listeners'.
                    listeners.len(),
                    "services".to_string(),
                    Arc::new(LivePlugins::new_shared(Arc::clone(&plugins))),
                    Arc::clone(&routing),
                    Arc::clone(&metrics),
                ));
                worker_services = Some((view, on_workers));
            }
            for plugin in plugins.singleton_services() {
                let name = plugins.config(plugin).display_name().to_string();
                // Answers to the service's calls go to its inbox, published once it started
                // (calls made while it starts, e.g. from `proxy_on_configure`, wait for it).
                let (publish, address) = tokio::sync::watch::channel(None);
                let service = SingletonService::spawn(
                    Arc::clone(&plugins),
                    plugin,
                    Box::new(host::ServeHost::for_service(
                        &name,
                        Arc::clone(&routing),
                        address,
                        Arc::clone(&metrics),
                    )),
                    Ticking::Clock,
                    Box::new(|_| Ok(())),
                )
                .map_err(|e| ServeError::Plugins(e.to_string()))?;
                publish.send_replace(Some(service.inbox()));
                services.push(service);
            }
        }
        Ok(Proxy {
            config,
            engines,
            shared,
            metrics,
            listeners,
            services,
            worker_services,
            routing,
            options,
        })
    }

    /// Listens and serves until the process is told to stop (SIGTERM or SIGINT: stop
    /// accepting, let streams and connections in flight finish within the drain timeout,
    /// exit 0). SIGHUP reloads the configuration file. Returns only if a listener's address
    /// (or the admin listener's) cannot be listened on, before anything is served.
    pub fn run(self) -> Result<std::convert::Infallible, ServeError> {
        // Every socket first: a taken address stops the proxy here, with the listener's name.
        let mut sockets = Vec::new();
        for (index, listener) in self.config.listeners.iter().enumerate() {
            let socket = listening::bind(listener.address).map_err(|error| {
                ServeError::Listen(listening::cannot_listen(index, listener, &error))
            })?;
            sockets.push(socket);
        }
        if let Some(admin) = self
            .config
            .admin
            .as_ref()
            .filter(|a| !a.address.ip().is_loopback())
        {
            // As Envoy's, the admin listener has no authentication.
            tracing::warn!(
                address = %admin.address,
                "the admin listener is not on loopback: anyone who reaches it can read the \
                 configuration (plugin configurations included) and reload it"
            );
        }
        let admin_socket = match &self.config.admin {
            Some(admin) => Some(listening::bind(admin.address).map_err(|error| {
                ServeError::Listen(format!(
                    "admin: cannot listen on {}: {error}",
                    admin.address
                ))
            })?),
            None => None,
        };
        let drain_timeout = self.config.drain_timeout;
        let conf = ServerConf {
            threads: self.config.workers,
            work_stealing: false,
            // The drain (see `drain`) exits before Pingora's grace period ends.
            grace_period_seconds: Some(drain::grace_period(drain_timeout)),
            graceful_shutdown_timeout_seconds: Some(1),
            ..ServerConf::default()
        };
        let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
        server.bootstrap();
        let workers = self.config.workers;
        let listener_count = self.config.listeners.len();
        let admin_listener = self.config.admin;
        let path = self.config.path.clone();
        let listening = Arc::new(Listening::default());
        let in_force = self
            .listeners
            .iter()
            .map(|listener| (listener.name.clone(), Arc::clone(&listener.shared)))
            .collect();
        let reloader = Arc::new(reload::Reloader {
            path: path.clone().unwrap_or_default(),
            engines: Arc::clone(&self.engines),
            shared: self.shared.clone(),
            server: Arc::clone(&server.configuration),
            listening: Arc::clone(&listening),
            listeners: arc_swap::ArcSwap::from_pointee(in_force),
            // After the listeners' slots and the services' one.
            next_slot: std::sync::atomic::AtomicUsize::new(listener_count + 1),
            retired: Default::default(),
            text: arc_swap::ArcSwap::from_pointee(self.config.text.clone()),
            config: std::sync::Mutex::new(self.config),
            routing: Arc::clone(&self.routing),
            metrics: Arc::clone(&self.metrics),
            reloads: Default::default(),
            options: self.options.clone(),
        });
        server.add_service(pingora::services::background::background_service(
            "drain",
            drain::Drain {
                in_flight: self.metrics.in_flight.clone(),
                timeout: drain_timeout,
            },
        ));
        if path.is_some() {
            server.add_service(pingora::services::background::background_service(
                "reload on SIGHUP",
                reload::OnHangup(Arc::clone(&reloader)),
            ));
        }
        if let (Some(admin_listener), Some((socket, _))) = (admin_listener, admin_socket) {
            let admin = admin::Admin::new(&self.metrics, Arc::clone(&reloader));
            // The same headers deadline as an HTTP listener's: a client holding a connection
            // without sending a request would otherwise hold it for ever.
            let app = header_timeout::WithHeaderTimeout {
                app: Arc::new(pingora::apps::http_app::HttpServer::new_app(admin)),
                timeout: admin_listener.request_headers_timeout,
                counters: header_timeout::TimeoutCounters {
                    metrics: Arc::clone(&self.metrics),
                    listener: "admin".to_string(),
                },
            };
            server.add_service(listening::BoundService::new(
                "admin",
                admin_listener.address,
                socket,
                app,
            ));
        }
        for (listener, (socket, handed)) in self.listeners.into_iter().zip(sockets) {
            let (name, address) = (listener.name.clone(), listener.address);
            let app = listener.app(&server.configuration);
            listening.serve(&name, address, socket, handed, app);
        }
        server.add_service(Workers {
            listening,
            threads: workers,
        });
        if let Some((view, on_workers)) = self.worker_services {
            worker::start_service_workers(workers, &view, &on_workers);
        }
        tracing::info!(workers, listeners = listener_count, "serving");
        // The services live as long as the process.
        std::mem::forget(self.services);
        server.run(pingora::server::RunArgs {
            shutdown_signal: Box::new(drain::Signals),
        });
        std::process::exit(0)
    }
}
