//! Fused f32 attention for AVX-512: `softmax(q k^T * scale + bias) v`, one block of query rows
//! at a time, so the `heads x rows x rows` score tensor is never written out.
//!
//! tract 0.23.9 runs a ViT's attention as it is exported: a batched product into a
//! `[batch, heads, 1024, 1024]` f32 tensor (48 MiB per layer at 512x512 px), a scale, the
//! key-mask add and a softmax over it, then a repacking of all of it for the product with `v`.
//! Those passes cost a probe vision encoder ~100 ms per layer, about half its run (see
//! `docs/tract-slow-paths.md`, section 9). [`FusedAttention`] computes 8 query rows against all
//! keys into a cache-resident block, applies the scale, bias and softmax there and multiplies by
//! `v` before moving on.

// Elsewhere than x86_64 the kernels are compiled out and the ops never created (the
// rewrite checks the CPU first), which leaves their plumbing unused there.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::{Add, Mul};
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

/// Keys per panel of the score kernel: two 16-lane registers.
const KP: usize = crate::q4mm::NR;
/// Query rows per block.
const RB: usize = 8;

/// `softmax(q k^T * scale + bias) v` over `[batch, rows, heads, dim]` tensors `q`, `k` (keys as
/// rows) and `v`, with the output in the same layout (`[batch, rows, heads, dim_v]`); `bias`
/// (optional input 3) broadcasts to `[batch, heads, rows, keys]`.
#[derive(Debug, Clone, PartialEq)]
pub struct FusedAttention {
    /// Multiplies the scores before the bias.
    pub scale: f32,
}

impl Eq for FusedAttention {}

impl Op for FusedAttention {
    fn name(&self) -> StaticName {
        "EdgevlmFusedAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("scale={}", self.scale)])
    }

    op_as_typed_op!();
}

/// Shapes of one call.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    rows: usize,
    keys: usize,
    heads: usize,
    d: usize,
    e: usize,
}

impl EvalOp for FusedAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
        ensure!(q.rank() == 4 && k.rank() == 4 && v.rank() == 4);
        let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
        let dims = Dims {
            batch: qs[0],
            rows: qs[1],
            heads: qs[2],
            d: qs[3],
            keys: ks[1],
            e: vs[3],
        };
        ensure!(
            ks[0] == dims.batch
                && vs[0] == dims.batch
                && ks[2] == dims.heads
                && vs[2] == dims.heads
                && ks[3] == dims.d
                && vs[1] == dims.keys,
            "FusedAttention: q {qs:?}, k {ks:?} and v {vs:?} do not fit"
        );
        // The bias's strides over [batch, heads, rows, keys], 0 where it broadcasts.
        let bias = inputs.get(3);
        let mut bias_strides = [0usize; 4];
        if let Some(b) = bias {
            ensure!(b.rank() <= 4, "FusedAttention: bias {:?}", b.shape());
            let full = [dims.batch, dims.heads, dims.rows, dims.keys];
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
        let mut out = Tensor::zero::<f32>(&[dims.batch, dims.rows, dims.heads, dims.e])?;
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
            scale: self.scale,
        };
        {
            let mut out_plain = out.try_as_plain_ram_mut()?;
            let o = out_plain.as_slice_mut::<f32>()?;
            let o_addr = o.as_mut_ptr() as usize;
            let heads = dims.batch * dims.heads;
            match tract_linalg::multithread::current_tract_executor() {
                tract_linalg::multithread::Executor::MultiThread(pool)
                    if pool.current_num_threads() > 1 && heads > 1 =>
                {
                    pool.scope(|s| {
                        for bh in 0..heads {
                            let job = &job;
                            s.spawn(move |_| job.head(bh, o_addr));
                        }
                    });
                }
                _ => (0..heads).for_each(|bh| job.head(bh, o_addr)),
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for FusedAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (q, v) = (&inputs[0].shape, &inputs[2].shape);
        Ok(tvec!(f32::fact([
            q[0].clone(),
            q[1].clone(),
            q[2].clone(),
            v[3].clone()
        ])))
    }

    as_op!();
}

/// One call's operands, shared by the threads that compute whole heads.
struct Job<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    bias: Option<&'a [f32]>,
    bias_strides: [usize; 4],
    dims: Dims,
    scale: f32,
}

impl Job<'_> {
    /// Head `bh` (batch-major) into the output at address `o` (`[batch, rows, heads, e]`).
    fn head(&self, bh: usize, o: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let Dims {
                rows,
                keys,
                heads,
                d,
                e,
                ..
            } = self.dims;
            let (b, h) = (bh / heads, bh % heads);
            let panels = keys.div_ceil(KP);
            let np = panels * KP;
            let ep = e.next_multiple_of(16);
            // k^T in panels of 32 keys: kt[p][c][j] = k[b, p * 32 + j, h, c], zero past `keys`.
            let mut kt = vec![0f32; panels * d * KP];
            for j in 0..keys {
                let src = &self.k[((b * keys + j) * heads + h) * d..][..d];
                let (p, jj) = (j / KP, j % KP);
                for (c, &x) in src.iter().enumerate() {
                    kt[(p * d + c) * KP + jj] = x;
                }
            }
            // v rows, each padded to whole 16-lane vectors.
            let mut vh = vec![0f32; keys * ep];
            for j in 0..keys {
                vh[j * ep..j * ep + e]
                    .copy_from_slice(&self.v[((b * keys + j) * heads + h) * e..][..e]);
            }
            let mut qt = vec![0f32; RB * d];
            let mut s = vec![0f32; RB * np];
            let mut brow = vec![0f32; keys];
            let mut orow = vec![0f32; RB * ep];
            let [sb_b, sb_h, sb_r, sb_k] = self.bias_strides;
            for r0 in (0..rows).step_by(RB) {
                let rb = RB.min(rows - r0);
                qt.fill(0.0);
                for r in 0..rb {
                    qt[r * d..(r + 1) * d]
                        .copy_from_slice(&self.q[((b * rows + r0 + r) * heads + h) * d..][..d]);
                }
                // The scores, one panel of 32 keys at a time.
                for p in 0..panels {
                    // SAFETY: `head` is only reached through a plan built when `available()`;
                    // the buffers are sized above for whole panels and vectors.
                    unsafe {
                        crate::q4mm::fma_tile_rows(
                            RB,
                            &crate::q4mm::FmaTile {
                                a: qt.as_ptr(),
                                lda: d,
                                b: kt.as_ptr().add(p * d * KP),
                                k: d,
                                scale: self.scale,
                                c: s.as_mut_ptr().add(p * KP),
                                ldc: np,
                                cols: KP,
                                accumulate: false,
                                prefetch: std::ptr::null(),
                            },
                        )
                    }
                }
                for r in 0..rb {
                    let row = &mut s[r * np..r * np + keys];
                    if let Some(bias) = self.bias {
                        let base = b * sb_b + h * sb_h + (r0 + r) * sb_r;
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
                    unsafe { softmax_row(row) };
                }
                // SAFETY: as above.
                unsafe { weighted_values(&s, np, keys, &vh, ep, &mut orow) };
                for r in 0..rb {
                    let dst = o as *mut f32;
                    let at = ((b * rows + r0 + r) * heads + h) * e;
                    // SAFETY: each (row, head) slot of the output is written by one head job
                    // only, inside the tensor `eval` allocated for `[batch, rows, heads, e]`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(orow[r * ep..].as_ptr(), dst.add(at), e);
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (bh, o);
            unreachable!("FusedAttention is only built on x86_64");
        }
    }
}

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
    // ln 2 in two parts, so `n * LN2_HI` is exact.
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n))
}

/// In place: `row[j] = e^(row[j] - max) / sum`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row(row: &mut [f32]) {
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

/// `o[r] = sum_j s[r][j] v[j]` for the [`RB`] rows of `s` (stride `np`, `keys` used) and `v`
/// (`[keys, ep]`), into `o` (`[RB, ep]`): 4 rows by up to 64 columns per pass.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_values(s: &[f32], np: usize, keys: usize, v: &[f32], ep: usize, o: &mut [f32]) {
    assert!(s.len() >= RB * np && v.len() >= keys * ep && o.len() >= RB * ep && keys <= np);
    for r0 in (0..RB).step_by(4) {
        let mut c0 = 0;
        while c0 < ep {
            let w = (ep - c0).min(64) / 16;
            // SAFETY: the asserts above bound every row and column these kernels touch.
            unsafe {
                match w {
                    4 => pv::<4>(s, np, keys, v, ep, o, r0, c0),
                    3 => pv::<3>(s, np, keys, v, ep, o, r0, c0),
                    2 => pv::<2>(s, np, keys, v, ep, o, r0, c0),
                    _ => pv::<1>(s, np, keys, v, ep, o, r0, c0),
                }
            }
            c0 += w * 16;
        }
    }
}

/// Rows `r0..r0 + 4`, columns `c0..c0 + 16 W` of [`weighted_values`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn pv<const W: usize>(
    s: &[f32],
    np: usize,
    keys: usize,
    v: &[f32],
    ep: usize,
    o: &mut [f32],
    r0: usize,
    c0: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); W]; 4];
    let (sp, vp) = (s.as_ptr(), v.as_ptr());
    for j in 0..keys {
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
            unsafe { _mm512_storeu_ps(o.as_mut_ptr().add((r0 + r) * ep + c0 + 16 * w), *a) };
        }
    }
}

/// Softmax over the last axis of an f32 tensor on the AVX-512 row softmax (`softmax_row`) kernel. tract
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
                for r in chunk.chunks_exact_mut(row) {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the op is only built when `available()` (AVX-512).
                    unsafe {
                        softmax_row(r)
                    };
                    #[cfg(not(target_arch = "x86_64"))]
                    {
                        let _ = r;
                        unreachable!("LastAxisSoftmax is only built on x86_64");
                    }
                }
                Ok(())
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
/// AVX-512 (run after [`fuse_attention`], which takes the softmaxes of whole attention
/// blocks). Returns how many were replaced.
pub fn fast_softmaxes(model: &mut TypedModel) -> TractResult<usize> {
    if !crate::int8mm::available() {
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

/// Is `op` the einsum `XRHD,XKHD->XHRK` (scores) or `XHRK,XKHE->XRHE` (values), for some
/// distinct axis letters?
fn einsum_is(op: &EinSum, scores: bool) -> bool {
    let (inputs, outputs) = op.axes.to_strs();
    if inputs.len() != 2 || outputs.len() != 1 || op.q_params.is_some() {
        return false;
    }
    let (a, b, c): (Vec<char>, Vec<char>, Vec<char>) = (
        inputs[0].chars().collect(),
        inputs[1].chars().collect(),
        outputs[0].chars().collect(),
    );
    if a.len() != 4 || b.len() != 4 || c.len() != 4 {
        return false;
    }
    if scores {
        // a = x r h d, b = x k h d, c = x h r k
        let (x, r, h, d, k) = (a[0], a[1], a[2], a[3], b[1]);
        let distinct = [x, r, h, d, k]
            .iter()
            .enumerate()
            .all(|(i, p)| [x, r, h, d, k][i + 1..].iter().all(|q| q != p));
        distinct && b == [x, k, h, d] && c == [x, h, r, k]
    } else {
        // a = x h r k, b = x k h e, c = x r h e
        let (x, h, r, k, e) = (a[0], a[1], a[2], a[3], b[3]);
        let distinct = [x, h, r, k, e]
            .iter()
            .enumerate()
            .all(|(i, p)| [x, h, r, k, e][i + 1..].iter().all(|q| q != p));
        distinct && b == [x, k, h, e] && c == [x, r, h, e]
    }
}

/// Finds `EinSum(q, k) [-> Mul(scalar)] [-> Add(bias)] -> Softmax(last axis) -> EinSum(., v)`
/// chains (a ViT's attention as tract declutters it, `q`, `k`, `v` as `[batch, rows, heads,
/// dim]`) whose intermediate results have no other consumer, and replaces each by a
/// [`FusedAttention`], when this CPU has AVX-512. Run after tract's last declutter. Returns
/// how many were fused.
pub fn fuse_attention(model: &mut TypedModel) -> TractResult<usize> {
    if !crate::int8mm::available() {
        return Ok(0);
    }
    struct Chain {
        first: usize,
        last: usize,
        scale: f32,
        bias: Option<OutletId>,
    }
    let mut chains = vec![];
    for node in model.nodes() {
        let Some(op) = node.op_as::<EinSum>() else {
            continue;
        };
        let facts = model.node_input_facts(node.id)?;
        if !einsum_is(op, true)
            || facts
                .iter()
                .any(|f| f.datum_type != f32::datum_type() || f.konst.is_some())
        {
            continue;
        }
        let mut at = node.id;
        let mut scale = 1.0;
        let mut bias = None;
        let mut next = only_successor(model, OutletId::new(at, 0));
        // An optional scalar Mul, then an optional Add, in that order.
        if let Some(n) = next.map(|n| model.node(n)) {
            if let Some(bin) = n.op_as::<TypedBinOp>() {
                if bin.0.is::<Mul>() && n.inputs.len() == 2 {
                    let other = n.inputs[(n.inputs[0].node == at) as usize];
                    if let Some(s) = scalar_const(model, other)? {
                        scale = s;
                        at = n.id;
                        next = only_successor(model, OutletId::new(at, 0));
                    }
                }
            }
        }
        if let Some(n) = next.map(|n| model.node(n)) {
            if let Some(bin) = n.op_as::<TypedBinOp>() {
                if bin.0.is::<Add>() && n.inputs.len() == 2 {
                    let other = n.inputs[(n.inputs[0].node == at) as usize];
                    let fact = model.outlet_fact(other)?;
                    let scores = &model.outlet_fact(OutletId::new(at, 0))?.shape;
                    let pad = scores.rank().saturating_sub(fact.rank());
                    let broadcasts = fact.datum_type == f32::datum_type()
                        && fact.rank() <= 4
                        && fact
                            .shape
                            .iter()
                            .zip(scores.iter().skip(pad))
                            .all(|(b, s)| b.is_one() || b == s)
                        && n.outputs[0].fact.shape == *scores;
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
        let Some(pv) = only_successor(model, OutletId::new(sm.id, 0)).map(|n| model.node(n)) else {
            continue;
        };
        let pv_ok = pv.op_as::<EinSum>().is_some_and(|op| einsum_is(op, false))
            && pv.inputs[0] == OutletId::new(sm.id, 0)
            && model.outlet_fact(pv.inputs[1])?.datum_type == f32::datum_type();
        if pv_ok {
            chains.push(Chain {
                first: node.id,
                last: pv.id,
                scale,
                bias,
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
            FusedAttention { scale: chain.scale },
            &taps,
        )?[0];
        patch.shunt_outside(model, OutletId::new(chain.last, 0), out)?;
        patch.apply(model)?;
    }
    Ok(chains.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the definition in f64, over row blocks with tails, key panels with tails,
    /// value widths of one to five vectors (72 = 64 + 8), odd head sizes and every bias
    /// broadcast the matcher accepts, with 1 and 2 threads.
    #[test]
    fn fused_attention_equals_the_definition() {
        if !crate::int8mm::available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let fill = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 2_654_435_761 + seed * 97) % 1000) as f32 / 500.0 - 1.0) * 1.5)
                .collect()
        };
        // batch, rows, heads, d, keys, e, bias shape ([] = no bias)
        type Case = (usize, usize, usize, usize, usize, usize, &'static [usize]);
        let cases: [Case; 5] = [
            (1, 13, 2, 16, 37, 72, &[1, 1, 1, 37]),
            (2, 8, 3, 7, 8, 16, &[2, 1, 1, 8]),
            (1, 33, 1, 64, 70, 64, &[1, 1, 33, 70]),
            (1, 5, 2, 4, 1, 24, &[]),
            (2, 17, 2, 12, 40, 40, &[2, 2, 17, 1]),
        ];
        for (batch, rows, heads, d, keys, e, bias_shape) in cases {
            let q = fill(batch * rows * heads * d, 1);
            let k = fill(batch * keys * heads * d, 2);
            let v = fill(batch * keys * heads * e, 3);
            let bias = fill(bias_shape.iter().product(), 4);
            let scale = 0.37;
            let t = |data: &[f32], shape: &[usize]| {
                tract_ndarray::ArrayD::from_shape_vec(shape, data.to_vec())
                    .unwrap()
                    .into_tensor()
                    .into_tvalue()
            };
            let mut inputs = tvec!(
                t(&q, &[batch, rows, heads, d]),
                t(&k, &[batch, keys, heads, d]),
                t(&v, &[batch, keys, heads, e])
            );
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
            for threads in [1, 2] {
                let executor = crate::int8mm::tests::executor(threads);
                let out = tract_linalg::multithread::multithread_tract_scope(executor, || {
                    FusedAttention { scale }
                        .eval(&EvalContext::out_of_plan(), inputs.clone())
                        .unwrap()
                });
                assert_eq!(out[0].shape(), &[batch, rows, heads, e]);
                let got = out[0].try_as_plain_ram().unwrap();
                let got = got.as_slice::<f32>().unwrap();
                for b in 0..batch {
                    for h in 0..heads {
                        for r in 0..rows {
                            let s: Vec<f64> = (0..keys)
                                .map(|j| {
                                    let dot: f64 = (0..d)
                                        .map(|c| {
                                            q[((b * rows + r) * heads + h) * d + c] as f64
                                                * k[((b * keys + j) * heads + h) * d + c] as f64
                                        })
                                        .sum();
                                    dot * scale as f64 + bias_at(b, h, r, j)
                                })
                                .collect();
                            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                            let sum: f64 = w.iter().sum();
                            for c in 0..e {
                                let want: f64 = (0..keys)
                                    .map(|j| {
                                        w[j] / sum * v[((b * keys + j) * heads + h) * e + c] as f64
                                    })
                                    .sum();
                                let g = got[((b * rows + r) * heads + h) * e + c] as f64;
                                assert!(
                                    (g - want).abs() < 1e-5,
                                    "{batch}x{rows}x{heads}x{d}, keys {keys}, e {e}, bias {bias_shape:?}, \
                                     {threads} thread(s), at ({b}, {r}, {h}, {c}): {g} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Against the definition in f64 for row lengths around whole vectors (1, 15, 16, 17,
    /// 85), with a masked (-inf-like) entry, with 1 and 2 threads; and `fast_softmaxes`
    /// replaces only last-axis f32 softmaxes.
    #[test]
    fn last_axis_softmax_equals_the_definition() {
        if !crate::int8mm::available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        for row in [1usize, 15, 16, 17, 85] {
            let rows = 7;
            let mut x: Vec<f32> = (0..rows * row)
                .map(|i| ((i * 2_654_435_761 % 1000) as f32 / 100.0) - 5.0)
                .collect();
            x[row / 2] = -3.4e38;
            let input = tract_ndarray::ArrayD::from_shape_vec(vec![1, rows, row], x.clone())
                .unwrap()
                .into_tensor()
                .into_tvalue();
            let op = LastAxisSoftmax {
                fallback: Softmax::new(tvec!(2), None, SoftmaxKind::Softmax),
            };
            for threads in [1, 2] {
                let executor = crate::int8mm::tests::executor(threads);
                let out = tract_linalg::multithread::multithread_tract_scope(executor, || {
                    op.eval(&EvalContext::out_of_plan(), tvec!(input.clone()))
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
                            "row length {row}, {threads} thread(s), at ({r}, {j}): {g} vs {want}"
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
