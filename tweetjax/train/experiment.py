"""Everything a job derives from a config before it touches data: mesh, rules, model, optimizer, state layout.

Training, evaluation, benchmarks and dry-runs all build their pieces here, so a layout that validates for one
validates for all. All checks run on shapes only, before anything compiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from tweetjax.config_check import check_config
from tweetjax.model import lora
from tweetjax.model.config import ModelConfig
from tweetjax.model.transformer import Transformer
from tweetjax.parallel import context as context_lib
from tweetjax.parallel import pipeline as pipeline_lib
from tweetjax.parallel.mesh import MeshError, check_node_locality, default_devices_per_node, make_mesh
from tweetjax.parallel.report import sharding_report
from tweetjax.parallel.rules import Rules, axis_size, mesh_axes_of, normalize_rules
from tweetjax.parallel.validate import validate_activations, validate_params
from tweetjax.train.optimizer import make_optimizer
from tweetjax.train.state import StateLayout, TrainState, init_train_state, state_layout
from tweetjax.train.step import LossFn, jit_eval_step, jit_train_step


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  mesh: Mesh
  rules: Rules
  model_config: ModelConfig
  model: Transformer
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  layout: StateLayout
  loss_fn: LossFn
  trainable: Callable[[Any], Any] | None = None  # params -> bool mask of what the optimizer updates (None: all)

  @property
  def seq_len(self) -> int:
    return int(self.config.data.seq_len)

  def sharding_report(self) -> str:
    return sharding_report(self.layout.abstract_boxed_params, self.layout.param_shardings)

  def init_state(self, rng: jax.Array | None = None) -> TrainState:
    rng = jax.random.key(self.config.seed) if rng is None else rng
    return init_train_state(self.model, self.tx, self.layout, self.mesh, self.rules, rng, self.seq_len)

  def train_step(self):
    return jit_train_step(self.loss_fn, self.tx, self.schedule, self.layout, int(self.config.train.microbatches),
                          self.trainable)

  def eval_step(self):
    return jit_eval_step(self.loss_fn, self.layout)


def validate_batch(config: ml_collections.ConfigDict, mesh: Mesh, rules: Rules) -> None:
  batch = int(config.data.global_batch_size)
  microbatches = int(config.train.microbatches)
  if microbatches < 1 or batch % microbatches:
    raise MeshError(f"data.global_batch_size={batch} is not divisible by train.microbatches={microbatches}")
  shards = axis_size(mesh, mesh_axes_of("act_batch", rules))
  if (batch // microbatches) % shards:
    raise MeshError(
        f"data.global_batch_size={batch} / train.microbatches={microbatches} = {batch // microbatches} rows per "
        f"microbatch is not divisible by the {shards} batch shards (mesh axes "
        f"{list(mesh_axes_of('act_batch', rules))} of mesh {dict(mesh.shape)})")


def pipeline_spec(config: ml_collections.ConfigDict, mesh: Mesh, rules: Rules,
                  model_config: ModelConfig) -> pipeline_lib.PipelineSpec:
  """The pipeline of this config on this mesh (stages = the mesh axes of "layers"), validated."""
  spec = pipeline_lib.PipelineSpec(stages=axis_size(mesh, mesh_axes_of("layers", rules)),
                                   microbatches=int(config.train.pipeline_microbatches),
                                   repeats=int(config.train.pipeline_repeats))
  c = model_config
  units = pipeline_lib.num_units_of(c.num_layers, c.moe_every, c.num_experts)
  units_name = ("model.num_layers / model.moe_every" if units != c.num_layers else "model.num_layers")
  rows = int(config.data.global_batch_size) // int(config.train.microbatches)
  stage_axes = mesh_axes_of("layers", rules)
  inner_batch_axes = [a for a in mesh_axes_of("act_batch", rules) if a not in stage_axes]
  pipeline_lib.validate(spec, units, rows, axis_size(mesh, inner_batch_axes), units_name=units_name,
                        scan_layers=c.scan_layers)
  return spec


def topology_devices_per_node(config: ml_collections.ConfigDict) -> int:
  topology = config.get("topology") or {}
  return int(topology.get("devices_per_node", 0)) or default_devices_per_node()


def build_experiment(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None,
                     mesh: Mesh | None = None) -> Experiment:
  check_config(config)  # every key's value, all bad keys in one error, before any device or compile
  per_node = topology_devices_per_node(config)
  mesh = make_mesh(config.mesh, devices, devices_per_node=per_node) if mesh is None else mesh
  check_node_locality(mesh, per_node, str((config.get("topology") or {}).get("cross_node", "error")))
  rules = normalize_rules(config.logical_axis_rules)
  model_config = ModelConfig.from_config(config.model, config.get("lora"))
  spec = pipeline_spec(config, mesh, rules, model_config)
  if spec.stages > 1 and model_config.lora.dropout:
    raise ValueError(f"lora.dropout={model_config.lora.dropout} with a {spec.stages}-stage pipeline: the pipeline "
                     "stages draw no dropout keys; set lora.dropout=0 or train without the `stage` axis")
  validate_batch(config, mesh, rules)
  context_lib.validate(int(config.data.seq_len), context_lib.context_shards(mesh, rules))
  model = Transformer(model_config, pipeline=spec)
  # LoRA: only the adapters train; the base weights get neither gradients nor optimizer state.
  trainable = lora.adapter_mask if model_config.lora.rank else None
  tx, schedule = make_optimizer(config.optimizer, int(config.train.steps), trainable)
  layout = state_layout(model, tx, mesh, rules, int(config.data.seq_len))
  validate_params(layout.abstract_boxed_params, mesh, rules)
  validate_activations({"act_heads": model_config.num_heads, "act_kv_heads": model_config.num_kv_heads,
                        "act_mlp": model_config.mlp_dim, "act_vocab": model_config.vocab_size,
                        "act_embed": model_config.d_model, "act_length": int(config.data.seq_len)}, mesh, rules)
  dropout_seed = int(config.seed) if model_config.lora.dropout else None
  loss_fn = LossFn(model, mesh, rules, float(config.train.z_loss_weight), dropout_seed)
  return Experiment(config, mesh, rules, model_config, model, tx, schedule, layout, loss_fn, trainable)


def param_count(abstract_params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(abstract_params))
