//! The `custom_model` example (a user's own model with PEER blocks, trained by Burn's Learner)
//! on Flex and on wgpu: it trains, a step leaves the rows it did not retrieve bit-identical,
//! and its row gradients equal autodiff's dense gradients on the retrieved rows.

use std::collections::BTreeSet;

use burn::data::dataloader::batcher::Batcher;
use burn::module::Module;
use burn::optim::AdamWConfig;
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::tensor::{Device, DeviceKind, Tensor};
use burn::train::TrainStep;
use peer_core::take_row_gradients;

#[path = "../examples/custom_model.rs"]
mod custom_model;

use custom_model::{Model, TabularBatcher, examples};

/// Flex, and wgpu unless the machine has no adapter (under `CI=true` that fails instead: CI
/// installs Mesa's Vulkan driver, so wgpu must run there).
fn devices() -> Vec<(&'static str, Device)> {
    let mut devices = vec![("flex", Device::flex())];
    let wgpu = Device::wgpu(DeviceKind::DefaultDevice);
    if peer_core::device_works(&wgpu) {
        devices.push(("wgpu", wgpu));
    } else if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but wgpu found no working adapter: install mesa-vulkan-drivers libvulkan1");
    } else {
        eprintln!("SKIPPED wgpu: no wgpu adapter on this machine (set CI=true to fail instead)");
    }
    devices
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().iter::<f32>().collect()
}

fn ids(t: Tensor<4, burn::tensor::Int>) -> BTreeSet<usize> {
    t.into_data().convert::<i64>().iter::<i64>().map(|i| i as usize).collect()
}

/// Burn's `SupervisedTraining` + `Learner` train the example's model: the validation error
/// falls below the untrained model's, and every expert pool moved.
#[test]
fn the_learner_trains_the_custom_model() {
    for (name, device) in devices() {
        let dir = std::env::temp_dir().join(format!("peer-custom-model-{}-{name}", std::process::id()));
        let test = examples(512, 3);
        let untrained = Model::new(&device.clone().autodiff());
        let (before, _) = custom_model::evaluate(&untrained.network.valid(), test.clone(), &device);
        let model = custom_model::train(&device, &dir, 2, 40);
        let network = model.network.valid();
        let (after, usage) = custom_model::evaluate(&network, test, &device);
        assert!(after.is_finite() && after < before, "{name}: test MSE {before} → {after}");
        assert!(usage.iter().all(|&u| u > 0.1), "{name}: usage {usage:?}");
        for (old, new) in untrained.network.blocks.iter().zip(&network.blocks) {
            assert_ne!(host(old.experts.down.val()), host(new.experts.down.val()), "{name}: tables did not train");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// One training step as the Learner runs it (`TrainStep::step`, then `optimize`): the expert
/// rows no token retrieved are bit-identical afterwards, the retrieved ones moved, and Burn's
/// optimizer still trained the other parameters.
#[test]
fn a_step_leaves_rows_not_retrieved_bit_identical() {
    for (name, base) in devices() {
        let device = base.autodiff();
        device.seed(11);
        let model = Model::new(&device);
        let batch = TabularBatcher.batch(examples(16, 4), &device);
        // The forward pass is deterministic: the step retrieves what this pass retrieves.
        let (_, routings) = model.network.forward(batch.features.clone());
        let retrieved: Vec<BTreeSet<usize>> = routings.into_iter().map(|r| ids(r.expert_ids)).collect();
        let before: Vec<[Vec<f32>; 2]> =
            model.network.blocks.iter().map(|p| [host(p.experts.down.val()), host(p.experts.up.val())]).collect();
        let input_before = host(model.network.input.weight.val());

        let output = TrainStep::step(&model, batch);
        let mut optim = AdamWConfig::new().init();
        let model = model.optimize(&mut optim, ModuleLearningRate::from(1e-2), output.grads);

        for (block, peer) in model.network.blocks.iter().enumerate() {
            let d_model = peer.experts.down.dims()[1];
            let after = [host(peer.experts.down.val()), host(peer.experts.up.val())];
            for (table, (old, new)) in before[block].iter().zip(&after).enumerate() {
                let mut moved = 0;
                for (row, (a, b)) in old.chunks(d_model).zip(new.chunks(d_model)).enumerate() {
                    if retrieved[block].contains(&row) {
                        moved += usize::from(a != b);
                    } else {
                        assert!(
                            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                            "{name}: block {block} table {table}: row {row} was not retrieved but changed"
                        );
                    }
                }
                assert!(
                    moved * 10 >= retrieved[block].len() * 9,
                    "{name}: block {block} table {table}: only {moved} of {} retrieved rows moved",
                    retrieved[block].len()
                );
            }
        }
        assert_ne!(input_before, host(model.network.input.weight.val()), "{name}: Burn's optimizer step");
    }
}

/// The row gradients the example's backward pass leaves equal autodiff's dense table gradients
/// on the retrieved rows (relative 1e-5), which are zero on every other row.
#[test]
fn row_gradients_equal_dense_autodiff() {
    for (name, base) in devices() {
        let device = base.autodiff();
        device.seed(13);
        let model = Model::new(&device);
        let mut dense = model.clone();
        for peer in &mut dense.network.blocks {
            peer.experts.sparse_gradients = false;
        }
        let batch = TabularBatcher.batch(examples(24, 5), &device);

        let dense_grads = TrainStep::step(&dense, batch.clone()).grads;
        let _ = TrainStep::step(&model, batch).grads;
        for (block, peer) in model.network.blocks.iter().enumerate() {
            let rows = take_row_gradients(&peer.experts).expect("the backward pass left row gradients");
            let row_ids: Vec<usize> =
                rows.ids.clone().into_data().convert::<i64>().iter::<i64>().map(|i| i as usize).collect();
            for (table, sparse) in [(&peer.experts.down, rows.down), (&peer.experts.up, rows.up)] {
                let full = host(dense_grads.get::<2>(table.id()).expect("a dense table gradient"));
                let sparse = host(sparse);
                let d_model = table.dims()[1];
                let scale = full.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
                for (row, values) in full.chunks(d_model).enumerate() {
                    match row_ids.iter().position(|&id| id == row) {
                        Some(r) => {
                            for (a, b) in values.iter().zip(&sparse[r * d_model..(r + 1) * d_model]) {
                                assert!(
                                    (a - b).abs() <= 1e-5 * scale,
                                    "{name}: block {block} row {row}: dense {a} vs row-sparse {b}"
                                );
                            }
                        }
                        None => {
                            assert!(values.iter().all(|v| *v == 0.0), "{name}: block {block}: row {row} not retrieved")
                        }
                    }
                }
            }
        }
    }
}
