//! The untagged messages a client may open a connection with.

use std::collections::BTreeMap;

use bytes::{BufMut, BytesMut};

use super::{Cursor, DecodeError};

pub const SSL_REQUEST_CODE: i32 = 80877103;
pub const GSSENC_REQUEST_CODE: i32 = 80877104;
pub const CANCEL_REQUEST_CODE: i32 = 80877102;
/// PostgreSQL refuses startup packets longer than this.
pub const MAX_STARTUP_LEN: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, key: i32 },
    Startup(Startup),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    /// Protocol version as sent: major in the high 16 bits.
    pub version: i32,
    /// Parameters in the order the client sent them; names are unique.
    pub params: Vec<(String, String)>,
}

impl Startup {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Decodes the body of an untagged startup-phase packet (after its length).
pub fn decode(body: &[u8]) -> Result<StartupPacket, DecodeError> {
    let mut c = Cursor::new(b'0', body);
    let code = c.i32()?;
    match code {
        SSL_REQUEST_CODE => {
            c.finish()?;
            Ok(StartupPacket::SslRequest)
        }
        GSSENC_REQUEST_CODE => {
            c.finish()?;
            Ok(StartupPacket::GssEncRequest)
        }
        CANCEL_REQUEST_CODE => {
            let pid = c.i32()?;
            let key = c.i32()?;
            c.finish()?;
            Ok(StartupPacket::Cancel { pid, key })
        }
        v if v >> 16 == 3 => {
            let mut params: BTreeMap<String, ()> = BTreeMap::new();
            let mut ordered = Vec::new();
            loop {
                let name = c.cstr()?;
                if name.is_empty() {
                    break;
                }
                let value = c.cstr()?;
                if params.insert(name.to_owned(), ()).is_some() {
                    return Err(DecodeError::Invalid {
                        tag: '0',
                        what: "duplicate startup parameter",
                    });
                }
                ordered.push((name.to_owned(), value.to_owned()));
            }
            c.finish()?;
            Ok(StartupPacket::Startup(Startup {
                version: v,
                params: ordered,
            }))
        }
        _ => Err(DecodeError::Invalid {
            tag: '0',
            what: "unsupported protocol version or request code",
        }),
    }
}

/// Encodes a StartupMessage with the given parameters.
pub fn encode_startup(version: i32, params: &[(&str, &str)]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_i32(0);
    b.put_i32(version);
    for (k, v) in params {
        super::frontend::put_cstr(&mut b, k);
        super::frontend::put_cstr(&mut b, v);
    }
    b.put_u8(0);
    let len = b.len() as i32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b
}

pub fn encode_request(code: i32, extra: &[i32]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_i32(8 + 4 * extra.len() as i32);
    b.put_i32(code);
    for x in extra {
        b.put_i32(*x);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_startup_parameters_in_order() {
        let enc = encode_startup(196608, &[("user", "app"), ("database", "db")]);
        match decode(&enc[4..]).unwrap() {
            StartupPacket::Startup(s) => {
                assert_eq!(s.get("user"), Some("app"));
                assert_eq!(s.params[1].0, "database");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rejects_unknown_codes_and_trailing_bytes() {
        assert!(decode(&[0, 1, 0, 0]).is_err());
        let mut ssl = encode_request(SSL_REQUEST_CODE, &[]);
        ssl.put_u8(1);
        assert!(decode(&ssl[4..]).is_err());
    }
}
