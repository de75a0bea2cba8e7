//! Writing generated policies (import-env, import-apim): one document shape, one file mode rule.

use std::path::Path;

use serde_json::{json, Map, Value};

/// A policy document with the schema reference first, pretty-printed, newline-terminated.
pub fn policy_text(apis: Vec<Value>) -> Result<String, String> {
    let mut doc = Map::new();
    doc.insert("$schema".into(), json!("./gateguard.schema.json"));
    doc.insert("apis".into(), Value::Array(apis));
    let mut text = serde_json::to_string_pretty(&Value::Object(doc))
        .map_err(|e| format!("cannot serialise the policy: {e}"))?;
    text.push('\n');
    Ok(text)
}

/// Writes a policy; owner-only permissions when it holds secrets written in clear.
pub fn write_policy(path: &Path, text: &str, secret: bool) -> std::io::Result<()> {
    std::fs::write(path, text)?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(())
}
