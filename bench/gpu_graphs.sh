#!/usr/bin/env bash
# The GPU checks docs/benchmarks.md leaves for the next GPU run, in one go (at most 8 minutes: each
# step has its own time limit, so one that hangs or runs long leaves the others their time):
#
# 1. the engine's own CUDA graphs (engine_runner.GraphedDecode) against torch.compile's graph trees,
#    alternating in one process, 0.5B-shaped model, bfloat16, batch 1 and then 8 (bench/decode_ab.py);
# 2. where the compiled batch-1 step's time goes with the engine's own graphs (bench/decode_profile.py);
# 3. the same-tokens check in float32: the engine eager against transformers at batch 1 and 8, the
#    0.5B shape (do the bfloat16 rows' differences at batch 8 come from rounding?).
#
#   bash bench/gpu_graphs.sh DIR     # on a machine with a CUDA GPU, PyTorch and transformers
#
# Each step's output goes to DIR/<step>.log; the GPU's name and driver to DIR/gpu.txt.
set -uo pipefail
mkdir -p "${1:?usage: bash bench/gpu_graphs.sh DIR}"
dir=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; } 2>&1 | tee "$dir/gpu.txt"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its output to DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$dir/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

step graphs-b1 180 python3 bench/decode_ab.py --device cuda --dtype bfloat16 --compare graphs --size 500M --batch 1 --rounds 8
step graphs-b8 120 python3 bench/decode_ab.py --device cuda --dtype bfloat16 --compare graphs --size 500M --batch 8 --rounds 8
step profile-manual 90 env NANOHUATUO_CUDA_GRAPHS=manual python3 bench/decode_profile.py --device cuda --dtype bfloat16 \
    --size 500M --batches 1 --compile --pairs 1
step float32 90 python3 bench/generate.py --device cuda --dtype float32 --sizes 500M --tables fixed --batch-sizes 1 8 \
    --no-static --weights --repeats 1 --workdir "${TMPDIR:-/tmp}/nanohuatuo-bench-gpu" --out "$dir/float32.json"
