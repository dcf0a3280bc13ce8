#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run (over 9.5 minutes on one H200, most of it
# compiling: a run was stopped at 570 s during its last table, the 1.5B compiled mixed workload;
# that table alone, `--sizes 1.5B --tables mixed`, took 94 s eager and 260 s compiled):
# Qwen2.5-0.5B- and 1.5B-shaped models with random weights, bfloat16, greedy; the engine eager and
# compiled (CUDA graphs) against transformers' generate at batch 1, 8 and 64 (64 new tokens after
# a 32-token prompt), and a mixed workload of 128 requests (prompts 16-256 tokens, answers 8-256)
# on 64 slots; same-tokens check against transformers everywhere. Rows are written to DIR as they
# are measured (DIR/generate.json), the log beside them, so a run stopped part way keeps its rows.
#
#   bash bench/gpu.sh DIR                 # on a machine with a CUDA GPU, PyTorch and transformers
#   bash bench/gpu.sh DIR --device cpu --sizes tiny --mixed-requests 8 --weights   # its plumbing, on a CPU
#   NANOHUATUO_CUDA_GRAPHS=manual bash bench/gpu.sh DIR --sizes 500M --tables fixed   # the engine's own CUDA graphs
#
# The engine's own CUDA graphs against torch.compile's, alternating in one process (shorter, and paired),
# with the other checks left for a GPU: bash bench/gpu_graphs.sh DIR
#
# Extra arguments go to bench/generate.py after these (a later flag wins).
set -euo pipefail
mkdir -p "${1:?usage: bash bench/gpu.sh DIR [generate.py arguments]}"
dir=$(cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; } 2>&1 | tee "$dir/gpu.txt"
PYTHONUNBUFFERED=1 python3 bench/generate.py --device cuda --dtype bfloat16 --sizes 500M 1.5B \
    --tables fixed mixed --batch-sizes 1 8 64 --compile --no-static --slots 64 --mixed-requests 128 \
    --repeats 2 --workdir "${TMPDIR:-/tmp}/nanohuatuo-bench-gpu" --out "$dir/generate.json" "$@" 2>&1 \
    | tee "$dir/generate.log"
