"""The workdir-level API: one function per `wdmjax` command, returning values.

    from wdmjax import runs
    runs.train("mnist5k_dit", "runs/dit", ["train.steps=3000"])
    runs.embed("runs/dit_wm", secret, base="runs/dit", steps=600, lr=3e-4)
    report = runs.verify("runs/dit_wm")                      # the owner's own model
    report = runs.verify("suspect", secret="runs/dit_wm")    # a suspect, the owner's secret

Each function reads and writes a run's directory through `wdmjax.Workdir` and returns a
result object or a report dict; the command line only parses, prints and sets exit codes.
"""

from wdmjax.runs.attack import AttackResult, attack, attack_model
from wdmjax.runs.augment import ClassifierResult, PreviewResult, classifier, preview
from wdmjax.runs.autoencoder import (
  AUTOENCODER_DATA,
  Autoencoder,
  AutoencoderResult,
  GenerateResult,
  generate,
  ldm_autoencoder,
  load_autoencoder,
  train_autoencoder,
)
from wdmjax.runs.demo import DEMO_SECRET, DemoResult, base_workdir, demo
from wdmjax.runs.evaluate import BenchmarkReport
from wdmjax.runs.evaluate import evaluate as benchmark  # `wdmjax evaluate`
from wdmjax.runs.keys import keygen
from wdmjax.runs.model import Model, load_model
from wdmjax.runs.ood import Scorer, load_scorer
from wdmjax.runs.ood import evaluate as ood_eval
from wdmjax.runs.ood import score as ood_score
from wdmjax.runs.peft import FinetuneResult, finetune, finetune_config, params
from wdmjax.runs.plan import LatentsResult, latents, plan
from wdmjax.runs.serial import (
  IssueReport,
  TeacherReport,
  load_student,
  load_teacher,
  read_serials,
)
from wdmjax.runs.serial import evaluate as serial_eval
from wdmjax.runs.serial import issue as serial_issue
from wdmjax.runs.serial import teacher as serial_teacher
from wdmjax.runs.serial_lock import LockedSampleResult, LockReport, locked_samples, read_lock
from wdmjax.runs.serial_lock import lock as serial_lock
from wdmjax.runs.serial_lock import sample as serial_sample
from wdmjax.runs.signature import (
  EmbedReport,
  Extractor,
  GenerateReport,
  load_extractor,
  load_user_decoder,
)
from wdmjax.runs.signature import detect as signature_detect
from wdmjax.runs.signature import embed as signature_embed
from wdmjax.runs.signature import generate as signature_generate
from wdmjax.runs.signature_pretrain import PretrainReport
from wdmjax.runs.signature_pretrain import pretrain as signature_pretrain
from wdmjax.runs.train import SampleResult, TrainResult, sample, train
from wdmjax.runs.watermark import (
  EmbedResult,
  ExtractResult,
  embed,
  evidence_images,
  extract,
  extract_samples,
  load_secret,
  read_key,
  read_secret,
  resolve_secret,
  verify,
  verify_model,
  write_secret,
)

__all__ = [
  "AUTOENCODER_DATA", "Autoencoder", "AutoencoderResult", "GenerateResult", "generate",
  "ldm_autoencoder", "load_autoencoder", "train_autoencoder",
  "DEMO_SECRET", "AttackResult", "ClassifierResult", "DemoResult", "EmbedResult",
  "ExtractResult", "FinetuneResult", "LatentsResult", "Model", "PreviewResult",
  "SampleResult", "TrainResult", "attack", "attack_model", "base_workdir", "classifier",
  "demo", "embed", "evidence_images", "extract", "extract_samples", "finetune",
  "finetune_config", "latents", "load_model", "load_secret", "params", "plan", "preview",
  "read_key", "read_secret", "resolve_secret", "sample", "train", "verify", "verify_model",
  "write_secret",
  "EmbedReport", "Extractor", "GenerateReport", "PretrainReport", "load_extractor",
  "load_user_decoder", "signature_detect", "signature_embed", "signature_generate",
  "signature_pretrain",
  "IssueReport", "LockReport", "LockedSampleResult", "TeacherReport", "load_student",
  "load_teacher", "locked_samples", "read_lock", "read_serials", "serial_eval", "serial_issue",
  "serial_lock", "serial_sample", "serial_teacher",
  "Scorer", "load_scorer", "ood_eval", "ood_score",
  "BenchmarkReport", "benchmark", "keygen",
]
