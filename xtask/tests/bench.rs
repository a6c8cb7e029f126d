//! Every `cargo xtask bench` subcommand runs at a toy size and writes its JSON and its PNG
//! charts, so none rots. Not timed: the figures are whatever this machine gives.

use std::path::Path;
use std::process::Command;

fn bench(dir: &Path, args: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("bench")
        .args(args)
        .env("PEER_BENCH_DIR", dir)
        .output()
        .expect("xtask runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{args:?} failed: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("|---|"), "{args:?} printed no table: {stdout}");
    let name = args[0];
    let json = std::fs::read_to_string(dir.join(format!("{name}.json"))).expect("JSON written");
    let charts: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{name}.charts.json"))).expect("charts written"),
    )
    .expect("valid chart spec");
    for chart in charts {
        let png = dir.join(chart["file"].as_str().unwrap());
        let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert!(bytes.starts_with(b"\x89PNG"), "{} is not a PNG", png.display());
    }
    serde_json::from_str(&json).expect("valid JSON")
}

#[test]
fn every_subcommand_runs_at_toy_size() {
    let dir = std::env::temp_dir().join(format!("peer-xtask-{}", std::process::id()));
    // The toy layer both benchmark families share.
    let sizes = ["--roots", "4,8", "--d-model", "32", "--key-dim", "16", "--heads", "2", "--top-k", "4"];
    let layer: Vec<&str> = sizes.iter().copied().chain(["--tokens", "32", "--repeats", "1"]).collect();

    let mut args = vec!["backends"];
    args.extend(&layer);
    let backends = bench(&dir, &args);
    let records = backends["records"].as_array().unwrap();
    for device in ["flex", "ndarray", "wgpu"] {
        assert!(
            records
                .iter()
                .any(|r| r["device"] == device && r["layer"] == "peer" && r["timing"]["median_s"].as_f64().is_some()),
            "no {device} row"
        );
    }
    assert!(records.iter().any(|r| r["layer"].as_str().unwrap().starts_with("dense")));
    for pass in ["forward", "forward+backward (sparse rows)", "forward+backward (dense tables)"] {
        assert!(records.iter().any(|r| r["layer"] == "peer" && r["pass"] == pass), "no {pass} row");
    }

    let mut args = vec!["scaling"];
    args.extend(sizes);
    args.extend(["--batch", "2", "--seq-len", "16", "--repeats", "1"]);
    let scaling = bench(&dir, &args);
    let records = scaling["records"].as_array().unwrap();
    assert_eq!(records.len(), 4, "two sizes × sparse and dense updates");
    for r in records {
        for phase in ["retrieval", "experts", "optimizer", "rest"] {
            assert!(r["phases_s"][phase].as_f64().is_some(), "no {phase} phase: {r}");
        }
    }

    let models = bench(&dir, &["models", "--toy", "--seeds", "2"]);
    let records = models["records"].as_array().unwrap();
    for r in records {
        assert_eq!(r["valid_perplexity_per_seed"].as_array().map(Vec::len), Some(2), "two seeds: {r}");
    }
    let verdicts = models["notes"]["verdicts"].as_array().expect("verdicts recorded");
    assert_eq!(verdicts.len(), 3, "PEER vs dense, the N sweep, expert usage: {verdicts:?}");
    assert!(verdicts[2].as_str().unwrap().contains("of its ceiling"), "{verdicts:?}");
    assert_eq!(models["notes"]["jobs"], 2, "two runs at a time, each in its own process");
    let names: Vec<&str> = records.iter().map(|r| r["model"].as_str().unwrap()).collect();
    assert!(
        names.iter().any(|n| n.starts_with("dense"))
            && names.iter().any(|n| n.starts_with("moe"))
            && names.iter().any(|n| n.starts_with("pkm"))
    );
    assert_eq!(names.iter().filter(|n| n.starts_with("peer")).count(), 2, "{names:?}");
    let flops: Vec<f64> = records.iter().map(|r| r["forward_flops_per_token"].as_f64().unwrap()).collect();
    assert!(flops.iter().all(|f| (f / flops[3] - 1.0).abs() < 0.05), "not FLOP-matched: {flops:?}");

    // Without PEER-pytorch this prints that it skips; with it, it measures. Either way it runs.
    let mut args = vec!["pytorch"];
    args.extend(&layer);
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("bench")
        .args(&args)
        .env("PEER_BENCH_DIR", &dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    std::fs::remove_dir_all(&dir).ok();
}
