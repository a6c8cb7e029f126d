//! Whether a device can run on this machine.

use burn::tensor::{Device, Tensor};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Whether `device` runs a tiny tensor op on this machine: `false` where, for example, wgpu
/// finds no adapter. Burn reports that by panicking inside the first op that needs the
/// adapter; this catches the panic (the panic hook still prints it) so that a caller can say
/// what is missing or choose another device.
///
/// ```
/// use burn::tensor::Device;
///
/// assert!(peer_core::device_works(&Device::flex()));
/// ```
pub fn device_works(device: &Device) -> bool {
    let probe = device.clone();
    catch_unwind(AssertUnwindSafe(move || Tensor::<1>::ones([4], &probe).sum().into_scalar::<f32>() == 4.0))
        .unwrap_or(false)
}
