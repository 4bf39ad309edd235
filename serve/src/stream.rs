//! One HTTP stream or TCP connection running through a listener's plugin chain, on the worker
//! thread that owns the VM copies it uses.
//!
//! Request (downstream) callbacks run in chain order, response (upstream) callbacks in reverse
//! (as Envoy's encoder and write filters). A plugin that pauses leaves the stream waiting
//! (asynchronously) until it continues it, answers it or closes it; each callback's outcome goes
//! through the plugin's failure policy.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use abi::{ContextId, DataAction, HeadersAction, LocalResponse, PeerType, Vm, VmError};
use lifecycle::{Admission, Generation, OnFailure, PluginId, StreamVm, Worker};
use tokio::sync::Notify;

use pingora::http::{RequestHeader, ResponseHeader};

use crate::headers::Lent;
use crate::host::{Asked, ServeHost, StreamSlot};
use crate::read_ahead::{Pending, ReadAhead, ReadFailure};
use crate::worker::{with_workers, Listener};

/// Lends the held request header to a plugin's context for one callback (see
/// [`Stream::request_headers_reading_ahead`]).
type LendHeader<'a> = dyn FnMut(&mut Vm, ContextId) + Send + 'a;

/// A reply sent instead of the upstream's response.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub(crate) body: Vec<u8>,
    /// The gRPC status a gRPC request gets (`None`: the HTTP status mapped as Envoy does).
    pub(crate) grpc_status: Option<i32>,
    /// Why it is sent (Envoy's response code details, the `response.code_details` attribute).
    pub(crate) details: Cow<'static, str>,
}

impl Reply {
    /// A reply of the proxy's with `status` and nothing else, sent for `details`.
    pub(crate) fn status(status: u16, details: &'static str) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            grpc_status: None,
            details: Cow::Borrowed(details),
        }
    }

    /// Envoy's answer for a stream whose plugin failed closed: 503 with no extra header (the
    /// response callbacks see what they would in Envoy), details naming the plugin
    /// (`wasm_fail_stream{name}`; Envoy's bare `wasm_fail_stream` where no plugin is to blame,
    /// as when the thread's plugins cannot be reached).
    fn fail_closed(plugin: Option<&str>) -> Reply {
        let details = match plugin {
            Some(name) => Cow::Owned(lifecycle::fail_stream_details(name)),
            None => Cow::Borrowed(lifecycle::FAIL_STREAM_DETAILS),
        };
        tracing::debug!(details = %details, "stream failed closed");
        Reply {
            grpc_status: Some(lifecycle::FAIL_STREAM_GRPC_STATUS),
            details,
            ..Reply::status(503, "")
        }
    }

    fn from_local(local: LocalResponse) -> Reply {
        Reply {
            // An informational or out-of-range status cannot end a stream: 500, as Envoy.
            status: u16::try_from(local.status)
                .ok()
                .filter(|s| (200..=599).contains(s))
                .unwrap_or(500),
            headers: local
                .headers
                .iter()
                .map(|(name, value)| (name.to_vec(), value.to_vec()))
                .collect(),
            body: local.body,
            grpc_status: local.grpc_status,
            // The plugin's (whitespace already replaced, as Envoy does).
            details: Cow::Owned(String::from_utf8_lossy(&local.details).into_owned()),
        }
    }
}

/// One plugin's part in a stream.
struct Filter {
    plugin: PluginId,
    name: Arc<str>,
    stream: Option<StreamVm>,
    context: ContextId,
    /// Failed open during this stream: not called again for it.
    bypassed: bool,
    /// Failed closed during this stream: not called again for it (its VM runs no more plugin
    /// code), and its failure counted once.
    failed: bool,
    /// Body bytes it keeps buffered, by direction.
    request_body: Vec<u8>,
    response_body: Vec<u8>,
    /// TCP: it holds the end of the data from downstream (request) or upstream (response).
    held_end: [bool; 2],
    /// TCP: what it holds in each direction goes on at the next chance (it continued the
    /// connection, or failed open).
    release: [bool; 2],
}

impl Filter {
    /// Whether the stream goes on without calling it.
    fn skipped(&self) -> bool {
        self.bypassed || self.failed
    }

    fn buffered(&mut self, direction: Direction) -> &mut Vec<u8> {
        match direction {
            Direction::Request => &mut self.request_body,
            Direction::Response => &mut self.response_body,
        }
    }
}

/// What runs through a chain: an HTTP stream (HTTP filters) or a TCP connection (network
/// filters).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Http,
    Tcp,
}

/// What a header phase came to.
pub(crate) enum Outcome {
    /// On to the next phase.
    Continue,
    /// Answer with this reply instead.
    Reply(Reply),
    /// A plugin closed the stream: reset it.
    Close,
}

/// Where a body chunk got to in the chain.
enum BodyStep {
    /// Through every plugin: what goes on.
    Pass(Vec<u8>),
    /// A plugin buffers it (with what it buffered before) until a later chunk.
    Buffered,
    /// Held by the plugin at `position` in the chain's order (filter `index`).
    Held { position: usize, index: usize },
}

/// Which of a message's header maps a header callback is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Headers,
    Trailers,
}

/// Which direction a body or header callback is for. On a TCP connection: data from
/// downstream (request) or from upstream (response).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Direction {
    Request,
    Response,
}

impl Direction {
    /// 0 for the request (downstream side), 1 for the response (upstream side).
    pub(crate) fn index(self) -> usize {
        match self {
            Direction::Request => 0,
            Direction::Response => 1,
        }
    }
}

/// Data a TCP connection's chain let through: where it goes (the request direction goes
/// upstream), and whether it ends that direction.
pub(crate) struct Forward {
    pub(crate) direction: Direction,
    pub(crate) data: Vec<u8>,
    pub(crate) end: bool,
}

/// What one TCP step (a chunk, or what the plugins asked outside their callbacks) let through,
/// and whether the connection closes after it (a plugin closed it, or failed closed). What
/// went through before the close still goes out, as Envoy's close flushes what its filters
/// had already written.
#[derive(Default)]
pub(crate) struct TcpStep {
    pub(crate) forwards: Vec<Forward>,
    pub(crate) close: bool,
}

impl TcpStep {
    /// A step that closes the connection and lets nothing more through.
    pub(crate) fn closed() -> TcpStep {
        TcpStep {
            forwards: Vec::new(),
            close: true,
        }
    }
}

/// A stream and its plugins.
pub(crate) struct Stream {
    kind: Kind,
    listener: Arc<Listener>,
    generation: Option<Generation>,
    filters: Vec<Filter>,
    wake: Arc<Notify>,
    /// Bytes a plugin may buffer per direction before the stream fails (413 / 500).
    buffer_limit: usize,
    /// How long a plugin may hold an HTTP stream without asking for anything (the listener's
    /// `stream_idle_timeout`, Envoy's): past it, a 408. `None` for TCP connections, whose
    /// idle timeout the connection keeps itself.
    idle_timeout: Option<Duration>,
    /// A reply decided before any callback ran (a plugin that failed closed at admission).
    pub(crate) early_reply: Option<Reply>,
    /// TCP: who closed the downstream and the upstream side, for the close callbacks (the
    /// proxy, unless the connection learns otherwise).
    pub(crate) closed_by: [PeerType; 2],
    /// TCP: bytes received from downstream and sent to it, for `on_log`'s attributes.
    pub(crate) transferred: [u64; 2],
    /// A plugin of the chain may pause on its request headers and still get the body
    /// (`allow_on_headers_stop_iteration`): the request body may be read ahead (see
    /// [`crate::read_ahead`]).
    reads_ahead: bool,
}

impl Stream {
    /// A stream (or connection, by `kind`) of `listener`, not yet admitted to its plugins.
    pub(crate) fn new(
        kind: Kind,
        listener: Arc<Listener>,
        buffer_limit: usize,
        idle_timeout: Option<Duration>,
    ) -> Stream {
        Stream {
            kind,
            listener,
            generation: None,
            filters: Vec::new(),
            wake: Arc::new(Notify::new()),
            buffer_limit,
            idle_timeout,
            early_reply: None,
            closed_by: [PeerType::Local; 2],
            transferred: [0; 2],
            reads_ahead: false,
        }
    }

    /// Whether a plugin of the chain may pause on the request headers and still get the body.
    pub(crate) fn reads_ahead(&self) -> bool {
        self.reads_ahead
    }

    /// What wakes the stream when a plugin asks for something outside its callbacks.
    pub(crate) fn wake(&self) -> Arc<Notify> {
        Arc::clone(&self.wake)
    }

    /// Admits the stream to every plugin of the chain, creating its context in each.
    pub(crate) fn begin(&mut self, info: &abi::StreamInfo) {
        let wake = Arc::clone(&self.wake);
        let kind = self.kind;
        let begun = with_workers(&self.listener, |workers| {
            let (generation, worker) = workers.for_new_stream();
            let plugins = Arc::clone(worker.plugins());
            let mut filters = Vec::new();
            let mut reply = None;
            let mut reads_ahead = false;
            let chain: Vec<PluginId> = match kind {
                Kind::Http => plugins.http_filters().collect(),
                Kind::Tcp => plugins.network_filters().collect(),
            };
            for plugin in chain {
                let config = plugins.config(plugin);
                let name: Arc<str> = config.display_name().into();
                reads_ahead |= config.allow_on_headers_stop_iteration;
                match worker.admit(plugin) {
                    Admission::Run(stream) => match open(worker, &stream, &name, &wake, info, kind)
                    {
                        Ok(context) => filters.push(Filter {
                            plugin,
                            name: Arc::clone(&name),
                            stream: Some(stream),
                            context,
                            bypassed: false,
                            failed: false,
                            request_body: Vec::new(),
                            response_body: Vec::new(),
                            held_end: [false; 2],
                            release: [false; 2],
                        }),
                        Err(error) => {
                            tracing::error!(plugin = %name, "cannot create a stream context: {error}");
                            worker.release(stream);
                            if worker.failed(plugin, &error) == OnFailure::FailClosed {
                                reply = Some(Reply::fail_closed(Some(&*name)));
                                break;
                            }
                        }
                    },
                    Admission::FailClosed => {
                        reply = Some(Reply::fail_closed(Some(&*name)));
                        break;
                    }
                    Admission::FailOpen => {}
                }
            }
            (generation, filters, reply, reads_ahead)
        });
        match begun {
            Some((generation, filters, reply, reads_ahead)) => {
                self.reads_ahead = reads_ahead && kind == Kind::Http;
                self.generation = Some(generation);
                self.listener
                    .metrics
                    .live_contexts
                    .inc_by(filters.len() as i64);
                self.filters = filters;
                self.early_reply = reply;
            }
            // The thread's plugins cannot be reached: fail closed rather than bypass them.
            None => self.early_reply = Some(Reply::fail_closed(None)),
        }
    }

    /// Runs `work` with the VM copy of filter `index` and its context. Whatever `work` lent
    /// to the stream's slot is taken back afterwards, even if it panicked: a lent header must
    /// never outlive the callback it was lent for.
    fn with_filter<R>(
        &mut self,
        index: usize,
        work: impl FnOnce(&mut Vm, ContextId) -> R,
    ) -> Option<R> {
        self.with_filter_lending(index, |vm, context| {
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(vm, context)));
            if let Some(slot) = slot(vm, context) {
                slot.request = None;
                slot.response = None;
                slot.trailers = None;
            }
            match outcome {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// As [`Stream::with_filter`], but what `work` lends stays lent: the caller must hold a
    /// [`LoanGuard`] for the length of the loan.
    fn with_filter_lending<R>(
        &mut self,
        index: usize,
        work: impl FnOnce(&mut Vm, ContextId) -> R,
    ) -> Option<R> {
        let generation = self.generation?;
        let filter = self.filters.get(index)?;
        let (stream, context) = (filter.stream.as_ref()?, filter.context);
        with_workers(&self.listener, |workers| {
            let vm = workers.worker(generation)?.vm(stream)?;
            Some(work(vm, context))
        })
        .flatten()
    }

    /// Applies the plugin's failure policy to a failed callback of filter `index`.
    fn failed(&mut self, index: usize, error: &VmError) -> Outcome {
        // A failure of this stream's callback failed the VM copy for every stream it holds:
        // the copy's host woke them (`ServeHost::vm_failed`), so that each gets the plugin's
        // failure policy instead of waiting for a continue that cannot come.
        let Some(generation) = self.generation else {
            return Outcome::Reply(Reply::fail_closed(Some(&*self.filters[index].name)));
        };
        if self.filters[index].skipped() {
            // Counted and applied when it failed first (this is its VM refusing more work).
            tracing::debug!(plugin = %self.filters[index].name, "plugin failed again: {error}");
            return if self.filters[index].bypassed {
                Outcome::Continue
            } else {
                Outcome::Reply(Reply::fail_closed(Some(&*self.filters[index].name)))
            };
        }
        let plugin = self.filters[index].plugin;
        tracing::error!(plugin = %self.filters[index].name, "plugin failed: {error}");
        let policy = with_workers(&self.listener, |workers| {
            workers.worker(generation).map(|w| w.failed(plugin, error))
        })
        .flatten();
        match policy {
            Some(OnFailure::FailOpen) => {
                self.filters[index].bypassed = true;
                Outcome::Continue
            }
            _ => {
                self.filters[index].failed = true;
                Outcome::Reply(Reply::fail_closed(Some(&*self.filters[index].name)))
            }
        }
    }

    /// Runs the request (or response) header callbacks over `header`, lent to each plugin in
    /// turn, waiting while a plugin holds the stream. `lend` puts the header in a slot (see
    /// [`lend_request`], [`lend_response`]).
    pub(crate) async fn headers<H: Send>(
        &mut self,
        direction: Direction,
        header: &mut H,
        end_of_stream: bool,
        lend: fn(&mut StreamSlot, &mut H),
    ) -> Outcome {
        self.header_phase(Phase::Headers, direction, header, end_of_stream, lend, None)
            .await
            .0
    }

    /// The request header callbacks, as [`Stream::headers`], for a request with a body that
    /// `reader` reads ahead while a plugin that may (`allow_on_headers_stop_iteration`)
    /// holds the headers: each chunk goes through the plugins up to the one holding them, and
    /// a chunk that one lets through lets the headers go on too (Envoy's `Continue` from a
    /// body callback sends the held headers on first). What went through only some of the
    /// plugins is left in the reader (`pending`, see [`crate::read_ahead`]).
    pub(crate) async fn request_headers_reading_ahead(
        &mut self,
        header: &mut RequestHeader,
        reader: &mut ReadAhead<'_>,
    ) -> Outcome {
        self.header_phase(
            Phase::Headers,
            Direction::Request,
            header,
            false,
            lend_request,
            Some(reader),
        )
        .await
        .0
    }

    /// Runs the response trailers callbacks over `trailers`, as [`Stream::headers`], in
    /// Envoy's way: the trailers end the body, so a plugin still buffering the body reads (and
    /// may replace) what it buffered from its trailers callback, and once it lets the trailers
    /// go on, that body goes on to the plugins after it as one more chunk, before their
    /// trailers callbacks. Returns how the phase ended and the body that must reach the client
    /// before the trailers.
    pub(crate) async fn response_trailers(
        &mut self,
        trailers: &mut http::HeaderMap,
    ) -> (Outcome, Vec<u8>) {
        self.header_phase(
            Phase::Trailers,
            Direction::Response,
            trailers,
            true,
            lend_trailers,
            None,
        )
        .await
    }

    /// The header (or trailers) callbacks of one phase; with the body the plugins let go in a
    /// trailers phase.
    async fn header_phase<H: Send>(
        &mut self,
        phase: Phase,
        direction: Direction,
        header: &mut H,
        end_of_stream: bool,
        lend: fn(&mut StreamSlot, &mut H),
        mut read_ahead: Option<&mut ReadAhead<'_>>,
    ) -> (Outcome, Vec<u8>) {
        let order: Vec<usize> = match direction {
            Direction::Request => (0..self.filters.len()).collect(),
            Direction::Response => (0..self.filters.len()).rev().collect(),
        };
        let trailers = phase == Phase::Trailers;
        let mut flushed = Vec::new();
        for (position, index) in order.into_iter().enumerate() {
            if self.filters[index].skipped() {
                // Bypassed (failed open) while it buffered the body: what it kept goes on,
                // through the plugins after it, before the trailers.
                let kept = match trailers && self.filters[index].bypassed {
                    true => std::mem::take(self.filters[index].buffered(direction)),
                    false => Vec::new(),
                };
                if !kept.is_empty() {
                    if let Some(outcome) =
                        self.pass_on_let_go(direction, position + 1, kept, &mut flushed)
                    {
                        return (outcome, flushed);
                    }
                }
                continue;
            }
            // What the plugin buffered of the body, readable from its trailers callback.
            let mut held = if trailers {
                std::mem::take(self.filters[index].buffered(direction))
            } else {
                Vec::new()
            };
            let result = self.with_filter(index, |vm, context| {
                forget_stale_continue(vm, context);
                let count = lend_to(vm, context, header, lend);
                if trailers {
                    set_body(vm, context, Some(std::mem::take(&mut held)));
                }
                let result = match (phase, direction) {
                    (Phase::Headers, Direction::Request) => {
                        vm.on_request_headers(context, count, end_of_stream)
                    }
                    (Phase::Headers, Direction::Response) => {
                        vm.on_response_headers(context, count, end_of_stream)
                    }
                    (Phase::Trailers, Direction::Request) => vm.on_request_trailers(context, count),
                    (Phase::Trailers, Direction::Response) => {
                        vm.on_response_trailers(context, count)
                    }
                };
                let body = if trailers {
                    set_body(vm, context, None).unwrap_or_default()
                } else {
                    Vec::new()
                };
                (result, body, take_asked(vm, context))
            });
            let Some((result, body, asked)) = result else {
                return (
                    Outcome::Reply(Reply::fail_closed(Some(&*self.filters[index].name))),
                    flushed,
                );
            };
            held = body;
            match result {
                Err(error) => match self.failed(index, &error) {
                    // Failed open: what it buffered goes on.
                    Outcome::Continue => {}
                    other => return (other, flushed),
                },
                Ok(action) => match acted(asked, Some(direction)) {
                    // Continued from inside its own callback: on to the next plugin.
                    Some(Outcome::Continue) => {}
                    Some(other) => return (other, flushed),
                    None if action == HeadersAction::Continue => {}
                    None => {
                        // Held: wait for the plugin to continue, answer or close the stream.
                        // The header (and in a trailers phase the body) stays lent meanwhile:
                        // a plugin edits it before it lets the stream go on (e.g. from a
                        // callout's answer). The borrow of `header` spans the wait, and the
                        // guard takes the loan back when the wait ends or is abandoned.
                        let guard = LoanGuard {
                            listener: Arc::clone(&self.listener),
                            wake: Arc::clone(&self.wake),
                        };
                        self.with_filter_lending(index, |vm, context| {
                            lend_to(vm, context, header, lend);
                            if trailers {
                                set_body(vm, context, Some(std::mem::take(&mut held)));
                            }
                        });
                        let outcome = match read_ahead.as_deref_mut() {
                            Some(reader) if action == HeadersAction::Pause => {
                                let mut lend_header = |vm: &mut Vm, context: ContextId| {
                                    lend_to(vm, context, header, lend);
                                };
                                self.wait_reading(index, position, reader, &mut lend_header)
                                    .await
                            }
                            // Held otherwise while the body is read ahead (no body callback
                            // comes meanwhile): the client is watched as the read would.
                            Some(reader) => tokio::select! {
                                biased;
                                outcome = self.wait(index, Some(direction)) => outcome,
                                () = reader.client_gone() => Outcome::Close,
                            },
                            None => self.wait(index, Some(direction)).await,
                        };
                        drop(guard);
                        if trailers {
                            held = self
                                .with_filter_lending(index, |vm, context| {
                                    set_body(vm, context, None)
                                })
                                .flatten()
                                .unwrap_or_default();
                        }
                        if let other @ (Outcome::Reply(_) | Outcome::Close) = outcome {
                            return (other, flushed);
                        }
                    }
                },
            }
            if !held.is_empty() {
                // The body this plugin let go: one more chunk for the plugins after it.
                if let Some(outcome) =
                    self.pass_on_let_go(direction, position + 1, held, &mut flushed)
                {
                    return (outcome, flushed);
                }
            }
        }
        (Outcome::Continue, flushed)
    }

    /// `body`, which a plugin let go in a trailers phase, as one more chunk through the plugins
    /// from the `from`th on: what they pass joins `flushed`; `Some` if the stream ends instead.
    fn pass_on_let_go(
        &mut self,
        direction: Direction,
        from: usize,
        body: Vec<u8>,
        flushed: &mut Vec<u8>,
    ) -> Option<Outcome> {
        match self.body_from(direction, from, body, false) {
            Ok(BodyStep::Pass(data)) => {
                flushed.extend(data);
                None
            }
            Ok(BodyStep::Buffered) => None,
            // Only a last chunk is held, and this one is not the last.
            Ok(BodyStep::Held { .. }) => Some(Outcome::Reply(Reply::fail_closed(None))),
            Err(outcome) => Some(outcome),
        }
    }

    /// Waits until filter `index` asks for something for its stream, or its VM fails (then
    /// the plugin's failure policy decides), or the stream's idle timeout passes without
    /// either (a 408, as Envoy's `stream_idle_timeout` answers a stream held that long). What
    /// the plugin asked is read without taking back the header lent across the wait; a
    /// wake-up left from earlier only costs a look.
    async fn wait(&mut self, index: usize, direction: Option<Direction>) -> Outcome {
        // Counted from the start of the hold: a wake-up that decides nothing (another plugin's
        // continue, a call's answer that leaves the stream held) is no activity on the stream.
        let idle_at = idle_deadline(self.idle_timeout);
        loop {
            let looked = self.with_filter_lending(index, |vm, context| {
                (take_asked(vm, context), vm.is_failed())
            });
            let Some((asked, failed)) = looked else {
                return Outcome::Reply(Reply::fail_closed(Some(&*self.filters[index].name)));
            };
            if let Some(outcome) = acted(asked, direction) {
                return outcome;
            }
            if failed {
                let error = VmError::Failed("the VM failed while holding the stream".into());
                return self.failed(index, &error);
            }
            if let Some(outcome) = self.others_decided(index) {
                return outcome;
            }
            let woken = self.wake.notified();
            match idle_at {
                Some(at) => {
                    if tokio::time::timeout_at(at, woken).await.is_err() {
                        tracing::debug!(
                            plugin = %self.filters[index].name,
                            timeout = ?self.idle_timeout,
                            "a plugin held the stream past the stream idle timeout: 408"
                        );
                        return Outcome::Reply(Reply::status(408, "stream_idle_timeout"));
                    }
                }
                None => woken.await,
            }
        }
    }

    /// What the chain's plugins other than filter `index`, which holds the stream, decided
    /// meanwhile from outside their callbacks (e.g. in a callout's answer): a reply or a close,
    /// which Envoy acts on at once whoever holds the stream, or their VM's failure (their
    /// failure policy: one failing open is bypassed from now on). `None`: the wait goes on.
    fn others_decided(&mut self, index: usize) -> Option<Outcome> {
        if self.kind != Kind::Http {
            return None;
        }
        for other in 0..self.filters.len() {
            if other == index || self.filters[other].skipped() {
                continue;
            }
            let looked = self.with_filter_lending(other, |vm, context| {
                let ends = slot(vm, context)
                    .is_some_and(|slot| slot.asked.closed || slot.asked.local_reply.is_some());
                let asked = if ends {
                    take_asked(vm, context)
                } else {
                    Asked::default()
                };
                (asked, vm.is_failed())
            });
            let Some((asked, failed)) = looked else {
                continue;
            };
            if let Some(outcome) = acted(
                Asked {
                    continued: false,
                    ..asked
                },
                None,
            ) {
                return Some(outcome);
            }
            if failed {
                let error =
                    VmError::Failed("the VM failed while another plugin held the stream".into());
                match self.failed(other, &error) {
                    Outcome::Continue => {}
                    outcome => return Some(outcome),
                }
            }
        }
        None
    }

    /// As [`Stream::wait`], for filter `index` (at `position` in chain order) holding the
    /// request headers with `StopIteration` while `reader` reads the body ahead: each chunk
    /// goes through the plugins up to this one, each lent the header by `lend_header` for its
    /// callback. The wait ends when the plugin continues the stream or lets a chunk through,
    /// answers or closes it, or fails; what it keeps of the body then goes on from the next
    /// plugin (`reader.pending`).
    async fn wait_reading(
        &mut self,
        index: usize,
        position: usize,
        reader: &mut ReadAhead<'_>,
        lend_header: &mut LendHeader<'_>,
    ) -> Outcome {
        // Lent again through `lend_header`, which holds the header's borrow now, before
        // anything awaits: the caller's loan came from a borrow that this one ended.
        self.with_filter_lending(index, |vm, context| lend_header(vm, context));
        if reader.send_continue().await.is_err() {
            return Outcome::Close;
        }
        // What an earlier plugin let through when it let the headers go comes to this one first.
        if let Some(pending) = reader.pending.take() {
            if let Some(outcome) = self
                .read_ahead_step(index, position, reader, pending, lend_header)
                .await
            {
                return self.let_go_after_pause(index, position, reader, outcome);
            }
        }
        let wake = Arc::clone(&self.wake);
        // Counted from the last chunk read: only data is activity on the stream (see `wait`).
        let mut idle_at = idle_deadline(self.idle_timeout);
        loop {
            // Lent again before every wait: a body callback took the header back from this
            // plugin, and lending it to another made this loan stale.
            let looked = self.with_filter_lending(index, |vm, context| {
                lend_header(vm, context);
                (take_asked(vm, context), vm.is_failed())
            });
            let Some((asked, failed)) = looked else {
                return Outcome::Reply(Reply::fail_closed(Some(&*self.filters[index].name)));
            };
            if let Some(outcome) = acted(asked, Some(Direction::Request)) {
                return self.let_go_after_pause(index, position, reader, outcome);
            }
            if failed {
                let error = VmError::Failed("the VM failed while holding the stream".into());
                let outcome = self.failed(index, &error);
                return self.let_go_after_pause(index, position, reader, outcome);
            }
            if let Some(outcome) = self.others_decided(index) {
                return outcome;
            }
            enum Event {
                Woken,
                Read(Result<Option<(Vec<u8>, bool)>, ReadFailure>),
                ClientGone,
                Idle,
            }
            let idle = self.idle_timeout;
            let readable = reader.may_read();
            let event = tokio::select! {
                biased;
                () = wake.notified() => Event::Woken,
                // A read notices a client that goes; once reading has stopped, a watch does.
                event = async {
                    if readable {
                        Event::Read(reader.read().await)
                    } else {
                        reader.client_gone().await;
                        Event::ClientGone
                    }
                } => event,
                () = async {
                    match idle_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => Event::Idle,
            };
            if matches!(event, Event::Read(Ok(_))) {
                idle_at = idle_deadline(idle);
            }
            match event {
                Event::Woken => {}
                Event::Read(Err(ReadFailure::TimedOut)) => {
                    return Outcome::Reply(Reply::status(408, "stream_idle_timeout"));
                }
                // The stream ends with the reader's error.
                Event::Read(Err(ReadFailure::Failed)) | Event::ClientGone => return Outcome::Close,
                // Nothing more is read ahead (trailers follow).
                Event::Read(Ok(None)) => {}
                Event::Read(Ok(Some((data, end)))) => {
                    let chunk = Pending {
                        start: 0,
                        data,
                        end,
                    };
                    if let Some(outcome) = self
                        .read_ahead_step(index, position, reader, chunk, lend_header)
                        .await
                    {
                        return self.let_go_after_pause(index, position, reader, outcome);
                    }
                }
                Event::Idle => {
                    tracing::debug!(
                        plugin = %self.filters[index].name,
                        timeout = ?idle,
                        "a plugin held the stream past the stream idle timeout: 408"
                    );
                    return Outcome::Reply(Reply::status(408, "stream_idle_timeout"));
                }
            }
        }
    }

    /// Runs a chunk read ahead (or left by an earlier pause) through the plugins up to filter
    /// `holder` at `position`, which holds the headers. `None` while that one still holds the
    /// stream: the chunk is buffered (by it or before it), or it holds the body's end.
    /// `Continue` once it let the chunk through (what passed is left in `reader.pending`).
    async fn read_ahead_step(
        &mut self,
        holder: usize,
        position: usize,
        reader: &mut ReadAhead<'_>,
        chunk: Pending,
        lend_header: &mut LendHeader<'_>,
    ) -> Option<Outcome> {
        let Pending {
            mut start,
            mut data,
            end,
        } = chunk;
        loop {
            let step = self.body_through(
                Direction::Request,
                start,
                position + 1,
                data,
                end,
                Some((holder, &mut *lend_header)),
            );
            match step {
                Err(outcome) => return Some(outcome),
                Ok(BodyStep::Buffered) => return None,
                Ok(BodyStep::Pass(data)) => {
                    reader.pending = Some(Pending {
                        start: position + 1,
                        data,
                        end,
                    });
                    return Some(Outcome::Continue);
                }
                // The plugin holding the headers holds the whole body too: its continue lets
                // both go.
                Ok(BodyStep::Held { position: at, .. }) if at == position => return None,
                // An earlier plugin holds the body's end: on to this one once it continues.
                Ok(BodyStep::Held {
                    position: at,
                    index,
                }) => {
                    // The holder's loan is made fresh for the wait (lending the header to the
                    // plugins before it made the last one stale), as its callout's answer may
                    // edit the headers meanwhile.
                    self.with_filter_lending(holder, |vm, context| lend_header(vm, context));
                    let released = tokio::select! {
                        biased;
                        released = self.released_body(index) => released,
                        () = reader.client_gone() => Err(Outcome::Close),
                    };
                    data = match released {
                        Ok(data) => data,
                        Err(outcome) => return Some(outcome),
                    };
                    start = at + 1;
                }
            }
        }
    }

    /// Once filter `index` (at `position`) lets the request headers go after holding them
    /// while the body was read ahead, what it kept of the body goes on from the next plugin
    /// (as Envoy continues with the data a filter buffered): the whole body if it held the
    /// body's end, else what it buffered. Returns `outcome`.
    fn let_go_after_pause(
        &mut self,
        index: usize,
        position: usize,
        reader: &mut ReadAhead<'_>,
        outcome: Outcome,
    ) -> Outcome {
        if !matches!(outcome, Outcome::Continue) || reader.pending.is_some() {
            return outcome;
        }
        let held_end = self
            .with_filter_lending(index, |vm, context| set_body(vm, context, None))
            .flatten();
        let (data, end) = match held_end {
            Some(body) => (body, true),
            None => (std::mem::take(&mut self.filters[index].request_body), false),
        };
        if end || !data.is_empty() {
            reader.pending = Some(Pending {
                start: position + 1,
                data,
                end,
            });
        }
        outcome
    }

    /// Runs the response body callbacks over one chunk: each plugin sees the chunk (after what
    /// it buffered) and may change it, buffer it or let it through. Returns what goes on
    /// (nothing while a plugin buffers) or how the stream ends.
    pub(crate) fn response_body(
        &mut self,
        chunk: Vec<u8>,
        end_of_stream: bool,
    ) -> Result<Vec<u8>, Outcome> {
        match self.body_from(Direction::Response, 0, chunk, end_of_stream)? {
            BodyStep::Pass(data) => Ok(data),
            BodyStep::Buffered => Ok(Vec::new()),
            // Only a request is held on its last chunk (a response cannot wait: Pingora's
            // response body filter is synchronous, so `body_from` lets its last chunk go on).
            BodyStep::Held { .. } => Err(Outcome::Reply(Reply::fail_closed(None))),
        }
    }

    /// The request body callbacks over one chunk: as [`Stream::response_body`], and a plugin that stops
    /// on the last chunk holds the request there (e.g. to check the whole body elsewhere)
    /// until it continues it, answers it or closes it.
    pub(crate) async fn request_body(
        &mut self,
        chunk: Vec<u8>,
        end_of_stream: bool,
    ) -> Result<Vec<u8>, Outcome> {
        self.request_body_from(0, chunk, end_of_stream).await
    }

    /// [`Stream::request_body`] for a chunk that went through the plugins before the `start`th
    /// (in chain order) already: a body read ahead while a plugin held the headers.
    pub(crate) async fn request_body_from(
        &mut self,
        start: usize,
        chunk: Vec<u8>,
        end_of_stream: bool,
    ) -> Result<Vec<u8>, Outcome> {
        let mut start = start;
        let mut data = chunk;
        loop {
            match self.body_from(Direction::Request, start, data, end_of_stream)? {
                BodyStep::Pass(data) => return Ok(data),
                BodyStep::Buffered => return Ok(Vec::new()),
                BodyStep::Held { position, index } => {
                    data = self.released_body(index).await?;
                    start = position + 1;
                }
            }
        }
    }

    /// Waits until filter `index`, holding the request body's end, continues the stream;
    /// returns the body as the plugin left it, for the plugins after it.
    async fn released_body(&mut self, index: usize) -> Result<Vec<u8>, Outcome> {
        match self.wait(index, Some(Direction::Request)).await {
            Outcome::Continue => {}
            other => return Err(other),
        }
        Ok(self
            .with_filter_lending(index, |vm, context| set_body(vm, context, None))
            .flatten()
            .unwrap_or_default())
    }

    /// Runs the body callbacks from the `start`th plugin of the chain in `direction`.
    fn body_from(
        &mut self,
        direction: Direction,
        start: usize,
        chunk: Vec<u8>,
        end_of_stream: bool,
    ) -> Result<BodyStep, Outcome> {
        let limit = self.filters.len();
        self.body_through(direction, start, limit, chunk, end_of_stream, None)
    }

    /// Runs the body callbacks of the plugins from the `start`th to before the `limit`th of the
    /// chain in `direction`; `Pass` is what went through them. `held_headers`, while a
    /// plugin holds the request headers (its filter index, and how to lend them), lends each
    /// plugin the request header for its callback (a body callback may still edit them, as
    /// in Envoy).
    fn body_through(
        &mut self,
        direction: Direction,
        start: usize,
        limit: usize,
        chunk: Vec<u8>,
        end_of_stream: bool,
        mut held_headers: Option<(usize, &mut LendHeader<'_>)>,
    ) -> Result<BodyStep, Outcome> {
        let order: Vec<usize> = match direction {
            Direction::Request => (0..self.filters.len()).collect(),
            Direction::Response => (0..self.filters.len()).rev().collect(),
        };
        let mut data = chunk;
        for (position, index) in order.into_iter().enumerate().take(limit).skip(start) {
            if self.filters[index].skipped() {
                // Bypassed (failed open) while it buffered: what it kept goes on first.
                if self.filters[index].bypassed {
                    let mut kept = std::mem::take(self.filters[index].buffered(direction));
                    if !kept.is_empty() {
                        kept.extend_from_slice(&data);
                        data = kept;
                    }
                }
                continue;
            }
            let mut body = std::mem::take(self.filters[index].buffered(direction));
            body.extend_from_slice(&data);
            let kind = self.kind;
            // A continue the holder of the headers asks for meanwhile is for its hold.
            let holds_headers = held_headers
                .as_ref()
                .is_some_and(|(holder, _)| *holder == index);
            let lend = held_headers.as_mut().map(|(_, lend)| &mut **lend);
            let result = self.with_filter(index, |vm, context| {
                // A TCP connection's continues asked outside its callbacks are taken before
                // the data it reads goes through the plugins (`resume`, see `tcp.rs`): one
                // left now was asked while the plugin held nothing (e.g. while a filter after
                // it held the new connection).
                if !holds_headers {
                    forget_stale_continue(vm, context);
                }
                if let Some(lend) = lend {
                    lend(vm, context);
                }
                let len = body.len();
                set_body(vm, context, Some(body));
                let result = match (kind, direction) {
                    (Kind::Http, Direction::Request) => {
                        vm.on_request_body(context, len, end_of_stream)
                    }
                    (Kind::Http, Direction::Response) => {
                        vm.on_response_body(context, len, end_of_stream)
                    }
                    (Kind::Tcp, Direction::Request) => {
                        vm.on_downstream_data(context, len, end_of_stream)
                    }
                    (Kind::Tcp, Direction::Response) => {
                        vm.on_upstream_data(context, len, end_of_stream)
                    }
                };
                let body = set_body(vm, context, None).unwrap_or_default();
                (result, body, take_asked(vm, context))
            });
            let Some((result, body, asked)) = result else {
                return Err(Outcome::Reply(Reply::fail_closed(Some(
                    &*self.filters[index].name,
                ))));
            };
            match result {
                Err(error) => match self.failed(index, &error) {
                    Outcome::Continue => {
                        // Failed open: what it held the other way goes on too.
                        self.filters[index].release = [true; 2];
                        data = body;
                        continue;
                    }
                    other => return Err(other),
                },
                Ok(action) => {
                    if asked.closed {
                        return Err(Outcome::Close);
                    }
                    if let Some(reply) = asked.local_reply.filter(|_| self.kind == Kind::Http) {
                        return Err(Outcome::Reply(Reply::from_local(reply)));
                    }
                    let waited_for = end_of_stream || holds_headers;
                    if self.kind == Kind::Http
                        && direction == Direction::Request
                        && asked.continued
                        && asked.continued_sides[Direction::Request.index()]
                        && action != DataAction::Continue
                        && waited_for
                    {
                        // It continued the stream from inside the callback that stops it (or,
                        // holding the headers, while it held them; an older continue was
                        // forgotten before the callback): the wait for its continue that
                        // follows (it holds the body's end, or the headers) finds it. Kept for
                        // no other wait: a later one would take it for a continue of its own.
                        self.with_filter_lending(index, |vm, context| {
                            if let Some(slot) = slot(vm, context) {
                                slot.asked.continued = true;
                                slot.asked.continued_sides[Direction::Request.index()] = true;
                            }
                        });
                    }
                    let continued = self.kind == Kind::Tcp
                        && asked.continued
                        && asked.continued_sides[direction.index()];
                    if self.kind == Kind::Tcp {
                        // A continue of the other direction is for what it holds there.
                        let filter = &mut self.filters[index];
                        for (release, continued) in
                            filter.release.iter_mut().zip(asked.continued_sides)
                        {
                            *release |= continued;
                        }
                    }
                    if end_of_stream && action != DataAction::Continue && !continued {
                        match self.kind {
                            Kind::Http if direction == Direction::Request => {
                                // Held with the whole body readable (and replaceable)
                                // meanwhile.
                                self.with_filter_lending(index, |vm, context| {
                                    set_body(vm, context, Some(body));
                                });
                                return Ok(BodyStep::Held { position, index });
                            }
                            Kind::Tcp => {
                                // Held until the plugin continues it (`resume`); the other
                                // direction flows meanwhile.
                                let filter = &mut self.filters[index];
                                *filter.buffered(direction) = body;
                                filter.held_end[direction.index()] = true;
                                return Ok(BodyStep::Held { position, index });
                            }
                            Kind::Http => {}
                        }
                    }
                    let action = if continued {
                        DataAction::Continue
                    } else {
                        action
                    };
                    if action == DataAction::Continue || end_of_stream {
                        data = body;
                    } else {
                        // Buffered (or held) by the plugin until a later chunk. Over the limit
                        // an HTTP stream fails; a TCP connection stops reading that side
                        // instead (see `held`).
                        if body.len() > self.buffer_limit && self.kind == Kind::Http {
                            // Envoy's codes and details for a buffer over its limit.
                            let reply = match direction {
                                Direction::Request => {
                                    Reply::status(413, "request_payload_too_large")
                                }
                                Direction::Response => {
                                    Reply::status(500, "response_payload_too_large")
                                }
                            };
                            return Err(Outcome::Reply(reply));
                        }
                        *self.filters[index].buffered(direction) = body;
                        return Ok(BodyStep::Buffered);
                    }
                }
            }
        }
        Ok(BodyStep::Pass(data))
    }

    /// TCP: `proxy_on_new_connection` for every plugin, in chain order. A plugin that pauses
    /// holds the connection there (the upstream is not dialled) until it continues it, as
    /// Envoy's filter chain stops before its `tcp_proxy`. `Close` if a plugin closed the
    /// connection or failed closed.
    pub(crate) async fn new_connection(&mut self) -> Outcome {
        for index in 0..self.filters.len() {
            if self.filters[index].skipped() {
                continue;
            }
            let result = self.with_filter(index, |vm, context| {
                (vm.on_new_connection(context), take_asked(vm, context))
            });
            let Some((result, asked)) = result else {
                return Outcome::Close;
            };
            match result {
                Err(error) => {
                    if let Outcome::Reply(_) | Outcome::Close = self.failed(index, &error) {
                        return Outcome::Close;
                    }
                }
                Ok(_) if asked.closed => return Outcome::Close,
                Ok(DataAction::Continue) => {}
                Ok(_) if asked.continued => {}
                Ok(_) => match self.wait(index, None).await {
                    Outcome::Continue => {}
                    _ => return Outcome::Close,
                },
            }
        }
        Outcome::Continue
    }

    /// TCP: runs one chunk from downstream (`Request`) or upstream (`Response`), `end` when
    /// that side has no more, through the network filters; returns what goes on, and whether
    /// the connection closes.
    pub(crate) fn tcp_data(&mut self, direction: Direction, chunk: Vec<u8>, end: bool) -> TcpStep {
        let mut step = TcpStep::default();
        match self.body_from(direction, 0, chunk, end) {
            Ok(BodyStep::Pass(data)) => step.forwards = forward(direction, data, end),
            Ok(BodyStep::Buffered | BodyStep::Held { .. }) => {}
            Err(_) => return TcpStep::closed(),
        }
        self.release(&mut step);
        step
    }

    /// TCP: what the plugins asked outside their callbacks (a callout's answer, a tick): data
    /// a plugin held goes on once it continues that direction (from the next plugin on), or
    /// the connection closes. A plugin whose VM failed meanwhile gets its failure policy.
    pub(crate) fn resume(&mut self) -> TcpStep {
        for index in 0..self.filters.len() {
            if self.filters[index].skipped() {
                continue;
            }
            let looked = self.with_filter(index, |vm, context| {
                (take_asked(vm, context), vm.is_failed())
            });
            let Some((asked, failed)) = looked else {
                return TcpStep::closed();
            };
            if asked.closed {
                return TcpStep::closed();
            }
            let filter = &mut self.filters[index];
            for (release, continued) in filter.release.iter_mut().zip(asked.continued_sides) {
                *release |= continued;
            }
            let holds = !filter.request_body.is_empty()
                || !filter.response_body.is_empty()
                || filter.held_end.contains(&true);
            if failed && holds {
                let error = VmError::Failed("the VM failed while holding the connection".into());
                match self.failed(index, &error) {
                    Outcome::Continue => self.filters[index].release = [true; 2],
                    _ => return TcpStep::closed(),
                }
            }
        }
        let mut step = TcpStep::default();
        self.release(&mut step);
        step
    }

    /// TCP: bytes the plugins hold of the data in `direction` (the connection stops reading
    /// that side at the buffer limit, as Envoy's watermarks do).
    pub(crate) fn held(&self, direction: Direction) -> usize {
        self.filters
            .iter()
            .map(|filter| match direction {
                Direction::Request => filter.request_body.len(),
                Direction::Response => filter.response_body.len(),
            })
            .sum()
    }

    /// TCP: passes on what each plugin marked for release holds, from the next plugin on,
    /// until no mark is left (a plugin further on may hold it again, or let more go), adding
    /// to `step`; a plugin closing the connection meanwhile ends it there.
    fn release(&mut self, step: &mut TcpStep) {
        // Each round clears a mark; a mark is only set again by a callback that got data.
        for _ in 0..=4 * self.filters.len() {
            let marked = self.filters.iter().enumerate().find_map(|(index, filter)| {
                [Direction::Request, Direction::Response]
                    .into_iter()
                    .find(|d| filter.release[d.index()])
                    .map(|direction| (index, direction))
            });
            let Some((index, direction)) = marked else {
                return;
            };
            let filter = &mut self.filters[index];
            filter.release[direction.index()] = false;
            let end = std::mem::take(&mut filter.held_end[direction.index()]);
            let data = std::mem::take(filter.buffered(direction));
            if data.is_empty() && !end {
                continue;
            }
            let position = match direction {
                Direction::Request => index,
                Direction::Response => self.filters.len() - 1 - index,
            };
            match self.body_from(direction, position + 1, data, end) {
                Ok(BodyStep::Pass(data)) => step.forwards.extend(forward(direction, data, end)),
                Ok(BodyStep::Buffered | BodyStep::Held { .. }) => {}
                Err(_) => {
                    step.close = true;
                    return;
                }
            }
        }
    }

    /// Updates what every plugin of the stream knows of it (for Envoy's attributes), in one
    /// pass over the chain.
    pub(crate) fn update_info(&self, update: impl Fn(&mut abi::StreamInfo)) {
        let Some(generation) = self.generation else {
            return;
        };
        let filters = &self.filters;
        with_workers(&self.listener, |workers| {
            let Some(worker) = workers.worker(generation) else {
                return;
            };
            for filter in filters {
                let Some(stream) = &filter.stream else {
                    continue;
                };
                if let Some(slot) = worker.vm(stream).and_then(|vm| slot(vm, filter.context)) {
                    update(&mut slot.info);
                }
            }
        });
    }

    /// The stream is over: `proxy_on_log` (with the request and response headers and the
    /// response trailers readable, when given, and what `last` adds to what the plugins know of
    /// the stream), `proxy_on_done` and `proxy_on_delete` for every plugin, then the contexts
    /// and VM holds go. The headers are lent read-only, as the proxy has them (no copy): the
    /// ABI refuses edits in `proxy_on_log`, as Envoy's access-log phase does.
    pub(crate) fn end(
        &mut self,
        request: Option<&RequestHeader>,
        response: Option<&ResponseHeader>,
        trailers: Option<&http::HeaderMap>,
        last: &dyn Fn(&mut abi::StreamInfo),
    ) {
        let Some(generation) = self.generation else {
            return;
        };
        // While unwinding (a panic on the way, e.g. from these very callbacks, after which
        // `Drop` comes here again), no plugin code runs: the contexts and holds only go.
        let call_plugins = !std::thread::panicking();
        for index in 0..self.filters.len() {
            if self.filters[index].skipped() || !call_plugins {
                continue;
            }
            let (kind, closed_by, transferred) = (self.kind, self.closed_by, self.transferred);
            let outcome = self.with_filter(index, |vm, context| {
                if let Some(slot) = slot(vm, context) {
                    // Only what is lent now: nothing from an abandoned wait.
                    slot.body = None;
                    slot.request = request.map(|header| {
                        // SAFETY: `with_filter` takes the loan back before it returns (or
                        // unwinds), within the borrow of `request`.
                        unsafe { Lent::read_only(header) }
                    });
                    slot.response = response.map(|header| {
                        // SAFETY: as for `request`.
                        unsafe { Lent::read_only(header) }
                    });
                    slot.trailers = trailers.map(|map| {
                        // SAFETY: as for `request`.
                        unsafe { Lent::read_only(map) }
                    });
                    if kind == Kind::Tcp {
                        slot.info.bytes_received = Some(transferred[0]);
                        slot.info.bytes_sent = Some(transferred[1]);
                    }
                    last(&mut slot.info);
                }
                match kind {
                    Kind::Http => vm
                        .on_log(context)
                        .and_then(|()| vm.on_done(context).map(|_| ()))
                        .and_then(|()| vm.on_delete(context)),
                    // Envoy ends a connection with both closes, then on_done before on_log.
                    Kind::Tcp => vm
                        .on_downstream_connection_close(context, closed_by[0])
                        .and_then(|()| vm.on_upstream_connection_close(context, closed_by[1]))
                        .and_then(|()| vm.on_done(context).map(|_| ()))
                        .and_then(|()| vm.on_log(context))
                        .and_then(|()| vm.on_delete(context)),
                }
            });
            if let Some(Err(error)) = outcome {
                tracing::error!(
                    plugin = %self.filters[index].name,
                    "plugin failed at the end of a stream: {error}"
                );
                let plugin = self.filters[index].plugin;
                with_workers(&self.listener, |workers| {
                    workers.worker(generation).map(|w| w.failed(plugin, &error))
                });
            }
        }
        self.generation = None;
        let filters = std::mem::take(&mut self.filters);
        self.listener
            .metrics
            .live_contexts
            .dec_by(filters.len() as i64);
        with_workers(&self.listener, |workers| {
            if let Some(worker) = workers.worker(generation) {
                for filter in filters {
                    let Some(stream) = filter.stream else {
                        continue;
                    };
                    if let Some(host) = worker.vm(&stream).and_then(|vm| vm.host_as::<ServeHost>())
                    {
                        host.streams.remove(&filter.context.0);
                    }
                    worker.release(stream);
                }
            }
            workers.stream_ended(generation);
        });
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // A stream dropped before its logging phase (a client gone mid-way) still ends its
        // contexts: nothing is left live in the VM.
        self.end(None, None, None, &|_| {});
    }
}

/// Takes back every header a stream (known by its [`Notify`]) lent to its slots on this thread
/// when dropped: a header lent across a wait must not outlive the wait, even one abandoned
/// because the client went away.
struct LoanGuard {
    listener: Arc<Listener>,
    wake: Arc<Notify>,
}

impl Drop for LoanGuard {
    fn drop(&mut self) {
        let take_back = |vm: &mut abi::Vm| {
            let Some(host) = vm.host_as::<ServeHost>() else {
                return;
            };
            for slot in host.streams.values_mut() {
                if Arc::ptr_eq(&slot.wake, &self.wake) {
                    slot.request = None;
                    slot.response = None;
                    slot.trailers = None;
                }
            }
        };
        with_workers(&self.listener, |workers| {
            workers.for_each_worker(|_, worker| {
                worker.for_each_copy(|_, vm, _| take_back(vm));
                // A copy replaced while the stream waited (it failed, and another stream's
                // admission made a new one) still has the stream's slot.
                worker.for_each_replaced_copy(|_, vm| take_back(vm));
            });
        });
    }
}

/// What a TCP chain let through, if anything.
fn forward(direction: Direction, data: Vec<u8>, end: bool) -> Vec<Forward> {
    if data.is_empty() && !end {
        return Vec::new();
    }
    vec![Forward {
        direction,
        data,
        end,
    }]
}

/// Creates the plugin's context for a new stream and gives it a slot in the copy's host.
fn open(
    worker: &mut Worker,
    stream: &StreamVm,
    name: &Arc<str>,
    wake: &Arc<Notify>,
    info: &abi::StreamInfo,
    kind: Kind,
) -> Result<ContextId, VmError> {
    let vm = worker
        .vm(stream)
        .ok_or_else(|| VmError::Failed("the VM copy went away".into()))?;
    let context = match kind {
        Kind::Http => vm.create_http_context_for(stream.root())?,
        Kind::Tcp => vm.create_tcp_context_for(stream.root())?,
    };
    if let Some(host) = vm.host_as::<ServeHost>() {
        host.roots
            .entry(stream.root().0)
            .or_insert_with(|| Arc::clone(name));
        host.streams.insert(
            context.0,
            StreamSlot {
                plugin: Arc::clone(name),
                wake: Arc::clone(wake),
                request: None,
                response: None,
                trailers: None,
                body: None,
                info: info.clone(),
                asked: Asked::default(),
            },
        );
    }
    Ok(context)
}

fn slot(vm: &mut Vm, context: ContextId) -> Option<&mut StreamSlot> {
    vm.host_as::<ServeHost>()?.streams.get_mut(&context.0)
}

/// Lends `header` to the plugin's slot (taken back by [`Stream::with_filter`]); returns the
/// number of entries it shows.
fn lend_to<H>(
    vm: &mut Vm,
    context: ContextId,
    header: &mut H,
    lend: fn(&mut StreamSlot, &mut H),
) -> usize {
    match slot(vm, context) {
        Some(slot) => {
            lend(slot, header);
            // What was just lent: trailers are lent alone, headers one map at a time.
            let trailers = slot.trailers.as_ref().map(abi::Headers::len);
            let request = slot.request.as_ref().map(abi::Headers::len);
            let response = slot.response.as_ref().map(abi::Headers::len);
            trailers.or(request).or(response).unwrap_or(0)
        }
        None => 0,
    }
}

/// Puts `body` in the slot (or takes it out, with `None`); returns what was there.
fn set_body(vm: &mut Vm, context: ContextId, body: Option<Vec<u8>>) -> Option<Vec<u8>> {
    let slot = slot(vm, context)?;
    std::mem::replace(&mut slot.body, body)
}

/// Forgets a continue the plugin of `context` asked for while it held nothing (e.g. from a
/// callout's answer once its stream went on): only one asked for in its next callback, or
/// while it holds the stream, lets the stream go on. Its replies and closes stay: they end the
/// stream whenever asked for.
fn forget_stale_continue(vm: &mut Vm, context: ContextId) {
    if let Some(slot) = slot(vm, context) {
        slot.asked.continued = false;
        slot.asked.continued_sides = [false; 2];
    }
}

fn take_asked(vm: &mut Vm, context: ContextId) -> Asked {
    slot(vm, context)
        .map(|slot| std::mem::take(&mut slot.asked))
        .unwrap_or_default()
}

/// What the plugin's requests mean for a phase of `direction` (`None`: a connection's start,
/// which any continue lets go): `None` to go on as its action says. A continue counts only for
/// the direction it names, as Envoy's continue of the request does nothing to a held response.
fn acted(asked: Asked, direction: Option<Direction>) -> Option<Outcome> {
    if asked.closed {
        return Some(Outcome::Close);
    }
    if let Some(reply) = asked.local_reply {
        return Some(Outcome::Reply(Reply::from_local(reply)));
    }
    let continued = asked.continued
        && direction.is_none_or(|direction| asked.continued_sides[direction.index()]);
    continued.then_some(Outcome::Continue)
}

/// Lends a request header to a slot, for [`Stream::headers`].
pub(crate) fn lend_request(slot: &mut StreamSlot, header: &mut RequestHeader) {
    // SAFETY: `Stream::with_filter` takes the loan back before the callback it was made for
    // returns (or unwinds), within the borrow of `header`.
    slot.request = Some(unsafe { Lent::new(header) });
}

/// Lends response trailers to a slot, for [`Stream::response_trailers`].
fn lend_trailers(slot: &mut StreamSlot, trailers: &mut http::HeaderMap) {
    // SAFETY: as in `lend_request`.
    slot.trailers = Some(unsafe { Lent::new(trailers) });
}

/// Lends a response header to a slot, for [`Stream::headers`].
pub(crate) fn lend_response(slot: &mut StreamSlot, header: &mut ResponseHeader) {
    // SAFETY: as in `lend_request`.
    slot.response = Some(unsafe { Lent::new(header) });
}

/// When a stream held from now times out after `idle` (`None`: never, also for a timeout too
/// far off to count).
fn idle_deadline(idle: Option<std::time::Duration>) -> Option<tokio::time::Instant> {
    idle.and_then(|idle| tokio::time::Instant::now().checked_add(idle))
}
