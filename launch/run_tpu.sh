#!/usr/bin/env bash
# Cloud TPU VM: installs the project on every worker and runs the same command on all of them.
#   TPU_NAME=my-tpu ZONE=us-central2-b bash launch/run_tpu.sh gmm:chains=8192 gs://bucket/runs/gmm [--config.F=V ...]
#   DRY_RUN=1 (or --dry-run first): prints the gcloud command, with the script it sends the workers, runs nothing.
#   At scale: plan first on any machine (collapse-jax --config=lm:opt_wikitext2,size=opt-13b --plan=v5e-64), then
#   TPU_NAME=... ZONE=... bash launch/run_tpu.sh lm:opt_wikitext2,size=opt-13b gs://B/lm13b \
#     --config.lm.hf_path=/path/opt-13b --config.lm.text.path=/path/wikitext-2-raw   (mesh/remat: the size's preset
#   or --config.lm.mesh_fsdp=... --config.lm.mesh_tensor=... --config.lm.remat=... from the plan)
# CONFIG is an experiment NAME[:ARG] (collapse-jax --help lists them) or a config file PATH[:ARG] in the clone.
# On a multi-host slice every worker runs the program with --jax_distributed (jax.distributed.initialize()
# finds the coordinator from the TPU metadata); Orbax writes the checkpoints, process 0 the metrics and plots.
# The workdir must be reachable from every worker (a gs:// path or a shared filesystem); gs:// goes through gcsfs
# (config, metrics, plots) and tensorstore (Orbax's arrays) with the VM's credentials. Other schemes are refused.
# REPO_URL: what the workers clone (default: this checkout's origin).
set -euo pipefail
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
if (($# < 2)); then
  echo "usage: TPU_NAME=... ZONE=... [DRY_RUN=1] bash $0 CONFIG WORKDIR [--config.FIELD=VALUE ...]," \
       "e.g. gmm:quick gs://bucket/runs/gmm" >&2; exit 2
fi
config=$1; workdir=$2; shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
repo=${REPO_URL:-$(git -C "$(dirname "$0")" remote get-url origin)}

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
# The workers' shell parses the remote script again: each word is quoted, so that a workdir or an override with
# spaces or shell characters arrives there as one argument.
remote="{ [ -d collapse_jax ] || git clone $(quote "$repo") collapse_jax; } && cd collapse_jax && git pull -q \
&& python3 -m pip install -q -e . gcsfs 'jax[tpu]' \
&& $(quote python3 -m collapse_jax.main --jax_distributed --config="$config" --workdir="$workdir" "$@")"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$remote"
