//! The fetch scheduler: singleflight per chunk, intents, merging.

mod intent;

pub use intent::Intent;
