//! The Burn tensor-op family of the seam: every operation, on any device.
//!
//! Sizes are chosen per device kind: on CPU backends the gathered `[tokens, m, d_model]` rows
//! of the experts go in blocks of 8 MiB (they stay in cache between the gather and their use),
//! on GPU backends in blocks of 64 MiB (wgpu caps one buffer at 128 MiB); top-k takes the
//! strategy that is fastest on each (see [`super::topk`]).

use burn::tensor::activation::softmax;
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};

use super::topk::{is_cpu_backend, returns_sorted, top_k_indices};
use crate::experts::{ExpertGradients, Experts, RowGradients, TouchedRows};
use crate::product_keys::half_scores;
use crate::sparse_adamw::{RowMoments, SparseAdamWConfig};
use crate::table::{ExpertTable, GPU_BLOCK_BYTES, TableRows};

/// Rows updated per group by the lazy AdamW (bounds its temporaries to a few
/// `[65,536, d_model]`).
const UPDATE_ROWS: usize = 1 << 16;

/// Product-key retrieval: each query half against its sub-key set, the top-k of each half,
/// the candidate pairs, their top-k. The gathered scores carry the gradient.
pub(crate) fn retrieve(queries: Tensor<3>, keys: Tensor<4>, k: usize) -> (Tensor<3>, Tensor<3, Int>) {
    let [tokens, heads, key_dim] = queries.dims();
    let [_, _, root, _] = keys.dims();
    let half = key_dim / 2;

    // Scores of each query half against its sub-key set: [tokens, heads, √N] twice.
    let scores_1 = half_scores(queries.clone().narrow(2, 0, half), &keys, 0);
    let scores_2 = half_scores(queries.narrow(2, half, half), &keys, 1);

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

/// The expert balance sum as a batched matmul: `Σ_e f_e·P_e = Σ_r p₁(r)ᵀ F p₂(r)` with F the
/// `[√N, √N]` selection shares of each key set (a constant), one matmul forward and one
/// backward, never the `[rows, N]` probabilities themselves; `O(rows · N)`.
pub(crate) fn expert_balance(
    scores_1: Tensor<3>,
    scores_2: Tensor<3>,
    picks: Tensor<1, Int>,
    per_set: f64,
) -> Tensor<1> {
    let (p1, p2) = (softmax(scores_1, 2), softmax(scores_2, 2));
    let [key_sets, _, root] = p1.dims();
    let device = p1.device();
    let [n] = picks.dims();
    let share = Tensor::<1>::zeros([key_sets * root * root], &device)
        .select_assign(0, picks, Tensor::ones([n], &device), IndexingUpdateOp::Add)
        .reshape([key_sets, root, root])
        .div_scalar(per_set);
    (p1 * p2.matmul(share.swap_dims(1, 2))).sum()
}

/// Size of one gathered `[tokens, m, d_model]` block without autodiff.
fn block_bytes(device: &Device) -> usize {
    if is_cpu_backend(device) { 8 << 20 } else { GPU_BLOCK_BYTES }
}

/// Tokens per block of `experts` with m retrieved experts per token, without autodiff.
fn detached_chunk(experts: &Experts, device: &Device, m: usize) -> usize {
    let [_, d_model] = experts.down.dims();
    (block_bytes(device) / (m * d_model * 4)).max(1)
}

/// Eq. 5 with dense table gradients. GPU backends cap one buffer (wgpu: a 128 MiB storage
/// binding): each gathered `[chunk, m, d_model]` block stays within 64 MiB there. CPU
/// backends take all tokens at once: every block's backward would write another dense
/// `[N, d_model]` gradient.
pub(crate) fn experts_forward_tracked(
    experts: &Experts,
    x: Tensor<2>,
    expert_ids: Tensor<2, Int>,
    router_weights: Tensor<2>,
) -> Tensor<2> {
    let [tokens, d_model] = x.dims();
    let [_, m] = expert_ids.dims();
    let chunk = if is_cpu_backend(&x.device()) {
        tokens
    } else {
        (GPU_BLOCK_BYTES / (m * d_model * 4)).clamp(1, tokens.max(1))
    };
    forward_in_blocks(experts, &experts.down.rows(), &experts.up.rows(), x, expert_ids, router_weights, chunk)
}

/// Eq. 5 without autodiff (plain inputs), in token blocks freed before the next one.
pub(crate) fn experts_forward(
    experts: &Experts,
    x: Tensor<2>,
    expert_ids: Tensor<2, Int>,
    router_weights: Tensor<2>,
) -> Tensor<2> {
    let [_, m] = expert_ids.dims();
    let chunk = detached_chunk(experts, &x.device(), m);
    let (down, up) = (experts.down.rows().inner(), experts.up.rows().inner());
    forward_in_blocks(experts, &down, &up, x, expert_ids, router_weights, chunk)
}

/// Eq. 5 from the tables `down` and `up`, in blocks of at most `chunk` tokens.
pub(crate) fn forward_in_blocks(
    experts: &Experts,
    down: &TableRows,
    up: &TableRows,
    x: Tensor<2>,
    expert_ids: Tensor<2, Int>,
    router_weights: Tensor<2>,
    chunk: usize,
) -> Tensor<2> {
    let [tokens, _] = x.dims();
    let chunk = chunk.max(1);
    let outputs = (0..tokens)
        .step_by(chunk)
        .map(|start| {
            let len = chunk.min(tokens - start);
            forward_block(
                experts,
                down,
                up,
                x.clone().narrow(0, start, len),
                expert_ids.clone().narrow(0, start, len),
                router_weights.clone().narrow(0, start, len),
            )
        })
        .collect();
    Tensor::cat(outputs, 0)
}

/// Eq. 5 on one block of tokens, from the tables `down` and `up`.
fn forward_block(
    experts: &Experts,
    down: &TableRows,
    up: &TableRows,
    x: Tensor<2>,
    expert_ids: Tensor<2, Int>,
    router_weights: Tensor<2>,
) -> Tensor<2> {
    let [tokens, d_model] = x.dims();
    let [_, m] = expert_ids.dims();
    let ids = expert_ids.reshape([tokens * m]);

    let u = down.gather(ids.clone()).reshape([tokens, m, d_model]);
    let pre_activation = u.matmul(x.reshape([tokens, d_model, 1])).reshape([tokens, m]);
    let hidden = experts.activation.apply(pre_activation) * router_weights;

    let v = up.gather(ids).reshape([tokens, m, d_model]);
    hidden.reshape([tokens, 1, m]).matmul(v).reshape([tokens, d_model])
}

/// The experts' vector-Jacobian product (see [`Experts::backward_detached`]): rows gathered
/// again block by block, slot gradients summed per distinct expert with `select_assign`.
pub(crate) fn experts_backward(
    experts: &Experts,
    x: Tensor<2>,
    expert_ids: Tensor<2, Int>,
    router_weights: Tensor<2>,
    grad_output: Tensor<2>,
) -> ExpertGradients {
    let [tokens, d_model] = x.dims();
    let [_, m] = expert_ids.dims();
    let device = x.device();
    let touched = touched_rows(expert_ids.clone().reshape([tokens * m]), experts.num_experts());
    let [distinct] = touched.ids.dims();
    let (down, up) = (experts.down.rows().inner(), experts.up.rows().inner());
    let mut grad_down = Tensor::<2>::zeros([distinct, d_model], &device);
    let mut grad_up = Tensor::<2>::zeros([distinct, d_model], &device);
    let mut grad_x = Vec::new();
    let mut grad_g = Vec::new();
    let chunk = detached_chunk(experts, &device, m);
    for start in (0..tokens).step_by(chunk) {
        let len = chunk.min(tokens - start);
        let x = x.clone().narrow(0, start, len);
        let g = router_weights.clone().narrow(0, start, len);
        let dy = grad_output.clone().narrow(0, start, len);
        let ids = expert_ids.clone().narrow(0, start, len).reshape([len * m]);
        let slots = touched.inverse.clone().narrow(0, start * m, len * m);

        let u = down.gather(ids.clone()).reshape([len, m, d_model]);
        let a = u.clone().matmul(x.clone().reshape([len, d_model, 1])).reshape([len, m]);
        let sigma = experts.activation.apply(a.clone());
        let v = up.gather(ids).reshape([len, m, d_model]);

        let dh = v.matmul(dy.clone().reshape([len, d_model, 1])).reshape([len, m]);
        let da = dh.clone() * g.clone() * experts.activation.derivative(a);
        let dv = (sigma.clone() * g).reshape([len, m, 1]) * dy.reshape([len, 1, d_model]);
        grad_g.push(dh * sigma);
        grad_x.push(da.clone().reshape([len, 1, m]).matmul(u).reshape([len, d_model]));
        let du = da.reshape([len, m, 1]) * x.reshape([len, 1, d_model]);

        grad_down = grad_down.select_assign(0, slots.clone(), du.reshape([len * m, d_model]), IndexingUpdateOp::Add);
        grad_up = grad_up.select_assign(0, slots, dv.reshape([len * m, d_model]), IndexingUpdateOp::Add);
    }
    ExpertGradients {
        x: Tensor::cat(grad_x, 0),
        router_weights: Tensor::cat(grad_g, 0),
        rows: RowGradients { ids: touched.ids, down: grad_down, up: grad_up },
    }
}

/// Distinct ids: a count per expert, a cumulative sum for the rank of each touched expert,
/// and one scalar read for their number. O(num_experts) integer work, none of it `d_model`
/// wide.
pub(crate) fn touched_rows(expert_ids: Tensor<1, Int>, num_experts: usize) -> TouchedRows {
    let device = expert_ids.device();
    let [slots] = expert_ids.dims();
    let counts = Tensor::<1, Int>::zeros([num_experts], &device).select_assign(
        0,
        expert_ids.clone(),
        Tensor::ones([slots], &device),
        IndexingUpdateOp::Add,
    );
    let touched = counts.greater_elem(0);
    let rank = prefix_sum(touched.clone().int()) - 1;
    let distinct = rank.clone().slice(num_experts - 1..num_experts).into_scalar::<i64>() as usize + 1;
    let inverse = rank.clone().select(0, expert_ids);
    // Touched expert e goes to slot rank[e]; untouched ones all land on a spare slot `distinct`.
    let target = rank.mask_fill(touched.clone().bool_not(), distinct as i64);
    let values = Tensor::<1, Int>::arange(0..num_experts as i64, &device).mask_fill(touched.bool_not(), 0);
    let ids = Tensor::<1, Int>::zeros([distinct + 1], &device)
        .select_assign(0, target, values, IndexingUpdateOp::Add)
        .slice(0..distinct);
    TouchedRows { ids, inverse }
}

/// Inclusive prefix sum. CPU backends have a native `cumsum`; CubeCL's takes time quadratic in
/// the length (50 s for 2²⁰ entries on Mesa's driver), so GPU backends add shifted copies in
/// log₂(n) steps (Hillis–Steele) instead.
fn prefix_sum(x: Tensor<1, Int>) -> Tensor<1, Int> {
    if is_cpu_backend(&x.device()) {
        return x.cumsum(0);
    }
    let [n] = x.dims();
    let device = x.device();
    let mut sum = x;
    let mut offset = 1;
    while offset < n {
        let shifted =
            Tensor::cat(vec![Tensor::<1, Int>::zeros([offset], &device), sum.clone().slice(0..n - offset)], 0);
        sum = sum + shifted;
        offset *= 2;
    }
    sum
}

/// The gradient-clipping coefficient `min(1, c / (‖grad‖₂ + tiny))` (`[1]`) where the
/// configuration clips.
pub(crate) fn clip_coefficient(config: &SparseAdamWConfig, grad: &Tensor<2>) -> Option<Tensor<1>> {
    let threshold = config.grad_clip_norm?;
    let norm = grad.clone().square().sum().sqrt();
    Some((norm.add_scalar(f32::MIN_POSITIVE).recip() * threshold).clamp_max(1.0))
}

/// The lazy AdamW rule on rows `ids` (see [`crate::sparse_adamw`]), through
/// [`ExpertTable::update_rows`], in groups of [`UPDATE_ROWS`] so the temporaries (old and new
/// rows of θ, m, v) stay bounded whatever number of rows a step touched.
pub(crate) fn adamw_rows(
    config: &SparseAdamWConfig,
    lr: f64,
    step: i32,
    table: &ExpertTable,
    moments: &RowMoments,
    ids: &Tensor<1, Int>,
    grad: Tensor<2>,
) {
    let grad = match clip_coefficient(config, &grad) {
        Some(coefficient) => grad * coefficient.unsqueeze(),
        None => grad,
    };
    let (beta_1, beta_2) = (config.beta_1, config.beta_2);
    let [rows] = ids.dims();
    for start in (0..rows).step_by(UPDATE_ROWS) {
        let len = UPDATE_ROWS.min(rows - start);
        let ids = ids.clone().narrow(0, start, len);
        let grad = grad.clone().narrow(0, start, len);
        let moment_1 = moments.moment_1.update_rows(&ids, |m| m * beta_1 + grad.clone() * (1.0 - beta_1));
        let moment_2 = moments.moment_2.update_rows(&ids, |v| v * beta_2 + grad.square() * (1.0 - beta_2));
        let corrected_1 = moment_1 / (1.0 - beta_1.powi(step));
        let corrected_2 = moment_2 / (1.0 - beta_2.powi(step));
        let delta = corrected_1 / (corrected_2.sqrt() + config.epsilon);
        let decay = 1.0 - lr * config.weight_decay as f64;
        table.update_rows(&ids, |theta| theta * decay - delta * lr);
    }
}
