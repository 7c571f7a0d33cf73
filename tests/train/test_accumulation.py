"""Gradient accumulation over k microbatches gives the update of one big batch."""

import jax
import numpy as np

from tests.helpers import load_config
from tweetjax.data.token_stream import TokenStreamIterator
from tweetjax.train.experiment import build_experiment


def _relative_error(a, b):
  a, b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  num = sum(float(np.sum((np.asarray(x, np.float64) - y) ** 2)) for x, y in zip(a, b))
  den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in b)
  return (num / den) ** 0.5


def test_four_microbatches_equal_one_batch():
  results = {}
  for microbatches in (1, 4):
    config = load_config("tiny")
    config.train.microbatches = microbatches
    config.optimizer.warmup_steps = 0  # A zero first learning rate would make the params check vacuous.
    config.mesh.update(data=2, fsdp=1, tensor=1)
    experiment = build_experiment(config, devices=jax.devices()[:2])
    state = experiment.init_state()
    batch = next(TokenStreamIterator(0, 16, 128, 1024, experiment.mesh))
    before = jax.device_get(state.params)
    state, metrics = experiment.train_step()(state, batch)
    results[microbatches] = (jax.device_get(state.params), before, jax.device_get(metrics))
  (params_1, before, metrics_1), (params_4, _, metrics_4) = results[1], results[4]
  np.testing.assert_allclose(metrics_4["loss"], metrics_1["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics_4["grad_norm"], metrics_1["grad_norm"], rtol=1e-6)
  # The step moves the params by a few percent, so agreeing to 1e-6 pins the update to ~1e-5 of itself. (Adam's
  # first update is ~lr * g / (|g| + eps): elements with |g| near eps amplify rounding, so updates are not compared
  # elementwise.)
  assert _relative_error(params_1, before) > 1e-3, "the step must actually move the params"
  assert _relative_error(params_4, params_1) < 1e-6
