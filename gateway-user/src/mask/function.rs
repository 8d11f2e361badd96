//! Masking functions. Each turns one value into its masked form and keeps
//! it valid for the column's type: text stays text, an integer stays an
//! integer, JSON stays JSON; what cannot be masked type-correctly becomes
//! NULL.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::detect::luhn;

/// The fixed marker `redact` writes.
pub const REDACTED: &str = "[masked]";

#[derive(Clone, PartialEq, Eq)]
pub enum MaskFn {
    Redact,
    Null,
    /// Keep the last `keep` characters.
    Partial {
        keep: usize,
    },
    /// Keyed HMAC-SHA-256: equal inputs give equal outputs, unreadable.
    Hash {
        key: Arc<[u8]>,
    },
    /// A same-shaped fake.
    Format,
}

impl std::fmt::Debug for MaskFn {
    // The key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaskFn::Redact => write!(f, "redact"),
            MaskFn::Null => write!(f, "null"),
            MaskFn::Partial { keep } => write!(f, "partial({keep})"),
            MaskFn::Hash { .. } => write!(f, "hash"),
            MaskFn::Format => write!(f, "format"),
        }
    }
}

/// How the client reads a column, as far as masking cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeClass {
    Text,
    Json,
    /// jsonb: in binary format, a version byte precedes the text.
    Jsonb,
    Int2,
    Int4,
    Int8,
    Numeric,
    Float4,
    Float8,
    /// Anything else: masked values become NULL.
    Other,
}

impl TypeClass {
    pub fn of(type_oid: u32) -> Self {
        match type_oid {
            25 | 1043 | 1042 | 19 | 705 | 18 | 142 | 2275 => TypeClass::Text,
            114 => TypeClass::Json,
            3802 => TypeClass::Jsonb,
            21 => TypeClass::Int2,
            23 | 26 => TypeClass::Int4,
            20 => TypeClass::Int8,
            1700 => TypeClass::Numeric,
            700 => TypeClass::Float4,
            701 => TypeClass::Float8,
            _ => TypeClass::Other,
        }
    }

    /// Types whose values can hold free text worth scanning with detectors.
    /// Integers and numerics are scanned too: a card number fits in both.
    pub fn scannable(self) -> bool {
        !matches!(self, TypeClass::Float4 | TypeClass::Float8)
    }
}

fn hmac(key: &[u8], value: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length; the policy requires at least 16 bytes.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(value);
    mac.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Masks a text value (what a detector found, or a whole text column).
pub fn mask_text(f: &MaskFn, value: &str) -> Option<String> {
    Some(match f {
        MaskFn::Null => return None,
        MaskFn::Redact => REDACTED.to_owned(),
        MaskFn::Partial { keep } => {
            let n = value.chars().count();
            // Keeping half or more of a short value would give it away.
            let keep = if n > keep * 2 { *keep } else { 0 };
            value
                .chars()
                .enumerate()
                .map(|(i, c)| if i + keep >= n { c } else { '*' })
                .collect()
        }
        MaskFn::Hash { key } => format!("hmac:{}", hex(&hmac(key, value.as_bytes())[..16])),
        MaskFn::Format => fake_like(value),
    })
}

/// A same-shaped fake: an address at example.invalid, a Luhn-valid card of
/// the same length, otherwise letters to `x` and digits to `0` with the
/// punctuation kept.
pub fn fake_like(value: &str) -> String {
    if let Some((local, _)) = value.split_once('@') {
        if !local.is_empty() && !value.contains(char::is_whitespace) {
            return format!(
                "{}@example.invalid",
                "x".repeat(local.chars().count().min(64))
            );
        }
    }
    let digits = value.bytes().filter(u8::is_ascii_digit).count();
    let only_card_chars = value
        .bytes()
        .all(|b| b.is_ascii_digit() || b == b' ' || b == b'-');
    if only_card_chars && (13..=19).contains(&digits) {
        // 4 then zeros, with the last digit chosen to satisfy Luhn.
        let mut fake: Vec<u8> = vec![0; digits];
        fake[0] = 4;
        let check = (0..10u8)
            .find(|d| {
                fake[digits - 1] = *d;
                luhn(&fake)
            })
            .unwrap_or(0);
        fake[digits - 1] = check;
        let mut it = fake.into_iter();
        return value
            .chars()
            .map(|c| {
                if c.is_ascii_digit() {
                    char::from(b'0' + it.next().unwrap_or(0))
                } else {
                    c
                }
            })
            .collect();
    }
    value
        .chars()
        .map(|c| {
            if c.is_alphabetic() {
                'x'
            } else if c.is_numeric() {
                '0'
            } else {
                c
            }
        })
        .collect()
}

/// The integer a masking function gives for an integer or numeric column.
fn mask_number(f: &MaskFn, value: &[u8], bits: u32) -> Option<i64> {
    let max = if bits >= 64 {
        i64::MAX
    } else {
        (1i64 << (bits - 1)) - 1
    };
    match f {
        MaskFn::Null => None,
        MaskFn::Redact | MaskFn::Format => Some(0),
        MaskFn::Partial { keep } => {
            let digits: Vec<u8> = value.iter().copied().filter(u8::is_ascii_digit).collect();
            let keep = (*keep).min(digits.len().saturating_sub(1)).min(18);
            let tail = &digits[digits.len() - keep..];
            let v = tail.iter().fold(0i64, |acc, d| {
                acc.saturating_mul(10).saturating_add(i64::from(d - b'0'))
            });
            Some(v.min(max))
        }
        MaskFn::Hash { key } => {
            let h = hmac(key, value);
            let mut eight = [0u8; 8];
            eight.copy_from_slice(&h[..8]);
            Some((u64::from_be_bytes(eight) % (max as u64)) as i64)
        }
    }
}

/// Masks one whole value of a column in text format. `None` is NULL.
pub fn mask_value_text(f: &MaskFn, class: TypeClass, value: &[u8]) -> Option<Vec<u8>> {
    match class {
        TypeClass::Text => mask_text(f, &String::from_utf8_lossy(value)).map(String::into_bytes),
        TypeClass::Json | TypeClass::Jsonb => mask_text(f, &String::from_utf8_lossy(value))
            .map(|s| serde_json::Value::String(s).to_string().into_bytes()),
        TypeClass::Int2 => mask_number(f, value, 16).map(|v| v.to_string().into_bytes()),
        TypeClass::Int4 => mask_number(f, value, 32).map(|v| v.to_string().into_bytes()),
        TypeClass::Int8 | TypeClass::Numeric => {
            mask_number(f, value, 64).map(|v| v.to_string().into_bytes())
        }
        TypeClass::Float4 | TypeClass::Float8 => match f {
            MaskFn::Null => None,
            _ => Some(b"0".to_vec()),
        },
        TypeClass::Other => None,
    }
}

/// Masks one whole value of a column in binary format. `None` is NULL.
pub fn mask_value_binary(f: &MaskFn, class: TypeClass, value: &[u8]) -> Option<Vec<u8>> {
    match class {
        TypeClass::Text | TypeClass::Json => mask_value_text(f, class, value),
        TypeClass::Jsonb => {
            let text = value.get(1..).unwrap_or_default();
            mask_value_text(f, class, text).map(|mut v| {
                v.insert(0, 1);
                v
            })
        }
        TypeClass::Int2 => {
            let v = binary_int(value).map(|v| v.to_string());
            mask_number(f, v.unwrap_or_default().as_bytes(), 16)
                .map(|m| (m as i16).to_be_bytes().to_vec())
        }
        TypeClass::Int4 => {
            let v = binary_int(value).map(|v| v.to_string());
            mask_number(f, v.unwrap_or_default().as_bytes(), 32)
                .map(|m| (m as i32).to_be_bytes().to_vec())
        }
        TypeClass::Int8 => {
            let v = binary_int(value).map(|v| v.to_string());
            mask_number(f, v.unwrap_or_default().as_bytes(), 64).map(|m| m.to_be_bytes().to_vec())
        }
        // Binary numeric zero: no digits, weight 0, positive, scale 0.
        TypeClass::Numeric => match f {
            MaskFn::Null => None,
            _ => Some(vec![0; 8]),
        },
        TypeClass::Float4 => (*f != MaskFn::Null).then(|| 0f32.to_be_bytes().to_vec()),
        TypeClass::Float8 => (*f != MaskFn::Null).then(|| 0f64.to_be_bytes().to_vec()),
        TypeClass::Other => None,
    }
}

/// A big-endian two's-complement integer of 2, 4 or 8 bytes.
pub fn binary_int(value: &[u8]) -> Option<i64> {
    Some(match value.len() {
        2 => i64::from(i16::from_be_bytes([value[0], value[1]])),
        4 => i64::from(i32::from_be_bytes([value[0], value[1], value[2], value[3]])),
        8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(value);
            i64::from_be_bytes(b)
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MaskFn {
        MaskFn::Hash {
            key: Arc::from(&b"0123456789abcdef"[..]),
        }
    }

    #[test]
    fn redact_and_null() {
        assert_eq!(
            mask_text(&MaskFn::Redact, "523-81-4497").as_deref(),
            Some(REDACTED)
        );
        assert_eq!(mask_text(&MaskFn::Null, "523-81-4497"), None);
    }

    #[test]
    fn partial_keeps_the_tail_of_long_values_only() {
        let f = MaskFn::Partial { keep: 4 };
        assert_eq!(
            mask_text(&f, "4539148803436467").as_deref(),
            Some("************6467")
        );
        assert_eq!(mask_text(&f, "abc").as_deref(), Some("***"));
    }

    #[test]
    fn hash_is_keyed_stable_and_unreadable() {
        let a = mask_text(&key(), "zelda.quartz7@example.org").unwrap();
        assert_eq!(a, mask_text(&key(), "zelda.quartz7@example.org").unwrap());
        assert_ne!(a, mask_text(&key(), "marlow.vexby3@example.net").unwrap());
        let other = MaskFn::Hash {
            key: Arc::from(&b"another key of 16"[..]),
        };
        assert_ne!(a, mask_text(&other, "zelda.quartz7@example.org").unwrap());
        assert!(!a.contains("zelda"));
        assert!(!format!("{:?}", key()).contains("0123"));
    }

    #[test]
    fn format_keeps_the_shape() {
        assert_eq!(
            fake_like("zelda.quartz7@example.org"),
            "xxxxxxxxxxxxx@example.invalid"
        );
        let card = fake_like("4539 1488 0343 6467");
        assert_eq!(card.len(), 19);
        let digits: Vec<u8> = card
            .bytes()
            .filter(u8::is_ascii_digit)
            .map(|b| b - b'0')
            .collect();
        assert!(luhn(&digits), "{card}");
        assert_ne!(card, "4539 1488 0343 6467");
        assert_eq!(fake_like("523-81-4497"), "000-00-0000");
        assert_eq!(fake_like("+1-202-555-0143"), "+0-000-000-0000");
    }

    #[test]
    fn masked_values_keep_their_type() {
        assert_eq!(
            mask_value_text(&MaskFn::Redact, TypeClass::Int4, b"42"),
            Some(b"0".to_vec())
        );
        let h = mask_value_text(&key(), TypeClass::Int4, b"42").unwrap();
        let n: i64 = String::from_utf8(h).unwrap().parse().unwrap();
        assert!((0..=i64::from(i32::MAX)).contains(&n));
        assert_eq!(
            mask_value_text(
                &MaskFn::Partial { keep: 4 },
                TypeClass::Int8,
                b"4539148803436467"
            ),
            Some(b"6467".to_vec())
        );
        let json = mask_value_text(&MaskFn::Redact, TypeClass::Json, br#"{"a":"x"}"#).unwrap();
        assert!(serde_json::from_slice::<serde_json::Value>(&json).is_ok());
        assert_eq!(
            mask_value_text(&MaskFn::Redact, TypeClass::Other, b"{a,b}"),
            None
        );
        assert_eq!(
            mask_value_binary(&MaskFn::Redact, TypeClass::Int8, &7i64.to_be_bytes()),
            Some(0i64.to_be_bytes().to_vec())
        );
        let jsonb =
            mask_value_binary(&MaskFn::Redact, TypeClass::Jsonb, b"\x01\"secret\"").unwrap();
        assert_eq!(jsonb[0], 1);
        assert!(serde_json::from_slice::<serde_json::Value>(&jsonb[1..]).is_ok());
    }
}
