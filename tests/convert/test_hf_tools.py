"""Tokenizer export and the tools/convert_hf.py command line, end to end."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import sentencepiece as spm  # noqa: E402

from tests.helpers import REPO  # noqa: E402
from tweetjax.convert.hf_tokenizer import export_tokenizer, special_ids  # noqa: E402
from tweetjax.data.tokenizer import trainer_kwargs  # noqa: E402

WORDS = ("the cat sat on a mat and the dog ate my homework while tweeting about jax and flax every day "
         "héllo wörld 🐦").split()
TEXTS = ["the cat sat on a mat", "tweeting about jax", "héllo wörld 123 @user <url>", "dog\nnew line",
         "x@usery<sep>z", "emoji 🐦 ok", "unseen ßymbols ∑ ok"]


def train_sentencepiece(prefix: str, model_type: str) -> str:
  rng = random.Random(0)
  texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(1000)]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=prefix,
                                 **trainer_kwargs(300, model_type))
  return prefix + ".model"


@pytest.mark.parametrize("model_type, hf_class", [("bpe", "LlamaTokenizer"), ("unigram", "AutoTokenizer")])
def test_exported_tokenizer_encodes_like_sentencepiece(tmp_path, model_type, hf_class):
  model = train_sentencepiece(str(tmp_path / "sp"), model_type)
  export_tokenizer(model, str(tmp_path / "hf"))
  assert json.load(open(tmp_path / "hf" / "special_tokens_map.json")) == {
      "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
  assert special_ids(model) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
  tokenizer = getattr(transformers, hf_class).from_pretrained(str(tmp_path / "hf"), local_files_only=True)
  sp = spm.SentencePieceProcessor(model_file=model)
  for text in TEXTS:
    ids = tokenizer(text)["input_ids"]
    assert ids == [sp.bos_id()] + sp.encode(text), text
    assert tokenizer.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(text))


def run_tool(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one CPU device: the tool's default mesh
  result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_hf.py"), *args], env=env,
                          capture_output=True, text=True, cwd=REPO, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


@pytest.mark.slow
def test_command_line_import_then_bf16_export(tmp_path):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                    max_position_embeddings=512)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="20KB")
  tokenizer_model = train_sentencepiece(str(tmp_path / "sp"), "bpe")
  os.replace(tokenizer_model, tmp_path / "hf" / "tokenizer.model")

  out = run_tool("--mode=import", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}")
  assert f"--config=experiments/hf.py:{tmp_path / 'run'}" in out
  assert "--config.model.vocab_size=384" in out  # 300 padded to a multiple of 128
  assert json.loads(out.strip().splitlines()[-1])["peak_rss_mb"] > 0

  run_tool("--mode=export", f"--workdir={tmp_path / 'run'}", f"--hf_dir={tmp_path / 'export'}",
           "--dtype=bfloat16", "--max_shard_size=20KB")
  exported = json.load(open(tmp_path / "export" / "config.json"))
  assert (exported["vocab_size"], exported["torch_dtype"], exported["max_position_embeddings"]) == (300, "bfloat16",
                                                                                                  512)
  reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "export"), use_safetensors=True)
  original = model.state_dict()
  for name, tensor in reloaded.state_dict().items():
    assert tensor.dtype == torch.bfloat16, name
    np.testing.assert_array_equal(tensor.float().numpy(), original[name].bfloat16().float().numpy(), err_msg=name)
  tokenizer = transformers.LlamaTokenizer.from_pretrained(str(tmp_path / "export"), local_files_only=True)
  assert tokenizer("the cat")["input_ids"][0] == exported["bos_token_id"] == 1
