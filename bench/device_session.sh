#!/bin/bash
# The open GPU goals in two device calls, each step time-boxed, logs and JSON under $OUT (7 files at
# most; the machine's start comes on top, out of the session's 15 minutes). Before the calls, here:
#
#   echo /.whl/ >> .git/info/exclude && mkdir -p .whl && cp ../shared/gpu/wheels/*.whl .whl/
#
# and run it with `carry: [".whl"]`, command `OUT=$OUT bash bench/device_session.sh tests` (about 5
# minutes at most), then `... bench` (about 8); one call is at most 10 minutes. It writes:
#   env.txt     GPU, versions, whether torch has varlen_attn
#   steps.log   every step's output, its exit status and seconds: `tests`, the CUDA tests of the
#               packed per-image counts (varlen_attn in bf16, batch independence), the masked twin,
#               the ragged and dense kernels and the ICE score (issues 24, 23), explain mode
#               captured in a CUDA graph (issue 22); `bench`, the runs
#   policy.json DeiT-S bf16 batch 256 on SyntheticScenes, random weights: fixed keep 0.7 / 0.5, ICE
#               and EViT keep policies (the values of docs/benchmarks.md's CPU run: a random head's
#               foreground probabilities lie near 1 - 1/1001), each packed and padded-and-masked
#               (issue 24's GPU goals)
#   shares.json the policy at fixed keep 0.5's own counts, packed and masked: the bookkeeping alone
#   t256.json   the throughput table with explain mode, batch 256, CUDA graphs (issues 22, 23)
#   bd.json     the per-stage breakdown (issue 23)
#   kernels.json the ICE score kernel per call at B = 256 / 1024: plain, with the top class, and
#               writing explain mode's map from its epilogue (issues 22, 23)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder the results go to}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import sys, torch, triton, timm; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__, timm.__version__)"
  python3 -c "import torch.nn.attention.varlen as v, inspect; print('varlen_attn', inspect.signature(v.varlen_attn))" 2>&1 | tail -1
  date -u
} > "$OUT/env.txt" 2>&1

step() {  # step SECONDS COMMAND...: time-boxed, its output, exit status and seconds in steps.log
  local limit=$1 start=$SECONDS
  shift
  echo "=== $*" >> "$OUT/steps.log"
  timeout "$limit" "$@" >> "$OUT/steps.log" 2>&1
  echo "=== rc $? $((SECONDS - start)) s" >> "$OUT/steps.log"
}

group=${1:-tests}
if [ "$group" = tests ]; then
  step 100 python3 -m pytest -q -p no:cacheprovider -rs tests/test_packed.py tests/test_masked.py \
    tests/test_ragged.py
  step 130 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_ice_score.py \
    -m "gpu or not slow"
  step 60 python3 -m pytest -q -p no:cacheprovider -rs tests/test_explain_mode.py \
    -k "cuda_graph or compile or few_ops"
elif [ "$group" = bench ]; then
  step 130 python3 bench/throughput.py --device cuda --dtype bf16 --batch-size 256 --reps 20 \
    --keep-rates 0.7 0.5 --thresholds 0.9989 0.999 0.9991 --masses 0.6 0.8 --masked \
    --images synthetic --no-compile --json "$OUT/policy.json"
  step 70 python3 bench/throughput.py --device cuda --dtype bf16 --batch-size 256 --reps 20 \
    --keep-rates 0.5 --thresholds 0.5 --policy-min-share 0.5 --policy-max-share 0.5 --masked \
    --images synthetic --no-compile --json "$OUT/shares.json"
  step 130 python3 bench/throughput.py --device cuda --dtype bf16 --batch-size 256 --reps 20 \
    --explain --cuda-graphs --json "$OUT/t256.json"
  step 60 python3 bench/breakdown.py --device cuda --dtype bf16 --batch-size 256 --json "$OUT/bd.json"
  step 60 python3 -m pytest -q -p no:cacheprovider bench/test_kernels.py -k "test_ice_score and triton" \
    --benchmark-only --benchmark-json "$OUT/kernels.json"
else
  echo "usage: OUT=folder bash bench/device_session.sh tests|bench" >&2
  exit 2
fi
