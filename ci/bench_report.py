#!/usr/bin/env python3
"""Benchmarks edgevlm against ONNX Runtime on every fixture plus the demo model.

    python3 ci/bench_report.py [--repeat N] [--threads T]

Normally started by ci/bench.sh, which first makes sure onnxruntime is
importable and target/release/edgevlm exists. Run from the repository root.

Prints a Markdown table (one row per graph) and one summary line on stdout,
and appends every raw result to bench-out/bench-<timestamp>.jsonl. Exits 1 if
any run failed; the other graphs are still measured and reported.

Stdlib only, so it runs before (or without) the pinned Python requirements.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import struct
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

EDGEVLM = Path("target/release/edgevlm")
BENCH_ORT = Path("ci/bench_ort.py")
FIXTURES = Path("models/fixtures")
DEMO = Path("models/demo")
OUT_DIR = Path("bench-out")

# A hung run must not stall the whole benchmark; the slowest graph today takes
# well under a second per run, so this only trips on a real hang.
TIMEOUT_S = 600


def load_graphs(tmp: Path) -> "list[dict]":
    """Graphs to benchmark: name, model path and {input name: .npy path}."""
    manifest = tomllib.loads((FIXTURES / "fixtures.toml").read_text())
    graphs = [
        {
            "name": f["name"],
            "model": FIXTURES / f["model"],
            "inputs": {k: FIXTURES / v for k, v in f.get("inputs", {}).items()},
        }
        for f in manifest["fixture"]
    ]
    # The demo ships no input tensor. Letting each runtime synthesize one would
    # compare different data (different RNGs), so write one file both read.
    spec = tomllib.loads((DEMO / "model.toml").read_text())["input"]
    h, w = spec["height"], spec["width"]
    shape = {"NCHW": (1, 3, h, w), "NHWC": (1, h, w, 3)}[spec["layout"]]
    npy = tmp / "demo_input.npy"
    write_npy_f32(npy, shape, seed=0)
    graphs.append({"name": "demo", "model": DEMO / "model.onnx", "inputs": {spec["tensor"]: npy}})
    return graphs


def write_npy_f32(path: Path, shape: "tuple[int, ...]", seed: int) -> None:
    """Writes seeded N(0, 1) float32 data as a .npy (format 1.0) without numpy.

    Standard-normal values match what the demo model sees after its
    mean/std normalisation, so no kernel hits an unusual fast or slow path.
    """
    rng = random.Random(seed)
    count = math.prod(shape)
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape!r}, }}"
    # The spec pads magic + length field + header + '\n' to a multiple of 64.
    pad = -(10 + len(header) + 1) % 64
    header_bytes = (header + " " * pad + "\n").encode("latin1")
    data = struct.pack(f"<{count}f", *(rng.gauss(0.0, 1.0) for _ in range(count)))
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header_bytes)) + header_bytes + data)


def run_json(cmd: "list[str]") -> "tuple[dict | None, str | None]":
    """Runs one benchmark process; returns (its JSON line, None) or (None, error)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {TIMEOUT_S} s"
    except OSError as e:
        return None, str(e)
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    if p.returncode != 0 or not lines:
        # The last stderr line is where both CLIs put the actual error.
        err = [l for l in p.stderr.splitlines() if l.strip()]
        return None, f"exit {p.returncode}: {err[-1] if err else '(no stderr)'}"
    try:
        return json.loads(lines[-1]), None
    except json.JSONDecodeError:
        return None, f"not JSON: {lines[-1][:120]}"


def bench_edgevlm(g: dict, repeat: int, threads: int) -> "tuple[dict | None, dict | None, str | None]":
    cmd = [str(EDGEVLM), "run", "--onnx", str(g["model"]), "--repeat", str(repeat), "--threads", str(threads)]
    for name, path in g["inputs"].items():
        cmd += ["--input", f"{name}={path}"]
    raw, err = run_json(cmd)
    if raw is None:
        return None, None, err
    try:
        rep = raw["repeat"]
        if rep["runs"] != repeat:
            return raw, None, f"timed {rep['runs']} runs, asked for {repeat}"
        return raw, {k: raw[k] for k in ("peak_rss_kb", "base_rss_kb", "load_ms")} | {"median_ms": rep["median_ms"]}, None
    except (KeyError, TypeError) as e:
        return raw, None, f"missing field {e} in output"


def bench_ort(g: dict, repeat: int, threads: int) -> "tuple[dict | None, dict | None, str | None]":
    cmd = [sys.executable, str(BENCH_ORT), "--model", str(g["model"]),
           "--repeat", str(repeat), "--threads", str(threads)]
    for name, path in g["inputs"].items():
        cmd += ["--input", f"{name}={path}"]
    raw, err = run_json(cmd)
    if raw is None:
        return None, None, err
    try:
        return raw, {k: raw[k] for k in ("median_ms", "peak_rss_kb", "base_rss_kb", "load_ms")}, None
    except KeyError as e:
        return raw, None, f"missing field {e} in output"


def geomean(xs: "list[float]") -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def cell(text: str) -> str:
    """Keeps error messages from breaking the Markdown table."""
    return text.replace("|", "\\|").replace("\n", " ")[:160]


def model_kb(m: dict) -> int:
    """Peak RSS growth from before the model was loaded: what the model and its runs cost,
    without the Python interpreter that only the ORT side carries."""
    return max(m["peak_rss_kb"] - m["base_rss_kb"], 1)


def side_cells(m: "dict | None", err: "str | None") -> "tuple[str, str, str, str]":
    """One runtime's median, peak RSS, model RSS and load cells; a failure fills the first."""
    if err is not None:
        return f"ERROR: {cell(err)}", "", "", ""
    return (f"{m['median_ms']:.3f}", f"{m['peak_rss_kb'] / 1024:.1f}", f"{model_kb(m) / 1024:.1f}",
            f"{m['load_ms']:.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description="Benchmark edgevlm against ONNX Runtime.")
    ap.add_argument("--repeat", type=int, default=200, help="timed runs per graph and runtime (default 200)")
    ap.add_argument("--threads", type=int, default=1, help="threads for both runtimes (default 1)")
    args = ap.parse_args()
    if args.repeat < 1 or args.threads < 1:
        ap.error("--repeat and --threads must be >= 1")

    OUT_DIR.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_path = OUT_DIR / f"bench-{stamp}.jsonl"

    rows, failures = [], 0
    with tempfile.TemporaryDirectory(prefix="edgevlm-bench-") as tmp, out_path.open("w") as out:
        graphs = load_graphs(Path(tmp))
        for i, g in enumerate(graphs, 1):
            print(f"[{i}/{len(graphs)}] {g['name']}", file=sys.stderr, flush=True)
            res = {}
            # Both runtimes back to back per graph, each in a fresh process:
            # slow drifts on a noisy 2-core box then hit both sides of a ratio
            # alike, and peak RSS is that one graph's alone.
            for runtime, bench in (("edgevlm", bench_edgevlm), ("onnxruntime", bench_ort)):
                raw, m, err = bench(g, args.repeat, args.threads)
                res[runtime] = (m, err)
                failures += err is not None
                # Flushed per run so a crash or Ctrl-C keeps what was measured.
                out.write(json.dumps({
                    "graph": g["name"], "runtime": runtime, "repeat": args.repeat,
                    "threads": args.threads, "error": err, "result": raw,
                }) + "\n")
                out.flush()
            rows.append((g["name"], res["edgevlm"], res["onnxruntime"]))

    print("| graph | edgevlm median ms | ORT median ms | latency ratio | edgevlm peak RSS MiB "
          "| ORT peak RSS MiB | edgevlm model RSS MiB | ORT model RSS MiB | model-RSS ratio "
          "| edgevlm load ms | ORT load ms |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    lat, rss = [], []  # (ratio, graph) for graphs both runtimes completed
    for name, (e, e_err), (o, o_err) in rows:
        if e_err or o_err:
            ratios = ("-", "-")
        else:
            lr = e["median_ms"] / o["median_ms"]
            rr = model_kb(e) / model_kb(o)
            lat.append((lr, name))
            rss.append((rr, name))
            ratios = (f"{lr:.2f}", f"{rr:.2f}")
        (e_med, e_rss, e_model, e_load), (o_med, o_rss, o_model, o_load) = side_cells(e, e_err), side_cells(o, o_err)
        print(f"| {cell(name)} | {e_med} | {o_med} | {ratios[0]} | {e_rss} | {o_rss} | {e_model} | {o_model} "
              f"| {ratios[1]} | {e_load} | {o_load} |")

    print()
    if lat:
        # "Worst" is from edgevlm's point of view: the highest ratio.
        wl, ws = max(lat), max(rss)
        print(f"summary: {len(lat)} graphs, latency ratio geomean {geomean([r for r, _ in lat]):.2f} "
              f"(worst {wl[0]:.2f} on {wl[1]}), model-RSS ratio geomean {geomean([r for r, _ in rss]):.2f} "
              f"(worst {ws[0]:.2f} on {ws[1]}), threads {args.threads}")
    else:
        print(f"summary: 0 graphs, no graph completed in both runtimes, threads {args.threads}")
    print(f"raw results: {out_path}", file=sys.stderr)
    if failures:
        print(f"bench: {failures} run(s) failed, see the ERROR cells", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
