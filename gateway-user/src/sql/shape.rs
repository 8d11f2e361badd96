//! The shape of a statement text: the text with every plain numeric
//! literal replaced by `0`, so that `... WHERE aid = 17` and `... WHERE aid
//! = 42` share one analysis. Nothing the gateway decides depends on the value
//! of a number in an expression; where a number does matter (the value of an
//! option such as `EXPLAIN (ANALYZE 0)`), the analysis says it is not
//! shareable and is only cached under its exact text.
//!
//! The scanner follows PostgreSQL's lexical rules for what can hide a digit:
//! quoted strings (with `''`, and backslash escapes in `E'...'`), quoted
//! identifiers, dollar quotes, comments (nested block comments too) and
//! parameters. Anything it is unsure of (an unterminated quote, a digit run
//! glued to letters, exponents) is left as written, which only costs a
//! cache miss, never a wrong merge.

/// Writes the shape into `out` (cleared first) and returns true; false when
/// the text has no number to replace (then the exact text is the key
/// already) or the scanner gave up. The caller's buffer is reused from
/// statement to statement: the shape is only a lookup key, so it stays
/// bytes and is neither allocated nor checked for UTF-8 each time.
pub fn shape(text: &str, out: &mut Vec<u8>) -> bool {
    out.clear();
    let b = text.as_bytes();
    let mut replaced = false;
    let mut copied = 0; // bytes of `b` already accounted for in `out`
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        // One table lookup sorts out the bytes that start nothing (spaces,
        // operators, punctuation) and words: most of any statement.
        match CLASS[usize::from(c)] {
            PLAIN => i += 1,
            WORD => {
                // An identifier or keyword, digits and all.
                // `E'..'`, `B'..'`, `X'..'`, `U&'..'` are handled at the quote.
                i += 1;
                while i < b.len() && IDENT[usize::from(b[i])] {
                    i += 1;
                }
            }
            DIGIT if ident_char_before(b, i) || (i > 0 && b[i - 1] == b'.') => i += 1,
            DIGIT => {
                let start = i;
                while b.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
                if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                    while b.get(i).is_some_and(u8::is_ascii_digit) {
                        i += 1;
                    }
                }
                // Glued to letters, `_`, `.` or `$`: not a plain literal.
                if b.get(i).is_some_and(|x| {
                    x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'$') || *x >= 0x80
                }) {
                    while b.get(i).is_some_and(|x| {
                        x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'$')
                    }) {
                        i += 1;
                    }
                    continue;
                }
                out.extend_from_slice(&b[copied..start]);
                out.push(b'0');
                replaced = true;
                copied = i;
            }
            _ => match c {
                b'\'' => {
                    let escapes =
                        i > 0 && matches!(b[i - 1], b'e' | b'E') && !ident_char_before(b, i - 1);
                    match skip_quoted(b, i + 1, b'\'', escapes) {
                        Some(next) => i = next,
                        None => return false,
                    }
                }
                b'"' => match skip_quoted(b, i + 1, b'"', false) {
                    Some(next) => i = next,
                    None => return false,
                },
                b'-' if b.get(i + 1) == Some(&b'-') => {
                    i = b[i..]
                        .iter()
                        .position(|&x| x == b'\n')
                        .map_or(b.len(), |p| i + p + 1);
                }
                b'/' if b.get(i + 1) == Some(&b'*') => match skip_block_comment(b, i) {
                    Some(next) => i = next,
                    None => return false,
                },
                b'$' => {
                    // `$1` parameters and `$tag$...$tag$` strings.
                    let start = i;
                    i += 1;
                    if b.get(i).is_some_and(u8::is_ascii_digit) {
                        while b.get(i).is_some_and(u8::is_ascii_digit) {
                            i += 1;
                        }
                        continue;
                    }
                    while b
                        .get(i)
                        .is_some_and(|x| x.is_ascii_alphanumeric() || *x == b'_' || *x >= 0x80)
                    {
                        i += 1;
                    }
                    if b.get(i) == Some(&b'$') && !ident_char_before(b, start) {
                        let tag = &b[start..=i];
                        let body = i + 1;
                        let Some(end) = find(&b[body..], tag) else {
                            return false;
                        };
                        i = body + end + tag.len();
                    }
                }
                // A lone `-` or `/`.
                _ => i += 1,
            },
        }
    }
    if replaced {
        out.extend_from_slice(&b[copied..]);
    }
    replaced
}

const PLAIN: u8 = 0;
const WORD: u8 = 1;
const DIGIT: u8 = 2;
const SPECIAL: u8 = 3;

/// What each byte can start: nothing, a word, a number, or a quote,
/// comment, parameter or dollar string (`'`, `"`, `-`, `/`, `$`).
const CLASS: [u8; 256] = {
    let mut t = [PLAIN; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        t[i] = if c.is_ascii_digit() {
            DIGIT
        } else if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            WORD
        } else if matches!(c, b'\'' | b'"' | b'-' | b'/' | b'$') {
            SPECIAL
        } else {
            PLAIN
        };
        i += 1;
    }
    t
};

/// Bytes that continue an identifier or keyword: letters, digits, `_`, `$`
/// and every byte of a multi-byte character.
const IDENT: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        t[i] = c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
        i += 1;
    }
    t
};

fn ident_char_before(b: &[u8], i: usize) -> bool {
    i > 0 && IDENT[usize::from(b[i - 1])]
}

/// Index just past the closing quote; `None` when unterminated.
fn skip_quoted(b: &[u8], mut i: usize, q: u8, escapes: bool) -> Option<usize> {
    while i < b.len() {
        let c = b[i];
        if escapes && c == b'\\' {
            i += 2;
            continue;
        }
        if c == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
                continue;
            }
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

fn skip_block_comment(b: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
    while i + 1 < b.len() {
        if b[i] == b'/' && b[i + 1] == b'*' {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b[i + 1] == b'/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Some(i);
            }
        } else {
            i += 1;
        }
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    /// The shape as text, or `None`, for readable assertions.
    fn shape(text: &str) -> Option<String> {
        let mut out = Vec::new();
        super::shape(text, &mut out).then(|| String::from_utf8(out).unwrap())
    }

    #[test]
    fn numbers_in_expressions_are_replaced() {
        assert_eq!(
            shape("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;").as_deref(),
            Some("SELECT abalance FROM pgbench_accounts WHERE aid = 0;")
        );
        assert_eq!(
            shape("UPDATE t SET b = b + -4821 WHERE id = 3.75").as_deref(),
            Some("UPDATE t SET b = b + -0 WHERE id = 0")
        );
        assert_eq!(shape("SELECT 1"), shape("SELECT 2"));
    }

    #[test]
    fn digits_that_are_not_numeric_literals_stay() {
        for sql in [
            "SELECT t1.c2 FROM t1",
            "SELECT $1, $2",
            "SELECT '123', \"col1\", E'\\'5', $q$ 7 $q$, $$ 8 $$",
            "SELECT 1e5x",
            "SELECT x -- 42\n",
            "SELECT /* 1 /* 2 */ 3 */ x",
            "SELECT 0x1F, 1_000, .5, 1.",
        ] {
            assert_eq!(shape(sql), None, "{sql}");
        }
    }

    #[test]
    fn unterminated_quotes_give_up() {
        assert_eq!(shape("SELECT 'abc 1"), None);
        assert_eq!(shape("SELECT $a$ 1"), None);
        assert_eq!(shape("SELECT /* 1"), None);
    }

    #[test]
    fn standard_strings_do_not_take_backslash_escapes() {
        // 'a\' ends at the second quote; the 5 after it is a number.
        assert_eq!(shape("SELECT 'a\\', 5").as_deref(), Some("SELECT 'a\\', 0"));
        assert_eq!(shape("SELECT E'a\\', 5'").as_deref(), None);
    }
}
