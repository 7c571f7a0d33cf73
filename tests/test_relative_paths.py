"""Every tool with relative paths, from a working directory that is not the repository.

One chain, as a new user would type it: build a dataset -> tokenizer -> train (save, then resume) -> evaluate ->
sample -> export to HF -> import back -> sweep -> dry-run -> plot. The saved config must record absolute paths.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, process_env
from tweetjax import paths

ONE_DEVICE = ("--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1")


def test_resolve_config_paths_by_key_name(tmp_path, monkeypatch):
  import ml_collections

  monkeypatch.chdir(tmp_path)
  config = ml_collections.ConfigDict({
      "data": {"dataset_dir": "data/tw", "tokenizer_path": "", "seq_len": 8, "name": "rel/not_a_path",
               "mixture": [{"dataset_dir": "a"}, {"dataset_dir": "gs://bucket/b"}]},
      "train": {"compilation_cache_dir": "none", "init_from": "~/base"}})
  config.lock()
  changed = paths.resolve_config_paths(config)
  assert config.data.dataset_dir == str(tmp_path / "data/tw")
  assert config.data.tokenizer_path == "" and config.data.name == "rel/not_a_path"
  assert config.data.mixture[0]["dataset_dir"] == str(tmp_path / "a")
  assert config.data.mixture[1]["dataset_dir"] == "gs://bucket/b"
  assert config.train.compilation_cache_dir == "none"
  assert config.train.init_from == os.path.expanduser("~/base")
  assert set(changed) == {"data.dataset_dir", "data.mixture[0].dataset_dir", "train.init_from"}
  assert paths.resolve_config_paths(config) == {}  # idempotent
  assert paths.absolute_config_arg("experiments/hf.py:runs/x") == str(tmp_path / "experiments/hf.py") + ":runs/x"


def test_only_urls_are_remote():
  assert paths.is_url("gs://bucket/build") and paths.is_url("s3://b/x")
  assert not paths.is_url("/tmp/build") and not paths.is_url("relative/dir")


def test_every_path_key_of_the_base_config_is_found():
  from tweetjax.config import base_config

  config = base_config()
  found = []

  def visit(node, prefix):
    for name, value in node.items():
      if hasattr(value, "items"):
        visit(value, f"{prefix}{name}.")
      elif paths.is_path_key(name):
        found.append(f"{prefix}{name}")
  visit(config, "")
  # A new path key must be named so that paths.is_path_key finds it (or be added to paths.EXTRA_PATH_KEYS).
  for key in ("data.dataset_dir", "data.tokenizer_path", "eval.data_dir", "train.compilation_cache_dir"):
    assert key in found


def run(cwd, tool, *args, timeout=600):
  result = subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), *args], cwd=cwd, env=process_env(),
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, f"{tool} {args}:\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
  return result.stdout


@pytest.mark.slow
def test_every_tool_with_relative_paths(tmp_path):
  cwd = tmp_path / "user"
  cwd.mkdir()
  tiny = os.path.relpath(os.path.join(REPO, "experiments", "tiny.py"), cwd)  # the config file is relative too
  data = ("--config.data.source=tweets", "--config.data.dataset_dir=data/tw",
          "--config.data.tokenizer_path=data/tw/tokenizer.model", "--config.data.pack_window=256",
          "--config.data.global_batch_size=4", "--config.data.seq_len=64")

  run(cwd, "build_dataset.py", "--synthetic", "--num_tweets=600", "--output=data/tw")
  run(cwd, "train_tokenizer.py", "--dataset_dir=data/tw", "--vocab_size=400")
  assert (cwd / "data/tw/tokenizer.model").exists()

  train = (f"--config={tiny}", "--workdir=runs/rel", *ONE_DEVICE, *data, "--config.checkpoint.every_steps=2",
           "--config.train.log_every=1", "--config.model.vocab_size=512")
  run(cwd, "train.py", *train, "--config.train.steps=4")
  run(cwd, "train.py", *train, "--config.train.steps=6")  # resumes from step 4
  steps = [json.loads(line)["step"] for line in open(cwd / "runs/rel/metrics.jsonl") if '"loss"' in line]
  assert steps == [1, 2, 3, 4, 5, 6], steps
  saved = json.load(open(cwd / "runs/rel/checkpoints/6/config/metadata"))
  assert saved["data"]["dataset_dir"] == str(cwd / "data/tw"), saved["data"]
  assert saved["data"]["tokenizer_path"] == str(cwd / "data/tw/tokenizer.model")
  # The TensorBoard viewer (the [tensorboard] extra) reads the run's event files, resumed run included.
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(str(cwd / "runs/rel/tensorboard"))
  events.Reload()
  assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]

  eval_args = (f"--config={tiny}", *ONE_DEVICE, *data, "--config.model.vocab_size=512")
  out = run(cwd, "evaluate.py", *eval_args, "--workdir=runs/rel", "--job=perplexity",
            "--config.eval.perplexity_max_batches=1")
  assert (cwd / "runs/rel/eval/perplexity/6.json").exists(), out
  out = run(cwd, "sample.py", *eval_args, "--workdir=runs/rel", "--num_samples=1", "--max_new_tokens=4")
  assert out.startswith("step 6"), out

  run(cwd, "convert_hf.py", "--mode=export", "--workdir=runs/rel", "--hf_dir=hf_out")
  assert (cwd / "hf_out/config.json").exists()
  out = run(cwd, "convert_hf.py", "--mode=import", "--hf_dir=hf_out", "--workdir=rel_w")
  assert f"--config=experiments/hf.py:{cwd / 'rel_w'}" in out
  assert (cwd / "rel_w/checkpoints/0").is_dir()

  (cwd / "my_sweep.py").write_text(
      "import importlib.util\n"
      f"spec = importlib.util.spec_from_file_location('tiny', {os.path.join(REPO, 'experiments', 'tiny.py')!r})\n"
      "tiny = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(tiny)\n"
      "def get_config(arg=None):\n  return tiny.get_config(arg)\n"
      "def sweep():\n"
      "  yield {'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.tensor': 1, 'train.steps': 2, 'data.global_batch_size': 2,\n"
      "         'data.seq_len': 32, 'train.compilation_cache_dir': 'sweep_cache'}\n")
  run(cwd, "sweep.py", "--config=my_sweep.py", "--workdir=sweeps/s")
  sweep = json.load(open(cwd / "sweeps/s/sweep.json"))
  assert sweep["config"] == str(cwd / "my_sweep.py")
  (point,) = sweep["points"].values()
  assert point["train.compilation_cache_dir"] == str(cwd / "sweep_cache")
  assert (cwd / "sweep_cache").is_dir()

  run(cwd, "dryrun.py", f"--config={tiny}", "--mesh=data=1", "--json_out=dry/tiny.json")
  assert json.load(open(cwd / "dry/tiny.json"))
  out = run(cwd, "plot_metrics.py", "--workdir=runs/rel", "--out=plots/m.png")
  assert (cwd / "plots/m.png").exists() and out.strip() == str(cwd / "plots/m.png")
