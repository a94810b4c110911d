use torchtpu_dsl::prelude::*;

#[tpu_kernel]
fn bad(x: &Ref<f32>, y: &mut Ref<f32>) {
    let t = x.load();
    if t > 0.0 {
        y.store(t);
    }
}

fn main() {}
