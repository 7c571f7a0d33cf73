"""Sweep results: one row per point from its metrics.jsonl, as a markdown table and a CSV, plus a scaling-law fit.

Each point's metrics.jsonl holds rows of JSON with at least `step` and the loss; every other numeric field the loop
logs is read too. Per point the report gives the final and best value of the metric, the median throughput, the
model's non-embedding parameter count N, its training tokens D = steps x global batch x seq_len, and its training
FLOPs (tweetjax.train.flops.flops_per_token x D).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from typing import Any, Sequence

import numpy as np
from absl import logging

from tweetjax import scaling
from tweetjax.model.config import ModelConfig
from tweetjax.sweep import runner, spec


@dataclasses.dataclass
class PointResult:
  point: runner.Point
  status: str
  rows: list[dict[str, Any]]
  N: int | None = None  # non-embedding parameters
  tokens: int | None = None  # planned training tokens: train.steps x global batch x seq_len
  flops: float | None = None  # planned training FLOPs
  error: str = ""
  wall_s: float | None = None

  def values(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(row["step"], row[metric]) for row in self.rows if _is_number(row.get(metric))]
    return (np.array([p[0] for p in pairs], np.float64), np.array([p[1] for p in pairs], np.float64))

  def final(self, metric: str) -> float | None:
    steps, values = self.values(metric)
    return float(values[-1]) if len(values) else None

  def best(self, metric: str) -> tuple[float | None, int | None]:
    steps, values = self.values(metric)
    if not len(values):
      return None, None
    i = int(np.nanargmin(values))
    return float(values[i]), int(steps[i])

  def tail_mean(self, metric: str, fraction: float) -> float | None:
    """Mean over the rows in the last `fraction` of the run's steps (at least the last row): a less noisy final."""
    steps, values = self.values(metric)
    if not len(values) or self.status != "done":
      return None
    return float(np.mean(values[steps >= steps[-1] * (1.0 - fraction)]))


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flops_per_token_fn():
  try:
    from tweetjax.train.flops import flops_per_token
    return flops_per_token
  except ImportError:
    return None


def collect(points: Sequence[runner.Point]) -> list[PointResult]:
  flops_per_token = _flops_per_token_fn()
  if flops_per_token is None:
    logging.warning("tweetjax.train.flops is not available: FLOPs are estimated as 6 x all parameters x tokens")
  param_cache: dict[ModelConfig, int] = {}
  results = []
  for point in points:
    result = PointResult(point, runner.status(point), runner.read_metrics(os.path.join(point.workdir,
                                                                                       "metrics.jsonl")))
    failed = os.path.join(point.workdir, runner.FAILED)
    if result.status == "invalid":
      result.error = point.error
    elif result.status == "failed":
      with open(failed) as f:
        result.error = json.load(f).get("error", "")
    done = os.path.join(point.workdir, runner.DONE)
    if result.status == "done":
      with open(done) as f:
        result.wall_s = json.load(f).get("wall_s")
    if point.config is not None:
      try:
        model_config = ModelConfig.from_config(point.config.model)
        if model_config not in param_cache:
          param_cache[model_config] = scaling.non_embedding_params(model_config)
        result.N = param_cache[model_config]
        seq_len = int(point.config.data.seq_len)
        result.tokens = int(point.config.train.steps) * int(point.config.data.global_batch_size) * seq_len
        if flops_per_token is not None:
          per_token = flops_per_token(model_config, seq_len)
          result.flops = float(getattr(per_token, "train", per_token)) * result.tokens
        else:
          embed = model_config.vocab_size * model_config.d_model * (1 if model_config.tie_embeddings else 2)
          result.flops = 6.0 * (result.N + embed) * result.tokens
      except (ValueError, TypeError) as e:
        result.error = result.error or f"bad model config: {e}"
    results.append(result)
  return results


def swept_keys(results: Sequence[PointResult]) -> list[str]:
  keys: list[str] = []
  for result in results:
    keys += [key for key in result.point.overrides if key not in keys]
  return keys


def swept_groups(results: Sequence[PointResult]) -> list[list[str]]:
  """The keys that vary over `results`, grouped: a key joins the group of an earlier key that determines it (zipped
  keys, or a depth that follows the width), so one plot covers them. Constant keys are left out."""
  columns = {key: [spec.format_value(r.point.overrides.get(key)) for r in results] for key in swept_keys(results)}
  columns = {key: column for key, column in columns.items() if len(set(column)) > 1}

  def determines(a, b):
    mapping = {}
    return all(mapping.setdefault(x, y) == y for x, y in zip(columns[a], columns[b]))

  groups: list[list[str]] = []
  for key in columns:
    for group in groups:
      if determines(group[0], key):
        group.append(key)
        break
    else:
      groups.append([key])
  return groups


def pick_metric(results: Sequence[PointResult], preferred: Sequence[str]) -> str:
  """The first of `preferred` that some point logs (so a report still works if the loop renames a field)."""
  present = {key for result in results for row in result.rows for key in row}
  for metric in preferred:
    if metric in present:
      return metric
  return preferred[0]


def table(results: Sequence[PointResult], metric: str) -> tuple[list[str], list[list[Any]]]:
  keys = swept_keys(results)
  shorts = spec._short_keys(keys)  # pylint: disable=protected-access
  header = ["point", "status", *[shorts[key] for key in keys], "N_non_embedding", "tokens", "flops", "final_step",
            f"final_{metric}", f"best_{metric}", "best_step", "tokens_per_s", "wall_s", "error"]
  rows = []
  for result in results:
    best, best_step = result.best(metric)
    throughput = result.values("tokens_per_s")[1][1:]  # the first window includes compilation
    error = result.error.strip().splitlines()[-1][:120] if result.error.strip() else ""
    rows.append([result.point.name, result.status, *[result.point.overrides.get(key, "") for key in keys],
                 result.N, result.tokens, result.flops, int(result.rows[-1]["step"]) if result.rows else None,
                 result.final(metric), best, best_step,
                 float(np.median(throughput)) if len(throughput) else None, result.wall_s, error])
  return header, rows


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
  return str(value).replace("|", "\\|")


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def to_csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(header)
  writer.writerows([["" if v is None else v for v in row] for row in rows])
  return out.getvalue()


@dataclasses.dataclass
class Fit:
  law: scaling.ScalingLaw
  metric: str
  N: np.ndarray
  D: np.ndarray
  L: np.ndarray
  names: list[str]

  @property
  def residuals(self) -> np.ndarray:
    return scaling.residuals(self.law, self.N, self.D, self.L)

  def summary(self, flop_budgets: Sequence[float]) -> dict[str, Any]:
    optimal, problem = [], ""
    for budget in flop_budgets:
      try:
        n_opt, d_opt = self.law.compute_optimal(budget)
      except ValueError as e:
        problem = str(e)
        break
      optimal.append({"flops": budget, "N": n_opt, "D": d_opt, "tokens_per_param": d_opt / n_opt,
                      "loss": float(self.law.loss(n_opt, d_opt))})
    res = self.residuals
    return {"law": self.law.to_dict(), "metric": self.metric, "N": "non-embedding parameters",
            "D": "training tokens", "compute_optimal": optimal, "compute_optimal_problem": problem,
            "residual_rms": float(np.sqrt(np.mean(res ** 2))), "residual_max_abs": float(np.max(np.abs(res))),
            "points": [{"point": n, "N": int(N), "D": int(D), "loss": float(L),
                        "predicted": float(self.law.loss(N, D)), "log_residual": float(r)}
                       for n, N, D, L, r in zip(self.names, self.N, self.D, self.L, res)]}


def fit_scaling_law(results: Sequence[PointResult], metric: str, tail: float = 0.1) -> Fit | None:
  """Fits the law to the finished points when the sweep varies both N and D with >= 5 points; else None."""
  usable = [(r, r.tail_mean(metric, tail)) for r in results if r.N and r.tokens]
  usable = [(r, loss) for r, loss in usable if loss is not None and loss > 0]
  N = np.array([r.N for r, _ in usable], np.float64)
  D = np.array([r.tokens for r, _ in usable], np.float64)
  if len(usable) < 5 or len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
    return None
  L = np.array([loss for _, loss in usable])
  return Fit(scaling.fit(N, D, L), metric, N, D, L, [r.point.name for r, _ in usable])


def fit_markdown(summary: dict[str, Any]) -> str:
  law = summary["law"]
  lines = [f"Scaling law fit on `{summary['metric']}` (N = non-embedding parameters, D = training tokens):",
           "",
           f"    L(N, D) = {law['E']:.4g} + {law['A']:.4g} / N^{law['alpha']:.4f} + "
           f"{law['B']:.4g} / D^{law['beta']:.4f}",
           "",
           f"alpha = {law['alpha']:.4f}, beta = {law['beta']:.4f}, E = {law['E']:.4f}; log-space residuals: "
           f"rms {summary['residual_rms']:.4f}, max |r| {summary['residual_max_abs']:.4f}",
           "", "Compute-optimal allocation (C = 6 N D):", "",
           summary["compute_optimal_problem"] or
           markdown(["FLOP budget", "N_opt", "D_opt", "D/N", "predicted loss"],
                    [[o["flops"], o["N"], o["D"], o["tokens_per_param"], o["loss"]]
                     for o in summary["compute_optimal"]]),
           "", "Residuals (log predicted - log observed):", "",
           markdown(["point", "N", "D", "loss", "predicted", "log_residual"],
                    [[p["point"], p["N"], p["D"], p["loss"], p["predicted"], p["log_residual"]]
                     for p in summary["points"]])]
  return "\n".join(lines)


def write_report(points: Sequence[runner.Point], out_dir: str, *, metric: str = "loss",
                 fit_metrics: Sequence[str] = ("ce_loss", "loss"), fit_tail: float = 0.1,
                 flop_budgets: Sequence[float] = ()) -> str:
  """Writes results.{md,csv}, scaling_fit.json (when a law can be fitted) and the plots; returns the markdown."""
  results = collect(points)
  header, rows = table(results, metric)
  os.makedirs(out_dir, exist_ok=True)
  files = [os.path.join(out_dir, "results.csv")]
  with open(files[0], "w") as f:
    f.write(to_csv(header, rows))
  text = markdown(header, rows)
  fit = fit_scaling_law(results, pick_metric(results, fit_metrics), fit_tail)
  if fit is not None:
    largest = float(np.max(6.0 * fit.N * fit.D))  # default budgets: the sweep's largest run, 10x it, 1e18, 1e21
    summary = fit.summary(list(flop_budgets) or [largest, 10.0 * largest, 1e18, 1e21])
    files.append(os.path.join(out_dir, "scaling_fit.json"))
    with open(files[-1], "w") as f:
      json.dump(summary, f, indent=1)
    text += "\n\n" + fit_markdown(summary)
  else:
    text += "\n\n(no scaling-law fit: it needs >= 5 finished points that vary both model size and tokens)"
  from tweetjax.sweep import plots  # Imported here: matplotlib is only needed for reports.
  files += plots.draw_all(results, metric, fit, out_dir)
  files.append(os.path.join(out_dir, "results.md"))
  text += "\n\nFiles:\n" + "\n".join(f"  {path}" for path in files)
  with open(files[-1], "w") as f:
    f.write(text + "\n")
  return text
