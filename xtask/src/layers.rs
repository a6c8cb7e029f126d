//! `bench backends` (the PEER layer and a FLOP-matched dense FFW on every device) and
//! `bench pytorch` (the same layer through PEER-pytorch, as a ratio).

use std::panic::{AssertUnwindSafe, catch_unwind};

use burn::module::Module;
use burn::tensor::{Device, DeviceKind, Distribution, Tensor};
use clap::Args;
use peer::core::{DenseFfwConfig, KeyScoring, Peer, PeerConfig, QueryNorm, set_gpu_kernels, take_row_gradients};
use serde::Serialize;

use crate::harness::{Chart, PeakMemory, Repeats, Report, Timing, bytes, draw_charts, si, time};

/// Sizes of the layer benchmarks (defaults: the paper's setting with PEER-pytorch's key size).
#[derive(Args, Debug, Clone)]
pub struct LayerArgs {
    /// Model width.
    #[arg(long, default_value_t = 256)]
    pub d_model: usize,
    /// √N of each measured size.
    #[arg(long, value_delimiter = ',', default_values_t = [128, 1024])]
    pub roots: Vec<usize>,
    /// Retrieval heads.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Experts per head.
    #[arg(long, default_value_t = 16)]
    pub top_k: usize,
    /// Full key dimension (PEER-pytorch's default `dim_key = dim / 2` per half → 256).
    #[arg(long, default_value_t = 256)]
    pub key_dim: usize,
    /// Tokens per batch.
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Timed repeats (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Devices to measure (default: every one compiled in and working).
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
}

impl LayerArgs {
    pub fn peer(&self, root: usize) -> PeerConfig {
        PeerConfig::new(self.d_model, root * root)
            .with_heads(self.heads)
            .with_top_k(self.top_k)
            .with_key_dim(self.key_dim)
            .with_query_norm(QueryNorm::BatchNorm)
            // The paper's retrieval (one shared key set, inner products, no balance loss), as PEER-pytorch's
            // layer benchmarks and the figures in the README were measured.
            .with_shared_keys(true)
            .with_scoring(KeyScoring::Dot)
            .with_balance_loss(0.0)
    }

    /// A dense GELU FFW with the forward FLOPs per token of `peer`.
    pub fn matched_dense(&self, peer: &PeerConfig) -> DenseFfwConfig {
        let hidden = (peer.cost().flops_per_token / (4.0 * self.d_model as f64)).round() as usize;
        DenseFfwConfig::new(self.d_model, hidden.max(1))
    }
}

/// The devices compiled into this build that answer a tiny op.
pub fn available_devices(names: &[String]) -> Vec<(String, Device)> {
    #[allow(deprecated)]
    let all = vec![
        ("flex".to_string(), Device::flex()),
        ("ndarray".to_string(), Device::ndarray()),
        ("wgpu".to_string(), Device::wgpu(DeviceKind::DefaultDevice)),
    ];
    all.into_iter()
        .filter(|(name, _)| names.is_empty() || names.contains(name))
        .filter(|(name, device)| {
            let ok = peer::core::device_works(device);
            if !ok {
                eprintln!("skipping {name}: no working device");
            }
            ok
        })
        .collect()
}

#[derive(Serialize)]
struct LayerRecord {
    layer: String,
    num_experts: usize,
    device: String,
    pass: &'static str,
    tokens: usize,
    d_model: usize,
    heads: usize,
    top_k: usize,
    key_dim: usize,
    flops_per_token: f64,
    timing: Option<Timing>,
    tokens_per_s: Option<f64>,
    peak_rss_bytes: Option<u64>,
    error: Option<String>,
}

/// What one timed run of a layer does.
enum Pass<'a> {
    /// Forward only; the output is read back.
    Forward(&'a dyn Fn(Tensor<3>) -> Tensor<3>),
    /// Forward, then backward of the output's sum (autodiff; dense expert-table gradients).
    Backward(&'a dyn Fn(Tensor<3>) -> Tensor<3>),
    /// Forward, then backward of the output's sum, with row-sparse table gradients (taken from
    /// the row store, as an optimizer step would); with the GPU kernels on (`true`) or with
    /// every operation in Burn tensor ops (`false`).
    RowSparse(&'a Peer, bool),
}

/// Turns the GPU kernels back on when a tensor-op measurement ends, panicking or not.
struct KernelsBackOn;

impl Drop for KernelsBackOn {
    fn drop(&mut self) {
        set_gpu_kernels(true);
    }
}

/// One pass of one layer on one device.
fn measure(
    pass: Pass,
    device: &Device,
    tokens: usize,
    d_model: usize,
    repeats: Repeats,
) -> Result<(Timing, Option<u64>), String> {
    let run = || {
        let x = Tensor::<3>::random([1, tokens, d_model], Distribution::Normal(0.0, 1.0), device);
        let _back_on = KernelsBackOn;
        if let Pass::RowSparse(_, kernels) = &pass {
            set_gpu_kernels(*kernels);
        }
        let memory = PeakMemory::start();
        let timing = time(device, repeats, || match &pass {
            Pass::Forward(forward) => {
                let _ = forward(x.clone()).into_data();
            }
            Pass::Backward(forward) => {
                let _grads = forward(x.clone()).sum().backward();
            }
            Pass::RowSparse(peer, _) => {
                let _grads = peer.forward(x.clone()).sum().backward();
                let _rows = take_row_gradients(&peer.experts);
            }
        });
        (timing, memory.stop())
    };
    catch_unwind(AssertUnwindSafe(run)).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into())
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(120)
            .collect()
    })
}

pub fn backends(args: &LayerArgs) {
    let repeats = Repeats { warmup: 1, timed: args.repeats };
    let devices = available_devices(&args.devices);
    let mut report =
        Report::new("backends", &["layer", "N", "device", "pass", "median", "spread", "tokens/s", "peak RSS"]);
    let mut bars = Vec::new();
    for &root in &args.roots {
        let peer_config = args.peer(root);
        let dense_config = args.matched_dense(&peer_config);
        for (name, device) in &devices {
            let train_device = device.clone().autodiff();
            let built =
                catch_unwind(AssertUnwindSafe(|| (peer_config.init(&train_device), dense_config.init(&train_device))));
            let Ok((peer_layer, dense)) = built else {
                eprintln!("{name}: cannot build N = {root}²");
                continue;
            };
            let peer_eval = peer_layer.valid();
            let dense_eval = dense.valid();
            let dense_forward = |x| dense_eval.forward(x);
            let dense_train = |x| dense.forward(x);
            let peer_forward = |x| peer_eval.forward(x);
            let mut peer_dense = peer_layer.clone();
            peer_dense.experts.sparse_gradients = false;
            let peer_train = |x| peer_dense.forward(x);
            // (layer, N, FLOPs per token, passes on the plain and the autodiff device)
            #[allow(clippy::type_complexity)]
            let mut peer_passes = vec![
                ("forward", Pass::Forward(&peer_forward), device),
                ("forward+backward (sparse rows)", Pass::RowSparse(&peer_layer, true), &train_device),
            ];
            if name != "flex" && name != "ndarray" {
                // The same pass without the CubeCL kernels: what they gain.
                peer_passes.push((
                    "forward+backward (sparse rows, tensor ops)",
                    Pass::RowSparse(&peer_layer, false),
                    &train_device,
                ));
            }
            peer_passes.push(("forward+backward (dense tables)", Pass::Backward(&peer_train), &train_device));
            let rows: [(&str, usize, f64, Vec<(&str, Pass, &Device)>); 2] = [
                (
                    "dense (FLOP-matched)",
                    0,
                    dense_config.cost().flops_per_token,
                    vec![
                        ("forward", Pass::Forward(&dense_forward), device),
                        ("forward+backward", Pass::Backward(&dense_train), &train_device),
                    ],
                ),
                ("peer", root * root, peer_config.cost().flops_per_token, peer_passes),
            ];
            for (layer, n, flops, passes) in rows {
                if layer.starts_with("dense") && root != args.roots[0] {
                    continue; // the dense reference does not depend on N
                }
                let mut failed = false;
                for (pass_name, pass, dev) in passes {
                    // After a failure the device's state is unreliable (wgpu keeps going with
                    // errors queued): do not report figures measured on it.
                    let result = if failed {
                        Err("skipped: an earlier pass failed on this device".to_string())
                    } else {
                        measure(pass, dev, args.tokens, args.d_model, repeats)
                    };
                    let pass = pass_name;
                    failed |= result.is_err();
                    let (timing, peak, error) = match result {
                        Ok((t, p)) => (Some(t), p, None),
                        Err(e) => (None, None, Some(e)),
                    };
                    let tokens_per_s = timing.as_ref().map(|t| args.tokens as f64 / t.median_s);
                    if let Some(t) = &timing {
                        let size = if n == 0 { String::new() } else { format!(" {root}²") };
                        bars.push((format!("{layer}{size}, {name}, {pass}"), 1e3 * t.median_s));
                    }
                    report.row(
                        vec![
                            layer.into(),
                            if n == 0 { "-".into() } else { format!("{root}²") },
                            name.clone(),
                            pass.into(),
                            timing.as_ref().map_or_else(
                                || format!("failed: {}", error.clone().unwrap_or_default()),
                                |t| t.median(),
                            ),
                            timing.as_ref().map_or("-".into(), |t| format!("{:.0}%", 100.0 * t.spread())),
                            tokens_per_s.map_or("-".into(), si),
                            bytes(peak),
                        ],
                        LayerRecord {
                            layer: layer.into(),
                            num_experts: n,
                            device: name.clone(),
                            pass,
                            tokens: args.tokens,
                            d_model: args.d_model,
                            heads: args.heads,
                            top_k: args.top_k,
                            key_dim: args.key_dim,
                            flops_per_token: flops,
                            timing,
                            tokens_per_s,
                            peak_rss_bytes: peak,
                            error,
                        },
                    );
                }
            }
        }
    }
    report.write(serde_json::json!({
        "peak_rss": "peak resident memory of the whole benchmark process while the measurement ran (sampled every 2 ms); for wgpu it covers host memory only",
        "dense": "GELU FFW whose forward FLOPs per token equal the PEER layer's at the first N (retrieval counted)",
    }));
    let title = format!("PEER layer vs FLOP-matched dense FFW, {} tokens (median)", args.tokens);
    draw_charts("backends", &[Chart::bars("backends.png", &title, "milliseconds", bars)]);
}

/// PEER-pytorch against this crate's layer on Flex, side by side in one run.
pub fn pytorch(args: &LayerArgs, python: &str) {
    let check = std::process::Command::new(python).args(["-c", "import torch, PEER_pytorch"]).output();
    if !check.map(|o| o.status.success()).unwrap_or(false) {
        println!(
            "PEER-pytorch is not importable by `{python}`: skipping (install with `{python} -m pip install peer-pytorch==0.2.2 torch`)"
        );
        return;
    }
    let repeats = Repeats { warmup: 1, timed: args.repeats };
    let device = Device::flex().autodiff();
    let mut report =
        Report::new("pytorch", &["N", "implementation", "forward+backward", "spread", "PyTorch time / ours"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/peer_pytorch_bench.py");
    let mut bars = Vec::new();
    for &root in &args.roots {
        let config = args.peer(root);
        let layer = config.init(&device);
        let ours = measure(Pass::RowSparse(&layer, true), &device, args.tokens, args.d_model, repeats);
        let mut dense_layer = layer.clone();
        dense_layer.experts.sparse_gradients = false;
        let dense_tables =
            measure(Pass::Backward(&|x| dense_layer.forward(x)), &device, args.tokens, args.d_model, repeats);
        drop(dense_layer);
        drop(layer);
        let output = std::process::Command::new(python)
            .arg(script)
            .args([
                args.d_model.to_string(),
                (root * root).to_string(),
                args.heads.to_string(),
                args.top_k.to_string(),
                (args.key_dim / 2).to_string(),
                args.tokens.to_string(),
                args.repeats.to_string(),
            ])
            .output()
            .expect("python runs");
        let theirs: Option<Timing> = serde_json::from_slice::<serde_json::Value>(&output.stdout).ok().map(|v| Timing {
            median_s: v["median_s"].as_f64().unwrap_or(f64::NAN),
            min_s: v["min_s"].as_f64().unwrap_or(f64::NAN),
            max_s: v["max_s"].as_f64().unwrap_or(f64::NAN),
            runs: v["runs"].as_u64().unwrap_or(0) as usize,
        });
        if theirs.is_none() {
            eprintln!("PEER-pytorch run failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let ours = ours.ok().map(|(t, _)| t);
        let dense_tables = dense_tables.ok().map(|(t, _)| t);
        let ratio = match (&ours, &theirs) {
            (Some(a), Some(b)) => Some(b.median_s / a.median_s),
            _ => None,
        };
        for (name, timing) in [
            ("peer-burn, sparse rows (flex)", &ours),
            ("peer-burn, dense tables (flex)", &dense_tables),
            ("PEER-pytorch (CPU)", &theirs),
        ] {
            if let Some(t) = timing {
                bars.push((format!("{name}, N = {root}²"), 1e3 * t.median_s));
            }
            report.row(
                vec![
                    format!("{root}²"),
                    name.into(),
                    timing.as_ref().map_or("failed".into(), |t| t.median()),
                    timing.as_ref().map_or("-".into(), |t| format!("{:.0}%", 100.0 * t.spread())),
                    if name.starts_with("PEER") { ratio.map_or("-".into(), |r| format!("{r:.2}")) } else { "-".into() },
                ],
                serde_json::json!({
                    "num_experts": root * root, "implementation": name, "timing": timing,
                    "pytorch_over_ours": ratio, "tokens": args.tokens, "d_model": args.d_model,
                    "heads": args.heads, "top_k": args.top_k, "key_dim": args.key_dim,
                }),
            );
        }
    }
    report.write(serde_json::json!({
        "pytorch": "PEER(non_competing_scores=False, dim_key=key_dim/2), torch threads = available cores; BatchNorm is ours only (PEER-pytorch has no query norm)",
        "ratio": "PyTorch time / ours with row-sparse table gradients (the layer's own backward pass), the way peer-train trains; the dense-table row is autodiff's dense [N, d_model] gradients"
    }));
    let title = format!("PEER layer forward + backward, {} tokens, CPU (median)", args.tokens);
    draw_charts("pytorch", &[Chart::bars("pytorch.png", &title, "milliseconds", bars)]);
}
