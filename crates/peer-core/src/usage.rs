//! The paper's routing statistics (§3.2, Table 2): expert usage and unevenness.

use crate::peer::PeerRouting;

/// Accumulates `z'_i = Σ_x g_i(x)` over any number of batches (g_i(x) = 0 when expert i is not
/// retrieved for x) and reports:
/// - **expert usage**: the fraction of experts with `z_i > 0`;
/// - **unevenness**: `KL(z ‖ uniform) = log N + Σ_i z_i log z_i`, with `z = z' / ‖z'‖₁`
///   (0 for a perfectly even routing, `log N` when one expert takes everything).
///
/// Router weights of the same expert retrieved by several heads add up. The accumulator is a
/// host-side `Vec<f64>` of N entries (8 MiB at a million experts).
///
/// ```
/// use peer_core::ExpertUsage;
///
/// let mut usage = ExpertUsage::new(4);
/// usage.add(&[0, 1], &[0.5, 0.5]);
/// assert_eq!(usage.usage(), 0.5);
/// assert!((usage.unevenness() - (4f64.ln() + 0.5f64.ln())).abs() < 1e-12);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertUsage {
    weight_per_expert: Vec<f64>,
}

impl ExpertUsage {
    /// An empty accumulator for `num_experts` experts.
    pub fn new(num_experts: usize) -> Self {
        Self { weight_per_expert: vec![0.0; num_experts] }
    }

    /// Number of experts N.
    pub fn num_experts(&self) -> usize {
        self.weight_per_expert.len()
    }

    /// Adds router weights: `weights[j]` goes to expert `expert_ids[j]`.
    ///
    /// # Panics
    /// If the slices differ in length or an id is outside `0..N`.
    pub fn add(&mut self, expert_ids: &[i64], weights: &[f64]) {
        assert_eq!(
            expert_ids.len(),
            weights.len(),
            "ExpertUsage::add: {} expert ids but {} weights",
            expert_ids.len(),
            weights.len()
        );
        let n = self.weight_per_expert.len();
        for (&id, &weight) in expert_ids.iter().zip(weights) {
            let slot = usize::try_from(id)
                .ok()
                .filter(|&i| i < n)
                .unwrap_or_else(|| panic!("ExpertUsage::add: expert id {id} outside 0..{n}"));
            self.weight_per_expert[slot] += weight;
        }
    }

    /// Adds the routing of one forward pass (reads it back to the host).
    pub fn add_routing(&mut self, routing: &PeerRouting) {
        let ids: Vec<i64> = routing.expert_ids.to_data().iter::<i64>().collect();
        let weights: Vec<f64> = routing.router_weights.to_data().iter::<f64>().collect();
        self.add(&ids, &weights);
    }

    /// Adds everything another accumulator has seen.
    ///
    /// # Panics
    /// If the two count different numbers of experts.
    pub fn merge(&mut self, other: &ExpertUsage) {
        assert_eq!(self.num_experts(), other.num_experts(), "ExpertUsage::merge: sizes differ");
        for (a, b) in self.weight_per_expert.iter_mut().zip(&other.weight_per_expert) {
            *a += b;
        }
    }

    /// Forgets everything seen so far.
    pub fn reset(&mut self) {
        self.weight_per_expert.fill(0.0);
    }

    /// The accumulated `z'`.
    pub fn weights(&self) -> &[f64] {
        &self.weight_per_expert
    }

    /// Fraction of experts with a positive accumulated weight, in `[0, 1]` (0 before any data).
    pub fn usage(&self) -> f64 {
        if self.weight_per_expert.is_empty() {
            return 0.0;
        }
        let used = self.weight_per_expert.iter().filter(|&&w| w > 0.0).count();
        used as f64 / self.weight_per_expert.len() as f64
    }

    /// `KL(z ‖ uniform)` in nats; `None` before any positive weight was added.
    pub fn try_unevenness(&self) -> Option<f64> {
        let total: f64 = self.weight_per_expert.iter().filter(|w| **w > 0.0).sum();
        if total <= 0.0 || !total.is_finite() {
            return None;
        }
        let neg_entropy: f64 = self
            .weight_per_expert
            .iter()
            .filter(|&&w| w > 0.0)
            .map(|&w| {
                let z = w / total;
                z * z.ln()
            })
            .sum();
        Some((self.weight_per_expert.len() as f64).ln() + neg_entropy)
    }

    /// `KL(z ‖ uniform)` in nats, `NaN` before any positive weight was added.
    pub fn unevenness(&self) -> f64 {
        self.try_unevenness().unwrap_or(f64::NAN)
    }
}
