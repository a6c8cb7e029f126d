//! Acceptance 2: the layer equals a per-token f64 reference built from the same weights.

use burn::tensor::Device;
use peer_core::{Activation, Gate, KeyScoring, PeerConfig, QueryNorm};

use super::reference::{
    NormMode, Rng, activate, dot, host, host_int, peer_reference, randomize_weights, relative_error, tensor,
};

const D_MODEL: usize = 24;
const TOKENS: usize = 12;

fn check(config: &PeerConfig, device: &Device, mode: NormMode, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut peer = config.init(device);
    randomize_weights(&mut peer, &mut rng);
    let x = rng.normals(TOKENS * D_MODEL, 1.0);
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let y = peer.forward(tensor(x, [3, TOKENS / 3, D_MODEL], device));
    assert_eq!(y.dims(), [3, TOKENS / 3, D_MODEL]);
    let (expected, min_gap) = peer_reference(&peer, config.norm_epsilon, &x64, TOKENS, mode);
    assert!(min_gap > 1e-5, "near-tie in the reference ({min_gap}): pick another seed");
    let err = relative_error(&host(&y), &expected);
    assert!(err < 1e-4, "{config:?}: relative error {err}");
}

#[test]
fn layer_equals_per_token_reference_for_every_combination() {
    let mut seed = 100;
    for activation in [Activation::Relu, Activation::Gelu] {
        for gate in [Gate::Softmax, Gate::Sigmoid] {
            for shared_keys in [true, false] {
                for query_norm in [QueryNorm::BatchNorm, QueryNorm::LayerNorm, QueryNorm::None] {
                    let scoring = [KeyScoring::Dot, KeyScoring::UnitKeys, KeyScoring::Cosine][seed as usize % 3];
                    let config = PeerConfig::new(D_MODEL, 8 * 8)
                        .with_scoring(scoring)
                        .with_heads(3)
                        .with_top_k(4)
                        .with_key_dim(8)
                        .with_activation(activation)
                        .with_gate(gate)
                        .with_shared_keys(shared_keys)
                        .with_query_norm(query_norm)
                        .with_query_bias(seed % 2 == 0);
                    seed += 1;
                    // Plain device: BatchNorm uses its running statistics.
                    check(&config, &Device::flex(), NormMode::PerToken, seed);
                }
            }
        }
    }
}

/// In training mode on an autodiff device, BatchNorm normalises with the batch statistics.
#[test]
fn batch_norm_training_mode_uses_batch_statistics() {
    let config = PeerConfig::new(D_MODEL, 16 * 16).with_heads(2).with_top_k(5).with_key_dim(6);
    check(&config, &Device::flex().autodiff(), NormMode::BatchStatistics, 42);
}

/// With k = 1 per head, softmax weights are 1 and the layer is the dense MLP `V σ(Wᵀx)` whose
/// h hidden neurons are the retrieved experts (the paper's Eq. 8).
#[test]
fn top_1_equals_dense_mlp_of_retrieved_experts() {
    let device = Device::flex();
    let heads = 4;
    let config = PeerConfig::new(D_MODEL, 10 * 10)
        .with_heads(heads)
        .with_top_k(1)
        .with_key_dim(8)
        .with_query_norm(QueryNorm::LayerNorm);
    let mut peer = config.init(&device);
    let mut rng = Rng::new(3);
    randomize_weights(&mut peer, &mut rng);
    let x = rng.normals(TOKENS * D_MODEL, 1.0);
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let input = tensor(x, [1, TOKENS, D_MODEL], &device);
    let routing = peer.route(input.clone());
    assert_eq!(host(&routing.router_weights), vec![1.0; TOKENS * heads]);
    let ids = host_int(&routing.expert_ids);
    let y = host(&peer.forward(input));

    let down = host(&peer.experts.down.val());
    let up = host(&peer.experts.up.val());
    let mut expected = vec![0.0; TOKENS * D_MODEL];
    for t in 0..TOKENS {
        let xt = &x64[t * D_MODEL..(t + 1) * D_MODEL];
        // W = the retrieved u's as columns, V = the retrieved v's: V σ(Wᵀ x).
        let hidden: Vec<f64> = (0..heads)
            .map(|h| {
                let e = ids[t * heads + h] as usize;
                activate(Activation::Gelu, dot(&down[e * D_MODEL..(e + 1) * D_MODEL], xt))
            })
            .collect();
        for i in 0..D_MODEL {
            expected[t * D_MODEL + i] =
                (0..heads).map(|h| up[ids[t * heads + h] as usize * D_MODEL + i] * hidden[h]).sum();
        }
    }
    let err = relative_error(&y, &expected);
    assert!(err < 1e-5, "relative error {err}");
}

/// `expert_up_init_std = 0`: every expert starts with a zero output, the down table keeps its
/// own initialisation, and the up rows of retrieved experts still get a gradient.
#[test]
fn zero_up_init_starts_silent_and_still_learns() {
    let device = Device::flex().autodiff();
    let config =
        PeerConfig::new(D_MODEL, 8 * 8).with_heads(2).with_top_k(3).with_key_dim(8).with_expert_up_init_std(Some(0.0));
    let peer = config.init(&device);
    assert!(host(&peer.experts.up.val()).iter().all(|v| *v == 0.0));
    let down = host(&peer.experts.down.val());
    let std = (down.iter().map(|v| v * v).sum::<f64>() / down.len() as f64).sqrt();
    assert!((std / config.expert_std() - 1.0).abs() < 0.1, "down table std {std}");
    let x = tensor(Rng::new(3).normals(TOKENS * D_MODEL, 1.0), [1, TOKENS, D_MODEL], &device);
    let y = peer.forward(x);
    assert!(host(&y).iter().all(|v| *v == 0.0));
    let _grads = y.sum().backward();
    let rows = peer_core::take_row_gradients(&peer.experts).expect("row gradients");
    assert!(host(&rows.up).iter().any(|g| *g != 0.0));
}
