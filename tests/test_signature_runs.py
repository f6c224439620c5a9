"""Stable Signature on workdirs: pre-train -> embed (N users) -> generate -> detect ->
identify, at a tiny size, and the bad inputs refused with nothing half-written."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli, tree_hashes
from wdmjax import runs
from wdmjax.errors import WdmjaxError
from wdmjax.files import save_npz
from wdmjax.imaging import center_crop
from wdmjax.runs.signature import EXTRACTOR, REGISTRY, SIGNATURE_JSON, read_images, write_pngs
from wdmjax.train.images import to_uint8

LDM_OVERRIDES = ["model.width=32", "model.depth=1", "model.num_heads=2",
                 "diffusion.num_timesteps=100", "train.steps=2", "train.batch_size=8",
                 "train.warmup_steps=0", "train.log_every=1", "train.ckpt_every=2",
                 "sample.steps=4"]


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
  """A tiny LDM (autoencoder 30 steps, DiT 2 steps), a tiny extractor (4 steps) and two
  users' decoders fine-tuned hard (lr 1e-2, 100 steps, no image term): this untrained
  extractor barely responds to its input, so the bits are only partly set (0.55 to 0.75 of a
  batch's), but far enough apart to tell the two users from each other."""
  root = tmp_path_factory.mktemp("sig")
  ae = runs.train_autoencoder(str(root / "ae"), "mnist5k", steps=30, batch_size=8,
                              channels=(8, 8), progress=False)
  ldm = str(root / "ldm")
  runs.train("mnist5k_ldm", ldm, [*LDM_OVERRIDES, f"data.data_dir={ae.latents_data_dir}"],
             samples=False, progress=False)
  sig = str(root / "sig")
  pre = runs.signature_pretrain(sig, steps=4, warmup_steps=2, batch_size=8, channels=8,
                                extractor_depth=2, attacks=("identity", "crop"),
                                progress=False)
  before = {"ae": tree_hashes(ae.workdir), "ldm": tree_hashes(ldm),
            "extractor": tree_hashes(sig)}
  emb = runs.signature_embed(sig, ldm, 2, seed=7, steps=100, batch_size=4, lr=1e-2,
                             image_weight=0.0, num_latents=64, progress=False)
  return dict(root=root, ae=ae, ldm=ldm, sig=sig, pre=pre, emb=emb, before=before)


def test_only_the_decoders_change(signed):
  assert tree_hashes(signed["ae"].workdir) == signed["before"]["ae"]
  assert tree_hashes(signed["ldm"]) == signed["before"]["ldm"]
  after = tree_hashes(signed["sig"])
  for name, h in signed["before"]["extractor"].items():
    assert after[name] == h, name
  original = runs.load_autoencoder(signed["ae"].workdir).params["decoder"]
  for u in range(2):
    d = runs.load_user_decoder(signed["sig"], u)
    same = [np.array_equal(a, b) for a, b in zip(_leaves(d), _leaves(original), strict=True)]
    assert not all(same)


def _leaves(tree):
  import jax  # only here: the leaves of a tree in a fixed order

  return [np.asarray(v) for v in jax.tree.leaves(tree)]


def test_registry_is_private_and_maps_users_to_distinct_messages(signed):
  path = os.path.join(signed["sig"], REGISTRY)
  assert os.stat(path).st_mode & 0o777 == 0o600
  reg = json.load(open(path))
  msgs = [u["message"] for u in reg["users"]]
  assert len(msgs) == 2 and msgs[0] != msgs[1] and all(len(m) == 48 for m in msgs)


def test_generate_detect_identify_round_trip(signed, tmp_path):
  """embed -> generate (PNGs) -> detect -> identify: the reports agree bit for bit with the
  extractor's reading of the PNGs against the registry. (Whether the users are told apart is
  measured at full size by experiments/stable_signature.py: this extractor is untrained.)"""
  sig = signed["sig"]
  out = str(tmp_path / "user1")
  g = runs.signature_generate(sig, 1, 6, seed=3, out=out)
  assert sorted(os.listdir(out)) == [f"{i:06d}.png" for i in range(6)]
  rep = runs.signature_detect(sig, out)  # identify among both users
  assert rep["threshold"] == 41  # 48 bits at 1e-6 / 2 users: P(X >= 41) = 3.1e-7 <= 5e-7
  x, _ = read_images(out, (28, 28, 1))
  x = np.stack(x)
  assert float(np.abs(x - g.images).max()) <= 1 / 127.5 + 1e-6  # uint8 PNGs
  bits = (runs.load_extractor(sig).logits(x) > 0).astype(int)
  reg = json.load(open(os.path.join(sig, REGISTRY)))
  msgs = np.array([[int(c) for c in u["message"]] for u in reg["users"]])
  agree = (bits[:, None, :] == msgs[None]).sum(-1)  # [images, users]
  assert [r["agreeing"] for r in rep["images"]] == agree.max(1).tolist()
  assert [r["best_user"] for r in rep["images"]] == agree.argmax(1).tolist()
  assert all(r["detected"] == (r["agreeing"] >= 41) for r in rep["images"])
  one = runs.signature_detect(sig, out, user=1)
  assert [r["agreeing"] for r in one["images"]] == agree[:, 1].tolist()
  assert one["threshold"] == 41  # 1e-6 for one user: P(X >= 41) = 3.1e-7, P(X >= 40) = 1.6e-6
  clean = runs.signature_generate(sig, None, 6, seed=3)
  assert float(np.abs(clean.images - g.images).max()) > 0  # same latents, another decoder
  r = run_cli("signature", "identify", "--workdir", sig, "--images", out, "--json")
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)["images"] == rep["images"]
  # Crops are read at their own size (as published), mixed with full images in one directory.
  mixed = str(tmp_path / "mixed")
  write_pngs(x[:2], mixed)
  crops = np.asarray(center_crop(x[2:5], 0.5, resize_back=False))  # 20x20
  for i, c in enumerate(to_uint8(crops)):
    Image.fromarray(c[..., 0]).save(os.path.join(mixed, f"crop{i}.png"))
  rep = runs.signature_detect(sig, mixed, user=0)
  ext = runs.load_extractor(sig)
  want = np.concatenate([ext.logits(x[:2]), ext.logits(crops)]) > 0
  assert [r["agreeing"] for r in rep["images"]] == (want == msgs[0]).sum(-1).tolist()


def test_bad_inputs_are_refused_in_one_line(signed, tmp_path):
  sig = signed["sig"]
  wrong = str(tmp_path / "wrong")
  write_pngs(np.zeros((2, 32, 32, 3), np.float32), wrong)  # RGB 32x32 for a 28x28 grey model
  with pytest.raises(WdmjaxError, match=r"images: expected \[N, h, w, 1\] with 8 <= h <= 28"):
    runs.signature_detect(sig, np.zeros((1, 4, 4, 1), np.float32))  # too small a crop
  for args, flag in (
      (["signature", "detect", "--workdir", sig, "--images", wrong], "--images"),
      (["signature", "detect", "--workdir", sig, "--images", wrong, "--user", "5"], None),
      (["signature", "generate", "--workdir", sig, "--user", "2", "--out",
        str(tmp_path / "g")], "--user"),
      (["signature", "detect", "--workdir", sig, "--images", wrong, "--fpr", "2"], "--fpr"),
  ):
    r = run_cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    if flag:
      assert flag in r.stderr, r.stderr
  assert not os.path.exists(tmp_path / "g")
  with pytest.raises(WdmjaxError, match="out: expected a new or empty directory"):
    runs.signature_generate(sig, 0, 2, out=wrong)  # holds images already
  assert sorted(os.listdir(wrong)) == ["000000.png", "000001.png"]
  with pytest.raises(WdmjaxError, match="user"):
    runs.signature_detect(sig, np.zeros((1, 28, 28, 1), np.float32), user=2)
  # A registry from another signature workdir (another extractor) is refused: `other` holds
  # the same extractor with its whitening moved, as a retrained one would be.
  other = str(tmp_path / "other")
  os.makedirs(other)
  for name in ("hidden.json", "encoder.npz"):
    shutil.copy(os.path.join(sig, name), other)
  with np.load(os.path.join(sig, EXTRACTOR)) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["whitening/mean"] = arrays["whitening/mean"] + 0.1
  save_npz(os.path.join(other, EXTRACTOR), arrays, compressed=True)
  with pytest.raises(WdmjaxError, match="another extractor"):
    runs.signature_detect(other, np.zeros((1, 28, 28, 1), np.float32),
                          registry=os.path.join(sig, REGISTRY))
  # Embedding twice, or with a non-LDM workdir, writes nothing.
  before = tree_hashes(sig)
  with pytest.raises(WdmjaxError, match="already holds"):
    runs.signature_embed(sig, signed["ldm"], 1, progress=False)
  with pytest.raises(WdmjaxError, match="ldm"):
    runs.signature_embed(other, signed["ae"].workdir, 1, progress=False)
  assert tree_hashes(sig) == before
  assert not os.path.exists(os.path.join(other, SIGNATURE_JSON))
  assert os.path.exists(os.path.join(other, EXTRACTOR))


def test_evaluate_stable_signature_and_noise_marks_on_the_tiny_ldm(signed, tmp_path):
  """`runs.benchmark` on a latent model: Tree-Ring and Gaussian Shading mark the latents,
  Stable Signature the decoder; the decoder swap and a model attack are rows of their own."""
  r = runs.benchmark(str(tmp_path / "bench"),
                     ["tree_ring", "gaussian_shading", "stable_signature"], ["none", "jpeg:50"],
                     workdir=signed["ldm"], signature_workdir=signed["sig"],
                     model_attacks=["prune:0.3"], num=4, num_null=8, steps=2, fprs=[0.5],
                     progress=False)
  rows = {(x["method"], x["attack"]) for x in r.report["rows"]}
  assert {("stable_signature", a) for a in ("none", "jpeg:50", "model decoder swap",
                                            "model prune:0.3")} <= rows
  assert {("gaussian_shading", "jpeg:50"), ("tree_ring", "none")} <= rows
  assert r.report["model"]["latent_shape"] == [7, 7, 4]
  by = {(x["method"], x["attack"]): x for x in r.report["rows"]}
  assert by[("stable_signature", "jpeg:50")]["fpr_attacked"]["0.5"]["n"] == 4
  assert by[("tree_ring", "jpeg:50")]["fpr_attacked"]["0.5"]["n"] == 4
  assert r.report["settings"]["tree_ring"]["inner"] == 0  # the paper's rings on latents
  q = r.report["quality"]["stable_signature"]
  assert q["psnr"] > 0 and 0 <= q["ssim"] <= 1
  with pytest.raises(WdmjaxError, match="signature_workdir"):
    runs.benchmark(str(tmp_path / "b2"), ["stable_signature"], ["none"], workdir=signed["ldm"])
  with pytest.raises(WdmjaxError, match="wdm is benchmarked on pixel-space"):
    runs.benchmark(str(tmp_path / "b3"), ["wdm"], ["none"], workdir=signed["ldm"])
  assert not (tmp_path / "b2").exists() and not (tmp_path / "b3").exists()
