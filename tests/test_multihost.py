"""Two JAX processes on 127.0.0.1 (4 CPU devices each) train tiny on the 8-device global mesh through
tools/launch_local.py + tools/train.py, and log the same losses as one process with 8 devices; a SIGTERM to one of
them stops both after the same step with one checkpoint, from which the pair resumes onto the uninterrupted losses.

Each process builds only its addressable shards of every global batch (the synthetic stream's
`make_array_from_callback`), so this is the multi-host data path; cross-process collectives use gloo (jax 0.10.2's
default CPU collectives). Tolerance: 1e-5 relative; the partitioned program is the same, only the transport of the
collectives differs.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, load_config, process_env

_STEPS = 3
_OVERRIDES = [f"--config.train.steps={_STEPS}", "--config.train.log_every=1", "--config.checkpoint.every_steps=0",
              "--config.train.tensorboard=false", "--config.train.compilation_cache_dir=none",
              "--config.train.peak_flops_per_device=1e9"]


def _losses(workdir) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [row["loss"] for row in rows if "loss" in row]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  train = [os.path.join(REPO, "tools", "train.py"), "--config=" + os.path.join(REPO, "experiments", "tiny.py")]
  multi = tmp_path / "multi"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "launch_local.py"), "--num_processes=2",
       "--devices_per_process=4", "--timeout_s=500", "--"] + train + [f"--workdir={multi}"] + _OVERRIDES,
      cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
  assert "process 1 of 2" in proc.stdout and "4 local / 8 global devices" in proc.stdout

  single = tmp_path / "single"
  env = process_env()
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
  assert load_config("tiny").mesh.to_dict() == {"data": 2, "stage": 1, "fsdp": 2, "expert": 1, "context": 1,
                                                "tensor": 2}


def _run_single(workdir, overrides) -> list[float]:
  env = process_env()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  train = [os.path.join(REPO, "tools", "train.py"), "--config=" + os.path.join(REPO, "experiments", "tiny.py")]
  proc = subprocess.run([sys.executable] + train + [f"--workdir={workdir}"] + overrides, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return _losses(workdir)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(tmp_path):
  train = [os.path.join(REPO, "tools", "train.py"), "--config=" + os.path.join(REPO, "experiments", "tiny.py")]
  workdir = tmp_path / "multi"
  # The schedule is fixed at 400 steps whatever train.steps is, so the resumed run and the reference can stop early.
  overrides = [o for o in _OVERRIDES if not o.startswith("--config.train.steps")] + [
      "--config.optimizer.decay_steps=400", f"--workdir={workdir}"]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs, logs = [], []
  for i in range(2):
    env = process_env()
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    logs.append(open(tmp_path / f"process_{i}.log", "w+"))
    procs.append(subprocess.Popen([sys.executable] + train + overrides + ["--config.train.steps=400"], cwd=REPO,
                                  env=env, stdout=logs[-1], stderr=subprocess.STDOUT, text=True))
  try:
    deadline = time.monotonic() + 400
    metrics = workdir / "metrics.jsonl"
    while (metrics.read_text().count("\n") if metrics.exists() else 0) < 3:  # whole rows only
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "training did not start"
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # only process 1 is told: the agreement must stop process 0 too
    for p in procs:
      p.wait(timeout=300)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  stopped = [int(o.split("preempted: stopping after step ")[1].split()[0]) for o in outputs]
  assert stopped[0] == stopped[1] and 3 <= stopped[0] < 400, stopped
  step = stopped[0]
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [step]
  assert "received signal" in outputs[1] and "received signal" not in outputs[0]
  assert len(_losses(workdir)) == step

  # Both processes resume from the checkpoint (each with its own data-iterator state) and run two more steps.
  resumed_steps = f"--config.train.steps={step + 2}"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "launch_local.py"), "--num_processes=2",
       "--devices_per_process=4", "--timeout_s=500", "--"] + train + overrides + [resumed_steps],
      cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
  assert proc.stdout.count(f"resuming at step {step}") == 2
  expected = _run_single(tmp_path / "single", [o for o in overrides if not o.startswith("--workdir")]
                         + [resumed_steps, f"--workdir={tmp_path / 'single'}"])
  got = _losses(workdir)
  assert len(got) == len(expected) == step + 2
  assert got == pytest.approx(expected, rel=1e-5)


_PIPELINE_MESH = ["--config.mesh.data=1", "--config.mesh.stage=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                  "--config.train.pipeline_microbatches=2"]


@pytest.mark.slow
def test_pipeline_stages_on_two_nodes_match_one_process(tmp_path):
  """Each process is a node of 4 devices: the node-major mesh puts `stage` across the nodes (the pipeline's
  activations cross processes) and fsdp x tensor inside each; the losses are the single-process ones."""
  train = [os.path.join(REPO, "tools", "train.py"), "--config=" + os.path.join(REPO, "experiments", "tiny.py")]
  multi = tmp_path / "multi"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "launch_local.py"), "--num_processes=2",
       "--devices_per_process=4", "--timeout_s=500", "--"] + train + [f"--workdir={multi}"] + _OVERRIDES
      + _PIPELINE_MESH, cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
  assert "mesh over 8 devices on 2 node(s)" in proc.stdout
  assert "stage        2  across 2 nodes" in proc.stdout and "tensor       2  inside one node" in proc.stdout
  assert "bubble 33.3%" in proc.stdout
  expected = _run_single(tmp_path / "single", _OVERRIDES + _PIPELINE_MESH)
  got = _losses(multi)
  assert len(got) == _STEPS and got == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_context_across_nodes_is_refused_before_compiling(tmp_path):
  """context x tensor = 8 devices cannot fit in a node of 4: the job stops before it compiles or writes."""
  train = [os.path.join(REPO, "tools", "train.py"), "--config=" + os.path.join(REPO, "experiments", "tiny.py")]
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "launch_local.py"), "--num_processes=2",
       "--devices_per_process=4", "--timeout_s=300", "--"] + train + [f"--workdir={tmp_path}"] + _OVERRIDES
      + ["--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.context=4", "--config.mesh.tensor=2"],
      cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=400)
  assert proc.returncode != 0
  assert "mesh axis 'context' (config.mesh.context=4) spans 2 nodes" in proc.stdout + proc.stderr
  assert not (tmp_path / "metrics.jsonl").exists()
