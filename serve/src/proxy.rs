//! Pingora's proxy phases mapped onto the Proxy-Wasm callbacks, for one listener.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;

use crate::admin::{HostMetrics, ListenerLabel, ResetLabels, ResponseLabels};
use crate::config::{Cluster, Limits};
use crate::connections;
use crate::drain::InFlightGuard;
use crate::header_timeout::HeaderClock;
use crate::read_ahead::ReadAhead;
use crate::stream::{lend_request, lend_response, Direction, Kind, Outcome, Reply, Stream};
use crate::worker::Listener;

/// One listener's proxy: its routes, the clusters they name, its plugin chain.
pub(crate) struct ListenerProxy {
    pub(crate) listener: Arc<Listener>,
    /// The listener's name, for metrics.
    pub(crate) name: String,
    /// The proxy's own metrics.
    pub(crate) metrics: Arc<HostMetrics>,
    /// What clients may send.
    pub(crate) limits: Limits,
}

impl ListenerProxy {
    /// Where a request goes: the first of the listener's routes it matches, by its path and
    /// host (without port).
    fn route(&self, header: &pingora::http::RequestHeader) -> Option<Route> {
        let host = header
            .uri
            .host()
            .or_else(|| {
                header
                    .headers
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
            })
            .map(without_port);
        self.listener
            .routing
            .load()
            .route(self.listener.index, header.raw_path(), host)
            .map(|entry| (Arc::clone(&entry.name), Arc::clone(&entry.cluster)))
    }
}

/// A `Host` header's host without its port; an IPv6 literal keeps its brackets, as a URI's
/// host has them (`[::1]:8080` → `[::1]`).
fn without_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// A cluster and where its next request goes.
pub(crate) struct ClusterState {
    pub(crate) name: String,
    pub(crate) cluster: Cluster,
    next: AtomicUsize,
}

impl ClusterState {
    pub(crate) fn new(name: String, cluster: Cluster) -> ClusterState {
        ClusterState {
            name,
            cluster,
            next: AtomicUsize::new(0),
        }
    }

    /// The next endpoint, round robin (a cluster has at least one).
    pub(crate) fn next_endpoint(&self) -> std::net::SocketAddr {
        let endpoints = &self.cluster.endpoints;
        let index = self.next.fetch_add(1, Ordering::Relaxed) % endpoints.len().max(1);
        endpoints[index]
    }

    /// The next endpoint's peer, round robin.
    pub(crate) fn peer(&self) -> HttpPeer {
        self.peer_at(self.next_endpoint())
    }

    /// The peer of `endpoint`, one of the cluster's.
    fn peer_at(&self, endpoint: std::net::SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(endpoint, false, String::new());
        peer.options.connection_timeout = Some(self.cluster.connect_timeout);
        peer.options.read_timeout = Some(self.cluster.request_timeout);
        if self.cluster.http2 {
            peer.options.set_http_version(2, 2);
        }
        peer
    }
}

/// The request body read ahead while a plugin held the headers (see [`crate::read_ahead`]),
/// for the body filter's first call.
struct EarlyBody {
    /// The bytes read ahead, if Pingora replays them to the body filter first (they went
    /// through the plugins already).
    replayed: Option<usize>,
    /// What went through every plugin: the body's first bytes for the upstream.
    ready: Vec<u8>,
    /// The body ended.
    end: bool,
}

/// A stream's state across the phases.
pub(crate) struct StreamContext {
    stream: Stream,
    /// The request switches protocols: its body is what comes after the upstream's 101
    /// ([`switches_protocols`]).
    switches_protocols: bool,
    /// The request's framing headers as the plugins left them, for the upstream request (the
    /// client's stay as they came: Pingora reads the client's body by them).
    upstream_framing: Option<Framing>,
    /// A reply a plugin asked for after the request headers, sent from `fail_to_proxy`.
    pending_reply: Option<Reply>,
    /// The response callbacks ran.
    response_done: bool,
    /// A reply of the proxy's or a plugin's was written whole (`send_reply`).
    replied: bool,
    /// Request body went through the plugins.
    body_seen: bool,
    /// What of the request body was read while a plugin held the headers, for the body
    /// filter's first call (see [`crate::read_ahead`]).
    early_body: Option<EarlyBody>,
    /// The request's, and the response's, headers ended their direction (no body follows):
    /// the body filter Pingora still calls with nothing is not a body, and no plugin sees it
    /// (as in Envoy, which calls no body callback for a header-only request or response).
    ended_at_headers: [bool; 2],
    /// The response header as the plugins left it, kept while trailers may come to an HTTP/2
    /// client (see `finish_before_trailers`).
    response_header: Option<ResponseHeader>,
    /// Meanwhile, the body that went on and Pingora may not have written yet.
    passed: PassedBody,
    /// The request's, and the response's, body as told to the other side: the
    /// `Content-Length` the upstream (the client) was given, and how much of the body went on
    /// so far (see [`BodyLength`]).
    body_length: [BodyLength; 2],
    /// The stream was reset at its trailers.
    reset_at_trailers: bool,
    /// A plugin's reply came after the response had begun (the upstream's header was out): the
    /// stream was reset instead.
    reply_too_late: bool,
    /// The response trailers as the plugins left them, for `proxy_on_log`.
    response_trailers: Option<http::HeaderMap>,
    /// The cluster the stream was routed to (a retry goes there too, whatever a reload did).
    cluster: Option<Arc<ClusterState>>,
    /// The route the plugins know the stream by (its name and cluster), if any.
    route: Option<Route>,
    /// When the stream began (for `request.duration`), once it has.
    started: Option<Instant>,
    /// Its connection's request headers deadline, told when the request ends.
    headers_clock: Option<Arc<HeaderClock>>,
    /// Counts the stream as in flight (for a drain) while it lives.
    _in_flight: InFlightGuard,
}

/// Whether a request is gRPC (its local replies are gRPC responses, as in Envoy):
/// `application/grpc`, or a subtype (`application/grpc+proto`) or parameters of it; not
/// gRPC-Web.
fn is_grpc(header: &pingora::http::RequestHeader) -> bool {
    header
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.as_bytes().strip_prefix(b"application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest[0] == b'+' || rest[0] == b';')
}

/// gRPC's percent-encoding of `grpc-message`: everything but printable ASCII, and `%`.
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// A reply as a gRPC request gets it, as Envoy makes it: a trailers-only response (`200`,
/// `content-type: application/grpc`, `grpc-status`: the plugin's, else the HTTP status mapped,
/// and the body as `grpc-message`), with the plugin's headers.
fn grpc_form(reply: Reply) -> Reply {
    let status = reply
        .grpc_status
        .unwrap_or_else(|| lifecycle::grpc_status_of_http(u32::from(reply.status)));
    let mut headers = vec![
        (b"content-type".to_vec(), b"application/grpc".to_vec()),
        (b"grpc-status".to_vec(), status.to_string().into_bytes()),
    ];
    if !reply.body.is_empty() {
        let message = percent_encoding::percent_encode(&reply.body, GRPC_MESSAGE).to_string();
        headers.push((b"grpc-message".to_vec(), message.into_bytes()));
    }
    headers.extend(reply.headers);
    Reply {
        status: 200,
        headers,
        body: Vec::new(),
        grpc_status: Some(status),
        details: reply.details,
    }
}

/// Sends `reply` to the client, through the response callbacks first (Envoy's local replies go
/// through the encoder filters).
async fn send_reply(session: &mut Session, ctx: &mut StreamContext, reply: Reply) -> Result<bool> {
    let grpc = is_grpc(session.req_header());
    let reply = if grpc { grpc_form(reply) } else { reply };
    let mut header = ResponseHeader::build(reply.status, Some(reply.headers.len() + 2))?;
    for (name, value) in &reply.headers {
        let lower = Bytes::from(name.to_ascii_lowercase());
        if header.append_header(lower, value.as_slice()).is_err() {
            tracing::warn!(
                header = %String::from_utf8_lossy(name),
                "a plugin's reply header is not valid HTTP: left out"
            );
        }
    }
    if !grpc {
        header.insert_header(http::header::CONTENT_LENGTH, reply.body.len().to_string())?;
        if !reply.body.is_empty() && header.headers.get(http::header::CONTENT_TYPE).is_none() {
            header.insert_header(http::header::CONTENT_TYPE, "text/plain")?;
        }
    }
    let mut body = reply.body;
    // The reply is the response, also one asked for from the response callbacks (which do
    // not run again).
    let details = reply.details;
    let received = session.as_ref().body_bytes_read() as u64;
    ctx.stream.update_info(|info| {
        info.response_code = Some(u32::from(reply.status));
        info.response_code_details = Some(details.to_string());
        info.bytes_received = Some(received);
    });
    if !ctx.response_done {
        ctx.response_done = true;
        let phase = ctx.stream.headers(
            Direction::Response,
            &mut header,
            body.is_empty(),
            lend_response,
        );
        match unless_client_gone(session, phase).await? {
            Outcome::Continue => {}
            Outcome::Close => return Err(closed()),
            // A reply asked for while answering with one: Envoy sends the first.
            Outcome::Reply(_) => {}
        }
        if !body.is_empty() {
            match ctx.stream.response_body(body, true) {
                Ok(data) => body = data,
                Err(Outcome::Close) => return Err(closed()),
                Err(_) => body = Vec::new(),
            }
            header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        }
    }
    if grpc && body.is_empty() && session.is_http2() {
        // Pingora cannot end an HTTP/2 stream with its headers: the status and message go as
        // trailers after them, which every gRPC client reads (plugins saw them as headers, as
        // in Envoy's trailers-only reply).
        let mut trailers = http::HeaderMap::new();
        for name in ["grpc-status", "grpc-message"] {
            if let Some(value) = header.remove_header(name) {
                trailers.insert(http::HeaderName::from_static(name), value);
            }
        }
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session.as_mut().write_response_trailers(trailers).await?;
        ctx.replied = true;
        return Ok(true);
    }
    session
        .write_response_header(Box::new(header), body.is_empty())
        .await?;
    // The body write ends the response even when empty: an HTTP/2 stream ends with it (the
    // header write alone leaves it open, and Pingora resets it on a failed stream's way out).
    session
        .write_response_body((!body.is_empty()).then(|| Bytes::from(body)), true)
        .await?;
    ctx.replied = true;
    Ok(true)
}

/// What marks the error of a stream a plugin closed: it is reset, not answered.
const CLOSED: ErrorType = ErrorType::Custom("a plugin closed the stream");

/// What marks the error of a stream whose client left while a plugin held it (see
/// [`client_gone`]): nothing is answered, and it is no proxy error to log (a client resetting
/// held streams would flood the log).
const CLIENT_GONE: ErrorType = ErrorType::Custom("the client left a held stream");

/// What marks the error that leaves the proxy's path for a plugin's reply (kept in the
/// stream's context and sent by `fail_to_proxy`).
const REPLIED: ErrorType = ErrorType::Custom("a plugin answered");

/// Leaves the proxy's path to answer with `reply`.
fn answer_with(ctx: &mut StreamContext, reply: Reply) -> Box<Error> {
    ctx.pending_reply = Some(reply);
    let mut error = Error::explain(REPLIED, "a plugin answered");
    error.set_retry(false);
    error
}

/// Ends an HTTP/2 response whose plugins let a buffered body go at its trailers: the body
/// must reach the client before the trailers, but Pingora writes the chunks it read together
/// (the header, body chunks, the trailers) only after filtering all of them, so this writes
/// the header (if not out yet), the body the plugins let go before and Pingora has not written
/// yet, what they let go now, and the trailers itself. What Pingora then writes of the batch
/// finds the stream ended.
async fn finish_before_trailers(
    session: &mut Session,
    ctx: &mut StreamContext,
    held: Vec<u8>,
    trailers: &mut http::HeaderMap,
) -> std::result::Result<(), String> {
    let queued = ctx.passed.unwritten(session.as_ref().body_bytes_sent());
    if session.as_ref().response_written().is_none() {
        let header = ctx
            .response_header
            .take()
            .ok_or("the response header to write before the body is gone")?;
        session
            .write_response_header(Box::new(header), false)
            .await
            .map_err(|e| format!("response header: {e}"))?;
    }
    for chunk in queued.into_iter().chain([Bytes::from(held)]) {
        session
            .write_response_body(Some(chunk), false)
            .await
            .map_err(|e| format!("response body before the trailers: {e}"))?;
    }
    session
        .as_mut()
        .write_response_trailers(std::mem::take(trailers))
        .await
        .map_err(|e| format!("response trailers: {e}"))
}

/// Why a stream ended without a whole response, as `pwhost_resets_total` labels it.
fn reset_cause(error: Option<&Error>) -> &'static str {
    let Some(error) = error else {
        return "proxy";
    };
    if *error.etype() == CLOSED {
        return "plugin";
    }
    match error.esource() {
        ErrorSource::Downstream => "client",
        ErrorSource::Upstream => "upstream",
        _ => "proxy",
    }
}

/// Runs `phase`, a part of the stream's plugin work that may hold it, until it ends or its
/// client is gone ([`client_gone`]). Then the phase is abandoned (the stream takes back what
/// it lent the plugins when its wait is dropped) and the stream ends with the client's error:
/// `logging` ends its plugin contexts as for any reset, at once rather than when the plugin
/// would have let the stream go, as Envoy resets the stream of a client that left. Pingora
/// watches a client only while it proxies, so a stream a plugin held was otherwise kept, with
/// its contexts, for as long as the plugin held it: an HTTP/2 client could reset held streams
/// and open new ones without end.
async fn unless_client_gone<T>(
    session: &mut Session,
    phase: impl std::future::Future<Output = T>,
) -> Result<T> {
    tokio::select! {
        // A phase that ends at once, as most do, never starts a watch.
        biased;
        ended = phase => Ok(ended),
        error = client_gone(session) => Err(error),
    }
}

/// Resolves, with the error its stream ends with, once the session's client is known to be
/// gone: an HTTP/2 client that reset the stream (or whose connection failed), an HTTP/1.1
/// client that closed or reset its connection (or sent more than its request, which Pingora
/// refuses the same way while it waits for an upstream). Until the request's body has been
/// read, an HTTP/1.1 connection is not read (the rest of the body waits there): only its reset
/// shows then, in the socket's TCP state.
pub(crate) async fn client_gone(session: &mut Session) -> Box<Error> {
    let session = session.as_mut();
    let why = if let Some(idle) = session.watch_h2_stream_close() {
        match idle.await {
            Ok(reason) => format!("the client reset the stream ({reason})"),
            Err(error) => format!("the client's connection failed: {error}"),
        }
    } else if session.as_http1().is_some() && session.is_body_done() {
        match session.read_body_or_idle(true).await {
            Err(error) => error.to_string(),
            Ok(_) => std::future::pending().await,
        }
    } else if session.as_http1().is_some() {
        let socket = session.stream().and_then(crate::tcp::socket_of);
        crate::tcp::reset_by_client(socket).await;
        "the client reset its connection".to_string()
    } else {
        std::future::pending().await
    };
    tracing::debug!("{why}: the stream ends, and its plugins' contexts");
    let mut error = Error::explain(CLIENT_GONE, why).into_down();
    error.set_retry(false);
    error
}

/// The error that resets a stream a plugin closed.
fn closed() -> Box<Error> {
    let mut error = Error::explain(CLOSED, "a plugin closed the stream");
    error.set_retry(false);
    error
}

/// A route a stream took: its name (empty if unnamed) and its cluster.
type Route = (Arc<str>, Arc<ClusterState>);

/// A route's name and its cluster's, as the plugins read them.
fn names(route: Option<&Route>) -> Option<(&str, &str)> {
    route.map(|(name, cluster)| (&**name, cluster.name.as_str()))
}

/// Envoy's attributes of a stream as it begins: its connection's, when it began, and the route
/// it takes as its request came (plugins may change where it goes).
fn stream_info(
    session: &Session,
    connection_id: Option<u64>,
    route: Option<&Route>,
) -> abi::StreamInfo {
    let protocol = if session.is_http2() {
        "HTTP/2"
    } else {
        "HTTP/1.1"
    };
    abi::StreamInfo {
        source_address: session.client_addr().and_then(|a| a.as_inet()).copied(),
        destination_address: session.server_addr().and_then(|a| a.as_inet()).copied(),
        connection_id,
        // No TLS.
        mtls: Some(false),
        start_time: Some(SystemTime::now()),
        protocol: Some(protocol.to_string()),
        // Body bytes so far (updated when the response comes and before `proxy_on_log`).
        bytes_received: Some(0),
        bytes_sent: Some(0),
        // As Envoy: the route's name is empty without a route; the cluster is not found.
        route_name: Some(route.map(|(name, _)| name.to_string()).unwrap_or_default()),
        cluster_name: route.map(|(_, cluster)| cluster.name.clone()),
        ..Default::default()
    }
}

/// The status a stream that failed with `error` is answered with (0: none, its connection
/// closes), and Envoy's response code details for it.
///
/// Envoy's codes: an upstream that cannot be reached, or that closes or resets the connection
/// before its response, is 503; one too slow 504; one answering what is not HTTP 502; a stream
/// a plugin closed gets no answer.
fn error_reply(error: &Error) -> (u16, &'static str) {
    match error.etype() {
        etype if *etype == CLOSED || *etype == CLIENT_GONE => (0, ""),
        ErrorType::HTTPStatus(404) => (404, "route_not_found"),
        // serve's own details, where Envoy has none to follow.
        ErrorType::HTTPStatus(code) => (*code, "proxy_error"),
        ErrorType::ConnectTimedout => (
            503,
            "upstream_reset_before_response_started{connection_timeout}",
        ),
        ErrorType::ConnectRefused | ErrorType::ConnectError
            if *error.esource() != ErrorSource::Downstream =>
        {
            (
                503,
                "upstream_reset_before_response_started{remote_connection_failure}",
            )
        }
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            if *error.esource() == ErrorSource::Upstream =>
        {
            (
                503,
                "upstream_reset_before_response_started{connection_termination}",
            )
        }
        // The client's side timed out: one that stopped sending its body gets Envoy's 408 for
        // a stream idle past its timeout; one that stopped reading cannot be answered.
        ErrorType::ReadTimedout if *error.esource() == ErrorSource::Downstream => {
            (408, "stream_idle_timeout")
        }
        ErrorType::WriteTimedout if *error.esource() == ErrorSource::Downstream => (0, ""),
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => (504, "response_timeout"),
        _ => match error.esource() {
            ErrorSource::Upstream => (
                502,
                "upstream_reset_before_response_started{protocol_error}",
            ),
            ErrorSource::Downstream => (0, ""),
            _ => (500, "proxy_error"),
        },
    }
}

/// Response body chunks that went on to Pingora, from the offset `start` of the body on, kept
/// until Pingora has written them.
#[derive(Default)]
struct PassedBody {
    start: usize,
    chunks: std::collections::VecDeque<Bytes>,
}

impl PassedBody {
    fn push(&mut self, chunk: Bytes) {
        self.chunks.push_back(chunk);
    }

    /// Forgets the chunks wholly within the first `sent` bytes of the body.
    fn written_up_to(&mut self, sent: usize) {
        while let Some(chunk) = self.chunks.front() {
            if self.start + chunk.len() > sent {
                break;
            }
            self.start += chunk.len();
            self.chunks.pop_front();
        }
    }

    /// What of the kept chunks lies beyond the first `sent` bytes of the body.
    fn unwritten(&self, sent: usize) -> Vec<Bytes> {
        let mut offset = self.start;
        let mut out = Vec::new();
        for chunk in &self.chunks {
            let end = offset + chunk.len();
            if end > sent {
                out.push(chunk.slice(sent.saturating_sub(offset).min(chunk.len())..));
            }
            offset = end;
        }
        out
    }
}

/// A request's framing headers (`Content-Length`, `Transfer-Encoding`).
#[derive(Debug, PartialEq, Eq)]
struct Framing {
    content_length: Option<http::HeaderValue>,
    transfer_encoding: Option<http::HeaderValue>,
}

impl Framing {
    fn of(header: &pingora::http::RequestHeader) -> Framing {
        Framing {
            content_length: header.headers.get(http::header::CONTENT_LENGTH).cloned(),
            transfer_encoding: header.headers.get(http::header::TRANSFER_ENCODING).cloned(),
        }
    }

    fn put_on(&self, header: &mut pingora::http::RequestHeader) -> Result<()> {
        // Never both: a message with a `Transfer-Encoding` has no `Content-Length` (RFC 9112),
        // and two framings are how requests are smuggled past a proxy. Pingora sends such a
        // body chunked.
        let content_length = match self.transfer_encoding {
            Some(_) => &None,
            None => &self.content_length,
        };
        for (name, value) in [
            (http::header::CONTENT_LENGTH, content_length),
            (http::header::TRANSFER_ENCODING, &self.transfer_encoding),
        ] {
            match value {
                Some(value) => header.insert_header(name, value.clone())?,
                None => {
                    header.remove_header(&name);
                }
            }
        }
        Ok(())
    }
}

/// A body's length as told to the side it goes to, against what the plugins let through.
/// Pingora writes a body with a `Content-Length` up to that length and drops the rest (with
/// only a warning), and a shorter one leaves the other side waiting: a plugin that changes a
/// body's length must remove the header (Envoy's rule), and one that does not has its stream
/// reset, rather than a body cut or padded out passed on as whole.
#[derive(Debug, Default)]
struct BodyLength {
    /// The `Content-Length` the other side was given, if any.
    told: Option<u64>,
    /// What went on so far.
    passed: u64,
}

impl BodyLength {
    /// The length `headers` tell, as they go to the other side.
    fn told(headers: &http::HeaderMap) -> BodyLength {
        // A chunked body's length is its chunks' (see `Framing::put_on`).
        let told = (!headers.contains_key(http::header::TRANSFER_ENCODING))
            .then(|| headers.get(http::header::CONTENT_LENGTH))
            .flatten()
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse().ok());
        BodyLength { told, passed: 0 }
    }

    /// Counts `bytes` more going on (the last of the body if `end_of_stream`): the error that
    /// resets the stream if they no longer fit the length told.
    fn passes(&mut self, bytes: usize, end_of_stream: bool, body: &str) -> Result<()> {
        let Some(told) = self.told else {
            return Ok(());
        };
        self.passed = self.passed.saturating_add(bytes as u64);
        if self.passed > told || (end_of_stream && self.passed < told) {
            tracing::error!(
                content_length = told,
                passed = self.passed,
                "a plugin changed the length of a {body} body whose Content-Length went on \
                 (a plugin that changes it must remove the header): stream reset"
            );
            // Counted once: the stream ends here.
            self.told = None;
            return Err(closed());
        }
        Ok(())
    }
}

/// Why a request's headers are over the listener's limits (Envoy's: the bytes of every name
/// and value, pseudo-headers included, and the number of headers), if they are.
fn too_large(header: &pingora::http::RequestHeader, limits: &Limits) -> Option<String> {
    let count = header.headers.len();
    if count > limits.max_headers_count as usize {
        return Some(format!(
            "{count} headers, over max_headers_count {}",
            limits.max_headers_count
        ));
    }
    let pseudo =
        ":method".len() + header.method.as_str().len() + ":path".len() + header.raw_path().len();
    let bytes: usize = header
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum::<usize>()
        + pseudo;
    let limit = limits.max_request_headers_kb as usize * 1024;
    (bytes > limit).then(|| {
        format!(
            "{bytes} bytes of headers, over max_request_headers_kb {}",
            limits.max_request_headers_kb
        )
    })
}

/// Whether the request has no body (so the request headers end the stream): Pingora knows
/// from the framing (HTTP/1) or the END_STREAM flag (HTTP/2).
fn request_ends_with_headers(session: &mut Session) -> bool {
    session.as_mut().is_body_empty()
}

/// Whether the request asks to switch protocols and has no body of its own (a WebSocket's
/// HTTP/1.1 upgrade, `Connection: upgrade` with it, as Envoy requires): the bytes after the
/// switch are its body, as Envoy carries an upgrade. `Upgrade: h2c` is not one (Envoy drops
/// it and serves the request as it is), nor is a request routed to an HTTP/2 cluster (Pingora
/// drops `Upgrade` there).
fn switches_protocols(session: &mut Session, route: Option<&Route>) -> bool {
    let headers = &session.req_header().headers;
    let h2c = headers
        .get(http::header::UPGRADE)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"h2c"));
    let connection_upgrade = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|byte| *byte == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
    let http2_upstream = route.is_some_and(|(_, cluster)| cluster.cluster.http2);
    session.as_ref().is_upgrade_req()
        && !h2c
        && connection_upgrade
        && !http2_upstream
        && session.as_mut().is_body_empty()
}

/// Whether the request switches protocols ([`switches_protocols`]) and has not yet: the end of
/// the empty body Pingora reports before the switch is not its end.
fn upgrade_pending(session: &Session, ctx: &StreamContext) -> bool {
    ctx.switches_protocols && !session.as_ref().was_upgraded()
}

#[async_trait]
impl ProxyHttp for ListenerProxy {
    type CTX = StreamContext;

    fn new_ctx(&self) -> StreamContext {
        StreamContext {
            stream: Stream::new(
                Kind::Http,
                Arc::clone(&self.listener),
                self.limits.buffer_limit_bytes,
                self.limits.stream_idle_timeout,
            ),
            switches_protocols: false,
            upstream_framing: None,
            body_seen: false,
            early_body: None,
            ended_at_headers: [false; 2],
            response_header: None,
            passed: PassedBody::default(),
            body_length: Default::default(),
            reset_at_trailers: false,
            reply_too_late: false,
            response_trailers: None,
            cluster: None,
            route: None,
            started: None,
            headers_clock: None,
            pending_reply: None,
            response_done: false,
            replied: false,
            _in_flight: self.metrics.in_flight.enter(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut StreamContext) -> Result<bool> {
        let connection = session
            .digest()
            .and_then(|digest| digest.socket_digest.as_ref())
            .map(connections::of);
        if let Some(connection) = &connection {
            // The request's headers are in: its deadline stops.
            if let Some(clock) = &connection.headers {
                clock.headers_received();
            }
            ctx.headers_clock = connection.headers.clone();
        }
        self.metrics
            .requests
            .get_or_create(&ListenerLabel {
                listener: self.name.clone(),
            })
            .inc();
        // A client that stops reading (or sending its body) holds the stream no longer than
        // this at a time.
        session.set_write_timeout(self.limits.stream_idle_timeout);
        session.set_read_timeout(self.limits.stream_idle_timeout);
        // Bad input never reaches a plugin.
        if let Some(problem) = too_large(session.req_header(), &self.limits) {
            tracing::debug!("request refused before the plugins: {problem}");
            // No plugin sees it, as in Envoy, whose codec refuses it.
            return send_reply(session, ctx, Reply::status(431, "headers_too_large")).await;
        }
        ctx.started = Some(Instant::now());
        // Where the request goes as it came, for the plugins' request callbacks (as Envoy
        // routes before its filters run); routed again once they ran (see `upstream_peer`).
        ctx.route = self.route(session.req_header());
        let connection_id = connection.map(|connection| connection.id);
        ctx.stream
            .begin(&stream_info(session, connection_id, ctx.route.as_ref()));
        if let Some(reply) = ctx.stream.early_reply.take() {
            return send_reply(session, ctx, reply).await;
        }
        ctx.switches_protocols = switches_protocols(session, ctx.route.as_ref());
        let end_of_stream = request_ends_with_headers(session) && !ctx.switches_protocols;
        ctx.ended_at_headers[0] = end_of_stream;
        let client_framing = Framing::of(session.req_header());
        let mut read_ahead = None;
        // The header leaves the session while the plugins have it, so that the body can be read
        // ahead meanwhile (Pingora set up its reading from the header already), or the client
        // watched.
        let placeholder = RequestHeader::build_no_case("GET", b"/", None)?;
        let mut header = std::mem::replace(session.req_header_mut(), placeholder);
        // An upgrade's body comes only once the upstream switched: there is none to read ahead.
        let outcome = if !end_of_stream && ctx.stream.reads_ahead() && !ctx.switches_protocols {
            let mut reader = ReadAhead::new(session, &header);
            let outcome = ctx
                .stream
                .request_headers_reading_ahead(&mut header, &mut reader)
                .await;
            let end = reader.finish();
            if end.sent_continue {
                header.remove_header(&http::header::EXPECT);
            }
            match end.error {
                Some(error) => Err(error),
                None => {
                    read_ahead = Some((end.pending, end.replayed));
                    Ok(outcome)
                }
            }
        } else {
            unless_client_gone(
                session,
                ctx.stream
                    .headers(Direction::Request, &mut header, end_of_stream, lend_request),
            )
            .await
        };
        *session.req_header_mut() = header;
        let outcome = outcome?;
        let plugins_framing = Framing::of(session.req_header());
        if plugins_framing != client_framing {
            client_framing.put_on(session.req_header_mut())?;
            ctx.upstream_framing = Some(plugins_framing);
        }
        match outcome {
            Outcome::Continue => {}
            Outcome::Reply(reply) => return send_reply(session, ctx, reply).await,
            Outcome::Close => return Err(closed()),
        }
        if let Some((pending, replayed)) = read_ahead {
            // What went through only some of the plugins goes through the rest now, as Envoy
            // passes on the data a filter kept right after the headers it held.
            let (ready, end) = match pending {
                Some(pending) => match unless_client_gone(
                    session,
                    ctx.stream
                        .request_body_from(pending.start, pending.data, pending.end),
                )
                .await?
                {
                    Ok(ready) => (ready, pending.end),
                    Err(Outcome::Reply(reply)) => return send_reply(session, ctx, reply).await,
                    Err(_) => return Err(closed()),
                },
                None => (Vec::new(), false),
            };
            if end && replayed.is_none() && !ready.is_empty() {
                // The client's body ended empty: Pingora sends the upstream request without
                // one, and the plugins' body could not follow it.
                tracing::error!(
                    bytes = ready.len(),
                    "a plugin gave a body to a request whose own ended empty while its headers \
                     were held: it cannot be sent (500)"
                );
                return send_reply(session, ctx, Reply::status(500, "proxy_error")).await;
            }
            ctx.early_body = Some(EarlyBody {
                replayed,
                ready,
                end,
            });
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut StreamContext,
    ) -> Result<()> {
        let empty = body.as_ref().is_none_or(Bytes::is_empty);
        if empty && (ctx.ended_at_headers[0] || upgrade_pending(session, ctx)) {
            return Ok(());
        }
        ctx.body_seen = true;
        let mut chunk = body.take().map(|b| b.to_vec()).unwrap_or_default();
        let mut early_data = Vec::new();
        if let Some(early) = ctx.early_body.take() {
            if let Some(read) = early.replayed {
                // Pingora's replay of what was read ahead: the plugins saw it already.
                if chunk.len() != read {
                    tracing::error!(
                        read,
                        replayed = chunk.len(),
                        "the body read ahead came back changed: stream reset"
                    );
                    return Err(closed().into_down());
                }
                chunk.clear();
            }
            early_data = early.ready;
            if early.end {
                // The body ended while it was read ahead: nothing more comes.
                ctx.body_length[0]
                    .passes(early_data.len(), true, "request")
                    .map_err(Error::into_down)?;
                *body = (!early_data.is_empty()).then(|| Bytes::from(early_data));
                return Ok(());
            }
            if chunk.is_empty() && !end_of_stream {
                ctx.body_length[0]
                    .passes(early_data.len(), false, "request")
                    .map_err(Error::into_down)?;
                *body = Some(Bytes::from(early_data));
                return Ok(());
            }
        }
        match unless_client_gone(session, ctx.stream.request_body(chunk, end_of_stream)).await? {
            Ok(data) => {
                let data = if early_data.is_empty() {
                    data
                } else {
                    early_data.extend(data);
                    early_data
                };
                ctx.body_length[0]
                    .passes(data.len(), end_of_stream, "request")
                    .map_err(Error::into_down)?;
                // Pingora reads `None` as the end of the body: while a plugin buffers, nothing
                // goes on, but the body has not ended.
                *body = (!data.is_empty() || !end_of_stream).then(|| Bytes::from(data));
                Ok(())
            }
            // The body ends here, so the upstream's request must too. Marked as the client's
            // side: on an HTTP/2 upstream Pingora passes a request body filter's error on (and
            // resets the upstream's stream) only then; any other it logs and goes on with the
            // upstream's response, leaving the upstream waiting for the rest of the body and
            // the plugin's decision unsent.
            Err(Outcome::Reply(reply)) => Err(answer_with(ctx, reply).into_down()),
            Err(_) => Err(closed().into_down()),
        }
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut StreamContext,
    ) -> Result<()> {
        // Without framing headers, Pingora frames a body it forwards itself (chunked).
        if let Some(framing) = &ctx.upstream_framing {
            framing.put_on(upstream_request)?;
        }
        // An upgrade's `Content-Length: 0` tells the request's length before the switch, not
        // of the bytes after it.
        if !ctx.ended_at_headers[0] && !ctx.switches_protocols {
            ctx.body_length[0] = BodyLength::told(&upstream_request.headers);
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut StreamContext,
    ) -> Result<Box<HttpPeer>> {
        let cluster = match &ctx.cluster {
            // A retry: the cluster the stream was routed to.
            Some(cluster) => Some(Arc::clone(cluster)),
            None => {
                // The request as the plugins left it.
                let route = self.route(session.req_header());
                let now = names(route.as_ref());
                if now != names(ctx.route.as_ref()) {
                    // The plugins changed where the request goes (as a route cache cleared
                    // by a header change in Envoy).
                    ctx.stream.update_info(|info| {
                        info.route_name = Some(now.map(|(name, _)| name).unwrap_or("").into());
                        info.cluster_name = now.map(|(_, cluster)| cluster.into());
                    });
                }
                ctx.route = route;
                ctx.route.as_ref().map(|(_, cluster)| Arc::clone(cluster))
            }
        };
        match cluster {
            Some(cluster) => {
                ctx.cluster = Some(Arc::clone(&cluster));
                let endpoint = cluster.next_endpoint();
                ctx.stream
                    .update_info(|info| info.upstream_address = Some(endpoint));
                tracing::trace!(cluster = %cluster.name, "routed");
                let mut peer = cluster.peer_at(endpoint);
                if ctx.switches_protocols {
                    // Envoy's route timeout counts from the end of the request, which an
                    // upgrade's comes only at its close: a WebSocket waits on its upstream as
                    // long as on its client, the listener's stream idle timeout.
                    peer.options.read_timeout = self.limits.stream_idle_timeout;
                }
                Ok(Box::new(peer))
            }
            None => Err(Error::explain(
                ErrorType::HTTPStatus(404),
                "no route for the request",
            )),
        }
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut StreamContext,
    ) -> Result<()> {
        let status = upstream_response.status;
        if ctx.response_done || (status.is_informational() && status.as_u16() != 101) {
            // A 100 or 103 goes before the real response: the plugins see that one.
            return Ok(());
        }
        ctx.response_done = true;
        let received = session.as_ref().body_bytes_read() as u64;
        ctx.stream.update_info(|info| {
            info.response_code = Some(u32::from(status.as_u16()));
            info.response_code_details = Some("via_upstream".to_string());
            info.bytes_received = Some(received);
        });
        // No body follows a 204 or 304, an answer to HEAD, or a declared empty one; after a
        // 101, the bytes of the protocol switched to are its body, whatever its headers say.
        let switched = status.as_u16() == 101;
        let end_of_stream = !switched
            && (matches!(status.as_u16(), 204 | 304)
                || session.req_header().method == http::Method::HEAD
                || upstream_response
                    .headers
                    .get(http::header::CONTENT_LENGTH)
                    .is_some_and(|v| v.as_bytes() == b"0"));
        ctx.ended_at_headers[1] = end_of_stream;
        let phase = ctx.stream.headers(
            Direction::Response,
            upstream_response,
            end_of_stream,
            lend_response,
        );
        match unless_client_gone(session, phase).await? {
            Outcome::Continue => {
                if !end_of_stream && !switched {
                    ctx.body_length[1] = BodyLength::told(&upstream_response.headers);
                }
                // Only an HTTP/2 upstream's response has trailers.
                let upstream_h2 = ctx.cluster.as_ref().is_some_and(|c| c.cluster.http2);
                if upstream_h2 && !end_of_stream && session.as_ref().is_http2() {
                    ctx.response_header = Some(upstream_response.clone());
                }
                Ok(())
            }
            Outcome::Close => Err(closed()),
            // The upstream's response is dropped for the reply (which skips the response
            // callbacks: they are running).
            Outcome::Reply(reply) => Err(answer_with(ctx, reply)),
        }
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut StreamContext,
    ) -> Result<Option<std::time::Duration>> {
        if ctx.ended_at_headers[1] && body.as_ref().is_none_or(Bytes::is_empty) {
            return Ok(None);
        }
        let chunk = body.take().map(|b| b.to_vec()).unwrap_or_default();
        match ctx.stream.response_body(chunk, end_of_stream) {
            Ok(data) => {
                ctx.body_length[1].passes(data.len(), end_of_stream, "response")?;
                let data = (!data.is_empty()).then(|| Bytes::from(data));
                if ctx.response_header.is_some() {
                    // Trailers may come: what goes on is kept until Pingora has written it
                    // (see `finish_before_trailers`).
                    let sent = session.as_ref().body_bytes_sent();
                    ctx.passed.written_up_to(sent);
                    if let Some(data) = &data {
                        ctx.passed.push(data.clone());
                    }
                }
                *body = data;
                Ok(None)
            }
            // The headers are gone: the response can only end here.
            Err(_) => Err(closed()),
        }
    }

    async fn response_trailer_filter(
        &self,
        session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut StreamContext,
    ) -> Result<Option<Bytes>> {
        let (outcome, held) =
            unless_client_gone(session, ctx.stream.response_trailers(trailers)).await?;
        if let Outcome::Continue = outcome {
            ctx.response_trailers = Some(trailers.clone());
            if held.is_empty() {
                return Ok(None);
            }
            // What a plugin held ends the body: within the length the client was told, or
            // the stream is reset below.
            if ctx.body_length[1]
                .passes(held.len(), true, "response")
                .is_ok()
            {
                if !session.as_ref().is_http2() {
                    // Pingora gives an HTTP/1.1 client no trailers: what a plugin held ends
                    // the body.
                    return Ok(Some(Bytes::from(held)));
                }
                match finish_before_trailers(session, ctx, held, trailers).await {
                    // The stream is over: what Pingora still writes of it (the trailers, as
                    // an empty last chunk) finds it ended.
                    Ok(()) => return Ok(Some(Bytes::new())),
                    Err(error) => tracing::warn!("{error}: stream reset"),
                }
            }
        }
        // Too late for a reply (the response header is out), and a trailers filter's error
        // does not stop Pingora from forwarding the trailers: reset the stream itself.
        tracing::debug!("stream reset at the response trailers");
        ctx.reset_at_trailers = true;
        session.as_mut().shutdown().await;
        trailers.clear();
        Ok(None)
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &StreamContext, error: &Error) -> bool {
        // A plugin's reply or reset is no proxy error (nor is Pingora failing to write the
        // rest of a stream reset at its trailers), nor is a client leaving a held stream.
        ctx.reset_at_trailers
            || matches!(
                error.etype(),
                etype if *etype == CLOSED || *etype == REPLIED || *etype == CLIENT_GONE
            )
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut StreamContext,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // A retry would send the request body through the plugins a second time.
        if ctx.body_seen
            || !session.req_header().method.is_idempotent()
            || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut StreamContext,
    ) -> FailToProxy {
        if let Some(reply) = ctx.pending_reply.take() {
            if session.response_written().is_some() {
                // The upstream's response has begun (Pingora reads a request body while the
                // response goes out): a reply now would be written into its body.
                tracing::debug!(
                    status = reply.status,
                    "a plugin's reply came after the response had begun: stream reset"
                );
                ctx.reply_too_late = true;
                return FailToProxy {
                    error_code: 0,
                    can_reuse_downstream: false,
                };
            }
            let status = reply.status;
            if let Err(error) = send_reply(session, ctx, reply).await {
                tracing::debug!("could not answer the client: {error}");
            }
            return FailToProxy {
                error_code: status,
                can_reuse_downstream: false,
            };
        }
        let (code, details) = error_reply(e);
        if code > 0 && !ctx.response_done {
            if let Err(error) = send_reply(session, ctx, Reply::status(code, details)).await {
                tracing::debug!("could not answer the client: {error}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut StreamContext) {
        // A request that failed before `request_filter` has no clock yet: found here, or its
        // connection, if reused, would keep the deadline of this request's first byte.
        let clock = ctx.headers_clock.take().or_else(|| {
            let socket = session.digest()?.socket_digest.as_ref()?;
            connections::of(socket).headers
        });
        // A request answered before its body was all read keeps no connection (as Pingora does
        // by default): what is left of the body must not start the next request's deadline.
        if session.as_mut().is_body_done() {
            if let Some(clock) = clock {
                clock.request_ended();
            }
        } else {
            session.set_keepalive(None);
        }
        let response = session.response_written();
        // A stream that failed after its response began (an upstream reset mid-body, a client
        // gone, a plugin closing it) is a reset for its client, not a response; so is one a
        // plugin reset at its trailers or answered too late.
        let reset_by_plugin = ctx.reset_at_trailers || ctx.reply_too_late;
        let whole = (e.is_none() || ctx.replied) && !reset_by_plugin;
        let cause = if reset_by_plugin {
            "plugin"
        } else {
            reset_cause(e)
        };
        match &response {
            Some(response) if whole => self
                .metrics
                .responses
                .get_or_create(&ResponseLabels {
                    listener: self.name.clone(),
                    code: response.status.as_u16(),
                })
                .inc(),
            _ => self
                .metrics
                .resets
                .get_or_create(&ResetLabels {
                    listener: self.name.clone(),
                    cause,
                })
                .inc(),
        };
        let (received, sent) = (
            session.as_ref().body_bytes_read() as u64,
            session.as_ref().body_bytes_sent() as u64,
        );
        let duration = ctx.started.map(|started| started.elapsed());
        // Why a stream without a whole response ended, as Envoy details it, where it does.
        let reset = match cause {
            _ if whole => None,
            "client" => Some("downstream_remote_disconnect"),
            "upstream" if ctx.response_done && !ctx.replied => {
                Some("upstream_reset_after_response_started{connection_termination}")
            }
            _ => None,
        };
        ctx.stream.end(
            Some(session.req_header()),
            response,
            ctx.response_trailers.as_ref(),
            &|info| {
                info.bytes_received = Some(received);
                info.bytes_sent = Some(sent);
                info.duration = duration;
                if let Some(details) = reset {
                    info.response_code_details = Some(details.to_string());
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_host_is_matched_without_its_port_and_an_ipv6_literal_whole() {
        for (header, host) in [
            ("example.com", "example.com"),
            ("example.com:8080", "example.com"),
            ("[::1]", "[::1]"),
            ("[::1]:8080", "[::1]"),
            ("127.0.0.1:80", "127.0.0.1"),
        ] {
            assert_eq!(without_port(header), host, "{header}");
        }
    }

    use super::*;

    #[test]
    fn the_body_kept_before_trailers_is_what_pingora_has_not_written_yet() {
        let mut passed = PassedBody::default();
        passed.push(Bytes::from_static(b"abc"));
        passed.push(Bytes::from_static(b"defg"));
        // Nothing written: all of it is still to go, in order.
        assert_eq!(passed.unwritten(0), ["abc", "defg"]);
        // Part of a chunk written: the rest of it, then the next.
        assert_eq!(passed.unwritten(2), ["c", "defg"]);
        // A chunk wholly written is forgotten.
        passed.written_up_to(3);
        assert_eq!(passed.chunks.len(), 1);
        assert_eq!(passed.unwritten(5), ["fg"]);
        passed.written_up_to(7);
        assert!(passed.unwritten(7).is_empty());
        assert!(passed.chunks.is_empty());
    }
}
