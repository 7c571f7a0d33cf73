"""The jitted train step compiles once, donates its state, and moves nothing between host and device by itself."""

import jax
import pytest

from tests.helpers import backend_compiles, load_config
from tweetjax.train.experiment import build_experiment
from tweetjax.train.loop import make_train_iterator

_STEPS = 4


@pytest.fixture(scope="module")
def run():
  """tiny on its 8-device (data=2, fsdp=2, tensor=2) mesh: compile events and buffers around each of 4 steps."""
  config = load_config("tiny")
  experiment = build_experiment(config)
  state = experiment.init_state()
  step_fn = experiment.train_step()
  batches = make_train_iterator(config, experiment)
  prepared = [next(batches) for _ in range(_STEPS)]  # explicit host->device placement, before the guard

  per_step, donated, losses = [], [], []
  with backend_compiles() as compiles:
    for i, batch in enumerate(prepared):
      before = len(compiles)
      old_params = jax.tree.leaves(state.params)
      if i == 0:
        state, metrics = step_fn(state, batch)
      else:
        with jax.transfer_guard("disallow"):  # an implicit host<->device copy inside the step would raise
          state, metrics = step_fn(state, batch)
      losses.append(metrics["loss"])
      jax.block_until_ready(metrics)
      per_step.append(len(compiles) - before)
      donated.append(all(leaf.is_deleted() for leaf in old_params))
  return {"per_step": per_step, "donated": donated, "cache_size": step_fn.jitted._cache_size(),
          "losses": [float(x) for x in jax.device_get(losses)]}


def test_compiles_only_on_the_first_step(run):
  assert run["per_step"][0] >= 1  # the listener sees compilations at all
  assert run["per_step"][1:] == [0] * (_STEPS - 1)
  assert run["cache_size"] == 1


def test_state_is_donated_every_step(run):
  assert run["donated"] == [True] * _STEPS
  assert all(loss == loss for loss in run["losses"])  # finite: the steps really ran
