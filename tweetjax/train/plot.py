"""Loss and throughput curves of a run as a PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from typing import Any, Sequence

PANELS = (("loss", ("loss", "eval_loss")), ("grad norm", ("grad_norm",)), ("learning rate", ("learning_rate",)),
          ("tokens/s", ("tokens_per_s",)), ("MFU", ("mfu",)), ("step time (s)", ("step_time_s",)))


def plot_curves(rows: Sequence[dict[str, Any]], out: str) -> None:
  """rows: metrics.jsonl rows (`tweetjax.train.metrics.read_metrics`)."""
  import matplotlib  # Imported lazily: only plotting needs it.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 3, figsize=(15, 8))
  for ax, (title, keys) in zip(axes.flat, PANELS):
    for key in keys:
      points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, label=key, marker="." if len(points) < 50 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
      ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
