//! Acceptance 4: save → load reproduces logits exactly; bad checkpoints give clear errors.

use std::fs;
use std::path::PathBuf;

use burn::module::Module;
use burn::tensor::Device;
use peer_model::checkpoint::{
    CONFIG_FILE, CheckpointError, CheckpointMeta, META_FILE, WEIGHTS_FILE, export_safetensors, import_safetensors,
    load_model, replace_atomic, save_model,
};

use super::helpers::{host, kinds, tiny, tokens};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("peer-model-test-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

#[test]
fn save_then_load_reproduces_logits_exactly() {
    let device = Device::flex();
    let input = tokens(vec![vec![1, 4, 2, 8, 5, 7]], &device);
    for (i, ffw) in kinds().into_iter().enumerate() {
        let config = tiny(ffw);
        let model = config.init(&device);
        let dir = scratch(&format!("roundtrip-{i}"));
        let meta = CheckpointMeta { step: 42, ..Default::default() };
        save_model(&dir, &config, &model, &meta).unwrap();
        let (loaded_config, loaded, loaded_meta) = load_model(&dir, &device).unwrap();
        assert_eq!(loaded_config, config);
        assert_eq!(loaded_meta.step, 42);
        let a = host(&model.valid().forward(input.clone()).logits);
        let b = host(&loaded.valid().forward(input.clone()).logits);
        assert_eq!(a, b, "{}", config.feed_forward.kind());
        // No temporary files are left behind.
        let names: Vec<String> =
            fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn safetensors_export_import_round_trip() {
    let device = Device::flex();
    let config = tiny(kinds().pop().unwrap());
    let model = config.init(&device);
    let dir = scratch("safetensors");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    export_safetensors(&model, &path).unwrap();
    let imported = import_safetensors(config.init(&device), &path).unwrap();
    let input = tokens(vec![vec![3, 1, 4, 1, 5]], &device);
    assert_eq!(host(&model.valid().forward(input.clone()).logits), host(&imported.valid().forward(input).logits));
    // Into a model of another shape: refused.
    let wrong = peer_model::TransformerConfig { vocab_size: 40, ..config.clone() };
    let err = import_safetensors(wrong.init(&device), &path);
    assert!(err.is_err());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_checkpoints_get_clear_errors() {
    let device = Device::flex();
    let config = tiny(kinds().pop().unwrap());
    let model = config.init(&device);
    let dir = scratch("bad");
    save_model(&dir, &config, &model, &CheckpointMeta::default()).unwrap();

    // Weights saved for another configuration.
    let other = scratch("bad-other");
    let wider = peer_model::TransformerConfig { vocab_size: 40, ..config.clone() };
    save_model(&other, &wider, &wider.init(&device), &CheckpointMeta::default()).unwrap();
    fs::copy(other.join(WEIGHTS_FILE), dir.join(WEIGHTS_FILE)).unwrap();
    let err = load_model(&dir, &device).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CheckpointError::Weights { .. }), "{text}");
    assert!(text.contains(WEIGHTS_FILE) && text.contains("do not match"), "{text}");

    // Truncated weights.
    save_model(&dir, &config, &model, &CheckpointMeta::default()).unwrap();
    let bytes = fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    fs::write(dir.join(WEIGHTS_FILE), &bytes[..bytes.len() / 2]).unwrap();
    let text = load_model(&dir, &device).unwrap_err().to_string();
    assert!(text.contains(WEIGHTS_FILE), "{text}");

    // Missing weights, missing config, corrupt config, corrupt metadata.
    fs::remove_file(dir.join(WEIGHTS_FILE)).unwrap();
    let text = load_model(&dir, &device).unwrap_err().to_string();
    assert!(text.contains("does not exist") && text.contains(WEIGHTS_FILE), "{text}");
    fs::write(dir.join(CONFIG_FILE), "{ not json").unwrap();
    let text = load_model(&dir, &device).unwrap_err().to_string();
    assert!(text.contains(CONFIG_FILE) && text.contains("not a valid model configuration"), "{text}");
    fs::remove_file(dir.join(CONFIG_FILE)).unwrap();
    let text = load_model(&dir, &device).unwrap_err().to_string();
    assert!(text.contains("does not exist") && text.contains(CONFIG_FILE), "{text}");
    save_model(&dir, &config, &model, &CheckpointMeta::default()).unwrap();
    fs::write(dir.join(META_FILE), "[]").unwrap();
    let text = load_model(&dir, &device).unwrap_err().to_string();
    assert!(text.contains(META_FILE) && text.contains("not a valid checkpoint metadata"), "{text}");

    // An invalid configuration names the field.
    let mut json: serde_json::Value = serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
    json["num_heads"] = serde_json::json!(5);
    fs::write(dir.join(CONFIG_FILE), json.to_string()).unwrap();
    let text = load_model(&dir, &device).unwrap_err().to_string();
    assert!(text.contains("`num_heads`"), "{text}");
    fs::remove_dir_all(&dir).unwrap();
    fs::remove_dir_all(&other).unwrap();
}

/// A configuration written before the routing options existed (no `scoring`, `score_scale`,
/// `balance_loss`, `balance`, `expert_up_init_std`) loads with the behaviour it was trained
/// with, not with today's defaults (which turn the balance loss on).
#[test]
fn configs_from_before_the_routing_options_keep_their_behaviour() {
    use peer_core::{Balance, KeyScoring, PeerConfig, PkmConfig};
    use peer_model::{FeedForwardConfig, TransformerConfig, complete_legacy_json};

    fn strip(value: &mut serde_json::Value, layers: &mut usize) {
        match value {
            serde_json::Value::Object(fields) => {
                for (key, inner) in fields.iter_mut() {
                    if let ("Peer" | "Pkm", serde_json::Value::Object(layer)) = (key.as_str(), &mut *inner) {
                        for field in ["scoring", "score_scale", "balance_loss", "balance", "expert_up_init_std"] {
                            layer.remove(field);
                        }
                        layer.insert("shared_keys".into(), serde_json::json!(true));
                        *layers += 1;
                    }
                    strip(inner, layers);
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| strip(v, layers)),
            _ => {}
        }
    }
    for ffw in [
        FeedForwardConfig::Peer(PeerConfig::new(16, 8 * 8).with_key_dim(8).with_top_k(4)),
        FeedForwardConfig::Pkm(PkmConfig::new(16, 8 * 8).with_key_dim(8).with_top_k(4)),
    ] {
        let config = TransformerConfig::dense(300, 16, 2, 2, 8, 32).with_middle_block(ffw);
        let mut json = serde_json::to_value(&config).unwrap();
        let mut layers = 0;
        strip(&mut json, &mut layers);
        assert_eq!(layers, 1, "one product-key layer in {json}");
        assert!(serde_json::from_value::<TransformerConfig>(json.clone()).is_err(), "Burn's Config needs every field");

        complete_legacy_json(&mut json);
        let loaded: TransformerConfig = serde_json::from_value(json).unwrap();
        let found = loaded.block_feed_forward.iter().find_map(|block| match &block.feed_forward {
            FeedForwardConfig::Peer(p) => Some((p.shared_keys, p.scoring, p.balance_loss, p.balance)),
            FeedForwardConfig::Pkm(p) => Some((p.shared_keys, p.scoring, p.balance_loss, p.balance)),
            _ => None,
        });
        assert_eq!(found, Some((true, KeyScoring::Dot, 0.0, Balance::SubKeys)));
    }
}

#[test]
fn replace_atomic_keeps_the_old_file_when_the_writer_fails_and_leaves_no_temporary() {
    let dir = scratch("replace-atomic");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("record.bpk");
    fs::write(&path, b"old").unwrap();

    // A writer that writes part of its file, then fails (a full disk, a killed serialiser).
    let error = replace_atomic(&path, |tmp| {
        fs::write(tmp, b"half").unwrap();
        Err("disk full")
    })
    .unwrap_err();
    assert!(error.contains("disk full"), "{error}");
    assert_eq!(fs::read(&path).unwrap(), b"old");
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "the temporary file is removed");

    replace_atomic(&path, |tmp| fs::write(tmp, b"new")).unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"new");
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "nothing but the renamed file is left");
    fs::remove_dir_all(&dir).unwrap();
}
