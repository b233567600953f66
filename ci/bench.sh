#!/usr/bin/env bash
# Benchmarks edgevlm against ONNX Runtime, same inputs, back to back in this script:
#   bash ci/bench.sh [--repeat N] [--threads T] [--quick]   (defaults: 200 runs, 1 thread)
# 1. every fixture graph and the demo model (ci/bench_report.py; raw results in bench-out/);
# 2. SmolVLM-shaped vision encoder + decoder at the probe size (4+4 layers, hidden 768) in
#    every export variant (fp32, int8, uint8, q4, per-channel int8, fp16, static QDQ) and,
#    unless --quick, at SmolVLM2-256M size in the same variants (ci/bench_vlm.py; the
#    graphs are generated under target/, ~1 GB and ~3 GB, not committed).
# Each part prints a Markdown table and its worst ratio; the last line is the worst of all.
set -euo pipefail
cd "$(dirname "$0")/.."

repeat=200
threads=1
quick=0
while [ $# -gt 0 ]; do
  case "$1" in
    --repeat) repeat=${2:?--repeat needs a value}; shift 2 ;;
    --threads) threads=${2:?--threads needs a value}; shift 2 ;;
    --quick) quick=1; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done

# Same interpreter for the check, the install and the benchmark, so a pip
# belonging to another Python cannot satisfy the check by accident.
python=${PYTHON:-python3}
if ! "$python" -c 'import onnxruntime, numpy' >/dev/null 2>&1; then
  echo "bench.sh: installing Python requirements" >&2
  "$python" -m pip install -q -r models/gen/requirements.txt
fi

# Always build: a no-op build takes a second, and a stale binary would measure old code.
command -v cargo >/dev/null 2>&1 || { [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"; }
cargo build --release -j2 -q -p edgevlm

status=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT
"$python" ci/bench_report.py --repeat "$repeat" --threads "$threads" | tee "$out" || status=$?
sizes=(probe)
[ "$quick" = 1 ] || sizes+=(256m)
for size in "${sizes[@]}"; do
  variants=fp32,int8,uint8,q4,int8pc,fp16,qdq
  "$python" ci/bench_vlm.py --size "$size" --variants "$variants" --threads "$threads" \
    | tee -a "$out" || status=$?
done
# One line for the whole run: the largest ratio any part printed.
"$python" - "$out" <<'PY'
import re, sys
worst = [(float(m.group(1)), line.strip()) for line in open(sys.argv[1])
         for m in re.finditer(r"worst[^0-9]*([0-9]+\.[0-9]+)", line, re.I)]
if worst:
    r, line = max(worst)
    print(f"\noverall worst ratio: {r:.2f} (from: {line})")
PY
exit $status
