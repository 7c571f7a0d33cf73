"""Every parallel layout computes the single-device numbers.

Same init, same batches: loss and grads on 1 device vs each 8-device layout agree within 1e-5 (relative, per
parameter, in the L2 norm) in fp32, and the params after 3 AdamW steps within 3e-5.
"""

import jax
import pytest

from tests.helpers import assert_same_training, load_config, train_on_layout
from tweetjax.data.token_stream import synthetic_batch
from tweetjax.train.experiment import build_experiment

LAYOUTS = [dict(data=8), dict(fsdp=8), dict(data=2, tensor=4), dict(data=2, fsdp=2, tensor=2)]
STEPS = 3
# Adam divides by sqrt(v): an entry whose true gradient is ~0 gets a sign-of-roundoff update of size lr in fp32.
# An eps above that roundoff floor (grads here are ~1e-3) keeps the comparison about the layouts, not about noise.
EPS = 1e-6
# Even so, Adam's per-entry normalisation turns the grads' ~1e-6 relative roundoff into a larger one in the params:
# measured up to 1.0e-5 (the embedding, whose rarely-seen rows get the smallest gradients) after 3 steps: hence
# tests.helpers.EQUIVALENCE_PARAM_RTOL = 3e-5 (loss and grads: EQUIVALENCE_RTOL = 1e-5).


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
  return train_on_layout(config, params, batches(config), devices)


@pytest.fixture(scope="module")
def single_device():
  experiment = build_experiment(config_for({}), devices=jax.devices()[:1])
  params = jax.device_get(experiment.init_state().params)
  return params, run({}, jax.devices()[:1], params)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: ",".join(f"{k}={v}" for k, v in l.items()))
def test_layout_matches_single_device(single_device, layout):
  params, reference = single_device
  assert_same_training(run(layout, None, params), reference, params)
