//! Winograd's minimal filtering F(2×2, 3×3) for the 3×3, stride-1, pad-1 convolutions that
//! hold most of a ResNet's FLOPs (Lavin & Gray, "Fast Algorithms for Convolutional Neural
//! Networks", 2016): each 2×2 output tile costs 16 multiplies per (input, output) channel pair
//! instead of 36, i.e. 2.25× fewer, done as 16 GEMMs.
//!
//! With `d` a 4×4 input tile (stride 2 between tiles, zero outside the image) and `g` a 3×3
//! filter, the 2×2 output tile of the cross-correlation is `Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A`,
//! `Bᵀ = [[1,0,−1,0],[0,1,1,0],[0,−1,1,0],[0,1,0,−1]]`, `G = [[1,0,0],[½,½,½],[½,−½,½],[0,0,1]]`,
//! `Aᵀ = [[1,1,1,0],[0,1,−1,−1]]`. Summed over input channels, position ξ of the 4×4 transform
//! is a matrix product `M[ξ] (Cout×P) = U[ξ] (Cout×Cin) · V[ξ] (Cin×P)` over the P tiles.
//! The input gradient of such a convolution is the same convolution of `dy` with the filters
//! rotated 180° and input/output channels swapped, so it takes this path too; the weight
//! gradient stays im2col + GEMM.
//!
//! Error: the transforms only add, subtract and halve (exact in binary but for rounding of
//! sums of up to 9 terms), so results differ from the direct convolution by rounding only;
//! tests bound it at 1e-4 relative to the output's scale (seen: ~1e-6).

use super::conv_geometry::Geometry;
use super::cpu_kernel::{each, matmul, sized, split_by, with_scratch, Plan};

/// Whether `g` is a convolution this module computes.
pub fn applies(g: &Geometry) -> bool {
    g.k == 3 && g.stride == 1 && g.pad == 1
}

/// Tiles a chunk of samples aims for, so the 16 GEMMs have enough columns.
const CHUNK_TILES: usize = 256;

/// `U[16, Cout, Cin] = G g Gᵀ` for every filter of `w[Cout, Cin, 3, 3]`.
fn transform_weights(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * cout * cin];
    for co in 0..cout {
        for ci in 0..cin {
            let g = &w[(co * cin + ci) * 9..(co * cin + ci + 1) * 9];
            // t = G g (4×3), then t Gᵀ (4×4).
            let mut t = [[0f32; 3]; 4];
            for j in 0..3 {
                let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
                t[0][j] = a;
                t[1][j] = 0.5 * (a + b + c);
                t[2][j] = 0.5 * (a - b + c);
                t[3][j] = c;
            }
            for (i, row) in t.iter().enumerate() {
                let [a, b, c] = *row;
                let out = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                for (j, v) in out.into_iter().enumerate() {
                    u[((i * 4 + j) * cout + co) * cin + ci] = v;
                }
            }
        }
    }
    u
}

/// `w[Cout, Cin, 3, 3]` → `w'[Cin, Cout, 3, 3]` with `w'[i][o] = rot180(w[o][i])`.
fn rotate_swap(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut r = vec![0f32; w.len()];
    for co in 0..cout {
        for ci in 0..cin {
            for t in 0..9 {
                r[(ci * cout + co) * 9 + t] = w[(co * cin + ci) * 9 + 8 - t];
            }
        }
    }
    r
}

/// `y[N, Cout, H, W]` of `x[N, Cin, H, W]` and `w[Cout, Cin, 3, 3]` (stride 1, pad 1).
pub fn forward(x: &[f32], w: &[f32], g: &Geometry) -> Vec<f32> {
    debug_assert!(applies(g));
    let u = transform_weights(w, g.cout, g.cin);
    let (h, wd, plane) = (g.h, g.w, g.h * g.w);
    let (ty, tx) = (h.div_ceil(2), wd.div_ceil(2));
    let tiles = ty * tx;
    let nb = CHUNK_TILES.div_ceil(tiles).min(g.n.div_ceil(4)).max(1);
    let chunks = g.n.div_ceil(nb);
    let plan = Plan::new(chunks);
    let mut y = vec![0f32; g.n * g.cout * plane];
    let pieces = split_by(&mut y, chunks, |c| {
        (((c + 1) * nb).min(g.n) - c * nb) * g.cout * plane
    });
    each(pieces, plan.over_chunks, |c, yc| {
        let first = c * nb;
        let count = ((c + 1) * nb).min(g.n) - first;
        let p = count * tiles;
        with_scratch(|s| {
            let v = sized(&mut s.cols, 16 * g.cin * p);
            // V[ξ, c, tile] = Bᵀ d B
            for si in 0..count {
                for ci in 0..g.cin {
                    let src = &x[((first + si) * g.cin + ci) * plane..][..plane];
                    for t_y in 0..ty {
                        for t_x in 0..tx {
                            let mut d = [[0f32; 4]; 4];
                            for (i, row) in d.iter_mut().enumerate() {
                                let yy = (2 * t_y + i) as isize - 1;
                                if yy < 0 || yy >= h as isize {
                                    continue;
                                }
                                for (j, v) in row.iter_mut().enumerate() {
                                    let xx = (2 * t_x + j) as isize - 1;
                                    if xx >= 0 && xx < wd as isize {
                                        *v = src[yy as usize * wd + xx as usize];
                                    }
                                }
                            }
                            let mut r = [[0f32; 4]; 4];
                            for j in 0..4 {
                                r[0][j] = d[0][j] - d[2][j];
                                r[1][j] = d[1][j] + d[2][j];
                                r[2][j] = d[2][j] - d[1][j];
                                r[3][j] = d[1][j] - d[3][j];
                            }
                            let tile = si * tiles + t_y * tx + t_x;
                            for (i, rr) in r.iter().enumerate() {
                                let out =
                                    [rr[0] - rr[2], rr[1] + rr[2], rr[2] - rr[1], rr[1] - rr[3]];
                                for (j, val) in out.into_iter().enumerate() {
                                    v[((i * 4 + j) * g.cin + ci) * p + tile] = val;
                                }
                            }
                        }
                    }
                }
            }
            // M[ξ] = U[ξ] · V[ξ]
            let m = sized(&mut s.out, 16 * g.cout * p);
            for xi in 0..16 {
                matmul(
                    (g.cout, p, g.cin),
                    &mut m[xi * g.cout * p..(xi + 1) * g.cout * p],
                    (p as isize, 1),
                    false,
                    &u[xi * g.cout * g.cin..(xi + 1) * g.cout * g.cin],
                    (g.cin as isize, 1),
                    &v[xi * g.cin * p..(xi + 1) * g.cin * p],
                    (p as isize, 1),
                    plan.gemm(),
                );
            }
            // Y = Aᵀ M A, clipped at the image's edge.
            let at = |k: usize, co: usize, tile: usize| m[(k * g.cout + co) * p + tile];
            for si in 0..count {
                for co in 0..g.cout {
                    let dst = &mut yc[(si * g.cout + co) * plane..][..plane];
                    for t_y in 0..ty {
                        for t_x in 0..tx {
                            let tile = si * tiles + t_y * tx + t_x;
                            // Aᵀ M: rows 0..4 of column j are M[j], M[4+j], M[8+j], M[12+j].
                            let m = |i: usize, j: usize| at(4 * i + j, co, tile);
                            let a = [
                                std::array::from_fn::<f32, 4, _>(|j| m(0, j) + m(1, j) + m(2, j)),
                                std::array::from_fn::<f32, 4, _>(|j| m(1, j) - m(2, j) - m(3, j)),
                            ];
                            for (i, ar) in a.iter().enumerate() {
                                let yy = 2 * t_y + i;
                                if yy >= h {
                                    continue;
                                }
                                let out = [ar[0] + ar[1] + ar[2], ar[1] - ar[2] - ar[3]];
                                for (j, val) in out.into_iter().enumerate() {
                                    let xx = 2 * t_x + j;
                                    if xx < wd {
                                        dst[yy * wd + xx] = val;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        })
    });
    y
}

/// The input gradient `dx[N, Cin, H, W]` of [`forward`] given `dy[N, Cout, H, W]`.
pub fn input_grad(dy: &[f32], w: &[f32], g: &Geometry) -> Vec<f32> {
    let rotated = rotate_swap(w, g.cout, g.cin);
    let swapped = Geometry::new([g.n, g.cout, g.h, g.w], g.cin, 3, 1, 1);
    forward(dy, &rotated, &swapped)
}
