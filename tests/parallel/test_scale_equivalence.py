"""Pipeline and context-parallel layouts train exactly like one device.

Same init, same batches, fp32; loss and grads of the first batch within 1e-5 (relative, per param, L2) and params
after 3 AdamW steps within 3e-5 of the single-device run (tests/train/test_equivalence.py's tolerances). The
layouts cover circular repeats, remat, gradient accumulation, FSDP, tensor and expert parallelism under the stage
axis, ring attention over the load-balanced context split, and both at once. One reference run serves the dense
layouts (a small 4-layer model that compiles in seconds on 8 fake devices).
"""

import jax
import numpy as np
import pytest

from tests.helpers import assert_same_training, small_config, train_on_layout
from tweetjax.data.token_stream import synthetic_batch
from tweetjax.train.experiment import build_experiment

STEPS = 3


def batches(config, equal_tokens=False):
  out = []
  for k in range(STEPS):
    b = synthetic_batch(7, k, config.data.global_batch_size, config.data.seq_len, config.model.vocab_size)
    if equal_tokens:
      # Router losses are per-microbatch means, weighted by the microbatch's tokens under gradient accumulation
      # and equally under a pipeline: with the same token count in every microbatch both are the same number.
      b["segment_ids"] = np.maximum(b["segment_ids"], 1)
      b["weights"] = np.ones_like(b["weights"])
    out.append(b)
  return out


@pytest.fixture(scope="module")
def dense_reference():
  config = small_config()
  params = jax.device_get(build_experiment(config, devices=jax.devices()[:1]).init_state().params)
  return params, train_on_layout(config, params, batches(config), jax.devices()[:1])


@pytest.mark.parametrize("mesh,train", [
    (dict(stage=2, data=4), dict(pipeline_microbatches=4, pipeline_repeats=2)),
    (dict(stage=4, tensor=2), dict(pipeline_microbatches=4)),
    (dict(stage=2, fsdp=2, tensor=2), dict(pipeline_microbatches=2, microbatches=2)),
    (dict(context=4, data=2), {}),
    (dict(context=2, stage=2, tensor=2), dict(pipeline_microbatches=2)),
], ids=["stage=2,data=4,repeats=2", "stage=4,tensor=2,remat", "stage=2,fsdp=2,tensor=2,accumulate=2",
        "context=4,data=2", "context=2,stage=2,tensor=2"])
def test_layout_matches_single_device(dense_reference, mesh, train):
  params, reference = dense_reference
  config = small_config(mesh, **train)
  if mesh.get("stage") == 4:
    config.model.remat_policy = "full"  # remat inside the stages
  assert_same_training(train_on_layout(config, params, batches(config)), reference, params)


def test_moe_pipeline_matches_single_device():
  """MoE groups of 2 layers on 2 stages with experts all-to-all inside each stage, vs one device accumulating
  over the same 4 microbatches (router statistics are per microbatch in both)."""
  reference_config = small_config(moe=True, microbatches=4)
  params = jax.device_get(build_experiment(reference_config, devices=jax.devices()[:1]).init_state().params)
  want = train_on_layout(reference_config, params, batches(reference_config, True), jax.devices()[:1])
  config = small_config(dict(stage=2, expert=2, data=2), moe=True, pipeline_microbatches=4)
  assert_same_training(train_on_layout(config, params, batches(config, True)), want, params)


