//! The HTTP and TCP listeners: sockets pwhost binds itself, served on one set of worker
//! threads, and changed by reloads.
//!
//! Pingora fixes its listening services when the server starts, each with worker threads of
//! its own. pwhost runs all its listeners in one Pingora service instead, [`Workers`], whose
//! `workers` threads serve every listener (Envoy's model: `workers` threads for the whole
//! proxy, each with its VM copies). Each listener is still one of Pingora's own listening
//! services (the same accept loop, connection set-up and keep-alive handling), started on those
//! threads with its socket handed over as an inherited descriptor, as Pingora's graceful
//! upgrade does. So a reload can start a listener, stop one, or give one a new application in
//! place, on the same socket, losing no connection waiting in its backlog.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::IntoRawFd;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::proxy::HttpProxy;
use pingora::server::{Fds, ListenFds, ShutdownWatch};
use pingora::services::listening::Service;
use pingora::services::Service as PingoraService;
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::header_timeout::WithHeaderTimeout;
use crate::proxy::ListenerProxy;
use crate::tcp::TcpProxy;

/// How many connections a listening socket queues for accepting (Pingora's own backlog).
const BACKLOG: i32 = 65_535;

/// What serves a listener's connections.
pub(crate) enum App {
    /// An HTTP listener: Pingora's HTTP proxy running the plugin chain, with a deadline for
    /// request headers.
    Http(WithHeaderTimeout<HttpProxy<ListenerProxy>>),
    /// A TCP listener with its network filters.
    Tcp(TcpProxy),
}

/// Binds a listening socket on `address` (address reuse on, as Pingora's own, so that a
/// restarted proxy can listen again at once). Returns the socket and a copy of it to hand over
/// to its listening service, which takes the copy for its own and closes it when it stops
/// (both made before anything is put in force, so that nothing can fail then).
pub(crate) fn bind(address: SocketAddr) -> std::io::Result<(TcpListener, TcpListener)> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    // Pingora's accept loop is asynchronous.
    socket.set_nonblocking(true)?;
    let socket = TcpListener::from(socket);
    let handed = socket.try_clone()?;
    Ok((socket, handed))
}

/// Why listener `index` (`listener`) of the configuration cannot listen.
pub(crate) fn cannot_listen(
    index: usize,
    listener: &crate::config::Listener,
    error: &std::io::Error,
) -> String {
    format!(
        "listeners[{index}] ({}): cannot listen on {}: {error}",
        listener.name, listener.address
    )
}

/// How long stopping a listener waits for its accept loop to end (it ends at once unless its
/// thread is busy).
const STOP_WAIT: Duration = Duration::from_secs(5);

/// The listeners being served, by address.
#[derive(Default)]
pub(crate) struct Listening {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// A worker thread's runtime, once the workers run; the listeners start on it.
    runtime: Option<Handle>,
    /// The server is shutting down: nothing starts any more.
    shut_down: bool,
    listeners: HashMap<SocketAddr, Socket>,
}

/// One listening socket and what serves it.
struct Socket {
    name: String,
    /// pwhost's copy of the socket, kept to hand it over again. The service has a copy of its
    /// own; both must close for the socket to close.
    listener: TcpListener,
    state: Serving,
}

enum Serving {
    /// Waiting for the workers to run, with the copy of the socket to hand over.
    Waiting(App, TcpListener),
    /// Started.
    Started(Started),
    /// Stopped.
    Stopped,
}

/// A running listening service.
struct Started {
    /// Stops it by turning `true`, which also tells its open connections to end: an HTTP one
    /// after its current request, a TCP one within the drain timeout.
    stop: watch::Sender<bool>,
    /// Disconnected once its accept loop ended (it then accepts no more).
    ended: mpsc::Receiver<()>,
}

impl Listening {
    /// Serves `listener` (bound to `address`; `handed` is the copy for the service, see
    /// [`bind`]) with `app` from now on, or once the workers run. Once the server shuts
    /// down, the socket closes instead.
    pub(crate) fn serve(
        &self,
        name: &str,
        address: SocketAddr,
        listener: TcpListener,
        handed: TcpListener,
        app: App,
    ) {
        let mut inner = self.lock();
        if inner.shut_down {
            return;
        }
        let state = match &inner.runtime {
            Some(runtime) => Serving::Started(start(runtime, name, address, handed, app)),
            None => Serving::Waiting(app, handed),
        };
        let socket = Socket {
            name: name.to_string(),
            listener,
            state,
        };
        let previous = inner.listeners.insert(address, socket);
        drop(inner);
        if let Some(previous) = previous {
            wait(address, stop(previous.state));
        }
    }

    /// A copy of the socket listening on `address` to hand over (see [`bind`]), if one
    /// listens there.
    pub(crate) fn hand_over(&self, address: SocketAddr) -> Option<std::io::Result<TcpListener>> {
        self.lock()
            .listeners
            .get(&address)
            .map(|socket| socket.listener.try_clone())
    }

    /// Serves the socket on `address` with `app` (a new application for the same socket, e.g.
    /// another listener's), `handed` being a copy of it (see [`Listening::hand_over`]): the
    /// previous service stops accepting (this returns once it did), and new connections,
    /// including those queued meanwhile, go to `app`. Returns `false` if nothing listens
    /// there (the server shut down).
    pub(crate) fn replace(
        &self,
        name: &str,
        address: SocketAddr,
        handed: TcpListener,
        app: App,
    ) -> bool {
        let mut inner = self.lock();
        let runtime = inner.runtime.clone();
        let Some(socket) = inner.listeners.get_mut(&address) else {
            return false;
        };
        let state = match &runtime {
            Some(runtime) => Serving::Started(start(runtime, name, address, handed, app)),
            None => Serving::Waiting(app, handed),
        };
        socket.name = name.to_string();
        let previous = std::mem::replace(&mut socket.state, state);
        drop(inner);
        wait(address, stop(previous));
        true
    }

    /// Stops the listener on `address` and closes its socket (this returns once its accept
    /// loop ended); its open connections end as [`Started::stop`] says.
    pub(crate) fn close(&self, address: SocketAddr) {
        let removed = self.lock().listeners.remove(&address);
        if let Some(socket) = removed {
            tracing::info!(listener = %socket.name, %address, "listener closed");
            wait(address, stop(socket.state));
        }
    }

    /// The workers run: every listener starts, on `runtime`.
    fn start_all(&self, runtime: Handle) {
        let mut inner = self.lock();
        if inner.shut_down {
            return;
        }
        for (address, socket) in &mut inner.listeners {
            if let Serving::Waiting(app, handed) =
                std::mem::replace(&mut socket.state, Serving::Stopped)
            {
                let started = start(&runtime, &socket.name, *address, handed, app);
                socket.state = Serving::Started(started);
            }
        }
        inner.runtime = Some(runtime);
    }

    /// The server shuts down: every listener stops accepting and its socket closes, so that
    /// new clients are refused at once while streams in flight finish. (This runs on a worker
    /// thread, where the accept loops run too: it does not wait for them.)
    fn shut_down(&self) {
        let mut inner = self.lock();
        inner.shut_down = true;
        for (_, socket) in inner.listeners.drain() {
            stop(socket.state);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts Pingora's listening service for `app` on `handed`, a copy of the listener's socket.
fn start(
    runtime: &Handle,
    name: &str,
    address: SocketAddr,
    handed: TcpListener,
    app: App,
) -> Started {
    // Pingora takes the descriptor for its own, and closes it when the service stops.
    let bind = address.to_string();
    let mut fds = Fds::new();
    fds.add(bind.clone(), handed.into_raw_fd());
    let (stop, stopped) = watch::channel(false);
    let (ended_tx, ended) = mpsc::channel();
    let launch = Launch {
        bind,
        fds: Arc::new(parking_lot::Mutex::new(fds)),
        stopped,
        ended: ended_tx,
    };
    let name = name.to_string();
    match app {
        App::Http(app) => launch.spawn(runtime, Service::new(name, app)),
        App::Tcp(app) => launch.spawn(runtime, Service::new(name, app)),
    }
    Started { stop, ended }
}

/// What a listening service starts with.
struct Launch {
    /// Its address, as Pingora writes it.
    bind: String,
    /// The socket's descriptor under that address.
    fds: ListenFds,
    /// Turns `true` to stop it.
    stopped: ShutdownWatch,
    /// Dropped once its accept loop ended.
    ended: mpsc::Sender<()>,
}

impl Launch {
    fn spawn<A: ServerApp + Send + Sync + 'static>(
        self,
        runtime: &Handle,
        mut service: Service<A>,
    ) {
        service.add_tcp(&self.bind);
        // The service's accept loop and its connections run on the workers' threads (Pingora
        // spreads them over the runtime it finds itself on).
        runtime.spawn(async move {
            service.start_service(Some(self.fds), self.stopped, 1).await;
            drop(self.ended);
        });
    }
}

/// One of Pingora's listening services on threads of its own, serving a socket bound beforehand
/// (see [`bind`]): the admin listener, so that an address it cannot have stops the proxy at
/// start, as a listener's does (bound by Pingora, it panicked in the service's task a while
/// after the start, and the proxy went on without it).
pub(crate) struct BoundService<A> {
    service: Service<A>,
    fds: ListenFds,
}

impl<A: ServerApp + Send + Sync + 'static> BoundService<A> {
    /// Serves `socket`, bound to `address`, with `app`.
    pub(crate) fn new(name: &str, address: SocketAddr, socket: TcpListener, app: A) -> Self {
        let bind = address.to_string();
        let mut service = Service::new(name.to_string(), app);
        service.add_tcp(&bind);
        let mut fds = Fds::new();
        // Pingora takes the descriptor for its own, and closes it when the service stops.
        fds.add(bind, socket.into_raw_fd());
        BoundService {
            service,
            fds: Arc::new(parking_lot::Mutex::new(fds)),
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> PingoraService for BoundService<A> {
    async fn start_service(
        &mut self,
        _fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let fds = Some(Arc::clone(&self.fds));
        self.service
            .start_service(fds, shutdown, listeners_per_fd)
            .await;
    }

    fn name(&self) -> &str {
        self.service.name()
    }

    fn threads(&self) -> Option<usize> {
        self.service.threads()
    }
}

/// Stops a service; what to wait on for its accept loop to end.
fn stop(state: Serving) -> Option<mpsc::Receiver<()>> {
    match state {
        Serving::Started(started) => {
            started.stop.send_replace(true);
            Some(started.ended)
        }
        Serving::Waiting(..) | Serving::Stopped => None,
    }
}

/// Waits (at most [`STOP_WAIT`]) for a stopped service's accept loop to end. Never called on
/// a worker thread, where the loop may run.
fn wait(address: SocketAddr, ended: Option<mpsc::Receiver<()>>) {
    if let Some(ended) = ended {
        if let Err(mpsc::RecvTimeoutError::Timeout) = ended.recv_timeout(STOP_WAIT) {
            tracing::warn!(%address, "a stopped listener still accepts after {STOP_WAIT:?}");
        }
    }
}

/// The Pingora service whose threads are the proxy's workers: every listener of
/// [`Listening`] runs on them, from the server's start until it shuts down.
pub(crate) struct Workers {
    pub(crate) listening: Arc<Listening>,
    pub(crate) threads: usize,
}

#[async_trait]
impl PingoraService for Workers {
    async fn start_service(
        &mut self,
        _fds: Option<ListenFds>,
        mut shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        self.listening.start_all(Handle::current());
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        self.listening.shut_down();
    }

    fn name(&self) -> &str {
        "workers"
    }

    fn threads(&self) -> Option<usize> {
        Some(self.threads)
    }
}
