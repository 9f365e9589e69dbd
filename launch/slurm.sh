#!/usr/bin/env bash
# SLURM, one task per node, all GPUs of a node in that task: sbatch launch/slurm.sh configs/vae.py runs/vae
#SBATCH --job-name=collapse_jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
set -euo pipefail
config=${1:?config file}; workdir=${2:?workdir}; shift 2
# jax.distributed.initialize() reads the SLURM environment for the coordinator and process ids.
srun python -m collapse_jax.main --jax_distributed --config="$config" --workdir="$workdir" "$@"
