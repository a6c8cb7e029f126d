//! Train the small PEER LM on the bundled corpus through wgpu (a GPU, or Mesa's CPU Vulkan
//! driver) — the same code path as `peer train --device wgpu`.
//!
//! ```text
//! cargo run --release --example train_wgpu            # a short run (2 × 20 steps)
//! cargo run --release --example train_wgpu -- 10 120  # epochs, steps per epoch
//! ```

use burn::tensor::{Device, DeviceKind};

#[path = "common/mod.rs"]
mod common;

fn main() {
    common::train_and_sample(Device::wgpu(DeviceKind::DefaultDevice), "runs/example-wgpu");
}
