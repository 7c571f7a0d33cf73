"""What the compiled train step asks of the hardware: bf16 matmuls in bf16 mode, no all-gather of full logits."""

import jax
import pytest

from tests.helpers import load_config
from tweetjax.parallel.rules import mesh_context
from tweetjax.perf import hlo
from tweetjax.perf.dryrun import abstract_batch
from tweetjax.train.experiment import build_experiment


def _lowered(config):
  experiment = build_experiment(config)
  batch = abstract_batch(experiment.mesh, config.data.global_batch_size, config.data.seq_len)
  with mesh_context(experiment.mesh, experiment.rules):
    return experiment, experiment.train_step().jitted.lower(experiment.layout.abstract_state, batch)


def test_bf16_step_has_no_fp32_matmuls_outside_attention_probabilities():
  """The program as written (before XLA:CPU rewrites bf16 dots into fp32 ones, which a GPU does not): every
  projection, MLP and LM-head matmul, forward and backward, takes bf16 operands. The only fp32 operands are the
  attention probabilities' gradient ([.., L, L], jax's 'xla' attention keeps the logits in fp32)."""
  config = load_config("tiny")
  config.model.dtype = "bfloat16"
  _, lowered = _lowered(config)
  module = hlo.parse_module(lowered.as_text(dialect="hlo"))
  dots = hlo.dots(module)
  L = config.data.seq_len
  assert len(dots) >= 20  # forward and backward of q, k, v, o, gate, up, down, LM head, attention
  fp32 = [d for d in dots if any(o.dtype == "f32" for o in d.operands)]
  assert all(o.dtype in ("bf16", "f32") for d in dots for o in d.operands)
  assert all(any(o.dtype == "f32" and o.dims.count(L) == 2 for o in d.operands) for d in fp32), \
      [([str(o) for o in d.operands], str(d.result)) for d in fp32]  # an fp32 [.., L, .., L] operand: probabilities
  assert len(fp32) <= 2


def test_tensor_parallel_step_never_gathers_full_logits():
  """fsdp=2, tensor=4 on the 8 fake devices: the cross-entropy is vocab-parallel, so no all-gather in the compiled
  program yields a [rows, L, V] logits array (nor any array that large)."""
  config = load_config("tiny")
  config.mesh.update(data=1, fsdp=2, tensor=4)
  _, lowered = _lowered(config)
  module = hlo.parse_module(lowered.compile().as_text())
  rows, L, V = config.data.global_batch_size // 2, config.data.seq_len, config.model.vocab_size
  gathers = [(instr, times) for instr, times in module.instructions(("all-gather", "all-gather-start"))]
  assert gathers  # the FSDP weight gathers: the check does see all-gathers
  for instr, _ in gathers:
    for shape in instr.shapes:
      assert not (V in shape.dims and L in shape.dims), f"all-gather of logits: {instr.name} {shape}"
      assert shape.size < rows * L * V, f"all-gather as large as the logits: {instr.name} {shape}"
  stats = hlo.collective_stats(module)
  assert stats["all-reduce"].ops > 0  # the row-parallel projections' partial sums are there


def test_gpu_benchmark_model_lowers_with_bf16_matmuls():
  """experiments/llama_1b.py as `tools/bench.py --gpu` runs it (bf16, FSDP over all devices), lowered on the CPU with
  attention_impl=xla (cuDNN needs a GPU): the GPU path traces, and its matmuls are bf16 like tiny's."""
  config = load_config("llama_1b")
  config.model.update(dtype="bfloat16", attention_impl="xla")
  config.data.update(global_batch_size=8, seq_len=256)
  _, lowered = _lowered(config)
  dots = hlo.dots(hlo.parse_module(lowered.as_text(dialect="hlo")))
  assert len([d for d in dots if any(o.dtype == "f32" for o in d.operands)]) <= 2
  assert any(128_256 in d.result.dims for d in dots)  # the tied LM head
