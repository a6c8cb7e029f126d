//! Row-sparse training of a whole `Transformer` (a plain `loss.backward()` with the PEER blocks'
//! own backward pass) computes exactly the gradients of the dense autodiff path: every
//! parameter, across several PEER blocks and an MoE auxiliary loss that crosses them.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use peer_core::{MoeConfig, MoeRouting, PeerConfig, QueryNorm, expert_pools, take_row_gradients};
use peer_model::{FeedForwardConfig, TransformerConfig};

use super::helpers::{D_MODEL, VOCAB, host, tokens};

struct Compare<'a> {
    dense: &'a GradientsParams,
    taped: &'a GradientsParams,
    tables: Vec<ParamId>,
    path: Vec<String>,
    compared: usize,
}

impl ModuleVisitor for Compare<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = self.path.join(".");
        let taped = self.taped.get::<D>(param.id);
        if self.tables.contains(&param.id) {
            assert!(taped.is_none(), "{name}: a row-sparse expert table got a dense gradient");
            return;
        }
        let (dense, taped) = match (self.dense.get::<D>(param.id), taped) {
            (Some(dense), Some(taped)) => (dense, taped),
            (None, None) => return, // buffers (BatchNorm running statistics)
            _ => panic!("{name}: gradient missing on one side"),
        };
        let (dense, taped) = (host(&dense), host(&taped));
        let scale = dense.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        for (a, b) in dense.iter().zip(&taped) {
            assert!((a - b).abs() <= 1e-4 * scale, "{name}: dense {a} vs taped {b}");
        }
        self.compared += 1;
    }
}

#[test]
fn row_sparse_model_gradients_equal_autodiff() {
    let device = Device::flex().autodiff();
    device.seed(3);
    let peer = PeerConfig::new(D_MODEL, 8 * 8)
        .with_heads(2)
        .with_top_k(4)
        .with_key_dim(16)
        .with_query_norm(QueryNorm::BatchNorm);
    let moe = MoeConfig::new(D_MODEL, 4, 32).with_top_k(2).with_routing(MoeRouting::TokenChoice);
    let config = TransformerConfig::new(VOCAB, D_MODEL, 4, 2, 32, FeedForwardConfig::Peer(peer))
        .with_block(0, FeedForwardConfig::Moe(moe))
        .with_tie_embeddings(false);
    let model = config.init(&device);
    let inputs = tokens(
        vec![(0..12).map(|i| i % VOCAB as i64).collect(), (0..12).map(|i| (3 * i + 1) % VOCAB as i64).collect()],
        &device,
    );
    let targets = tokens(
        vec![(1..13).map(|i| i % VOCAB as i64).collect(), (0..12).map(|i| (3 * i + 4) % VOCAB as i64).collect()],
        &device,
    );

    let mut dense_model = model.clone();
    dense_model.set_sparse_gradients(false);
    let (loss, _, _) = dense_model.loss(inputs.clone(), targets.clone());
    let dense = GradientsParams::from_grads(loss.backward(), &dense_model);

    let (loss, _, _) = model.loss(inputs, targets);
    let taped = GradientsParams::from_grads(loss.backward(), &model);
    let pools = expert_pools(&model);
    assert_eq!(pools.len(), 3, "three PEER blocks found by the module walk");

    let peers: Vec<_> = model.peer_layers().collect();
    let tables = peers.iter().flat_map(|p| [p.experts.down.id(), p.experts.up.id()]).collect();
    let mut compare = Compare { dense: &dense, taped: &taped, tables, path: Vec::new(), compared: 0 };
    model.visit(&mut compare);
    assert!(compare.compared > 20, "only {} parameters compared", compare.compared);

    // The tables: the rows' gradients equal the dense gradient's rows, which is zero elsewhere.
    for (peer, pool) in peers.into_iter().zip(&pools) {
        assert_eq!(pool.down, peer.experts.down.id(), "walk order = block order");
        assert!(pool.path.ends_with("feed_forward.Peer.experts.down"), "{}", pool.path);
        let rows = take_row_gradients(&peer.experts).expect("rows of this layer");
        let ids: Vec<i64> = rows.ids.to_data().iter::<i64>().collect();
        for (table, grad_rows) in [(&peer.experts.down, &rows.down), (&peer.experts.up, &rows.up)] {
            let full = host(&dense.get::<2>(table.id()).expect("dense table gradient"));
            let grad_rows = host(grad_rows);
            let scale = full.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            for (row, values) in full.chunks(D_MODEL).enumerate() {
                match ids.iter().position(|&id| id == row as i64) {
                    Some(r) => {
                        for (a, b) in values.iter().zip(&grad_rows[r * D_MODEL..(r + 1) * D_MODEL]) {
                            assert!((a - b).abs() <= 1e-4 * scale, "table row {row}: dense {a} vs rows {b}");
                        }
                    }
                    None => assert!(values.iter().all(|v| *v == 0.0), "row {row} was not retrieved"),
                }
            }
        }
    }
}
