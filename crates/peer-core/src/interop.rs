//! Loading weights from the PyTorch reference implementation, PEER-pytorch (lucidrains,
//! `peer-pytorch` 0.2.2 on PyPI).
//!
//! Supported: `PEER(dim, heads, num_experts, num_experts_per_head = k, dim_key,
//! separate_embed_per_head = False, pre_rmsnorm = False, non_competing_scores = False)`, whose
//! forward pass is the paper's (softmax over each head's k scores, GELU experts, per-head keys,
//! no query norm). Save its `state_dict()` with `safetensors.torch.save_file`.
//!
//! Layouts, PyTorch → this crate (`dk` = PEER-pytorch's `dim_key`, one half of our `key_dim`):
//!
//! | PEER-pytorch | shape | here | shape | mapping |
//! |---|---|---|---|---|
//! | `to_queries.0.weight` | `[2·h·dk, dim]`, rows `(half, head, d)` | `query.linear.weight` | `[dim, h·2dk]`, columns `(head, half, d)` | `ours[i, h·2dk + p·dk + d] = theirs[p·h·dk + h·dk + d, i]` |
//! | `keys` | `[h, √N, 2, dk]` | `product_keys.sub_keys` | `[h, 2, √N, dk]` | `ours[h, p, i, d] = theirs[h, i, p, d]` |
//! | `weight_down_embed.weight` | `[N, dim]` | `experts.down` | `[N, dim]` | identical |
//! | `weight_up_embed.weight` | `[N, dim]` | `experts.up` | `[N, dim]` | identical |

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::config::{Activation, Gate, KeyScoring};
use crate::peer::Peer;

/// Why PEER-pytorch weights could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum InteropError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not SafeTensors, or a tensor is missing or of the wrong shape or type.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The `Peer` is not configured like the PEER-pytorch layer can be.
    #[error("the Peer layer must be configured as PEER-pytorch computes: {0}")]
    Config(String),
}

/// Loads a PEER-pytorch state dict (SafeTensors) into `peer`, which must have per-head keys
/// (`shared_keys = false`), inner-product scoring (`KeyScoring::Dot`), no query norm, no query
/// bias, GELU and softmax, and the same sizes.
pub fn load_peer_pytorch(mut peer: Peer, path: &Path) -> Result<Peer, InteropError> {
    let requirements = [
        (peer.product_keys.is_shared(), "shared_keys must be false (PEER-pytorch has one key set per head)"),
        (peer.product_keys.scoring != KeyScoring::Dot, "scoring must be Dot (PEER-pytorch scores by inner products)"),
        (peer.query.batch_norm.is_some() || peer.query.layer_norm.is_some(), "query_norm must be None"),
        (peer.query.linear.bias.is_some(), "query_bias must be false"),
        (peer.experts.activation != Activation::Gelu, "activation must be Gelu"),
        (peer.gate != Gate::Softmax, "gate must be Softmax (non_competing_scores = False)"),
    ];
    if let Some((_, rule)) = requirements.iter().find(|(broken, _)| *broken) {
        return Err(InteropError::Config((*rule).into()));
    }
    let bytes = std::fs::read(path).map_err(|source| InteropError::Io { path: path.to_path_buf(), source })?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| InteropError::Format {
        path: path.to_path_buf(),
        reason: format!("not a SafeTensors file: {e}"),
    })?;
    let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>, InteropError> {
        let format = |reason: String| InteropError::Format { path: path.to_path_buf(), reason };
        let view = file.tensor(name).map_err(|_| format(format!("tensor `{name}` is missing")))?;
        if view.shape() != shape {
            return Err(format(format!(
                "tensor `{name}` has shape {:?}, the Peer layer needs {shape:?}",
                view.shape()
            )));
        }
        if view.dtype() != Dtype::F32 {
            return Err(format(format!("tensor `{name}` is {:?}, expected F32", view.dtype())));
        }
        Ok(view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    };

    let [dim, features] = peer.query.linear.weight.dims();
    let [heads, _, root, dk] = peer.product_keys.sub_keys.dims();
    let num_experts = root * root;

    let theirs = read("to_queries.0.weight", &[2 * heads * dk, dim])?;
    let mut query = vec![0.0; dim * features];
    for p in 0..2 {
        for h in 0..heads {
            for d in 0..dk {
                let row = p * heads * dk + h * dk + d;
                let column = h * 2 * dk + p * dk + d;
                for i in 0..dim {
                    query[i * features + column] = theirs[row * dim + i];
                }
            }
        }
    }
    let theirs = read("keys", &[heads, root, 2, dk])?;
    let mut keys = vec![0.0; heads * 2 * root * dk];
    for h in 0..heads {
        for i in 0..root {
            for p in 0..2 {
                for d in 0..dk {
                    keys[((h * 2 + p) * root + i) * dk + d] = theirs[((h * root + i) * 2 + p) * dk + d];
                }
            }
        }
    }
    let down = read("weight_down_embed.weight", &[num_experts, dim])?;
    let up = read("weight_up_embed.weight", &[num_experts, dim])?;

    replace(&mut peer.query.linear.weight, query, [dim, features]);
    replace(&mut peer.product_keys.sub_keys, keys, [heads, 2, root, dk]);
    for (table, values) in [(&mut peer.experts.down, down), (&mut peer.experts.up, up)] {
        table.set(Tensor::from_data(TensorData::new(values, [num_experts, dim]), &table.val().device().inner()));
    }
    Ok(peer)
}

/// Swaps a parameter's value, keeping its id and its gradient requirement.
fn replace<const D: usize>(param: &mut Param<Tensor<D>>, values: Vec<f32>, shape: [usize; D]) {
    let placeholder = Param::from_tensor(Tensor::zeros([1; D], &param.val().device()));
    let old = std::mem::replace(param, placeholder);
    *param = old.map(|tensor| {
        let fresh = Tensor::from_data(TensorData::new(values, shape), &tensor.device());
        if tensor.is_require_grad() { fresh.require_grad() } else { fresh }
    });
}
