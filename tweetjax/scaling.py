"""Scaling-law fit L(N, D) = E + A / N^alpha + B / D^beta and the compute-optimal allocation it implies.

The fit follows the third approach of Hoffmann et al. (2022): minimise the Huber loss (delta 1e-3) of the
log-space residual  LSE(a - alpha log N, b - beta log D, e) - log L  over (a, b, e, alpha, beta), with
A = exp(a), B = exp(b), E = exp(e), by a quasi-Newton method started from the best points of a grid of
initialisations. The default is BFGS: with 5 parameters the limited memory of L-BFGS holds the whole inverse-Hessian
estimate anyway, so both take the same steps, and scipy's L-BFGS-B is ~10x slower on these tiny problems (BLAS
thread start-up per iteration); `method="L-BFGS-B"` selects it.

N is the number of NON-EMBEDDING parameters (everything but the token embedding and the untied output head);
D is the number of training tokens. Compute-optimal sizes use the usual C = 6 N D.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Sequence

import numpy as np
import scipy.optimize

HUBER_DELTA = 1e-3
# Initialisation grid (Hoffmann et al. use a similar one); the best GRID_STARTS are refined with L-BFGS.
GRID = {"a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
        "e": (-1.0, -0.5, 0.0, 0.5, 1.0), "alpha": (0.0, 0.5, 1.0, 1.5, 2.0), "beta": (0.0, 0.5, 1.0, 1.5, 2.0)}
GRID_STARTS = 16


@dataclasses.dataclass(frozen=True)
class ScalingLaw:
  E: float
  A: float
  alpha: float
  B: float
  beta: float
  objective: float = float("nan")  # Huber loss at the optimum (sum over points)

  def loss(self, N, D):
    return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

  def compute_optimal(self, flops: float) -> tuple[float, float]:
    """(N_opt, D_opt) minimising L under 6 N D = flops (closed form)."""
    if not (self.alpha > 0 and self.beta > 0):
      raise ValueError(f"no compute-optimal allocation: it needs alpha > 0 and beta > 0, the fit has "
                       f"alpha={self.alpha:.4g}, beta={self.beta:.4g}")
    a, b = self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)
    G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
    return G * (flops / 6.0) ** a, (flops / 6.0) ** b / G

  def to_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


def _huber(r, delta=HUBER_DELTA):
  absr = np.abs(r)
  quadratic = absr <= delta
  value = np.where(quadratic, 0.5 * r * r, delta * (absr - 0.5 * delta))
  grad = np.where(quadratic, r, delta * np.sign(r))
  return value, grad


def _logsumexp0(terms):
  """logsumexp over axis 0 (plain numpy: scipy's is ~10x slower on these tiny arrays, and L-BFGS calls it a lot)."""
  top = terms.max(axis=0)
  return top + np.log(np.exp(terms - top).sum(axis=0))


def _objective(theta, log_N, log_D, log_L, delta):
  """Huber loss of log-space residuals and its gradient w.r.t. theta = (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * log_N, b - beta * log_D, np.full_like(log_N, e)])
  lse = _logsumexp0(terms)
  weights = np.exp(terms - lse)  # d lse / d term
  value, dr = _huber(lse - log_L, delta)
  grad = np.array([np.sum(dr * weights[0]), np.sum(dr * weights[1]), np.sum(dr * weights[2]),
                   np.sum(dr * weights[0] * -log_N), np.sum(dr * weights[1] * -log_D)])
  return float(np.sum(value)), grad


def _grid_objective(log_N, log_D, log_L, delta):
  grid = np.array(list(itertools.product(*GRID.values())))  # [G, 5]
  a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
  terms = np.stack([a - alpha * log_N, b - beta * log_D, np.broadcast_to(e, (len(grid), len(log_N)))])
  residual = _logsumexp0(terms) - log_L
  return grid, np.sum(_huber(residual, delta)[0], axis=1)


def fit(N: Sequence[float], D: Sequence[float], L: Sequence[float], *, delta: float = HUBER_DELTA,
        starts: int = GRID_STARTS, method: str = "BFGS") -> ScalingLaw:
  """Fits E + A/N^alpha + B/D^beta to losses L of runs with N parameters and D tokens."""
  N, D, L = (np.asarray(x, np.float64) for x in (N, D, L))
  if not (N.shape == D.shape == L.shape) or N.ndim != 1:
    raise ValueError(f"fit needs 1-D N, D, L of equal length, got shapes {N.shape}, {D.shape}, {L.shape}")
  if len(N) < 5:
    raise ValueError(f"fitting 5 parameters needs at least 5 runs, got {len(N)}")
  if np.any(N <= 0) or np.any(D <= 0) or np.any(L <= 0):
    raise ValueError("N, D and L must all be positive")
  if len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
    raise ValueError(f"the runs must vary both N (got {np.unique(N)}) and D (got {np.unique(D)})")
  log_N, log_D, log_L = np.log(N), np.log(D), np.log(L)
  grid, values = _grid_objective(log_N, log_D, log_L, delta)
  best_theta, best_value = None, math.inf
  for start in grid[np.argsort(values)[:starts]]:
    options = {"maxiter": 2000, "gtol": 1e-10} if method == "BFGS" else {"maxiter": 2000, "ftol": 1e-14,
                                                                         "gtol": 1e-12}
    result = scipy.optimize.minimize(_objective, start, args=(log_N, log_D, log_L, delta), jac=True, method=method,
                                     options=options)
    if not np.all(np.isfinite(result.x)):
      continue
    if result.fun < best_value:
      best_theta, best_value = result.x, float(result.fun)
  a, b, e, alpha, beta = best_theta
  return ScalingLaw(E=math.exp(e), A=math.exp(a), alpha=float(alpha), B=math.exp(b), beta=float(beta),
                    objective=best_value)


def residuals(law: ScalingLaw, N, D, L) -> np.ndarray:
  """log(predicted) - log(observed) per run."""
  return np.log(law.loss(np.asarray(N, np.float64), np.asarray(D, np.float64))) - np.log(np.asarray(L))


@functools.lru_cache(maxsize=256)
def non_embedding_params(model_config: Any) -> int:
  """Parameters of the model except the token embedding and the untied output head (the N of scaling laws).

  Counted from the abstract parameter tree (jax.eval_shape of init: nothing is allocated), so it follows
  whatever the model holds (norms, MoE experts: total, not active, parameters). `model_config` is a (hashable)
  ModelConfig; counts are cached.
  """
  import jax
  import jax.numpy as jnp

  from tweetjax.model.transformer import Transformer

  model = Transformer(model_config)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  abstract = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    if "embed" in names or "lm_head" in names:
      continue
    total += math.prod(leaf.shape)
  return int(total)
