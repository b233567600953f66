#!/usr/bin/env bash
# Benchmarks edgevlm against ONNX Runtime on every fixture and the demo model:
#   bash ci/bench.sh [--repeat N] [--threads T]     (defaults: 200 runs, 1 thread)
# Prints a Markdown table and a summary line; raw results go to bench-out/.
# This only prepares the tools; ci/bench_report.py does the measuring.
set -euo pipefail
cd "$(dirname "$0")/.."

repeat=200
threads=1
while [ $# -gt 0 ]; do
  case "$1" in
    --repeat) repeat=${2:?--repeat needs a value}; shift 2 ;;
    --threads) threads=${2:?--threads needs a value}; shift 2 ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
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

exec "$python" ci/bench_report.py --repeat "$repeat" --threads "$threads"
