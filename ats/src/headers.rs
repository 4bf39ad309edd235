//! Traffic Server's MIME headers lent to plugins as [`abi::Headers`]: the ABI reads and edits
//! the transaction's own header heap, nothing is copied into a map of pwhost's.
//!
//! Envoy's pseudo-headers are mapped onto the HTTP header's parts: `:method`, `:scheme`,
//! `:path` (the URL's path and query) and `:authority` (the `Host` header, else the URL's host)
//! for a request, `:status` for a response. Their values are read when a plugin first asks for
//! one and read again after the plugin changes one; every other name goes to the MIME fields.

use std::cell::OnceCell;
use std::ffi::{c_char, c_int};

use crate::sys;

/// Which HTTP header a map is, for its pseudo-headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeaderKind {
    Request,
    Response,
}

/// A transaction's request or response header in Traffic Server's marshal buffer.
///
/// The handles stay valid while the transaction is held in the hook that lent them (Traffic
/// Server does not move or free a transaction's headers before `TSHttpTxnReenable`); the
/// transaction code drops the map before it reenables.
pub(crate) struct MimeHeaders {
    buffer: sys::TSMBuffer,
    header: sys::TSMLoc,
    kind: HeaderKind,
    /// The pseudo-headers' values, in the order plugins see them, once read.
    pseudo: OnceCell<Vec<(&'static [u8], Vec<u8>)>>,
}

/// Borrows `len` bytes at `ptr` that Traffic Server handed out (a null pointer is empty).
///
/// # Safety
/// `ptr..ptr+len` must be readable for the returned lifetime.
unsafe fn bytes<'a>(ptr: *const c_char, len: c_int) -> &'a [u8] {
    if ptr.is_null() || len <= 0 {
        return &[];
    }
    // SAFETY: the caller vouches for the range.
    unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len as usize) }
}

/// A length as Traffic Server's `int` (names and values longer than 2 GiB are cut, never
/// wrapped into a negative length, which Traffic Server would read as "use strlen").
fn c_len(bytes: &[u8]) -> c_int {
    c_int::try_from(bytes.len()).unwrap_or(c_int::MAX)
}

impl MimeHeaders {
    /// The request or response header at `buffer`/`header`, with its pseudo-headers read.
    ///
    /// # Safety
    /// `buffer` and `header` must be a live HTTP header of a transaction held by the caller's
    /// hook, for as long as the map is used.
    pub(crate) unsafe fn new(
        buffer: sys::TSMBuffer,
        header: sys::TSMLoc,
        kind: HeaderKind,
    ) -> MimeHeaders {
        MimeHeaders {
            buffer,
            header,
            kind,
            pseudo: OnceCell::new(),
        }
    }

    /// The HTTP status of a response header (0 for a request).
    pub(crate) fn status(&self) -> u32 {
        if self.kind != HeaderKind::Response {
            return 0;
        }
        // SAFETY: the handles are live (see the type's documentation).
        unsafe { sys::TSHttpHdrStatusGet(self.buffer, self.header) }
    }

    /// Sets the HTTP status (and its standard reason) of a response header.
    pub(crate) fn set_status(&mut self, status: u32) {
        if self.kind != HeaderKind::Response {
            return;
        }
        let status = status as sys::TSHttpStatus;
        // SAFETY: the handles are live; the reason Traffic Server looks up is a static string
        // (or null, which the length check turns into an empty reason).
        unsafe {
            sys::TSHttpHdrStatusSet(self.buffer, self.header, status);
            let reason = sys::TSHttpHdrReasonLookup(status);
            let len = if reason.is_null() {
                0
            } else {
                c_len(std::ffi::CStr::from_ptr(reason).to_bytes())
            };
            sys::TSHttpHdrReasonSet(self.buffer, self.header, reason, len);
        }
        self.pseudo = OnceCell::new();
    }

    /// How many pseudo-headers the map has.
    fn pseudo_count(&self) -> usize {
        match self.kind {
            HeaderKind::Request => 4,
            HeaderKind::Response => 1,
        }
    }

    /// The pseudo-headers, read on first use.
    fn pseudo(&self) -> &[(&'static [u8], Vec<u8>)] {
        self.pseudo.get_or_init(|| self.read_pseudo())
    }

    fn read_pseudo(&self) -> Vec<(&'static [u8], Vec<u8>)> {
        let mut pseudo = Vec::with_capacity(self.pseudo_count());
        match self.kind {
            HeaderKind::Request => {
                let (scheme, host, path) = self.url_parts();
                let authority = match self.field(b"host") {
                    Some(host) => host.to_vec(),
                    None => host,
                };
                let mut len = 0;
                // SAFETY: the handles are live; the method lives in the buffer until changed.
                let method = unsafe {
                    bytes(
                        sys::TSHttpHdrMethodGet(self.buffer, self.header, &mut len),
                        len,
                    )
                }
                .to_vec();
                pseudo.push((&b":authority"[..], authority));
                pseudo.push((&b":path"[..], path));
                pseudo.push((&b":method"[..], method));
                pseudo.push((&b":scheme"[..], scheme));
            }
            HeaderKind::Response => {
                let status = self.status().to_string().into_bytes();
                pseudo.push((&b":status"[..], status));
            }
        }
        pseudo
    }

    /// The URL's scheme (`http` when the request line had none), `host[:port]` and
    /// `/path?query`.
    fn url_parts(&self) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let Some(url) = self.url() else {
            return (b"http".to_vec(), Vec::new(), b"/".to_vec());
        };
        let mut len = 0;
        // SAFETY: `url` is a live URL of this header; each string is copied before the next
        // call that could change the buffer.
        unsafe {
            let scheme = bytes(sys::TSUrlSchemeGet(self.buffer, url, &mut len), len).to_vec();
            let mut host = bytes(sys::TSUrlHostGet(self.buffer, url, &mut len), len).to_vec();
            let raw_port = sys::TSUrlRawPortGet(self.buffer, url);
            if !host.is_empty() && raw_port > 0 {
                host.extend_from_slice(format!(":{raw_port}").as_bytes());
            }
            let mut path = b"/".to_vec();
            path.extend_from_slice(bytes(sys::TSUrlPathGet(self.buffer, url, &mut len), len));
            let query = bytes(sys::TSUrlHttpQueryGet(self.buffer, url, &mut len), len);
            if !query.is_empty() {
                path.push(b'?');
                path.extend_from_slice(query);
            }
            sys::TSHandleMLocRelease(self.buffer, self.header, url);
            let scheme = if scheme.is_empty() {
                b"http".to_vec()
            } else {
                scheme
            };
            (scheme, host, path)
        }
    }

    fn url(&self) -> Option<sys::TSMLoc> {
        let mut url: sys::TSMLoc = std::ptr::null_mut();
        // SAFETY: the handles are live; `url` receives a handle released by the caller.
        let found = unsafe { sys::TSHttpHdrUrlGet(self.buffer, self.header, &mut url) };
        (found == sys::TS_SUCCESS && !url.is_null()).then_some(url)
    }

    /// Writes a pseudo-header through to the header's parts.
    fn set_pseudo(&mut self, name: &[u8], value: &[u8]) {
        match (self.kind, name) {
            (HeaderKind::Request, b":method") => {
                // SAFETY: the handles are live; Traffic Server copies the value.
                unsafe {
                    sys::TSHttpHdrMethodSet(
                        self.buffer,
                        self.header,
                        value.as_ptr().cast(),
                        c_len(value),
                    )
                };
            }
            (HeaderKind::Request, b":path") => {
                if let Some(url) = self.url() {
                    let (path, query) = match value.iter().position(|b| *b == b'?') {
                        Some(at) => (&value[..at], &value[at + 1..]),
                        None => (value, &b""[..]),
                    };
                    let path = path.strip_prefix(b"/").unwrap_or(path);
                    // SAFETY: `url` is live; Traffic Server copies the values.
                    unsafe {
                        sys::TSUrlPathSet(self.buffer, url, path.as_ptr().cast(), c_len(path));
                        sys::TSUrlHttpQuerySet(
                            self.buffer,
                            url,
                            query.as_ptr().cast(),
                            c_len(query),
                        );
                        sys::TSHandleMLocRelease(self.buffer, self.header, url);
                    }
                }
            }
            (HeaderKind::Request, b":scheme") => {
                if let Some(url) = self.url() {
                    // SAFETY: as above.
                    unsafe {
                        sys::TSUrlSchemeSet(self.buffer, url, value.as_ptr().cast(), c_len(value));
                        sys::TSHandleMLocRelease(self.buffer, self.header, url);
                    }
                }
            }
            (HeaderKind::Request, b":authority") => self.replace_field(b"host", value),
            (HeaderKind::Response, b":status") => {
                if let Some(status) = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<u32>().ok())
                    .filter(|s| (100..=999).contains(s))
                {
                    self.set_status(status);
                }
                return;
            }
            // Another pseudo-header has no place in an HTTP/1 header: ignored, as Envoy's
            // HTTP/1 codec ignores it.
            _ => return,
        }
        self.pseudo = OnceCell::new();
    }

    /// The first MIME field called `name` (case-insensitive), or null; the caller releases it.
    ///
    /// # Safety
    /// The handles must be live (see the type's documentation).
    unsafe fn find(&self, name: &[u8]) -> sys::TSMLoc {
        // SAFETY: the caller's promise; Traffic Server reads `name` during the call only.
        unsafe {
            sys::TSMimeHdrFieldFind(self.buffer, self.header, name.as_ptr().cast(), c_len(name))
        }
    }

    /// Sets all of field `field`'s value to `value`.
    ///
    /// # Safety
    /// The handles must be live and `field` a field of this header.
    unsafe fn set_value(&mut self, field: sys::TSMLoc, value: &[u8]) {
        // SAFETY: the caller's promise; Traffic Server copies the value.
        unsafe {
            sys::TSMimeHdrFieldValueStringSet(
                self.buffer,
                self.header,
                field,
                -1,
                value.as_ptr().cast(),
                c_len(value),
            );
        }
    }

    /// The first value of MIME field `name` (case-insensitive).
    fn field(&self, name: &[u8]) -> Option<&[u8]> {
        // SAFETY: the handles are live; the value stays in the buffer until the header is
        // changed, which needs `&mut self`.
        unsafe {
            let field = self.find(name);
            if field.is_null() {
                return None;
            }
            let mut len = 0;
            let value =
                sys::TSMimeHdrFieldValueStringGet(self.buffer, self.header, field, -1, &mut len);
            let value = bytes(value, len);
            sys::TSHandleMLocRelease(self.buffer, self.header, field);
            Some(value)
        }
    }

    fn add_field(&mut self, name: &[u8], value: &[u8]) {
        let mut field: sys::TSMLoc = std::ptr::null_mut();
        // SAFETY: the handles are live; Traffic Server copies name and value; the new field's
        // handle is released once appended.
        unsafe {
            if sys::TSMimeHdrFieldCreateNamed(
                self.buffer,
                self.header,
                name.as_ptr().cast(),
                c_len(name),
                &mut field,
            ) != sys::TS_SUCCESS
            {
                return;
            }
            self.set_value(field, value);
            sys::TSMimeHdrFieldAppend(self.buffer, self.header, field);
            sys::TSHandleMLocRelease(self.buffer, self.header, field);
        }
    }

    fn replace_field(&mut self, name: &[u8], value: &[u8]) {
        // SAFETY: the handles are live; every field handle is released after use.
        unsafe {
            let field = self.find(name);
            if field.is_null() {
                self.add_field(name, value);
                return;
            }
            self.set_value(field, value);
            // Later fields of the same name go: the map then has exactly this value.
            loop {
                let duplicate = sys::TSMimeHdrFieldNextDup(self.buffer, self.header, field);
                if duplicate.is_null() {
                    break;
                }
                sys::TSMimeHdrFieldDestroy(self.buffer, self.header, duplicate);
                sys::TSHandleMLocRelease(self.buffer, self.header, duplicate);
            }
            sys::TSHandleMLocRelease(self.buffer, self.header, field);
        }
    }

    /// `:authority` is the `Host` header: read again after a change of it.
    fn forget_authority(&mut self, name: &[u8]) {
        if self.kind == HeaderKind::Request && name.eq_ignore_ascii_case(b"host") {
            self.pseudo = OnceCell::new();
        }
    }

    fn field_count(&self) -> usize {
        // SAFETY: the handles are live.
        let count = unsafe { sys::TSMimeHdrFieldsCount(self.buffer, self.header) };
        usize::try_from(count).unwrap_or(0)
    }
}

/// The longest name a Traffic Server MIME field holds (a 16-bit length).
const MAX_NAME_BYTES: usize = u16::MAX as usize;

/// The longest value a Traffic Server MIME field holds (a 24-bit length).
const MAX_VALUE_BYTES: usize = (1 << 24) - 1;

/// Whether a plugin's header may go into Traffic Server's headers: no CR, LF or NUL, which
/// would let it split the message Traffic Server writes, a non-empty name, and a name and
/// value that fit a MIME field (Traffic Server would cut a longer one short without a word, so
/// that, say, a long name beginning `Content-Length` went out under that name but unseen by
/// Traffic Server's own framing). Anything else is left out, with a warning.
fn writable(name: &[u8], value: &[u8]) -> bool {
    let clean = |bytes: &[u8]| !bytes.iter().any(|b| matches!(b, b'\r' | b'\n' | 0));
    let fits = name.len() <= MAX_NAME_BYTES && value.len() <= MAX_VALUE_BYTES;
    let ok = !name.is_empty() && fits && clean(name) && clean(value) && !name[1..].contains(&b':');
    if !ok {
        let shown = &name[..name.len().min(64)];
        crate::diag::warning(&format!(
            "a plugin's header {:?} ({} bytes, value {} bytes) was left out: CR, LF or NUL in \
             its name or value, an empty or invalid name, or a name over {MAX_NAME_BYTES} or a \
             value over {MAX_VALUE_BYTES} bytes",
            String::from_utf8_lossy(shown),
            name.len(),
            value.len()
        ));
    }
    ok
}

impl abi::Headers for MimeHeaders {
    fn len(&self) -> usize {
        self.pseudo_count() + self.field_count()
    }

    fn get(&self, name: &[u8]) -> Option<&[u8]> {
        if name.starts_with(b":") {
            return self
                .pseudo()
                .iter()
                .find(|(pseudo, _)| *pseudo == name)
                .map(|(_, value)| value.as_slice());
        }
        self.field(name)
    }

    fn for_each(&self, visit: &mut dyn FnMut(&[u8], &[u8])) {
        for (name, value) in self.pseudo() {
            visit(name, value);
        }
        // Names reach plugins in lower case, as Envoy's codecs hand them over.
        let mut lower = Vec::new();
        // SAFETY: the handles are live; fields are walked from the first with `Next` (one step
        // each, where `FieldGet(index)` walks from the start every time); each field's name and
        // value are read before its handle is released.
        unsafe {
            let mut field = sys::TSMimeHdrFieldGet(self.buffer, self.header, 0);
            while !field.is_null() {
                let mut len = 0;
                let name = bytes(
                    sys::TSMimeHdrFieldNameGet(self.buffer, self.header, field, &mut len),
                    len,
                );
                lower.clear();
                lower.extend(name.iter().map(u8::to_ascii_lowercase));
                let value = bytes(
                    sys::TSMimeHdrFieldValueStringGet(
                        self.buffer,
                        self.header,
                        field,
                        -1,
                        &mut len,
                    ),
                    len,
                );
                visit(&lower, value);
                let next = sys::TSMimeHdrFieldNext(self.buffer, self.header, field);
                sys::TSHandleMLocRelease(self.buffer, self.header, field);
                field = next;
            }
        }
    }

    fn add(&mut self, name: &[u8], value: &[u8]) {
        if !writable(name, value) {
            return;
        }
        if name.starts_with(b":") {
            self.set_pseudo(name, value);
        } else {
            self.add_field(name, value);
            self.forget_authority(name);
        }
    }

    fn replace(&mut self, name: &[u8], value: &[u8]) {
        if !writable(name, value) {
            return;
        }
        if name.starts_with(b":") {
            self.set_pseudo(name, value);
        } else {
            self.replace_field(name, value);
            self.forget_authority(name);
        }
    }

    fn remove(&mut self, name: &[u8]) {
        if name.starts_with(b":") {
            // Pseudo-headers are parts of the request or status line: they stay.
            return;
        }
        // SAFETY: the handles are live; each found field is destroyed and its handle released.
        unsafe {
            loop {
                let field = self.find(name);
                if field.is_null() {
                    break;
                }
                sys::TSMimeHdrFieldDestroy(self.buffer, self.header, field);
                sys::TSHandleMLocRelease(self.buffer, self.header, field);
            }
        }
        self.forget_authority(name);
    }

    fn clear(&mut self) {
        // SAFETY: the handles are live.
        unsafe { sys::TSMimeHdrFieldsClear(self.buffer, self.header) };
        self.pseudo = OnceCell::new();
    }
}
