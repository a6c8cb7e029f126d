//! Text generation: greedy, temperature, top-k and top-p sampling over a KV cache.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::attention::KvCache;
use crate::model::Transformer;
use peer_core::ConfigError;

/// How the next token is chosen.
#[derive(Config, Debug, PartialEq)]
pub struct SamplingConfig {
    /// Always take the most likely token (the other fields are ignored).
    #[config(default = false)]
    pub greedy: bool,
    /// Logits are divided by this before the softmax (> 0; below 1 sharpens).
    #[config(default = 1.0)]
    pub temperature: f64,
    /// Sample only among the `top_k` most likely tokens.
    #[config(default = "None")]
    pub top_k: Option<usize>,
    /// Sample only among the smallest set of tokens whose probability reaches `top_p`
    /// (nucleus sampling, in (0, 1]).
    #[config(default = "None")]
    pub top_p: Option<f64>,
    /// Seed of the sampler: the same seed, model and prompt give the same text.
    #[config(default = 0)]
    pub seed: u64,
}

impl SamplingConfig {
    /// Checks every rule, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(ConfigError::new(
                "temperature",
                format!("must be finite and greater than 0, got {}", self.temperature),
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ConfigError::new("top_p", format!("must lie in (0, 1], got {p}")));
        }
        if self.top_k == Some(0) {
            return Err(ConfigError::new("top_k", "must be at least 1, got 0"));
        }
        Ok(())
    }
}

/// Why generation could not run.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The sampling settings are invalid.
    #[error(transparent)]
    Sampling(#[from] ConfigError),
    /// There is no prompt to continue.
    #[error("the prompt is empty: give at least one token")]
    EmptyPrompt,
    /// Prompt plus new tokens do not fit the model's context.
    #[error("prompt ({prompt} tokens) + max_new_tokens ({new}) exceeds the model's max_seq_len ({max})")]
    TooLong {
        /// Prompt length.
        prompt: usize,
        /// Requested new tokens.
        new: usize,
        /// The model's context.
        max: usize,
    },
    /// A token id is outside the vocabulary.
    #[error("prompt token {token} is outside the vocabulary (size {vocab})")]
    UnknownToken {
        /// The token.
        token: u32,
        /// Vocabulary size.
        vocab: usize,
    },
}

impl Transformer {
    /// Continues `prompt` with up to `max_new_tokens` tokens (evaluation mode, KV cache).
    /// Returns only the new tokens.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        sampling: &SamplingConfig,
    ) -> Result<Vec<u32>, GenerateError> {
        sampling.validate()?;
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let vocab = self.vocab_size();
        if let Some(&token) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(GenerateError::UnknownToken { token, vocab });
        }
        let max = self.max_seq_len();
        if prompt.len() + max_new_tokens > max {
            return Err(GenerateError::TooLong { prompt: prompt.len(), new: max_new_tokens, max });
        }

        let model = self.valid();
        let device = model.embedding.weight.val().device();
        let mut cache = KvCache::new(model.num_layers());
        let mut rng = StdRng::seed_from_u64(sampling.seed);
        let mut input: Vec<u32> = prompt.to_vec();
        let mut generated = Vec::with_capacity(max_new_tokens);
        for _ in 0..max_new_tokens {
            let ids: Vec<i64> = input.iter().map(|&t| t as i64).collect();
            let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, input.len()]), &device);
            let logits = model.forward_cached(tokens, Some(&mut cache)).logits;
            let [_, seq, _] = logits.dims();
            let last: Vec<f64> = logits.narrow(1, seq - 1, 1).to_data().iter::<f64>().collect();
            let next = sample(&last, sampling, &mut rng);
            generated.push(next);
            input = vec![next];
        }
        Ok(generated)
    }
}

/// Picks a token from one position's logits.
pub fn sample(logits: &[f64], sampling: &SamplingConfig, rng: &mut StdRng) -> u32 {
    let argmax = || logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32);
    if sampling.greedy {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = sampling.top_k {
        order.truncate(k.min(order.len()));
    }
    let max = logits[order[0]];
    let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i] - max) / sampling.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = sampling.top_p {
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                mass += p;
                mass >= top_p
            })
            .map_or(probs.len(), |i| i + 1);
        order.truncate(keep);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    if !probs.iter().all(|p| p.is_finite()) {
        return argmax();
    }
    let mut u: f64 = rng.random();
    for (&token, p) in order.iter().zip(&probs) {
        if u < *p {
            return token as u32;
        }
        u -= p;
    }
    *order.last().expect("non-empty vocabulary") as u32
}
