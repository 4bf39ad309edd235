//! Pingora's request and response headers (and response trailers) lent to the plugins as
//! [`abi::Headers`], read and written in place, with Envoy's pseudo-headers (`:method`,
//! `:path`, `:authority`, `:scheme`; `:status`) mapped onto the request line and the status.
//!
//! A header is lent for one synchronous callback: the proxy puts a pointer to its header in the
//! stream's slot, calls the plugin, and takes the pointer back (see [`Lent`]).

use abi::Headers;
use pingora::http::{RequestHeader, ResponseHeader};

/// A header lent for the length of a callback: writable, or only readable (`proxy_on_log`,
/// where the ABI refuses every edit, so the proxy lends what it has without a copy).
pub(crate) struct Lent<T> {
    header: *mut T,
    writable: bool,
}

// SAFETY: a `Lent` only exists while the proxy lends the header, on the thread running the
// callback (the host holding it stays on that thread: one VM copy per worker thread).
unsafe impl<T> Send for Lent<T> {}

impl<T> Lent<T> {
    /// Lends `header`, writable.
    ///
    /// # Safety
    /// The `Lent` must be dropped before `header`'s borrow ends and must not be used by
    /// anyone but the callback the header is lent to.
    pub(crate) unsafe fn new(header: &mut T) -> Lent<T> {
        Lent {
            header,
            writable: true,
        }
    }

    /// Lends `header` to be read only: every edit is refused.
    ///
    /// # Safety
    /// As [`Lent::new`], with `header`'s shared borrow.
    pub(crate) unsafe fn read_only(header: &T) -> Lent<T> {
        Lent {
            // Never written through: `get_mut` refuses a read-only loan.
            header: std::ptr::from_ref(header).cast_mut(),
            writable: false,
        }
    }

    fn get(&self) -> &T {
        // SAFETY: `new`'s (or `read_only`'s) promise: the header outlives the loan, and no one
        // writes it meanwhile.
        unsafe { &*self.header }
    }

    /// The header to edit, unless it is lent read-only (the ABI refuses a plugin's edits
    /// before they come here, so a refusal is only logged).
    fn get_mut(&mut self) -> Option<&mut T> {
        if !self.writable {
            tracing::debug!("a header lent read-only was not edited");
            return None;
        }
        // SAFETY: `new`'s promise: the loan is exclusive and the header outlives it.
        Some(unsafe { &mut *self.header })
    }
}

/// Whether a name or value could split a header (CR, LF, NUL): refused, as Envoy does.
fn is_clean(bytes: &[u8]) -> bool {
    !bytes.iter().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// A header name as HTTP/2 requires it (lower case); Pingora keeps the case for HTTP/1.
fn header_name(name: &[u8]) -> bytes::Bytes {
    bytes::Bytes::from(name.to_ascii_lowercase())
}

/// Sets the request's path, keeping the URI's scheme and authority (an HTTP/2 request's
/// `:scheme` and `:authority`); an HTTP/1 origin-form URI keeps its raw bytes.
fn set_path(header: &mut RequestHeader, path: &[u8]) -> bool {
    let (Some(scheme), Some(authority)) = (header.uri.scheme(), header.uri.authority()) else {
        return header.set_raw_path(path).is_ok();
    };
    let uri = http::Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query(path)
        .build();
    match uri {
        Ok(uri) => {
            header.set_uri(uri);
            true
        }
        Err(_) => false,
    }
}

/// Sets the request's authority: its `Host`, and the URI's authority if it has one (Pingora
/// writes the upstream `Host` from it).
fn set_authority(header: &mut RequestHeader, authority: &[u8]) -> bool {
    if header.insert_header(http::header::HOST, authority).is_err() {
        return false;
    }
    if header.uri.authority().is_none() {
        return true;
    }
    let mut parts = header.uri.clone().into_parts();
    let Ok(authority) = http::uri::Authority::try_from(authority) else {
        return false;
    };
    parts.authority = Some(authority);
    match http::Uri::from_parts(parts) {
        Ok(uri) => {
            header.set_uri(uri);
            true
        }
        Err(_) => false,
    }
}

fn refuse(name: &[u8]) {
    tracing::warn!(
        header = %String::from_utf8_lossy(name),
        "a plugin's header name or value is not valid HTTP: left out"
    );
}

/// What Pingora's request and response headers have alike: the regular (not pseudo) headers.
trait RegularHeaders {
    fn map(&self) -> &http::HeaderMap;
    fn append(&mut self, name: &[u8], value: &[u8]) -> bool;
    fn insert(&mut self, name: &[u8], value: &[u8]) -> bool;
    fn remove_named(&mut self, name: &str);
}

impl RegularHeaders for RequestHeader {
    fn map(&self) -> &http::HeaderMap {
        &self.headers
    }
    fn append(&mut self, name: &[u8], value: &[u8]) -> bool {
        self.append_header(header_name(name), value).is_ok()
    }
    fn insert(&mut self, name: &[u8], value: &[u8]) -> bool {
        self.insert_header(header_name(name), value).is_ok()
    }
    fn remove_named(&mut self, name: &str) {
        self.remove_header(name);
    }
}

impl RegularHeaders for ResponseHeader {
    fn map(&self) -> &http::HeaderMap {
        &self.headers
    }
    fn append(&mut self, name: &[u8], value: &[u8]) -> bool {
        self.append_header(header_name(name), value).is_ok()
    }
    fn insert(&mut self, name: &[u8], value: &[u8]) -> bool {
        self.insert_header(header_name(name), value).is_ok()
    }
    fn remove_named(&mut self, name: &str) {
        self.remove_header(name);
    }
}

impl RegularHeaders for http::HeaderMap {
    fn map(&self) -> &http::HeaderMap {
        self
    }
    fn append(&mut self, name: &[u8], value: &[u8]) -> bool {
        parsed(name, value)
            .map(|(name, value)| self.append(name, value))
            .is_some()
    }
    fn insert(&mut self, name: &[u8], value: &[u8]) -> bool {
        parsed(name, value)
            .map(|(name, value)| self.insert(name, value))
            .is_some()
    }
    fn remove_named(&mut self, name: &str) {
        self.remove(name);
    }
}

/// A plugin's header name and value as `http` takes them, if they are valid.
fn parsed(name: &[u8], value: &[u8]) -> Option<(http::HeaderName, http::HeaderValue)> {
    let name = http::HeaderName::from_bytes(&header_name(name)).ok()?;
    Some((name, http::HeaderValue::from_bytes(value).ok()?))
}

/// A regular header's first value.
fn regular_value<'a>(header: &'a impl RegularHeaders, name: &[u8]) -> Option<&'a [u8]> {
    let name = std::str::from_utf8(name).ok()?;
    header.map().get(name).map(|value| value.as_bytes())
}

/// Appends a regular header, refusing what is not valid HTTP.
fn add_regular(header: &mut impl RegularHeaders, name: &[u8], value: &[u8]) {
    if !is_clean(value) || !header.append(name, value) {
        refuse(name);
    }
}

/// Removes every entry of a regular header (pseudo-headers cannot go).
fn remove_regular(header: &mut impl RegularHeaders, name: &[u8]) {
    if let Ok(name) = std::str::from_utf8(name) {
        if !name.starts_with(':') {
            header.remove_named(name);
        }
    }
}

/// Removes every regular header.
fn clear_regular(header: &mut impl RegularHeaders) {
    let names: Vec<String> = header.map().keys().map(|n| n.to_string()).collect();
    for name in names {
        header.remove_named(&name);
    }
}

impl Headers for Lent<RequestHeader> {
    fn len(&self) -> usize {
        // As `for_each` shows them: the pseudo-headers, then every header but `host` (shown as
        // `:authority`).
        let header = self.get();
        let hosts = header.headers.get_all(http::header::HOST).iter().count();
        let authority = usize::from(Headers::get(self, b":authority").is_some());
        3 + authority + header.headers.len() - hosts
    }

    fn get(&self, name: &[u8]) -> Option<&[u8]> {
        let header = Lent::get(self);
        match name {
            b":method" => Some(header.method.as_str().as_bytes()),
            b":path" => Some(header.raw_path()),
            b":authority" => header
                .uri
                .authority()
                .map(|authority| authority.as_str().as_bytes())
                .or_else(|| header.headers.get(http::header::HOST).map(|v| v.as_bytes())),
            b":scheme" => Some(header.uri.scheme_str().unwrap_or("http").as_bytes()),
            _ => regular_value(header, name),
        }
    }

    fn for_each(&self, visit: &mut dyn FnMut(&[u8], &[u8])) {
        for pseudo in [&b":authority"[..], b":path", b":method", b":scheme"] {
            if let Some(value) = Headers::get(self, pseudo) {
                visit(pseudo, value);
            }
        }
        for (name, value) in self.get().headers.iter() {
            if name != http::header::HOST {
                visit(name.as_str().as_bytes(), value.as_bytes());
            }
        }
    }

    fn add(&mut self, name: &[u8], value: &[u8]) {
        if name.starts_with(b":") || name.eq_ignore_ascii_case(b"host") {
            return self.replace(name, value);
        }
        if let Some(header) = self.get_mut() {
            add_regular(header, name, value);
        }
    }

    fn replace(&mut self, name: &[u8], value: &[u8]) {
        if !is_clean(value) {
            return refuse(name);
        }
        let Some(header) = self.get_mut() else {
            return;
        };
        let done = match name {
            b":method" => http::Method::from_bytes(value)
                .map(|method| header.set_method(method))
                .is_ok(),
            b":path" => set_path(header, value),
            b":authority" | b"host" => set_authority(header, value),
            b":scheme" => true,
            _ if name.starts_with(b":") => false,
            _ => header.insert(name, value),
        };
        if !done {
            refuse(name);
        }
    }

    fn remove(&mut self, name: &[u8]) {
        if let Some(header) = self.get_mut() {
            remove_regular(header, name);
        }
    }

    fn clear(&mut self) {
        if let Some(header) = self.get_mut() {
            clear_regular(header);
        }
    }
}

impl Headers for Lent<ResponseHeader> {
    fn len(&self) -> usize {
        1 + self.get().headers.len()
    }

    fn get(&self, name: &[u8]) -> Option<&[u8]> {
        let header = Lent::get(self);
        match name {
            b":status" => Some(header.status.as_str().as_bytes()),
            _ => regular_value(header, name),
        }
    }

    fn for_each(&self, visit: &mut dyn FnMut(&[u8], &[u8])) {
        let header = self.get();
        visit(b":status", header.status.as_str().as_bytes());
        for (name, value) in header.headers.iter() {
            visit(name.as_str().as_bytes(), value.as_bytes());
        }
    }

    fn add(&mut self, name: &[u8], value: &[u8]) {
        if name == b":status" {
            return self.replace(name, value);
        }
        if let Some(header) = self.get_mut() {
            add_regular(header, name, value);
        }
    }

    fn replace(&mut self, name: &[u8], value: &[u8]) {
        if !is_clean(value) {
            return refuse(name);
        }
        let Some(header) = self.get_mut() else {
            return;
        };
        let done = match name {
            // A final status only: an interim one (1xx) on the final response would make the
            // client take the next response on the connection for this one's.
            b":status" => std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u16>().ok())
                .filter(|status| (200..=599).contains(status))
                .is_some_and(|status| header.set_status(status).is_ok()),
            _ if name.starts_with(b":") => false,
            _ => header.insert(name, value),
        };
        if !done {
            refuse(name);
        }
    }

    fn remove(&mut self, name: &[u8]) {
        if let Some(header) = self.get_mut() {
            remove_regular(header, name);
        }
    }

    fn clear(&mut self) {
        if let Some(header) = self.get_mut() {
            clear_regular(header);
        }
    }
}

/// Trailers: regular headers only.
impl Headers for Lent<http::HeaderMap> {
    fn len(&self) -> usize {
        self.get().len()
    }

    fn get(&self, name: &[u8]) -> Option<&[u8]> {
        regular_value(Lent::get(self), name)
    }

    fn for_each(&self, visit: &mut dyn FnMut(&[u8], &[u8])) {
        for (name, value) in self.get().iter() {
            visit(name.as_str().as_bytes(), value.as_bytes());
        }
    }

    fn add(&mut self, name: &[u8], value: &[u8]) {
        if name.starts_with(b":") {
            return refuse(name);
        }
        if let Some(header) = self.get_mut() {
            add_regular(header, name, value);
        }
    }

    fn replace(&mut self, name: &[u8], value: &[u8]) {
        if name.starts_with(b":") || !is_clean(value) {
            return refuse(name);
        }
        if let Some(header) = self.get_mut() {
            if !RegularHeaders::insert(header, name, value) {
                refuse(name);
            }
        }
    }

    fn remove(&mut self, name: &[u8]) {
        if let Some(header) = self.get_mut() {
            remove_regular(header, name);
        }
    }

    fn clear(&mut self) {
        if let Some(header) = self.get_mut() {
            header.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RequestHeader {
        let mut header = RequestHeader::build("GET", b"/search?q=1", None).unwrap();
        header.insert_header("host", "example.com").unwrap();
        header.insert_header("user-agent", "curl").unwrap();
        header
    }

    fn pairs(headers: &dyn Headers) -> Vec<(String, String)> {
        let mut out = Vec::new();
        headers.for_each(&mut |name, value| {
            out.push((
                String::from_utf8_lossy(name).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            ))
        });
        out
    }

    #[test]
    fn a_request_shows_envoys_pseudo_headers_first_and_host_as_authority() {
        let mut header = request();
        // SAFETY: the loan ends before `header` is used again.
        let lent = unsafe { Lent::new(&mut header) };
        assert_eq!(
            pairs(&lent),
            [
                (":authority", "example.com"),
                (":path", "/search?q=1"),
                (":method", "GET"),
                (":scheme", "http"),
                ("user-agent", "curl"),
            ]
            .map(|(n, v)| (n.to_string(), v.to_string()))
        );
        assert_eq!(lent.len(), 5);
    }

    #[test]
    fn plugin_edits_land_in_the_request_line_and_headers() {
        let mut header = request();
        {
            // SAFETY: as above.
            let mut lent = unsafe { Lent::new(&mut header) };
            lent.replace(b":path", b"/rewritten");
            lent.replace(b":method", b"POST");
            lent.add(b"x-added", b"1");
            lent.add(b"x-added", b"2");
            lent.remove(b"user-agent");
            lent.replace(b":authority", b"other.example");
            // Header splitting is refused; the map stays as it was.
            lent.add(b"x-evil", b"a\r\nx-injected: 1");
        }
        assert_eq!(header.raw_path(), b"/rewritten");
        assert_eq!(header.method, http::Method::POST);
        let added: Vec<_> = header.headers.get_all("x-added").iter().collect();
        assert_eq!(added, ["1", "2"]);
        assert!(header.headers.get("user-agent").is_none());
        assert_eq!(header.headers["host"], "other.example");
        assert!(header.headers.get("x-evil").is_none());
    }

    #[test]
    fn an_http2_request_keeps_scheme_and_authority_when_its_path_changes() {
        let mut header = RequestHeader::build("GET", b"/old", None).unwrap();
        header.set_uri("http://example.com/old?q".parse().unwrap());
        {
            // SAFETY: as above.
            let mut lent = unsafe { Lent::new(&mut header) };
            lent.replace(b":path", b"/new?x=1");
            assert_eq!(
                Headers::get(&lent, b":authority"),
                Some(&b"example.com"[..])
            );
            lent.replace(b":authority", b"other.example:8080");
        }
        assert_eq!(header.uri.to_string(), "http://other.example:8080/new?x=1");
        assert_eq!(header.headers["host"], "other.example:8080");
    }

    #[test]
    fn a_response_maps_status() {
        let mut header = ResponseHeader::build(200, None).unwrap();
        header.insert_header("server", "origin").unwrap();
        {
            // SAFETY: as above.
            let mut lent = unsafe { Lent::new(&mut header) };
            assert_eq!(Headers::get(&lent, b":status"), Some(&b"200"[..]));
            lent.replace(b":status", b"418");
            lent.remove(b"server");
            lent.add(b"x-powered-by", b"pwhost");
            lent.replace(b":status", b"not a number");
            // Not a final status: an interim one would make the client take the next
            // response on the connection for this one's.
            lent.replace(b":status", b"100");
            lent.replace(b":status", b"600");
        }
        assert_eq!(header.status.as_u16(), 418);
        assert!(header.headers.get("server").is_none());
        assert_eq!(header.headers["x-powered-by"], "pwhost");
    }

    #[test]
    fn a_header_lent_read_only_is_read_but_never_edited() {
        let header = request();
        let mut response = ResponseHeader::build(200, None).unwrap();
        response.insert_header("server", "origin").unwrap();
        {
            // SAFETY: as above.
            let mut lent = unsafe { Lent::read_only(&header) };
            assert_eq!(Headers::get(&lent, b":path"), Some(&b"/search?q=1"[..]));
            assert_eq!(Headers::get(&lent, b"user-agent"), Some(&b"curl"[..]));
            lent.add(b"x-added", b"1");
            lent.replace(b":path", b"/rewritten");
            lent.remove(b"user-agent");
            lent.clear();
            // SAFETY: as above.
            let mut lent = unsafe { Lent::read_only(&response) };
            lent.replace(b":status", b"500");
            lent.remove(b"server");
        }
        assert_eq!(header.raw_path(), b"/search?q=1");
        assert_eq!(header.headers.len(), 2);
        assert!(header.headers.get("x-added").is_none());
        assert_eq!(response.status.as_u16(), 200);
        assert_eq!(response.headers["server"], "origin");
    }

    #[test]
    fn trailers_take_regular_names_only_and_refuse_what_http_cannot_carry() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        {
            // SAFETY: as above.
            let mut lent = unsafe { Lent::new(&mut trailers) };
            assert_eq!(Headers::get(&lent, b"grpc-status"), Some(&b"0"[..]));
            lent.add(b"X-Added", b"1");
            lent.replace(b"grpc-status", b"7");
            lent.add(b":status", b"500");
            lent.replace(b"x-evil", b"a\r\nx-injected: 1");
            assert_eq!(lent.len(), 2);
        }
        assert_eq!(trailers["grpc-status"], "7");
        assert_eq!(trailers["x-added"], "1");
        assert!(trailers.get("x-evil").is_none());
        assert_eq!(trailers.len(), 2);
    }
}
