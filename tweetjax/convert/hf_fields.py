"""What every field of a Hugging Face Llama / Mistral / Qwen2 `config.json` means for tweetjax.

Each key of a config.json is either mapped onto `config.model` (sizes, norm epsilon, RoPE and its scaling, tied
embeddings), checked to hold a value the tweetjax model computes exactly (SwiGLU, no MLP or output-projection
biases, no sliding window shorter than the context, not quantized), or known not to change what the weights
compute (token ids, dtypes, initializer, generation defaults). A key in none of these tables is refused with its
name: an unknown field may change the function, and an import that ignored it would be silently wrong.

The tables follow the config classes of transformers 5 (LlamaConfig, MistralConfig, Qwen2Config) and the keys older
releases wrote; tests/convert/test_hf_families.py checks that every field of the installed classes is covered.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from absl import logging


class HFConfigError(ValueError):
  """A Hugging Face config the tweetjax model cannot represent exactly."""


@dataclasses.dataclass(frozen=True)
class Family:
  """One supported `model_type`: its HF class, whether q/k/v carry biases, and its own config fields."""
  architecture: str
  qkv_bias: bool
  fields: frozenset[str]


# Fields every family maps or checks (model_overrides_from_hf, rope_overrides, check_fields).
COMMON_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor",
    "attention_dropout", "quantization_config",
})
FAMILIES = {
    # attention_bias puts biases on q/k/v AND o_proj, mlp_bias on the MLP: both refused unless false.
    # pretraining_tp > 1 only slices the same matmuls (transformers 5 ignores it).
    "llama": Family("LlamaForCausalLM", False, frozenset({"attention_bias", "mlp_bias", "pretraining_tp"})),
    "mistral": Family("MistralForCausalLM", False, frozenset({"sliding_window"})),
    # Qwen2 / Qwen2.5: biases on q/k/v (never on o_proj); a window applies to layers >= max_window_layers only when
    # use_sliding_window (or to the layers layer_types names).
    "qwen2": Family("Qwen2ForCausalLM", True,
                    frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"})),
}
# Present in configs of every PreTrainedConfig; none changes what the weights compute.
METADATA_FIELDS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_bfloat16",
    "initializer_range", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "output_hidden_states", "output_attentions", "return_dict", "torchscript",
    "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "finetuning_task", "tokenizer_class",
    "prefix", "task_specific_params", "tf_legacy_loss", "_attn_implementation", "_attn_implementation_autoset",
    # generation defaults older releases saved in config.json (now generation_config.json)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})
# Fields that would make this something other than a text decoder with plain RoPE unless unset or false (Qwen2.5
# configs carry use_mrope=false; true is Qwen2-VL's multimodal RoPE).
MUST_BE_UNSET = ("is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
                 "cross_attention_hidden_size", "pruned_heads", "use_mrope")

# RoPE variants tweetjax implements (config.model.rope_scaling) and the keys each reads from the HF rope dict.
ROPE_TYPES = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
}
_ROPE_GENERIC_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})
DEFAULT_ROPE_THETA = 10_000.0


def family_of(hf: Mapping[str, Any], source: str) -> Family:
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise HFConfigError(f"{source}: model_type={model_type!r}; expected one of {list(FAMILIES)} "
                        "(the Llama architecture: RMSNorm, RoPE, GQA attention, SwiGLU MLP)")
  return FAMILIES[model_type]


def known_fields(model_type: str) -> frozenset[str]:
  return COMMON_FIELDS | FAMILIES[model_type].fields | METADATA_FIELDS | frozenset(MUST_BE_UNSET)


def check_fields(hf: Mapping[str, Any], source: str) -> Family:
  """Refuses any field whose value the tweetjax model would not compute exactly; returns the family."""
  family = family_of(hf, source)
  model_type = hf["model_type"]
  architectures = hf.get("architectures") or [family.architecture]
  if list(architectures) != [family.architecture]:
    raise HFConfigError(f"{source}: architectures={architectures}; a {model_type} import reads "
                        f"{family.architecture} weights (embeddings, layers, final norm, LM head)")
  unknown = sorted(set(hf) - known_fields(model_type))
  if unknown:
    raise HFConfigError(f"{source}: unknown {model_type} config fields {unknown}; the import does not know whether "
                        "they change what the weights compute (remove them from config.json if they do not)")
  for key in MUST_BE_UNSET:
    if hf.get(key):
      raise HFConfigError(f"{source}: {key}={hf[key]!r}; tweetjax imports decoder-only causal LMs")
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise HFConfigError(f"{source}: hidden_act={act!r}; the tweetjax MLP is SwiGLU (silu) only")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise HFConfigError(f"{source}: {key}=true; the tweetjax model has biases on q/k/v only (Qwen2's layout, "
                          "config.model.qkv_bias), none on the attention output or the MLP")
  if hf.get("quantization_config"):
    raise HFConfigError(f"{source}: quantization_config is set; import a non-quantized checkpoint")
  if hf.get("attention_dropout"):
    logging.warning("%s: attention_dropout=%s is dropped (tweetjax has no attention dropout; it only acts when "
                    "training in transformers)", source, hf["attention_dropout"])
  _check_sliding_window(hf, model_type, source)
  return family


def _check_sliding_window(hf: Mapping[str, Any], model_type: str, source: str) -> None:
  """A sliding window that can drop keys (shorter than max_position_embeddings) on any layer is refused."""
  num_layers = int(hf.get("num_hidden_layers") or 0)
  window = hf.get("sliding_window")
  if model_type == "mistral":
    layers, field = list(range(num_layers)), "sliding_window"
  elif model_type == "qwen2":
    if not hf.get("use_sliding_window", False):
      window = None  # Qwen2Config drops the window unless use_sliding_window
    layer_types = hf.get("layer_types")
    if layer_types is not None:
      bad = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
      if bad or len(layer_types) != num_layers:
        raise HFConfigError(f"{source}: layer_types={layer_types}: expected {num_layers} entries of "
                            "'full_attention' or 'sliding_attention'")
      layers = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
      field = "layer_types"
    else:
      start = int(hf.get("max_window_layers", 28))
      layers, field = list(range(start, num_layers)), f"max_window_layers={start}"
  else:
    return
  if window is None or not layers:
    return
  context = hf.get("max_position_embeddings")
  if context is None or int(window) < int(context):
    raise HFConfigError(
        f"{source}: sliding_window={window} applies to layers {layers} ({field}) and is shorter than "
        f"max_position_embeddings={context}: tokens further apart than {window} would not attend to each other, "
        "and tweetjax attention is full causal")


def rope_overrides(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
  """config.model RoPE keys from transformers>=5 `rope_parameters` or the older `rope_theta` + `rope_scaling`.

  As transformers does, a non-empty `rope_scaling` takes precedence over `rope_parameters`, and a theta missing
  from the chosen dict comes from the top-level `rope_theta`.
  """
  for key in ("rope_parameters", "rope_scaling"):
    if hf.get(key) is not None and not isinstance(hf[key], Mapping):
      raise HFConfigError(f"{source}: {key}={hf[key]!r}: expected an object or null")
  key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  rope = dict(hf.get(key) or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise HFConfigError(f"{source}: {key} has rope_type={rope_type!r} ({rope}); tweetjax implements "
                        f"{sorted(ROPE_TYPES)} (config.model.rope_scaling), so this checkpoint would compute "
                        "different attention")
  unknown = sorted(set(rope) - _ROPE_GENERIC_KEYS - ROPE_TYPES[rope_type])
  if unknown:
    raise HFConfigError(f"{source}: {key} has {unknown}, which rope_type={rope_type!r} does not use in tweetjax")
  partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise HFConfigError(f"{source}: partial_rotary_factor={partial}; tweetjax rotates the whole head dimension")
  theta = rope.get("rope_theta", hf.get("rope_theta"))
  out = {"rope_theta": float(DEFAULT_ROPE_THETA if theta is None else theta), "rope_scaling": "none"}
  if rope_type == "default":
    return out
  missing = sorted(k for k in ROPE_TYPES[rope_type] - {"original_max_position_embeddings"} if rope.get(k) is None)
  if missing:
    raise HFConfigError(f"{source}: {key} with rope_type={rope_type!r} is missing {missing}")
  out.update(rope_scaling=rope_type, rope_scaling_factor=float(rope["factor"]))
  if rope_type == "llama3":
    # transformers defaults the pre-training context to max_position_embeddings
    original = rope.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    if original is None:
      raise HFConfigError(f"{source}: {key} with rope_type='llama3' needs original_max_position_embeddings")
    out.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
               rope_high_freq_factor=float(rope["high_freq_factor"]), rope_original_max_position=int(original))
  return out


def rope_fields(cfg) -> dict[str, Any]:
  """The HF config keys for the RoPE of `cfg` (a ModelConfig), in both spellings: transformers>=5 reads
  `rope_parameters`, older releases `rope_theta` + `rope_scaling`."""
  scaling = None
  if cfg.rope_scaling == "linear":
    scaling = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
  elif cfg.rope_scaling == "llama3":
    scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
               "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
               "original_max_position_embeddings": cfg.rope_original_max_position}
  parameters = {**(scaling or {"rope_type": "default"}), "rope_theta": cfg.rope_theta}
  return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": parameters}
