"""Process set-up that must happen before JAX starts: XLA flags from the config, fake CPU devices, multi-process.

XLA reads XLA_FLAGS once, when the first backend initialises; `jax.distributed.initialize` must also run before
then. Every entry point (tools/train.py, evaluate.py, bench.py, dryrun.py) calls `setup_environment` first thing in
`main`, so a config's flags apply the same way to training, evaluation, benchmarks and dry-runs.

Flag precedence, lowest first: DEFAULT_XLA_FLAGS (via config.xla_flags) < the config's own entries < anything the
user already put in XLA_FLAGS (so `XLA_FLAGS=--flag=x python tools/train.py ...` always wins).

Multi-process: `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID` (e.g. from tools/launch_local.py)
start `jax.distributed.initialize` with those values; under SLURM with more than one task it is called with no
arguments and jax reads the SLURM variables itself. A single process needs neither.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Iterable, Mapping, Sequence

from absl import logging

# GPU collectives and scheduling for FSDP/tensor-parallel training (all exist in jaxlib 0.10.2; the CPU backend
# accepts and ignores them). Threshold 128 MiB: large enough that a layer's FSDP all-gathers/reduce-scatters are
# combined into a few big NCCL calls, small enough to pipeline them across the scanned layers.
GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",  # overlap collectives with compute
    "--xla_gpu_enable_while_loop_double_buffering=true",  # prefetch layer i+1's weights in the layer scan
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_enable_all_gather_combine_by_dim=false",
    "--xla_gpu_enable_reduce_scatter_combine_by_dim=false",
)
DEFAULT_XLA_FLAGS = GPU_XLA_FLAGS

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

# XLA:CPU runs a collective on the client's intra-op thread pool, where it blocks until every participant arrives,
# and starts a device's independent collectives concurrently. Fake devices share that pool (PJRT_NPROC threads,
# default: the core count), so on a small host every thread can end up blocked on collectives whose other
# participants are queued behind them: a deadlock that XLA aborts after 40 s ("Termination timeout for `all reduce
# RendezvousKey...`"). Measured on tiny (8 devices, data=2,fsdp=2,tensor=2) on 2 cores: pools of 2, 4, 8 and 12
# threads deadlocked within 300 steps, 16, 32 and 64 never did, at the same step time. Each fake device gets
# THREADS_PER_FAKE_DEVICE threads (32 for 8 devices), well above the largest pool seen to deadlock.
THREADS_PER_FAKE_DEVICE = 4
_FLAG_RE = re.compile(r"^--[A-Za-z0-9_]+(=.*)?$")


class SetupError(RuntimeError):
  """Set-up requested after JAX had already started its backends."""


def flag_name(flag: str) -> str:
  return flag.split("=", 1)[0]


def merge_xla_flags(current: str, extra: Iterable[str]) -> str:
  """`current` (an XLA_FLAGS string) plus the `extra` flags whose names it does not already set."""
  extra = [str(f).strip() for f in extra if str(f).strip()]
  for flag in extra:
    if not _FLAG_RE.match(flag):
      raise ValueError(f"config.xla_flags entry {flag!r}: expected '--xla_name=value'")
  present = {flag_name(f) for f in current.split()}
  added, seen = [], set()
  for flag in reversed(extra):  # a later entry of the same flag overrides an earlier one (config over default)
    name = flag_name(flag)
    if name not in present and name not in seen:
      added.append(flag)
      seen.add(name)
  return " ".join(current.split() + list(reversed(added)))


def fake_device_count(xla_flags: str) -> int:
  """The --xla_force_host_platform_device_count in an XLA_FLAGS string (the last one wins), 1 when absent."""
  counts = re.findall(_DEVICE_COUNT_FLAG + r"=(\d+)", xla_flags)
  return int(counts[-1]) if counts else 1


def with_fake_devices(environ: Mapping[str, str], devices: int) -> dict[str, str]:
  """A child process's environment: `environ` with its fake CPU device count (if any) replaced by `devices`.

  A PJRT_NPROC that `size_cpu_thread_pool` derived from this process's own device count is dropped, so the child
  sizes its pool for its own count; one the user set stays.
  """
  env = dict(environ)
  flags = env.get("XLA_FLAGS", "")
  parent_devices = fake_device_count(flags)
  if parent_devices > 1 and env.get("PJRT_NPROC") == str(_pool_threads(parent_devices)):
    del env["PJRT_NPROC"]
  kept = [f for f in flags.split() if flag_name(f) != _DEVICE_COUNT_FLAG]
  env["XLA_FLAGS"] = " ".join(kept + [f"{_DEVICE_COUNT_FLAG}={int(devices)}"])
  return env


def _pool_threads(devices: int) -> int:
  return max(os.cpu_count() or 1, THREADS_PER_FAKE_DEVICE * devices)


def size_cpu_thread_pool(environ=os.environ) -> int | None:
  """Sets PJRT_NPROC for fake CPU devices (see THREADS_PER_FAKE_DEVICE) unless it is set; returns the size set.

  Runs when tweetjax is imported, so any entry point that imports it before JAX creates its CPU client is covered.
  """
  devices = fake_device_count(environ.get("XLA_FLAGS", ""))
  if devices <= 1 or environ.get("PJRT_NPROC"):
    return None
  threads = _pool_threads(devices)
  environ["PJRT_NPROC"] = str(threads)
  return threads


def backends_started() -> bool:
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return bool(xla_bridge.backends_are_initialized())


def setup_environment(config=None, *, fake_devices: int | None = None, extra_flags: Sequence[str] = (),
                      distributed: bool = True) -> str:
  """Sets XLA_FLAGS (config.xla_flags, `extra_flags`, fake CPU device count) and starts multi-process JAX.

  Call before anything touches a device (jax.devices(), jit, ...). Returns the resulting XLA_FLAGS.
  """
  flags = list(extra_flags)
  if config is not None and "xla_flags" in config:
    flags = list(config.xla_flags) + flags
  if fake_devices:
    flags.append(f"{_DEVICE_COUNT_FLAG}={int(fake_devices)}")
  merged = merge_xla_flags(os.environ.get("XLA_FLAGS", ""), flags)
  if merged != os.environ.get("XLA_FLAGS", ""):
    if backends_started():
      raise SetupError(
          "setup_environment: JAX backends are already initialised, so XLA_FLAGS can no longer change; call it "
          "at the start of main(), before anything uses a device")
    os.environ["XLA_FLAGS"] = merged
  size_cpu_thread_pool()
  logging.info("XLA_FLAGS=%s PJRT_NPROC=%s", merged, os.environ.get("PJRT_NPROC", ""))
  if distributed:
    initialize_distributed()
  return merged


def distributed_env() -> dict[str, object] | None:
  """The jax.distributed.initialize kwargs this process was launched with; {} = auto-detect (SLURM); None = none."""
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
    if missing:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS={address} is set but {missing} are not: set all three "
                       "(or none, and let SLURM's variables be read)")
    kwargs: dict[str, object] = {"coordinator_address": address,
                                 "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
                                 "process_id": int(os.environ["JAX_PROCESS_ID"])}
    if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
      kwargs["local_device_ids"] = [int(i) for i in os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
    return kwargs
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and os.environ.get("SLURM_JOB_ID"):
    return {}
  return None


def initialize_distributed() -> bool:
  """jax.distributed.initialize from the environment (see the module docstring); False for a single process."""
  kwargs = distributed_env()
  if kwargs is None:
    return False
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  if jax_distributed.global_state.client is not None:
    return True  # already initialised (e.g. by a test harness)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
