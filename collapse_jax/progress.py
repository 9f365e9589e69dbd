"""Progress lines from inside a long compiled program: a training scan reports each step, the decoder each batch.

One LM or VAE generation runs for minutes as one compiled program, so the loop's one line per generation says
nothing in between. `report` stages a `jax.debug.callback` with a few scalars (step and epoch indices, the run's
key, a loss, amounts of work); the host side prints lines like

  [lm train] epoch 2/5 step 37/120 (157/600, 26%)  loss 3.412  4.1 step/s  3.2e+04 tok/s  ETA 0:01:48
  [lm decode] batch 3/31 (10%)  0.52 batch/s  33 prompts/s  2.1e+03 new tok/s  ETA 0:00:54

Host side, all under one lock (callbacks may come from several device threads at once):
- process 0 only (jax.process_index() == 0);
- rate limit per phase: its first report, then at most one line per EVERY_S seconds, and always its last step.
  COLLAPSE_JAX_PROGRESS_EVERY (seconds, default 15; 0: every report) sets EVERY_S at import; tests set it;
- dedupe: jit's partitioner runs the callback once, but inside shard_map every device runs it, so a report
  comes `copies` times (the manual axes' size, known when tracing) and is printed on its first arrival, in
  whatever order the devices get there. A run of a phase is identified by its key (`tag`): a new key starts a
  new run, and so does the first step arriving once more after all its copies (a rerun with the same key).

COLLAPSE_JAX_PROGRESS=0 (or ENABLED = False before tracing) leaves the callback out of programs traced
afterwards. Numerics: the callback only reads values the program computes anyway (the counts it adds are
integer sums beside the arithmetic), so outputs are bit-identical with it on or off (tests/test_progress.py).
"""
import contextlib
import dataclasses
import functools
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.errors import ConfigError


def _every_from_env() -> float:
  text = os.environ.get("COLLAPSE_JAX_PROGRESS_EVERY", "15")
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not value >= 0:  # NaN too
    raise ConfigError(f"COLLAPSE_JAX_PROGRESS_EVERY must be a number of seconds >= 0, got {text!r}")
  return value


ENABLED = os.environ.get("COLLAPSE_JAX_PROGRESS", "1") != "0"
EVERY_S = _every_from_env()


def _print(line: str) -> None:
  print(line, flush=True)


SINK = _print  # where lines go; tests swap in a list's append


@dataclasses.dataclass(frozen=True)
class _Static:
  phase: str
  epochs: int | None
  unit: str
  amounts: tuple[str, ...]
  shows: tuple[str, ...]
  copies: int  # calls per report: one per device of shard_map's manual axes


@dataclasses.dataclass
class _Run:
  tag: tuple
  t_first: float
  calls: dict = dataclasses.field(default_factory=dict)  # (epoch, step) -> callbacks so far
  t_line: float | None = None   # when the last line was printed
  done_line: int = 0            # reports counted at that line
  sums: dict = dataclasses.field(default_factory=dict)  # amounts since that line


_lock = threading.Lock()
_runs: dict[str, _Run] = {}


def reset() -> None:
  """Forget every phase's run (tests)."""
  with _lock:
    _runs.clear()


def _tag(key):
  if key is None:
    return jnp.zeros((1,), jnp.uint32)
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return jnp.ravel(key).astype(jnp.uint32)


def report(phase: str, step, steps, *, epoch=None, epochs: int | None = None, tag=None, shows=None,
           amounts=None, unit: str = "step") -> None:
  """Stage one progress report (call inside a traced program; a no-op when ENABLED is False).

  step: 0-based index in `steps` (a static int or a traced count, e.g. a ragged buffer's steps); epoch: 0-based
  index in the static `epochs`; tag: the run's key (tells runs apart); shows: {name: scalar} printed as is (a
  loss); amounts: {unit: scalar} of work in this step, printed as rates (tok/s).
  """
  if not ENABLED:
    return
  shows, amounts = dict(shows or {}), dict(amounts or {})
  mesh = jax.sharding.get_abstract_mesh()
  copies = 1 if mesh.empty else int(np.prod([mesh.shape[a] for a in mesh.manual_axes], dtype=np.int64))
  static = _Static(phase, epochs, unit, tuple(amounts), tuple(shows), copies)
  epoch = jnp.zeros((), jnp.int32) if epoch is None else epoch
  jax.debug.callback(functools.partial(_on_report, static), jnp.asarray(step, jnp.int32),
                     jnp.asarray(steps, jnp.int32), jnp.asarray(epoch, jnp.int32), _tag(tag),
                     tuple(jnp.asarray(v, jnp.float32) for v in shows.values()),
                     tuple(jnp.asarray(v, jnp.float32) for v in amounts.values()))


def fmt_time(s: float) -> str:
  """Seconds as H:MM:SS (the ETAs of every progress line: progress reports, the loop, the trainer)."""
  s = int(s)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _on_report(st: _Static, step, steps, epoch, tag, shows, amounts) -> None:
  if jax.process_index() != 0:
    return
  step, steps, epoch = int(step), int(steps), int(epoch)
  epochs = st.epochs or 1
  key, tag, now = (epoch, step), tuple(np.asarray(tag).tolist()), time.monotonic()
  total, done = epochs * steps, epoch * steps + step + 1
  with _lock:
    run = _runs.get(st.phase)
    rerun = run is not None and key == (0, 0) and run.calls.get(key, 0) >= st.copies
    if run is None or run.tag != tag or rerun:
      run = _runs[st.phase] = _Run(tag, now)
    run.calls[key] = run.calls.get(key, 0) + 1
    if run.calls[key] > 1:
      return  # the same step from another device
    for name, v in zip(st.amounts, amounts):
      run.sums[name] = run.sums.get(name, 0.0) + float(v)
    if not (run.t_line is None or now - run.t_line >= EVERY_S or done == total):
      return
    where = f"{st.unit} {step + 1}/{steps}"
    if st.epochs:
      where = f"epoch {epoch + 1}/{epochs} {where} ({done}/{total}, {100 * done / total:.0f}%)"
    else:
      where += f" ({100 * done / total:.0f}%)"
    parts = [f"[{st.phase}] {where}"]
    parts += [f"{name} {float(v):.4g}" for name, v in zip(st.shows, shows)]
    counted = len(run.calls)
    if run.t_line is not None and now > run.t_line:
      dt = now - run.t_line
      parts.append(f"{(counted - run.done_line) / dt:.3g} {st.unit}/s")
      parts += [f"{run.sums.get(name, 0.0) / dt:.3g} {name}/s" for name in st.amounts]
    if counted > 1 and now > run.t_first and done < total:
      parts.append(f"ETA {fmt_time((total - done) * (now - run.t_first) / (counted - 1))}")
    run.t_line, run.done_line, run.sums = now, counted, {}
    SINK("  ".join(parts))


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def compile_clock():
  """Seconds JAX spends tracing, lowering and compiling inside the block (its monitoring events), as a
  one-element list filled in as they come: the loop's 'compiled in' line without changing how it compiles."""
  spent = [0.0]

  def listen(event, duration, **_):
    if event in _COMPILE_EVENTS:
      spent[0] += duration

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield spent
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


@contextlib.contextmanager
def every(seconds: float):
  """EVERY_S set for a block (tests); runs seen so far are forgotten on entry."""
  global EVERY_S
  old, EVERY_S = EVERY_S, float(seconds)
  reset()
  try:
    yield
  finally:
    EVERY_S = old
