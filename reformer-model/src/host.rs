//! Helpers of the CPU kernels that run on the Flex backend: access to a tensor's `f32` values,
//! tensors built from host vectors, a strided matrix product, and the choice of instruction set.

use burn::tensor::{Bytes, DType, Shape};
use burn_flex::{FlexTensor, Layout};

/// Returns `tensor` with its values contiguous in row-major order, copying only a strided view.
///
/// # Panics
/// If the tensor is not `f32`: the kernels are written for `f32` only.
pub(crate) fn contiguous(tensor: &FlexTensor) -> FlexTensor {
    assert_eq!(tensor.dtype(), DType::F32, "the CPU kernels run on f32 tensors, not {:?}", tensor.dtype());
    if tensor.as_slice::<f32>().is_some() { tensor.clone() } else { tensor.to_contiguous() }
}

/// Returns the values of a tensor made by [`contiguous`].
pub(crate) fn values(tensor: &FlexTensor) -> &[f32] {
    tensor.as_slice::<f32>().expect("a contiguous f32 tensor")
}

/// Builds a tensor of `shape` from row-major values, without copying them.
pub(crate) fn tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(data), Layout::contiguous(Shape::from(shape)), DType::F32)
}

/// One input of [`matmul`]: its values and the strides, in elements, between its rows and
/// between its columns. A transposed matrix is the same values with the strides swapped.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub values: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Operand<'a> {
    /// Describes a row-major matrix with `cols` columns.
    pub fn rows(values: &'a [f32], cols: usize) -> Self {
        Self { values, row_stride: cols, col_stride: 1 }
    }

    /// Describes the transpose of a row-major matrix with `cols` columns.
    pub fn transposed(values: &'a [f32], cols: usize) -> Self {
        Self { values, row_stride: 1, col_stride: cols }
    }

    /// Returns the index of element `[rows - 1, cols - 1]`, or `None` on overflow.
    fn last_index(&self, rows: usize, cols: usize) -> Option<usize> {
        (rows - 1).checked_mul(self.row_stride)?.checked_add((cols - 1).checked_mul(self.col_stride)?)
    }
}

/// Computes `dst = lhs · rhs` for `lhs` `[m, k]` and `rhs` `[k, n]`, or adds the product to
/// `dst` with `accumulate`. `dst` has unit column stride and row stride `dst_row_stride`.
/// `parallel` splits the product across the thread pool; kernels that already run one task per
/// thread pass `false`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    [m, n, k]: [usize; 3],
    dst: &mut [f32],
    dst_row_stride: usize,
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }

    // Rows of dst must not overlap: gemm's threads write different rows at once.
    assert!(m == 1 || dst_row_stride >= n, "matmul: dst rows of {n} overlap at row stride {dst_row_stride}");
    let dst_shape = Operand { values: dst, row_stride: dst_row_stride, col_stride: 1 };
    assert!(dst_shape.last_index(m, n).is_some_and(|last| last < dst.len()), "matmul: dst is shorter than [{m}, {n}]");
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_row_stride).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }

    assert!(lhs.last_index(m, k).is_some_and(|last| last < lhs.values.len()), "matmul: lhs is shorter than [{m}, {k}]");
    assert!(rhs.last_index(k, n).is_some_and(|last| last < rhs.values.len()), "matmul: rhs is shorter than [{k}, {n}]");
    let parallelism = if parallel { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };

    // SAFETY: the asserts above keep every element the strides address inside its slice and
    // keep dst's rows apart, and `dst` is a unique borrow, so it overlaps neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.values.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.values.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Defines `fn $name(...)` that runs `$portable` (an `#[inline(always)]` function with the same
/// arguments) compiled for AVX-512, for AVX2 with FMA, or for the build's baseline, whichever
/// the CPU supports. Loops written to vectorise then use the widest vectors available, which a
/// default x86-64 build does not.
macro_rules! dispatch_simd {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $portable:ident) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $portable($($arg),*)
                }

                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $portable($($arg),*)
                }

                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features the function is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $portable($($arg),*)
        }
    };
}

pub(crate) use dispatch_simd;

/// Adds `part` into `total`, element by element.
pub(crate) fn add_assign(total: &mut [f32], part: &[f32]) {
    for (t, p) in total.iter_mut().zip(part) {
        *t += p;
    }
}

/// Returns `sum(f(x))` over `values`, added in sixteen partial sums so that the loop vectorises
/// (a single running f32 sum cannot be reordered by the compiler).
#[inline(always)]
pub(crate) fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = values.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for chunk in chunks {
        for l in 0..16 {
            lanes[l] += f(chunk[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Returns `sum(a * b)`, added in sixteen partial sums.
#[inline(always)]
pub(crate) fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_handles_transposed_operands() {
        // lhs [2, 3], rhs given as the transpose of a row-major [2, 3] matrix, so [3, 2].
        let lhs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let rhs_t = [1.0, 0.0, -1.0, 2.0, 1.0, 0.0];
        let mut dst = [0.0; 4];
        matmul([2, 2, 3], &mut dst, 2, false, Operand::rows(&lhs, 3), Operand::transposed(&rhs_t, 3), false);
        assert_eq!(dst, [-2.0, 4.0, -2.0, 13.0]);
        matmul([2, 2, 3], &mut dst, 2, true, Operand::rows(&lhs, 3), Operand::transposed(&rhs_t, 3), false);
        assert_eq!(dst, [-4.0, 8.0, -4.0, 26.0]);
    }

    #[test]
    fn lane_sums_match_plain_sums() {
        let values: Vec<f32> = (0..37).map(|i| i as f32 * 0.5).collect();
        assert_eq!(lane_sum(&values, |x| x), values.iter().sum::<f32>());
        assert_eq!(lane_dot(&values, &values), values.iter().map(|x| x * x).sum::<f32>());
    }
}
