"""A deterministic synthetic Twitter corpus in every supported export format (the embedded default dataset).

`generate(out_dir, num_tweets=20_000, seed=0)` writes, under `out_dir`:
  v2/page_*.json            API v2 responses (one per file) with includes.users / includes.tweets and meta
  v2/stream.jsonl           API v2 responses, one per line
  v1/statuses.json          API v1.1 statuses (array); v1/search.json: `{"statuses": [...]}`
  archive/data/tweets.js    account archive of one user
  inhouse/tweets.csv        in-house dump with label columns; inhouse/tweets.jsonl the same as JSONL
  corrupt/bad_records.jsonl deliberately broken records (see CORRUPT_COUNTS) so builds show skip counts
The text has learnable structure: 8 topics with their own vocabulary and hashtags, templates per language
(en, es, fr, de, ja), and wording correlated with the labels (insults -> toxicity, prizes/links -> spam,
conspiracy phrases -> misinformation, audience phrases -> audience). It includes conversations (replies with
conversation_id / in_reply_to ids), retweets, quotes, exact and near duplicates, URLs, mentions, hashtags, HTML
entities, long tweets (v2 note_tweet, v1.1 extended_tweet) and e-mails/phones for the PII scrub.
About 10% of tweets carry no labels (-1 / "").
"""

import csv
import datetime
import json
import random
from typing import Any

from etils import epath

TOPICS = {
    "sports": ("match goal striker coach league season playoffs stadium referee transfer keeper derby".split(),
               "#football #NBA #matchday #derby".split()),
    "tech": ("laptop compiler startup GPU framework bug release kernel database API chip robot".split(),
             "#tech #AI #coding #opensource".split()),
    "food": ("pizza ramen bakery recipe taco curry espresso brunch dumplings salad noodles croissant".split(),
             "#foodie #recipe #brunch #yum".split()),
    "weather": ("storm rain heatwave snow forecast thunder fog breeze humidity hail sunrise drought".split(),
                "#weather #storm #heatwave #forecast".split()),
    "music": ("album concert guitar playlist chorus drummer festival vinyl setlist singer remix tour".split(),
              "#music #nowplaying #livemusic #vinyl".split()),
    "finance": ("stocks inflation bitcoin dividend portfolio earnings bonds rates market budget ETF yield".split(),
                "#stocks #investing #crypto #markets".split()),
    "travel": ("flight airport hostel beach passport train luggage museum island roadtrip hotel visa".split(),
               "#travel #wanderlust #roadtrip #vacation".split()),
    "health": ("workout vaccine sleep vitamins yoga marathon diet clinic therapy hydration protein cardio".split(),
               "#health #fitness #wellness #yoga".split()),
}
ADJ = "amazing terrible wild underrated overrated brilliant chaotic beautiful boring insane perfect weird".split()
TIMES = ["today", "tonight", "this morning", "right now", "this week", "again", "finally", "already"]
AUDIENCES = {
    "general": ["", "", "honestly", "ngl"],
    "fans": ["fellow fans,", "to all the supporters:", "true fans know"],
    "professionals": ["for my fellow engineers:", "industry note:", "as a professional,"],
    "parents": ["as a parent,", "moms and dads:", "my kids say"],
    "investors": ["for investors:", "portfolio update:", "not financial advice but"],
}
TEMPLATES = {
    "en": ["{aud} can't believe the {n1} was {adj} {time}! {tag}",
           "{aud} just tried a {adj} {n1} near the {n2}. {tag}",
           "anyone else think the {n1} is {adj} {time}? {tag}",
           "{aud} hot take: {n1} beats {n2} every single time {tag}",
           "{time} we talk {n1} and {n2} with @{handle} {url}",
           "the {n1} and the {n2} {time}... {adj}. {tag}",
           "thread on why the {n1} matters more than the {n2} {tag}"],
    "es": ["{aud} el {n1} estuvo {adj} hoy! {tag}", "alguien más piensa que el {n1} es mejor que el {n2}? {tag}",
           "hoy hablamos de {n1} con @{handle} {url}"],
    "fr": ["{aud} le {n1} était incroyable ce soir ! {tag}", "qui pense que le {n1} est mieux que le {n2} ? {tag}",
           "on parle de {n1} avec @{handle} {url}"],
    "de": ["{aud} das {n1} war heute großartig! {tag}", "wer findet auch, dass {n1} besser als {n2} ist? {tag}",
           "heute reden wir über {n1} mit @{handle} {url}"],
    "ja": ["今日の{n1}は最高でした！ {tag}", "{n1}と{n2}、どっちが好き？ {tag}", "@{handle} さんと{n1}について話しました {url}"],
}
CLAUSES = {
    "en": ["the {n1} was {adj}", "{num} people at the {n1} {time}", "still thinking about that {adj} {n2}",
           "my {n1} is {adj} lol", "who else saw the {n1}?", "rating the {n2}: {num}/10", "the {n2} {time} 😂",
           "not the {n1} again 🙄", "{num} hours of {n1} and zero {n2}", "the {n1} crew is {adj}"],
    "es": ["el {n1} fue {adj}", "{num} personas en el {n2}", "otra vez el {n1} 😂", "nota del {n2}: {num}/10"],
    "fr": ["le {n1} était {adj}", "{num} personnes au {n2}", "encore le {n1} 😂", "note du {n2} : {num}/10"],
    "de": ["das {n1} war {adj}", "{num} Leute beim {n2}", "schon wieder {n1} 😂", "{n2}: {num}/10"],
    "ja": ["{n1}が最高", "{num}人が{n2}に来た", "また{n1} 😂", "{n2}は{num}点"],
}
LANG_WEIGHTS = {"en": 80, "es": 8, "fr": 6, "de": 4, "ja": 2}
TOXIC = ["you absolute idiot", "what a pathetic clown", "shut up loser", "trash take from a moron",
         "nobody cares, dumbass"]
SPAM = ["FREE {prize}!!! click {url} now", "WIN a {prize} - DM us, limited offer {url}",
        "earn $500/day from home, email {email} or call {phone}", "cheap followers {url} {url}"]
PRIZES = "iPhone giftcard vacation laptop crypto".split()
MISINFO = ["they don't want you to know the {n1} causes {n2}", "doctors hide this: {n1} cures everything",
           "the {n1} was staged, wake up", "leaked: {n2} is controlled by the {n1} elites"]
REPLIES = ["totally agree about the {n1}", "no way, the {n2} is better", "lol this is so {adj}",
           "source? the {n1} thing sounds {adj}", "same here {time}", "@{handle} you need to see this"]
CORRUPT_COUNTS = {"malformed_json": 3, "wrong_type": 2, "missing_text": 2, "invalid_utf8": 2, "too_large": 1}
_T0 = datetime.datetime(2023, 3, 1, tzinfo=datetime.timezone.utc)


def _phone(rng: random.Random) -> str:
  return rng.choice([f"({rng.randint(200, 999)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}",
                     f"+44 20 {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}"])


def _url(rng: random.Random) -> str:
  return "https://t.co/" + "".join(rng.choice("abcdefghijkmnpqrstuvwxyzABCDEFGH0123456789") for _ in range(10))


def _fill(s: str, rng: random.Random, topic: str, handles: list[str]) -> str:
  nouns, tags = TOPICS[topic]
  n1, n2 = rng.sample(nouns, 2)
  return s.format(n1=n1, n2=n2, adj=rng.choice(ADJ), time=rng.choice(TIMES), tag=rng.choice(tags),
                  handle=rng.choice(handles), url=_url(rng), prize=rng.choice(PRIZES),
                  email=f"{rng.choice(handles).lower()}@{rng.choice(['gmail.com', 'mail.example.org'])}",
                  phone=_phone(rng), num=rng.randint(2, 99))


def _clauses(rng: random.Random, lang: str, topic: str, handles: list[str]) -> str:
  return " ".join(_fill(rng.choice(CLAUSES[lang]), rng, topic, handles) for _ in range(rng.randint(1, 3)))


def _text(rng: random.Random, handles: list[str]) -> tuple[str, str, dict[str, Any], str]:
  lang = rng.choices(list(LANG_WEIGHTS), list(LANG_WEIGHTS.values()))[0]
  topic = rng.choice(list(TOPICS))
  audience = rng.choice(list(AUDIENCES))
  tox, spam, mis = rng.random() < 0.08, rng.random() < 0.07, rng.random() < 0.06
  aud_phrase = rng.choice(AUDIENCES[audience]) if lang != "ja" else ""
  text = _fill(rng.choice(TEMPLATES[lang]).replace("{aud}", aud_phrase), rng, topic, handles)
  text = text + " " + _clauses(rng, lang, topic, handles) if rng.random() < 0.5 else (
      _clauses(rng, lang, topic, handles) + " " + text)
  if mis:
    text = _fill(rng.choice(MISINFO), rng, topic, handles) + ". " + text
  if tox:
    text += " " + rng.choice(TOXIC)
  if spam:
    text += " " + _fill(rng.choice(SPAM), rng, topic, handles)
  if rng.random() < 0.03:
    text += f" contact me at {rng.choice(handles).lower()}@example.com or {_phone(rng)}"
  if rng.random() < 0.05:
    text = text.replace(" and ", " &amp; ", 1) + " &lt;3"
  if rng.random() < 0.02:  # long-form tweet: only note_tweet / extended_tweet carry all of it
    text = " ".join([text] + [_fill(rng.choice(TEMPLATES["en"]).replace("{aud}", ""), rng, topic, handles)
                              for _ in range(6)])
  labels = {"toxicity": int(tox), "spam": int(spam), "misinformation": int(mis), "topic": topic,
            "audience": audience}
  if rng.random() < 0.1:
    labels = {}
  return " ".join(text.split()), lang, labels, topic


def make_tweets(num_tweets: int, seed: int,
                first_index: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
  """Canonical tweets (format-independent) and users; tweet i gets id and time of tweet `first_index + i`."""
  rng = random.Random(seed)
  users = [{"id": str(10_000 + i), "username": f"user{i}_{rng.choice(['x', 'dev', 'fan', 'io'])}"}
           for i in range(400)]
  handles = [u["username"] for u in users]
  tweets: list[dict[str, Any]] = []
  while len(tweets) < num_tweets:
    i = len(tweets)
    g = first_index + i
    t = {"id": str(1_630_000_000_000_000_000 + g * 7919 + rng.randint(0, 999)), "author": rng.choice(users),
         "time": _T0 + datetime.timedelta(seconds=37 * g), "reply_to": "", "conversation_id": "", "kind": "post"}
    r = rng.random()
    if tweets and r < 0.12:  # reply into a recent conversation
      parent = tweets[rng.randrange(max(0, i - 30), i)]
      if parent["kind"] in ("post", "reply"):
        t.update(kind="reply", reply_to=parent["id"], conversation_id=parent["conversation_id"] or parent["id"],
                 text=_fill(rng.choice(REPLIES), rng, parent["topic"], handles) + " " + _clauses(
                     rng, "en", parent["topic"], handles), lang="en",
                 labels={**parent["labels"], "toxicity": 0, "spam": 0, "misinformation": 0} if parent["labels"]
                 else {}, topic=parent["topic"])
    elif tweets and r < 0.17:  # retweet
      orig = tweets[rng.randrange(i)]
      t.update(kind="retweet", retweet_of=orig, text=f"RT @{orig['author']['username']}: {orig['text']}",
               lang=orig["lang"], labels=orig["labels"], topic=orig["topic"])
    elif tweets and r < 0.19:  # exact duplicate (copy-paste bots)
      orig = tweets[rng.randrange(i)]
      t.update(text=orig["text"], lang=orig["lang"], labels=orig["labels"], topic=orig["topic"])
    elif tweets and r < 0.21:  # near duplicate
      orig = tweets[rng.randrange(i)]
      t.update(text=orig["text"] + rng.choice(["!!", " 🔥", " (repost)", " #2"]), lang=orig["lang"],
               labels=orig["labels"], topic=orig["topic"])
    elif tweets and r < 0.23:  # quote
      orig = tweets[rng.randrange(i)]
      text, lang, labels, topic = _text(rng, handles)
      t.update(kind="quote", quote_of=orig, text=f"{text} {_url(rng)}", lang=lang, labels=labels, topic=topic)
    if "text" not in t:
      text, lang, labels, topic = _text(rng, handles)
      t.update(text=text, lang=lang, labels=labels, topic=topic)
    if t["kind"] == "post" and not t["conversation_id"]:
      t["conversation_id"] = t["id"]
    tweets.append(t)
  return tweets, users


def _v2(t: dict[str, Any]) -> dict[str, Any]:
  text = t["text"]
  out = {"id": t["id"], "author_id": t["author"]["id"], "lang": t["lang"],
         "created_at": t["time"].strftime("%Y-%m-%dT%H:%M:%S.000Z"), "conversation_id": t["conversation_id"] or t["id"],
         "public_metrics": {"retweet_count": len(text) % 7, "like_count": len(text) % 13},
         "entities": {"mentions": [{"username": w[1:]} for w in text.split() if w.startswith("@")]}}
  if len(text) > 280:
    out["note_tweet"] = {"text": text}
    text = text[:279] + "…"
  out["text"] = text
  refs = []
  if t["kind"] == "reply":
    refs.append({"type": "replied_to", "id": t["reply_to"]})
  if t["kind"] == "retweet":
    refs.append({"type": "retweeted", "id": t["retweet_of"]["id"]})
  if t["kind"] == "quote":
    refs.append({"type": "quoted", "id": t["quote_of"]["id"]})
  if refs:
    out["referenced_tweets"] = refs
  if t["labels"]:
    out["labels"] = t["labels"]
  return out


def _v1(t: dict[str, Any], archive: bool = False) -> dict[str, Any]:
  text = t["text"]
  out = {"id": int(t["id"]), "id_str": t["id"], "lang": t["lang"],
         "created_at": t["time"].strftime("%a %b %d %H:%M:%S +0000 %Y"),
         "entities": {"hashtags": [{"text": w[1:]} for w in text.split() if w.startswith("#")]}}
  if not archive:
    out["user"] = {"id": int(t["author"]["id"]), "id_str": t["author"]["id"], "screen_name": t["author"]["username"]}
  if len(text) > 280:
    out.update(truncated=True, text=text[:279] + "…", extended_tweet={"full_text": text})
  else:
    out["full_text" if archive or len(text) % 2 else "text"] = text
  if t["kind"] == "reply":
    out["in_reply_to_status_id_str"] = t["reply_to"]
  if t["kind"] == "retweet":
    out["retweeted_status"] = _v1(t["retweet_of"])
  if t["kind"] == "quote":
    out["is_quote_status"] = True
    out["quoted_status_id_str"] = t["quote_of"]["id"]
  if t["labels"] and not archive:
    out["labels"] = t["labels"]
  return out


def _row(t: dict[str, Any]) -> dict[str, Any]:
  labels = t["labels"]
  return {"id": t["id"], "text": t["text"], "author_id": t["author"]["id"],
          "created_at": t["time"].strftime("%Y-%m-%dT%H:%M:%SZ"), "lang": t["lang"],
          "conversation_id": t["conversation_id"], "reply_to_id": t["reply_to"],
          **{k: labels.get(k, "") for k in ("toxicity", "spam", "misinformation", "topic", "audience")}}


def _corrupt_lines() -> list[bytes]:
  good = json.dumps({"id": "1", "text": "a valid line so the file is recognised"}).encode()
  return [good, good[:20], good[:-1], b'{"id": 5, "text": "unterminated', b'{"id": "6", "text": 123}', b"42",
          b'{"id": "8"}', b'{"id": "9", "text": ""}', b'{"id": "10", "text": "bad \xff\xfe bytes"}',
          b'{"id": "11", "text": "\xc3\x28"}', b'{"id": "12", "text": "' + b"x" * (1 << 20) + b'"}']


def generate(out_dir: str | epath.Path, num_tweets: int = 20_000, seed: int = 0,
             first_index: int = 0) -> dict[str, int]:
  """Writes the corpus; returns how many tweets went to each format. Corpora with disjoint [first_index,
  first_index + num_tweets) have disjoint ids, so large corpora can be written a part at a time."""
  out = epath.Path(out_dir)
  tweets, users = make_tweets(num_tweets, seed, first_index)
  rng = random.Random(seed + 1)
  archive_user = users[0]
  groups: dict[str, list] = {"v2": [], "v2_stream": [], "v1": [], "v1_search": [], "archive": [], "csv": [],
                             "jsonl": []}
  for t in tweets:
    if t["author"] is archive_user:
      groups["archive"].append(t)
    else:
      groups[rng.choices(list(groups)[:2] + list(groups)[2:4] + list(groups)[5:], [30, 20, 15, 10, 10, 15])[0]
             ].append(t)
  user_by_id = {u["id"]: u for u in users}
  for sub in ("v2", "v1", "archive/data", "inhouse", "corrupt"):
    (out / sub).mkdir(parents=True, exist_ok=True)

  def response(page):
    authors = sorted({t["author"]["id"] for t in page})
    refs = [t.get("retweet_of") or t.get("quote_of") for t in page]
    return {"data": [_v2(t) for t in page],
            "includes": {"users": [user_by_id[a] for a in authors], "tweets": [_v2(r) for r in refs if r]},
            "meta": {"result_count": len(page), "newest_id": page[-1]["id"], "oldest_id": page[0]["id"]}}

  for p in range(0, len(groups["v2"]), 100):
    (out / "v2" / f"page_{p // 100:04d}.json").write_text(json.dumps(response(groups["v2"][p:p + 100])))
  (out / "v2" / "stream.jsonl").write_text("".join(
      json.dumps(response(groups["v2_stream"][p:p + 50]), ensure_ascii=False) + "\n"
      for p in range(0, len(groups["v2_stream"]), 50)))
  (out / "v1" / "statuses.json").write_text(json.dumps([_v1(t) for t in groups["v1"]]))
  (out / "v1" / "search.json").write_text(json.dumps({"statuses": [_v1(t) for t in groups["v1_search"]],
                                                      "search_metadata": {"count": len(groups["v1_search"])}}))
  (out / "archive" / "data" / "tweets.js").write_text(
      "window.YTD.tweets.part0 = " + json.dumps([{"tweet": _v1(t, archive=True)} for t in groups["archive"]],
                                                indent=1, ensure_ascii=False))
  with open(out / "inhouse" / "tweets.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(_row(tweets[0])))
    writer.writeheader()
    writer.writerows(_row(t) for t in groups["csv"])
  (out / "inhouse" / "tweets.jsonl").write_text("".join(
      json.dumps(_row(t), ensure_ascii=False) + "\n" for t in groups["jsonl"]))
  (out / "corrupt" / "bad_records.jsonl").write_bytes(b"\n".join(_corrupt_lines()) + b"\n")
  return {k: len(v) for k, v in groups.items()}
