//! The random number generator of the CPU backends, standing in for a TPU core's hardware
//! PRNG (`tpu.prng_set_seed_32`, `tpu.prng_random_bits`), whose bits we cannot reproduce.
//!
//! The contract both keep: after `prng_seed(seeds)`, the sequence of `prng_random_bits` calls
//! in a program is a function of the seeds alone; other seeds give other bits. On the CPU
//! backends the generator is counter-based: seeding sets `key = mix(…mix(mix(s0) ^ s1)… ^ sn)`
//! and a counter to 0; each call returns `mix(key ^ mix(counter + i))` for its elements `i`
//! in row-major order and advances the counter by their number. `mix` is MurmurHash3's
//! 32-bit finalizer. The interpreter and the portable lowering both run the functions below,
//! on numbers and on StableHLO values.

/// Wrapping u32 arithmetic on some representation of values.
pub trait U32Ops {
    type V: Clone;
    fn constant(&mut self, c: u32) -> Self::V;
    fn xor(&mut self, a: &Self::V, b: &Self::V) -> Self::V;
    fn add(&mut self, a: &Self::V, b: &Self::V) -> Self::V;
    fn mul(&mut self, a: &Self::V, b: &Self::V) -> Self::V;
    /// Logical shift right by a constant.
    fn shr(&mut self, a: &Self::V, by: u32) -> Self::V;
}

/// MurmurHash3's finalizer: every input bit reaches every output bit.
pub fn mix<O: U32Ops>(o: &mut O, x: &O::V) -> O::V {
    let mut x = x.clone();
    for (shift, multiplier) in [(16, Some(0x85eb_ca6b)), (13, Some(0xc2b2_ae35)), (16, None)] {
        let s = o.shr(&x, shift);
        x = o.xor(&x, &s);
        if let Some(m) = multiplier {
            let m = o.constant(m);
            x = o.mul(&x, &m);
        }
    }
    x
}

/// The key the seeds set.
pub fn seed_key<O: U32Ops>(o: &mut O, seeds: &[O::V]) -> O::V {
    let mut key = o.constant(0);
    for s in seeds {
        let k = o.xor(&key, s);
        key = mix(o, &k);
    }
    key
}

/// The bits of element `element` of the call made when the counter stood at `counter`.
pub fn bits<O: U32Ops>(o: &mut O, key: &O::V, counter: &O::V, element: &O::V) -> O::V {
    let index = o.add(counter, element);
    let m = mix(o, &index);
    let k = o.xor(key, &m);
    mix(o, &k)
}

/// Plain numbers.
pub struct Numbers;

impl U32Ops for Numbers {
    type V = u32;
    fn constant(&mut self, c: u32) -> u32 {
        c
    }
    fn xor(&mut self, a: &u32, b: &u32) -> u32 {
        a ^ b
    }
    fn add(&mut self, a: &u32, b: &u32) -> u32 {
        a.wrapping_add(*b)
    }
    fn mul(&mut self, a: &u32, b: &u32) -> u32 {
        a.wrapping_mul(*b)
    }
    fn shr(&mut self, a: &u32, by: u32) -> u32 {
        a >> by
    }
}
