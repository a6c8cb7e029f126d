//! Fused CPU kernels for tensors on the Flex backend.
//!
//! Composed of Burn tensor ops, a PEER layer's step makes about ten passes over
//! `[tokens · heads · k, d_model]` blocks (gathers, outer products, scatters) and writes the
//! `[tokens, heads, √N]` score matrices to memory: at N = 1024² that is most of its time. On
//! Flex, whose tensors are host memory that Burn lets us read in place (its `extension`
//! feature), the layer's retrieval, router weights and experts run here instead, fused: the
//! sub-key scores are computed by `gemm` in cache-sized token blocks and reduced to their top-k
//! at once, and the experts are visited expert by expert, each row read once per step.
//!
//! Everything stays exact: the same top-k (ties by lower index, as the tensor path's stable
//! sort), the same Eq. 5, the same gradients; tests compare this path with brute force, with
//! per-token loops and with autodiff over the tensor path. Other devices, and Flex tensors that
//! are not f32, take the tensor path.

mod balance;
mod experts;
mod retrieval;
mod simd;

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::{Activation, Gate};
use crate::custom_op::{self, Vjp};
use crate::expert_updates;
use crate::experts::{ExpertGradients, Experts, RowGradients};
use crate::peer::{Peer, PeerRouting};
use crate::product_keys::ProductKeys;
use crate::table::ExpertTable;
use experts::{Slots, SlotsByExpert, Table};
pub(crate) use retrieval::KeyLayout;

/// `n` zeros whose pages are already mapped for writing. The kernels accumulate into their
/// outputs (read, then write); a first read of fresh `calloc` memory maps the shared zero page,
/// and the first write after it must replace that mapping on every thread's TLB, one
/// inter-processor interrupt per 4 KiB page: that made the experts' backward pass 8× slower at
/// N = 1024². One volatile write per page maps it writable from the start.
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    let mut values = vec![0.0f32; n];
    for page in values.chunks_mut(1024) {
        // SAFETY: `page` is a valid, aligned, non-empty slice.
        unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 0.0) };
    }
    values
}

/// The element-wise sum of the workers' accumulators of `len` values each (zeros if none).
pub(crate) fn sum_accumulators(
    accumulators: impl rayon::iter::ParallelIterator<Item = Vec<f32>>,
    len: usize,
) -> Vec<f32> {
    accumulators
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            a
        })
        .unwrap_or_else(|| zeros(len))
}

/// Whether `device` (autodiff or not) is the Flex backend.
pub(crate) fn is_flex(device: &Device) -> bool {
    device.clone().without_autodiff() == Device::flex()
}

/// The f32 values of a Flex tensor, read in place (copied only if not contiguous).
pub(crate) struct HostValues(FlexTensor);

impl HostValues {
    /// `None` unless `tensor` is an f32 tensor on Flex (autodiff or not).
    pub(crate) fn of<const D: usize>(tensor: &Tensor<D>) -> Option<Self> {
        if !is_flex(&tensor.device()) {
            return None;
        }
        let primitive = tensor.clone().inner().try_into_primitive::<Flex>().ok()?;
        let primitive = if primitive.is_contiguous() { primitive } else { primitive.to_contiguous() };
        primitive.as_slice::<f32>()?;
        Some(Self(primitive))
    }

    pub(crate) fn values(&self) -> &[f32] {
        self.0.as_slice::<f32>().expect("checked in `of`")
    }
}

/// The values of an Int tensor on Flex as expert ids, if all lie in `0..limit`.
pub(crate) fn expert_ids(ids: &Tensor<2, Int>, limit: usize) -> Option<Vec<u32>> {
    if !is_flex(&ids.device()) {
        return None;
    }
    let values: Vec<u32> = ids.clone().inner().into_data().convert::<i64>().iter::<i64>().map(|id| id as u32).collect();
    values.iter().all(|&id| (id as usize) < limit).then_some(values)
}

/// A float tensor on `device` (plain, never autodiff) from host values.
pub(crate) fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), &device.clone().without_autodiff())
}

fn int_tensor<const D: usize>(values: &[u32], shape: [usize; D], device: &Device) -> Tensor<D, Int> {
    let values: Vec<i64> = values.iter().map(|&v| v as i64).collect();
    Tensor::from_data(TensorData::new(values, shape), &device.clone().without_autodiff())
}

/// An expert table's row blocks, read in place.
pub(crate) struct HostTable {
    blocks: Vec<HostValues>,
    rows_per_block: usize,
    width: usize,
}

impl HostTable {
    pub(crate) fn of(table: &ExpertTable) -> Option<Self> {
        let (blocks, rows_per_block) = table.values_in_blocks();
        let width = table.dims()[1];
        let blocks = blocks.iter().map(HostValues::of).collect::<Option<Vec<_>>>()?;
        Some(Self { blocks, rows_per_block, width })
    }

    fn with<R>(&self, f: impl FnOnce(Table) -> R) -> R {
        let slices: Vec<&[f32]> = self.blocks.iter().map(|b| b.values()).collect();
        f(Table { blocks: &slices, rows_per_block: self.rows_per_block, width: self.width })
    }
}

/// Both expert tables read in place.
struct ExpertTables {
    down: HostTable,
    up: HostTable,
    activation: Activation,
}

impl ExpertTables {
    fn of(experts: &Experts) -> Option<Self> {
        Some(Self {
            down: HostTable::of(&experts.down)?,
            up: HostTable::of(&experts.up)?,
            activation: experts.activation,
        })
    }

    /// Eq. 5 for `x` `[tokens, d_model]` and the slots grouped by expert, `[tokens, d_model]`.
    fn forward(&self, x: &HostValues, router_weights: &[f32], grouped: &SlotsByExpert, per_token: usize) -> Vec<f32> {
        let slots = self.slots(x, router_weights, grouped, per_token);
        self.down.with(|down| self.up.with(|up| experts::forward(slots, down, up)))
    }

    /// The vector-Jacobian product of [`forward`](Self::forward) for dL/dy `grad_output`.
    fn backward(
        &self,
        x: &HostValues,
        router_weights: &[f32],
        grouped: &SlotsByExpert,
        per_token: usize,
        grad_output: &HostValues,
    ) -> experts::Gradients {
        let slots = self.slots(x, router_weights, grouped, per_token);
        self.down.with(|down| self.up.with(|up| experts::backward(slots, down, up, grad_output.values())))
    }

    fn slots<'a>(
        &self,
        x: &'a HostValues,
        router_weights: &'a [f32],
        grouped: &'a SlotsByExpert,
        per_token: usize,
    ) -> Slots<'a> {
        Slots {
            x: x.values(),
            router_weights,
            grouped,
            per_token,
            d_model: self.down.width,
            activation: self.activation,
        }
    }
}

/// dL/dx and the row gradients of [`ExpertTables::backward`] as plain tensors on `device`.
fn gradient_tensors(
    grads: experts::Gradients,
    grouped: &SlotsByExpert,
    [tokens, d_model]: [usize; 2],
    device: &Device,
) -> (Tensor<2>, RowGradients) {
    let distinct = grouped.experts.len();
    let rows = RowGradients {
        ids: int_tensor(&grouped.experts, [distinct], device),
        down: tensor(grads.down, [distinct, d_model], device),
        up: tensor(grads.up, [distinct, d_model], device),
    };
    (tensor(grads.x, [tokens, d_model], device), rows)
}

/// One PEER layer's parameters read in place.
pub(crate) struct HostPeer {
    sub_keys: HostValues,
    tables: ExpertTables,
    gate: Gate,
}

/// What the host forward pass keeps for the backward pass.
#[derive(Debug, Clone)]
pub(crate) struct HostRouting {
    layout: KeyLayout,
    gate: Gate,
    /// Expert ids, `[tokens, heads, k]`.
    expert_ids: Vec<u32>,
    /// The sub-key pair behind each retrieved expert.
    picks: Vec<[u32; 2]>,
    /// Router weights g, `[tokens, heads, k]`.
    router_weights: Vec<f32>,
    grouped: SlotsByExpert,
}

impl HostRouting {
    /// Expert ids and router weights as untracked tensors on `device`, `[tokens, heads, k]`.
    pub(crate) fn tensors(&self, device: &Device) -> (Tensor<3, Int>, Tensor<3>) {
        let shape = [self.layout.tokens, self.layout.heads, self.layout.top_k];
        let ids: Vec<i64> = self.expert_ids.iter().map(|&v| v as i64).collect();
        (
            Tensor::from_data(TensorData::new(ids, shape), device),
            Tensor::from_data(TensorData::new(self.router_weights.clone(), shape), device),
        )
    }

    fn per_token(&self) -> usize {
        self.layout.heads * self.layout.top_k
    }
}

/// The layer's gradients from [`HostPeer::backward`], as plain tensors.
pub(crate) struct HostGradients {
    /// dL/dx from the experts (the query network's share comes through `queries`).
    pub x: Tensor<2>,
    /// dL/dqueries, `[tokens, heads, key_dim]`.
    pub queries: Tensor<3>,
    /// dL/dsub_keys, `[key_sets, 2, √N, key_dim / 2]`.
    pub sub_keys: Tensor<4>,
    /// dL/du and dL/dv on the retrieved rows.
    pub rows: RowGradients,
}

impl HostPeer {
    /// The parameters of a layer with these experts and sub-keys, if they are f32 on Flex.
    pub(crate) fn of(experts: &Experts, sub_keys: &Tensor<4>, gate: Gate) -> Option<Self> {
        Some(Self { sub_keys: HostValues::of(sub_keys)?, tables: ExpertTables::of(experts)?, gate })
    }

    /// Retrieval, router weights and experts for `x` (`[tokens, d_model]`) and its
    /// `queries` (`[tokens, heads, key_dim]`); returns the output `[tokens, d_model]`.
    pub(crate) fn forward(&self, x: &HostValues, queries: &HostValues, layout: KeyLayout) -> (Vec<f32>, HostRouting) {
        let found = retrieval::retrieve(queries.values(), self.sub_keys.values(), layout);
        let router_weights = retrieval::gate_forward(&found.scores, layout.top_k, self.gate);
        let grouped = SlotsByExpert::new(&found.expert_ids, layout.root * layout.root);
        let routing = HostRouting {
            layout,
            gate: self.gate,
            expert_ids: found.expert_ids,
            picks: found.picks,
            router_weights,
            grouped,
        };
        let output = self.tables.forward(x, &routing.router_weights, &routing.grouped, routing.per_token());
        (output, routing)
    }

    /// Gradients of everything [`forward`](Self::forward) read, given dL/doutput.
    pub(crate) fn backward(
        &self,
        x: &HostValues,
        queries: &HostValues,
        routing: &HostRouting,
        grad_output: &HostValues,
        device: &Device,
    ) -> HostGradients {
        let layout = routing.layout;
        let grads =
            self.tables.backward(x, &routing.router_weights, &routing.grouped, routing.per_token(), grad_output);
        let grad_scores =
            retrieval::gate_backward(&routing.router_weights, &grads.router_weights, layout.top_k, routing.gate);
        let (grad_queries, grad_keys) = retrieval::retrieve_backward(
            queries.values(),
            self.sub_keys.values(),
            layout,
            &routing.picks,
            &grad_scores,
        );
        let (x, rows) = gradient_tensors(grads, &routing.grouped, [layout.tokens, self.tables.down.width], device);
        HostGradients {
            x,
            queries: tensor(grad_queries, [layout.tokens, layout.heads, layout.key_dim], device),
            sub_keys: tensor(grad_keys, [layout.key_sets, 2, layout.root, layout.key_dim / 2], device),
            rows,
        }
    }
}

/// The inputs of [`Experts::forward_detached`] / [`Experts::backward_detached`] read in place,
/// with the slots grouped by expert; `None` off Flex or for non-f32 tensors.
fn detached_inputs(
    experts: &Experts,
    x: &Tensor<2>,
    expert_ids: &Tensor<2, Int>,
    router_weights: &Tensor<2>,
) -> Option<(ExpertTables, HostValues, HostValues, SlotsByExpert)> {
    let (tables, x_host, weights) = (ExpertTables::of(experts)?, HostValues::of(x)?, HostValues::of(router_weights)?);
    let ids = self::expert_ids(expert_ids, experts.num_experts())?;
    Some((tables, x_host, weights, SlotsByExpert::new(&ids, experts.num_experts())))
}

/// [`Experts::forward_detached`] by the host kernel; `None` off Flex or for non-f32 tensors.
pub(crate) fn experts_forward(
    experts: &Experts,
    x: &Tensor<2>,
    expert_ids: &Tensor<2, Int>,
    router_weights: &Tensor<2>,
) -> Option<Tensor<2>> {
    let (tables, x_host, weights, grouped) = detached_inputs(experts, x, expert_ids, router_weights)?;
    let output = tables.forward(&x_host, weights.values(), &grouped, expert_ids.dims()[1]);
    Some(tensor(output, x.dims(), &x.device()))
}

/// [`Experts::backward_detached`] by the host kernel; `None` off Flex or for non-f32 tensors.
pub(crate) fn experts_backward(
    experts: &Experts,
    x: &Tensor<2>,
    expert_ids: &Tensor<2, Int>,
    router_weights: &Tensor<2>,
    grad_output: &Tensor<2>,
) -> Option<ExpertGradients> {
    let (tables, x_host, weights, grouped) = detached_inputs(experts, x, expert_ids, router_weights)?;
    let grads =
        tables.backward(&x_host, weights.values(), &grouped, expert_ids.dims()[1], &HostValues::of(grad_output)?);
    let device = x.device();
    let grad_g = tensor(grads.router_weights.clone(), expert_ids.dims(), &device);
    let (grad_x, rows) = gradient_tensors(grads, &grouped, x.dims(), &device);
    Some(ExpertGradients { x: grad_x, router_weights: grad_g, rows })
}

/// Host retrieval for [`ProductKeys::retrieve`](crate::ProductKeys::retrieve) on plain Flex;
/// `None` for tensors that are not f32.
pub(crate) fn retrieve(
    product_keys: &ProductKeys,
    queries: &Tensor<3>,
    sub_keys: &Tensor<4>,
) -> Option<(Tensor<3>, Tensor<3, Int>)> {
    let layout = KeyLayout::of(product_keys, queries.dims()[0]);
    let (queries_host, keys_host) = (HostValues::of(queries)?, HostValues::of(sub_keys)?);
    let found = retrieval::retrieve(queries_host.values(), keys_host.values(), layout);
    let shape = [layout.tokens, layout.heads, layout.top_k];
    let device = queries.device();
    Some((tensor(found.scores, shape, &device), int_tensor(&found.expert_ids, shape, &device)))
}

/// The expert balance sum `Σ_s Σ_r p₁(s, r)ᵀ F_s p₂(s, r)` (see
/// [`ProductKeys::balance_loss`](crate::ProductKeys::balance_loss)) with `p = softmax(scores)`
/// row by row, over the nonzero shares of the selections `picks` (`set · N + expert` each, each
/// worth `1 / per_set`), as one autodiff node differentiable in the scores (`[key_sets, rows,
/// √N]` each). Softmax, the sparse product and their backward passes are fused: composed of
/// tensor ops, the two softmaxes alone took most of a step at N = 1024². `None` for tensors
/// that are not f32.
pub(crate) fn expert_balance(
    scores_1: Tensor<3>,
    scores_2: Tensor<3>,
    picks: &Tensor<1, Int>,
    per_set: f64,
) -> Option<Tensor<1>> {
    let dims = scores_1.dims();
    let [key_sets, rows, root] = dims;
    let probabilities = |s: &Tensor<3>| Some(balance::softmax_rows(HostValues::of(s)?.values(), root));
    let (p1, p2) = (probabilities(&scores_1)?, probabilities(&scores_2)?);
    // The sparse product reads them transposed, [key_sets, √N, rows]: one row per sub-key.
    let (p1t, p2t) = (balance::transpose(&p1, dims), balance::transpose(&p2, dims));
    let picks: Vec<u32> =
        picks.clone().inner().into_data().convert::<i64>().iter::<i64>().map(|pick| pick as u32).collect();
    let shares = balance::Shares::new(picks, root, per_set as f32);
    let sum = balance::forward(&p1t, &p2t, &shares, dims);
    let output = tensor(vec![sum as f32], [1, 1], &scores_1.device());
    let backward = BalanceBackward { p: [p1, p2], pt: [p1t, p2t], shares, dims };
    let inputs = [scores_1.reshape([key_sets * rows, root]), scores_2.reshape([key_sets * rows, root])];
    Some(custom_op::record(inputs, output, Box::new(backward)).reshape([1]))
}

/// The backward pass of [`expert_balance`].
struct BalanceBackward {
    /// The two halves' probabilities, `[key_sets, rows, √N]`.
    p: [Vec<f32>; 2],
    /// The same transposed, `[key_sets, √N, rows]`.
    pt: [Vec<f32>; 2],
    shares: balance::Shares,
    dims: [usize; 3],
}

impl Vjp for BalanceBackward {
    fn backward(self: Box<Self>, grad_output: Tensor<2>) -> Vec<Option<Tensor<2>>> {
        let scale = grad_output.clone().inner().into_scalar::<f32>();
        let [key_sets, rows, root] = self.dims;
        let [p1t, p2t] = &self.pt;
        let (grad_1t, grad_2t) = balance::backward(p1t, p2t, &self.shares, self.dims, scale);
        let device = grad_output.device();
        let scores_grad = |grad_t: Vec<f32>, p: &[f32]| {
            let grad_p = balance::transpose(&grad_t, [key_sets, root, rows]);
            tensor(balance::softmax_rows_backward(p, &grad_p, root), [key_sets * rows, root], &device)
        };
        vec![Some(scores_grad(grad_1t, &self.p[0])), Some(scores_grad(grad_2t, &self.p[1]))]
    }
}

/// The whole PEER layer by the fused kernels: retrieval, router weights and experts. On an
/// autodiff device the result is one node whose backward pass runs the kernels'
/// vector-Jacobian products: dL/dx, dL/dq and dL/dK go to autodiff (the graph resumes at the
/// scored queries and sub-keys), the tables' row gradients to the row store. `None` for
/// tensors that are not f32, or queries of the wrong shape (the tensor path's retrieval names
/// the mismatch).
///
/// # Shapes
/// - `x`: `[tokens, d_model]`, `queries`: `[tokens, heads, key_dim]`
/// - output: `([batch, seq, d_model], routing [batch, seq, heads, k])`
pub(crate) fn fused_layer(
    peer: &Peer,
    x: Tensor<2>,
    queries: Tensor<3>,
    [batch, seq]: [usize; 2],
) -> Option<(Tensor<3>, PeerRouting)> {
    let [tokens, d_model] = x.dims();
    let layout = KeyLayout::of(&peer.product_keys, tokens);
    let (heads, top_k) = (layout.heads, layout.top_k);
    if queries.dims() != [tokens, heads, layout.key_dim] {
        return None;
    }
    let (queries, sub_keys) = peer.product_keys.scoring_operands(queries);
    let (output, routing) = {
        // The views borrow the tables: they are dropped before anything could update them.
        let layer = HostPeer::of(&peer.experts, &sub_keys, peer.gate)?;
        layer.forward(&HostValues::of(&x)?, &HostValues::of(&queries)?, layout)
    };
    let device = x.device();
    let (expert_ids, router_weights) = routing.tensors(&device);
    let routing_tensors = PeerRouting::new(
        expert_ids.reshape([tokens, heads, top_k]),
        router_weights.reshape([tokens, heads, top_k]),
        [batch, seq],
    );
    let output = tensor(output, [tokens, d_model], &device);
    let [key_sets, halves, root, half] = sub_keys.dims();
    let backward = LayerBackward {
        experts: peer.experts.clone(),
        gate: peer.gate,
        x: x.clone().inner(),
        queries: queries.clone().inner(),
        sub_keys: sub_keys.clone().inner(),
        routing,
    };
    let inputs = [
        x,
        queries.reshape([tokens, heads * layout.key_dim]),
        sub_keys.reshape([key_sets * halves * root, half]),
        peer.experts.down.anchor(),
    ];
    let output = custom_op::record(inputs, output, Box::new(backward));
    Some((output.reshape([batch, seq, d_model]), routing_tensors))
}

/// The backward pass of [`fused_layer`].
struct LayerBackward {
    experts: Experts,
    gate: Gate,
    x: Tensor<2>,
    queries: Tensor<3>,
    sub_keys: Tensor<4>,
    routing: HostRouting,
}

impl Vjp for LayerBackward {
    fn backward(self: Box<Self>, grad_output: Tensor<2>) -> Vec<Option<Tensor<2>>> {
        const RECORDED: &str = "recorded from Flex f32 tensors";
        let grads = HostPeer::of(&self.experts, &self.sub_keys, self.gate).expect(RECORDED).backward(
            &HostValues::of(&self.x).expect(RECORDED),
            &HostValues::of(&self.queries).expect(RECORDED),
            &self.routing,
            &HostValues::of(&grad_output).expect(RECORDED),
            &self.x.device(),
        );
        expert_updates::deposit(&self.experts, grads.rows);
        let [tokens, heads, key_dim] = grads.queries.dims();
        let [key_sets, halves, root, half] = grads.sub_keys.dims();
        vec![
            Some(grads.x),
            Some(grads.queries.reshape([tokens, heads * key_dim])),
            Some(grads.sub_keys.reshape([key_sets * halves * root, half])),
            None,
        ]
    }
}
