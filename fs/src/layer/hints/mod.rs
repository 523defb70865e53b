//! Hints: guesses, from what a layer has been asked so far, of what it
//! will be asked next, so that those bytes are fetched before the miss
//! that would wait for them. A hint only ever adds chunks to a fetch (with
//! `Intent::Prefetch`, or in the GET of a miss); it never changes what a
//! read returns, and a wrong guess costs bytes, not correctness.
//!
//! - `ahead`: read-ahead along blob order: when an on-demand miss
//!   continues a walk along the blob, the chunks that follow it come in the
//!   same GET.
//! - `elf`: a program's libraries: once a program's dynamic section is
//!   cached, the libraries it names that the layer holds are fetched.
//! - `program`: the entrypoint: the program an image config runs (and its
//!   interpreter and libraries) is fetched while the container is created.
//! - `python`: a Python module's imports: once a compiled module is
//!   cached, the modules its top-level code imports are fetched, and
//!   theirs as they arrive.
//!
//! An overlaybd disk has no index of files: `disk/hints.rs` finds the
//! entrypoint and its libraries through the disk's ext4 tree, with the
//! path lookup (`elf::resolve`), ELF reading and candidates of these.

pub(super) mod ahead;
pub(crate) mod elf;
pub(crate) mod program;
pub(crate) mod python;
