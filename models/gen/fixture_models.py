"""Test fixtures: a small seeded float graph and its quantized variants.

The Rust runtime compares its own outputs against onnxruntime's on these
graphs, so each variant exercises one family of quantized operators that
real exporters/quantizers produce:

* fp32                      plain float graph (conv stem + single-head attention)
* int8_dynamic              DynamicQuantizeLinear + MatMulInteger/ConvInteger
* int8_dynamic_per_channel  same, per-channel MatMulInteger weight scales/zero points
* qdq_conv_matmul           static QDQ around Conv/MatMul
* qdq_softmax               static QDQ that also wraps Softmax (DQ -> Softmax -> Q)
* q4                        com.microsoft MatMulNBits, 4 bit, block 32
* fp16                      float16 weights, arithmetic, inputs and outputs
* wrong_output_shape        fp32 graph whose declared output/value_info shapes lie
* uint8_patch_embedding     ViT-style patch convolutions (stride = kernel) as u8 ConvInteger
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from common import (
    MS_DOMAIN,
    OPSET,
    convert_to_fp16,
    finalize_model,
    format_histogram,
    load_model,
    op_histogram,
    ort_session,
    save_model,
    save_npy,
)

SEED = 20240611
BATCH = 2
IMG = 32
C1, C2 = 16, 32
TOKENS = (IMG // 2) * (IMG // 2)  # 256 after the stride-2 conv
DIM = C2  # token width; multiple of 32 so MatMulNBits block 32 applies
CLASSES = 4


@dataclass
class Fixture:
    name: str
    description: str
    atol: float
    hist: "dict[str, int]" = field(default_factory=dict)
    outputs: "list[str]" = field(default_factory=list)


# --------------------------------------------------------------------------
# Base float graph
# --------------------------------------------------------------------------

def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    # np.ascontiguousarray would turn a 0-d scalar into shape [1].
    return numpy_helper.from_array(np.array(arr, order="C", copy=True), name)


def _make_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edgevlm-models-gen",
        producer_version="1",
    )


def build_base_graph(w: "dict[str, np.ndarray]", extra_outputs: "list[str]" = ()) -> onnx.ModelProto:
    """Build the fp32 fixture graph from a weight dict.

    `extra_outputs` exposes intermediates; the generator uses that to
    rescale weights so activations stay in a useful range.
    """
    n = helper.make_node
    nodes = [
        n("Conv", ["input", "conv1.w", "conv1.b"], ["conv1"], name="conv1",
          kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        n("Relu", ["conv1"], ["relu1"], name="relu1"),
        n("Conv", ["relu1", "conv2.w", "conv2.b"], ["conv2"], name="conv2",
          kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        n("Relu", ["conv2"], ["relu2"], name="relu2"),
        # [B, C, H, W] -> [B, C, H*W] -> [B, H*W, C]: one token per position.
        n("Reshape", ["relu2", "tokens_shape"], ["flat"], name="flatten_spatial"),
        n("Transpose", ["flat"], ["tokens"], name="to_tokens", perm=[0, 2, 1]),
        n("MatMul", ["tokens", "attn.wq"], ["q"], name="attn_q"),
        n("MatMul", ["tokens", "attn.wk"], ["k"], name="attn_k"),
        n("MatMul", ["tokens", "attn.wv"], ["v"], name="attn_v"),
        n("Transpose", ["k"], ["kt"], name="attn_kt", perm=[0, 2, 1]),
        n("MatMul", ["q", "kt"], ["scores_raw"], name="attn_scores"),
        n("Mul", ["scores_raw", "attn.scale"], ["scores"], name="attn_scale"),
        n("Softmax", ["scores"], ["attn"], name="attn_softmax", axis=-1),
        n("MatMul", ["attn", "v"], ["ctx"], name="attn_ctx"),
        n("Add", ["tokens", "ctx"], ["resid"], name="residual"),
        n("ReduceMean", ["resid"], ["pooled"], name="pool", axes=[1], keepdims=0),
        n("MatMul", ["pooled", "head.w"], ["head_mm"], name="head_matmul"),
        n("Add", ["head_mm", "head.b"], ["logits"], name="head_bias"),
        n("Softmax", ["logits"], ["probs"], name="probs_softmax", axis=-1),
    ]
    inits = [
        _init("conv1.w", w["conv1.w"]), _init("conv1.b", w["conv1.b"]),
        _init("conv2.w", w["conv2.w"]), _init("conv2.b", w["conv2.b"]),
        _init("tokens_shape", np.array([0, C2, -1], dtype=np.int64)),
        _init("attn.wq", w["attn.wq"]), _init("attn.wk", w["attn.wk"]),
        _init("attn.wv", w["attn.wv"]),
        _init("attn.scale", np.array(1.0 / np.sqrt(DIM), dtype=np.float32)),
        _init("head.w", w["head.w"]), _init("head.b", w["head.b"]),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, IMG, IMG])]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES]),
        helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", CLASSES]),
    ]
    for name in extra_outputs:
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "edgevlm_fixture", inputs, outputs, inits)
    model = _make_model(graph)
    # Extra outputs carry no shape, which the strict checker refuses; they
    # only ever live in memory.
    return finalize_model(model, check=not extra_outputs)


def make_inputs(rng: np.random.Generator, n: int) -> np.ndarray:
    """Image-like random inputs: per-image colour offset, ramp and blobs plus noise.

    Pure iid noise would make every image look the same after the global
    mean pool (the average of 256 noisy tokens barely varies), and the head
    would need a huge gain to separate them, which makes any weight
    quantization error explode. Image-level structure avoids that.
    """
    yy, xx = np.meshgrid(np.linspace(-1, 1, IMG), np.linspace(-1, 1, IMG), indexing="ij")
    offset = rng.normal(0.0, 0.8, (n, 3, 1, 1))
    ramp = rng.normal(0.0, 0.8, (n, 3, 2, 1, 1))
    blobs = np.kron(rng.normal(0.0, 0.7, (n, 3, 4, 4)), np.ones((IMG // 4, IMG // 4)))
    noise = rng.normal(0.0, 0.5, (n, 3, IMG, IMG))
    x = offset + ramp[:, :, 0] * xx + ramp[:, :, 1] * yy + blobs + noise
    return x.astype(np.float32)


def make_weights(rng: np.random.Generator, calib: np.ndarray) -> "dict[str, np.ndarray]":
    """Random weights, then rescaled on calibration data so outputs are not degenerate."""
    f32 = np.float32

    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(f32)

    w = {
        "conv1.w": he((C1, 3, 3, 3), 3 * 9),
        "conv1.b": (rng.standard_normal(C1) * 0.05).astype(f32),
        "conv2.w": he((C2, C1, 3, 3), C1 * 9),
        "conv2.b": (rng.standard_normal(C2) * 0.05).astype(f32),
        "attn.wq": (rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(f32),
        "attn.wk": (rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(f32),
        "attn.wv": (rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(f32),
        "head.w": (rng.standard_normal((DIM, CLASSES)) / np.sqrt(DIM)).astype(f32),
        "head.b": np.zeros(CLASSES, dtype=f32),
    }

    # Attention: scale Q/K so the scaled scores have std ~1.5. Much larger
    # and every softmax row is one-hot; much smaller and attention is a
    # plain average, and neither exercises Softmax numerics.
    sess = ort_session(build_base_graph(w, ["tokens"]).SerializeToString())
    tokens = sess.run(["tokens"], {"input": calib})[0]
    scores = (tokens @ w["attn.wq"]) @ np.swapaxes(tokens @ w["attn.wk"], 1, 2) / np.sqrt(DIM)
    # Only the spread within a row matters to softmax.
    spread = float(np.std(scores - scores.mean(axis=-1, keepdims=True)))
    gain = np.sqrt(1.5 / spread)
    w["attn.wq"] = (w["attn.wq"] * gain).astype(f32)
    w["attn.wk"] = (w["attn.wk"] * gain).astype(f32)

    # Head: pooled features of a ReLU net are all positive and similar
    # between images, so a random head gives nearly identical logits for
    # every input. Centre the logits over the calibration set and give them
    # std ~2 so probs are confident but not one-hot.
    sess = ort_session(build_base_graph(w, ["pooled"]).SerializeToString())
    pooled = sess.run(["pooled"], {"input": calib})[0]
    centred = pooled - pooled.mean(axis=0, keepdims=True)
    logit_std = float(np.std(centred @ w["head.w"]))
    w["head.w"] = (w["head.w"] * (2.0 / logit_std)).astype(f32)
    w["head.b"] = (-(pooled.mean(axis=0) @ w["head.w"])
                   + rng.standard_normal(CLASSES) * 0.3).astype(f32)
    return w


PATCH_SEED = SEED + 1


def build_patch_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """A ViT's patch embedding twice: a 4x4 convolution with stride 4 (the input's 32x32
    splits into 8x8 whole patches; its tokens are an output) and a 5x5 one with stride 5
    (6x6 patches, the last 2 rows and columns dropped), pooled into a 4-class head."""
    f32 = np.float32
    n = helper.make_node
    nodes = [
        n("Conv", ["input", "p4.w", "p4.b"], ["p4"], name="patch4", kernel_shape=[4, 4], strides=[4, 4]),
        n("Reshape", ["p4", "tokens_shape"], ["p4_flat"], name="p4_flatten"),
        n("Transpose", ["p4_flat"], ["tokens"], name="p4_tokens", perm=[0, 2, 1]),
        n("Conv", ["input", "p5.w", "p5.b"], ["p5"], name="patch5", kernel_shape=[5, 5], strides=[5, 5]),
        n("ReduceMean", ["tokens"], ["pool4"], name="pool4", axes=[1], keepdims=0),
        n("ReduceMean", ["p5"], ["pool5"], name="pool5", axes=[2, 3], keepdims=0),
        n("Add", ["pool4", "pool5"], ["pooled"], name="pool_sum"),
        n("MatMul", ["pooled", "head.w"], ["logits"], name="head"),
    ]
    inits = [
        _init("p4.w", (rng.standard_normal((DIM, 3, 4, 4)) / np.sqrt(48)).astype(f32)),
        _init("p4.b", (rng.standard_normal(DIM) * 0.05).astype(f32)),
        _init("p5.w", (rng.standard_normal((DIM, 3, 5, 5)) / np.sqrt(75)).astype(f32)),
        _init("p5.b", (rng.standard_normal(DIM) * 0.05).astype(f32)),
        _init("tokens_shape", np.array([0, DIM, -1], dtype=np.int64)),
        _init("head.w", (rng.standard_normal((DIM, CLASSES)) * 4 / np.sqrt(DIM)).astype(f32)),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, IMG, IMG])]
    outputs = [
        helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", (IMG // 4) ** 2, DIM]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES]),
    ]
    graph = helper.make_graph(nodes, "edgevlm_patch_fixture", inputs, outputs, inits)
    return finalize_model(_make_model(graph))


# --------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------

class CalibReader(CalibrationDataReader):
    """Feeds seeded random batches to quantize_static (MinMax calibration)."""

    def __init__(self, batches: "list[np.ndarray]"):
        self._batches = batches
        self._it = iter(batches)

    def get_next(self):
        batch = next(self._it, None)
        return None if batch is None else {"input": batch}

    def rewind(self):
        self._it = iter(self._batches)


def _requantize_cleanup(path: Path) -> onnx.ModelProto:
    """Reload a quantizer output, pin versions and re-save it in place."""
    model = load_model(path)
    # Quantizers prepend their producer; the Rust side does not care, but
    # make the provenance obvious.
    model.producer_name = "edgevlm-models-gen (onnxruntime.quantization)"
    model.producer_version = "1"
    finalize_model(model)
    save_model(model, path)
    return model


def quantize_dynamic_variant(src: Path, dst: Path, per_channel: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # QUInt8 weights: ORT's CPU ConvInteger kernel only implements u8 x u8,
    # and u8 activations x u8 weights is also what tract's ConvInteger path
    # expects from most real-world dynamic-quant exports.
    quantize_dynamic(
        src, dst,
        op_types_to_quantize=["Conv", "MatMul"],
        per_channel=per_channel,
        weight_type=QuantType.QUInt8,
    )
    return _requantize_cleanup(dst)


def quantize_qdq_variant(src: Path, dst: Path, ops: "list[str]", calib: "list[np.ndarray]") -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        src, dst,
        CalibReader(calib),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=ops,
        per_channel=False,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return _requantize_cleanup(dst)


def fp16_variant(src: Path, dst: Path) -> onnx.ModelProto:
    model = convert_to_fp16(load_model(src), keep_io_types=False)
    finalize_model(model)
    save_model(model, dst)
    return model


def quantize_q4_variant(src: Path, dst: Path) -> onnx.ModelProto:
    # The module was renamed across onnxruntime releases.
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError:  # onnxruntime < 1.20
        from onnxruntime.quantization.matmul_4bits_quantizer import MatMul4BitsQuantizer as MatMulNBitsQuantizer

    quant = MatMulNBitsQuantizer(load_model(src), block_size=32, is_symmetric=True)
    quant.process()
    model = quant.model.model
    save_model(model, dst)
    return _requantize_cleanup(dst)


def wrong_output_shape_variant(src: Path, dst: Path) -> onnx.ModelProto:
    """fp32 graph whose declared shapes lie, like some exporters produce."""
    model = load_model(src)
    for out in model.graph.output:
        if out.name == "logits":
            dims = out.type.tensor_type.shape.dim
            dims[0].Clear()
            dims[0].dim_value = 1  # a fixed 1 while the input batch stays symbolic
    # Contradicting annotation on an intermediate: `pooled` is really
    # [batch, 32]; claim [1, 16].
    model.graph.value_info.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 16]))
    # The onnx checker's strict shape inference rejects exactly these lies,
    # so only the structural check applies.
    finalize_model(model, strict=False)
    save_model(model, dst)
    return model


# --------------------------------------------------------------------------
# Graph assertions
# --------------------------------------------------------------------------

def assert_has_dq_softmax_q(model: onnx.ModelProto) -> int:
    """Return how many Softmax nodes are fed by DequantizeLinear and feed QuantizeLinear."""
    producer = {o: node for node in model.graph.node for o in node.output}
    consumers: "dict[str, list]" = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    found = 0
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        src = producer.get(node.input[0])
        dsts = consumers.get(node.output[0], [])
        if src is not None and src.op_type == "DequantizeLinear" and any(d.op_type == "QuantizeLinear" for d in dsts):
            found += 1
    assert found > 0, "qdq_softmax: no DequantizeLinear -> Softmax -> QuantizeLinear pattern in saved graph"
    return found


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

def generate(out: Path, jpeg_bytes: bytes) -> "list[Fixture]":
    fx_dir = out / "fixtures"
    rng = np.random.default_rng(SEED)
    # Draw data first so adding weights later does not change the inputs.
    ref_input = make_inputs(rng, BATCH)
    weight_calib = make_inputs(rng, 32)
    quant_calib = [make_inputs(rng, 4) for _ in range(8)]
    weights = make_weights(rng, weight_calib)

    fixtures: "list[Fixture]" = []
    with tempfile.TemporaryDirectory(prefix="edgevlm-gen-") as tmp:
        base_path = Path(tmp) / "base.onnx"
        save_model(build_base_graph(weights), base_path)

        def emit(name, description, atol, build, input_dtype=np.float32):
            d = fx_dir / name
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            model = build(d / "model.onnx")
            sess = ort_session(d / "model.onnx")
            names = [o.name for o in sess.get_outputs()]
            x = ref_input.astype(input_dtype)
            results = sess.run(names, {"input": x})
            save_npy(d / "input.npy", x)
            for o, r in zip(names, results):
                assert np.all(np.isfinite(r)), f"{name}: non-finite output {o}"
                save_npy(d / f"expected_{o}.npy", r)
            fx = Fixture(name, description, atol, op_histogram(model), names)
            fixtures.append(fx)
            return fx

        def fp32(p):
            save_model(load_model(base_path), p)
            return load_model(p)

        emit("fp32", "float32 reference graph: conv stem + single-head self-attention + 4-class head",
             1e-4, fp32)
        emit("int8_dynamic",
             "dynamic int8 per-tensor (u8 weights): DynamicQuantizeLinear + MatMulInteger/ConvInteger",
             1e-3, lambda p: quantize_dynamic_variant(base_path, p, per_channel=False))
        emit("int8_dynamic_per_channel",
             "dynamic int8 per-channel (u8 weights): DynamicQuantizeLinear + MatMulInteger with per-column "
             "weight scales/zero points; ConvInteger stays per-tensor (onnxruntime's dynamic quantizer "
             "ignores per_channel for Conv)",
             1e-3, lambda p: quantize_dynamic_variant(base_path, p, per_channel=True))
        emit("qdq_conv_matmul",
             "static QDQ (s8 activations, s8 weights, MinMax calibration) around Conv and MatMul",
             1e-3, lambda p: quantize_qdq_variant(base_path, p, ["Conv", "MatMul"], quant_calib))
        sm = emit("qdq_softmax",
                  "static QDQ around Conv, MatMul and Softmax: DequantizeLinear -> Softmax -> QuantizeLinear",
                  # ORT_ENABLE_ALL fuses DQ->Softmax->Q into QLinearSoftmax with its own u8
                  # table; float Softmax (ORT_DISABLE_ALL, and edgevlm) differs by up to 2 steps
                  # of the logits scale (0.034): allow 3.
                  0.11, lambda p: quantize_qdq_variant(base_path, p, ["Conv", "MatMul", "Softmax"], quant_calib))
        n_sm = assert_has_dq_softmax_q(load_model(fx_dir / "qdq_softmax" / "model.onnx"))
        sm.description += f" ({n_sm} wrapped Softmax nodes)"
        q4 = emit("q4", "4-bit weight-only com.microsoft.MatMulNBits (block_size 32, symmetric)",
                  1e-2, lambda p: quantize_q4_variant(base_path, p))
        assert q4.hist.get(f"{MS_DOMAIN}.MatMulNBits", 0) > 0, "q4: no MatMulNBits in saved graph"
        # Tolerance: ORT rounds to float16 after every op, edgevlm computes in float32 by
        # default (tract's own float16 path also has to pass); logits reach 4.3, where one
        # float16 step is 0.0039.
        emit("fp16", "float16 export (weights, arithmetic, inputs and outputs in float16)",
             5e-3, lambda p: fp16_variant(base_path, p), input_dtype=np.float16)
        emit("wrong_output_shape",
             "fp32 graph declaring logits as [1, 4] (input batch symbolic, reference batch 2) "
             "and a contradicting value_info for `pooled` ([1, 16] instead of [batch, 32])",
             1e-4, lambda p: wrong_output_shape_variant(base_path, p))

        patch_path = Path(tmp) / "patch.onnx"
        save_model(build_patch_graph(np.random.default_rng(PATCH_SEED)), patch_path)
        patches = emit("uint8_patch_embedding",
                       "dynamic int8 (u8 weights) ViT-style patch embeddings: ConvInteger with stride "
                       "equal to its kernel (4x4 over whole patches, 5x5 dropping the last rows and "
                       "columns)",
                       1e-3, lambda p: quantize_dynamic_variant(patch_path, p, per_channel=False))
        assert patches.hist.get("ConvInteger", 0) == 2, patches.hist

        # The dynamic-quant variants must really use integer ops.
        for name in ("int8_dynamic", "int8_dynamic_per_channel"):
            h = next(f.hist for f in fixtures if f.name == name)
            assert h.get("DynamicQuantizeLinear", 0) > 0 and h.get("MatMulInteger", 0) > 0, (name, h)
        for name in ("qdq_conv_matmul", "qdq_softmax"):
            h = next(f.hist for f in fixtures if f.name == name)
            assert h.get("QuantizeLinear", 0) > 0 and h.get("DequantizeLinear", 0) > 0, (name, h)

        # The fp32 references must be sane: probabilities not all one-hot.
        probs = np.load(fx_dir / "fp32" / "expected_probs.npy")
        assert probs.max() < 0.99 and not np.allclose(probs[0], probs[1], atol=1e-2), probs

        write_bad_inputs(fx_dir / "bad", fx_dir / "fp32" / "model.onnx", jpeg_bytes)

    write_toml(fx_dir, fixtures)
    write_readme(fx_dir, fixtures)
    return fixtures


def write_bad_inputs(bad: Path, fp32_model: Path, jpeg_bytes: bytes) -> None:
    """Malformed files for the runtime's error-path tests."""
    bad.mkdir(parents=True, exist_ok=True)
    data = fp32_model.read_bytes()
    (bad / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (bad / "not_onnx.onnx").write_bytes(
        b"This is a plain text file, not an ONNX protobuf.\n"
        b"edgevlm must reject it with a clear error instead of panicking.\n")
    (bad / "not_an_image.png").write_bytes(
        b"definitely not a PNG: text bytes used to test image decode errors\n")
    assert jpeg_bytes[:2] == b"\xff\xd8"
    (bad / "truncated.jpg").write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2])


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(fx_dir: Path, fixtures: "list[Fixture]") -> None:
    lines = [
        "# Generated by models/gen/generate.py -- do not edit by hand.",
        "# atol: absolute tolerance for outputs vs the onnxruntime reference.",
        "",
    ]
    for fx in fixtures:
        lines += [
            "[[fixture]]",
            f"name = {_toml_str(fx.name)}",
            f"model = {_toml_str(fx.name + '/model.onnx')}",
            f"description = {_toml_str(fx.description)}",
            f"atol = {fx.atol!r}",
            "[fixture.inputs]",
            f"input = {_toml_str(fx.name + '/input.npy')}",
            "[fixture.outputs]",
        ]
        lines += [f"{o} = {_toml_str(f'{fx.name}/expected_{o}.npy')}" for o in fx.outputs]
        lines.append("")
    (fx_dir / "fixtures.toml").write_text("\n".join(lines))


def write_readme(fx_dir: Path, fixtures: "list[Fixture]") -> None:
    parts = [
        "# Test fixtures",
        "",
        "Generated by `python3 models/gen/generate.py` (run from the repository root;",
        "pinned tool versions in `models/gen/requirements.txt`). Do not edit by hand:",
        "change the generator and rerun it. The output is deterministic (fixed seeds,",
        "single-threaded BLAS and onnxruntime), so rerunning reproduces the same bytes.",
        "",
        "Every variant but `uint8_patch_embedding` is derived from one seeded float graph:",
        "",
        "```",
        "input [batch,3,32,32]",
        "  Conv(3->16, 3x3, pad 1) + Relu",
        "  Conv(16->32, 3x3, stride 2, pad 1) + Relu      -> [batch,32,16,16]",
        "  Reshape [batch,32,256] + Transpose              -> tokens [batch,256,32]",
        "  q,k,v = tokens @ Wq|Wk|Wv (32x32)",
        "  attn = Softmax(q @ k^T * 1/sqrt(32), axis=-1)   -> [batch,256,256]",
        "  resid = tokens + attn @ v",
        "  pooled = ReduceMean(resid, axes=[1])            -> [batch,32]",
        "  logits = pooled @ W (32x4) + b                  -> [batch,4]",
        "  probs = Softmax(logits, axis=-1)                -> [batch,4]",
        "```",
        "",
        "Each `<variant>/` directory holds `model.onnx`, `input.npy` (float32,",
        "batch 2, seeded) and `expected_<output>.npy`: the onnxruntime CPU outputs",
        "(intra_op_num_threads=1, ORT_ENABLE_ALL) for that input. `fixtures.toml`",
        "indexes them with a starting tolerance. All models use IR version 9 and",
        "default-domain opset 17.",
        "",
        "## Variants",
        "",
    ]
    for fx in fixtures:
        parts += [
            f"### `{fx.name}`",
            "",
            fx.description + ".",
            "",
            f"atol {fx.atol}. Ops: {format_histogram(fx.hist)}",
            "",
        ]
    parts += [
        "## Notes",
        "",
        "* Dynamic quantization uses u8 weights because onnxruntime's CPU",
        "  `ConvInteger` kernel only implements u8 x u8 (s8 weights fail to load",
        "  with NOT_IMPLEMENTED).",
        "* Dynamic quantization leaves the two activation x activation MatMuls of",
        "  the attention (q @ k^T and attn @ v) in float: onnxruntime only",
        "  quantizes MatMuls with a constant weight in that mode.",
        "* `int8_dynamic_per_channel`: only the MatMulInteger weights get",
        "  per-column (`[N]`) scales and zero points; onnxruntime's dynamic",
        "  `ConvInteger` path ignores `per_channel`, so the convolutions are the",
        "  same as in `int8_dynamic`.",
        "* `wrong_output_shape` declares `logits` as `[1, 4]` although the reference",
        "  input has batch 2, and adds a `value_info` claiming `pooled` is `[1, 16]`",
        "  (really `[batch, 32]`). onnxruntime only warns about both; a runtime should",
        "  trust the computed shapes, not the declared ones.",
        "* `uint8_patch_embedding` is a graph of its own (`build_patch_graph`): two",
        "  ViT-style patch convolutions of the same input (4x4 stride 4 -> `tokens`",
        "  `[batch,64,32]`; 5x5 stride 5, whose last 2 rows and columns no patch",
        "  covers), mean-pooled into a 4-class head, quantized like `int8_dynamic`.",
        "* `q4` uses the contrib op `com.microsoft.MatMulNBits`: packed 4-bit",
        "  weights (`B` uint8 `[N, K/32, 16]`), per-block `scales`, block size 32,",
        "  symmetric (no zero points input).",
        "",
        "## `bad/`",
        "",
        "Inputs for error-path tests:",
        "",
        "* `truncated.onnx`: the fp32 model cut to half its bytes.",
        "* `not_onnx.onnx`: a text file.",
        "* `not_an_image.png`: text bytes with a .png name.",
        "* `truncated.jpg`: a real 96x96 JPEG of a synthetic part, cut in half.",
        "",
    ]
    (fx_dir / "README.md").write_text("\n".join(parts))
