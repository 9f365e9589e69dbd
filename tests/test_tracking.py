"""TensorBoard and W&B tracking (collapse_jax/tracking.py, events.py), checked through their files and calls.

Event files are read back independently of the writer: the TFRecord framing parsed here, both CRCs checked with
google-crc32c (C) or tensorboardX's CRC32C, the events decoded by tensorboardX's generated protobuf classes. What
TensorBoard would show is computed both ways it reads a run: its Python loader (files in name order; a
SessionLog.START after the run's first drops every point at or after its step) and its Rust data server (a time
series whose step goes back drops its points from that step on). W&B: a fake `wandb` module records init / log /
finish (wandb is not installed here)."""
import importlib.machinery
import importlib.util
import json
import os
import struct
import sys
import time
import types

import numpy as np
import pytest

from collapse_jax import config as config_lib, tracking
from collapse_jax.errors import ConfigError
from tests import test_paths
gcs, root = test_paths.gcs, test_paths.root  # its fixtures: the GCS emulator; a local or gs:// directory

pytest.importorskip("tensorboardX")


def _crc32c(data: bytes) -> int:
  try:
    import google_crc32c
    return google_crc32c.value(data)
  except ImportError:
    from tensorboardX.crc32c import crc32c
    return crc32c(data)


def _masked(data: bytes) -> int:
  c = _crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(raw: bytes) -> list:
  """Every Event of one file, each record's length and data CRCs checked; no trailing bytes allowed."""
  from tensorboardX.proto import event_pb2
  out, i = [], 0
  while i < len(raw):
    header = raw[i:i + 8]
    (n,), (crc_n,) = struct.unpack("<Q", header), struct.unpack("<I", raw[i + 8:i + 12])
    data, (crc_d,) = raw[i + 12:i + 12 + n], struct.unpack("<I", raw[i + 12 + n:i + 16 + n])
    assert crc_n == _masked(header) and crc_d == _masked(data) and len(data) == n
    ev = event_pb2.Event()
    ev.ParseFromString(data)
    out.append(ev)
    i += 16 + n
  return out


def _value(v):
  if v.HasField("tensor"):
    assert v.metadata.plugin_data.plugin_name == "text" and v.tag.endswith("/text_summary")
    assert list(v.tensor.tensor_shape.dim[i].size for i in range(len(v.tensor.tensor_shape.dim))) == [1]
    return "\n".join(line[4:] for line in v.tensor.string_val[0].decode().split("\n"))  # the 4-space code block
  return v.simple_value


def tensorboard_view(files: dict[str, bytes]) -> tuple[dict, dict]:
  """{tag: [(step, value)]} as TensorBoard's Python loader and its Rust data server would show them."""
  py, rs, seen_start = {}, {}, False
  for name in sorted(files):
    for ev in read_events(files[name]):
      if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
        if seen_start:
          py = {t: [p for p in pts if p[0] < ev.step] for t, pts in py.items()}
        seen_start = True
      for v in ev.summary.value:
        py.setdefault(v.tag, []).append((ev.step, _value(v)))
        pts = rs.setdefault(v.tag, [])
        pts[:] = [p for p in pts if p[0] < ev.step] + [(ev.step, _value(v))]
  return py, rs


def _run(**over):
  cfg = config_lib.base_config()
  for k, v in over.items():
    node = cfg
    *parents, leaf = k.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config_lib.parse(cfg)


def _metrics(g: int, start: int) -> tuple[dict, dict]:
  scalars = {"test_ppl": 10.0 + g / 3 + 100 * start, "var_ratio/mean": 0.5 ** g + start}
  texts = {"samples": f"gen {g} start {start}\n*not bold* <b>x</b>\n\n  indented"}
  return scalars, texts


def _tb_files(root):
  tb = os.path.join(root, "tensorboard")
  from collapse_jax import paths
  return {n: paths.read_bytes(os.path.join(tb, n)) for n in paths.listdir(tb)} if paths.exists(tb) else {}


def test_every_scalar_and_text_at_every_generation(root, request):
  from collapse_jax import paths
  paths.check_workdir(root)
  tr = tracking.Tracker(root, _run(), {"seed": 0})
  for g in range(5):
    tr.log(g, *_metrics(g, 0))
    if g == 1:
      tr.flush()  # files grow per chunk
  tr.close()
  files = _tb_files(root)
  if root.startswith("gs://"):  # the bucket itself, through the emulator's API
    emu = request.getfixturevalue("gcs")
    prefix = root[len("gs://collapse-test/"):]
    assert {n.rsplit("/", 1)[1]: emu.read(n) for n in emu.names(prefix + "/tensorboard")} == files
  assert len(files) == 1 and "tfevents" in next(iter(files))
  evs = read_events(next(iter(files.values())))
  assert evs[0].file_version == "brain.Event:2"
  assert evs[1].session_log.status == evs[1].session_log.START and evs[1].step == 0
  py, rs = tensorboard_view(files)
  assert py == rs
  assert sorted(py) == ["samples/text_summary", "test_ppl", "var_ratio/mean"]
  for g in range(5):
    scalars, texts = _metrics(g, 0)
    assert py["test_ppl"][g] == (g, np.float32(scalars["test_ppl"]))
    assert py["var_ratio/mean"][g] == (g, np.float32(scalars["var_ratio/mean"]))
    assert py["samples/text_summary"][g] == (g, texts["samples"])
  assert all(len(v) == 5 for v in py.values())


def test_a_resumed_run_shows_one_point_per_generation(tmp_path):
  wd = str(tmp_path)
  first = tracking.Tracker(wd, _run(), {})
  for g in range(7):
    first.log(g, *_metrics(g, 0))
  first.flush()  # then killed: no close; the checkpoint it resumes from is generation 4
  second = tracking.Tracker(wd, _run(), {})
  for g in range(4, 10):
    second.log(g, *_metrics(g, 1))
  second.close()
  files = _tb_files(wd)
  assert len(files) == 2
  py, rs = tensorboard_view(files)
  assert py == rs
  for tag in ("test_ppl", "var_ratio/mean", "samples/text_summary"):
    assert [s for s, _ in py[tag]] == list(range(10)), tag
  for g in range(10):
    scalars, texts = _metrics(g, 0 if g < 4 else 1)
    assert py["test_ppl"][g][1] == np.float32(scalars["test_ppl"])
    assert py["samples/text_summary"][g][1] == texts["samples"]


def test_tensorboard_off_and_processes_other_than_0_write_nothing(tmp_path, monkeypatch):
  import jax
  fake = _fake_wandb(monkeypatch)
  tr = tracking.Tracker(str(tmp_path / "off"), _run(tensorboard=False), {})
  tr.log(0, *_metrics(0, 0))
  tr.close()
  assert not (tmp_path / "off").exists()
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  tr = tracking.Tracker(str(tmp_path / "p1"), _run(wandb__project="proj"), {})
  for g in range(3):
    tr.log(g, *_metrics(g, 0))
  tr.flush()
  tr.close()
  assert not (tmp_path / "p1").exists() and fake.calls == []


# --- W&B ---------------------------------------------------------------------------------------------------------
def _fake_wandb(monkeypatch):
  """A `wandb` module recording its calls. Like W&B, a run refuses a step below its current one; resumed by id,
  an online run continues at the step after the server's last one, an offline run at 0 (it learns the server's
  steps only at `wandb sync`)."""
  mod = types.ModuleType("wandb")
  mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # found by importlib.util.find_spec
  mod.calls, mod.server_steps = [], {}

  class Html:
    def __init__(self, data):
      self.data = data

  class Run:
    def __init__(self, run_id, mode):
      self.id, self.step = run_id, mod.server_steps.get(run_id, 0) if mode == "online" else 0

    def log(self, data, step):
      mod.calls.append(("log", step, data))
      assert step >= self.step, "W&B drops a step below the run's current one"
      self.step = mod.server_steps[self.id] = step + 1

    def finish(self):
      mod.calls.append(("finish",))

  def init(**kw):
    mod.calls.append(("init", kw))
    return Run(kw["id"], kw["mode"])

  mod.Html, mod.init = Html, init
  monkeypatch.setitem(sys.modules, "wandb", mod)
  return mod


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_wandb_gets_every_metric_once_under_one_resumed_run_id(tmp_path, monkeypatch, mode):
  fake = _fake_wandb(monkeypatch)
  wd = str(tmp_path)
  run = _run(wandb__project="collapse", wandb__mode=mode, tensorboard=False)
  tr = tracking.Tracker(wd, run, {"seed": 3})
  for g in range(5):
    tr.log(g, *_metrics(g, 0))
  tr.flush()  # killed after generation 4; resumed from the checkpoint at 3
  tr2 = tracking.Tracker(wd, run, {"seed": 3})
  for g in range(3, 8):
    tr2.log(g, *_metrics(g, 1))
  tr2.close()
  inits = [c[1] for c in fake.calls if c[0] == "init"]
  assert len(inits) == 2 and inits[0] == inits[1]
  with open(os.path.join(wd, "wandb.json")) as fh:
    state = json.load(fh)
  assert state == {"run_id": inits[0]["id"], "next_step": 8} and state["run_id"].isalnum()
  assert inits[0] == dict(project="collapse", entity=None, mode=mode, id=state["run_id"], resume="allow",
                          name=os.path.basename(wd), config={"seed": 3}, dir=wd)
  logs = [c for c in fake.calls if c[0] == "log"]
  assert [step for _, step, _ in logs] == list(range(8))
  for _, g, data in logs:
    scalars, texts = _metrics(g, 0 if g < 5 else 1)
    assert {k: data[k] for k in scalars} == scalars
    assert data["samples"].data.startswith("<pre>gen ") and "&lt;b&gt;x&lt;/b&gt;" in data["samples"].data
  assert fake.calls[-1] == ("finish",)


def test_wandb_asked_for_but_not_installed_is_one_line_error(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
  tracking.check(_run())  # not asked for: fine
  with pytest.raises(ConfigError) as e:
    tracking.check(_run(wandb__project="p"))
  assert str(e.value) == ("config.wandb.project='p' asks for Weights & Biases, which is not installed: "
                          "pip install wandb (or set config.wandb.project='')")


@pytest.mark.parametrize("key,value,msg", [
    ("tensorboard", "yes", r"^config\.tensorboard must be True or False, got 'yes'$"),
    ("wandb__mode", "cloud", r"^config\.wandb\.mode='cloud' is not one of online, offline$"),
    ("wandb__project", 3, r"^config\.wandb\.project must be a string, got 3$"),
])
def test_tracking_fields_are_checked_by_name(key, value, msg):
  import ml_collections
  d = config_lib.base_config().to_dict()
  node = d
  *parents, leaf = key.split("__")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=msg):
    config_lib.parse(ml_collections.ConfigDict(d))


def test_event_file_names_sort_by_start_within_one_second(tmp_path, monkeypatch):
  monkeypatch.setattr(time, "time", lambda: 1_800_000_000.25)  # every start in the same second
  for s in range(3):
    tr = tracking.Tracker(str(tmp_path), _run(), {})
    tr.log(10 * s, {"x": float(s)}, {})
    tr.close()
  files = _tb_files(str(tmp_path))
  assert [read_events(files[n])[1].step for n in sorted(files)] == [0, 10, 20]
