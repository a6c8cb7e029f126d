//! Acceptance 1: every feed-forward kind learns a toy repeating sequence.

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::Device;

use super::helpers::{kinds, tiny, tokens};

#[test]
fn each_kind_learns_a_repeating_sequence_in_50_steps() {
    let device = Device::flex().autodiff();
    // Period-5 sequence: after two tokens the next is determined.
    let pattern = [3i64, 7, 1, 12, 5];
    let rows = |offset: usize| -> Vec<i64> { (0..17).map(|i| pattern[(i + offset) % 5]).collect() };
    for ffw in kinds() {
        let kind = format!("{ffw:?}");
        let mut model = tiny(ffw).init(&device);
        let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
        let batch: Vec<Vec<i64>> = (0..4).map(rows).collect();
        let inputs = tokens(batch.iter().map(|r| r[..16].to_vec()).collect(), &device);
        let targets = tokens(batch.iter().map(|r| r[1..].to_vec()).collect(), &device);
        let mut first = None;
        let mut last = f64::NAN;
        for _ in 0..50 {
            let (loss, cross_entropy, _) = model.loss(inputs.clone(), targets.clone());
            last = cross_entropy.into_scalar::<f64>();
            first.get_or_insert(last);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(1e-2, model, grads);
        }
        let first = first.unwrap();
        // ln 16 ≈ 2.77 at the start; a memorised period-5 pattern is near 0.
        assert!(last < 0.3, "{kind}: cross-entropy {first:.3} → {last:.3} after 50 steps");
    }
}
