//! ONNX `MatMulNBits` (com.microsoft, 4-bit) parsed straight onto edgevlm's 4-bit kernel.
//!
//! tract 0.23.9 turns each `MatMulNBits` into a `Q4_0` block-quantized constant while it
//! translates the graph to typed form: it unpacks every nibble into a byte, packs them again
//! into `Q4_0` blocks (scales rounded to f16), and [`crate::q4mm::own_q4_products`] then
//! repacks that for [`Q4MatMul`]. Three passes over every 4-bit weight: on the probe q4 cold
//! start (`perf`), `MatMulNBits::wire` and `pack_prequantized` took 17 % and the repack 5 %.
//!
//! [`register`] puts a parser in tract-onnx's operator registry (its public extension point)
//! that reads the weight and scales from the graph's initializers and packs them once, in
//! the ONNX layout, into a [`Q4Packed`]. It takes the shapes the kernel serves: `bits` 4,
//! `block_size` 32, `K` a multiple of 32, constant weight and f32 scales in the file, no zero
//! points (symmetric: code minus 8), no `g_idx`, no bias. Anything else goes to tract's own
//! parser, as before. The scales stay f32, as ONNX Runtime uses them.

use std::sync::{Arc, OnceLock};

use tract_onnx::model::ParsingContext;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::tract_hir::internal::*;

use crate::q4mm::{PanelProduct, Q4MatMul, Q4Packed};
use crate::qdq::attr_int as attr;

type Parsed = (Box<dyn InferenceOp>, Vec<String>);
type Builder = fn(&ParsingContext, &pb::NodeProto) -> TractResult<Parsed>;

/// tract's own `MatMulNBits` parser, for the products this one does not take.
static TRACT_PARSER: OnceLock<Builder> = OnceLock::new();

/// Parses `MatMulNBits` with edgevlm's parser in `onnx` from now on, where the CPU runs
/// [`Q4MatMul`] (AVX-512 or AVX2). Returns whether it did.
pub fn register(onnx: &mut tract_onnx::Onnx) -> bool {
    if crate::q4mm::f32_kernel().is_none() {
        return false;
    }
    let Some(tract) = onnx.op_register.0.get("MatMulNBits").copied() else {
        return false;
    };
    TRACT_PARSER.get_or_init(|| tract);
    onnx.op_register.insert("MatMulNBits", parse);
    true
}

fn parse(ctx: &ParsingContext, node: &pb::NodeProto) -> TractResult<Parsed> {
    if let Some(weight) = packed_weight(ctx, node)? {
        return Ok((expand(NBitsProduct { weight }), vec![]));
    }
    let tract = TRACT_PARSER
        .get()
        .context("MatMulNBits parser used before register()")?;
    tract(ctx, node)
}

/// The packed weight of `node`, if it is a product [`Q4Packed::from_matmul_nbits`] takes.
fn packed_weight(ctx: &ParsingContext, node: &pb::NodeProto) -> TractResult<Option<Arc<Q4Packed>>> {
    let (Some(k), Some(n)) = (attr(node, "K"), attr(node, "N")) else {
        return Ok(None);
    };
    let bits = attr(node, "bits").unwrap_or(4);
    let block_size = attr(node, "block_size");
    // Inputs past the scales (zero_points, g_idx, bias) must be absent or empty names.
    let extra = node.input.iter().skip(3).any(|name| !name.is_empty());
    if bits != 4 || block_size != Some(32) || k <= 0 || n <= 0 || k % 32 != 0 || extra {
        return Ok(None);
    }
    let Some(graph) = ctx.model.graph.as_ref() else {
        return Ok(None);
    };
    let init = |i: usize| {
        let name = node.input.get(i)?;
        graph.initializer.iter().find(|t| &t.name == name)
    };
    let (Some(b), Some(scales)) = (init(1), init(2)) else {
        return Ok(None);
    };
    if b.data_type != DataType::Uint8 as i32 || !b.external_data.is_empty() {
        return Ok(None);
    }
    let Some(scales) = crate::qdq::f32_values(scales) else {
        return Ok(None);
    };
    let (n, k) = (n as usize, k as usize);
    Ok(Q4Packed::from_matmul_nbits(&b.raw_data, &scales, n, k).map(Arc::new))
}

/// A `MatMulNBits` whose weight was packed at parse time: `Y = A W^T` on [`Q4MatMul`], in
/// f32 (an activation of another float type is cast there and back).
#[derive(Debug, Clone)]
struct NBitsProduct {
    weight: Arc<Q4Packed>,
}

impl Expansion for NBitsProduct {
    fn name(&self) -> StaticName {
        "EdgevlmMatMulNBits".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        let n = self.weight.n().to_dim();
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            s.equals(&outputs[0].rank, rank as i64)?;
            for ax in 0..rank - 1 {
                s.equals(&outputs[0].shape[ax], &inputs[0].shape[ax])?;
            }
            s.equals(&outputs[0].shape[rank - 1], n.clone())
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        use tract_onnx::tract_core::ops::cast::cast;
        let dt = model.outlet_fact(inputs[0])?.datum_type;
        let mut a = inputs[0];
        if dt != f32::datum_type() {
            a = model.wire_node(format!("{prefix}.cast_a"), cast(f32::datum_type()), &[a])?[0];
        }
        let op = Q4MatMul {
            weight: self.weight.clone(),
        };
        let mut y = model.wire_node(prefix, op, &[a])?[0];
        if dt != f32::datum_type() {
            y = model.wire_node(format!("{prefix}.cast_y"), cast(dt), &[y])?[0];
        }
        Ok(tvec!(y))
    }
}
