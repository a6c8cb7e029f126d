//! Acceptance 2: parameter and FLOP counts against hand counts; FLOP matching within 5%.

use burn::module::Module;
use burn::tensor::Device;
use peer_core::{DenseFfwConfig, DenseKind, MoeConfig, PeerConfig, PkmConfig, QueryNorm};
use peer_model::{FeedForwardConfig, TransformerConfig};

use super::helpers::{kinds, tiny};

#[test]
fn layer_costs_match_hand_counts() {
    // PEER, n = 256, N = 128², h = 8, k = 16, d = 128, shared keys, BatchNorm, no bias, cosine
    // scoring (the default).
    let peer = PeerConfig::new(256, 128 * 128).with_shared_keys(true).cost();
    let query = 256 * 8 * 128 + 2 * 8 * 128; // weights + BatchNorm γ, β
    let keys = 128 * 128 + 1; // 1 set × √N × d, and the learned score scale s
    assert_eq!(peer.params, query + keys + 2 * 16384 * 256);
    assert_eq!(peer.active_params, query + keys + 2 * 8 * 16 * 256);
    let flops = 2.0 * 256.0 * 8.0 * 128.0 + 2.0 * 8.0 * 128.0 * 128.0 + 8.0 * 256.0 + 4.0 * 8.0 * 16.0 * 256.0;
    assert_eq!(peer.flops_per_token, flops);

    // Dense GELU 256 → 1024 → 256 and SwiGLU.
    let dense = DenseFfwConfig::new(256, 1024).cost();
    assert_eq!((dense.params, dense.flops_per_token), (2 * 256 * 1024, 4.0 * 256.0 * 1024.0));
    let swiglu = DenseFfwConfig::new(256, 1024).with_kind(DenseKind::SwiGlu).cost();
    assert_eq!(swiglu.params, 3 * 256 * 1024);

    // MoE: 128 experts of 256 → 64 → 256, top-2.
    let moe = MoeConfig::new(256, 128, 64).with_top_k(2).cost();
    assert_eq!(moe.params, 256 * 128 + 128 * 2 * 256 * 64);
    assert_eq!(moe.active_params, 256 * 128 + 2 * 2 * 256 * 64);
    assert_eq!(moe.flops_per_token, 2.0 * (256.0 * 128.0 + 2.0 * 2.0 * 256.0 * 64.0));

    // PKM: N = 32², h = 4, k = 8, d = 64, LayerNorm, per-head keys, cosine scoring (one
    // learned scale).
    let pkm = PkmConfig::new(128, 32 * 32)
        .with_heads(4)
        .with_top_k(8)
        .with_key_dim(64)
        .with_query_norm(QueryNorm::LayerNorm)
        .with_shared_keys(false)
        .cost();
    let query = 128 * 4 * 64 + 2 * 64;
    let keys = 4 * 32 * 64 + 1;
    assert_eq!(pkm.params, query + keys + 1024 * 128);
    assert_eq!(pkm.active_params, query + keys + 4 * 8 * 128);
}

#[test]
fn cost_params_equal_the_modules_own_count() {
    let device = Device::flex();
    for ffw in kinds() {
        let config = tiny(ffw);
        let model = config.init(&device);
        // Burn's count includes BatchNorm's running mean and variance (buffers, not trained):
        // 2 · heads · key_dim per PKM/PEER layer here.
        let buffers = match config.feed_forward.kind() {
            "pkm" | "peer" => config.num_layers * 2 * 2 * 16,
            _ => 0,
        };
        assert_eq!(config.cost().params, model.num_params() - buffers, "{}", config.feed_forward.kind());
    }
    let untied = tiny(kinds().remove(0)).with_tie_embeddings(false);
    assert_eq!(untied.cost().params, untied.init(&device).num_params());
}

#[test]
fn model_flops_match_hand_count() {
    let config = TransformerConfig::dense(1000, 64, 2, 4, 128, 256);
    let n = 64.0;
    let per_block = 2.0 * 4.0 * n * n + 4.0 * n * 64.5 + 4.0 * n * 256.0;
    let expected = 2.0 * per_block + 2.0 * n * 1000.0;
    let cost = config.cost();
    assert_eq!(cost.forward_flops_per_token, expected);
    assert_eq!(cost.training_flops_per_token, 3.0 * expected);
}

#[test]
fn flop_matching_sizes_each_kind_within_5_percent() {
    let peer = FeedForwardConfig::Peer(PeerConfig::new(256, 128 * 128).with_key_dim(64).with_top_k(8));
    let base = TransformerConfig::dense(4096, 256, 4, 4, 256, 1024).with_middle_block(peer);
    let target = base.cost().forward_flops_per_token;
    let templates = [
        FeedForwardConfig::Dense(DenseFfwConfig::new(256, 1)),
        FeedForwardConfig::Moe(MoeConfig::new(256, 16, 1).with_top_k(2)),
        FeedForwardConfig::Pkm(PkmConfig::new(256, 128 * 128).with_top_k(16)),
    ];
    for template in templates {
        let matched = base.flop_matched(&template).unwrap();
        let flops = matched.cost().forward_flops_per_token;
        assert_eq!(matched.feed_forward_of(2).kind(), template.kind());
        assert!((flops / target - 1.0).abs() < 0.05, "{}: {flops} vs {target}", template.kind());
        // The matched middle layer alone is within 5% too.
        let layer = matched.feed_forward_of(2).cost().flops_per_token;
        let original = base.feed_forward_of(2).cost().flops_per_token;
        assert!((layer / original - 1.0).abs() < 0.05, "{}: layer {layer} vs {original}", template.kind());
    }
    // A target below a layer's fixed cost is refused with a message.
    let tiny = TransformerConfig::dense(100, 256, 2, 4, 16, 1)
        .with_middle_block(FeedForwardConfig::Dense(DenseFfwConfig::new(256, 1)));
    let err = tiny.flop_matched(&FeedForwardConfig::Peer(PeerConfig::new(256, 1024 * 1024))).unwrap_err();
    assert!(err.to_string().contains("cannot be sized down"), "{err}");
}
