#!/usr/bin/env bash
# The GPU benchmark in one call on a lent GPU machine (docs/gpu-benchmark.md): installs the wheels carried in
# benchmarks/wheels (what `import sdstudio.core` lacks there), checks the imports before minutes are spent,
# then runs benchmarks/gpu_train.py under a time limit. JSON, log and environment land in OUT_DIR.
#
#   bash benchmarks/gpu_run.sh [OUT_DIR]     (default: $OUT, else ./gpu-bench-out)
#   BENCH_TIMEOUT  seconds for the benchmark itself (default 540: with start-up, fits a 15-minute device budget)
#   BENCH_ARGS     arguments after OUT.json (default "--compile --rounds 5 --steps 20": every workload eager and
#                  compiled, interleaved with the baseline, the warm-cache probe and one end-to-end train();
#                  "--rounds 5 --steps 20" alone for the eager step only)
# Afterwards: copy OUT_DIR/gpu_train.json to benchmarks/results/<date>-<card>.json and add a row to
# docs/benchmarks.md (card, date, versions; ratio with its min-max, warm-up cold / warm).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out="${1:-${OUT:-gpu-bench-out}}"
mkdir -p "$out"

if compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/sdstudio-site benchmarks/wheels/*.whl || exit 3
  export PYTHONPATH="/tmp/sdstudio-site${PYTHONPATH:+:$PYTHONPATH}"
fi
# the checkout itself, not an installed sdstudio
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/env.txt"
python3 -c '
import importlib.metadata as m, sys
import torch, sdstudio.core.train.session
names = ("diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "pydantic", "safetensors")
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      {n: m.version(n) for n in names}, "gpu:", torch.cuda.is_available() and torch.cuda.get_device_name())
' 2>&1 | tee -a "$out/env.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "sdstudio does not import here: see above"; exit 4; }

args="${BENCH_ARGS---compile --rounds 5 --steps 20}"
# SIGINT: Python stops where it is; the JSON already holds every workload finished before
# shellcheck disable=SC2086  # $args is a list of arguments
timeout --signal=INT --kill-after=20 "${BENCH_TIMEOUT:-540}" \
  python3 benchmarks/gpu_train.py "$out/gpu_train.json" $args 2>&1 | tee "$out/gpu_train.log"
exit "${PIPESTATUS[0]}"
