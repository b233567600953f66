//! Fused f32 attention for AVX-512 and AVX2: `softmax(q k^T * scale + bias) v`, one block of
//! query rows at a time, so the `heads x rows x rows` score tensor is never written out. The
//! kernels are those of [`crate::q4mm::f32_kernel`]'s choice: AVX-512 F, else AVX2 with FMA.
//!
//! tract 0.23.9 runs a ViT's attention as it is exported: a batched product into a
//! `[batch, heads, 1024, 1024]` f32 tensor (48 MiB per layer at 512x512 px), a scale, the
//! key-mask add and a softmax over it, then a repacking of all of it for the product with `v`.
//! Those passes cost a probe vision encoder ~100 ms per layer, about half its run (see
//! `docs/tract-slow-paths.md`, section 9). [`FusedAttention`] computes 32 query rows against all
//! keys into a cache-resident block, applies the scale, bias and softmax there and multiplies by
//! `v` before moving on.
//!
//! A LLaMA-style decoder's grouped-query attention ([`Layout::Grouped`]) goes the same way: in
//! a decode step tract repacks every key and value of the past for its two products and runs
//! them on its thread pool, ~40 % of a probe int8 decoder's step at 100 tokens of past; the
//! fused op packs each key / value head once for all its query heads.

// Elsewhere than x86_64 the kernels are compiled out and the ops never created (the
// rewrite checks the CPU first), which leaves their plumbing unused there.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::{Add, Mul};
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

use crate::q4mm::F32Kernel;
use crate::quant::LinearQuant;

/// Keys per panel of the score kernel: two 16-lane registers.
const KP: usize = crate::q4mm::NR;
/// Query rows per block: a panel of 32 keys (`d * 32` floats) is read once from L2 for all
/// of them, and a chunk of value rows once for all of them.
const RB: usize = 32;
/// Value rows per pass of the weighted sum (`VC * 64` floats, 32 KiB at a head size of 64,
/// stay in L1 while every row of the block passes over them).
const VC: usize = 128;
// The weighted sum passes over 4 rows at a time and stays inside a block's RB rows of
// scores and output.
const _: () = assert!(RB.is_multiple_of(4));

/// `softmax(q k^T * scale + bias) v` for every query head, with `q`, `k` (keys as rows), `v`
/// and the output laid out as [`Layout`] says; `bias` (optional input 3) broadcasts to
/// `[batch, heads, rows, keys]`.
#[derive(Debug, Clone, PartialEq)]
pub struct FusedAttention {
    /// Multiplies the scores before the bias.
    pub scale: f32,
    /// Where heads, rows and keys are.
    pub layout: Layout,
    /// A static QDQ export's quantize -> dequantize of the raw scores, before `scale` (a
    /// [`LinearQuant`] with a float output).
    pub score_quant: Option<LinearQuant>,
    /// A static QDQ export's quantize -> dequantize of the scaled scores, after `scale` and
    /// before the bias (an export that quantizes the scale's Mul too).
    pub scaled_quant: Option<LinearQuant>,
    /// A static QDQ export's quantize -> dequantize of the softmax's weights, before the
    /// product with `v`.
    pub weight_quant: Option<LinearQuant>,
}

/// How [`FusedAttention`]'s operands are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `q`, `k`, `v` and the output `[batch, rows, heads, dim]`: a ViT's attention as tract
    /// declutters it.
    RowsMajor,
    /// Grouped-query attention, heads before rows: `q` `[batch, groups, per_group, rows,
    /// dim]`, `k` and `v` `[batch, groups, keys, dim]` (one key / value head per group of
    /// query heads), the output `[batch, groups, per_group, rows, dim_v]`: a LLaMA-style
    /// decoder's attention once tract has folded its repeated key / value heads into the
    /// products. Query head `h` is `(group, h % per_group)`, with `h = group * per_group + i`.
    Grouped,
}

impl Eq for FusedAttention {}

impl Op for FusedAttention {
    fn name(&self) -> StaticName {
        "EdgevlmFusedAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "scale={} layout={:?} score_quant={:?} scaled_quant={:?} weight_quant={:?}",
            self.scale, self.layout, self.score_quant, self.scaled_quant, self.weight_quant
        )])
    }

    op_as_typed_op!();
}

/// Shapes of one call.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    rows: usize,
    keys: usize,
    /// Key / value heads; for [`Layout::RowsMajor`] one per query head.
    groups: usize,
    /// Query heads per key / value head.
    per_group: usize,
    d: usize,
    e: usize,
}

impl Dims {
    /// From the operands' shapes, checked against each other.
    fn of(layout: Layout, qs: &[usize], ks: &[usize], vs: &[usize]) -> TractResult<Dims> {
        let fits = match layout {
            Layout::RowsMajor => qs.len() == 4 && ks.len() == 4 && vs.len() == 4,
            Layout::Grouped => qs.len() == 5 && ks.len() == 4 && vs.len() == 4,
        };
        ensure!(
            fits,
            "FusedAttention ({layout:?}): q {qs:?}, k {ks:?} and v {vs:?} have the wrong ranks"
        );
        let dims = match layout {
            Layout::RowsMajor => Dims {
                batch: qs[0],
                rows: qs[1],
                groups: qs[2],
                per_group: 1,
                d: qs[3],
                keys: ks[1],
                e: vs[3],
            },
            Layout::Grouped => Dims {
                batch: qs[0],
                groups: qs[1],
                per_group: qs[2],
                rows: qs[3],
                d: qs[4],
                keys: ks[2],
                e: vs[3],
            },
        };
        let (k_want, v_want) = match layout {
            Layout::RowsMajor => (
                [dims.batch, dims.keys, dims.groups, dims.d],
                [dims.batch, dims.keys, dims.groups, dims.e],
            ),
            Layout::Grouped => (
                [dims.batch, dims.groups, dims.keys, dims.d],
                [dims.batch, dims.groups, dims.keys, dims.e],
            ),
        };
        ensure!(
            ks == k_want && vs == v_want,
            "FusedAttention ({layout:?}): q {qs:?}, k {ks:?} and v {vs:?} do not fit"
        );
        Ok(dims)
    }

    fn heads(&self) -> usize {
        self.groups * self.per_group
    }

    /// The output's shape.
    fn output(&self, layout: Layout) -> Vec<usize> {
        match layout {
            Layout::RowsMajor => vec![self.batch, self.rows, self.groups, self.e],
            Layout::Grouped => vec![self.batch, self.groups, self.per_group, self.rows, self.e],
        }
    }
}

impl EvalOp for FusedAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let kernel = crate::q4mm::f32_kernel().context("FusedAttention: no AVX2 or AVX-512")?;
        self.run(kernel, inputs)
    }
}

impl FusedAttention {
    /// [`EvalOp::eval`] on `kernel`'s kernels, which must run on this CPU.
    fn run(&self, kernel: F32Kernel, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
        let dims = Dims::of(self.layout, q.shape(), k.shape(), v.shape())?;
        // The bias's strides over [batch, heads, rows, keys], 0 where it broadcasts.
        let bias = inputs.get(3);
        let mut bias_strides = [0usize; 4];
        if let Some(b) = bias {
            ensure!(b.rank() <= 4, "FusedAttention: bias {:?}", b.shape());
            let full = [dims.batch, dims.heads(), dims.rows, dims.keys];
            let mut shape = vec![1; 4 - b.rank()];
            shape.extend_from_slice(b.shape());
            let mut stride = 1;
            for axis in (0..4).rev() {
                ensure!(
                    shape[axis] == full[axis] || shape[axis] == 1,
                    "FusedAttention: bias {:?} does not broadcast to {full:?}",
                    b.shape()
                );
                if shape[axis] != 1 {
                    bias_strides[axis] = stride;
                }
                stride *= shape[axis];
            }
        }
        let mut out = Tensor::zero::<f32>(&dims.output(self.layout))?;
        let (qp, kp, vp) = (
            q.try_as_plain_ram()?,
            k.try_as_plain_ram()?,
            v.try_as_plain_ram()?,
        );
        let bp = bias.map(|b| b.try_as_plain_ram()).transpose()?;
        let job = Job {
            q: qp.as_slice::<f32>()?,
            k: kp.as_slice::<f32>()?,
            v: vp.as_slice::<f32>()?,
            bias: match &bp {
                Some(b) => Some(b.as_slice::<f32>()?),
                None => None,
            },
            bias_strides,
            dims,
            layout: self.layout,
            scale: self.scale,
            score_quant: self.score_quant.as_ref(),
            scaled_quant: self.scaled_quant.as_ref(),
            weight_quant: self.weight_quant.as_ref(),
            kernel,
        };
        {
            let mut out_plain = out.try_as_plain_ram_mut()?;
            let o = out_plain.as_slice_mut::<f32>()?;
            let o_addr = o.as_mut_ptr() as usize;
            // One part per key / value head: its query heads share one packing of its keys.
            crate::team::for_each_part(dims.batch * dims.groups, |unit| job.unit(unit, o_addr));
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for FusedAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        // The query's shape with the value's width last, in both layouts.
        let (q, v) = (&inputs[0].shape, &inputs[2].shape);
        let mut shape: TVec<TDim> = q.iter().cloned().collect();
        if let (Some(last), Some(e)) = (shape.last_mut(), v.last()) {
            *last = e.clone();
        }
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// One call's operands, shared by the threads that compute one key / value head each.
struct Job<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    bias: Option<&'a [f32]>,
    bias_strides: [usize; 4],
    dims: Dims,
    layout: Layout,
    scale: f32,
    score_quant: Option<&'a LinearQuant>,
    scaled_quant: Option<&'a LinearQuant>,
    weight_quant: Option<&'a LinearQuant>,
    /// The kernels, which run on this CPU.
    kernel: F32Kernel,
}

/// Where one unit of work (a key / value head of one batch item) finds its operands: the
/// first element and the distance between rows (query rows, keys, output rows).
struct Span {
    /// Query rows of the unit: all rows of all its query heads, head by head.
    rows: usize,
    q: (usize, usize),
    k: (usize, usize),
    v: (usize, usize),
    o: (usize, usize),
}

impl Job<'_> {
    /// Key / value head `unit % groups` of batch item `unit / groups`, for all its query
    /// heads, into the output at address `o`.
    fn unit(&self, unit: usize, o: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let Dims {
                rows,
                keys,
                groups,
                per_group,
                d,
                e,
                ..
            } = self.dims;
            let (b, g) = (unit / groups, unit % groups);
            let span = match self.layout {
                // [batch, rows, heads, dim]: a row of one head every `groups` rows.
                Layout::RowsMajor => Span {
                    rows,
                    q: ((b * rows * groups + g) * d, groups * d),
                    k: ((b * keys * groups + g) * d, groups * d),
                    v: ((b * keys * groups + g) * e, groups * e),
                    o: ((b * rows * groups + g) * e, groups * e),
                },
                // [batch, groups, per_group, rows, dim]: the group's query rows are
                // contiguous.
                Layout::Grouped => Span {
                    rows: per_group * rows,
                    q: (unit * per_group * rows * d, d),
                    k: (unit * keys * d, d),
                    v: (unit * keys * e, e),
                    o: (unit * per_group * rows * e, e),
                },
            };
            let panels = keys.div_ceil(KP);
            let np = panels * KP;
            let ep = e.next_multiple_of(16);
            // k^T in panels of 32 keys: kt[p][c][jj] = key p * 32 + jj's element c, zero past
            // `keys`.
            let mut kt = vec![0f32; panels * d * KP];
            for j in 0..keys {
                let src = &self.k[span.k.0 + j * span.k.1..][..d];
                let (p, jj) = (j / KP, j % KP);
                for (c, &x) in src.iter().enumerate() {
                    kt[(p * d + c) * KP + jj] = x;
                }
            }
            // v rows, each padded to whole 16-lane vectors.
            let mut vh = vec![0f32; keys * ep];
            for j in 0..keys {
                vh[j * ep..j * ep + e].copy_from_slice(&self.v[span.v.0 + j * span.v.1..][..e]);
            }
            let kernel = self.kernel;
            // Score rows per tile: the panel products' tile height.
            let tile = kernel.tile().0;
            let mut qt = vec![0f32; RB * d];
            let mut s = vec![0f32; RB * np];
            let mut brow = vec![0f32; keys];
            let mut orow = vec![0f32; RB * ep];
            let [sb_b, sb_h, sb_r, sb_k] = self.bias_strides;
            // Quantized scores are scaled after their quantize -> dequantize, not in the tile.
            let tile_scale = match self.score_quant {
                Some(_) => 1.0,
                None => self.scale,
            };
            for r0 in (0..span.rows).step_by(RB) {
                let rb = RB.min(span.rows - r0);
                for r in 0..rb {
                    qt[r * d..(r + 1) * d]
                        .copy_from_slice(&self.q[span.q.0 + (r0 + r) * span.q.1..][..d]);
                }
                // The scores, one panel of 32 keys at a time, every tile of the block against it.
                for p in 0..panels {
                    for t0 in (0..rb).step_by(tile) {
                        // SAFETY: `kernel` runs on this CPU (the job's); the buffers are
                        // sized above for RB rows, whole panels and vectors.
                        unsafe {
                            crate::q4mm::fma_tile_rows(
                                kernel,
                                tile.min(rb - t0),
                                &crate::q4mm::FmaTile {
                                    a: qt.as_ptr().add(t0 * d),
                                    lda: d,
                                    b: kt.as_ptr().add(p * d * KP),
                                    k: d,
                                    scale: tile_scale,
                                    c: s.as_mut_ptr().add(t0 * np + p * KP),
                                    ldc: np,
                                    cols: KP,
                                    accumulate: false,
                                    prefetch: std::ptr::null(),
                                },
                            )
                        }
                    }
                }
                for r in 0..rb {
                    let row = &mut s[r * np..r * np + keys];
                    // The quantize -> dequantize passes compiled for AVX-512 / AVX2 (the
                    // crate's baseline is SSE2): same operations, same values.
                    if let Some(fq) = self.score_quant {
                        crate::quant::wide(|| {
                            fq.requantize_in_place(row);
                            row.iter_mut().for_each(|x| *x *= self.scale);
                        });
                    }
                    if let Some(fq) = self.scaled_quant {
                        crate::quant::wide(|| fq.requantize_in_place(row));
                    }
                    if let Some(bias) = self.bias {
                        // Local row `i` is query head `g * per_group + i / rows`'s row `i % rows`.
                        let i = r0 + r;
                        let h = g * per_group + i / rows;
                        let base = b * sb_b + h * sb_h + (i % rows) * sb_r;
                        if sb_k == 1 {
                            row.iter_mut()
                                .zip(&bias[base..base + keys])
                                .for_each(|(x, y)| *x += y);
                        } else {
                            for (j, x) in brow.iter_mut().enumerate() {
                                *x = bias[base + j * sb_k];
                            }
                            row.iter_mut().zip(&brow).for_each(|(x, y)| *x += y);
                        }
                    }
                    // SAFETY: as above.
                    unsafe { softmax_row(kernel, row) };
                    if let Some(fq) = self.weight_quant {
                        crate::quant::wide(|| fq.requantize_in_place(row));
                    }
                }
                // SAFETY: as above.
                unsafe { weighted_values(kernel, &s, np, rb, keys, &vh, ep, &mut orow) };
                for r in 0..rb {
                    let dst = o as *mut f32;
                    let at = span.o.0 + (r0 + r) * span.o.1;
                    // SAFETY: each output row of each query head is written by its key / value
                    // head's unit only, inside the tensor `eval` allocated for the output.
                    unsafe {
                        std::ptr::copy_nonoverlapping(orow[r * ep..].as_ptr(), dst.add(at), e);
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (unit, o);
            unreachable!("FusedAttention is only built on x86_64");
        }
    }
}

/// ln 2 in two parts, so that `n * LN2_HI` is exact in the exponentials' range reduction.
const LN2_HI: f32 = 0.693_145_75;
/// The rest of ln 2 after [`LN2_HI`].
const LN2_LO: f32 = 1.428_606_8e-6;
/// `e^r` for `|r| <= ln 2 / 2`: Taylor coefficients from degree 6 down to 0, in Horner order.
const EXP_POLY: [f32; 7] = [
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `e^x` for 16 lanes, `x <= 0` (scores minus their maximum): `2^n * p(r)` with
/// `x = n ln 2 + r`, `|r| <= ln 2 / 2`, a degree-6 polynomial (relative error ~2e-7); exactly
/// 0 below -70 (`e^-70` ~ 4e-31, far below an f32 ulp of the row's largest weight, 1). A
/// masked score (`-3.4e38` added) used to come out as `e^-87` ~ 1.6e-38, whose product with
/// `1 / sum` is subnormal: every such lane took a microcode assist, and a causal mask masks
/// half the scores (probe prefill softmax ~0.24 ms per node).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-70.0));
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n))
}

/// `e^x` for 8 lanes on AVX2, as [`exp16`]; `2^n` is built in the exponent bits, and inputs
/// are clamped at -80 rather than -87 so that `p(r) 2^n` stays a normal number in the lanes
/// set to 0 after (a subnormal product takes a microcode assist on some CPUs).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-70.0));
    let x = _mm256_max_ps(x, _mm256_set1_ps(-80.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    _mm256_and_ps(_mm256_mul_ps(p, two_n), keep)
}

/// In place: `row[j] = e^(row[j] - max) / sum`, on `kernel`.
///
/// # Safety
/// `kernel` runs on this CPU.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn softmax_row(kernel: F32Kernel, row: &mut [f32]) {
    // SAFETY: the caller's.
    unsafe {
        match kernel {
            F32Kernel::Avx512 => softmax_row_avx512(row),
            F32Kernel::Avx2 => softmax_row_avx2(row),
        }
    }
}

/// [`softmax_row`] on AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row_avx512(row: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = row.len();
    let full = n / 16 * 16;
    let tail_mask: __mmask16 = ((1u32 << (n - full)) - 1) as __mmask16;
    let p = row.as_mut_ptr();
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    // SAFETY: every access is below n (whole vectors, then the masked tail).
    unsafe {
        for i in (0..full).step_by(16) {
            mx = _mm512_max_ps(mx, _mm512_loadu_ps(p.add(i)));
        }
        mx = _mm512_mask_max_ps(
            mx,
            tail_mask,
            mx,
            _mm512_maskz_loadu_ps(tail_mask, p.add(full)),
        );
        let m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        let mut sum = _mm512_setzero_ps();
        for i in (0..full).step_by(16) {
            let y = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), m));
            _mm512_storeu_ps(p.add(i), y);
            sum = _mm512_add_ps(sum, y);
        }
        if tail_mask != 0 {
            let y = exp16(_mm512_sub_ps(
                _mm512_maskz_loadu_ps(tail_mask, p.add(full)),
                m,
            ));
            _mm512_mask_storeu_ps(p.add(full), tail_mask, y);
            sum = _mm512_mask_add_ps(sum, tail_mask, sum, y);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for i in (0..full).step_by(16) {
            _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
        }
        if tail_mask != 0 {
            let y = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail_mask, p.add(full)), inv);
            _mm512_mask_storeu_ps(p.add(full), tail_mask, y);
        }
    }
}

/// [`softmax_row`] on AVX2 (8-lane sums, in another order than AVX-512's 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = row.len();
    let full = n / 8 * 8;
    let tail = n - full;
    let tail_mask = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(tail as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    let tail_lanes = _mm256_castsi256_ps(tail_mask);
    let p = row.as_mut_ptr();
    let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
    // SAFETY: every access is below n (whole vectors, then the masked tail).
    unsafe {
        for i in (0..full).step_by(8) {
            mx = _mm256_max_ps(mx, _mm256_loadu_ps(p.add(i)));
        }
        if tail > 0 {
            let t = _mm256_maskload_ps(p.add(full), tail_mask);
            mx = _mm256_blendv_ps(mx, _mm256_max_ps(mx, t), tail_lanes);
        }
        let m = _mm256_set1_ps(horizontal(mx, _mm_max_ps));
        let mut sum = _mm256_setzero_ps();
        for i in (0..full).step_by(8) {
            let y = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
            _mm256_storeu_ps(p.add(i), y);
            sum = _mm256_add_ps(sum, y);
        }
        if tail > 0 {
            let t = _mm256_maskload_ps(p.add(full), tail_mask);
            let y = _mm256_and_ps(exp8(_mm256_sub_ps(t, m)), tail_lanes);
            _mm256_maskstore_ps(p.add(full), tail_mask, y);
            sum = _mm256_add_ps(sum, y);
        }
        let inv = _mm256_set1_ps(1.0 / horizontal(sum, _mm_add_ps));
        for i in (0..full).step_by(8) {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv));
        }
        if tail > 0 {
            let y = _mm256_mul_ps(_mm256_maskload_ps(p.add(full), tail_mask), inv);
            _mm256_maskstore_ps(p.add(full), tail_mask, y);
        }
    }
}

/// `op` (max or add) over the 8 lanes of `v`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn horizontal(
    v: std::arch::x86_64::__m256,
    op: unsafe fn(
        std::arch::x86_64::__m128,
        std::arch::x86_64::__m128,
    ) -> std::arch::x86_64::__m128,
) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: `op` is an SSE intrinsic, which every x86_64 CPU runs.
    unsafe {
        let h = op(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = op(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(op(h, _mm_shuffle_ps::<1>(h, h)))
    }
}

/// `o[r] = sum_j s[r][j] v[j]` for the first `rows` (at most [`RB`]) rows of `s` (stride
/// `np`, `keys` used) and `v` (`[keys, ep]`), into `o` (`[RB, ep]`; rows up to the next
/// multiple of 4 are written too): [`VC`] value rows at a time, 4 rows by up to 64 columns
/// (AVX-512) or 16 (AVX2) per pass over them.
///
/// # Safety
/// `kernel` runs on this CPU.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted_values(
    kernel: F32Kernel,
    s: &[f32],
    np: usize,
    rows: usize,
    keys: usize,
    v: &[f32],
    ep: usize,
    o: &mut [f32],
) {
    assert!(rows <= RB && s.len() >= RB * np && v.len() >= keys * ep && o.len() >= RB * ep);
    assert!(keys <= np);
    for j0 in (0..keys).step_by(VC) {
        let js = j0..VC.min(keys - j0) + j0;
        for r0 in (0..rows).step_by(4) {
            let mut c0 = 0;
            while c0 < ep {
                let w = match kernel {
                    F32Kernel::Avx512 => (ep - c0).min(64) / 16,
                    F32Kernel::Avx2 => 1,
                };
                let at = Pv {
                    r0,
                    c0,
                    js: js.clone(),
                };
                // SAFETY: the CPU is the caller's; the asserts above bound every row and
                // column these kernels touch.
                unsafe {
                    match (kernel, w) {
                        (F32Kernel::Avx2, _) => pv_avx2(s, np, v, ep, o, at),
                        (_, 4) => pv::<4>(s, np, v, ep, o, at),
                        (_, 3) => pv::<3>(s, np, v, ep, o, at),
                        (_, 2) => pv::<2>(s, np, v, ep, o, at),
                        _ => pv::<1>(s, np, v, ep, o, at),
                    }
                }
                c0 += w * 16;
            }
        }
    }
}

/// Where one [`pv`] call works: rows `r0..r0 + 4`, columns from `c0`, value rows `js`.
struct Pv {
    r0: usize,
    c0: usize,
    js: std::ops::Range<usize>,
}

/// Rows `r0..r0 + 4`, columns `c0..c0 + 16 W` of [`weighted_values`] over the value rows
/// `js`: stored for the first rows, added after.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pv<const W: usize>(s: &[f32], np: usize, v: &[f32], ep: usize, o: &mut [f32], at: Pv) {
    use std::arch::x86_64::*;
    let Pv { r0, c0, js } = at;
    let first = js.start == 0;
    let mut acc = [[_mm512_setzero_ps(); W]; 4];
    let (sp, vp) = (s.as_ptr(), v.as_ptr());
    for j in js {
        // SAFETY: j < keys, rows r0..r0 + 4 <= RB and columns c0 + 16 W <= ep (the caller).
        unsafe {
            let mut vv = [_mm512_setzero_ps(); W];
            for (w, vv) in vv.iter_mut().enumerate() {
                *vv = _mm512_loadu_ps(vp.add(j * ep + c0 + 16 * w));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*sp.add((r0 + r) * np + j));
                for w in 0..W {
                    acc[w] = _mm512_fmadd_ps(x, vv[w], acc[w]);
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (w, a) in acc.iter().enumerate() {
            // SAFETY: as above.
            unsafe {
                let out = o.as_mut_ptr().add((r0 + r) * ep + c0 + 16 * w);
                let y = if first {
                    *a
                } else {
                    _mm512_add_ps(*a, _mm512_loadu_ps(out))
                };
                _mm512_storeu_ps(out, y);
            }
        }
    }
}

/// [`pv`] on AVX2: rows `r0..r0 + 4`, columns `c0..c0 + 16` (8 accumulators).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pv_avx2(s: &[f32], np: usize, v: &[f32], ep: usize, o: &mut [f32], at: Pv) {
    use std::arch::x86_64::*;
    let Pv { r0, c0, js } = at;
    let first = js.start == 0;
    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
    let (sp, vp) = (s.as_ptr(), v.as_ptr());
    for j in js {
        // SAFETY: j < keys, rows r0..r0 + 4 <= RB and columns c0 + 16 <= ep (the caller).
        unsafe {
            let vv = [
                _mm256_loadu_ps(vp.add(j * ep + c0)),
                _mm256_loadu_ps(vp.add(j * ep + c0 + 8)),
            ];
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_ps(*sp.add((r0 + r) * np + j));
                acc[0] = _mm256_fmadd_ps(x, vv[0], acc[0]);
                acc[1] = _mm256_fmadd_ps(x, vv[1], acc[1]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (w, a) in acc.iter().enumerate() {
            // SAFETY: as above.
            unsafe {
                let out = o.as_mut_ptr().add((r0 + r) * ep + c0 + 8 * w);
                let y = if first {
                    *a
                } else {
                    _mm256_add_ps(*a, _mm256_loadu_ps(out))
                };
                _mm256_storeu_ps(out, y);
            }
        }
    }
}

/// Softmax over the last axis of an f32 tensor on edgevlm's row softmax (`softmax_row`). tract
/// 0.23.9 runs rows whose length is not a multiple of 4 (a decoder's prompt of 85 tokens
/// attending to itself) through per-row calls of its generic max / exp-sum / scale kernels:
/// ~16 ns per element, a sixth of an int8 decoder's prefill. Whatever the fast path does not
/// take (another layout) goes to tract's op, kept as `fallback`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LastAxisSoftmax {
    /// The op this replaced.
    pub fallback: Softmax,
}

impl Op for LastAxisSoftmax {
    fn name(&self) -> StaticName {
        "EdgevlmSoftmax".into()
    }

    op_as_typed_op!();
}

impl EvalOp for LastAxisSoftmax {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        match crate::q4mm::f32_kernel() {
            Some(kernel) => self.run(kernel, ctx, inputs),
            None => self.fallback.eval(ctx, inputs),
        }
    }
}

impl LastAxisSoftmax {
    /// [`EvalOp::eval`] on `kernel`'s row softmax, which must run on this CPU.
    fn run(
        &self,
        kernel: F32Kernel,
        ctx: &EvalContext,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let natural = x.strides() == &*Tensor::natural_strides(x.shape());
        let row = x.shape().last().copied().unwrap_or(0);
        if !natural || row == 0 || x.datum_type() != f32::datum_type() {
            return self.fallback.eval(ctx, inputs);
        }
        let mut out = args_1!(inputs).into_tensor();
        {
            let mut plain = out.try_as_plain_ram_mut()?;
            let data = plain.as_slice_mut::<f32>()?;
            let total = data.len();
            tract_linalg::multithread::par_chunks_mut(data, row, total, |_, chunk| {
                #[cfg(target_arch = "x86_64")]
                for r in chunk.chunks_exact_mut(row) {
                    // SAFETY: `kernel` runs on this CPU (the caller's).
                    unsafe { softmax_row(kernel, r) };
                }
                #[cfg(target_arch = "x86_64")]
                return Ok(());
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = (kernel, chunk);
                    bail!("edgevlm's softmax kernel runs on x86_64 only (f32_kernel is none elsewhere)")
                }
            })?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for LastAxisSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}

/// Replaces every f32 softmax over the last axis by a [`LastAxisSoftmax`] when this CPU has
/// AVX-512 or AVX2 (run after [`fuse_attention`], which takes the softmaxes of whole
/// attention blocks). Returns how many were replaced.
pub fn fast_softmaxes(model: &mut TypedModel) -> TractResult<usize> {
    if crate::q4mm::f32_kernel().is_none() {
        return Ok(0);
    }
    let mut found = vec![];
    for node in model.nodes() {
        let Some(sm) = node.op_as::<Softmax>() else {
            continue;
        };
        let fact = model.outlet_fact(node.inputs[0])?;
        if fact.datum_type == f32::datum_type()
            && fact.rank() > 0
            && sm.axes.as_slice() == [fact.rank() - 1]
            && sm.kind == SoftmaxKind::Softmax
            && sm.quant_output_dt.is_none()
        {
            found.push((node.id, sm.clone()));
        }
    }
    for (id, fallback) in &found {
        let node = model.node(*id);
        let patch = TypedModelPatch::replace_single_op(
            model,
            node,
            &node.inputs,
            LastAxisSoftmax {
                fallback: fallback.clone(),
            },
        )?;
        patch.apply(model)?;
    }
    Ok(found.len())
}

/// The single consumer of `outlet`, if it has exactly one.
fn only_successor(model: &TypedModel, outlet: OutletId) -> Option<usize> {
    let succ = &model.outlet_successors(outlet);
    (succ.len() == 1).then(|| succ[0].node)
}

/// The scalar value of a constant single-element f32 outlet.
fn scalar_const(model: &TypedModel, outlet: OutletId) -> TractResult<Option<f32>> {
    let fact = model.outlet_fact(outlet)?;
    Ok(match &fact.konst {
        Some(k) if k.len() == 1 && k.datum_type() == f32::datum_type() => {
            Some(k.cast_to_scalar::<f32>()?)
        }
        _ => None,
    })
}

/// Is `node` a static per-tensor quantize whose only consumer is a dequantize (a static QDQ
/// export's fake quantization), or such a pair already made one op (by
/// [`crate::quant::fold_float_dequants`])? The pair as one op, and its last node.
fn fake_quant(
    model: &TypedModel,
    node: Option<usize>,
) -> TractResult<Option<(LinearQuant, usize)>> {
    let Some(n) = node.map(|n| model.node(n)) else {
        return Ok(None);
    };
    match n.op_as::<LinearQuant>() {
        Some(op) if matches!(op.out, crate::quant::QuantOut::Float { .. }) => {
            Ok(Some((op.clone(), n.id)))
        }
        Some(_) => Ok(None),
        None => crate::quant::quantize_pair(model, n),
    }
}

/// Does `op` compute `inputs -> output` (a plain f32 einsum), up to a renaming of its axis
/// letters that keeps distinct letters distinct?
fn einsum_fits(op: &EinSum, inputs: [&str; 2], output: &str) -> bool {
    let (got_inputs, got_outputs) = op.axes.to_strs();
    if got_inputs.len() != 2 || got_outputs.len() != 1 || op.q_params.is_some() {
        return false;
    }
    let pairs = inputs
        .iter()
        .zip(&got_inputs)
        .chain(std::iter::once((&output, &got_outputs[0])));
    let mut renaming: Vec<(char, char)> = vec![];
    for (want, got) in pairs {
        if want.chars().count() != got.chars().count() {
            return false;
        }
        for (w, g) in want.chars().zip(got.chars()) {
            match renaming.iter().find(|(ww, gg)| *ww == w || *gg == g) {
                Some(&(ww, gg)) if ww == w && gg == g => {}
                Some(_) => return false,
                None => renaming.push((w, g)),
            }
        }
    }
    true
}

/// The two einsums of an attention block in `layout`: scores (`q`, `k` -> `[.., rows,
/// keys]`) and values (weights, `v` -> output); x batch, r rows, h heads, k keys, d and e
/// widths, g groups, p query heads per group.
fn attention_einsums(layout: Layout) -> [([&'static str; 2], &'static str); 2] {
    match layout {
        Layout::RowsMajor => [(["xrhd", "xkhd"], "xhrk"), (["xhrk", "xkhe"], "xrhe")],
        Layout::Grouped => [(["xgprd", "xgkd"], "xgprk"), (["xgprk", "xgke"], "xgpre")],
    }
}

/// Do `q`, `k` and `v` share their batch, head (group) and width axes exactly, as
/// [`FusedAttention`] needs? tract's einsum would also broadcast an axis of size 1.
fn operands_fit(layout: Layout, q: &ShapeFact, k: &ShapeFact, v: &ShapeFact) -> bool {
    // (axis of q, axis of k, axis of v) that must be equal; keys of k and v too.
    let same: &[(usize, usize, usize)] = match layout {
        Layout::RowsMajor => &[(0, 0, 0), (2, 2, 2)],
        Layout::Grouped => &[(0, 0, 0), (1, 1, 1)],
    };
    let (d_q, d_k, keys) = match layout {
        Layout::RowsMajor => (3, 3, 1),
        Layout::Grouped => (4, 3, 2),
    };
    same.iter().all(|&(a, b, c)| q[a] == k[b] && q[a] == v[c])
        && q[d_q] == k[d_k]
        && k[keys] == v[keys]
}

/// The dims a reshape at axis 1 turns into others.
type HeadsReshape = (TVec<TDim>, TVec<TDim>);

/// Is `node` a reshape at axis 1 from `from` axes to `to` axes (the merge or split of a
/// grouped attention's heads), with one consumer? Its successor and its dims.
fn heads_reshape(
    model: &TypedModel,
    node: usize,
    from: usize,
    to: usize,
) -> Option<(usize, HeadsReshape)> {
    let n = model.node(node);
    match n.op_as::<AxisOp>()? {
        AxisOp::Reshape(1, f, t) if f.len() == from && t.len() == to => {
            let next = only_successor(model, OutletId::new(node, 0))?;
            Some((next, (f.clone(), t.clone())))
        }
        _ => None,
    }
}

/// Is `next` (the only consumer of `at`) a Mul of `at` by a constant scalar? The scalar
/// and the Mul.
fn scale_step(
    model: &TypedModel,
    at: usize,
    next: Option<usize>,
) -> TractResult<Option<(f32, usize)>> {
    let Some(n) = next.map(|n| model.node(n)) else {
        return Ok(None);
    };
    match n.op_as::<TypedBinOp>() {
        Some(bin) if bin.0.is::<Mul>() && n.inputs.len() == 2 => {
            let other = n.inputs[(n.inputs[0].node == at) as usize];
            Ok(scalar_const(model, other)?.map(|s| (s, n.id)))
        }
        _ => Ok(None),
    }
}

/// Finds attention blocks: `EinSum(q, k) [-> Quantize -> Dequantize] [-> Mul(scalar)] [->
/// Add(bias)] -> Softmax(last axis) [-> Quantize -> Dequantize] -> EinSum(., v)` (the
/// quantize -> dequantize pairs as a static QDQ export has them) whose intermediate results
/// have no other consumer, in either [`Layout`] (for [`Layout::Grouped`], with the reshapes
/// that merge the heads for the softmax and split them again around it), and replaces each
/// by a [`FusedAttention`], when this CPU has AVX-512 or AVX2. Run after tract's last
/// declutter. Returns how many were fused.
pub fn fuse_attention(model: &mut TypedModel) -> TractResult<usize> {
    if crate::q4mm::f32_kernel().is_none() {
        return Ok(0);
    }
    struct Chain {
        first: usize,
        last: usize,
        scale: f32,
        bias: Option<OutletId>,
        layout: Layout,
        score_quant: Option<LinearQuant>,
        scaled_quant: Option<LinearQuant>,
        weight_quant: Option<LinearQuant>,
    }
    let mut chains = vec![];
    let mut flat = vec![];
    for node in model.nodes() {
        let Some(op) = node.op_as::<EinSum>() else {
            continue;
        };
        let Some(layout) = [Layout::RowsMajor, Layout::Grouped].into_iter().find(|&l| {
            let [(inputs, output), _] = attention_einsums(l);
            einsum_fits(op, inputs, output)
        }) else {
            flat.extend(flat_chain(model, node)?);
            continue;
        };
        let facts = model.node_input_facts(node.id)?;
        if facts
            .iter()
            .any(|f| f.datum_type != f32::datum_type() || f.konst.is_some())
        {
            continue;
        }
        let mut at = node.id;
        let mut scale = 1.0;
        let mut bias = None;
        let mut next = only_successor(model, OutletId::new(at, 0));
        // An optional quantize -> dequantize, an optional scalar Mul, another optional
        // quantize -> dequantize, then an optional Add, in that order; for the grouped layout
        // the merge of the heads, [x, g, p, r, k] -> [x, h, r, k], before the Add, anywhere
        // among the others (a model read back from the load cache has the Mul pushed before
        // it).
        let mut scaled = false;
        let mut merge: Option<HeadsReshape> = None;
        let (mut score_quant, mut scaled_quant) = (None, None);
        loop {
            if scaled && scaled_quant.is_none() {
                if let Some((fq, dq)) = fake_quant(model, next)? {
                    (scaled_quant, at) = (Some(fq), dq);
                    next = only_successor(model, OutletId::new(at, 0));
                    continue;
                }
            }
            if !scaled && score_quant.is_none() {
                if let Some((fq, dq)) = fake_quant(model, next)? {
                    (score_quant, at) = (Some(fq), dq);
                    next = only_successor(model, OutletId::new(at, 0));
                    continue;
                }
                // The merge of the heads between the quantize and the dequantize, where
                // tract's declutter leaves it.
                if let (Layout::Grouped, None, Some(n)) = (layout, &merge, next) {
                    let around = crate::quant::quantize_pair_around(model, model.node(n))?;
                    if let Some((fq, reshape, dq)) = around {
                        if let Some((after, dims)) = heads_reshape(model, reshape, 2, 1) {
                            if after == dq {
                                (score_quant, merge, at) = (Some(fq), Some(dims), dq);
                                next = only_successor(model, OutletId::new(at, 0));
                                continue;
                            }
                        }
                    }
                }
            }
            if !scaled {
                if let Some((s, n)) = scale_step(model, at, next)? {
                    (scale, scaled, at) = (s, true, n);
                    next = only_successor(model, OutletId::new(at, 0));
                    continue;
                }
            }
            if let (Layout::Grouped, None, Some(reshape)) = (layout, &merge, next) {
                if let Some((n, dims)) = heads_reshape(model, reshape, 2, 1) {
                    (at, next, merge) = (reshape, Some(n), Some(dims));
                    continue;
                }
            }
            break;
        }
        if layout == Layout::Grouped && merge.is_none() {
            continue;
        }
        if let Some(n) = next.map(|n| model.node(n)) {
            if let Some(bin) = n.op_as::<TypedBinOp>() {
                if bin.0.is::<Add>() && n.inputs.len() == 2 {
                    let other = n.inputs[(n.inputs[0].node == at) as usize];
                    let fact = model.outlet_fact(other)?;
                    let scores = &model.outlet_fact(OutletId::new(at, 0))?.shape;
                    let pad = scores.rank().saturating_sub(fact.rank());
                    // Each bias axis 1, the scores' or, when both are symbolic, possibly
                    // the scores' (a decoder's mask of `total_sequence_length` keys against
                    // `past + sequence_length` ones); `eval` checks the sizes it gets.
                    let broadcasts = fact.datum_type == f32::datum_type()
                        && fact.rank() <= 4
                        && scores.rank() == 4
                        && fact
                            .shape
                            .iter()
                            .zip(scores.iter().skip(pad))
                            .all(|(b, s)| {
                                b.is_one()
                                    || b == s
                                    || (b.as_i64().is_none() && s.as_i64().is_none())
                            });
                    if broadcasts {
                        bias = Some(other);
                        at = n.id;
                        next = only_successor(model, OutletId::new(at, 0));
                    }
                }
            }
        }
        let Some(sm) = next.map(|n| model.node(n)) else {
            continue;
        };
        let is_softmax = sm.op_as::<Softmax>().is_some_and(|s| {
            s.axes.as_slice() == [3]
                && s.kind == SoftmaxKind::Softmax
                && s.quant_output_dt.is_none()
        });
        if !is_softmax {
            continue;
        }
        let mut weights = OutletId::new(sm.id, 0);
        let mut next = only_successor(model, weights);
        // An optional quantize -> dequantize of the weights, before or after the split of
        // the heads.
        let mut weight_quant = None;
        if let Some((fq, dq)) = fake_quant(model, next)? {
            (weight_quant, weights) = (Some(fq), OutletId::new(dq, 0));
            next = only_successor(model, weights);
        }
        if layout == Layout::Grouped {
            // [x, h, r, k] -> [x, g, p, r, k], splitting the heads as they were merged.
            let Some(reshape) = next else { continue };
            next = match (heads_reshape(model, reshape, 1, 2), &merge) {
                (Some((n, (from, to))), Some((merged_from, merged_to)))
                    if from == *merged_to && to == *merged_from =>
                {
                    Some(n)
                }
                _ => None,
            };
            weights = OutletId::new(reshape, 0);
            if weight_quant.is_none() {
                if let Some((fq, dq)) = fake_quant(model, next)? {
                    (weight_quant, weights) = (Some(fq), OutletId::new(dq, 0));
                    next = only_successor(model, weights);
                }
            }
        }
        let Some(pv) = next.map(|n| model.node(n)) else {
            continue;
        };
        let [_, (inputs, output)] = attention_einsums(layout);
        let pv_ok = pv
            .op_as::<EinSum>()
            .is_some_and(|op| einsum_fits(op, inputs, output))
            && pv.inputs[0] == weights
            && model.outlet_fact(pv.inputs[1])?.datum_type == f32::datum_type()
            && operands_fit(
                layout,
                &model.outlet_fact(node.inputs[0])?.shape,
                &model.outlet_fact(node.inputs[1])?.shape,
                &model.outlet_fact(pv.inputs[1])?.shape,
            );
        if pv_ok {
            chains.push(Chain {
                first: node.id,
                last: pv.id,
                scale,
                bias,
                layout,
                score_quant,
                scaled_quant,
                weight_quant,
            });
        }
    }
    for chain in &chains {
        let first = model.node(chain.first);
        let last = model.node(chain.last);
        let mut patch = TypedModelPatch::new(format!("edgevlm fused attention {}", first.name));
        let mut wires = vec![first.inputs[0], first.inputs[1], last.inputs[1]];
        wires.extend(chain.bias);
        let taps = patch.taps(model, &wires)?;
        let out = patch.wire_node(
            format!("{}.edgevlm_attention", first.name),
            FusedAttention {
                scale: chain.scale,
                layout: chain.layout,
                score_quant: chain.score_quant.clone(),
                scaled_quant: chain.scaled_quant.clone(),
                weight_quant: chain.weight_quant.clone(),
            },
            &taps,
        )?[0];
        patch.shunt_outside(model, OutletId::new(chain.last, 0), out)?;
        patch.apply(model)?;
    }
    let mut fused = chains.len();
    for chain in &flat {
        fused += fuse_flat(model, chain)? as usize;
    }
    Ok(fused)
}

/// An einsum's axes by where they appear, for operands `a`, `b` and output `o`: in all three
/// (`batch`), in `a` and `o` only (`a_out`), in `b` and `o` only (`b_out`), in `a` and `b`
/// only (`summed`); the first three in `o`'s order, `summed` in `a`'s.
#[derive(Debug, PartialEq)]
struct Roles {
    a: String,
    b: String,
    o: String,
    batch: String,
    a_out: String,
    b_out: String,
    summed: String,
}

impl Roles {
    /// `op`'s roles; `None` unless it is a plain two-operand einsum whose every axis appears
    /// at most once per operand and in two or three of them (no sum over one operand's axis).
    fn of(op: &EinSum) -> Option<Roles> {
        let (inputs, outputs) = op.axes.to_strs();
        if inputs.len() != 2 || outputs.len() != 1 || op.q_params.is_some() {
            return None;
        }
        let (a, b, o) = (inputs[0].clone(), inputs[1].clone(), outputs[0].clone());
        let once = |s: &str| s.chars().all(|c| s.matches(c).count() == 1);
        if !(once(&a) && once(&b) && once(&o)) {
            return None;
        }
        let pick = |from: &str, want: [bool; 3]| -> String {
            from.chars()
                .filter(|&c| [a.contains(c), b.contains(c), o.contains(c)] == want)
                .collect()
        };
        let roles = Roles {
            batch: pick(&o, [true, true, true]),
            a_out: pick(&o, [true, false, true]),
            b_out: pick(&o, [false, true, true]),
            summed: pick(&a, [true, true, false]),
            a: a.clone(),
            b: b.clone(),
            o: o.clone(),
        };
        let counted = roles.batch.len() * 3
            + (roles.a_out.len() + roles.b_out.len() + roles.summed.len()) * 2;
        (counted == a.len() + b.len() + o.len()).then_some(roles)
    }
}

/// A single-head attention block [`fuse_flat`] replaces: the scores' and the values'
/// einsums, what lies between them, and how to lay the operands out for [`FusedAttention`].
struct FlatChain {
    first: usize,
    last: usize,
    scale: f32,
    score_quant: Option<LinearQuant>,
    scaled_quant: Option<LinearQuant>,
    weight_quant: Option<LinearQuant>,
    /// Batch items and query rows: the products of `q`'s leading batch and row axes.
    batch: TDim,
    rows: TDim,
    /// Keys: the product of `k`'s key axes, which are also `v`'s.
    keys: TDim,
    /// The output's batch axes (before its rows and its width), and whether its width comes
    /// last (else right after the batch axes).
    out_batch: usize,
    width_last: bool,
}

/// The product of `dims`.
fn product(dims: &[TDim]) -> TDim {
    dims.iter().product()
}

/// Is `node` an axis change that keeps its input's order in memory (a reshape, or a unit
/// axis added or removed)?
fn keeps_memory_order(node: &TypedNode) -> bool {
    matches!(
        node.op_as::<AxisOp>(),
        Some(AxisOp::Reshape(..) | AxisOp::Add(_) | AxisOp::Rm(_))
    )
}

/// [`fuse_attention`]'s form for attention over one head, or over heads that lead as batch
/// axes: `q [batch.., rows.., d]`, `k [batch.., keys.., d]`, `v [batch.., keys.., e]`, scores
/// `[batch.., rows.., keys..]` and an output `[batch.., rows.., e]` or `[batch.., e, rows..]`,
/// with reshapes anywhere between the two einsums. That is a single-head block (a small
/// classifier's, or a CNN's feature map attended as tokens) once tract's declutter has
/// pushed the tokens' reshapes through it: the height and width of a feature map stay two
/// axes in both products and are merged only for the softmax, and the output may come out
/// transposed. Every reshape keeps the order in memory, so a row of the softmax is one query
/// row's keys exactly when its length is the keys' product. An additive bias is not taken.
fn flat_chain(model: &TypedModel, node: &TypedNode) -> TractResult<Option<FlatChain>> {
    let Some(s) = node.op_as::<EinSum>().and_then(Roles::of) else {
        return Ok(None);
    };
    let (nb, nr, nk) = (s.batch.len(), s.a_out.len(), s.b_out.len());
    let scores_fit = s.summed.len() == 1
        && nr > 0
        && nk > 0
        && s.a == format!("{}{}{}", s.batch, s.a_out, s.summed)
        && s.b == format!("{}{}{}", s.batch, s.b_out, s.summed)
        && s.o == format!("{}{}{}", s.batch, s.a_out, s.b_out);
    if !scores_fit {
        return Ok(None);
    }
    let (qf, kf) = (
        model.outlet_fact(node.inputs[0])?,
        model.outlet_fact(node.inputs[1])?,
    );
    if [qf, kf]
        .iter()
        .any(|f| f.datum_type != f32::datum_type() || f.konst.is_some())
    {
        return Ok(None);
    }
    let (q, k) = (qf.shape.to_tvec(), kf.shape.to_tvec());
    if q[..nb] != k[..nb] || q.last() != k.last() {
        return Ok(None);
    }
    let (batch, rows, keys) = (
        product(&q[..nb]),
        product(&q[nb..nb + nr]),
        product(&k[nb..nb + nk]),
    );
    // The scores' optional quantize -> dequantize, an optional scalar Mul, then another
    // optional quantize -> dequantize, with reshapes anywhere.
    let (mut at, mut scale, mut scaled) = (node.id, 1.0, false);
    let (mut score_quant, mut scaled_quant) = (None, None);
    let mut next = only_successor(model, OutletId::new(at, 0));
    loop {
        if let Some(n) = next.filter(|&n| keeps_memory_order(model.node(n))) {
            at = n;
        } else if let (false, None, Some((fq, dq))) =
            (scaled, &score_quant, fake_quant(model, next)?)
        {
            (score_quant, at) = (Some(fq), dq);
        } else if let (true, None, Some((fq, dq))) =
            (scaled, &scaled_quant, fake_quant(model, next)?)
        {
            (scaled_quant, at) = (Some(fq), dq);
        } else if let (false, Some((x, n))) = (scaled, scale_step(model, at, next)?) {
            (scale, scaled, at) = (x, true, n);
        } else {
            break;
        }
        next = only_successor(model, OutletId::new(at, 0));
    }
    let Some(sm) = next.map(|n| model.node(n)) else {
        return Ok(None);
    };
    let input = model.outlet_fact(sm.inputs[0])?;
    let is_softmax = sm.op_as::<Softmax>().is_some_and(|op| {
        op.axes.as_slice() == [input.rank() - 1]
            && op.kind == SoftmaxKind::Softmax
            && op.quant_output_dt.is_none()
    });
    if !is_softmax || input.shape.last() != Some(&keys) {
        return Ok(None);
    }
    // The weights' optional quantize -> dequantize, with reshapes anywhere.
    let mut weights = OutletId::new(sm.id, 0);
    let mut weight_quant = None;
    loop {
        let next = only_successor(model, weights);
        if let Some(n) = next.filter(|&n| keeps_memory_order(model.node(n))) {
            weights = OutletId::new(n, 0);
        } else if let (None, Some((fq, dq))) = (&weight_quant, fake_quant(model, next)?) {
            (weight_quant, weights) = (Some(fq), OutletId::new(dq, 0));
        } else {
            break;
        }
    }
    let Some(pv) = only_successor(model, weights).map(|n| model.node(n)) else {
        return Ok(None);
    };
    let Some(p) = pv.op_as::<EinSum>().and_then(Roles::of) else {
        return Ok(None);
    };
    let (mb, mr) = (p.batch.len(), p.a_out.len());
    let width_last = p.o == format!("{}{}{}", p.batch, p.a_out, p.b_out);
    let values_fit = pv.inputs[0] == weights
        && p.b_out.len() == 1
        && mr > 0
        && !p.summed.is_empty()
        && p.a == format!("{}{}{}", p.batch, p.a_out, p.summed)
        && p.b == format!("{}{}{}", p.batch, p.summed, p.b_out)
        && (width_last || p.o == format!("{}{}{}", p.batch, p.b_out, p.a_out));
    if !values_fit {
        return Ok(None);
    }
    let (wf, vf) = (
        model.outlet_fact(pv.inputs[0])?,
        model.outlet_fact(pv.inputs[1])?,
    );
    if vf.datum_type != f32::datum_type() {
        return Ok(None);
    }
    let (w, v) = (wf.shape.to_tvec(), vf.shape.to_tvec());
    // The same batch items, rows and keys on both sides, in the same order in memory.
    let same = w[..mb] == v[..mb]
        && product(&w[..mb]) == batch
        && product(&w[mb..mb + mr]) == rows
        && product(&w[mb + mr..]) == keys
        && product(&v[mb..v.len() - 1]) == keys;
    Ok(same.then_some(FlatChain {
        first: node.id,
        last: pv.id,
        scale,
        score_quant,
        scaled_quant,
        weight_quant,
        batch,
        rows,
        keys,
        out_batch: mb,
        width_last,
    }))
}

/// Replaces `chain` by a [`FusedAttention`] in [`Layout::RowsMajor`] with one head, its
/// operands reshaped to `[batch, rows or keys, 1, width]` and its output back to the
/// block's. False (and the model unchanged) if the output would not come out the same shape.
fn fuse_flat(model: &mut TypedModel, chain: &FlatChain) -> TractResult<bool> {
    let first = model.node(chain.first);
    let last = model.node(chain.last);
    let name = format!("{}.edgevlm_attention", first.name);
    let mut patch = TypedModelPatch::new(format!("edgevlm fused attention {}", first.name));
    let wires = [first.inputs[0], first.inputs[1], last.inputs[1]];
    let taps = patch.taps(model, &wires)?;
    let mut operands = tvec![];
    for (i, (tap, lead)) in taps
        .iter()
        .zip([&chain.rows, &chain.keys, &chain.keys])
        .enumerate()
    {
        let shape = patch.outlet_fact(*tap)?.shape.to_tvec();
        let from: TVec<TDim> = shape[..shape.len() - 1].into();
        let to = tvec![chain.batch.clone(), lead.clone()];
        let mut x = *tap;
        if from != to {
            let reshape = AxisOp::Reshape(0, from, to);
            x = patch.wire_node(format!("{name}.in{i}"), reshape, &[x])?[0];
        }
        operands.push(patch.wire_node(format!("{name}.head{i}"), AxisOp::Add(2), &[x])?[0]);
    }
    let op = FusedAttention {
        scale: chain.scale,
        layout: Layout::RowsMajor,
        score_quant: chain.score_quant.clone(),
        scaled_quant: chain.scaled_quant.clone(),
        weight_quant: chain.weight_quant.clone(),
    };
    let mut out = patch.wire_node(&name, op, &operands)?[0];
    out = patch.wire_node(format!("{name}.unhead"), AxisOp::Rm(2), &[out])?[0];
    let want = model
        .outlet_fact(OutletId::new(chain.last, 0))?
        .shape
        .to_tvec();
    let nb = chain.out_batch;
    let lead: TVec<TDim> = if chain.width_last {
        want[..want.len() - 1].into()
    } else {
        want[..nb].iter().chain(&want[nb + 1..]).cloned().collect()
    };
    let from = tvec![chain.batch.clone(), chain.rows.clone()];
    if lead != from {
        let reshape = AxisOp::Reshape(0, from, lead);
        out = patch.wire_node(format!("{name}.out"), reshape, &[out])?[0];
    }
    if !chain.width_last {
        let moved = AxisOp::Move(want.len() - 1, nb);
        out = patch.wire_node(format!("{name}.width"), moved, &[out])?[0];
    }
    if patch.outlet_fact(out)?.shape.to_tvec() != want {
        return Ok(false);
    }
    patch.shunt_outside(model, OutletId::new(chain.last, 0), out)?;
    patch.apply(model)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::q4mm::tests::kernels_here;
    use tract_onnx::tract_core::ops::change_axes::wire_with_rank_broadcast;
    use tract_onnx::tract_core::ops::math::{add, mul};
    use tract_onnx::tract_core::ops::quant::{
        quantize_linear_i8, quantize_linear_u8, DequantizeLinearF32,
    };

    /// `n` eighths in [-1, 1], spread by `seed`: every dot product of them is exact in f32
    /// whatever the order of its sums, so a quantization of the scores rounds the same values
    /// in the kernel, in tract and in the definition.
    fn eighths(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 2_654_435_761 + seed * 97) % 17) as f32 - 8.0) / 8.0)
            .collect()
    }

    /// Against the definition in f64, in both layouts, over row blocks with tails, key
    /// panels with tails, value widths of one to five vectors (72 = 64 + 8), odd head sizes,
    /// one to three query heads per key / value head and every bias broadcast the matcher
    /// accepts, with 1 and 2 threads, on every kernel this CPU runs; in float and with a
    /// static QDQ export's quantize -> dequantize of the scores and of the weights.
    #[test]
    fn fused_attention_equals_the_definition() {
        use crate::quant::QuantOut;
        let kernels = kernels_here();
        if kernels.is_empty() {
            eprintln!("skipped: this CPU has neither AVX-512 nor AVX2");
            return;
        }
        let fill = eighths;
        // Scores in steps of 0.5 around a zero point of 3 (the largest saturate), weights in
        // steps of 1 / 255 as a calibrated softmax has them.
        let score_fq = LinearQuant {
            mult: 2.0,
            zero: 3,
            range: (-128, 127),
            out: QuantOut::Float {
                scale: 0.5,
                zero: 3,
            },
        };
        let weight_fq = LinearQuant {
            mult: 255.0,
            zero: 0,
            range: (0, 255),
            out: QuantOut::Float {
                scale: 1.0 / 255.0,
                zero: 0,
            },
        };
        let fq = |op: &LinearQuant, x: f64| -> f64 {
            let mut y = [x as f32];
            op.requantize_in_place(&mut y);
            y[0] as f64
        };
        // layout, batch, rows, groups, per group, d, keys, e, bias shape ([] = no bias)
        type Case = (Layout, [usize; 4], usize, usize, usize, &'static [usize]);
        let cases: [Case; 12] = [
            (Layout::RowsMajor, [1, 13, 2, 1], 16, 37, 72, &[1, 1, 1, 37]),
            (Layout::RowsMajor, [2, 8, 3, 1], 7, 8, 16, &[2, 1, 1, 8]),
            (
                Layout::RowsMajor,
                [1, 33, 1, 1],
                64,
                70,
                64,
                &[1, 1, 33, 70],
            ),
            (Layout::RowsMajor, [1, 5, 2, 1], 4, 1, 24, &[]),
            (Layout::RowsMajor, [2, 17, 2, 1], 12, 40, 40, &[2, 2, 17, 1]),
            // A decode step, a prefill and odd shapes of grouped-query attention.
            (Layout::Grouped, [1, 1, 4, 3], 64, 101, 64, &[1, 1, 1, 101]),
            (Layout::Grouped, [1, 11, 2, 3], 16, 11, 16, &[1, 1, 11, 11]),
            (Layout::Grouped, [2, 3, 3, 2], 7, 35, 72, &[2, 6, 3, 35]),
            (Layout::Grouped, [1, 9, 1, 5], 8, 33, 8, &[]),
            // Several blocks of query rows (the last partial), several chunks of value rows.
            (
                Layout::RowsMajor,
                [1, 70, 2, 1],
                16,
                300,
                40,
                &[1, 1, 70, 300],
            ),
            (Layout::Grouped, [1, 23, 2, 3], 24, 131, 16, &[1, 1, 1, 131]),
            // More than 64 output columns (two passes of the weighted sum) over 2 chunks.
            (Layout::RowsMajor, [1, 6, 1, 1], 8, 200, 72, &[]),
        ];
        for (layout, [batch, rows, groups, per_group], d, keys, e, bias_shape) in cases {
            let heads = groups * per_group;
            let q = fill(batch * rows * heads * d, 1);
            let k = fill(batch * keys * groups * d, 2);
            let v = fill(batch * keys * groups * e, 3);
            let bias = fill(bias_shape.iter().product(), 4);
            let scale = 0.37;
            // Offsets of (batch, query head, row, column) in q / the output, and of (batch,
            // key / value head, key, column) in k and v, for a row width `w`.
            type Offset = Box<dyn Fn(usize, usize, usize, usize, usize) -> usize>;
            let (q_at, kv_at): (Offset, Offset) = match layout {
                Layout::RowsMajor => (
                    Box::new(move |b, h, r, c, w| ((b * rows + r) * heads + h) * w + c),
                    Box::new(move |b, g, j, c, w| ((b * keys + j) * groups + g) * w + c),
                ),
                Layout::Grouped => (
                    Box::new(move |b, h, r, c, w| ((b * heads + h) * rows + r) * w + c),
                    Box::new(move |b, g, j, c, w| ((b * groups + g) * keys + j) * w + c),
                ),
            };
            let (q_shape, k_shape, v_shape, out_shape) = match layout {
                Layout::RowsMajor => (
                    vec![batch, rows, heads, d],
                    vec![batch, keys, groups, d],
                    vec![batch, keys, groups, e],
                    vec![batch, rows, heads, e],
                ),
                Layout::Grouped => (
                    vec![batch, groups, per_group, rows, d],
                    vec![batch, groups, keys, d],
                    vec![batch, groups, keys, e],
                    vec![batch, groups, per_group, rows, e],
                ),
            };
            let t = |data: &[f32], shape: &[usize]| {
                tract_ndarray::ArrayD::from_shape_vec(shape, data.to_vec())
                    .unwrap()
                    .into_tensor()
                    .into_tvalue()
            };
            let mut inputs = tvec!(t(&q, &q_shape), t(&k, &k_shape), t(&v, &v_shape));
            if !bias_shape.is_empty() {
                inputs.push(t(&bias, bias_shape));
            }
            // The bias value at (b, h, r, j), broadcast.
            let bias_at = |b: usize, h: usize, r: usize, j: usize| -> f64 {
                if bias_shape.is_empty() {
                    return 0.0;
                }
                let idx = [b, h, r, j];
                let mut at = 0;
                for axis in 0..4 {
                    let n = bias_shape[axis];
                    at = at * n + if n == 1 { 0 } else { idx[axis] };
                }
                bias[at] as f64
            };
            let runs = kernels
                .iter()
                .flat_map(|&k| [(k, 1), (k, 2)])
                .flat_map(|(k, t)| [(k, t, false), (k, t, true)]);
            for (kernel, threads, quantized) in runs {
                let (score_quant, weight_quant) = match quantized {
                    true => (Some(score_fq.clone()), Some(weight_fq.clone())),
                    false => (None, None),
                };
                // The weights' f32 softmax and the definition's f64 one may round a weight
                // near a half step apart: a step times |v| <= 1, at most twice per output.
                let tol = if quantized { 1e-5 + 2.0 / 255.0 } else { 1e-5 };
                let executor = crate::int8mm::tests::executor(threads);
                let out = tract_linalg::multithread::multithread_tract_scope(executor, || {
                    FusedAttention {
                        scale,
                        layout,
                        score_quant: score_quant.clone(),
                        scaled_quant: None,
                        weight_quant: weight_quant.clone(),
                    }
                    .run(kernel, inputs.clone())
                    .unwrap()
                });
                assert_eq!(out[0].shape(), &*out_shape);
                let got = out[0].try_as_plain_ram().unwrap();
                let got = got.as_slice::<f32>().unwrap();
                for b in 0..batch {
                    for h in 0..heads {
                        let g = h / per_group;
                        for r in 0..rows {
                            let s: Vec<f64> = (0..keys)
                                .map(|j| {
                                    let dot: f64 = (0..d)
                                        .map(|c| {
                                            q[q_at(b, h, r, c, d)] as f64
                                                * k[kv_at(b, g, j, c, d)] as f64
                                        })
                                        .sum();
                                    let dot = match &score_quant {
                                        Some(op) => fq(op, dot),
                                        None => dot,
                                    };
                                    dot * scale as f64 + bias_at(b, h, r, j)
                                })
                                .collect();
                            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                            let sum: f64 = w.iter().sum();
                            let w: Vec<f64> = match &weight_quant {
                                Some(op) => w.iter().map(|x| fq(op, x / sum)).collect(),
                                None => w.iter().map(|x| x / sum).collect(),
                            };
                            for c in 0..e {
                                let want: f64 = (0..keys)
                                    .map(|j| w[j] * v[kv_at(b, g, j, c, e)] as f64)
                                    .sum();
                                let got = got[q_at(b, h, r, c, e)] as f64;
                                assert!(
                                    (got - want).abs() < tol,
                                    "{layout:?} {batch}x{rows}x{groups}x{per_group}x{d}, keys \
                                     {keys}, e {e}, bias {bias_shape:?}, {kernel:?}, {threads} \
                                     thread(s), quantized {quantized}, at ({b}, {h}, {r}, {c}): \
                                     {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// An attention block's middle as tract's ONNX import wires it: the raw scores `s` scaled,
    /// masked by `bias` and softmaxed into the weights; when `quantized`, with a static QDQ
    /// export's pairs on the scores (i8, steps of 0.5) and on the weights (u8, steps of 1/255).
    fn scores_to_weights(
        m: &mut TypedModel,
        mut s: OutletId,
        scale: f32,
        bias: OutletId,
        quantized: bool,
    ) -> TractResult<OutletId> {
        if quantized {
            s = m.wire_node("scores.q", quantize_linear_i8(2.0, 3), &[s])?[0];
            s = m.wire_node("scores.dq", DequantizeLinearF32::new(0.5, 3), &[s])?[0];
        }
        let scale = m.add_const("scale", tensor0(scale))?;
        s = wire_with_rank_broadcast("scaled", m, mul(), &[s, scale])?[0];
        s = wire_with_rank_broadcast("masked", m, add(), &[s, bias])?[0];
        let softmax = Softmax::new(tvec![3], None, SoftmaxKind::Softmax);
        s = m.wire_node("softmax", softmax, &[s])?[0];
        if quantized {
            s = m.wire_node("weights.q", quantize_linear_u8(255.0, 0), &[s])?[0];
            let dq = DequantizeLinearF32::new(1.0 / 255.0, 0);
            s = m.wire_node("weights.dq", dq, &[s])?[0];
        }
        Ok(s)
    }

    /// A ViT attention block as tract's ONNX import wires it, in float and as a static QDQ
    /// export has it (the scores and the softmax's weights quantized and dequantized again):
    /// `fuse_attention` replaces it by one op that carries both quantizations, and the model
    /// gives tract's unfused results.
    #[test]
    fn quantized_attention_blocks_are_fused_and_equal_tract() {
        if crate::q4mm::f32_kernel().is_none() {
            eprintln!("skipped: this CPU has neither AVX-512 nor AVX2");
            return;
        }
        let (rows, heads, d, keys) = (37, 2, 16, 37);
        let fill = |n: usize, seed: usize| -> Tensor {
            let data = eighths(n, seed);
            let shape = [1, n / (heads * d), heads, d];
            tract_ndarray::ArrayD::from_shape_vec(&shape[..], data)
                .unwrap()
                .into_tensor()
        };
        let bias = tract_ndarray::ArrayD::from_shape_fn(&[1, 1, 1, keys][..], |i| {
            if i[3] % 5 == 0 {
                -1e4f32
            } else {
                0.0
            }
        })
        .into_tensor();
        let inputs = tvec!(
            fill(rows * heads * d, 1).into_tvalue(),
            fill(keys * heads * d, 2).into_tvalue(),
            fill(keys * heads * d, 3).into_tvalue(),
            bias.into_tvalue(),
        );
        for quantized in [false, true] {
            let build = || -> TractResult<TypedModel> {
                let mut m = TypedModel::default();
                let q = m.add_source("q", f32::fact([1, rows, heads, d]))?;
                let k = m.add_source("k", f32::fact([1, keys, heads, d]))?;
                let v = m.add_source("v", f32::fact([1, keys, heads, d]))?;
                let bias = m.add_source("bias", f32::fact([1, 1, 1, keys]))?;
                let scores = EinSum::new("xrhd,xkhd->xhrk".parse()?, f32::datum_type());
                let s = m.wire_node("scores", scores, &[q, k])?[0];
                let s = scores_to_weights(&mut m, s, 0.37, bias, quantized)?;
                let pv = EinSum::new("xhrk,xkhe->xrhe".parse()?, f32::datum_type());
                let out = m.wire_node("pv", pv, &[s, v])?[0];
                m.select_output_outlets(&[out])?;
                m.into_decluttered()
            };
            let want = build().unwrap().into_runnable().unwrap();
            let want = want.run(inputs.clone()).unwrap();
            let mut model = build().unwrap();
            assert_eq!(
                fuse_attention(&mut model).unwrap(),
                1,
                "quantized {quantized}"
            );
            let fused: Vec<&FusedAttention> = model
                .nodes()
                .iter()
                .filter_map(|n| n.op_as::<FusedAttention>())
                .collect();
            assert_eq!(fused.len(), 1);
            assert_eq!(fused[0].scale, 0.37);
            assert_eq!(fused[0].score_quant.is_some(), quantized);
            assert_eq!(fused[0].weight_quant.is_some(), quantized);
            let got = model.into_runnable().unwrap().run(inputs.clone()).unwrap();
            // tract's softmax and edgevlm's may round a weight near a half step apart.
            let tol = if quantized { 1e-5 + 2.0 / 255.0 } else { 1e-5 };
            assert_close(&got[0], &want[0], tol, &format!("quantized {quantized}"));
        }
    }

    /// Single-head attention blocks in the forms tract's declutter leaves them (see
    /// [`flat_chain`]): a feature map's height and width as two axes in both products and
    /// merged only for the softmax, the output transposed; the tokens as one axis, with a
    /// static QDQ export's quantize -> dequantize pairs; no batch axis at all. Each fuses and
    /// gives tract's results. Blocks it must not take stay as they are: the values' keys in
    /// another order than the weights' (same shapes), an additive bias, a softmax over
    /// another axis.
    #[test]
    fn single_head_blocks_in_tracts_folded_forms_fuse() {
        use crate::quant::QuantOut;
        if crate::q4mm::f32_kernel().is_none() {
            eprintln!("skipped: this CPU has neither AVX-512 nor AVX2");
            return;
        }
        let (batch, h, w, d, e) = (2usize, 5usize, 7usize, 16usize, 24usize);
        let tokens = h * w;
        let fill = |shape: &[usize], seed: usize| -> TValue {
            let data = eighths(shape.iter().product(), seed);
            tract_ndarray::ArrayD::from_shape_vec(shape, data)
                .unwrap()
                .into_tvalue()
        };
        let reshape = |at: usize, from: &[usize], to: &[usize]| {
            let dims = |x: &[usize]| x.iter().map(|&n| n.to_dim()).collect();
            AxisOp::Reshape(at, dims(from), dims(to))
        };
        #[derive(Clone, Copy, Debug, PartialEq)]
        enum Form {
            /// `abmk,acnk->abmcn`, reshapes, softmax, reshape, `ambk,abkn->anm`.
            Split,
            /// The same with the values' two key axes swapped: not attention.
            SplitSwappedKeys,
            /// `amk,ank->amn`, quantize pairs before and after the scale (the second with
            /// the float dequantize `rewrite_qdq_softmax` writes), `amk,akn->anm`.
            Quantized,
            /// `mk,nk->mn`, `mk,kn->mn`.
            NoBatch,
            /// `amk,ank->amn` with a bias added to the scores.
            Biased,
            /// `amk,ank->amn`, a softmax over the rows.
            RowsSoftmax,
        }
        for form in [
            Form::Split,
            Form::SplitSwappedKeys,
            Form::Quantized,
            Form::NoBatch,
            Form::Biased,
            Form::RowsSoftmax,
        ] {
            let (qs, ks, vs): (Vec<usize>, Vec<usize>, Vec<usize>) = match form {
                Form::Split => (
                    vec![batch, h, w, d],
                    vec![batch, h, w, d],
                    vec![batch, h, w, e],
                ),
                Form::SplitSwappedKeys => (
                    vec![batch, h, w, d],
                    vec![batch, h, w, d],
                    vec![batch, w, h, e],
                ),
                Form::NoBatch => (vec![tokens, d], vec![tokens, d], vec![tokens, e]),
                _ => (
                    vec![batch, tokens, d],
                    vec![batch, tokens, d],
                    vec![batch, tokens, e],
                ),
            };
            let inputs = tvec!(fill(&qs, 1), fill(&ks, 2), fill(&vs, 3));
            let build = || -> TractResult<TypedModel> {
                let mut m = TypedModel::default();
                let q = m.add_source("q", f32::fact(&qs))?;
                let k = m.add_source("k", f32::fact(&ks))?;
                let v = m.add_source("v", f32::fact(&vs))?;
                let einsum = |expr: &str| EinSum::new(expr.parse().unwrap(), f32::datum_type());
                let (scores, pv) = match form {
                    Form::Split => ("abmk,acnk->abmcn", "ambk,abkn->anm"),
                    Form::SplitSwappedKeys => ("abmk,acnk->abmcn", "ambk,akbn->anm"),
                    Form::Quantized => ("amk,ank->amn", "amk,akn->anm"),
                    Form::NoBatch => ("mk,nk->mn", "mk,kn->mn"),
                    _ => ("amk,ank->amn", "amk,akn->amn"),
                };
                let mut s = m.wire_node("scores", einsum(scores), &[q, k])?[0];
                if form == Form::Quantized {
                    s = m.wire_node("scores.q", quantize_linear_i8(2.0, 3), &[s])?[0];
                    s = m.wire_node("scores.dq", DequantizeLinearF32::new(0.5, 3), &[s])?[0];
                }
                let scale = m.add_const("scale", tensor0(0.37f32))?;
                s = wire_with_rank_broadcast("scaled", &mut m, mul(), &[s, scale])?[0];
                if form == Form::Quantized {
                    use tract_onnx::tract_core::ops::cast::cast;
                    use tract_onnx::tract_core::ops::math::sub;
                    s = m.wire_node("scaled.q", quantize_linear_i8(4.0, -2), &[s])?[0];
                    s = m.wire_node("scaled.x", cast(f32::datum_type()), &[s])?[0];
                    let zero = m.add_const("scaled.zero", tensor0(-2f32))?;
                    s = wire_with_rank_broadcast("scaled.centred", &mut m, sub(), &[s, zero])?[0];
                    let step = m.add_const("scaled.step", tensor0(0.25f32))?;
                    s = wire_with_rank_broadcast("scaled.dq", &mut m, mul(), &[s, step])?[0];
                }
                if matches!(form, Form::Split | Form::SplitSwappedKeys) {
                    s = m.wire_node("keys", reshape(3, &[h, w], &[tokens]), &[s])?[0];
                    s = m.wire_node("rows", reshape(1, &[h, w], &[tokens]), &[s])?[0];
                }
                if form == Form::Biased {
                    let bias = m.add_const("bias", Tensor::zero::<f32>(&[1, 1, tokens])?)?;
                    s = wire_with_rank_broadcast("masked", &mut m, add(), &[s, bias])?[0];
                }
                let rank = m.outlet_fact(s)?.rank();
                let axis = if form == Form::RowsSoftmax {
                    rank - 2
                } else {
                    rank - 1
                };
                let softmax = Softmax::new(tvec![axis], None, SoftmaxKind::Softmax);
                s = m.wire_node("softmax", softmax, &[s])?[0];
                if form == Form::Quantized {
                    s = m.wire_node("weights.q", quantize_linear_u8(255.0, 0), &[s])?[0];
                    let dq = DequantizeLinearF32::new(1.0 / 255.0, 0);
                    s = m.wire_node("weights.dq", dq, &[s])?[0];
                }
                if matches!(form, Form::Split | Form::SplitSwappedKeys) {
                    let (a, b) = if form == Form::Split { (h, w) } else { (w, h) };
                    s = m.wire_node("split", reshape(2, &[tokens], &[a, b]), &[s])?[0];
                }
                let out = m.wire_node("pv", einsum(pv), &[s, v])?[0];
                m.select_output_outlets(&[out])?;
                Ok(m)
            };
            let mut model = build().unwrap();
            let takes = matches!(form, Form::Split | Form::Quantized | Form::NoBatch);
            let float_dqs = crate::quant::fold_float_dequants(&mut model).unwrap();
            assert_eq!(float_dqs, (form == Form::Quantized) as usize, "{form:?}");
            let fused = fuse_attention(&mut model).unwrap();
            assert_eq!(fused, takes as usize, "{form:?}");
            // Left as it was, the block needs no comparison (tract 0.23.9 cannot even run
            // the swapped one: its codegen folds the keys with the weights' shape).
            if takes {
                let op = model
                    .nodes()
                    .iter()
                    .find_map(|n| n.op_as::<FusedAttention>())
                    .unwrap();
                assert_eq!(op.scale, 0.37, "{form:?}");
                let quantized = form == Form::Quantized;
                assert_eq!(op.score_quant.is_some(), quantized, "{form:?}");
                assert_eq!(op.weight_quant.is_some(), quantized, "{form:?}");
                if let Some(fq) = &op.scaled_quant {
                    assert_eq!(
                        fq.out,
                        QuantOut::Float {
                            scale: 0.25,
                            zero: -2
                        }
                    );
                }
                assert_eq!(op.scaled_quant.is_some(), quantized, "{form:?}");
                if let Some(fq) = &op.weight_quant {
                    assert_eq!(
                        fq.out,
                        QuantOut::Float {
                            scale: 1.0 / 255.0,
                            zero: 0
                        }
                    );
                }
                let want = build().unwrap().into_runnable().unwrap();
                let want = want.run(inputs.clone()).unwrap();
                let got = model.into_runnable().unwrap().run(inputs.clone()).unwrap();
                assert_eq!(got[0].shape(), want[0].shape(), "{form:?}");
                let tol = if quantized { 1e-5 + 2.0 / 255.0 } else { 1e-5 };
                assert_close(&got[0], &want[0], tol, &format!("{form:?}"));
            }
        }
    }

    /// Every element of two f32 tensors of the same size within `tol`.
    fn assert_close(got: &TValue, want: &TValue, tol: f32, what: &str) {
        let (got, want) = (
            got.try_as_plain_ram().unwrap(),
            want.try_as_plain_ram().unwrap(),
        );
        let (got, want) = (
            got.as_slice::<f32>().unwrap(),
            want.as_slice::<f32>().unwrap(),
        );
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < tol, "{what}, [{i}]: {g} vs {w}");
        }
    }

    /// A LLaMA decoder's grouped-query attention as tract's ONNX import wires a static QDQ
    /// export of it: the keys and values repeated per query head (`repeat_kv`: unsqueeze,
    /// expand, reshape), then quantized and dequantized right before the products. As it
    /// is, tract's declutter cannot fold the repeat into a grouped product and nothing
    /// fuses; with [`crate::quant::quantize_before_repeats`] first the results stay
    /// tract's, and the block fuses in the grouped layout with both of its own pairs.
    #[test]
    fn repeated_heads_behind_quantize_pairs_fuse() {
        use tract_onnx::tract_core::ops::array::MultiBroadcastTo;
        let (groups, per_group, rows, keys, d) = (2, 3, 5, 23, 16);
        let heads = groups * per_group;
        let fill = |shape: &[usize], seed: usize| -> TValue {
            let data = eighths(shape.iter().product(), seed);
            tract_ndarray::ArrayD::from_shape_vec(shape, data)
                .unwrap()
                .into_tvalue()
        };
        // A causal mask of the last `rows` positions against all keys.
        let bias = tract_ndarray::ArrayD::from_shape_fn(&[1, 1, rows, keys][..], |i| {
            if i[3] > keys - rows + i[2] {
                f32::MIN
            } else {
                0.0
            }
        });
        let inputs = tvec!(
            fill(&[1, heads, rows, d], 1),
            fill(&[1, groups, keys, d], 2),
            fill(&[1, groups, keys, d], 3),
            bias.into_tvalue(),
        );
        let build = || -> TractResult<TypedModel> {
            let mut m = TypedModel::default();
            let q = m.add_source("q", f32::fact([1, heads, rows, d]))?;
            let k = m.add_source("k", f32::fact([1, groups, keys, d]))?;
            let v = m.add_source("v", f32::fact([1, groups, keys, d]))?;
            let bias = m.add_source("bias", f32::fact([1, 1, rows, keys]))?;
            // The present key / value: the unrepeated, unquantized heads are outputs too.
            let repeat = |m: &mut TypedModel, name: &str, x: OutletId| -> TractResult<OutletId> {
                let mut x = m.wire_node(format!("{name}.unsqueeze"), AxisOp::Add(2), &[x])?[0];
                let shape = ShapeFact::from_dims([1, groups, per_group, keys, d]);
                let expand = MultiBroadcastTo { shape };
                x = m.wire_node(format!("{name}.expand"), expand, &[x])?[0];
                let merge = AxisOp::Reshape(
                    1,
                    tvec![groups.into(), per_group.into()],
                    tvec![heads.into()],
                );
                x = m.wire_node(format!("{name}.reshape"), merge, &[x])?[0];
                x = m.wire_node(format!("{name}.q"), quantize_linear_i8(4.0, -2), &[x])?[0];
                Ok(m.wire_node(
                    format!("{name}.dq"),
                    DequantizeLinearF32::new(0.25, -2),
                    &[x],
                )?[0])
            };
            let (kr, vr) = (repeat(&mut m, "k", k)?, repeat(&mut m, "v", v)?);
            let scores = EinSum::new("xhrd,xhkd->xhrk".parse()?, f32::datum_type());
            let s = m.wire_node("scores", scores, &[q, kr])?[0];
            let s = scores_to_weights(&mut m, s, 0.25, bias, true)?;
            let pv = EinSum::new("xhrk,xhke->xhre".parse()?, f32::datum_type());
            let out = m.wire_node("pv", pv, &[s, vr])?[0];
            m.select_output_outlets(&[out, k, v])?;
            Ok(m)
        };
        let want = build().unwrap().into_decluttered().unwrap();
        let want = want.into_runnable().unwrap().run(inputs.clone()).unwrap();

        let mut model = build().unwrap();
        assert_eq!(
            crate::quant::quantize_before_repeats(&mut model).unwrap(),
            2
        );
        let mut model = model.into_decluttered().unwrap();
        // Moved, the pairs give tract's results on tract's ops too (every CPU), and the
        // present key / value come out as they went in.
        let moved = model.clone().into_runnable().unwrap();
        let moved = moved.run(inputs.clone()).unwrap();
        assert_close(&moved[0], &want[0], 1e-5, "moved pairs");
        for i in 1..3 {
            assert_eq!(moved[i], inputs[i], "output {i}");
        }
        if crate::q4mm::f32_kernel().is_none() {
            eprintln!("fusion skipped: this CPU has neither AVX-512 nor AVX2");
            return;
        }
        let mut as_is = build().unwrap().into_decluttered().unwrap();
        assert_eq!(fuse_attention(&mut as_is).unwrap(), 0);
        assert_eq!(fuse_attention(&mut model).unwrap(), 1);
        let fused: Vec<&FusedAttention> = model
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<FusedAttention>())
            .collect();
        assert_eq!(fused[0].layout, Layout::Grouped);
        assert!(fused[0].score_quant.is_some() && fused[0].weight_quant.is_some());
        let got = model.into_runnable().unwrap().run(inputs.clone()).unwrap();
        assert_close(&got[0], &want[0], 1e-5 + 2.0 / 255.0, "attention");
        for i in 1..3 {
            assert_eq!(got[i], inputs[i], "output {i}");
        }
    }

    /// The matcher's einsum test: the same equation under any renaming of distinct letters,
    /// nothing else.
    #[test]
    fn einsum_patterns_match_up_to_renaming() {
        let fits = |expr: &str, inputs: [&str; 2], output: &str| {
            let op = EinSum::new(expr.parse().unwrap(), f32::datum_type());
            einsum_fits(&op, inputs, output)
        };
        let [(si, so), (vi, vo)] = attention_einsums(Layout::Grouped);
        assert!(fits("acbmk,acnk->acbmn", si, so));
        assert!(fits("acbmk,ackn->acbmn", vi, vo));
        assert!(!fits("acbmk,acnk->acbmn", vi, vo));
        // Two pattern letters on one axis letter, or one on two.
        assert!(!fits("acbmk,acnk->acbmk", si, so));
        assert!(!fits("aabmk,acnk->aabmn", si, so));
        let [(si, so), _] = attention_einsums(Layout::RowsMajor);
        assert!(fits("abcd,aecd->acbe", si, so));
        assert!(!fits("abcd,aecd->abce", si, so));
        // The flat form's roles: batch, first operand's, second's, summed.
        let roles = |expr: &str| {
            let r = Roles::of(&EinSum::new(expr.parse().unwrap(), f32::datum_type()))?;
            Some([r.batch, r.a_out, r.b_out, r.summed])
        };
        assert_eq!(roles("abmk,acnk->abmcn").unwrap(), ["a", "bm", "cn", "k"]);
        assert_eq!(roles("ambk,abkn->anm").unwrap(), ["a", "m", "n", "bk"]);
        assert_eq!(roles("mk,nk->mn").unwrap(), ["", "m", "n", "k"]);
        // An axis summed over one operand, or twice in one.
        assert_eq!(roles("amk,ank->am"), None);
        assert_eq!(roles("amm,anm->amn"), None);
    }

    /// Against the definition in f64 for row lengths around whole vectors (1, 7, 8, 9, 15,
    /// 16, 17, 85), with a masked (-inf-like) entry and scores far below the row's largest,
    /// with 1 and 2 threads, on every kernel this CPU runs; and `fast_softmaxes` replaces only
    /// last-axis f32 softmaxes.
    #[test]
    fn last_axis_softmax_equals_the_definition() {
        let kernels = kernels_here();
        if kernels.is_empty() {
            eprintln!("skipped: this CPU has neither AVX-512 nor AVX2");
            return;
        }
        for row in [1usize, 7, 8, 9, 15, 16, 17, 85] {
            let rows = 7;
            let mut x: Vec<f32> = (0..rows * row)
                .map(|i| ((i * 2_654_435_761 % 1000) as f32 / 100.0) - 5.0)
                .collect();
            x[row / 2] = -3.4e38;
            // e^-75 (0 in the kernels, below -70) and e^-60 relative to the row's largest.
            if row > 8 {
                let top = x[..row].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                x[1] = top - 75.0;
                x[row - 1] = top - 60.0;
            }
            let input = tract_ndarray::ArrayD::from_shape_vec(vec![1, rows, row], x.clone())
                .unwrap()
                .into_tensor()
                .into_tvalue();
            let op = LastAxisSoftmax {
                fallback: Softmax::new(tvec!(2), None, SoftmaxKind::Softmax),
            };
            for (kernel, threads) in kernels.iter().flat_map(|&k| [(k, 1), (k, 2)]) {
                let executor = crate::int8mm::tests::executor(threads);
                let out = tract_linalg::multithread::multithread_tract_scope(executor, || {
                    op.run(kernel, &EvalContext::out_of_plan(), tvec!(input.clone()))
                        .unwrap()
                });
                let got = out[0].try_as_plain_ram().unwrap();
                let got = got.as_slice::<f32>().unwrap();
                for r in 0..rows {
                    let xs = &x[r * row..(r + 1) * row];
                    let m = xs
                        .iter()
                        .map(|&v| v as f64)
                        .fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = xs.iter().map(|&v| (v as f64 - m).exp()).sum();
                    for (j, &v) in xs.iter().enumerate() {
                        let want = (v as f64 - m).exp() / sum;
                        let g = got[r * row + j] as f64;
                        assert!(
                            (g - want).abs() <= 1e-6 * want.max(1e-3),
                            "row length {row}, {kernel:?}, {threads} thread(s), at ({r}, {j}): \
                             {g} vs {want}"
                        );
                    }
                }
            }
        }
        // A model with a last-axis and a first-axis softmax: only the first is replaced.
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([3, 5])).unwrap();
        let outs: Vec<OutletId> = [1usize, 0]
            .iter()
            .map(|&axis| {
                model
                    .wire_node(
                        format!("sm{axis}"),
                        Softmax::new(tvec!(axis), None, SoftmaxKind::Softmax),
                        &[x],
                    )
                    .unwrap()[0]
            })
            .collect();
        model.select_output_outlets(&outs).unwrap();
        assert_eq!(fast_softmaxes(&mut model).unwrap(), 1);
        assert!(model
            .node_by_name("sm1")
            .unwrap()
            .op_is::<LastAxisSoftmax>());
        assert!(model.node_by_name("sm0").unwrap().op_is::<Softmax>());
    }
}
