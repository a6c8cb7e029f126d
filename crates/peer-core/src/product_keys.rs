//! Product-key retrieval (paper §2): exact top-k over N = √N × √N keys at the cost of 2·√N.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};

use crate::config::{exact_sqrt, positive, validate_product_keys};
use crate::error::ConfigError;
use crate::host::{self, HostValues, KeyLayout};
use crate::topk::{returns_sorted, top_k_indices};

/// Configuration of [`ProductKeys`].
#[derive(Config, Debug, PartialEq)]
pub struct ProductKeysConfig {
    /// Number of keys N (a perfect square); key `(i, j)` is `[c_i ; c'_j]` and has id `i·√N + j`.
    pub num_keys: usize,
    /// Full key (and query) dimension d; each sub-key has d/2 entries. Must be even.
    pub key_dim: usize,
    /// Keys retrieved per query (k ≤ √N).
    pub top_k: usize,
    /// Number of query heads.
    pub heads: usize,
    /// One sub-key pair shared by all heads (`true`, the paper) or one per head (`false`).
    #[config(default = true)]
    pub shared: bool,
}

impl ProductKeysConfig {
    /// Checks the configuration, naming the offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("heads", self.heads)?;
        validate_product_keys(self.num_keys, self.top_k, self.key_dim)
    }

    /// Initialises the sub-keys from U(±1/√(d/2)), so a unit-variance query half scores with
    /// unit-order variance against them.
    ///
    /// # Panics
    /// If the configuration is invalid, with the [`ConfigError`] message; see
    /// [`try_init`](Self::try_init).
    pub fn init(&self, device: &Device) -> ProductKeys {
        self.try_init(device).unwrap_or_else(|err| panic!("{err}"))
    }

    /// Like [`init`](Self::init) but returns the validation error instead of panicking.
    pub fn try_init(&self, device: &Device) -> Result<ProductKeys, ConfigError> {
        self.validate()?;
        let sub_keys = exact_sqrt(self.num_keys).expect("validated");
        let half = self.key_dim / 2;
        let key_sets = if self.shared { 1 } else { self.heads };
        let bound = 1.0 / (half as f64).sqrt();
        let keys = Tensor::random([key_sets, 2, sub_keys, half], Distribution::Uniform(-bound, bound), device);
        Ok(ProductKeys { sub_keys: Param::from_tensor(keys), top_k: self.top_k, heads: self.heads })
    }
}

/// Two sets of √N sub-keys whose Cartesian product is N keys, searched exactly in O(√N + k²).
///
/// `sub_keys` has shape `[key_sets, 2, √N, d/2]`: `key_sets` is 1 when all heads share the keys
/// and `heads` otherwise; index 0 of the second axis is the set C scored against the first half
/// of a query, index 1 the set C' scored against the second half.
#[derive(Module, Debug)]
pub struct ProductKeys {
    /// The two sub-key sets, `[key_sets, 2, √N, d/2]`.
    pub sub_keys: Param<Tensor<4>>,
    /// Keys retrieved per query.
    #[module(skip)]
    pub top_k: usize,
    /// Number of query heads.
    #[module(skip)]
    pub heads: usize,
}

impl ProductKeys {
    /// √N.
    pub fn num_sub_keys(&self) -> usize {
        self.sub_keys.dims()[2]
    }

    /// N = (√N)².
    pub fn num_keys(&self) -> usize {
        self.num_sub_keys() * self.num_sub_keys()
    }

    /// Full key (and query) dimension d.
    pub fn key_dim(&self) -> usize {
        2 * self.sub_keys.dims()[3]
    }

    /// Whether every head uses the same keys.
    pub fn is_shared(&self) -> bool {
        self.sub_keys.dims()[0] == 1
    }

    /// The exact top-k keys of every query and their scores `q·k`.
    ///
    /// For each head: score both query halves against their √N sub-keys, keep the top-k of each
    /// half, form the candidate sums `q₁·c_i + q₂·c'_j` (all k², or the ≈ k·ln k pairs that can
    /// still win when both halves come back sorted), and keep their top-k. Because each
    /// half keeps as many as the final k, the result equals the top-k of `q·K` over all N keys.
    /// Indices are chosen on detached scores and the scores are gathered, so sub-keys and
    /// queries receive gradients through the selected scores only.
    ///
    /// # Shapes
    /// - `queries`: `[tokens, heads, key_dim]`
    /// - output: `(scores [tokens, heads, k], expert_ids [tokens, heads, k])`, ids in `0..N`
    pub fn retrieve(&self, queries: Tensor<3>) -> (Tensor<3>, Tensor<3, Int>) {
        let [tokens, heads, key_dim] = queries.dims();
        let [_, _, root, half] = self.sub_keys.dims();
        assert_eq!(
            (heads, key_dim),
            (self.heads, 2 * half),
            "ProductKeys::retrieve: queries must be [tokens, heads = {}, key_dim = {}]",
            self.heads,
            2 * half
        );
        let k = self.top_k;
        if !queries.is_autodiff()
            && let Some(found) = self.retrieve_host(&queries)
        {
            return found;
        }

        // Scores of each query half against its sub-key set: [tokens, heads, √N] twice.
        let scores_1 = self.half_scores(queries.clone().narrow(2, 0, half), 0);
        let scores_2 = self.half_scores(queries.narrow(2, half, half), 1);

        // Top-k per half; the gathered scores carry the gradient.
        let index_1 = top_k_indices(scores_1.clone(), k);
        let index_2 = top_k_indices(scores_2.clone(), k);
        let best_1 = scores_1.gather(2, index_1.clone());
        let best_2 = scores_2.gather(2, index_2.clone());

        // Candidates: score s₁[i] + s₂[j], expert id i·√N + j. When both halves come sorted
        // (best first), pair (i, j) is beaten by every (i', j') with i' ≤ i, j' ≤ j, so only
        // pairs with (i + 1)(j + 1) ≤ k can make the top-k: about k·ln k instead of k².
        let device = best_1.device();
        let (left, right): (Vec<i64>, Vec<i64>) = if returns_sorted(&device, k, root) {
            (0..k as i64)
                .flat_map(|i| (0..k as i64).filter(move |j| (i + 1) * (j + 1) <= k as i64).map(move |j| (i, j)))
                .unzip()
        } else {
            (0..k as i64).flat_map(|i| (0..k as i64).map(move |j| (i, j))).unzip()
        };
        let pairs = left.len();
        let left = Tensor::<1, Int>::from_data(TensorData::new(left, [pairs]), &device);
        let right = Tensor::<1, Int>::from_data(TensorData::new(right, [pairs]), &device);
        let candidate_scores = best_1.select(2, left.clone()) + best_2.select(2, right.clone());
        let candidate_ids = index_1.select(2, left) * root as i64 + index_2.select(2, right);
        debug_assert_eq!(candidate_scores.dims(), [tokens, heads, pairs]);

        let best = top_k_indices(candidate_scores.clone(), k);
        (candidate_scores.gather(2, best.clone()), candidate_ids.gather(2, best))
    }

    /// [`retrieve`](Self::retrieve) by the fused host kernel on Flex (the same top-k, ties
    /// included); `None` on other devices.
    fn retrieve_host(&self, queries: &Tensor<3>) -> Option<(Tensor<3>, Tensor<3, Int>)> {
        let layout = self.key_layout(queries.dims()[0]);
        let (queries_host, keys_host) = (HostValues::of(queries)?, HostValues::of(&self.sub_keys.val())?);
        Some(host::retrieve(&queries_host, &keys_host, layout, &queries.device()))
    }

    /// The sizes the host kernels need to retrieve for `tokens` queries.
    pub(crate) fn key_layout(&self, tokens: usize) -> KeyLayout {
        let [key_sets, _, root, half] = self.sub_keys.dims();
        KeyLayout { tokens, heads: self.heads, key_dim: 2 * half, key_sets, root, top_k: self.top_k }
    }

    /// `q_half · C_half` for every token and head.
    ///
    /// # Shapes
    /// - `query_half`: `[tokens, heads, d/2]`
    /// - output: `[tokens, heads, √N]`
    fn half_scores(&self, query_half: Tensor<3>, half_index: usize) -> Tensor<3> {
        let [tokens, heads, half] = query_half.dims();
        let [key_sets, _, root, _] = self.sub_keys.dims();
        let keys = self.sub_keys.val().narrow(1, half_index, 1).reshape([key_sets, root, half]);
        if key_sets == 1 {
            // One matmul for all heads.
            let keys = keys.reshape([root, half]).transpose();
            query_half.reshape([tokens * heads, half]).matmul(keys).reshape([tokens, heads, root])
        } else {
            // [heads, tokens, d/2] @ [heads, d/2, √N]
            query_half.swap_dims(0, 1).matmul(keys.swap_dims(1, 2)).swap_dims(0, 1)
        }
    }

    /// All N keys `[c_i ; c'_j]`, key id `i·√N + j`, for tests and small N.
    ///
    /// # Shapes
    /// - output: `[key_sets, N, key_dim]`
    pub fn full_keys(&self) -> Tensor<3> {
        let [key_sets, _, root, half] = self.sub_keys.dims();
        let keys = self.sub_keys.val();
        let first =
            keys.clone().narrow(1, 0, 1).reshape([key_sets, root, 1, half]).expand([key_sets, root, root, half]);
        let second = keys.narrow(1, 1, 1).reshape([key_sets, 1, root, half]).expand([key_sets, root, root, half]);
        Tensor::cat(vec![first, second], 3).reshape([key_sets, root * root, 2 * half])
    }
}
