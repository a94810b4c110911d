//! The CPU interpreter: Pallas' `interpret=True`, done carefully.
//!
//! Elementwise ops run fused, a cache-sized chunk at a time (see `fused`): a chain of them
//! never stores the tiles between its ops.
//!
//! Programs that differ only along `parallel` grid axes run concurrently on rayon; the
//! `arbitrary` axes of each run in order on one task, which owns its scratch, so scratch
//! persists across sequential steps exactly as on a TPU core. Input blocks are read with
//! their ragged edge padded; output blocks are written back, clipped to the array, when the
//! block index changes or the task ends (the TPU pipeline's write-back).
//!
//! Checked mode poisons scratch, output blocks and input padding with NaN (or `i32::MIN`),
//! tracks which scratch and output elements were written and reports reads of the rest,
//! reports poison that reaches an output (a partial block read without masking its padding),
//! and refuses blocks a TPU could not tile.
//! In every mode, dynamic slices out of bounds, index maps past the array and two
//! parallel programs writing one output block are errors.

mod eval;
mod fused;
mod liveness;
mod tensor;

use std::collections::HashMap;
use std::sync::Mutex;

use ndarray::{ArrayD, Axis, Slice};
use rayon::prelude::*;

use crate::call::{BlockOperand, PallasCall, Semantics, TracedCall};
use crate::error::{Error, Result};
use crate::host::HostArray;
use crate::interpret::eval::{Analysis, Ctx, Eval, RefBuf};
use crate::interpret::tensor::{Data, Tensor};
use crate::ir::{OpKind, ValueType};

/// How the interpreter runs a call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterpretOptions {
    /// Poison uninitialized memory and report reads of it (slower).
    pub checked: bool,
}

impl PallasCall {
    /// Runs the call on the CPU. `operands` are the scalar-prefetch arrays, then the inputs.
    pub fn interpret(&self, operands: &[HostArray]) -> Result<Vec<HostArray>> {
        self.interpret_with(operands, InterpretOptions::default())
    }

    /// Runs the call in checked mode: see [`InterpretOptions::checked`].
    pub fn interpret_checked(&self, operands: &[HostArray]) -> Result<Vec<HostArray>> {
        self.interpret_with(operands, InterpretOptions { checked: true })
    }

    pub fn interpret_with(&self, operands: &[HostArray], options: InterpretOptions) -> Result<Vec<HostArray>> {
        let types: Vec<ValueType> = operands.iter().map(HostArray::value_type).collect();
        self.trace(&types)?.interpret(operands, options)
    }
}

/// Row-major enumeration of all index tuples below `bounds`.
fn grid_points(bounds: &[usize]) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new()];
    for &b in bounds {
        out = out
            .into_iter()
            .flat_map(|p| {
                (0..b).map(move |i| {
                    let mut q = p.clone();
                    q.push(i);
                    q
                })
            })
            .collect();
    }
    out
}

fn poison_value(checked: bool) -> f64 {
    if checked {
        f64::NAN
    } else {
        0.0
    }
}

/// Block indices of every operand at every grid point: `[operand][flat grid index]`.
struct BlockTable {
    indices: Vec<Vec<Vec<usize>>>,
}

impl TracedCall {
    /// Runs the traced call on the CPU over `operands` (prefetch arrays, then inputs).
    pub fn interpret(&self, operands: &[HostArray], options: InterpretOptions) -> Result<Vec<HostArray>> {
        let kernel = self.kernel.name();
        let expected: Vec<&ValueType> = self.operand_types().collect();
        if operands.len() != expected.len() {
            return Err(Error::Input { kernel: kernel.into(), message: format!("expected {} arrays, got {}", expected.len(), operands.len()) });
        }
        for (i, (a, e)) in operands.iter().zip(&expected).enumerate() {
            if a.value_type() != **e {
                return Err(Error::Input { kernel: kernel.into(), message: format!("operand {i} is {}, but the call was traced for {e}", a.value_type()) });
            }
        }
        if options.checked {
            // What runs here but not on a TPU is an error in checked mode (lower() for a TPU
            // target refuses it the same way).
            let violations = self.tiling_violations();
            if !violations.is_empty() {
                return Err(Error::Spec { kernel: kernel.into(), message: format!("does not fit a TPU: {}", violations.join("; ")) });
            }
        }
        let n_prefetch = self.prefetch.len();
        let prefetch: Vec<Tensor> = operands[..n_prefetch].iter().map(Tensor::from_host).collect();
        let inputs: Vec<Tensor> = operands[n_prefetch..].iter().map(Tensor::from_host).collect();
        let points = grid_points(&self.grid);
        let table = self.block_table(&points, &prefetch)?;
        // A NaN reaching an output came from poison when no input holds one and the kernel
        // cannot make one from bits (a bitcast to a float).
        let mut makes_nan_bits = false;
        self.body.walk(&mut |op| {
            if let (OpKind::Bitcast { .. }, Some(r)) = (&op.kind, op.results.first()) {
                makes_nan_bits |= self.body.value_type(*r).is_some_and(|t| t.dtype.is_float());
            }
        });
        let trace_poison = options.checked && !makes_nan_bits && inputs.iter().all(|t| !matches!(&t.data, Data::F(a) if a.iter().any(|v| v.is_nan())));

        let outputs: Vec<Mutex<Tensor>> = self
            .outputs
            .iter()
            .enumerate()
            .map(|(o, out)| {
                let aliased = self.aliases.iter().find(|(_, oo)| *oo == o).map(|(i, _)| *i);
                Mutex::new(match aliased {
                    Some(i) if i < n_prefetch => prefetch[i].clone(),
                    Some(i) => inputs[i - n_prefetch].clone(),
                    None => Tensor::filled(out.array.dtype, &out.array.shape, poison_value(options.checked)),
                })
            })
            .collect();

        let parallel: Vec<usize> = (0..self.grid.len()).filter(|&a| self.semantics[a] == Semantics::Parallel).collect();
        let sequential: Vec<usize> = (0..self.grid.len()).filter(|&a| self.semantics[a] != Semantics::Parallel).collect();
        let tasks = grid_points(&parallel.iter().map(|&a| self.grid[a]).collect::<Vec<_>>());
        let steps = grid_points(&sequential.iter().map(|&a| self.grid[a]).collect::<Vec<_>>());
        let writers: Writers = Mutex::new(HashMap::new());

        let analysis = Analysis::of(&self.body);
        let run_task = |(task_id, task): (usize, &Vec<usize>)| -> Result<()> {
            let mut program = Program::new(self, &analysis, &inputs, &prefetch, options, trace_poison);
            for step in &steps {
                let mut gi = vec![0; self.grid.len()];
                for (&a, &v) in parallel.iter().zip(task) {
                    gi[a] = v;
                }
                for (&a, &v) in sequential.iter().zip(step) {
                    gi[a] = v;
                }
                let flat = gi.iter().zip(&self.grid).fold(0, |acc, (&i, &g)| acc * g + i);
                program.step(&gi, flat, &table, &outputs, &writers, task_id)?;
            }
            program.flush_all(&outputs, &writers, task_id)
        };
        if tasks.len() > 1 {
            tasks.par_iter().enumerate().try_for_each(run_task)?;
        } else {
            tasks.iter().enumerate().try_for_each(run_task)?;
        }
        Ok(outputs.into_iter().map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()).into_host()).collect())
    }

    /// Checks, for every grid point, that each index map keeps its block inside the array
    /// (a TPU compiler does not: a block past the end reads or writes out of bounds).
    /// Index maps that read scalar-prefetch tables depend on data and are checked when the
    /// call runs instead.
    pub fn check_grid_bounds(&self) -> Result<()> {
        self.operands_whose_maps_read_prefetch(false).block_table(&grid_points(&self.grid), &[]).map(|_| ())
    }

    /// The call with only the inputs and outputs whose index maps read scalar-prefetch tables
    /// (`reading`), or only those whose maps do not.
    fn operands_whose_maps_read_prefetch(&self, reading: bool) -> TracedCall {
        let reads_prefetch = |op: &BlockOperand| op.index_map_reads_prefetch();
        TracedCall {
            inputs: self.inputs.iter().filter(|o| reads_prefetch(o) == reading).cloned().collect(),
            outputs: self.outputs.iter().filter(|o| reads_prefetch(o) == reading).cloned().collect(),
            ..self.clone()
        }
    }

    /// Checks that, with these scalar-prefetch arrays, every data-dependent index map keeps
    /// its block inside its array: what the interpreter checks as it runs, for backends that
    /// cannot (a compiled dynamic slice clamps an out-of-range index to the edge, silently).
    pub fn check_block_indices(&self, prefetch: &[HostArray]) -> Result<()> {
        if self.prefetch.is_empty() {
            return Ok(());
        }
        // The other maps were checked when the call was lowered (check_grid_bounds).
        let tensors: Vec<Tensor> = prefetch.iter().map(Tensor::from_host).collect();
        self.operands_whose_maps_read_prefetch(true).block_table(&grid_points(&self.grid), &tensors).map(|_| ())
    }

    /// For each input then output, its block index at every grid point (row-major flat
    /// order), or `None` for index maps that read scalar-prefetch tables (data-dependent).
    pub fn static_block_indices(&self) -> Result<Vec<Option<Vec<Vec<usize>>>>> {
        self.block_indices(&[])
    }

    /// [`Self::static_block_indices`] with `prefetch` standing for the scalar-prefetch
    /// arrays, so that data-dependent index maps are evaluated too (with fewer arrays than
    /// the call has, every map that reads one is `None`). Maps of integer scalar ops are
    /// evaluated without the interpreter ([`crate::scalar`]), fast enough for the TPU model
    /// to follow every step of every candidate's grid.
    pub fn block_indices(&self, prefetch: &[HostArray]) -> Result<Vec<Option<Vec<Vec<usize>>>>> {
        self.block_indices_by(prefetch, true)
    }

    /// [`Self::block_indices`] with every map run by the interpreter: what the fast path is
    /// tested against.
    pub fn interpreted_block_indices(&self, prefetch: &[HostArray]) -> Result<Vec<Option<Vec<Vec<usize>>>>> {
        self.block_indices_by(prefetch, false)
    }

    fn block_indices_by(&self, prefetch: &[HostArray], scalar: bool) -> Result<Vec<Option<Vec<Vec<usize>>>>> {
        let points = grid_points(&self.grid);
        let known = prefetch.len() >= self.prefetch.len();
        let tensors: Vec<Tensor> = if known { prefetch.iter().map(Tensor::from_host).collect() } else { Vec::new() };
        self.inputs
            .iter()
            .chain(&self.outputs)
            .map(|op| {
                if op.index_map_reads_prefetch() && !known {
                    return Ok(None);
                }
                if let Some(indices) = scalar.then(|| scalar_block_indices(op, &points, prefetch)).flatten() {
                    return Ok(Some(indices));
                }
                let single = TracedCall { inputs: vec![op.clone()], outputs: Vec::new(), ..self.clone() };
                Ok(single.block_table(&points, &tensors)?.indices.pop())
            })
            .collect()
    }

    fn block_table(&self, points: &[Vec<usize>], prefetch: &[Tensor]) -> Result<BlockTable> {
        let operands: Vec<&BlockOperand> = self.inputs.iter().chain(&self.outputs).collect();
        let names: Vec<String> = self.prefetch.iter().map(|p| p.name.clone()).collect();
        let mut indices = Vec::with_capacity(operands.len());
        for op in operands {
            let analysis = Analysis::of(&op.index_map);
            let mut eval = Eval::new(&op.index_map, &analysis);
            let mut refs: Vec<RefBuf> = prefetch.iter().map(|t| RefBuf { data: t.clone(), init: None, last_store: None }).collect();
            let mut per_point = Vec::with_capacity(points.len());
            for p in points {
                let ctx = Ctx { kernel: self.kernel.name(), grid: &self.grid, grid_index: p, ref_names: &names };
                let args = p.iter().map(|&i| Tensor::int(crate::dtype::DType::I32, ArrayD::from_elem(vec![], i as i32))).collect();
                let res = eval.run(&ctx, &mut refs, args, false)?;
                let block: Vec<i64> = res.iter().map(|t| t.scalar_i64().unwrap_or(-1)).collect();
                let dims = op.block_dims();
                let in_range = block.iter().zip(&dims).zip(&op.array.shape).all(|((&b, &d), &n)| b >= 0 && (b as usize) * d < n);
                if !in_range {
                    return Err(Error::BlockOutOfRange {
                        kernel: self.kernel.name().into(),
                        operand: op.name.clone(),
                        grid_index: p.clone(),
                        block,
                        array_shape: op.array.shape.clone(),
                    });
                }
                per_point.push(block.iter().map(|&b| b as usize).collect());
            }
            indices.push(per_point);
        }
        Ok(BlockTable { indices })
    }
}

/// `op`'s block index at every point, evaluated as integer scalars; `None` where the map
/// needs the interpreter or a block falls outside the array (which the interpreter reports).
fn scalar_block_indices(op: &BlockOperand, points: &[Vec<usize>], prefetch: &[HostArray]) -> Option<Vec<Vec<usize>>> {
    let dims = op.block_dims();
    let map = crate::scalar::IndexMap::new(&op.index_map);
    points
        .iter()
        .map(|p| {
            let block = map.at(p, prefetch)?;
            let inside = block.len() == dims.len() && block.iter().zip(&dims).zip(&op.array.shape).all(|((&b, &d), &n)| b >= 0 && (b as usize) * d < n);
            inside.then(|| block.iter().map(|&b| b as usize).collect())
        })
        .collect()
}

/// The state of one task: a core running the sequential steps for one parallel index.
struct Program<'a> {
    call: &'a TracedCall,
    inputs: &'a [Tensor],
    options: InterpretOptions,
    eval: Eval<'a>,
    /// In the kernel's argument order: prefetch, inputs, outputs, scratch.
    refs: Vec<RefBuf>,
    names: Vec<String>,
    /// The block index each input/output ref currently holds.
    current: Vec<Option<Vec<usize>>>,
    /// The grid index that first filled each output block, for race reports.
    filled_by: Vec<Vec<usize>>,
    /// Checked mode with NaN-free inputs: a NaN written back to an output came from poison.
    trace_poison: bool,
    /// The grid index of the last step run, for errors found after it.
    last_step: Vec<usize>,
}

impl<'a> Program<'a> {
    fn new(call: &'a TracedCall, analysis: &'a Analysis<'a>, inputs: &'a [Tensor], prefetch: &[Tensor], options: InterpretOptions, trace_poison: bool) -> Self {
        let pv = poison_value(options.checked);
        let mut refs: Vec<RefBuf> = prefetch.iter().map(|t| RefBuf { data: t.clone(), init: None, last_store: None }).collect();
        let mut names: Vec<String> = call.prefetch.iter().map(|p| p.name.clone()).collect();
        for op in call.inputs.iter().chain(&call.outputs) {
            refs.push(RefBuf { data: Tensor::filled(op.array.dtype, &op.kernel_block_shape(), pv), init: None, last_store: None });
            names.push(op.name.clone());
        }
        for s in &call.scratch {
            let init = options.checked.then(|| ArrayD::from_elem(s.ty.shape.clone(), false));
            refs.push(RefBuf { data: Tensor::filled(s.ty.dtype, &s.ty.shape, pv), init, last_store: None });
            names.push(s.name.clone());
        }
        let n = call.inputs.len() + call.outputs.len();
        Program {
            call,
            inputs,
            options,
            eval: Eval::new(&call.body, analysis),
            refs,
            names,
            current: vec![None; n],
            filled_by: vec![Vec::new(); call.outputs.len()],
            trace_poison,
            last_step: Vec::new(),
        }
    }

    fn step(&mut self, gi: &[usize], flat: usize, table: &BlockTable, outputs: &[Mutex<Tensor>], writers: &Writers, task: usize) -> Result<()> {
        let call = self.call;
        let n_pf = call.prefetch.len();
        let n_in = call.inputs.len();
        for (i, op) in call.inputs.iter().enumerate() {
            let block = &table.indices[i][flat];
            if self.current[i].as_ref() != Some(block) {
                let pad = poison_value(self.options.checked);
                self.refs[n_pf + i].data = read_block(&self.inputs[i], op, block, pad);
                self.current[i] = Some(block.clone());
            }
        }
        for (o, op) in call.outputs.iter().enumerate() {
            let block = &table.indices[n_in + o][flat];
            if self.current[n_in + o].as_ref() != Some(block) {
                self.flush(o, outputs, writers, task)?;
                let slot = n_pf + n_in + o;
                let shape = op.kernel_block_shape();
                self.refs[slot].data = Tensor::filled(op.array.dtype, &shape, poison_value(self.options.checked));
                self.refs[slot].init = self.options.checked.then(|| ArrayD::from_elem(shape, false));
                self.refs[slot].last_store = None;
                self.current[n_in + o] = Some(block.clone());
                self.filled_by[o] = gi.to_vec();
            }
        }
        let ctx = Ctx { kernel: call.kernel.name(), grid: &call.grid, grid_index: gi, ref_names: &self.names };
        self.eval.run(&ctx, &mut self.refs, Vec::new(), self.options.checked)?;
        self.last_step = gi.to_vec();
        Ok(())
    }

    /// Writes output `o`'s current block back to the array (clipped to its shape).
    fn flush(&mut self, o: usize, outputs: &[Mutex<Tensor>], writers: &Writers, task: usize) -> Result<()> {
        let call = self.call;
        let n_in = call.inputs.len();
        let Some(block) = self.current[n_in + o].clone() else { return Ok(()) };
        let op = &call.outputs[o];
        {
            let mut w = writers.lock().unwrap_or_else(|p| p.into_inner());
            match w.get(&(o, block.clone())) {
                Some((t, first)) if *t != task => {
                    return Err(Error::Race { kernel: call.kernel.name().into(), operand: op.name.clone(), block, first: first.clone(), second: self.filled_by[o].clone() });
                }
                Some(_) => {}
                None => {
                    w.insert((o, block.clone()), (task, self.filled_by[o].clone()));
                }
            }
        }
        let slot = call.prefetch.len() + n_in + o;
        if self.trace_poison && valid_region_has_nan(op, &block, &self.refs[slot].data) {
            return Err(Error::PoisonReachedOutput {
                kernel: call.kernel.name().into(),
                operand: op.name.clone(),
                grid_index: self.filled_by[o].clone(),
                block,
                loc: self.refs[slot].last_store.unwrap_or(call.kernel.loc()),
            });
        }
        let mut out = outputs[o].lock().unwrap_or_else(|p| p.into_inner());
        write_block(&mut out, op, &block, &self.refs[slot].data);
        Ok(())
    }

    fn flush_all(&mut self, outputs: &[Mutex<Tensor>], writers: &Writers, task: usize) -> Result<()> {
        let call = self.call;
        let ctx = Ctx { kernel: call.kernel.name(), grid: &call.grid, grid_index: &self.last_step, ref_names: &self.names };
        self.eval.finish(&ctx)?;
        for o in 0..self.call.outputs.len() {
            self.flush(o, outputs, writers, task)?;
        }
        Ok(())
    }
}

type Writers = Mutex<HashMap<(usize, Vec<usize>), (usize, Vec<usize>)>>;

/// The element range a block covers along each dim, clipped to the array: (start, valid len).
fn block_extent(op: &BlockOperand, block: &[usize]) -> Vec<(usize, usize)> {
    op.block_dims()
        .iter()
        .zip(block)
        .zip(&op.array.shape)
        .map(|((&d, &b), &n)| {
            let start = b * d;
            (start, d.min(n.saturating_sub(start)))
        })
        .collect()
}

/// Whether the part of an output block that lands inside the array holds a NaN.
fn valid_region_has_nan(op: &BlockOperand, block: &[usize], value: &Tensor) -> bool {
    let Data::F(a) = &value.data else { return false };
    let Ok(full) = a.view().into_shape_with_order(op.block_dims()) else { return false };
    let mut v = full.view();
    for (axis, &(_, len)) in block_extent(op, block).iter().enumerate() {
        v.slice_axis_inplace(Axis(axis), Slice::from(0..len));
    }
    v.iter().any(|x| x.is_nan())
}

fn read_block(array: &Tensor, op: &BlockOperand, block: &[usize], pad: f64) -> Tensor {
    let dims = op.block_dims();
    let extent = block_extent(op, block);
    let mut out = Tensor::filled(array.dtype, &dims, pad);
    let block_ranges: Vec<(usize, usize)> = extent.iter().map(|&(_, len)| (0, len)).collect();
    copy_region(&array.data, &extent, &mut out.data, &block_ranges);
    reshape_to(out, &op.kernel_block_shape())
}

fn reshape_to(t: Tensor, shape: &[usize]) -> Tensor {
    let data = match t.data {
        Data::F(a) => Data::F(a.into_shape_with_order(shape.to_vec()).unwrap_or_else(|e| panic!("block reshape: {e}"))),
        Data::I(a) => Data::I(a.into_shape_with_order(shape.to_vec()).unwrap_or_else(|e| panic!("block reshape: {e}"))),
        Data::B(a) => Data::B(a.into_shape_with_order(shape.to_vec()).unwrap_or_else(|e| panic!("block reshape: {e}"))),
    };
    Tensor { dtype: t.dtype, data }
}

fn write_block(array: &mut Tensor, op: &BlockOperand, block: &[usize], value: &Tensor) {
    let extent = block_extent(op, block);
    let full = reshape_to(value.clone(), &op.block_dims());
    let block_ranges: Vec<(usize, usize)> = extent.iter().map(|&(_, len)| (0, len)).collect();
    copy_region(&full.data, &block_ranges, &mut array.data, &extent);
}

/// Copies `src[ranges of src]` into `dst[ranges of dst]`; each range is (start, len) per axis.
fn copy_region(src: &Data, src_ranges: &[(usize, usize)], dst: &mut Data, dst_ranges: &[(usize, usize)]) {
    fn copy<E: Clone>(src: &ArrayD<E>, sr: &[(usize, usize)], dst: &mut ArrayD<E>, dr: &[(usize, usize)]) {
        let mut s = src.view();
        let mut d = dst.view_mut();
        for (axis, (&(ss, len), &(ds, _))) in sr.iter().zip(dr).enumerate() {
            s.slice_axis_inplace(Axis(axis), Slice::from(ss..ss + len));
            d.slice_axis_inplace(Axis(axis), Slice::from(ds..ds + len));
        }
        d.assign(&s);
    }
    match (src, dst) {
        (Data::F(s), Data::F(d)) => copy(s, src_ranges, d, dst_ranges),
        (Data::I(s), Data::I(d)) => copy(s, src_ranges, d, dst_ranges),
        (Data::B(s), Data::B(d)) => copy(s, src_ranges, d, dst_ranges),
        // Inputs and outputs are converted with their dtype; classes always match.
        _ => {}
    }
}
