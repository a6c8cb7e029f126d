//! The model as Burn's `Learner` sees it, and checkpoints written atomically.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::RecordError;
use burn::tensor::Bytes;
use burn::train::checkpoint::{Checkpoint, Checkpointer, CheckpointerError};
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use peer_model::Transformer;
use peer_model::checkpoint::write_atomic;

use crate::data::LmBatch;
use crate::metrics::LmOutput;

/// A [`Transformer`] trained on next-token prediction.
#[derive(Module, Debug)]
pub struct LanguageModel {
    /// The network.
    pub transformer: Transformer,
}

impl LanguageModel {
    fn run(&self, batch: LmBatch) -> (burn::tensor::Tensor<1>, LmOutput) {
        let (loss, cross_entropy, output) = self.transformer.loss(batch.inputs, batch.targets.clone());
        let item = LmOutput {
            loss: cross_entropy,
            logits: output.logits,
            targets: batch.targets,
            routings: output.routings,
        };
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
        let bytes: Bytes = record.checkpoint_into_bytes().map_err(CheckpointerError::Record)?;
        write_atomic(&self.path(epoch), &bytes).map_err(|e| CheckpointerError::Unknown(e.to_string()))
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
    epochs.into_iter().rev().find(|epoch| {
        CHECKPOINT_PARTS
            .iter()
            .all(|part| directory.join(format!("{part}-{epoch}.bpk")).exists())
    })
}
