//! What a training step reports, and the metrics built on it: Burn's loss and perplexity, plus
//! tokens per second, the paper's expert usage and unevenness, and a guard against NaN loss.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::tensor::{ExecutionError, Int, Tensor, TensorReadError};
use burn::train::metric::{
    Adaptor, LossInput, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes, NumericEntry,
    PerplexityInput, SerializedEntry,
};
use burn::train::{Interrupter, ItemLazy};
use peer_core::ExpertUsage;
use peer_model::BlockRouting;

/// The output of one training or validation step.
pub struct LmOutput {
    /// Cross-entropy of the batch, `[1]` (auxiliary losses excluded).
    pub loss: Tensor<1>,
    /// Logits, `[batch, seq, vocab]`.
    pub logits: Tensor<3>,
    /// Targets, `[batch, seq]`.
    pub targets: Tensor<2, Int>,
    /// Routings of the PKM/PEER blocks.
    pub routings: Vec<BlockRouting>,
}

impl ItemLazy for LmOutput {
    fn sync(self) -> Result<Self, ExecutionError> {
        self.loss.device().flush()?;
        Ok(Self {
            loss: self.loss.without_autodiff(),
            logits: self.logits.without_autodiff(),
            targets: self.targets.without_autodiff(),
            routings: self
                .routings
                .into_iter()
                .map(|mut r| {
                    r.routing.router_weights = r.routing.router_weights.without_autodiff();
                    r.routing.expert_ids = r.routing.expert_ids.without_autodiff();
                    r
                })
                .collect(),
        })
    }
}

impl Adaptor<LossInput> for LmOutput {
    fn adapt(&self) -> LossInput {
        LossInput::new(self.loss.clone())
    }
}

impl Adaptor<PerplexityInput> for LmOutput {
    fn adapt(&self) -> PerplexityInput {
        let [batch, seq, vocab] = self.logits.dims();
        PerplexityInput::new(
            self.logits.clone().reshape([batch * seq, vocab]),
            self.targets.clone().reshape([batch * seq]),
        )
    }
}

/// Input of [`TokensPerSecondMetric`]: tokens in the batch.
pub struct TokensInput(usize);

impl Adaptor<TokensInput> for LmOutput {
    fn adapt(&self) -> TokensInput {
        let [batch, seq] = self.targets.dims();
        TokensInput(batch * seq)
    }
}

/// Input of [`ExpertUsageMetric`].
pub struct RoutingInput(Vec<BlockRouting>);

impl Adaptor<RoutingInput> for LmOutput {
    fn adapt(&self) -> RoutingInput {
        RoutingInput(self.routings.clone())
    }
}

/// Input of [`LossGuard`].
pub struct GuardInput(Tensor<1>);

impl Adaptor<GuardInput> for LmOutput {
    fn adapt(&self) -> GuardInput {
        GuardInput(self.loss.clone())
    }
}

fn entry(current: f64, running: f64, unit: &str, count: usize, last: bool) -> SerializedEntry {
    let serialized = if last {
        NumericEntry::Final(running).serialize()
    } else {
        NumericEntry::Aggregated { aggregated_value: current, count }.serialize()
    };
    SerializedEntry::new(format!("epoch {running:.3}{unit} - batch {current:.3}{unit}"), serialized)
}

/// Training throughput in tokens per second, measured between consecutive batches.
#[derive(Clone)]
pub struct TokensPerSecondMetric {
    name: MetricName,
    start: Option<Instant>,
    last: Option<Instant>,
    tokens: usize,
    current: f64,
}

impl Default for TokensPerSecondMetric {
    fn default() -> Self {
        Self { name: Arc::new("Tokens per second".into()), start: None, last: None, tokens: 0, current: f64::NAN }
    }
}

impl TokensPerSecondMetric {
    fn running(&self) -> f64 {
        match (self.start, self.last) {
            (Some(s), Some(l)) if l > s => self.tokens as f64 / (l - s).as_secs_f64(),
            _ => f64::NAN,
        }
    }
}

impl Metric for TokensPerSecondMetric {
    type Input = TokensInput;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes { unit: Some("tok/s".into()), higher_is_better: true }.into()
    }

    fn update(&mut self, input: &TokensInput, _: &MetricMetadata) -> Result<SerializedEntry, TensorReadError> {
        let now = Instant::now();
        match self.last {
            // The first batch only starts the clock.
            None => self.start = Some(now),
            Some(last) => {
                self.tokens += input.0;
                self.current = input.0 as f64 / (now - last).as_secs_f64().max(1e-9);
            }
        }
        self.last = Some(now);
        Ok(entry(self.current, self.running(), " tok/s", input.0, false))
    }

    fn compute(&mut self) -> Result<SerializedEntry, TensorReadError> {
        Ok(entry(self.current, self.running(), " tok/s", self.tokens, true))
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

impl Numeric for TokensPerSecondMetric {
    fn value(&self) -> Option<NumericEntry> {
        Some(NumericEntry::Value(self.current))
    }
    fn running_value(&self) -> Option<NumericEntry> {
        Some(NumericEntry::Value(self.running()))
    }
    fn final_value(&self) -> NumericEntry {
        NumericEntry::Final(self.running())
    }
}

/// Which routing statistic an [`ExpertUsageMetric`] reports (definitions in [`ExpertUsage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingStatistic {
    /// Percentage of experts that received any router weight.
    Usage,
    /// KL divergence of the router-weight distribution from uniform (nats).
    Unevenness,
    /// Percentage of the selections taken by the top 1% of experts (1% when even).
    TopShare,
}

/// A routing statistic over everything seen in the epoch (training batches or validation
/// windows), built on [`ExpertUsage`]: the paper's expert usage and unevenness, and the share
/// of the top 1% of experts, so collapse shows while training runs. With several PKM/PEER
/// blocks, the mean over blocks is reported.
#[derive(Clone)]
pub struct ExpertUsageMetric {
    name: MetricName,
    statistic: RoutingStatistic,
    blocks: Vec<(usize, ExpertUsage)>,
}

impl ExpertUsageMetric {
    /// A metric reporting `statistic`.
    pub fn new(statistic: RoutingStatistic) -> Self {
        let name = match statistic {
            RoutingStatistic::Usage => "Expert usage",
            RoutingStatistic::Unevenness => "Expert unevenness",
            RoutingStatistic::TopShare => "Top 1% experts' share",
        };
        Self { name: Arc::new(name.into()), statistic, blocks: Vec::new() }
    }

    fn value(&self) -> f64 {
        if self.blocks.is_empty() {
            return f64::NAN;
        }
        let sum: f64 = self
            .blocks
            .iter()
            .map(|(_, usage)| match self.statistic {
                RoutingStatistic::Usage => 100.0 * usage.usage(),
                RoutingStatistic::Unevenness => usage.unevenness(),
                RoutingStatistic::TopShare => 100.0 * usage.top_share(0.01),
            })
            .sum();
        sum / self.blocks.len() as f64
    }

    fn unit(&self) -> &'static str {
        match self.statistic {
            RoutingStatistic::Usage | RoutingStatistic::TopShare => "%",
            RoutingStatistic::Unevenness => "",
        }
    }
}

impl Metric for ExpertUsageMetric {
    type Input = RoutingInput;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: Some(self.unit().into()).filter(|u: &String| !u.is_empty()),
            higher_is_better: self.statistic == RoutingStatistic::Usage,
        }
        .into()
    }

    fn update(&mut self, input: &RoutingInput, _: &MetricMetadata) -> Result<SerializedEntry, TensorReadError> {
        accumulate_usage(&mut self.blocks, &input.0);
        let value = self.value();
        Ok(entry(value, value, self.unit(), 1, false))
    }

    fn compute(&mut self) -> Result<SerializedEntry, TensorReadError> {
        let value = self.value();
        Ok(entry(value, value, self.unit(), 1, true))
    }

    fn clear(&mut self) {
        self.blocks.clear();
    }
}

impl Numeric for ExpertUsageMetric {
    fn value(&self) -> Option<NumericEntry> {
        Some(NumericEntry::Value(ExpertUsageMetric::value(self)))
    }
    fn running_value(&self) -> Option<NumericEntry> {
        Some(NumericEntry::Value(ExpertUsageMetric::value(self)))
    }
    fn final_value(&self) -> NumericEntry {
        NumericEntry::Final(ExpertUsageMetric::value(self))
    }
}

/// Adds each block's routing to that block's [`ExpertUsage`] in `blocks` (created on first
/// sight), keyed by block index.
pub fn accumulate_usage(blocks: &mut Vec<(usize, ExpertUsage)>, routings: &[BlockRouting]) {
    for routing in routings {
        block_entry(blocks, routing.block, || ExpertUsage::new(routing.num_experts)).add_routing(&routing.routing);
    }
}

/// The accumulator of `block` in `blocks`, appended (made by `new`) on first sight, so that
/// `blocks` keeps the order in which the blocks were first seen.
pub(crate) fn block_entry<T>(blocks: &mut Vec<(usize, T)>, block: usize, new: impl FnOnce() -> T) -> &mut T {
    let index = match blocks.iter().position(|(b, _)| *b == block) {
        Some(index) => index,
        None => {
            blocks.push((block, new()));
            blocks.len() - 1
        }
    };
    &mut blocks[index].1
}

/// Stops training (through Burn's [`Interrupter`], before the epoch's checkpoint is written)
/// as soon as a batch's loss is NaN or infinite, and remembers why.
#[derive(Clone)]
pub struct LossGuard {
    name: MetricName,
    interrupter: Interrupter,
    tripped: Arc<Mutex<Option<String>>>,
}

impl LossGuard {
    /// A guard that stops `interrupter`.
    pub fn new(interrupter: Interrupter) -> Self {
        Self { name: Arc::new("Loss guard".into()), interrupter, tripped: Arc::default() }
    }

    /// Why training was stopped, if it was.
    pub fn tripped(&self) -> Option<String> {
        self.tripped.lock().expect("guard lock").clone()
    }
}

impl Metric for LossGuard {
    type Input = GuardInput;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn update(&mut self, input: &GuardInput, metadata: &MetricMetadata) -> Result<SerializedEntry, TensorReadError> {
        let loss = input.0.clone().into_scalar::<f64>();
        if !loss.is_finite() {
            let reason = format!(
                "the loss became {loss} at iteration {}",
                metadata.iteration.map_or("?".into(), |i| i.to_string())
            );
            self.interrupter.stop(Some(&reason));
            *self.tripped.lock().expect("guard lock") = Some(reason);
        }
        let state = if self.tripped().is_some() { "NON-FINITE" } else { "ok" };
        Ok(SerializedEntry::new(state.into(), state.into()))
    }

    fn compute(&mut self) -> Result<SerializedEntry, TensorReadError> {
        let state = if self.tripped().is_some() { "NON-FINITE" } else { "ok" };
        Ok(SerializedEntry::new(state.into(), state.into()))
    }

    fn clear(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::data::dataloader::Progress;
    use burn::tensor::Device;

    fn metadata() -> MetricMetadata {
        MetricMetadata { progress: Progress::new(1, 1, None), iteration: Some(7), lr: None }
    }

    #[test]
    fn loss_guard_stops_the_interrupter_on_nan_only() {
        let interrupter = Interrupter::new();
        let mut guard = LossGuard::new(interrupter.clone());
        let device = Device::flex();
        guard.update(&GuardInput(Tensor::from_floats([2.5], &device)), &metadata()).unwrap();
        assert!(!interrupter.should_stop());
        assert_eq!(guard.tripped(), None);
        guard.update(&GuardInput(Tensor::from_floats([f32::NAN], &device)), &metadata()).unwrap();
        assert!(interrupter.should_stop());
        assert_eq!(guard.tripped().as_deref(), Some("the loss became NaN at iteration 7"));
    }
}
