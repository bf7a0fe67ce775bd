#!/usr/bin/env bash
# The GPU check for a lent device machine (see the device tool): CUDA tests, then GPU benchmarks.
# Run from the repository root; results go to $OUT (default /tmp/torchwatch-gpu). About 8 minutes.
#   device run: bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/torchwatch-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

# the CPU kernel, built in place (the machine has no package registry; the build needs none)
timeout 120 $PY setup.py -q build_ext --inplace > "$OUT/build.txt" 2>&1 || echo "C kernel build failed (torch-ops path used on CPU)" | tee -a "$OUT/build.txt"

timeout 300 $PY -m pytest -q -p no:cacheprovider -o addopts="" --timeout=240 \
  tests/test_cuda.py tests/test_triton_kernel.py tests/test_compile.py tests/test_watch.py tests/test_stats.py 2>&1 \
  | tail -40 | tee "$OUT/tests.txt"

timeout 420 $PY benchmarks/gpu_overhead.py --json "$OUT/gpu.json" 2>&1 | grep -v Warning | tail -40 | tee "$OUT/bench.txt"
