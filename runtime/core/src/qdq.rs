//! Static QDQ products as integer products: a rewrite of the ONNX protobuf before tract parses it.
//!
//! A static QDQ export (`onnxruntime.quantization.quantize_static`, QDQ format) wraps each
//! `MatMul` as `MatMul(DequantizeLinear(QuantizeLinear(x)), DequantizeLinear(W_int8))`. tract
//! 0.23.9 folds the weight's `DequantizeLinear` into a float32 constant and runs the product
//! in float32, between a quantize and a dequantize pass over the activation: the probe QDQ
//! vision encoder took 2.0 s against ONNX Runtime's 0.54 s, which runs these products on
//! int8 kernels (`docs/tract-slow-paths.md`, section 11).
//!
//! [`qdq_products_to_integer`] writes each such product the way a dynamic-int8 export does:
//! `Mul(Cast<float>(MatMulInteger(x_q, W_int8, x_zero, W_zero)), x_scale * W_scale)`. The
//! integer sum is exact, so the result is the same product with one rounding instead of
//! float32 accumulation; and the product now reaches edgevlm's int8 kernel
//! ([`crate::int8mm`]) or tract's integer matmul.

use std::collections::HashMap;

use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;

const F32: i32 = DataType::Float as i32;
const I8: i32 = DataType::Int8 as i32;
const U8: i32 = DataType::Uint8 as i32;

fn elements(t: &pb::TensorProto) -> i64 {
    t.dims.iter().product()
}

/// The f32 values of a small initializer (scales), from `raw_data` or `float_data`.
pub(crate) fn f32_values(t: &pb::TensorProto) -> Option<Vec<f32>> {
    if t.data_type != F32 || !t.external_data.is_empty() {
        return None;
    }
    let values: Vec<f32> = if t.raw_data.is_empty() {
        t.float_data.clone()
    } else {
        t.raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    (values.len() as i64 == elements(t)).then_some(values)
}

fn is_node(n: &pb::NodeProto, op: &str) -> bool {
    n.op_type == op && (n.domain.is_empty() || n.domain == "ai.onnx")
}

pub(crate) fn attr_int(n: &pb::NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// One `DequantizeLinear`'s operands: (quantized input, scale values, zero point name).
struct Dequant<'a> {
    quantized: &'a str,
    scale: Vec<f32>,
    zero_point: Option<&'a str>,
}

/// `name` as the output of a `DequantizeLinear` with constant scale and zero point: per
/// tensor, or (`per_column` = N) one per column of a rank-2 weight, i.e. on axis 1.
fn dequant<'a>(
    name: &str,
    producers: &HashMap<&str, &'a pb::NodeProto>,
    inits: &HashMap<&str, &'a pb::TensorProto>,
    per_column: Option<i64>,
) -> Option<Dequant<'a>> {
    let node = producers
        .get(name)
        .filter(|n| is_node(n, "DequantizeLinear"))?;
    let scale = f32_values(inits.get(node.input.get(1)?.as_str())?)?;
    let zero_point = node.input.get(2).filter(|z| !z.is_empty());
    let zp_len = match zero_point {
        Some(z) => {
            let t = inits.get(z.as_str())?;
            if t.data_type != I8 && t.data_type != U8 {
                return None;
            }
            elements(t)
        }
        None => scale.len() as i64,
    };
    let per_tensor = scale.len() == 1 && zp_len == 1;
    let axis = attr_int(node, "axis").unwrap_or(1);
    let columns = per_column
        .is_some_and(|n| scale.len() as i64 == n && zp_len == n && (axis == 1 || axis == -1));
    (per_tensor || columns).then(|| Dequant {
        quantized: node.input[0].as_str(),
        scale,
        zero_point: zero_point.map(|z| z.as_str()),
    })
}

/// Rewrites every `MatMul(DequantizeLinear(x_q), DequantizeLinear(W_q))` with a per-tensor
/// activation, a constant 8-bit rank-2 weight and per-tensor or per-column weight
/// parameters into `MatMulInteger -> Cast -> Mul(scale)` (see the module docs). Returns the
/// names of the rewritten products. The `DequantizeLinear` nodes stay for other consumers;
/// tract prunes those left without one.
pub fn qdq_products_to_integer(proto: &mut pb::ModelProto) -> Vec<String> {
    let Some(graph) = proto.graph.as_mut() else {
        return vec![];
    };
    let mut plans = vec![];
    {
        let producers: HashMap<&str, &pb::NodeProto> = graph
            .node
            .iter()
            .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
            .collect();
        let inits: HashMap<&str, &pb::TensorProto> = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        for (ix, node) in graph.node.iter().enumerate() {
            if !is_node(node, "MatMul") || node.input.len() != 2 {
                continue;
            }
            let weight = producers
                .get(node.input[1].as_str())
                .filter(|n| is_node(n, "DequantizeLinear"))
                .and_then(|n| inits.get(n.input[0].as_str()))
                .filter(|w| w.dims.len() == 2 && (w.data_type == I8 || w.data_type == U8));
            let Some(weight) = weight else { continue };
            let Some(b) = dequant(&node.input[1], &producers, &inits, Some(weight.dims[1])) else {
                continue;
            };
            let Some(a) = dequant(&node.input[0], &producers, &inits, None) else {
                continue;
            };
            let scale: Vec<f32> = b.scale.iter().map(|s| s * a.scale[0]).collect();
            plans.push((
                ix,
                [
                    a.quantized.to_string(),
                    b.quantized.to_string(),
                    a.zero_point.unwrap_or_default().to_string(),
                    b.zero_point.unwrap_or_default().to_string(),
                ],
                scale,
            ));
        }
    }
    let mut rewritten = vec![];
    for (ix, inputs, scale) in plans.into_iter().rev() {
        let old = graph.node.remove(ix);
        let base = if old.name.is_empty() {
            old.output[0].clone()
        } else {
            old.name.clone()
        };
        let tmp = |suffix: &str| format!("{base}/edgevlm_integer/{suffix}");
        let mut inputs = inputs.to_vec();
        while inputs.last().is_some_and(|i| i.is_empty()) {
            inputs.pop();
        }
        graph.initializer.push(pb::TensorProto {
            name: tmp("scale"),
            dims: if scale.len() == 1 {
                vec![]
            } else {
                vec![scale.len() as i64]
            },
            data_type: F32,
            raw_data: scale.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        let nodes = [
            pb::NodeProto {
                input: inputs,
                output: vec![tmp("product")],
                name: tmp("product"),
                op_type: "MatMulInteger".into(),
                ..Default::default()
            },
            crate::upcast::cast_node(tmp("float"), tmp("product"), tmp("float"), F32),
            pb::NodeProto {
                input: vec![tmp("float"), tmp("scale")],
                output: old.output.clone(),
                name: tmp("scaled"),
                op_type: "Mul".into(),
                ..Default::default()
            },
        ];
        graph.node.splice(ix..ix, nodes);
        rewritten.push(base);
    }
    rewritten.reverse();
    rewritten
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upcast::tests::{model, node, value};
    use tract_onnx::prelude::*;

    fn init(name: &str, dt: i32, dims: &[i64], raw: Vec<u8>) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: dt,
            raw_data: raw,
            ..Default::default()
        }
    }

    fn floats(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// `y = MatMul(DQ(Q(x)), DQ(W))`, x `[3, 8]`, W `[8, 5]` int8 with per-tensor or
    /// per-column parameters.
    fn graph(per_column: bool) -> pb::ModelProto {
        let (k, n) = (8usize, 5usize);
        let w: Vec<u8> = (0..k * n)
            .map(|i| ((i * 37 % 255) as i32 - 127) as i8 as u8)
            .collect();
        let (ws, wz): (Vec<f32>, Vec<u8>) = if per_column {
            (
                (0..n).map(|j| 0.01 + j as f32 * 0.003).collect(),
                vec![0u8; n],
            )
        } else {
            (vec![0.02], vec![0])
        };
        let wdims: Vec<i64> = if per_column { vec![n as i64] } else { vec![] };
        model(pb::GraphProto {
            name: "g".into(),
            node: vec![
                node("QuantizeLinear", &["x", "xs", "xz"], "xq"),
                node("DequantizeLinear", &["xq", "xs", "xz"], "xd"),
                node("DequantizeLinear", &["w", "ws", "wz"], "wd"),
                node("MatMul", &["xd", "wd"], "y"),
            ],
            initializer: vec![
                init("xs", F32, &[], floats(&[0.05])),
                init("xz", U8, &[], vec![128]),
                init("w", I8, &[k as i64, n as i64], w),
                init("ws", F32, &wdims, floats(&ws)),
                init("wz", I8, &wdims, wz),
            ],
            input: vec![value("x", F32, &[3, k as i64])],
            output: vec![value("y", F32, &[3, n as i64])],
            ..Default::default()
        })
    }

    fn run(proto: &pb::ModelProto) -> Vec<f32> {
        let model = tract_onnx::onnx()
            .model_for_proto_model(proto)
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let x: Vec<f32> = (0..24).map(|i| (i as f32 * 0.77).sin() * 5.0).collect();
        let x = tract_ndarray::Array2::from_shape_vec((3, 8), x).unwrap();
        let y = model.run(tvec!(x.into_tensor().into())).unwrap().remove(0);
        crate::values::<f32>(&y.into_tensor()).unwrap()
    }

    #[test]
    fn qdq_products_become_integer_products_with_the_same_results() {
        for per_column in [false, true] {
            let original = graph(per_column);
            let mut proto = original.clone();
            assert_eq!(qdq_products_to_integer(&mut proto), vec!["y".to_string()]);
            let ops: Vec<&str> = proto
                .graph
                .as_ref()
                .unwrap()
                .node
                .iter()
                .map(|n| n.op_type.as_str())
                .collect();
            assert!(
                ops.contains(&"MatMulInteger") && !ops.contains(&"MatMul"),
                "{ops:?}"
            );
            let (got, want) = (run(&proto), run(&original));
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{got:?} vs {want:?}"
                );
            }
        }
    }

    #[test]
    fn products_without_constant_8bit_weights_are_left_alone() {
        let mut proto = graph(false);
        // The weight comes in at run time: nothing to pack, tract's float product stays.
        let g = proto.graph.as_mut().unwrap();
        g.initializer.retain(|t| t.name != "w");
        g.input.push(value("w", I8, &[8, 5]));
        let before = proto.clone();
        assert!(qdq_products_to_integer(&mut proto).is_empty());
        assert_eq!(proto, before);
    }
}
