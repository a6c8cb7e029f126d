//! The balance loss (sub-keys and experts) against an f64 computation of its definition, its gradient against
//! finite differences, and its way into the layer's routing.

use burn::module::Module;
use burn::tensor::Device;
use peer_core::{Balance, KeyScoring, PeerConfig, ProductKeys, ProductKeysConfig};

use super::reference::{HostKeys, Rng, host, host_int, tensor};

/// The balance loss from its definition, from the raw queries and sub-keys: `weight · mean
/// over (key set, target group) of M · Σ_m f_m P_m`, the target groups being each half's √N
/// sub-keys, or the N experts with P the softmax over all N full-key scores.
fn reference(
    keys: &ProductKeys,
    queries: &[f64],
    ids: &[i64],
    [tokens, heads, k]: [usize; 3],
    weight: f64,
    balance: Balance,
) -> f64 {
    let host_keys = HostKeys::of(keys);
    let (root, half) = (host_keys.root, host_keys.half);
    let sets = host_keys.key_sets;
    let n = root * root;
    let softmax = |scores: &[f64]| -> Vec<f64> {
        let max = scores.iter().cloned().fold(f64::MIN, f64::max);
        let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
        scores.iter().map(|s| (s - max).exp() / total).collect()
    };
    let groups = match balance {
        Balance::SubKeys => 2,
        Balance::Experts | Balance::ExpertsPooled => 1,
    };
    let width = if balance == Balance::SubKeys { root } else { n };
    let mut soft = vec![0.0; sets * groups * width];
    let mut share = vec![0.0; sets * groups * width];
    for t in 0..tokens {
        for h in 0..heads {
            let set = if sets == 1 { 0 } else { h };
            let q = &queries[(t * heads + h) * 2 * half..(t * heads + h + 1) * 2 * half];
            let all = host_keys.brute_force_scores(set, q);
            let picked = &ids[(t * heads + h) * k..(t * heads + h + 1) * k];
            match balance {
                Balance::SubKeys => {
                    // score(i, j) = s₁(i) + s₂(j): a row or a column of the full scores is one
                    // half's scores shifted by a constant, which the softmax ignores.
                    let first: Vec<f64> = (0..root).map(|i| all[i * root]).collect();
                    let second: Vec<f64> = (0..root).map(|j| all[j]).collect();
                    for (which, scores) in [first, second].iter().enumerate() {
                        for (i, p) in softmax(scores).iter().enumerate() {
                            soft[(set * 2 + which) * root + i] += p;
                        }
                    }
                    for &id in picked {
                        share[set * 2 * root + id as usize / root] += 1.0;
                        share[(set * 2 + 1) * root + id as usize % root] += 1.0;
                    }
                }
                Balance::Experts => {
                    for (e, p) in softmax(&all).iter().enumerate() {
                        soft[set * n + e] += p;
                    }
                    for &id in picked {
                        share[set * n + id as usize] += 1.0;
                    }
                }
                Balance::ExpertsPooled => {
                    for (e, p) in softmax(&all).iter().enumerate() {
                        soft[set * n + e] += p;
                    }
                    // Each selection counts in every key set, as a share of all selections.
                    for &id in picked {
                        for s in 0..sets {
                            share[s * n + id as usize] += 1.0 / sets as f64;
                        }
                    }
                }
            }
        }
    }
    let rows = (tokens * heads / sets) as f64;
    let sum: f64 = soft.iter().zip(&share).map(|(p, f)| (p / rows) * (f / (rows * k as f64))).sum();
    weight * width as f64 * sum / (groups * sets) as f64
}

/// On Flex (the host kernel sums the expert balance over the selected experts only) and on
/// wgpu (tensor ops: one dense matmul per key set).
#[test]
fn balance_loss_equals_its_definition() {
    let mut devices = vec![Device::flex().autodiff()];
    devices.extend(super::backends::wgpu_device().map(|d| d.autodiff()));
    for device in devices {
        balance_loss_equals_its_definition_on(&device);
    }
}

fn balance_loss_equals_its_definition_on(device: &Device) {
    let mut rng = Rng::new(0xBA1A);
    let device = device.clone();
    for (case, (shared, scoring, balance, root)) in [
        (true, KeyScoring::Dot, Balance::SubKeys, 8),
        (false, KeyScoring::Dot, Balance::SubKeys, 8),
        (true, KeyScoring::Cosine, Balance::SubKeys, 8),
        (false, KeyScoring::UnitKeys, Balance::SubKeys, 8),
        (true, KeyScoring::Dot, Balance::Experts, 8),
        (false, KeyScoring::Cosine, Balance::Experts, 8),
        (true, KeyScoring::UnitKeys, Balance::Experts, 4),
        (false, KeyScoring::Dot, Balance::Experts, 4),
        (false, KeyScoring::Dot, Balance::ExpertsPooled, 4),
        (false, KeyScoring::UnitKeys, Balance::ExpertsPooled, 8),
        (true, KeyScoring::Dot, Balance::ExpertsPooled, 4),
    ]
    .into_iter()
    .enumerate()
    {
        let (key_dim, k, heads, tokens) = (6, 3, 3, 7);
        let weight = 0.5 + case as f64;
        let keys = ProductKeysConfig::new(root * root, key_dim, k, heads)
            .with_shared(shared)
            .with_scoring(scoring)
            .with_balance_loss(weight)
            .with_balance(balance)
            .init(&device);
        let values = rng.normals(tokens * heads * key_dim, 1.0);
        let queries = tensor(values.clone(), [tokens, heads, key_dim], &device).require_grad();
        let (_, ids) = keys.retrieve(queries.clone());
        let loss = keys.balance_loss(queries.clone(), ids.clone()).expect("on: weight > 0, tracked queries");
        let values64: Vec<f64> = values.iter().map(|&v| v as f64).collect();
        let ids = host_int(&ids);
        let expected = reference(&keys, &values64, &ids, [tokens, heads, k], weight, balance);
        let got = host(&loss)[0];
        assert!(
            (got - expected).abs() <= 1e-5 * expected.abs(),
            "{device:?} {shared} {scoring:?} {balance:?}: {got} vs {expected}"
        );

        // Gradient with respect to the queries (routing held fixed) against central differences
        // of the f64 definition.
        let grad = host(&queries.grad(&loss.backward()).unwrap());
        let eps = 1e-4;
        for index in [0, 5, 17, values.len() - 1] {
            let mut plus = values64.clone();
            let mut minus = values64.clone();
            plus[index] += eps;
            minus[index] -= eps;
            let numeric = (reference(&keys, &plus, &ids, [tokens, heads, k], weight, balance)
                - reference(&keys, &minus, &ids, [tokens, heads, k], weight, balance))
                / (2.0 * eps);
            assert!(
                (numeric - grad[index]).abs() <= 1e-3 * grad.iter().fold(0.0f64, |m, g| m.max(g.abs())),
                "{device:?} {shared} {scoring:?} {balance:?} [{index}]: finite difference {numeric}, autodiff {}",
                grad[index]
            );
        }
    }
}

/// Off without a weight, off without autodiff tracking; on, it arrives in the layer's routing
/// (dense tensor path and row-sparse host path alike) and pushes the sub-keys.
#[test]
fn balance_loss_reaches_the_routing_only_when_training() {
    let device = Device::flex().autodiff();
    let config = PeerConfig::new(8, 8 * 8).with_heads(2).with_top_k(3).with_key_dim(6);
    // Distinct tokens: identical ones would make the batch-normed queries exactly zero on some
    // CPUs (the mean rounds to each value), and a zero query gives the sub-keys no gradient.
    let x = tensor(Rng::new(11).normals(2 * 3 * 8, 1.0), [2, 3, 8], &device);
    let off = config.clone().with_balance_loss(0.0).init(&device);
    assert!(off.forward_with_routing(x.clone()).1.balance_loss.is_none(), "weight 0: off");
    assert_eq!(config.balance_loss, 0.1, "on by default");
    let peer = config.clone().with_balance_loss(0.01).init(&device);
    let plain = peer.valid();
    assert!(plain.forward_with_routing(x.clone().inner()).1.balance_loss.is_none(), "no autodiff: off");

    let x = x.require_grad();
    let mut dense_tables = peer.clone();
    dense_tables.experts.sparse_gradients = false;
    let (_, routing) = dense_tables.forward_with_routing(x.clone());
    let dense = routing.balance_loss.expect("training: on");
    let (_, row_sparse) = peer.forward_with_routing(x);
    let row_sparse = row_sparse.balance_loss.expect("row-sparse training: on");
    assert!((host(&dense)[0] - host(&row_sparse)[0]).abs() < 1e-6);
    let grads = dense.backward();
    let key_grad = host(&peer.product_keys.sub_keys.grad(&grads).unwrap());
    assert!(key_grad.iter().any(|g| *g != 0.0));
}
