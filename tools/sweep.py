"""Runs, emits or reports the sweep defined by a config file's `sweep()`.

  # run every point (4 at a time), resumably; each point trains in <workdir>/<point name>/
  python tools/sweep.py --config=experiments/scaling.py --workdir=/tmp/scaling --parallel=2
  python tools/sweep.py --config=experiments/scaling.py --workdir=/tmp/scaling --dry_run     # list points
  python tools/sweep.py --config=experiments/scaling.py --workdir=/tmp/scaling --emit=slurm  # write launch.slurm
  python tools/sweep.py --config=experiments/scaling.py --workdir=/tmp/scaling --report --flop_budget=1e18
"""

import os
import re
import shlex
import subprocess
import sys
import time

from absl import app, flags, logging

from tweetjax import paths
from tweetjax.sweep import emit, report, runner

_CONFIG = flags.DEFINE_string("config", None, "Experiment config file with a sweep(): experiments/x.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory; every point trains in <workdir>/<point name>.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Points trained at the same time.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the points, their status and commands; run nothing.")
_EMIT = flags.DEFINE_enum("emit", None, ["slurm", "shell"], "Write a launch script instead of running.")
_REPORT = flags.DEFINE_bool("report", False, "Tabulate, plot and (if N and D vary) fit a scaling law.")
_POINT = flags.DEFINE_string("point", None, "Train only this point, in the foreground (used by launch scripts).")
_ONLY = flags.DEFINE_string("only", None, "Regular expression: only points whose name matches.")
_PLATFORM = flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu"],
                              "cpu: each point gets as many fake host devices as its mesh; gpu: real GPUs.")
_GPUS = flags.DEFINE_integer("gpus", 0, "GPUs to share among points (--platform=gpu; 0: detect).")
_DEVICES_PER_POINT = flags.DEFINE_integer("devices_per_point", 0,
                                          "Devices for a point whose mesh has a -1 axis (0: that axis gets 1).")
_RETRY_FAILED = flags.DEFINE_bool("retry_failed", True, "Rerun points that failed in an earlier invocation.")
_POINT_TIMEOUT = flags.DEFINE_float("point_timeout_s", 0.0, "Kill and fail a point after this long (0: never).")
_METRIC = flags.DEFINE_string("metric", "loss", "metrics.jsonl field tabulated and plotted.")
_FIT_METRIC = flags.DEFINE_list("fit_metric", ["ce_loss", "loss"],
                                "Field fitted by the scaling law (the first one the points log).")
_FIT_TAIL = flags.DEFINE_float("fit_tail", 0.1, "The fitted loss is the mean over this last fraction of steps.")
_FLOP_BUDGET = flags.DEFINE_multi_float("flop_budget", [], "FLOP budgets for the compute-optimal N and D.")
flags.mark_flags_as_required(["config", "workdir"])


def _detect_gpus() -> int:
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return len([d for d in visible.split(",") if d.strip()])
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return 0
  return len([line for line in out.splitlines() if line.startswith("GPU ")])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Absolute from here on: the points' commands, sweep.json and launch scripts mean the same from any directory.
  config_path, workdir = paths.absolute_config_arg(_CONFIG.value), paths.absolute(_WORKDIR.value)
  points = runner.plan(config_path, workdir, _DEVICES_PER_POINT.value)
  everything = {p.name: p.overrides for p in points}
  if _POINT.value is not None:
    points = [p for p in points if p.name == _POINT.value]
    if not points:
      raise app.UsageError(f"--point={_POINT.value!r} is not a point of {config_path}'s sweep (see --dry_run)")
  if _ONLY.value:
    points = [p for p in points if re.search(_ONLY.value, p.name)]
  if _REPORT.value:
    print(report.write_report(points, os.path.join(workdir, "report"), metric=_METRIC.value,
                              fit_metrics=_FIT_METRIC.value, fit_tail=_FIT_TAIL.value,
                              flop_budgets=_FLOP_BUDGET.value))
    return
  if _EMIT.value:
    path = emit.write_launch_script(_EMIT.value, config_path, workdir, points, _PLATFORM.value, _PARALLEL.value)
    print(f"wrote {path} ({len(points)} points)")
    return
  if _DRY_RUN.value:
    for point in points:
      state = runner.status(point)
      env = " ".join(f"{k}={shlex.quote(v)}" for k, v in runner.env_overrides(point, _PLATFORM.value).items())
      command = " ".join(shlex.quote(a) for a in runner.train_command(config_path, point))
      print(f"{point.name}  [{state}] {point.overrides}\n  {point.error or (env + ' ' + command).strip()}")
    print(f"{len(points)} points in {workdir}")
    return
  os.makedirs(workdir, exist_ok=True)
  runner.write_json(os.path.join(workdir, "sweep.json"), {"config": config_path, "points": everything})
  gpus = _GPUS.value or (_detect_gpus() if _PLATFORM.value == "gpu" else 0)
  sweep = runner.SweepRunner(config_path, workdir, points, parallel=_PARALLEL.value, platform=_PLATFORM.value,
                             gpus=gpus, assign_gpus=_POINT.value is None, retry_failed=_RETRY_FAILED.value,
                             point_timeout_s=_POINT_TIMEOUT.value)
  start = time.time()
  try:
    summary = sweep.run()
  except runner.Interrupted as e:
    print(f"[sweep] interrupted ({e}); rerun the same command to resume")
    sys.exit(130)
  states = [runner.status(p) for p in points]
  print(f"[sweep] {len(summary['started'])} started, {len(summary['done'])} finished, {len(summary['failed'])} "
        f"failed, {len(summary['skipped'])} skipped in {time.time() - start:.0f} s; "
        f"{states.count('done')}/{len(points)} points done")
  for name, error in summary["failed"].items():
    print(f"[sweep] FAILED {name}:\n{error.strip()[-1500:]}\n")
  print(f"[sweep] report: {sys.executable} {sys.argv[0]} --config={config_path} --workdir={workdir} --report")
  logging.info("sweep summary: %s", summary)
  if summary["failed"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
