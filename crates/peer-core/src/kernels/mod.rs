//! The seam between the layer's math and the devices that compute it.
//!
//! [`Peer`], [`ProductKeys`](crate::ProductKeys), [`Experts`] and the lazy AdamW state each
//! heavy operation once and call it here; this module alone decides, from the tensors' device
//! and dtype, which implementation family runs it. Each family is one module:
//!
//! - [`host`]: fused CPU kernels on Flex f32 tensors, read in place through Burn's `extension`
//!   feature;
//! - [`tensor_ops`]: Burn tensor ops, on any device: the fallback of every operation and the
//!   reference the other families are tested against;
//! - [`cube`]: CubeCL kernels on Cube devices (wgpu here; CUDA-ready), read in place the same
//!   way.
//!
//! | operation | host (Flex) | cube (wgpu) | tensor ops |
//! |---|---|---|---|
//! | whole layer: retrieval, router weights and experts as one autodiff node ([`fused_layer`]) | yes | no (`Peer` composes the parts) | no |
//! | retrieval ([`retrieve`]): sub-key scores, top-k per half, candidates, top-k | yes (without autodiff) | the candidate step (after Burn's matmuls and top-k kernel), with a row-sparse backward pass on autodiff devices | yes |
//! | experts without autodiff, forward ([`experts_forward`]) and backward with row gradients ([`experts_backward`]) | yes | yes | yes |
//! | experts with dense table gradients ([`experts_forward_tracked`]) | no | no | yes |
//! | the expert balance sum over the selected experts ([`expert_balance`]) | yes, `O(rows · selected)` | no | yes, `O(rows · N)` |
//! | distinct rows of a step ([`touched_rows`]) | no | no | yes |
//! | the lazy AdamW row update, in place ([`adamw_rows`]) | no | yes | yes |
//!
//! Where a family cannot take the tensors it is given (not f32, say), the call falls back to
//! tensor ops.

pub(crate) mod cube;
pub(crate) mod host;
pub(crate) mod tensor_ops;
pub(crate) mod topk;

use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::{Device, Int, Tensor};

use crate::custom_op;
use crate::experts::{ExpertGradients, Experts, TouchedRows};
use crate::peer::{Peer, PeerRouting};
use crate::product_keys::ProductKeys;
use crate::sparse_adamw::{RowMoments, SparseAdamWConfig};
use crate::table::ExpertTable;

/// The implementation families.
enum Family {
    /// Fused host kernels on Flex.
    FlexHost,
    /// CubeCL kernels on the Cube backend (wgpu).
    Cube,
    /// Burn tensor ops.
    TensorOps,
}

/// Whether Cube devices take the CubeCL kernels (see [`set_gpu_kernels`]).
static GPU_KERNELS: AtomicBool = AtomicBool::new(true);

/// Turns the CubeCL kernels on or off for the whole process (on by default). Off, Cube devices
/// (wgpu) compute every operation with Burn tensor ops, the path the kernels are tested
/// against: for benchmarks that compare the two, and for tracking down a suspected kernel
/// fault. Results agree to rounding either way.
pub fn set_gpu_kernels(enabled: bool) {
    GPU_KERNELS.store(enabled, Ordering::Relaxed);
}

/// The one place that maps a device to an implementation family.
fn family(device: &Device) -> Family {
    if host::is_flex(device) {
        Family::FlexHost
    } else if topk::is_cpu_backend(device) || !GPU_KERNELS.load(Ordering::Relaxed) {
        Family::TensorOps
    } else {
        Family::Cube
    }
}

/// The largest buffer a kernel on `device` can bind, where the device family says.
pub(crate) fn max_buffer_bytes(device: &Device) -> Option<usize> {
    match family(device) {
        Family::Cube => cube::max_buffer_bytes(device),
        Family::FlexHost | Family::TensorOps => None,
    }
}

/// The whole layer for tokens `x` (`[tokens, d_model]`) with queries `[tokens, heads,
/// key_dim]`: output `[batch, seq, d_model]` and routing. On an autodiff device one node whose
/// backward pass gives dL/dx, dL/dq and dL/dK to autodiff and the tables' row gradients to the
/// row store. `None` where no family fuses the layer: the caller composes [`retrieve`] (or
/// its differentiable form), the router weights and the experts.
pub(crate) fn fused_layer(
    peer: &Peer,
    x: Tensor<2>,
    queries: Tensor<3>,
    batch_seq: [usize; 2],
) -> Option<(Tensor<3>, PeerRouting)> {
    match family(&x.device()) {
        Family::FlexHost => host::fused_layer(peer, x, queries, batch_seq),
        Family::Cube | Family::TensorOps => None,
    }
}

/// Exact product-key top-k of `queries` (`[tokens, heads, key_dim]`, as scored) against
/// `sub_keys` (`[key_sets, 2, √N, key_dim / 2]`, as scored): scores and expert ids, `[tokens,
/// heads, k]`. Differentiable in the scores on an autodiff device (through tensor ops).
pub(crate) fn retrieve(
    product_keys: &ProductKeys,
    queries: Tensor<3>,
    sub_keys: Tensor<4>,
) -> (Tensor<3>, Tensor<3, Int>) {
    let found = match (family(&queries.device()), queries.is_autodiff() || sub_keys.is_autodiff()) {
        (Family::FlexHost, false) => host::retrieve(product_keys, &queries, &sub_keys),
        (Family::Cube, false) => cube::retrieve(&queries, &sub_keys, product_keys.top_k),
        (Family::Cube, true) if custom_op::supported(&queries) => {
            cube::retrieve_tracked(queries.clone(), sub_keys.clone(), product_keys.top_k)
        }
        _ => None,
    };
    found.unwrap_or_else(|| tensor_ops::retrieve(queries, sub_keys, product_keys.top_k))
}

/// The expert balance sum `Σ_s Σ_r p₁(s, r)ᵀ F_s p₂(s, r)`: `p₁`, `p₂` the softmax over each
/// half's sub-key scores (`[key_sets, rows, √N]`, differentiable), `F_s` the selection shares of
/// key set s counted from `picks` (`set · N + expert` each, each worth `1 / per_set`).
pub(crate) fn expert_balance(
    scores_1: Tensor<3>,
    scores_2: Tensor<3>,
    picks: Tensor<1, Int>,
    per_set: f64,
) -> Tensor<1> {
    if let Family::FlexHost = family(&scores_1.device())
        && custom_op::supported(&scores_1)
        && let Some(sum) = host::expert_balance(scores_1.clone(), scores_2.clone(), &picks, per_set)
    {
        return sum;
    }
    tensor_ops::expert_balance(scores_1, scores_2, picks, per_set)
}

/// Eq. 5 without autodiff (inputs may be tracked; the output is not), and the pre-activations
/// `a = u·x` (`[tokens, m]`) where the family keeps them for [`experts_backward`].
pub(crate) fn experts_forward(
    experts: &Experts,
    x: Tensor<2>,
    expert_ids: Tensor<2, Int>,
    router_weights: Tensor<2>,
) -> (Tensor<2>, Option<Tensor<2>>) {
    let (x, expert_ids, router_weights) = (x.inner(), expert_ids.inner(), router_weights.inner());
    let done = match family(&x.device()) {
        Family::FlexHost => host::experts_forward(experts, &x, &expert_ids, &router_weights).map(|y| (y, None)),
        Family::Cube => cube::experts_forward(experts, &x, &expert_ids, &router_weights).map(|(y, a)| (y, Some(a))),
        Family::TensorOps => None,
    };
    done.unwrap_or_else(|| (tensor_ops::experts_forward(experts, x, expert_ids, router_weights), None))
}

/// The vector-Jacobian product of [`experts_forward`]: dL/dx, dL/dg and the row gradients;
/// `pre_activation` what the forward pass kept, if anything.
pub(crate) fn experts_backward(
    experts: &Experts,
    x: Tensor<2>,
    expert_ids: Tensor<2, Int>,
    router_weights: Tensor<2>,
    grad_output: Tensor<2>,
    pre_activation: Option<Tensor<2>>,
) -> ExpertGradients {
    let (x, expert_ids) = (x.inner(), expert_ids.inner());
    let (router_weights, grad_output) = (router_weights.inner(), grad_output.inner());
    let done = match family(&x.device()) {
        Family::FlexHost => host::experts_backward(experts, &x, &expert_ids, &router_weights, &grad_output),
        Family::Cube => cube::experts_backward(experts, &x, &expert_ids, &router_weights, &grad_output, pre_activation),
        Family::TensorOps => None,
    };
    if let Some(grads) = done {
        return grads;
    }
    tensor_ops::experts_backward(experts, x, expert_ids, router_weights, grad_output)
}

/// Eq. 5 differentiable everywhere, tables included (dense table gradients).
pub(crate) fn experts_forward_tracked(
    experts: &Experts,
    x: Tensor<2>,
    expert_ids: Tensor<2, Int>,
    router_weights: Tensor<2>,
) -> Tensor<2> {
    tensor_ops::experts_forward_tracked(experts, x, expert_ids, router_weights)
}

/// The distinct ids among `expert_ids` (all in `0..num_experts`) and each slot's position
/// among them.
pub(crate) fn touched_rows(expert_ids: Tensor<1, Int>, num_experts: usize) -> TouchedRows {
    tensor_ops::touched_rows(expert_ids, num_experts)
}

/// One lazy AdamW step (step count `step`, learning rate `lr`) of rows `ids` (distinct) of
/// `table` with gradients `grad` (`[ids, width]`), in place, moments included.
pub(crate) fn adamw_rows(
    config: &SparseAdamWConfig,
    lr: f64,
    step: i32,
    table: &ExpertTable,
    moments: &RowMoments,
    ids: &Tensor<1, Int>,
    grad: Tensor<2>,
) {
    if let Family::Cube = family(&ids.device())
        && cube::adamw_rows(config, lr, step, table, moments, ids, grad.clone()).is_some()
    {
        return;
    }
    tensor_ops::adamw_rows(config, lr, step, table, moments, ids, grad)
}
