//! peer-core's tests, in one binary so Burn is linked once.

mod peer_core {
    pub mod backends;
    pub mod balance;
    pub mod batch_norm_eval;
    pub mod config_errors;
    pub mod gradients;
    pub mod interop;
    pub mod layer_reference;
    pub mod reference;
    pub mod retrieval;
    pub mod sparse;
    pub mod usage;
}
