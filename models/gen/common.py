"""Shared helpers for the edgevlm model/fixture generator.

Everything here exists so the generated artifacts are reproducible and
loadable by both onnxruntime and tract:

* models are pinned to a conservative IR version (new `onnx` releases stamp
  IR versions that older runtimes reject),
* ONNX Runtime is always run single threaded so reference numbers do not
  depend on how work was split between threads,
* npy files are written in the plain v1.0 little-endian C-order format that
  the Rust side reads.
"""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

# IR 9 is understood by onnxruntime >= 1.15 and by tract; opset 17 is the
# newest default-domain opset the Rust side targets (ReduceMean still takes
# `axes` as an attribute there, which keeps the graphs simple).
IR_VERSION = 9
OPSET = 17
MS_DOMAIN = "com.microsoft"


def finalize_model(model: onnx.ModelProto, check: bool = True, strict: bool = True) -> onnx.ModelProto:
    """Pin IR/opset versions and validate the model.

    Quantizers rewrite the ModelProto and may stamp their own IR version, so
    every model goes through here right before it is saved.
    """
    model.ir_version = IR_VERSION
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if len(default) != 1:
        raise ValueError(f"expected exactly one default-domain opset import, got {default}")
    if default[0].version != OPSET:
        raise ValueError(f"default opset is {default[0].version}, expected {OPSET}")
    if check:
        # full_check runs strict shape inference too; contrib ops (MatMulNBits)
        # are unknown to the onnx checker, so only the structural check is
        # possible for graphs that use them.
        # `strict=False` is for graphs that lie about shapes on purpose.
        uses_contrib = any(n.domain not in ("", "ai.onnx") for n in model.graph.node)
        onnx.checker.check_model(model, full_check=strict and not uses_contrib)
    return model


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Serialize a model into a single file (no external data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # SerializeToString is deterministic for messages without maps, which is
    # the case for ONNX, so identical protos give identical bytes.
    path.write_bytes(model.SerializeToString())


def load_model(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def op_histogram(model: onnx.ModelProto) -> "collections.OrderedDict[str, int]":
    """Count node op types, prefixing non-default domains (e.g. com.microsoft.MatMulNBits)."""
    counts: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx"):
            counts[node.op_type] += 1
        else:
            counts[f"{node.domain}.{node.op_type}"] += 1
    return collections.OrderedDict(sorted(counts.items()))


def format_histogram(hist: "dict[str, int]") -> str:
    return ", ".join(f"{op} x{n}" for op, n in hist.items())


def ort_session(model: "Path | bytes", threads: int = 1) -> ort.InferenceSession:
    """Single-threaded CPU session, the configuration all references use."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Keep ORT's warnings (e.g. declared-vs-actual shape mismatches) out of
    # the generator output unless they are errors.
    so.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write a .npy in format v1.0, little-endian, C order."""
    arr = np.array(array, order="C", copy=True)  # keeps 0-d arrays 0-d
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.lib.format.write_array(f, arr, version=(1, 0), allow_pickle=False)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Ops whose float operands stay float32 in a float16 graph (their ONNX or ORT
# kernels take no float16; the float16 converters' block lists).
FP16_KEEP_FLOAT = {"Range", "Resize", "CumSum", "RandomNormalLike", "RandomUniformLike"}
FP16_MAX = 65504.0


def convert_to_fp16(model: onnx.ModelProto, keep_io_types: bool) -> onnx.ModelProto:
    """float32 -> float16 weights and arithmetic, as fp16 exports (transformers.js, optimum) do.

    Every float initializer and constant becomes float16 (clipped to +-65504), casts to
    float are retargeted to float16, ops in FP16_KEEP_FLOAT get casts around them. With
    keep_io_types the float graph inputs/outputs stay float32 behind a Cast; without it
    they become float16 too. Single graph only (no If/Loop bodies).
    """
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input) + list(g.output)}
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16

    def half(t: onnx.TensorProto) -> onnx.TensorProto:
        a = numpy_helper.to_array(t)
        return numpy_helper.from_array(np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16), t.name)

    for i, t in enumerate(g.initializer):
        if t.data_type == F32:
            g.initializer[i].CopyFrom(half(t))
    nodes = []
    for k, n in enumerate(g.node):
        tag = n.name or f"node{k}"
        if n.op_type in FP16_KEEP_FLOAT:
            for j, x in enumerate(n.input):
                if elem.get(x) == F32:
                    nodes.append(helper.make_node("Cast", [x], [f"{x}/f32_for/{tag}"], to=F32))
                    n.input[j] = f"{x}/f32_for/{tag}"
            outs = []
            for j, y in enumerate(n.output):
                if elem.get(y) == F32:
                    n.output[j] = f"{y}/f32"
                    outs.append(helper.make_node("Cast", [f"{y}/f32"], [y], to=F16))
            nodes += [n] + outs
            continue
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F32:
                a.t.CopyFrom(half(a.t))
            if n.op_type == "Cast" and a.name == "to" and a.i == F32:
                a.i = F16
        nodes.append(n)
    head, tail = [], []
    for x in g.input:
        if x.type.tensor_type.elem_type != F32:
            continue
        if not keep_io_types:
            x.type.tensor_type.elem_type = F16
            continue
        for n in nodes:
            n.input[:] = [f"{x.name}/f16" if i == x.name else i for i in n.input]
        head.append(helper.make_node("Cast", [x.name], [f"{x.name}/f16"], to=F16))
    for y in g.output:
        if y.type.tensor_type.elem_type != F32:
            continue
        if not keep_io_types:
            y.type.tensor_type.elem_type = F16
            continue
        for n in nodes:
            n.input[:] = [f"{y.name}/f16" if i == y.name else i for i in n.input]
            n.output[:] = [f"{y.name}/f16" if o == y.name else o for o in n.output]
        tail.append(helper.make_node("Cast", [f"{y.name}/f16"], [y.name], to=F32))
    del g.node[:]
    g.node.extend(head + nodes + tail)
    del g.value_info[:]
    return model
