//! Acceptance 7: in evaluation, a token's output does not depend on the rest of the batch.

use burn::module::Module;
use burn::tensor::Device;
use peer_core::{PeerConfig, QueryNorm};

use super::reference::{Rng, host, relative_error, tensor};

fn outputs_alone_and_in_batch(device: &Device, eval: bool) -> (Vec<f64>, Vec<f64>) {
    let config =
        PeerConfig::new(16, 8 * 8).with_heads(2).with_top_k(4).with_key_dim(8).with_query_norm(QueryNorm::BatchNorm);
    let mut peer = config.init(device);
    if eval {
        peer = peer.valid();
    }
    let mut rng = Rng::new(11);
    let first = rng.normals(16, 1.0);
    let others = rng.normals(7 * 16, 3.0);
    let alone = peer.forward(tensor(first.clone(), [1, 1, 16], device));
    let batch: Vec<f32> = first.into_iter().chain(others).collect();
    let together = peer.forward(tensor(batch, [1, 8, 16], device));
    let first_in_batch = host(&together.narrow(1, 0, 1));
    (host(&alone), first_in_batch)
}

#[test]
fn batch_norm_uses_running_statistics_in_valid_mode() {
    // valid() on an autodiff module: running statistics.
    let (alone, in_batch) = outputs_alone_and_in_batch(&Device::flex().autodiff(), true);
    assert!(relative_error(&in_batch, &alone) < 1e-6);
    // Any plain device: running statistics as well.
    let (alone, in_batch) = outputs_alone_and_in_batch(&Device::flex(), false);
    assert!(relative_error(&in_batch, &alone) < 1e-6);
}

/// The control: in training mode the batch statistics do mix tokens, so the test above could
/// fail if evaluation used them.
#[test]
fn batch_norm_mixes_tokens_in_training_mode() {
    let device = Device::flex().autodiff();
    let config = PeerConfig::new(16, 8 * 8).with_heads(2).with_top_k(4).with_key_dim(8);
    let peer = config.init(&device);
    let mut rng = Rng::new(12);
    let batch_a = rng.normals(8 * 16, 1.0);
    let mut batch_b = batch_a.clone();
    for v in &mut batch_b[16..] {
        *v *= 3.0;
    }
    let a = host(&peer.forward(tensor(batch_a, [1, 8, 16], &device)).narrow(1, 0, 1));
    let b = host(&peer.forward(tensor(batch_b, [1, 8, 16], &device)).narrow(1, 0, 1));
    assert!(relative_error(&a, &b) > 1e-3);
}
