use torchtpu_dsl::prelude::*;

#[tpu_kernel]
fn bad(x: &Vec<f32>, y: &mut Ref<f32>) {
    y.store(zeros());
}

fn main() {}
