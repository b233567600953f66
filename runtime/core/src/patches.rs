//! Load-time patches for tract bugs, through tract's public extension points (a custom op and
//! model edits). Each names the bug it works around; `docs/tract-*.md` has the
//! upstream-ready description and a reproducer.

use std::sync::Mutex;

use tract_linalg::block_quant::{BlockQuantStorage, Q4_0};
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

/// A 4-bit block-quantized constant weight (`Q4_0`, what ONNX `MatMulNBits` loads as)
/// expanded to plain f32 on every run, for products that run faster on tract's f32 kernels
/// ([`expand_block_quant_for_many_rows`]). It refuses constant folding: the f32 copy exists
/// only while its product runs, so resident memory stays that of the compact weight.
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
            let format = bqs.format();
            let values = if is_q4_0(format) {
                let values = dequant_q4_0(bqs.value());
                tract_ndarray::ArrayD::from_shape_vec(weight.shape(), values)?.into_tensor()
            } else {
                format
                    .dequant_f32(bqs.value())?
                    .into_shape(weight.shape())?
            };
            return Ok(tvec!(values.into_tvalue()));
        }
        bail!(
            "EdgevlmExpandWeight: {:?} is not block-quantized",
            weight.datum_type()
        )
    }
}

/// Is `format` GGML's `Q4_0` (32 values in 18 bytes)?
pub(crate) fn is_q4_0(format: &dyn tract_linalg::block_quant::BlockQuant) -> bool {
    format.block_len() == 32
        && format.block_bytes() == 18
        && format!("{format:?}") == format!("{Q4_0:?}")
}

/// GGML's `Q4_0` blocks (an f16 scale, then 16 bytes: value `i` in the low nibble of byte
/// `i`, value `16 + i` in its high nibble, each minus 8) as f32, in one pass. tract's generic
/// `dequant_f32` reads nibble by nibble through a reader: ~1.6 ns per value, 50 ms of a
/// 130 ms probe q4 prefill.
fn dequant_q4_0(bytes: &[u8]) -> Vec<f32> {
    let mut values = Vec::with_capacity(bytes.len() / 18 * 32);
    for block in bytes.chunks_exact(18) {
        let scale = f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32();
        let nibbles = &block[2..];
        values.extend(
            nibbles
                .iter()
                .map(|b| ((b & 0x0f) as i32 - 8) as f32 * scale),
        );
        values.extend(nibbles.iter().map(|b| ((b >> 4) as i32 - 8) as f32 * scale));
    }
    values
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
        if let Some((slot, k)) = block_quant_product(model, node)? {
            let act = model.outlet_fact(node.inputs[1 - slot])?;
            if known_rows(act, k) >= min_rows {
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

/// If `node` is a product with a constant block-quantized (4-bit) weight: the weight's input
/// slot and the contraction size.
pub(crate) fn block_quant_product(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(usize, usize)>> {
    if node.op_as::<EinSum>().is_none() || node.inputs.len() != 2 {
        return Ok(None);
    }
    for slot in 0..2 {
        let weight = model.outlet_fact(node.inputs[slot])?;
        let is_block_quant = weight
            .konst
            .as_ref()
            .is_some_and(|k| k.storage_as::<BlockQuantStorage>().is_some());
        if let Some(k) = weight.shape.last().and_then(|d| d.to_usize().ok()) {
            if is_block_quant && model.outlet_fact(node.inputs[1 - slot])?.konst.is_none() {
                return Ok(Some((slot, k)));
            }
        }
    }
    Ok(None)
}

/// If `node` is an ONNX `MatMulInteger` as tract loads it (an `EinSum` with `q_params` i32 and
/// nine inputs) with a constant weight, scalar zero points, zero bias and unit scales: the
/// contraction size. The activation is input 0, its zero point input 3.
fn int8_product(model: &TypedModel, node: &TypedNode) -> TractResult<Option<usize>> {
    if !is_matmul_integer(model, node)? {
        return Ok(None);
    }
    let facts = model.node_input_facts(node.id)?;
    let (weight, a0, b0) = (facts[1], facts[3], facts[5]);
    let Some(k) = weight
        .shape
        .iter()
        .rev()
        .nth(1)
        .and_then(|d| d.to_usize().ok())
    else {
        return Ok(None);
    };
    if weight.konst.is_none()
        || b0.konst.is_none()
        || b0.shape.volume() != 1.to_dim()
        || a0.shape.volume() != 1.to_dim()
    {
        return Ok(None);
    }
    Ok(Some(k))
}

/// Is `node` an ONNX `MatMulInteger` as tract loads it: an `EinSum` with `q_params` i32 and
/// nine inputs (a, b, bias, a0, a_scale, b0, b_scale, c0, c_scale) whose bias and output zero
/// point are constant zeros and whose scales are constant ones?
pub(crate) fn is_matmul_integer(model: &TypedModel, node: &TypedNode) -> TractResult<bool> {
    let Some(op) = node.op_as::<EinSum>() else {
        return Ok(false);
    };
    Ok(op.q_params == Some(i32::datum_type()) && has_integer_q_inputs(model, node)?)
}

/// Does the quantized `node` (tract's 9-input form of an ONNX integer product or
/// convolution: a, b, bias, a0, a_scale, b0, b_scale, c0, c_scale) have a constant zero bias
/// and output zero point and constant unit scales, i32 sums with the zero points `a0` and
/// `b0` as its only quantization?
pub(crate) fn has_integer_q_inputs(model: &TypedModel, node: &TypedNode) -> TractResult<bool> {
    Ok(node.inputs.len() == 9
        && is_uniform(model, node.inputs[2], 0.0)?
        && is_uniform(model, node.inputs[7], 0.0)?
        && is_uniform(model, node.inputs[4], 1.0)?
        && is_uniform(model, node.inputs[6], 1.0)?
        && is_uniform(model, node.inputs[8], 1.0)?)
}

/// The only consumer of `outlet`, if it has exactly one and `outlet` is no model output (a
/// rewrite may then fold the two).
pub(crate) fn sole_consumer(model: &TypedModel, outlet: OutletId) -> Option<&TypedNode> {
    let succ = model.outlet_successors(outlet);
    let outputs = model.output_outlets().ok()?;
    (succ.len() == 1 && !outputs.contains(&outlet)).then(|| model.node(succ[0].node))
}

/// Is `outlet` a constant whose every value is `value`?
pub(crate) fn is_uniform(model: &TypedModel, outlet: OutletId, value: f32) -> TractResult<bool> {
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

/// A 4-bit product whose row count is only known at run time (a decoder's prefill and
/// decode steps share one plan), compiled twice. `few` is tract's own plan: at ONNX Runtime's
/// speed for one row (a decode step) but a series of matrix-vector products for many. `many`
/// is the same product with a plain f32 weight input, on tract's matrix-matrix kernels: a run
/// with at least `min_rows` rows (a prompt) expands the 4-bit weight chunk by chunk (about
/// [`WEIGHT_CHUNK_BYTES`] of f32, so the expanded copy stays in cache and its transient
/// memory small even for a 49k-row `lm_head`), runs `many` on each chunk and joins the
/// outputs. The 4-bit weight is held twice (tract's packed copy for `few`, and the original).
/// (With AVX-512 the loader gives these products [`crate::q4mm::Q4MatMul`] before this pass.)
#[derive(Clone)]
pub struct RowSwitch {
    few: Arc<TypedRunnableModel>,
    many: Arc<TypedRunnableModel>,
    /// The block-quantized weight, `[n, k]`.
    weight: Arc<Tensor>,
    /// The output axis the weight's rows become.
    n_axis: usize,
    /// Weight rows per chunk, what `many` is compiled for.
    chunk_rows: usize,
    /// The activation's position among the inputs.
    act: usize,
    /// Contraction size: rows are the activation's volume over it.
    k: usize,
    min_rows: usize,
    output: TypedFact,
}

/// f32 bytes of one weight chunk a [`RowSwitch`] expands at a time (the loader's choice: a
/// few times a Raspberry Pi's 1-2 MiB L2, small against the weights).
pub const WEIGHT_CHUNK_BYTES: usize = 4 << 20;

impl std::fmt::Debug for RowSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RowSwitch(k={}, min_rows={})", self.k, self.min_rows)
    }
}

impl PartialEq for RowSwitch {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.few, &other.few) && Arc::ptr_eq(&self.many, &other.many)
    }
}

impl Eq for RowSwitch {}

impl RowSwitch {
    /// The product on f32 kernels, the weight expanded `WEIGHT_CHUNK_BYTES` at a time.
    fn eval_many(&self, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let bqs = self
            .weight
            .storage_as::<BlockQuantStorage>()
            .context("RowSwitch weight is not block-quantized")?;
        let (n, k, chunk_rows) = (self.weight.shape()[0], self.k, self.chunk_rows);
        let row_bytes = k / 32 * 18;
        let bytes: &[u8] = bqs.value();
        let act = inputs.remove(self.act);
        let mut outputs = vec![];
        for first in (0..n).step_by(chunk_rows) {
            let rows = chunk_rows.min(n - first);
            let mut chunk = dequant_q4_0(&bytes[first * row_bytes..(first + rows) * row_bytes]);
            // `many` is compiled for whole chunks: the last one is padded with zero rows.
            chunk.resize(chunk_rows * k, 0.0);
            let chunk = tract_ndarray::ArrayD::from_shape_vec(vec![chunk_rows, k], chunk)?;
            let out = self
                .many
                .run(tvec!(act.clone(), chunk.into_tensor().into_tvalue()))?;
            let mut out = out.into_iter().next().context("no output")?.into_tensor();
            if rows < chunk_rows {
                out = out.slice(self.n_axis, 0, rows)?;
            }
            outputs.push(out);
        }
        Ok(tvec!(
            Tensor::stack_tensors(self.n_axis, &outputs)?.into_tvalue()
        ))
    }
}

impl Op for RowSwitch {
    fn name(&self) -> StaticName {
        "EdgevlmRowSwitch".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "k={}, f32 kernels from {} rows",
            self.k, self.min_rows
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for RowSwitch {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let rows = inputs[self.act].volume() / self.k.max(1);
        if rows >= self.min_rows {
            self.eval_many(inputs)
        } else {
            self.few.run(inputs)
        }
    }
}

impl TypedOp for RowSwitch {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.output.clone()))
    }

    as_op!();
}

/// Gives every 4-bit product with a run-time row count (as
/// [`expand_block_quant_for_many_rows`] takes them when the rows are known) and a `Q4_0`
/// `[n, k]` weight a [`RowSwitch`]: the product becomes a one-node model compiled by `compile`
/// as it is, and again with the weight as a plain f32 input of about `chunk_bytes`, and each
/// run picks by its row count. Run after decluttering, when the weights' constants have reached the products.
/// Returns how many products were switched.
pub fn switch_products_on_rows(
    model: &mut TypedModel,
    min_rows: usize,
    chunk_bytes: usize,
    compile: &dyn Fn(TypedModel) -> TractResult<Arc<TypedRunnableModel>>,
) -> TractResult<usize> {
    let mut targets = vec![];
    for node in model.nodes() {
        let Some((slot, k)) = block_quant_product(model, node)? else {
            continue;
        };
        let act = 1 - slot;
        let weight = model.outlet_fact(node.inputs[slot])?;
        let q4_0 = weight
            .konst
            .as_ref()
            .and_then(|w| w.storage_as::<BlockQuantStorage>())
            .is_some_and(|bqs| is_q4_0(bqs.format()));
        let fact = model.outlet_fact(node.inputs[act])?;
        if q4_0
            && weight.rank() == 2
            && fact.shape.iter().any(|d| d.to_usize().is_err())
            && known_rows(fact, k) < min_rows
        {
            targets.push((node.id, slot, k));
        }
    }
    for (id, slot, k) in &targets {
        let node = model.node(*id).clone();
        let op = node.op_as::<EinSum>().unwrap();
        let weight = model
            .outlet_fact(node.inputs[*slot])?
            .konst
            .clone()
            .unwrap();
        let act_fact = model.outlet_fact(node.inputs[1 - slot])?.without_value();
        // The output axis of the weight's first (row) axis.
        let (inputs, outputs) = op.axes.to_strs();
        let row_axis = inputs[*slot].chars().next().unwrap();
        let n_axis = outputs[0]
            .chars()
            .position(|c| c == row_axis)
            .context("the weight's rows are not an output axis")?;
        let one_node = |weight_input: Option<TypedFact>| -> TractResult<TypedModel> {
            let mut single = TypedModel {
                symbols: model.symbols.clone(),
                ..TypedModel::default()
            };
            let act = single.add_source(format!("{}.input", node.name), act_fact.clone())?;
            let w = match weight_input {
                Some(fact) => single.add_source(format!("{}.weight", node.name), fact)?,
                None => single.add_const(format!("{}.weight", node.name), weight.clone())?,
            };
            let wires = if *slot == 1 { [act, w] } else { [w, act] };
            let out = single.wire_node(&node.name, node.op.clone(), &wires)?[0];
            single.select_output_outlets(&[out])?;
            Ok(single)
        };
        let n = weight.shape()[0];
        // Even chunks, in whole 64-row kernel tiles, so the zero rows that pad the last
        // one stay few.
        let chunks = (n * k * 4).div_ceil(chunk_bytes.max(1)).max(1);
        let chunk_rows = n.div_ceil(chunks).next_multiple_of(64).min(n);
        let many = compile(one_node(Some(f32::fact([chunk_rows, *k])))?)?;
        let switch = RowSwitch {
            few: compile(one_node(None)?)?,
            many,
            weight,
            n_axis,
            chunk_rows,
            act: 0,
            k: *k,
            min_rows,
            output: node.outputs[0].fact.without_value(),
        };
        let mut patch = TypedModelPatch::new(format!("edgevlm row switch {}", node.name));
        let tap = patch.tap_model(model, node.inputs[1 - slot])?;
        let switched =
            patch.wire_node(format!("{}.edgevlm_row_switch", node.name), switch, &[tap])?[0];
        patch.shunt_outside(model, OutletId::new(*id, 0), switched)?;
        patch.apply(model)?;
    }
    Ok(targets.len())
}

/// tract 0.23.9 lowers an int8 product (`MatMulInteger`) whose activation has several outer
/// axes, a vision encoder's `[batch, patches, k]`, with its *batch* axis as the kernel's `n`
/// and the patches as a loop around it: with `batch` = 1, 1024 matrix-vector products on the
/// 8x8 VNNI kernel, which pads each to 8 columns (the f32 product of the same graph merges
/// the outer axes into `n`). This merges the activation's outer axes into one before such
/// products, and splits the output back after, so the kernel gets all the rows as `n`.
/// Returns how many products were changed.
pub fn merge_int8_product_rows(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::change_axes::AxisOp;
    let mut targets = vec![];
    for node in model.nodes() {
        if int8_product(model, node)?.is_none() {
            continue;
        }
        let op = node.op_as::<EinSum>().unwrap();
        let (inputs, outputs) = op.axes.to_strs();
        let act = &inputs[0];
        let outer = act.len().saturating_sub(1);
        let merged_free = outer >= 2
            && outputs[0].starts_with(&act[..outer])
            && inputs[1..]
                .iter()
                .all(|other| !other.chars().any(|c| act[..outer].contains(c)));
        if merged_free {
            targets.push(node.id);
        }
    }
    for id in &targets {
        let node = model.node(*id).clone();
        let op = node.op_as::<EinSum>().unwrap().clone();
        let (mut inputs, mut outputs) = op.axes.to_strs();
        let outer = inputs[0].len() - 1;
        let kept: String = inputs[0][..1].to_string();
        inputs[0] = format!("{kept}{}", &inputs[0][outer..]);
        outputs[0] = format!("{kept}{}", &outputs[0][outer..]);
        let axes = AxesMapping::from_strs(&inputs, &outputs)?;
        let act_shape = model.outlet_fact(node.inputs[0])?.shape.to_tvec();
        let dims: TVec<TDim> = act_shape[..outer].into();
        let rows: TDim = dims.iter().product();
        let name = &node.name;
        let mut patch = TypedModelPatch::new(format!("edgevlm merge int8 product rows {name}"));
        let mut taps = patch.taps(model, &node.inputs)?;
        taps[0] = patch.wire_node(
            format!("{name}.edgevlm_rows"),
            AxisOp::Reshape(0, dims.clone(), tvec![rows.clone()]),
            &[taps[0]],
        )?[0];
        let c = patch.wire_node(
            format!("{name}.edgevlm_merged"),
            EinSum { axes, ..op },
            &taps,
        )?[0];
        let c = patch.wire_node(
            format!("{name}.edgevlm_split"),
            AxisOp::Reshape(0, tvec![rows], dims),
            &[c],
        )?[0];
        patch.shunt_outside(model, OutletId::new(*id, 0), c)?;
        patch.apply(model)?;
    }
    Ok(targets.len())
}

/// ONNX `DynamicQuantizeLinear` (x: f32 -> y: u8, y_scale, y_zero_point) with the arithmetic
/// of the ONNX spec and of tract-onnx's `DynamicQuantizeLinearU8`, in two tight passes over
/// a slice. tract's version folds the range over an ndarray iterator and rounds through
/// `rintf`: 9 % of a dynamic-int8 vision encoder's time.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq)]
pub struct DynamicQuantizeU8;

impl DynamicQuantizeU8 {
    /// `(min, max)` of `xs` and 0.
    fn range(xs: &[f32]) -> (f32, f32) {
        crate::int8mm::range_with_zero(xs).unwrap_or_else(|| {
            let (mut lo, mut hi) = (0f32, 0f32);
            for &x in xs {
                lo = if x < lo { x } else { lo };
                hi = if x > hi { x } else { hi };
            }
            (lo, hi)
        })
    }

    /// `(scale, zero_point)` for values in the range `(lo, hi)` (0 included): the range over
    /// 255; an empty range (all zeros) gets scale 1 as in ONNX Runtime (tract's 0 gives the
    /// same outputs through a NaN).
    fn params_of_range((lo, hi): (f32, f32)) -> (f32, u8) {
        let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
        let zero = (-lo / scale).round_ties_even().clamp(0.0, 255.0);
        (scale, zero as u8)
    }

    /// `saturate(round_half_even(x / scale) + zero_point)`. `|x / scale| <= 255`, so adding
    /// and subtracting 1.5 * 2^23 rounds half to even exactly (and vectorizes).
    fn quantize(xs: &[f32], scale: f32, zero: u8, ys: &mut [u8]) {
        if crate::int8mm::quantize_u8(xs, scale, zero, ys) {
            return;
        }
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
        let mut output = Tensor::zero::<u8>(input.shape())?;
        let mut out_plain = output.try_as_plain_ram_mut()?;
        let ys = out_plain.as_slice_mut::<u8>()?;
        // Both passes in one piece per thread of the plan when the input is worth splitting
        // (a prompt's or a vision encoder's activations); a piece's range, then the whole
        // one, are exact in any order.
        let threads = crate::team::threads_for(0, std::mem::size_of_val(xs));
        let per = xs.len().div_ceil(threads).next_multiple_of(64).max(64);
        let ranges: Vec<Mutex<(f32, f32)>> =
            xs.chunks(per).map(|_| Mutex::new((0.0, 0.0))).collect();
        crate::team::for_each_part(ranges.len(), |p| {
            let range = Self::range(&xs[p * per..((p + 1) * per).min(xs.len())]);
            *ranges[p].lock().unwrap_or_else(|e| e.into_inner()) = range;
        });
        let range = ranges
            .into_iter()
            .map(|r| r.into_inner().unwrap_or_else(|e| e.into_inner()))
            .fold((0f32, 0f32), |(lo, hi), (l, h)| {
                (if l < lo { l } else { lo }, if h > hi { h } else { hi })
            });
        let (scale, zero) = Self::params_of_range(range);
        let pieces: Vec<Mutex<&mut [u8]>> = ys.chunks_mut(per).map(Mutex::new).collect();
        crate::team::for_each_part(pieces.len(), |p| {
            let mut piece = pieces[p].lock().unwrap_or_else(|e| e.into_inner());
            Self::quantize(&xs[p * per..][..piece.len()], scale, zero, &mut piece);
        });
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
        ensure!(
            b.rank() <= a_shape.len(),
            "block broadcast: {:?} has more axes than {a_shape:?}",
            b.shape()
        );
        // ONNX broadcasting: missing leading axes are 1.
        let mut b_shape = vec![1; a_shape.len() - b.rank()];
        b_shape.extend_from_slice(b.shape());
        for (axis, (&bn, &an)) in b_shape.iter().zip(&a_shape).enumerate() {
            ensure!(
                bn == an || bn == 1,
                "block broadcast: {:?} does not broadcast to {a_shape:?} (axis {axis})",
                b.shape()
            );
        }
        // The trailing axes form one run: either b matches a there (each chunk of the output
        // takes a block of b) or b is 1 there (each chunk takes one value of b).
        let matching = |axis: usize| b_shape[axis] == a_shape[axis];
        let repeating = |axis: usize| b_shape[axis] == 1;
        let blockwise = a_shape.last().is_none_or(|_| matching(a_shape.len() - 1));
        let mut split = a_shape.len();
        while split > 0
            && if blockwise {
                matching(split - 1)
            } else {
                repeating(split - 1)
            }
        {
            split -= 1;
        }
        let chunk: usize = a_shape[split..].iter().product();
        // b's stride for each outer axis of a (0 where b repeats).
        let mut b_strides = vec![0; split];
        let mut stride = if blockwise { chunk } else { 1 };
        for axis in (0..split).rev() {
            if b_shape[axis] != 1 {
                b_strides[axis] = stride;
            }
            stride *= b_shape[axis];
        }
        let b_plain = b.try_as_plain_ram()?;
        let bs = b_plain.as_slice::<f32>()?;
        let chunk = chunk.max(1);
        // b's offset for chunk i of the output.
        let offset_of = |i: usize| {
            let (mut rest, mut offset) = (i, 0);
            for axis in (0..split).rev() {
                offset += (rest % a_shape[axis]) * b_strides[axis];
                rest /= a_shape[axis];
            }
            offset
        };
        // Elements `at..at + piece.len()` of the output, chunk piece by chunk piece.
        let run = |at: usize, piece: &mut [f32]| {
            let (mut at, mut piece) = (at, piece);
            while !piece.is_empty() {
                let (offset, within) = (offset_of(at / chunk), at % chunk);
                let take = (chunk - within).min(piece.len());
                let (head, tail) = piece.split_at_mut(take);
                let block = if blockwise {
                    &bs[offset + within..offset + within + take]
                } else {
                    &[]
                };
                match (blockwise, self.mul) {
                    (true, true) => head.iter_mut().zip(block).for_each(|(x, y)| *x *= y),
                    (true, false) => head.iter_mut().zip(block).for_each(|(x, y)| *x += y),
                    (false, true) => head.iter_mut().for_each(|x| *x *= bs[offset]),
                    (false, false) => head.iter_mut().for_each(|x| *x += bs[offset]),
                }
                (at, piece) = (at + take, tail);
            }
        };
        {
            let mut out_plain = out.try_as_plain_ram_mut()?;
            // A large output in one piece per thread of the plan (a ViT's bias and residual
            // adds ran on one thread whatever the plan's thread count).
            crate::team::for_each_piece(out_plain.as_slice_mut::<f32>()?, run);
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

/// The tract-linalg kernel a [`ThreadedRoutine`] runs: the one tract's own op runs on f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Routine {
    /// `GeluApproximate` of the `x^3` form (`Func::Gelu`).
    Gelu,
    /// `Silu`, `x * sigmoid(x)` (`Func::Silu`).
    Silu,
    /// `Sigmoid` (`Func::Sigmoid`).
    Sigmoid,
    /// `Tanh` (`Func::Tanh`).
    Tanh,
    /// `Erf` (`Func::Erf`).
    Erf,
    /// `Exp` (`Func::Exp`).
    Exp,
    /// `RmsNorm` over the last axis, row by row (`rms_norm_f32`), with its epsilon's bits.
    RmsNorm(u32),
}

impl Routine {
    /// The kernel, for element-wise routines.
    fn func(self) -> Option<tract_linalg::routines::Func> {
        use tract_linalg::routines::Func;
        Some(match self {
            Routine::Gelu => Func::Gelu,
            Routine::Silu => Func::Silu,
            Routine::Sigmoid => Func::Sigmoid,
            Routine::Tanh => Func::Tanh,
            Routine::Erf => Func::Erf,
            Routine::Exp => Func::Exp,
            Routine::RmsNorm(_) => return None,
        })
    }

    /// The routine for a tract op that runs exactly it on an f32 input, if any.
    fn of(op: &dyn TypedOp, input: &TypedFact) -> Option<Routine> {
        use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
        use tract_onnx::tract_core::ops::math::{Erf, Exp, Tanh};
        use tract_onnx::tract_core::ops::nn::{GeluApproximate, RmsNorm, Sigmoid, Silu};
        if input.datum_type != f32::datum_type() {
            return None;
        }
        if let Some(norm) = op.downcast_ref::<RmsNorm>() {
            let eps = norm.eps.cast_to_scalar::<f32>().ok()?;
            return (input.rank() > 0 && norm.axis == input.rank() - 1)
                .then_some(Routine::RmsNorm(eps.to_bits()));
        }
        let ElementWiseOp(mini, None) = op.downcast_ref::<ElementWiseOp>()? else {
            return None;
        };
        if mini
            .downcast_ref::<GeluApproximate>()
            .is_some_and(|g| !g.fast_impl)
        {
            Some(Routine::Gelu)
        } else if mini.is::<Silu>() {
            Some(Routine::Silu)
        } else if mini.is::<Sigmoid>() {
            Some(Routine::Sigmoid)
        } else if mini.is::<Tanh>() {
            Some(Routine::Tanh)
        } else if mini.is::<Erf>() {
            Some(Routine::Erf)
        } else if mini.is::<Exp>() {
            Some(Routine::Exp)
        } else {
            None
        }
    }
}

/// A tract element-wise op or last-axis `RmsNorm` on the same tract-linalg kernel, cut into
/// pieces over edgevlm's team (whole rows for `RmsNorm`). tract 0.23.9 hands such an op of
/// 32 Ki elements or more to its rayon pool, parking the plan's thread meanwhile; with
/// edgevlm's workers still spinning after the last product, the plan then has more threads
/// than cores: on two threads the 256M fp32 decoder's 61 `RmsNorm`s took 5.1 ms against
/// 0.8 ms on one, its 30 `Silu`s 3.5 ms against 2.1. The kernels work lane by lane (row by
/// row), so the values are tract's bit for bit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ThreadedRoutine(pub Routine);

impl Op for ThreadedRoutine {
    fn name(&self) -> StaticName {
        match self.0 {
            Routine::Gelu => "EdgevlmGelu",
            Routine::Silu => "EdgevlmSilu",
            Routine::Sigmoid => "EdgevlmSigmoid",
            Routine::Tanh => "EdgevlmTanh",
            Routine::Erf => "EdgevlmErf",
            Routine::Exp => "EdgevlmExp",
            Routine::RmsNorm(_) => "EdgevlmRmsNorm",
        }
        .into()
    }

    op_as_typed_op!();
}

impl EvalOp for ThreadedRoutine {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut x = args_1!(inputs).into_tensor();
        let row = x.shape().last().copied().unwrap_or(1);
        {
            let mut plain = x.try_as_plain_ram_mut()?;
            let xs = plain.as_slice_mut::<f32>()?;
            if let Routine::RmsNorm(eps) = self.0 {
                let (kernel, eps) = (tract_linalg::routines::rms_norm_f32()?, f32::from_bits(eps));
                if row > 0 {
                    crate::team::for_each_piece_of(xs, row, |_, piece| {
                        piece.chunks_mut(row).for_each(|r| kernel(r, eps))
                    });
                }
            } else if let Some(func) = self.0.func() {
                let kernel = func.ew_f32()?;
                let failed = std::sync::Mutex::new(None);
                crate::team::for_each_piece(xs, |_, piece| {
                    if let Err(e) = kernel.run(piece) {
                        *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    }
                });
                if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
                    return Err(e);
                }
            }
        }
        Ok(tvec!(x.into_tvalue()))
    }
}

impl TypedOp for ThreadedRoutine {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Gives every f32 element-wise op and last-axis `RmsNorm` that runs a tract-linalg kernel
/// edgevlm knows ([`Routine`]) a [`ThreadedRoutine`]. Returns how many.
pub fn threaded_routines(model: &mut TypedModel) -> TractResult<usize> {
    let mut found = vec![];
    for node in model.nodes() {
        if node.inputs.len() != 1 {
            continue;
        }
        if let Some(routine) = Routine::of(node.op.as_ref(), model.outlet_fact(node.inputs[0])?) {
            found.push((node.id, routine));
        }
    }
    for (id, routine) in &found {
        let node = model.node(*id);
        let op = ThreadedRoutine(*routine);
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op)?;
        patch.apply(model)?;
    }
    Ok(found.len())
}

/// For each output named in `outputs` whose positions before the last are never read (a
/// decoder's logits, when generating): the product with a constant weight behind it (the
/// `lm_head`) gets only the last position of its activation's axis 1, through ops that work
/// position by position (casts, element-wise ops, binary ops with a constant). A prompt's
/// prefill then multiplies one row by the vocabulary-wide weight instead of every prompt
/// row: the 256M `lm_head` is 576 x 49280, ~20 % of an 85-token int8 prefill. The slice is
/// taken right at the product, after any dynamic quantization of its activation, so the
/// last row's quantization parameters, and so its values, are those of the whole product.
/// An output whose path does not fit is left whole. Returns how many were cut.
pub fn last_position_only(model: &mut TypedModel, outputs: &[String]) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::array::Slice;
    let mut cut = 0;
    for name in outputs {
        let Some(&output) = model
            .outputs
            .iter()
            .find(|o| model.outlet_label(**o).unwrap_or(&model.node(o.node).name) == name)
        else {
            continue;
        };
        let Some((product, chain)) = product_behind(model, output)? else {
            continue;
        };
        let act = model.node(product).inputs[0];
        let fact = model.outlet_fact(act)?;
        let (Some(rows), Some(out)) = (fact.shape.get(1), model.outlet_fact(output)?.shape.get(1))
        else {
            continue;
        };
        if fact.rank() != 3 || model.outlet_fact(output)?.rank() != 3 || rows != out {
            continue;
        }
        let rows = rows.clone();
        let name = format!("{}.edgevlm_last_position", model.node(product).name);
        let last = model.wire_node(name, Slice::new(1, rows.clone() - 1, rows), &[act])?[0];
        model.add_edge(last, InletId::new(product, 0))?;
        for id in std::iter::once(product).chain(chain.into_iter().rev()) {
            let facts = {
                let inputs = model.node_input_facts(id)?;
                model.node(id).op.output_facts(&inputs)?
            };
            for (ix, fact) in facts.into_iter().enumerate() {
                model.set_outlet_fact(OutletId::new(id, ix), fact)?;
            }
        }
        cut += 1;
    }
    Ok(cut)
}

/// The product with a constant weight that `outlet` comes from, position by position along
/// axis 1, and the nodes after it up to `outlet` (last first); `None` if there is none.
fn product_behind(
    model: &TypedModel,
    mut outlet: OutletId,
) -> TractResult<Option<(usize, Vec<usize>)>> {
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    use tract_onnx::tract_core::ops::cast::Cast;
    use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
    let mut chain = vec![];
    loop {
        let node = model.node(outlet.node);
        if node.outputs.len() != 1 || model.outlet_successors(outlet).len() > 1 {
            return Ok(None);
        }
        let konst = |i: &OutletId| model.outlet_fact(*i).map(|f| f.konst.is_some());
        let inputs: Vec<bool> = node.inputs.iter().map(konst).collect::<TractResult<_>>()?;
        // Inputs the same for every position: constants, and scalars (an int8 product's
        // scale, taken over the whole activation by its dynamic quantization).
        let fixed = |i: &OutletId, k: bool| {
            k || model
                .outlet_fact(*i)
                .is_ok_and(|f| f.shape.volume() == 1.to_dim())
        };
        let einsum = node.op_as::<EinSum>().and_then(|op| {
            let (ins, outs) = op.axes.to_strs();
            let row = ins.first()?.chars().nth(1)?;
            let only_here = ins[1..].iter().all(|i| !i.contains(row));
            (outs.first()?.chars().nth(1) == Some(row) && only_here).then_some(())
        });
        let panel = node.op_is::<crate::q4mm::F32MatMul>() || node.op_is::<crate::q4mm::Q4MatMul>();
        if !inputs.is_empty()
            && !inputs[0]
            && (panel || (einsum.is_some() && inputs.get(1) == Some(&true)))
        {
            return Ok(Some((node.id, chain)));
        }
        let row_wise = node.op_is::<Cast>()
            || node.op_is::<ElementWiseOp>()
            || node.op_is::<FoldBarrier>()
            || node.op_as::<TypedBinOp>().is_some_and(|_| {
                node.inputs.iter().zip(&inputs).all(|(i, &k)| {
                    !k || model
                        .outlet_fact(*i)
                        .is_ok_and(|f| f.rank() < 2 || f.shape[f.rank() - 2] == 1.to_dim())
                })
            });
        let varying: Vec<OutletId> = node
            .inputs
            .iter()
            .zip(&inputs)
            .filter(|(i, &k)| !fixed(i, k))
            .map(|(i, _)| *i)
            .collect();
        let [input] = varying[..] else {
            return Ok(None);
        };
        if !row_wise {
            return Ok(None);
        }
        chain.push(node.id);
        outlet = input;
    }
}

/// tract 0.23.9 optimizes a binary op only when it can prove at load how the operands
/// broadcast: a per-row scalar, or a suffix after leading 1s, with known sizes. Anything else
/// stays on the generic ndarray broadcast at ~2.5-4 ns per element: a ViT's attention mask
/// `[batch, 1, N, N]` added to the scores `[batch, heads, N, N]` (230 ms of a 1.2 s probe
/// vision encoder), and in a decoder, whose sequence axis is symbolic, even the
/// same-shape `gate * up` and the scaling of each int8 product by its scalar scale (16 of the
/// 52 ms of a probe int8 prefill). This gives every f32 `Add` / `Mul` tract left generic, one
/// of whose operands has the output's shape, a [`BlockBroadcast`], and every such `Sub` of a
/// constant the `Add` of its negation. Returns how many.
pub fn faster_broadcast_binaries(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    use tract_onnx::tract_core::ops::math::{Add, Mul, Sub};
    // (node, op, the negated constant a `Sub` becomes the `Add` of).
    let mut targets = vec![];
    for node in model.nodes() {
        let Some(op) = node.op_as::<TypedBinOp>() else {
            continue;
        };
        let (mul, sub) = (op.0.is::<Mul>(), op.0.is::<Sub>());
        if !(mul || sub || op.0.is::<Add>()) || node.inputs.len() != 2 {
            continue;
        }
        let facts = model.node_input_facts(node.id)?;
        let out = &node.outputs[0].fact.shape;
        if facts
            .iter()
            .any(|f| f.datum_type != f32::datum_type() || f.rank() > out.rank())
        {
            continue;
        }
        // `x - c` with a constant `c` is `x + (-c)`, exactly: IEEE subtraction is the addition
        // of the negation (a dynamic quantization's centring on its zero point).
        let negated = match (sub, &facts[1].konst) {
            (false, _) => None,
            (true, Some(c)) => Some(c.to_plain_array_view::<f32>()?.mapv(|v| -v)),
            (true, None) => continue,
        };
        for swapped in [false, true] {
            if sub && swapped {
                break;
            }
            let (full, part) = (facts[swapped as usize], facts[1 - swapped as usize]);
            let padding = out.rank() - part.rank();
            let broadcasts = part
                .shape
                .iter()
                .zip(out.iter().skip(padding))
                .all(|(p, o)| p == o || p.is_one());
            if full.shape == *out && broadcasts {
                let op = BlockBroadcast { mul, swapped };
                targets.push((node.id, op, negated.map(Tensor::from)));
                break;
            }
        }
    }
    for (id, op, negated) in targets.iter().cloned() {
        let node = model.node(id);
        let patch = match negated {
            None => TypedModelPatch::replace_single_op(model, node, &node.inputs, op)?,
            Some(negated) => {
                let mut patch = TypedModelPatch::new(format!("edgevlm sub {}", node.name));
                let x = patch.tap_model(model, node.inputs[0])?;
                let c = patch.add_const(format!("{}.negated", node.name), negated)?;
                let y = patch.wire_node(&node.name, op, &[x, c])?[0];
                patch.shunt_outside(model, id.into(), y)?;
                patch
            }
        };
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

    /// Split over two threads (an input over 128 KiB), the same range, parameters and bytes
    /// as in one piece.
    #[test]
    fn dynamic_quantize_in_pieces_equals_one_piece() {
        let xs: Vec<f32> = (0..100_003)
            // A ramp: every piece has its own range.
            .map(|i| ((i * 7919 % 10007) as f32 - 4000.0) * 1e-3 + i as f32 * 1e-4)
            .collect();
        let run = || {
            DynamicQuantizeU8
                .eval(
                    &EvalContext::out_of_plan(),
                    tvec!(tensor1(&xs).into_tvalue()),
                )
                .unwrap()
        };
        let one = run();
        let two = tract_linalg::multithread::multithread_tract_scope(
            crate::int8mm::tests::executor(2),
            run,
        );
        assert_eq!(crate::team::threads_for(0, xs.len() * 4), 1);
        let (scale, zero) = DynamicQuantizeU8::params_of_range(DynamicQuantizeU8::range(&xs));
        assert_eq!(one[1].cast_to_scalar::<f32>().unwrap(), scale);
        assert_eq!(one[2].cast_to_scalar::<u8>().unwrap(), zero);
        for (a, b) in one.iter().zip(&two) {
            assert_eq!(**a, **b);
        }
    }

    /// Against ndarray's own broadcasting, for both ops, both input orders and a repeat in
    /// the middle, at the front and both.
    /// `x - c` with a constant `c` becomes the `Add` of `-c`, bit for bit; `c - x` and the
    /// difference of two run-time values stay on tract's op.
    #[test]
    fn subtractions_of_a_constant_run_as_additions() -> TractResult<()> {
        use tract_onnx::tract_core::ops::math::sub;
        let x = Tensor::from_shape(
            &[2, 3, 5],
            &(0..30).map(|i| i as f32 * 0.37 - 4.1).collect::<Vec<_>>(),
        )?;
        let c = tensor3(&[[[0.3f32, -1.7, 2.9, 0.0, 1e-3]]]);
        for (first, counted) in [("x", 1), ("c", 0), ("y", 0)] {
            let mut m = TypedModel::default();
            let n = m.symbols.sym("n");
            let fact = f32::fact([n.to_dim(), 3.into(), 5.into()]);
            let xs = m.add_source("x", fact.clone())?;
            let other = match first {
                "y" => m.add_source("y", fact)?,
                _ => m.add_const("c", c.clone())?,
            };
            let inputs = if first == "c" {
                [other, xs]
            } else {
                [xs, other]
            };
            let y = m.wire_node("sub", sub(), &inputs)?[0];
            m.select_output_outlets(&[y])?;
            let mut ours = m.clone();
            assert_eq!(
                faster_broadcast_binaries(&mut ours)?,
                counted,
                "{first} first"
            );
            let feed = || -> TVec<TValue> {
                let mut v = tvec!(x.clone().into_tvalue());
                if first == "y" {
                    v.push(x.clone().into_tvalue());
                }
                v
            };
            let want = m.into_runnable()?.run(feed())?;
            let got = ours.into_runnable()?.run(feed())?;
            assert_eq!(want, got, "{first} first");
        }
        Ok(())
    }

    #[test]
    fn block_broadcast_equals_the_generic_broadcast() {
        let make = |shape: &[usize], seed: usize| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| ((i * 7 + seed) % 13) as f32 - 6.0).collect();
            tensor1(&values).into_shape(shape).unwrap()
        };
        // Which of a's axes b keeps (1 elsewhere), then b = a's last two axes, then a scalar.
        let keeps: [[bool; 4]; 9] = [
            [true, false, true, true],
            [false, true, true, true],
            [false, false, true, true],
            [true, false, false, true],
            [true, true, true, true],
            [false, false, false, false],
            [true, true, true, false],
            [false, true, false, false],
            [true, false, true, false],
        ];
        // The second is large enough to be split over two threads, in pieces that do not
        // fall on its chunks' edges.
        for (a_shape, threads) in [
            ([2, 3, 4, 64], 1),
            ([2, 3, 70, 101], 1),
            ([2, 3, 70, 101], 2),
        ] {
            let mut b_shapes: Vec<Vec<usize>> = keeps
                .iter()
                .map(|keep| {
                    (0..4)
                        .map(|i| if keep[i] { a_shape[i] } else { 1 })
                        .collect()
                })
                .collect();
            b_shapes.push(a_shape[2..].to_vec());
            b_shapes.push(vec![]);
            for b_shape in &b_shapes {
                let (a, b) = (make(&a_shape, 1), make(b_shape, 5));
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
                        let executor = crate::int8mm::tests::executor(threads);
                        let got =
                            tract_linalg::multithread::multithread_tract_scope(executor, || {
                                BlockBroadcast { mul, swapped }
                                    .eval(&EvalContext::out_of_plan(), inputs)
                                    .unwrap()
                            });
                        let got = got[0].to_plain_array_view::<f32>().unwrap();
                        assert_eq!(
                            got,
                            want.view().into_dyn(),
                            "{a_shape:?} {b_shape:?} mul {mul} threads {threads}"
                        );
                    }
                }
            }
        }
    }

    /// Each routine split over threads gives tract's own op's values, bit for bit, on one
    /// thread and in pieces over two: 331 rows of 213 (neither the elements nor the rows split
    /// evenly, and a piece cut inside a row would change that row's `RmsNorm`). Each tract op
    /// is also recognized as its routine.
    #[test]
    fn threaded_routines_equal_tracts() {
        use tract_onnx::tract_core::ops::{math, nn};
        let (rows, row) = (331, 213);
        let values: Vec<f32> = (0..rows * row)
            .map(|i| ((i * 7919) % 16_001) as f32 / 1000.0 - 8.0)
            .collect();
        let x = tensor1(&values).into_shape(&[rows, row]).unwrap();
        let eps = 1e-5f32;
        let ops: Vec<(Box<dyn TypedOp>, Routine)> = vec![
            (
                Box::new(nn::gelu_approximate::gelu_approximate(false)),
                Routine::Gelu,
            ),
            (Box::new(nn::silu::silu()), Routine::Silu),
            (Box::new(nn::sigmoid()), Routine::Sigmoid),
            (Box::new(math::tanh()), Routine::Tanh),
            (Box::new(math::erf()), Routine::Erf),
            (Box::new(math::exp()), Routine::Exp),
            (
                Box::new(nn::RmsNorm {
                    axis: 1,
                    eps: rctensor0(eps),
                }),
                Routine::RmsNorm(eps.to_bits()),
            ),
        ];
        let fact = f32::fact([rows, row]);
        for (op, routine) in ops {
            assert_eq!(Routine::of(op.as_ref(), &fact), Some(routine));
            let tracts = op
                .as_op()
                .eval(&EvalContext::out_of_plan(), tvec!(x.clone().into_tvalue()))
                .unwrap();
            let want = tracts[0].try_as_plain_ram().unwrap();
            for threads in [1, 2] {
                let executor = crate::int8mm::tests::executor(threads);
                let got = tract_linalg::multithread::multithread_tract_scope(executor, || {
                    ThreadedRoutine(routine)
                        .eval(&EvalContext::out_of_plan(), tvec!(x.clone().into_tvalue()))
                        .unwrap()
                });
                let got = got[0].try_as_plain_ram().unwrap();
                let (got, want) = (
                    got.as_slice::<f32>().unwrap(),
                    want.as_slice::<f32>().unwrap(),
                );
                assert!(
                    got.iter()
                        .zip(want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{routine:?} threads {threads}"
                );
                assert_ne!(got, &values[..]);
            }
        }
        // Not taken: a fast GELU, a non-last axis, another type.
        let fast = nn::gelu_approximate::gelu_approximate(true);
        assert_eq!(Routine::of(&fast, &fact), None);
        let first_axis = nn::RmsNorm {
            axis: 0,
            eps: rctensor0(eps),
        };
        assert_eq!(Routine::of(&first_axis, &fact), None);
        assert_eq!(
            Routine::of(&nn::silu::silu(), &f16::fact([rows, row])),
            None
        );
    }

    /// The one-pass Q4_0 expansion gives tract's own dequantization, bit for bit.
    #[test]
    fn q4_0_expansion_equals_tracts() {
        use tract_linalg::block_quant::BlockQuant;
        let values: Vec<f32> = (0..32 * 40)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013 * (1 + i / 32) as f32)
            .collect();
        let bytes = Q4_0.quant_f32(&values).unwrap();
        let want = Q4_0.dequant_f32(&bytes).unwrap();
        let want = want.try_as_plain_ram().unwrap();
        let got = dequant_q4_0(&bytes);
        assert_eq!(got.as_slice(), want.as_slice::<f32>().unwrap());
        for (got, values) in got.chunks(32).zip(values.chunks(32)) {
            // Q4_0 steps by max / 8 (an f16 scale) and clamps the far end of the range to 7 steps.
            let step = values.iter().fold(0f32, |m, v| m.max(v.abs())) / 8.0 * 1.01;
            let worst = got
                .iter()
                .zip(values)
                .fold(0f32, |m, (g, v)| m.max((g - v).abs()));
            assert!(worst <= step, "{worst} > {step}: {got:?} {values:?}");
        }
    }

    /// A 4-bit product with a symbolic row count, switched with weight chunks small enough
    /// for four of them (the last padded): one row runs tract's own plan, 20 rows the chunked
    /// f32 plan, and both give what the unswitched product gives; with AVX-512 the same for
    /// edgevlm's 4-bit kernel, which takes the product before the switch.
    #[test]
    fn row_switch_equals_the_four_bit_product() {
        use tract_linalg::block_quant::BlockQuant;
        let (n, k) = (200, 64);
        let values: Vec<f32> = (0..n * k)
            .map(|i| ((i * 29 % 97) as f32 - 48.0) * 0.01)
            .collect();
        let blob = Q4_0.quant_f32(&values).unwrap();
        let weight = BlockQuantStorage::new(Box::new(Q4_0), n, k, Arc::new(blob))
            .unwrap()
            .into_tensor_with_shape(f32::datum_type(), &[n, k]);
        let mut model = TypedModel::default();
        let s = model.symbols.sym("S");
        let act = model
            .add_source("act", f32::fact([TDim::from(s), TDim::from(k)]))
            .unwrap();
        let w = model.add_const("w", weight).unwrap();
        let product = EinSum {
            axes: "sk,nk->sn".parse().unwrap(),
            operating_dt: f32::datum_type(),
            q_params: None,
        };
        let out = model.wire_node("product", product, &[act, w]).unwrap();
        model.select_output_outlets(&out).unwrap();
        let plain = model
            .clone()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let compile = |m: TypedModel| m.into_optimized()?.into_runnable();
        // The chunked f32 plan, then (with AVX-512 or AVX2) edgevlm's 4-bit kernel.
        for own_kernel in [false, true] {
            let mut model = model.clone();
            // With AVX-512 or AVX2 the loader's 4-bit pass takes the product first.
            let own = own_kernel && crate::q4mm::f32_kernel().is_some();
            if own_kernel {
                let taken = crate::q4mm::own_q4_products(&mut model).unwrap();
                assert_eq!(taken, own as usize);
            }
            let switched = switch_products_on_rows(&mut model, 16, 16 * 1024, &compile).unwrap();
            assert_eq!(switched, !own as usize);
            let has = |name: &str| model.nodes().iter().any(|n| n.op.name() == name);
            assert_eq!(has("EdgevlmQ4MatMul"), own);
            assert_eq!(has("EdgevlmRowSwitch"), !own);
            if let Some(node) = model.nodes().iter().find_map(|n| n.op_as::<RowSwitch>()) {
                assert_eq!(
                    node.chunk_rows, 64,
                    "four chunks of 64 rows, the last one padded"
                );
            }
            let switched = model.into_runnable().unwrap();
            for rows in [1, 20] {
                let input: Vec<f32> = (0..rows * k).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
                let input = tensor1(&input).into_shape(&[rows, k]).unwrap();
                let want = plain.run(tvec!(input.clone().into_tvalue())).unwrap();
                let got = switched.run(tvec!(input.into_tvalue())).unwrap();
                assert_eq!(got[0].shape(), &[rows, n]);
                let want = want[0].to_plain_array_view::<f32>().unwrap();
                let got = got[0].to_plain_array_view::<f32>().unwrap();
                let worst = got
                    .iter()
                    .zip(want.iter())
                    .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
                assert!(
                    worst < 1e-4,
                    "{rows} rows, own kernel {own}: max |diff| {worst}"
                );
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
