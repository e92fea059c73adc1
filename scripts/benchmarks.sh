#!/usr/bin/env bash
# Reproduce the numbers in docs/benchmarks.md on this machine (CPU): about an hour
# on 2 cores (the sweep at 256 samples, see docs/benchmarks.md for its time). Each step prints markdown; bench-out/ receives the sweep's JSON, CSV and
# plots (copy pareto.png and learning.png to docs/ to update the page).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "## machine"; uname -m; nproc; python -c "import torch, platform; print(platform.python_version(), torch.__version__)"
echo "## policy bookkeeping"; python scripts/bench_overhead.py --model glyphs --batch 16
echo "## backends"; python scripts/bench_backends.py --threads 2
echo "## the sweep (256 samples, the default)"; fastflow bench --out bench-out
