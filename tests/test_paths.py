"""paths.py, the one path layer for every file of a run: local paths and gs:// (against a local GCS emulator), and
the GMM job end to end with a gs:// workdir (SIGKILL, resume, same metrics as a local run)."""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from collapse_jax import paths
from collapse_jax.errors import ConfigError
from collapse_jax.metrics import read_jsonl
from tests.helpers import REPO, cli, load_config

BUCKET = "collapse-test"


# --- the emulator --------------------------------------------------------------------------------------------
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """A gcp-storage-emulator subprocess on 127.0.0.1 (in memory; with object generations, tests/gcs_emulator.py),
  read back through its own JSON API so that the tests check the bucket independently of the layer under test."""

  def __init__(self):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "gcs_emulator.py"), "start", "--host=127.0.0.1",
         f"--port={self.port}", "--in-memory", f"--default-bucket={BUCKET}", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
      try:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
          break
      except OSError:
        if self.proc.poll() is not None or time.time() > deadline:
          self.close()
          raise RuntimeError("the GCS emulator did not start")
        time.sleep(0.05)

  def env(self) -> dict:
    return {
        "STORAGE_EMULATOR_HOST": self.url,        # gcsfs (epath's gs:// backend without TensorFlow)
        "TENSORSTORE_GCS_HTTP_URL": self.url,     # tensorstore (Orbax's arrays)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential lookup
        "FSSPEC_GCS_TOKEN": "anon",               # gcsfs: no credential lookup
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no bucket-type gRPC call (the emulator has none)
        "EPATH_USE_TF": "false",                  # gcsfs even where TensorFlow is installed
    }

  def names(self, prefix: str) -> list[str]:
    """Every object name under gs://BUCKET/prefix, fresh from the emulator."""
    q = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}/o?{q}", timeout=10) as r:
      return sorted(item["name"] for item in json.load(r).get("items", []))

  def read(self, name: str) -> bytes:
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media",
                                timeout=10) as r:
      return r.read()

  def close(self):
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def gcs():
  pytest.importorskip("gcp_storage_emulator", reason="needs the GCS emulator: pip install gcp-storage-emulator")
  pytest.importorskip("gcsfs", reason="needs gcsfs (epath's gs:// backend): pip install gcsfs")
  emu = Emulator()
  saved = {k: os.environ.get(k) for k in emu.env()}
  os.environ.update(emu.env())  # the CLI subprocesses inherit it (tests/helpers.cli)
  import fsspec
  import gcsfs
  # Where fsspec or gcsfs was imported before the environment was set, apply it here too.
  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
  fsspec.config.conf.setdefault("gs", {})["token"] = "anon"
  for proto in ("gs", "gcs"):
    fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
  try:
    yield emu
  finally:
    emu.close()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _clear_gcsfs_listings():
  """gcsfs caches directory listings per process; another process (the CLI) writes the bucket too."""
  from etils.epath import backend
  backend.fsspec_backend.fs("gs://x").invalidate_cache()


# --- schemes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["s3://b/x", "http://host/x", "hf://x/y", "GS://b/x", "file:///tmp/x"])
def test_unsupported_scheme_is_one_line_error(url, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError, match=r"^--workdir=\S+: the \S+:// scheme is not supported; use a local path") as e:
    paths.check_workdir(url)
  assert "\n" not in str(e.value)
  assert os.listdir(tmp_path) == []  # nothing local was made (no directory named 's3:')


def test_gs_without_a_bucket_or_backend_is_one_line_error(monkeypatch):
  with pytest.raises(ConfigError, match=r"^--workdir=gs:///x: no bucket name"):
    paths.check_workdir("gs:///x")
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name in ("gcsfs", "tensorflow") else real(name, *a))
  with pytest.raises(ConfigError, match=r"^--workdir=gs://b/x: gs:// paths need gcsfs .*: pip install gcsfs$"):
    paths.check_workdir("gs://b/x")


def test_unsupported_scheme_is_refused_before_compilation(monkeypatch):
  import jax
  from collapse_jax import loop

  def no_compile(*a, **k):
    raise AssertionError("compiled before validating")

  monkeypatch.setattr(jax, "jit", no_compile)
  with pytest.raises(ConfigError, match=r"the s3:// scheme is not supported"):
    loop.run(load_config("gmm", "quick"), "s3://b/x")


def test_cli_unsupported_scheme_exits_2_with_one_line(tmp_path):
  r = cli("--config=configs/gmm.py", "--workdir=s3://b/x", timeout=120)
  assert r.returncode == 2, r.stdout + r.stderr
  assert r.stderr.strip() == ("error: --workdir=s3://b/x: the s3:// scheme is not supported; "
                              "use a local path or gs://bucket/path"), r.stderr
  assert not os.path.exists(os.path.join(REPO, "s3:"))


# --- the layer, local and gs:// ----------------------------------------------------------------------------------
@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  """A fresh directory: local under tmp_path, or a fresh prefix in the emulator's bucket."""
  if request.param == "local":
    return str(tmp_path / "d")
  request.getfixturevalue("gcs")
  return f"gs://{BUCKET}/unit/{request.node.name.replace('[', '-').rstrip(']')}-{time.time_ns()}"


def test_write_append_read_list_rename_remove(root):
  paths.check_workdir(root)
  assert paths.listdir(root) == []  # the write probe is gone
  f = os.path.join(root, "metrics.jsonl")
  assert not paths.exists(f)
  paths.append_text(f, '{"generation": 0}\n')  # append creates
  paths.append_text(f, '{"generation": 1}\n')
  assert paths.read_text(f) == '{"generation": 0}\n{"generation": 1}\n'
  paths.write_atomic(f, "replaced\n")
  assert paths.read_text(f) == "replaced\n"
  paths.write_atomic(os.path.join(root, "config.json"), b'{"a": 1}')
  sub = os.path.join(root, "checkpoints", "50")
  paths.makedirs(os.path.join(sub, "deep"))
  paths.write_atomic(os.path.join(sub, "x"), "1")
  paths.write_atomic(os.path.join(sub, "deep", "y"), "2")
  assert paths.listdir(root) == ["checkpoints", "config.json", "metrics.jsonl"]  # no .tmp left behind
  paths.rename(sub, os.path.join(root, "checkpoints", "unreadable-50"))
  assert paths.listdir(os.path.join(root, "checkpoints")) == ["unreadable-50"]
  assert paths.read_text(os.path.join(root, "checkpoints", "unreadable-50", "deep", "y")) == "2"
  paths.remove(os.path.join(root, "config.json"))
  assert not paths.exists(os.path.join(root, "config.json"))


def test_savefig_and_imsave(root):
  import numpy as np

  from collapse_jax import plots
  import matplotlib.pyplot as plt
  paths.check_workdir(root)
  paths.makedirs(os.path.join(root, "plots"))
  st = {"mean": np.arange(4.0), "std": np.ones(4)}
  out = plots.metric_bands(root, "gmm", {"l2": st}, ("l2",), 1)
  fig, ax = plt.subplots()
  ax.plot([0, 1])
  paths.savefig(fig, os.path.join(root, "plots", "b.pdf"))
  plt.close(fig)
  paths.imsave(os.path.join(root, "plots", "c.png"), np.eye(5), cmap="gray")
  assert paths.listdir(os.path.join(root, "plots")) == ["b.pdf", "c.png", "gmm_metrics.png"]
  assert paths.read_bytes(out)[:8] == b"\x89PNG\r\n\x1a\n"
  assert paths.read_bytes(os.path.join(root, "plots", "c.png"))[:8] == b"\x89PNG\r\n\x1a\n"
  assert paths.read_bytes(os.path.join(root, "plots", "b.pdf"))[:5] == b"%PDF-"


def test_gs_objects_land_in_the_bucket(gcs):
  root = f"gs://{BUCKET}/direct"
  paths.write_atomic(f"{root}/a.txt", "hello")
  paths.append_text(f"{root}/a.txt", " world")
  assert gcs.names("direct/") == ["direct/a.txt"]
  assert gcs.read("direct/a.txt") == b"hello world"


def test_gs_missing_bucket_is_one_line_error(gcs):
  with pytest.raises(ConfigError, match=r"^workdir gs://no-such-bucket/x is not writable: ") as e:
    paths.check_workdir("gs://no-such-bucket/x")
  assert "\n" not in str(e.value)


# --- the GMM job end to end on the emulator ----------------------------------------------------------------------
GMM = ["--config=configs/gmm.py", "--config.generations=200", "--config.checkpoint_every=50"]


def test_gmm_gs_workdir_sigkill_resume_equals_local(gcs, tmp_path):
  ref = cli(*GMM, f"--workdir={tmp_path / 'ref'}")
  assert ref.returncode == 0, ref.stdout + ref.stderr
  prefix = "runs/gmm"
  wd = f"gs://{BUCKET}/{prefix}"
  proc = cli(*GMM, f"--workdir={wd}", background=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:  # kill once the first checkpoint is committed
    if any(n.endswith("/commit_success.txt") and n.count("/") == 4 for n in gcs.names(f"{prefix}/checkpoints/")):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  out = proc.communicate()[0]
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed:\n" + out
  names = gcs.names(f"{prefix}/")
  assert f"{prefix}/config.json" in names
  done = len(gcs.read(f"{prefix}/metrics.jsonl").splitlines()) if f"{prefix}/metrics.jsonl" in names else 0
  assert done < 200
  again = cli(*GMM, f"--workdir={wd}")
  assert again.returncode == 0, again.stdout + again.stderr
  assert f"resuming {wd} at generation" in again.stdout
  local = (tmp_path / "ref" / "metrics.jsonl").read_bytes()
  assert gcs.read(f"{prefix}/metrics.jsonl") == local
  assert json.loads(gcs.read(f"{prefix}/config.json")) == json.loads((tmp_path / "ref" / "config.json").read_text())
  names = gcs.names(f"{prefix}/")
  for f in ("plots/gmm_metrics.png", "plots/gmm_snapshots.png", "checkpoints/200/commit_success.txt"):
    assert f"{prefix}/{f}" in names, names
  assert not any(".write_probe" in n or n.endswith(".tmp") for n in names)
  # Read back through the layer too (fresh listings: the CLI wrote the bucket from another process).
  _clear_gcsfs_listings()
  assert [r["generation"] for r in read_jsonl(f"{wd}/metrics.jsonl")] == list(range(200))
  assert not os.path.exists(os.path.join(REPO, "gs:"))  # the old bug: a local directory named 'gs:'


def test_gs_checkpoints_skip_an_unfinished_save_and_set_aside_an_unreadable_one(gcs):
  import jax
  import numpy as np

  from collapse_jax import checkpoint
  wd = f"gs://{BUCKET}/ckpt-{time.time_ns()}"
  prefix = wd[len(f"gs://{BUCKET}/"):]
  ck = checkpoint.Checkpoints(wd, keep=5)
  assert ck.directory == f"{wd}/checkpoints"  # not made absolute (a local 'gs:/...')
  for s in (1, 2, 3):
    ck.save(s, {"x": np.full((4,), s, np.float32)})
  ck.close()
  paths.remove(f"{wd}/checkpoints/3/commit_success.txt")  # a save killed before its commit marker
  for name in gcs.names(f"{prefix}/checkpoints/2/"):  # step 2's objects overwritten with junk
    paths.write_atomic(f"gs://{BUCKET}/{name}", b"\x00garbage" * 8)
  _clear_gcsfs_listings()
  ck = checkpoint.Checkpoints(wd, keep=5)
  assert ck.steps() == [1, 2]
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  step, state = ck.restore_latest(checkpoint.abstract({"x": jax.ShapeDtypeStruct((4,), np.float32)},
                                                      {"x": sharding}))
  assert step == 1 and np.asarray(state["x"]).tolist() == [1.0] * 4
  assert ck.steps() == [1]
  assert any(n.startswith(f"{prefix}/checkpoints/unreadable-2/") for n in gcs.names(prefix))  # kept, not deleted
  ck.save(2, {"x": np.full((4,), 7, np.float32)})  # the step can be written again
  assert ck.steps() == [1, 2]
  ck.close()


# The core's writers and every family module but the readers of inputs (datasets, tokenizers, HF folders), which
# read the user's files, not the run's.
INPUT_READERS = ("families/vae/data.py", "families/lm/text.py", "families/lm/tokenizer.py", "families/lm/hf.py")
RUN_FILES = ("loop.py", "checkpoint.py", "metrics.py", "plots.py", "outputs.py", "summary.py", "resume.py",
             "report.py", "report_figures.py", "lock.py", "tracking.py") + tuple(sorted(
    os.path.relpath(p, os.path.join(REPO, "collapse_jax")) for p in glob.glob(os.path.join(REPO, "collapse_jax",
                                                                                           "families", "*", "*.py"))
    if os.path.relpath(p, os.path.join(REPO, "collapse_jax")) not in INPUT_READERS))
# Reads of inputs that are not files of the run (a Hugging Face model folder, a text folder, the runs a report
# reads where they are local), /proc (the lock's pid checks) and the local HF folder export writes.
NOT_RUN_FILES = {("families/lm/config.py", "with open(path) as fh:"),
                 ("families/lm/config.py", "if not c.hf_path or not os.path.isdir(c.hf_path):"),
                 ("families/lm/data.py", "if not t.path or not os.path.isdir(os.path.expanduser(t.path)):"),
                 ("report.py", "if not paths.is_remote(path) and not os.path.isdir(path):"),
                 ("lock.py", 'with open(path, encoding="utf-8") as fh:'),
                 ("families/lm/export.py", "if os.path.exists(out) and not os.path.isdir(out):"),
                 ("families/lm/export.py", "if os.path.isfile(os.path.join(src, name)):"),
                 ("families/lm/export.py", "shutil.copyfile(os.path.join(src, name), os.path.join(out, name))")}


def test_run_files_go_through_the_path_layer():
  """No module that writes or reads a run's files calls the filesystem directly: a bypass would break gs://."""
  import re
  bypass = re.compile(r"(?<![\w.])open\(|os\.(makedirs|mkdir|replace|rename|remove|listdir|fsync)\(|os\.path\."
                      r"(exists|isdir|isfile|abspath)\(|(?<!paths)\.savefig\(|plt\.imsave\(|shutil\.")
  found = []
  for name in RUN_FILES:
    with open(os.path.join(REPO, "collapse_jax", name)) as fh:
      for i, line in enumerate(fh, 1):
        if bypass.search(line) and (name, line.strip()) not in NOT_RUN_FILES:
          found.append(f"{name}:{i}: {line.strip()}")
  assert not found, "use collapse_jax.paths instead:\n" + "\n".join(found)
