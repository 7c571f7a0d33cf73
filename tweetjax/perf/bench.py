"""Measurements behind tools/bench.py: matmul peak, train-step throughput and MFU, compile time, a PyTorch peer.

Every function measures in the current process and returns plain dicts (tools/bench.py runs each configuration in
its own subprocess, because fake device counts and XLA flags are fixed when JAX starts). Times are
`time.perf_counter` around `block_until_ready`, after warm-up; best and median are reported. On a shared machine
the median moves with other people's load: read the best.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from tweetjax.train import flops as flops_lib


def _stats(seconds: list[float]) -> dict[str, float]:
  return {"best_s": min(seconds), "median_s": statistics.median(seconds), "runs": len(seconds)}


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
  """Best/median seconds of `fn()` (JAX results are waited for; other values, e.g. torch's, are already done)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - start)
  return _stats(seconds)


def matmul_peak(dtype: str, n: int = 2048, repeats: int = 5, accumulate_f32: bool = False) -> dict[str, float]:
  """FLOP/s of one large square `jnp.dot` in `dtype` on device 0 (the MFU denominator on a CPU).

  accumulate_f32: `preferred_element_type=float32` (bf16 x bf16 -> fp32), the only bf16 dot XLA:CPU hands to its
  bf16 kernels (AMX / AVX512-BF16) instead of computing it in fp32 (tweetjax/model/matmul.py).
  """
  a = jax.device_put(jnp.ones((n, n), dtype) * 0.5, jax.devices()[0])
  b = jax.device_put(jnp.ones((n, n), dtype) * 0.25, jax.devices()[0])
  accumulate = jnp.float32 if accumulate_f32 else None
  dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=accumulate))
  return _matmul_rate(dtype, n, time_calls(lambda: dot(a, b), repeats))


def _matmul_rate(dtype: str, n: int, t: dict[str, float]) -> dict[str, float]:
  flops = 2.0 * n**3
  return {"dtype": dtype, "n": n, "best_flops": flops / t["best_s"], "median_flops": flops / t["median_s"], **t}


class StepRunner:
  """One config's jitted train step, its state and a few prepared batches; `step()` times one step."""

  def __init__(self, config: ml_collections.ConfigDict):
    from tweetjax.train.experiment import build_experiment  # pylint: disable=g-import-not-at-top
    from tweetjax.train.loop import make_train_iterator  # pylint: disable=g-import-not-at-top
    self.config = config
    self.experiment = experiment = build_experiment(config)
    self.state = experiment.init_state()
    self.step_fn = experiment.train_step()
    batches = make_train_iterator(config, experiment)
    self.batches = [next(batches) for _ in range(5)]  # host->device copies stay out of the timings
    self.steps_done = 0
    self.tokens = int(config.data.global_batch_size) * int(config.data.seq_len)
    self.flops_per_token = flops_lib.flops_per_token(experiment.model_config, int(config.data.seq_len)).train
    self.first_step_s = self.step()  # compiles

  def step(self) -> float:
    batch = self.batches[self.steps_done % len(self.batches)]
    start = time.perf_counter()
    self.state, self.metrics = self.step_fn(self.state, batch)
    jax.block_until_ready(self.metrics)
    self.steps_done += 1
    return time.perf_counter() - start

  def describe(self) -> dict[str, Any]:
    device = self.experiment.mesh.devices.flat[0]
    return {"platform": device.platform, "device_kind": device.device_kind, "devices": self.experiment.mesh.size,
            "mesh": dict(self.experiment.mesh.shape), "tokens_per_step": self.tokens,
            "flops_per_token": self.flops_per_token, "first_step_s": self.first_step_s,
            "loss": float(self.metrics["loss"])}


def train_step_rate(config: ml_collections.ConfigDict, steps: int = 5) -> dict[str, Any]:
  """Per-step time of the full jitted train step (forward, backward, optimizer) on synthetic batches."""
  runner = StepRunner(config)
  t = _stats([runner.step() for _ in range(steps)])
  tokens = runner.tokens
  return {**runner.describe(), "best_tokens_per_s": tokens / t["best_s"], "median_tokens_per_s": tokens / t["median_s"],
          "best_model_flops": runner.flops_per_token * tokens / t["best_s"], **t}


def train_step_profile(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """One traced train step after a warm-up: wall time per model part, matmul or not (tweetjax/perf/op_profile.py)."""
  from tweetjax.parallel.rules import mesh_context  # pylint: disable=g-import-not-at-top
  from tweetjax.perf import op_profile  # pylint: disable=g-import-not-at-top
  runner = StepRunner(config)  # compiled, one step done
  experiment, batch = runner.experiment, runner.batches[1]
  with mesh_context(experiment.mesh, experiment.rules):  # the same program the step runs, for its op names
    hlo_text = runner.step_fn.jitted.lower(runner.state, batch).compile().as_text()
  result = op_profile.profile_step(runner.step_fn, hlo_text, runner.state, batch)
  return {"tokens_per_step": runner.tokens, **result}


def compile_time(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Lower + compile of the train step from abstract inputs, noting whether the persistent cache served it."""
  from tweetjax.parallel.rules import mesh_context  # pylint: disable=g-import-not-at-top
  from tweetjax.perf.dryrun import abstract_batch  # pylint: disable=g-import-not-at-top
  from tweetjax.train.experiment import build_experiment  # pylint: disable=g-import-not-at-top
  from tweetjax.train.profiling import aot_compile  # pylint: disable=g-import-not-at-top
  experiment = build_experiment(config)
  batch = abstract_batch(experiment.mesh, int(config.data.global_batch_size), experiment.seq_len)
  with mesh_context(experiment.mesh, experiment.rules):
    _, info = aot_compile(experiment.train_step().jitted, experiment.layout.abstract_state, batch)
  return {"layers": int(config.model.num_layers), "seconds": info.seconds, "source": info.source,
          "cache_hits": info.cache_hits}


# --- the PyTorch peer: Hugging Face LlamaForCausalLM, eager, AdamW ----------------------------------------------


def torch_step_rate(config: ml_collections.ConfigDict, dtype: str, steps: int = 3) -> dict[str, Any]:
  """The same model shape, batch and loss in eager PyTorch: forward, backward, grad clipping, AdamW.

  bf16 is autocast with fp32 master weights and optimizer state, like our dtype=bfloat16 / param_dtype=float32.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  m = config.model
  llama = transformers.LlamaConfig(
      vocab_size=int(m.vocab_size), hidden_size=int(m.d_model), intermediate_size=int(m.mlp_dim),
      num_hidden_layers=int(m.num_layers), num_attention_heads=int(m.num_heads),
      num_key_value_heads=int(m.num_kv_heads), head_dim=int(m.head_dim), rms_norm_eps=float(m.norm_eps),
      rope_theta=float(m.rope_theta), tie_word_embeddings=bool(m.tie_embeddings),
      max_position_embeddings=int(config.data.seq_len), attn_implementation="sdpa")
  model = transformers.LlamaForCausalLM(llama)
  model.train()
  o = config.optimizer
  optimizer = torch.optim.AdamW(model.parameters(), lr=float(o.learning_rate), betas=(float(o.b1), float(o.b2)),
                                eps=float(o.eps), weight_decay=float(o.weight_decay))
  B, L = int(config.data.global_batch_size), int(config.data.seq_len)
  ids = torch.randint(3, int(m.vocab_size), (B, L))
  bf16 = dtype == "bfloat16"

  def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), float(o.grad_clip_norm) or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)

  t = time_calls(step, steps)  # after one warm-up step (allocations, oneDNN primitive creation)
  tokens = B * L
  return {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
          "tokens_per_step": tokens, "best_tokens_per_s": tokens / t["best_s"],
          "median_tokens_per_s": tokens / t["median_s"], **t}


def torch_matmul_peak(dtype: str, n: int = 2048, repeats: int = 5) -> dict[str, float]:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  a, b = torch.ones(n, n, dtype=tdtype), torch.ones(n, n, dtype=tdtype)
  return _matmul_rate(dtype, n, time_calls(lambda: torch.mm(a, b), repeats))
