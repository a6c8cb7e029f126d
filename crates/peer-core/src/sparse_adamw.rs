//! Lazy AdamW for the expert tables: a step reads and writes only the rows it retrieved.
//!
//! The rule (Burn's `AdamW` restricted to touched rows; PyTorch's `SparseAdam` with
//! decoupled weight decay). Let t count this layer's optimizer steps (every step, touched or
//! not), g_r the summed gradient of row r in this step, after clipping:
//!
//! - gradient clipping (optional): all row gradients of a table are scaled by
//!   `min(1, c / (‖g‖₂ + tiny))`, the norm taken over the table — equal to the norm of the
//!   dense gradient, whose other rows are zero (Burn's `GradientClipping::Norm`);
//! - for each touched row r: `m_r ← β₁ m_r + (1−β₁) g_r`, `v_r ← β₂ v_r + (1−β₂) g_r²`,
//!   `θ_r ← θ_r (1 − lr λ) − lr · (m_r / (1−β₁ᵗ)) / (√(v_r / (1−β₂ᵗ)) + ε)`;
//! - untouched rows: θ, m and v are left exactly as they are. Dense AdamW would instead decay
//!   their moments, keep moving them with the decaying momentum, and apply weight decay.
//!
//! So from the same state, one step equals dense AdamW on the touched rows; over several
//! steps they differ only through rows that were skipped in between. The update is written in
//! place into the [`ExpertTable`]s: by one CubeCL kernel on wgpu (θ, m and v read and written
//! once), by tensor ops (`select`, `select_assign`) on every other device.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::Tensor;

use crate::expert_updates::ExpertPool;
use crate::experts::{Experts, RowGradients};
use crate::kernels;
use crate::table::ExpertTable;

/// Hyper-parameters of the lazy AdamW (defaults as Burn's `AdamWConfig`, no weight decay).
///
/// [`apply_expert_updates`](crate::apply_expert_updates) applies it to every expert pool of a
/// model; [`step`](Self::step) to one pool:
///
/// ```
/// use burn::tensor::{Device, Distribution, Tensor};
/// use peer_core::{PeerConfig, SparseAdamWConfig, take_row_gradients};
///
/// let device = Device::flex().autodiff();
/// let peer = PeerConfig::new(16, 8 * 8).with_heads(2).with_top_k(4).with_key_dim(8).init(&device);
/// let optimizer = SparseAdamWConfig::new().with_grad_clip_norm(Some(1.0));
/// let mut state = optimizer.init_state(&peer.experts);
///
/// let x = Tensor::<3>::random([2, 4, 16], Distribution::Normal(0.0, 1.0), &device).require_grad();
/// let _grads = (x.clone() + peer.forward(x)).powi_scalar(2).mean().backward();
/// let rows = take_row_gradients(&peer.experts).expect("the backward pass left the retrieved rows");
///
/// let before = peer.experts.down.val().inner();
/// state = optimizer.step(1e-2, &peer.experts, state, &rows);
/// assert_eq!(state.steps(), 1);
/// // Only the retrieved rows moved.
/// let moved = (peer.experts.down.val().inner() - before).abs().sum_dim(1).greater_elem(0.0).int().sum();
/// assert_eq!(moved.into_scalar::<i64>() as usize, rows.ids.dims()[0]);
/// ```
#[derive(Config, Debug)]
pub struct SparseAdamWConfig {
    /// β₁.
    #[config(default = 0.9)]
    pub beta_1: f32,
    /// β₂.
    #[config(default = 0.999)]
    pub beta_2: f32,
    /// ε.
    #[config(default = 1e-5)]
    pub epsilon: f32,
    /// Decoupled weight decay λ, applied to touched rows only.
    #[config(default = 0.0)]
    pub weight_decay: f32,
    /// Clip each table's gradient to this L2 norm.
    #[config(default = "None")]
    pub grad_clip_norm: Option<f32>,
}

/// The two moment tables of one expert table.
#[derive(Module, Debug)]
pub struct RowMoments {
    /// m, `[N, d_model]`.
    pub moment_1: ExpertTable,
    /// v, `[N, d_model]`.
    pub moment_2: ExpertTable,
}

/// Lazy AdamW state of one PEER layer: moments for both tables and the step count. A module,
/// so it is saved and restored with a training checkpoint.
#[derive(Module, Debug)]
pub struct SparseAdamWState {
    /// Moments of `experts.down`.
    pub down: RowMoments,
    /// Moments of `experts.up`.
    pub up: RowMoments,
    /// Steps taken, `[1]`.
    pub step: Param<Tensor<1>>,
}

impl SparseAdamWState {
    /// Zero moments in the block layout of `pool`, on its device, and no step taken.
    pub(crate) fn zeros(pool: &ExpertPool) -> Self {
        let [rows, width] = pool.dims;
        let zeros =
            || ExpertTable::from_fn(rows, width, pool.rows_per_block, |shape| Tensor::zeros(shape, &pool.device));
        let moments = || RowMoments { moment_1: zeros(), moment_2: zeros() };
        Self { down: moments(), up: moments(), step: Param::from_tensor(Tensor::zeros([1], &pool.device)) }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.step.val().into_scalar::<f32>() as usize
    }
}

impl SparseAdamWConfig {
    /// Zero moments for the tables of `experts`, on their device (the state
    /// [`init_states`](Self::init_states) makes for each pool of a model).
    pub fn init_state(&self, experts: &Experts) -> SparseAdamWState {
        let pools = crate::expert_pools(experts);
        SparseAdamWState::zeros(pools.first().expect("an Experts module is one expert pool"))
    }

    /// One lazy AdamW step of both tables of `experts` with learning rate `lr`.
    pub fn step(&self, lr: f64, experts: &Experts, state: SparseAdamWState, rows: &RowGradients) -> SparseAdamWState {
        let step = state.steps() as i32 + 1;
        kernels::adamw_rows(self, lr, step, &experts.down, &state.down, &rows.ids, rows.down.clone());
        kernels::adamw_rows(self, lr, step, &experts.up, &state.up, &rows.ids, rows.up.clone());
        SparseAdamWState { step: state.step.map(|s| s.add_scalar(1.0)), ..state }
    }
}
