//! The ops of small CNNs (the demo classifier, a detector's backbone) on edgevlm's kernels:
//! f32 2-D convolutions, 8-bit ones whose sums are exact in f32, max pools, Relus and the
//! sums / maximums of global pools.
//!
//! tract 0.23.9 lowers an f32 `Conv` to an `Im2col` of the whole image (or, with every shape
//! known, a lazy im2col) and its matrix kernel, leaves a `MaxPool` over a symbolic batch on a
//! generic pool that rebuilds its geometry on every run, and folds a `Reduce` element by
//! element. On the demo classifier (64x64 px, four 3x3 convolutions, three 2x2 pools) that
//! was 0.46 ms a frame where ONNX Runtime takes 0.12: `Im2col` 0.18 ms, `MaxPool` 0.15, the
//! products 0.12.
//!
//! [`F32Conv`] computes 8 output channels by 32 positions at a time, started from the bias,
//! a following `Relu` applied at the store. On AVX-512 a convolution of stride 1 or 2 along
//! the width reads each tap's 16 positions of an output row in place from a zero-padded copy
//! of the image (`conv_tile`); elsewhere it copies the 32 positions' taps into an L1 panel
//! and runs [`crate::q4mm`]'s FMA tile. [`integer_convs_in_f32`] puts a `ConvInteger` on it
//! where that gives the same integers. [`F32MaxPool`] resolves its window at load,
//! [`AxesReduce`] adds rows into an accumulator row, [`Relu`] takes the `max(x, 0)`s tract's
//! optimizer leaves on its generic broadcast. `docs/tract-slow-paths.md`, section 30, has
//! the measurements.

// Elsewhere than x86_64 the convolution kernel is compiled out and the op never created
// (the rewrite checks the CPU first), which leaves its plumbing unused there.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, MaxPool, PoolSpec};
use tract_onnx::tract_core::ops::math::Max;
use tract_onnx::tract_core::ops::nn::DataFormat;

use crate::q4mm::{F32Kernel, NR};

/// From this many multiply-adds a convolution splits over the plan's threads (~6 µs on one
/// core): its units are independent rows of output positions that share the weight from
/// L1 / L2, so it gains from a second core far below [`crate::team`]'s threshold for
/// products, whose weights stream from memory.
const SPLIT_MACS: usize = 1 << 19;

/// Where a 2-D window (a convolution's kernel or a pool's) reads an NCHW image of known
/// channels, height and width: resolved once at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// Input channels.
    pub c: usize,
    /// Input height and width.
    pub hw: (usize, usize),
    /// Kernel height and width.
    pub kernel: (usize, usize),
    /// Strides along height and width.
    pub strides: (usize, usize),
    /// Dilations along height and width.
    pub dilations: (usize, usize),
    /// Padding before the first row and column.
    pub before: (usize, usize),
    /// Output height and width.
    pub out: (usize, usize),
}

impl Window {
    /// The window of `spec` over an NCHW input of fact `input`, if its channels, height and
    /// width are known and it is two-dimensional.
    fn of(spec: &PoolSpec, input: &TypedFact) -> Option<Window> {
        if spec.data_format != DataFormat::NCHW || spec.kernel_shape.len() != 2 || input.rank() != 4
        {
            return None;
        }
        let dims: Vec<usize> = (1..4)
            .map(|a| input.shape[a].to_usize().ok())
            .collect::<Option<_>>()?;
        let (c, h, w) = (dims[0], dims[1], dims[2]);
        let padded = spec.computed_padding(&[h, w]);
        let (s, d) = (spec.strides(), spec.dilations());
        let window = Window {
            c,
            hw: (h, w),
            kernel: (spec.kernel_shape[0], spec.kernel_shape[1]),
            strides: (s[0], s[1]),
            dilations: (d[0], d[1]),
            before: (padded[0].pad_before, padded[1].pad_before),
            out: (padded[0].convoluted, padded[1].convoluted),
        };
        let sane = c == spec.input_channels
            && window.out.0 > 0
            && window.out.1 > 0
            && [s[0], s[1], d[0], d[1]].iter().all(|v| *v > 0);
        sane.then_some(window)
    }

    /// Taps per output value: `c * kh * kw`.
    fn taps(&self) -> usize {
        self.c * self.kernel.0 * self.kernel.1
    }

    /// Output positions per channel.
    fn positions(&self) -> usize {
        self.out.0 * self.out.1
    }

    /// Height and width of the zero-padded image every tap of every position reads inside.
    fn padded(&self) -> (usize, usize) {
        let reach = |out: usize, s: usize, k: usize, d: usize| (out - 1) * s + (k - 1) * d + 1;
        (
            reach(self.out.0, self.strides.0, self.kernel.0, self.dilations.0)
                .max(self.before.0 + self.hw.0),
            reach(self.out.1, self.strides.1, self.kernel.1, self.dilations.1)
                .max(self.before.1 + self.hw.1),
        )
    }

    /// `f(images, n, output)` on the `n` images of `x`, an NCHW input of `T`s of the shape
    /// this window was built for, and a zeroed f32 `[n, channels, oh, ow]` output, which it
    /// returns.
    fn eval<T: Datum>(
        &self,
        op: &str,
        x: &TValue,
        channels: usize,
        f: impl FnOnce(&[T], usize, &mut [f32]) -> TractResult<()>,
    ) -> TractResult<TVec<TValue>> {
        let x = x.to_plain_array_view::<T>()?;
        ensure!(
            x.shape()[1..] == [self.c, self.hw.0, self.hw.1],
            "{op} built for [n, {}, {}, {}], given {:?}",
            self.c,
            self.hw.0,
            self.hw.1,
            x.shape()
        );
        let n = x.shape()[0];
        let x = x
            .as_slice()
            .with_context(|| format!("{op}'s input is not contiguous"))?;
        let mut out = Tensor::zero::<f32>(&[n, channels, self.out.0, self.out.1])?;
        {
            let mut plain = out.try_as_plain_ram_mut()?;
            f(x, n, plain.as_slice_mut::<f32>()?)?;
        }
        Ok(tvec!(out.into_tvalue()))
    }

    /// The output fact for `input`'s batch and `channels` output channels.
    fn output_fact(&self, input: &TypedFact, channels: usize) -> TypedFact {
        f32::fact([
            input.shape[0].clone(),
            channels.to_dim(),
            self.out.0.to_dim(),
            self.out.1.to_dim(),
        ])
    }
}

/// An NCHW 2-D convolution with a constant f32 kernel and bias, one group, on the FMA tile
/// of [`crate::q4mm::f32_kernel`]: see the module's description. Its input is f32, or 8-bit
/// (u8 or i8) with a second input, a zero point that is subtracted as the image is padded
/// (what [`integer_convs_in_f32`] builds). The output is f32.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct F32Conv {
    /// The kernel's window over the input.
    pub window: Window,
    /// Output channels.
    pub o: usize,
    /// The kernel, `[o, c * kh * kw]` in ONNX's OIHW order.
    pub weight: Arc<Tensor>,
    /// One bias per output channel.
    pub bias: Arc<Tensor>,
    /// A `Relu` (`max(x, 0)`) folded in after the bias.
    pub relu: bool,
}

impl Op for F32Conv {
    fn name(&self) -> StaticName {
        "EdgevlmConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let w = &self.window;
        Ok(vec![format!(
            "{}x{} kernel, {} -> {} channels, strides {:?}, dilations {:?}, padding {:?}{}",
            w.kernel.0,
            w.kernel.1,
            w.c,
            self.o,
            w.strides,
            w.dilations,
            w.before,
            if self.relu { ", relu" } else { "" }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for F32Conv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let Some(kernel) = crate::q4mm::f32_kernel() else {
            bail!("EdgevlmConv needs an FMA tile, which this CPU lacks");
        };
        let (w, x) = (&self.window, &inputs[0]);
        let name = "EdgevlmConv";
        let dt = x.datum_type();
        if dt == f32::datum_type() {
            return w.eval(name, x, self.o, |x, n, out| {
                self.run(kernel, Pixels::F32(x), n, out)
            });
        }
        let x0 = inputs
            .get(1)
            .with_context(|| format!("{name}: an 8-bit input needs its zero point"))?
            .cast_to_scalar::<f32>()?;
        if dt == u8::datum_type() {
            w.eval(name, x, self.o, |x, n, out| {
                self.run(kernel, Pixels::U8(x, x0), n, out)
            })
        } else if dt == i8::datum_type() {
            w.eval(name, x, self.o, |x, n, out| {
                self.run(kernel, Pixels::I8(x, x0), n, out)
            })
        } else {
            bail!("{name}: input of {dt:?}")
        }
    }
}

/// A convolution's input images: f32, or 8-bit with the zero point to subtract.
#[derive(Clone, Copy)]
enum Pixels<'a> {
    F32(&'a [f32]),
    U8(&'a [u8], f32),
    I8(&'a [i8], f32),
}

impl Pixels<'_> {
    /// Values `at..at + dst.len()` into `dst`, less the zero point.
    #[inline(always)]
    fn copy(self, at: usize, dst: &mut [f32]) {
        let len = dst.len();
        match self {
            Pixels::F32(x) => dst.copy_from_slice(&x[at..at + len]),
            Pixels::U8(x, x0) => {
                for (d, s) in dst.iter_mut().zip(&x[at..at + len]) {
                    *d = *s as f32 - x0;
                }
            }
            Pixels::I8(x, x0) => {
                for (d, s) in dst.iter_mut().zip(&x[at..at + len]) {
                    *d = *s as f32 - x0;
                }
            }
        }
    }
}

impl TypedOp for F32Conv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.window.output_fact(inputs[0], self.o)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let per_image = self.o * self.window.taps() * self.window.positions();
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            inputs[0].shape[0].clone() * per_image
        )))
    }

    as_op!();
}

impl F32Conv {
    /// The convolution of the `n` images in `x` into `out` (`[n, o, oh, ow]`), on `kernel`.
    #[cfg(not(target_arch = "x86_64"))]
    fn run(&self, kernel: F32Kernel, x: Pixels, n: usize, out: &mut [f32]) -> TractResult<()> {
        let _ = (kernel, x, n, out);
        bail!("EdgevlmConv runs on x86_64 only (f32_kernel is none elsewhere)")
    }

    /// The convolution of the `n` images in `x` into `out` (`[n, o, oh, ow]`), on `kernel`.
    #[cfg(target_arch = "x86_64")]
    fn run(&self, kernel: F32Kernel, x: Pixels, n: usize, out: &mut [f32]) -> TractResult<()> {
        let w = &self.window;
        let (taps, positions) = (w.taps(), w.positions());
        let weight = self.weight.try_as_plain_ram()?.as_slice::<f32>()?;
        let bias = self.bias.try_as_plain_ram()?.as_slice::<f32>()?;
        let (ph, pw) = w.padded();
        let plane = ph * pw;
        // On AVX-512 a convolution of stride 1 or 2 along the width reads its taps in place,
        // 16 positions of a row per register (narrower rows would leave most lanes idle).
        let direct = kernel == F32Kernel::Avx512 && [1, 2].contains(&w.strides.1) && w.out.1 >= 16;
        // The images, zero-padded, side by side: each panel's taps are then plain copies
        // (or, direct, rows the tile reads in place; it loads 16 positions' worth of columns,
        // 32 at stride 2, however few it keeps, so the last row's may run up to 31 floats
        // past the image).
        let mut padded = vec![0f32; n * w.c * plane + if direct { NR } else { 0 }];
        // Compiled for AVX-512 / AVX2: an 8-bit input's conversions then take 16 / 8 values
        // at a time.
        crate::quant::wide(|| {
            for (img, dst) in padded.chunks_exact_mut(plane).take(n * w.c).enumerate() {
                for row in 0..w.hw.0 {
                    let at = (row + w.before.0) * pw + w.before.1;
                    x.copy((img * w.hw.0 + row) * w.hw.1, &mut dst[at..at + w.hw.1]);
                }
            }
        });
        let out_at = out.as_mut_ptr() as usize;
        let macs = n * self.o * taps * positions;
        let threads = if macs >= SPLIT_MACS {
            crate::team::threads()
        } else {
            1
        };
        if direct {
            // Where tap (ci, ky, kx) of an output position is, from the position's tap (0, 0, 0).
            let mut offsets = Vec::with_capacity(taps);
            for ci in 0..w.c {
                for ky in 0..w.kernel.0 {
                    for kx in 0..w.kernel.1 {
                        offsets.push(ci * plane + ky * w.dilations.0 * pw + kx * w.dilations.1);
                    }
                }
            }
            // Each output row in chunks of up to 16 positions (one register), two chunks per
            // unit: consecutive chunks of a row, or of two rows when the rows are 16 wide.
            let per_row = w.out.1.div_ceil(16);
            let chunks = w.out.0 * per_row;
            let pairs = chunks.div_ceil(2);
            crate::team::for_each_run(n * pairs, threads, |range| {
                for unit in range {
                    let img = unit / pairs;
                    // (input origin, output offset, positions) of chunk j of image img; a
                    // missing second chunk reads the first's inputs and stores nothing.
                    let chunk = |j: usize| {
                        let (oy, ox) = (j / per_row, j % per_row * 16);
                        (
                            img * w.c * plane + oy * w.strides.0 * pw + ox * w.strides.1,
                            (img * self.o) * positions + oy * w.out.1 + ox,
                            16.min(w.out.1 - ox),
                        )
                    };
                    let first = chunk(unit % pairs * 2);
                    let second = if unit % pairs * 2 + 1 < chunks {
                        chunk(unit % pairs * 2 + 1)
                    } else {
                        (first.0, first.1, 0)
                    };
                    for o0 in (0..self.o).step_by(8) {
                        // SAFETY: AVX-512 (`direct`); rows o0.. of the weight and bias exist;
                        // every tap's 16 or 32 loads per chunk lie inside `padded` (its slack
                        // above); the chunks' positions of rows o0.. of image img's output
                        // are this unit's alone.
                        unsafe {
                            let (p, c) = (padded.as_ptr(), out_at as *mut f32);
                            let tile = ConvTile {
                                a: weight.as_ptr().add(o0 * taps),
                                offsets: &offsets,
                                origins: [p.add(first.0), p.add(second.0)],
                                bias: bias.as_ptr().add(o0),
                                relu: self.relu,
                                c: [
                                    c.add(first.1 + o0 * positions),
                                    c.add(second.1 + o0 * positions),
                                ],
                                ldc: positions,
                                cols: [first.2, second.2],
                            };
                            conv_tile_rows(8.min(self.o - o0), w.strides.1, &tile);
                        }
                    }
                }
            });
            return Ok(());
        }
        let panels = positions.div_ceil(NR);
        let units = n * panels;
        crate::team::for_each_run(units, threads, |range| {
            let mut panel = vec![0f32; taps * NR];
            let mut segments = Vec::with_capacity(NR + 1);
            for unit in range {
                let (img, p) = (unit / panels, unit % panels);
                let first = p * NR;
                let cols = NR.min(positions - first);
                let image = &padded[img * w.c * plane..][..w.c * plane];
                // Compiled for AVX-512 / AVX2: its copies then move 32 bytes at a time.
                crate::quant::wide(|| self.gather(image, first, cols, &mut segments, &mut panel));
                // SAFETY: columns first..first + cols of every channel of image img are
                // this unit's alone; the output holds n * o * positions values.
                let c = unsafe { (out_at as *mut f32).add(img * self.o * positions + first) };
                for o0 in (0..self.o).step_by(kernel.tile().0) {
                    let rows = kernel.tile().0.min(self.o - o0);
                    // SAFETY: kernel runs on this CPU (the caller's); rows o0..o0 + rows of
                    // the weight hold `taps` values each; the panel holds taps * 32; rows
                    // o0.. of the output hold `positions` values, `cols` of them from `first`.
                    unsafe {
                        let tile = crate::q4mm::FmaTile {
                            a: weight.as_ptr().add(o0 * taps),
                            lda: taps,
                            b: panel.as_ptr(),
                            k: taps,
                            scale: 1.0,
                            c: c.add(o0 * positions),
                            ldc: positions,
                            cols,
                            accumulate: false,
                            prefetch: std::ptr::null(),
                        };
                        crate::q4mm::fma_tile_rows(kernel, rows, &tile);
                    }
                    for (r, b) in bias.iter().enumerate().skip(o0).take(rows) {
                        // SAFETY: as above; this unit's columns of row r.
                        let ys =
                            unsafe { std::slice::from_raw_parts_mut(c.add(r * positions), cols) };
                        let b = *b;
                        if self.relu {
                            ys.iter_mut().for_each(|y| *y = (*y + b).max(0.0));
                        } else {
                            ys.iter_mut().for_each(|y| *y += b);
                        }
                    }
                }
            }
        });
        Ok(())
    }

    /// Copies the taps of output positions `first..first + cols` of one zero-padded image
    /// into `panel` (`[taps, 32]`; columns past `cols` keep what they held).
    #[inline(always)]
    fn gather(
        &self,
        image: &[f32],
        first: usize,
        cols: usize,
        segments: &mut Vec<(usize, usize, usize)>,
        panel: &mut [f32],
    ) {
        let w = &self.window;
        let (ph, pw) = w.padded();
        // The panel's positions as runs along one output row: (panel column, offset of the
        // run's first tap (0, 0) in the padded image, length).
        segments.clear();
        let mut q = first;
        while q < first + cols {
            let (oy, ox) = (q / w.out.1, q % w.out.1);
            let len = (w.out.1 - ox).min(first + cols - q);
            segments.push((q - first, oy * w.strides.0 * pw + ox * w.strides.1, len));
            q += len;
        }
        let (kh, kw) = w.kernel;
        let sw = w.strides.1;
        for ci in 0..w.c {
            for ky in 0..kh {
                for kx in 0..kw {
                    let tap = (ci * kh + ky) * kw + kx;
                    let row = &mut panel[tap * NR..][..NR];
                    let base = ci * ph * pw + ky * w.dilations.0 * pw + kx * w.dilations.1;
                    for &(col, at, len) in segments.iter() {
                        let src = &image[base + at..];
                        let dst = &mut row[col..col + len];
                        if sw == 1 {
                            copy_short(dst, &src[..len]);
                        } else {
                            for (d, s) in dst.iter_mut().zip(src.iter().step_by(sw)) {
                                *d = *s;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `v` if it is greater than `m`, else `m`: one `maxps` lane (NaN in `v` loses).
#[inline(always)]
fn greater(v: f32, m: f32) -> f32 {
    if v > m {
        v
    } else {
        m
    }
}

/// `ys[i]` = the maximum of `xs[i * S..(i + 1) * S]`, with `S` known to the compiler so the
/// loop runs on vector shuffles instead of a scalar loop per window.
fn max_of_tiles<const S: usize>(xs: &[f32], ys: &mut [f32]) {
    for (y, window) in ys.iter_mut().zip(xs.chunks_exact(S)) {
        let window: &[f32; S] = window.try_into().unwrap();
        *y = window.iter().fold(f32::NEG_INFINITY, |m, v| greater(*v, m));
    }
}

/// `dst.copy_from_slice(src)` for the few floats of a panel's row segment (at most 32) in
/// copies of 8 the compiler inlines: `copy_from_slice` of a length known only at run time
/// is a `memcpy` call, ~3,500 of them per frame in the demo's first convolution.
#[inline(always)]
fn copy_short(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.chunks_exact_mut(8).zip(src.chunks_exact(8)) {
        let (d, s): (&mut [f32; 8], &[f32; 8]) = (d.try_into().unwrap(), s.try_into().unwrap());
        *d = *s;
    }
    let tail = dst.len() / 8 * 8;
    for (d, s) in dst[tail..].iter_mut().zip(&src[tail..]) {
        *d = *s;
    }
}

/// One call of [`conv_tile`]: up to 8 output channels by two chunks of up to 16 positions
/// along an output row.
#[cfg(target_arch = "x86_64")]
struct ConvTile<'a> {
    /// The rows' kernels, `[rows, taps]`.
    a: *const f32,
    /// Each tap's place relative to a chunk's origin.
    offsets: &'a [usize],
    /// Each chunk's first position's tap (0, 0, 0) in the zero-padded image.
    origins: [*const f32; 2],
    /// The rows' biases.
    bias: *const f32,
    relu: bool,
    /// Each chunk's first position in the first row's output.
    c: [*mut f32; 2],
    /// Output positions per channel.
    ldc: usize,
    /// Positions stored per chunk (at most 16).
    cols: [usize; 2],
}

/// [`conv_tile`] for `rows` (1 to 8) output channels and a `stride` of 1 or 2 along the
/// width (another stride panics).
///
/// # Safety
/// As [`conv_tile`].
#[cfg(target_arch = "x86_64")]
unsafe fn conv_tile_rows(rows: usize, stride: usize, t: &ConvTile) {
    // SAFETY: forwarded to the caller.
    unsafe {
        match (rows, stride) {
            (8, 1) => conv_tile::<8, 1>(t),
            (7, 1) => conv_tile::<7, 1>(t),
            (6, 1) => conv_tile::<6, 1>(t),
            (5, 1) => conv_tile::<5, 1>(t),
            (4, 1) => conv_tile::<4, 1>(t),
            (3, 1) => conv_tile::<3, 1>(t),
            (2, 1) => conv_tile::<2, 1>(t),
            (_, 1) => conv_tile::<1, 1>(t),
            (8, 2) => conv_tile::<8, 2>(t),
            (7, 2) => conv_tile::<7, 2>(t),
            (6, 2) => conv_tile::<6, 2>(t),
            (5, 2) => conv_tile::<5, 2>(t),
            (4, 2) => conv_tile::<4, 2>(t),
            (3, 2) => conv_tile::<3, 2>(t),
            (2, 2) => conv_tile::<2, 2>(t),
            (_, 2) => conv_tile::<1, 2>(t),
            _ => panic!("conv_tile takes strides 1 and 2, not {stride}"),
        }
    }
}

/// `R` output channels by two chunks of 16 positions `S` (1 or 2) columns apart, each tap's
/// 16 inputs per chunk read in place from the padded image (at stride 2, the even ones of 32
/// read): [`crate::q4mm`]'s 16 FMA per tap, started from the bias, the `Relu` applied at the
/// masked store.
///
/// # Safety
/// AVX-512 F; `R` rows of `a` (`offsets.len()` each) and of `bias`; `16 * S` floats readable
/// at `origins[h] + offset` for every offset; `cols[h]` floats writable at `c[h] + r * ldc`,
/// `r < R`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn conv_tile<const R: usize, const S: usize>(t: &ConvTile) {
    use std::arch::x86_64::*;
    // Lanes 0, 2, .. 30 of two registers side by side.
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    // SAFETY: 16 * S floats readable at p (the caller's).
    let load = |p: *const f32| unsafe {
        if S == 1 {
            _mm512_loadu_ps(p)
        } else {
            _mm512_permutex2var_ps(_mm512_loadu_ps(p), evens, _mm512_loadu_ps(p.add(16)))
        }
    };
    let taps = t.offsets.len();
    // SAFETY: row r < R of the bias.
    let mut acc: [[__m512; 2]; R] =
        std::array::from_fn(|r| [_mm512_set1_ps(unsafe { *t.bias.add(r) }); 2]);
    for (kk, off) in t.offsets.iter().enumerate() {
        // SAFETY: the caller's bounds: 16 * S floats at each origin + off, tap kk < taps of
        // row r.
        unsafe {
            let (b0, b1) = (load(t.origins[0].add(*off)), load(t.origins[1].add(*off)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*t.a.add(r * taps + kk));
                acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
            }
        }
    }
    let mask = |cols: usize| -> __mmask16 { ((1u32 << cols.min(16)) - 1) as __mmask16 };
    let masks = [mask(t.cols[0]), mask(t.cols[1])];
    let zero = _mm512_setzero_ps();
    for (r, acc) in acc.iter().enumerate() {
        for h in 0..2 {
            let y = if t.relu {
                _mm512_max_ps(acc[h], zero)
            } else {
                acc[h]
            };
            // SAFETY: row r < R of the output, the chunk's first `cols` positions (the
            // caller's); a mask of 0 stores nothing.
            unsafe { _mm512_mask_storeu_ps(t.c[h].add(r * t.ldc), masks[h], y) };
        }
    }
}

/// An f32 NCHW 2-D max pool with its geometry resolved at load (see the module's
/// description). Padding never wins: only taps inside the image are compared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct F32MaxPool {
    /// The pool's window over the input.
    pub window: Window,
}

impl Op for F32MaxPool {
    fn name(&self) -> StaticName {
        "EdgevlmMaxPool".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let w = &self.window;
        Ok(vec![format!(
            "{}x{} window, strides {:?}, dilations {:?}, padding {:?}",
            w.kernel.0, w.kernel.1, w.strides, w.dilations, w.before
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for F32MaxPool {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let w = &self.window;
        w.eval("EdgevlmMaxPool", &inputs[0], w.c, |x, _, out| {
            let mut rows = vec![0f32; w.hw.1];
            for (src, dst) in x
                .chunks_exact(w.hw.0 * w.hw.1)
                .zip(out.chunks_exact_mut(w.positions()))
            {
                self.plane(src, dst, &mut rows);
            }
            Ok(())
        })
    }
}

impl TypedOp for F32MaxPool {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.window.output_fact(inputs[0], self.window.c)))
    }

    as_op!();
}

impl F32MaxPool {
    /// One channel of one image: per output row, the maximum of the window's rows column by
    /// column (`rows`, scratch of the input's width), then of each window's columns.
    fn plane(&self, src: &[f32], dst: &mut [f32], rows: &mut [f32]) {
        let w = &self.window;
        let (kh, kw) = w.kernel;
        let (sh, sw) = w.strides;
        let width = w.hw.1;
        // Windows side by side, the last inside the row: a plain fold per window.
        let tiled = kw == sw && w.dilations.1 == 1 && w.before.1 == 0 && w.out.1 * sw <= width;
        for (oy, ys) in dst.chunks_exact_mut(w.out.1).enumerate() {
            rows.fill(f32::NEG_INFINITY);
            for ky in 0..kh {
                let iy = (oy * sh + ky * w.dilations.0).checked_sub(w.before.0);
                let Some(iy) = iy.filter(|iy| *iy < w.hw.0) else {
                    continue;
                };
                for (m, v) in rows.iter_mut().zip(&src[iy * width..][..width]) {
                    *m = greater(*v, *m);
                }
            }
            if tiled {
                match sw {
                    2 => max_of_tiles::<2>(rows, ys),
                    3 => max_of_tiles::<3>(rows, ys),
                    _ => {
                        for (y, window) in ys.iter_mut().zip(rows.chunks_exact(sw)) {
                            *y = window.iter().fold(f32::NEG_INFINITY, |m, v| greater(*v, m));
                        }
                    }
                }
                continue;
            }
            ys.fill(f32::NEG_INFINITY);
            for kx in 0..kw {
                let shift = (kx * w.dilations.1) as isize - w.before.1 as isize;
                // Output columns whose tap ox * sw + shift is inside the row.
                let (sw, width) = (sw as isize, width as isize);
                let lo = if shift < 0 { (-shift + sw - 1) / sw } else { 0 };
                let hi = if shift > width - 1 {
                    0
                } else {
                    ((width - 1 - shift) / sw + 1).min(w.out.1 as isize)
                };
                for ox in lo..hi.max(lo) {
                    let v = rows[(ox * sw + shift) as usize];
                    let y = &mut ys[ox as usize];
                    if v > *y {
                        *y = v;
                    }
                }
            }
        }
    }
}

/// `max(x, 0)` on f32 in place, in pieces over the plan's threads: a `Relu` that tract
/// 0.23.9's optimizer leaves on its generic broadcasting `Max` (~2.5 ns per element where
/// its scalar kernel takes ~0.1), as it does behind a quantized convolution.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Relu;

impl Op for Relu {
    fn name(&self) -> StaticName {
        "EdgevlmRelu".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Relu {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut x = args_1!(inputs).into_tensor();
        {
            let mut plain = x.try_as_plain_ram_mut()?;
            crate::team::for_each_piece(plain.as_slice_mut::<f32>()?, |_, xs| {
                xs.iter_mut().for_each(|x| *x = greater(*x, 0.0));
            });
        }
        Ok(tvec!(x.into_tvalue()))
    }
}

impl TypedOp for Relu {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}

/// The sum or maximum of an f32 tensor over a run of consecutive axes (kept, of size 1), as
/// `[outer, reduced, inner]`: rows of `inner` values added or compared into one
/// accumulator row, or, with nothing inner, 16 interleaved partial results per row. The
/// global pools of a CNN and a mean over tokens become tract's `Reduce`, which folds element
/// by element through ndarray: 5-65 µs of the demo and fixture graphs' 0.1-0.5 ms.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AxesReduce {
    /// The maximum instead of the sum.
    pub max: bool,
    /// The reduced axes, `first..end`.
    pub axes: (usize, usize),
}

impl Op for AxesReduce {
    fn name(&self) -> StaticName {
        if self.max {
            "EdgevlmReduceMax".into()
        } else {
            "EdgevlmReduceSum".into()
        }
    }

    op_as_typed_op!();
}

impl EvalOp for AxesReduce {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let shape = x.shape();
        let (first, end) = self.axes;
        ensure!(
            end <= shape.len() && first < end,
            "EdgevlmReduce over {:?} of {shape:?}",
            self.axes
        );
        let inner: usize = shape[end..].iter().product();
        let reduced: usize = shape[first..end].iter().product();
        let mut out_shape = shape.to_vec();
        out_shape[first..end].iter_mut().for_each(|d| *d = 1);
        let mut out = Tensor::zero::<f32>(&out_shape)?;
        let plain = x.try_as_plain_ram()?;
        let xs = plain.as_slice::<f32>()?;
        {
            let mut ys = out.try_as_plain_ram_mut()?;
            let ys = ys.as_slice_mut::<f32>()?;
            let (max, init) = (self.max, if self.max { f32::NEG_INFINITY } else { 0.0 });
            let step = move |acc: f32, v: f32| if max { greater(v, acc) } else { acc + v };
            crate::quant::wide(|| {
                for (block, acc) in xs
                    .chunks_exact((reduced * inner).max(1))
                    .zip(ys.chunks_exact_mut(inner.max(1)))
                {
                    if inner == 1 {
                        let mut lanes = [init; 16];
                        let mut rows = block.chunks_exact(16);
                        for row in &mut rows {
                            for (l, v) in lanes.iter_mut().zip(row) {
                                *l = step(*l, *v);
                            }
                        }
                        let tail = rows.remainder().iter().fold(init, |a, v| step(a, *v));
                        acc[0] = lanes.iter().fold(tail, |a, v| step(a, *v));
                        continue;
                    }
                    acc.fill(init);
                    for row in block.chunks_exact(inner) {
                        for (a, v) in acc.iter_mut().zip(row) {
                            *a = step(*a, *v);
                        }
                    }
                }
            });
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for AxesReduce {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        shape[self.axes.0..self.axes.1]
            .iter_mut()
            .for_each(|d| *d = 1.to_dim());
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// Replaces every f32 `Reduce<Sum>` / `Reduce<Max>` over consecutive axes by an
/// [`AxesReduce`]. Returns how many.
pub fn own_reduces(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};
    let mut found = vec![];
    for node in model.nodes() {
        let Some(op) = node.op_as::<Reduce>() else {
            continue;
        };
        let max = match op.reducer {
            Reducer::Sum => false,
            Reducer::Max => true,
            _ => continue,
        };
        let axes = &op.axes;
        let consecutive = !axes.is_empty() && axes.windows(2).all(|w| w[1] == w[0] + 1);
        if consecutive && model.outlet_fact(node.inputs[0])?.datum_type == f32::datum_type() {
            let axes = (axes[0], axes[axes.len() - 1] + 1);
            found.push((node.id, AxesReduce { max, axes }));
        }
    }
    for (id, op) in &found {
        let node = model.node(*id);
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op.clone())?;
        patch.apply(model)?;
    }
    Ok(found.len())
}

/// Replaces every f32 `max(x, 0)` still on tract's generic `Max` after its optimizer (one
/// operand a single zero, the other the output's shape) by a [`Relu`]. Returns how many.
pub fn own_relus(model: &mut TypedModel) -> TractResult<usize> {
    let mut found = vec![];
    for node in model.nodes() {
        let Some(op) = node.op_as::<TypedBinOp>() else {
            continue;
        };
        if !op.0.is::<Max>() || node.inputs.len() != 2 {
            continue;
        }
        let out = &node.outputs[0].fact;
        for (x, zero) in [(0, 1), (1, 0)] {
            let (xf, zf) = (
                model.outlet_fact(node.inputs[x])?,
                model.outlet_fact(node.inputs[zero])?,
            );
            if xf.datum_type == f32::datum_type()
                && xf.shape == out.shape
                && zf.shape.volume().is_one()
                && crate::patches::is_uniform(model, node.inputs[zero], 0.0)?
            {
                found.push((node.id, node.inputs[x]));
                break;
            }
        }
    }
    for (id, x) in &found {
        let patch = TypedModelPatch::replace_single_op(model, model.node(*id), &[*x], Relu)?;
        patch.apply(model)?;
    }
    Ok(found.len())
}

/// Replaces every f32 NCHW 2-D convolution with a constant kernel and bias and one group by
/// an [`F32Conv`] where this CPU has an FMA tile ([`crate::q4mm::f32_kernel`]), folding a
/// `Relu` that is its only consumer into it; and every f32 NCHW 2-D `MaxPool` without index
/// output by an [`F32MaxPool`]. Both need the input's channels, height and width known.
/// Returns how many convolutions and pools were replaced.
pub fn own_convs_and_pools(model: &mut TypedModel) -> TractResult<(usize, usize)> {
    let fma = crate::q4mm::f32_kernel().is_some();
    let (mut convs, mut pools) = (0, 0);
    for id in model.eval_order()? {
        let node = model.node(id);
        if let (true, Some(conv)) = (fma, node.op_as::<Conv>()) {
            let Some(op) = f32_conv(model, node, conv)? else {
                continue;
            };
            let relu = relu_after(model, id)?;
            let mut patch = TypedModelPatch::new(format!("edgevlm conv {}", node.name));
            let input = patch.tap_model(model, node.inputs[0])?;
            let (last, op) = match relu {
                Some(relu) => (relu, F32Conv { relu: true, ..op }),
                None => (id, op),
            };
            let y = patch.wire_node(&model.node(last).name, op, &[input])?[0];
            patch.shunt_outside(model, last.into(), y)?;
            patch.apply(model)?;
            convs += 1;
        } else if let Some(pool) = node.op_as::<MaxPool>() {
            let input = model.outlet_fact(node.inputs[0])?;
            let window = Window::of(&pool.pool_spec, input);
            if let (None, Some(window), true) = (
                pool.with_index_outputs,
                window,
                input.datum_type == f32::datum_type(),
            ) {
                let patch = TypedModelPatch::replace_single_op(
                    model,
                    node,
                    &node.inputs,
                    F32MaxPool { window },
                )?;
                patch.apply(model)?;
                pools += 1;
            }
        }
    }
    Ok((convs, pools))
}

/// The [`F32Conv`] (without a `Relu`) for `node`, if [`own_convs_and_pools`] takes it.
fn f32_conv(model: &TypedModel, node: &TypedNode, conv: &Conv) -> TractResult<Option<F32Conv>> {
    let facts = model.node_input_facts(node.id)?;
    if conv.q_params.is_some()
        || conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || facts.len() != 3
        || facts[0].datum_type != f32::datum_type()
    {
        return Ok(None);
    }
    let Some(window) = Window::of(&conv.pool_spec, facts[0]) else {
        return Ok(None);
    };
    let o = conv.output_channels();
    let (Some(kernel), Some(bias)) = (&facts[1].konst, &facts[2].konst) else {
        return Ok(None);
    };
    let (kh, kw) = window.kernel;
    if kernel.datum_type() != f32::datum_type()
        || kernel.shape() != [o, window.c, kh, kw]
        || bias.datum_type() != f32::datum_type()
        || ![1, o].contains(&bias.len())
    {
        return Ok(None);
    }
    let weight = kernel
        .clone()
        .into_tensor()
        .into_shape(&[o, window.taps()])?;
    let bias = bias.try_as_plain_ram()?.as_slice::<f32>()?;
    let bias = tensor1(&(0..o).map(|i| bias[i % bias.len()]).collect::<Vec<_>>());
    Ok(Some(F32Conv {
        window,
        o,
        weight: Arc::new(weight),
        bias: Arc::new(bias),
        relu: false,
    }))
}

/// Rewrites every 8-bit NCHW 2-D convolution (ONNX `ConvInteger` as tract loads it: i32
/// sums, one group, a constant kernel and kernel zero point, a single input zero point) left
/// after [`crate::int8mm::patch_convs_as_products`] into `Cast(F32Conv(x, x0) to i32)`, the
/// [`F32Conv`] of the centred kernel `w - w0` over `x - x0`, where the sums are exact in
/// f32: every partial sum is an integer below 2^24 when `taps * 255 * max |w - w0| < 2^24`
/// (3x3 over up to ~28 channels of a full-range kernel; more with a smaller one). Same
/// integers as the convolution. When its only consumer is the Cast to f32 of a dynamic
/// int8 export, the two casts would give back the same floats and both are left out.
/// tract 0.23.9 runs these as an `Im2col` and its int8 kernel plus zero-point corrections
/// (~0.5 ms of the dynamic int8 fixture graphs' ~1.2). Runs where [`own_convs_and_pools`]
/// does. Returns how many.
pub fn integer_convs_in_f32(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::cast::cast;
    if crate::q4mm::f32_kernel().is_none() {
        return Ok(0);
    }
    let mut found = vec![];
    for node in model.nodes() {
        let Some(conv) = node.op_as::<Conv>() else {
            continue;
        };
        if let Some(op) = integer_conv(model, node, conv)? {
            found.push((node.id, op));
        }
    }
    for (id, op) in &found {
        let node = model.node(*id);
        let mut patch = TypedModelPatch::new(format!("edgevlm integer conv {}", node.name));
        let taps = patch.taps(model, &[node.inputs[0], node.inputs[3]])?;
        let sums = patch.wire_node(format!("{}.edgevlm_conv", node.name), op.clone(), &taps)?[0];
        match cast_to_f32_after(model, *id) {
            Some(to_f32) => patch.shunt_outside(model, to_f32.into(), sums)?,
            None => {
                let out = patch.wire_node(&node.name, cast(i32::datum_type()), &[sums])?[0];
                patch.shunt_outside(model, (*id).into(), out)?;
            }
        }
        patch.apply(model)?;
    }
    Ok(found.len())
}

/// The Cast to f32 that is the only consumer of `id`'s output, if there is one and that
/// output is not also a model output.
fn cast_to_f32_after(model: &TypedModel, id: usize) -> Option<usize> {
    use tract_onnx::tract_core::ops::cast::Cast;
    let to_f32 = crate::patches::sole_consumer(model, OutletId::new(id, 0))?;
    let is_cast = to_f32.op_as::<Cast>().map(|c| c.to) == Some(f32::datum_type());
    is_cast.then_some(to_f32.id)
}

/// The [`F32Conv`] of `node`'s centred kernel if [`integer_convs_in_f32`] takes it.
fn integer_conv(model: &TypedModel, node: &TypedNode, conv: &Conv) -> TractResult<Option<F32Conv>> {
    let facts = model.node_input_facts(node.id)?;
    let eight_bits = [u8::datum_type(), i8::datum_type()];
    if conv.q_params != Some(i32::datum_type())
        || conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || !crate::patches::has_integer_q_inputs(model, node)?
        || !eight_bits.contains(&facts[0].datum_type)
        || !facts[3].shape.volume().is_one()
    {
        return Ok(None);
    }
    let (Some(window), Some(kernel), Some(w0)) = (
        Window::of(&conv.pool_spec, facts[0]),
        &facts[1].konst,
        &facts[5].konst,
    ) else {
        return Ok(None);
    };
    let o = conv.output_channels();
    let (kh, kw) = window.kernel;
    if !eight_bits.contains(&kernel.datum_type())
        || kernel.shape() != [o, window.c, kh, kw]
        || ![1, o].contains(&w0.len())
    {
        return Ok(None);
    }
    let kernel = crate::values::<f32>(kernel)?;
    let w0 = crate::values::<f32>(w0)?;
    let per_channel = window.taps();
    let centred: Vec<f32> = kernel
        .iter()
        .enumerate()
        .map(|(i, w)| w - w0[i / per_channel % w0.len()])
        .collect();
    let widest = centred.iter().fold(0f32, |m, w| m.max(w.abs()));
    if per_channel as f32 * 255.0 * widest >= (1u32 << 24) as f32 {
        return Ok(None);
    }
    Ok(Some(F32Conv {
        window,
        o,
        weight: Arc::new(Tensor::from_shape(&[o, per_channel], &centred)?),
        bias: Arc::new(Tensor::zero::<f32>(&[o])?),
        relu: false,
    }))
}

/// The `max(x, 0)` node that is the only consumer of `id`'s output, if there is one and that
/// output is not also a model output.
fn relu_after(model: &TypedModel, id: usize) -> TractResult<Option<usize>> {
    let outlet = OutletId::new(id, 0);
    let Some(next) = crate::patches::sole_consumer(model, outlet) else {
        return Ok(None);
    };
    let Some(op) = next.op_as::<TypedBinOp>() else {
        return Ok(None);
    };
    if !op.0.is::<Max>() || next.inputs.len() != 2 {
        return Ok(None);
    }
    let other = next.inputs[(next.inputs[0] == outlet) as usize];
    let same_shape =
        model.outlet_fact(OutletId::new(next.id, 0))?.shape == model.outlet_fact(outlet)?.shape;
    Ok((same_shape && crate::patches::is_uniform(model, other, 0.0)?).then_some(next.id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::cast::Cast;
    use tract_onnx::tract_core::ops::cnn::PaddingSpec;

    fn random(len: usize, seed: &mut u64) -> Vec<f32> {
        (0..len)
            .map(|_| crate::int8mm::tests::lcg(seed) as f32 / (1u64 << 31) as f32 * 2.0 - 1.0)
            .collect()
    }

    /// A model of one tract `Conv` (then `max(x, 0)` when `relu`) or `MaxPool` over an
    /// `[n, c, h, w]` input with a symbolic batch.
    fn model(
        spec: PoolSpec,
        conv: Option<(Tensor, Tensor, bool)>,
        (c, h, w): (usize, usize, usize),
    ) -> TractResult<TypedModel> {
        let mut m = TypedModel::default();
        let n = m.symbols.sym("n");
        let x = m.add_source(
            "x",
            f32::fact(&[n.to_dim(), c.to_dim(), h.to_dim(), w.to_dim()]),
        )?;
        let y = match conv {
            Some((kernel, bias, relu)) => {
                let k = m.add_const("kernel", kernel)?;
                let b = m.add_const("bias", bias)?;
                let op = Conv {
                    pool_spec: spec,
                    kernel_fmt: KernelFormat::OIHW,
                    group: 1,
                    q_params: None,
                };
                let mut y = m.wire_node("conv", op, &[x, k, b])?[0];
                if relu {
                    let zero = m.add_const("zero", tensor4(&[[[[0f32]]]]))?;
                    y =
                        m.wire_node("relu", tract_onnx::tract_core::ops::math::max(), &[y, zero])?
                            [0];
                }
                y
            }
            None => m.wire_node("pool", MaxPool::new(spec, None), &[x])?[0],
        };
        m.select_output_outlets(&[y])?;
        Ok(m)
    }

    fn run(model: &TypedModel, x: &Tensor) -> TractResult<Tensor> {
        let plan = model.clone().into_runnable()?;
        Ok(plan.run(tvec!(x.clone().into()))?.remove(0).into_tensor())
    }

    fn spec(
        (c, o): (usize, usize),
        kernel: (usize, usize),
        strides: (usize, usize),
        dilations: (usize, usize),
        pads: ((usize, usize), (usize, usize)),
    ) -> PoolSpec {
        PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![kernel.0, kernel.1],
            padding: PaddingSpec::Explicit(
                tvec![pads.0 .0, pads.0 .1],
                tvec![pads.1 .0, pads.1 .1],
            ),
            dilations: Some(tvec![dilations.0, dilations.1]),
            strides: Some(tvec![strides.0, strides.1]),
            input_channels: c,
            output_channels: o,
        }
    }

    #[test]
    fn convolutions_equal_tracts() -> TractResult<()> {
        if crate::q4mm::f32_kernel().is_none() {
            eprintln!("no FMA tile on this CPU: nothing to compare");
            return Ok(());
        }
        let mut seed = 7;
        // (c, o), (h, w), kernel, strides, dilations, pads before / after, relu, batch
        // (no 1x1: tract's declutter turns those into products):
        // the demo's 3x3 "same" layers, a strided one, output channels past a tile of 8,
        // positions not a multiple of 32, a 1x3, an asymmetric padding, dilations, rows 16
        // wide (two per register on AVX-512) and a last register half-empty.
        #[rustfmt::skip]
        let cases = [
            ((3, 8), (64, 64), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), true, 1),
            ((16, 32), (32, 32), (3, 3), (2, 2), (1, 1), ((1, 1), (1, 1)), true, 2),
            ((5, 13), (9, 11), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), false, 3),
            ((32, 32), (8, 8), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), true, 1),
            ((7, 9), (10, 7), (1, 3), (1, 1), (1, 1), ((0, 1), (0, 1)), false, 2),
            ((4, 6), (12, 15), (2, 3), (3, 2), (1, 1), ((0, 2), (1, 0)), true, 1),
            ((3, 5), (13, 13), (3, 3), (1, 1), (2, 2), ((2, 2), (2, 2)), false, 1),
            ((3, 5), (20, 20), (3, 3), (1, 1), (2, 2), ((2, 2), (2, 2)), true, 1),
            ((4, 9), (15, 16), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), true, 2),
            ((6, 10), (15, 21), (3, 3), (2, 1), (1, 1), ((1, 1), (1, 1)), false, 1),
            ((3, 7), (9, 45), (3, 3), (1, 2), (1, 1), ((1, 1), (1, 1)), true, 2),
        ];
        for ((c, o), (h, w), k, s, d, pads, relu, n) in cases {
            let kernel =
                Tensor::from_shape(&[o, c, k.0, k.1], &random(o * c * k.0 * k.1, &mut seed))?;
            let bias = tensor1(&random(o, &mut seed));
            let tract = model(
                spec((c, o), k, s, d, pads),
                Some((kernel, bias, relu)),
                (c, h, w),
            )?
            .into_decluttered()?;
            let mut ours = tract.clone();
            assert_eq!(
                own_convs_and_pools(&mut ours)?,
                (1, 0),
                "case {c}->{o} k{k:?}: {tract}"
            );
            let fused = ours
                .nodes()
                .iter()
                .filter_map(|n| n.op_as::<F32Conv>())
                .next()
                .unwrap();
            assert_eq!(fused.relu, relu, "relu folded in");
            let ours = ours.into_compact()?;
            assert_eq!(
                ours.nodes().len(),
                2,
                "only the source and the convolution: {ours}"
            );
            let x = Tensor::from_shape(&[n, c, h, w], &random(n * c * h * w, &mut seed))?;
            let (want, got) = (run(&tract, &x)?, run(&ours, &x)?);
            assert_eq!(want.shape(), got.shape());
            let want = crate::values::<f32>(&want)?;
            let mut outs = vec![crate::values::<f32>(&got)?];
            // Every kernel this CPU runs, not only its best: an AVX-512 host checks the AVX2
            // path (panels of copied taps) for the convolutions it reads in place; on one
            // thread and split over two (the first two cases are large enough to split).
            let op = ours
                .nodes()
                .iter()
                .find_map(|n| n.op_as::<F32Conv>())
                .unwrap();
            let xs = crate::values::<f32>(&x)?;
            for threads in [1, 2] {
                for kernel in crate::q4mm::tests::kernels_here() {
                    let mut out = vec![f32::NAN; want.len()];
                    tract_linalg::multithread::multithread_tract_scope(
                        crate::int8mm::tests::executor(threads),
                        || op.run(kernel, Pixels::F32(&xs), n, &mut out),
                    )?;
                    outs.push(out);
                }
            }
            for got in outs {
                let err = want
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                let case = format!("{c}->{o} {h}x{w} k{k:?} s{s:?} d{d:?} {pads:?}");
                assert!(err < 1e-4, "case {case}: {err}");
            }
        }
        Ok(())
    }

    /// A model of one tract 8-bit `Conv` (ONNX `ConvInteger`: a u8 or i8 input with a
    /// run-time zero point, a u8 kernel with one zero point or one per output channel, i32
    /// sums), its sums cast to f32 when `to_f32` (as a dynamic int8 export has them).
    fn integer_conv_model(
        spec: PoolSpec,
        kernel: Tensor,
        w0: Tensor,
        (input, c, h, w): (DatumType, usize, usize, usize),
        to_f32: bool,
    ) -> TractResult<TypedModel> {
        use tract_onnx::tract_core::ops::cast::cast;
        let mut m = TypedModel::default();
        let n = m.symbols.sym("n");
        let x = m.add_source(
            "x",
            input.fact([n.to_dim(), c.to_dim(), h.to_dim(), w.to_dim()]),
        )?;
        let x0 = m.add_source("x0", i32::fact([0usize; 0]))?;
        let mut inputs = vec![x, m.add_const("kernel", kernel)?];
        inputs.push(m.add_const("bias", tensor0(0i32))?);
        inputs.push(x0);
        inputs.push(m.add_const("x_scale", tensor0(1f32))?);
        inputs.push(m.add_const("w0", w0)?);
        inputs.push(m.add_const("w_scale", tensor0(1f32))?);
        inputs.push(m.add_const("y0", tensor0(0i32))?);
        inputs.push(m.add_const("y_scale", tensor0(1f32))?);
        let op = Conv {
            pool_spec: spec,
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: Some(i32::datum_type()),
        };
        let mut y = m.wire_node("conv", op, &inputs)?[0];
        if to_f32 {
            y = m.wire_node("to_f32", cast(f32::datum_type()), &[y])?[0];
        }
        m.select_output_outlets(&[y])?;
        Ok(m)
    }

    #[test]
    fn integer_convolutions_give_tracts_integers() -> TractResult<()> {
        if crate::q4mm::f32_kernel().is_none() {
            eprintln!("no FMA tile on this CPU: nothing to compare");
            return Ok(());
        }
        let mut seed = 3;
        let mut bytes = |len: usize| -> Vec<u8> {
            (0..len)
                .map(|_| (crate::int8mm::tests::lcg(&mut seed) >> 7) as u8)
                .collect()
        };
        // (c, o), (h, w), strides, pads, channels sharing one kernel zero point, signed
        // input, sums cast to f32; the last is too deep for exact f32 sums and stays on
        // tract's path.
        #[rustfmt::skip]
        let cases = [
            ((3, 16), (32, 32), (1, 1), ((1, 1), (1, 1)), false, false, false, true),
            ((16, 32), (32, 32), (2, 2), ((1, 1), (1, 1)), true, false, true, true),
            ((5, 7), (11, 9), (1, 2), ((0, 1), (2, 0)), true, true, false, true),
            ((4, 9), (17, 20), (1, 1), ((1, 1), (1, 1)), false, true, true, true),
            ((300, 4), (5, 5), (1, 1), ((1, 1), (1, 1)), false, false, false, false),
        ];
        for ((c, o), (h, w), s, pads, shared, signed, to_f32, taken) in cases {
            let kernel = Tensor::from_shape(&[o, c, 3, 3], &bytes(o * c * 9))?;
            let w0: Vec<i32> = bytes(if shared { 1 } else { o })
                .into_iter()
                .map(i32::from)
                .collect();
            let w0 = if shared { tensor0(w0[0]) } else { tensor1(&w0) };
            let input = if signed {
                i8::datum_type()
            } else {
                u8::datum_type()
            };
            let spec = spec((c, o), (3, 3), s, (1, 1), pads);
            let tract = integer_conv_model(spec, kernel, w0, (input, c, h, w), to_f32)?
                .into_decluttered()?;
            let mut ours = tract.clone();
            assert_eq!(integer_convs_in_f32(&mut ours)?, taken as usize, "{c}->{o}");
            let x0s = if signed {
                [-128, 0, 127]
            } else {
                [0i32, 128, 255]
            };
            for x0 in x0s {
                let (shape, data) = ([2, c, h, w], bytes(2 * c * h * w));
                let x = if signed {
                    let data: Vec<i8> = data.iter().map(|&b| b as i8).collect();
                    Tensor::from_shape(&shape, &data)?
                } else {
                    Tensor::from_shape(&shape, &data)?
                };
                let inputs = || tvec!(x.clone().into(), tensor0(x0).into());
                let want = tract.clone().into_runnable()?.run(inputs())?.remove(0);
                let got = ours.clone().into_runnable()?.run(inputs())?.remove(0);
                let case = format!("case {c}->{o} {h}x{w} s{s:?} {pads:?} {input:?}, x0 {x0}");
                assert_eq!(want, got, "{case}");
                // Integers, not only equal ones.
                let expect = if to_f32 {
                    f32::datum_type()
                } else {
                    i32::datum_type()
                };
                assert_eq!(got.datum_type(), expect, "{case}");
            }
            if taken {
                // Both casts left out when the sums are cast to f32.
                let casts = ours.nodes().iter().filter(|n| n.op_is::<Cast>()).count();
                assert_eq!(casts, !to_f32 as usize, "{c}->{o}: casts");
            }
        }
        Ok(())
    }

    #[test]
    fn reductions_equal_tracts() -> TractResult<()> {
        use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};
        let mut seed = 9;
        let shape = [2usize, 3, 17, 5];
        let x = Tensor::from_shape(&shape, &random(shape.iter().product(), &mut seed))?;
        for axes in [vec![1], vec![2, 3], vec![3], vec![0, 1, 2, 3], vec![1, 3]] {
            for reducer in [Reducer::Sum, Reducer::Max] {
                let mut m = TypedModel::default();
                let src = m.add_source("x", f32::fact(shape))?;
                let op = Reduce {
                    axes: axes.iter().copied().collect(),
                    reducer,
                };
                let y = m.wire_node("reduce", op, &[src])?[0];
                m.select_output_outlets(&[y])?;
                let mut ours = m.clone();
                let taken = axes != [1, 3];
                assert_eq!(own_reduces(&mut ours)?, taken as usize, "{axes:?}");
                let (want, got) = (run(&m, &x)?, run(&ours, &x)?);
                assert_eq!(want.shape(), got.shape());
                let (a, b) = (crate::values::<f32>(&want)?, crate::values::<f32>(&got)?);
                for (a, b) in a.iter().zip(&b) {
                    // Sums in another order: within a few ulps of the 60-term sums.
                    let close = if reducer == Reducer::Max {
                        a == b
                    } else {
                        (a - b).abs() < 1e-5
                    };
                    assert!(close, "{axes:?} {reducer:?}: {a} vs {b}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn relus_equal_tracts_max_and_only_max_with_zero_is_taken() -> TractResult<()> {
        let mut seed = 5;
        let x = Tensor::from_shape(&[2, 3, 4, 5], &random(120, &mut seed))?;
        for floor in [0f32, 0.25] {
            let mut m = TypedModel::default();
            let n = m.symbols.sym("n");
            let src = m.add_source("x", f32::fact([n.to_dim(), 3.into(), 4.into(), 5.into()]))?;
            let c = m.add_const("floor", tensor4(&[[[[floor]]]]))?;
            let y = m.wire_node("relu", tract_onnx::tract_core::ops::math::max(), &[c, src])?[0];
            m.select_output_outlets(&[y])?;
            let mut ours = m.clone();
            assert_eq!(own_relus(&mut ours)?, (floor == 0.0) as usize);
            assert_eq!(run(&m, &x)?, run(&ours, &x)?);
        }
        Ok(())
    }

    #[test]
    fn max_pools_equal_tracts() -> TractResult<()> {
        let mut seed = 11;
        #[rustfmt::skip]
        let cases = [
            ((8, 64, 64), (2, 2), (2, 2), ((0, 0), (0, 0)), 1),
            ((3, 9, 11), (3, 3), (2, 2), ((1, 1), (1, 1)), 2),
            ((2, 7, 8), (2, 3), (1, 3), ((1, 0), (0, 2)), 3),
            ((4, 5, 5), (5, 5), (1, 1), ((2, 2), (2, 2)), 1),
            ((5, 12, 13), (3, 3), (3, 3), ((0, 0), (0, 0)), 2),
            ((2, 8, 9), (4, 4), (4, 4), ((0, 0), (0, 0)), 1),
        ];
        for ((c, h, w), k, s, pads, n) in cases {
            let tract =
                model(spec((c, c), k, s, (1, 1), pads), None, (c, h, w))?.into_decluttered()?;
            let mut ours = tract.clone();
            assert_eq!(own_convs_and_pools(&mut ours)?, (0, 1));
            let x = Tensor::from_shape(&[n, c, h, w], &random(n * c * h * w, &mut seed))?;
            let (want, got) = (run(&tract, &x)?, run(&ours, &x)?);
            assert_eq!(want, got, "case {c}x{h}x{w} k{k:?} s{s:?} {pads:?}");
        }
        Ok(())
    }
}
