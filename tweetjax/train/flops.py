"""Model FLOPs per token, accelerator peak FLOP/s and model FLOPs utilisation (MFU).

Counting (per token, one multiply-add = 2 FLOPs; training = forward + backward = 3 x forward):
  matmuls      2 * N forward, N = params that take part in matmuls: q, k, v, o, MLP (only the active experts'
               share of a MoE layer, plus its router), the LM head (the embedding matrix when tied). The embedding
               lookup is a gather, not a matmul, and norm scales are elementwise: neither is in N.
  attention    per layer, a query against S keys costs 2 * S * Dh per head for the scores q.k and as much for the
               weighted sum of values: 4 * S * H * Dh. Full attention has S = L for every query; causal attention
               needs on average S = (L + 1) / 2, counted here as L / 2.
With LoRA the adapters' matmuls (x A, then B) are in N, and the frozen weights (every other matmul param) need no
weight gradient: their backward costs 2 instead of 4 FLOPs per param and token (`frozen_matmul_params`).
MFU uses the causal count (the FLOPs the model needs, not those a dense masked kernel burns); the dense count is
in the breakdown for comparison with compiler FLOP counts. Elementwise work (norms, softmax, RoPE, the optimizer)
is left out, as is usual.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tweetjax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
  """Per-token FLOPs of one model at one sequence length (see the module docstring)."""
  seq_len: int
  matmul_params: int  # N: params taking part in matmuls, active ones only (includes the LM head)
  lm_head_params: int
  embedding_params: int  # gathered, not multiplied: not in N
  forward_matmul: float  # 2 N
  forward_attention: float  # causal: 2 L H Dh per layer
  forward_attention_dense: float  # full L x L scores: 4 L H Dh per layer
  frozen_matmul_params: int = 0  # of N, those without a weight gradient (LoRA's base weights)

  @property
  def forward(self) -> float:
    return self.forward_matmul + self.forward_attention

  @property
  def train(self) -> float:
    """Forward + backward (the backward costs twice the forward): 6 N + 6 L H Dh num_layers, less the 2 N_frozen
    weight-gradient FLOPs frozen params do not need."""
    return 3.0 * self.forward - 2.0 * self.frozen_matmul_params

  @property
  def train_dense_attention(self) -> float:
    return 3.0 * (self.forward_matmul + self.forward_attention_dense) - 2.0 * self.frozen_matmul_params

  def as_dict(self) -> dict[str, float]:
    d = dataclasses.asdict(self)
    d.update(forward=self.forward, train=self.train, train_dense_attention=self.train_dense_attention)
    return d


def flops_per_token(model_config: ModelConfig, seq_len: int) -> FlopsPerToken:
  c = model_config
  D, H, K, Dh, F, V = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim, c.vocab_size
  attention_params = D * H * Dh + 2 * D * K * Dh + H * Dh * D
  dense_mlp_params = 3 * D * F
  per_layer = []
  for layer in range(c.num_layers):
    if c.is_moe_layer(layer):  # only the experts_per_token active experts count, plus the router
      mlp = c.experts_per_token * 3 * D * c.moe_mlp_dim + D * c.num_experts
    else:
      mlp = dense_mlp_params
    per_layer.append(attention_params + mlp)
  lm_head = D * V
  matmul_params = sum(per_layer) + lm_head
  frozen = 0
  if c.lora.rank:  # adapters: in x r and r x out per adapted kernel; everything else is frozen
    sizes = {"query": (D, H * Dh), "key": (D, K * Dh), "value": (D, K * Dh), "out": (H * Dh, D), "gate": (D, F),
             "up": (D, F), "down": (F, D)}
    dense_layers = sum(not c.is_moe_layer(layer) for layer in range(c.num_layers))
    adapters = sum((i + o) * c.lora.rank * (c.num_layers if name in ("query", "key", "value", "out") else dense_layers)
                   for name, (i, o) in sizes.items() if c.lora.adapts(name))
    frozen, matmul_params = matmul_params, matmul_params + adapters
  L = int(seq_len)
  attention_dense = 4.0 * L * H * Dh * c.num_layers
  return FlopsPerToken(seq_len=L, matmul_params=matmul_params, lm_head_params=lm_head, embedding_params=V * D,
                       forward_matmul=2.0 * matmul_params, forward_attention=attention_dense / 2,
                       forward_attention_dense=attention_dense, frozen_matmul_params=frozen)


# --- peak FLOP/s ---------------------------------------------------------------------------------------------------

# Dense (no sparsity) peak per device: bf16 tensor cores and fp32 matmuls (TF32 on NVIDIA, as XLA uses by default).
# First matching substring of jax's device_kind wins, so more specific names come first.
PEAK_FLOPS = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494e12}),
    ("H200", {"bfloat16": 989e12, "float32": 494e12}),
    ("GH200", {"bfloat16": 989e12, "float32": 494e12}),
    ("B200", {"bfloat16": 2250e12, "float32": 1100e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("L40S", {"bfloat16": 362e12, "float32": 183e12}),
    ("A10G", {"bfloat16": 70e12, "float32": 35e12}),
    ("L4", {"bfloat16": 121e12, "float32": 60e12}),
    ("V100", {"bfloat16": 125e12, "float32": 15.7e12}),  # no bf16 tensor cores: fp16 figure
    ("TPU v6", {"bfloat16": 918e12, "float32": 918e12 / 4}),
    ("TPU v5p", {"bfloat16": 459e12, "float32": 459e12 / 4}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": 197e12 / 4}),
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12 / 4}),
)


def peak_flops_per_device(device: jax.Device | None = None, dtype: str = "bfloat16", cache_dir: str = "") -> float:
  """Peak FLOP/s of one device for matmuls in `dtype`; CPUs are measured (and the figure cached in cache_dir)."""
  device = device or jax.devices()[0]
  kind = device.device_kind
  for name, peaks in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return peaks["bfloat16" if dtype == "bfloat16" else "float32"]
  if device.platform == "cpu":
    return measured_cpu_flops(dtype, cache_dir)
  logging.warning("no peak FLOP/s known for device kind %r; MFU will not be reported "
                  "(set config.train.peak_flops_per_device)", kind)
  return 0.0


def measured_cpu_flops(dtype: str = "float32", cache_dir: str = "") -> float:
  """Best-of-a-few matmul throughput of one CPU device: the MFU denominator for CPU runs (an estimate).

  With fake multi-device CPU meshes all 'devices' share the same cores, so the per-device figure overstates what
  each can do at once; MFU on such meshes is only indicative. On a machine shared with other jobs the probe sees
  only what was free at that moment, and MFU can then exceed 1: delete the cached figure or set
  config.train.peak_flops_per_device.
  """
  key = f"{jax.devices()[0].device_kind}|{os.cpu_count()}|{dtype}|{jax.__version__}"
  path = os.path.join(cache_dir, "cpu_peak_flops.json") if cache_dir else ""
  cached = {}
  if path and os.path.exists(path):
    try:
      with open(path) as f:
        cached = json.load(f)
    except (OSError, ValueError):
      cached = {}
    if key in cached:
      return float(cached[key])
  # Big enough to reach the multi-threaded matmul's steady state; the best of a few runs discounts other load.
  n = 1536
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  flops = 2.0 * n**3 / best
  logging.info("measured CPU matmul throughput: %.1f GFLOP/s (%s, %dx%d)", flops / 1e9, dtype, n, n)
  if path:
    try:
      os.makedirs(cache_dir, exist_ok=True)
      cached[key] = flops
      tmp = f"{path}.{os.getpid()}.tmp"
      with open(tmp, "w") as f:
        json.dump(cached, f)
      os.replace(tmp, path)
    except OSError as e:
      logging.warning("could not cache the CPU peak in %s: %s", path, e)
  return flops


def mfu(flops_per_token_train: float, tokens_per_s: float, peak_per_device: float, num_devices: int) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the mesh's peak."""
  if peak_per_device <= 0 or num_devices <= 0:
    return float("nan")
  return flops_per_token_train * tokens_per_s / (peak_per_device * num_devices)


def compiled_flops(compiled: Any) -> float | None:
  """XLA's FLOP count of a compiled (or lowered) computation, per device; None if the backend gives none."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  (some backends do not implement it)
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(np.asarray(analysis["flops"]))
