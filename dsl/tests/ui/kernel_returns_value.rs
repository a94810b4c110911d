use torchtpu_dsl::prelude::*;

#[tpu_kernel]
fn bad(x: &Ref<f32>) -> Tile<f32> {
    x.load()
}

fn main() {}
