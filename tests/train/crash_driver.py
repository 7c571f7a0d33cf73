"""Runs `loop.train` in a subprocess and SIGKILLs itself at a chosen point (for the crash/resume tests).

  python -m tests.train.crash_driver WORKDIR STEPS KILL
KILL: "none" | "batch:N" (while fetching global batch N, 0-based) | "save_write:S" (inside the save of step S, its
temporary directory half written) | "before_commit:S" (save of S fully written, not yet renamed to its final
name) | "after_commit:S" (just after S became complete) | "metrics_row:S" (half-way through writing the row of S).
"""

import os
import signal
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tweetjax  # noqa: E402,F401  (sizes the XLA:CPU thread pool for the fake devices)
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # As tests/conftest.py, so curves compare bitwise.

from absl import logging  # noqa: E402
from orbax.checkpoint._src.path import atomicity  # noqa: E402

from tests.helpers import load_config  # noqa: E402
from tweetjax.train import checkpoint as checkpoint_lib  # noqa: E402
from tweetjax.train import loop, metrics  # noqa: E402


def run_config(steps: int, cache_dir: str = "none"):
  config = load_config("tiny")
  config.train.steps = steps
  config.train.log_every = 1
  config.train.compilation_cache_dir = cache_dir
  config.train.tensorboard = False
  config.checkpoint.every_steps = 2
  config.checkpoint.max_to_keep = 3
  return config


def _die():
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def install(kill: str) -> None:
  if kill == "none":
    return
  point, n = kill.split(":")
  n = int(n)
  if point == "batch":
    make = loop.make_train_iterator

    def make_killing(config, experiment):
      inner = make(config, experiment)
      original_next = type(inner).__next__

      class Killing(type(inner)):
        def __next__(self):
          if self.get_state()["step"] == n:
            _die()
          return original_next(self)

      inner.__class__ = Killing
      return inner

    loop.make_train_iterator = make_killing
  elif point == "save_write":
    save = checkpoint_lib.DataStateHandler.save

    def save_killing(self, directory, args):
      save(self, directory, args)
      if any(part.startswith(f"{n}.orbax-checkpoint-tmp") for part in str(directory).split(os.sep)):
        _die()

    checkpoint_lib.DataStateHandler.save = save_killing
  elif point in ("before_commit", "after_commit"):
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_killing(self):
      if self._final_path.name == str(n) and point == "before_commit":
        _die()
      await finalize(self)
      if self._final_path.name == str(n) and point == "after_commit":
        _die()

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_killing
  elif point == "metrics_row":
    write = metrics.MetricsWriter.write

    def write_killing(self, step, scalars):
      if step == n:
        self._file.write('{"step": %d, "loss": 1.2' % step)  # A torn row, as a crash mid-write leaves.
        self._file.flush()
        _die()
      write(self, step, scalars)

    metrics.MetricsWriter.write = write_killing
  else:
    raise ValueError(kill)


def main():
  workdir, steps, kill = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  logging.set_verbosity(logging.INFO)
  install(kill)
  cache_dir = os.path.join(os.path.dirname(os.path.abspath(workdir)), "jax_cache")
  result = loop.train(run_config(steps, cache_dir), workdir)
  print("RESULT", result.get("step"), result.get("preempted"), flush=True)


if __name__ == "__main__":
  main()
