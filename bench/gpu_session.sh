#!/usr/bin/env bash
# Everything that needs the GPU, in one device-tool call: build svdfuse._C against that machine's
# torch, run the GPU tests, run the benchmarks; logs and results land in $OUT.
#   run(command="bash bench/gpu_session.sh")
set -uo pipefail
OUT=${OUT:-/tmp/svdfuse-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/bench"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 setup.py build_ext --inplace 2>&1 | tail -5 | tee "$OUT/build.log"
python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log"
python3 bench/bench_rsvd_accuracy.py --device cuda 2>&1 | tee "$OUT/rsvd_accuracy.log"
python3 bench/bench_methods.py --device cuda 2>&1 | tee "$OUT/methods.log"
cp bench/results/*NVIDIA*.json "$OUT/" 2>/dev/null  # the machine's own results
