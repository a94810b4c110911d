//! IR → Mosaic: the kernel `func.func` with Pallas' attributes and one `transform_N`
//! function per operand, written either as readable MLIR or in the version-stable
//! serialized form (`stable_mosaic.*` generic ops) that anything we ship uses.

use std::collections::HashMap;
use std::fmt::Write;

use torchtpu_dsl::call::memref_access;
use torchtpu_dsl::elementwise::{Lowering, Predicate};
use torchtpu_dsl::ir::{BinaryOp, CmpOp, DmaCopy, Func, Index, Literal, Loc, MemorySpace, Offset, Op, OpKind, ReduceOp, RefType, Region, Type, UnaryOp, ValueId, ValueType};
use torchtpu_dsl::{DType, Semantics, TracedCall};

use crate::compose::{composite, Primitives};
use crate::error::{Error, Result};
use crate::mlir::{float_literal, loc, memref_type, symbol, value_type};

/// The Mosaic serialization version we write (JAX's forward-compatible one).
pub const STABLE_VERSION: u32 = 11;

/// Which text form to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Form {
    /// Custom assembly syntax, for people; parsed by libtpu with its current dialect.
    Pretty,
    /// Generic `stable_mosaic.*` ops with `stable_mosaic.version`: stable across libtpu versions.
    Stable,
}

/// The Mosaic module for a traced call.
pub fn module(call: &TracedCall, form: Form) -> Result<String> {
    call.check_grid_bounds()?;
    let mut out = String::new();
    match form {
        Form::Pretty => out.push_str("module {\n"),
        Form::Stable => writeln!(out, "module attributes {{stable_mosaic.version = {STABLE_VERSION} : i64}} {{").expect("write to String"),
    }
    out.push_str(&kernel_func(call, form)?);
    for (i, op) in call.inputs.iter().chain(&call.outputs).enumerate() {
        // An operand left in HBM has no window, hence no transform (as Pallas emits it).
        if op.space != MemorySpace::Any {
            out.push_str(&transform_func(call, &op.index_map, i, form)?);
        }
    }
    out.push_str("}\n");
    Ok(out)
}

/// The kernel's symbol name in the module.
pub fn kernel_symbol(call: &TracedCall) -> String {
    symbol(&call.name)
}

impl Primitives for Emitter<'_> {
    fn unary_of(&mut self, op: UnaryOp, x: &str, t: &ValueType, l: Loc) -> Result<String> {
        Emitter::unary_of(self, op, x, t, l)
    }
    fn binary_of(&mut self, op: BinaryOp, a: &str, b: &str, t: &ValueType, l: Loc) -> Result<String> {
        Emitter::binary_of(self, op, a, b, t, l)
    }
    fn compare_of(&mut self, op: CmpOp, a: &str, b: &str, t: &ValueType, l: Loc) -> Result<String> {
        Emitter::compare_of(self, op, a, b, t, l)
    }
    fn splat_of(&mut self, value: Literal, t: &ValueType, l: Loc) -> String {
        self.splat(value, t, l)
    }
    fn select_of(&mut self, cond: &str, a: &str, b: &str, t: &ValueType, l: Loc) -> String {
        Emitter::select_of(self, cond, a, b, t, l)
    }
    fn logical_not_of(&mut self, mask: &str, t: &ValueType, l: Loc) -> String {
        let t = ValueType::new(DType::Bool, t.shape.clone());
        let ones = self.splat(Literal::Bool(true), &t, l);
        self.simple("arith.xori", &[mask.to_string(), ones], &value_type(&t), &[], l)
    }
    fn target_op_of(&mut self, name: &str, args: &[&str], t: &ValueType, l: Loc) -> String {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        self.simple(name, &args, &value_type(t), &Emitter::attrs_of(name, t.dtype), l)
    }
}

/// An op in MLIR's generic syntax: `"name"(operands) attrs : (types) -> result`, where `attrs`
/// is written as given (` {...}` for attributes, ` <{...}>` for properties).
fn generic(name: &str, operands: &[(String, String)], attrs: &str, result_ty: Option<&str>) -> String {
    let names: Vec<&str> = operands.iter().map(|(n, _)| n.as_str()).collect();
    let types: Vec<&str> = operands.iter().map(|(_, t)| t.as_str()).collect();
    format!("\"{name}\"({}){attrs} : ({}) -> {}", names.join(", "), types.join(", "), result_ty.unwrap_or("()"))
}

/// A name and MLIR type per SSA value, and the text being written.
struct Emitter<'a> {
    call: &'a TracedCall,
    func: &'a Func,
    form: Form,
    out: String,
    depth: usize,
    next: usize,
    names: HashMap<ValueId, String>,
    /// For refs that are operand blocks: which memref dims the kernel's view squeezes away.
    squeezed: HashMap<ValueId, Vec<bool>>,
    /// Memref type of each ref argument (full block shape, squeezed dims as 1).
    refs: HashMap<ValueId, RefType>,
    /// Program ids of the kernel (its leading i32 arguments).
    grid_args: Vec<String>,
}

fn semantics(s: Semantics) -> &'static str {
    match s {
        Semantics::Parallel => "#tpu.dimension_semantics<parallel>",
        Semantics::Arbitrary => "#tpu.dimension_semantics<arbitrary>",
    }
}

fn i64_array(v: impl IntoIterator<Item = usize>) -> String {
    let items: Vec<String> = v.into_iter().map(|x| x.to_string()).collect();
    if items.is_empty() {
        "array<i64>".into()
    } else {
        format!("array<i64: {}>", items.join(", "))
    }
}

fn kernel_func(call: &TracedCall, form: Form) -> Result<String> {
    let body = &call.body;
    let mut e = Emitter::new(call, body, form);
    let mut params: Vec<(String, String)> = Vec::new();
    for i in 0..call.grid.len() {
        let n = format!("%arg{i}");
        e.grid_args.push(n.clone());
        params.push((n, "i32".into()));
    }
    let n_pf = call.prefetch.len();
    let operands: Vec<_> = call.inputs.iter().chain(&call.outputs).collect();
    for layout in call.ref_layouts() {
        let name = format!("%arg{}", params.len());
        params.push((name.clone(), memref_type(&layout.memref)));
        e.names.insert(layout.arg, name);
        e.squeezed.insert(layout.arg, layout.squeezed);
        e.refs.insert(layout.arg, layout.memref);
    }
    let windows: Vec<String> = operands
        .iter()
        .enumerate()
        .map(|(i, op)| match op.space {
            MemorySpace::Any => "{}".to_string(),
            _ => format!("{{transform_indices = @transform_{i}, window_bounds = {}}}", i64_array(op.block_dims())),
        })
        .collect();
    let attrs = [
        format!("dimension_semantics = [{}]", call.semantics.iter().map(|&s| semantics(s)).collect::<Vec<_>>().join(", ")),
        format!("iteration_bounds = {}", i64_array(call.grid.iter().copied())),
        format!("scalar_prefetch = {n_pf} : i64"),
        format!("scratch_operands = {} : i64", call.scratch.len()),
        "tpu.core_type = #tpu.core_type<tc>".to_string(),
        format!("window_params = [{}]", windows.join(", ")),
    ];
    e.depth = 2;
    e.region_ops(&body.body)?;
    let name = kernel_symbol(call);
    let fn_loc = call.kernel.loc();
    Ok(e.func_text(&name, &params, &[], &attrs, &[], fn_loc))
}

fn transform_func(call: &TracedCall, map: &Func, index: usize, form: Form) -> Result<String> {
    let mut e = Emitter::new(call, map, form);
    let mut params = Vec::new();
    for (i, &arg) in map.args.iter().enumerate() {
        let name = format!("%arg{i}");
        let ty = match map.ty(arg) {
            Type::Value(v) => value_type(v),
            Type::Ref(r) => {
                e.refs.insert(arg, r.clone());
                e.squeezed.insert(arg, vec![false; r.shape.len()]);
                memref_type(r)
            }
        };
        e.names.insert(arg, name.clone());
        params.push((name, ty));
    }
    e.depth = 2;
    e.region_ops(&map.body)?;
    let results: Vec<String> = map.results.iter().map(|r| e.name(*r)).collect();
    let result_types = vec!["i32".to_string(); results.len()];
    let fn_loc = map.values.first().map_or(call.kernel.loc(), |v| v.loc);
    Ok(e.func_text(&format!("transform_{index}"), &params, &result_types, &[], &results, fn_loc))
}

impl<'a> Emitter<'a> {
    fn new(call: &'a TracedCall, func: &'a Func, form: Form) -> Self {
        Emitter { call, func, form, out: String::new(), depth: 0, next: 0, names: HashMap::new(), squeezed: HashMap::new(), refs: HashMap::new(), grid_args: Vec::new() }
    }

    fn unsupported(&self, loc: Loc, message: impl Into<String>) -> Error {
        Error::Unsupported { kernel: self.call.kernel.name().to_string(), target: "Mosaic", loc, message: message.into() }
    }

    fn fresh(&mut self) -> String {
        self.next += 1;
        format!("%{}", self.next - 1)
    }

    fn name(&self, v: ValueId) -> String {
        self.names.get(&v).cloned().unwrap_or_else(|| format!("%undefined{}", v.0))
    }

    fn vt(&self, v: ValueId) -> ValueType {
        match self.func.ty(v) {
            Type::Value(t) => t.clone(),
            Type::Ref(r) => ValueType::new(r.dtype, r.shape.clone()),
        }
    }

    fn ty(&self, v: ValueId) -> String {
        value_type(&self.vt(v))
    }

    fn line(&mut self, text: &str, l: Loc) {
        let pad = "  ".repeat(self.depth);
        let _ = writeln!(self.out, "{pad}{text}{}", loc(l));
    }

    /// One single-result (or no-result) op. `pretty` is the custom syntax after `%r = `;
    /// `generic` is `(name, attrs)` for the stable form.
    #[allow(clippy::too_many_arguments)]
    fn op(&mut self, result: Option<&str>, pretty: String, name: &str, operands: &[(String, String)], attrs: &[String], result_ty: Option<&str>, l: Loc) {
        let lhs = result.map(|r| format!("{r} = ")).unwrap_or_default();
        let text = match self.form {
            Form::Pretty => format!("{lhs}{pretty}"),
            Form::Stable => {
                let attrs = if attrs.is_empty() { String::new() } else { format!(" {{{}}}", attrs.join(", ")) };
                format!("{lhs}{}", generic(&format!("stable_mosaic.{name}"), operands, &attrs, result_ty))
            }
        };
        self.line(&text, l);
    }

    /// Emits `arith.constant` and returns its name.
    fn constant(&mut self, value: &str, ty: &str, l: Loc) -> String {
        let r = self.fresh();
        let pretty = if ty == "i1" { format!("arith.constant {value}") } else { format!("arith.constant {value} : {ty}") };
        let attr = if ty == "i1" { format!("value = {value}") } else { format!("value = {value} : {ty}") };
        self.op(Some(&r), pretty, "arith.constant", &[], &[attr], Some(ty), l);
        r
    }

    fn literal(&self, lit: Literal, dtype: DType) -> String {
        match lit {
            Literal::Float(x) => float_literal(x, dtype),
            Literal::Int(i) if dtype.is_float() => float_literal(i as f64, dtype),
            Literal::Int(i) => i.to_string(),
            Literal::Bool(b) => b.to_string(),
        }
    }

    /// A splat constant of `t` (scalar or `dense<...>` vector).
    fn splat(&mut self, lit: Literal, t: &ValueType, l: Loc) -> String {
        let v = self.literal(lit, t.dtype);
        let ty = value_type(t);
        if t.shape.is_empty() {
            self.constant(&v, &ty, l)
        } else {
            self.constant(&format!("dense<{v}>"), &ty, l)
        }
    }

    fn index_const(&mut self, i: usize, l: Loc) -> String {
        self.constant(&i.to_string(), "index", l)
    }

    fn index_value(&mut self, v: ValueId, l: Loc) -> String {
        let r = self.fresh();
        let src = self.name(v);
        self.op(Some(&r), format!("arith.index_cast {src} : i32 to index"), "arith.index_cast", &[(src, "i32".into())], &[], Some("index"), l);
        r
    }

    fn shape_cast(&mut self, x: &str, from: &ValueType, to: &ValueType, l: Loc) -> String {
        if from.shape == to.shape {
            return x.to_string();
        }
        let (ft, tt) = (value_type(from), value_type(to));
        let r = self.fresh();
        if from.shape.is_empty() {
            self.op(Some(&r), format!("vector.broadcast {x} : {ft} to {tt}"), "vector.broadcast", &[(x.into(), ft)], &[], Some(&tt), l);
        } else {
            self.op(Some(&r), format!("vector.shape_cast {x} : {ft} to {tt}"), "vector.shape_cast", &[(x.into(), ft)], &[], Some(&tt), l);
        }
        r
    }

    /// Offsets (as `index` values) and the shape a load/store addresses in the full memref.
    fn access(&mut self, r: ValueId, index: &[Index], l: Loc) -> (Vec<String>, Vec<usize>) {
        let squeezed = self.squeezed.get(&r).cloned().unwrap_or_default();
        let memref = self.refs.get(&r).cloned().expect("refs are function arguments");
        let (mut offsets, mut shape) = (Vec::new(), Vec::new());
        for (start, len) in memref_access(&memref.shape, &squeezed, index) {
            offsets.push(match start {
                Offset::Static(s) => self.index_const(s, l),
                Offset::Dynamic(v) => self.index_value(v, l),
            });
            shape.push(len);
        }
        (offsets, shape)
    }

    fn region_ops(&mut self, region: &'a Region) -> Result<Vec<String>> {
        for op in &region.ops {
            if let OpKind::Yield { values } = &op.kind {
                return Ok(values.iter().map(|v| self.name(*v)).collect());
            }
            self.emit(op)?;
        }
        Ok(Vec::new())
    }

    fn set(&mut self, v: ValueId, name: String) {
        self.names.insert(v, name);
    }

    fn emit(&mut self, op: &'a Op) -> Result<()> {
        let l = op.loc;
        match &op.kind {
            OpKind::Constant(lit) => {
                let t = self.vt(op.results[0]);
                let c = self.splat(*lit, &t, l);
                self.set(op.results[0], c);
            }
            OpKind::ProgramId { axis } => {
                let Some(g) = self.grid_args.get(*axis).cloned() else { return Err(self.unsupported(l, "program_id outside a kernel")) };
                self.set(op.results[0], g);
            }
            OpKind::NumPrograms { axis } => {
                let c = self.constant(&self.call.grid[*axis].to_string(), "i32", l);
                self.set(op.results[0], c);
            }
            OpKind::Load { src, index } => {
                let out = self.vt(op.results[0]);
                let memref = self.refs[src].clone();
                let mty = memref_type(&memref);
                let (offsets, shape) = self.access(*src, index, l);
                let r = self.fresh();
                let mut operands = vec![(self.name(*src), mty.clone())];
                operands.extend(offsets.iter().map(|o| (o.clone(), "index".to_string())));
                if memref.space == MemorySpace::Smem {
                    let ty = value_type(&out);
                    self.op(
                        Some(&r),
                        format!("memref.load {}[{}] : {mty}", self.name(*src), offsets.join(", ")),
                        "memref.load",
                        &operands,
                        &["nontemporal = false".into()],
                        Some(&ty),
                        l,
                    );
                    self.set(op.results[0], r);
                } else {
                    if out.shape.is_empty() {
                        return Err(self.unsupported(l, "a scalar read from VMEM; load a slice and reduce it, or keep the table in SMEM (scalar prefetch or Smem scratch)"));
                    }
                    let loaded = ValueType::new(out.dtype, shape);
                    let vty = value_type(&loaded);
                    self.op(Some(&r), format!("vector.load {}[{}] : {mty}, {vty}", self.name(*src), offsets.join(", ")), "vector.load", &operands, &[], Some(&vty), l);
                    let c = self.shape_cast(&r, &loaded, &out, l);
                    self.set(op.results[0], c);
                }
            }
            OpKind::Store { dst, index, value } => {
                let memref = self.refs[dst].clone();
                let mty = memref_type(&memref);
                let vt = self.vt(*value);
                let (offsets, shape) = self.access(*dst, index, l);
                let v = self.name(*value);
                if memref.space == MemorySpace::Smem {
                    let mut operands = vec![(v.clone(), value_type(&vt)), (self.name(*dst), mty.clone())];
                    operands.extend(offsets.iter().map(|o| (o.clone(), "index".to_string())));
                    self.op(
                        None,
                        format!("memref.store {v}, {}[{}] : {mty}", self.name(*dst), offsets.join(", ")),
                        "memref.store",
                        &operands,
                        &["nontemporal = false".into()],
                        None,
                        l,
                    );
                } else {
                    let stored = ValueType::new(vt.dtype, shape);
                    let v = self.shape_cast(&v, &vt, &stored, l);
                    let vty = value_type(&stored);
                    let mut operands = vec![(v.clone(), vty.clone()), (self.name(*dst), mty.clone())];
                    operands.extend(offsets.iter().map(|o| (o.clone(), "index".to_string())));
                    self.op(
                        None,
                        format!("vector.store {v}, {}[{}] : {mty}, {vty}", self.name(*dst), offsets.join(", ")),
                        "vector.store",
                        &operands,
                        &["nontemporal = false".into()],
                        None,
                        l,
                    );
                }
            }
            OpKind::Unary { op: u, x } => {
                let r = self.unary(*u, *x, l)?;
                self.set(op.results[0], r);
            }
            OpKind::Binary { op: b, lhs, rhs } => {
                let r = self.binary(*b, *lhs, *rhs, l)?;
                self.set(op.results[0], r);
            }
            OpKind::Compare { op: c, lhs, rhs } => {
                let r = self.compare(*c, *lhs, *rhs, l)?;
                self.set(op.results[0], r);
            }
            OpKind::Select { cond, on_true, on_false } => {
                let (c, a, b, t) = (self.name(*cond), self.name(*on_true), self.name(*on_false), self.vt(*on_true));
                let r = self.select_of(&c, &a, &b, &t, l);
                self.set(op.results[0], r);
            }
            OpKind::Cast { x } => {
                let r = self.cast(*x, self.vt(op.results[0]), l)?;
                self.set(op.results[0], r);
            }
            OpKind::Broadcast { x } => {
                let (from, to) = (self.vt(*x), self.vt(op.results[0]));
                let (ft, tt) = (value_type(&from), value_type(&to));
                let src = self.name(*x);
                let r = self.fresh();
                self.op(Some(&r), format!("vector.broadcast {src} : {ft} to {tt}"), "vector.broadcast", &[(src, ft)], &[], Some(&tt), l);
                self.set(op.results[0], r);
            }
            OpKind::Reshape { x } => {
                let (from, to) = (self.vt(*x), self.vt(op.results[0]));
                if to.shape.is_empty() {
                    return Err(self.unsupported(l, "reshaping a tile to a scalar; reduce it instead"));
                }
                let src = self.name(*x);
                let r = self.shape_cast(&src, &from, &to, l);
                self.set(op.results[0], r);
            }
            OpKind::Reduce { op: red, x, axis } => {
                let (xt, rt) = (self.vt(*x), self.vt(op.results[0]));
                let kind = match (red, xt.dtype.is_float()) {
                    (ReduceOp::Sum, _) => "add",
                    (ReduceOp::Max, true) => "maximumf",
                    (ReduceOp::Min, true) => "minimumf",
                    (ReduceOp::Max, false) => "maxsi",
                    (ReduceOp::Min, false) => "minsi",
                };
                let identity = match (red, xt.dtype.is_float()) {
                    (ReduceOp::Sum, true) => Literal::Float(0.0),
                    (ReduceOp::Sum, false) => Literal::Int(0),
                    (ReduceOp::Max, true) => Literal::Float(f64::NEG_INFINITY),
                    (ReduceOp::Min, true) => Literal::Float(f64::INFINITY),
                    (ReduceOp::Max, false) => Literal::Int(i32::MIN as i64),
                    (ReduceOp::Min, false) => Literal::Int(i32::MAX as i64),
                };
                let acc = self.splat(identity, &rt, l);
                let (src, xty, rty) = (self.name(*x), value_type(&xt), value_type(&rt));
                let r = self.fresh();
                self.op(
                    Some(&r),
                    format!("vector.multi_reduction <{kind}>, {src}, {acc} [{axis}] : {xty} to {rty}"),
                    "vector.multi_reduction",
                    &[(src, xty.clone()), (acc, rty.clone())],
                    &[format!("kind = #vector.kind<{kind}>"), format!("reduction_dims = array<i64: {axis}>")],
                    Some(&rty),
                    l,
                );
                self.set(op.results[0], r);
            }
            OpKind::Dot { lhs, rhs, transpose_lhs, transpose_rhs } => {
                let rt = self.vt(op.results[0]);
                let zero = if rt.dtype.is_float() { Literal::Float(0.0) } else { Literal::Int(0) };
                let acc = self.splat(zero, &rt, l);
                let (a, b) = (self.name(*lhs), self.name(*rhs));
                let (at, bt, rty) = (self.ty(*lhs), self.ty(*rhs), value_type(&rt));
                let (lc, ln) = if *transpose_lhs { (0, 1) } else { (1, 0) };
                let (rc, rn) = if *transpose_rhs { (1, 0) } else { (0, 1) };
                let dims = format!("#tpu.dot_dimension_numbers<[{lc}], [{rc}], [{ln}], [{rn}], [0, {ln}, 1, {rn}], [], []>");
                let pretty_attrs = format!("{{dimension_numbers = {dims}, transpose_lhs_hint = false}}");
                let r = self.fresh();
                self.op(
                    Some(&r),
                    format!("tpu.matmul {a}, {b}, {acc} {pretty_attrs} : {at}, {bt}, {rty} -> {rty}"),
                    "tpu.matmul",
                    &[(a, at.clone()), (b, bt.clone()), (acc, rty.clone())],
                    &[format!("dimension_numbers = {dims}"), "transpose_lhs = false".into(), "transpose_rhs = false".into()],
                    Some(&rty),
                    l,
                );
                self.set(op.results[0], r);
            }
            OpKind::Iota { dim } => {
                let rt = self.vt(op.results[0]);
                let it = ValueType::new(DType::I32, rt.shape.clone());
                let ity = value_type(&it);
                let r = self.fresh();
                self.op(Some(&r), format!("tpu.iota {{dimensions = array<i32: {dim}>}} : {ity}"), "tpu.iota", &[], &[format!("dimensions = array<i32: {dim}>")], Some(&ity), l);
                let r = if rt.dtype == DType::I32 { r } else { self.convert("arith.sitofp", &r, &it, &rt, l) };
                self.set(op.results[0], r);
            }
            OpKind::Roll { x, shift, axis, stride } => {
                let t = self.vt(*x);
                if stride.is_some_and(|s| s.axis + 1 == t.shape.len()) {
                    // Measured with libtpu 0.0.52: "stride dimension is the minor most".
                    return Err(self.unsupported(l, "a strided roll whose stride runs along the last axis (lanes); Mosaic strides only over sublanes or leading axes"));
                }
                let n = t.shape.get(*axis).copied().unwrap_or(1).max(1) as i64;
                let amount = match self.func.constant_value(*shift) {
                    Some(Literal::Int(s)) => self.constant(&s.rem_euclid(n).to_string(), "i32", l),
                    // Measured with libtpu 0.0.52, every chip: "strided dynamic rotation along the
                    // two last dimensions is unsupported".
                    _ if stride.is_some() => {
                        return Err(self.unsupported(l, "a strided roll by a traced shift; Mosaic rotates with a stride only by a shift known when tracing (an i32, not a Scalar)"))
                    }
                    _ => {
                        let s = self.name(*shift);
                        self.euclidean_rem(&s, n, l)
                    }
                };
                let (src, ty) = (self.name(*x), value_type(&t));
                let mut attrs = vec![format!("dimension = {axis} : si32")];
                // Only the stride modulo the extent matters; Mosaic takes a 32-bit one.
                let strided = stride.map(|s| [format!("stride = {} : si32", i64::from(s.stride) % n), format!("stride_dimension = {} : si32", s.axis)]);
                attrs.extend(strided.iter().flatten().cloned());
                let pretty_attrs = strided.map(|s| format!(" {{{}}}", s.join(", "))).unwrap_or_default();
                let r = self.fresh();
                self.op(
                    Some(&r),
                    format!("tpu.dynamic_rotate {src} by {amount} dim {axis}{pretty_attrs} : {ty}, i32 -> {ty}"),
                    "tpu.dynamic_rotate",
                    &[(src, ty.clone()), (amount, "i32".into())],
                    &attrs,
                    Some(&ty),
                    l,
                );
                self.set(op.results[0], r);
            }
            OpKind::Slice { x, start } => {
                let (from, to) = (self.vt(*x), self.vt(op.results[0]));
                let (src, ft, tt) = (self.name(*x), value_type(&from), value_type(&to));
                let list = |v: &[usize]| format!("[{}]", v.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "));
                let attrs = [format!("offsets = {}", list(start)), format!("sizes = {}", list(&to.shape)), format!("strides = {}", list(&vec![1; to.shape.len()]))];
                let r = self.fresh();
                self.op(
                    Some(&r),
                    format!("vector.extract_strided_slice {src} {{{}}} : {ft} to {tt}", attrs.join(", ")),
                    "vector.extract_strided_slice",
                    &[(src, ft)],
                    &attrs,
                    Some(&tt),
                    l,
                );
                self.set(op.results[0], r);
            }
            OpKind::Concat { xs, axis } => {
                let operands: Vec<(String, String)> = xs.iter().map(|&x| (self.name(x), self.ty(x))).collect();
                let rt = self.ty(op.results[0]);
                let names: Vec<&str> = operands.iter().map(|(n, _)| n.as_str()).collect();
                let types: Vec<&str> = operands.iter().map(|(_, t)| t.as_str()).collect();
                let r = self.fresh();
                let pretty = format!("tpu.concatenate {} in {axis} : {} -> {rt}", names.join(", "), types.join(", "));
                self.op(Some(&r), pretty, "tpu.concatenate", &operands, &[format!("dimension = {axis} : i32")], Some(&rt), l);
                self.set(op.results[0], r);
            }
            OpKind::Transpose { x, perm } => {
                let (src, ft, tt) = (self.name(*x), self.ty(*x), self.ty(op.results[0]));
                let listed: Vec<String> = perm.iter().map(|p| p.to_string()).collect();
                let r = self.fresh();
                let attr = format!("permutation = {}", i64_array(perm.iter().copied()));
                self.op(Some(&r), format!("tpu.transpose {src}, [{}] : {ft} -> {tt}", listed.join(", ")), "tpu.transpose", &[(src, ft)], &[attr], Some(&tt), l);
                self.set(op.results[0], r);
            }
            OpKind::Bitcast { x } => {
                let (from, to) = (self.vt(*x), self.vt(op.results[0]));
                let r = if from.dtype.size_bytes() == to.dtype.size_bytes() {
                    self.convert("arith.bitcast", &self.name(*x), &from, &to, l)
                } else {
                    let (src, ft, tt) = (self.name(*x), value_type(&from), value_type(&to));
                    let r = self.fresh();
                    self.op(Some(&r), format!("tpu.bitcast {src} : {ft} -> {tt}"), "tpu.bitcast", &[(src, ft.clone())], &[], Some(&tt), l);
                    r
                };
                self.set(op.results[0], r);
            }
            OpKind::AssumeMultiple { x, multiple } => {
                let (src, ty) = (self.name(*x), self.ty(*x));
                let r = self.fresh();
                self.op(
                    Some(&r),
                    format!("tpu.assume_multiple {src}, {multiple} : {ty}"),
                    "tpu.assume_multiple",
                    &[(src, ty.clone())],
                    &[format!("multiple = {multiple} : i32")],
                    Some(&ty),
                    l,
                );
                self.set(op.results[0], r);
            }
            OpKind::DmaStart(c) => {
                let (src, dst, sem) = self.dma_operands(c, l);
                let operands = [src, dst, sem];
                // The readable form is parsed with libtpu's current dialect, whose enqueue_dma
                // has one more optional operand (subcore_id) than serialization version 11.
                let pretty = generic("tpu.enqueue_dma", &operands, " <{operandSegmentSizes = array<i32: 1, 0, 1, 1, 0, 0, 0>, priority = 0 : i32}>", None);
                self.op(None, pretty, "tpu.enqueue_dma", &operands, &["operandSegmentSizes = array<i32: 1, 0, 1, 1, 0, 0>".into(), "priority = 0 : i32".into()], None, l);
            }
            OpKind::DmaWait(c) => {
                let (src, dst, sem) = self.dma_operands(c, l);
                let operands = [sem, src, dst];
                let segments = "operandSegmentSizes = array<i32: 1, 1, 1, 0, 0>";
                let pretty = generic("tpu.wait_dma2", &operands, &format!(" <{{{segments}}}>"), None);
                self.op(None, pretty, "tpu.wait_dma2", &operands, &[segments.into()], None, l);
            }
            OpKind::PrngSeed { seeds } => {
                let operands: Vec<(String, String)> = seeds.iter().map(|&s| (self.name(s), "i32".to_string())).collect();
                self.op(None, generic("tpu.prng_set_seed_32", &operands, "", None), "tpu.prng_set_seed_32", &operands, &[], None, l);
            }
            OpKind::PrngRandomBits => {
                let ty = self.ty(op.results[0]);
                let r = self.fresh();
                self.op(Some(&r), generic("tpu.prng_random_bits", &[], "", Some(&ty)), "tpu.prng_random_bits", &[], &[], Some(&ty), l);
                self.set(op.results[0], r);
            }
            OpKind::If { cond, then_region, else_region } => self.emit_if(op, *cond, then_region, else_region)?,
            OpKind::For { lo, hi, inits, body } => self.emit_for(op, *lo, *hi, inits, body)?,
            OpKind::While { inits, cond, body } => self.emit_while(op, inits, cond, body)?,
            OpKind::Yield { .. } => {}
        }
        Ok(())
    }

    /// The source, destination and semaphore of a copy as memref views (name, type).
    fn dma_operands(&mut self, c: &DmaCopy, l: Loc) -> ((String, String), (String, String), (String, String)) {
        let src = self.memref_view(c.src, &c.src_index, l);
        let dst = self.memref_view(c.dst, &c.dst_index, l);
        let sem = self.memref_view(c.sem, &c.sem_index, l);
        (src, dst, sem)
    }

    /// The region `index` selects in ref `r`, as a memref (`tpu.memref_slice`, then
    /// `tpu.memref_squeeze` for axes indexed with one position), by name and type.
    fn memref_view(&mut self, r: ValueId, index: &[Index], l: Loc) -> (String, String) {
        let memref = self.refs.get(&r).cloned().expect("refs are function arguments");
        let (src, ty) = (self.name(r), memref_type(&memref));
        if index.iter().all(|ix| matches!(ix, Index::Full)) {
            return (src, ty);
        }
        let squeezed = self.squeezed.get(&r).cloned().unwrap_or_default();
        let access = memref_access(&memref.shape, &squeezed, index);
        let starts: Vec<String> = access
            .iter()
            .map(|(start, _)| match start {
                Offset::Static(s) => self.constant(&s.to_string(), "i32", l),
                Offset::Dynamic(v) => self.name(*v),
            })
            .collect();
        let sliced = RefType { dtype: memref.dtype, shape: access.iter().map(|&(_, len)| len).collect(), space: memref.space };
        let sliced_ty = memref_type(&sliced);
        let mut operands = vec![(src.clone(), ty.clone())];
        operands.extend(starts.iter().map(|s| (s.clone(), "i32".to_string())));
        let segments = format!("operandSegmentSizes = array<i32: 1, {}, 0>", starts.len());
        let r_slice = self.fresh();
        let pretty = generic("tpu.memref_slice", &operands, &format!(" <{{{segments}}}>"), Some(&sliced_ty));
        self.op(Some(&r_slice), pretty, "tpu.memref_slice", &operands, std::slice::from_ref(&segments), Some(&sliced_ty), l);
        // Axes the index points at, and axes the kernel never saw, are squeezed away.
        let kept: Vec<usize> = {
            let mut items = index.iter();
            squeezed
                .iter()
                .zip(&sliced.shape)
                .filter_map(|(&sq, &len)| if sq { None } else { Some((items.next(), len)) })
                .filter(|(ix, _)| !matches!(ix, Some(Index::Point(_))))
                .map(|(_, len)| len)
                .collect()
        };
        if kept.len() == sliced.shape.len() {
            return (r_slice, sliced_ty);
        }
        let squeezed_ty = memref_type(&RefType { dtype: memref.dtype, shape: kept, space: memref.space });
        let r = self.fresh();
        let operands = [(r_slice, sliced_ty)];
        self.op(Some(&r), generic("tpu.memref_squeeze", &operands, "", Some(&squeezed_ty)), "tpu.memref_squeeze", &operands, &[], Some(&squeezed_ty), l);
        (r, squeezed_ty)
    }

    /// `s mod n` in `0..n` for an i32 scalar `s`, of either sign.
    fn euclidean_rem(&mut self, s: &str, n: i64, l: Loc) -> String {
        let nc = self.constant(&n.to_string(), "i32", l);
        let r = self.simple("arith.remsi", &[s.to_string(), nc.clone()], "i32", &[], l);
        let shifted = self.simple("arith.addi", &[r, nc.clone()], "i32", &Self::overflow(), l);
        self.simple("arith.remsi", &[shifted, nc], "i32", &[], l)
    }

    /// `arith.select` of values of type `t` by a bool of `t`'s shape.
    fn select_of(&mut self, c: &str, a: &str, b: &str, t: &ValueType, l: Loc) -> String {
        let ct = value_type(&ValueType::new(DType::Bool, t.shape.clone()));
        let ty = value_type(t);
        let r = self.fresh();
        let pretty_ty = if t.shape.is_empty() { ty.clone() } else { format!("{ct}, {ty}") };
        self.op(
            Some(&r),
            format!("arith.select {c}, {a}, {b} : {pretty_ty}"),
            "arith.select",
            &[(c.into(), ct), (a.into(), ty.clone()), (b.into(), ty.clone())],
            &[],
            Some(&ty),
            l,
        );
        r
    }

    fn convert(&mut self, name: &str, x: &str, from: &ValueType, to: &ValueType, l: Loc) -> String {
        let (ft, tt) = (value_type(from), value_type(to));
        let r = self.fresh();
        self.op(Some(&r), format!("{name} {x} : {ft} to {tt}"), name, &[(x.into(), ft)], &[], Some(&tt), l);
        r
    }

    fn simple(&mut self, name: &str, operands: &[String], ty: &str, attrs: &[String], l: Loc) -> String {
        let r = self.fresh();
        let ops: Vec<(String, String)> = operands.iter().map(|o| (o.clone(), ty.to_string())).collect();
        self.op(Some(&r), format!("{name} {} : {ty}", operands.join(", ")), name, &ops, attrs, Some(ty), l);
        r
    }

    fn fastmath() -> Vec<String> {
        vec!["fastmath = #arith.fastmath<none>".into()]
    }

    fn overflow() -> Vec<String> {
        vec!["overflowFlags = #arith.overflow<none>".into()]
    }

    /// The attributes an `arith`/`math` op carries: fast-math flags on floats, overflow flags
    /// on the integer ops that can wrap.
    fn attrs_of(name: &str, dtype: DType) -> Vec<String> {
        match name {
            "arith.addi" | "arith.subi" | "arith.muli" | "arith.shli" => Self::overflow(),
            _ if dtype.is_float() => Self::fastmath(),
            _ => Vec::new(),
        }
    }

    fn unary(&mut self, u: UnaryOp, x: ValueId, l: Loc) -> Result<String> {
        let (src, t) = (self.name(x), self.vt(x));
        self.unary_of(u, &src, &t, l)
    }

    fn unary_of(&mut self, u: UnaryOp, src: &str, t: &ValueType, l: Loc) -> Result<String> {
        let Some(forms) = u.def().lowerings(t.dtype) else { return Err(self.unsupported(l, format!("`{}` of {}", u.name(), t.dtype))) };
        if forms.mosaic_widened {
            return self.widened(&[src], t, l, |e, xs, wide| e.unary_of(u, &xs[0], wide, l));
        }
        match forms.mosaic {
            Lowering::Op(name) => Ok(self.simple(name, &[src.to_string()], &value_type(t), &Self::attrs_of(name, t.dtype), l)),
            Lowering::Composite(build) => composite(self, t, l, |c| build(c, src)),
        }
    }

    fn binary(&mut self, b: BinaryOp, lhs: ValueId, rhs: ValueId, l: Loc) -> Result<String> {
        let (a, c, t) = (self.name(lhs), self.name(rhs), self.vt(lhs));
        self.binary_of(b, &a, &c, &t, l)
    }

    fn binary_of(&mut self, b: BinaryOp, a: &str, c: &str, t: &ValueType, l: Loc) -> Result<String> {
        let Some(forms) = b.def().lowerings(t.dtype) else { return Err(self.unsupported(l, format!("`{}` of {}", b.name(), t.dtype))) };
        if forms.mosaic_widened {
            return self.widened(&[a, c], t, l, |e, xs, wide| e.binary_of(b, &xs[0], &xs[1], wide, l));
        }
        match forms.mosaic {
            Lowering::Op(name) => Ok(self.simple(name, &[a.to_string(), c.to_string()], &value_type(t), &Self::attrs_of(name, t.dtype), l)),
            Lowering::Composite(build) => composite(self, t, l, |comp| build(comp, a, c)),
        }
    }

    fn compare(&mut self, c: CmpOp, lhs: ValueId, rhs: ValueId, l: Loc) -> Result<String> {
        let (a, b, t) = (self.name(lhs), self.name(rhs), self.vt(lhs));
        self.compare_of(c, &a, &b, &t, l)
    }

    fn compare_of(&mut self, c: CmpOp, a: &str, b: &str, t: &ValueType, l: Loc) -> Result<String> {
        let ty = value_type(t);
        let out = value_type(&ValueType::new(DType::Bool, t.shape.clone()));
        let (pred, code) = match c.mosaic(t.dtype) {
            Predicate::Is(pred, code) => (pred, code),
            Predicate::Composite(build) => return composite(self, t, l, |comp| build(comp, a, b)),
        };
        let name = if t.dtype.is_float() { "arith.cmpf" } else { "arith.cmpi" };
        let mut attrs = Self::attrs_of(name, t.dtype);
        attrs.push(format!("predicate = {code} : i64"));
        let r = self.fresh();
        self.op(Some(&r), format!("{name} {pred}, {a}, {b} : {ty}"), name, &[(a.to_string(), ty.clone()), (b.to_string(), ty.clone())], &attrs, Some(&out), l);
        Ok(r)
    }

    /// `op` computed on `xs` widened to the 32-bit type of their class, narrowed back.
    fn widened(&mut self, xs: &[&str], t: &ValueType, l: Loc, op: impl FnOnce(&mut Self, &[String], &ValueType) -> Result<String>) -> Result<String> {
        let float = t.dtype.is_float();
        let wide = ValueType::new(if float { DType::F32 } else { DType::I32 }, t.shape.clone());
        let (ext, trunc) = if float { ("arith.extf", "arith.truncf") } else { ("arith.extsi", "arith.trunci") };
        let wide_xs: Vec<String> = xs.iter().map(|x| self.convert(ext, x, t, &wide, l)).collect();
        let r = op(self, &wide_xs, &wide)?;
        Ok(self.convert(trunc, &r, &wide, t, l))
    }

    fn cast(&mut self, x: ValueId, to: ValueType, l: Loc) -> Result<String> {
        let from = self.vt(x);
        let src = self.name(x);
        let (f, t) = (from.dtype, to.dtype);
        let name = match () {
            _ if f.is_float() && t.is_float() => {
                if f.size_bytes() < t.size_bytes() {
                    "arith.extf"
                } else {
                    "arith.truncf"
                }
            }
            _ if f.is_int() && t.is_float() => "arith.sitofp",
            _ if f.is_float() && t.is_int() => "arith.fptosi",
            _ if f.is_int() && t.is_int() => {
                if f.size_bytes() < t.size_bytes() {
                    "arith.extsi"
                } else {
                    "arith.trunci"
                }
            }
            _ if f == DType::Bool && t.is_int() => "arith.extui",
            _ if f == DType::Bool && t.is_float() => "arith.uitofp",
            _ if t == DType::Bool => {
                let zero = if f.is_float() { Literal::Float(0.0) } else { Literal::Int(0) };
                let z = self.splat(zero, &from, l);
                return self.compare_of(CmpOp::Ne, &src, &z, &from, l);
            }
            _ => return Err(self.unsupported(l, format!("cast from {f} to {t}"))),
        };
        Ok(self.convert(name, &src, &from, &to, l))
    }

    /// Result names: `%r` for one result, `%r#i` for several.
    fn results_of(&mut self, op: &Op) -> (String, Vec<String>) {
        let r = self.fresh();
        let names = match op.results.len() {
            0 => Vec::new(),
            1 => vec![r.clone()],
            n => (0..n).map(|i| format!("{r}#{i}")).collect(),
        };
        let lhs = match op.results.len() {
            0 => String::new(),
            1 => format!("{r} = "),
            n => format!("{r}:{n} = "),
        };
        (lhs, names)
    }

    fn yield_line(&mut self, values: &[String], types: &[String], l: Loc) {
        let text = match self.form {
            Form::Pretty if values.is_empty() => "scf.yield".to_string(),
            Form::Pretty => format!("scf.yield {} : {}", values.join(", "), types.join(", ")),
            Form::Stable => format!("\"stable_mosaic.scf.yield\"({}) : ({}) -> ()", values.join(", "), types.join(", ")),
        };
        self.line(&text, l);
    }

    /// A region's ops and its yield, one level deeper.
    fn nested(&mut self, region: &'a Region, types: &[String], l: Loc) -> Result<()> {
        self.depth += 1;
        let y = self.region_ops(region)?;
        self.yield_line(&y, types, l);
        self.depth -= 1;
        Ok(())
    }

    /// The closing line of an `scf.if`/`scf.for`: a brace, or in the stable form the op's type.
    fn close_region_op(&mut self, pad: &str, operand_types: &[String], result_types: &[String], l: Loc) {
        match self.form {
            Form::Pretty => {
                let _ = writeln!(self.out, "{pad}}}{}", loc(l));
            }
            Form::Stable => {
                let rt = if result_types.len() == 1 { result_types[0].clone() } else { format!("({})", result_types.join(", ")) };
                let _ = writeln!(self.out, "{pad}}}) : ({}) -> {rt}{}", operand_types.join(", "), loc(l));
            }
        }
    }

    fn emit_if(&mut self, op: &'a Op, cond: ValueId, then_region: &'a Region, else_region: &'a Region) -> Result<()> {
        let l = op.loc;
        let types: Vec<String> = op.results.iter().map(|&r| self.ty(r)).collect();
        let c = self.name(cond);
        let (lhs, names) = self.results_of(op);
        let pad = "  ".repeat(self.depth);
        let result_types = if types.is_empty() { String::new() } else { format!(" -> ({})", types.join(", ")) };
        match self.form {
            Form::Pretty => {
                let _ = writeln!(self.out, "{pad}{lhs}scf.if {c}{result_types} {{");
            }
            Form::Stable => {
                let _ = writeln!(self.out, "{pad}{lhs}\"stable_mosaic.scf.if\"({c}) ({{");
            }
        }
        self.nested(then_region, &types, l)?;
        let _ = writeln!(self.out, "{pad}}}{} {{", if self.form == Form::Pretty { " else" } else { "," });
        self.nested(else_region, &types, l)?;
        self.close_region_op(&pad, &["i1".to_string()], &types, l);
        for (r, n) in op.results.iter().zip(names) {
            self.set(*r, n);
        }
        Ok(())
    }

    fn emit_for(&mut self, op: &'a Op, lo: ValueId, hi: ValueId, inits: &[ValueId], body: &'a Region) -> Result<()> {
        let l = op.loc;
        let types: Vec<String> = inits.iter().map(|&i| self.ty(i)).collect();
        let step = self.constant("1", "i32", l);
        let (lo, hi) = (self.name(lo), self.name(hi));
        let init_names: Vec<String> = inits.iter().map(|&i| self.name(i)).collect();
        let (lhs, names) = self.results_of(op);
        let iv = self.fresh();
        let args: Vec<String> = (0..inits.len()).map(|_| self.fresh()).collect();
        self.set(body.args[0], iv.clone());
        for (a, n) in body.args[1..].iter().zip(&args) {
            self.set(*a, n.clone());
        }
        let pad = "  ".repeat(self.depth);
        match self.form {
            Form::Pretty => {
                let iter = if inits.is_empty() {
                    String::new()
                } else {
                    let pairs: Vec<String> = args.iter().zip(&init_names).map(|(a, i)| format!("{a} = {i}")).collect();
                    format!(" iter_args({}) -> ({})", pairs.join(", "), types.join(", "))
                };
                let _ = writeln!(self.out, "{pad}{lhs}scf.for {iv} = {lo} to {hi} step {step}{iter} : i32 {{");
            }
            Form::Stable => {
                let _ = writeln!(self.out, "{pad}{lhs}\"stable_mosaic.scf.for\"({lo}, {hi}, {step}{}) ({{", init_names.iter().map(|i| format!(", {i}")).collect::<String>());
                let block_args: Vec<String> = std::iter::once(format!("{iv}: i32")).chain(args.iter().zip(&types).map(|(a, t)| format!("{a}: {t}"))).collect();
                let _ = writeln!(self.out, "{pad}^bb0({}):", block_args.join(", "));
            }
        }
        self.nested(body, &types, l)?;
        let operand_types: Vec<String> = ["i32".to_string(), "i32".into(), "i32".into()].into_iter().chain(types.iter().cloned()).collect();
        self.close_region_op(&pad, &operand_types, &types, l);
        for (r, n) in op.results.iter().zip(names) {
            self.set(*r, n);
        }
        Ok(())
    }

    /// `scf.while`, in the generic syntax in both forms (`stable_mosaic.` prefixed in the
    /// stable one): the condition region passes the carried values on to the body unchanged.
    fn emit_while(&mut self, op: &'a Op, inits: &[ValueId], cond: &'a Region, body: &'a Region) -> Result<()> {
        let l = op.loc;
        let prefix = if self.form == Form::Stable { "stable_mosaic." } else { "" };
        let types: Vec<String> = inits.iter().map(|&i| self.ty(i)).collect();
        let init_names: Vec<String> = inits.iter().map(|&i| self.name(i)).collect();
        let (lhs, names) = self.results_of(op);
        let pad = "  ".repeat(self.depth);
        let _ = writeln!(self.out, "{pad}{lhs}\"{prefix}scf.while\"({}) ({{", init_names.join(", "));
        for (i, region) in [cond, body].into_iter().enumerate() {
            let args: Vec<String> = region.args.iter().map(|_| self.fresh()).collect();
            for (a, n) in region.args.iter().zip(&args) {
                self.set(*a, n.clone());
            }
            let block_args: Vec<String> = args.iter().zip(&types).map(|(a, t)| format!("{a}: {t}")).collect();
            let _ = writeln!(self.out, "{pad}^bb0({}):", block_args.join(", "));
            self.depth += 1;
            let yielded = self.region_ops(region)?;
            let text = if i == 0 {
                let c = yielded.first().cloned().unwrap_or_default();
                let operand_types: Vec<String> = std::iter::once("i1".to_string()).chain(types.iter().cloned()).collect();
                format!("\"{prefix}scf.condition\"({}) : ({}) -> ()", std::iter::once(c).chain(args.iter().cloned()).collect::<Vec<_>>().join(", "), operand_types.join(", "))
            } else {
                format!("\"{prefix}scf.yield\"({}) : ({}) -> ()", yielded.join(", "), types.join(", "))
            };
            self.line(&text, l);
            self.depth -= 1;
            if i == 0 {
                let _ = writeln!(self.out, "{pad}}}, {{");
            }
        }
        let rt = format!("({})", types.join(", "));
        let _ = writeln!(self.out, "{pad}}}) : ({}) -> {rt}{}", types.join(", "), loc(l));
        for (r, n) in op.results.iter().zip(names) {
            self.set(*r, n);
        }
        Ok(())
    }

    /// The whole function: signature, attributes, the emitted body and the return.
    fn func_text(&self, name: &str, params: &[(String, String)], result_types: &[String], attrs: &[String], results: &[String], l: Loc) -> String {
        let mut s = String::new();
        let body = &self.out;
        match self.form {
            Form::Pretty => {
                let ps: Vec<String> = params.iter().map(|(n, t)| format!("{n}: {t}")).collect();
                let rt = if result_types.is_empty() { String::new() } else { format!(" -> ({})", result_types.join(", ")) };
                let at = if attrs.is_empty() { String::new() } else { format!(" attributes {{{}}}", attrs.join(", ")) };
                let _ = writeln!(s, "  func.func @{name}({}){rt}{at} {{", ps.join(", "));
                s.push_str(body);
                if results.is_empty() {
                    let _ = writeln!(s, "    return{}", loc(l));
                } else {
                    let _ = writeln!(s, "    return {} : {}{}", results.join(", "), result_types.join(", "), loc(l));
                }
                let _ = writeln!(s, "  }}{}", loc(l));
            }
            Form::Stable => {
                let ps: Vec<String> = params.iter().map(|(n, t)| format!("{n}: {t}")).collect();
                let _ = writeln!(s, "  \"stable_mosaic.func.func\"() ({{");
                let _ = writeln!(s, "  ^bb0({}):", ps.join(", "));
                s.push_str(body);
                let _ = writeln!(s, "    \"stable_mosaic.func.return\"({}) : ({}) -> (){}", results.join(", "), result_types.join(", "), loc(l));
                let param_types: Vec<&str> = params.iter().map(|(_, t)| t.as_str()).collect();
                let fty = format!("function_type = ({}) -> ({})", param_types.join(", "), result_types.join(", "));
                let mut all: Vec<String> = attrs.to_vec();
                all.push(fty);
                all.push(format!("sym_name = \"{name}\""));
                all.sort();
                let _ = writeln!(s, "  }}) {{{}}} : () -> (){}", all.join(", "), loc(l));
            }
        }
        s
    }
}
