"""Where a compiled train step's time goes: a jax.profiler trace of one step, its ops grouped by model part.

Every op the trace shows (a fusion, a dot, a copy) is looked up in the step's optimized HLO: it is a matmul if it is a
dot or a fusion whose computation contains one, and its metadata op_name (the JAX name stack) says which part of the
model it belongs to. Time is attributed to wall time: ops that run concurrently (XLA:CPU runs independent thunks side
by side, e.g. the LM head's dh and dW dots each on one core) share the interval they overlap, so summing the table
gives the wall time spent inside ops, and the rest of the step is control flow (while/cond) and gaps between ops.
Plain dots run asynchronously on XLA:CPU, so the idle time after a dot's event is counted as that dot's
(`wall_attributed`).
Needs `--xla_cpu_enable_xprof_traceme=true` in XLA_FLAGS on a CPU (tools/bench.py --sections=profile sets it).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Any, Callable, NamedTuple

import jax

_CONTROL = ("while", "conditional", "call")
# (substring of the op_name metadata, part), first match wins.
_PARTS = (("/attention/while", "attention blocks"), ("/attention", "attention projections"),
          ("/mlp", "mlp"), ("norm", "norms"), ("/embed", "embedding"),
          ("dynamic_update_index_in_dim", "layer-scan residual stacking"),
          ("dynamic_index_in_dim", "layer-scan residual stacking"), ("jvp()", "lm head + loss"),
          ("Transformer", "other model ops"))


class OpInfo(NamedTuple):
  matmul: bool
  part: str
  opcode: str


def model_part(op_name: str) -> str:
  """The model part of an op from its JAX name stack; outside the model's forward/backward: the optimizer."""
  for key, part in _PARTS:
    if key in op_name:
      return part
  return "optimizer, grad norm, NaN guard"


def hlo_ops(hlo_text: str) -> dict[str, OpInfo]:
  """Instruction name -> OpInfo, for every instruction of an optimized HLO module's text."""
  bodies = {m.group(1): m.group(2) for m in re.finditer(r"^(?:ENTRY )?%(\S+) \(.*?\n(.*?)\n}\n", hlo_text, re.S | re.M)}
  ops = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%(\S+) = \S+ ([\w-]+)\(", line)
    if not m:
      continue
    name, opcode = m.groups()
    calls = re.search(r"calls=%([\w.\-]+)", line)
    body = bodies.get(calls.group(1), "") if calls else ""
    meta = re.search(r'op_name="([^"]*)"', line)
    matmul = opcode in ("dot", "convolution") or " dot(" in body or " convolution(" in body
    ops[name] = OpInfo(matmul, model_part(meta.group(1) if meta else ""), opcode)
  return ops


def wall_attributed(events: list[dict], ops: dict[str, OpInfo]) -> collections.Counter:
  """(matmul|other, part) -> microseconds of wall time, concurrent ops sharing what they overlap.

  XLA:CPU runs a plain `dot` (an Eigen contraction, not a YNNPACK fusion) asynchronously on its thread pool: the
  trace event ends when the dot is launched and the next op starts when its result is ready. So a gap that follows
  a dot's event with nothing else running is that dot's time and goes to its part; other gaps stay unattributed."""
  bounds = []
  for e in events:
    info = ops.get(e["name"])
    if info is None or info.opcode in _CONTROL:
      continue
    key = ("matmul" if info.matmul else "other", info.part)
    bounds += [(e["ts"], 1, key, False), (e["ts"] + e["dur"], -1, key, info.opcode == "dot")]
  bounds.sort(key=lambda b: (b[0], b[1]))
  active, wall, last, ended_dot = collections.Counter(), collections.Counter(), None, None
  for ts, delta, key, is_dot in bounds:
    running = sum(active.values())
    if last is not None and ts > last:
      if running:
        for k, count in active.items():
          if count:
            wall[k] += (ts - last) * count / running
      elif ended_dot is not None:  # the async tail of the dot that ended last
        wall[ended_dot] += ts - last
    active[key] += delta
    if delta < 0 and running + delta == 0:
      ended_dot = key if is_dot else None
    last = ts
  return wall


def profile_step(step: Callable[..., Any], hlo_text: str, *args) -> dict[str, Any]:
  """Runs `step(*args)` once under jax.profiler and returns the step's wall seconds and the per-part table."""
  directory = tempfile.mkdtemp(prefix="op_profile_")
  jax.profiler.start_trace(directory, create_perfetto_trace=True)
  start = time.perf_counter()
  jax.block_until_ready(step(*args))
  step_s = time.perf_counter() - start
  jax.profiler.stop_trace()
  files = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise RuntimeError(f"jax.profiler wrote no perfetto trace under {directory}")
  with gzip.open(files[0]) as f:
    events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
  ops = hlo_ops(hlo_text)
  wall = wall_attributed(events, ops)
  rows = [{"kind": kind, "part": part, "seconds": us / 1e6} for (kind, part), us in wall.most_common()]
  return {"step_s": step_s, "in_ops_s": sum(wall.values()) / 1e6, "rows": rows,
          "ops_found": sum(1 for e in events if e["name"] in ops)}
