#!/usr/bin/env bash
# On a machine with a GPU and a CUDA torch already installed: build cnnext for that GPU and run
# the CUDA tests and benchmarks, one stage per argument, logs under $OUT (default build/gpu-out).
#   tools/gpu_run.sh info build test bench
# Stages: info (GPU, torch, nvcc), build (cnnext._C with CUDA for the visible GPU's arch only),
# test (every test whose id names cuda, PYTEST_ARGS appended), bench (benchmarks/run.py
# --device cuda, BENCH_ARGS appended).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-build/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CNNEXT_CUDA=1 CNNEXT_EMU=${CNNEXT_EMU:-0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
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
status=0
for stage in "$@"; do
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
      $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || status=1
      tail -3 "$OUT/build.log"
      $PY -m cnnext || status=1
      ;;
    test)
      # shellcheck disable=SC2086
      $PY -m pytest -q -p no:cacheprovider -k cuda ${PYTEST_ARGS:-} tests >"$OUT/test.log" 2>&1 ||
        status=1
      grep -E "^(FAILED|ERROR)" "$OUT/test.log" | head -40
      tail -3 "$OUT/test.log"
      ;;
    bench)
      # shellcheck disable=SC2086
      $PY benchmarks/run.py --device cuda --out "$OUT/bench" ${BENCH_ARGS:-} \
        >"$OUT/bench.log" 2>&1 || status=1
      tail -40 "$OUT/bench.log"
      ;;
    *)
      echo "unknown stage $stage" >&2
      exit 2
      ;;
  esac
  echo "== $stage: $(($(date +%s) - start)) s"
done
exit $status
