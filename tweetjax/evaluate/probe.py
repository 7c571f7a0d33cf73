"""Linear heads trained in JAX/optax on frozen pooled features: the flagging probe and the search head (and, through
`fit_adam`, the personalization ranking head).

Dims: N examples, D feature dim, C labels, E head output dim, B batch.
Both are tiny next to the model, so they train on the default device, full batch (probe) or in minibatches (head).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


def unit(x: jax.Array | np.ndarray):
  """Rows scaled to unit L2 norm (numpy or jax arrays); a zero row stays zero."""
  xp = jnp if isinstance(x, jax.Array) else np
  return x / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True), 1e-9)


def fit_adam(loss_fn: Callable[..., jax.Array], params: Any, *, steps: int, learning_rate: float,
             rng: jax.Array | None = None) -> Any:
  """`steps` Adam steps on `loss_fn(params)`, or on `loss_fn(params, key)` with a fresh key per step when `rng` is
  given (minibatch sampling); one jitted scan, so a head trains in one dispatch. Returns the params on the host."""
  tx = optax.adam(learning_rate)
  keys = None if rng is None else jax.random.split(rng, steps)

  @jax.jit
  def train(params, keys):
    def step(carry, key):
      p, opt = carry
      grads = jax.grad(loss_fn)(p) if key is None else jax.grad(loss_fn)(p, key)
      updates, opt = tx.update(grads, opt, p)
      return (optax.apply_updates(p, updates), opt), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), keys, length=steps)
    return params

  return jax.device_get(train(params, keys))


@dataclasses.dataclass(frozen=True)
class Standardizer:
  mean_D: np.ndarray
  std_D: np.ndarray

  @classmethod
  def fit(cls, x_NxD: np.ndarray) -> "Standardizer":
    return cls(x_NxD.mean(0), x_NxD.std(0) + 1e-6)

  def __call__(self, x_NxD: np.ndarray) -> np.ndarray:
    return ((x_NxD - self.mean_D) / self.std_D).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LogisticProbe:
  """Independent class-balanced logistic regressions, one per label (multi-label)."""
  standardize: Standardizer
  w_DxC: np.ndarray
  b_C: np.ndarray

  @classmethod
  def fit(cls, x_NxD: np.ndarray, y_NxC: np.ndarray, *, steps: int, learning_rate: float, l2: float
          ) -> "LogisticProbe":
    standardize = Standardizer.fit(x_NxD)
    x = jnp.asarray(standardize(x_NxD))
    y = jnp.asarray(y_NxC, jnp.float32)
    # Balanced: positives and negatives of each label weigh the same in total (labels are rare).
    pos_C = jnp.clip(y.mean(0), 1e-3, 1 - 1e-3)
    weight_NxC = y * (0.5 / pos_C) + (1 - y) * (0.5 / (1 - pos_C))
    params = {"w": jnp.zeros((x.shape[1], y.shape[1])), "b": jnp.zeros((y.shape[1],))}

    def loss_fn(p):
      logits = x @ p["w"] + p["b"]
      ce = optax.sigmoid_binary_cross_entropy(logits, y)
      return jnp.mean(jnp.sum(ce * weight_NxC, 1)) + l2 * jnp.sum(p["w"] ** 2)

    params = fit_adam(loss_fn, params, steps=steps, learning_rate=learning_rate)
    return cls(standardize, np.asarray(params["w"]), np.asarray(params["b"]))

  def logits(self, x_NxD: np.ndarray) -> np.ndarray:
    return self.standardize(x_NxD) @ self.w_DxC + self.b_C

  def predict(self, x_NxD: np.ndarray) -> np.ndarray:
    return self.logits(x_NxD) > 0.0


@dataclasses.dataclass(frozen=True)
class ContrastiveHead:
  """A linear map of pooled states trained with symmetric InfoNCE on (query, relevant text) pairs."""
  standardize: Standardizer
  w_DxE: np.ndarray

  @classmethod
  def fit(cls, queries_NxD: np.ndarray, texts_NxD: np.ndarray, *, steps: int, dim: int, temperature: float,
          learning_rate: float = 3e-3, batch_size: int = 128, seed: int = 0) -> "ContrastiveHead":
    standardize = Standardizer.fit(np.concatenate([queries_NxD, texts_NxD]))
    q_all, t_all = jnp.asarray(standardize(queries_NxD)), jnp.asarray(standardize(texts_NxD))
    D, N = q_all.shape[1], q_all.shape[0]
    B = min(batch_size, N)
    rng = jax.random.key(seed)
    w = jax.random.normal(rng, (D, dim)) / np.sqrt(D)

    def loss_fn(w, key):
      idx = jax.random.choice(key, N, (B,), replace=False)
      q, t = q_all[idx], t_all[idx]
      logits_BxB = unit(q @ w) @ unit(t @ w).T / temperature
      labels = jnp.arange(B)
      return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits_BxB, labels).mean()
                    + optax.softmax_cross_entropy_with_integer_labels(logits_BxB.T, labels).mean())

    w = fit_adam(loss_fn, w, steps=steps, learning_rate=learning_rate, rng=jax.random.fold_in(rng, 1))
    return cls(standardize, np.asarray(w))

  def __call__(self, x_NxD: np.ndarray) -> np.ndarray:
    return self.standardize(x_NxD) @ self.w_DxE
