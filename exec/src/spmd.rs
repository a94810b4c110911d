//! SPMD programs run on one machine: a PJRT CPU client with a device per partition, the
//! whole arrays cut into each device's shards by their partition specs and the outputs'
//! shards put back together — how a sharded program's portable form is checked against the
//! unsharded one.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use ndarray::{ArrayD, Slice as Range};
use torchtpu_codegen::{Mesh, PartitionSpec, SpmdModule};
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

/// Where device `device`'s share of shape `shape` lies in the whole array under `spec`: a
/// range per dim.
fn share(mesh: &Mesh, spec: &PartitionSpec, device: u64, shape: &[usize]) -> Result<Vec<std::ops::Range<usize>>> {
    Ok(spec.shard_offsets(mesh, device, shape)?.into_iter().zip(shape).map(|(start, &len)| start..start + len).collect())
}

/// Runs `module` (an SPMD program in its portable form) on the whole arrays `inputs`, each
/// laid out by its spec; returns the whole outputs of `outputs` (their types and specs). A
/// share that several devices hold (along an axis the spec leaves out) must be equal on each:
/// an error says which output and devices differ.
pub fn run_sharded(module: &SpmdModule, inputs: &[(&HostArray, &PartitionSpec)], outputs: &[(ValueType, PartitionSpec)]) -> Result<Vec<HostArray>> {
    let mesh = &module.mesh;
    let devices = usize::try_from(mesh.devices()).unwrap_or(usize::MAX);
    let client = cpu_client(devices)?;
    let executable = client.compile_spmd(&module.text, devices)?;
    let wholes = inputs.iter().map(|(a, spec)| Ok((a.to_f64(), a.dtype(), spec.shard_shape(mesh, a.shape())?))).collect::<Result<Vec<_>>>()?;
    let mut arguments = Vec::new();
    for device in 0..devices {
        let buffers = inputs
            .iter()
            .zip(&wholes)
            .map(|((_, spec), (whole, dtype, shape))| {
                let at = share(mesh, spec, device as u64, shape)?;
                let shard = HostArray::from_f64(*dtype, &whole.slice_each_axis(|ax| Range::from(at[ax.axis.index()].clone())).to_owned());
                Ok(client.buffer_on(device, &to_bytes(&shard), element_type(*dtype), shape)?)
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
            let mut holder: HashMap<Vec<std::ops::Range<usize>>, usize> = HashMap::new();
            for (device, outs) in results.iter().enumerate() {
                let buffer = outs.get(i).ok_or_else(|| Error::Input(format!("device {device} returned no output {i}")))?;
                let part = download(buffer, &shard_type)?.to_f64();
                let at = share(mesh, spec, device as u64, &shape)?;
                let mut target = whole.slice_each_axis_mut(|ax| Range::from(at[ax.axis.index()].clone()));
                match holder.get(&at) {
                    Some(&first) if target.iter().zip(&part).any(|(a, b)| a.to_bits() != b.to_bits()) => {
                        return Err(Error::Input(format!("output {i} (`{spec}`) differs between devices {first} and {device}, which the spec says hold the same share")));
                    }
                    Some(_) => {}
                    None => {
                        target.assign(&part);
                        holder.insert(at, device);
                    }
                }
            }
            Ok(HostArray::from_f64(t.dtype, &whole))
        })
        .collect()
}
