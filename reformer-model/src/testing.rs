//! Helpers shared by the unit tests.

use burn::prelude::*;
use burn::tensor::TensorData;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

/// Returns the CPU device the tests run on.
pub fn test_device() -> Device {
    crate::device::select_device("cpu").expect("a CPU backend is compiled in for tests")
}

/// Returns the host generator that module constructors in tests draw their weights from.
pub fn test_rng() -> StdRng {
    StdRng::seed_from_u64(0)
}

/// Returns a tensor of standard-normal values drawn from a host generator seeded with `seed`,
/// so that a test gets the same numbers on every run and backend.
pub fn random_tensor<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    let mut rng = StdRng::seed_from_u64(seed);
    let count = shape.iter().product();
    let data: Vec<f32> = (0..count).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// Reads a tensor's values as f32.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().expect("f32 data")
}

/// Asserts that two slices agree to `tolerance` in absolute value, naming the first bad index.
pub fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32) {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!((a - e).abs() <= tolerance, "index {i}: {a} vs {e} (tolerance {tolerance})");
    }
}

/// Returns the largest absolute difference between two slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// Asserts that outputs `[1, seq_len, width]` of an original and a changed input agree on
/// positions `0..=last_unchanged` (to 1e-6) and differ after it (by more than `min_change`).
///
/// The second check makes the first meaningful: a change that reaches no later output would
/// pass the first check whether or not the model is causal.
pub fn assert_causal_prefix(original: Tensor<3>, changed: Tensor<3>, last_unchanged: usize, min_change: f32) {
    let [_, seq_len, _] = original.dims();
    let prefix = |t: Tensor<3>| values(t.slice([0..1, 0..last_unchanged + 1]));
    let suffix = |t: Tensor<3>| values(t.slice([0..1, last_unchanged + 1..seq_len]));
    assert!(
        max_abs_diff(&suffix(original.clone()), &suffix(changed.clone())) > min_change,
        "changing the input after position {last_unchanged} left the later outputs unchanged"
    );
    assert_close(&prefix(original), &prefix(changed), 1e-6);
}

/// Source of the gradients [`grads_by_path`] reads: one backward pass, or an accumulator's sum.
#[derive(Clone, Copy)]
pub enum GradSource<'a> {
    /// Gradients of one backward pass.
    Backward(&'a burn::tensor::Gradients),
    /// Gradients summed by a [`burn::optim::GradientsAccumulator`].
    Accumulated(&'a burn::optim::GradientsParams),
}

/// Gradient of one parameter: its shape and values.
pub type ParamGrad = (Vec<usize>, Vec<f32>);

/// Returns every float parameter of `model` in visiting order, by module path, with its
/// gradient from `source` (`None` for a parameter without one).
pub fn grads_by_path(model: &impl burn::module::Module, source: GradSource<'_>) -> Vec<(String, Option<ParamGrad>)> {
    struct Collect<'a> {
        source: GradSource<'a>,
        path: Vec<String>,
        found: Vec<(String, Option<ParamGrad>)>,
    }

    impl burn::module::ModuleVisitor for Collect<'_> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }

        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }

        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            let grad = match self.source {
                GradSource::Backward(grads) => param.val().grad(grads),
                GradSource::Accumulated(grads) => grads.get::<D>(param.id),
            };
            let grad = grad.map(|grad| (grad.dims().to_vec(), values(grad)));
            self.found.push((self.path.join("."), grad));
        }
    }

    let mut collect = Collect { source, path: Vec::new(), found: Vec::new() };
    model.visit(&mut collect);
    collect.found
}

