//! Name patterns: `*` matches any run of characters, `?` one character.

/// A compiled pattern and how specific it is: exact names beat globs, and
/// longer literal parts beat shorter ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    pub text: String,
    pub specificity: u32,
    exact: bool,
}

impl Pattern {
    pub fn new(text: &str) -> Self {
        let exact = !text.contains(['*', '?']);
        let literal = text.chars().filter(|c| !matches!(c, '*' | '?')).count() as u32;
        Self {
            text: text.to_owned(),
            // Exact names rank above every glob.
            specificity: if exact { 1_000_000 + literal } else { literal },
            exact,
        }
    }

    pub fn matches(&self, s: &str) -> bool {
        if self.exact {
            self.text == s
        } else {
            glob_match(self.text.as_bytes(), s.as_bytes())
        }
    }
}

/// Iterative wildcard matching with one backtrack point: linear in practice.
pub fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(b"public.*", b"public.customers"));
        assert!(!glob_match(b"public.*", b"secret.customers"));
        assert!(glob_match(b"dblink*", b"dblink_exec"));
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"a?c", b"abc"));
        assert!(!glob_match(b"a?c", b"ac"));
        assert!(glob_match(b"*.*_log", b"app.audit_log"));
        assert!(Pattern::new("pg_read_file").specificity > Pattern::new("pg_*").specificity);
        assert!(Pattern::new("pg_*").specificity > Pattern::new("*").specificity);
    }
}
