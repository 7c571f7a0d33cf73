"""tweetjax: train and evaluate language models on tweets with JAX (see README.md)."""

from tweetjax.perf import env as _env

# Before JAX creates its CPU client: fake multi-device CPU meshes need a larger XLA:CPU thread pool (perf/env.py).
_env.size_cpu_thread_pool()
