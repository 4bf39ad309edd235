//! Configuration updates while serving: on SIGHUP (or `POST /reload` on the admin listener) the
//! file is read again, and every listener's plugin chain, the routes, the TCP listeners'
//! clusters and the clusters replaced. Streams that start afterwards run the new chains and
//! are routed by the new routes; streams in flight finish on the old ones. A configuration that
//! cannot be used, or that changes what needs a restart, is refused with the reason, logged and
//! counted, and the old one keeps serving.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lifecycle::{Engines, Plugins};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::admin::OutcomeLabel;
use crate::config::ServeConfig;
use crate::routing::{Routing, SharedRouting};
use crate::worker::Listener;

/// Reloads the configuration file into the running listeners.
pub(crate) struct Reloader {
    /// The configuration file.
    pub(crate) path: PathBuf,
    pub(crate) engines: Arc<dyn Engines>,
    pub(crate) listeners: Vec<Arc<Listener>>,
    /// The configuration in force.
    pub(crate) config: Mutex<ServeConfig>,
    /// The routing in force.
    pub(crate) routing: SharedRouting,
    /// Reloads by outcome (`done`, `refused`).
    pub(crate) reloads: Family<OutcomeLabel, Counter>,
}

impl Reloader {
    /// Reads the file again and puts its plugin chains, routes and clusters in force; a change
    /// to what listens (listeners, their names, addresses, protocols, limits), the workers,
    /// the services, the admin listener or the drain timeout needs a restart and is refused.
    pub(crate) fn reload(&self) -> Result<(), String> {
        let outcome = self.try_reload();
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

    fn try_reload(&self) -> Result<(), String> {
        let config = ServeConfig::read(&self.path).map_err(|e| e.to_string())?;
        let mut current = self.config.lock().unwrap_or_else(|e| e.into_inner());
        check_reloadable(&config, &current)?;
        // Every chain loads before any is put in force: all or nothing.
        let options = crate::load_options();
        let mut loaded = Vec::new();
        for (index, (listener, new)) in self.listeners.iter().zip(&config.listeners).enumerate() {
            let (_, previous) = listener.live.current();
            let plugins =
                Plugins::load_replacing(&previous, &new.plugins, &*self.engines, &options)
                    .map_err(|e| format!("listeners[{index}].{}: {e}", new.filters_field()))?;
            loaded.push(plugins);
        }
        let routing = Routing::of(&config, Some(&self.routing.load()));
        self.routing.store(Arc::new(routing));
        for (listener, plugins) in self.listeners.iter().zip(loaded) {
            listener.live.replace(plugins);
        }
        *current = config;
        Ok(())
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

/// Whether `new` differs from `old` only in what a reload can put in force (plugin chains,
/// routes, clusters, a TCP listener's cluster); otherwise the first field that needs a
/// restart: what listens (listeners, their names, addresses, protocols, limits, idle
/// timeouts), the workers, the services, the admin listener or the drain timeout.
fn check_reloadable(new: &ServeConfig, old: &ServeConfig) -> Result<(), String> {
    if new.listeners.len() != old.listeners.len() {
        return Err("listeners were added or removed: restart to apply".into());
    }
    for (index, (new, old)) in new.listeners.iter().zip(&old.listeners).enumerate() {
        if new.address != old.address
            || new.name != old.name
            || new.protocol != old.protocol
            || new.limits != old.limits
            || new.idle_timeout != old.idle_timeout
        {
            return Err(format!(
                "listeners[{index}]: its name, address, protocol, limits or idle timeout \
                 changed: restart to apply"
            ));
        }
    }
    for (field, changed) in [
        ("workers", new.workers != old.workers),
        ("services", new.services != old.services),
        ("admin", new.admin != old.admin),
        ("drain_timeout", new.drain_timeout != old.drain_timeout),
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
    fn chains_routes_and_clusters_change_without_a_restart() {
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
    }

    #[test]
    fn what_listens_the_workers_services_admin_and_drain_timeout_need_a_restart() {
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
        refused(&|text| text.replace("8080", "8081"), "listeners[0]");
        refused(
            &|text| text.replace("name: web", "name: api"),
            "listeners[0]",
        );
        refused(
            &|text| text.replace("    routes:", "    max_headers_count: 50\n    routes:"),
            "listeners[0]",
        );
        refused(
            &|text| {
                text.replace(
                    "services:",
                    "  - address: 127.0.0.1:8081\n    routes: [{cluster: backend}]\nservices:",
                )
            },
            "listeners were added",
        );
    }
}
