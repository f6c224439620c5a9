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
from wdmjax.runs.signature import (
  EXTRACTOR,
  REGISTRY,
  SIGNATURE_JSON,
  read_images,
  read_registry,
  write_pngs,
)
from wdmjax.train.images import to_uint8

LDM_OVERRIDES = ["model.width=32", "model.depth=1", "model.num_heads=2",
                 "diffusion.num_timesteps=100", "train.steps=2", "train.batch_size=8",
                 "train.warmup_steps=0", "train.log_every=1", "train.ckpt_every=2",
                 "sample.steps=4"]


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
  """A tiny LDM (autoencoder 30 steps, DiT 2 steps), a tiny extractor (4 steps) and two
  users' decoders fine-tuned hard (lr 1e-2, 100 steps, no image term), their messages
  derived from an owner key. This untrained extractor barely responds to its input; the
  signing's whitening, fitted on 1000 of the LDM's unsigned images, magnifies what it does
  read, far enough to tell the two users apart."""
  root = tmp_path_factory.mktemp("sig")
  key = str(root / "owner.key")
  runs.keygen(key)
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
  emb = runs.signature_embed(sig, ldm, 2, key_file=key, seed=7, steps=100, batch_size=4,
                             lr=1e-2, image_weight=0.0, num_latents=64, progress=False)
  return dict(root=root, ae=ae, ldm=ldm, sig=sig, pre=pre, emb=emb, before=before, key=key)


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
  key = signed["key"]
  rep = runs.signature_detect(sig, out, key_file=key)  # identify among both users
  assert rep["threshold"] == 41  # 48 bits at 1e-6 / 2 users: P(X >= 41) = 3.1e-7 <= 5e-7
  x, _ = read_images(out, (28, 28, 1))
  x = np.stack(x)
  assert float(np.abs(x - g.images).max()) <= 1 / 127.5 + 1e-6  # uint8 PNGs
  reg = read_registry(sig, key_file=key)
  ext = runs.load_extractor(sig).with_whitening(reg.whitening)  # the signing's whitening
  bits = (ext.logits(x) > 0).astype(int)
  msgs = reg.messages
  agree = (bits[:, None, :] == msgs[None]).sum(-1)  # [images, users]
  assert [r["agreeing"] for r in rep["images"]] == agree.max(1).tolist()
  assert [r["best_user"] for r in rep["images"]] == agree.argmax(1).tolist()
  assert all(r["detected"] == (r["agreeing"] >= 41) for r in rep["images"])
  one = runs.signature_detect(sig, out, user=1, key_file=key)
  assert [r["agreeing"] for r in one["images"]] == agree[:, 1].tolist()
  assert one["threshold"] == 41  # 1e-6 for one user: P(X >= 41) = 3.1e-7, P(X >= 40) = 1.6e-6
  clean = runs.signature_generate(sig, None, 6, seed=3)
  assert float(np.abs(clean.images - g.images).max()) > 0  # same latents, another decoder
  r = run_cli("signature", "identify", "--workdir", sig, "--images", out, "--json",
              "--key-file", key)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)["images"] == rep["images"]
  # Crops are read at their own size (as published), mixed with full images in one directory.
  mixed = str(tmp_path / "mixed")
  write_pngs(x[:2], mixed)
  crops = np.asarray(center_crop(x[2:5], 0.5, resize_back=False))  # 20x20
  for i, c in enumerate(to_uint8(crops)):
    Image.fromarray(c[..., 0]).save(os.path.join(mixed, f"crop{i}.png"))
  rep = runs.signature_detect(sig, mixed, user=0, key_file=key)
  want = np.concatenate([ext.logits(x[:2]), ext.logits(crops)]) > 0
  assert [r["agreeing"] for r in rep["images"]] == (want == msgs[0]).sum(-1).tolist()


def test_bad_inputs_are_refused_in_one_line(signed, tmp_path):
  sig, key = signed["sig"], signed["key"]
  wrong = str(tmp_path / "wrong")
  write_pngs(np.zeros((2, 32, 32, 3), np.float32), wrong)  # RGB 32x32 for a 28x28 grey model
  with pytest.raises(WdmjaxError, match=r"images: expected \[N, h, w, 1\] with 8 <= h <= 28"):
    runs.signature_detect(sig, np.zeros((1, 4, 4, 1), np.float32), key_file=key)  # too small
  for args, flag in (
      (["signature", "detect", "--workdir", sig, "--images", wrong], "--images"),
      (["signature", "detect", "--workdir", sig, "--images", wrong, "--user", "5"], "--user"),
      (["signature", "generate", "--workdir", sig, "--user", "2", "--out",
        str(tmp_path / "g")], "--user"),
      (["signature", "detect", "--workdir", sig, "--images", wrong, "--fpr", "2"], "--fpr"),
  ):
    r = run_cli(*args, *(["--key-file", key] if args[1] == "detect" else []))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    if flag:
      assert flag in r.stderr, r.stderr
  assert not os.path.exists(tmp_path / "g")
  with pytest.raises(WdmjaxError, match="out: expected a new or empty directory"):
    runs.signature_generate(sig, 0, 2, out=wrong)  # holds images already
  assert sorted(os.listdir(wrong)) == ["000000.png", "000001.png"]
  with pytest.raises(WdmjaxError, match="user"):
    runs.signature_detect(sig, np.zeros((1, 28, 28, 1), np.float32), user=2, key_file=key)
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
                          registry=os.path.join(sig, REGISTRY), key_file=key)
  # Embedding twice, or with a non-LDM workdir, writes nothing.
  before = tree_hashes(sig)
  with pytest.raises(WdmjaxError, match="already holds"):
    runs.signature_embed(sig, signed["ldm"], 1, key_file=key, progress=False)
  with pytest.raises(WdmjaxError, match="^ldm: "):
    runs.signature_embed(other, signed["ae"].workdir, 1, key_file=key, progress=False)
  assert tree_hashes(sig) == before
  assert not os.path.exists(os.path.join(other, SIGNATURE_JSON))
  assert os.path.exists(os.path.join(other, EXTRACTOR))


def test_evaluate_stable_signature_and_noise_marks_on_the_tiny_ldm(signed, tmp_path,
                                                                   monkeypatch):
  """`runs.benchmark` on a latent model: Tree-Ring and Gaussian Shading mark the latents,
  Stable Signature the decoder; the decoder swap and a model attack are rows of their own."""
  monkeypatch.setenv("WDMJAX_OWNER_KEY_FILE", signed["key"])  # the owner key of the signing
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


# ----------------------------------------------------------------------------- hardening


def _one_line_error(r) -> str:
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr
  return r.stderr


def _edit_json(path, edit) -> None:
  with open(path) as f:
    obj = json.load(f)
  edit(obj)
  with open(path, "w") as f:
    json.dump(obj, f)


def _edit_npz(path, edit) -> None:
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  edit(arrays)
  np.savez(path, **arrays)


def _truncate(path) -> None:
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])


def _message_edit(user, message):
  def edit(reg):
    reg["users"][user]["message"] = message
  return edit


def test_tampered_files_are_refused_in_one_line_naming_file_and_field(signed, tmp_path):
  """A tampered, truncated or mistyped copy of every file that detect, identify and generate
  read back: one line naming the file (and the field), never a traceback; a forged registry
  (a message set to other bits, the rest kept) and one sealed by another key are refused; a
  relative `ldm` is resolved in the workdir and kept inside it; a decoder linked to or
  copied from another user's is refused."""
  sig, key = signed["sig"], signed["key"]
  images = str(tmp_path / "images")
  write_pngs(np.zeros((2, 28, 28, 1), np.float32), images)
  other_key = str(tmp_path / "other.key")
  runs.keygen(other_key)
  from wdmjax import keys  # sealing a registry as another owner (or a forger) would

  def reseal(key_file, change=None):
    def edit(reg):
      reg.pop("seal")
      reg.pop("key_id")
      (change or (lambda r: None))(reg)
      sealed = keys.seal(reg, keys.read_key_file(key_file))
      reg.clear()
      reg.update(sealed)
    return edit

  m0 = json.load(open(os.path.join(sig, REGISTRY)))["users"][0]["message"]
  flipped = "".join("1" if c == "0" else "0" for c in m0)
  link = lambda p: (os.remove(p), os.symlink("user_0001.npz", p))  # noqa: E731
  reg, ext, hid, meta, dec = (REGISTRY, EXTRACTOR, "hidden.json", SIGNATURE_JSON,
                              os.path.join("decoders", "user_0000.npz"))
  cases = [  # (file, tamper, command, what the line must say)
    (reg, lambda p: _edit_json(p, _message_edit(0, m0[:-1])), "identify",
     "registry.json: users[0]: field 'message': expected a string >= 48 long"),
    (reg, lambda p: _edit_json(p, _message_edit(0, "2" * 48)), "identify",
     "users[0]: field 'message': expected 48 characters 0 or 1"),
    (reg, lambda p: _edit_json(p, lambda r: r.update(users="x")), "identify",
     "registry.json: field 'users': expected a list"),
    (reg, lambda p: _edit_json(p, lambda r: r["users"][1].pop("message")), "identify",
     "users[1]: expected a field 'message'"),
    (reg, _truncate, "identify", "registry.json: expected JSON"),
    (reg, lambda p: _edit_json(p, lambda r: r["whitening"].update(mean=[0.0])), "identify",
     "field 'whitening': field 'mean'"),
    (reg, lambda p: _edit_json(p, _message_edit(0, flipped)), "identify",
     "registry.json: expected the record as the owner key sealed it, got an altered one"),
    (reg, lambda p: _edit_json(p, lambda r: r.pop("seal")), "identify", "without a seal"),
    (reg, lambda p: _edit_json(p, reseal(other_key, _message_edit(0, flipped))), "identify",
     "expected a record of this owner key"),
    (reg, lambda p: _edit_json(p, reseal(key, lambda r: r.update(signing="0" * 16))),
     "identify", "expected the registry of the signing in"),
    (reg, lambda p: (os.rename(p, p + ".x"), os.symlink(REGISTRY + ".x", p)), "identify",
     "registry.json: expected a regular file, got a symbolic link"),
    (ext, lambda p: open(p, "wb").write(b"garbage"), "identify",
     "extractor.npz: expected an .npz archive"),
    (ext, _truncate, "identify", "extractor.npz: expected an .npz archive"),
    (ext, lambda p: _edit_npz(p, lambda a: a.update({"whitening/mean": np.zeros(3)})),
     "identify", "extractor.npz: array 'whitening/mean': expected shape (48,), got (3,)"),
    (ext, lambda p: _edit_npz(p, lambda a: a.pop("whitening/matrix")), "identify",
     "extractor.npz: expected arrays ['whitening/matrix']"),
    (hid, lambda p: _edit_json(p, lambda h: h.update(num_bits="x")), "identify",
     "hidden.json: field 'num_bits': expected an integer"),
    (hid, lambda p: _edit_json(p, lambda h: h.pop("channels")), "identify",
     "hidden.json: expected a field 'channels'"),
    (hid, lambda p: _edit_json(p, lambda h: h.update(image_shape=[28, 28])), "identify",
     "hidden.json: field 'image_shape'"),
    (hid, _truncate, "identify", "hidden.json: expected JSON"),
    (meta, lambda p: _edit_json(p, lambda m: m.update(users="x")), "generate",
     "signature.json: field 'users': expected an integer"),
    (meta, lambda p: _edit_json(p, lambda m: m.pop("decoders_sha256")), "generate",
     "signature.json: expected a field 'decoders_sha256'"),
    (meta, lambda p: _edit_json(p, lambda m: m.update(ldm="../../../elsewhere")), "generate",
     "signature.json: field 'ldm': expected a path inside"),
    (meta, lambda p: _edit_json(p, lambda m: m.update(ldm="nowhere")), "generate",
     "nowhere"),  # resolved in the workdir, not the current directory (see below)
    (dec, link, "generate", "user_0000.npz: expected a regular file, got a symbolic link"),
    (dec, lambda p: shutil.copy(p.replace("0000", "0001"), p), "generate",
     "user_0000.npz: expected the decoder of user 0 that `signature embed` wrote"),
    (dec, _truncate, "generate", "user_0000.npz: expected the decoder of user 0"),
  ]
  for i, (name, tamper, command, want) in enumerate(cases):
    w = str(tmp_path / f"w{i}")
    shutil.copytree(sig, w, symlinks=True)
    tamper(os.path.join(w, name))
    args = (["identify", "--images", images, "--key-file", key] if command == "identify"
            else ["generate", "--user", "0", "--num", "2", "--out", str(tmp_path / f"g{i}")])
    err = _one_line_error(run_cli("signature", *args[:1], "--workdir", w, *args[1:]))
    assert want in err, (name, want, err)
    assert "--workdir" not in err, err
    if want == "nowhere":
      assert os.path.join(w, "nowhere") in err, err
    assert not os.path.exists(tmp_path / f"g{i}")
  # A registry kept outside the workdir (--registry) of another signing is refused too.
  foreign = str(tmp_path / "foreign.json")
  shutil.copy(os.path.join(sig, REGISTRY), foreign)
  _edit_json(foreign, reseal(key, lambda r: r.update(signing="1" * 16)))
  err = _one_line_error(run_cli("signature", "detect", "--workdir", sig, "--images", images,
                                "--registry", foreign, "--key-file", key))
  assert err.startswith(f"wdmjax: error: {foreign}: expected the registry of the signing")


def test_messages_come_from_the_owner_key_which_is_never_written_or_printed(
    signed, tmp_path, monkeypatch):
  sig, key = signed["sig"], signed["key"]
  from wdmjax import keys

  secret = keys.read_key_file(key)
  reg = read_registry(sig, key_file=key)
  want = [keys.derive_bits(secret, f"stable signature {reg.signing} user {u}", 48)
          for u in range(2)]
  np.testing.assert_array_equal(reg.messages, np.stack(want))
  for d, _, files in os.walk(sig):  # the key is in no file of the workdir
    for f in files:
      assert secret not in open(os.path.join(d, f), "rb").read(), f
  meta = json.load(open(os.path.join(sig, SIGNATURE_JSON)))
  assert meta["key_id"] == keys.key_id(secret) and "key_seed" not in meta
  # No key, no detection (and the message names the flag); the key is never printed.
  for var in ("WDMJAX_OWNER_KEY", "WDMJAX_OWNER_KEY_FILE"):
    monkeypatch.delenv(var, raising=False)
  x = str(tmp_path / "x")
  write_pngs(np.zeros((1, 28, 28, 1), np.float32), x)
  err = _one_line_error(run_cli("signature", "identify", "--workdir", sig, "--images", x))
  assert err.startswith("wdmjax: error: --key-file: expected the owner key's file"), err
  monkeypatch.setenv("WDMJAX_OWNER_KEY_FILE", key)
  r = run_cli("signature", "identify", "--workdir", sig, "--images", x)
  assert r.returncode == 0, r.stderr
  assert secret.decode() not in r.stdout + r.stderr


def test_counts_are_bounded_and_named_by_their_flags(signed, tmp_path, monkeypatch):
  sig, key, ldm = signed["sig"], signed["key"], signed["ldm"]
  for args, flag in (
      (["pretrain", "--workdir", str(tmp_path / "p"), "--batch-size", "1000000000",
        "--steps", "2", "--warmup-steps", "1"], "--batch-size"),
      (["embed", "--workdir", sig, "--ldm", ldm, "--users", "1000000000", "--key-file", key],
       "--users"),
      (["embed", "--workdir", sig, "--ldm", ldm, "--users", "2", "--null-images", "5",
        "--key-file", key], "--null-images"),
      (["generate", "--workdir", sig, "--num", "10000000", "--out", str(tmp_path / "g")],
       "--num"),
  ):
    err = _one_line_error(run_cli("signature", *args))
    assert err.startswith(f"wdmjax: error: {flag}: expected "), err
    assert "integer in [" in err, err
    assert "--images" not in err and "--workdir" not in err
  assert not os.path.exists(tmp_path / "p") and not os.path.exists(tmp_path / "g")
  # The users' decoders are fine-tuned at once: their number is bounded by memory.
  fresh = str(tmp_path / "fresh")
  os.makedirs(fresh)
  for name in ("hidden.json", EXTRACTOR):
    shutil.copy(os.path.join(sig, name), fresh)
  monkeypatch.setattr("wdmjax.runs.arguments.host_memory_bytes", lambda: 2**26)
  with pytest.raises(WdmjaxError, match=r"^users: expected an integer in \[1, [\d,]+\] \(about "
                                        r".* MiB each for users' decoders, half of this host's"):
    runs.signature_embed(fresh, ldm, 5000, key_file=key, progress=False)
  assert sorted(os.listdir(fresh)) == ["extractor.npz", "hidden.json"]


def test_a_rerun_of_an_interrupted_embed_removes_what_it_left(signed, tmp_path):
  """A SIGKILL during `signature embed` leaves decoders, a staging directory and temporary
  files but no registry: the next embed (here with fewer users than the 5 decoders left)
  removes them all first, so no stale decoder sits beside the new registry. (Fine-tuned as
  the fixture's, but for 1 step: the compiled step is the fixture's.)"""
  sig, key = signed["sig"], signed["key"]
  w = str(tmp_path / "w")
  shutil.copytree(sig, w)
  os.remove(os.path.join(w, REGISTRY))  # killed before the registry was written
  os.makedirs(os.path.join(w, ".decoders-x1y2"))
  open(os.path.join(w, ".decoders-x1y2", "user_0000.npz"), "wb").write(b"partial")
  open(os.path.join(w, f".{REGISTRY}.abc.tmp"), "w").write("{")
  for u in range(2, 5):
    shutil.copy(os.path.join(w, "decoders", "user_0000.npz"),
                os.path.join(w, "decoders", f"user_{u:04d}.npz"))
  r = runs.signature_embed(w, signed["ldm"], 2, key_file=key, seed=7, steps=1, batch_size=4,
                           lr=1e-2, image_weight=0.0, num_latents=64, null_images=0,
                           progress=False)
  assert r.cleaned == [".decoders-x1y2", f".{REGISTRY}.abc.tmp", "decoders", SIGNATURE_JSON]
  assert sorted(os.listdir(os.path.join(w, "decoders"))) == ["user_0000.npz", "user_0001.npz"]
  assert not [n for n in os.listdir(w) if n.startswith(".") and n != ".wdmjax.lock"]
  assert len(read_registry(w, key_file=key).messages) == 2
  assert json.load(open(os.path.join(w, SIGNATURE_JSON)))["users"] == 2
  runs.load_user_decoder(w, 1)
  with pytest.raises(WdmjaxError, match="user: expected a user in"):
    runs.load_user_decoder(w, 2)
  with pytest.raises(WdmjaxError, match="already holds signed decoders"):
    runs.signature_embed(w, signed["ldm"], 1, key_file=key, progress=False)


def test_false_positive_rate_on_unsigned_images_is_at_most_nominal(signed, tmp_path):
  """The exact binomial test needs the bits of an unsigned image to be fair, independent
  coins. The extractor's own whitening (fitted on training digits) does not deliver that on
  the LDM's images: their bits are nearly constant, so a fixed message agrees with almost
  none or almost all of them. `signature embed` whitens afresh on unsigned images of the
  model; on 1000 other ones (other sampling seeds) the false positives of each user's test
  and of identification stay within what Binomial(1000, nominal) allows (its 1 - 1e-9
  quantile: far from the 0 or 1000 of biased bits, and no draw of the messages fails it)."""
  from scipy.stats import binom

  from wdmjax.runs.signature import null_seed
  from wdmjax.stats import threshold_for_fpr

  sig, key = signed["sig"], signed["key"]
  n = 1000
  seed = 12345
  assert seed != null_seed(7)
  unsigned = runs.signature_generate(sig, None, n, seed=seed).images
  ext = runs.load_extractor(sig)
  bits = ext.logits(unsigned) > 0  # the extractor's whitening: biased bits
  assert float(np.abs(bits.mean(0) - 0.5).mean()) > 0.25
  reports = [runs.signature_detect(sig, unsigned, user=u, fpr=0.3, key_file=key)
             for u in (0, 1, None)]
  agree = [np.array([r["agreeing"] for r in rep["images"]]) for rep in reports]
  for fpr in (0.3, 0.1, 0.01):
    allowed = int(binom.ppf(1 - 1e-9, n, fpr))
    for u, a in zip((0, 1, None), agree, strict=True):
      users = 2 if u is None else 1  # identification tests the best match at fpr / users
      false_positives = int((a >= int(threshold_for_fpr(48, fpr / users))).sum())
      assert false_positives <= allowed, (fpr, u, false_positives, allowed)
  # The reports' own decisions at 0.3 are these counts.
  assert reports[0]["detected"] == int((agree[0] >= reports[0]["threshold"]).sum())
