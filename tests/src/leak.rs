//! The corpus leak check (../shared/corpus/README.md, "Leak check"): a
//! protected value leaks when it appears in what the client received as
//! is, lower- or upper-cased, with separators removed, reversed,
//! hex-encoded or base64-encoded, or as any 10-character run of those.

/// Every form of `value` to look for, each as (needle, case-insensitive).
pub fn forms(value: &str) -> Vec<(String, bool)> {
    let stripped: String = value.chars().filter(|c| c.is_alphanumeric()).collect();
    let mut whole: Vec<(String, bool)> = Vec::new();
    for v in [value.to_owned(), stripped] {
        let reversed: String = v.chars().rev().collect();
        whole.push((hex(v.as_bytes()), true));
        whole.push((base64(v.as_bytes()), false));
        whole.push((hex(reversed.as_bytes()), true));
        whole.push((reversed, true));
        whole.push((v, true));
    }
    let mut out = Vec::new();
    for (f, ci) in whole {
        let chars: Vec<char> = f.chars().collect();
        if chars.len() <= 10 {
            out.push((f, ci));
            continue;
        }
        for w in chars.windows(10) {
            out.push((w.iter().collect(), ci));
        }
    }
    out.sort();
    out.dedup();
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn base64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = match chunk {
            [a, b, c] => (u32::from(*a) << 16) | (u32::from(*b) << 8) | u32::from(*c),
            [a, b] => (u32::from(*a) << 16) | (u32::from(*b) << 8),
            [a] => u32::from(*a) << 16,
            _ => 0,
        };
        let idx = [(n >> 18) & 63, (n >> 12) & 63, (n >> 6) & 63, n & 63];
        for (i, x) in idx.iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(T[*x as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The first protected value found in `received`, with the form that
/// matched.
pub fn find(received: &[u8], protected: &[String]) -> Option<(String, String)> {
    let text = String::from_utf8_lossy(received);
    let lower = text.to_lowercase();
    for value in protected {
        for (form, ci) in forms(value) {
            let hit = if ci {
                lower.contains(&form.to_lowercase())
            } else {
                text.contains(&form)
            };
            if hit {
                return Some((value.clone(), form));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_form_is_found() {
        let p = vec!["523-81-4497".to_owned()];
        assert!(find(b"x 523-81-4497 y", &p).is_some());
        assert!(find(b"523814497", &p).is_some());
        assert!(find(b"7944-18-325", &p).is_some());
        assert!(find(hex(b"523-81-4497").to_uppercase().as_bytes(), &p).is_some());
        assert!(find(base64(b"523-81-4497").as_bytes(), &p).is_some());
        assert!(find(b"[masked]", &p).is_none());
        let e = vec!["zelda.quartz7@example.org".to_owned()];
        assert!(find(b"ZELDA.QUARTZ7", &e).is_some());
        assert!(find(b"xxxxxxxxxxxxx@example.invalid", &e).is_none());
        assert_eq!(base64(b"ab"), "YWI=");
    }
}
