# Sourced by run_gpu.sh and run_tpu.sh (slurm.sh keeps its own copy: sbatch runs a spooled copy of the script,
# away from this file).
# shellcheck shell=bash

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
