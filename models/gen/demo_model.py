"""Demo model package: a tiny CNN that inspects synthetic metal plates.

The classifier is trained here, in plain numpy with hand-written backprop,
so the package can be regenerated anywhere without a deep-learning stack or
a model hub. Training and every reference use exactly the preprocessing the
Rust runtime implements (see PREPROCESS below and models/demo/model.toml).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import parts
from common import OPSET, finalize_model, ort_session, save_model, sha256_file

SEED_TRAIN = 1001
SEED_HELDOUT = 2002
SEED_SAMPLES = 3003
SEED_INIT = 4004

N_TRAIN_PER_CLASS = 900
N_HELDOUT_PER_CLASS = 200
SAMPLES_PER_CLASS = 4
SAMPLE_MIN_PROB = 0.8
INPUT = 64
MEAN = np.float32(0.5)
STD = np.float32(0.25)
SCALE = np.float32(0.00392156862745098)  # 1/255, as written in model.toml

# 3x3 conv layers (output channels, followed by 2x2 max pool?). Four levels
# give a receptive field of ~40 px at 64x64, enough to relate a plate corner
# to the hole that should be next to it.
LAYERS = [(8, True), (16, True), (32, True), (32, False)]
EPOCHS = 20
BATCH = 32
LR = 3e-3


# --------------------------------------------------------------------------
# Preprocessing contract (must match the Rust runtime)
# --------------------------------------------------------------------------

def preprocess(img: Image.Image) -> np.ndarray:
    """RGB8 -> bilinear stretch to 64x64 -> *1/255 -> (x-mean)/std -> CHW float32."""
    rgb = img.convert("RGB").resize((INPUT, INPUT), Image.BILINEAR)
    x = np.asarray(rgb, dtype=np.float32) * SCALE
    x = (x - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def jpeg_roundtrip(arr: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Decode(encode(image)) so training also sees JPEG artefacts."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=int(rng.integers(80, 96)),
                              subsampling=int(rng.choice([0, 2])))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def make_dataset(seed: int, per_class: int, jpeg_fraction: float):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(per_class):
        for y, label in enumerate(parts.LABELS):
            arr = parts.render(rng, label)
            img = jpeg_roundtrip(arr, rng) if rng.random() < jpeg_fraction else Image.fromarray(arr)
            xs.append(preprocess(img))
            ys.append(y)
    return np.stack(xs), np.array(ys, dtype=np.int64)


# --------------------------------------------------------------------------
# Tiny CNN in numpy (NHWC internally; exported as NCHW ONNX)
# --------------------------------------------------------------------------

def _im2col(x: np.ndarray) -> np.ndarray:
    """3x3, stride 1, pad 1 patches: (B,H,W,C) -> (B*H*W, 9*C), tap-major."""
    b, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = np.empty((b, h, w, 9, c), dtype=x.dtype)
    for k in range(9):
        i, j = divmod(k, 3)
        cols[:, :, :, k, :] = xp[:, i:i + h, j:j + w, :]
    return cols.reshape(b * h * w, 9 * c)


def _col2im(dcols: np.ndarray, shape) -> np.ndarray:
    b, h, w, c = shape
    dcols = dcols.reshape(b, h, w, 9, c)
    dxp = np.zeros((b, h + 2, w + 2, c), dtype=dcols.dtype)
    for k in range(9):
        i, j = divmod(k, 3)
        dxp[:, i:i + h, j:j + w, :] += dcols[:, :, :, k, :]
    return dxp[:, 1:h + 1, 1:w + 1, :]


def _pool_fwd(x):
    b, h, w, c = x.shape
    r = x.reshape(b, h // 2, 2, w // 2, 2, c)
    m = r.max(axis=(2, 4))
    return m, (r, m)


def _pool_bwd(dout, cache):
    r, m = cache
    mask = r == m[:, :, None, :, None, :]
    d = mask * dout[:, :, None, :, None, :]
    b, h2, _, w2, _, c = r.shape
    return d.reshape(b, h2 * 2, w2 * 2, c)


def init_params(rng: np.random.Generator) -> "dict[str, np.ndarray]":
    def he(o, fan_in):
        return (rng.standard_normal((o, fan_in)) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    p = {}
    cin = 3
    for i, (cout, _) in enumerate(LAYERS):
        p[f"w{i}"] = he(cout, 9 * cin)
        p[f"b{i}"] = np.zeros(cout, np.float32)
        cin = cout
    p["wd"] = (rng.standard_normal((2 * cin, 3)) * np.sqrt(1.0 / (2 * cin))).astype(np.float32)
    p["bd"] = np.zeros(3, np.float32)
    return p


def forward(p, x, train=False):
    """x: (B,64,64,3) NHWC. Returns logits (and a cache for backward)."""
    caches = []
    h = x
    for i, (cout, pool) in enumerate(LAYERS):
        b, hh, ww, _ = h.shape
        cols = _im2col(h)
        a = np.maximum(cols @ p[f"w{i}"].T + p[f"b{i}"], 0).reshape(b, hh, ww, cout)
        pc = None
        if pool:
            out, pc = _pool_fwd(a)
        else:
            out = a
        caches.append((h.shape, cols, a, pc))
        h = out
    # Average pooling counts holes (missing_hole lowers a "hole" channel by
    # a quarter); max pooling catches a single thin scratch anywhere.
    avg = h.mean(axis=(1, 2))
    mx = h.max(axis=(1, 2))
    feats = np.concatenate([avg, mx], axis=1)
    logits = feats @ p["wd"] + p["bd"]
    if not train:
        return logits
    return logits, (caches, h, mx, feats)


def backward(p, cache, dlogits):
    caches, h, mx, feats = cache
    c = h.shape[-1]
    g = {"wd": feats.T @ dlogits, "bd": dlogits.sum(0)}
    dfeats = dlogits @ p["wd"].T
    davg, dmx = dfeats[:, :c], dfeats[:, c:]
    dh = np.broadcast_to(davg[:, None, None, :] / (h.shape[1] * h.shape[2]), h.shape) \
        + (h == mx[:, None, None, :]) * dmx[:, None, None, :]
    for i in range(len(LAYERS) - 1, -1, -1):
        in_shape, cols, a, pc = caches[i]
        da = _pool_bwd(dh, pc) if pc is not None else dh
        dz = (da * (a > 0)).reshape(-1, a.shape[-1])
        g[f"w{i}"], g[f"b{i}"] = dz.T @ cols, dz.sum(0)
        if i > 0:  # the image itself needs no gradient
            dh = _col2im(dz @ p[f"w{i}"], in_shape)
    return {k: v.astype(np.float32) for k, v in g.items()}


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def train(x_nchw: np.ndarray, y: np.ndarray, log) -> "dict[str, np.ndarray]":
    rng = np.random.default_rng(SEED_INIT)
    p = init_params(rng)
    x = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    b1, b2, eps, wdecay = 0.9, 0.999, 1e-8, 1e-4
    n = len(x)
    steps_per_epoch = n // BATCH
    total = EPOCHS * steps_per_epoch
    step = 0
    for epoch in range(EPOCHS):
        t0 = time.time()
        order = rng.permutation(n)
        loss_sum, correct = 0.0, 0
        for s in range(steps_per_epoch):
            idx = np.sort(order[s * BATCH:(s + 1) * BATCH])
            xb = x[idx]
            # The classes do not depend on orientation: free augmentation
            # with flips and 90-degree turns of the whole batch.
            k = int(rng.integers(0, 4))
            xb = np.rot90(xb, k, axes=(1, 2))
            if rng.random() < 0.5:
                xb = xb[:, :, ::-1]
            xb = np.ascontiguousarray(xb)
            yb = y[idx]
            logits, cache = forward(p, xb, train=True)
            prob = softmax(logits)
            loss_sum += float(-np.log(prob[np.arange(len(yb)), yb] + 1e-12).sum())
            correct += int((prob.argmax(1) == yb).sum())
            d = prob
            d[np.arange(len(yb)), yb] -= 1
            grads = backward(p, cache, (d / len(yb)).astype(np.float32))
            # Adam with cosine learning-rate decay.
            step += 1
            lr = LR * 0.5 * (1 + np.cos(np.pi * step / total))
            for key in p:
                gk = grads[key] + (wdecay * p[key] if key.startswith("w") else 0)
                m[key] = b1 * m[key] + (1 - b1) * gk
                v[key] = b2 * v[key] + (1 - b2) * gk * gk
                mh = m[key] / (1 - b1 ** step)
                vh = v[key] / (1 - b2 ** step)
                p[key] = (p[key] - lr * mh / (np.sqrt(vh) + eps)).astype(np.float32)
        seen = steps_per_epoch * BATCH
        log(f"  epoch {epoch + 1:2d}/{EPOCHS}: loss {loss_sum / seen:.4f} "
            f"train acc {correct / seen:.4f} ({time.time() - t0:.1f}s)")
    return p


# --------------------------------------------------------------------------
# ONNX export
# --------------------------------------------------------------------------

def export_onnx(p) -> onnx.ModelProto:
    def conv_w(w, cin):
        # (O, 9*C) tap-major -> ONNX (O, C, 3, 3)
        return np.ascontiguousarray(w.reshape(-1, 3, 3, cin).transpose(0, 3, 1, 2))

    n = helper.make_node
    nodes, inits = [], []
    prev, cin = "image", 3
    for i, (cout, pool) in enumerate(LAYERS):
        k = i + 1
        nodes.append(n("Conv", [prev, f"conv{k}.w", f"conv{k}.b"], [f"c{k}"], name=f"conv{k}",
                       kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(n("Relu", [f"c{k}"], [f"r{k}"], name=f"relu{k}"))
        prev = f"r{k}"
        if pool:
            nodes.append(n("MaxPool", [prev], [f"p{k}"], name=f"pool{k}",
                           kernel_shape=[2, 2], strides=[2, 2]))
            prev = f"p{k}"
        inits.append(numpy_helper.from_array(conv_w(p[f"w{i}"], cin), f"conv{k}.w"))
        inits.append(numpy_helper.from_array(p[f"b{i}"], f"conv{k}.b"))
        cin = cout
    nodes += [
        n("GlobalAveragePool", [prev], ["gap"], name="gap"),
        n("GlobalMaxPool", [prev], ["gmp"], name="gmp"),
        n("Concat", ["gap", "gmp"], ["feat4d"], name="concat", axis=1),
        n("Flatten", ["feat4d"], ["feat"], name="flatten", axis=1),
        n("Gemm", ["feat", "fc.w", "fc.b"], ["logits"], name="fc"),
        n("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    inits += [
        numpy_helper.from_array(np.ascontiguousarray(p["wd"]), "fc.w"),
        numpy_helper.from_array(p["bd"], "fc.b"),
    ]
    graph = helper.make_graph(
        nodes, "demo_parts",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, INPUT, INPUT])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", len(parts.LABELS)])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edgevlm-models-gen", producer_version="1")
    model.doc_string = "Synthetic metal plate inspection: ok / scratch / missing_hole"
    return finalize_model(model)


def ort_probs(sess, x: np.ndarray, chunk: int = 100) -> np.ndarray:
    return np.concatenate([sess.run(["probs"], {"image": x[i:i + chunk]})[0]
                           for i in range(0, len(x), chunk)])


# --------------------------------------------------------------------------
# Package files
# --------------------------------------------------------------------------

MODEL_TOML = """\
[model]
name = "demo-parts"
version = "1.0.0"
task = "classification"
variant = "fp32"
description = "Synthetic metal plate inspection: ok / scratch / missing_hole (trained by models/gen/generate.py)"

[[graph]]
role = "main"
file = "model.onnx"
sha256 = "{sha256}"

[input]
tensor = "image"
width = 64
height = 64
layout = "NCHW"
channels = "RGB"
resize = "stretch"
filter = "bilinear"
scale = 0.00392156862745098   # multiply u8 pixels by this first (1/255)
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]

[output]
tensor = "probs"
decode = "probabilities"
labels = ["ok", "scratch", "missing_hole"]

[verdict]
# NG when any listed label reaches its minimum probability; OK otherwise
ng = {{ scratch = 0.5, missing_hole = 0.5 }}
"""


def write_samples(samples_dir: Path, sess) -> "tuple[list[dict], int]":
    """Render sample images, alternating PNG and JPEG (q90), with their ORT probs.

    The samples demonstrate the product, and the runtime's tests compare
    their verdicts exactly, so they must be clear cases: an image whose true
    class gets less than SAMPLE_MIN_PROB (after saving and decoding it again)
    is redrawn. Model quality is measured on the unfiltered held-out set, not
    here. Returns the expected.json entries and how many draws were rejected.
    """
    if samples_dir.exists():
        for f in samples_dir.iterdir():
            f.unlink()
    samples_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED_SAMPLES)
    entries, rejected = [], 0
    for y, label in enumerate(parts.LABELS):
        for i in range(1, SAMPLES_PER_CLASS + 1):
            while True:
                img = Image.fromarray(parts.render(rng, label))
                if i % 2:
                    name = f"{label}_{i:02d}.png"
                    img.save(samples_dir / name, "PNG", optimize=True)
                else:
                    name = f"{label}_{i:02d}.jpg"
                    # 4:4:4 chroma avoids decoder-specific chroma upsampling,
                    # so other JPEG decoders reproduce the pixels closely.
                    img.save(samples_dir / name, "JPEG", quality=90, subsampling=0)
                x = preprocess(Image.open(samples_dir / name))[None]
                probs = sess.run(["probs"], {"image": x})[0][0]
                if probs[y] >= SAMPLE_MIN_PROB:
                    break
                rejected += 1
            entries.append({"file": name, "label": label, "probs": [float(v) for v in probs]})
    return entries, rejected


def truncated_jpeg_source() -> bytes:
    """A real JPEG of a part, for fixtures/bad/truncated.jpg."""
    buf = io.BytesIO()
    Image.fromarray(parts.render(np.random.default_rng(5005), "ok")).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def generate(out: Path, log=print) -> dict:
    demo = out / "demo"
    demo.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    x_train, y_train = make_dataset(SEED_TRAIN, N_TRAIN_PER_CLASS, jpeg_fraction=0.3)
    x_held, y_held = make_dataset(SEED_HELDOUT, N_HELDOUT_PER_CLASS, jpeg_fraction=0.3)
    log(f"demo: rendered {len(x_train)} training / {len(x_held)} held-out images "
        f"({time.time() - t0:.1f}s)")

    t0 = time.time()
    params = train(x_train, y_train, log)
    train_s = time.time() - t0
    log(f"demo: trained in {train_s:.1f}s")

    model = export_onnx(params)
    model_path = demo / "model.onnx"
    save_model(model, model_path)
    sess = ort_session(model_path)

    # The exported graph must compute what was trained.
    ref = softmax(forward(params, np.ascontiguousarray(x_held[:64].transpose(0, 2, 3, 1))))
    diff = float(np.abs(ort_probs(sess, x_held[:64]) - ref).max())
    assert diff < 1e-4, f"ONNX export disagrees with numpy model: {diff}"

    probs = ort_probs(sess, x_held)
    pred = probs.argmax(1)
    acc = float((pred == y_held).mean())
    confusion = np.zeros((3, 3), dtype=int)
    for t, p_ in zip(y_held, pred):
        confusion[t, p_] += 1
    log(f"demo: held-out accuracy (onnxruntime) {acc:.4f} on {len(y_held)} images")
    assert acc >= 0.95, f"demo model too weak: held-out accuracy {acc:.4f}"

    expected, rejected = write_samples(demo / "samples", sess)
    (demo / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    log(f"demo: {len(expected)} samples written ({rejected} unclear draws redrawn)")

    (demo / "model.toml").write_text(MODEL_TOML.format(sha256=sha256_file(model_path)))
    write_readme(demo, acc, confusion, len(x_train), len(y_held), len(expected), rejected)
    return {"accuracy": acc, "confusion": confusion, "samples": len(expected),
            "samples_rejected": rejected, "train_seconds": train_s}


def write_readme(demo: Path, acc, confusion, n_train, n_held, n_samples, rejected):
    labels = parts.LABELS
    arch_parts, cin = [], 3
    for cout, pool in LAYERS:
        arch_parts.append(f"Conv3x3({cin}->{cout})+Relu" + ("+MaxPool2" if pool else ""))
        cin = cout
    arch = ", ".join(arch_parts)
    conf_rows = ["| true \\ predicted | " + " | ".join(labels) + " |",
                 "|---|" + "---|" * len(labels)]
    for i, lab in enumerate(labels):
        conf_rows.append(f"| {lab} | " + " | ".join(str(v) for v in confusion[i]) + " |")
    text = f"""# Demo model package: `demo-parts`

The embedded default model of edgevlm. Generated by `python3 models/gen/generate.py`
(from the repository root); do not edit by hand.

## Task

Synthetic industrial inspection of a light metal plate with four drilled holes,
photographed on a dark conveyor (random position, rotation, lighting, colour
balance, vignetting, blur, sensor noise and dust specks). Classes:

* `ok`: intact plate,
* `scratch`: a thin bright or dark straight or curved line on the surface,
* `missing_hole`: one of the four holes is absent.

## Model

`model.onnx` (fp32, opset {OPSET}, IR version 9, standard ops only):
{arch},
GlobalAveragePool and GlobalMaxPool concatenated, Gemm({2 * LAYERS[-1][0]}->3), Softmax.

* input `image`: float32 `[batch, 3, 64, 64]`, NCHW, RGB
* output `probs`: float32 `[batch, 3]`, softmax over `{labels}`

Trained in numpy by the generator (hand-written backprop, Adam, {EPOCHS} epochs,
{n_train} rendered images, 30% of them JPEG round-tripped; fixed seeds).

**Held-out accuracy (onnxruntime, {n_held} images never seen in training): {acc * 100:.2f}%**

{chr(10).join(conf_rows)}

## Preprocessing contract

Used for training and for every reference number here; the runtime implements
the same from `model.toml`:

1. decode the image to RGB8,
2. resize (stretch, aspect ratio not kept) to 64x64 with bilinear filtering,
   exactly as PIL `Image.resize((64, 64), Image.BILINEAR)`: when downscaling PIL
   widens the triangle filter by the scale factor (antialiasing), uses 22-bit
   fixed-point weights, runs the horizontal pass first, and rounds the
   intermediate and final results to u8. `models/gen/pil_resize.py` spells this
   out in a few lines of numpy, and `models/gen/verify.py` checks it is
   bit-identical to PIL,
3. convert to float32 and multiply by 1/255,
4. subtract mean 0.5 and divide by std 0.25 (all channels),
5. lay out as NCHW.

## Samples

`samples/` holds {n_samples} 96x96 images rendered with a seed not used for
training or evaluation, PNG and JPEG (quality 90, 4:4:4 chroma). File names
start with the true label. `expected.json` lists, for every sample, the label
and the onnxruntime `probs` for the tensor preprocessed as above (decoded
by PIL).

The samples are clear cases on purpose: a draw whose true class got less than
{SAMPLE_MIN_PROB} was redrawn ({rejected} of {n_samples + rejected} draws), so every
sample's verdict is robust to small decoder/resizer differences. The accuracy
above is measured on the unfiltered held-out set.

A decoder or resizer that differs from PIL by a grey level here and there
moves these probabilities slightly; compare with a tolerance (e.g. 1e-2)
and compare the verdicts exactly.
"""
    (demo / "README.md").write_text(text)
