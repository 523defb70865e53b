//! Registry auth, by job:
//!
//! - [`challenge`]: `WWW-Authenticate` challenges and token answers (pure).
//! - [`docker`]: credentials from the docker config file and docker's
//!   credential helpers.
//! - [`token`]: the flow: remember what a host asked for, get and keep
//!   bearer tokens.

pub mod challenge;
pub mod docker;
pub(super) mod token;

pub use challenge::{Challenge, TokenResponse};
pub use docker::{Credentials, DockerConfig, HelperError};
