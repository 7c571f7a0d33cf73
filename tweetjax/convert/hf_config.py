"""Hugging Face Llama `config.json` <-> tweetjax `config.model`.

Only fields that change the function the weights compute are mapped; anything that would make a Llama checkpoint
compute something the tweetjax model cannot (scaled RoPE, biases, another activation, sliding windows, quantized
weights) is refused with the key and value named, instead of importing into a silently different model.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import ml_collections

from tweetjax.model.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# The file an import writes next to its checkpoint: the source HF config plus what the import decided.
IMPORT_RECORD = "hf_import.json"
DEFAULT_VOCAB_MULTIPLE = 128  # divisible by every power-of-two tensor-parallel size up to 128


class HFConfigError(ValueError):
  """A Hugging Face config the tweetjax Llama model cannot represent exactly."""


def read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} not found") from None
  except json.JSONDecodeError as e:
    raise HFConfigError(f"{path} is not valid JSON: {e}") from None


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
  if multiple < 1:
    raise ValueError(f"vocab_multiple={multiple}: expected a positive integer")
  return int(math.ceil(vocab_size / multiple) * multiple)


def _rope(hf: Mapping[str, Any], source: str) -> float:
  """rope_theta from either the transformers>=5 `rope_parameters` or the older `rope_theta`/`rope_scaling` keys."""
  params = hf.get("rope_parameters")
  scaling = hf.get("rope_scaling")
  theta = hf.get("rope_theta")
  for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
    if value is None:
      continue
    if not isinstance(value, Mapping):
      raise HFConfigError(f"{source}: {key}={value!r}: expected an object or null")
    rope_type = value.get("rope_type", value.get("type", "default"))
    if rope_type not in (None, "default"):
      raise HFConfigError(
          f"{source}: {key} has rope_type={rope_type!r} ({dict(value)}); the tweetjax model implements plain RoPE "
          "(rope_theta only), so this checkpoint would compute different attention; only 'default' is supported")
    if value.get("rope_theta") is not None:
      theta = value["rope_theta"]
  return float(10_000.0 if theta is None else theta)


def _check_unsupported(hf: Mapping[str, Any], source: str) -> None:
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise HFConfigError(f"{source}: model_type={model_type!r}; expected one of {list(SUPPORTED_MODEL_TYPES)} "
                        "(the Llama architecture: RMSNorm, RoPE, GQA attention, SwiGLU MLP)")
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise HFConfigError(f"{source}: hidden_act={act!r}; the tweetjax MLP is SwiGLU (silu) only")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise HFConfigError(f"{source}: {key}=true; the tweetjax model has no bias terms")
  if hf.get("sliding_window") is not None and hf.get("use_sliding_window", True):
    raise HFConfigError(f"{source}: sliding_window={hf['sliding_window']}; tweetjax attention is full causal")
  if hf.get("quantization_config"):
    raise HFConfigError(f"{source}: quantization_config is set; import a non-quantized checkpoint")
  for key in ("num_local_experts", "num_experts", "n_routed_experts"):
    if hf.get(key):
      raise HFConfigError(f"{source}: {key}={hf[key]}: mixture-of-experts checkpoints are not Llama checkpoints")


def model_overrides_from_hf(hf: Mapping[str, Any], *, vocab_multiple: int = DEFAULT_VOCAB_MULTIPLE,
                            source: str = "config.json") -> dict[str, Any]:
  """`config.model` values reproducing the HF model; vocab padded up to a multiple of `vocab_multiple`."""
  _check_unsupported(hf, source)
  missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "vocab_size") if hf.get(k) is None]
  if missing:
    raise HFConfigError(f"{source}: missing required keys {missing}")
  d_model, num_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = hf.get("head_dim") or d_model // num_heads
  vocab_size = padded_vocab_size(int(hf["vocab_size"]), vocab_multiple)
  return dict(
      vocab_size=vocab_size,
      valid_vocab_size=int(hf["vocab_size"]) if vocab_size > int(hf["vocab_size"]) else 0,
      d_model=d_model,
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(head_dim),
      mlp_dim=int(hf["intermediate_size"]),
      rope_theta=_rope(hf, source),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      norm_style="pre",
      attn_logit_softcap=0.0,
      final_logit_softcap=0.0,
  )


def check_exportable(cfg: ModelConfig) -> None:
  """Refuses tweetjax features that `LlamaForCausalLM` cannot express."""
  problems = []
  if cfg.norm_style != "pre":
    problems.append(f"norm_style={cfg.norm_style!r} (Llama has pre-norm only)")
  if cfg.attn_logit_softcap:
    problems.append(f"attn_logit_softcap={cfg.attn_logit_softcap} (Llama attention has no soft-cap)")
  if cfg.final_logit_softcap:
    problems.append(f"final_logit_softcap={cfg.final_logit_softcap} (Llama logits have no soft-cap)")
  if int(getattr(cfg, "num_experts", 0) or 0) > 0:
    problems.append(f"num_experts={cfg.num_experts} (Llama has dense MLPs only)")
  if problems:
    raise HFConfigError("cannot export to Hugging Face Llama: config.model has " + "; ".join(problems))


def hf_config_from_model(cfg: ModelConfig, *, vocab_size: int | None = None, torch_dtype: str = "float32",
                         max_position_embeddings: int = 4096, bos_token_id: int | None = 1,
                         eos_token_id: int | None = 2, pad_token_id: int | None = None) -> dict[str, Any]:
  """A `LlamaForCausalLM` config.json for `cfg`; `vocab_size` drops vocab padding added at import."""
  check_exportable(cfg)
  vocab_size = cfg.vocab_size if vocab_size is None else int(vocab_size)
  if not 0 < vocab_size <= cfg.vocab_size:
    raise HFConfigError(f"export vocab_size={vocab_size} must be in [1, config.model.vocab_size={cfg.vocab_size}]")
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.norm_eps,
      # Both spellings: transformers>=5 reads rope_parameters, older releases rope_theta/rope_scaling.
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "pretraining_tp": 1,
      "max_position_embeddings": int(max_position_embeddings),
      "initializer_range": cfg.init_std,
      "bos_token_id": bos_token_id,
      "eos_token_id": eos_token_id,
      "pad_token_id": pad_token_id,
      "use_cache": True,
      "torch_dtype": torch_dtype,
  }


def find_hf_config(path: str) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
  """(HF config, import record or None, where it was read) from an HF dir, an import dir or a .json path."""
  if os.path.isdir(path):
    record_path = os.path.join(path, IMPORT_RECORD)
    if os.path.exists(record_path):
      record = read_json(record_path)
      return record["hf_config"], record, record_path
    path = os.path.join(path, "config.json")
  hf = read_json(path)
  if IMPORT_RECORD in os.path.basename(path):
    return hf["hf_config"], hf, path
  return hf, None, path


def config_from_hf(arg: str) -> ml_collections.ConfigDict:
  """A locked experiment config for the model at `arg`: `<path>[,vocab_multiple=N]`.

  `<path>` is a Hugging Face model directory (its config.json), a directory written by the importer (its
  hf_import.json, which also fixes the padded vocab) or one of those json files.
  """
  from tweetjax.config import base_config  # tweetjax.config imports the model package; keep this module light

  if not arg:
    raise ValueError("experiments/hf.py needs an argument: --config=experiments/hf.py:/path/to/hf_model_or_import")
  path, *options = arg.split(",")
  vocab_multiple = DEFAULT_VOCAB_MULTIPLE
  for option in options:
    key, _, value = option.partition("=")
    if key != "vocab_multiple" or not value:
      raise ValueError(f"experiments/hf.py:{arg}: unknown option {option!r}; expected vocab_multiple=N")
    vocab_multiple = int(value)
  hf, record, source = find_hf_config(path)
  if record:
    overrides = record.get("model", record["model_overrides"])
  else:
    overrides = model_overrides_from_hf(hf, vocab_multiple=vocab_multiple, source=source)
  config = base_config()
  config.model.update(overrides)
  # The importer copies the tokenizer next to the checkpoint; an HF directory holds it next to config.json.
  tokenizer = os.path.join(os.path.dirname(source), "tokenizer.model")
  if os.path.exists(tokenizer):
    config.data.tokenizer_path = tokenizer
  config.lock()
  return config
