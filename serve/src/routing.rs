//! Where requests and connections go: the clusters, and each listener's routes (an HTTP
//! listener) or cluster (a TCP listener). A reload replaces them as one; a stream keeps the
//! routing it was routed with, and calls already made keep their cluster.
//!
//! Listeners are known by their slot (see `worker::Listener`), which a listener keeps for its
//! life: a reload that removes a listener or starts it anew keeps the old slot's routes while
//! the old listener is still used, for the requests its open connections still carry.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use arc_swap::ArcSwap;

use crate::config::{Route, ServeConfig};
use crate::proxy::ClusterState;

/// The clusters by name.
pub(crate) type ClusterMap = BTreeMap<String, Arc<ClusterState>>;

/// The routing in force, replaced whole by a reload.
pub(crate) type SharedRouting = Arc<ArcSwap<Routing>>;

/// One configuration's routing.
pub(crate) struct Routing {
    /// Every cluster, by name (where plugins' calls may go).
    pub(crate) clusters: ClusterMap,
    /// Per listener, by slot.
    listeners: FxHashMap<usize, Arc<Destination>>,
}

/// One route of an HTTP listener, with its cluster.
pub(crate) struct RouteEntry {
    route: Route,
    /// The route's name as plugins read it (`xds.route_name`: empty if unnamed), shared by the
    /// streams routed by it.
    pub(crate) name: Arc<str>,
    pub(crate) cluster: Arc<ClusterState>,
}

/// Where one listener's traffic goes.
enum Destination {
    /// An HTTP listener's routes, in order.
    Routes(Vec<RouteEntry>),
    /// A TCP listener's cluster.
    Cluster(Arc<ClusterState>),
}

impl Routing {
    /// The routing of `config`, whose routes and listeners name only clusters it has (as
    /// [`ServeConfig::read`] checks), its listeners in the slots `slots` (one per listener, in
    /// order). A cluster configured as in `previous` keeps its state (where its round robin
    /// stands), and the slots `retired` of `previous` keep their routes.
    pub(crate) fn of(
        config: &ServeConfig,
        slots: &[usize],
        retired: &[usize],
        previous: Option<&Routing>,
    ) -> Routing {
        let clusters: ClusterMap = config
            .clusters
            .iter()
            .map(|(name, cluster)| {
                let kept = previous
                    .and_then(|previous| previous.clusters.get(name))
                    .filter(|state| state.cluster == *cluster);
                let state = match kept {
                    Some(state) => Arc::clone(state),
                    None => Arc::new(ClusterState::new(name.clone(), cluster.clone())),
                };
                (name.clone(), state)
            })
            .collect();
        let mut listeners: FxHashMap<usize, Arc<Destination>> = previous
            .map(|previous| {
                retired
                    .iter()
                    .filter_map(|slot| Some((*slot, Arc::clone(previous.listeners.get(slot)?))))
                    .collect()
            })
            .unwrap_or_default();
        let destinations = config.listeners.iter().map(|listener| {
            let destination = match &listener.cluster {
                Some(name) => match clusters.get(name) {
                    Some(cluster) => Destination::Cluster(Arc::clone(cluster)),
                    None => Destination::Routes(Vec::new()),
                },
                None => Destination::Routes(
                    listener
                        .routes
                        .iter()
                        .filter_map(|route| {
                            let cluster = clusters.get(&route.cluster)?;
                            Some(RouteEntry {
                                route: route.clone(),
                                name: route.name.as_deref().unwrap_or_default().into(),
                                cluster: Arc::clone(cluster),
                            })
                        })
                        .collect(),
                ),
            };
            Arc::new(destination)
        });
        listeners.extend(slots.iter().copied().zip(destinations));
        Routing {
            clusters,
            listeners,
        }
    }

    /// The first route of HTTP listener `listener` that a request for `path` at `host`
    /// (without port) matches.
    pub(crate) fn route(
        &self,
        listener: usize,
        path: &[u8],
        host: Option<&str>,
    ) -> Option<&RouteEntry> {
        let Some(Destination::Routes(routes)) = self.listeners.get(&listener).map(|d| &**d) else {
            return None;
        };
        routes.iter().find(|entry| {
            let route = &entry.route;
            path.starts_with(route.prefix.as_bytes())
                && route
                    .host
                    .as_deref()
                    .is_none_or(|wanted| host.is_some_and(|h| h.eq_ignore_ascii_case(wanted)))
        })
    }

    /// TCP listener `listener`'s cluster.
    pub(crate) fn tcp_cluster(&self, listener: usize) -> Option<&Arc<ClusterState>> {
        match self.listeners.get(&listener).map(|d| &**d) {
            Some(Destination::Cluster(cluster)) => Some(cluster),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> ServeConfig {
        ServeConfig::parse(text, std::path::Path::new(".")).expect("a configuration")
    }

    const FIRST: &str = "listeners:\n  - address: 127.0.0.1:1\n    routes: \
                         [{prefix: /api, cluster: api, name: api_route}, {prefix: /, cluster: web}]\n  \
                         - address: 127.0.0.1:2\n    protocol: tcp\n    cluster: web\n\
                         clusters:\n  api: {endpoints: [\"127.0.0.1:10\"]}\n  \
                         web: {endpoints: [\"127.0.0.1:20\"]}\n";

    #[test]
    fn requests_take_the_first_matching_route_and_tcp_listeners_their_cluster() {
        let routing = Routing::of(&config(FIRST), &[0, 1], &[], None);
        let name = |cluster: Option<&Arc<ClusterState>>| cluster.map(|c| c.name.clone());
        let route = |path: &[u8]| {
            routing
                .route(0, path, None)
                .map(|entry| (entry.name.to_string(), entry.cluster.name.clone()))
        };
        assert_eq!(route(b"/api/v1"), Some(("api_route".into(), "api".into())));
        // An unnamed route's name is empty, as Envoy's.
        assert_eq!(route(b"/other"), Some((String::new(), "web".into())));
        assert_eq!(name(routing.tcp_cluster(1)).as_deref(), Some("web"));
        assert!(routing.route(1, b"/", None).is_none());
        assert!(routing.tcp_cluster(0).is_none());
    }

    #[test]
    fn a_cluster_unchanged_by_a_reload_keeps_its_state_and_a_changed_one_starts_anew() {
        let first = Routing::of(&config(FIRST), &[0, 1], &[], None);
        let second = Routing::of(
            &config(&FIRST.replace("127.0.0.1:10", "127.0.0.1:11")),
            &[0, 1],
            &[],
            Some(&first),
        );
        assert!(Arc::ptr_eq(&first.clusters["web"], &second.clusters["web"]));
        assert!(!Arc::ptr_eq(
            &first.clusters["api"],
            &second.clusters["api"]
        ));
        assert_eq!(
            second.clusters["api"].cluster.endpoints,
            ["127.0.0.1:11".parse::<std::net::SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn a_listener_in_a_new_slot_has_its_routes_there_and_a_retired_slot_keeps_its_own_while_used() {
        let first = Routing::of(&config(FIRST), &[0, 1], &[], None);
        // The HTTP listener started anew (slot 2) with one route; the TCP one kept its slot.
        let changed = FIRST.replace(
            "[{prefix: /api, cluster: api, name: api_route}, {prefix: /, cluster: web}]",
            "[{prefix: /, cluster: api}]",
        );
        let second = Routing::of(&config(&changed), &[2, 1], &[0], Some(&first));
        let cluster = |routing: &Routing, slot: usize| {
            routing
                .route(slot, b"/other", None)
                .map(|entry| entry.cluster.name.clone())
        };
        assert_eq!(cluster(&second, 2).as_deref(), Some("api"));
        assert_eq!(cluster(&second, 0).as_deref(), Some("web"));
        assert!(second.tcp_cluster(1).is_some());
        assert!(cluster(&second, 3).is_none());
        // Once the old listener is no longer used, its routes go.
        let third = Routing::of(&config(&changed), &[2, 1], &[], Some(&second));
        assert!(cluster(&third, 0).is_none());
        assert_eq!(cluster(&third, 2).as_deref(), Some("api"));
    }
}
