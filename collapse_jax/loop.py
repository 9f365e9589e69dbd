"""The generation loop: the one driver every family plugs into (see family.py for the family's side).

Generation g: build the training set from the regime's buffers -> fit -> evaluate -> sample -> add the samples to
the buffers for g+1. A chunk of `checkpoint_every` generations is one compiled `lax.scan`; chains (independent
replicas) are vmapped inside it and split over the device mesh, or, for single-chain families, the family shards
its batches. After each chunk the carry and the history go to an Orbax checkpoint, saved in the background while the
next chunk runs (a chunk that ends while that save is still being written, or less than checkpoint_min_seconds
after it started, is not saved; the last chunk always is), and the chunk's lines are appended to metrics.jsonl; a
killed run resumes from the last checkpoint on disk (metrics.jsonl cut or completed to match it) and ends
bit-identical to an uninterrupted one. A chunk whose metrics hold a NaN or infinity (any family's loss or metric)
stops the run with a one-line NonFiniteError naming the generation and the metric, before that chunk is
checkpointed or written to metrics.jsonl. Around all of it: the workdir lock (lock.py; a second run is refused),
the resume or extension checks (resume.py), and the outputs a reader looks at, written as the run goes and
rebuilt when missing (outputs.py: figures, samples, arrays.npz, summary.md, TensorBoard).

Meshes and shardings: the 1-D 'data' mesh unless the family builds its own (`make_mesh`); a single-chain family
may place its models and shared arrays (`model_shardings`, `shared_shardings`; the LM splits them over 'fsdp').

Keys: chain c's key is fold_in(root, c); generation g's is fold_in(fold_in(chain, 0), g), so any generation of
any chain can be recomputed on its own; its parts (mixing, fitting, sampling) fold in 0, 1, 2.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax import checkpoint, family as family_lib, lock, metrics as metrics_lib, outputs, paths, progress
from collapse_jax import regimes, registry, resume, sharding, summary, tables, tracking
from collapse_jax.errors import ConfigError, NonFiniteError

class Experiment:
  """Everything static about one run, settled at construction: the typed config, the family and its mesh, the
  data (read once, by the family's `load_data`), the carry's shapes and shardings, and the compiled chunk (built
  on first use). Nothing here is compiled before `chunk_fn` is called."""

  def __init__(self, cfg, mesh=None, abstract: bool = False, devices=None):
    """mesh: the run's mesh (default: the family's, over `devices` or the visible ones). abstract: plan mode, a
    family that can (the LM) reads neither weights nor data (Family.load_data returns shapes)."""
    self.cfg = cfg
    self.run, self.family = registry.build(cfg, mesh, devices, abstract)
    run, fam = self.run, self.family
    self.mesh = fam.mesh
    if not fam.vmap_chains and run.chains != 1:
      raise ConfigError(f"config.chains must be 1 for family {fam.name!r} (it shards batches, not chains)")
    self.data = fam.load_data()
    n_real = self.data.n_real
    self.counts = run.sample_counts()
    self.counts[0] = n_real
    self.spec = regimes.make_spec(run, n_real, self.counts)
    if run.regime.name == "real_fraction":
      k = max(self.spec.real_counts[1:], default=0)  # the counts training_set uses, rounded on the host
      if k > n_real:
        raise ConfigError(f"config.regime.real_fraction={run.regime.real_fraction} asks for {k} real data per "
                          f"generation but only {n_real} exist (config.n_real)")
    self.n_chains = run.chains
    self.padded_chains = sharding.pad_to_mesh(run.chains, self.mesh) if fam.vmap_chains else 1
    self.stats = metrics_lib.stat_names(run.quantiles)
    local = self.padded_chains // self.mesh.devices.size
    # chain_batch 0: one chain at a time on CPU (a vmapped EM while_loop runs until its slowest chain is
    # done, which costs more than it saves there), all of a device's chains at once on accelerators.
    auto = 1 if self.mesh.devices.flat[0].platform == "cpu" else local
    self.chain_batch = max(1, min(run.chain_batch or auto, local))
    self.snap_gens = sorted({g for g in run.snapshot_generations if g < run.generations})
    self._counts_dev = np.asarray(self.counts + [self.spec.m_max], np.int32)
    # Layout of the shared arrays and of the carry, by tracing only.
    self.shared_shardings = fam.shared_shardings(self.data.shared)
    self.shared_abstract = family_lib.abstract(self.data, self.shared_shardings)
    keys, fn = self._init_fn()
    shapes = jax.eval_shape(fn, keys, self.shared_abstract)
    self.carry_shardings = self._carry_shardings(shapes)
    self.carry_abstract = checkpoint.abstract(shapes, self.carry_shardings)
    # Checkpoints hold the carry as one array per dtype where the carry allows (checkpoint.ChainPacker).
    self._packer = checkpoint.ChainPacker(shapes, self.carry_shardings) if (
        fam.vmap_chains and checkpoint.ChainPacker.applies(shapes, self.carry_shardings)) else None
    self._chunk = None
    self._init = None

  # --- one chain, one generation -------------------------------------------------------------------------
  def _chain_init(self, chain_key, shared):
    fam = self.family
    real, aux = fam.init_chain(jax.random.fold_in(chain_key, 1), shared)
    model = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(fam.init_model, jax.random.fold_in(chain_key, 1), shared))
    return {"key": chain_key, "data": regimes.init(self.spec, real), "aux": aux, "prev": model, "model0": model}

  def _generation(self, carry, g, shared):
    fam, spec = self.family, self.spec
    key = jax.random.fold_in(jax.random.fold_in(carry["key"], 0), g)
    counts = jnp.asarray(self._counts_dev)
    x, w = regimes.training_set(spec, carry["data"], g, jax.random.fold_in(key, 0), counts[g])
    gen = family_lib.Generation(g, x, w, carry["prev"], carry["model0"], carry["aux"], shared)
    model = fam.fit(gen, jax.random.fold_in(key, 1))
    model0 = jax.tree.map(lambda new, old: jnp.where(g == 0, new, old), model, carry["model0"])
    gen = gen._replace(model0=model0)
    metrics = fam.evaluate(model, gen)
    samples, sample_metrics = fam.sample(model, spec.m_max, jax.random.fold_in(key, 2), gen)
    metrics = {**metrics, **sample_metrics}
    data = regimes.update(spec, carry["data"], samples, counts[g + 1])
    carry = dict(carry, data=data, prev=model, model0=model0)
    return carry, metrics, samples[:self.run.snapshot_size]

  # --- the compiled chunk --------------------------------------------------------------------------------
  def _all_chains(self, carry, g, shared):
    """One generation of every chain. Each device runs its own chains (shard_map), `chain_batch` at a time
    vmapped, so a chain's arithmetic depends on that batch size and not on how many chains a device holds:
    meshes of 2 and 8 devices agree bit for bit. A 1-device mesh is compiled without SPMD partitioning and can
    differ from them in the last bit (tests/test_gmm.py compares it in float64)."""
    b = self.chain_batch

    def local(carry_c, g, shared):
      fn = lambda c: self._generation(c, g, shared)
      n_local = jax.tree.leaves(carry_c)[0].shape[0]
      if b >= n_local:
        return jax.vmap(fn)(carry_c)
      return jax.lax.map(fn, carry_c, batch_size=b if b > 1 else None)

    spec = jax.sharding.PartitionSpec(sharding.AXIS)
    rep = jax.sharding.PartitionSpec()
    # check_vma=False: the families' while_loops start from constants that become per-device values; there
    # are no collectives inside, so the varying-axis bookkeeping would only demand casts in every family.
    return jax.shard_map(local, mesh=self.mesh, in_specs=(spec, rep, rep), out_specs=spec,
                         check_vma=False)(carry, g, shared)

  def _chunk_body(self, carry, gs, shared):
    def step(carry, g):
      if self.family.vmap_chains:
        carry, metrics, snap = self._all_chains(carry, g, shared)
        snap = snap[0]
        # Stats over chains from every chain's value on every device (an all-gather, no arithmetic), not from
        # per-device partial sums combined by an all-reduce whose order depends on the collectives' backend
        # (in-process vs gloo across processes): the same bits for any mesh and any number of processes.
        metrics = jax.lax.with_sharding_constraint(metrics, sharding.replicated(self.mesh))
      else:
        carry, metrics, snap = self._generation(carry, g, shared)
        metrics = jax.tree.map(lambda m: m[None], metrics)
      scalars, arrays = metrics_lib.aggregate(metrics, self.n_chains, self.run.quantiles)
      return carry, (scalars, arrays, snap)
    return jax.lax.scan(step, carry, gs)

  def _init_fn(self):
    root = jax.random.PRNGKey(self.run.seed)
    if self.family.vmap_chains:
      keys = jax.vmap(lambda c: jax.random.fold_in(root, c))(jnp.arange(self.padded_chains))
      return keys, jax.vmap(self._chain_init, in_axes=(0, None))
    return jax.random.fold_in(root, 0), self._chain_init

  def init_carry(self, shared):
    keys, fn = self._init_fn()
    if self._init is None:  # kept, so that runs sharing this Experiment compile it once
      self._init = jax.jit(fn, out_shardings=self.carry_shardings)
    return self._init(keys, shared)

  def stored_carry_abstract(self):
    return self._packer.abstract if self._packer else self.carry_abstract

  def store_carry(self, carry):
    return self._packer.pack(carry) if self._packer else carry

  def load_carry(self, stored):
    return self._packer.unpack(stored) if self._packer else stored

  def _carry_shardings(self, shapes):
    lead, rep = sharding.leading(self.mesh), sharding.replicated(self.mesh)
    if self.family.vmap_chains:
      return jax.tree.map(lambda _: lead, shapes)
    size = dict(self.mesh.shape)[sharding.AXIS]
    # Single chain: split the large data buffers by rows over 'data' where they divide evenly; models are
    # placed as the family says (Family.model_shardings; default replicated), the same for prev and model0.
    data = jax.tree.map(lambda s: lead if s.ndim >= 2 and s.shape[0] % size == 0 else rep, shapes["data"])
    placed = dict(jax.tree.map(lambda _: rep, shapes), data=data)
    placed["prev"] = self.family.model_shardings(shapes["prev"])
    placed["model0"] = self.family.model_shardings(shapes["model0"])
    return placed

  def chunk_fn(self):
    if self._chunk is None:
      self._chunk = jax.jit(sharding.on_mesh(self._chunk_body, self.mesh),
                            in_shardings=(self.carry_shardings, None, self.shared_shardings),
                            out_shardings=(self.carry_shardings, None), donate_argnums=0)
    return self._chunk


def _pace(rate: float, remaining: int) -> str:
  """Progress after the first chunk: generations per second, or seconds per generation for slow families (VAE,
  LM: minutes per generation), and the ETA."""
  pace = f"{1 / rate:.3g} s/gen" if rate < 1 else f"{rate:.3g} gen/s"
  return f"{pace}  ETA {progress.fmt_time(remaining / rate)}"


def run(cfg, workdir: str, mesh=None, stop_after: int | None = None, experiment: Experiment | None = None) -> dict:
  """Run (or resume, or extend) the experiment in `workdir`; returns the host-side history.

  `stop_after` ends the run early after the chunk that reaches that generation (tests use it to interrupt).
  `experiment`: an Experiment of this same config whose compiled chunk is reused (several workdirs of one
  config in one process, e.g. a test's uninterrupted and interrupted runs, pay one compilation).
  """
  paths.check_workdir(workdir)
  if experiment is not None and experiment.cfg.to_json_best_effort() != cfg.to_json_best_effort():
    raise ValueError("run(experiment=...) must be an Experiment of the same config")
  exp = experiment or Experiment(cfg, mesh)
  tracking.check(exp.run)
  held = lock.acquire_run(workdir)  # one run per workdir: a second is refused in one line naming the holder
  try:
    return _run(exp, cfg, workdir, stop_after, held)
  finally:
    if held is not None:
      held.release()


def _run(exp, cfg, workdir, stop_after, held_lock) -> dict:
  run_cfg = exp.run
  G = run_cfg.generations
  cfg_json = json.loads(cfg.to_json_best_effort())
  ckpts = checkpoint.Checkpoints(workdir, run_cfg.keep_checkpoints)
  held = resume.check(workdir, cfg_json, bool(ckpts.steps()), exp)
  host0 = jax.process_index() == 0  # on multi-host runs one process writes the host-side files; Orbax the rest
  if host0:
    paths.write_atomic(os.path.join(workdir, "config.json"), json.dumps(cfg_json, indent=2, sort_keys=True))

  shared = jax.device_put(exp.data.shared, exp.shared_shardings)
  chunk = exp.chunk_fn()
  ys_shape = jax.eval_shape(chunk, exp.carry_abstract, np.zeros((1,), np.int32), exp.shared_abstract)[1]
  history = resume.history(exp, ys_shape, G)

  def stored(meta):  # each checkpoint's history is as long as the run that saved it (resume.py)
    n = int(meta.get("generations", held or G))
    return {"carry": exp.stored_carry_abstract(), "history": checkpoint.pack_host(resume.history(exp, ys_shape, n))}

  # Restore before compiling anything, so an unreadable workdir costs no compile time.
  step, restored = ckpts.restore_latest(stored)
  if restored is not None:
    carry = exp.load_carry(restored["carry"])
    n = int(ckpts.meta(step).get("generations", held or G))
    history = resume.grow(checkpoint.unpack_host(restored["history"], resume.history(exp, ys_shape, n)), exp, n,
                          history)
    print(f"resuming {workdir} at generation {step}/{G}" + (f" (extending its {n})" if n < G else ""), flush=True)
  start = int(history["next_gen"])
  out = outputs.Outputs(workdir, exp, tracking.Tracker(workdir, run_cfg, cfg_json)) if host0 else None
  try:
    if out:
      out.sync(history, start)
    if start >= G:
      if out and out.missing(G):  # killed while writing them, or deleted: rebuilt from the restored history
        out.write(history, G, wait=True)
      _finish(out, history, G, f"{workdir} already holds a finished run of {G} generations; nothing to run")
      return history
    if restored is None:
      carry = exp.init_carry(shared)
    done = _generations(exp, chunk, carry, shared, history, start, ckpts, out, stop_after, held_lock)
  finally:
    ckpts.close()  # every exit, the errors included, awaits the save in flight
    if out:
      out.close()
  _finish(out, history, done, None)
  return history


def _finish(out, history, done: int, note: str | None) -> None:
  if out is None:
    return
  if note:
    print(note, flush=True)
  print(out.summary(history, done), end="", flush=True)


def _generations(exp, chunk, carry, shared, history, start, ckpts, out, stop_after, held_lock) -> int:
  """Runs chunks from `start` until the run ends or `stop_after`; returns the generations done."""
  fam, run_cfg = exp.family, exp.run
  G, L = run_cfg.generations, run_cfg.checkpoint_every
  meta = {"generations": G}
  t0, done_since = time.time(), 0
  t_first, last_save, saved = None, None, start  # saved: the newest checkpoint's step (the resume point)
  print(f"[{fam.name}] compiling the generation loop ({min(L, G - start)} generations per chunk, "
        f"{exp.mesh.devices.size} device{'s' if exp.mesh.devices.size > 1 else ''}) ...", flush=True)
  with progress.compile_clock() as compiled:
    for s in range(start, G, L):
      e = min(s + L, G)
      carry, (scalars, arrays, snap) = chunk(carry, np.arange(s, e, dtype=np.int32), shared)
      scalars, arrays, snap = metrics_lib.to_host((scalars, arrays, snap))
      bad = _first_non_finite(scalars, arrays, s)
      if bad is not None:  # before any of the chunk is kept: the last one saved holds only good generations
        g, name = bad
        span = f"generation {s}" if e - s == 1 else f"generations {s}-{e - 1}"
        raise NonFiniteError(f"generation {g}: metric {name!r} is not finite; stopped without checkpointing "
                             f"{span}, so a rerun resumes at generation {saved} from the last checkpoint")
      for k, v in scalars.items():
        history["metrics"][k][s:e] = v
      for k, v in arrays.items():
        history["arrays"][k][s:e] = v
      for i, g in enumerate(exp.snap_gens):
        if s <= g < e:
          history["snapshots"][i] = snap[g - s]
      history["next_gen"] = np.asarray(e, np.int64)
      stop = e >= G or (stop_after is not None and e >= stop_after)
      saving = stop or _save_due(run_cfg.checkpoint_min_seconds, last_save, ckpts)
      if saving:
        _check_lock(held_lock)  # a run whose lock was taken over stops before writing more
        last_save, saved = time.monotonic(), e
        # Returns once the state is off the device and copied (checkpoint.py), so the next chunk can donate the
        # carry and this loop can fill the history while the files are written.
        ckpts.save(e, {"carry": exp.store_carry(carry), "history": checkpoint.pack_host(history)}, meta)
      if out:  # metrics.jsonl may land before the checkpoint: a resume from an older one truncates it (sync)
        out.append(history, s, e)
      now = time.time()
      if t_first is None:  # the first chunk includes compilation; the rate is measured after it
        t_first, done_since = now, 0
        rate_txt = f"first chunk {now - t0:.1f}s, compiling {compiled[0]:.1f}s of it"
      else:
        done_since += e - s
        rate_txt = _pace(done_since / (now - t_first), G - e)
      print(f"[{fam.name}] generation {e}/{G} ({100 * e / G:.0f}%)  {_headline(fam, history, e - 1)}{rate_txt}",
            flush=True)
      if out and saving:  # figures and the rest: up to the checkpoint just saved (all of them when the run stops)
        out.write(history, e, wait=stop)
      if stop:
        return e
  return G


def _headline(fam, history, g: int) -> str:
  name = next((m for m in fam.headline if m in history["metrics"]), None)
  if name is None:
    return ""
  return f"{name} {tables.fmt(summary.headline_value(history['metrics'], name, g))}  "


def _save_due(min_seconds: float, last_save: float | None, ckpts) -> bool:
  if min_seconds == 0 or last_save is None:
    return True
  due = time.monotonic() - last_save >= min_seconds and not ckpts.busy()
  if jax.process_count() > 1:  # Orbax's save is collective: every process takes process 0's decision
    from jax.experimental import multihost_utils
    due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
  return due


def _check_lock(held_lock) -> None:
  """Raise WorkdirBusy where process 0's lock was taken over (its heartbeat stalled past the lease), on every
  process together: the others would otherwise wait in the next save's collectives for a process that left."""
  lost = held_lock is not None and held_lock.lost is not None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    lost = bool(multihost_utils.broadcast_one_to_all(np.int32(lost)))
  if lost:
    raise lock.WorkdirBusy(held_lock.lost if held_lock is not None else
                           "this run's workdir lock was taken over by another run (process 0 lost it); stopped")


def _first_non_finite(scalars: dict, arrays: dict, start: int):
  """(generation, metric name) of the first non-finite float value in a chunk's host-side metrics, or None.
  Every stat of a scalar metric counts (a NaN in one chain shows in the mean); integer arrays cannot be."""
  found = None
  for name, v in {**scalars, **arrays}.items():
    if not np.issubdtype(v.dtype, np.floating) or not v.size:
      continue
    bad = ~np.isfinite(v.reshape(v.shape[0], -1)).all(axis=1)
    if bad.any():
      g = start + int(np.argmax(bad))
      if found is None or g < found[0]:
        found = (g, name)
  return found
