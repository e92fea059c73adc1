#!/usr/bin/env bash
# One lease of the GPU machine, in one command (the device tool runs it from the repository root):
#   0. scripts/gpu_speed.py: evaluation speed (issue 18): eager fp32/bf16, torch.compile with and
#      without CUDA graphs, whole samples under none/fixed/ucb with syncs per sample (SPEED_S, 300 s);
#   1. scripts/gpu-check.sh: export, TensorRT build (when TensorRT is there), GPU tests, backend bench;
#   2. scripts/recipe_sweep.py: the glyph-model training recipes side by side (issue 3), cut at
#      SWEEP_S seconds; each run writes its accuracy curve as it goes, so a cut run still reports
#      (the sweep's driver collects them into sweep.json and names the best in BEST).
# Everything it keeps goes to $OUT (at most 8 files): the check's files, sweep.tgz, best-model.tgz.
# The machine has no network: wheels it lacks (diffusers, importlib_metadata) are carried in .whl/
# and installed into /tmp/site before this script runs.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-session-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

PY=python3 WORK=$(mktemp -d /tmp/fastflow-gpu.XXXXXX)
source scripts/fastflow-path.sh
timeout "${SPEED_S:-300}" python3 scripts/gpu_speed.py --out "$OUT" 2>&1 | tee "$OUT/gpu_speed.log"
echo "=== gpu_speed done at t=$(( $(date +%s) - T0 )) s"

SKIP_INSTALL=1 BUDGET_S=${CHECK_S:-170} OUT="$OUT" bash scripts/gpu-check.sh
echo "=== gpu-check done at t=$(( $(date +%s) - T0 )) s"

# MPS lets the sweep's small kernels from several processes share the GPU; without it they time-slice
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
MPS=0
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d 2>/dev/null \
   && timeout 30 python3 -c "import torch; torch.zeros(1, device='cuda').sum().item()" 2>/dev/null; then
  MPS=1; echo "MPS: on"
else
  echo quit | nvidia-cuda-mps-control 2>/dev/null
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; echo "MPS: off"
fi

SW=/tmp/sweep
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout -s INT "${SWEEP_S:-300}" \
  python3 scripts/recipe_sweep.py --run --device "${SWEEP_DEVICE:-cuda}" --out "$SW" ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/sweep.log"
[ "$MPS" = 1 ] && echo quit | nvidia-cuda-mps-control
echo "=== sweep done at t=$(( $(date +%s) - T0 )) s"
tar czf "$OUT/sweep.tgz" -C "$SW" --exclude='*/transformer' --exclude='*.safetensors' . 2>/dev/null
if [ -f "$SW/BEST" ]; then tar czf "$OUT/best-model.tgz" -C "$SW" "$(cat "$SW/BEST")"; fi
echo "=== all done at t=$(( $(date +%s) - T0 )) s"
