"""Every parallel layout computes the single-device numbers.

Same init, same batches: loss and grads on 1 device vs each 8-device layout agree within 1e-5 (relative, per
parameter, in the L2 norm) in fp32, and the params after 3 AdamW steps within 3e-5.
"""

import jax
import numpy as np
import pytest

from tests.helpers import load_config
from tweetjax.data.token_stream import synthetic_batch, to_global_array
from tweetjax.parallel.rules import batch_sharding, mesh_context, replicated
from tweetjax.train.experiment import build_experiment
from tweetjax.train.state import state_from_params
from tweetjax.train.step import loss_and_grads

LAYOUTS = [dict(data=8), dict(fsdp=8), dict(data=2, tensor=4), dict(data=2, fsdp=2, tensor=2)]
STEPS = 3
RTOL = 1e-5
# Adam divides by sqrt(v): an entry whose true gradient is ~0 gets a sign-of-roundoff update of size lr in fp32.
# An eps above that roundoff floor (grads here are ~1e-3) keeps the comparison about the layouts, not about noise.
EPS = 1e-6
# Even so, Adam's per-entry normalisation turns the grads' ~1e-6 relative roundoff into a larger one in the params:
# measured up to 1.0e-5 (the embedding, whose rarely-seen rows get the smallest gradients) after 3 steps.
PARAM_RTOL = 3e-5


def config_for(layout):
  config = load_config("tiny")
  config.mesh.update({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **layout})
  config.model.dtype = "float32"
  config.optimizer.warmup_steps = 0
  config.optimizer.eps = EPS
  return config


def batches(config):
  return [synthetic_batch(7, k, config.data.global_batch_size, config.data.seq_len, config.model.vocab_size)
          for k in range(STEPS)]


def run(layout, devices, params):
  """Loss, grads (first batch) and params after STEPS optimizer steps, on this layout."""
  config = config_for(layout)
  experiment = build_experiment(config, devices=devices)
  mesh = experiment.mesh
  data = [to_global_array(b, mesh) for b in batches(config)]
  grad_fn = jax.jit(lambda p, b: loss_and_grads(experiment.loss_fn, p, b, 1),
                    in_shardings=(experiment.layout.param_shardings, batch_sharding(mesh)),
                    out_shardings=(experiment.layout.param_shardings, replicated(mesh)))
  with mesh_context(mesh, experiment.rules):
    grads, metrics = grad_fn(jax.device_put(params, experiment.layout.param_shardings), data[0])
  state = state_from_params(params, experiment.tx, experiment.layout, mesh, experiment.rules)
  step = experiment.train_step()
  for batch in data:
    state, _ = step(state, batch)
  return float(metrics["loss"]), jax.device_get(grads), jax.device_get(state.params)


@pytest.fixture(scope="module")
def single_device():
  experiment = build_experiment(config_for({}), devices=jax.devices()[:1])
  params = jax.device_get(experiment.init_state().params)
  return params, run({}, jax.devices()[:1], params)


def relative_errors(got, want):
  return jax.tree.map(lambda g, w: float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)), got, want)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: ",".join(f"{k}={v}" for k, v in l.items()))
def test_layout_matches_single_device(single_device, layout):
  params, (want_loss, want_grads, want_params) = single_device
  loss, grads, new_params = run(layout, None, params)
  assert abs(loss - want_loss) / want_loss < RTOL, (loss, want_loss)
  grad_errors = relative_errors(grads, want_grads)
  assert max(jax.tree.leaves(grad_errors)) < RTOL, grad_errors
  param_errors = relative_errors(new_params, want_params)
  assert max(jax.tree.leaves(param_errors)) < PARAM_RTOL, param_errors
  # The optimizer moved the params: the comparison after 3 steps is not trivially of the init.
  moved = relative_errors(new_params, params)
  assert min(jax.tree.leaves(moved)) > 1e-4, moved
