//! Stopping without cutting anyone off: on SIGTERM or SIGINT the listeners stop accepting, the
//! HTTP streams and TCP connections in flight finish (for at most the drain timeout), then the
//! process exits 0. A second signal while draining exits at once.
//!
//! Pingora stops accepting when told to shut down, but then gives streams a fixed grace period
//! and cancels whatever is left, however long or short it really takes. So the signals come
//! here (a [`ShutdownSignalWatch`] that asks Pingora for its graceful terminate on both), and a
//! background service counts the streams down and exits as soon as none is left. Pingora's own
//! grace period stays as the backstop, just past the drain timeout.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::BackgroundService;
use prometheus_client::metrics::gauge::Gauge;

/// How often a drain looks at what is left.
const POLL: Duration = Duration::from_millis(20);

/// How long the connections get to write out what their last streams queued (HTTP/2 frames go
/// out from the connection's own task, after the stream is counted out).
const LINGER: Duration = Duration::from_millis(200);

/// HTTP streams and TCP connections being served, process-wide.
#[derive(Clone, Default, Debug)]
pub(crate) struct InFlight(Gauge);

impl InFlight {
    /// Counts one stream or connection until the returned guard drops.
    pub(crate) fn enter(&self) -> InFlightGuard {
        self.0.inc();
        InFlightGuard(self.0.clone())
    }

    /// How many are in flight now.
    pub(crate) fn count(&self) -> i64 {
        self.0.get()
    }

    /// The gauge, for `/stats/prometheus`.
    pub(crate) fn gauge(&self) -> Gauge {
        self.0.clone()
    }
}

/// One stream or connection in flight, counted while it lives.
#[derive(Debug)]
pub(crate) struct InFlightGuard(Gauge);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// SIGTERM and SIGINT both ask Pingora for a graceful terminate (it stops accepting).
pub(crate) struct Signals;

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut terminate), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = terminate.recv() => tracing::info!("SIGTERM: draining"),
                    _ = interrupt.recv() => tracing::info!("SIGINT: draining"),
                }
            }
            (Err(error), _) | (_, Err(error)) => {
                // Without signals only a kill stops the process: say so, and never return.
                tracing::error!("cannot watch for SIGTERM and SIGINT: {error}");
                std::future::pending::<()>().await;
            }
        }
        ShutdownSignal::GracefulTerminate
    }
}

/// Waits for the shutdown, then for the streams in flight, then exits.
pub(crate) struct Drain {
    pub(crate) in_flight: InFlight,
    pub(crate) timeout: Duration,
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.changed().await.is_err() {
            return;
        }
        let deadline = Instant::now() + self.timeout;
        let again = again();
        tokio::pin!(again);
        loop {
            let left = self.in_flight.count();
            if left <= 0 {
                tokio::time::sleep(LINGER).await;
                if self.in_flight.count() <= 0 {
                    tracing::info!("drained: exiting");
                    std::process::exit(0);
                }
                continue;
            }
            if Instant::now() >= deadline {
                tracing::warn!(left, timeout = ?self.timeout, "drain timeout: exiting with streams in flight");
                std::process::exit(0);
            }
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = &mut again => {
                    tracing::warn!(left, "second signal while draining: exiting now");
                    std::process::exit(1);
                }
            }
        }
    }
}

/// Resolves on the next SIGTERM or SIGINT (never, if they cannot be watched).
async fn again() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut terminate), Ok(mut interrupt)) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// Pingora's grace period for a drain timeout: just past it, so the drain ends first.
pub(crate) fn grace_period(timeout: Duration) -> u64 {
    timeout.as_secs() + 2
}
