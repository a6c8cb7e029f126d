//! Product-key retrieval on the host: both halves' sub-key scores by `gemm` in token blocks
//! that stay in cache, each half's top-k, the candidate pairs and their top-k in the same pass,
//! so the `[tokens, heads, √N]` score matrices are never written to memory. The backward pass
//! touches only the retrieved sub-keys.

use rayon::prelude::*;

use super::simd::{axpy, multiversion};
use super::{sum_accumulators, zeros};
use crate::config::Gate;

/// Where the query rows and the sub-keys live, and the retrieval's sizes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyLayout {
    pub tokens: usize,
    pub heads: usize,
    /// Full query / key dimension d (each half has d/2).
    pub key_dim: usize,
    /// 1 when the heads share the sub-keys, `heads` otherwise.
    pub key_sets: usize,
    /// √N.
    pub root: usize,
    /// Experts per head.
    pub top_k: usize,
}

impl KeyLayout {
    /// The layout of `product_keys` for `tokens` queries.
    pub(crate) fn of(product_keys: &crate::ProductKeys, tokens: usize) -> Self {
        let [key_sets, _, root, half] = product_keys.sub_keys.dims();
        Self { tokens, heads: product_keys.heads, key_dim: 2 * half, key_sets, root, top_k: product_keys.top_k }
    }

    fn half(&self) -> usize {
        self.key_dim / 2
    }

    /// Offset of sub-key `index` of half `half_index` of the key set used by `head`.
    fn sub_key(&self, head: usize, half_index: usize, index: usize) -> usize {
        let set = if self.key_sets == 1 { 0 } else { head };
        ((set * 2 + half_index) * self.root + index) * self.half()
    }
}

/// The retrieval of every (token, head), best first.
#[derive(Debug, Clone)]
pub(crate) struct Retrieval {
    /// Scores `q·k` of the retrieved keys, `[tokens, heads, k]`.
    pub scores: Vec<f32>,
    /// Expert ids `i·√N + j`, `[tokens, heads, k]`.
    pub expert_ids: Vec<u32>,
    /// The sub-key of each half behind each retrieved key, `(i, j)`, `[tokens, heads, k]`.
    pub picks: Vec<[u32; 2]>,
}

/// Query rows scored per block: two `[rows, √N]` f32 score blocks stay within a core's cache
/// at √N = 1024 and feed `gemm` with enough rows to run at full speed.
const ROWS_PER_BLOCK: usize = 128;

/// The exact top-k keys of every query (see [`ProductKeys::retrieve`](crate::ProductKeys)).
///
/// `queries`: `[tokens, heads, key_dim]`; `sub_keys`: `[key_sets, 2, √N, key_dim / 2]`.
pub(crate) fn retrieve(queries: &[f32], sub_keys: &[f32], layout: KeyLayout) -> Retrieval {
    let KeyLayout { tokens, heads, top_k: k, root, .. } = layout;
    let rows = tokens * heads;
    let mut scores = vec![0.0f32; rows * k];
    let mut expert_ids = vec![0u32; rows * k];
    let mut picks = vec![[0u32; 2]; rows * k];
    // Blocks of whole tokens, so that a block holds every head of its tokens.
    let tokens_per_block = (ROWS_PER_BLOCK / heads).max(1);
    let block = tokens_per_block * heads * k;
    scores
        .par_chunks_mut(block)
        .zip(expert_ids.par_chunks_mut(block))
        .zip(picks.par_chunks_mut(block))
        .enumerate()
        .for_each_init(
            || vec![0.0f32; 2 * tokens_per_block * heads * root],
            |buffer, (index, ((scores, ids), picks))| {
                let first = index * tokens_per_block;
                let count = scores.len() / (heads * k);
                score_block(queries, sub_keys, layout, first, count, buffer);
                select_block(buffer, layout, count, scores, ids, picks);
            },
        );
    Retrieval { scores, expert_ids, picks }
}

/// Scores of tokens `first..first + count` against both halves' sub-keys into `buffer`:
/// `[half, token, head, √N]`.
fn score_block(queries: &[f32], sub_keys: &[f32], layout: KeyLayout, first: usize, count: usize, buffer: &mut [f32]) {
    let KeyLayout { heads, key_dim, root, key_sets, .. } = layout;
    let half = layout.half();
    let half_block = count * heads * root;
    for half_index in 0..2 {
        let dst = &mut buffer[half_index * half_block..(half_index + 1) * half_block];
        // Shared keys: one product for every (token, head) row. Per-head keys: one per head,
        // over that head's rows (stride `heads` rows in the queries and in the scores).
        let groups = if key_sets == 1 { 1 } else { heads };
        let rows = if key_sets == 1 { count * heads } else { count };
        let row_step = if key_sets == 1 { 1 } else { heads };
        for group in 0..groups {
            let lhs = &queries[(first * heads + group) * key_dim + half_index * half..];
            let rhs = &sub_keys[layout.sub_key(group, half_index, 0)..];
            let dst = &mut dst[group * root..];
            assert!(lhs.len() >= ((rows - 1) * row_step * key_dim + half));
            assert!(rhs.len() >= root * half);
            assert!(dst.len() >= ((rows - 1) * row_step * root + root));
            // SAFETY: the asserts keep every access in bounds: dst[r·step·√N + j] for
            // r < rows, j < √N; lhs[r·step·d + c] for c < d/2; rhs[j·d/2 + c].
            unsafe {
                gemm::gemm(
                    rows,
                    root,
                    half,
                    dst.as_mut_ptr(),
                    1,
                    (row_step * root) as isize,
                    false,
                    lhs.as_ptr(),
                    1,
                    (row_step * key_dim) as isize,
                    rhs.as_ptr(),
                    half as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    }
}

multiversion! {
    /// Each half's sorted top-k of the scored block, then the top-k of the candidate pairs
    /// `(a, b)` with `(a + 1)(b + 1) ≤ k`: pair (a, b) is beaten by every (a', b') with
    /// a' ≤ a, b' ≤ b, so no other pair can make the top-k.
    fn select_block(
        buffer: &[f32],
        layout: KeyLayout,
        count: usize,
        scores: &mut [f32],
        ids: &mut [u32],
        picks: &mut [[u32; 2]],
    ) {
        let KeyLayout { heads, root, top_k: k, .. } = layout;
        let half_block = count * heads * root;
        let mut first = vec![(0.0f32, 0u32); k];
        let mut second = vec![(0.0f32, 0u32); k];
        let mut best = vec![(0.0f32, 0u32); k];
        let mut pairs = Vec::with_capacity(k * k);
        let mut candidates = Vec::with_capacity(root);
        for row in 0..count * heads {
            top_k_sorted(&buffer[row * root..(row + 1) * root], &mut first, &mut candidates);
            top_k_sorted(&buffer[half_block + row * root..half_block + (row + 1) * root], &mut second, &mut candidates);
            pairs.clear();
            let mut filled = 0;
            for (a, &(score_1, index_1)) in first.iter().enumerate() {
                for &(score_2, index_2) in &second[..k / (a + 1)] {
                    insert_sorted(&mut best, &mut filled, score_1 + score_2, pairs.len() as u32);
                    pairs.push([index_1, index_2]);
                }
            }
            for (slot, &(score, candidate)) in best.iter().enumerate() {
                let [i, j] = pairs[candidate as usize];
                scores[row * k + slot] = score;
                ids[row * k + slot] = i * root as u32 + j;
                picks[row * k + slot] = [i, j];
            }
        }
    }
}

/// Inserts `(value, tag)` into `best` (sorted descending, `filled` entries valid) if it is
/// among the `best.len()` largest seen; ties keep the earlier insertion ahead, as a stable
/// descending sort would.
#[inline(always)]
fn insert_sorted(best: &mut [(f32, u32)], filled: &mut usize, value: f32, tag: u32) {
    let k = best.len();
    let enters = *filled < k || value > best[k - 1].0; // false for NaN once full
    if !enters {
        return;
    }
    let mut at = (*filled).min(k - 1);
    while at > 0 && best[at - 1].0 < value {
        best[at] = best[at - 1];
        at -= 1;
    }
    best[at] = (value, tag);
    *filled = (*filled + 1).min(k);
}

/// The k largest entries of `row` with their indices, largest first, ties by lower index.
///
/// Read the row as `[n / 64, 64]` and take the maximum of each of the 64 columns (vector
/// maxima, no branches). The k columns with the largest maxima each hold an entry at least the
/// k-th largest column maximum t, so the k-th largest entry is ≥ t and every top-k entry is
/// among the few entries ≥ t (about 2% of a row of 1024 at k = 16), which a vector comparison
/// finds. Only those are ranked.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // lane-indexed loops are what LLVM vectorizes
fn top_k_sorted(row: &[f32], best: &mut [(f32, u32)], candidates: &mut Vec<(f32, u32)>) {
    const LANES: usize = 64;
    let k = best.len();
    let (columns, tail) = row.as_chunks::<LANES>();
    candidates.clear();
    if k <= LANES && tail.is_empty() && columns.len() >= 2 {
        let mut maxima = columns[0];
        for chunk in &columns[1..] {
            for lane in 0..LANES {
                maxima[lane] = if chunk[lane] > maxima[lane] { chunk[lane] } else { maxima[lane] };
            }
        }
        let (_, &mut threshold, _) = maxima.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        for (c, chunk) in columns.iter().enumerate() {
            let mut mask = 0u64;
            for lane in 0..LANES {
                mask |= ((chunk[lane] >= threshold) as u64) << lane;
            }
            while mask != 0 {
                let lane = mask.trailing_zeros() as usize;
                candidates.push((chunk[lane], (c * LANES + lane) as u32));
                mask &= mask - 1;
            }
        }
    }
    // Fewer than k candidates only with NaN scores (or a short row): rank the whole row.
    if candidates.len() < k {
        candidates.clear();
        candidates.extend(row.iter().enumerate().map(|(i, &v)| (v, i as u32)));
    }
    let mut filled = 0;
    for &(value, index) in candidates.iter() {
        insert_sorted(best, &mut filled, value, index);
    }
}

/// Router weights from the retrieved scores: softmax over each head's k, or sigmoid.
pub(crate) fn gate_forward(scores: &[f32], k: usize, gate: Gate) -> Vec<f32> {
    let mut weights = vec![0.0f32; scores.len()];
    for (row, out) in scores.chunks(k).zip(weights.chunks_mut(k)) {
        match gate {
            Gate::Softmax => {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for (o, &s) in out.iter_mut().zip(row) {
                    *o = (s - max).exp();
                    sum += *o;
                }
                out.iter_mut().for_each(|o| *o /= sum);
            }
            Gate::Sigmoid => {
                for (o, &s) in out.iter_mut().zip(row) {
                    *o = 1.0 / (1.0 + (-s).exp());
                }
            }
        }
    }
    weights
}

/// dL/dscores from dL/dg through the gate.
pub(crate) fn gate_backward(weights: &[f32], grad_weights: &[f32], k: usize, gate: Gate) -> Vec<f32> {
    let mut grad = vec![0.0f32; weights.len()];
    for ((g, dg), out) in weights.chunks(k).zip(grad_weights.chunks(k)).zip(grad.chunks_mut(k)) {
        match gate {
            Gate::Softmax => {
                let inner: f32 = g.iter().zip(dg).map(|(g, dg)| g * dg).sum();
                for ((o, g), dg) in out.iter_mut().zip(g).zip(dg) {
                    *o = g * (dg - inner);
                }
            }
            Gate::Sigmoid => {
                for ((o, g), dg) in out.iter_mut().zip(g).zip(dg) {
                    *o = dg * g * (1.0 - g);
                }
            }
        }
    }
    grad
}

/// Gradients of the retrieved scores `s = q₁·c_i + q₂·c'_j` with respect to the queries and
/// the sub-keys, from dL/ds: only the retrieved sub-keys receive anything.
///
/// Returns `(dL/dqueries [tokens, heads, key_dim], dL/dsub_keys [key_sets, 2, √N, d/2])`.
pub(crate) fn retrieve_backward(
    queries: &[f32],
    sub_keys: &[f32],
    layout: KeyLayout,
    picks: &[[u32; 2]],
    grad_scores: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let KeyLayout { tokens, heads, key_dim, top_k: k, .. } = layout;
    let mut grad_queries = zeros(tokens * heads * key_dim);
    let threads = rayon::current_num_threads().max(1);
    let tokens_per_task = tokens.div_ceil(threads).max(1);
    let per_task =
        grad_queries.par_chunks_mut(tokens_per_task * heads * key_dim).enumerate().map(|(task, grad_queries)| {
            let mut grad_keys = zeros(sub_keys.len());
            let first = task * tokens_per_task;
            backward_tokens(queries, sub_keys, layout, picks, grad_scores, first, grad_queries, &mut grad_keys);
            grad_keys
        });
    let grad_keys = sum_accumulators(per_task, sub_keys.len());
    debug_assert_eq!(grad_scores.len(), tokens * heads * k);
    (grad_queries, grad_keys)
}

multiversion! {
    fn backward_tokens(
        queries: &[f32],
        sub_keys: &[f32],
        layout: KeyLayout,
        picks: &[[u32; 2]],
        grad_scores: &[f32],
        first: usize,
        grad_queries: &mut [f32],
        grad_keys: &mut [f32],
    ) {
        let KeyLayout { heads, key_dim, top_k: k, .. } = layout;
        let half = layout.half();
        for (local, grad_query) in grad_queries.chunks_mut(key_dim).enumerate() {
            let row = first * heads + local;
            let head = row % heads;
            let query = &queries[row * key_dim..(row + 1) * key_dim];
            for slot in row * k..(row + 1) * k {
                let ds = grad_scores[slot];
                for (half_index, &index) in picks[slot].iter().enumerate() {
                    let at = layout.sub_key(head, half_index, index as usize);
                    let q = &query[half_index * half..(half_index + 1) * half];
                    axpy(ds, &sub_keys[at..at + half], &mut grad_query[half_index * half..(half_index + 1) * half]);
                    axpy(ds, q, &mut grad_keys[at..at + half]);
                }
            }
        }
    }
}
