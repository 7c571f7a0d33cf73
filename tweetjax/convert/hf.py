"""Hugging Face Llama / Mistral / Qwen2 checkpoints <-> tweetjax checkpoints, streamed tensor by tensor.

Import: each param is built directly in its shards (`jax.make_array_from_callback`): a device's block is read from
the safetensors files for just that device's slice of that param, so host memory holds one block at a time, never
the model. The params then go into a step-0 training checkpoint (`tweetjax.train.checkpoint`) with a fresh
optimizer state and a fresh data-iterator state (what the loop would have saved at step 0), which
`tools/train.py --workdir` resumes from and `restore_params` reads.

Export: the params are restored onto the local devices and copied to host one layer of one param at a time, into
safetensors shards of at most `max_shard_size` bytes, loadable by `transformers.AutoModelForCausalLM` as the family
it was imported from (Llama, Mistral, Qwen2), or as Llama (Qwen2 with q/k/v biases) for a model trained here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from tweetjax.config_check import check_config
from tweetjax.convert import hf_config as hfc
from tweetjax.convert.hf_params import IGNORED_HF_TENSORS, ParamSpec, expected_hf_shape, param_specs, \
    stacked_block, to_hf_tensor
from tweetjax.convert.safetensors_io import CheckpointFileError, SafetensorsReader, ShardedWriter, parse_size
from tweetjax.model.config import ModelConfig
from tweetjax.model.transformer import Transformer
from tweetjax.parallel.mesh import make_mesh
from tweetjax.parallel.rules import logical_to_shardings, mesh_context, normalize_rules
from tweetjax.parallel.validate import validate_params
from tweetjax.train.state import init_boxed_params


# ---------------------------------------------------------------------------------------------------------------
# Import.


def check_tensor_names(reader: SafetensorsReader, specs: list[ParamSpec], tied: bool) -> None:
  """Every needed HF tensor is present and every present tensor is used; otherwise one error listing both."""
  needed = {name for spec in specs for name in spec.hf_names()}
  present = reader.names()
  missing = sorted(needed - present)
  unused = sorted(n for n in present - needed if not IGNORED_HF_TENSORS.fullmatch(n)
                  and not (tied and n == "lm_head.weight"))  # some tied exports still save the shared matrix
  if missing or unused:
    raise CheckpointFileError(
        f"{reader.model_dir}: tensors do not match a {'tied' if tied else 'untied'} model with this config: "
        f"missing {missing[:20]}{' ...' if len(missing) > 20 else ''} ({len(missing)} in all); "
        f"unknown {unused[:20]}{' ...' if len(unused) > 20 else ''} ({len(unused)} in all)")


def load_hf_params(hf_dir: str, abstract_params: Any, cfg: ModelConfig, hf_vocab_size: int) -> Any:
  """Params of the HF checkpoint in `hf_dir`, each built straight onto the sharding of its `abstract_params` leaf
  (ShapeDtypeStructs with shardings, e.g. `layout.abstract_state.params`)."""
  reader = SafetensorsReader(hf_dir)
  specs, leaves, treedef = param_specs(abstract_params, cfg.num_layers)
  check_tensor_names(reader, specs, cfg.tie_embeddings)
  for spec, leaf in zip(specs, leaves):
    layer_shape = leaf.shape if spec.layers is None or len(spec.layers) == 1 else leaf.shape[1:]
    if spec.layers is not None and len(spec.layers) > 1 and leaf.shape[0] != len(spec.layers):
      raise CheckpointFileError(f"param {spec.name}: leading axis {leaf.shape[0]} != {len(spec.layers)} layers")
    want = expected_hf_shape(spec.tensor, layer_shape, hf_vocab_size)
    for name in spec.hf_names():
      if reader.shape(name) != want:
        raise CheckpointFileError(f"{hf_dir}: tensor {name} has shape {reader.shape(name)}; the config "
                                  f"implies {want} (for tweetjax param {spec.name} {tuple(leaf.shape)})")

  arrays = []
  for spec, leaf in zip(specs, leaves):
    started = time.perf_counter()

    def block(index, spec=spec, leaf=leaf):
      return stacked_block(reader.read, spec, index, leaf.shape, cfg.head_dim, hf_vocab_size, leaf.dtype)

    arrays.append(_build_sharded(leaf, block))
    logging.info("imported %s %s %s in %.2fs", spec.name, tuple(leaf.shape), leaf.dtype,
                 time.perf_counter() - started)
  return jax.tree_util.tree_unflatten(treedef, arrays)


def _build_sharded(leaf: jax.ShapeDtypeStruct, block) -> jax.Array:
  """Like jax.make_array_from_callback, but each device's block goes to its device before the next one is read
  (make_array_from_callback gathers every local block on host first: the whole param, for one host)."""
  per_device = []
  for device, index in leaf.sharding.addressable_devices_indices_map(leaf.shape).items():
    per_device.append(jax.device_put(block(index), device))
  return jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, per_device)


def import_hf(hf_dir: str, workdir: str, config: ml_collections.ConfigDict | None = None, *,
              vocab_multiple: int = hfc.DEFAULT_VOCAB_MULTIPLE) -> dict[str, Any]:
  """Writes `<workdir>/checkpoints/0` (params + fresh optimizer state) and `<workdir>/hf_import.json`.

  config: the experiment config to train/evaluate with (default: `experiments/hf.py:<hf_dir>`); its model must be
  the HF model's (vocab padding aside). Returns the import record.
  """
  from tweetjax.train.checkpoint import CheckpointManager  # the training stack; the export never needs it
  from tweetjax.train.experiment import build_experiment
  from tweetjax.train.state import TrainState

  started = time.perf_counter()
  hf_path = os.path.join(hf_dir, "config.json")
  hf = hfc.read_json(hf_path)
  overrides = hfc.model_overrides_from_hf(hf, vocab_multiple=vocab_multiple, source=hf_path)
  if config is None:
    config = hfc.config_from_hf(f"{hf_dir},vocab_multiple={vocab_multiple}")
  _check_model_matches(config, overrides, int(hf["vocab_size"]), hf_path)
  record_path = os.path.join(workdir, hfc.IMPORT_RECORD)
  if os.path.exists(os.path.join(workdir, "checkpoints")) and os.listdir(os.path.join(workdir, "checkpoints")):
    raise FileExistsError(f"{workdir}/checkpoints already holds checkpoints; import into an empty workdir")

  experiment = build_experiment(config)
  cfg = experiment.model_config
  layout = experiment.layout
  data_state = _fresh_data_state(config, experiment)  # fails fast, before the weights are read
  with mesh_context(experiment.mesh, experiment.rules):
    params = load_hf_params(hf_dir, layout.abstract_state.params, cfg, int(hf["vocab_size"]))
    opt_state = jax.jit(experiment.tx.init, out_shardings=layout.state_shardings.opt_state)(params)
  shardings = layout.state_shardings
  state = TrainState(step=jax.device_put(np.int32(0), shardings.step), params=params, opt_state=opt_state,
                     nonfinite_steps=jax.device_put(np.int32(0), shardings.nonfinite_steps))
  record = {
      "hf_dir": os.path.abspath(hf_dir),
      "hf_config": hf,
      "model_overrides": {k: config.model[k] for k in overrides},  # the HF-derived keys, printed by the tool
      "model": config.model.to_dict(),  # what experiments/hf.py:<workdir> builds (dtypes, remat... as imported)
      "hf_vocab_size": int(hf["vocab_size"]),
      "padded_vocab_size": cfg.vocab_size,
      "param_dtype": cfg.param_dtype,
  }
  os.makedirs(workdir, exist_ok=True)
  with CheckpointManager(workdir, async_save=False) as manager:
    manager.save(0, state, data_state, config=config, force=True,
                 extra_meta={"source": "hf_import", "hf_dir": record["hf_dir"]})
  record["import_seconds"] = time.perf_counter() - started
  if jax.process_index() == 0:
    with open(record_path, "w") as f:
      json.dump(record, f, indent=2)
    tokenizer = os.path.join(hf_dir, "tokenizer.model")
    if os.path.exists(tokenizer):
      shutil.copy(tokenizer, os.path.join(workdir, "tokenizer.model"))
  return record


def _fresh_data_state(config: ml_collections.ConfigDict, experiment) -> Any:
  """The state of a new training data iterator: the training loop resumes the step-0 checkpoint with it."""
  from tweetjax.train.loop import make_train_iterator

  try:
    return make_train_iterator(config, experiment).get_state()
  except Exception as e:  # noqa: BLE001  (re-raised with what to do)
    raise ValueError(
        f"cannot build the training data iterator (config.data.source={config.data.source!r}): {e}. The imported "
        "step-0 checkpoint records its state so that tools/train.py can resume from it; import with the same "
        "--config.data.* overrides you will train with") from e


def _check_model_matches(config: ml_collections.ConfigDict, overrides: dict[str, Any], hf_vocab_size: int,
                         source: str) -> None:
  """The experiment's model must be the HF model; only its vocab may be larger (padding, masked in the logits)."""
  vocab_keys = ("vocab_size", "valid_vocab_size")
  wrong = {k: (config.model[k], v) for k, v in overrides.items() if k not in vocab_keys and config.model[k] != v}
  if config.model.vocab_size < hf_vocab_size:
    wrong["vocab_size"] = (config.model.vocab_size, f">= {hf_vocab_size}")
  elif (config.model.valid_vocab_size or config.model.vocab_size) != hf_vocab_size:
    wrong["valid_vocab_size"] = (config.model.valid_vocab_size, hf_vocab_size)
  if wrong:
    raise ValueError(f"config.model does not describe the model in {source}: " +
                     ", ".join(f"{k}={a!r} (HF config implies {b!r})" for k, (a, b) in sorted(wrong.items())))


# ---------------------------------------------------------------------------------------------------------------
# Export.


def param_layout(cfg: ModelConfig, mesh, rules) -> Any:
  """Abstract params (ShapeDtypeStructs with shardings) of `cfg` on `mesh`; shapes only, nothing allocated."""
  model = Transformer(cfg)
  with mesh_context(mesh, rules):
    boxed = jax.eval_shape(lambda rng: init_boxed_params(model, rng, 8), jax.random.key(0))
  validate_params(boxed, mesh, rules)
  shardings = logical_to_shardings(nn.get_partition_spec(boxed), mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed),
                      shardings)


@jax.jit
def _take_layer(x, i):
  return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole array on host, filled shard by shard (device_get would hold every shard and their concatenation)."""
  if not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  out = np.empty(x.shape, x.dtype)
  done = set()
  for shard in x.addressable_shards:
    key = tuple((s.start, s.stop) for s in shard.index)
    if key not in done:  # replicas of a block are copied once
      out[shard.index] = np.asarray(shard.data)
      done.add(key)
  return out


@dataclasses.dataclass(frozen=True)
class ExportOptions:
  hf_vocab_size: int | None = None  # None: the full (possibly padded) vocab
  dtype: str | None = None  # None: the param dtype ("bfloat16", "float16", "float32")
  max_shard_size: str | int = "5GB"
  max_position_embeddings: int = 4096
  tokenizer_path: str = ""  # SentencePiece .model exported alongside when set
  model_type: str = ""  # HF family (llama | mistral | qwen2); "": qwen2 with config.model.qkv_bias, else llama
  token_ids: dict | None = None  # bos/eos/pad_token_id for config.json when no tokenizer supplies them


def export_hf(params: Any, cfg: ModelConfig, out_dir: str, options: ExportOptions = ExportOptions()) -> dict:
  """Writes a `<Family>ForCausalLM` directory from `params` (jax Arrays, any sharding); returns the HF config."""
  from tweetjax.convert import hf_tokenizer

  special = dict(options.token_ids or {})
  if options.tokenizer_path:
    special = hf_tokenizer.special_ids(options.tokenizer_path)
  dtype = np.dtype(jnp.dtype(options.dtype or cfg.param_dtype))
  torch_dtype = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}[dtype.name]
  hf_config = hfc.hf_config_from_model(
      cfg, vocab_size=options.hf_vocab_size, torch_dtype=torch_dtype,
      max_position_embeddings=options.max_position_embeddings, model_type=options.model_type or None, **special)
  hf_vocab = hf_config["vocab_size"]
  specs, leaves, _ = param_specs(params, cfg.num_layers)
  if os.path.exists(os.path.join(out_dir, "config.json")):
    raise FileExistsError(f"{out_dir} already holds a model (config.json); export into a new directory")
  writer = ShardedWriter(out_dir, parse_size(options.max_shard_size)) if jax.process_index() == 0 else None

  def add(name: str, array: np.ndarray) -> None:
    if writer is not None:  # one C-ordered copy in the export dtype (transposed views would otherwise copy twice)
      writer.add(name, array.astype(dtype, order="C"))

  # HF order (embeddings, layer by layer, final norm, head): with stacked params one layer slice is on host at a time.
  by_name = {spec.name: (spec, leaf) for spec, leaf in zip(specs, leaves)}
  globals_ = {spec.tensor.hf_name: (spec, leaf) for spec, leaf in by_name.values() if spec.layers is None}
  if "model.embed_tokens.weight" in globals_:
    spec, leaf = globals_["model.embed_tokens.weight"]
    add(spec.tensor.hf_name, to_hf_tensor(spec.tensor, _to_host(leaf), hf_vocab))
  for layer in range(cfg.num_layers):
    for spec, leaf in by_name.values():
      if spec.layers is None or layer not in spec.layers:
        continue
      x = _to_host(_take_layer(leaf, layer)) if len(spec.layers) > 1 else _to_host(leaf)
      add(spec.tensor.hf_name.format(layer=layer), to_hf_tensor(spec.tensor, x, hf_vocab))
  for hf_name in ("model.norm.weight", "lm_head.weight"):
    if hf_name in globals_:
      spec, leaf = globals_[hf_name]
      add(hf_name, to_hf_tensor(spec.tensor, _to_host(leaf), hf_vocab))
  if writer is not None:
    index = writer.close()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(generation, f, indent=2)
    if options.tokenizer_path:
      hf_tokenizer.export_tokenizer(options.tokenizer_path, out_dir,
                                    model_max_length=options.max_position_embeddings)
    logging.info("exported %d tensors (%.1f MB) to %s", len(index["weight_map"]), writer.total_size / 1e6, out_dir)
  return hf_config


def export_checkpoint(workdir: str, out_dir: str, config: ml_collections.ConfigDict | None = None, *,
                      step: int | None = None, options: ExportOptions = ExportOptions(),
                      mesh_sizes: dict[str, int] | None = None) -> dict:
  """Exports the params of a tweetjax checkpoint (newest step unless `step`) to a HF directory.

  config: the experiment config of the run (default: the one saved with the checkpoint). The params are placed
  FSDP-sharded over the local devices unless `mesh_sizes` is given. The HF vocab, family and token ids default to
  those recorded by the import (`hf_import.json`), else the model's vocab, export_model_type and 1/2.
  """
  from tweetjax.train.checkpoint import restore_params

  config = saved_config(workdir, step) if config is None else config
  check_config(config)
  cfg = ModelConfig.from_config(config.model)
  record_path = os.path.join(workdir, hfc.IMPORT_RECORD)
  if os.path.exists(record_path):
    record = hfc.read_json(record_path)
    imported = record["hf_config"]
    options = dataclasses.replace(
        options, hf_vocab_size=record["hf_vocab_size"] if options.hf_vocab_size is None else options.hf_vocab_size,
        model_type=options.model_type or imported.get("model_type", ""),
        token_ids=options.token_ids or {k: imported.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
  hfc.check_exportable(cfg, options.model_type or None)  # before reading anything
  mesh = make_mesh(mesh_sizes or {"data": 1, "fsdp": -1, "expert": 1, "tensor": 1})
  rules = normalize_rules(config.logical_axis_rules)
  params = restore_params(workdir, param_layout(cfg, mesh, rules), step)
  if not options.tokenizer_path:
    for candidate in (config.data.get("tokenizer_path", ""), os.path.join(workdir, "tokenizer.model")):
      if candidate and os.path.exists(candidate):
        options = dataclasses.replace(options, tokenizer_path=candidate)
        break
  return export_hf(params, cfg, out_dir, options)


def saved_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The experiment config written with a checkpoint (`<checkpoints>/<step>/config`)."""
  import orbax.checkpoint as ocp

  from tweetjax.train.checkpoint import checkpoints_dir

  directory = checkpoints_dir(workdir)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers={"config": ocp.JsonCheckpointHandler()})
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint under {directory}")
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  finally:
    manager.close()
  if not saved or "model" not in saved:
    raise ValueError(f"checkpoint {directory}/{step} has no saved config; pass --config=<the run's experiment>")
  return ml_collections.ConfigDict(saved)
