//! Row-sparse training of the expert tables with an ordinary `loss.backward()`.
//!
//! On an autodiff device, a PEER layer whose experts have
//! [`sparse_gradients`](crate::PeerConfig::sparse_gradients) on (the default) records its expert
//! computation as one node of the autodiff graph with its own backward pass. That pass hands
//! autodiff dL/dx and dL/dg (on Flex, where retrieval is fused with the experts: dL/dx, dL/dq
//! and dL/dK) and leaves the gradients of the rows the step retrieved here, in a process-wide
//! store keyed by the table's parameter id. The tables get no dense `[N, d_model]` gradient, so
//! Burn's optimizer leaves them alone; after the backward pass, [`apply_expert_updates`] walks
//! the model, finds every expert pool in it, and applies the lazy AdamW
//! ([`SparseAdamWConfig`]) to the rows it finds in the store.
//!
//! In a `TrainStep` that is one line in `optimize`, before Burn's optimizer:
//!
//! ```
//! use burn::module::Module;
//! use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
//! use burn::tensor::{Device, Distribution, Tensor};
//! use peer_core::{PeerConfig, SparseAdamWConfig, apply_expert_updates};
//!
//! let device = Device::flex().autodiff();
//! let peer = PeerConfig::new(16, 8 * 8).with_heads(2).with_top_k(4).with_key_dim(8).init(&device);
//! let optimizer = SparseAdamWConfig::new();
//! let mut states = optimizer.init_states(&peer); // one per expert pool found in the module
//!
//! let x = Tensor::<3>::random([2, 4, 16], Distribution::Normal(0.0, 1.0), &device).require_grad();
//! let before = peer.experts.down.val().inner();
//! let loss = (x.clone() + peer.forward(x)).powi_scalar(2).mean();
//! let grads = loss.backward(); // every other parameter's gradient, for Burn's optimizer
//! assert!(peer.experts.down.grad(&grads).is_none());
//!
//! let lr = ModuleLearningRate::from(1e-2);
//! assert_eq!(apply_expert_updates(&peer, &optimizer, &lr, &mut states), 1);
//! let moved = (peer.experts.down.val().inner() - before).abs().sum_dim(1).greater_elem(0.0).int().sum();
//! assert!(moved.into_scalar::<i64>() > 0);
//! ```
//!
//! Several backward passes before one update (gradient accumulation) add up in the store. The
//! store holds a handle to the tables until the update takes the rows: a program that runs a
//! backward pass without updating drops them with [`discard_row_gradients`].

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, MutexGuard};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::tensor::{Device, IndexingUpdateOp, Tensor};

use crate::experts::{Experts, RowGradients, touched_rows};
use crate::sparse_adamw::{SparseAdamWConfig, SparseAdamWState};

/// Row gradients left by backward passes and not yet applied, by `experts.down`'s id.
static STORE: LazyLock<Mutex<HashMap<ParamId, Pending>>> = LazyLock::new(Default::default);

struct Pending {
    /// A handle to the tables the rows belong to (clones share the tables).
    experts: Experts,
    rows: RowGradients,
}

fn store() -> MutexGuard<'static, HashMap<ParamId, Pending>> {
    // Entries are inserted and removed whole: a panic elsewhere cannot leave half of one.
    STORE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Adds the row gradients of one backward pass through `experts` to the store.
pub(crate) fn deposit(experts: &Experts, rows: RowGradients) {
    let id = experts.down.id();
    let mut store = store();
    let rows = match store.remove(&id) {
        Some(earlier) => merge(earlier.rows, rows, experts.num_experts()),
        None => rows,
    };
    store.insert(id, Pending { experts: experts.clone(), rows });
}

/// The sum of two sets of row gradients, each row once.
fn merge(a: RowGradients, b: RowGradients, num_experts: usize) -> RowGradients {
    let ids = Tensor::cat(vec![a.ids, b.ids], 0);
    let touched = touched_rows(ids, num_experts);
    let [distinct] = touched.ids.dims();
    let sum = |x: Tensor<2>, y: Tensor<2>| {
        let [_, width] = x.dims();
        let device = x.device();
        Tensor::<2>::zeros([distinct, width], &device).select_assign(
            0,
            touched.inverse.clone(),
            Tensor::cat(vec![x, y], 0),
            IndexingUpdateOp::Add,
        )
    };
    RowGradients { down: sum(a.down, b.down), up: sum(a.up, b.up), ids: touched.ids }
}

/// Takes the row gradients the backward passes since the last update left for `experts`
/// (`None` if there are none). [`apply_expert_updates`] does this for every pool of a model.
pub fn take_row_gradients(experts: &Experts) -> Option<RowGradients> {
    store().remove(&experts.down.id()).map(|pending| pending.rows)
}

/// Drops the row gradients waiting for any expert pool of `model` (after a backward pass that
/// is not followed by an update, such as a gradient check).
pub fn discard_row_gradients<M: Module>(model: &M) {
    let mut store = store();
    for pool in expert_pools(model) {
        store.remove(&pool.down);
    }
}

/// An expert pool found in a module by [`expert_pools`].
#[derive(Debug, Clone)]
pub struct ExpertPool {
    /// Module path of the `down` table's first parameter (as Burn's parameter groups see it,
    /// e.g. `blocks.1.feed_forward.Peer.experts.down`).
    pub path: String,
    /// Parameter id of `experts.down` (its first row block): identifies the pool.
    pub down: ParamId,
    /// Rows N and width d_model of each table.
    pub dims: [usize; 2],
    /// Rows per block of the tables (N when a table is one block).
    pub rows_per_block: usize,
    /// The tables' device.
    pub device: Device,
}

/// Every [`Experts`] module inside `module`, in the order Burn's module walk visits them.
pub fn expert_pools<M: Module>(module: &M) -> Vec<ExpertPool> {
    let mut finder = PoolFinder::default();
    module.visit(&mut finder);
    finder.pools
}

/// Applies the row gradients waiting in the store to every expert pool of `model` with the
/// lazy AdamW `optimizer`, each pool at the learning rate `lr` gives its `down` table (so a
/// parameter group of Burn's learning-rate scheduler that matches `experts.down` sets the
/// experts' rate). `states` holds one state per pool in walk order; when empty it is
/// initialised first (as [`SparseAdamWConfig::init_states`]). Returns the number of pools
/// updated.
///
/// # Panics
/// If `states` is not empty and does not hold one state per pool of `model`.
pub fn apply_expert_updates<M: Module>(
    model: &M,
    optimizer: &SparseAdamWConfig,
    lr: &ModuleLearningRate,
    states: &mut Vec<SparseAdamWState>,
) -> usize {
    let pools = expert_pools(model);
    if states.is_empty() {
        *states = pools.iter().map(SparseAdamWState::zeros).collect();
    }
    assert_eq!(
        states.len(),
        pools.len(),
        "apply_expert_updates: {} optimizer states for a model with {} expert pools; make them with SparseAdamWConfig::init_states(&model)",
        states.len(),
        pools.len()
    );
    let mut updated = 0;
    *states = std::mem::take(states)
        .into_iter()
        .zip(&pools)
        .map(|(state, pool)| {
            let Some(pending) = store().remove(&pool.down) else {
                return state;
            };
            updated += 1;
            let rate = lr.lr_from_param(pool.down, Some(&pool.path));
            optimizer.step(rate, &pending.experts, state, &pending.rows)
        })
        .collect();
    updated
}

impl SparseAdamWConfig {
    /// Zero states for every expert pool of `model`, in walk order (see
    /// [`apply_expert_updates`]).
    pub fn init_states<M: Module>(&self, model: &M) -> Vec<SparseAdamWState> {
        expert_pools(model).iter().map(SparseAdamWState::zeros).collect()
    }
}

/// Finds `Experts` modules by the fields Burn's derive reports when it enters them.
#[derive(Default)]
struct PoolFinder {
    path: Vec<String>,
    /// Inside an `Experts`' `down` table; `Some(true)` until its first block is seen.
    down: Option<bool>,
    pools: Vec<ExpertPool>,
}

impl ModuleVisitor for PoolFinder {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_string());
        if container_type == "Struct:Experts" && name == "down" {
            self.down = Some(true);
        }
    }

    fn exit_module(&mut self, name: &str, container_type: &str) {
        self.path.pop();
        if container_type == "Struct:Experts" && name == "down" {
            self.down = None;
        }
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.down.is_none() || D != 2 {
            return;
        }
        let [rows, width] = param.lazy_shape().dims::<2>();
        match (self.down.replace(false), self.pools.last_mut()) {
            (Some(false), Some(pool)) => pool.dims[0] += rows, // a further row block
            _ => self.pools.push(ExpertPool {
                path: self.path.join("."),
                down: param.id,
                dims: [rows, width],
                rows_per_block: rows,
                device: param.val().device(),
            }),
        }
    }
}
