use torchtpu_dsl::prelude::*;

#[tpu_kernel]
fn bad(x: &Ref<f32>, y: &mut Ref<f32>) {
    y.store(x.load());
    x.store(zeros());
}

fn main() {}
