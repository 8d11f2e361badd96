//! Decoders for the frontend messages the gateway must understand, and
//! encoders for the few it sends upstream itself.

use bytes::{BufMut, BytesMut};

use super::frame::{encode_frame, Frame};
use super::{Cursor, DecodeError};

pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const EXECUTE: u8 = b'E';
pub const DESCRIBE: u8 = b'D';
pub const CLOSE: u8 = b'C';
pub const SYNC: u8 = b'S';
pub const FLUSH: u8 = b'H';
pub const TERMINATE: u8 = b'X';
pub const FUNCTION_CALL: u8 = b'F';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const PASSWORD: u8 = b'p';

/// A statement's text as the client sent it: framed, not yet checked to be
/// UTF-8. The analysis cache knows a text it has seen by its bytes, and
/// bytes equal to a text that was checked need no check of their own (the
/// check is the largest part of decoding a Parse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlText<'a> {
    tag: u8,
    bytes: &'a [u8],
}

impl<'a> SqlText<'a> {
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The text, checked to be UTF-8.
    pub fn check(&self) -> Result<&'a str, DecodeError> {
        super::utf8(self.tag as char, self.bytes)
    }
}

/// A simple-protocol query: one string, possibly several statements.
pub fn decode_query(body: &[u8]) -> Result<SqlText<'_>, DecodeError> {
    let mut c = Cursor::new(QUERY, body);
    let bytes = c.cstr_bytes()?;
    c.finish()?;
    Ok(SqlText { tag: QUERY, bytes })
}

#[derive(Debug, PartialEq, Eq)]
pub struct Parse<'a> {
    pub statement: &'a str,
    pub query: SqlText<'a>,
    pub param_types: usize,
}

pub fn decode_parse(body: &[u8]) -> Result<Parse<'_>, DecodeError> {
    let mut c = Cursor::new(PARSE, body);
    let statement = c.cstr()?;
    let query = SqlText {
        tag: PARSE,
        bytes: c.cstr_bytes()?,
    };
    let n = c.count16("parameter type count")?;
    c.bytes(n * 4)?;
    c.finish()?;
    Ok(Parse {
        statement,
        query,
        param_types: n,
    })
}

#[derive(Debug, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    pub params: usize,
    pub result_formats: ResultFormats,
}

/// The result column formats a Bind asks for. Zero codes (all text) and one
/// code (for every column) are by far the most common and need no
/// allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultFormats {
    Uniform(i16),
    PerColumn(std::sync::Arc<[i16]>),
}

impl Default for ResultFormats {
    fn default() -> Self {
        Self::Uniform(0)
    }
}

impl ResultFormats {
    /// The format of one column (text past the end of a per-column list,
    /// which the server would have refused anyway).
    pub fn of(&self, column: usize) -> i16 {
        match self {
            Self::Uniform(f) => *f,
            Self::PerColumn(each) => each.get(column).copied().unwrap_or(0),
        }
    }
}

/// Decodes a Bind and checks every field, parameter values included, so a
/// malformed Bind never reaches the server.
pub fn decode_bind(body: &[u8]) -> Result<Bind<'_>, DecodeError> {
    let mut c = Cursor::new(BIND, body);
    let portal = c.cstr()?;
    let statement = c.cstr()?;
    let formats = c.count16("parameter format count")?;
    for _ in 0..formats {
        format_code(&mut c)?;
    }
    let params = c.count16("parameter count")?;
    for _ in 0..params {
        let len = c.i32()?;
        match len {
            -1 => {}
            n if n >= 0 => {
                c.bytes(n as usize)?;
            }
            _ => {
                return Err(DecodeError::Invalid {
                    tag: 'B',
                    what: "parameter length",
                })
            }
        }
    }
    let results = c.count16("result format count")?;
    let result_formats = match results {
        0 => ResultFormats::Uniform(0),
        1 => ResultFormats::Uniform(format_code(&mut c)?),
        n => ResultFormats::PerColumn(
            (0..n)
                .map(|_| format_code(&mut c))
                .collect::<Result<_, _>>()?,
        ),
    };
    c.finish()?;
    Ok(Bind {
        portal,
        statement,
        params,
        result_formats,
    })
}

fn format_code(c: &mut Cursor<'_>) -> Result<i16, DecodeError> {
    match c.i16()? {
        f @ (0 | 1) => Ok(f),
        _ => Err(DecodeError::Invalid {
            tag: 'B',
            what: "format code",
        }),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Execute<'a> {
    pub portal: &'a str,
    pub max_rows: i32,
}

pub fn decode_execute(body: &[u8]) -> Result<Execute<'_>, DecodeError> {
    let mut c = Cursor::new(EXECUTE, body);
    let portal = c.cstr()?;
    let max_rows = c.i32()?;
    c.finish()?;
    Ok(Execute { portal, max_rows })
}

/// The target of a Describe or Close.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Target<'a> {
    Statement(&'a str),
    Portal(&'a str),
}

pub fn decode_target(tag: u8, body: &[u8]) -> Result<Target<'_>, DecodeError> {
    let mut c = Cursor::new(tag, body);
    let kind = c.u8()?;
    let name = c.cstr()?;
    c.finish()?;
    match kind {
        b'S' => Ok(Target::Statement(name)),
        b'P' => Ok(Target::Portal(name)),
        _ => Err(DecodeError::Invalid {
            tag: tag as char,
            what: "target kind (want 'S' or 'P')",
        }),
    }
}

/// Checks that a message that carries no body has none.
pub fn decode_empty(tag: u8, body: &[u8]) -> Result<(), DecodeError> {
    Cursor::new(tag, body).finish()
}

/// CopyFail carries one error string.
pub fn decode_copy_fail(body: &[u8]) -> Result<&str, DecodeError> {
    let mut c = Cursor::new(COPY_FAIL, body);
    let s = c.cstr()?;
    c.finish()?;
    Ok(s)
}

pub fn query(text: &str) -> Frame {
    encode_frame(QUERY, |b| put_cstr(b, text))
}

pub fn parse(statement: &str, text: &str) -> Frame {
    encode_frame(PARSE, |b| {
        put_cstr(b, statement);
        put_cstr(b, text);
        b.put_i16(0);
    })
}

/// Describe of a portal.
pub fn describe_portal(portal: &str) -> Frame {
    encode_frame(DESCRIBE, |b| {
        b.put_u8(b'P');
        put_cstr(b, portal);
    })
}

pub fn terminate() -> Frame {
    encode_frame(TERMINATE, |_| {})
}

pub(crate) fn put_cstr(b: &mut BytesMut, s: &str) {
    b.extend_from_slice(s.as_bytes());
    b.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_must_end_at_its_nul() {
        let check = |body: &'static [u8]| decode_query(body).and_then(|t| t.check());
        assert_eq!(check(b"SELECT 1\0"), Ok("SELECT 1"));
        assert!(matches!(
            decode_query(b"SELECT 1\0DROP TABLE t\0"),
            Err(DecodeError::TrailingBytes { .. })
        ));
        assert!(matches!(
            decode_query(b"SELECT 1"),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            check(b"SELECT '\xff'\0"),
            Err(DecodeError::InvalidUtf8 { .. })
        ));
    }

    #[test]
    fn bind_is_checked_to_the_last_byte() {
        let ok = b"p\0s\0\0\x01\0\x01\0\x02\0\0\0\x01x\xff\xff\xff\xff\0\0";
        let b = decode_bind(ok).unwrap();
        assert_eq!((b.portal, b.statement, b.params), ("p", "s", 2));
        assert_eq!(b.result_formats, ResultFormats::Uniform(0));
        let mut per_column = ok[..ok.len() - 2].to_vec();
        per_column.extend_from_slice(b"\0\x02\0\x01\0\0");
        let b = decode_bind(&per_column).unwrap();
        assert_eq!((b.result_formats.of(0), b.result_formats.of(1)), (1, 0));
        let mut one = ok[..ok.len() - 2].to_vec();
        one.extend_from_slice(b"\0\x01\0\x01");
        assert_eq!(decode_bind(&one).unwrap().result_formats.of(7), 1);
        let mut extra = ok.to_vec();
        extra.push(0);
        assert!(decode_bind(&extra).is_err());
        let bad_len = b"\0\0\0\0\0\x01\xff\xff\xff\xfe\0\0";
        assert!(decode_bind(bad_len).is_err());
    }

    #[test]
    fn parse_and_execute_and_targets() {
        let p = decode_parse(b"s1\0SELECT $1\0\0\x01\0\0\0\x17").unwrap();
        assert_eq!(
            (p.statement, p.query.check(), p.param_types),
            ("s1", Ok("SELECT $1"), 1)
        );
        assert!(decode_parse(b"s1\0SELECT $1\0\0\x01\0\0").is_err());
        let e = decode_execute(b"\0\0\0\0\0").unwrap();
        assert_eq!((e.portal, e.max_rows), ("", 0));
        assert_eq!(
            decode_target(DESCRIBE, b"Sfoo\0"),
            Ok(Target::Statement("foo"))
        );
        assert!(decode_target(DESCRIBE, b"Xfoo\0").is_err());
        assert!(decode_empty(SYNC, b"x").is_err());
    }
}
