"""Multi-process runs through the real CLI: 2 processes on localhost, 4 simulated CPU devices each, gloo
collectives, against the same job in 1 process with 8 devices.

Each test starts `python -m collapse_jax.main --jax_distributed --coordinator_address=127.0.0.1:PORT
--num_processes=2 --process_id=i ...` twice (the 1-process reference runs beside them) and checks:
  * GMM: metrics.jsonl and the last checkpoint equal the 1-process run's exactly (chains are computed per device
    and the stats over chains are taken after an all-gather, so no arithmetic depends on the process layout);
  * VAE and LM: one generation whose fit is one optimizer step from a known model, checked against derived
    float32 bounds rather than a tolerance: their batch losses and gradients are all-reduced over the 8 devices
    and gloo adds the partial sums in another order, which after several Adam steps is not bounded usefully.
    The training loss (before the optimizer) agrees within 2 gamma_N relative, and both runs' parameters lie
    in the interval Adam's step maps the gradient's bound to, the gradient recomputed here from its per-image /
    per-token terms (tests/helpers.py). Adam's first step is invariant to the gradient's scale, so a gradient
    off by a constant factor is caught by the loss check only if the loss is off too;
  * checkpoints are written once: the same steps as the reference, each one save holding both processes' shards
    (Orbax's ocdbt.process_0 and ocdbt.process_1), and, for the GMM, restoring to the reference's arrays;
  * host-side files (config.json, metrics.jsonl, plots/, samples/) are written by process 0 only. Every process
    runs with a spy (a sitecustomize.py put first on its PYTHONPATH) that logs each path Python opens for
    writing, renames to or creates; process 1's log may hold nothing in the workdir outside checkpoints/ but its
    own write probe, and process 0's log must hold those files (so the spy is known to see them);
  * GMM: SIGKILL of process 1 after two checkpoints, then of process 0 (left without its peer it would hang or
    die), its newest checkpoint corrupted, and a restart of both: they set the corrupt step aside together and
    resume from the one before, ending exactly equal to the 1-process run.

Runtime on 2 cores: the GMM kill-and-restart dominates; each one-step VAE / LM run is ~1 minute.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from collapse_jax.metrics import read_jsonl
from tests.helpers import REPO, cli, corrupt_checkpoint

pytestmark = pytest.mark.slow

TIMEOUT = 600

# Logs every path this interpreter opens for writing, renames onto, or creates as a directory.
_SPY = '''
import builtins, io, os
_log_path = os.environ.get("COLLAPSE_WRITE_LOG")
if _log_path:
  _open, _replace, _rename, _mkdir = builtins.open, os.replace, os.rename, os.mkdir
  _log = _open(_log_path, "a", buffering=1)

  def _rec(op, path):
    if isinstance(path, (str, bytes, os.PathLike)):
      _log.write(op + "\\t" + os.path.abspath(os.fsdecode(path)) + "\\n")

  def open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+"):
      _rec("open", file)
    return _open(file, mode, *a, **k)

  def replace(src, dst, *a, **k):
    _rec("replace", dst)
    return _replace(src, dst, *a, **k)

  def rename(src, dst, *a, **k):
    _rec("rename", dst)
    return _rename(src, dst, *a, **k)

  def mkdir(path, *a, **k):
    _rec("mkdir", path)
    return _mkdir(path, *a, **k)

  builtins.open = io.open = open
  os.replace, os.rename, os.mkdir = replace, rename, mkdir
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Job:
  """The CLI in `n` processes (4 simulated CPU devices each) with a fresh coordinator port; output and the spy's
  write logs go to files beside the workdir (`<workdir>.<launch>.out<i>`, `<workdir>.<launch>.writes<i>`)."""

  def __init__(self, tmp_path, workdir, args, launch: str, n: int = 2):
    spy = tmp_path / "spy"
    spy.mkdir(exist_ok=True)
    (spy / "sitecustomize.py").write_text(_SPY)
    port = _free_port()
    self.outs = [f"{workdir}.{launch}.out{i}" for i in range(n)]
    self.writes = [f"{workdir}.{launch}.writes{i}" for i in range(n)]
    self.procs = []
    for i in range(n):
      env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                 PYTHONPATH=os.pathsep.join([str(spy), REPO, os.environ.get("PYTHONPATH", "")]),
                 PYTHONUNBUFFERED="1", COLLAPSE_WRITE_LOG=self.writes[i])
      cmd = [sys.executable, "-m", "collapse_jax.main", "--jax_distributed", f"--coordinator_address=127.0.0.1:{port}",
             f"--num_processes={n}", f"--process_id={i}", f"--workdir={workdir}", *args]
      with open(self.outs[i], "w") as out:  # a file, not a pipe: gloo's chatter must never block a process
        self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))

  def output(self, i: int) -> str:
    with open(self.outs[i]) as fh:
      return fh.read()

  def tails(self) -> str:
    return "\n".join(f"--- process {i} (rc {p.returncode}) ---\n" + "\n".join(
        l for l in self.output(i).splitlines() if "Gloo" not in l)[-3000:] for i, p in enumerate(self.procs))

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def wait(self, timeout: float = TIMEOUT) -> None:
    """Until every process ends; one that fails ends the others at once (left alone they would wait for it in
    a collective or the coordination service's shutdown barrier for minutes)."""
    deadline = time.time() + timeout
    while any(p.poll() is None for p in self.procs):
      if time.time() > deadline:
        self.kill()
        pytest.fail(f"the 2-process run did not finish in {timeout:.0f} s\n{self.tails()}")
      if any(p.returncode not in (None, 0) for p in self.procs):
        self.kill()
        break
      time.sleep(0.1)
    assert all(p.returncode == 0 for p in self.procs), self.tails()

  def written(self, i: int, workdir) -> set[str]:
    """Paths under `workdir`, relative to it, that process i opened for writing, renamed onto or created."""
    root = os.path.abspath(workdir)
    if not os.path.exists(self.writes[i]):
      return set()
    with open(self.writes[i]) as fh:
      paths = [line.rstrip("\n").split("\t", 1)[1] for line in fh if "\t" in line]
    return {os.path.relpath(p, root) for p in paths if p == root or p.startswith(root + os.sep)}


def _reference(tmp_path, args):
  """The same job in 1 process with 8 devices, started in the background (it runs beside the 2-process one)."""
  return cli(*args, f"--workdir={tmp_path / 'ref'}", devices=8, background=True)


def _finish(ref):
  out, _ = ref.communicate(timeout=TIMEOUT)
  assert ref.returncode == 0, out


def _host_side(paths: set[str]) -> set[str]:
  """Paths other than checkpoints/ and the process's own write probe (config.check_workdir)."""
  return {p for p in paths if p != "." and not p.startswith("checkpoints") and not p.startswith(".write_probe-")}


def _check_writers(jobs, workdir, expected: set[str]) -> None:
  p0 = set().union(*(j.written(0, workdir) for j in jobs))
  p1 = set().union(*(j.written(1, workdir) for j in jobs))
  assert expected <= p0, f"the spy did not see process 0 write {sorted(expected - p0)}"
  assert not _host_side(p1), f"process 1 wrote host-side files: {sorted(_host_side(p1))}"
  assert any(p.startswith(".write_probe-") for p in p1), "the spy saw nothing of process 1"


def _steps(workdir) -> list[int]:
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def _check_checkpoints(workdir, ref_dir, every_step: bool = True) -> None:
  """The same steps as the reference run (or, where saves may be skipped by timing, the same last step), each
  written once with both processes' shards, no temporary directory left."""
  if every_step:
    assert _steps(workdir) == _steps(ref_dir)
  assert _steps(workdir)[-1] == _steps(ref_dir)[-1]
  for s in _steps(workdir):
    d = os.path.join(workdir, "checkpoints", str(s), "default")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(d)), (s, os.listdir(d))
  leftovers = [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]
  assert not leftovers, leftovers


def _restore_numpy(step_dir):
  """A checkpoint's arrays as numpy, whatever mesh and processes wrote it."""
  import jax
  import orbax.checkpoint as ocp
  ck = ocp.PyTreeCheckpointer()
  meta = ck.metadata(step_dir)
  meta = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  return ck.restore(step_dir, args=ocp.args.PyTreeRestore(restore_args=args))


def test_gmm_two_processes_killed_and_restarted_equal_one_process(tmp_path):
  # Many chains (16: 2 per device, 8 in each process), a checkpoint every 10 generations.
  args = ["--config=configs/gmm.py", "--config.chains=16", "--config.generations=50",
          "--config.checkpoint_every=10", "--config.checkpoint_min_seconds=0"]  # every chunk saved: steps compared
  ref = _reference(tmp_path, args)
  wd = tmp_path / "mp"
  first = _Job(tmp_path, wd, args, "first")
  deadline = time.time() + TIMEOUT
  while time.time() < deadline and all(p.poll() is None for p in first.procs):
    if (wd / "checkpoints").exists() and len(_steps(wd)) >= 2:
      break
    time.sleep(0.02)
  first.procs[1].send_signal(signal.SIGKILL)
  first.procs[1].wait()
  time.sleep(0.5)
  first.kill()  # process 0 without its peer hangs in the next collective, or dies
  assert first.procs[1].returncode == -signal.SIGKILL, first.tails()
  assert first.procs[0].returncode != 0, "the run finished before it could be killed\n" + first.tails()
  steps = _steps(wd)
  assert 2 <= len(steps) and steps[-1] < 50, steps
  corrupt_checkpoint(wd / "checkpoints" / str(steps[-1]))

  again = _Job(tmp_path, wd, args, "again")
  again.wait()
  for i in range(2):
    out = again.output(i)
    assert f"checkpoints/{steps[-1]} is unreadable" in out and f"resuming {wd} at generation {steps[-2]}/50" in out
  _finish(ref)

  # Exactly the 1-process, 8-device run's metrics, after a kill, a corrupt checkpoint and a restart.
  assert read_jsonl(str(wd / "metrics.jsonl")) == read_jsonl(str(tmp_path / "ref" / "metrics.jsonl"))
  assert os.path.isdir(wd / "checkpoints" / f"unreadable-{steps[-1]}")
  _check_checkpoints(wd, tmp_path / "ref")
  got, want = _restore_numpy(wd / "checkpoints" / "50" / "default"), _restore_numpy(
      tmp_path / "ref" / "checkpoints" / "50" / "default")
  import jax
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))
  assert json.load(open(wd / "config.json")) == json.load(open(tmp_path / "ref" / "config.json"))
  _check_writers([first, again], wd, {"config.json", "metrics.jsonl", "plots/gmm_metrics.png",
                                       "plots/gmm_snapshots.png"})


# One generation whose fit is ONE optimizer step from a known model (one epoch, one batch covering the data): what
# precedes the optimizer (the training loss) and the step itself are then comparable with derived float32 bounds.
# After more Adam steps nothing is (tests/test_sharding.py): gloo all-reduces the losses and gradients in another
# order, Adam's first normalised steps turn a gradient that is rounding noise into a +-lr weight move either way,
# and those moves compound over steps and generations (decoded text then differs at near-ties too).
_ONE_STEP = {
    # 64 images (vae.limit), all in one batch of 64 (8 per device), 1 epoch.
    "vae": ["--config=configs/vae.py:quick", "--config.plots=False", "--config.generations=1",
            "--config.vae.batch_size=64"],
    # 28 blocks of 8 tokens in one batch of 32 (4 padded rows), 1 epoch; dropout 0, so the step's gradient is a
    # function of the parameters and the blocks only (any batch order: the batch is the whole set).
    "lm": ["--config=configs/lm.py:ci", "--config.generations=1", "--config.lm.epochs=1",
           "--config.lm.batch_size=32", "--config.lm.dropout=0"],
}
# Contractions of one VAE example's forward and backward passes (families/vae/model.py), summed: forward enc1 16, enc2
# 16*64, fc_mu/fc_logvar 6272, fc_dec 20, dec1 128, dec2 64, col2im 4; backward dec2 16, dec1 16*64, fc_dec 6272,
# fc_mu + fc_logvar 40, enc2 16*128; a kernel's per-example gradient sums <= 196 pixels. First-order error
# analysis of a chain of such layers (values O(1), as after PyTorch's init) bounds one example's gradient error
# in another evaluation order by gamma of their sum relative to the layer's magnitudes: grad_bound's k.
_K_VAE = (16 + 1024 + 6272 + 20 + 128 + 64 + 4) + (16 + 1024 + 6272 + 40 + 2048) + 196


def _vae_expected(tmp_path):
  """Generation 0's step recomputed from its inputs: the keys, batch order and noise as loop._generation and
  VAEFamily.fit draw them, the gradient as its 64 per-image terms. Returns (params interval tree, names)."""
  import jax
  from collapse_jax import loop
  from collapse_jax.families.vae import model as vae_model
  from tests import helpers
  cfg = helpers.load_config("vae", "quick", plots=False, generations=1, vae__batch_size=64)
  exp = loop.Experiment(cfg)
  fam, shared = exp.family, exp.data.shared
  x = shared["train_x"]
  n = x.shape[0]
  assert n == 64 == fam.batch and fam.epochs == 1
  key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0), 0), 0)
  k_init, k_train = jax.random.split(jax.random.fold_in(key, 1))
  params = jax.tree.map(np.asarray, jax.jit(fam.init_model)(k_init, shared)["params"])
  k_perm, k_steps = jax.random.split(jax.random.split(k_train, 1)[0])
  order = jax.numpy.argsort(jax.random.uniform(k_perm, (n,)))
  _, k_loss = jax.random.split(jax.random.fold_in(k_steps, 0))
  eps = jax.random.normal(k_loss, (n, vae_model.LATENT))

  def loss_i(p, x1, e1):
    bce, kl = vae_model.per_example_loss(fam._module(p), x1, e1)
    return jax.numpy.sum(bce + fam.beta * kl)

  jac = helpers.example_grads(loss_i, params, np.asarray(x)[np.asarray(order)], eps)
  g, tau = jax.tree.map(lambda j: j.sum(-1), jac), helpers.grad_bound(jac, k=_K_VAE)
  c = cfg.vae
  box = jax.tree.map(lambda p, g, t: helpers.adam_first_interval(p, g - t, g + t, c.lr, coupled_wd=c.weight_decay),
                     params, g, tau)
  return box, helpers.names(params)


def _lm_expected(tmp_path):
  """Generation 0's AdamW step from the initial model (lm.start=initial) on the 28 real blocks, from the
  gradient's per-token terms (as tests/test_lm.py's 8-vs-1-device test)."""
  import jax
  from collapse_jax import loop
  from collapse_jax.families.lm import train as lm_train
  from tests import helpers
  cfg = helpers.load_config("lm", "ci", generations=1, lm__epochs=1, lm__batch_size=32, lm__dropout=0.0)
  exp = loop.Experiment(cfg)
  fam = exp.family
  init = jax.tree.map(np.asarray, exp.data.shared["init"])
  train = np.asarray(exp.data.shared["train"])
  pad = fam.model_cfg.pad_token_id
  ids = np.concatenate([train, np.full((32 - train.shape[0], train.shape[1]), pad, train.dtype)])
  mask = ((np.arange(32) < train.shape[0])[:, None] * (ids != pad)).astype(np.int32)
  jac = helpers.token_grads(fam.model_cfg, init, ids, mask, None)
  g, tau = jax.tree.map(lambda j: j.sum(-1), jac), helpers.grad_bound(jac)
  tx = lm_train.make_optimizer(fam.tcfg, 1)
  state = lm_train.TrainState(np.int32(0), init, jax.tree.map(np.asarray, tx.init(init)), jax.random.PRNGKey(0))
  box = helpers.adam_interval(fam.tcfg, state, jax.tree.map(np.subtract, g, tau), jax.tree.map(np.add, g, tau), 1)
  box = jax.tree.map(lambda t: t[0], box, is_leaf=lambda t: isinstance(t, tuple) and len(t) == 3)  # params only
  return box, helpers.names(init), train.shape[1]


@pytest.mark.parametrize("family", ["vae", "lm"])
def test_vae_and_lm_two_processes_one_step_within_float32_bounds(tmp_path, family):
  import jax
  from tests import helpers
  args = _ONE_STEP[family]
  if family == "vae":
    expected = {"config.json", "metrics.jsonl"}
  else:
    expected = {"config.json", "metrics.jsonl", "samples/gen_0000.txt", "plots/lm_metrics.png"}
  ref = _reference(tmp_path, args)
  wd = tmp_path / "mp"
  job = _Job(tmp_path, wd, args, "run")
  try:  # the expected step, computed here while the runs wait on each other
    box, names, *rest = (_vae_expected if family == "vae" else _lm_expected)(tmp_path)
  finally:
    job.wait()
    _finish(ref)
  a, b = read_jsonl(str(tmp_path / "ref" / "metrics.jsonl")), read_jsonl(str(wd / "metrics.jsonl"))
  assert len(a) == len(b) == 1 and sorted(a[0]) == sorted(b[0])
  assert all(np.isfinite(v) for v in b[0].values()), b[0]
  assert a[0]["train_samples"] == b[0]["train_samples"]
  # The training loss precedes the optimizer: a float32 sum of the same N non-negative terms in another order
  # (gloo adds the processes' partial sums), so within 2 gamma_N relative of each other (two orders, each within
  # gamma_N * sum|terms| = gamma_N * sum of the exact one), then one division by the count (64 or the token
  # count: the same float32 number on both sides). N also counts each term's own float32 error from its
  # evaluation in another order (<= gamma_K relative per term, K the widest contraction chain feeding it):
  #   VAE: 64 images x (784 per-pixel BCEs + 20 KL terms), each term's error <= gamma(_K_VAE) relative.
  #   LM: 32 rows x (L - 1) per-token NLLs, each a log-sum-exp over 52 logits (<= gamma_64 relative).
  n_terms = 64 * (784 + 20) + _K_VAE if family == "vae" else 32 * (rest[0] - 1) + 64
  np.testing.assert_allclose(b[0]["train_loss"], a[0]["train_loss"], rtol=2 * helpers.gamma(n_terms),
                             atol=0, err_msg="training loss, 2 processes vs 1")
  if family == "lm":
    assert a[0]["best_epoch"] == b[0]["best_epoch"] == 1.0  # the one step's model is the one kept
  # The step: both runs' checkpointed parameters inside the interval Adam maps the gradient's float32 bound
  # [g - tau, g + tau] to (tau: helpers.grad_bound over the per-example / per-token terms; the interval:
  # helpers.adam_first_interval / adam_interval). The 1-process run must pass too: a check of the recomputation.
  _check_checkpoints(wd, tmp_path / "ref", every_step=False)  # default checkpoint_min_seconds: saves by timing
  for who, d in (("1 process", tmp_path / "ref"), ("2 processes", wd)):
    got = _restore_numpy(d / "checkpoints" / str(_steps(d)[-1]) / "default")["carry"]["prev"]["params"]
    leaves, intervals = jax.tree.leaves(got), jax.tree.leaves(box, is_leaf=lambda t: isinstance(t, tuple))
    assert len(leaves) == len(intervals) == len(names)
    for name, p, interval in zip(names, leaves, intervals):
      assert p.shape == interval[0].shape, name
      helpers.inside(f"params{name} after the step on {who}", p, interval)
  _check_writers([job], wd, expected)
