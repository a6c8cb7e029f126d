//! The model as Burn's `Learner` sees it (including row-sparse expert updates), and
//! checkpoints written atomically.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::store::RecordError;
use burn::tensor::{Bytes, Tensor};
use burn::train::checkpoint::{Checkpoint, Checkpointer, CheckpointerError};
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use peer_core::{SparseAdamWConfig, SparseAdamWState, apply_expert_updates};
use peer_model::Transformer;
use peer_model::checkpoint::replace_atomic;
use serde::{Deserialize, Serialize};

use crate::data::LmBatch;
use crate::metrics::LmOutput;

/// How the PEER expert tables are trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ExpertUpdates {
    /// Only the rows retrieved in a step get gradient and optimizer work (the layers'
    /// row-sparse backward pass and the lazy AdamW, [`apply_expert_updates`]); the cost of a
    /// step does not grow with the number of experts.
    #[default]
    Sparse,
    /// Autodiff's dense `[N, d_model]` gradients and Burn's AdamW over every row.
    Dense,
}

/// A [`Transformer`] trained on next-token prediction.
///
/// [`TrainStep::step`] is a plain `loss.backward()`. With [`ExpertUpdates::Sparse`], the PEER
/// blocks leave their tables' row gradients in peer-core's row store, and
/// [`TrainStep::optimize`] applies them with the lazy AdamW ([`apply_expert_updates`], in
/// place) before Burn's optimizer updates the rest.
#[derive(Module, Debug)]
pub struct LanguageModel {
    /// The network.
    pub transformer: Transformer,
    /// Lazy AdamW state of each PEER block's tables, in block order (empty when the tables are
    /// trained densely). Part of the model record, so training checkpoints carry it.
    pub expert_optimizer: Vec<SparseAdamWState>,
    #[module(skip)]
    sparse: Option<SparseAdamWConfig>,
}

impl LanguageModel {
    /// Wraps `transformer`; `grad_clip_norm` clips each expert table's row gradients as Burn
    /// clips every other parameter.
    pub fn new(mut transformer: Transformer, updates: ExpertUpdates, grad_clip_norm: f64) -> Self {
        transformer.set_sparse_gradients(updates == ExpertUpdates::Sparse);
        let sparse = (updates == ExpertUpdates::Sparse && transformer.peer_layers().next().is_some())
            .then(|| SparseAdamWConfig::new().with_weight_decay(0.0).with_grad_clip_norm(Some(grad_clip_norm as f32)));
        let expert_optimizer = match &sparse {
            Some(optimizer) => optimizer.init_states(&transformer),
            None => Vec::new(),
        };
        Self { transformer, expert_optimizer, sparse }
    }

    fn run(&self, batch: LmBatch) -> (Tensor<1>, LmOutput) {
        let (loss, cross_entropy, output) = self.transformer.loss(batch.inputs, batch.targets.clone());
        let item =
            LmOutput { loss: cross_entropy, logits: output.logits, targets: batch.targets, routings: output.routings };
        (loss, item)
    }
}

impl TrainStep for LanguageModel {
    type Input = LmBatch;
    type Output = LmOutput;

    fn step(&self, batch: LmBatch) -> TrainOutput<LmOutput> {
        let (loss, item) = self.run(batch);
        TrainOutput::new(self, loss.backward(), item)
    }

    fn optimize(mut self, optim: &mut ModuleOptimizer, lr: ModuleLearningRate, grads: GradientsParams) -> Self {
        if let Some(optimizer) = &self.sparse {
            apply_expert_updates(&self.transformer, optimizer, &lr, &mut self.expert_optimizer);
        }
        // The expert tables have no entry in `grads`: Burn's optimizer leaves them as they are.
        optim.step(lr, self, grads)
    }
}

impl InferenceStep for LanguageModel {
    type Input = LmBatch;
    type Output = LmOutput;

    fn step(&self, batch: LmBatch) -> LmOutput {
        self.run(batch).1
    }
}

/// Burn's file checkpointer (`<dir>/<name>-<epoch>.bpk`), but every file is written to a
/// temporary name and renamed into place: a killed run never leaves a truncated checkpoint
/// under a final name.
pub struct AtomicFileCheckpointer {
    directory: PathBuf,
    name: &'static str,
}

impl AtomicFileCheckpointer {
    /// Checkpoints named `<name>-<epoch>.bpk` in `directory` (created if needed).
    pub fn new(directory: &Path, name: &'static str) -> Self {
        std::fs::create_dir_all(directory).ok();
        Self { directory: directory.to_path_buf(), name }
    }

    /// The file of `epoch`.
    pub fn path(&self, epoch: usize) -> PathBuf {
        self.directory.join(format!("{}-{epoch}.bpk", self.name))
    }
}

impl<R: Checkpoint> Checkpointer<R> for AtomicFileCheckpointer {
    fn save(&self, epoch: usize, record: R) -> Result<(), CheckpointerError> {
        // Streamed to a temporary file: a 1024² model's record is 3.2 GB, and building its bytes
        // in memory first would double the checkpoint's peak memory.
        replace_atomic(&self.path(epoch), |tmp| record.save(tmp.to_path_buf())).map_err(CheckpointerError::Unknown)
    }

    fn delete(&self, epoch: usize) -> Result<(), CheckpointerError> {
        let path = self.path(epoch);
        if path.exists() {
            std::fs::remove_file(path).map_err(CheckpointerError::IOError)?;
        }
        Ok(())
    }

    fn restore(&self, epoch: usize) -> Result<R, CheckpointerError> {
        let path = self.path(epoch);
        let bytes = std::fs::read(&path).map_err(CheckpointerError::IOError)?;
        R::checkpoint_from_bytes(Bytes::from_bytes_vec(bytes)).map_err(|e: RecordError| CheckpointerError::Record(e))
    }
}

/// The names of the three checkpointers Burn's learner uses.
pub const CHECKPOINT_PARTS: [&str; 3] = ["model", "optim", "scheduler"];

/// The newest epoch for which model, optimizer and scheduler checkpoints all exist.
pub fn last_complete_checkpoint(directory: &Path) -> Option<usize> {
    let entries = std::fs::read_dir(directory).ok()?;
    let mut epochs: Vec<usize> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| name.strip_prefix("model-")?.strip_suffix(".bpk")?.parse().ok())
        .collect();
    epochs.sort_unstable();
    epochs
        .into_iter()
        .rev()
        .find(|epoch| CHECKPOINT_PARTS.iter().all(|part| directory.join(format!("{part}-{epoch}.bpk")).exists()))
}
