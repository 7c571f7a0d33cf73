"""Tensor-by-tensor mapping between Hugging Face Llama / Mistral / Qwen2 weights and tweetjax params.

Dims: N layers, D d_model, H query heads, K kv heads, Dh head dim, F mlp, V vocab (tweetjax, possibly padded),
Vhf the Hugging Face vocab.

HF stores torch Linear weights as [out, in]; tweetjax stores kernels as [in, out] with the head axes split out:
  q/k/v_proj [H*Dh, D] -> query/key/value [D, H, Dh]      o_proj [D, H*Dh] -> out [H, Dh, D]
  q/k/v_proj.bias [H*Dh] -> query/key/value_bias [H, Dh]   (Qwen2; config.model.qkv_bias)
  gate/up_proj [F, D] -> gate/up [D, F]                   down_proj [D, F] -> down [F, D]
  embed_tokens [Vhf, D] -> embedding [V, D]               lm_head [Vhf, D] -> lm_head [D, V]
HF's Llama q/k projections already produce the rotate-half RoPE layout tweetjax uses (the permutation from Meta's
interleaved layout happens in HF's own conversion script), so no head-dim permutation is applied here; the logits
parity test pins this. Vocab rows beyond Vhf are zero; the model masks their logits (config.model.valid_vocab_size).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np

from tweetjax.convert.safetensors_io import CheckpointFileError

Index = tuple[slice, ...]
# HF tensors that carry no weights of their own (buffers some older exports saved).
IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """How one tweetjax param (one layer of it, for stacked params) relates to one HF tensor."""
  hf_name: str  # "{layer}" is replaced by the layer number
  kind: str  # copy | transpose | in_heads | heads_in | heads_bias | embed | lm_head


LAYER_PARAMS = {
    "attention/query": TensorMap("model.layers.{layer}.self_attn.q_proj.weight", "in_heads"),
    "attention/key": TensorMap("model.layers.{layer}.self_attn.k_proj.weight", "in_heads"),
    "attention/value": TensorMap("model.layers.{layer}.self_attn.v_proj.weight", "in_heads"),
    "attention/out": TensorMap("model.layers.{layer}.self_attn.o_proj.weight", "heads_in"),
    "attention/query_bias": TensorMap("model.layers.{layer}.self_attn.q_proj.bias", "heads_bias"),
    "attention/key_bias": TensorMap("model.layers.{layer}.self_attn.k_proj.bias", "heads_bias"),
    "attention/value_bias": TensorMap("model.layers.{layer}.self_attn.v_proj.bias", "heads_bias"),
    "attention_norm/scale": TensorMap("model.layers.{layer}.input_layernorm.weight", "copy"),
    "mlp_norm/scale": TensorMap("model.layers.{layer}.post_attention_layernorm.weight", "copy"),
    "mlp/gate": TensorMap("model.layers.{layer}.mlp.gate_proj.weight", "transpose"),
    "mlp/up": TensorMap("model.layers.{layer}.mlp.up_proj.weight", "transpose"),
    "mlp/down": TensorMap("model.layers.{layer}.mlp.down_proj.weight", "transpose"),
}
GLOBAL_PARAMS = {
    "embed/embedding": TensorMap("model.embed_tokens.weight", "embed"),
    "final_norm/scale": TensorMap("model.norm.weight", "copy"),
    "lm_head": TensorMap("lm_head.weight", "lm_head"),
}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One tweetjax param leaf: its path, the HF tensor map and which layers it holds."""
  path: tuple[str, ...]
  tensor: TensorMap
  layers: tuple[int, ...] | None  # stacked [N, ...] params: all layers; per-layer params: (i,); globals: None

  @property
  def name(self) -> str:
    return "/".join(self.path)

  def hf_names(self) -> list[str]:
    if self.layers is None:
      return [self.tensor.hf_name]
    return [self.tensor.hf_name.format(layer=i) for i in self.layers]


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def param_specs(params: Any, num_layers: int) -> tuple[list[ParamSpec], list[Any], Any]:
  """(specs, leaves, treedef) for a params tree (scanned `layers/...` or unrolled `layers_<i>/...`)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  specs, unknown = [], []
  for path, _ in flat:
    names = tuple(_key(k) for k in path)
    joined = "/".join(names)
    if names[0] == "layers" and "/".join(names[1:]) in LAYER_PARAMS:
      specs.append(ParamSpec(names, LAYER_PARAMS["/".join(names[1:])], tuple(range(num_layers))))
    elif re.fullmatch(r"layers_\d+", names[0]) and "/".join(names[1:]) in LAYER_PARAMS:
      specs.append(ParamSpec(names, LAYER_PARAMS["/".join(names[1:])], (int(names[0][len("layers_"):]),)))
    elif joined in GLOBAL_PARAMS:
      specs.append(ParamSpec(names, GLOBAL_PARAMS[joined], None))
    else:
      unknown.append(joined)
  if unknown:
    raise CheckpointFileError(
        f"tweetjax params {unknown} have no Hugging Face Llama/Mistral/Qwen2 counterpart (sandwich norms and MoE "
        "experts are not part of those models)")
  return specs, [leaf for _, leaf in flat], treedef


# ---------------------------------------------------------------------------------------------------------------
# HF -> tweetjax, one block at a time.


def _clip(s: slice, size: int) -> tuple[slice, int]:
  """The part of `s` (a normalized slice) inside [0, size) and how many zero rows pad it to full length."""
  start, stop = s.start, s.stop
  inside = slice(min(start, size), min(stop, size))
  return inside, (stop - start) - (inside.stop - inside.start)


def _norm(index: Index, shape: Sequence[int]) -> Index:
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def read_block(read: Callable[[str, Index], np.ndarray], tensor: TensorMap, hf_name: str, index: Index,
               shape: Sequence[int], head_dim: int, hf_vocab: int) -> np.ndarray:
  """The block `index` of one layer's tweetjax param of `shape`, read from HF tensor `hf_name`."""
  index = _norm(index, shape)
  kind = tensor.kind
  if kind == "copy":
    return read(hf_name, index)
  if kind == "transpose":
    s_in, s_out = index
    return read(hf_name, (s_out, s_in)).T
  if kind == "heads_bias":
    s_h, s_k = index
    rows = slice(s_h.start * head_dim, s_h.stop * head_dim)
    return read(hf_name, (rows,)).reshape(s_h.stop - s_h.start, head_dim)[:, s_k]
  if kind in ("in_heads", "heads_in"):
    if kind == "in_heads":
      s_d, s_h, s_k = index
    else:
      s_h, s_k, s_d = index
    rows = slice(s_h.start * head_dim, s_h.stop * head_dim)
    nh, nd = s_h.stop - s_h.start, s_d.stop - s_d.start
    if kind == "in_heads":
      return read(hf_name, (rows, s_d)).reshape(nh, head_dim, nd)[:, s_k].transpose(2, 0, 1)
    return read(hf_name, (s_d, rows)).reshape(nd, nh, head_dim)[:, :, s_k].transpose(1, 2, 0)
  if kind in ("embed", "lm_head"):
    s_v, s_d = index if kind == "embed" else index[::-1]
    inside, pad = _clip(s_v, hf_vocab)
    rows_VxD = read(hf_name, (inside, s_d)) if inside.stop > inside.start else None
    if pad:
      zeros = np.zeros((pad, s_d.stop - s_d.start), dtype=rows_VxD.dtype if rows_VxD is not None else np.float32)
      rows_VxD = zeros if rows_VxD is None else np.concatenate([rows_VxD, zeros], axis=0)
    return rows_VxD if kind == "embed" else rows_VxD.T
  raise ValueError(f"unknown tensor kind {kind!r}")


def expected_hf_shape(tensor: TensorMap, shape: Sequence[int], hf_vocab: int) -> tuple[int, ...]:
  """The HF tensor shape that one layer of a tweetjax param of `shape` must come from."""
  kind = tensor.kind
  if kind == "copy":
    return tuple(shape)
  if kind == "transpose":
    return (shape[1], shape[0])
  if kind == "in_heads":
    return (shape[1] * shape[2], shape[0])
  if kind == "heads_in":
    return (shape[2], shape[0] * shape[1])
  if kind == "heads_bias":
    return (shape[0] * shape[1],)
  if kind == "embed":
    return (hf_vocab, shape[1])
  return (hf_vocab, shape[0])  # lm_head


def stacked_block(read, spec: ParamSpec, index: Index, shape: Sequence[int], head_dim: int, hf_vocab: int,
                  dtype) -> np.ndarray:
  """Block `index` of a tweetjax param leaf of `shape` (stacked over layers or not), in `dtype`."""
  if spec.layers is None or len(spec.layers) == 1:
    hf_name = spec.hf_names()[0]
    return read_block(read, spec.tensor, hf_name, index, shape, head_dim, hf_vocab).astype(dtype, copy=False)
  index = _norm(index, shape)
  names = spec.hf_names()
  # Filled layer by layer: host memory is this block plus one layer of it, not a list of layers plus their stack.
  out = np.empty(tuple(s.stop - s.start for s in index), dtype)
  for i, layer in enumerate(range(index[0].start, index[0].stop)):
    out[i] = read_block(read, spec.tensor, names[layer], index[1:], shape[1:], head_dim, hf_vocab)
  return out


# ---------------------------------------------------------------------------------------------------------------
# tweetjax -> HF, one layer at a time.


def to_hf_tensor(tensor: TensorMap, layer_param: np.ndarray, hf_vocab: int) -> np.ndarray:
  """One layer's tweetjax param (full) -> the HF tensor."""
  kind = tensor.kind
  x = layer_param
  if kind == "copy":
    return x
  if kind == "transpose":
    return x.T
  if kind == "in_heads":
    return x.reshape(x.shape[0], -1).T
  if kind == "heads_in":
    return x.reshape(-1, x.shape[-1]).T
  if kind == "heads_bias":
    return x.reshape(-1)
  if kind == "embed":
    return x[:hf_vocab]
  if kind == "lm_head":
    return x[:, :hf_vocab].T
  raise ValueError(f"unknown tensor kind {kind!r}")
