#!/usr/bin/env bash
# The accelerator checks in one call: versions, the GPU (native convolution) path checked against Flax's layers,
# then the benchmark suite (benchmarks/suite.py: GMM with many vmapped chains, the VAE against PyTorch on the same
# GPU, LM training and decoding at the OPT-125m shape against HF transformers; MFU and bandwidth use against the
# GPU's published peak), one JSON report and one Markdown table under $OUT/suite/.
#   bash benchmarks/device_check.sh              # every step (~10 minutes on an H100/H200)
#   bash benchmarks/device_check.sh suite_short  # only the named steps (suite_short: the suite's --short mode)
#   OPT_DIR=... WIKI_DIR=... bash benchmarks/device_check.sh lm_generation   # one paper-size LM generation timed
# For a bare GPU image with jax, flax, optax, orbax and torch but no ml-collections and no network: download the
# wheel once elsewhere (python3 -m pip download --no-deps --only-binary=:all: -d .whl ml-collections==1.1.0) and
# copy .whl/ along; wheels found in .whl/ are installed first. Output: a short log per step, also written under
# $OUT (or ./device_check/) for the WORKSPACE results table.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
only=("$@")
out=${OUT:-device_check}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

step() {  # name, [limit seconds,] command...: one step with its own time limit; a failure does not stop the others
  local name=$1 limit=240; shift
  if [[ $1 =~ ^[0-9]+$ ]]; then limit=$1; shift; fi
  if [ ${#only[@]} -gt 0 ] && [[ ! " ${only[*]} " == *" $name "* ]]; then return; fi
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" | grep -v "^WARNING\|^I0000\|^W0000" | tail -n 12
  echo "== $name: exit ${PIPESTATUS[0]}"
}

step versions python3 -c "import jax, flax, optax, orbax.checkpoint as o, sys; print(sys.version.split()[0], 'jax', \
jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"
step nvidia_smi nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# Correctness of the GPU path (impl 'auto' is the native convolutions there) and of the CPU matmul path.
step conv_check env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest -q -p no:cacheprovider tests/test_vae.py -k "conv_layers or param_count"
# Every family's throughput against its peer on this GPU (the suite picks the accelerator shapes itself).
step suite 480 python3 -m benchmarks.suite --out "$out/suite"
if [[ " ${only[*]} " == *" suite_short "* ]]; then  # only when named: a quick look instead of the full suite
  step suite_short 240 python3 -m benchmarks.suite --short --out "$out/suite_short"
fi
# One paper-size LM generation (OPT-125m fine-tuned 5 epochs on 36,864 64-token blocks, then every block continued
# by 64 tokens with 5-beam search; target <= 40 s on an H200 after compilation): needs a local facebook/opt-125m
# folder and the wikitext-2-raw files on the machine (OPT_DIR, WIKI_DIR; configs/lm.py:opt_wikitext2).
if [ -n "${OPT_DIR:-}" ] && [ -n "${WIKI_DIR:-}" ]; then
  step lm_generation python3 -m collapse_jax.main --config=lm:opt_wikitext2 --config.generations=2 \
    --config.lm.hf_path="$OPT_DIR" --config.lm.text.path="$WIKI_DIR" --config.lm.dtype=bfloat16 \
    --workdir="$out/lm_generation"
else
  echo "== lm_generation: skipped (set OPT_DIR and WIKI_DIR)"
fi
# Plan mode on this GPU (real XLA:GPU programs, unlike the CPU-compiled estimate of WORKSPACE's scale table):
# opt-1.3b's paper generation, per-GPU memory and roofline; no weights needed.
step plan_gpu 240 python3 -m collapse_jax.main --config=lm:opt_wikitext2,size=opt-1.3b --config.lm.mesh_fsdp=1 \
  --plan=local --plan_out="$out/plan_gpu.json"
# The generation loop's own overhead on the README's GMM job (chunked vs one chunk).
step loop_bench python3 benchmarks/loop_bench.py
