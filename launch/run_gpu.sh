#!/usr/bin/env bash
# Local GPU: one process sees all local GPUs; chains (or batches) are split over them.
#   bash launch/run_gpu.sh gmm:chains=4096 runs/gmm_gpu [--config.FIELD=VALUE ...]
#   DRY_RUN=1 bash launch/run_gpu.sh gmm:quick runs/gmm   # or --dry-run first: prints the command, runs nothing
# CONFIG is an experiment NAME[:ARG] (collapse-jax --help lists them) or a config file PATH[:ARG]. Needs the
# project installed with a CUDA build of JAX (pip install -e . "jax[cuda12]") for PYTHON (default python3).
set -euo pipefail
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
if (($# < 2)); then
  echo "usage: [DRY_RUN=1] bash $0 CONFIG WORKDIR [--config.FIELD=VALUE ...], e.g. gmm:quick runs/gmm" >&2; exit 2
fi
config=$1; workdir=$2; shift 2

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
run "${PYTHON:-python3}" -m collapse_jax.main --config="$config" --workdir="$workdir" "$@"
