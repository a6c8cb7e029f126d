//! The expert balance sum `Σ_s Σ_r p₁(s, r)ᵀ F_s p₂(s, r)` over its nonzero shares only.
//!
//! `F_s` (the selection shares of key set s, `[√N, √N]`) has at most `rows · k` nonzero entries
//! of its N, one per distinct selected expert. Composed of tensor ops the sum is a dense
//! `[rows, √N] × [√N, √N]` matmul per key set, `O(rows · N)`: negligible at N = 128², about
//! half a second per step at 1024² here. On the transposed probabilities (`P₁ᵀ`, `P₂ᵀ`:
//! `[√N, rows]` per key set) it is a sparse × dense product, one axpy of length `rows` per
//! nonzero share: `G = F_s P₂ᵀ`, sum `Σ_i P₁ᵀ[i]·G[i]`; backward `dP₁ᵀ = G`, `dP₂ᵀ = F_sᵀ P₁ᵀ`.
//! `O(rows · nnz)`, vectorised, rows of `G` in parallel.

use rayon::prelude::*;

use super::simd::{axpy, dot, multiversion};

/// One nonzero share: sub-key `i` of the first half, `j` of the second, and `F_s[i, j]`.
#[derive(Debug, Clone, Copy)]
struct Share {
    i: u32,
    j: u32,
    value: f32,
}

/// The nonzero shares of every key set, grouped by (set, i) and, separately, by (set, j).
pub(crate) struct Shares {
    /// Sorted by (set, i, j).
    by_first: Vec<(usize, Share)>,
    /// Sorted by (set, j, i).
    by_second: Vec<(usize, Share)>,
}

impl Shares {
    /// From the selections `picks` (`set · N + i · √N + j` each), each worth `1 / per_set`.
    pub(crate) fn new(mut picks: Vec<u32>, root: usize, per_set: f32) -> Self {
        picks.sort_unstable();
        let n = (root * root) as u32;
        let mut by_first = Vec::new();
        for run in picks.chunk_by(|a, b| a == b) {
            let (set, expert) = ((run[0] / n) as usize, run[0] % n);
            let share = Share { i: expert / root as u32, j: expert % root as u32, value: run.len() as f32 / per_set };
            by_first.push((set, share));
        }
        let mut by_second = by_first.clone();
        by_second.sort_unstable_by_key(|&(set, s)| (set, s.j, s.i));
        Self { by_first, by_second }
    }
}

/// The groups of `entries` with the same (set, key), as `(set, key, shares)`.
fn groups(entries: &[(usize, Share)], key: impl Fn(&Share) -> u32) -> Vec<(usize, u32, &[(usize, Share)])> {
    entries.chunk_by(|a, b| a.0 == b.0 && key(&a.1) == key(&b.1)).map(|g| (g[0].0, key(&g[0].1), g)).collect()
}

multiversion! {
    /// `out = Σ_(i|j) value · source[other]` over one group of shares (`out` zeroed first), and
    /// `dot(out, probe)` if a probe row is given.
    fn gather_row(
        group: &[(usize, Share)],
        first: bool,
        source: &[f32],
        rows: usize,
        out: &mut [f32],
        probe: Option<&[f32]>,
    ) -> f32 {
        out.fill(0.0);
        for &(_, share) in group {
            let other = if first { share.j } else { share.i } as usize;
            axpy(share.value, &source[other * rows..(other + 1) * rows], out);
        }
        probe.map_or(0.0, |p| dot(p, out))
    }
}

/// `Σ_s Σ_i P₁ᵀ[s, i] · (F_s P₂ᵀ[s])[i]` for `P₁ᵀ`, `P₂ᵀ` of `[key_sets, √N, rows]`.
pub(crate) fn forward(p1t: &[f32], p2t: &[f32], shares: &Shares, [_, rows, root]: [usize; 3]) -> f64 {
    groups(&shares.by_first, |s| s.i)
        .into_par_iter()
        .map_init(
            || vec![0.0f32; rows],
            |g, (set, i, group)| {
                let base = set * root * rows;
                let p2t = &p2t[base..base + root * rows];
                let p1_row = &p1t[base + i as usize * rows..base + (i as usize + 1) * rows];
                gather_row(group, true, p2t, rows, g, Some(p1_row)) as f64
            },
        )
        .sum()
}

/// The gradients of [`forward`] times `scale`, transposed like the inputs (`[key_sets, √N,
/// rows]`): `dP₁ᵀ[s, i] = Σ_j F_s[i, j] P₂ᵀ[s, j]`, `dP₂ᵀ[s, j] = Σ_i F_s[i, j] P₁ᵀ[s, i]`.
pub(crate) fn backward(
    p1t: &[f32],
    p2t: &[f32],
    shares: &Shares,
    [key_sets, rows, root]: [usize; 3],
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let grad = |entries: &[(usize, Share)], first: bool, source: &[f32]| {
        let mut out = super::zeros(key_sets * root * rows);
        // Each group writes its own row of the output: hand the groups their rows.
        let mut slots: Vec<Option<&mut [f32]>> = out.chunks_mut(rows).map(Some).collect();
        let work: Vec<_> = groups(entries, |s| if first { s.i } else { s.j })
            .into_iter()
            .map(|(set, key, group)| {
                let row = slots[set * root + key as usize].take().expect("one group per row");
                (set, group, row)
            })
            .collect();
        work.into_par_iter().for_each(|(set, group, row)| {
            let base = set * root * rows;
            gather_row(group, first, &source[base..base + root * rows], rows, row, None);
            row.iter_mut().for_each(|v| *v *= scale);
        });
        out
    };
    (grad(&shares.by_first, true, p2t), grad(&shares.by_second, false, p1t))
}

/// Row-wise softmax of `[rows, width]` scores.
pub(crate) fn softmax_rows(scores: &[f32], width: usize) -> Vec<f32> {
    let mut p = super::zeros(scores.len());
    p.par_chunks_mut(width).zip(scores.par_chunks(width)).for_each(|(p, s)| {
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for (p, &s) in p.iter_mut().zip(s) {
            *p = (s - max).exp();
            sum += *p;
        }
        let inverse = 1.0 / sum;
        p.iter_mut().for_each(|p| *p *= inverse);
    });
    p
}

/// The vector-Jacobian product of [`softmax_rows`]: `ds = p ∘ (dp − ⟨dp, p⟩)` per row.
pub(crate) fn softmax_rows_backward(p: &[f32], grad: &[f32], width: usize) -> Vec<f32> {
    let mut ds = super::zeros(p.len());
    ds.par_chunks_mut(width).zip(p.par_chunks(width).zip(grad.par_chunks(width))).for_each(|(ds, (p, g))| {
        let inner = dot(p, g);
        for ((ds, &p), &g) in ds.iter_mut().zip(p).zip(g) {
            *ds = p * (g - inner);
        }
    });
    ds
}

/// `[sets, a, b]` → `[sets, b, a]`, in tiles that stay in cache.
pub(crate) fn transpose(values: &[f32], [_, a, b]: [usize; 3]) -> Vec<f32> {
    const TILE: usize = 32;
    let mut out = super::zeros(values.len());
    out.par_chunks_mut(a * b).zip(values.par_chunks(a * b)).for_each(|(out, values)| {
        for i0 in (0..a).step_by(TILE) {
            for j0 in (0..b).step_by(TILE) {
                for i in i0..(i0 + TILE).min(a) {
                    for j in j0..(j0 + TILE).min(b) {
                        out[j * a + i] = values[i * b + j];
                    }
                }
            }
        }
    });
    out
}
