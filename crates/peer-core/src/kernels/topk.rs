//! Indices of the k largest scores, with the strategy that is fastest on each device.

use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor};

/// On CPU backends (Flex, NdArray) Burn's `argtopk` is a full sort: fine for short axes, slow
/// for long ones, where the top-k is found through block maxima and, past 256 entries, k
/// rounds of `argmax` (see `top_k_through_block_maxima`); k rounds pay off up to this k. On
/// CubeCL backends the built-in top-k kernel wins.
const MAX_ROUNDS_FOR_ARGMAX_TOP_K: usize = 32;

/// Whether [`top_k_indices`] returns the indices of `k` of `n` in descending order of score:
/// the CPU strategy does (Burn's CPU `argtopk` is a stable descending sort, and the rounds of
/// `argmax` pick in order); CubeCL's top-k kernel makes no such promise.
pub(crate) fn returns_sorted(device: &Device, k: usize, n: usize) -> bool {
    k < n && is_cpu_backend(device) && k <= MAX_ROUNDS_FOR_ARGMAX_TOP_K
}

/// Indices of the `k` largest entries of `scores` along its last axis, in no particular order
/// (descending when [`returns_sorted`] says so).
///
/// The indices are taken on a detached copy: callers `gather` the scores they need so the
/// gradient flows through the gather, never through a sort (on an autodiff device Burn's
/// `topk_with_indices` falls back to a full sort).
///
/// # Shapes
/// - `scores`: `[a, b, n]`
/// - output: `[a, b, min(k, n)]`
pub(crate) fn top_k_indices(scores: Tensor<3>, k: usize) -> Tensor<3, Int> {
    let [a, b, n] = scores.dims();
    let device = scores.device();
    if k >= n {
        return Tensor::<1, Int>::arange(0..n as i64, &device).reshape([1, 1, n]).expand([a, b, n]);
    }
    let scores = scores.detach();
    if returns_sorted(&device, k, n) { top_k_through_block_maxima(scores, k) } else { scores.argtopk(k, 2) }
}

/// Sorted top-k, through block maxima when the axis is long. The top-k entries all lie in the
/// k blocks with the largest maxima (an entry in any other block is beaten by those k maxima),
/// so the top-k is taken of the block maxima and then of those k blocks only: for n = 1024,
/// k = 16 and blocks of 8, of 128 + 128 entries instead of 1024.
fn top_k_through_block_maxima(scores: Tensor<3>, k: usize) -> Tensor<3, Int> {
    let [a, b, n] = scores.dims();
    let block = ((n / k) as f64).sqrt() as usize;
    if block < 2 || n % block != 0 || n / block < 2 * k {
        return sorted_top_k(scores, k);
    }
    let blocks = n / block;
    let device = scores.device();
    let block_max = scores.clone().reshape([a, b, blocks, block]).max_dim(3).reshape([a, b, blocks]);
    let best_blocks = sorted_top_k(block_max, k); // [a, b, k]
    let offsets = Tensor::<1, Int>::arange(0..block as i64, &device).reshape([1, 1, 1, block]);
    let positions = (best_blocks.reshape([a, b, k, 1]) * block as i64 + offsets).reshape([a, b, k * block]);
    let candidates = scores.gather(2, positions.clone());
    positions.gather(2, sorted_top_k(candidates, k))
}

/// Top-k in descending order on a CPU backend: Burn's `argtopk` there is a stable descending
/// sort (ties by lowest index), the fastest choice up to a few hundred entries; longer axes
/// take k rounds of `argmax`, each removing its pick with a one-element `scatter` of −∞.
fn sorted_top_k(mut scores: Tensor<3>, k: usize) -> Tensor<3, Int> {
    let [a, b, n] = scores.dims();
    if n <= 256 {
        return scores.argtopk(k, 2);
    }
    let removed = Tensor::<3>::full([a, b, 1], f32::NEG_INFINITY, &scores.device());
    let mut picked = Vec::with_capacity(k);
    for round in 0..k {
        let index = scores.clone().argmax(2);
        if round + 1 < k {
            scores = scores.scatter(2, index.clone(), removed.clone(), IndexingUpdateOp::Add);
        }
        picked.push(index);
    }
    Tensor::cat(picked, 2)
}

/// Whether `device` (autodiff or not) is one of the pure-CPU backends.
pub(crate) fn is_cpu_backend(device: &Device) -> bool {
    let plain = device.clone().without_autodiff();
    #[allow(deprecated)]
    let ndarray = Device::ndarray();
    plain == Device::flex() || plain == ndarray
}
