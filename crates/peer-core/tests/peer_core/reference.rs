//! Independent computations in plain Rust f64: brute-force retrieval over all N keys and a
//! per-token PEER layer. Nothing here calls peer-core's tensor code.

use burn::module::Param;
use burn::tensor::{Device, Int, Tensor, TensorData};
use peer_core::{Activation, ExpertTable, Gate, KeyScoring, Peer, ProductKeys};

/// SplitMix64: a deterministic source of test data, independent of any backend's RNG.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform integer in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn normals(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }
}

pub fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

pub fn host<const D: usize>(t: &Tensor<D>) -> Vec<f64> {
    t.to_data().iter::<f64>().collect()
}

pub fn host_int<const D: usize>(t: &Tensor<D, Int>) -> Vec<i64> {
    t.to_data().iter::<i64>().collect()
}

/// Replaces a parameter's value, keeping its id and whether it requires a gradient.
pub fn set_param<const D: usize>(param: &mut Param<Tensor<D>>, values: Vec<f32>) {
    let shape: [usize; D] = param.dims();
    let old = std::mem::replace(param, Param::from_tensor(Tensor::zeros([1; D], &Device::flex())));
    *param = old.map(|old| {
        let fresh = tensor(values, shape, &old.device());
        if old.is_require_grad() { fresh.require_grad() } else { fresh }
    });
}

/// Replaces an expert table's values (this handle only), keeping its id.
pub fn set_table(table: &mut ExpertTable, values: Vec<f32>) {
    let shape = table.dims();
    table.set(tensor(values, shape, &table.val().device()));
}

/// Sets every weight of `peer` from `rng` (same scales as the layer's own initialisation), so a
/// test's data is fixed by its seed alone.
pub fn randomize_weights(peer: &mut Peer, rng: &mut Rng) {
    let [d_model, features] = peer.query.linear.weight.dims();
    let n = d_model * features;
    set_param(&mut peer.query.linear.weight, rng.normals(n, 1.0 / (d_model as f64).sqrt()));
    if let Some(bias) = &mut peer.query.linear.bias {
        set_param(bias, rng.normals(features, 0.1));
    }
    let [sets, two, root, half] = peer.product_keys.sub_keys.dims();
    set_param(&mut peer.product_keys.sub_keys, rng.normals(sets * two * root * half, 1.0 / (half as f64).sqrt()));
    if let Some(scale) = &mut peer.product_keys.score_scale {
        set_param(scale, vec![(0.5 + 2.0 * rng.uniform()) as f32]);
    }
    let [experts, width] = peer.experts.down.dims();
    let std = 1.0 / (width as f64).sqrt();
    set_table(&mut peer.experts.down, rng.normals(experts * width, std));
    set_table(&mut peer.experts.up, rng.normals(experts * width, std));
    randomize_norms(peer, rng);
}

/// Gives the norms of `peer` random affine parameters and running statistics, so tests
/// exercise every term of the normalisation rather than the identity it starts as.
pub fn randomize_norms(peer: &mut Peer, rng: &mut Rng) {
    if let Some(bn) = &mut peer.query.batch_norm {
        let [f] = bn.gamma.dims();
        let device = bn.gamma.val().device();
        set_param(&mut bn.gamma, (0..f).map(|_| (0.5 + rng.uniform()) as f32).collect());
        set_param(&mut bn.beta, rng.normals(f, 0.1));
        bn.running_mean = burn::module::RunningState::new(tensor(rng.normals(f, 0.3), [f], &device));
        bn.running_var = burn::module::RunningState::new(tensor(
            (0..f).map(|_| (0.5 + rng.uniform()) as f32).collect(),
            [f],
            &device,
        ));
    }
    if let Some(ln) = &mut peer.query.layer_norm {
        let [f] = ln.gamma.dims();
        set_param(&mut ln.gamma, (0..f).map(|_| (0.5 + rng.uniform()) as f32).collect());
        if let Some(beta) = &mut ln.beta {
            set_param(beta, rng.normals(f, 0.1));
        }
    }
}

/// `max |a - b| / max |b|`: the relative error of a whole vector, robust to small entries.
pub fn relative_error(actual: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "lengths differ");
    let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
    let diff = actual.iter().zip(expected).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// The erf function (W. J. Cody's rational approximations are overkill here: Abramowitz &
/// Stegun 7.1.26 has absolute error below 1.5e-7, far inside the 1e-4 tolerance).
pub fn erf(x: f64) -> f64 {
    let sign = x.signum();
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly =
        t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    sign * (1.0 - poly * (-x * x).exp())
}

pub fn activate(activation: Activation, x: f64) -> f64 {
    match activation {
        Activation::Relu => x.max(0.0),
        Activation::Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
    }
}

/// Sub-keys `[key_sets, 2, √N, d/2]` read back as f64, with the shape.
pub struct HostKeys {
    pub values: Vec<f64>,
    pub key_sets: usize,
    pub root: usize,
    pub half: usize,
    /// How queries and sub-keys are compared, and the scale s of the normalised scorings.
    pub scoring: KeyScoring,
    pub scale: f64,
}

impl HostKeys {
    /// The raw sub-keys, scored by the inner product.
    pub fn read(sub_keys: &Tensor<4>) -> Self {
        let [key_sets, _, root, half] = sub_keys.dims();
        Self { values: host(sub_keys), key_sets, root, half, scoring: KeyScoring::Dot, scale: 1.0 }
    }
    /// The sub-keys of `keys` with their scoring.
    pub fn of(keys: &ProductKeys) -> Self {
        Self { scoring: keys.scoring, scale: keys.scale(), ..Self::read(&keys.sub_keys.val()) }
    }
    fn sub_key(&self, set: usize, which: usize, index: usize) -> Vec<f64> {
        let start = ((set * 2 + which) * self.root + index) * self.half;
        let key = &self.values[start..start + self.half];
        match self.scoring {
            KeyScoring::Dot => key.to_vec(),
            KeyScoring::UnitKeys | KeyScoring::Cosine => unit(key),
        }
    }
    /// All N scores of one (raw) query for the key set `set`, indexed `i·√N + j`: `q · [c_i ; c'_j]`
    /// for the inner product, `s·(q₁·ĉ_i + q₂·ĉ'_j)` with unit sub-keys, and
    /// `s·(q̂₁·ĉ_i + q̂₂·ĉ'_j)` for the cosine.
    pub fn brute_force_scores(&self, set: usize, query: &[f64]) -> Vec<f64> {
        let (q1, q2) = query.split_at(self.half);
        let (q1, q2) = match self.scoring {
            KeyScoring::Cosine => (unit(q1), unit(q2)),
            _ => (q1.to_vec(), q2.to_vec()),
        };
        let first: Vec<f64> = (0..self.root).map(|i| dot(&q1, &self.sub_key(set, 0, i))).collect();
        let second: Vec<f64> = (0..self.root).map(|j| dot(&q2, &self.sub_key(set, 1, j))).collect();
        let mut scores = Vec::with_capacity(self.root * self.root);
        for s1 in &first {
            for s2 in &second {
                scores.push(self.scale * (s1 + s2));
            }
        }
        scores
    }
}

/// `v / ‖v‖`.
pub fn unit(v: &[f64]) -> Vec<f64> {
    let norm = dot(v, v).sqrt();
    v.iter().map(|x| x / norm).collect()
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Indices of the k largest scores, best first, and the gap between the k-th and (k+1)-th
/// score (infinite when k = N), to recognise near-ties.
pub fn brute_force_top_k(scores: &[f64], k: usize) -> (Vec<usize>, f64) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let gap = if k < scores.len() { scores[order[k - 1]] - scores[order[k]] } else { f64::INFINITY };
    order.truncate(k);
    (order, gap)
}

/// How the query norm is evaluated by the reference.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum NormMode {
    /// BatchNorm with the statistics of the batch (training mode on an autodiff device).
    BatchStatistics,
    /// BatchNorm with running statistics (evaluation), or LayerNorm, or none.
    PerToken,
}

/// The PEER layer evaluated token by token in f64 from the module's own weights.
/// Returns `(outputs [tokens × d_model], smallest top-k gap seen)`.
pub fn peer_reference(peer: &Peer, norm_epsilon: f64, x: &[f64], tokens: usize, mode: NormMode) -> (Vec<f64>, f64) {
    let d_model = peer.query.linear.weight.dims()[0];
    let heads = peer.product_keys.heads;
    let k = peer.product_keys.top_k;
    let keys = HostKeys::of(&peer.product_keys);
    let key_dim = 2 * keys.half;
    let features = heads * key_dim;

    // Query network: q = x W + b, W stored [d_model, features].
    let w = host(&peer.query.linear.weight.val());
    let b = peer.query.linear.bias.as_ref().map(|b| host(&b.val()));
    let mut queries = vec![0.0; tokens * features];
    for t in 0..tokens {
        for f in 0..features {
            let mut q = b.as_ref().map_or(0.0, |b| b[f]);
            for i in 0..d_model {
                q += x[t * d_model + i] * w[i * features + f];
            }
            queries[t * features + f] = q;
        }
    }

    if let Some(bn) = &peer.query.batch_norm {
        let gamma = host(&bn.gamma.val());
        let beta = host(&bn.beta.val());
        let (mean, var) = match mode {
            NormMode::BatchStatistics => {
                let mut mean = vec![0.0; features];
                let mut var = vec![0.0; features];
                for f in 0..features {
                    mean[f] = (0..tokens).map(|t| queries[t * features + f]).sum::<f64>() / tokens as f64;
                    var[f] =
                        (0..tokens).map(|t| (queries[t * features + f] - mean[f]).powi(2)).sum::<f64>() / tokens as f64;
                }
                (mean, var)
            }
            NormMode::PerToken => (host(&bn.running_mean.value()), host(&bn.running_var.value())),
        };
        for t in 0..tokens {
            for f in 0..features {
                let q = &mut queries[t * features + f];
                *q = (*q - mean[f]) / (var[f] + norm_epsilon).sqrt() * gamma[f] + beta[f];
            }
        }
    }
    if let Some(ln) = &peer.query.layer_norm {
        let gamma = host(&ln.gamma.val());
        let beta = ln.beta.as_ref().map(|b| host(&b.val())).unwrap_or(vec![0.0; key_dim]);
        for chunk in queries.chunks_mut(key_dim) {
            let mean = chunk.iter().sum::<f64>() / key_dim as f64;
            let var = chunk.iter().map(|q| (q - mean).powi(2)).sum::<f64>() / key_dim as f64;
            for (i, q) in chunk.iter_mut().enumerate() {
                *q = (*q - mean) / (var + norm_epsilon).sqrt() * gamma[i] + beta[i];
            }
        }
    }

    let down = host(&peer.experts.down.val());
    let up = host(&peer.experts.up.val());
    let mut out = vec![0.0; tokens * d_model];
    let mut min_gap = f64::INFINITY;
    for t in 0..tokens {
        let xt = &x[t * d_model..(t + 1) * d_model];
        for h in 0..heads {
            let set = if keys.key_sets == 1 { 0 } else { h };
            let q = &queries[(t * heads + h) * key_dim..(t * heads + h + 1) * key_dim];
            let scores = keys.brute_force_scores(set, q);
            let (top, gap) = brute_force_top_k(&scores, k);
            min_gap = min_gap.min(gap);
            let selected: Vec<f64> = top.iter().map(|&i| scores[i]).collect();
            let weights: Vec<f64> = match peer.gate {
                Gate::Softmax => {
                    let max = selected.iter().cloned().fold(f64::MIN, f64::max);
                    let exp: Vec<f64> = selected.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = exp.iter().sum();
                    exp.iter().map(|e| e / sum).collect()
                }
                Gate::Sigmoid => selected.iter().map(|s| 1.0 / (1.0 + (-s).exp())).collect(),
            };
            for (&expert, g) in top.iter().zip(weights) {
                let u = &down[expert * d_model..(expert + 1) * d_model];
                let v = &up[expert * d_model..(expert + 1) * d_model];
                let hidden = g * activate(peer.experts.activation, dot(u, xt));
                for i in 0..d_model {
                    out[t * d_model + i] += hidden * v[i];
                }
            }
        }
    }
    (out, min_gap)
}
