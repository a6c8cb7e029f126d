//! An expert table that a row-sparse optimizer can update in place, stored in row blocks
//! where one buffer cannot hold it.
//!
//! A `Param<Tensor<2>>` is copied whenever it is changed while another clone of the module
//! holds it, and Burn's `Learner` always holds one (it optimizes a clone of its model). For a
//! `[1024², 256]` table that is a fresh 1 GiB allocation per table per step, which costs more
//! than the step itself. [`ExpertTable`] keeps its parameters behind a shared lock instead:
//! clones of a module share the table, [`ExpertTable::update_rows`] writes the touched rows in
//! place for all of them, and every `Module` transformation (`map`, `to_device`, `valid`,
//! `fork`, `train`, loading a record) returns an unshared table, as a `Param` would.
//!
//! GPU backends cap one buffer at the adapter's storage-binding limit (128 MiB on Mesa's
//! llvmpipe and on wgpu's defaults, up to 2 GiB or more on real GPUs), and a `[1024², 256]` f32
//! table is 1 GiB. On those devices a table larger than the limit is split into row blocks of
//! at most the limit, each its own parameter (`experts.down.0`, `experts.down.1`, … in a
//! record); the kernels and gathers address the blocks by row range, so nothing above this
//! module sees the split. A table within the limit, and every table on a CPU backend, is one
//! block. Checkpoints of tables above a device's limit therefore move between devices only
//! through a configuration with the same block size
//! ([`PeerConfig::table_block_bytes`](crate::PeerConfig::table_block_bytes)).

use std::sync::{Arc, Mutex, MutexGuard};

use burn::module::{
    Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor, Param, ParamId,
};
use burn::tensor::{Device, Gradients, IndexingUpdateOp, Int, Tensor};

use crate::kernels::topk::is_cpu_backend;

/// Largest temporary buffer the tensor-op path makes on GPU backends (a block of gathered
/// expert rows), and a table's row block on a GPU device whose limit is unknown: half of
/// wgpu's default 128 MiB storage binding.
pub const GPU_BLOCK_BYTES: usize = 64 << 20;

/// Rows per block for a `[rows, width]` f32 table on `device`: at most `max_block_bytes` per
/// block when given; otherwise all of them on CPU backends and wherever the table fits one
/// buffer of the device ([`max_buffer_bytes`]), blocks of that size where it does not.
pub fn block_rows(rows: usize, width: usize, device: &Device, max_block_bytes: Option<usize>) -> usize {
    let limit = match max_block_bytes {
        Some(bytes) => bytes,
        None if is_cpu_backend(device) => return rows.max(1),
        None => max_buffer_bytes(device),
    };
    (limit / (4 * width.max(1))).clamp(1, rows.max(1))
}

/// The largest buffer `device` can bind to a kernel, read from its adapter (wgpu: the smaller
/// of `max_storage_buffer_binding_size` and `max_buffer_size`); [`GPU_BLOCK_BYTES`] where the
/// device does not say, `usize::MAX` on CPU backends.
pub fn max_buffer_bytes(device: &Device) -> usize {
    if is_cpu_backend(device) {
        return usize::MAX;
    }
    crate::kernels::max_buffer_bytes(device).unwrap_or(GPU_BLOCK_BYTES)
}

/// A `[rows, width]` trainable table (one `Param` per row block) whose rows can be rewritten
/// in place.
///
/// Saved, loaded, visited and optimized like the `Param`s it wraps (same records, same ids).
/// Clones share the value; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct ExpertTable {
    blocks: Arc<Mutex<Option<Vec<Param<Tensor<2>>>>>>,
}

/// The blocks of a table as tensors, for gathering rows.
#[derive(Debug, Clone)]
pub struct TableRows {
    blocks: Vec<Tensor<2>>,
    rows_per_block: usize,
}

impl TableRows {
    /// The values of `blocks` through `value` (tracked, or without autodiff).
    fn of(blocks: &[Param<Tensor<2>>], value: impl Fn(&Param<Tensor<2>>) -> Tensor<2>) -> Self {
        Self { rows_per_block: blocks[0].lazy_shape().dims::<2>()[0], blocks: blocks.iter().map(value).collect() }
    }

    /// Rows `ids` of the table, `[ids, width]`. Differentiable when the blocks are tracked.
    pub fn gather(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        if let [only] = &self.blocks[..] {
            return only.clone().select(0, ids);
        }
        self.blocks
            .iter()
            .enumerate()
            .map(|(b, block)| {
                let (local, inside) = local_ids(&ids, b * self.rows_per_block, block.dims()[0]);
                block.clone().select(0, local) * inside
            })
            .reduce(|a, b| a + b)
            .expect("at least one block")
    }

    /// The device of the blocks.
    pub fn device(&self) -> Device {
        self.blocks[0].device()
    }

    /// The blocks without autodiff.
    pub fn inner(self) -> Self {
        Self { blocks: self.blocks.into_iter().map(|b| b.inner()).collect(), ..self }
    }
}

impl ExpertTable {
    /// A trainable table holding `tensor` as one block.
    pub fn new(tensor: Tensor<2>) -> Self {
        Self::from_params(vec![Param::from_tensor(tensor)])
    }

    /// A `[rows, width]` table in blocks of `block_rows` rows, block i made by `make([rows_i,
    /// width])`.
    pub fn from_fn(
        rows: usize,
        width: usize,
        block_rows: usize,
        mut make: impl FnMut([usize; 2]) -> Tensor<2>,
    ) -> Self {
        let blocks = (0..rows)
            .step_by(block_rows.max(1))
            .map(|start| Param::from_tensor(make([block_rows.min(rows - start), width])))
            .collect();
        Self::from_params(blocks)
    }

    /// Wraps existing parameters (their ids are kept), one per row block.
    fn from_params(blocks: Vec<Param<Tensor<2>>>) -> Self {
        Self { blocks: Arc::new(Mutex::new(Some(blocks))) }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Vec<Param<Tensor<2>>>>> {
        // A panic while the lock was held cannot leave a half-written value behind: every
        // writer swaps in complete blocks.
        self.blocks.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn with<R>(&self, f: impl FnOnce(&[Param<Tensor<2>>]) -> R) -> R {
        f(self.lock().as_ref().expect("an ExpertTable always holds a value"))
    }

    /// The blocks' current values (on an autodiff device: the tracked leaves).
    pub fn rows(&self) -> TableRows {
        self.with(|blocks| TableRows::of(blocks, |p| p.val()))
    }

    /// The blocks' values without autodiff, and the rows per block (all but the last block
    /// hold exactly that many).
    pub(crate) fn values_in_blocks(&self) -> (Vec<Tensor<2>>, usize) {
        let rows = self.with(|blocks| TableRows::of(blocks, |p| p.val().inner()));
        (rows.blocks, rows.rows_per_block)
    }

    /// The first block's value, tracked on an autodiff device when the table requires a
    /// gradient: a row-sparse node that reads the table lists it as an input (and gives it no
    /// gradient), so that it runs its backward pass whenever the table is being trained.
    pub(crate) fn anchor(&self) -> Tensor<2> {
        self.with(|blocks| blocks[0].val())
    }

    /// Number of row blocks.
    pub fn num_blocks(&self) -> usize {
        self.with(|blocks| blocks.len())
    }

    /// The whole table as one tensor (blocks concatenated: for tests and small tables; on a
    /// GPU a table above the buffer limit cannot be materialized).
    pub fn val(&self) -> Tensor<2> {
        let rows = self.rows();
        if rows.blocks.len() == 1 {
            return rows.blocks.into_iter().next().expect("one block");
        }
        Tensor::cat(rows.blocks, 0)
    }

    /// `[rows, width]`.
    pub fn dims(&self) -> [usize; 2] {
        self.with(|blocks| {
            let dims: Vec<[usize; 2]> = blocks.iter().map(|p| p.lazy_shape().dims()).collect();
            [dims.iter().map(|d| d[0]).sum(), dims[0][1]]
        })
    }

    /// The id of the first block's parameter: identifies the table.
    pub fn id(&self) -> ParamId {
        self.with(|blocks| blocks[0].id)
    }

    /// The gradient of the whole table in `grads` (dense path), blocks concatenated.
    pub fn grad(&self, grads: &Gradients) -> Option<Tensor<2>> {
        let blocks: Option<Vec<Tensor<2>>> = self.rows().blocks.iter().map(|b| b.grad(grads)).collect();
        blocks.map(|b| Tensor::cat(b, 0))
    }

    /// Replaces the value of this handle only (other clones keep the old table), keeping the
    /// block layout, the parameter ids and whether they require a gradient. `tensor` may live
    /// on the plain or the autodiff device.
    pub fn set(&mut self, tensor: Tensor<2>) {
        let tensor = tensor.inner();
        let mut start = 0;
        let blocks = self.with(|blocks| blocks.to_vec());
        let blocks = blocks
            .into_iter()
            .map(|param| {
                map_value(param, |old| {
                    let rows = old.dims()[0];
                    let fresh = tensor.clone().narrow(0, start, rows);
                    start += rows;
                    fresh
                })
            })
            .collect();
        *self = Self::from_params(blocks);
    }

    /// Replaces rows `ids` (distinct) by `f(their current values)` for every clone, in place
    /// when no other handle to a block is alive, and returns the new rows. Tensor ops only;
    /// the values `f` sees and returns have no autodiff.
    pub fn update_rows(&self, ids: &Tensor<1, Int>, f: impl FnOnce(Tensor<2>) -> Tensor<2>) -> Tensor<2> {
        let mut slot = self.lock();
        let blocks = slot.take().expect("an ExpertTable always holds a value");
        let view = TableRows::of(&blocks, |p| p.val().inner());
        let old = view.gather(ids.clone());
        let new = f(old.clone());
        // `Add` of the difference: the one select_assign mode every backend implements.
        let delta = new.clone() - old;
        let single = blocks.len() == 1;
        let rows_per_block = view.rows_per_block;
        drop(view);
        *slot = Some(
            blocks
                .into_iter()
                .enumerate()
                .map(|(b, param)| {
                    map_value(param, |value| {
                        if single {
                            value.select_assign(0, ids.clone(), delta.clone(), IndexingUpdateOp::Add)
                        } else {
                            let (local, inside) = local_ids(ids, b * rows_per_block, value.dims()[0]);
                            value.select_assign(0, local, delta.clone() * inside, IndexingUpdateOp::Add)
                        }
                    })
                })
                .collect(),
        );
        new
    }

    /// Replaces block `b` by `f(its value)` for every clone. `f` gets the value without
    /// autodiff, as the only handle when no other is alive, so a kernel may write it in place.
    pub(crate) fn rewrite_block(&self, b: usize, f: impl FnOnce(Tensor<2>) -> Tensor<2>) {
        let mut slot = self.lock();
        let mut blocks = slot.take().expect("an ExpertTable always holds a value");
        let rest = blocks.split_off(b + 1);
        let param = blocks.pop().expect("block index within the table");
        blocks.push(map_value(param, f));
        blocks.extend(rest);
        *slot = Some(blocks);
    }

    /// Rows of each block.
    pub(crate) fn block_sizes(&self) -> Vec<usize> {
        self.with(|blocks| blocks.iter().map(|p| p.lazy_shape().dims::<2>()[0]).collect())
    }

    /// The parameters, taken out if this handle is the only one, copied otherwise.
    fn into_params(self) -> Vec<Param<Tensor<2>>> {
        match Arc::try_unwrap(self.blocks) {
            Ok(mutex) => mutex
                .into_inner()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .expect("an ExpertTable always holds a value"),
            Err(shared) => Self { blocks: shared }.with(|blocks| blocks.to_vec()),
        }
    }

    fn map_blocks(self, f: impl FnMut(Param<Tensor<2>>) -> Param<Tensor<2>>) -> Self {
        Self::from_params(self.into_params().into_iter().map(f).collect())
    }
}

/// `param` with its value replaced by `f(value without autodiff)`, keeping the id, the device
/// kind (autodiff or not) and whether it requires a gradient. The value reaches `f` as the only
/// handle when no other is alive, so `select_assign` can write in place.
fn map_value(param: Param<Tensor<2>>, f: impl FnOnce(Tensor<2>) -> Tensor<2>) -> Param<Tensor<2>> {
    param.map(|tensor| {
        let (autodiff, require_grad) = (tensor.is_autodiff(), tensor.is_require_grad());
        let value = f(tensor.inner());
        if autodiff { Tensor::from_inner(value).set_require_grad(require_grad) } else { value }
    })
}

/// `ids` relative to a block starting at row `start` with `rows` rows, clamped into it, and a
/// `[ids, 1]` 0/1 column: whether each id lies in the block.
fn local_ids(ids: &Tensor<1, Int>, start: usize, rows: usize) -> (Tensor<1, Int>, Tensor<2>) {
    let local = ids.clone() - start as i64;
    let inside = local.clone().greater_equal_elem(0).bool_and(local.clone().lower_elem(rows as i64));
    (local.clamp(0, rows as i64 - 1), inside.float().unsqueeze_dim(1))
}

impl Module for ExpertTable {
    fn collect_devices(&self, devices: Devices) -> Devices {
        self.with(|blocks| blocks.iter().fold(devices, |d, p| p.collect_devices(d)))
    }

    fn fork(self, device: &Device) -> Self {
        self.map_blocks(|p| p.fork(device))
    }

    fn to_device(self, device: &Device) -> Self {
        self.map_blocks(|p| p.to_device(device))
    }

    fn train(self) -> Self {
        self.map_blocks(|p| p.train())
    }

    fn valid(&self) -> Self {
        Self::from_params(self.with(|blocks| blocks.iter().map(|p| p.valid()).collect()))
    }

    fn materialize(self) -> Self {
        self.map_blocks(|p| p.materialize())
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        self.with(|blocks| {
            if let [only] = blocks {
                return only.visit(visitor);
            }
            for (index, block) in blocks.iter().enumerate() {
                let name = index.to_string();
                visitor.enter_module(&name, "Vec");
                block.visit(visitor);
                visitor.exit_module(&name, "Vec");
            }
        })
    }

    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        let blocks = self.into_params();
        if blocks.len() == 1 {
            return Self::from_params(blocks.into_iter().map(|p| Module::map(p, mapper)).collect());
        }
        Self::from_params(
            blocks
                .into_iter()
                .enumerate()
                .map(|(index, block)| {
                    let name = index.to_string();
                    mapper.enter_module(&name, "Vec");
                    let block = Module::map(block, mapper);
                    mapper.exit_module(&name, "Vec");
                    block
                })
                .collect(),
        )
    }
}

impl ModuleDisplayDefault for ExpertTable {
    fn content(&self, content: Content) -> Option<Content> {
        let [rows, width] = self.dims();
        let blocks = self.num_blocks();
        content.add_formatted(&format!("ExpertTable {{rows: {rows}, width: {width}, blocks: {blocks}}}")).optional()
    }

    fn num_params(&self) -> usize {
        let [rows, width] = self.dims();
        rows * width
    }
}

impl ModuleDisplay for ExpertTable {}
