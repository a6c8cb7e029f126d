//! Row-sparse training: the row-sparse backward pass against autodiff's dense gradients, the
//! row store and the model walk, the lazy AdamW against Burn's AdamW and against a plain-Rust
//! implementation of the documented rule.

use burn::module::Module;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};
use peer_core::{
    Activation, Gate, KeyScoring, Peer, PeerConfig, QueryNorm, RowGradients, SparseAdamWConfig, take_row_gradients,
    touched_rows,
};

use super::backends::wgpu_device;
use super::reference::{Rng, host, host_int, randomize_weights, relative_error, tensor};

const D_MODEL: usize = 12;

fn layer(device: &Device, rng: &mut Rng) -> Peer {
    layer_in_blocks(device, rng, None)
}

fn layer_in_blocks(device: &Device, rng: &mut Rng, block_bytes: Option<usize>) -> Peer {
    let mut peer = PeerConfig::new(D_MODEL, 8 * 8)
        .with_table_block_bytes(block_bytes)
        .with_heads(3)
        .with_top_k(4)
        .with_key_dim(8)
        .with_query_norm(QueryNorm::BatchNorm)
        .init(device);
    randomize_weights(&mut peer, rng);
    peer
}

fn devices() -> Vec<(&'static str, Device)> {
    let mut devices = vec![("flex", Device::flex())];
    if let Some(wgpu) = wgpu_device() {
        devices.push(("wgpu", wgpu));
    }
    devices
}

/// A loss that uses the layer output, the residual and a second use of the input.
fn loss(x: Tensor<3>, y: Tensor<3>, weights: &Tensor<3>) -> Tensor<1> {
    ((x.clone() + y) * weights.clone()).tanh().sum() + x.powi_scalar(2).sum() * 0.1
}

/// Every gradient of the row-sparse backward pass equals autodiff's on the same computation
/// (on Flex it runs the host kernels, on wgpu the CubeCL kernels).
#[test]
fn row_sparse_gradients_equal_autodiff() {
    for (name, base) in devices() {
        let device = base.autodiff();
        let mut rng = Rng::new(7);
        let peer = layer(&device, &mut rng);
        assert_row_sparse_equals_autodiff(name, &peer, &device, [3, 5, D_MODEL], &mut rng);
    }
}

/// The kernels where they split their work: more than one retrieval block (over 128 query
/// rows) and several expert ranges per thread on Flex, several cubes of threads on wgpu, per-head keys, tables in row blocks, both
/// gates and activations, every scoring. Output and gradients of the row-sparse path (host
/// kernels on Flex, CubeCL kernels on wgpu) equal autodiff over the tensor path on the same
/// device.
#[test]
fn kernels_equal_autodiff_at_larger_sizes() {
    for (device_name, base) in devices() {
        let device = base.autodiff();
        let mut rng = Rng::new(21);
        let cases = [
            (Activation::Gelu, Gate::Softmax, true, QueryNorm::BatchNorm, None, KeyScoring::Dot),
            (Activation::Relu, Gate::Sigmoid, false, QueryNorm::LayerNorm, Some(100 * 16 * 4), KeyScoring::UnitKeys),
            (Activation::Gelu, Gate::Sigmoid, true, QueryNorm::None, Some(333 * 16 * 4), KeyScoring::Dot),
            (Activation::Gelu, Gate::Softmax, false, QueryNorm::BatchNorm, None, KeyScoring::Cosine),
            (Activation::Relu, Gate::Softmax, true, QueryNorm::BatchNorm, None, KeyScoring::UnitKeys),
        ];
        for (activation, gate, shared, norm, block_bytes, scoring) in cases {
            let mut peer = PeerConfig::new(16, 32 * 32)
                .with_scoring(scoring)
                .with_heads(4)
                .with_top_k(6)
                .with_key_dim(12)
                .with_activation(activation)
                .with_gate(gate)
                .with_shared_keys(shared)
                .with_query_norm(norm)
                .with_table_block_bytes(block_bytes)
                .init(&device);
            randomize_weights(&mut peer, &mut rng);
            let name = format!(
                "{device_name}: {activation:?}, {gate:?}, shared keys {shared}, {norm:?}, blocks {block_bytes:?}, {scoring:?}"
            );
            assert_row_sparse_equals_autodiff(&name, &peer, &device, [3, 70, 16], &mut rng);
        }
    }
}

/// The layer with dense table gradients (autodiff over the tensor path), sharing `peer`'s
/// parameters.
fn dense_twin(peer: &Peer) -> Peer {
    let mut dense = peer.clone();
    dense.experts.sparse_gradients = false;
    dense
}

/// Output and every gradient of the row-sparse path equal autodiff's on the same computation:
/// input, query network, sub-keys, norm, and the dense table gradients on the retrieved rows
/// (zero elsewhere).
fn assert_row_sparse_equals_autodiff(name: &str, peer: &Peer, device: &Device, shape: [usize; 3], rng: &mut Rng) {
    let [batch, seq, d_model] = shape;
    let values = rng.normals(batch * seq * d_model, 1.0);
    let weights = tensor(rng.normals(batch * seq * d_model, 1.0), shape, device);

    let x_dense = tensor(values.clone(), shape, device).require_grad();
    let (y_dense, _) = dense_twin(peer).forward_with_routing(x_dense.clone());
    let y_dense_values = host(&y_dense);
    let dense = loss(x_dense.clone(), y_dense, &weights).backward();

    let x_sparse = tensor(values, shape, device).require_grad();
    let (y, routing) = peer.forward_with_routing(x_sparse.clone());
    let y_sparse_values = host(&y);
    let sparse_grads = loss(x_sparse.clone(), y, &weights).backward();
    let table_rows = take_row_gradients(&peer.experts).expect("the backward pass left row gradients");
    assert!(take_row_gradients(&peer.experts).is_none(), "{name}: taking the rows empties the store");

    let close = |what: &str, a: Vec<f64>, b: Vec<f64>| {
        let err = relative_error(&a, &b);
        assert!(err < 1e-5, "{name}: {what}: relative error {err}");
    };
    close("output", y_sparse_values, y_dense_values);
    close("dL/dx", host(&x_sparse.grad(&sparse_grads).unwrap()), host(&x_dense.grad(&dense).unwrap()));
    close(
        "query weight",
        host(&peer.query.linear.weight.grad(&sparse_grads).unwrap()),
        host(&peer.query.linear.weight.grad(&dense).unwrap()),
    );
    close(
        "sub-keys",
        host(&peer.product_keys.sub_keys.grad(&sparse_grads).unwrap()),
        host(&peer.product_keys.sub_keys.grad(&dense).unwrap()),
    );
    if let Some(scale) = peer.product_keys.score_scale.as_ref() {
        close("score scale", host(&scale.grad(&sparse_grads).unwrap()), host(&scale.grad(&dense).unwrap()));
    }
    if let Some(bn) = peer.query.batch_norm.as_ref() {
        close("BatchNorm γ", host(&bn.gamma.grad(&sparse_grads).unwrap()), host(&bn.gamma.grad(&dense).unwrap()));
    }
    if let Some(ln) = peer.query.layer_norm.as_ref() {
        close("LayerNorm γ", host(&ln.gamma.grad(&sparse_grads).unwrap()), host(&ln.gamma.grad(&dense).unwrap()));
    }
    assert!(peer.experts.down.grad(&sparse_grads).is_none(), "{name}: row-sparse tables must get no dense gradient");
    assert!(peer.experts.up.grad(&sparse_grads).is_none(), "{name}: row-sparse tables must get no dense gradient");

    let ids = host_int(&table_rows.ids);
    let retrieved: std::collections::BTreeSet<i64> = host_int(&routing.expert_ids).into_iter().collect();
    assert_eq!(ids, retrieved.into_iter().collect::<Vec<_>>(), "{name}: rows = the retrieved experts");
    for (table, rows) in [(&peer.experts.down, &table_rows.down), (&peer.experts.up, &table_rows.up)] {
        let full = host(&table.grad(&dense).unwrap());
        let rows = host(rows);
        let mut expected = Vec::new();
        for (row, _) in full.chunks(d_model).enumerate().filter(|(row, _)| ids.contains(&(*row as i64))) {
            expected.extend_from_slice(&full[row * d_model..(row + 1) * d_model]);
        }
        close("table rows", rows, expected);
        let untouched: f64 = full
            .chunks(d_model)
            .enumerate()
            .filter(|(row, _)| !ids.contains(&(*row as i64)))
            .flat_map(|(_, r)| r.iter().map(|v| v.abs()))
            .sum();
        assert_eq!(untouched, 0.0, "{name}: dense gradient outside the retrieved rows");
    }
}

/// `touched_rows` against a sorted set, with the inverse map checked slot by slot (CPU
/// `cumsum` and the GPU prefix sum).
#[test]
fn touched_rows_are_the_distinct_ids() {
    for (name, device) in devices() {
        let mut rng = Rng::new(3);
        for (n, slots) in [(1, 5), (10, 3), (64, 500), (4096, 700), (5000, 3)] {
            let ids: Vec<i64> = (0..slots).map(|_| rng.range(0, n - 1) as i64).collect();
            let touched = touched_rows(Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [slots]), &device), n);
            let distinct: Vec<i64> =
                ids.iter().copied().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
            assert_eq!(host_int(&touched.ids), distinct, "{name}");
            let inverse = host_int(&touched.inverse);
            for (slot, id) in ids.iter().enumerate() {
                assert_eq!(distinct[inverse[slot] as usize], *id, "{name}");
            }
        }
    }
}

/// From the same state and the same gradients, one lazy step equals Burn's dense AdamW (with
/// weight decay and norm clipping) on the touched rows within 1e-6; untouched rows and their
/// moments do not move.
#[test]
fn sparse_step_equals_dense_adamw_on_touched_rows() {
    for (name, base) in devices() {
        let device = base.clone().autodiff();
        let mut rng = Rng::new(11);
        let peer = layer(&device, &mut rng);
        let x = tensor(rng.normals(20 * D_MODEL, 1.0), [4, 5, D_MODEL], &device);
        let weights = tensor(rng.normals(20 * D_MODEL, 1.0), [4, 5, D_MODEL], &device);
        let (lr, decay, clip) = (0.05, 0.1, 0.5);

        // Sparse: row gradients through the lazy AdamW, on an unshared copy.
        let before = peer.clone().fork(&device);
        let sparse = before.clone().fork(&device);
        let _ = loss(x.clone(), sparse.forward(x), &weights).backward();
        let rows = &take_row_gradients(&sparse.experts).expect("row gradients");
        let config = SparseAdamWConfig::new().with_weight_decay(decay).with_grad_clip_norm(Some(clip));
        let state = config.init_state(&sparse.experts);
        let state = config.step(lr, &sparse.experts, state, rows);
        assert_eq!(state.steps(), 1);

        // Dense: the same gradients, scattered into full [N, d_model] tables (zero on the
        // untouched rows, as autodiff's; `row_sparse_gradients_equal_autodiff` checks that they
        // are autodiff's), through Burn's AdamW. Feeding both optimizers one gradient keeps
        // this a test of the update rule: the first AdamW step divides by |g| + ε, which
        // turns float-rounding differences of tiny gradients into visible ones.
        let mut params = GradientsParams::new();
        for (table, row_grads) in [(&peer.experts.down, &rows.down), (&peer.experts.up, &rows.up)] {
            let full = Tensor::<2>::zeros(table.dims(), &base).select_assign(
                0,
                rows.ids.clone(),
                row_grads.clone(),
                IndexingUpdateOp::Add,
            );
            params.register(table.id(), full);
        }
        let mut optim = AdamWConfig::new()
            .with_weight_decay(decay)
            .with_grad_clipping(Some(GradientClippingConfig::Norm(clip)))
            .init();
        let dense = optim.step(lr, peer, params);

        let touched: Vec<usize> = host_int(&rows.ids).into_iter().map(|i| i as usize).collect();
        let tables = [
            (&before.experts.down, &dense.experts.down, &sparse.experts.down, &state.down),
            (&before.experts.up, &dense.experts.up, &sparse.experts.up, &state.up),
        ];
        for (old, dense, sparse, moments) in tables {
            let (old, dense, sparse) = (host(&old.val()), host(&dense.val()), host(&sparse.val()));
            let m1 = host(&moments.moment_1.val());
            for row in 0..old.len() / D_MODEL {
                let range = row * D_MODEL..(row + 1) * D_MODEL;
                if touched.contains(&row) {
                    for i in range {
                        assert!(
                            (sparse[i] - dense[i]).abs() < 1e-6,
                            "{name}: row {row}: {} vs {}",
                            sparse[i],
                            dense[i]
                        );
                    }
                } else {
                    assert_eq!(sparse[range.clone()], old[range.clone()], "{name}: untouched row {row} moved");
                    assert!(m1[range].iter().all(|&m| m == 0.0), "{name}: untouched moment {row} moved");
                }
            }
        }
    }
}

/// Three steps with different row sets follow the documented rule, computed here in f64.
#[test]
fn lazy_rule_over_several_steps() {
    for (name, device) in devices() {
        let mut rng = Rng::new(5);
        let width = 4;
        let mut peer = PeerConfig::new(width, 4 * 4).with_heads(1).with_top_k(2).with_key_dim(4).init(&device);
        let initial = rng.normals(16 * width, 0.5);
        peer.experts.down.set(tensor(initial.clone(), [16, width], &device));
        peer.experts.up.set(tensor(initial.clone(), [16, width], &device));
        let config = SparseAdamWConfig::new().with_weight_decay(0.2).with_grad_clip_norm(Some(1.0));
        let mut state = config.init_state(&peer.experts);
        let (b1, b2, eps, wd) = (0.9f64, 0.999f64, 1e-5f64, 0.2f64);
        let mut theta: Vec<f64> = initial.iter().map(|&v| v as f64).collect();
        let (mut m, mut v) = (vec![0.0; theta.len()], vec![0.0; theta.len()]);
        for (step, ids) in [vec![0usize, 3, 7], vec![3, 9], vec![0, 1, 2, 15]].into_iter().enumerate() {
            let t = step as i32 + 1;
            let lr = 0.1 / t as f64;
            let grad = rng.normals(ids.len() * width, 2.0);
            let row_grads = RowGradients {
                ids: Tensor::<1, Int>::from_data(
                    TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [ids.len()]),
                    &device,
                ),
                down: tensor(grad.clone(), [ids.len(), width], &device),
                up: tensor(grad.clone(), [ids.len(), width], &device),
            };
            state = config.step(lr, &peer.experts, state, &row_grads);
            let norm = grad.iter().map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt();
            let scale = (1.0 / (norm + f32::MIN_POSITIVE as f64)).min(1.0);
            for (k, &row) in ids.iter().enumerate() {
                for c in 0..width {
                    let (i, g) = (row * width + c, grad[k * width + c] as f64 * scale);
                    m[i] = b1 * m[i] + (1.0 - b1) * g;
                    v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                    let update = (m[i] / (1.0 - b1.powi(t))) / ((v[i] / (1.0 - b2.powi(t))).sqrt() + eps);
                    theta[i] = theta[i] * (1.0 - lr * wd) - lr * update;
                }
            }
        }
        assert_eq!(state.steps(), 3);
        for (what, actual, expected) in [
            ("down", host(&peer.experts.down.val()), &theta),
            ("up", host(&peer.experts.up.val()), &theta),
            ("m", host(&state.down.moment_1.val()), &m),
            ("v", host(&state.up.moment_2.val()), &v),
        ] {
            for (i, (a, e)) in actual.iter().zip(expected.iter()).enumerate() {
                assert!((a - e).abs() < 1e-6, "{name}: {what}[{i}] = {a}, rule gives {e}");
            }
        }
    }
}

/// Tables stored in row blocks (as on GPUs for tables above 64 MiB; forced small here) train
/// exactly like one table: same output, same row gradients, same lazy AdamW step.
#[test]
fn blocked_tables_train_like_one_table() {
    for (name, base) in devices() {
        let device = base.autodiff();
        let whole = layer_in_blocks(&device, &mut Rng::new(21), None);
        let blocked = layer_in_blocks(&device, &mut Rng::new(21), Some(7 * D_MODEL * 4));
        assert_eq!((whole.experts.down.num_blocks(), blocked.experts.down.num_blocks()), (1, 10), "{name}");
        let x = tensor(Rng::new(2).normals(20 * D_MODEL, 1.0), [4, 5, D_MODEL], &device);
        // A large epsilon keeps the first step smooth in the gradient: with the default, a
        // near-zero gradient component steps by about ±lr whatever its sign, so a rounding
        // difference (the GPU kernels sum a blocked table's rows block by block) would flip it.
        let config = SparseAdamWConfig::new().with_grad_clip_norm(Some(0.5)).with_epsilon(1e-2);
        let mut results = Vec::new();
        for peer in [&whole, &blocked] {
            let dense_output = host(&peer.forward(x.clone()));
            let y = peer.forward(x.clone());
            let output = host(&y);
            let _ = y.powi_scalar(2).sum().backward();
            let rows = &take_row_gradients(&peer.experts).expect("row gradients");
            let state = config.init_state(&peer.experts);
            let _ = config.step(0.1, &peer.experts, state, rows);
            results.push((
                dense_output,
                output,
                host(&rows.down),
                host(&rows.up),
                host(&peer.experts.down.val()),
                host(&peer.experts.up.val()),
            ));
        }
        let (a, b) = (&results[0], &results[1]);
        for (what, x, y) in [
            ("dense forward", &a.0, &b.0),
            ("row-sparse forward", &a.1, &b.1),
            ("dL/du rows", &a.2, &b.2),
            ("dL/dv rows", &a.3, &b.3),
            ("u after step", &a.4, &b.4),
            ("v after step", &a.5, &b.5),
        ] {
            let err = relative_error(x, y);
            assert!(err < 1e-6, "{name}: {what}: relative error {err}");
        }
    }
}

/// Two backward passes before one update (gradient accumulation) leave the sum of their row
/// gradients, each row once; `apply_expert_updates` finds the pool by walking the module
/// (row blocks included), takes the rows and updates them; `discard_row_gradients` empties
/// the store.
#[test]
fn row_gradients_accumulate_and_the_walk_applies_them() {
    use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
    use peer_core::{apply_expert_updates, discard_row_gradients, expert_pools};
    use std::collections::BTreeMap;

    let device = Device::flex().autodiff();
    let mut rng = Rng::new(31);
    let peer = layer_in_blocks(&device, &mut rng, Some(7 * D_MODEL * 4));
    let inputs: Vec<Tensor<3>> =
        (0..2).map(|_| tensor(rng.normals(12 * D_MODEL, 1.0), [2, 6, D_MODEL], &device)).collect();
    let by_row = |rows: &RowGradients| -> BTreeMap<i64, Vec<f64>> {
        let ids = host_int(&rows.ids);
        let down = host(&rows.down);
        ids.into_iter().zip(down.chunks(D_MODEL).map(|r| r.to_vec())).collect()
    };
    // Each pass alone.
    let mut expected: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for x in &inputs {
        let _ = peer.forward(x.clone()).powi_scalar(2).sum().backward();
        for (id, row) in by_row(&take_row_gradients(&peer.experts).expect("rows")) {
            let sum = expected.entry(id).or_insert_with(|| vec![0.0; D_MODEL]);
            sum.iter_mut().zip(&row).for_each(|(s, r)| *s += r);
        }
    }
    // Both passes, then one take.
    for x in &inputs {
        let _ = peer.forward(x.clone()).powi_scalar(2).sum().backward();
    }
    let accumulated = by_row(&take_row_gradients(&peer.experts).expect("rows"));
    assert_eq!(accumulated.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    for (id, row) in &accumulated {
        let err = relative_error(row, &expected[id]);
        assert!(err < 1e-6, "row {id}: relative error {err}");
    }

    let pools = expert_pools(&peer);
    assert_eq!(pools.len(), 1);
    assert_eq!((pools[0].dims, pools[0].rows_per_block, pools[0].down), ([64, D_MODEL], 7, peer.experts.down.id()));
    let optimizer = SparseAdamWConfig::new();
    let mut states = Vec::new();
    let lr = ModuleLearningRate::from(1e-2);
    assert_eq!(apply_expert_updates(&peer, &optimizer, &lr, &mut states), 0, "nothing waiting");
    assert_eq!(states.len(), 1, "states made on first use");
    let before = host(&peer.experts.down.val());
    let _ = peer.forward(inputs[0].clone()).sum().backward();
    assert_eq!(apply_expert_updates(&peer, &optimizer, &lr, &mut states), 1);
    assert_eq!(states[0].steps(), 1);
    assert_ne!(before, host(&peer.experts.down.val()));
    let _ = peer.forward(inputs[1].clone()).sum().backward();
    discard_row_gradients(&peer);
    assert!(take_row_gradients(&peer.experts).is_none());
}

/// Row blocks appear only where the device needs them: never on CPU backends, on wgpu only past
/// the adapter's own buffer limit (read from the adapter, not a constant), or below a forced
/// `table_block_bytes`.
#[test]
fn tables_are_split_only_past_the_device_limit() {
    use peer_core::{block_rows, max_buffer_bytes};
    let width = 256;
    let row_bytes = 4 * width;
    assert_eq!(max_buffer_bytes(&Device::flex()), usize::MAX);
    assert_eq!(block_rows(1 << 20, width, &Device::flex(), None), 1 << 20, "Flex: one block at N = 1024²");
    assert_eq!(block_rows(100, width, &Device::flex(), Some(7 * row_bytes)), 7, "forced on Flex");
    let Some(wgpu) = wgpu_device() else { return };
    let limit = max_buffer_bytes(&wgpu);
    assert!((1 << 20..usize::MAX).contains(&limit), "wgpu's adapter states its limit: {limit}");
    assert_eq!(max_buffer_bytes(&wgpu.clone().autodiff()), limit);
    let fit = limit / row_bytes;
    assert_eq!(block_rows(fit, width, &wgpu, None), fit, "a table that fits one buffer is one block");
    assert_eq!(block_rows(fit + 1, width, &wgpu, None), fit, "one row more: blocks of the limit");
    assert_eq!(block_rows(100, width, &wgpu, Some(7 * row_bytes)), 7, "forced on wgpu");
    let small = PeerConfig::new(16, 32 * 32).init(&wgpu);
    assert_eq!(small.experts.down.num_blocks(), 1);
    let forced = PeerConfig::new(16, 32 * 32).with_table_block_bytes(Some(100 * 16 * 4)).init(&wgpu);
    assert_eq!((forced.experts.down.num_blocks(), forced.experts.up.num_blocks()), (11, 11));
}
