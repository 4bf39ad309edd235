//! Decoding a chunked request body as it streams through the request transform.
//!
//! Traffic Server hands a request transform the client's body as it came: for a chunked
//! request (an HTTP/1.1 client's `Transfer-Encoding: chunked`, and an HTTP/2 request without a
//! length, which Traffic Server 9.2 turns into one) that is the chunked encoding, which the
//! plugins must not see. The chunk-size lines are parsed with `httparse`; this module only keeps
//! the state between the pieces the transform reads.

/// The longest chunk-size or trailer line kept while it arrives in pieces (Traffic Server
/// checked the framing on its way in; a longer line is refused rather than kept).
const MAX_LINE: usize = 4096;

/// Where the decoder is in the encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading a chunk-size line.
    Size,
    /// Inside a chunk's data, with this many bytes to come.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    /// The body ended.
    Done,
}

/// A chunked body decoder fed piece by piece.
#[derive(Debug)]
pub(crate) struct Dechunker {
    state: State,
    /// The part of the current line read so far.
    line: Vec<u8>,
    /// The body had trailer fields (which a body framed by its length cannot carry).
    pub(crate) had_trailers: bool,
}

/// Why a body could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Malformed(pub(crate) &'static str);

impl Dechunker {
    /// A decoder at the start of a body.
    pub(crate) fn new() -> Dechunker {
        Dechunker {
            state: State::Size,
            line: Vec::new(),
            had_trailers: false,
        }
    }

    /// Whether the last chunk and the trailers have been read.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes `input`, appending the body's bytes to `out`. Bytes after the body's end are
    /// ignored.
    pub(crate) fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), Malformed> {
        while !input.is_empty() {
            match self.state {
                State::Done => return Ok(()),
                State::Data(left) => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                }
                State::Size | State::DataEnd | State::Trailers => {
                    let Some(line) = self.line_from(&mut input)? else {
                        return Ok(());
                    };
                    self.state = match self.state {
                        State::Size => {
                            // httparse reads a line without digits as size 0 (the last chunk),
                            // which would end the body early.
                            if !line.first().is_some_and(u8::is_ascii_hexdigit) {
                                return Err(Malformed("a chunk size line has no size"));
                            }
                            let mut size_line = line;
                            size_line.extend_from_slice(b"\r\n");
                            match httparse::parse_chunk_size(&size_line) {
                                Ok(httparse::Status::Complete((_, 0))) => State::Trailers,
                                Ok(httparse::Status::Complete((_, size))) => State::Data(size),
                                _ => return Err(Malformed("a chunk size line is not valid")),
                            }
                        }
                        State::DataEnd if line.is_empty() => State::Size,
                        State::DataEnd => {
                            return Err(Malformed("a chunk's data is longer than its size"))
                        }
                        _ if line.is_empty() => State::Done,
                        _ => {
                            self.had_trailers = true;
                            State::Trailers
                        }
                    };
                }
            }
        }
        Ok(())
    }

    /// Takes bytes of the current line from `input`; the line without its line ending once it
    /// is complete.
    fn line_from(&mut self, input: &mut &[u8]) -> Result<Option<Vec<u8>>, Malformed> {
        let end = input.iter().position(|&byte| byte == b'\n');
        let take = end.map_or(input.len(), |at| at + 1);
        if self.line.len() + take > MAX_LINE {
            return Err(Malformed("a chunk size or trailer line is too long"));
        }
        self.line.extend_from_slice(&input[..take]);
        *input = &input[take..];
        if end.is_none() {
            return Ok(None);
        }
        let mut line = std::mem::take(&mut self.line);
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(Some(line))
    }
}
