//! Load-time patches for tract bugs, through tract's public extension points (a custom op and
//! model edits). Each names the bug it works around; `docs/tract-*.md` has the
//! upstream-ready description and a reproducer.

use tract_linalg::block_quant::BlockQuantStorage;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// An identity op that tract's passes cannot look through: it stays in the plan (passing its
/// input on without a copy) and stops rewrites that would reach across it.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq)]
pub struct FoldBarrier;

impl Op for FoldBarrier {
    fn name(&self) -> StaticName {
        "EdgevlmFoldBarrier".into()
    }

    op_as_typed_op!();
}

impl EvalOp for FoldBarrier {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(inputs)
    }

    fn forwards_input(&self) -> Option<usize> {
        Some(0)
    }
}

impl TypedOp for FoldBarrier {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}

/// tract 0.23.9: `EinSum`'s declutter rule `declutter_reshape_folding_input_axis` folds a
/// Reshape that merges axes into the contraction by reshaping the *other* operand too. When
/// that operand is a block-quantized constant (ONNX `MatMulNBits` becomes a Q4_0 weight), the
/// reshaped weight no longer holds its blocks and the product is wrong: in a decoder, every
/// `o_proj` fed by the attention's `Reshape` gives garbage (logits off by ~40), while the same
/// graph with that Reshape's output exposed is right. The barrier between the reshape and the
/// product keeps the rule from firing. Returns how many inputs were protected.
pub fn protect_block_quant_products(model: &mut TypedModel) -> TractResult<usize> {
    let mut targets = vec![];
    for node in model.nodes() {
        if node.op_as::<EinSum>().is_none() {
            continue;
        }
        let facts: Vec<&TypedFact> = node
            .inputs
            .iter()
            .map(|i| model.outlet_fact(*i))
            .collect::<TractResult<_>>()?;
        if !facts.iter().any(|f| f.exotic_fact.is_some()) {
            continue;
        }
        for (slot, (input, fact)) in node.inputs.iter().zip(&facts).enumerate() {
            if fact.exotic_fact.is_none() && fact.konst.is_none() {
                targets.push((node.id, slot, *input));
            }
        }
    }
    for (node, slot, input) in &targets {
        let name = format!("{}.edgevlm_fold_barrier_{slot}", model.node(*node).name);
        let barrier = model.wire_node(name, FoldBarrier, &[*input])?[0];
        model.add_edge(barrier, InletId::new(*node, *slot))?;
    }
    Ok(targets.len())
}

/// tract 0.23.9: constant folding (`PropConst`) evaluates a node of constant inputs only when
/// each input feeds that node alone or is under a 4 MiB budget, and gives up when one step
/// grows its input. A quantized product's codegen (`EinSumMatMul` with zero points) wires
/// `Cast(weight -> i32) -> Reduce<Sum>` beside the product itself, so the weight has two
/// consumers, the cast quadruples it, and the per-column sums of a constant weight are
/// recomputed on every run: 89 % of a decode step of a dynamically quantized int8 decoder
/// (the 8192 x 768 lm_head alone: 38 ms a token), and every weight is also re-packed per call.
///
/// This pass folds what PropConst left: a node whose inputs are all constants is evaluated,
/// then its single successors while the result is larger than the node's inputs (the cast),
/// and the last node becomes a constant once the result is no larger than those inputs (the
/// sums, the packed weight). Shared constants stay for their other consumers. Returns the
/// number of folds; the caller compacts the model afterwards.
pub fn fold_shared_constants(model: &mut TypedModel) -> TractResult<usize> {
    let mut folded = 0;
    let mut skip = std::collections::HashSet::new();
    loop {
        let mut patch = None;
        for id in model.eval_order()? {
            if skip.contains(&id) {
                continue;
            }
            if let Some(p) = const_chain_patch(model, id)? {
                patch = Some(p);
                break;
            }
            skip.insert(id);
        }
        let Some(patch) = patch else {
            return Ok(folded);
        };
        patch.apply(model)?;
        folded += 1;
        // Node ids are unchanged by applying a patch (new nodes are appended), but a fold
        // can make later nodes foldable, so only nodes that could not be folded stay skipped.
    }
}

fn mem_of(values: &[TValue]) -> u64 {
    values
        .iter()
        .map(|t| (t.datum_type().size_of() * t.volume()) as u64)
        .sum()
}

fn plain_outputs(node: &TypedNode) -> bool {
    node.outputs
        .iter()
        .all(|o| o.fact.exotic_fact.is_none() && o.fact.datum_type.is_number())
}

/// The patch that replaces the chain starting at `id` by constants, if it qualifies.
fn const_chain_patch(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    if node.inputs.is_empty() {
        return Ok(None);
    }
    let facts = model.node_input_facts(id)?;
    let Some(inputs) = facts
        .iter()
        .map(|f| f.konst.clone().map(|k| k.into_tvalue()))
        .collect::<Option<TVec<TValue>>>()
    else {
        return Ok(None);
    };
    let input_mem = mem_of(&inputs).max(1);
    if !plain_outputs(node) {
        return Ok(None);
    }
    let Ok(Some(mut values)) = node.op.eval_out_of_plan(inputs) else {
        return Ok(None);
    };
    let mut last = node;
    while mem_of(&values) > input_mem {
        let Some(succ) = model.single_succ(last.id)? else {
            return Ok(None);
        };
        // Plain numbers only: a packed weight's fact is not interchangeable with a
        // constant's, so a chain ending in a packing is not evaluated at all.
        if !plain_outputs(succ) {
            return Ok(None);
        }
        let mut succ_inputs = tvec!();
        for outlet in &succ.inputs {
            if outlet.node == last.id {
                succ_inputs.push(values[outlet.slot].clone());
            } else if let Some(k) = &model.outlet_fact(*outlet)?.konst {
                succ_inputs.push(k.clone().into_tvalue());
            } else {
                return Ok(None);
            }
        }
        let Ok(Some(next)) = succ.op.eval_out_of_plan(succ_inputs) else {
            return Ok(None);
        };
        values = next;
        last = succ;
    }
    let mut patch = TypedModelPatch::new(format!("edgevlm fold constant {}", last.name));
    for (slot, value) in values.into_iter().enumerate() {
        let name = if slot == 0 {
            format!("{}.folded", last.name)
        } else {
            format!("{}.folded.{slot}", last.name)
        };
        let wire = patch.add_const(name, value.into_tensor())?;
        patch.shunt_outside(model, OutletId::new(last.id, slot), wire)?;
    }
    Ok(Some(patch))
}

/// tract 0.23.9: `Pow`'s declutter turns a constant exponent into the unary `PowConst` (one
/// `powf` per element) before it tries its GELU detector, so the tanh-approximated GELU that
/// every ViT / SigLIP export spells out (`0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 *
/// x^3)))`) is never fused: the `powf` alone was 18 % of a 4-layer fp32 vision encoder.
/// Running the detector first (it is tract's own, public) gives its fused `GeluApproximate`.
/// Returns how many GELUs were fused.
pub fn fuse_gelu_approximations(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    use tract_onnx::tract_core::ops::math::Pow;
    use tract_onnx::tract_core::ops::nn::gelu_approximate::detect_gelu_approx;
    let mut fused = 0;
    let pows: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| n.op_as::<TypedBinOp>().is_some_and(|op| op.0.is::<Pow>()))
        .map(|n| n.id)
        .collect();
    for id in pows {
        if let Some(patch) = detect_gelu_approx(&Pow, model, model.node(id))? {
            patch.apply(model)?;
            fused += 1;
        }
    }
    Ok(fused)
}

/// A compact constant weight expanded to plain f32 on every run, for products that run
/// faster on tract's f32 kernels ([`expand_block_quant_for_many_rows`],
/// [`int8_products_on_f32_kernels`]). Inputs: a block-quantized weight (4-bit `Q4_0`, what
/// ONNX `MatMulNBits` loads as), or an integer weight and its scalar zero point (giving
/// `weight - zero_point`). It refuses constant folding: the f32 copy exists only while its
/// product runs, so resident memory stays that of the compact weight.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq)]
pub struct ExpandWeight;

impl Op for ExpandWeight {
    fn name(&self) -> StaticName {
        "EdgevlmExpandWeight".into()
    }

    op_as_typed_op!();
}

impl EvalOp for ExpandWeight {
    fn eval_out_of_plan(&self, _inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(None)
    }

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let weight = &inputs[0];
        if let Some(bqs) = weight.storage_as::<BlockQuantStorage>() {
            let values = bqs.format().dequant_f32(bqs.value())?;
            return Ok(tvec!(values.into_shape(weight.shape())?.into_tvalue()));
        }
        let zero = match inputs.get(1) {
            Some(z) => z.cast_to_scalar::<f32>()?,
            None => 0.0,
        };
        let mut values = weight.cast_to::<f32>()?.into_owned();
        values
            .try_as_plain_ram_mut()?
            .as_slice_mut::<f32>()?
            .iter_mut()
            .for_each(|w| *w -= zero);
        Ok(tvec!(values.into_tvalue()))
    }
}

impl TypedOp for ExpandWeight {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// tract 0.23.9 runs a product with a 4-bit block-quantized weight as a series of
/// matrix-vector products (`fma_mmm_f32_32x1`) whatever the number of activation rows: a vision
/// encoder's 1024-patch products ran at ~30 GFLOP/s against ~108 for its f32 path, 4-6x
/// ONNX Runtime's time. For products whose row count is known at load and at least
/// `min_rows`, symbolic axes counted as 1 (a vision encoder loaded for its tile size), this expands the weight to f32 on
/// each run (a few ms per run; the f32 copy lives only while its product runs, so resident
/// memory stays that of the 4-bit weights) and lets tract pick its matrix-matrix kernels.
/// Products with a symbolic row count (a decoder's prefill and decode steps share one plan)
/// keep the 4-bit path, which is at ONNX Runtime's speed for one row. Returns how many
/// products were changed.
pub fn expand_block_quant_for_many_rows(
    model: &mut TypedModel,
    min_rows: usize,
) -> TractResult<usize> {
    let mut targets = vec![];
    for node in model.nodes() {
        if node.op_as::<EinSum>().is_none() || node.inputs.len() != 2 {
            continue;
        }
        let facts = model.node_input_facts(node.id)?;
        for slot in 0..2 {
            let (weight, act) = (facts[slot], facts[1 - slot]);
            let is_block_quant = weight
                .konst
                .as_ref()
                .is_some_and(|k| k.storage_as::<BlockQuantStorage>().is_some());
            let k = weight.shape.last().and_then(|d| d.to_usize().ok());
            if is_block_quant && k.is_some_and(|k| known_rows(act, k) >= min_rows) {
                targets.push((node.id, slot, node.inputs[slot]));
            }
        }
    }
    for (node, slot, input) in &targets {
        let name = format!("{}.edgevlm_expand_bq_{slot}", model.node(*node).name);
        let expanded = model.wire_node(name, ExpandWeight, &[*input])?[0];
        model.add_edge(expanded, InletId::new(*node, *slot))?;
    }
    Ok(targets.len())
}

/// Is `outlet` a constant whose every value is `value`?
fn is_uniform(model: &TypedModel, outlet: OutletId, value: f32) -> TractResult<bool> {
    let fact = model.outlet_fact(outlet)?;
    Ok(match &fact.konst {
        Some(k) => k
            .cast_to::<f32>()?
            .try_as_plain_ram()?
            .as_slice::<f32>()?
            .iter()
            .all(|v| *v == value),
        None => false,
    })
}

/// Rows of the activation of a product whose contraction has `k` elements: the product of
/// the activation's known axes over `k`. Symbolic axes count as 1: a vision encoder's batch
/// stays symbolic (its flattening reshape makes a fresh symbol) while its patch axis is known.
fn known_rows(act: &TypedFact, k: usize) -> usize {
    let volume: usize = act.shape.iter().filter_map(|d| d.to_usize().ok()).product();
    volume / k.max(1)
}

/// tract 0.23.9's int8 matrix-matrix kernel is slower than its f32 kernel on many rows (on
/// this project's AVX-512 VNNI machine: a 1024 x 768 x 3072 product ~140 ms in
/// `avx512vnni_mmm_i32_8x8` against ~67 ms in `avx512_mmm_f32_32x6`), and its zero-point
/// compensation adds elementwise passes over the output. For an ONNX `MatMulInteger` (an
/// `EinSum` with `q_params` i32, unit scales, zero bias) with a constant weight, a scalar
/// weight zero point and at least `min_rows` known activation rows (a vision encoder), this
/// computes the same integer product in f32: `(a - a0)` as f32 times `(b - b0)` expanded to f32
/// on each run ([`ExpandWeight`], never stored), cast back to i32. Integer products and their
/// sums are exact in f32 up to 2^24, so the result is the int8 product (up to the rounding
/// of sums beyond 2^24, which the following cast to float has anyway): the activations stay
/// quantized exactly as ONNX Runtime quantizes them. Returns how many products were changed.
pub fn int8_products_on_f32_kernels(model: &mut TypedModel, min_rows: usize) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::cast::{cast, Cast};
    use tract_onnx::tract_core::ops::change_axes::wire_with_rank_broadcast;
    use tract_onnx::tract_core::ops::math::sub;
    let mut candidates = vec![];
    for node in model.nodes() {
        let Some(op) = node.op_as::<EinSum>() else {
            continue;
        };
        if op.q_params != Some(i32::datum_type()) || node.inputs.len() != 9 {
            continue;
        }
        let facts = model.node_input_facts(node.id)?;
        let (act, weight, a0, b0) = (facts[0], facts[1], facts[3], facts[5]);
        let Some(k) = weight
            .shape
            .iter()
            .rev()
            .nth(1)
            .and_then(|d| d.to_usize().ok())
        else {
            continue;
        };
        if weight.konst.is_none()
            || b0.konst.is_none()
            || b0.shape.volume() != 1.to_dim()
            || a0.shape.volume() != 1.to_dim()
            || known_rows(act, k) < min_rows
            || !is_uniform(model, node.inputs[2], 0.0)?
            || !is_uniform(model, node.inputs[7], 0.0)?
            || !is_uniform(model, node.inputs[4], 1.0)?
            || !is_uniform(model, node.inputs[6], 1.0)?
            || !is_uniform(model, node.inputs[8], 1.0)?
        {
            continue;
        }
        candidates.push(node.id);
    }
    for id in &candidates {
        let node = model.node(*id).clone();
        let op = node.op_as::<EinSum>().unwrap().clone();
        let name = &node.name;
        let mut patch = TypedModelPatch::new(format!("edgevlm int8 product on f32 kernels {name}"));
        let taps = patch.taps(model, &node.inputs)?;
        let a = patch.wire_node(
            format!("{name}.edgevlm_a_f32"),
            cast(f32::datum_type()),
            &[taps[0]],
        )?[0];
        let a0 = patch.wire_node(
            format!("{name}.edgevlm_a0_f32"),
            cast(f32::datum_type()),
            &[taps[3]],
        )?[0];
        let a = wire_with_rank_broadcast(
            format!("{name}.edgevlm_a_centered"),
            &mut patch,
            sub(),
            &[a, a0],
        )?[0];
        let b = patch.wire_node(
            format!("{name}.edgevlm_b_f32"),
            ExpandWeight,
            &[taps[1], taps[5]],
        )?[0];
        let product = EinSum {
            axes: op.axes.extract_sub_mapping(&[0, 1], &[0])?,
            operating_dt: f32::datum_type(),
            q_params: None,
        };
        let c = patch.wire_node(format!("{name}.edgevlm_f32"), product, &[a, b])?[0];
        // ONNX Runtime's pattern casts the i32 product straight to float: the f32 product
        // is that float already (an integral f32 survives f32 -> i32 -> f32 unchanged), so
        // both passes over the output are skipped.
        let to_float = model
            .single_succ(*id)?
            .filter(|s| s.op_as::<Cast>().is_some_and(|c| c.to == f32::datum_type()));
        match to_float {
            Some(succ) => patch.shunt_outside(model, OutletId::new(succ.id, 0), c)?,
            None => {
                let c = patch.wire_node(
                    format!("{name}.edgevlm_i32"),
                    cast(i32::datum_type()),
                    &[c],
                )?[0];
                patch.shunt_outside(model, OutletId::new(*id, 0), c)?
            }
        }
        patch.apply(model)?;
    }
    Ok(candidates.len())
}

/// ONNX `DynamicQuantizeLinear` (x: f32 -> y: u8, y_scale, y_zero_point) with the arithmetic
/// of the ONNX spec and of tract-onnx's `DynamicQuantizeLinearU8`, in two tight passes over
/// a slice. tract's version folds the range over an ndarray iterator and rounds through
/// `rintf`: 9 % of a dynamic-int8 vision encoder's time.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq)]
pub struct DynamicQuantizeU8;

impl DynamicQuantizeU8 {
    /// `(scale, zero_point)` for values in `xs`: the range widened to include 0, over 255; an
    /// empty range (all zeros) gets scale 1 as in ONNX Runtime (tract's 0 gives the same
    /// outputs through a NaN).
    fn params(xs: &[f32]) -> (f32, u8) {
        let (mut lo, mut hi) = (0f32, 0f32);
        for &x in xs {
            lo = if x < lo { x } else { lo };
            hi = if x > hi { x } else { hi };
        }
        let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
        let zero = (-lo / scale).round_ties_even().clamp(0.0, 255.0);
        (scale, zero as u8)
    }

    /// `saturate(round_half_even(x / scale) + zero_point)`. `|x / scale| <= 255`, so adding
    /// and subtracting 1.5 * 2^23 rounds half to even exactly (and vectorizes).
    fn quantize(xs: &[f32], scale: f32, zero: u8, ys: &mut [u8]) {
        const ROUND: f32 = 12_582_912.0;
        let zero = zero as i32;
        for (y, &x) in ys.iter_mut().zip(xs) {
            let r = (x / scale + ROUND) - ROUND;
            *y = (r as i32 + zero).clamp(0, 255) as u8;
        }
    }
}

impl Op for DynamicQuantizeU8 {
    fn name(&self) -> StaticName {
        "EdgevlmDynamicQuantizeU8".into()
    }

    op_as_typed_op!();
}

impl EvalOp for DynamicQuantizeU8 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = inputs[0].cast_to::<f32>()?;
        let plain = input.try_as_plain_ram()?;
        let xs = plain.as_slice::<f32>()?;
        let (scale, zero) = Self::params(xs);
        let mut output = Tensor::zero::<u8>(input.shape())?;
        Self::quantize(
            xs,
            scale,
            zero,
            output.try_as_plain_ram_mut()?.as_slice_mut::<u8>()?,
        );
        Ok(tvec!(
            output.into_tvalue(),
            tensor0(scale).into_tvalue(),
            tensor0(zero).into_tvalue()
        ))
    }
}

impl TypedOp for DynamicQuantizeU8 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(
            u8::fact(inputs[0].shape.clone()),
            f32::fact([0usize; 0]),
            u8::fact([0usize; 0])
        ))
    }

    as_op!();
}

/// Replaces tract-onnx's `DynamicQuantizeLinearU8` nodes by [`DynamicQuantizeU8`] (same
/// results, faster). Returns how many were replaced.
pub fn faster_dynamic_quantize(model: &mut TypedModel) -> TractResult<usize> {
    let ids: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| n.op.name() == "DynamicQuantizeLinearU8" && n.outputs.len() == 3)
        .map(|n| n.id)
        .collect();
    for &id in &ids {
        let node = model.node(id);
        let patch =
            TypedModelPatch::replace_single_op(model, node, &node.inputs, DynamicQuantizeU8)?;
        patch.apply(model)?;
    }
    Ok(ids.len())
}

/// `a + b` or `a * b` (f32) where `b` repeats over some of `a`'s axes (its size 1 there) and
/// matches a contiguous trailing block of `a`: one slice operation per block, in place in
/// `a` when the plan hands it over. See [`faster_broadcast_binaries`].
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct BlockBroadcast {
    /// Multiply instead of add.
    pub mul: bool,
    /// `b` is the node's first input (the op is commutative).
    pub swapped: bool,
}

impl Op for BlockBroadcast {
    fn name(&self) -> StaticName {
        if self.mul {
            "EdgevlmBlockBroadcastMul".into()
        } else {
            "EdgevlmBlockBroadcastAdd".into()
        }
    }

    op_as_typed_op!();
}

impl EvalOp for BlockBroadcast {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        if self.swapped {
            inputs.swap(0, 1);
        }
        let b = inputs.pop().unwrap();
        let mut out = inputs.pop().unwrap().into_tensor();
        let a_shape = out.shape().to_vec();
        let b_shape = b.shape().to_vec();
        ensure!(
            a_shape.len() == b_shape.len(),
            "block broadcast: ranks {a_shape:?} {b_shape:?}"
        );
        let mut split = a_shape.len();
        let mut block = 1;
        while split > 0 && a_shape[split - 1] == b_shape[split - 1] {
            split -= 1;
            block *= a_shape[split];
        }
        // b's stride for each outer axis of a (0 where b repeats).
        let mut b_strides = vec![0; split];
        let mut stride = block;
        for axis in (0..split).rev() {
            ensure!(
                b_shape[axis] == a_shape[axis] || b_shape[axis] == 1,
                "block broadcast: {b_shape:?} does not broadcast to {a_shape:?}"
            );
            if b_shape[axis] != 1 {
                b_strides[axis] = stride;
            }
            stride *= b_shape[axis];
        }
        let b_plain = b.try_as_plain_ram()?;
        let bs = b_plain.as_slice::<f32>()?;
        {
            let mut out_plain = out.try_as_plain_ram_mut()?;
            let xs = out_plain.as_slice_mut::<f32>()?;
            for (i, chunk) in xs.chunks_exact_mut(block.max(1)).enumerate() {
                let (mut rest, mut offset) = (i, 0);
                for axis in (0..split).rev() {
                    offset += (rest % a_shape[axis]) * b_strides[axis];
                    rest /= a_shape[axis];
                }
                let src = &bs[offset..offset + chunk.len()];
                if self.mul {
                    chunk.iter_mut().zip(src).for_each(|(x, y)| *x *= y);
                } else {
                    chunk.iter_mut().zip(src).for_each(|(x, y)| *x += y);
                }
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for BlockBroadcast {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let full = inputs[self.swapped as usize];
        Ok(tvec!(f32::fact(full.shape.clone())))
    }

    as_op!();
}

/// Elements in the trailing block a [`BlockBroadcast`] must have to be worth it.
const MIN_BROADCAST_BLOCK: i64 = 256;

/// tract 0.23.9 optimizes a binary op only when the broadcast operand is a scalar per row
/// or matches a suffix after leading 1s; anything else (a ViT's attention mask `[batch, 1, N,
/// N]` added to the scores `[batch, heads, N, N]`, with `batch` symbolic) stays on the
/// generic ndarray broadcast at ~4 ns per element: 230 ms of a 1.2 s probe vision encoder.
/// This gives such f32 `Add` / `Mul` nodes a [`BlockBroadcast`]. Returns how many.
pub fn faster_broadcast_binaries(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    use tract_onnx::tract_core::ops::math::{Add, Mul};
    let mut targets = vec![];
    for node in model.nodes() {
        let Some(op) = node.op_as::<TypedBinOp>() else {
            continue;
        };
        let mul = op.0.is::<Mul>();
        if !(mul || op.0.is::<Add>()) || node.inputs.len() != 2 {
            continue;
        }
        let facts = model.node_input_facts(node.id)?;
        if facts
            .iter()
            .any(|f| f.datum_type != f32::datum_type() || f.rank() != node.outputs[0].fact.rank())
        {
            continue;
        }
        let out = &node.outputs[0].fact.shape;
        for swapped in [false, true] {
            let (full, part) = (facts[swapped as usize], facts[1 - swapped as usize]);
            if full.shape != *out || part.shape == *out {
                continue;
            }
            let broadcasts = part
                .shape
                .iter()
                .zip(out.iter())
                .all(|(p, o)| p == o || p.is_one());
            let block: TDim = part
                .shape
                .iter()
                .zip(out.iter())
                .rev()
                .take_while(|(p, o)| p == o)
                .map(|(p, _)| p.clone())
                .product();
            if broadcasts && block.to_i64().is_ok_and(|b| b >= MIN_BROADCAST_BLOCK) {
                targets.push((node.id, BlockBroadcast { mul, swapped }));
                break;
            }
        }
    }
    for (id, op) in &targets {
        let node = model.node(*id);
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op.clone())?;
        patch.apply(model)?;
    }
    Ok(targets.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::cast::cast;
    use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};

    /// The three examples of the ONNX operator documentation for DynamicQuantizeLinear and an
    /// all-zero input, with ONNX Runtime 1.22's outputs (scale 1 for an empty range).
    #[test]
    fn dynamic_quantize_matches_the_onnx_spec() {
        let cases: [(&[f32], f32, u8, &[u8]); 4] = [
            (
                &[0., 2., -3., -2.5, 1.34, 0.5],
                0.019_607_844,
                153,
                &[153, 255, 0, 26, 221, 179],
            ),
            (
                &[-1., -2.1, -1.3, -2.5, -3.34, -4.],
                0.015_686_275,
                255,
                &[191, 121, 172, 96, 42, 0],
            ),
            (
                &[1., 2.1, 1.3, 2.5, 3.34, 4., 1.5, 2.6, 3.9, 4., 3., 2.345],
                0.015_686_275,
                0,
                &[64, 134, 83, 159, 213, 255, 96, 166, 249, 255, 191, 149],
            ),
            (&[0., 0., 0.], 1.0, 0, &[0, 0, 0]),
        ];
        for (xs, scale, zero, ys) in cases {
            let out = DynamicQuantizeU8
                .eval(
                    &EvalContext::out_of_plan(),
                    tvec!(tensor1(xs).into_tvalue()),
                )
                .unwrap();
            let s = out[1].cast_to_scalar::<f32>().unwrap();
            assert!((s - scale).abs() < 1e-8, "{xs:?}: scale {s}");
            assert_eq!(out[2].cast_to_scalar::<u8>().unwrap(), zero, "{xs:?}");
            let y: Vec<u8> = out[0]
                .to_plain_array_view::<u8>()
                .unwrap()
                .iter()
                .copied()
                .collect();
            assert_eq!(y, ys, "{xs:?}");
        }
        // Halves round to even, as ONNX asks.
        let (scale, zero) = (1.0, 0);
        let mut ys = [0u8; 4];
        DynamicQuantizeU8::quantize(&[2.5, 3.5, 0.5, 254.5], scale, zero, &mut ys);
        assert_eq!(ys, [2, 4, 0, 254]);
    }

    /// Against ndarray's own broadcasting, for both ops, both input orders and a repeat in
    /// the middle, at the front and both.
    #[test]
    fn block_broadcast_equals_the_generic_broadcast() {
        let make = |shape: &[usize], seed: usize| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| ((i * 7 + seed) % 13) as f32 - 6.0).collect();
            tensor1(&values).into_shape(shape).unwrap()
        };
        let a_shape = [2, 3, 4, 64];
        for b_shape in [[2, 1, 4, 64], [1, 3, 4, 64], [1, 1, 4, 64], [2, 1, 1, 64]] {
            let (a, b) = (make(&a_shape, 1), make(&b_shape, 5));
            for mul in [false, true] {
                let av = a.to_plain_array_view::<f32>().unwrap();
                let bv = b.to_plain_array_view::<f32>().unwrap();
                let want = if mul { &av * &bv } else { &av + &bv };
                for swapped in [false, true] {
                    let inputs = if swapped {
                        tvec!(b.clone().into_tvalue(), a.clone().into_tvalue())
                    } else {
                        tvec!(a.clone().into_tvalue(), b.clone().into_tvalue())
                    };
                    let got = BlockBroadcast { mul, swapped }
                        .eval(&EvalContext::out_of_plan(), inputs)
                        .unwrap();
                    let got = got[0].to_plain_array_view::<f32>().unwrap();
                    assert_eq!(got, want.view().into_dyn(), "{b_shape:?} mul {mul}");
                }
            }
        }
    }

    fn run(model: &TypedModel) -> TVec<TValue> {
        model.clone().into_runnable().unwrap().run(tvec!()).unwrap()
    }

    /// A weight shared by two consumers, one of them `Cast -> Reduce<Sum>` as a quantized
    /// product's codegen wires it: the sums become a constant, results unchanged.
    #[test]
    fn folds_the_sums_of_a_shared_weight() {
        let mut model = TypedModel::default();
        let values: Vec<i8> = (0..4096 * 64).map(|i| (i % 251) as i8).collect();
        let w = model
            .add_const("w", tensor1(&values).into_shape(&[4096, 64]).unwrap())
            .unwrap();
        let wide = model
            .wire_node("wide", cast(i32::datum_type()), &[w])
            .unwrap();
        let sums = model
            .wire_node("sums", Reduce::new(tvec!(0), Reducer::Sum), &wide)
            .unwrap();
        let other = model
            .wire_node("other", cast(f32::datum_type()), &[w])
            .unwrap();
        model.select_output_outlets(&[sums[0], other[0]]).unwrap();
        let before = run(&model);

        assert_eq!(fold_shared_constants(&mut model).unwrap(), 1);
        let producer = model.node(model.output_outlets().unwrap()[0].node);
        assert!(
            producer.op_is::<tract_onnx::tract_core::ops::konst::Const>(),
            "{producer:?}"
        );
        let after = run(&model);
        assert_eq!(before[0], after[0]);
        assert_eq!(before[1], after[1]);
        // The expanding cast of the second output is never materialised on its own.
        assert_eq!(fold_shared_constants(&mut model).unwrap(), 0);
    }

    fn gelu_tanh(model: &mut TypedModel, x: OutletId) -> OutletId {
        use tract_onnx::tract_core::ops::math::{add, mul, pow, tanh};
        let scalar = |model: &mut TypedModel, name: &str, v: f32| {
            model.add_const(name, tensor2(&[[v]])).unwrap()
        };
        let three = scalar(model, "three", 3.0);
        let cube = model.wire_node("pow", pow(), &[x, three]).unwrap()[0];
        let c = scalar(model, "c", 0.044715);
        let cube_c = model.wire_node("mul_c", mul(), &[cube, c]).unwrap()[0];
        let inner = model.wire_node("add_x", add(), &[x, cube_c]).unwrap()[0];
        let k = scalar(model, "k", (2.0 / std::f32::consts::PI).sqrt());
        let scaled = model.wire_node("mul_k", mul(), &[inner, k]).unwrap()[0];
        let t = model.wire_node("tanh", tanh(), &[scaled]).unwrap()[0];
        let one = scalar(model, "one", 1.0);
        let t1 = model.wire_node("add_1", add(), &[t, one]).unwrap()[0];
        let xt = model.wire_node("mul_x", mul(), &[x, t1]).unwrap()[0];
        let half = scalar(model, "half", 0.5);
        model.wire_node("mul_half", mul(), &[xt, half]).unwrap()[0]
    }

    #[test]
    fn fuses_the_tanh_gelu_that_pow_const_would_hide() {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 8])).unwrap();
        let y = gelu_tanh(&mut model, x);
        model.select_output_outlets(&[y]).unwrap();
        let input: Vec<f32> = (0..8).map(|i| i as f32 * 0.7 - 2.5).collect();
        let run = |m: TypedModel| {
            let m = m.into_optimized().unwrap();
            let fused = m
                .nodes()
                .iter()
                .any(|n| n.op.name().contains("GeluApproximate"));
            let out = m
                .into_runnable()
                .unwrap()
                .run(tvec!(tensor1(&input).into_shape(&[1, 8]).unwrap().into()))
                .unwrap();
            let values: Vec<f32> = out[0]
                .to_plain_array_view::<f32>()
                .unwrap()
                .iter()
                .copied()
                .collect();
            (fused, values)
        };
        let (tract_fused, plain) = run(model.clone());
        assert!(
            !tract_fused,
            "tract now fuses this GELU itself: the patch can go"
        );
        assert_eq!(fuse_gelu_approximations(&mut model).unwrap(), 1);
        assert!(model
            .nodes()
            .iter()
            .any(|n| n.op.name().contains("GeluApproximate")));
        let (_, fused) = run(model);
        for (a, b) in plain.iter().zip(&fused) {
            assert!((a - b).abs() < 1e-4, "{plain:?} vs {fused:?}");
        }
    }
}
