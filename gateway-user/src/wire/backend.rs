//! Backend messages: decoders for those the gateway inspects, encoders for
//! those it originates.

use bytes::{BufMut, BytesMut};

use super::frame::{encode_frame, Frame};
use super::frontend::put_cstr;
use super::{Cursor, DecodeError};

pub const AUTHENTICATION: u8 = b'R';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const PARAMETER_STATUS: u8 = b'S';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const NO_DATA: u8 = b'n';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
pub const PORTAL_SUSPENDED: u8 = b's';

/// SQLSTATE the gateway uses for its own denials.
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// The fields of an ErrorResponse or NoticeResponse the gateway reads.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

pub fn decode_error_fields(tag: u8, body: &[u8]) -> Result<ErrorFields, DecodeError> {
    let mut f = ErrorFields::default();
    for (kind, value) in super::rows::decode_notice_fields(tag, body)? {
        let value = String::from_utf8_lossy(&value).into_owned();
        match kind {
            b'V' => f.severity = value,
            b'S' if f.severity.is_empty() => f.severity = value,
            b'C' => f.code = value,
            b'M' => f.message = value,
            _ => {}
        }
    }
    Ok(f)
}

/// Builds an ErrorResponse. `severity` is ERROR or FATAL.
pub fn error_response(severity: &str, code: &str, message: &str) -> Frame {
    encode_frame(ERROR_RESPONSE, |b| {
        b.put_u8(b'S');
        put_cstr(b, severity);
        b.put_u8(b'V');
        put_cstr(b, severity);
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    })
}

pub fn ready_for_query(status: u8) -> Frame {
    encode_frame(READY_FOR_QUERY, |b| b.put_u8(status))
}

pub fn authentication_ok() -> Frame {
    authentication(0, &[])
}

/// An Authentication request with `code` and its payload.
pub fn authentication(code: i32, payload: &[u8]) -> Frame {
    encode_frame(AUTHENTICATION, |b| {
        b.put_i32(code);
        b.extend_from_slice(payload);
    })
}

pub fn backend_key_data(pid: i32, key: i32) -> Frame {
    encode_frame(BACKEND_KEY_DATA, |b| {
        b.put_i32(pid);
        b.put_i32(key);
    })
}

pub fn decode_backend_key_data(body: &[u8]) -> Result<(i32, i32), DecodeError> {
    let mut c = Cursor::new(BACKEND_KEY_DATA, body);
    let pid = c.i32()?;
    let key = c.i32()?;
    c.finish()?;
    Ok((pid, key))
}

/// An Authentication request from the server: its code and payload.
pub fn decode_authentication(body: &[u8]) -> Result<(i32, &[u8]), DecodeError> {
    let mut c = Cursor::new(AUTHENTICATION, body);
    let code = c.i32()?;
    Ok((code, c.rest()))
}

/// The command tag of a CommandComplete, as bytes: only its row count is
/// read, so it is not checked to be UTF-8 (a check on every completion).
pub fn decode_command_complete(body: &[u8]) -> Result<&[u8], DecodeError> {
    let mut c = Cursor::new(COMMAND_COMPLETE, body);
    let tag = c.cstr_bytes()?;
    c.finish()?;
    Ok(tag)
}

/// The row count a command tag reports, for the tags that carry one
/// (`SELECT n`, `INSERT 0 n`, `UPDATE n`, `COPY n`, ...).
pub fn rows_in_tag(tag: &[u8]) -> Option<u64> {
    // Bytes, not `str` searching and parsing: every statement's completion
    // comes through here.
    let verb = &tag[..tag.iter().position(|&b| b == b' ')?];
    if !matches!(
        verb,
        b"SELECT" | b"INSERT" | b"UPDATE" | b"DELETE" | b"MERGE" | b"COPY" | b"FETCH" | b"MOVE"
    ) {
        return None;
    }
    let last = &tag[tag.iter().rposition(|&b| b == b' ')? + 1..];
    if last.is_empty() {
        return None;
    }
    last.iter().try_fold(0u64, |n, &b| {
        let digit = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// Encodes a complete message into `out` (used when rebuilding a batch).
pub fn put_frame(out: &mut BytesMut, frame: &Frame) {
    out.extend_from_slice(frame.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_round_trips() {
        let f = error_response("ERROR", "42501", "agentgate: denied");
        assert_eq!(f.tag(), ERROR_RESPONSE);
        let d = decode_error_fields(f.tag(), f.body()).unwrap();
        assert_eq!(d.code, "42501");
        assert_eq!(d.message, "agentgate: denied");
        assert_eq!(d.severity, "ERROR");
    }

    #[test]
    fn row_counts_from_tags() {
        assert_eq!(rows_in_tag(b"SELECT 3"), Some(3));
        assert_eq!(rows_in_tag(b"INSERT 0 7"), Some(7));
        assert_eq!(rows_in_tag(b"CREATE TABLE"), None);
        assert_eq!(rows_in_tag(b"BEGIN"), None);
        assert_eq!(rows_in_tag(b"COPY 18446744073709551615"), Some(u64::MAX));
        assert_eq!(rows_in_tag(b"COPY 18446744073709551616"), None);
        assert_eq!(rows_in_tag(b"SELECT "), None);
        assert_eq!(rows_in_tag(b"SELECT -1"), None);
        assert_eq!(rows_in_tag(b"SELECT 1x"), None);
        assert_eq!(rows_in_tag(b"select 1"), None);
        assert_eq!(rows_in_tag(b"MOVE 0"), Some(0));
        assert_eq!(rows_in_tag(b""), None);
    }
}
