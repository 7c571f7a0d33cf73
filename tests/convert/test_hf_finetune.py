"""Fine-tuning an open checkpoint: a local random HF Qwen2 (q/k/v biases) as config.train.init_from with LoRA on a
sharded mesh computes the HF logits at step 0; a checkpoint of it with trained adapters merges into a plain
checkpoint (tweetjax/train/merge_lora.py) that exports back to a Qwen2 directory (tweetjax/convert) computing the
adapted model's logits."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tests.convert.test_hf import VARIANTS, hf_logits, hf_model  # noqa: E402
from tests.helpers import load_config  # noqa: E402
from tests.model.test_lora import _perturbed  # noqa: E402
from tweetjax.convert import hf as hfconv  # noqa: E402
from tweetjax.parallel.rules import mesh_context  # noqa: E402
from tweetjax.train import init_from, merge_lora  # noqa: E402
from tweetjax.train.checkpoint import CheckpointManager  # noqa: E402
from tweetjax.train.experiment import build_experiment  # noqa: E402


def test_hf_init_from_lora_merge_and_export(tmp_path):
  model = hf_model(**VARIANTS["qwen2"])  # vocab 250, padded to 256 in tweetjax
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

  # As after fine-tuning: trained adapters, checkpointed by the run.
  params = jax.device_put(_perturbed(jax.device_get(state.params)), experiment.layout.param_shardings)
  with mesh_context(experiment.mesh, experiment.rules):
    adapted = np.asarray(apply({"params": params}, ids))
  assert np.abs(adapted - logits).max() > 1e-2  # the adapters change the model, so the match below is not trivial
  with CheckpointManager(str(tmp_path / "lora"), async_save=False) as manager:
    manager.save(10, state.replace(params=params), {}, config=config, force=True)
  result = merge_lora.merge_checkpoint(config, str(tmp_path / "lora"), str(tmp_path / "merged"))
  assert result["step"] == 10 and result["config"].lora.rank == 0
  hf = hfconv.export_checkpoint(str(tmp_path / "merged"), str(tmp_path / "export"), result["config"])
  assert hf["model_type"] == "qwen2" and hf["vocab_size"] == 250  # the source's family and vocab (its HF record)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), use_safetensors=True).eval()
  assert np.abs(hf_logits(reloaded, ids) - adapted[..., :250]).max() <= 1e-4
