//! TCP (L4) listeners: Envoy's Wasm network filters on connections Traffic Server accepts on a
//! port of the plugin's own (a file's `tcp:` block), each proxied to the listener's upstream,
//! as Envoy runs network filters in front of its `tcp_proxy` (and as `pwhost serve`'s TCP
//! listeners do).
//!
//! The port is opened with `TSPortDescriptorAccept` once Traffic Server's ports are ready. A
//! connection runs on the net thread that accepted it, through that thread's VM copies, its
//! bytes moved with Traffic Server's VIOs (`TSVConnRead`/`TSVConnWrite` on both sides):
//! - `proxy_on_new_connection` in chain order; a plugin that pauses holds the connection (the
//!   upstream is not dialled, the client's bytes wait) until it continues it.
//! - Data from the client: `proxy_on_downstream_data` in chain order, then to the upstream;
//!   from the upstream: `proxy_on_upstream_data` in reverse order, then to the client. Each
//!   plugin may change the chunk or pause, keeping it (and what follows) until its next
//!   callback or until it continues that direction (`proxy_continue_stream` with `Downstream`
//!   or `Upstream`); what it held then goes on from the next plugin.
//! - A side is read only while less than the buffer limit of its data waits, in the plugins
//!   or to be written (Envoy's watermarks); a connection without traffic for the idle timeout
//!   is closed.
//! - Each side's end (a FIN) goes through the chain as `end_of_stream` and is passed on as a
//!   half-close, once everything before it is written.
//! - At the end: `proxy_on_downstream_connection_close` and `proxy_on_upstream_connection_close`
//!   (`Remote` for a side that closed first, `Local` for one the proxy closed, `Unknown` for an
//!   upstream never reached), then `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`, in
//!   Envoy's order.
//! - `proxy_close_stream`, an upstream that cannot be reached, an idle connection, a plugin
//!   failing closed or a client resetting a connection its plugins hold close both sides.
//!
//! Traffic Server may call a continuation back from inside an API call (`TSNetConnect` reports
//! the new connection before it returns), so a connection's state is reached through its raw
//! pointer and is freed only when the outermost of its handlers returns ([`Connection::depth`]).

use std::ffi::{c_int, c_void};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use abi::{ContextId, DataAction, PeerType, Vm, VmError};
use lifecycle::{Admission, Generation, OnFailure, PluginId, Plugins, StreamVm, Worker};

use crate::config::TcpListener;
use crate::host::{AtsHost, Holder, StreamSlot};
use crate::socket::HELD_CLIENT_CHECK;
use crate::{diag, in_worker, sys, with_thread, with_workers};

/// The TCP listeners of each deployment still in use, newest last: a connection takes the
/// listener settings of the deployment its thread's worker runs (a reload may be under way).
struct Deployments {
    entries: Vec<(Weak<Plugins>, Arc<[TcpListener]>)>,
}

static DEPLOYMENTS: Mutex<Deployments> = Mutex::new(Deployments {
    entries: Vec::new(),
});

/// The listeners as first configured: their ports, opened once.
static OPENED: OnceLock<Vec<SocketAddr>> = OnceLock::new();

/// Records the TCP listeners of `plugins`' deployment (before it is put in force).
pub(crate) fn note_deployment(plugins: &Arc<Plugins>, listeners: Vec<TcpListener>) {
    let mut deployments = DEPLOYMENTS.lock().unwrap_or_else(|e| e.into_inner());
    // Deployments no longer alive anywhere need no settings.
    deployments
        .entries
        .retain(|(plugins, _)| plugins.strong_count() > 0);
    deployments
        .entries
        .push((Arc::downgrade(plugins), listeners.into()));
}

/// The listeners of the deployment `plugins`, if recorded.
fn listeners_of(plugins: &Arc<Plugins>) -> Option<Arc<[TcpListener]>> {
    let deployments = DEPLOYMENTS.lock().unwrap_or_else(|e| e.into_inner());
    deployments
        .entries
        .iter()
        .rev()
        .find(|(weak, _)| std::ptr::eq(weak.as_ptr(), Arc::as_ptr(plugins)))
        .map(|(_, listeners)| Arc::clone(listeners))
}

/// Checks that a reload keeps the listening addresses: Traffic Server cannot close a port a
/// plugin opened, nor open one after its start with the same guarantees.
pub(crate) fn check_reload(listeners: &[TcpListener]) -> Result<(), String> {
    let Some(opened) = OPENED.get() else {
        return Ok(());
    };
    let wanted: Vec<SocketAddr> = listeners.iter().map(|l| l.listen).collect();
    if &wanted != opened {
        return Err(format!(
            "the TCP listeners changed ({} instead of {}): that needs a restart of Traffic Server",
            shown(&wanted),
            shown(opened)
        ));
    }
    Ok(())
}

/// `addresses` for a message.
fn shown(addresses: &[SocketAddr]) -> String {
    if addresses.is_empty() {
        return "none".into();
    }
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Opens the port of every listener of the deployment in force. Called once Traffic Server's
/// ports are ready.
pub(crate) fn open_listeners() -> Result<(), String> {
    let newest = DEPLOYMENTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entries
        .last()
        .map(|(_, listeners)| Arc::clone(listeners));
    let Some(listeners) = newest else {
        return Ok(());
    };
    let addresses: Vec<SocketAddr> = listeners.iter().map(|l| l.listen).collect();
    if OPENED.set(addresses).is_err() {
        return Ok(());
    }
    if listeners.is_empty() {
        return Ok(());
    }
    for (index, listener) in listeners.iter().enumerate() {
        // A port Traffic Server cannot bind is, depending on its accept threads, its own fatal
        // error naming the port only, or a warning and a listener that silently never exists:
        // a bind tried here first names the file and the reason.
        if let Err(error) = probe_bind(listener.listen) {
            return Err(format!(
                "{}: tcp.listen: cannot listen on {}: {error}",
                listener.file.display(),
                listener.listen
            ));
        }
        // Traffic Server's port syntax (`proxy.config.http.server_ports`), bound to the
        // listener's address only.
        let descriptor = match listener.listen {
            SocketAddr::V4(v4) => format!("{}:ipv4:ip-in={}", v4.port(), v4.ip()),
            SocketAddr::V6(v6) => format!("{}:ipv6:ip-in=[{}]", v6.port(), v6.ip()),
        };
        let descriptor = std::ffi::CString::new(descriptor).map_err(|e| e.to_string())?;
        // SAFETY: the descriptor is a C string Traffic Server parses and copies; the accept
        // continuation lives for the process, its data is the listener's index (no pointer).
        // It has no mutex: every net thread accepts at once, and Traffic Server aborts if an
        // accept finds the continuation's mutex taken by another thread; `on_accept` keeps
        // no state of its own.
        let accepted = unsafe {
            let port = sys::TSPortDescriptorParse(descriptor.as_ptr());
            if port.is_null() {
                return Err(format!(
                    "{}: tcp.listen: Traffic Server cannot listen on {}",
                    listener.file.display(),
                    listener.listen
                ));
            }
            let cont = sys::TSContCreate(Some(on_accept), std::ptr::null_mut());
            sys::TSContDataSet(cont, index as *mut c_void);
            sys::TSPortDescriptorAccept(port, cont)
        };
        if accepted != sys::TS_SUCCESS {
            return Err(format!(
                "{}: tcp.listen: cannot listen on {} (in use?)",
                listener.file.display(),
                listener.listen
            ));
        }
        diag::note(&format!(
            "TCP listener {} with {} network filter(s), to {}",
            listener.listen,
            listener.filters.len(),
            listener.upstream
        ));
    }
    Ok(())
}

/// Binds and listens on `address` as Traffic Server's listening sockets do (`SO_REUSEADDR`; an
/// IPv6 address for IPv6 only, so that `[::]:P` does not collide with an IPv4 listener on P),
/// then closes the socket at once: a listener that never accepted leaves nothing behind.
fn probe_bind(address: SocketAddr) -> std::io::Result<()> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&address.into())?;
    socket.listen(1)
}

/// A new connection on a listener (the continuation's data is the listener's index).
unsafe extern "C" fn on_accept(cont: sys::TSCont, event: sys::TSEvent, data: *mut c_void) -> c_int {
    if event != sys::TS_EVENT_NET_ACCEPT || data.is_null() {
        if event == sys::TS_EVENT_NET_ACCEPT_FAILED {
            diag::error("a TCP listener failed to accept a connection");
        }
        return 0;
    }
    let vc: sys::TSVConn = data.cast();
    // SAFETY: the data set in `open_listeners`.
    let index = unsafe { sys::TSContDataGet(cont) } as usize;
    let outcome = std::panic::catch_unwind(|| {
        // SAFETY: `vc` is the connection Traffic Server just handed over.
        unsafe { accept(vc, index) }
    });
    if outcome.is_err() {
        diag::error("accepting a TCP connection panicked; it is closed");
        // SAFETY: the connection was handed to this plugin, and the panic came before its
        // state took it over (`handle` catches its own panics).
        unsafe { sys::TSVConnAbort(vc, 1) };
    }
    0
}

/// One plugin's part in a connection.
struct Filter {
    plugin: PluginId,
    name: Arc<str>,
    stream: Option<StreamVm>,
    context: ContextId,
    /// Failed open: skipped from then on.
    bypassed: bool,
    /// Data the plugin holds, by direction (`[downstream's, upstream's]`).
    held: [Vec<u8>; 2],
    /// The plugin holds the end of that direction's data too.
    held_end: [bool; 2],
    /// The plugin let that direction's held data go: it goes on from the next plugin.
    release: [bool; 2],
}

impl Filter {
    /// Whether the plugin holds data of side `side` (`0`: downstream's), or its end.
    fn holds(&self, side: usize) -> bool {
        !self.held[side].is_empty() || self.held_end[side]
    }

    /// Marks for release what the plugin holds of each direction it continued. A continue of a
    /// direction it holds nothing of is spent: it does not let a later pause pass.
    fn mark_release(&mut self, continued_sides: [bool; 2]) {
        for (side, continued) in continued_sides.into_iter().enumerate() {
            self.release[side] |= continued && self.holds(side);
        }
    }
}

/// Which way data goes: from the client (`Downstream`, to the upstream) or from the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Downstream,
    Upstream,
}

impl Direction {
    /// Its index in per-direction arrays (`[downstream's, upstream's]`).
    fn index(self) -> usize {
        match self {
            Direction::Downstream => 0,
            Direction::Upstream => 1,
        }
    }
}

/// One side's reading or writing: a buffer, its reader and the VIO.
struct Io {
    buffer: sys::TSIOBuffer,
    reader: sys::TSIOBufferReader,
    vio: sys::TSVIO,
}

/// One side of the connection: the client's (`0`) or the upstream's (`1`).
struct Side {
    vc: sys::TSVConn,
    read: Io,
    write: Io,
    /// The peer ended its data (or the read failed): nothing more comes.
    read_ended: bool,
    /// Its end went through the chain.
    end_delivered: bool,
    /// The chain passed the end of the data going to this side: half-close once written.
    write_end: bool,
    /// The write's length is set to end with what was sent (done once the side is reached).
    end_armed: bool,
    /// Half-closed (everything written).
    write_shut: bool,
    /// The connection is made: always for the client's; for the upstream's once its socket
    /// is connected (Traffic Server hands the connection over before the connect completes).
    reached: bool,
}

impl Side {
    /// Starts reading and writing `vc` for continuation `cont`, with `timeout` as its
    /// inactivity timeout; `reached` if the connection is known to be made.
    ///
    /// # Safety
    /// `vc` must be an open connection of this plugin's, `cont` a live continuation with a
    /// mutex.
    unsafe fn open(
        vc: sys::TSVConn,
        cont: sys::TSCont,
        timeout: Option<Duration>,
        reached: bool,
    ) -> Side {
        set_inactivity_timeout(vc, timeout);
        // SAFETY: the caller's promise; the buffers live until `Side::close`, after `vc`
        // closed.
        unsafe {
            let read_buffer = sys::TSIOBufferCreate();
            let read_reader = sys::TSIOBufferReaderAlloc(read_buffer);
            let write_buffer = sys::TSIOBufferCreate();
            let write_reader = sys::TSIOBufferReaderAlloc(write_buffer);
            let read_vio = sys::TSVConnRead(vc, cont, read_buffer, i64::MAX);
            let write_vio = sys::TSVConnWrite(vc, cont, write_reader, i64::MAX);
            Side {
                vc,
                read: Io {
                    buffer: read_buffer,
                    reader: read_reader,
                    vio: read_vio,
                },
                write: Io {
                    buffer: write_buffer,
                    reader: write_reader,
                    vio: write_vio,
                },
                read_ended: false,
                end_delivered: false,
                write_end: false,
                end_armed: false,
                write_shut: false,
                reached,
            }
        }
    }

    /// Bytes waiting to be written to this side.
    fn unwritten(&self) -> usize {
        // SAFETY: the reader lives as long as the side.
        let avail = unsafe { sys::TSIOBufferReaderAvail(self.write.reader) };
        usize::try_from(avail).unwrap_or(0)
    }

    /// Whether `vio` is one of this side's.
    fn owns(&self, vio: *mut c_void) -> bool {
        vio == self.read.vio.cast() || vio == self.write.vio.cast()
    }

    /// Appends `data` to what goes to this side and, with `end`, half-closes it once written.
    fn send(&mut self, data: &[u8], end: bool) {
        // SAFETY: the side's buffers and VIO live until it is closed, which ends its use.
        unsafe {
            if !data.is_empty() && !self.write_shut {
                sys::TSIOBufferWrite(
                    self.write.buffer,
                    data.as_ptr().cast(),
                    i64::try_from(data.len()).unwrap_or(i64::MAX),
                );
            }
            if !data.is_empty() {
                sys::TSVIOReenable(self.write.vio);
            }
        }
        self.write_end |= end;
        self.arm_end();
    }

    /// Once the end came and the side is reached: the write completes (and the side is
    /// half-closed) once everything before the end is written. Not before the upstream is
    /// reached: a half-close would abort a connect in progress, and an open-ended write is
    /// what tells that the connect completed (a write-ready event).
    fn arm_end(&mut self) {
        if self.write_end && self.reached && !self.end_armed {
            self.end_armed = true;
            // SAFETY: the side's VIO and reader live until it is closed.
            unsafe {
                let total = sys::TSVIONDoneGet(self.write.vio)
                    + sys::TSIOBufferReaderAvail(self.write.reader);
                sys::TSVIONBytesSet(self.write.vio, total);
            }
        }
    }

    /// Whether the side's end is due but no write will complete to say so: everything was
    /// written when the end was armed (Traffic Server signals a write's completion only
    /// after writing).
    fn end_unsignalled(&self) -> bool {
        self.end_armed && !self.write_shut && self.unwritten() == 0
    }

    /// Whether the socket is connected (a refused or reset connection is not).
    fn connected(&self) -> bool {
        // SAFETY: an open connection of this plugin's; `getpeername` writes at most `len`
        // bytes into the storage.
        unsafe {
            let fd = sys::TSVConnFdGet(self.vc);
            let mut peer: libc::sockaddr_storage = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            fd >= 0
                && libc::getpeername(
                    fd,
                    (&mut peer as *mut libc::sockaddr_storage).cast(),
                    &mut len,
                ) == 0
        }
    }

    /// Half-closes the side: everything was written.
    fn shut_write(&mut self) {
        if !self.write_shut {
            self.write_shut = true;
            // SAFETY: an open connection of this plugin's.
            unsafe { sys::TSVConnShutdown(self.vc, 0, 1) };
        }
    }

    /// Starts closing the side: its write ends with what waits to be written to it, then it
    /// is half-closed (see [`Connection::flushing`]; when everything is written already, by
    /// the connection's scheduled wake-up); meanwhile what it sends is read and dropped, so
    /// that its close does not reset what it has not read yet.
    fn flush(&mut self) {
        self.write_end = true;
        self.arm_end();
    }

    /// Drops what the side sent (it is closing: nothing more goes through).
    fn discard_read(&mut self) {
        // SAFETY: the side's reader and VIO live until it is closed.
        unsafe {
            let available = sys::TSIOBufferReaderAvail(self.read.reader);
            if available > 0 {
                sys::TSIOBufferReaderConsume(self.read.reader, available);
                sys::TSVIONDoneSet(self.read.vio, sys::TSVIONDoneGet(self.read.vio) + available);
            }
            sys::TSVIOReenable(self.read.vio);
        }
    }

    /// Closes the connection and frees the buffers (no event comes for them after the close).
    fn close(self) {
        // SAFETY: the connection is open; after the close Traffic Server no longer uses the
        // buffers given to its VIOs, which are freed exactly once here.
        unsafe {
            sys::TSVConnClose(self.vc);
            for io in [self.read, self.write] {
                sys::TSIOBufferReaderFree(io.reader);
                sys::TSIOBufferDestroy(io.buffer);
            }
        }
    }
}

/// Where the connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// A plugin paused `proxy_on_new_connection`: waiting for it, from this filter.
    Held(usize),
    /// The upstream is being dialled.
    Dialling,
    /// Both sides open.
    Open,
    /// Over for the plugins' data, a side still open: what was let through to it is written
    /// before it closes (see [`Connection::close_flushing`]); the plugins are told of the
    /// close when this ends.
    Flushing,
    /// Over: closed, the plugins told.
    Closed,
}

/// How long a closing side may take to take what was let through to it, and to close its own
/// end, with nothing moving: Envoy's `delayed_close_timeout` (1 s).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest a connection's sides are flushed, moving or not.
const FLUSH_DEADLINE: Duration = Duration::from_secs(10);

/// A TCP connection and its plugins, owned by its continuation.
struct Connection {
    cont: sys::TSCont,
    thread: sys::TSEventThread,
    generation: Generation,
    filters: Vec<Filter>,
    /// The deployment's listeners, and which one this connection came to.
    listeners: Arc<[TcpListener]>,
    listener: usize,
    phase: Phase,
    downstream: Option<Side>,
    upstream: Option<Side>,
    /// A connection attempt not reported yet, to cancel if the connection closes first.
    dialling: Option<sys::TSAction>,
    /// The upstream must be dialled once the current handler lets go of the state.
    dial_wanted: bool,
    /// A scheduled event (`wake`) that half-closes the sides whose end is due (see
    /// [`Side::end_unsignalled`]) and resumes the connection if `resume_wanted`.
    half_close: Option<sys::TSAction>,
    /// While flushing: the scheduled end of it, [`FLUSH_DEADLINE`] after it began, whatever
    /// still moves (a peer that keeps sending, or never ends, holds no connection longer).
    flush_deadline: Option<sys::TSAction>,
    /// The next look at the client's socket while a plugin holds the new connection (see
    /// [`Connection::look_at_held_client`]); one still pending once the connection goes on is
    /// spent without a look.
    held_check: Option<sys::TSAction>,
    /// A plugin asked for something outside the connection's callbacks (see [`resume`]).
    resume_wanted: bool,
    /// Who closed each side (`[downstream, upstream]`).
    closed_by: [PeerType; 2],
    /// Bytes received from the client and sent to it.
    transferred: [u64; 2],
    /// How many of its handlers are running (nested: Traffic Server may call back from inside
    /// an API call); it is freed when the last returns.
    depth: u32,
    /// The plugins' slots naming the continuation are gone: it may be destroyed (until then a
    /// tick or a callout's answer may still look it up).
    slots_removed: bool,
}

/// Makes the connection's state and continuation and admits it to the listener's plugins.
///
/// # Safety
/// `vc` must be a connection Traffic Server just accepted for this plugin.
unsafe fn accept(vc: sys::TSVConn, index: usize) {
    // SAFETY: a continuation with a mutex of its own, as Traffic Server's VIOs require.
    let cont = unsafe { sys::TSContCreate(Some(on_event), sys::TSMutexCreate()) };
    let Some(connection) = begin(vc, cont, index) else {
        // SAFETY: nothing of the connection is kept; the continuation was never used.
        unsafe {
            sys::TSVConnClose(vc);
            sys::TSContDestroy(cont);
        }
        return;
    };
    let pointer = Box::into_raw(Box::new(connection));
    // SAFETY: the state is freed in `finish`, after which no event comes (both connections
    // closed, the dial cancelled) and the continuation is destroyed.
    unsafe {
        sys::TSContDataSet(cont, pointer.cast());
        handle(pointer, Event::Start);
    }
}

/// The connection with a stream context in every plugin that admits it; `None` if it must be
/// closed now (a plugin failed closed, or the listener is gone).
fn begin(vc: sys::TSVConn, cont: sys::TSCont, index: usize) -> Option<Connection> {
    // SAFETY: called on the event thread running the accept; the addresses live as long as
    // the connection.
    let (thread, source, destination) = unsafe {
        (
            sys::TSEventThreadSelf(),
            crate::transaction::socket_address(sys::TSNetVConnRemoteAddrGet(vc)),
            crate::transaction::socket_address(sys::TSNetVConnLocalAddrGet(vc)),
        )
    };
    with_thread(|state| {
        let (generation, worker) = state.workers.for_new_stream();
        let plugins = Arc::clone(worker.plugins());
        let Some(listeners) = listeners_of(&plugins).filter(|all| index < all.len()) else {
            diag::error("a connection came to a TCP listener that is no longer configured");
            state.workers.stream_ended(generation);
            return None;
        };
        let listener = &listeners[index];
        let info = abi::StreamInfo {
            source_address: source,
            destination_address: destination,
            upstream_address: Some(listener.upstream),
            cluster_name: listener.upstream_name.clone(),
            connection_id: Some(next_connection_id()),
            start_time: Some(std::time::SystemTime::now()),
            ..Default::default()
        };
        let mut connection = Connection {
            cont,
            thread,
            generation,
            filters: Vec::new(),
            phase: Phase::Held(0),
            downstream: None,
            upstream: None,
            dialling: None,
            dial_wanted: false,
            half_close: None,
            flush_deadline: None,
            held_check: None,
            resume_wanted: false,
            closed_by: [PeerType::Local, PeerType::Unknown],
            transferred: [0; 2],
            depth: 0,
            slots_removed: false,
            listeners: Arc::clone(&listeners),
            listener: index,
        };
        let chain: Vec<PluginId> = plugins
            .network_filters()
            .skip(listener.filters.start)
            .take(listener.filters.len())
            .collect();
        let mut refused = false;
        for plugin in chain {
            let name: Arc<str> = plugins.config(plugin).display_name().into();
            match worker.admit(plugin) {
                Admission::Run(stream) => {
                    if let Some(vm) = worker.vm(&stream) {
                        let period = vm.tick_period_of(stream.root());
                        state
                            .ticker
                            .note(generation, stream.copy(), stream.root(), period);
                    }
                    match open(worker, &stream, &name, cont, &info) {
                        Ok(context) => connection.filters.push(Filter {
                            plugin,
                            name,
                            stream: Some(stream),
                            context,
                            bypassed: false,
                            held: [Vec::new(), Vec::new()],
                            held_end: [false; 2],
                            release: [false; 2],
                        }),
                        Err(error) => {
                            diag::error(&format!(
                                "[{name}] cannot create a connection context: {error}"
                            ));
                            worker.release(stream);
                            if crate::plugin_failed(worker, plugin, &error) == OnFailure::FailClosed
                            {
                                refused = true;
                                break;
                            }
                        }
                    }
                }
                Admission::FailClosed => {
                    refused = true;
                    break;
                }
                Admission::FailOpen => {}
            }
        }
        if refused {
            // The contexts made so far end as a connection closed by the proxy does.
            connection.end_contexts(worker);
            state.workers.stream_ended(generation);
            return None;
        }
        // SAFETY: the accepted connection, read and written for this continuation.
        connection.downstream = Some(unsafe { Side::open(vc, cont, listener.idle_timeout, true) });
        Some(connection)
    })
    .flatten()
}

/// A connection id for Envoy's `connection.id` attribute, unique in the process.
fn next_connection_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    LAST.fetch_add(1, Ordering::Relaxed) + 1
}

/// Creates the plugin's context for a new connection and gives it a slot in the copy's host.
fn open(
    worker: &mut Worker,
    stream: &StreamVm,
    name: &Arc<str>,
    cont: sys::TSCont,
    info: &abi::StreamInfo,
) -> Result<ContextId, VmError> {
    let vm = worker
        .vm(stream)
        .ok_or_else(|| VmError::Failed("the VM copy went away".into()))?;
    let context = vm.create_tcp_context_for(stream.root())?;
    if let Some(host) = vm.host_as::<AtsHost>() {
        host.roots
            .entry(stream.root().0)
            .or_insert_with(|| Arc::clone(name));
        let mut slot = StreamSlot::new(Arc::clone(name), Holder::Connection(cont));
        slot.info = info.clone();
        host.open_stream(context, slot);
    }
    Ok(context)
}

/// What a connection's handler was called for.
#[derive(Clone, Copy)]
enum Event {
    /// Accepted: the plugins' new-connection callbacks run.
    Start,
    /// Traffic Server's event, with its data.
    Traffic(sys::TSEvent, *mut c_void),
}

/// The connection continuation's events.
unsafe extern "C" fn on_event(cont: sys::TSCont, event: sys::TSEvent, data: *mut c_void) -> c_int {
    // SAFETY: the data is the state boxed in `accept`, until `finish` clears it.
    let pointer = unsafe { sys::TSContDataGet(cont) }.cast::<Connection>();
    if pointer.is_null() {
        return 0;
    }
    // SAFETY: the state is live (the data is cleared when it is freed).
    unsafe { handle(pointer, Event::Traffic(event, data)) };
    0
}

/// Picks up a connection whose plugin asked for something outside its callbacks (see
/// [`crate::transaction::act_on`]).
///
/// # Safety
/// `cont` must be a connection's continuation named by a plugin's stream slot, on its thread.
/// Such a continuation is live: it is destroyed only after every slot naming it is gone
/// (`finish`), and its data is null once its state is freed.
pub(crate) unsafe fn resume(cont: sys::TSCont) {
    // SAFETY: the caller's promise.
    let pointer = unsafe { sys::TSContDataGet(cont) }.cast::<Connection>();
    if !pointer.is_null() {
        // Not handled here: the connection's VConns may be used only under its continuation's
        // mutex, which this caller (a tick, a callout's answer) does not hold, and which cannot
        // be held across `finish` destroying it. A scheduled event runs under it.
        // SAFETY: the data is the live state (cleared when it is freed); no handler of it runs
        // now (the caller holds no thread state), so nothing else refers to it.
        unsafe { (*pointer).wake(true) };
    }
}

/// Runs one event of the connection, then dials the upstream if it is time, and frees the
/// connection if it is over and no other of its handlers is running.
///
/// # Safety
/// `pointer` must be a live connection state made by `accept`, reached from its own thread.
unsafe fn handle(pointer: *mut Connection, event: Event) {
    // SAFETY: the caller's promise; the reference ends before anything that may call back.
    unsafe {
        (*pointer).depth += 1;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let connection = &mut *pointer;
            connection.on(event);
        }));
        if outcome.is_err() {
            diag::error("a TCP connection's handler panicked; the connection is closed");
            let closed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                (*pointer).close_locally();
            }));
            if closed.is_err() {
                // Closed as far as it got; never unwound into Traffic Server.
                (*pointer).phase = Phase::Closed;
            }
        }
        if (*pointer).dial_wanted && (*pointer).phase == Phase::Dialling {
            (*pointer).dial_wanted = false;
            dial(pointer);
        }
        (*pointer).depth -= 1;
        if (*pointer).depth == 0 && (*pointer).phase == Phase::Closed {
            finish(pointer);
        }
    }
}

/// Dials the upstream. Traffic Server may report the new connection (or the failure) before
/// `TSNetConnect` returns, through `on_event`: no reference to the state is held across it.
///
/// # Safety
/// As [`handle`]'s.
unsafe fn dial(pointer: *mut Connection) {
    // SAFETY: the caller's promise.
    unsafe {
        let cont = (*pointer).cont;
        let address = socket_address((*pointer).listener().upstream);
        let action = sys::TSNetConnect(cont, (&address as *const libc::sockaddr_storage).cast());
        if (*pointer).phase == Phase::Dialling && sys::TSActionDone(action) == 0 {
            (*pointer).dialling = Some(action);
        }
    }
}

/// `address` as a `sockaddr` of its family.
fn socket_address(address: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: all-zero is a valid `sockaddr_storage`.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match address {
        SocketAddr::V4(v4) => {
            let inet = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a `sockaddr_in` fits in a `sockaddr_storage`, which is aligned for it.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), inet) };
        }
        SocketAddr::V6(v6) => {
            let inet6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above, for a `sockaddr_in6`.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), inet6) };
        }
    }
    storage
}

/// The longest inactivity timeout given to Traffic Server: it adds a timeout to its clock's
/// nanoseconds since 1970, and a sum past `i64::MAX` wraps into the past, where every check
/// finds it expired (a configured `idle_timeout` of centuries would close every connection
/// within a second). Ten years is as good as none.
const LONGEST_TIMEOUT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Sets (or, with `None`, cancels) `vc`'s inactivity timeout; setting it again restarts it.
fn set_inactivity_timeout(vc: sys::TSVConn, timeout: Option<Duration>) {
    // SAFETY: `vc` is an open connection of this plugin's (every caller holds one).
    unsafe {
        match timeout {
            Some(timeout) => {
                let nanos = sys::TSHRTime::try_from(timeout.min(LONGEST_TIMEOUT).as_nanos())
                    .unwrap_or(sys::TSHRTime::MAX);
                sys::TSVConnInactivityTimeoutSet(vc, nanos);
            }
            None => sys::TSVConnInactivityTimeoutCancel(vc),
        }
    }
}

/// Frees a closed connection's state and continuation.
///
/// # Safety
/// `pointer` must be a closed connection state made by `accept` with no handler running.
unsafe fn finish(pointer: *mut Connection) {
    // SAFETY: the caller's promise: freed exactly once; the continuation gets no more events
    // (both connections closed, the dial and the half-close cancelled), and a continuation may
    // be destroyed from inside its own handler.
    unsafe {
        let connection = Box::from_raw(pointer);
        if let Some(action) = connection.held_check {
            // Still pending only on a path that skipped `close` (a panic): it must not run
            // once the state is gone.
            sys::TSActionCancel(action);
        }
        sys::TSContDataSet(connection.cont, std::ptr::null_mut());
        if connection.slots_removed {
            sys::TSContDestroy(connection.cont);
        } else {
            // A plugin's slot may still name it (its VM copy could not be reached to end the
            // connection): kept, with no state, so that a late look finds nothing.
            diag::error(
                "a TCP connection's plugin contexts could not be ended; its continuation is kept",
            );
        }
    }
}

impl Connection {
    /// The listener the connection came to.
    fn listener(&self) -> &TcpListener {
        &self.listeners[self.listener]
    }

    /// Handles one event (with the state borrowed: nothing here calls back into it).
    fn on(&mut self, event: Event) {
        if let Event::Traffic(sys::TS_EVENT_TIMEOUT, data) = event {
            // Traffic Server marks the actions it returns for events with their lowest bit. (Were
            // they ever not to match, the event would go on as a harmless wake-up, but the
            // pending action kept here would be cancelled after it ran.)
            let event_of = |action: sys::TSAction| (action as usize & !1) as *mut c_void;
            if self.held_check.is_some_and(|check| event_of(check) == data) {
                self.held_check = None;
                self.look_at_held_client();
                return;
            }
        }
        if let Event::Traffic(sys::TS_EVENT_IMMEDIATE, _) = event {
            // The wake-up (`wake`) runs now: it is no longer pending, so nothing cancels it,
            // and one scheduled from here on (say by a close in `resume` below) is kept.
            self.half_close = None;
        }
        // A continue asked outside the connection's events (a callout's answer, a tick) is
        // acted on before what came meanwhile: data read now would otherwise reach the plugin
        // first, which forgets a continue it did not ask in that callback.
        if self.resume_wanted && !matches!(self.phase, Phase::Closed | Phase::Flushing) {
            self.resume_wanted = false;
            self.resume();
        }
        if matches!(self.phase, Phase::Closed | Phase::Flushing) {
            if let Event::Traffic(sys::TS_EVENT_NET_CONNECT, vc) = event {
                // Reported after the connection closed: not kept.
                // SAFETY: the new connection Traffic Server hands to this continuation.
                unsafe { sys::TSVConnClose(vc.cast()) };
            } else if let Event::Traffic(event, data) = event {
                if self.phase == Phase::Flushing {
                    self.flushing(event, data);
                }
            }
            return;
        }
        match event {
            Event::Start => self.new_connection(0),
            Event::Traffic(event, data) => self.traffic(event, data),
        }
        if self.phase == Phase::Open {
            self.pump();
        }
        if self.phase != Phase::Closed && self.is_over() {
            self.close();
        }
    }

    /// Traffic Server's events: the upstream connection, data, ends, errors and timeouts.
    fn traffic(&mut self, event: sys::TSEvent, data: *mut c_void) {
        let side = if self.downstream.as_ref().is_some_and(|s| s.owns(data)) {
            Some(0)
        } else if self.upstream.as_ref().is_some_and(|s| s.owns(data)) {
            Some(1)
        } else {
            None
        };
        match event {
            sys::TS_EVENT_NET_CONNECT => {
                self.dialling = None;
                self.closed_by[1] = PeerType::Local;
                let connect_timeout = Some(self.listener().connect_timeout);
                // SAFETY: the new connection Traffic Server reports for this continuation;
                // until it is made, its inactivity timeout is the connect timeout.
                let upstream =
                    unsafe { Side::open(data.cast(), self.cont, connect_timeout, false) };
                self.upstream = Some(upstream);
                self.phase = Phase::Open;
            }
            sys::TS_EVENT_NET_CONNECT_FAILED => {
                self.dialling = None;
                self.upstream_unreachable();
            }
            sys::TS_EVENT_VCONN_WRITE_READY | sys::TS_EVENT_VCONN_WRITE_COMPLETE
                if side == Some(1) && !self.upstream_reached() =>
            {
                // Writable: the connect completed (or failed: the socket tells).
                if self.upstream.as_ref().is_some_and(Side::connected) {
                    self.upstream_made();
                }
                if event == sys::TS_EVENT_VCONN_WRITE_COMPLETE {
                    if let Some(upstream) = self.upstream.as_mut() {
                        upstream.shut_write();
                    }
                }
            }
            sys::TS_EVENT_VCONN_WRITE_READY => {
                // Bytes went to this side: the other side, which may have sent them long
                // before, is not idle either (Traffic Server times each side on its own).
                self.refresh_idle();
            }
            sys::TS_EVENT_VCONN_WRITE_COMPLETE => {
                // Everything up to the end is written: half-closed (safe here: Traffic
                // Server is done with the write once it signals its completion).
                if let Some(side) = side.and_then(|s| self.side_mut(s)) {
                    side.shut_write();
                }
            }
            sys::TS_EVENT_VCONN_EOS | sys::TS_EVENT_VCONN_READ_COMPLETE
                if side.is_some_and(|s| self.is_write_of(s, data)) =>
            {
                // A write found the peer gone: nothing more can be sent to it. The other side
                // still gets what was let through to it.
                if let Some(index) = side {
                    self.closed_by[index] = PeerType::Remote;
                    self.close_flushing([index != 0, index != 1]);
                } else {
                    self.close();
                }
            }
            sys::TS_EVENT_VCONN_EOS | sys::TS_EVENT_VCONN_READ_COMPLETE
                if side == Some(1) && !self.upstream_reached() =>
            {
                // Traffic Server reports the connection before it is made: a refused one
                // ends before it ever became writable; one made and closed at once is still
                // connected (its peer's end is waiting to be read).
                if self.upstream.as_ref().is_some_and(Side::connected) {
                    self.upstream_made();
                    self.peer_ended(1);
                } else {
                    self.upstream_unreachable();
                }
            }
            sys::TS_EVENT_VCONN_EOS if side == Some(0) && matches!(self.phase, Phase::Held(_)) => {
                // A reset, or a FIN (see `look_at_held_client`).
                self.look_at_held_client();
                if matches!(self.phase, Phase::Held(_)) {
                    self.peer_ended(0);
                }
            }
            sys::TS_EVENT_VCONN_EOS | sys::TS_EVENT_VCONN_READ_COMPLETE => {
                if let Some(index) = side {
                    self.peer_ended(index);
                }
            }
            sys::TS_EVENT_IMMEDIATE | sys::TS_EVENT_TIMEOUT => {
                self.shut_due_ends();
                if std::mem::take(&mut self.resume_wanted) {
                    self.resume();
                }
            }
            sys::TS_EVENT_VCONN_INACTIVITY_TIMEOUT | sys::TS_EVENT_VCONN_ACTIVE_TIMEOUT
                if side == Some(1) && !self.upstream_reached() =>
            {
                diag::debug("the upstream did not connect within the connect timeout");
                self.upstream_unreachable();
            }
            sys::TS_EVENT_VCONN_INACTIVITY_TIMEOUT | sys::TS_EVENT_VCONN_ACTIVE_TIMEOUT => {
                diag::debug("a TCP connection stayed idle past its idle timeout: closed");
                self.closed_by = [PeerType::Local; 2];
                self.close();
            }
            sys::TS_EVENT_ERROR => {
                match side {
                    Some(1) if !self.upstream_reached() => self.upstream_unreachable(),
                    // Reset or broken: the proxy closes the other side once it took what was
                    // let through to it, as Envoy's `tcp_proxy` does (who closed it first, if
                    // anyone, stays as it was).
                    Some(index) => {
                        self.closed_by[index] = PeerType::Remote;
                        self.close_flushing([index != 0, index != 1]);
                    }
                    None => {
                        self.closed_by = [PeerType::Local; 2];
                        self.close();
                    }
                }
            }
            _ => {}
        }
    }

    /// Whether the upstream connection was made.
    fn upstream_reached(&self) -> bool {
        self.upstream.as_ref().is_some_and(|side| side.reached)
    }

    /// The upstream's connect completed: its inactivity timeout becomes the idle timeout, and
    /// an end already passed to it is armed.
    fn upstream_made(&mut self) {
        let idle = self.listener().idle_timeout;
        if let Some(upstream) = self.upstream.as_mut() {
            upstream.reached = true;
            set_inactivity_timeout(upstream.vc, idle);
            upstream.arm_end();
        }
        self.schedule_half_close();
    }

    /// The peer of side `index` ended its data (a FIN).
    fn peer_ended(&mut self, index: usize) {
        self.closed_by[index] = PeerType::Remote;
        if let Some(side) = self.side_mut(index) {
            side.read_ended = true;
        }
    }

    /// Whether `vio` is the write of side `index`.
    fn is_write_of(&self, index: usize, vio: *mut c_void) -> bool {
        let side = match index {
            0 => self.downstream.as_ref(),
            _ => self.upstream.as_ref(),
        };
        side.is_some_and(|side| vio == side.write.vio.cast())
    }

    /// The upstream cannot be reached: both sides close, the plugins hear of an upstream
    /// never reached.
    fn upstream_unreachable(&mut self) {
        diag::debug(&format!(
            "upstream {} cannot be reached: the connection is closed",
            self.listener().upstream
        ));
        self.closed_by = [PeerType::Local, PeerType::Unknown];
        self.close();
    }

    fn side_mut(&mut self, index: usize) -> Option<&mut Side> {
        match index {
            0 => self.downstream.as_mut(),
            _ => self.upstream.as_mut(),
        }
    }

    /// Whether both directions ended and were passed on: the connection is done.
    fn is_over(&self) -> bool {
        match (&self.downstream, &self.upstream) {
            (Some(down), Some(up)) => {
                down.end_delivered && up.end_delivered && down.write_shut && up.write_shut
            }
            _ => false,
        }
    }

    /// Moves what each side has read through the chain to the other, as far as the buffer
    /// limits let it, until nothing moves (data let through one way may free room the other).
    fn pump(&mut self) {
        // Bounded: each round moves bytes already read, or an end, which are finite.
        for _ in 0..16 {
            let mut moved = false;
            for direction in [Direction::Downstream, Direction::Upstream] {
                if self.phase != Phase::Open {
                    return;
                }
                moved |= self.pump_direction(direction);
            }
            if !moved {
                return;
            }
        }
    }

    /// One direction's step of [`Connection::pump`]: whether anything moved.
    fn pump_direction(&mut self, direction: Direction) -> bool {
        let limit = self.listener().buffer_limit;
        let held = self.held(direction);
        let (from, to) = match direction {
            Direction::Downstream => (&mut self.downstream, &self.upstream),
            Direction::Upstream => (&mut self.upstream, &self.downstream),
        };
        let (Some(from), Some(to)) = (from.as_mut(), to.as_ref()) else {
            return false;
        };
        let waiting = to.unwritten() + held;
        if waiting >= limit {
            // Read on once the other side took some (its write-ready event).
            return false;
        }
        // SAFETY: the side's reader lives as long as it.
        let available = unsafe { sys::TSIOBufferReaderAvail(from.read.reader) };
        let take = usize::try_from(available).unwrap_or(0).min(limit - waiting);
        let mut chunk = Vec::with_capacity(take);
        if take > 0 {
            // SAFETY: `take` bytes are readable; they are consumed once copied.
            unsafe {
                crate::body::read_into(from.read.reader, take as i64, &mut chunk);
                sys::TSIOBufferReaderConsume(from.read.reader, take as i64);
                sys::TSVIOReenable(from.read.vio);
            }
        }
        // SAFETY: as above.
        let drained = unsafe { sys::TSIOBufferReaderAvail(from.read.reader) } == 0;
        let end = from.read_ended && drained && !from.end_delivered;
        from.end_delivered |= end;
        let first_from_upstream = !from.reached && !chunk.is_empty();
        if chunk.is_empty() && !end {
            return false;
        }
        if first_from_upstream {
            // Bytes came: the connect completed.
            self.upstream_made();
        }
        if direction == Direction::Downstream {
            self.transferred[0] += chunk.len() as u64;
        }
        self.refresh_idle();
        let passed = self.data(direction, chunk, end);
        // What went through goes out, also before a close (which flushes it).
        self.forward(passed.forwards);
        if passed.close {
            self.close_locally();
        }
        true
    }

    /// Restarts the idle timeout of both sides: traffic either way keeps the connection
    /// alive, as in Envoy's `tcp_proxy` (Traffic Server times each side out on its own).
    fn refresh_idle(&self) {
        let idle = self.listener().idle_timeout;
        for side in [&self.downstream, &self.upstream].into_iter().flatten() {
            if side.reached {
                set_inactivity_timeout(side.vc, idle);
            }
        }
    }

    /// Closes both sides as the proxy's own decision (a plugin, its failure policy): each
    /// gets what was let through to it first, as Envoy's `proxy_close_stream` closes a
    /// connection (`FlushWrite`).
    fn close_locally(&mut self) {
        self.closed_by = [PeerType::Local; 2];
        self.close_flushing([true, true]);
    }

    /// Writes what the chain let through to the side it goes to.
    fn forward(&mut self, forwards: Vec<Forward>) {
        for Forward {
            direction,
            data,
            end,
        } in forwards
        {
            let to = match direction {
                Direction::Downstream => self.upstream.as_mut(),
                Direction::Upstream => self.downstream.as_mut(),
            };
            if let Some(to) = to {
                to.send(&data, end);
            }
        }
        self.schedule_half_close();
    }

    /// Half-closes the sides whose end is due with nothing left to write (see
    /// [`Side::end_unsignalled`]): from the scheduled wake-up only.
    fn shut_due_ends(&mut self) {
        for side in [&mut self.downstream, &mut self.upstream]
            .into_iter()
            .flatten()
        {
            if side.end_unsignalled() {
                side.shut_write();
            }
        }
    }

    /// Schedules the half-close of the sides whose end is due with nothing left to write (see
    /// [`Side::end_unsignalled`]). Not now: this may run inside Traffic Server's write to that
    /// very connection, which a shutdown would pull the buffer from under.
    fn schedule_half_close(&mut self) {
        let sides = [&self.downstream, &self.upstream];
        let unsignalled = sides.into_iter().flatten().any(Side::end_unsignalled);
        if unsignalled {
            self.wake(false);
        }
    }

    /// While a plugin holds the new connection, looks at the client's socket again in
    /// [`HELD_CLIENT_CHECK`], unless a look is pending.
    fn arm_held_check(&mut self) {
        if matches!(self.phase, Phase::Held(_)) && self.held_check.is_none() {
            let milliseconds = HELD_CLIENT_CHECK.as_millis() as sys::TSHRTime;
            // SAFETY: the connection's own continuation, on its own thread; the event is
            // cancelled if the connection closes first.
            let action =
                unsafe { sys::TSContScheduleOnThread(self.cont, milliseconds, self.thread) };
            self.held_check = Some(action);
        }
    }

    /// A held new connection whose client reset it (as the kernel reports its socket's state)
    /// is closed, its plugins told the client closed it. Traffic Server reports a reset it
    /// reads as the end of the client's data, as it does a FIN, and reads nothing once the
    /// plugins hold as much as the buffer limit: so the state is looked at when that end
    /// comes and every [`HELD_CLIENT_CHECK`] while the connection is held. A client's FIN is
    /// not its leaving (a TCP client may half-close and wait for the answer).
    fn look_at_held_client(&mut self) {
        if !matches!(self.phase, Phase::Held(_)) {
            return;
        }
        if self.client_reset() {
            diag::debug("a TCP client reset the connection its plugins held: closed");
            self.closed_by[0] = PeerType::Remote;
            self.close();
            return;
        }
        self.arm_held_check();
    }

    /// Whether the client's socket is reset (or closed both ways).
    fn client_reset(&self) -> bool {
        self.downstream.as_ref().is_some_and(|side| {
            // SAFETY: the side's connection is open while the side is kept.
            let fd = unsafe { sys::TSVConnFdGet(side.vc) };
            crate::socket::reset(fd)
        })
    }

    /// Schedules the connection's wake-up event, if none is pending: it half-closes the sides
    /// whose end is due and, once `resume` was asked for, resumes the connection.
    fn wake(&mut self, resume: bool) {
        self.resume_wanted |= resume;
        if self.phase != Phase::Closed && self.half_close.is_none() {
            // SAFETY: the connection's own continuation, on its own thread; the event is
            // cancelled if the connection closes first.
            let action = unsafe { sys::TSContScheduleOnThread(self.cont, 0, self.thread) };
            self.half_close = Some(action);
        }
    }

    /// Bytes the plugins hold of the data in `direction`.
    fn held(&self, direction: Direction) -> usize {
        self.filters
            .iter()
            .map(|filter| filter.held[direction.index()].len())
            .sum()
    }

    /// Runs `work` with filter `index`'s VM copy and context, on this thread's worker of the
    /// connection's deployment; `None` if the copy cannot be reached.
    fn with_filter<R>(
        &mut self,
        index: usize,
        work: impl FnOnce(&mut Vm, ContextId) -> R,
    ) -> Option<R> {
        let filter = self.filters.get(index)?;
        let stream = filter.stream.as_ref()?;
        let context = filter.context;
        in_worker(self.thread, self.generation, "a TCP connection", |worker| {
            worker.vm(stream).map(|vm| work(vm, context))
        })
        .flatten()
    }

    /// Applies the plugin's failure policy to an error of filter `index`: `Ok` if it failed
    /// open (it is skipped from then on, what it held goes on), `Err` if the connection closes.
    fn failed(&mut self, index: usize, error: &VmError) -> Result<(), ()> {
        let (plugin, name) = {
            let filter = &self.filters[index];
            (filter.plugin, Arc::clone(&filter.name))
        };
        diag::error(&format!("[{name}] {error}"));
        let policy = in_worker(self.thread, self.generation, "a TCP connection", |worker| {
            crate::plugin_failed(worker, plugin, error)
        });
        match policy {
            Some(OnFailure::FailOpen) => {
                let filter = &mut self.filters[index];
                filter.bypassed = true;
                filter.release = [true; 2];
                Ok(())
            }
            _ => Err(()),
        }
    }

    /// `proxy_on_new_connection` for the plugins from filter `from` on, in order; then the
    /// upstream is dialled. A plugin that pauses holds the connection there.
    fn new_connection(&mut self, from: usize) {
        for index in from..self.filters.len() {
            if self.filters[index].bypassed {
                continue;
            }
            let result = self.with_filter(index, |vm, context| {
                (vm.on_new_connection(context), take_asked(vm, context))
            });
            let Some((result, asked)) = result else {
                self.close();
                return;
            };
            match result {
                Err(error) => {
                    if self.failed(index, &error).is_err() {
                        self.close();
                        return;
                    }
                }
                Ok(_) if asked.closed => {
                    self.close();
                    return;
                }
                Ok(DataAction::Continue) => {}
                Ok(_) if asked.continued => {}
                Ok(_) if asked.replied => {
                    // Held with an answer a connection cannot carry: closed.
                    self.close();
                    return;
                }
                Ok(_) => {
                    self.phase = Phase::Held(index);
                    self.arm_held_check();
                    return;
                }
            }
        }
        self.phase = Phase::Dialling;
        self.dial_wanted = true;
    }

    /// What filter `index`'s plugin asked since the last look, and whether its VM failed;
    /// `None` if its VM copy cannot be reached.
    fn look(&mut self, index: usize) -> Option<(Asked, bool)> {
        self.with_filter(index, |vm, context| {
            (take_asked(vm, context), vm.is_failed())
        })
    }

    /// What the plugins asked outside their callbacks: a held new connection goes on (or
    /// closes); data a plugin held goes on once it continues that direction; a plugin whose
    /// VM failed meanwhile gets its failure policy.
    fn resume(&mut self) {
        if let Phase::Held(index) = self.phase {
            let Some((asked, failed)) = self.look(index) else {
                self.close();
                return;
            };
            if asked.closed || asked.replied {
                self.close();
                return;
            }
            if failed {
                let error = VmError::Failed("the VM failed while holding the connection".into());
                if self.failed(index, &error).is_err() {
                    self.close();
                    return;
                }
            } else if !asked.continued {
                return;
            }
            self.new_connection(index + 1);
            return;
        }
        for index in 0..self.filters.len() {
            if self.filters[index].bypassed {
                continue;
            }
            let Some((asked, failed)) = self.look(index) else {
                self.close_locally();
                return;
            };
            if asked.closed {
                self.close_locally();
                return;
            }
            let filter = &mut self.filters[index];
            filter.mark_release(asked.continued_sides);
            if failed && (filter.holds(0) || filter.holds(1)) {
                let error = VmError::Failed("the VM failed while holding the connection".into());
                if self.failed(index, &error).is_err() {
                    self.close_locally();
                    return;
                }
            }
        }
        if self.phase == Phase::Open {
            let mut passed = Passed::default();
            self.release(&mut passed);
            self.forward(passed.forwards);
            if passed.close {
                self.close_locally();
            }
        }
    }

    /// Runs one chunk (`end`: the last) of `direction` through the network filters; returns
    /// what goes on, and whether the connection must close.
    fn data(&mut self, direction: Direction, chunk: Vec<u8>, end: bool) -> Passed {
        let mut out = Passed::default();
        match self.chain_from(direction, 0, chunk, end) {
            Ok(Step::Pass(data)) => out.forwards = passed(direction, data, end),
            Ok(Step::Held) => {}
            Err(()) => {
                out.close = true;
                return out;
            }
        }
        self.release(&mut out);
        out
    }

    /// Runs the data callbacks from the `start`th plugin in `direction`'s order.
    fn chain_from(
        &mut self,
        direction: Direction,
        start: usize,
        chunk: Vec<u8>,
        end: bool,
    ) -> Result<Step, ()> {
        let count = self.filters.len();
        let order: Vec<usize> = match direction {
            Direction::Downstream => (0..count).collect(),
            Direction::Upstream => (0..count).rev().collect(),
        };
        let side = direction.index();
        let mut data = chunk;
        for index in order.into_iter().skip(start) {
            if self.filters[index].bypassed {
                continue;
            }
            let mut buffer = std::mem::take(&mut self.filters[index].held[side]);
            buffer.extend_from_slice(&data);
            let ran = self.with_filter(index, |vm, context| {
                forget_stale_continue(vm, context);
                let size = buffer.len();
                lend(vm, context, Some(buffer));
                let result = match direction {
                    Direction::Downstream => vm.on_downstream_data(context, size, end),
                    Direction::Upstream => vm.on_upstream_data(context, size, end),
                };
                let buffer = lend(vm, context, None).unwrap_or_default();
                (result, buffer, take_asked(vm, context))
            });
            let Some((result, buffer, asked)) = ran else {
                return Err(());
            };
            let action = match result {
                Err(error) => {
                    self.failed(index, &error)?;
                    data = buffer;
                    continue;
                }
                Ok(action) => action,
            };
            if asked.closed {
                return Err(());
            }
            let continued = asked.continued && asked.continued_sides[side];
            let filter = &mut self.filters[index];
            // A continue of the other direction is for what it holds there.
            filter.mark_release(asked.continued_sides);
            if action == DataAction::Continue || continued {
                data = buffer;
                continue;
            }
            // Paused: the plugin keeps the data (and the end, if it came) until it continues
            // that direction or its next callback; the other direction flows meanwhile.
            filter.held[side] = buffer;
            filter.held_end[side] |= end;
            return Ok(Step::Held);
        }
        Ok(Step::Pass(data))
    }

    /// Passes on what each plugin marked for release holds, from the next plugin on, until no
    /// mark is left (a plugin further on may hold it again, or let more go), adding to `out`;
    /// a plugin closing the connection meanwhile ends it there.
    fn release(&mut self, out: &mut Passed) {
        // Each round clears a mark; a mark is only set again by a callback that got data.
        for _ in 0..=4 * self.filters.len() {
            let marked = self.filters.iter().enumerate().find_map(|(index, filter)| {
                [Direction::Downstream, Direction::Upstream]
                    .into_iter()
                    .find(|d| filter.release[d.index()])
                    .map(|direction| (index, direction))
            });
            let Some((index, direction)) = marked else {
                return;
            };
            let side = direction.index();
            let filter = &mut self.filters[index];
            filter.release[side] = false;
            let end = std::mem::take(&mut filter.held_end[side]);
            let data = std::mem::take(&mut filter.held[side]);
            if data.is_empty() && !end {
                continue;
            }
            let position = match direction {
                Direction::Downstream => index,
                Direction::Upstream => self.filters.len() - 1 - index,
            };
            match self.chain_from(direction, position + 1, data, end) {
                Ok(Step::Pass(data)) => out.forwards.extend(passed(direction, data, end)),
                Ok(Step::Held) => {}
                Err(()) => {
                    out.close = true;
                    return;
                }
            }
        }
    }

    /// Closes both sides and ends the plugins' contexts; the state is freed once its
    /// handlers have returned.
    fn close(&mut self) {
        self.close_flushing([false, false]);
    }

    /// As [`Connection::close`], but the sides `flush` names (a reached side, still writable)
    /// first get what waits to be written to them, and close their own end, within
    /// [`FLUSH_TIMEOUT`] of nothing moving: the connection is [`Phase::Flushing`] until then.
    /// The plugins hear of the close once the flush ended, as Envoy raises a connection's close
    /// only once its write buffer drained: what they read of the bytes sent then counts what
    /// the flush wrote.
    fn close_flushing(&mut self, flush: [bool; 2]) {
        if matches!(self.phase, Phase::Closed | Phase::Flushing) {
            return;
        }
        if matches!(self.phase, Phase::Held(_) | Phase::Dialling) {
            // The upstream was never reached.
            self.closed_by[1] = PeerType::Unknown;
        }
        self.phase = Phase::Closed;
        if let Some(action) = self.dialling.take() {
            // SAFETY: the attempt has not been reported (reporting it clears `dialling`).
            unsafe { sys::TSActionCancel(action) };
        }
        for action in [self.half_close.take(), self.held_check.take()]
            .into_iter()
            .flatten()
        {
            // SAFETY: the event has not run (running clears its field).
            unsafe { sys::TSActionCancel(action) };
        }
        self.count_sent();
        let mut kept = [None, None];
        for (index, side) in [self.downstream.take(), self.upstream.take()]
            .into_iter()
            .enumerate()
        {
            let Some(mut side) = side else {
                continue;
            };
            if !flush[index] || !side.reached || side.write_shut && side.read_ended {
                // Not to be flushed, or nothing more to write nor to wait for.
                side.close();
                continue;
            }
            if !side.write_shut {
                side.flush();
            }
            set_inactivity_timeout(side.vc, Some(FLUSH_TIMEOUT));
            // Its reading may have stopped (the other side was full): what it sends now is
            // drained, or its close would reset it.
            side.discard_read();
            kept[index] = Some(side);
        }
        let [downstream, upstream] = kept;
        if downstream.is_some() || upstream.is_some() {
            self.phase = Phase::Flushing;
            let milliseconds = FLUSH_DEADLINE.as_millis() as sys::TSHRTime;
            // SAFETY: the connection's own continuation, on its own thread; the event is
            // cancelled when the flush ends first.
            let action =
                unsafe { sys::TSContScheduleOnThread(self.cont, milliseconds, self.thread) };
            self.flush_deadline = Some(action);
        }
        self.downstream = downstream;
        self.upstream = upstream;
        // A side with everything written gets its end from the wake-up (not here: this may
        // run inside Traffic Server's write to it).
        self.schedule_half_close();
        if self.phase == Phase::Closed {
            self.end_plugins();
        }
    }

    /// Notes what reached the client so far: written, not only queued.
    fn count_sent(&mut self) {
        if let Some(downstream) = &self.downstream {
            // SAFETY: the side's VIO lives until it is closed, which takes it out of `self`.
            let written = unsafe { sys::TSVIONDoneGet(downstream.write.vio) };
            self.transferred[1] = u64::try_from(written).unwrap_or(0);
        }
    }

    /// An event of a side being flushed (see [`Connection::close_flushing`]): its write
    /// completed (it is half-closed), it sent more (dropped), or it ended, failed or stayed
    /// idle past [`FLUSH_TIMEOUT`] (closed). Once no side is left the connection is closed.
    fn flushing(&mut self, event: sys::TSEvent, data: *mut c_void) {
        // Counted before this event may close the client's side.
        self.count_sent();
        if matches!(event, sys::TS_EVENT_IMMEDIATE | sys::TS_EVENT_TIMEOUT) {
            // The wake-up (scheduled at once) or the flush's deadline (later).
            let deadline = event == sys::TS_EVENT_TIMEOUT;
            if deadline {
                self.flush_deadline = None;
            }
            self.shut_due_ends();
            for slot in [&mut self.downstream, &mut self.upstream] {
                if slot
                    .as_ref()
                    .is_some_and(|side| deadline || side.write_shut && side.read_ended)
                {
                    if let Some(side) = slot.take() {
                        side.close();
                    }
                }
            }
            self.end_flush_if_done();
            return;
        }
        let index = if self.downstream.as_ref().is_some_and(|s| s.owns(data)) {
            0
        } else if self.upstream.as_ref().is_some_and(|s| s.owns(data)) {
            1
        } else {
            return;
        };
        let slot = match index {
            0 => &mut self.downstream,
            _ => &mut self.upstream,
        };
        let Some(side) = slot.as_mut() else {
            return;
        };
        match event {
            sys::TS_EVENT_VCONN_WRITE_COMPLETE if !side.read_ended => side.shut_write(),
            sys::TS_EVENT_VCONN_READ_READY => side.discard_read(),
            sys::TS_EVENT_VCONN_WRITE_READY => {}
            sys::TS_EVENT_VCONN_EOS if !side.write_shut && data == side.read.vio.cast() => {
                // Its peer ended its data, not its reading: the rest still goes to it.
                side.read_ended = true;
                side.discard_read();
            }
            _ => {
                // Ended, failed or idle: closed.
                if let Some(side) = slot.take() {
                    side.close();
                }
            }
        }
        self.end_flush_if_done();
    }

    /// Once no side is left to flush: the connection is closed, its scheduled events
    /// cancelled and its plugins told (it is freed once its handlers return).
    fn end_flush_if_done(&mut self) {
        if self.downstream.is_some() || self.upstream.is_some() {
            return;
        }
        self.phase = Phase::Closed;
        for action in [self.half_close.take(), self.flush_deadline.take()]
            .into_iter()
            .flatten()
        {
            // SAFETY: the event has not run (running clears its field).
            unsafe { sys::TSActionCancel(action) };
        }
        self.end_plugins();
    }

    /// Ends the plugins' contexts on the connection's VM copies (see
    /// [`Connection::end_contexts`]) and counts the connection out of its generation.
    fn end_plugins(&mut self) {
        let finished = in_worker(self.thread, self.generation, "a TCP connection", |worker| {
            self.end_contexts(worker);
        });
        if finished.is_some() {
            self.slots_removed = true;
            with_workers(|workers| workers.stream_ended(self.generation));
        }
    }

    /// The plugins' end of the connection: both connection-close callbacks, `proxy_on_done`,
    /// `proxy_on_log`, `proxy_on_delete` (Envoy's order for a connection), then the contexts
    /// and VM holds go.
    fn end_contexts(&mut self, worker: &mut Worker) {
        let (closed_by, transferred) = (self.closed_by, self.transferred);
        for filter in std::mem::take(&mut self.filters) {
            let Some(stream) = filter.stream else {
                continue;
            };
            if !filter.bypassed {
                crate::last_callbacks(&filter.name, || {
                    let Some(vm) = worker.vm(&stream).filter(|vm| !vm.is_failed()) else {
                        return;
                    };
                    if let Some(slot) = slot_of(vm, filter.context) {
                        slot.body = None;
                        slot.info.bytes_received = Some(transferred[0]);
                        slot.info.bytes_sent = Some(transferred[1]);
                    }
                    let context = filter.context;
                    let ended = vm
                        .on_downstream_connection_close(context, closed_by[0])
                        .and_then(|()| vm.on_upstream_connection_close(context, closed_by[1]))
                        .and_then(|()| vm.on_done(context).map(|_| ()))
                        .and_then(|()| vm.on_log(context))
                        .and_then(|()| vm.on_delete(context));
                    if let Err(error) = ended {
                        diag::error(&format!("[{}] {error}", filter.name));
                        crate::plugin_failed(worker, filter.plugin, &error);
                    }
                });
            }
            if let Some(host) = worker.vm(&stream).and_then(|vm| vm.host_as::<AtsHost>()) {
                host.close_stream(filter.context);
            }
            worker.release(stream);
        }
    }
}

/// Data the chain let through: where it goes and whether it ends that direction.
struct Forward {
    direction: Direction,
    data: Vec<u8>,
    end: bool,
}

/// What one step (a chunk, or what the plugins asked outside their callbacks) let through, and
/// whether the connection closes after it (a plugin closed it, or failed closed). What went
/// through before the close still goes out, as Envoy's close flushes what its filters had
/// already written.
#[derive(Default)]
struct Passed {
    forwards: Vec<Forward>,
    close: bool,
}

/// Where a chunk got to in the chain.
enum Step {
    /// Through every plugin: this goes on.
    Pass(Vec<u8>),
    /// A plugin holds it.
    Held,
}

/// What a chain let through in `direction`, if anything.
fn passed(direction: Direction, data: Vec<u8>, end: bool) -> Vec<Forward> {
    if data.is_empty() && !end {
        return Vec::new();
    }
    vec![Forward {
        direction,
        data,
        end,
    }]
}

/// What the plugin asked for its connection since the last look.
struct Asked {
    /// `proxy_continue_stream`, of any direction.
    continued: bool,
    /// The directions it continued: `[downstream, upstream]`.
    continued_sides: [bool; 2],
    /// `proxy_close_stream`.
    closed: bool,
    /// `proxy_send_local_response`: nothing to answer on a connection; a held one closes (as
    /// `pwhost serve` closes it), one passing data goes on.
    replied: bool,
}

/// The plugin's slot for its connection context `context`.
fn slot_of(vm: &mut Vm, context: ContextId) -> Option<&mut StreamSlot> {
    vm.host_as::<AtsHost>()?.stream_mut(context)
}

/// Forgets a continue the plugin of `context` asked for while it held nothing of its
/// connection (e.g. from a callout's answer while another filter held the new connection): only
/// one asked for in the callback that gets data, or while it holds some, lets data go on. (A
/// continue asked outside the connection's events is acted on before the next event's data
/// reaches the plugins: see [`Connection::on`].)
fn forget_stale_continue(vm: &mut Vm, context: ContextId) {
    if let Some(slot) = slot_of(vm, context) {
        slot.continued = false;
        slot.continued_sides = [false; 2];
    }
}

/// Takes what the plugin asked for its connection `context`.
fn take_asked(vm: &mut Vm, context: ContextId) -> Asked {
    match slot_of(vm, context) {
        Some(slot) => Asked {
            continued: std::mem::take(&mut slot.continued),
            continued_sides: std::mem::take(&mut slot.continued_sides),
            closed: std::mem::take(&mut slot.closed),
            replied: slot.local_reply.take().is_some(),
        },
        None => Asked {
            continued: false,
            continued_sides: [false; 2],
            closed: false,
            replied: false,
        },
    }
}

/// Lends data to the plugin's slot (`None` takes it back and returns it).
fn lend(vm: &mut Vm, context: ContextId, data: Option<Vec<u8>>) -> Option<Vec<u8>> {
    let slot = slot_of(vm, context)?;
    std::mem::replace(&mut slot.body, data)
}
