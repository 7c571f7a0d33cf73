"""Draws a run's loss and throughput curves from `<workdir>/metrics.jsonl` to a PNG.

  python tools/plot_metrics.py --workdir=/tmp/tiny [--out=/tmp/tiny/metrics.png]
"""

import os

from absl import app, flags, logging

from tweetjax import paths
from tweetjax.train.metrics import read_metrics
from tweetjax.train.plot import plot_curves

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding metrics.jsonl.")
_OUT = flags.DEFINE_string("out", "", "PNG path; default <workdir>/metrics.png.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  paths.resolve_path_flags(_WORKDIR, _OUT)  # relative to where the command started
  rows = read_metrics(_WORKDIR.value)
  if not rows:
    raise app.UsageError(f"{os.path.join(_WORKDIR.value, 'metrics.jsonl')}: no metrics rows "
                         f"(is --workdir a training workdir?)")
  out = _OUT.value or os.path.join(_WORKDIR.value, "metrics.png")
  plot_curves(rows, out)
  logging.info("wrote %s (%d rows, steps %d..%d)", out, len(rows), rows[0]["step"], rows[-1]["step"])
  print(out)


if __name__ == "__main__":
  app.run(main)
