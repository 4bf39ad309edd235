//! Configuration updates while serving: on SIGHUP (or `POST /reload` on the admin listener) the
//! file is read again and put in force: every listener's plugin chain, the routes, the TCP
//! listeners' clusters, the clusters, and the listeners themselves (Envoy's listener updates).
//! Streams that start afterwards run the new chains and are routed by the new routes; streams
//! in flight finish on the old ones.
//!
//! A listener is known by its name. One whose address, protocol, limits and idle timeout are
//! unchanged keeps its socket, its connections and its VM copies, and gets the new chain. One
//! that is new, or changed in those, starts anew: on a socket bound for it, or, if another
//! listener of the old configuration had its address, on that listener's socket, which then
//! serves the new listener from its next connection on (none waiting is refused). A listener no
//! longer in the file stops accepting and its socket closes. A listener that stops or starts
//! anew is retired: its HTTP connections close after the request each has in flight (idle ones
//! at once), its TCP connections have the drain timeout to end before they are closed, and its
//! VM copies go once its streams and connections ended.
//!
//! A configuration that cannot be used (a plugin that does not load, an address that cannot
//! be listened on), or that changes what needs a restart, is refused with the reason, logged
//! and counted, and the old one keeps serving, unchanged.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use lifecycle::{Engines, Plugins};
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::admin::{HostMetrics, OutcomeLabel};
use crate::config::{self, ServeConfig};
use crate::listening::{self, Listening};
use crate::routing::{Routing, SharedRouting};
use crate::worker::Listener;
use crate::ListenerService;

/// Reloads the configuration file into the running proxy.
pub(crate) struct Reloader {
    /// The configuration file.
    pub(crate) path: PathBuf,
    pub(crate) engines: Arc<dyn Engines>,
    /// The plugins' store of shared data, queues and metrics, which new listeners' plugins
    /// join.
    pub(crate) shared: abi::SharedState,
    /// The Pingora server's configuration, for new HTTP listeners.
    pub(crate) server: Arc<ServerConf>,
    /// The sockets and what serves them.
    pub(crate) listening: Arc<Listening>,
    /// The listeners in force, by name, in the configuration's order.
    pub(crate) listeners: ArcSwap<Vec<(String, Arc<Listener>)>>,
    /// The slot the next new listener gets (slots are never used twice).
    pub(crate) next_slot: AtomicUsize,
    /// The listeners reloads retired, while something still uses them.
    pub(crate) retired: Mutex<Vec<Weak<Listener>>>,
    /// The configuration in force (locked for a whole reload).
    pub(crate) config: Mutex<ServeConfig>,
    /// The text of the configuration in force, readable while a reload runs.
    pub(crate) text: ArcSwap<String>,
    /// The routing in force.
    pub(crate) routing: SharedRouting,
    /// The proxy's own metrics.
    pub(crate) metrics: Arc<HostMetrics>,
    /// Reloads by outcome (`done`, `refused`).
    pub(crate) reloads: Family<OutcomeLabel, Counter>,
    /// Where code comes from (the caches of the proxy's start).
    pub(crate) options: lifecycle::LoadOptions,
}

/// What a reload does with one listener of the new file.
enum Plan {
    /// The listener in force at this position of the old configuration keeps serving, with
    /// these plugins.
    Keep(usize, Plugins),
    /// A listener that starts anew.
    Start(ListenerService, Sockets),
}

/// The socket a new listener starts on.
struct Sockets {
    /// A socket bound for it (`None`: the one already listening on its address).
    bound: Option<std::net::TcpListener>,
    /// The copy to hand over to its service.
    handed: std::net::TcpListener,
}

impl Reloader {
    /// Reads the file again and puts it in force; a change to the workers, the services, the
    /// admin listener or the drain timeout needs a restart and is refused.
    pub(crate) fn reload(&self) -> Result<(), String> {
        // A panic (a defect) is a failed reload with its message, counted and logged as one,
        // not a lost request or signal. It may have come after part of the new configuration
        // was put in force, which the message says.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.try_reload()))
            .unwrap_or_else(|panic| {
                Err(format!(
                    "the reload failed unexpectedly ({}); part of it may be in force: restart \
                     to be sure of the configuration",
                    runtime_api::panic_message(&*panic)
                ))
            });
        let label = OutcomeLabel {
            outcome: if outcome.is_ok() { "done" } else { "refused" }.into(),
        };
        self.reloads.get_or_create(&label).inc();
        match &outcome {
            Ok(()) => tracing::info!(file = %self.path.display(), "configuration reloaded"),
            Err(error) => tracing::error!(
                file = %self.path.display(),
                "reload refused, the configuration in force stays: {error}"
            ),
        }
        outcome
    }

    /// Every listener in force: its name and its plugins.
    pub(crate) fn plugins_in_force(&self) -> Vec<(String, Arc<lifecycle::LivePlugins>)> {
        self.listeners
            .load()
            .iter()
            .map(|(name, listener)| (name.clone(), Arc::clone(&listener.live)))
            .collect()
    }

    fn try_reload(&self) -> Result<(), String> {
        // The file is read once this reload's turn came: of reloads asked at once (a signal
        // and `POST /reload`), the last one puts the file in force as it was last written,
        // never an older reading of it.
        let mut current = self.config.lock().unwrap_or_else(|e| e.into_inner());
        let config = ServeConfig::read(&self.path).map_err(|e| e.to_string())?;
        check_reloadable(&config, &current)?;
        let in_force = self.listeners.load_full();
        // Every chain loads and every new socket is bound before anything is put in force:
        // all or nothing (sockets and plugins of a refused reload go with it).
        let options = &self.options;
        let mut plans = Vec::new();
        for (index, new) in config.listeners.iter().enumerate() {
            let field = new.filters_field();
            // A listener of the same name lends its compiled modules: only what changed is
            // compiled again.
            let same_name = current
                .listeners
                .iter()
                .position(|old| old.name == new.name);
            let plugins = match same_name {
                Some(position) => {
                    let (_, previous) = in_force[position].1.live.current();
                    Plugins::load_replacing(&previous, &new.plugins, &*self.engines, options)
                }
                None => Plugins::load(&new.plugins, &*self.engines, options, self.shared.clone()),
            }
            .map_err(|e| format!("listeners[{index}].{field}: {e}"))?;
            let kept =
                same_name.filter(|&position| listens_alike(&current.listeners[position], new));
            let plan = match kept {
                Some(position) => Plan::Keep(position, plugins),
                None => {
                    let sockets = match self.listening.hand_over(new.address) {
                        Some(handed) => handed.map(|handed| Sockets {
                            bound: None,
                            handed,
                        }),
                        None => listening::bind(new.address).map(|(bound, handed)| Sockets {
                            bound: Some(bound),
                            handed,
                        }),
                    }
                    .map_err(|error| listening::cannot_listen(index, new, &error))?;
                    // A slot of its own, also if the reload is refused later (slots are many).
                    let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
                    let service = ListenerService::new(
                        slot,
                        new,
                        config.drain_timeout,
                        plugins,
                        &self.routing,
                        &self.metrics,
                    );
                    Plan::Start(service, sockets)
                }
            };
            plans.push(plan);
        }
        let kept: HashSet<usize> = plans
            .iter()
            .filter_map(|plan| match plan {
                Plan::Keep(position, _) => Some(*position),
                Plan::Start(..) => None,
            })
            .collect();
        // In force from here on: routes first, so that a new listener's first stream has them.
        // Retired listeners keep theirs, for the requests their connections still carry, until
        // the last thing using such a listener (a connection, a VM copy) is gone.
        let slots: Vec<usize> = plans
            .iter()
            .map(|plan| match plan {
                Plan::Keep(position, _) => in_force[*position].1.index,
                Plan::Start(service, _) => service.shared.index,
            })
            .collect();
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired.retain(|listener| listener.strong_count() > 0);
        retired.extend(
            in_force
                .iter()
                .enumerate()
                .filter(|(position, _)| !kept.contains(position))
                .map(|(_, (_, listener))| Arc::downgrade(listener)),
        );
        let still_used: Vec<usize> = retired
            .iter()
            .filter_map(|listener| Some(listener.upgrade()?.index))
            .collect();
        drop(retired);
        let routing = Routing::of(&config, &slots, &still_used, Some(&self.routing.load()));
        self.routing.store(Arc::new(routing));
        let addresses: HashSet<_> = config.listeners.iter().map(|l| l.address).collect();
        // Sockets no listener of the file has close; the others serve their new listener from
        // the next connection on.
        for (position, old) in current.listeners.iter().enumerate() {
            if !kept.contains(&position) && !addresses.contains(&old.address) {
                self.listening.close(old.address);
            }
        }
        let mut listeners = Vec::new();
        for plan in plans {
            match plan {
                Plan::Keep(position, plugins) => {
                    let (name, listener) = &in_force[position];
                    crate::log_loaded(&plugins, name, &*self.engines);
                    listener.live.replace(plugins);
                    listeners.push((name.clone(), Arc::clone(listener)));
                }
                Plan::Start(service, sockets) => {
                    let (name, address) = (service.name.clone(), service.address);
                    let (_, plugins) = service.shared.live.current();
                    crate::log_loaded(&plugins, &name, &*self.engines);
                    listeners.push((name.clone(), Arc::clone(&service.shared)));
                    let app = service.app(&self.server);
                    match sockets.bound {
                        Some(bound) => {
                            self.listening
                                .serve(&name, address, bound, sockets.handed, app)
                        }
                        None => {
                            if !self.listening.replace(&name, address, sockets.handed, app) {
                                // The socket was there above, under the configuration's lock:
                                // only the shutdown closes it meanwhile.
                                tracing::warn!(listener = %name, %address, "not started: shutting down");
                            }
                        }
                    }
                    tracing::info!(listener = %name, %address, "listener started");
                }
            }
        }
        // Once no new connection reaches them: their VM copies go as their streams end.
        for (position, (name, listener)) in in_force.iter().enumerate() {
            if !kept.contains(&position) {
                listener.retire();
                let address = current.listeners[position].address;
                tracing::info!(listener = %name, %address, "listener retired");
            }
        }
        self.listeners.store(Arc::new(listeners));
        self.text.store(Arc::new(config.text.clone()));
        // The threads running are the ones counted at start.
        let mut config = config;
        config.workers = current.workers;
        *current = config;
        Ok(())
    }
}

/// Whether listener `new` listens as `old` does: same address, protocol, limits and idle
/// timeout (its chain and routes may differ). Otherwise it starts anew.
fn listens_alike(old: &config::Listener, new: &config::Listener) -> bool {
    old.address == new.address
        && old.protocol == new.protocol
        && old.limits == new.limits
        && old.idle_timeout == new.idle_timeout
}

/// Set by a SIGHUP from [`hold_early_hangups`] on: one that comes before [`OnHangup`] watches
/// is a reload once it does.
static EARLY_HANGUP: std::sync::OnceLock<Arc<std::sync::atomic::AtomicBool>> =
    std::sync::OnceLock::new();

/// From now on a SIGHUP no longer terminates the process (its default action), even while the
/// proxy is still loading its plugins, before [`OnHangup`] watches for it: it is kept, and
/// asks for a reload once the proxy serves.
pub(crate) fn hold_early_hangups() {
    let flag = EARLY_HANGUP.get_or_init(Arc::default);
    if let Err(error) = signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(flag)) {
        tracing::warn!("cannot hold SIGHUP while loading (one would stop the proxy): {error}");
    }
}

/// Waits for SIGHUP and reloads, until the server shuts down.
pub(crate) struct OnHangup(pub(crate) Arc<Reloader>);

#[async_trait]
impl BackgroundService for OnHangup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(error) => {
                tracing::error!("cannot watch for SIGHUP, reload only by POST /reload: {error}");
                return;
            }
        };
        // Watched from here: one that came while loading is acted on now.
        let early = EARLY_HANGUP
            .get()
            .is_some_and(|flag| flag.swap(false, std::sync::atomic::Ordering::Relaxed));
        if early {
            tracing::info!("SIGHUP came while loading: reloading");
            let _ = self.0.reload();
        }
        loop {
            tokio::select! {
                _ = hangups.recv() => {
                    let _ = self.0.reload();
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Whether `new` differs from `old` only in what a reload can put in force (listeners, plugin
/// chains, routes, clusters); otherwise the first field that needs a restart: the workers, the
/// services, the admin listener, the drain timeout or the shared limits.
fn check_reloadable(new: &ServeConfig, old: &ServeConfig) -> Result<(), String> {
    for (field, changed) in [
        // Workers as written: left out, the count is the cores', counted at start.
        (
            "workers",
            new.workers_written.is_some_and(|n| n != old.workers),
        ),
        ("services", new.services != old.services),
        ("admin", new.admin != old.admin),
        ("drain_timeout", new.drain_timeout != old.drain_timeout),
        // The shared data and queues outlive reloads, under the limits they began with.
        ("shared_limits", new.shared_limits != old.shared_limits),
    ] {
        if changed {
            return Err(format!("{field} changed: restart to apply"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const IN_FORCE: &str = r#"
workers: 2
admin: {address: 127.0.0.1:9901}
listeners:
  - name: web
    address: 127.0.0.1:8080
    routes: [{cluster: backend}]
    http_filters:
      - name: headers
        vm_config: {code: {local: {filename: plugins/http_headers.wasm}}}
services:
  - name: envoy.bootstrap.wasm
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.wasm.v3.WasmService
      singleton: true
      config:
        name: fetcher
        vm_config: {code: {local: {filename: plugins/root_http_call.wasm}}}
clusters:
  backend: {endpoints: [127.0.0.1:9000]}
"#;

    fn check(change: impl Fn(&str) -> String) -> Result<(), String> {
        let parse = |text: &str| ServeConfig::parse(text, Path::new("/")).expect("a valid file");
        check_reloadable(&parse(&change(IN_FORCE)), &parse(IN_FORCE))
    }

    #[test]
    fn listeners_chains_routes_and_clusters_change_without_a_restart() {
        assert_eq!(check(|text| text.to_string()), Ok(()));
        let chain = |text: &str| text.replace("name: headers", "name: headers_v2");
        assert_eq!(check(chain), Ok(()));
        let routes = |text: &str| {
            text.replace(
                "routes: [{cluster: backend}]",
                "routes: [{prefix: /b, cluster: other}, {cluster: backend}]",
            ) + "  other: {endpoints: [127.0.0.1:9001]}\n"
        };
        assert_eq!(check(routes), Ok(()));
        let endpoints = |text: &str| text.replace("127.0.0.1:9000", "127.0.0.1:9002");
        assert_eq!(check(endpoints), Ok(()));
        // Listeners moved, renamed, limited otherwise, added: the reload starts them anew.
        assert_eq!(check(|text| text.replace("8080", "8081")), Ok(()));
        assert_eq!(check(|text| text.replace("name: web", "name: api")), Ok(()));
        let limited =
            |text: &str| text.replace("    routes:", "    max_headers_count: 50\n    routes:");
        assert_eq!(check(limited), Ok(()));
        let added = |text: &str| {
            text.replace(
                "services:",
                "  - address: 127.0.0.1:8081\n    routes: [{cluster: backend}]\nservices:",
            )
        };
        assert_eq!(check(added), Ok(()));
    }

    #[test]
    fn a_listener_keeps_serving_as_it_is_only_if_what_listens_is_unchanged() {
        let parse = |text: &str| ServeConfig::parse(text, Path::new("/")).expect("a valid file");
        let old = parse(IN_FORCE);
        let alike = |text: &str| listens_alike(&old.listeners[0], &parse(text).listeners[0]);
        assert!(alike(IN_FORCE));
        assert!(alike(
            &IN_FORCE.replace("name: headers", "name: headers_v2")
        ));
        assert!(!alike(&IN_FORCE.replace("8080", "8081")));
        assert!(!alike(&IN_FORCE.replace(
            "    routes:",
            "    max_headers_count: 50\n    routes:"
        )));
    }

    #[test]
    fn the_workers_services_admin_drain_timeout_and_shared_limits_need_a_restart() {
        let refused = |change: &dyn Fn(&str) -> String, field: &str| {
            let error = check(change).expect_err(field);
            assert!(error.contains(field), "{field}: {error}");
            assert!(error.ends_with("restart to apply"), "{error}");
        };
        refused(&|text| text.replace("workers: 2", "workers: 3"), "workers");
        refused(
            &|text| text.replace("name: fetcher", "name: poller"),
            "services",
        );
        refused(&|text| text.replace("9901", "9902"), "admin");
        refused(
            &|text| format!("{text}drain_timeout: 3s\n"),
            "drain_timeout",
        );
        refused(
            &|text| format!("{text}shared_limits: {{queues_per_vm_id: 1}}\n"),
            "shared_limits",
        );
    }

    #[test]
    fn workers_left_out_or_written_as_running_need_no_restart() {
        let parse = |text: &str| ServeConfig::parse(text, Path::new("/")).expect("a valid file");
        // Started without `workers`: the count is the machine's cores, counted at start.
        let started = parse(&IN_FORCE.replace("workers: 2\n", ""));
        let running = started.workers;
        let reload = |text: String| check_reloadable(&parse(&text), &started);
        assert_eq!(reload(IN_FORCE.replace("workers: 2\n", "")), Ok(()));
        let as_running = IN_FORCE.replace("workers: 2", &format!("workers: {running}"));
        assert_eq!(reload(as_running), Ok(()));
        let other = IN_FORCE.replace("workers: 2", &format!("workers: {}", running + 1));
        let error = reload(other).expect_err("another count needs a restart");
        assert!(error.starts_with("workers changed"), "{error}");
        // Written at start and left out later: the count in force stays, as written.
        assert_eq!(check(|text| text.replace("workers: 2\n", "")), Ok(()));
    }
}
