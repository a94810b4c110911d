//! Runtime errors: plugins that cannot be found or loaded, and calls a plugin refused.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("the {kind} PJRT plugin was not found: {hint}")]
    PluginNotFound { kind: String, hint: String },

    #[error("cannot load the PJRT plugin {path}: {message}")]
    PluginLoad { path: PathBuf, message: String },

    #[error("the PJRT plugin {path} is unusable: {message}")]
    PluginBroken { path: PathBuf, message: String },

    #[error("PJRT_{call} failed (code {code}): {message}")]
    Call { call: &'static str, code: i32, message: String },

    #[error("{0}")]
    Invalid(String),

    #[error(transparent)]
    UnknownChip(#[from] torchtpu_hw::UnknownChip),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
