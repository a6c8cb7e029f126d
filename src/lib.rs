//! PEER for Burn.
pub use peer_core as core;
pub use peer_model as model;
pub use peer_train as train;
