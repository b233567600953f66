#!/usr/bin/env python3
"""Tiny random-weight VLM/LLM snapshots with the interfaces of the real public exports.

    python3 models/gen/vlm_models.py [--out models/fixtures/vlm]

Writes (see the README.md it also writes for the full story):

    <out>/smolvlm/     a HuggingFace-layout snapshot shaped like
                       HuggingFaceTB/SmolVLM2-256M-Video-Instruct (config.json,
                       preprocessor/processor/tokenizer/chat-template files) with
                       onnx/{vision_encoder,embed_tokens,decoder_model_merged}
                       {,_int8,_uint8,_q4}.onnx as transformers.js exports them
    <out>/mistral/     an optimum/transformers.js-layout MistralForCausalLM
                       snapshot with onnx/model{,_int8,_uint8,_q4}.onnx
    <out>/images/      committed test images (PNG and JPEG)
    <out>/references/  what the real Python libraries say about all of the above:
                       transformers' processor/tokenizer outputs and greedy
                       decoding with onnxruntime on the very same graphs

Why random weights: the Rust runtime has to load the *real* exports (their
input/output names, dtypes, symbolic dims, quantized operator families and
config/tokenizer file formats), but committing a 256M model is not an option
and nothing may be downloaded. Every interface detail below mirrors the public
exports; only the numbers inside the weights are made up.

Deterministic: fixed seeds, single-threaded BLAS/onnxruntime/tokenizers, and
every file written with stable key order, so rerunning reproduces the bytes.
"""

from __future__ import annotations

import os

# Before numpy/tokenizers are imported: thread pools may split reductions (and
# the BPE trainer's pair counts) differently from run to run.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS",
             "RAYON_RS_NUM_CPUS"):
    os.environ[_var] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# transformers: no hub access, no torch/tf/flax probing noise.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MS_DOMAIN,
    OPSET,
    convert_to_fp16,
    finalize_model,
    load_model,
    op_histogram,
    ort_session,
    save_model,
    save_npy,
    sha256_file,
)

SEED_SMOLVLM = 20250301
SEED_MISTRAL = 20250302
SEED_IMAGES = 20250303
SEED_CORPUS = 20250304

MAX_NEW_TOKENS = 16
F32 = np.float32
# transformers fills masked attention logits with torch.finfo(float32).min.
FMIN = float(np.finfo(np.float32).min)


# --------------------------------------------------------------------------
# Dimensions
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class TextDims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float
    rms_eps: float = 1e-5
    max_position_embeddings: int = 8192


@dataclass(frozen=True)
class VisionDims:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    image_size: int
    patch_size: int
    layer_norm_eps: float = 1e-6


@dataclass(frozen=True)
class VlmDims:
    text: TextDims
    vision: VisionDims
    scale_factor: int
    # Preprocessor: longest edge after the first resize, and the tile size.
    size_longest_edge: int
    max_image_size: int

    @property
    def patches_per_side(self) -> int:
        return self.vision.image_size // self.vision.patch_size

    @property
    def image_seq_len(self) -> int:
        # transformers' formula (SmolVLMProcessor docstring).
        return int(self.patches_per_side ** 2 / self.scale_factor ** 2)


def tiny_smolvlm_dims(vocab: int) -> VlmDims:
    """Fixture dims: every MatMul K is a multiple of 32 so MatMulNBits block 32 applies."""
    return VlmDims(
        text=TextDims(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                      vocab=vocab, rope_theta=100000.0),
        vision=VisionDims(hidden=64, layers=2, heads=4, intermediate=128, image_size=32, patch_size=8),
        scale_factor=2,
        size_longest_edge=96,
        max_image_size=32,
    )


def real_smolvlm2_256m_dims() -> VlmDims:
    """HuggingFaceTB/SmolVLM2-256M-Video-Instruct (config.json + SmolVLMVisionConfig defaults)."""
    return VlmDims(
        text=TextDims(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536,
                      vocab=49280, rope_theta=100000.0),
        vision=VisionDims(hidden=768, layers=12, heads=12, intermediate=3072, image_size=512, patch_size=16),
        scale_factor=4,
        size_longest_edge=2048,
        max_image_size=512,
    )


def probe_dims() -> VlmDims:
    """The probe size of issue #7's table: a 4-layer ViT (hidden 768, ~28M params) and a
    4-layer LLaMA-style decoder (hidden 768, 12 query / 4 KV heads, ~31M params with its
    8192-entry lm_head). Small enough that every variant of all three graphs generates and
    runs in seconds, big enough that matrix kernels, not overheads, dominate."""
    return VlmDims(
        text=TextDims(hidden=768, layers=4, heads=12, kv_heads=4, head_dim=64, intermediate=2048,
                      vocab=8192, rope_theta=100000.0),
        vision=VisionDims(hidden=768, layers=4, heads=12, intermediate=3072, image_size=512, patch_size=16),
        scale_factor=4,
        size_longest_edge=2048,
        max_image_size=512,
    )


def tiny_mistral_dims(vocab: int) -> TextDims:
    return TextDims(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                    vocab=vocab, rope_theta=1000000.0, max_position_embeddings=32768)


# --------------------------------------------------------------------------
# Graph building
# --------------------------------------------------------------------------

class GraphBuilder:
    """Collects nodes and initializers; names follow torch.onnx's /scope/Op style."""

    def __init__(self) -> None:
        self.nodes: "list[onnx.NodeProto]" = []
        self.inits: "list[onnx.TensorProto]" = []
        self._names: "set[str]" = set()
        self._consts: "dict[tuple, str]" = {}

    def _unique(self, name: str) -> str:
        base, k = name, 1
        while name in self._names:
            name = f"{base}_{k}"
            k += 1
        self._names.add(name)
        return name

    def init(self, name: str, arr: np.ndarray) -> str:
        name = self._unique(name)
        self.inits.append(numpy_helper.from_array(np.array(arr, order="C", copy=True), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        """Shared constant initializer (shape tuples, scalars)."""
        arr = np.array(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"/Constant_{len(self._consts)}_output_0", arr)
        return self._consts[key]

    def op(self, op_type: str, inputs, name: str, n_out: int = 1, domain: str = "", **attrs):
        name = self._unique(name)
        outs = [f"{name}_output_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None,
                                           **attrs))
        return outs[0] if n_out == 1 else outs

    # -- small composites ---------------------------------------------------

    def linear(self, x: str, w: np.ndarray, b, scope: str, wname: str) -> str:
        """torch Linear on a >2-D input exports as MatMul(+Add); the weight is stored [in, out]."""
        y = self.op("MatMul", [x, self.init(f"{wname}.weight", w)], f"{scope}/MatMul")
        if b is not None:
            y = self.op("Add", [self.init(f"{wname}.bias", b), y], f"{scope}/Add")
        return y

    def rms_norm(self, x: str, w: np.ndarray, eps: float, scope: str, wname: str) -> str:
        """LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) * weight (as torch.onnx writes it)."""
        sq = self.op("Pow", [x, self.const(2.0, F32)], f"{scope}/Pow")
        var = self.op("ReduceMean", [sq], f"{scope}/ReduceMean", axes=[-1], keepdims=1)
        var = self.op("Add", [var, self.const(eps, F32)], f"{scope}/Add")
        inv = self.op("Reciprocal", [self.op("Sqrt", [var], f"{scope}/Sqrt")], f"{scope}/Reciprocal")
        y = self.op("Mul", [x, inv], f"{scope}/Mul")
        return self.op("Mul", [self.init(f"{wname}.weight", w), y], f"{scope}/Mul_1")

    def layer_norm(self, x: str, w: np.ndarray, b: np.ndarray, eps: float, scope: str, wname: str) -> str:
        return self.op("LayerNormalization",
                       [x, self.init(f"{wname}.weight", w), self.init(f"{wname}.bias", b)],
                       f"{scope}/LayerNormalization", axis=-1, epsilon=eps)

    def dim(self, shape: str, i: int, scope: str) -> str:
        """1-D [1] int64 slice of a Shape output."""
        return self.op("Slice", [shape, self.const([i]), self.const([i + 1])], f"{scope}/Slice")

    def scalar(self, t: str, scope: str) -> str:
        return self.op("Squeeze", [t, self.const([0])], f"{scope}/Squeeze")

    def model(self, graph_name: str, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, self.inits)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(n.domain == MS_DOMAIN for n in self.nodes):
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        m = helper.make_model(graph, opset_imports=opsets, producer_name="edgevlm-models-gen",
                              producer_version="1")
        return finalize_model(m)


def _vi(name: str, elem: int, dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------

def make_text_weights(rng: np.random.Generator, d: TextDims) -> "dict[str, np.ndarray]":
    """Random LLaMA/Mistral weights, scaled so activations stay O(1) and logits are peaked.

    Linear weights are stored [in, out] (what a MatMul needs). The LM head gets a
    larger gain than a trained model would need so the greedy argmax is decided by
    a clear margin (robust to kernel rounding) and moves with the hidden state
    instead of collapsing onto one token.
    """
    H, I = d.hidden, d.intermediate
    q_out, kv_out = d.heads * d.head_dim, d.kv_heads * d.head_dim

    def lin(n_in, n_out, gain=1.0):
        return (rng.standard_normal((n_in, n_out)) * gain / np.sqrt(n_in)).astype(F32)

    def norm_w(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(F32)

    w = {"model.embed_tokens": rng.standard_normal((d.vocab, H)).astype(F32)}
    for i in range(d.layers):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm"] = norm_w(H)
        w[f"{p}.self_attn.q_proj"] = lin(H, q_out)
        w[f"{p}.self_attn.k_proj"] = lin(H, kv_out)
        w[f"{p}.self_attn.v_proj"] = lin(H, kv_out)
        w[f"{p}.self_attn.o_proj"] = lin(q_out, H, 0.7)
        w[f"{p}.post_attention_layernorm"] = norm_w(H)
        w[f"{p}.mlp.gate_proj"] = lin(H, I)
        w[f"{p}.mlp.up_proj"] = lin(H, I)
        w[f"{p}.mlp.down_proj"] = lin(I, H, 0.7)
    w["model.norm"] = norm_w(H)
    w["lm_head"] = lin(H, d.vocab, 12.0)
    return w


def make_vision_weights(rng: np.random.Generator, v: VisionDims, text_hidden: int,
                        scale_factor: int) -> "dict[str, np.ndarray]":
    """SigLIP-style encoder + Idefics3 connector weights (Linear weights stored [in, out])."""
    D, I, p = v.hidden, v.intermediate, v.patch_size
    n_pos = (v.image_size // p) ** 2

    def lin(n_in, n_out, gain=1.0):
        return (rng.standard_normal((n_in, n_out)) * gain / np.sqrt(n_in)).astype(F32)

    def vec(n, std):
        return (std * rng.standard_normal(n)).astype(F32)

    pre = "model.vision_model"
    w = {
        f"{pre}.embeddings.patch_embedding.weight":
            (rng.standard_normal((D, 3, p, p)) * 2.0 / np.sqrt(3 * p * p)).astype(F32),
        f"{pre}.embeddings.patch_embedding.bias": vec(D, 0.1),
        f"{pre}.embeddings.position_embedding.weight": vec(n_pos * D, 0.5).reshape(n_pos, D),
    }
    for i in range(v.layers):
        q = f"{pre}.encoder.layers.{i}"
        w[f"{q}.layer_norm1.weight"] = 1.0 + vec(D, 0.1)
        w[f"{q}.layer_norm1.bias"] = vec(D, 0.05)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w[f"{q}.self_attn.{proj}.weight"] = lin(D, D, 0.8 if proj == "out_proj" else 1.0)
            w[f"{q}.self_attn.{proj}.bias"] = vec(D, 0.05)
        w[f"{q}.layer_norm2.weight"] = 1.0 + vec(D, 0.1)
        w[f"{q}.layer_norm2.bias"] = vec(D, 0.05)
        w[f"{q}.mlp.fc1.weight"] = lin(D, I)
        w[f"{q}.mlp.fc1.bias"] = vec(I, 0.05)
        w[f"{q}.mlp.fc2.weight"] = lin(I, D, 0.8)
        w[f"{q}.mlp.fc2.bias"] = vec(D, 0.05)
    w[f"{pre}.post_layernorm.weight"] = 1.0 + vec(D, 0.1)
    w[f"{pre}.post_layernorm.bias"] = vec(D, 0.05)
    # Projected image features should look like token embeddings (std ~1).
    w["model.connector.modality_projection.proj.weight"] = lin(D * scale_factor ** 2, text_hidden)
    return {k: np.asarray(a, dtype=F32) for k, a in w.items()}


# --------------------------------------------------------------------------
# Graphs
# --------------------------------------------------------------------------

def _position_bucket_boundaries(n: int) -> np.ndarray:
    """torch.arange(1/n, 1.0, 1/n) as float32, computed the way torch's CPU kernel does.

    Length ceil((end-start)/step) in double, values start + i*step in double, then
    rounded to float32: the same numbers SmolVLMVisionEmbeddings bucketizes against.
    """
    start, step = 1.0 / n, 1.0 / n
    size = math.ceil((1.0 - start) / step)
    return np.array([start + i * step for i in range(size)], dtype=np.float64).astype(F32)


def build_vision_encoder(dims: VlmDims, w: "dict[str, np.ndarray]") -> onnx.ModelProto:
    """SmolVLM vision_encoder: pixel_values + pixel_attention_mask -> image_features.

    Mirrors SmolVLMModel.get_image_features + the vision transformer + connector:

    1. flatten [batch, num_images] and drop padding images (all pixels exactly 0;
       if none is real, keep the first), like the model's real_images_inds;
    2. patch mask = any valid pixel in the patch (unfold+sum>0 == MaxPool>0);
    3. patch Conv + position embeddings whose ids are bucketized fractional
       coordinates of the valid patch rectangle (SmolVLMVisionEmbeddings,
       vectorised; masked patches get id 0);
    4. pre-LN encoder layers with the patch mask as an additive key bias
       (0 / finfo.min, _prepare_4d_attention_mask), tanh-GELU MLP, post-LN;
    5. connector: pixel shuffle by scale_factor, then a bias-free Linear.
    """
    v, t = dims.vision, dims.text
    D, p, s = v.hidden, v.patch_size, dims.scale_factor
    nh, hd = v.heads, v.hidden // v.heads
    n_side = dims.patches_per_side
    g = GraphBuilder()
    pre = "model.vision_model"

    shape = g.op("Shape", ["pixel_values"], "/Shape")
    hw = g.op("Slice", [shape, g.const([3]), g.const([5])], "/Slice")
    pv = g.op("Reshape", ["pixel_values", g.op("Concat", [g.const([-1, 3]), hw], "/Concat", axis=0)],
              "/Reshape")  # [BN, 3, H, W]
    pm = g.op("Reshape", ["pixel_attention_mask", g.op("Concat", [g.const([-1]), hw], "/Concat_1", axis=0)],
              "/Reshape_1")  # [BN, H, W] bool

    # 1. real images: not every value exactly 0 (max |x| > 0 is the same test).
    absmax = g.op("ReduceMax", [g.op("Abs", [pv], "/Abs")], "/ReduceMax", axes=[1, 2, 3], keepdims=0)
    real = g.op("Greater", [absmax, g.const(0.0, F32)], "/Greater")
    any_real = g.op("ReduceMax", [g.op("Cast", [real], "/Cast", to=TensorProto.FLOAT)], "/ReduceMax_1",
                    keepdims=0)
    bn = g.scalar(g.dim(g.op("Shape", [pv], "/Shape_1"), 0, "/bn"), "/bn")
    first = g.op("Equal", [g.op("Range", [g.const(0), bn, g.const(1)], "/Range"), g.const(0)], "/Equal")
    none = g.op("Equal", [any_real, g.const(0.0, F32)], "/Equal_1")
    real = g.op("Or", [real, g.op("And", [first, none], "/And")], "/Or")
    keep = g.op("Squeeze", [g.op("NonZero", [real], "/NonZero"), g.const([0])], "/Squeeze")
    pv = g.op("Gather", [pv, keep], "/Gather", axis=0)  # [K, 3, H, W]
    pm = g.op("Gather", [pm, keep], "/Gather_1", axis=0)  # [K, H, W]

    # 2. patch attention mask [K, Hp, Wp] (float 0/1 and bool).
    pmf = g.op("Unsqueeze", [g.op("Cast", [pm], "/Cast_1", to=TensorProto.FLOAT), g.const([1])], "/Unsqueeze")
    pmax = g.op("MaxPool", [pmf], "/MaxPool", kernel_shape=[p, p], strides=[p, p])
    patch_f = g.op("Squeeze", [pmax, g.const([1])], "/Squeeze_1")
    patch_b = g.op("Greater", [patch_f, g.const(0.0, F32)], "/Greater_1")

    # 3. embeddings.
    sc = f"/{pre}/embeddings"
    conv = g.op("Conv", [pv, g.init(f"{pre}.embeddings.patch_embedding.weight",
                                    w[f"{pre}.embeddings.patch_embedding.weight"]),
                         g.init(f"{pre}.embeddings.patch_embedding.bias",
                                w[f"{pre}.embeddings.patch_embedding.bias"])],
                f"{sc}/patch_embedding/Conv", kernel_shape=[p, p], strides=[p, p])  # [K, D, Hp, Wp]
    cshape = g.op("Shape", [conv], f"{sc}/Shape")
    hp, wp = g.dim(cshape, 2, f"{sc}/hp"), g.dim(cshape, 3, f"{sc}/wp")
    x = g.op("Transpose", [g.op("Reshape", [conv, g.const([0, D, -1])], f"{sc}/Reshape")], f"{sc}/Transpose",
             perm=[0, 2, 1])  # [K, L, D]

    bounds = g.const(_position_bucket_boundaries(n_side).reshape(1, 1, -1), F32)

    def buckets(axis_len: str, count_axis: int, tag: str) -> str:
        # nb = number of valid patches along this axis (row 0 / column 0 of the mask).
        first_line = g.op("Slice", [patch_f, g.const([0]), g.const([1]), g.const([3 - count_axis])],
                          f"{sc}/{tag}/Slice")
        nb = g.op("ReduceSum", [first_line, g.const([1, 2])], f"{sc}/{tag}/ReduceSum", keepdims=0)  # [K]
        step = g.op("Unsqueeze", [g.op("Div", [g.const(1.0, F32), nb], f"{sc}/{tag}/Div"), g.const([1])],
                    f"{sc}/{tag}/Unsqueeze")  # [K, 1]
        idx = g.op("Cast", [g.op("Range", [g.const(0), g.scalar(axis_len, f"{sc}/{tag}"), g.const(1)],
                                 f"{sc}/{tag}/Range")], f"{sc}/{tag}/Cast", to=TensorProto.FLOAT)
        frac = g.op("Mul", [g.op("Unsqueeze", [idx, g.const([0])], f"{sc}/{tag}/Unsqueeze_1"), step],
                    f"{sc}/{tag}/Mul")  # [K, n]
        le = g.op("LessOrEqual", [bounds, g.op("Unsqueeze", [frac, g.const([2])], f"{sc}/{tag}/Unsqueeze_2")],
                  f"{sc}/{tag}/LessOrEqual")  # bucketize(right=True) == count of boundaries <= x
        return g.op("ReduceSum", [g.op("Cast", [le], f"{sc}/{tag}/Cast_1", to=TensorProto.INT64), g.const([2])],
                    f"{sc}/{tag}/ReduceSum_1", keepdims=0)  # [K, n]

    bh = buckets(hp, 1, "rows")  # rows: count along Hp using column 0
    bw = buckets(wp, 2, "cols")
    pos = g.op("Add", [g.op("Mul", [g.op("Unsqueeze", [bh, g.const([2])], f"{sc}/Unsqueeze"),
                                    g.const(n_side)], f"{sc}/Mul"),
                       g.op("Unsqueeze", [bw, g.const([1])], f"{sc}/Unsqueeze_1")], f"{sc}/Add")
    pos = g.op("Where", [patch_b, pos, g.const(0)], f"{sc}/Where")
    pos = g.op("Reshape", [pos, g.const([0, -1])], f"{sc}/Reshape_1")  # [K, L]
    pe = g.op("Gather", [g.init(f"{pre}.embeddings.position_embedding.weight",
                                w[f"{pre}.embeddings.position_embedding.weight"]), pos],
              f"{sc}/position_embedding/Gather", axis=0)
    x = g.op("Add", [x, pe], f"{sc}/Add_1")

    # 4. encoder; key-padding bias [K, 1, 1, L].
    kmask = g.op("Reshape", [patch_f, g.const([0, 1, 1, -1])], "/Reshape_2")
    bias = g.op("Mul", [g.op("Sub", [g.const(1.0, F32), kmask], "/Sub"), g.const(FMIN, F32)], "/Mul")
    scale = g.const(hd ** -0.5, F32)
    for i in range(v.layers):
        q = f"{pre}.encoder.layers.{i}"
        sc = f"/{q}"
        h = g.layer_norm(x, w[f"{q}.layer_norm1.weight"], w[f"{q}.layer_norm1.bias"], v.layer_norm_eps,
                         f"{sc}/layer_norm1", f"{q}.layer_norm1")

        def heads(name, perm):
            y = g.linear(h, w[f"{q}.self_attn.{name}.weight"], w[f"{q}.self_attn.{name}.bias"],
                         f"{sc}/self_attn/{name}", f"{q}.self_attn.{name}")
            y = g.op("Reshape", [y, g.const([0, 0, nh, hd])], f"{sc}/self_attn/{name}/Reshape")
            return g.op("Transpose", [y], f"{sc}/self_attn/{name}/Transpose", perm=perm)

        qh, kt, vh = heads("q_proj", [0, 2, 1, 3]), heads("k_proj", [0, 2, 3, 1]), heads("v_proj", [0, 2, 1, 3])
        att = g.op("Mul", [g.op("MatMul", [qh, kt], f"{sc}/self_attn/MatMul"), scale], f"{sc}/self_attn/Mul")
        att = g.op("Softmax", [g.op("Add", [att, bias], f"{sc}/self_attn/Add")], f"{sc}/self_attn/Softmax",
                   axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [att, vh], f"{sc}/self_attn/MatMul_1")],
                   f"{sc}/self_attn/Transpose", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.const([0, 0, D])], f"{sc}/self_attn/Reshape")
        o = g.linear(ctx, w[f"{q}.self_attn.out_proj.weight"], w[f"{q}.self_attn.out_proj.bias"],
                     f"{sc}/self_attn/out_proj", f"{q}.self_attn.out_proj")
        x = g.op("Add", [x, o], f"{sc}/Add")
        h = g.layer_norm(x, w[f"{q}.layer_norm2.weight"], w[f"{q}.layer_norm2.bias"], v.layer_norm_eps,
                         f"{sc}/layer_norm2", f"{q}.layer_norm2")
        f = g.linear(h, w[f"{q}.mlp.fc1.weight"], w[f"{q}.mlp.fc1.bias"], f"{sc}/mlp/fc1", f"{q}.mlp.fc1")
        f = gelu_tanh(g, f, f"{sc}/mlp/act")
        f = g.linear(f, w[f"{q}.mlp.fc2.weight"], w[f"{q}.mlp.fc2.bias"], f"{sc}/mlp/fc2", f"{q}.mlp.fc2")
        x = g.op("Add", [x, f], f"{sc}/Add_1")
    x = g.layer_norm(x, w[f"{pre}.post_layernorm.weight"], w[f"{pre}.post_layernorm.bias"], v.layer_norm_eps,
                     f"/{pre}/post_layernorm", f"{pre}.post_layernorm")

    # 5. connector: pixel_shuffle (view/permute sequence of Idefics3Connector) + projection.
    sc = "/model/connector"
    s_c = g.const([s])
    wps = g.op("Div", [wp, s_c], f"{sc}/Div")
    hps = g.op("Div", [hp, s_c], f"{sc}/Div_1")
    y = g.op("Reshape", [x, g.op("Concat", [g.const([0]), hp, wps, g.const([D * s])], f"{sc}/Concat", axis=0)],
             f"{sc}/Reshape")
    y = g.op("Transpose", [y], f"{sc}/Transpose", perm=[0, 2, 1, 3])
    y = g.op("Reshape", [y, g.op("Concat", [g.const([0]), wps, hps, g.const([D * s * s])], f"{sc}/Concat_1",
                                 axis=0)], f"{sc}/Reshape_1")
    y = g.op("Transpose", [y], f"{sc}/Transpose_1", perm=[0, 2, 1, 3])
    y = g.op("Reshape", [y, g.const([0, -1, D * s * s])], f"{sc}/Reshape_2")
    y = g.op("MatMul", [y, g.init("model.connector.modality_projection.proj.weight",
                                  w["model.connector.modality_projection.proj.weight"])],
             f"{sc}/modality_projection/proj/MatMul")
    g.nodes.append(helper.make_node("Identity", [y], ["image_features"], name="/Identity"))

    inputs = [
        _vi("pixel_values", TensorProto.FLOAT, ["batch_size", "num_images", 3, "height", "width"]),
        _vi("pixel_attention_mask", TensorProto.BOOL, ["batch_size", "num_images", "height", "width"]),
    ]
    outputs = [_vi("image_features", TensorProto.FLOAT, ["num_real_images", "image_seq_len", t.hidden])]
    return g.model("vision_encoder", inputs, outputs)


def gelu_tanh(g: GraphBuilder, x: str, scope: str) -> str:
    """gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (no Gelu op before opset 20)."""
    x3 = g.op("Pow", [x, g.const(3.0, F32)], f"{scope}/Pow")
    inner = g.op("Add", [x, g.op("Mul", [x3, g.const(0.044715, F32)], f"{scope}/Mul")], f"{scope}/Add")
    th = g.op("Tanh", [g.op("Mul", [inner, g.const(math.sqrt(2.0 / math.pi), F32)], f"{scope}/Mul_1")],
              f"{scope}/Tanh")
    y = g.op("Mul", [x, g.op("Add", [th, g.const(1.0, F32)], f"{scope}/Add_1")], f"{scope}/Mul_2")
    return g.op("Mul", [y, g.const(0.5, F32)], f"{scope}/Mul_3")


def build_embed_tokens(d: TextDims, w: "dict[str, np.ndarray]") -> onnx.ModelProto:
    """SmolVLM embed_tokens: input_ids -> inputs_embeds (one Gather)."""
    g = GraphBuilder()
    y = g.op("Gather", [g.init("model.embed_tokens.weight", w["model.embed_tokens"]), "input_ids"],
             "/embed_tokens/Gather", axis=0)
    g.nodes.append(helper.make_node("Identity", [y], ["inputs_embeds"], name="/Identity"))
    return g.model("embed_tokens",
                   [_vi("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])],
                   [_vi("inputs_embeds", TensorProto.FLOAT, ["batch_size", "sequence_length", d.hidden])])


@dataclass(frozen=True)
class DecoderIO:
    """Names of the symbolic dims, which differ between exporters."""
    first_input: str           # "inputs_embeds" (SmolVLM decoder) or "input_ids" (optimum causal LM)
    total_len: str             # attention_mask dim 1 and present dim 2
    past_len: str = "past_sequence_length"


SMOLVLM_DECODER_IO = DecoderIO("inputs_embeds", "total_sequence_length")
OPTIMUM_DECODER_IO = DecoderIO("input_ids", "past_sequence_length + sequence_length")


def build_decoder(d: TextDims, w: "dict[str, np.ndarray]", io_names: DecoderIO) -> onnx.ModelProto:
    """LLaMA/Mistral decoder with KV cache in plain ONNX ops.

    RMSNorm, rotate-half RoPE driven by position_ids (inv_freq = theta^(-2i/d)),
    GQA by repeating KV heads, causal mask by cache position (past_len + i may see
    keys 0..past_len+i) AND the attention_mask padding mask (broadcast, so any
    [batch, 1..total] mask works), SiLU-gated MLP, untied lm_head.
    present.{i} = concat(past.{i}, new) along the sequence axis.
    """
    H, nh, kvh, hd = d.hidden, d.heads, d.kv_heads, d.head_dim
    rep = nh // kvh
    g = GraphBuilder()

    if io_names.first_input == "input_ids":
        x = g.op("Gather", [g.init("model.embed_tokens.weight", w["model.embed_tokens"]), "input_ids"],
                 "/model/embed_tokens/Gather", axis=0)
    else:
        x = "inputs_embeds"

    # Causal + padding bias [batch, 1, seq, total].
    sc = "/model/mask"
    seq = g.dim(g.op("Shape", [x], f"{sc}/Shape"), 1, f"{sc}/seq")
    past = g.dim(g.op("Shape", ["past_key_values.0.key"], f"{sc}/Shape_1"), 2, f"{sc}/past")
    total = g.op("Add", [past, seq], f"{sc}/Add")
    qpos = g.op("Range", [g.scalar(past, f"{sc}/past"), g.scalar(total, f"{sc}/total"), g.const(1)],
                f"{sc}/Range")
    kpos = g.op("Range", [g.const(0), g.scalar(total, f"{sc}/total_1"), g.const(1)], f"{sc}/Range_1")
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [kpos, g.const([0])], f"{sc}/Unsqueeze"),
                                  g.op("Unsqueeze", [qpos, g.const([1])], f"{sc}/Unsqueeze_1")],
                  f"{sc}/LessOrEqual")  # [seq, total]
    pad = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], f"{sc}/Cast", to=TensorProto.BOOL),
                             g.const([1, 2])], f"{sc}/Unsqueeze_2")  # [batch, 1, 1, total]
    ok = g.op("And", [causal, pad], f"{sc}/And")
    bias = g.op("Where", [ok, g.const(0.0, F32), g.const(FMIN, F32)], f"{sc}/Where")

    # RoPE tables [batch, 1, seq, head_dim].
    sc = "/model/rotary_emb"
    inv_freq = (1.0 / (d.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(F32) / hd))).astype(F32)
    pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], f"{sc}/Cast", to=TensorProto.FLOAT), g.const([2])],
               f"{sc}/Unsqueeze")
    freqs = g.op("Mul", [pos, g.const(inv_freq, F32)], f"{sc}/Mul")
    emb = g.op("Concat", [freqs, freqs], f"{sc}/Concat", axis=-1)
    cos = g.op("Unsqueeze", [g.op("Cos", [emb], f"{sc}/Cos"), g.const([1])], f"{sc}/Unsqueeze_1")
    sin = g.op("Unsqueeze", [g.op("Sin", [emb], f"{sc}/Sin"), g.const([1])], f"{sc}/Unsqueeze_2")
    half = g.const([hd // 2, hd // 2])

    def rope(t, scope):
        x1, x2 = g.op("Split", [t, half], f"{scope}/Split", n_out=2, axis=-1)
        rot = g.op("Concat", [g.op("Neg", [x2], f"{scope}/Neg"), x1], f"{scope}/Concat", axis=-1)
        return g.op("Add", [g.op("Mul", [t, cos], f"{scope}/Mul"), g.op("Mul", [rot, sin], f"{scope}/Mul_1")],
                    f"{scope}/Add")

    def repeat_kv(t, scope):
        if rep == 1:
            return t
        t = g.op("Unsqueeze", [t, g.const([2])], f"{scope}/Unsqueeze")
        t = g.op("Expand", [t, g.const([1, 1, rep, 1, 1])], f"{scope}/Expand")
        return g.op("Reshape", [t, g.const([0, nh, -1, hd])], f"{scope}/Reshape")

    scale = g.const(1.0 / math.sqrt(hd), F32)
    presents = []
    for i in range(d.layers):
        p = f"model.layers.{i}"
        sc = f"/{p}"
        h = g.rms_norm(x, w[f"{p}.input_layernorm"], d.rms_eps, f"{sc}/input_layernorm", f"{p}.input_layernorm")

        def proj(name, n_heads):
            y = g.linear(h, w[f"{p}.self_attn.{name}"], None, f"{sc}/self_attn/{name}", f"{p}.self_attn.{name}")
            y = g.op("Reshape", [y, g.const([0, 0, n_heads, hd])], f"{sc}/self_attn/{name}/Reshape")
            return g.op("Transpose", [y], f"{sc}/self_attn/{name}/Transpose", perm=[0, 2, 1, 3])

        qh = rope(proj("q_proj", nh), f"{sc}/self_attn/rope_q")
        kh = rope(proj("k_proj", kvh), f"{sc}/self_attn/rope_k")
        vh = proj("v_proj", kvh)
        k_all = g.op("Concat", [f"past_key_values.{i}.key", kh], f"{sc}/self_attn/Concat", axis=2)
        v_all = g.op("Concat", [f"past_key_values.{i}.value", vh], f"{sc}/self_attn/Concat_1", axis=2)
        presents += [(f"present.{i}.key", k_all), (f"present.{i}.value", v_all)]
        kr = repeat_kv(k_all, f"{sc}/self_attn/repeat_k")
        vr = repeat_kv(v_all, f"{sc}/self_attn/repeat_v")
        kt = g.op("Transpose", [kr], f"{sc}/self_attn/Transpose", perm=[0, 1, 3, 2])
        att = g.op("Mul", [g.op("MatMul", [qh, kt], f"{sc}/self_attn/MatMul"), scale], f"{sc}/self_attn/Mul")
        att = g.op("Softmax", [g.op("Add", [att, bias], f"{sc}/self_attn/Add")], f"{sc}/self_attn/Softmax",
                   axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [att, vr], f"{sc}/self_attn/MatMul_1")],
                   f"{sc}/self_attn/Transpose_1", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.const([0, 0, nh * hd])], f"{sc}/self_attn/Reshape")
        x = g.op("Add", [x, g.linear(ctx, w[f"{p}.self_attn.o_proj"], None, f"{sc}/self_attn/o_proj",
                                     f"{p}.self_attn.o_proj")], f"{sc}/Add")
        h = g.rms_norm(x, w[f"{p}.post_attention_layernorm"], d.rms_eps, f"{sc}/post_attention_layernorm",
                       f"{p}.post_attention_layernorm")
        gate = g.linear(h, w[f"{p}.mlp.gate_proj"], None, f"{sc}/mlp/gate_proj", f"{p}.mlp.gate_proj")
        up = g.linear(h, w[f"{p}.mlp.up_proj"], None, f"{sc}/mlp/up_proj", f"{p}.mlp.up_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{sc}/mlp/act_fn/Sigmoid")], f"{sc}/mlp/act_fn/Mul")
        down = g.linear(g.op("Mul", [act, up], f"{sc}/mlp/Mul"), w[f"{p}.mlp.down_proj"], None,
                        f"{sc}/mlp/down_proj", f"{p}.mlp.down_proj")
        x = g.op("Add", [x, down], f"{sc}/Add_1")
    x = g.rms_norm(x, w["model.norm"], d.rms_eps, "/model/norm", "model.norm")
    logits = g.linear(x, w["lm_head"], None, "/lm_head", "lm_head")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/Identity"))
    for k, (name, src) in enumerate(presents):
        g.nodes.append(helper.make_node("Identity", [src], [name], name=f"/Identity_{k + 1}"))

    total_dim, past_dim = io_names.total_len, io_names.past_len
    if io_names.first_input == "input_ids":
        inputs = [_vi("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    else:
        inputs = [_vi("inputs_embeds", TensorProto.FLOAT, ["batch_size", "sequence_length", H])]
    inputs += [
        _vi("attention_mask", TensorProto.INT64, ["batch_size", total_dim]),
        _vi("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [_vi("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", d.vocab])]
    for i in range(d.layers):
        for kv in ("key", "value"):
            inputs.append(_vi(f"past_key_values.{i}.{kv}", TensorProto.FLOAT, ["batch_size", kvh, past_dim, hd]))
            outputs.append(_vi(f"present.{i}.{kv}", TensorProto.FLOAT, ["batch_size", kvh, total_dim, hd]))
    return g.model("decoder", inputs, outputs)


# --------------------------------------------------------------------------
# Quantized variants (the transformers.js scripts/quantize.py recipes)
# --------------------------------------------------------------------------

# suffix -> description. int8/uint8: ONNXQuantizer IntegerOps (dynamic), every
# IntegerOpsRegistry op type, per_channel/reduce_range off, MatMulConstBOnly;
# q4: MatMulNBits (MatMul4BitsQuantizer) block 32, symmetric.
VARIANTS = {
    "fp32": "float32 export",
    "int8": "dynamic 8-bit, QInt8 weights: DynamicQuantizeLinear + MatMulInteger (+ int8 Gather + DequantizeLinear)",
    "uint8": "dynamic 8-bit, QUInt8 weights: DynamicQuantizeLinear + MatMulInteger/ConvInteger "
             "(+ uint8 Gather + DequantizeLinear)",
    "q4": "4-bit weight-only com.microsoft.MatMulNBits, block_size 32, symmetric",
    "int8pc": "dynamic 8-bit, QInt8 weights with per-channel (per output column) scales: "
              "DynamicQuantizeLinear + MatMulInteger",
    "fp16": "float16 weights and arithmetic, float32 graph inputs/outputs (keep_io_types)",
    "qdq": "static QDQ (int8 activations and weights, per-tensor, MinMax calibration on random "
           "inputs) around MatMul and Conv; embed_tokens stays float32",
}


def _reload_pinned(path: Path, producer: str) -> onnx.ModelProto:
    model = load_model(path)
    model.producer_name = f"edgevlm-models-gen ({producer})"
    model.producer_version = "1"
    finalize_model(model)
    save_model(model, path)
    return model


def quantize_8bit(src: Path, dst: Path, signed: bool, per_channel: bool = False) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    ops = set(IntegerOpsRegistry.keys())
    if signed:
        # transformers.js would write ConvInteger with int8 weights here, which
        # onnxruntime's CPU provider cannot load (ConvInteger is u8 x u8 only);
        # the patch Conv stays float so the reference can be computed.
        ops.discard("Conv")
    quantize_dynamic(
        src, dst,
        op_types_to_quantize=sorted(ops),
        per_channel=per_channel,
        reduce_range=False,
        weight_type=QuantType.QInt8 if signed else QuantType.QUInt8,
        extra_options={"EnableSubgraph": True, "MatMulConstBOnly": True},
    )
    kind = ("int8" if signed else "uint8") + (" per-channel" if per_channel else "")
    return _reload_pinned(dst, "onnxruntime.quantization dynamic " + kind)


def to_fp16(src: Path, dst: Path) -> onnx.ModelProto:
    """The fp16 export: float16 weights and arithmetic, float32 graph inputs/outputs."""
    save_model(convert_to_fp16(load_model(src), keep_io_types=True), dst)
    return _reload_pinned(dst, "float16 conversion, keep_io_types")


def _calibration_feeds(model: onnx.ModelProto, image_size: int, n: int = 2):
    """Random inputs for static calibration: symbolic dims fixed to one image of
    `image_size`, 16 prompt tokens and an empty KV cache; `n` feeds."""
    sizes = {"height": image_size, "width": image_size, "sequence_length": 16,
             "total_sequence_length": 16, "past_sequence_length": 0}
    rng = np.random.default_rng(SEED_QDQ_CALIB)
    feeds = []
    for _ in range(n):
        feed = {}
        for x in model.graph.input:
            t = x.type.tensor_type
            shape = [d.dim_value if d.dim_value else sizes.get(d.dim_param, 1) for d in t.shape.dim]
            if t.elem_type == TensorProto.FLOAT:
                feed[x.name] = rng.standard_normal(shape).astype(np.float32)
            elif t.elem_type == TensorProto.BOOL:
                feed[x.name] = np.ones(shape, dtype=bool)
            elif x.name == "position_ids":
                feed[x.name] = np.broadcast_to(np.arange(shape[-1], dtype=np.int64), shape).copy()
            else:
                feed[x.name] = np.ones(shape, dtype=np.int64)
        feeds.append(feed)
    return feeds


SEED_QDQ_CALIB = 20261124


def quantize_qdq(src: Path, dst: Path, image_size: int) -> onnx.ModelProto:
    """Static QDQ the way onnxruntime.quantization.quantize_static writes it by default:
    QuantizeLinear -> DequantizeLinear on activations, DequantizeLinear on int8 weights."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    model = load_model(src)
    if not any(n.op_type in ("MatMul", "Conv") for n in model.graph.node):
        return _reload_pinned_copy(src, dst)

    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(
        src, dst, Reader(_calibration_feeds(model, image_size)),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Conv"],
        per_channel=False,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return _reload_pinned(dst, "onnxruntime.quantization static QDQ int8")


def quantize_q4(src: Path, dst: Path) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quant = MatMulNBitsQuantizer(load_model(src), block_size=32, is_symmetric=True)
    quant.process()
    save_model(quant.model.model, dst)
    return _reload_pinned(dst, "onnxruntime.quantization MatMulNBits q4")


def write_variants(base: Path, onnx_dir: Path, stem: str, variants, image_size: int = 0) -> "dict[str, dict]":
    """fp32 copy + quantized variants of one graph; returns per-variant file info."""
    info = {}
    for var in variants:
        dst = onnx_dir / (f"{stem}.onnx" if var == "fp32" else f"{stem}_{var}.onnx")
        if var == "fp32":
            model = _reload_pinned_copy(base, dst)
        elif var == "int8":
            model = quantize_8bit(base, dst, signed=True)
        elif var == "uint8":
            model = quantize_8bit(base, dst, signed=False)
        elif var == "q4":
            model = quantize_q4(base, dst)
        elif var == "int8pc":
            model = quantize_8bit(base, dst, signed=True, per_channel=True)
        elif var == "fp16":
            model = to_fp16(base, dst)
        elif var == "qdq":
            model = quantize_qdq(base, dst, image_size)
        else:
            raise ValueError(var)
        info[var] = {"file": dst.name, "ops": dict(op_histogram(model))}
    return info


def _reload_pinned_copy(src: Path, dst: Path) -> onnx.ModelProto:
    model = load_model(src)
    save_model(model, dst)
    return model


# --------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------

WORDS = {
    "defects": ["scratch", "dent", "crack", "chip", "stain", "burr", "hole", "rust", "defect", "mark"],
    "things": ["part", "plate", "bracket", "surface", "edge", "corner", "image", "picture", "object", "panel"],
    "places": ["left", "right", "top", "bottom", "center", "middle", "upper", "lower"],
    "adj": ["small", "large", "thin", "deep", "bright", "dark", "long", "short", "clean", "metal"],
    "colors": ["red", "green", "blue", "gray", "white", "black", "silver", "yellow"],
}

TEMPLATES = [
    "Is there a {d} on the {t}?",
    "Is there a {d} on this {t}? Answer yes or no.",
    "Yes, there is a {a} {d} near the {p} {t}.",
    "No, the {t} is ok.",
    "No. The {t} looks clean and there is no {d}.",
    "Describe the image.",
    "Describe this {t} in one sentence.",
    "The image shows a {c} {t} with a {a} {d} on the {p} side.",
    "What is the color of the {t}? It is {c}.",
    "Is the {t} ok or is it a defect? It is a defect: a {d}.",
    "Part {n} passed inspection.",
    "Part {n} failed: {d} at the {p} {t}, {n} mm long.",
    "There are {n} {d}s on the {t}.",
    "Answer with yes or no. Is there a {d}?",
    "The {a} {t} is {c}, the {d} is {a}.",
    "Can you describe what you see in this image?",
    "I see a {c} {t}. It has a {d} in the {p}.",
]


def make_corpus(seed: int, n: int, extra: "list[str]" = ()) -> "list[str]":
    """Seeded English inspection sentences for the BPE trainers."""
    rng = np.random.default_rng(seed)
    out = list(extra)
    for _ in range(n):
        tpl = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        pick = {k[0]: v[int(rng.integers(len(v)))] for k, v in WORDS.items()}
        out.append(tpl.format(d=pick["d"], t=pick["t"], p=pick["p"], a=pick["a"], c=pick["c"],
                              n=int(rng.integers(0, 1000))))
    return out


# SmolLM2's 17 leading special tokens (ids 0..16 in the real tokenizer).
SMOLLM_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
]
# SmolVLM's added tokens, in the order the real tokenizer assigns their ids
# (<global-img> = first id after the base vocab ... <end_of_utterance> = last).
SMOLVLM_ADDED = (
    ["<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<fake_token_around_image>", "<image>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(88)]
    + ["<end_of_utterance>"]
)
SMOLVLM_BASE_VOCAB = 512  # real: 49152; plus 128 added = 640 (real: 49280)

# The SmolVLM2 chat template (transformers' SmolVLM DEFAULT_CHAT_TEMPLATE, which
# is the Hub chat_template.json plus the <video> branch).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.2 tokenizer_config.json chat_template.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def _dump_json(path: Path, obj, sort_keys: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def _canonical_tokenizer_json(tok) -> str:
    """tokenizers' own serialization, re-dumped with stable formatting."""
    return json.dumps(json.loads(tok.to_str()), indent=2, ensure_ascii=False) + "\n"


def build_smolvlm_tokenizer():
    """Byte-level BPE like SmolLM2 (digits split, GPT-2 byte alphabet) + SmolVLM's added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=SMOLVLM_BASE_VOCAB, special_tokens=SMOLLM_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    corpus = make_corpus(SEED_CORPUS, 4000, extra=["User: Assistant: User:Assistant:"] * 50)
    tok.train_from_iterator(corpus, trainer=trainer)
    if tok.get_vocab_size() != SMOLVLM_BASE_VOCAB:
        raise RuntimeError(f"BPE base vocab {tok.get_vocab_size()} != {SMOLVLM_BASE_VOCAB}")
    for t in SMOLVLM_ADDED:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
    for k, t in enumerate(SMOLVLM_ADDED):
        assert tok.token_to_id(t) == SMOLVLM_BASE_VOCAB + k, t
    return tok


def smolvlm_token_files(tok) -> "dict[str, object]":
    """tokenizer_config.json, special_tokens_map.json, added_tokens.json contents (real key set)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    specials = SMOLLM_SPECIALS + SMOLVLM_ADDED
    added_decoder = {
        str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
        for t in specials
    }
    extra = {
        "end_of_utterance_token": "<end_of_utterance>",
        "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>",
        "image_token": "<image>",
    }
    cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        "bos_token": "<|im_start|>",
        "chat_template": SMOLVLM_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<end_of_utterance>",
        "extra_special_tokens": extra,
        "legacy": False,
        "model_max_length": 8192,
        "pad_token": "<|im_end|>",
        "processor_class": "SmolVLMProcessor",
        "tokenizer_class": "GPT2Tokenizer",
        "truncation_side": "left",
        "unk_token": "<|endoftext|>",
        "vocab_size": SMOLVLM_BASE_VOCAB,
        **extra,
    }
    stm = {
        "additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        "bos_token": {"content": "<|im_start|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
        "eos_token": {"content": "<end_of_utterance>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
        "pad_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
        "unk_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
    }
    added = {t: vocab[t] for t in SMOLVLM_ADDED}
    return {"tokenizer_config.json": cfg, "special_tokens_map.json": stm, "added_tokens.json": added}


MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>"]
MISTRAL_VOCAB = 512


def build_mistral_tokenizer():
    """Mistral-7B-v0.2-style tokenizer.json: BPE with byte_fallback, ▁ word prefix.

    Layout of the real file: <unk>/<s>/</s> = 0/1/2, <0x00>..<0xFF> = 3..258,
    then merged pieces, then single characters. Normalizer Prepend("▁") +
    Replace(" ", "▁"), no pre-tokenizer, decoder Replace/ByteFallback/Fuse/Strip,
    post-processor TemplateProcessing "<s> $A". Training runs on ▁-prefixed words
    (sentencepiece never merges across a word start), then the vocab is laid out
    as above.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trainer_vocab = MISTRAL_VOCAB - 256
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=trainer_vocab, special_tokens=MISTRAL_SPECIALS,
                                  show_progress=False, min_frequency=2)
    corpus = make_corpus(SEED_CORPUS + 1, 4000, extra=["[INST] Is there a scratch? [/INST] No.</s>"] * 200)
    t.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(t.to_str())["model"]
    tvocab = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    merges = trained["merges"]
    merges = [m if isinstance(m, list) else m.split(" ") for m in merges]
    merged = ["".join(m) for m in merges]
    singles = [tok for tok, _ in tvocab if tok not in MISTRAL_SPECIALS and tok not in set(merged)]
    order = MISTRAL_SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
    seen = set(order)
    for tok in merged + singles:
        if tok not in seen:
            order.append(tok)
            seen.add(tok)
    if len(order) != MISTRAL_VOCAB:
        raise RuntimeError(f"mistral vocab {len(order)} != {MISTRAL_VOCAB}")
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, s in enumerate(MISTRAL_SPECIALS)
        ],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(order)},
            "merges": merges,
        },
    }
    return Tokenizer.from_str(json.dumps(spec))


def mistral_token_files(tok) -> "dict[str, object]":
    added_decoder = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, s in enumerate(MISTRAL_SPECIALS)
    }
    cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": [],
        "bos_token": "<s>",
        "chat_template": MISTRAL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    stm = {s: {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
           for s, c in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    return {"tokenizer_config.json": cfg, "special_tokens_map.json": stm}


# --------------------------------------------------------------------------
# Snapshot config files
# --------------------------------------------------------------------------

def smolvlm_config(dims: VlmDims, tok_ids: "dict[str, int]", transformers_version: str) -> dict:
    t, v = dims.text, dims.vision
    return {
        "architectures": ["SmolVLMForConditionalGeneration"],
        "image_token_id": tok_ids["<image>"],
        "model_type": "smolvlm",
        "pad_token_id": tok_ids["<|im_end|>"],
        "scale_factor": dims.scale_factor,
        "text_config": {
            "architectures": ["VLlama3ForCausalLM"],
            "bos_token_id": tok_ids["<|im_start|>"],
            "eos_token_id": tok_ids["<|im_end|>"],
            "head_dim": t.head_dim,
            "hidden_act": "silu",
            "hidden_size": t.hidden,
            "intermediate_size": t.intermediate,
            "is_llama_config": True,
            "max_position_embeddings": t.max_position_embeddings,
            "model_type": "llama",
            "num_attention_heads": t.heads,
            "num_hidden_layers": t.layers,
            "num_key_value_heads": t.kv_heads,
            "pad_token_id": tok_ids["<|im_end|>"],
            "pixel_shuffle_factor": dims.scale_factor,
            "qk_layer_norms": False,
            "rms_norm_eps": t.rms_eps,
            "rope_interleaved": False,
            "rope_theta": t.rope_theta,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "use_resampler": False,
            "vocab_size": t.vocab,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": transformers_version,
        "use_cache": True,
        "vision_config": {
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": v.hidden,
            "image_size": v.image_size,
            "intermediate_size": v.intermediate,
            "layer_norm_eps": v.layer_norm_eps,
            "max_image_size": {"longest_edge": dims.max_image_size},
            "model_type": "smolvlm_vision",
            "num_attention_heads": v.heads,
            "num_channels": 3,
            "num_hidden_layers": v.layers,
            "patch_size": v.patch_size,
            "size": {"longest_edge": dims.size_longest_edge},
            "tie_word_embeddings": False,
            "use_base_siglip": False,
        },
        "vocab_size": t.vocab,
    }


def smolvlm_preprocessor_config(dims: VlmDims) -> dict:
    return {
        "do_convert_rgb": True,
        "do_image_splitting": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SmolVLMImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "max_image_size": {"longest_edge": dims.max_image_size},
        "processor_class": "SmolVLMProcessor",
        "resample": 1,
        "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": dims.size_longest_edge},
        "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": dims.max_image_size}},
    }


def write_smolvlm_snapshot_files(snap: Path, dims: VlmDims, tok, transformers_version: str) -> "dict[str, int]":
    """Everything but the ONNX graphs; returns the ids of the tokens configs refer to."""
    vocab = tok.get_vocab(with_added_tokens=True)
    ids = {t: vocab[t] for t in ("<image>", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
                                 "<end_of_utterance>", "<fake_token_around_image>", "<global-img>")}
    _dump_json(snap / "config.json", smolvlm_config(dims, ids, transformers_version))
    _dump_json(snap / "generation_config.json", {
        "_from_model_config": True,
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": ids["<end_of_utterance>"],
        "pad_token_id": ids["<|im_end|>"],
        "transformers_version": transformers_version,
    })
    _dump_json(snap / "preprocessor_config.json", smolvlm_preprocessor_config(dims))
    _dump_json(snap / "processor_config.json", {"image_seq_len": dims.image_seq_len,
                                                  "processor_class": "SmolVLMProcessor"})
    _dump_json(snap / "chat_template.json", {"chat_template": SMOLVLM_CHAT_TEMPLATE})
    (snap / "tokenizer.json").write_text(_canonical_tokenizer_json(tok))
    for name, obj in smolvlm_token_files(tok).items():
        _dump_json(snap / name, obj)
    return ids


def write_mistral_snapshot_files(snap: Path, d: TextDims, tok, transformers_version: str) -> None:
    _dump_json(snap / "config.json", {
        "architectures": ["MistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": d.head_dim,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": 0.02,
        "intermediate_size": d.intermediate,
        "max_position_embeddings": d.max_position_embeddings,
        "model_type": "mistral",
        "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "rms_norm_eps": d.rms_eps,
        "rope_theta": d.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": transformers_version,
        "use_cache": True,
        "vocab_size": d.vocab,
    })
    _dump_json(snap / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
        "transformers_version": transformers_version,
    })
    (snap / "tokenizer.json").write_text(_canonical_tokenizer_json(tok))
    for name, obj in mistral_token_files(tok).items():
        _dump_json(snap / name, obj)


# --------------------------------------------------------------------------
# Test images
# --------------------------------------------------------------------------

# (file, width, height, part label, prompt, extra processor kwargs)
IMAGES = [
    ("wide_50x30.png", 50, 30, "scratch", "Is there a scratch on this part? Answer yes or no.", {}),
    ("tall_20x70.jpg", 20, 70, "ok", "Describe the image.", {}),
    ("square_96x96.jpg", 96, 96, "missing_hole", "Is there a defect on the plate?", {}),
    ("strip_130x40.png", 130, 40, "scratch", "Is there a dent or a scratch?", {}),
    ("tiny_7x5.png", 7, 5, "ok", "Describe this part in one sentence.", {}),
]
# Extra reference case: the same square image with do_image_splitting=False.
NOSPLIT_CASE = ("square_96x96.jpg", "Is there a defect on the plate?", {"do_image_splitting": False})


def make_images(img_dir: Path) -> None:
    """Rendered metal parts (models/gen/parts.py), resampled to odd sizes: textured, not flat.

    JPEGs use quality 90 and 4:4:4 chroma like the demo samples, so other
    decoders reproduce the pixels closely.
    """
    import parts
    from PIL import Image

    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED_IMAGES)
    for name, w, h, label, _, _ in IMAGES:
        arr = parts.render(rng, label)
        img = Image.fromarray(arr)
        if (w, h) != img.size:
            # Crop to the target aspect first so the part is not squashed flat.
            sw, sh = img.size
            if w / h >= sw / sh:
                ch = max(1, round(sw * h / w))
                top = (sh - ch) // 2
                img = img.crop((0, top, sw, top + ch))
            else:
                cw = max(1, round(sh * w / h))
                left = (sw - cw) // 2
                img = img.crop((left, 0, left + cw, sh))
            img = img.resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        if name.endswith(".jpg"):
            img.save(buf, "JPEG", quality=90, subsampling=0)
        else:
            img.save(buf, "PNG", optimize=False, compress_level=9)
        (img_dir / name).write_bytes(buf.getvalue())


# --------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------

def versions() -> dict:
    import PIL
    import onnxruntime
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def greedy_decode(decoder, n_layers: int, kv_heads: int, head_dim: int, first_feed: dict,
                  embed_step, max_new: int) -> "tuple[list[int], np.ndarray, list[float]]":
    """The model-card loop: prefill, then one token per step with the KV cache fed back.

    position_ids = cumsum(attention_mask) - 1 (0-based, as transformers computes
    them); the attention_mask grows by one 1 per step; EOS does not stop it.
    Returns the ids, the prefill last-position logits and, per step, the margin
    between the best and second-best logit (how robust the argmax is).
    """
    feed = dict(first_feed)
    batch = 1
    mask = np.ones((batch, feed.pop("_len")), dtype=np.int64)
    feed["attention_mask"] = mask
    feed["position_ids"] = np.cumsum(mask, axis=-1) - 1
    for i in range(n_layers):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((batch, kv_heads, 0, head_dim), dtype=F32)
    out_names = [o.name for o in decoder.get_outputs()]
    ids, margins, prefill_logits = [], [], None
    for step in range(max_new):
        outs = dict(zip(out_names, decoder.run(out_names, feed)))
        last = outs["logits"][0, -1].astype(np.float64)
        if step == 0:
            prefill_logits = outs["logits"][:, -1, :].copy()
        tok = int(np.argmax(last))
        top2 = np.sort(last)[-2:]
        ids.append(tok)
        margins.append(float(top2[1] - top2[0]))
        nxt = np.array([[tok]], dtype=np.int64)
        feed = embed_step(nxt)
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=-1)
        feed["attention_mask"] = mask
        feed["position_ids"] = np.array([[int(np.cumsum(mask)[-1]) - 1]], dtype=np.int64)
        for i in range(n_layers):
            for kv in ("key", "value"):
                feed[f"past_key_values.{i}.{kv}"] = outs[f"present.{i}.{kv}"]
    return ids, prefill_logits, margins


def processor_with_overrides(snap: Path, overrides: dict):
    """AutoProcessor for the snapshot with some preprocessor_config.json keys changed.

    transformers 4.52 ignores do_image_splitting passed at call time, so a case
    with a different preprocessor setting needs its own config file; the JSON
    files are copied to a temporary snapshot (the graphs are not needed).
    """
    from transformers import AutoProcessor

    with tempfile.TemporaryDirectory(prefix="edgevlm-proc-") as tmpd:
        for f in snap.glob("*.json"):
            shutil.copy(f, Path(tmpd) / f.name)
        cfg = json.loads((snap / "preprocessor_config.json").read_text())
        cfg.update(overrides)
        _dump_json(Path(tmpd) / "preprocessor_config.json", cfg)
        return AutoProcessor.from_pretrained(tmpd)


def smolvlm_references(out: Path, snap: Path, dims: VlmDims, variants, files: dict, tok_ids: dict) -> dict:
    from PIL import Image
    from transformers import AutoProcessor

    ref_dir = out / "references" / "smolvlm"
    ref_dir.mkdir(parents=True, exist_ok=True)
    from tokenizers import Tokenizer

    processor = AutoProcessor.from_pretrained(str(snap))
    raw_tok = Tokenizer.from_file(str(snap / "tokenizer.json"))
    t = dims.text
    sessions = {
        var: {part: ort_session(snap / "onnx" / files[part][var]["file"])
              for part in ("vision_encoder", "embed_tokens", "decoder_model_merged")}
        for var in variants
    }
    image_token_id = tok_ids["<image>"]
    cases = []
    specs = [(name, prompt, kw) for name, _, _, _, prompt, kw in IMAGES] + [NOSPLIT_CASE]
    for name, prompt, kw in specs:
        case_name = Path(name).stem + ("_nosplit" if kw.get("do_image_splitting") is False else "")
        img = Image.open(out / "images" / name)
        decoded = np.asarray(img.convert("RGB"))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        proc = processor if not kw else processor_with_overrides(snap, kw)
        enc = proc(text=text, images=[img], return_tensors="np")
        input_ids = enc["input_ids"].astype(np.int64)
        pv = enc["pixel_values"].astype(F32)
        pam_dtype = str(enc["pixel_attention_mask"].dtype)
        pam = enc["pixel_attention_mask"].astype(bool)  # the ONNX input is bool (model card: .astype(bool))
        # The processor drops rows/cols after expanding the prompt; ask the image processor.
        rc = proc.image_processor(images=[img], return_tensors="np", return_row_col_info=True)
        assert np.array_equal(rc["pixel_values"], enc["pixel_values"]), case_name
        expanded = processor.tokenizer.decode(input_ids[0].tolist(), skip_special_tokens=False)
        assert raw_tok.encode(expanded, add_special_tokens=False).ids == input_ids[0].tolist(), case_name
        n_img_tok = int((input_ids == image_token_id).sum())
        assert n_img_tok == pv.shape[1] * dims.image_seq_len, (case_name, n_img_tok, pv.shape)
        assert np.all(enc["attention_mask"] == 1)

        save_npy(ref_dir / f"{case_name}_pixel_values.npy", pv)
        save_npy(ref_dir / f"{case_name}_pixel_attention_mask.npy", pam)
        save_npy(ref_dir / f"{Path(name).stem}_decoded_rgb.npy", decoded)  # per image, not per case
        case = {
            "name": case_name,
            "image": f"images/{name}",
            "image_size_wh": list(img.size),
            "image_mode": img.mode,
            "decoded_rgb": f"references/smolvlm/{Path(name).stem}_decoded_rgb.npy",
            "preprocessor_config_overrides": kw,
            "prompt": prompt,
            "messages": messages,
            "prompt_text": text,
            "expanded_prompt": expanded,
            "input_ids": input_ids[0].tolist(),
            "num_image_tokens": n_img_tok,
            "rows": [[int(r) for r in rr] for rr in rc["rows"]],
            "cols": [[int(c) for c in cc] for cc in rc["cols"]],
            "pixel_values": f"references/smolvlm/{case_name}_pixel_values.npy",
            "pixel_values_shape": list(pv.shape),
            "pixel_attention_mask": f"references/smolvlm/{case_name}_pixel_attention_mask.npy",
            "pixel_attention_mask_processor_dtype": pam_dtype,
            "pixel_attention_mask_all_true": bool(pam.all()),
            "greedy": {},
            "greedy_top2_margin_min": {},
        }
        for var in variants:
            s = sessions[var]
            feats = s["vision_encoder"].run(["image_features"], {"pixel_values": pv,
                                                                  "pixel_attention_mask": pam})[0]
            if var == "fp32":
                save_npy(ref_dir / f"{case_name}_image_features.npy", feats)
                case["image_features"] = f"references/smolvlm/{case_name}_image_features.npy"
                case["image_features_shape"] = list(feats.shape)
            embeds = s["embed_tokens"].run(["inputs_embeds"], {"input_ids": input_ids})[0]
            sel = input_ids == image_token_id
            embeds[sel] = feats.reshape(-1, feats.shape[-1])

            def embed_step(ids, _s=s):
                return {"inputs_embeds": _s["embed_tokens"].run(["inputs_embeds"], {"input_ids": ids})[0]}

            ids, logits, margins = greedy_decode(
                s["decoder_model_merged"], t.layers, t.kv_heads, t.head_dim,
                {"inputs_embeds": embeds, "_len": input_ids.shape[1]}, embed_step, MAX_NEW_TOKENS)
            case["greedy"][var] = ids
            case["greedy_top2_margin_min"][var] = round(min(margins), 6)
            case.setdefault("greedy_top2_margins", {})[var] = [round(m, 4) for m in margins]
            if var == "fp32":
                save_npy(ref_dir / f"{case_name}_prefill_last_logits.npy", logits)
                case["prefill_last_logits"] = f"references/smolvlm/{case_name}_prefill_last_logits.npy"
            case.setdefault("greedy_text", {})[var] = processor.tokenizer.decode(ids, skip_special_tokens=False)
        cases.append(case)
    return {"cases": cases}


def mistral_references(out: Path, snap: Path, d: TextDims, variants, files: dict) -> dict:
    from transformers import AutoTokenizer

    ref_dir = out / "references" / "mistral"
    ref_dir.mkdir(parents=True, exist_ok=True)
    from tokenizers import Tokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(snap))
    raw_tok = Tokenizer.from_file(str(snap / "tokenizer.json"))
    sessions = {var: ort_session(snap / "onnx" / files[var]["file"]) for var in variants}
    conversations = [
        ("single_turn", [{"role": "user", "content": "Is there a scratch on the part?"}]),
        ("multi_turn", [
            {"role": "user", "content": "Describe the defect."},
            {"role": "assistant", "content": "A small dent on the left edge."},
            {"role": "user", "content": "Is the part ok? Answer yes or no."},
        ]),
        # Non-ASCII text that the tiny vocab has never seen: exercises byte_fallback.
        ("byte_fallback", [{"role": "user", "content": "Part 42: café µm ✓ — ok?"}]),
    ]
    cases = []
    for name, messages in conversations:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        # apply_chat_template(tokenize=True) tokenizes exactly this way.
        assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True), name
        # The plain tokenizers library on tokenizer.json agrees (what a Rust `tokenizers` user runs).
        assert raw_tok.encode(text, add_special_tokens=False).ids == ids, name
        input_ids = np.array([ids], dtype=np.int64)
        case = {"name": name, "messages": messages, "prompt_text": text, "input_ids": ids,
                "tokens": tokenizer.convert_ids_to_tokens(ids), "greedy": {}, "greedy_top2_margin_min": {}}
        for var in variants:
            sess = sessions[var]
            gen, logits, margins = greedy_decode(
                sess, d.layers, d.kv_heads, d.head_dim, {"input_ids": input_ids, "_len": len(ids)},
                lambda nxt: {"input_ids": nxt}, MAX_NEW_TOKENS)
            case["greedy"][var] = gen
            case["greedy_top2_margin_min"][var] = round(min(margins), 6)
            case.setdefault("greedy_top2_margins", {})[var] = [round(m, 4) for m in margins]
            case.setdefault("greedy_text", {})[var] = tokenizer.decode(gen, skip_special_tokens=False)
            if var == "fp32":
                save_npy(ref_dir / f"{name}_prefill_last_logits.npy", logits)
                case["prefill_last_logits"] = f"references/mistral/{name}_prefill_last_logits.npy"
        cases.append(case)
    return {"cases": cases}


def interface_of(path: Path) -> dict:
    """Input/output names, dtypes and dims exactly as written in the graph."""
    m = load_model(path)

    def desc(vi):
        tt = vi.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tt.shape.dim]
        return {"name": vi.name, "dtype": TensorProto.DataType.Name(tt.elem_type).lower(), "dims": dims}

    return {"inputs": [desc(v) for v in m.graph.input], "outputs": [desc(v) for v in m.graph.output]}


# --------------------------------------------------------------------------
# Self-checks: the graphs against loop-by-loop numpy ports of transformers' code
# --------------------------------------------------------------------------

def _np_layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_vision_reference(dims: VlmDims, w: dict, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray):
    """SmolVLMModel.get_image_features, transcribed statement by statement (float64)."""
    v, p, s = dims.vision, dims.vision.patch_size, dims.scale_factor
    pre = "model.vision_model"
    b, n = pixel_values.shape[:2]
    pv = pixel_values.reshape(b * n, *pixel_values.shape[2:]).astype(np.float64)
    pam = pixel_attention_mask.reshape(b * n, *pixel_attention_mask.shape[2:])
    real = (pv == 0.0).sum(axis=(1, 2, 3)) != pv[0].size
    if not real.any():
        real[0] = True
    pv, pam = pv[real], pam[real]
    k, _, hh, ww = pv.shape
    hp, wp = hh // p, ww // p
    patch_mask = pam[:, :hp * p, :wp * p].reshape(k, hp, p, wp, p).sum(axis=(2, 4)) > 0
    cols = pv[:, :, :hp * p, :wp * p].reshape(k, 3, hp, p, wp, p).transpose(0, 2, 4, 1, 3, 5)
    cols = cols.reshape(k, hp * wp, 3 * p * p)
    wc = w[f"{pre}.embeddings.patch_embedding.weight"].astype(np.float64).reshape(v.hidden, -1)
    x = cols @ wc.T + w[f"{pre}.embeddings.patch_embedding.bias"]
    n_side = v.image_size // p
    boundaries = _position_bucket_boundaries(n_side)
    position_ids = np.zeros((k, hp * wp), dtype=np.int64)
    for i in range(k):
        nb_h, nb_w = int(patch_mask[i, :, 0].sum()), int(patch_mask[i, 0].sum())
        if nb_h == 0 or nb_w == 0:
            continue
        step_h, step_w = F32(1.0) / F32(nb_h), F32(1.0) / F32(nb_w)
        frac_h = (np.arange(nb_h) * np.float64(step_h)).astype(F32)
        frac_w = (np.arange(nb_w) * np.float64(step_w)).astype(F32)
        bh = np.searchsorted(boundaries, frac_h, side="right")  # torch.bucketize(right=True)
        bw = np.searchsorted(boundaries, frac_w, side="right")
        position_ids[i][patch_mask[i].reshape(-1)] = (bh[:, None] * n_side + bw).reshape(-1)
    x = x + w[f"{pre}.embeddings.position_embedding.weight"][position_ids]
    bias = np.where(patch_mask.reshape(k, 1, 1, -1), 0.0, FMIN)
    nh, hd = v.heads, v.hidden // v.heads
    for li in range(v.layers):
        q = f"{pre}.encoder.layers.{li}"
        h = _np_layer_norm(x, w[f"{q}.layer_norm1.weight"], w[f"{q}.layer_norm1.bias"], v.layer_norm_eps)

        def proj(name, t):
            return t @ w[f"{q}.self_attn.{name}.weight"] + w[f"{q}.self_attn.{name}.bias"]

        qs, ks, vs = (proj(nm, h).reshape(k, -1, nh, hd).transpose(0, 2, 1, 3)
                      for nm in ("q_proj", "k_proj", "v_proj"))
        att = _np_softmax(qs @ ks.transpose(0, 1, 3, 2) * hd ** -0.5 + bias)
        ctx = (att @ vs).transpose(0, 2, 1, 3).reshape(k, -1, v.hidden)
        x = x + proj("out_proj", ctx)
        h = _np_layer_norm(x, w[f"{q}.layer_norm2.weight"], w[f"{q}.layer_norm2.bias"], v.layer_norm_eps)
        f = h @ w[f"{q}.mlp.fc1.weight"] + w[f"{q}.mlp.fc1.bias"]
        f = 0.5 * f * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (f + 0.044715 * f ** 3)))
        x = x + f @ w[f"{q}.mlp.fc2.weight"] + w[f"{q}.mlp.fc2.bias"]
    x = _np_layer_norm(x, w[f"{pre}.post_layernorm.weight"], w[f"{pre}.post_layernorm.bias"], v.layer_norm_eps)
    # Idefics3Connector.pixel_shuffle
    bsz, seq, d = x.shape
    height = width = int(seq ** 0.5)
    x = x.reshape(bsz, height, width, d)
    x = x.reshape(bsz, height, int(width / s), d * s)
    x = x.transpose(0, 2, 1, 3)
    x = x.reshape(bsz, int(width / s), int(height / s), d * s * s)
    x = x.transpose(0, 2, 1, 3)
    x = x.reshape(bsz, int(seq / s ** 2), d * s * s)
    return x @ w["model.connector.modality_projection.proj.weight"]


def np_decoder_reference(d: TextDims, w: dict, embeds, attention_mask, position_ids, past):
    """LlamaModel/MistralModel forward with a cache, transcribed (float64). past: list of (k, v)."""
    H, nh, kvh, hd = d.hidden, d.heads, d.kv_heads, d.head_dim
    b, sq, _ = embeds.shape
    plen = past[0][0].shape[2]
    x = embeds.astype(np.float64)
    inv_freq = 1.0 / (d.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(F32) / hd))
    freqs = position_ids[:, :, None].astype(np.float64) * inv_freq.astype(F32)
    emb = np.concatenate([freqs, freqs], -1)
    cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]

    def rope(t):
        rot = np.concatenate([-t[..., hd // 2:], t[..., :hd // 2]], -1)
        return t * cos + rot * sin

    def rms(t, wt):
        return wt * (t / np.sqrt((t ** 2).mean(-1, keepdims=True) + d.rms_eps))

    cache_pos = np.arange(plen, plen + sq)
    allowed = (np.arange(plen + sq)[None, :] <= cache_pos[:, None])[None, None] & \
              (attention_mask[:, None, None, :] > 0)
    bias = np.where(allowed, 0.0, FMIN)
    presents = []
    for i in range(d.layers):
        p = f"model.layers.{i}"
        h = rms(x, w[f"{p}.input_layernorm"])
        q = rope((h @ w[f"{p}.self_attn.q_proj"]).reshape(b, sq, nh, hd).transpose(0, 2, 1, 3))
        k = rope((h @ w[f"{p}.self_attn.k_proj"]).reshape(b, sq, kvh, hd).transpose(0, 2, 1, 3))
        v = (h @ w[f"{p}.self_attn.v_proj"]).reshape(b, sq, kvh, hd).transpose(0, 2, 1, 3)
        k = np.concatenate([past[i][0], k], 2)
        v = np.concatenate([past[i][1], v], 2)
        presents.append((k, v))
        kr, vr = np.repeat(k, nh // kvh, axis=1), np.repeat(v, nh // kvh, axis=1)
        att = _np_softmax(q @ kr.transpose(0, 1, 3, 2) / np.sqrt(hd) + bias)
        x = x + ((att @ vr).transpose(0, 2, 1, 3).reshape(b, sq, nh * hd)) @ w[f"{p}.self_attn.o_proj"]
        h = rms(x, w[f"{p}.post_attention_layernorm"])
        g = h @ w[f"{p}.mlp.gate_proj"]
        x = x + ((g / (1.0 + np.exp(-g))) * (h @ w[f"{p}.mlp.up_proj"])) @ w[f"{p}.mlp.down_proj"]
    return rms(x, w["model.norm"]) @ w["lm_head"], presents


def selfcheck_vision(dims: VlmDims, w: dict, path: Path) -> float:
    """Batch 2 with a padding image, a partial pixel mask and a non-square input."""
    rng = np.random.default_rng(7)
    s = dims.vision.image_size
    worst = 0.0
    pv = rng.uniform(-1, 1, (2, 3, 3, s, s)).astype(F32)
    pv[1, 2] = 0.0  # padding image: dropped
    pam = np.ones((2, 3, s, s), dtype=bool)
    pam[0, 1, :, s * 5 // 8:] = False  # partially valid tile (right part padded)
    pam[0, 1, s * 3 // 4:, :] = False
    pam[1, 2] = False
    cases = [(pv, pam),
             (np.zeros((1, 2, 3, s, s), dtype=F32), np.zeros((1, 2, s, s), dtype=bool)),  # no real image
             (rng.uniform(-1, 1, (1, 1, 3, 2 * s, 2 * s)).astype(F32), np.ones((1, 1, 2 * s, 2 * s), bool))]
    sess = ort_session(path)
    for pv_, pam_ in cases:
        got = sess.run(["image_features"], {"pixel_values": pv_, "pixel_attention_mask": pam_})[0]
        want = np_vision_reference(dims, w, pv_, pam_)
        assert got.shape == want.shape, (got.shape, want.shape)
        worst = max(worst, float(np.abs(got - want).max() / (np.abs(want).max() + 1e-9)))
    assert worst < 1e-4, f"vision encoder differs from the numpy port: rel err {worst}"
    return worst


def selfcheck_decoder(d: TextDims, w: dict, path: Path, io_names: DecoderIO) -> float:
    """Batch 2, left padding in one row, prefill then two cached steps."""
    rng = np.random.default_rng(8)
    sess = ort_session(path)
    ids = rng.integers(0, d.vocab, (2, 7)).astype(np.int64)
    mask = np.ones((2, 7), dtype=np.int64)
    mask[1, :3] = 0
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    past = [(np.zeros((2, d.kv_heads, 0, d.head_dim)), np.zeros((2, d.kv_heads, 0, d.head_dim)))
            for _ in range(d.layers)]
    worst = 0.0
    for step in range(3):
        embeds = w["model.embed_tokens"][ids]
        feed = {io_names.first_input: ids if io_names.first_input == "input_ids" else embeds.astype(F32),
                "attention_mask": mask, "position_ids": pos}
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"] = k.astype(F32)
            feed[f"past_key_values.{i}.value"] = v.astype(F32)
        names = [o.name for o in sess.get_outputs()]
        got = dict(zip(names, sess.run(names, feed)))
        want, past = np_decoder_reference(d, w, embeds, mask, pos, past)
        scale = np.abs(want).max()
        worst = max(worst, float(np.abs(got["logits"] - want).max() / scale))
        for i, (k, v) in enumerate(past):
            worst = max(worst, float(np.abs(got[f"present.{i}.key"] - k).max() / (np.abs(k).max() + 1e-9)))
        ids = got["logits"][:, -1:].argmax(-1).astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], -1)
        pos = pos[:, -1:] + 1
    assert worst < 1e-4, f"decoder differs from the numpy port: rel err {worst}"
    return worst


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

def build_smolvlm_graphs(tmp: Path, dims: VlmDims, rng: np.random.Generator,
                         selfcheck: bool = True) -> "dict[str, Path]":
    """fp32 graphs of one SmolVLM snapshot, written to tmp; returns part -> path.

    With selfcheck, the vision encoder and decoder are compared against the
    numpy ports of transformers' code on inputs the references do not cover
    (padding images, partial pixel masks, left padding, batch 2).
    """
    tw = make_text_weights(rng, dims.text)
    vw = make_vision_weights(rng, dims.vision, dims.text.hidden, dims.scale_factor)
    paths = {}
    for part, build in (
        ("vision_encoder", lambda: build_vision_encoder(dims, vw)),
        ("embed_tokens", lambda: build_embed_tokens(dims.text, tw)),
        ("decoder_model_merged", lambda: build_decoder(dims.text, tw, SMOLVLM_DECODER_IO)),
    ):
        paths[part] = tmp / f"{part}.onnx"
        save_model(build(), paths[part])
    if selfcheck:
        selfcheck_vision(dims, vw, paths["vision_encoder"])
        selfcheck_decoder(dims.text, tw, paths["decoder_model_merged"], SMOLVLM_DECODER_IO)
    return paths


def generate_smolvlm(out: Path, variants, log=print) -> dict:
    import transformers

    snap = out / "smolvlm"
    tok = build_smolvlm_tokenizer()
    dims = tiny_smolvlm_dims(tok.get_vocab_size(with_added_tokens=True))
    tok_ids = write_smolvlm_snapshot_files(snap, dims, tok, transformers.__version__)
    files: "dict[str, dict]" = {}
    with tempfile.TemporaryDirectory(prefix="edgevlm-vlm-") as tmpd:
        paths = build_smolvlm_graphs(Path(tmpd), dims, np.random.default_rng(SEED_SMOLVLM))
        for part, base in paths.items():
            files[part] = write_variants(base, snap / "onnx", part, variants)
    for part, per_var in files.items():
        for var, info in per_var.items():
            p = snap / "onnx" / info["file"]
            info.update(bytes=p.stat().st_size, sha256=sha256_file(p))
        log(f"  smolvlm {part:22s} " + ", ".join(f"{v} {i['bytes'] / 1024:.0f} KiB" for v, i in per_var.items()))
    refs = smolvlm_references(out, snap, dims, variants, files, tok_ids)
    doc = {
        "generator": "models/gen/vlm_models.py",
        "versions": versions(),
        "snapshot": "smolvlm",
        "layout_of": ["HuggingFaceTB/SmolVLM2-256M-Video-Instruct", "HuggingFaceTB/SmolVLM-256M-Instruct"],
        "dims": {"text": asdict(dims.text), "vision": asdict(dims.vision), "scale_factor": dims.scale_factor,
                 "image_seq_len": dims.image_seq_len, "size_longest_edge": dims.size_longest_edge,
                 "max_image_size": dims.max_image_size},
        "token_ids": tok_ids,
        "image_token_id": tok_ids["<image>"],
        "eos_token_ids": {
            "generation_config.eos_token_id (<end_of_utterance>)": tok_ids["<end_of_utterance>"],
            "text_config.eos_token_id (<|im_end|>)": tok_ids["<|im_end|>"],
        },
        "variants": {var: {part: files[part][var]["file"] for part in files} for var in variants},
        "variant_descriptions": {v: VARIANTS[v] for v in variants},
        "files": {f"smolvlm/onnx/{info['file']}": {k: info[k] for k in ("bytes", "sha256", "ops")}
                  for per in files.values() for info in per.values()},
        "interfaces": {part: interface_of(snap / "onnx" / files[part]["fp32"]["file"]) for part in files},
        "loop": {
            "max_new_tokens": MAX_NEW_TOKENS,
            "stop_at_eos": False,
            "argmax": "numpy argmax over logits[0, -1] (first index on ties)",
            "prefill": "inputs_embeds = embed_tokens(input_ids); rows where input_ids == image_token_id are "
                       "replaced, in order, by vision_encoder(pixel_values, pixel_attention_mask)"
                       ".reshape(-1, hidden); attention_mask = ones; past = zeros [1, kv_heads, 0, head_dim]",
            "position_ids": "cumsum(attention_mask) - 1 (0-based, as transformers computes them; the "
                            "SmolVLM model card's ONNX snippet uses cumsum without -1, i.e. 1-based)",
            "step": "inputs_embeds = embed_tokens([[argmax]]); attention_mask gains one 1; position_ids = "
                    "[[last + 1]]; past_key_values.{i}.* = present.{i}.*",
        },
        "onnxruntime_session": "CPUExecutionProvider, intra/inter_op_num_threads=1, ORT_SEQUENTIAL, "
                               "ORT_ENABLE_ALL",
        **refs,
    }
    _dump_json(out / "references" / "smolvlm.json", doc, sort_keys=False)
    return doc


def generate_mistral(out: Path, variants, log=print) -> dict:
    import transformers

    snap = out / "mistral"
    tok = build_mistral_tokenizer()
    d = tiny_mistral_dims(tok.get_vocab_size(with_added_tokens=True))
    write_mistral_snapshot_files(snap, d, tok, transformers.__version__)
    with tempfile.TemporaryDirectory(prefix="edgevlm-mistral-") as tmpd:
        base = Path(tmpd) / "model.onnx"
        weights = make_text_weights(np.random.default_rng(SEED_MISTRAL), d)
        save_model(build_decoder(d, weights, OPTIMUM_DECODER_IO), base)
        selfcheck_decoder(d, weights, base, OPTIMUM_DECODER_IO)
        files = write_variants(base, snap / "onnx", "model", variants)
    for var, info in files.items():
        p = snap / "onnx" / info["file"]
        info.update(bytes=p.stat().st_size, sha256=sha256_file(p))
    log("  mistral model                  " + ", ".join(f"{v} {i['bytes'] / 1024:.0f} KiB"
                                                        for v, i in files.items()))
    refs = mistral_references(out, snap, d, variants, files)
    doc = {
        "generator": "models/gen/vlm_models.py",
        "versions": versions(),
        "snapshot": "mistral",
        "layout_of": "optimum / transformers.js (onnx-community) export of MistralForCausalLM",
        "dims": asdict(d),
        "token_ids": {"<unk>": 0, "<s>": 1, "</s>": 2},
        "eos_token_ids": {"config.eos_token_id (</s>)": 2},
        "variants": {var: files[var]["file"] for var in variants},
        "variant_descriptions": {v: VARIANTS[v] for v in variants},
        "files": {f"mistral/onnx/{info['file']}": {k: info[k] for k in ("bytes", "sha256", "ops")}
                  for info in files.values()},
        "interfaces": {"model": interface_of(snap / "onnx" / files["fp32"]["file"])},
        "tokenization": "text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
                        "tokenize=False); input_ids = tokenizer(text, add_special_tokens=False).input_ids "
                        "(the template already starts with <s>; this is what apply_chat_template(tokenize=True) "
                        "does)",
        "loop": {
            "max_new_tokens": MAX_NEW_TOKENS,
            "stop_at_eos": False,
            "argmax": "numpy argmax over logits[0, -1] (first index on ties)",
            "prefill": "input_ids = prompt ids; attention_mask = ones; past = zeros [1, kv_heads, 0, head_dim]",
            "position_ids": "cumsum(attention_mask) - 1 (0-based, as transformers/optimum compute them)",
            "step": "input_ids = [[argmax]]; attention_mask gains one 1; position_ids = [[last + 1]]; "
                    "past_key_values.{i}.* = present.{i}.*",
        },
        "onnxruntime_session": "CPUExecutionProvider, intra/inter_op_num_threads=1, ORT_SEQUENTIAL, "
                               "ORT_ENABLE_ALL",
        **refs,
    }
    _dump_json(out / "references" / "mistral.json", doc, sort_keys=False)
    return doc


DEFAULT_VARIANTS = ("fp32", "int8", "q4")


def generate(out: Path, variants=DEFAULT_VARIANTS, log=print) -> "tuple[dict, dict]":
    """Regenerate the whole vlm fixture directory (removes what was there)."""
    logging.getLogger().setLevel(logging.ERROR)
    for sub in ("smolvlm", "mistral", "images", "references"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    make_images(out / "images")
    smol = generate_smolvlm(out, variants, log)
    mis = generate_mistral(out, variants, log)
    write_readme(out, smol, mis)
    return smol, mis


def write_readme(out: Path, smol: dict, mis: dict) -> None:
    v = smol["versions"]
    variants = list(smol["variants"])
    suffixes = "{" + ",".join("" if x == "fp32" else f"_{x}" for x in variants) + "}"

    def iface_table(iface: dict) -> "list[str]":
        rows = ["| | name | dtype | dims |", "| --- | --- | --- | --- |"]
        for kind in ("inputs", "outputs"):
            entries = iface[kind]
            shown = [e for e in entries if not (e["name"].startswith(("past_key_values.", "present."))
                                                and not e["name"].startswith(("past_key_values.0.", "present.0.")))]
            for e in shown:
                dims = ", ".join(str(x) for x in e["dims"])
                name = e["name"].replace(".0.", ".{i}.")
                rows.append(f"| {kind[:-1]} | `{name}` | {e['dtype']} | [{dims}] |")
        return rows

    lines = [
        "# VLM / LLM snapshot fixtures",
        "",
        "Generated by `python3 models/gen/vlm_models.py` (also run by `models/gen/generate.py`",
        "unless `--skip-vlm`; a few seconds). Do not edit by hand. Deterministic: rerunning with",
        "the pinned versions in `models/gen/requirements.txt` reproduces the same bytes, and",
        "`python3 models/gen/vlm_models.py --check` regenerates into a temporary directory and",
        "diffs. Before writing, the fp32 vision encoder and decoders are checked against numpy",
        "ports of transformers' code on inputs the references do not cover (padding images,",
        "partial pixel masks, non-square input, batch 2 with left padding): max rel. err < 1e-4.",
        "Same-layout graphs at the real SmolVLM2-256M size, for benchmarks only:",
        "`python3 models/gen/vlm_bench.py --out DIR` (not committed).",
        "",
        "Tiny **random-weight** models whose files have exactly the layout and the graph",
        "interfaces (input/output names, dtypes, ranks, symbolic dim names, quantized operator",
        "families) of the real public exports, plus what the real Python libraries",
        f"(transformers {v['transformers']}, tokenizers {v['tokenizers']}, onnxruntime {v['onnxruntime']})",
        "say about them. The generated text is gibberish; the token ids are the point.",
        "",
        "## `smolvlm/`: HuggingFaceTB/SmolVLM2-256M-Video-Instruct layout",
        "",
        "`config.json` (SmolVLMForConditionalGeneration, llama `text_config`, `smolvlm_vision`",
        "`vision_config`), `generation_config.json`, `preprocessor_config.json`",
        "(SmolVLMImageProcessor keys incl. `video_sampling`), `processor_config.json`",
        "(`image_seq_len`), `chat_template.json` (the real SmolVLM2 template), `tokenizer.json`,",
        "`tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json`, and",
        f"`onnx/{{vision_encoder,embed_tokens,decoder_model_merged}}{suffixes}.onnx`.",
        "",
        f"Dims: text hidden {smol['dims']['text']['hidden']}, {smol['dims']['text']['layers']} layers, "
        f"{smol['dims']['text']['heads']} heads / {smol['dims']['text']['kv_heads']} kv heads, head_dim "
        f"{smol['dims']['text']['head_dim']}, intermediate {smol['dims']['text']['intermediate']}, vocab "
        f"{smol['dims']['text']['vocab']}; vision hidden {smol['dims']['vision']['hidden']}, "
        f"{smol['dims']['vision']['layers']} layers, image_size {smol['dims']['vision']['image_size']}, patch "
        f"{smol['dims']['vision']['patch_size']}, scale_factor {smol['dims']['scale_factor']} -> image_seq_len "
        f"{smol['dims']['image_seq_len']}; preprocessor size.longest_edge {smol['dims']['size_longest_edge']}, "
        f"max_image_size.longest_edge {smol['dims']['max_image_size']} (up to 3x3 tiles + the global image).",
        "",
        "Tokenizer: byte-level BPE trained here (SmolLM2 style: digits split, GPT-2 byte alphabet,",
        f"{SMOLVLM_BASE_VOCAB} base tokens incl. SmolLM2's 17 specials at ids 0..16) + SmolVLM's 128 added",
        "tokens in the real order (`<global-img>`, `<row_r_col_c>` x36, `<fake_token_around_image>`,",
        "`<image>`, `<|reserved_special_token_0..87|>`, `<end_of_utterance>`). Ids differ from the real",
        f"model; `config.json` matches this tokenizer (`image_token_id` = {smol['image_token_id']}).",
        "",
    ]
    for part in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
        lines += [f"### `{part}`", ""] + iface_table(smol["interfaces"][part]) + [""]
    lines += [
        "`vision_encoder`: flattens [batch, num_images], drops padding images (all pixels 0) like",
        "`SmolVLMModel`, turns `pixel_attention_mask` into a patch mask (any valid pixel) that drives",
        "both the bucketized position ids and an additive key bias (0 / float32 min), runs the pre-LN",
        "SigLIP layers (tanh GELU), post-LN, pixel shuffle by `scale_factor` and the bias-free",
        "projection. `image_features` rows, reshaped to (-1, hidden), replace the `<image>` token",
        "embeddings in order. `decoder_model_merged` has no `use_cache_branch`: the first step",
        "passes empty (length 0) past tensors. The padding mask is broadcast, so an",
        "`attention_mask` of width 1 also runs (the SmolVLM model card's ONNX loop passes",
        "`np.ones_like(input_ids)`, i.e. [1, 1], while decoding).",
        "",
        "Not verifiable from public text: the symbolic names and rank of `image_features`",
        "(transformers' connector returns [images, image_seq_len, hidden]; transformers.js and the",
        "model card both flatten it with reshape(-1, hidden), which works for rank 2 or 3).",
        "",
        "## `mistral/`: optimum / transformers.js MistralForCausalLM layout",
        "",
        "`config.json` (MistralForCausalLM, `sliding_window: null` as in v0.2), `generation_config.json`,",
        "`tokenizer.json` (BPE with `byte_fallback`, `▁` via Prepend/Replace normalizer, `<unk>`/`<s>`/`</s>`",
        "= 0/1/2, `<0x00>`..`<0xFF>` = 3..258; `[INST]`/`[/INST]` are plain text as in v0.2),",
        "`tokenizer_config.json` (LlamaTokenizer, the real Mistral-7B-Instruct-v0.2 `chat_template`),",
        f"`special_tokens_map.json`, `onnx/model{suffixes}.onnx`.",
        "",
    ] + iface_table(mis["interfaces"]["model"]) + [
        "",
        "## Variants (suffixes as in the real repositories)",
        "",
        "| suffix | what |",
        "| --- | --- |",
        "| (none) | float32 |",
        "| `_int8` | transformers.js `int8`: onnxruntime dynamic quantization, QInt8 weights, every IntegerOps type (MatMul -> DynamicQuantizeLinear + MatMulInteger, Gather -> int8 table + DequantizeLinear), per-tensor, `MatMulConstBOnly` |",
        "| `_uint8` | same with QUInt8 weights; the vision patch Conv becomes ConvInteger" + (
            "" if "uint8" in variants else " (not committed, for size: `vlm_models.py --variants "
            "fp32,int8,uint8,q4` writes it; u8 MatMulInteger/ConvInteger are covered by fixtures/int8_dynamic)") + " |",
        "| `_q4` | `com.microsoft.MatMulNBits` (bits 4, block 32, symmetric, no zero points); Gather/Conv stay float |",
        "",
        "The real `_int8` vision encoder would also carry a ConvInteger with int8 weights, which",
        "onnxruntime's CPU provider cannot load; here the patch Conv stays float in `_int8`",
        "(`_uint8` has the ConvInteger). The real repos also ship `_quantized` (= `_int8` for",
        "embed/decoder, `_uint8` for the vision encoder, i.e. byte-identical recipes), `_fp16`,",
        "`_q4f16` and `_bnb4`; those are not generated.",
        "",
        "## `images/`",
        "",
        "| file | size (w x h) |",
        "| --- | --- |",
    ]
    for name, w, h, *_ in IMAGES:
        lines.append(f"| `{name}` | {w} x {h} |")
    lines += [
        "",
        "Rendered metal parts; JPEGs are quality 90 with 4:4:4 chroma.",
        "",
        "## `references/`",
        "",
        "`smolvlm.json` and `mistral.json` record the versions used, dims, variant file names, the",
        "graph interfaces, sha256 of every graph, the decoding loop, and per case:",
        "",
        "* smolvlm: the image, prompt, `messages`, `prompt_text` (`processor.apply_chat_template(",
        "  messages, add_generation_prompt=True)`), `expanded_prompt` and `input_ids` (from",
        "  `processor(text=prompt_text, images=[image])`), `rows`/`cols` (from the image processor",
        "  with `return_row_col_info`), `pixel_values` (.npy float32 [1, tiles, 3, 32, 32], exactly",
        "  as the processor returns it), `pixel_attention_mask` (.npy bool [1, tiles, 32, 32]; the",
        "  processor returns int64, the graph takes bool), the PIL-decoded RGB (.npy uint8, to",
        "  tell JPEG-decoder differences from preprocessing differences), fp32 `image_features` and",
        "  prefill last-position logits (.npy), and greedy ids per variant. `*_nosplit` is the",
        "  square image processed by a copy of the snapshot whose `preprocessor_config.json` says",
        "  `do_image_splitting: false` (recorded as `preprocessor_config_overrides`; the image is",
        "  then squashed to one max_image_size tile and the prompt has no row/col tokens).",
        "* mistral: `messages`, `prompt_text`, `input_ids` (`tokenizer(prompt_text,",
        "  add_special_tokens=False)`, identical to `apply_chat_template(tokenize=True)`), tokens,",
        "  fp32 prefill last-position logits (.npy) and greedy ids per variant.",
        "",
        f"Greedy decoding: {MAX_NEW_TOKENS} new tokens, never stopped at EOS, argmax of the last",
        "logits, `position_ids = cumsum(attention_mask) - 1`, KV cache fed back;",
        "`greedy_top2_margins` holds the gap between the two best logits at each step and",
        "`greedy_top2_margin_min` the smallest one (small gaps are where another runtime may",
        "legitimately pick a different token). The model card's own ONNX loop uses 1-based",
        "`position_ids = cumsum(attention_mask)`; transformers (and these references) use 0-based.",
        "onnxruntime: CPU provider, one thread, ORT_ENABLE_ALL. Other CPUs can differ in the last",
        "bits (kernels differ), which only matters where that margin is tiny.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def check(committed: Path) -> int:
    """Regenerate with the variants the committed references list and diff every file."""
    variants = tuple(json.loads((committed / "references" / "smolvlm.json").read_text())["variants"])
    with tempfile.TemporaryDirectory(prefix="edgevlm-vlm-check-") as tmpd:
        fresh = Path(tmpd) / "vlm"
        generate(fresh, variants, log=lambda _msg: None)
        want = {p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file()}
        have = {p.relative_to(committed) for p in committed.rglob("*") if p.is_file()}
        problems = [f"missing: {p}" for p in sorted(want - have)]
        problems += [f"unexpected: {p}" for p in sorted(have - want)]
        problems += [f"differs: {p}" for p in sorted(want & have)
                     if (fresh / p).read_bytes() != (committed / p).read_bytes()]
    for line in problems:
        print(line)
    print(f"{len(want)} files regenerated, {len(problems)} problem(s)")
    return 1 if problems else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "fixtures" / "vlm"),
                    help="output directory (default: models/fixtures/vlm)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated subset of {','.join(VARIANTS)} (default: %(default)s)")
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary directory and compare byte for byte with --out "
                         "(exit 1 on any difference); nothing in --out is touched")
    args = ap.parse_args()
    if args.check:
        return check(Path(args.out))
    variants = tuple(args.variants.split(","))
    unknown = set(variants) - set(VARIANTS)
    if unknown or "fp32" not in variants:
        ap.error(f"--variants must include fp32 and only name {sorted(VARIANTS)}")
    t0 = time.time()
    out = Path(args.out)
    generate(out, variants)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"vlm fixtures: {out} ({total / 1024:.0f} KiB, {time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
