#!/usr/bin/env bash
# Cloud TPU VM: installs the project on every worker and runs the same command on all of them.
#   TPU_NAME=my-tpu ZONE=us-central2-b bash launch/run_tpu.sh configs/gmm.py:chains=8192 gs://bucket/runs/gmm
# On a multi-host slice every worker runs the program with --jax_distributed (jax.distributed.initialize()
# finds the coordinator from the TPU metadata); Orbax writes the checkpoints, process 0 the metrics and plots.
# The workdir must be reachable from every worker (a gs:// path or a shared filesystem).
set -euo pipefail
config=${1:?config file}; workdir=${2:?workdir}; shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
repo=${REPO_URL:-$(git remote get-url origin)}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  [ -d collapse_jax ] || git clone $repo collapse_jax
  cd collapse_jax && git pull -q
  python3 -m pip install -q -e . 'jax[tpu]'
  python3 -m collapse_jax.main --jax_distributed --config=$config --workdir=$workdir $*"
