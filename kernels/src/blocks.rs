//! How a tunable block is sized against a dim: candidates for the search, and a block (tuned,
//! from a table, or a heuristic's) fitted to the dim the TPU's tiling allows.

/// Powers of two from `from` up to `to`: a block search space's candidates.
pub fn powers_of_two(from: usize, to: usize) -> impl Iterator<Item = usize> {
    std::iter::successors(Some(from), |b| b.checked_mul(2)).take_while(move |&b| b <= to)
}

/// The largest power of two at most `n` (0 for 0).
pub fn largest_power_of_two_at_most(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        1 << n.ilog2()
    }
}

/// `preferred` as a block along a dim of `len` tiled by `tile`: a multiple of the tile, at
/// least one tile, at most `len` rounded up to the tile.
pub fn whole_tiles(preferred: usize, len: usize, tile: usize) -> usize {
    preferred.min(len.div_ceil(tile).saturating_mul(tile)).div_ceil(tile).saturating_mul(tile).max(tile)
}

/// `preferred` as a block along a dim of `len` that may instead span it: the whole dim when
/// `preferred` reaches it, else a multiple of `tile`.
pub fn whole_tiles_or_span(preferred: usize, len: usize, tile: usize) -> usize {
    if preferred >= len {
        len
    } else {
        preferred.div_ceil(tile).saturating_mul(tile)
    }
}
