#!/usr/bin/env bash
# One device call: GPU tests, then the named benchmarks; the result files this session
# wrote or changed are copied to $OUT/results after every step (what finished comes back
# even if a later step runs past the limit; the device tool returns only a few files, so
# the results of earlier sessions stay behind).
# usage: bash bench/gpu_session.sh "tests" "gpu_decode.py --eager" "gpu_prefill.py" ...
set -u
export PYTHONPATH=. TANDEM_CACHE_DIR=/tmp/tandem-cache
start=$(mktemp) && touch "$start"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
for step in "$@"; do
  echo "=== $step"
  if [ "$step" = tests ]; then
    timeout 240 python -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/gpu tests/engine/test_triton_kernels.py} 2>&1 | tail -25
  else
    # bash -c keeps quoted arguments whole: "migration.py --serve-args '--dtype bfloat16'"
    timeout "${BENCH_TIMEOUT:-300}" bash -c "python bench/$step" 2>&1 | tail -45
  fi
  mkdir -p "${OUT:-/tmp/out}/results"
  find bench/results -maxdepth 1 -type f -newer "$start" -exec cp {} "${OUT:-/tmp/out}/results/" \;
done
true
