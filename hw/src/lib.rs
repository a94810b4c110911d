//! TPU hardware facts, in one place: the vector register's tiling, and per chip generation its
//! VMEM, MXU tile, TensorCores, peak matrix and vector rates, HBM bandwidth and grid-step
//! overhead. Tiling checks, block rounding, pruning, the TPU model and Python all read them
//! here. Rates are per device (what JAX shows as one device: a megacore's two TensorCores, one
//! of tpu7x's); VMEM is per TensorCore, as JAX's `pltpu.get_tpu_info` gives it; the
//! scoped-VMEM defaults are libtpu's (measured); the vector rates and step overheads are fitted
//! to published timings (`autotune/calibration`).

use std::fmt;
use std::str::FromStr;

/// Lanes of a TPU vector register: the tile of an array's last dim.
pub const LANES: usize = 128;

/// The fewest rows a TPU block may have (unless it spans the array): one (8, 128) tile.
pub const MIN_SUBLANES: usize = 8;

/// Sublanes of a TPU vector register for elements of `element_bytes`: the tile of an array's
/// second-to-last dim (8 rows of 32-bit values, packed two or four to a row for narrower ones).
pub fn sublanes(element_bytes: usize) -> usize {
    match element_bytes {
        4.. => MIN_SUBLANES,
        2 => 2 * MIN_SUBLANES,
        _ => 4 * MIN_SUBLANES,
    }
}

/// A TPU generation we compile for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Chip {
    V4,
    V5e,
    V5p,
    V6e,
    Tpu7x,
}

/// A chip name that is none of ours.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown TPU chip `{0}`; expected one of v4, v5e, v5p, v6e, tpu7x")]
pub struct UnknownChip(pub String);

impl Chip {
    pub const ALL: [Chip; 5] = [Chip::V4, Chip::V5e, Chip::V5p, Chip::V6e, Chip::Tpu7x];

    pub fn name(self) -> &'static str {
        match self {
            Chip::V4 => "v4",
            Chip::V5e => "v5e",
            Chip::V5p => "v5p",
            Chip::V6e => "v6e",
            Chip::Tpu7x => "tpu7x",
        }
    }

    /// How libtpu's topology names call the chip (`v5` for v5p).
    fn topology_prefix(self) -> &'static str {
        match self {
            Chip::V5p => "v5",
            other => other.name(),
        }
    }

    /// The shape of the smallest slice libtpu accepts for the chip: a 2-D torus for the
    /// inference chips (v5e, v6e), 3-D for the others.
    fn smallest_slice(self) -> &'static [u32] {
        match self {
            Chip::V5e | Chip::V6e => &[2, 2],
            Chip::V4 | Chip::V5p | Chip::Tpu7x => &[2, 2, 1],
        }
    }

    /// The scoped VMEM a kernel gets without `vmem_limit_bytes`.
    pub fn default_scoped_vmem_bytes(self) -> u64 {
        match self {
            Chip::V4 | Chip::V5e | Chip::V5p => 16 << 20,
            Chip::V6e | Chip::Tpu7x => 32 << 20,
        }
    }

    /// All the VMEM there is: the most `vmem_limit_bytes` can ask for.
    pub fn vmem_bytes(self) -> u64 {
        match self {
            Chip::V4 => 16 << 20,
            Chip::V5p | Chip::Tpu7x => 64 << 20,
            Chip::V5e | Chip::V6e => 128 << 20,
        }
    }

    /// The MXU's native tile: matmul dims are padded to it.
    pub fn mxu_dim(self) -> usize {
        match self {
            Chip::V6e | Chip::Tpu7x => 256,
            _ => 128,
        }
    }

    /// Whether the MXU multiplies int8 (int32 sums): from v5e on. v4's compiler rejects an int8
    /// matmul (measured with libtpu 0.0.52: `CompileTimeMosaicUnsupportedRhsType`).
    pub fn int8_matmul(self) -> bool {
        !matches!(self, Chip::V4)
    }

    /// TensorCores one device drives. v4 and v5p join a chip's two as one "megacore" device,
    /// whose `parallel` grid axes the compiler splits between them; v5e and v6e have one per
    /// chip; tpu7x shows each of its two TensorCores as a device of its own.
    pub fn cores_per_device(self) -> u32 {
        match self {
            Chip::V4 | Chip::V5p => 2,
            Chip::V5e | Chip::V6e | Chip::Tpu7x => 1,
        }
    }

    /// Peak dense bf16 matrix rate of one device, FLOP/s (public per-chip figures; half of
    /// tpu7x's, whose chip is two devices).
    pub fn peak_bf16_flops(self) -> f64 {
        match self {
            Chip::V4 => 275e12,
            Chip::V5e => 197e12,
            Chip::V5p => 459e12,
            Chip::V6e => 918e12,
            Chip::Tpu7x => 2307e12 / 2.0,
        }
    }

    /// HBM bandwidth of one device, bytes/s (public per-chip figures; half of tpu7x's).
    pub fn hbm_bytes_per_second(self) -> f64 {
        match self {
            Chip::V4 => 1.2e12,
            Chip::V5e => 0.819e12,
            Chip::V5p => 2.765e12,
            Chip::V6e => 1.64e12,
            Chip::Tpu7x => 7.37e12 / 2.0,
        }
    }

    /// Element operations per second of one device's vector units (the softmax of attention
    /// runs there, at a rate independent of head dim). No vendor publishes it: it is fitted to
    /// published flash-attention timings (`autotune/calibration`, the calibration split), where
    /// time at fixed matrix flops grows with heads × seq² once the vector work outweighs
    /// the MXU's. v4 and v5e, without such timings, take v5p's rate per TensorCore scaled by
    /// their bf16 peak.
    pub fn vector_ops_per_second(self) -> f64 {
        match self {
            Chip::V5p => VECTOR_OPS_V5P,
            Chip::V4 | Chip::V5e => VECTOR_OPS_V5P * self.peak_bf16_flops() / Chip::V5p.peak_bf16_flops(),
            Chip::V6e => VECTOR_OPS_V6E,
            Chip::Tpu7x => VECTOR_OPS_TPU7X,
        }
    }
}

const VECTOR_OPS_V5P: f64 = 8e12;
const VECTOR_OPS_V6E: f64 = 7e12;
const VECTOR_OPS_TPU7X: f64 = 7e12;

impl Chip {
    /// The fixed cost of one grid step of a Pallas TPU kernel (the pipeline's loop and DMA
    /// issue), which overlaps nothing. Fitted: v5e to the JAX matmul tutorial's 128-blocked
    /// runs, whose steps move too little to cost more; v5p, v6e and tpu7x to tokamax's flash
    /// timings (the calibration split); v4, without timings, takes v5e's.
    pub fn step_overhead_seconds(self) -> f64 {
        match self {
            Chip::V4 | Chip::V5e => 0.35e-6,
            Chip::V5p | Chip::V6e | Chip::Tpu7x => 0.2e-6,
        }
    }
}

impl fmt::Display for Chip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A TPU slice: a chip and the shape of its grid of chips (`v5e:2x4`, `v5p:2x2x1`), what libtpu
/// compiles a sharded program for without hardware. How many devices it has is libtpu's to say
/// (v4 and tpu7x show two per chip): `TpuCompiler::devices` asks it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slice {
    pub chip: Chip,
    pub shape: Vec<u32>,
}

/// The longest side of a slice's grid we take: past any TPU pod's (a v5p pod is 16×20×28).
pub const MAX_SLICE_SIDE: u32 = 64;

/// A slice name that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad TPU slice `{name}`: {reason}; expected a chip and its grid, e.g. v5e:2x4 or v5p:2x2x1")]
pub struct BadSlice {
    pub name: String,
    pub reason: String,
}

impl Slice {
    /// The smallest slice libtpu accepts for `chip` (what single-chip kernels compile for).
    pub fn smallest(chip: Chip) -> Slice {
        Slice { chip, shape: chip.smallest_slice().to_vec() }
    }

    /// Multi-chip slices of each generation, as sharded programs are checked on by default:
    /// v5e 2×2 and 2×4, v6e 2×2, v5p 2×2×1, tpu7x 2×2×1.
    pub fn multi_chip_examples() -> Vec<Slice> {
        [(Chip::V5e, [2, 2].as_slice()), (Chip::V5e, &[2, 4]), (Chip::V6e, &[2, 2]), (Chip::V5p, &[2, 2, 1]), (Chip::Tpu7x, &[2, 2, 1])]
            .into_iter()
            .map(|(chip, shape)| Slice { chip, shape: shape.to_vec() })
            .collect()
    }

    /// libtpu's name for the slice (`v5:2x2x1` for a v5p one).
    pub fn topology(&self) -> String {
        format!("{}:{}", self.chip.topology_prefix(), self.grid())
    }

    /// Chips in the slice.
    pub fn chips(&self) -> u64 {
        self.shape.iter().map(|&d| u64::from(d)).product()
    }

    fn grid(&self) -> String {
        self.shape.iter().map(u32::to_string).collect::<Vec<_>>().join("x")
    }
}

impl fmt::Display for Slice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.chip, self.grid())
    }
}

impl FromStr for Slice {
    type Err = BadSlice;
    fn from_str(s: &str) -> Result<Slice, BadSlice> {
        let bad = |reason: String| BadSlice { name: s.to_string(), reason };
        let (chip, grid) = s.trim().split_once(':').ok_or_else(|| bad("no `:` between the chip and its grid".into()))?;
        // Our chip name, or libtpu's (`v5` for v5p).
        let chip = match Chip::ALL.into_iter().find(|c| c.topology_prefix() == chip) {
            Some(c) => c,
            None => chip.parse::<Chip>().map_err(|e| bad(e.to_string()))?,
        };
        let shape = grid
            .split('x')
            .map(|d| d.parse::<u32>().ok().filter(|d| (1..=MAX_SLICE_SIDE).contains(d)).ok_or_else(|| bad(format!("`{d}` is not a grid size from 1 to {MAX_SLICE_SIDE}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let rank = chip.smallest_slice().len();
        if shape.len() != rank {
            return Err(bad(format!("a {chip} grid has {rank} dims, not {}", shape.len())));
        }
        Ok(Slice { chip, shape })
    }
}

impl FromStr for Chip {
    type Err = UnknownChip;
    fn from_str(s: &str) -> Result<Chip, UnknownChip> {
        Chip::ALL.into_iter().find(|c| c.name() == s.trim()).ok_or_else(|| UnknownChip(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_round_trip_and_bad_ones_say_why() {
        for chip in Chip::ALL {
            let smallest = Slice::smallest(chip);
            assert_eq!(smallest.to_string().parse::<Slice>(), Ok(smallest.clone()));
            assert_eq!(smallest.topology().parse::<Slice>(), Ok(smallest.clone()));
            assert_eq!(smallest.chips(), 4);
        }
        assert_eq!("v5p:2x2x1".parse::<Slice>().map(|s| s.topology()), Ok("v5:2x2x1".to_string()));
        assert_eq!("v5e:2x4".parse::<Slice>().map(|s| s.chips()), Ok(8));
        for (bad, why) in [
            ("v5e", "no `:`"),
            ("v5e:2x0", "`0` is not a grid size"),
            ("v5e:2x2x1", "has 2 dims"),
            ("v9:2x2", "unknown TPU chip"),
            ("v4:2xx1", "``"),
            ("v6e:99999999999x1", "from 1 to 64"),
            ("v6e:65x1", "from 1 to 64"),
        ] {
            let e = bad.parse::<Slice>().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("e.g. v5e:2x4"), "{bad}: {e}");
        }
    }

    #[test]
    fn names_round_trip_and_unknown_ones_are_errors() {
        for chip in Chip::ALL {
            assert_eq!(chip.name().parse::<Chip>(), Ok(chip));
            assert!(chip.default_scoped_vmem_bytes() <= chip.vmem_bytes());
        }
        assert_eq!("v9".parse::<Chip>().unwrap_err().to_string(), "unknown TPU chip `v9`; expected one of v4, v5e, v5p, v6e, tpu7x");
        assert_eq!((sublanes(4), sublanes(2), sublanes(1)), (8, 16, 32));
    }
}
