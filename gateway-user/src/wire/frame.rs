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
        if buf.len() < 5 {
            return Ok(None);
        }
        let tag = buf[0];
        let declared = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
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
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        Ok(Some(Frame {
            bytes: buf.split_to(total),
        }))
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
    fn encode_fills_in_the_length() {
        let f = encode_frame(b'Z', |b| b.extend_from_slice(b"I"));
        assert_eq!(f.as_bytes(), b"Z\0\0\0\x05I");
    }
}
