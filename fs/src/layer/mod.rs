//! One mounted layer: its index, and read planning over cache and fetch.
