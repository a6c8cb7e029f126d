//! `bench models` (dense, MoE, PKM and PEER LMs at equal FLOPs, trained on the same tokens) and
//! `bench scaling` (training-step time and memory of a PEER LM as N grows).

use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Int, Tensor};
use clap::Args;
use peer::core::{DenseFfwConfig, MoeConfig, MoeRouting, PeerConfig, PkmConfig, QueryNorm};
use peer::model::{FeedForwardConfig, TransformerConfig};
use peer::train::corpus::{Corpus, bundled_corpus};
use peer::train::tokenizer::TextTokenizer;
use peer::train::training::{TrainOptions, TrainingConfig, train};

use crate::harness::{PeakMemory, Repeats, Report, bench_dir, bytes, si, time};

/// Sizes of `bench models`.
#[derive(Args, Debug, Clone)]
pub struct ModelsArgs {
    /// The small size: finishes in under 10 minutes on 2 cores.
    #[arg(long)]
    pub quick: bool,
    /// Toy size for tests (seconds).
    #[arg(long, hide = true)]
    pub toy: bool,
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
}

impl ModelsArgs {
    fn size(&self) -> Size {
        if self.toy {
            Size { d_model: 32, layers: 2, seq_len: 32, batch: 4, epochs: 1, steps: 3, vocab: 300, peer_roots: vec![8, 16], peer_heads: 2, peer_top_k: 4 }
        } else if self.quick {
            Size { d_model: 64, layers: 4, seq_len: 64, batch: 16, epochs: 4, steps: 60, vocab: 1024, peer_roots: vec![64, 128, 256], peer_heads: 4, peer_top_k: 8 }
        } else {
            Size { d_model: 128, layers: 4, seq_len: 128, batch: 16, epochs: 6, steps: 100, vocab: 2048, peer_roots: vec![128, 256, 512, 1024], peer_heads: 4, peer_top_k: 8 }
        }
    }
}

fn peer_layer(size: &Size, root: usize) -> FeedForwardConfig {
    FeedForwardConfig::Peer(
        PeerConfig::new(size.d_model, root * root)
            .with_heads(size.peer_heads)
            .with_top_k(size.peer_top_k)
            .with_key_dim(size.d_model / 2)
            .with_query_norm(QueryNorm::BatchNorm),
    )
}

pub fn models(args: &ModelsArgs) {
    let size = args.size();
    let corpus = Corpus::load(&bundled_corpus()).expect("bundled corpus");
    let tokenizer = TextTokenizer::for_corpus(&corpus, size.vocab).expect("tokenizer");
    let base = TransformerConfig::dense(tokenizer.vocab_size(), size.d_model, size.layers, 4, size.seq_len, 4 * size.d_model)
        .with_middle_block(peer_layer(&size, size.peer_roots[0]));

    // Every other model replaces the middle block, sized to the PEER block's FLOPs.
    let mut runs: Vec<(String, TransformerConfig)> = Vec::new();
    let templates = [
        ("dense", FeedForwardConfig::Dense(DenseFfwConfig::new(size.d_model, 1))),
        ("moe (expert choice, 16 experts)", FeedForwardConfig::Moe(MoeConfig::new(size.d_model, 16, 1).with_routing(MoeRouting::ExpertChoice))),
        ("pkm", FeedForwardConfig::Pkm(PkmConfig::new(size.d_model, size.peer_roots[0].pow(2)).with_heads(size.peer_heads).with_top_k(size.peer_top_k))),
    ];
    for (name, template) in templates {
        runs.push((name.into(), base.flop_matched(&template).expect("FLOP matching")));
    }
    for &root in &size.peer_roots {
        let config = base.clone().with_middle_block(peer_layer(&size, root));
        runs.push((format!("peer N = {root}²"), config));
    }

    let device = Device::flex();
    let mut report = Report::new(
        "models",
        &["model", "params", "active params", "FLOPs/token", "valid ppl", "tokens/s", "expert usage", "unevenness"],
    );
    let reference_flops = base.cost().forward_flops_per_token;
    for (name, model) in runs {
        let mut config = TrainingConfig::new(model.clone());
        config.vocab_size = size.vocab;
        config.batch_size = size.batch;
        config.epochs = size.epochs;
        config.steps_per_epoch = size.steps;
        config.warmup_steps = size.steps / 2;
        let dir = bench_dir().join("models").join(name.replace([' ', '(', ')', ',', '='], "_").replace('²', "2"));
        let start = Instant::now();
        let summary = train(TrainOptions {
            config: config.clone(),
            corpus: &corpus,
            tokenizer: &tokenizer,
            device: device.clone(),
            artifact_dir: dir,
            resume: false,
        })
        .expect("training");
        let seconds = start.elapsed().as_secs_f64();
        let tokens = (config.total_steps() * size.batch * size.seq_len) as f64;
        let cost = model.cost();
        let e = &summary.evaluation;
        let usage = e.expert_usage.first().map(|(_, u, _)| *u);
        let unevenness = e.expert_usage.first().map(|(_, _, k)| *k);
        report.row(
            vec![
                name.clone(),
                si(cost.params as f64),
                si(cost.active_params as f64),
                format!("{} ({:+.1}%)", si(cost.forward_flops_per_token), 100.0 * (cost.forward_flops_per_token / reference_flops - 1.0)),
                format!("{:.2}", e.perplexity),
                si(tokens / seconds),
                usage.map_or("-".into(), |u| format!("{:.1}%", 100.0 * u)),
                unevenness.map_or("-".into(), |k| format!("{k:.3}")),
            ],
            serde_json::json!({
                "model": name, "config": model, "params": cost.params, "active_params": cost.active_params,
                "forward_flops_per_token": cost.forward_flops_per_token, "valid_perplexity": e.perplexity,
                "unigram_perplexity": e.unigram_perplexity, "tokens_trained": tokens,
                "tokens_per_s_including_validation": tokens / seconds, "expert_usage": usage, "unevenness": unevenness,
            }),
        );
    }
    report.write(serde_json::json!({
        "recipe": format!("{} epochs × {} steps × {} sequences × {} tokens, same seed and data order for every model, Flex device", size.epochs, size.steps, size.batch, size.seq_len),
        "matching": "the middle block of each model is sized to the FLOPs per token of the PEER block at the first N; the N sweep keeps h·k fixed",
    }));
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
}

pub fn scaling(args: &ScalingArgs) {
    let device = Device::flex().autodiff();
    let vocab = 4096;
    let mut report = Report::new("scaling", &["N", "params", "step time", "spread", "tokens/s", "peak RSS", "params + Adam state"]);
    let mut first: Option<f64> = None;
    for &root in &args.roots {
        let peer = PeerConfig::new(args.d_model, root * root)
            .with_heads(args.heads)
            .with_top_k(args.top_k)
            .with_key_dim(args.key_dim);
        let config = TransformerConfig::dense(vocab, args.d_model, 4, 4, args.seq_len, 4 * args.d_model)
            .with_middle_block(FeedForwardConfig::Peer(peer));
        let params = config.cost().params;
        let memory = PeakMemory::start();
        let mut model = Some(config.init(&device));
        let mut optim = AdamWConfig::new().init();
        let tokens = || {
            Tensor::<2>::random([args.batch, args.seq_len], Distribution::Uniform(0.0, vocab as f64), &device).int()
        };
        let (inputs, targets): (Tensor<2, Int>, Tensor<2, Int>) = (tokens(), tokens());
        let timing = time(&device, Repeats { warmup: 1, timed: args.repeats }, || {
            let m = model.take().expect("model");
            let (loss, _, _) = m.loss(inputs.clone(), targets.clone());
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            model = Some(optim.step(1e-3, m, grads));
        });
        let peak = memory.stop();
        let state = (3 * params * 4) as u64;
        let ratio = first.map_or(1.0, |f| timing.median_s / f);
        first.get_or_insert(timing.median_s);
        let tokens_per_step = args.batch * args.seq_len;
        report.row(
            vec![
                format!("{root}²"),
                si(params as f64),
                format!("{} ({ratio:.2}×)", timing.median()),
                format!("{:.0}%", 100.0 * timing.spread()),
                si(tokens_per_step as f64 / timing.median_s),
                bytes(peak),
                bytes(Some(state)),
            ],
            serde_json::json!({
                "num_experts": root * root, "params": params, "timing": timing, "step_time_over_first": ratio,
                "tokens_per_step": tokens_per_step, "peak_rss_bytes": peak, "params_and_adam_state_bytes": state,
                "d_model": args.d_model, "heads": args.heads, "top_k": args.top_k, "key_dim": args.key_dim,
            }),
        );
        drop(model.take());
    }
    report.write(serde_json::json!({
        "model": "4 blocks, PEER in block 2, dense GELU (4·d_model) elsewhere, vocab 4096, AdamW, Flex",
        "expert_updates": "dense: Burn 0.22 writes a dense [N, d_model] gradient per expert table and AdamW updates every row",
    }));
}
