#!/usr/bin/env bash
# One lease of the GPU machine, in one command (the device tool runs it from the repository root):
#   1. scripts/gpu-check.sh: export, TensorRT build (when TensorRT is there), GPU tests, backend bench;
#   2. scripts/recipe_sweep.py: the glyph-model training recipes side by side (issue 3), cut at
#      SWEEP_S seconds; each run writes its accuracy curve as it goes, so a cut run still reports.
# Everything it keeps goes to $OUT (at most 8 files): the check's files, sweep.tgz, best-model.tgz.
# The machine has no network: wheels it lacks (diffusers, importlib_metadata) are carried in .whl/
# and installed into /tmp/site before this script runs.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-session-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

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
# the aggregation is skipped if the driver itself was cut: redo it from the per-run files
python3 - "$SW" <<'EOF'
import glob, json, os, sys
sw = sys.argv[1]
rows = []
for p in sorted(glob.glob(os.path.join(sw, "*.json"))):
    if not p.endswith("sweep.json"):
        try:
            rows.append(json.load(open(p)))
        except ValueError as e:
            print("unreadable:", p, e)
json.dump(rows, open(os.path.join(sw, "sweep.json"), "w"), indent=1)
best = max((r for r in rows if r["curve"]), key=lambda r: r["curve"][-1]["acc_g3"], default=None)
for r in rows:
    print(r["name"], "done" if r["done"] else "PART", r["steps"], [(c["step"], c["acc_g3"], c["acc_g5"]) for c in r["curve"]])
if best:
    print("best:", best["name"])
    open(os.path.join(sw, "BEST"), "w").write(best["name"])
EOF
tar czf "$OUT/sweep.tgz" -C "$SW" --exclude='*/transformer' --exclude='*.safetensors' . 2>/dev/null
if [ -f "$SW/BEST" ]; then tar czf "$OUT/best-model.tgz" -C "$SW" "$(cat "$SW/BEST")"; fi
echo "=== all done at t=$(( $(date +%s) - T0 )) s"
