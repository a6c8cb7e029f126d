//! Routing statistics (expert usage, unevenness, uniform ceiling, top share, sub-keys used,
//! sub-key norms) against hand-computed values.

use burn::tensor::Device;
use peer_core::{
    ExpertUsage, HostRouting, KeyScoring, PeerConfig, ProductKeysConfig, RoutingReport, Spread, TokenLoad,
};

use super::reference::{Rng, host, host_int, set_param, tensor};

#[test]
fn uniform_routing_is_fully_used_and_even() {
    let mut usage = ExpertUsage::new(4);
    usage.add(&[0, 1, 2, 3], &[0.25, 0.25, 0.25, 0.25]);
    usage.add(&[3, 2, 1, 0], &[0.5, 0.5, 0.5, 0.5]);
    assert_eq!(usage.usage(), 1.0);
    assert!(usage.unevenness().abs() < 1e-12);
}

#[test]
fn one_expert_taking_everything_has_unevenness_log_n() {
    let mut usage = ExpertUsage::new(16);
    usage.add(&[5, 5, 5], &[0.2, 0.3, 0.5]);
    assert_eq!(usage.usage(), 1.0 / 16.0);
    assert!((usage.unevenness() - 16f64.ln()).abs() < 1e-12);
}

#[test]
fn hand_computed_mixed_routing() {
    // N = 8; z' = [1, 3, 0, 0, 0, 0, 0, 0] → z = [1/4, 3/4, 0, ...].
    // usage = 2/8; KL = ln 8 + 1/4 ln 1/4 + 3/4 ln 3/4.
    let mut usage = ExpertUsage::new(8);
    usage.add(&[0, 1], &[0.5, 0.5]);
    usage.add(&[1, 0, 1], &[1.5, 0.5, 1.0]);
    assert_eq!(usage.weights()[..2], [1.0, 3.0]);
    assert_eq!(usage.usage(), 0.25);
    let expected = 8f64.ln() + 0.25 * 0.25f64.ln() + 0.75 * 0.75f64.ln();
    assert!((usage.unevenness() - expected).abs() < 1e-12);

    let mut other = ExpertUsage::new(8);
    other.add(&[7], &[4.0]);
    usage.merge(&other);
    assert_eq!(usage.usage(), 3.0 / 8.0);
    usage.reset();
    assert_eq!(usage.usage(), 0.0);
    assert!(usage.unevenness().is_nan());
}

/// The routing of a real layer adds up to what the ids and weights say.
#[test]
fn add_routing_accumulates_router_weights() {
    let device = Device::flex();
    let config = PeerConfig::new(8, 4 * 4).with_heads(2).with_top_k(2).with_key_dim(4);
    let peer = config.init(&device);
    let mut rng = Rng::new(5);
    let routing = peer.route(tensor(rng.normals(3 * 8, 1.0), [1, 3, 8], &device));
    let mut usage = ExpertUsage::new(16);
    usage.add_routing(&routing);
    let ids = host_int(&routing.expert_ids);
    let weights = host(&routing.router_weights);
    let mut expected = vec![0.0; 16];
    for (id, w) in ids.iter().zip(&weights) {
        expected[*id as usize] += w;
    }
    for (a, b) in usage.weights().iter().zip(&expected) {
        assert!((a - b).abs() < 1e-12);
    }
    // Softmax weights: each of the 3 tokens × 2 heads contributes 1.
    let total: f64 = usage.weights().iter().sum();
    assert!((total - 6.0).abs() < 1e-5);

    // The host copy holds the same ids and weights, and adds up to the same usage.
    let host_routing = routing.to_host();
    assert_eq!(host_routing.dims, [1, 3, 2, 2]);
    assert_eq!(host_routing.expert_ids, ids);
    let mut from_host = ExpertUsage::new(16);
    from_host.add_host_routing(&host_routing);
    assert_eq!(from_host, usage);
}

#[test]
fn uniform_ceiling_counts_selections() {
    let mut usage = ExpertUsage::new(4);
    assert_eq!(usage.uniform_ceiling(), 0.0);
    usage.add(&[0, 0], &[0.5, 0.5]);
    assert_eq!(usage.selections(), 2);
    assert!((usage.uniform_ceiling() - (1.0 - (-0.5f64).exp())).abs() < 1e-15);
    assert_eq!(usage.selection_counts(), &[2, 0, 0, 0]);
}

#[test]
fn top_share_of_a_hand_made_load() {
    // N = 200: expert 0 selected 6 times, expert 1 three times, experts 2..=10 once: 18 in all.
    let mut usage = ExpertUsage::new(200);
    let mut ids = vec![0i64; 6];
    ids.extend([1, 1, 1]);
    ids.extend(2..=10);
    usage.add(&ids, &vec![0.1; ids.len()]);
    // The top 1% of 200 experts is 2 experts: (6 + 3) / 18.
    assert!((usage.top_share(0.01) - 0.5).abs() < 1e-15);
    // ⌈0.4% · 200⌉ = 1 expert: 6 / 18.
    assert!((usage.top_share(0.004) - 6.0 / 18.0).abs() < 1e-15);
    assert_eq!(usage.top_share(1.0), 1.0);
    let load = usage.sorted_load();
    assert_eq!(&load[..3], &[6, 3, 1]);
    assert_eq!((load[10], load[11]), (1, 0));
    assert!(ExpertUsage::new(9).top_share(0.01).is_nan());
}

#[test]
fn sub_keys_used_per_head_and_half() {
    // N = 16 (√N = 4): expert i·4 + j uses sub-key i of the first half and j of the second.
    // Layout [tokens = 2, heads = 2, k = 2].
    let ids = [
        0, 5, /* token 0, head 0: (0,0) (1,1) */ 15, 14, /* head 1: (3,3) (3,2) */
        1, 4, /* token 1, head 0: (0,1) (1,0) */ 13, 11, /* head 1: (3,1) (2,3) */
    ];
    let mut usage = ExpertUsage::new(16);
    usage.add_heads(&ids, &[0.5; 8], 2, 2);
    assert_eq!(usage.sub_keys_used(), vec![[2, 2], [2, 3]]);
    assert_eq!(usage.sub_key_selections()[1][1], vec![0, 1, 1, 2]);
    assert_eq!(usage.sub_key_selections()[0][0], vec![2, 2, 0, 0]);
    // Merging adds the counts head by head.
    let mut other = ExpertUsage::new(16);
    other.add(&[10], &[1.0]); // one head: (2, 2)
    usage.merge(&other);
    assert_eq!(usage.sub_keys_used(), vec![[3, 3], [2, 3]]);
    // N not a square: no sub-key statistics, the rest still works.
    let mut flat = ExpertUsage::new(10);
    flat.add_heads(&[1, 2, 3, 4], &[1.0; 4], 2, 2);
    assert!(flat.sub_keys_used().is_empty());
    assert_eq!(flat.usage(), 0.4);
}

#[test]
fn spread_uses_nearest_ranks() {
    let values: Vec<f32> = (1..=100).map(|v| v as f32).collect();
    assert_eq!(Spread::of(&values), Spread { min: 1.0, median: 50.0, p99: 99.0, max: 100.0 });
    assert_eq!(Spread::of(&[3.0]), Spread { min: 3.0, median: 3.0, p99: 3.0, max: 3.0 });
    assert!(Spread::of(&[]).median.is_nan());
}

/// The report's key statistics: the norms of known sub-keys, and unit norms once normalised.
#[test]
fn report_reads_sub_key_norms() {
    let device = Device::flex();
    for (scoring, first_half, second_half) in
        [(KeyScoring::Dot, [1.0, 5.0], [1.0, 2.0]), (KeyScoring::Cosine, [1.0, 1.0], [1.0, 1.0])]
    {
        let mut keys = ProductKeysConfig::new(4, 4, 2, 1).with_scoring(scoring).init(&device);
        // [key_sets = 1, 2 halves, √N = 2, d/2 = 2]: norms 5, 1 | 1, 2.
        set_param(&mut keys.sub_keys, vec![3.0, 4.0, 0.0, 1.0, 1.0, 0.0, 0.0, 2.0]);
        let mut usage = ExpertUsage::new(4);
        usage.add(&[0, 3, 3], &[0.25, 0.5, 0.25]);
        let report = RoutingReport::new(&usage, Some(&keys));
        assert_eq!(report.selections, 3);
        assert_eq!(report.usage, 0.5);
        assert_eq!(report.sub_keys_used, vec![[2, 2]]);
        let [a, b] = report.sub_key_norms[0];
        assert!((a.min - first_half[0]).abs() < 1e-6 && (a.max - first_half[1]).abs() < 1e-6, "{scoring:?}: {a:?}");
        assert!((b.min - second_half[0]).abs() < 1e-6 && (b.max - second_half[1]).abs() < 1e-6, "{scoring:?}: {b:?}");
        let expected_unevenness = 4f64.ln() + 0.25 * 0.25f64.ln() + 0.75 * 0.75f64.ln();
        assert!((report.unevenness - expected_unevenness).abs() < 1e-12);
        assert!((report.top_1_percent_share - 2.0 / 3.0).abs() < 1e-12);
        assert!(report.to_string().contains("expert usage 50.0% of 4"));
    }
}

/// The split of the selections' unevenness on hand-made loads: balanced halves but fully paired
/// selections put it all in the mutual information; independent halves put none there.
#[test]
fn unevenness_split_separates_halves_from_pairing() {
    // N = 4 (√N = 2): experts (0,0) and (1,1) only, equally: each half is uniform, the pairs are
    // fully dependent. KL₁ = KL₂ = 0, I = ln 2; total ln 4 − ln 2.
    let mut paired = ExpertUsage::new(4);
    paired.add(&[0, 3, 0, 3], &[0.5; 4]);
    let [a, b, i] = paired.unevenness_split().unwrap();
    assert!(a.abs() < 1e-12 && b.abs() < 1e-12 && (i - 2f64.ln()).abs() < 1e-12, "{a} {b} {i}");
    // First half always sub-key 0, second half uniform: independent. KL₁ = ln 2, KL₂ = 0, I = 0.
    let mut lopsided = ExpertUsage::new(4);
    lopsided.add(&[0, 1, 0, 1], &[0.5; 4]);
    let [a, b, i] = lopsided.unevenness_split().unwrap();
    assert!((a - 2f64.ln()).abs() < 1e-12 && b.abs() < 1e-12 && i.abs() < 1e-12, "{a} {b} {i}");
    // In general the three add up to ln N − H(joint) of the counts.
    let mut mixed = ExpertUsage::new(9);
    mixed.add(&[0, 0, 4, 5, 8, 2, 2, 2], &[1.0; 8]);
    let [a, b, i] = mixed.unevenness_split().unwrap();
    let counts = [2.0, 0.0, 3.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0];
    let joint: f64 = counts.iter().filter(|&&c| c > 0.0).map(|&c: &f64| -(c / 8.0) * (c / 8.0).ln()).sum();
    assert!((a + b + i - (9f64.ln() - joint)).abs() < 1e-12);
    assert!(ExpertUsage::new(8).unevenness_split().is_none());
}

/// Load attributed to input tokens, against counts done by hand.
#[test]
fn frequent_tokens_of_a_hand_made_routing() {
    // N = 200: the top 1% is the 2 busiest experts. Positions (token: experts):
    //   9: 0 1 | 9: 0 1 | 9: 0 2 | 4: 0 3 | 4: 5 6 | 7: 3 5 | 7: 3 6 | 2: 8 8
    // Loads: e0 4, e1 2, e2 1, e3 3, e5 2, e6 2, e8 2 (16 selections): the busiest two are e0
    // and e3 (7 selections); token 9 (3 of 8 positions) made 3 of them, token 4 one more.
    let mut load = TokenLoad::new(200);
    load.add(&[9, 9, 9, 4], &[0, 1, 0, 1, 0, 2, 0, 3]);
    load.add(&[4, 7, 7, 2], &[5, 6, 3, 5, 3, 6, 8, 8]);
    let one = load.frequent_tokens(1);
    assert_eq!(one.tokens, [9]);
    assert_eq!(one.position_shares, [3.0 / 8.0]);
    assert_eq!(one.distinct_experts, [3]);
    assert_eq!(one.top_1_percent_share_from_them, 3.0 / 7.0);
    // Without token 9: e3 3, e5 2, e6 2, e8 2, e0 1 (10 selections); the busiest two hold 5
    // (e3 and, of the experts tied at 2, any one).
    assert_eq!(one.top_1_percent_share_without_them, 5.0 / 10.0);

    // Tokens 4 and 7 tie at 2 positions: the lower id comes first.
    let three = load.frequent_tokens(3);
    assert_eq!(three.tokens, [9, 4, 7]);
    assert_eq!(three.distinct_experts, [3, 4, 3]);
    assert_eq!(three.top_1_percent_share_from_them, 1.0);
    // Only token 2 is left: expert 8 twice.
    assert_eq!(three.top_1_percent_share_without_them, 1.0);
    // More tokens asked for than seen: all of them, and nothing left.
    let all = load.frequent_tokens(10);
    assert_eq!(all.tokens.len(), 4);
    assert!(all.top_1_percent_share_without_them.is_nan());
}

/// Four tokens against a routing of two positions × two selections: the ids would split
/// evenly into four positions (which [`TokenLoad::add`] accepts), but not one per token.
#[test]
#[should_panic(expected = "4 tokens for 1 × 2 positions")]
fn token_load_rejects_tokens_that_are_not_the_routed_positions() {
    let routing = HostRouting { dims: [1, 2, 1, 2], expert_ids: vec![0, 1, 2, 3], router_weights: vec![0.5; 4] };
    TokenLoad::new(8).add_host_routing(&[1, 2, 3, 4], &routing);
}

#[test]
#[should_panic(expected = "do not split into 3 positions")]
fn token_load_rejects_ids_that_do_not_fit_the_positions() {
    TokenLoad::new(8).add(&[1, 2, 3], &[0, 1, 2, 3]);
}

/// A real layer's routing, attributed per token, adds up to the layer's own usage counts.
#[test]
fn token_load_of_a_real_routing_matches_the_usage() {
    let device = Device::flex();
    let peer = PeerConfig::new(8, 4 * 4).with_heads(2).with_top_k(2).with_key_dim(4).init(&device);
    let mut rng = Rng::new(9);
    let routing = peer.route(tensor(rng.normals(2 * 5 * 8, 1.0), [2, 5, 8], &device));
    let tokens = [3, 3, 1, 3, 2, 1, 3, 3, 0, 2];
    let mut load = TokenLoad::new(16);
    load.add_routing(&tokens, &routing);
    let mut usage = ExpertUsage::new(16);
    usage.add_routing(&routing);
    let everything = load.frequent_tokens(4);
    assert_eq!(everything.tokens, [3, 1, 2, 0]);
    assert_eq!(everything.position_shares, [0.5, 0.2, 0.2, 0.1]);
    assert_eq!(everything.top_1_percent_share_from_them, 1.0);
    // Token 3's distinct experts, counted from the ids directly.
    let ids = host_int(&routing.expert_ids);
    let mut seen: Vec<i64> =
        tokens.iter().zip(ids.chunks(4)).filter(|(t, _)| **t == 3).flat_map(|(_, e)| e.to_vec()).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(everything.distinct_experts[0], seen.len());
    assert_eq!(usage.selections(), 2 * 5 * 2 * 2);
}
