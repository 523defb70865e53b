//! The writer's error, apart so that the tar reader and the encoder both
//! use it without using each other.

use std::io;

/// Why a blob could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("eStargz writer i/o: {0}")]
    Io(#[from] io::Error),
    #[error("invalid input tar: {0}")]
    InvalidTar(String),
    #[error("unsupported input: {0}")]
    Unsupported(String),
    #[error("invalid writer options: {0}")]
    Options(String),
}
