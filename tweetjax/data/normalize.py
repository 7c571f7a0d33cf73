"""Tweet text normalization, applied at build time and again (idempotently) by the loader.

Steps, in order, each switchable through `NormalizeConfig` (== `config.data.normalize`):
  1. control characters (C0 except tab/newline, DEL) removed; always on.
  2. `unescape_html`: `&amp;` `&lt;` `&gt;` `&quot;` ... -> characters (the APIs return HTML-escaped text).
  3. `nfc`: Unicode NFC, so visually equal strings have equal bytes (dedup, tokenizer).
  4. `urls`: "token" replaces http(s) URLs (t.co links included) with `<url>`, "keep" leaves them, "remove" drops them.
  5. `scrub_pii` (default on): e-mail addresses -> `<email>`, phone numbers -> `<phone>`.
  6. `mentions`: "token" replaces `@handle` with `@user`, "keep" leaves it.
  7. `collapse_whitespace`: runs of whitespace (newlines included) -> one space, ends stripped.
Emoji and hashtags are always kept. The output is a fixed point: normalizing twice equals normalizing once.

`normalize_batch` runs each regex once over the batch joined by NUL (removed from texts in step 1) instead of
once per tweet: the per-call overhead of `re` dominates on 100-character strings.
"""

import dataclasses
import html
import re
import unicodedata
from typing import Any, Sequence

URL_TOKEN = "<url>"
USER_TOKEN = "@user"
SEP_TOKEN = "<sep>"
EMAIL_TOKEN = "<email>"
PHONE_TOKEN = "<phone>"
SPECIAL_TOKENS = (URL_TOKEN, USER_TOKEN, SEP_TOKEN, EMAIL_TOKEN, PHONE_TOKEN)


@dataclasses.dataclass(frozen=True)
class NormalizeConfig:
  unescape_html: bool = True
  nfc: bool = True
  urls: str = "token"  # "token" | "keep" | "remove"
  scrub_pii: bool = True
  mentions: str = "token"  # "token" | "keep"
  collapse_whitespace: bool = True

  def __post_init__(self):
    if self.urls not in ("token", "keep", "remove"):
      raise ValueError(f"normalize.urls must be 'token', 'keep' or 'remove', got {self.urls!r}")
    if self.mentions not in ("token", "keep"):
      raise ValueError(f"normalize.mentions must be 'token' or 'keep', got {self.mentions!r}")

  @classmethod
  def from_dict(cls, d: Any) -> "NormalizeConfig":
    """From a dict or ConfigDict (`config.data.normalize`); unknown keys are an error."""
    if d is None:
      return cls()
    if isinstance(d, NormalizeConfig):
      return d
    d = dict(d.items()) if hasattr(d, "items") else dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown normalize options {sorted(unknown)}; known: {sorted(names)}")
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


_CONTROL = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]")
_URL = re.compile(r"(?:https?://|www\.)[^\s\x00<>\"]+", re.IGNORECASE)
# Patterns start with a literal or a character set (lookbehinds come after the first character) so that `re`
# can skip ahead to candidate positions instead of trying every position of the batch.
_EMAIL_DOMAIN = re.compile(r"@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}(?![\w-])")  # local part found by _scrub_emails
_PHONE = re.compile(
    r"\+(?<![\w+-].)\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\w)"  # international: +44 20 7946 0958
    r"|\((?<![\w+-].)\d{3}\) ?\d{3}[ .-]\d{4}(?!\w)"  # (555) 123-4567
    r"|\d(?<![\w+-].)(?:\d{2}[ .-]\d{3}[ .-]\d{4}(?!\w)|\d{9}(?![\w-]))")  # 555-123-4567, 5551234567
_MENTION = re.compile(r"(?<![\w@.])@\w{1,15}(?!\w)")
_SPACE = re.compile(r"\s{2,}|[^\S ]")  # single spaces need no rewrite
_SEP_SPACE = re.compile(r" ?\x00 ?")


def _scrub_emails(s: str) -> str:
  """`local@domain.tld` -> <email>: the domain is matched from the '@' (fast literal scan), the local part
  ([\\w.+-]+) is walked back by hand; an '@' with nothing before it is a mention, not an e-mail."""
  out, last = [], 0
  for m in _EMAIL_DOMAIN.finditer(s):
    start = m.start()
    while start > last and (s[start - 1].isalnum() or s[start - 1] in "._+-"):
      start -= 1
    if start < m.start():
      out += (s[last:start], EMAIL_TOKEN)
      last = m.end()
  out.append(s[last:])
  return "".join(out)


def normalize_batch(texts: Sequence[str], config: NormalizeConfig = NormalizeConfig()) -> list[str]:
  """Normalizes many tweets at once; see the module docstring for the steps."""
  if not texts:
    return []
  s = "\x00".join(texts)
  if s.count("\x00") != len(texts) - 1:  # NUL is the batch separator: drop any inside the texts
    s = "\x00".join(t.replace("\x00", "") for t in texts)
  s = _CONTROL.sub("", s)
  if config.unescape_html and "&" in s:
    s = html.unescape(s)  # maps &#0; to U+FFFD, so the separator survives
  if config.nfc and not s.isascii():
    s = unicodedata.normalize("NFC", s)
  if config.urls != "keep":
    s = _URL.sub(URL_TOKEN if config.urls == "token" else "", s)
  if config.scrub_pii:
    if "@" in s:
      s = _scrub_emails(s)
    s = _PHONE.sub(PHONE_TOKEN, s)
  if config.mentions == "token" and "@" in s:
    s = _MENTION.sub(USER_TOKEN, s)
  if config.collapse_whitespace:
    s = _SEP_SPACE.sub("\x00", _SPACE.sub(" ", s)).strip(" ")
  out = s.split("\x00")
  assert len(out) == len(texts), "a regex ate the batch separator"
  return out


def normalize(text: str, config: NormalizeConfig = NormalizeConfig()) -> str:
  return normalize_batch([text], config)[0]
