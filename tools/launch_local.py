"""Runs N processes of a tweetjax tool on this machine as one multi-process JAX job (the multi-host path, locally).

  python tools/launch_local.py --num_processes=2 --devices_per_process=4 -- \
      tools/train.py --config=experiments/tiny.py --workdir=/tmp/mh

Process i gets JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i (read by
tweetjax/perf/env.py, which calls jax.distributed.initialize before JAX starts) and, on a CPU,
--xla_force_host_platform_device_count=<devices_per_process>. Output lines are prefixed with the process id. The
launcher exits with the first non-zero exit status and stops the other processes if one fails. On a cluster, the
same tools run under SLURM with no launcher (`srun python tools/train.py ...`, see BUILD.md).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

from tweetjax.perf.env import with_fake_devices

_NUM = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "Fake CPU devices per process (0: leave XLA_FLAGS).")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port (0: a free one).")
_TIMEOUT = flags.DEFINE_float("timeout_s", 0, "Kill the job after this many seconds (0: never).")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
             JAX_PROCESS_ID=str(process_id))
  if devices:
    env = with_fake_devices(env, devices)
    env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def _pump(stream, prefix: str) -> None:
  for line in iter(stream.readline, ""):
    sys.stdout.write(f"{prefix}{line}")
    sys.stdout.flush()


def launch(command: list[str], num_processes: int, devices: int, port: int = 0, timeout_s: float = 0) -> int:
  port = port or free_port()
  procs, pumps = [], []
  for i in range(num_processes):
    proc = subprocess.Popen([sys.executable] + command, env=process_env(i, num_processes, port, devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(proc)
    pump = threading.Thread(target=_pump, args=(proc.stdout, f"[{i}] "), daemon=True)
    pump.start()
    pumps.append(pump)
  deadline = time.monotonic() + timeout_s if timeout_s else None
  status = 0
  while any(p.poll() is None for p in procs):
    failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if failed or (deadline and time.monotonic() > deadline):
      status = failed[0] if failed else 124
      for p in procs:
        if p.poll() is None:
          p.terminate()
      break
    time.sleep(0.2)
  for p in procs:
    try:
      p.wait(timeout=30)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
  for pump in pumps:
    pump.join(timeout=5)
  return status or next((p.returncode for p in procs if p.returncode), 0)


def main(argv):
  command = argv[1:]
  if command and command[0] == "--":
    command = command[1:]
  if not command:
    raise app.UsageError("usage: launch_local.py [flags] -- tools/<tool>.py [tool flags]")
  sys.exit(launch(command, _NUM.value, _DEVICES.value, _PORT.value, _TIMEOUT.value))


if __name__ == "__main__":
  app.run(main)
