//! Errors of the training crate: every one names the file, field or value at fault.

use std::path::PathBuf;

/// Anything that stops data preparation, training, evaluation or generation.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The corpus path does not exist.
    #[error("corpus path {0} does not exist")]
    MissingCorpus(PathBuf),
    /// The corpus has no text.
    #[error("corpus {0} is empty: it holds no non-blank text (a folder must contain .txt files)")]
    EmptyCorpus(PathBuf),
    /// The corpus (or one split of it) is shorter than one training window.
    #[error(
        "the {split} split of the corpus has {tokens} tokens, fewer than one window of seq_len + 1 = {needed}; \
         use a longer corpus or a smaller --seq-len"
    )]
    CorpusTooShort {
        /// train or validation.
        split: &'static str,
        /// Tokens in that split.
        tokens: usize,
        /// seq_len + 1.
        needed: usize,
    },
    /// A file could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// read / write / create.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A tokenizer could not be trained, loaded or used.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer {
        /// The tokenizer file (or where it would be cached).
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The tokenizer differs from the one a checkpoint was trained with.
    #[error(
        "tokenizer mismatch: the checkpoint in {checkpoint} was trained with a tokenizer of \
         {expected_vocab} tokens (sha256 {expected_sha}), but {given} has {given_vocab} tokens \
         (sha256 {given_sha}); pass the original with --tokenizer"
    )]
    TokenizerMismatch {
        /// The checkpoint directory.
        checkpoint: PathBuf,
        /// Its tokenizer's hash.
        expected_sha: String,
        /// Its tokenizer's vocabulary.
        expected_vocab: usize,
        /// The given tokenizer file.
        given: PathBuf,
        /// Its hash.
        given_sha: String,
        /// Its vocabulary.
        given_vocab: usize,
    },
    /// A configuration is invalid.
    #[error("{context}: {source}")]
    Config {
        /// Where the configuration came from.
        context: String,
        /// The rule broken.
        source: peer_core::ConfigError,
    },
    /// A configuration file does not parse.
    #[error("{path} is not a valid {what}: {reason}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What it should be.
        what: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// The requested device is not compiled in or not usable.
    #[error("{0}")]
    Device(String),
    /// A checkpoint problem.
    #[error(transparent)]
    Checkpoint(#[from] peer_model::checkpoint::CheckpointError),
    /// Generation failed.
    #[error(transparent)]
    Generate(#[from] peer_model::GenerateError),
    /// The loss became NaN or infinite.
    #[error("training stopped: {reason}; {}", match last_good_epoch {
        Some(epoch) => format!("the last good checkpoint (epoch {epoch}) is kept in {} (continue with --resume after fixing the recipe)", dir.display()),
        None => "no checkpoint had been written yet".to_string(),
    })]
    NonFiniteLoss {
        /// What was seen.
        reason: String,
        /// Last checkpointed epoch, if any.
        last_good_epoch: Option<usize>,
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// Nothing to resume from.
    #[error("--resume: no complete checkpoint in {0}")]
    NothingToResume(PathBuf),
    /// Training failed inside Burn's learner.
    #[error("training failed: {0}")]
    Training(String),
}

/// `map_err` helper for I/O.
pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { action, path, source }
}
