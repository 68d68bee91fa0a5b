#!/usr/bin/env bash
# The GPU benchmark in one call on a lent GPU machine (docs/gpu-benchmark.md): installs the wheels carried in
# benchmarks/wheels (what `import sdstudio.core` lacks there), checks the imports before minutes are spent,
# then runs benchmarks/gpu_train.py (or gpu_memory.py) under a time limit. JSON, log and environment land in OUT_DIR.
#
#   bash benchmarks/gpu_run.sh [OUT_DIR]     (default: $OUT, else ./gpu-bench-out)
#   BENCH          train (default: gpu_train.py, issue 14) or memory (gpu_memory.py, issue 13's levers)
#   BENCH_TIMEOUT  seconds for the benchmark itself (default 540: with start-up, fits a 15-minute device budget)
#   BENCH_ARGS     arguments after OUT.json. train: default "--compile --rounds 4 --steps 15": the SD workloads
#                  eager and compiled, flux-lora eager (at most 3 rounds of 5 steps), each interleaved with its
#                  baseline, the warm-cache probe and one end-to-end train(); "--only flux-lora --no-e2e" for
#                  Flux alone (~2-3 min). memory: default "--model flux" (the Flux.1-dev levers, ~3 min);
#                  "--model sdxl" for SDXL's
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

case "${BENCH:-train}" in
  train) script=gpu_train default="--compile --rounds 4 --steps 15" ;;
  memory) script=gpu_memory default="--model flux" ;;
  *) echo "BENCH=${BENCH}: expected train or memory"; exit 2 ;;
esac
args="${BENCH_ARGS-$default}"
# SIGINT: Python stops where it is; gpu_train's JSON already holds every workload finished before
# shellcheck disable=SC2086  # $args is a list of arguments
timeout --signal=INT --kill-after=20 "${BENCH_TIMEOUT:-540}" \
  python3 "benchmarks/$script.py" "$out/$script.json" $args 2>&1 | tee "$out/$script.log"
exit "${PIPESTATUS[0]}"
