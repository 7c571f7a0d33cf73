"""Small shared test utilities."""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def process_env() -> dict[str, str]:
  """The environment for a tool run as a subprocess on the CPU, without this process's fake-device or
  multi-process settings (the test or tools/launch_local.py sets those)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "PJRT_NPROC")}
  env["JAX_PLATFORMS"] = "cpu"
  return env


def load_config(name: str, arg: str | None = None):
  """experiments/<name>.py's get_config(arg), unlocked so tests can adjust it."""
  path = os.path.join(REPO, "experiments", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.unlock()
  return config


def assert_trees_close(actual, expected, rtol: float, atol: float = 0.0, what: str = "tree"):
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(jax.device_get(actual))
  flat_e, tree_e = jax.tree_util.tree_flatten_with_path(jax.device_get(expected))
  assert tree_a == tree_e, f"{what}: tree structures differ"
  for (path, a), (_, e) in zip(flat_a, flat_e):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol,
                               err_msg=f"{what} at {jax.tree_util.keystr(path)}")


def next_batches(iterator, n: int) -> list:
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b) -> None:
  """Two sequences of batch dicts are equal, array by array."""
  for x, y in zip(a, b, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def train_on_layout(config, params, batches, devices=None):
  """(loss, grads) of the first batch and the params after one optimizer step per batch, on config's mesh.

  The equivalence tests' runner: params (host arrays) are placed on this layout's shardings, grads come from
  `loss_and_grads` with config.train.microbatches, and the steps from the real jitted train step.
  """
  from tweetjax.data.token_stream import to_global_array  # pylint: disable=g-import-not-at-top
  from tweetjax.parallel.rules import batch_sharding, mesh_context, replicated  # pylint: disable=g-import-not-at-top
  from tweetjax.train.experiment import build_experiment  # pylint: disable=g-import-not-at-top
  from tweetjax.train.state import state_from_params  # pylint: disable=g-import-not-at-top
  from tweetjax.train.step import loss_and_grads  # pylint: disable=g-import-not-at-top

  experiment = build_experiment(config, devices=devices)
  mesh = experiment.mesh
  data = [to_global_array(b, mesh) for b in batches]
  microbatches = int(config.train.microbatches)
  grad_fn = jax.jit(lambda p, b: loss_and_grads(experiment.loss_fn, p, b, microbatches),
                    in_shardings=(experiment.layout.param_shardings, batch_sharding(mesh)),
                    out_shardings=(experiment.layout.param_shardings, replicated(mesh)))
  with mesh_context(mesh, experiment.rules):
    grads, metrics = grad_fn(jax.device_put(params, experiment.layout.param_shardings), data[0])
  state = state_from_params(params, experiment.tx, experiment.layout, mesh, experiment.rules)
  step = experiment.train_step()
  for batch in data:
    state, _ = step(state, batch)
  return float(metrics["loss"]), jax.device_get(grads), jax.device_get(state.params)


def relative_errors(got, want):
  """Per leaf: |got - want| / |want| in the L2 norm."""
  return jax.tree.map(lambda g, w: float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)), got, want)


# fp32 tolerances of the layout-equivalence tests (tests/train/test_equivalence.py explains PARAM_RTOL).
EQUIVALENCE_RTOL = 1e-5
EQUIVALENCE_PARAM_RTOL = 3e-5


def assert_same_training(got, want, init_params, rtol=EQUIVALENCE_RTOL, param_rtol=EQUIVALENCE_PARAM_RTOL):
  """`train_on_layout` results of a layout vs the single-device reference: loss and grads within rtol, params
  after the steps within param_rtol, and the params moved (the comparison is not trivially of the init)."""
  (loss, grads, params), (want_loss, want_grads, want_params) = got, want
  assert abs(loss - want_loss) / abs(want_loss) < rtol, (loss, want_loss)
  grad_errors = relative_errors(grads, want_grads)
  assert max(jax.tree.leaves(grad_errors)) < rtol, grad_errors
  param_errors = relative_errors(params, want_params)
  assert max(jax.tree.leaves(param_errors)) < param_rtol, param_errors
  moved = relative_errors(params, init_params)
  assert min(jax.tree.leaves(moved)) > 1e-4, moved


def small_config(mesh=None, moe=False, **train):
  """4 layers of d_model 32, 16 rows of 32 tokens: compiles in seconds on 8 fake devices."""
  config = load_config("tiny")
  config.mesh.update({axis: 1 for axis in config.mesh.keys()})
  config.mesh.update(mesh or {})
  config.model.update(vocab_size=256, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64, dtype="float32")
  if moe:  # capacity E / K: nothing is ever dropped, whatever the capacity groups
    config.model.update(num_experts=4, experts_per_token=2, moe_every=2, expert_mlp_dim=32, capacity_factor=2.0)
  config.data.update(seq_len=32, global_batch_size=16)
  config.optimizer.update(warmup_steps=0, eps=1e-6, learning_rate=3e-3)
  config.train.update(train)
  return config
