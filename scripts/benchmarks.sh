#!/usr/bin/env bash
# Reproduce the numbers in docs/benchmarks.md on this machine (CPU): about 30 minutes
# on 2 cores (the sweep at 128 samples, as documented: 21 minutes). Each step prints markdown; bench-out/ receives the sweep's JSON, CSV and
# plots (copy pareto.png and learning.png to docs/ to update the page).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "## machine"; uname -m; nproc; python -c "import torch, platform; print(platform.python_version(), torch.__version__)"
echo "## policy bookkeeping"; python scripts/bench_overhead.py --model glyphs --batch 16
echo "## backends"; python scripts/bench_backends.py --threads 2
echo "## the sweep (docs: 128 samples; the default is 256)"; fastflow bench --samples 128 --out bench-out
echo "## ucb arm sets"; fastflow bench --samples 128 --methods ucb-warm-a3,ucb-warm-a4 --out bench-out-arms
