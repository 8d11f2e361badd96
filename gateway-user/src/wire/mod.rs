//! PostgreSQL framing and the few message codecs the gateway needs.
//!
//! Frames are split by their length header and kept as `Bytes` slices of the
//! read buffer, so forwarding them copies nothing. Only the messages a
//! decision or a rewrite needs are decoded, and a decoder must consume its
//! frame exactly: trailing bytes or invalid UTF-8 make a message malformed.

pub mod backend;
pub mod frame;
pub mod frontend;
pub mod rows;
pub mod startup;

pub use frame::{Frame, FrameError, FrameRef, FrameSplitter};

/// Errors from decoding a single message body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message '{tag}' is truncated")]
    Truncated { tag: char },
    #[error("message '{tag}' has {extra} unexpected trailing byte(s)")]
    TrailingBytes { tag: char, extra: usize },
    #[error("message '{tag}' holds a string that is not valid UTF-8")]
    InvalidUtf8 { tag: char },
    #[error("message '{tag}' has an invalid field: {what}")]
    Invalid { tag: char, what: &'static str },
}

/// A string of message `tag`, checked to be UTF-8.
pub(crate) fn utf8(tag: char, bytes: &[u8]) -> Result<&str, DecodeError> {
    std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { tag })
}

/// Strings up to this long (with their NUL) are found byte by byte.
const SHORT_CSTR: usize = 16;

/// A cursor over one message body that knows which message it reads, so
/// every error names the message.
pub(crate) struct Cursor<'a> {
    tag: char,
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(tag: u8, buf: &'a [u8]) -> Self {
        Self {
            tag: tag as char,
            buf,
        }
    }

    fn truncated(&self) -> DecodeError {
        DecodeError::Truncated { tag: self.tag }
    }

    pub(crate) fn cstr_bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        // Names (the unnamed "" above all) and command tags are short: a
        // look at their few bytes costs less than setting up the vector
        // search. Statement texts go on with it past those bytes, a word
        // at a time.
        let head = self.buf.len().min(SHORT_CSTR);
        let nul = match self.buf[..head].iter().position(|b| *b == 0) {
            Some(nul) => nul,
            None => head + memchr::memchr(0, &self.buf[head..]).ok_or_else(|| self.truncated())?,
        };
        let (s, rest) = self.buf.split_at(nul);
        self.buf = &rest[1..];
        Ok(s)
    }

    pub(crate) fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        let bytes = self.cstr_bytes()?;
        utf8(self.tag, bytes)
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.truncated());
        }
        let (s, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.bytes(1)?[0])
    }

    pub(crate) fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, DecodeError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A non-negative count field.
    pub(crate) fn count16(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let n = self.i16()?;
        usize::try_from(n).map_err(|_| DecodeError::Invalid {
            tag: self.tag,
            what,
        })
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                tag: self.tag,
                extra: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Strings on both sides of the byte-by-byte look, and ones with no end.
    #[test]
    fn strings_end_at_their_nul_whatever_their_length() {
        for len in [0, 1, SHORT_CSTR - 1, SHORT_CSTR, SHORT_CSTR + 1, 100] {
            let text = "x".repeat(len);
            let mut body = text.clone().into_bytes();
            body.extend_from_slice(b"\0y\0");
            let mut c = Cursor::new(b'P', &body);
            assert_eq!(c.cstr(), Ok(text.as_str()), "length {len}");
            assert_eq!(c.cstr(), Ok("y"), "after a string of length {len}");
            assert_eq!(c.cstr(), Err(DecodeError::Truncated { tag: 'P' }));

            let unterminated = "x".repeat(len).into_bytes();
            let mut c = Cursor::new(b'P', &unterminated);
            assert_eq!(c.cstr(), Err(DecodeError::Truncated { tag: 'P' }));
        }
    }
}
