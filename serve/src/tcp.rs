//! TCP listeners: every connection goes through the listener's network filters to its cluster,
//! as Envoy's Wasm network filters in front of its `tcp_proxy`.
//!
//! - `proxy_on_new_connection` when a client connects (before the upstream is dialled), in
//!   chain order.
//! - Data from the client: `proxy_on_downstream_data` in chain order, then upstream; data from
//!   the upstream: `proxy_on_upstream_data` in reverse order, then to the client. Each plugin
//!   may change the chunk (`DownstreamData` / `UpstreamData` buffers) or pause, keeping it (and
//!   what follows) until its next callback or until it continues the connection.
//! - Each side's end (a FIN) goes through the chain as `end_of_stream` and is passed on as a
//!   half-close, so request/response protocols over TCP work.
//! - At the end: `proxy_on_downstream_connection_close` and
//!   `proxy_on_upstream_connection_close` (`Remote` for a side that closed first, `Local` for one
//!   the proxy closed, `Unknown` for an upstream never reached), then `proxy_on_done`,
//!   `proxy_on_log`, `proxy_on_delete`, in Envoy's order.
//! - `proxy_close_stream`, an upstream that cannot be reached, or a plugin failing closed closes
//!   both sides.

use std::sync::Arc;

use abi::PeerType;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream as Downstream;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::admin::{HostMetrics, ListenerLabel};
use crate::proxy::ClusterState;
use crate::stream::{Direction, Forward, Kind, Outcome, Stream};
use crate::worker::Listener;

/// Bytes read from either side at a time.
const CHUNK: usize = 16 * 1024;

/// One TCP listener's proxy.
pub(crate) struct TcpProxy {
    pub(crate) listener: Arc<Listener>,
    /// The listener's name, for metrics.
    pub(crate) name: String,
    /// Where every connection goes.
    pub(crate) cluster: Arc<ClusterState>,
    /// Bytes a plugin may hold per direction before the connection is closed.
    pub(crate) buffer_limit: usize,
    pub(crate) metrics: Arc<HostMetrics>,
}

#[async_trait]
impl ServerApp for TcpProxy {
    async fn process_new(
        self: &Arc<Self>,
        downstream: Downstream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Downstream> {
        self.metrics
            .connections
            .get_or_create(&ListenerLabel {
                listener: self.name.clone(),
            })
            .inc();
        let _in_flight = self.metrics.in_flight.enter();
        let endpoint = self.cluster.next_endpoint();
        let mut connection = Stream::new(Kind::Tcp, Arc::clone(&self.listener), self.buffer_limit);
        let mut info = connection_info(&downstream);
        info.upstream_address = Some(endpoint.to_string());
        info.cluster_name = Some(self.cluster.name.clone());
        connection.begin(&info);
        // The upstream side is not open yet: its close is of a connection never made.
        connection.closed_by[1] = PeerType::Unknown;
        if connection.early_reply.take().is_some()
            || !matches!(connection.new_connection(), Outcome::Continue)
        {
            // Failed closed or closed by a plugin: the client's connection goes.
            return None;
        }
        let timeout = self.cluster.cluster.connect_timeout;
        let upstream = match tokio::time::timeout(timeout, TcpStream::connect(endpoint)).await {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(error)) => {
                tracing::debug!(%endpoint, "upstream connection failed: {error}");
                return None;
            }
            Err(_) => {
                tracing::debug!(%endpoint, "upstream connection timed out");
                return None;
            }
        };
        connection.closed_by[1] = PeerType::Local;
        relay(&mut connection, downstream, upstream).await;
        // Dropping the connection ends its plugin contexts (see `Stream`'s `Drop`).
        None
    }
}

/// Envoy's attributes of a downstream connection.
fn connection_info(downstream: &Downstream) -> abi::StreamInfo {
    let mut info = abi::StreamInfo {
        connection_id: u64::try_from(downstream.id()).ok(),
        start_time: Some(std::time::SystemTime::now()),
        ..abi::StreamInfo::default()
    };
    if let Some(digest) = downstream.get_socket_digest() {
        info.source_address = digest
            .peer_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.to_string());
        info.destination_address = digest
            .local_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.to_string());
    }
    info
}

/// What happened next on a connection.
enum Event {
    /// Bytes from one side (none: its end), or an error reading it.
    Read(Direction, std::io::Result<usize>),
    /// A plugin asked for something outside its callbacks.
    Woken,
}

/// Carries data both ways through the chain until both sides have ended or the connection is
/// closed, recording who closed what.
async fn relay(connection: &mut Stream, mut downstream: Downstream, mut upstream: TcpStream) {
    let wake = connection.wake();
    let mut from_downstream = vec![0u8; CHUNK];
    let mut from_upstream = vec![0u8; CHUNK];
    // Whether each side may still send, and whether its end has reached the other side.
    let mut reading = [true, true];
    let mut ended = [false, false];
    while !(ended[0] && ended[1]) {
        let event = tokio::select! {
            read = downstream.read(&mut from_downstream), if reading[0] => {
                Event::Read(Direction::Request, read)
            }
            read = upstream.read(&mut from_upstream), if reading[1] => {
                Event::Read(Direction::Response, read)
            }
            () = wake.notified() => Event::Woken,
        };
        let forwarded = match event {
            Event::Read(direction, Ok(count)) => {
                let side = direction.index();
                let end = count == 0;
                if end {
                    reading[side] = false;
                    connection.closed_by[side] = PeerType::Remote;
                }
                let buffer = match direction {
                    Direction::Request => &from_downstream,
                    Direction::Response => &from_upstream,
                };
                if direction == Direction::Request {
                    connection.transferred[0] += count as u64;
                }
                connection.tcp_data(direction, buffer[..count].to_vec(), end)
            }
            Event::Read(direction, Err(error)) => {
                // Reset or broken: the other side is closed by the proxy.
                tracing::debug!(?direction, "connection read failed: {error}");
                connection.closed_by[direction.index()] = PeerType::Remote;
                return;
            }
            Event::Woken => connection.resume(),
        };
        let forwards = match forwarded {
            Ok(forwards) => forwards,
            // Closed by a plugin or its failure policy: both sides go.
            Err(_) => {
                connection.closed_by = [PeerType::Local; 2];
                return;
            }
        };
        for Forward {
            direction,
            data,
            end,
        } in forwards
        {
            let sent = match direction {
                Direction::Request => send(&mut upstream, &data, end).await,
                Direction::Response => send(&mut downstream, &data, end).await,
            };
            if let Err(error) = sent {
                // The receiving side went away: it closed, the proxy closes the other.
                tracing::debug!(?direction, "connection write failed: {error}");
                let receiving = 1 - direction.index();
                connection.closed_by[receiving] = PeerType::Remote;
                return;
            }
            if direction == Direction::Response {
                connection.transferred[1] += data.len() as u64;
            }
            if end {
                ended[direction.index()] = true;
            }
        }
    }
}

/// Writes `data` to one side, then half-closes it if `end`.
async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    to: &mut S,
    data: &[u8],
    end: bool,
) -> std::io::Result<()> {
    if !data.is_empty() {
        to.write_all(data).await?;
    }
    to.flush().await?;
    if end {
        AsyncWriteExt::shutdown(to).await?;
    }
    Ok(())
}
