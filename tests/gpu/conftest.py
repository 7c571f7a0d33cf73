"""GPU-only tests: every test here carries the `gpu` marker and skips, with the reason, when JAX sees no GPU.

tools/gpu_check.sh runs them with JAX_PLATFORMS=cuda,cpu, so the GPU is the default backend and the 8 fake CPU
devices of tests/conftest.py are still there for the CPU side of a comparison.
"""

import jax
import pytest


def gpu_devices() -> list[jax.Device]:
  try:
    return jax.devices("gpu")
  except RuntimeError:  # no GPU backend in this jaxlib / JAX_PLATFORMS
    return []


def pytest_collection_modifyitems(config, items):
  del config
  here = __file__.rsplit("/", 1)[0]
  reason = None if gpu_devices() else (
      f"no GPU visible to JAX (backends: {sorted({d.platform for d in jax.devices()})}); "
      "run tools/gpu_check.sh on a GPU host")
  for item in items:
    if str(item.fspath).startswith(here):
      item.add_marker(pytest.mark.gpu)
      if reason:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def gpu() -> jax.Device:
  return gpu_devices()[0]
