//! Result messages the masking path reads and rewrites: RowDescription,
//! DataRow, CopyOutResponse, and the fields of ErrorResponse and
//! NoticeResponse.

use bytes::BufMut;

use super::frame::{encode_frame, Frame};
use super::{Cursor, DecodeError};

pub const DATA_ROW: u8 = b'D';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Field {
    pub name: String,
    /// The table the column is a plain reference to, 0 when computed.
    pub table_oid: u32,
    /// Its attribute number, 0 when computed or a whole row.
    pub attnum: i16,
    pub type_oid: u32,
    /// 0 text, 1 binary.
    pub format: i16,
}

pub fn decode_row_description(body: &[u8]) -> Result<Vec<Field>, DecodeError> {
    let mut c = Cursor::new(b'T', body);
    let n = c.count16("field count")?;
    let mut fields = Vec::with_capacity(n);
    for _ in 0..n {
        let name = String::from_utf8_lossy(c.cstr_bytes()?).into_owned();
        let table_oid = c.i32()? as u32;
        let attnum = c.i16()?;
        let type_oid = c.i32()? as u32;
        let _typlen = c.i16()?;
        let _typmod = c.i32()?;
        let format = c.i16()?;
        fields.push(Field {
            name,
            table_oid,
            attnum,
            type_oid,
            format,
        });
    }
    c.finish()?;
    Ok(fields)
}

/// The values of a DataRow; `None` is NULL.
pub fn decode_data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, DecodeError> {
    let mut c = Cursor::new(DATA_ROW, body);
    let n = c.count16("column count")?;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        match c.i32()? {
            -1 => values.push(None),
            len if len >= 0 => values.push(Some(c.bytes(len as usize)?)),
            _ => {
                return Err(DecodeError::Invalid {
                    tag: 'D',
                    what: "value length",
                })
            }
        }
    }
    c.finish()?;
    Ok(values)
}

pub fn data_row<'a>(values: impl ExactSizeIterator<Item = Option<&'a [u8]>>) -> Frame {
    encode_frame(DATA_ROW, |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                None => b.put_i32(-1),
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.extend_from_slice(v);
                }
            }
        }
    })
}

/// CopyOutResponse: the overall format and each column's.
pub fn decode_copy_response(tag: u8, body: &[u8]) -> Result<(i8, Vec<i16>), DecodeError> {
    let mut c = Cursor::new(tag, body);
    let overall = c.u8()? as i8;
    let n = c.count16("column count")?;
    let mut formats = Vec::with_capacity(n);
    for _ in 0..n {
        formats.push(c.i16()?);
    }
    c.finish()?;
    Ok((overall, formats))
}

pub fn copy_data(data: &[u8]) -> Frame {
    encode_frame(COPY_DATA, |b| b.extend_from_slice(data))
}

/// Every field of an ErrorResponse or NoticeResponse, in order.
pub fn decode_notice_fields(tag: u8, body: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, DecodeError> {
    let mut c = Cursor::new(tag, body);
    let mut out = Vec::new();
    loop {
        let kind = c.u8()?;
        if kind == 0 {
            break;
        }
        out.push((kind, c.cstr_bytes()?.to_vec()));
    }
    c.finish()?;
    Ok(out)
}

pub fn notice_frame(tag: u8, fields: &[(u8, Vec<u8>)]) -> Frame {
    encode_frame(tag, |b| {
        for (k, v) in fields {
            b.put_u8(*k);
            // A NUL inside a field would end it early; masking never adds one.
            b.extend_from_slice(v);
            b.put_u8(0);
        }
        b.put_u8(0);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_rows_round_trip() {
        let values: Vec<Option<&[u8]>> = vec![Some(b"1"), None, Some(b"")];
        let f = data_row(values.clone().into_iter());
        assert_eq!(decode_data_row(f.body()).unwrap(), values);
        assert!(decode_data_row(&f.body()[..f.body().len() - 1]).is_err());
    }

    #[test]
    fn notice_fields_round_trip() {
        let fields = vec![(b'S', b"ERROR".to_vec()), (b'M', b"boom".to_vec())];
        let f = notice_frame(b'E', &fields);
        assert_eq!(decode_notice_fields(b'E', f.body()).unwrap(), fields);
    }
}
