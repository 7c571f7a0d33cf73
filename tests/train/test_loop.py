"""The training loop end to end: exact resume after kills and SIGTERM, NaN handling, metrics, profiler, eval."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from tests.helpers import REPO
from tests.train.crash_driver import run_config
from tweetjax.train import loop, metrics
from tweetjax.train.checkpoint import CheckpointManager, restore_params
from tweetjax.train.plot import plot_curves

STEPS = 12
# Everything a step computes; timings differ from run to run and are not compared.
CURVE_KEYS = ("loss", "ce_loss", "z_loss", "grad_norm", "learning_rate", "target_tokens", "nonfinite_steps")


def train_rows(workdir):
  return [r for r in metrics.read_metrics(workdir) if "loss" in r]


def assert_same_curve(workdir, baseline_workdir):
  got, want = train_rows(workdir), train_rows(baseline_workdir)
  assert [r["step"] for r in got] == list(range(1, STEPS + 1)), "each step exactly once, in order"
  for g, w in zip(got, want):
    for key in CURVE_KEYS:
      assert g[key] == w[key], f"step {g['step']} {key}: {g[key]!r} != {w[key]!r} (bitwise)"


def assert_same_params(workdir, baseline_workdir):
  got, want = restore_params(workdir, step=STEPS), restore_params(baseline_workdir, step=STEPS)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    assert np.array_equal(g, w), f"final params differ at {jax.tree_util.keystr(path)}"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """Every run of this module works under one directory, so all share `<root>/jax_cache` (the default place of
  the persistent compilation cache): the step compiles once for the whole module, subprocesses included."""
  yield tmp_path_factory.mktemp("runs")
  jax.config.update("jax_compilation_cache_dir", None)  # Leave the process as we found it.
  compilation_cache.reset_cache()


def config_for(root, steps=STEPS):
  return run_config(steps, cache_dir=str(root / "jax_cache"))


@pytest.fixture(scope="module")
def baseline(root):
  """One uninterrupted run (also profiled and evaluated, which must not change the curve)."""
  workdir = str(root / "baseline")
  config = config_for(root)
  config.train.profile_steps = "2,3"
  config.train.eval_every = 6
  config.train.eval_steps = 1
  result = loop.train(config, workdir)
  assert result["step"] == STEPS and not result["preempted"]
  return workdir


def test_baseline_writes_metrics_eval_profile_and_checkpoints(baseline):
  rows = metrics.read_metrics(baseline)
  train = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  assert train[-1]["loss"] < train[0]["loss"]
  for key in ("grad_norm", "learning_rate", "tokens_per_s", "step_time_s", "mfu", "eta_s"):
    assert np.isfinite(train[-1][key]), key
  assert 0 < train[-1]["mfu"] < 1
  assert [r["step"] for r in rows if "eval_loss" in r] == [6, 12]
  assert glob.glob(os.path.join(baseline, "profile", "**", "*.xplane.pb"), recursive=True), "no profiler trace"
  with CheckpointManager(baseline) as manager:
    assert manager.all_steps() == [8, 10, 12]  # every 2 steps, the newest 3 kept
  out = os.path.join(baseline, "curves.png")
  plot_curves(rows, out)
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _driver(workdir, kill, *, wait=True):
  cmd = [sys.executable, "-m", "tests.train.crash_driver", workdir, str(STEPS), kill]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if wait:
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out
  return proc


def _wait_for_row(proc, workdir, step, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"driver exited early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
    if any(r["step"] >= step for r in train_rows(workdir)):
      return
    time.sleep(0.05)
  raise AssertionError(f"no metrics row for step {step} within {timeout}s")


@pytest.mark.slow
def test_kill_at_many_points_then_resume_reproduces_the_curve_bitwise(baseline, root):
  workdir = str(root / "killed")
  steps_of = lambda: CheckpointManager(workdir).all_steps()
  # Kill points, one per process; each run resumes from what the previous one left.
  for kill in ("before_commit:4",  # save of 4 written but not committed (renamed): 4 must not be used
               "save_write:6",  # mid-save of 6, files half written
               "after_commit:6",  # just after 6 became complete, before anything else
               "metrics_row:7"):  # a torn metrics row
    code, out = _driver(workdir, kill)
    assert code == -signal.SIGKILL, f"{kill}: expected SIGKILL, got {code}:\n{out[-3000:]}"
  assert 6 in steps_of()
  assert os.listdir(os.path.join(workdir, "checkpoints_incomplete")), "interrupted saves are kept aside"

  # SIGTERM from outside: a checkpoint at the next step boundary and a clean exit.
  proc = _driver(workdir, "none", wait=False)
  _wait_for_row(proc, workdir, 8)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  stopped_at = int(out.split("RESULT ")[1].split()[0])
  assert "True" in out.split("RESULT ")[1].splitlines()[0], "the run must report it was preempted"
  assert stopped_at < STEPS and stopped_at in steps_of(), (stopped_at, steps_of())

  # kill -9 from outside at an arbitrary moment.
  proc = _driver(workdir, "none", wait=False)
  _wait_for_row(proc, workdir, stopped_at + 1)
  proc.kill()
  proc.communicate(timeout=60)

  code, out = _driver(workdir, "none")
  assert code == 0, out[-3000:]
  assert_same_curve(workdir, baseline)
  assert_same_params(workdir, baseline)
  discarded = os.path.join(workdir, metrics.DISCARDED_FILE)
  assert any("torn_line" in json.loads(line) for line in open(discarded)), "the torn row is kept aside"


class _Hooked:
  """Wraps the training iterator: runs `hook(index, batch)` before handing out global batch `index`."""

  def __init__(self, inner, hook):
    self.inner, self.hook = inner, hook

  def __iter__(self):
    return self

  def __next__(self):
    index = self.inner.get_state()["step"]
    return self.hook(index, next(self.inner))

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def _hook_iterator(monkeypatch, hook):
  make = loop.make_train_iterator
  monkeypatch.setattr(loop, "make_train_iterator", lambda config, experiment: _Hooked(make(config, experiment), hook))


def _sigterm_at(index_to_stop):
  def hook(index, batch):
    if index == index_to_stop:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch
  return hook


def test_sigterm_in_process_checkpoints_and_resumes_exactly(baseline, root, monkeypatch):
  workdir = str(root / "sigterm")
  # While fetching the batch of step 5: the loop stops after step 5, which is off the save interval.
  _hook_iterator(monkeypatch, _sigterm_at(4))
  handler_before = signal.getsignal(signal.SIGTERM)
  result = loop.train(config_for(root), workdir)
  assert result["preempted"] and result["step"] == 5
  with CheckpointManager(workdir) as manager:
    assert manager.latest_step() == 5
  assert signal.getsignal(signal.SIGTERM) is handler_before, "the handler is removed after training"
  monkeypatch.undo()
  assert loop.train(config_for(root), workdir)["step"] == STEPS
  assert_same_curve(workdir, baseline)


def _poison(index_to_poison, then=None):
  def hook(index, batch):
    if index == index_to_poison:
      weights = np.array(jax.device_get(batch["weights"]))
      weights[0, 0] = np.nan
      batch = {**batch, "weights": jax.device_put(weights, batch["weights"].sharding)}
    return then(index, batch) if then else batch
  return hook


def test_nonfinite_skip_counts_and_never_checkpoints_nan(root, monkeypatch):
  workdir = str(root / "nan_skip")
  _hook_iterator(monkeypatch, _poison(2, then=_sigterm_at(3)))  # NaN loss at step 3; stop after step 4
  result = loop.train(config_for(root), workdir)
  assert result["step"] == 4 and result["nonfinite_steps"] == 1
  rows = {r["step"]: r for r in train_rows(workdir)}
  assert rows[3]["nonfinite_in_window"] == 1 and np.isnan(rows[3]["loss"])
  assert rows[4]["nonfinite_steps"] == 1 and np.isfinite(rows[4]["loss"])
  with CheckpointManager(workdir) as manager:
    assert manager.all_steps() == [2, 4]
  for step in (2, 4):
    params = restore_params(workdir, step=step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), step


def test_nonfinite_stop_raises_and_leaves_the_last_good_checkpoint(root, monkeypatch):
  workdir = str(root / "nan_stop")
  _hook_iterator(monkeypatch, _poison(2))  # NaN loss at step 3
  config = config_for(root)
  config.train.nonfinite = "stop"
  with pytest.raises(loop.NonFiniteLossError, match=r"step\(s\) \[3\]"):
    loop.train(config, workdir)
  with CheckpointManager(workdir) as manager:
    assert manager.all_steps() == [2]


def test_truncate_after_moves_later_and_torn_rows_aside(tmp_path):
  workdir = str(tmp_path)
  with open(os.path.join(workdir, metrics.METRICS_FILE), "w") as f:
    for step in (1, 2, 3, 4):
      f.write(json.dumps({"step": step, "loss": float(step)}) + "\n")
    f.write('{"step": 5, "lo')
  assert metrics.truncate_after(workdir, 2) == 3
  assert [r["step"] for r in metrics.read_metrics(workdir)] == [1, 2]
  discarded = [json.loads(line) for line in open(os.path.join(workdir, metrics.DISCARDED_FILE))]
  assert [r.get("step") for r in discarded] == [3, 4, None]
  assert all(r["discarded_on_resume_from"] == 2 for r in discarded)

