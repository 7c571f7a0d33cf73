"""Every test process sees 8 fake CPU devices; tests that need another count start a subprocess."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tweetjax  # noqa: E402,F401  (sizes the XLA:CPU thread pool for the fake devices: tweetjax/perf/env.py)
import jax  # noqa: E402  (must come after XLA_FLAGS is set)

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"
