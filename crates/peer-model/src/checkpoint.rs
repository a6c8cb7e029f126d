//! Model directories: `config.json` + `model.bpk` + `checkpoint.json` (tokenizer reference),
//! and SafeTensors export/import through burn-store.
//!
//! Every file is written to a temporary name and renamed into place, so a killed process never
//! leaves a half-written file under a final name.

use std::fs;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::config::TransformerConfig;
use crate::model::Transformer;

/// File names inside a model directory.
pub const CONFIG_FILE: &str = "config.json";
/// The weights, in Burn's burnpack format.
pub const WEIGHTS_FILE: &str = "model.bpk";
/// Metadata: tokenizer reference and training progress.
pub const META_FILE: &str = "checkpoint.json";

/// Which tokenizer a model was trained with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerRef {
    /// SHA-256 of the tokenizer's JSON file, hex.
    pub sha256: String,
    /// Its vocabulary size.
    pub vocab_size: usize,
    /// Where it was when the checkpoint was written (informative).
    pub path: Option<PathBuf>,
}

/// What `checkpoint.json` records besides the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CheckpointMeta {
    /// The tokenizer the model expects, if known.
    pub tokenizer: Option<TokenizerRef>,
    /// Optimizer steps taken when this was written.
    pub step: usize,
    /// Free-form notes (e.g. the command that trained it).
    #[serde(default)]
    pub notes: String,
}

/// Why a model directory could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file is missing.
    #[error("checkpoint file {0} does not exist")]
    Missing(PathBuf),
    /// Reading or writing a file failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// read / write / rename.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file does not parse.
    #[error("{path} is not a valid {what}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// The configuration in the directory is invalid.
    #[error("{path}: {source}")]
    InvalidConfig {
        /// The file.
        path: PathBuf,
        /// The rule broken.
        source: peer_core::ConfigError,
    },
    /// The weights do not fit the configuration (or the file is truncated).
    #[error("weights in {path} do not match the model configuration: {reason}")]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// What did not match.
        reason: String,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io { action, path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = temporary(path);
    fs::write(&tmp, bytes).map_err(io("write", &tmp))?;
    fs::rename(&tmp, path).map_err(io("rename", path))
}

/// Replaces `path` atomically with what `write` writes to the temporary sibling it is given
/// (then renamed over `path`), so a large file is streamed to disk rather than first built in
/// memory. If `write` fails, the temporary file is removed and its message is returned.
pub fn replace_atomic<E: std::fmt::Display>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), String> {
    let tmp = temporary(path);
    if let Err(e) = write(&tmp) {
        fs::remove_file(&tmp).ok();
        return Err(format!("cannot write {}: {e}", tmp.display()));
    }
    fs::rename(&tmp, path).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), path.display()))
}

/// A sibling of `path` no other writer uses: process id plus a per-process counter.
fn temporary(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}-{n}", std::process::id()));
    path.with_file_name(name)
}

/// Saves config, weights and metadata into `dir` (created if needed), each atomically.
pub fn save_model(
    dir: &Path,
    config: &TransformerConfig,
    model: &Transformer,
    meta: &CheckpointMeta,
) -> Result<(), CheckpointError> {
    fs::create_dir_all(dir).map_err(io("create", dir))?;
    let weights = dir.join(WEIGHTS_FILE);
    replace_atomic(&weights, |tmp| model.clone().save_file(tmp))
        .map_err(|reason| CheckpointError::Weights { path: weights.clone(), reason })?;
    let config_json = serde_json::to_string_pretty(config).expect("config serialises");
    write_atomic(&dir.join(CONFIG_FILE), config_json.as_bytes())?;
    let meta_json = serde_json::to_string_pretty(meta).expect("metadata serialises");
    write_atomic(&dir.join(META_FILE), meta_json.as_bytes())
}

/// Reads the configuration of a model directory.
pub fn load_config(dir: &Path) -> Result<TransformerConfig, CheckpointError> {
    let path = dir.join(CONFIG_FILE);
    let text = read(&path)?;
    let corrupt = |e: serde_json::Error| CheckpointError::Corrupt {
        path: path.clone(),
        what: "model configuration",
        reason: e.to_string(),
    };
    let mut value: serde_json::Value = serde_json::from_str(&text).map_err(corrupt)?;
    crate::config::complete_legacy_json(&mut value);
    let config: TransformerConfig = serde_json::from_value(value).map_err(corrupt)?;
    config.validate().map_err(|source| CheckpointError::InvalidConfig { path, source })?;
    Ok(config)
}

/// Reads `checkpoint.json`.
pub fn load_meta(dir: &Path) -> Result<CheckpointMeta, CheckpointError> {
    let path = dir.join(META_FILE);
    let text = read(&path)?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::Corrupt {
        path,
        what: "checkpoint metadata",
        reason: e.to_string(),
    })
}

/// Loads a model directory onto `device`: configuration, weights and metadata.
pub fn load_model(
    dir: &Path,
    device: &Device,
) -> Result<(TransformerConfig, Transformer, CheckpointMeta), CheckpointError> {
    let config = load_config(dir)?;
    let meta = load_meta(dir)?;
    let model = load_weights(config.init(device), &dir.join(WEIGHTS_FILE))?;
    Ok((config, model, meta))
}

/// Loads burnpack weights into `model`, refusing files whose tensors do not match it.
pub fn load_weights(model: Transformer, path: &Path) -> Result<Transformer, CheckpointError> {
    if !path.exists() {
        return Err(CheckpointError::Missing(path.to_path_buf()));
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.try_load_file(path)));
    match outcome {
        Ok(Ok(model)) => Ok(model),
        Ok(Err(e)) => Err(CheckpointError::Weights { path: path.to_path_buf(), reason: e.to_string() }),
        Err(panic) => Err(CheckpointError::Weights { path: path.to_path_buf(), reason: panic_message(panic) }),
    }
}

/// Exports the weights as SafeTensors (tensor names are module paths, e.g.
/// `blocks.1.feed_forward.experts.down`).
pub fn export_safetensors(model: &Transformer, path: &Path) -> Result<(), CheckpointError> {
    let mut store = SafetensorsStore::from_file(path).skip_enum_variants(true).overwrite(true);
    model
        .save_into(&mut store)
        .map_err(|e| CheckpointError::Weights { path: path.to_path_buf(), reason: e.to_string() })
}

/// Imports SafeTensors weights written by [`export_safetensors`]; every parameter must be
/// present with its shape.
pub fn import_safetensors(mut model: Transformer, path: &Path) -> Result<Transformer, CheckpointError> {
    if !path.exists() {
        return Err(CheckpointError::Missing(path.to_path_buf()));
    }
    let mut store = SafetensorsStore::from_file(path).skip_enum_variants(true);
    let result = model
        .load_from(&mut store)
        .map_err(|e| CheckpointError::Weights { path: path.to_path_buf(), reason: e.to_string() })?;
    if !result.errors.is_empty() || !result.missing.is_empty() {
        return Err(CheckpointError::Weights { path: path.to_path_buf(), reason: format!("{result}") });
    }
    Ok(model)
}

fn read(path: &Path) -> Result<String, CheckpointError> {
    if !path.exists() {
        return Err(CheckpointError::Missing(path.to_path_buf()));
    }
    fs::read_to_string(path).map_err(io("read", path))
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown error".into())
}
