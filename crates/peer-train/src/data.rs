//! Token windows as a `burn-dataset` [`Dataset`] and the [`Batcher`] that stacks them.

use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, DatasetError};
use burn::tensor::{Device, Int, Tensor, TensorData};

/// Windows of `seq_len + 1` consecutive tokens of one token stream, every `stride` tokens.
#[derive(Debug, Clone)]
pub struct TokenWindows {
    tokens: Arc<Vec<u32>>,
    window: usize,
    stride: usize,
}

impl TokenWindows {
    /// Windows of `seq_len + 1` tokens starting every `stride` tokens; `None` when the stream
    /// is shorter than one window.
    pub fn new(tokens: Arc<Vec<u32>>, seq_len: usize, stride: usize) -> Option<Self> {
        (tokens.len() > seq_len && stride > 0).then_some(Self { tokens, window: seq_len + 1, stride })
    }
}

impl Dataset<Vec<u32>> for TokenWindows {
    fn get(&self, index: usize) -> Result<Vec<u32>, DatasetError> {
        if index >= self.len() {
            return Err(DatasetError::new(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("window {index} out of range (dataset has {})", self.len()),
            )));
        }
        let start = index * self.stride;
        Ok(self.tokens[start..start + self.window].to_vec())
    }

    fn len(&self) -> usize {
        (self.tokens.len() - self.window) / self.stride + 1
    }
}

/// A batch of next-token prediction examples.
#[derive(Debug, Clone)]
pub struct LmBatch {
    /// Input tokens, `[batch, seq_len]`.
    pub inputs: Tensor<2, Int>,
    /// The following tokens, `[batch, seq_len]`.
    pub targets: Tensor<2, Int>,
}

/// Splits each window into inputs (all but the last token) and targets (all but the first).
#[derive(Debug, Clone, Default)]
pub struct LmBatcher;

impl Batcher<Vec<u32>, LmBatch> for LmBatcher {
    fn batch(&self, items: Vec<Vec<u32>>, device: &Device) -> LmBatch {
        let batch = items.len();
        let seq = items[0].len() - 1;
        let mut inputs = Vec::with_capacity(batch * seq);
        let mut targets = Vec::with_capacity(batch * seq);
        for window in &items {
            inputs.extend(window[..seq].iter().map(|&t| t as i64));
            targets.extend(window[1..].iter().map(|&t| t as i64));
        }
        LmBatch {
            inputs: Tensor::from_data(TensorData::new(inputs, [batch, seq]), device),
            targets: Tensor::from_data(TensorData::new(targets, [batch, seq]), device),
        }
    }
}
