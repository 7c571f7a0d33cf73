"""Model hyper-parameters as a frozen (hashable) dataclass, built from `config.model`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

REMAT_POLICIES = ("none", "dots", "dots_no_batch", "full")
ATTENTION_IMPLS = ("xla", "cudnn", "reference")
NORM_STYLES = ("pre", "sandwich")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 1024
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 8
  num_kv_heads: int = 4
  head_dim: int = 16
  mlp_dim: int = 256
  rope_theta: float = 10_000.0
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
  attention_impl: str = "xla"

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"config.model.remat_policy={self.remat_policy!r}: expected one of {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"config.model.attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS}")
    if self.norm_style not in NORM_STYLES:
      raise ValueError(f"config.model.norm_style={self.norm_style!r}: expected one of {NORM_STYLES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"config.model.num_heads={self.num_heads} is not a multiple of "
                       f"config.model.num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"config.model.head_dim={self.head_dim}: RoPE needs an even head dimension")
    if self.attention_impl == "cudnn" and self.attn_logit_softcap:
      raise ValueError("config.model.attention_impl='cudnn' cannot apply attn_logit_softcap; use 'xla' or 'reference'")

  @classmethod
  def from_config(cls, model_config: Mapping[str, Any]) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(model_config)
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"config.model has unknown keys {unknown}; known keys are {sorted(fields)}")
    return cls(**values)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)
