"""Model hyper-parameters as a frozen (hashable) dataclass, built from `config.model`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

REMAT_POLICIES = ("none", "dots", "dots_no_batch", "full")
ATTENTION_IMPLS = ("xla", "cudnn", "reference", "blockwise")
NORM_STYLES = ("pre", "sandwich")
MOE_IMPLS = ("expert_parallel", "dense")
MATMUL_IMPLS = ("auto", "xla", "cpu_bf16")
CONTEXT_ATTENTION = ("ring", "all_gather")
ROPE_SCALINGS = ("none", "linear", "llama3")
# Projections LoRA can adapt (param names in Attention and MLP), and the group names config.lora.targets accepts.
LORA_TARGETS = ("query", "key", "value", "out", "gate", "up", "down")
LORA_GROUPS = {"attention": ("query", "key", "value", "out"), "mlp": ("gate", "up", "down"), "all": LORA_TARGETS}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters (tweetjax/model/lora.py), built from `config.lora`; rank 0 = no adapters."""
  rank: int = 0
  alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
  dropout: float = 0.0  # on the adapter's input, in training only (when the apply has a "dropout" rng)
  targets: tuple[str, ...] = LORA_GROUPS["all"]

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"config.lora.rank={self.rank}: expected 0 (off) or a positive rank")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"config.lora.dropout={self.dropout}: expected a probability in [0, 1)")
    unknown = sorted(set(self.targets) - set(LORA_TARGETS))
    if unknown or (self.rank and not self.targets):
      raise ValueError(f"config.lora.targets: unknown {unknown or 'empty'}; expected names among {list(LORA_TARGETS)} "
                       f"or groups {sorted(LORA_GROUPS)}")

  @classmethod
  def from_config(cls, lora: Mapping[str, Any] | None) -> "LoraConfig":
    if not lora:
      return cls()
    targets = lora.get("targets", "all")
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    expanded = [n for name in names for n in LORA_GROUPS.get(name, (name,))]
    return cls(rank=int(lora.get("rank", 0)), alpha=float(lora.get("alpha", 16.0)),
               dropout=float(lora.get("dropout", 0.0)), targets=tuple(dict.fromkeys(expanded)))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0

  def adapts(self, name: str) -> bool:
    return self.rank > 0 and name in self.targets


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 1024
  # Ids >= valid_vocab_size are vocab padding (e.g. an imported HF vocab rounded up for sharding): their logits are
  # masked, so losses, perplexity and samples are over the real vocab only. 0: every id is real.
  valid_vocab_size: int = 0
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 8
  num_kv_heads: int = 4
  head_dim: int = 16
  mlp_dim: int = 256
  rope_theta: float = 10_000.0
  # RoPE frequency scaling of long-context checkpoints (tweetjax/model/attention.py rope_inv_freq): "none";
  # "linear": every inverse frequency divided by rope_scaling_factor; "llama3" (Llama 3.1+): wavelengths longer
  # than rope_original_max_position / rope_low_freq_factor divided by the factor, shorter than
  # rope_original_max_position / rope_high_freq_factor kept, interpolated in between.
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3 only
  rope_high_freq_factor: float = 4.0  # llama3 only
  rope_original_max_position: int = 8192  # llama3 only: the context length the model was pre-trained with
  qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2); the output projection has none
  tie_embeddings: bool = False
  norm_style: str = "pre"  # "pre" | "sandwich" (grok-1: norms before and after each sublayer)
  norm_eps: float = 1e-5
  attn_logit_softcap: float = 0.0  # 0 disables; grok-1 uses 30
  final_logit_softcap: float = 0.0
  init_std: float = 0.02  # embedding init; kernels use fan-in scaling
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = True
  # Layers per iteration of the scanned layer loop (params stay stacked either way); 0 = auto: all of them (no
  # loop) for bf16 compute on a CPU, else 1. XLA:CPU converts a stacked bf16 buffer to fp32 and back whenever the loop
  # writes or reads one layer's slice, so looped bf16 residuals cost O(layers^2) traffic (benchmarks/RESULTS.md).
  scan_unroll: int = 0
  # How matmuls are written for the backend (tweetjax/model/matmul.py): "xla" as written; "cpu_bf16" every matmul
  # and its gradients as bf16 x bf16 -> fp32 row-major dots (XLA:CPU's AMX/AVX512-BF16 kernels); "auto" picks
  # cpu_bf16 for bf16 compute on a CPU with bf16 dot units, else xla.
  matmul_impl: str = "auto"
  # "blockwise" (tweetjax/model/blockwise.py: online softmax over key blocks, no [L, L] scores, the causal blocks
  # above the diagonal skipped; the fastest on CPU, and the GPU path where cuDNN cannot serve, e.g. a soft-cap) |
  # "cudnn" | "xla" (jax.nn.dot_product_attention) | "reference" (einsum). KV-cache decoding runs
  # attention.cached_attention, whatever this says.
  attention_impl: str = "blockwise"
  attention_block_size: int = 128  # query and key block length of attention_impl="blockwise" (GPUs: 512 or more)
  # Tokens per chunk of the tiled LM head + cross-entropy (tweetjax/parallel/losses.py), per device: the [tokens, V]
  # logits are never materialised, only [logits_chunk, V / tensor] at a time. 0: dense logits, then the loss.
  logits_chunk: int = 0
  # With the sequence split over `context`: "ring" (tweetjax/parallel/context.py: K/V blocks passed around the
  # context shards, online softmax) | "all_gather" (the attention above on K/V the partitioner gathers).
  context_attention: str = "ring"
  # Mixture of experts (tweetjax/model/moe.py). num_experts=0: every MLP is dense.
  num_experts: int = 0
  experts_per_token: int = 2  # top-k
  moe_every: int = 1  # layer i is MoE iff (i + 1) % moe_every == 0; scanned as groups of moe_every layers
  expert_mlp_dim: int = 0  # hidden size of each expert; 0 = mlp_dim
  capacity_factor: float = 1.25  # slots per expert = capacity_factor * tokens * k / E per device; <= 0: dropless
  router_aux_loss_weight: float = 0.01  # Switch/GShard load-balancing loss (1.0 at perfect balance)
  router_z_loss_weight: float = 0.001  # ST-MoE router z-loss
  moe_impl: str = "expert_parallel"  # "expert_parallel" (shard_map + all-to-all) | "dense" (reference, no drops)
  # Low-rank adapters: set from `config.lora` (not a config.model key) by `from_config(..., lora=config.lora)`.
  lora: LoraConfig = LoraConfig()

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"config.model.remat_policy={self.remat_policy!r}: expected one of {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"config.model.attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS}")
    if self.matmul_impl not in MATMUL_IMPLS:
      raise ValueError(f"config.model.matmul_impl={self.matmul_impl!r}: expected one of {MATMUL_IMPLS}")
    if self.scan_unroll < 0:
      raise ValueError(f"config.model.scan_unroll={self.scan_unroll}: expected 0 (auto) or a positive layer count")
    if self.context_attention not in CONTEXT_ATTENTION:
      raise ValueError(f"config.model.context_attention={self.context_attention!r}: expected one of "
                       f"{CONTEXT_ATTENTION}")
    if self.norm_style not in NORM_STYLES:
      raise ValueError(f"config.model.norm_style={self.norm_style!r}: expected one of {NORM_STYLES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"config.model.num_heads={self.num_heads} is not a multiple of "
                       f"config.model.num_kv_heads={self.num_kv_heads}")
    if not 0 <= self.valid_vocab_size <= self.vocab_size:
      raise ValueError(f"config.model.valid_vocab_size={self.valid_vocab_size}: expected 0 (no padding) up to "
                       f"config.model.vocab_size={self.vocab_size}")
    if self.attention_block_size < 1:
      raise ValueError(f"config.model.attention_block_size={self.attention_block_size}: expected a positive number "
                       "of tokens")
    if self.logits_chunk < 0:
      raise ValueError(f"config.model.logits_chunk={self.logits_chunk}: expected 0 (dense logits) or a positive "
                       "number of tokens per chunk")
    if self.head_dim % 2:
      raise ValueError(f"config.model.head_dim={self.head_dim}: RoPE needs an even head dimension")
    self._validate_rope_scaling()
    if self.attention_impl == "cudnn" and self.attn_logit_softcap:
      raise ValueError("config.model.attention_impl='cudnn' cannot apply attn_logit_softcap; use 'blockwise', 'xla' "
                       "or 'reference'")
    self._validate_moe()

  def _validate_rope_scaling(self):
    if self.rope_scaling not in ROPE_SCALINGS:
      raise ValueError(f"config.model.rope_scaling={self.rope_scaling!r}: expected one of {ROPE_SCALINGS}")
    if self.rope_scaling != "none" and not self.rope_scaling_factor > 0:
      raise ValueError(f"config.model.rope_scaling_factor={self.rope_scaling_factor}: expected > 0")
    if self.rope_scaling == "llama3":
      if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
        raise ValueError(f"config.model.rope_low_freq_factor={self.rope_low_freq_factor} and "
                         f"rope_high_freq_factor={self.rope_high_freq_factor}: expected 0 < low < high")
      if self.rope_original_max_position < 1:
        raise ValueError(f"config.model.rope_original_max_position={self.rope_original_max_position}: expected >= 1")

  def _validate_moe(self):
    if self.num_experts < 0:
      raise ValueError(f"config.model.num_experts={self.num_experts}: expected 0 (dense) or a positive count")
    if not self.num_experts:
      return
    if not 1 <= self.experts_per_token <= self.num_experts:
      raise ValueError(f"config.model.experts_per_token={self.experts_per_token}: expected 1..num_experts="
                       f"{self.num_experts}")
    if self.moe_every < 1 or self.num_layers % self.moe_every:
      raise ValueError(f"config.model.moe_every={self.moe_every}: expected a positive divisor of "
                       f"config.model.num_layers={self.num_layers} (layers are scanned in groups of moe_every)")
    if self.expert_mlp_dim < 0:
      raise ValueError(f"config.model.expert_mlp_dim={self.expert_mlp_dim}: expected > 0, or 0 for mlp_dim")
    if self.moe_impl not in MOE_IMPLS:
      raise ValueError(f"config.model.moe_impl={self.moe_impl!r}: expected one of {MOE_IMPLS}")
    for name in ("router_aux_loss_weight", "router_z_loss_weight"):
      if getattr(self, name) < 0:
        raise ValueError(f"config.model.{name}={getattr(self, name)}: expected >= 0")

  @property
  def moe_mlp_dim(self) -> int:
    return self.expert_mlp_dim or self.mlp_dim

  def is_moe_layer(self, layer: int) -> bool:
    return self.num_experts > 0 and (layer + 1) % self.moe_every == 0

  @classmethod
  def from_config(cls, model_config: Mapping[str, Any], lora: Mapping[str, Any] | None = None) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)} - {"lora"}
    values = dict(model_config)
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"config.model has unknown keys {unknown}; known keys are {sorted(fields)}")
    return cls(**values, lora=LoraConfig.from_config(lora))

  @classmethod
  def config_keys(cls) -> dict[str, Any]:
    """The `config.model` keys and their defaults (every field but `lora`, which comes from `config.lora`)."""
    return {k: v for k, v in dataclasses.asdict(cls()).items() if k != "lora"}

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)
