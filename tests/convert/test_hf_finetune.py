"""Fine-tuning an open checkpoint: a local random HF Llama as config.train.init_from with LoRA on a sharded mesh
computes the HF logits at step 0; its merged adapters export back to HF (tweetjax/train/merge_lora.py ->
tweetjax/convert) with the adapted model's logits."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tests.convert.test_hf import hf_llama, hf_logits  # noqa: E402
from tests.helpers import load_config  # noqa: E402
from tests.model.test_lora import _perturbed  # noqa: E402
from tweetjax.convert import hf as hfconv  # noqa: E402
from tweetjax.parallel.rules import mesh_context  # noqa: E402
from tweetjax.train import init_from, merge_lora  # noqa: E402
from tweetjax.train.experiment import build_experiment  # noqa: E402


def test_hf_init_from_lora_merge_and_export(tmp_path):
  model = hf_llama(vocab_size=250, tie_word_embeddings=False)
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  config = load_config("hf", str(tmp_path / "hf"))
  config.mesh.update(data=2, fsdp=2, tensor=2)
  config.lora.update(rank=4, alpha=8.0)
  config.train.init_from = str(tmp_path / "hf")
  experiment = build_experiment(config)
  state = init_from.init_state(config, experiment)
  ids = np.random.RandomState(0).randint(0, 250, (4, 16))  # 4 rows: one per batch shard
  apply = jax.jit(experiment.model.apply)
  with mesh_context(experiment.mesh, experiment.rules):
    logits = np.asarray(apply({"params": state.params}, ids))
  assert np.abs(logits[..., :250] - hf_logits(model, ids)).max() <= 1e-4  # step 0 (B = 0) is the HF model

  params = jax.device_put(_perturbed(jax.device_get(state.params)), experiment.layout.param_shardings)
  with mesh_context(experiment.mesh, experiment.rules):
    adapted = np.asarray(apply({"params": params}, ids))
  merged_experiment = build_experiment(merge_lora.merged_config(config))
  assert merged_experiment.model_config.lora.rank == 0
  merged = merge_lora.merge_params(params, experiment, merged_experiment)
  hfconv.export_hf(merged, merged_experiment.model_config, str(tmp_path / "export"),
                   hfconv.ExportOptions(hf_vocab_size=250))
  reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "export"), use_safetensors=True).eval()
  assert np.abs(hf_logits(reloaded, ids) - adapted[..., :250]).max() <= 1e-4
  assert np.abs(adapted - logits).max() > 1e-2  # the adapters changed the model, so the match is not trivial
