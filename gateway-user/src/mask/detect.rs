//! Value detectors: find sensitive values inside any text, whatever column
//! or expression it came from. Patterns find candidates; checksums (Luhn,
//! IBAN mod 97) and plausibility checks keep look-alikes out.

use std::ops::Range;
use std::sync::OnceLock;

use regex::Regex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Detector {
    Email,
    Ssn,
    Card,
    Phone,
    Iban,
    Jwt,
    ApiKey,
    PrivateKey,
}

impl Detector {
    pub const ALL: [Detector; 8] = [
        Detector::Email,
        Detector::Ssn,
        Detector::Card,
        Detector::Phone,
        Detector::Iban,
        Detector::Jwt,
        Detector::ApiKey,
        Detector::PrivateKey,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Detector::Email => "email",
            Detector::Ssn => "ssn",
            Detector::Card => "card",
            Detector::Phone => "phone",
            Detector::Iban => "iban",
            Detector::Jwt => "jwt",
            Detector::ApiKey => "api_key",
            Detector::PrivateKey => "private_key",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == s)
    }

    fn pattern(self) -> &'static str {
        match self {
            Detector::Email => {
                r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
            }
            Detector::Ssn => r"\b\d{3}[- ]\d{2}[- ]\d{4}\b",
            Detector::Card => r"\b\d(?:[ \-]?\d){12,18}\b",
            Detector::Phone => {
                r"(?:\+\d{1,3}[ .\-]?)?(?:\(\d{3}\)|\b\d{3})[ .\-]\d{3}[ .\-]\d{4}\b|\+\d{8,15}\b"
            }
            Detector::Iban => r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b",
            Detector::Jwt => r"\beyJ[A-Za-z0-9_\-]{5,}\.eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]*",
            Detector::ApiKey => concat!(
                r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
                r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b",
                r"|\bgithub_pat_[A-Za-z0-9_]{40,}\b",
                r"|\bxox[abposr]-[A-Za-z0-9\-]{10,}",
                r"|\b[rs]k_(?:live|test)_[A-Za-z0-9]{16,}\b",
                r"|\bsk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}",
                r"|\bAIza[0-9A-Za-z_\-]{35}\b",
                r"|\bglpat-[A-Za-z0-9_\-]{20,}\b"
            ),
            Detector::PrivateKey => {
                r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?s:.*?)(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\z)"
            }
        }
    }

    fn regex(self) -> &'static Regex {
        static COMPILED: OnceLock<Vec<Regex>> = OnceLock::new();
        let all = COMPILED.get_or_init(|| {
            Self::ALL
                .iter()
                // The patterns are constants checked by the tests below.
                .map(|d| Regex::new(d.pattern()).unwrap_or_else(|_| never_matches()))
                .collect()
        });
        &all[self as usize]
    }

    /// A cheap test that rules most values out before any pattern runs:
    /// each kind needs a marker character or enough digits.
    fn may_occur(self, text: &str, digits: usize) -> bool {
        match self {
            Detector::Email => text.contains('@'),
            Detector::Ssn => digits >= 9,
            Detector::Card => digits >= 13,
            Detector::Phone => digits >= 8,
            Detector::Iban => digits >= 2 && text.len() >= 15,
            Detector::Jwt => text.contains("eyJ"),
            Detector::ApiKey => text.len() >= 20,
            Detector::PrivateKey => text.contains("PRIVATE KEY"),
        }
    }

    /// Whether a candidate the pattern found is the real thing.
    fn confirms(self, m: &str) -> bool {
        match self {
            Detector::Card => {
                let digits: Vec<u8> = m
                    .bytes()
                    .filter(u8::is_ascii_digit)
                    .map(|b| b - b'0')
                    .collect();
                (13..=19).contains(&digits.len()) && luhn(&digits)
            }
            Detector::Ssn => {
                let d: Vec<u8> = m.bytes().filter(u8::is_ascii_digit).collect();
                // Never issued: area 000, 666, 900-999; group 00; serial 0000.
                d.len() == 9
                    && &d[0..3] != b"000"
                    && &d[0..3] != b"666"
                    && d[0] != b'9'
                    && &d[3..5] != b"00"
                    && &d[5..9] != b"0000"
            }
            Detector::Iban => iban_valid(m),
            _ => true,
        }
    }
}

fn never_matches() -> Regex {
    // `[^\s\S]` is a class nothing belongs to.
    Regex::new(r"[^\s\S]").unwrap_or_else(|_| unreachable!("constant pattern"))
}

/// The Luhn checksum of payment card numbers.
pub fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    !digits.is_empty() && sum.is_multiple_of(10)
}

/// ISO 13616: move the first four characters to the end, letters to
/// numbers (A=10), and the result mod 97 is 1.
pub fn iban_valid(s: &str) -> bool {
    let compact: Vec<u8> = s.bytes().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut rem: u32 = 0;
    for &b in tail.iter().chain(head) {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// One confirmed hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub detector: Detector,
    pub range: Range<usize>,
}

/// Every confirmed, non-overlapping hit of `detectors` in `text`, in order.
/// Earlier detectors in `Detector::ALL` win an overlap (a private key block
/// swallows whatever it contains, for instance, because it is listed last
/// and is checked for containment).
pub fn find(text: &str, detectors: &[Detector]) -> Vec<Hit> {
    let mut hits: Vec<Hit> = Vec::new();
    let digits = text.bytes().filter(u8::is_ascii_digit).count();
    for &d in detectors {
        if !d.may_occur(text, digits) {
            continue;
        }
        for m in d.regex().find_iter(text) {
            if d.confirms(m.as_str()) {
                hits.push(Hit {
                    detector: d,
                    range: m.range(),
                });
            }
        }
    }
    if hits.len() > 1 {
        // Longest first at each start, then drop anything overlapping a kept hit.
        hits.sort_by(|a, b| {
            a.range
                .start
                .cmp(&b.range.start)
                .then(b.range.end.cmp(&a.range.end))
        });
        let mut kept: Vec<Hit> = Vec::with_capacity(hits.len());
        for h in hits {
            match kept.last_mut() {
                Some(last) if h.range.start < last.range.end => {
                    last.range.end = last.range.end.max(h.range.end);
                }
                _ => kept.push(h),
            }
        }
        hits = kept;
    }
    hits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str, d: Detector) -> Vec<String> {
        find(text, &[d])
            .into_iter()
            .map(|h| text[h.range].to_owned())
            .collect()
    }

    #[test]
    fn every_pattern_compiles() {
        for d in Detector::ALL {
            assert!(Regex::new(d.pattern()).is_ok(), "{}", d.name());
        }
    }

    #[test]
    fn email() {
        assert_eq!(
            found("contact: zelda.quartz7@example.org.", Detector::Email),
            ["zelda.quartz7@example.org"]
        );
        assert!(found("not an address: a@b, @example.org", Detector::Email).is_empty());
    }

    #[test]
    fn ssn_rejects_never_issued_numbers() {
        assert_eq!(found("ssn 523-81-4497", Detector::Ssn), ["523-81-4497"]);
        assert!(found(
            "000-12-3456 666-12-3456 912-12-3456 123-00-4567",
            Detector::Ssn
        )
        .is_empty());
        assert!(found("5238144970", Detector::Ssn).is_empty());
    }

    #[test]
    fn card_needs_luhn() {
        assert_eq!(
            found("4539148803436467", Detector::Card),
            ["4539148803436467"]
        );
        assert_eq!(
            found("card 4539 1488 0343 6467 ok", Detector::Card),
            ["4539 1488 0343 6467"]
        );
        // One digit changed: the checksum fails, so it is not a card.
        assert!(found("4539148803436468", Detector::Card).is_empty());
        assert!(found("order 1234567890", Detector::Card).is_empty());
    }

    #[test]
    fn phone() {
        assert_eq!(
            found("+1-202-555-0143", Detector::Phone),
            ["+1-202-555-0143"]
        );
        assert_eq!(
            found("call (202) 555-0178 now", Detector::Phone),
            ["(202) 555-0178"]
        );
        assert_eq!(found("+442079460958", Detector::Phone), ["+442079460958"]);
        assert!(found("version 1.2.3, total 19.99", Detector::Phone).is_empty());
    }

    #[test]
    fn iban_needs_its_checksum() {
        assert_eq!(
            found("GB82 WEST 1234 5698 7654 32", Detector::Iban),
            ["GB82 WEST 1234 5698 7654 32"]
        );
        assert_eq!(
            found("DE89370400440532013000", Detector::Iban),
            ["DE89370400440532013000"]
        );
        assert!(found("DE89370400440532013001", Detector::Iban).is_empty());
    }

    #[test]
    fn tokens_and_keys() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        assert_eq!(found(&format!("Bearer {jwt}"), Detector::Jwt), [jwt]);
        assert_eq!(
            found("key=AKIAIOSFODNN7EXAMPLE;", Detector::ApiKey),
            ["AKIAIOSFODNN7EXAMPLE"]
        );
        assert_eq!(
            found("ghp_abcdefghijklmnopqrstuvwxyz0123456789", Detector::ApiKey),
            ["ghp_abcdefghijklmnopqrstuvwxyz0123456789"]
        );
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----";
        assert_eq!(found(&format!("x {pem} y"), Detector::PrivateKey), [pem]);
        assert!(found("-----BEGIN PUBLIC KEY-----", Detector::PrivateKey).is_empty());
        assert!(found("AKIA1234", Detector::ApiKey).is_empty());
    }

    #[test]
    fn overlaps_merge() {
        let hits = find("4539148803436467", &[Detector::Card, Detector::Phone]);
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].range, 0..16);
    }
}
