//! Placeholder: `weir relay check` lands in its own change.

#[derive(Debug, Clone, Default, serde::Serialize, clap::Args)]
pub struct CheckFlags {}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct CheckConfig {}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("not built yet")]
    NotBuilt,
}

pub struct CheckReport {
    pub passed: bool,
}

impl CheckFlags {
    pub fn load(&self) -> Result<CheckConfig, weir_runtime::config::ConfigError> {
        Ok(CheckConfig::default())
    }
}

pub async fn run(
    _config: CheckConfig,
    _token: tokio_util::sync::CancellationToken,
) -> Result<CheckReport, CheckError> {
    Err(CheckError::NotBuilt)
}
