//! [`RegistryError`]: what went wrong reading from a registry.

use std::path::PathBuf;

use crate::Digest;

/// What went wrong talking to a registry. Each variant is something a caller
/// acts on differently: retry later, fix credentials, give up, distrust.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("cannot reach registry {host}: {reason}")]
    Unreachable { host: String, reason: String },
    #[error("registry {host} timed out on {what}")]
    Timeout { host: String, what: String },
    #[error("authentication to {host} failed: {reason}")]
    Auth { host: String, reason: String },
    #[error("{what} not found on {host}")]
    NotFound { host: String, what: String },
    #[error("bad response from {host} for {what}: {reason}")]
    BadResponse {
        host: String,
        what: String,
        reason: String,
    },
    #[error("digest mismatch for {what} from {host}: want {expected}, got {actual}")]
    DigestMismatch {
        host: String,
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("docker config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
}

impl RegistryError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Unreachable { .. } | RegistryError::Timeout { .. }
        )
    }
}
