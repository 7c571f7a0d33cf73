"""config.train.init_from: params (only) of a tweetjax workdir restored onto another mesh, with a fresh optimizer at
step 0, LoRA adapters fresh on top; shape mismatches name the param; a fine-tune that has checkpoints of its own
resumes (exactly, SFT data iterator included) and never reads init_from again."""

import json
import pathlib

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from tests.helpers import load_config
from tweetjax.model import lora
from tweetjax.parallel.rules import mesh_context
from tweetjax.train import init_from, loop, metrics
from tweetjax.train.checkpoint import CheckpointManager, IncompatibleCheckpointError
from tweetjax.train.experiment import build_experiment

TOK = str(pathlib.Path(__file__).parents[1] / "data" / "fixtures" / "tokenizer.model")
SOURCE_STEP = 7


def _config(**model):
  config = load_config("tiny")
  config.data.update(seq_len=64, global_batch_size=8)
  config.model.update(model)
  return config


def _save_source(workdir, config):
  """A randomly initialised run of `config` checkpointed at SOURCE_STEP; returns its params on the host."""
  experiment = build_experiment(config)
  state = experiment.init_state(jax.random.key(42))
  with CheckpointManager(str(workdir), async_save=False) as manager:
    manager.save(SOURCE_STEP, state.replace(step=state.step + SOURCE_STEP), {}, config=config, force=True)
  return jax.device_get(state.params)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("init_from")
  source = _config()
  source.mesh.update(data=1, fsdp=8, tensor=1)  # written FSDP-sharded 8 ways; restored on (data=2, fsdp=2, tensor=2)
  params = _save_source(root / "base", source)
  _save_source(root / "other", _config(mlp_dim=128))
  yield root, params
  jax.config.update("jax_compilation_cache_dir", None)  # the loop test below turns the persistent cache on
  compilation_cache.reset_cache()


def _assert_fresh_state(state):
  assert int(state.step) == 0 and int(state.nonfinite_steps) == 0
  for path, x in jax.tree_util.tree_leaves_with_path(jax.device_get(state.opt_state)):
    assert not np.any(x), jax.tree_util.keystr(path)  # Adam moments and counts start at zero


def test_init_from_workdir_onto_another_mesh(sources):
  root, want = sources
  config = _config()
  config.train.init_from = str(root / "base")
  experiment = build_experiment(config)
  state = init_from.init_state(config, experiment)
  _assert_fresh_state(state)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), want)
  assert state.params["layers"]["mlp"]["gate"].sharding == experiment.layout.param_shardings["layers"]["mlp"]["gate"]

  config.lora.rank = 4  # LoRA: the base from the source, fresh adapters (B = 0), Adam state for the adapters only
  experiment = build_experiment(config)
  state = init_from.init_state(config, experiment)
  _assert_fresh_state(state)
  base, adapters = lora.split(jax.device_get(state.params))
  jax.tree.map(np.testing.assert_array_equal, base, want)
  for path, x in jax.tree_util.tree_leaves_with_path(adapters):
    assert (np.any(x) if str(path[-1].key).endswith("_lora_a") else not np.any(x)), jax.tree_util.keystr(path)


def test_init_from_errors(sources):
  root, _ = sources
  config = _config(mlp_dim=512)
  config.train.init_from = str(root / "base")
  with pytest.raises(IncompatibleCheckpointError, match=r"shape changed \[\('layers/mlp/down', \(2, 256, 64\), "
                                                        r"\(2, 512, 64\)\)"):
    init_from.load_params(config, build_experiment(config))
  config = _config()
  config.train.update(init_from=str(root / "base"), init_from_step=3)
  with pytest.raises(FileNotFoundError, match=f"no checkpoint step 3 .* there are \\[{SOURCE_STEP}\\]"):
    init_from.load_params(config, build_experiment(config))
  config.train.update(init_from=str(root / "missing"), init_from_step=-1)
  with pytest.raises(FileNotFoundError, match="config.train.init_from=.*missing.*no such directory"):
    init_from.load_params(config, build_experiment(config))


def _sft_config(root, workdir_name, steps):
  """tiny fine-tuned on a small chat set from the base source, through the training loop."""
  path = root / "sft.jsonl"
  if not path.exists():
    words = "match pizza storm album stocks flight yoga laptop".split()
    path.write_text("".join(json.dumps({"prompt": f"ad for {w} number {i}", "response": f"the best {w} in town #{i}"})
                            + "\n" for i, w in enumerate(words * 25)))
  config = _config()
  config.data.update(source="sft", tokenizer_path=TOK, pack_window=64)
  config.data.sft.update(train_files=str(path), validation_fraction=0.1)
  config.train.update(steps=steps, log_every=1, tensorboard=False, init_from=str(root / "base"),
                      compilation_cache_dir=str(root / "jax_cache"))
  config.checkpoint.every_steps = 2
  return config, str(root / workdir_name)


def test_fine_tune_resumes_and_never_restarts_from_init_from(sources):
  root, base_params = sources
  config, straight = _sft_config(root, "straight", 4)
  loop.train(config, straight)
  rows = [r for r in metrics.read_metrics(straight) if "loss" in r]
  # Step 1 trained the base's params: its loss is the base model's loss on the first SFT batch.
  experiment = build_experiment(config)
  batch = next(loop.make_train_iterator(config, experiment))
  with mesh_context(experiment.mesh, experiment.rules):
    total, aux = jax.jit(experiment.loss_fn)(jax.device_put(base_params, experiment.layout.param_shardings), batch)
  assert rows[0]["loss"] == pytest.approx(float(total / aux["tokens"]), rel=1e-6)
  assert 0 < rows[0]["target_tokens"] < 8 * 64 * 0.9  # the loss counts response tokens only

  # A fine-tune stopped after step 2, then restarted with an init_from it can no longer use: it resumes from its
  # own checkpoint (params, optimizer, SFT iterator position) and continues the straight run bit for bit.
  config, resumed = _sft_config(root, "resumed", 2)
  loop.train(config, resumed)
  config.train.update(steps=4, init_from=str(root / "other"))  # would fail to load (mlp_dim 128) if it were read
  assert loop.train(config, resumed)["step"] == 4
  got = [r for r in metrics.read_metrics(resumed) if "loss" in r]
  assert [r["step"] for r in got] == [1, 2, 3, 4]
  for g, w in zip(got, rows):
    assert (g["loss"], g["grad_norm"]) == (w["loss"], w["grad_norm"]), g["step"]
