#!/usr/bin/env bash
# Local GPU: one process sees all local GPUs; chains (or batches) are split over them.
#   bash launch/run_gpu.sh configs/gmm.py:chains=4096 runs/gmm_gpu [--config.FIELD=VALUE ...]
# Needs a CUDA build of JAX: pip install -e . "jax[cuda12]"
set -euo pipefail
config=${1:?config file, e.g. configs/gmm.py}; workdir=${2:?workdir}; shift 2
cd "$(dirname "$0")/.."
exec python -m collapse_jax.main --config="$config" --workdir="$workdir" "$@"
