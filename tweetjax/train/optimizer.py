"""Optax chain from `config.optimizer`: clipping, AdamW with a decay mask, learning-rate schedule."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")
# Norm scales and biases ("bias", "<projection>_bias") do not decay; every other leaf does. Matching by exclusion means a new weight matrix (a
# MoE router, an adapter) decays by default instead of silently escaping regularisation. Dimensionality cannot decide
# this: with scanned layers a norm scale is [num_layers, D].
UNDECAYED_PARAM_NAMES = frozenset({"scale", "bias"})


def learning_rate_schedule(opt: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  peak = float(opt["learning_rate"])
  warmup = int(opt["warmup_steps"])
  decay_steps = max(int(opt.get("decay_steps") or total_steps) - warmup, 1)
  end = peak * float(opt["end_learning_rate_ratio"])
  kind = opt["schedule"]
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  elif kind == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif kind == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"config.optimizer.schedule={kind!r}: expected one of {SCHEDULES}")
  warmup_schedule = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
  return optax.join_schedules([warmup_schedule, decay], [warmup])


def weight_decay_mask(params: Any) -> Any:
  def decays(path, _):
    name = _leaf_name(path)
    return name not in UNDECAYED_PARAM_NAMES and not name.endswith("_bias")
  return jax.tree_util.tree_map_with_path(decays, params)


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def make_optimizer(opt: Mapping[str, Any], total_steps: int, trainable: Callable[[Any], Any] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """trainable: params -> pytree of bools (e.g. LoRA's adapter mask). The other leaves are frozen: they get no
  optimizer state at all (optax.multi_transform with set_to_zero) and do not count in the clipping norm."""
  schedule = learning_rate_schedule(opt, total_steps)
  chain = []
  if opt["grad_clip_norm"]:
    chain.append(optax.clip_by_global_norm(float(opt["grad_clip_norm"])))
  chain.append(optax.adamw(schedule, b1=float(opt["b1"]), b2=float(opt["b2"]), eps=float(opt["eps"]),
                           weight_decay=float(opt["weight_decay"]), mask=weight_decay_mask))
  tx = optax.chain(*chain)
  if trainable is not None:
    labels = lambda params: jax.tree.map(lambda t: "trainable" if t else "frozen", trainable(params))
    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
