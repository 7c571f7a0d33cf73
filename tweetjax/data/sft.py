"""Supervised fine-tuning data: prompt/response or chat JSONL -> chat template -> tokens with a loss mask -> packed rows.

Input (`config.data.sft.train_files`, `validation_files`: comma-separated JSONL files or directories), one JSON
object per line, UTF-8, in either form (other fields are ignored):
  {"prompt": str, "response": str[, "system": str]}                      one exchange
  {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}   a conversation
Every assistant turn is trained; messages after the last assistant turn are dropped (nothing would learn from
them). Bad lines never stop a run: they are skipped and counted by reason (SKIP_REASONS), and the first few of each
reason are logged as `file:line: reason`, like the tweet builder's skipped records. An example longer than
`seq_len` tokens is skipped as `too_long` (cut into rows it would train a response without its prompt).

Chat template (`config.data.sft.template`: a name of TEMPLATES, or "custom" with `{system,user,assistant}_format`):
each message is written as its role's format with `{content}` replaced. `{bos}` and `{eos}` are the tokenizer's
ids, and every string listed in `config.data.sft.special_tokens` is emitted as its single piece id (looked up in the
tokenizer, an error if it is not a piece), whatever the content text around it would tokenize to. Template text and
contents are tokenized as separate pieces, identically in training and evaluation (`ChatEncoder`).

Loss: an assistant turn trains on its content and what its format writes after it (the end-of-turn marker, e.g.
{eos}), not on the text before {content} (the prompt of the turn); system and user messages are never trained. In
the batch contract that is `weights` 0 on every other target.

Packing and order: examples are packed best-fit into rows of seq_len with segment ids (`packing.pack`, each example
`[BOS] + rendered`, no extra EOS), in windows of `config.data.pack_window` examples of a seeded shuffle that is
redone every epoch; the iterator state {"window", "row"} resumes exactly, every process computes the same windows
and keeps its own rows, so global batches do not depend on the process count (tweetjax/data/pipeline.py).
Validation: `validation_files`, or else the examples whose SHA-256 of their canonical JSON falls in
`validation_fraction` (stable across runs and machines; duplicates land in the same split).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
from typing import Any, Sequence

import numpy as np
from absl import logging

from tweetjax.data import builder, formats, normalize, packing, pipeline
from tweetjax.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
SKIP_REASONS = ("invalid_utf8", "too_large", "malformed_json", "not_an_object", "unknown_format", "wrong_type",
                "no_response", "too_long")
LOGGED_PER_REASON = 5  # bad lines logged with file:line per reason (all are counted)
Messages = list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """One format string per role, each with `{content}` once; see the module docstring."""
  system: str
  user: str
  assistant: str
  special_tokens: tuple[str, ...] = ()

  def __post_init__(self):
    for role in ROLES:
      fmt = getattr(self, role)
      fields = re.findall(r"\{([^{}]*)\}", fmt)
      if fields.count("content") != 1 or set(fields) - {"content", "bos", "eos"}:
        raise ValueError(f"config.data.sft.{role}_format={fmt!r}: expected '{{content}}' exactly once and no "
                         f"other fields than {{bos}} and {{eos}} (got {fields})")

  def parts(self, role: str) -> tuple[str, str]:
    """(text before {content}, text after it) of `role`'s format."""
    before, _, after = getattr(self, role).partition("{content}")
    return before, after

  @classmethod
  def from_config(cls, sft: Any) -> "ChatTemplate":
    name = str(sft.template)
    special = tuple(t.strip() for t in str(sft.special_tokens).split(",") if t.strip())
    if name == "custom":
      return cls(str(sft.system_format), str(sft.user_format), str(sft.assistant_format), special)
    if name not in TEMPLATES:
      raise ValueError(f"config.data.sft.template={name!r}: expected one of {sorted(TEMPLATES) + ['custom']}")
    formats_changed = [f"{r}_format" for r in ROLES if getattr(sft, f"{r}_format") != getattr(TEMPLATES["plain"], r)]
    if formats_changed:
      raise ValueError(f"config.data.sft.{formats_changed[0]} is only read with config.data.sft.template='custom' "
                       f"(template is {name!r})")
    template = TEMPLATES[name]
    return dataclasses.replace(template, special_tokens=tuple(dict.fromkeys(template.special_tokens + special)))


TEMPLATES = {
    # Turns end with a newline; an assistant turn with EOS, which the sampler stops at.
    "plain": ChatTemplate("{content}\n", "{content}\n", "{content}{eos}"),
    # tweetjax tokenizers' <sep> piece between turns.
    "sep": ChatTemplate("{content}<sep>", "{content}<sep>", "{content}{eos}", ("<sep>",)),
}


class ChatEncoder:
  """Renders conversations with a template into token ids and the trained-token mask."""

  def __init__(self, template: ChatTemplate, tokenizer: Tokenizer,
               normalize_config: normalize.NormalizeConfig | None = None):
    self.template, self.tokenizer, self.normalize_config = template, tokenizer, normalize_config
    special = {"{bos}": tokenizer.bos_id, "{eos}": tokenizer.eos_id}
    for token in template.special_tokens:
      piece_id = tokenizer.piece_to_id(token)
      if piece_id == tokenizer.unk_id or tokenizer.id_to_piece(piece_id) != token:
        raise ValueError(f"config.data.sft.special_tokens: {token!r} is not a piece of the tokenizer "
                         f"{tokenizer.path} (a special token must be one piece, e.g. a user-defined symbol)")
      special[token] = piece_id
    self._special = special
    pattern = re.compile("(" + "|".join(re.escape(s) for s in sorted(special, key=len, reverse=True)) + ")")
    self._parts = {role: tuple(self._encode_template(text, pattern) for text in template.parts(role))
                   for role in ROLES}

  def _encode_template(self, text: str, pattern: re.Pattern) -> list[int]:
    ids = []
    for piece in pattern.split(text):
      if piece in self._special:
        ids.append(self._special[piece])
      elif piece:
        ids.extend(self.tokenizer.encode(piece))
    return ids

  def encode_batch(self, conversations: Sequence[Messages]) -> list[tuple[list[int], list[bool]]]:
    """(ids, trained mask) per conversation, without BOS; contents tokenized in one batch call."""
    contents = [m["content"] for c in conversations for m in c]
    if self.normalize_config is not None:
      contents = normalize.normalize_batch(contents, self.normalize_config)
    content_ids = iter(self.tokenizer.encode_batch(contents))
    out = []
    for conversation in conversations:
      ids: list[int] = []
      mask: list[bool] = []
      for message in conversation:
        before, after = self._parts[message["role"]]
        body = next(content_ids) + after
        trained = message["role"] == "assistant"
        ids += before + body
        mask += [False] * len(before) + [trained] * len(body)
      out.append((ids, mask))
    return out

  def prompt_ids(self, prompt: Messages) -> list[int]:
    """[BOS] + the rendered conversation + the assistant format's text before {content}: what a fine-tuned model
    continues with its reply (which ends at the format's end marker, e.g. {eos})."""
    ids, _ = self.encode_batch([prompt])[0] if prompt else ([], [])
    return [self.tokenizer.bos_id] + ids + self._parts["assistant"][0]

  def prompt_and_response(self, prompt: Messages, response: str) -> tuple[list[int], int]:
    """[BOS] + the rendered conversation `prompt` + an assistant turn `response`, and the index of its first trained
    token: what evaluation scores, exactly as training weighted it."""
    ids, mask = self.encode_batch([prompt + [{"role": "assistant", "content": response}]])[0]
    return [self.tokenizer.bos_id] + ids, 1 + mask.index(True) if True in mask else 1 + len(ids)


class SkippedLine(ValueError):
  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}{': ' + detail if detail else ''}")
    self.reason = reason


def parse_record(record: Any) -> Messages:
  """One parsed JSON value -> its messages (trailing non-assistant turns dropped); SkippedLine when unusable."""
  if not isinstance(record, dict):
    raise SkippedLine("not_an_object", f"got {type(record).__name__}")
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise SkippedLine("wrong_type", "'messages' must be a non-empty list")
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
        raise SkippedLine("wrong_type", f"messages[{i}] must be {{'role': one of {list(ROLES)}, 'content': str}}")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
  elif "prompt" in record or "response" in record:
    if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
      raise SkippedLine("wrong_type", "'prompt' and 'response' must both be strings")
    if not isinstance(record.get("system", ""), str):
      raise SkippedLine("wrong_type", "'system' must be a string")
    messages = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + [
        {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
  else:
    raise SkippedLine("unknown_format", "expected 'prompt' and 'response', or 'messages'")
  last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
  if last < 0 or not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
    raise SkippedLine("no_response", "no non-empty assistant turn")
  return messages[:last + 1]


def parse_line(line: bytes) -> tuple[Messages, Any]:
  """(messages, the parsed JSON value) of one JSONL line; SkippedLine when unusable."""
  if len(line) >= formats.MAX_RECORD_BYTES:
    raise SkippedLine("too_large", f"{len(line)} bytes")
  try:
    text = line.decode("utf-8")
  except UnicodeDecodeError as e:
    raise SkippedLine("invalid_utf8", str(e)) from None
  try:
    value = json.loads(text)
  except ValueError as e:
    raise SkippedLine("malformed_json", str(e)) from None
  return parse_record(value), value


def read_files(paths: str | Sequence[str], stats: collections.Counter, strict: bool = False
               ) -> list[tuple[Messages, str, str]]:
  """(messages, canonical JSON, "file:line") of every usable line of the JSONL files (directories: their .jsonl
  files, sorted); bad lines are counted in `stats` by reason and logged (strict: the first raises, naming file:line)."""
  examples, logged = [], collections.Counter()
  for path in formats.list_inputs(paths):
    with open(path, "rb") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        stats["read"] += 1
        try:
          messages, value = parse_line(line.rstrip(b"\r\n"))
        except SkippedLine as skip:
          if strict:
            raise ValueError(f"{path}:{line_no}: {skip}") from None
          stats[skip.reason] += 1
          if logged[skip.reason] < LOGGED_PER_REASON:
            logging.warning("sft data: skipping %s:%d: %s", path, line_no, skip)
          logged[skip.reason] += 1
          continue
        examples.append((messages, json.dumps(value, sort_keys=True, ensure_ascii=False), f"{path}:{line_no}"))
  return examples


@dataclasses.dataclass
class TokenizedSplit:
  """Every example of one split as flat arrays: ids int32[T], trained bool[T], lengths int64[N], starts int64[N]."""
  ids: np.ndarray
  trained: np.ndarray
  lengths: np.ndarray

  def __post_init__(self):
    self.starts = np.cumsum(self.lengths) - self.lengths

  def __len__(self) -> int:
    return len(self.lengths)

  def gather(self, indices: Sequence[int]) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """packing.pack's (flat ids, lengths) input and the flat mask for the examples at `indices`."""
    idx = np.asarray(indices, np.int64)
    lengths = self.lengths[idx]
    offsets = np.repeat(self.starts[idx] - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
    return (self.ids[offsets], lengths), self.trained[offsets]


def _tokenize(examples: list[tuple[Messages, str, str]], encoder: ChatEncoder, seq_len: int,
              stats: collections.Counter, split: str) -> TokenizedSplit:
  ids, trained, lengths = [], [], []
  logged = 0
  for (ex_ids, ex_mask), (_, _, where) in zip(encoder.encode_batch([e[0] for e in examples]), examples):
    if len(ex_ids) > seq_len:  # [BOS] + ids gives len(ids) (input, target) pairs
      stats["too_long"] += 1
      if logged < LOGGED_PER_REASON:
        logging.warning("sft data: skipping %s: too_long: %d tokens > seq_len %d", where, len(ex_ids), seq_len)
      logged += 1
      continue
    ids.append(np.asarray(ex_ids, np.int32))
    trained.append(np.asarray(ex_mask, bool))
    lengths.append(len(ex_ids))
  stats[f"examples/{split}"] += len(lengths)
  stats[f"tokens/{split}"] += int(sum(lengths))
  stats[f"trained_tokens/{split}"] += int(sum(int(t.sum()) for t in trained))
  if not lengths:
    raise ValueError(f"sft data: no usable {split} example (counts: {dict(stats)}); see the logged file:line "
                     "reasons and tweetjax/data/sft.py for the expected format")
  cat = lambda xs, dtype: np.concatenate(xs) if xs else np.zeros(0, dtype)
  return TokenizedSplit(cat(ids, np.int32), cat(trained, bool), np.asarray(lengths, np.int64))


def encoder_from_config(config: Any, tokenizer: Tokenizer | None = None) -> ChatEncoder:
  """The chat encoder of `config.data.sft` (template, special tokens, normalization) and the config's tokenizer."""
  sft = config.data.sft
  tokenizer = tokenizer or Tokenizer(str(config.data.tokenizer_path))
  options = normalize.NormalizeConfig.from_dict(config.data.get("normalize")) if bool(sft.normalize) else None
  return ChatEncoder(ChatTemplate.from_config(sft), tokenizer, options)


@functools.lru_cache(maxsize=4)
def _load(config_json: str) -> tuple[dict[str, TokenizedSplit], dict[str, int]]:
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(json.loads(config_json))
  sft = config.data.sft
  if not str(sft.train_files):
    raise ValueError("config.data.source='sft' needs config.data.sft.train_files (JSONL, see tweetjax/data/sft.py)")
  fraction = float(sft.validation_fraction)
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"config.data.sft.validation_fraction={fraction}: expected a fraction in [0, 1)")
  stats = collections.Counter()
  train = read_files(str(sft.train_files), stats)
  if str(sft.validation_files):
    validation = read_files(str(sft.validation_files), stats)
  else:
    by_split = {"train": [], "validation": []}
    for example in train:
      by_split[builder.split_of(example[1], fraction)].append(example)
    train, validation = by_split["train"], by_split["validation"]
  encoder = encoder_from_config(config)
  seq_len = int(config.data.seq_len)
  splits = {"train": _tokenize(train, encoder, seq_len, stats, "train")}
  if validation:
    splits["validation"] = _tokenize(validation, encoder, seq_len, stats, "validation")
  counts = {k: stats.get(k, 0) for k in ("read", *SKIP_REASONS)} | {k: v for k, v in stats.items() if "/" in k}
  logging.info("sft data (%s): %s", sft.train_files, json.dumps(counts))
  return splits, counts


def load(config: Any) -> tuple[dict[str, TokenizedSplit], dict[str, int]]:
  """The tokenized splits of `config.data.sft` and the counts (read, skipped by reason, examples and tokens per
  split). Cached per process: the train and validation iterators of one run parse the files once."""
  keys = {"data": {k: config.data[k] for k in ("seq_len", "tokenizer_path")} |
          {"normalize": config.data.normalize.to_dict(), "sft": config.data.sft.to_dict()}}
  stamp = [(str(p), os.path.getmtime(p)) for key in ("train_files", "validation_files")
           for p in formats.list_inputs(str(config.data.sft[key]))]
  return _load(json.dumps({**keys, "stamp": stamp}, sort_keys=True))


class SFTBatchIterator(pipeline.WindowRowIterator):
  """Packed fine-tuning batches of one split (this process's rows); state {"window", "row"}."""

  def __init__(self, split: TokenizedSplit, tokenizer: Tokenizer, seq_len: int, global_batch_size: int, *,
               shuffle: bool = True, shuffle_seed: int = 0, num_epochs: int | None = None, pack_window: int = 4096,
               local_rows: slice | None = None):
    self.split, self.tokenizer = split, tokenizer
    order = pipeline.record_order(len(split), shuffle=shuffle, shuffle_seed=shuffle_seed, num_epochs=num_epochs)
    super().__init__(order.batch(pack_window).map(self._pack_window), seq_len, global_batch_size, tokenizer.pad_id,
                     local_rows)

  def _pack_window(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    flat, mask = self.split.gather(indices)
    tok = self.tokenizer
    return packing.pack(flat, self.seq_len, tok.bos_id, tok.eos_id, tok.pad_id, add_eos=False, loss_masks=mask)


def make_iterator(config: Any, mesh, split: str = "train") -> pipeline.GlobalBatchIterator:
  """Global batches for `config.data.source == "sft"`: train repeats (config.data.num_epochs, 0 = forever),
  validation is one unshuffled pass with the last batch padded."""
  from tweetjax.parallel.rules import batch_sharding  # pylint: disable=g-import-not-at-top
  splits, _ = load(config)
  if split not in splits:
    raise ValueError(f"sft data has no {split!r} examples (config.data.sft.validation_files is empty and "
                     f"validation_fraction={config.data.sft.validation_fraction} held out none)")
  sharding = batch_sharding(mesh)
  B, L = int(config.data.global_batch_size), int(config.data.seq_len)
  train = split == "train"
  local = SFTBatchIterator(
      splits[split], Tokenizer(str(config.data.tokenizer_path)), L, B, shuffle=train,
      shuffle_seed=int(config.data.shuffle_seed), num_epochs=(int(config.data.num_epochs) or None) if train else 1,
      pack_window=int(config.data.pack_window), local_rows=pipeline.process_rows(sharding, B, L))
  return pipeline.GlobalBatchIterator(local, sharding)
