"""Starting a run from existing weights (`config.train.init_from`): params only, fresh optimizer state, step 0.

The source is either
  a tweetjax workdir (or its checkpoints/ directory): the params of its newest complete checkpoint, or of
      `config.train.init_from_step`, restored onto this run's mesh whatever mesh wrote them (orbax reads each
      device's slice); an import workdir of tools/convert_hf.py is one;
  a Hugging Face checkpoint directory (config.json + safetensors): built straight into this mesh's shards by
      tweetjax/convert (the config must describe that model: `--config=experiments/hf.py:<dir>`).
With LoRA (`config.lora.rank > 0`) the source gives the base weights and the adapters start fresh (B = 0, so step 0
computes the base model); a source that already holds this config's adapters gives them too. A source whose params
do not have this config's shapes is an error naming the params and both shapes. The training loop uses init_from
only when the workdir has no checkpoint of its own: a restarted fine-tune resumes, it never restarts from the base.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from tweetjax.model import lora
from tweetjax.parallel.rules import mesh_context
from tweetjax.train import checkpoint
from tweetjax.train.state import TrainState, init_boxed_params


def is_hf_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, "config.json")) and (
      os.path.exists(os.path.join(path, "model.safetensors"))
      or os.path.exists(os.path.join(path, "model.safetensors.index.json")))


def _init_step(config: ml_collections.ConfigDict) -> int | None:
  step = int(config.train.init_from_step)
  if step < -1:
    raise ValueError(f"config.train.init_from_step={step}: expected a checkpoint step, or -1 for the newest")
  return None if step == -1 else step


def _fresh_adapters(experiment, adapters_abstract: dict) -> dict:
  """The adapters a random init of this config gives (config.seed); XLA drops the base weights' init."""
  model, seq_len = experiment.model, experiment.seq_len
  shardings = jax.tree.map(lambda a: a.sharding, adapters_abstract)

  def init(rng):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    return lora.split(nn.meta.unbox(init_boxed_params(model, rng, seq_len)))[1]

  with mesh_context(experiment.mesh, experiment.rules):
    return jax.jit(init, out_shardings=shardings)(jax.random.key(int(experiment.config.seed)))


def _from_workdir(path: str, step: int | None, experiment, abstract: Any) -> tuple[Any, str]:
  saved, step = checkpoint.saved_params(path, step)
  where = f"{checkpoint.checkpoints_dir(path)}/{step}/params"
  base, adapters = lora.split(abstract)
  saved_has_adapters = lora.has_adapters(saved)
  if saved_has_adapters and not adapters:
    raise checkpoint.IncompatibleCheckpointError(
        f"config.train.init_from={path}: {where} holds LoRA adapters but this config has none (config.lora.rank=0); "
        "merge them into the base weights first (tools/merge_lora.py) or fine-tune with the same config.lora")
  if saved_has_adapters:  # continuing from a LoRA run of this config: its adapters too
    return checkpoint.restore_params(path, abstract, step), f"{where} (with its adapters)"
  params = checkpoint.restore_params(path, base, step)
  if adapters:
    params = lora.combine(params, _fresh_adapters(experiment, adapters))
  return params, where


def _from_hf(path: str, config: ml_collections.ConfigDict, experiment, abstract: Any) -> tuple[Any, str]:
  from tweetjax.convert import hf as hf_convert  # pylint: disable=g-import-not-at-top
  from tweetjax.convert import hf_config  # pylint: disable=g-import-not-at-top
  hf_path = os.path.join(path, "config.json")
  hf = hf_config.read_json(hf_path)
  overrides = hf_config.model_overrides_from_hf(hf, source=hf_path)
  hf_convert._check_model_matches(config, overrides, int(hf["vocab_size"]), hf_path)  # pylint: disable=protected-access
  base, adapters = lora.split(abstract)
  with mesh_context(experiment.mesh, experiment.rules):
    params = hf_convert.load_hf_params(path, base, experiment.model_config, int(hf["vocab_size"]))
  if adapters:
    params = lora.combine(params, _fresh_adapters(experiment, adapters))
  return params, hf_path


def load_params(config: ml_collections.ConfigDict, experiment) -> Any:
  """The params `config.train.init_from` gives, placed on `experiment.layout` (see the module docstring)."""
  path = str(config.train.init_from)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.train.init_from={path!r}: no such directory (expected a tweetjax workdir or a "
                            "Hugging Face checkpoint directory)")
  abstract = experiment.layout.abstract_state.params
  if is_hf_dir(path):
    if _init_step(config) is not None:
      raise ValueError(f"config.train.init_from_step={config.train.init_from_step} applies to tweetjax workdirs; "
                       f"{path} is a Hugging Face checkpoint")
    params, where = _from_hf(path, config, experiment, abstract)
  else:
    _warn_model_changes(path, _init_step(config), config)
    params, where = _from_workdir(path, _init_step(config), experiment, abstract)
  logging.info("config.train.init_from: params from %s", where)
  return params


def _warn_model_changes(path: str, step: int | None, config: ml_collections.ConfigDict) -> None:
  """Model keys that differ from the source run's without changing shapes (rope_theta, norm_eps, ...)."""
  from tweetjax.convert import hf as hf_convert  # pylint: disable=g-import-not-at-top  (saved_config)
  try:
    saved = hf_convert.saved_config(path, step).model.to_dict()
  except (FileNotFoundError, ValueError, KeyError):
    return  # an error about the checkpoint itself follows; a checkpoint without a config has nothing to compare
  changed = {k: (saved[k], v) for k, v in config.model.to_dict().items() if k in saved and saved[k] != v}
  if changed:
    logging.warning("config.train.init_from=%s: config.model differs from the source run's: %s", path,
                    ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items())))


def init_state(config: ml_collections.ConfigDict, experiment) -> TrainState:
  """A step-0 TrainState around the init_from params, with a fresh optimizer state (no copy of the params)."""
  params = load_params(config, experiment)
  shardings = experiment.layout.state_shardings
  with mesh_context(experiment.mesh, experiment.rules):
    opt_state = jax.jit(experiment.tx.init, out_shardings=shardings.opt_state)(params)
  return TrainState(step=jax.device_put(np.int32(0), shardings.step), params=params, opt_state=opt_state,
                    nonfinite_steps=jax.device_put(jnp.zeros((), jnp.int32), shardings.nonfinite_steps))
