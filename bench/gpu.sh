#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: bare step and train.py img/s for float32 and bf16
# autocast, eager and compiled, at batch 512 and 128, --data-on device and disk, and the wall time and
# validation accuracy of a 30-epoch default run, as one table on stdout (training logs on stderr).
# Rows go most important first (bench/throughput.py GPU_ROWS), and a row that would pass the time
# budget is left out and named: a lent GPU gives 15 minutes in all, so the default is 420 s.
#
#   bench/gpu.sh                   # CIFAR-10: the shared JPEGs if present, else downloaded to data/
#   bench/gpu.sh --weights none    # offline: the 30-epoch run from scratch
#   bench/gpu.sh --budget 300      # seconds for the table (420)
#
# Extra flags go to bench/throughput.py --device cuda. PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
archive=../shared/data/cifar10-jpeg-train.tar.gz
data=data  # ignored by git; CIFAR-10 is downloaded here when there is no archive
if [ -f "$archive" ]; then
  data=data/cifar10-jpeg
  if [ ! -d "$data/train" ]; then
    mkdir -p "$data" && cp "$archive" data/ && tar xzf data/cifar10-jpeg-train.tar.gz -C "$data"
  fi
fi
exec "${PYTHON:-python}" bench/throughput.py --device cuda --data-dir "$data" "$@"
