//! Values that may come from the policy itself or from the Envoy process environment.

use serde::Deserialize;

use crate::error::ConfigError;

/// `{ "value": "..." }` or `{ "env": "NAME" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ValueSource {
    Value(String),
    Env(String),
}

/// How the compiler reads environment variables: the filter passes the Wasm VM's environment,
/// tests pass a map, and `gateguard validate` passes its own environment or a placeholder.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl ValueSource {
    /// Resolves the value at compile time. A missing variable is a configuration error: a
    /// gateway that would inject an empty function key fails closed instead.
    pub fn resolve(&self, path: &str, env: EnvLookup<'_>) -> Result<String, ConfigError> {
        match self {
            ValueSource::Value(v) => Ok(v.clone()),
            ValueSource::Env(name) => {
                if name.is_empty() {
                    return Err(ConfigError::new(path, "environment variable name is empty"));
                }
                env(name).ok_or_else(|| {
                    ConfigError::new(
                        path,
                        format!(
                            "environment variable {name} is not set in the Wasm VM \
                             (list it in vm_config.environment_variables.host_env_keys)"
                        ),
                    )
                })
            }
        }
    }
}
