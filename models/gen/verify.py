#!/usr/bin/env python3
"""Check the committed models against onnxruntime, without regenerating them.

    python3 models/gen/verify.py [--dir models]

* every fixture in fixtures/fixtures.toml loads in onnxruntime and reproduces
  its expected outputs within the fixture's atol,
* the declared op families are really in each quantized graph,
* every model is IR version 8..10 with default-domain opset 17,
* the demo package's sha256, model.toml and expected.json are consistent.

Exit status 0 when all checks pass.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tomllib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_model, op_histogram, ort_session, sha256_file  # noqa: E402
from demo_model import preprocess  # noqa: E402
from pil_resize import resize_bilinear  # noqa: E402

# Ops each variant must contain (the point of having the variant).
REQUIRED_OPS = {
    "int8_dynamic": ["DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"],
    "int8_dynamic_per_channel": ["DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"],
    "qdq_conv_matmul": ["QuantizeLinear", "DequantizeLinear"],
    "qdq_softmax": ["QuantizeLinear", "DequantizeLinear", "Softmax"],
    "q4": ["com.microsoft.MatMulNBits"],
}


def check_versions(model, what: str, failures: list) -> None:
    if not 8 <= model.ir_version <= 10:
        failures.append(f"{what}: ir_version {model.ir_version}")
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if default != [17]:
        failures.append(f"{what}: default opset {default}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="models")
    args = ap.parse_args()
    root = Path(args.dir)
    failures: "list[str]" = []

    fx_dir = root / "fixtures"
    index = tomllib.loads((fx_dir / "fixtures.toml").read_text())
    for fx in index["fixture"]:
        model_path = fx_dir / fx["model"]
        model = load_model(model_path)
        check_versions(model, fx["name"], failures)
        hist = op_histogram(model)
        for op in REQUIRED_OPS.get(fx["name"], []):
            if op not in hist:
                failures.append(f"{fx['name']}: missing op {op}")
        sess = ort_session(model_path)
        feeds = {k: np.load(fx_dir / v) for k, v in fx["inputs"].items()}
        names = list(fx["outputs"])
        for name, got in zip(names, sess.run(names, feeds)):
            want = np.load(fx_dir / fx["outputs"][name])
            err = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
            status = "ok" if err <= fx["atol"] else "FAIL"
            if status != "ok":
                failures.append(f"{fx['name']}/{name}: max abs err {err} > atol {fx['atol']}")
            print(f"{fx['name']:26s} {name:7s} shape {tuple(got.shape)} max|err| {err:.2e} {status}")

    demo = root / "demo"
    manifest = tomllib.loads((demo / "model.toml").read_text())
    graph = manifest["graph"][0]
    if sha256_file(demo / graph["file"]) != graph["sha256"]:
        failures.append("demo: sha256 in model.toml does not match model.onnx")
    model = load_model(demo / graph["file"])
    check_versions(model, "demo", failures)
    sess = ort_session(demo / graph["file"])
    labels = manifest["output"]["labels"]
    correct = 0
    entries = json.loads((demo / "expected.json").read_text())
    for entry in entries:
        x = preprocess(Image.open(demo / "samples" / entry["file"]))[None]
        probs = sess.run([manifest["output"]["tensor"]], {manifest["input"]["tensor"]: x})[0][0]
        err = float(np.abs(probs - np.array(entry["probs"])).max())
        if err > 1e-5:
            failures.append(f"demo/{entry['file']}: probs differ by {err}")
        correct += labels[int(np.argmax(probs))] == entry["label"]
        if not entry["file"].startswith(entry["label"] + "_"):
            failures.append(f"demo/{entry['file']}: name does not start with label {entry['label']}")
    print(f"demo: {correct}/{len(entries)} samples classified as their label")

    # The documented bilinear resize must be PIL's, bit for bit: on the
    # samples and on random images up- and downscaled to odd sizes.
    rng = np.random.default_rng(0)
    images = [np.asarray(Image.open(demo / "samples" / e["file"]).convert("RGB")) for e in entries]
    images += [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(480, 640), (37, 23), (64, 64), (5, 200)]]
    mismatches = 0
    for img in images:
        for w, h in [(64, 64), (97, 31)]:
            want = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
            mismatches += int(not np.array_equal(resize_bilinear(img, w, h), want))
    if mismatches:
        failures.append(f"pil_resize: {mismatches} resize(s) differ from PIL")
    print(f"pil_resize: {2 * len(images) - mismatches}/{2 * len(images)} resizes identical to PIL")

    for f in failures:
        print("FAIL:", f)
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
