"""Mesh construction, layout validation messages, sharded init and the sharding report."""

import jax
import numpy as np
import pytest

from tests.helpers import load_config
from tweetjax.parallel.mesh import MeshError, make_mesh, resolve_mesh_shape
from tweetjax.parallel.rules import normalize_rules
from tweetjax.train.experiment import build_experiment


def tiny(**mesh):
  config = load_config("tiny")
  config.mesh.update({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **mesh})
  return config


def test_mesh_fills_minus_one_and_orders_axes():
  mesh = make_mesh({"data": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 4, "stage": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 2}
  assert resolve_mesh_shape({"fsdp": -1}, 1) == {"data": 1, "stage": 1, "fsdp": 1, "expert": 1, "context": 1,
                                                 "tensor": 1}


@pytest.mark.parametrize("sizes,message", [
    ({"data": 3}, r"has 3 devices in all but 8 devices are available"),
    ({"data": -1, "fsdp": -1}, r"only one axis may be -1"),
    ({"data": -1, "tensor": 3}, r"cannot fill axis 'data': 8 devices are not divisible by the product 3"),
    ({"pipeline": 2}, r"unknown axes \['pipeline'\]"),
    ({"data": 0}, r"config.mesh.data=0"),
])
def test_mesh_errors(sizes, message):
  with pytest.raises(MeshError, match=message):
    make_mesh(sizes)


@pytest.mark.parametrize("mesh,model,message", [
    (dict(tensor=8), {}, r"param layers/attention/key \(2, 64, 4, 16\): dimension 'kv_heads' "
                         r"\(model.num_kv_heads\) of size 4 is not divisible by mesh axes \['tensor'\] of total size 8"),
    (dict(tensor=4, data=2), {"num_heads": 4, "num_kv_heads": 2},
     r"'kv_heads' \(model.num_kv_heads\) of size 2 is not divisible by mesh axes \['tensor'\]"),
    (dict(tensor=2, data=4), {"mlp_dim": 255},
     r"'mlp' \(model.mlp_dim or model.expert_mlp_dim\) of size 255 is not divisible"),
    (dict(tensor=2, data=4), {"vocab_size": 1001}, r"'vocab' \(model.vocab_size\) of size 1001 is not divisible"),
    (dict(fsdp=8), {"d_model": 60, "num_heads": 4, "num_kv_heads": 4},
     r"'embed' \(model.d_model\) of size 60 is not divisible by mesh axes \['fsdp', 'expert', 'context'\]"),
])
def test_divisibility_errors_name_the_dimension(mesh, model, message):
  config = tiny(**mesh)
  config.model.update(model)
  with pytest.raises(MeshError, match=message):
    build_experiment(config)


def test_batch_divisibility_error():
  config = tiny(data=8)
  config.data.global_batch_size = 12
  with pytest.raises(MeshError, match=r"global_batch_size=12 .* 12 rows per microbatch is not divisible by the 8 "
                                      r"batch shards"):
    build_experiment(config)
  config.data.global_batch_size = 16
  config.train.microbatches = 3
  with pytest.raises(MeshError, match=r"global_batch_size=16 is not divisible by train.microbatches=3"):
    build_experiment(config)


def test_mesh_size_must_match_devices():
  with pytest.raises(MeshError, match=r"has 8 devices in all but 4 devices are available"):
    build_experiment(tiny(data=8), devices=jax.devices()[:4])


def test_unknown_logical_axis_and_unknown_mesh_axis_in_rules():
  config = tiny(data=8)
  config.logical_axis_rules = [r for r in config.logical_axis_rules if r[0] != "kv_heads"]
  with pytest.raises(ValueError, match=r"logical axis 'kv_heads' has no rule"):
    build_experiment(config)
  with pytest.raises(ValueError, match=r"rule 'mlp' -> 'model' names unknown mesh axes \['model'\]"):
    normalize_rules([("mlp", "model")])


def test_sharded_init_places_each_param_in_its_shards_and_report_totals():
  experiment = build_experiment(tiny(data=2, fsdp=2, tensor=2))
  state = experiment.init_state()
  embedding = state.params["embed"]["embedding"]  # [V, D] = [1024, 64] on ("tensor", ("fsdp", "expert", "context"))
  assert embedding.sharding.spec == jax.sharding.PartitionSpec("tensor", ("fsdp", "expert", "context"))
  assert {s.data.shape for s in embedding.addressable_shards} == {(512, 32)}
  query = state.params["layers"]["attention"]["query"]  # [N, D, H, Dh] on (stage, fsdp, tensor, None)
  assert {s.data.shape for s in query.addressable_shards} == {(2, 32, 4, 16)}
  # Adam moments follow their params.
  mu = state.opt_state[1][0].mu["layers"]["attention"]["query"]
  assert mu.sharding == query.sharding
  report = experiment.sharding_report()
  assert "layers/attention/query" in report and "('tensor', ('fsdp', 'expert', 'context'))" in report
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  assert f"total: {total:,} params" in report


def test_mesh_is_node_major_and_inner_axes_stay_in_a_node():
  """8 devices as 2 nodes of 4 (one process per GPU: topology.devices_per_node=4)."""
  from tweetjax.parallel.mesh import axes_across_nodes, check_node_locality, node_report
  mesh = make_mesh({"data": 2, "tensor": 4}, devices_per_node=4)
  assert [d.id for d in mesh.devices[0].flat] == [0, 1, 2, 3]  # one node's devices form one tensor group
  assert axes_across_nodes(mesh, 4) == {"data": 2, "tensor": 1}
  assert check_node_locality(mesh, 4) == []
  assert "tensor       4  inside one node" in node_report(mesh, 4)
  mesh = make_mesh({"stage": 2, "context": 2, "tensor": 2}, devices_per_node=2)  # 4 nodes of 2
  assert axes_across_nodes(mesh, 2) == {"stage": 2, "context": 2, "tensor": 1}
  with pytest.raises(MeshError, match=r"mesh axis 'context' \(config.mesh.context=2\) spans 2 nodes.*"
                                      r"\(context, tensor\) hold 4 devices but a node has 2"):
    check_node_locality(mesh, 2)
  problems = check_node_locality(mesh, 2, on_violation="warn")  # logged, not raised
  assert len(problems) == 1 and "'context'" in problems[0]


def test_tensor_across_nodes_is_refused_before_compiling():
  config = tiny(data=2, tensor=4)
  config.topology.devices_per_node = 2
  with pytest.raises(MeshError, match=r"mesh axis 'tensor' \(config.mesh.tensor=4\) spans 2 nodes.*"
                                      r"config.topology.cross_node='warn'"):
    build_experiment(config)
  config.topology.cross_node = "warn"
  assert build_experiment(config).mesh.shape["tensor"] == 4
