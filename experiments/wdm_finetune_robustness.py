"""Does the mnist5k WDM watermark survive a thief's clean fine-tuning, and what makes it?

  python experiments/wdm_finetune_robustness.py [--runs runs/wdm_ft] [--only NAME ...]
                                               [--stage diagnose|variants|final|all]
                                               [--num-fd 500] [--replot]

Stages (each keeps what earlier runs wrote in experiments/results/wdm_finetune_robustness.json;
`--only` reruns the named entries):
  diagnose  the current embedding (experiments/robustness_wdm.py's secret, 600 steps at lr
            3e-4) under clean fine-tuning: full at lr 1e-5 to 3e-4, DiffFit and LoRA; the
            watermark's survival (bits agreeing, log10 p: the majority test on 16 extracted
            samples; the vote, soft and best-sample tests on 128) against fine-tuning
            steps, how far the weights move, and which parameter groups carry the watermark
            (resetting each group of the watermarked model to the base, and restoring each
            group of the attacked model to the watermarked one).
  variants  each embedding variant of `VARIANTS` under the attack `finetune` (full, lr 1e-4,
            batch 48, fresh AdamW as `wdmjax attack finetune:N` runs it) up to 1,000 steps.
  final     the winning variant (`WINNER`) and the current embedding under full, DiffFit and
            LoRA fine-tuning at 1,000 steps and the robustness experiment's other attacks,
            with task FD and the wrong-trigger and clean-base checks.
Every fine-tune is a real `wdmjax.peft.finetune` run whose checkpoints are kept and verified
in turn. Writes experiments/results/wdm_finetune_robustness.{json,md,png} (and, from the
final stage, wdm_finetune_robustness_samples.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from wdm_mnist5k import LR, TaskQuality, device_info, write_json_and_markdown

from wdmjax.configs import apply_override, validate
from wdmjax.data import InputPipeline
from wdmjax.files import atomic_open
from wdmjax.peft import PeftSpec, finetune, load_finetuned
from wdmjax.runs import attack_model, base_workdir, embed, load_model
from wdmjax.runs.watermark import extract_samples, image_shape
from wdmjax.train import setup
from wdmjax.train.images import make_grid, save_panels
from wdmjax.watermark import Secret, best_sample_test, keyed_test, soft_keyed_test, wdp_loss
from wdmjax.watermark.robust import RobustSpec
from wdmjax.workdir import Workdir

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STEM = os.path.join(RESULTS, "wdm_finetune_robustness")
SECRET = Secret(trigger="random:1", watermark="keyed:7", key=42, gamma1=0.8, gamma2=0.1,
                block=4)
EMBED_STEPS = 600
NUM_VOTE = 16  # the samples of the majority test (as `wdmjax verify`)
NUM_MANY = 128  # the samples of the soft and best-sample tests
EVERY = 50  # fine-tuning checkpoints kept and verified
EVAL_STEPS = (50, 100, 250, 500, 1000)
ATTACK_LR = {"full": 1e-4, "difffit": 1e-3, "lora": 1e-3}
# the diagnosis's fine-tunes: (strategy, lr, steps)
# (the first one's step-250 model is the reset analysis's attacked model)
DIAGNOSE = [("full", 1e-4, 1000), ("difffit", 1e-3, 1000), ("lora", 1e-3, 1000),
            ("full", 3e-4, 1000), ("full", 1e-5, 1000), ("full", 3e-5, 1000),
            ("full", 1e-4, 2000)]


@dataclasses.dataclass(frozen=True)
class Variant:
  """One way of embedding: the secret's fields, the embedding's steps and options."""
  note: str
  steps: int = EMBED_STEPS
  trigger: str = SECRET.trigger
  gamma1: float = SECRET.gamma1
  gamma2: float = SECRET.gamma2
  decoy_fraction: float = 0.5
  robust: RobustSpec | None = None

  @property
  def secret(self) -> Secret:
    return dataclasses.replace(SECRET, trigger=self.trigger, gamma1=self.gamma1,
                               gamma2=self.gamma2)


VARIANTS = {
  "current": Variant("robustness_wdm's embedding"),
  "long": Variant("(a) 4x longer embedding", steps=2400),
  "gamma2_1": Variant("(a) gamma2 1", gamma2=1.0),
  "gamma2_1_no_decoys": Variant("(a) gamma2 1, no decoys", gamma2=1.0, decoy_fraction=0.0),
  "gamma1_0.5": Variant("(b) a 2.5x stronger trigger shift, gamma1 0.5", gamma1=0.5),
  "stripes": Variant("(b) a column trigger (low vertical frequency)", trigger="stripes:1"),
  "finetune_aware_3e-3": Variant("(d) fine-tuning-aware, a 3x larger simulated update "
                                 "(lr 3e-3)", robust=RobustSpec("finetune", steps=1, lr=3e-3)),
  "finetune_aware": Variant("(d) fine-tuning-aware: one simulated fresh-AdamW update at lr "
                            "1e-3 inside the loss, first order",
                            robust=RobustSpec("finetune", steps=1, lr=1e-3)),
  "surgery": Variant("(f) gradient surgery: the watermark's gradient projected off the "
                     "task's where they conflict", robust=RobustSpec("surgery")),
  "gamma1_0.3": Variant("(b) a still stronger trigger shift, gamma1 0.3", gamma1=0.3),
  "gamma1_0.5_finetune_aware": Variant("(b)+(d) gamma1 0.5 and the fine-tuning-aware loss "
                                       "at lr 3e-3", gamma1=0.5,
                                       robust=RobustSpec("finetune", steps=1, lr=3e-3)),
  "fisher": Variant("(e) task-Fisher anchor to the base, strength 1e-3",
                    robust=RobustSpec("fisher", weight=1e-3)),
}


# ----------------------------------------------------------------------------- measuring


def evaluate(cfg, params, secret: Secret, seed: int = 0) -> tuple[dict, np.ndarray]:
  """The majority test on NUM_VOTE samples (as `wdmjax verify`), and the majority, soft and
  best-sample tests on NUM_MANY (the first NUM_VOTE of them included); and the samples."""
  trigger, watermark, _ = secret.images(image_shape(cfg), None)
  samples = extract_samples(cfg, params, trigger, secret.gamma1, NUM_MANY, seed=seed)
  vote = keyed_test(samples[:NUM_VOTE], watermark, secret.key, secret.block)
  many = keyed_test(samples, watermark, secret.key, secret.block)
  soft = soft_keyed_test(samples, watermark, secret.key, secret.block)
  best = best_sample_test(samples, watermark, secret.key, secret.block)
  whole = np.asarray(best["sample_agreements"]) >= 45
  return {"bits": vote["agreeing_bits"], "n": vote["bits"], "log10_p": vote["log10_p_value"],
          "bits_many": many["agreeing_bits"], "log10_p_many": many["log10_p_value"],
          "soft_agreement": soft["bit_agreement"], "soft_log10_p": soft["log10_p_value"],
          "best_bits": best["agreeing_bits"], "best_log10_p": best["log10_p_value"],
          "whole_share": float(whole.mean())}, samples


def distance(a, b) -> float:
  return float(math.sqrt(sum(float(jnp.sum((x - y) ** 2))
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                             strict=True))))


def group_of(path: tuple[str, ...]) -> str:
  """The parameter group a leaf belongs to: a block, an embedder or the final layer."""
  return path[0]


def kind_of(path: tuple[str, ...]) -> str:
  """The kind of a leaf: attention, MLP, adaLN modulation, an embedder or a scale/bias."""
  name = "/".join(path)
  if path[-1] == "bias" or path[-1].startswith("gamma"):
    return "biases+gammas"
  for k in ("attn", "mlp", "adaLN", "embed"):
    if k in name:
      return k
  return "other"


def mix(target, source, pick) -> dict:
  """`target` with the leaves whose path satisfies `pick` taken from `source`."""
  t, s = traverse_util.flatten_dict(target), traverse_util.flatten_dict(source)
  return traverse_util.unflatten_dict({k: s[k] if pick(k) else v for k, v in t.items()})


def attack_workdir(wm: str, strategy: str, lr: float, steps: int, seed: int = 0
                   ) -> tuple[str, float]:
  """Fine-tunes the model of `wm` on clean data (as `wdmjax attack finetune:N`, keeping a
  checkpoint every EVERY steps) into `WM_ft/`; returns its workdir and the seconds it took
  (nan: kept)."""
  out = os.path.join(f"{wm.rstrip(os.sep)}_ft", f"{strategy}_{lr:g}_{steps}_s{seed}")
  if Workdir(out).exists(Workdir.SUMMARY):
    return out, float("nan")
  cfg = Workdir(wm).read_config()
  for o in (f"train.steps={steps}", f"train.lr={lr!r}", "train.warmup_steps=0",
            "train.sample_every=0", f"train.seed={seed}", f"train.ckpt_every={EVERY}",
            f"train.keep_checkpoints={steps // EVERY + 1}"):
    apply_override(cfg, o)
  t0 = time.time()
  finetune(validate(cfg), out, wm, load_model(wm).params, PeftSpec(strategy), progress=True)
  return out, time.time() - t0


def cosine(a, b) -> float:
  dot = sum(float(jnp.sum(x * y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                  strict=True))
  norm = lambda t: math.sqrt(sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(t)))  # noqa: E731
  return dot / max(norm(a) * norm(b), 1e-30)


def survival_curve(wm: str, secret: Secret, strategy: str, lr: float, steps: int,
                   keep: dict | None = None, base_params=None) -> dict:
  """The watermark's survival along one fine-tune: per evaluated step, the tests and the
  weights' distance from the watermarked model (and, given `base_params`, the cosine
  between the fine-tune's move and the way back to the base). `keep[step] = params` gets
  the params."""
  out, seconds = attack_workdir(wm, strategy, lr, steps)
  cfg, wm_params = load_model(wm)
  rows = []
  for step in [s for s in (*EVAL_STEPS, 2000) if s <= steps]:
    _, params = load_finetuned(out, wm_params, step=step)
    row, _ = evaluate(cfg, params, secret)
    row.update(step=step, moved=distance(params, wm_params))
    if base_params is not None:
      sub = lambda a, b: jax.tree.map(jnp.subtract, a, b)  # noqa: E731
      row["cos_to_base"] = cosine(sub(params, wm_params), sub(base_params, wm_params))
    rows.append(row)
    print(f"  {strategy} lr {lr:g} step {step}: {row['bits']}/{row['n']} bits, "
          f"log10 p {row['log10_p']:.2f}, soft {row['soft_log10_p']:.2f}, best "
          f"{row['best_log10_p']:.2f} ({100 * row['whole_share']:.0f}% whole)", flush=True)
    if keep is not None:
      keep[step] = params
  return {"strategy": strategy, "lr": lr, "steps": steps, "seconds": seconds, "rows": rows}


# ----------------------------------------------------------------------------- stages


def embed_variant(runs: str, base: str, name: str, v: Variant) -> tuple[str, float]:
  """The variant's watermarked workdir (embedded unless kept) and its embedding time: the
  median seconds per step of its metrics log times its steps (an interrupted and resumed
  run's pause does not count)."""
  wm = os.path.join(runs, f"wm_{name}")
  embed(wm, v.secret, base=base, steps=v.steps, lr=LR, decoy_fraction=v.decoy_fraction,
        robust=v.robust, overrides=["train.sample_every=0"], log=print)
  return wm, embed_seconds(wm, v.steps)


def embed_seconds(wm: str, steps: int) -> float:
  """The median seconds per step of `wm`'s metrics log, times `steps`."""
  with open(Workdir(wm).file(Workdir.METRICS)) as f:
    rows = [json.loads(line) for line in f]
  rates = [(b["time"] - a["time"]) / (b["step"] - a["step"])
           for a, b in zip(rows, rows[1:], strict=False)]
  return float(np.median(rates)) * steps if rates else float("nan")


def diagnose(runs: str, base: str, res: dict, deadline: float) -> None:
  wm, seconds = embed_variant(runs, base, "current", VARIANTS["current"])
  cfg, wm_params = load_model(wm)
  base_params = load_model(base).params
  unattacked, _ = evaluate(cfg, wm_params, SECRET)
  d = res.get("diagnose") or {}
  d.update(embed_seconds=seconds, unattacked=unattacked,
           embedding_distance=distance(wm_params, base_params))
  d["curves"], old = [], {(c["strategy"], c["lr"], c["steps"]): c for c in d.get("curves", [])}
  # the final stage's fine-tunes of the current embedding are the same runs and tests
  old.update({(c["strategy"], c["lr"], c["steps"]): c for c in
              ((res.get("final") or {}).get("current") or {}).get("finetunes", {}).values()})
  for i, (strategy, lr, steps) in enumerate(DIAGNOSE):
    # the first curve's kept models feed the reset and gradient analyses: redone with them
    if (strategy, lr, steps) in old and (i > 0 or ("resets" in d and "gradients" in d)):
      d["curves"].append(old[strategy, lr, steps])
      continue
    kept: dict[int, dict] = {}
    d["curves"].append(survival_curve(wm, SECRET, strategy, lr, steps, kept,
                                      base_params))
    if i == 0:
      d["resets"] = resets(cfg, wm_params, base_params, kept.get(250))
      d["gradients"] = gradients(cfg, {"base": base_params, "watermarked": wm_params,
                                       "finetuned_250": kept[250], "finetuned_1000": kept[1000]},
                                 SECRET)
    res["diagnose"] = d
    write(res)
    if time.time() > deadline:
      print("diagnose: stopping at the deadline; rerun to continue")
      return


def gradients(cfg, params: dict, secret: Secret, batches: int = 16) -> dict:
  """The clean task's loss and mean gradient over `batches` training batches (the first
  batches of a fine-tune) at each of `params` (name -> weights), and, for each, the cosine
  between that task gradient and the watermark loss's: a model at a compromise of the two
  has a task gradient that points against the watermark, and a fresh optimizer follows it."""
  su = setup(cfg)
  data = InputPipeline(cfg.data.name, batch_size=cfg.train.batch_size,
                       resolution=cfg.data.resolution, channels=cfg.data.channels, seed=0,
                       labels=cfg.data.labels, split=cfg.data.split)
  trigger, _, targets = secret.images(image_shape(cfg), None)
  wm_loss = wdp_loss(su.apply_fn, su.schedule, cfg.diffusion.objective, trigger=trigger,
                     watermark=targets, gamma1=secret.gamma1, gamma2=1.0,
                     class_dropout_prob=su.class_dropout_prob, null_label=su.null_label,
                     num_classes=su.num_classes, task=False, decoy_fraction=0.5,
                     decoy_kind="pixels", decoy_t_min=0.2)
  task = su.loss()
  grad = jax.jit(lambda p, b, r, which: jax.value_and_grad(
    lambda q: (task if which == "task" else wm_loss)(q, b, r)[0])(p), static_argnums=3)
  out = {}
  for name, p in params.items():
    acc = {}
    for which in ("task", "watermark"):
      total, loss = None, 0.0
      for i in range(batches):
        b = jax.tree.map(jnp.asarray, data.batch(i))
        v, g = grad(p, b, jax.random.PRNGKey(i), which)
        loss += float(v) / batches
        total = g if total is None else jax.tree.map(jnp.add, total, g)
      acc[which] = (loss, jax.tree.map(lambda x: x / batches, total))
    g_t, g_w = acc["task"][1], acc["watermark"][1]
    norm = lambda t: math.sqrt(sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(t)))  # noqa: E731
    out[name] = {"task_loss": acc["task"][0], "watermark_loss": acc["watermark"][0],
                 "task_grad_norm": norm(g_t), "watermark_grad_norm": norm(g_w),
                 "cos_task_watermark": cosine(g_t, g_w)}
    print(f"  gradients at {name}: {out[name]}", flush=True)
  return out


def resets(cfg, wm_params, base_params, attacked) -> list[dict]:
  """Which groups carry the watermark (reset to the base), and whose drift under
  fine-tuning erases it (restored to the watermarked values in `attacked`)."""
  flat = traverse_util.flatten_dict(wm_params)
  groups = sorted({group_of(k) for k in flat})
  kinds = sorted({kind_of(k) for k in flat})
  out = []
  for label, pick in ([(g, lambda k, g=g: group_of(k) == g) for g in groups]
                      + [(f"all {c}", lambda k, c=c: kind_of(k) == c) for c in kinds]):
    row = {"group": label, "size": int(sum(v.size for k, v in flat.items() if pick(k)))}
    r, _ = evaluate(cfg, mix(wm_params, base_params, pick), SECRET)
    row["reset_to_base"] = r
    if attacked is not None:
      r, _ = evaluate(cfg, mix(attacked, wm_params, pick), SECRET)
      row["restored_after_250"] = r
      row["moved_250"] = distance(
        {k: v for k, v in traverse_util.flatten_dict(attacked).items() if pick(k)},
        {k: v for k, v in flat.items() if pick(k)})
    row["embedding_moved"] = distance(
      {k: v for k, v in flat.items() if pick(k)},
      {k: v for k, v in traverse_util.flatten_dict(base_params).items() if pick(k)})
    out.append(row)
    print(f"  {label}: reset {row['reset_to_base']['bits']}/49, restored "
          f"{row.get('restored_after_250', {}).get('bits')}/49", flush=True)
  return out


def variants(runs: str, base: str, res: dict, only: list[str] | None) -> None:
  res.setdefault("variants", {})
  for name in only or VARIANTS:
    v = VARIANTS[name]
    if name in res["variants"] and not only:
      continue
    wm, seconds = embed_variant(runs, base, name, v)
    cfg, params = load_model(wm)
    entry = {**dataclasses.asdict(v), "embed_seconds": seconds,
             "unattacked": evaluate(cfg, params, v.secret)[0],
             "curve": survival_curve(wm, v.secret, "full", ATTACK_LR["full"], 1000)}
    res["variants"][name] = entry
    write(res)


WINNER = "gamma1_0.5_finetune_aware"  # README: `embed --gamma1 0.5 --robust finetune`
FINAL_ATTACKS = ["prune:0.3", "noise:0.01", "quantize:int8", "dropout:0.1", "steps:25",
                 "steps:100"]
WRONG_TRIGGER = "random:2"


def final(runs: str, base: str, res: dict, names: list[str], num_fd: int) -> None:
  """The named variants (the current embedding last) against every fine-tune at 1,000
  steps and the other attacks, with task FD, the wrong-trigger and the clean-base checks."""
  import wdm_mnist5k

  wdm_mnist5k.NUM_FD = num_fd
  cfg, base_params = load_model(base)
  quality = TaskQuality(cfg)
  f = res.setdefault("final", {})
  f["num_fd"] = num_fd
  clean = os.path.join(runs, "clean_finetune")
  wdm_mnist5k.clean_finetune(base, clean, EMBED_STEPS)
  f["fd_base"] = quality.fd(cfg, base_params)[0]
  f["fd_clean_finetune"] = quality.fd(*load_model(clean))[0]
  out, _ = attack_workdir(base, "full", ATTACK_LR["full"], 1000)
  base_attacked = load_finetuned(out, base_params)[1]
  f["fd_clean_base_finetune_1000"] = quality.fd(cfg, base_attacked)[0]
  f["clean_base"] = {"unattacked": evaluate(cfg, base_params, SECRET)[0],
                     "finetune_1000": evaluate(cfg, base_attacked, SECRET)[0]}
  print(f"FD: base {f['fd_base']:.2f}, clean fine-tune {f['fd_clean_finetune']:.2f}, clean "
        f"base after finetune:1000 {f['fd_clean_base_finetune_1000']:.2f}", flush=True)
  write(res)
  for name in names:
    v = VARIANTS[name]
    wm, _ = embed_variant(runs, base, name, v)
    cfg, params = load_model(wm)
    wrong = dataclasses.replace(v.secret, trigger=WRONG_TRIGGER)
    e = {"fd": quality.fd(cfg, params)[0], "unattacked": evaluate(cfg, params, v.secret)[0],
         "wrong_trigger": evaluate(cfg, params, wrong)[0], "finetunes": {}, "attacks": {}}
    attacked_by = {}
    for strategy in ("full", "difffit", "lora"):
      curve = survival_curve(wm, v.secret, strategy, ATTACK_LR[strategy], 1000)
      out, _ = attack_workdir(wm, strategy, ATTACK_LR[strategy], 1000)
      attacked = load_finetuned(out, params)[1]
      attacked_by[strategy] = attacked
      curve["fd"] = quality.fd(cfg, attacked)[0]
      curve["wrong_trigger"] = evaluate(cfg, attacked, wrong)[0]
      e["finetunes"][strategy] = curve
      f[name] = e
      write(res)
    if name == names[0]:
      samples_figure(cfg, params, attacked_by["full"], v.secret)
    for spec in FINAL_ATTACKS:
      a_cfg, a_params = attack_model(cfg, params, [spec], seed=0)
      e["attacks"][spec] = {**evaluate(a_cfg, a_params, v.secret)[0],
                            "fd": quality.fd(a_cfg, a_params)[0]}
      print(f"  {name} {spec}: {e['attacks'][spec]['bits']}/49", flush=True)
    f[name] = e
    write(res)


def samples_figure(cfg, params, attacked, secret: Secret) -> None:
  """What the verifier sees: the learned target (the watermark's blocks XOR the key's
  mask), then 16 extracted samples of the watermarked model, and of it after finetune:1000
  the first 16 and the 16 that agree best."""
  _, watermark, targets = secret.images(image_shape(cfg), None)
  _, before = evaluate(cfg, params, secret)
  _, after = evaluate(cfg, attacked, secret)
  agree = best_sample_test(after, watermark, secret.key, secret.block)["sample_agreements"]
  best = np.argsort(-np.asarray(agree), kind="stable")[:NUM_VOTE]
  panels = [("target", make_grid(np.asarray(targets)[:1], upscale=3)),
            ("unattacked", make_grid(before[:NUM_VOTE], nrow=4, upscale=3)),
            ("finetune:1000", make_grid(after[:NUM_VOTE], nrow=4, upscale=3)),
            ("finetune:1000, best 16", make_grid(after[best], nrow=4, upscale=3))]
  save_panels(panels, STEM + "_samples.png")


# ----------------------------------------------------------------------------- results


def write(res: dict) -> None:
  write_json_and_markdown(STEM, res, markdown(res))
  plot(STEM + ".png", res)


def markdown(res: dict) -> str:
  lines = ["# A WDM watermark under clean fine-tuning", "",
           f"`python experiments/wdm_finetune_robustness.py` ({res.get('backend')}, "
           f"{res.get('device')}, jax {res.get('jax')}).", ""]
  d = res.get("diagnose")
  if d:
    u = d["unattacked"]
    lines += ["## Diagnosis: the current embedding", "",
              f"Unattacked: {u['bits']}/{u['n']} bits (log10 p {u['log10_p']:.2f}), soft "
              f"log10 p {u['soft_log10_p']:.2f}. Embedding moved the weights by "
              f"{d['embedding_distance']:.3f} (L2).", "",
              f"Columns: the majority vote of {NUM_VOTE} samples (as `wdmjax verify`); on "
              f"{NUM_MANY} samples the vote, the soft test and the best-sample test, and the "
              "share of samples that still show the watermark whole (>= 45 of 49 bits); the "
              "distance the weights moved and the cosine of that move with the way back to "
              "the base.", "",
              f"| fine-tune | lr | step | vote {NUM_VOTE}: bits, log10 p | vote {NUM_MANY} | "
              f"soft {NUM_MANY} | best {NUM_MANY} | whole | L2 from watermarked | cos to the "
              "base |", "|---" * 10 + "|"]
    for c in d["curves"]:
      for r in c["rows"]:
        lines.append(f"| {c['strategy']} | {c['lr']:g} | {r['step']} | {r['bits']}/{r['n']}, "
                     f"{r['log10_p']:.2f} | {r['bits_many']}/{r['n']}, {r['log10_p_many']:.2f} | "
                     f"{r['soft_log10_p']:.2f} | {r['best_log10_p']:.2f} | "
                     f"{100 * r['whole_share']:.0f}% | {r['moved']:.3f} | "
                     + (f"{r['cos_to_base']:.3f} |" if "cos_to_base" in r else "- |"))
    if d.get("resets"):
      lines += ["", "Which parameters carry the watermark: bits agreeing (16 samples) after "
                "resetting a group of the watermarked model to the base, and after restoring "
                "a group of the model fine-tuned 250 steps (full, lr 1e-4) to its watermarked "
                "values.", "",
                "| group | parameters | L2 moved by embedding | reset to base | L2 moved by "
                "fine-tuning | restored after 250 |", "|---|---|---|---|---|---|"]
      for r in d["resets"]:
        rest = r.get("restored_after_250")
        lines.append(f"| {r['group']} | {r['size']:,} | {r['embedding_moved']:.3f} | "
                     f"{r['reset_to_base']['bits']}/49 | {r.get('moved_250', float('nan')):.3f}"
                     f" | {rest['bits'] if rest else '-'}/49 |")
  if d and d.get("gradients"):
    lines += ["", "The clean task's mean gradient (16 batches) and the watermark loss's "
              "(gamma2 = 1), and the cosine between them:", "",
              "| weights | task loss | task grad norm | watermark loss | watermark grad norm | "
              "cos(task, watermark) |", "|---" * 6 + "|"]
    for name, g in d["gradients"].items():
      lines.append(f"| {name} | {g['task_loss']:.4f} | {g['task_grad_norm']:.4f} | "
                   f"{g['watermark_loss']:.4f} | {g['watermark_grad_norm']:.4f} | "
                   f"{g['cos_task_watermark']:.3f} |")
  if res.get("variants"):
    lines += ["", "## Embedding variants under full fine-tuning at lr 1e-4", "",
              f"Cells: log10 p of the vote ({NUM_VOTE} samples) / the soft test / the "
              f"best-sample test ({NUM_MANY} samples), and the share of samples that show the "
              "watermark whole. Embed s: the median seconds per step of the embedding's log "
              "times its steps (the runs shared the 2 cores with other jobs: a rough cost; "
              "the ratio to `current` is the guard's).", "",
              "| variant | what | embed s | unattacked | " + " | ".join(
                f"step {s}" for s in EVAL_STEPS) + " |", "|---" * (4 + len(EVAL_STEPS)) + "|"]
    for name, e in res["variants"].items():
      cells = {r["step"]: f"{r['log10_p']:.1f} / {r['soft_log10_p']:.1f} / "
                          f"{r['best_log10_p']:.1f} ({100 * r['whole_share']:.0f}%)"
               for r in e["curve"]["rows"]}
      u = e["unattacked"]
      lines.append(f"| {name} | {e['note']} | {e['embed_seconds']:.0f} | {u['bits']}/49, "
                   f"{u['log10_p']:.1f} ({100 * u['whole_share']:.0f}%) | "
                   + " | ".join(cells.get(s, "-") for s in EVAL_STEPS) + " |")
  f = res.get("final")
  if f and any(isinstance(e, dict) and "finetunes" in e for e in f.values()):
    lines += ["", "## The winner against the current embedding", "",
              f"FD ({f['num_fd']} guided samples): base {f['fd_base']:.2f}, clean fine-tune "
              f"({EMBED_STEPS} steps at lr {LR:g}) {f['fd_clean_finetune']:.2f}, clean base "
              f"after finetune:1000 {f['fd_clean_base_finetune_1000']:.2f}. The clean base "
              "tested with the secret: " + ", ".join(
                f"{k} {r['bits']}/49, log10 p {r['log10_p']:.2f} (soft {r['soft_log10_p']:.2f},"
                f" best {r['best_log10_p']:.2f})" for k, r in f["clean_base"].items()) + ".", "",
              f"Tests as above: the vote of {NUM_VOTE} samples, and the soft and best-sample "
              f"tests on {NUM_MANY}. The wrong trigger ({WRONG_TRIGGER}) is tested with the "
              "best-sample test (the one that verifies furthest). FD ratios: the watermarked "
              "model's to the clean fine-tune's; after a fine-tune, to the clean base's after "
              "the same fine-tune; after another attack, to the unattacked watermarked model's.",
              "",
              "| variant | FD / clean fine-tune | unattacked | wrong trigger, best log10 p | "
              "attack | vote: bits, log10 p | soft log10 p | best log10 p (whole) | wrong "
              "trigger after | FD ratio after |", "|---" * 10 + "|"]
    for name, e in f.items():
      if not (isinstance(e, dict) and "finetunes" in e):
        continue
      u, w = e["unattacked"], e["wrong_trigger"]
      head = (f"| {name} | {e['fd'] / f['fd_clean_finetune']:.2f} | {u['bits']}/49, "
              f"{u['log10_p']:.1f} | {w['best_log10_p']:.1f} ")

      def cells(r):
        return (f"{r['bits']}/49, {r['log10_p']:.2f} | {r['soft_log10_p']:.2f} | "
                f"{r['best_log10_p']:.2f} ({100 * r['whole_share']:.0f}%)")

      for strategy, c in e["finetunes"].items():
        fd_ratio = c["fd"] / f["fd_clean_base_finetune_1000"]
        lines.append(head + f"| {strategy}:1000 at lr {c['lr']:g} | {cells(c['rows'][-1])} | "
                     f"{c['wrong_trigger']['best_log10_p']:.2f} | {fd_ratio:.2f} |")
      for spec, r in e["attacks"].items():
        lines.append(head + f"| {spec} | {cells(r)} | - | {r['fd'] / e['fd']:.2f} |")
    if not all(e["attacks"] for e in f.values() if isinstance(e, dict) and "attacks" in e):
      lines += ["", "A variant without attack rows was stopped before them (the current "
                "embedding's recipe under those attacks: `robustness_wdm.md`)."]
  lines += ["", f"Figure `wdm_finetune_robustness.png`: log10 p of the vote of {NUM_VOTE} "
            f"samples (top) and of the best-sample test on {NUM_MANY} (bottom) against "
            "fine-tuning steps, per fine-tune of the current embedding (left) and per "
            "embedding variant (right); the dashed line is the 1e-6 threshold."]
  if f:
    lines += ["", "Figure `wdm_finetune_robustness_samples.png`: what the verifier sees for the "
              f"winner ({WINNER}): the learned target (the watermark's blocks XOR the key's mask), "
              f"{NUM_VOTE} extracted samples of the "
              f"watermarked model, and after finetune:1000 the first {NUM_VOTE} and the "
              f"{NUM_VOTE} that agree best."]
  lines += [""]
  return "\n".join(lines)


def plot(path: str, res: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
  d = res.get("diagnose") or {}
  series = [(0, f"{c['strategy']} lr {c['lr']:g}", d.get("unattacked"), c["rows"])
            for c in d.get("curves", [])]
  series += [(1, name, e["unattacked"], e["curve"]["rows"])
             for name, e in (res.get("variants") or {}).items()]
  for col, label, start, rows in series:
    steps = [0] + [r["step"] for r in rows]
    for row, key in enumerate(("log10_p", "best_log10_p")):
      axes[row, col].plot(steps, [start[key]] + [r[key] for r in rows], "o-", ms=3,
                          label=label)
  titles = ("current embedding, by fine-tune", "embedding variants, full fine-tune lr 1e-4")
  for row, test in enumerate((f"vote, {NUM_VOTE} samples", f"best sample of {NUM_MANY}")):
    for col in range(2):
      ax = axes[row, col]
      ax.axhline(-6, ls="--", c="gray")
      ax.set_xscale("symlog", linthresh=50)
      ax.set_ylabel(f"log10 p ({test})")
      if row == 0:
        ax.set_title(titles[col])
      else:
        ax.set_xlabel("fine-tuning steps")
      if ax.lines[1:]:
        ax.legend(fontsize=7)
  fig.tight_layout()
  with atomic_open(path) as f:
    fig.savefig(f, format="png", dpi=90)
  plt.close(fig)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--runs", default="runs/wdm_ft")
  ap.add_argument("--stage", default="all", choices=["diagnose", "variants", "final", "all"])
  ap.add_argument("--only", nargs="*", default=None)
  ap.add_argument("--num-fd", type=int, default=500)
  ap.add_argument("--replot", action="store_true")
  ap.add_argument("--minutes", type=float, default=math.inf,
                  help="start no new diagnosis fine-tune after this long (rerun to go on)")
  args = ap.parse_args()
  res = {}
  if os.path.exists(STEM + ".json"):
    with open(STEM + ".json") as f:
      res = json.load(f)
  if args.replot:  # the embedding times come from the kept workdirs' metrics logs
    for name, e in (res.get("variants") or {}).items():
      wm = os.path.join(args.runs, f"wm_{name}")
      if os.path.exists(Workdir(wm).file(Workdir.METRICS)):
        e["embed_seconds"] = embed_seconds(wm, e["steps"])
    write(res)
    return
  res.update(device_info())
  base = base_workdir(os.path.join(args.runs, "mnist5k_base"), False, None, log=print).path
  if args.stage in ("diagnose", "all"):
    diagnose(args.runs, base, res, time.time() + 60 * args.minutes)
  if args.stage in ("variants", "all"):
    variants(args.runs, base, res, args.only if args.stage == "variants" else None)
  if args.stage in ("final", "all"):
    # the winner first: its entry is written before the current embedding's comparison runs
    names = (args.only if args.stage == "final" and args.only else [WINNER])
    final(args.runs, base, res, [*names, *(["current"] if "current" not in names else [])],
          args.num_fd)


if __name__ == "__main__":
  main()
