//! Envoy's `request_headers_timeout` for HTTP listeners: a client has this long to send a
//! request's headers, counted from the request's first byte (for a connection's first request,
//! from the connection's start, as nginx's `client_header_timeout`, so a connection that sends
//! nothing is not held either). Past it, a client that had begun a request gets Envoy's 408
//! and the connection closes; one that had sent nothing is closed without an answer.
//!
//! Pingora has no such deadline: it waits up to 60 s for each read while it reads a request's
//! headers, so a client sending a byte a minute holds a connection for ever, and with h2c on
//! it waits without any limit for a new connection's first 24 bytes, to tell HTTP/2's preface
//! from HTTP/1 (so an HTTP/1.0 request shorter than that, `GET / HTTP/1.0` and an empty line,
//! was never answered). So the deadline is kept below Pingora, on the connection's stream
//! itself ([`TimedHeaders`]): reads that wait past it fail. The proxy tells the stream's
//! [`HeaderClock`] when it has a request's headers and when the request ended, which is where
//! the deadline stops and where the next one may start. HTTP/2 connections are exempt once
//! their preface came (their streams' headers come in frames; a connection without streams is
//! closed by Pingora's `h2_idle_timeout`). Every HTTP listener's connections go through
//! [`TimedHeaders`], with a deadline or without, for its peek, which settles HTTP/1 at the
//! first byte that differs from the preface.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::admin::{HostMetrics, ListenerLabel, ResetLabels, ResponseLabels};

/// The first bytes of every HTTP/2 connection (RFC 9113, section 3.4).
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a client that began a request and did not finish its headers in time gets, as from
/// Envoy: a 408, here without a body, on a connection that then closes.
const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// Where a connection is, as far as its headers' deadline goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// Just accepted, nothing read yet: the deadline runs from the connection's start.
    Opened = 0,
    /// Between two requests of a kept-alive connection: no deadline (Pingora's keep-alive
    /// timeout bounds the wait); the next byte starts one.
    Idle = 1,
    /// A request's headers are coming: the deadline runs.
    Receiving = 2,
    /// The proxy has the request's headers: no deadline until the request ends.
    Received = 3,
    /// An HTTP/2 connection: never a deadline.
    Exempt = 4,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            0 => Phase::Opened,
            1 => Phase::Idle,
            2 => Phase::Receiving,
            3 => Phase::Received,
            _ => Phase::Exempt,
        }
    }
}

/// A connection's headers deadline, as the proxy sees it: the proxy tells it where each
/// request is. Shared by the connection's stream and, through the connection table, by the
/// requests served on it.
#[derive(Debug, Default)]
pub(crate) struct HeaderClock {
    /// A [`Phase`]; 0, its default, is `Opened`.
    phase: AtomicU8,
}

impl HeaderClock {
    fn phase(&self) -> Phase {
        // One connection's reads and requests run one at a time on one task (HTTP/1), so no
        // ordering with other memory is needed.
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    fn set(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// Moves from `from` to `to` if the connection is in one of `from`.
    fn advance(&self, from: &[Phase], to: Phase) {
        let now = self.phase();
        if from.contains(&now) {
            self.set(to);
        }
    }

    /// The proxy has a request's headers: the deadline stops.
    pub(crate) fn headers_received(&self) {
        self.advance(&[Phase::Opened, Phase::Receiving], Phase::Received);
    }

    /// The request ended (also one that failed before the proxy had its headers): the next
    /// request's first byte starts a new deadline.
    pub(crate) fn request_ended(&self) {
        self.advance(&[Phase::Received, Phase::Receiving], Phase::Idle);
    }
}

/// Where a listener counts the clients that run out of time.
#[derive(Clone)]
pub(crate) struct TimeoutCounters {
    /// The proxy's metrics.
    pub(crate) metrics: Arc<HostMetrics>,
    /// The listener's name.
    pub(crate) listener: String,
}

impl std::fmt::Debug for TimeoutCounters {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TimeoutCounters")
            .field("listener", &self.listener)
            .finish()
    }
}

impl TimeoutCounters {
    /// Counts a request whose headers did not come in time: as a header timeout (Envoy's
    /// `downstream_rq_header_timeout`), and as a request answered 408 if the 408 went out
    /// whole, else reset (so that requests in still equal responses out and resets).
    fn count(&self, answered: bool) {
        let listener = ListenerLabel {
            listener: self.listener.clone(),
        };
        self.metrics.requests.get_or_create(&listener).inc();
        self.metrics.header_timeouts.get_or_create(&listener).inc();
        if answered {
            let labels = ResponseLabels {
                listener: self.listener.clone(),
                code: 408,
            };
            self.metrics.responses.get_or_create(&labels).inc();
        } else {
            let labels = ResetLabels {
                listener: self.listener.clone(),
                cause: "client",
            };
            self.metrics.resets.get_or_create(&labels).inc();
        }
    }
}

/// A listener's application with the headers deadline in front: each accepted connection's
/// stream is wrapped in a [`TimedHeaders`] before the application sees it.
pub(crate) struct WithHeaderTimeout<A> {
    /// The listener's own application (Pingora's HTTP proxy).
    pub(crate) app: Arc<A>,
    /// How long a client has for a request's headers (`None`: for ever).
    pub(crate) timeout: Option<Duration>,
    /// What is counted when it runs out.
    pub(crate) counters: TimeoutCounters,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for WithHeaderTimeout<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let clock = Arc::new(HeaderClock::default());
        if let Some(digest) = stream.get_socket_digest() {
            crate::connections::opened(&digest, Some(Arc::clone(&clock)));
        }
        let timed = TimedHeaders {
            inner: stream,
            clock,
            timeout: self.timeout,
            deadline: self
                .timeout
                .map(|timeout| Box::pin(tokio::time::sleep(timeout))),
            peeked: Vec::new(),
            peeked_from: 0,
            timed_out: false,
            counters: self.counters.clone(),
        };
        self.app.process_new(Box::new(timed), shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

/// A downstream connection's stream with its headers deadline: reads that wait past it fail
/// (after a 408 for a client that began a request). Everything else is the stream's own.
#[derive(Debug)]
pub(crate) struct TimedHeaders {
    inner: Stream,
    clock: Arc<HeaderClock>,
    timeout: Option<Duration>,
    /// When the current request's headers are due (meaningful while `Opened` or `Receiving`).
    deadline: Option<Pin<Box<Sleep>>>,
    /// What [`Peek::try_peek`] read, to be read again.
    peeked: Vec<u8>,
    peeked_from: usize,
    /// The deadline passed: every read fails from then on.
    timed_out: bool,
    counters: TimeoutCounters,
}

impl TimedHeaders {
    /// The socket of the connection underneath (see [`crate::tcp::socket_of`]).
    pub(crate) fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        crate::tcp::socket_of(&self.inner)
    }

    /// The deadline passed with the connection in `phase`.
    fn time_out(&mut self, cx: &mut Context<'_>, phase: Phase) -> io::Error {
        self.timed_out = true;
        if phase == Phase::Receiving {
            // Pingora is reading the request's headers, so nothing of its own waits to be
            // written. A client that does not read (an earlier answer still unread) may leave
            // no room for the 408: it is then counted as a reset, and the connection closes
            // either way.
            let written = Pin::new(&mut self.inner).poll_write(cx, REQUEST_TIMEOUT);
            let answered = matches!(written, Poll::Ready(Ok(n)) if n == REQUEST_TIMEOUT.len());
            if answered {
                let _ = Pin::new(&mut self.inner).poll_flush(cx);
            }
            self.counters.count(answered);
            tracing::debug!(timeout = ?self.timeout, "request headers not received in time: 408");
        } else {
            tracing::debug!(timeout = ?self.timeout, "no request on a new connection: closed");
        }
        timed_out()
    }

    /// Whether the deadline has passed (registering the task's waker for it if not).
    fn deadline_passed(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline
            .as_mut()
            .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready())
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "request headers not received in time",
    )
}

impl AsyncRead for TimedHeaders {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.timed_out {
            return Poll::Ready(Err(timed_out()));
        }
        if this.peeked_from < this.peeked.len() {
            let rest = &this.peeked[this.peeked_from..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.peeked_from += n;
            if this.peeked_from == this.peeked.len() {
                this.peeked = Vec::new();
                this.peeked_from = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let phase = this.clock.phase();
        let filled = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > filled {
                    match phase {
                        // The first request's deadline runs from the connection's start.
                        Phase::Opened => this.clock.set(Phase::Receiving),
                        Phase::Idle => {
                            this.clock.set(Phase::Receiving);
                            if let (Some(deadline), Some(timeout)) =
                                (this.deadline.as_mut(), this.timeout)
                            {
                                deadline.as_mut().reset(Instant::now() + timeout);
                            }
                        }
                        _ => {}
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match phase {
                Phase::Opened | Phase::Receiving if this.deadline_passed(cx) => {
                    Poll::Ready(Err(this.time_out(cx, phase)))
                }
                _ => Poll::Pending,
            },
            failed => failed,
        }
    }
}

impl AsyncWrite for TimedHeaders {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Peek for TimedHeaders {
    /// Reads up to `buf.len()` bytes under the deadline and keeps them to be read again.
    /// Pingora peeks at a new connection's first 24 bytes to tell HTTP/2's preface from
    /// HTTP/1: the first byte that differs from the preface settles it, so the peek ends there
    /// (or at the client's end of stream) with the rest of `buf` zeroed, where Pingora's own
    /// stream waits for all 24. An HTTP/2 connection is exempt from the deadline from then on.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let mut filled = 0;
        while filled < buf.len() {
            let count = self.read(&mut buf[filled..]).await?;
            if count == 0 {
                break;
            }
            filled += count;
            if !HTTP2_PREFACE.starts_with(&buf[..filled]) {
                break;
            }
        }
        if buf[..filled] == *HTTP2_PREFACE {
            self.clock.set(Phase::Exempt);
        }
        buf[filled..].fill(0);
        // What an earlier peek kept was read again above, up to `buf`'s length; what is left
        // of it comes after.
        let mut peeked = buf[..filled].to_vec();
        peeked.extend_from_slice(&self.peeked[self.peeked_from..]);
        self.peeked = peeked;
        self.peeked_from = 0;
        Ok(true)
    }
}

#[async_trait]
impl Shutdown for TimedHeaders {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

impl UniqueID for TimedHeaders {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

/// The listeners have no TLS; what the stream says of it is passed on all the same.
impl Ssl for TimedHeaders {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for TimedHeaders {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for TimedHeaders {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for TimedHeaders {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}
