#!/usr/bin/env bash
# The one device command: GPU parity checks, the SDXL table, the Flux-dev share table (issue 8), the codec's cost
# (issue 14), a 2-rank generate.
#
#   here, once:     bash benchmarks/fetch_device_wheels.sh            (diffusers wheels -> .whl/)
#   on the device:  run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=590)
#   on a CPU:       DEVICE_CHECK_SMALL=1 bash benchmarks/device_check.sh   (the same steps, tiny sizes)
#
# Everything it writes goes to $OUT (the device tool's folder that comes back; /tmp/device_check here).
# Each step has its own time limit, so that one that fails or overruns leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/steps.log"; }

log environment
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())"
} | tee "$OUT/environment.txt"

if [ -n "${DEVICE_CHECK_SMALL:-}" ]; then
  ARCH=sd15; DTYPE=float32; SIZES_A="256"; SIZES_B="256"; REPEATS=1; GEN=128; GRAPHS_A=off; GRAPHS_B=off
  CODEC_SIZE=256; CODEC_GRAPHS=off
  DIT=benchmarks/configs/flux_small.json; DIT_DTYPE=float32; DIT_SIZES="256"; DIT_BIG="512"
else
  ARCH=sdxl; DTYPE=float16; SIZES_A="1024 2048"; SIZES_B="3840"; REPEATS=10; GEN=512; GRAPHS_A="on off"; GRAPHS_B="off on"
  CODEC_SIZE=2048; CODEC_GRAPHS=on
  DIT=flux_dev; DIT_DTYPE=bfloat16; DIT_SIZES="1024 2048"; DIT_BIG="4096"
fi

# 1. Parity on the GPU, float64 tiny models: real CUDA graphs against eager steps (tests marked for CUDA),
#    and 2, 3, 4 real processes on the one GPU over gloo with CUDA tensors against one process
#    (nccl refuses several ranks on one GPU).
log "parity (pytest)"
DISTRIFUSION_BACKEND=gloo timeout 150 python3 -m pytest -q -p no:cacheprovider -rs \
  tests/test_exchange_and_graphs.py tests/test_parity.py tests/test_transformers.py 2>&1 | tee "$OUT/pytest.log"
echo "pytest exit ${PIPESTATUS[0]}" | tee -a "$OUT/steps.log"

# 2. The table: full step (diffusers eager, diffusers graph, ours with 1 rank) and one rank's share of
#    N = 2, 4, 8 with CFG split, graphs on and off. 3840² last and alone: its graphs may not fit.
log "bench $ARCH $SIZES_A"
timeout 130 python3 -m distrifusion bench --arch $ARCH --dtype $DTYPE --sizes $SIZES_A --simulate 2 4 8 \
  --graphs $GRAPHS_A --repeats $REPEATS --json "$OUT/bench_${ARCH}_a.json" 2>&1 | tee "$OUT/bench.log"
log "bench $ARCH $SIZES_B"
timeout 70 python3 -m distrifusion bench --arch $ARCH --dtype $DTYPE --sizes $SIZES_B --simulate 2 4 8 \
  --graphs $GRAPHS_B --repeats 3 --json "$OUT/bench_${ARCH}_b.json" 2>&1 | tee -a "$OUT/bench.log"

# 3. Flux-dev (bf16, eager): the full step (diffusers and ours with one rank: within 3%?) and the largest
#    share of 8 ranks with every text token on every rank and with sharded text tokens (issue 8's
#    compute-bound bounds: >= 4.5x at 1024², 6.8x at 2048², 7.4x at 4096²).
for TEXT in replicated sharded; do
  log "bench $DIT $DIT_SIZES, text $TEXT"
  timeout 60 python3 -m distrifusion bench --arch $DIT --dtype $DIT_DTYPE --sizes $DIT_SIZES --simulate 8 \
    --text-tokens $TEXT --graphs off --repeats 3 --json "$OUT/bench_dit_${TEXT}.json" 2>&1 | tee -a "$OUT/bench_dit.log"
done
log "bench $DIT $DIT_BIG, text sharded"
timeout 55 python3 -m distrifusion bench --arch $DIT --dtype $DIT_DTYPE --sizes $DIT_BIG --simulate 8 \
  --text-tokens sharded --graphs off --repeats 1 --json "$OUT/bench_dit_big.json" 2>&1 | tee -a "$OUT/bench_dit.log"

# 4. The codec's cost on the GPU (issue 14: at most 5% of a step): the largest share of 8 with its displaced
#    exchange coded residual-int2 (encode own row + decode the others', in the share's time), against step 2's
#    uncompressed share of the same size and graphs setting.
log "bench $ARCH $CODEC_SIZE, --compress residual-int2"
timeout 45 python3 -m distrifusion bench --arch $ARCH --dtype $DTYPE --sizes $CODEC_SIZE --simulate 8 \
  --compress residual-int2 --graphs $CODEC_GRAPHS --repeats $REPEATS --json "$OUT/bench_${ARCH}_codec.json" 2>&1 \
  | tee "$OUT/bench_codec.log"

# 5. The CLI end to end on the GPU with two real ranks (gloo): the embedded model, a PNG back.
log "generate --nproc 2"
DISTRIFUSION_BACKEND=gloo timeout 45 python3 -m distrifusion generate --nproc 2 --height $GEN --width $GEN \
  --steps 20 --out "$OUT/gravel_${GEN}_nproc2_gpu.png" 2>&1 | tee "$OUT/generate.log"
log done
