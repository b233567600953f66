#!/usr/bin/env python3
"""ONNX Runtime side of the edgevlm benchmark.

    python3 ci/bench_ort.py --model M.onnx [--input NAME=FILE.npy ...] [--repeat N] [--threads 1]

Loads the model, runs once to warm up, then times N runs and prints ONE JSON
line on stdout, comparable with the numbers the Rust runtime reports:

    {"runtime": "onnxruntime", "version": ..., "model": ..., "load_ms": ...,
     "min_ms": ..., "median_ms": ..., "max_ms": ..., "peak_rss_kb": ...}

Inputs not given on the command line are filled with seeded random data of
the declared dtype and shape (symbolic dimensions become 1), so any model can
be benchmarked without preparing data.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

# ORT type strings -> numpy dtypes for the input kinds models actually take.
ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def parse_inputs(specs: "list[str]") -> "dict[str, np.ndarray]":
    feeds = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--input expects NAME=FILE.npy, got {spec!r}")
        feeds[name] = np.load(path, allow_pickle=False)
    return feeds


def random_input(meta, rng: np.random.Generator) -> np.ndarray:
    dtype = ORT_TO_NUMPY.get(meta.type)
    if dtype is None:
        raise SystemExit(f"input {meta.name!r}: unsupported type {meta.type}; pass it with --input")
    # Symbolic (str) or unknown (None) dims are taken as 1: batch 1 is the
    # edge-inference case being compared.
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in meta.shape]
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype is np.bool_:
        return rng.random(shape) < 0.5
    # Small non-negative integers stay valid as indices/token ids for most models.
    return rng.integers(0, 10, size=shape).astype(dtype)


def current_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description="Benchmark a model with ONNX Runtime (CPU).")
    ap.add_argument("--model", required=True, help="path to the .onnx file")
    ap.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                    help="input tensor from a .npy file (repeatable)")
    ap.add_argument("--repeat", type=int, default=20, help="timed runs after one warm-up (default 20)")
    ap.add_argument("--threads", type=int, default=1, help="intra/inter-op threads (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed for generated inputs")
    args = ap.parse_args()
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")

    feeds = parse_inputs(args.input)

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = args.threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # keep ORT warnings off the JSON line's stream

    # RSS with Python, numpy and onnxruntime imported but no model: a native ORT
    # deployment does not pay for the interpreter, so the report compares growth.
    base_rss_kb = current_rss_kb()
    t0 = time.perf_counter()
    sess = ort.InferenceSession(args.model, sess_options=so, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t0) * 1e3

    known = {i.name for i in sess.get_inputs()}
    unknown = sorted(set(feeds) - known)
    if unknown:
        raise SystemExit(f"unknown input(s) {unknown}; model inputs are {sorted(known)}")
    rng = np.random.default_rng(args.seed)
    for meta in sess.get_inputs():
        if meta.name not in feeds:
            feeds[meta.name] = random_input(meta, rng)

    outputs = [o.name for o in sess.get_outputs()]
    sess.run(outputs, feeds)  # warm-up: first run allocates and packs weights
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        sess.run(outputs, feeds)
        times.append((time.perf_counter() - t) * 1e3)

    result = {
        "runtime": "onnxruntime",
        "version": ort.__version__,
        "model": args.model,
        "load_ms": round(load_ms, 3),
        "min_ms": round(min(times), 3),
        "median_ms": round(statistics.median(times), 3),
        "max_ms": round(max(times), 3),
        # Linux reports ru_maxrss in KiB.
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "base_rss_kb": base_rss_kb,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
