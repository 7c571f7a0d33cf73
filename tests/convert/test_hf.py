"""Hugging Face Llama interop: logits parity on import, identical logits after export, bit-exact round trips,
greedy generation parity, and the errors for checkpoints the model cannot represent."""

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
from tweetjax.convert.safetensors_io import CheckpointFileError  # noqa: E402
from tweetjax.model.config import ModelConfig  # noqa: E402
from tweetjax.parallel.rules import mesh_context  # noqa: E402
from tweetjax.train.checkpoint import restore_params  # noqa: E402
from tweetjax.train.experiment import build_experiment  # noqa: E402

B, L = 4, 16
# Untied with a vocab that needs padding (250 -> 256); tied with one that does not. Both GQA (4 heads, 2 kv heads).
VARIANTS = {"untied": dict(vocab_size=250, tie_word_embeddings=False),
            "tied": dict(vocab_size=256, tie_word_embeddings=True)}


def hf_llama(vocab_size, tie_word_embeddings, seed=0):
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings, rope_theta=5000.0, rms_norm_eps=1e-5,
      initializer_range=0.1, max_position_embeddings=256)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # norms away from 1, so a swapped or dropped norm would show in the logits
    for name, p in model.named_parameters():
      if "norm" in name:
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


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def imported(request, tmp_path_factory):
  """An HF model saved in several small shards, imported into a tweetjax workdir and restored from it."""
  root = tmp_path_factory.mktemp(request.param)
  model = hf_llama(**VARIANTS[request.param])
  model.save_pretrained(root / "hf", safe_serialization=True, max_shard_size="40KB")
  assert os.path.exists(root / "hf" / "model.safetensors.index.json")
  config = sharded_config(str(root / "hf"))
  record = hfconv.import_hf(str(root / "hf"), str(root / "workdir"), config)
  experiment = build_experiment(config)
  params = restore_params(str(root / "workdir"), experiment.layout)
  ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (B, L))
  with mesh_context(experiment.mesh, experiment.rules):
    logits = np.asarray(jax.jit(experiment.model.apply)({"params": params}, ids))
  return dict(name=request.param, root=root, model=model, config=config, record=record, experiment=experiment,
              params=params, ids=ids, logits=logits)


def test_import_logits_match_transformers(imported):
  vocab = imported["model"].config.vocab_size
  expected = hf_logits(imported["model"], imported["ids"])
  logits = imported["logits"]
  assert logits.shape[-1] == imported["record"]["padded_vocab_size"] == 256
  diff = np.abs(logits[..., :vocab] - expected).max()
  assert diff <= 1e-4, f"{imported['name']}: max |logits - HF logits| = {diff}"
  if vocab < logits.shape[-1]:
    # The import sets config.model.valid_vocab_size, so the padding ids' logits are masked in the model itself.
    assert imported["config"].model.valid_vocab_size == vocab
    np.testing.assert_array_equal(logits[..., vocab:], np.finfo(logits.dtype).min)
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
  assert config.model.tie_embeddings == (imported["name"] == "tied")
  assert (config.model.num_heads, config.model.num_kv_heads, config.model.head_dim) == (4, 2, 16)
  assert config.model.rope_theta == 5000.0 and config.model.norm_eps == 1e-5 and config.model.vocab_size == 256
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


def test_export_reloads_in_transformers_with_identical_logits(imported):
  out = imported["root"] / "export"
  hfconv.export_checkpoint(str(imported["root"] / "workdir"), str(out),
                           options=hfconv.ExportOptions(max_shard_size="40KB"))
  index = json.load(open(out / "model.safetensors.index.json"))
  assert len(set(index["weight_map"].values())) > 1
  assert ("lm_head.weight" in index["weight_map"]) == (imported["name"] == "untied")
  reloaded = transformers.LlamaForCausalLM.from_pretrained(str(out), use_safetensors=True).eval()
  assert reloaded.config.vocab_size == imported["model"].config.vocab_size  # vocab padding dropped again
  np.testing.assert_array_equal(hf_logits(reloaded, imported["ids"]), hf_logits(imported["model"], imported["ids"]))


def test_greedy_generation_matches_transformers(imported):
  from tweetjax.model.decode import Sampler, SamplingConfig

  if imported["name"] != "untied":
    pytest.skip("one variant is enough for generation")
  model, experiment = imported["model"], imported["experiment"]
  prompts = imported["ids"][:2, :8]
  with torch.no_grad():
    expected = model.generate(torch.tensor(prompts), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              eos_token_id=None, pad_token_id=0).numpy()[:, 8:]
  sampler = Sampler(experiment.model, experiment.mesh, experiment.rules)
  # The padded vocab ids have logit 0 here; greedy never picked them in this test because real logits are larger.
  out = sampler.generate(imported["params"], prompts.tolist(),
                         SamplingConfig(max_new_tokens=20, temperature=0.0, eos_id=-1))
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)


# ---------------------------------------------------------------------------------------------------------------
# tweetjax -> HF -> tweetjax.


@pytest.fixture(scope="module")
def native(tmp_path_factory):
  """A randomly initialised tweetjax model (scanned layers) exported to HF."""
  root = tmp_path_factory.mktemp("native")
  config = load_config("tiny")
  config.model.update(vocab_size=256, num_heads=4, num_kv_heads=2)
  config.lock()
  experiment = build_experiment(config)
  params = experiment.init_state().params
  hfconv.export_hf(params, experiment.model_config, str(root / "hf"),
                   hfconv.ExportOptions(max_shard_size="100KB", max_position_embeddings=128))
  return dict(root=root, config=config, experiment=experiment, params=params)


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
  model = transformers.LlamaForCausalLM.from_pretrained(str(native["root"] / "hf"), use_safetensors=True).eval()
  diff = np.abs(hf_logits(model, ids) - logits).max()
  assert diff <= 1e-4, diff


# ---------------------------------------------------------------------------------------------------------------
# Errors.


def test_unknown_and_missing_tensors_are_listed(native, tmp_path):
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


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type='llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type='yarn'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"sliding_window": 4096, "model_type": "mistral"}, "sliding_window"),
])
def test_unsupported_hf_configs_are_refused(change, message):
  hf = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 250}
  overrides = hf_config.model_overrides_from_hf(hf)
  assert (overrides["vocab_size"], overrides["valid_vocab_size"]) == (256, 250)
  assert hf_config.model_overrides_from_hf({**hf, "vocab_size": 256})["valid_vocab_size"] == 0  # no padding
  with pytest.raises(hf_config.HFConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
    hf_config.model_overrides_from_hf({**hf, **change})


EXPORT_REFUSED = [dict(norm_style="sandwich"), dict(attn_logit_softcap=30.0), dict(final_logit_softcap=15.0)]
if "num_experts" in {f.name for f in dataclasses.fields(ModelConfig)}:
  EXPORT_REFUSED.append(dict(num_experts=4))


@pytest.mark.parametrize("change", EXPORT_REFUSED)
def test_export_refuses_features_llama_lacks(change, tmp_path):
  cfg = ModelConfig(**change)
  with pytest.raises(hf_config.HFConfigError, match=next(iter(change))):
    hfconv.export_hf({}, cfg, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
