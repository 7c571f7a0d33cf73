"""Training metrics: `<workdir>/metrics.jsonl`, TensorBoard event files (tensorboardX) and absl log lines.

Rows carry `step` = the number of completed updates. A run that resumes from the checkpoint of step S recomputes
steps S+1.. exactly, so rows beyond S written before the crash are moved to `metrics_discarded.jsonl` (with the
step they were discarded at) and TensorBoard is told to purge events from S+1 on: the curve never holds two values
for one step. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from absl import logging

METRICS_FILE = "metrics.jsonl"
DISCARDED_FILE = "metrics_discarded.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Rows of metrics.jsonl (a torn last line, as a crash mid-write leaves, is ignored)."""
  rows, _ = _read_rows(os.path.join(workdir, METRICS_FILE))
  return rows


def _read_rows(path: str) -> tuple[list[dict[str, Any]], list[str]]:
  rows, torn = [], []
  if not os.path.exists(path):
    return rows, torn
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError:
        torn.append(line.rstrip("\n"))
        continue
      rows.append(row)
  return rows, torn


def truncate_after(workdir: str, step: int) -> int:
  """Keeps rows with step <= `step`; moves the rest (and torn lines) to metrics_discarded.jsonl. Returns the count."""
  path = os.path.join(workdir, METRICS_FILE)
  rows, torn = _read_rows(path)
  keep = [r for r in rows if int(r.get("step", 0)) <= step]
  drop = [r for r in rows if int(r.get("step", 0)) > step]
  if not drop and not torn:
    return 0
  stamp = time.strftime("%Y-%m-%d %H:%M:%S")
  with open(os.path.join(workdir, DISCARDED_FILE), "a") as f:
    for r in drop:
      f.write(json.dumps({**r, "discarded_on_resume_from": step, "discarded_at": stamp}) + "\n")
    for line in torn:
      f.write(json.dumps({"torn_line": line, "discarded_on_resume_from": step, "discarded_at": stamp}) + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in keep:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)
  logging.info("metrics: resuming after step %d; moved %d later rows (and %d torn lines) to %s", step, len(drop),
               len(torn), DISCARDED_FILE)
  return len(drop) + len(torn)


class MetricsWriter:
  """Appends rows to metrics.jsonl and TensorBoard; `resume_step` is the step the run (re)starts from."""

  def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self._file = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    truncate_after(workdir, resume_step)
    self._file = open(os.path.join(workdir, METRICS_FILE), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # Imported lazily: only process 0 writes.
      # purge_step: TensorBoard drops events at steps >= resume_step + 1 written by the crashed run.
      self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                               purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in row.items():
        if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(name, value, int(step))
      self._tb.flush()

  def write_text(self, step: int, name: str, text: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(name, text, int(step))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _to_python(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    value = np.asarray(value).item()
  return value


def summarize_window(step_metrics: Iterable[Mapping[str, Any]]) -> dict[str, float]:
  """Host-side reduction of the per-step metric dicts of one logging window (already fetched with device_get)."""
  rows = list(step_metrics)
  out: dict[str, float] = {}
  if not rows:
    return out
  for key in ("loss", "ce_loss", "z_loss", "grad_norm"):
    if key in rows[0]:
      values = np.array([float(r[key]) for r in rows if not int(r.get("nonfinite", 0))])
      out[key] = float(values.mean()) if values.size else float("nan")
  if "learning_rate" in rows[-1]:
    out["learning_rate"] = float(rows[-1]["learning_rate"])
  if "tokens" in rows[0]:
    out["target_tokens"] = float(sum(float(r["tokens"]) for r in rows))
  out["nonfinite_in_window"] = float(sum(int(r.get("nonfinite", 0)) for r in rows))
  # Anything else a step reports (MoE load, router losses, ...) is averaged.
  for key in rows[0]:
    if key not in out and key not in ("tokens", "nonfinite", "learning_rate"):
      try:
        out[key] = float(np.mean([float(np.asarray(r[key])) for r in rows]))
      except (TypeError, ValueError):
        pass
  return out


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
