"""Two JAX processes on 127.0.0.1 (4 CPU devices each) train tiny on the 8-device global mesh through
tools/launch_local.py + tools/train.py, and log the same losses as one process with 8 devices.

Each process builds only its addressable shards of every global batch (the synthetic stream's
`make_array_from_callback`), so this is the multi-host data path; cross-process collectives use gloo (jax 0.10.2's
default CPU collectives). Tolerance: 1e-5 relative; the partitioned program is the same, only the transport of the
collectives differs.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, load_config

_STEPS = 3
_OVERRIDES = [f"--config.train.steps={_STEPS}", "--config.train.log_every=1", "--config.checkpoint.every_steps=0",
              "--config.train.tensorboard=false", "--config.train.compilation_cache_dir=none",
              "--config.train.peak_flops_per_device=1e9"]


def _losses(workdir) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [row["loss"] for row in rows if "loss" in row]


def _clean_env() -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  train = [os.path.join(REPO, "tools", "train.py"), "--config=" + os.path.join(REPO, "experiments", "tiny.py")]
  multi = tmp_path / "multi"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "launch_local.py"), "--num_processes=2",
       "--devices_per_process=4", "--timeout_s=500", "--"] + train + [f"--workdir={multi}"] + _OVERRIDES,
      cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
  assert "process 1 of 2" in proc.stdout and "4 local / 8 global devices" in proc.stdout

  single = tmp_path / "single"
  env = _clean_env()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  proc = subprocess.run([sys.executable] + train + [f"--workdir={single}"] + _OVERRIDES, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]

  expected, got = _losses(single), _losses(multi)
  assert len(expected) == _STEPS and len(got) == _STEPS
  assert got == pytest.approx(expected, rel=1e-5)
  assert got[-1] < got[0]  # it trained
  # Both processes checkpointed together at the end (orbax across processes).
  assert os.path.isdir(multi / "checkpoints" / str(_STEPS))
  assert load_config("tiny").mesh.to_dict() == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
