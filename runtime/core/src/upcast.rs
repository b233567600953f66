//! float16 graphs computed in float32: a rewrite of the ONNX protobuf before tract parses it.
//!
//! fp16 exports (transformers.js/optimum `_fp16`, `q4f16`) store weights and run arithmetic in
//! float16. tract 0.23.9 runs such a graph in f16 with generic code wherever it lacks f16
//! kernels: on x86-64 a ViT patch-embedding `Conv` took 5.1 s instead of ~60 ms, each
//! attention `Softmax` 300 ms, and none of edgevlm's load-time fusions (attention, GELU) apply
//! to f16 (`docs/tract-slow-paths.md`, section 10). ONNX Runtime's CPU provider does the same as
//! this module: it runs float16 nodes it has no float16 kernel for behind casts to float32.
//!
//! [`f16_to_f32`] turns every float16 weight, constant, cast target and declared type into
//! float32 and keeps the graph's interface: a float16 graph input gets a `Cast` to float32
//! behind it, a float16 output a `Cast` back in front of it. Weights take twice the memory
//! (what ONNX Runtime holds for them too); results are float32 arithmetic rounded to float16
//! only at float16 outputs, i.e. at least as close to the float32 model as a float16 run.

use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;

const F16: i32 = DataType::Float16 as i32;
const F32: i32 = DataType::Float as i32;

/// Operators whose `dtype` attribute names their output type.
const DTYPE_OPS: &[&str] = &[
    "EyeLike",
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Bernoulli",
    "Multinomial",
];

/// What [`f16_to_f32`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Upcast {
    /// float16 tensors (initializers and constant attributes) now stored as float32.
    pub tensors: usize,
    /// Bytes those tensors held as float16.
    pub f16_bytes: usize,
    /// Nodes retargeted from float16 to float32 (`Cast to`, `dtype` attributes).
    pub nodes: usize,
    /// Graph inputs and outputs that keep their float16 type behind a `Cast`.
    pub boundary: usize,
}

/// Rewrites a float16 graph to run in float32 (see the module docs). Returns `None` when the
/// graph holds no float16 at all. `dir` is the model's directory, for weights stored as ONNX
/// external data (read here through tract's own loader).
pub fn f16_to_f32(
    onnx: &tract_onnx::model::Onnx,
    proto: &mut pb::ModelProto,
    dir: Option<&str>,
) -> std::result::Result<Option<Upcast>, String> {
    let Some(graph) = proto.graph.as_mut() else {
        return Ok(None);
    };
    if !has_f16(graph) {
        return Ok(None);
    }
    let mut done = Upcast::default();
    keep_f16_interface(graph, &mut done);
    upcast_graph(onnx, graph, dir, &mut done)?;
    Ok(Some(done))
}

fn tensor_type(t: &pb::TypeProto) -> Option<i32> {
    match &t.value {
        Some(pb::type_proto::Value::TensorType(tt)) => Some(tt.elem_type),
        _ => None,
    }
}

fn set_tensor_type(t: &mut pb::TypeProto, elem: i32) {
    if let Some(pb::type_proto::Value::TensorType(tt)) = &mut t.value {
        tt.elem_type = elem;
    }
}

fn value_is_f16(v: &pb::ValueInfoProto) -> bool {
    v.r#type.as_ref().and_then(tensor_type) == Some(F16)
}

fn has_f16(g: &pb::GraphProto) -> bool {
    g.initializer.iter().any(|t| t.data_type == F16)
        || g.input
            .iter()
            .chain(&g.output)
            .chain(&g.value_info)
            .any(value_is_f16)
        || g.node.iter().any(|n| {
            n.attribute.iter().any(|a| {
                a.t.as_ref().is_some_and(|t| t.data_type == F16)
                    || a.tensors.iter().any(|t| t.data_type == F16)
                    || (a.name == "to" && n.op_type == "Cast" && a.i == F16 as i64)
                    || (a.name == "dtype" && a.i == F16 as i64)
                    || a.g.as_ref().is_some_and(has_f16)
                    || a.graphs.iter().any(has_f16)
            })
        })
}

fn cast(input: String, output: String, to: i32) -> pb::NodeProto {
    let name = format!("{output}/edgevlm_interface_cast");
    cast_node(name, input, output, to)
}

/// A `Cast` node called `name` from `input` to `output` of ONNX element type `to`.
pub(crate) fn cast_node(name: String, input: String, output: String, to: i32) -> pb::NodeProto {
    pb::NodeProto {
        name,
        input: vec![input],
        output: vec![output],
        op_type: "Cast".into(),
        attribute: vec![pb::AttributeProto {
            name: "to".into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i: to as i64,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// float16 graph inputs and outputs stay float16; the graph behind them runs in float32.
fn keep_f16_interface(g: &mut pb::GraphProto, done: &mut Upcast) {
    let mut head = vec![];
    let mut tail = vec![];
    for input in g.input.iter().filter(|v| value_is_f16(v)) {
        // Initializers may be listed as inputs (IR < 4): those are upcast as weights.
        if g.initializer.iter().any(|t| t.name == input.name) {
            continue;
        }
        let inner = format!("{}/edgevlm_f32", input.name);
        for name in g.node.iter_mut().flat_map(|n| n.input.iter_mut()) {
            if *name == input.name {
                *name = inner.clone();
            }
        }
        head.push(cast(input.name.clone(), inner, F32));
        done.boundary += 1;
    }
    for output in g.output.iter().filter(|v| value_is_f16(v)) {
        let produced = g.node.iter().any(|n| n.output.contains(&output.name));
        if !produced {
            // An input or initializer passed straight through keeps its own type handling.
            continue;
        }
        let inner = format!("{}/edgevlm_f32_out", output.name);
        for v in g.value_info.iter_mut().filter(|v| v.name == output.name) {
            v.name = inner.clone();
        }
        for n in g.node.iter_mut() {
            for name in n.input.iter_mut().chain(n.output.iter_mut()) {
                if *name == output.name {
                    *name = inner.clone();
                }
            }
        }
        tail.push(cast(inner, output.name.clone(), F16));
        done.boundary += 1;
    }
    if !head.is_empty() || !tail.is_empty() {
        let body = std::mem::take(&mut g.node);
        g.node = head.into_iter().chain(body).chain(tail).collect();
    }
}

fn upcast_tensor(
    onnx: &tract_onnx::model::Onnx,
    t: &mut pb::TensorProto,
    dir: Option<&str>,
    done: &mut Upcast,
) -> std::result::Result<(), String> {
    if t.data_type != F16 {
        return Ok(());
    }
    let stored_inline = t.external_data.is_empty() && t.int32_data.is_empty();
    let raw = if stored_inline && t.raw_data.len().is_multiple_of(2) {
        f16_bytes_to_f32_bytes(&t.raw_data)
    } else {
        // Weights in an external file, or float16 values in `int32_data`: tract's loader.
        let values = tract_onnx::tensor::load_tensor(&*onnx.provider, t, dir)
            .map_err(|e| e.to_string())
            .and_then(|v| crate::values::<f32>(&v).map_err(|e| e.to_string()))
            .map_err(|e| format!("float16 tensor '{}': {e}", t.name))?;
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    };
    done.tensors += 1;
    done.f16_bytes += raw.len() / 2;
    t.raw_data = raw;
    t.data_type = F32;
    t.int32_data.clear();
    t.external_data.clear();
    t.data_location = None;
    Ok(())
}

/// Little-endian float16 values to little-endian float32 ones, exactly, in blocks through
/// `half`'s slice conversion (F16C where the CPU has it). Taking the values through a tract
/// tensor and a byte iterator instead cost ~0.2 s of a probe fp16 package's load.
fn f16_bytes_to_f32_bytes(raw: &[u8]) -> Vec<u8> {
    use tract_onnx::prelude::tract_data::half::{f16, slice::HalfFloatSliceExt};
    const BLOCK: usize = 4096;
    let mut out = Vec::with_capacity(raw.len() * 2);
    let (mut halves, mut floats) = ([f16::ZERO; BLOCK], [0f32; BLOCK]);
    for chunk in raw.chunks(2 * BLOCK) {
        let n = chunk.len() / 2;
        for (h, b) in halves.iter_mut().zip(chunk.chunks_exact(2)) {
            *h = f16::from_le_bytes([b[0], b[1]]);
        }
        halves[..n].convert_to_f32_slice(&mut floats[..n]);
        for f in &floats[..n] {
            out.extend_from_slice(&f.to_le_bytes());
        }
    }
    out
}

fn upcast_graph(
    onnx: &tract_onnx::model::Onnx,
    g: &mut pb::GraphProto,
    dir: Option<&str>,
    done: &mut Upcast,
) -> std::result::Result<(), String> {
    for t in g.initializer.iter_mut() {
        upcast_tensor(onnx, t, dir, done)?;
    }
    // The interface Casts added above keep float16 at the boundary; everything else goes.
    let boundary: Vec<String> = g
        .input
        .iter()
        .chain(&g.output)
        .filter(|v| value_is_f16(v))
        .map(|v| v.name.clone())
        .collect();
    for v in g.value_info.iter_mut().filter(|v| value_is_f16(v)) {
        if let Some(t) = v.r#type.as_mut() {
            set_tensor_type(t, F32);
        }
    }
    for n in g.node.iter_mut() {
        let interface_cast = n.op_type == "Cast"
            && n.input
                .iter()
                .chain(&n.output)
                .any(|x| boundary.contains(x));
        for a in n.attribute.iter_mut() {
            if let Some(t) = a.t.as_mut() {
                upcast_tensor(onnx, t, dir, done)?;
            }
            for t in a.tensors.iter_mut() {
                upcast_tensor(onnx, t, dir, done)?;
            }
            let retarget = (n.op_type == "Cast" && a.name == "to" && !interface_cast)
                || (a.name == "dtype" && DTYPE_OPS.contains(&n.op_type.as_str()));
            if retarget && a.i == F16 as i64 {
                a.i = F32 as i64;
                done.nodes += 1;
            }
            if let Some(sub) = a.g.as_mut() {
                upcast_subgraph(onnx, sub, dir, done)?;
            }
            for sub in a.graphs.iter_mut() {
                upcast_subgraph(onnx, sub, dir, done)?;
            }
        }
    }
    Ok(())
}

/// If/Loop/Scan bodies: no interface to keep, their inputs and outputs are float32 too.
fn upcast_subgraph(
    onnx: &tract_onnx::model::Onnx,
    g: &mut pb::GraphProto,
    dir: Option<&str>,
    done: &mut Upcast,
) -> std::result::Result<(), String> {
    for v in g.input.iter_mut().chain(g.output.iter_mut()) {
        if value_is_f16(v) {
            if let Some(t) = v.r#type.as_mut() {
                set_tensor_type(t, F32);
            }
        }
    }
    upcast_graph(onnx, g, dir, done)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tract_onnx::prelude::*;

    /// A tensor-typed graph input/output/value_info (shared by the protobuf rewrite tests).
    pub(crate) fn value(name: &str, elem: i32, dims: &[i64]) -> pb::ValueInfoProto {
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: elem,
                    shape: Some(pb::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|d| pb::tensor_shape_proto::Dimension {
                                value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(*d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// An opset-17 model around `graph` (shared by the protobuf rewrite tests).
    pub(crate) fn model(graph: pb::GraphProto) -> pb::ModelProto {
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(graph),
            ..Default::default()
        }
    }

    /// A node named after its single output.
    pub(crate) fn node(op: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
        pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            name: output.into(),
            op_type: op.into(),
            ..Default::default()
        }
    }

    fn f16_tensor(name: &str, values: &[f32]) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            dims: vec![values.len() as i64],
            data_type: F16,
            raw_data: values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
            ..Default::default()
        }
    }

    /// `y = Cast<f16>(Cast<f32>(x) * w) + c`, float16 in and out, `c` a Constant node:
    /// every kind of float16 the rewrite handles, checked by running it.
    fn graph() -> pb::ModelProto {
        let mut constant = node("Constant", &[], "c");
        constant.attribute.push(pb::AttributeProto {
            name: "value".into(),
            r#type: pb::attribute_proto::AttributeType::Tensor as i32,
            t: Some(f16_tensor("", &[0.5, -0.25, 1.0])),
            ..Default::default()
        });
        let to = |i: i32| {
            let mut n = cast("".into(), "".into(), i);
            n.attribute.truncate(1);
            n.attribute
        };
        let mut up = node("Cast", &["x"], "x32");
        up.attribute = to(F32);
        let mut down = node("Cast", &["xw"], "xw16");
        down.attribute = to(F16);
        model(pb::GraphProto {
            name: "g".into(),
            node: vec![
                constant,
                up,
                node("Mul", &["x32", "w32"], "xw"),
                down,
                node("Add", &["xw16", "c"], "y"),
            ],
            initializer: vec![
                f16_tensor("w", &[2.0, 3.0, 4.0]),
                // w32 is float32 on purpose: the graph mixes both, as keep_io exports do.
                pb::TensorProto {
                    name: "w32".into(),
                    dims: vec![3],
                    data_type: F32,
                    raw_data: [2.0f32, 3.0, 4.0]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                    ..Default::default()
                },
            ],
            input: vec![value("x", F16, &[3])],
            output: vec![value("y", F16, &[3])],
            value_info: vec![value("xw16", F16, &[3])],
            ..Default::default()
        })
    }

    fn run(proto: &pb::ModelProto) -> (DatumType, Vec<f32>) {
        let model = tract_onnx::onnx()
            .model_for_proto_model(proto)
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let x = tensor1(&[
            f16::from_f32(1.5),
            f16::from_f32(-2.0),
            f16::from_f32(0.125),
        ]);
        let y = model.run(tvec!(x.into())).unwrap().remove(0);
        (
            y.datum_type(),
            crate::values::<f32>(&y.into_tensor()).unwrap(),
        )
    }

    #[test]
    fn float16_graph_runs_in_float32_behind_its_float16_interface() {
        let original = graph();
        let mut proto = original.clone();
        let done = f16_to_f32(&tract_onnx::onnx(), &mut proto, None)
            .unwrap()
            .unwrap();
        assert_eq!(
            done,
            Upcast {
                tensors: 2, // w and the Constant
                f16_bytes: 12,
                nodes: 1, // the inner Cast to float16
                boundary: 2,
            }
        );
        let g = proto.graph.as_ref().unwrap();
        // Nothing float16 is left inside: only the interface and its two Casts.
        assert!(g.initializer.iter().all(|t| t.data_type == F32));
        assert!(!g.value_info.iter().any(value_is_f16));
        assert_eq!(g.node.first().unwrap().input, ["x"]);
        assert_eq!(g.node.last().unwrap().output, ["y"]);
        assert!(value_is_f16(&g.input[0]) && value_is_f16(&g.output[0]));

        let (dt, got) = run(&proto);
        let (dt_f16, reference) = run(&original);
        assert_eq!((dt, dt_f16), (DatumType::F16, DatumType::F16));
        assert_eq!(got, vec![3.5, -6.25, 1.5]);
        assert_eq!(got, reference);
    }

    /// Every float16 bit pattern (normal, subnormal, zero, infinity, NaN) becomes the float32
    /// that `f16::to_f32` gives, whether the tensor is stored in `raw_data` (the fast path)
    /// or in `int32_data` (tract's loader).
    #[test]
    fn every_float16_value_upcasts_exactly() {
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        let raw = pb::TensorProto {
            name: "all".into(),
            dims: vec![bits.len() as i64],
            data_type: F16,
            raw_data: bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
            ..Default::default()
        };
        let typed = pb::TensorProto {
            raw_data: vec![],
            int32_data: bits.iter().map(|&b| b as i32).collect(),
            ..raw.clone()
        };
        for mut t in [raw, typed] {
            let mut done = Upcast::default();
            upcast_tensor(&tract_onnx::onnx(), &mut t, None, &mut done).unwrap();
            assert_eq!(
                (t.data_type, done.tensors, done.f16_bytes),
                (F32, 1, 2 << 16)
            );
            assert!(t.int32_data.is_empty());
            let got: Vec<u32> = t
                .raw_data
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            assert_eq!(got.len(), bits.len());
            for (&b, &g) in bits.iter().zip(&got) {
                let want = f16::from_bits(b).to_f32();
                let g = f32::from_bits(g);
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{b:#06x}: {g} vs {want}"
                );
            }
        }
    }

    #[test]
    fn float32_graphs_are_left_alone() {
        let mut proto = graph();
        let g = proto.graph.as_mut().unwrap();
        g.node
            .retain(|n| n.op_type != "Cast" && n.op_type != "Constant");
        g.initializer.retain(|t| t.data_type == F32);
        g.value_info.clear();
        for v in g.input.iter_mut().chain(g.output.iter_mut()) {
            set_tensor_type(v.r#type.as_mut().unwrap(), F32);
        }
        let before = proto.clone();
        assert_eq!(
            f16_to_f32(&tract_onnx::onnx(), &mut proto, None).unwrap(),
            None
        );
        assert_eq!(proto, before);
    }
}
