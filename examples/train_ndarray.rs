//! Train the small PEER LM on the bundled corpus on Burn's NdArray CPU backend — the same code
//! path as `peer train --device ndarray`.
//!
//! ```text
//! cargo run --release --example train_ndarray            # a short run (2 × 20 steps)
//! cargo run --release --example train_ndarray -- 10 120  # epochs, steps per epoch
//! ```

use burn::tensor::Device;

#[path = "common/mod.rs"]
mod common;

fn main() {
    #[allow(deprecated)]
    let device = Device::ndarray();
    common::train_and_sample(device, "runs/example-ndarray");
}
