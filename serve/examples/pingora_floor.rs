//! The framework's floor for `bench/serve.sh`: a reverse proxy on Pingora alone, with nothing
//! of pwhost's, set up as `pwhost serve` sets up Pingora (worker threads without work
//! stealing, HTTP/1.1 and h2c downstream with the same HTTP/2 idle timeout, the same upstream
//! peer options, mimalloc).
//!
//! What `pwhost serve` costs beyond it is pwhost's own (listeners, routing, admission, metrics,
//! the plugin chain's plumbing); what it costs beyond nginx is Pingora's.
//!
//! ```text
//! cargo build --release -p pwhost-serve --example pingora_floor
//! target/release/examples/pingora_floor --listen 127.0.0.1:8080 --upstream 127.0.0.1:9000 --workers 1
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use clap::Parser;
use pingora::apps::HttpServerOptions;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::upstreams::peer::HttpPeer;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Command line.
#[derive(Parser)]
struct Arguments {
    /// The address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// The origin every request goes to.
    #[arg(long)]
    upstream: SocketAddr,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

/// Sends every request to one origin, with `pwhost serve`'s cluster defaults.
struct Floor {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> pingora::Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream, false, String::new());
        // `pwhost serve`'s defaults for a cluster (Envoy's: 5 s to connect, 15 s per request).
        peer.options.connection_timeout = Some(Duration::from_secs(5));
        peer.options.read_timeout = Some(Duration::from_secs(15));
        Ok(Box::new(peer))
    }
}

fn main() {
    let arguments = Arguments::parse();
    let conf = ServerConf {
        threads: arguments.workers,
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let floor = Floor {
        upstream: arguments.upstream,
    };
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, floor);
    let mut options = HttpServerOptions::default();
    options.h2c = true;
    options.h2_idle_timeout = Some(Duration::from_secs(3600));
    if let Some(proxy) = service.app_logic_mut() {
        proxy.server_options = Some(options);
    }
    service.add_tcp(&arguments.listen.to_string());
    server.add_service(service);
    server.run_forever();
}
