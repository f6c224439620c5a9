"""README.md's examples as printed: its Python blocks run in order in one namespace (a reader's
session, in a fresh directory); every `wdmjax ...` line of its shell blocks parses with the
command's own parser (flags and values exist). The shell blocks train for minutes; the
commands themselves are run by their own tests."""

from __future__ import annotations

import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Python blocks too long for the suite, each named by a line it must contain (so a moved
# block cannot be skipped by accident) and why.
LONG = {"runs.embed(\"runs/wm\", secret, base=base, steps=600": "600 embedding steps, about 5 "
        "minutes on 2 cores (the demo's embedding, run by `wdmjax demo`)"}


def _blocks(lang: str) -> list[str]:
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  return [b for tag, b in re.findall(r"```(\w*)\n(.*?)```", text, re.S) if tag == lang]


def _commands() -> list[str]:
  """Each `wdmjax ...` command of the shell blocks, continuation lines joined."""
  out = []
  for block in _blocks("bash"):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split(" #", 1)[0].strip()
      for part in line.split("&&"):
        part = part.strip()
        if part.startswith("wdmjax ") and " ... " not in part:  # '...': elided flags
          out.append(part)
  return out


def test_readme_python_blocks_run_as_printed(tmp_path, monkeypatch):
  blocks = _blocks("python")
  assert len(blocks) >= 5
  long = [b for b in blocks if any(k in b for k in LONG)]
  assert len(long) == len(LONG), "a LONG block is no longer in README.md"
  monkeypatch.chdir(tmp_path)
  namespace: dict = {"__name__": "__readme__"}
  for i, block in enumerate(blocks):
    if block in long:
      continue
    exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102


@pytest.mark.parametrize("command", _commands())
def test_readme_commands_parse(command):
  from wdmjax.cli import build_parser
  argv = shlex.split(command)[1:]
  try:
    build_parser().parse_args(argv)
  except SystemExit as e:
    pytest.fail(f"README: `{command}` does not parse (exit {e.code})")
