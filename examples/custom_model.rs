//! PEER in a model of your own, trained with Burn's `Learner`: a regressor on tabular data
//! whose hidden layers are PEER blocks, written only against peer-core's public API.
//!
//! The PEER expert tables train row-sparsely: `loss.backward()` leaves the gradients of the
//! rows a step retrieved in peer-core's row store (the tables get no dense `[N, d_model]`
//! gradient), and `optimize` applies them with one call, [`apply_expert_updates`], before
//! Burn's optimizer updates everything else.
//!
//! ```text
//! cargo run --release --example custom_model            # Flex (CPU)
//! cargo run --release --example custom_model -- wgpu    # wgpu (a GPU, or Mesa's CPU driver)
//! ```
//!
//! The target is a smooth function of four features, `sin(2πa)·cos(2πb) + sin(6πc)·d`.

use std::path::Path;

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::loss::{MseLoss, Reduction};
use burn::nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use burn::train::metric::LossMetric;
use burn::train::{InferenceStep, Learner, RegressionOutput, SupervisedTraining, TrainOutput, TrainStep};
use peer_core::apply_expert_updates;
use peer_core::{ExpertUsage, Peer, PeerConfig, PeerRouting, QueryNorm, SparseAdamWConfig, SparseAdamWState};

/// Input features per example.
pub const FEATURES: usize = 4;

/// A residual MLP whose feed-forward blocks are PEER layers.
#[derive(Module, Debug)]
pub struct Regressor {
    /// Features → model width.
    pub input: Linear,
    /// Pre-norm of each block.
    pub norms: Vec<RmsNorm>,
    /// The PEER blocks.
    pub blocks: Vec<Peer>,
    /// Model width → prediction.
    pub output: Linear,
}

impl Regressor {
    /// Two PEER blocks of 32² experts (4 heads × top-8) at width 32.
    pub fn new(device: &Device) -> Self {
        let d_model = 32;
        let peer = PeerConfig::new(d_model, 32 * 32)
            .with_heads(4)
            .with_top_k(8)
            .with_key_dim(16)
            .with_query_norm(QueryNorm::LayerNorm);
        Self {
            input: LinearConfig::new(FEATURES, d_model).init(device),
            norms: (0..2).map(|_| RmsNormConfig::new(d_model).init(device)).collect(),
            blocks: (0..2).map(|_| peer.init(device)).collect(),
            output: LinearConfig::new(d_model, 1).init(device),
        }
    }

    /// Predictions and what every block retrieved.
    ///
    /// # Shapes
    /// - `features`: `[batch, FEATURES]`
    /// - output: `[batch, 1]`, one routing `[batch, 1, heads, k]` per block
    pub fn forward(&self, features: Tensor<2>) -> (Tensor<2>, Vec<PeerRouting>) {
        let [batch, _] = features.dims();
        let mut x = self.input.forward(features).unsqueeze_dim::<3>(1); // [batch, 1, d_model]
        let mut routings = Vec::new();
        for (norm, peer) in self.norms.iter().zip(&self.blocks) {
            let (y, routing) = peer.forward_with_routing(norm.forward(x.clone()));
            x = x + y;
            routings.push(routing);
        }
        let [_, _, d_model] = x.dims();
        (self.output.forward(x.reshape([batch, d_model])), routings)
    }
}

/// The regressor as Burn's `Learner` trains it: the network and the lazy AdamW state of its
/// expert tables (a module, so training checkpoints carry it).
#[derive(Module, Debug)]
pub struct Model {
    /// The network.
    pub network: Regressor,
    /// One state per expert pool of `network`.
    pub expert_states: Vec<SparseAdamWState>,
}

/// The lazy AdamW of the expert tables (no weight decay, as for embeddings).
pub fn expert_optimizer() -> SparseAdamWConfig {
    SparseAdamWConfig::new().with_grad_clip_norm(Some(1.0))
}

impl Model {
    /// A fresh model on `device` (an autodiff device to train it).
    pub fn new(device: &Device) -> Self {
        let network = Regressor::new(device);
        let expert_states = expert_optimizer().init_states(&network);
        Self { network, expert_states }
    }

    fn regression(&self, batch: Batch) -> RegressionOutput {
        let (output, routings) = self.network.forward(batch.features);
        let mut loss = MseLoss::new().forward(output.clone(), batch.targets.clone(), Reduction::Mean);
        // Each block's expert balance loss (present while training) keeps the pool in use.
        for balance in routings.into_iter().filter_map(|r| r.balance_loss) {
            loss = loss + balance;
        }
        RegressionOutput::new(loss, output, batch.targets)
    }
}

impl TrainStep for Model {
    type Input = Batch;
    type Output = RegressionOutput;

    fn step(&self, batch: Batch) -> TrainOutput<RegressionOutput> {
        let item = self.regression(batch);
        TrainOutput::new(self, item.loss.backward(), item)
    }

    fn optimize(mut self, optim: &mut ModuleOptimizer, lr: ModuleLearningRate, grads: GradientsParams) -> Self {
        // The retrieved rows of every PEER table, found by walking the network.
        apply_expert_updates(&self.network, &expert_optimizer(), &lr, &mut self.expert_states);
        optim.step(lr, self, grads)
    }
}

impl InferenceStep for Model {
    type Input = Batch;
    type Output = RegressionOutput;

    fn step(&self, batch: Batch) -> RegressionOutput {
        self.regression(batch)
    }
}

/// One example: features in [0, 1)⁴ and the target.
#[derive(Debug, Clone)]
pub struct Example {
    /// The features.
    pub features: [f32; FEATURES],
    /// The target.
    pub target: f32,
}

/// A batch of examples.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, FEATURES]`.
    pub features: Tensor<2>,
    /// `[batch, 1]`.
    pub targets: Tensor<2>,
}

/// Stacks examples into a [`Batch`].
#[derive(Debug, Clone, Default)]
pub struct TabularBatcher;

impl Batcher<Example, Batch> for TabularBatcher {
    fn batch(&self, items: Vec<Example>, device: &Device) -> Batch {
        let batch = items.len();
        let features = items.iter().flat_map(|e| e.features).collect::<Vec<_>>();
        let targets = items.iter().map(|e| e.target).collect::<Vec<_>>();
        Batch {
            features: Tensor::from_data(TensorData::new(features, [batch, FEATURES]), device),
            targets: Tensor::from_data(TensorData::new(targets, [batch, 1]), device),
        }
    }
}

/// `count` examples of the target function, from a fixed seed.
pub fn examples(count: usize, seed: u64) -> Vec<Example> {
    // A small xorshift generator keeps the data identical on every platform.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..count)
        .map(|_| {
            let features = [uniform(), uniform(), uniform(), uniform()];
            let tau = std::f32::consts::TAU;
            let [a, b, c, d] = features;
            let target = (tau * a).sin() * (tau * b).cos() + (3.0 * tau * c).sin() * d;
            Example { features, target }
        })
        .collect()
}

/// Trains the regressor on `device` with Burn's `SupervisedTraining` for `epochs` epochs of
/// `steps` batches of 64, writing Burn's logs and checkpoints under `dir`; returns the trained
/// model (on the autodiff device).
pub fn train(device: &Device, dir: &Path, epochs: usize, steps: usize) -> Model {
    let batch_size = 64;
    let train = InMemDataset::new(examples(steps * batch_size, 1));
    let valid = InMemDataset::new(examples(4 * batch_size, 2));
    let loader_train = DataLoaderBuilder::new(TabularBatcher).batch_size(batch_size).shuffle(7).build(train);
    let loader_valid = DataLoaderBuilder::new(TabularBatcher).batch_size(batch_size).build(valid);
    let train_device = device.clone().autodiff();
    train_device.seed(5);
    let model = Model::new(&train_device);
    let result = SupervisedTraining::new(dir, loader_train, loader_valid)
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .num_epochs(epochs)
        .launch(Learner::new(model, AdamWConfig::new().init(), 1e-2));
    if let Some(error) = result.error {
        panic!("training failed: {error}");
    }
    result.model
}

/// Mean squared error and the experts' usage of every block on `examples`.
pub fn evaluate(network: &Regressor, examples: Vec<Example>, device: &Device) -> (f64, Vec<f64>) {
    let batch = TabularBatcher.batch(examples, device);
    let (output, routings) = network.forward(batch.features);
    let mse = (output - batch.targets).powi_scalar(2).mean().into_scalar::<f32>() as f64;
    let usage = routings
        .iter()
        .zip(&network.blocks)
        .map(|(routing, peer)| {
            let mut usage = ExpertUsage::new(peer.num_experts());
            usage.add_routing(routing);
            usage.usage()
        })
        .collect();
    (mse, usage)
}

#[allow(dead_code)] // `main` is unused where the tests include this file
fn main() {
    let device = match std::env::args().nth(1).as_deref() {
        Some("wgpu") => Device::wgpu(DeviceKind::DefaultDevice),
        Some("flex") | None => Device::flex(),
        Some(other) => {
            eprintln!("error: unknown device {other:?} (expected flex or wgpu)");
            std::process::exit(2);
        }
    };
    let test = examples(2048, 3);
    let (before, _) = evaluate(&Regressor::new(&device), test.clone(), &device);
    let model = train(&device, Path::new("runs/example-custom-model"), 10, 200);
    let network = model.network.valid();
    let (after, usage) = evaluate(&network, test, &device);
    println!("test MSE: {before:.4} untrained → {after:.4} trained");
    for (block, usage) in usage.iter().enumerate() {
        println!("block {block}: {:.1}% of its 1,024 experts used on 2,048 test examples", usage * 100.0);
    }
}
