#!/usr/bin/env bash
# One prepared command for a lent GPU machine (PyTorch + transformers, no network):
#   bash scripts/gpu_check.sh        -> GPU-marked tests (--decode gpu included), a kernel profile, then the
#                                       benchmark (its data section compares --decode gpu with exact); results under $OUT
#                                       (or ./gpu-results). About 3 minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-gpu-results}"
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'transformers', transformers.__version__); import importlib.util as u; print('varlen_attn', u.find_spec('torch.nn.attention.varlen') is not None)"
  nproc
} 2>&1 | tee "$RESULTS/env.txt"
timeout 150 python -m pytest -p no:cacheprovider -q -s -m gpu tests/test_gpu.py 2>&1 | tail -150 | tee "$RESULTS/gpu_tests.txt"
[ -n "${SKIP_PROFILE:-}" ] || timeout 60 python scripts/profile_encoder.py --device cuda --full 2>&1 | tail -30 > "$RESULTS/profile.txt"
timeout 300 python -m vitok.bench --device cuda --full --images 2048 --naive-images 256 --data-images 64 \
  --jpeg-size 1600x1200 --max-pixels 200704 --naive-batch 16 --iters 5 --sections "${BENCH_SECTIONS:-encoder,data,e2e,memory}" --json "$RESULTS/bench.json" 2>&1 \
  | grep -v "NO CHECKPOINT\|Loading weights\|Writing model" | tee "$RESULTS/bench.txt"
