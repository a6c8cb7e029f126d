//! Row-sparse training of the expert tables inside an ordinary autodiff graph.
//!
//! Burn's gather backward writes a dense `[N, d_model]` gradient per table, and there is no
//! custom-backward hook for a fused op. The tape sidesteps both: a PEER layer computes its
//! experts without autodiff ([`Experts::forward_detached`]) and hands the rest of the model a
//! fresh leaf. Every other tensor that crosses that point (the residual stream, an auxiliary
//! loss) is cut the same way with [`ExpertTape::cut`]. The graph is thus split into segments.
//! [`ExpertTape::backward`] runs them from the loss back to the input: each segment's backward
//! yields dL/dy for the layer below it; [`Experts::backward_detached`] turns that into dL/dx,
//! dL/dg and the gradients of the retrieved rows; and the segment before is differentiated
//! through the surrogate `Σ x·dL/dx + Σ g·dL/dg + Σ r·dL/dr` (r: the cut tensors), whose
//! gradient with respect to every earlier parameter is exactly the chain rule's.
//!
//! On Flex the taped layer runs retrieval and router weights by hand as well (the fused host
//! kernels): the graph then resumes at the queries q and the sub-keys K, and the surrogate is
//! `Σ x·dL/dx + Σ q·dL/dq + Σ K·dL/dK + Σ r·dL/dr`, `dL/dK` nonzero on retrieved sub-keys only.
//!
//! ```
//! use burn::tensor::{Device, Distribution, Tensor};
//! use peer_core::{ExpertTape, PeerConfig};
//!
//! let device = Device::flex().autodiff();
//! let peer = PeerConfig::new(16, 8 * 8).with_heads(2).with_top_k(4).with_key_dim(8).init(&device);
//! let x = Tensor::<3>::random([2, 3, 16], Distribution::Normal(0.0, 1.0), &device).require_grad();
//!
//! let mut tape = ExpertTape::new();
//! let (y, _routing) = peer.forward_taped(x.clone(), &mut tape);
//! let residual = tape.cut(x.clone());
//! let loss = (residual + y).powi_scalar(2).sum();
//!
//! let gradients = tape.backward(loss);
//! assert_eq!(gradients.rows.len(), 1); // the rows the layer retrieved, one entry per layer
//! let dx = gradients.grad(&x).unwrap(); // summed over all segments
//! assert_eq!(dx.dims(), [2, 3, 16]);
//! ```

use burn::module::{Module, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Gradients, Int, Tensor};

use crate::experts::{Experts, RowGradients};
use crate::host::{HostPeer, HostRouting, HostValues};

/// Records the PEER layers computed without autodiff and the tensors cut around them.
#[derive(Debug, Default)]
pub struct ExpertTape {
    stages: Vec<Stage>,
}

#[derive(Debug)]
struct Stage {
    experts: Experts,
    /// The tracked input of the expert computation, `[tokens, d_model]`.
    x: Tensor<2>,
    routing: StageRouting,
    /// The leaf handed downstream, `[batch, seq, d_model]`.
    output: Tensor<3>,
    /// (tracked tensor, the leaf that replaced it downstream).
    cuts: Vec<(Tensor<3>, Tensor<3>)>,
}

/// How a stage's experts were chosen, and so how its backward pass runs.
#[derive(Debug)]
enum StageRouting {
    /// Retrieval in the autodiff graph up to the tracked router weights; the experts by
    /// tensor ops ([`Experts::backward_detached`]).
    Tensors {
        /// The tracked router weights, `[tokens, m]`.
        router_weights: Tensor<2>,
        expert_ids: Tensor<2, Int>,
    },
    /// Retrieval, router weights and experts by the Flex host kernels; the graph resumes at
    /// the tracked queries and sub-keys.
    Host {
        /// `[tokens, heads, key_dim]`.
        queries: Tensor<3>,
        /// The layer's sub-keys, `[key_sets, 2, √N, key_dim / 2]`.
        sub_keys: Tensor<4>,
        routing: Box<HostRouting>,
    },
}

/// The retrieved-row gradients of one taped layer, and which tables they belong to.
#[derive(Debug, Clone)]
pub struct TableGradients {
    /// Parameter id of the layer's `experts.down` table.
    pub down: ParamId,
    /// Parameter id of the layer's `experts.up` table.
    pub up: ParamId,
    /// The gradients.
    pub rows: RowGradients,
}

/// What [`ExpertTape::backward`] returns.
pub struct TapeGradients {
    /// The gradients of each graph segment, the segment holding the loss first.
    pub segments: Vec<Gradients>,
    /// Row gradients of each taped layer, last layer first.
    pub rows: Vec<TableGradients>,
}

impl TapeGradients {
    /// The gradient of a leaf, summed over the segments that hold one.
    pub fn grad<const D: usize>(&self, tensor: &Tensor<D>) -> Option<Tensor<D>> {
        self.segments.iter().filter_map(|grads| tensor.grad(grads)).reduce(|a, b| a + b)
    }

    /// The parameters' gradients summed over segments, as an optimizer takes them. The taped
    /// expert tables have none here: their gradients are in [`rows`](Self::rows).
    pub fn params<M: Module>(&mut self, module: &M) -> GradientsParams {
        let mut accumulator = GradientsAccumulator::<M>::new();
        for grads in self.segments.drain(..) {
            accumulator.accumulate(module, GradientsParams::from_grads(grads, module));
        }
        accumulator.grads()
    }
}

impl ExpertTape {
    /// An empty tape.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of layers recorded.
    pub fn len(&self) -> usize {
        self.stages.len()
    }

    /// Whether no layer was recorded.
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// Records a layer's detached expert output and returns it as a new leaf.
    pub(crate) fn record(
        &mut self,
        experts: &Experts,
        x: Tensor<2>,
        expert_ids: Tensor<2, Int>,
        router_weights: Tensor<2>,
        output: Tensor<3>,
    ) -> Tensor<3> {
        self.push(experts, x, StageRouting::Tensors { router_weights, expert_ids }, output)
    }

    /// Records a layer computed by the host kernels and returns its output as a new leaf.
    pub(crate) fn record_host(
        &mut self,
        experts: &Experts,
        x: Tensor<2>,
        queries: Tensor<3>,
        sub_keys: Tensor<4>,
        routing: HostRouting,
        output: Tensor<3>,
    ) -> Tensor<3> {
        self.push(experts, x, StageRouting::Host { queries, sub_keys, routing: Box::new(routing) }, output)
    }

    fn push(&mut self, experts: &Experts, x: Tensor<2>, routing: StageRouting, output: Tensor<3>) -> Tensor<3> {
        let output = Tensor::from_inner(output).require_grad();
        self.stages.push(Stage { experts: experts.clone(), x, routing, output: output.clone(), cuts: Vec::new() });
        output
    }

    /// Cuts `tensor` at the last recorded layer: returns a leaf with the same value that
    /// downstream code must use instead. Every tracked tensor computed before a taped layer
    /// and used after it must pass through here (the residual stream, auxiliary losses);
    /// otherwise the first backward consumes the earlier segment and
    /// [`backward`](Self::backward) panics. Before any layer is recorded this is the identity.
    pub fn cut(&mut self, tensor: Tensor<3>) -> Tensor<3> {
        let Some(stage) = self.stages.last_mut() else {
            return tensor;
        };
        let leaf = tensor.clone().detach().require_grad();
        stage.cuts.push((tensor, leaf.clone()));
        leaf
    }

    /// Backpropagates `loss` through every segment, last to first.
    pub fn backward<const D: usize>(self, loss: Tensor<D>) -> TapeGradients {
        let mut segments = vec![loss.backward()];
        let mut rows = Vec::new();
        for stage in self.stages.into_iter().rev() {
            let grads = segments.last_mut().expect("at least the loss segment");
            let [batch, seq, d_model] = stage.output.dims();
            let grad_output = stage
                .output
                .grad_remove(grads)
                .unwrap_or_else(|| Tensor::zeros([batch, seq, d_model], &stage.output.device().inner()));
            let mut surrogate: Option<Tensor<1>> = None;
            let mut add = |term: Tensor<1>| {
                surrogate = Some(match surrogate.take() {
                    Some(sum) => sum + term,
                    None => term,
                });
            };
            for (tracked, leaf) in stage.cuts {
                if let Some(grad) = leaf.grad_remove(grads).filter(|_| tracked.is_tracked()) {
                    add((tracked * grad).sum());
                }
            }
            let grad_output = grad_output.reshape([batch * seq, d_model]);
            let table_rows = match stage.routing {
                StageRouting::Tensors { router_weights, expert_ids } => {
                    let grads = stage.experts.backward_detached(
                        stage.x.clone(),
                        expert_ids,
                        router_weights.clone(),
                        grad_output,
                    );
                    if stage.x.is_tracked() {
                        add((stage.x * grads.x).sum());
                    }
                    if router_weights.is_tracked() {
                        add((router_weights * grads.router_weights).sum());
                    }
                    grads.rows
                }
                StageRouting::Host { queries, sub_keys, routing } => {
                    const RECORDED: &str = "recorded from Flex f32 tensors";
                    let view = |t: &Tensor<2>| HostValues::of(t).expect(RECORDED);
                    let grads = HostPeer::of(&stage.experts, &sub_keys, routing.gate()).expect(RECORDED).backward(
                        &view(&stage.x),
                        &HostValues::of(&queries).expect(RECORDED),
                        &routing,
                        &view(&grad_output),
                        &stage.x.device(),
                    );
                    if stage.x.is_tracked() {
                        add((stage.x * grads.x).sum());
                    }
                    if queries.is_tracked() {
                        add((queries * grads.queries).sum());
                    }
                    if sub_keys.is_tracked() {
                        add((sub_keys * grads.sub_keys).sum());
                    }
                    grads.rows
                }
            };
            rows.push(TableGradients { down: stage.experts.down.id(), up: stage.experts.up.id(), rows: table_rows });
            if let Some(surrogate) = surrogate {
                segments.push(surrogate.backward());
            }
        }
        TapeGradients { segments, rows }
    }
}
