"""HF config.json -> config.model: every field of the installed transformers config classes is known, published
configs map onto the experiments/ shapes, and what the model cannot compute is refused with the field named."""

import dataclasses

import pytest

from tests.helpers import load_config
from tweetjax.convert import hf_config
from tweetjax.convert.hf_fields import FAMILIES, known_fields

transformers = pytest.importorskip("transformers")

CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}

# config.json of the published checkpoints (meta-llama/Llama-3.2-1B, meta-llama/Llama-3.1-8B, Qwen/Qwen2.5-7B).
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
LLAMA3 = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
          "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "initializer_range": 0.02,
          "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_key_value_heads": 8,
          "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
          "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256}
PUBLISHED = {
    "llama3_2_1b": {**LLAMA3, "head_dim": 64, "hidden_size": 2048, "intermediate_size": 8192,
                    "num_attention_heads": 32, "num_hidden_layers": 16, "tie_word_embeddings": True,
                    "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0}},
    "llama3_8b": {**LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                  "num_hidden_layers": 32, "tie_word_embeddings": False, "rope_scaling": {**LLAMA3_ROPE, "factor": 8.0}},
    "qwen2_5_7b": {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
                   "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
                   "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
                   "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28,
                   "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.43.1",
                   "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 152064},
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_field_of_the_installed_transformers_config_is_known(model_type):
  """A field a future transformers adds fails here, instead of being refused (or worse) at someone's import."""
  cls = getattr(transformers, CONFIG_CLASSES[model_type])
  fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
  saved = set(cls().to_dict())
  assert not (fields | saved) - known_fields(model_type)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_map_onto_the_experiment_shapes(name):
  overrides = hf_config.model_overrides_from_hf(PUBLISHED[name], source=name)
  model = load_config(name).model
  assert {k: model[k] for k in overrides} == overrides


def test_default_configs_of_the_installed_classes():
  llama = hf_config.model_overrides_from_hf(transformers.LlamaConfig().to_dict())
  assert (llama["rope_scaling"], llama["qkv_bias"]) == ("none", False)
  qwen = hf_config.model_overrides_from_hf(transformers.Qwen2Config().to_dict())
  assert qwen["qkv_bias"] and qwen["head_dim"] == 4096 // 32
  with pytest.raises(hf_config.HFConfigError, match="sliding_window=4096"):  # Mistral 7B v0.1's window
    hf_config.model_overrides_from_hf(transformers.MistralConfig().to_dict())


BASE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 250, "max_position_embeddings": 256}
QWEN2 = {**BASE, "model_type": "qwen2"}


@pytest.mark.parametrize("hf, expected", [
    # transformers<5 spelling; "type" instead of "rope_type"; rope_scaling wins over rope_parameters (as in HF).
    ({"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     dict(rope_theta=5e5, rope_scaling="llama3", rope_scaling_factor=32.0, rope_low_freq_factor=1.0,
          rope_high_freq_factor=4.0, rope_original_max_position=8192)),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": {"rope_type": "default"}},
     dict(rope_theta=1e4, rope_scaling="linear", rope_scaling_factor=2.0)),
    # llama3 without original_max_position_embeddings: max_position_embeddings, as transformers does.
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0}}, dict(rope_scaling="llama3", rope_original_max_position=256)),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}, dict(rope_theta=7.0, rope_scaling="none")),
])
def test_rope_spellings(hf, expected):
  overrides = hf_config.model_overrides_from_hf({**BASE, **hf})
  assert {k: overrides[k] for k in expected} == expected


@pytest.mark.parametrize("hf", [
    {**QWEN2, "use_sliding_window": False, "sliding_window": 64, "max_window_layers": 0},  # window off
    {**QWEN2, "use_sliding_window": True, "sliding_window": 256, "max_window_layers": 0},  # never drops a key
    {**QWEN2, "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 2},  # no layer >= 2
    {**QWEN2, "use_sliding_window": True, "sliding_window": 64, "layer_types": ["full_attention"] * 2},
    {**BASE, "model_type": "mistral", "sliding_window": None},
])
def test_harmless_sliding_windows_are_accepted(hf):
  assert hf_config.model_overrides_from_hf(hf)["qkv_bias"] == (hf["model_type"] == "qwen2")


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing ['high_freq_factor', 'low_freq_factor']"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "attention_factor": 1.0}}, "['attention_factor']"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"is_encoder_decoder": True}, "is_encoder_decoder"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"sliding_window": 128}, "unknown llama config fields ['sliding_window']"),
    ({"model_type": "qwen2", "use_mrope": True}, "use_mrope"),
    ({"model_type": "qwen2", "some_new_field": 1}, "unknown qwen2 config fields ['some_new_field']"),
    ({"model_type": "mistral", "sliding_window": 128}, "sliding_window=128 applies to layers [0, 1]"),
    ({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": None}, "sliding_window=4096"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 128, "max_window_layers": 1},
     "sliding_window=128 applies to layers [1] (max_window_layers=1)"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 128,
      "layer_types": ["sliding_attention", "full_attention"]}, "applies to layers [0] (layer_types)"),
    ({"model_type": "qwen2", "layer_types": ["full_attention"]}, "layer_types"),
])
def test_unsupported_hf_configs_are_refused_naming_the_field(change, message):
  overrides = hf_config.model_overrides_from_hf(BASE)
  assert (overrides["vocab_size"], overrides["valid_vocab_size"]) == (256, 250)
  assert hf_config.model_overrides_from_hf({**BASE, "vocab_size": 256})["valid_vocab_size"] == 0  # no padding
  with pytest.raises(hf_config.HFConfigError) as e:
    hf_config.model_overrides_from_hf({**BASE, **change})
  assert message in str(e.value)


def test_exported_config_reads_back_as_the_same_model():
  """hf_config_from_model -> model_overrides_from_hf is the identity on the mapped keys, for every family."""
  from tweetjax.model.config import ModelConfig

  for cfg, model_type in [(ModelConfig(rope_scaling="linear", rope_scaling_factor=4.0), "llama"),
                          (ModelConfig(rope_scaling="llama3", rope_scaling_factor=8.0), "mistral"),
                          (ModelConfig(qkv_bias=True, tie_embeddings=True, rope_theta=1e6), "qwen2")]:
    hf = hf_config.hf_config_from_model(cfg, model_type=model_type)
    assert set(hf) <= known_fields(model_type)
    overrides = hf_config.model_overrides_from_hf(hf)
    assert {k: getattr(cfg, k) for k in overrides} == overrides, model_type
