//! Registry auth, by job:
//!
//! - [`keychain`]: where credentials come from: the [`Keychain`] seam and
//!   the ordered [`Keychains`] the client asks.
//! - [`challenge`]: `WWW-Authenticate` challenges and token answers (pure).
//! - [`docker`]: the docker config (`auths`, `credHelpers`, `credsStore`)
//!   and docker's credential helpers; [`docker_file`]: the file re-read
//!   when it changes, for the daemon's long life.
//! - [`token`]: the flow: remember what a host asked for, get and keep
//!   bearer tokens and credentials, get them again when refused.

pub mod challenge;
pub mod docker;
pub mod docker_file;
pub mod keychain;
pub(super) mod token;

pub use challenge::{Challenge, TokenResponse};
pub use docker::{DockerConfig, HelperError};
pub use docker_file::DockerFile;
pub use keychain::{Credentials, Found, Keychain, Keychains};
