"""Compilation (persistent cache, AOT compile with cache-hit detection) and jax.profiler traces of chosen steps."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
from absl import logging
from jax.experimental.compilation_cache import compilation_cache

_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_CACHE_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"


def setup_compilation_cache(cache_dir: str, workdir: str) -> str | None:
  """Turns on jax's persistent compilation cache. cache_dir "" = `<workdir>/../jax_cache`, "none" = off.

  The default sits next to the workdir so that restarts and sibling runs of a sweep share compiled steps.
  """
  if cache_dir.lower() == "none":
    logging.info("persistent compilation cache: off")
    return None
  cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(workdir.rstrip("/"))), "jax_cache")
  os.makedirs(cache_dir, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # jax settles on a cache (or none) at its first compilation; start over so this directory takes effect even
    # when something compiled before (a second run in one process, tests).
    compilation_cache.reset_cache()
  # Cache every executable that took at least a second to build (the default), whatever its size.
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  logging.info("persistent compilation cache: %s", cache_dir)
  return cache_dir


@dataclasses.dataclass
class CompileInfo:
  seconds: float
  cache_requests: int  # compilations that consulted the persistent cache
  cache_hits: int

  @property
  def source(self) -> str:
    if not self.cache_requests:
      return "compiled (persistent cache not consulted)"
    return "loaded from the persistent cache" if self.cache_hits else "compiled (persistent cache miss)"


def aot_compile(jitted: Callable, *abstract_args: Any) -> tuple[Any, CompileInfo]:
  """`jitted.lower(*abstract_args).compile()`, timed, noting whether jax's persistent cache served it.

  Call inside the mesh context the function needs. Lowering from ShapeDtypeStructs (with shardings) needs no data.
  """
  counts = {_CACHE_HIT: 0, _CACHE_REQUEST: 0}

  def listener(event: str, **kwargs) -> None:
    del kwargs
    if event in counts:
      counts[event] += 1

  jax.monitoring.register_event_listener(listener)
  start = time.perf_counter()
  try:
    compiled = jitted.lower(*abstract_args).compile()
  finally:
    jax.monitoring.unregister_event_listener(listener)
  return compiled, CompileInfo(time.perf_counter() - start, counts[_CACHE_REQUEST], counts[_CACHE_HIT])


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """"" -> None; "5,8" -> trace steps 5..7 (start before step 5, stop before step 8); "3" -> 3 steps after the
  first one (which compiles)."""
  spec = str(spec).strip()
  if not spec:
    return None
  parts = [p.strip() for p in spec.split(",")]
  try:
    numbers = [int(p) for p in parts]
  except ValueError:
    raise ValueError(f"config.train.profile_steps={spec!r}: expected 'START,STOP' or a step count") from None
  if len(numbers) == 1 and numbers[0] > 0:
    return 1, 1 + numbers[0]
  if len(numbers) == 2 and 0 <= numbers[0] < numbers[1]:
    return numbers[0], numbers[1]
  raise ValueError(f"config.train.profile_steps={spec!r}: expected 'START,STOP' with START < STOP, or a count > 0")


class StepProfiler:
  """Captures a jax.profiler trace of steps [start, stop) into `<workdir>/profile` (TensorBoard/Perfetto)."""

  def __init__(self, spec: str, workdir: str):
    self.window = parse_profile_steps(spec)
    self.directory = os.path.join(workdir, "profile")
    self.active = False

  def before_step(self, step: int) -> None:
    if self.window and step == self.window[0] and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True
      logging.info("profiler: tracing steps %d..%d into %s", self.window[0], self.window[1] - 1, self.directory)

  def after_step(self, step: int, sync: Any) -> None:
    """`step` is the step just run; `sync` an output of it, waited for so the trace holds the whole step."""
    if self.active and step + 1 >= self.window[1]:
      self.stop(sync)

  def stop(self, sync: Any = None) -> None:
    if self.active:
      if sync is not None:
        jax.block_until_ready(sync)
      jax.profiler.stop_trace()
      self.active = False
      logging.info("profiler: trace written to %s", self.directory)
