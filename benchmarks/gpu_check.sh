#!/usr/bin/env bash
# The checks that need a GPU machine, in one run (about 6 minutes on one H200 and 16 cores):
#   1. tests/cuda: the CUDA path (syncs per step seen by CUDA itself, values equal torch's,
#      numbers unchanged, NaN origin, fp16 GradScaler, bf16 attention probes);
#   2. overhead.py --device cuda: the default watch against plain and the fetched-norm floor;
#   3. distributed.py with 4 ranks on a machine with a core per rank (gloo, CPU).
# Usage: benchmarks/gpu_check.sh OUTDIR   (python3 with torch; the repo's src/ is used as is)
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{ nvidia-smi -L; nproc; $py -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"; } 2>&1 | tee "$out/machine.txt"
timeout 180 $py -m pytest tests/cuda -v -p no:cacheprovider 2>&1 | tee "$out/cuda_tests.log"
timeout 150 $py benchmarks/overhead.py --device cuda --workloads W1,W2,W3,W4 --methods gv_default,norm_fetch,norm_floor \
    --rounds 5 --no-record --out "$out/gpu-overhead.json" 2>&1 | tee "$out/gpu-overhead.log"
timeout 120 $py benchmarks/overhead.py --device cuda --workloads W3L --methods gv_default,norm_fetch \
    --rounds 3 --no-record --out "$out/gpu-overhead-w3l.json" 2>&1 | tee "$out/gpu-overhead-w3l.log"
timeout 150 $py benchmarks/distributed.py --ranks 4 --rounds 5 --steady-from-start \
    --out "$out/dist4.json" 2>&1 | tee "$out/dist4.log"
