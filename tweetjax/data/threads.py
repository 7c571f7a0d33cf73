"""Joins the tweets of one conversation into one document, in time order, separated by ` <sep> `.

A tweet's conversation root is its `conversation_id` (API v2). Without one (v1.1, archive) the reply chain is
followed through `reply_to_id` over the tweets present in the data, at most `MAX_REPLY_DEPTH` links:
  a tweet is *terminal* if it has a conversation_id (root: that id) or no parent in the data (root: its own id);
  the root of any tweet is the root of the first terminal tweet on its chain within MAX_REPLY_DEPTH links, else
  the id of the tweet MAX_REPLY_DEPTH links up (reply cycles, or chains deeper than that).
The local engine walks the chain (`conversation_roots`); the Beam engine gets the same roots by pointer jumping
(`LOG2_MAX_REPLY_DEPTH` keyed rounds of `jump`), since after k rounds a pointer has moved min(2^k, distance to the
first terminal) links.

The joined document takes the root's id (so the whole thread lands in one split), the first tweet's
author/lang/created_at/topic/audience, and for each int label the max over its tweets (one toxic reply makes the
thread toxic; -1 only if all unknown).
"""

from typing import Any, Sequence

from tweetjax.data.formats import LABEL_INTS, Record
from tweetjax.data.normalize import SEP_TOKEN

LOG2_MAX_REPLY_DEPTH = 10
MAX_REPLY_DEPTH = 2**LOG2_MAX_REPLY_DEPTH


def _id_key(tweet_id: str) -> tuple[int, str]:
  return (len(tweet_id), tweet_id)  # numeric ids sort by length first, then lexically == numerically


def conversation_roots(records: Sequence[Record]) -> list[str]:
  by_id = {r["id"]: r for r in records}
  roots = []
  for r in records:
    cur = r
    for _ in range(MAX_REPLY_DEPTH):
      if cur["conversation_id"] or cur["reply_to_id"] not in by_id:
        break
      cur = by_id[cur["reply_to_id"]]
    roots.append(cur["conversation_id"] or cur["id"])
  return roots


# Pointer jumping (Beam). A node is (id, pointer, root): root set once resolved, else pointer = an ancestor's id.
Node = tuple[str, str, str]


def first_node(record: Record, parent_present: bool) -> Node:
  """The node of a tweet without conversation_id, given whether its parent is in the data (round 0)."""
  if parent_present:
    return record["id"], record["reply_to_id"], ""
  return record["id"], "", record["id"]


def pointer_target(record: Record, parent: Record | None) -> Node:
  """Round 0 with the parent looked up: a parent with a conversation_id resolves the tweet at once."""
  if parent is not None and parent["conversation_id"]:
    return record["id"], "", parent["conversation_id"]
  return first_node(record, parent is not None)


def jump(node: Node, target: Node) -> Node:
  """One pointer-jumping step of an unresolved `node` through the node it points to."""
  if target[2]:
    return node[0], "", target[2]
  return node[0], target[1], ""


def final_root(node: Node) -> str:
  return node[2] or node[1]


def join_group(root: str, tweets: Sequence[Record]) -> Record:
  """The document of one conversation (a single tweet stays itself, with num_tweets=1)."""
  if len(tweets) == 1:
    return {**tweets[0], "num_tweets": 1}
  tweets = sorted(tweets, key=lambda r: (r["created_at"], _id_key(r["id"])))
  doc = dict(tweets[0])
  doc["id"] = root
  doc["conversation_id"] = root
  doc["text"] = f" {SEP_TOKEN} ".join(t["text"] for t in tweets)
  doc["num_tweets"] = len(tweets)
  for k in LABEL_INTS:
    doc[k] = max(t[k] for t in tweets)
  return doc


def join_threads(records: Sequence[Record]) -> tuple[list[Record], int]:
  """Returns the documents (one per conversation) and the number of tweets merged away."""
  groups: dict[str, list[Record]] = {}
  for r, root in zip(records, conversation_roots(records)):
    groups.setdefault(root, []).append(r)
  return [join_group(root, tweets) for root, tweets in groups.items()], len(records) - len(groups)


def merged_count(docs: Sequence[dict[str, Any]]) -> int:
  return sum(d["num_tweets"] - 1 for d in docs)
