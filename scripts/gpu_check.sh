#!/usr/bin/env bash
# One prepared command for a lent GPU machine (16 cores, torch + transformers, no network): every GPU figure of
# issue 19 in at most 6 minutes, results in $OUT (or ./gpu-results).
#
#   ../shared/tools/gpu_wheels.sh nvidia-nvimgcodec-cu13 nvidia-nvjpeg
#                                            # here, once: wheels the GPU machine lacks -> .whl/ (carry it; about
#                                            # 45 MB; nvImageCodec for CUDA 13: take -cu12 + nvidia-nvjpeg-cu12 if
#                                            # the machine's torch is built for CUDA 12)
#   bash scripts/gpu_check.sh                # there
#   DRY=1 bash scripts/gpu_check.sh          # here, before spending device time: every step on the CPU at toy
#                                            # sizes (about 4 min on 2 cores), to catch a broken step or flag
#
# Steps (each under its own timeout, most valuable first, so a slow step costs only itself):
#   env.txt           GPU, driver, torch/CUDA/cuDNN/transformers versions, cores, FA3/varlen availability
#   gpu_tests.txt     tests/test_gpu.py (parity, decode-gpu race regression, pipeline never waits)        <= 100 s
#   decode_check.*    --decode gpu vs exact over 600 varied JPEGs through the CLI path: token cosine, pixels  <= 90 s
#   bench.txt/json    loop (vitok exact and --decode gpu vs the DataLoader loop, 3,072 JPEGs 1600x1200 -> 448
#                     class, whole processes, projected ratio at 20,000), startup (time to first batch of the
#                     full 2B tower from a checkpoint, phases), JPEG decoders alone (exact on 16 cores,
#                     torchvision nvJPEG, nvImageCodec's hardware engines when carried), encoder MFU, attention
#                     kernel sweep                                                                    the rest
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-gpu-results}"
mkdir -p "$RESULTS"
started=$SECONDS
if [ -n "${DRY:-}" ]; then  # the same steps on the CPU at toy sizes: checks the commands, measures nothing
  DEVICE=cpu MODEL=qwen3-vl-tiny IMAGES=12 MAX_SIDE=400 LOOP="--loop-images 24 --loop-workers 2 --naive-batch 4 \
    --jpeg-size 640x480" FULL="" STRETCH=3
else
  DEVICE=cuda MODEL=qwen3-vl-2b IMAGES=600 MAX_SIDE=1600 LOOP="--loop-images 3072 --loop-workers 12 --naive-batch 16 \
    --jpeg-size 1600x1200" FULL=--full STRETCH=1
fi
wheels=$(ls .whl/*.whl 2>/dev/null | grep -v "/nvidia_")
if [ -n "$wheels" ]; then  # simplejpeg, braceexpand, a newer transformers (gpu_wheels.sh)
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $wheels 2>&1 | tail -3
  if ! PYTHONPATH=/tmp/site python3 -c "import transformers.models.qwen3_vl.modeling_qwen3_vl" 2>/dev/null; then
    echo "the carried transformers does not import here; keeping the machine's" | tee "$RESULTS/wheels.txt"
    rm -rf /tmp/site/transformers /tmp/site/transformers-*
  fi
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if ls .whl/nvidia_nvimgcodec*.whl >/dev/null 2>&1; then  # nvImageCodec (+ nvjpeg) for the decoders section
  # apart from /tmp/site: its nvidia/__init__.py there would hide torch's nvidia packages; joined by the bench
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/nvimg .whl/nvidia_*.whl 2>&1 | tail -3
  export VITOK_BENCH_NVIDIA_PATH=/tmp/nvimg/nvidia
  LD_LIBRARY_PATH="$(find /tmp/nvimg -name 'libnvjpeg.so*' -printf '%h:' | head -c 4096)${LD_LIBRARY_PATH:-}"
  export LD_LIBRARY_PATH
fi
export PYTHONUNBUFFERED=1 VITOK_CACHE_DIR="${VITOK_CACHE_DIR:-/tmp/vitok-cache}"
{
  echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
  python -c "
import importlib.util as u, torch, torchvision, transformers
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(),
      'torchvision', torchvision.__version__, 'transformers', transformers.__version__)
print('varlen_attn', u.find_spec('torch.nn.attention.varlen') is not None,
      'fa3', any(u.find_spec(m) is not None for m in ('flash_attn_interface', 'flash_attn_3')),
      'simplejpeg', u.find_spec('simplejpeg') is not None, 'nvimgcodec', u.find_spec('nvidia.nvimgcodec') is not None)"
  echo "cores $(nproc)"
} 2>&1 | tee "$RESULTS/env.txt"

timeout $((100 * STRETCH)) python -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu.py 2>&1 | tail -60 \
  | tee "$RESULTS/gpu_tests.txt"
echo "# tests done at $((SECONDS - started)) s" | tee -a "$RESULTS/env.txt"

timeout $((90 * STRETCH)) python -m vitok.bench.decode_check --device $DEVICE --model $MODEL --images $IMAGES \
  --max-side $MAX_SIDE \
  --max-pixels 200704 --out "$RESULTS" 2>&1 | grep -v "NO CHECKPOINT" | tail -60 > "$RESULTS/decode_check.txt"
echo "# decode check done at $((SECONDS - started)) s (exit ${PIPESTATUS[0]})" | tee -a "$RESULTS/env.txt"

# What is left of the 6 minutes goes to the benchmark (its rows are written to bench.json as they come).
left=$(( 355 * STRETCH - (SECONDS - started) ))
# shellcheck disable=SC2086  # $LOOP and $FULL are lists of flags
timeout "$left" python -m vitok.bench --device $DEVICE $FULL \
  --sections "${BENCH_SECTIONS:-loop,startup,decoders,encoder,attention}" $LOOP --max-pixels 200704 \
  --process-repeats 1 --iters 5 --tar-images 0 --json "$RESULTS/bench.json" 2>&1 \
  | grep -v "NO CHECKPOINT\|Loading weights\|Writing model" | tee "$RESULTS/bench.txt"
echo "# all done at $((SECONDS - started)) s" | tee -a "$RESULTS/env.txt"
