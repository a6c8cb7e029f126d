//! `bench models` (dense, MoE, PKM and PEER LMs at equal FLOPs, trained on the same tokens) and
//! `bench scaling` (training-step time and memory of a PEER LM as N grows).

use std::time::Instant;

use burn::optim::AdamWConfig;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::tensor::{Device, Distribution, Tensor};
use burn::train::TrainStep;
use clap::Args;
use peer::core::{
    DenseFfwConfig, KeyScoring, MoeConfig, MoeRouting, PeerConfig, PkmConfig, QueryNorm, RoutingReport,
    take_row_gradients,
};
use peer::model::{FeedForwardConfig, Transformer, TransformerConfig};
use peer::train::corpus::{Corpus, bundled_corpus};
use peer::train::data::LmBatch;
use peer::train::learner::{ExpertUpdates, LanguageModel};
use peer::train::tokenizer::TextTokenizer;
use peer::train::training::{TrainOptions, TrainingConfig, train};
use serde::{Deserialize, Serialize};

use crate::harness::{
    Chart, ChartSeries, PeakMemory, Repeats, Report, Timing, bench_dir, bytes, draw_charts, si, time,
};
use crate::layers::available_devices;

/// Sizes of `bench models`.
#[derive(Args, Debug, Clone)]
pub struct ModelsArgs {
    /// The small size: finishes in under 10 minutes on 2 cores.
    #[arg(long)]
    pub quick: bool,
    /// Toy size for tests (seconds).
    #[arg(long, hide = true)]
    pub toy: bool,
    /// Seeds per model (initialisation and data order); the table gives the mean and the
    /// range [default: 2 at full size, 1 with --quick].
    #[arg(long)]
    pub seeds: Option<usize>,
    /// Training runs at a time, each in a process of its own. One run keeps about 1.1 of 2
    /// cores busy (the step has serial parts), so 2 finish the benchmark in well under the
    /// time of 1; tokens/s are then per run, with the cores shared. A run joins another only
    /// if both fit in the memory available at the start (about 32 bytes per parameter each:
    /// a 1024² run peaks near 8 GB, so two of them fit on a 24 GiB machine).
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// √N of the PEER sweep [default: 128,256,512,1024 at full size]; the first sets the FLOPs
    /// every other model is matched to.
    #[arg(long, value_delimiter = ',')]
    pub roots: Vec<usize>,
    /// Reuse the results of runs that finished in an earlier, interrupted `bench models` of
    /// the same size (their `bench_result.json` in `target/bench/models/`), training only the
    /// others. Only for the same build: nothing checks that the code is the same.
    #[arg(long)]
    pub resume: bool,
    /// Internal: train only run `INDEX` (model) with seed `--seed` and write its result.
    #[arg(long, hide = true, value_names = ["INDEX", "SEED"], num_args = 2)]
    pub only: Option<Vec<usize>>,
}

/// What one training run of `bench models` hands back to the parent process.
#[derive(Serialize, Deserialize)]
struct RunResult {
    perplexity: f64,
    routing: Option<RoutingReport>,
    seconds: f64,
}

struct Size {
    d_model: usize,
    layers: usize,
    seq_len: usize,
    batch: usize,
    epochs: usize,
    steps: usize,
    vocab: usize,
    peer_roots: Vec<usize>,
    peer_heads: usize,
    peer_top_k: usize,
    seeds: usize,
}

impl ModelsArgs {
    fn size(&self) -> Size {
        let size = if self.toy {
            Size {
                d_model: 32,
                layers: 2,
                seq_len: 32,
                batch: 4,
                epochs: 1,
                steps: 3,
                vocab: 300,
                peer_roots: vec![8, 16],
                peer_heads: 2,
                peer_top_k: 4,
                seeds: 1,
            }
        } else if self.quick {
            Size {
                d_model: 64,
                layers: 4,
                seq_len: 64,
                batch: 16,
                epochs: 4,
                steps: 60,
                vocab: 1024,
                peer_roots: vec![64, 128, 256],
                peer_heads: 4,
                peer_top_k: 8,
                seeds: 1,
            }
        } else {
            // 1,000 steps of 16 × 128 tokens: 2.05 M tokens per model, the main job's budget.
            Size {
                d_model: 128,
                layers: 4,
                seq_len: 128,
                batch: 16,
                epochs: 8,
                steps: 125,
                vocab: 2048,
                peer_roots: vec![128, 256, 512, 1024],
                peer_heads: 4,
                peer_top_k: 8,
                seeds: 2,
            }
        };
        let peer_roots = if self.roots.is_empty() { size.peer_roots } else { self.roots.clone() };
        Size { seeds: self.seeds.unwrap_or(size.seeds), peer_roots, ..size }
    }
}

fn peer_layer(size: &Size, root: usize) -> FeedForwardConfig {
    FeedForwardConfig::Peer(
        PeerConfig::new(size.d_model, root * root)
            .with_heads(size.peer_heads)
            .with_top_k(size.peer_top_k)
            .with_key_dim(size.d_model / 2),
    )
}

/// One model's results over its seeds.
struct ModelResult {
    name: String,
    config: TransformerConfig,
    perplexities: Vec<f64>,
    routing: Vec<RoutingReport>,
    seconds: f64,
}

impl ModelResult {
    fn mean(&self) -> f64 {
        self.perplexities.iter().sum::<f64>() / self.perplexities.len() as f64
    }
    fn min(&self) -> f64 {
        self.perplexities.iter().cloned().fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.perplexities.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
    }
    /// Mean of a routing statistic over the seeds.
    fn routing_mean(&self, statistic: impl Fn(&RoutingReport) -> f64) -> Option<f64> {
        (!self.routing.is_empty()).then(|| self.routing.iter().map(statistic).sum::<f64>() / self.routing.len() as f64)
    }
}

pub fn models(args: &ModelsArgs) {
    let size = args.size();
    assert!(size.seeds >= 1, "--seeds: at least 1");
    let corpus = Corpus::load(&bundled_corpus()).expect("bundled corpus");
    let tokenizer = TextTokenizer::for_corpus(&corpus, size.vocab).expect("tokenizer");
    let base =
        TransformerConfig::dense(tokenizer.vocab_size(), size.d_model, size.layers, 4, size.seq_len, 4 * size.d_model)
            .with_middle_block(peer_layer(&size, size.peer_roots[0]));

    // Every other model replaces the middle block, sized to the PEER block's FLOPs.
    let mut runs: Vec<(String, TransformerConfig)> = Vec::new();
    let templates = [
        ("dense", FeedForwardConfig::Dense(DenseFfwConfig::new(size.d_model, 1))),
        (
            "moe (expert choice, 16 experts)",
            FeedForwardConfig::Moe(MoeConfig::new(size.d_model, 16, 1).with_routing(MoeRouting::ExpertChoice)),
        ),
        (
            "pkm",
            FeedForwardConfig::Pkm(
                PkmConfig::new(size.d_model, size.peer_roots[0].pow(2))
                    .with_heads(size.peer_heads)
                    .with_top_k(size.peer_top_k),
            ),
        ),
    ];
    for (name, template) in templates {
        let name = match &template {
            FeedForwardConfig::Pkm(_) => format!("{name} N = {}²", size.peer_roots[0]),
            _ => name.to_string(),
        };
        runs.push((name, base.flop_matched(&template).expect("FLOP matching")));
    }
    for &root in &size.peer_roots {
        let config = base.clone().with_middle_block(peer_layer(&size, root));
        runs.push((format!("peer N = {root}²"), config));
    }

    let tokens = (size.epochs * size.steps * size.batch * size.seq_len) as f64;
    let run_dir = |index: usize, seed: usize| {
        let slug = runs[index].0.replace([' ', '(', ')', ',', '='], "_").replace('²', "2");
        bench_dir().join("models").join(format!("{slug}-seed{seed}"))
    };
    if let Some(only) = &args.only {
        let (index, seed) = (only[0], only[1]);
        let result = train_one(&size, &corpus, &tokenizer, &runs[index].1, seed, run_dir(index, seed));
        std::fs::write(run_dir(index, seed).join("bench_result.json"), serde_json::to_string(&result).unwrap())
            .expect("writing the run's result");
        return;
    }

    // Every (model, seed) run in a child process (this program with `--only`), `--jobs` at a time.
    let start = Instant::now();
    let mut results: Vec<ModelResult> = runs
        .iter()
        .map(|(name, config)| ModelResult {
            name: name.clone(),
            config: config.clone(),
            perplexities: Vec::new(),
            routing: Vec::new(),
            seconds: 0.0,
        })
        .collect();
    let mut pending: Vec<(usize, usize)> =
        (0..runs.len()).flat_map(|index| (0..size.seeds).map(move |seed| (index, seed))).rev().collect();
    let mut running: Vec<((usize, usize), std::process::Child)> = Vec::new();
    let mut finished: Vec<Option<RunResult>> = (0..runs.len() * size.seeds).map(|_| None).collect();
    let earlier = |index: usize, seed: usize| -> Option<RunResult> {
        let text = std::fs::read_to_string(run_dir(index, seed).join("bench_result.json")).ok()?;
        serde_json::from_str(&text).ok()
    };
    pending.retain(|&(index, seed)| match earlier(index, seed).filter(|_| args.resume) {
        Some(result) => {
            eprintln!(
                "{} seed {seed}: valid perplexity {:.2} (earlier run, --resume)",
                runs[index].0, result.perplexity
            );
            finished[index * size.seeds + seed] = Some(result);
            false
        }
        None => {
            let _ = std::fs::remove_file(run_dir(index, seed).join("bench_result.json"));
            true
        }
    });
    let budget = available_memory();
    // Each model's estimated peak, computed once rather than on every poll below.
    let peaks: Vec<f64> = runs.iter().map(|(_, config)| config.cost().params as f64 * RUN_BYTES_PER_PARAM).collect();
    let mut told_to_wait = None;
    while !pending.is_empty() || !running.is_empty() {
        while running.len() < args.jobs.max(1)
            && let Some(&(index, seed)) = pending.last()
        {
            // A run always starts when nothing else runs; another one joins only if the
            // estimated peaks of all of them fit in memory.
            let in_use: f64 = running.iter().map(|((i, _), _)| peaks[*i]).sum();
            if let Some(budget) = budget.filter(|&b| !may_join(in_use, peaks[index], b, running.len())) {
                if told_to_wait != Some((index, seed)) {
                    eprintln!(
                        "{} seed {seed}: waits for memory (about {:.1} GB at its peak, {:.1} GB of {:.1} GB taken)",
                        runs[index].0,
                        peaks[index] / 1e9,
                        in_use / 1e9,
                        budget / 1e9
                    );
                    told_to_wait = Some((index, seed));
                }
                break;
            }
            pending.pop();
            let dir = run_dir(index, seed);
            std::fs::create_dir_all(&dir).expect("bench run folder");
            let log = std::fs::File::create(dir.join("bench.log")).expect("bench run log");
            let mut command = std::process::Command::new(std::env::current_exe().expect("own executable"));
            command.args(["bench", "models", "--only", &index.to_string(), &seed.to_string()]);
            command.args(["--seeds", &size.seeds.to_string()]);
            if !args.roots.is_empty() {
                let roots: Vec<String> = args.roots.iter().map(usize::to_string).collect();
                command.args(["--roots", &roots.join(",")]);
            }
            if args.quick {
                command.arg("--quick");
            }
            if args.toy {
                command.arg("--toy");
            }
            let child = command
                .stdout(log.try_clone().expect("bench run log"))
                .stderr(log)
                .spawn()
                .expect("the benchmark can run itself");
            eprintln!("{} seed {seed}: training (log in {})", runs[index].0, dir.join("bench.log").display());
            running.push(((index, seed), child));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut still = Vec::new();
        for ((index, seed), mut child) in running {
            match child.try_wait().expect("waiting for a bench run") {
                None => still.push(((index, seed), child)),
                Some(status) => {
                    let dir = run_dir(index, seed);
                    let result: RunResult = std::fs::read_to_string(dir.join("bench_result.json"))
                        .ok()
                        .filter(|_| status.success())
                        .and_then(|text| serde_json::from_str(&text).ok())
                        .unwrap_or_else(|| {
                            panic!(
                                "{} seed {seed}: the training run failed ({status}); see {}",
                                runs[index].0,
                                dir.join("bench.log").display()
                            )
                        });
                    eprintln!(
                        "{} seed {seed}: valid perplexity {:.2} ({:.0} s)",
                        runs[index].0, result.perplexity, result.seconds
                    );
                    finished[index * size.seeds + seed] = Some(result);
                }
            }
        }
        running = still;
    }
    // In model and seed order, whatever order the runs finished in.
    for (slot, result) in finished.into_iter().enumerate() {
        let result = result.expect("every run finished");
        let model = &mut results[slot / size.seeds];
        model.perplexities.push(result.perplexity);
        model.routing.extend(result.routing);
        model.seconds += result.seconds;
    }
    let wall = start.elapsed().as_secs_f64();
    println!(
        "bench models: {} runs, {} at a time, {:.1} min wall",
        runs.len() * size.seeds,
        args.jobs.max(1),
        wall / 60.0
    );
    report_models(&size, &base, tokens, &results, wall, args.jobs.max(1));
}

/// Peak resident memory of one training run per parameter, measured on Flex with checkpoints
/// streamed to disk: a PEER 1024² run (270 M parameters) peaked at 7.9 GB (14.2 GB while
/// checkpoints were first built in memory, where a full `bench models` run measured 14.5 GB);
/// 32 B leaves ~9% margin over the measured 29.4 B. The benchmark's runs write no checkpoints,
/// so this is an upper bound for them.
const RUN_BYTES_PER_PARAM: f64 = 32.0;

/// The memory the concurrent runs may share: what Linux reports available (`MemAvailable`)
/// when the benchmark starts; `None` where it cannot be read, and then only `--jobs` limits.
fn available_memory() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemAvailable:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

/// Whether a run whose peak is `peak` bytes may start beside `running` runs whose peaks add up to
/// `in_use`, within `budget` bytes: always when it would run alone.
fn may_join(in_use: f64, peak: f64, budget: f64, running: usize) -> bool {
    running == 0 || in_use + peak <= budget
}

/// Trains one model with one seed (the body of a `bench models` child process).
fn train_one(
    size: &Size,
    corpus: &Corpus,
    tokenizer: &TextTokenizer,
    model: &TransformerConfig,
    seed: usize,
    dir: std::path::PathBuf,
) -> RunResult {
    let mut config = TrainingConfig::new(model.clone());
    config.vocab_size = size.vocab;
    config.batch_size = size.batch;
    config.epochs = size.epochs;
    config.steps_per_epoch = size.steps;
    config.warmup_steps = size.steps / 2;
    config.seed = 42 + seed as u64;
    let start = Instant::now();
    // No checkpoints: a killed run is trained again from its start (`--resume` skips finished
    // runs only), so they would never be read, and at 1024² each is 3.2 GB written every epoch.
    let options = TrainOptions {
        config,
        corpus,
        tokenizer,
        device: Device::flex(),
        artifact_dir: dir,
        resume: false,
        checkpoints: false,
    };
    let summary = train(options).expect("training");
    let e = summary.evaluation;
    RunResult {
        perplexity: e.perplexity,
        routing: e.routing.into_iter().next().map(|b| b.report),
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// The table, the JSON, the verdicts and the charts of `bench models`.
fn report_models(size: &Size, base: &TransformerConfig, tokens: f64, results: &[ModelResult], wall: f64, jobs: usize) {
    let mut report = Report::new(
        "models",
        &[
            "model",
            "params",
            "active params",
            "FLOPs/token",
            "valid ppl (mean)",
            "range over seeds",
            "tokens/s",
            "expert usage (ceiling)",
            "unevenness",
            "top 1% share",
        ],
    );
    let reference_flops = base.cost().forward_flops_per_token;
    let mut sweep = Vec::new();
    for r in results {
        let cost = r.config.cost();
        let percent = |v: f64| format!("{:.1}%", 100.0 * v);
        let usage = r.routing_mean(|u| u.usage);
        let ceiling = r.routing_mean(|u| u.uniform_ceiling);
        let unevenness = r.routing_mean(|u| u.unevenness);
        let top = r.routing_mean(|u| u.top_1_percent_share);
        if let Some(FeedForwardConfig::Peer(peer)) = r.config.block_feed_forward.first().map(|b| &b.feed_forward) {
            sweep.push((peer.num_experts as f64, r.mean()));
        }
        let seeds = r.perplexities.len();
        report.row(
            vec![
                r.name.clone(),
                si(cost.params as f64),
                si(cost.active_params as f64),
                format!(
                    "{} ({:+.1}%)",
                    si(cost.forward_flops_per_token),
                    100.0 * (cost.forward_flops_per_token / reference_flops - 1.0)
                ),
                format!("{:.2}", r.mean()),
                if seeds > 1 { format!("{:.2}–{:.2}", r.min(), r.max()) } else { "-".into() },
                si(tokens * seeds as f64 / r.seconds),
                match (usage, ceiling) {
                    (Some(u), Some(c)) => format!("{} ({})", percent(u), percent(c)),
                    _ => "-".into(),
                },
                unevenness.map_or("-".into(), |k| format!("{k:.3}")),
                top.map_or("-".into(), percent),
            ],
            serde_json::json!({
                "model": r.name, "config": r.config, "params": cost.params, "active_params": cost.active_params,
                "forward_flops_per_token": cost.forward_flops_per_token, "valid_perplexity_per_seed": r.perplexities,
                "valid_perplexity_mean": r.mean(), "tokens_trained_per_seed": tokens,
                "tokens_per_s_including_validation": tokens * seeds as f64 / r.seconds, "routing_per_seed": r.routing,
            }),
        );
    }
    let verdicts = verdicts(results);
    for line in &verdicts {
        println!("{line}");
    }
    report.write(serde_json::json!({
        "recipe": format!("{} epochs × {} steps × {} sequences × {} tokens ({} tokens), seeds 42 to {} (initialisation and data order), the same seeds for every model, Flex device", size.epochs, size.steps, size.batch, size.seq_len, tokens, 42 + size.seeds - 1),
        "matching": "the middle block of each model is sized to the FLOPs per token of the PEER block at the first N; the N sweep keeps h·k fixed",
        "evaluation": "perplexity and routing statistics over the whole validation split",
        "verdicts": verdicts,
        "wall_minutes": wall / 60.0,
        "jobs": jobs,
    }));
    let bars = results.iter().map(|r| (r.name.clone(), r.mean())).collect();
    draw_charts(
        "models",
        &[
            Chart::bars(
                "models.png",
                "Validation perplexity at equal FLOPs per token (mean over seeds; lower is better)",
                "perplexity",
                bars,
            ),
            Chart::lines(
                "models_peer_sweep.png",
                "PEER: validation perplexity vs number of experts (fixed h·k, mean over seeds)",
                "experts N",
                "perplexity",
                true,
                vec![ChartSeries { label: "PEER".into(), points: sweep }],
            ),
        ],
    );
}

/// The questions the benchmark answers, answered from its numbers: does PEER at the first N
/// beat the FLOP-matched dense model beyond the seeds' range (every PEER seed below every dense
/// seed), and does the mean perplexity fall as N grows.
fn verdicts(results: &[ModelResult]) -> Vec<String> {
    let mut lines = Vec::new();
    let dense = results.iter().find(|r| r.name == "dense");
    let peers: Vec<&ModelResult> = results.iter().filter(|r| r.name.starts_with("peer")).collect();
    if let (Some(dense), Some(peer)) = (dense, peers.first()) {
        let beyond = peer.max() < dense.min();
        lines.push(format!(
            "PEER ({}) vs dense at equal FLOPs: {:.2} vs {:.2} mean valid perplexity ({:+.1}%); {}",
            peer.name.trim_start_matches("peer "),
            peer.mean(),
            dense.mean(),
            100.0 * (peer.mean() / dense.mean() - 1.0),
            match (peer.mean() < dense.mean(), beyond) {
                (_, true) => "PEER is better beyond the seeds' range (its worst seed beats dense's best)",
                (true, false) => "PEER is better on average, but the seeds' ranges overlap",
                (false, _) => "PEER is not better",
            }
        ));
    }
    if peers.len() > 1 {
        let means: Vec<String> = peers.iter().map(|p| format!("{:.2}", p.mean())).collect();
        let falling = peers.windows(2).all(|w| w[1].mean() < w[0].mean());
        lines.push(format!(
            "PEER N sweep (mean perplexity, {}): {} — {}",
            peers.iter().map(|p| p.name.trim_start_matches("peer N = ")).collect::<Vec<_>>().join(" → "),
            means.join(" → "),
            if falling { "falls at every step" } else { "does not fall at every step" }
        ));
    }
    let usage: Vec<String> = results
        .iter()
        .filter_map(|r| {
            let usage = r.routing_mean(|u| u.usage)?;
            let ceiling = r.routing_mean(|u| u.uniform_ceiling)?;
            Some(format!(
                "{} {:.1}% ({:.0}% of its ceiling {:.1}%)",
                r.name,
                100.0 * usage,
                100.0 * usage / ceiling,
                100.0 * ceiling
            ))
        })
        .collect();
    if !usage.is_empty() {
        lines.push(format!("Expert usage over the validation split (mean over seeds): {}", usage.join("; ")));
    }
    lines
}

/// Sizes of `bench scaling`.
#[derive(Args, Debug, Clone)]
pub struct ScalingArgs {
    /// Model width.
    #[arg(long, default_value_t = 256)]
    pub d_model: usize,
    /// √N of each size.
    #[arg(long, value_delimiter = ',', default_values_t = [128, 256, 512, 1024])]
    pub roots: Vec<usize>,
    /// Retrieval heads.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Experts per head.
    #[arg(long, default_value_t = 16)]
    pub top_k: usize,
    /// Full key dimension.
    #[arg(long, default_value_t = 128)]
    pub key_dim: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence (tokens per step = batch × seq_len).
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Device: flex (default), ndarray or wgpu.
    #[arg(long, default_value = "flex")]
    pub device: String,
    /// How the expert tables are trained: `sparse`, `dense`, or both (compared side by side).
    #[arg(long, value_delimiter = ',', default_values_t = [String::from("sparse"), String::from("dense")])]
    pub updates: Vec<String>,
    /// Internal: measure the one configuration given (first root, first mode) in this process
    /// and print it as JSON. Without it every configuration runs in a child process of its own,
    /// so that its peak memory is its own (an allocator keeps freed pages for reuse).
    #[arg(long, hide = true)]
    pub in_process: bool,
}

/// One configuration's measurements (a child process prints it as JSON).
#[derive(Debug, Serialize, Deserialize)]
struct ScalingSample {
    params: usize,
    step_s: Vec<f64>,
    backward_s: f64,
    optimizer_s: f64,
    retrieval_s: f64,
    experts_s: f64,
    peak_rss_bytes: Option<u64>,
}

/// Training-step time of a 4-block LM with PEER in the middle block, through the same
/// `TrainStep::step` + `TrainStep::optimize` calls Burn's `Learner` makes, for each N and each
/// way of updating the expert tables, each configuration in a process of its own. Phases:
/// forward+backward and optimizer are timed inside the step; retrieval and expert compute are
/// timed on their own at the step's shapes (the PEER block's input), forward and backward;
/// "rest" is the step minus those three.
pub fn scaling(args: &ScalingArgs) {
    if args.in_process {
        let Some((_, plain)) = available_devices(std::slice::from_ref(&args.device)).into_iter().next() else {
            panic!("--device {}: not available in this build or on this machine", args.device);
        };
        let sample = measure_scaling(args, &plain.autodiff(), &args.updates[0], args.roots[0]);
        println!("{}", serde_json::to_string(&sample).expect("serializable"));
        return;
    }
    let mut report = Report::new(
        "scaling",
        &[
            "device",
            "updates",
            "N",
            "step time",
            "spread",
            "retrieval",
            "experts",
            "optimizer",
            "rest",
            "tokens/s",
            "peak RSS",
            "params + AdamW state",
            "peak / state",
        ],
    );
    let tokens_per_step = args.batch * args.seq_len;
    let (mut step_lines, mut memory_lines) = (Vec::new(), Vec::new());
    let mut state_line = Vec::new();
    for mode in &args.updates {
        expert_updates(mode); // refuses a bad mode before any child runs
    }
    for mode in &args.updates {
        let (mut steps, mut peaks) = (Vec::new(), Vec::new());
        let mut first: Option<f64> = None;
        for &root in &args.roots {
            let ScalingSample {
                params,
                step_s,
                backward_s,
                optimizer_s: optimizer,
                retrieval_s: retrieval,
                experts_s: experts,
                peak_rss_bytes: peak,
            } = scaling_in_child(args, mode, root);
            let state = (3 * params * 4) as u64;
            let timing = Timing::from_samples(step_s.clone());
            let step = timing.median_s;
            let rest = (backward_s - retrieval - experts).max(0.0);
            let ratio = first.map_or(1.0, |f| step / f);
            first.get_or_insert(step);
            let ms = |s: f64| format!("{:.0} ms", 1e3 * s);
            let n = (root * root) as f64;
            steps.push((n, step));
            if let Some(p) = peak {
                peaks.push((n, p as f64 / (1u64 << 30) as f64));
            }
            if state_line.len() < args.roots.len() {
                state_line.push((n, state as f64 / (1u64 << 30) as f64));
            }
            report.row(
                vec![
                    args.device.clone(),
                    mode.clone(),
                    format!("{root}²"),
                    format!("{} ({ratio:.2}×)", timing.median()),
                    format!("{:.0}%", 100.0 * timing.spread()),
                    ms(retrieval),
                    ms(experts),
                    ms(optimizer),
                    ms(rest),
                    si(tokens_per_step as f64 / step),
                    bytes(peak),
                    bytes(Some(state)),
                    peak.map_or("-".into(), |p| format!("{:.2}", p as f64 / state as f64)),
                ],
                serde_json::json!({
                    "device": args.device, "expert_updates": mode, "num_experts": root * root, "params": params,
                    "step_s": {"median": step, "samples": step_s}, "step_time_over_first": ratio,
                    "phases_s": {"retrieval": retrieval, "experts": experts, "optimizer": optimizer, "rest": rest},
                    "tokens_per_step": tokens_per_step, "peak_rss_bytes": peak, "params_and_adamw_state_bytes": state,
                    "d_model": args.d_model, "heads": args.heads, "top_k": args.top_k, "key_dim": args.key_dim,
                }),
            );
        }
        step_lines.push(ChartSeries { label: format!("{mode} expert updates"), points: steps });
        memory_lines.push(ChartSeries { label: format!("peak RSS, {mode}"), points: peaks });
    }
    memory_lines.push(ChartSeries { label: "params + AdamW state".into(), points: state_line });
    report.write(serde_json::json!({
        "model": "4 blocks, PEER (BatchNorm queries) in block 2, dense GELU (4·d_model) elsewhere, vocab 4096, AdamW with norm clipping",
        "step": "peer_train::learner::LanguageModel: TrainStep::step then TrainStep::optimize, as Burn's Learner calls them",
        "phases": "optimizer: timed inside the step; experts (Eq. 5 forward and backward: sparse = Experts::forward_detached/backward_detached with row gradients, the fused host kernels on Flex; dense = autodiff with dense table gradients) and the whole PEER layer as the step runs it (sparse: row-sparse backward; dense: autodiff) timed on their own at the step's shapes; retrieval = layer minus experts (query network, product keys, router weights); rest = forward+backward minus retrieval and experts",
        "state": "params + AdamW state = 3 × params × 4 bytes (values and two moments; sparse keeps the two moments per table as well)",
    }));
    let title = format!("Training step of a 4-block PEER LM ({tokens_per_step} tokens, {})", args.device);
    draw_charts(
        "scaling",
        &[
            Chart::lines("scaling_step_time.png", &title, "experts N", "seconds per step", true, step_lines),
            Chart::lines(
                "scaling_memory.png",
                "Peak memory vs number of experts",
                "experts N",
                "GiB",
                true,
                memory_lines,
            ),
        ],
    );
}

/// Runs one configuration of `bench scaling` in a child process (this program with
/// `--in-process`) and reads its measurements.
fn scaling_in_child(args: &ScalingArgs, mode: &str, root: usize) -> ScalingSample {
    let exe = std::env::current_exe().expect("the benchmark's own executable");
    let output = std::process::Command::new(exe)
        .args(["bench", "scaling", "--in-process", "--roots", &root.to_string(), "--updates", mode])
        .args(["--d-model", &args.d_model.to_string(), "--heads", &args.heads.to_string()])
        .args(["--top-k", &args.top_k.to_string(), "--key-dim", &args.key_dim.to_string()])
        .args(["--batch", &args.batch.to_string(), "--seq-len", &args.seq_len.to_string()])
        .args(["--repeats", &args.repeats.to_string(), "--device", &args.device])
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("the benchmark can run itself");
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().rev().find_map(|line| serde_json::from_str(line).ok()) {
        Some(sample) if output.status.success() => sample,
        _ => panic!("bench scaling, {mode} updates, N = {root}²: the measuring process failed ({})", output.status),
    }
}

/// The expert-update mode named by `--updates`.
fn expert_updates(mode: &str) -> ExpertUpdates {
    match mode {
        "sparse" => ExpertUpdates::Sparse,
        "dense" => ExpertUpdates::Dense,
        other => panic!("--updates: `{other}` is neither `sparse` nor `dense`"),
    }
}

/// Trains a few steps of one configuration and measures them (see [`scaling`]).
fn measure_scaling(args: &ScalingArgs, device: &Device, mode: &str, root: usize) -> ScalingSample {
    let vocab = 4096;
    let updates = expert_updates(mode);
    let peer_config = PeerConfig::new(args.d_model, root * root)
        .with_heads(args.heads)
        .with_top_k(args.top_k)
        .with_key_dim(args.key_dim)
        .with_query_norm(QueryNorm::BatchNorm)
        // The paper's retrieval, as the README's scaling figures were measured.
        .with_shared_keys(true)
        .with_scoring(KeyScoring::Dot)
        .with_balance_loss(0.0);
    let config = TransformerConfig::dense(vocab, args.d_model, 4, 4, args.seq_len, 4 * args.d_model)
        .with_middle_block(FeedForwardConfig::Peer(peer_config));
    let params = config.cost().params;
    let memory = PeakMemory::start();
    device.seed(0);
    let mut model = LanguageModel::new(config.init(device), updates, 1.0);
    let mut optim = AdamWConfig::new().with_grad_clipping(Some(GradientClippingConfig::Norm(1.0))).init();
    let tokens =
        || Tensor::<2>::random([args.batch, args.seq_len], Distribution::Uniform(0.0, vocab as f64), device).int();
    let batch = LmBatch { inputs: tokens(), targets: tokens() };
    let (mut step_s, mut backward_s, mut optimizer_s) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.repeats + 1 {
        device.sync().ok();
        let start = Instant::now();
        let output = TrainStep::step(&model, batch.clone());
        device.sync().ok();
        let stepped = Instant::now();
        model = TrainStep::optimize(model, &mut optim, 1e-3.into(), output.grads);
        device.sync().ok();
        if run > 0 {
            backward_s.push((stepped - start).as_secs_f64());
            optimizer_s.push(stepped.elapsed().as_secs_f64());
            step_s.push(start.elapsed().as_secs_f64());
        }
    }
    let peak_rss_bytes = memory.stop();
    let (retrieval_s, experts_s) = phase_times(&model.transformer, args, device, updates);
    ScalingSample {
        params,
        step_s,
        backward_s: Timing::from_samples(backward_s).median_s,
        optimizer_s: Timing::from_samples(optimizer_s).median_s,
        retrieval_s,
        experts_s,
        peak_rss_bytes,
    }
}

/// Retrieval and expert-compute times (forward and backward) of the PEER block at the step's
/// shapes, through the step's own code paths. Experts: Eq. 5 forward and backward alone
/// (sparse: `Experts::forward_detached` / `backward_detached`, the host kernels on Flex; dense:
/// autodiff with dense table gradients). Retrieval (query network, product keys, router
/// weights): the whole layer as the step runs it (sparse: row-sparse backward; dense: autodiff) minus the
/// experts.
fn phase_times(model: &Transformer, args: &ScalingArgs, device: &Device, updates: ExpertUpdates) -> (f64, f64) {
    let peer = model.peer_layers().next().expect("a PEER block");
    let x = Tensor::<3>::random([args.batch, args.seq_len, args.d_model], Distribution::Normal(0.0, 1.0), device)
        .require_grad();
    let repeats = Repeats { warmup: 1, timed: args.repeats };
    let routing = peer.route(x.clone());
    let tokens = args.batch * args.seq_len;
    let m = args.heads * args.top_k;
    let ids = routing.expert_ids.inner().reshape([tokens, m]);
    let weights = routing.router_weights.inner().reshape([tokens, m]);
    let x2 = x.clone().inner().reshape([tokens, args.d_model]);
    let (layer, experts) = match updates {
        ExpertUpdates::Sparse => (
            time(device, repeats, || {
                let _ = peer.forward(x.clone()).sum().backward();
                let _ = take_row_gradients(&peer.experts);
            }),
            time(device, repeats, || {
                let y = peer.experts.forward_detached(x2.clone(), ids.clone(), weights.clone());
                let _ = peer.experts.backward_detached(x2.clone(), ids.clone(), weights.clone(), y);
            }),
        ),
        ExpertUpdates::Dense => (
            time(device, repeats, || {
                let _ = peer.forward(x.clone()).sum().backward();
            }),
            time(device, repeats, || {
                let x = Tensor::from_inner(x2.clone()).require_grad();
                let w = Tensor::from_inner(weights.clone()).require_grad();
                let _ = peer.experts.forward(x, ids.clone(), w).sum().backward();
            }),
        ),
    };
    ((layer.median_s - experts.median_s).max(0.0), experts.median_s)
}

#[cfg(test)]
mod tests {
    use super::may_join;

    const GB: f64 = 1e9;

    #[test]
    fn runs_join_only_within_the_memory_budget() {
        // Two runs of 14.5 GB each (what a 1024² run took while checkpoints were built in
        // memory) on a machine with 22 GB available: the second waits.
        assert!(may_join(0.0, 14.5 * GB, 22.0 * GB, 0));
        assert!(!may_join(14.5 * GB, 14.5 * GB, 22.0 * GB, 1));
        // A 3.7 GB run joins one of them.
        assert!(may_join(14.5 * GB, 3.7 * GB, 22.0 * GB, 1));
        // A run larger than the whole budget still starts alone, and only alone.
        assert!(may_join(0.0, 30.0 * GB, 22.0 * GB, 0));
        assert!(!may_join(1.0, 30.0 * GB, 22.0 * GB, 1));
    }
}
