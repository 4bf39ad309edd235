//! TCP listeners: every connection goes through the listener's network filters to its cluster,
//! as Envoy's Wasm network filters in front of its `tcp_proxy`.
//!
//! - `proxy_on_new_connection` when a client connects, in chain order; a plugin that pauses
//!   there holds the connection (the upstream is not dialled yet) until it continues it; a
//!   client that resets the connection meanwhile ends it, as do the idle timeout and a drain.
//! - Data from the client: `proxy_on_downstream_data` in chain order, then upstream; data from
//!   the upstream: `proxy_on_upstream_data` in reverse order, then to the client. Each plugin
//!   may change the chunk (`DownstreamData` / `UpstreamData` buffers) or pause, keeping it (and
//!   what follows) until its next callback or until it continues that direction
//!   (`proxy_continue_stream` with `Downstream` or `Upstream`); what it held then goes on from
//!   the next plugin.
//! - A side is read only while less than the buffer limit of its data waits, in the plugins or
//!   to be written (Envoy's watermarks); a connection without traffic for the listener's
//!   `idle_timeout` is closed.
//! - Each side's end (a FIN) goes through the chain as `end_of_stream` and is passed on as a
//!   half-close, so request/response protocols over TCP work.
//! - At the end: `proxy_on_downstream_connection_close` and
//!   `proxy_on_upstream_connection_close` (`Remote` for a side that closed first, `Local` for one
//!   the proxy closed, `Unknown` for an upstream never reached), then `proxy_on_done`,
//!   `proxy_on_log`, `proxy_on_delete`, in Envoy's order.
//! - `proxy_close_stream`, an upstream that cannot be reached, or a plugin failing closed closes
//!   both sides.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi::PeerType;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream as Downstream;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::admin::{HostMetrics, ListenerLabel};
use crate::stream::{Direction, Forward, Kind, Outcome, Stream, TcpStep};
use crate::worker::Listener;

/// Bytes read from either side at a time.
const CHUNK: usize = 16 * 1024;

/// How long a closing side may take to take what was let through to it, and to end its own
/// sending, with nothing moving: Envoy's `delayed_close_timeout` (1 s).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// One TCP listener's proxy.
pub(crate) struct TcpProxy {
    pub(crate) listener: Arc<Listener>,
    /// The listener's name, for metrics.
    pub(crate) name: String,
    /// Bytes of one direction's data the plugins may hold (and the proxy keep to write)
    /// before the connection stops reading that side.
    pub(crate) buffer_limit: usize,
    /// How long a connection may stay without traffic (`None`: for ever).
    pub(crate) idle_timeout: Option<Duration>,
    /// How long a connection goes on once the listener stopped (a reload retired it, or the
    /// proxy drains): the configuration's `drain_timeout`.
    pub(crate) drain_timeout: Duration,
    pub(crate) metrics: Arc<HostMetrics>,
}

#[async_trait]
impl ServerApp for TcpProxy {
    async fn process_new(
        self: &Arc<Self>,
        downstream: Downstream,
        shutdown: &ShutdownWatch,
    ) -> Option<Downstream> {
        self.metrics
            .connections
            .get_or_create(&ListenerLabel {
                listener: self.name.clone(),
            })
            .inc();
        let _in_flight = self.metrics.in_flight.enter();
        // The cluster in force when the connection came, for the whole connection.
        let Some(cluster) = self
            .listener
            .routing
            .load()
            .tcp_cluster(self.listener.index)
            .cloned()
        else {
            tracing::error!(listener = %self.name, "a TCP listener without a cluster");
            return None;
        };
        let endpoint = cluster.next_endpoint();
        // The connection bounds a plugin's hold itself (the idle timeout, below).
        let mut connection = Stream::new(
            Kind::Tcp,
            Arc::clone(&self.listener),
            self.buffer_limit,
            None,
        );
        let mut info = connection_info(&downstream);
        info.upstream_address = Some(endpoint);
        info.cluster_name = Some(cluster.name.clone());
        connection.begin(&info);
        // The upstream side is not open yet: its close is of a connection never made.
        connection.closed_by[1] = PeerType::Unknown;
        if connection.early_reply.take().is_some() {
            // Failed closed: the client's connection goes.
            return None;
        }
        // A plugin may hold the connection before the upstream is dialled, for at most the
        // idle timeout, and while the client is there.
        let started = sleep_until(self.idle_timeout.map(|timeout| Instant::now() + timeout));
        let mut client_reset = false;
        let opened = tokio::select! {
            outcome = connection.new_connection() => outcome,
            () = reset_by_client(socket_of(&downstream)) => {
                tracing::debug!("the client reset a held new connection");
                client_reset = true;
                Outcome::Close
            }
            () = started => {
                tracing::debug!("a plugin held a new connection past the idle timeout: closed");
                Outcome::Close
            }
            () = drained(shutdown.clone(), self.drain_timeout) => {
                tracing::debug!(
                    listener = %self.name,
                    "the listener stopped: a held new connection closed after the drain timeout"
                );
                Outcome::Close
            }
        };
        if !matches!(opened, Outcome::Continue) {
            connection.closed_by[0] = if client_reset {
                PeerType::Remote
            } else {
                PeerType::Local
            };
            return None;
        }
        let timeout = cluster.cluster.connect_timeout;
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
        let relayed = relay(
            &mut connection,
            downstream,
            upstream,
            self.buffer_limit,
            self.idle_timeout,
        );
        tokio::select! {
            () = relayed => {}
            () = drained(shutdown.clone(), self.drain_timeout) => {
                tracing::debug!(listener = %self.name, "the listener stopped: connection closed after the drain timeout");
                connection.closed_by = [PeerType::Local, PeerType::Local];
            }
        }
        // Dropping the connection ends its plugin contexts (see `Stream`'s `Drop`).
        None
    }
}

/// How often a held new connection's TCP state is looked at (see [`reset_by_client`]): one
/// system call per held connection each time.
const HELD_CLIENT_CHECK: Duration = Duration::from_millis(500);

/// Linux's `TCP_CLOSE` state (`tcpi_state`): the peer reset the connection (or it is closed
/// both ways).
const TCP_CLOSE: u8 = 7;

/// The socket of a client's TCP connection (`None` for any other kind of stream), also under
/// an HTTP listener's headers deadline, for as long as the connection is borrowed.
pub(crate) fn socket_of(downstream: &Downstream) -> Option<BorrowedFd<'_>> {
    use std::os::fd::AsRawFd;
    let io: &dyn pingora::protocols::IO = &**downstream;
    let any = io.as_any();
    if let Some(timed) = any.downcast_ref::<crate::header_timeout::TimedHeaders>() {
        return timed.socket();
    }
    let stream = any.downcast_ref::<pingora::protocols::l4::stream::Stream>()?;
    // SAFETY: the descriptor is the stream's own, open while the stream lives, and the borrow
    // returned cannot outlive the borrow of the stream it came from.
    Some(unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) })
}

/// Resolves once the client has reset its connection (or closed it both ways), as the kernel
/// reports the socket's state, looked at every [`HELD_CLIENT_CHECK`]; never where the state
/// cannot be read (another system than Linux). For a connection a plugin holds while nothing
/// reads it (a new TCP connection; an HTTP/1.1 request whose body is not read yet): what the
/// client sends waits for the plugins, so nothing else would notice the client leave, and the
/// plugins' contexts (and their hold) would stay until a timeout. A client's FIN is not its
/// leaving: a TCP client may half-close and wait for the answer.
pub(crate) async fn reset_by_client(socket: Option<BorrowedFd<'_>>) {
    let Some(socket) = socket else {
        return std::future::pending().await;
    };
    // A look at once as well: a wait that is made anew each time its stream wakes (more often
    // than the period) still looks.
    loop {
        match tcp_state(socket) {
            None => return std::future::pending().await,
            Some(TCP_CLOSE) => return,
            Some(_) => tokio::time::sleep(HELD_CLIENT_CHECK).await,
        }
    }
}

/// The TCP state (`tcpi_state`) of `socket`, on Linux.
#[cfg(target_os = "linux")]
fn tcp_state(socket: BorrowedFd<'_>) -> Option<u8> {
    use std::os::fd::AsRawFd;
    // Only the first byte, the state, is needed. Kernels write as much of their `tcp_info` as
    // fits, and older ones have a shorter one than newer headers (which is why Pingora's own
    // `tcp_info()`, wanting its exact size, reads none before Linux 6.2).
    let mut info = [0u8; 256];
    let mut length = info.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `length` bytes to `info`, which holds that many and
    // lives through the call, and sets `length`, a valid `socklen_t`; the descriptor is open
    // (borrowed), and one that is not a TCP socket is an error.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut length,
        )
    };
    (result == 0 && length > 0).then_some(info[0])
}

/// The TCP state of `socket`: not readable here.
#[cfg(not(target_os = "linux"))]
fn tcp_state(_socket: BorrowedFd<'_>) -> Option<u8> {
    None
}

/// Resolves `timeout` after `stopped` turns true (the listener stopped accepting), as Envoy
/// drains a listener's connections before it closes them.
async fn drained(mut stopped: ShutdownWatch, timeout: Duration) {
    while !*stopped.borrow_and_update() {
        if stopped.changed().await.is_err() {
            // Its sender went without a stop: nothing will stop the listener.
            if !*stopped.borrow() {
                return std::future::pending().await;
            }
            break;
        }
    }
    tokio::time::sleep(timeout).await;
}

/// Envoy's attributes of a downstream connection.
fn connection_info(downstream: &Downstream) -> abi::StreamInfo {
    let mut info = abi::StreamInfo {
        connection_id: Some(crate::connections::next_id()),
        // No TLS.
        mtls: Some(false),
        start_time: Some(std::time::SystemTime::now()),
        ..abi::StreamInfo::default()
    };
    if let Some(digest) = downstream.get_socket_digest() {
        info.source_address = digest.peer_addr().and_then(|a| a.as_inet()).copied();
        info.destination_address = digest.local_addr().and_then(|a| a.as_inet()).copied();
    }
    info
}

/// What happened next on a connection.
enum Event {
    /// Bytes from one side (none: its end), or an error reading it.
    Read(Direction, std::io::Result<usize>),
    /// Progress writing to the side data in `Direction` goes to, or an error doing so.
    Wrote(Direction, std::io::Result<Progress>),
    /// A plugin asked for something outside its callbacks.
    Woken,
    /// Nothing moved for the idle timeout.
    Idle,
}

/// What a write step did.
enum Progress {
    /// Wrote this many pending bytes.
    Wrote(usize),
    /// Flushed what was written.
    Flushed,
    /// Half-closed the side (all its data was written).
    Ended,
}

/// What waits to be written to one side.
#[derive(Default)]
struct Outbox {
    pending: Vec<u8>,
    /// Written but not yet flushed.
    unflushed: bool,
    /// The chain passed the end of the data: half-close once it is written.
    end: bool,
    /// Half-closed.
    ended: bool,
}

impl Outbox {
    fn has_work(&self) -> bool {
        !self.pending.is_empty() || self.unflushed || (self.end && !self.ended)
    }
}

/// The next write step to `writer` for `outbox`: write, then flush, then half-close. Each
/// step may be cancelled (another event came first) and taken again: a write that was cancelled
/// wrote nothing.
async fn drive<W: AsyncWrite + Unpin>(
    writer: &mut W,
    outbox: &Outbox,
) -> std::io::Result<Progress> {
    if !outbox.pending.is_empty() {
        return writer.write(&outbox.pending).await.map(Progress::Wrote);
    }
    if outbox.unflushed {
        writer.flush().await?;
        return Ok(Progress::Flushed);
    }
    writer.shutdown().await?;
    Ok(Progress::Ended)
}

/// Closes a side as Envoy's `FlushWrite` does: what was let through to it is written and its
/// end sent, then what it still sends is read and dropped until it ends too (closing a socket
/// with unread data would reset it, and with it what it has not taken yet), each step within
/// [`FLUSH_TIMEOUT`] of nothing moving, the draining within two. Adds what it writes to
/// `written` as it goes: for the client's side, the bytes the plugins are told were sent,
/// also when a drain's timeout cuts the flush short.
async fn flush_and_close<W, R>(writer: &mut W, reader: &mut R, outbox: &Outbox, written: &mut u64)
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    use tokio::time::timeout;
    if !outbox.ended {
        let mut rest = &outbox.pending[..];
        while !rest.is_empty() {
            match timeout(FLUSH_TIMEOUT, writer.write(rest)).await {
                Ok(Ok(count)) if count > 0 => {
                    rest = &rest[count..];
                    *written += count as u64;
                }
                _ => return,
            }
        }
        if !matches!(timeout(FLUSH_TIMEOUT, writer.flush()).await, Ok(Ok(()))) {
            return;
        }
        if !matches!(timeout(FLUSH_TIMEOUT, writer.shutdown()).await, Ok(Ok(()))) {
            return;
        }
    }
    let drained_by = Instant::now() + 2 * FLUSH_TIMEOUT;
    let mut dropped = [0u8; 4096];
    while let Ok(Ok(count)) =
        tokio::time::timeout_at(drained_by.into(), reader.read(&mut dropped)).await
    {
        if count == 0 {
            return;
        }
    }
}

/// Carries data both ways through the chain until both sides have ended, the connection is
/// closed or it stays idle past `idle_timeout`, recording who closed what. Reading and
/// writing both sides go on at once (a side that does not read cannot stall the other way);
/// a side is read only while less than `limit` bytes of its data wait (in the plugins or to be
/// written), so a slow reader slows its writer down instead of growing buffers.
async fn relay(
    connection: &mut Stream,
    downstream: Downstream,
    upstream: TcpStream,
    limit: usize,
    idle_timeout: Option<Duration>,
) {
    let wake = connection.wake();
    let (mut downstream_reader, mut downstream_writer) = tokio::io::split(downstream);
    let (mut upstream_reader, mut upstream_writer) = upstream.into_split();
    let mut from_downstream = vec![0u8; CHUNK];
    let mut from_upstream = vec![0u8; CHUNK];
    // By direction: [0] goes upstream, [1] downstream.
    let mut outboxes = [Outbox::default(), Outbox::default()];
    let mut reading = [true, true];
    let mut active = Instant::now();
    // Ends with the direction whose data still goes out after one side failed.
    let flushed = loop {
        if outboxes[0].ended && outboxes[1].ended {
            return;
        }
        let may_read = |direction: Direction| {
            let side = direction.index();
            // What waits in all, held by plugins or not yet written, as the README says.
            reading[side]
                && outboxes[side]
                    .pending
                    .len()
                    .saturating_add(connection.held(direction))
                    < limit
        };
        let (read_downstream, read_upstream) =
            (may_read(Direction::Request), may_read(Direction::Response));
        let (write_upstream, write_downstream) = (outboxes[0].has_work(), outboxes[1].has_work());
        let idle_at = idle_timeout.map(|timeout| active + timeout);
        let event = tokio::select! {
            read = downstream_reader.read(&mut from_downstream), if read_downstream => {
                Event::Read(Direction::Request, read)
            }
            read = upstream_reader.read(&mut from_upstream), if read_upstream => {
                Event::Read(Direction::Response, read)
            }
            wrote = drive(&mut upstream_writer, &outboxes[0]), if write_upstream => {
                Event::Wrote(Direction::Request, wrote)
            }
            wrote = drive(&mut downstream_writer, &outboxes[1]), if write_downstream => {
                Event::Wrote(Direction::Response, wrote)
            }
            () = wake.notified() => Event::Woken,
            () = sleep_until(idle_at) => Event::Idle,
        };
        let step = match event {
            Event::Read(direction, Ok(count)) => {
                active = Instant::now();
                let side = direction.index();
                let end = count == 0;
                if end {
                    reading[side] = false;
                    connection.closed_by[side] = PeerType::Remote;
                }
                if direction == Direction::Request {
                    connection.transferred[0] += count as u64;
                }
                let buffer = match direction {
                    Direction::Request => &from_downstream,
                    Direction::Response => &from_upstream,
                };
                // A continue asked outside the connection's callbacks (a callout's answer, a
                // tick) whose wake-up has not been taken yet is acted on first: the plugin
                // forgets, at its next data callback, a continue it did not ask there. What it
                // lets go is queued before the new data runs, which may close the connection.
                let resumed = connection.resume();
                queue(&mut outboxes, resumed.forwards);
                if resumed.close {
                    TcpStep::closed()
                } else {
                    connection.tcp_data(direction, buffer[..count].to_vec(), end)
                }
            }
            Event::Read(direction, Err(error)) => {
                // Reset or broken: the other side is closed by the proxy, once it took what was
                // let through to it (as Envoy's `tcp_proxy` does).
                tracing::debug!(?direction, "connection read failed: {error}");
                connection.closed_by[direction.index()] = PeerType::Remote;
                break direction;
            }
            Event::Wrote(direction, Ok(progress)) => {
                active = Instant::now();
                let outbox = &mut outboxes[direction.index()];
                match progress {
                    Progress::Wrote(count) => {
                        outbox.pending.drain(..count);
                        outbox.unflushed = true;
                        if direction == Direction::Response {
                            connection.transferred[1] += count as u64;
                        }
                    }
                    Progress::Flushed => outbox.unflushed = false,
                    Progress::Ended => outbox.ended = true,
                }
                continue;
            }
            Event::Wrote(direction, Err(error)) => {
                // The receiving side went away: it closed, the proxy closes the other once it
                // took what was let through to it.
                tracing::debug!(?direction, "connection write failed: {error}");
                connection.closed_by[1 - direction.index()] = PeerType::Remote;
                break match direction {
                    Direction::Request => Direction::Response,
                    Direction::Response => Direction::Request,
                };
            }
            Event::Woken => connection.resume(),
            Event::Idle => {
                tracing::debug!(timeout = ?idle_timeout, "TCP connection idle: closed");
                connection.closed_by = [PeerType::Local; 2];
                return;
            }
        };
        // What went through goes out, also before a close.
        queue(&mut outboxes, step.forwards);
        if step.close {
            // Closed by a plugin or its failure policy: both sides go, once they took what was
            // let through to them (Envoy's `proxy_close_stream` closes with `FlushWrite`).
            connection.closed_by = [PeerType::Local; 2];
            let mut uncounted = 0;
            tokio::join!(
                flush_and_close(
                    &mut upstream_writer,
                    &mut upstream_reader,
                    &outboxes[0],
                    &mut uncounted
                ),
                flush_and_close(
                    &mut downstream_writer,
                    &mut downstream_reader,
                    &outboxes[1],
                    &mut connection.transferred[1]
                ),
            );
            return;
        }
    };
    match flushed {
        Direction::Request => {
            let mut uncounted = 0;
            flush_and_close(
                &mut upstream_writer,
                &mut upstream_reader,
                &outboxes[0],
                &mut uncounted,
            )
            .await;
        }
        Direction::Response => {
            flush_and_close(
                &mut downstream_writer,
                &mut downstream_reader,
                &outboxes[1],
                &mut connection.transferred[1],
            )
            .await;
        }
    }
}

/// Queues what the plugins let through for the sides it goes to (`[upstream, downstream]`).
fn queue(outboxes: &mut [Outbox; 2], forwards: Vec<Forward>) {
    for Forward {
        direction,
        data,
        end,
    } in forwards
    {
        let outbox = &mut outboxes[direction.index()];
        outbox.pending.extend_from_slice(&data);
        outbox.end |= end;
    }
}

/// Resolves at `at`, or never.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
