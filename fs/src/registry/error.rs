//! [`RegistryError`]: what went wrong reading from a registry.

use std::path::PathBuf;

use crate::Digest;

/// What went wrong talking to a registry. Each variant is something a caller
/// acts on differently: retry later, fix credentials, give up, distrust.
/// `Clone`: one fetch's error is every waiter's (a peer's block store).
#[derive(Clone, Debug, thiserror::Error)]
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
    /// The names of the kinds of error ([`RegistryError::cause`]), each
    /// counted apart by the client.
    pub const CAUSES: [&'static str; 8] = [
        "invalid-reference",
        "unreachable",
        "timeout",
        "auth",
        "not-found",
        "bad-response",
        "digest-mismatch",
        "config",
    ];

    /// Which of [`RegistryError::CAUSES`] this is (its index).
    pub fn cause_index(&self) -> usize {
        match self {
            RegistryError::InvalidReference { .. } => 0,
            RegistryError::Unreachable { .. } => 1,
            RegistryError::Timeout { .. } => 2,
            RegistryError::Auth { .. } => 3,
            RegistryError::NotFound { .. } => 4,
            RegistryError::BadResponse { .. } => 5,
            RegistryError::DigestMismatch { .. } => 6,
            RegistryError::Config { .. } => 7,
        }
    }

    /// The kind of error, as metrics name it.
    pub fn cause(&self) -> &'static str {
        Self::CAUSES[self.cause_index()]
    }

    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Unreachable { .. } | RegistryError::Timeout { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_cause() {
        let s = String::new;
        let errors = [
            RegistryError::InvalidReference {
                reference: s(),
                reason: s(),
            },
            RegistryError::Unreachable {
                host: s(),
                reason: s(),
            },
            RegistryError::Timeout {
                host: s(),
                what: s(),
            },
            RegistryError::Auth {
                host: s(),
                reason: s(),
            },
            RegistryError::NotFound {
                host: s(),
                what: s(),
            },
            RegistryError::BadResponse {
                host: s(),
                what: s(),
                reason: s(),
            },
            RegistryError::DigestMismatch {
                host: s(),
                what: s(),
                expected: Digest::of(b"a"),
                actual: Digest::of(b"b"),
            },
            RegistryError::Config {
                path: PathBuf::new(),
                reason: s(),
            },
        ];
        for (i, e) in errors.iter().enumerate() {
            assert_eq!(e.cause_index(), i, "{e:?}");
        }
        assert_eq!(errors.len(), RegistryError::CAUSES.len());
    }
}
