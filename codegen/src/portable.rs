//! IR → portable StableHLO that any PJRT backend runs: the grid "discharged" into a
//! `stablehlo.while` over the flattened grid index. Each step computes the grid indices and
//! every operand's block index from its index map, slices input blocks out of the inputs
//! (padded to whole blocks, so ragged edges work), runs the kernel body on tensors, and
//! writes output blocks back with `dynamic_update_slice`. Output blocks and scratch are
//! values threaded through the loop, and through every traced `if`/`for` inside the body.

use std::collections::HashMap;
use std::fmt::Write;

use torchtpu_dsl::elementwise::Lowering;
use torchtpu_dsl::ir::{BinaryOp, CmpOp, Func, Index, Literal, Loc, Offset, Op, OpKind, ReduceOp, Region, RollStride, Type, UnaryOp, ValueId, ValueType};
use torchtpu_dsl::{random, DType, TracedCall};

use crate::compose::{composite, Primitives};
use crate::error::{Error, Result};
use crate::mlir::{float_literal, symbol, tensor_type};

/// The portable StableHLO module for a traced call: `@main(prefetch..., inputs...) -> outputs`.
pub fn module(call: &TracedCall) -> Result<String> {
    call.check_grid_bounds()?;
    let mut e = Emitter { call, out: String::new(), depth: 2, next: 0 };
    let n_pf = call.prefetch.len();
    let operands: Vec<&ValueType> = call.operand_types().collect();
    let args: Vec<String> = (0..operands.len()).map(|i| format!("%arg{i}")).collect();

    // Inputs padded to whole blocks; outputs start as zeros (or their aliased input), padded likewise.
    let mut padded_inputs = Vec::new();
    for (i, op) in call.inputs.iter().enumerate() {
        padded_inputs.push(e.pad(&args[n_pf + i], &op.array, &padded_shape(op)));
    }
    let mut carried: Vec<(String, String)> = Vec::new();
    for (o, op) in call.outputs.iter().enumerate() {
        let shape = padded_shape(op);
        let init = match call.aliases.iter().find(|(_, out)| *out == o) {
            Some(&(i, _)) => e.pad(&args[i], operands[i], &shape),
            None => e.splat(zero(op.array.dtype), &ValueType::new(op.array.dtype, shape.clone())),
        };
        carried.push((init, tensor_type(&ValueType::new(op.array.dtype, shape))));
    }
    for s in &call.scratch {
        let t = ValueType::new(s.ty.dtype, s.ty.shape.clone());
        carried.push((e.splat(zero(t.dtype), &t), tensor_type(&t)));
    }
    let i32t = tensor_type(&ValueType::scalar(DType::I32));
    let start = e.constant("0", &i32t);
    let mut loop_types = vec![i32t.clone()];
    loop_types.extend(carried.iter().map(|(_, t)| t.clone()));
    let loop_inits: Vec<String> = std::iter::once(start).chain(carried.iter().map(|(n, _)| n.clone())).collect();

    let total = e.constant(&call.num_programs().to_string(), &i32t);
    let (w, body_args) = e.open_counted_while(&loop_inits, &loop_types, &total);
    let results = e.grid_step(&body_args, &padded_inputs, &args[..n_pf])?;
    e.close_counted_while(&body_args[0], results, &loop_types);

    let mut returns = Vec::new();
    let mut return_types = Vec::new();
    for (o, op) in call.outputs.iter().enumerate() {
        let padded = ValueType::new(op.array.dtype, padded_shape(op));
        let r = format!("{w}#{}", 1 + o);
        returns.push(if padded.shape == op.array.shape { r } else { e.slice(&r, &padded, &vec![0; op.array.shape.len()], &op.array.shape) });
        return_types.push(tensor_type(&op.array));
    }
    let params: Vec<String> = args.iter().zip(&operands).map(|(a, t)| format!("{a}: {}", tensor_type(t))).collect();
    let result_sig = if return_types.len() == 1 { return_types[0].clone() } else { format!("({})", return_types.join(", ")) };
    let mut s = String::new();
    let _ = writeln!(s, "module @{} {{", symbol(&call.name));
    let _ = writeln!(s, "  func.func public @main({}) -> {result_sig} {{", params.join(", "));
    s.push_str(&e.out);
    let _ = writeln!(s, "    return {} : {}", returns.join(", "), return_types.join(", "));
    s.push_str("  }\n}\n");
    Ok(s)
}

fn padded_shape(op: &torchtpu_dsl::BlockOperand) -> Vec<usize> {
    op.blocks_per_dim().iter().zip(op.block_dims()).map(|(n, b)| n * b).collect()
}

fn zero(dtype: DType) -> Literal {
    match dtype {
        d if d.is_float() => Literal::Float(0.0),
        DType::Bool => Literal::Bool(false),
        _ => Literal::Int(0),
    }
}

fn typed(names: &[String], types: &[String]) -> String {
    names.iter().zip(types).map(|(n, t)| format!("{n}: {t}")).collect::<Vec<_>>().join(", ")
}

fn direction(d: &str) -> String {
    format!("comparison_direction = #stablehlo<comparison_direction {d}>")
}

fn compare_type(dtype: DType) -> String {
    let t = match dtype {
        d if d.is_float() => "FLOAT",
        DType::Bool => "UNSIGNED",
        _ => "SIGNED",
    };
    format!("compare_type = #stablehlo<comparison_type {t}>")
}

fn i64_array(v: &[usize]) -> String {
    if v.is_empty() {
        "array<i64>".into()
    } else {
        format!("array<i64: {}>", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "))
    }
}

/// A ref's current value inside the loop body: a tensor of the ref's shape.
#[derive(Clone)]
struct RefValue {
    name: String,
    ty: ValueType,
}

/// The key and counter of the random number generator, threaded through the body like a
/// ref the kernel writes; a `ValueId` no IR value has.
const PRNG_STATE: ValueId = ValueId(u32::MAX);

fn prng_state_type() -> ValueType {
    ValueType::new(DType::I32, [2])
}

/// StableHLO i32 values of one shape as the generator's wrapping u32 words.
struct Words<'e, 'a> {
    e: &'e mut Emitter<'a>,
    shape: Vec<usize>,
}

impl Words<'_, '_> {
    fn t(&self) -> String {
        tensor_type(&ValueType::new(DType::I32, self.shape.clone()))
    }

    fn splat_scalar(&mut self, x: &str) -> String {
        let (st, t) = (tensor_type(&ValueType::scalar(DType::I32)), self.t());
        self.e.op("stablehlo.broadcast_in_dim", &[(x, &st)], &["broadcast_dimensions = array<i64>".into()], &t)
    }

    fn binary(&mut self, name: &str, a: &str, b: &str) -> String {
        let t = self.t();
        self.e.op(name, &[(a, &t), (b, &t)], &[], &t)
    }
}

impl random::U32Ops for Words<'_, '_> {
    type V = String;
    fn constant(&mut self, c: u32) -> String {
        let t = self.t();
        self.e.constant(&(c as i32).to_string(), &t)
    }
    fn xor(&mut self, a: &String, b: &String) -> String {
        self.binary("stablehlo.xor", a, b)
    }
    fn add(&mut self, a: &String, b: &String) -> String {
        self.binary("stablehlo.add", a, b)
    }
    fn mul(&mut self, a: &String, b: &String) -> String {
        self.binary("stablehlo.multiply", a, b)
    }
    fn shr(&mut self, a: &String, by: u32) -> String {
        let by = self.constant(by);
        self.binary("stablehlo.shift_right_logical", a, &by)
    }
}

impl Primitives for Emitter<'_> {
    fn unary_of(&mut self, op: UnaryOp, x: &str, t: &ValueType, l: Loc) -> Result<String> {
        Emitter::unary_of(self, op, x, t, l)
    }
    fn binary_of(&mut self, op: BinaryOp, a: &str, b: &str, t: &ValueType, l: Loc) -> Result<String> {
        Emitter::binary_of(self, op, a, b, t, l)
    }
    fn compare_of(&mut self, op: CmpOp, a: &str, b: &str, t: &ValueType, _: Loc) -> Result<String> {
        Ok(Emitter::compare_of(self, op, a, b, t))
    }
    fn splat_of(&mut self, value: Literal, t: &ValueType, _: Loc) -> String {
        self.splat(value, t)
    }
    fn select_of(&mut self, cond: &str, a: &str, b: &str, t: &ValueType, _: Loc) -> String {
        let tt = tensor_type(t);
        let ct = tensor_type(&ValueType::new(DType::Bool, t.shape.clone()));
        self.op("stablehlo.select", &[(cond, &ct), (a, &tt), (b, &tt)], &[], &tt)
    }
    fn logical_not_of(&mut self, mask: &str, t: &ValueType, _: Loc) -> String {
        let ct = tensor_type(&ValueType::new(DType::Bool, t.shape.clone()));
        self.op("stablehlo.not", &[(mask, &ct)], &[], &ct)
    }
    fn target_op_of(&mut self, name: &str, args: &[&str], t: &ValueType, _: Loc) -> String {
        let tt = tensor_type(t);
        let operands: Vec<(&str, &str)> = args.iter().map(|a| (*a, tt.as_str())).collect();
        self.op(name, &operands, &[], &tt)
    }
}

struct Emitter<'a> {
    call: &'a TracedCall,
    out: String,
    depth: usize,
    next: usize,
}

/// The state of one function's emission: value names and the refs' current values.
struct Scope {
    names: HashMap<ValueId, String>,
    refs: HashMap<ValueId, RefValue>,
    /// Refs the body writes (outputs, scratch), in threading order.
    mutable: Vec<ValueId>,
    grid: Vec<String>,
}

impl<'a> Emitter<'a> {
    fn fresh(&mut self) -> String {
        self.next += 1;
        format!("%v{}", self.next - 1)
    }

    fn line(&mut self, s: &str) {
        let pad = "  ".repeat(self.depth);
        let _ = writeln!(self.out, "{pad}{s}");
    }

    fn op(&mut self, name: &str, operands: &[(&str, &str)], attrs: &[String], result: &str) -> String {
        let r = self.fresh();
        let names: Vec<&str> = operands.iter().map(|(n, _)| *n).collect();
        let types: Vec<&str> = operands.iter().map(|(_, t)| *t).collect();
        let attrs = if attrs.is_empty() { String::new() } else { format!(" {{{}}}", attrs.join(", ")) };
        self.line(&format!("{r} = \"{name}\"({}){attrs} : ({}) -> {result}", names.join(", "), types.join(", ")));
        r
    }

    fn ret(&mut self, values: &[String], types: &[String]) {
        self.line(&format!("\"stablehlo.return\"({}) : ({}) -> ()", values.join(", "), types.join(", ")));
    }

    fn constant(&mut self, value: &str, ty: &str) -> String {
        self.op("stablehlo.constant", &[], &[format!("value = dense<{value}> : {ty}")], ty)
    }

    fn literal(lit: Literal, dtype: DType) -> String {
        match lit {
            Literal::Float(x) => float_literal(x, dtype),
            Literal::Int(i) if dtype.is_float() => float_literal(i as f64, dtype),
            Literal::Int(i) => i.to_string(),
            Literal::Bool(b) => b.to_string(),
        }
    }

    fn splat(&mut self, lit: Literal, t: &ValueType) -> String {
        let v = Self::literal(lit, t.dtype);
        self.constant(&v, &tensor_type(t))
    }

    fn pad(&mut self, x: &str, t: &ValueType, to: &[usize]) -> String {
        if t.shape == to {
            return x.to_string();
        }
        let z = self.splat(zero(t.dtype), &ValueType::scalar(t.dtype));
        let high: Vec<usize> = to.iter().zip(&t.shape).map(|(p, d)| p - d).collect();
        let zeros = vec![0; to.len()];
        let (tt, zt, pt) = (tensor_type(t), tensor_type(&ValueType::scalar(t.dtype)), tensor_type(&ValueType::new(t.dtype, to)));
        let attrs = [format!("edge_padding_high = {}", i64_array(&high)), format!("edge_padding_low = {}", i64_array(&zeros)), format!("interior_padding = {}", i64_array(&zeros))];
        self.op("stablehlo.pad", &[(x, &tt), (&z, &zt)], &attrs, &pt)
    }

    fn slice(&mut self, x: &str, t: &ValueType, start: &[usize], limit: &[usize]) -> String {
        let shape: Vec<usize> = limit.iter().zip(start).map(|(l, s)| l - s).collect();
        let attrs = [format!("limit_indices = {}", i64_array(limit)), format!("start_indices = {}", i64_array(start)), format!("strides = {}", i64_array(&vec![1; start.len()]))];
        self.op("stablehlo.slice", &[(x, &tensor_type(t))], &attrs, &tensor_type(&ValueType::new(t.dtype, shape)))
    }

    fn reshape(&mut self, x: &str, from: &ValueType, to: &ValueType) -> String {
        if from.shape == to.shape {
            return x.to_string();
        }
        self.op("stablehlo.reshape", &[(x, &tensor_type(from))], &[], &tensor_type(to))
    }

    fn dynamic_slice(&mut self, x: &str, t: &ValueType, offsets: &[String], sizes: &[usize]) -> String {
        let i32t = tensor_type(&ValueType::scalar(DType::I32));
        let tt = tensor_type(t);
        let mut ops: Vec<(&str, &str)> = vec![(x, &tt)];
        ops.extend(offsets.iter().map(|o| (o.as_str(), i32t.as_str())));
        self.op("stablehlo.dynamic_slice", &ops, &[format!("slice_sizes = {}", i64_array(sizes))], &tensor_type(&ValueType::new(t.dtype, sizes)))
    }

    fn dynamic_update_slice(&mut self, x: &str, t: &ValueType, update: &str, ut: &ValueType, offsets: &[String]) -> String {
        let i32t = tensor_type(&ValueType::scalar(DType::I32));
        let (tt, utt) = (tensor_type(t), tensor_type(ut));
        let mut ops: Vec<(&str, &str)> = vec![(x, &tt), (update, &utt)];
        ops.extend(offsets.iter().map(|o| (o.as_str(), i32t.as_str())));
        self.op("stablehlo.dynamic_update_slice", &ops, &[], &tt)
    }

    /// Opens a `stablehlo.while` whose first value counts up to `bound` (exclusive) and whose
    /// others are carried; leaves the body open. Returns the loop's name and the body's arguments.
    fn open_counted_while(&mut self, inits: &[String], types: &[String], bound: &str) -> (String, Vec<String>) {
        let i32t = tensor_type(&ValueType::scalar(DType::I32));
        let pred = tensor_type(&ValueType::scalar(DType::Bool));
        let w = self.fresh();
        let cond_args: Vec<String> = (0..types.len()).map(|_| self.fresh()).collect();
        let body_args: Vec<String> = (0..types.len()).map(|_| self.fresh()).collect();
        self.line(&format!("{w}:{} = \"stablehlo.while\"({}) ({{", types.len(), inits.join(", ")));
        self.line(&format!("^bb0({}):", typed(&cond_args, types)));
        self.depth += 1;
        let more = self.op("stablehlo.compare", &[(&cond_args[0], &i32t), (bound, &i32t)], &[direction("LT"), compare_type(DType::I32)], &pred);
        self.ret(&[more], &[pred]);
        self.depth -= 1;
        self.line("}, {");
        self.line(&format!("^bb0({}):", typed(&body_args, types)));
        self.depth += 1;
        (w, body_args)
    }

    /// Closes a loop from `open_counted_while`: the counter steps by one, `carried` passes on.
    fn close_counted_while(&mut self, counter: &str, carried: Vec<String>, types: &[String]) {
        let i32t = tensor_type(&ValueType::scalar(DType::I32));
        let one = self.constant("1", &i32t);
        let next = self.i32_binary("stablehlo.add", counter, &one);
        let values: Vec<String> = std::iter::once(next).chain(carried).collect();
        self.ret(&values, types);
        self.depth -= 1;
        self.line(&format!("}}) : ({}) -> ({})", types.join(", "), types.join(", ")));
    }

    fn i32_binary(&mut self, name: &str, a: &str, b: &str) -> String {
        let t = tensor_type(&ValueType::scalar(DType::I32));
        self.op(name, &[(a, &t), (b, &t)], &[], &t)
    }

    /// One grid step: `args` are the loop's (index, outputs..., scratch...); returns the new outputs and scratch.
    fn grid_step(&mut self, args: &[String], padded_inputs: &[String], prefetch: &[String]) -> Result<Vec<String>> {
        let call = self.call;
        // Row-major grid indices from the flat index.
        let mut grid = Vec::new();
        let mut stride = call.num_programs();
        for &g in &call.grid {
            stride /= g;
            let s = self.constant(&stride.to_string(), &tensor_type(&ValueType::scalar(DType::I32)));
            let n = self.constant(&g.to_string(), &tensor_type(&ValueType::scalar(DType::I32)));
            let q = self.i32_binary("stablehlo.divide", &args[0], &s);
            grid.push(self.i32_binary("stablehlo.remainder", &q, &n));
        }
        let n_in = call.inputs.len();
        let n_out = call.outputs.len();
        // Element offsets of every operand's block.
        let mut offsets: Vec<Vec<String>> = Vec::new();
        for op in call.inputs.iter().chain(&call.outputs) {
            let block = self.index_map(&op.index_map, &grid, prefetch)?;
            let mut o = Vec::new();
            for (b, d) in block.iter().zip(op.block_dims()) {
                let dc = self.constant(&d.to_string(), &tensor_type(&ValueType::scalar(DType::I32)));
                o.push(self.i32_binary("stablehlo.multiply", b, &dc));
            }
            offsets.push(o);
        }
        let body = &call.body;
        let mut scope = Scope { names: HashMap::new(), refs: HashMap::new(), mutable: Vec::new(), grid: grid.clone() };
        let n_pf = call.prefetch.len();
        for (i, p) in call.prefetch.iter().enumerate() {
            scope.refs.insert(body.args[i], RefValue { name: prefetch[i].clone(), ty: p.array.clone() });
        }
        for (i, op) in call.inputs.iter().enumerate() {
            let padded = ValueType::new(op.array.dtype, padded_shape(op));
            let block = self.dynamic_slice(&padded_inputs[i], &padded, &offsets[i], &op.block_dims());
            let view = ValueType::new(op.array.dtype, op.kernel_block_shape());
            let v = self.reshape(&block, &ValueType::new(op.array.dtype, op.block_dims()), &view);
            scope.refs.insert(body.args[n_pf + i], RefValue { name: v, ty: view });
        }
        for (o, op) in call.outputs.iter().enumerate() {
            let padded = ValueType::new(op.array.dtype, padded_shape(op));
            let block = self.dynamic_slice(&args[1 + o], &padded, &offsets[n_in + o], &op.block_dims());
            let view = ValueType::new(op.array.dtype, op.kernel_block_shape());
            let v = self.reshape(&block, &ValueType::new(op.array.dtype, op.block_dims()), &view);
            let id = body.args[n_pf + n_in + o];
            scope.refs.insert(id, RefValue { name: v, ty: view });
            scope.mutable.push(id);
        }
        for (s, sc) in call.scratch.iter().enumerate() {
            let id = body.args[n_pf + n_in + n_out + s];
            scope.refs.insert(id, RefValue { name: args[1 + n_out + s].clone(), ty: ValueType::new(sc.ty.dtype, sc.ty.shape.clone()) });
            scope.mutable.push(id);
        }
        let mut uses_prng = false;
        body.walk(&mut |op| uses_prng |= matches!(op.kind, OpKind::PrngSeed { .. }));
        if uses_prng {
            // Each program starts unseeded (the tracer makes kernels seed before drawing).
            let state = self.splat(Literal::Int(0), &prng_state_type());
            scope.refs.insert(PRNG_STATE, RefValue { name: state, ty: prng_state_type() });
            scope.mutable.push(PRNG_STATE);
        }
        self.region(body, &body.body, &mut scope)?;
        let mut results = Vec::new();
        for (o, op) in call.outputs.iter().enumerate() {
            let r = scope.refs[&body.args[n_pf + n_in + o]].clone();
            let block_t = ValueType::new(op.array.dtype, op.block_dims());
            let block = self.reshape(&r.name, &r.ty, &block_t);
            let padded = ValueType::new(op.array.dtype, padded_shape(op));
            results.push(self.dynamic_update_slice(&args[1 + o], &padded, &block, &block_t, &offsets[n_in + o]));
        }
        for s in 0..call.scratch.len() {
            results.push(scope.refs[&body.args[n_pf + n_in + n_out + s]].name.clone());
        }
        Ok(results)
    }

    /// Emits an index map inline; returns its block indices (i32 scalars).
    fn index_map(&mut self, map: &Func, grid: &[String], prefetch: &[String]) -> Result<Vec<String>> {
        let mut scope = Scope { names: HashMap::new(), refs: HashMap::new(), mutable: Vec::new(), grid: grid.to_vec() };
        for (i, &a) in map.args.iter().enumerate() {
            match map.ty(a) {
                Type::Value(_) => {
                    scope.names.insert(a, grid[i].clone());
                }
                Type::Ref(r) => {
                    let p = &prefetch[i - grid.len()];
                    scope.refs.insert(a, RefValue { name: p.clone(), ty: ValueType::new(r.dtype, r.shape.clone()) });
                }
            }
        }
        self.region(map, &map.body, &mut scope)?;
        Ok(map.results.iter().map(|r| scope.names[r].clone()).collect())
    }

    fn unsupported(&self, loc: Loc, message: impl Into<String>) -> Error {
        Error::Unsupported { kernel: self.call.kernel.name().into(), target: "portable StableHLO", loc, message: message.into() }
    }

    fn region(&mut self, func: &Func, region: &Region, scope: &mut Scope) -> Result<Vec<String>> {
        for op in &region.ops {
            if let OpKind::Yield { values } = &op.kind {
                return Ok(values.iter().map(|v| scope.names[v].clone()).collect());
            }
            self.emit(func, op, scope)?;
        }
        Ok(Vec::new())
    }

    /// Offsets (i32 scalars) and sizes of an access, and the shape with point dims dropped.
    fn access(&mut self, index: &[Index], ref_shape: &[usize], scope: &Scope) -> (Vec<String>, Vec<usize>, bool) {
        let i32t = tensor_type(&ValueType::scalar(DType::I32));
        let index: Vec<Index> = if index.is_empty() { vec![Index::Full; ref_shape.len()] } else { index.to_vec() };
        let mut offsets = Vec::new();
        let mut sizes = Vec::new();
        let mut whole = true;
        for (ix, &d) in index.iter().zip(ref_shape) {
            let (start, len) = match ix {
                Index::Full => (Offset::Static(0), d),
                Index::Slice { start, len } => (*start, *len),
                Index::Point(o) => (*o, 1),
            };
            whole &= matches!(start, Offset::Static(0)) && len == d;
            offsets.push(match start {
                Offset::Static(s) => self.constant(&s.to_string(), &i32t),
                Offset::Dynamic(v) => scope.names[&v].clone(),
            });
            sizes.push(len);
        }
        (offsets, sizes, whole)
    }

    fn vt(func: &Func, v: ValueId) -> ValueType {
        match func.ty(v) {
            Type::Value(t) => t.clone(),
            Type::Ref(r) => ValueType::new(r.dtype, r.shape.clone()),
        }
    }

    fn emit(&mut self, func: &Func, op: &Op, scope: &mut Scope) -> Result<()> {
        let name = |scope: &Scope, v: &ValueId| scope.names[v].clone();
        let result = op.results.first().copied();
        let rt = result.map(|r| Self::vt(func, r));
        let rtt = rt.as_ref().map(tensor_type).unwrap_or_default();
        let value = match &op.kind {
            OpKind::Constant(lit) => {
                let t = rt.clone().expect("constants have a result");
                self.splat(*lit, &t)
            }
            OpKind::ProgramId { axis } => scope.grid[*axis].clone(),
            OpKind::NumPrograms { axis } => self.constant(&self.call.grid[*axis].to_string(), &rtt),
            OpKind::Load { src, index } => {
                let (loaded, region) = self.read_ref(*src, index, scope);
                self.reshape(&loaded, &region, rt.as_ref().expect("loads have a result"))
            }
            OpKind::Store { dst, index, value } => {
                self.write_ref(*dst, index, &name(scope, value), &Self::vt(func, *value), scope);
                return Ok(());
            }
            OpKind::Unary { op: u, x } => {
                let t = Self::vt(func, *x);
                self.unary_of(*u, &name(scope, x), &t, op.loc)?
            }
            OpKind::Binary { op: b, lhs, rhs } => {
                let t = Self::vt(func, *lhs);
                self.binary_of(*b, &name(scope, lhs), &name(scope, rhs), &t, op.loc)?
            }
            OpKind::Compare { op: c, lhs, rhs } => {
                let t = Self::vt(func, *lhs);
                self.compare_of(*c, &name(scope, lhs), &name(scope, rhs), &t)
            }
            OpKind::Select { cond, on_true, on_false } => {
                let t = rt.clone().expect("selects have a result");
                self.select_of(&name(scope, cond), &name(scope, on_true), &name(scope, on_false), &t, op.loc)
            }
            OpKind::Cast { x } => {
                let xt = tensor_type(&Self::vt(func, *x));
                let x = name(scope, x);
                self.op("stablehlo.convert", &[(&x, &xt)], &[], &rtt)
            }
            OpKind::Broadcast { x } => {
                let xt = Self::vt(func, *x);
                let t = rt.clone().expect("broadcasts have a result");
                let dims: Vec<usize> = (t.shape.len() - xt.shape.len()..t.shape.len()).collect();
                let x = name(scope, x);
                self.op("stablehlo.broadcast_in_dim", &[(&x, &tensor_type(&xt))], &[format!("broadcast_dimensions = {}", i64_array(&dims))], &rtt)
            }
            OpKind::Reshape { x } => {
                let xt = Self::vt(func, *x);
                let x = name(scope, x);
                self.reshape(&x, &xt, rt.as_ref().expect("reshapes have a result"))
            }
            OpKind::Reduce { op: ReduceOp::Sum, x, axis } if row_sum_as_dot(&Self::vt(func, *x), *axis) => {
                // XLA CPU reduces a row element by element; a product with ones is a vectorized
                // matrix-vector product (DESIGN.md §5).
                let xt = Self::vt(func, *x);
                let k = xt.shape.get(1).copied().unwrap_or(0);
                let ones_t = ValueType::new(DType::F32, [k]);
                let ones = self.splat(Literal::Float(1.0), &ones_t);
                let dims = dot_dimension_numbers(1, 0);
                // Full f32 products: a GPU may otherwise round a default-precision dot to TF32.
                let precision = "precision_config = [#stablehlo<precision HIGHEST>, #stablehlo<precision HIGHEST>]".to_string();
                let x = name(scope, x);
                self.op("stablehlo.dot_general", &[(&x, &tensor_type(&xt)), (&ones, &tensor_type(&ones_t))], &[dims, precision], &rtt)
            }
            OpKind::Reduce { op: r, x, axis } => {
                let xt = Self::vt(func, *x);
                let st = ValueType::scalar(xt.dtype);
                let stt = tensor_type(&st);
                let float = xt.dtype.is_float();
                let init = match r {
                    ReduceOp::Sum => zero(xt.dtype),
                    ReduceOp::Max if float => Literal::Float(f64::NEG_INFINITY),
                    ReduceOp::Min if float => Literal::Float(f64::INFINITY),
                    ReduceOp::Max if xt.dtype == DType::Bool => Literal::Bool(false),
                    ReduceOp::Min if xt.dtype == DType::Bool => Literal::Bool(true),
                    ReduceOp::Max => Literal::Int(i32::MIN as i64),
                    ReduceOp::Min => Literal::Int(i32::MAX as i64),
                };
                let init = self.splat(init, &st);
                let x = name(scope, x);
                let res = self.fresh();
                let (a, b) = (self.fresh(), self.fresh());
                self.line(&format!("{res} = \"stablehlo.reduce\"({x}, {init}) ({{"));
                self.line(&format!("^bb0({a}: {stt}, {b}: {stt}):"));
                self.depth += 1;
                // The elementwise op's own form: a float max or min keeps a NaN, which XLA
                // CPU's `maximum` reducer drops.
                let s = self.binary_of(r.combiner(xt.dtype), &a, &b, &st, op.loc)?;
                self.ret(&[s], std::slice::from_ref(&stt));
                self.depth -= 1;
                self.line(&format!("}}) {{dimensions = {}}} : ({}, {stt}) -> {rtt}", i64_array(&[*axis]), tensor_type(&xt)));
                res
            }
            OpKind::Dot { lhs, rhs, transpose_lhs, transpose_rhs } => {
                let (lt, rht) = (tensor_type(&Self::vt(func, *lhs)), tensor_type(&Self::vt(func, *rhs)));
                let lc = if *transpose_lhs { 0 } else { 1 };
                let rc = if *transpose_rhs { 1 } else { 0 };
                let dims = dot_dimension_numbers(lc, rc);
                let (a, b) = (name(scope, lhs), name(scope, rhs));
                self.op("stablehlo.dot_general", &[(&a, &lt), (&b, &rht)], &[dims], &rtt)
            }
            OpKind::Iota { dim } => self.op("stablehlo.iota", &[], &[format!("iota_dimension = {dim} : i64")], &rtt),
            OpKind::Roll { x, shift, axis, stride: None } => {
                let t = Self::vt(func, *x);
                self.roll(&name(scope, x), &t, &name(scope, shift), *axis)
            }
            OpKind::Roll { x, shift, axis, stride: Some(s) } => {
                let t = Self::vt(func, *x);
                self.roll_strided(&name(scope, x), &t, &name(scope, shift), *axis, *s)
            }
            OpKind::Slice { x, start } => {
                let (t, out) = (Self::vt(func, *x), rt.clone().expect("slices have a result"));
                let limit: Vec<usize> = start.iter().zip(&out.shape).map(|(s, l)| s + l).collect();
                self.slice(&name(scope, x), &t, start, &limit)
            }
            OpKind::Concat { xs, axis } => {
                let types: Vec<String> = xs.iter().map(|&x| tensor_type(&Self::vt(func, x))).collect();
                let names: Vec<String> = xs.iter().map(|x| name(scope, x)).collect();
                let operands: Vec<(&str, &str)> = names.iter().zip(&types).map(|(n, t)| (n.as_str(), t.as_str())).collect();
                self.op("stablehlo.concatenate", &operands, &[format!("dimension = {axis} : i64")], &rtt)
            }
            OpKind::Transpose { x, perm } => {
                let xt = tensor_type(&Self::vt(func, *x));
                self.op("stablehlo.transpose", &[(&name(scope, x), &xt)], &[format!("permutation = {}", i64_array(perm))], &rtt)
            }
            OpKind::Bitcast { x } => {
                let (from, to) = (Self::vt(func, *x), rt.clone().expect("bitcasts have a result"));
                self.bitcast(&name(scope, x), &from, &to)
            }
            OpKind::AssumeMultiple { x, .. } => name(scope, x),
            // A copy lands at once: the interpreter's checked mode holds kernels to waiting
            // before they read its destination, so nothing can observe the difference.
            OpKind::DmaStart(c) => {
                let (data, region) = self.read_ref(c.src, &c.src_index, scope);
                self.write_ref(c.dst, &c.dst_index, &data, &region, scope);
                return Ok(());
            }
            OpKind::DmaWait(_) => return Ok(()),
            OpKind::PrngSeed { seeds } => {
                let seeds: Vec<String> = seeds.iter().map(|s| name(scope, s)).collect();
                let key = random::seed_key(&mut Words { e: self, shape: Vec::new() }, &seeds);
                let zero = self.constant("0", &tensor_type(&ValueType::scalar(DType::I32)));
                let state = self.prng_state(&key, &zero);
                scope.refs.insert(PRNG_STATE, RefValue { name: state, ty: prng_state_type() });
                return Ok(());
            }
            OpKind::PrngRandomBits => {
                let t = rt.clone().expect("random bits have a result");
                let state = scope.refs[&PRNG_STATE].name.clone();
                let (key, counter) = (self.prng_part(&state, 0), self.prng_part(&state, 1));
                // Element indices in row-major order, as the interpreter numbers them.
                let n = t.num_elements();
                let flat = ValueType::new(DType::I32, [n]);
                let iota = self.op("stablehlo.iota", &[], &["iota_dimension = 0 : i64".into()], &tensor_type(&flat));
                let element = self.reshape(&iota, &flat, &t);
                let mut words = Words { e: self, shape: t.shape.clone() };
                let (key_t, counter_t) = (words.splat_scalar(&key), words.splat_scalar(&counter));
                let bits = random::bits(&mut words, &key_t, &counter_t, &element);
                let i32t = tensor_type(&ValueType::scalar(DType::I32));
                let nc = self.constant(&(n as u32 as i32).to_string(), &i32t);
                let next = self.i32_binary("stablehlo.add", &counter, &nc);
                let state = self.prng_state(&key, &next);
                scope.refs.insert(PRNG_STATE, RefValue { name: state, ty: prng_state_type() });
                bits
            }
            OpKind::If { cond, then_region, else_region } => return self.emit_if(func, op, *cond, then_region, else_region, scope),
            OpKind::For { lo, hi, inits, body } => return self.emit_for(func, op, *lo, *hi, inits, body, scope),
            OpKind::While { inits, cond, body } => return self.emit_while(func, op, inits, cond, body, scope),
            OpKind::Yield { .. } => return Err(self.unsupported(op.loc, "a yield outside a region")),
        };
        if let Some(r) = result {
            scope.names.insert(r, value);
        }
        Ok(())
    }

    /// The region `index` selects in ref `r`, with its type (point axes kept, as length 1).
    fn read_ref(&mut self, r: ValueId, index: &[Index], scope: &Scope) -> (String, ValueType) {
        let r = scope.refs[&r].clone();
        let (offsets, sizes, whole) = self.access(index, &r.ty.shape, scope);
        let region = ValueType::new(r.ty.dtype, sizes);
        let read = if whole { r.name } else { self.dynamic_slice(&r.name, &r.ty, &offsets, &region.shape) };
        (read, region)
    }

    /// Writes the value `v` (of type `vt`, with the region's elements) into the region `index`
    /// selects in ref `r`: the ref's value in `scope` becomes the updated one.
    fn write_ref(&mut self, r: ValueId, index: &[Index], v: &str, vt: &ValueType, scope: &mut Scope) {
        let dst = scope.refs[&r].clone();
        let (offsets, sizes, whole) = self.access(index, &dst.ty.shape, scope);
        let region = ValueType::new(dst.ty.dtype, sizes);
        let v = self.reshape(v, vt, &region);
        let updated = if whole { self.reshape(&v, &region, &dst.ty) } else { self.dynamic_update_slice(&dst.name, &dst.ty, &v, &region, &offsets) };
        scope.refs.insert(r, RefValue { name: updated, ty: dst.ty });
    }

    /// The generator state `[key, counter]`.
    fn prng_state(&mut self, key: &str, counter: &str) -> String {
        let (st, one) = (tensor_type(&ValueType::scalar(DType::I32)), tensor_type(&ValueType::new(DType::I32, [1])));
        let k = self.op("stablehlo.reshape", &[(key, &st)], &[], &one);
        let c = self.op("stablehlo.reshape", &[(counter, &st)], &[], &one);
        self.op("stablehlo.concatenate", &[(&k, &one), (&c, &one)], &["dimension = 0 : i64".into()], &tensor_type(&prng_state_type()))
    }

    /// Word `i` of the generator state, as a scalar.
    fn prng_part(&mut self, state: &str, i: usize) -> String {
        let part = self.slice(state, &prng_state_type(), &[i], &[i + 1]);
        self.reshape(&part, &ValueType::new(DType::I32, [1]), &ValueType::scalar(DType::I32))
    }

    /// `x` rotated by the i32 scalar `shift` along `axis`, as `jnp.roll`: the window of
    /// `concat(x, x)` that starts at `(n - shift mod n) mod n`.
    fn roll(&mut self, x: &str, t: &ValueType, shift: &str, axis: usize) -> String {
        let n = t.shape.get(axis).copied().unwrap_or(1).max(1);
        let i32t = tensor_type(&ValueType::scalar(DType::I32));
        let nc = self.constant(&n.to_string(), &i32t);
        let s = self.euclidean_rem(shift, &nc, &i32t);
        let back = self.i32_binary("stablehlo.subtract", &nc, &s);
        let start = self.i32_binary("stablehlo.remainder", &back, &nc);
        let mut doubled = t.clone();
        if let Some(d) = doubled.shape.get_mut(axis) {
            *d *= 2;
        }
        let tt = tensor_type(t);
        let xx = self.op("stablehlo.concatenate", &[(x, &tt), (x, &tt)], &[format!("dimension = {axis} : i64")], &tensor_type(&doubled));
        let zero = self.constant("0", &i32t);
        let offsets: Vec<String> = (0..t.shape.len()).map(|d| if d == axis { start.clone() } else { zero.clone() }).collect();
        self.dynamic_slice(&xx, &doubled, &offsets, &t.shape)
    }

    /// `x mod n` in `0..n` for integers `x` and `n` of type `ty` (`remainder` keeps the
    /// dividend's sign).
    fn euclidean_rem(&mut self, x: &str, n: &str, ty: &str) -> String {
        let r = self.op("stablehlo.remainder", &[(x, ty), (n, ty)], &[], ty);
        let r = self.op("stablehlo.add", &[(&r, ty), (n, ty)], &[], ty);
        self.op("stablehlo.remainder", &[(&r, ty), (n, ty)], &[], ty)
    }

    /// Pallas' `pltpu.bitcast` as its CPU lowering writes it: between widths, the packed rows
    /// become (or come from) a minor axis that `bitcast_convert` folds (or unfolds), the
    /// first row in the lowest bits.
    fn bitcast(&mut self, x: &str, from: &ValueType, to: &ValueType) -> String {
        let (from_bytes, to_bytes) = (from.dtype.size_bytes(), to.dtype.size_bytes());
        let rank = from.shape.len();
        if from_bytes == to_bytes || rank < 2 {
            return self.op("stablehlo.bitcast_convert", &[(x, &tensor_type(from))], &[], &tensor_type(to));
        }
        let swap: Vec<usize> = (0..rank - 1).chain([rank, rank - 1]).collect();
        let lead = &from.shape[..rank - 2];
        let (m, n) = (from.shape[rank - 2], from.shape[rank - 1]);
        if from_bytes < to_bytes {
            let p = to_bytes / from_bytes;
            let split = ValueType::new(from.dtype, [lead, &[m / p, p, n]].concat());
            let r = self.reshape(x, from, &split);
            let packed = ValueType::new(from.dtype, [lead, &[m / p, n, p]].concat());
            let t = self.op("stablehlo.transpose", &[(&r, &tensor_type(&split))], &[format!("permutation = {}", i64_array(&swap))], &tensor_type(&packed));
            self.op("stablehlo.bitcast_convert", &[(&t, &tensor_type(&packed))], &[], &tensor_type(to))
        } else {
            let p = from_bytes / to_bytes;
            let unpacked = ValueType::new(to.dtype, [lead, &[m, n, p]].concat());
            let b = self.op("stablehlo.bitcast_convert", &[(x, &tensor_type(from))], &[], &tensor_type(&unpacked));
            let rows = ValueType::new(to.dtype, [lead, &[m, p, n]].concat());
            let t = self.op("stablehlo.transpose", &[(&b, &tensor_type(&unpacked))], &[format!("permutation = {}", i64_array(&swap))], &tensor_type(&rows));
            self.reshape(&t, &rows, to)
        }
    }

    /// A strided roll as a gather: element `i` along `axis` of slice `j` along the stride's
    /// axis reads element `(i - shift - j * stride) mod n`.
    fn roll_strided(&mut self, x: &str, t: &ValueType, shift: &str, axis: usize, s: RollStride) -> String {
        let n = t.shape.get(axis).copied().unwrap_or(1).max(1);
        let i32t = tensor_type(&ValueType::scalar(DType::I32));
        let it = ValueType::new(DType::I32, t.shape.clone());
        let itt = tensor_type(&it);
        let nc = self.constant(&n.to_string(), &i32t);
        let shift = self.euclidean_rem(shift, &nc, &i32t);
        let shift = self.op("stablehlo.broadcast_in_dim", &[(&shift, &i32t)], &["broadcast_dimensions = array<i64>".into()], &itt);
        // Reduced modulo n first, the products stay far inside i32 for any tile.
        let step = self.constant(&(u64::from(s.stride) % n as u64).to_string(), &itt);
        let j = self.op("stablehlo.iota", &[], &[format!("iota_dimension = {} : i64", s.axis)], &itt);
        let grown = self.op("stablehlo.multiply", &[(&j, &itt), (&step, &itt)], &[], &itt);
        let by = self.op("stablehlo.add", &[(&shift, &itt), (&grown, &itt)], &[], &itt);
        let i = self.op("stablehlo.iota", &[], &[format!("iota_dimension = {axis} : i64")], &itt);
        let back = self.op("stablehlo.subtract", &[(&i, &itt), (&by, &itt)], &[], &itt);
        let nt = self.constant(&n.to_string(), &itt);
        let from = self.euclidean_rem(&back, &nt, &itt);
        // Each element's full source index, the last dimension holding one coordinate per axis.
        let rank = t.shape.len();
        let mut one = t.shape.clone();
        one.push(1);
        let ot = ValueType::new(DType::I32, one);
        let ott = tensor_type(&ot);
        let coords: Vec<String> = (0..rank)
            .map(|d| {
                let c = if d == axis { from.clone() } else { self.op("stablehlo.iota", &[], &[format!("iota_dimension = {d} : i64")], &itt) };
                self.reshape(&c, &it, &ot)
            })
            .collect();
        let mut all = t.shape.clone();
        all.push(rank);
        let at = tensor_type(&ValueType::new(DType::I32, all));
        let parts: Vec<(&str, &str)> = coords.iter().map(|c| (c.as_str(), ott.as_str())).collect();
        let index = self.op("stablehlo.concatenate", &parts, &[format!("dimension = {rank} : i64")], &at);
        let dims: Vec<usize> = (0..rank).collect();
        let list = |v: &[usize]| v.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
        let attrs = [
            format!("dimension_numbers = #stablehlo.gather<collapsed_slice_dims = [{0}], start_index_map = [{0}], index_vector_dim = {rank}>", list(&dims)),
            "indices_are_sorted = false".to_string(),
            format!("slice_sizes = {}", i64_array(&vec![1; rank])),
        ];
        let tt = tensor_type(t);
        self.op("stablehlo.gather", &[(x, &tt), (&index, &at)], &attrs, &tt)
    }

    fn unary_of(&mut self, u: UnaryOp, x: &str, t: &ValueType, l: Loc) -> Result<String> {
        let Some(forms) = u.def().lowerings(t.dtype) else { return Err(self.unsupported(l, format!("`{}` of {}", u.name(), t.dtype))) };
        let tt = tensor_type(t);
        match forms.stablehlo {
            Lowering::Op(name) => Ok(self.op(name, &[(x, &tt)], &[], &tt)),
            Lowering::Composite(build) => composite(self, t, l, |c| build(c, x)),
        }
    }

    fn binary_of(&mut self, b: BinaryOp, x: &str, y: &str, t: &ValueType, l: Loc) -> Result<String> {
        let Some(forms) = b.def().lowerings(t.dtype) else { return Err(self.unsupported(l, format!("`{}` of {}", b.name(), t.dtype))) };
        let tt = tensor_type(t);
        match forms.stablehlo {
            Lowering::Op(name) => Ok(self.op(name, &[(x, &tt), (y, &tt)], &[], &tt)),
            Lowering::Composite(build) => composite(self, t, l, |c| build(c, x, y)),
        }
    }

    fn compare_of(&mut self, c: CmpOp, x: &str, y: &str, t: &ValueType) -> String {
        let (tt, out) = (tensor_type(t), tensor_type(&ValueType::new(DType::Bool, t.shape.clone())));
        self.op("stablehlo.compare", &[(x, &tt), (y, &tt)], &[direction(c.def().stablehlo), compare_type(t.dtype)], &out)
    }

    fn mutable_state(scope: &Scope) -> (Vec<String>, Vec<String>) {
        scope.mutable.iter().map(|id| (scope.refs[id].name.clone(), tensor_type(&scope.refs[id].ty))).unzip()
    }

    fn set_mutable(scope: &mut Scope, names: &[String]) {
        for (id, n) in scope.mutable.clone().iter().zip(names) {
            if let Some(r) = scope.refs.get_mut(id) {
                r.name = n.clone();
            }
        }
    }

    /// A traced `if`. One that carries refs is two `stablehlo.while` loops of at most one trip
    /// (the then region while the condition holds, the else region while it does not): XLA
    /// updates a loop's carried buffers in place, where a `stablehlo.if` would copy each ref
    /// it carries, taken or not (a kv buffer a DMA fills, every kv block). An `if` that
    /// carries none is a `stablehlo.if`.
    fn emit_if(&mut self, func: &Func, op: &Op, cond: ValueId, then_region: &Region, else_region: &Region, scope: &mut Scope) -> Result<()> {
        let result_types: Vec<ValueType> = op.results.iter().map(|&r| Self::vt(func, r)).collect();
        let (before, ref_types) = Self::mutable_state(scope);
        let mut types: Vec<String> = result_types.iter().map(tensor_type).collect();
        types.extend(ref_types.iter().cloned());
        let c = scope.names[&cond].clone();
        if ref_types.is_empty() {
            let r = self.fresh();
            self.line(&format!("{r}:{} = \"stablehlo.if\"({c}) ({{", types.len().max(1)));
            for (i, region) in [then_region, else_region].into_iter().enumerate() {
                if i == 1 {
                    self.line("}, {");
                }
                self.depth += 1;
                let values = self.region(func, region, scope)?;
                self.ret(&values, &types);
                self.depth -= 1;
            }
            self.line(&format!("}}) : ({}) -> ({})", tensor_type(&ValueType::scalar(DType::Bool)), types.join(", ")));
            for (i, &res) in op.results.iter().enumerate() {
                scope.names.insert(res, format!("{r}#{i}"));
            }
            return Ok(());
        }
        let pred = tensor_type(&ValueType::scalar(DType::Bool));
        let not_c = self.op("stablehlo.not", &[(&c, &pred)], &[], &pred);
        // The results start as zeros; the one loop that runs sets them.
        let mut state: Vec<String> = result_types.iter().map(|t| self.splat(zero(t.dtype), t)).collect();
        state.extend(before);
        let mut loop_types = vec![pred.clone()];
        loop_types.extend(types.iter().cloned());
        let no = self.constant("false", &pred);
        for (region, runs) in [(then_region, c), (else_region, not_c)] {
            let w = self.fresh();
            let mut inits = vec![runs];
            inits.extend(state.iter().cloned());
            self.line(&format!("{w}:{} = \"stablehlo.while\"({}) ({{", loop_types.len(), inits.join(", ")));
            let args: Vec<String> = loop_types.iter().map(|_| self.fresh()).collect();
            self.line(&format!("^bb0({}):", typed(&args, &loop_types)));
            self.depth += 1;
            self.ret(std::slice::from_ref(&args[0]), std::slice::from_ref(&pred));
            self.depth -= 1;
            self.line("}, {");
            let args: Vec<String> = loop_types.iter().map(|_| self.fresh()).collect();
            self.line(&format!("^bb0({}):", typed(&args, &loop_types)));
            self.depth += 1;
            Self::set_mutable(scope, &args[1 + op.results.len()..]);
            let mut values = vec![no.clone()];
            values.extend(self.region(func, region, scope)?);
            values.extend(Self::mutable_state(scope).0);
            self.ret(&values, &loop_types);
            self.depth -= 1;
            self.line(&format!("}}) : ({}) -> ({})", loop_types.join(", "), loop_types.join(", ")));
            state = (1..loop_types.len()).map(|i| format!("{w}#{i}")).collect();
        }
        for (i, &res) in op.results.iter().enumerate() {
            scope.names.insert(res, state[i].clone());
        }
        Self::set_mutable(scope, &state[op.results.len()..]);
        Ok(())
    }

    /// `stablehlo.while` over the carried values and the refs the body writes; the condition
    /// region reads the refs as they stand.
    fn emit_while(&mut self, func: &Func, op: &Op, inits: &[ValueId], cond: &Region, body: &Region, scope: &mut Scope) -> Result<()> {
        let (refs_now, ref_types) = Self::mutable_state(scope);
        let mut types: Vec<String> = inits.iter().map(|&i| tensor_type(&Self::vt(func, i))).collect();
        types.extend(ref_types.iter().cloned());
        if types.is_empty() {
            return Err(self.unsupported(op.loc, "a traced `while` that carries nothing and writes no ref never changes its condition"));
        }
        let mut init_names: Vec<String> = inits.iter().map(|i| scope.names[i].clone()).collect();
        init_names.extend(refs_now);
        let n = inits.len();
        let w = self.fresh();
        let pred = tensor_type(&ValueType::scalar(DType::Bool));
        self.line(&format!("{w}:{} = \"stablehlo.while\"({}) ({{", types.len(), init_names.join(", ")));
        for (i, region) in [cond, body].into_iter().enumerate() {
            let args: Vec<String> = types.iter().map(|_| self.fresh()).collect();
            self.line(&format!("^bb0({}):", typed(&args, &types)));
            self.depth += 1;
            for (a, name) in region.args.iter().zip(&args) {
                scope.names.insert(*a, name.clone());
            }
            Self::set_mutable(scope, &args[n..]);
            let yielded = self.region(func, region, scope)?;
            if i == 0 {
                self.ret(&yielded, std::slice::from_ref(&pred));
            } else {
                let mut carried = yielded;
                carried.extend(Self::mutable_state(scope).0);
                self.ret(&carried, &types);
            }
            self.depth -= 1;
            if i == 0 {
                self.line("}, {");
            }
        }
        self.line(&format!("}}) : ({}) -> ({})", types.join(", "), types.join(", ")));
        for (i, &r) in op.results.iter().enumerate() {
            scope.names.insert(r, format!("{w}#{i}"));
        }
        let after: Vec<String> = (0..ref_types.len()).map(|i| format!("{w}#{}", n + i)).collect();
        Self::set_mutable(scope, &after);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn emit_for(&mut self, func: &Func, op: &Op, lo: ValueId, hi: ValueId, inits: &[ValueId], body: &Region, scope: &mut Scope) -> Result<()> {
        let i32t = tensor_type(&ValueType::scalar(DType::I32));
        let carried_types: Vec<String> = inits.iter().map(|&i| tensor_type(&Self::vt(func, i))).collect();
        let (refs_now, ref_types) = Self::mutable_state(scope);
        let mut types = vec![i32t.clone()];
        types.extend(carried_types.iter().cloned());
        types.extend(ref_types.iter().cloned());
        let mut init_names = vec![scope.names[&lo].clone()];
        init_names.extend(inits.iter().map(|i| scope.names[i].clone()));
        init_names.extend(refs_now);
        let hi = scope.names[&hi].clone();
        let (w, body_args) = self.open_counted_while(&init_names, &types, &hi);
        scope.names.insert(body.args[0], body_args[0].clone());
        for (a, n) in body.args[1..].iter().zip(&body_args[1..]) {
            scope.names.insert(*a, n.clone());
        }
        Self::set_mutable(scope, &body_args[1 + inits.len()..]);
        let mut carried = self.region(func, body, scope)?;
        carried.extend(Self::mutable_state(scope).0);
        self.close_counted_while(&body_args[0], carried, &types);
        for (i, &res) in op.results.iter().enumerate() {
            scope.names.insert(res, format!("{w}#{}", 1 + i));
        }
        let after: Vec<String> = (0..ref_types.len()).map(|i| format!("{w}#{}", 1 + inits.len() + i)).collect();
        Self::set_mutable(scope, &after);
        Ok(())
    }
}

/// Whether a sum is over the rows of a 2-D f32 tile long enough for a matrix-vector product to
/// beat XLA CPU's reduction loop.
fn row_sum_as_dot(x: &ValueType, axis: usize) -> bool {
    x.dtype == DType::F32 && x.shape.len() == 2 && axis == 1 && x.shape[1] >= ROW_SUM_DOT_MIN
}

/// The shortest row summed as a product with ones.
const ROW_SUM_DOT_MIN: usize = 256;

/// A `dot_general`'s attribute contracting `lhs`'s dim `lc` with `rhs`'s dim `rc`.
fn dot_dimension_numbers(lc: usize, rc: usize) -> String {
    format!("dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = [{lc}], rhs_contracting_dimensions = [{rc}]>")
}
