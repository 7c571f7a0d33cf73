"""LoRA on tiny: at step 0 the adapted model computes its base exactly (B = 0); merged weights compute the adapted
model; training (with adapter dropout) moves only the adapters, whose Adam moments are the only optimizer state; a
(data=2, fsdp=2, tensor=2) mesh trains like one device; adapters shard by the rules table like their kernels."""

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import load_config
from tweetjax.data.token_stream import TokenStreamIterator
from tweetjax.model import lora
from tweetjax.model.config import LoraConfig, ModelConfig
from tweetjax.model.transformer import Transformer
from tweetjax.perf.memory import shard_bytes
from tweetjax.train.experiment import build_experiment
from tweetjax.train.state import state_from_params

STEPS = 3


def _perturbed(params, scale=0.05):
  """Random adapters (B != 0), as after some training; numpy copies of every leaf (see _train)."""
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: np.asarray(x) + scale * rng.standard_normal(x.shape).astype(x.dtype)
      if lora.is_adapter_name(str(p[-1].key)) else np.array(x), params)


def test_targets():
  cfg = ModelConfig.from_config(load_config("tiny").model)
  ids = jnp.zeros((1, 8), jnp.int32)
  for targets, want in (("value,down", {"value", "down"}), ("attention", {"query", "key", "value", "out"})):
    adapted = dataclasses.replace(cfg, lora=LoraConfig.from_config({"rank": 2, "targets": targets}))
    params = jax.eval_shape(Transformer(adapted).init, jax.random.key(0), ids)
    adapters = lora.split(nn.meta.unbox(params["params"]))[1]
    names = {str(p[-1].key) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)}
    assert names == {f"{t}{s}" for t in want for s in ("_lora_a", "_lora_b")}
  with pytest.raises(ValueError, match="config.lora.targets: unknown .*'ffn'"):
    LoraConfig.from_config({"rank": 2, "targets": "attention,ffn"})


def _config(mesh):
  config = load_config("tiny")
  config.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, **mesh})
  config.data.update(seq_len=32, global_batch_size=8)
  config.lora.update(rank=4, alpha=8.0, dropout=0.1)
  config.optimizer.update(learning_rate=1e-2, warmup_steps=0)
  return config


def _train(mesh, devices, params=None):
  """STEPS steps from `params` (numpy arrays of their own: on the CPU device_put may alias them, and the train step
  donates its state), or from a fresh init; returns (experiment, init params, final state, losses)."""
  experiment = build_experiment(_config(mesh), devices=devices)
  if params is None:
    state = experiment.init_state()
    params = jax.tree.map(np.array, jax.device_get(state.params))
  else:
    state = state_from_params(params, experiment.tx, experiment.layout, experiment.mesh, experiment.rules)
  step = experiment.train_step()
  losses = []
  for batch in itertools.islice(TokenStreamIterator(0, 8, 32, 1024, experiment.mesh), STEPS):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return experiment, params, state, losses


@pytest.fixture(scope="module")
def one_device():
  """(experiment, a fresh init, the state after STEPS steps from it, the losses) on one device. B starts at zero,
  so step 1 moves only B; from step 2 on A moves too."""
  return _train({}, jax.devices()[:1])


def test_step0_equals_base_and_merged_equals_adapted(one_device):
  experiment, params = one_device[:2]  # a fresh init: every B is zero
  cfg = experiment.model_config
  base_model = Transformer(dataclasses.replace(cfg, lora=LoraConfig()))
  ids = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)
  base, _ = lora.split(params)
  adapted, plain = jax.jit(experiment.model.apply), jax.jit(base_model.apply)
  np.testing.assert_array_equal(adapted({"params": params}, ids), plain({"params": base}, ids))  # exactly: B = 0
  params = _perturbed(params)
  logits = adapted({"params": params}, ids)
  assert float(jnp.abs(logits - plain({"params": base}, ids)).max()) > 1e-2  # the adapters do change the model
  merged = jax.jit(lambda p: lora.merge(p, cfg.lora.scale))(params)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  np.testing.assert_allclose(plain({"params": merged}, ids), logits, rtol=1e-5, atol=1e-5)
  # Dropout only with a dropout rng (training); evaluation and decoding are deterministic.
  dropped = jax.jit(lambda p, key: experiment.model.apply({"params": p}, ids, rngs={"dropout": key}))(
      params, jax.random.key(3))
  assert float(jnp.abs(dropped - logits).max()) > 1e-4


def test_only_adapters_train_and_hold_optimizer_state(one_device):
  _, params, state, _ = one_device
  new = jax.device_get(state.params)
  mask = lora.adapter_mask(params)
  for (path, before), after, is_adapter in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new),
                                               jax.tree.leaves(mask)):
    if is_adapter:
      assert not np.array_equal(before, after), jax.tree_util.keystr(path)
    else:
      np.testing.assert_array_equal(before, after, err_msg=jax.tree_util.keystr(path))
  # The optimizer state's arrays: the Adam moments of the adapters (mu and nu) and step counts; nothing for base weights.
  adapter_shapes = sorted(x.shape for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
  opt_leaves = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)]
  moments = [x for p, x in opt_leaves if x.ndim]
  assert sorted(x.shape for x in moments) == sorted(adapter_shapes * 2)
  assert all(("_lora_a" in p or "_lora_b" in p) for p, x in opt_leaves if x.ndim), [p for p, _ in opt_leaves]


def test_sharded_mesh_equals_one_device_and_shards_adapters(one_device):
  _, params, want_state, want_losses = one_device
  experiment, _, state, losses = _train({"data": 2, "fsdp": 2, "tensor": 2}, None, jax.tree.map(np.array, params))
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  got, want = jax.device_get(state.params), jax.device_get(want_state.params)
  # Per leaf, as in tests/train/test_equivalence.py: |got - want| / |want| over the whole array (3 AdamW steps).
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    assert np.linalg.norm(g - w) <= 3e-5 * np.linalg.norm(w), jax.tree_util.keystr(path)
  shardings = experiment.layout.param_shardings["layers"]
  # A takes the kernel's input axes, B its output axes: query [D, H, Dh] -> A [D, r] on fsdp, B [r, H, Dh] on tensor
  # (every one after the scanned layers axis).
  layers, embed, heads, head_dim = tuple(shardings["attention"]["query"].spec)
  assert "fsdp" in embed and heads == "tensor", (embed, heads)
  assert tuple(shardings["attention"]["query_lora_a"].spec) == (layers, embed, None)
  assert tuple(shardings["attention"]["query_lora_b"].spec) == (layers, None, heads, head_dim)
  assert tuple(shardings["mlp"]["down_lora_a"].spec) == (layers, "tensor", None)
  # Per device: LoRA's optimizer state is a few adapters' moments; full fine-tuning holds two moments per param.
  config = _config({"data": 2, "fsdp": 2, "tensor": 2})
  config.lora.rank = 0
  full_layout = build_experiment(config).layout
  lora_opt = shard_bytes(experiment.layout.abstract_state.opt_state)
  full_opt = shard_bytes(full_layout.abstract_state.opt_state)
  assert lora_opt < 0.1 * full_opt, (lora_opt, full_opt)
