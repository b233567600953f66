#!/usr/bin/env python3
"""Generate every model, fixture and sample used by edgevlm's tests and demo.

Run from the repository root:

    pip install -r models/gen/requirements.txt
    python3 models/gen/generate.py [--out models]

Writes:
    <out>/fixtures/   quantization-variant test fixtures + fixtures.toml + bad/
    <out>/fixtures/vlm/  tiny random-weight SmolVLM / Mistral snapshots with the
                      real exports' interfaces + transformers/onnxruntime references
                      (models/gen/vlm_models.py; needs the transformers pins)
    <out>/demo/       the embedded demo model package (trained here)

Deterministic: fixed seeds, and BLAS/onnxruntime pinned to one thread so
floating-point reductions always happen in the same order.
"""

from __future__ import annotations

import os

# Must be set before numpy is imported: multi-threaded BLAS may split sums
# differently from run to run, and the build machine has cores to spare
# for nobody.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo_model  # noqa: E402
import fixture_models  # noqa: E402
from common import format_histogram  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models", help="output directory (default: models/)")
    ap.add_argument("--skip-demo", action="store_true", help="only regenerate fixtures (fast)")
    ap.add_argument("--skip-vlm", action="store_true",
                    help="do not regenerate fixtures/vlm (needs transformers/tokenizers from requirements.txt)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # onnxruntime.quantization nags about pre-processing on the root logger;
    # it is deliberately skipped (it would fuse/rewrite the graphs under test).
    logging.getLogger().setLevel(logging.ERROR)

    t0 = time.time()
    fixtures = fixture_models.generate(out, demo_model.truncated_jpeg_source())
    print(f"fixtures: {len(fixtures)} variants in {out / 'fixtures'} ({time.time() - t0:.1f}s)")
    for fx in fixtures:
        print(f"  {fx.name:26s} {format_histogram(fx.hist)}")

    if not args.skip_vlm:
        # Imported here so --skip-vlm works without transformers installed.
        import vlm_models

        t0 = time.time()
        vlm_dir = out / "fixtures" / "vlm"
        vlm_models.generate(vlm_dir, log=lambda msg: print(msg))
        print(f"vlm: snapshots + references in {vlm_dir} ({time.time() - t0:.1f}s)")

    if not args.skip_demo:
        t0 = time.time()
        result = demo_model.generate(out)
        print(f"demo: held-out accuracy {result['accuracy'] * 100:.2f}%, "
              f"{result['samples']} samples ({result['samples_rejected']} unclear draws redrawn) "
              f"({time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
