//! Causal multi-head self-attention with rotary position encoding and a KV cache.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, RotaryEncoding};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Device, Tensor};

/// Keys and values of the positions seen so far, per block, for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
}

impl KvCache {
    /// An empty cache for a model of `num_layers` blocks.
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers] }
    }

    /// Number of positions cached (0 when empty).
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.dims()[2])
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn layer(&mut self, index: usize) -> &mut Option<(Tensor<4>, Tensor<4>)> {
        &mut self.layers[index]
    }
}

/// Causal self-attention: fused QKV projection, RoPE on queries and keys, softmax attention
/// (own module because burn-nn's `MultiHeadAttention` has no hook for RoPE).
#[derive(Module, Debug)]
pub struct CausalSelfAttention {
    /// `d_model → 3 · d_model`: queries, keys, values.
    pub qkv: Linear,
    /// `d_model → d_model` output projection.
    pub output: Linear,
    /// Attention heads.
    #[module(skip)]
    pub heads: usize,
}

impl CausalSelfAttention {
    /// Bias-free projections (Burn's Kaiming uniform).
    pub fn init(d_model: usize, heads: usize, device: &Device) -> Self {
        Self {
            qkv: LinearConfig::new(d_model, 3 * d_model).with_bias(false).init(device),
            output: LinearConfig::new(d_model, d_model).with_bias(false).init(device),
            heads,
        }
    }

    /// Attends from the new positions `start..start + seq` to every position up to itself.
    /// With a cache slot, the keys and values of earlier positions come from it and the new
    /// ones are appended.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &RotaryEncoding,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
    ) -> Tensor<3> {
        let [batch, seq, d_model] = x.dims();
        let head_dim = d_model / self.heads;
        let split = |t: Tensor<3>| {
            t.reshape([batch, seq, self.heads, head_dim]).swap_dims(1, 2) // [b, h, s, hd]
        };
        let qkv = self.qkv.forward(x);
        let q = split(qkv.clone().narrow(2, 0, d_model));
        let k = split(qkv.clone().narrow(2, d_model, d_model));
        let v = split(qkv.narrow(2, 2 * d_model, d_model));

        let start = cache.as_ref().and_then(|c| c.as_ref()).map_or(0, |(k, _)| k.dims()[2]);
        let q = rope.apply(q, start);
        let k = rope.apply(k, start);
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((past_k, past_v)) => (Tensor::cat(vec![past_k, k], 2), Tensor::cat(vec![past_v, v], 2)),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let total = start + seq;

        let scores = q.matmul(k.swap_dims(2, 3)) / (head_dim as f64).sqrt(); // [b, h, s, total]
        // Position start + i may see keys 0..=start + i.
        let future = Tensor::<2, Bool>::tril_mask([seq, total], start as i64, &scores.device())
            .reshape([1, 1, seq, total])
            .expand([batch, self.heads, seq, total]);
        let weights = softmax(scores.mask_fill(future, f32::NEG_INFINITY), 3);
        let context = weights.matmul(v).swap_dims(1, 2).reshape([batch, seq, d_model]);
        self.output.forward(context)
    }
}
