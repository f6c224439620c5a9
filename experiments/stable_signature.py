"""Stable Signature on mnist5k (or the RGB photos32): does every image of a signed latent
diffusion model carry its user's 48 bits, detectably at FPR 1e-6, under image attacks and
attacks on the model?

  wdmjax keygen owner.key                          # the owner key the messages come from
  python experiments/stable_signature.py --key-file owner.key [--runs runs/stable_signature] \
      [--users 100]
  python experiments/stable_signature.py --data photos32 --users 20 --per-user 10 \
      --variants "uncertainty, 4x4 pooling" --ldm-steps 800 --pretrain-steps 1500 \
      --warmup-steps 1000                          # -> stable_signature_photos32.*
  (the committed mnist5k results: --variants "uncertainty, 4x4 pooling", the defaults)

Pipeline (each stage skipped when its workdir exists, so a rerun resumes):
  1. `wdmjax autoencoder train` on the data (KL autoencoder, 4-channel latents, factor 4);
  2. a latent DiT (`mnist5k_ldm` or `photos32_ldm`) on its latents;
  3. HiDDeN pre-training with attacks in the loop, once with the attack per batch chosen by
     uncertainty (the highest-loss of 3 drawn) and once drawn uniformly, from the same seed;
     and once more by uncertainty with the extractor pooling over a 4 x 4 grid of cells
     instead of globally (which learns the bits several times faster);
  4. `signature embed`: one fine-tuned decoder per user (batch 4; --embed-steps 500 at AdamW
     --embed-lr 1e-3, --image-weight 1 by default: the published 100 steps at 5e-4 leave the
     bits unreadable with these extractors, see the trade-off of steps against PSNR that the
     experiment also measures for one user). --variants picks the extractors signed with.
Crops and rescales are evaluated as published (the extractor reads the smaller image) and,
in extra rows, resized back to the full size. Evaluation, on latents sampled once from the
latent DiT and decoded by each decoder:
bit accuracy, TPR at FPR 1e-6 (exact binomial test of the user's message; tau = 41 of 48),
identification among all users (union bound, tau = 43 for 100 users), under each attack;
PSNR / SSIM of the signed images against the original decoder's images of the same latents;
the Frechet distance (LeNet features) of signed and unsigned images to real digits; the
empirical FPR on unsigned images; and the model attacks (the original decoder swapped in,
the signed decoder fine-tuned on clean reconstruction, two users' decoders averaged).

Writes experiments/results/stable_signature.{json,md,png} and the example images of the
figure, stable_signature_examples.npz.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from wdm_mnist5k import device_info, write_json_and_markdown

from wdmjax import imaging, runs
from wdmjax.data import labelled_split
from wdmjax.files import read_json
from wdmjax.metrics.classifier import classifier_features, train_classifier
from wdmjax.metrics.frechet import frechet_distance_from_features
from wdmjax.metrics.quality import psnr, ssim
from wdmjax.runs.signature import REGISTRY, read_registry
from wdmjax.signature.detect import detect, identify_users, message_bits
from wdmjax.signature.finetune import finetune_decoders, user_params
from wdmjax.stats import threshold_for_fpr
from wdmjax.workdir import Workdir

# (name, attack selection, extractor pooling): the published global pooling with both
# selections, and a 4 x 4 grid of cells, which learns its bits far faster (HiddenExtractor).
VARIANTS = (("uncertainty", "uncertainty", 1), ("uniform", "uniform", 1),
            ("uncertainty, 4x4 pooling", "uncertainty", 4))
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STEM = "stable_signature"
FPR = 1e-6


def brightness_factor(x, f):
  return jnp.clip((x + 1.0) * f - 1.0, -1.0, 1.0)


# Crops and rescales as Stable Signature evaluates them: the extractor reads the smaller image
# (its pooling takes any size). "resized back" rows upscale to the full size instead, which
# also rescales the watermark's texture.
ATTACKS = {
  "none": lambda x, k: x,
  "crop 0.5": lambda x, k: imaging.center_crop(x, 0.5, resize_back=False),
  "crop 0.1": lambda x, k: imaging.center_crop(x, 0.1, resize_back=False),
  "crop 0.5, resized back": lambda x, k: imaging.center_crop(x, 0.5),
  "resize 0.7": lambda x, k: imaging.resize(x, 0.7, resize_back=False),
  "resize 0.3": lambda x, k: imaging.resize(x, 0.3, resize_back=False),
  "resize 0.3, resized back": lambda x, k: imaging.resize(x, 0.3),
  "jpeg 80": lambda x, k: imaging.jpeg(np.asarray(x), 80),
  "jpeg 50": lambda x, k: imaging.jpeg(np.asarray(x), 50),
  "brightness 1.5": lambda x, k: brightness_factor(x, 1.5),
  "brightness 2": lambda x, k: brightness_factor(x, 2.0),
  "blur 1": lambda x, k: imaging.gaussian_blur(x, 1.0),
  "noise 0.05": lambda x, k: imaging.gaussian_noise(x, k, 0.05),
  "rotate 10": lambda x, k: imaging.rotate(x, 10.0),
  "crop 0.5 + brightness 1.5 + jpeg 80": lambda x, k: imaging.jpeg(
    np.asarray(brightness_factor(imaging.center_crop(x, 0.5, resize_back=False), 1.5)), 80),
}
# Decoder fine-tuning as published (100 steps, AdamW 5e-4, image weight 0.2), and the longer,
# faster one this experiment signs with by default (see the trade-off section).
PUBLISHED_EMBED = {"steps": 100, "lr": 5e-4, "image_weight": 0.2}
TRADEOFF_STEPS = (100, 300, 1000)
TRADEOFF_WEIGHTS = (0.2, 1.0, 3.0)


def stage(path: str, make) -> None:
  if not os.path.exists(path):
    print(f"-- {path}", flush=True)
    make()


def build(root: str, data: str, users: int, pre_steps: int, warmup: int, ldm_steps: int,
          variants, embed: dict, key_file: str | None = None) -> dict:
  ae = os.path.join(root, "ae")
  ldm = os.path.join(root, "ldm")
  stage(ae, lambda: runs.train_autoencoder(ae, data))
  stage(ldm, lambda: runs.train(f"{data}_ldm", ldm, [
    f"data.data_dir={os.path.join(ae, 'tfds')}", f"train.steps={ldm_steps}"]))
  pres, sigs = {}, {}
  for name, sel, pool in VARIANTS:
    pre = os.path.join(root, f"sig_{sel}" if pool == 1 else f"sig_{sel}_pool{pool}")
    pres[name] = pre
    if name not in variants:
      continue
    stage(os.path.join(pre, "extractor.npz"),
          lambda pre=pre, sel=sel, pool=pool: runs.signature_pretrain(
            pre, data, steps=pre_steps, warmup_steps=warmup, selection=sel, pool=pool))
    sig = pre
    if embed != PUBLISHED_EMBED:  # another signature workdir around a copy of the extractor
      sig = f"{pre}_e{embed['steps']}_lr{embed['lr']:g}_iw{embed['image_weight']:g}"
      if not os.path.exists(os.path.join(sig, "extractor.npz")):
        os.makedirs(sig, exist_ok=True)
        for f in ("hidden.json", "encoder.npz", "extractor.npz"):
          shutil.copy(os.path.join(pre, f), sig)
    stage(os.path.join(sig, REGISTRY), lambda sig=sig: runs.signature_embed(
      sig, ldm, users, key_file=key_file, steps=embed["steps"], lr=embed["lr"],
      image_weight=embed["image_weight"]))
    sigs[name] = sig
  return {"ae": ae, "ldm": ldm, "pres": pres, "sigs": sigs}


def tradeoff(sig: str, ldm: str, lat: np.ndarray, lr: float,
             steps_list=TRADEOFF_STEPS) -> list[dict]:
  """One decoder fine-tuned (for a message drawn from key 0) for TRADEOFF_STEPS at each of
  TRADEOFF_WEIGHTS: bit accuracy and TPR on generated latents `lat` against PSNR to the
  original decoder. `sig` needs only an extractor."""
  ext = runs.load_extractor(sig)
  ae = runs.ldm_autoencoder(ldm)
  x, _, _, _ = labelled_split(ae.data)
  train_lat = ae.encode(x[:2000])
  msg = np.asarray(message_bits(jax.random.key(0), 48, num_users=1))
  original = ae.decode(lat)

  def decode(params, z):
    return ae.decoder.apply({"params": params}, z / ae.scale)

  rows = []
  for weight in TRADEOFF_WEIGHTS:
    params, done = ae.params["decoder"], 0
    for steps in steps_list:
      r = finetune_decoders(decode, ext.hidden.extract, ext.whitening, params, train_lat, msg,
                            jax.random.key(steps), steps=steps - done, lr=lr,
                            image_weight=weight)
      params, done = user_params(r.params, 0), steps
      signed = ae.decode(lat, params)
      d = detect(jnp.asarray(ext.logits(signed)), jnp.asarray(msg[0]), FPR)
      rows.append({"image_weight": weight, "steps": steps, "lr": lr,
                   "bit_accuracy": float(np.mean(np.asarray(d.agreeing)) / msg.shape[1]),
                   "tpr": float(np.mean(np.asarray(d.detected))),
                   "psnr": float(np.mean(psnr(signed, original)))})
      print(f"trade-off: weight {weight:g}, {steps} steps: bits {rows[-1]['bit_accuracy']:.3f}"
            f" TPR {rows[-1]['tpr']:.3f} PSNR {rows[-1]['psnr']:.2f}", flush=True)
  return rows


def evaluate(sig: str, ldm: str, lat: np.ndarray, unsigned_lat: np.ndarray, eval_users: int,
             key, key_file: str | None = None) -> dict:
  """lat: [eval_users * per_user, ...] latents of the latent DiT, decoded by user u's decoder
  for the u-th block; unsigned_lat: latents decoded by the original decoder. The messages and
  the signing's whitening come from the registry, checked against the owner key."""
  reg = read_registry(sig, key_file=key_file)
  ext = runs.load_extractor(sig).with_whitening(reg.whitening)
  ae = runs.ldm_autoencoder(ldm)
  msgs = reg.messages
  n_users = len(msgs)
  per_user = len(lat) // eval_users
  num_unsigned = len(unsigned_lat)
  original = ae.decode(lat)
  signed = np.concatenate([
    ae.decode(lat[u * per_user:(u + 1) * per_user], runs.load_user_decoder(sig, u))
    for u in range(eval_users)])
  owner = np.repeat(np.arange(eval_users), per_user)
  out = {"users": n_users, "eval_users": eval_users, "images_per_user": per_user,
         "psnr": float(np.mean(psnr(signed, original))),
         "ssim": float(np.mean(ssim(signed, original)))}
  rows = {}
  tau = int(threshold_for_fpr(msgs.shape[1], FPR))
  for name, attack in ATTACKS.items():
    x = np.asarray(attack(jnp.asarray(signed), jax.random.fold_in(key, len(rows))))
    logits = jnp.asarray(ext.logits(x))
    agree = np.asarray((np.asarray(logits)[:, None, :] > 0) == msgs[None].astype(bool)).sum(-1)
    own = agree[np.arange(len(x)), owner]
    ident = identify_users(logits, jnp.asarray(msgs), FPR)
    rows[name] = {
      "bit_accuracy": float(own.mean() / msgs.shape[1]),
      "tpr": float(np.mean(own >= tau)),
      "identification": float(np.mean(np.asarray(ident.identified)
                                      & (np.asarray(ident.best) == owner))),
    }
    print(f"{name:40s} bits {rows[name]['bit_accuracy']:.3f} TPR {rows[name]['tpr']:.3f} "
          f"ident {rows[name]['identification']:.3f}", flush=True)
  out["attacks"] = rows
  # Empirical FPR: unsigned images (the original decoder) tested against every user.
  unsigned = ae.decode(unsigned_lat)
  ident = identify_users(jnp.asarray(ext.logits(unsigned)), jnp.asarray(msgs), FPR)
  out["unsigned"] = {"images": num_unsigned,
                     "false_positives": int(np.asarray(ident.identified).sum()),
                     "max_agreeing": int(np.asarray(ident.agreeing).max())}
  # Quality: FD of LeNet features to real held-out digits (mnist5k only: the photos have no
  # labels to train a feature network on).
  if ae.data == "mnist5k":
    clf = feature_classifier()
    _, _, xh, _ = labelled_split("mnist5k")
    feats = [classifier_features(clf.model, clf.params, im) for im in (xh, signed, original)]
    out["fd_signed"] = float(frechet_distance_from_features(feats[1], feats[0]))
    out["fd_unsigned"] = float(frechet_distance_from_features(feats[2], feats[0]))
  out["model_attacks"] = model_attacks(ext, ae, msgs, sig, lat[:per_user], key)
  out["examples"] = {"signed": signed[:8], "original": original[:8]}
  return out


_CLASSIFIER = []


def feature_classifier():
  """The small digit classifier of wdmjax.metrics, trained once on mnist5k's training split:
  its features are those of the Frechet distance (as in experiments/wdm_mnist5k.py)."""
  if not _CLASSIFIER:
    x, y, _, _ = labelled_split("mnist5k")
    _CLASSIFIER.append(train_classifier(x, y, jax.random.key(0)))
  return _CLASSIFIER[0]


def model_attacks(ext, ae, msgs, sig, lat, key) -> dict:
  """TPR of user 0's message on images of attacked decoders."""
  d0 = runs.load_user_decoder(sig, 0)
  d1 = runs.load_user_decoder(sig, 1)

  def tpr(params):
    logits = jnp.asarray(ext.logits(ae.decode(lat, params)))
    r = detect(logits, jnp.asarray(msgs[0]), FPR)
    return {"tpr": float(np.mean(np.asarray(r.detected))),
            "bit_accuracy": float(np.mean(np.asarray(r.agreeing)) / msgs.shape[1])}

  out = {"signed": tpr(d0), "original decoder": tpr(None),
         "average of users 0 and 1": tpr(jax.tree.map(lambda a, b: (a + b) / 2, d0, d1))}
  x, _, _, _ = labelled_split(ae.data)
  z = ae.encode(x[:2000])
  tx = optax.adamw(1e-4)

  def loss(p, zb, xb):
    return jnp.mean((ae.decoder.apply({"params": p}, zb / ae.scale) - xb) ** 2)

  @jax.jit
  def step(p, s, zb, xb):
    g = jax.grad(loss)(p, zb, xb)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p, s = d0, tx.init(d0)
  rng = np.random.default_rng(0)
  for i in range(1000):
    idx = rng.choice(len(z), 16, replace=False)
    p, s = step(p, s, jnp.asarray(z[idx]), jnp.asarray(x[idx]))
    if i + 1 in (100, 1000):
      out[f"decoder fine-tuned on clean reconstruction, {i + 1} steps"] = tpr(p)
  return out


def markdown(r: dict) -> str:
  emb = r.get("embed", PUBLISHED_EMBED)
  data = r.get("data", "mnist5k")
  lines = [f"# Stable Signature on {data}", "",
           f"{r['users']} users, 48 bits, FPR {FPR:g}. Each user's decoder fine-tuned for "
           f"{emb['steps']} steps of 4 latents, AdamW {emb['lr']:g}, image weight "
           f"{emb['image_weight']:g} (published: 100 steps, 5e-4, 0.2 with Watson-VGG; here "
           f"the distance is (1 - SSIM) + MSE). Device: {r['device']}. Seconds of evaluation: "
           f"{r['seconds']:.0f}.", "", "Summary:", ""]
  def fd(e, long=False):
    if "fd_signed" not in e:
      return "no FD (no labelled features for these images)" if long else "FD not measured"
    if long:
      return (f"FD to real digits: signed {e['fd_signed']:.2f}, unsigned "
              f"{e['fd_unsigned']:.2f}")
    return f"FD signed / unsigned {e['fd_signed'] / e['fd_unsigned']:.3f}"

  for sel, e in r["extractors"].items():
    a = e["attacks"]
    worst = min(a, key=lambda n: a[n]["bit_accuracy"])
    lines.append(f"- extractor ({sel}): unattacked bit accuracy "
                 f"{a['none']['bit_accuracy']:.3f} (target 0.99), TPR @ 1e-6 "
                 f"{a['none']['tpr']:.3f} (target 0.99), identification among {r['users']} "
                 f"{a['none']['identification']:.3f}; crop 0.5 TPR {a['crop 0.5']['tpr']:.3f}, "
                 f"JPEG 80 TPR {a['jpeg 80']['tpr']:.3f} (targets 0.9); worst attack {worst} "
                 f"({a[worst]['bit_accuracy']:.3f}); PSNR {e['psnr']:.2f} dB; {fd(e)}; false "
                 f"positives "
                 f"{e['unsigned']['false_positives']} of {e['unsigned']['images']}.")
  pre_all = r.get("pretraining") or {s: e["pretraining"] for s, e in r["extractors"].items()}
  both = {"uncertainty", "uniform"} <= set(pre_all)
  lines += ["", "The bits are only as readable as the extractor makes them. After "
            "pre-training, the HiDDeN encoder -> attack -> extractor pair reads its own bits on "
            "held-out images at the accuracies below"
            + (" (uncertainty-based and uniform choice of the attack per batch compared from "
               "the same seed):" if both else ":"), ""]
  attacks = list(next(iter(pre_all.values()))["held_out_bit_accuracy"])
  lines += ["| extractor | steps (without attacks) | seconds | " + " | ".join(attacks) + " |",
            "|---|---|---|" + "---|" * len(attacks)]
  for sel, pre in pre_all.items():
    accs = pre["held_out_bit_accuracy"]
    lines.append(f"| {sel} | {pre['steps']} ({pre['warmup_steps']}) | {pre['seconds']:.0f} | "
                 + " | ".join(f"{accs[k]:.3f}" for k in attacks) + " |")
  glob = [n for n, _, pool in VARIANTS if pool == 1 and n in pre_all]
  if glob and any(pool > 1 for n, _, pool in VARIANTS if n in r["extractors"]):
    best = max(pre_all[n]["held_out_bit_accuracy"]["identity"] for n in glob)
    lines += ["", "A grid-pooled extractor reads its bits by where they are, which a crop or a "
              "rotation moves; the published globally pooled ones would read a crop at its own "
              f"size, but here read at best {best:.3f} of their own bits after pre-training."]
  lines.append("")
  for sel, e in r["extractors"].items():
    lines += [f"## Extractor: {sel}", "",
              f"PSNR {e['psnr']:.2f} dB, SSIM {e['ssim']:.4f} against the original decoder; "
              f"{fd(e, long=True)}; "
              f"false positives on {e['unsigned']['images']} unsigned images: "
              f"{e['unsigned']['false_positives']} (most agreeing bits "
              f"{e['unsigned']['max_agreeing']}).", "",
              "| attack | bit accuracy | TPR @ 1e-6 | identified |", "|---|---|---|---|"]
    for name, row in e["attacks"].items():
      lines.append(f"| {name} | {row['bit_accuracy']:.3f} | {row['tpr']:.3f} | "
                   f"{row['identification']:.3f} |")
    lines += ["", "| model attack | bit accuracy | TPR @ 1e-6 |", "|---|---|---|"]
    for name, row in e["model_attacks"].items():
      lines.append(f"| {name} | {row['bit_accuracy']:.3f} | {row['tpr']:.3f} |")
    lines.append("")
  for sel, t in (r.get("tradeoff") or {}).items():
    lines += [f"## Trade-off: extractor {sel}", "",
              f"One decoder fine-tuned at AdamW {t[0]['lr']:g} for a message of key 0, read on "
              "200 generated images (clipped to [-1, 1], as delivered): bits cost PSNR.", "",
              "| image weight | steps | bit accuracy | TPR @ 1e-6 | PSNR (dB) |",
              "|---|---|---|---|---|"]
    for row in t:
      lines.append(f"| {row['image_weight']:g} | {row['steps']} | {row['bit_accuracy']:.3f} | "
                   f"{row['tpr']:.3f} | {row['psnr']:.2f} |")
    lines.append("")
  return "\n".join(lines) + "\n"


def figure(r: dict, path: str) -> None:
  import matplotlib  # plotting only here
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after the backend is chosen

  sels = list(r["extractors"])
  names = list(r["extractors"][sels[0]]["attacks"])
  fig = plt.figure(figsize=(14, 9))
  ax = fig.add_axes([0.06, 0.5, 0.6, 0.44])
  w = 0.8 / (2 * len(sels))
  for i, sel in enumerate(sels):
    e = r["extractors"][sel]["attacks"]
    xs = np.arange(len(names)) + (2 * i - len(sels) + 0.5) * w
    ax.bar(xs, [e[n]["bit_accuracy"] for n in names], w, label=f"bit accuracy ({sel})")
    ax.bar(xs + w, [e[n]["tpr"] for n in names], w, label=f"TPR @ 1e-6 ({sel})")
  ax.set_xticks(np.arange(len(names)), [n.replace(" + ", " +\n") for n in names], rotation=60,
                ha="right", fontsize=8)
  ax.set_ylim(0, 1.05)
  ax.axhline(0.5, color="grey", lw=0.5)
  ax.legend(fontsize=7)
  ax.set_title("Signed images of the latent DiT, under attacks")
  ax3 = fig.add_axes([0.06, 0.05, 0.45, 0.24])
  styles = {0.2: "o-", 1.0: "s--", 3.0: "^:"}
  for c, (sel, t) in enumerate((r.get("tradeoff") or {}).items()):
    for weight in dict.fromkeys(row["image_weight"] for row in t):
      pts = [row for row in t if row["image_weight"] == weight]
      ax3.plot([p["psnr"] for p in pts], [p["bit_accuracy"] for p in pts],
               styles.get(weight, "x-"), color=f"C{c}", label=f"{sel}, image weight {weight:g}")
      for p in pts:
        ax3.annotate(str(p["steps"]), (p["psnr"], p["bit_accuracy"]), fontsize=6)
  ax3.set_xlabel("PSNR to the original decoder (dB)")
  ax3.set_ylabel("bit accuracy")
  ax3.set_title("One user's decoder: fine-tuning steps against image quality", fontsize=9)
  ax3.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
  shown = sels[-1]
  ex = r["extractors"][shown].get("examples")
  if ex is None:
    with np.load(path.removesuffix(".png") + "_examples.npz") as z:
      ex = {k: z[f"{shown}/{k}"] for k in ("signed", "original")}
  signed, original = (np.asarray(ex[k], np.float32) for k in ("signed", "original"))
  if signed.shape[-1] == 1:
    signed, original = signed[..., 0], original[..., 0]
  for j, (lab, im) in enumerate((("original decoder", original), (f"signed ({shown})", signed),
                                 ("10 x difference", np.clip(10 * (signed - original), -1, 1)))):
    a2 = fig.add_axes([0.7, 0.72 - 0.3 * j, 0.28, 0.2])
    a2.imshow((np.concatenate(list(im), axis=1) + 1) / 2, cmap="gray" if im.ndim == 3 else None,
              vmin=0, vmax=1)
    a2.set_title(lab, fontsize=9)
    a2.axis("off")
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data", default="mnist5k", choices=("mnist5k", "photos32"))
  ap.add_argument("--runs", default=None, help="default runs/stable_signature[_photos32]")
  ap.add_argument("--users", type=int, default=100)
  ap.add_argument("--eval-users", type=int, default=20)
  ap.add_argument("--per-user", type=int, default=25)
  ap.add_argument("--unsigned", type=int, default=1000)
  ap.add_argument("--pretrain-steps", type=int, default=3000)
  ap.add_argument("--warmup-steps", type=int, default=1500)
  ap.add_argument("--ldm-steps", type=int, default=1500)
  ap.add_argument("--variants", default=";".join(v[0] for v in VARIANTS),
                  help="the extractors to sign with and evaluate, separated by ';', of: "
                  + "; ".join(v[0] for v in VARIANTS))
  ap.add_argument("--embed-steps", type=int, default=500)
  ap.add_argument("--embed-lr", type=float, default=1e-3)
  ap.add_argument("--image-weight", type=float, default=1.0)
  ap.add_argument("--tradeoff-steps", default=",".join(map(str, TRADEOFF_STEPS)))
  ap.add_argument("--results", default=RESULTS)
  ap.add_argument("--key-file", default=None, help="the owner key the messages come from "
                  "(`wdmjax keygen FILE`; default $WDMJAX_OWNER_KEY_FILE or $WDMJAX_OWNER_KEY)")
  ap.add_argument("--replot", action="store_true", help="redraw the figure and table from "
                  "the JSON only")
  a = ap.parse_args()
  suffix = "" if a.data == "mnist5k" else f"_{a.data}"
  stem = os.path.join(a.results, STEM + suffix)
  a.runs = a.runs or f"runs/stable_signature{suffix}"
  if a.replot:
    r = read_json(stem + ".json")
    if "examples" in next(iter(r["extractors"].values())):  # older files held them in the JSON
      save_examples(r, stem)
    write_json_and_markdown(stem, r, markdown(r))
    figure(r, stem + ".png")
    return
  t0 = time.time()
  variants = [v.strip() for v in a.variants.split(";")]
  known = [v[0] for v in VARIANTS]
  if not variants or any(v not in known for v in variants):
    raise SystemExit(f"--variants: expected names among {known}, got {a.variants!r}")
  embed = {"steps": a.embed_steps, "lr": a.embed_lr, "image_weight": a.image_weight}
  w = build(a.runs, a.data, a.users, a.pretrain_steps, a.warmup_steps, a.ldm_steps, variants,
            embed, a.key_file)
  r = {"device": device_info(), "data": a.data, "users": a.users, "embed": embed,
       "extractors": {},
       "pretraining": {name: {k: v for k, v in meta.items() if k != "history"}
                       for name, pre in w["pres"].items()
                       if (meta := Workdir(pre).read_json("hidden.json")) is not None}}
  # One draw of latents for every decoder: the same images up to the decoder.
  cache = os.path.join(a.runs, f"latents_{a.eval_users}x{a.per_user}_{a.unsigned}.npz")
  if not os.path.exists(cache):
    np.savez(cache, lat=runs.generate(w["ldm"], a.eval_users * a.per_user, seed=11).latents,
             unsigned=runs.generate(w["ldm"], a.unsigned, seed=12).latents)
  with np.load(cache) as z:
    lat, unsigned_lat = z["lat"], z["unsigned"]
  for sel, sig in w["sigs"].items():
    r["extractors"][sel] = evaluate(sig, w["ldm"], lat, unsigned_lat, a.eval_users,
                                    jax.random.key(0), a.key_file)
    meta = Workdir(sig).read_json("hidden.json")
    r["extractors"][sel]["pretraining"] = {k: v for k, v in meta.items() if k != "history"}
  # The steps / image quality trade-off of every pre-trained extractor, one decoder each.
  r["tradeoff"] = {name: tradeoff(pre, w["ldm"], lat[:200], PUBLISHED_EMBED["lr"],
                                  tuple(int(v) for v in a.tradeoff_steps.split(",")))
                   for name, pre in w["pres"].items()
                   if os.path.exists(os.path.join(pre, "extractor.npz"))}
  r["seconds"] = time.time() - t0
  os.makedirs(a.results, exist_ok=True)
  save_examples(r, stem)
  write_json_and_markdown(stem, r, markdown(r))
  figure(r, stem + ".png")
  print(markdown(r))


def save_examples(r: dict, stem: str) -> None:
  """Moves the example images out of `r` into stem_examples.npz (float16)."""
  arrays = {}
  for sel, e in r["extractors"].items():
    for k, v in e.pop("examples").items():
      arrays[f"{sel}/{k}"] = np.asarray(v, np.float16)
  np.savez_compressed(stem + "_examples.npz", **arrays)


if __name__ == "__main__":
  main()
