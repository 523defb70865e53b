//! The FUSE adapter: the only code that speaks errno.
