//! Activations whose gradients are exact on every backend.

use burn::tensor::Tensor;
use burn::tensor::activation::relu;

use crate::config::Activation;

impl Activation {
    /// σ(x), element-wise.
    pub fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Activation::Relu => relu(x),
            Activation::Gelu => gelu(x),
        }
    }

    /// σ'(x), element-wise (ReLU's is 0 at 0).
    pub fn derivative<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Activation::Relu => x.greater_elem(0.0).float(),
            Activation::Gelu => gelu_derivative(x),
        }
    }
}

/// GELU, `0.5 · x · (1 + erf(x / √2))`, built from `erf` so autodiff differentiates it exactly.
///
/// Burn 0.22's fused `gelu` computes the exact function forward, but its default
/// `gelu_backward` (used by NdArray and the CubeCL backends; Flex overrides it) is the
/// derivative of the tanh approximation: gradients then differ between backends by about 1e-3
/// relative. Composing the function from `erf` keeps forward and backward consistent.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    normal_cdf(x.clone()) * x
}

/// Φ(x) = 0.5 · (1 + erf(x / √2)), the standard normal CDF.
fn normal_cdf<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    (x.div_scalar(std::f64::consts::SQRT_2).erf() + 1.0) * 0.5
}

/// dGELU/dx = Φ(x) + x φ(x), with Φ, φ the standard normal CDF and density.
pub fn gelu_derivative<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let cdf = normal_cdf(x.clone());
    let density = (x.clone().square() * -0.5).exp() * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
    cdf + x * density
}
