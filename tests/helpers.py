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
