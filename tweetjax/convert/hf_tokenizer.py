"""SentencePiece tokenizer files in the Hugging Face Llama layout (tokenizer.model + JSON configs).

Which HF class reads them: transformers>=5 builds `LlamaTokenizer` as a BPE tokenizer whatever the model file
holds, so a BPE SentencePiece model is declared `LlamaTokenizer`; a unigram one (the tweetjax default) is declared
`PreTrainedTokenizerFast`, which `AutoTokenizer` builds from the SentencePiece model's own type and normalizer
settings. Either way HF ids equal `[BOS] + SentencePiece ids` on normalized text (tweetjax text has no leading or
repeated spaces, which SentencePiece collapses and HF keeps).
"""

from __future__ import annotations

import json
import os
import shutil

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

_BPE = 2  # TrainerSpec.ModelType


def special_ids(model_path: str) -> dict[str, int | None]:
  """bos/eos/pad token ids of a SentencePiece model, as the HF model config names them (None when absent)."""
  sp = spm.SentencePieceProcessor(model_file=model_path)
  ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
  return {k: (v if v >= 0 else None) for k, v in ids.items()}


def export_tokenizer(model_path: str, out_dir: str, *, model_max_length: int = 4096) -> dict:
  """Copies the SentencePiece model and writes tokenizer_config.json and special_tokens_map.json.

  Encoding with the declared class gives [BOS] + the SentencePiece ids, the layout tweetjax packs documents in.
  """
  if not os.path.exists(model_path):
    raise FileNotFoundError(f"SentencePiece model {model_path!r} not found")
  sp = spm.SentencePieceProcessor(model_file=model_path)
  specials = {}
  for role, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()),
                  ("pad_token", sp.pad_id())):
    if i >= 0:
      specials[role] = sp.id_to_piece(i)
  proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
  is_bpe = proto.trainer_spec.model_type == _BPE
  os.makedirs(out_dir, exist_ok=True)
  shutil.copy(model_path, os.path.join(out_dir, "tokenizer.model"))
  config = {
      "tokenizer_class": "LlamaTokenizer" if is_bpe else "PreTrainedTokenizerFast",
      **specials,
      "add_bos_token": True,
      "add_eos_token": False,
      "clean_up_tokenization_spaces": False,
      "legacy": False,
      "model_max_length": int(model_max_length),
      "sp_model_kwargs": {},
      "spaces_between_special_tokens": False,
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump(specials, f, indent=2)
  return config
