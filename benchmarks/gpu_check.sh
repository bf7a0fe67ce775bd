#!/usr/bin/env bash
# The GPU check for a lent device machine (see the device tool): CUDA tests, then GPU benchmarks,
# in order of what matters most, each under its own timeout so the whole fits one 600 s call:
#   sync probe 40 s, CUDA tests 200 s (grouped launches under no_grad and inference_mode, no host
#   sync), overhead benchmark $BENCH_S s (default 300; the stats kernel's bandwidth first, then
#   BERT/GPT-2 batch 1 under no_grad and inference_mode, GPT-2 decoding, batch 32, compile; its
#   results are rewritten to gpu.json after every section, so a run cut short still leaves numbers).
# EXTRA=1 adds the integrity benchmark and the compile probe (another ~5 minutes).
# Results go to $OUT (default /tmp/torchwatch-gpu). Run from the repository root:
#   device run: bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/torchwatch-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HYPOTHESIS_MAX_EXAMPLES=${HYPOTHESIS_MAX_EXAMPLES:-20}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

timeout 40 $PY benchmarks/_sync_probe.py 2>&1 | tee "$OUT/sync_probe.txt"

# CPU statistics use the torch-ops twin here (the C kernel is not built: CI tests it).
timeout 200 $PY -m pytest -q -p no:cacheprovider -o addopts="" --timeout=120 -rfE --tb=short \
  tests/test_cuda.py tests/test_triton_kernel.py tests/test_pending.py tests/test_fingerprint.py > "$OUT/tests.txt" 2>&1
echo "pytest exit $?" >> "$OUT/tests.txt"
tail -40 "$OUT/tests.txt"

timeout "${BENCH_S:-300}" $PY benchmarks/gpu_overhead.py --models ${MODELS:-bert gpt2} --json "$OUT/gpu.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/bench.txt" | tail -30

if [ "${EXTRA:-0}" = 1 ]; then
  # manifest hashing on this host's cores, fingerprint TB/s on the GPU, BERT-base self-test on CPU and GPU
  timeout 150 $PY benchmarks/integrity.py --repeats 3 --json "$OUT/integrity.json" 2>&1 | grep -v -i warn \
    | tee "$OUT/integrity.txt" | tail -25
  # does a compiled BERT-base launch the stats kernel for every watched output?
  timeout 170 $PY benchmarks/_compile_probe.py 2>&1 | grep -v -i warn | tail -20 | tee "$OUT/compile_probe.txt"
fi
