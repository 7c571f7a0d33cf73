"""Fine-tuning data: chat templates and special tokens, loss only on response tokens, bad lines counted and skipped
with file:line, packing with segment ids, exact resume, process-count independence, the hashed validation split."""

import collections
import json
import logging
import pathlib

import numpy as np
import pytest

from tests.helpers import load_config
from tweetjax.data import sft
from tweetjax.data.tokenizer import Tokenizer

TOK = str(pathlib.Path(__file__).parent / "fixtures" / "tokenizer.model")


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(TOK)


def _config(train_files, **sft_keys):
  config = load_config("tiny")
  config.data.update(source="sft", tokenizer_path=TOK, seq_len=64, global_batch_size=8, pack_window=16)
  config.data.sft.update(train_files=str(train_files), **sft_keys)
  return config


def _write(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      f.write((line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode()) + b"\n")
  return path


def test_template_special_tokens_and_loss_mask(tok):
  enc = sft.ChatEncoder(sft.TEMPLATES["sep"], tok)
  messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
              {"role": "assistant", "content": "bye"}]
  (ids, mask), = enc.encode_batch([messages])
  sep = tok.piece_to_id("<sep>")
  e = tok.encode
  want = (e("be brief") + [sep] + e("hi there") + [sep] + e("hello") + [tok.eos_id] + e("again") + [sep] + e("bye")
          + [tok.eos_id])
  assert ids == want
  trained = [i for i, m in zip(ids, mask) if m]
  assert trained == e("hello") + [tok.eos_id] + e("bye") + [tok.eos_id]  # every assistant turn and its end marker
  # The prompt of an assistant turn (text before {content}) is not trained; {bos} maps to the BOS id.
  custom = sft.ChatTemplate("{content}\n", "user: {content}\n", "{bos}assistant: {content}<sep>{eos}", ("<sep>",))
  (ids, mask), = sft.ChatEncoder(custom, tok).encode_batch([messages[1:3]])
  prefix = e("user: ") + e("hi there") + e("\n") + [tok.bos_id] + e("assistant: ")
  assert ids == prefix + e("hello") + [sep, tok.eos_id] and mask == [False] * len(prefix) + [True] * (len(ids) - len(prefix))
  full, first = sft.ChatEncoder(custom, tok).prompt_and_response(messages[1:2], "hello")
  assert full == [tok.bos_id] + ids and first == 1 + len(prefix)


def test_template_errors_name_the_key(tok, tmp_path):
  from tweetjax.config_check import RULES
  assert all(RULES["data.sft.template"].ok(name) for name in [*sft.TEMPLATES, "custom"])  # the rule knows them all
  with pytest.raises(ValueError, match="config.data.sft.user_format"):
    sft.ChatTemplate("{content}", "no content here", "{content}")
  with pytest.raises(ValueError, match=r"special_tokens: '<\|eot\|>' is not a piece"):
    sft.ChatEncoder(sft.ChatTemplate("{content}", "{content}", "{content}<|eot|>", ("<|eot|>",)), tok)
  config = _config(tmp_path / "x.jsonl")
  config.data.sft.template = "chatml"
  with pytest.raises(ValueError, match="config.data.sft.template='chatml'"):
    sft.ChatTemplate.from_config(config.data.sft)
  config.data.sft.update(template="plain", user_format="U: {content}")
  with pytest.raises(ValueError, match="config.data.sft.user_format is only read with .*custom"):
    sft.ChatTemplate.from_config(config.data.sft)


def test_bad_lines_are_counted_skipped_and_logged(tmp_path, caplog):
  path = _write(tmp_path / "mixed.jsonl", [
      {"prompt": "a", "response": "b"},
      b'{"prompt": "unterminated',                                     # malformed_json
      b'{"prompt": "x", "response": "bad \xff bytes"}',                 # invalid_utf8
      b"[1, 2]",                                                        # not_an_object
      {"text": "a tweet, not an example"},                             # unknown_format
      {"prompt": "a", "response": 3},                                  # wrong_type
      {"messages": [{"role": "robot", "content": "x"}]},               # wrong_type
      {"messages": [{"role": "user", "content": "only a question"}]},  # no_response
      {"prompt": "a", "response": "  "},                               # no_response
      b'{"prompt": "' + b"x" * (1 << 20) + b'", "response": "y"}',      # too_large
      {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "dropped: nothing learns from a trailing question"}]},
  ])
  stats = collections.Counter()
  with caplog.at_level(logging.WARNING):
    examples = sft.read_files(str(path), stats)
  assert len(examples) == 2 and examples[1][0][-1] == {"role": "assistant", "content": "a"}
  assert {k: v for k, v in stats.items() if v} == {"read": 11, "malformed_json": 1, "invalid_utf8": 1,
                                                   "not_an_object": 1, "unknown_format": 1, "wrong_type": 2,
                                                   "no_response": 2, "too_large": 1}
  assert f"{path}:2: malformed_json" in caplog.text and f"{path}:6: wrong_type" in caplog.text
  with pytest.raises(ValueError, match=f"{path}:2: malformed_json"):
    sft.read_files(str(path), collections.Counter(), strict=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """60 prompt/response examples and 20 chats; one too long for seq_len 64."""
  root = tmp_path_factory.mktemp("sft")
  rng = np.random.default_rng(0)
  words = "match pizza storm album stocks flight yoga laptop".split()
  lines = [{"prompt": f"ad for {w} #{i}", "response": " ".join(rng.choice(words, rng.integers(1, 12)))}
           for i, w in enumerate(words * 8)][:60]
  lines += [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i} yes"},
                          {"role": "user", "content": "and?"}, {"role": "assistant", "content": "no"}]}
            for i in range(20)]
  lines.append({"prompt": "long", "response": " ".join(["word"] * 200)})
  return _write(root / "train.jsonl", lines)


def _batches(it, n):
  return [next(it) for _ in range(n)]


def test_rows_train_only_on_responses(dataset, tok):
  config = _config(dataset, validation_fraction=0.0)
  splits, counts = sft.load(config)
  assert counts["too_long"] == 1 and counts["examples/train"] == 80 and "validation" not in splits
  # What each example should train on: its assistant turns and their {eos}, nothing of the prompts.
  encoded = sft.encoder_from_config(config).encode_batch([m for m, _, _ in sft.read_files(str(dataset),
                                                                                         collections.Counter())])
  want = collections.Counter(tuple(i for i, m in zip(ids, mask) if m) for ids, mask in encoded if len(ids) <= 64)
  chat = [tok.encode("a3 yes") + [tok.eos_id] + tok.encode("no") + [tok.eos_id]]
  assert want[tuple(chat[0])] == 1
  it = sft.SFTBatchIterator(splits["train"], tok, 64, 8, shuffle=False, num_epochs=1, pack_window=16)
  got = collections.Counter()
  for batch in it:
    for row in range(8):
      seg = batch["segment_ids"][row]
      assert np.all(batch["weights"][row][seg == 0] == 0)
      for s in range(1, seg.max() + 1):
        where = seg == s
        assert batch["inputs"][row][where][0] == tok.bos_id
        np.testing.assert_array_equal(batch["positions"][row][where], np.arange(where.sum()))
        got[tuple(batch["targets"][row][where & (batch["weights"][row] > 0)].tolist())] += 1
  assert got == want


def test_resume_and_process_independence(dataset, tok):
  split = sft.load(_config(dataset))[0]["train"]
  kw = dict(shuffle=True, shuffle_seed=3, pack_window=16)
  full = _batches(sft.SFTBatchIterator(split, tok, 64, 8, **kw), 8)  # > 1 epoch: the order is reshuffled
  it = sft.SFTBatchIterator(split, tok, 64, 8, **kw)
  _batches(it, 3)
  resumed = sft.SFTBatchIterator(split, tok, 64, 8, **kw)
  resumed.set_state(json.dumps(it.get_state()))
  for want, got in zip(full[3:], _batches(resumed, 5)):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])
  halves = [_batches(sft.SFTBatchIterator(split, tok, 64, 8, local_rows=slice(4 * p, 4 * p + 4), **kw), 8)
            for p in range(2)]
  for b, want in enumerate(full):
    for k in want:
      np.testing.assert_array_equal(np.concatenate([halves[0][b][k], halves[1][b][k]]), want[k])


def test_validation_split_by_hash(dataset):
  splits, counts = sft.load(_config(dataset, validation_fraction=0.3))
  again, _ = sft.load(_config(dataset, validation_fraction=0.3, normalize=False))  # another key: parsed anew
  n_train, n_val = len(splits["train"]), len(splits["validation"])
  assert n_train + n_val == 80 and 10 <= n_val <= 40
  assert (len(again["train"]), len(again["validation"])) == (n_train, n_val)
  assert counts["examples/validation"] == n_val and counts["trained_tokens/validation"] < counts["tokens/validation"]
