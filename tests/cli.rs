//! The `peer` program end to end: bad inputs get one-line errors, a killed run resumes, NaN
//! loss stops training. Each test runs the real binary on a small corpus and a tiny model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn peer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_peer"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("peer-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Two books of the bundled corpus in one folder: small enough to tokenize in a blink.
fn small_corpus(dir: &Path) -> PathBuf {
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/web");
    for book in ["01-genesis.txt", "08-ruth.txt"] {
        std::fs::copy(bundled.join(book), corpus.join(book)).unwrap();
    }
    corpus
}

/// A 2-block PEER LM of width 32 on windows of 32 tokens.
fn tiny_config(dir: &Path, epochs: usize, steps: usize, learning_rate: f64) -> PathBuf {
    tiny_config_with(dir, epochs, steps, learning_rate, None)
}

fn tiny_config_with(dir: &Path, epochs: usize, steps: usize, learning_rate: f64, expert_std: Option<f64>) -> PathBuf {
    let config = serde_json::json!({
        "model": {
            "vocab_size": 0, "d_model": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 32,
            "feed_forward": { "Dense": { "d_model": 32, "hidden": 64, "kind": "Gelu" } },
            "block_feed_forward": [{ "block": 1, "feed_forward": { "Peer": {
                "d_model": 32, "num_experts": 256, "heads": 2, "top_k": 4, "key_dim": 16,
                "activation": "Gelu", "gate": "Softmax", "query_norm": "BatchNorm",
                "shared_keys": true, "query_bias": false, "expert_init_std": expert_std,
                "norm_momentum": 0.1, "norm_epsilon": 1e-5 } } }],
            "tie_embeddings": true, "rope_theta": 10000.0, "norm_epsilon": 1e-5
        },
        "vocab_size": 300, "batch_size": 4, "steps_per_epoch": steps, "epochs": epochs,
        "learning_rate": learning_rate, "expert_learning_rate": learning_rate,
        "warmup_steps": 2, "weight_decay": 0.0, "grad_clip_norm": 1.0, "seed": 1,
        "max_validation_windows": 8, "num_workers": 1
    });
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("peer runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failed run prints exactly one `error:` line, no panic, no backtrace.
fn assert_clean_error(o: &Output, expected: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, stdout: {}", String::from_utf8_lossy(&o.stdout));
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    for needle in expected {
        assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    }
}

/// `--seed` sets both seeds, `--data-seed` the data order's alone.
#[test]
fn seeds_from_the_command_line() {
    let config = |args: &[&str]| -> serde_json::Value {
        let o = run(peer().arg("train").args(args).arg("--print-config"));
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let both = config(&["--seed", "5"]);
    assert_eq!((&both["seed"], &both["data_seed"]), (&serde_json::json!(5), &serde_json::Value::Null));
    let split = config(&["--seed", "5", "--data-seed", "6"]);
    assert_eq!((&split["seed"], &split["data_seed"]), (&serde_json::json!(5), &serde_json::json!(6)));
}

/// `--ffn` swaps the PEER block for a FLOP-matched baseline; `--num-experts/--heads/--top-k`
/// resize it; bad values are one-line errors naming the flag's field.
#[test]
fn baselines_and_sizes_from_the_command_line() {
    let middle = |args: &[&str]| -> serde_json::Value {
        let o = run(peer().arg("train").args(args).arg("--print-config"));
        assert!(o.status.success(), "{}", stderr(&o));
        let config: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        config["model"]["block_feed_forward"][0]["feed_forward"].clone()
    };
    let peer_block = middle(&["--num-experts", "4096", "--heads", "2", "--top-k", "4"]);
    assert_eq!(
        (&peer_block["Peer"]["num_experts"], &peer_block["Peer"]["heads"], &peer_block["Peer"]["top_k"]),
        (&serde_json::json!(4096), &serde_json::json!(2), &serde_json::json!(4))
    );
    // The FLOPs of the default PEER block (2.1148 MFLOPs per token) at d_model 128: the
    // hidden width that comes closest, as `bench models` sizes its dense row.
    let dense = middle(&["--ffn", "dense"]);
    let hidden = dense["Dense"]["hidden"].as_u64().expect("a dense middle block");
    assert!((280..=300).contains(&hidden), "{dense}");
    let pkm = middle(&["--ffn", "pkm", "--num-experts", "4096"]);
    assert_eq!(pkm["Pkm"]["num_values"], 4096, "PKM takes the PEER block's N: {pkm}");
    assert!(middle(&["--ffn", "moe"])["Moe"]["num_experts"] == 16);

    let o = run(peer().args(["train", "--num-experts", "1000", "--print-config"]));
    assert_clean_error(&o, &["num_experts", "perfect square"]);
    let o = run(peer().args(["train", "--top-k", "500", "--print-config"]));
    assert_clean_error(&o, &["top_k", "at most"]);
    let o = run(peer().args(["train", "--ffn", "lstm", "--print-config"]));
    assert!(!o.status.success() && stderr(&o).contains("invalid value 'lstm'"), "{}", stderr(&o));
}

#[test]
fn bad_inputs_get_one_line_errors() {
    let dir = scratch("bad");
    let corpus = small_corpus(&dir);
    let config = tiny_config(&dir, 1, 2, 1e-3);
    let out = dir.join("run");
    let train = |extra: &[&str]| {
        let mut cmd = peer();
        cmd.args(["train", "--out"]).arg(&out).args(extra);
        run(&mut cmd)
    };

    let missing = dir.join("nowhere");
    let o = train(&["--corpus", missing.to_str().unwrap()]);
    assert_clean_error(&o, &["corpus path", "does not exist"]);

    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("blank.txt"), "\n  \n").unwrap();
    let o = train(&["--corpus", empty.to_str().unwrap()]);
    assert_clean_error(&o, &["is empty"]);

    let short = dir.join("short");
    std::fs::create_dir_all(&short).unwrap();
    std::fs::write(short.join("a.txt"), "In the beginning.\nAnd the end.\n").unwrap();
    std::fs::write(short.join("b.txt"), "Short.\n").unwrap();
    let o = train(&["--corpus", short.to_str().unwrap(), "--config", config.to_str().unwrap()]);
    assert_clean_error(&o, &["fewer than one window of seq_len + 1 = 33"]);

    let o = train(&["--device", "tpu"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("invalid value 'tpu'"), "{}", stderr(&o));
    let o = train(&["--device", "cuda", "--corpus", corpus.to_str().unwrap()]);
    assert_clean_error(&o, &["`cuda` is not compiled into this build"]);

    let bad_json = dir.join("bad.json");
    std::fs::write(&bad_json, "{ \"model\": 3 ").unwrap();
    let o = train(&["--config", bad_json.to_str().unwrap()]);
    assert_clean_error(&o, &["bad.json", "is not a valid training configuration"]);

    let mut invalid: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    invalid["model"]["block_feed_forward"][0]["feed_forward"]["Peer"]["num_experts"] = serde_json::json!(250);
    let invalid_path = dir.join("invalid.json");
    std::fs::write(&invalid_path, invalid.to_string()).unwrap();
    let o = train(&["--config", invalid_path.to_str().unwrap(), "--corpus", corpus.to_str().unwrap()]);
    assert_clean_error(&o, &["num_experts", "perfect square"]);

    let mut invalid: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    invalid["key_weight_decay"] = serde_json::json!(-0.5);
    std::fs::write(&invalid_path, invalid.to_string()).unwrap();
    let o = train(&["--config", invalid_path.to_str().unwrap(), "--corpus", corpus.to_str().unwrap()]);
    assert_clean_error(&o, &["key_weight_decay", "must be finite and non-negative, got -0.5"]);

    let o = run(peer().args(["generate", "--checkpoint"]).arg(dir.join("no-model")));
    assert_clean_error(&o, &["checkpoint.json", "does not exist"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Acceptance 3 of the training issue: kill a run after a checkpoint, resume it, and check
/// that it continues at the next epoch with the loss it had reached.
#[test]
fn a_killed_run_resumes_where_it_stopped() {
    let dir = scratch("resume");
    let corpus = small_corpus(&dir);
    let config = tiny_config(&dir, 3, 30, 3e-3);
    let out = dir.join("run");
    let mut child = peer()
        .args(["train", "--corpus", corpus.to_str().unwrap(), "--config", config.to_str().unwrap(), "--out"])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let checkpoint = out.join("checkpoint");
    let complete = |epoch: usize| {
        ["model", "optim", "scheduler"].iter().all(|p| checkpoint.join(format!("{p}-{epoch}.bpk")).exists())
    };
    let start = Instant::now();
    while !complete(1) {
        assert!(child.try_wait().unwrap().is_none(), "training ended before its first checkpoint");
        assert!(start.elapsed() < Duration::from_secs(300), "no checkpoint after 5 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!complete(3), "the run finished before it could be killed");
    assert!(!out.join("model").exists());

    let o = run(peer()
        .args([
            "train",
            "--resume",
            "--corpus",
            corpus.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--out",
        ])
        .arg(&out));
    assert!(o.status.success(), "resume failed: {}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let resumed_from = if complete(2) && stdout.contains("training epochs 3..=3") { 3 } else { 2 };
    assert!(stdout.contains(&format!("training epochs {resumed_from}..=3")), "{stdout}");

    // Step counter: the final model records all 3 × 30 steps.
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model/checkpoint.json")).unwrap()).unwrap();
    assert_eq!(meta["step"], 90);

    // Loss continues: the first losses after resuming are far below the first losses of the run.
    let losses = |epoch: usize| -> Vec<f64> {
        let text = std::fs::read_to_string(out.join(format!("train/epoch-{epoch}/Loss.log"))).unwrap();
        text.lines().filter_map(|l| l.split(',').next()?.trim().parse().ok()).collect()
    };
    let first = losses(1);
    let resumed = losses(resumed_from);
    let start_of_run = first[..3].iter().sum::<f64>() / 3.0;
    let end_of_first = first[first.len() - 3..].iter().sum::<f64>() / 3.0;
    let start_of_resume = resumed[..3].iter().sum::<f64>() / 3.0;
    assert!(
        start_of_resume < start_of_run - 0.5 * (start_of_run - end_of_first),
        "resumed at loss {start_of_resume}, run started at {start_of_run}, epoch 1 ended at {end_of_first}"
    );
    // The trained model evaluates and generates.
    let model = out.join("model");
    let o = run(peer().args(["eval", "--corpus", corpus.to_str().unwrap(), "--checkpoint"]).arg(&model));
    assert!(o.status.success(), "eval failed: {}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for line in [
        "validation perplexity",
        "block 1: expert usage",
        "uniform ceiling",
        "top 1% of experts take",
        "sub-keys used per head",
        "selection unevenness",
        "sub-key norms",
        "the 10 most frequent input tokens",
    ] {
        assert!(stdout.contains(line), "eval prints {line:?}: {stdout}");
    }
    let evaluation: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("evaluation.json")).unwrap()).unwrap();
    assert!(evaluation["routing"][0]["report"]["usage"].as_f64().is_some(), "{evaluation}");
    let frequent = &evaluation["routing"][0]["frequent_tokens"];
    assert_eq!(frequent["tokens"].as_array().map(Vec::len), Some(10), "{evaluation}");
    let png = std::fs::read(model.join("expert_load.png")).expect("the load chart is drawn");
    assert!(png.starts_with(b"\x89PNG"));
    let generate = |seed: &str| {
        let o = run(peer()
            .args(["generate", "--prompt", "And God", "--max-tokens", "8", "--seed", seed, "--checkpoint"])
            .arg(&model));
        assert!(o.status.success(), "generate failed: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let text = generate("3");
    assert!(text.starts_with("sample: And God"), "{text}");
    assert_eq!(text, generate("3"), "same seed, same text");

    // A tokenizer other than the run's is refused on resume.
    let other = dir.join("other-tokenizer.json");
    let run_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    let original = PathBuf::from(run_json["tokenizer"]["path"].as_str().unwrap());
    let mut tokenizer: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&original).unwrap()).unwrap();
    tokenizer["added_tokens"][0]["content"] = serde_json::json!("<|other|>");
    std::fs::write(&other, tokenizer.to_string()).unwrap();
    let o = run(peer()
        .args([
            "train",
            "--resume",
            "--corpus",
            corpus.to_str().unwrap(),
            "--tokenizer",
            other.to_str().unwrap(),
            "--out",
        ])
        .arg(&out));
    assert_clean_error(&o, &["tokenizer mismatch"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn nan_loss_stops_training_and_keeps_the_last_good_checkpoint() {
    let dir = scratch("nan");
    let corpus = small_corpus(&dir);
    // Expert tables of scale 1e30 overflow f32 in the first forward pass.
    let config = tiny_config_with(&dir, 3, 5, 1e-3, Some(1e30));
    let out = dir.join("run");
    let o = run(peer()
        .args(["train", "--corpus", corpus.to_str().unwrap(), "--config", config.to_str().unwrap(), "--out"])
        .arg(&out));
    assert_clean_error(&o, &["training stopped: the loss became", "no checkpoint had been written yet"]);
    assert!(!out.join("model").exists(), "a NaN model must not be saved as the result");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn info_prints_costs() {
    let o = run(peer().arg("info"));
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("active parameters/token") && stdout.contains("block 2: peer"), "{stdout}");
}

/// The same training code path on wgpu (Mesa's CPU Vulkan driver in CI): a few steps, then
/// the model is saved and evaluated.
#[test]
fn trains_a_few_steps_on_wgpu() {
    let dir = scratch("wgpu");
    let corpus = small_corpus(&dir);
    let config = tiny_config(&dir, 1, 3, 3e-3);
    let out = dir.join("run");
    let o = run(peer()
        .args([
            "train",
            "--device",
            "wgpu",
            "--corpus",
            corpus.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--out",
        ])
        .arg(&out));
    assert!(o.status.success(), "wgpu training failed: {}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("device Wgpu") && stdout.contains("validation perplexity"), "{stdout}");
    assert!(out.join("model/model.bpk").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
