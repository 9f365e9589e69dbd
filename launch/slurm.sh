#!/usr/bin/env bash
# SLURM, one task per node, all GPUs of a node in that task:
#   sbatch launch/slurm.sh vae runs/vae [--config.FIELD=VALUE ...]
#   DRY_RUN=1 bash launch/slurm.sh gmm:quick runs/gmm   # or --dry-run first: prints the srun command, runs nothing
# CONFIG is an experiment NAME[:ARG] (collapse-jax --help lists them) or a config file PATH[:ARG]. Every node
# needs the project installed (pip install -e . "jax[cuda12]") for PYTHON (default python3).
#SBATCH --job-name=collapse_jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
set -euo pipefail
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
if (($# < 2)); then
  echo "usage: [DRY_RUN=1] sbatch $0 CONFIG WORKDIR [--config.FIELD=VALUE ...], e.g. gmm:quick runs/gmm" >&2; exit 2
fi
config=$1; workdir=$2; shift 2

quote() {  # the words as one line that a POSIX shell reads back as the same words (single quotes where needed)
  local words=() w
  for w in "$@"; do
    if [[ $w =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then words+=("$w"); else words+=("'${w//\'/\'\\\'\'}'"); fi
  done
  echo "${words[*]}"
}
run() {  # DRY_RUN=1: print the command, quoted so that it can be pasted, instead of running it
  if [[ ${DRY_RUN:-0} != 0 ]]; then quote "$@"; else "$@"; fi
}
# jax.distributed.initialize() reads the coordinator, process count and ids from the SLURM environment.
run srun "${PYTHON:-python3}" -m collapse_jax.main --jax_distributed --config="$config" --workdir="$workdir" "$@"
