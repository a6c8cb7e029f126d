//! Acceptance 3: every parameter group receives a gradient, and it agrees with finite
//! differences of the loss.

use burn::tensor::{Device, Tensor};
use peer_core::{ExpertTable, KeyScoring, Peer, PeerConfig, QueryNorm};

use super::reference::{Rng, host, host_int, randomize_weights, set_param, set_table, tensor};

const D_MODEL: usize = 8;
const TOKENS: usize = 6;

fn tiny(query_norm: QueryNorm, device: &Device) -> Peer {
    tiny_scored(query_norm, KeyScoring::Dot, device)
}

/// A small layer with dense table gradients (autodiff's, compared here with finite
/// differences; `sparse.rs` shows the row-sparse path equals them).
fn tiny_scored(query_norm: QueryNorm, scoring: KeyScoring, device: &Device) -> Peer {
    let mut peer = PeerConfig::new(D_MODEL, 6 * 6)
        .with_sparse_gradients(false)
        .with_scoring(scoring)
        .with_heads(2)
        .with_top_k(3)
        .with_key_dim(4)
        .with_query_norm(query_norm)
        .with_query_bias(true)
        .init(device);
    randomize_weights(&mut peer, &mut Rng::new(17));
    peer
}

/// loss = Σ y ⊙ r for a fixed random r, so every output coordinate matters.
fn loss(peer: &Peer, x: &Tensor<3>, r: &Tensor<3>) -> Tensor<1> {
    (peer.forward(x.clone()) * r.clone()).sum()
}

fn inputs(device: &Device) -> (Tensor<3>, Tensor<3>) {
    let mut rng = Rng::new(99);
    (
        tensor(rng.normals(TOKENS * D_MODEL, 1.0), [1, TOKENS, D_MODEL], device),
        tensor(rng.normals(TOKENS * D_MODEL, 1.0), [1, TOKENS, D_MODEL], device),
    )
}

#[test]
fn every_parameter_group_gets_a_gradient() {
    let device = Device::flex().autodiff();
    for norm in [QueryNorm::BatchNorm, QueryNorm::LayerNorm] {
        let peer = tiny(norm, &device);
        let (x, r) = inputs(&device);
        let grads = loss(&peer, &x, &r).backward();
        let nonzero = |name: &str, g: Option<Vec<f64>>| {
            let g = g.unwrap_or_else(|| panic!("{name}: no gradient"));
            assert!(g.iter().any(|v| *v != 0.0), "{name}: gradient is all zero");
        };
        nonzero("query.weight", peer.query.linear.weight.grad(&grads).map(|g| host(&g)));
        nonzero("sub_keys", peer.product_keys.sub_keys.grad(&grads).map(|g| host(&g)));
        nonzero("experts.down", peer.experts.down.grad(&grads).map(|g| host(&g)));
        nonzero("experts.up", peer.experts.up.grad(&grads).map(|g| host(&g)));
        if let Some(bn) = &peer.query.batch_norm {
            nonzero("batch_norm.gamma", bn.gamma.grad(&grads).map(|g| host(&g)));
            nonzero("batch_norm.beta", bn.beta.grad(&grads).map(|g| host(&g)));
        }
        if let Some(ln) = &peer.query.layer_norm {
            nonzero("layer_norm.gamma", ln.gamma.grad(&grads).map(|g| host(&g)));
        }
    }
}

/// Central differences of the loss with respect to a few entries of each parameter, compared
/// with the analytic gradient. Entries are chosen among those the routing actually uses (the
/// gradient of an unused expert row is exactly zero, which proves little).
#[test]
fn gradients_agree_with_finite_differences() {
    let device = Device::flex().autodiff();
    let peer = tiny(QueryNorm::BatchNorm, &device);
    let (x, r) = inputs(&device);
    let grads = loss(&peer, &x, &r).backward();

    let analytic = host(&peer.query.linear.weight.grad(&grads).unwrap());
    let mut checked = compare(
        "query.weight",
        &peer,
        &x,
        &r,
        &analytic,
        |p, values| set_param(&mut p.query.linear.weight, values),
        |p| host(&p.query.linear.weight.val()),
    );
    type Getter = fn(&mut Peer) -> &mut ExpertTable;
    let tables: [(&str, Getter); 2] =
        [("experts.down", |p| &mut p.experts.down), ("experts.up", |p| &mut p.experts.up)];
    for (name, get) in tables {
        let mut probe = peer.clone();
        let analytic = host(&get(&mut probe).grad(&grads).unwrap());
        checked +=
            compare(name, &peer, &x, &r, &analytic, |p, values| set_table(get(p), values), |p| host(&get(p).val()));
    }
    let analytic = host(&peer.product_keys.sub_keys.grad(&grads).unwrap());
    checked += compare(
        "sub_keys",
        &peer,
        &x,
        &r,
        &analytic,
        |p, values| set_param(&mut p.product_keys.sub_keys, values),
        |p| host(&p.product_keys.sub_keys.val()),
    );
    let bn = peer.query.batch_norm.as_ref().unwrap();
    let analytic = host(&bn.gamma.grad(&grads).unwrap());
    checked += compare(
        "batch_norm.gamma",
        &peer,
        &x,
        &r,
        &analytic,
        |p, values| set_param(&mut p.query.batch_norm.as_mut().unwrap().gamma, values),
        |p| host(&p.query.batch_norm.as_mut().unwrap().gamma.val()),
    );
    assert!(checked >= 20, "only {checked} entries checked");
}

/// The normalised scorings: the sub-keys (through their normalisation), the score scale and the
/// query network (through the query halves' normalisation, for the cosine) against finite
/// differences.
#[test]
fn normalised_scoring_gradients_agree_with_finite_differences() {
    let device = Device::flex().autodiff();
    for scoring in [KeyScoring::UnitKeys, KeyScoring::Cosine] {
        let peer = tiny_scored(QueryNorm::BatchNorm, scoring, &device);
        let (x, r) = inputs(&device);
        let grads = loss(&peer, &x, &r).backward();
        let analytic = host(&peer.product_keys.sub_keys.grad(&grads).unwrap());
        let mut checked = compare(
            &format!("{scoring:?} sub_keys"),
            &peer,
            &x,
            &r,
            &analytic,
            |p, values| set_param(&mut p.product_keys.sub_keys, values),
            |p| host(&p.product_keys.sub_keys.val()),
        );
        let analytic = host(&peer.product_keys.score_scale.as_ref().unwrap().grad(&grads).unwrap());
        // One scalar that every score shares: the loss is smooth in it, and a larger step
        // keeps f32 rounding of the loss out of its small gradient.
        checked += compare_with_step(
            1e-2,
            &format!("{scoring:?} score_scale"),
            &peer,
            &x,
            &r,
            &analytic,
            |p, values| set_param(p.product_keys.score_scale.as_mut().unwrap(), values),
            |p| host(&p.product_keys.score_scale.as_ref().unwrap().val()),
        );
        let analytic = host(&peer.query.linear.weight.grad(&grads).unwrap());
        checked += compare(
            &format!("{scoring:?} query.weight"),
            &peer,
            &x,
            &r,
            &analytic,
            |p, values| set_param(&mut p.query.linear.weight, values),
            |p| host(&p.query.linear.weight.val()),
        );
        assert!(checked >= 7, "{scoring:?}: only {checked} entries checked");
    }
}

fn compare(
    name: &str,
    peer: &Peer,
    x: &Tensor<3>,
    r: &Tensor<3>,
    analytic: &[f64],
    set: impl Fn(&mut Peer, Vec<f32>),
    get: impl Fn(&mut Peer) -> Vec<f64>,
) -> usize {
    // f32 central differences: eps = 1e-3 balances truncation against rounding.
    compare_with_step(1e-3, name, peer, x, r, analytic, set, get)
}

#[allow(clippy::too_many_arguments)]
fn compare_with_step(
    eps: f64,
    name: &str,
    peer: &Peer,
    x: &Tensor<3>,
    r: &Tensor<3>,
    analytic: &[f64],
    set: impl Fn(&mut Peer, Vec<f32>),
    get: impl Fn(&mut Peer) -> Vec<f64>,
) -> usize {
    let mut base = peer.clone();
    let values = get(&mut base);
    let routing = |p: &Peer| host_int(&p.route(x.clone()).expert_ids);
    let base_routing = routing(peer);
    // The entries with the largest gradients: those the routing uses.
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| analytic[b].abs().total_cmp(&analytic[a].abs()));
    let scale = analytic[order[0]].abs();
    assert!(scale > 0.0, "{name}: zero gradient");
    let mut checked = 0;
    for &i in order.iter().take(12) {
        let shifted = |delta: f64| {
            let mut probe = peer.clone();
            let mut values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
            values[i] += delta as f32;
            set(&mut probe, values);
            probe
        };
        let (plus, minus) = (shifted(eps), shifted(-eps));
        // The loss is piecewise smooth: a step that changes which experts are retrieved jumps
        // across a discontinuity, where finite differences say nothing about the gradient.
        if routing(&plus) != base_routing || routing(&minus) != base_routing {
            continue;
        }
        let numeric = (host(&loss(&plus, x, r))[0] - host(&loss(&minus, x, r))[0]) / (2.0 * eps);
        assert!(
            (numeric - analytic[i]).abs() <= 1e-2 * scale,
            "{name}[{i}]: finite difference {numeric}, autodiff {}",
            analytic[i]
        );
        checked += 1;
        if checked == 5 {
            break;
        }
    }
    assert!(checked >= 3.min(values.len()), "{name}: only {checked} entries away from routing boundaries");
    checked
}
