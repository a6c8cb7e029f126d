//! Indices of the k largest scores, with the strategy that is fastest on each device.

use burn::tensor::{Device, Int, Tensor};

/// On CPU backends (Flex, NdArray) Burn's `argtopk` is a full sort; k rounds of
/// `max_dim_with_indices` plus masking are several times faster for small k (BURN_NOTES §11).
/// On CubeCL backends the built-in top-k kernel wins.
const MAX_ROUNDS_FOR_ARGMAX_TOP_K: usize = 32;

/// Whether [`top_k_indices`] returns the indices of `k` of `n` in descending order of score
/// (the rounds-of-max strategy does; Burn's `argtopk` makes no such promise).
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
        return Tensor::<1, Int>::arange(0..n as i64, &device)
            .reshape([1, 1, n])
            .expand([a, b, n]);
    }
    let scores = scores.detach();
    if returns_sorted(&device, k, n) {
        top_k_by_rounds_of_max(scores, k)
    } else {
        scores.argtopk(k, 2)
    }
}

fn top_k_by_rounds_of_max(mut scores: Tensor<3>, k: usize) -> Tensor<3, Int> {
    let [a, b, n] = scores.dims();
    let positions = Tensor::<1, Int>::arange(0..n as i64, &scores.device())
        .reshape([1, 1, n])
        .expand([a, b, n]);
    let mut picked = Vec::with_capacity(k);
    for round in 0..k {
        let (_, index) = scores.clone().max_dim_with_indices(2);
        if round + 1 < k {
            let taken = positions.clone().equal(index.clone().expand([a, b, n]));
            scores = scores.mask_fill(taken, f32::NEG_INFINITY);
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
