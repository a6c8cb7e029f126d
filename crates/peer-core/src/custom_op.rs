//! One node of Burn's autodiff graph with a hand-written backward pass.
//!
//! Burn 0.22 has no public "custom function" API at the tensor level, but its autodiff backend
//! is open to backend extensions: an operation on `AutodiffTensor<B>` primitives can register a
//! [`Backward`] step of its own. [`record`] does that for any function whose inputs are float
//! tensors: the caller computes the output without autodiff and gives a [`Vjp`], the
//! vector-Jacobian product that autodiff runs when the gradient reaches the node. It is how a
//! PEER layer's experts (and, on Flex, its whole fused retrieval) take part in an ordinary
//! `loss.backward()` while the expert tables' gradients go to the row store instead of a dense
//! `[N, d_model]` tensor.

#![allow(deprecated)] // NdArray is deprecated in Burn 0.22 but still one of its devices.

use std::fmt;
use std::sync::{Arc, Mutex};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Backend, Cube, DispatchKindConversion, DispatchTensor, Flex, NdArray};
use burn::tensor::Tensor;

/// The backward pass of a recorded node.
pub(crate) trait Vjp: Send + 'static {
    /// Given dL/d(output) (plain device), the gradient of each input, in input order (`None`
    /// where there is none). Each gradient has its input's shape.
    fn backward(self: Box<Self>, grad_output: Tensor<2>) -> Vec<Option<Tensor<2>>>;
}

/// `output` (computed from `inputs` without autodiff) as a node of the autodiff graph whose
/// backward pass is `vjp`. On a device without autodiff `output` is returned as it is and `vjp`
/// is dropped; so it is when no input is tracked.
///
/// # Panics
/// On an autodiff backend other than Flex, NdArray and CubeCL, or with gradient
/// checkpointing enabled (the node keeps its own state and is not recomputed); callers check
/// [`supported`] first.
pub(crate) fn record<const N: usize>(inputs: [Tensor<2>; N], output: Tensor<2>, vjp: Box<dyn Vjp>) -> Tensor<2> {
    if !inputs.iter().any(|t| t.is_autodiff()) {
        return output;
    }
    let device = inputs[0].device();
    // Inputs from a plain device (a `valid()` module fed autodiff tensors) enter as constants.
    let inputs = inputs.map(|t| if t.is_autodiff() { t } else { Tensor::from_inner(t) });
    let output = output.inner();
    let attempt = record_on::<Flex, N>(inputs, output, vjp);
    let attempt = attempt.or_else(|(inputs, output, vjp)| record_on::<NdArray, N>(inputs, output, vjp));
    let attempt = attempt.or_else(|(inputs, output, vjp)| record_on::<Cube, N>(inputs, output, vjp));
    attempt.unwrap_or_else(|_| panic!("custom backward: unsupported autodiff device {device:?}"))
}

/// Whether [`record`] can register a node for inputs like `tensor` (on the same device).
pub(crate) fn supported<const D: usize>(tensor: &Tensor<D>) -> bool {
    !tensor.is_autodiff()
        || tensor.clone().try_into_primitive::<Autodiff<Flex>>().is_ok()
        || tensor.clone().try_into_primitive::<Autodiff<NdArray>>().is_ok()
        || tensor.clone().try_into_primitive::<Autodiff<Cube>>().is_ok()
}

type Rejected<const N: usize> = ([Tensor<2>; N], Tensor<2>, Box<dyn Vjp>);

fn record_on<B, const N: usize>(
    inputs: [Tensor<2>; N],
    output: Tensor<2>,
    vjp: Box<dyn Vjp>,
) -> Result<Tensor<2>, Rejected<N>>
where
    B: Backend,
    DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B>>,
{
    if inputs[0].clone().try_into_primitive::<Autodiff<B>>().is_err() {
        return Err((inputs, output, vjp));
    }
    let primitives = inputs.map(|t| t.try_into_primitive::<Autodiff<B>>().expect("all inputs on one device"));
    let output = output.try_into_primitive::<B>().expect("output on the inputs' device");
    let state = VjpState(Arc::new(Mutex::new(Some(vjp))));
    let recorded =
        match Node.prepare::<NoCheckpointing>(primitives.each_ref().map(|p| p.node())).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(state, output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
    Ok(Tensor::from_primitive::<Autodiff<B>>(recorded))
}

/// The vector-Jacobian product, taken once by the backward step (the state must be `Clone`).
#[derive(Clone)]
struct VjpState(Arc<Mutex<Option<Box<dyn Vjp>>>>);

impl fmt::Debug for VjpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VjpState")
    }
}

#[derive(Debug)]
struct Node;

impl<B, const N: usize> Backward<B, N> for Node
where
    B: Backend,
    DispatchTensor: DispatchKindConversion<B>,
{
    type State = VjpState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad_output = Tensor::<2>::from_primitive::<B>(grads.consume::<B>(&ops.node));
        let vjp = ops.state.0.lock().unwrap_or_else(|e| e.into_inner()).take().expect("a node runs backward once");
        let input_grads = vjp.backward(grad_output);
        for (parent, grad) in ops.parents.into_iter().zip(input_grads) {
            if let (Some(parent), Some(grad)) = (parent, grad) {
                let grad = grad.inner().try_into_primitive::<B>().expect("gradient on the node's device");
                grads.register::<B>(parent.id, grad);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    /// y = x · w (matrix product) with its backward written by hand, against autodiff's.
    struct MatmulVjp {
        x: Tensor<2>,
        w: Tensor<2>,
        calls: Arc<Mutex<usize>>,
    }

    impl Vjp for MatmulVjp {
        fn backward(self: Box<Self>, dy: Tensor<2>) -> Vec<Option<Tensor<2>>> {
            *self.calls.lock().unwrap() += 1;
            vec![Some(dy.clone().matmul(self.w.transpose())), Some(self.x.transpose().matmul(dy))]
        }
    }

    fn check(device: Device) {
        let x = Tensor::<2>::random([3, 4], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let w = Tensor::<2>::random([4, 5], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let calls = Arc::new(Mutex::new(0));
        let output = x.clone().inner().matmul(w.clone().inner());
        let vjp = MatmulVjp { x: x.clone().inner(), w: w.clone().inner(), calls: calls.clone() };
        let y = record([x.clone(), w.clone()], output, Box::new(vjp));
        let loss = (y.clone().exp() * 0.5).sum();
        let grads = loss.backward();
        let (dx, dw) = (x.grad(&grads).unwrap(), w.grad(&grads).unwrap());

        let reference = (x.clone().matmul(w.clone()).exp() * 0.5).sum().backward();
        dx.into_data().assert_approx_eq::<f32>(&x.grad(&reference).unwrap().into_data(), Default::default());
        dw.into_data().assert_approx_eq::<f32>(&w.grad(&reference).unwrap().into_data(), Default::default());
        assert_eq!(*calls.lock().unwrap(), 1);
    }

    #[test]
    fn custom_backward_equals_autodiff_on_every_backend() {
        check(Device::flex().autodiff());
        check(Device::ndarray().autodiff());
    }
}
