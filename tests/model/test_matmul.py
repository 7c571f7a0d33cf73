"""matmul_impl=cpu_bf16 equals the plain product, and its dots reach XLA:CPU in the form its bf16 kernels take."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tweetjax.model import matmul
from tweetjax.model.config import ModelConfig
from tweetjax.model.transformer import Transformer
from tweetjax.perf import cpu

CFG = ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96,
                  dtype="bfloat16", matmul_impl="cpu_bf16")


def _bf16(x):
  return x.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("K,M", [(48, 80), (80, 48)])  # both weight-gradient branches (transpose x or g)
def test_cpu_bf16_matmul_and_grads_equal_fp32_math_on_bf16_inputs(K, M):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (32, K)).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (K, M))  # an fp32 master weight, cast inside
  g = _bf16(jax.random.normal(kg, (32, M)))

  def f(x, w):
    return jnp.sum(matmul.matmul(x, w, "cpu_bf16", jnp.bfloat16).astype(jnp.float32) * g)

  (dx, dw) = jax.grad(f, argnums=(0, 1))(x, w)
  y = matmul.matmul(x, w, "cpu_bf16", jnp.bfloat16)
  x32, w32 = x.astype(jnp.float32), _bf16(w)
  hi = jax.lax.Precision.HIGHEST
  assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  np.testing.assert_allclose(y.astype(jnp.float32), _bf16(jnp.dot(x32, w32, precision=hi)), rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(dx.astype(jnp.float32), jnp.dot(g, w32.T, precision=hi), rtol=1e-2, atol=2e-2)
  # The weight gradient is accumulated and returned in fp32: only the bf16 inputs' rounding separates it.
  np.testing.assert_allclose(dw, jnp.dot(x32.T, g, precision=hi), rtol=1e-5, atol=1e-4)


def _loss_and_grads(cfg, params, ids):
  def loss(p):
    logits = Transformer(cfg).apply({"params": p}, ids).astype(jnp.float32)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def tiny():
  ids = jax.random.randint(jax.random.key(1), (2, 32), 0, CFG.vocab_size)
  params = Transformer(CFG).init(jax.random.key(2), ids)["params"]
  return params, ids


def test_cpu_bf16_model_matches_fp32_like_xla_bf16_does(tiny):
  """Loss and grads of the cpu_bf16 model are as close to the fp32 model's as the xla bf16 path's are (tied
  embeddings: the LM head is the table's row-major transpose; an untied head is one more `matmul`)."""
  params, ids = tiny
  tie = True
  params = {k: v for k, v in params.items() if k != "lm_head"}
  errs = {}
  ref_loss, ref_grads = _loss_and_grads(dataclasses.replace(CFG, dtype="float32", tie_embeddings=tie), params, ids)
  for impl in ("xla", "cpu_bf16"):
    loss, grads = _loss_and_grads(dataclasses.replace(CFG, matmul_impl=impl, tie_embeddings=tie), params, ids)
    errs[impl] = max(float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
                     for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    assert abs(float(loss) - float(ref_loss)) < 1e-2 * abs(float(ref_loss))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert errs["cpu_bf16"] < max(2 * errs["xla"], 2e-2), errs


def _compiled_dots(cfg, params, ids):
  """(operand dtypes, runs-in-a-library-fusion) of every dot in the compiled forward + backward."""
  def loss(p):
    return jnp.mean(Transformer(cfg).apply({"params": p}, ids).astype(jnp.float32) ** 2)
  text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  computations = {}
  for block in text.split("\n\n"):
    header = re.match(r"(?:ENTRY )?%([\w.\-]+) \((.*?)\) ->", block.strip())
    if header:
      computations[header.group(1)] = (header.group(2), block)
  library = set(re.findall(r'calls=%([\w.\-]+), backend_config=\{"fusion_config":\{"kind":"__\w+_fusion"', text))
  library |= set(re.findall(r'calls=%([\w.\-]+),[^\n]*"kind":"__\w+_fusion"', text))
  dots = []
  for name, (params_text, block) in computations.items():
    types = dict(re.findall(r"([\w.\-]+): (\w+)\[", params_text))
    types.update(re.findall(r"%([\w.\-]+) = (\w+)\[", block))
    for lhs, rhs in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", block):
      dots.append(((types.get(lhs), types.get(rhs)), name in library))
  return dots


def test_cpu_bf16_dots_stay_bf16_in_the_compiled_step(tiny):
  """After XLA:CPU's passes every projection, MLP and LM-head dot (forward and both gradients) still reads bf16
  operands and runs as a library fusion: none was upcast to fp32 or left as a transposed bf16 dot (which no CPU
  kernel runs). The only fp32 dots are attention's [L, L] probabilities products."""
  params, ids = tiny
  dots = _compiled_dots(CFG, params, ids)
  bf16 = [d for d in dots if d[0] == ("bf16", "bf16")]
  assert len(bf16) >= 3 * 7 * CFG.num_layers // 2  # q, k, v, o, gate, up, down: forward, dx and dw
  assert all(in_library for _, in_library in bf16)
  xla_dots = _compiled_dots(dataclasses.replace(CFG, matmul_impl="xla"), params, ids)
  assert len([d for d in xla_dots if d[0] == ("bf16", "bf16")]) < len(bf16) // 3  # the xla path: upcast


def test_auto_resolves_by_dtype_backend_and_cpu_kind(monkeypatch):
  cpu.cpu_info.cache_clear()
  try:
    for kind, want in (("amx", "cpu_bf16"), ("avx512_bf16", "cpu_bf16"), ("avx512", "xla"), ("avx2", "xla")):
      monkeypatch.setenv("TWEETJAX_CPU_KIND", kind)
      assert matmul.resolve("auto", jnp.bfloat16) == want, kind
      assert matmul.resolve("auto", jnp.float32) == "xla"
    assert matmul.resolve("xla", jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="config.model.matmul_impl"):
      matmul.resolve("onednn", jnp.bfloat16)
  finally:
    cpu.cpu_info.cache_clear()
