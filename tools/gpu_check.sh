#!/usr/bin/env bash
# Issue 17's GPU checks, in one call of a lent GPU machine (the device tool). Prepared here, at no device time:
#   bash ../shared/tools/mlx-cuda-wheels.sh   # MLX's CUDA build in two halves, .dev-gpu-a/ and .dev-gpu-b/ (it
#                                             # empties both first, so it runs first)
#   bash tools/gpu_check.sh --wheels          # diffusers' wheel (not on that machine) into .dev-gpu-b/
# Then two device calls, the second within 30 s of the first (carried sizes: 47 MB and 50 MB, plus the tree):
#   carry [".dev-gpu-a"]: mkdir -p /root/stash && cp .dev-gpu-a/* /root/stash/
#   carry [".dev-gpu-b"]: the install line that script prints, then `&& bash tools/gpu_check.sh [MODELS...]`
# A later call on the same warm machine: `export PYTHONPATH=/tmp/site:$PWD && TEST_SECONDS=0 bash
# tools/gpu_check.sh sdxl` (carry [".dev-gpu-b"] again if diffusers must be installed anew).
#
# What it runs:
#   1. the MLX engine's GPU paths on `mx.default_device()`: tests/test_mlx_memory.py (fused, chunked and padded
#      attention, VAE bands, quantized products), the quantization and bench-meter tests;
#   2. `python -m backend bench` at fp16 with q8 and q4 rows, MLX on the GPU against diffusers on CUDA, memory
#      from each engine's allocator (backend/bench_devices.py): SD 1.5's denoiser step, pipeline and whole
#      generation first, then the text encoder and VAE rows of the models given (default: sd-1.5 sd3-medium).
#
# Everything lands in $OUT (the device tool brings it back): gpu.txt, tests.log, bench.log, bench-memory.json,
# bench-stages.json. Budget, about 8 minutes in all: the tests stop after TEST_SECONDS (default 120; 0 skips them),
# the two bench runs after BENCH_SECONDS (210) and BENCH2_SECONDS (150); rows printed before a stop are in bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then  # here, with network: diffusers (pure Python) for the GPU machine's Python 3.12
    mkdir -p .dev-gpu-b
    grep -qx '/.dev-gpu-b/' .git/info/exclude 2>/dev/null || echo '/.dev-gpu-b/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .dev-gpu-b \
        "diffusers==${DIFFUSERS_VERSION:-0.42.1}"
    ls -la .dev-gpu-b
    exit 0
fi

out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ! python3 -c "import diffusers" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .dev-gpu-b/*.whl || exit 1
fi
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(sd-1.5 sd3-medium)

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import mlx.core as mx, torch, diffusers; print('mlx', mx.__version__, mx.default_device(), \
'| torch', torch.__version__, torch.cuda.get_device_name(0), '| diffusers', diffusers.__version__)"
} 2>&1 | tee "$out/gpu.txt"

if [ "${TEST_SECONDS:-120}" -gt 0 ]; then  # TEST_SECONDS=0: the bench alone (a later call, e.g. for sdxl)
    timeout "${TEST_SECONDS:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_mlx_memory.py \
        tests/test_mlx_quantize.py tests/test_bench_devices.py tests/test_bench.py tests/test_bench_generation.py 2>&1 | tee "$out/tests.log"
fi

# First what the issue's GPU targets rest on (quantized steps against fp16, a generation's peak memory against
# diffusers'), then the other stages and SD3 Medium's transformer at 1024, as long as the budget lasts.
bench=(python3 -m backend bench --precisions fp16 --quantizations none q8 q4 --repeats 5)
unets=()
for m in "${models[@]}"; do [ "$m" = sd3-medium ] || unets+=("$m"); done
if [ ${#unets[@]} -gt 0 ]; then
    timeout "${BENCH_SECONDS:-210}" "${bench[@]}" --models "${unets[@]}" --parts unet pipeline generation \
        --out "$out/bench-memory.json" 2>&1 | tee "$out/bench.log"
fi
timeout "${BENCH2_SECONDS:-150}" "${bench[@]}" --models "${models[@]}" --parts text_encoder vae_decode \
    --sd3-sizes 1024 --sd3-engines mlx diffusers --out "$out/bench-stages.json" 2>&1 | tee -a "$out/bench.log"
