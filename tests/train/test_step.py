"""The train step: microbatch accumulation, the weight-decay mask, schedules, and that tiny learns."""

import jax
import numpy as np
import optax
import pytest

from tests.helpers import assert_trees_close, load_config
from tweetjax.data.token_stream import TokenStreamIterator, synthetic_batch, to_global_array
from tweetjax.train.experiment import build_experiment
from tweetjax.train.optimizer import learning_rate_schedule, weight_decay_mask
from tweetjax.train.state import state_from_params


def tiny(**overrides):
  config = load_config("tiny")
  config.mesh.update(data=4, fsdp=2, tensor=1)
  config.model.dtype = "float32"
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def test_microbatches_equal_one_big_batch():
  big = build_experiment(tiny())
  params = jax.device_get(big.init_state().params)
  batch = synthetic_batch(3, 0, 16, 128, 1024)
  results = []
  for microbatches in (1, 2):
    experiment = build_experiment(tiny(**{"train.microbatches": microbatches}))
    state = state_from_params(params, experiment.tx, experiment.layout, experiment.mesh, experiment.rules)
    state, metrics = experiment.train_step()(state, to_global_array(batch, experiment.mesh))
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (params_1, metrics_1), (params_2, metrics_2) = results
  np.testing.assert_allclose(metrics_2["loss"], metrics_1["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics_2["grad_norm"], metrics_1["grad_norm"], rtol=1e-5)
  assert metrics_1["tokens"] == metrics_2["tokens"] == batch["weights"].sum()
  assert_trees_close(params_2, params_1, rtol=1e-5, atol=1e-6, what="params after one step")


def test_weight_decay_skips_norm_scales():
  experiment = build_experiment(tiny())
  mask = weight_decay_mask(experiment.layout.abstract_state.params)
  assert mask["layers"]["attention"]["query"] and mask["embed"]["embedding"] and mask["lm_head"]
  assert not mask["layers"]["attention_norm"]["scale"] and not mask["final_norm"]["scale"]


@pytest.mark.parametrize("kind,at_end", [("cosine", 0.1), ("linear", 0.1), ("constant", 1.0)])
def test_schedules_warm_up_then_decay(kind, at_end):
  opt = dict(learning_rate=1.0, warmup_steps=10, decay_steps=0, end_learning_rate_ratio=0.1, schedule=kind)
  schedule = learning_rate_schedule(opt, total_steps=110)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(schedule(110), at_end, atol=1e-6)
  with pytest.raises(ValueError, match="config.optimizer.schedule='step'"):
    learning_rate_schedule(dict(opt, schedule="step"), 10)


def test_tiny_learns_the_synthetic_stream_and_state_is_donated():
  experiment = build_experiment(tiny(**{"optimizer.warmup_steps": 5}))
  state = experiment.init_state()
  step = experiment.train_step()
  batches = TokenStreamIterator(0, 16, 128, 1024, experiment.mesh)
  losses = []
  for _ in range(40):
    previous = state
    state, metrics = step(state, next(batches))
    losses.append(float(metrics["loss"]))
  assert previous.params["lm_head"].is_deleted(), "the train step must donate the incoming state"
  assert int(state.step) == 40
  # log(1024) = 6.93 at init; the Markov stream's entropy is ~1 nat, 40 steps get well below unigram.
  assert losses[0] > 6.5 and np.mean(losses[-5:]) < losses[0] - 1.5, losses
