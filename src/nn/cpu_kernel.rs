//! Plumbing shared by the CPU convolution kernels ([`super::gemm_conv`], [`super::winograd`]):
//! the parallel plan, per-thread scratch buffers, and a checked call of the `gemm` crate on
//! strided slices.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;
use std::cell::RefCell;

/// Parallel over chunks (each GEMM single-threaded), or chunk after chunk with every thread
/// inside each GEMM and copy loop.
#[derive(Clone, Copy)]
pub(super) struct Plan {
    pub(super) over_chunks: bool,
}

impl Plan {
    pub(super) fn new(chunks: usize) -> Self {
        let threads = rayon::current_num_threads();
        Plan {
            over_chunks: threads > 1 && chunks >= threads,
        }
    }
    pub(super) fn gemm(self) -> Parallelism {
        if self.over_chunks || rayon::current_num_threads() == 1 {
            Parallelism::None
        } else {
            Parallelism::Rayon(0)
        }
    }
    /// Whether the copy loops inside one chunk run in parallel.
    pub(super) fn inner(self) -> bool {
        !self.over_chunks && rayon::current_num_threads() > 1
    }
}

/// Per-thread buffers reused across calls and steps: the chunk's im2col matrix, its output (or
/// output gradient) in GEMM layout, and its im2col gradient.
#[derive(Default)]
pub(super) struct Scratch {
    pub(super) cols: Vec<f32>,
    pub(super) out: Vec<f32>,
    pub(super) dcols: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch buffers, or fresh ones if they are in use (a task
/// stolen by this thread while one of its own calls waits inside a parallel GEMM).
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// The first `len` elements of `v`, grown if needed. Contents are stale: callers overwrite.
pub(super) fn sized(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// Runs `f(i, item)` over `items`, in parallel if `parallel`.
pub(super) fn each<T: Send>(items: Vec<T>, parallel: bool, f: impl Fn(usize, T) + Sync + Send) {
    if parallel {
        items.into_par_iter().enumerate().for_each(|(i, t)| f(i, t));
    } else {
        items.into_iter().enumerate().for_each(|(i, t)| f(i, t));
    }
}

/// `dst = src·…` as `gemm` wants it: `dst[m, n] (=|+=) lhs[m, k] · rhs[k, n]`, each matrix
/// given by its base pointer, row stride and column stride.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dst_cs): (isize, isize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (isize, isize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (isize, isize),
    parallelism: Parallelism,
) {
    let last = |rows: usize, cols: usize, rs: isize, cs: isize| {
        (rows.max(1) - 1) as isize * rs + (cols.max(1) - 1) as isize * cs
    };
    // The strided extents must lie inside the slices: what makes the raw call sound.
    assert!(m * n == 0 || (last(m, n, dst_rs, dst_cs) as usize) < dst.len());
    assert!(m * k == 0 || (last(m, k, lhs_rs, lhs_cs) as usize) < lhs.len());
    assert!(k * n == 0 || (last(k, n, rhs_rs, rhs_cs) as usize) < rhs.len());
    // SAFETY: the asserts above bound every element the call touches; all strides are
    // non-negative; `dst` does not alias the inputs (it is a distinct `&mut`).
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs,
            dst_rs,
            accumulate,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Splits `data` into consecutive pieces of `len(i)` elements.
pub(super) fn split_by<T>(
    mut data: &mut [T],
    count: usize,
    len: impl Fn(usize) -> usize,
) -> Vec<&mut [T]> {
    (0..count)
        .map(|i| {
            let (head, tail) = std::mem::take(&mut data).split_at_mut(len(i));
            data = tail;
            head
        })
        .collect()
}
