//! A direct depthwise convolution and its gradients on the CPU (the `k`×`k` per-channel
//! convolutions of PP-LCNet and MobileNetV3).
//!
//! A depthwise layer does `k²` multiply-adds per output value, too few for im2col + GEMM to pay:
//! burn's grouped convolution took ~10× its forward time for the backward. Here every channel
//! plane is one task: for each output row and kernel tap, one row of the input, shifted,
//! is multiplied by the tap's weight and added to the output row (stride 1: contiguous, so the
//! compiler vectorises it). The input gradient is the same loop with the roles swapped, and the
//! weight gradient a dot product per tap; both read and write only their own plane.
//!
//! Shapes: `x[N, C, H, W]`, `w[C, 1, k, k]`, `y[N, C, Ho, Wo]`, contiguous f32. Results do not
//! depend on the number of threads: the per-plane weight gradients are summed over the batch in
//! sample order.

use rayon::prelude::*;

use super::conv_geometry::{valid_range, Geometry};

/// Input row feeding output row `oy` through kernel row `i`, if inside the image.
fn input_row(oy: usize, i: usize, g: &Geometry) -> Option<usize> {
    let y = oy * g.stride + i;
    (y >= g.pad && y - g.pad < g.h).then(|| y - g.pad)
}

/// `y[N, C, Ho, Wo]` of `x[N, C, H, W]` and `w[C, 1, k, k]`.
pub fn forward(x: &[f32], w: &[f32], g: &Geometry) -> Vec<f32> {
    let (plane, out_plane, kk) = (g.h * g.w, g.ho * g.wo, g.k * g.k);
    let ranges: Vec<_> = (0..g.k).map(|j| valid_range(j, g)).collect();
    let mut y = vec![0f32; g.n * g.cin * out_plane];
    y.par_chunks_mut(out_plane)
        .enumerate()
        .for_each(|(nc, out)| {
            let c = nc % g.cin;
            let src = &x[nc * plane..(nc + 1) * plane];
            let taps = &w[c * kk..(c + 1) * kk];
            for (oy, out_row) in out.chunks_mut(g.wo).enumerate() {
                for i in 0..g.k {
                    let Some(iy) = input_row(oy, i, g) else {
                        continue;
                    };
                    let in_row = &src[iy * g.w..(iy + 1) * g.w];
                    for (j, ok) in ranges.iter().enumerate() {
                        if ok.is_empty() {
                            continue;
                        }
                        let t = taps[i * g.k + j];
                        let first = ok.start * g.stride + j - g.pad;
                        let o = &mut out_row[ok.clone()];
                        if g.stride == 1 {
                            let len = o.len();
                            o.iter_mut()
                                .zip(&in_row[first..first + len])
                                .for_each(|(o, v)| *o += t * v);
                        } else {
                            o.iter_mut()
                                .zip(in_row[first..].iter().step_by(g.stride))
                                .for_each(|(o, v)| *o += t * v);
                        }
                    }
                }
            }
        });
    y
}

/// The gradients `(dx, dw)` of [`forward`] given `dy[N, C, Ho, Wo]`, each only if asked for.
pub fn backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    g: &Geometry,
    want_x: bool,
    want_w: bool,
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let (plane, out_plane, kk) = (g.h * g.w, g.ho * g.wo, g.k * g.k);
    let ranges: Vec<_> = (0..g.k).map(|j| valid_range(j, g)).collect();
    let planes = g.n * g.cin;
    let mut dx = want_x.then(|| vec![0f32; planes * plane]);
    // The weight gradient of each (sample, channel) plane, summed over samples below.
    let mut per_plane = want_w.then(|| vec![0f32; planes * kk]);
    let dx_parts: Vec<Option<&mut [f32]>> = match dx.as_deref_mut() {
        Some(d) => d.chunks_mut(plane).map(Some).collect(),
        None => (0..planes).map(|_| None).collect(),
    };
    let dw_parts: Vec<Option<&mut [f32]>> = match per_plane.as_deref_mut() {
        Some(d) => d.chunks_mut(kk).map(Some).collect(),
        None => (0..planes).map(|_| None).collect(),
    };
    dx_parts
        .into_par_iter()
        .zip(dw_parts)
        .enumerate()
        .for_each(|(nc, (mut dx_p, mut dw_p))| {
            let c = nc % g.cin;
            let src = &x[nc * plane..(nc + 1) * plane];
            let grad = &dy[nc * out_plane..(nc + 1) * out_plane];
            let taps = &w[c * kk..(c + 1) * kk];
            for (oy, g_row) in grad.chunks(g.wo).enumerate() {
                for i in 0..g.k {
                    let Some(iy) = input_row(oy, i, g) else {
                        continue;
                    };
                    let row = iy * g.w..(iy + 1) * g.w;
                    for (j, ok) in ranges.iter().enumerate() {
                        if ok.is_empty() {
                            continue;
                        }
                        let first = ok.start * g.stride + j - g.pad;
                        let gr = &g_row[ok.clone()];
                        if let Some(dw) = dw_p.as_deref_mut() {
                            let in_row = &src[row.clone()];
                            dw[i * g.k + j] += if g.stride == 1 {
                                dot(gr, &in_row[first..first + gr.len()])
                            } else {
                                gr.iter()
                                    .zip(in_row[first..].iter().step_by(g.stride))
                                    .map(|(a, b)| a * b)
                                    .sum()
                            };
                        }
                        if let Some(dx) = dx_p.as_deref_mut() {
                            let t = taps[i * g.k + j];
                            let dx_row = &mut dx[row.clone()];
                            if g.stride == 1 {
                                dx_row[first..first + gr.len()]
                                    .iter_mut()
                                    .zip(gr)
                                    .for_each(|(d, v)| *d += t * v);
                            } else {
                                dx_row[first..]
                                    .iter_mut()
                                    .step_by(g.stride)
                                    .zip(gr)
                                    .for_each(|(d, v)| *d += t * v);
                            }
                        }
                    }
                }
            }
        });
    let dw = per_plane.map(|p| {
        let mut dw = vec![0f32; g.cin * kk];
        dw.par_chunks_mut(kk).enumerate().for_each(|(c, d)| {
            for n in 0..g.n {
                let src = &p[(n * g.cin + c) * kk..(n * g.cin + c + 1) * kk];
                d.iter_mut().zip(src).for_each(|(d, s)| *d += *s);
            }
        });
        dw
    });
    (dx, dw)
}

/// A dot product in eight independent lanes, so the compiler can vectorise the sum (a plain
/// `.sum()` of floats must keep its order and stays scalar).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same bits on 1 and 3 threads (values against burn's grouped convolution are checked in
    /// `cpu_conv`'s tests).
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let g = Geometry::new([5, 3, 9, 9], 3, 3, 2, 1);
        let x: Vec<f32> = (0..5 * 3 * 81).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..27).map(|i| (i as f32 * 0.11).cos()).collect();
        let dy: Vec<f32> = (0..5 * 3 * 25).map(|i| (i as f32 * 0.23).sin()).collect();
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| (forward(&x, &w, &g), backward(&x, &w, &dy, &g, true, true)))
        };
        assert!(run(1) == run(3));
    }
}
