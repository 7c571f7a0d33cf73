"""What one device executes in a train step, analytically: matmul FLOPs, memory-bound bytes, collectives per axis.

Dims: T tokens of one device per microbatch (b rows x L/c positions), D d_model, H heads, K kv heads, Dh head dim,
F mlp hidden, V vocab, E experts, k experts per token, cf capacity factor; t, c, e, p: sizes of the tensor, context,
expert and stage axes.

`Program` says how a framework runs the step where frameworks differ; its defaults are what tweetjax compiles to on a
GPU, read from the compiled program (tools/dryrun.py on fake CPU meshes):
  - FSDP weights are all-gathered twice per layer per microbatch (forward, and again in the backward: the saved
    residual is the sharded weight; with full remat the recompute shares the backward's gather);
  - gradients are reduced per microbatch, inside the accumulation loop: a reduce-scatter over the weight's shard
    axes and an all-reduce over the other token axes (XLA:CPU forms an all-reduce + slice where a GPU compile
    forms the reduce-scatter; the model uses the GPU's);
  - Megatron tensor parallelism without sequence parallelism: 2 all-reduces of [T, D] per layer forward, 2 backward,
    +1 with full remat (XLA drops the recompute of the layer's last projection and its all-reduce: the backward
    does not need the layer output);
  - weights are cast to bf16 before the gather, gradients come out of bf16 matmuls (2-byte collectives; XLA:CPU
    upcasts bf16 matmuls to fp32 and moves 4 bytes).
Published runs (tweetjax/perf/published.py) override the fields that differ for their framework.

The counts are per device, per microbatch (phase "fwd"/"bwd", remat recompute in "bwd") or per step ("step").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

from tweetjax.perf import links

REMAT = ("none", "dots", "dots_no_batch", "full")
ATTENTION = ("flash", "materialized")
GRAD_REDUCE = ("per_microbatch", "per_step")


@dataclasses.dataclass(frozen=True)
class ModelShape:
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  vocab_size: int
  mlp_matrices: int = 3  # 3: gated (SwiGLU); 2: plain (GPT's GELU)
  norms_per_layer: int = 2  # 4 with grok-1's sandwich norms
  rotary: bool = True
  tie_embeddings: bool = False
  num_experts: int = 0
  experts_per_token: int = 2
  expert_mlp_dim: int = 0
  moe_every: int = 1
  capacity_factor: float = 1.25  # <= 0: dropless (counted as 1)

  @classmethod
  def from_model_config(cls, cfg) -> "ModelShape":
    return cls(num_layers=cfg.num_layers, d_model=cfg.d_model, num_heads=cfg.num_heads,
               num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, mlp_dim=cfg.mlp_dim, vocab_size=cfg.vocab_size,
               norms_per_layer=4 if cfg.norm_style == "sandwich" else 2, tie_embeddings=cfg.tie_embeddings,
               num_experts=cfg.num_experts, experts_per_token=cfg.experts_per_token,
               expert_mlp_dim=cfg.moe_mlp_dim, moe_every=cfg.moe_every, capacity_factor=cfg.capacity_factor)

  @property
  def moe_mlp_dim(self) -> int:
    return self.expert_mlp_dim or self.mlp_dim

  def is_moe_layer(self, layer: int) -> bool:
    return self.num_experts > 0 and (layer + 1) % self.moe_every == 0

  @property
  def moe_layers(self) -> int:
    return self.num_layers // self.moe_every if self.num_experts else 0

  @property
  def attention_params(self) -> int:
    D, H, K, Dh = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim
    return D * (H + 2 * K) * Dh + H * Dh * D

  @property
  def dense_mlp_params(self) -> int:
    return self.mlp_matrices * self.d_model * self.mlp_dim

  @property
  def expert_params(self) -> int:
    """One MoE layer's experts, all of them (3 matrices each), without the router."""
    return self.num_experts * 3 * self.d_model * (self.expert_mlp_dim or self.mlp_dim)

  @property
  def num_params(self) -> int:
    dense_layers = self.num_layers - self.moe_layers
    embeddings = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
    return (self.num_layers * self.attention_params + dense_layers * self.dense_mlp_params
            + self.moe_layers * (self.expert_params + self.d_model * self.num_experts) + embeddings)

  def train_flops_per_token(self, seq_len: int) -> float:
    """Model FLOPs per token, tweetjax.train.flops' convention: 6 x active matmul params + causal attention."""
    active_mlp = (self.experts_per_token * 3 * self.d_model * (self.expert_mlp_dim or self.mlp_dim)
                  + self.d_model * self.num_experts)
    dense_layers = self.num_layers - self.moe_layers
    matmul = (self.num_layers * self.attention_params + dense_layers * self.dense_mlp_params
              + self.moe_layers * active_mlp + self.d_model * self.vocab_size)
    attention = 2.0 * seq_len * self.num_heads * self.head_dim * self.num_layers  # 4 L H Dh / 2 per layer
    return 3.0 * (2.0 * matmul + attention)


@dataclasses.dataclass(frozen=True)
class Layout:
  mesh: Mapping[str, int]
  global_batch: int  # sequences per step
  seq_len: int
  microbatches: int = 1
  remat: str = "full"
  virtual_stages: int = 1  # pipeline chunks per device (interleaved schedule)

  def __post_init__(self):
    object.__setattr__(self, "mesh", links.full_mesh(self.mesh))
    if self.remat not in REMAT:
      raise ValueError(f"remat={self.remat!r}: expected one of {REMAT}")
    for name in ("global_batch", "seq_len", "microbatches", "virtual_stages"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

  @property
  def devices(self) -> int:
    return math.prod(self.mesh.values())

  def size(self, axes: Sequence[str]) -> int:
    return math.prod(self.mesh[a] for a in axes if a in self.mesh)


@dataclasses.dataclass(frozen=True)
class Program:
  """How the step is executed where frameworks differ (defaults: tweetjax on a GPU; see the module docstring)."""
  attention: str = "flash"  # flash: fused kernel, causal blocks skipped; materialized: L x L scores in HBM
  sequence_parallel: bool = False  # D-sized elementwise work split over `tensor` (all-reduce -> RS + AG)
  weight_gathers_per_microbatch: int = 2  # FSDP: 2 fwd + bwd; 1 kept for the backward; 0 once per step
  grad_reduce: str = "per_microbatch"  # where gradients are reduced: inside the accumulation loop, or once
  remat_skips_layer_output: bool = True  # XLA dead-code-eliminates the recompute of the layer's last projection
  tp_overlap: float = 0.0  # fraction of tensor-parallel communication hidden behind compute
  pp_scatter_gather: bool = False  # pipeline sends 1/t of the activations per tensor rank (Megatron)
  dropout: bool = False  # attention + hidden dropout (extra memory traffic)
  gather_bytes: float = 2.0  # bytes per element of gathered weights
  grad_bytes: float = 2.0  # bytes per element of reduced gradients
  activation_bytes: float = 2.0
  grad_accumulation_bytes: float = 10.0  # per param-shard element per microbatch (fp32 acc += bf16 grad)
  optimizer_bytes: float = 32.0  # per param-shard element per step: AdamW in fp32 (+ the non-finite guard)
  optimizer_over_data: bool = False  # ZeRO-1: optimizer state also sharded over `data`
  fp8: bool = False  # matmuls at the fp8 peak
  # Microbatches whose activations a pipeline stage holds for the backward: "all" for a GPipe-style (circular)
  # schedule that runs every forward before the backward, "1f1b" for min(stages, microbatches).
  pipeline_in_flight: str = "all"
  # Mesh axes of the rules table (tweetjax/parallel/rules.py DEFAULT_RULES); `context` splits the tokens too.
  embed_axes: tuple[str, ...] = ("fsdp", "expert", "context")  # dense weights' d_model ("embed")
  expert_embed_axes: tuple[str, ...] = ("fsdp", "context")  # expert weights' d_model ("expert_embed")
  expert_axes: tuple[str, ...] = ("expert",)  # "experts"
  tensor_axes: tuple[str, ...] = ("tensor",)  # "heads", "kv_heads", "mlp", "vocab"
  batch_axes: tuple[str, ...] = ("data", "fsdp", "expert")  # "act_batch"

  def __post_init__(self):
    if self.attention not in ATTENTION:
      raise ValueError(f"attention={self.attention!r}: expected one of {ATTENTION}")
    if self.grad_reduce not in GRAD_REDUCE:
      raise ValueError(f"grad_reduce={self.grad_reduce!r}: expected one of {GRAD_REDUCE}")
    if self.pipeline_in_flight not in ("all", "1f1b"):
      raise ValueError(f"pipeline_in_flight={self.pipeline_in_flight!r}: expected 'all' or '1f1b'")
    if self.weight_gathers_per_microbatch not in (0, 1, 2):
      raise ValueError(f"weight_gathers_per_microbatch={self.weight_gathers_per_microbatch}: expected 0, 1 or 2")

  @classmethod
  def from_rules(cls, rules, **overrides) -> "Program":
    """The tweetjax program with the mesh axes the rules table maps each logical name to."""
    from tweetjax.parallel.rules import mesh_axes_of  # pylint: disable=g-import-not-at-top
    return cls(embed_axes=mesh_axes_of("embed", rules), expert_embed_axes=mesh_axes_of("expert_embed", rules),
               expert_axes=mesh_axes_of("experts", rules), tensor_axes=mesh_axes_of("heads", rules),
               # "act_batch" also splits the rows over `stage` outside the pipelined layers; inside, a stage's
               # layers see the rows of the other batch axes only.
               batch_axes=tuple(a for a in mesh_axes_of("act_batch", rules) if a != "stage"), **overrides)

  @property
  def token_axes(self) -> tuple[str, ...]:
    """Axes that split the tokens: weight gradients are partial sums over these."""
    return tuple(dict.fromkeys(self.batch_axes + ("context",)))


@dataclasses.dataclass(frozen=True)
class Comm:
  name: str
  cls: str  # fsdp | grad | tp | a2a | pp | cp: decides what it may overlap with
  kind: str  # links.KINDS
  axes: tuple[str, ...]
  nbytes: float  # the full array (see links.collective_seconds)
  count: float  # per microbatch (phase fwd/bwd) or per step (phase step)
  phase: str  # fwd | bwd | step


@dataclasses.dataclass
class Work:
  """Per device per microbatch on the slowest pipeline stage (fwd / bwd incl. recompute), and per step."""
  matmul: dict[str, float]  # FLOPs of projections, MLP, LM head
  attention: dict[str, float]  # FLOPs of the attention core (q.k, p.v)
  memory: dict[str, float]  # bytes of memory-bound ops
  comms: list[Comm]
  step_memory: float  # bytes per step: optimizer update (+ accumulation is per microbatch in memory[...])
  layers_per_stage: int
  moe_layers_per_stage: float
  rows: int  # b: rows per batch shard per microbatch
  tokens: int  # T per device per microbatch


def rows_per_microbatch(layout: Layout, program: Program) -> int:
  shards = layout.size(program.batch_axes) * layout.microbatches
  if layout.global_batch % shards:
    raise ValueError(f"global batch {layout.global_batch} is not divisible by microbatches x batch shards = "
                     f"{layout.microbatches} x {layout.size(program.batch_axes)} (axes {program.batch_axes})")
  return layout.global_batch // shards


def param_shard_elements(shape: ModelShape, layout: Layout, program: Program) -> float:
  """Parameter elements one device holds (the optimizer's share: + data with ZeRO-1)."""
  t, p = layout.size(program.tensor_axes), layout.mesh["stage"]
  f = layout.size(program.embed_axes)
  fe = layout.size(program.expert_embed_axes) * layout.size(program.expert_axes)
  dense_layers = shape.num_layers - shape.moe_layers
  dense = (shape.num_layers * shape.attention_params + dense_layers * shape.dense_mlp_params) / (t * f * p)
  experts = shape.moe_layers * shape.expert_params / (t * fe * p)
  embeddings = shape.vocab_size * shape.d_model * (1 if shape.tie_embeddings else 2) / (t * f)
  return dense + experts + embeddings


def work(shape: ModelShape, layout: Layout, program: Program) -> Work:
  m = layout.mesh
  t, c, p, v = layout.size(program.tensor_axes), m["context"], m["stage"], layout.virtual_stages
  if layout.seq_len % c:
    raise ValueError(f"seq_len {layout.seq_len} is not divisible by context={c}")
  b = rows_per_microbatch(layout, program)
  T = b * layout.seq_len // c
  D, H, K, Dh, F, V = (shape.d_model, shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.mlp_dim,
                       shape.vocab_size)
  a, L = program.activation_bytes, layout.seq_len
  nl = -(-shape.num_layers // (p * v)) * v  # the fullest stage sets the pace
  nmoe = shape.moe_layers / shape.num_layers * nl
  ndense = nl - nmoe
  flash = program.attention == "flash"
  remat = layout.remat

  # --- FLOPs per layer, forward --------------------------------------------------------------------------------
  proj = 2.0 * T * shape.attention_params / t
  keys = L / 2 if flash else L  # a flash kernel skips the masked half; a materialised one multiplies it
  attn = 4.0 * T * keys * H * Dh / t
  mlp = 2.0 * T * shape.dense_mlp_params / t
  mlp_last = 2.0 * T * F * D / t  # the down projection
  cf = shape.capacity_factor if shape.capacity_factor > 0 else 1.0
  routed = cf * shape.experts_per_token * T  # expert rows one device sends out (capacity slots)
  Fe = shape.expert_mlp_dim or F
  experts = 2.0 * routed * 3 * D * Fe / t + 2.0 * T * D * shape.num_experts
  attn_bwd = 2.5 if flash else 2.0  # flash attention's backward recomputes the scores: 5 matmuls against 2

  recompute_layer = remat == "full"
  # The expert matmuls are batched over the experts: dots_no_batch does not save them either, so the dispatch,
  # the expert FFN and the combine are recomputed (as with full remat) when the layer has experts.
  recompute_experts = remat in ("full", "dots_no_batch")
  recompute_attention = remat == "full" or (remat in ("dots", "dots_no_batch") and flash) or (
      remat == "dots_no_batch" and not flash)  # a fused kernel is no dot; the scores' dots have batch dims
  skip_last = recompute_layer and program.remat_skips_layer_output
  matmul = {"fwd": nl * proj + ndense * mlp + nmoe * experts,
            "bwd": 2 * (nl * proj + ndense * mlp + nmoe * experts)}
  if recompute_layer:
    matmul["bwd"] += nl * proj + ndense * (mlp - (mlp_last if skip_last else 0))
  if recompute_experts:
    matmul["bwd"] += nmoe * experts
  head = 2.0 * T * D * V / t
  matmul["fwd"] += head
  matmul["bwd"] += 2 * head
  attention = {"fwd": nl * attn, "bwd": nl * attn * (attn_bwd + (1 if recompute_attention else 0))}

  # --- memory-bound bytes per layer, forward ---------------------------------------------------------------------
  # Each sublayer's residual add fuses with the next norm (read x and h, write x and its norm: 4 a D); a sandwich
  # post-norm adds a read and a write. D-sized work is replicated over tensor unless sequence-parallel.
  resid_T = T / t if program.sequence_parallel else T
  per_layer = (2 * shape.norms_per_layer + 4) * a * D * resid_T
  if shape.rotary:
    per_layer += 2 * a * (H + K) * Dh * T / t
  if program.dropout:
    per_layer += 2 * (2 * a + 1) * D * resid_T
  act = (3 if shape.mlp_matrices == 3 else 2) * a
  dense_mem = act * F * T / t
  moe_mem = act * Fe * routed / t + 4 * a * routed * D  # activation + dispatch/combine buffer copies
  scores = 0.0
  if not flash:  # write S, softmax read + write, read P for P.V (+ dropout: mask + read + write)
    scores = T * L * H / t * (4 * a + ((2 * a + 1) if program.dropout else 0))
  fwd_mem = nl * (per_layer + scores) + ndense * dense_mem + nmoe * moe_mem
  memory = {"fwd": fwd_mem, "bwd": 2 * fwd_mem}
  if recompute_layer:
    memory["bwd"] += fwd_mem
  else:
    memory["bwd"] += (nl * scores if recompute_attention else 0) + (nmoe * moe_mem if recompute_experts else 0)
  logits = T * V / t * (a + 20)  # write the logits; fp32 softmax, loss and its gradient
  memory["fwd"] += logits * 0.6 + 3 * a * T * D
  memory["bwd"] += logits * 0.4
  shard = param_shard_elements(shape, layout, program)
  if layout.microbatches > 1:
    memory["bwd"] += program.grad_accumulation_bytes * shard
  opt_shard = shard / (m["data"] if program.optimizer_over_data else 1)

  comms = _comms(shape, layout, program, T=T, nl=nl, nmoe=nmoe, routed=routed, recompute_layer=recompute_layer,
                 recompute_dispatch=remat != "none", skip_last=skip_last)
  return Work(matmul=matmul, attention=attention, memory=memory, comms=comms,
              step_memory=program.optimizer_bytes * opt_shard, layers_per_stage=nl, moe_layers_per_stage=nmoe,
              rows=b, tokens=T)


def _comms(shape: ModelShape, layout: Layout, program: Program, *, T: float, nl: int, nmoe: float, routed: float,
           recompute_layer: bool, recompute_dispatch: bool, skip_last: bool) -> list[Comm]:
  m = layout.mesh
  t, p, v = layout.size(program.tensor_axes), m["stage"], layout.virtual_stages
  D, a = shape.d_model, program.activation_bytes
  ndense = nl - nmoe
  out: list[Comm] = []

  def add(name, cls, kind, axes, nbytes, count, phase):
    axes = tuple(x for x in axes if m.get(x, 1) > 1)
    if axes and nbytes > 0 and count > 0:
      out.append(Comm(name, cls, kind, axes, nbytes, count, phase))

  # FSDP gathers of the weights each layer uses (its tensor shard), and the gradient reductions.
  dense_w = (shape.attention_params + shape.dense_mlp_params) / t
  moe_w = (shape.attention_params + shape.d_model * shape.num_experts) / t
  expert_w = shape.expert_params / (t * layout.size(program.expert_axes))
  embed_w = shape.vocab_size * D / t * (1 if shape.tie_embeddings else 2)
  gathered = [("dense layer weights", program.embed_axes, dense_w, ndense),
              ("MoE layer attention + router weights", program.embed_axes, moe_w, nmoe),
              ("expert weights", program.expert_embed_axes, expert_w, nmoe)]
  g = program.weight_gathers_per_microbatch
  for name, axes, elements, layers in gathered:
    nbytes = elements * program.gather_bytes
    if g >= 1:
      add(f"all-gather {name}", "fsdp", "all-gather", axes, nbytes, layers, "fwd")
    if g == 2:
      add(f"all-gather {name} (backward)", "fsdp", "all-gather", axes, nbytes, layers, "bwd")
    if g == 0:
      add(f"all-gather {name} (once per step)", "fsdp", "all-gather", axes, nbytes, layers, "step")
  # Embedding table and LM head: gathered once per step (XLA hoists them out of the microbatch loop); the head
  # again for the backward.
  table = shape.vocab_size * D / t * program.gather_bytes
  add("all-gather embedding table / LM head", "fsdp", "all-gather", program.embed_axes, table,
      2 if shape.tie_embeddings else 3, "step")

  # Gradients are partial sums over the token axes: reduce-scatter over those that shard the weight, all-reduce
  # over the rest (of the scattered shard).
  token_axes = program.token_axes
  expert_partial = tuple(x for x in token_axes if x not in program.expert_axes)
  grads = [("dense layer", program.embed_axes, token_axes, dense_w, ndense),
           ("MoE layer attention + router", program.embed_axes, token_axes, moe_w, nmoe),
           ("experts", program.expert_embed_axes, expert_partial, expert_w, nmoe),
           ("embeddings / LM head", program.embed_axes, token_axes, embed_w, 1.0)]
  phase = "step" if program.grad_reduce == "per_step" else "bwd"
  for name, weight_axes, partial_axes, elements, count in grads:
    rs_axes = tuple(x for x in partial_axes if x in weight_axes)
    ar_axes = tuple(x for x in partial_axes if x not in weight_axes)
    nbytes = elements * program.grad_bytes
    add(f"reduce-scatter {name} grads", "grad", "reduce-scatter", rs_axes, nbytes, count, phase)
    add(f"all-reduce {name} grads", "grad", "all-reduce", ar_axes, nbytes / layout.size(rs_axes), count, phase)

  # Tensor parallelism: activations [T, D] reduced after row-parallel matmuls (RS + AG with sequence parallel).
  tp = program.tensor_axes
  act = T * D * a
  expert_act = routed * D * a
  add("all-reduce attention output", "tp", "all-reduce", tp, act, nl, "fwd")
  add("all-reduce MLP output", "tp", "all-reduce", tp, act, ndense, "fwd")
  add("all-reduce expert output", "tp", "all-reduce", tp, expert_act, nmoe, "fwd")
  add("all-reduce attention input grad", "tp", "all-reduce", tp, act, nl, "bwd")
  add("all-reduce MLP input grad", "tp", "all-reduce", tp, act, ndense, "bwd")
  add("all-reduce expert input grad", "tp", "all-reduce", tp, expert_act, nmoe, "bwd")
  # Any remat policy recomputes the all-to-alls and the expert output's all-reduce (no dots: never saved).
  if recompute_dispatch:
    add("all-reduce expert output (recompute)", "tp", "all-reduce", tp, expert_act, nmoe, "bwd")
  if recompute_layer:
    add("all-reduce attention output (recompute)", "tp", "all-reduce", tp, act, nl, "bwd")
    if not skip_last:
      add("all-reduce MLP output (recompute)", "tp", "all-reduce", tp, act, ndense, "bwd")
  add("all-reduce embedding lookup / LM head input grad", "tp", "all-reduce", tp, act, 2 if p == 1 else 1, "fwd")

  # Expert parallelism: dispatch and combine all-to-alls of the capacity buffers.
  ea = program.expert_axes
  add("all-to-all expert dispatch + combine", "a2a", "all-to-all", ea, expert_act, 2 * nmoe, "fwd")
  add("all-to-all expert dispatch + combine (backward)", "a2a", "all-to-all", ea, expert_act,
      2 * nmoe * (2 if recompute_dispatch else 1), "bwd")

  # Pipeline: activations forward and their gradients backward, once per chunk boundary.
  sent = act / (t if program.pp_scatter_gather else 1)
  add("pipeline send activations", "pp", "point-to-point", ("stage",), sent, v, "fwd")
  add("pipeline send gradients", "pp", "point-to-point", ("stage",), sent, v, "bwd")

  # Context parallelism: every layer's K and V pass around the ring (an all-gather's bytes); the backward passes
  # them again and reduce-scatters dK, dV.
  c = m["context"]
  kv = c * T * 2 * shape.num_kv_heads * shape.head_dim / t * a
  add("all-gather K, V (ring attention)", "cp", "all-gather", ("context",), kv, nl, "fwd")
  add("all-gather K, V + reduce-scatter dK, dV", "cp", "all-gather", ("context",), kv,
      nl * (3 if recompute_layer else 2), "bwd")
  return out
