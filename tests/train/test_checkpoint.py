"""Checkpoints: resharding restore across meshes, fallback past damaged steps, keep policy, refusals."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import load_config
from tweetjax.data.token_stream import TokenStreamIterator
from tweetjax.train import checkpoint as checkpoint_lib
from tweetjax.train.checkpoint import CheckpointManager, restore_params
from tweetjax.train.experiment import build_experiment

SAVED_STEP = 3


def _tiny(**mesh):
  config = load_config("tiny")
  if mesh:
    config.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
    config.mesh.update(**mesh)
  return config


def _eval_loss(experiment, params):
  batch = TokenStreamIterator(0, 16, 128, 1024, experiment.mesh)
  batch.set_state({"step": SAVED_STEP})
  sums = jax.device_get(experiment.eval_step()(params, next(batch)))
  return float(sums["ce_sum"]) / float(sums["tokens"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A state on the (data=2, fsdp=2, tensor=2) mesh with non-trivial optimizer moments, saved at step 3."""
  experiment = build_experiment(_tiny())
  state = experiment.init_state()
  # Fill Adam's moments with distinct values so that a mix-up between leaves or shards cannot go unnoticed.
  state = state.replace(opt_state=jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                               state.opt_state), step=jnp.int32(SAVED_STEP))
  workdir = str(tmp_path_factory.mktemp("ckpt") / "wd")
  with CheckpointManager(workdir) as manager:
    assert manager.save(SAVED_STEP, state, {"step": SAVED_STEP}, config=_tiny(), force=True)
  host = jax.device_get(state)
  return workdir, host, _eval_loss(experiment, state.params)


@pytest.mark.parametrize("mesh,num_devices", [({"data": 8}, 8), ({"fsdp": 4}, 4), ({"data": 1}, 1),
                                              ({"data": 2, "fsdp": 2, "tensor": 2}, 8)])
def test_restore_onto_another_mesh(saved, mesh, num_devices):
  workdir, host, loss = saved
  experiment = build_experiment(_tiny(**mesh), devices=jax.devices()[:num_devices])
  with CheckpointManager(workdir) as manager:
    restored = manager.restore_latest(experiment.layout)
  assert restored.step == SAVED_STEP and restored.data_state == {"step": SAVED_STEP}
  assert restored.config["mesh"]["tensor"] == 2, "the writer's config travels with the checkpoint"
  leaves = jax.tree.leaves(restored.state)
  assert all(x.sharding == s for x, s in zip(leaves, jax.tree.leaves(experiment.layout.state_shardings)))
  for got, want in zip(jax.tree.leaves(jax.device_get(restored.state)), jax.tree.leaves(host)):
    assert np.array_equal(got, want)
  # The next batch's loss on the new mesh (a different reduction order: equal to fp32 rounding).
  np.testing.assert_allclose(_eval_loss(experiment, restored.state.params), loss, rtol=1e-5)


def test_restore_params_only(saved):
  workdir, host, _ = saved
  on_host = restore_params(workdir)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(on_host))
  for got, want in zip(jax.tree.leaves(on_host), jax.tree.leaves(host.params)):
    assert np.array_equal(got, want)
  experiment = build_experiment(_tiny(data=1), devices=jax.devices()[:1])
  placed = restore_params(os.path.join(workdir, "checkpoints"), experiment.layout, step=SAVED_STEP)
  assert jax.tree.leaves(placed)[0].sharding == jax.tree.leaves(experiment.layout.param_shardings)[0]
  with pytest.raises(FileNotFoundError, match="no checkpoint step 7"):
    restore_params(workdir, step=7)


def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_used(saved, tmp_path):
  workdir = str(tmp_path / "wd")
  shutil.copytree(saved[0], workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  # A newer complete step whose array data was truncated (a disk or copy fault) ...
  shutil.copytree(os.path.join(checkpoints, str(SAVED_STEP)), os.path.join(checkpoints, "5"))
  damaged = 0
  for directory, _, files in os.walk(os.path.join(checkpoints, "5", "params")):
    for name in files:
      if "ocdbt.process" in directory or name.startswith("d"):
        with open(os.path.join(directory, name), "r+b") as f:
          f.truncate(7)
        damaged += 1
  assert damaged
  # ... and a newer save that never finished.
  os.makedirs(os.path.join(checkpoints, "7.orbax-checkpoint-tmp", "params"))
  experiment = build_experiment(_tiny())
  with CheckpointManager(workdir) as manager:
    restored = manager.restore_latest(experiment.layout)
    assert restored.step == SAVED_STEP
    assert manager.all_steps() == [SAVED_STEP]
  assert [n.split(".")[0] for n in os.listdir(os.path.join(workdir, "checkpoints_corrupt"))] == ["5"]
  assert [n.split(".")[0] for n in os.listdir(os.path.join(workdir, "checkpoints_incomplete"))] == ["7"]


def test_incompatible_config_is_an_error_not_corruption(saved):
  config = _tiny()
  config.model.mlp_dim = 128
  experiment = build_experiment(config)
  with CheckpointManager(saved[0]) as manager:
    with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match="mlp"):
      manager.restore_latest(experiment.layout)
    assert manager.all_steps() == [SAVED_STEP], "nothing is moved aside for a config mismatch"


def test_keep_last_k_plus_every_m(saved, tmp_path):
  state = saved[1]  # Host (numpy) copies save as well and compile nothing new.
  with CheckpointManager(str(tmp_path), every_steps=1, max_to_keep=2, keep_every_steps=4) as manager:
    for step in range(1, 10):
      assert manager.save(step, state)
    manager.wait()
    assert manager.all_steps() == [4, 8, 9]
    assert not manager.save(9, state, force=True), "an existing step is never overwritten"


def test_nonfinite_state_is_never_written(saved, tmp_path):
  state = saved[1]
  poisoned = jax.tree.map(np.copy, state.params)
  poisoned["final_norm"]["scale"][3] = np.inf
  with CheckpointManager(str(tmp_path)) as manager:
    with pytest.raises(checkpoint_lib.NonFiniteStateError, match="step 1"):
      manager.save(1, state.replace(params=poisoned), force=True)
  assert os.listdir(os.path.join(str(tmp_path), "checkpoints")) == []


def test_only_the_newest_incomplete_checkpoints_are_kept(tmp_path):
  """Twenty interrupted saves over a run's restarts leave `keep_incomplete` of them; corrupt ones are never pruned."""
  workdir = str(tmp_path)
  corrupt = os.path.join(workdir, "checkpoints_corrupt", "5.20260101-000000")
  os.makedirs(corrupt)
  for restart in range(20):
    with CheckpointManager(workdir, keep_incomplete=3) as manager:
      os.makedirs(os.path.join(manager.directory, f"{restart}.orbax-checkpoint-tmp-{restart}", "params"))
      os.utime(os.path.join(manager.directory, f"{restart}.orbax-checkpoint-tmp-{restart}"), (restart, restart))
      manager.set_aside_incomplete()
  kept = sorted(int(n.split(".")[0]) for n in os.listdir(os.path.join(workdir, "checkpoints_incomplete")))
  assert kept == [17, 18, 19]
  assert os.path.isdir(corrupt)
  with pytest.raises(ValueError, match="checkpoint.keep_incomplete"):
    CheckpointManager(workdir, keep_incomplete=-1)
