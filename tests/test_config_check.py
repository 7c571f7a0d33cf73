"""Config validation: one rule per key of base_config(), every bad key named in one error, before anything compiles."""

import glob
import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO, load_config, process_env
from tweetjax.config import base_config
from tweetjax.config_check import RULES, ConfigError, check_config, leaves


def test_every_key_of_base_config_has_a_rule_and_every_rule_a_key():
  """A key added to base_config() without a rule in tweetjax/config_check.py fails here."""
  keys = [key for key, _ in leaves(base_config())]
  assert sorted(set(keys) - set(RULES)) == [], "keys without a rule in tweetjax/config_check.py RULES"
  assert sorted(set(RULES) - set(keys)) == [], "rules for keys base_config() no longer has"


def test_each_rule_accepts_its_default_and_rejects_a_wrong_type():
  for key, value in leaves(base_config()):
    assert RULES[key].ok(value), f"config.{key}={value!r} (the default) breaks its own rule"
    assert not RULES[key].ok(None), f"config.{key}: the rule accepts None"


EXPERIMENTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "experiments", "*.py"))
                     if not p.endswith("/hf.py"))  # hf.py needs a model directory (tests/convert cover it)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_passes(name):
  check_config(load_config(name))


BAD = {  # key -> (bad value, what the message says is expected)
    "optimizer.learning_rate": (-1.0, "a number >= 0"),
    "data.global_batch_size": (0, "a positive integer"),
    "model.dtype": ("float8", "one of ['float32', 'bfloat16', 'float16']"),
    "model.head_dim": (15, "a positive even integer"),
    "mesh.fsdp": (0, "a positive integer or -1"),
    "optimizer.b2": (1.0, "a number in [0, 1)"),
    "eval.top_p": (0.0, "a number in (0, 1]"),
    "optimizer.eps": (float("nan"), "a number > 0"),
    "train.profile_steps": ("5,3", "START < STOP"),
    "train.nonfinite": ("ignore", "one of ['skip', 'stop']"),
    "data.normalize.urls": ("drop", "one of ['token', 'keep', 'remove']"),
    "logical_axis_rules": ([["embed", "model"]], "a list of [logical_name, mesh axes] pairs"),
    "xla_flags": (("xla_dump_to=/tmp",), "'--flag=value'"),
}


def test_all_bad_keys_are_listed_in_one_error():
  config = base_config()
  for key, (value, _) in BAD.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  with pytest.raises(ConfigError) as e:
    check_config(config)
  message = str(e.value)
  assert message.startswith(f"{len(BAD)} invalid config values")
  for key, (value, expected) in BAD.items():
    line = next((line for line in message.splitlines() if line.strip().startswith(f"config.{key}=")), None)
    assert line is not None and expected in line, (key, message)


def test_build_experiment_checks_before_the_mesh_or_the_model():
  from tweetjax.train.experiment import build_experiment

  config = load_config("tiny")
  config.optimizer.learning_rate = -1.0
  config.mesh.data = 3  # also a mesh 8 devices cannot build: the value check comes first and names the key
  with pytest.raises(ConfigError, match=r"config.optimizer.learning_rate=-1.0: expected a number >= 0"):
    build_experiment(config)


def test_train_tool_refuses_the_measured_cases_at_once(tmp_path):
  """The three cases of the issue: a negative learning rate trained, a zero batch ended in ZeroDivisionError and a
  float8 dtype in a TypeError inside the model."""
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "train.py"), "--config=experiments/tiny.py",
       f"--workdir={tmp_path / 'run'}", "--config.optimizer.learning_rate=-1", "--config.data.global_batch_size=0",
       "--config.model.dtype=float8", "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"],
      env=process_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "3 invalid config values" in result.stderr, result.stderr[-3000:]
  for key in ("optimizer.learning_rate=-1", "data.global_batch_size=0", "model.dtype='float8'"):
    assert f"config.{key}" in result.stderr
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_sweep_points_are_checked_before_any_starts(tmp_path):
  from tweetjax.sweep import runner

  path = tmp_path / "exp.py"
  path.write_text(textwrap.dedent(f"""
      import importlib.util
      _spec = importlib.util.spec_from_file_location("tiny", {os.path.join(REPO, "experiments", "tiny.py")!r})
      _tiny = importlib.util.module_from_spec(_spec)
      _spec.loader.exec_module(_tiny)
      get_config = _tiny.get_config

      def sweep():
        return [{{"optimizer.learning_rate": 1e-3}}, {{"optimizer.learning_rate": -1e-3}}]
      """))
  good, bad = runner.plan(str(path), str(tmp_path / "sweep"))
  assert good.error == ""
  assert "config.optimizer.learning_rate=-0.001: expected a number >= 0" in bad.error
