#!/usr/bin/env bash
# The checks that need a GPU machine, in one run (under 10 minutes on one H200 and 16 cores; the
# parts' limits are sized from a run there: the 4-rank benchmark at 5 rounds took about 45 s per
# strategy for ddp and tp and 107 s for fsdp2, tests/cuda 16 s, overhead W1+W3 at 3 rounds 77 s;
# the W3L step is 31 ms). Give the call a limit of 600 s: the last part may be cut short.
#   1. distributed.py with 4 ranks on a machine with a core per rank (gloo, CPU): the 5% bar;
#   2. tests/cuda: the CUDA path (syncs per step seen by CUDA itself, values equal torch's,
#      numbers unchanged, NaN origin, fp16 GradScaler, bf16 attention probes);
#   3. overhead.py --device cuda: the default watch against plain and the fetched-norm floor.
# Everything printed goes to OUTDIR/gpu_check.log, the results to OUTDIR/*.json (five files).
# Each part has its own time limit, so one that hangs costs the others nothing.
# Usage: benchmarks/gpu_check.sh OUTDIR   (python3 with torch; the repo's src/ is used as is)
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
log=$out/gpu_check.log
part() { echo "=== $* ($(date +%T))"; }
{
  part machine; nvidia-smi -L; nproc; $py -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
  part distributed tp  # 9 rounds: its ratio was the closest to the bar and the widest spread there
  timeout 120 $py benchmarks/distributed.py --ranks 4 --rounds 9 --steady-from-start --strategies tp \
      --out "$out/dist4-tp.json"
  part distributed ddp,fsdp2
  timeout 180 $py benchmarks/distributed.py --ranks 4 --rounds 5 --steady-from-start --strategies ddp,fsdp2 \
      --out "$out/dist4-ddp-fsdp2.json"
  part tests/cuda
  timeout 60 $py -m pytest tests/cuda -v -p no:cacheprovider
  part overhead cuda
  timeout 150 $py benchmarks/overhead.py --device cuda --workloads W1,W2,W3,W4 --methods gv_default,norm_fetch \
      --rounds 3 --no-record --out "$out/gpu-overhead.json"
  part overhead cuda W3L
  timeout 120 $py benchmarks/overhead.py --device cuda --workloads W3L --methods gv_default,norm_fetch \
      --rounds 3 --no-record --out "$out/gpu-overhead-w3l.json"
  part end
} 2>&1 | tee "$log"
