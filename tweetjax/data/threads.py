"""Joins the tweets of one conversation into one document, in time order, separated by ` <sep> `.

A tweet's conversation is its `conversation_id` (API v2); without one (v1.1, archive) the reply chain is followed
through `reply_to_id` up to the oldest ancestor present in the data. The joined document takes the conversation
root's id (so the whole thread lands in one split), the first tweet's author/lang/created_at/topic/audience, and
for each int label the max over its tweets (one toxic reply makes the thread toxic; -1 only if all unknown).
"""

from typing import Sequence

from tweetjax.data.formats import LABEL_INTS, Record
from tweetjax.data.normalize import SEP_TOKEN


def _id_key(tweet_id: str) -> tuple[int, str]:
  return (len(tweet_id), tweet_id)  # numeric ids sort by length first, then lexically == numerically


def conversation_roots(records: Sequence[Record]) -> list[str]:
  by_id = {r["id"]: r for r in records}
  roots = []
  for r in records:
    if r["conversation_id"]:
      roots.append(r["conversation_id"])
      continue
    cur, seen = r, set()
    while cur["reply_to_id"] in by_id and cur["id"] not in seen:  # `seen` guards against reply cycles
      seen.add(cur["id"])
      parent = by_id[cur["reply_to_id"]]
      if parent["conversation_id"]:
        cur = {"id": parent["conversation_id"], "reply_to_id": ""}
        break
      cur = parent
    roots.append(cur["id"])
  return roots


def join_threads(records: Sequence[Record]) -> tuple[list[Record], int]:
  """Returns the documents (threads joined, at the position of their first tweet) and the tweets merged away."""
  groups: dict[str, list[int]] = {}
  for i, root in enumerate(conversation_roots(records)):
    groups.setdefault(root, []).append(i)
  out, merged = [], 0
  for root, idx in groups.items():
    if len(idx) == 1:
      doc = dict(records[idx[0]])
      doc["num_tweets"] = 1
      out.append((idx[0], doc))
      continue
    tweets = sorted((records[i] for i in idx), key=lambda r: (r["created_at"], _id_key(r["id"])))
    doc = dict(tweets[0])
    doc["id"] = root
    doc["conversation_id"] = root
    doc["text"] = f" {SEP_TOKEN} ".join(t["text"] for t in tweets)
    doc["num_tweets"] = len(tweets)
    for k in LABEL_INTS:
      doc[k] = max(t[k] for t in tweets)
    out.append((min(idx), doc))
    merged += len(tweets) - 1
  out.sort(key=lambda x: x[0])
  return [d for _, d in out], merged
