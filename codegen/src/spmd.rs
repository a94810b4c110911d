//! SPMD programs for TPU slices: kernels traced on one shard's operands, run on every device of
//! a mesh inside a manual-sharding region (GSPMD's `Sharding` and `SPMDFullToShardShape`
//! custom calls), which XLA's partitioner leaves as written — what JAX's `shard_map` emits
//! around a Pallas call. Collectives (`all_reduce`, `collective_permute`) name devices by
//! their partition ids: a mesh's devices are `0..n` in row-major order of its axes.

use std::fmt::{self, Write};
use std::str::FromStr;

use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::TracedCall;

use crate::error::{Error, Result};
use crate::mlir::{symbol, tensor_type};
use crate::mosaic::Form;
use crate::portable;
use crate::stablehlo::{custom_call_op, result_binding, result_names, results_signature};

/// The most devices a mesh may have: four times the largest TPU pod (9,216 chips) rounded up,
/// so that a typo (`x=20000000`) is an error, not a module of millions of device ids.
pub const MAX_DEVICES: u64 = 1 << 16;

fn sharding_error(message: impl Into<String>) -> Error {
    Error::Sharding(message.into())
}

/// A logical mesh of devices: named axes and their sizes (JAX's `Mesh`, PyTorch's
/// `DeviceMesh`), over partition ids `0..devices()` in row-major order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mesh {
    axes: Vec<(String, u64)>,
}

impl Mesh {
    /// A mesh of `axes` (name, size), outermost first.
    pub fn new<S: Into<String>>(axes: impl IntoIterator<Item = (S, u64)>) -> Result<Mesh> {
        let axes: Vec<(String, u64)> = axes.into_iter().map(|(n, s)| (n.into(), s)).collect();
        if axes.is_empty() {
            return Err(sharding_error("a mesh needs at least one axis, e.g. x=4"));
        }
        let mut devices = 1u64;
        for (i, (name, size)) in axes.iter().enumerate() {
            if !is_axis_name(name) {
                return Err(sharding_error(format!("mesh axis name `{name}` must be letters, digits and `_`, start with a letter, and not be `sum`")));
            }
            if axes[..i].iter().any(|(n, _)| n == name) {
                return Err(sharding_error(format!("mesh axis `{name}` is named twice")));
            }
            if *size == 0 {
                return Err(sharding_error(format!("mesh axis `{name}` has size 0; every axis needs at least one device")));
            }
            devices = devices
                .checked_mul(*size)
                .filter(|&d| d <= MAX_DEVICES)
                .ok_or_else(|| sharding_error(format!("a mesh of {} has more than {MAX_DEVICES} devices", describe_axes(&axes))))?;
        }
        Ok(Mesh { axes })
    }

    /// Devices in the mesh: the product of its axis sizes.
    pub fn devices(&self) -> u64 {
        self.axes.iter().map(|(_, s)| s).product()
    }

    /// The size of `axis`, or an error naming the mesh's axes.
    pub fn size(&self, axis: &str) -> Result<u64> {
        self.position(axis).map(|i| self.axes[i].1)
    }

    fn position(&self, axis: &str) -> Result<usize> {
        self.axes.iter().position(|(n, _)| n == axis).ok_or_else(|| sharding_error(format!("no mesh axis `{axis}`; the mesh has {}", describe_axes(&self.axes))))
    }

    /// Partition ids between one step along axis `i` (row-major).
    fn stride(&self, i: usize) -> u64 {
        self.axes[i + 1..].iter().map(|(_, s)| s).product()
    }

    /// Device `device`'s coordinate along axis `i`.
    fn coordinate(&self, device: u64, i: usize) -> u64 {
        (device / self.stride(i)) % self.axes[i].1
    }

    /// The positions of `axes`, each named once.
    fn positions(&self, axes: &[String]) -> Result<Vec<usize>> {
        let mut positions = Vec::new();
        for axis in axes {
            let p = self.position(axis)?;
            if positions.contains(&p) {
                return Err(sharding_error(format!("axis `{axis}` is named twice in {}", axes.join("+"))));
            }
            positions.push(p);
        }
        Ok(positions)
    }

    /// The partition ids of the mesh's devices enumerated over `order` (axis positions, each
    /// once, all of them), the first varying slowest.
    fn devices_in(&self, order: &[usize]) -> Vec<u64> {
        let mut ids = vec![0u64];
        for &axis in order {
            let stride = self.stride(axis);
            ids = ids.iter().flat_map(|&base| (0..self.axes[axis].1).map(move |c| base + c * stride)).collect();
        }
        ids
    }

    /// Groups of partition ids that differ only along `axes`: the replica groups of a
    /// collective over those axes, as a `dense<…> : tensor<GxNxi64>` attribute.
    fn groups_over(&self, axes: &[usize]) -> String {
        let others: Vec<usize> = (0..self.axes.len()).filter(|a| !axes.contains(a)).collect();
        let members: u64 = axes.iter().map(|&a| self.axes[a].1).product();
        let order: Vec<usize> = others.iter().chain(axes).copied().collect();
        let ids = self.devices_in(&order);
        let groups: Vec<String> = ids.chunks(members as usize).map(|g| format!("[{}]", join(g))).collect();
        format!("dense<[{}]> : tensor<{}x{}xi64>", groups.join(", "), groups.len(), members)
    }
}

fn is_axis_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && name != "sum"
}

fn describe_axes(axes: &[(String, u64)]) -> String {
    axes.iter().map(|(n, s)| format!("{n}={s}")).collect::<Vec<_>>().join(",")
}

fn join<T: ToString>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

impl fmt::Display for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe_axes(&self.axes))
    }
}

/// `x=2,y=4`.
impl FromStr for Mesh {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mesh> {
        let axes = s
            .split(',')
            .map(|axis| {
                let (name, size) = axis.split_once('=').ok_or_else(|| sharding_error(format!("mesh axis `{axis}` needs a size: name=size, e.g. x=4")))?;
                let size = size.trim().parse::<u64>().map_err(|_| sharding_error(format!("mesh axis `{name}`: `{size}` is not a device count")))?;
                Ok((name.trim().to_string(), size))
            })
            .collect::<Result<Vec<_>>>()?;
        Mesh::new(axes)
    }
}

/// How one array is laid over a mesh (JAX's `PartitionSpec`): per dim, the mesh axes it is
/// split over, outermost first (none: whole on every device); for an output, also the axes
/// over which each device holds a partial sum, which the program adds up (an all-reduce).
/// Axes an array does not name hold copies of it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PartitionSpec {
    pub dims: Vec<Vec<String>>,
    pub summed: Vec<String>,
}

impl PartitionSpec {
    /// Dims split over the axes given (`None`: whole).
    pub fn new<'a>(dims: impl IntoIterator<Item = Option<&'a str>>) -> PartitionSpec {
        PartitionSpec { dims: dims.into_iter().map(|d| d.map(|a| vec![a.to_string()]).unwrap_or_default()).collect(), summed: Vec::new() }
    }

    /// The same array held whole by every device.
    pub fn replicated(rank: usize) -> PartitionSpec {
        PartitionSpec { dims: vec![Vec::new(); rank], summed: Vec::new() }
    }

    /// The array's shape on one device, given its whole `shape`; an error unless each split
    /// dim divides evenly.
    pub fn shard_shape(&self, mesh: &Mesh, shape: &[usize]) -> Result<Vec<usize>> {
        self.check(mesh, shape.len(), "the array", true)?;
        shape
            .iter()
            .zip(&self.dims)
            .enumerate()
            .map(|(d, (&n, axes))| {
                let parts = self.parts(mesh, axes)?;
                if n as u64 % parts != 0 {
                    return Err(sharding_error(format!(
                        "dim {d} of {shape:?} is {n}, which {} devices (axes {}) cannot split evenly; make it a multiple of {parts}",
                        parts,
                        axes.join("+")
                    )));
                }
                Ok(n / parts as usize)
            })
            .collect()
    }

    /// The whole array's shape, given one device's `shard`.
    pub fn global_shape(&self, mesh: &Mesh, shard: &[usize]) -> Result<Vec<usize>> {
        self.check(mesh, shard.len(), "the array", true)?;
        shard
            .iter()
            .zip(&self.dims)
            .map(|(&n, axes)| {
                let parts = usize::try_from(self.parts(mesh, axes)?).unwrap_or(usize::MAX);
                n.checked_mul(parts).filter(|&g| i64::try_from(g).is_ok()).ok_or_else(|| sharding_error(format!("a shard dim of {n} over {parts} devices overflows an array dim")))
            })
            .collect()
    }

    /// Where device `device`'s shard (of shape `shard`) starts in the whole array: per dim,
    /// the shard's index along its axes (the first outermost) times its length.
    pub fn shard_offsets(&self, mesh: &Mesh, device: u64, shard: &[usize]) -> Result<Vec<usize>> {
        self.check(mesh, shard.len(), "the array", true)?;
        if device >= mesh.devices() {
            return Err(sharding_error(format!("no device {device} in a mesh of {}", mesh.devices())));
        }
        self.dims
            .iter()
            .zip(shard)
            .map(|(axes, &len)| {
                let mut index = 0u64;
                for axis in axes {
                    let p = mesh.position(axis)?;
                    index = index * mesh.axes[p].1 + mesh.coordinate(device, p);
                }
                Ok(index as usize * len)
            })
            .collect()
    }

    fn parts(&self, mesh: &Mesh, axes: &[String]) -> Result<u64> {
        axes.iter().map(|a| mesh.size(a)).product()
    }

    /// Checks the spec against `mesh` and an array of `rank` (`what`, for messages).
    fn check(&self, mesh: &Mesh, rank: usize, what: &str, output: bool) -> Result<()> {
        if self.dims.len() != rank {
            return Err(sharding_error(format!("{what} has {rank} dims but its partition spec `{self}` gives {}", self.dims.len())));
        }
        if !output && !self.summed.is_empty() {
            return Err(sharding_error(format!("{what} is an input; only an output can be a partial sum (`{self}`)")));
        }
        let named: Vec<&String> = self.dims.iter().flatten().chain(&self.summed).collect();
        for (i, axis) in named.iter().enumerate() {
            mesh.position(axis)?;
            if named[..i].contains(axis) {
                return Err(sharding_error(format!("{what}'s partition spec `{self}` names axis `{axis}` twice")));
            }
        }
        Ok(())
    }

    /// GSPMD's sharding of the whole array (after any sum): its tile assignment over `mesh`.
    fn hlo_sharding(&self, mesh: &Mesh) -> Result<String> {
        let mut order = Vec::new();
        let mut tiles = Vec::new();
        for axes in &self.dims {
            let positions = axes.iter().map(|a| mesh.position(a)).collect::<Result<Vec<_>>>()?;
            tiles.push(positions.iter().map(|&p| mesh.axes[p].1).product::<u64>());
            order.extend(positions);
        }
        if order.is_empty() {
            return Ok("{replicated}".into());
        }
        let copies: Vec<usize> = (0..mesh.axes.len()).filter(|a| !order.contains(a)).collect();
        let replicate = !copies.is_empty();
        if replicate {
            tiles.push(copies.iter().map(|&p| mesh.axes[p].1).product());
            order.extend(copies);
        }
        let suffix = if replicate { " last_tile_dim_replicate" } else { "" };
        Ok(format!(
            "{{devices=[{}]{}{suffix}}}",
            tiles.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
            mesh.devices_in(&order).iter().map(u64::to_string).collect::<Vec<_>>().join(",")
        ))
    }
}

/// `x,_` (dim 0 split over x, dim 1 whole); `x+y,_` (split over x then y); a last entry
/// `sum=y` (or `sum=x+y`) marks an output's partial sums; `` (nothing) is a scalar's.
impl FromStr for PartitionSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<PartitionSpec> {
        let mut spec = PartitionSpec::default();
        if s.trim().is_empty() {
            return Ok(spec);
        }
        for entry in s.split(',').map(str::trim) {
            if let Some(axes) = entry.strip_prefix("sum=") {
                spec.summed.extend(axes.split('+').map(|a| a.trim().to_string()));
            } else if !spec.summed.is_empty() {
                return Err(sharding_error(format!("partition spec `{s}`: `sum=` comes after every dim")));
            } else if entry == "_" || entry.is_empty() {
                spec.dims.push(Vec::new());
            } else {
                spec.dims.push(entry.split('+').map(|a| a.trim().to_string()).collect());
            }
        }
        if let Some(bad) = spec.dims.iter().flatten().chain(&spec.summed).find(|a| !is_axis_name(a)) {
            return Err(sharding_error(format!("partition spec `{s}`: `{bad}` is not an axis name; write a dim as `_` (whole), `x` or `x+y`, and partial sums as `sum=x`")));
        }
        Ok(spec)
    }
}

impl fmt::Display for PartitionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut entries: Vec<String> = self.dims.iter().map(|axes| if axes.is_empty() { "_".into() } else { axes.join("+") }).collect();
        if !self.summed.is_empty() {
            entries.push(format!("sum={}", self.summed.join("+")));
        }
        f.write_str(&entries.join(","))
    }
}

/// A StableHLO SPMD program under construction: `main`'s parameters enter the manual region
/// as shards, the body works on shards (kernels, collectives, elementwise StableHLO), and the
/// results leave it as whole arrays.
pub struct SpmdProgram<'m> {
    mesh: &'m Mesh,
    params: Vec<String>,
    body: Vec<String>,
    next_value: usize,
    next_channel: usize,
    /// `Some`: kernels run in their portable form (for PJRT CPU), each a function of the
    /// module, kept here once per distinct kernel as (its body, its function text).
    portable: Option<Vec<(String, String)>>,
}

impl<'m> SpmdProgram<'m> {
    /// A program whose kernels run on TPUs (`tpu_custom_call`).
    pub fn new(mesh: &'m Mesh) -> SpmdProgram<'m> {
        SpmdProgram { mesh, params: Vec::new(), body: Vec::new(), next_value: 0, next_channel: 1, portable: None }
    }

    /// A program whose kernels run in their portable form (a PJRT CPU client with a device
    /// per partition runs it).
    pub fn portable(mesh: &'m Mesh) -> SpmdProgram<'m> {
        SpmdProgram { portable: Some(Vec::new()), ..SpmdProgram::new(mesh) }
    }

    fn fresh(&mut self) -> String {
        self.next_value += 1;
        format!("%v{}", self.next_value)
    }

    /// Appends `op` (StableHLO text with `{}` where its result's name goes) and returns that name.
    pub fn op(&mut self, op: impl FnOnce(&str) -> String) -> String {
        let name = self.fresh();
        self.body.push(op(&name));
        name
    }

    /// A parameter of the whole array `global` laid out by `spec`: its shard's SSA name
    /// (`what` names it in errors).
    pub fn input(&mut self, what: &str, global: &ValueType, spec: &PartitionSpec) -> Result<String> {
        spec.check(self.mesh, global.shape.len(), what, false)?;
        let shard = ValueType::new(global.dtype, spec.shard_shape(self.mesh, &global.shape)?);
        let sharding = spec.hlo_sharding(self.mesh)?;
        let (g, s) = (tensor_type(global), tensor_type(&shard));
        let arg = format!("%arg{}", self.params.len());
        self.params.push(format!("{arg}: {g} {{mhlo.sharding = \"{sharding}\"}}"));
        let annotated = self.op(|r| format!("{r} = stablehlo.custom_call @Sharding({arg}) {{mhlo.sharding = \"{sharding}\"}} : ({g}) -> {g}"));
        Ok(self.op(|r| format!("{r} = stablehlo.custom_call @SPMDFullToShardShape({annotated}) {{mhlo.sharding = \"{{manual}}\"}} : ({g}) -> {s}")))
    }

    /// Runs the kernel `call` (traced on shard shapes) on `operands`; its results' SSA names.
    pub fn kernel(&mut self, call: &TracedCall, operands: &[String]) -> Result<Vec<String>> {
        let name = self.fresh();
        let n = call.outputs.len();
        let op = self.kernel_op(call, &result_binding(&name, n), operands)?;
        self.body.push(op);
        Ok(result_names(&name, n))
    }

    /// `then`'s results where `pred` (a `tensor<i1>`) holds and `otherwise`'s elsewhere, as a
    /// `stablehlo.if`: only the branch taken runs. Each branch adds its ops to the program and
    /// returns values of `types`.
    pub fn branch<E: From<Error>>(
        &mut self,
        pred: &str,
        types: &[ValueType],
        then: impl FnOnce(&mut Self) -> Result<Vec<String>, E>,
        otherwise: impl FnOnce(&mut Self) -> Result<Vec<String>, E>,
    ) -> Result<Vec<String>, E> {
        let outer = std::mem::take(&mut self.body);
        let then_results = then(self);
        let then_body = std::mem::take(&mut self.body);
        let otherwise_results = otherwise(self);
        let otherwise_body = std::mem::replace(&mut self.body, outer);
        let (then_results, otherwise_results) = (then_results?, otherwise_results?);
        if types.is_empty() || then_results.len() != types.len() || otherwise_results.len() != types.len() {
            return Err(sharding_error(format!("a branch's {} and {} results do not match its {} types", then_results.len(), otherwise_results.len(), types.len())).into());
        }
        let types: Vec<String> = types.iter().map(tensor_type).collect();
        let types = types.join(", ");
        let region = |body: Vec<String>, results: Vec<String>| {
            let mut r: String = body.iter().map(|line| format!("      {line}\n")).collect();
            let _ = write!(r, "      stablehlo.return {} : {types}\n    ", results.join(", "));
            r
        };
        let name = self.fresh();
        let n = then_results.len();
        let (a, b) = (region(then_body, then_results), region(otherwise_body, otherwise_results));
        self.body.push(format!("{} = \"stablehlo.if\"({pred}) ({{\n{a}}}, {{\n{b}}}) : (tensor<i1>) -> ({types})", result_binding(&name, n)));
        Ok(result_names(&name, n))
    }

    /// The op running `call` on `operands`, binding `binding`: a `tpu_custom_call`, or a call
    /// of the kernel's portable function.
    fn kernel_op(&mut self, call: &TracedCall, binding: &str, operands: &[String]) -> Result<String> {
        if operands.len() != call.operand_types().count() {
            return Err(sharding_error(format!("kernel `{}` takes {} operands, not {}", call.name, call.operand_types().count(), operands.len())));
        }
        let Some(functions) = &mut self.portable else {
            return custom_call_op(call, Form::Stable, binding, operands);
        };
        let module = portable::module(call)?;
        let index = match functions.iter().position(|(m, _)| *m == module) {
            Some(i) => i,
            None => {
                functions.push((module.clone(), kernel_function(&module, functions.len())?));
                functions.len() - 1
            }
        };
        let types: Vec<String> = call.operand_types().map(tensor_type).collect();
        Ok(format!("{binding} = func.call @kernel_{index}({}) : ({}) -> {}", operands.join(", "), types.join(", "), results_signature(call)))
    }

    /// The sum of `x` (a shard of type `t`) over the devices along `axes`.
    pub fn all_reduce_sum(&mut self, x: &str, t: &ValueType, axes: &[String]) -> Result<String> {
        let positions = self.mesh.positions(axes)?;
        let groups = self.mesh.groups_over(&positions);
        let channel = self.channel();
        let (tt, scalar) = (tensor_type(t), tensor_type(&ValueType::new(t.dtype, Vec::<usize>::new())));
        Ok(self.op(|r| {
            format!(
                "{r} = \"stablehlo.all_reduce\"({x}) ({{\n    ^bb0(%a: {scalar}, %b: {scalar}):\n      %s = stablehlo.add %a, %b : {scalar}\n      stablehlo.return %s : {scalar}\n    }}) {{channel_handle = #stablehlo.channel_handle<handle = {channel}, type = 1>, replica_groups = {groups}, use_global_device_ids}} : ({tt}) -> {tt}"
            )
        }))
    }

    /// `x` (of type `t`) sent from each device to its neighbour `shift` steps along `axis`
    /// (cyclically): what each device receives.
    pub fn rotate(&mut self, x: &str, t: &ValueType, axis: &str, shift: i64) -> Result<String> {
        let p = self.mesh.position(axis)?;
        let (size, stride) = (self.mesh.axes[p].1, self.mesh.stride(p));
        let pairs: Vec<String> = (0..self.mesh.devices())
            .map(|id| {
                let c = self.mesh.coordinate(id, p);
                let to = (c + shift.rem_euclid(size as i64) as u64) % size;
                format!("[{id}, {}]", id - c * stride + to * stride)
            })
            .collect();
        let channel = self.channel();
        let tt = tensor_type(t);
        let n = pairs.len();
        Ok(self.op(|r| {
            format!("{r} = \"stablehlo.collective_permute\"({x}) {{channel_handle = #stablehlo.channel_handle<handle = {channel}, type = 1>, source_target_pairs = dense<[{}]> : tensor<{n}x2xi64>}} : ({tt}) -> {tt}", pairs.join(", "))
        }))
    }

    /// This device's coordinate along `axis`, a `tensor<i32>`.
    pub fn axis_index(&mut self, axis: &str) -> Result<String> {
        let p = self.mesh.position(axis)?;
        let (size, stride) = (self.mesh.axes[p].1, self.mesh.stride(p));
        let id = self.op(|r| format!("{r} = stablehlo.partition_id : tensor<ui32>"));
        let id = self.op(|r| format!("{r} = stablehlo.convert {id} : (tensor<ui32>) -> tensor<i32>"));
        let stride = self.op(|r| format!("{r} = stablehlo.constant dense<{stride}> : tensor<i32>"));
        let size = self.op(|r| format!("{r} = stablehlo.constant dense<{size}> : tensor<i32>"));
        let q = self.op(|r| format!("{r} = stablehlo.divide {id}, {stride} : tensor<i32>"));
        Ok(self.op(|r| format!("{r} = stablehlo.remainder {q}, {size} : tensor<i32>")))
    }

    fn channel(&mut self) -> usize {
        self.next_channel += 1;
        self.next_channel - 1
    }

    /// The module: `main` returns each `(shard, type, spec)` of `results` as a whole array (a
    /// spec's partial sums added up first); `what` names the results in errors.
    pub fn finish(mut self, name: &str, results: &[(String, ValueType, PartitionSpec)]) -> Result<SpmdModule> {
        let mut returned = Vec::new();
        for (i, (shard, t, spec)) in results.iter().enumerate() {
            spec.check(self.mesh, t.shape.len(), &format!("output {i}"), true)?;
            let summed = if spec.summed.is_empty() { shard.clone() } else { self.all_reduce_sum(shard, t, &spec.summed)? };
            let global = ValueType::new(t.dtype, spec.global_shape(self.mesh, &t.shape)?);
            let sharding = spec.hlo_sharding(self.mesh)?;
            let (s, g) = (tensor_type(t), tensor_type(&global));
            let manual = self.op(|r| format!("{r} = stablehlo.custom_call @Sharding({summed}) {{mhlo.sharding = \"{{manual}}\"}} : ({s}) -> {s}"));
            let whole = self.op(|r| format!("{r} = stablehlo.custom_call @SPMDShardToFullShape({manual}) {{mhlo.sharding = \"{sharding}\"}} : ({s}) -> {g}"));
            returned.push((whole, g, sharding));
        }
        let mut m = String::new();
        let _ = writeln!(m, "module @{} attributes {{mhlo.num_partitions = {} : i32, mhlo.num_replicas = 1 : i32}} {{", symbol(name), self.mesh.devices());
        let signature: Vec<String> = returned.iter().map(|(_, g, sharding)| format!("{g} {{mhlo.sharding = \"{sharding}\"}}")).collect();
        let _ = writeln!(m, "  func.func public @main({}) -> ({}) {{", self.params.join(", "), signature.join(", "));
        for line in &self.body {
            let _ = writeln!(m, "    {line}");
        }
        let names: Vec<&str> = returned.iter().map(|(n, _, _)| n.as_str()).collect();
        let types: Vec<&str> = returned.iter().map(|(_, g, _)| g.as_str()).collect();
        let _ = writeln!(m, "    return {} : {}", names.join(", "), types.join(", "));
        m.push_str("  }\n");
        for (_, function) in self.portable.iter().flatten() {
            m.push_str(function);
        }
        m.push_str("}\n");
        Ok(SpmdModule { text: m, mesh: self.mesh.clone() })
    }
}

/// An SPMD program's module (StableHLO text) and the mesh its partitions are the devices of:
/// compile it for `mesh.devices()` partitions.
#[derive(Clone, Debug)]
pub struct SpmdModule {
    pub text: String,
    pub mesh: Mesh,
}

impl SpmdModule {
    /// The partitions (devices) it runs on.
    pub fn partitions(&self) -> u64 {
        self.mesh.devices()
    }
}

/// Refuses an output that an axis splitting some input leaves out: the devices along that
/// axis computed from different parts, so the output is neither whole on each (what leaving
/// the axis out says) nor split by it — unless it is their partial sums (`sum=`).
fn check_outputs_cover_inputs(inputs: &[PartitionSpec], outputs: &[PartitionSpec]) -> Result<()> {
    for (i, input) in inputs.iter().enumerate() {
        for axis in input.dims.iter().flatten() {
            if let Some(j) = outputs.iter().position(|o| !o.dims.iter().flatten().chain(&o.summed).any(|a| a == axis)) {
                return Err(sharding_error(format!(
                    "output {j} (`{}`) leaves out axis `{axis}`, which splits operand {i} (`{input}`): the devices along `{axis}` computed it from different parts; split the output over `{axis}`, or mark it `sum={axis}` if they hold partial sums",
                    outputs[j]
                )));
            }
        }
    }
    Ok(())
}

/// A portable module's `main` as the private function `kernel_{index}` of another module.
fn kernel_function(module: &str, index: usize) -> Result<String> {
    let body = module.split_once('\n').map(|(_, rest)| rest).and_then(|rest| rest.trim_end().strip_suffix('}'));
    match body {
        Some(body) if body.contains("func.func public @main(") => Ok(body.replacen("func.func public @main(", &format!("func.func private @kernel_{index}("), 1)),
        _ => Err(sharding_error("the portable kernel module is not one `module { func.func public @main }`")),
    }
}

/// The SPMD program running `call` (traced on one device's shards) on every device of
/// `program`'s mesh, in its form (TPU or portable): operand `i` laid out by `inputs[i]`,
/// output `j` by `outputs[j]`. `main` takes and returns the whole arrays; the kernel sees only
/// its shards.
pub fn sharded_module(mut program: SpmdProgram, call: &TracedCall, inputs: &[PartitionSpec], outputs: &[PartitionSpec]) -> Result<SpmdModule> {
    let mesh = program.mesh;
    let operand_types: Vec<&ValueType> = call.operand_types().collect();
    if inputs.len() != operand_types.len() || outputs.len() != call.outputs.len() {
        return Err(sharding_error(format!(
            "kernel `{}` takes {} operands and gives {} outputs, so it needs {} partition specs (operands, then outputs); {} given",
            call.name,
            operand_types.len(),
            call.outputs.len(),
            operand_types.len() + call.outputs.len(),
            inputs.len() + outputs.len()
        )));
    }
    let mut shards = Vec::new();
    for (i, (t, spec)) in operand_types.iter().zip(inputs).enumerate() {
        let what = format!("operand {i} ({})", tensor_type(t));
        spec.check(mesh, t.shape.len(), &what, false)?;
        let global = ValueType::new(t.dtype, spec.global_shape(mesh, &t.shape)?);
        shards.push(program.input(&what, &global, spec)?);
    }
    check_outputs_cover_inputs(inputs, outputs)?;
    let results = program.kernel(call, &shards)?;
    let results: Vec<(String, ValueType, PartitionSpec)> = results.into_iter().zip(&call.outputs).zip(outputs).map(|((r, o), spec)| (r, o.array.clone(), spec.clone())).collect();
    program.finish(&format!("{}_spmd", call.name), &results)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(s: &str) -> Mesh {
        s.parse().unwrap()
    }

    #[test]
    fn tile_assignments_follow_the_mesh() {
        let m = mesh("x=2,y=2");
        let spec = |s: &str| s.parse::<PartitionSpec>().unwrap().hlo_sharding(&m).unwrap();
        assert_eq!(spec("x,y"), "{devices=[2,2]0,1,2,3}");
        assert_eq!(spec("y,x"), "{devices=[2,2]0,2,1,3}");
        assert_eq!(spec("x,_"), "{devices=[2,1,2]0,1,2,3 last_tile_dim_replicate}");
        assert_eq!(spec("_,y"), "{devices=[1,2,2]0,2,1,3 last_tile_dim_replicate}");
        assert_eq!(spec("y+x,_"), "{devices=[4,1]0,2,1,3}");
        assert_eq!(spec("_,_"), "{replicated}");
        // Summed axes are replicated once summed.
        assert_eq!(spec("x,_,sum=y"), "{devices=[2,1,2]0,1,2,3 last_tile_dim_replicate}");
    }

    #[test]
    fn collectives_name_the_devices_along_their_axes() {
        let m = mesh("x=2,y=3");
        assert_eq!(m.groups_over(&[1]), "dense<[[0, 1, 2], [3, 4, 5]]> : tensor<2x3xi64>");
        assert_eq!(m.groups_over(&[0]), "dense<[[0, 3], [1, 4], [2, 5]]> : tensor<3x2xi64>");
        let mut p = SpmdProgram::new(&m);
        let t = ValueType::new(torchtpu_dsl::DType::F32, [8, 128]);
        p.rotate("%x", &t, "y", 1).unwrap();
        assert!(p.body[0].contains("[[0, 1], [1, 2], [2, 0], [3, 4], [4, 5], [5, 3]]"), "{}", p.body[0]);
        p.rotate("%x", &t, "x", -1).unwrap();
        assert!(p.body[1].contains("[[0, 3], [1, 4], [2, 5], [3, 0], [4, 1], [5, 2]]") && p.body[1].contains("handle = 2"), "{}", p.body[1]);
        // i64::MIN + 1 is -1 modulo 3: each device sends to its predecessor, without overflow.
        p.rotate("%x", &t, "y", i64::MIN + 1).unwrap();
        assert!(p.body[2].contains("[[0, 2], [1, 0], [2, 1], [3, 5], [4, 3], [5, 4]]"), "{}", p.body[2]);
        assert!(p.all_reduce_sum("%x", &t, &["y".into(), "y".into()]).unwrap_err().to_string().contains("named twice"));
    }

    #[test]
    fn shapes_split_and_join() {
        let m = mesh("x=2,y=4");
        let spec: PartitionSpec = "x+y,_".parse().unwrap();
        assert_eq!(spec.shard_shape(&m, &[16, 5]).unwrap(), vec![2, 5]);
        assert_eq!(spec.global_shape(&m, &[2, 5]).unwrap(), vec![16, 5]);
        assert!(spec.shard_shape(&m, &[12, 5]).unwrap_err().to_string().contains("multiple of 8"));
        assert!(spec.global_shape(&m, &[usize::MAX / 2, 1]).unwrap_err().to_string().contains("overflows"));
    }

    #[test]
    fn bad_meshes_and_specs_say_what_is_wrong() {
        for (bad, why) in [
            ("", "needs a size"),
            ("x", "needs a size"),
            ("x=0", "size 0"),
            ("x=2,x=2", "named twice"),
            ("x=a", "not a device count"),
            ("2=2", "must be letters"),
            ("sum=2", "not be `sum`"),
            ("x=65536,y=2", "more than 65536"),
        ] {
            let e = bad.parse::<Mesh>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let m = mesh("x=2,y=2");
        for (bad, rank, why) in [("x,x", 2, "twice"), ("x", 2, "has 2 dims"), ("z,_", 2, "no mesh axis `z`; the mesh has x=2,y=2"), ("x,_,sum=x", 2, "twice")] {
            let spec: PartitionSpec = bad.parse().unwrap();
            let e = spec.check(&m, rank, "operand 0", true).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!("x,_,sum=y".parse::<PartitionSpec>().unwrap().check(&m, 2, "operand 0", false).unwrap_err().to_string().contains("only an output"));
        assert_eq!("".parse::<PartitionSpec>().unwrap(), PartitionSpec::replicated(0));
        assert_eq!(PartitionSpec::replicated(0).to_string().parse::<PartitionSpec>().unwrap(), PartitionSpec::replicated(0));
        for (bad, why) in [("sum=y,x", "comes after"), ("x-1,_", "not an axis name")] {
            let e = bad.parse::<PartitionSpec>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
