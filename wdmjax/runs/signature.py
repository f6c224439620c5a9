"""Stable Signature on a workdir: sign a latent diffusion model's decoder for N users,
generate with a user's decoder, detect and identify (pre-training the extractor:
`wdmjax.runs.signature_pretrain`).

A signature workdir holds:

    hidden.json           how the extractor was pre-trained (data, sizes, attacks, history)
    extractor.npz         the frozen HiDDeN extractor and its whitening
    encoder.npz           the HiDDeN encoder (only needed to pre-train further)
    pretrain_checkpoint.npz  an unfinished pre-training's last saved step (gone once done)
    signature.json        the signed model: LDM, autoencoder, users, fine-tuning, decoder hashes
    registry.json         users -> messages, sealed by the owner key (owner-only)
    decoders/user_NNNN.npz  each user's fine-tuned decoder

Messages come from the owner's key (`wdmjax.keys`: `--key-file`, `$WDMJAX_OWNER_KEY_FILE` or
`$WDMJAX_OWNER_KEY`), never from a default: user u's message is HMAC-derived from the key, a random
id of the signing and u. The registry is sealed with the key (an HMAC over its contents) and
every read checks the seal, so a registry whose messages were edited (say, to the bits the
extractor reads from unsigned images) or one of another owner's key is refused in one line.
Every file read back is checked field by field (`wdmjax.records`): a tampered, truncated or
mistyped file is refused in one line naming the file and the field.

Detection reads only the extractor and the registry: never a parameter of the suspect
model. A registry records the hashes of the extractor and of the original decoder it was made
for, so a registry of another signature workdir is refused.

Faults: every writing command holds the workdir's lock. `pretrain` saves its state every
`checkpoint_every` steps (and when stopped by SIGTERM or Ctrl-C) and a rerun with the same
arguments continues from it, with the result of a run never stopped; other arguments are
refused in one line (remove the checkpoint to start afresh). `embed` writes the registry
last: a signing without a registry was interrupted, and a rerun removes what it left
(decoders, temporary files) before signing again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

from wdmjax import keys, records
from wdmjax.data import labelled_split
from wdmjax.errors import WdmjaxError, check, check_number, check_seed, show
from wdmjax.files import check_dir_path, save_npz
from wdmjax.runs.arguments import check_count
from wdmjax.runs.autoencoder import generate as ldm_generate
from wdmjax.runs.autoencoder import ldm_autoencoder
from wdmjax.runs.images import read_images
from wdmjax.signature import Whitening, fit_whitening, whiten
from wdmjax.signature.detect import detect as detect_bits
from wdmjax.signature.detect import identify_users
from wdmjax.signature.finetune import finetune_decoders, user_params
from wdmjax.signature.hidden import HiddenEncoder, HiddenExtractor
from wdmjax.signature.pretrain import (
  Hidden,
)
from wdmjax.train.images import to_uint8
from wdmjax.workdir import Workdir

HIDDEN_JSON = "hidden.json"
EXTRACTOR = "extractor.npz"
ENCODER = "encoder.npz"
CHECKPOINT = "pretrain_checkpoint.npz"
SIGNATURE_JSON = "signature.json"
REGISTRY = "registry.json"
DECODERS = "decoders"
MIN_SIDE = 8  # the smallest crop or downscale an extractor is asked to read

# Bounds on what a user types or a file records (memory bounds are computed per call).
MAX_USERS = 100_000     # a registry of 100,000 users is about 10 MB
MAX_STEPS = 10_000_000
MAX_BITS = 1024
MAX_CHANNELS = 1024
MAX_DEPTH = 64
MAX_CANDIDATES = 64
MAX_SIDE = 4096
MAX_IMAGES = 999_999    # generated PNGs are named 000000.png ... 999999.png
CHECKPOINT_EVERY = 200


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


def _count(name: str, v, high: int, why: str = "") -> int:
  """A positive integer at most `high` (`why` says where the bound comes from)."""
  check(isinstance(v, int | np.integer) and not isinstance(v, bool) and 1 <= v <= high,
        f"{name}: expected an integer in [1, {high:,}]{why}, got {show(v)}")
  return int(v)


def _renamed(name: str, call: Callable, heads: tuple[str, ...] = ("workdir", "ldm_workdir")):
  """`call()`, with a WdmjaxError that starts with one of the callee's parameters `heads`
  (`workdir: ...`) renamed to `name`, the argument the user gave (or the file that named
  the directory)."""
  try:
    return call()
  except WdmjaxError as e:
    text = str(e)
    m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*): ", text)
    if m is None or m.group(1) not in heads:
      raise
    raise WdmjaxError(f"{name}: {text[m.end():]}") from None


# ----------------------------------------------------------------------------- the extractor


@functools.partial(jax.jit, static_argnums=0)
def _extract(module: HiddenExtractor, variables, x: jax.Array) -> jax.Array:
  """Logits [B, k] of images x [B, H, W, C] (compiled once per module and shape)."""
  return module.apply(variables, x)


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
    return np.asarray(whiten(self.whitening, jnp.asarray(self.raw_logits(x, batch_size))))

  def logits_of(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """Whitened logits [N, k] of N images [h, w, C] of any allowed sizes (grouped by size)."""
    out = np.zeros((len(images), self.whitening.mean.shape[0]), np.float32)
    for shape in dict.fromkeys(np.shape(im) for im in images):
      idx = [i for i, im in enumerate(images) if np.shape(im) == shape]
      out[idx] = self.logits(np.stack([images[i] for i in idx]))
    return out

  @property
  def num_bits(self) -> int:
    return int(self.whitening.mean.shape[0])

  def raw_logits(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """The extractor's logits [N, k] before whitening, of images [N, H, W, C] in [-1, 1]."""
    x = np.asarray(images, np.float32)
    out = [np.asarray(_extract(self.hidden.extractor, self.hidden.extractor_vars,
                               jnp.asarray(x[i:i + batch_size])))
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, self.num_bits), np.float32)

  def with_whitening(self, whitening: Whitening) -> Extractor:
    """This extractor with another whitening (a signing's: see `read_registry`)."""
    return dataclasses.replace(self, whitening=whitening)


def _hidden_meta(wd: Workdir) -> dict:
  """hidden.json's fields that fix the modules' shapes, checked."""
  path = wd.file(HIDDEN_JSON)
  check(os.path.lexists(path) and os.path.lexists(wd.file(EXTRACTOR)),
        f"workdir: no extractor in {wd.path!r}; pre-train one with `wdmjax signature pretrain`")
  meta = records.read_json_file(path)
  shape = records.field(meta, "image_shape", "list", path, low=3, high=3)
  check(all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
        and MIN_SIDE <= shape[0] <= MAX_SIDE and MIN_SIDE <= shape[1] <= MAX_SIDE
        and shape[2] in (1, 3),
        f"{path}: field 'image_shape': expected [H, W, C] with {MIN_SIDE} <= H, W <= "
        f"{MAX_SIDE} and C 1 or 3, got {show(shape, 60)}")
  out = {"image_shape": tuple(shape)}
  for name, high in (("num_bits", MAX_BITS), ("channels", MAX_CHANNELS),
                     ("encoder_depth", MAX_DEPTH), ("extractor_depth", MAX_DEPTH)):
    out[name] = records.field(meta, name, "int", path, low=1, high=high)
  out["pool"] = records.field(meta, "pool", "int", path, low=1, high=min(shape[:2]),
                              optional=True, default=1)
  return out


def _read_vars(path: str, init: Callable, extra: dict[str, tuple]) -> tuple[dict, dict]:
  """The variables that `init()` makes, from the .npz `path`, each array checked against
  their shapes (`init` is only traced); and the `extra` arrays {name: shape}."""
  want = traverse_util.flatten_dict(jax.eval_shape(init), sep="/")
  want = {f"vars/{k}": v.shape for k, v in want.items()}
  want.update(extra)
  arrays = records.read_npz_file(path, sorted(want))
  extras = sorted(set(arrays) - set(want))
  check(not extras, f"{path}: expected the arrays of the module hidden.json describes, got "
                    f"{len(extras)} others ({show(extras[:3], 60)})")
  for k, shape in want.items():
    check(arrays[k].shape == tuple(shape), f"{path}: array {k!r}: expected shape "
                                           f"{tuple(shape)}, got {arrays[k].shape}")
  arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
  return _unflat(arrays, "vars"), {k: arrays[k] for k in extra}


def load_extractor(workdir: str | Workdir, with_encoder: bool = False) -> Extractor:
  """The frozen extractor (and its whitening) of a signature workdir, every array checked
  against hidden.json. `with_encoder`: load the HiDDeN encoder too (else
  `hidden.encoder_vars` is None: detection never needs it)."""
  wd = Workdir(workdir)
  meta = _hidden_meta(wd)
  shape, k = meta["image_shape"], meta["num_bits"]
  enc = HiddenEncoder(num_bits=k, channels=meta["channels"], depth=meta["encoder_depth"])
  ext = HiddenExtractor(num_bits=k, channels=meta["channels"], depth=meta["extractor_depth"],
                        pool=meta["pool"])
  path = records.regular_file(wd.file(EXTRACTOR), max_bytes=records.MAX_NPZ_BYTES)
  ext_vars, wa = _read_vars(
    path, lambda: ext.init(jax.random.key(0), jnp.zeros((2, *shape))),
    {"whitening/mean": (k,), "whitening/matrix": (k, k)})
  w = Whitening(jnp.asarray(wa["whitening/mean"]), jnp.asarray(wa["whitening/matrix"]))
  enc_vars = None
  if with_encoder:
    enc_vars, _ = _read_vars(
      wd.file(ENCODER),
      lambda: enc.init(jax.random.key(0), jnp.zeros((2, *shape)), jnp.zeros((2, k), jnp.int32)),
      {})
  return Extractor(Hidden(enc, ext, enc_vars, ext_vars), w, shape, _sha256(path))


# ----------------------------------------------------------------------------- the registry


@dataclasses.dataclass(frozen=True)
class Registry:
  """A signing's users and messages, as sealed by the owner key: `messages` [users, k] int32
  in {0, 1}; `signing` the signing's random id; `whitening` the signing's whitening of the
  extractor's logits (fitted on the model's unsigned images: see `embed`); `path` the
  file."""
  messages: np.ndarray
  signing: str
  whitening: Whitening
  path: str


def _read_whitening(reg: dict, k: int, path: str) -> Whitening:
  wh = records.field(reg, "whitening", "dict", path)
  what = f"{path}: field 'whitening'"
  mean = records.field(wh, "mean", "list", what, low=k, high=k)
  matrix = records.field(wh, "matrix", "list", what, low=k, high=k)
  rows = [mean, *matrix]
  check(all(isinstance(r, list) and len(r) == k for r in matrix)
        and all(isinstance(v, float | int) and not isinstance(v, bool) and np.isfinite(v)
                for r in rows for v in r),
        f"{what}: expected 'mean' [{k}] and 'matrix' [{k}, {k}] of finite numbers")
  return Whitening(jnp.asarray(mean, jnp.float32), jnp.asarray(matrix, jnp.float32))


def _message(key: bytes, signing: str, user: int, num_bits: int) -> np.ndarray:
  """User `user`'s secret message [num_bits] (int32 in {0, 1}) of the signing `signing`."""
  return keys.derive_bits(key, f"stable signature {signing} user {user}", num_bits) \
    .astype(np.int32)


def read_registry(workdir: str | Workdir, registry: str | None = None,
                  key_file: str | None = None, *, extractor: Extractor | None = None
                  ) -> Registry:
  """The registry of a signature workdir (or the file `registry`), checked field by field and
  against its seal under the owner key (`key_file`, else the environment: see
  `wdmjax.keys.owner_key`): a registry altered since it was sealed, or sealed by another
  key, is refused in one line; so is one made for another extractor or another signing of
  this workdir."""
  wd = Workdir(workdir)
  key = keys.owner_key(key_file)
  extractor = extractor or load_extractor(wd)
  path = registry if registry is not None else wd.file(REGISTRY)
  if registry is None:
    check(os.path.lexists(path), f"registry: no registry in {wd.path!r}; sign a model with "
                                 f"`wdmjax signature embed`")
  reg = records.read_json_file(path)
  k = records.field(reg, "num_bits", "int", path, low=1, high=MAX_BITS)
  signing = records.field(reg, "signing", "str", path, low=1, high=64)
  records.field(reg, "extractor_sha256", "str", path, low=64, high=64)
  users = records.field(reg, "users", "list", path, low=1, high=MAX_USERS)
  msgs = np.zeros((len(users), k), np.int32)
  for i, u in enumerate(users):
    what = f"{path}: users[{i}]"
    records.field(u, "user", "int", what, low=i, high=i)
    m = records.field(u, "message", "str", what, low=k, high=k)
    check(set(m) <= {"0", "1"}, f"{what}: field 'message': expected {k} characters 0 or 1, "
                                f"got {show(m, 60)}")
    msgs[i] = np.frombuffer(m.encode(), np.uint8) - ord("0")
  whitening = _read_whitening(reg, k, path)
  keys.check_seal(reg, key, path)
  check(reg["extractor_sha256"] == extractor.sha256 and k == extractor.num_bits,
        f"{path}: made for another extractor (another signature workdir or model), expected "
        f"the registry of {wd.path!r}")
  sig = wd.file(SIGNATURE_JSON)
  if os.path.lexists(sig):
    own = records.field(records.read_json_file(sig), "signing", "str", sig)
    check(own == signing, f"{path}: expected the registry of the signing in {wd.path!r} "
                          f"(signing {own}), got that of signing {signing}")
  return Registry(msgs, signing, whitening, os.fspath(path))


# ----------------------------------------------------------------------------- signing


@dataclasses.dataclass(frozen=True)
class EmbedReport:
  workdir: str
  users: int
  seconds: float
  bit_accuracy: float        # mean over users, last fine-tuning step
  worst_bit_accuracy: float  # the worst user's
  decoders: str
  cleaned: list[str] = dataclasses.field(default_factory=list)  # an interrupted run's leftovers


def _leftovers(wd: Workdir) -> list[str]:
  """What an interrupted `embed` (no registry written) leaves in a workdir: decoders, their
  staging directory, signature.json, the temporary files of atomic writes."""
  out = []
  for name in sorted(os.listdir(wd.path)):
    if (name in (DECODERS, SIGNATURE_JSON) or name.startswith(".decoders-")
        or (name.endswith(".tmp") and name.startswith((f".{REGISTRY}.",
                                                       f".{SIGNATURE_JSON}.")))):
      out.append(name)
  return out


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def null_seed(seed: int) -> int:
  """The sampling seed of the unsigned images that `embed(seed=seed)` fits the signing's
  whitening on (test the false-positive rate on images of other seeds)."""
  return int(np.random.default_rng([seed, 0x5EED]).integers(2**32 - 1))


def embed(workdir: str | Workdir, ldm: str | Workdir, users: int, *,
          key_file: str | None = None, seed: int = 0, steps: int = 100, batch_size: int = 4,
          lr: float = 5e-4, image_weight: float = 0.2, num_latents: int = 2000,
          null_images: int = 1000, progress: bool = True) -> EmbedReport:
  """Fine-tunes one copy of the LDM's decoder per user so that every image it decodes
  carries that user's message. Messages are derived from the owner key (`key_file`, else
  `$WDMJAX_OWNER_KEY_FILE` or `$WDMJAX_OWNER_KEY`) and a random id of this signing; `seed` draws the
  fine-tuning's batches only. Writes decoders/, signature.json and, last, registry.json
  (owner-only, sealed by the key); the LDM and its autoencoder are read, never written.

  Calibration: the exact binomial test needs the bits of an unsigned image to be fair,
  independent coins. The extractor's whitening (fitted on the training images) delivers that
  on images like those only: on the LDM's own images, decoded by its autoencoder, the
  logits' mean moves, the bits are biased and a fixed message can agree with most unsigned
  images (84% flagged at a nominal 0.3 in the issue that found it). So the signing whitens
  afresh on `null_images` unsigned images of the model itself (sampled with
  `null_seed(seed)`, decoded by the original decoder): each bit centred and the bits
  decorrelated on the images detection tests, kept sealed in the registry, used by the
  fine-tuning and by detection. `null_images` = 0 keeps the extractor's whitening.

  A workdir with a registry is refused; one without (an interrupted signing) is cleaned of
  what that signing left before this one starts. `users` is bounded by memory (all users'
  decoders are fine-tuned at once).
  """
  wd = Workdir(workdir)
  key = keys.owner_key(key_file)
  users = _count("users", users, MAX_USERS)
  seed = check_seed(seed, "seed")
  steps = _count("steps", steps, MAX_STEPS)
  check(isinstance(num_latents, int) and not isinstance(num_latents, bool)
        and num_latents >= 1, f"num_latents: expected a positive integer, got "
                              f"{show(num_latents)}")
  check_number(lr, "lr", 0, low_open=True)
  check_number(image_weight, "image_weight", 0)
  extractor = load_extractor(wd)
  k = extractor.num_bits
  check(isinstance(null_images, int) and not isinstance(null_images, bool)
        and (null_images == 0 or 4 * k <= null_images <= MAX_IMAGES),
        f"null_images: expected 0 (the extractor's whitening) or an integer in [{4 * k}, "
        f"{MAX_IMAGES:,}] (4 x the {k} bits: the covariance of the bits is fitted on them), "
        f"got {show(null_images)}")
  check(not os.path.lexists(wd.file(REGISTRY)),
        f"workdir: {wd.path!r} already holds signed decoders ({REGISTRY}); use another "
        f"signature workdir")
  ae = _renamed("ldm", lambda: ldm_autoencoder(ldm))
  check(tuple(ae.image_shape) == extractor.image_shape,
        f"ldm: its images are {tuple(ae.image_shape)}, the extractor reads "
        f"{extractor.image_shape}")
  x, _, _, _ = labelled_split(ae.data)
  num_latents = min(num_latents, len(x))
  batch_size = _count("batch_size", batch_size, num_latents,
                      f" (the latents fine-tuned on: {num_latents:,} images of {ae.data!r})")
  decoder_size = sum(int(np.size(v)) for v in jax.tree.leaves(ae.params["decoder"]))
  h, w, c = ae.image_shape
  # Per user: the decoder, its gradient and AdamW's two moments and the update, and the
  # activations of a batch through the decoder and the extractor (an estimate).
  per_user = 4 * (5 * decoder_size + batch_size * h * w * (c + 256))
  users = check_count("users", users, bytes_each=per_user, what="users' decoders")
  if null_images:
    check_count("null_images", null_images, bytes_each=4 * h * w * c * 4, what="images")
  with wd.undo_on_failure():
    check(not os.path.lexists(wd.file(REGISTRY)),
          f"workdir: {wd.path!r} already holds signed decoders ({REGISTRY}); use another "
          f"signature workdir")
    cleaned = _leftovers(wd)
    for name in cleaned:
      _remove(wd.file(name))
    latents = ae.encode(x[:num_latents])
    if null_images:
      unsigned = _renamed("ldm", lambda: ldm_generate(ldm, null_images,
                                                      seed=null_seed(seed)).images)
      extractor = extractor.with_whitening(fit_whitening(extractor.raw_logits(unsigned)))
    signing = secrets.token_hex(8)
    msgs = np.stack([_message(key, signing, u, k) for u in range(users)])

    def decode(params, z):
      return ae.decoder.apply({"params": params}, z / ae.scale)

    start = time.time()
    r = finetune_decoders(decode, lambda im: extractor.hidden.extract(im), extractor.whitening,
                          ae.params["decoder"], latents, msgs, jax.random.key(seed + 1),
                          steps=steps, batch_size=batch_size, lr=lr, image_weight=image_weight,
                          progress=progress)
    seconds = time.time() - start
    # The decoders appear whole (a staging directory renamed), then signature.json, then the
    # registry: a workdir without a registry holds an interrupted signing.
    staging = tempfile.mkdtemp(prefix=".decoders-", dir=wd.path)
    hashes = []
    for u in range(users):
      path = os.path.join(staging, f"user_{u:04d}.npz")
      save_npz(path, _flat(user_params(r.params, u), "params"), compressed=True)
      hashes.append(_sha256(path))
    os.chmod(staging, 0o755)
    os.rename(staging, wd.file(DECODERS))
    ldm_path = os.path.abspath(os.fspath(ldm))
    if os.path.commonpath([ldm_path, wd.abspath]) == wd.abspath:
      ldm_path = os.path.relpath(ldm_path, wd.abspath)  # inside: the workdir moves with it
    wd.write_json(SIGNATURE_JSON, {
      "ldm": ldm_path, "autoencoder": ae.path, "users": users, "signing": signing,
      "key_id": keys.key_id(key), "decoder_sha256": _tree_sha256(ae.params["decoder"]),
      "decoders_sha256": hashes, "steps": steps, "batch_size": batch_size, "lr": lr,
      "image_weight": image_weight, "seed": seed, "null_images": null_images,
      "null_seed": null_seed(seed) if null_images else None, "seconds": seconds,
      "history": r.history})
    wd.write_private(REGISTRY, json.dumps(keys.seal({
      "signing": signing, "num_bits": k, "extractor_sha256": extractor.sha256,
      "decoder_sha256": _tree_sha256(ae.params["decoder"]),
      "whitening": {"mean": np.asarray(extractor.whitening.mean, np.float64).tolist(),
                    "matrix": np.asarray(extractor.whitening.matrix, np.float64).tolist()},
      "users": [{"user": u, "message": "".join(map(str, m))} for u, m in enumerate(msgs)]},
      key), indent=2) + "\n")
  last = r.history[-1]
  return EmbedReport(wd.abspath, users, seconds, last["bit_acc"], last["worst_bit_acc"],
                     wd.file(DECODERS), cleaned)


def signature_meta(wd: str | Workdir) -> dict:
  """signature.json, checked: users, signing, the decoders' hashes, the LDM's path (made
  absolute: a relative one is resolved inside the workdir)."""
  wd = Workdir(wd)
  path = wd.file(SIGNATURE_JSON)
  check(os.path.lexists(path), f"workdir: no signed decoders in {wd.path!r}; run `wdmjax "
                               f"signature embed` first")
  meta = records.read_json_file(path)
  users = records.field(meta, "users", "int", path, low=1, high=MAX_USERS)
  records.field(meta, "signing", "str", path, low=1, high=64)
  records.field(meta, "decoder_sha256", "str", path, low=64, high=64)
  hashes = records.field(meta, "decoders_sha256", "list", path, low=users, high=users)
  check(all(isinstance(h, str) and len(h) == 64 for h in hashes),
        f"{path}: field 'decoders_sha256': expected {users} sha256 hex digests, got "
        f"{show(hashes, 60)}")
  ldm = records.field(meta, "ldm", "str", path, low=1)
  meta["ldm"] = ldm if os.path.isabs(ldm) else records.inside(wd.path, ldm, f"{path}: field "
                                                                            f"'ldm'")
  return meta


def load_user_decoder(workdir: str | Workdir, user: int):
  """User `user`'s fine-tuned decoder parameters: the file `signature embed` wrote (its
  hash is checked against signature.json; a link, even to another user's, is refused)."""
  wd = Workdir(workdir)
  meta = signature_meta(wd)
  check(isinstance(user, int | np.integer) and not isinstance(user, bool)
        and 0 <= user < meta["users"],
        f"user: expected a user in [0, {meta['users']}), got {show(user)}")
  name = os.path.join(DECODERS, f"user_{int(user):04d}.npz")
  path = records.regular_file(records.inside(wd.path, name, wd.file(name)),
                              max_bytes=records.MAX_NPZ_BYTES)
  check(_sha256(path) == meta["decoders_sha256"][int(user)],
        f"{path}: expected the decoder of user {user} that `signature embed` wrote (its "
        f"sha256 is in {SIGNATURE_JSON}), got another file")
  arrays = records.read_npz_file(path)
  check(arrays and all(k.startswith("params/") for k in arrays),
        f"{path}: expected the arrays 'params/...' of a decoder, got {show(sorted(arrays)[:3])}")
  return _unflat(arrays, "params")


@dataclasses.dataclass(frozen=True)
class GenerateReport:
  images: np.ndarray  # [num, H, W, C] in [-1, 1]
  path: str | None    # the directory of PNGs, when written


def generate(workdir: str | Workdir, user: int | None, num: int, *, seed: int = 0,
             out: str | None = None) -> GenerateReport:
  """`num` images of the signed LDM through `user`'s decoder (None: the original, unsigned
  decoder), written as PNGs into the directory `out` when given. The LDM is the one
  signature.json names (a relative path is taken inside the workdir), and its decoder must be
  the one that was signed. `num` is bounded by memory and by the PNGs' 6-digit names."""
  wd = Workdir(workdir)
  num = _count("num", num, MAX_IMAGES)
  seed = check_seed(seed, "seed")
  meta = signature_meta(wd)
  if out is not None:
    check_dir_path(out, "out", writable=True)
    check(not os.path.exists(out) or not os.listdir(out),
          f"out: expected a new or empty directory, got {out!r}")
  params = None if user is None else load_user_decoder(wd, user)
  what = f"{wd.file(SIGNATURE_JSON)}: field 'ldm'"
  ae = _renamed(what, lambda: ldm_autoencoder(meta["ldm"]))
  check(_tree_sha256(ae.params["decoder"]) == meta["decoder_sha256"],
        f"{what}: expected the LDM whose decoder was signed, got {meta['ldm']!r}, whose "
        f"autoencoder's decoder is another")
  h, w, c = ae.image_shape
  num = check_count("num", num, bytes_each=4 * h * w * c * 4, what="images")
  r = _renamed(what, lambda: ldm_generate(meta["ldm"], num, seed=seed, decoder_params=params))
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
    os.chmod(tmp, 0o755)
    if os.path.isdir(out):
      os.rmdir(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def detect(workdir: str | Workdir, images: np.ndarray | str, *, user: int | None = None,
           fpr: float = 1e-6, registry: str | None = None, key_file: str | None = None
           ) -> dict:
  """Per image: the bits agreeing with the tested message, log10 p, detected at `fpr`, and
  the identified user. With `user`, tests that user's message alone (threshold at `fpr`);
  without, identifies among all users (the best match tested at fpr / users). The registry
  (the workdir's, or the file `registry`) must be sealed by the owner key (`key_file`, else
  the environment); the logits are whitened as the signing's registry says (see `embed`).

  images: [N, h, w, C] in [-1, 1], or a directory (or file) of PNG/JPEG images: the
  generated size or a crop or downscale of it.
  """
  wd = Workdir(workdir)
  check_number(fpr, "fpr", 0, 1, low_open=True, high_open=True)
  extractor = load_extractor(wd)
  reg = read_registry(wd, registry, key_file, extractor=extractor)
  msgs, extractor = reg.messages, extractor.with_whitening(reg.whitening)
  if user is not None:
    check(isinstance(user, int | np.integer) and not isinstance(user, bool)
          and 0 <= user < len(msgs), f"user: expected a user in [0, {len(msgs)}), got "
                                     f"{show(user)}")
  if isinstance(images, str | os.PathLike):
    x, names = read_images(os.fspath(images), extractor.image_shape, min_side=MIN_SIDE)
    logits = jnp.asarray(extractor.logits_of(x))
  else:
    logits = jnp.asarray(extractor.logits(images))
    names = [str(i) for i in range(len(logits))]
  rows = []
  if user is not None:
    d = jax.tree.map(np.asarray, detect_bits(logits, jnp.asarray(msgs[user]), fpr))
    for i, n in enumerate(names):
      rows.append({"image": n, "agreeing": int(d.agreeing[i]),
                   "log10_p": float(d.log10_p[i]), "detected": bool(d.detected[i]),
                   "user": int(user) if bool(d.detected[i]) else None})
    threshold = int(d.threshold)
  else:
    ident = jax.tree.map(np.asarray, identify_users(logits, jnp.asarray(msgs), fpr))
    for i, n in enumerate(names):
      rows.append({"image": n, "agreeing": int(ident.agreeing[i]),
                   "log10_p": float(ident.log10_p[i]), "detected": bool(ident.identified[i]),
                   "user": int(ident.best[i]) if bool(ident.identified[i]) else None,
                   "best_user": int(ident.best[i])})
    threshold = int(np.asarray(ident.threshold).reshape(-1)[0])
  return {"fpr": fpr, "users": len(msgs), "num_bits": int(msgs.shape[1]),
          "threshold": threshold, "tested_user": user,
          "detected": int(sum(r["detected"] for r in rows)), "images": rows}


__all__ = ["EmbedReport", "Extractor", "GenerateReport", "Registry", "detect", "embed",
           "generate", "load_extractor", "load_user_decoder", "null_seed", "read_images",
           "read_registry", "write_pngs"]
