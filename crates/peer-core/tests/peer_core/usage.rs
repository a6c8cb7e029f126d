//! Acceptance 6: expert usage and unevenness against hand-computed values.

use burn::tensor::Device;
use peer_core::{ExpertUsage, PeerConfig};

use super::reference::{Rng, host, host_int, tensor};

#[test]
fn uniform_routing_is_fully_used_and_even() {
    let mut usage = ExpertUsage::new(4);
    usage.add(&[0, 1, 2, 3], &[0.25, 0.25, 0.25, 0.25]);
    usage.add(&[3, 2, 1, 0], &[0.5, 0.5, 0.5, 0.5]);
    assert_eq!(usage.usage(), 1.0);
    assert!(usage.unevenness().abs() < 1e-12);
}

#[test]
fn one_expert_taking_everything_has_unevenness_log_n() {
    let mut usage = ExpertUsage::new(16);
    usage.add(&[5, 5, 5], &[0.2, 0.3, 0.5]);
    assert_eq!(usage.usage(), 1.0 / 16.0);
    assert!((usage.unevenness() - 16f64.ln()).abs() < 1e-12);
}

#[test]
fn hand_computed_mixed_routing() {
    // N = 8; z' = [1, 3, 0, 0, 0, 0, 0, 0] → z = [1/4, 3/4, 0, ...].
    // usage = 2/8; KL = ln 8 + 1/4 ln 1/4 + 3/4 ln 3/4.
    let mut usage = ExpertUsage::new(8);
    usage.add(&[0, 1], &[0.5, 0.5]);
    usage.add(&[1, 0, 1], &[1.5, 0.5, 1.0]);
    assert_eq!(usage.weights()[..2], [1.0, 3.0]);
    assert_eq!(usage.usage(), 0.25);
    let expected = 8f64.ln() + 0.25 * 0.25f64.ln() + 0.75 * 0.75f64.ln();
    assert!((usage.unevenness() - expected).abs() < 1e-12);

    let mut other = ExpertUsage::new(8);
    other.add(&[7], &[4.0]);
    usage.merge(&other);
    assert_eq!(usage.usage(), 3.0 / 8.0);
    usage.reset();
    assert_eq!(usage.usage(), 0.0);
    assert!(usage.unevenness().is_nan());
}

/// The routing of a real layer adds up to what the ids and weights say.
#[test]
fn add_routing_accumulates_router_weights() {
    let device = Device::flex();
    let config = PeerConfig::new(8, 4 * 4).with_heads(2).with_top_k(2).with_key_dim(4);
    let peer = config.init(&device);
    let mut rng = Rng::new(5);
    let routing = peer.route(tensor(rng.normals(3 * 8, 1.0), [1, 3, 8], &device));
    let mut usage = ExpertUsage::new(16);
    usage.add_routing(&routing);
    let ids = host_int(&routing.expert_ids);
    let weights = host(&routing.router_weights);
    let mut expected = vec![0.0; 16];
    for (id, w) in ids.iter().zip(&weights) {
        expected[*id as usize] += w;
    }
    for (a, b) in usage.weights().iter().zip(&expected) {
        assert!((a - b).abs() < 1e-12);
    }
    // Softmax weights: each of the 3 tokens × 2 heads contributes 1.
    let total: f64 = usage.weights().iter().sum();
    assert!((total - 6.0).abs() < 1e-5);
}
