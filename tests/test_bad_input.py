"""Every bad input gets one line (issue 15): OS errors, non-finite and out-of-range numbers,
seeds, garbled files and disagreeing multi-host processes are refused with
`wdmjax: error: ...` (exit 2; exit 1 for a failing system), never a traceback, and before
any model work wherever the input allows. The property tests at the end throw arbitrary
specs, overrides and numbers at the parsers and the command line."""

import errno
import json
import math
import os
import socket
import threading
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import TINY_DIT, run_cli
from wdmjax.errors import SEED_MAX, WdmjaxError, check_number, check_seed


def _one_line_error(r, status: int = 2) -> str:
  """The single error line of a failed command (asserting there is exactly one)."""
  lines = [ln for ln in r.stderr.splitlines() if ln.startswith("wdmjax: error: ")]
  assert r.returncode == status and len(lines) == 1, (r.returncode, r.stderr[-2000:])
  assert "Traceback" not in r.stderr
  return lines[0]


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
  """A workdir of the tiny DiT at its initial weights: loads like a trained run, costs no
  training (for inputs that are refused after the model is loaded, before sampling)."""
  import jax

  from wdmjax.configs import load_config
  from wdmjax.train import setup
  from wdmjax.train.export import workdir_from_params
  cfg = load_config(TINY_DIT)
  path = tmp_path_factory.mktemp("bad_input") / "untrained"
  workdir_from_params(cfg, setup(cfg).init_params(jax.random.PRNGKey(0)), path, 1)
  return path


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
  """A directory holding only the tiny DiT's config.json: enough for config-level checks."""
  from wdmjax.configs import load_config, to_json
  path = tmp_path_factory.mktemp("bad_input") / "base"
  path.mkdir()
  (path / "config.json").write_text(to_json(load_config(TINY_DIT)))
  return path


# ----------------------------------------------------------------------------- A: OS errors


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/checkpoints/7"),
    # tensorstore (under Orbax) reports an OS error as text, chained into another error
    RuntimeError("save failed"),
])
def test_an_os_error_anywhere_is_one_line_with_status_1(monkeypatch, error, tmp_path):
  from wdmjax import runs
  if isinstance(error, RuntimeError):
    cause = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/data/run/x": Failed '
                       "to write 40 bytes to file 12: No space left on device "
                       "[os_error_code='28']")
    error.__cause__ = cause

  def fail(*args, **kwargs):
    raise error

  monkeypatch.setattr(runs, "latents", fail)
  line = _one_line_error(run_cli("latents", "--npz-dir", tmp_path), status=1)
  assert line.endswith(": No space left on device") and "/data/run/" in line


def test_a_read_only_directory_is_refused_up_front(monkeypatch, tmp_path):
  from wdmjax.files import check_dir_path, check_file_path
  monkeypatch.setattr(os, "access", lambda path, mode: False)
  with pytest.raises(WdmjaxError, match="out: expected a writable directory, got .* without "
                                        "write permission"):
    check_dir_path(tmp_path / "new", "out", writable=True)
  with pytest.raises(WdmjaxError, match="expected a writable directory"):
    check_file_path(tmp_path / "grid.png", "out")


def test_a_workdir_or_out_that_is_a_file_or_directory_is_refused_up_front(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  a_dir = tmp_path / "a_dir.png"
  a_dir.mkdir()
  line = _one_line_error(run_cli("train", "--config", TINY_DIT, "--workdir", a_file))
  assert line.endswith(f"--workdir: expected a directory, got a file '{a_file}'")
  line = _one_line_error(run_cli("train", "--config", TINY_DIT, "--workdir", a_file / "run"))
  assert f"inside the file '{a_file}'" in line
  line = _one_line_error(run_cli("sample", "--workdir", tmp_path, "--out", a_dir))
  assert line.endswith(f"--out: expected a file path, got a directory '{a_dir}'")
  line = _one_line_error(run_cli("sample", "--workdir", tmp_path, "--out", a_file / "x.png"))
  assert "--out: expected a file path in a directory" in line
  line = _one_line_error(run_cli("attack", "--workdir", tmp_path, "--out", a_file,
                                 "--attack", "noise:0.1"))
  assert line.endswith(f"--out: expected a directory, got a file '{a_file}'")
  line = _one_line_error(run_cli("demo", "--out", a_file, "--no-progress"))
  assert "--out: expected a directory" in line


@pytest.mark.parametrize("text", ['{"train": {"steps": 3', "[1, 2]", "null", '{"train": 5}',
                                  '{"train": {"lr": "fast"}}'])
def test_a_garbled_config_json_is_one_line_naming_the_file(text, tmp_path):
  (tmp_path / "config.json").write_text(text)
  line = _one_line_error(run_cli("sample", "--workdir", tmp_path, "--num", "1"))
  assert str(tmp_path / "config.json") in line


def test_a_fine_tune_keeps_the_base_model(base_config, tmp_path):
  """embed/finetune --set model.* on a base of another shape used to fail in Flax."""
  line = _one_line_error(run_cli(
      "embed", "--base", base_config, "--workdir", tmp_path / "wm", "--trigger", "random:1",
      "--watermark", "keyed:2", "--key", "3", "--set", "model.width=64", "--no-progress"))
  assert "--set: model.width: expected the base's value 32" in line
  assert not (tmp_path / "wm").exists()
  line = _one_line_error(run_cli("finetune", "--base", base_config, "--workdir", tmp_path / "f",
                                 "--peft", "difffit", "--set", "diffusion.num_timesteps=50"))
  assert "--set: diffusion.num_timesteps: expected the base's value 100" in line
  from wdmjax.runs.watermark import embedding_config
  cfg = embedding_config(base=base_config, overrides=["model.dropout=0.1", "train.lr=0.01"])
  assert cfg.model.dropout == 0.1 and cfg.train.lr == 0.01  # no parameters: may change


def test_seeds_must_fit_what_jax_keeps(tmp_path):
  line = _one_line_error(run_cli("sample", "--workdir", tmp_path, "--seed", str(2**70)))
  assert line.endswith(f"--seed: expected an integer in [0, {SEED_MAX}], got {2**70}")
  line = _one_line_error(run_cli("attack", "--workdir", tmp_path, "--out", tmp_path / "a",
                                 "--attack", "noise:0.1", "--seed", "-1"))
  assert "--seed: expected an integer in" in line
  line = _one_line_error(run_cli("plan", "--config", TINY_DIT, "--devices", "1", "--set",
                                 f"train.seed={2**32}"))
  assert "train.seed: expected an integer in" in line
  assert check_seed(SEED_MAX) == SEED_MAX


def test_latents_refuses_a_bad_shard_and_leaves_no_data_set(tmp_path, monkeypatch):
  shards, data = tmp_path / "npz", tmp_path / "tfds"
  shards.mkdir()
  (shards / "a.npz").write_bytes(b"not a zip file")
  line = _one_line_error(run_cli("latents", "--npz-dir", shards, "--data-dir", data))
  assert "a.npz: expected a .npz file of latents and labels" in line
  assert not data.exists()
  # A shard that fails inside TFDS (the up-front check skipped) leaves nothing either.
  np.savez(shards / "a.npz", latents=np.zeros((2, 32, 32, 4), np.float32),
           labels=np.array([1, 1000]))
  import wdmjax.data.latents as latents
  monkeypatch.setattr(latents, "check_shards", lambda *args: None)
  line = _one_line_error(run_cli("latents", "--npz-dir", shards, "--data-dir", data))
  assert "expected labels in [0, 1000)" in line
  assert not data.exists()


# ----------------------------------------------------------------------------- B: numbers


@pytest.mark.parametrize("flag, value, message", [
    ("--eta", "nan", "--eta: expected a number in [0, 1], got nan (not finite)"),
    ("--eta", "-5", "--eta: expected a number in [0, 1], got -5.0"),
    ("--guidance", "inf", "--guidance: expected a number in [-100, 100], got inf (not finite)"),
    ("--guidance", "1e30", "--guidance: expected a number in [-100, 100], got 1e+30"),
])
def test_sample_refuses_non_finite_and_out_of_range_numbers(flag, value, message, tmp_path):
  r = run_cli("sample", "--workdir", tmp_path, "--num", "1", flag, value)
  assert _one_line_error(r).endswith(message)


def test_samplers_refuse_eta_and_guidance_out_of_range():
  import jax
  import jax.numpy as jnp

  from wdmjax.diffusion import make_schedule, sample
  sched = make_schedule("linear", 10)
  model_fn = lambda params, x, t, y: jnp.zeros_like(x)
  for kwargs, match in [(dict(eta=float("nan")), "eta"), (dict(eta=1.5), "eta"),
                        (dict(guidance_scale=float("inf"), y=jnp.zeros(1, jnp.int32),
                              null_label=1), "guidance_scale")]:
    with pytest.raises(WdmjaxError, match=match):
      sample(model_fn, {}, jax.random.PRNGKey(0), sched, shape=(1, 2, 2, 1), steps=2,
             **kwargs)


@pytest.mark.parametrize("command", ["verify", "extract"])
@pytest.mark.parametrize("steps", ["0", "101"])
def test_verify_and_extract_refuse_steps_outside_the_schedule(command, steps, untrained,
                                                              tmp_path):
  """--steps 0 used to run the config's 10 steps and report 0."""
  r = run_cli(command, "--workdir", untrained, "--trigger", "random:1", "--watermark",
              "keyed:2", "--key", "3", "--num", "1", "--steps", steps,
              *(["--out", tmp_path / "w.png"] if command == "extract" else []))
  assert _one_line_error(r).endswith(f"--steps: expected an integer in [1, 100], got {steps}")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_trigger_or_watermark_array_must_be_finite(bad, tmp_path):
  from wdmjax.watermark import ImageShape
  from wdmjax.watermark.triggers import load_image_file
  arr = np.zeros((8, 8), np.float32)
  arr[3, 4] = bad
  np.save(tmp_path / "t.npy", arr)
  for what in ("trigger", "watermark"):
    with pytest.raises(WdmjaxError, match=f"{what}: expected finite values"):
      load_image_file(str(tmp_path / "t.npy"), ImageShape(8, 1), what)
  (tmp_path / "junk.npy").write_bytes(b"junk")
  with pytest.raises(WdmjaxError, match="could not read"):
    load_image_file(str(tmp_path / "junk.npy"), ImageShape(8, 1), "trigger")


@pytest.mark.parametrize("spec", ["noise:inf", "noise:nan", "noise_rel:1e999", "noise:1e39",
                                  "prune:inf", "steps:²", "finetune:-1"])
def test_attack_strengths_must_be_finite(spec, tmp_path):
  from wdmjax.attacks.spec import parse_attack
  with pytest.raises(WdmjaxError, match="attack: expected"):
    parse_attack(spec)
  r = run_cli("attack", "--workdir", tmp_path, "--out", tmp_path / "a", "--attack", spec)
  assert "--attack: expected" in _one_line_error(r)


def test_peft_flags_must_fit_the_model():
  line = _one_line_error(run_cli("params", "--config", TINY_DIT, "--peft", "difffit",
                                 "--gamma-blocks", "99"))
  assert line.endswith("--gamma-blocks: expected an int in [0, 2] (the model's DiT blocks), "
                       "got 99")
  line = _one_line_error(run_cli("params", "--config", TINY_DIT, "--peft", "lora",
                                 "--gamma-blocks", "1"))
  assert "--gamma-blocks: expected only with strategy 'difffit'" in line
  line = _one_line_error(run_cli("params", "--config", TINY_DIT, "--peft", "lora",
                                 "--lora-alpha", "inf"))
  assert line.endswith("--lora-alpha: expected a positive number, got inf (not finite)")


def test_demo_checks_every_argument_before_it_writes_a_base(tmp_path):
  out = tmp_path / "demo"
  for args, message in [(["--steps", "0"], "--steps: expected a positive integer, got 0"),
                        (["--base-steps", "5"], "--base-steps: expected only with train_base")]:
    assert message in _one_line_error(run_cli("demo", "--out", out, *args))
    assert not out.exists()


# ----------------------------------------------------------------------------- C: multi-host


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _meet(processes: list[tuple[int, int]], timeout: float = 5.0) -> list[str]:
  """Runs `rendezvous` for (num_processes, process_id) pairs in threads; 'ok' or the error."""
  from wdmjax.train.distributed import rendezvous
  coordinator = f"localhost:{_free_port()}"
  out = [""] * len(processes)

  def one(i, n, pid):
    try:
      rendezvous(coordinator, n, pid, timeout)
      out[i] = "ok"
    except WdmjaxError as e:
      out[i] = str(e)

  threads = [threading.Thread(target=one, args=(i, *p)) for i, p in enumerate(processes)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout + 20)
  return out


def test_processes_of_a_run_meet_and_disagreements_fail_all_in_one_line():
  assert _meet([(3, 2), (3, 1), (3, 0)]) == ["ok", "ok", "ok"]
  out = _meet([(2, 0), (3, 1)])
  assert out[0] == out[1] == ("num_processes: expected the same process count in every "
                              "process, got 2 in process 0 and 3 in process 1")
  out = _meet([(3, 0), (3, 1), (3, 1)])
  assert all(o.startswith("process_id: expected a different id in every process, got 1")
             or o.startswith("process_id: expected process 0") for o in out), out
  out = _meet([(2, 0), (2, 0)], timeout=1)
  assert any("is another process of the run also process 0?" in o for o in out), out
  out = _meet([(3, 0), (3, 2)], timeout=1)
  assert all("missing process ids [1]" in o for o in out), out


def test_a_process_without_its_coordinator_fails_in_one_line(tmp_path):
  r = run_cli("train", "--config", TINY_DIT, "--workdir", tmp_path / "w", "--coordinator",
              f"localhost:{_free_port()}", "--num-processes", "2", "--process-id", "1",
              "--init-timeout", "1")
  assert "--coordinator: expected process 0 of the run at localhost:" in _one_line_error(r)
  r = run_cli("train", "--config", TINY_DIT, "--workdir", tmp_path / "w", "--coordinator",
              "localhost:1", "--num-processes", "2", "--process-id", "1", "--init-timeout", "0")
  assert "--init-timeout: expected a whole number of seconds >= 1" in _one_line_error(r)


# ----------------------------------------------------------------------------- D: properties

# Numbers as a user may type them: ordinary, huge, tiny, negative, NaN, inf, integers.
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(-2**80, 2**80), st.sampled_from([0, 1, -1, 1e-300, 1e308]))
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
FAST = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(value=NUMBERS, low=st.sampled_from([None, 0.0, -1.0]),
       high=st.sampled_from([None, 1.0, 100.0]))
def test_check_number_accepts_exactly_the_finite_numbers_in_range(value, low, high):
  ok = (math.isfinite(value) and (low is None or value >= low)
        and (high is None or value <= high))
  try:
    assert check_number(value, "x", low, high) == float(value) and ok
  except WdmjaxError as e:
    assert not ok and str(e).startswith("x: expected a ")


@FAST
@given(spec=st.one_of(
    TEXT, st.builds(lambda n, v: f"{n}:{v}",
                    st.sampled_from(["prune", "prune_layer", "noise", "noise_rel", "dropout",
                                     "quantize", "finetune", "finetune_difffit", "finetune_lora",
                                     "steps", "raw"]),
                    st.one_of(TEXT, NUMBERS.map(repr), NUMBERS.map(str)))))
def test_attack_specs_parse_or_fail_in_one_line(spec):
  from wdmjax.attacks.spec import parse_attack
  try:
    a = parse_attack(spec)
  except WdmjaxError as e:
    assert str(e).startswith("attack: ") and "\n" not in str(e)
    return
  if isinstance(a.strength, float):
    assert math.isfinite(a.strength) and a.strength >= 0
  if isinstance(a.strength, int):
    assert a.strength >= 1


@FAST
@given(spec=st.one_of(TEXT, st.builds(lambda k, v: f"{k}:{v}",
                                      st.sampled_from(["random", "stripes", "keyed", "class"]),
                                      st.one_of(TEXT, NUMBERS.map(str)))),
       what=st.sampled_from(["trigger", "watermark"]))
def test_trigger_and_watermark_specs_give_finite_images_or_one_line(spec, what):
  from wdmjax.watermark import ImageShape
  from wdmjax.watermark.triggers import make_trigger, make_watermark
  make = make_trigger if what == "trigger" else make_watermark
  try:
    img = make(spec, ImageShape(8, 1))
  except WdmjaxError as e:
    assert "\n" not in str(e)
    return
  img = np.asarray(img[0] if isinstance(img, tuple) else img)
  assert img.size and np.all(np.isfinite(img)) and np.all(np.abs(img) <= 1)


CONFIG_KEYS = ["train.steps", "train.batch_size", "train.lr", "train.warmup_steps",
               "train.weight_decay", "train.grad_clip", "train.ema_decay", "train.seed",
               "train.log_every", "sample.steps", "sample.eta", "sample.num",
               "sample.guidance_scale", "sample.seed", "sample.ema", "sample.sampler",
               "diffusion.num_timesteps", "diffusion.beta_start", "diffusion.beta_end",
               "diffusion.objective", "data.resolution", "data.channels", "data.labels",
               "data.name", "mesh.data", "mesh.fsdp", "model.width", "model.mlp_ratio",
               "model.class_dropout_prob", "nosection.x", "train", "train.nokey"]


@FAST
@given(overrides=st.lists(st.builds(
    lambda k, v: f"{k}={v}", st.sampled_from(CONFIG_KEYS),
    st.one_of(NUMBERS.map(repr), NUMBERS.map(str), TEXT,
              st.sampled_from(["None", "True", "[1, 2]", "{}", "'x'", "()", "1e999",
                               "-0.0", "2**70", "((((", "{[]: 1}"]))), max_size=3))
@example(overrides=["sample.guidance_scale={}"])  # an empty ConfigDict's repr ends in "\n"
def test_overrides_validate_or_fail_in_one_line(overrides):
  from wdmjax.configs import apply_override, load_config, validate
  from wdmjax.configs.schema import default_config, merge
  cfg = merge(default_config(), load_config(TINY_DIT).to_dict())
  try:
    for o in overrides:
      apply_override(cfg, o)
    validate(cfg)
  except WdmjaxError as e:
    assert "\n" not in str(e)
    return
  for section in ("train", "sample", "diffusion"):  # a valid config holds finite numbers
    for k, v in cfg[section].items():
      assert not isinstance(v, float) or math.isfinite(v), (k, v)
  assert 0 <= cfg.sample.eta <= 1 and cfg.train.lr > 0


# The numeric flags of each command (--num aside: a valid huge count is a long run).
NUMERIC_FLAGS = [(c, f) for c, flags in [
    ("sample", ["--eta", "--guidance", "--seed", "--steps"]),
    ("verify", ["--seed", "--steps", "--gamma1", "--block", "--key", "--decoys"]),
    ("extract", ["--seed", "--steps", "--gamma1", "--block", "--key"]),
    ("attack", ["--seed"]),
    ("plan", ["--devices", "--fsdp", "--mfu"])] for f in flags]


@FAST
@given(command_flag=st.sampled_from(NUMERIC_FLAGS),
       value=st.one_of(NUMBERS.map(str), st.sampled_from(["nan", "inf", "-inf", "1e999", "",
                                                          "0x10", "1_0", "٣", "-0"])))
def test_numeric_flags_never_give_a_traceback(command_flag, value, untrained, tmp_path):
  """Bad numbers are refused in one line before any sampling; a valid one may run, on the
  untrained tiny model with one step and one sample."""
  command, flag = command_flag
  tmp_path = tmp_path / uuid.uuid4().hex  # a fresh folder per example: tmp_path is shared
  base = {"sample": ["--workdir", untrained, "--num", "1", "--steps", "1", "--out",
                     tmp_path / "g.png"],
          "verify": ["--workdir", untrained, "--trigger", "random:1", "--watermark",
                     "keyed:2", "--key", "3", "--num", "1", "--steps", "1", "--json"],
          "extract": ["--workdir", untrained, "--trigger", "random:1", "--watermark",
                      "keyed:2", "--num", "1", "--steps", "1", "--out", tmp_path / "w.png"],
          "attack": ["--workdir", untrained, "--out", tmp_path / "attacked", "--attack",
                     "quantize:fp16", "--no-progress"],
          "plan": ["--config", TINY_DIT, "--devices", "1", "--json"]}[command]
  r = run_cli(command, *base, f"{flag}={value}")
  assert "Traceback" not in r.stderr
  if r.returncode == 0:
    if command == "verify":
      assert math.isfinite(json.loads(r.stdout)["log10_p_value"])
    if command in ("sample", "extract"):  # a written, finite picture
      out = base[base.index("--out") + 1]
      pixels = np.asarray(Image.open(out))
      assert pixels.size and np.isfinite(pixels).all() and pixels.std() > 0
    if command == "plan":
      assert all(math.isfinite(v) for v in json.loads(r.stdout).values()
                 if isinstance(v, float))
  else:
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(("wdmjax: error: ", "usage: ",
                                                         "wdmjax ")), r.stderr
