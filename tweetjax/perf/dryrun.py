"""AOT dry-run of the real train step for a mesh that does not exist here: compile, memory, FLOPs, collectives.

The train step of `build_experiment(config)` is lowered from ShapeDtypeStructs that carry their shardings (the
state layout and `batch_sharding(mesh)`), so nothing is allocated, and compiled for the (fake CPU) devices. The
per-device program XLA builds is then read: `memory_analysis()` (arguments, outputs, aliasing, temporaries),
`cost_analysis()` (which counts a scanned layer once), and the optimized HLO text for trip-count-weighted matmul
FLOPs and the bytes of every collective (tweetjax/perf/hlo.py). An analytic model (tweetjax/perf/memory.py) sits
next to XLA's numbers.

CPU-compiled memory is an ESTIMATE for a GPU: XLA:CPU fuses and schedules differently, has no cuDNN flash
attention (L x L scores are materialised) and may keep fp32 copies where the GPU computes in bf16.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from tweetjax.parallel.rules import axis_size, batch_sharding, mesh_axes_of, mesh_context
from tweetjax.perf import hlo, memory
from tweetjax.train import flops as flops_lib
from tweetjax.train.experiment import build_experiment
from tweetjax.train.profiling import aot_compile
from tweetjax.train.step import BATCH_KEYS

GIB = 2**30
CPU_ESTIMATE_NOTE = ("NOTE: memory is from XLA:CPU's buffer assignment for the same sharded program: an estimate "
                     "for a GPU (different fusion and scheduling, no cuDNN flash attention), not a guarantee.")


def abstract_batch(mesh, global_batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  sharding = batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=sharding) for k in BATCH_KEYS}
  batch["weights"] = jax.ShapeDtypeStruct((global_batch, seq_len), jnp.float32, sharding=sharding)
  return batch


@dataclasses.dataclass
class DryRun:
  mesh: dict[str, int]
  devices: int
  global_batch: int
  microbatches: int
  seq_len: int
  remat: str
  attention_impl: str
  logits_chunk: int  # tokens per chunk of the tiled LM head + loss (0: dense logits)
  batch_shards: int
  compile_s: float
  xla_memory: dict[str, int]  # per device, from compiled.memory_analysis()
  analytic: memory.MemoryEstimate
  param_bytes_hlo: int  # per device: the params' entry parameters of the compiled program
  hlo_dot_flops: float  # per device per step, loop trip counts applied
  xla_cost_flops: float | None  # cost_analysis(): scanned bodies counted once
  model_flops: float  # per device per step: flops.py train count (causal attention)
  model_flops_dense: float  # ... with dense attention (what the kernel executes)
  collectives: dict[str, hlo.CollectiveStats]
  device_memory: float  # bytes available per device (after usable_fraction)
  num_params: int
  pipeline: dict[str, Any] | None = None  # stages, microbatches, repeats, iterations, bubble (stage > 1 only)
  module: hlo.Module | None = dataclasses.field(default=None, repr=False)  # the optimized per-device HLO

  @property
  def rows_per_shard(self) -> float:
    return self.global_batch / self.batch_shards

  @property
  def peak(self) -> int:
    m = self.xla_memory
    return m["argument"] + m["output"] - m["alias"] + m["temp"]

  @property
  def fits(self) -> bool:
    return self.peak <= self.device_memory

  def summary(self) -> dict[str, Any]:
    return {"mesh": self.mesh, "devices": self.devices, "global_batch": self.global_batch,
            "microbatches": self.microbatches, "seq_len": self.seq_len, "remat": self.remat,
            "attention_impl": self.attention_impl, "logits_chunk": self.logits_chunk,
            "rows_per_batch_shard": self.rows_per_shard, "compile_s": self.compile_s,
            "xla_memory": self.xla_memory, "peak_bytes": self.peak, "fits": self.fits,
            "device_memory_bytes": self.device_memory, "analytic": self.analytic.as_dict(),
            "param_bytes_hlo": self.param_bytes_hlo, "hlo_dot_flops": self.hlo_dot_flops,
            "xla_cost_flops": self.xla_cost_flops, "model_flops": self.model_flops,
            "model_flops_dense": self.model_flops_dense, "num_params": self.num_params,
            "collectives": {k: dataclasses.asdict(v) for k, v in self.collectives.items()},
            "collective_payload_bytes": sum(v.payload_bytes for v in self.collectives.values()),
            "pipeline": self.pipeline}


def _memory_stats(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  if m is None:
    return {"argument": 0, "output": 0, "alias": 0, "temp": 0, "code": 0}
  return {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
          "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes),
          "code": int(m.generated_code_size_in_bytes)}


def _entry_param_bytes(module: hlo.Module, indices: Sequence[int]) -> int:
  """Bytes of the ENTRY parameters with the given numbers (per device: the program is already partitioned)."""
  by_index = {}
  for instr in module.computations[module.entry]:
    if instr.opcode == "parameter" and instr.operands:
      by_index[int(instr.operands[0])] = sum(s.bytes for s in instr.shapes)
  return int(sum(by_index.get(i, 0) for i in indices))


def dry_run(config: ml_collections.ConfigDict, *, device_memory_bytes: float = 80 * GIB,
            usable_fraction: float = 0.9) -> DryRun:
  """Compiles config's train step on all (fake) devices and reads memory, FLOPs and collectives."""
  experiment = build_experiment(config)
  mesh, layout = experiment.mesh, experiment.layout
  B, L, microbatches = int(config.data.global_batch_size), experiment.seq_len, int(config.train.microbatches)
  batch = abstract_batch(mesh, B, L)
  with mesh_context(mesh, experiment.rules):
    compiled, info = aot_compile(experiment.train_step().jitted, layout.abstract_state, batch)
  module = hlo.parse_module(compiled.as_text())

  first_param = len(jax.tree.leaves(layout.abstract_state.step))
  param_indices = range(first_param, first_param + len(jax.tree.leaves(layout.abstract_state.params)))
  flops = flops_lib.flops_per_token(experiment.model_config, L)
  tokens_per_device = B * L / mesh.size
  spec = experiment.model.pipeline
  pipeline = None
  if spec is not None and spec.stages > 1:
    pipeline = {"stages": spec.stages, "microbatches": spec.microbatches, "repeats": spec.repeats,
                "iterations": spec.iterations, "bubble": spec.bubble}
  return DryRun(
      mesh=dict(mesh.shape), devices=mesh.size, global_batch=B, microbatches=microbatches, seq_len=L,
      remat=experiment.model_config.remat_policy, attention_impl=experiment.model_config.attention_impl,
      logits_chunk=experiment.model_config.logits_chunk,
      batch_shards=axis_size(mesh, mesh_axes_of("act_batch", experiment.rules)),
      compile_s=info.seconds, xla_memory=_memory_stats(compiled),
      analytic=memory.estimate(experiment, B, microbatches),
      param_bytes_hlo=_entry_param_bytes(module, param_indices),
      hlo_dot_flops=hlo.dot_flops(module), xla_cost_flops=flops_lib.compiled_flops(compiled),
      model_flops=flops.train * tokens_per_device, model_flops_dense=flops.train_dense_attention * tokens_per_device,
      collectives=hlo.collective_stats(module), device_memory=device_memory_bytes * usable_fraction,
      num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(layout.abstract_state.params)), pipeline=pipeline,
      module=module)


def _gib(n: float) -> str:
  return f"{n / GIB:8.2f} GiB"


def format_report(run: DryRun) -> str:
  m, a = run.xla_memory, run.analytic
  lines = [
      f"mesh {run.mesh} = {run.devices} devices; {run.num_params / 1e9:.2f}B params; global batch {run.global_batch} "
      f"x {run.seq_len} tokens in {run.microbatches} microbatch(es) = {run.rows_per_shard:g} rows per batch shard "
      f"({run.batch_shards} shards); remat={run.remat}; attention={run.attention_impl}; logits_chunk="
      f"{run.logits_chunk or 'off (dense logits)'}",
      f"compile: {run.compile_s:.1f}s",
  ]
  if run.pipeline:
    p = run.pipeline
    lines.append(f"pipeline: {p['stages']} stages x {p['repeats']} repeat(s), {p['microbatches']} microbatches per "
                 f"step's microbatch, {p['iterations']} iterations; bubble {100 * p['bubble']:.1f}% "
                 f"= (S - 1) / (R M + S - 1)")
  lines += [
      "",
      "memory per device            XLA (CPU-compiled)      analytic",
      f"  params                      {'':>12}          {_gib(a.params)}   (XLA entry params: "
      f"{run.param_bytes_hlo / GIB:.2f} GiB)",
      f"  optimizer state             {'':>12}          {_gib(a.optimizer)}",
      f"  arguments (state + batch)   {_gib(m['argument'])}",
      f"  outputs (aliased: {m['alias'] / GIB:.2f} GiB)  {_gib(m['output'])}",
      f"  gradients                   {'':>12}          {_gib(a.gradients)}",
      f"  activations saved           {'':>12}          {_gib(a.activations_saved)}",
      f"  activations transient       {'':>12}          {_gib(a.activations_transient)}",
      f"  logits + loss               {'':>12}          {_gib(a.logits)}",
      f"  temporaries                 {_gib(m['temp'])}",
      f"  peak (arg + out - alias + temp) {_gib(run.peak)}      {_gib(a.total)}",
      f"  analytic with flash attention (no L x L scores; GPU + cuDNN)      {_gib(a.total_flash_attention)}",
      f"  fits {run.device_memory / GIB:.1f} GiB usable: {'YES' if run.fits else 'NO'} "
      f"({100 * run.peak / max(run.device_memory, 1):.0f}% used)",
      CPU_ESTIMATE_NOTE,
      "",
      f"FLOPs per device per step: HLO matmuls {run.hlo_dot_flops:.4g} (loops x trip count); model {run.model_flops:.4g} "
      f"(causal), {run.model_flops_dense:.4g} (dense attention); HLO / dense model = "
      f"{run.hlo_dot_flops / max(run.model_flops_dense, 1):.3f} (remat recompute shows here); XLA cost_analysis "
      f"{run.xla_cost_flops or float('nan'):.4g} (counts a scanned layer once)",
      "",
      "collectives per device per step  ops  executions      payload         wire   largest",
  ]
  for kind, s in run.collectives.items():
    lines.append(f"  {kind:<28} {s.ops:5d} {s.executions:10.0f} {hlo.format_bytes(s.payload_bytes):>12} "
                 f"{hlo.format_bytes(s.wire_bytes):>12}   {s.largest}")
  lines.append(f"  {'total':<28} {'':5} {'':10} "
               f"{hlo.format_bytes(sum(s.payload_bytes for s in run.collectives.values())):>12} "
               f"{hlo.format_bytes(sum(s.wire_bytes for s in run.collectives.values())):>12}")
  return "\n".join(lines)


# --- search ----------------------------------------------------------------------------------------------------

REMAT_COST = {"none": 1.0, "dots": 1.05, "dots_no_batch": 1.15, "full": 4.0 / 3.0}  # compute relative to no remat


def _with(config: ml_collections.ConfigDict, remat: str, rows_per_shard: int, microbatches: int, shards: int):
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.remat_policy = remat
  config.train.microbatches = microbatches
  config.data.global_batch_size = rows_per_shard * microbatches * shards
  return config


def search(config: ml_collections.ConfigDict, *, device_memory_bytes: float, usable_fraction: float = 0.9,
           remat_policies: Sequence[str] = ("none", "dots_no_batch", "full"),
           microbatches: Sequence[int] = (1, 4), log=print) -> list[dict[str, Any]]:
  """Per remat policy: the largest microbatch (rows per batch shard) that fits, then k microbatches of it.

  Peak memory is affine in the microbatch rows m (state is fixed, activations grow with m): two compiles (m = 1,
  2) give the line, the predicted largest power of two is compiled to confirm (halved until it fits). Larger
  per-device batches then come from microbatching, which only adds the fp32 gradient accumulator.
  """
  rows: list[dict[str, Any]] = []
  probe = build_experiment(config)
  shards = axis_size(probe.mesh, mesh_axes_of("act_batch", probe.rules))
  del probe
  cache: dict[tuple[str, int, int], DryRun] = {}

  def run(remat, m, k):
    key = (remat, m, k)
    if key not in cache:
      cache[key] = dry_run(_with(config, remat, m, k, shards), device_memory_bytes=device_memory_bytes,
                           usable_fraction=usable_fraction)
      r = cache[key]
      r.module = None  # the search keeps every run: not their HLO
      log(f"  remat={remat:<14} rows/shard={m:<4} microbatches={k:<3} peak {r.peak / GIB:8.2f} GiB "
          f"{'fits' if r.fits else 'does NOT fit'} (compile {r.compile_s:.0f}s)")
    return cache[key]

  limit = device_memory_bytes * usable_fraction
  for remat in remat_policies:
    one, two = run(remat, 1, 1), run(remat, 2, 1)
    if not one.fits:
      rows.append({"remat": remat, "rows_per_shard": 0, "microbatches": 1, "per_device_batch": 0,
                   "peak_bytes": one.peak, "fits": False})
      continue
    slope = max(two.peak - one.peak, 1)
    best = 2 if two.fits else 1
    predicted = 1 + int((limit - one.peak) // slope)
    m = 2 ** int(math.log2(max(predicted, 1)))
    while m > best:
      if run(remat, m, 1).fits:
        best = m
        break
      m //= 2
    for k in microbatches:
      r = run(remat, best, k)
      rows.append({"remat": remat, "rows_per_shard": best, "microbatches": k, "per_device_batch": best * k,
                   "peak_bytes": r.peak, "fits": r.fits,
                   "relative_throughput": best / REMAT_COST[remat]})
  return rows


def format_search(rows: list[dict[str, Any]]) -> str:
  lines = ["remat            rows/shard/microbatch  microbatches  rows/shard/step   peak GiB   fits",]
  for r in rows:
    lines.append(f"{r['remat']:<16} {r['rows_per_shard']:>21} {r['microbatches']:>13} {r['per_device_batch']:>16} "
                 f"{r['peak_bytes'] / GIB:10.2f}   {'yes' if r['fits'] else 'NO'}")
  fitting = [r for r in rows if r["fits"]]
  if fitting:
    best = max(fitting, key=lambda r: (r["relative_throughput"], -r["microbatches"]))
    lines.append(f"suggested: remat={best['remat']} with {best['rows_per_shard']} row(s) per batch shard per "
                 f"microbatch (largest microbatch per unit of recompute); raise train.microbatches for a larger "
                 f"batch at the same memory")
  else:
    lines.append("nothing fits at one row per batch shard: shard further (fsdp/tensor) or shorten the sequence")
  return "\n".join(lines)
