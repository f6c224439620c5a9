"""Stable Signature on a workdir: pre-train the extractor, sign a latent diffusion model's
decoder for N users, generate with a user's decoder, detect and identify.

A signature workdir holds:

    hidden.json           how the extractor was pre-trained (data, sizes, attacks, history)
    extractor.npz         the frozen HiDDeN extractor and its whitening
    encoder.npz           the HiDDeN encoder (only needed to pre-train further)
    signature.json        the signed model: LDM, autoencoder, users, fine-tuning, results
    registry.json         users -> messages and the key (owner-only, like secret.json)
    decoders/user_NNNN.npz  each user's fine-tuned decoder

Detection reads only the extractor and the registry: never a parameter of the suspect
model. A registry records the hashes of the extractor and of the original decoder it was made
for, so a registry of another signature workdir is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

from wdmjax.data import labelled_split
from wdmjax.errors import check, check_number, check_seed
from wdmjax.files import check_dir_path, save_npz
from wdmjax.models.layers import check_positive_int
from wdmjax.runs.autoencoder import generate as ldm_generate
from wdmjax.runs.autoencoder import ldm_autoencoder
from wdmjax.runs.images import read_images
from wdmjax.signature import Whitening, fit_whitening, whiten
from wdmjax.signature.detect import detect as detect_bits
from wdmjax.signature.detect import identify_users, message_bits
from wdmjax.signature.finetune import finetune_decoders, user_params
from wdmjax.signature.noise import NOISE_LAYERS, apply_noise, check_noise_layers
from wdmjax.signature.pretrain import SELECTIONS, Hidden, init_hidden, pretrain_hidden
from wdmjax.train.images import to_uint8
from wdmjax.workdir import Workdir

HIDDEN_JSON = "hidden.json"
EXTRACTOR = "extractor.npz"
ENCODER = "encoder.npz"
SIGNATURE_JSON = "signature.json"
REGISTRY = "registry.json"
DECODERS = "decoders"
MIN_SIDE = 8  # the smallest crop or downscale an extractor is asked to read


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _tree_sha256(tree) -> str:
  h = hashlib.sha256()
  for k, v in sorted(traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()):
    h.update(k.encode())
    h.update(np.ascontiguousarray(np.asarray(v, np.float32)).tobytes())
  return h.hexdigest()


def _flat(tree, prefix: str) -> dict[str, np.ndarray]:
  return {f"{prefix}/{k}": np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()}


def _unflat(arrays: dict[str, np.ndarray], prefix: str):
  sub = {k[len(prefix) + 1:]: jnp.asarray(v) for k, v in arrays.items()
         if k.startswith(prefix + "/")}
  return traverse_util.unflatten_dict(sub, sep="/")


def _positive(name: str, v) -> int:
  check_positive_int(name, v)
  return int(v)


# ----------------------------------------------------------------------------- pre-training


@dataclasses.dataclass(frozen=True)
class PretrainReport:
  """The pre-trained extractor: held-out bit accuracy clean and under each noise layer."""
  workdir: str
  steps: int
  seconds: float
  selection: str
  bit_accuracy: float
  attacked_bit_accuracy: dict[str, float]


def _bit_accuracy(hidden: Hidden, images: np.ndarray, key, strength: float,
                  names: tuple[str, ...]) -> dict[str, float]:
  """Held-out bit accuracy of encoder -> noise layer -> extractor, per noise layer."""
  bits = message_bits(key, hidden.extractor.num_bits, num_users=len(images))

  @jax.jit
  def acc(x, b, index, k):
    residual = hidden.encoder.apply(hidden.encoder_vars, x, b)
    signed = jnp.clip(x + strength * residual, -1.0, 1.0)
    logits = hidden.extractor.apply(hidden.extractor_vars, apply_noise(names, index, k, signed))
    return ((logits > 0) == (b > 0)).mean()

  out = {}
  for i, name in enumerate(names):
    out[name] = float(np.mean([acc(jnp.asarray(images[s:s + 250]), bits[s:s + 250], i,
                                   jax.random.fold_in(key, s))
                               for s in range(0, len(images), 250)]))
  return out


def pretrain(workdir: str | Workdir, data: str = "mnist5k", *, steps: int = 4000,
             warmup_steps: int = 2000, batch_size: int = 32, lr: float = 2e-3,
             selection: str = "uncertainty", candidates: int = 3, channels: int = 16,
             num_bits: int = 48, strength: float = 0.3, image_weight: float = 0.1,
             attacks: Sequence[str] = tuple(NOISE_LAYERS), extractor_depth: int = 8,
             pool: int = 1, seed: int = 0, data_dir: str | None = None, progress: bool = True
             ) -> PretrainReport:
  """Pre-trains a HiDDeN encoder and extractor on `data`'s training images, fits the
  whitening on their clean logits and writes extractor.npz, encoder.npz and hidden.json.

  The first `warmup_steps` train without attacks (the bits are learned first); the rest apply
  one noise layer per batch, chosen by `selection` ("uncertainty": the highest-loss of
  `candidates` drawn ones; "uniform": one drawn at random) from `attacks` (names of
  `wdmjax.signature.NOISE_LAYERS`). `pool` = 1 is the published extractor's global pooling;
  g > 1 pools over a g x g grid (see `HiddenExtractor`).
  """
  wd = Workdir(workdir)
  check_dir_path(wd.path, "workdir", writable=True)
  check(not wd.exists(EXTRACTOR), f"workdir: {wd.path!r} already holds an extractor "
                                  f"({EXTRACTOR}); use another directory")
  _positive("steps", steps)
  check(isinstance(warmup_steps, int) and 0 <= warmup_steps < steps,
        f"warmup_steps: expected an integer in [0, steps = {steps}), got {warmup_steps!r}")
  check(selection in SELECTIONS, f"selection: expected one of {SELECTIONS}, got "
                                 f"{selection!r}")
  seed = check_seed(seed, "seed")
  x, _, xh, _ = labelled_split(data, data_dir=data_dir)
  key = jax.random.key(seed)
  start = time.time()
  attacks = check_noise_layers(tuple(attacks))
  common = dict(num_bits=num_bits, batch_size=batch_size, channels=channels,
                extractor_depth=extractor_depth, pool=pool, strength=strength,
                image_weight=image_weight, progress=progress)
  history = []
  hidden = None
  if warmup_steps:
    r = pretrain_hidden(x, jax.random.fold_in(key, 1), steps=warmup_steps, lr=lr,
                        attacks=("identity",), selection="uniform", **common)
    hidden, history = r.hidden, [dict(h, phase="warmup") for h in r.history]
  r = pretrain_hidden(x, jax.random.fold_in(key, 2), steps=steps - warmup_steps,
                      lr=lr / 2 if warmup_steps else lr, selection=selection,
                      candidates=candidates, attacks=attacks, hidden=hidden, **common)
  history += [dict(h, phase="attacks") for h in r.history]
  hidden = r.hidden
  logits = np.concatenate([np.asarray(hidden.extract(jnp.asarray(x[s:s + 500])))
                           for s in range(0, len(x), 500)])
  w = fit_whitening(logits)
  accs = _bit_accuracy(hidden, xh, jax.random.fold_in(key, 3), strength,
                       tuple(dict.fromkeys(("identity", *attacks))))
  seconds = time.time() - start
  with wd.undo_on_failure():
    save_npz(wd.file(EXTRACTOR), {**_flat(hidden.extractor_vars, "vars"),
                                  "whitening/mean": np.asarray(w.mean),
                                  "whitening/matrix": np.asarray(w.matrix)}, compressed=True)
    save_npz(wd.file(ENCODER), _flat(hidden.encoder_vars, "vars"), compressed=True)
    wd.write_json(HIDDEN_JSON, {
      "data": data, "image_shape": list(x.shape[1:]), "num_bits": num_bits,
      "channels": channels, "encoder_depth": hidden.encoder.depth,
      "extractor_depth": hidden.extractor.depth, "pool": hidden.extractor.pool,
      "steps": steps,
      "warmup_steps": warmup_steps, "batch_size": batch_size, "lr": lr,
      "selection": selection, "candidates": candidates, "strength": strength,
      "image_weight": image_weight, "seed": seed, "seconds": seconds,
      "held_out_bit_accuracy": accs, "history": history})
  return PretrainReport(wd.abspath, steps, seconds, selection, accs["identity"], accs)


@dataclasses.dataclass(frozen=True)
class Extractor:
  """A signature workdir's frozen extractor: `logits(images)` are whitened."""
  hidden: Hidden
  whitening: Whitening
  image_shape: tuple
  sha256: str

  def logits(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Whitened logits [N, k] of images [N, h, w, C] in [-1, 1]: the generated size, or a
    crop or downscale of it (the extractor pools over the image, as published)."""
    x = np.asarray(images, np.float32)
    h, w, c = self.image_shape
    check(x.ndim == 4 and x.shape[-1] == c and MIN_SIDE <= x.shape[1] <= h
          and MIN_SIDE <= x.shape[2] <= w,
          f"images: expected [N, h, w, {c}] with {MIN_SIDE} <= h <= {h} and {MIN_SIDE} <= w <= "
          f"{w} (the generated {w}x{h} images, or a crop or downscale of them), got shape "
          f"{x.shape}")
    out = [np.asarray(whiten(self.whitening, self.hidden.extract(jnp.asarray(x[i:i + batch_size]))))
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, self.whitening.mean.shape[0]))

  def logits_of(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """Whitened logits [N, k] of N images [h, w, C] of any allowed sizes (grouped by size)."""
    out = np.zeros((len(images), self.whitening.mean.shape[0]), np.float32)
    for shape in dict.fromkeys(np.shape(im) for im in images):
      idx = [i for i, im in enumerate(images) if np.shape(im) == shape]
      out[idx] = self.logits(np.stack([images[i] for i in idx]))
    return out


def load_extractor(workdir: str | Workdir) -> Extractor:
  wd = Workdir(workdir)
  meta = wd.read_json(HIDDEN_JSON)
  check(meta is not None and wd.exists(EXTRACTOR),
        f"workdir: no extractor in {wd.path!r}; pre-train one with `wdmjax signature pretrain`")
  shape = tuple(int(v) for v in meta["image_shape"])
  hidden0 = init_hidden(jax.random.key(0), shape, int(meta["num_bits"]), int(meta["channels"]),
                        int(meta["encoder_depth"]), int(meta["extractor_depth"]),
                        int(meta.get("pool", 1)))
  with np.load(wd.file(EXTRACTOR)) as z:
    arrays = {k: z[k] for k in z.files}
  ext_vars = _unflat(arrays, "vars")
  w = Whitening(jnp.asarray(arrays["whitening/mean"]), jnp.asarray(arrays["whitening/matrix"]))
  enc_vars = hidden0.encoder_vars
  if wd.exists(ENCODER):
    with np.load(wd.file(ENCODER)) as z:
      enc_vars = _unflat({k: z[k] for k in z.files}, "vars")
  hidden = Hidden(hidden0.encoder, hidden0.extractor, enc_vars, ext_vars)
  return Extractor(hidden, w, shape, _sha256(wd.file(EXTRACTOR)))


# ----------------------------------------------------------------------------- signing


@dataclasses.dataclass(frozen=True)
class EmbedReport:
  workdir: str
  users: int
  seconds: float
  bit_accuracy: float        # mean over users, last fine-tuning step
  worst_bit_accuracy: float  # the worst user's
  decoders: str


def _registry(wd: Workdir, extractor: Extractor, registry: str | None) -> dict:
  path = registry or wd.file(REGISTRY)
  check(os.path.isfile(path), f"registry: no registry {path!r}; sign a model with "
                              f"`wdmjax signature embed`")
  reg = Workdir(os.path.dirname(os.path.abspath(path))).read_json(os.path.basename(path))
  check(isinstance(reg, dict) and "users" in reg and "extractor_sha256" in reg,
        f"registry: expected the registry.json that wdmjax writes, got {path!r}")
  check(reg["extractor_sha256"] == extractor.sha256,
        f"registry: {path!r} was made for another extractor (another signature workdir or "
        f"model), expected the registry of {wd.path!r}")
  return reg


def _messages(reg: dict) -> np.ndarray:
  return np.array([[int(c) for c in u["message"]] for u in reg["users"]], np.int32)


def embed(workdir: str | Workdir, ldm: str | Workdir, users: int, *, seed: int = 0,
          steps: int = 100, batch_size: int = 4, lr: float = 5e-4, image_weight: float = 0.2,
          num_latents: int = 2000, progress: bool = True) -> EmbedReport:
  """Fine-tunes one copy of the LDM's decoder per user so that every image it decodes
  carries that user's message (messages drawn from `seed`, the owner's key). Writes
  decoders/, registry.json (owner-only) and signature.json; the LDM and its autoencoder are
  read, never written."""
  wd = Workdir(workdir)
  users = _positive("users", users)
  seed = check_seed(seed, "seed")
  _positive("num_latents", num_latents)
  extractor = load_extractor(wd)
  check(not wd.exists(REGISTRY), f"workdir: {wd.path!r} already holds signed decoders "
                                 f"({REGISTRY}); use another signature workdir")
  ae = ldm_autoencoder(ldm)
  check(tuple(ae.image_shape) == extractor.image_shape,
        f"ldm: its images are {tuple(ae.image_shape)}, the extractor reads "
        f"{extractor.image_shape}")
  x, _, _, _ = labelled_split(ae.data)
  latents = ae.encode(x[:num_latents])
  msgs = np.asarray(message_bits(jax.random.key(seed), extractor.whitening.mean.shape[0],
                                 num_users=users))

  def decode(params, z):
    return ae.decoder.apply({"params": params}, z / ae.scale)

  start = time.time()
  r = finetune_decoders(decode, lambda im: extractor.hidden.extract(im), extractor.whitening,
                        ae.params["decoder"], latents, msgs, jax.random.key(seed + 1),
                        steps=steps, batch_size=batch_size, lr=lr, image_weight=image_weight,
                        progress=progress)
  seconds = time.time() - start
  with wd.undo_on_failure():
    os.makedirs(wd.file(DECODERS), exist_ok=True)
    for u in range(users):
      save_npz(wd.file(os.path.join(DECODERS, f"user_{u:04d}.npz")),
               _flat(user_params(r.params, u), "params"), compressed=True)
    wd.write_json(SIGNATURE_JSON, {
      "ldm": os.path.abspath(os.fspath(ldm)), "autoencoder": ae.path, "users": users,
      "steps": steps, "batch_size": batch_size, "lr": lr, "image_weight": image_weight,
      "seconds": seconds, "history": r.history})
    wd.write_private(REGISTRY, json.dumps({
      "key_seed": seed, "num_bits": int(msgs.shape[1]),
      "extractor_sha256": extractor.sha256,
      "decoder_sha256": _tree_sha256(ae.params["decoder"]),
      "users": [{"user": u, "message": "".join(map(str, m))} for u, m in enumerate(msgs)]},
      indent=2) + "\n")
  last = r.history[-1]
  return EmbedReport(wd.abspath, users, seconds, last["bit_acc"], last["worst_bit_acc"],
                     wd.file(DECODERS))


def load_user_decoder(workdir: str | Workdir, user: int):
  wd = Workdir(workdir)
  meta = wd.read_json(SIGNATURE_JSON)
  check(meta is not None, f"workdir: no signed decoders in {wd.path!r}; run `wdmjax "
                          f"signature embed` first")
  check(isinstance(user, int | np.integer) and 0 <= user < meta["users"],
        f"user: expected a user in [0, {meta['users']}), got {user!r}")
  path = wd.file(os.path.join(DECODERS, f"user_{int(user):04d}.npz"))
  check(os.path.isfile(path), f"user: the decoder of user {user} is missing ({path!r})")
  with np.load(path) as z:
    return _unflat({k: z[k] for k in z.files}, "params")


@dataclasses.dataclass(frozen=True)
class GenerateReport:
  images: np.ndarray  # [num, H, W, C] in [-1, 1]
  path: str | None    # the directory of PNGs, when written


def generate(workdir: str | Workdir, user: int | None, num: int, *, seed: int = 0,
             out: str | None = None) -> GenerateReport:
  """`num` images of the signed LDM through `user`'s decoder (None: the original, unsigned
  decoder), written as PNGs into the directory `out` when given."""
  wd = Workdir(workdir)
  meta = wd.read_json(SIGNATURE_JSON)
  check(meta is not None, f"workdir: no signed decoders in {wd.path!r}")
  if out is not None:
    check_dir_path(out, "out", writable=True)
    check(not os.path.exists(out) or not os.listdir(out),
          f"out: expected a new or empty directory, got {out!r}")
  params = None if user is None else load_user_decoder(wd, user)
  r = ldm_generate(meta["ldm"], _positive("num", num), seed=seed, decoder_params=params)
  if out is not None:
    write_pngs(r.images, out)
  return GenerateReport(r.images, out)


def write_pngs(images: np.ndarray, out: str) -> str:
  """images [N, H, W, C] in [-1, 1] -> out/000000.png ... (the directory appears whole)."""
  check(not os.path.exists(out) or not os.listdir(out),
        f"out: expected a new or empty directory, got {out!r}")
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".pngs-", dir=parent)
  try:
    for i, im in enumerate(to_uint8(np.asarray(images))):
      Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(
        os.path.join(tmp, f"{i:06d}.png"))
    if os.path.isdir(out):
      os.rmdir(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def detect(workdir: str | Workdir, images: np.ndarray | str, *, user: int | None = None,
           fpr: float = 1e-6, registry: str | None = None) -> dict:
  """Per image: the bits agreeing with the tested message, log10 p, detected at `fpr`, and
  the identified user. With `user`, tests that user's message alone (threshold at `fpr`);
  without, identifies among all users (the best match tested at fpr / users).

  images: [N, h, w, C] in [-1, 1], or a directory (or file) of PNG/JPEG images: the
  generated size or a crop or downscale of it.
  """
  wd = Workdir(workdir)
  check_number(fpr, "fpr", 0, 1, low_open=True, high_open=True)
  extractor = load_extractor(wd)
  reg = _registry(wd, extractor, registry)
  msgs = _messages(reg)
  if isinstance(images, str | os.PathLike):
    x, names = read_images(os.fspath(images), extractor.image_shape, min_side=MIN_SIDE)
    logits = jnp.asarray(extractor.logits_of(x))
  else:
    logits = jnp.asarray(extractor.logits(images))
    names = [str(i) for i in range(len(logits))]
  rows = []
  if user is not None:
    check(isinstance(user, int | np.integer) and 0 <= user < len(msgs),
          f"user: expected a user in [0, {len(msgs)}), got {user!r}")
    d = detect_bits(logits, jnp.asarray(msgs[user]), fpr)
    for i, n in enumerate(names):
      rows.append({"image": n, "agreeing": int(d.agreeing[i]),
                   "log10_p": float(d.log10_p[i]), "detected": bool(d.detected[i]),
                   "user": int(user) if bool(d.detected[i]) else None})
    threshold = int(d.threshold)
  else:
    ident = identify_users(logits, jnp.asarray(msgs), fpr)
    for i, n in enumerate(names):
      rows.append({"image": n, "agreeing": int(ident.agreeing[i]),
                   "log10_p": float(ident.log10_p[i]), "detected": bool(ident.identified[i]),
                   "user": int(ident.best[i]) if bool(ident.identified[i]) else None,
                   "best_user": int(ident.best[i])})
    threshold = int(np.asarray(ident.threshold).reshape(-1)[0])
  return {"fpr": fpr, "users": len(msgs), "num_bits": int(msgs.shape[1]),
          "threshold": threshold, "tested_user": user,
          "detected": int(sum(r["detected"] for r in rows)), "images": rows}


__all__ = ["EmbedReport", "Extractor", "GenerateReport", "PretrainReport", "detect", "embed",
           "generate", "load_extractor", "load_user_decoder", "pretrain", "read_images",
           "write_pngs"]
