"""PNG plots of a sweep (matplotlib, Agg backend): loss curves, final loss vs each swept key, loss vs compute,
and the scaling-law fit with its residuals."""

from __future__ import annotations

import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from tweetjax.sweep import spec  # noqa: E402
from tweetjax.sweep.report import Fit, PointResult, swept_groups  # noqa: E402


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _is_numeric(values: Sequence[Any]) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def loss_curves(results: Sequence[PointResult], metric: str, path: str) -> str:
  fig, ax = plt.subplots(figsize=(8, 5))
  for result in results:
    steps, values = result.values(metric)
    if len(values):
      ax.plot(steps, values, label=result.point.name, lw=1.2)
  ax.set_xlabel("step")
  ax.set_ylabel(metric)
  ax.set_title(f"{metric} per point")
  ax.grid(alpha=0.3)
  if len(results) <= 24:
    ax.legend(fontsize=6, loc="upper right")
  return _save(fig, path)


def final_vs_key(results: Sequence[PointResult], metric: str, group: Sequence[str], path: str) -> str | None:
  """Final metric of the finished points vs one swept key (and the keys zipped with it); one line per combination
  of the other keys."""
  key = group[0]
  points = [r for r in results if key in r.point.overrides and r.status == "done" and r.final(metric) is not None]
  values = [r.point.overrides[key] for r in points]
  if not points:
    return None
  others = [g[0] for g in swept_groups(points) if key not in g]
  groups: dict[str, list[PointResult]] = {}
  for r in points:
    label = ", ".join(f"{spec._short_keys(others)[k]}={spec.format_value(r.point.overrides[k])}"  # pylint: disable=protected-access
                      for k in others if k in r.point.overrides)
    groups.setdefault(label, []).append(r)
  numeric = _is_numeric(values)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  categories = sorted({spec.format_value(v) for v in values})
  for label, members in groups.items():
    xs = [m.point.overrides[key] if numeric else categories.index(spec.format_value(m.point.overrides[key]))
          for m in members]
    order = np.argsort(xs)
    ys = [members[i].final(metric) for i in order]
    ax.plot([xs[i] for i in order], ys, "o-", label=label or None, ms=4)
  if numeric and min(values) > 0 and max(values) / min(values) >= 10:
    ax.set_xscale("log")
  if not numeric:
    ax.set_xticks(range(len(categories)), categories, rotation=30)
  ax.set_xlabel(key + (f"  (with {', '.join(group[1:])})" if len(group) > 1 else ""), fontsize=8)
  ax.set_ylabel(f"final {metric}")
  ax.grid(alpha=0.3)
  if 1 < len(groups) <= 16:
    ax.legend(fontsize=6)
  return _save(fig, path)


def loss_vs_compute(results: Sequence[PointResult], metric: str, path: str) -> str | None:
  points = [r for r in results if r.flops and r.status == "done" and r.final(metric) is not None]
  if not points:
    return None
  fig, ax = plt.subplots(figsize=(7, 4.5))
  sizes = sorted({r.N for r in points})
  cmap = plt.get_cmap("viridis")
  for i, n in enumerate(sizes):
    members = sorted((r for r in points if r.N == n), key=lambda r: r.flops)
    ax.plot([r.flops for r in members], [r.final(metric) for r in members], "o-", ms=4,
            color=cmap(i / max(len(sizes) - 1, 1)), label=f"N={n:,}")
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs")
  ax.set_ylabel(f"final {metric}")
  ax.set_title("loss vs compute (one line per model size)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  return _save(fig, path)


def scaling_fit(fit: Fit, path: str) -> str:
  fig, (ax, ax_res) = plt.subplots(1, 2, figsize=(12, 4.5))
  sizes = sorted(set(fit.N))
  cmap = plt.get_cmap("viridis")
  d_grid = np.geomspace(fit.D.min() / 2, fit.D.max() * 2, 100)
  for i, n in enumerate(sizes):
    color = cmap(i / max(len(sizes) - 1, 1))
    mask = fit.N == n
    ax.scatter(fit.D[mask], fit.L[mask], color=color, s=18, label=f"N={int(n):,}")
    ax.plot(d_grid, fit.law.loss(n, d_grid), color=color, lw=1)
  law = fit.law
  ax.set_xscale("log")
  ax.set_xlabel("training tokens D")
  ax.set_ylabel(fit.metric)
  ax.set_title(f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}", fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  flops = 6.0 * fit.N * fit.D
  ax_res.scatter(flops, fit.residuals, c=[sizes.index(n) for n in fit.N], cmap="viridis", s=18)
  ax_res.axhline(0.0, color="k", lw=0.8)
  ax_res.set_xscale("log")
  ax_res.set_xlabel("C = 6 N D")
  ax_res.set_ylabel("log predicted - log observed")
  ax_res.set_title("residuals")
  ax_res.grid(alpha=0.3, which="both")
  return _save(fig, path)


def draw_all(results: Sequence[PointResult], metric: str, fit: Fit | None, out_dir: str) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = [loss_curves(results, metric, os.path.join(out_dir, "loss_curves.png"))]
  for group in swept_groups([r for r in results if r.status == "done"]):
    safe = spec._UNSAFE.sub("-", group[0])  # pylint: disable=protected-access
    paths.append(final_vs_key(results, metric, group, os.path.join(out_dir, f"final_{metric}_vs_{safe}.png")))
  paths.append(loss_vs_compute(results, metric, os.path.join(out_dir, "loss_vs_compute.png")))
  if fit is not None:
    paths.append(scaling_fit(fit, os.path.join(out_dir, "scaling_fit.png")))
  return [p for p in paths if p]
