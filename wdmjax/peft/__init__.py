"""Parameter-efficient fine-tuning: DiffFit, BitFit, LoRA and full, with delta checkpoints."""

from wdmjax.peft.delta import load_delta, params_hash, save_delta
from wdmjax.peft.finetuning import (
  LR_MULT,
  PeftSpec,
  apply_delta,
  check_shapes,
  combine_params,
  count,
  finetune,
  load_finetuned,
  prepare,
  read_reference,
  reference,
  spec_of,
)
from wdmjax.peft.labels import FREEZE, STRATEGIES, TRAIN, count_trainable, param_labels
from wdmjax.peft.lora import apply_lora, init_lora, lora_targets
from wdmjax.peft.partition import merge, split

__all__ = [
  "FREEZE", "LR_MULT", "STRATEGIES", "TRAIN", "PeftSpec", "apply_delta", "apply_lora",
  "check_shapes", "combine_params", "count", "count_trainable", "finetune", "init_lora",
  "load_delta", "load_finetuned", "lora_targets", "merge", "param_labels", "params_hash",
  "prepare", "read_reference", "reference", "save_delta", "spec_of", "split",
]
