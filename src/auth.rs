//! Tenant tokens (PROTOCOL.md §5): parsing the tokens file and checking a CONNECT's token in
//! constant time.
//!
//! File format, one entry per line: `TENANT_ID TOKEN_HEX64 [AGENT_ID]`, separated by white
//! space; leading and trailing white space ignored; blank lines and lines starting with `#`
//! ignored; a tenant may have several lines (rotation); with AGENT_ID the token is good for that
//! agent only. Any other line makes the whole file invalid.

use std::collections::HashMap;
use std::path::Path;
use subtle::{Choice, ConstantTimeEq};

/// One token of a tenant.
#[derive(Clone)]
struct Entry {
    token: [u8; 32],
    agent: Option<u32>,
}

/// A loaded, valid tokens file.
#[derive(Clone, Default)]
pub struct Tokens {
    by_tenant: HashMap<u32, Vec<Entry>>,
    count: usize,
}

impl std::fmt::Debug for Tokens {
    // Never print a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tokens {{ tenants: {}, tokens: {} }}",
            self.by_tenant.len(),
            self.count
        )
    }
}

/// Why a tokens file is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokensError {
    #[error("{path}: cannot read the tokens file: {err}")]
    Read { path: String, err: String },
    #[error("tokens file line {line}: {msg} (expected `TENANT_ID TOKEN_HEX64 [AGENT_ID]`)")]
    Line { line: usize, msg: String },
}

fn parse_u32(field: &str, what: &str, line: usize) -> Result<u32, TokensError> {
    field.parse::<u32>().map_err(|_| TokensError::Line {
        line,
        msg: format!("{what} '{field}' is not a decimal number from 0 to 4294967295"),
    })
}

fn parse_hex32(field: &str, line: usize) -> Result<[u8; 32], TokensError> {
    let err = |msg: String| TokensError::Line { line, msg };
    if field.len() != 64 {
        return Err(err(format!(
            "the token has {} characters, it must be 64 hex digits",
            field.len()
        )));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(field, &mut out)
        .map_err(|_| err("the token is not hexadecimal".to_string()))?;
    Ok(out)
}

impl Tokens {
    /// Parses the text of a tokens file.
    pub fn parse(text: &str) -> Result<Tokens, TokensError> {
        let mut t = Tokens::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = l.split_whitespace().collect();
            if !(2..=3).contains(&fields.len()) {
                return Err(TokensError::Line {
                    line,
                    msg: format!("{} fields, expected 2 or 3", fields.len()),
                });
            }
            let tenant = parse_u32(fields[0], "tenant id", line)?;
            let token = parse_hex32(fields[1], line)?;
            let agent = fields
                .get(2)
                .map(|a| parse_u32(a, "agent id", line))
                .transpose()?;
            t.by_tenant
                .entry(tenant)
                .or_default()
                .push(Entry { token, agent });
            t.count += 1;
        }
        Ok(t)
    }

    /// Reads and parses a tokens file.
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|e| TokensError::Read {
            path: path.display().to_string(),
            err: e.to_string(),
        })?;
        Tokens::parse(&text)
    }

    /// Number of tokens loaded.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether `token` is good for `tenant` and `agent`. Every token of the tenant is compared,
    /// in constant time, whatever matches; a tenant with no tokens is refused.
    pub fn check(&self, tenant: u32, agent: u32, token: &[u8; 32]) -> bool {
        let Some(entries) = self.by_tenant.get(&tenant) else {
            return false;
        };
        let mut ok = Choice::from(0);
        for e in entries {
            let agent_ok = Choice::from(e.agent.is_none_or(|a| a == agent) as u8);
            ok |= e.token.ct_eq(token) & agent_ok;
        }
        ok.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    fn tok(h: &str) -> [u8; 32] {
        parse_hex32(h, 0).unwrap()
    }

    #[test]
    fn parses_and_checks() {
        let text = format!("# tenants\n\n  7 {A}  \n7\t{B} 42\n0 {A}\n");
        let t = Tokens::parse(&text).unwrap();
        assert_eq!(t.len(), 3);
        assert!(t.check(7, 1, &tok(A)));
        assert!(t.check(7, 42, &tok(B)));
        assert!(
            !t.check(7, 43, &tok(B)),
            "agent-bound token used for another agent"
        );
        assert!(t.check(0, 0, &tok(A)));
        assert!(!t.check(8, 0, &tok(A)), "tenant with no tokens");
        assert!(!t.check(7, 1, &[0u8; 32]));
        assert!(!format!("{t:?}").contains("0011"));
    }

    #[test]
    fn malformed_lines_name_their_line() {
        let cases = [
            (format!("7 {A}\nbogus\n"), 2, "fields"),
            (format!("x {A}\n"), 1, "tenant id"),
            ("7 abcd\n".to_string(), 1, "64 hex"),
            (format!("7 {}\n", "g".repeat(64)), 1, "hexadecimal"),
            (format!("# c\n7 {A} 1 2\n"), 2, "fields"),
            (format!("7 {A} -1\n"), 1, "agent id"),
            (format!("4294967296 {A}\n"), 1, "tenant id"),
        ];
        for (text, line, needle) in cases {
            let e = Tokens::parse(&text).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, TokensError::Line { line: l, .. } if l == line),
                "{msg}"
            );
            assert!(msg.contains(needle), "{msg} lacks {needle}");
        }
    }

    #[test]
    fn load_reports_missing_file() {
        let e = Tokens::load(Path::new("/nonexistent/tokens")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/tokens"));
    }
}
