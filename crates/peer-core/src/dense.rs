//! The dense feed-forward baseline.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::silu;

use crate::activation::gelu;
use burn::tensor::{Device, Tensor};

use crate::config::positive;
use crate::cost::LayerCost;
use crate::error::ConfigError;

/// The flavour of a dense feed-forward layer.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum DenseKind {
    /// `W₂ GELU(W₁ x)`: two matrices.
    Gelu,
    /// `W₂ (SiLU(W_g x) ⊙ W₁ x)` (LLaMA): three matrices.
    SwiGlu,
}

/// Configuration of a [`DenseFfw`].
#[derive(Config, Debug, PartialEq)]
pub struct DenseFfwConfig {
    /// Input and output width.
    pub d_model: usize,
    /// Hidden width.
    pub hidden: usize,
    /// GELU MLP or SwiGLU.
    #[config(default = "DenseKind::Gelu")]
    pub kind: DenseKind,
}

impl DenseFfwConfig {
    /// Checks the configuration, naming the offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("d_model", self.d_model)?;
        positive("hidden", self.hidden)
    }

    /// Builds the layer (bias-free `Linear`s, Kaiming uniform).
    ///
    /// # Panics
    /// If the configuration is invalid, with the [`ConfigError`] message.
    pub fn init(&self, device: &Device) -> DenseFfw {
        self.validate().unwrap_or_else(|err| panic!("{err}"));
        let linear = |d_in, d_out| LinearConfig::new(d_in, d_out).with_bias(false).init(device);
        DenseFfw {
            up: linear(self.d_model, self.hidden),
            gate: (self.kind == DenseKind::SwiGlu).then(|| linear(self.d_model, self.hidden)),
            down: linear(self.hidden, self.d_model),
        }
    }

    /// Parameters, active parameters and forward FLOPs per token: every weight is used once,
    /// one multiply-add (2 FLOPs) each.
    pub fn cost(&self) -> LayerCost {
        let matrices = match self.kind {
            DenseKind::Gelu => 2,
            DenseKind::SwiGlu => 3,
        };
        let params = matrices * self.d_model * self.hidden;
        LayerCost { params, active_params: params, flops_per_token: 2.0 * params as f64 }
    }
}

/// A dense feed-forward layer (no residual; the block adds it).
#[derive(Module, Debug)]
pub struct DenseFfw {
    /// W₁, `d_model → hidden`.
    pub up: Linear,
    /// W_g, `d_model → hidden` (SwiGLU only).
    pub gate: Option<Linear>,
    /// W₂, `hidden → d_model`.
    pub down: Linear,
}

impl DenseFfw {
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let hidden = match &self.gate {
            None => gelu(self.up.forward(x)),
            Some(gate) => silu(gate.forward(x.clone())) * self.up.forward(x),
        };
        self.down.forward(hidden)
    }
}
