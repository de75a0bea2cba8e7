//! Finds where a JSON path (`apis[0].cors.allowed_origins[1]`) stands in a policy document, so
//! semantic errors can name a line as well as a field. Best effort: `None` when it cannot tell.

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
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
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
    fn ws(&mut self) {
        while self
            .bytes
            .get(self.pos)
            .is_some_and(|b| b.is_ascii_whitespace())
        {
            self.pos += 1;
        }
    }

    /// Offset of the value at `path`, starting at the value under the cursor.
    fn find(&mut self, path: &[Step]) -> Option<usize> {
        self.ws();
        let Some((step, rest)) = path.split_first() else {
            return Some(self.pos);
        };
        self.depth += 1;
        if self.depth > 64 {
            return None;
        }
        match (step, self.bytes.get(self.pos)?) {
            (Step::Key(want), b'{') => {
                self.pos += 1;
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
                    self.pos += 1;
                    if key == *want {
                        return self.find(rest);
                    }
                    self.skip_value()?;
                    self.ws();
                    match self.bytes.get(self.pos)? {
                        b',' => self.pos += 1,
                        _ => return None,
                    }
                }
            }
            (Step::Index(want), b'[') => {
                self.pos += 1;
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
                        b',' => self.pos += 1,
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
        self.pos += 1;
        loop {
            match self.bytes.get(self.pos)? {
                b'\\' => self.pos += 2,
                b'"' => {
                    self.pos += 1;
                    let raw = std::str::from_utf8(self.bytes.get(start..self.pos)?).ok()?;
                    return serde_json::from_str(raw).ok();
                }
                _ => self.pos += 1,
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
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth = depth.checked_sub(1)?;
                            if depth == 0 {
                                self.pos += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.pos += 1;
                }
            }
            _ => {
                while self
                    .bytes
                    .get(self.pos)
                    .is_some_and(|b| !matches!(b, b',' | b'}' | b']') && !b.is_ascii_whitespace())
                {
                    self.pos += 1;
                }
                Some(())
            }
        }
    }
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
}
