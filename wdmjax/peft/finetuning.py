"""Parameter-efficient fine-tuning: a strategy's split of the parameters, trained by the
engine, and the fine-tune's record.

`finetune` splits a base model's parameters by strategy, trains the trainable part only
(see `wdmjax.train.make_train_step`'s `frozen`), and leaves in the workdir:
  peft.json    the strategy, the base workdir and its parameters' content hash, the counts;
  checkpoints/ Orbax checkpoints of the trainable state only (resumable; already a delta);
  delta.npz    the trainable EMA leaves, float32: the patch that `apply_delta` puts onto
               the base.
`wdmjax.runs.load_model` rebuilds such a workdir's full parameters from its base and refuses
a base whose contents changed.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import chex
import jax
import ml_collections
from flax import traverse_util

from wdmjax.errors import check, check_number
from wdmjax.models import build_model, init_params
from wdmjax.peft.delta import check_base, load_delta, params_hash, save_delta
from wdmjax.peft.labels import check_strategy, count_trainable, param_labels
from wdmjax.peft.lora import apply_lora, init_lora
from wdmjax.peft.partition import merge, split
from wdmjax.train import load_params, setup, train
from wdmjax.train.sharding import to_host
from wdmjax.workdir import Workdir

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
    check(self.gamma_blocks is None or self.strategy == "difffit",
          f"gamma_blocks: expected only with strategy 'difffit', got {self.gamma_blocks!r} "
          f"with {self.strategy!r}")
    check(isinstance(self.lora_rank, int) and not isinstance(self.lora_rank, bool)
          and self.lora_rank >= 1, f"lora_rank: expected a positive int, got {self.lora_rank!r}")
    if self.lora_alpha is not None:
      check_number(self.lora_alpha, "lora_alpha", 0, low_open=True)


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
  model = build_model(model_cfg)
  shapes = jax.eval_shape(lambda k: init_params(model, k), jax.random.PRNGKey(0))
  if spec.strategy == "lora":
    shapes = {**shapes, **jax.eval_shape(lambda k: init_lora(k, shapes, spec.lora_rank),
                                         jax.random.PRNGKey(0))}
  return count_trainable(shapes, param_labels(shapes, spec.strategy, spec.gamma_blocks))


def reference(spec: PeftSpec, base: str, base_params: chex.ArrayTree,
              trainable: chex.ArrayTree, frozen: chex.ArrayTree) -> dict:
  """The contents of peft.json: the spec, the base workdir and hash, the counts."""
  n_train = sum(x.size for x in jax.tree.leaves(trainable))
  n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
  return {**dataclasses.asdict(spec), "base": os.path.abspath(base),
          "base_hash": params_hash(base_params), "trainable": int(n_train),
          "total": int(n_train + n_frozen), "fraction": n_train / max(n_train + n_frozen, 1)}


def read_reference(workdir: str | Workdir) -> dict | None:
  """A workdir's peft.json, or None when it is not a fine-tune."""
  return Workdir(workdir).read_json(Workdir.PEFT)


def spec_of(ref: dict) -> PeftSpec:
  return PeftSpec(**{f.name: ref[f.name] for f in dataclasses.fields(PeftSpec)})


def check_shapes(cfg: ml_collections.ConfigDict, base_params: chex.ArrayTree) -> None:
  """The fine-tune's model must take the base's parameters (same names and shapes)."""
  flat = lambda tree: {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(tree).items()}
  want, got = flat(setup(cfg).abstract_params()), flat(base_params)
  diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
  if diff:
    k = diff[0]
    check(False, f"config: its model does not take the base's parameters: {len(diff)} "
                 f"differ, e.g. {k!r}: config {want.get(k)}, base {got.get(k)}")


def finetune(cfg: ml_collections.ConfigDict, workdir: str | Workdir, base: str,
             base_params: chex.ArrayTree, spec: PeftSpec, *, loss_fn=None,
             progress: bool = True, log=None):
  """Fine-tunes `base_params` (the EMA weights of the workdir `base`) by `spec` into
  `workdir` (resumed if it holds this fine-tune already). `cfg` is the fine-tune's config
  (its model must take the base's parameters; data, resolution, learning rate may differ).
  Returns the final TrainState (trainable part only).

  In a multi-host run every process calls it; process 0 writes peft.json and the delta."""
  wd = Workdir(workdir)
  main = jax.process_index() == 0
  check(os.path.abspath(base) != wd.abspath,
        "workdir: expected a new directory, not the base workdir itself")
  check_shapes(cfg, base_params)
  trainable, frozen, _, combine = prepare(spec, base_params,
                                          jax.random.PRNGKey(cfg.train.seed))
  ref = reference(spec, base, base_params, trainable, frozen)
  old = read_reference(wd)
  check(old is None or all(old[k] == ref[k] for k in ("strategy", "gamma_blocks", "lora_rank",
                                                        "lora_alpha", "base_hash")),
        f"workdir: {wd.path!r} holds a different fine-tune ({old and old['strategy']} of "
        f"{old and old['base']}); use a new workdir")
  with wd.undo_on_failure(main):  # rejected before its first checkpoint: leave nothing
    if main:
      wd.write_json(Workdir.PEFT, ref)
      if log:
        log(f"{spec.strategy}: training {ref['trainable']:,} of {ref['total']:,} parameters "
            f"({100 * ref['fraction']:.3f}%)")
    state = train(cfg, wd, loss_fn=loss_fn, init_params=trainable, frozen_params=frozen,
                  combine=combine, progress=progress, log=log)
  ema = to_host(state.ema_params)  # a collective with several processes
  if main:
    save_delta(ema, wd.file(Workdir.DELTA))
  return state


def load_finetuned(workdir: str | Workdir, base_params: chex.ArrayTree, ema: bool = True,
                   step: int | None = None) -> tuple[ml_collections.ConfigDict, chex.ArrayTree]:
  """(config, params) of a fine-tune: its newest checkpoint (or that of `step`, when kept)
  applied onto `base_params` (its base's EMA weights, refused unless they hash to
  peft.json's base_hash)."""
  wd = Workdir(workdir)
  ref = read_reference(wd)
  check(ref is not None, f"workdir: {wd.path!r} is not a fine-tune (no {Workdir.PEFT})")
  check_base(base_params, ref["base_hash"], ref["base"])
  cfg = wd.read_config()
  trainable, frozen, _, combine = prepare(spec_of(ref), base_params,
                                          jax.random.PRNGKey(cfg.train.seed))
  part = load_params(wd, cfg, "ema_params" if ema else "params",
                     like=jax.eval_shape(lambda t: t, trainable), step=step)
  return cfg, combine(part, frozen)


def apply_delta(delta_path: str, base_params: chex.ArrayTree, reference: dict
                ) -> chex.ArrayTree:
  """The fine-tuned parameters from a delta file, its peft.json reference and the base's
  parameters (refused unless they hash to the reference's base_hash)."""
  check_base(base_params, reference["base_hash"], reference["base"])
  spec = spec_of(reference)
  _, frozen, _, combine = prepare(spec, base_params)
  return combine(load_delta(delta_path), frozen)
