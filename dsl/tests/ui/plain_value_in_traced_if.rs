use torchtpu_dsl::prelude::*;

#[tpu_kernel]
fn bad(x: &Ref<f32>, y: &mut Ref<f32>) {
    let mut count = 0;
    if program_id(0) == 0 {
        count += 1;
    }
    y.store(x.load() * count as f32);
}

fn main() {}
