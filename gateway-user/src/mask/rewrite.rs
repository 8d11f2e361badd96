//! Rewriting what the server sends: DataRows, COPY rows, and the text
//! fields of errors and notices.

use std::borrow::Cow;
use std::collections::BTreeMap;

use super::detect;
use super::function::{
    binary_int, mask_text, mask_value_binary, mask_value_text, MaskFn, TypeClass,
};
use super::plan::{Action, ColumnPlan, RowPlan};
use crate::policy::masking::MaskSet;
use crate::wire::rows;
use crate::wire::{DecodeError, Frame};

/// Masked values per column, for the audit.
pub type Counts = BTreeMap<String, u64>;

/// Runs the detectors over a text value: every hit is masked by its
/// detector's rule. `None` when a hit's rule masks to NULL.
pub fn scan_text<'a>(set: &MaskSet, text: &'a str) -> (Option<Cow<'a, str>>, bool) {
    let hits = detect::find(text, set.detector_kinds());
    if hits.is_empty() {
        return (Some(Cow::Borrowed(text)), false);
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for h in hits {
        let Some((_, rule)) = set.detectors().iter().find(|(d, _)| *d == h.detector) else {
            continue;
        };
        out.push_str(&text[at..h.range.start]);
        match mask_text(&rule.function, &text[h.range.clone()]) {
            Some(m) => out.push_str(&m),
            None => return (None, true),
        }
        at = h.range.end;
    }
    out.push_str(&text[at..]);
    (Some(Cow::Owned(out)), true)
}

/// The function of the detector rule that fires first, for values that
/// cannot be rewritten in place (numbers).
fn detector_function(set: &MaskSet) -> MaskFn {
    set.detectors()
        .first()
        .map(|(_, r)| r.function.clone())
        .unwrap_or(MaskFn::Redact)
}

/// One value through its column's plan. `Ok(None)` is NULL; the bool says
/// whether it was masked.
fn value<'a>(set: &MaskSet, plan: &ColumnPlan, v: &'a [u8]) -> (Option<Cow<'a, [u8]>>, bool) {
    match &plan.action {
        Action::Pass => (Some(Cow::Borrowed(v)), false),
        Action::Mask(rule) => {
            let m = if plan.binary {
                mask_value_binary(&rule.function, plan.class, v)
            } else {
                mask_value_text(&rule.function, plan.class, v)
            };
            (m.map(Cow::Owned), true)
        }
        Action::Scan => {
            let is_number = matches!(
                plan.class,
                TypeClass::Int2 | TypeClass::Int4 | TypeClass::Int8 | TypeClass::Numeric
            );
            if plan.binary && plan.class == TypeClass::Int8 {
                // A card number fits in a bigint.
                let text = binary_int(v).map(|n| n.to_string()).unwrap_or_default();
                if detect::find(&text, set.detector_kinds()).is_empty() {
                    return (Some(Cow::Borrowed(v)), false);
                }
                let f = detector_function(set);
                return (mask_value_binary(&f, plan.class, v).map(Cow::Owned), true);
            }
            if plan.binary
                && !matches!(
                    plan.class,
                    TypeClass::Text | TypeClass::Json | TypeClass::Jsonb
                )
            {
                return (Some(Cow::Borrowed(v)), false);
            }
            let (prefix, body) = if plan.binary && plan.class == TypeClass::Jsonb {
                v.split_at(v.len().min(1))
            } else {
                (&v[..0], v)
            };
            let Ok(text) = std::str::from_utf8(body) else {
                return (Some(Cow::Borrowed(v)), false);
            };
            if is_number {
                if detect::find(text, set.detector_kinds()).is_empty() {
                    return (Some(Cow::Borrowed(v)), false);
                }
                let f = detector_function(set);
                return (mask_value_text(&f, plan.class, v).map(Cow::Owned), true);
            }
            match scan_text(set, text) {
                (Some(Cow::Borrowed(_)), false) => (Some(Cow::Borrowed(v)), false),
                (Some(t), _) => {
                    let mut out = prefix.to_vec();
                    out.extend_from_slice(t.as_bytes());
                    (Some(Cow::Owned(out)), true)
                }
                (None, _) => (None, true),
            }
        }
    }
}

fn count(counts: &mut Counts, label: &str) {
    *counts.entry(label.to_owned()).or_default() += 1;
}

/// Rewrites a DataRow; `None` when nothing in it changed.
pub fn data_row(
    set: &MaskSet,
    plan: &RowPlan,
    body: &[u8],
    counts: &mut Counts,
) -> Result<Option<Frame>, DecodeError> {
    let values = rows::decode_data_row(body)?;
    let mut out: Vec<Option<Cow<'_, [u8]>>> = Vec::with_capacity(values.len());
    let mut changed = false;
    for (i, v) in values.into_iter().enumerate() {
        let Some(v) = v else {
            out.push(None);
            continue;
        };
        let Some(p) = plan.columns().get(i) else {
            out.push(Some(Cow::Borrowed(v)));
            continue;
        };
        let (m, masked) = value(set, p, v);
        if masked {
            changed = true;
            count(counts, &p.label);
        }
        out.push(m);
    }
    if !changed {
        return Ok(None);
    }
    Ok(Some(rows::data_row(out.iter().map(|v| v.as_deref()))))
}

/// How COPY rows are written, from the COPY statement's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyFormat {
    Text { delimiter: u8 },
    Csv { delimiter: u8, quote: u8 },
    Binary,
}

/// COPY TO STDOUT output, rewritten row by row. Binary COPY may split a
/// tuple across CopyData messages, so bytes are carried over.
pub struct CopyMasker {
    pub format: CopyFormat,
    pub plan: RowPlan,
    carry: Vec<u8>,
    header_done: bool,
}

impl CopyMasker {
    pub fn new(format: CopyFormat, plan: RowPlan) -> Self {
        Self {
            format,
            plan,
            carry: Vec::new(),
            header_done: false,
        }
    }

    /// Rewrites one CopyData payload; returns the payload to send.
    pub fn data(&mut self, set: &MaskSet, data: &[u8], counts: &mut Counts) -> Vec<u8> {
        match self.format.clone() {
            CopyFormat::Text { delimiter } => self.text_row(set, data, delimiter, counts),
            CopyFormat::Csv { delimiter, quote } => {
                self.csv_row(set, data, delimiter, quote, counts)
            }
            CopyFormat::Binary => self.binary(set, data, counts),
        }
    }

    fn text_row(&self, set: &MaskSet, data: &[u8], delim: u8, counts: &mut Counts) -> Vec<u8> {
        let (line, eol) = match data.strip_suffix(b"\n") {
            Some(l) => (l, &b"\n"[..]),
            None => (data, &b""[..]),
        };
        let mut out = Vec::with_capacity(data.len());
        for (i, field) in line.split(|b| *b == delim).enumerate() {
            if i > 0 {
                out.push(delim);
            }
            let plan = self.plan.columns().get(i);
            match plan {
                Some(p) if field != b"\\N" && !matches!(p.action, Action::Pass) => {
                    let raw = unescape_text(field);
                    let (m, masked) = value(
                        set,
                        &ColumnPlan {
                            binary: false,
                            ..p.clone()
                        },
                        &raw,
                    );
                    if masked {
                        count(counts, &p.label);
                    }
                    match m {
                        Some(v) => out.extend_from_slice(&escape_text(&v, delim)),
                        None => out.extend_from_slice(b"\\N"),
                    }
                }
                _ => out.extend_from_slice(field),
            }
        }
        out.extend_from_slice(eol);
        out
    }

    fn csv_row(
        &self,
        set: &MaskSet,
        data: &[u8],
        delim: u8,
        quote: u8,
        counts: &mut Counts,
    ) -> Vec<u8> {
        let fields = split_csv(data, delim, quote);
        let mut out = Vec::with_capacity(data.len());
        for (i, (raw, quoted)) in fields.iter().enumerate() {
            if i > 0 {
                out.push(delim);
            }
            let is_null = !quoted && raw.is_empty();
            match self.plan.columns().get(i) {
                Some(p) if !is_null && !matches!(p.action, Action::Pass) => {
                    let (m, masked) = value(
                        set,
                        &ColumnPlan {
                            binary: false,
                            ..p.clone()
                        },
                        raw,
                    );
                    if masked {
                        count(counts, &p.label);
                    }
                    if let Some(v) = m {
                        out.push(quote);
                        for &b in v.iter() {
                            if b == quote {
                                out.push(quote);
                            }
                            out.push(b);
                        }
                        out.push(quote);
                    }
                }
                _ => {
                    if *quoted {
                        out.push(quote);
                        for &b in raw {
                            if b == quote {
                                out.push(quote);
                            }
                            out.push(b);
                        }
                        out.push(quote);
                    } else {
                        out.extend_from_slice(raw);
                    }
                }
            }
        }
        out.push(b'\n');
        out
    }

    fn binary(&mut self, set: &MaskSet, data: &[u8], counts: &mut Counts) -> Vec<u8> {
        self.carry.extend_from_slice(data);
        let buf = std::mem::take(&mut self.carry);
        let mut out = Vec::with_capacity(buf.len());
        let mut at = 0;
        if !self.header_done {
            // Signature (11), flags (4), extension length (4) and extension.
            if buf.len() < 19 {
                self.carry = buf;
                return out;
            }
            let ext = u32::from_be_bytes([buf[15], buf[16], buf[17], buf[18]]) as usize;
            let end = 19usize.saturating_add(ext);
            if buf.len() < end {
                self.carry = buf;
                return out;
            }
            out.extend_from_slice(&buf[..end]);
            at = end;
            self.header_done = true;
        }
        loop {
            let rest = &buf[at..];
            if rest.len() < 2 {
                break;
            }
            let n = i16::from_be_bytes([rest[0], rest[1]]);
            if n == -1 {
                out.extend_from_slice(&rest[..2]);
                at += 2;
                continue;
            }
            // Find the tuple's end first; rewrite only complete tuples.
            let mut p = 2usize;
            let mut spans = Vec::with_capacity(n.max(0) as usize);
            let mut complete = true;
            for _ in 0..n.max(0) {
                if rest.len() < p + 4 {
                    complete = false;
                    break;
                }
                let len = i32::from_be_bytes([rest[p], rest[p + 1], rest[p + 2], rest[p + 3]]);
                p += 4;
                if len < 0 {
                    spans.push(None);
                    continue;
                }
                let len = len as usize;
                if rest.len() < p + len {
                    complete = false;
                    break;
                }
                spans.push(Some(p..p + len));
                p += len;
            }
            if !complete {
                break;
            }
            out.extend_from_slice(&rest[..2]);
            for (i, span) in spans.into_iter().enumerate() {
                let Some(span) = span else {
                    out.extend_from_slice(&(-1i32).to_be_bytes());
                    continue;
                };
                let v = &rest[span];
                let (m, masked) = match self.plan.columns().get(i) {
                    Some(plan) => {
                        let r = value(
                            set,
                            &ColumnPlan {
                                binary: true,
                                ..plan.clone()
                            },
                            v,
                        );
                        if r.1 {
                            count(counts, &plan.label);
                        }
                        r
                    }
                    None => (Some(Cow::Borrowed(v)), false),
                };
                let _ = masked;
                match m {
                    Some(v) => {
                        out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        out.extend_from_slice(&v);
                    }
                    None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                }
            }
            at += p;
        }
        self.carry = buf[at..].to_vec();
        out
    }
}

fn unescape_text(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut it = field.iter().copied().peekable();
    while let Some(b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b't') => out.push(b'\t'),
            Some(b'b') => out.push(8),
            Some(b'f') => out.push(12),
            Some(b'v') => out.push(11),
            Some(c) => out.push(c),
            None => out.push(b'\\'),
        }
    }
    out
}

fn escape_text(v: &[u8], delim: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    for &b in v {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' if delim == b'\t' => out.extend_from_slice(b"\\t"),
            d if d == delim => {
                out.push(b'\\');
                out.push(d);
            }
            _ => out.push(b),
        }
    }
    out
}

/// CSV fields of one row: (unquoted content, was quoted).
fn split_csv(data: &[u8], delim: u8, quote: u8) -> Vec<(Vec<u8>, bool)> {
    let line = data
        .strip_suffix(b"\r\n")
        .or_else(|| data.strip_suffix(b"\n"))
        .unwrap_or(data);
    let mut fields = Vec::new();
    let mut cur = Vec::new();
    let mut quoted = false;
    let mut in_quotes = false;
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        if in_quotes {
            if b == quote {
                if line.get(i + 1) == Some(&quote) {
                    cur.push(quote);
                    i += 1;
                } else {
                    in_quotes = false;
                }
            } else {
                cur.push(b);
            }
        } else if b == quote {
            in_quotes = true;
            quoted = true;
        } else if b == delim {
            fields.push((std::mem::take(&mut cur), quoted));
            quoted = false;
        } else {
            cur.push(b);
        }
        i += 1;
    }
    fields.push((cur, quoted));
    fields
}

/// Error and notice fields that can carry values: message, detail, hint,
/// context, internal query.
const VALUE_FIELDS: &[u8] = b"MDHWqp";

/// Scrubs an ErrorResponse or NoticeResponse. Detectors run over every
/// text field; when the session protects columns, the values PostgreSQL
/// quotes in data errors (class 22, 23 and PL/pgSQL's P0) are masked too,
/// since the gateway cannot tell which column they came from. Returns the
/// new frame when anything changed.
pub fn notice(set: &MaskSet, tag: u8, body: &[u8]) -> Result<Option<Frame>, DecodeError> {
    let mut fields = rows::decode_notice_fields(tag, body)?;
    let code = fields
        .iter()
        .find(|(k, _)| *k == b'C')
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    let data_error = set.has_column_rules()
        && (code.starts_with("22") || code.starts_with("23") || code.starts_with("P0"));
    let mut changed = false;
    for (k, v) in fields.iter_mut() {
        if !VALUE_FIELDS.contains(k) {
            continue;
        }
        let text = String::from_utf8_lossy(v).into_owned();
        let mut new = text.clone();
        if data_error {
            new = scrub_quoted(&new);
        }
        if !set.detectors().is_empty() {
            new = match scan_text(set, &new) {
                (Some(t), true) => t.into_owned(),
                (Some(_), false) => new,
                (None, _) => super::function::REDACTED.to_owned(),
            };
        }
        if new != text {
            changed = true;
            *v = new.into_bytes();
        }
    }
    if !changed {
        return Ok(None);
    }
    Ok(Some(rows::notice_frame(tag, &fields)))
}

/// Masks what PostgreSQL quotes as values: `"..."` in messages, the values
/// in `Key (cols)=(values)` and `Failing row contains (...)`.
pub fn scrub_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let q = rest.find('"');
        let k = rest.find(")=(");
        let f = rest.find("contains (");
        let next = [q.map(|i| (i, 0)), k.map(|i| (i, 1)), f.map(|i| (i, 2))]
            .into_iter()
            .flatten()
            .min_by_key(|(i, _)| *i);
        let Some((i, kind)) = next else {
            out.push_str(rest);
            return out;
        };
        let (open, close) = match kind {
            0 => (i + 1, '"'),
            1 => (i + 3, ')'),
            _ => (i + "contains (".len(), ')'),
        };
        out.push_str(&rest[..open]);
        let after = &rest[open..];
        // The closing mark is the last one on the line for parenthesised
        // values (they may hold parentheses themselves).
        let end = if close == ')' {
            after.find(")\n").or_else(|| after.rfind(')'))
        } else {
            after.find('"')
        };
        match end {
            Some(e) => {
                out.push_str(super::function::REDACTED);
                out.push(close);
                rest = &after[e + 1..];
            }
            None => {
                out.push_str(super::function::REDACTED);
                return out;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_are_scrubbed() {
        assert_eq!(
            scrub_quoted("invalid input syntax for type integer: \"+1-202-555-0143\""),
            "invalid input syntax for type integer: \"[masked]\""
        );
        assert_eq!(
            scrub_quoted("Key (email)=(zelda.quartz7@example.org) already exists."),
            "Key (email)=([masked]) already exists."
        );
        assert_eq!(
            scrub_quoted("Failing row contains (5, null, a(b)c)."),
            "Failing row contains ([masked])."
        );
    }

    #[test]
    fn csv_and_text_fields_split_like_the_server_writes_them() {
        assert_eq!(
            split_csv(b"1,\"a,\"\"b\",,\"\"\n", b',', b'"'),
            vec![
                (b"1".to_vec(), false),
                (b"a,\"b".to_vec(), true),
                (b"".to_vec(), false),
                (b"".to_vec(), true)
            ]
        );
        assert_eq!(unescape_text(b"a\\tb\\\\c"), b"a\tb\\c");
        assert_eq!(escape_text(b"a\tb\\c", b'\t'), b"a\\tb\\\\c");
    }
}
