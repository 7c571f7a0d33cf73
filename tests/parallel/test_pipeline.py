"""Pipeline parallelism: the schedule's bookkeeping, validation messages, and checkpoints that move between
pipelined and plain meshes (the layouts' equivalence with one device: tests/parallel/test_scale_equivalence.py)."""

import jax
import numpy as np
import pytest

from tests.helpers import small_config
from tweetjax.parallel import pipeline
from tweetjax.parallel.mesh import MeshError
from tweetjax.train.checkpoint import CheckpointManager
from tweetjax.train.experiment import build_experiment


def test_bubble_and_schedule():
  assert pipeline.bubble_fraction(1, 8) == 0.0
  assert pipeline.bubble_fraction(4, 4) == pytest.approx(3 / 7)  # GPipe: (S - 1) / (M + S - 1)
  assert pipeline.bubble_fraction(4, 4, repeats=2) == pytest.approx(3 / 11)  # circular: (S - 1) / (R M + S - 1)
  spec = pipeline.PipelineSpec(stages=2, microbatches=4, repeats=2)
  assert spec.iterations == 9 and spec.bubble == pytest.approx(1 / 9)
  # 8 units, 2 stages, 2 repeats: chunks of 2 units alternate between the stages.
  assert pipeline.stage_of_units(spec, 8) == [(0, 0), (0, 0), (1, 0), (1, 0), (0, 1), (0, 1), (1, 1), (1, 1)]
  units = jax.numpy.arange(8)
  stage_major = pipeline.stage_major(units, spec)  # [stage, repeat, unit]
  np.testing.assert_array_equal(stage_major.reshape(-1), [0, 1, 4, 5, 2, 3, 6, 7])
  np.testing.assert_array_equal(pipeline.layer_major(stage_major), units)


@pytest.mark.parametrize("mesh,model,train,message", [
    (dict(stage=3), {"num_layers": 6}, {}, r"has 3 devices in all but 8"),
    (dict(stage=8), {}, {"pipeline_microbatches": 8},
     r"model.num_layers=4 is not divisible by mesh.stage=8 x train.pipeline_repeats=1"),
    (dict(stage=2, data=4), {}, {"pipeline_microbatches": 2, "pipeline_repeats": 4},
     r"model.num_layers=4 is not divisible by mesh.stage=2 x train.pipeline_repeats=4 = 8"),
    (dict(stage=4, data=2), {}, {"pipeline_microbatches": 2},
     r"train.pipeline_microbatches=2 is smaller than mesh.stage=4"),
    (dict(stage=2, data=4), {}, {"pipeline_microbatches": 8},
     r"16 rows per step .* train.pipeline_microbatches=8 do not give a multiple of the 4 batch shards"),
    (dict(stage=2, data=4), {"scan_layers": False}, {"pipeline_microbatches": 2}, r"model.scan_layers=True"),
])
def test_validation_names_the_config_key(mesh, model, train, message):
  config = small_config(mesh, **train)
  config.model.update(model)
  with pytest.raises(MeshError, match=message):
    build_experiment(config)


def test_bad_pipeline_keys_are_config_errors():
  config = small_config(dict(stage=2, data=4), pipeline_microbatches=0, pipeline_repeats=0)
  with pytest.raises(ValueError, match=r"2 invalid config values:\n  config.train.pipeline_microbatches=0: expected a "
                                      r"positive integer\n  config.train.pipeline_repeats=0: expected a positive"):
    build_experiment(config)


def test_moe_units_are_groups_of_layers():
  config = small_config(dict(stage=4, expert=2), moe=True, pipeline_microbatches=4)
  with pytest.raises(MeshError, match=r"model.num_layers / model.moe_every=2 is not divisible by mesh.stage=4"):
    build_experiment(config)


def test_checkpoint_moves_between_pipeline_and_plain_meshes(tmp_path):
  """Written on (stage=2, fsdp=2, tensor=2) with 2 repeats, read back exactly on one device; written there and read
  back exactly on (stage=4, data=2): one logical layout ([layers, ...] in layer order) on every mesh."""
  experiment = build_experiment(small_config(dict(stage=2, fsdp=2, tensor=2), pipeline_microbatches=2,
                                             pipeline_repeats=2))
  state = experiment.init_state()
  # Distinct Adam moments, so that a mix-up between leaves, layers or shards cannot go unnoticed.
  state = state.replace(opt_state=jax.tree.map(lambda x: x + 0.5 if jax.numpy.issubdtype(x.dtype, np.floating)
                                               else x, state.opt_state))
  host = jax.device_get(state)
  plain = build_experiment(small_config(dict(data=1)), devices=jax.devices()[:1])
  other_pipeline = build_experiment(small_config(dict(stage=4, data=2), pipeline_microbatches=4))
  with CheckpointManager(str(tmp_path)) as manager:
    manager.save(1, state, force=True)
    restored = manager.restore(1, plain.layout).state
    jax.tree.map(np.testing.assert_array_equal, jax.device_get((restored.params, restored.opt_state)),
                 (host.params, host.opt_state))
    manager.save(2, restored, force=True)
    back = manager.restore(2, other_pipeline.layout).state
  jax.tree.map(np.testing.assert_array_equal, jax.device_get((back.params, back.opt_state)),
               (host.params, host.opt_state))
  query_sharding = other_pipeline.layout.param_shardings["layers"]["attention"]["query"]
  assert query_sharding.spec[0] == "stage"  # the restored layer stack is split over the stages
