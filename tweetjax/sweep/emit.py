"""Launch scripts for running a sweep elsewhere: a SLURM array job or a plain shell script, one line per point.

Every line runs `tools/sweep.py --point=<name>`: the same runner in single-point mode, so a cluster task skips a
finished point, resumes from the point's checkpoint, and writes the point's done.json / failed.json as a local run
would. `--report` then works on the shared workdir.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Sequence

from tweetjax.sweep.runner import Point

SWEEP_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "tools", "sweep.py")


def point_line(config_path: str, workdir: str, point: Point, platform: str, python: str = '"$PYTHON"') -> str:
  """`$PYTHON tools/sweep.py ... --point=NAME`; `python` is inserted unquoted (a shell expression).

  The point's device environment (XLA_FLAGS on CPU) is set by the runner itself, as in a local run.
  """
  args = [SWEEP_SCRIPT, f"--config={config_path}", f"--workdir={workdir}", f"--point={point.name}",
          f"--platform={platform}"]
  return python + " " + " ".join(shlex.quote(arg) for arg in args)


def _absolute_config(config_path: str) -> str:
  path, sep, arg = config_path.partition(":")
  return os.path.abspath(path) + sep + arg


def shell_script(config_path: str, workdir: str, points: Sequence[Point], platform: str, parallel: int) -> str:
  config_path, workdir = _absolute_config(config_path), os.path.abspath(workdir)
  lines = [
      "#!/usr/bin/env bash",
      f"# Sweep {config_path}: {len(points)} points; each `launch` line trains one point (skipped once done).",
      f"# Run: PARALLEL={parallel} bash {os.path.join(workdir, 'launch.sh')}",
      "set -uo pipefail",
      'PYTHON="${PYTHON:-' + shlex.quote(sys.executable) + '}"',
      f'PARALLEL="${{PARALLEL:-{parallel}}}"',
      "status=0",
      "# Starts a point in the background once fewer than $PARALLEL are running.",
      'launch() { while (( $(jobs -rp | wc -l) >= PARALLEL )); do wait -n || status=1; done; "$@" & }',
  ]
  for point in points:
    lines.append(f"# {point.name}: {point.overrides}")
    lines.append("launch " + point_line(config_path, workdir, point, platform))
  lines += ["while (( $(jobs -rp | wc -l) > 0 )); do wait -n || status=1; done", "exit $status"]
  return "\n".join(lines) + "\n"


def slurm_script(config_path: str, workdir: str, points: Sequence[Point], platform: str, parallel: int) -> str:
  config_path, workdir = _absolute_config(config_path), os.path.abspath(workdir)
  devices = max((point.devices for point in points), default=1)
  name = os.path.splitext(os.path.basename(config_path.partition(":")[0]))[0]
  lines = [
      "#!/usr/bin/env bash",
      f"#SBATCH --job-name=sweep-{name}",
      f"#SBATCH --array=0-{len(points) - 1}%{parallel}",
      f"#SBATCH --output={workdir}/slurm-%A_%a.out",
      "#SBATCH --ntasks=1",
  ]
  if platform == "gpu":
    lines.append(f"#SBATCH --gpus-per-task={devices}")
  lines += [
      f"# Sweep {config_path}: {len(points)} points, task i trains point i. Submit: sbatch {workdir}/launch.slurm",
      "set -uo pipefail",
      'PYTHON="${PYTHON:-python}"',
      "COMMANDS=(",
  ]
  for point in points:
    lines.append(f"  {shlex.quote(point_line(config_path, workdir, point, platform))}"
                 f"  # {point.name}")
  lines += [")", 'eval "${COMMANDS[$SLURM_ARRAY_TASK_ID]}"']
  return "\n".join(lines) + "\n"


def write_launch_script(kind: str, config_path: str, workdir: str, points: Sequence[Point], platform: str,
                        parallel: int) -> str:
  if kind == "shell":
    path, text = os.path.join(workdir, "launch.sh"), shell_script(config_path, workdir, points, platform, parallel)
  elif kind == "slurm":
    path, text = os.path.join(workdir, "launch.slurm"), slurm_script(config_path, workdir, points, platform, parallel)
  else:
    raise ValueError(f"--emit={kind!r}: expected 'slurm' or 'shell'")
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)
  return path
