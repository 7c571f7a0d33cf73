"""On one GPU: cuDNN and blockwise attention equal the reference path, a train step's loss equals the CPU's, and
the jitted step compiles once. Run by tools/gpu_check.sh; skipped (with the reason) where JAX sees no GPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import backend_compiles, load_config
from tweetjax.model import config as model_config
from tweetjax.model.transformer import Transformer
from tweetjax.train.experiment import build_experiment
from tweetjax.train.loop import make_train_iterator

# An attention-heavy shape cuDNN's flash kernel takes: head_dim 64, GQA 4/2, two packed documents and padding.
ATTN_CFG = model_config.ModelConfig(vocab_size=512, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2,
                                    head_dim=64, mlp_dim=512, dtype="bfloat16", attention_impl="reference")
B, L = 2, 256
BF16_RTOL = 3e-2  # relative L2 error of bf16 logits / grads against the same model's reference attention


def _batch():
  ids = jax.random.randint(jax.random.key(0), (B, L), 3, ATTN_CFG.vocab_size)
  segments = np.ones((B, L), np.int32)
  segments[0, 100:] = 2  # row 0: two documents, positions restart
  segments[1, 200:] = 0  # row 1: padding at the end
  positions = np.concatenate([np.arange(100), np.arange(L - 100)])[None].repeat(B, 0)
  positions[1] = np.arange(L)
  return ids, jnp.asarray(positions, jnp.int32), jnp.asarray(segments)


def _logits_and_grads(cfg, params, batch, device):
  model = Transformer(cfg)

  def loss(p):
    logits = model.apply({"params": p}, *batch).astype(jnp.float32)
    return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

  params, batch = jax.device_put((params, batch), device)
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return jax.device_get(logits), jax.device_get(grads)


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def reference(gpu):
  params = jax.jit(Transformer(ATTN_CFG).init)(jax.random.key(1), *_batch())["params"]
  return params, _logits_and_grads(ATTN_CFG, params, _batch(), gpu)


@pytest.mark.parametrize("impl", ["cudnn", "blockwise"])
def test_attention_impl_matches_reference_in_bf16(gpu, reference, impl):
  if impl not in model_config.ATTENTION_IMPLS:
    pytest.skip(f"attention_impl={impl!r} is not implemented in this tree ({model_config.ATTENTION_IMPLS})")
  params, (want_logits, want_grads) = reference
  logits, grads = _logits_and_grads(dataclasses.replace(ATTN_CFG, attention_impl=impl), params, _batch(), gpu)
  assert _rel_err(logits, want_logits) < BF16_RTOL
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
    assert _rel_err(g, w) < BF16_RTOL, jax.tree_util.keystr(path)


def _train(device: jax.Device, steps: int):
  """tiny (fp32) on one device: losses of `steps` train steps from the same seed and batches, plus the compile
  events per step and whether an implicit host<->device transfer happened inside a step."""
  config = load_config("tiny")
  config.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  experiment = build_experiment(config, devices=[device])
  state = experiment.init_state()
  step_fn = experiment.train_step()
  batches = make_train_iterator(config, experiment)
  prepared = [next(batches) for _ in range(steps)]
  losses, per_step = [], []
  with backend_compiles() as compiles:
    for i, batch in enumerate(prepared):
      before = len(compiles)
      if i == 0:
        state, metrics = step_fn(state, batch)
      else:
        with jax.transfer_guard("disallow"):
          state, metrics = step_fn(state, batch)
      losses.append(float(metrics["loss"]))
      per_step.append(len(compiles) - before)
  return losses, per_step, step_fn.jitted._cache_size()


@pytest.fixture(scope="module")
def gpu_run(gpu):
  return _train(gpu, steps=4)


def test_train_step_loss_on_gpu_equals_cpu(gpu_run):
  gpu_losses, _, _ = gpu_run
  cpu_losses, _, _ = _train(jax.devices("cpu")[0], steps=4)
  # fp32 with matmul precision "highest" (tests/conftest.py): no TF32; what differs is reduction order.
  np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-4)
  assert len(set(gpu_losses)) == len(gpu_losses)  # the params moved between steps


def test_train_step_compiles_once_on_gpu(gpu_run):
  _, per_step, cache_size = gpu_run
  assert per_step[0] >= 1
  assert per_step[1:] == [0] * (len(per_step) - 1)
  assert cache_size == 1
