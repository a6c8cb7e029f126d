use burn::tensor::{Device, Int, Tensor, TensorData};
use peer_core::{DenseFfwConfig, MoeConfig, MoeRouting, PeerConfig, PkmConfig, QueryNorm};
use peer_model::{FeedForwardConfig, TransformerConfig};

pub const VOCAB: usize = 16;
pub const D_MODEL: usize = 32;

/// The four feed-forward kinds at toy size.
pub fn kinds() -> Vec<FeedForwardConfig> {
    vec![
        FeedForwardConfig::Dense(DenseFfwConfig::new(D_MODEL, 64)),
        FeedForwardConfig::Moe(MoeConfig::new(D_MODEL, 4, 32).with_top_k(2).with_routing(MoeRouting::TokenChoice)),
        FeedForwardConfig::Moe(MoeConfig::new(D_MODEL, 4, 32).with_routing(MoeRouting::ExpertChoice)),
        FeedForwardConfig::Pkm(PkmConfig::new(D_MODEL, 16 * 16).with_heads(2).with_top_k(4).with_key_dim(16)),
        FeedForwardConfig::Peer(
            PeerConfig::new(D_MODEL, 16 * 16)
                .with_heads(2)
                .with_top_k(4)
                .with_key_dim(16)
                .with_query_norm(QueryNorm::BatchNorm),
        ),
    ]
}

/// A 2-layer model whose every block uses `ffw`.
pub fn tiny(ffw: FeedForwardConfig) -> TransformerConfig {
    TransformerConfig::new(VOCAB, D_MODEL, 2, 2, 32, ffw)
}

pub fn tokens(rows: Vec<Vec<i64>>, device: &Device) -> Tensor<2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    let flat: Vec<i64> = rows.into_iter().flatten().collect();
    Tensor::from_data(TensorData::new(flat, [b, s]), device)
}

pub fn host<const D: usize>(t: &Tensor<D>) -> Vec<f64> {
    t.to_data().iter::<f64>().collect()
}

pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}
