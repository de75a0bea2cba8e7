//! Finds where a JSON path (`apis[0].cors.allowed_origins[1]`) stands in a policy document, so
//! semantic errors can name a line as well as a field. Best effort: `None` when it cannot tell.
//! Also finds the values that may hold secrets, so error context can show the document's
//! lines without them ([`secret_spans`]).
//!
//! Hand-written: serde_json keeps no positions of values, and no maintained crate finds them.

use std::ops::Range;

/// 1-based (line, column) of the value at `path` in `text`.
pub fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
    let target = parse_path(path)?;
    let mut scanner = Scanner {
        bytes: text.as_bytes(),
        pos: 0,
        depth: 0,
    };
    let offset = scanner.find(&target)?;
    let before = text.get(..offset)?;
    let line = before.matches('\n').count().saturating_add(1);
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |l| l.chars().count())
        .saturating_add(1);
    Some((line, column))
}

#[derive(Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

fn parse_path(path: &str) -> Option<Vec<Step>> {
    let mut steps = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty() && *p != "$") {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (part.get(..i)?, part.get(i..)?),
            None => (part, ""),
        };
        if !name.is_empty() {
            steps.push(Step::Key(name.to_string()));
        }
        while let Some(r) = rest.strip_prefix('[') {
            let (n, after) = r.split_once(']')?;
            steps.push(Step::Index(n.parse().ok()?));
            rest = after;
        }
    }
    Some(steps)
}

struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
    depth: usize,
}

impl Scanner<'_> {
    /// Moves on `n` bytes (positions stay within the policy text, at most 1 MiB).
    fn advance(&mut self, n: usize) {
        self.pos = self.pos.saturating_add(n);
    }

    fn ws(&mut self) {
        while self
            .bytes
            .get(self.pos)
            .is_some_and(|b| b.is_ascii_whitespace())
        {
            self.advance(1);
        }
    }

    /// Offset of the value at `path`, starting at the value under the cursor.
    fn find(&mut self, path: &[Step]) -> Option<usize> {
        self.ws();
        let Some((step, rest)) = path.split_first() else {
            return Some(self.pos);
        };
        self.depth = self.depth.saturating_add(1);
        if self.depth > 64 {
            return None;
        }
        match (step, self.bytes.get(self.pos)?) {
            (Step::Key(want), b'{') => {
                self.advance(1);
                loop {
                    self.ws();
                    if self.bytes.get(self.pos)? == &b'}' {
                        return None;
                    }
                    let key = self.string()?;
                    self.ws();
                    if self.bytes.get(self.pos)? != &b':' {
                        return None;
                    }
                    self.advance(1);
                    if key == *want {
                        return self.find(rest);
                    }
                    self.skip_value()?;
                    self.ws();
                    match self.bytes.get(self.pos)? {
                        b',' => self.advance(1),
                        _ => return None,
                    }
                }
            }
            (Step::Index(want), b'[') => {
                self.advance(1);
                for i in 0.. {
                    self.ws();
                    if self.bytes.get(self.pos)? == &b']' {
                        return None;
                    }
                    if i == *want {
                        return self.find(rest);
                    }
                    self.skip_value()?;
                    self.ws();
                    match self.bytes.get(self.pos)? {
                        b',' => self.advance(1),
                        _ => return None,
                    }
                }
                None
            }
            _ => None,
        }
    }

    fn string(&mut self) -> Option<String> {
        if self.bytes.get(self.pos)? != &b'"' {
            return None;
        }
        let start = self.pos;
        self.advance(1);
        loop {
            match self.bytes.get(self.pos)? {
                b'\\' => self.advance(2),
                b'"' => {
                    self.advance(1);
                    let raw = std::str::from_utf8(self.bytes.get(start..self.pos)?).ok()?;
                    return serde_json::from_str(raw).ok();
                }
                _ => self.advance(1),
            }
        }
    }

    fn skip_value(&mut self) -> Option<()> {
        self.ws();
        match self.bytes.get(self.pos)? {
            b'"' => self.string().map(|_| ()),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.bytes.get(self.pos)? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth = depth.saturating_add(1),
                        b'}' | b']' => {
                            depth = depth.checked_sub(1)?;
                            if depth == 0 {
                                self.advance(1);
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.advance(1);
                }
            }
            _ => {
                while self
                    .bytes
                    .get(self.pos)
                    .is_some_and(|b| !matches!(b, b',' | b'}' | b']') && !b.is_ascii_whitespace())
                {
                    self.advance(1);
                }
                Some(())
            }
        }
    }
}

/// The private members of a JWK: a symmetric key (`k`) or an RSA/EC private key.
const JWK_PRIVATE: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "k", "oth"];

/// Byte ranges of the values in `text` that may hold secrets, for printing a policy's lines
/// with them masked: every value under `"value"`, `"hmac_secret"`, `"hash_key"` or
/// `"inject_headers"` (but
/// an `"env"` variable name), unknown keys next to them, the private members of a JWK under
/// `"jwks"`, and a `"keys_sha256"` entry that is not a SHA-256 hash (a raw subscription key
/// pasted there). Strings are covered without their quotes. It reads broken JSON too (syntax
/// errors are shown with context): it never fails, and a string left open ends at the line's
/// end, as the JSON parser stops there.
pub fn secret_spans(text: &str) -> Vec<Range<usize>> {
    let mut scan = SecretScan {
        bytes: text.as_bytes(),
        pos: 0,
        frames: Vec::new(),
        spans: Vec::new(),
    };
    scan.run();
    scan.spans
}

/// An open object or array, and what its members are.
#[derive(Default)]
struct Frame {
    object: bool,
    /// The member being read (objects only).
    key: Option<String>,
    expect_key: bool,
    /// Inside `value`, `hmac_secret`, `hash_key` or `inject_headers`: every value is secret but
    /// `env`.
    secret: bool,
    /// The `inject_headers` object itself: keys are header names, every value is secret.
    headers: bool,
    jwks: bool,
    hashes: bool,
}

struct SecretScan<'a> {
    bytes: &'a [u8],
    pos: usize,
    frames: Vec<Frame>,
    spans: Vec<Range<usize>>,
}

impl SecretScan<'_> {
    /// Moves on `n` bytes.
    fn advance(&mut self, n: usize) {
        self.pos = self.pos.saturating_add(n);
    }

    fn run(&mut self) {
        while let Some(&b) = self.bytes.get(self.pos) {
            match b {
                b'{' | b'[' => {
                    let child = self.child(b == b'{');
                    self.frames.push(child);
                    self.advance(1);
                }
                b'}' | b']' => {
                    self.frames.pop();
                    self.advance(1);
                }
                b',' => {
                    if let Some(f) = self.frames.last_mut().filter(|f| f.object) {
                        f.expect_key = true;
                        f.key = None;
                    }
                    self.advance(1);
                }
                b':' => {
                    if let Some(f) = self.frames.last_mut() {
                        f.expect_key = false;
                    }
                    self.advance(1);
                }
                b'"' => {
                    let (inner, raw) = self.string();
                    self.token(inner, raw);
                }
                _ if b.is_ascii_whitespace() => self.advance(1),
                _ => {
                    let start = self.pos;
                    while self
                        .bytes
                        .get(self.pos)
                        .is_some_and(|c| !c.is_ascii_whitespace() && !b"{}[],:\"".contains(c))
                    {
                        self.advance(1);
                    }
                    let raw =
                        String::from_utf8_lossy(self.bytes.get(start..self.pos).unwrap_or(&[]));
                    self.token(start..self.pos, raw.into_owned());
                }
            }
        }
    }

    /// The frame a container opened here gets, from where it stands.
    fn child(&self, object: bool) -> Frame {
        let parent = self.frames.last();
        let key = parent.and_then(|p| p.key.as_deref()).unwrap_or("");
        let jwks = parent.is_some_and(|p| p.jwks) || key == "jwks";
        Frame {
            object,
            key: None,
            expect_key: object,
            secret: parent.is_some_and(|p| p.secret)
                || matches!(key, "value" | "hmac_secret" | "hash_key" | "inject_headers")
                || (jwks && JWK_PRIVATE.contains(&key)),
            headers: key == "inject_headers",
            jwks,
            hashes: key == "keys_sha256",
        }
    }

    /// A string or bare token at `range` (its text decoded in `text`): a key or a value.
    fn token(&mut self, range: Range<usize>, text: String) {
        let Some(frame) = self.frames.last_mut() else {
            return;
        };
        if frame.object && frame.expect_key {
            let unknown = !matches!(text.as_str(), "value" | "env");
            if frame.secret && !frame.headers && unknown {
                self.spans.push(range);
            }
            frame.key = Some(text);
            frame.expect_key = false;
            return;
        }
        let key = frame.key.as_deref().unwrap_or("");
        let secret = frame.headers
            || (frame.secret && !(frame.object && key == "env"))
            || matches!(key, "value" | "hmac_secret" | "hash_key" | "inject_headers")
            || (frame.jwks && JWK_PRIVATE.contains(&key))
            || ((frame.hashes || key == "keys_sha256") && !is_sha256_hex(&text));
        if secret {
            self.spans.push(range);
        }
    }

    /// Reads a string from its opening quote: (the range of its content, its decoded text).
    fn string(&mut self) -> (Range<usize>, String) {
        let start = self.pos.saturating_add(1);
        let mut i = start;
        let end = loop {
            match self.bytes.get(i) {
                None | Some(b'\n') => break i,
                Some(b'"') => break i,
                Some(b'\\') => i = i.saturating_add(2),
                Some(_) => i = i.saturating_add(1),
            }
        };
        let end = end.min(self.bytes.len());
        self.pos = if self.bytes.get(end) == Some(&b'"') {
            end.saturating_add(1)
        } else {
            end
        };
        let raw = self.bytes.get(start..end).unwrap_or(&[]);
        let raw = String::from_utf8_lossy(raw);
        let text = serde_json::from_str::<String>(&format!("\"{raw}\""))
            .unwrap_or_else(|_| raw.into_owned());
        (start..end, text)
    }
}

fn is_sha256_hex(s: &str) -> bool {
    let s = s.trim();
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_values() {
        let text = "{\n  \"apis\": [\n    {\"name\": \"a\", \"x\": {\"k\": [1, {\"q\": \"}\"}]}},\n    {\n      \"ip_filter\": {\"allow\": [\"10.0.0.0/8\", \"bad\"]}\n    }\n  ]\n}";
        assert_eq!(locate(text, "apis[1].ip_filter.allow[1]"), Some((5, 45)));
        assert_eq!(locate(text, "apis[0].name"), Some((3, 14)));
        assert_eq!(locate(text, "apis[2]"), None);
        assert_eq!(locate(text, "nope"), None);
        assert_eq!(locate("[", "apis"), None);
    }

    /// The masked values of `text`, in order.
    fn secrets(text: &str) -> Vec<&str> {
        secret_spans(text)
            .into_iter()
            .map(|r| text.get(r).unwrap())
            .collect()
    }

    #[test]
    fn secret_values_are_found() {
        let text = r#"{"apis": [{"name": "a", "path_prefix": "/", "inject_headers": {
            "x-functions-key": {"value": "fk\"1"}, "x-other": {"env": "OTHER"},
            "x-bare": "bare-secret", "env": "header-named-env"},
          "jwt": {"issuers": ["value"], "hmac_secret": {"value": "hs-secret"}, "audiences": ["a"],
            "jwks": {"inline": {"keys": [{"kty": "oct", "k": "jwk-secret"}, {"kty": "RSA", "n": "pub", "d": "rsa-private"}]}}},
          "subscription_key": {"header": "k", "keys_sha256": ["0000000000000000000000000000000000000000000000000000000000000000", "raw-key"]}}]}"#;
        assert_eq!(
            secrets(text),
            [
                r#"fk\"1"#,
                "bare-secret",
                "header-named-env",
                "hs-secret",
                "jwk-secret",
                "rsa-private",
                "raw-key"
            ]
        );
    }

    #[test]
    fn secret_values_in_odd_shapes() {
        // A bare string, a number, a typo'd key, an escaped key, nested arrays.
        assert_eq!(secrets(r#"{"hmac_secret": "bare"}"#), ["bare"]);
        assert_eq!(
            secrets(r#"{"log": {"client_ip": "hashed", "hash_key": "bare-key"}}"#),
            ["bare-key"]
        );
        assert_eq!(
            secrets(r#"{"log": {"hash_key": {"env": "NAME", "kee": "typo"}}}"#),
            ["kee", "typo"]
        );
        assert_eq!(
            secrets(r#"{"hmac_secret": {"value": 1234567}}"#),
            ["1234567"]
        );
        assert_eq!(
            secrets(r#"{"hmac_secret": {"vaule": "typo", "sec": ["a", {"b": "c"}]}}"#),
            ["vaule", "typo", "sec", "a", "b", "c"]
        );
        assert_eq!(
            secrets(r#"{"hmac\u005fsecret": {"env": "NAME"}, "val\u0075e": "x"}"#),
            ["x"]
        );
        assert_eq!(
            secrets(r#"{"inject_headers": {"x": {"env": "NAME", "value": "v"}}}"#),
            ["v"]
        );
    }

    #[test]
    fn secret_values_in_broken_json() {
        // Unterminated: up to the end of the line, where the parser stops too.
        let text = "{\"inject_headers\": {\"x\": {\"value\": \"s3cret\n}}, \"name\": \"a\"}";
        assert_eq!(secrets(text), ["s3cret"]);
        // Missing commas and colons, stray brackets: when it loses track, it masks more.
        let text = r#"]}{"jwt": {"hmac_secret" {"value" "s3cret" "env": "E"}}}}"#;
        assert_eq!(secrets(text), ["s3cret", "env", "E"]);
        assert_eq!(secrets(r#"{"value": s3cret}"#), ["s3cret"]);
        assert!(secrets("").is_empty());
        assert!(secrets("\"").is_empty());
    }
}
