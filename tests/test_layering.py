"""The package's layers, read from its source (AST, nothing imported): each part of wdmjax
imports only from the parts below it, no two packages import each other, and function-local
imports say why they are local.

    1 pure     errors, files, locks, records, keys, version
               < stats, diffusion, augment, imaging < models < metrics
    2 engine   configs < workdir < data < train        (trains any loss; knows no method)
    3 methods  watermark, signature, noisemark, serial, ood, peft, robustness, attacks
               (none imports another: what two methods share moves down)
    4 runs     the workdir-level API, one function per command
    5 cli      parsing, printing, exit codes
"""

from __future__ import annotations

import ast
import os

import pytest

from tests.conftest import ROOT

PACKAGE = os.path.join(ROOT, "wdmjax")

RANK = {
  "__init__": 1.0, "errors": 1.0, "files": 1.0, "version": 1.0, "locks": 1.0,
  "records": 1.0, "keys": 1.0,  # importing wdmjax is light
  "stats": 1.1, "diffusion": 1.1, "augment": 1.1, "imaging": 1.1,
  "models": 1.2, "metrics": 1.3,
  "configs": 2.0, "workdir": 2.1, "data": 2.2, "train": 2.3,
  "watermark": 3.0, "signature": 3.0, "noisemark": 3.0, "serial": 3.0, "ood": 3.0,
  "peft": 3.0, "robustness": 3.0, "attacks": 3.0,
  "runs": 4.0, "cli": 5.0,
}
METHODS = {p for p, r in RANK.items() if r == 3.0}
# Pure maths: no configs, no files, no data sets.
NO_IO = {"stats", "diffusion"}
IO_MODULES = {"ml_collections", "orbax", "tensorflow_datasets", "PIL", "json", "pickle",
              "shutil", "tempfile", "wdmjax.files", "wdmjax.configs", "wdmjax.workdir",
              "wdmjax.data"}


def _modules() -> dict[str, ast.Module]:
  out = {}
  for dirpath, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        with open(path) as fh:
          out[os.path.relpath(path, ROOT)] = ast.parse(fh.read(), path)
  return out


def _part(path_or_module: str) -> str:
  """'wdmjax/train/loop.py' or 'wdmjax.train.loop' -> 'train'; 'wdmjax/errors.py' -> 'errors'."""
  parts = path_or_module.replace(os.sep, ".").removesuffix(".py").split(".")
  return parts[1] if len(parts) > 1 else ""


def _imports(tree: ast.Module) -> list[tuple[str, int, bool]]:
  """(imported module, line, inside a function) for every import of the tree."""
  local: set[int] = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      local |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, node.lineno, id(node) in local) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      out.append((node.module, node.lineno, id(node) in local))
      # `from wdmjax import runs` imports the part `runs`
      if node.module == "wdmjax":
        out += [(f"wdmjax.{a.name}", node.lineno, id(node) in local) for a in node.names]
  return out


def layering_violations(modules: dict[str, ast.Module]) -> list[str]:
  """Every import that breaks the layers, as 'file:line: reason'."""
  bad = []
  for path, tree in modules.items():
    src = _part(path)
    if src not in RANK:
      bad.append(f"{path}: part {src!r} has no layer in tests/test_layering.py")
      continue
    for name, line, _ in _imports(tree):
      if src in NO_IO and any(name == m or name.startswith(m + ".") for m in IO_MODULES):
        bad.append(f"{path}:{line}: {src} is pure maths and imports {name} (config or I/O)")
      if not name.startswith("wdmjax.") or name == "wdmjax.version":
        continue
      dst = _part(name)
      if dst == src or dst not in RANK:
        continue
      if RANK[dst] > RANK[src]:
        bad.append(f"{path}:{line}: {src} (layer {RANK[src]}) imports {name} "
                   f"(layer {RANK[dst]}, above it)")
      elif src in METHODS and dst in METHODS:
        bad.append(f"{path}:{line}: the method {src} imports the method {dst}")
  return bad


def package_cycles(modules: dict[str, ast.Module]) -> list[list[str]]:
  """Groups of parts that import each other, directly or through others."""
  graph: dict[str, set[str]] = {}
  for path, tree in modules.items():
    src = _part(path)
    for name, _, _ in _imports(tree):
      if name.startswith("wdmjax.") and _part(name) not in ("", src):
        graph.setdefault(src, set()).add(_part(name))

  def reach(a):
    seen, todo = set(), [a]
    while todo:
      for b in graph.get(todo.pop(), ()):
        if b not in seen:
          seen.add(b)
          todo.append(b)
    return seen

  cycles = {tuple(sorted({a} | {b for b in reach(a) if a in reach(b)})) for a in graph
            if a in reach(a)}
  return [list(c) for c in sorted(cycles)]


def unexplained_local_imports(modules: dict[str, ast.Module],
                              sources: dict[str, str] | None = None) -> list[str]:
  """Function-local imports without a comment (on the line or just above) saying why."""
  bad = []
  for path, tree in modules.items():
    if sources is None:
      with open(os.path.join(ROOT, path)) as f:
        lines = f.read().splitlines()
    else:
      lines = sources[path].splitlines()
    for name, line, local in _imports(tree):
      if local and "#" not in lines[line - 1] and not lines[line - 2].strip().startswith("#"):
        bad.append(f"{path}:{line}: function-local import of {name} without a reason")
  return bad


@pytest.fixture(scope="module")
def modules():
  return _modules()


def test_every_import_respects_the_layers(modules):
  assert layering_violations(modules) == []


def test_no_two_packages_import_each_other(modules):
  assert package_cycles(modules) == []


def test_function_local_imports_say_why(modules):
  assert unexplained_local_imports(modules) == []


def test_the_checks_catch_an_engine_that_imports_a_method(modules):
  """A reintroduced `train -> peft` import (as load_trained once had) is caught."""
  planted = dict(modules)
  planted["wdmjax/train/loop.py"] = ast.parse(PLANTED)
  planted["wdmjax/peft/finetuning.py"] = ast.parse("from wdmjax.train import train\n")
  assert any("train (layer 2.3) imports wdmjax.peft.finetuning" in v
             for v in layering_violations(planted))
  assert ["peft", "train"] in package_cycles(planted)
  assert unexplained_local_imports({"wdmjax/train/loop.py": planted["wdmjax/train/loop.py"]},
                                   {"wdmjax/train/loop.py": PLANTED}) != []


PLANTED = "def load_trained(workdir):\n  from wdmjax.peft.finetuning import load_finetuned\n"


def test_the_checks_catch_io_in_pure_maths_and_a_method_importing_a_sibling():
  planted = {"wdmjax/stats/x.py": ast.parse("import json\nfrom wdmjax.configs import a\n"),
             "wdmjax/attacks/x.py": ast.parse("from wdmjax.peft import finetune\n")}
  v = layering_violations(planted)
  assert any("stats is pure maths and imports json" in m for m in v)
  assert any("imports wdmjax.configs (layer 2.0, above it)" in m for m in v)
  assert any("the method attacks imports the method peft" in m for m in v)
