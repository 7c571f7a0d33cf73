"""Layout search for a GPU count: every mesh x microbatching x remat policy that divides the model and fits memory,
ranked by predicted step time (tweetjax/perf/step_time.py).

Enumerated: tensor (divides the node size, heads, kv heads, mlp and vocab), expert (divides the experts), stage
(divides the layers), context (divides the sequence), fsdp (with expert, divides d_model), data (the rest: the
product is the GPU count); microbatches (every count that leaves whole rows per batch shard); the remat policies.
The global batch is fixed (the config's, or --global_batch): the per-device batch follows from the mesh and the
microbatch count. Only the axes of `SearchSpace.axes` are used: by default the ones tweetjax's mesh has, so every
layout the search recommends is one tweetjax can run; stage and context can be added to plan ahead.

Memory per device is analytic (on a GPU; with a fused attention kernel no L x L scores), with tweetjax/perf/memory.py's
activation model: fp32 params, gradients and Adam moments at their shard size (+ the fp32 accumulator when
microbatching), the saved activations of every microbatch in flight (Program.pipeline_in_flight: all of them for
a GPipe-style schedule; 1F1B: min(stages, microbatches), interleaving adds (p - 1) / (p v)), the largest layer's
transient working set, the logits, and two layers of gathered weights
(the one in use and the prefetched next). A compiled dry-run slice (tools/dryrun.py --search_confirm) reports
XLA's own figure for the best few.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Iterator, Sequence

from tweetjax.parallel.mesh import MESH_AXES
from tweetjax.perf import hardware as hardware_lib
from tweetjax.perf import links
from tweetjax.perf import memory as memory_lib
from tweetjax.perf import step_time
from tweetjax.perf.workload import REMAT, Layout, ModelShape, Program, param_shard_elements, rows_per_microbatch

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  axes: tuple[str, ...] = MESH_AXES  # tweetjax's mesh axes: every layout found is one tweetjax can run
  remat: tuple[str, ...] = REMAT
  max_microbatches: int = 256
  virtual_stages: tuple[int, ...] = (1, 2, 4)
  max_context: int = 16


@dataclasses.dataclass(frozen=True)
class Memory:
  state: float  # params + gradients + optimizer moments (+ accumulator)
  activations: float  # saved for the backward, all microbatches in flight
  working: float  # transient + logits + gathered weights

  @property
  def total(self) -> float:
    return self.state + self.activations + self.working


def device_memory(shape: ModelShape, layout: Layout, program: Program, param_bytes: int = 4) -> Memory:
  m, t, c = layout.mesh, layout.size(program.tensor_axes), layout.mesh["context"]
  p, v = m["stage"], layout.virtual_stages
  shard = param_shard_elements(shape, layout, program)
  optimizer_shard = shard / (m["data"] if program.optimizer_over_data else 1)
  state = shard * param_bytes * 2 + optimizer_shard * 8 + (4 * shard if layout.microbatches > 1 else 0)
  b = rows_per_microbatch(layout, program)
  layers_per_stage = -(-shape.num_layers // (p * v)) * v
  act = memory_lib.activations(shape, b, layout.seq_len // c, t, t, t, layout.remat, int(program.activation_bytes),
                               layers=range(layers_per_stage))
  if p == 1:
    in_flight = 1
  elif program.pipeline_in_flight == "all":
    in_flight = layout.microbatches
  else:  # 1F1B; interleaving keeps (p - 1) / (p v) more on the first stage
    in_flight = min(p, layout.microbatches) * (1 + (p - 1) / (p * v) if v > 1 else 1)
  flash = program.attention == "flash"  # a fused kernel keeps no L x L scores
  saved = (act.saved - (act.saved_scores if flash else 0)) * in_flight
  gathered = 2 * 2 * (shape.attention_params + max(shape.dense_mlp_params, shape.expert_params /
                                                   max(layout.size(program.expert_axes), 1))) / t
  working = act.transient - (act.transient_scores if flash else 0) + act.logits + gathered * program.gather_bytes
  return Memory(state, saved, working)


def _divisors(n: int, limit: int | None = None) -> list[int]:
  return [d for d in range(1, (limit or n) + 1) if n % d == 0]


def enumerate_layouts(shape: ModelShape, devices: int, global_batch: int, seq_len: int, program: Program,
                      hw: hardware_lib.Hardware, space: SearchSpace) -> Iterator[Layout]:
  allowed = set(space.axes)
  tensors = [t for t in _divisors(hw.gpus_per_node) if all(
      x % t == 0 for x in (shape.num_heads, shape.num_kv_heads, shape.mlp_dim, shape.vocab_size,
                           shape.moe_mlp_dim))] if "tensor" in allowed else [1]
  experts = _divisors(shape.num_experts) if shape.num_experts and "expert" in allowed else [1]
  stages = _divisors(shape.num_layers) if "stage" in allowed else [1]
  contexts = [c for c in _divisors(seq_len, space.max_context)] if "context" in allowed else [1]
  for t in tensors:
    for e in experts:
      for p in stages:
        for c in contexts:
          rest, r = divmod(devices, t * e * p * c)
          if r:
            continue
          for f in (_divisors(rest) if "fsdp" in allowed else [1]):
            d = rest // f
            if d > 1 and "data" not in allowed:
              continue
            if shape.d_model % (f * e) or (shape.num_experts and shape.d_model % f):
              continue
            shards = d * f * e
            if global_batch % shards:
              continue
            mesh = {"data": d, "stage": p, "fsdp": f, "expert": e, "context": c, "tensor": t}
            rows = global_batch // shards
            for k in _divisors(rows, space.max_microbatches):
              if p > 1 and k < p:
                continue  # a pipeline needs at least one microbatch per stage
              for v in (space.virtual_stages if p > 1 else (1,)):
                if shape.num_layers % (p * v):
                  continue
                for remat in space.remat:
                  yield Layout(mesh, global_batch, seq_len, microbatches=k, remat=remat, virtual_stages=v)


@dataclasses.dataclass
class Candidate:
  layout: Layout
  memory: Memory
  prediction: step_time.Prediction


@dataclasses.dataclass
class SearchResult:
  ranked: list[Candidate]  # fitting layouts, fastest first
  considered: int
  over_memory: int
  seconds: float
  memory_limit: float
  devices: int


def search(shape: ModelShape, devices: int, global_batch: int, seq_len: int, program: Program,
           hw: hardware_lib.Hardware, space: SearchSpace = SearchSpace(), usable_fraction: float = 0.9,
           keep: int = 50) -> SearchResult:
  start = time.perf_counter()
  limit = hw.hbm_bytes * usable_fraction
  ranked: list[Candidate] = []
  considered = over = 0
  for layout in enumerate_layouts(shape, devices, global_batch, seq_len, program, hw, space):
    considered += 1
    mem = device_memory(shape, layout, program)
    if mem.total > limit:
      over += 1
      continue
    ranked.append(Candidate(layout, mem, step_time.predict(shape, layout, program, hw)))
  ranked.sort(key=lambda c: (c.prediction.step_s, c.memory.total))
  return SearchResult(ranked[:keep], considered, over, time.perf_counter() - start, limit, devices)


def format_search(result: SearchResult, top: int = 5, breakdowns: int = 3, tokens: float = 0.0) -> str:
  lines = [f"layout search: {result.devices} GPUs, {result.considered} layouts considered, {result.over_memory} over "
           f"{result.memory_limit / GIB:.1f} GiB, {len(result.ranked)} kept ({result.seconds:.1f} s)"]
  if not result.considered:
    lines.append(f"no mesh of {result.devices} GPUs over the allowed axes divides the model and the global batch: "
                 f"the batch shards (data x fsdp x expert) must divide the global batch and the other axes the "
                 f"model (heads, layers, sequence); change --global_batch or --devices, or allow more axes "
                 f"(--search_axes)")
    return "\n".join(lines)
  if not result.ranked:
    lines.append("no layout fits: allow more axes (--search_axes), a smaller batch per device, or more remat")
    return "\n".join(lines)
  lines += ["", f"  {'#':>2} {'mesh':<44} {'mb':>4} {'rows':>4} {'remat':<13} {'v':>2} {'GiB':>6} {'step s':>8} "
                f"{'MFU':>6} {'TFLOP/s':>8}"]
  for i, c in enumerate(result.ranked[:top]):
    lay, pred = c.layout, c.prediction
    lines.append(f"  {i + 1:>2} {links.mesh_str(lay.mesh):<44} {lay.microbatches:>4} "
                 f"{lay.global_batch // lay.microbatches // lay.size(pred.program.batch_axes):>4} {lay.remat:<13} "
                 f"{lay.virtual_stages:>2} {c.memory.total / GIB:6.1f} {pred.step_s:8.3f} {100 * pred.mfu:5.1f}% "
                 f"{pred.model_flops_per_gpu / 1e12:8.1f}")
  for i, c in enumerate(result.ranked[:breakdowns]):
    lines += ["", f"#{i + 1}: memory {c.memory.total / GIB:.1f} GiB (state {c.memory.state / GIB:.1f}, activations "
                  f"{c.memory.activations / GIB:.1f}, working {c.memory.working / GIB:.1f})",
              step_time.format_prediction(c.prediction, tokens)]
  return "\n".join(lines)


def axes_of(names: Sequence[str]) -> tuple[str, ...]:
  unknown = sorted(set(names) - set(links.DEVICE_ORDER))
  if unknown:
    raise ValueError(f"--search_axes: unknown axes {unknown}; known: {list(links.DEVICE_ORDER)}")
  return tuple(a for a in links.DEVICE_ORDER if a in names)


