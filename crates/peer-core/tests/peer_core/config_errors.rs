//! Acceptance 5: every invalid configuration is refused with a message naming field and rule.

use burn::tensor::Device;
use peer_core::{PeerConfig, PkmConfig, ProductKeysConfig};

fn valid() -> PeerConfig {
    PeerConfig::new(32, 16 * 16).with_heads(2).with_top_k(4).with_key_dim(8)
}

#[test]
fn each_invalid_config_names_its_field_and_rule() {
    let cases: Vec<(PeerConfig, &str, &str)> = vec![
        (PeerConfig { num_experts: 1000, ..valid() }, "num_experts", "must be a perfect square"),
        (PeerConfig { num_experts: 0, ..valid() }, "num_experts", "must be at least 1"),
        (valid().with_top_k(17), "top_k", "must be at most √num_experts = 16"),
        (valid().with_top_k(0), "top_k", "must be at least 1"),
        (valid().with_key_dim(7), "key_dim", "must be even"),
        (valid().with_key_dim(0), "key_dim", "must be at least 1"),
        (valid().with_heads(0), "heads", "must be at least 1"),
        (PeerConfig { d_model: 0, ..valid() }, "d_model", "must be at least 1"),
        (valid().with_expert_init_std(Some(0.0)), "expert_init_std", "must be finite and positive"),
        (valid().with_expert_init_std(Some(f64::NAN)), "expert_init_std", "must be finite and positive"),
        (valid().with_expert_up_init_std(Some(-0.1)), "expert_up_init_std", "must be finite and non-negative"),
        (valid().with_norm_momentum(1.5), "norm_momentum", "must lie in [0, 1]"),
        (valid().with_norm_epsilon(0.0), "norm_epsilon", "must be finite and positive"),
        (valid().with_score_scale(Some(-1.0)), "score_scale", "must be finite and positive, got -1"),
        (valid().with_balance_loss(-0.5), "balance_loss", "must be finite and non-negative, got -0.5"),
        (valid().with_balance_loss(f64::INFINITY), "balance_loss", "must be finite and non-negative, got inf"),
    ];
    let cases_len = cases.len();
    let device = Device::flex();
    let mut messages = std::collections::BTreeSet::new();
    for (config, field, rule) in cases {
        let err = config.validate().expect_err(field);
        assert_eq!(err.field, field);
        let message = err.to_string();
        assert!(message.contains(&format!("`{field}`")), "{message}");
        assert!(message.contains(rule), "{message} lacks {rule:?}");
        // init refuses with the same message, before any tensor is made.
        assert_eq!(config.try_init(&device).unwrap_err(), err);
        let panic = std::panic::catch_unwind(|| config.init(&device)).expect_err("init must refuse");
        let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert_eq!(text, message);
        messages.insert(message);
    }
    assert_eq!(messages.len(), cases_len, "messages must differ: {messages:#?}");
    assert!(valid().validate().is_ok());
}

#[test]
fn product_keys_config_is_validated_too() {
    let err = ProductKeysConfig::new(15, 4, 2, 1).validate().unwrap_err();
    assert_eq!(err.field, "num_experts");
    assert!(err.to_string().contains("nearest squares are 9 and 16"), "{err}");
    let err = ProductKeysConfig::new(16, 4, 2, 0).validate().unwrap_err();
    assert_eq!(err.field, "heads");
}

/// The product-key remedies are refused with the same rules by every layer that has them.
#[test]
fn pkm_and_product_keys_refuse_bad_remedies() {
    let pkm = PkmConfig::new(32, 16 * 16).with_heads(2).with_top_k(4).with_key_dim(8);
    assert!(pkm.validate().is_ok());
    assert_eq!(pkm.clone().with_balance_loss(f64::NAN).validate().unwrap_err().field, "balance_loss");
    assert_eq!(pkm.with_score_scale(Some(0.0)).validate().unwrap_err().field, "score_scale");
    let keys = ProductKeysConfig::new(16, 4, 2, 1);
    assert_eq!(keys.clone().with_balance_loss(-1.0).validate().unwrap_err().field, "balance_loss");
    assert_eq!(keys.with_score_scale(Some(f64::NAN)).validate().unwrap_err().field, "score_scale");
}
