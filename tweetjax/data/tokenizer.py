"""SentencePiece tokenizer wrapper (trained by tools/train_tokenizer.py).

Id layout of every tweetjax tokenizer: pad=0, bos=1, eos=2, unk=3, then the user-defined symbols
`<url> @user <sep> <email> <phone>` (each always one piece), then the learned pieces. byte_fallback is on, so no
text maps to unk: unseen characters become byte pieces and decode back exactly.
"""

import os
from typing import Sequence

import sentencepiece as spm

from tweetjax.data.normalize import SPECIAL_TOKENS

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def trainer_kwargs(vocab_size: int, model_type: str = "unigram") -> dict:
  """SentencePiece trainer options shared by the tool and the tests (so both produce the documented layout)."""
  return dict(
      vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
      pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
      user_defined_symbols=list(SPECIAL_TOKENS), character_coverage=0.9995,
      normalization_rule_name="identity",  # text is already NFC-normalized by tweetjax.data.normalize
      split_digits=True, allow_whitespace_only_pieces=True, num_threads=1,
      hard_vocab_limit=False,  # a small corpus yields fewer pieces instead of an error; vocab_size is an upper bound
      minloglevel=2)


class Tokenizer:
  """`Tokenizer(path)`: encode/decode single texts or batches; ids never include BOS/EOS (packing adds them)."""

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    if not path or not os.path.exists(path):
      raise FileNotFoundError(f"SentencePiece model not found: {path!r} (train one with tools/train_tokenizer.py "
                              "and point config.data.tokenizer_path at its .model file)")
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_file=path)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
    # one C++ call for the whole batch; num_threads=1 because the loader already runs one worker per core
    return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)

  def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
    return self._sp.decode([[int(i) for i in x] for x in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(i)

  def piece_to_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)


def train(texts, model_prefix: str, vocab_size: int = 8000, model_type: str = "unigram") -> str:
  """Trains on an iterable of (normalized) texts; returns the path of the .model file."""
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=model_prefix,
                                 **trainer_kwargs(vocab_size, model_type))
  return model_prefix + ".model"
