"""A LoRA run's checkpoint -> a plain tweetjax checkpoint with the adapters folded into the base weights.

`merge_checkpoint(config, workdir, output_workdir)` restores the params of a LoRA run (its newest checkpoint, or
`step`) onto the config's mesh, computes W + (alpha / r) A B for every adapted kernel under jit (sharded like W),
and writes `<output_workdir>/checkpoints/<step>` with the config minus `lora` (rank 0) and a fresh optimizer
state. That workdir is what evaluation, sampling, `tools/convert_hf.py --mode=export` and a further
`config.train.init_from` read (it is not a run to resume: it has no data-iterator state); the merged model computes
the adapted model's function (dropout aside). When the run started from a Hugging Face checkpoint (init_from a HF
directory or an import workdir), the source's HF record (`hf_import.json`: family, vocab, token ids) is written
next to it, so the export writes the family it came from.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np

from tweetjax.model import lora
from tweetjax.parallel.rules import mesh_context
from tweetjax.train.checkpoint import CheckpointManager, restore_params, saved_params
from tweetjax.train.experiment import build_experiment
from tweetjax.train.state import TrainState


def merged_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the merged model: no adapters, and nothing left to initialise from."""
  merged = ml_collections.ConfigDict(config.to_dict())
  merged.lora.rank = 0
  merged.train.init_from = ""
  return merged


def merge_params(params: Any, experiment, merged_experiment) -> Any:
  """The adapted params folded into the base kernels, placed like the merged experiment's params."""
  scale = experiment.model_config.lora.scale
  with mesh_context(experiment.mesh, experiment.rules):
    return jax.jit(lambda p: lora.merge(p, scale),
                   out_shardings=merged_experiment.layout.param_shardings)(params)


def _write_hf_record(config: ml_collections.ConfigDict, output_workdir: str) -> None:
  """The HF record of the run's source (an import workdir's own, or one for a HF directory) for the export, and the
  tokenizer, so `experiments/hf.py:<output_workdir>` and tools/convert_hf.py read the merged workdir like an import."""
  from tweetjax.convert import hf_config  # pylint: disable=g-import-not-at-top
  init_from = str(config.train.get("init_from", ""))
  if not init_from:
    return
  try:
    hf, record, _ = hf_config.find_hf_config(init_from)
  except FileNotFoundError:
    return  # a tweetjax run from scratch: nothing to carry
  record = dict(record or {"hf_dir": os.path.abspath(init_from), "hf_config": hf,
                           "hf_vocab_size": int(hf["vocab_size"])})
  record["model"] = config.model.to_dict()
  with open(os.path.join(output_workdir, hf_config.IMPORT_RECORD), "w") as f:
    json.dump(record, f, indent=2)
  tokenizer = str(config.data.get("tokenizer_path", ""))
  if tokenizer and os.path.exists(tokenizer):
    shutil.copy(tokenizer, os.path.join(output_workdir, "tokenizer.model"))


def merge_checkpoint(config: ml_collections.ConfigDict, workdir: str, output_workdir: str,
                     step: int | None = None) -> dict[str, Any]:
  """Writes the merged checkpoint (see the module docstring); returns {"step", "config", "output_workdir"}."""
  if not int(config.lora.rank):
    raise ValueError(f"config.lora.rank=0: {workdir} is not a LoRA run (its config has no adapters to merge)")
  target = os.path.join(output_workdir, "checkpoints")
  if os.path.isdir(target) and os.listdir(target):
    raise FileExistsError(f"{target} already holds checkpoints; merge into a new workdir")
  experiment = build_experiment(config)
  _, step = saved_params(workdir, step)
  params = restore_params(workdir, experiment.layout, step)
  merged_cfg = merged_config(config)
  merged_experiment = build_experiment(merged_cfg, mesh=experiment.mesh)
  merged = merge_params(params, experiment, merged_experiment)
  shardings = merged_experiment.layout.state_shardings
  with mesh_context(merged_experiment.mesh, merged_experiment.rules):
    opt_state = jax.jit(merged_experiment.tx.init, out_shardings=shardings.opt_state)(merged)
  state = TrainState(step=jax.device_put(np.int32(step), shardings.step), params=merged, opt_state=opt_state,
                     nonfinite_steps=jax.device_put(np.int32(0), shardings.nonfinite_steps))
  with CheckpointManager(output_workdir, async_save=False) as manager:
    manager.save(step, state, None, config=merged_cfg, force=True,
                 extra_meta={"source": "merge_lora", "lora_workdir": os.path.abspath(workdir)})
  if jax.process_index() == 0:
    _write_hf_record(config, output_workdir)
  return {"step": step, "config": merged_cfg, "output_workdir": output_workdir}
