"""Hugging Face Llama / Mistral / Qwen2 `config.json` <-> tweetjax `config.model`.

Only fields that change the function the weights compute are mapped; anything that would make a checkpoint compute
something the tweetjax model cannot (another RoPE variant, biases outside q/k/v, another activation, a sliding
window shorter than the context, quantized weights, an unknown field) is refused with the key and value named
(tweetjax/convert/hf_fields.py), instead of importing into a silently different model.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import ml_collections

from tweetjax.convert import hf_fields
from tweetjax.convert.hf_fields import FAMILIES, HFConfigError  # noqa: F401  (HFConfigError: part of this API)
from tweetjax.model.config import ModelConfig

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# The file an import writes next to its checkpoint: the source HF config plus what the import decided.
IMPORT_RECORD = "hf_import.json"
DEFAULT_VOCAB_MULTIPLE = 128  # divisible by every power-of-two tensor-parallel size up to 128


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


def model_overrides_from_hf(hf: Mapping[str, Any], *, vocab_multiple: int = DEFAULT_VOCAB_MULTIPLE,
                            source: str = "config.json") -> dict[str, Any]:
  """`config.model` values reproducing the HF model; vocab padded up to a multiple of `vocab_multiple`."""
  family = hf_fields.check_fields(hf, source)
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
      **hf_fields.rope_overrides(hf, source),
      qkv_bias=family.qkv_bias,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      norm_style="pre",
      attn_logit_softcap=0.0,
      final_logit_softcap=0.0,
  )


def export_model_type(cfg: ModelConfig, model_type: str | None = None) -> str:
  """The HF family `cfg` exports as: `model_type` if given (e.g. the imported one), else qwen2 with q/k/v biases,
  llama without."""
  model_type = model_type or ("qwen2" if cfg.qkv_bias else "llama")
  if model_type not in FAMILIES:
    raise HFConfigError(f"cannot export as model_type={model_type!r}; expected one of {list(FAMILIES)}")
  if FAMILIES[model_type].qkv_bias != cfg.qkv_bias:
    raise HFConfigError(f"cannot export config.model.qkv_bias={cfg.qkv_bias} as {model_type!r} (q/k/v biases: "
                        f"{FAMILIES[model_type].qkv_bias})")
  return model_type


def check_exportable(cfg: ModelConfig, model_type: str | None = None) -> str:
  """Refuses tweetjax features the HF family cannot express; returns the family exported as."""
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
  return export_model_type(cfg, model_type)


def hf_config_from_model(cfg: ModelConfig, *, vocab_size: int | None = None, torch_dtype: str = "float32",
                         max_position_embeddings: int = 4096, bos_token_id: int | None = 1,
                         eos_token_id: int | list[int] | None = 2, pad_token_id: int | None = None,
                         model_type: str | None = None) -> dict[str, Any]:
  """A `LlamaForCausalLM` (or Mistral, Qwen2: `model_type`, see export_model_type) config.json for `cfg`;
  `vocab_size` drops vocab padding added at import."""
  model_type = check_exportable(cfg, model_type)
  vocab_size = cfg.vocab_size if vocab_size is None else int(vocab_size)
  if not 0 < vocab_size <= cfg.vocab_size:
    raise HFConfigError(f"export vocab_size={vocab_size} must be in [1, config.model.vocab_size={cfg.vocab_size}]")
  family_fields = {
      "llama": {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
      "mistral": {"sliding_window": None},
      "qwen2": {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers,
                "layer_types": ["full_attention"] * cfg.num_layers},
  }[model_type]
  return {
      "architectures": [FAMILIES[model_type].architecture],
      "model_type": model_type,
      "vocab_size": vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.norm_eps,
      **hf_fields.rope_fields(cfg),
      "tie_word_embeddings": cfg.tie_embeddings,
      **family_fields,
      "attention_dropout": 0.0,
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
