"""Tweet text normalization, applied at build time; the loader applies it again only where its options differ.

Steps, in order, each switchable through `NormalizeConfig` (== `config.data.normalize`):
  1. control characters (C0 except tab/newline, DEL) removed; always on.
  2. `unescape_html`: `&amp;` `&lt;` `&gt;` `&quot;` ... -> characters (the APIs return HTML-escaped text).
  3. `nfc`: Unicode NFC, so visually equal strings have equal bytes (dedup, tokenizer).
  4. `urls`: "token" replaces http(s) URLs (t.co links included) with `<url>`, "keep" leaves them, "remove" drops them.
  5. `scrub_pii` (default on): e-mail addresses -> `<email>`, phone numbers -> `<phone>`.
  6. `mentions`: "token" replaces `@handle` with `@user`, "keep" leaves it.
  7. `collapse_whitespace`: runs of whitespace (newlines included) -> one space, ends stripped.
Emoji and hashtags are always kept. Normalizing twice nearly always equals normalizing once; known exceptions:
double-escaped entities (`&amp;lt;` -> `&lt;` -> `<`), a phone number glued to the end of another (its start is a
word character until the first becomes `<phone>`), a mention followed by a combining mark (NFC then composes it with
the `r` of `@user`). So the loader does not re-normalize text that the build normalized with the same options.

Speed (the loader and the builder normalize every tweet): `normalize_batch` runs each step once over the batch joined
by NUL (removed from texts in step 1) instead of once per tweet, since the per-call overhead of `re` dominates on
100-character strings; every pattern starts with a literal or a small character set, so `re` jumps to candidate
positions instead of trying each one; and pure-ASCII tweets (most of them) are joined apart from the others, so
their string is 1 byte per character, skips NFC and the Unicode whitespace scan, and is matched by ASCII versions of
the patterns (re.ASCII, `0-9` for `\\d`, URL prefixes as literals on a lower-cased copy), which mean the same there.
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
# Bump when `normalize_batch` gives another output for some input and options: builds record it, and the loader
# re-normalizes text built by another version (tweetjax.data.builder.stored_normalization).
VERSION = 1


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
_ASCII_CONTROL = bytes([*range(1, 9), 0x0b, 0x0c, *range(0x0e, 0x20), 0x7f])  # _CONTROL, for bytes.translate
_ASCII_OTHER_SPACE = "".join(c for c in map(chr, range(128)) if c.isspace() and c != " ")


_URL_CHARS = r"[^\s\x1c-\x1f\x00<>\"]+"  # up to whitespace, NUL, <, > or "; \x1c-\x1f: \s without re.ASCII
# DIGIT: `\d`, or `0-9` for ASCII text, where it means the same and a bitmap test replaces a Unicode lookup
_PHONE = (r"[+(DIGIT](?:(?<=\+)(?<![\w+-].)[DIGIT]{1,3}(?:[ .-]?\(?[DIGIT]{1,4}\)?){2,5}(?!\w)"  # +44 20 7946 0958
          r"|(?<=\()(?<![\w+-].)[DIGIT]{3}\) ?[DIGIT]{3}[ .-][DIGIT]{4}(?!\w)"  # (555) 123-4567
          r"|(?<=[DIGIT])(?<![\w+-].)(?:[DIGIT]{2}[ .-][DIGIT]{3}[ .-][DIGIT]{4}(?!\w)"  # 555-123-4567
          r"|[DIGIT]{9}(?![\w-])))")  # 5551234567


class _Patterns:
  r"""The regexes of steps 4-7, for any text or (ascii_only) for pure-ASCII text. Each starts with a literal or a
  character set, lookbehinds after the first character (`x(?<![\w+-].)` == `(?<![\w+-])x`), so that `re` skips
  ahead to candidate positions instead of trying every position of the batch."""

  def __init__(self, ascii_only: bool):
    flags = re.ASCII if ascii_only else 0
    self.ascii_only = ascii_only
    # URLs: `(?i)(?:https?://|www\.)` + _URL_CHARS. ASCII text is matched lower-cased, where both prefixes are
    # literals; otherwise the first character is a set and the lookbehind re-reads it case-insensitively.
    if ascii_only:
      self.http = re.compile(r"https?://" + _URL_CHARS, flags)
      self.www = re.compile(r"www\." + _URL_CHARS, flags)
    else:
      self.url = re.compile(r"[hHwW](?i:(?<=h)ttps?://|(?<=w)ww\.)" + _URL_CHARS, flags)
    self.email_domain = re.compile(r"@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}(?![\w-])", flags)  # see _scrub_emails
    self.phone = re.compile(_PHONE.replace("DIGIT", "0-9" if ascii_only else r"\d"), flags)
    self.mention = re.compile(r"@(?<![\w@.].)\w{1,15}(?!\w)", flags)

  def sub_urls(self, s: str, repl: str) -> str:
    if not self.ascii_only:
      return self.url.sub(repl, s)
    low = s.lower()  # ASCII: same length, same positions
    spans = sorted([m.span() for m in self.http.finditer(low)] + [m.span() for m in self.www.finditer(low)])
    # a match runs to the end of its run of URL characters, so a match starting inside an earlier one is no match
    # of the combined pattern, and nothing after it is hidden
    out, last = [], 0
    for start, end in spans:
      if start >= last:
        out += (s[last:start], repl)
        last = end
    out.append(s[last:])
    return "".join(out)


_UNICODE, _ASCII = _Patterns(ascii_only=False), _Patterns(ascii_only=True)
_OTHER_SPACE = re.compile(r"[^\S ]")  # whitespace other than " " (single spaces need no rewrite)
_SPACE_RUN = re.compile(r"   *")  # two or more spaces; starts with the literal "  "


def _scrub_emails(s: str, email_domain: re.Pattern) -> str:
  """`local@domain.tld` -> <email>: the domain is matched from the '@' (fast literal scan), the local part
  ([\\w.+-]+) is walked back by hand; an '@' with nothing before it is a mention, not an e-mail."""
  out, last = [], 0
  for m in email_domain.finditer(s):
    start = m.start()
    while start > last and (s[start - 1].isalnum() or s[start - 1] in "._+-"):
      start -= 1
    if start < m.start():
      out += (s[last:start], EMAIL_TOKEN)
      last = m.end()
  out.append(s[last:])
  return "".join(out)


def _normalize_joined(texts: Sequence[str], config: NormalizeConfig) -> list[str]:
  s = "\x00".join(texts)
  if s.count("\x00") != len(texts) - 1:  # NUL is the batch separator: drop any inside the texts
    s = "\x00".join(t.replace("\x00", "") for t in texts)
  if s.isascii():
    s = s.encode("ascii").translate(None, _ASCII_CONTROL).decode("ascii")
  else:
    s = _CONTROL.sub("", s)
  if config.unescape_html and "&" in s:
    s = html.unescape(s)  # maps &#0; to U+FFFD, so the separator survives
  ascii_only = s.isascii()  # checked after unescaping, which can add non-ASCII characters
  p = _ASCII if ascii_only else _UNICODE
  if config.nfc and not ascii_only:
    s = unicodedata.normalize("NFC", s)
  if config.urls != "keep":
    s = p.sub_urls(s, URL_TOKEN if config.urls == "token" else "")
  if config.scrub_pii:
    if "@" in s:
      s = _scrub_emails(s, p.email_domain)
    s = p.phone.sub(PHONE_TOKEN, s)
  if config.mentions == "token" and "@" in s:
    s = p.mention.sub(USER_TOKEN, s)
  if config.collapse_whitespace:  # every whitespace run -> " ", then none next to a separator or at the ends
    if ascii_only:
      for c in _ASCII_OTHER_SPACE:
        if c in s:
          s = s.replace(c, " ")
    else:
      s = _OTHER_SPACE.sub(" ", s)
    if "  " in s:
      s = _SPACE_RUN.sub(" ", s)
    s = s.replace(" \x00", "\x00").replace("\x00 ", "\x00").strip(" ")
  out = s.split("\x00")
  assert len(out) == len(texts), "a regex ate the batch separator"
  return out


def normalize_batch(texts: Sequence[str], config: NormalizeConfig = NormalizeConfig()) -> list[str]:
  """Normalizes many tweets at once; see the module docstring for the steps."""
  if not texts:
    return []
  is_ascii = [t.isascii() for t in texts]
  num_ascii = sum(is_ascii)
  if num_ascii in (0, len(texts)):
    return _normalize_joined(texts, config)
  ascii_out = iter(_normalize_joined([t for t, a in zip(texts, is_ascii) if a], config))
  other_out = iter(_normalize_joined([t for t, a in zip(texts, is_ascii) if not a], config))
  return [next(ascii_out) if a else next(other_out) for a in is_ascii]


def normalize(text: str, config: NormalizeConfig = NormalizeConfig()) -> str:
  return normalize_batch([text], config)[0]
