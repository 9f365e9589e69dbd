"""The command line as a new user meets it: a non-editable install of a copy of the project, run from a directory
that is not the checkout (--help, a named config, an unknown name); config-name resolution; every bad input (a
field, a variant, a value, a distributed flag) as exactly one line `error: ...` and exit status 2."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from collapse_jax import cli, config as config_lib
from collapse_jax.errors import ConfigError
from tests.helpers import REPO, load_config

EXPERIMENTS = ("gaussian", "gmm", "lm", "vae")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """A copy of the project pip-installed (not editable) into a target folder, as a wheel would be: offline, with
  the venv's setuptools. Returns (target, a working directory outside the checkout, the environment to run in)."""
  root = tmp_path_factory.mktemp("install")
  src, target, cwd = root / "src", root / "target", root / "cwd"
  ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), src / name)
  for name in ("collapse_jax", "configs"):
    shutil.copytree(os.path.join(REPO, name), src / name, ignore=ignore)
  r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                      "--no-index", "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  cwd.mkdir()
  # The target first on the path: the editable install in the venv (a meta-path finder appended after the path
  # finder) must not be what runs; test_installed_copy_is_what_runs checks that.
  env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return target, cwd, env


def _run(installed, *args, timeout=300):
  target, cwd, env = installed
  return subprocess.run([str(target / "bin" / "collapse-jax"), *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_installed_copy_is_what_runs(installed):
  target, cwd, env = installed
  r = subprocess.run([sys.executable, "-c", "import collapse_jax, collapse_jax.config as c; "
                      "print(collapse_jax.__file__); print(c.configs_dir())"],
                     cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  pkg, configs = r.stdout.split()
  assert pkg.startswith(str(target)) and configs == str(target / "collapse_jax" / "configs")
  # Every module of the checkout is installed (pyproject lists the packages by hand, configs/ among them).
  for base, dest in (("collapse_jax", "collapse_jax"), ("configs", "collapse_jax/configs")):
    for dirpath, _, files in os.walk(os.path.join(REPO, base)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(REPO, base))
          assert (target / dest / rel).is_file(), f"{base}/{rel} is not installed"


def test_installed_help_lists_flags_and_experiments(installed):
  r = _run(installed, "--help", timeout=60)
  assert r.returncode == 0, r.stderr
  for flag in ("--config", "--workdir", "--[no]jax_distributed", "--coordinator_address", "--num_processes",
               "--process_id", "--local_device_ids"):
    assert f"\n  {flag}:" in r.stdout, flag
  exps = cli.experiments()
  assert tuple(exps) == EXPERIMENTS
  for name, (summary, variants) in exps.items():
    assert f"  {name}  " in r.stdout and summary in r.stdout, name
    assert f"variants: {', '.join(variants)}" in r.stdout, name
  assert "gmm" in exps and "quick" in exps["gmm"][1]


def test_installed_named_config_runs_from_anywhere(installed, tmp_path):
  workdir = tmp_path / "run"
  # A named config with a variant and a field override, from a directory without configs/.
  r = _run(installed, "--config=gmm:quick", f"--workdir={workdir}", "--config.plots=False")
  assert r.returncode == 0, r.stdout + r.stderr
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert len(rows) == load_config("gmm", "quick").generations == 50
  assert json.loads((workdir / "config.json").read_text())["plots"] is False
  assert not (workdir / "plots").exists()


def test_installed_unknown_name_is_one_line(installed, tmp_path):
  r = _run(installed, "--config=nosuch", f"--workdir={tmp_path}", timeout=60)
  assert r.returncode == 2
  assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
  assert "nosuch" in r.stderr and all(name in r.stderr for name in EXPERIMENTS)


def test_resolve_config_names_and_paths():
  d = config_lib.configs_dir()
  assert d == os.path.join(REPO, "configs")  # the checkout's, not an editable install's elsewhere
  assert cli.resolve_config("gmm:quick") == os.path.join(d, "gmm.py") + ":quick"
  assert cli.resolve_config("gaussian") == os.path.join(d, "gaussian.py")
  assert cli.resolve_config("vae:quick,real_fraction") == os.path.join(d, "vae.py") + ":quick,real_fraction"
  # Paths stay exactly as given (relative ones resolve against the working directory, as before).
  for path in ("configs/gmm.py:quick", "configs/gmm.py", "/abs/where/x.py:a:b", "gmm.py", "./gmm"):
    assert cli.resolve_config(path) == path
  with pytest.raises(ConfigError, match="unknown experiment 'nosuch'; known: gaussian, gmm, lm, vae"):
    cli.resolve_config("nosuch:quick")
  with pytest.raises(ConfigError, match="unknown experiment '__init__'"):
    cli.resolve_config("__init__")
  argv = cli.resolve_argv(["prog", "--config", "gmm:quick", "--workdir=w", "-config=lm", "--", "--config=x"])
  assert argv == ["prog", "--config", os.path.join(d, "gmm.py:quick"), "--workdir=w",
                  "-config=" + os.path.join(d, "lm.py"), "--", "--config=x"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_variants_listed_are_the_ones_accepted(name):
  """--help's variants come from each config's VARIANTS: every one must build, and the docstring must name it."""
  summary, variants = cli.experiments()[name]
  assert summary and variants
  with open(os.path.join(config_lib.configs_dir(), f"{name}.py")) as fh:
    doc = fh.read().split('"""')[1]
  for v in variants:  # placeholders: =N a count, =NAME an OPT size
    load_config(name, v.replace("=NAME", "=opt-1.3b").replace("=N", "=4"))
    assert v.split("=")[0] in doc, f"configs/{name}.py's docstring does not mention variant {v}"
  with pytest.raises(ConfigError, match=r"^unknown config variant 'no_such_variant' \(known: "):
    load_config(name, "no_such_variant")


def _cli(*args, timeout=120, code=""):
  """The module entry point in a fresh interpreter, `code` run first (e.g. to stub jax.distributed)."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  prog = f"import sys\n{code}\nfrom collapse_jax import main\nsys.argv = ['collapse-jax', *{list(args)!r}]\nmain.run()"
  return subprocess.run([sys.executable, "-c", prog], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.parametrize("flags,message", [
    (["--num_processes=2", "--process_id=0"], "error: --num_processes is only used with --jax_distributed"),
    (["--coordinator_address=h:1"], "error: --coordinator_address is only used with --jax_distributed"),
    (["--jax_distributed", "--num_processes=2", "--process_id=2"],
     "error: --process_id=2 must be less than --num_processes=2"),
    (["--jax_distributed", "--num_processes=2"], "error: --num_processes and --process_id go together"),
    (["--jax_distributed", "--local_device_ids=0,x"], "error: --local_device_ids must be comma-separated integers"),
])
def test_distributed_flag_errors(tmp_path, flags, message):
  r = _cli("--config=gmm:quick", f"--workdir={tmp_path}", *flags)
  assert r.returncode == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
  assert not os.listdir(tmp_path)  # nothing ran


# jax.distributed.initialize stubbed: it reports its arguments and the CPU collectives then in force, and stops.
_STUB = """import jax
jax.config.update('jax_cpu_collectives_implementation', 'mpi')
def _init(**kw):
  print('INIT', sorted(kw.items()), jax.config.jax_cpu_collectives_implementation)
  sys.exit(0)
jax.distributed.initialize = _init"""


def test_distributed_flags_reach_initialize_with_gloo_on_cpu(tmp_path):
  r = _cli("--config=gmm:quick", f"--workdir={tmp_path}", "--jax_distributed", "--coordinator_address=localhost:1234",
           "--num_processes=2", "--process_id=1", "--local_device_ids=0,1", code=_STUB)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == ("INIT [('coordinator_address', 'localhost:1234'), ('local_device_ids', [0, 1]), "
                              "('num_processes', 2), ('process_id', 1)] gloo")
  # Without the flags, initialize() gets no arguments and finds them itself (Cloud TPU, SLURM).
  r = _cli("--config=gmm:quick", f"--workdir={tmp_path}", "--jax_distributed", code=_STUB)
  assert r.returncode == 0 and r.stdout.strip() == "INIT [] gloo", r.stdout + r.stderr


def _one_line_error(r, want: str) -> None:
  assert r.returncode == 2, r.stdout + r.stderr
  assert r.stderr.count("\n") == 1 and r.stderr == want + "\n", r.stderr


def test_unknown_field_is_one_clean_line(tmp_path):
  r = _cli("--config=lm:ci", "--config.lm.epochz=3", f"--workdir={tmp_path}")
  _one_line_error(r, "error: unknown config field lm.epochz (did you mean lm.epochs?)")
  r = _cli("--config=gmm:quick", "--config.gmm.tool=3", "--config.generatoins=3", f"--workdir={tmp_path}")
  _one_line_error(r, "error: unknown config field gmm.tool (did you mean gmm.tol?)")
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("config,message", [
    ("gmm:bogus", "error: --config=gmm:bogus: unknown config variant 'bogus' (known: quick, chains=N)"),
    ("gmm:quick,chains=x", "error: --config=gmm:quick,chains=x: config variant chains=N takes a count, got 'x'"),
    ("gaussian:7", "error: --config=gaussian:7: unknown config variant '7' (known: 100, 500, 1000, 10000)"),
    ("lm:ci,size=opt-2b", "error: --config=lm:ci,size=opt-2b: config variant size=NAME takes one of opt-125m, "
     "opt-1.3b, opt-6.7b, opt-13b, opt-30b, opt-66b, got 'opt-2b'"),
    ("configs/vae.py:quick,mnistx", "error: --config=configs/vae.py:quick,mnistx: unknown config variant 'mnistx' "
     "(known: digits, mnist, mnist_idx, t10k, dataset, real_fraction, accumulate, quick)"),
    ("nosuch.py", "error: --config=nosuch.py: [Errno 2] No such file or directory: 'nosuch.py'"),
])
def test_bad_variant_or_config_file_is_one_line(tmp_path, config, message):
  _one_line_error(_cli(f"--config={config}", f"--workdir={tmp_path}"), message)
  assert not os.listdir(tmp_path)


def test_bad_value_is_one_line_naming_the_field(tmp_path):
  r = _cli("--config=lm:ci", "--config.lm.epochs=0", f"--workdir={tmp_path / 'run'}")
  _one_line_error(r, "error: config.lm.epochs must be a positive integer, got 0")
  r = _cli("--config=gmm:quick", "--config.keep_checkpoints=1", f"--workdir={tmp_path / 'run'}")
  assert r.returncode == 2 and r.stderr.startswith("error: config.keep_checkpoints must be an integer >= 2")
  assert r.stderr.count("\n") == 1, r.stderr
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
