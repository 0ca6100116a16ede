#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: bare step and train.py img/s for float32 and bf16
# autocast, each eager and compiled, at batch 128 and 512, then the wall time and validation accuracy
# of a 30-epoch default run, as one table on stdout (training logs on stderr). About 20-30 minutes.
#
#   bench/gpu.sh                   # CIFAR-10: the shared JPEGs if present, else downloaded to data/
#   bench/gpu.sh --weights none    # offline: the 30-epoch run from scratch
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
