"""Eval-set files: what the builder writes from the synthetic corpus, and clear errors for bad files."""

import json
import os

import pytest

from tweetjax.evaluate import eval_sets
from tweetjax.evaluate.eval_sets import EvalSetError, read_jsonl, read_search


def test_built_sets_follow_the_schema(setup):
  d = setup.eval_dir
  flag_train = read_jsonl(os.path.join(d, "flagging_train.jsonl"), "flagging")
  flag_eval = read_jsonl(os.path.join(d, "flagging_eval.jsonl"), "flagging")
  assert sorted(flag_train[0]["labels"]) == sorted(eval_sets.FLAG_LABELS)
  for name in eval_sets.FLAG_LABELS:  # every label has positives and negatives on both sides
    for records in (flag_train, flag_eval):
      assert 0 < sum(r["labels"][name] for r in records) < len(records)
  assert not {r["id"] for r in flag_train} & {r["id"] for r in flag_eval}
  corpus, queries, train = read_search(d)
  texts = {doc["id"]: doc["text"].lower() for doc in corpus}
  for q in queries:  # each query's words come from its relevant tweet
    assert all(w in texts[q["relevant_id"]] for w in q["query"].split())
  assert len(train) > len(queries) > 50
  users = read_jsonl(os.path.join(d, "personalization.jsonl"), "personalization")
  assert len(users) == 40 and all(sum(c["engaged"] for c in u["candidates"]) == 2 for u in users)
  ads = read_jsonl(os.path.join(d, "adcopy.jsonl"), "adcopy")
  assert ads and all(a["audience"] != "general" and a["references"] for a in ads)


def test_refuses_to_overwrite(setup):
  with pytest.raises(EvalSetError, match="already holds"):
    eval_sets.build_eval_sets(setup.dataset_dir, setup.eval_dir)


def _write(tmp_path, name, lines):
  path = tmp_path / name
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
  return str(path)


@pytest.mark.parametrize("lines, kind, message", [
    ([{"id": "1", "text": "ok", "labels": {"toxicity": 1}}, "{not json"], "flagging",
     r"f\.jsonl:2: not valid JSON"),
    ([{"id": "1", "labels": {"toxicity": 1}}], "flagging", r"f\.jsonl:1: missing field 'text'"),
    ([{"id": "1", "text": "a", "labels": {"toxicity": 1}}, {"id": "2", "text": "b", "labels": {"toxicity": "yes"}}],
     "flagging", r"f\.jsonl:2: field 'labels.toxicity': expected 0 or 1, got \"yes\""),
    ([{"id": "1", "text": "a", "labels": {"toxicity": 1}}, {"id": "2", "text": "b", "labels": {"spam": 0}}],
     "flagging", r"f\.jsonl:2: field 'labels': has \['spam'\], the file's first line has \['toxicity'\]"),
    ([{"user_id": "u", "history": ["a"], "candidates": [{"id": "1", "text": "x", "engaged": 1},
                                                       {"id": "2", "text": "y"}]}],
     "personalization", r"f\.jsonl:1: missing field 'candidates\[1\]\.engaged'"),
    ([{"prompt": "p", "audience": "a", "product": "x", "references": []}], "adcopy",
     r"f\.jsonl:1: field 'references': expected a non-empty list"),
    ([], "adcopy", r"f\.jsonl: no records"),
])
def test_bad_files_name_file_line_and_field(tmp_path, lines, kind, message):
  path = _write(tmp_path, "f.jsonl", lines)
  with pytest.raises(EvalSetError, match=message):
    read_jsonl(path, kind)


def test_missing_file_and_dangling_relevant_id(tmp_path):
  with pytest.raises(EvalSetError, match=r"nope\.jsonl: eval-set file not found"):
    read_jsonl(str(tmp_path / "nope.jsonl"), "adcopy")
  _write(tmp_path, "search_corpus.jsonl", [{"id": "a", "text": "x y z"}, {"id": "b", "text": "u v w"}])
  _write(tmp_path, "search_queries.jsonl", [{"query": "x", "relevant_id": "a"}, {"query": "y", "relevant_id": "c"}])
  with pytest.raises(EvalSetError, match=r"search_queries\.jsonl:2: field 'relevant_id': 'c' is not an id"):
    read_search(str(tmp_path))
