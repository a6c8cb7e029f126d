//! The GPU family of the seam: CubeCL kernels on the Cube backend (wgpu here; the same kernels
//! compile for CUDA), read in place through Burn's `extension` feature.
//!
//! Composed of tensor ops, the experts gather `[tokens · m, d_model]` rows twice per pass, form
//! outer products of that size in the backward pass and scatter them into the distinct rows.
//! Here they are three small kernels that never form a `[tokens · m, d_model]` value:
//!
//! - [`slot_dots`]: one cube per token, the dot products of the token's vector (in shared
//!   memory) with the expert rows of its slots (`a = u·x` forward, `v·dy` backward);
//! - [`weighted_rows`]: one cube per token, `Σ_j w[t, j] · row(ids[t, j])` with the threads
//!   over the columns (`y = Σ h v` forward, `dx = Σ da u` backward);
//! - [`row_sums`]: one thread per row-gradient element, summing the slots of its distinct
//!   expert from a grouping of the slots made on the host ([`SlotsByExpert`]).
//!
//! Two more kernels serve retrieval and the optimizer: [`candidates`] merges each row's two
//! halves' top-k into its top-k experts (one thread per row, about k·ln k pairs in registers
//! instead of `[rows, k²]` candidate scores), and [`adamw_rows`](kernels::adamw_rows) applies
//! the lazy AdamW to the touched rows of θ, m and v in place (one thread per element).
//!
//! Activations, router weights and the small `[tokens, m]` products stay Burn tensor ops, so
//! each equation has one definition. None of the kernels uses plane (subgroup) operations or
//! float atomics, which CPU adapters such as Mesa's llvmpipe lack; the per-token kernels have
//! one barrier, reached by every thread. Grids are spread over three dimensions ([`cube_count`]):
//! wgpu allows 65,535 cubes per dimension, fewer than the tokens or gradient elements of a step.
//!
//! Tables in row blocks take one launch per block: a slot whose expert lives in another block
//! is left to that block's launch. Tensors that are not f32 (ids not i32) fall back to tensor
//! ops.

use burn::backend::Cube;
use burn::backend::wgpu::CubeTensor;
use burn::tensor::{DType, Device, IndexingUpdateOp, Int, Tensor};
use cubecl::ir::{ElemType, FloatKind, IntKind};
use cubecl::prelude::{CubeCount, CubeDim};

use crate::custom_op::{self, Vjp};
use crate::experts::{ExpertGradients, Experts, RowGradients};
use crate::product_keys::half_scores;
use crate::sparse_adamw::{RowMoments, SparseAdamWConfig};
use crate::table::ExpertTable;
use kernels::{candidates, row_sums, slot_dots, weighted_rows};

/// Threads per cube of every launch here.
const CUBE_THREADS: u32 = 256;

/// The kernels (device code), apart from the host code's Burn names.
mod kernels {
    use cubecl::prelude::*;

    /// The slots of token t (`ids[t, 0..m]`) whose expert lies in this block (rows
    /// `first..first + block_rows` of the table), in slot order: their rows within the block
    /// and their slot indices. Returns how many; run by one thread of the cube.
    #[cube]
    fn list_block_slots<I: Int>(
        ids: &Tensor<I>,
        t: usize,
        first: usize,
        block_rows: usize,
        rows: &mut Shared<[u32]>,
        slots: &mut Shared<[u32]>,
        #[comptime] m: usize,
    ) -> u32 {
        let mut n = 0usize;
        for j in 0..m {
            let id = usize::cast_from(ids[t * ids.stride(0) + j * ids.stride(1)]);
            if id >= first && id < first + block_rows {
                rows[n] = (id - first) as u32;
                slots[n] = j as u32;
                n += 1;
            }
        }
        n as u32
    }

    /// Expert-row dot products, one cube per token t: `out[t, j] = Σ_c table[ids[t, j] −
    /// first_row, c] · vectors[t, c]` for the slots whose expert lies in this block (rows
    /// `first_row..first_row + rows`). The token's vector goes to shared memory and the first
    /// thread lists the token's slots in this block; then each thread takes list entries p,
    /// p + cube size, … and reads its expert's row straight through, so no thread of a cube
    /// idles on a slot of another block.
    #[cube(launch)]
    pub(super) fn slot_dots<F: Float, I: Int>(
        table: &Tensor<F>,
        vectors: &Tensor<F>,
        ids: &Tensor<I>,
        out: &mut Tensor<F>,
        first_row: u32,
        #[comptime] width: usize,
        #[comptime] m: usize,
        #[define(F, I)] _dtypes: [ElemType; 2],
    ) {
        // Cubes past the last token (the grid is rounded up) list no slot.
        let t = CUBE_POS;
        let live = t < ids.shape(0);
        let mut vector = Shared::<[F]>::new_slice(width);
        let mut c = UNIT_POS_X as usize;
        while live && c < width {
            vector[c] = vectors[t * vectors.stride(0) + c * vectors.stride(1)];
            c += CUBE_DIM_X as usize;
        }
        let mut rows = Shared::<[u32]>::new_slice(m);
        let mut slots = Shared::<[u32]>::new_slice(m);
        let mut listed = Shared::<[u32]>::new_slice(1usize);
        if UNIT_POS_X == 0 {
            listed[0] = 0;
            if live {
                listed[0] = list_block_slots::<I>(ids, t, first_row as usize, table.shape(0), &mut rows, &mut slots, m);
            }
        }
        sync_cube();
        let n = listed[0] as usize;
        let step = table.stride(1);
        let mut p = UNIT_POS_X as usize;
        while p < n {
            let row = rows[p] as usize * table.stride(0);
            let mut acc = F::new(0.0);
            for c in 0..width {
                acc += table[row + c * step] * vector[c];
            }
            let at = t * out.stride(0) + slots[p] as usize * out.stride(1);
            out[at] = acc;
            p += CUBE_DIM_X as usize;
        }
    }

    /// Weighted sums of expert rows, one cube per token t: `out[t, c] += Σ_j weights[t, j] ·
    /// table[ids[t, j] − first_row, c]` over the slots whose expert lies in this block. The
    /// first thread lists the token's slots in this block (row, weight) in shared memory; then
    /// each thread sums columns c, c + cube size, … over that list, so the threads of a cube
    /// read consecutive elements of each row.
    #[cube(launch)]
    pub(super) fn weighted_rows<F: Float, I: Int>(
        table: &Tensor<F>,
        weights: &Tensor<F>,
        ids: &Tensor<I>,
        out: &mut Tensor<F>,
        first_row: u32,
        #[comptime] m: usize,
        #[define(F, I)] _dtypes: [ElemType; 2],
    ) {
        // Cubes past the last token (the grid is rounded up) list no slot.
        let t = CUBE_POS;
        let live = t < ids.shape(0);
        let mut rows = Shared::<[u32]>::new_slice(m);
        let mut slots = Shared::<[u32]>::new_slice(m);
        let mut coefficients = Shared::<[F]>::new_slice(m);
        let mut listed = Shared::<[u32]>::new_slice(1usize);
        if UNIT_POS_X == 0 {
            listed[0] = 0;
            if live {
                let n = list_block_slots::<I>(ids, t, first_row as usize, table.shape(0), &mut rows, &mut slots, m);
                for p in 0..n as usize {
                    coefficients[p] = weights[t * weights.stride(0) + slots[p] as usize * weights.stride(1)];
                }
                listed[0] = n;
            }
        }
        sync_cube();
        let n = listed[0] as usize;
        let width = out.shape(1);
        let mut c = UNIT_POS_X as usize;
        while live && c < width {
            let mut acc = F::new(0.0);
            for p in 0..n {
                acc += coefficients[p] * table[rows[p] as usize * table.stride(0) + c * table.stride(1)];
            }
            let at = t * out.stride(0) + c * out.stride(1);
            out[at] += acc;
            c += CUBE_DIM_X as usize;
        }
    }

    /// Row gradients: `out[r, c] = Σ_{s in list(r)} coefficients[s] · vectors[s / m, c]`, the slots
    /// of distinct expert r being `list[offsets[r]..offsets[r + 1]]`.
    #[cube(launch)]
    pub(super) fn row_sums<F: Float, I: Int>(
        list: &Tensor<I>,
        offsets: &Tensor<I>,
        coefficients: &Tensor<F>,
        vectors: &Tensor<F>,
        out: &mut Tensor<F>,
        m: u32,
        #[define(F, I)] _dtypes: [ElemType; 2],
    ) {
        let width = out.shape(1);
        let pos = ABSOLUTE_POS;
        if pos >= out.shape(0) * width {
            terminate!();
        }
        let r = pos / width;
        let c = pos % width;
        let start = usize::cast_from(offsets[r]);
        let end = usize::cast_from(offsets[r + 1]);
        let mut acc = F::new(0.0);
        for p in start..end {
            let slot = usize::cast_from(list[p]);
            acc += coefficients[slot] * vectors[(slot / m as usize) * vectors.stride(0) + c * vectors.stride(1)];
        }
        let at = r * out.stride(0) + c * out.stride(1);
        out[at] = acc;
    }

    /// The lazy AdamW rule (see [`crate::sparse_adamw`]) on the touched rows of one block
    /// (table rows `first_row..first_row + rows`), in place, one thread per element of
    /// `grad` (`[ids, width]`, row i the gradient of table row `ids[i]`): the moments, then
    /// θ. Rows of other blocks are left to their block's launch; `scale` (`[1]`) is the
    /// clipping coefficient.
    #[cube(launch)]
    pub(super) fn adamw_rows<F: Float, I: Int>(
        theta: &mut Tensor<F>,
        moment_1: &mut Tensor<F>,
        moment_2: &mut Tensor<F>,
        ids: &Tensor<I>,
        grad: &Tensor<F>,
        scale: &Tensor<F>,
        first_row: u32,
        rule: AdamWRule,
        #[define(F, I)] _dtypes: [ElemType; 2],
    ) {
        let width = grad.shape(1);
        let pos = ABSOLUTE_POS;
        if pos >= grad.shape(0) * width {
            terminate!();
        }
        let r = pos / width;
        let c = pos % width;
        let id = usize::cast_from(ids[r * ids.stride(0)]);
        let first = first_row as usize;
        if id < first || id >= first + theta.shape(0) {
            terminate!();
        }
        let row = id - first;
        let g = grad[r * grad.stride(0) + c * grad.stride(1)] * scale[0];
        let at_1 = row * moment_1.stride(0) + c * moment_1.stride(1);
        let at_2 = row * moment_2.stride(0) + c * moment_2.stride(1);
        let at = row * theta.stride(0) + c * theta.stride(1);
        let m = moment_1[at_1] * F::cast_from(rule.beta_1) + g * F::cast_from(rule.one_minus_beta_1);
        let v = moment_2[at_2] * F::cast_from(rule.beta_2) + g * g * F::cast_from(rule.one_minus_beta_2);
        moment_1[at_1] = m;
        moment_2[at_2] = v;
        let corrected_1 = m / F::cast_from(rule.correction_1);
        let corrected_2 = v / F::cast_from(rule.correction_2);
        let delta = corrected_1 / (corrected_2.sqrt() + F::cast_from(rule.epsilon));
        theta[at] = theta[at] * F::cast_from(rule.decay) - delta * F::cast_from(rule.lr);
    }

    /// The scalars of one lazy AdamW step.
    #[derive(CubeLaunch, CubeType)]
    pub(super) struct AdamWRule {
        pub beta_1: f32,
        pub one_minus_beta_1: f32,
        pub beta_2: f32,
        pub one_minus_beta_2: f32,
        /// `1 − β₁ᵗ`.
        pub correction_1: f32,
        /// `1 − β₂ᵗ`.
        pub correction_2: f32,
        pub epsilon: f32,
        pub lr: f32,
        /// `1 − lr·λ`.
        pub decay: f32,
    }

    /// The candidate step of product-key retrieval, one thread per row (a token's head): each
    /// half's k best sub-keys (scores `best_1`, `best_2`, sub-key indices `index_1`,
    /// `index_2`, `[rows, k]`, in any order) are sorted in registers, best first; then only
    /// the pairs (i, j) with (i + 1)(j + 1) ≤ k can make the row's top-k (every other pair is
    /// beaten by the i + 1 by j + 1 pairs above and left of it), and they are merged into it:
    /// `scores` (descending) and expert ids `i·√N + j`. Equal scores keep the earlier pair.
    #[cube(launch)]
    pub(super) fn candidates<F: Float, I: Int>(
        best_1: &Tensor<F>,
        index_1: &Tensor<I>,
        best_2: &Tensor<F>,
        index_2: &Tensor<I>,
        scores: &mut Tensor<F>,
        ids: &mut Tensor<I>,
        root: u32,
        #[comptime] k: usize,
        #[define(F, I)] _dtypes: [ElemType; 2],
    ) {
        let r = ABSOLUTE_POS;
        if r >= scores.shape(0) {
            terminate!();
        }
        let mut score_1 = Array::<F>::new(k);
        let mut sub_key_1 = Array::<u32>::new(k);
        let mut score_2 = Array::<F>::new(k);
        let mut sub_key_2 = Array::<u32>::new(k);
        sorted_half::<F, I>(best_1, index_1, r, &mut score_1, &mut sub_key_1, k);
        sorted_half::<F, I>(best_2, index_2, r, &mut score_2, &mut sub_key_2, k);

        let mut top_score = Array::<F>::new(k);
        let mut top_id = Array::<u32>::new(k);
        let mut n = 0usize;
        for i in 0..k {
            for j in 0..k {
                if (i + 1) * (j + 1) <= k {
                    let s = score_1[i] + score_2[j];
                    let id = sub_key_1[i] * root + sub_key_2[j];
                    // `top_score[k − 1]` is only compared once the list is full.
                    let full = n == k;
                    let enters = !full || s > top_score[k - 1];
                    if enters {
                        // Full, the last entry drops out.
                        let mut end = n;
                        if full {
                            end = k - 1;
                        }
                        insert_sorted::<F>(&mut top_score, &mut top_id, end, s, id);
                        if !full {
                            n += 1;
                        }
                    }
                }
            }
        }
        for p in 0..k {
            let at = r * scores.stride(0) + p * scores.stride(1);
            scores[at] = top_score[p];
            let at = r * ids.stride(0) + p * ids.stride(1);
            ids[at] = I::cast_from(top_id[p]);
        }
    }

    /// Row r of one half's k best (`best`, `index`, `[rows, k]`) sorted by insertion into
    /// `score` and `sub_key`, best first; equal scores keep their order.
    #[cube]
    fn sorted_half<F: Float, I: Int>(
        best: &Tensor<F>,
        index: &Tensor<I>,
        r: usize,
        score: &mut Array<F>,
        sub_key: &mut Array<u32>,
        #[comptime] k: usize,
    ) {
        for p in 0..k {
            let s = best[r * best.stride(0) + p * best.stride(1)];
            let id = u32::cast_from(index[r * index.stride(0) + p * index.stride(1)]);
            insert_sorted::<F>(score, sub_key, p, s, id);
        }
    }

    /// Inserts `(s, id)` into the descending list `score[0..end]`, `ids[0..end]`, after the
    /// entries of equal score, shifting the entries below it down by one (into `end`).
    #[cube]
    fn insert_sorted<F: Float>(score: &mut Array<F>, ids: &mut Array<u32>, end: usize, s: F, id: u32) {
        let mut q = end;
        loop {
            if q == 0 {
                break;
            }
            if score[q - 1] >= s {
                break;
            }
            score[q] = score[q - 1];
            ids[q] = ids[q - 1];
            q -= 1;
        }
        score[q] = s;
        ids[q] = id;
    }
}

/// The slots of a step grouped by expert: a 4-byte-per-slot readback and one sort on the host.
/// The grouping is exact and deterministic (each expert's slots in increasing order), so the
/// row gradients are the same sums in the same order on every run; float atomics, the
/// alternative, exist only on some adapters and sum in arrival order.
struct SlotsByExpert {
    /// Distinct expert ids, increasing.
    ids: Vec<i64>,
    /// Expert r's slots are `slots[offsets[r]..offsets[r + 1]]`.
    offsets: Vec<i64>,
    /// Slot indices (`t · m + j`), grouped by expert, increasing within each group.
    slots: Vec<i64>,
}

impl SlotsByExpert {
    fn of(expert_ids: Tensor<2, Int>) -> Self {
        let ids = expert_ids.into_data().convert::<i64>().try_into_vec::<i64>().expect("i64 ids");
        let mut keyed: Vec<u64> = ids.iter().enumerate().map(|(slot, &id)| ((id as u64) << 32) | slot as u64).collect();
        keyed.sort_unstable();
        let mut grouping = Self { ids: Vec::new(), offsets: vec![0], slots: Vec::with_capacity(keyed.len()) };
        for (position, key) in keyed.iter().enumerate() {
            let id = (key >> 32) as i64;
            if grouping.ids.last() != Some(&id) {
                if position > 0 {
                    grouping.offsets.push(position as i64);
                }
                grouping.ids.push(id);
            }
            grouping.slots.push((key & 0xffff_ffff) as i64);
        }
        grouping.offsets.push(keyed.len() as i64);
        grouping
    }
}

fn int_tensor(values: Vec<i64>, device: &Device) -> Tensor<1, Int> {
    let len = values.len();
    Tensor::from_data(burn::tensor::TensorData::new(values, [len]), device)
}

/// [`SlotsByExpert`] on the device, for [`row_sums`].
struct SlotLists {
    /// Distinct ids, increasing, `[U]`.
    ids: Tensor<1, Int>,
    offsets: CubeTensor,
    list: CubeTensor,
    /// Slots per row of the ids (`m`).
    per_row: usize,
}

impl SlotLists {
    /// The slots of `ids` (`[rows, m]`) grouped by id.
    fn of(ids: Tensor<2, Int>, device: &Device) -> Option<Self> {
        let [_, per_row] = ids.dims();
        let grouping = SlotsByExpert::of(ids);
        Some(Self {
            offsets: int_primitive(int_tensor(grouping.offsets, device))?,
            list: int_primitive(int_tensor(grouping.slots, device))?,
            ids: int_tensor(grouping.ids, device),
            per_row,
        })
    }

    /// `[U, width]`: for each distinct id, the sum over its slots s of `coefficients[s] ·
    /// vectors[s / m]` (`coefficients` `[rows, m]`, `vectors` `[rows, width]`).
    fn row_sums(&self, coefficients: Tensor<2>, vectors: &CubeTensor, width: usize) -> Option<Tensor<2>> {
        let [rows, m] = coefficients.dims();
        let device = coefficients.device();
        let coefficients = float_primitive(coefficients.reshape([rows * m]))?;
        let [distinct] = self.ids.dims();
        let out = float_primitive(Tensor::<2>::zeros([distinct, width], &device))?;
        let (count, dim) = grid(&out, distinct * width);
        row_sums::launch(
            &out.client,
            count,
            dim,
            self.list.clone().into_tensor_arg(),
            self.offsets.clone().into_tensor_arg(),
            coefficients.into_tensor_arg(),
            vectors.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            self.per_row as u32,
            [f32_type(), i32_type()],
        );
        Some(Tensor::from_primitive::<Cube>(out))
    }
}

/// The adapter's limit on one bound buffer (CubeCL's `max_page_size`: wgpu's storage-binding
/// and buffer-size limits, whichever is smaller).
pub(crate) fn max_buffer_bytes(device: &Device) -> Option<usize> {
    let probe = float_primitive(Tensor::<1>::zeros([1], &device.clone().without_autodiff()))?;
    usize::try_from(probe.client.properties().memory.max_page_size).ok()
}

/// A float tensor's Cube primitive, if it is an f32 tensor on a Cube device.
fn float_primitive<const D: usize>(tensor: Tensor<D>) -> Option<CubeTensor> {
    let primitive = tensor.try_into_primitive::<Cube>().ok()?;
    (primitive.dtype == DType::F32).then_some(primitive)
}

/// An int tensor's Cube primitive, if it is an i32 tensor on a Cube device.
fn int_primitive<const D: usize>(tensor: Tensor<D, Int>) -> Option<CubeTensor> {
    let primitive = tensor.try_into_primitive::<Cube>().ok()?;
    (primitive.dtype == DType::I32).then_some(primitive)
}

fn f32_type() -> ElemType {
    ElemType::Float(FloatKind::F32)
}

fn i32_type() -> ElemType {
    ElemType::Int(IntKind::I32)
}

/// Threads per cube of the per-token kernels.
const TOKEN_THREADS: u32 = 64;

/// `cubes` cubes spread over the grid's three dimensions within the adapter's per-dimension
/// limit; the kernels number cubes by `CUBE_POS` and skip the positions past their work.
fn cube_count(like: &CubeTensor, cubes: usize) -> CubeCount {
    let limit = like.client.properties().hardware.max_cube_count.0;
    #[cfg(test)]
    let limit = tests::GRID_LIMIT.with(|test_limit| test_limit.get()).unwrap_or(limit);
    let [x, y, z] = spread(cubes, limit);
    CubeCount::Static(x, y, z)
}

/// A grid of `x · y · z ≥ cubes` cubes with each side at most `limit`, x filled first, then y,
/// then z (rounded up by less than one `x · y` layer).
fn spread(cubes: usize, limit: u32) -> [u32; 3] {
    let limit = limit.max(1) as usize;
    let x = cubes.clamp(1, limit);
    let rest = cubes.div_ceil(x).max(1);
    let y = rest.min(limit);
    let z = rest.div_ceil(y);
    assert!(z <= limit, "a launch of {cubes} cubes exceeds the adapter's grid of {limit}³ cubes");
    [x as u32, y as u32, z as u32]
}

/// A launch of `threads` threads, [`CUBE_THREADS`] per cube.
fn grid(like: &CubeTensor, threads: usize) -> (CubeCount, CubeDim) {
    (cube_count(like, threads.div_ceil(CUBE_THREADS as usize)), CubeDim::new_1d(CUBE_THREADS))
}

/// The tables' blocks without autodiff, each with its first row.
fn blocks(table: &ExpertTable) -> Option<Vec<(CubeTensor, u32)>> {
    let (blocks, rows_per_block) = table.values_in_blocks();
    blocks
        .into_iter()
        .enumerate()
        .map(|(b, block)| Some((float_primitive(block)?, (b * rows_per_block) as u32)))
        .collect()
}

/// `[tokens, m]` dot products of each slot's expert row in `table` with its token's row of
/// `vectors` (`[tokens, d_model]`).
fn dots(table: &[(CubeTensor, u32)], vectors: &CubeTensor, ids: &CubeTensor, device: &Device) -> CubeTensor {
    let [tokens, m] = ids.meta.shape().dims::<2>();
    let [_, width] = vectors.meta.shape().dims::<2>();
    let out = float_primitive(Tensor::<2>::zeros([tokens, m], device)).expect("f32 zeros on a Cube device");
    for (block, first_row) in table {
        slot_dots::launch(
            &out.client,
            cube_count(&out, tokens),
            CubeDim::new_1d(TOKEN_THREADS),
            block.clone().into_tensor_arg(),
            vectors.clone().into_tensor_arg(),
            ids.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            *first_row,
            width,
            m,
            [f32_type(), i32_type()],
        );
    }
    out
}

/// `[tokens, d_model]` sums over each token's slots of `weights[t, j]` times the slot's expert
/// row in `table`.
fn weighted(
    table: &[(CubeTensor, u32)],
    weights: &CubeTensor,
    ids: &CubeTensor,
    width: usize,
    device: &Device,
) -> CubeTensor {
    let [tokens, m] = ids.meta.shape().dims::<2>();
    let out = float_primitive(Tensor::<2>::zeros([tokens, width], device)).expect("f32 zeros on a Cube device");
    for (block, first_row) in table {
        weighted_rows::launch(
            &out.client,
            cube_count(&out, tokens),
            CubeDim::new_1d(TOKEN_THREADS),
            block.clone().into_tensor_arg(),
            weights.clone().into_tensor_arg(),
            ids.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            *first_row,
            m,
            [f32_type(), i32_type()],
        );
    }
    out
}

/// Eq. 5 by the kernels: `a = u·x`, `h = g σ(a)` (tensor ops), `y = Σ h v`; returns y and a
/// (for the backward pass). `None` where the tensors cannot go to the kernels.
pub(crate) fn experts_forward(
    experts: &Experts,
    x: &Tensor<2>,
    expert_ids: &Tensor<2, Int>,
    router_weights: &Tensor<2>,
) -> Option<(Tensor<2>, Tensor<2>)> {
    let device = x.device();
    let [_, d_model] = x.dims();
    let (down, up) = (blocks(&experts.down)?, blocks(&experts.up)?);
    let (xs, ids) = (float_primitive(x.clone())?, int_primitive(expert_ids.clone())?);
    let pre_activation = Tensor::<2>::from_primitive::<Cube>(dots(&down, &xs, &ids, &device));
    let hidden = experts.activation.apply(pre_activation.clone()) * router_weights.clone();
    let hidden = float_primitive(hidden)?;
    Some((Tensor::from_primitive::<Cube>(weighted(&up, &hidden, &ids, d_model, &device)), pre_activation))
}

/// The experts' vector-Jacobian product by the kernels (see [`Experts::backward_detached`]):
/// `dh = v·dy`, `dg = σ(a) dh`, `da = g σ'(a) dh`, `dx = Σ da u`, and the row gradients
/// `du = Σ da x`, `dv = Σ g σ(a) dy` over each distinct expert's slots. `a` is recomputed
/// unless the forward pass kept it (`pre_activation`).
pub(crate) fn experts_backward(
    experts: &Experts,
    x: &Tensor<2>,
    expert_ids: &Tensor<2, Int>,
    router_weights: &Tensor<2>,
    grad_output: &Tensor<2>,
    pre_activation: Option<Tensor<2>>,
) -> Option<ExpertGradients> {
    let device = x.device();
    let [_, d_model] = x.dims();
    let (down, up) = (blocks(&experts.down)?, blocks(&experts.up)?);
    let (xs, ids) = (float_primitive(x.clone())?, int_primitive(expert_ids.clone())?);
    let dys = float_primitive(grad_output.clone())?;

    let a = match pre_activation {
        Some(a) => a,
        None => Tensor::<2>::from_primitive::<Cube>(dots(&down, &xs, &ids, &device)),
    };
    let dh = Tensor::<2>::from_primitive::<Cube>(dots(&up, &dys, &ids, &device));
    let g = router_weights.clone();
    let sigma = experts.activation.apply(a.clone());
    let da = dh.clone() * g.clone() * experts.activation.derivative(a);
    let up_coefficients = sigma.clone() * g;
    let grad_g = dh * sigma;
    let grad_x = Tensor::from_primitive::<Cube>(weighted(&down, &float_primitive(da.clone())?, &ids, d_model, &device));

    let lists = SlotLists::of(expert_ids.clone(), &device)?;
    let grad_down = lists.row_sums(da, &xs, d_model)?;
    let grad_up = lists.row_sums(up_coefficients, &dys, d_model)?;
    Some(ExpertGradients {
        x: grad_x,
        router_weights: grad_g,
        rows: RowGradients { ids: lists.ids, down: grad_down, up: grad_up },
    })
}

/// One lazy AdamW step (see [`crate::sparse_adamw`]) of rows `ids` (distinct) of `table` with
/// gradients `grad` (`[ids, width]`), in place by the [`adamw_rows`](kernels::adamw_rows)
/// kernel, one launch per row block, θ, m and v read and written once each. `None`, with
/// nothing changed, where the tensors cannot go to the kernel (not f32, ids not i32, moments in
/// another block layout than the table's).
pub(crate) fn adamw_rows(
    config: &SparseAdamWConfig,
    lr: f64,
    step: i32,
    table: &ExpertTable,
    moments: &RowMoments,
    ids: &Tensor<1, Int>,
    grad: Tensor<2>,
) -> Option<()> {
    let sizes = table.block_sizes();
    let tables = [table, &moments.moment_1, &moments.moment_2];
    if tables.iter().any(|t| t.block_sizes() != sizes || t.values_in_blocks().0.iter().any(|b| b.dtype() != DType::F32))
    {
        return None;
    }
    let [rows, width] = grad.dims();
    let scale = super::tensor_ops::clip_coefficient(config, &grad).unwrap_or_else(|| Tensor::ones([1], &grad.device()));
    let (ids, grad, scale) = (int_primitive(ids.clone())?, float_primitive(grad)?, float_primitive(scale)?);
    if rows == 0 {
        return Some(());
    }
    let (beta_1, beta_2) = (config.beta_1, config.beta_2);
    let rule = || {
        kernels::AdamWRuleLaunch::new(
            beta_1,
            1.0 - beta_1,
            beta_2,
            1.0 - beta_2,
            1.0 - beta_1.powi(step),
            1.0 - beta_2.powi(step),
            config.epsilon,
            lr as f32,
            (1.0 - lr * config.weight_decay as f64) as f32,
        )
    };
    // The block's value as a buffer this launch may write: the Param's own where no other
    // handle reads it, a copy otherwise.
    let writable = |value: Tensor<2>| {
        let value = float_primitive(value).expect("f32 blocks, checked above");
        if value.can_mut() && value.is_nonoverlapping() { value } else { value.copy() }
    };
    let mut first_row = 0u32;
    for (b, block_rows) in sizes.into_iter().enumerate() {
        table.rewrite_block(b, |theta| {
            let theta = writable(theta);
            moments.moment_1.rewrite_block(b, |moment_1| {
                let moment_1 = writable(moment_1);
                moments.moment_2.rewrite_block(b, |moment_2| {
                    let moment_2 = writable(moment_2);
                    let (count, dim) = grid(&theta, rows * width);
                    kernels::adamw_rows::launch(
                        &theta.client,
                        count,
                        dim,
                        theta.clone().into_tensor_arg(),
                        moment_1.clone().into_tensor_arg(),
                        moment_2.clone().into_tensor_arg(),
                        ids.clone().into_tensor_arg(),
                        grad.clone().into_tensor_arg(),
                        scale.clone().into_tensor_arg(),
                        first_row,
                        rule(),
                        [f32_type(), i32_type()],
                    );
                    Tensor::from_primitive::<Cube>(moment_2)
                });
                Tensor::from_primitive::<Cube>(moment_1)
            });
            Tensor::from_primitive::<Cube>(theta)
        });
        first_row += block_rows as u32;
    }
    Some(())
}

/// Exact product-key top-k without autodiff (`queries` `[tokens, heads, key_dim]`, `sub_keys`
/// `[key_sets, 2, √N, key_dim / 2]`, both as scored): the sub-key score matmuls, Burn's
/// one-pass top-k kernel per half, then the candidate step in one kernel
/// ([`candidates`]) instead of the tensor path's `[tokens, heads, k²]`
/// candidate scores and their second top-k. Scores (descending) and expert ids, `[tokens,
/// heads, k]`; `None` where the tensors cannot go to the kernel.
pub(crate) fn retrieve(queries: &Tensor<3>, sub_keys: &Tensor<4>, k: usize) -> Option<(Tensor<3>, Tensor<3, Int>)> {
    let [tokens, heads, key_dim] = queries.dims();
    let [_, _, root, half] = sub_keys.dims();
    debug_assert_eq!(2 * half, key_dim);
    // The kernel takes f32 scores: other dtypes go to the tensor path before any work here.
    float_primitive(queries.clone())?;
    float_primitive(sub_keys.clone())?;
    let device = queries.device();
    let rows = tokens * heads;
    let best = |index: usize| {
        let scores = half_scores(queries.clone().narrow(2, index * half, half), sub_keys, index);
        let (best, sub_key) = if k < root {
            scores.topk_with_indices(k, 2)
        } else {
            let all =
                Tensor::<1, Int>::arange(0..root as i64, &device).reshape([1, 1, root]).expand([tokens, heads, root]);
            (scores, all)
        };
        Some((float_primitive(best.reshape([rows, k]))?, int_primitive(sub_key.reshape([rows, k]))?))
    };
    let ((best_1, index_1), (best_2, index_2)) = (best(0)?, best(1)?);
    let scores = float_primitive(Tensor::<2>::zeros([rows, k], &device))?;
    let ids = int_primitive(Tensor::<2, Int>::zeros([rows, k], &device))?;
    let (count, dim) = grid(&scores, rows);
    candidates::launch(
        &scores.client,
        count,
        dim,
        best_1.into_tensor_arg(),
        index_1.into_tensor_arg(),
        best_2.into_tensor_arg(),
        index_2.into_tensor_arg(),
        scores.clone().into_tensor_arg(),
        ids.clone().into_tensor_arg(),
        root as u32,
        k,
        [f32_type(), i32_type()],
    );
    let scores = Tensor::<2>::from_primitive::<Cube>(scores).reshape([tokens, heads, k]);
    Some((scores, Tensor::<2, Int>::from_primitive::<Cube>(ids).reshape([tokens, heads, k])))
}

/// Product-key retrieval on an autodiff Cube device as one node: the forward pass is
/// [`retrieve`]'s (sub-key score matmuls, Burn's top-k kernel, the candidate kernel), computed
/// without autodiff; the backward pass uses that only the `k` selected scores of each row carry a
/// gradient. With `i`, `j` the sub-keys of a selected expert (`id = i·√N + j`) and `dS` the
/// scores' gradient: `dq₁ = Σ_p dS_p c_i`, `dq₂ = Σ_p dS_p c'_j` ([`weighted_rows`] over the
/// sub-key table), `dc_i = Σ dS_p q₁` over the slots that picked `i` ([`row_sums`]), instead of
/// autodiff's two `[tokens · heads, √N]`-sized matmuls through a dense score gradient.
///
/// `queries` `[tokens, heads, key_dim]` and `sub_keys` `[key_sets, 2, √N, key_dim / 2]` are the
/// scored operands; `None` where the tensors cannot go to the kernels.
pub(crate) fn retrieve_tracked(
    queries: Tensor<3>,
    sub_keys: Tensor<4>,
    k: usize,
) -> Option<(Tensor<3>, Tensor<3, Int>)> {
    let [tokens, heads, key_dim] = queries.dims();
    let [key_sets, _, root, half] = sub_keys.dims();
    let (scores, expert_ids) = retrieve(&queries.clone().inner(), &sub_keys.clone().inner(), k)?;
    let rows = tokens * heads;
    let tracked = queries.is_autodiff() || sub_keys.is_autodiff();
    let backward = RetrievalBackward {
        queries: queries.clone().inner().reshape([rows, key_dim]),
        sub_keys: sub_keys.clone().inner().reshape([key_sets * 2 * root, half]),
        expert_ids: expert_ids.clone().reshape([rows, k]),
        heads,
        key_sets,
        root,
    };
    let scores = custom_op::record(
        [queries.reshape([rows, key_dim]), sub_keys.reshape([key_sets * 2 * root, half])],
        scores.reshape([rows, k]),
        Box::new(backward),
    );
    // The ids live on the autodiff device, as the tensor path's do.
    let expert_ids = if tracked { Tensor::from_inner(expert_ids) } else { expert_ids };
    Some((scores.reshape([tokens, heads, k]), expert_ids))
}

/// The backward pass of [`retrieve_tracked`].
struct RetrievalBackward {
    /// `[tokens · heads, key_dim]`.
    queries: Tensor<2>,
    /// `[key_sets · 2 · √N, key_dim / 2]`: row `(set · 2 + half) · √N + i` is sub-key i.
    sub_keys: Tensor<2>,
    /// `[tokens · heads, k]`.
    expert_ids: Tensor<2, Int>,
    heads: usize,
    key_sets: usize,
    root: usize,
}

impl Vjp for RetrievalBackward {
    fn backward(self: Box<Self>, grad_scores: Tensor<2>) -> Vec<Option<Tensor<2>>> {
        let device = grad_scores.device();
        let [rows, key_dim] = self.queries.dims();
        let half = key_dim / 2;
        let root = self.root as i64;
        // Each row's key set: its head with per-head keys, the one shared set otherwise.
        let set = if self.key_sets == 1 {
            Tensor::<2, Int>::zeros([rows, 1], &device)
        } else {
            Tensor::<1, Int>::arange(0..rows as i64, &device).remainder_scalar(self.heads as i64).reshape([rows, 1])
        };
        let first = set.clone() * (2 * root) + self.expert_ids.clone().div_scalar(root);
        let second = set * (2 * root) + root + self.expert_ids.remainder_scalar(root);
        let keys = [(float_primitive(self.sub_keys.clone()).expect("f32 sub-keys"), 0)];
        let weights = float_primitive(grad_scores.clone()).expect("f32 score gradient");
        let mut grad_queries = Vec::new();
        let mut grad_keys = Tensor::<2>::zeros(self.sub_keys.dims(), &device);
        for (index, sub_key_rows) in [first, second].into_iter().enumerate() {
            let ids = int_primitive(sub_key_rows.clone()).expect("i32 ids");
            grad_queries.push(Tensor::<2>::from_primitive::<Cube>(weighted(&keys, &weights, &ids, half, &device)));
            let query_half = float_primitive(self.queries.clone().narrow(1, index * half, half)).expect("f32 queries");
            let lists = SlotLists::of(sub_key_rows, &device).expect("i32 ids");
            let sums = lists.row_sums(grad_scores.clone(), &query_half, half).expect("f32 score gradient");
            grad_keys = grad_keys.select_assign(0, lists.ids, sums, IndexingUpdateOp::Add);
        }
        vec![Some(Tensor::cat(grad_queries, 1)), Some(grad_keys)]
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use burn::tensor::{Device, DeviceKind, Distribution, Int, Tensor, TensorData};

    use super::{adamw_rows, spread};
    use crate::sparse_adamw::{RowMoments, SparseAdamWConfig};
    use crate::table::ExpertTable;
    use crate::{PeerConfig, take_row_gradients};

    thread_local! {
        /// A per-dimension cube limit that replaces the adapter's on this thread, so that small
        /// launches are spread over all three grid dimensions.
        pub(super) static GRID_LIMIT: Cell<Option<u32>> = const { Cell::new(None) };
    }

    #[test]
    fn spread_covers_every_cube_within_the_limit() {
        for limit in [1u32, 2, 3, 10, 65_535] {
            for cubes in (0..1_200).chain([65_535, 65_536, 1 << 20, 3 << 30]) {
                let cap = (limit as usize).pow(3);
                if cubes > cap {
                    continue;
                }
                let [x, y, z] = spread(cubes, limit);
                let (x, y, z) = (x as usize, y as usize, z as usize);
                assert!(x <= limit as usize && y <= limit as usize && z <= limit as usize, "{cubes} over {limit}");
                assert!(x * y * z >= cubes.max(1), "{cubes} cubes, limit {limit}: {x}×{y}×{z}");
                // Rounded up by less than one x·y layer.
                assert!(x * y * z < cubes.max(1) + x * y, "{cubes} cubes, limit {limit}: {x}×{y}×{z}");
                if cubes <= limit as usize {
                    assert_eq!((y, z), (1, 1), "{cubes} cubes fit one dimension of {limit}");
                }
            }
        }
    }

    /// The wgpu device; `None`, said on stderr, where the machine has no adapter (under
    /// `CI=true` that fails instead).
    fn wgpu() -> Option<Device> {
        let device = Device::wgpu(DeviceKind::DefaultDevice);
        let works = crate::device_works(&device);
        if !works && std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but wgpu found no working adapter: install mesa-vulkan-drivers libvulkan1");
        }
        if !works {
            eprintln!("SKIPPED: no wgpu adapter on this machine (set CI=true to fail instead)");
        }
        works.then_some(device)
    }

    /// Every output of one training step of a layer, as host values.
    fn step_values(peer: &crate::Peer, x: &Tensor<3>) -> Vec<Vec<f32>> {
        let x = x.clone().require_grad();
        let (y, _) = peer.forward_with_routing(x.clone());
        let [batch, seq, d_model] = y.dims();
        let grads = (y.clone() * y.clone()).sum().backward();
        let rows = take_row_gradients(&peer.experts).expect("row gradients");
        let sub_keys = peer.product_keys.sub_keys.grad(&grads).unwrap();
        let [a, b, c, d] = sub_keys.dims();
        vec![
            values(y.inner().reshape([batch * seq, d_model])),
            values(x.grad(&grads).unwrap().reshape([batch * seq, d_model])),
            values(sub_keys.reshape([a * b * c, d])),
            values(rows.down),
            values(rows.up),
        ]
    }

    /// A grid spread over three dimensions computes exactly what a one-dimensional one does:
    /// every kernel numbers its cubes by `CUBE_POS` and skips the cubes past its work.
    #[test]
    fn spread_grids_compute_the_same_step() {
        let Some(device) = wgpu() else { return };
        let device = device.autodiff();
        let peer = PeerConfig::new(16, 32 * 32).with_heads(4).with_top_k(6).with_key_dim(12).init(&device);
        // 210 tokens, 840 retrieval rows: with 10 cubes per dimension the per-token launches
        // take all three dimensions, the row sums two.
        let x = Tensor::<3>::random([3, 70, 16], Distribution::Normal(0.0, 1.0), &device);
        let one_dimensional = step_values(&peer, &x);
        GRID_LIMIT.with(|limit| limit.set(Some(10)));
        let spread = step_values(&peer, &x);
        GRID_LIMIT.with(|limit| limit.set(None));
        for (what, (a, b)) in
            ["output", "dx", "sub-keys", "down rows", "up rows"].iter().zip(one_dimensional.iter().zip(&spread))
        {
            assert!(a.iter().any(|v| *v != 0.0), "{what}: all zero");
            assert_eq!(a, b, "{what}: a spread grid changed the result");
        }
    }

    /// A tensor's values on the host.
    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    fn ints<const D: usize>(t: Tensor<D, Int>) -> Vec<i64> {
        t.into_data().convert::<i64>().try_to_vec::<i64>().unwrap()
    }

    /// Three lazy AdamW steps by the kernel, on a table in row blocks of uneven use (weight
    /// decay, clipping, a fresh row set each step), equal the tensor path's from the same
    /// start within 1e-5, moments included; rows never touched stay bit-identical.
    #[test]
    fn adamw_kernel_equals_the_tensor_path() {
        let Some(device) = wgpu() else { return };
        let (rows, width) = (100, 12);
        let start = Tensor::<2>::random([rows, width], Distribution::Normal(0.0, 1.0), &device);
        // Blocks of 16 rows, the last one short (100 = 6 · 16 + 4).
        let table = || {
            let mut first = 0;
            ExpertTable::from_fn(rows, width, 16, |[r, _]| {
                first += r;
                start.clone().narrow(0, first - r, r).add_scalar(0.0)
            })
        };
        let moments = || RowMoments {
            moment_1: ExpertTable::from_fn(rows, width, 16, |shape| Tensor::zeros(shape, &device)),
            moment_2: ExpertTable::from_fn(rows, width, 16, |shape| Tensor::zeros(shape, &device)),
        };
        let config = SparseAdamWConfig::new().with_weight_decay(0.1).with_grad_clip_norm(Some(2.0));
        let (kernel_table, kernel_moments) = (table(), moments());
        let (tensor_table, tensor_moments) = (table(), moments());
        let id_sets: [&[i64]; 3] = [&[0, 15, 16, 17, 63, 99], &[15, 40, 98], &[1, 2, 3, 16, 64, 96, 97]];
        for (step, ids) in id_sets.into_iter().enumerate() {
            let ids = Tensor::<1, Int>::from_data(TensorData::new(ids.to_vec(), [ids.len()]), &device);
            let grad = Tensor::<2>::random([ids.dims()[0], width], Distribution::Normal(0.0, 3.0), &device);
            let lr = 0.05 / (step + 1) as f64;
            let step = step as i32 + 1;
            adamw_rows(&config, lr, step, &kernel_table, &kernel_moments, &ids, grad.clone()).expect("the kernel runs");
            super::super::tensor_ops::adamw_rows(&config, lr, step, &tensor_table, &tensor_moments, &ids, grad);
        }
        assert_eq!(kernel_table.num_blocks(), 7);
        for (what, a, b) in [
            ("θ", &kernel_table, &tensor_table),
            ("m", &kernel_moments.moment_1, &tensor_moments.moment_1),
            ("v", &kernel_moments.moment_2, &tensor_moments.moment_2),
        ] {
            let (a, b) = (values(a.val()), values(b.val()));
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{what}: relative difference {worst}");
        }
        let (after, before) = (values(kernel_table.val()), values(start));
        let touched: Vec<usize> = id_sets.iter().flat_map(|ids| ids.iter().map(|&i| i as usize)).collect();
        for row in (0..rows).filter(|row| !touched.contains(row)) {
            assert_eq!(
                after[row * width..(row + 1) * width],
                before[row * width..(row + 1) * width],
                "row {row} moved"
            );
        }
        assert_ne!(after[..width], before[..width], "row 0 was updated");
    }

    /// The candidate kernel gives the tensor path's top-k (same ids, ties aside, and same
    /// scores), best first, for shared and per-head keys and k from 1 to √N.
    #[test]
    fn candidate_kernel_equals_the_tensor_path() {
        let Some(device) = wgpu() else { return };
        let (tokens, heads, half, root) = (9, 3, 5, 16);
        for (key_sets, k) in [(1, 1), (1, 7), (3, 16), (3, 4), (1, 13)] {
            let queries = Tensor::<3>::random([tokens, heads, 2 * half], Distribution::Normal(0.0, 1.0), &device);
            let keys = Tensor::<4>::random([key_sets, 2, root, half], Distribution::Normal(0.0, 1.0), &device);
            let (scores, ids) = super::retrieve(&queries, &keys, k).expect("the kernel runs");
            let (want_scores, want_ids) = super::super::tensor_ops::retrieve(queries, keys, k);
            let (scores, ids) = (values(scores), ints(ids));
            let (want_scores, want_ids) = (values(want_scores), ints(want_ids));
            for row in 0..tokens * heads {
                let range = row * k..(row + 1) * k;
                let got = &scores[range.clone()];
                assert!(got.windows(2).all(|w| w[0] >= w[1]), "k = {k}, row {row}: not best first: {got:?}");
                let mut want: Vec<(f32, i64)> =
                    want_scores[range.clone()].iter().copied().zip(want_ids[range.clone()].iter().copied()).collect();
                want.sort_by(|a, b| b.0.total_cmp(&a.0));
                for (p, (&score, &(want_score, want_id))) in got.iter().zip(&want).enumerate() {
                    assert!((score - want_score).abs() < 1e-5, "k = {k}, row {row}, rank {p}: {score} vs {want_score}");
                    let tied = want.iter().filter(|w| (w.0 - want_score).abs() < 1e-5).count() > 1;
                    if !tied {
                        assert_eq!(ids[row * k + p], want_id, "k = {k}, row {row}, rank {p}");
                    }
                }
            }
        }
    }
}
