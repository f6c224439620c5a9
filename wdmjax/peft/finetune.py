"""Parameter-efficient fine-tuning of a trained workdir, and loading such a fine-tune back.

`finetune` splits the base model's (EMA) parameters by strategy, trains the trainable part
only (see `wdmjax.train.make_train_step`'s `frozen`), and leaves in the workdir:
  peft.json    the strategy, the base workdir and its parameters' content hash, the counts;
  checkpoints/ Orbax checkpoints of the trainable state only (resumable; already a delta);
  delta.npz    the trainable EMA leaves, float32: the patch that `apply_delta` puts onto
               the base.
`load_finetuned` (called by `wdmjax.train.load_trained` for such a workdir) rebuilds the
full parameters from the base and refuses a base whose contents changed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import chex
import jax
import ml_collections

from wdmjax.errors import WdmjaxError, check
from wdmjax.peft.delta import check_base, load_delta, params_hash, save_delta
from wdmjax.peft.labels import check_strategy, count_trainable, param_labels
from wdmjax.peft.lora import apply_lora, init_lora
from wdmjax.peft.partition import merge, split
from wdmjax.train.checkpoint import has_checkpoint

PEFT_FILE = "peft.json"
DELTA_FILE = "delta.npz"
LR_MULT = 10.0  # the DiffFit paper fine-tunes at 10x the pre-training learning rate


@dataclasses.dataclass(frozen=True)
class PeftSpec:
  """What a fine-tune trains: `strategy` in STRATEGIES; DiffFit's `gamma_blocks` (None: the
  first half of the blocks); LoRA's `lora_rank` and `lora_alpha` (None: alpha = rank)."""

  strategy: str = "difffit"
  gamma_blocks: int | None = None
  lora_rank: int = 4
  lora_alpha: float | None = None

  def __post_init__(self):
    check_strategy(self.strategy)


def combine_params(trainable: chex.ArrayTree, frozen: chex.ArrayTree,
                   lora_alpha: float | None = None) -> chex.ArrayTree:
  """The network's parameters: the two parts merged, LoRA adapters (if any) folded in."""
  return apply_lora(merge(trainable, frozen), lora_alpha)


def prepare(spec: PeftSpec, base_params: chex.ArrayTree, rng: chex.PRNGKey | None = None
            ) -> tuple[dict, dict, chex.ArrayTree, functools.partial]:
  """(trainable, frozen, labels, combine) for fine-tuning `base_params` by `spec`."""
  params = base_params
  if spec.strategy == "lora":
    rng = jax.random.PRNGKey(0) if rng is None else rng
    params = {**params, **init_lora(rng, params, spec.lora_rank)}
  labels = param_labels(params, spec.strategy, spec.gamma_blocks)
  trainable, frozen = split(params, labels)
  return trainable, frozen, labels, functools.partial(combine_params,
                                                      lora_alpha=spec.lora_alpha)


def count(model_cfg, spec: PeftSpec) -> dict:
  """Trainable and total parameter counts of a model config under `spec`, from abstract
  shapes (nothing is allocated)."""
  from wdmjax.models import build_model, init_params

  model = build_model(model_cfg)
  shapes = jax.eval_shape(lambda k: init_params(model, k), jax.random.PRNGKey(0))
  if spec.strategy == "lora":
    shapes = {**shapes, **jax.eval_shape(lambda k: init_lora(k, shapes, spec.lora_rank),
                                         jax.random.PRNGKey(0))}
  return count_trainable(shapes, param_labels(shapes, spec.strategy, spec.gamma_blocks))


def _reference(spec: PeftSpec, base: str, base_params, trainable, frozen) -> dict:
  n_train = sum(x.size for x in jax.tree.leaves(trainable))
  n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
  return {**dataclasses.asdict(spec), "base": os.path.abspath(base),
          "base_hash": params_hash(base_params), "trainable": int(n_train),
          "total": int(n_train + n_frozen), "fraction": n_train / max(n_train + n_frozen, 1)}


def read_reference(workdir: str) -> dict | None:
  path = os.path.join(workdir, PEFT_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def spec_of(ref: dict) -> PeftSpec:
  return PeftSpec(**{f.name: ref[f.name] for f in dataclasses.fields(PeftSpec)})


def _check_shapes(cfg: ml_collections.ConfigDict, base_params: chex.ArrayTree,
                  base: str) -> None:
  """The fine-tune's model must take the base's parameters (same names and shapes)."""
  from wdmjax.models import init_params
  from wdmjax.train.sampling import model_from_config

  want = jax.eval_shape(lambda k: init_params(model_from_config(cfg), k), jax.random.PRNGKey(0))
  flat_want = {"/".join(k): v.shape for k, v in _flat(want).items()}
  flat_got = {"/".join(k): v.shape for k, v in _flat(base_params).items()}
  diff = sorted(k for k in set(flat_want) | set(flat_got)
                if flat_want.get(k) != flat_got.get(k))
  if diff:
    k = diff[0]
    check(False, f"--config: its model does not take the parameters of --base {base!r}: "
                 f"{len(diff)} differ, e.g. {k!r}: config {flat_want.get(k)}, base "
                 f"{flat_got.get(k)}")


def _flat(tree):
  from flax import traverse_util

  return traverse_util.flatten_dict(tree)


def finetune(cfg: ml_collections.ConfigDict, workdir: str, base: str, spec: PeftSpec, *,
             loss_fn=None, progress: bool = True, log=print):
  """Fine-tunes the EMA weights of the trained workdir `base` by `spec` into `workdir`
  (resumed if it holds this fine-tune already). `cfg` is the fine-tune's config (its model
  must take the base's parameters; data, resolution, learning rate may differ). Returns the
  final TrainState (trainable part only).

  In a multi-host run every process calls it; process 0 writes peft.json and the delta."""
  from wdmjax.train import load_trained, train
  from wdmjax.train.sharding import to_host

  main = jax.process_index() == 0
  log = log if main else (lambda *a, **k: None)

  check(os.path.abspath(base) != os.path.abspath(workdir),
        "--workdir: expected a new directory, not the --base workdir itself")
  _, _, base_params = load_trained(base, ema=True)
  _check_shapes(cfg, base_params, base)
  trainable, frozen, _, combine = prepare(spec, base_params,
                                          jax.random.PRNGKey(cfg.train.seed))
  ref = _reference(spec, base, base_params, trainable, frozen)
  old = read_reference(workdir)
  check(old is None or all(old[k] == ref[k] for k in ("strategy", "gamma_blocks", "lora_rank",
                                                        "lora_alpha", "base_hash")),
        f"--workdir: {workdir!r} holds a different fine-tune ({old and old['strategy']} of "
        f"{old and old['base']}); use a new --workdir")
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, PEFT_FILE)
  fresh = not has_checkpoint(workdir)
  if main:
    with open(path + ".tmp", "w") as f:
      json.dump(ref, f, indent=2)
    os.replace(path + ".tmp", path)
  log(f"{spec.strategy}: training {ref['trainable']:,} of {ref['total']:,} parameters "
      f"({100 * ref['fraction']:.3f}%)")
  try:
    state = train(cfg, workdir, loss_fn=loss_fn, init_params=trainable, frozen_params=frozen,
                  combine=combine, progress=progress, log=log)
  except WdmjaxError:
    if main and fresh and not has_checkpoint(workdir):  # rejected before any step
      os.remove(path)
    raise
  ema = to_host(state.ema_params)  # a collective with several processes
  if main:
    save_delta(ema, os.path.join(workdir, DELTA_FILE))
  return state


def load_finetuned(workdir: str, ema: bool = True):
  """(config, model, params) of a fine-tune: its newest checkpoint applied onto its base."""
  from wdmjax.train import load_trained
  from wdmjax.train.checkpoint import Checkpointer
  from wdmjax.train.loop import init_state, read_config
  from wdmjax.train.sampling import model_from_config
  from wdmjax.train.sharding import local_mesh
  from wdmjax.train.state import make_optimizer

  ref = read_reference(workdir)
  cfg = read_config(workdir)
  model = model_from_config(cfg)
  check(os.path.isdir(ref["base"]),
        f"peft.json: the base workdir {ref['base']!r} of this fine-tune is gone")
  _, _, base_params = load_trained(ref["base"], ema=True)
  check_base(base_params, ref["base_hash"], ref["base"])
  spec = spec_of(ref)
  trainable, frozen, _, combine = prepare(spec, base_params, jax.random.PRNGKey(cfg.train.seed))
  tx = make_optimizer(cfg.train.lr, cfg.train.warmup_steps, cfg.train.weight_decay,
                      cfg.train.grad_clip)
  state = init_state(cfg, model, tx, local_mesh(), trainable)
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  try:
    state = ckpt.restore(state)
  finally:
    ckpt.close()
  return cfg, model, combine(state.ema_params if ema else state.params, frozen)


def apply_delta(delta_path: str, base_params: chex.ArrayTree, reference: dict
                ) -> chex.ArrayTree:
  """The fine-tuned parameters from a delta file, its peft.json reference and the base's
  parameters (refused unless they hash to the reference's base_hash)."""
  check_base(base_params, reference["base_hash"], reference["base"])
  spec = spec_of(reference)
  _, frozen, _, combine = prepare(spec, base_params)
  return combine(load_delta(delta_path), frozen)

