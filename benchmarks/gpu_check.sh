#!/usr/bin/env bash
# The GPU check for a lent device machine (see the device tool): CUDA tests, then GPU benchmarks.
# Run from the repository root; results go to $OUT (default /tmp/torchwatch-gpu). At most ~10 minutes:
# tests 3, integrity benchmark 2, compile probe 3, overhead benchmark $BENCH_S seconds (default 0 = skipped;
# its results are rewritten after every section, so a cut-short run still leaves numbers in gpu.json).
#   device run: bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/torchwatch-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HYPOTHESIS_MAX_EXAMPLES=${HYPOTHESIS_MAX_EXAMPLES:-40}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

timeout 60 $PY benchmarks/_sync_probe.py 2>&1 | tee "$OUT/sync_probe.txt"

# CPU statistics use the torch-ops twin here (the C kernel is not built: CI tests it).
timeout 200 $PY -m pytest -q -p no:cacheprovider -o addopts="" --timeout=120 -rfE --tb=short \
  tests/test_cuda.py tests/test_triton_kernel.py tests/test_fingerprint.py tests/test_latency.py > "$OUT/tests.txt" 2>&1
echo "pytest exit $?" >> "$OUT/tests.txt"
tail -60 "$OUT/tests.txt"

# manifest hashing on this host's cores, fingerprint TB/s on the GPU, BERT-base self-test on CPU and GPU
timeout 150 $PY benchmarks/integrity.py --repeats 3 --json "$OUT/integrity.json" 2>&1 | grep -v -i warn \
  | tee "$OUT/integrity.txt" | tail -25

# does a compiled BERT-base launch the stats kernel for every watched output? (RESULTS.md: unverified)
timeout 170 $PY benchmarks/_compile_probe.py 2>&1 | grep -v -i warn | tail -20 | tee "$OUT/compile_probe.txt"

[ "${BENCH_S:-0}" -gt 0 ] && timeout "$BENCH_S" $PY benchmarks/gpu_overhead.py --models ${MODELS:-bert} --json "$OUT/gpu.json" 2>&1 \
  | grep -v Warning | tee "$OUT/bench.txt" | tail -30
