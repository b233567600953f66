//! Static `QuantizeLinear` / `DequantizeLinear` as loops the compiler vectorizes.
//!
//! A static QDQ export puts a quantize -> dequantize pair on nearly every activation (on
//! the attention scores too: `heads x rows x keys` values). tract 0.23.9 runs each as a
//! scalar loop, rounding through a function call: 600 ms of the probe QDQ vision encoder's
//! 1.9 s went to `QuantizeLinearI8`, 250 ms to `DequantizeLinearF32`. [`LinearQuant`] does
//! the same arithmetic as plain slice loops (clamp first, then round with the 1.5 * 2^23
//! trick, which is exact once `|v| <= 255`) that LLVM turns into SIMD on every target, and
//! fuses a quantize whose only consumer is a dequantize into one pass with a float output:
//! the `int8` tensor in between is never written. [`fast_quantize_ops`] puts them in place of
//! tract's ops after its optimizer.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::quant::{DequantizeLinearF32, QuantizeLinearI8, QuantizeLinearU8};

/// Rounds half to even: exact for `|v| <= 2^22`, and vectorizes (no `rint` call).
const ROUND: f32 = 12_582_912.0;

/// `i8` or `u8`, from the low byte of an integer in range.
pub trait Quantized: Copy {
    /// The value whose two's complement byte is `b`.
    fn from_byte(b: u8) -> Self;
}

impl Quantized for i8 {
    fn from_byte(b: u8) -> i8 {
        b as i8
    }
}

impl Quantized for u8 {
    fn from_byte(b: u8) -> u8 {
        b
    }
}

/// What a [`LinearQuant`] writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QuantOut {
    /// The quantized values, `i8`.
    I8,
    /// The quantized values, `u8`.
    U8,
    /// The quantized values dequantized again, `(q - zero) * scale`, as `f32`.
    Float {
        /// The dequantize's scale.
        scale: f32,
        /// The dequantize's zero point.
        zero: i32,
    },
}

/// ONNX `QuantizeLinear` with one scale and zero point: `saturate(round_half_even(x * mult) +
/// zero)`, `mult` being `1 / scale` as tract computes it, optionally followed by
/// `DequantizeLinear` ([`QuantOut::Float`]). Same results as tract's ops for every non-NaN
/// input (a NaN gives NaN in the float form, where tract's pair gives 0).
#[derive(Debug, Clone, PartialEq)]
pub struct LinearQuant {
    /// `1 / scale`.
    pub mult: f32,
    /// The quantize's zero point.
    pub zero: i32,
    /// Quantized range: `-128..=127` or `0..=255`.
    pub range: (i32, i32),
    /// Output form.
    pub out: QuantOut,
}

impl Eq for LinearQuant {}

impl LinearQuant {
    /// Per element: `round(clamp(x * mult, lo - zero, hi - zero)) + 1.5 * 2^23`, the
    /// quantized value minus its zero point, rounded half to even by the addition. Clamping
    /// first keeps `|v| <= 255`, where the rounding trick is exact; rounding and clamping to
    /// integer bounds commute. Written as compare-and-select so that it compiles to SIMD
    /// min/max.
    fn rounded(&self) -> impl Fn(f32) -> f32 {
        let mult = self.mult;
        let lo = (self.range.0 - self.zero) as f32;
        let hi = (self.range.1 - self.zero) as f32;
        move |x: f32| {
            let v = x * mult;
            let v = if v < lo { lo } else { v };
            let v = if v > hi { hi } else { v };
            v + ROUND
        }
    }

    /// Quantizes `xs` into `ys` (`i8` or `u8` outputs; for [`QuantOut::Float`] see
    /// [`LinearQuant::requantize_in_place`]).
    ///
    /// The integer is read from the float's bits, not converted: `q + 1.5 * 2^23` (adding
    /// the integer zero point to the rounded, clamped `x * mult` is exact) holds `q` in its low
    /// mantissa bits, its low byte being `q`'s two's complement byte. A float-to-`i8`
    /// conversion (which Rust saturates) made this loop three times as slow.
    pub fn quantize<T: Quantized>(&self, xs: &[f32], ys: &mut [T]) {
        let (rounded, z) = (self.rounded(), self.zero as f32);
        for (y, &x) in ys.iter_mut().zip(xs) {
            *y = T::from_byte((rounded(x) + z).to_bits() as u8);
        }
    }

    /// Quantizes and dequantizes `xs` in place ([`QuantOut::Float`]).
    pub fn requantize_in_place(&self, xs: &mut [f32]) {
        let QuantOut::Float { scale, zero } = self.out else {
            return;
        };
        let (rounded, shift) = (self.rounded(), (self.zero - zero) as f32);
        for x in xs.iter_mut() {
            *x = ((rounded(*x) - ROUND) + shift) * scale;
        }
    }

    /// Runs on a tensor (the op's whole work): in place for a float output. The loops are
    /// compiled for AVX-512 or AVX2 where the CPU has them (16 or 8 lanes instead of SSE's
    /// 4; the same operations in the same order, so the same values): a static QDQ export's
    /// pair on the fixture graphs' 2 x 256 x 256 scores took 0.18 ms on SSE.
    pub fn run(&self, input: TValue) -> TractResult<Tensor> {
        let shape = input.shape().to_vec();
        match self.out {
            QuantOut::I8 | QuantOut::U8 => {
                let plain = input.try_as_plain_ram()?;
                let xs = plain.as_slice::<f32>()?;
                if self.out == QuantOut::I8 {
                    let mut t = Tensor::zero::<i8>(&shape)?;
                    let mut ys = t.try_as_plain_ram_mut()?;
                    let ys = ys.as_slice_mut::<i8>()?;
                    wide(|| self.quantize(xs, ys));
                    Ok(t)
                } else {
                    let mut t = Tensor::zero::<u8>(&shape)?;
                    let mut ys = t.try_as_plain_ram_mut()?;
                    let ys = ys.as_slice_mut::<u8>()?;
                    wide(|| self.quantize(xs, ys));
                    Ok(t)
                }
            }
            QuantOut::Float { .. } => {
                let mut t = input.into_tensor();
                {
                    let mut xs = t.try_as_plain_ram_mut()?;
                    let xs = xs.as_slice_mut::<f32>()?;
                    wide(|| self.requantize_in_place(xs));
                }
                Ok(t)
            }
        }
    }

    fn datum_type(&self) -> DatumType {
        match self.out {
            QuantOut::I8 => DatumType::I8,
            QuantOut::U8 => DatumType::U8,
            QuantOut::Float { .. } => DatumType::F32,
        }
    }
}

/// `f()`, compiled into a function for AVX-512 F or AVX2 when this CPU has it, so its loops
/// (inlined there) vectorize for it; else as it is.
#[inline(always)]
#[allow(unsafe_code)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if crate::int8mm::available() {
            // SAFETY: the CPU has AVX-512 F (`available` checks it).
            return unsafe { avx512(f) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { avx2(f) };
        }
    }
    f()
}

impl Op for LinearQuant {
    fn name(&self) -> StaticName {
        "EdgevlmLinearQuant".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "1/scale {} zero {} range {:?} -> {:?}",
            self.mult, self.zero, self.range, self.out
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for LinearQuant {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(tvec!(self.run(inputs.remove(0))?.into_tvalue()))
    }
}

impl TypedOp for LinearQuant {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.datum_type().fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// ONNX `DequantizeLinear` with one scale and zero point, `(x - zero) * scale` from `i8` or
/// `u8`, vectorized (tract's `DequantizeLinearF32`, same results).
#[derive(Debug, Clone, PartialEq)]
pub struct LinearDequant {
    /// Scale.
    pub scale: f32,
    /// Zero point.
    pub zero: i32,
}

impl Eq for LinearDequant {}

impl Op for LinearDequant {
    fn name(&self) -> StaticName {
        "EdgevlmLinearDequant".into()
    }

    op_as_typed_op!();
}

impl EvalOp for LinearDequant {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let plain = inputs[0].try_as_plain_ram()?;
        let mut out = Tensor::zero::<f32>(inputs[0].shape())?;
        let mut ys = out.try_as_plain_ram_mut()?;
        let ys = ys.as_slice_mut::<f32>()?;
        let (zero, scale) = (self.zero, self.scale);
        match inputs[0].datum_type() {
            DatumType::I8 => {
                for (y, &x) in ys.iter_mut().zip(plain.as_slice::<i8>()?) {
                    *y = (x as i32 - zero) as f32 * scale;
                }
            }
            DatumType::U8 => {
                for (y, &x) in ys.iter_mut().zip(plain.as_slice::<u8>()?) {
                    *y = (x as i32 - zero) as f32 * scale;
                }
            }
            dt => bail!("EdgevlmLinearDequant: {dt:?} input"),
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for LinearDequant {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// tract's `QuantizeLinear` (f32 input) as a [`LinearQuant`] with an integer output.
fn quantize_of(model: &TypedModel, node: &TypedNode) -> TractResult<Option<LinearQuant>> {
    let Some(ew) = node.op_as::<ElementWiseOp>() else {
        return Ok(None);
    };
    let op = if let Some(q) = ew.0.downcast_ref::<QuantizeLinearI8>() {
        LinearQuant {
            mult: q.scale,
            zero: q.zero_point as i32,
            range: (-128, 127),
            out: QuantOut::I8,
        }
    } else if let Some(q) = ew.0.downcast_ref::<QuantizeLinearU8>() {
        LinearQuant {
            mult: q.scale,
            zero: q.zero_point as i32,
            range: (0, 255),
            out: QuantOut::U8,
        }
    } else {
        return Ok(None);
    };
    let input = model.outlet_fact(node.inputs[0])?;
    Ok((input.datum_type == f32::datum_type()).then_some(op))
}

/// tract's `QuantizeLinear` at `node` (f32 input) whose only consumer is a `DequantizeLinear`
/// (tract's, or the float one of [`crate::onnx::rewrite_qdq_softmax`]) and whose output is no
/// model output: the pair as one [`LinearQuant`] with a float output ([`QuantOut::Float`]),
/// and the dequantize's (last) node.
pub fn quantize_pair(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(LinearQuant, usize)>> {
    Ok(pair_after(model, node, 0)?.map(|(op, _, dq)| (op, dq)))
}

/// As [`quantize_pair`], with one node between the quantize and the dequantize (their only
/// consumers, no model outputs): tract's declutter moves an axis change across a quantize
/// (an element-wise op) up to the dequantize, which it cannot cross. The pair, the node
/// between, and the dequantize's node; the caller checks what the node between does.
pub fn quantize_pair_around(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(LinearQuant, usize, usize)>> {
    pair_after(model, node, 1)
}

/// A quantize at `node`, `hops` single consumers, then a dequantize: the pair as one op,
/// the last node before the dequantize, and the dequantize's node.
fn pair_after(
    model: &TypedModel,
    node: &TypedNode,
    hops: usize,
) -> TractResult<Option<(LinearQuant, usize, usize)>> {
    let Some(mut op) = quantize_of(model, node)? else {
        return Ok(None);
    };
    let mut at = node;
    for hop in 0..=hops {
        let Some(next) = crate::patches::sole_consumer(model, OutletId::new(at.id, 0)) else {
            return Ok(None);
        };
        if hop < hops {
            if next.outputs.len() != 1 {
                return Ok(None);
            }
            at = next;
            continue;
        }
        let (out, dq) = match next.op_as::<DequantizeLinearF32>() {
            Some(dq) => {
                let out = QuantOut::Float {
                    scale: dq.scale,
                    zero: dq.zero_point,
                };
                (out, next.id)
            }
            None => match float_dequant(model, next)? {
                Some(found) => found,
                None => return Ok(None),
            },
        };
        op.out = out;
        return Ok(Some((op, at.id, dq)));
    }
    unreachable!("the loop returns at its last hop")
}

/// The dequantize [`crate::onnx::rewrite_qdq_softmax`] writes, `Mul(Sub(Cast(q) to f32,
/// zero), scale)` with constant scalars, starting at its Cast `node`: the same function of
/// `q` as `DequantizeLinear` (the subtraction of small integers is exact, then one rounded
/// product). Its output form and last node (the Mul).
fn float_dequant(model: &TypedModel, node: &TypedNode) -> TractResult<Option<(QuantOut, usize)>> {
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    use tract_onnx::tract_core::ops::cast::Cast;
    use tract_onnx::tract_core::ops::math::{Mul, Sub};
    let next = |n: &TypedNode| crate::patches::sole_consumer(model, OutletId::new(n.id, 0));
    // The scalar constant `n` combines its input `from` with, as (value, constant second).
    let scalar = |n: &TypedNode, from: usize| -> TractResult<Option<(f32, bool)>> {
        if n.inputs.len() != 2 {
            return Ok(None);
        }
        let at = (n.inputs[0].node == from) as usize;
        let fact = model.outlet_fact(n.inputs[at])?;
        Ok(match &fact.konst {
            Some(k) if k.len() == 1 && k.datum_type() == f32::datum_type() => {
                Some((k.cast_to_scalar::<f32>()?, at == 1))
            }
            _ => None,
        })
    };
    let is_bin =
        |n: &TypedNode, f: &dyn Fn(&TypedBinOp) -> bool| n.op_as::<TypedBinOp>().is_some_and(f);
    if node.op_as::<Cast>().map(|c| c.to) != Some(f32::datum_type()) {
        return Ok(None);
    }
    let Some(sub) = next(node).filter(|n| is_bin(n, &|b| b.0.is::<Sub>())) else {
        return Ok(None);
    };
    let Some((zero, true)) = scalar(sub, node.id)? else {
        return Ok(None);
    };
    let Some(mul) = next(sub).filter(|n| is_bin(n, &|b| b.0.is::<Mul>())) else {
        return Ok(None);
    };
    let Some((scale, _)) = scalar(mul, sub.id)? else {
        return Ok(None);
    };
    if zero.fract() != 0.0 || zero.abs() > 255.0 {
        return Ok(None);
    }
    let zero = zero as i32;
    Ok(Some((QuantOut::Float { scale, zero }, mul.id)))
}

/// Replaces each quantize whose dequantize is the float one
/// [`crate::onnx::rewrite_qdq_softmax`] writes (`Mul(Sub(Cast(q) to f32, zero), scale)`) by
/// one [`LinearQuant`] with a float output: one pass instead of four (its Cast alone took 0.13 ms of the `qdq_softmax` fixture's 0.6), and a
/// pair [`crate::attention::fuse_attention`] takes. Run after tract's last declutter, so that
/// the dequantize is never folded into the softmax after it. Returns how many.
pub fn fold_float_dequants(model: &mut TypedModel) -> TractResult<usize> {
    let mut found = vec![];
    for node in model.nodes() {
        if let Some((op, dq)) = quantize_pair(model, node)? {
            if model.node(dq).op_as::<DequantizeLinearF32>().is_none() {
                found.push((node.inputs.clone(), dq, op));
            }
        }
    }
    for (inputs, dq, op) in &found {
        let dq = model.node(*dq).clone();
        TypedModelPatch::replace_single_op(model, &dq, inputs, op.clone())?.apply(model)?;
    }
    Ok(found.len())
}

/// Moves each static quantize -> dequantize pair that follows a repeat of its input (a
/// chain of layout ops with a broadcast among them, e.g. a LLaMA decoder's `repeat_kv`:
/// Unsqueeze, Expand, Reshape, maybe a Transpose) to before that chain: every consumer of the
/// chain's start other than the chain (the `present` key / value outputs) still gets the
/// unquantized values. Exact: a per-tensor pair is the same function of each element
/// wherever it runs, and the chain only moves and copies elements.
///
/// A static QDQ export puts the pair on the repeated keys and values, right before the
/// attention's products. tract 0.23.9 folds a repeat into a grouped product only when the
/// repeat reaches the product directly, so with the pair in between it materializes the
/// repeated heads, quantizes each copy, and runs the attention as two plain batched
/// products that [`crate::attention::fuse_attention`] does not take. Moved up, the pair
/// rounds one copy of each key / value head and the decoder's attention fuses as a float
/// export's does. Run before tract's declutter. Returns how many pairs moved.
pub fn quantize_before_repeats(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::array::MultiBroadcastTo;
    use tract_onnx::tract_core::ops::change_axes::AxisOp;
    let outputs = model.output_outlets()?.to_vec();
    let mut moves = vec![];
    for node in model.nodes() {
        let Some((_, dq)) = quantize_pair(model, node)? else {
            continue;
        };
        // Up from the quantize through layout ops that feed only the next one.
        let (mut start, mut chain) = (node.inputs[0], vec![]);
        loop {
            let n = model.node(start.node);
            let layout = n.op_is::<AxisOp>() || n.op_is::<MultiBroadcastTo>();
            if !layout
                || n.inputs.len() != 1
                || n.outputs.len() != 1
                || n.outputs[0].successors.len() != 1
                || outputs.contains(&start)
            {
                break;
            }
            chain.push(n.id);
            start = n.inputs[0];
        }
        if chain
            .iter()
            .any(|&c| model.node(c).op_is::<MultiBroadcastTo>())
        {
            moves.push((node.id, dq, start, chain));
        }
    }
    for (q, dq, start, chain) in &moves {
        let (q, dq) = (model.node(*q), model.node(*dq));
        let mut patch = TypedModelPatch::new(format!("edgevlm quantize before {}", q.name));
        let mut wire = patch.tap_model(model, *start)?;
        for n in [q, dq]
            .into_iter()
            .chain(chain.iter().rev().map(|&c| model.node(c)))
        {
            let name = format!("{}.edgevlm_requantized", n.name);
            wire = patch.wire_node(name, n.op.clone(), &[wire])?[0];
        }
        patch.shunt_outside(model, OutletId::new(dq.id, 0), wire)?;
        patch.apply(model)?;
    }
    Ok(moves.len())
}

/// Replaces tract's static `QuantizeLinear` (f32 input) and `DequantizeLinear` (8-bit input)
/// nodes by [`LinearQuant`] / [`LinearDequant`]; a quantize whose only consumer is a
/// dequantize becomes one [`LinearQuant`] with a float output. Run after tract's optimizer.
/// Returns (fused pairs, quantizes, dequantizes) replaced.
pub fn fast_quantize_ops(model: &mut TypedModel) -> TractResult<(usize, usize, usize)> {
    let mut counts = (0, 0, 0);
    for id in model.eval_order()? {
        let node = model.node(id);
        if let Some((op, dq)) = quantize_pair(model, node)? {
            let (inputs, dq_node) = (node.inputs.clone(), model.node(dq).clone());
            TypedModelPatch::replace_single_op(model, &dq_node, &inputs, op)?.apply(model)?;
            counts.0 += 1;
        } else if let Some(op) = quantize_of(model, node)? {
            let node = node.clone();
            TypedModelPatch::replace_single_op(model, &node, &node.inputs, op)?.apply(model)?;
            counts.1 += 1;
        }
    }
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(dq) = node.op_as::<DequantizeLinearF32>() else {
            continue;
        };
        let dt = model.outlet_fact(node.inputs[0])?.datum_type;
        if dt != DatumType::I8 && dt != DatumType::U8 {
            continue;
        }
        let op = LinearDequant {
            scale: dq.scale,
            zero: dq.zero_point,
        };
        let node = node.clone();
        TypedModelPatch::replace_single_op(model, &node, &node.inputs, op)?.apply(model)?;
        counts.2 += 1;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::quant::quantize_linear_f32_i8;
    use tract_onnx::tract_core::ops::quant::quantize_linear_f32_u8;

    fn inputs() -> Vec<f32> {
        let mut xs: Vec<f32> = (-4000..4000).map(|i| i as f32 * 0.0371).collect();
        // Ties at every half step, values far outside the range, signed zeros.
        xs.extend((-600..600).map(|i| i as f32 * 0.5));
        xs.extend([1e6, -1e6, 0.0, -0.0]);
        xs
    }

    /// A quantize followed by the float dequantize `rewrite_qdq_softmax` writes (Cast, Sub of
    /// the zero point, Mul by the scale) becomes one [`LinearQuant`] giving tract's floats
    /// bit for bit, for i8 and u8 and either operand order of the Mul; a Sub of a zero point
    /// that is not an integer, or of a run-time value, is left alone.
    #[test]
    fn float_dequantizes_fold_bit_for_bit() -> TractResult<()> {
        use tract_onnx::tract_core::ops::cast::cast;
        use tract_onnx::tract_core::ops::change_axes::wire_with_rank_broadcast;
        use tract_onnx::tract_core::ops::math::{mul, sub};
        use tract_onnx::tract_core::ops::quant::{quantize_linear_i8, quantize_linear_u8};
        let xs = inputs();
        // signed, zero point of the Sub, Mul's scale first, folded
        for (signed, zero, scale_first, folds) in [
            (true, -3.0f32, false, true),
            (false, 128.0, true, true),
            (true, 0.5, false, false),
        ] {
            let build = |runtime_zero: bool| -> TractResult<TypedModel> {
                let mut m = TypedModel::default();
                let mut x = m.add_source("input", f32::fact([xs.len()]))?;
                let q = if signed {
                    quantize_linear_i8(1.0 / 0.37, -3)
                } else {
                    quantize_linear_u8(1.0 / 0.37, 128)
                };
                x = m.wire_node("q", q, &[x])?[0];
                x = m.wire_node("x", cast(f32::datum_type()), &[x])?[0];
                let z = if runtime_zero {
                    m.add_source("z", f32::fact([0usize; 0]))?
                } else {
                    m.add_const("z", tensor0(zero))?
                };
                x = wire_with_rank_broadcast("centred", &mut m, sub(), &[x, z])?[0];
                let s = m.add_const("s", tensor0(0.37f32))?;
                let operands = if scale_first { [s, x] } else { [x, s] };
                x = wire_with_rank_broadcast("scaled", &mut m, mul(), &operands)?[0];
                m.select_output_outlets(&[x])?;
                Ok(m)
            };
            let input = tvec!(tensor1(&xs).into_tvalue());
            let want = build(false)?.into_runnable()?.run(input.clone())?.remove(0);
            let mut model = build(false)?;
            assert_eq!(fold_float_dequants(&mut model)?, folds as usize, "{zero}");
            let got = model.into_runnable()?.run(input)?.remove(0);
            assert_eq!(got, want, "zero {zero}");
            assert_eq!(fold_float_dequants(&mut build(true)?)?, 0, "run-time zero");
        }
        Ok(())
    }

    /// Beyond `|x * mult| >= 2^31` tract's cast saturates to `i32::MAX` and adding the zero
    /// point wraps around (127 becomes -128); ours saturates as ONNX says.
    #[test]
    fn extremes_saturate() {
        let op = LinearQuant {
            mult: 4.0,
            zero: 3,
            range: (-128, 127),
            out: QuantOut::I8,
        };
        let xs = [1e10, -1e10, f32::INFINITY, f32::NEG_INFINITY];
        let got = op.run(tensor1(&xs).into_tvalue()).unwrap();
        let got = got.try_as_plain_ram().unwrap();
        assert_eq!(got.as_slice::<i8>().unwrap(), &[127, -128, 127, -128]);
        assert_eq!(
            quantize_linear_f32_i8(1e10, 4.0, 3),
            -128,
            "tract fixed its overflow"
        );
    }

    #[test]
    fn quantize_matches_tract_bit_for_bit() {
        let xs = inputs();
        for (mult, zero) in [(1.0, 0), (1.0 / 0.37, 3), (8.0, -128), (0.5, 127)] {
            let op = LinearQuant {
                mult,
                zero,
                range: (-128, 127),
                out: QuantOut::I8,
            };
            // Through `run`, on the loops compiled for this CPU's widest vectors.
            let got = op.run(tensor1(&xs).into_tvalue()).unwrap();
            let got = got
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<i8>()
                .unwrap()
                .to_vec();
            let want: Vec<i8> = xs
                .iter()
                .map(|&x| quantize_linear_f32_i8(x, mult, zero))
                .collect();
            assert_eq!(got, want);
        }
        for (mult, zero) in [(1.0, 128), (1.0 / 0.02, 0), (3.0, 255)] {
            let op = LinearQuant {
                mult,
                zero,
                range: (0, 255),
                out: QuantOut::U8,
            };
            let got = op.run(tensor1(&xs).into_tvalue()).unwrap();
            let got = got
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<u8>()
                .unwrap()
                .to_vec();
            let want: Vec<u8> = xs
                .iter()
                .map(|&x| quantize_linear_f32_u8(x, mult, zero))
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn fused_pair_equals_quantize_then_dequantize() {
        let xs = inputs();
        for (zero, dq_zero, scale) in [(0, 0, 0.25f32), (-5, -5, 0.0371), (10, 7, 1.5)] {
            let op = LinearQuant {
                mult: 1.0 / scale,
                zero,
                range: (-128, 127),
                out: QuantOut::Float {
                    scale,
                    zero: dq_zero,
                },
            };
            let got = op.run(tensor1(&xs).into_tvalue()).unwrap();
            let got = got.try_as_plain_ram().unwrap();
            let dq = DequantizeLinearF32::new(scale, dq_zero);
            for (i, (&x, &y)) in xs.iter().zip(got.as_slice::<f32>().unwrap()).enumerate() {
                let q = quantize_linear_f32_i8(x, 1.0 / scale, zero);
                let want = (q as i32 - dq.zero_point) as f32 * dq.scale;
                assert_eq!(y.to_bits(), want.to_bits(), "x[{i}] = {x}");
            }
        }
    }
}
