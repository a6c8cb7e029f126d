//! The `peer` command-line program.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, DeviceKind};
use clap::{Args, Parser, Subcommand, ValueEnum};
use peer_core::{DenseFfwConfig, MoeConfig, MoeRouting, PkmConfig};
use peer_model::checkpoint::{load_config, load_model, write_atomic};
use peer_model::{FeedForwardConfig, SamplingConfig};

use crate::corpus::{Corpus, bundled_corpus};
use crate::error::TrainError;
use crate::learner::ExpertUpdates;
use crate::tokenizer::TextTokenizer;
use crate::training::{Evaluation, PreparedData, TrainOptions, TrainingConfig, evaluate, load_training_config, train};

/// Train, evaluate and sample PEER (Mixture of A Million Experts) language models with Burn.
///
/// Without a subcommand, `peer` runs `peer train` with its defaults: a small PEER LM trained on
/// the bundled World English Bible on the CPU.
#[derive(Parser, Debug)]
#[command(name = "peer", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a language model (default: PEER in the middle block) and print a sample.
    Train(TrainArgs),
    /// Validation perplexity and expert usage of a trained model.
    Eval(EvalArgs),
    /// Continue a prompt with a trained model.
    Generate(GenerateArgs),
    /// Parameters, active parameters and FLOPs per token of a configuration.
    Info(InfoArgs),
}

/// `--expert-updates`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ExpertUpdatesArg {
    /// Only the rows retrieved in a step (lazy AdamW).
    Sparse,
    /// Every row (autodiff + AdamW).
    Dense,
}

/// `--ffn`: what the PEER block of the configuration becomes.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum FfnArg {
    /// The PEER block as configured.
    Peer,
    /// A dense GELU feed-forward whose hidden width gives the PEER block's FLOPs per token.
    Dense,
    /// A mixture of 16 experts (expert-choice routing) sized to the PEER block's FLOPs.
    Moe,
    /// A product-key memory with the PEER block's N, heads and top-k, its key dimension sized to
    /// the PEER block's FLOPs.
    Pkm,
}

/// Where tensors live.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// Burn's pure-Rust CPU backend (recommended on CPU).
    Flex,
    /// The NdArray CPU backend (deprecated in Burn 0.22).
    Ndarray,
    /// wgpu: the best GPU adapter (Vulkan, Metal, DX12), or a CPU Vulkan driver.
    Wgpu,
    /// CUDA (needs a build with Burn's `cuda` feature).
    Cuda,
}

impl DeviceChoice {
    /// The Burn device, or why it cannot be used in this build.
    pub fn device(self) -> Result<Device, TrainError> {
        match self {
            Self::Flex => Ok(Device::flex()),
            #[allow(deprecated)]
            Self::Ndarray => Ok(Device::ndarray()),
            Self::Wgpu => {
                let device = Device::wgpu(DeviceKind::DefaultDevice);
                // Without an adapter Burn panics in the first op; say so here instead, without
                // the panic's own report.
                let hook = std::panic::take_hook();
                std::panic::set_hook(Box::new(|_| {}));
                let works = peer_core::device_works(&device);
                std::panic::set_hook(hook);
                if !works {
                    return Err(TrainError::Device(
                        "device `wgpu` found no working adapter on this machine (it needs a Vulkan, Metal or DX12 \
                         driver; on Debian `apt-get install mesa-vulkan-drivers libvulkan1` adds a CPU one); \
                         use --device flex"
                            .into(),
                    ));
                }
                Ok(device)
            }
            Self::Cuda => Err(TrainError::Device(
                "device `cuda` is not compiled into this build (Burn's `cuda` feature); available: flex, ndarray, wgpu"
                    .into(),
            )),
        }
    }
}

#[derive(Args, Debug)]
struct DataArgs {
    /// A text file or a folder of .txt files [default: the bundled World English Bible].
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// A Hugging Face tokenizer.json to use instead of training a BPE on the corpus.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Where to run.
    #[arg(long, value_enum, default_value = "flex")]
    device: DeviceChoice,
}

#[derive(Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    data: DataArgs,
    /// A training configuration (JSON, the fields of `TrainingConfig`) [default: the small PEER LM].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run directory: checkpoints, metric logs, the final model in `<out>/model`.
    #[arg(long, default_value = "runs/peer")]
    out: PathBuf,
    /// Continue the run in `--out` from its newest complete checkpoint.
    #[arg(long)]
    resume: bool,
    /// Override: epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Override: optimizer steps per epoch (checkpoint interval).
    #[arg(long)]
    steps_per_epoch: Option<usize>,
    /// Override: sequences per batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Override: BPE vocabulary size.
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Override: seed (initialisation, and the data order unless `--data-seed` is given).
    #[arg(long)]
    seed: Option<u64>,
    /// Override: seed of the data order alone.
    #[arg(long)]
    data_seed: Option<u64>,
    /// Override: how PEER expert tables are trained (`sparse`: only the retrieved rows, lazy
    /// AdamW; `dense`: autodiff and AdamW over every row).
    #[arg(long, value_enum)]
    expert_updates: Option<ExpertUpdatesArg>,
    /// The feed-forward of the PEER block(s): `peer` as configured, or a `dense`, `moe` or
    /// `pkm` layer of the same FLOPs per token (as `cargo xtask bench models` compares them).
    /// Applied after `--num-experts`, `--heads` and `--top-k`.
    #[arg(long, value_enum)]
    ffn: Option<FfnArg>,
    /// Override: experts N of the PEER block(s) (a perfect square).
    #[arg(long)]
    num_experts: Option<usize>,
    /// Override: retrieval heads h of the PEER block(s).
    #[arg(long)]
    heads: Option<usize>,
    /// Override: experts per head k of the PEER block(s) (at most √N).
    #[arg(long)]
    top_k: Option<usize>,
    /// Prompt of the sample printed after training.
    #[arg(long, default_value = "In the beginning")]
    prompt: String,
    /// Print the training configuration (JSON, with the overrides applied: a starting point for
    /// `--config`) and exit without training.
    #[arg(long)]
    print_config: bool,
}

#[derive(Args, Debug)]
struct EvalArgs {
    #[command(flatten)]
    data: DataArgs,
    /// A model directory written by `peer train` (`<out>/model`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Sequences per batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// At most this many validation windows (evenly spaced) [default: the whole split].
    #[arg(long)]
    max_windows: Option<usize>,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// A model directory written by `peer train`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The tokenizer [default: the one recorded in the checkpoint].
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Where to run.
    #[arg(long, value_enum, default_value = "flex")]
    device: DeviceChoice,
    /// Text to continue.
    #[arg(long, default_value = "In the beginning")]
    prompt: String,
    /// New tokens (clamped to the model's context).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Always take the most likely token.
    #[arg(long)]
    greedy: bool,
    /// Sampling temperature (> 0).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample among the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value = "0.95")]
    top_p: Option<f64>,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args, Debug)]
struct InfoArgs {
    /// A training configuration (JSON) or a model directory [default: the small PEER LM].
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Parses the arguments and runs the command; errors are one line for the user.
pub fn run(cli: Cli) -> Result<(), TrainError> {
    match cli.command.unwrap_or_else(|| Command::Train(TrainArgs::parse_from(["train"]))) {
        Command::Train(args) => run_train(args),
        Command::Eval(args) => run_eval(args),
        Command::Generate(args) => run_generate(args),
        Command::Info(args) => run_info(args),
    }
}

impl TrainArgs {
    fn parse_from<I: IntoIterator<Item = &'static str>>(args: I) -> Self {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: TrainArgs,
        }
        Wrapper::parse_from(args).args
    }
}

fn load_data(data: &DataArgs, vocab_size: usize) -> Result<(Corpus, TextTokenizer), TrainError> {
    let path = data.corpus.clone().unwrap_or_else(bundled_corpus);
    let corpus = Corpus::load(&path)?;
    let tokenizer = match &data.tokenizer {
        Some(file) => TextTokenizer::from_file(file)?,
        None => TextTokenizer::for_corpus(&corpus, vocab_size)?,
    };
    Ok((corpus, tokenizer))
}

fn run_train(args: TrainArgs) -> Result<(), TrainError> {
    let mut config = match &args.config {
        Some(path) => load_training_config(path)?,
        None => TrainingConfig::small_peer(),
    };
    if let Some(v) = args.epochs {
        config.epochs = v;
    }
    if let Some(v) = args.steps_per_epoch {
        config.steps_per_epoch = v;
    }
    if let Some(v) = args.batch_size {
        config.batch_size = v;
    }
    if let Some(v) = args.vocab_size {
        config.vocab_size = v;
    }
    if let Some(v) = args.seed {
        config.seed = v;
    }
    if let Some(v) = args.data_seed {
        config.data_seed = Some(v);
    }
    if let Some(v) = args.expert_updates {
        config.expert_updates = match v {
            ExpertUpdatesArg::Sparse => ExpertUpdates::Sparse,
            ExpertUpdatesArg::Dense => ExpertUpdates::Dense,
        };
    }
    apply_layer_overrides(&mut config, &args)?;
    if args.print_config {
        println!("{}", serde_json::to_string_pretty(&config).expect("configurations serialise"));
        return Ok(());
    }
    let device = args.data.device.device()?;
    let (corpus, tokenizer) = load_data(&args.data, config.vocab_size)?;
    println!(
        "corpus {} ({} training, {} validation documents); tokenizer {} ({} tokens); device {:?}",
        corpus.path.display(),
        corpus.train.len(),
        corpus.validation.len(),
        tokenizer.path.display(),
        tokenizer.vocab_size(),
        args.data.device
    );
    let mut shown = config.clone();
    shown.model.vocab_size = tokenizer.vocab_size();
    let cost = shown.model.cost();
    println!(
        "model: {} parameters, {} active per token, {:.2} MFLOPs per token (forward); {} steps of {} × {} tokens",
        cost.params,
        cost.active_params,
        cost.forward_flops_per_token / 1e6,
        config.total_steps(),
        config.batch_size,
        config.model.max_seq_len
    );
    let summary = train(TrainOptions {
        config,
        corpus: &corpus,
        tokenizer: &tokenizer,
        device: device.clone(),
        artifact_dir: args.out.clone(),
        resume: args.resume,
        checkpoints: true,
    })?;
    print_evaluation(&summary.evaluation, &args.out, &tokenizer);
    println!("model saved to {}", summary.model_dir.display());
    let (_, model, _) = load_model(&summary.model_dir, &device)?;
    let sampling = SamplingConfig::new().with_temperature(0.8).with_top_p(Some(0.95)).with_seed(0);
    print_sample(&model, &tokenizer, &args.prompt, 64, &sampling)
}

/// `--num-experts`, `--heads`, `--top-k` on every PEER block, then `--ffn`.
fn apply_layer_overrides(config: &mut TrainingConfig, args: &TrainArgs) -> Result<(), TrainError> {
    let error = |field: &'static str, message: String| TrainError::Config {
        context: "command line".into(),
        source: peer_core::ConfigError::new(field, message),
    };
    let model = &mut config.model;
    let mut peers: Vec<&mut peer_core::PeerConfig> = model
        .block_feed_forward
        .iter_mut()
        .map(|b| &mut b.feed_forward)
        .chain(std::iter::once(&mut model.feed_forward))
        .filter_map(|f| match f {
            FeedForwardConfig::Peer(peer) => Some(peer),
            _ => None,
        })
        .collect();
    let sizes = [("--num-experts", args.num_experts), ("--heads", args.heads), ("--top-k", args.top_k)];
    let ffn = args.ffn.filter(|f| *f != FfnArg::Peer);
    if peers.is_empty() {
        let named = sizes.iter().find(|(_, v)| v.is_some()).map(|(f, _)| *f).or(ffn.map(|_| "--ffn"));
        if let Some(flag) = named {
            return Err(error(flag, "the configuration has no PEER block to apply it to".into()));
        }
        return Ok(());
    }
    for peer in peers.iter_mut() {
        if let Some(n) = args.num_experts {
            peer.num_experts = n;
        }
        if let Some(h) = args.heads {
            peer.heads = h;
        }
        if let Some(k) = args.top_k {
            peer.top_k = k;
        }
        peer.validate().map_err(|source| TrainError::Config { context: "command line".into(), source })?;
    }
    let Some(ffn) = ffn else { return Ok(()) };
    let peer = peers[0].clone();
    if model.block_feed_forward.is_empty() || matches!(model.feed_forward, FeedForwardConfig::Peer(_)) {
        return Err(error(
            "--ffn",
            "needs a configuration whose PEER layers are block overrides (as the default's middle block)".into(),
        ));
    }
    let template = match ffn {
        FfnArg::Dense => FeedForwardConfig::Dense(DenseFfwConfig::new(model.d_model, 1)),
        FfnArg::Moe => {
            FeedForwardConfig::Moe(MoeConfig::new(model.d_model, 16, 1).with_routing(MoeRouting::ExpertChoice))
        }
        FfnArg::Pkm => FeedForwardConfig::Pkm(
            PkmConfig::new(model.d_model, peer.num_experts).with_heads(peer.heads).with_top_k(peer.top_k),
        ),
        FfnArg::Peer => unreachable!("filtered above"),
    };
    *model = model.flop_matched(&template).map_err(|source| TrainError::Config { context: "--ffn".into(), source })?;
    Ok(())
}

/// Prints the evaluation and draws the expert-load chart into `dir`.
fn print_evaluation(e: &Evaluation, dir: &Path, tokenizer: &TextTokenizer) {
    println!(
        "validation perplexity {:.2} (unigram baseline {:.2}, {:.1}× lower) over {} tokens",
        e.perplexity,
        e.unigram_perplexity,
        e.unigram_perplexity / e.perplexity,
        e.tokens
    );
    for block in &e.routing {
        for (i, line) in block.report.to_string().lines().enumerate() {
            println!("{}{line}", if i == 0 { format!("block {}: ", block.block) } else { "  ".into() });
        }
        if let Some(f) = &block.frequent_tokens {
            let shown: Vec<String> = f
                .tokens
                .iter()
                .zip(&f.position_shares)
                .zip(&f.distinct_experts)
                .map(|((&t, share), experts)| {
                    let text = tokenizer.decode(&[t]).unwrap_or_else(|_| format!("#{t}"));
                    format!("{text:?} {:.1}% ({experts} experts)", 100.0 * share)
                })
                .collect();
            println!(
                "  the {} most frequent input tokens ({:.1}% of positions) made {:.1}% of the top 1% experts' \
                 selections; at the other positions the top 1% take {:.1}%",
                f.tokens.len(),
                100.0 * f.position_shares.iter().sum::<f64>(),
                100.0 * f.top_1_percent_share_from_them,
                100.0 * f.top_1_percent_share_without_them
            );
            println!("  they are: {}", shown.join(", "));
        }
    }
    match e.draw_load_chart(dir) {
        Ok(paths) => paths.iter().for_each(|p| println!("expert load chart: {}", p.display())),
        Err(why) => eprintln!("expert load chart not drawn: {why}"),
    }
}

fn print_sample(
    model: &peer_model::Transformer,
    tokenizer: &TextTokenizer,
    prompt: &str,
    max_tokens: usize,
    sampling: &SamplingConfig,
) -> Result<(), TrainError> {
    let ids = tokenizer.encode(prompt)?;
    let room = model.max_seq_len().saturating_sub(ids.len());
    let new = model.generate(&ids, max_tokens.min(room), sampling)?;
    println!("sample: {}{}", prompt, tokenizer.decode(&new)?);
    Ok(())
}

fn checkpoint_tokenizer(checkpoint: &Path, given: Option<&PathBuf>) -> Result<TextTokenizer, TrainError> {
    let meta = peer_model::checkpoint::load_meta(checkpoint)?;
    let path = given.cloned().or_else(|| meta.tokenizer.as_ref().and_then(|t| t.path.clone())).ok_or_else(|| {
        TrainError::Tokenizer {
            path: checkpoint.to_path_buf(),
            reason: "the checkpoint names no tokenizer: pass --tokenizer".into(),
        }
    })?;
    let tokenizer = TextTokenizer::from_file(&path)?;
    tokenizer.check_matches(&meta, checkpoint)?;
    Ok(tokenizer)
}

fn run_eval(args: EvalArgs) -> Result<(), TrainError> {
    let device = args.data.device.device()?;
    let path = args.data.corpus.clone().unwrap_or_else(bundled_corpus);
    let corpus = Corpus::load(&path)?;
    let tokenizer = checkpoint_tokenizer(&args.checkpoint, args.data.tokenizer.as_ref())?;
    let (config, model, _) = load_model(&args.checkpoint, &device)?;
    let data = PreparedData::new(&corpus, &tokenizer, config.max_seq_len)?;
    let windows = args.max_windows.map(|w| w.max(1));
    let evaluation = evaluate(&model, &data, config.max_seq_len, args.batch_size.max(1), windows, &device)?;
    let file = args.checkpoint.join("evaluation.json");
    write_atomic(&file, serde_json::to_string_pretty(&evaluation).expect("serialises").as_bytes())?;
    print_evaluation(&evaluation, &args.checkpoint, &tokenizer);
    println!("evaluation written to {}", file.display());
    Ok(())
}

fn run_generate(args: GenerateArgs) -> Result<(), TrainError> {
    let device = args.device.device()?;
    let tokenizer = checkpoint_tokenizer(&args.checkpoint, args.tokenizer.as_ref())?;
    let (_, model, _) = load_model(&args.checkpoint, &device)?;
    let sampling = SamplingConfig::new()
        .with_greedy(args.greedy)
        .with_temperature(args.temperature)
        .with_top_k(args.top_k)
        .with_top_p(args.top_p)
        .with_seed(args.seed);
    print_sample(&model.valid(), &tokenizer, &args.prompt, args.max_tokens, &sampling)
}

fn run_info(args: InfoArgs) -> Result<(), TrainError> {
    let model = match &args.config {
        Some(path) if path.is_dir() => load_config(path)?,
        Some(path) => load_training_config(path)?.model,
        None => TrainingConfig::small_peer().model,
    };
    model.validate().map_err(|source| TrainError::Config { context: "model".into(), source })?;
    let cost = model.cost();
    println!("parameters:              {}", cost.params);
    println!("active parameters/token: {}", cost.active_params);
    println!("forward FLOPs/token:     {:.4e}", cost.forward_flops_per_token);
    println!("training FLOPs/token:    {:.4e}", cost.training_flops_per_token);
    for block in 0..model.num_layers {
        let ffw = model.feed_forward_of(block);
        let c = ffw.cost();
        println!(
            "block {block}: {:<5} {:>10} params, {:>9} active, {:.3e} FLOPs/token",
            ffw.kind(),
            c.params,
            c.active_params,
            c.flops_per_token
        );
    }
    Ok(())
}
