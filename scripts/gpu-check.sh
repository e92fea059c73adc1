#!/usr/bin/env bash
# GPU check of the ONNX Runtime and TensorRT backends (issue 5), in at most ~8 minutes.
#
#   bash scripts/gpu-check.sh            # from the repository root, on an NVIDIA GPU machine
#
# 1. prints the GPU, driver, Python and package versions
# 2. installs what is missing: fastflow (editable, no deps), diffusers/safetensors/onnx/
#    onnxscript/pytest, tensorrt for torch's CUDA major version, onnxruntime-gpu (optional)
# 3. exports the demo model to ONNX and builds a TensorRT fp16 engine with `fastflow export`
# 4. runs every GPU test (pytest -m gpu)
# 5. benchmarks ms per evaluation at batch 16 and 32: TensorRT fp16 vs PyTorch eager bf16
#    (target: >= 2x at batch 16), plus torch fp32 and onnxruntime CUDA when available
# 6. prints a summary; with $OUT set, the log, the bench JSON and summary.json land there
#
# Environment: PYTHON (default python3), OUT (results folder, default ./gpu-check-out),
# WHEELHOUSE (a folder of wheels: install offline from it), SKIP_INSTALL=1 (install nothing),
# ORT_GPU=0 (do not try onnxruntime-gpu), BUDGET_S (default 470: the whole run's time limit).
# A step that cannot run (no network for an install, TensorRT missing) is reported as
# skipped; the exit status is 1 if a step that did run failed, else 0.

set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
START=$(date +%s)
BUDGET=${BUDGET_S:-470}
WORK=$(mktemp -d /tmp/fastflow-gpu-check.XXXXXX)
declare -A RESULT
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
step() { echo; echo "=== $* (t=$(elapsed) s)"; }
# limit SECONDS: a timeout no longer than the time left
limit() { local l; l=$(left); [ "$1" -lt "$l" ] && l=$1; [ "$l" -lt 5 ] && l=5; echo "$l"; }
have() { "$PY" -c "import $1" >/dev/null 2>&1; }
record() { RESULT[$1]=$2; echo "--> $1: $2"; [ "$2" = failed ] && FAILED=1; return 0; }
# the fastflow command line, as a plain command (timeout cannot run shell functions)
FF=("$PY" -c 'import sys; from fastflow.cli import main; main(sys.argv[1:])')

PIP=("$PY" -m pip install -q --disable-pip-version-check --no-input)
if [ -n "${WHEELHOUSE:-}" ]; then PIP+=(--no-index --find-links "$WHEELHOUSE"); fi

# -- 1. environment --------------------------------------------------------------------------
step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi: not available"
"$PY" --version
if ! have torch && [ "${SKIP_INSTALL:-0}" != 1 ]; then
  echo "torch is missing: installing it (CUDA build from the default index)"
  timeout "$(limit 240)" "${PIP[@]}" torch || echo "torch install failed"
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "torch sees no CUDA device: nothing to check here."
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>/dev/null
  exit 1
fi
CU_MAJOR=$("$PY" -c "import torch; print((torch.version.cuda or '12').split('.')[0])")
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.get_device_name(), 'sm', '%d.%d' % torch.cuda.get_device_capability())"

# -- 2. install ----------------------------------------------------------------------------------
step "install"
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
  echo "SKIP_INSTALL=1: installing nothing"
else
  timeout "$(limit 120)" "${PIP[@]}" --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || echo "editable install of fastflow failed; using PYTHONPATH=$PWD"
  missing=()
  for pair in click:click pluggy:pluggy numpy:numpy PIL:pillow diffusers:diffusers safetensors:safetensors \
              onnx:onnx onnxscript:onnxscript pytest:pytest; do
    have "${pair%%:*}" || missing+=("${pair#*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    timeout "$(limit 180)" "${PIP[@]}" "${missing[@]}" || echo "could not install ${missing[*]}"
  fi
  if ! have tensorrt; then
    echo "installing tensorrt-cu${CU_MAJOR} (large download)"
    timeout "$(limit 240)" "${PIP[@]}" "tensorrt-cu${CU_MAJOR}>=10" || echo "could not install tensorrt"
  fi
  if [ "${ORT_GPU:-1}" = 1 ] && ! "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
    # onnxruntime-gpu replaces onnxruntime (same module): fetch it first, swap only if that worked
    if timeout "$(limit 150)" "$PY" -m pip download -q --no-deps -d "$WORK/ortgpu" onnxruntime-gpu \
         ${WHEELHOUSE:+--no-index --find-links "$WHEELHOUSE"} >/dev/null 2>&1; then
      "$PY" -m pip uninstall -q -y onnxruntime >/dev/null 2>&1
      "${PIP[@]}" --no-deps "$WORK"/ortgpu/onnxruntime_gpu-*.whl || "${PIP[@]}" onnxruntime
    else
      echo "onnxruntime-gpu not available (no network or wheel): the CUDA ORT check is skipped"
    fi
  fi
fi
source scripts/fastflow-path.sh  # an installed fastflow, else a shim of this checkout
"$PY" -c "import fastflow, fastflow.backends.torch_backend; print('fastflow', fastflow.__version__, 'from', fastflow.__file__)"
"$PY" - <<'EOF'
from importlib.metadata import version, PackageNotFoundError
for p in ("fastflow", "torch", "diffusers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt",
          "tensorrt-cu12", "tensorrt-cu13"):
    try:
        print(f"{p:16s} {version(p)}")
    except PackageNotFoundError:
        pass
try:
    import onnxruntime as o
    print("onnxruntime providers:", o.get_available_providers())
except ImportError:
    print("onnxruntime: not importable")
try:
    import tensorrt as t
    print("tensorrt import:", t.__version__)
except ImportError as e:
    print("tensorrt: not importable:", e)
EOF
have tensorrt && HAS_TRT=1 || HAS_TRT=0
have diffusers && HAS_DIFFUSERS=1 || HAS_DIFFUSERS=0

# -- 3. export ----------------------------------------------------------------------------------
step "export the demo model to ONNX (fastflow export)"
SRC=""
if [ "$HAS_DIFFUSERS" = 0 ]; then
  record onnx_export skipped
elif timeout "$(limit 120)" "${FF[@]}" export --backend onnx --model glyphs --out "$WORK/glyphs-onnx"; then
  SRC=glyphs; record onnx_export ok
else
  echo "the embedded glyphs weights are not usable here: exporting GlyphFlow() with random init"
  if timeout "$(limit 120)" "$PY" - "$WORK/glyphs-onnx" <<'EOF'
import sys, torch
from fastflow.demo.model import GlyphFlow
from fastflow.export import export_onnx
torch.manual_seed(0)
ex = {"x": torch.randn(2, 3, 32, 32), "t": torch.rand(2), "label": torch.tensor([1, 36])}
export_onnx(GlyphFlow().eval(), sys.argv[1], ex, opset=18, log=print)  # 18: readable by every TensorRT 10
EOF
  then SRC="$WORK/glyphs-onnx"; record onnx_export "ok (random init)"; else record onnx_export failed; fi
fi

step "build a TensorRT fp16 engine (fastflow export --backend trt)"
if [ "$HAS_TRT" = 0 ] || [ -z "$SRC" ]; then
  record trt_build skipped
elif timeout "$(limit 200)" "${FF[@]}" export --backend trt --model "$SRC" --out "$WORK/glyphs-trt-fp16" \
       --precision fp16 --min-batch 1 --opt-batch 32 --max-batch 64; then
  record trt_build ok
else
  record trt_build failed
fi

# -- 4. tests ----------------------------------------------------------------------------------
step "pytest -m gpu (every GPU test)"
if [ "$HAS_DIFFUSERS" = 0 ] || ! have pytest; then
  record gpu_tests skipped
elif timeout "$(limit 200)" "$PY" -m pytest tests -m gpu -q -rs -p no:cacheprovider \
       --junitxml="$OUT/test_gpu.xml"; then
  record gpu_tests ok
else
  record gpu_tests failed
fi

# -- 5. benchmark ------------------------------------------------------------------------------
step "benchmark: TensorRT fp16 vs PyTorch eager bf16 (ms per evaluation)"
ENGINE_ARG=()
[ -f "$WORK/glyphs-trt-fp16/fastflow-export.json" ] && ENGINE_ARG=(--engine-dir "$WORK/glyphs-trt-fp16")
if [ "$HAS_DIFFUSERS" = 0 ]; then
  record bench skipped
elif timeout "$(limit 150)" "$PY" scripts/bench_backends.py --device cuda --batch 16 --batch 32 \
       --export-dir "$WORK/glyphs-onnx" "${ENGINE_ARG[@]}" --json "$OUT/bench-gpu.json"; then
  record bench ok
else
  record bench failed
fi

# -- 6. summary ---------------------------------------------------------------------------------
step "summary"
RESULTS=""
for k in onnx_export trt_build gpu_tests bench; do RESULTS+="$k=${RESULT[$k]:-not run};"; done
"$PY" - "$OUT" "$RESULTS" "$(elapsed)" <<'EOF'
import json, os, sys
out, results, elapsed = sys.argv[1], sys.argv[2], int(sys.argv[3])
summary = {"steps": dict(kv.split("=", 1) for kv in results.strip(";").split(";")), "elapsed_s": elapsed}
try:
    import torch
    summary["gpu"] = torch.cuda.get_device_name()
    summary["compute_capability"] = "%d.%d" % torch.cuda.get_device_capability()
    summary["torch"], summary["cuda"] = torch.__version__, torch.version.cuda
except Exception as e:
    summary["gpu"] = f"unknown ({e})"
for mod in ("tensorrt", "onnxruntime", "diffusers"):
    try:
        summary[mod] = __import__(mod).__version__
    except Exception:
        summary[mod] = None
bench = os.path.join(out, "bench-gpu.json")
if os.path.exists(bench):
    rows = json.load(open(bench))["rows"]
    summary["bench"] = rows
    by = {(r["backend"], r["batch"]): r["ms_per_eval"] for r in rows}
    if ("tensorrt fp16", 16) in by and ("torch eager bf16", 16) in by:
        speedup = by[("torch eager bf16", 16)] / by[("tensorrt fp16", 16)]
        summary["trt_fp16_vs_torch_bf16_batch16"] = round(speedup, 2)
        summary["target_2x_met"] = speedup >= 2.0
for k, v in summary.items():
    if k != "bench":
        print(f"{k:32s} {v}")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
EOF
rm -rf "$WORK"
echo "log: $LOG"
exit $FAILED
