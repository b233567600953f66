//! Load-time patches for tract bugs, through tract's public extension points (a custom op and
//! model edits). Each names the bug it works around; `docs/tract-issues.md` has the
//! upstream-ready description and a reproducer.

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
