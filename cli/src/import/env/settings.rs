//! Where import-env reads the portal backend's settings (this process's environment, a .env file
//! or a JSON file), and what it refuses there rather than guess: a name that is almost a
//! setting's, a setting given twice, and a value that refers to another one.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::import::{read_text, Failure};

pub const INPUT_PATHS: &str = "VALID_INPUT_PATHS";
pub const KEY_VALUES: &str = "API_KEY_VALUES";
pub const WITH_IP: &str = "TOKEN_PROTECTED_PATHS_WITH_IP";
pub const WITHOUT_IP: &str = "TOKEN_PROTECTED_PATHS_WITHOUT_IP";
pub const SETTINGS: [&str; 4] = [INPUT_PATHS, KEY_VALUES, WITH_IP, WITHOUT_IP];

/// Setting name to value.
pub type Settings = BTreeMap<String, String>;

/// The settings, from the .env or JSON file given or from this process's environment, and where
/// they came from (for the report).
pub fn read(env_file: Option<&Path>, json: Option<&Path>) -> Result<(Settings, String), Failure> {
    let (parsed, path) = match (env_file, json) {
        (Some(path), _) => (parse_dotenv(&read_text(path)?), path),
        (None, Some(path)) => (parse_json(&read_text(path)?), path),
        (None, None) => return Ok((from_environment()?, "the environment".into())),
    };
    let map = parsed
        .and_then(|m| unresolved(&m).map(|()| m))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((map, path.display().to_string()))
}

fn from_environment() -> Result<Settings, String> {
    for (name, _) in std::env::vars_os() {
        if let Some(e) = name.to_str().and_then(near_miss) {
            return Err(format!("in the environment: {e}"));
        }
    }
    let mut map = BTreeMap::new();
    for key in SETTINGS {
        match std::env::var(key) {
            Ok(v) => {
                map.insert(key.to_string(), v);
            }
            Err(std::env::VarError::NotPresent) => {}
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(format!("{key} is not valid UTF-8"))
            }
        }
    }
    unresolved(&map)?;
    Ok(map)
}

/// A name that looks like one of the settings without being it (another letter case, `-` for
/// `_`, a singular): the portal backend may well read it (App Service on Windows ignores case),
/// this command would not, and a protected path would lose its token check without a word.
fn near_miss(name: &str) -> Option<String> {
    if SETTINGS.contains(&name) {
        return None;
    }
    let canon = name
        .trim()
        .to_ascii_uppercase()
        .replace(['-', '.', ' '], "_");
    if let Some(same) = SETTINGS.iter().find(|s| **s == canon) {
        return Some(format!(
            "{name:?} looks like {same}, but names must match exactly: rename it, or remove it \
             if it is not read"
        ));
    }
    let like: Vec<&str> = SETTINGS
        .iter()
        .filter(|s| {
            let stem = s
                .trim_end_matches("_WITH_IP")
                .trim_end_matches("_WITHOUT_IP");
            let stem = stem.trim_end_matches('S');
            canon.starts_with(stem)
        })
        .copied()
        .collect();
    (!like.is_empty()).then(|| {
        format!(
            "{name:?} looks like {}, but names must match exactly: rename it, or remove it if \
             it is not read",
            like.join(" or ")
        )
    })
}

/// The settings' values must be the values: a `${VAR}` a .env loader would expand, or an App
/// Service Key Vault reference, is not resolved here. Names the setting, never its value.
fn unresolved(settings: &Settings) -> Result<(), String> {
    for key in SETTINGS {
        let Some(value) = settings.get(key) else {
            continue;
        };
        if value.contains("${") {
            return Err(refers(key, "another variable (${...})"));
        }
        if value
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("@microsoft.keyvault(")
        {
            return Err(refers(key, "a Key Vault secret (@Microsoft.KeyVault(...))"));
        }
    }
    Ok(())
}

fn refers(key: &str, reference: &str) -> String {
    format!(
        "{key} refers to {reference}, which import-env does not resolve: give the value itself \
         (in the environment, or with --env-file/--json)"
    )
}

/// What a .env line must look like; said without the line, which may hold a key.
const DOTENV_LINE: &str = "expected KEY=VALUE (KEY of letters, digits, \"_\" and \".\"; a value \
                           with spaces in quotes, and no unterminated quote: a value fits on one \
                           line)";

/// A .env file as dotenvy, the maintained Rust loader, reads it: `KEY=VALUE` lines, `#`
/// comments, an optional `export `, quoted values. Each line is read on its own, so a value fits
/// on one line and an error names its line, never its content. Refused besides: a name that
/// looks like a setting, a setting set twice (which one the backend used is not known), and a
/// setting whose line holds `$` (a loader substitutes another variable there).
fn parse_dotenv(text: &str) -> Result<Settings, String> {
    let mut map = BTreeMap::new();
    let mut first_line = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let Some(parsed) = dotenvy::from_read_iter(format!("{line}\n").as_bytes()).next() else {
            continue;
        };
        let (key, value) = parsed.map_err(|_| format!("line {line_no}: {DOTENV_LINE}"))?;
        if let Some(e) = near_miss(&key) {
            return Err(format!("line {line_no}: {e}"));
        }
        if SETTINGS.contains(&key.as_str()) {
            if line.contains('$') {
                let reference = refers(&key, "another variable ($NAME or ${NAME})");
                return Err(format!("line {line_no}: {reference}"));
            }
            if let Some(first) = first_line.insert(key.clone(), line_no) {
                return Err(format!(
                    "line {line_no}: {key} is set again (first on line {first}); keep one"
                ));
            }
        }
        map.insert(key, value);
    }
    Ok(map)
}

/// A JSON object of string settings, or App Service's exported app-settings array.
fn parse_json(text: &str) -> Result<Settings, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let mut map = BTreeMap::new();
    match doc {
        Value::Object(object) => {
            for (key, value) in object {
                if let Some(e) = near_miss(&key) {
                    return Err(e);
                }
                if !SETTINGS.contains(&key.as_str()) {
                    continue;
                }
                let Value::String(s) = value else {
                    return Err(format!("{key}: must be a string"));
                };
                map.insert(key, s);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let name = item.get("name").and_then(Value::as_str);
                let value = item.get("value");
                let (Some(name), Some(value)) = (name, value) else {
                    return Err(format!(
                        "[{i}]: expected {{\"name\": \"...\", \"value\": \"...\"}} (App Service's \
                         app-settings format)"
                    ));
                };
                if let Some(e) = near_miss(name) {
                    return Err(format!("[{i}]: {e}"));
                }
                if !SETTINGS.contains(&name) {
                    continue;
                }
                let Value::String(s) = value else {
                    return Err(format!("[{i}] ({name}): \"value\" must be a string"));
                };
                if map.insert(name.to_string(), s.clone()).is_some() {
                    return Err(format!("[{i}]: {name} is set twice"));
                }
            }
        }
        _ => {
            return Err(
                "expected an object of settings or an array of {\"name\", \"value\"} entries"
                    .into(),
            )
        }
    }
    Ok(map)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn dotenv_format() {
        let text = "# portal backend\n\
                    export VALID_INPUT_PATHS=\"/api;/demapi\"\n\
                    \n\
                    API_KEY_VALUES='a#1;b\"2' # keys\n\
                    TOKEN_PROTECTED_PATHS_WITH_IP=/api # comment\n\
                    TOKEN_PROTECTED_PATHS_WITHOUT_IP = \"/demapi\\\"\"\r\n\
                    OTHER=x#y\n";
        let m = parse_dotenv(text).unwrap();
        assert_eq!(m[INPUT_PATHS], "/api;/demapi");
        assert_eq!(m[KEY_VALUES], "a#1;b\"2");
        assert_eq!(m[WITH_IP], "/api");
        assert_eq!(m[WITHOUT_IP], "/demapi\"");
        assert_eq!(m["OTHER"], "x#y");
        let e = parse_dotenv("A=1\nsecret-without-equals\n").unwrap_err();
        assert!(e.starts_with("line 2:") && !e.contains("secret"), "{e}");
        assert!(parse_dotenv("A=\"open\n")
            .unwrap_err()
            .contains("unterminated"));
        assert!(parse_dotenv("A='x' y\n").is_err());
        assert!(parse_dotenv("k3y-with-dash==\n")
            .unwrap_err()
            .starts_with("line 1:"));
        assert_eq!(parse_dotenv("exportA=1\n").unwrap()["exportA"], "1");
    }

    #[test]
    fn json_formats() {
        let m =
            parse_json(r#"{"VALID_INPUT_PATHS": "/api", "API_KEY_VALUES": "k", "X": 5}"#).unwrap();
        assert_eq!(m[INPUT_PATHS], "/api");
        assert!(!m.contains_key("X"));
        let m = parse_json(
            r#"[{"name": "WEBSITE_RUN_FROM_PACKAGE", "value": "1", "slotSetting": false},
                {"name": "VALID_INPUT_PATHS", "value": "/api", "slotSetting": false},
                {"name": "API_KEY_VALUES", "value": "k", "slotSetting": true}]"#,
        )
        .unwrap();
        assert_eq!(m[KEY_VALUES], "k");
        assert!(parse_json(r#"{"VALID_INPUT_PATHS": ["/api"]}"#)
            .unwrap_err()
            .contains("VALID_INPUT_PATHS"));
        assert!(parse_json(r#"[{"value": "x"}]"#)
            .unwrap_err()
            .starts_with("[0]"));
        assert!(parse_json(
            r#"[{"name": "API_KEY_VALUES", "value": "a"}, {"name": "API_KEY_VALUES", "value": "b"}]"#
        )
        .unwrap_err()
        .contains("twice"));
        assert!(parse_json("\"x\"").is_err());
    }

    #[test]
    fn names_like_a_setting_are_refused_not_ignored() {
        for name in [
            "token_protected_paths_with_ip",
            "TOKEN_PROTECTED_PATH_WITH_IP",
            "Token-Protected-Paths-Without-Ip",
            "VALID_INPUT_PATH",
            "API_KEY_VALUE",
        ] {
            let e = near_miss(name).unwrap();
            assert!(e.contains(&format!("{name:?}")), "{e}");
            let e = parse_dotenv(&format!("VALID_INPUT_PATHS=/a\n{name}=/a\n")).unwrap_err();
            assert!(e.starts_with("line 2:"), "{e}");
            let e = parse_json(&format!(r#"{{"{name}": "/a"}}"#)).unwrap_err();
            assert!(e.contains("names must match exactly"), "{e}");
            let e = parse_json(&format!(r#"[{{"name": "{name}", "value": "/a"}}]"#)).unwrap_err();
            assert!(e.starts_with("[0]:"), "{e}");
        }
        for name in SETTINGS
            .iter()
            .chain(&["TOKEN_CACHE", "APIKEY", "WEBSITE_RUN_FROM_PACKAGE"])
        {
            assert_eq!(near_miss(name), None, "{name}");
        }
    }

    #[test]
    fn a_setting_set_twice_in_a_dotenv_is_refused() {
        let e = parse_dotenv(
            "TOKEN_PROTECTED_PATHS_WITH_IP=/api\nX=1\nTOKEN_PROTECTED_PATHS_WITH_IP=\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("line 3:") && e.contains("first on line 1"),
            "{e}"
        );
    }

    #[test]
    fn references_are_refused_by_setting_name() {
        for value in [
            "${PROTECTED}",
            "/api;${MORE}",
            " @Microsoft.KeyVault(SecretUri=https://v/s/k)",
        ] {
            let map = BTreeMap::from([(KEY_VALUES.to_string(), value.to_string())]);
            let e = unresolved(&map).unwrap_err();
            assert!(e.starts_with("API_KEY_VALUES refers to"), "{e}");
            assert!(!e.contains("PROTECTED") && !e.contains("SecretUri"), "{e}");
        }
        let map = BTreeMap::from([("OTHER".to_string(), "${X}".to_string())]);
        assert!(unresolved(&map).is_ok());
    }

    #[test]
    fn a_dotenv_setting_that_would_substitute_is_refused() {
        // dotenvy would fill `$HOME` in from this process's environment.
        for line in ["API_KEY_VALUES=k$HOME", "VALID_INPUT_PATHS=/api;${MORE}"] {
            let e = parse_dotenv(&format!("OTHER=$HOME\n{line}\n")).unwrap_err();
            assert!(e.starts_with("line 2:") && e.contains("refers to"), "{e}");
            assert!(!e.contains("HOME") && !e.contains("MORE"), "{e}");
        }
        // A value with spaces is quoted, as every dotenv loader reads it the same way then.
        let e = parse_dotenv("VALID_INPUT_PATHS=/a; /b\n").unwrap_err();
        assert!(e.starts_with("line 1:") && !e.contains("/b"), "{e}");
        let m = parse_dotenv("VALID_INPUT_PATHS=\"/a; /b\"\n").unwrap();
        assert_eq!(m[INPUT_PATHS], "/a; /b");
    }
}
