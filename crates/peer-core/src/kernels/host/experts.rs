//! Eq. 5 and its gradients on the host, expert by expert: the retrieved slots are grouped by
//! expert (a counting sort), so each expert's two rows are read once per step, in increasing
//! id order, however many tokens retrieved it, and its two gradient rows are written once.
//! Nothing `[slots, d_model]` wide is ever materialized.

use rayon::prelude::*;

use super::simd::{axpy, dot, multiversion, prefetch};
use super::{sum_accumulators, zeros};
use crate::config::Activation;

/// An expert table as host slices: row blocks of `rows_per_block` rows (one block on CPU
/// backends unless the configuration asks for more).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Table<'a> {
    pub blocks: &'a [&'a [f32]],
    pub rows_per_block: usize,
    pub width: usize,
}

impl Table<'_> {
    #[inline(always)]
    fn row(&self, id: usize) -> &[f32] {
        let block = self.blocks[id / self.rows_per_block];
        let start = (id % self.rows_per_block) * self.width;
        &block[start..start + self.width]
    }
}

/// The retrieved slots grouped by expert.
#[derive(Debug, Clone)]
pub(crate) struct SlotsByExpert {
    /// The distinct experts, increasing, `[U]`.
    pub experts: Vec<u32>,
    /// Expert `experts[r]` owns `slots[offsets[r]..offsets[r + 1]]`, `[U + 1]`.
    pub offsets: Vec<u32>,
    /// Slot indices (`token · m + j`) ordered by expert, then slot.
    pub slots: Vec<u32>,
}

impl SlotsByExpert {
    /// Counting sort of `expert_ids` (all `< num_experts`).
    pub fn new(expert_ids: &[u32], num_experts: usize) -> Self {
        let mut counts = vec![0u32; num_experts];
        for &id in expert_ids {
            counts[id as usize] += 1;
        }
        let mut experts = Vec::new();
        let mut offsets = vec![0u32];
        // counts[e] becomes the write cursor of expert e.
        let mut total = 0u32;
        for (expert, count) in counts.iter_mut().enumerate() {
            if *count > 0 {
                experts.push(expert as u32);
                let start = total;
                total += *count;
                offsets.push(total);
                *count = start;
            }
        }
        let mut slots = vec![0u32; expert_ids.len()];
        for (slot, &id) in expert_ids.iter().enumerate() {
            let cursor = &mut counts[id as usize];
            slots[*cursor as usize] = slot as u32;
            *cursor += 1;
        }
        Self { experts, offsets, slots }
    }

    /// Splits the experts into about `parts` contiguous ranges of similar slot counts.
    fn ranges(&self, parts: usize) -> Vec<std::ops::Range<usize>> {
        let total = self.slots.len().max(1);
        let mut ranges = Vec::with_capacity(parts);
        let mut start = 0;
        for part in 1..=parts {
            let target = (total * part).div_ceil(parts) as u32;
            let end = if part == parts {
                self.experts.len()
            } else {
                self.offsets.partition_point(|&o| o < target).min(self.experts.len())
            };
            if end > start {
                ranges.push(start..end);
                start = end;
            }
        }
        ranges
    }
}

/// Work split: two ranges per thread, so one slow range does not idle the others, each with
/// its own accumulator of `accumulator_len` f32 (`[tokens, d_model]`); at most 256 MiB of
/// accumulators in all.
fn parts(accumulator_len: usize) -> usize {
    let budget = (256 << 20) / (4 * accumulator_len.max(1));
    (2 * rayon::current_num_threads()).clamp(1, budget.max(1))
}

/// The problem's inputs, `[tokens, d_model]` and `[tokens, m]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slots<'a> {
    pub x: &'a [f32],
    pub router_weights: &'a [f32],
    pub grouped: &'a SlotsByExpert,
    /// Experts per token, m.
    pub per_token: usize,
    pub d_model: usize,
    pub activation: Activation,
}

/// `y_t = Σ_j g_tj σ(u_e·x_t) v_e` for every token, `[tokens, d_model]`.
pub(crate) fn forward(slots: Slots, down: Table, up: Table) -> Vec<f32> {
    let size = slots.x.len();
    let outputs = slots.grouped.ranges(parts(size)).into_par_iter().map(|range| {
        let mut y = zeros(size);
        forward_range(slots, down, up, range.start, range.end, &mut y);
        y
    });
    sum_accumulators(outputs, size)
}

multiversion! {
    fn forward_range(slots: Slots, down: Table, up: Table, start: usize, end: usize, y: &mut [f32]) {
        let Slots { x, router_weights, grouped, per_token, d_model, activation } = slots;
        for r in start..end {
            prefetch_ahead(grouped, down, up, r, end);
            let expert = grouped.experts[r] as usize;
            let (u, v) = (down.row(expert), up.row(expert));
            for &slot in &grouped.slots[grouped.offsets[r] as usize..grouped.offsets[r + 1] as usize] {
                let token = slot as usize / per_token;
                let a = dot(u, &x[token * d_model..(token + 1) * d_model]);
                let h = router_weights[slot as usize] * activate(activation, a);
                axpy(h, v, &mut y[token * d_model..(token + 1) * d_model]);
            }
        }
    }
}

/// What [`backward`] returns.
#[derive(Debug)]
pub(crate) struct Gradients {
    /// dL/dx, `[tokens, d_model]`.
    pub x: Vec<f32>,
    /// dL/dg, `[tokens, m]`.
    pub router_weights: Vec<f32>,
    /// dL/du for the distinct experts (`SlotsByExpert::experts`), `[U, d_model]`.
    pub down: Vec<f32>,
    /// dL/dv for the same experts, `[U, d_model]`.
    pub up: Vec<f32>,
}

/// The vector-Jacobian product of [`forward`] for dL/dy `grad_output` (`[tokens, d_model]`):
/// with `a = u·x`, `h = g σ(a)`: `dv = Σ h dy`, `dh = v·dy`, `dg = σ(a) dh`,
/// `da = g σ'(a) dh`, `du = Σ da x`, `dx = Σ da u`.
pub(crate) fn backward(slots: Slots, down: Table, up: Table, grad_output: &[f32]) -> Gradients {
    let d_model = slots.d_model;
    let grouped = slots.grouped;
    let distinct = grouped.experts.len();
    // Not touched here: each worker writes its rows first (see `backward_range`).
    let mut grad_down = vec![0.0f32; distinct * d_model];
    let mut grad_up = vec![0.0f32; distinct * d_model];
    // dL/dg in the grouped order first: each range owns a contiguous part of it.
    let mut grad_g_grouped = vec![0.0f32; grouped.slots.len()];

    let ranges = grouped.ranges(parts(slots.x.len()));
    let mut work = Vec::with_capacity(ranges.len());
    let (mut rest_down, mut rest_up, mut rest_g) = (&mut grad_down[..], &mut grad_up[..], &mut grad_g_grouped[..]);
    for range in &ranges {
        let rows = range.len() * d_model;
        let count = (grouped.offsets[range.end] - grouped.offsets[range.start]) as usize;
        let (down_part, tail_down) = std::mem::take(&mut rest_down).split_at_mut(rows);
        let (up_part, tail_up) = std::mem::take(&mut rest_up).split_at_mut(rows);
        let (g_part, tail_g) = std::mem::take(&mut rest_g).split_at_mut(count);
        (rest_down, rest_up, rest_g) = (tail_down, tail_up, tail_g);
        work.push((range.clone(), down_part, up_part, g_part));
    }
    let size = slots.x.len();
    let grad_xs = work.into_par_iter().map(|(range, grad_down, grad_up, grad_g)| {
        let mut grad_x = zeros(size);
        let (start, end) = (range.start, range.end);
        backward_range(slots, down, up, grad_output, start, end, grad_down, grad_up, grad_g, &mut grad_x);
        grad_x
    });
    let grad_x = sum_accumulators(grad_xs, size);

    let mut grad_g = vec![0.0f32; grouped.slots.len()];
    for (&slot, &value) in grouped.slots.iter().zip(&grad_g_grouped) {
        grad_g[slot as usize] = value;
    }
    Gradients { x: grad_x, router_weights: grad_g, down: grad_down, up: grad_up }
}

multiversion! {
    fn backward_range(
        slots: Slots,
        down: Table,
        up: Table,
        grad_output: &[f32],
        start: usize,
        end: usize,
        grad_down: &mut [f32],
        grad_up: &mut [f32],
        grad_g: &mut [f32],
        grad_x: &mut [f32],
    ) {
        let Slots { x, router_weights, grouped, per_token, d_model, activation } = slots;
        let base = grouped.offsets[start] as usize;
        for r in start..end {
            prefetch_ahead(grouped, down, up, r, end);
            let expert = grouped.experts[r] as usize;
            let (u, v) = (down.row(expert), up.row(expert));
            let local = (r - start) * d_model;
            let (du, dv) = (&mut grad_down[local..local + d_model], &mut grad_up[local..local + d_model]);
            // A write before the first read maps fresh pages writable at once (see `zeros`),
            // from the worker that owns them.
            du.fill(0.0);
            dv.fill(0.0);
            for position in grouped.offsets[r] as usize..grouped.offsets[r + 1] as usize {
                let slot = grouped.slots[position] as usize;
                let token = slot / per_token;
                let row = token * d_model..(token + 1) * d_model;
                let (x_t, dy_t) = (&x[row.clone()], &grad_output[row]);
                let a = dot(u, x_t);
                let dh = dot(v, dy_t);
                let g = router_weights[slot];
                let (sigma, slope) = activate_with_derivative(activation, a);
                grad_g[position - base] = sigma * dh;
                let da = g * slope * dh;
                axpy(g * sigma, dy_t, dv);
                axpy(da, x_t, du);
                axpy(da, u, &mut grad_x[token * d_model..(token + 1) * d_model]);
            }
        }
    }
}

/// Experts visited this many places ahead are prefetched.
const PREFETCH_DISTANCE: usize = 4;

#[inline(always)]
fn prefetch_ahead(grouped: &SlotsByExpert, down: Table, up: Table, r: usize, end: usize) {
    if r + PREFETCH_DISTANCE < end {
        let ahead = grouped.experts[r + PREFETCH_DISTANCE] as usize;
        prefetch(down.row(ahead));
        prefetch(up.row(ahead));
    }
}

/// σ(a): ReLU, or GELU `a Φ(a)` with the exact normal CDF (as [`crate::activation::gelu`]).
#[inline(always)]
fn activate(activation: Activation, a: f32) -> f32 {
    match activation {
        Activation::Relu => a.max(0.0),
        Activation::Gelu => a * normal_cdf(a),
    }
}

/// `(σ(a), σ'(a))`, with Φ computed once for GELU (`σ' = Φ(a) + a φ(a)`; ReLU: 0 at 0, as
/// Burn's).
#[inline(always)]
fn activate_with_derivative(activation: Activation, a: f32) -> (f32, f32) {
    match activation {
        Activation::Relu => (a.max(0.0), if a > 0.0 { 1.0 } else { 0.0 }),
        Activation::Gelu => {
            let cdf = normal_cdf(a);
            let density = (-0.5 * (a as f64) * (a as f64)).exp() / (2.0 * std::f64::consts::PI).sqrt();
            (a * cdf, (cdf as f64 + a as f64 * density) as f32)
        }
    }
}

#[inline(always)]
fn normal_cdf(a: f32) -> f32 {
    (0.5 * (1.0 + libm::erf(a as f64 / std::f64::consts::SQRT_2))) as f32
}
