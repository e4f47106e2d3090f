//! The CPU kernels behind [`super::cpu_conv`]: a dense NCHW convolution and its gradients as
//! im2col + GEMM, done a few samples at a time.
//!
//! The batch is cut into chunks of `nb` samples whose im2col matrix `[Cin·k², nb·Ho·Wo]` is
//! small enough to stay in cache (a few MB), built in a per-thread scratch buffer that lives
//! across steps (no large allocation, so no fresh pages from the OS each step), and consumed at
//! once by one GEMM (`gemm`, the crate burn's CPU backend uses) on raw strided slices. Chunks
//! run in parallel, each with a single-threaded GEMM, so im2col, col2im, packing and layout
//! changes are spread over all threads instead of waiting on one; only when there are fewer
//! chunks than threads (inference on one image) does one GEMM use every thread.
//!
//! Shapes: `x[N, Cin, H, W]`, `w[Cout, Cin, k, k]`, `y[N, Cout, Ho, Wo]`, all contiguous f32.
//! With `K = Cin·k²` and `L = Ho·Wo`, a chunk computes
//! - forward: `y_c[Cout, nb·L] = W[Cout, K] · cols_c[K, nb·L]`;
//! - weight gradient: `dW += dY_c[Cout, nb·L] · cols_cᵀ`;
//! - input gradient: `dcols_c = Wᵀ · dY_c`, then col2im (the adjoint of im2col) into `dx`.
//!
//! Results do not depend on the number of threads: chunk sizes come from the shapes only, and
//! the weight gradient sums fixed groups of chunks in a fixed order.

use rayon::prelude::*;

use super::conv_geometry::valid_range;
pub use super::conv_geometry::Geometry;
use super::cpu_kernel::{each, matmul, sized, split_by, with_scratch, Plan, Scratch};
use super::winograd;

/// GEMM columns a chunk aims for: enough for the kernel's panels to fill.
const CHUNK_COLUMNS: usize = 256;
/// Partial weight gradients summed at the end (bounds their memory; fixed so the sum's order
/// does not depend on the thread count).
const MAX_WEIGHT_GROUPS: usize = 8;

impl Geometry {
    /// Rows of the im2col matrix, `Cin·k²`.
    fn kk(&self) -> usize {
        self.cin * self.k * self.k
    }
    /// Output positions per sample, `Ho·Wo`.
    fn l(&self) -> usize {
        self.ho * self.wo
    }
    /// A plain 1×1 stride-1 convolution: the input already is the im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
    /// Samples per chunk: one for large planes; for small ones enough to give the GEMM
    /// [`CHUNK_COLUMNS`] columns, but no fewer than four chunks a batch where it has four
    /// samples, so two threads stay busy.
    fn chunk(&self) -> usize {
        CHUNK_COLUMNS
            .div_ceil(self.l())
            .min(self.n.div_ceil(4))
            .max(1)
    }
    fn chunks(&self) -> usize {
        self.n.div_ceil(self.chunk())
    }
    /// Samples `[first, end)` of chunk `c`.
    fn chunk_samples(&self, c: usize) -> (usize, usize) {
        let nb = self.chunk();
        (c * nb, ((c + 1) * nb).min(self.n))
    }
}

/// One im2col row segment: tap `(i, j)` of channel plane `src[H·W]` into `dst[Ho·Wo]`,
/// zeros where the tap falls in the padding.
fn im2col_plane(src: &[f32], dst: &mut [f32], i: usize, j: usize, g: &Geometry) {
    let ok = valid_range(j, g);
    for oy in 0..g.ho {
        let row = &mut dst[oy * g.wo..(oy + 1) * g.wo];
        let y = (oy * g.stride + i) as isize - g.pad as isize;
        if y < 0 || y >= g.h as isize || ok.is_empty() {
            row.fill(0.0);
            continue;
        }
        row[..ok.start].fill(0.0);
        row[ok.end..].fill(0.0);
        let first = y as usize * g.w + ok.start * g.stride + j - g.pad;
        let d = &mut row[ok.clone()];
        if g.stride == 1 {
            d.copy_from_slice(&src[first..first + d.len()]);
        } else {
            d.iter_mut()
                .zip(src[first..].iter().step_by(g.stride))
                .for_each(|(d, s)| *d = *s);
        }
    }
}

/// The adjoint of [`im2col_plane`]: adds `src[Ho·Wo]` (tap `(i, j)`) into plane `dst[H·W]`.
fn col2im_plane(src: &[f32], dst: &mut [f32], i: usize, j: usize, g: &Geometry) {
    let ok = valid_range(j, g);
    if ok.is_empty() {
        return;
    }
    for oy in 0..g.ho {
        let y = (oy * g.stride + i) as isize - g.pad as isize;
        if y < 0 || y >= g.h as isize {
            continue;
        }
        let first = y as usize * g.w + ok.start * g.stride + j - g.pad;
        let s = &src[oy * g.wo + ok.start..oy * g.wo + ok.end];
        if g.stride == 1 {
            dst[first..first + s.len()]
                .iter_mut()
                .zip(s)
                .for_each(|(d, s)| *d += *s);
        } else {
            dst[first..]
                .iter_mut()
                .step_by(g.stride)
                .zip(s)
                .for_each(|(d, s)| *d += *s);
        }
    }
}

/// The im2col matrix `cols[K, nb·L]` of samples `xs[nb, Cin, H, W]`: rows ordered `(c, i, j)`
/// like the weight's `[Cout, Cin, k, k]`, the chunk's samples side by side.
fn im2col(xs: &[f32], nb: usize, g: &Geometry, cols: &mut [f32], parallel: bool) {
    let (l, plane, kk) = (g.l(), g.h * g.w, g.k * g.k);
    let fill = |r: usize, row: &mut [f32]| {
        let (c, i, j) = (r / kk, (r / g.k) % g.k, r % g.k);
        for s in 0..nb {
            let src = &xs[(s * g.cin + c) * plane..(s * g.cin + c + 1) * plane];
            if g.is_pointwise() {
                row[s * l..(s + 1) * l].copy_from_slice(src);
            } else {
                im2col_plane(src, &mut row[s * l..(s + 1) * l], i, j, g);
            }
        }
    };
    if parallel {
        cols.par_chunks_mut(nb * l)
            .enumerate()
            .for_each(|(r, row)| fill(r, row));
    } else {
        cols.chunks_mut(nb * l)
            .enumerate()
            .for_each(|(r, row)| fill(r, row));
    }
}

/// The adjoint of [`im2col`]: `dx[nb, Cin, H, W] = col2im(dcols[K, nb·L])` (overwrites `dx`).
fn col2im(dcols: &[f32], nb: usize, g: &Geometry, dx: &mut [f32], parallel: bool) {
    let (l, plane) = (g.l(), g.h * g.w);
    let fill = |sc: usize, dst: &mut [f32]| {
        let (s, c) = (sc / g.cin, sc % g.cin);
        dst.fill(0.0);
        for i in 0..g.k {
            for j in 0..g.k {
                let r = (c * g.k + i) * g.k + j;
                let src = &dcols[r * nb * l + s * l..r * nb * l + (s + 1) * l];
                if g.is_pointwise() {
                    dst.copy_from_slice(src);
                } else {
                    col2im_plane(src, dst, i, j, g);
                }
            }
        }
    };
    if parallel {
        dx.par_chunks_mut(plane)
            .enumerate()
            .for_each(|(sc, d)| fill(sc, d));
    } else {
        dx.chunks_mut(plane)
            .enumerate()
            .for_each(|(sc, d)| fill(sc, d));
    }
}

/// `[C, nb·L]` (GEMM layout) → `[nb, C, L]` (NCHW).
fn to_nchw(src: &[f32], dst: &mut [f32], nb: usize, c: usize, l: usize) {
    for (sc, d) in dst.chunks_mut(l).enumerate() {
        let (s, ci) = (sc / c, sc % c);
        d.copy_from_slice(&src[(ci * nb + s) * l..(ci * nb + s + 1) * l]);
    }
}

/// `[nb, C, L]` (NCHW) → `[C, nb·L]` (GEMM layout).
fn to_gemm_layout(src: &[f32], dst: &mut [f32], nb: usize, c: usize, l: usize) {
    for (cs, d) in dst.chunks_mut(l).enumerate() {
        let (ci, s) = (cs / nb, cs % nb);
        d.copy_from_slice(&src[(s * c + ci) * l..(s * c + ci + 1) * l]);
    }
}

/// `y[N, Cout, Ho, Wo]` of `x[N, Cin, H, W]` and `w[Cout, Cin, k, k]`.
pub fn forward(x: &[f32], w: &[f32], g: &Geometry) -> Vec<f32> {
    if winograd::applies(g) && winograd_enabled() {
        return winograd::forward(x, w, g);
    }
    forward_im2col(x, w, g)
}

/// Whether 3×3 stride-1 convolutions take [`winograd`]: only with `KD_WINOGRAD=1`. Its
/// transforms are still scalar loops, and measured end to end it is slower than im2col + GEMM
/// (CIFAR KD step 18.9 vs 23.1 img/s on 1 thread), so it stays opt-in until they are
/// vectorised.
fn winograd_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("KD_WINOGRAD").is_ok_and(|v| v == "1"))
}

/// [`forward`] as im2col + GEMM, whatever the kernel.
pub fn forward_im2col(x: &[f32], w: &[f32], g: &Geometry) -> Vec<f32> {
    let (kk, l) = (g.kk(), g.l());
    let plan = Plan::new(g.chunks());
    let mut y = vec![0f32; g.n * g.cout * l];
    let pieces = split_by(&mut y, g.chunks(), |c| {
        let (a, b) = g.chunk_samples(c);
        (b - a) * g.cout * l
    });
    each(pieces, plan.over_chunks, |c, yc| {
        let (first, end) = g.chunk_samples(c);
        let nb = end - first;
        let xs = &x[first * g.cin * g.h * g.w..end * g.cin * g.h * g.w];
        with_scratch(|s| {
            let cols: &[f32] = if g.is_pointwise() && nb == 1 {
                xs
            } else {
                let cols = sized(&mut s.cols, kk * nb * l);
                im2col(xs, nb, g, cols, plan.inner());
                cols
            };
            let shape = (g.cout, nb * l, kk);
            let (lhs, rhs) = ((kk as isize, 1), ((nb * l) as isize, 1));
            if nb == 1 {
                // One sample's output [Cout, L] already is the GEMM's layout.
                matmul(
                    shape,
                    yc,
                    (l as isize, 1),
                    false,
                    w,
                    lhs,
                    cols,
                    rhs,
                    plan.gemm(),
                );
            } else {
                let out = sized(&mut s.out, g.cout * nb * l);
                let rs = ((nb * l) as isize, 1);
                matmul(shape, out, rs, false, w, lhs, cols, rhs, plan.gemm());
                to_nchw(out, yc, nb, g.cout, l);
            }
        })
    });
    y
}

/// The gradients `(dx, dw)` of [`forward`] given `dy[N, Cout, Ho, Wo]`, each only if asked for.
pub fn backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    g: &Geometry,
    want_x: bool,
    want_w: bool,
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    if want_x && winograd::applies(g) && winograd_enabled() {
        let dx = winograd::input_grad(dy, w, g);
        let (_, dw) = backward_im2col(x, w, dy, g, false, want_w);
        return (Some(dx), dw);
    }
    backward_im2col(x, w, dy, g, want_x, want_w)
}

/// [`backward`] as im2col + GEMM, whatever the kernel.
pub fn backward_im2col(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    g: &Geometry,
    want_x: bool,
    want_w: bool,
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let (kk, l, plane) = (g.kk(), g.l(), g.h * g.w);
    let chunks = g.chunks();
    // Chunks in fixed groups; each group owns one partial weight gradient and its samples' dx.
    let groups = chunks.min(MAX_WEIGHT_GROUPS);
    let plan = Plan::new(groups);
    let group_chunks = |gi: usize| (gi * chunks / groups, (gi + 1) * chunks / groups);
    let group_samples = |gi: usize| {
        let (c0, c1) = group_chunks(gi);
        (g.chunk_samples(c0).0, g.chunk_samples(c1 - 1).1)
    };
    let mut dx = want_x.then(|| vec![0f32; g.n * g.cin * plane]);
    let mut partial = want_w.then(|| vec![0f32; groups * g.cout * kk]);
    let dx_parts: Vec<Option<&mut [f32]>> = match dx.as_deref_mut() {
        Some(d) => split_by(d, groups, |gi| {
            let (a, b) = group_samples(gi);
            (b - a) * g.cin * plane
        })
        .into_iter()
        .map(Some)
        .collect(),
        None => (0..groups).map(|_| None).collect(),
    };
    let dw_parts: Vec<Option<&mut [f32]>> = match partial.as_deref_mut() {
        Some(p) => p.chunks_mut(g.cout * kk).map(Some).collect(),
        None => (0..groups).map(|_| None).collect(),
    };
    let work: Vec<_> = dx_parts.into_iter().zip(dw_parts).collect();
    each(work, plan.over_chunks, |gi, (mut dx_g, mut dw_g)| {
        let (c0, c1) = group_chunks(gi);
        let group_first = group_samples(gi).0;
        for c in c0..c1 {
            let (first, end) = g.chunk_samples(c);
            let nb = end - first;
            let ncols = nb * l;
            with_scratch(|s| {
                let Scratch { cols, out, dcols } = s;
                // dY of the chunk as [Cout, nb·L].
                let dys = &dy[first * g.cout * l..end * g.cout * l];
                let dyc: &[f32] = if nb == 1 {
                    dys
                } else {
                    let out = sized(out, g.cout * ncols);
                    to_gemm_layout(dys, out, nb, g.cout, l);
                    out
                };
                if let Some(dw) = dw_g.as_deref_mut() {
                    let xs = &x[first * g.cin * plane..end * g.cin * plane];
                    let colsm: &[f32] = if g.is_pointwise() && nb == 1 {
                        xs
                    } else {
                        let cols = sized(cols, kk * ncols);
                        im2col(xs, nb, g, cols, plan.inner());
                        cols
                    };
                    // dW[Cout, K] (+)= dY_c[Cout, nb·L] · cols_cᵀ
                    matmul(
                        (g.cout, kk, ncols),
                        dw,
                        (kk as isize, 1),
                        c > c0,
                        dyc,
                        (ncols as isize, 1),
                        colsm,
                        (1, ncols as isize),
                        plan.gemm(),
                    );
                }
                if let Some(dxg) = dx_g.as_deref_mut() {
                    let dxc = &mut dxg[(first - group_first) * g.cin * plane
                        ..(end - group_first) * g.cin * plane];
                    // dcols[K, nb·L] = Wᵀ · dY_c
                    let shape = (kk, ncols, g.cout);
                    let wt = (1, kk as isize);
                    let rs = (ncols as isize, 1);
                    if g.is_pointwise() && nb == 1 {
                        matmul(shape, dxc, rs, false, w, wt, dyc, rs, plan.gemm());
                    } else {
                        let dcols = sized(dcols, kk * ncols);
                        matmul(shape, dcols, rs, false, w, wt, dyc, rs, plan.gemm());
                        col2im(dcols, nb, g, dxc, plan.inner());
                    }
                }
            });
        }
    });
    let dw = partial.map(|p| {
        if groups == 1 {
            return p;
        }
        let size = g.cout * kk;
        let mut dw = p[..size].to_vec();
        dw.par_chunks_mut(4096).enumerate().for_each(|(b, d)| {
            for gi in 1..groups {
                let src = &p[gi * size + b * 4096..];
                d.iter_mut().zip(src).for_each(|(d, s)| *d += *s);
            }
        });
        dw
    });
    (dx, dw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Everything the kernels compute is the same, bit for bit, on 1, 2 and 3 threads (so a
    /// run's results do not depend on the machine's core count), for a single chunk, one
    /// sample per chunk and several samples per chunk.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        for (dims, cout, k, stride, pad) in [
            ([1, 3, 9, 9], 4, 3, 1, 1),
            ([6, 3, 20, 20], 5, 3, 2, 1),
            ([37, 4, 5, 5], 6, 3, 1, 1),
            ([37, 4, 5, 5], 6, 1, 1, 0),
        ] {
            let g = Geometry::new(dims, cout, k, stride, pad);
            let x = pseudo_random(dims.iter().product(), 1);
            let w = pseudo_random(cout * dims[1] * k * k, 2);
            let dy = pseudo_random(g.n * cout * g.ho * g.wo, 3);
            let run = |threads: usize| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| (forward(&x, &w, &g), backward(&x, &w, &dy, &g, true, true)))
            };
            let one = run(1);
            for threads in [2, 3] {
                assert!(
                    run(threads) == one,
                    "{dims:?} k{k}: {threads} threads differ from 1"
                );
            }
        }
    }

    fn wave(len: usize, f: f32) -> Vec<f32> {
        (0..len).map(|i| (i as f32 * f).sin()).collect()
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = a.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs() / scale))
    }

    /// Output and input gradient equal the im2col path's to 1e-4 of their scale, on odd and
    /// even sizes (partial tiles at the edge), one sample and several per chunk.
    #[test]
    fn winograd_matches_im2col_convolution() {
        for dims in [
            [2, 3, 7, 7],
            [1, 4, 8, 5],
            [9, 5, 4, 4],
            [40, 3, 3, 6],
            [3, 2, 1, 1],
        ] {
            let cout = 6;
            let g = Geometry::new(dims, cout, 3, 1, 1);
            let x = wave(dims.iter().product(), 0.37);
            let w = wave(cout * dims[1] * 9, 0.71);
            let dy = wave(g.n * cout * g.ho * g.wo, 0.23);
            let d = max_rel(&forward_im2col(&x, &w, &g), &winograd::forward(&x, &w, &g));
            assert!(d < 1e-4, "{dims:?} y: {d}");
            let want = backward_im2col(&x, &w, &dy, &g, true, false).0.unwrap();
            let d = max_rel(&want, &winograd::input_grad(&dy, &w, &g));
            assert!(d < 1e-4, "{dims:?} dx: {d}");
        }
    }
}
