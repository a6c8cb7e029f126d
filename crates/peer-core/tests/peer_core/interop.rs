//! A PEER-pytorch layer's weights give the same outputs here (fixture made by
//! `tests/fixtures/make_peer_pytorch_fixture.py`; no Python needed to run this).

use std::path::PathBuf;

use burn::tensor::Device;
use peer_core::interop::load_peer_pytorch;
use peer_core::{KeyScoring, PeerConfig, QueryNorm};
use safetensors::SafeTensors;

use super::backends::wgpu_device;
use super::reference::{host, relative_error, tensor};

fn fixture() -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peer_pytorch_fixture.safetensors");
    std::fs::read(path).expect("fixture is checked in")
}

fn read(file: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    file.tensor(name).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn config() -> PeerConfig {
    PeerConfig::new(16, 64)
        .with_heads(2)
        .with_top_k(4)
        .with_key_dim(8)
        .with_shared_keys(false)
        .with_scoring(KeyScoring::Dot)
        .with_query_norm(QueryNorm::None)
}

fn check(device: &Device) {
    let bytes = fixture();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peer_pytorch_fixture.safetensors");
    let peer = load_peer_pytorch(config().init(device), &path).unwrap();
    let y = peer.forward(tensor(read(&file, "input"), [2, 5, 16], device));
    let expected: Vec<f64> = read(&file, "output").into_iter().map(f64::from).collect();
    let err = relative_error(&host(&y), &expected);
    assert!(err < 1e-4, "relative error {err} against PEER-pytorch");
}

#[test]
fn peer_pytorch_fixture_matches_on_flex() {
    check(&Device::flex());
}

#[test]
fn peer_pytorch_fixture_matches_on_wgpu() {
    if let Some(device) = wgpu_device() {
        check(&device);
    }
}

#[test]
fn peer_pytorch_loading_refuses_mismatches() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peer_pytorch_fixture.safetensors");
    let device = Device::flex();
    let err = load_peer_pytorch(config().with_shared_keys(true).init(&device), &path).unwrap_err();
    assert!(err.to_string().contains("shared_keys must be false"), "{err}");
    let err = load_peer_pytorch(config().with_scoring(KeyScoring::Cosine).init(&device), &path).unwrap_err();
    assert!(err.to_string().contains("scoring must be Dot"), "{err}");
    let err = load_peer_pytorch(config().with_query_norm(QueryNorm::BatchNorm).init(&device), &path).unwrap_err();
    assert!(err.to_string().contains("query_norm must be None"), "{err}");
    let err = load_peer_pytorch(PeerConfig { d_model: 32, ..config() }.init(&device), &path).unwrap_err();
    assert!(
        err.to_string().contains("`to_queries.0.weight` has shape [16, 16], the Peer layer needs [16, 32]"),
        "{err}"
    );
    let err = load_peer_pytorch(config().init(&device), &path.with_extension("missing")).unwrap_err();
    assert!(err.to_string().contains("cannot read"), "{err}");
}
