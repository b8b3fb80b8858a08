#!/usr/bin/env bash
# On a machine with a GPU and a CUDA torch already installed: build cnnext for that GPU and run
# the CUDA checks and benchmarks, one stage per argument, logs under $OUT (default build/gpu-out).
#   tools/gpu_run.sh all            # = info build sass test racecheck bench, ~10 min on an H100
#   tools/gpu_run.sh info build test bench
# Stages:
#   info       GPU, torch, nvcc
#   build      cnnext._C with CUDA for the visible GPU's arch only
#   sass       tests/test_sass.py: register/spill/division/LDS.128/FFMA gates on the build's SASS
#   test       every test whose id names cuda (PYTEST_ARGS appended)
#   racecheck  compute-sanitizer racecheck (shared-memory hazards) on the direct convolution's
#              cuda tests (RACECHECK_TESTS overrides them), at most RACECHECK_TIMEOUT s
#   bench      python -m benchmarks.run --device cuda $BENCH_ARGS: cuDNN with cudnn.benchmark on
#              is the main baseline (off stays a column), fp32 = TF32 off on both sides
# Each stage is bounded by timeout (STAGE_TIMEOUT, default 300 s; racecheck its own) so one run
# fits the time it was lent.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-build/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CNNEXT_CUDA=1 CNNEXT_EMU=${CNNEXT_EMU:-0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-300}
RACECHECK_TIMEOUT=${RACECHECK_TIMEOUT:-120}
if [ -z "${RACECHECK_TESTS:-}" ]; then
  RACECHECK_TESTS='tests/test_conv2d.py -k "cuda and direct and matches_torch"'
fi
# The issue-16 targets: ResNet-18 / VGG layers at batch 32 (and 128), fp32, the new direct
# kernel (variant auto) and im2col, one short round each.
if [ -z "${BENCH_ARGS:-}" ]; then
  BENCH_ARGS="--only conv --precisions fp32 --batches 32,128 --layers vgg11|resnet18"
  BENCH_ARGS+=" --direct-variants auto --min-time 0.01 --rounds 1"
fi
# The system compiler where there is one: on the lent H100 image the g++ first on PATH
# (/opt/gcc/bin) links libstdc++ statically, and the first TORCH_CHECK message then crashed
# (SIGSEGV in std::ostream inside cnnext._C) instead of raising.
if [ -x /usr/bin/g++ ] && [ -z "${GPU_KEEP_CXX:-}" ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi
stages=("$@")
if [ "${#stages[@]}" -eq 1 ] && [ "${stages[0]}" = all ]; then
  stages=(info build sass test racecheck bench)
fi
status=0
for stage in "${stages[@]}"; do
  start=$(date +%s)
  case $stage in
    info)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
      $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())"
      nvcc --version | tail -2
      echo "arch $TORCH_CUDA_ARCH_LIST, $(nproc) cores"
      ;;
    build)
      timeout "$STAGE_TIMEOUT" $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || status=1
      tail -3 "$OUT/build.log"
      $PY -m cnnext || status=1
      ;;
    sass)
      timeout "$STAGE_TIMEOUT" $PY -m pytest -q -s -p no:cacheprovider tests/test_sass.py \
        >"$OUT/sass.log" 2>&1 || status=1
      grep -E "^(arch|sm_|FAILED|ERROR)|kernel instances" "$OUT/sass.log" | cut -c1-160 | head -60
      tail -3 "$OUT/sass.log"
      ;;
    test)
      # shellcheck disable=SC2086
      timeout "$STAGE_TIMEOUT" $PY -m pytest -q -p no:cacheprovider -k cuda ${PYTEST_ARGS:-} tests \
        >"$OUT/test.log" 2>&1 || status=1
      grep -E "^(FAILED|ERROR)" "$OUT/test.log" | head -40
      tail -3 "$OUT/test.log"
      ;;
    racecheck)
      sanitizer=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
      if [ ! -x "$sanitizer" ]; then
        echo "racecheck: no compute-sanitizer on PATH or in $CUDA_HOME/bin"
        status=1
        continue
      fi
      # Hazards are reported as errors; a timeout (124) means the tests did not all run.
      eval "timeout $RACECHECK_TIMEOUT $sanitizer --tool racecheck --racecheck-report hazard \
        --error-exitcode 3 --print-limit 20 $PY -m pytest -q -x -p no:cacheprovider \
        $RACECHECK_TESTS" >"$OUT/racecheck.log" 2>&1
      rc=$?
      [ $rc -eq 0 ] || status=1
      grep -E "RACECHECK SUMMARY|hazard|Error|passed|failed" "$OUT/racecheck.log" | head -20
      echo "racecheck exit $rc (124: timed out after $RACECHECK_TIMEOUT s)"
      ;;
    bench)
      # shellcheck disable=SC2086
      timeout "$STAGE_TIMEOUT" $PY -m benchmarks.run --device cuda --out "$OUT/bench" \
        ${BENCH_ARGS} >"$OUT/bench.log" 2>&1 || status=1
      grep -A40 "Geometric-mean speed-ups" "$OUT/bench.log"
      tail -3 "$OUT/bench.log"
      ;;
    *)
      echo "unknown stage $stage" >&2
      exit 2
      ;;
  esac
  echo "== $stage: $(($(date +%s) - start)) s"
done
exit $status
