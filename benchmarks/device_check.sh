#!/usr/bin/env bash
# The one device command (issue 20): GPU parity with CUDA graphs first, then the SDXL and Flux-dev tables, Flux-dev
# with the first-block cache (issue 26), the VAE, Wan 2.1 video and its VAE (issue 23), the codec's cost,
# torch.compile and the command line; every result back, within 300 s of device time.
#
#   here, once:     bash benchmarks/fetch_device_wheels.sh                  (diffusers wheels -> .whl/)
#   on the device:  run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=330)
#   a rerun of some steps:  run(command="DEVICE_CHECK_STEPS='flux compile' bash benchmarks/device_check.sh", ...)
#   on a CPU:       DEVICE_CHECK_SMALL=1 bash benchmarks/device_check.sh    (the same steps, tiny sizes;
#                   tests/test_device_check.py runs it)
#
# What comes back ($OUT; /tmp/device_check elsewhere), three files, each written the moment a step ends:
#   results.jsonl      one JSON line per step: status (ok, failed, timed out, skipped), seconds, its limit, and
#                      its measurements (bench rows, pytest's verdict and failures, generate's summary line)
#   device_check.log   every step's output, in order (the end of each, 200 kB at most)
#   artifacts.tar.gz   each step's full log, rows (.jsonl) and images, packed anew after every step
# A step that fails, runs out of memory or hangs is killed at its limit; the others keep their results. The
# runner (benchmarks/device_check.py) never gives a step more than what is left of the 300 s.
#
# The budget (H100, 80 GB; figures for the H100 from KINDS.md: 798 TFLOP/s bf16 matrix products, 3 TB/s).
# FLOPs counted on the meta device with torch.utils.flop_counter (this model code, batch as the pipelines
# call it). Rates assumed: 400 TFLOP/s for large fp16/bf16 steps (half the matrix-product peak); SDXL at 1024²
# is launch-bound: 82 ms eager, 43 ms as a CUDA graph (DESIGN.md, measured on an H100); the VAE decode
# 100 TFLOP/s (DESIGN.md: 3840² in 2.9 s = 86 TFLOP/s). A share runs 2 eager traffic calls, then (with graphs)
# warm-up + capture + R timed calls for its synchronous and its displaced step: 7 + 2R calls. A process
# start (python, torch, diffusers, CUDA) ~6 s; forked steps inherit the imports (~1 s).
#
# | step            | what it runs on the H100                                        | estimate | limit | CPU small: cpu, wall | small limit |
# |-----------------|-----------------------------------------------------------------|----------|-------|----------------------|-------------|
# | (setup)         | wheels installed, runner imports torch + diffusers               |     10 s |  10 s | 7 s, 36 s            |      -      |
# | environment     | versions, GPU name and memory, driver, NCCL                     |      3 s |   5 s | 0.0 s, 0.4 s         |     30 s    |
# | graphs          | pytest -k real_cuda: 4 tests, tiny float64 models, ~100 calls    |     12 s |  20 s | 12 s, 67 s (skipped) |    150 s    |
# |                 | of ~20 ms (launch-bound) + pytest start and collection 6 s      |          |       |                      |             |
# | parity          | pytest, 4 gloo ranks on cuda:0: test_parity (~250 tiny calls a   |     50 s |  70 s | 13 s, 76 s (collect) |    150 s    |
# |                 | rank, ~25 ms each with gloo's host copies: ~6 s; spawn ~8 s) and |          |       |                      |             |
# |                 | test_transformers (~150 calls: ~4 s; spawn ~8 s); references and |          |       |                      |             |
# |                 | the thread simulation on the CPU ~8 s; pytest start 6 s         |          |       |                      |             |
# | sdxl            | build 2 s. 1024², R=5: full 6x82 + 7x43 + 7x43 ms = 1.1 s; three |     20 s |  30 s | 4.6 s, 27 s          |     60 s    |
# |                 | shares 17 calls (7 eager x 60 ms, 10 graphed x <=17 ms) = 1.8 s; |          |       |                      |             |
# |                 | the same shares eager 3x17x60 ms = 3.1 s. 2048² (71.8 TFLOP =    |          |       |                      |             |
# |                 | 0.18 s), R=3: full 14 calls = 2.5 s; shares 13 x (90+45+22 ms) = |          |       |                      |             |
# |                 | 2.1 s. 3840² (465 TFLOP = 1.16 s): eager full 2 calls = 2.3 s,   |          |       |                      |             |
# |                 | share of 8 (58.3 TFLOP = 0.15 s) 7 calls = 1.0 s. First calls of |          |       |                      |             |
# |                 | each shape ~1 s each: ~3 s                                      |          |       |                      |             |
# | flux            | build (12B params) 3 s. 1024² (74.4 TFLOP = 0.19 s), R=3: full   |     25 s |  35 s | 4.4 s, 26 s          |     60 s    |
# |                 | 14 calls = 2.7 s; shares of 8 (9.3 TFLOP) 2 x 13 x 25 ms = 0.7 s.|          |       |                      |             |
# |                 | 2048² (418 TFLOP = 1.05 s): eager full 2 calls = 2.1 s; shares   |          |       |                      |             |
# |                 | (52.3 TFLOP = 0.13 s) 2 x 7 calls = 1.8 s. 4096²: full step left |          |       |                      |             |
# |                 | out (3.9 PFLOP = 9.8 s a call, >= 2 calls); share of 8 (489      |          |       |                      |             |
# |                 | TFLOP = 1.22 s) 4 calls = 4.9 s (K/V of 57 layers: ~46 GB + 24 GB|          |       |                      |             |
# |                 | weights: it may not fit; then "failed" with the rest kept).      |          |       |                      |             |
# |                 | Memory plan vs peak at 1024², whole step (issue 25): counting on |          |       |                      |             |
# |                 | the meta device 5.5 s of CPU (measured here) + 3 calls 0.6 s +   |          |       |                      |             |
# |                 | the allocator emptied ~1 s: +7 s                                 |          |       |                      |             |
# | fbcache         | build 3 s. 1024², 1 + 20 + 20 calls (warm-up, no cache,         |     12 s |  15 s | 0.8 s, 2.7 s         |     40 s    |
# |                 | first-block cache) of at most 0.19 s each (74.4 TFLOP; fewer    |          |       |                      |             |
# |                 | with skips): <= 7.8 s; first calls ~1 s                         |          |       |                      |             |
# | vae             | 1024² (10.5 TFLOP = 0.1 s): whole 4 calls, shares 2/4/8 12 calls:|      8 s |  15 s | 2.9 s, 16 s          |     40 s    |
# |                 | 0.8 s; 2048² (48.5 TFLOP = 0.49 s): whole 3 + share 3 calls =    |          |       |                      |             |
# |                 | 1.7 s; 3840² share of 8 (31 TFLOP) 1 call 0.3 s + its bound on   |          |       |                      |             |
# |                 | the meta device 1 s; first calls ~2 s                           |          |       |                      |             |
# | wan             | Wan2.1-1.3B 480x832 x 81 (32,760 tokens; 283 TFLOP a call = 0.71 |     17 s |  25 s | 4.6 s, 4.8 s (idle)  |     60 s    |
# |                 | s): build 2 s; full step eager 2 calls 1.4 s; shares of 2/4/8,   |          |       |                      |             |
# |                 | eager, sync untimed: ~5 calls each x (0.35+0.18+0.09 s) = 3.1 s; |          |       |                      |             |
# |                 | first calls ~2 s. Wan VAE decode x 17 frames (58.6 TFLOP = 0.59  |          |       |                      |             |
# |                 | s at 100 TFLOP/s): whole 2 calls + shares 2/4/8 2 calls each =   |          |       |                      |             |
# |                 | 2.2 s; cuDNN's first Conv3d calls ~4 s                          |          |       |                      |             |
# | codec           | build 2 s; 2048² share of 8 (9.1 TFLOP = 23 ms), R=5, 17 calls,  |      5 s |  10 s | 1.6 s, 8 s           |     30 s    |
# |                 | uncompressed and residual-int2: 2 x 0.5 s                       |          |       |                      |             |
# | compile         | tiny UNet 256² (launch-bound): eager share 13 calls; compiled   |     25 s |  35 s | 20 s, 108 s (dynamo) |    220 s    |
# |                 | (inductor): ~20 graph pieces between the exchanges, Triton       |          |       |                      |             |
# |                 | compiles ~1 s each on 16 cores                                  |          |       |                      |             |
# | generate        | CLI, 2 ranks (gloo, one GPU): 3 process starts in parallel ~8 s, |     10 s |  15 s | 18 s, 53 s (32², 2)  |    120 s    |
# |                 | 20 steps of the embedded UNet at 512² (~20 GFLOP, launch-bound)  |          |       |                      |             |
# | generate_graphs | CLI, 1 rank, CUDA graphs, 1024², 20 steps: start 6 s + ~1 s      |      8 s |  15 s | 9 s, 45 s (32², 2)   |     90 s    |
# | total           |                                                                 |    205 s | 300 s | 101 s, 436 s         |             |
#
# Each limit is 1.4 to 3 times its estimate: the small steps get the widest margin (seconds cost little), the
# two long ones (parity, compile: the compile estimate is a guess, nothing measured on a GPU) the narrowest,
# so that together they stay under 300 s; the runner clips a step to what is left, so the total holds
# whatever happens (a step that times out says so in results.jsonl, with the rows it wrote before). "CPU small": the small mode on our 2-core CPU (torch 2.13), CPU seconds of the step's processes
# (about its time on idle cores) and wall seconds while ~8 other jobs shared the cores (load average ~25);
# its limits are about twice that loaded wall time (SMALL_BUDGET_S: 1000 s).
set -uo pipefail
cd "$(dirname "$0")/.."
export DEVICE_CHECK_T0=${DEVICE_CHECK_T0:-$(date +%s.%N)}
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
if [ -z "${DEVICE_CHECK_SMALL:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then  # the device has no diffusers
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$OUT/device_check.log" 2>&1 || echo "device_check: installing .whl/ failed (see device_check.log)"
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTORCH_NVML_BASED_CUDA_CHECK=1
# shellcheck disable=SC2086  # DEVICE_CHECK_STEPS and DEVICE_CHECK_INJECT are word lists
exec python3 benchmarks/device_check.py --out "$OUT" ${DEVICE_CHECK_SMALL:+--small} \
  ${DEVICE_CHECK_STEPS:+--steps $DEVICE_CHECK_STEPS} ${DEVICE_CHECK_INJECT:+--inject $DEVICE_CHECK_INJECT}
