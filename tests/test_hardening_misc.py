"""The newer commands against hostile input and faults (issue 39): the image reader of
`ood score` and `signature detect`, bounded counts, duplicates and contradictions refused in
one line naming the flag, one writer per workdir, and an interrupted `evaluate` resumed."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli
from wdmjax.errors import WdmjaxError
from wdmjax.runs.arguments import check_count, host_memory_bytes, renamed
from wdmjax.runs.images import read_images


def _png_header_only(path, width: int, height: int) -> None:
  """A PNG that declares width x height 8-bit gray pixels and holds one row: its header
  is valid, its pixels could never be decoded (decoding would need width * height bytes)."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))


def test_images_skip_fifos_and_refuse_a_path_that_names_nothing_usable(tmp_path):
  d = tmp_path / "imgs"
  d.mkdir()
  Image.fromarray(np.full((8, 8), 255, np.uint8)).save(d / "a.png")
  os.mkfifo(d / "b.png")  # opening it would block forever
  x, names = read_images(str(d), (8, 8, 1))
  assert names == ["a.png"] and np.all(x[0] == 1.0)
  with pytest.raises(WdmjaxError, match=r"^images: expected a directory or a regular image "
                                        r"file, got .*b.png"):
    read_images(str(d / "b.png"), (8, 8, 1))
  only = tmp_path / "only_fifo"
  only.mkdir()
  os.mkfifo(only / "c.png")
  with pytest.raises(WdmjaxError, match=r"found none \(1 skipped: not regular files\)"):
    read_images(str(only), (8, 8, 1))
  with pytest.raises(WdmjaxError, match=r"^images: expected a directory or an image file, "
                                        r"got nothing"):
    read_images(str(tmp_path / "missing"), (8, 8, 1))


def test_images_size_is_checked_before_decoding(tmp_path):
  _png_header_only(tmp_path / "huge.png", 20000, 20000)  # beyond PIL's bomb limit
  _png_header_only(tmp_path / "big.png", 5000, 5000)  # within it, but not the model's size
  with pytest.raises(WdmjaxError, match=r"^images: expected 8x8 images with 1 channel, got "
                                        r".*huge.png' of more than [0-9,]+ pixels$"):
    read_images(str(tmp_path / "huge.png"), (8, 8, 1))
  with pytest.raises(WdmjaxError, match=r"got .*big.png' of 5000x5000 \(L\)$"):
    read_images(str(tmp_path / "big.png"), (8, 8, 1))
  (tmp_path / "junk.png").write_bytes(b"not an image")
  with pytest.raises(WdmjaxError, match=r"junk.png' is not a readable image \(not a PNG"):
    read_images(str(tmp_path / "junk.png"), (8, 8, 1))


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
  levels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4  # 8-bit values 0..252
  Image.fromarray(levels.astype(np.uint8)).save(tmp_path / "a8.png")
  Image.fromarray(levels * 257).save(tmp_path / "a16.png")  # the same picture in 16 bits
  assert Image.open(tmp_path / "a16.png").mode == "I;16"
  (x8, x16), _ = read_images(str(tmp_path), (8, 8, 1))
  np.testing.assert_allclose(x16, x8, atol=1e-6)
  (rgb16,), _ = read_images(str(tmp_path / "a16.png"), (8, 8, 3))
  assert rgb16.shape == (8, 8, 3) and np.allclose(rgb16[..., 2], x8[..., 0], atol=1e-6)


def test_counts_are_bounded_by_a_cap_and_by_memory():
  assert check_count("n", 5) == 5
  with pytest.raises(WdmjaxError, match=r"^n: expected an integer >= 1, got 0$"):
    check_count("n", 0)
  with pytest.raises(WdmjaxError, match=r"^n: expected an integer >= 1, got True$"):
    check_count("n", True)
  with pytest.raises(WdmjaxError, match=r"^steps: expected an integer in \[1, 100\], got 101$"):
    check_count("steps", 101, 100)
  half = host_memory_bytes() // 2
  assert check_count("batch_size", 2, bytes_each=half // 2) == 2
  with pytest.raises(WdmjaxError, match=r"^batch_size: expected an integer in \[1, 2\] \(about "
                                        r".* MiB each for an example, half of this host's"):
    check_count("batch_size", 3, bytes_each=half // 2, what="an example")
  with pytest.raises(WdmjaxError, match=r"^ldm_workdir: no such"), renamed("workdir",
                                                                           "ldm_workdir"):
    raise WdmjaxError("workdir: no such directory")


def _one_line(r, flag: str, returncode: int = 2) -> str:
  assert r.returncode == returncode, (r.stdout, r.stderr)
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"wdmjax: error: {flag}: "), lines
  return lines[0]


@pytest.mark.parametrize("args, flag, says", [
    (["autoencoder", "train", "--workdir", "ae", "--batch-size", "1000000000"], "--batch-size",
     "half of this host's"),
    (["autoencoder", "train", "--workdir", "ae", "--data-dir", "afile"], "--data-dir",
     "expected a directory, got a file"),
    (["autoencoder", "generate", "--ldm", "afile"], "--ldm", "expected a directory"),
    (["ood", "eval", "--workdir", "w", "--id", "digits", "--ood", "digits:train"], "--ood",
     "share no images"),
    (["ood", "eval", "--workdir", "w", "--id", "mnist5k", "--ood", "mnist5k@9"], "--ood",
     "share no images"),
    (["latents", "--npz-dir", ".", "--data-dir", "afile"], "--data-dir",
     "expected a directory, got a file"),
    (["evaluate", "--out", "done", "--methods", "tree_ring"], "--out",
     "without a finished report"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]))
def test_bad_input_of_the_newer_commands_is_one_line_naming_the_flag(args, flag, says,
                                                                     tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "afile").write_text("x")
  (tmp_path / "done").mkdir()
  (tmp_path / "done" / "benchmark.json").write_text("{}")
  before = sorted(os.listdir(tmp_path))
  line = _one_line(run_cli(*args), flag)
  assert says in line, line
  assert sorted(os.listdir(tmp_path)) == before
  assert os.listdir(tmp_path / "done") == ["benchmark.json"]


_HOLD = """
import sys, time
from wdmjax.locks import directory_lock
with directory_lock(sys.argv[1]):
  open(sys.argv[1] + "/partial", "w").write("the first writer's work")
  print("locked", flush=True)
  time.sleep(120)
"""


def test_a_second_autoencoder_train_is_refused_and_undoes_nothing(tmp_path):
  """A first writer (another process) holds the workdir: the second fails in one line
  naming its pid and leaves the first one's files alone."""
  wd = tmp_path / "ae"
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(wd)], stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    r = run_cli("autoencoder", "train", "--workdir", wd, "--data", "mnist5k", "--steps", "1",
                "--no-progress")
    line = _one_line(r, "--workdir")
    assert f"in use by pid {holder.pid}" in line, line
    assert sorted(os.listdir(wd)) == [".wdmjax.lock", "partial"]
  finally:
    holder.kill()
    holder.wait()


def _without_timings(report: dict) -> dict:
  report = json.loads(json.dumps(report))
  report.pop("seconds", None)
  report.pop("cost", None)
  return report


def _assert_close(a, b, path="report"):
  """Equal structure and values, floats to 1e-9 relative."""
  if isinstance(a, dict):
    assert isinstance(b, dict) and list(a) == list(b), (path, list(a), b)
    for k in a:
      _assert_close(a[k], b[k], f"{path}.{k}")
  elif isinstance(a, list):
    assert isinstance(b, list) and len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
      _assert_close(x, y, f"{path}[{i}]")
  elif isinstance(a, float):
    assert b == pytest.approx(a, rel=1e-9, abs=1e-12), path
  else:
    assert a == b, path


_KILLED_AFTER_ONE_ROW = """
import json, os, signal, sys
from wdmjax.runs import evaluate as ev
save = ev._Journal.save
def save_then_die(self, key, *args):
  save(self, key, *args)
  os.kill(os.getpid(), signal.SIGKILL)
ev._Journal.save = save_then_die
kw = json.loads(sys.argv[2])
ev.evaluate(sys.argv[1], *kw.pop("args"), **kw)
"""


def test_a_killed_evaluate_resumes_to_the_same_report(tmp_path):
  """Killed (SIGKILL) after its first finished row, `evaluate` keeps it; the rerun with the
  same arguments restores it, computes the rest, and writes the report an uninterrupted run
  writes. Other arguments are refused, and so is a rerun over the finished report."""
  from wdmjax import runs
  from wdmjax.runs import evaluate as ev

  base = runs.base_workdir(str(tmp_path / "base")).path
  kw = dict(workdir=base, num=4, num_null=8, steps=2, inversion_iters=0, fprs=[0.5],
            model_attacks=[], progress=False)
  methods, attacks = ["tree_ring", "gaussian_shading"], ["none", "jpeg:50"]
  whole = ev.evaluate(str(tmp_path / "whole"), methods, attacks, **kw)

  out = tmp_path / "out"  # a real SIGKILL, the moment its first row is saved
  p = subprocess.run([sys.executable, "-c", _KILLED_AFTER_ONE_ROW, str(out),
                      json.dumps({"args": [methods, attacks], **kw})],
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
  saved = json.loads((out / ev.PROGRESS_JSON).read_text())
  assert saved["done"] == ["tree_ring|none"] and not (out / "benchmark.json").exists()
  assert len(saved["report"]["rows"]) == 2  # tree_ring and tree_ring_published
  with pytest.raises(WdmjaxError, match=r"^out: expected the arguments of the unfinished "
                                        r"evaluation .* got others \(num\)"):
    ev.evaluate(str(out), methods, attacks, **{**kw, "num": 5})

  resumed = ev.evaluate(str(out), methods, attacks, **kw)
  _assert_close(_without_timings(whole.report), _without_timings(resumed.report))
  with np.load(out / "scores.npz") as a, np.load(tmp_path / "whole" / "scores.npz") as b:
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-9)
  assert Image.open(out / "samples.png").size == Image.open(
      tmp_path / "whole" / "samples.png").size
  assert not (out / ev.PROGRESS_JSON).exists() and not (out / ev.PROGRESS_NPZ).exists()
  with pytest.raises(WdmjaxError, match=r"^out: expected a directory without a finished "
                                        r"report"):
    ev.evaluate(str(out), methods, attacks, **kw)
