"""Labeled eval sets of the product jobs: JSONL files with a fixed schema, built from a tweet dataset or your own.

Files in an eval-set directory (`config.eval.data_dir`), one JSON object per line, UTF-8:

  flagging_train.jsonl / flagging_eval.jsonl   content moderation (probe trained on _train, scored on _eval)
      {"id": str, "text": str, "labels": {"toxicity": 0|1, "spam": 0|1, "misinformation": 0|1}}
      Every line carries the same label names as the file's first line (any names: the job reads them from there).
  search_corpus.jsonl      the index          {"id": str, "text": str}            (ids unique)
  search_queries.jsonl     eval queries       {"query": str, "relevant_id": str}  (an id of search_corpus.jsonl)
  search_train.jsonl       head training      {"query": str, "text": str}         (optional: no head without it)
  personalization.jsonl    next engagement    {"user_id": str, "history": [str, ...],
                                               "candidates": [{"id": str, "text": str, "engaged": 0|1}, ...]}
  personalization_train.jsonl  head training  same schema, other users (optional: no head without it)
  adcopy.jsonl             ad generation      {"prompt": str, "audience": str, "product": str, "references": [str, ...]}

A missing file, a line that is not JSON, or a missing/mistyped field raises EvalSetError naming file, line and field.

`build_eval_sets(dataset_dir, out_dir)` derives all of them from a built tweet dataset (tweetjax.data.builder) whose
examples carry labels (toxicity/spam/misinformation, topic, audience), e.g. the synthetic corpus:
  flagging  labeled tweets of the train / validation split;
  search    a query of 3 content words drawn from a validation tweet, whose relevant item is that tweet, over an index
            of all validation tweets (train pairs built the same way from the train split);
  personalization  users who like 1-2 topics: a history of train tweets of their topics, candidates from validation
            of which the ones on their topics are engaged; personalization_train: other users (ids train_user*)
            whose histories and candidates are all train tweets, so the ranking head never sees an eval candidate;
  adcopy    one prompt per (audience, topic): an audience phrase and a product word; references are validation tweets
            of that audience and topic.
It also writes the product fine-tuning sets (ad copy, flagging as generation, replies; SFT JSONL with held-out
splits) under `<out_dir>/sft/`: tweetjax/evaluate/sft_sets.py.
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import Any, Callable, Sequence

FLAG_LABELS = ("toxicity", "spam", "misinformation")
FILES = ("flagging_train.jsonl", "flagging_eval.jsonl", "search_corpus.jsonl", "search_queries.jsonl",
         "search_train.jsonl", "personalization.jsonl", "personalization_train.jsonl", "adcopy.jsonl")
AUDIENCE_PHRASES = {"fans": "fellow fans,", "professionals": "industry note:", "parents": "as a parent,",
                    "investors": "for investors:", "general": ""}
_STOPWORDS = set("""the and for with that this what from have just about been more than your they them then there
were when will would could should into over very like every single time think near beats else anyone talk matters
thread can't believe again tonight today already finally right week morning people hours zero still
thinking about crew rating""".split())


class EvalSetError(ValueError):
  """A missing or malformed eval-set file; the message names file, line and field."""


# -- reading -----------------------------------------------------------------------------------------------------

def _is_str(v):
  return isinstance(v, str)


def _is_nonempty_str(v):
  return isinstance(v, str) and v.strip() != ""


def _is_binary(v):
  return isinstance(v, int) and not isinstance(v, bool) and v in (0, 1)


def _is_str_list(v):
  return isinstance(v, list) and len(v) > 0 and all(_is_nonempty_str(x) for x in v)


_EXPECT = {_is_str: "a string", _is_nonempty_str: "a non-empty string", _is_binary: "0 or 1",
           _is_str_list: "a non-empty list of non-empty strings"}

SCHEMAS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "flagging": {"id": _is_str, "text": _is_nonempty_str},
    "search_corpus": {"id": _is_nonempty_str, "text": _is_nonempty_str},
    "search_queries": {"query": _is_nonempty_str, "relevant_id": _is_nonempty_str},
    "search_train": {"query": _is_nonempty_str, "text": _is_nonempty_str},
    "personalization": {"user_id": _is_str, "history": _is_str_list},
    "adcopy": {"prompt": _is_str, "audience": _is_str, "product": _is_str, "references": _is_str_list},
}


def _check(path: str, line: int, record: Any, schema: dict[str, Callable[[Any], bool]], prefix: str = "") -> None:
  if not isinstance(record, dict):
    raise EvalSetError(f"{path}:{line}: expected a JSON object{' at ' + prefix if prefix else ''}, "
                       f"got {type(record).__name__}")
  for field, ok in schema.items():
    if field not in record:
      raise EvalSetError(f"{path}:{line}: missing field '{prefix}{field}'")
    if not ok(record[field]):
      raise EvalSetError(f"{path}:{line}: field '{prefix}{field}': expected {_EXPECT[ok]}, "
                         f"got {json.dumps(record[field], ensure_ascii=False)[:80]}")


def read_jsonl(path: str, kind: str) -> list[dict[str, Any]]:
  """Reads and validates one eval-set file against SCHEMAS[kind] (plus the nested checks of that kind)."""
  if not os.path.exists(path):
    raise EvalSetError(f"{path}: eval-set file not found (build the eval sets with `tools/evaluate.py "
                       "--build_eval_sets` or write it following tweetjax/evaluate/eval_sets.py)")
  records, label_names = [], None
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise EvalSetError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
      _check(path, line_no, record, SCHEMAS[kind])
      if kind == "flagging":
        labels = record.get("labels")
        if not isinstance(labels, dict) or not labels:
          raise EvalSetError(f"{path}:{line_no}: field 'labels': expected an object of label name -> 0 or 1")
        label_names = label_names or sorted(labels)
        if sorted(labels) != label_names:
          raise EvalSetError(f"{path}:{line_no}: field 'labels': has {sorted(labels)}, the file's first line has "
                             f"{label_names}")
        _check(path, line_no, labels, {name: _is_binary for name in label_names}, "labels.")
      if kind == "personalization":
        candidates = record.get("candidates")
        if not isinstance(candidates, list) or len(candidates) < 2:
          raise EvalSetError(f"{path}:{line_no}: field 'candidates': expected a list of at least 2 objects")
        for j, cand in enumerate(candidates):
          _check(path, line_no, cand, {"id": _is_str, "text": _is_nonempty_str, "engaged": _is_binary},
                 f"candidates[{j}].")
      records.append(record)
  if not records:
    raise EvalSetError(f"{path}: no records")
  return records


def read_search(data_dir: str) -> tuple[list[dict], list[dict], list[dict]]:
  """(corpus, queries, train pairs or []), with every relevant_id checked against the corpus."""
  corpus_path = os.path.join(data_dir, "search_corpus.jsonl")
  corpus = read_jsonl(corpus_path, "search_corpus")
  ids: dict[str, int] = {}
  for i, doc in enumerate(corpus):
    if doc["id"] in ids:
      raise EvalSetError(f"{corpus_path}:{i + 1}: field 'id': {doc['id']!r} repeats line {ids[doc['id']] + 1}")
    ids[doc["id"]] = i
  queries_path = os.path.join(data_dir, "search_queries.jsonl")
  queries = read_jsonl(queries_path, "search_queries")
  for i, q in enumerate(queries):
    if q["relevant_id"] not in ids:
      raise EvalSetError(f"{queries_path}:{i + 1}: field 'relevant_id': {q['relevant_id']!r} is not an id of "
                         f"{corpus_path}")
  train_path = os.path.join(data_dir, "search_train.jsonl")
  train = read_jsonl(train_path, "search_train") if os.path.exists(train_path) else []
  return corpus, queries, train


# -- building ----------------------------------------------------------------------------------------------------

def content_words(text: str) -> list[str]:
  """Lower-cased words that say what a tweet is about (no stopwords, handles, tokens, numbers, short words)."""
  words = []
  for w in text.lower().split():
    w = w.strip(".,!?:;\"'()…")
    if len(w) >= 4 and re.fullmatch(r"#?[^\W\d_][\w'-]*", w) and w.lstrip("#") not in _STOPWORDS:
      words.append(w)
  return list(dict.fromkeys(words))


def _write(path: str, records: Sequence[dict[str, Any]]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def _labeled(ex: dict[str, Any]) -> bool:
  return all(ex.get(k, -1) in (0, 1) for k in FLAG_LABELS)


def make_eval_sets(train: list[dict[str, Any]], validation: list[dict[str, Any]], seed: int = 0, *,
                   max_flagging_train: int = 2000, max_flagging_eval: int = 1000, max_search_queries: int = 200,
                   max_search_train: int = 2000, num_users: int = 40, history_size: int = 5,
                   num_candidates: int = 20, num_engaged: int = 2, num_train_users: int = 200,
                   references_per_prompt: int = 4
                   ) -> dict[str, list[dict[str, Any]]]:
  """The eval-set records (file name -> records) from dataset examples (dicts with text, id, labels, topic...)."""
  rng = random.Random(seed)
  out: dict[str, list[dict[str, Any]]] = {}
  flag = lambda ex: {"id": ex["id"], "text": ex["text"], "labels": {k: int(ex[k]) for k in FLAG_LABELS}}
  out["flagging_train.jsonl"] = [flag(ex) for ex in train if _labeled(ex)][:max_flagging_train]
  out["flagging_eval.jsonl"] = [flag(ex) for ex in validation if _labeled(ex)][:max_flagging_eval]

  def query_pairs(examples, limit):
    pairs = []
    for ex in rng.sample(examples, len(examples)):
      words = content_words(ex["text"])
      if len(words) >= 3:
        pairs.append((" ".join(rng.sample(words, 3)), ex))
      if len(pairs) == limit:
        break
    return pairs

  seen_text: set[str] = set()
  corpus = []
  for ex in validation:
    if ex["text"] not in seen_text:
      seen_text.add(ex["text"])
      corpus.append({"id": ex["id"], "text": ex["text"]})
  corpus_ids = {d["id"] for d in corpus}
  out["search_corpus.jsonl"] = corpus
  out["search_queries.jsonl"] = [{"query": q, "relevant_id": ex["id"]}
                                 for q, ex in query_pairs(validation, max_search_queries) if ex["id"] in corpus_ids]
  out["search_train.jsonl"] = [{"query": q, "text": ex["text"]} for q, ex in query_pairs(train, max_search_train)]

  by_topic_train: dict[str, list] = {}
  by_topic_val: dict[str, list] = {}
  for examples, by_topic in ((train, by_topic_train), (validation, by_topic_val)):
    for ex in examples:
      if ex.get("topic"):
        by_topic.setdefault(ex["topic"], []).append(ex)
  topics = sorted(set(by_topic_train) & set(by_topic_val))

  def make_users(rng, count, prefix, candidate_pool):
    users = []
    for u in range(count if len(topics) >= 3 else 0):
      liked = rng.sample(topics, rng.choice([1, 2]))
      history = [rng.choice(by_topic_train[rng.choice(liked)])["text"] for _ in range(history_size)]
      engaged = [rng.choice(candidate_pool[rng.choice(liked)]) for _ in range(num_engaged)]
      others = [t for t in topics if t not in liked]
      ignored = [rng.choice(candidate_pool[rng.choice(others)]) for _ in range(num_candidates - num_engaged)]
      candidates = [{"id": ex["id"], "text": ex["text"], "engaged": int(ex in engaged)} for ex in engaged + ignored]
      rng.shuffle(candidates)
      users.append({"user_id": f"{prefix}{u}", "liked_topics": liked, "history": history, "candidates": candidates})
    return users

  out["personalization.jsonl"] = make_users(rng, num_users, "user", by_topic_val)
  if num_train_users:  # Its own generator: training users leave every other file of a given seed unchanged.
    out["personalization_train.jsonl"] = make_users(random.Random(f"{seed}/personalization_train"),
                                                    num_train_users, "train_user", by_topic_train)

  groups: dict[tuple[str, str], list] = {}
  for ex in validation:
    if ex.get("audience") in AUDIENCE_PHRASES and ex["audience"] != "general" and ex.get("topic"):
      groups.setdefault((ex["audience"], ex["topic"]), []).append(ex["text"])
  prompts = []
  for (audience, topic), texts in sorted(groups.items()):
    if len(texts) >= 2:
      product = rng.choice(content_words(" ".join(texts)) or [topic])
      prompts.append({"prompt": f"{AUDIENCE_PHRASES[audience]} {product}".strip(), "audience": audience,
                      "product": product, "references": texts[:references_per_prompt]})
  out["adcopy.jsonl"] = prompts
  empty = sorted(name for name, records in out.items() if not records)
  if empty:
    raise EvalSetError(f"the dataset yields no records for {empty}: it needs labeled tweets (toxicity/spam/"
                       "misinformation, topic, audience) in both splits")
  return out


def build_eval_sets(dataset_dir: str, out_dir: str, seed: int = 0, overwrite: bool = False, **sizes) -> dict[str, int]:
  """Writes every eval-set file under `out_dir` from a built dataset, and the product fine-tuning sets under
  `out_dir/sft` (tweetjax/evaluate/sft_sets.py); refuses to replace files unless `overwrite`."""
  from tweetjax.data import pipeline  # pylint: disable=g-import-not-at-top  (pulls in grain and tfds)
  from tweetjax.evaluate import sft_sets  # pylint: disable=g-import-not-at-top  (it builds on this module)
  names = list(FILES) + [os.path.join(sft_sets.DIR, name) for name in sft_sets.FILES]
  existing = [name for name in names if os.path.exists(os.path.join(out_dir, name))]
  if existing and not overwrite:
    raise EvalSetError(f"{out_dir} already holds {existing}; pass overwrite=True (--overwrite) to replace them")
  train = pipeline.load_examples(dataset_dir, "train")
  validation = pipeline.load_examples(dataset_dir, "validation")
  if not train or not validation:
    raise EvalSetError(f"{dataset_dir}: needs non-empty train and validation splits "
                       f"(got {len(train)} and {len(validation)} examples)")
  records = make_eval_sets(train, validation, seed, **sizes)
  fine_tuning = sft_sets.make_sft_sets(train, validation, records["flagging_train.jsonl"],
                                       records["flagging_eval.jsonl"], seed)
  records.update({os.path.join(sft_sets.DIR, name): rows for name, rows in fine_tuning.items()})
  os.makedirs(os.path.join(out_dir, sft_sets.DIR), exist_ok=True)
  for name, rows in records.items():
    _write(os.path.join(out_dir, name), rows)
  for name in set(names) - set(records):  # a replaced build's fine-tuning set this dataset no longer yields
    if os.path.exists(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))
  return {name: len(rows) for name, rows in records.items()}


def data_dir_of(config) -> str:
  """config.eval.data_dir, or <config.data.dataset_dir>/eval_sets when it is empty."""
  if config.eval.data_dir:
    return str(config.eval.data_dir)
  if not config.data.dataset_dir:
    raise EvalSetError("set config.eval.data_dir (or config.data.dataset_dir, whose eval_sets/ is the default)")
  return os.path.join(str(config.data.dataset_dir), "eval_sets")
