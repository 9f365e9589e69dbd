"""The project's shape, read from the source (AST and line counts, nothing imported): no import cycle in the
package, no file over 400 lines, a thin main.py, a loop that never probes a family, models that import neither
the loop nor a data loader."""
import ast
import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "collapse_jax"
MAX_LINES = 400
MAX_MAIN_LINES = 60


def _modules() -> dict[str, str]:
  """Dotted name -> path of every module of the package (a package is its __init__.py)."""
  out = {}
  for path in glob.glob(os.path.join(REPO, PKG, "**", "*.py"), recursive=True):
    parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _imports(name: str, path: str, modules) -> set[str]:
  """The package's modules `name` imports anywhere in its file (module level or inside a function): `import a.b`
  imports a.b; `from a import b` imports a.b when that is a module, else a."""
  with open(path, encoding="utf-8") as fh:
    tree = ast.parse(fh.read(), path)
  is_pkg = os.path.basename(path) == "__init__.py"
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name in modules}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the package of `name` (the module itself, for an __init__)
        anchor = name.split(".")
        anchor = anchor[:len(anchor) - node.level + (1 if is_pkg else 0)]
        base = ".".join(anchor + ([base] if base else []))
      for a in node.names:
        if f"{base}.{a.name}" in modules:
          out.add(f"{base}.{a.name}")
        elif base in modules:
          out.add(base)
  out.discard(name)
  return out


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in sorted(modules.items())}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(n):
    state[n] = "open"
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == "open":
        return stack[stack.index(m):] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    stack.pop()
    state[n] = "done"
    return None

  for n in sorted(graph):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return None


def test_graph_reader_sees_every_kind_of_import(tmp_path):
  """The reader itself, on a planted module set: function-level imports, `from pkg import submodule`, relative
  imports, and a name that is not a module (an edge to its package)."""
  modules = {"p": "", "p.a": "", "p.b": "", "p.sub": "", "p.sub.c": ""}
  path = tmp_path / "a.py"
  path.write_text("import os\nfrom p import b\nfrom p.sub import c as cc\nfrom p import VERSION\n"
                  "def f():\n  from .sub import c\n  import p.sub\n")
  assert _imports("p.a", str(path), modules) == {"p.b", "p.sub.c", "p", "p.sub"}
  (tmp_path / "__init__.py").write_text("from . import c\nfrom .. import b\n")
  assert _imports("p.sub", str(tmp_path / "__init__.py"), modules) == {"p.sub.c", "p.b"}
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
  graph = import_graph()
  assert len(graph) > 30 and "collapse_jax.families.lm.model" in graph  # the walk found the package
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_source_file_over_400_lines():
  too_long = []
  for top in ("collapse_jax", "configs", "tests", "benchmarks"):
    for path in sorted(glob.glob(os.path.join(REPO, top, "**", "*.py"), recursive=True)):
      with open(path, encoding="utf-8") as fh:
        n = sum(1 for _ in fh)
      if n > MAX_LINES:
        too_long.append(f"{os.path.relpath(path, REPO)} ({n})")
  assert not too_long, f"over {MAX_LINES} lines: " + ", ".join(too_long)


def test_main_is_thin():
  with open(os.path.join(REPO, PKG, "main.py"), encoding="utf-8") as fh:
    n = sum(1 for _ in fh)
  assert n <= MAX_MAIN_LINES, f"collapse_jax/main.py has {n} lines (at most {MAX_MAIN_LINES}: the rest is cli.py's)"


# isinstance against these only: plain data (a config diff's dicts), never a family's classes.
_PLAIN = {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "bool", "complex"}


def _probes(path: str) -> list[str]:
  with open(path, encoding="utf-8") as fh:
    tree = ast.parse(fh.read(), path)
  out = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
      continue
    if node.func.id in ("getattr", "hasattr"):
      out.append(f"line {node.lineno}: {node.func.id}(...)")
    elif node.func.id == "isinstance":
      kinds = node.args[1] if len(node.args) > 1 else None
      names = kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]
      if not all(isinstance(k, ast.Name) and k.id in _PLAIN for k in names):
        out.append(f"line {node.lineno}: isinstance(..., {ast.unparse(kinds) if kinds else ''})")
  return out


def test_loop_never_probes_a_family():
  probes = _probes(os.path.join(REPO, PKG, "loop.py"))
  assert not probes, "loop.py probes instead of calling the family contract: " + "; ".join(probes)


_MODELS = sorted(glob.glob(os.path.join(REPO, PKG, "families", "*", "model.py"))) + [
    os.path.join(REPO, PKG, "families", "lm", f) for f in ("kv_cache.py", "dense.py")]
_NOT_FOR_MODELS = ("collapse_jax.loop", "collapse_jax.regimes", "collapse_jax.checkpoint",
                   "collapse_jax.families.lm.text", "collapse_jax.families.lm.tokenizer",
                   "collapse_jax.families.lm.markov")


def _forbidden_for_models(module: str) -> bool:
  return module in _NOT_FOR_MODELS or (module.startswith("collapse_jax.families.") and module.endswith(".data"))


@pytest.mark.parametrize("path", _MODELS, ids=[os.path.relpath(p, os.path.join(REPO, PKG)) for p in _MODELS])
def test_models_import_neither_the_loop_nor_data_loaders(path):
  """Not directly, nor through anything they import."""
  assert os.path.isfile(path), path
  graph = import_graph()
  start = ".".join(os.path.relpath(path, REPO)[:-3].split(os.sep))
  via, todo = {start: None}, [start]
  while todo:
    n = todo.pop()
    for m in graph.get(n, ()):
      if m not in via:
        via[m], todo = n, todo + [m]
  bad = sorted(m for m in via if _forbidden_for_models(m))
  chains = []
  for m in bad:
    chain = [m]
    while via[chain[-1]] is not None:
      chain.append(via[chain[-1]])
    chains.append(" -> ".join(reversed(chain)))
  assert not bad, "a model imports the loop or a data loader: " + "; ".join(chains)
