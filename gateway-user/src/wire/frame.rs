//! Splitting a byte stream into tagged PostgreSQL messages.

use bytes::BytesMut;

/// One complete tagged message: the tag byte, the length word and the body,
/// exactly as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    bytes: BytesMut,
}

impl Frame {
    /// Wraps a complete encoded message; the caller guarantees the header.
    pub(crate) fn from_encoded(bytes: BytesMut) -> Self {
        debug_assert!(bytes.len() >= 5);
        Self { bytes }
    }

    pub fn tag(&self) -> u8 {
        self.bytes[0]
    }

    /// The message body, without tag and length.
    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }

    /// The whole message as it goes on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The buffer, still sharing the read buffer's allocation, so that
    /// adjacent frames can be joined again without copying.
    pub fn into_buf(self) -> BytesMut {
        self.bytes
    }

    pub fn as_ref(&self) -> FrameRef<'_> {
        FrameRef { bytes: &self.bytes }
    }
}

/// A complete message looked at where it lies in a read buffer: the relay
/// judges messages in place and forwards the unchanged ones as one run of
/// bytes, without taking each off the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    bytes: &'a [u8],
}

impl<'a> FrameRef<'a> {
    /// A complete message as `FrameSplitter::peek` delimited it.
    pub fn new(bytes: &'a [u8]) -> Self {
        debug_assert!(bytes.len() >= 5);
        Self { bytes }
    }

    pub fn tag(&self) -> u8 {
        self.bytes[0]
    }

    /// The message body, without tag and length.
    pub fn body(&self) -> &'a [u8] {
        &self.bytes[5..]
    }

    /// The whole message as it goes on the wire.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("message '{}' declares {len} bytes, more than the limit of {max}", *tag as char)]
    TooLarge { tag: u8, len: usize, max: usize },
    #[error("message '{}' declares an impossible length {len}", *tag as char)]
    BadLength { tag: u8, len: i64 },
}

/// Splits tagged messages off the front of a read buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameSplitter {
    max_frame: usize,
}

impl FrameSplitter {
    pub fn new(max_frame: usize) -> Self {
        Self { max_frame }
    }

    /// Takes one complete message off the front of `buf`, or returns `None`
    /// when more bytes are needed. On `None` the buffer has been reserved for
    /// the rest of the pending frame, so the next read fills it.
    pub fn split(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.peek(buf)? {
            Some(total) => Ok(Some(Frame {
                bytes: buf.split_to(total),
            })),
            None => {
                self.reserve_pending(buf)?;
                Ok(None)
            }
        }
    }

    /// The length of the complete message at the front of `buf`, or `None`
    /// when it has not all arrived. Checks the header like `split`.
    pub fn peek(&self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        let Some(total) = self.declared(buf)? else {
            return Ok(None);
        };
        Ok((buf.len() >= total).then_some(total))
    }

    /// Makes room for the rest of a message whose start is at the front of
    /// `buf`, so the next read can complete it.
    pub fn reserve_pending(&self, buf: &mut BytesMut) -> Result<(), FrameError> {
        if let Some(total) = self.declared(buf)? {
            if buf.len() < total {
                buf.reserve(total - buf.len());
            }
        }
        Ok(())
    }

    /// The total length (tag included) a header declares, checked against
    /// the limit; `None` before the header is complete.
    fn declared(&self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        let [tag, a, b, c, d, ..] = *buf else {
            return Ok(None);
        };
        let declared = i32::from_be_bytes([a, b, c, d]);
        if declared < 4 {
            return Err(FrameError::BadLength {
                tag,
                len: i64::from(declared),
            });
        }
        // `declared` counts itself but not the tag byte.
        let total = declared as usize + 1;
        if total - 5 > self.max_frame {
            return Err(FrameError::TooLarge {
                tag,
                len: total - 5,
                max: self.max_frame,
            });
        }
        Ok(Some(total))
    }
}

/// Appends a message with `tag` and the body written by `body`, filling in the
/// length word afterwards.
pub fn encode(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.reserve(5);
    out.extend_from_slice(&[tag, 0, 0, 0, 0]);
    let start = out.len() - 4;
    body(out);
    let len = (out.len() - start) as i32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Encodes one message into its own frame.
pub fn encode_frame(tag: u8, body: impl FnOnce(&mut BytesMut)) -> Frame {
    let mut out = BytesMut::new();
    encode(&mut out, tag, body);
    Frame::from_encoded(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_complete_frames_and_waits_for_partial_ones() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x09abcd\0Q\0\0"[..]);
        let s = FrameSplitter::new(1024);
        let f = s.split(&mut buf).unwrap().unwrap();
        assert_eq!(f.tag(), b'Q');
        assert_eq!(f.body(), b"abcd\0");
        assert_eq!(s.split(&mut buf).unwrap(), None);
        assert_eq!(&buf[..], b"Q\0\0");
    }

    #[test]
    fn rejects_lengths_below_four_and_above_the_cap() {
        let s = FrameSplitter::new(16);
        let mut bad = BytesMut::from(&b"Q\0\0\0\x03"[..]);
        assert!(matches!(
            s.split(&mut bad),
            Err(FrameError::BadLength { .. })
        ));
        let mut big = BytesMut::from(&b"Q\x7f\xff\xff\xff"[..]);
        assert!(matches!(
            s.split(&mut big),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn peek_delimits_in_place_and_reserve_makes_room_for_the_rest() {
        let s = FrameSplitter::new(1 << 20);
        let two = b"S\0\0\0\x04Z\0\0\0\x05I";
        assert_eq!(s.peek(two).unwrap(), Some(5));
        assert_eq!(s.peek(&two[5..]).unwrap(), Some(6));
        assert_eq!(s.peek(&two[5..10]).unwrap(), None);
        assert_eq!(s.peek(b"Z\0").unwrap(), None);
        assert!(s.peek(b"Z\0\0\0\x01").is_err());
        // A 100 000-byte DataRow whose header has arrived: the next read
        // has room for all of it.
        let mut buf = BytesMut::from(&b"D\0\x01\x86\xa4ab"[..]);
        s.reserve_pending(&mut buf).unwrap();
        assert!(buf.capacity() >= 100_001);
        assert_eq!(&buf[..], b"D\0\x01\x86\xa4ab");
    }

    #[test]
    fn encode_fills_in_the_length() {
        let f = encode_frame(b'Z', |b| b.extend_from_slice(b"I"));
        assert_eq!(f.as_bytes(), b"Z\0\0\0\x05I");
    }
}
