"""Trains a model from an experiment config.

  python tools/train.py --config=experiments/tiny.py --workdir=/tmp/run --config.train.steps=100
"""

from absl import app, flags, logging
from ml_collections import config_flags

from tweetjax import paths
from tweetjax.perf import env
from tweetjax.train.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  paths.resolve_tool_paths(_CONFIG.value, _WORKDIR)  # relative to where the command started
  env.setup_environment(_CONFIG.value)  # XLA flags and multi-process start-up, before JAX touches a device
  final = train(_CONFIG.value, _WORKDIR.value)
  logging.info("finished: %s", final)


if __name__ == "__main__":
  app.run(main)
