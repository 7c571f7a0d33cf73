"""One table of what every config key may hold, checked before anything is built or compiled.

`RULES` maps each leaf of `tweetjax.config.base_config()` (dotted, e.g. "optimizer.learning_rate") to a rule: a
positive integer, a float >= 0, a value in (0, 1], one of a set of names... `check_config` applies the whole table
and raises one `ConfigError` listing every bad key, so a run with three mistakes fails once, not three times.
`build_experiment` (the place every tool builds its model, mesh and optimizer) calls it first; the sweep runner
calls it for each point before launching any.

A key added to base_config() needs a rule here: tests/test_config_check.py fails for a leaf without one, and for a
rule whose key no longer exists. Relations between keys (batch divisible by the batch shards, heads by kv heads)
are checked where they are used (train/experiment.py, model/config.py, parallel/validate.py), with the keys named.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping

import ml_collections

from tweetjax.model.config import (ATTENTION_IMPLS, CONTEXT_ATTENTION, LORA_GROUPS, LORA_TARGETS, MOE_IMPLS,
                                   NORM_STYLES, REMAT_POLICIES,
                                   ROPE_SCALINGS)
from tweetjax.parallel.mesh import MESH_AXES
from tweetjax.train.optimizer import SCHEDULES
from tweetjax.train.profiling import parse_profile_steps

DTYPES = ("float32", "bfloat16", "float16")
DATA_SOURCES = ("synthetic", "tweets", "sft")
SFT_TEMPLATES = ("plain", "sep", "custom")  # tweetjax/data/sft.py TEMPLATES, and "custom"
NONFINITE_MODES = ("skip", "stop")


class ConfigError(ValueError):
  """One or more config keys hold values outside what they may hold; the message lists them all."""


@dataclasses.dataclass(frozen=True)
class Rule:
  ok: Callable[[Any], bool]
  expected: str  # completes "config.<key>=<value>: expected ..."


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def integer(minimum: int | None = None) -> Rule:
  if minimum is None:
    return Rule(_is_int, "an integer")
  return Rule(lambda v: _is_int(v) and v >= minimum,
              {0: "an integer >= 0", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}"))


def real(low: float | None = None, high: float | None = None, *, low_open: bool = False,
         high_open: bool = False) -> Rule:
  """A finite number in the interval [low, high] (either end open or absent)."""
  def ok(v):
    if not _is_real(v):
      return False
    if low is not None and (v <= low if low_open else v < low):
      return False
    return high is None or (v < high if high_open else v <= high)
  if low is None and high is None:
    return Rule(ok, "a finite number")
  if high is None:
    return Rule(ok, f"a number {'>' if low_open else '>='} {low:g}")
  return Rule(ok, f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")


def one_of(*values) -> Rule:
  return Rule(lambda v: isinstance(v, str) and v in values, f"one of {list(values)}")


def _profile_steps(v) -> bool:
  try:
    parse_profile_steps(v)
  except ValueError:
    return False
  return isinstance(v, str)


def _lora_targets(v) -> bool:
  names = [t.strip() for t in v.split(",")] if isinstance(v, str) else None
  return bool(names) and all(n in LORA_TARGETS or n in LORA_GROUPS for n in names)


def _axis_rules(v) -> bool:
  def axes_ok(axes):
    if axes is None or axes in MESH_AXES:
      return True
    return isinstance(axes, (list, tuple)) and all(a in MESH_AXES for a in axes)
  return isinstance(v, (list, tuple)) and all(
      isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) and axes_ok(r[1]) for r in v)


def _mixture(v) -> bool:
  from tweetjax.data import mixture  # pylint: disable=g-import-not-at-top  (grain: only when judging this key)
  try:
    mixture.parse(v)
  except (ValueError, AttributeError):
    return False
  return isinstance(v, str)


BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
STRING = Rule(lambda v: isinstance(v, str), "a string")
POSITIVE_INT = integer(1)
COUNT = integer(0)  # >= 0; 0 usually means "off" or "all" (see the key's comment in tweetjax/config.py)
NON_NEGATIVE = real(0.0)
POSITIVE = real(0.0, low_open=True)
MESH_SIZE = Rule(lambda v: _is_int(v) and (v == -1 or v >= 1), "a positive integer or -1 (all remaining devices)")
PROBABILITY_DECAY = real(0.0, 1.0, high_open=True)  # Adam betas: [0, 1)

RULES: dict[str, Rule] = {
    "seed": integer(),
    # model (tweetjax/model/config.py; relations between the keys are checked by ModelConfig)
    "model.vocab_size": POSITIVE_INT,
    "model.valid_vocab_size": COUNT,
    "model.d_model": POSITIVE_INT,
    "model.num_layers": POSITIVE_INT,
    "model.num_heads": POSITIVE_INT,
    "model.num_kv_heads": POSITIVE_INT,
    "model.head_dim": Rule(lambda v: _is_int(v) and v >= 2 and v % 2 == 0, "a positive even integer (RoPE pairs)"),
    "model.mlp_dim": POSITIVE_INT,
    "model.rope_theta": POSITIVE,
    "model.rope_scaling": one_of(*ROPE_SCALINGS),
    "model.rope_scaling_factor": POSITIVE,
    "model.rope_low_freq_factor": POSITIVE,
    "model.rope_high_freq_factor": POSITIVE,
    "model.rope_original_max_position": POSITIVE_INT,
    "model.qkv_bias": BOOL,
    "model.tie_embeddings": BOOL,
    "model.norm_style": one_of(*NORM_STYLES),
    "model.norm_eps": POSITIVE,
    "model.attn_logit_softcap": NON_NEGATIVE,
    "model.final_logit_softcap": NON_NEGATIVE,
    "model.init_std": NON_NEGATIVE,
    "model.dtype": one_of(*DTYPES),
    "model.param_dtype": one_of(*DTYPES),
    "model.remat_policy": one_of(*REMAT_POLICIES),
    "model.scan_layers": BOOL,
    "model.attention_impl": one_of(*ATTENTION_IMPLS),
    "model.attention_block_size": POSITIVE_INT,
    "model.logits_chunk": COUNT,  # 0: dense logits
    "model.context_attention": one_of(*CONTEXT_ATTENTION),
    "model.num_experts": COUNT,
    "model.experts_per_token": POSITIVE_INT,
    "model.moe_every": POSITIVE_INT,
    "model.expert_mlp_dim": COUNT,
    "model.capacity_factor": real(),  # <= 0: dropless
    "model.router_aux_loss_weight": NON_NEGATIVE,
    "model.router_z_loss_weight": NON_NEGATIVE,
    "model.moe_impl": one_of(*MOE_IMPLS),
    # mesh and placement
    **{f"mesh.{axis}": MESH_SIZE for axis in MESH_AXES},
    "topology.devices_per_node": COUNT,
    "topology.cross_node": one_of("error", "warn"),
    "logical_axis_rules": Rule(_axis_rules, f"a list of [logical_name, mesh axes] pairs, mesh axes None, one of "
                                            f"{list(MESH_AXES)} or a list of them"),
    # data
    "data.source": one_of(*DATA_SOURCES),
    "data.seq_len": POSITIVE_INT,
    "data.global_batch_size": POSITIVE_INT,
    "data.dataset_dir": STRING,
    "data.tokenizer_path": STRING,
    "data.shuffle_seed": integer(),
    "data.pack_window": POSITIVE_INT,
    "data.num_epochs": COUNT,
    "data.mixture": Rule(_mixture, "'' or 'name=dataset_dir:weight,...' with weights > 0 (tweetjax/data/mixture.py)"),
    "data.normalize.unescape_html": BOOL,
    "data.normalize.nfc": BOOL,
    "data.normalize.urls": one_of("token", "keep", "remove"),
    "data.normalize.scrub_pii": BOOL,
    "data.normalize.mentions": one_of("token", "keep"),
    "data.normalize.collapse_whitespace": BOOL,
    "data.sft.train_files": STRING,
    "data.sft.validation_files": STRING,
    "data.sft.validation_fraction": real(0.0, 1.0, high_open=True),
    "data.sft.template": one_of(*SFT_TEMPLATES),
    "data.sft.system_format": STRING,  # the {content} field and the rest: ChatTemplate, with the key named
    "data.sft.user_format": STRING,
    "data.sft.assistant_format": STRING,
    "data.sft.special_tokens": STRING,
    "data.sft.normalize": BOOL,
    # optimizer
    "optimizer.learning_rate": NON_NEGATIVE,
    "optimizer.schedule": one_of(*SCHEDULES),
    "optimizer.warmup_steps": COUNT,
    "optimizer.decay_steps": COUNT,
    "optimizer.end_learning_rate_ratio": real(0.0, 1.0),
    "optimizer.b1": PROBABILITY_DECAY,
    "optimizer.b2": PROBABILITY_DECAY,
    "optimizer.eps": POSITIVE,
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.grad_clip_norm": NON_NEGATIVE,
    # train
    "train.steps": COUNT,
    "train.microbatches": POSITIVE_INT,
    "train.pipeline_microbatches": POSITIVE_INT,
    "train.pipeline_repeats": POSITIVE_INT,
    "train.z_loss_weight": NON_NEGATIVE,
    "train.log_every": POSITIVE_INT,
    "train.nonfinite": one_of(*NONFINITE_MODES),
    "train.eval_every": COUNT,
    "train.eval_steps": POSITIVE_INT,
    "train.profile_steps": Rule(_profile_steps, "'' (off), a step count N > 0, or 'START,STOP' with START < STOP"),
    "train.compilation_cache_dir": STRING,
    "train.peak_flops_per_device": NON_NEGATIVE,
    "train.preemption_check_every": POSITIVE_INT,
    "train.tensorboard": BOOL,
    "train.init_from": STRING,
    "train.init_from_step": integer(-1),
    # LoRA
    "lora.rank": COUNT,
    "lora.alpha": POSITIVE,
    "lora.dropout": real(0.0, 1.0, high_open=True),
    "lora.targets": Rule(_lora_targets, f"comma-separated names among {list(LORA_TARGETS)} or groups "
                                        f"{sorted(LORA_GROUPS)}"),
    # checkpoint
    "checkpoint.every_steps": COUNT,
    "checkpoint.max_to_keep": COUNT,  # 0: keep all
    "checkpoint.keep_every_steps": COUNT,
    "checkpoint.async_save": BOOL,
    "checkpoint.keep_incomplete": COUNT,
    # eval
    "eval.data_dir": STRING,
    "eval.batch_size": POSITIVE_INT,
    "eval.max_len": POSITIVE_INT,
    "eval.perplexity_max_batches": COUNT,
    "eval.probe_steps": POSITIVE_INT,
    "eval.probe_learning_rate": POSITIVE,
    "eval.probe_l2": NON_NEGATIVE,
    "eval.flagging_zero_shot": BOOL,
    "eval.flagging_generative": BOOL,
    "eval.search_head_steps": COUNT,
    "eval.search_head_dim": POSITIVE_INT,
    "eval.search_temperature": POSITIVE,
    "eval.personalization_head_steps": COUNT,
    "eval.personalization_head_dim": POSITIVE_INT,
    "eval.personalization_temperature": POSITIVE,
    "eval.max_new_tokens": POSITIVE_INT,
    "eval.temperature": NON_NEGATIVE,  # 0: greedy
    "eval.top_k": COUNT,
    "eval.top_p": real(0.0, 1.0, low_open=True),
    "eval.follow_poll_s": POSITIVE,
    "eval.follow_idle_timeout_s": NON_NEGATIVE,
    # performance
    "xla_flags": Rule(lambda v: isinstance(v, (list, tuple)) and all(isinstance(f, str) and f.startswith("--")
                                                                    for f in v), "a list of '--flag=value' strings"),
}


def leaves(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted key, value) of every non-section entry of a (nested) config."""
  for key, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def problems(config: Mapping[str, Any]) -> list[str]:
  """One line per key whose value breaks its rule; keys without a rule are not judged here (see the module doc)."""
  out = []
  for key, value in leaves(config):
    rule = RULES.get(key)
    if rule is not None and not rule.ok(value):
      out.append(f"config.{key}={value!r}: expected {rule.expected}")
  return out


def check_config(config: Mapping[str, Any]) -> None:
  bad = problems(config)
  if bad:
    raise ConfigError(f"{len(bad)} invalid config value{'s' if len(bad) > 1 else ''}:\n  " + "\n  ".join(bad))
