"""Hugging Face Llama / Mistral / Qwen2 interop: logits parity on import, identical logits after export, bit-exact
round trips, greedy generation parity, and the errors for checkpoints the model cannot represent."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.numpy import load_file, save_file  # noqa: E402

from tests.helpers import load_config  # noqa: E402
from tweetjax.convert import hf as hfconv  # noqa: E402
from tweetjax.convert import hf_config  # noqa: E402
from tweetjax.convert.hf_fields import FAMILIES  # noqa: E402
from tweetjax.convert.safetensors_io import CheckpointFileError  # noqa: E402
from tweetjax.model.config import ModelConfig  # noqa: E402
from tweetjax.parallel.rules import mesh_context  # noqa: E402
from tweetjax.train.checkpoint import restore_params  # noqa: E402
from tweetjax.train.experiment import build_experiment  # noqa: E402

B, L = 4, 16
THETA = 5000.0
# With head_dim 16 and theta 5000 the RoPE wavelengths are 6 .. 13k positions: an original context of 256 puts 3
# frequencies above 256/4 (kept), one between (interpolated) and 4 below 256/1 (stretched), all three llama3 cases.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}
# Every family untied with a vocab that needs padding (250 -> 256) and tied with one that does not; all GQA (4 heads,
# 2 kv heads). The Qwen2 tied one has a sliding window on layer 1 as long as the context (so it never drops a key).
VARIANTS = {
    "untied": dict(family="llama", vocab_size=250, tie_word_embeddings=False),
    "llama3": dict(family="llama", vocab_size=256, tie_word_embeddings=True, rope_scaling=LLAMA3),
    "linear": dict(family="llama", vocab_size=250, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "qwen2": dict(family="qwen2", vocab_size=250, tie_word_embeddings=False),
    "qwen2_tied": dict(family="qwen2", vocab_size=256, tie_word_embeddings=True, use_sliding_window=True,
                       sliding_window=256, max_window_layers=1),
    "mistral": dict(family="mistral", vocab_size=250, tie_word_embeddings=False, sliding_window=None),
}
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def hf_model(family, vocab_size, tie_word_embeddings, rope_scaling=None, seed=0, **extra):
  """A random HF model; rope_theta + rope_scaling is the spelling every transformers release reads."""
  torch.manual_seed(seed)
  config_class, model_class = (getattr(transformers, name) for name in HF_CLASSES[family])
  config = config_class(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings, rope_theta=THETA, rope_scaling=rope_scaling,
      rms_norm_eps=1e-5, initializer_range=0.1, max_position_embeddings=256, **extra)
  model = model_class(config).eval()
  with torch.no_grad():  # norms away from 1 and nonzero biases, so a swapped or dropped one shows in the logits
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith(".bias"):
        p.add_(torch.randn_like(p) * 0.2)
  return model


def hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def sharded_config(path):
  config = load_config("hf", path)
  config.mesh.update(data=2, fsdp=2, tensor=2)  # every param built from per-device blocks of the files
  config.lock()
  return config


def apply_logits(experiment, params, ids, cfg=None):
  model = experiment.model if cfg is None else type(experiment.model)(cfg)
  with mesh_context(experiment.mesh, experiment.rules):
    return np.asarray(jax.jit(model.apply)({"params": params}, ids))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def imported(request, tmp_path_factory):
  """An HF model saved in several small shards, imported into a tweetjax workdir and restored from it."""
  root = tmp_path_factory.mktemp(request.param)
  model = hf_model(**VARIANTS[request.param])
  model.save_pretrained(root / "hf", safe_serialization=True, max_shard_size="40KB")
  assert os.path.exists(root / "hf" / "model.safetensors.index.json")
  config = sharded_config(str(root / "hf"))
  record = hfconv.import_hf(str(root / "hf"), str(root / "workdir"), config)
  experiment = build_experiment(config)
  params = restore_params(str(root / "workdir"), experiment.layout)
  ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (B, L))
  logits = apply_logits(experiment, params, ids)
  return dict(name=request.param, family=VARIANTS[request.param]["family"], root=root, model=model, config=config,
              record=record, experiment=experiment, params=params, ids=ids, logits=logits)


def test_import_logits_match_transformers(imported):
  vocab = imported["model"].config.vocab_size
  expected = hf_logits(imported["model"], imported["ids"])
  logits = imported["logits"]
  assert logits.shape[-1] == imported["record"]["padded_vocab_size"] == 256
  diff = np.abs(logits[..., :vocab] - expected).max()
  print(f"{imported['name']}: max |logits - HF logits| = {diff:.2e}")
  assert diff <= 1e-4, f"{imported['name']}: max |logits - HF logits| = {diff}"
  if vocab < logits.shape[-1]:
    # The import sets config.model.valid_vocab_size, so the padding ids' logits are masked in the model itself.
    assert imported["config"].model.valid_vocab_size == vocab
    np.testing.assert_array_equal(logits[..., vocab:], np.finfo(logits.dtype).min)
  cfg = imported["experiment"].model_config
  assert cfg.qkv_bias == FAMILIES[imported["family"]].qkv_bias
  if cfg.rope_scaling != "none":  # the scaling is what makes the logits match: without it they are far off
    plain = apply_logits(imported["experiment"], imported["params"], imported["ids"],
                         dataclasses.replace(cfg, rope_scaling="none"))
    assert np.abs(plain[..., :vocab] - expected).max() > 100 * 1e-4
  # Hence the same next-token loss as HF's over its own vocab (unmasked, the 6 padding ids' zero logits add
  # 0.017 nats to this random model's loss).
  log_z_BxL = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  next_BxL = np.take_along_axis(logits[:, :-1], imported["ids"][:, 1:, None], -1)[..., 0]
  ours = np.mean(log_z_BxL[:, :-1] - next_BxL)
  with torch.no_grad():
    theirs = imported["model"](torch.tensor(imported["ids"], dtype=torch.long),
                               labels=torch.tensor(imported["ids"], dtype=torch.long)).loss.item()
  assert ours == pytest.approx(theirs, rel=1e-5)


def test_import_record_and_experiment_config(imported):
  record = json.load(open(imported["root"] / "workdir" / hf_config.IMPORT_RECORD))
  assert record["hf_vocab_size"] == imported["model"].config.vocab_size
  config = load_config("hf", str(imported["root"] / "workdir"))
  assert config.model.to_dict() == imported["config"].model.to_dict()  # the model as imported, dtypes and all
  assert config.model.tie_embeddings == imported["model"].config.tie_word_embeddings
  assert (config.model.num_heads, config.model.num_kv_heads, config.model.head_dim) == (4, 2, 16)
  assert config.model.rope_theta == THETA and config.model.norm_eps == 1e-5 and config.model.vocab_size == 256
  rope = VARIANTS[imported["name"]].get("rope_scaling") or {}
  assert config.model.rope_scaling == rope.get("rope_type", "none")
  if rope:
    assert config.model.rope_scaling_factor == rope["factor"]
  if rope.get("rope_type") == "llama3":
    assert (config.model.rope_low_freq_factor, config.model.rope_high_freq_factor,
            config.model.rope_original_max_position) == (1.0, 4.0, 256)
  # The step-0 checkpoint holds a fresh optimizer and data-iterator state: the training loop resumes from it
  # exactly as it does here.
  from tweetjax.train.checkpoint import CheckpointManager
  from tweetjax.train.loop import make_train_iterator
  with CheckpointManager(str(imported["root"] / "workdir")) as manager:
    assert manager.all_steps() == [0]
    restored = manager.restore_latest(imported["experiment"].layout)
  assert int(restored.state.step) == 0 and restored.meta["source"] == "hf_import"
  make_train_iterator(imported["config"], imported["experiment"]).set_state(restored.data_state)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(restored.state.opt_state))
  np.testing.assert_array_equal(restored.state.params["final_norm"]["scale"],
                                imported["model"].model.norm.weight.detach().numpy())


def test_export_reloads_in_transformers_with_identical_logits_and_reimports_bit_identical(imported):
  out = imported["root"] / "export"
  hfconv.export_checkpoint(str(imported["root"] / "workdir"), str(out),
                           options=hfconv.ExportOptions(max_shard_size="40KB"))
  index = json.load(open(out / "model.safetensors.index.json"))
  assert len(set(index["weight_map"].values())) > 1
  assert ("lm_head.weight" in index["weight_map"]) == (not imported["model"].config.tie_word_embeddings)
  assert ("model.layers.0.self_attn.q_proj.bias" in index["weight_map"]) == (imported["family"] == "qwen2")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True).eval()
  assert type(reloaded).__name__ == FAMILIES[imported["family"]].architecture  # the family it came from
  assert reloaded.config.vocab_size == imported["model"].config.vocab_size  # vocab padding dropped again
  np.testing.assert_array_equal(hf_logits(reloaded, imported["ids"]), hf_logits(imported["model"], imported["ids"]))
  # import(export(x)) == x, bit for bit.
  experiment = imported["experiment"]
  with mesh_context(experiment.mesh, experiment.rules):
    again = hfconv.load_hf_params(str(out), experiment.layout.abstract_state.params, experiment.model_config,
                                  imported["model"].config.vocab_size)
  flat_a = jax.tree_util.tree_leaves_with_path(jax.device_get(again))
  flat_b = jax.tree_util.tree_leaves_with_path(jax.device_get(imported["params"]))
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, a), (_, b) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_greedy_generation_matches_transformers(imported):
  from tweetjax.model.decode import Sampler, SamplingConfig

  if imported["name"] == "linear":
    pytest.skip("llama3 covers scaled RoPE in the KV-cache decode")
  model, experiment = imported["model"], imported["experiment"]
  prompts = imported["ids"][:2, :8]
  with torch.no_grad():
    expected = model.generate(torch.tensor(prompts), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              eos_token_id=None, pad_token_id=0).numpy()[:, 8:]
  sampler = Sampler(experiment.model, experiment.mesh, experiment.rules)
  out = sampler.generate(imported["params"], prompts.tolist(),
                         SamplingConfig(max_new_tokens=20, temperature=0.0, eos_id=-1))
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)


# ---------------------------------------------------------------------------------------------------------------
# tweetjax -> HF -> tweetjax.


# A tweetjax-born model of each exported family: plain (-> Llama) and with q/k/v biases and llama3 RoPE (-> Qwen2).
NATIVE = {"llama": {}, "qwen2": dict(qkv_bias=True, rope_scaling="llama3", rope_scaling_factor=8.0,
                                     rope_original_max_position=256)}


@pytest.fixture(scope="module", params=sorted(NATIVE))
def native(request, tmp_path_factory):
  """A randomly initialised tweetjax model (scanned layers; biases random too) exported to HF."""
  root = tmp_path_factory.mktemp(f"native_{request.param}")
  config = load_config("tiny")
  config.model.update(vocab_size=256, num_heads=4, num_kv_heads=2, **NATIVE[request.param])
  config.lock()
  experiment = build_experiment(config)
  params = experiment.init_state().params
  params = jax.tree_util.tree_map_with_path(  # zero-initialised biases would round-trip even if dropped
      lambda path, x: x + 0.3 * jax.random.normal(jax.random.key(len(path)), x.shape, x.dtype)
      if jax.tree_util.keystr(path).endswith("_bias']") else x, params)
  hf = hfconv.export_hf(params, experiment.model_config, str(root / "hf"),
                        hfconv.ExportOptions(max_shard_size="100KB", max_position_embeddings=128))
  assert hf["model_type"] == request.param
  return dict(name=request.param, root=root, config=config, experiment=experiment, params=params)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_round_trip_is_bit_identical(native, scan_layers):
  cfg = ModelConfig.from_config({**native["config"].model, "scan_layers": scan_layers})
  experiment = native["experiment"]
  layout = hfconv.param_layout(cfg, experiment.mesh, experiment.rules)
  params = hfconv.load_hf_params(str(native["root"] / "hf"), layout, cfg, cfg.vocab_size)
  original = jax.device_get(native["params"])
  params = jax.device_get(params)
  if not scan_layers:  # the unrolled layout holds the same numbers, one layer per subtree
    params = {**{k: v for k, v in params.items() if not k.startswith("layers_")},
              "layers": jax.tree.map(lambda *xs: np.stack(xs), *[params[f"layers_{i}"] for i in range(2)])}
  flat_a = jax.tree_util.tree_leaves_with_path(params)
  flat_b = jax.tree_util.tree_leaves_with_path(original)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, a), (_, b) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_exported_native_model_matches_in_transformers(native):
  ids = np.random.RandomState(1).randint(0, 256, (2, L))
  experiment = native["experiment"]
  with mesh_context(experiment.mesh, experiment.rules):
    logits = np.asarray(jax.jit(experiment.model.apply)({"params": native["params"]}, ids))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(native["root"] / "hf"), use_safetensors=True).eval()
  assert type(model).__name__ == FAMILIES[native["name"]].architecture
  diff = np.abs(hf_logits(model, ids) - logits).max()
  print(f"native {native['name']}: max |HF logits - logits| = {diff:.2e}")
  assert diff <= 1e-4, diff


# ---------------------------------------------------------------------------------------------------------------
# Errors.


def test_unknown_and_missing_tensors_are_listed(native, tmp_path):
  if native["name"] != "llama":
    pytest.skip("one family is enough")
  src = native["root"] / "hf"
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text((src / "config.json").read_text())
  tensors = {}
  for name in sorted(os.listdir(src)):
    if name.endswith(".safetensors"):
      tensors.update(load_file(str(src / name)))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
  cfg = native["experiment"].model_config
  layout = hfconv.param_layout(cfg, native["experiment"].mesh, native["experiment"].rules)
  with pytest.raises(CheckpointFileError) as e:
    hfconv.load_hf_params(str(bad), layout, cfg, cfg.vocab_size)
  assert "model.layers.1.mlp.up_proj.weight" in str(e.value) and "q_proj.bias" in str(e.value)


def test_only_safetensors_are_read(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(CheckpointFileError, match="safetensors"):
    hfconv.load_hf_params(str(tmp_path), {}, ModelConfig(), 1)


EXPORT_REFUSED = [dict(norm_style="sandwich"), dict(attn_logit_softcap=30.0), dict(final_logit_softcap=15.0),
                  dict(num_experts=4), dict(qkv_bias=True, model_type="mistral"), dict(model_type="gpt2")]


@pytest.mark.parametrize("change", EXPORT_REFUSED)
def test_export_refuses_features_the_family_lacks(change, tmp_path):
  change = dict(change)
  model_type = change.pop("model_type", "")
  cfg = ModelConfig(**change)
  with pytest.raises(hf_config.HFConfigError, match=next(iter(change), "model_type")):
    hfconv.export_hf({}, cfg, str(tmp_path / "out"), hfconv.ExportOptions(model_type=model_type))
  assert not os.path.exists(tmp_path / "out")
