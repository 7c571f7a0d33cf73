"""Runs sweep points as `tools/train.py` subprocesses, N at a time, resumably.

Each point has its own workdir `<sweep workdir>/<point name>/`. A point is finished when its `done.json` exists:
the runner writes it only after the subprocess exited 0 and the point's metrics.jsonl reached config.train.steps.
Re-running the sweep skips finished points and restarts the rest in their own workdirs, where the training loop
resumes from the newest checkpoint. A failing point gets a `failed.json` with its exit status and stderr tail and
does not stop the others. A per-point lock (flock, held by the runner and inherited by the subprocess) keeps two
runners from training the same point at once: a runner waits for a locked point and skips it if it gets done, so
several runners can share one sweep. Subprocesses get SIGTERM when their runner dies (PR_SET_PDEATHSIG on Linux):
the training loop then saves a checkpoint and exits, and the next invocation resumes from it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any, Mapping, Sequence

import ml_collections
from absl import logging

from tweetjax import paths
from tweetjax.config_check import check_config
from tweetjax.perf.env import with_fake_devices
from tweetjax.sweep import spec

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "tools", "train.py")
DONE, FAILED, EVENTS, LOCK = "done.json", "failed.json", "sweep_events.jsonl", ".lock"
STDERR_TAIL_CHARS = 4000


@dataclasses.dataclass
class Point:
  name: str
  overrides: dict[str, Any]
  workdir: str
  config: ml_collections.ConfigDict | None  # None when the overrides do not apply (see `error`)
  error: str = ""
  devices: int = 1

  @property
  def total_steps(self) -> int:
    return int(self.config.train.steps)


def mesh_device_count(mesh: Mapping[str, int], fill: int = 1) -> int:
  """Devices the point's mesh asks for; a -1 axis (all remaining devices) gets `fill`."""
  count = 1
  for size in mesh.values():
    count *= fill if int(size) == -1 else int(size)
  return count


def plan(config_path: str, workdir: str, devices_per_point: int = 0) -> list[Point]:
  """Expands the sweep of `config_path` into points with their configs (overrides applied) and device counts.

  A -1 mesh axis is filled so the point gets `devices_per_point` devices (default: 1 for that axis).
  """
  base = spec.load_config(config_path)
  points = []
  for name, overrides in spec.load_sweep(config_path):
    overrides = {key: paths.absolute_override(key, value) for key, value in overrides.items()}
    point = Point(name, overrides, os.path.join(workdir, name), None)
    try:
      point.config = spec.apply_overrides(base, overrides)
      check_config(point.config)  # every point's values, before any point starts
    except (KeyError, TypeError, ValueError) as e:
      point.error = f"invalid override: {e}"
      points.append(point)
      continue
    mesh = dict(point.config.mesh)
    known = mesh_device_count(mesh, fill=1)
    has_fill = any(int(size) == -1 for size in mesh.values())
    point.devices = max(devices_per_point, known) if has_fill and devices_per_point else known
    if has_fill and point.devices % known:
      point.error = f"--devices_per_point={devices_per_point} is not a multiple of the mesh's fixed axes ({known})"
    points.append(point)
  return points


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Rows of a metrics.jsonl, one per step, in step order.

  Rows of the same step are merged (the loop writes training and eval metrics as separate rows; a step logged
  again after a resume overrides the earlier values). A torn last line (crash mid-write) is skipped.
  """
  rows: dict[int, dict[str, Any]] = {}
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().splitlines()
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      step = int(row["step"])
    except (ValueError, KeyError, TypeError):
      if number < len(lines):
        logging.warning("%s:%d: skipping a malformed metrics row (expected JSON with 'step'): %r", path, number,
                        line[:200])
      continue
    rows.setdefault(step, {}).update(row)
  return [rows[step] for step in sorted(rows)]


def status(point: Point) -> str:
  """done | failed | running (locked by a live runner) | partial (has metrics) | pending | invalid."""
  if point.error:
    return "invalid"
  if os.path.exists(os.path.join(point.workdir, DONE)):
    return "done"
  if _locked_elsewhere(point.workdir):
    return "running"
  if os.path.exists(os.path.join(point.workdir, FAILED)):
    return "failed"
  return "partial" if os.path.exists(os.path.join(point.workdir, "metrics.jsonl")) else "pending"


def _locked_elsewhere(workdir: str) -> bool:
  path = os.path.join(workdir, LOCK)
  if not os.path.exists(path):
    return False
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return True
    fcntl.flock(f, fcntl.LOCK_UN)
  return False


def train_command(config_path: str, point: Point, python: str = sys.executable,
                  train_script: str = TRAIN_SCRIPT) -> list[str]:
  return [python, train_script, f"--config={config_path}", f"--workdir={point.workdir}",
          *spec.iter_override_flags(point.overrides)]


def point_env(point: Point, platform: str, gpu_ids: Sequence[int] | None = None,
              base_env: Mapping[str, str] | None = None) -> dict[str, str]:
  """The subprocess environment: on CPU, as many (fake) host devices as the point's mesh; on GPU, its GPUs."""
  env = dict(os.environ if base_env is None else base_env)
  if platform == "cpu":
    env = with_fake_devices(env, point.devices)
    env["JAX_PLATFORMS"] = "cpu"
  elif gpu_ids is not None:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_ids)
  return env


def env_overrides(point: Point, platform: str) -> dict[str, str]:
  """The environment variables point_env sets (for emitted launch scripts)."""
  if platform != "cpu":
    return {}
  return {"XLA_FLAGS": with_fake_devices({}, point.devices)["XLA_FLAGS"], "JAX_PLATFORMS": "cpu"}


def _die_with_parent():
  """Runs in the child before exec: SIGTERM it when the runner dies (Linux), so a killed sweep leaves no orphans."""
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
  except (OSError, AttributeError):
    pass


def write_json(path: str, payload: Mapping[str, Any]) -> None:
  """Atomic: readers (and concurrent writers of the same content) never see a partial file."""
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _tail(path: str, offset: int, chars: int = STDERR_TAIL_CHARS) -> str:
  with open(path, "rb") as f:
    f.seek(max(offset, os.path.getsize(path) - chars))
    return f.read().decode("utf-8", "replace")


@dataclasses.dataclass
class _Running:
  point: Point
  process: subprocess.Popen
  lock_file: Any
  stderr_offset: int
  started: float
  gpu_ids: list[int]
  command: list[str]


class Interrupted(Exception):
  """The runner got SIGINT/SIGTERM; its running points were stopped (they checkpoint on SIGTERM)."""


class SweepRunner:
  """Schedules points: at most `parallel` at once and, on GPU, each on its own `point.devices` GPUs."""

  def __init__(self, config_path: str, workdir: str, points: Sequence[Point], *, parallel: int = 1,
               platform: str = "cpu", gpus: int = 0, assign_gpus: bool = True, retry_failed: bool = True,
               point_timeout_s: float = 0.0, python: str = sys.executable, train_script: str = TRAIN_SCRIPT,
               echo=print):
    if parallel < 1:
      raise ValueError(f"--parallel={parallel}: expected >= 1")
    self.config_path, self.workdir, self.points = config_path, workdir, list(points)
    self.parallel, self.platform, self.retry_failed = parallel, platform, retry_failed
    self.assign_gpus = platform == "gpu" and assign_gpus
    self.free_gpus = list(range(gpus))
    self.point_timeout_s, self.python, self.train_script, self.echo = point_timeout_s, python, train_script, echo
    self.invocation = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    self.summary: dict[str, Any] = {"invocation": self.invocation, "started": [], "done": [], "failed": {},
                                    "skipped": {}}
    self.waiting: set[str] = set()

  def _event(self, event: str, point: Point, **extra) -> None:
    row = {"time": time.time(), "invocation": self.invocation, "event": event, "point": point.name, **extra}
    with open(os.path.join(self.workdir, EVENTS), "a") as f:
      f.write(json.dumps(row) + "\n")

  def _skip(self, point: Point, why: str) -> None:
    self.summary["skipped"][point.name] = why
    self._event("skip", point, reason=why)

  def _fail(self, point: Point, error: str, **extra) -> None:
    os.makedirs(point.workdir, exist_ok=True)
    write_json(os.path.join(point.workdir, FAILED), {"point": point.name, "overrides": point.overrides,
                                                      "error": error, "invocation": self.invocation, **extra})
    self.summary["failed"][point.name] = error
    self._event("failed", point, error=error[-500:], **{k: v for k, v in extra.items() if k != "command"})
    self.echo(f"[sweep] FAILED {point.name}: {error.strip().splitlines()[-1] if error.strip() else error}")

  def _todo(self) -> list[Point]:
    todo = []
    for point in self.points:
      state = status(point)
      if state == "invalid":
        self._fail(point, point.error)
      elif state == "done":
        self._skip(point, "done")
      elif state == "failed" and not self.retry_failed:
        self._skip(point, "failed before (--noretry_failed)")
      elif self.assign_gpus and point.devices > len(self.free_gpus):
        self._fail(point, f"needs {point.devices} GPUs but only {len(self.free_gpus)} are available (--gpus)")
      else:
        todo.append(point)
    return todo

  def _start(self, point: Point) -> _Running | None:
    os.makedirs(point.workdir, exist_ok=True)
    lock_file = open(os.path.join(point.workdir, LOCK), "a")
    try:
      fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock_file.close()
      if point.name not in self.waiting:
        self.waiting.add(point.name)
        self._event("wait", point, reason="locked by another process")
        self.echo(f"[sweep] waiting for {point.name}: another runner (or a stopping subprocess) holds its lock")
      return None
    gpu_ids = []
    if self.assign_gpus:
      gpu_ids, self.free_gpus = self.free_gpus[:point.devices], self.free_gpus[point.devices:]
    command = train_command(self.config_path, point, self.python, self.train_script)
    write_json(os.path.join(point.workdir, "overrides.json"), {"point": point.name, "overrides": point.overrides,
                                                                "config": self.config_path, "command": command})
    stderr_path = os.path.join(point.workdir, "stderr.log")
    header = f"\n=== {self.invocation} {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n"
    for log in ("stdout.log", "stderr.log"):
      with open(os.path.join(point.workdir, log), "a") as f:
        f.write(header)
    stderr_offset = os.path.getsize(stderr_path)
    with open(os.path.join(point.workdir, "stdout.log"), "a") as out, open(stderr_path, "a") as err:
      process = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                 env=point_env(point, self.platform, gpu_ids if self.assign_gpus else None),
                                 pass_fds=(lock_file.fileno(),), preexec_fn=_die_with_parent)
    self.summary["started"].append(point.name)
    self._event("start", point, pid=process.pid, devices=point.devices, gpus=gpu_ids)
    self.echo(f"[sweep] start {point.name} (pid {process.pid}, {point.devices} device(s))")
    return _Running(point, process, lock_file, stderr_offset, time.time(), gpu_ids, command)

  def _finish(self, run: _Running, returncode: int, timed_out: bool = False) -> None:
    point, wall_s = run.point, time.time() - run.started
    stderr_tail = _tail(os.path.join(point.workdir, "stderr.log"), run.stderr_offset)
    extra = {"returncode": returncode, "wall_s": wall_s, "command": run.command}
    if timed_out:
      self._fail(point, f"timed out after {self.point_timeout_s:.0f} s (--point_timeout_s)\n{stderr_tail}", **extra)
    elif returncode != 0:
      self._fail(point, stderr_tail, **extra)
    else:
      rows = read_metrics(os.path.join(point.workdir, "metrics.jsonl"))
      final_step = int(rows[-1]["step"]) if rows else 0
      if final_step != point.total_steps:
        self._fail(point, f"exited 0 but {point.workdir}/metrics.jsonl ends at step {final_step}, expected "
                          f"config.train.steps={point.total_steps}", **extra)
      else:
        failed = os.path.join(point.workdir, FAILED)
        if os.path.exists(failed):
          os.remove(failed)
        write_json(os.path.join(point.workdir, DONE), {"point": point.name, "overrides": point.overrides,
                                                        "final_step": final_step, "final_metrics": rows[-1],
                                                        "invocation": self.invocation, **extra})
        self.summary["done"].append(point.name)
        self._event("done", point, wall_s=wall_s)
        self.echo(f"[sweep] done {point.name} in {wall_s:.0f} s (loss {rows[-1].get('loss', float('nan')):.4f})")
    self.free_gpus.extend(run.gpu_ids)
    run.lock_file.close()

  def run(self) -> dict[str, Any]:
    os.makedirs(self.workdir, exist_ok=True)
    queue, running = self._todo(), []

    def on_sigterm(signum, frame):
      raise Interrupted()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
      while queue or running:
        for point in list(queue):
          if len(running) >= self.parallel:
            break
          if self.assign_gpus and point.devices > len(self.free_gpus):
            continue
          if os.path.exists(os.path.join(point.workdir, DONE)):  # finished by another runner meanwhile
            queue.remove(point)
            self._skip(point, "done")
            continue
          started = self._start(point)  # None while another process holds the point's lock: retried later
          if started:
            queue.remove(point)
            running.append(started)
        time.sleep(0.2)
        for run in list(running):
          returncode = run.process.poll()
          timed_out = (returncode is None and self.point_timeout_s > 0 and
                       time.time() - run.started > self.point_timeout_s)
          if timed_out:
            run.process.kill()
            returncode = run.process.wait()
          if returncode is not None:
            running.remove(run)
            self._finish(run, returncode, timed_out)
    except (KeyboardInterrupt, Interrupted) as e:
      self.echo(f"[sweep] interrupted: stopping {len(running)} running point(s); rerun to resume")
      for run in running:
        run.process.terminate()
      for run in running:
        try:
          run.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
          run.process.kill()
        run.lock_file.close()
      raise Interrupted(f"stopped {len(running)} running point(s)") from e
    finally:
      signal.signal(signal.SIGTERM, previous)
    return self.summary
