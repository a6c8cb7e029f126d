//! Routing statistics: the paper's expert usage and unevenness (§3.2, Table 2), and the
//! diagnostics that tell a collapsed product-key router from a healthy one.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::exact_sqrt;
use crate::peer::{HostRouting, PeerRouting};
use crate::product_keys::ProductKeys;

/// Accumulates a layer's routing over any number of batches and reports its statistics.
///
/// Two accumulators per expert i: the router weight `z'_i = Σ_x g_i(x)` (g_i(x) = 0 when expert
/// i is not retrieved for x; weights of several heads add up) and the selection count `c_i`
/// (how many (token, head) pairs retrieved i). From them:
///
/// - **expert usage** ([`usage`](Self::usage)): the fraction of experts with `z'_i > 0`;
/// - **uniform ceiling** ([`uniform_ceiling`](Self::uniform_ceiling)): the usage that S
///   selections spread uniformly at random over N experts reach, `1 − exp(−S/N)`; usage is
///   only meaningful next to it;
/// - **unevenness** ([`unevenness`](Self::unevenness)): `KL(z ‖ uniform) = log N + Σ_i z_i log z_i`
///   with `z = z' / ‖z'‖₁`, in nats (0 for perfectly even routing, `log N` when one expert takes
///   everything);
/// - **top share** ([`top_share`](Self::top_share)): the share of all selections taken by the
///   ⌈f·N⌉ most selected experts (f = 1% in the reports: 1% when the load is even);
/// - **sub-keys used** ([`sub_keys_used`](Self::sub_keys_used)): per head and per half of the
///   product key, how many of the √N sub-keys appear in at least one retrieved expert (expert
///   `i·√N + j` uses sub-key i of the first half and j of the second).
///
/// Memory: two host-side values per expert (16 MiB at a million experts) plus `2·√N` counts per
/// head.
///
/// ```
/// use peer_core::ExpertUsage;
///
/// let mut usage = ExpertUsage::new(4);
/// usage.add(&[0, 1], &[0.5, 0.5]);
/// assert_eq!(usage.usage(), 0.5);
/// assert!((usage.unevenness() - (4f64.ln() + 0.5f64.ln())).abs() < 1e-12);
/// assert_eq!(usage.selections(), 2);
/// assert_eq!(usage.top_share(0.25), 0.5); // the busiest of the 4 experts took 1 of 2 selections
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertUsage {
    weight_per_expert: Vec<f64>,
    selections_per_expert: Vec<u64>,
    /// Per head, the selections of each sub-key of each half: `[heads][2][√N]`; empty until a
    /// routing with heads was added, and always when N is not a perfect square.
    sub_key_selections: Vec<[Vec<u64>; 2]>,
}

impl ExpertUsage {
    /// An empty accumulator for `num_experts` experts.
    pub fn new(num_experts: usize) -> Self {
        Self {
            weight_per_expert: vec![0.0; num_experts],
            selections_per_expert: vec![0; num_experts],
            sub_key_selections: Vec::new(),
        }
    }

    /// Number of experts N.
    pub fn num_experts(&self) -> usize {
        self.weight_per_expert.len()
    }

    /// Adds router weights of one head: `weights[j]` goes to expert `expert_ids[j]`.
    ///
    /// # Panics
    /// If the slices differ in length or an id is outside `0..N`.
    pub fn add(&mut self, expert_ids: &[i64], weights: &[f64]) {
        self.add_heads(expert_ids, weights, 1, expert_ids.len().max(1));
    }

    /// Adds router weights of `heads` heads of `k` experts each, laid out `[.., heads, k]`:
    /// `weights[j]` goes to expert `expert_ids[j]`, which head `(j / k) % heads` retrieved.
    ///
    /// # Panics
    /// If the slices differ in length, their length is not a multiple of `heads · k`, or an
    /// id is outside `0..N`.
    pub fn add_heads(&mut self, expert_ids: &[i64], weights: &[f64], heads: usize, k: usize) {
        assert_eq!(
            expert_ids.len(),
            weights.len(),
            "ExpertUsage::add: {} expert ids but {} weights",
            expert_ids.len(),
            weights.len()
        );
        assert!(
            heads > 0 && k > 0 && expert_ids.len().is_multiple_of(heads * k),
            "ExpertUsage::add_heads: {} ids do not split into [.., heads = {heads}, k = {k}]",
            expert_ids.len()
        );
        let n = self.weight_per_expert.len();
        let root = exact_sqrt(n);
        if root.is_some() && self.sub_key_selections.len() < heads {
            let root = root.unwrap_or(0);
            self.sub_key_selections.resize_with(heads, || [vec![0; root], vec![0; root]]);
        }
        for (position, (&id, &weight)) in expert_ids.iter().zip(weights).enumerate() {
            let slot = usize::try_from(id)
                .ok()
                .filter(|&i| i < n)
                .unwrap_or_else(|| panic!("ExpertUsage::add: expert id {id} outside 0..{n}"));
            self.weight_per_expert[slot] += weight;
            self.selections_per_expert[slot] += 1;
            if let Some(root) = root {
                let [first, second] = &mut self.sub_key_selections[(position / k) % heads];
                first[slot / root] += 1;
                second[slot % root] += 1;
            }
        }
    }

    /// Adds the routing of one forward pass (reads it back to the host).
    pub fn add_routing(&mut self, routing: &PeerRouting) {
        self.add_host_routing(&routing.to_host());
    }

    /// Adds a routing already read back to the host.
    ///
    /// # Panics
    /// As [`add_heads`](Self::add_heads).
    pub fn add_host_routing(&mut self, routing: &HostRouting) {
        let [_, _, heads, k] = routing.dims;
        self.add_heads(&routing.expert_ids, &routing.router_weights, heads, k);
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
        for (a, b) in self.selections_per_expert.iter_mut().zip(&other.selections_per_expert) {
            *a += b;
        }
        if self.sub_key_selections.len() < other.sub_key_selections.len() {
            let root = exact_sqrt(self.num_experts()).unwrap_or(0);
            self.sub_key_selections.resize_with(other.sub_key_selections.len(), || [vec![0; root], vec![0; root]]);
        }
        for (mine, theirs) in self.sub_key_selections.iter_mut().zip(&other.sub_key_selections) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
            }
        }
    }

    /// Forgets everything seen so far.
    pub fn reset(&mut self) {
        self.weight_per_expert.fill(0.0);
        self.selections_per_expert.fill(0);
        self.sub_key_selections.clear();
    }

    /// The accumulated router weights `z'`.
    pub fn weights(&self) -> &[f64] {
        &self.weight_per_expert
    }

    /// How many times each expert was selected.
    pub fn selection_counts(&self) -> &[u64] {
        &self.selections_per_expert
    }

    /// Selections S seen in all: one per retrieved (token, head, expert).
    pub fn selections(&self) -> u64 {
        self.selections_per_expert.iter().sum()
    }

    /// Fraction of experts with a positive accumulated weight, in `[0, 1]` (0 before any data).
    pub fn usage(&self) -> f64 {
        if self.weight_per_expert.is_empty() {
            return 0.0;
        }
        let used = self.weight_per_expert.iter().filter(|&&w| w > 0.0).count();
        used as f64 / self.weight_per_expert.len() as f64
    }

    /// The usage that the same number of selections reach when spread uniformly at random:
    /// `1 − exp(−S/N)`.
    pub fn uniform_ceiling(&self) -> f64 {
        if self.weight_per_expert.is_empty() {
            return 0.0;
        }
        1.0 - (-(self.selections() as f64) / self.num_experts() as f64).exp()
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

    /// Share of all selections, in `[0, 1]`, taken by the ⌈`fraction`·N⌉ most selected experts
    /// (at least one); `NaN` before any selection. Even routing gives about `fraction`.
    ///
    /// # Panics
    /// If `fraction` is not in `(0, 1]`.
    pub fn top_share(&self, fraction: f64) -> f64 {
        assert!(fraction > 0.0 && fraction <= 1.0, "ExpertUsage::top_share: fraction {fraction} not in (0, 1]");
        let total = self.selections();
        if total == 0 {
            return f64::NAN;
        }
        let top = ((fraction * self.num_experts() as f64).ceil() as usize).clamp(1, self.num_experts());
        // Partition instead of sorting: the training metric asks for this every step, and at a
        // million experts a full sort would cost tens of milliseconds each time.
        let mut load = self.selections_per_expert.clone();
        load.select_nth_unstable_by(top - 1, |a, b| b.cmp(a));
        load[..top].iter().sum::<u64>() as f64 / total as f64
    }

    /// The selection count of every expert, most selected first (the curve of a load plot).
    pub fn sorted_load(&self) -> Vec<u64> {
        let mut load = self.selections_per_expert.clone();
        load.sort_unstable_by(|a, b| b.cmp(a));
        load
    }

    /// For each head, how many of the √N sub-keys of each half appear in at least one retrieved
    /// expert: `[first half, second half]` per head. Empty when N is not a perfect square or no
    /// routing with heads was added ([`add`](Self::add) counts as one head).
    pub fn sub_keys_used(&self) -> Vec<[usize; 2]> {
        self.sub_key_selections
            .iter()
            .map(|halves| halves.each_ref().map(|counts| counts.iter().filter(|&&c| c > 0).count()))
            .collect()
    }

    /// How the unevenness of the selections splits between the two halves of the product key:
    /// `[KL₁, KL₂, I]`, in nats, with the selection counts of all heads as distributions (the
    /// joint over experts `(i, j)`, its marginals over first-half sub-keys i and second-half
    /// sub-keys j): `KL_h = log √N − H(half h)` and the mutual information
    /// `I = H(i) + H(j) − H(i, j)`. They add up to `log N − H(i, j)`, the unevenness of the
    /// selection counts: `KL₁ + KL₂` is what unbalanced sub-keys cost, `I` what pairing the
    /// same sub-keys together costs. `None` when N is not a perfect square or nothing was
    /// selected.
    pub fn unevenness_split(&self) -> Option<[f64; 3]> {
        let root = exact_sqrt(self.num_experts())?;
        let total = self.selections() as f64;
        if total == 0.0 {
            return None;
        }
        let entropy = |counts: &mut dyn Iterator<Item = u64>| -> f64 {
            counts.filter(|&c| c > 0).map(|c| c as f64 / total).map(|p| -p * p.ln()).sum()
        };
        let (mut first, mut second) = (vec![0u64; root], vec![0u64; root]);
        for (id, &count) in self.selections_per_expert.iter().enumerate() {
            first[id / root] += count;
            second[id % root] += count;
        }
        let joint = entropy(&mut self.selections_per_expert.iter().copied());
        let (h1, h2) = (entropy(&mut first.into_iter()), entropy(&mut second.into_iter()));
        let log_root = (root as f64).ln();
        Some([log_root - h1, log_root - h2, h1 + h2 - joint])
    }

    /// Selections of each sub-key, `[head][half][sub-key]` (see [`sub_keys_used`](Self::sub_keys_used)).
    pub fn sub_key_selections(&self) -> &[[Vec<u64>; 2]] {
        &self.sub_key_selections
    }
}

/// Which input tokens the busiest experts serve: selections counted per (input token, expert).
///
/// The top-1% share of an [`ExpertUsage`] says how concentrated the load is, not why. A token
/// that occurs at a fraction p of the positions and retrieves nearly the same experts wherever
/// it occurs puts about p of all selections on a few experts, whatever the keys do; this
/// accumulator tells that apart from a router that prefers a few experts for every token
/// ([`FrequentTokens`]).
///
/// Memory: one count per distinct (token, expert) pair seen (at most the selections).
///
/// ```
/// use peer_core::TokenLoad;
///
/// let mut load = TokenLoad::new(100);
/// // Four positions (tokens 5, 5, 5, 7), two selections each.
/// load.add(&[5, 5, 5, 7], &[0, 1, 0, 1, 0, 2, 3, 4]);
/// let frequent = load.frequent_tokens(1);
/// assert_eq!(frequent.tokens, [5]);
/// assert_eq!(frequent.top_1_percent_share_from_them, 1.0); // expert 0: only token 5 chose it
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenLoad {
    num_experts: usize,
    selections: HashMap<(u32, u32), u64>,
    positions: HashMap<u32, u64>,
}

impl TokenLoad {
    /// An empty accumulator for `num_experts` experts.
    pub fn new(num_experts: usize) -> Self {
        Self { num_experts, ..Self::default() }
    }

    /// Number of experts N.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Adds the selections of `tokens.len()` positions: position p holds input token
    /// `tokens[p]` and retrieved `expert_ids[p·m .. (p+1)·m]`, m = `expert_ids.len() /
    /// tokens.len()` (heads × k, as [`PeerRouting`] lays them out).
    ///
    /// # Panics
    /// If `expert_ids` does not split evenly into the positions or an id is outside `0..N`.
    pub fn add(&mut self, tokens: &[u32], expert_ids: &[i64]) {
        if tokens.is_empty() {
            assert!(expert_ids.is_empty(), "TokenLoad::add: {} expert ids for no positions", expert_ids.len());
            return;
        }
        assert!(
            expert_ids.len().is_multiple_of(tokens.len()),
            "TokenLoad::add: {} expert ids do not split into {} positions",
            expert_ids.len(),
            tokens.len()
        );
        let per_position = expert_ids.len() / tokens.len();
        for (&token, ids) in tokens.iter().zip(expert_ids.chunks(per_position.max(1))) {
            *self.positions.entry(token).or_default() += 1;
            for &id in ids {
                let expert = u32::try_from(id)
                    .ok()
                    .filter(|&e| (e as usize) < self.num_experts)
                    .unwrap_or_else(|| panic!("TokenLoad::add: expert id {id} outside 0..{}", self.num_experts));
                *self.selections.entry((token, expert)).or_default() += 1;
            }
        }
    }

    /// Adds one forward pass: `tokens` are the `[batch, seq]` input tokens, row-major, of the
    /// positions `routing` routed (reads the ids back to the host).
    ///
    /// # Panics
    /// If `tokens` does not have one entry per routed position.
    pub fn add_routing(&mut self, tokens: &[u32], routing: &PeerRouting) {
        self.add_host_routing(tokens, &routing.to_host());
    }

    /// As [`add_routing`](Self::add_routing), for a routing already read back to the host.
    ///
    /// # Panics
    /// If `tokens` does not have one entry per routed position.
    pub fn add_host_routing(&mut self, tokens: &[u32], routing: &HostRouting) {
        let [batch, seq, _, _] = routing.dims;
        assert_eq!(
            tokens.len(),
            routing.positions(),
            "TokenLoad::add_routing: {} tokens for {batch} × {seq} positions",
            tokens.len()
        );
        self.add(tokens, &routing.expert_ids);
    }

    /// What the `count` most frequent input tokens contribute to the load (ties: lower id first).
    pub fn frequent_tokens(&self, count: usize) -> FrequentTokens {
        let total_positions: u64 = self.positions.values().sum();
        let mut by_frequency: Vec<(u32, u64)> = self.positions.iter().map(|(&t, &n)| (t, n)).collect();
        by_frequency.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        by_frequency.truncate(count);
        let frequent: HashMap<u32, usize> = by_frequency.iter().enumerate().map(|(i, &(t, _))| (t, i)).collect();

        let mut all = vec![0u64; self.num_experts];
        let mut theirs = vec![0u64; self.num_experts];
        let mut distinct = vec![0usize; frequent.len()];
        for (&(token, expert), &n) in &self.selections {
            all[expert as usize] += n;
            if let Some(&rank) = frequent.get(&token) {
                theirs[expert as usize] += n;
                distinct[rank] += 1;
            }
        }
        let others: Vec<u64> = all.iter().zip(&theirs).map(|(a, t)| a - t).collect();
        let top = self.num_experts.div_ceil(100).max(1);
        // The busiest 1% of experts over all positions, and what the frequent tokens sent there.
        let mut order: Vec<usize> = (0..self.num_experts).collect();
        order.sort_unstable_by(|&a, &b| all[b].cmp(&all[a]).then(a.cmp(&b)));
        let busiest = &order[..top.min(order.len())];
        let top_load: u64 = busiest.iter().map(|&e| all[e]).sum();
        let from_them: u64 = busiest.iter().map(|&e| theirs[e]).sum();
        let share = |part: u64, whole: u64| if whole == 0 { f64::NAN } else { part as f64 / whole as f64 };
        let others_total: u64 = others.iter().sum();
        let mut rest = others;
        rest.sort_unstable_by(|a, b| b.cmp(a));
        FrequentTokens {
            tokens: by_frequency.iter().map(|&(t, _)| t).collect(),
            position_shares: by_frequency.iter().map(|&(_, n)| share(n, total_positions)).collect(),
            distinct_experts: distinct,
            top_1_percent_share_from_them: share(from_them, top_load),
            top_1_percent_share_without_them: share(rest[..top.min(rest.len())].iter().sum(), others_total),
        }
    }
}

/// What the most frequent input tokens contribute to a layer's load ([`TokenLoad`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrequentTokens {
    /// Input token ids, most frequent first.
    pub tokens: Vec<u32>,
    /// Each one's share of the positions.
    pub position_shares: Vec<f64>,
    /// How many distinct experts each one retrieved (at least k when it occurs: heads may
    /// retrieve the same expert).
    pub distinct_experts: Vec<usize>,
    /// The share of the top 1% of experts' selections (the busiest ⌈N/100⌉ over all
    /// positions) that were made at these tokens' positions.
    pub top_1_percent_share_from_them: f64,
    /// The top-1% share of the selections made at every other position (its own busiest
    /// ⌈N/100⌉ experts): the concentration that remains without these tokens.
    pub top_1_percent_share_without_them: f64,
}

/// Minimum, median, 99th percentile and maximum of a set of values (nearest rank).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// Smallest value.
    pub min: f64,
    /// Median (the value of rank ⌈n/2⌉).
    pub median: f64,
    /// 99th percentile (the value of rank ⌈0.99·n⌉).
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; all NaN when empty.
    pub fn of(values: &[f32]) -> Self {
        let mut sorted: Vec<f64> = values.iter().map(|&v| v as f64).collect();
        sorted.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            let n = sorted.len();
            if n == 0 { f64::NAN } else { sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1] }
        };
        Self { min: rank(0.0), median: rank(0.5), p99: rank(0.99), max: rank(1.0) }
    }
}

/// Everything the routing diagnostics report for one PEER or PKM layer: the statistics of an
/// [`ExpertUsage`] (see there for the definitions) and the state of its [`ProductKeys`].
///
/// ```
/// use burn::tensor::{Device, Distribution, Tensor};
/// use peer_core::{ExpertUsage, PeerConfig, RoutingReport};
///
/// let device = Device::flex();
/// let peer = PeerConfig::new(16, 8 * 8).with_heads(2).with_top_k(4).with_key_dim(8).init(&device);
/// let x = Tensor::<3>::random([2, 16, 16], Distribution::Normal(0.0, 1.0), &device);
/// let mut usage = ExpertUsage::new(64);
/// usage.add_routing(&peer.route(x));
/// let report = RoutingReport::new(&usage, Some(&peer.product_keys));
/// assert_eq!(report.selections, 2 * 16 * 2 * 4);
/// assert_eq!(report.sub_keys_used.len(), 2); // per head
/// println!("{report}");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingReport {
    /// Experts N.
    pub num_experts: usize,
    /// Selections S counted.
    pub selections: u64,
    /// Expert usage, a fraction.
    pub usage: f64,
    /// The usage of S uniform selections, `1 − exp(−S/N)`.
    pub uniform_ceiling: f64,
    /// KL of the router-weight distribution from uniform, nats.
    pub unevenness: f64,
    /// Share of the selections taken by the top 1% of experts.
    pub top_1_percent_share: f64,
    /// √N, the size of each sub-key set.
    pub num_sub_keys: usize,
    /// Sub-keys of each half that appear in a retrieved expert, per head.
    pub sub_keys_used: Vec<[usize; 2]>,
    /// The selection counts' unevenness split into the two halves' marginals and their mutual
    /// information, `[KL₁, KL₂, I]` nats (see [`ExpertUsage::unevenness_split`]).
    pub unevenness_split: Option<[f64; 3]>,
    /// Norms of the sub-keys as scored, per key set and half (empty without keys).
    pub sub_key_norms: Vec<[Spread; 2]>,
    /// The score scale s of a normalised scoring (1 for the inner product).
    pub score_scale: f64,
}

impl RoutingReport {
    /// The report of what `usage` accumulated, with the key statistics of `keys` when given.
    pub fn new(usage: &ExpertUsage, keys: Option<&ProductKeys>) -> Self {
        Self {
            num_experts: usage.num_experts(),
            selections: usage.selections(),
            usage: usage.usage(),
            uniform_ceiling: usage.uniform_ceiling(),
            unevenness: usage.unevenness(),
            top_1_percent_share: usage.top_share(0.01),
            num_sub_keys: exact_sqrt(usage.num_experts()).unwrap_or(0),
            sub_keys_used: usage.sub_keys_used(),
            unevenness_split: usage.unevenness_split(),
            sub_key_norms: keys
                .map(|k| k.sub_key_norms().iter().map(|halves| halves.each_ref().map(|n| Spread::of(n))).collect())
                .unwrap_or_default(),
            score_scale: keys.map_or(1.0, ProductKeys::scale),
        }
    }
}

impl fmt::Display for RoutingReport {
    /// Several lines: usage against its ceiling, unevenness, top-1% share, sub-keys used,
    /// sub-key norms.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "expert usage {:.1}% of {} (uniform ceiling {:.1}% for {} selections), unevenness {:.3} nats, \
             top 1% of experts take {:.1}% of selections",
            100.0 * self.usage,
            self.num_experts,
            100.0 * self.uniform_ceiling,
            self.selections,
            self.unevenness,
            100.0 * self.top_1_percent_share
        )?;
        let used: Vec<String> = self.sub_keys_used.iter().map(|[a, b]| format!("{a}/{b}")).collect();
        write!(f, "sub-keys used per head (first/second half, of {}): {}", self.num_sub_keys, used.join(" "))?;
        if let Some([first, second, shared]) = self.unevenness_split {
            write!(
                f,
                "\nselection unevenness {:.3} nats = first half {first:.3} + second half {second:.3} + \
                 pairing (mutual information) {shared:.3}",
                first + second + shared
            )?;
        }
        for (set, halves) in self.sub_key_norms.iter().enumerate() {
            write!(f, "\nsub-key norms (key set {set}):")?;
            for (half, s) in halves.iter().enumerate() {
                write!(
                    f,
                    "{} half {} min {:.3} median {:.3} p99 {:.3} max {:.3}",
                    if half == 0 { "" } else { ";" },
                    half + 1,
                    s.min,
                    s.median,
                    s.p99,
                    s.max
                )?;
            }
        }
        if self.score_scale != 1.0 {
            write!(f, "\nscore scale {:.3}", self.score_scale)?;
        }
        Ok(())
    }
}
