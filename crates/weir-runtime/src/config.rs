//! Layered configuration: built-in defaults, then an optional JSON file, then environment
//! variables, then command-line flags, each layer overriding the one before.
//!
//! Services describe their settings as one serde struct. Flags are passed as a serializable
//! value whose unset fields are skipped (`#[serde(skip_serializing_if = "Option::is_none")]`),
//! so only the flags a user actually typed override the lower layers.

use std::path::Path;

use figment::providers::{Format, Json, Serialized};
use figment::value::{Dict, Value};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(String),
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
}

/// Builds a `T` from the four layers.
///
/// `env_keys` are the exact (case-sensitive) environment variable names the service honours;
/// each maps to the struct field of the same serialized name. Naming them explicitly keeps
/// unrelated variables (`PATH`, `HOME`, ...) from ever leaking into a config.
pub fn load<T, F>(file: Option<&Path>, env_keys: &[&str], flags: &F) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
    F: Serialize,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::MissingFile(path.display().to_string()));
        }
        figment = figment.merge(Json::file(path));
    }
    figment = figment
        .merge(Serialized::defaults(environment(env_keys)))
        .merge(Serialized::defaults(flags));
    figment
        .extract()
        .map_err(|err| ConfigError::Invalid(Box::new(err)))
}

/// The listed variables that are set, keyed by their exact names. (figment's own `Env`
/// provider lowercases keys, which would break the camelCase names the seeds use.)
fn environment(env_keys: &[&str]) -> Dict {
    env_keys
        .iter()
        .filter_map(|key| {
            let raw = std::env::var(key).ok()?;
            // Parsed like figment parses env values: "9090" is a number, "true" a bool.
            let value: Value = raw.parse().unwrap_or_else(|_| Value::from(raw.clone()));
            Some((key.to_string(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    // Field names are unique to this module so that environment variables set here cannot
    // be seen by any other test, even when tests share a process.
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase", default)]
    struct Demo {
        config_test_port_a: u16,
        config_test_port_b: u16,
        config_test_label: String,
    }

    impl Default for Demo {
        fn default() -> Self {
            Demo {
                config_test_port_a: 9090,
                config_test_port_b: 9099,
                config_test_label: "d".into(),
            }
        }
    }

    #[derive(Serialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        config_test_label: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        config_test_port_b: Option<u16>,
    }

    fn write_file(dir: &tempfile::TempDir, body: &str) -> std::path::PathBuf {
        let path = dir.path().join("weir.json");
        std::fs::write(&path, body).unwrap();
        path
    }

    #[test]
    fn each_layer_overrides_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(
            &dir,
            r#"{"configTestPortA": 1, "configTestPortB": 2, "configTestLabel": "file"}"#,
        );
        std::env::set_var("configTestPortA", "3");
        std::env::set_var("configTestPortB", "4");
        let flags = Flags {
            config_test_label: None,
            config_test_port_b: Some(5),
        };
        let demo: Demo =
            load(Some(&path), &["configTestPortA", "configTestPortB"], &flags).unwrap();
        assert_eq!(
            demo,
            Demo {
                config_test_port_a: 3,
                config_test_port_b: 5,
                config_test_label: "file".into()
            }
        );
    }

    #[test]
    fn unlisted_environment_variables_are_ignored() {
        std::env::set_var("configTestLabel", "from-env");
        let demo: Demo = load(None, &[], &Flags::default()).unwrap();
        assert_eq!(demo, Demo::default());
    }

    #[test]
    fn a_missing_file_is_an_error_not_a_silent_default() {
        let missing = Path::new("/nonexistent/weir.json");
        let err = load::<Demo, _>(Some(missing), &[], &Flags::default()).unwrap_err();
        assert!(matches!(err, ConfigError::MissingFile(_)));
    }

    #[test]
    fn a_wrongly_typed_value_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(&dir, r#"{"configTestPortA": "nine"}"#);
        let err = load::<Demo, _>(Some(&path), &[], &Flags::default()).unwrap_err();
        assert!(err.to_string().contains("configTestPortA"), "{err}");
    }
}
