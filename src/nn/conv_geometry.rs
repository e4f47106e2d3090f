//! The geometry of a square-kernel convolution with symmetric zero padding, shared by the CPU
//! kernels ([`super::gemm_conv`], [`super::depthwise_conv`]).

/// Shapes of `x[N, Cin, H, W]` convolved into `y[N, Cout, Ho, Wo]` by a `k`×`k` kernel.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Geometry {
    pub fn new(
        [n, cin, h, w]: [usize; 4],
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Self {
        let ho = (h + 2 * pad - k) / stride + 1;
        let wo = (w + 2 * pad - k) / stride + 1;
        Geometry {
            n,
            cin,
            h,
            w,
            cout,
            k,
            stride,
            pad,
            ho,
            wo,
        }
    }
}

/// Output columns `ox` whose input column `ox·stride + j − pad` lies inside `[0, w)`.
pub fn valid_range(j: usize, g: &Geometry) -> std::ops::Range<usize> {
    let lo = g.pad.saturating_sub(j).div_ceil(g.stride);
    let hi = if g.w + g.pad > j {
        ((g.w + g.pad - j - 1) / g.stride + 1).min(g.wo)
    } else {
        0
    };
    lo..hi.max(lo)
}
