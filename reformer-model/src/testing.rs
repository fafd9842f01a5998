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
