//! Product-key retrieval (paper §2): exact top-k over N = √N × √N keys at the cost of 2·√N.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Distribution, IndexingUpdateOp, Int, Tensor};

use crate::config::{
    Balance, KeyScoring, exact_sqrt, positive, validate_balance_loss, validate_product_keys, validate_score_scale,
};
use crate::error::ConfigError;
use crate::kernels;

/// Configuration of [`ProductKeys`]. Its defaults are the paper's plain retrieval (shared
/// sub-keys, inner-product scores, no balance loss); [`PeerConfig`](crate::PeerConfig) and
/// [`PkmConfig`](crate::PkmConfig) set their own.
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
    /// How query halves and sub-keys are compared.
    #[config(default = "KeyScoring::Dot")]
    pub scoring: KeyScoring,
    /// Initial value of the learned score scale of the normalised scorings; `None`: the
    /// scoring's [`default_scale`](KeyScoring::default_scale).
    #[config(default = "None")]
    pub score_scale: Option<f64>,
    /// Weight of the balance loss ([`ProductKeys::balance_loss`]); 0 turns it off.
    #[config(default = 0.0)]
    pub balance_loss: f64,
    /// What the balance loss balances.
    #[config(default = "Balance::SubKeys")]
    pub balance: Balance,
}

impl ProductKeysConfig {
    /// Checks the configuration, naming the offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("heads", self.heads)?;
        validate_product_keys(self.num_keys, self.top_k, self.key_dim)?;
        validate_score_scale(self.score_scale)?;
        validate_balance_loss(self.balance_loss)
    }

    /// Initialises the sub-keys from U(±1/√(d/2)), so a unit-variance query half scores with
    /// unit-order variance against them, and the score scale of a normalised scoring.
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
        let score_scale = (self.scoring != KeyScoring::Dot).then(|| {
            let scale = self.score_scale.unwrap_or_else(|| self.scoring.default_scale(self.key_dim));
            Param::from_tensor(Tensor::from_floats([scale as f32], device))
        });
        Ok(ProductKeys {
            sub_keys: Param::from_tensor(keys),
            score_scale,
            top_k: self.top_k,
            heads: self.heads,
            scoring: self.scoring,
            balance_weight: self.balance_loss,
            balance: self.balance,
        })
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
    /// The learned scale s of a normalised [`KeyScoring`], `[1]`; `None` for `Dot`.
    pub score_scale: Option<Param<Tensor<1>>>,
    /// Keys retrieved per query.
    #[module(skip)]
    pub top_k: usize,
    /// Number of query heads.
    #[module(skip)]
    pub heads: usize,
    /// How query halves and sub-keys are compared.
    #[module(skip)]
    pub scoring: KeyScoring,
    /// Weight of the balance loss (0: off).
    #[module(skip)]
    pub balance_weight: f64,
    /// What the balance loss balances.
    #[module(skip)]
    pub balance: Balance,
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
        let [_, heads, key_dim] = queries.dims();
        let [_, _, _, half] = self.sub_keys.dims();
        assert_eq!(
            (heads, key_dim),
            (self.heads, 2 * half),
            "ProductKeys::retrieve: queries must be [tokens, heads = {}, key_dim = {}]",
            self.heads,
            2 * half
        );
        let (queries, keys) = self.scoring_operands(queries);
        kernels::retrieve(self, queries, keys)
    }

    /// The balance loss of one retrieval, when it is on (a positive weight) and the queries
    /// are tracked by autodiff (training); `None` otherwise.
    ///
    /// It is the load-balancing loss of Switch Transformers, `M · Σ_m f_m P_m` over M routing
    /// targets: `f_m` the share of the selections that went to target m (counted, not
    /// differentiable), `P_m` the mean over the key set's (token, head) rows of the softmax
    /// probability of m (differentiable). It is 1 when both are uniform and grows when the
    /// most selected targets also hold most of the probability; its gradient lowers the scores
    /// of overused targets for the queries that pick them. The targets ([`Balance`]):
    /// - `SubKeys`: each half's √N sub-keys (softmax over that half's scores), the mean over
    ///   the two halves;
    /// - `Experts`: all N experts, softmax over all N keys, computed exactly in `O(√N·√N)` per
    ///   row through the product structure (`softmax(s₁(i) + s₂(j)) = softmax(s₁)(i) ·
    ///   softmax(s₂)(j)`, so the mean over rows is `P₁ᵀP₂ / rows`): it also penalises pairing
    ///   the same sub-keys together;
    /// - `ExpertsPooled`: as `Experts`, with f counting the selections of all heads in every
    ///   key set (the heads share the experts).
    ///
    /// The result is the mean over key sets, times the weight.
    ///
    /// # Shapes
    /// - `queries`: `[tokens, heads, key_dim]` (as given to [`retrieve`](Self::retrieve))
    /// - `expert_ids`: `[tokens, heads, k]`, as retrieved for them
    /// - output: `[1]`
    pub fn balance_loss(&self, queries: Tensor<3>, expert_ids: Tensor<3, Int>) -> Option<Tensor<1>> {
        if self.balance_weight == 0.0 || !queries.is_tracked() {
            return None;
        }
        let [tokens, heads, _] = queries.dims();
        let [_, _, k] = expert_ids.dims();
        let (queries, keys) = self.scoring_operands(queries);
        let [key_sets, _, root, half] = keys.dims();
        let device = queries.device();
        let expert_ids = expert_ids.to_device(&device);
        let rows = tokens * heads / key_sets;

        // Each half's scores against its sub-keys, one [rows, √N] matrix per key set.
        let [s1, s2] = [0, 1].map(|h| {
            let s = half_scores(queries.clone().narrow(2, h * half, half), &keys, h);
            if key_sets == 1 { s.reshape([1, rows, root]) } else { s.swap_dims(0, 1) }
        });
        // The key set of every selection (built only by the targets that count per key set).
        let set = || {
            if key_sets == 1 {
                Tensor::<3, Int>::zeros([tokens, heads, k], &device)
            } else {
                Tensor::<1, Int>::arange(0..heads as i64, &device).reshape([1, heads, 1]).expand([tokens, heads, k])
            }
        };
        let slots = tokens * heads * k;
        let count = |picks: Tensor<1, Int>, targets: usize| {
            let [n] = picks.dims();
            Tensor::<1>::zeros([targets], &device).select_assign(
                0,
                picks,
                Tensor::ones([n], &device),
                IndexingUpdateOp::Add,
            )
        };
        let per_set = (rows * k) as f64;
        let loss = match self.balance {
            Balance::SubKeys => {
                let (p1, p2) = (softmax(s1, 2), softmax(s2, 2)); // each half's softmax over its sub-keys
                let soft = Tensor::cat(vec![p1.mean_dim(1), p2.mean_dim(1)], 1); // [key_sets, 2, √N]
                let offset = set() * (2 * root) as i64;
                let first = offset.clone() + expert_ids.clone().div_scalar(root as i64);
                let second = offset + expert_ids.remainder_scalar(root as i64) + root as i64;
                let picks = Tensor::cat(vec![first.reshape([slots]), second.reshape([slots])], 0);
                let share = count(picks, key_sets * 2 * root).reshape([key_sets, 2, root]).div_scalar(per_set);
                (share.detach() * soft).sum().mul_scalar(root as f64 / (2 * key_sets) as f64)
            }
            Balance::Experts | Balance::ExpertsPooled => {
                // Σ_e f_e·P_e = (1/rows) Σ_r p₁(r)ᵀ F p₂(r) with F the [√N, √N] selection shares,
                // summed over F's nonzero entries where a device family can (see kernels).
                let n = (root * root) as i64;
                let (picks, per_set) = if self.balance == Balance::ExpertsPooled && key_sets > 1 {
                    // Every key set's F counts every head's selections.
                    let all = expert_ids.reshape([1, slots]).expand([key_sets, slots]);
                    let offset = Tensor::<1, Int>::arange(0..key_sets as i64, &device)
                        .mul_scalar(n)
                        .reshape([key_sets, 1])
                        .expand([key_sets, slots]);
                    ((all + offset).reshape([key_sets * slots]), slots as f64)
                } else {
                    ((set() * n + expert_ids).reshape([slots]), per_set)
                };
                kernels::expert_balance(s1, s2, picks, per_set)
                    .mul_scalar((root * root) as f64 / (rows * key_sets) as f64)
            }
        };
        Some(loss.mul_scalar(self.balance_weight))
    }

    /// The queries and sub-keys as the scoring compares them, so that every score is a plain
    /// inner product `q'·k'` of the two: `Dot` returns both unchanged; `UnitKeys` divides each
    /// sub-key by its norm and multiplies the queries by the scale s; `Cosine` also divides each
    /// query half by its norm. Differentiable; the rest of retrieval (tensor ops or the host
    /// kernels) sees only these.
    ///
    /// # Shapes
    /// - `queries`: `[tokens, heads, key_dim]`
    /// - output: `(queries [tokens, heads, key_dim], sub-keys [key_sets, 2, √N, key_dim / 2])`
    pub fn scoring_operands(&self, queries: Tensor<3>) -> (Tensor<3>, Tensor<4>) {
        let keys = self.sub_keys.val();
        let Some(scale) = &self.score_scale else {
            return (queries, keys);
        };
        let [tokens, heads, key_dim] = queries.dims();
        let queries = match self.scoring {
            KeyScoring::Cosine => {
                unit_rows(queries.reshape([tokens, heads, 2, key_dim / 2])).reshape([tokens, heads, key_dim])
            }
            _ => queries,
        };
        (queries * scale.val().reshape([1, 1, 1]), unit_rows(keys))
    }

    /// The sub-keys as scored (see [`scoring_operands`](Self::scoring_operands)), without the
    /// scale: unit vectors for the normalised scorings.
    ///
    /// # Shapes
    /// - output: `[key_sets, 2, √N, key_dim / 2]`
    pub fn scored_sub_keys(&self) -> Tensor<4> {
        match self.scoring {
            KeyScoring::Dot => self.sub_keys.val(),
            _ => unit_rows(self.sub_keys.val()),
        }
    }

    /// The norm of every sub-key as scored, `[key_set][half][sub-key]` (all 1 for the
    /// normalised scorings: the scale s multiplies them all alike).
    pub fn sub_key_norms(&self) -> Vec<[Vec<f32>; 2]> {
        let keys = self.scored_sub_keys();
        let [key_sets, _, root, _] = keys.dims();
        let norms: Vec<f32> = keys.powi_scalar(2).sum_dim(3).sqrt().into_data().iter::<f32>().collect();
        norms.chunks(2 * root).take(key_sets).map(|set| [set[..root].to_vec(), set[root..].to_vec()]).collect()
    }

    /// The current score scale s (1 for `Dot`).
    pub fn scale(&self) -> f64 {
        self.score_scale.as_ref().map_or(1.0, |s| s.val().into_scalar::<f64>())
    }

    /// All N keys `[c_i ; c'_j]` as the scoring compares them with
    /// [`scoring_operands`](Self::scoring_operands)' queries (the raw sub-keys for `Dot`, unit
    /// sub-keys otherwise), key id `i·√N + j`, for tests and small N.
    ///
    /// # Shapes
    /// - output: `[key_sets, N, key_dim]`
    pub fn full_keys(&self) -> Tensor<3> {
        let keys = self.scored_sub_keys();
        let [key_sets, _, root, half] = keys.dims();
        let first =
            keys.clone().narrow(1, 0, 1).reshape([key_sets, root, 1, half]).expand([key_sets, root, root, half]);
        let second = keys.narrow(1, 1, 1).reshape([key_sets, 1, root, half]).expand([key_sets, root, root, half]);
        Tensor::cat(vec![first, second], 3).reshape([key_sets, root * root, 2 * half])
    }
}

/// `q_half · C_half` for every token and head.
///
/// # Shapes
/// - `query_half`: `[tokens, heads, d/2]`, `sub_keys`: `[key_sets, 2, √N, d/2]`
/// - output: `[tokens, heads, √N]`
pub(crate) fn half_scores(query_half: Tensor<3>, sub_keys: &Tensor<4>, half_index: usize) -> Tensor<3> {
    let [tokens, heads, half] = query_half.dims();
    let [key_sets, _, root, _] = sub_keys.dims();
    let keys = sub_keys.clone().narrow(1, half_index, 1).reshape([key_sets, root, half]);
    if key_sets == 1 {
        // One matmul for all heads.
        let keys = keys.reshape([root, half]).transpose();
        query_half.reshape([tokens * heads, half]).matmul(keys).reshape([tokens, heads, root])
    } else {
        // [heads, tokens, d/2] @ [heads, d/2, √N]
        query_half.swap_dims(0, 1).matmul(keys.swap_dims(1, 2)).swap_dims(0, 1)
    }
}

/// Each vector along the last axis divided by its Euclidean norm (a zero vector stays zero).
fn unit_rows<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let norm = x.clone().powi_scalar(2).sum_dim(D - 1).add_scalar(1e-12).sqrt();
    x / norm
}
