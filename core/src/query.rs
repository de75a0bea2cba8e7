//! Query strings as backends read them: a parameter is found, and removed, in every spelling a
//! backend may decode to the same name (percent-encoded, any case, `;` as a separator).

/// The `name=value` pairs of a query string. `;` separates pairs too: some frameworks (older
/// Python, PHP configurations) read it that way, so a key hidden behind one is still found.
fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split(['&', ';'])
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// Does a raw query parameter name spell `name`? Every spelling a backend may read as it:
/// percent-decoded (`+` as space, as forms decode it), cut at a NUL, leading spaces dropped, a
/// `[...]` suffix dropped (PHP, Express's qs and Rack read `key[]` as `key`), `.` and space read
/// as `_` (PHP), compared ignoring ASCII case.
pub(crate) fn spells(raw_name: &str, name: &str) -> bool {
    let decoded: Vec<u8> =
        percent_encoding::percent_decode_str(&raw_name.replace('+', " ")).collect();
    let decoded = decoded.split(|&b| b == 0).next().unwrap_or_default();
    let start = decoded.iter().take_while(|&&b| b == b' ').count();
    let decoded = decoded.get(start..).unwrap_or_default();
    let decoded = match decoded.iter().position(|&b| b == b'[') {
        Some(open) if open > 0 => decoded.get(..open).unwrap_or_default(),
        _ => decoded,
    };
    let fold = |b: u8| match b {
        b'.' | b' ' => b'_',
        _ => b.to_ascii_lowercase(),
    };
    decoded.len() == name.len()
        && decoded
            .iter()
            .zip(name.bytes())
            .all(|(&a, b)| fold(a) == fold(b))
}

/// Every value of `name` in a query string, in any spelling, percent-decoded.
pub fn query_values(query: &str, name: &str) -> Vec<Vec<u8>> {
    query_pairs(query)
        .filter(|(k, _)| spells(k, name))
        .map(|(_, v)| percent_encoding::percent_decode_str(v).collect())
        .collect()
}

/// The query string without `name` in any spelling, to forward upstream (the key is the
/// gateway's business); the other pairs keep their separators.
pub fn strip_query_param(query: &str, name: &str) -> String {
    let mut out = String::with_capacity(query.len());
    let mut rest = query;
    let mut separator = "";
    loop {
        let (pair, next, sep) = match rest.find(['&', ';']) {
            Some(i) => (
                rest.get(..i).unwrap_or_default(),
                Some(rest.get(i..).and_then(|r| r.get(1..)).unwrap_or_default()),
                rest.get(i..=i).unwrap_or_default(),
            ),
            None => (rest, None, ""),
        };
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if !spells(key, name) {
            if !out.is_empty() {
                out.push_str(separator);
            }
            out.push_str(pair);
        }
        separator = sep;
        match next {
            Some(n) => rest = n,
            None => return out,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn strip_query_param_keeps_the_rest() {
        assert_eq!(
            strip_query_param("a=1&subscription-key=x&b=2", "subscription-key"),
            "a=1&b=2"
        );
        assert_eq!(
            strip_query_param("subscription-key=x", "subscription-key"),
            ""
        );
    }

    #[test]
    fn strip_query_param_removes_every_spelling() {
        let name = "subscription-key";
        for (query, kept) in [
            ("Subscription-Key=x&a=1", "a=1"),
            ("a=1&subscription%2Dkey=x", "a=1"),
            ("a=1&subscription%2dKEY=x&b=2", "a=1&b=2"),
            ("a=1;subscription-key=x;b=2", "a=1;b=2"),
            ("a=1&b=2;subscription-key=x", "a=1&b=2"),
            ("subscription-key&a", "a"),
            ("subscription-key=x&subscription-key=y", ""),
            ("%73ubscription-key=x&c=%26", "c=%26"),
            ("subscription-keys=x", "subscription-keys=x"),
            ("a=subscription-key", "a=subscription-key"),
            ("%20subscription-key=x&a=1", "a=1"),
            ("subscription-key[]=x&a=1", "a=1"),
            ("subscription-key%5B%5D=x&a=1", "a=1"),
            ("subscription-key%00=x&a=1", "a=1"),
        ] {
            assert_eq!(strip_query_param(query, name), kept, "{query}");
        }
    }

    #[test]
    fn values_are_found_in_every_spelling() {
        assert_eq!(
            query_values("a=1&_METHOD=DELETE;%5Fmethod=put", "_method"),
            vec![b"DELETE".to_vec(), b"put".to_vec()]
        );
        assert!(query_values("a=1", "_method").is_empty());
        for spelling in [
            ".method",
            "%2Emethod",
            "%20_method",
            "+_method",
            "_method%00",
            "_method[]",
        ] {
            assert_eq!(
                query_values(&format!("{spelling}=DELETE"), "_method"),
                vec![b"DELETE".to_vec()],
                "{spelling}"
            );
        }
    }
}
