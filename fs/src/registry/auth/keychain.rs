//! Where credentials come from: [`Keychain`], one source of them, and
//! [`Keychains`], the ordered list the client asks (first answer wins).
//!
//! The docker config file (`docker_file.rs`) is always the last source;
//! sources put in [`RegistryConfig::keychains`](crate::registry::RegistryConfig)
//! (credentials captured from CRI pulls, Kubernetes pull secrets) are asked
//! before it, in their order.
//!
//! The client keeps an answer for a repository for [`ANSWER_TTL`], and
//! drops it at once when the registry refuses it (telling every source
//! through [`Keychain::refused`]), so a source never needs a clock of its
//! own to be picked up: a rotated secret is asked for again at the first
//! 401.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::registry::reference::Repository;

/// How long the client uses a repository's credentials before it asks the
/// sources again (a 401 asks at once).
pub const ANSWER_TTL: Duration = Duration::from_secs(30);

/// The username with which a credential helper (or CRI's `identity_token`)
/// says the password is an identity (OAuth refresh) token.
pub const IDENTITY_TOKEN_USER: &str = "<token>";

/// A username and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Credentials {
    /// The identity (OAuth refresh) token, if that is what these are: the
    /// username [`IDENTITY_TOKEN_USER`] says so.
    pub fn identity_token(&self) -> Option<&str> {
        (self.username == IDENTITY_TOKEN_USER).then_some(self.password.as_str())
    }
}

impl fmt::Debug for Credentials {
    // Never print the secret into logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

/// One source of registry credentials.
pub trait Keychain: Send + Sync + 'static {
    /// A short name for logs ("docker-config", "cri").
    fn name(&self) -> &str;

    /// Credentials for `repo` (its registry as written in references, and
    /// its name), or `None` when this source has none for it. Called on the
    /// blocking pool: it may read a file or run a process.
    fn credentials(&self, repo: &Repository) -> Option<Credentials>;

    /// The registry refused what the sources gave for `repo`: drop anything
    /// kept for it, so the next [`Keychain::credentials`] asks afresh.
    fn refused(&self, _repo: &Repository) {}
}

/// Credentials and the name of the source that gave them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub credentials: Credentials,
    pub source: String,
}

/// An ordered list of sources; cheap to clone.
#[derive(Clone, Default)]
pub struct Keychains(Vec<Arc<dyn Keychain>>);

impl Keychains {
    /// `self`, then `next`.
    pub fn then(mut self, next: impl Keychain) -> Keychains {
        self.0.push(Arc::new(next));
        self
    }

    /// Appends a shared source (one the caller keeps a handle to, e.g. to
    /// add credentials to it later).
    pub fn push(&mut self, next: Arc<dyn Keychain>) {
        self.0.push(next);
    }

    /// The first source's answer for `repo`. Blocks as its sources do.
    pub fn credentials(&self, repo: &Repository) -> Option<Found> {
        self.0.iter().find_map(|k| {
            k.credentials(repo).map(|credentials| Found {
                credentials,
                source: k.name().to_string(),
            })
        })
    }

    /// Tells every source the registry refused `repo`'s credentials.
    pub fn refused(&self, repo: &Repository) {
        for k in &self.0 {
            k.refused(repo);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Keychains {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|k| k.name()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Fixed {
        name: &'static str,
        answer: Option<Credentials>,
        refused: Arc<AtomicUsize>,
    }

    impl Keychain for Fixed {
        fn name(&self) -> &str {
            self.name
        }
        fn credentials(&self, _repo: &Repository) -> Option<Credentials> {
            self.answer.clone()
        }
        fn refused(&self, _repo: &Repository) {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn the_first_source_with_an_answer_wins_and_every_source_hears_a_refusal() {
        let refused = Arc::new(AtomicUsize::new(0));
        let creds = |u: &str| Credentials {
            username: u.into(),
            password: "p".into(),
        };
        let list = Keychains::default()
            .then(Fixed {
                name: "empty",
                answer: None,
                refused: refused.clone(),
            })
            .then(Fixed {
                name: "cri",
                answer: Some(creds("a")),
                refused: refused.clone(),
            })
            .then(Fixed {
                name: "docker-config",
                answer: Some(creds("b")),
                refused: refused.clone(),
            });
        let repo = Repository {
            registry: "reg.lan".into(),
            name: "app".into(),
        };
        assert_eq!(
            list.credentials(&repo),
            Some(Found {
                credentials: creds("a"),
                source: "cri".into()
            })
        );
        list.refused(&repo);
        assert_eq!(refused.load(Ordering::Relaxed), 3);
        assert_eq!(format!("{list:?}"), r#"["empty", "cri", "docker-config"]"#);
    }
}
