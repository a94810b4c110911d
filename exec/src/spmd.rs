//! SPMD programs run on one machine: a PJRT CPU client with a device per partition, the
//! whole arrays cut into each device's shards by their partition specs and the outputs'
//! shards put back together — how a sharded program's portable form is checked against the
//! unsharded one.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use ndarray::{ArrayD, Slice as Range};
use torchtpu_codegen::{Mesh, PartitionSpec};
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::HostArray;
use torchtpu_runtime::{locate, Client, Plugin};

use crate::transfer::{download, element_type, to_bytes};
use crate::{Error, Result};

/// The CPU client with `devices` devices (one per distinct count, made on first use).
fn cpu_client(devices: usize) -> Result<Client> {
    static CLIENTS: OnceLock<Mutex<HashMap<usize, Client>>> = OnceLock::new();
    let mut clients = CLIENTS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = clients.get(&devices) {
        return Ok(c.clone());
    }
    let plugin = Plugin::load_non_tpu(&locate::cpu_plugin()?, "cpu")?;
    let client = Client::with_cpu_devices(&plugin, devices)?;
    clients.insert(devices, client.clone());
    Ok(client)
}

/// The part of `whole` that `device` holds under `spec`.
fn shard_of(whole: &HostArray, mesh: &Mesh, spec: &PartitionSpec, device: u64) -> Result<HostArray> {
    let shape = spec.shard_shape(mesh, whole.shape())?;
    let offsets = spec.shard_offsets(mesh, device, &shape)?;
    let values = whole.to_f64();
    let part = values.slice_each_axis(|ax| Range::from(offsets[ax.axis.index()]..offsets[ax.axis.index()] + shape[ax.axis.index()]));
    Ok(HostArray::from_f64(whole.dtype(), &part.to_owned()))
}

/// Runs the SPMD `module` (over `mesh`'s devices, in its portable form) on the whole arrays
/// `inputs`, each laid out by its spec; returns the whole outputs of `outputs` (their types
/// and specs). A share that several devices hold (an axis the spec does not name) is equal on
/// each; the last device's copy is kept.
pub fn run_sharded(module: &str, mesh: &Mesh, inputs: &[(&HostArray, &PartitionSpec)], outputs: &[(ValueType, PartitionSpec)]) -> Result<Vec<HostArray>> {
    let devices = mesh.devices();
    let client = cpu_client(usize::try_from(devices).unwrap_or(usize::MAX))?;
    let executable = client.compile_spmd(module, devices as usize)?;
    let mut arguments = Vec::new();
    for device in 0..devices {
        let buffers = inputs
            .iter()
            .map(|(whole, spec)| {
                let shard = shard_of(whole, mesh, spec, device)?;
                Ok(client.buffer_on(device as usize, &to_bytes(&shard), element_type(shard.dtype()), shard.shape())?)
            })
            .collect::<Result<Vec<_>>>()?;
        arguments.push(buffers);
    }
    let refs: Vec<Vec<_>> = arguments.iter().map(|l| l.iter().collect()).collect();
    let results = executable.execute_partitioned(&refs)?;
    outputs
        .iter()
        .enumerate()
        .map(|(i, (t, spec))| {
            let shape = spec.shard_shape(mesh, &t.shape)?;
            let shard_type = ValueType::new(t.dtype, shape.clone());
            let mut whole = ArrayD::<f64>::zeros(t.shape.clone());
            for (device, outs) in results.iter().enumerate() {
                let buffer = outs.get(i).ok_or_else(|| Error::Input(format!("device {device} returned no output {i}")))?;
                let part = download(buffer, &shard_type)?.to_f64();
                let offsets = spec.shard_offsets(mesh, device as u64, &shape)?;
                whole.slice_each_axis_mut(|ax| Range::from(offsets[ax.axis.index()]..offsets[ax.axis.index()] + shape[ax.axis.index()])).assign(&part);
            }
            Ok(HostArray::from_f64(t.dtype, &whole))
        })
        .collect()
}
