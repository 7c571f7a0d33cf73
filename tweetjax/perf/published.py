"""Published training-throughput measurements, and the step-time model's prediction of each.

Each run is described as its paper describes it (model shape, GPUs, layout, sequence length, batch, framework
behaviour) and predicted with the same hardware profiles and stated constants as every tweetjax layout; nothing is
tuned per row. Throughput (tokens/s per GPU) is the common currency: papers count FLOPs differently (Megatron-LM:
dense attention and the LM head, 72 B s l h^2 (1 + s/6h + V/12lh); MosaicML: 6 x all params incl. embeddings + dense
attention), so each published figure is converted with its own convention.

Sources:
  [K22] Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (arXiv 2205.05198):
        GPT-3-style models on Selene (DGX A100 80GB, 8 x 200 Gb/s HDR per node), data-parallel size 1, sequence
        length 2048, vocab 51200; iteration times with full recompute and with sequence parallelism + selective
        recompute (MFU 41.5 / 51.4 / 56.0 / 56.3%, also in the Megatron-LM README).
  [MPT] MosaicML llm-foundry, scripts/train/benchmarking/README.md: MPT models with PyTorch FSDP (FULL_SHARD),
        throughput in tokens/s per GPU; A100 80GB nodes with 1600 Gb/s RoCE (200 Gb/s per GPU); H100 80GB.
  [L3]  Dubey et al. 2024, "The Llama 3 Herd of Models" (arXiv 2407.21783), Table 4: Llama 3 405B on H100 (8 GPUs
        per node, 400 Gb/s per GPU) with TP 8, PP 16 and FSDP data parallelism, 16M-token batches.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from tweetjax.perf import hardware as hardware_lib
from tweetjax.perf import step_time
from tweetjax.perf.workload import Layout, ModelShape, Program

TOLERANCE = 0.20  # the model must land within 20% of each published throughput


def megatron_flops_per_token(shape: ModelShape, seq_len: int) -> float:
  """Megatron-LM's model FLOPs per token: 72 l h^2 (1 + s / 6h + V / 12 l h) (dense attention, LM head)."""
  l, h, V = shape.num_layers, shape.d_model, shape.vocab_size
  return 72 * l * h * h * (1 + seq_len / (6 * h) + V / (12 * l * h))


def mosaic_flops_per_token(shape: ModelShape, seq_len: int) -> float:
  """llm-foundry's MFU count: 6 x n_params (incl. embeddings) + 12 l d s (dense attention)."""
  return 6 * shape.num_params + 12 * shape.num_layers * shape.d_model * seq_len


def tweetjax_flops_per_token(shape: ModelShape, seq_len: int) -> float:
  return shape.train_flops_per_token(seq_len)


@dataclasses.dataclass(frozen=True)
class PublishedRun:
  name: str
  source: str
  hardware: str
  shape: ModelShape
  layout: Layout
  program: Program
  tokens_per_s_per_gpu: float  # measured (derived from the published iteration time where that is given)
  published: str  # the figure as published
  flops_convention: Callable[[ModelShape, int], float]
  assumptions: str = ""
  hardware_overrides: str = ""

  def predict(self) -> step_time.Prediction:
    hw = hardware_lib.get_profile(self.hardware, self.hardware_overrides)
    return step_time.predict(self.shape, self.layout, self.program, hw)


def _gpt(layers: int, d: int, heads: int, vocab: int = 51200) -> ModelShape:
  return ModelShape(num_layers=layers, d_model=d, num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
                    mlp_dim=4 * d, vocab_size=vocab, mlp_matrices=2, rotary=False)


def _mpt(layers: int, d: int, heads: int) -> ModelShape:
  return dataclasses.replace(_gpt(layers, d, heads, vocab=50368), tie_embeddings=True)


def _tokens(batch: int, seq: int, step_s: float, gpus: int) -> float:
  return batch * seq / step_s / gpus


# Megatron-LM (2022): tensor + pipeline parallel, no FSDP, data-parallel size 1, non-fused (materialised) attention
# with dropout, gradients reduced once per step, eager PyTorch recompute (the whole layer is recomputed).
_MEGATRON = Program(attention="materialized", pipeline_in_flight="1f1b", weight_gathers_per_microbatch=0,
                    grad_reduce="per_step",
                    remat_skips_layer_output=False, pp_scatter_gather=True, dropout=True,
                    grad_accumulation_bytes=0.0, optimizer_bytes=34.0, embed_axes=(), expert_embed_axes=(),
                    batch_axes=("data",))
_K22 = "[K22] Tables 3-5"
_K22_RUNS = (  # name, layers, hidden, heads, TP, PP, GPUs, batch, s/iter full recompute, s/iter SP + selective
    ("22B", 48, 6144, 64, 8, 1, 8, 4, 1.42, 1.10),
    ("175B", 96, 12288, 96, 8, 8, 64, 64, 18.13, 13.75),
    ("530B", 105, 20480, 128, 8, 35, 280, 280, 49.05, 37.83),
    ("1T", 128, 25600, 160, 8, 64, 512, 512, 94.42, 71.49),
)


def _korthikanti() -> list[PublishedRun]:
  runs = []
  for name, layers, d, heads, tp, pp, gpus, batch, full_s, selective_s in _K22_RUNS:
    shape = _gpt(layers, d, heads)
    for remat, sp, step_s in (("full", False, full_s), ("dots_no_batch", True, selective_s)):
      layout = Layout({"stage": pp, "tensor": tp}, global_batch=batch, seq_len=2048,
                      microbatches=batch if pp > 1 else 1, remat=remat)
      label = "full recompute" if remat == "full" else "seq. parallel + selective recompute"
      tokens = _tokens(batch, 2048, step_s, gpus)
      mfu = megatron_flops_per_token(shape, 2048) * tokens / 312e12
      runs.append(PublishedRun(
          name=f"GPT {name}, {label}", source=_K22, hardware="a100", shape=shape, layout=layout,
          program=dataclasses.replace(_MEGATRON, sequence_parallel=sp),
          tokens_per_s_per_gpu=tokens, published=f"{step_s} s/iter (MFU {100 * mfu:.1f}%)",
          flops_convention=megatron_flops_per_token,
          assumptions="microbatch 1 with PP (4 with PP 1); plain 1F1B schedule (no interleaving)"))
  return runs


# PyTorch FSDP FULL_SHARD through Composer: weights gathered for the forward and again for the backward of every
# microbatch, gradients reduce-scattered per microbatch (fp32 with mixed_precision DEFAULT, bf16 with PURE),
# whole-block activation checkpointing, Triton flash attention (ALiBi: no rotary), decoupled AdamW.
_FSDP = Program(remat_skips_layer_output=False, embed_axes=("fsdp",), batch_axes=("fsdp",), expert_embed_axes=())
_MPT = "[MPT] llm-foundry benchmark tables"
_MPT_RUNS = (  # name, layers, d, heads, gpu, GPUs, seq, microbatch, grad accum, ckpt, mixed precision, tokens/s/GPU
    ("MPT-70B", 80, 8192, 64, "a100", 64, 2048, 8, 4, True, "PURE", 410, "53.33"),
    ("MPT-70B", 80, 8192, 64, "h100", 64, 2048, 8, 4, True, "DEFAULT", 1039, "42.57"),
    ("MPT-30B", 48, 7168, 56, "h100", 32, 2048, 14, 3, True, "DEFAULT", 2308, "43.92"),
    ("MPT-13B", 40, 5120, 40, "h100", 64, 2048, 2, 1, False, "DEFAULT", 4800, "39.86"),
    ("MPT-7B", 32, 4096, 32, "h100", 8, 2048, 6, 1, False, "DEFAULT", 10643, "46.44"),
)


def _mosaic() -> list[PublishedRun]:
  runs = []
  for name, layers, d, heads, gpu, gpus, seq, mb, accum, ckpt, precision, tokens, mfu in _MPT_RUNS:
    layout = Layout({"fsdp": gpus}, global_batch=mb * accum * gpus, seq_len=seq, microbatches=accum,
                    remat="full" if ckpt else "none")
    program = dataclasses.replace(_FSDP, grad_bytes=2.0 if precision == "PURE" else 4.0)
    runs.append(PublishedRun(
        name=f"{name} on {gpus} {gpu.upper()}, microbatch {mb} x {accum}{', act. ckpt' if ckpt else ''}",
        source=_MPT, hardware=gpu, shape=_mpt(layers, d, heads), layout=layout, program=program,
        tokens_per_s_per_gpu=tokens, published=f"{tokens} tokens/s/GPU (MFU {mfu}%)",
        flops_convention=mosaic_flops_per_token,
        assumptions="H100 nodes with 8 x 400 Gb/s (the profile's NIC)" if gpu == "h100" else "",
        hardware_overrides=""))
  return runs


# Llama 3 405B: Megatron-style TP 8 (sequence parallel) inside a node, PP 16, FSDP over data that keeps the gathered
# weights for the whole step (gathered once, gradients reduce-scattered once per step).
_LLAMA3_SHAPE = ModelShape(num_layers=126, d_model=16384, num_heads=128, num_kv_heads=8, head_dim=128,
                           mlp_dim=53248, vocab_size=128256)
_LLAMA3 = Program(sequence_parallel=True, pipeline_in_flight="1f1b", weight_gathers_per_microbatch=0,
                  grad_reduce="per_step",
                  remat_skips_layer_output=False, pp_scatter_gather=True, grad_accumulation_bytes=0.0,
                  embed_axes=("data",), batch_axes=("data",), expert_embed_axes=())


def _llama3() -> list[PublishedRun]:
  runs = []
  for gpus, dp, per_dp, tflops, mfu in ((8192, 64, 32, 430, 43), (16384, 128, 16, 400, 41)):
    layout = Layout({"data": dp, "stage": 16, "tensor": 8}, global_batch=dp * per_dp, seq_len=8192,
                    microbatches=per_dp, remat="none", virtual_stages=8)
    tokens = tflops * 1e12 / tweetjax_flops_per_token(_LLAMA3_SHAPE, 8192)
    runs.append(PublishedRun(
        name=f"Llama 3 405B on {gpus} H100, TP 8 PP 16 DP {dp}", source="[L3] Table 4", hardware="h100",
        shape=_LLAMA3_SHAPE, layout=layout, program=_LLAMA3, tokens_per_s_per_gpu=tokens,
        published=f"{tflops} TFLOP/s/GPU (BF16 MFU {mfu}%)", flops_convention=tweetjax_flops_per_token,
        assumptions="microbatch 1, 8 virtual stages (~1 layer per chunk), no activation recompute; FLOPs counted "
                    "as 6N + causal attention (a dense-attention count would be 4% higher)"))
  return runs


def published_runs() -> list[PublishedRun]:
  return _korthikanti() + _mosaic() + _llama3()


@dataclasses.dataclass(frozen=True)
class Check:
  run: PublishedRun
  prediction: step_time.Prediction

  @property
  def predicted_tokens_per_s_per_gpu(self) -> float:
    return self.prediction.tokens_per_s / self.run.layout.devices

  @property
  def ratio(self) -> float:
    return self.predicted_tokens_per_s_per_gpu / self.run.tokens_per_s_per_gpu

  @property
  def within_tolerance(self) -> bool:
    return abs(self.ratio - 1) <= TOLERANCE

  def predicted_figure(self) -> str:
    hw = self.prediction.hardware
    flops = self.run.flops_convention(self.run.shape, self.run.layout.seq_len) * self.predicted_tokens_per_s_per_gpu
    return f"{self.predicted_tokens_per_s_per_gpu:.0f} tokens/s/GPU ({flops / 1e12:.0f} TFLOP/s, MFU " \
           f"{100 * flops / hw.bf16_flops:.1f}%)"


def check_all() -> list[Check]:
  return [Check(run, run.predict()) for run in published_runs()]


def format_markdown(checks: list[Check]) -> str:
  lines = ["| run | GPUs | layout | seq x batch | published | measured tokens/s/GPU | predicted | pred./meas. | "
           "source |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for c in checks:
    lay = c.run.layout
    mesh = ", ".join(f"{k} {v}" for k, v in lay.mesh.items() if v > 1)
    lines.append(f"| {c.run.name} | {lay.devices} x {c.run.hardware.upper()} | {mesh}; {lay.microbatches} "
                 f"microbatch(es), remat {lay.remat} | {lay.seq_len} x {lay.global_batch} | {c.run.published} | "
                 f"{c.run.tokens_per_s_per_gpu:.0f} | {c.predicted_figure()} | {c.ratio:.2f} | {c.run.source} |")
  return "\n".join(lines)


if __name__ == "__main__":  # python -m tweetjax.perf.published: the table of benchmarks/RESULTS.md
  print(format_markdown(check_all()))
