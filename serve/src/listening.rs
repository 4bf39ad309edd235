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
use std::sync::{Arc, Mutex};

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
/// restarted proxy can listen again at once).
pub(crate) fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    // Pingora's accept loop is asynchronous.
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

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
    /// The socket. The running service has a copy of its descriptor; both must close for the
    /// socket to close.
    listener: TcpListener,
    state: Serving,
}

enum Serving {
    /// Waiting for the workers to run.
    Waiting(App),
    /// Started: stopped by sending `true`, which also tells its open connections to close once
    /// their current request ends.
    Started(watch::Sender<bool>),
    /// Not served (the service could not be started; logged).
    Failed,
}

impl Listening {
    /// Serves `listener` (bound to `address`) with `app` from now on (or once the workers run).
    /// Once the server shuts down, the socket closes instead.
    pub(crate) fn serve(&self, name: &str, address: SocketAddr, listener: TcpListener, app: App) {
        let mut inner = self.lock();
        if inner.shut_down {
            return;
        }
        let state = match &inner.runtime {
            Some(runtime) => start(runtime, name, address, &listener, app),
            None => Serving::Waiting(app),
        };
        let socket = Socket {
            name: name.to_string(),
            listener,
            state,
        };
        if let Some(previous) = inner.listeners.insert(address, socket) {
            stop(previous.state);
        }
    }

    /// Whether a socket listens on `address`.
    pub(crate) fn listens_on(&self, address: SocketAddr) -> bool {
        self.lock().listeners.contains_key(&address)
    }

    /// Serves the socket on `address` with `app` (a new application for the same socket, e.g.
    /// another listener's): the previous one stops accepting, and new connections, including
    /// those queued meanwhile, go to `app`. Returns `app` back if nothing listens there.
    pub(crate) fn replace(&self, name: &str, address: SocketAddr, app: App) -> Result<(), App> {
        let mut inner = self.lock();
        let runtime = inner.runtime.clone();
        let Some(socket) = inner.listeners.get_mut(&address) else {
            // None, or the server shut down (which closed every socket).
            return Err(app);
        };
        let state = match &runtime {
            Some(runtime) => start(runtime, name, address, &socket.listener, app),
            None => Serving::Waiting(app),
        };
        socket.name = name.to_string();
        stop(std::mem::replace(&mut socket.state, state));
        Ok(())
    }

    /// Stops the listener on `address` and closes its socket; its open connections close once
    /// their current request ends.
    pub(crate) fn close(&self, address: SocketAddr) {
        let removed = self.lock().listeners.remove(&address);
        if let Some(socket) = removed {
            tracing::info!(listener = %socket.name, %address, "listener closed");
            stop(socket.state);
        }
    }

    /// The workers run: every listener starts, on `runtime`.
    fn start_all(&self, runtime: Handle) {
        let mut inner = self.lock();
        if inner.shut_down {
            return;
        }
        for (address, socket) in &mut inner.listeners {
            if let Serving::Waiting(_) = socket.state {
                let Serving::Waiting(app) = std::mem::replace(&mut socket.state, Serving::Failed)
                else {
                    continue;
                };
                socket.state = start(&runtime, &socket.name, *address, &socket.listener, app);
            }
        }
        inner.runtime = Some(runtime);
    }

    /// The server shuts down: every listener stops accepting and its socket closes, so that
    /// new clients are refused at once while streams in flight finish.
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

/// Starts Pingora's listening service for `app` on a copy of `listener`'s descriptor.
fn start(
    runtime: &Handle,
    name: &str,
    address: SocketAddr,
    listener: &TcpListener,
    app: App,
) -> Serving {
    // Pingora takes the descriptor it is handed for its own (and closes it when it stops).
    let descriptor = match listener.try_clone() {
        Ok(copy) => copy.into_raw_fd(),
        Err(error) => {
            tracing::error!(listener = name, %address, "cannot serve the listener: {error}");
            return Serving::Failed;
        }
    };
    let bind = address.to_string();
    let mut fds = Fds::new();
    fds.add(bind.clone(), descriptor);
    let fds: ListenFds = Arc::new(parking_lot::Mutex::new(fds));
    let (stop, stopped) = watch::channel(false);
    match app {
        App::Http(app) => spawn(
            runtime,
            Service::new(name.to_string(), app),
            bind,
            fds,
            stopped,
        ),
        App::Tcp(app) => spawn(
            runtime,
            Service::new(name.to_string(), app),
            bind,
            fds,
            stopped,
        ),
    }
    Serving::Started(stop)
}

fn spawn<A: ServerApp + Send + Sync + 'static>(
    runtime: &Handle,
    mut service: Service<A>,
    bind: String,
    fds: ListenFds,
    stopped: ShutdownWatch,
) {
    service.add_tcp(&bind);
    // The service's accept loop and its connections run on the workers' threads (Pingora
    // spreads them over the runtime it finds itself on).
    runtime.spawn(async move {
        service.start_service(Some(fds), stopped, 1).await;
    });
}

fn stop(state: Serving) {
    if let Serving::Started(stop) = state {
        stop.send_replace(true);
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
