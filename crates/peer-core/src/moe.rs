//! The coarse mixture-of-experts baseline: E full MLP experts, token-choice or expert-choice.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::softmax;

use crate::activation::gelu;
use burn::tensor::{Device, Distribution, IndexingUpdateOp, Tensor};

use crate::config::positive;
use crate::cost::LayerCost;
use crate::error::ConfigError;
use crate::kernels::topk::top_k_indices;

/// How tokens and experts are matched.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum MoeRouting {
    /// Each token picks its top-k experts (softmax over the chosen logits); an expert takes at
    /// most its capacity of the tokens that chose it. Returns a load-balancing loss.
    TokenChoice,
    /// Each expert picks its top-capacity tokens by router probability (Zhou et al. 2022), the
    /// paper's MoE baseline: balanced by construction, no auxiliary loss.
    ExpertChoice,
}

/// Configuration of a [`Moe`] layer.
#[derive(Config, Debug, PartialEq)]
pub struct MoeConfig {
    /// Input and output width.
    pub d_model: usize,
    /// Number of experts E (the paper's baseline uses 128).
    pub num_experts: usize,
    /// Hidden width of each expert's GELU MLP.
    pub hidden: usize,
    /// Experts per token: k for token choice; the average experts per token for expert choice.
    #[config(default = 1)]
    pub top_k: usize,
    /// Routing scheme.
    #[config(default = "MoeRouting::ExpertChoice")]
    pub routing: MoeRouting,
    /// Capacity factor c: an expert processes at most `ceil(c · tokens · k / E)` tokens.
    #[config(default = 1.25)]
    pub capacity_factor: f64,
    /// Weight of the load-balancing loss (token choice only), `E · Σ_e f_e · P_e`.
    #[config(default = 0.01)]
    pub load_balance_weight: f64,
}

impl MoeConfig {
    /// Checks the configuration, naming the offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("d_model", self.d_model)?;
        positive("num_experts", self.num_experts)?;
        positive("hidden", self.hidden)?;
        positive("top_k", self.top_k)?;
        if self.top_k > self.num_experts {
            return Err(ConfigError::new(
                "top_k",
                format!("must be at most num_experts = {}, got {}", self.num_experts, self.top_k),
            ));
        }
        if !(self.capacity_factor.is_finite() && self.capacity_factor > 0.0) {
            return Err(ConfigError::new(
                "capacity_factor",
                format!("must be finite and positive, got {}", self.capacity_factor),
            ));
        }
        if !(self.load_balance_weight.is_finite() && self.load_balance_weight >= 0.0) {
            return Err(ConfigError::new(
                "load_balance_weight",
                format!("must be finite and non-negative, got {}", self.load_balance_weight),
            ));
        }
        Ok(())
    }

    /// Builds the layer: router as Burn's `Linear`, expert weights N(0, 1/fan_in).
    ///
    /// # Panics
    /// If the configuration is invalid, with the [`ConfigError`] message.
    pub fn init(&self, device: &Device) -> Moe {
        self.validate().unwrap_or_else(|err| panic!("{err}"));
        let normal = |shape: [usize; 3], fan_in: usize| {
            Param::from_tensor(Tensor::random(shape, Distribution::Normal(0.0, 1.0 / (fan_in as f64).sqrt()), device))
        };
        Moe {
            router: LinearConfig::new(self.d_model, self.num_experts).with_bias(false).init(device),
            w_in: normal([self.num_experts, self.d_model, self.hidden], self.d_model),
            w_out: normal([self.num_experts, self.hidden, self.d_model], self.hidden),
            top_k: self.top_k,
            routing: self.routing,
            capacity_factor: self.capacity_factor,
            load_balance_weight: self.load_balance_weight,
        }
    }

    /// Router `n·E` plus k experts of `2·n·f` weights each per token.
    pub fn cost(&self) -> LayerCost {
        let expert = 2 * self.d_model * self.hidden;
        let router = self.d_model * self.num_experts;
        LayerCost {
            params: router + self.num_experts * expert,
            active_params: router + self.top_k * expert,
            flops_per_token: 2.0 * (router + self.top_k * expert) as f64,
        }
    }
}

/// A mixture of E GELU-MLP experts with a learned router.
///
/// Both routings run with fixed shapes (no host round trip): every expert processes exactly
/// `capacity` token slots, gathered with `select` and scattered back with `select_assign`.
#[derive(Module, Debug)]
pub struct Moe {
    /// Router logits, `d_model → E`.
    pub router: Linear,
    /// Expert input weights, `[E, d_model, hidden]`.
    pub w_in: Param<Tensor<3>>,
    /// Expert output weights, `[E, hidden, d_model]`.
    pub w_out: Param<Tensor<3>>,
    /// Experts per token.
    #[module(skip)]
    pub top_k: usize,
    /// Routing scheme.
    #[module(skip)]
    pub routing: MoeRouting,
    /// Capacity factor.
    #[module(skip)]
    pub capacity_factor: f64,
    /// Weight of the load-balancing loss.
    #[module(skip)]
    pub load_balance_weight: f64,
}

impl Moe {
    /// Applies the layer; returns the output and the weighted auxiliary loss (zero for expert
    /// choice), to be added to the training loss.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - output: `([batch, seq, d_model], aux_loss [1])`
    pub fn forward(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<1>) {
        let [batch, seq, d_model] = x.dims();
        let tokens = batch * seq;
        let [experts, _, hidden] = self.w_in.dims();
        let x = x.reshape([tokens, d_model]);
        let device = x.device();

        let logits = self.router.forward(x.clone()); // [tokens, E]
        let probs = softmax(logits.clone(), 1);
        let capacity =
            ((self.capacity_factor * (tokens * self.top_k) as f64 / experts as f64).ceil() as usize).clamp(1, tokens);

        // affinity[t, e]: how much expert e wants token t (−∞: not allowed to take it).
        let (affinity, gate, aux_loss) = match self.routing {
            MoeRouting::ExpertChoice => (probs.clone(), probs, Tensor::zeros([1], &device)),
            MoeRouting::TokenChoice => {
                let chosen = top_k_indices(logits.clone().reshape([tokens, 1, experts]), self.top_k)
                    .reshape([tokens, self.top_k]);
                let chosen_mask = Tensor::<2>::zeros([tokens, experts], &device).scatter(
                    1,
                    chosen.clone(),
                    Tensor::ones([tokens, self.top_k], &device),
                    IndexingUpdateOp::Add,
                );
                // Softmax over the chosen logits only.
                let masked_logits = logits.mask_fill(chosen_mask.clone().equal_elem(0.0), f32::NEG_INFINITY);
                let gate = softmax(masked_logits, 1);
                // Switch-style balance: E · Σ_e (fraction of choices to e) · (mean prob of e).
                let fraction = chosen_mask.clone().mean_dim(0) / self.top_k as f64;
                let mean_prob = probs.mean_dim(0);
                let aux = (fraction * mean_prob).sum() * (experts as f64 * self.load_balance_weight);
                let affinity = gate.clone().mask_fill(chosen_mask.equal_elem(0.0), f32::NEG_INFINITY);
                (affinity, gate, aux)
            }
        };

        // Each expert's top-capacity tokens: [E, capacity].
        let slots =
            top_k_indices(affinity.transpose().reshape([experts, 1, tokens]), capacity).reshape([experts, capacity]);
        let slot_gate = gate.transpose().gather(1, slots.clone()).reshape([experts, capacity, 1]);
        let flat = slots.reshape([experts * capacity]);
        let x_slots = x.select(0, flat.clone()).reshape([experts, capacity, d_model]);
        let h = gelu(x_slots.matmul(self.w_in.val())); // [E, C, hidden]
        debug_assert_eq!(h.dims()[2], hidden);
        let y_slots = h.matmul(self.w_out.val()) * slot_gate; // [E, C, d_model]
        let output = Tensor::<2>::zeros([tokens, d_model], &device).select_assign(
            0,
            flat,
            y_slots.reshape([experts * capacity, d_model]),
            IndexingUpdateOp::Add,
        );
        (output.reshape([batch, seq, d_model]), aux_loss)
    }
}
