//! The APIs the portal backend's settings describe: one per `VALID_INPUT_PATHS` entry, its
//! `API_KEY_VALUES` entry injected upstream, replay protection from the two protected lists.

use gateguard_core::replay::ReplayMode;

use super::settings::{INPUT_PATHS, KEY_VALUES, WITHOUT_IP, WITH_IP};

const MAX_NAME: usize = 64;

/// One API of the generated policy.
#[derive(Debug)]
pub struct PlannedApi {
    pub name: String,
    pub path: String,
    /// `VALID_INPUT_PATHS[index]`, for messages.
    pub index: usize,
    pub key: String,
    pub key_var: String,
    pub replay: Option<ReplayMode>,
}

/// The setting a replay mode comes from.
pub fn list_of(mode: ReplayMode) -> &'static str {
    match mode {
        ReplayMode::WithIp => WITH_IP,
        ReplayMode::WithoutIp => WITHOUT_IP,
    }
}

/// The APIs the settings describe, or the first thing wrong with them.
pub fn plan(get: &dyn Fn(&str) -> Option<String>) -> Result<Vec<PlannedApi>, String> {
    let (inputs, keys) = inputs_and_keys(get)?;
    let mut apis: Vec<PlannedApi> = Vec::new();
    for (i, (entry, key)) in inputs.iter().zip(keys).enumerate() {
        let path = check_path(INPUT_PATHS, i, entry)?;
        if let Some(other) = apis.iter().find(|a| a.path.eq_ignore_ascii_case(&path)) {
            return Err(format!(
                "{INPUT_PATHS}[{i}]: {path:?} repeats {INPUT_PATHS}[{}] (paths match \
                 case-insensitively)",
                other.index
            ));
        }
        if key.chars().any(char::is_control) {
            return Err(format!("{KEY_VALUES}[{i}] contains a control character"));
        }
        let name = unique(&api_name(&path), MAX_NAME, |n| {
            apis.iter().any(|a| a.name == n)
        });
        let var = unique(&key_var(&name), usize::MAX, |v| {
            apis.iter().any(|a| a.key_var == v)
        });
        apis.push(PlannedApi {
            name,
            path,
            index: i,
            key,
            key_var: var,
            replay: None,
        });
    }
    protect(&mut apis, get, &inputs)?;
    Ok(apis)
}

/// `VALID_INPUT_PATHS` and `API_KEY_VALUES`, one key per path.
fn inputs_and_keys(
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<(Vec<String>, Vec<String>), String> {
    let Some(inputs) = get(INPUT_PATHS) else {
        return Err(format!(
            "{INPUT_PATHS} is not set (semicolon-separated paths such as \"/api;/demapi\")"
        ));
    };
    let inputs = split_list(INPUT_PATHS, Some(&inputs))?;
    if inputs.is_empty() {
        return Err(format!(
            "{INPUT_PATHS} is empty: it needs at least one path"
        ));
    }
    let Some(keys) = get(KEY_VALUES) else {
        return Err(format!(
            "{KEY_VALUES} is not set: it needs one key per {INPUT_PATHS} entry ({} here), \
             {KEY_VALUES}[i] belonging to {INPUT_PATHS}[i]",
            inputs.len()
        ));
    };
    let keys = split_list(KEY_VALUES, Some(&keys))?;
    if keys.len() == inputs.len() {
        return Ok((inputs, keys));
    }
    let detail = if keys.len() < inputs.len() {
        format!(
            "{KEY_VALUES}[{i}] (for {INPUT_PATHS}[{i}] {:?}) is missing",
            inputs[keys.len()],
            i = keys.len()
        )
    } else {
        format!(
            "{KEY_VALUES}[{i}] has no path ({INPUT_PATHS}[{i}] does not exist)",
            i = inputs.len()
        )
    };
    Err(format!(
        "{INPUT_PATHS} has {} entries but {KEY_VALUES} has {}: {detail}; \
         {KEY_VALUES}[i] belongs to {INPUT_PATHS}[i]",
        inputs.len(),
        keys.len()
    ))
}

/// Sets each API's replay mode from the two protected lists; a path is in one list at most.
fn protect(
    apis: &mut [PlannedApi],
    get: &dyn Fn(&str) -> Option<String>,
    inputs: &[String],
) -> Result<(), String> {
    let mut seen: Vec<(String, &str, usize)> = Vec::new();
    for mode in [ReplayMode::WithIp, ReplayMode::WithoutIp] {
        let list = list_of(mode);
        for (i, entry) in split_list(list, get(list).as_deref())?.iter().enumerate() {
            let path = check_path(list, i, entry)?;
            if let Some((_, other, j)) = seen.iter().find(|(p, _, _)| p.eq_ignore_ascii_case(&path))
            {
                return Err(if *other == list {
                    format!("{list}[{i}]: {path:?} repeats {list}[{j}]")
                } else {
                    format!(
                        "{list}[{i}]: {path:?} is also in {other}[{j}]; a path has one replay \
                         mode, choose one list"
                    )
                });
            }
            let Some(api) = apis.iter_mut().find(|a| a.path.eq_ignore_ascii_case(&path)) else {
                return Err(format!(
                    "{list}[{i}]: {path:?} is not one of {INPUT_PATHS} ({})",
                    inputs.join(";")
                ));
            };
            api.replay = Some(mode);
            seen.push((path, list, i));
        }
    }
    Ok(())
}

/// Splits a semicolon-separated setting: entries trimmed, one trailing `;` ignored, an empty
/// entry is an error naming the variable and index. Unset or blank is an empty list.
fn split_list(name: &str, value: Option<&str>) -> Result<Vec<String>, String> {
    let value = value.unwrap_or("").trim();
    if value.is_empty() {
        return Ok(Vec::new());
    }
    let value = value.strip_suffix(';').unwrap_or(value);
    value
        .split(';')
        .enumerate()
        .map(|(i, entry)| {
            let entry = entry.trim();
            if entry.is_empty() {
                Err(format!(
                    "{name}[{i}] is empty (entries are separated by \";\")"
                ))
            } else {
                Ok(entry.to_string())
            }
        })
        .collect()
}

/// `api`, `/api/` and ` /api ` are all `/api`; `/` stays `/`.
fn normalize_path(entry: &str) -> String {
    let trimmed = entry.trim_matches('/');
    format!("/{trimmed}")
}

fn check_path(name: &str, i: usize, entry: &str) -> Result<String, String> {
    let path = normalize_path(entry);
    gateguard_core::path::validate_prefix(&path)
        .map_err(|reason| format!("{name}[{i}]: {reason}"))?;
    Ok(path)
}

/// `/api` → `api`, `/api/v2` → `api_v2`, `/` → `root`; other characters become `_`.
fn api_name(path: &str) -> String {
    let base: String = path
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_NAME)
        .collect();
    if base.is_empty() {
        "root".into()
    } else {
        base
    }
}

/// `base`, or `base_2`, `base_3`... (kept within `max` characters) if `taken` says it is used.
fn unique(base: &str, max: usize, taken: impl Fn(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_string();
    }
    (2..)
        .map(|n| {
            let suffix = format!("_{n}");
            let keep = base.len().min(max.saturating_sub(suffix.len()));
            format!("{}{suffix}", &base[..keep])
        })
        .find(|candidate| !taken(candidate))
        .unwrap_or_default()
}

fn key_var(name: &str) -> String {
    format!(
        "GATEGUARD_KEY_{}",
        name.to_ascii_uppercase().replace('-', "_")
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn plan_of(pairs: &[(&str, &str)]) -> Result<Vec<PlannedApi>, String> {
        let map: std::collections::BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        plan(&|k| map.get(k).cloned())
    }

    #[test]
    fn names_and_variables_are_valid_and_unique() {
        assert_eq!(api_name("/api/v2"), "api_v2");
        assert_eq!(api_name("/a.b"), "a_b");
        assert_eq!(api_name(&format!("/{}", "x".repeat(100))).len(), 64);
        let apis = plan_of(&[
            (INPUT_PATHS, "/a.b;/a_b;/a-b;/root;/"),
            (KEY_VALUES, "1;2;3;4;5"),
        ])
        .unwrap();
        let names: Vec<&str> = apis.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["a_b", "a_b_2", "a-b", "root", "root_2"]);
        let vars: Vec<&str> = apis.iter().map(|a| a.key_var.as_str()).collect();
        assert_eq!(
            vars,
            [
                "GATEGUARD_KEY_A_B",
                "GATEGUARD_KEY_A_B_2",
                "GATEGUARD_KEY_A_B_3",
                "GATEGUARD_KEY_ROOT",
                "GATEGUARD_KEY_ROOT_2"
            ]
        );
        let long = format!("/{};/{}-", "y".repeat(70), "y".repeat(64));
        let apis = plan_of(&[(INPUT_PATHS, long.as_str()), (KEY_VALUES, "1;2")]).unwrap();
        assert_eq!(apis[1].name.len(), 64);
        assert!(apis[1].name.ends_with("_2"));
    }

    #[test]
    fn list_errors_name_variable_and_index() {
        let e = plan_of(&[(INPUT_PATHS, "/a;/b;/c"), (KEY_VALUES, "1;2")]).unwrap_err();
        assert!(
            e.contains("API_KEY_VALUES[2]") && e.contains("\"/c\""),
            "{e}"
        );
        let e = plan_of(&[(INPUT_PATHS, "/a"), (KEY_VALUES, "1;2")]).unwrap_err();
        assert!(e.contains("API_KEY_VALUES[1]"), "{e}");
        let e = plan_of(&[(INPUT_PATHS, "/a;;/b"), (KEY_VALUES, "1;2;3")]).unwrap_err();
        assert!(e.contains("VALID_INPUT_PATHS[1] is empty"), "{e}");
        let e = plan_of(&[(INPUT_PATHS, "/a;/A"), (KEY_VALUES, "1;2")]).unwrap_err();
        assert!(
            e.contains("VALID_INPUT_PATHS[1]") && e.contains("[0]"),
            "{e}"
        );
        let e = plan_of(&[(KEY_VALUES, "1")]).unwrap_err();
        assert!(e.contains("VALID_INPUT_PATHS is not set"), "{e}");
        let e = plan_of(&[(INPUT_PATHS, "/a")]).unwrap_err();
        assert!(e.contains("API_KEY_VALUES is not set"), "{e}");
        let e = plan_of(&[(INPUT_PATHS, "/a/../b"), (KEY_VALUES, "1")]).unwrap_err();
        assert!(e.starts_with("VALID_INPUT_PATHS[0]:"), "{e}");
        let e = plan_of(&[(INPUT_PATHS, "/a;/b"), (KEY_VALUES, "1; ")]).unwrap_err();
        assert!(e.contains("has 1"), "{e}");
    }

    #[test]
    fn protected_list_errors() {
        let base = [(INPUT_PATHS, "/a;/b"), (KEY_VALUES, "1;2")];
        let with = |extra: (&'static str, &'static str)| {
            let mut v = base.to_vec();
            v.push(extra);
            plan_of(&v)
        };
        let e = with((WITH_IP, "/a;/c")).unwrap_err();
        assert!(
            e.contains("TOKEN_PROTECTED_PATHS_WITH_IP[1]") && e.contains("/c"),
            "{e}"
        );
        let e = with((WITHOUT_IP, "/a;;")).unwrap_err();
        assert!(
            e.contains("TOKEN_PROTECTED_PATHS_WITHOUT_IP[1] is empty"),
            "{e}"
        );
        let e = with((WITH_IP, "/b;/B")).unwrap_err();
        assert!(e.contains("repeats"), "{e}");
        let e = plan_of(&[base[0], base[1], (WITH_IP, "/a"), (WITHOUT_IP, "/b;a/")]).unwrap_err();
        assert!(
            e.contains("TOKEN_PROTECTED_PATHS_WITHOUT_IP[1]")
                && e.contains("TOKEN_PROTECTED_PATHS_WITH_IP[0]"),
            "{e}"
        );
        let apis = with((WITHOUT_IP, "b/")).unwrap();
        assert_eq!(apis[1].replay, Some(ReplayMode::WithoutIp));
        assert_eq!(apis[0].replay, None);
    }
}
