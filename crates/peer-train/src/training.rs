//! Training with Burn's `SupervisedTraining` + `Learner`, and evaluation.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::config::Config;
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::transform::{SamplerDataset, SamplerDatasetOptions};
use burn::module::{Module, ParamGroup};
use burn::optim::AdamWConfig;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::lr_scheduler::LrSchedulerConfig;
use burn::optim::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::optim::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLrSchedulerConfig;
use burn::optim::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::tensor::Device;
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::metric::{LearningRateMetric, LossMetric, PerplexityMetric};
use burn::train::{Learner, SupervisedTraining};
use peer_core::{ConfigError, ExpertUsage, FrequentTokens, PeerConfig, QueryNorm, RoutingReport, TokenLoad};
use peer_model::checkpoint::{CheckpointMeta, save_model, write_atomic};
use peer_model::{FeedForwardConfig, Transformer, TransformerConfig};
use serde::{Deserialize, Serialize};

use crate::charts::{Chart, ChartSeries, try_draw_charts};
use crate::corpus::Corpus;
use crate::data::{LmBatcher, TokenWindows};
use crate::error::{TrainError, io};
use crate::learner::{AtomicFileCheckpointer, ExpertUpdates, LanguageModel, last_complete_checkpoint};
use crate::metrics::{ExpertUsageMetric, LossGuard, RoutingStatistic, TokensPerSecondMetric, block_entry};
use crate::renderer::LineRenderer;
use crate::tokenizer::TextTokenizer;

/// Everything that defines a training run besides the data.
#[derive(Config, Debug)]
pub struct TrainingConfig {
    /// The model; its `vocab_size` is replaced by the tokenizer's and its `max_seq_len` is the
    /// training window length.
    pub model: TransformerConfig,
    /// Vocabulary of the BPE tokenizer trained on the corpus (ignored with `--tokenizer`).
    #[config(default = 2048)]
    pub vocab_size: usize,
    /// Sequences per batch.
    #[config(default = 16)]
    pub batch_size: usize,
    /// Optimizer steps per epoch; a checkpoint and a validation pass follow every epoch.
    #[config(default = 120)]
    pub steps_per_epoch: usize,
    /// Number of epochs.
    #[config(default = 8)]
    pub epochs: usize,
    /// Peak learning rate of AdamW (after warm-up; cosine decay to 10% of it at the end).
    #[config(default = 3e-3)]
    pub learning_rate: f64,
    /// Peak learning rate of the expert tables (PEER `experts.down/up`, PKM `values`): their
    /// own AdamW group without weight decay, as PKM and Meta's memory layers do. The default,
    /// 3e-2 (10× `learning_rate`, on the same warm-up and decay), recovers the perplexity that
    /// the balance loss costs at the expert tables' old 3e-3 (README, "Routing"): under even
    /// routing each row is retrieved in few steps, so each update must move it further
    /// (UltraMem raises the tables' rate for the same reason).
    #[config(default = 3e-2)]
    pub expert_learning_rate: f64,
    /// Linear warm-up steps (capped at a fifth of the run, so short runs still decay).
    #[config(default = 50)]
    pub warmup_steps: usize,
    /// AdamW weight decay of every parameter but the expert tables.
    #[config(default = 0.01)]
    pub weight_decay: f64,
    /// AdamW weight decay of the product keys' sub-keys (PEER and PKM `sub_keys`), finite and
    /// ≥ 0; `None`: `weight_decay`. Decay shrinks every sub-key each step, while only the
    /// sub-keys of retrieved experts get a gradient that can grow them back; 0 leaves the keys'
    /// lengths to the loss alone (measured in README, "Routing").
    #[config(default = "None")]
    pub key_weight_decay: Option<f64>,
    /// Gradient clipping by norm, per parameter tensor (Burn's rule).
    #[config(default = 1.0)]
    pub grad_clip_norm: f64,
    /// Seed of Burn's parameter initialisation, and of the data sampler unless `data_seed` is set.
    #[config(default = 42)]
    pub seed: u64,
    /// Seed of the data sampler alone (which training windows each epoch draws, in what order);
    /// `None`: `seed`. Setting it apart from `seed` tells the spread that the initialisation
    /// causes from the spread that the data order causes.
    #[config(default = "None")]
    pub data_seed: Option<u64>,
    /// At most this many validation windows are evaluated per epoch (evenly spaced); the final
    /// evaluation covers the whole validation split.
    #[config(default = 64)]
    pub max_validation_windows: usize,
    /// Data-loading threads.
    #[config(default = 1)]
    pub num_workers: usize,
    /// How PEER expert tables are trained: `Sparse` (only retrieved rows; lazy AdamW) or
    /// `Dense` (autodiff + AdamW over every row).
    /// Optional in a configuration file (default `Sparse`).
    #[config(default = "ExpertUpdates::Sparse")]
    pub expert_updates: ExpertUpdates,
}

impl TrainingConfig {
    /// The main job's default: a 4-block LM (d_model 128, seq_len 128) with PEER in the middle
    /// block (N = 128² experts, 4 heads × top-8, key_dim 64, BatchNorm queries, one key set per
    /// head, cosine scoring, expert balance loss 0.1: [`PeerConfig`]'s defaults) and dense GELU
    /// feed-forwards (hidden 512) elsewhere. Sized to train (8 × 120 steps of 2,048 tokens) in about ten minutes on 2 cores.
    pub fn small_peer() -> Self {
        let d_model = 128;
        let peer = PeerConfig::new(d_model, 128 * 128)
            .with_heads(4)
            .with_top_k(8)
            .with_key_dim(64)
            .with_query_norm(QueryNorm::BatchNorm);
        let model =
            TransformerConfig::dense(2048, d_model, 4, 4, 128, 512).with_middle_block(FeedForwardConfig::Peer(peer));
        Self::new(model)
    }

    /// The number of optimizer steps of the whole run.
    pub fn total_steps(&self) -> usize {
        self.epochs * self.steps_per_epoch
    }

    /// The seed of the data sampler: `data_seed`, or `seed` where it is not set.
    pub fn data_order_seed(&self) -> u64 {
        self.data_seed.unwrap_or(self.seed)
    }

    /// Warm-up steps actually used: `warmup_steps`, at most a fifth of the run, at least 1.
    pub fn effective_warmup(&self) -> usize {
        self.warmup_steps.min(self.total_steps() / 5).max(1)
    }

    /// Checks every field, naming the one at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("batch_size", self.batch_size),
            ("steps_per_epoch", self.steps_per_epoch),
            ("epochs", self.epochs),
            ("max_validation_windows", self.max_validation_windows),
            ("num_workers", self.num_workers),
        ] {
            if value == 0 {
                return Err(ConfigError::new(field, "must be at least 1, got 0"));
            }
        }
        if self.vocab_size < 260 {
            return Err(ConfigError::new(
                "vocab_size",
                format!("must be at least 260 (256 bytes plus merges), got {}", self.vocab_size),
            ));
        }
        for (field, value) in [
            ("learning_rate", self.learning_rate),
            ("expert_learning_rate", self.expert_learning_rate),
            ("grad_clip_norm", self.grad_clip_norm),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(ConfigError::new(field, format!("must be finite and positive, got {value}")));
            }
        }
        for (field, value) in [("weight_decay", Some(self.weight_decay)), ("key_weight_decay", self.key_weight_decay)] {
            if let Some(value) = value
                && !(value.is_finite() && value >= 0.0)
            {
                return Err(ConfigError::new(field, format!("must be finite and non-negative, got {value}")));
            }
        }
        self.model.validate().map_err(|e| ConfigError::new("model", format!("`{}` {}", e.field, e.rule)))
    }
}

/// Tokenized data of a run.
pub struct PreparedData {
    /// Training tokens.
    pub train: Arc<Vec<u32>>,
    /// Validation tokens.
    pub validation: Arc<Vec<u32>>,
}

impl PreparedData {
    /// Tokenizes both splits and checks that each holds at least one window.
    pub fn new(corpus: &Corpus, tokenizer: &TextTokenizer, seq_len: usize) -> Result<Self, TrainError> {
        let train = tokenizer.encode_documents(&corpus.train)?;
        let validation = tokenizer.encode_documents(&corpus.validation)?;
        for (split, tokens) in [("train", &train), ("validation", &validation)] {
            if tokens.len() <= seq_len {
                return Err(TrainError::CorpusTooShort { split, tokens: tokens.len(), needed: seq_len + 1 });
            }
        }
        Ok(Self { train: Arc::new(train), validation: Arc::new(validation) })
    }

    /// Evenly spaced validation windows, at most `max` of them.
    pub fn validation_windows(&self, seq_len: usize, max: usize) -> TokenWindows {
        let available = self.validation.len() - seq_len;
        let stride = (available / max).max(seq_len).max(1);
        TokenWindows::new(self.validation.clone(), seq_len, stride).expect("checked in new")
    }
}

/// What a finished training run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Where the final model directory was written.
    pub model_dir: PathBuf,
    /// Optimizer steps taken in total.
    pub steps: usize,
    /// Validation results of the final model.
    pub evaluation: Evaluation,
}

/// Options of [`train`] that are not part of the model's recipe.
pub struct TrainOptions<'a> {
    /// The recipe.
    pub config: TrainingConfig,
    /// The data.
    pub corpus: &'a Corpus,
    /// The tokenizer.
    pub tokenizer: &'a TextTokenizer,
    /// Where to train: any device; its autodiff version is used.
    pub device: Device,
    /// Run directory: `run.json`, `checkpoint/`, metric logs, `model/` at the end.
    pub artifact_dir: PathBuf,
    /// Continue from the newest complete checkpoint in `artifact_dir`.
    pub resume: bool,
    /// Write a checkpoint of the model, optimizer and schedule after every epoch (the last two
    /// are kept), so that a killed run can continue with `resume`. Turn it off only where a
    /// killed run is started again from scratch, as `bench models` does: a checkpoint is about
    /// 12 bytes per parameter (3.2 GB for a million-expert model) and writing it slows the next
    /// epoch. With `resume` and no checkpoints, the run continues from the newest checkpoint it
    /// finds and writes no new ones.
    pub checkpoints: bool,
}

/// What `run.json` records so `--resume` continues the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunRecord {
    config: serde_json::Value,
    tokenizer: peer_model::checkpoint::TokenizerRef,
}

/// Trains a language model with Burn's learner; see [`TrainOptions`].
pub fn train(options: TrainOptions<'_>) -> Result<TrainSummary, TrainError> {
    let TrainOptions { mut config, corpus, tokenizer, device, artifact_dir, resume, checkpoints } = options;
    config.model.vocab_size = tokenizer.vocab_size();
    config.validate().map_err(|source| TrainError::Config { context: "training configuration".into(), source })?;
    let checkpoint_dir = artifact_dir.join("checkpoint");
    let run_file = artifact_dir.join("run.json");

    let resume_epoch = if resume {
        let text = std::fs::read_to_string(&run_file).map_err(|_| TrainError::NothingToResume(artifact_dir.clone()))?;
        let record: RunRecord = serde_json::from_str(&text).map_err(|e| TrainError::ConfigFile {
            path: run_file.clone(),
            what: "run record",
            reason: e.to_string(),
        })?;
        let meta = CheckpointMeta { tokenizer: Some(record.tokenizer), ..Default::default() };
        tokenizer.check_matches(&meta, &artifact_dir)?;
        // The run continues with the recipe it started with.
        // A run recorded before `expert_updates` existed trained its tables densely, and its
        // checkpoints hold no lazy AdamW state: continue it that way.
        config = training_config_from_json(record.config, ExpertUpdates::Dense).map_err(|e| {
            TrainError::ConfigFile { path: run_file.clone(), what: "training configuration", reason: e.to_string() }
        })?;
        Some(
            last_complete_checkpoint(&checkpoint_dir)
                .ok_or_else(|| TrainError::NothingToResume(artifact_dir.clone()))?,
        )
    } else {
        // A fresh run in an old run's directory: its checkpoints and metric logs would mix
        // with this run's (Burn's summary reads every epoch's log it finds).
        for stale in [checkpoint_dir.clone(), artifact_dir.join("train"), artifact_dir.join("valid")] {
            if stale.exists() {
                std::fs::remove_dir_all(&stale).map_err(io("remove", &stale))?;
            }
        }
        std::fs::create_dir_all(&artifact_dir).map_err(io("create", &artifact_dir))?;
        let record = RunRecord {
            config: serde_json::to_value(&config).expect("config serialises"),
            tokenizer: tokenizer.reference(),
        };
        write_atomic(&run_file, serde_json::to_string_pretty(&record).expect("serialises").as_bytes())?;
        None
    };

    let seq_len = config.model.max_seq_len;
    let data = PreparedData::new(corpus, tokenizer, seq_len)?;
    let train_windows = TokenWindows::new(data.train.clone(), seq_len, seq_len).expect("checked");
    let train_set = SamplerDataset::new(
        train_windows,
        SamplerDatasetOptions::from(config.steps_per_epoch * config.batch_size).with_seed(config.data_order_seed()),
    );
    let valid_set = data.validation_windows(seq_len, config.max_validation_windows);
    let loader_train = DataLoaderBuilder::new(LmBatcher)
        .batch_size(config.batch_size)
        .num_workers(config.num_workers)
        .build(train_set);
    let loader_valid = DataLoaderBuilder::new(LmBatcher)
        .batch_size(config.batch_size)
        .num_workers(config.num_workers)
        .build(valid_set);

    let train_device = device.clone().autodiff();
    train_device.seed(config.seed);
    let model = LanguageModel::new(config.model.init(&train_device), config.expert_updates, config.grad_clip_norm);
    let has_experts = has_routed_blocks(&config.model);

    // Expert tables: their own AdamW (no weight decay) and their own learning rate.
    let experts = ParamGroup::from_regex(r"(experts\.(down|up)(\.[0-9]+)?|\.values)$").expect("valid regex");
    let clip = Some(GradientClippingConfig::Norm(config.grad_clip_norm as f32));
    let mut optim = AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        .with_grad_clipping(clip.clone())
        .init()
        .with_group(experts.clone(), AdamWConfig::new().with_weight_decay(0.0).build(), clip.clone().map(|c| c.init()));
    // The sub-keys get their own AdamW only when their decay differs, so the optimizer state of
    // a run written before the option existed resumes unchanged.
    if let Some(decay) = config.key_weight_decay.filter(|&d| d != config.weight_decay) {
        let sub_keys = ParamGroup::from_regex(r"sub_keys$").expect("valid regex");
        optim = optim.with_group(
            sub_keys,
            AdamWConfig::new().with_weight_decay(decay as f32).build(),
            clip.map(|c| c.init()),
        );
    }
    let warmup = config.effective_warmup();
    let schedule = |peak: f64| {
        LrSchedulerConfig::Sequential(SequentialLrSchedulerConfig::new(
            vec![
                LrSchedulerConfig::Linear(LinearLrSchedulerConfig::new(peak * 0.01, peak, warmup)),
                LrSchedulerConfig::Cosine(
                    CosineAnnealingLrSchedulerConfig::new(peak, (config.total_steps() - warmup).max(1))
                        .with_min_lr(peak * 0.1),
                ),
            ],
            vec![warmup],
        ))
    };
    let lr_scheduler = ModuleLrSchedulerConfig::new(schedule(config.learning_rate))
        .with_group(experts, schedule(config.expert_learning_rate))
        .init()
        .map_err(|e| TrainError::Training(format!("learning-rate schedule: {e}")))?;

    let mut training = SupervisedTraining::new(&artifact_dir, loader_train, loader_valid)
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .metric_train_numeric(PerplexityMetric::new())
        .metric_valid_numeric(PerplexityMetric::new())
        .metric_train_numeric(LearningRateMetric::new())
        .metric_train_numeric(TokensPerSecondMetric::default())
        .num_epochs(config.epochs)
        .summary();
    if checkpoints {
        training = training
            .with_custom_checkpointers(
                AtomicFileCheckpointer::new(&checkpoint_dir, "model"),
                AtomicFileCheckpointer::new(&checkpoint_dir, "optim"),
                AtomicFileCheckpointer::new(&checkpoint_dir, "scheduler"),
            )
            .with_checkpointing_strategy(KeepLastNCheckpoints::new(2));
    }
    if has_experts {
        for statistic in [RoutingStatistic::Usage, RoutingStatistic::Unevenness, RoutingStatistic::TopShare] {
            training = training
                .metric_train_numeric(ExpertUsageMetric::new(statistic))
                .metric_valid_numeric(ExpertUsageMetric::new(statistic));
        }
    }
    if !std::io::stdout().is_terminal() {
        training = training.renderer(Box::new(LineRenderer::default()));
    }
    let guard = LossGuard::new(training.interrupter());
    training = training.metric_train(guard.clone());
    if let Some(epoch) = resume_epoch {
        training = training.checkpoint(epoch);
    }

    let result = training.launch(Learner::new(model, optim, lr_scheduler));
    if let Some(reason) = guard.tripped() {
        return Err(TrainError::NonFiniteLoss {
            reason,
            last_good_epoch: last_complete_checkpoint(&checkpoint_dir),
            dir: checkpoint_dir,
        });
    }
    if let Some(error) = result.error {
        return Err(TrainError::Training(error.to_string()));
    }
    let completed =
        if checkpoints { last_complete_checkpoint(&checkpoint_dir).unwrap_or(config.epochs) } else { config.epochs };
    let transformer = result.model.transformer.valid();

    let model_dir = artifact_dir.join("model");
    let meta = CheckpointMeta {
        tokenizer: Some(tokenizer.reference()),
        step: completed * config.steps_per_epoch,
        notes: format!("trained on {}", corpus.path.display()),
    };
    save_model(&model_dir, &config.model, &transformer, &meta)?;
    // The final evaluation covers the whole validation split.
    let evaluation = evaluate(&transformer, &data, seq_len, config.batch_size, None, &device)?;
    write_atomic(
        &artifact_dir.join("evaluation.json"),
        serde_json::to_string_pretty(&evaluation).expect("serialises").as_bytes(),
    )?;
    Ok(TrainSummary { model_dir, steps: meta.step, evaluation })
}

/// Whether any block retrieves experts (PEER or PKM), i.e. has routing statistics to report.
fn has_routed_blocks(config: &TransformerConfig) -> bool {
    (0..config.num_layers)
        .any(|b| matches!(config.feed_forward_of(b), FeedForwardConfig::Peer(_) | FeedForwardConfig::Pkm(_)))
}

/// Validation results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    /// Perplexity of the model on the validation windows.
    pub perplexity: f64,
    /// Perplexity of a unigram model of the same tokenizer (add-one smoothed training counts)
    /// on the same tokens: the baseline the model must beat.
    pub unigram_perplexity: f64,
    /// Tokens evaluated.
    pub tokens: usize,
    /// The routing diagnostics of each PEER/PKM block, in block order.
    pub routing: Vec<BlockDiagnostics>,
}

/// The routing of one PEER or PKM block over the evaluated tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockDiagnostics {
    /// Block index.
    pub block: usize,
    /// Usage against its uniform ceiling, unevenness, top-1% share, sub-keys, key norms.
    pub report: RoutingReport,
    /// The sorted expert load at about 200 log-spaced ranks: `(rank, selections)`, rank 1 the
    /// busiest expert; ranks of unused experts are left out (a log axis has no zero).
    pub load_curve: Vec<(f64, f64)>,
    /// What the [`FREQUENT_TOKENS`] most frequent input tokens contribute to the load (absent
    /// in evaluations written before it was measured).
    #[serde(default)]
    pub frequent_tokens: Option<FrequentTokens>,
}

/// How many of the most frequent input tokens the evaluation attributes load to.
pub const FREQUENT_TOKENS: usize = 10;

impl Evaluation {
    /// Draws the sorted expert load of every block (log–log) as `<dir>/expert_load.png`; see
    /// [`crate::charts`] for when that is not possible.
    pub fn draw_load_chart(&self, dir: &Path) -> Result<Vec<PathBuf>, String> {
        if self.routing.is_empty() {
            return Ok(Vec::new());
        }
        let mut series: Vec<ChartSeries> = self
            .routing
            .iter()
            .map(|b| ChartSeries {
                label: format!("block {} (N = {})", b.block, b.report.num_experts),
                points: b.load_curve.clone(),
            })
            .collect();
        // What every expert would get if the selections were spread evenly.
        for b in &self.routing {
            let uniform = b.report.selections as f64 / b.report.num_experts as f64;
            series.push(ChartSeries {
                label: format!("block {}: even load ({uniform:.1})", b.block),
                points: vec![(1.0, uniform), (b.report.num_experts as f64, uniform)],
            });
        }
        let chart = Chart::lines(
            "expert_load.png",
            "Sorted expert load on the validation tokens",
            "expert rank",
            "selections",
            true,
            series,
        )
        .with_log_y();
        try_draw_charts(dir, "expert_load", &[chart])
    }
}

/// `(rank, load)` of the positive entries of a descending `load` at about 200 log-spaced ranks,
/// the first and the last used rank included.
pub fn load_curve(load: &[u64]) -> Vec<(f64, f64)> {
    let used = load.iter().take_while(|&&c| c > 0).count();
    let mut ranks: Vec<usize> = (0..=200).map(|i| (used as f64).powf(i as f64 / 200.0).round() as usize).collect();
    ranks.retain(|&r| r >= 1 && r <= used);
    ranks.dedup();
    ranks.into_iter().map(|r| (r as f64, load[r - 1] as f64)).collect()
}

/// Perplexity, unigram baseline and routing diagnostics of `model` on the validation split
/// (all of it, or at most `max_windows` evenly spaced windows), on a plain (non-autodiff)
/// device in evaluation mode, so BatchNorm uses its running statistics.
pub fn evaluate(
    model: &Transformer,
    data: &PreparedData,
    seq_len: usize,
    batch_size: usize,
    max_windows: Option<usize>,
    device: &Device,
) -> Result<Evaluation, TrainError> {
    let model = model.valid().fork(&device.clone().without_autodiff());
    let windows = data.validation_windows(seq_len, max_windows.unwrap_or(usize::MAX));
    let loader = DataLoaderBuilder::new(LmBatcher).batch_size(batch_size).build(windows);
    let loader = loader.to_device(&device.clone().without_autodiff());
    let mut nll = 0.0;
    let mut tokens = 0usize;
    // Per routed block, in order of first sight: its load, and the same selections by input token.
    let mut blocks: Vec<(usize, (ExpertUsage, TokenLoad))> = Vec::new();
    let mut target_ids: Vec<u32> = Vec::new();
    for batch in loader.iter() {
        let batch = batch.map_err(|e| TrainError::Training(format!("validation data: {e}")))?;
        let [b, s] = batch.targets.dims();
        let inputs: Vec<u32> = batch.inputs.to_data().iter::<i64>().map(|t| t as u32).collect();
        let (_, cross_entropy, output) = model.loss(batch.inputs, batch.targets.clone());
        nll += cross_entropy.into_scalar::<f64>() * (b * s) as f64;
        tokens += b * s;
        target_ids.extend(batch.targets.to_data().iter::<i64>().map(|t| t as u32));
        for routing in &output.routings {
            let n = routing.num_experts;
            let (usage, load) = block_entry(&mut blocks, routing.block, || (ExpertUsage::new(n), TokenLoad::new(n)));
            // One readback serves both accumulators.
            let host = routing.routing.to_host();
            usage.add_host_routing(&host);
            load.add_host_routing(&inputs, &host);
        }
    }
    let routing = blocks
        .iter()
        .map(|(block, (usage, load))| BlockDiagnostics {
            block: *block,
            report: RoutingReport::new(usage, model.product_keys(*block)),
            load_curve: load_curve(&usage.sorted_load()),
            frequent_tokens: Some(load.frequent_tokens(FREQUENT_TOKENS)),
        })
        .collect();
    Ok(Evaluation {
        perplexity: (nll / tokens.max(1) as f64).exp(),
        unigram_perplexity: unigram_perplexity(&data.train, &target_ids, model.vocab_size()),
        tokens,
        routing,
    })
}

/// Perplexity on `evaluated` of the add-one smoothed unigram distribution of `train`.
pub fn unigram_perplexity(train: &[u32], evaluated: &[u32], vocab_size: usize) -> f64 {
    let mut counts = vec![1.0f64; vocab_size];
    for &t in train {
        counts[t as usize] += 1.0;
    }
    let total: f64 = counts.iter().sum();
    let nll: f64 = evaluated.iter().map(|&t| -(counts[t as usize] / total).ln()).sum();
    (nll / evaluated.len().max(1) as f64).exp()
}

/// Reads a [`TrainingConfig`] from a JSON file, naming the file and the problem.
pub fn load_training_config(path: &Path) -> Result<TrainingConfig, TrainError> {
    if !path.exists() {
        return Err(TrainError::ConfigFile {
            path: path.to_path_buf(),
            what: "training configuration",
            reason: "file does not exist".into(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(io("read", path))?;
    let invalid = |e: serde_json::Error| TrainError::ConfigFile {
        path: path.to_path_buf(),
        what: "training configuration",
        reason: e.to_string(),
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(invalid)?;
    training_config_from_json(value, ExpertUpdates::default()).map_err(invalid)
}

/// A training configuration from JSON. Burn's `Config` derive requires every field; a file
/// written before `expert_updates` existed gets `updates`, and its PEER/PKM layers the values
/// of the fields they gained later that reproduce them (see [`peer_model::complete_legacy_json`]).
fn training_config_from_json(
    mut value: serde_json::Value,
    updates: ExpertUpdates,
) -> Result<TrainingConfig, serde_json::Error> {
    if let Some(fields) = value.as_object_mut() {
        fields.entry("expert_updates").or_insert_with(|| serde_json::json!(updates));
    }
    peer_model::complete_legacy_json(&mut value);
    serde_json::from_value(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_order_follows_seed_unless_data_seed_is_set() {
        let mut config = TrainingConfig::small_peer();
        config.seed = 7;
        assert_eq!(config.data_order_seed(), 7);
        config.data_seed = Some(9);
        assert_eq!((config.seed, config.data_order_seed()), (7, 9));
        // A configuration written before the field existed keeps one seed for both.
        let mut old = serde_json::to_value(TrainingConfig::small_peer()).unwrap();
        assert!(old.as_object_mut().unwrap().remove("data_seed").is_some());
        let old = training_config_from_json(old, ExpertUpdates::Sparse).unwrap();
        assert_eq!((old.data_seed, old.data_order_seed()), (None, 42));
    }

    /// A tiny PEER LM trained for 2 × 4 steps on `corpus`, with or without checkpoints.
    fn train_tiny(
        corpus: &Corpus,
        tokenizer: &TextTokenizer,
        artifact_dir: PathBuf,
        checkpoints: bool,
    ) -> TrainSummary {
        let peer = PeerConfig::new(32, 64).with_heads(2).with_top_k(4).with_key_dim(16);
        let model = TransformerConfig::dense(300, 32, 2, 2, 32, 64).with_middle_block(FeedForwardConfig::Peer(peer));
        let mut config = TrainingConfig::new(model);
        config.vocab_size = 300;
        config.batch_size = 2;
        config.epochs = 2;
        config.steps_per_epoch = 4;
        config.warmup_steps = 1;
        config.max_validation_windows = 2;
        let options = TrainOptions {
            config,
            corpus,
            tokenizer,
            device: Device::flex(),
            artifact_dir,
            resume: false,
            checkpoints,
        };
        train(options).unwrap()
    }

    #[test]
    fn checkpoints_are_written_only_when_asked_for() {
        let dir = std::env::temp_dir().join(format!("peer-train-checkpoints-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // One book, so the tokenizer trains in a blink (once, for both runs).
        let corpus_dir = dir.join("corpus");
        std::fs::create_dir_all(&corpus_dir).unwrap();
        std::fs::copy(crate::corpus::bundled_corpus().join("08-ruth.txt"), corpus_dir.join("08-ruth.txt")).unwrap();
        let corpus = Corpus::load(&corpus_dir).unwrap();
        let tokenizer = TextTokenizer::for_corpus(&corpus, 300).unwrap();

        let summary = train_tiny(&corpus, &tokenizer, dir.join("with"), true);
        assert_eq!(last_complete_checkpoint(&dir.join("with/checkpoint")), Some(2), "a checkpoint of the last epoch");
        assert_eq!(summary.steps, 8);

        let summary = train_tiny(&corpus, &tokenizer, dir.join("without"), false);
        assert!(!dir.join("without/checkpoint").exists(), "no checkpoint folder");
        assert_eq!(summary.steps, 8, "the step count does not come from a checkpoint");
        assert!(summary.model_dir.join("model.bpk").exists() && summary.evaluation.perplexity.is_finite());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_curve_samples_used_ranks_on_a_log_scale() {
        let load: Vec<u64> = (0..1000u64).rev().chain([0, 0, 0]).collect(); // 999, 998, …, 0, then unused
        let curve = load_curve(&load);
        assert_eq!(curve.first(), Some(&(1.0, 999.0)));
        assert_eq!(curve.last(), Some(&(999.0, 1.0)), "the last used rank; unused experts left out");
        assert!(curve.windows(2).all(|w| w[1].0 > w[0].0), "ranks increase");
        assert!((100..=201).contains(&curve.len()), "{} points", curve.len());
        for &(rank, value) in &curve {
            assert_eq!(value, load[rank as usize - 1] as f64);
        }
        assert!(load_curve(&[0, 0]).is_empty());
    }
}
