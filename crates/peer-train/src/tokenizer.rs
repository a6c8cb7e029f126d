//! Byte-level BPE through Hugging Face's `tokenizers` crate: trained on the training split and
//! cached next to the corpus, or loaded from any `tokenizer.json`.

use std::path::{Path, PathBuf};

use peer_model::checkpoint::{CheckpointMeta, TokenizerRef, write_atomic};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::corpus::Corpus;
use crate::error::{TrainError, io};

/// A tokenizer and the identity of the file it came from.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The `tokenizer.json` it was loaded from.
    pub path: PathBuf,
    /// SHA-256 of that file: what checkpoints record.
    pub sha256: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextTokenizer({}, {} tokens)", self.path.display(), self.vocab_size())
    }
}

/// The end-of-text token added to trained tokenizers.
pub const END_OF_TEXT: &str = "<|endoftext|>";

impl TextTokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TrainError> {
        if !path.exists() {
            return Err(TrainError::Tokenizer { path: path.to_path_buf(), reason: "file does not exist".into() });
        }
        let bytes = std::fs::read(path).map_err(io("read", path))?;
        let inner = Tokenizer::from_bytes(&bytes).map_err(|e| TrainError::Tokenizer {
            path: path.to_path_buf(),
            reason: format!("not a valid tokenizer.json: {e}"),
        })?;
        Ok(Self { inner, path: path.to_path_buf(), sha256: hex_sha256(&bytes) })
    }

    /// The byte-level BPE of `vocab_size` tokens for this corpus's training split: loaded from
    /// the cache (`.peer-cache/` beside the corpus) when it was trained before, trained and
    /// cached otherwise.
    pub fn for_corpus(corpus: &Corpus, vocab_size: usize) -> Result<Self, TrainError> {
        let mut hasher = Sha256::new();
        for document in &corpus.train {
            hasher.update(document.as_bytes());
            hasher.update([0]);
        }
        let corpus_hash = hex(&hasher.finalize());
        let cache = cache_dir(&corpus.path);
        let path = cache.join(format!("tokenizer-bpe{vocab_size}-{}.json", &corpus_hash[..16]));
        if path.exists() {
            return Self::from_file(&path);
        }
        std::fs::create_dir_all(&cache).map_err(io("create", &cache))?;
        let json = train_bpe(&corpus.train, vocab_size)
            .map_err(|reason| TrainError::Tokenizer { path: path.clone(), reason })?;
        write_atomic(&path, json.as_bytes())?;
        Self::from_file(&path)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TrainError> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| self.error(format!("cannot encode: {e}")))
    }

    /// Token ids of many documents (in parallel), concatenated.
    pub fn encode_documents(&self, documents: &[String]) -> Result<Vec<u32>, TrainError> {
        let encodings = self
            .inner
            .encode_batch(documents.to_vec(), false)
            .map_err(|e| self.error(format!("cannot encode: {e}")))?;
        Ok(encodings.iter().flat_map(|e| e.get_ids().iter().copied()).collect())
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TrainError> {
        self.inner.decode(ids, false).map_err(|e| self.error(format!("cannot decode: {e}")))
    }

    /// What a checkpoint records about this tokenizer.
    pub fn reference(&self) -> TokenizerRef {
        TokenizerRef { sha256: self.sha256.clone(), vocab_size: self.vocab_size(), path: Some(self.path.clone()) }
    }

    /// Refuses to pair this tokenizer with a checkpoint trained with another one.
    pub fn check_matches(&self, meta: &CheckpointMeta, checkpoint: &Path) -> Result<(), TrainError> {
        match &meta.tokenizer {
            Some(expected) if expected.sha256 != self.sha256 => Err(TrainError::TokenizerMismatch {
                checkpoint: checkpoint.to_path_buf(),
                expected_sha: expected.sha256.clone(),
                expected_vocab: expected.vocab_size,
                given: self.path.clone(),
                given_sha: self.sha256.clone(),
                given_vocab: self.vocab_size(),
            }),
            _ => Ok(()),
        }
    }

    fn error(&self, reason: String) -> TrainError {
        TrainError::Tokenizer { path: self.path.clone(), reason }
    }
}

/// Where trained tokenizers of `corpus` are cached.
pub fn cache_dir(corpus: &Path) -> PathBuf {
    if corpus.is_dir() {
        corpus.join(".peer-cache")
    } else {
        corpus.parent().unwrap_or(Path::new(".")).join(".peer-cache")
    }
}

fn train_bpe(documents: &[String], vocab_size: usize) -> Result<String, String> {
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT.to_string(), true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::default()))
        .with_post_processor(Some(ByteLevel::default()))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(|e| e.to_string())?;
    tokenizer.train(&mut trainer, documents.iter().flat_map(|d| d.lines())).map_err(|e| e.to_string())?;
    tokenizer.to_string(false).map_err(|e| e.to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}
