//! Ozone's firmware wire contract as replayable vectors, the small HTTP/1.1 client that
//! replays them, and the device simulator / load generator built on it (`ozone-sim`).

pub mod client;
pub mod vectors;

pub use client::{Client, Response};
pub use vectors::{load_vectors, match_shape, ShapeMismatch, Vector, VECTORS_DIR};
